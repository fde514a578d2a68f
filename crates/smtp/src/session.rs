//! [`Smtp`] and the server session: one connection, commands in order, replies buffered and
//! flushed when no complete command is waiting (PIPELINING), DATA through [`DataReader`] in
//! bounded chunks straight into the store's body writer.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ds_directory::{Address, Directory};
use ds_net::{ConnContext, LineConn, MailStream, Shutdown, TlsAcceptor};
use ds_store::Store;
use ds_store::mailbox::MailStore;
use ds_store::queue::QueueStore;
use smtp_proto::{AUTH_PLAIN, MAIL_SMTPUTF8, Request};
use subtle::ConstantTimeEq;
use tokio::sync::Notify;

use crate::data::{DataEnd, DataReader};
use crate::dsn_params::MailDsn;
use crate::locate::{Locate, Location, Owner, Purpose};
use crate::queue::QueueRunner;
use crate::reply::*;
use crate::{PEER_AUTH_PREFIX, SmtpConfig, base64};
use ds_store::queue::RcptDsn;

/// Bound on the STARTTLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Body octets collected before they go to the store's writer.
const CHUNK: usize = 64 * 1024;
/// What one message in DATA may hold in memory (the writer's buffer, the chunk, one read), taken
/// from the node's body budget.
const IN_FLIGHT_PER_MESSAGE: u64 = (ds_store::INLINE_MAX + 2 * CHUNK) as u64;

/// The SMTP service of a node: shared by every connection and the queue runner.
pub struct Smtp {
    pub(crate) config: SmtpConfig,
    pub(crate) directory: Directory,
    pub(crate) mail: MailStore,
    pub(crate) queue: QueueStore,
    pub(crate) store: Store,
    pub(crate) locator: Arc<dyn Locate>,
    tls: Option<TlsAcceptor>,
    pub(crate) relay_tls: Option<Arc<rustls::ClientConfig>>,
    /// Woken when a message is queued.
    pub(crate) wake: Arc<Notify>,
    /// The queue runner's workers and what they hold.
    in_flight: std::sync::Mutex<crate::queue::InFlight>,
    pub(crate) relay_workers: Arc<tokio::sync::Semaphore>,
    /// Outbound delivery (recipients outside every served domain).
    pub(crate) outbound: Option<crate::outbound::Outbound>,
    /// Password checks of submission logins for local accounts.
    pub(crate) passwords: Arc<ds_access::PasswordChecker>,
    /// Transaction ids, unique per process run (combined with the start time).
    next_id: AtomicU64,
    started: u64,
}

impl std::fmt::Debug for Smtp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Smtp")
            .field("config", &self.config)
            .field("starttls", &self.tls.is_some())
            .field("relay_tls", &self.relay_tls.is_some())
            .finish_non_exhaustive()
    }
}

/// A recipient accepted by `RCPT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Rcpt {
    /// A local account (canonical address).
    Local(String),
    /// Outside every served domain (an authenticated submission): queued for outbound delivery.
    Outbound(String),
    /// A local mailing list.
    List(String),
    /// Owned by a peer.
    Remote(Owner),
}

impl Rcpt {
    /// The address the message goes to (the key of its DSN parameters).
    pub(crate) fn address(&self) -> &str {
        match self {
            Rcpt::Local(a) | Rcpt::Outbound(a) | Rcpt::List(a) => a,
            Rcpt::Remote(owner) => &owner.canonical,
        }
    }
}

/// An accepted envelope, handed to delivery.
#[derive(Debug)]
pub(crate) struct Envelope {
    pub id: String,
    pub sender: String,
    pub recipients: Vec<Rcpt>,
    /// The peer node when the session is a relay hop.
    pub hop: Option<String>,
    /// On a relay hop: the sending node's id of the queued message (`XDSHARE-ID`), which
    /// makes the delivery idempotent (#13 point 18).
    pub relay_id: Option<String>,
    pub helo: String,
    pub peer: IpAddr,
    pub with: &'static str,
    /// Submission: the authenticated account (the `Received` line says so and hides `peer`
    /// unless configured otherwise).
    pub user: Option<String>,
    /// Header lines the message lacked (`Message-ID`, `Date`), added before its header.
    pub added_headers: String,
    /// RFC 3461 `RET` and `ENVID`.
    pub dsn: MailDsn,
    /// RFC 3461 `NOTIFY` and `ORCPT` per recipient address (see [`Rcpt::address`]); a
    /// recipient without parameters has no entry.
    pub rcpt_dsn: BTreeMap<String, RcptDsn>,
}

impl Envelope {
    /// The DSN parameters given with the recipient `address`.
    pub(crate) fn rcpt_dsn(&self, address: &str) -> RcptDsn {
        self.rcpt_dsn.get(address).cloned().unwrap_or_default()
    }
}

pub(crate) struct Transaction {
    pub(crate) sender: String,
    pub(crate) smtputf8: bool,
    pub(crate) recipients: Vec<Rcpt>,
    /// `XDSHARE-ID` of a peer's relay.
    relay_id: Option<String>,
    dsn: MailDsn,
    rcpt_dsn: BTreeMap<String, RcptDsn>,
}

enum Action {
    Continue,
    Close,
    StartTls,
    Data,
}

pub(crate) struct Session {
    pub(crate) smtp: Arc<Smtp>,
    pub(crate) ctx: ConnContext,
    pub(crate) helo: Option<String>,
    pub(crate) esmtp: bool,
    /// Set after a successful peer AUTH: the peer's node id.
    pub(crate) hop: Option<String>,
    pub(crate) tx: Option<Transaction>,
    errors: usize,
    /// Uncached peer fan-outs this client may still cause (RCPT, MAIL FROM, AUTH lookups);
    /// authenticated relay hops locate without it.
    pub(crate) fanouts: ds_access::FanoutBudget,
    /// A submission listener (587 STARTTLS, 465 implicit TLS): users authenticate, MX
    /// intake rules do not apply.
    pub(crate) submission: bool,
    /// Submission: the authenticated account (canonical address).
    pub(crate) user: Option<String>,
}

impl Smtp {
    /// The service. `locator` answers where addresses live; `tls_acceptor` enables STARTTLS;
    /// `relay_tls` (a client config trusting the cluster CA) makes relays require STARTTLS.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: SmtpConfig,
        directory: Directory,
        mail: MailStore,
        queue: QueueStore,
        store: Store,
        locator: Arc<dyn Locate>,
        tls_acceptor: Option<TlsAcceptor>,
        relay_tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Arc<Smtp> {
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        metrics::gauge!("dshare_queue_depth").set(queue.len() as f64);
        let passwords =
            ds_access::PasswordChecker::shared_or_default(config.passwords.clone(), &directory);
        let outbound = crate::outbound::Outbound::new(&config);
        Arc::new(Smtp {
            outbound,
            passwords,
            config,
            directory,
            mail,
            queue,
            store,
            locator,
            tls: tls_acceptor,
            relay_tls,
            wake: Arc::new(Notify::new()),
            in_flight: std::sync::Mutex::default(),
            relay_workers: Arc::new(tokio::sync::Semaphore::new(
                crate::queue::MAX_OWNERS_AT_ONCE,
            )),
            next_id: AtomicU64::new(0),
            started,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &SmtpConfig {
        &self.config
    }

    /// The relay queue runner; run it once per node (see [`QueueRunner::run`]).
    pub fn queue_runner(self: &Arc<Self>) -> QueueRunner {
        QueueRunner::new(Arc::clone(self))
    }

    /// Notifying this wakes the queue runner (after an operator's `queue retry`, say).
    pub fn queue_waker(&self) -> Arc<Notify> {
        Arc::clone(&self.wake)
    }

    /// Runs the relay queue until `shutdown`.
    pub async fn run_queue(self: Arc<Self>, shutdown: Shutdown) {
        self.queue_runner().run(shutdown).await;
    }

    pub(crate) fn in_flight(&self) -> std::sync::MutexGuard<'_, crate::queue::InFlight> {
        self.in_flight.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn new_id(&self) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        format!("{:X}{:04X}", self.started, n)
    }

    /// Serves one connection; the handler for `ds_net::serve`. A listener whose protocol
    /// name starts with `submission` (`submission` on 587, `submissions` on 465) serves
    /// message submission (RFC 6409): AUTH for users after TLS, mail to anywhere once
    /// authenticated; any other is MX intake.
    pub async fn handle(self: Arc<Self>, stream: MailStream, ctx: ConnContext, shutdown: Shutdown) {
        let fanouts = self.locator.fanout_budget();
        let mut session = Session {
            submission: ctx.protocol.starts_with("submission"),
            user: None,
            smtp: self,
            fanouts,
            ctx,
            helo: None,
            esmtp: false,
            hop: None,
            tx: None,
            errors: 0,
        };
        let conn = LineConn::new(stream);
        match session.run(conn, &shutdown).await {
            Ok(()) => tracing::debug!("smtp session closed"),
            Err(e) => tracing::info!(error = %e, "smtp session ended"),
        }
    }
}

impl Session {
    fn config(&self) -> &SmtpConfig {
        &self.smtp.config
    }

    async fn run(
        &mut self,
        mut conn: LineConn<MailStream>,
        shutdown: &Shutdown,
    ) -> crate::Result<()> {
        let greeting = format!("220 {} ESMTP Domain Share\r\n", self.config().hostname);
        conn.write_all(greeting.as_bytes()).await?;
        loop {
            if !conn.buffered().contains(&b'\n') {
                conn.flush().await?;
            }
            let (max_line, idle) = (self.config().max_line, self.config().idle_timeout);
            let line = tokio::select! {
                line = conn.read_line(max_line, idle) => line,
                () = shutdown.wait() => {
                    conn.write_all(SHUTTING_DOWN.as_bytes()).await?;
                    conn.shutdown().await?;
                    return Ok(());
                }
            };
            let line = match line {
                Ok(Some(line)) => line,
                Ok(None) => return Ok(()),
                Err(ds_net::Error::LineTooLong { .. }) => {
                    if self.error(&mut conn, LINE_TOO_LONG).await? {
                        return Ok(());
                    }
                    continue;
                }
                Err(ds_net::Error::Timeout) => {
                    tracing::info!("idle timeout");
                    conn.write_all(TIMEOUT.as_bytes()).await?;
                    let _ = conn.shutdown().await;
                    return Ok(());
                }
                Err(e) => return Err(e.into()),
            };
            match self.command(&mut conn, &line).await? {
                Action::Continue => {}
                Action::Close => {
                    let _ = conn.shutdown().await;
                    return Ok(());
                }
                Action::StartTls => {
                    let acceptor = self.smtp.tls.clone().ok_or_else(|| {
                        crate::Error::Relay("STARTTLS without an acceptor".into())
                    })?;
                    conn = conn.start_tls(&acceptor, TLS_HANDSHAKE_TIMEOUT).await?;
                    self.ctx.update_from(conn.get_ref());
                    // RFC 3207: forget everything learnt before the handshake.
                    self.helo = None;
                    self.esmtp = false;
                    self.hop = None;
                    self.user = None;
                    self.tx = None;
                    tracing::debug!(sni = ?self.ctx.sni, "STARTTLS done");
                }
                Action::Data => {
                    if !self.data(&mut conn).await? {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Queues an error reply and counts it; true if the session must close (too many errors).
    async fn error(&mut self, conn: &mut LineConn<MailStream>, reply: &str) -> crate::Result<bool> {
        self.errors += 1;
        if self.errors > self.config().max_errors {
            tracing::info!(errors = self.errors, "too many errors, closing");
            conn.write_all(TOO_MANY_ERRORS.as_bytes()).await?;
            let _ = conn.shutdown().await;
            return Ok(true);
        }
        conn.write_all(reply.as_bytes()).await?;
        Ok(false)
    }

    async fn reply(
        &mut self,
        conn: &mut LineConn<MailStream>,
        reply: &str,
    ) -> crate::Result<Action> {
        if reply.starts_with('5') || reply.starts_with("452") {
            if self.error(conn, reply).await? {
                return Ok(Action::Close);
            }
        } else {
            conn.write_all(reply.as_bytes()).await?;
        }
        Ok(Action::Continue)
    }

    async fn command(
        &mut self,
        conn: &mut LineConn<MailStream>,
        line: &[u8],
    ) -> crate::Result<Action> {
        // smtp-proto refuses MAIL parameters it does not know: ours is taken off first.
        let (line, relay_id) = match split_relay_id(line) {
            Some((rest, id)) => (Cow::Owned(rest), Some(id)),
            None => (Cow::Borrowed(line), None),
        };
        if relay_id.is_some() && self.hop.is_none() {
            // Only an authenticated peer may name its queued message; anyone else gets what a
            // server without the extension answers.
            tracing::info!("MAIL refused: XDSHARE-ID from a client that is not a peer");
            let reply = format!("555 5.5.4 Unsupported parameter \"{RELAY_ID_PARAM}\"\r\n");
            return self.reply(conn, &reply).await;
        }
        let request = match Request::parse(&mut line.iter()) {
            Ok(request) => request,
            Err(e) => {
                let reply = parse_error_reply(e);
                return self.reply(conn, &reply).await;
            }
        };
        match request {
            Request::Ehlo { host } => {
                let reply = self.ehlo(&host, true);
                self.reply(conn, &reply).await
            }
            Request::Helo { host } => {
                let reply = self.ehlo(&host, false);
                self.reply(conn, &reply).await
            }
            Request::Mail { from } => {
                let dsn = match crate::dsn_params::mail(from.flags, from.env_id.as_deref()) {
                    Ok(dsn) => dsn,
                    Err(reply) => return self.reply(conn, &reply).await,
                };
                let reply = self
                    .mail(from.address, from.size, from.flags, relay_id, dsn)
                    .await;
                self.reply(conn, reply.as_ref()).await
            }
            Request::Rcpt { to } => {
                let dsn = match crate::dsn_params::rcpt(to.flags, to.orcpt.as_deref()) {
                    Ok(dsn) => dsn,
                    Err(reply) => return self.reply(conn, &reply).await,
                };
                let reply = self.rcpt(&to.address, dsn).await;
                self.reply(conn, reply.as_ref()).await
            }
            Request::Data => match &self.tx {
                None => self.reply(conn, NEED_MAIL).await,
                Some(tx) if tx.recipients.is_empty() => self.reply(conn, NEED_RCPT).await,
                Some(_) if !self.space_left() => {
                    self.tx = None;
                    self.reply(conn, NO_SPACE).await
                }
                Some(_) => {
                    conn.write_all(DATA_GO.as_bytes()).await?;
                    Ok(Action::Data)
                }
            },
            Request::Rset => {
                self.tx = None;
                self.reply(conn, OK).await
            }
            Request::Noop { .. } => self.reply(conn, OK).await,
            Request::Quit => {
                let bye = format!(
                    "221 2.0.0 {} closing connection\r\n",
                    self.config().hostname
                );
                conn.write_all(bye.as_bytes()).await?;
                Ok(Action::Close)
            }
            Request::Vrfy { .. } => self.reply(conn, VRFY).await,
            Request::Help { .. } => self.reply(conn, HELP).await,
            Request::StartTls => {
                if self.ctx.tls {
                    self.reply(conn, ALREADY_TLS).await
                } else if self.smtp.tls.is_none() {
                    self.reply(conn, NO_TLS).await
                } else {
                    conn.write_all(STARTTLS_GO.as_bytes()).await?;
                    Ok(Action::StartTls)
                }
            }
            Request::Auth {
                mechanism,
                initial_response,
            } => {
                let reply = self.auth(conn, mechanism, &initial_response).await?;
                self.reply(conn, reply.as_ref()).await
            }
            Request::Lhlo { .. }
            | Request::Bdat { .. }
            | Request::Expn { .. }
            | Request::Etrn { .. }
            | Request::Atrn { .. }
            | Request::Burl { .. } => self.reply(conn, NOT_IMPLEMENTED).await,
        }
    }

    /// The free-space reserve of the data disk (#13 point 19): false (logged) when new mail
    /// must wait. Asked again for every message, so mail flows again once space returns.
    fn space_left(&self) -> bool {
        match self.smtp.store.check_free_space() {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "message refused: data disk below its reserve");
                metrics::counter!("dshare_smtp_messages_total", "result" => "no_space")
                    .increment(1);
                false
            }
        }
    }

    fn auth_offered(&self) -> bool {
        if self.submission {
            return self.ctx.tls && self.user.is_none();
        }
        !self.config().cluster_secret.is_empty() && self.auth_allowed_now()
    }

    /// `require_tls`: a password only over TLS, or in plaintext on an exempt listener (loopback
    /// by default) of a node that cannot offer STARTTLS.
    fn auth_allowed_now(&self) -> bool {
        self.ctx.tls
            || (self.smtp.tls.is_none()
                && self
                    .config()
                    .tls_policy
                    .plaintext_allowed(self.ctx.local.ip()))
    }

    fn ehlo(&mut self, host: &str, esmtp: bool) -> String {
        self.helo = Some(sanitize(host));
        self.esmtp = esmtp;
        self.tx = None;
        let cfg = self.config();
        let mut lines = vec![format!(
            "{} Hello {} [{}]",
            cfg.hostname,
            sanitize(host),
            self.ctx.peer.ip()
        )];
        if esmtp {
            lines.push("PIPELINING".into());
            lines.push(format!("SIZE {}", cfg.max_message_size));
            lines.push("8BITMIME".into());
            lines.push("ENHANCEDSTATUSCODES".into());
            lines.push("SMTPUTF8".into());
            lines.push("DSN".into());
            if self.smtp.tls.is_some() && !self.ctx.tls {
                lines.push("STARTTLS".into());
            }
            if self.submission {
                if self.auth_offered() {
                    lines.push("AUTH PLAIN LOGIN".into());
                }
            } else {
                if self.auth_offered() {
                    // Peers relay with their queue id (taken only after peer AUTH).
                    lines.push(RELAY_ID_PARAM.into());
                }
                if self.auth_offered() && self.hop.is_none() {
                    lines.push("AUTH PLAIN".into());
                }
            }
        }
        let mut out = String::new();
        let last = lines.len() - 1;
        for (i, l) in lines.iter().enumerate() {
            out.push_str(if i == last { "250 " } else { "250-" });
            out.push_str(l);
            out.push_str("\r\n");
        }
        out
    }

    async fn mail(
        &mut self,
        address: Cow<'_, str>,
        size: usize,
        flags: u64,
        relay_id: Option<String>,
        dsn: MailDsn,
    ) -> Cow<'static, str> {
        if self.helo.is_none() {
            return NEED_HELO.into();
        }
        if self.tx.is_some() {
            return NESTED_MAIL.into();
        }
        let max = self.config().max_message_size;
        if size > max {
            tracing::info!(size, max, "MAIL refused: declared SIZE over the limit");
            return TOO_BIG.into();
        }
        if !self.space_left() {
            return NO_SPACE.into();
        }
        let smtputf8 = flags & MAIL_SMTPUTF8 != 0;
        if !address.is_ascii() && !smtputf8 {
            return BAD_8BIT_ADDR.into();
        }
        if self.submission {
            return match self.submission_sender(address.as_ref()).await {
                Ok(()) => {
                    self.tx = Some(Transaction {
                        sender: address.into_owned(),
                        smtputf8,
                        recipients: Vec::new(),
                        relay_id: None,
                        dsn,
                        rcpt_dsn: BTreeMap::new(),
                    });
                    SENDER_OK.into()
                }
                Err(reply) => reply,
            };
        }
        let sender = address.into_owned();
        if !sender.is_empty() && self.hop.is_none() && self.config().sender_check {
            let Ok(parsed) = Address::parse(&sender) else {
                return "501 5.1.7 Bad sender address syntax\r\n".into();
            };
            if self.smtp.directory.domains().is_shared(parsed.domain()) {
                let normal = parsed.to_string();
                match self
                    .smtp
                    .locator
                    .locate_bounded(&normal, Purpose::Sender, &self.fanouts)
                    .await
                {
                    Location::Unknown | Location::Refused(_) => {
                        tracing::info!(sender = %normal, "MAIL refused: no node owns the sender");
                        return UNKNOWN_SENDER.into();
                    }
                    Location::TempFail(reason) => {
                        tracing::warn!(sender = %normal, %reason, "MAIL deferred: sender lookup failed");
                        return TEMPFAIL_LOOKUP.into();
                    }
                    _ => {}
                }
            }
        }
        self.tx = Some(Transaction {
            sender,
            smtputf8,
            recipients: Vec::new(),
            relay_id,
            dsn,
            rcpt_dsn: BTreeMap::new(),
        });
        SENDER_OK.into()
    }

    async fn rcpt(&mut self, address: &str, dsn: RcptDsn) -> Cow<'static, str> {
        let Some(tx) = &self.tx else {
            return NEED_MAIL.into();
        };
        if tx.recipients.len() >= self.config().max_recipients {
            return TOO_MANY_RCPTS.into();
        }
        if !address.is_ascii() && !tx.smtputf8 {
            return BAD_8BIT_ADDR.into();
        }
        // RFC 5321 §4.5.1: `<postmaster>` without a domain must be accepted; it is the
        // main domain's postmaster. smtp-proto hands it over as an empty address.
        let parsed = if address.is_empty() || address.eq_ignore_ascii_case("postmaster") {
            Address::new("postmaster", self.smtp.directory.domains().main())
        } else {
            Address::parse(address)
        };
        let Ok(parsed) = parsed else {
            return "501 5.1.3 Bad recipient address syntax\r\n".into();
        };
        if !self.smtp.directory.domains().is_served(parsed.domain()) {
            if self.user.is_some() {
                return self.add_rcpt(Rcpt::Outbound(parsed.to_string()), dsn);
            }
            tracing::info!(rcpt = %parsed, "RCPT refused: domain not served (no relay)");
            return RELAY_DENIED.into();
        }
        let normal = parsed.to_string();
        let hop = self.hop.is_some();
        let location = if hop {
            // An authenticated peer: its own client was bounded where it connected.
            self.smtp.locator.locate(&normal, Purpose::Rcpt).await
        } else {
            self.smtp
                .locator
                .locate_bounded(&normal, Purpose::Rcpt, &self.fanouts)
                .await
        };
        let rcpt = match location {
            Location::Local { address, enabled } => {
                if !enabled {
                    return DISABLED.into();
                }
                Rcpt::Local(address)
            }
            Location::LocalList(list) => Rcpt::List(list),
            Location::Remote(owner) if !hop => {
                if !owner.can_receive {
                    return DISABLED.into();
                }
                Rcpt::Remote(owner)
            }
            Location::External(to) if self.user.is_some() => Rcpt::Outbound(to),
            Location::External(to) if !hop => {
                tracing::info!(rcpt = %normal, %to, "RCPT refused: routed outside the served domains");
                return EXTERNAL_DENIED.into();
            }
            Location::Refused(text) => {
                tracing::info!(rcpt = %normal, hop, %text, "RCPT refused by a Router record");
                return refused_reply(&text).into();
            }
            // A relay hop too: the sending node keeps the message queued and tries again,
            // rather than bouncing mail that only has to wait (issue 13 point 11).
            Location::TempFail(reason) => {
                tracing::warn!(rcpt = %normal, hop, %reason, "RCPT deferred: lookup failed");
                return TEMPFAIL_LOOKUP.into();
            }
            other => {
                tracing::info!(rcpt = %normal, hop, location = ?other, "RCPT refused: no such user here");
                return UNKNOWN_USER.into();
            }
        };
        self.add_rcpt(rcpt, dsn)
    }

    fn add_rcpt(&mut self, rcpt: Rcpt, dsn: RcptDsn) -> Cow<'static, str> {
        if let Some(tx) = &mut self.tx
            && !tx.recipients.contains(&rcpt)
        {
            if !dsn.is_empty() {
                tx.rcpt_dsn.insert(rcpt.address().to_string(), dsn);
            }
            tx.recipients.push(rcpt);
        }
        RCPT_OK.into()
    }

    async fn auth(
        &mut self,
        conn: &mut LineConn<MailStream>,
        mechanism: u64,
        initial: &str,
    ) -> crate::Result<Cow<'static, str>> {
        if self.helo.is_none() || !self.esmtp {
            return Ok(NEED_HELO.into());
        }
        if self.submission {
            return self.auth_user(conn, mechanism, initial).await;
        }
        self.auth_peer(conn, mechanism, initial)
            .await
            .map(Cow::from)
    }

    async fn auth_peer(
        &mut self,
        conn: &mut LineConn<MailStream>,
        mechanism: u64,
        initial: &str,
    ) -> crate::Result<&'static str> {
        if self.hop.is_some() {
            return Ok(ALREADY_AUTH);
        }
        if self.tx.is_some() {
            return Ok(AUTH_IN_TX);
        }
        if mechanism != AUTH_PLAIN {
            return Ok(AUTH_MECH);
        }
        if !self.auth_allowed_now() {
            tracing::info!(local = %self.ctx.local, "AUTH refused: no TLS yet (require_tls)");
            return Ok(AUTH_ENCRYPT);
        }
        let response = if initial.is_empty() {
            conn.write_all(AUTH_CONTINUE.as_bytes()).await?;
            conn.flush().await?;
            let (max_line, idle) = (self.config().max_line, self.config().idle_timeout);
            match conn.read_line(max_line, idle).await {
                Ok(Some(line)) => String::from_utf8_lossy(&line).trim_end().to_string(),
                Ok(None) => return Err(ds_net::Error::UnexpectedEof.into()),
                Err(ds_net::Error::LineTooLong { .. }) => return Ok(LINE_TOO_LONG),
                Err(e) => return Err(e.into()),
            }
        } else {
            initial.to_string()
        };
        if response == "*" {
            return Ok(AUTH_CANCELLED);
        }
        let decoded = if response == "=" {
            Some(Vec::new())
        } else {
            base64::decode(&response)
        };
        let Some(decoded) = decoded else {
            return Ok(AUTH_BAD_B64);
        };
        match self.check_peer(&decoded) {
            Some(node) => {
                tracing::info!(peer_node = %node, "peer authenticated, session is a relay hop");
                self.hop = Some(node);
                Ok(AUTH_OK)
            }
            None => {
                tracing::info!("AUTH refused (only peer nodes may authenticate)");
                Ok(AUTH_FAILED)
            }
        }
    }

    /// SASL PLAIN `authzid NUL authcid NUL password`: a peer node with the cluster secret.
    fn check_peer(&self, decoded: &[u8]) -> Option<String> {
        let secret = self.config().cluster_secret.as_bytes();
        if secret.is_empty() {
            return None;
        }
        let mut parts = decoded.splitn(3, |&b| b == 0);
        let (authz, authc, password) = (parts.next()?, parts.next()?, parts.next()?);
        let authc = std::str::from_utf8(authc).ok()?;
        let node = authc.strip_prefix(PEER_AUTH_PREFIX)?;
        let password_ok: bool = password.ct_eq(secret).into();
        let authz_ok = authz.is_empty() || authz == authc.as_bytes();
        (password_ok && authz_ok && !node.is_empty()).then(|| node.to_string())
    }

    /// Reads the message after `354` in bounded chunks into the store's body writer, delivers
    /// it, replies. False if the connection must close.
    async fn data(&mut self, conn: &mut LineConn<MailStream>) -> crate::Result<bool> {
        let max = self.config().max_message_size;
        let idle = self.config().idle_timeout;
        // The whole transfer is bounded, not only each wait (#13 point 8).
        let deadline = tokio::time::Instant::now() + self.config().data_timeout;
        let mut reader = DataReader::new(max);
        // Memory this message may hold: the writer's buffer and one chunk of input.
        let budget = self.config().body_budget.try_take(IN_FLIGHT_PER_MESSAGE);
        let mut writer = match budget {
            Some(_) => match self.smtp.store.bodies().writer() {
                Ok(w) => Some(w),
                Err(e) => {
                    tracing::error!(error = %e, "cannot start storing a message");
                    None
                }
            },
            None => None,
        };
        let mut store_failed = budget.is_some() && writer.is_none();
        // The disk went below its reserve while the message came in: nothing of it is kept.
        let mut no_space = false;
        let mut chunk = Vec::with_capacity(CHUNK);
        // Submission: the header section is kept (bounded) for the sender rules.
        let mut header_scan = self
            .user
            .is_some()
            .then(crate::headers::HeaderScan::default);
        conn.flush().await?;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let input = match conn.fill_buf(idle.min(left)).await {
                Ok(input) => input,
                Err(ds_net::Error::Timeout) => {
                    if left <= idle {
                        tracing::info!(limit = ?self.config().data_timeout, "DATA took too long, closing");
                    }
                    conn.write_all(TIMEOUT.as_bytes()).await?;
                    let _ = conn.shutdown().await;
                    return Ok(false);
                }
                Err(e) => return Err(e.into()),
            };
            if input.is_empty() {
                tracing::info!("connection closed during DATA");
                return Ok(false);
            }
            let before = chunk.len();
            let end = reader.push(input, &mut chunk);
            if let Some(scan) = &mut header_scan {
                scan.push(&chunk[before..]);
            }
            let used = match end {
                DataEnd::Done(n) => n,
                DataEnd::More => input.len(),
            };
            conn.consume(used);
            if reader.too_big() {
                // Nothing of it is kept (dropping the writer removes a spilled file).
                writer = None;
                chunk.clear();
            }
            let done = matches!(end, DataEnd::Done(_));
            if writer.is_some() && (chunk.len() >= CHUNK || done) && !self.space_left() {
                // Dropping the writer removes what was spilled of this message.
                writer = None;
                no_space = true;
            }
            if let Some(w) = &mut writer
                && (chunk.len() >= CHUNK || done)
            {
                if let Err(e) = w.write(&chunk) {
                    tracing::error!(error = %e, "storing a message failed");
                    writer = None;
                    store_failed = true;
                }
                chunk.clear();
            } else if writer.is_none() {
                chunk.clear();
            }
            if done {
                break;
            }
        }
        let tx = self.tx.take();
        let Some(tx) = tx else {
            return Ok(true);
        };
        if reader.too_big() {
            tracing::info!(size = reader.len(), max, sender = %tx.sender, "message refused: too big");
            metrics::counter!("dshare_smtp_messages_total", "result" => "too_big").increment(1);
            self.reply(conn, TOO_BIG).await?;
            return Ok(true);
        }
        if no_space {
            self.reply(conn, NO_SPACE).await?;
            return Ok(true);
        }
        if budget.is_none() {
            tracing::warn!(sender = %tx.sender, "message refused: bodies in flight over the node's budget");
            metrics::counter!("dshare_smtp_messages_total", "result" => "no_budget").increment(1);
            self.reply(conn, NO_BUDGET).await?;
            return Ok(true);
        }
        let mut added_headers = String::new();
        if let (Some(scan), Some(user)) = (header_scan, self.user.clone()) {
            match self.check_headers(&user, &tx.sender, scan.finish()).await {
                Ok(added) => added_headers = added,
                Err(reply) => {
                    // Nothing of it is kept (dropping the writer removes a spilled file).
                    drop(writer);
                    drop(budget);
                    metrics::counter!("dshare_smtp_messages_total", "result" => "refused")
                        .increment(1);
                    self.reply(conn, reply.as_ref()).await?;
                    return Ok(true);
                }
            }
        }
        let finished = match writer {
            Some(w) if !store_failed => tokio::task::spawn_blocking(move || w.finish())
                .await
                .map_err(|e| crate::Error::Task(e.to_string()))
                .and_then(|r| r.map_err(crate::Error::from)),
            _ => Err(crate::Error::Relay("message body not stored".into())),
        };
        drop(budget);
        let body = match finished {
            Ok(body) => body,
            Err(e) => {
                tracing::error!(error = %e, sender = %tx.sender, "message not stored");
                metrics::counter!("dshare_smtp_messages_total", "result" => "error").increment(1);
                conn.write_all(TEMP_LOCAL.as_bytes()).await?;
                return Ok(true);
            }
        };
        let authenticated = self.hop.is_some() || self.user.is_some();
        let with = match (self.esmtp, self.ctx.tls, authenticated) {
            (false, _, _) => "SMTP",
            (true, false, false) => "ESMTP",
            (true, true, false) => "ESMTPS",
            (true, false, true) => "ESMTPA",
            (true, true, true) => "ESMTPSA",
        };
        let envelope = crate::session::Envelope {
            id: self.smtp.new_id(),
            sender: tx.sender,
            recipients: tx.recipients,
            hop: self.hop.clone(),
            relay_id: tx.relay_id,
            helo: self.helo.clone().unwrap_or_default(),
            peer: self.ctx.peer.ip(),
            with,
            user: self.user.clone(),
            added_headers,
            dsn: tx.dsn,
            rcpt_dsn: tx.rcpt_dsn,
        };
        let reply = match self.smtp.accept(&envelope, body).await {
            Ok(()) => {
                metrics::counter!("dshare_smtp_messages_total", "result" => "accepted")
                    .increment(1);
                format!("250 2.0.0 OK id={}\r\n", envelope.id)
            }
            Err(e) => {
                tracing::error!(id = %envelope.id, error = %e, "message not stored");
                metrics::counter!("dshare_smtp_messages_total", "result" => "error").increment(1);
                TEMP_LOCAL.to_string()
            }
        };
        conn.write_all(reply.as_bytes()).await?;
        Ok(true)
    }
}

/// The `MAIL` parameter with which an authenticated peer names the queued message it relays
/// (its EHLO keyword too): `XDSHARE-ID=<created>.<queue id>`.
pub(crate) const RELAY_ID_PARAM: &str = "XDSHARE-ID";
/// Longest `XDSHARE-ID` value.
const MAX_RELAY_ID: usize = 64;

/// A `MAIL` line whose last parameter is `XDSHARE-ID=<value>`: the line without it, and the
/// value. Only the last word is looked at, and only a value of `[A-Za-z0-9._-]` counts: it
/// can hold neither `>` nor a quote, so no part of an address is taken for the parameter
/// (anything else is left to smtp-proto, which refuses unknown parameters).
fn split_relay_id(line: &[u8]) -> Option<(Vec<u8>, String)> {
    if !line.get(..5)?.eq_ignore_ascii_case(b"MAIL ") {
        return None;
    }
    let body = line.strip_suffix(b"\n")?;
    let body = body.strip_suffix(b"\r").unwrap_or(body);
    let start = body.iter().rposition(|b| *b == b' ')? + 1;
    let word = &body[start..];
    let prefix = RELAY_ID_PARAM.len() + 1;
    if word.len() < prefix
        || !word[..prefix - 1].eq_ignore_ascii_case(RELAY_ID_PARAM.as_bytes())
        || word[prefix - 1] != b'='
    {
        return None;
    }
    let value = String::from_utf8_lossy(&word[prefix..]).into_owned();
    if !valid_relay_id(&value) {
        return None;
    }
    let mut rest = body[..start].trim_ascii_end().to_vec();
    rest.extend_from_slice(b"\r\n");
    Some((rest, value))
}

fn valid_relay_id(id: &str) -> bool {
    (1..=MAX_RELAY_ID).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

/// Printable ASCII only (HELO names go into headers and logs).
fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_ascii_graphic() { c } else { '?' })
        .take(255)
        .collect()
}

fn parse_error_reply(e: smtp_proto::Error) -> String {
    use smtp_proto::Error as E;
    match e {
        E::UnknownCommand => UNKNOWN_COMMAND.to_string(),
        E::InvalidSenderAddress => "501 5.1.7 Bad sender address syntax\r\n".to_string(),
        E::InvalidRecipientAddress => "501 5.1.3 Bad recipient address syntax\r\n".to_string(),
        E::SyntaxError { syntax } => format!("501 5.5.4 Syntax: {syntax}\r\n"),
        E::InvalidParameter { param } => format!("501 5.5.4 Invalid parameter {param:?}\r\n"),
        E::UnsupportedParameter { param } => {
            format!("555 5.5.4 Unsupported parameter {:?}\r\n", sanitize(&param))
        }
        E::ResponseTooLong | E::NeedsMoreData { .. } => LINE_TOO_LONG.to_string(),
        E::InvalidResponse { .. } => UNKNOWN_COMMAND.to_string(),
    }
}

/// `550 5.1.1 <text>` for a Router `error:text` record: the text made safe for one reply line
/// (printable ASCII, at most 200 characters), or the generic reply if nothing is left.
fn refused_reply(text: &str) -> String {
    let clean: String = text
        .chars()
        .map(|c| {
            if c == ' ' || c.is_ascii_graphic() {
                c
            } else {
                ' '
            }
        })
        .take(200)
        .collect();
    let clean = clean.trim();
    if clean.is_empty() {
        UNKNOWN_USER.to_string()
    } else {
        format!("550 5.1.1 {clean}\r\n")
    }
}

#[cfg(test)]
mod relay_id_tests {
    use super::*;

    #[test]
    fn the_relay_id_is_split_off_the_last_mail_parameter_only() {
        let (rest, id) =
            split_relay_id(b"MAIL FROM:<a@b.c> SIZE=10 BODY=8BITMIME xdshare-id=17.42\r\n")
                .unwrap();
        assert_eq!(rest, b"MAIL FROM:<a@b.c> SIZE=10 BODY=8BITMIME\r\n");
        assert_eq!(id, "17.42");
        assert!(split_relay_id(b"MAIL FROM:<a@b.c> SIZE=10\r\n").is_none());
        assert!(split_relay_id(b"RCPT TO:<a@b.c> XDSHARE-ID=1\r\n").is_none());
        // Inside a quoted local part it is no parameter: the value would hold `">`.
        assert!(split_relay_id(b"MAIL FROM:<\"x XDSHARE-ID=1\"@b.c>\r\n").is_none());
        assert!(split_relay_id(b"MAIL FROM:<a@b.c> XDSHARE-ID=\r\n").is_none());
        assert!(!valid_relay_id(""));
        assert!(!valid_relay_id(&"1".repeat(65)));
    }
}

#[cfg(test)]
mod refused_tests {
    #[test]
    fn router_error_text_is_sanitised() {
        assert_eq!(
            super::refused_reply("moved to bob@elsewhere.org"),
            "550 5.1.1 moved to bob@elsewhere.org\r\n"
        );
        assert_eq!(
            super::refused_reply("a\r\n250 fake\u{e9}"),
            "550 5.1.1 a  250 fake\r\n"
        );
        assert_eq!(super::refused_reply("\r\n"), super::UNKNOWN_USER);
    }
}
