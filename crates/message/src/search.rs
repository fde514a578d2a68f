//! SEARCH keys (RFC 3501 §6.4.4, CONDSTORE's MODSEQ from RFC 7162) evaluated for one message.
//!
//! The caller describes a message through [`Candidate`]; [`matches`] decides a key, and
//! [`needs_message`] tells whether the body bytes are needed at all (flags, UIDs, sequence
//! numbers, sizes and internal dates are enough for the rest).
//!
//! String keys are case-insensitive substring matches on decoded text: header values with
//! encoded words and charsets decoded, and the text parts of the body with their transfer encoding
//! and charset decoded (mail-parser's decoders over our MIME tree). Dates compare by day: BEFORE/ON/SINCE on the internal
//! date in UTC, SENT* on the date written in the Date: header (the internal date if it has none).
//! The message is parsed at most once per [`matches`] call.

use std::cell::OnceCell;

use chrono::{DateTime, NaiveDate};
use imap_types::core::AString;
use imap_types::search::SearchKey;
use imap_types::sequence::{SeqOrUid, Sequence, SequenceSet};
use mail_parser::HeaderValue;
use mail_parser::decoders::base64::base64_decode;
use mail_parser::decoders::charsets::map::charset_decoder;
use mail_parser::decoders::quoted_printable::quoted_printable_decode;
use mail_parser::parsers::MessageStream;

use crate::mime::{self, Content, Entity};

/// Deepest key nesting (NOT/OR/AND) evaluated; deeper keys do not match.
const MAX_KEY_DEPTH: usize = 64;

/// One message as SEARCH sees it.
pub trait Candidate {
    /// Message sequence number.
    fn seq(&self) -> u32;
    fn uid(&self) -> u32;
    /// Flags and keywords, system flags with their backslash (`\Seen`).
    fn flags(&self) -> &[String];
    /// Internal date, Unix seconds.
    fn internal_date(&self) -> i64;
    /// RFC822.SIZE.
    fn size(&self) -> u64;
    /// The raw message, when the caller loaded it (see [`needs_message`]).
    fn message(&self) -> Option<&[u8]>;
    fn is_recent(&self) -> bool;
    fn modseq(&self) -> u64;
    /// The highest sequence number in the mailbox (`*` in a sequence set).
    fn max_seq(&self) -> u32;
    /// The highest UID in the mailbox (`*` in a UID set).
    fn max_uid(&self) -> u32;
}

/// Whether `c` matches `key`.
pub fn matches(key: &SearchKey<'_>, c: &dyn Candidate) -> bool {
    let eval = Eval {
        c,
        texts: OnceCell::new(),
    };
    eval.key(key, 0)
}

/// Whether deciding `key` needs the message bytes; `false` = flags, UIDs, sequence numbers,
/// sizes and internal dates are enough.
pub fn needs_message(key: &SearchKey<'_>) -> bool {
    needs(key, 0)
}

fn needs(key: &SearchKey<'_>, depth: usize) -> bool {
    if depth > MAX_KEY_DEPTH {
        return false;
    }
    match key {
        SearchKey::And(keys) => keys.as_ref().iter().any(|k| needs(k, depth + 1)),
        SearchKey::Not(k) => needs(k, depth + 1),
        SearchKey::Or(a, b) => needs(a, depth + 1) || needs(b, depth + 1),
        SearchKey::Bcc(_)
        | SearchKey::Body(_)
        | SearchKey::Cc(_)
        | SearchKey::From(_)
        | SearchKey::Header(..)
        | SearchKey::SentBefore(_)
        | SearchKey::SentOn(_)
        | SearchKey::SentSince(_)
        | SearchKey::Subject(_)
        | SearchKey::Text(_)
        | SearchKey::To(_) => true,
        _ => false,
    }
}

/// The decoded, lower-cased text of a message.
struct Texts {
    /// (lower-case field name, decoded lower-case value), in order.
    headers: Vec<(Vec<u8>, String)>,
    /// Decoded lower-case text of every text part, nested messages included.
    body: String,
    /// The day written in the Date: header.
    sent: Option<NaiveDate>,
}

struct Eval<'c> {
    c: &'c dyn Candidate,
    texts: OnceCell<Option<Texts>>,
}

impl Eval<'_> {
    fn texts(&self) -> Option<&Texts> {
        self.texts
            .get_or_init(|| self.c.message().map(texts))
            .as_ref()
    }

    fn flag(&self, name: &str) -> bool {
        self.c.flags().iter().any(|f| f.eq_ignore_ascii_case(name))
    }

    fn header_contains(&self, field: &[u8], needle: &AString<'_>) -> bool {
        let needle = lower(needle);
        self.texts().is_some_and(|t| {
            t.headers
                .iter()
                .any(|(name, value)| name.eq_ignore_ascii_case(field) && value.contains(&needle))
        })
    }

    fn internal_day(&self) -> Option<NaiveDate> {
        DateTime::from_timestamp(self.c.internal_date(), 0).map(|d| d.date_naive())
    }

    fn sent_day(&self) -> Option<NaiveDate> {
        self.texts()
            .and_then(|t| t.sent)
            .or_else(|| self.internal_day())
    }

    fn key(&self, key: &SearchKey<'_>, depth: usize) -> bool {
        if depth > MAX_KEY_DEPTH {
            return false;
        }
        let c = self.c;
        match key {
            SearchKey::And(keys) => keys.as_ref().iter().all(|k| self.key(k, depth + 1)),
            SearchKey::Not(k) => !self.key(k, depth + 1),
            SearchKey::Or(a, b) => self.key(a, depth + 1) || self.key(b, depth + 1),
            SearchKey::SequenceSet(set) => in_set(set, c.seq(), c.max_seq()),
            SearchKey::Uid(set) => in_set(set, c.uid(), c.max_uid()),
            SearchKey::All => true,
            SearchKey::Answered => self.flag("\\Answered"),
            SearchKey::Deleted => self.flag("\\Deleted"),
            SearchKey::Draft => self.flag("\\Draft"),
            SearchKey::Flagged => self.flag("\\Flagged"),
            SearchKey::Seen => self.flag("\\Seen"),
            SearchKey::Unanswered => !self.flag("\\Answered"),
            SearchKey::Undeleted => !self.flag("\\Deleted"),
            SearchKey::Undraft => !self.flag("\\Draft"),
            SearchKey::Unflagged => !self.flag("\\Flagged"),
            SearchKey::Unseen => !self.flag("\\Seen"),
            SearchKey::Keyword(k) => self.flag(k.inner()),
            SearchKey::Unkeyword(k) => !self.flag(k.inner()),
            SearchKey::Recent => c.is_recent(),
            SearchKey::New => c.is_recent() && !self.flag("\\Seen"),
            SearchKey::Old => !c.is_recent(),
            SearchKey::Larger(n) => c.size() > u64::from(*n),
            SearchKey::Smaller(n) => c.size() < u64::from(*n),
            SearchKey::Before(d) => self.internal_day().is_some_and(|day| day < *d.as_ref()),
            SearchKey::On(d) => self.internal_day().is_some_and(|day| day == *d.as_ref()),
            SearchKey::Since(d) => self.internal_day().is_some_and(|day| day >= *d.as_ref()),
            SearchKey::SentBefore(d) => {
                self.c.message().is_some() && self.sent_day().is_some_and(|day| day < *d.as_ref())
            }
            SearchKey::SentOn(d) => {
                self.c.message().is_some() && self.sent_day().is_some_and(|day| day == *d.as_ref())
            }
            SearchKey::SentSince(d) => {
                self.c.message().is_some() && self.sent_day().is_some_and(|day| day >= *d.as_ref())
            }
            SearchKey::Bcc(s) => self.header_contains(b"bcc", s),
            SearchKey::Cc(s) => self.header_contains(b"cc", s),
            SearchKey::From(s) => self.header_contains(b"from", s),
            SearchKey::To(s) => self.header_contains(b"to", s),
            SearchKey::Subject(s) => self.header_contains(b"subject", s),
            SearchKey::Header(field, s) => self.header_contains(field.as_ref(), s),
            SearchKey::Body(s) => {
                let needle = lower(s);
                self.texts().is_some_and(|t| t.body.contains(&needle))
            }
            SearchKey::Text(s) => {
                let needle = lower(s);
                self.texts().is_some_and(|t| {
                    t.body.contains(&needle)
                        || t.headers.iter().any(|(name, value)| {
                            value.contains(&needle)
                                || String::from_utf8_lossy(name).contains(&needle)
                        })
                })
            }
            SearchKey::ModSequence { modseq, .. } => c.modseq() >= *modseq,
            // Keys of extensions this crate does not enable (e.g. WITHIN) never match.
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }
}

fn lower(s: &AString<'_>) -> String {
    String::from_utf8_lossy(s.as_ref()).to_lowercase()
}

/// Whether `value` is in `set`, `*` being `max`.
pub fn in_set(set: &SequenceSet, value: u32, max: u32) -> bool {
    let resolve = |s: &SeqOrUid| match s {
        SeqOrUid::Value(v) => v.get(),
        SeqOrUid::Asterisk => max,
    };
    set.0.as_ref().iter().any(|seq| match seq {
        Sequence::Single(s) => resolve(s) == value,
        Sequence::Range(a, b) => {
            let (a, b) = (resolve(a), resolve(b));
            (a.min(b)..=a.max(b)).contains(&value)
        }
    })
}

/// Decodes an unfolded-or-folded raw header value (encoded words, charsets).
pub(crate) fn decode_header_value(raw: &[u8]) -> String {
    let mut line = Vec::with_capacity(raw.len() + 2);
    line.extend_from_slice(raw);
    line.extend_from_slice(b"\r\n");
    match MessageStream::new(&line).parse_unstructured() {
        HeaderValue::Text(t) => t.into_owned(),
        HeaderValue::TextList(list) => list.join(" "),
        _ => String::new(),
    }
}

fn texts(msg: &[u8]) -> Texts {
    let root: Entity = mime::parse(msg);
    let headers: Vec<(Vec<u8>, String)> = root
        .fields
        .iter()
        .map(|f| {
            (
                msg[f.name.clone()].to_ascii_lowercase(),
                decode_header_value(&msg[f.value.clone()]).to_lowercase(),
            )
        })
        .collect();
    let sent = root.field(msg, "date").and_then(|v| {
        let v = String::from_utf8_lossy(&mime::unfold(v)).into_owned();
        let dt = mail_parser::DateTime::parse_rfc822(v.trim())?;
        NaiveDate::from_ymd_opt(i32::from(dt.year), u32::from(dt.month), u32::from(dt.day))
    });
    let mut body = String::new();
    collect_text(msg, &root, &mut body, 0);
    Texts {
        headers,
        body: body.to_lowercase(),
        sent,
    }
}

/// Appends the decoded text of every text/* leaf under `e` (transfer encoding, then charset);
/// recursion follows the MIME tree, which is at most [`crate::MAX_DEPTH`] deep.
fn collect_text(msg: &[u8], e: &Entity, out: &mut String, depth: usize) {
    if depth > crate::MAX_DEPTH + 1 {
        return;
    }
    match &e.content {
        Content::Multipart(children) => {
            for child in children {
                collect_text(msg, child, out, depth + 1);
            }
        }
        Content::Message(inner) => collect_text(msg, inner, out, depth + 1),
        Content::Leaf if e.ctype.is("text", None) => {
            let raw = &msg[e.body.clone()];
            let decoded = match e.encoding(msg).as_slice() {
                b"base64" => base64_decode(raw),
                b"quoted-printable" => quoted_printable_decode(raw),
                _ => None,
            };
            let bytes = decoded.as_deref().unwrap_or(raw);
            let text = match e.ctype.param("charset").and_then(charset_decoder) {
                Some(decode) => decode(bytes),
                None => String::from_utf8_lossy(bytes).into_owned(),
            };
            out.push_str(&text);
            out.push('\n');
        }
        Content::Leaf => {}
    }
}
