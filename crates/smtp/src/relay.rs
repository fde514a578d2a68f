//! The relay client: SMTP sessions to peer nodes' endpoints, with STARTTLS verified against the
//! cluster CA (required when a CA is configured) and peer `AUTH PLAIN`.
//!
//! [`RelaySessions`] keeps one authenticated session per owner endpoint open between the
//! messages of a queue worker (as Postfix's connection cache does): a later transaction starts
//! with `RSET`, and a cached session found broken before the message could have been accepted is
//! replaced by a new one, once.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ds_net::{LineConn, MailStream, TlsConnector};
use tokio::net::TcpStream;

use ds_store::{Bodies, BodyRef};

use crate::data::Stuffer;
use crate::dsn_params;
use crate::{PEER_AUTH_PREFIX, SmtpConfig, base64};

/// Octets read from the store per write to the peer.
const SEND_CHUNK: usize = 64 * 1024;

/// A queued message to relay: its prefix and its stored body, read afresh (in chunks) for every
/// transaction.
#[derive(Debug, Clone)]
pub(crate) struct Outgoing {
    pub bodies: Bodies,
    pub prefix: String,
    pub body: BodyRef,
    /// The queued message's id, sent to peers that take `XDSHARE-ID` so that a repeated
    /// relay (our record of their `250` lost in a crash) is not delivered twice.
    pub relay_id: String,
    /// RFC 3461 parameters, passed on to a next hop that advertises `DSN`.
    pub dsn: OutgoingDsn,
}

/// The DSN parameters of a queued message, and the success DSNs its attempt owes.
#[derive(Debug, Clone, Default)]
pub(crate) struct OutgoingDsn {
    pub ret: Option<ds_store::queue::Ret>,
    pub envid: Option<String>,
    /// `NOTIFY`/`ORCPT` by recipient address.
    pub rcpts: HashMap<String, ds_store::queue::RcptDsn>,
    pub successes: crate::dsn::Successes,
}

impl OutgoingDsn {
    pub fn of(entry: &ds_store::queue::QueueEntry) -> Self {
        Self {
            ret: entry.ret,
            envid: entry.envid.clone(),
            rcpts: entry
                .recipients
                .iter()
                .filter(|r| !r.dsn.is_empty())
                .map(|r| (r.address.clone(), r.dsn.clone()))
                .collect(),
            successes: Default::default(),
        }
    }
}

impl Outgoing {
    fn size(&self) -> u64 {
        self.prefix.len() as u64 + self.body.len
    }
}

/// The fate of one recipient in a relay attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RcptOutcome {
    Delivered,
    /// `550` to `RCPT`: the owner has no such user (the cache may be stale).
    NoSuchUser(String),
    /// Any other permanent failure.
    Failed(String),
    /// Try again later.
    Retry(String),
}

impl RcptOutcome {
    /// The reply or reason behind the outcome.
    pub(crate) fn reason(&self) -> &str {
        match self {
            RcptOutcome::Delivered => "delivered",
            RcptOutcome::NoSuchUser(r) | RcptOutcome::Failed(r) | RcptOutcome::Retry(r) => r,
        }
    }
}

/// Why `STARTTLS` did not give a TLS session.
pub(crate) enum StartTlsError {
    /// The server answered `STARTTLS` with an error: the plain session goes on.
    Refused(Client, String),
    /// The TLS handshake failed or could not begin (the connection is gone).
    Handshake(String),
    /// Any other failure (the connection is gone).
    Broken(String),
}

impl StartTlsError {
    pub(crate) fn reason(self) -> String {
        match self {
            StartTlsError::Refused(_, r)
            | StartTlsError::Handshake(r)
            | StartTlsError::Broken(r) => r,
        }
    }
}

/// The host of a `host:port` endpoint (without the brackets of `[v6]:port`).
fn endpoint_host(endpoint: &str) -> Option<&str> {
    endpoint
        .rsplit_once(':')
        .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']'))
}

/// Longest reply we read from a peer (lines and number of lines).
const MAX_REPLY_LINE: usize = 2048;
const MAX_REPLY_LINES: usize = 64;
/// Longest wait for the peer's answer to `QUIT` when a session is closed.
const QUIT_WAIT: Duration = Duration::from_secs(2);

pub(crate) struct Reply {
    pub(crate) code: u16,
    pub(crate) lines: Vec<String>,
}

impl Reply {
    fn text(&self) -> String {
        format!("{} {}", self.code, self.lines.join(" / "))
    }
}

pub(crate) struct Client {
    conn: LineConn<MailStream>,
    timeout: Duration,
}

impl Client {
    async fn read_reply(&mut self, timeout: Duration) -> Result<Reply, String> {
        let mut lines = Vec::new();
        loop {
            let line = self
                .conn
                .read_line(MAX_REPLY_LINE, timeout)
                .await
                .map_err(|e| format!("reading reply: {e}"))?
                .ok_or("connection closed by peer")?;
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end();
            if lines.len() >= MAX_REPLY_LINES {
                return Err(format!("bad reply {line:?}"));
            }
            // Peer input: never slice a str at a byte offset that may fall inside a character.
            let code: u16 = match line.as_bytes().get(..3) {
                Some(digits) if digits.iter().all(u8::is_ascii_digit) => {
                    digits.iter().fold(0, |n, d| n * 10 + u16::from(d - b'0'))
                }
                _ => return Err(format!("bad reply {line:?}")),
            };
            let more = line.as_bytes().get(3) == Some(&b'-');
            lines.push(line.get(4..).unwrap_or("").to_string());
            if !more {
                return Ok(Reply { code, lines });
            }
        }
    }

    /// Connects to `endpoint`, reads the greeting and says EHLO: the client and the EHLO
    /// reply. `Err` is the outcome of every recipient that was to go over it.
    pub(crate) async fn start(
        config: &SmtpConfig,
        endpoint: &str,
    ) -> Result<(Client, Reply), RcptOutcome> {
        let timeout = config.relay_timeout;
        let retry = RcptOutcome::Retry;
        let tcp = tokio::time::timeout(timeout, TcpStream::connect(endpoint))
            .await
            .map_err(|_| retry(format!("connect to {endpoint}: timed out")))?
            .map_err(|e| retry(format!("connect to {endpoint}: {e}")))?;
        let _ = tcp.set_nodelay(true);
        let mut conn = LineConn::new(MailStream::Plain(tcp));
        conn.set_write_timeout(timeout);
        let mut client = Client { conn, timeout };
        let greeting = client.read_reply(timeout).await.map_err(retry)?;
        if greeting.code != 220 {
            return Err(fail_one(&greeting, "greeting"));
        }
        let caps = client.ehlo(config).await?;
        Ok((client, caps))
    }

    async fn ehlo(&mut self, config: &SmtpConfig) -> Result<Reply, RcptOutcome> {
        let ehlo = format!("EHLO {}\r\n", ehlo_name(&config.hostname));
        let caps = self.command(&ehlo).await.map_err(RcptOutcome::Retry)?;
        if caps.code != 250 {
            return Err(fail_one(&caps, "EHLO"));
        }
        Ok(caps)
    }

    /// `STARTTLS`, the handshake with `tls` (verifying the host of `endpoint` as far as `tls`
    /// does) and EHLO again: the client over TLS and its new EHLO reply.
    pub(crate) async fn starttls(
        mut self,
        config: &SmtpConfig,
        tls: &Arc<rustls::ClientConfig>,
        endpoint: &str,
    ) -> Result<(Client, Reply), StartTlsError> {
        let host = endpoint_host(endpoint)
            .ok_or_else(|| StartTlsError::Broken(format!("bad endpoint {endpoint:?}")))?
            .to_string();
        let go = self
            .command("STARTTLS\r\n")
            .await
            .map_err(StartTlsError::Broken)?;
        if go.code != 220 {
            let why = format!("STARTTLS refused: {}", go.text());
            return Err(StartTlsError::Refused(self, why));
        }
        let (stream, buffered) = self.conn.into_parts();
        if !buffered.is_empty() {
            // Not a TLS start: as good as a failed handshake.
            return Err(StartTlsError::Handshake(
                "peer sent data after its STARTTLS reply".into(),
            ));
        }
        let connector = TlsConnector::from(Arc::clone(tls));
        let stream = stream
            .connect_tls(&connector, &host, self.timeout)
            .await
            .map_err(|e| StartTlsError::Handshake(format!("TLS with {endpoint}: {e}")))?;
        let mut conn = LineConn::new(stream);
        conn.set_write_timeout(self.timeout);
        let mut client = Client {
            conn,
            timeout: self.timeout,
        };
        let caps = client
            .ehlo(config)
            .await
            .map_err(|o| StartTlsError::Broken(format!("after STARTTLS: {}", o.reason())))?;
        Ok((client, caps))
    }

    /// `AUTH PLAIN` as `user`; `Err` says why it did not succeed.
    pub(crate) async fn auth_plain(&mut self, user: &str, password: &str) -> Result<(), String> {
        let token = format!("\0{user}\0{password}");
        let auth = self
            .command(&format!(
                "AUTH PLAIN {}\r\n",
                base64::encode(token.as_bytes())
            ))
            .await?;
        if auth.code != 235 {
            return Err(format!("AUTH refused: {}", auth.text()));
        }
        Ok(())
    }

    async fn command(&mut self, cmd: &str) -> Result<Reply, String> {
        self.conn
            .write_all(cmd.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        self.conn
            .flush()
            .await
            .map_err(|e| format!("sending: {e}"))?;
        self.read_reply(self.timeout).await
    }
}

/// The outcome of a whole transaction that ended with `reply`: permanent for 5xx, else
/// temporary.
fn fail_one(reply: &Reply, step: &str) -> RcptOutcome {
    let reason = format!("{step}: {}", reply.text());
    if reply.code >= 500 {
        RcptOutcome::Failed(reason)
    } else {
        RcptOutcome::Retry(reason)
    }
}

/// A whole-transaction failure for `n` recipients.
fn fail_all(reply: &Reply, step: &str, n: usize) -> Vec<RcptOutcome> {
    vec![fail_one(reply, step); n]
}

/// Why a transaction on an open session ended without a reply to every step. The session is
/// unusable afterwards.
#[derive(Debug)]
enum TxError {
    /// The session failed before the end of the message was sent: the peer cannot have
    /// accepted it, so the transaction may be made again on a new session.
    NotSent(String),
    /// The session failed while the message was sent or its final reply awaited: whether the
    /// peer took it is unknown (retried later, as any temporary failure).
    Unknown(String),
}

impl TxError {
    fn reason(self) -> String {
        match self {
            TxError::NotSent(r) | TxError::Unknown(r) => r,
        }
    }
}

/// An SMTP session with one peer endpoint: greeted, upgraded to TLS when a CA is configured and
/// authenticated when a cluster secret is set; usable for consecutive transactions.
pub(crate) struct RelaySession {
    client: Client,
    /// The EHLO reply the transactions go by (the one after STARTTLS, if any).
    caps: Reply,
    /// Transactions begun on this session; every one after the first starts with `RSET`.
    transactions: u64,
    /// The peer answered `421` (it is closing the channel): never used again.
    closing: bool,
    /// When the last transaction ended (or the session was opened).
    last_used: Instant,
    /// Authenticated as a peer: the owner takes our queue ids (`XDSHARE-ID`).
    peer: bool,
}

impl RelaySession {
    /// Connects, greets, secures and authenticates. `Err` is the outcome of every recipient
    /// that was to go over this session.
    async fn open(
        config: &SmtpConfig,
        tls: Option<&Arc<rustls::ClientConfig>>,
        endpoint: &str,
    ) -> Result<RelaySession, RcptOutcome> {
        let retry = RcptOutcome::Retry;
        if tls.is_none() && !config.cluster_secret.is_empty() {
            // The relay key is a credential: never sent without verified TLS (#13 point 2).
            tracing::warn!(
                %endpoint,
                "not relaying: no cluster CA configured, and the relay key is never sent without verified TLS"
            );
            return Err(retry(format!(
                "no verified TLS to {endpoint} (no cluster CA): the relay key is never sent in plaintext"
            )));
        }
        let (mut client, mut caps) = Client::start(config, endpoint).await?;
        if let Some(tls) = tls {
            if !has_cap(&caps, "STARTTLS") {
                return Err(retry(format!(
                    "{endpoint} does not offer STARTTLS (required with a cluster CA)"
                )));
            }
            (client, caps) = client
                .starttls(config, tls, endpoint)
                .await
                .map_err(|e| retry(e.reason()))?;
        }
        let peer = !config.cluster_secret.is_empty();
        if peer {
            let id = format!("{PEER_AUTH_PREFIX}{}", config.node_id);
            client
                .auth_plain(&id, &config.cluster_secret)
                .await
                // A misconfigured peer: keep the message, never hand it over unauthenticated.
                .map_err(|e| retry(format!("peer {e}")))?;
        }
        metrics::counter!("dshare_smtp_relay_sessions_total").increment(1);
        Ok(RelaySession::new(client, caps, peer))
    }

    /// A session on an open (greeted, secured, authenticated) connection; `peer`: authenticated
    /// as a peer node.
    pub(crate) fn new(client: Client, caps: Reply, peer: bool) -> RelaySession {
        RelaySession {
            client,
            caps,
            transactions: 0,
            closing: false,
            last_used: Instant::now(),
            peer,
        }
    }

    /// A command whose `421` reply means the peer is closing the session.
    async fn command(&mut self, cmd: &str, step: &str) -> Result<Reply, TxError> {
        let reply = self.client.command(cmd).await.map_err(TxError::NotSent)?;
        if reply.code == 421 {
            self.closing = true;
            return Err(TxError::NotSent(format!("{step}: {}", reply.text())));
        }
        Ok(reply)
    }

    /// One MAIL/RCPT/DATA transaction (after `RSET` on a used session). `Ok` holds an outcome
    /// per recipient, taken from the peer's replies only.
    async fn transaction(
        &mut self,
        sender: &str,
        recipients: &[String],
        body: &Outgoing,
    ) -> Result<Vec<RcptOutcome>, TxError> {
        let result = self.exchange(sender, recipients, body).await;
        self.transactions += 1;
        self.last_used = Instant::now();
        result
    }

    async fn exchange(
        &mut self,
        sender: &str,
        recipients: &[String],
        body: &Outgoing,
    ) -> Result<Vec<RcptOutcome>, TxError> {
        if self.transactions > 0 {
            let reply = self.command("RSET\r\n", "RSET").await?;
            if reply.code != 250 {
                self.closing = true;
                return Err(TxError::NotSent(format!("RSET: {}", reply.text())));
            }
        }
        let caps = &self.caps;
        let mut mail = format!("MAIL FROM:<{sender}>");
        if has_cap(caps, "SIZE") {
            mail.push_str(&format!(" SIZE={}", body.size()));
        }
        // The body is not scanned: our peers take 8BITMIME, and declaring it for 7-bit data is
        // harmless.
        if has_cap(caps, "8BITMIME") {
            mail.push_str(" BODY=8BITMIME");
        }
        if (!sender.is_ascii() || recipients.iter().any(|r| !r.is_ascii()))
            && has_cap(caps, "SMTPUTF8")
        {
            mail.push_str(" SMTPUTF8");
        }
        let dsn = has_cap(caps, "DSN");
        if dsn {
            mail.push_str(&dsn_params::mail_params(
                body.dsn.ret,
                body.dsn.envid.as_deref(),
            ));
        }
        // Last, where the owner looks for it.
        if self.peer && has_cap(caps, crate::session::RELAY_ID_PARAM) {
            mail.push_str(&format!(
                " {}={}",
                crate::session::RELAY_ID_PARAM,
                body.relay_id
            ));
        }
        mail.push_str("\r\n");
        let reply = self.command(&mail, "MAIL").await?;
        if reply.code != 250 {
            return Ok(fail_all(&reply, "MAIL", recipients.len()));
        }
        let mut outcomes = Vec::with_capacity(recipients.len());
        for rcpt in recipients {
            let params = match body.dsn.rcpts.get(rcpt) {
                Some(p) if dsn => dsn_params::rcpt_params(p),
                _ => String::new(),
            };
            let reply = self
                .command(&format!("RCPT TO:<{rcpt}>{params}\r\n"), "RCPT")
                .await?;
            outcomes.push(match reply.code {
                250 | 251 => None,
                550 => Some(RcptOutcome::NoSuchUser(format!("RCPT: {}", reply.text()))),
                500..=599 => Some(RcptOutcome::Failed(format!("RCPT: {}", reply.text()))),
                _ => Some(RcptOutcome::Retry(format!("RCPT: {}", reply.text()))),
            });
        }
        if outcomes.iter().all(Option::is_some) {
            return Ok(outcomes.into_iter().flatten().collect());
        }
        let go = self.command("DATA\r\n", "DATA").await?;
        if go.code != 354 {
            let all = fail_all(&go, "DATA", recipients.len());
            return Ok(merge(outcomes, all));
        }
        // From here on the peer may take the message: a broken session leaves its fate unknown.
        // The transfer and the final reply together get ten steps' time (each write is bounded
        // too), so a peer that stops reading cannot hold the queue runner.
        let transfer = self.client.timeout.saturating_mul(10);
        let client = &mut self.client;
        let done = tokio::time::timeout(transfer, async {
            let conn = &mut client.conn;
            let mut reader = body
                .bodies
                .open_message(body.prefix.as_bytes(), body.body.id)
                .map_err(|e| format!("reading the queued body: {e}"))?
                .ok_or_else(|| "the queued body is gone".to_string())?;
            let mut stuffer = Stuffer::new();
            let mut buf = vec![0u8; SEND_CHUNK];
            let mut wire = Vec::with_capacity(SEND_CHUNK + SEND_CHUNK / 16);
            loop {
                let n = std::io::Read::read(&mut reader, &mut buf)
                    .map_err(|e| format!("reading the queued body: {e}"))?;
                if n == 0 {
                    break;
                }
                wire.clear();
                stuffer.push(&buf[..n], &mut wire);
                conn.write_all(&wire)
                    .await
                    .map_err(|e| format!("sending body: {e}"))?;
            }
            wire.clear();
            stuffer.finish(&mut wire);
            wire.extend_from_slice(b".\r\n");
            conn.write_all(&wire)
                .await
                .map_err(|e| format!("sending body: {e}"))?;
            conn.flush()
                .await
                .map_err(|e| format!("sending body: {e}"))?;
            client.read_reply(transfer).await
        })
        .await
        .map_err(|_| TxError::Unknown(format!("sending body: no answer within {transfer:?}")))?
        .map_err(TxError::Unknown)?;
        if done.code == 421 {
            self.closing = true;
        }
        let all = if done.code == 250 {
            vec![RcptOutcome::Delivered; recipients.len()]
        } else {
            fail_all(&done, "end of DATA", recipients.len())
        };
        Ok(merge(outcomes, all))
    }

    /// Ends the session politely (a bounded wait for the peer's answer).
    async fn quit(mut self) {
        if !self.closing {
            let _ = tokio::time::timeout(QUIT_WAIT, self.client.command("QUIT\r\n")).await;
        }
    }
}

/// The relay sessions of one queue worker: at most one open session per owner endpoint,
/// reused for consecutive messages and closed by [`RelaySessions::close_idle`] and
/// [`RelaySessions::close_all`]. Never shared between workers.
pub(crate) struct RelaySessions<'a> {
    config: &'a SmtpConfig,
    tls: Option<&'a Arc<rustls::ClientConfig>>,
    /// Outbound sessions (to the Internet) are opened by this instead.
    transport: Option<&'a crate::outbound::Transport>,
    open: HashMap<String, RelaySession>,
    /// Endpoints a session could not be opened with, and why: not tried again by this worker
    /// (its other entries for them are deferred at once, rather than each waiting out the
    /// timeouts of a black-holed owner).
    dead: HashMap<String, String>,
    /// Endpoints whose last session did not advertise `DSN` (we report success ourselves).
    no_dsn: HashSet<String>,
}

impl<'a> RelaySessions<'a> {
    pub(crate) fn new(config: &'a SmtpConfig, tls: Option<&'a Arc<rustls::ClientConfig>>) -> Self {
        Self {
            config,
            tls,
            transport: None,
            open: HashMap::new(),
            dead: HashMap::new(),
            no_dsn: HashSet::new(),
        }
    }

    /// Whether no session could be opened with `endpoint` in this pass (connection, greeting
    /// or TLS failed: the host is unreachable, not merely deferring).
    pub(crate) fn unreachable(&self, endpoint: &str) -> bool {
        self.dead.contains_key(endpoint)
    }

    /// Whether the last session to `endpoint` advertised `DSN`: it was handed the message's
    /// DSN requests, and reports success itself.
    pub(crate) fn passes_dsn(&self, endpoint: &str) -> bool {
        !self.no_dsn.contains(endpoint)
    }

    /// Sessions to MX hosts or the relay host, opened as `transport` says.
    pub(crate) fn outbound(
        config: &'a SmtpConfig,
        transport: &'a crate::outbound::Transport,
    ) -> Self {
        Self {
            transport: Some(transport),
            ..Self::new(config, None)
        }
    }

    /// One relay attempt of a message to `endpoint`: every recipient gets an outcome. Uses the
    /// open session to `endpoint` if there is one; if that turns out broken before the message
    /// was sent, a new session is opened once. A transaction is never repeated after the
    /// message was (partly) sent.
    pub(crate) async fn relay(
        &mut self,
        endpoint: &str,
        sender: &str,
        recipients: &[String],
        body: &Outgoing,
    ) -> Vec<RcptOutcome> {
        let n = recipients.len();
        if let Some(mut session) = self.open.remove(endpoint) {
            match session.transaction(sender, recipients, body).await {
                Ok(outcomes) => {
                    self.keep(endpoint, session).await;
                    return outcomes;
                }
                Err(TxError::NotSent(reason)) => {
                    tracing::debug!(%endpoint, %reason, "cached relay session broken, reopening");
                }
                Err(e @ TxError::Unknown(_)) => return vec![RcptOutcome::Retry(e.reason()); n],
            }
        }
        if let Some(reason) = self.dead.get(endpoint) {
            return vec![RcptOutcome::Retry(format!("{reason} (not tried again in this pass)")); n];
        }
        let opened = match self.transport {
            Some(transport) => transport.open(self.config, endpoint).await,
            None => RelaySession::open(self.config, self.tls, endpoint).await,
        };
        let mut session = match opened {
            Ok(session) => {
                if has_cap(&session.caps, "DSN") {
                    self.no_dsn.remove(endpoint);
                } else {
                    self.no_dsn.insert(endpoint.to_string());
                }
                session
            }
            Err(outcome) => {
                if let RcptOutcome::Retry(reason) = &outcome {
                    self.dead.insert(endpoint.to_string(), reason.clone());
                }
                return vec![outcome; n];
            }
        };
        match session.transaction(sender, recipients, body).await {
            Ok(outcomes) => {
                self.keep(endpoint, session).await;
                outcomes
            }
            Err(e) => vec![RcptOutcome::Retry(e.reason()); n],
        }
    }

    async fn keep(&mut self, endpoint: &str, session: RelaySession) {
        if session.closing {
            return;
        }
        if let Some(old) = self.open.insert(endpoint.to_string(), session) {
            old.quit().await;
        }
    }

    /// Closes the sessions unused for `idle` or longer.
    pub(crate) async fn close_idle(&mut self, idle: Duration) {
        let stale: Vec<String> = self
            .open
            .iter()
            .filter(|(_, s)| s.last_used.elapsed() >= idle)
            .map(|(e, _)| e.clone())
            .collect();
        for endpoint in stale {
            if let Some(session) = self.open.remove(&endpoint) {
                session.quit().await;
            }
        }
    }

    /// Closes every session.
    pub(crate) async fn close_all(&mut self) {
        for (_, session) in self.open.drain() {
            session.quit().await;
        }
    }
}

/// Per-recipient refusals win over the transaction's outcome.
fn merge(per_rcpt: Vec<Option<RcptOutcome>>, all: Vec<RcptOutcome>) -> Vec<RcptOutcome> {
    per_rcpt
        .into_iter()
        .zip(all)
        .map(|(own, all)| own.unwrap_or(all))
        .collect()
}

pub(crate) fn has_cap(reply: &Reply, cap: &str) -> bool {
    reply.lines.iter().skip(1).any(|l| {
        l.split_whitespace()
            .next()
            .is_some_and(|w| w.eq_ignore_ascii_case(cap))
    })
}

/// The EHLO argument for `hostname`: an address literal (`[192.0.2.1]`, `[IPv6:2001:db8::1]`)
/// when it is an IP address (RFC 5321 §4.1.3), else the name itself.
pub(crate) fn ehlo_name(hostname: &str) -> String {
    match hostname
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<std::net::IpAddr>()
    {
        Ok(std::net::IpAddr::V4(ip)) => format!("[{ip}]"),
        Ok(std::net::IpAddr::V6(ip)) => format!("[IPv6:{ip}]"),
        Err(_) => hostname.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ehlo_uses_address_literals_for_ips() {
        assert_eq!(ehlo_name("node-a.example.net"), "node-a.example.net");
        assert_eq!(ehlo_name("192.0.2.7"), "[192.0.2.7]");
        assert_eq!(ehlo_name("2001:db8::1"), "[IPv6:2001:db8::1]");
        assert_eq!(ehlo_name("[192.0.2.7]"), "[192.0.2.7]");
    }
}
