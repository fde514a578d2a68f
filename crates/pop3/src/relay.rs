//! A forwarded POP3 session, front side, after the login: the splice of
//! [`ds_access::splice_session`], with the owner link kept for another login when the client
//! quits. A phone or `fetchmail` that checks every few minutes otherwise costs both nodes a TCP
//! and a TLS handshake, and the owner a new session, on every check.
//!
//! While it copies, the relay watches the client's command lines. When the client sends `QUIT`
//! the relay does not pass it on: it sends the owner `XDSRESET tag` (accepted only from the
//! front node of a proven session, with the tag [`ds_access::proof::end_tag`] over the
//! connection's timestamp), passes on what the owner still sends for the commands before, reads
//! the owner's `+OK tag left timestamp` (the UPDATE is done, the maildrop released) and answers
//! the client's QUIT itself with the owner's outcome. The link then goes back to the warm pool
//! with its fresh timestamp. A client that closes its side between two commands without QUIT
//! ends the same way with `XDSRESET tag NOUPDATE` (no UPDATE, as RFC 1939 wants) and no answer.
//! The owner's answer is found by its tag, which neither the client
//! nor a message can make: no multi-line answer needs to be parsed.

use std::time::Duration;

use ds_access::proof;
use ds_net::{Gate, LineConn, MailStream, Shutdown};

use crate::Result;
use crate::forward::{ReadyConn, Reuse};
use ds_access::forward::{Relayed, end_on_owner, relay_ending};

/// Watches the client's command lines for a `QUIT` (a whole line in one read).
#[derive(Debug, Default)]
struct QuitGate {
    /// The next octet starts a line.
    at_line_start: bool,
    /// The client closed its side between two commands, without QUIT.
    closed: bool,
}

impl Gate for QuitGate {
    fn pass(&mut self, data: &[u8]) -> Option<usize> {
        let mut i = 0;
        while i < data.len() {
            let end = memchr::memchr(b'\n', &data[i..]).map(|p| i + p + 1);
            if self.at_line_start
                && let Some(end) = end
                && data[i..end].trim_ascii_end().eq_ignore_ascii_case(b"QUIT")
            {
                return Some(i);
            }
            match end {
                Some(end) => {
                    self.at_line_start = true;
                    i = end;
                }
                None => {
                    self.at_line_start = false;
                    break;
                }
            }
        }
        None
    }
    fn at_eof(&mut self) -> bool {
        // Between two commands the session can be ended without UPDATE, as a client that goes
        // away without QUIT must be.
        self.closed = self.at_line_start;
        self.closed
    }
}

/// Relay a forwarded session (the login's `+OK` is queued on `client`): as
/// [`ds_access::splice_session`] without `reuse`; with it, a client QUIT keeps the owner link
/// (see the module's text). `reply_timeout` bounds each wait for the owner after the QUIT.
pub async fn relay_session(
    client: LineConn<MailStream>,
    owner: LineConn<MailStream>,
    reuse: Option<(Reuse, &ds_access::ProofKey)>,
    idle_timeout: Duration,
    reply_timeout: Duration,
    shutdown: &Shutdown,
) -> Result<Relayed> {
    let Some((reuse, key)) = reuse else {
        return Ok(
            ds_access::splice_session(client, owner, idle_timeout, shutdown)
                .await?
                .into(),
        );
    };
    let Reuse { timestamp, loan } = reuse;
    let mut up = QuitGate {
        at_line_start: true,
        closed: false,
    };
    let end = async |up: &mut QuitGate, client: &mut MailStream, owner| {
        let ended = tokio::select! {
            ended = reset(client, owner, &timestamp, key, !up.closed, reply_timeout) => ended,
            () = shutdown.wait() => None,
        };
        let (answer, ready) = match ended {
            // A client that went away without QUIT gets nothing more.
            Some((_, ready)) if up.closed => (String::new(), Some(ready)),
            None if up.closed => (String::new(), None),
            Some((left, ready)) => (
                format!("+OK POP3 server signing off ({left} messages left)\r\n"),
                Some(ready),
            ),
            None => (
                "-ERR [SYS/TEMP] Some deleted messages may not have been removed\r\n".to_owned(),
                None,
            ),
        };
        (answer.into_bytes(), ready)
    };
    let relayed = relay_ending(client, owner, &mut up, loan, idle_timeout, shutdown, end).await?;
    Ok(relayed)
}

/// Send the owner `XDSRESET` (`NOUPDATE` unless `update`), pass on to the client what the owner still sends before its
/// answer, and return the messages left and the link made ready for another login (`None`: the
/// owner refused, failed the UPDATE, closed, or took too long; the link is dropped).
async fn reset(
    client: &mut MailStream,
    mut owner: LineConn<MailStream>,
    timestamp: &str,
    key: &ds_access::ProofKey,
    update: bool,
    timeout: Duration,
) -> Option<(u64, ReadyConn)> {
    let tag = proof::end_tag(key, timestamp)?;
    let command = if update {
        format!("XDSRESET {tag}\r\n")
    } else {
        format!("XDSRESET {tag} NOUPDATE\r\n")
    };
    let (ok, err) = (format!("+OK {tag} "), format!("-ERR {tag} "));
    let answers = [ok.as_bytes(), err.as_bytes()];
    let answer = end_on_owner(client, &mut owner, command.as_bytes(), &answers, timeout).await?;
    let Some(rest) = answer.strip_prefix(ok.as_bytes()) else {
        tracing::info!(answer = %String::from_utf8_lossy(&answer).trim_end(), "the owner's UPDATE failed; link not kept");
        return None;
    };
    let text = std::str::from_utf8(rest).ok()?;
    let left = text.split_whitespace().next()?.parse().ok()?;
    let timestamp = proof::nonce_in(rest)?.to_owned();
    Some((left, ReadyConn::reused(owner, timestamp)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gate_stops_at_a_whole_quit_line() {
        let mut g = QuitGate {
            at_line_start: true,
            closed: false,
        };
        assert_eq!(g.pass(b"STAT\r\nRETR 1\r\n"), None);
        assert_eq!(g.pass(b"NOOP\r\nquit \r\nSTAT\r\n"), Some(6));
        // Split across reads, or not at a line start: passed on.
        let mut g = QuitGate {
            at_line_start: true,
            closed: false,
        };
        assert_eq!(g.pass(b"QU"), None);
        assert_eq!(g.pass(b"IT\r\n"), None);
        assert_eq!(g.pass(b"QUIT now\r\nQUIT\r\n"), Some(10));
    }
}
