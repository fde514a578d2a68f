//! The sans-IO POP3 command parser: one received line in, one typed [`Command`] (or a typed
//! [`ParseError`]) out. Also the SASL pieces (continuation lines, the PLAIN message) and the reply
//! helpers shared by the server session and the forwarding client.
//!
//! RFC 1939 (commands), RFC 2449 (CAPA, line lengths), RFC 5034 (AUTH), RFC 2595 (STLS), and our
//! peer-only `XCLIENT ADDR= PORT= HOP= SIG=` (see [`crate::xclient`]).

use std::fmt;
use std::net::IpAddr;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;

/// Longest command line read from a client, CRLF included (RFC 2449 caps responses at 512 octets;
/// we allow commands as long, which leaves room for an `AUTH PLAIN` initial response).
pub const MAX_COMMAND_LINE: usize = 512;
/// Longest single argument (RFC 2449: 40 → 255 octets).
pub const MAX_ARG_LEN: usize = 255;
/// Longest SASL continuation line (base64 of three 255-octet fields fits with room to spare).
pub const MAX_SASL_LINE: usize = 2048;
/// Longest `AUTH` initial response, base64 (the rest of a [`MAX_COMMAND_LINE`]).
pub const MAX_INITIAL_RESPONSE: usize = MAX_COMMAND_LINE - "AUTH PLAIN \r\n".len();

pub use ds_access::sasl::{PlainCredentials, Secret};

/// A message number as the client sent it: 1-based, so never zero.
pub type MsgNum = u32;

/// The peer-only `XCLIENT` command: the original client's address, the forwarding node and the
/// HMAC that proves the sender knows the cluster secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Xclient {
    /// The original client's IP address.
    pub addr: IpAddr,
    /// The original client's port.
    pub port: u16,
    /// The node id of the forwarding ("front") node.
    pub hop: String,
    /// Lower-case hex HMAC-SHA256, checked by [`crate::xclient::verify`].
    pub sig: String,
}

/// One POP3 command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// `USER name`.
    User(String),
    /// `PASS password` (the rest of the line, spaces included).
    Pass(Secret),
    /// `APOP name digest`: recognised, always refused (we keep no plaintext passwords).
    Apop,
    /// `STAT`.
    Stat,
    /// `LIST [n]`.
    List(Option<MsgNum>),
    /// `RETR n`.
    Retr(MsgNum),
    /// `DELE n`.
    Dele(MsgNum),
    /// `NOOP`.
    Noop,
    /// `RSET`.
    Rset,
    /// `QUIT`.
    Quit,
    /// `TOP n lines`.
    Top {
        /// The message.
        msg: MsgNum,
        /// Body lines to send after the header.
        lines: u32,
    },
    /// `UIDL [n]`.
    Uidl(Option<MsgNum>),
    /// `CAPA`.
    Capa,
    /// `AUTH` (list mechanisms) or `AUTH mechanism [initial-response]`.
    Auth {
        /// Upper-cased mechanism name; `None` for a bare `AUTH`.
        mechanism: Option<String>,
        /// The initial response, base64 as sent (`=` means empty); it holds the password.
        initial: Option<Secret>,
    },
    /// `STLS`.
    Stls,
    /// `XCLIENT ADDR=… PORT=… HOP=… SIG=…` (from peers only).
    Xclient(Xclient),
    /// `XDSRESET tag [NOUPDATE]` (from a front node only, tagged with its proof): UPDATE as for
    /// QUIT (none with `NOUPDATE`: the client went away without QUIT), then back to
    /// AUTHORIZATION with a fresh timestamp, for the front node's next login.
    XdshareReset {
        /// The front node's proof tag.
        tag: String,
        /// Commit the deletions (the client sent QUIT).
        update: bool,
    },
}

impl Command {
    /// The command keyword, for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Command::User(_) => "USER",
            Command::Pass(_) => "PASS",
            Command::Apop => "APOP",
            Command::Stat => "STAT",
            Command::List(_) => "LIST",
            Command::Retr(_) => "RETR",
            Command::Dele(_) => "DELE",
            Command::Noop => "NOOP",
            Command::Rset => "RSET",
            Command::Quit => "QUIT",
            Command::Top { .. } => "TOP",
            Command::Uidl(_) => "UIDL",
            Command::Capa => "CAPA",
            Command::Auth { .. } => "AUTH",
            Command::Stls => "STLS",
            Command::Xclient(_) => "XCLIENT",
            Command::XdshareReset { .. } => "XDSRESET",
        }
    }
}

/// Why a line is not a valid command.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// An empty line.
    #[error("empty command")]
    Empty,
    /// Bytes that are not UTF-8.
    #[error("command is not valid UTF-8")]
    NotUtf8,
    /// A control character (other than the line end) in the line.
    #[error("control character in command")]
    ControlCharacter,
    /// A keyword we do not know.
    #[error("unknown command")]
    UnknownCommand,
    /// A required argument is missing.
    #[error("missing argument: {0}")]
    MissingArgument(&'static str),
    /// More arguments than the command takes.
    #[error("too many arguments")]
    TooManyArguments,
    /// A message number that is not a decimal number in 1..=2^32-1 (or a line count in
    /// 0..=2^32-1).
    #[error("invalid number")]
    BadNumber,
    /// An argument longer than [`MAX_ARG_LEN`] (or [`MAX_INITIAL_RESPONSE`]).
    #[error("argument too long")]
    ArgumentTooLong,
    /// A malformed `XCLIENT`.
    #[error("invalid XCLIENT: {0}")]
    BadXclient(&'static str),
    /// Invalid base64 in a SASL response.
    #[error("invalid base64")]
    BadBase64,
    /// A SASL PLAIN message that is not `authzid NUL authcid NUL password`.
    #[error("invalid PLAIN message")]
    BadPlain,
}

/// Strip the line end (CRLF or bare LF).
fn trim_line_end(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

fn text_of(line: &[u8]) -> Result<&str, ParseError> {
    let line = trim_line_end(line);
    let text = std::str::from_utf8(line).map_err(|_| ParseError::NotUtf8)?;
    if text.chars().any(|c| c.is_control() && c != '\t') {
        return Err(ParseError::ControlCharacter);
    }
    Ok(text)
}

fn check_len(arg: &str, max: usize) -> Result<&str, ParseError> {
    if arg.len() > max {
        Err(ParseError::ArgumentTooLong)
    } else {
        Ok(arg)
    }
}

/// A message number: decimal digits only, 1..=u32::MAX.
fn msg_num(arg: &str) -> Result<MsgNum, ParseError> {
    match count(arg)? {
        0 => Err(ParseError::BadNumber),
        n => Ok(n),
    }
}

/// A count: decimal digits only, 0..=u32::MAX.
fn count(arg: &str) -> Result<u32, ParseError> {
    if arg.is_empty() || arg.len() > 10 || !arg.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ParseError::BadNumber);
    }
    arg.parse().map_err(|_| ParseError::BadNumber)
}

/// Parse one command line (its CRLF or LF included or not).
pub fn parse_command(line: &[u8]) -> Result<Command, ParseError> {
    let text = text_of(line)?;
    let trimmed = text.trim_start_matches(' ');
    if trimmed.trim().is_empty() {
        return Err(ParseError::Empty);
    }
    let (keyword, rest) = match trimmed.split_once(' ') {
        Some((k, r)) => (k, r),
        None => (trimmed, ""),
    };
    if keyword.len() > 8 {
        return Err(ParseError::UnknownCommand);
    }
    let keyword = keyword.to_ascii_uppercase();
    // PASS keeps the rest of the line as is: passwords may contain spaces.
    if keyword == "PASS" {
        if rest.is_empty() {
            return Err(ParseError::MissingArgument("password"));
        }
        return Ok(Command::Pass(Secret::new(check_len(rest, MAX_ARG_LEN)?)));
    }
    let args: Vec<&str> = rest.split(' ').filter(|a| !a.is_empty()).collect();
    for arg in &args {
        let max = if keyword == "AUTH" || keyword == "XCLIENT" || keyword == "XDSRESET" {
            MAX_INITIAL_RESPONSE
        } else {
            MAX_ARG_LEN
        };
        check_len(arg, max)?;
    }
    let none = |cmd: Command| {
        if args.is_empty() {
            Ok(cmd)
        } else {
            Err(ParseError::TooManyArguments)
        }
    };
    let optional_num = |args: &[&str]| match args {
        [] => Ok(None),
        [n] => msg_num(n).map(Some),
        _ => Err(ParseError::TooManyArguments),
    };
    let one_num = |args: &[&str]| match args {
        [] => Err(ParseError::MissingArgument("message number")),
        [n] => msg_num(n),
        _ => Err(ParseError::TooManyArguments),
    };
    match keyword.as_str() {
        "USER" => match args.as_slice() {
            [] => Err(ParseError::MissingArgument("name")),
            [name] => Ok(Command::User((*name).to_owned())),
            _ => Err(ParseError::TooManyArguments),
        },
        "APOP" => Ok(Command::Apop),
        "STAT" => none(Command::Stat),
        "NOOP" => none(Command::Noop),
        "RSET" => none(Command::Rset),
        "QUIT" => none(Command::Quit),
        "CAPA" => none(Command::Capa),
        "STLS" => none(Command::Stls),
        "LIST" => optional_num(&args).map(Command::List),
        "UIDL" => optional_num(&args).map(Command::Uidl),
        "RETR" => one_num(&args).map(Command::Retr),
        "DELE" => one_num(&args).map(Command::Dele),
        "TOP" => match args.as_slice() {
            [] => Err(ParseError::MissingArgument("message number")),
            [_] => Err(ParseError::MissingArgument("line count")),
            [n, lines] => Ok(Command::Top {
                msg: msg_num(n)?,
                lines: count(lines)?,
            }),
            _ => Err(ParseError::TooManyArguments),
        },
        "AUTH" => match args.as_slice() {
            [] => Ok(Command::Auth {
                mechanism: None,
                initial: None,
            }),
            [mech] => Ok(Command::Auth {
                mechanism: Some(check_len(mech, 20)?.to_ascii_uppercase()),
                initial: None,
            }),
            [mech, initial] => Ok(Command::Auth {
                mechanism: Some(check_len(mech, 20)?.to_ascii_uppercase()),
                initial: Some(Secret::new(*initial)),
            }),
            _ => Err(ParseError::TooManyArguments),
        },
        "XCLIENT" => parse_xclient(&args).map(Command::Xclient),
        "XDSRESET" => match args.as_slice() {
            [tag] => Ok(Command::XdshareReset {
                tag: (*tag).to_owned(),
                update: true,
            }),
            [tag, no] if no.eq_ignore_ascii_case("NOUPDATE") => Ok(Command::XdshareReset {
                tag: (*tag).to_owned(),
                update: false,
            }),
            [] => Err(ParseError::MissingArgument("tag")),
            _ => Err(ParseError::TooManyArguments),
        },
        _ => Err(ParseError::UnknownCommand),
    }
}

fn parse_xclient(args: &[&str]) -> Result<Xclient, ParseError> {
    let (mut addr, mut port, mut hop, mut sig) = (None, None, None, None);
    for arg in args {
        let (name, value) = arg
            .split_once('=')
            .ok_or(ParseError::BadXclient("attribute without '='"))?;
        let slot = match name.to_ascii_uppercase().as_str() {
            "ADDR" => &mut addr,
            "PORT" => &mut port,
            "HOP" => &mut hop,
            "SIG" => &mut sig,
            _ => return Err(ParseError::BadXclient("unknown attribute")),
        };
        if slot.replace(value).is_some() {
            return Err(ParseError::BadXclient("repeated attribute"));
        }
    }
    let addr = addr
        .ok_or(ParseError::BadXclient("ADDR missing"))?
        .parse::<IpAddr>()
        .map_err(|_| ParseError::BadXclient("bad ADDR"))?;
    let port = port.ok_or(ParseError::BadXclient("PORT missing"))?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ParseError::BadXclient("bad PORT"));
    }
    let port = port
        .parse::<u16>()
        .map_err(|_| ParseError::BadXclient("bad PORT"))?;
    let hop = hop.ok_or(ParseError::BadXclient("HOP missing"))?;
    if hop.is_empty() || hop.len() > 64 {
        return Err(ParseError::BadXclient("bad HOP"));
    }
    let sig = sig.ok_or(ParseError::BadXclient("SIG missing"))?;
    if sig.len() != 64 || !sig.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ParseError::BadXclient("bad SIG"));
    }
    Ok(Xclient {
        addr,
        port,
        hop: hop.to_owned(),
        sig: sig.to_ascii_lowercase(),
    })
}

/// A client's answer to a SASL challenge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SaslResponse {
    /// `*`: the client cancels the exchange.
    Cancel,
    /// The decoded response (it holds the password).
    Data(SecretBytes),
}

/// Bytes that must never be logged.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct SecretBytes(pub Vec<u8>);

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretBytes(<{} octets>)", self.0.len())
    }
}

/// Decode a base64 SASL response (`=` alone is the empty response).
pub fn decode_sasl(text: &str) -> Result<SecretBytes, ParseError> {
    let text = text.trim_end_matches([' ', '\t']);
    if text == "=" || text.is_empty() {
        return Ok(SecretBytes(Vec::new()));
    }
    BASE64
        .decode(text)
        .map(SecretBytes)
        .map_err(|_| ParseError::BadBase64)
}

/// Parse a SASL continuation line.
pub fn parse_sasl_response(line: &[u8]) -> Result<SaslResponse, ParseError> {
    let text = text_of(line)?;
    if text.trim() == "*" {
        return Ok(SaslResponse::Cancel);
    }
    decode_sasl(text.trim()).map(SaslResponse::Data)
}

/// Split a decoded PLAIN message into its fields ([`ds_access::sasl::decode_plain`]).
pub fn decode_plain(message: &[u8]) -> Result<PlainCredentials, ParseError> {
    ds_access::sasl::decode_plain(message).map_err(|e| match e {
        ds_access::sasl::PlainError::Malformed => ParseError::BadPlain,
        ds_access::sasl::PlainError::TooLong => ParseError::ArgumentTooLong,
    })
}

/// Encode a PLAIN message (no authzid) as base64, for the forwarding client.
pub fn encode_plain(authcid: &str, password: &str) -> String {
    let mut message = Vec::with_capacity(authcid.len() + password.len() + 2);
    message.push(0);
    message.extend_from_slice(authcid.as_bytes());
    message.push(0);
    message.extend_from_slice(password.as_bytes());
    BASE64.encode(message)
}

/// True for a `+OK` status line.
pub fn is_ok(line: &[u8]) -> bool {
    line.starts_with(b"+OK")
}

/// The RFC 1939 APOP-style timestamp (`<…@…>`) of a greeting line, if there is one.
pub fn greeting_timestamp(greeting: &[u8]) -> Option<&str> {
    ds_access::proof::nonce_in(greeting)
}

/// Append `body` to `out` as a POP3 multi-line payload: bare LF and bare CR become CRLF, lines
/// starting with `.` get another `.`, and the payload ends with CRLF (the terminating `.CRLF` is
/// not added). With `body_lines = Some(n)`, stop after the header, the empty line and `n` body
/// lines (TOP). [`MessageStuffer`] does the same chunk by chunk.
pub fn stuff_message(body: &[u8], body_lines: Option<u32>, out: &mut Vec<u8>) {
    let mut s = MessageStuffer::new(body_lines);
    s.push(body, out);
    s.finish(out);
}

/// [`stuff_message`] over a message read in chunks: any split of the input gives the same
/// output, and only the current chunk is held.
#[derive(Debug, Clone)]
pub struct MessageStuffer {
    /// At the start of a line piece (where a `.` is doubled).
    piece_start: bool,
    /// No octet of the current line seen yet.
    line_start: bool,
    /// A CR was seen: the next octet says whether it ends the line or splits it.
    pending_cr: bool,
    /// The current line has content (an octet or a CR inside it).
    line_content: bool,
    in_header: bool,
    lines_left: Option<u32>,
    done: bool,
}

impl MessageStuffer {
    /// A stuffer for RETR (`None`) or TOP with `body_lines`.
    pub fn new(body_lines: Option<u32>) -> Self {
        Self {
            piece_start: true,
            line_start: true,
            pending_cr: false,
            line_content: false,
            in_header: true,
            lines_left: body_lines,
            done: false,
        }
    }

    /// True once TOP has all its lines (the rest of the message is not needed).
    pub fn is_done(&self) -> bool {
        self.done
    }

    fn end_line(&mut self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"\r\n");
        if self.in_header {
            if !self.line_content {
                self.in_header = false;
            }
        } else if let Some(n) = self.lines_left.as_mut() {
            *n = n.saturating_sub(1);
        }
        self.line_start = true;
        self.piece_start = true;
        self.line_content = false;
    }

    /// Appends the stuffed form of `input` to `out`.
    ///
    /// The octets between line ends are copied as runs found with `memchr` (one search per line
    /// piece, not a branch per octet); only the CR and LF octets and the first octet of a line
    /// piece are looked at one by one.
    pub fn push(&mut self, input: &[u8], out: &mut Vec<u8>) {
        out.reserve(input.len() + input.len() / 64 + 2);
        let mut i = 0;
        while i < input.len() {
            if self.done {
                return;
            }
            if self.pending_cr {
                self.pending_cr = false;
                if input[i] == b'\n' {
                    i += 1;
                    self.end_line(out);
                    continue;
                }
                // A CR inside a line: a line end for the client too.
                out.extend_from_slice(b"\r\n");
                self.piece_start = true;
                self.line_content = true;
            } else if self.line_start {
                if !self.in_header && self.lines_left == Some(0) {
                    self.done = true;
                    return;
                }
                self.line_start = false;
            }
            // Inside a line: the run of ordinary octets up to the next CR or LF.
            let rest = &input[i..];
            let run = memchr::memchr2(b'\r', b'\n', rest).unwrap_or(rest.len());
            if run > 0 {
                if self.piece_start && rest[0] == b'.' {
                    out.push(b'.');
                }
                out.extend_from_slice(&rest[..run]);
                self.piece_start = false;
                self.line_content = true;
                i += run;
            }
            match input.get(i) {
                Some(b'\n') => {
                    i += 1;
                    self.end_line(out);
                }
                Some(_) => {
                    // A CR: the next octet says whether it ends the line.
                    i += 1;
                    self.pending_cr = true;
                }
                None => {}
            }
        }
    }

    /// Ends the payload: the last line gets its CRLF.
    pub fn finish(mut self, out: &mut Vec<u8>) {
        if self.done {
            return;
        }
        if self.pending_cr || !self.line_start {
            self.pending_cr = false;
            self.end_line(out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(s: &str) -> Secret {
        Secret::new(s)
    }

    #[test]
    fn command_table() {
        use Command::*;
        use ParseError::*;
        let long = "a".repeat(256);
        let cases: Vec<(String, Result<Command, ParseError>)> = vec![
            ("USER info\r\n".into(), Ok(User("info".into()))),
            (
                "user info%client2.com\r\n".into(),
                Ok(User("info%client2.com".into())),
            ),
            ("USER\r\n".into(), Err(MissingArgument("name"))),
            ("USER a b\r\n".into(), Err(TooManyArguments)),
            (format!("USER {long}\r\n"), Err(ArgumentTooLong)),
            (
                format!("USER {}\r\n", &long[..255]),
                Ok(User(long[..255].into())),
            ),
            ("PASS se cret \r\n".into(), Ok(Pass(secret("se cret ")))),
            ("PASS\r\n".into(), Err(MissingArgument("password"))),
            (format!("PASS {long}\r\n"), Err(ArgumentTooLong)),
            ("APOP info 0123456789abcdef\r\n".into(), Ok(Apop)),
            ("STAT\r\n".into(), Ok(Stat)),
            ("stat\n".into(), Ok(Stat)),
            ("STAT 1\r\n".into(), Err(TooManyArguments)),
            ("LIST\r\n".into(), Ok(List(None))),
            ("LIST 1\r\n".into(), Ok(List(Some(1)))),
            ("LIST 0\r\n".into(), Err(BadNumber)),
            ("LIST -1\r\n".into(), Err(BadNumber)),
            ("LIST +1\r\n".into(), Err(BadNumber)),
            ("LIST 4294967295\r\n".into(), Ok(List(Some(u32::MAX)))),
            ("LIST 4294967296\r\n".into(), Err(BadNumber)),
            ("LIST 99999999999999999999999\r\n".into(), Err(BadNumber)),
            ("LIST 1x\r\n".into(), Err(BadNumber)),
            ("LIST 1 2\r\n".into(), Err(TooManyArguments)),
            ("RETR 7\r\n".into(), Ok(Retr(7))),
            ("RETR\r\n".into(), Err(MissingArgument("message number"))),
            ("RETR 0\r\n".into(), Err(BadNumber)),
            ("RETR -3\r\n".into(), Err(BadNumber)),
            ("DELE 2\r\n".into(), Ok(Dele(2))),
            ("DELE 2 3\r\n".into(), Err(TooManyArguments)),
            ("NOOP\r\n".into(), Ok(Noop)),
            ("RSET\r\n".into(), Ok(Rset)),
            ("QUIT\r\n".into(), Ok(Quit)),
            ("  QUIT  \r\n".into(), Ok(Quit)),
            ("TOP 1 0\r\n".into(), Ok(Top { msg: 1, lines: 0 })),
            ("TOP 1 10\r\n".into(), Ok(Top { msg: 1, lines: 10 })),
            ("TOP 1\r\n".into(), Err(MissingArgument("line count"))),
            ("TOP 0 1\r\n".into(), Err(BadNumber)),
            ("TOP 1 -1\r\n".into(), Err(BadNumber)),
            ("TOP 1 4294967296\r\n".into(), Err(BadNumber)),
            ("UIDL\r\n".into(), Ok(Uidl(None))),
            ("UIDL 3\r\n".into(), Ok(Uidl(Some(3)))),
            ("CAPA\r\n".into(), Ok(Capa)),
            ("STLS\r\n".into(), Ok(Stls)),
            (
                "AUTH\r\n".into(),
                Ok(Auth {
                    mechanism: None,
                    initial: None,
                }),
            ),
            (
                "AUTH plain\r\n".into(),
                Ok(Auth {
                    mechanism: Some("PLAIN".into()),
                    initial: None,
                }),
            ),
            (
                "AUTH PLAIN AGluZm8Ac2VjcmV0\r\n".into(),
                Ok(Auth {
                    mechanism: Some("PLAIN".into()),
                    initial: Some(secret("AGluZm8Ac2VjcmV0")),
                }),
            ),
            ("AUTH PLAIN a b\r\n".into(), Err(TooManyArguments)),
            ("\r\n".into(), Err(Empty)),
            ("   \r\n".into(), Err(Empty)),
            ("HELO x\r\n".into(), Err(UnknownCommand)),
            ("XYZZYXYZZY\r\n".into(), Err(UnknownCommand)),
            ("STAT\0\r\n".into(), Err(ControlCharacter)),
            ("RETR 1\x1b\r\n".into(), Err(ControlCharacter)),
            (
                format!(
                    "XCLIENT ADDR=203.0.113.9 PORT=51234 HOP=a SIG={}\r\n",
                    "A".repeat(64)
                ),
                Ok(Xclient(super::Xclient {
                    addr: "203.0.113.9".parse().unwrap(),
                    port: 51234,
                    hop: "a".into(),
                    sig: "a".repeat(64),
                })),
            ),
            (
                format!("XCLIENT ADDR=::1 PORT=1 HOP=a SIG={}\r\n", "0".repeat(64)),
                Ok(Xclient(super::Xclient {
                    addr: "::1".parse().unwrap(),
                    port: 1,
                    hop: "a".into(),
                    sig: "0".repeat(64),
                })),
            ),
            (
                "XCLIENT ADDR=1.2.3.4 PORT=1 HOP=a\r\n".into(),
                Err(BadXclient("SIG missing")),
            ),
            (
                format!(
                    "XCLIENT ADDR=1.2.3.400 PORT=1 HOP=a SIG={}\r\n",
                    "0".repeat(64)
                ),
                Err(BadXclient("bad ADDR")),
            ),
            (
                format!(
                    "XCLIENT ADDR=1.2.3.4 PORT=65536 HOP=a SIG={}\r\n",
                    "0".repeat(64)
                ),
                Err(BadXclient("bad PORT")),
            ),
            (
                format!(
                    "XCLIENT ADDR=1.2.3.4 PORT=1 HOP=a SIG={}\r\n",
                    "0".repeat(63)
                ),
                Err(BadXclient("bad SIG")),
            ),
            (
                format!(
                    "XCLIENT ADDR=1.2.3.4 ADDR=1.2.3.4 PORT=1 HOP=a SIG={}\r\n",
                    "0".repeat(64)
                ),
                Err(BadXclient("repeated attribute")),
            ),
            (
                "XCLIENT NAME=x\r\n".into(),
                Err(BadXclient("unknown attribute")),
            ),
        ];
        for (line, want) in cases {
            assert_eq!(parse_command(line.as_bytes()), want, "line {line:?}");
        }
    }

    #[test]
    fn garbage_never_panics() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for len in 0..600 {
            let line: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    (seed >> 24) as u8
                })
                .collect();
            let _ = parse_command(&line);
            let _ = parse_sasl_response(&line);
            let _ = decode_plain(&line);
        }
        assert_eq!(parse_command(b"\xff\xfe\r\n"), Err(ParseError::NotUtf8));
    }

    #[test]
    fn secrets_are_not_debug_printed() {
        let cmd = parse_command(b"PASS hunter2\r\n").unwrap();
        assert!(!format!("{cmd:?}").contains("hunter2"));
        let plain = decode_plain(b"\0info\0hunter2").unwrap();
        assert!(!format!("{plain:?}").contains("hunter2"));
        let resp = parse_sasl_response(b"AGluZm8AaHVudGVyMg==\r\n").unwrap();
        assert!(!format!("{resp:?}").contains("hunter2"));
    }

    #[test]
    fn sasl_plain() {
        let encoded = encode_plain("info@company.com", "pass word");
        let SaslResponse::Data(bytes) =
            parse_sasl_response(format!("{encoded}\r\n").as_bytes()).unwrap()
        else {
            panic!("cancelled")
        };
        let creds = decode_plain(&bytes.0).unwrap();
        assert_eq!(creds.authzid, "");
        assert_eq!(creds.authcid, "info@company.com");
        assert_eq!(creds.password.expose(), "pass word");
        assert_eq!(parse_sasl_response(b"*\r\n"), Ok(SaslResponse::Cancel));
        assert_eq!(parse_sasl_response(b"!!!\r\n"), Err(ParseError::BadBase64));
        assert_eq!(decode_sasl("="), Ok(SecretBytes(vec![])));
        assert_eq!(decode_plain(b"info\0secret"), Err(ParseError::BadPlain));
        assert_eq!(decode_plain(b"\0\0secret"), Err(ParseError::BadPlain));
        assert_eq!(decode_plain(b"\0info\0"), Err(ParseError::BadPlain));
        assert_eq!(decode_plain(b"\0a\0b\0c"), Err(ParseError::BadPlain));
        let creds = decode_plain(b"admin\0info\0secret").unwrap();
        assert_eq!(creds.authzid, "admin");
    }

    #[test]
    fn greeting_timestamps() {
        assert_eq!(
            greeting_timestamp(b"+OK ready <1.2@host>\r\n"),
            Some("<1.2@host>")
        );
        assert_eq!(greeting_timestamp(b"+OK ready\r\n"), None);
        assert_eq!(greeting_timestamp(b"+OK <nohost>\r\n"), None);
    }

    fn stuffed(body: &[u8], lines: Option<u32>) -> Vec<u8> {
        let mut out = Vec::new();
        stuff_message(body, lines, &mut out);
        out
    }

    #[test]
    fn byte_stuffing_and_line_ends() {
        assert_eq!(
            stuffed(b"a\r\n.b\r\n..c\r\n", None),
            b"a\r\n..b\r\n...c\r\n"
        );
        assert_eq!(stuffed(b"a\n.\nb", None), b"a\r\n..\r\nb\r\n");
        assert_eq!(stuffed(b"a\rb\r\n", None), b"a\r\nb\r\n");
        assert_eq!(stuffed(b"a\r.b\r\n", None), b"a\r\n..b\r\n");
        assert_eq!(stuffed(b"", None), b"");
        assert_eq!(stuffed(b".", None), b"..\r\n");
        assert_eq!(stuffed(b"a\r", None), b"a\r\n");
        assert_eq!(stuffed(b"\r\r\n.x", None), b"\r\n\r\n..x\r\n");
    }

    #[test]
    fn chunked_stuffing_equals_whole() {
        let msg: &[u8] = b"Subject: x\r\nA: b\n\r\nl1\r.l2\n..l3\r\r\nl4\r";
        for lines in [None, Some(0), Some(1), Some(2), Some(3)] {
            let whole = stuffed(msg, lines);
            for cut in 0..msg.len() {
                let mut out = Vec::new();
                let mut s = MessageStuffer::new(lines);
                s.push(&msg[..cut], &mut out);
                s.push(&msg[cut..], &mut out);
                s.finish(&mut out);
                assert_eq!(out, whole, "lines {lines:?} cut {cut}");
            }
            // Without TOP the payload's length, less the stuffed dots, is the CRLF size.
            if lines.is_none() {
                let dots = 2;
                assert_eq!(whole.len() as u64 - dots, ds_store::body::LineEnds::of(msg));
            }
        }
    }

    /// The stuffer as first written, one octet at a time: the reference for the fast one.
    fn stuffed_octetwise(body: &[u8], body_lines: Option<u32>) -> Vec<u8> {
        #[derive(Default)]
        struct St {
            piece_start: bool,
            line_start: bool,
            pending_cr: bool,
            line_content: bool,
            in_header: bool,
            lines_left: Option<u32>,
        }
        fn end_line(st: &mut St, out: &mut Vec<u8>) {
            out.extend_from_slice(b"\r\n");
            if st.in_header {
                if !st.line_content {
                    st.in_header = false;
                }
            } else if let Some(n) = st.lines_left.as_mut() {
                *n = n.saturating_sub(1);
            }
            st.line_start = true;
            st.piece_start = true;
            st.line_content = false;
        }
        let mut st = St {
            piece_start: true,
            line_start: true,
            in_header: true,
            lines_left: body_lines,
            ..St::default()
        };
        let mut out = Vec::new();
        for &b in body {
            if st.pending_cr {
                st.pending_cr = false;
                if b == b'\n' {
                    end_line(&mut st, &mut out);
                    continue;
                }
                out.extend_from_slice(b"\r\n");
                st.piece_start = true;
                st.line_content = true;
            } else if st.line_start {
                if !st.in_header && st.lines_left == Some(0) {
                    return out;
                }
                st.line_start = false;
            }
            match b {
                b'\n' => end_line(&mut st, &mut out),
                b'\r' => st.pending_cr = true,
                _ => {
                    if st.piece_start && b == b'.' {
                        out.push(b'.');
                    }
                    out.push(b);
                    st.piece_start = false;
                    st.line_content = true;
                }
            }
        }
        if st.pending_cr || !st.line_start {
            end_line(&mut st, &mut out);
        }
        out
    }

    #[test]
    fn fast_stuffing_equals_octetwise() {
        // A small deterministic generator: messages over an alphabet rich in line ends and dots,
        // cut at random points.
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..3000 {
            let len = (next() % 60) as usize;
            let msg: Vec<u8> = (0..len)
                .map(|_| [b'a', b'b', b'.', b'\r', b'\n', b':'][(next() % 6) as usize])
                .collect();
            for lines in [None, Some(0), Some(1), Some(3)] {
                let want = stuffed_octetwise(&msg, lines);
                let mut out = Vec::new();
                let mut s = MessageStuffer::new(lines);
                let (a, b) = {
                    let x = (next() as usize) % (len + 1);
                    let y = (next() as usize) % (len + 1);
                    (x.min(y), x.max(y))
                };
                for part in [&msg[..a], &msg[a..b], &msg[b..]] {
                    s.push(part, &mut out);
                }
                s.finish(&mut out);
                assert_eq!(
                    out,
                    want,
                    "{:?} lines {lines:?} cuts {a} {b}",
                    String::from_utf8_lossy(&msg)
                );
            }
        }
    }

    #[test]
    fn top_lines() {
        let msg = b"Subject: x\r\nFrom: y\r\n\r\nl1\r\n.l2\r\nl3\r\n";
        assert_eq!(stuffed(msg, Some(0)), b"Subject: x\r\nFrom: y\r\n\r\n");
        assert_eq!(
            stuffed(msg, Some(2)),
            b"Subject: x\r\nFrom: y\r\n\r\nl1\r\n..l2\r\n"
        );
        assert_eq!(stuffed(msg, Some(100)), stuffed(msg, None));
        // No empty line: everything is header.
        assert_eq!(stuffed(b"A: b\nC: d", Some(0)), b"A: b\r\nC: d\r\n");
    }
}
