//! ENVELOPE (RFC 3501 §7.4.2): header values as sent, and RFC 5322 address lists.
//!
//! Strings are the raw, unfolded header values (encoded words are not decoded, RFC 3501 says so);
//! an absent field is NIL; Sender and Reply-To default to From. Addresses are split into
//! `(name adl mailbox host)`; a group is `(NIL NIL name NIL)` … `(NIL NIL NIL NIL)`. A missing local
//! part or domain becomes `MISSING_MAILBOX` / `MISSING_DOMAIN` (as Dovecot does), so a
//! plain address can never be mistaken for a group marker.

use imap_types::core::NString;
use imap_types::envelope::{Address, Envelope};

use crate::mime::{self, Entity, trim, unfold};
use crate::{istring, nstring};

/// The ENVELOPE of a message.
pub fn envelope(msg: &[u8]) -> Envelope<'static> {
    let root = mime::parse(msg);
    envelope_of(msg, &root)
}

pub(crate) fn envelope_of(msg: &[u8], entity: &Entity) -> Envelope<'static> {
    let text = |name: &str| entity.field(msg, name).map(|v| trim(&unfold(v)).to_vec());
    let addresses = |name: &str| {
        entity
            .field(msg, name)
            .map(|v| parse_addresses(&unfold(v)))
            .unwrap_or_default()
    };
    let from = addresses("from");
    let or_from = |list: Vec<Address<'static>>| if list.is_empty() { from.clone() } else { list };
    Envelope {
        date: nstring(text("date").as_deref()),
        subject: nstring(text("subject").as_deref()),
        sender: or_from(addresses("sender")),
        reply_to: or_from(addresses("reply-to")),
        to: addresses("to"),
        cc: addresses("cc"),
        bcc: addresses("bcc"),
        in_reply_to: nstring(text("in-reply-to").as_deref()),
        message_id: nstring(text("message-id").as_deref()),
        from,
    }
}

#[derive(Debug, PartialEq)]
enum Token {
    /// An atom (dots included) or a quoted string, unquoted; `space` = whitespace before it.
    Word {
        text: Vec<u8>,
        space: bool,
    },
    /// A domain literal, brackets included.
    Literal(Vec<u8>),
    Comment(Vec<u8>),
    Special(u8),
}

fn tokenize(v: &[u8]) -> Vec<Token> {
    let mut tokens = Vec::new();
    let mut i = 0;
    let mut space = false;
    while i < v.len() {
        let b = v[i];
        match b {
            b' ' | b'\t' => {
                space = true;
                i += 1;
                continue;
            }
            b'(' => {
                let mut depth = 0usize;
                let mut text = Vec::new();
                while i < v.len() {
                    let c = v[i];
                    i += 1;
                    match c {
                        b'\\' if i < v.len() => {
                            text.push(v[i]);
                            i += 1;
                            continue;
                        }
                        b'(' => {
                            depth += 1;
                            if depth == 1 {
                                continue;
                            }
                        }
                        b')' => {
                            depth -= 1;
                            if depth == 0 {
                                break;
                            }
                        }
                        _ => {}
                    }
                    text.push(c);
                }
                tokens.push(Token::Comment(text));
                space = true;
                continue;
            }
            b'"' => {
                i += 1;
                let mut text = Vec::new();
                while i < v.len() {
                    let c = v[i];
                    i += 1;
                    match c {
                        b'"' => break,
                        b'\\' if i < v.len() => {
                            text.push(v[i]);
                            i += 1;
                        }
                        _ => text.push(c),
                    }
                }
                tokens.push(Token::Word { text, space });
            }
            b'[' => {
                let end = v[i..]
                    .iter()
                    .position(|&c| c == b']')
                    .map_or(v.len(), |p| i + p + 1);
                tokens.push(Token::Literal(v[i..end].to_vec()));
                i = end;
            }
            b'<' | b'>' | b'@' | b',' | b':' | b';' => {
                tokens.push(Token::Special(b));
                i += 1;
            }
            b')' => i += 1,
            _ => {
                let start = i;
                while i < v.len() && !b" \t()\"[<>@,:;".contains(&v[i]) {
                    i += 1;
                }
                tokens.push(Token::Word {
                    text: v[start..i].to_vec(),
                    space,
                });
            }
        }
        space = false;
    }
    tokens
}

/// Words joined as a display name: one space where the source had whitespace.
fn phrase(tokens: &[&Token]) -> Vec<u8> {
    let mut out = Vec::new();
    for t in tokens {
        match t {
            Token::Word { text, space } => {
                if *space && !out.is_empty() {
                    out.push(b' ');
                }
                out.extend_from_slice(text);
            }
            // An unquoted `@` or `:` in a display name (`a@b.c <a@b.c>`) is kept as written.
            Token::Special(c) => out.push(*c),
            Token::Literal(text) => out.extend_from_slice(text),
            Token::Comment(_) => {}
        }
    }
    out
}

/// Words and literals glued together (local parts, domains, routes).
fn glue(tokens: &[&Token]) -> Vec<u8> {
    let mut out = Vec::new();
    for t in tokens {
        match t {
            Token::Word { text, .. } | Token::Literal(text) => out.extend_from_slice(text),
            Token::Special(c) => out.push(*c),
            Token::Comment(_) => {}
        }
    }
    out
}

fn address(
    name: Option<Vec<u8>>,
    adl: Option<Vec<u8>>,
    mailbox: Vec<u8>,
    host: Vec<u8>,
) -> Address<'static> {
    let mailbox = if mailbox.is_empty() {
        b"MISSING_MAILBOX".to_vec()
    } else {
        mailbox
    };
    let host = if host.is_empty() {
        b"MISSING_DOMAIN".to_vec()
    } else {
        host
    };
    Address {
        name: nstring(name.filter(|n| !n.is_empty()).as_deref()),
        adl: nstring(adl.filter(|a| !a.is_empty()).as_deref()),
        mailbox: NString(Some(istring(&mailbox))),
        host: NString(Some(istring(&host))),
    }
}

/// An addr-spec `local@domain` (no angle brackets); the last comment serves as its name.
fn addr_spec(tokens: &[&Token]) -> Option<Address<'static>> {
    if !tokens.iter().any(|t| {
        matches!(
            t,
            Token::Word { .. } | Token::Literal(_) | Token::Special(b'@')
        )
    }) {
        return None;
    }
    let name = tokens.iter().rev().find_map(|t| match t {
        Token::Comment(c) => Some(trim(c).to_vec()),
        _ => None,
    });
    let at = tokens
        .iter()
        .rposition(|t| matches!(t, Token::Special(b'@')));
    let (local, domain) = match at {
        Some(at) => (glue(&tokens[..at]), glue(&tokens[at + 1..])),
        None => (glue(tokens), Vec::new()),
    };
    Some(address(name, None, local, domain))
}

/// The inside of `<…>`: an optional route `@a,@b:` then an addr-spec.
fn angle_addr(name: Vec<u8>, inner: &[&Token], comment: Option<Vec<u8>>) -> Address<'static> {
    let (adl, spec) = match inner.iter().position(|t| matches!(t, Token::Special(b':'))) {
        Some(colon) if matches!(inner.first(), Some(Token::Special(b'@'))) => {
            (Some(glue(&inner[..colon])), &inner[colon + 1..])
        }
        _ => (None, inner),
    };
    let at = spec.iter().rposition(|t| matches!(t, Token::Special(b'@')));
    let (local, domain) = match at {
        Some(at) => (glue(&spec[..at]), glue(&spec[at + 1..])),
        None => (glue(spec), Vec::new()),
    };
    let name = if name.is_empty() { comment } else { Some(name) };
    address(name, adl, local, domain)
}

/// Parses an (unfolded) address-list header value, groups included; lenient.
pub(crate) fn parse_addresses(v: &[u8]) -> Vec<Address<'static>> {
    let tokens = tokenize(v);
    let mut out = Vec::new();
    let mut pending: Vec<&Token> = Vec::new();
    let mut in_group = false;
    let mut i = 0;
    while i < tokens.len() {
        let t = &tokens[i];
        i += 1;
        match t {
            Token::Special(b'<') => {
                let close = tokens[i..]
                    .iter()
                    .position(|t| matches!(t, Token::Special(b'>')))
                    .map_or(tokens.len(), |p| i + p);
                let inner: Vec<&Token> = tokens[i..close].iter().collect();
                let comment = pending.iter().rev().find_map(|t| match t {
                    Token::Comment(c) => Some(trim(c).to_vec()),
                    _ => None,
                });
                out.push(angle_addr(phrase(&pending), &inner, comment));
                pending.clear();
                i = close + 1;
                // Skip whatever follows up to the next separator.
                while i < tokens.len() && !matches!(tokens[i], Token::Special(b',' | b';')) {
                    i += 1;
                }
            }
            Token::Special(b':')
                if !in_group && !pending.iter().any(|t| matches!(t, Token::Special(b'@'))) =>
            {
                out.push(Address {
                    name: nstring(None),
                    adl: nstring(None),
                    mailbox: NString(Some(istring(&phrase(&pending)))),
                    host: nstring(None),
                });
                pending.clear();
                in_group = true;
            }
            Token::Special(b',') => {
                out.extend(addr_spec(&pending));
                pending.clear();
            }
            Token::Special(b';') => {
                out.extend(addr_spec(&pending));
                pending.clear();
                if in_group {
                    out.push(group_end());
                    in_group = false;
                }
            }
            _ => pending.push(t),
        }
    }
    out.extend(addr_spec(&pending));
    if in_group {
        out.push(group_end());
    }
    out
}

fn group_end() -> Address<'static> {
    Address {
        name: nstring(None),
        adl: nstring(None),
        mailbox: nstring(None),
        host: nstring(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `(name adl mailbox host)` with NIL as `None`.
    fn show(list: &[Address<'static>]) -> Vec<[Option<String>; 4]> {
        let s = |n: &imap_types::core::NString<'static>| {
            n.clone()
                .into_option()
                .map(|v| String::from_utf8_lossy(&v).into_owned())
        };
        list.iter()
            .map(|a| [s(&a.name), s(&a.adl), s(&a.mailbox), s(&a.host)])
            .collect()
    }

    fn o(s: &str) -> Option<String> {
        Some(s.to_string())
    }

    #[test]
    fn address_forms() {
        let got = show(&parse_addresses(
            b"\"Doe, John\" <john@example.com>, a@b.c <a@b.c>, plain@example.org (Plain Person), =?UTF-8?Q?J=C3=B6rg?= <j@x.de>, <@r1,@r2:u@h>, Bare Name <bare>",
        ));
        assert_eq!(
            got,
            [
                [o("Doe, John"), None, o("john"), o("example.com")],
                [o("a@b.c"), None, o("a"), o("b.c")],
                [o("Plain Person"), None, o("plain"), o("example.org")],
                [o("=?UTF-8?Q?J=C3=B6rg?="), None, o("j"), o("x.de")],
                [None, o("@r1,@r2"), o("u"), o("h")],
                [o("Bare Name"), None, o("bare"), o("MISSING_DOMAIN")],
            ]
        );
    }

    #[test]
    fn groups() {
        let got = show(&parse_addresses(
            b"Team: a@x.org, \"B\" <b@y.org>;, solo@z.org, undisclosed-recipients:;",
        ));
        assert_eq!(
            got,
            [
                [None, None, o("Team"), None],
                [None, None, o("a"), o("x.org")],
                [o("B"), None, o("b"), o("y.org")],
                [None, None, None, None],
                [None, None, o("solo"), o("z.org")],
                [None, None, o("undisclosed-recipients"), None],
                [None, None, None, None],
            ]
        );
    }

    #[test]
    fn junk_does_not_panic() {
        for v in [
            &b""[..],
            b"<",
            b">",
            b"(((",
            b"\"",
            b"@",
            b":",
            b";",
            b",,,",
            b"a@",
            b"@b",
            b"[",
            b"<@a:",
            b"x: y: z;;",
        ] {
            let _ = parse_addresses(v);
        }
        assert!(parse_addresses(b"").is_empty());
        assert!(parse_addresses(b" , ").is_empty());
    }
}
