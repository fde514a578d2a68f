//! The relay client: one SMTP transaction to a peer node's endpoint, with STARTTLS verified
//! against the cluster CA (required when a CA is configured) and peer `AUTH PLAIN`.

use std::sync::Arc;
use std::time::Duration;

use ds_net::{LineConn, MailStream, TlsConnector};
use tokio::net::TcpStream;

use crate::data::stuff;
use crate::{PEER_AUTH_PREFIX, SmtpConfig, base64};

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

/// Longest reply we read from a peer (lines and number of lines).
const MAX_REPLY_LINE: usize = 2048;
const MAX_REPLY_LINES: usize = 64;

struct Reply {
    code: u16,
    lines: Vec<String>,
}

impl Reply {
    fn text(&self) -> String {
        format!("{} {}", self.code, self.lines.join(" / "))
    }
}

struct Client {
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

/// One relay attempt: every recipient gets an outcome.
pub(crate) async fn relay(
    config: &SmtpConfig,
    tls: Option<&Arc<rustls::ClientConfig>>,
    endpoint: &str,
    sender: &str,
    recipients: &[String],
    body: &[u8],
) -> Vec<RcptOutcome> {
    match attempt(config, tls, endpoint, sender, recipients, body).await {
        Ok(outcomes) => outcomes,
        Err(reason) => vec![RcptOutcome::Retry(reason); recipients.len()],
    }
}

/// A whole-transaction failure: permanent for 5xx, else temporary.
fn fail_all(reply: &Reply, step: &str, n: usize) -> Vec<RcptOutcome> {
    let reason = format!("{step}: {}", reply.text());
    let outcome = if reply.code >= 500 {
        RcptOutcome::Failed(reason)
    } else {
        RcptOutcome::Retry(reason)
    };
    vec![outcome; n]
}

async fn attempt(
    config: &SmtpConfig,
    tls: Option<&Arc<rustls::ClientConfig>>,
    endpoint: &str,
    sender: &str,
    recipients: &[String],
    body: &[u8],
) -> Result<Vec<RcptOutcome>, String> {
    let timeout = config.relay_timeout;
    let host = endpoint
        .rsplit_once(':')
        .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']'))
        .ok_or_else(|| format!("bad endpoint {endpoint:?}"))?
        .to_string();
    let tcp = tokio::time::timeout(timeout, TcpStream::connect(endpoint))
        .await
        .map_err(|_| format!("connect to {endpoint}: timed out"))?
        .map_err(|e| format!("connect to {endpoint}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let mut conn = LineConn::new(MailStream::Plain(tcp));
    conn.set_write_timeout(timeout);
    let mut client = Client { conn, timeout };
    let greeting = client.read_reply(timeout).await?;
    if greeting.code != 220 {
        return Ok(fail_all(&greeting, "greeting", recipients.len()));
    }
    let ehlo = format!("EHLO {}\r\n", config.hostname);
    let mut caps = client.command(&ehlo).await?;
    if caps.code != 250 {
        return Ok(fail_all(&caps, "EHLO", recipients.len()));
    }
    if let Some(tls) = tls {
        if !has_cap(&caps, "STARTTLS") {
            return Err(format!(
                "{endpoint} does not offer STARTTLS (required with a cluster CA)"
            ));
        }
        let go = client.command("STARTTLS\r\n").await?;
        if go.code != 220 {
            return Err(format!("STARTTLS refused: {}", go.text()));
        }
        let (stream, buffered) = client.conn.into_parts();
        if !buffered.is_empty() {
            return Err("peer sent data after its STARTTLS reply".into());
        }
        let connector = TlsConnector::from(Arc::clone(tls));
        let stream = stream
            .connect_tls(&connector, &host, timeout)
            .await
            .map_err(|e| format!("TLS with {endpoint}: {e}"))?;
        client.conn = LineConn::new(stream);
        client.conn.set_write_timeout(timeout);
        caps = client.command(&ehlo).await?;
        if caps.code != 250 {
            return Ok(fail_all(&caps, "EHLO after STARTTLS", recipients.len()));
        }
    }
    if !config.cluster_secret.is_empty() {
        let token = format!(
            "\0{PEER_AUTH_PREFIX}{}\0{}",
            config.node_id, config.cluster_secret
        );
        let auth = client
            .command(&format!(
                "AUTH PLAIN {}\r\n",
                base64::encode(token.as_bytes())
            ))
            .await?;
        if auth.code != 235 {
            // A misconfigured peer: keep the message, never hand it over unauthenticated.
            return Err(format!("peer AUTH refused: {}", auth.text()));
        }
    }
    let mut mail = format!("MAIL FROM:<{sender}>");
    if has_cap(&caps, "SIZE") {
        mail.push_str(&format!(" SIZE={}", body.len()));
    }
    if !body.is_ascii() && has_cap(&caps, "8BITMIME") {
        mail.push_str(" BODY=8BITMIME");
    }
    if (!sender.is_ascii() || recipients.iter().any(|r| !r.is_ascii()))
        && has_cap(&caps, "SMTPUTF8")
    {
        mail.push_str(" SMTPUTF8");
    }
    mail.push_str("\r\n");
    let reply = client.command(&mail).await?;
    if reply.code != 250 {
        return Ok(fail_all(&reply, "MAIL", recipients.len()));
    }
    let mut outcomes = Vec::with_capacity(recipients.len());
    for rcpt in recipients {
        let reply = client.command(&format!("RCPT TO:<{rcpt}>\r\n")).await?;
        outcomes.push(match reply.code {
            250 | 251 => None,
            550 => Some(RcptOutcome::NoSuchUser(format!("RCPT: {}", reply.text()))),
            500..=599 => Some(RcptOutcome::Failed(format!("RCPT: {}", reply.text()))),
            _ => Some(RcptOutcome::Retry(format!("RCPT: {}", reply.text()))),
        });
    }
    if outcomes.iter().all(Option::is_some) {
        let _ = client.command("QUIT\r\n").await;
        return Ok(outcomes.into_iter().flatten().collect());
    }
    let go = client.command("DATA\r\n").await?;
    if go.code != 354 {
        let all = fail_all(&go, "DATA", recipients.len());
        return Ok(merge(outcomes, all));
    }
    // The transfer and the final reply together get ten steps' time (each write is bounded
    // too), so a peer that stops reading cannot hold the queue runner.
    let transfer = timeout.saturating_mul(10);
    let done = tokio::time::timeout(transfer, async {
        let wire = stuff(body);
        let conn = &mut client.conn;
        conn.write_all(&wire)
            .await
            .map_err(|e| format!("sending body: {e}"))?;
        conn.write_all(b".\r\n")
            .await
            .map_err(|e| format!("sending body: {e}"))?;
        conn.flush()
            .await
            .map_err(|e| format!("sending body: {e}"))?;
        client.read_reply(transfer).await
    })
    .await
    .map_err(|_| format!("sending body: no answer within {transfer:?}"))??;
    let all = if done.code == 250 {
        vec![RcptOutcome::Delivered; recipients.len()]
    } else {
        fail_all(&done, "end of DATA", recipients.len())
    };
    let _ = client.command("QUIT\r\n").await;
    Ok(merge(outcomes, all))
}

/// Per-recipient refusals win over the transaction's outcome.
fn merge(per_rcpt: Vec<Option<RcptOutcome>>, all: Vec<RcptOutcome>) -> Vec<RcptOutcome> {
    per_rcpt
        .into_iter()
        .zip(all)
        .map(|(own, all)| own.unwrap_or(all))
        .collect()
}

fn has_cap(reply: &Reply, cap: &str) -> bool {
    reply.lines.iter().skip(1).any(|l| {
        l.split_whitespace()
            .next()
            .is_some_and(|w| w.eq_ignore_ascii_case(cap))
    })
}
