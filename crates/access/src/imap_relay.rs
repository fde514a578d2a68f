//! A forwarded IMAP session, front side, after the login: the splice of [`crate::forward`], with
//! the owner link kept for another login when the client logs out.
//!
//! Opening a link to an owner costs both nodes a TCP and a TLS handshake and the owner a new
//! session; a client that logs in for every check (phones, webmail, `fetchmail`) pays that on
//! every visit. So while it copies, the relay follows the framing of the client's stream
//! ([`Framing`]: lines, and literals skipped by their length). When the client's next command is a bare
//! `tag LOGOUT` the relay does not pass it on: it sends the owner `UNAUTHENTICATE` (RFC 8437's
//! command, accepted by the owner only from a proven peer and only with the tag
//! [`proof::end_tag`]), passes on whatever the owner still had to say for the commands
//! before (up to the owner's answer, found by its tag: [`crate::forward::end_on_owner`]; the
//! owner's output is copied as it is, never parsed), answers the client's LOGOUT itself (`* BYE`, tagged `OK`), and gives the link back
//! to the [`crate::WarmPool`] with the fresh nonce the owner answered with: the next forwarded
//! login on it is one round trip and no handshake.
//!
//! A client that closes its side between two commands without LOGOUT (phones do) ends the same
//! way, without the answer to a LOGOUT.
//!
//! The relay gives up the reuse (and lets LOGOUT through) whenever it cannot be sure of the
//! framing: after a synchronising literal from the client (the owner may refuse it, and the
//! client then never sends its octets), during IDLE, and for a LOGOUT line split across reads.

use std::time::Duration;

use ds_net::{Gate, LineConn, MailStream, Shutdown};

use crate::Result;
use crate::forward::{Relayed, end_on_owner, relay_ending};
use crate::imap_client::{ReadyConn, Reuse, literal_announcement};
use crate::owner::OwnerConn;
use crate::proof::{self, ProofKey};

/// How many octets of a line's beginning [`Framing`] keeps (a tag is at most 64).
const HEAD: usize = 96;
/// How many octets of a line's end [`Framing`] keeps, for a literal announcement.
const TAIL: usize = 24;

/// Where an IMAP byte stream is: in a line (of which the head and tail are kept) or in a
/// literal (octets left). Fed the stream in pieces, in order.
#[derive(Debug, Default)]
pub struct Framing {
    literal_left: u64,
    /// Octets of the current line seen so far (0: at a line start).
    line_len: usize,
    /// Where the current line started in the piece being fed (`None`: in an earlier piece).
    line_start: Option<usize>,
    head: Vec<u8>,
    tail: Vec<u8>,
}

/// A line [`Framing`] has seen whole.
#[derive(Debug)]
pub struct Line<'a> {
    /// Its first octets (at most 96), CRLF included if the line is that short.
    pub head: &'a [u8],
    /// Its length, CRLF included.
    pub len: usize,
    /// Its offset in the piece that completed it, if it began in that piece too.
    pub start: Option<usize>,
    /// The literal it announces: `(octets, synchronising)`.
    pub literal: Option<(u64, bool)>,
}

impl Line<'_> {
    /// The whole line, if [`Line::head`] holds it all.
    pub fn whole(&self) -> Option<&[u8]> {
        (self.len == self.head.len()).then_some(self.head)
    }
}

impl Framing {
    /// Follow `data`, calling `on_line` for each line completed in it; `on_line` returning
    /// true stops there: `Some(the line's start)` is returned (only for a line that began in
    /// `data`; for one that did not, `true` is ignored), and the framing stays before that line.
    pub fn feed(
        &mut self,
        data: &[u8],
        mut on_line: impl FnMut(&Line<'_>) -> bool,
    ) -> Option<usize> {
        let mut i = 0;
        self.line_start = (self.line_len == 0 && self.literal_left == 0).then_some(0);
        while i < data.len() {
            if self.literal_left > 0 {
                let n =
                    (data.len() - i).min(usize::try_from(self.literal_left).unwrap_or(usize::MAX));
                i += n;
                self.literal_left -= n as u64;
                continue;
            }
            if self.line_len == 0 {
                self.line_start = Some(i);
            }
            let rest = &data[i..];
            let (piece, complete) = match memchr::memchr(b'\n', rest) {
                Some(p) => (&rest[..=p], true),
                None => (rest, false),
            };
            self.push(piece);
            if !complete {
                return None;
            }
            let line = Line {
                head: &self.head,
                len: self.line_len,
                start: self.line_start,
                literal: literal_announcement(&self.tail),
            };
            if let (true, Some(start)) = (on_line(&line), line.start) {
                self.head.clear();
                self.tail.clear();
                self.line_len = 0;
                return Some(start);
            }
            self.literal_left = line.literal.map_or(0, |(n, _)| n);
            self.head.clear();
            self.tail.clear();
            self.line_len = 0;
            i += piece.len();
        }
        None
    }

    fn push(&mut self, piece: &[u8]) {
        if self.head.len() < HEAD {
            let n = piece.len().min(HEAD - self.head.len());
            self.head.extend_from_slice(&piece[..n]);
        }
        if piece.len() >= TAIL {
            self.tail.clear();
            self.tail.extend_from_slice(&piece[piece.len() - TAIL..]);
        } else {
            self.tail.extend_from_slice(piece);
            let over = self.tail.len().saturating_sub(TAIL);
            self.tail.drain(..over);
        }
        self.line_len += piece.len();
    }

    /// At the start of a line (not inside one, nor in a literal).
    pub fn at_line_start(&self) -> bool {
        self.literal_left == 0 && self.line_len == 0
    }
}

fn without_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// `tag NAME` CRLF (or LF), nothing more: `(tag, NAME)`.
fn bare_command(line: &[u8]) -> Option<(&[u8], &[u8])> {
    let line = without_eol(line.strip_suffix(b"\n")?);
    let mut words = line.split(|&b| b == b' ');
    let (tag, name) = (words.next()?, words.next()?);
    (words.next().is_none() && !tag.is_empty()).then_some((tag, name))
}

/// The client's side: its framing, IDLE, and the LOGOUT the relay answers itself.
#[derive(Debug, Default)]
struct ClientGate {
    framing: Framing,
    /// The line being read continues a command after a literal.
    continued: bool,
    idling: bool,
    /// The framing cannot be trusted any more (a synchronising literal): nothing is held.
    off: bool,
    logout_tag: Option<String>,
    /// The client closed its side between two commands.
    closed: bool,
}

impl Gate for ClientGate {
    fn pass(&mut self, data: &[u8]) -> Option<usize> {
        if self.off {
            return None;
        }
        let Self {
            framing,
            continued,
            idling,
            off,
            logout_tag,
            closed: _,
        } = self;
        framing.feed(data, |line| {
            let command_start = !*continued;
            *continued = line.literal.is_some();
            if matches!(line.literal, Some((_, true))) {
                *off = true;
            }
            if *off || !command_start {
                return false;
            }
            let Some(whole) = line.whole() else {
                return false;
            };
            if *idling {
                *idling = !without_eol(whole).eq_ignore_ascii_case(b"DONE");
                return false;
            }
            let Some((tag, name)) = bare_command(whole) else {
                return false;
            };
            if name.eq_ignore_ascii_case(b"IDLE") {
                *idling = true;
                return false;
            }
            if name.eq_ignore_ascii_case(b"LOGOUT") && line.start.is_some() {
                *logout_tag = Some(String::from_utf8_lossy(tag).into_owned());
                return true;
            }
            false
        })
    }

    fn at_eof(&mut self) -> bool {
        // Between two commands the owner's session can be ended as for a LOGOUT (nothing is
        // expunged either way); the client only gets what it had asked for before.
        self.closed = !self.off && !self.idling && !self.continued && self.framing.at_line_start();
        self.closed
    }
}

/// Relay a forwarded session (the client's login answer is queued on `client`): as
/// [`crate::splice_session`] without `reuse`; with it, a client LOGOUT keeps the owner link (see
/// the module's text). `reply_timeout` bounds each wait for the owner after the LOGOUT.
pub async fn relay_session(
    client: LineConn<MailStream>,
    owner: OwnerConn,
    reuse: Option<Reuse>,
    idle_timeout: Duration,
    reply_timeout: Duration,
    shutdown: &Shutdown,
) -> Result<Relayed> {
    let Some(reuse) = reuse else {
        return Ok(crate::splice_session(client, owner, idle_timeout, shutdown)
            .await?
            .into());
    };
    let Reuse { nonce, key, loan } = reuse;
    let mut up = ClientGate::default();
    relay_ending(
        client,
        owner,
        &mut up,
        loan,
        idle_timeout,
        shutdown,
        async |up: &mut ClientGate, client: &mut MailStream, owner| {
            let ready = tokio::select! {
                ready = unauthenticate(client, owner, &nonce, &key, reply_timeout) => ready,
                () = shutdown.wait() => None,
            };
            // A LOGOUT is answered; a client that closed its side gets nothing more.
            let bye = match up.logout_tag.take() {
                Some(tag) => format!("* BYE Logging out\r\n{tag} OK LOGOUT completed\r\n"),
                None => String::new(),
            };
            (bye.into_bytes(), ready)
        },
    )
    .await
}

/// Send the owner `UNAUTHENTICATE`, pass on to the client what the owner still sends before
/// its answer, and return the link made ready for another login (`None`: the owner refused,
/// End the owner's session with `UNAUTHENTICATE` ([`end_on_owner`]) and return the link made
/// ready for another login (`None`: the owner refused, closed, or took too long; the link is
/// dropped).
async fn unauthenticate(
    client: &mut MailStream,
    mut owner: OwnerConn,
    nonce: &str,
    key: &ProofKey,
    timeout: Duration,
) -> Option<ReadyConn> {
    let tag = proof::end_tag(key, nonce)?;
    let command = format!("{tag} UNAUTHENTICATE\r\n");
    let ours = format!("{tag} ");
    let answer = end_on_owner(
        client,
        &mut owner,
        command.as_bytes(),
        &[ours.as_bytes()],
        timeout,
    )
    .await?;
    let rest = &answer[ours.len()..];
    let Some(nonce) = rest
        .starts_with(b"OK ")
        .then(|| proof::nonce_in(rest))
        .flatten()
    else {
        tracing::debug!(answer = %String::from_utf8_lossy(&answer).trim_end(), "owner link not kept");
        return None;
    };
    Some(ReadyConn::reused(owner, nonce.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(framing: &mut Framing, data: &[u8]) -> Vec<(Vec<u8>, Option<usize>)> {
        let mut seen = Vec::new();
        framing.feed(data, |l| {
            seen.push((l.head.to_vec(), l.start));
            false
        });
        seen
    }

    #[test]
    fn literals_are_skipped_whole_in_any_pieces() {
        let mut f = Framing::default();
        let stream = b"* 1 FETCH (BODY[] {12}\r\na LOGOUT\r\n\r\n)\r\nb OK done\r\n";
        let mut seen = Vec::new();
        for piece in stream.chunks(5) {
            seen.extend(lines(&mut f, piece).into_iter().map(|(h, _)| h));
        }
        assert_eq!(
            seen,
            vec![
                b"* 1 FETCH (BODY[] {12}\r\n".to_vec(),
                b")\r\n".to_vec(),
                b"b OK done\r\n".to_vec()
            ],
            "the literal's lines are not lines"
        );
        assert!(f.at_line_start());
        let seen = lines(&mut f, b"x APPEND INBOX {3+}\r\nabc\r\n");
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[1].0, b"\r\n");
    }

    #[test]
    fn the_client_gate_stops_at_a_bare_logout_and_nowhere_else() {
        let mut g = ClientGate::default();
        assert_eq!(g.pass(b"a SELECT INBOX\r\nb FETCH 1 BODY[]\r\n"), None);
        // A LOGOUT inside a non-synchronising literal is message text.
        assert_eq!(
            g.pass(b"c APPEND INBOX {12+}\r\nd LOGOUT\r\n\r\n\r\n"),
            None
        );
        assert_eq!(g.pass(b"e NOOP\r\nf logout\r\ng NOOP\r\n"), Some(8));
        assert_eq!(g.logout_tag.as_deref(), Some("f"));

        // IDLE: nothing is a command until DONE.
        let mut g = ClientGate::default();
        assert_eq!(g.pass(b"a IDLE\r\n"), None);
        assert_eq!(g.pass(b"b LOGOUT\r\n"), None);
        assert_eq!(g.pass(b"DONE\r\nc LOGOUT\r\n"), Some(6));

        // After a synchronising literal the framing is not trusted: LOGOUT goes through.
        let mut g = ClientGate::default();
        assert_eq!(g.pass(b"a APPEND INBOX {3}\r\n"), None);
        assert_eq!(g.pass(b"abc\r\nb LOGOUT\r\n"), None);

        // A LOGOUT line split across reads goes through too.
        let mut g = ClientGate::default();
        assert_eq!(g.pass(b"a LOG"), None);
        assert_eq!(g.pass(b"OUT\r\n"), None);
        // LOGOUT with an argument is not the bare command.
        let mut g = ClientGate::default();
        assert_eq!(g.pass(b"a LOGOUT now\r\n"), None);
    }
}
