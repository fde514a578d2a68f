//! The message functions the session needs: ENVELOPE, BODYSTRUCTURE, BODY[section], SEARCH
//! and modified UTF-7 mailbox names.
//!
//! STAND-INS: the real implementations live in the `ds-message` crate (crates/message), which
//! has the same five signatures. At the merge, delete everything below the `pub use` line and
//! re-export `ds_message::{envelope, body_structure, section_bytes, search, mutf7}`. These
//! versions only cover simple single-part messages: raw header values for ENVELOPE, a
//! text/plain-like BODYSTRUCTURE, HEADER/HEADER.FIELDS(.NOT)/TEXT/part 1 sections, and SEARCH
//! on flags, sets, sizes, dates and plain substrings.

use imap_types::body::{BasicFields, Body, BodyStructure, SpecificFields};
use imap_types::core::{IString, NString};
use imap_types::envelope::{Address, Envelope};
use imap_types::fetch::Section;

fn istring(s: impl Into<Vec<u8>>) -> IString<'static> {
    let v: Vec<u8> = s.into();
    IString::try_from(v.clone()).unwrap_or_else(|_| {
        IString::try_from(String::from_utf8_lossy(&v).replace('\0', "")).unwrap_or_else(|_| {
            IString::try_from("").unwrap_or_else(|_| unreachable!("empty string is quotable"))
        })
    })
}

fn nstring(s: Option<&[u8]>) -> NString<'static> {
    NString(s.map(|s| istring(s.to_vec())))
}

/// Header block (blank line included) and body of a message.
pub(crate) fn split_message(msg: &[u8]) -> (&[u8], &[u8]) {
    let mut i = 0;
    while i < msg.len() {
        if msg[i..].starts_with(b"\r\n") && (i == 0 || msg[..i].ends_with(b"\n")) {
            return (&msg[..i + 2], &msg[i + 2..]);
        }
        if msg[i] == b'\n' && (i == 0 || msg[..i].ends_with(b"\n")) {
            return (&msg[..i + 1], &msg[i + 1..]);
        }
        match msg[i..].iter().position(|&b| b == b'\n') {
            Some(p) => i += p + 1,
            None => return (msg, &[]),
        }
    }
    (msg, &[])
}

/// The header fields of a header block: (name, raw field including its CRLF).
fn fields(header: &[u8]) -> Vec<(String, &[u8])> {
    let mut out: Vec<(String, &[u8])> = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < header.len() {
        let end = header[i..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(header.len(), |p| i + p + 1);
        let line = &header[i..end];
        let continuation = matches!(line.first(), Some(b' ' | b'\t'));
        if !continuation && i > start {
            push_field(&mut out, &header[start..i]);
            start = i;
        }
        i = end;
    }
    if i > start {
        push_field(&mut out, &header[start..i]);
    }
    out
}

fn push_field<'a>(out: &mut Vec<(String, &'a [u8])>, raw: &'a [u8]) {
    if let Some(colon) = raw.iter().position(|&b| b == b':') {
        let name = String::from_utf8_lossy(&raw[..colon]).trim().to_string();
        if !name.is_empty() {
            out.push((name, raw));
        }
    }
}

/// The unfolded value of the first `name` field.
pub(crate) fn header_value(msg: &[u8], name: &str) -> Option<Vec<u8>> {
    let (header, _) = split_message(msg);
    fields(header)
        .into_iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, raw)| {
            let colon = raw.iter().position(|&b| b == b':').unwrap_or(0);
            let v: Vec<u8> = raw[colon + 1..]
                .iter()
                .copied()
                .filter(|&b| b != b'\r' && b != b'\n')
                .collect();
            let s = String::from_utf8_lossy(&v).trim().to_string();
            s.into_bytes()
        })
}

fn addresses(value: Option<Vec<u8>>) -> Vec<Address<'static>> {
    let Some(value) = value else {
        return Vec::new();
    };
    let text = String::from_utf8_lossy(&value).into_owned();
    text.split(',')
        .filter_map(|part| {
            let part = part.trim();
            if part.is_empty() {
                return None;
            }
            let (name, addr) = match (part.find('<'), part.rfind('>')) {
                (Some(l), Some(r)) if l < r => {
                    let name = part[..l].trim().trim_matches('"').trim();
                    (
                        (!name.is_empty()).then(|| name.to_string()),
                        &part[l + 1..r],
                    )
                }
                _ => (None, part),
            };
            let (mailbox, host) = addr.rsplit_once('@').unwrap_or((addr, ""));
            Some(Address {
                name: nstring(name.as_deref().map(str::as_bytes)),
                adl: NString(None),
                mailbox: nstring(Some(mailbox.as_bytes())),
                host: nstring(Some(host.as_bytes())),
            })
        })
        .collect()
}

/// ENVELOPE (RFC 3501 §7.4.2) of a message.
pub fn envelope(msg: &[u8]) -> Envelope<'static> {
    let from = addresses(header_value(msg, "From"));
    let sender = match addresses(header_value(msg, "Sender")) {
        s if s.is_empty() => from.clone(),
        s => s,
    };
    let reply_to = match addresses(header_value(msg, "Reply-To")) {
        r if r.is_empty() => from.clone(),
        r => r,
    };
    Envelope {
        date: nstring(header_value(msg, "Date").as_deref()),
        subject: nstring(header_value(msg, "Subject").as_deref()),
        from,
        sender,
        reply_to,
        to: addresses(header_value(msg, "To")),
        cc: addresses(header_value(msg, "Cc")),
        bcc: addresses(header_value(msg, "Bcc")),
        in_reply_to: nstring(header_value(msg, "In-Reply-To").as_deref()),
        message_id: nstring(header_value(msg, "Message-ID").as_deref()),
    }
}

/// BODYSTRUCTURE (RFC 3501 §7.4.2) of a message.
pub fn body_structure(msg: &[u8]) -> BodyStructure<'static> {
    let (_, body) = split_message(msg);
    let content_type = header_value(msg, "Content-Type")
        .map(|v| String::from_utf8_lossy(&v).into_owned())
        .unwrap_or_else(|| "text/plain; charset=us-ascii".into());
    let mut params = content_type.split(';');
    let mime = params
        .next()
        .unwrap_or("text/plain")
        .trim()
        .to_ascii_uppercase();
    let (ty, subtype) = mime.split_once('/').unwrap_or(("TEXT", "PLAIN"));
    let parameter_list = params
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| {
            (
                istring(k.trim().to_ascii_uppercase()),
                istring(v.trim().trim_matches('"').to_string()),
            )
        })
        .collect();
    let encoding = header_value(msg, "Content-Transfer-Encoding")
        .map(|v| String::from_utf8_lossy(&v).trim().to_ascii_uppercase())
        .unwrap_or_else(|| "7BIT".into());
    let lines = body.iter().filter(|&&b| b == b'\n').count() as u32;
    let specific = if ty == "TEXT" {
        SpecificFields::Text {
            subtype: istring(subtype.to_string()),
            number_of_lines: lines,
        }
    } else {
        SpecificFields::Basic {
            r#type: istring(ty.to_string()),
            subtype: istring(subtype.to_string()),
        }
    };
    BodyStructure::Single {
        body: Body {
            basic: BasicFields {
                parameter_list,
                id: nstring(header_value(msg, "Content-ID").as_deref()),
                description: nstring(header_value(msg, "Content-Description").as_deref()),
                content_transfer_encoding: istring(encoding),
                size: body.len() as u32,
            },
            specific,
        },
        extension_data: None,
    }
}

fn field_list(header: &[u8], names: &[Vec<u8>], keep: bool) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, raw) in fields(header) {
        let listed = names
            .iter()
            .any(|n| n.eq_ignore_ascii_case(name.as_bytes()));
        if listed == keep {
            out.extend_from_slice(raw);
        }
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// The content of `BODY[section]` (`None`: the whole message); `None` when the message has no
/// such part. `mime` is reserved for the MIME header of a part.
pub fn section_bytes(msg: &[u8], section: Option<&Section<'_>>, mime: bool) -> Option<Vec<u8>> {
    let _ = mime;
    let (header, body) = split_message(msg);
    let top = |part: &Option<imap_types::fetch::Part>| part.is_none();
    match section {
        None => Some(msg.to_vec()),
        Some(Section::Header(p)) if top(p) => Some(header.to_vec()),
        Some(Section::Text(p)) if top(p) => Some(body.to_vec()),
        Some(Section::HeaderFields(p, names)) if top(p) => {
            let names: Vec<Vec<u8>> = names.as_ref().iter().map(|n| n.as_ref().to_vec()).collect();
            Some(field_list(header, &names, true))
        }
        Some(Section::HeaderFieldsNot(p, names)) if top(p) => {
            let names: Vec<Vec<u8>> = names.as_ref().iter().map(|n| n.as_ref().to_vec()).collect();
            Some(field_list(header, &names, false))
        }
        Some(Section::Part(part))
            if part.0.as_ref().len() == 1 && part.0.as_ref()[0].get() == 1 =>
        {
            Some(body.to_vec())
        }
        Some(Section::Mime(part))
            if part.0.as_ref().len() == 1 && part.0.as_ref()[0].get() == 1 =>
        {
            Some(header.to_vec())
        }
        _ => None,
    }
}

pub mod search {
    //! SEARCH keys over one message (stand-in for `ds_message::search`).

    use imap_types::search::SearchKey;
    use imap_types::sequence::{SeqOrUid, Sequence, SequenceSet};

    /// What SEARCH may look at in one message.
    pub trait Candidate {
        fn seq(&self) -> u32;
        fn uid(&self) -> u32;
        fn flags(&self) -> &[String];
        fn internal_date(&self) -> i64;
        fn size(&self) -> u64;
        /// The message bytes, when the keys need them.
        fn message(&self) -> Option<&[u8]>;
        fn is_recent(&self) -> bool;
        fn modseq(&self) -> u64;
        /// The largest sequence number in the mailbox (`*` in sequence sets).
        fn max_seq(&self) -> u32;
        /// The largest UID in the mailbox (`*` in UID sets).
        fn max_uid(&self) -> u32;
    }

    /// Whether `n` is in `set`, `*` being `max`.
    pub fn in_set(set: &SequenceSet, n: u32, max: u32) -> bool {
        let v = |s: &SeqOrUid| match s {
            SeqOrUid::Value(v) => v.get(),
            SeqOrUid::Asterisk => max,
        };
        set.0.as_ref().iter().any(|s| match s {
            Sequence::Single(a) => v(a) == n,
            Sequence::Range(a, b) => {
                let (lo, hi) = (v(a).min(v(b)), v(a).max(v(b)));
                lo <= n && n <= hi
            }
        })
    }

    fn has(c: &dyn Candidate, flag: &str) -> bool {
        c.flags().iter().any(|f| f.eq_ignore_ascii_case(flag))
    }

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        if needle.is_empty() {
            return true;
        }
        let hay = hay.to_ascii_lowercase();
        let needle = needle.to_ascii_lowercase();
        hay.windows(needle.len()).any(|w| w == needle.as_slice())
    }

    fn header_contains(c: &dyn Candidate, name: &[u8], needle: &[u8]) -> bool {
        let Some(msg) = c.message() else { return false };
        let name = String::from_utf8_lossy(name);
        match super::header_value(msg, &name) {
            Some(v) => contains(&v, needle),
            None => false,
        }
    }

    fn day(ts: i64) -> i64 {
        ts.div_euclid(86_400)
    }

    fn date_day(d: &imap_types::datetime::NaiveDate) -> i64 {
        let d: &chrono::NaiveDate = d.as_ref();
        d.and_hms_opt(0, 0, 0)
            .map_or(0, |t| t.and_utc().timestamp().div_euclid(86_400))
    }

    fn sent_day(c: &dyn Candidate) -> Option<i64> {
        let v = super::header_value(c.message()?, "Date")?;
        let s = String::from_utf8_lossy(&v).into_owned();
        chrono::DateTime::parse_from_rfc2822(s.trim())
            .ok()
            .map(|d| day(d.timestamp()))
    }

    /// Whether the message matches `key`.
    pub fn matches(key: &SearchKey<'_>, c: &dyn Candidate) -> bool {
        use SearchKey as K;
        match key {
            K::All => true,
            K::And(keys) => keys.as_ref().iter().all(|k| matches(k, c)),
            K::Or(a, b) => matches(a, c) || matches(b, c),
            K::Not(k) => !matches(k, c),
            K::SequenceSet(set) => in_set(set, c.seq(), c.max_seq()),
            K::Uid(set) => in_set(set, c.uid(), c.max_uid()),
            K::Answered => has(c, "\\Answered"),
            K::Unanswered => !has(c, "\\Answered"),
            K::Deleted => has(c, "\\Deleted"),
            K::Undeleted => !has(c, "\\Deleted"),
            K::Draft => has(c, "\\Draft"),
            K::Undraft => !has(c, "\\Draft"),
            K::Flagged => has(c, "\\Flagged"),
            K::Unflagged => !has(c, "\\Flagged"),
            K::Seen => has(c, "\\Seen"),
            K::Unseen => !has(c, "\\Seen"),
            K::Keyword(k) => has(c, k.inner()),
            K::Unkeyword(k) => !has(c, k.inner()),
            K::Recent => c.is_recent(),
            K::New => c.is_recent() && !has(c, "\\Seen"),
            K::Old => !c.is_recent(),
            K::Larger(n) => c.size() > u64::from(*n),
            K::Smaller(n) => c.size() < u64::from(*n),
            K::Before(d) => day(c.internal_date()) < date_day(d),
            K::On(d) => day(c.internal_date()) == date_day(d),
            K::Since(d) => day(c.internal_date()) >= date_day(d),
            K::SentBefore(d) => sent_day(c).is_some_and(|s| s < date_day(d)),
            K::SentOn(d) => sent_day(c).is_some_and(|s| s == date_day(d)),
            K::SentSince(d) => sent_day(c).is_some_and(|s| s >= date_day(d)),
            K::Header(name, value) => header_contains(c, name.as_ref(), value.as_ref()),
            K::Subject(v) => header_contains(c, b"Subject", v.as_ref()),
            K::From(v) => header_contains(c, b"From", v.as_ref()),
            K::To(v) => header_contains(c, b"To", v.as_ref()),
            K::Cc(v) => header_contains(c, b"Cc", v.as_ref()),
            K::Bcc(v) => header_contains(c, b"Bcc", v.as_ref()),
            K::Body(v) => c
                .message()
                .is_some_and(|m| contains(super::split_message(m).1, v.as_ref())),
            K::Text(v) => c.message().is_some_and(|m| contains(m, v.as_ref())),
            K::ModSequence { modseq, .. } => c.modseq() >= *modseq,
        }
    }

    /// Whether evaluating `key` needs the message bytes.
    pub fn needs_message(key: &SearchKey<'_>) -> bool {
        use SearchKey as K;
        match key {
            K::And(keys) => keys.as_ref().iter().any(needs_message),
            K::Or(a, b) => needs_message(a) || needs_message(b),
            K::Not(k) => needs_message(k),
            K::Header(..)
            | K::Subject(_)
            | K::From(_)
            | K::To(_)
            | K::Cc(_)
            | K::Bcc(_)
            | K::Body(_)
            | K::Text(_)
            | K::SentBefore(_)
            | K::SentOn(_)
            | K::SentSince(_) => true,
            _ => false,
        }
    }
}

pub mod mutf7 {
    //! Modified UTF-7 mailbox names (RFC 3501 §5.1.3).

    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+,";

    /// UTF-8 → modified UTF-7.
    pub fn encode(name: &str) -> String {
        let mut out = String::with_capacity(name.len());
        let mut pending: Vec<u16> = Vec::new();
        let flush = |pending: &mut Vec<u16>, out: &mut String| {
            if pending.is_empty() {
                return;
            }
            let bytes: Vec<u8> = pending.iter().flat_map(|u| u.to_be_bytes()).collect();
            out.push('&');
            for chunk in bytes.chunks(3) {
                let b = [
                    chunk[0],
                    *chunk.get(1).unwrap_or(&0),
                    *chunk.get(2).unwrap_or(&0),
                ];
                let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
                let chars = chunk.len() + 1;
                for i in 0..chars {
                    out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
                }
            }
            out.push('-');
            pending.clear();
        };
        for c in name.chars() {
            if (' '..='~').contains(&c) {
                flush(&mut pending, &mut out);
                if c == '&' {
                    out.push_str("&-");
                } else {
                    out.push(c);
                }
            } else {
                let mut buf = [0u16; 2];
                pending.extend_from_slice(c.encode_utf16(&mut buf));
            }
        }
        flush(&mut pending, &mut out);
        out
    }

    /// Modified UTF-7 → UTF-8; `None` if `name` is not valid modified UTF-7.
    pub fn decode(name: &str) -> Option<String> {
        let mut out = String::with_capacity(name.len());
        let bytes = name.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            if b != b'&' {
                if !(0x20..=0x7e).contains(&b) {
                    return None;
                }
                out.push(b as char);
                i += 1;
                continue;
            }
            let end = i + 1 + bytes[i + 1..].iter().position(|&c| c == b'-')?;
            let chunk = &bytes[i + 1..end];
            i = end + 1;
            if chunk.is_empty() {
                out.push('&');
                continue;
            }
            let mut bits: u32 = 0;
            let mut nbits = 0;
            let mut octets = Vec::new();
            for &c in chunk {
                let v = ALPHABET.iter().position(|&a| a == c)? as u32;
                bits = (bits << 6) | v;
                nbits += 6;
                if nbits >= 8 {
                    nbits -= 8;
                    octets.push((bits >> nbits) as u8);
                    bits &= (1 << nbits) - 1;
                }
            }
            if octets.len() % 2 != 0 {
                return None;
            }
            let units: Vec<u16> = octets
                .chunks(2)
                .map(|p| u16::from_be_bytes([p[0], p[1]]))
                .collect();
            let s = String::from_utf16(&units).ok()?;
            if s.chars().all(|c| (' '..='~').contains(&c)) {
                return None;
            }
            out.push_str(&s);
        }
        Some(out)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn round_trips() {
            for (utf8, utf7) in [
                ("INBOX", "INBOX"),
                ("a&b", "a&-b"),
                ("Entwürfe", "Entw&APw-rfe"),
                ("台北", "&U,BTFw-"),
                ("~peter/mail/台北/日本語", "~peter/mail/&U,BTFw-/&ZeVnLIqe-"),
            ] {
                assert_eq!(encode(utf8), utf7);
                assert_eq!(decode(utf7).as_deref(), Some(utf8));
            }
            assert_eq!(decode("&Jjo!"), None);
            assert_eq!(decode("&AGE-"), None);
        }
    }
}
