//! Wire encoding of the responses the session writes itself (untagged data, tagged status).
//! `imap-codec` encodes the structured items (ENVELOPE, BODYSTRUCTURE) through
//! [`encode_item`]; everything else is simple enough to write here.

use std::num::NonZeroU32;

use imap_codec::ResponseCodec;
use imap_codec::encode::Encoder;
use imap_types::core::Vec1;
use imap_types::fetch::{MessageDataItem, Part, Section};
use imap_types::response::{Data, Response};

use crate::msg::mutf7;

/// The result of a command: `tag OK|NO|BAD [code] text`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Reply {
    pub kind: &'static str,
    pub code: Option<String>,
    pub text: String,
}

impl Reply {
    pub fn ok(text: impl Into<String>) -> Reply {
        Reply {
            kind: "OK",
            code: None,
            text: text.into(),
        }
    }

    pub fn no(text: impl Into<String>) -> Reply {
        Reply {
            kind: "NO",
            code: None,
            text: text.into(),
        }
    }

    pub fn bad(text: impl Into<String>) -> Reply {
        Reply {
            kind: "BAD",
            code: None,
            text: text.into(),
        }
    }

    pub fn code(mut self, code: impl Into<String>) -> Reply {
        self.code = Some(code.into());
        self
    }

    /// The tagged line.
    pub fn line(&self, tag: &str) -> Vec<u8> {
        match &self.code {
            Some(code) => format!("{tag} {} [{code}] {}\r\n", self.kind, self.text),
            None => format!("{tag} {} {}\r\n", self.kind, self.text),
        }
        .into_bytes()
    }
}

/// Append `s` as an IMAP string: quoted when it can be, a literal otherwise.
pub(crate) fn string(out: &mut Vec<u8>, s: &[u8]) {
    let quotable = s.len() <= 1024
        && s.iter()
            .all(|&b| b != 0 && b != b'\r' && b != b'\n' && b < 0x80);
    if quotable {
        out.push(b'"');
        for &b in s {
            if b == b'"' || b == b'\\' {
                out.push(b'\\');
            }
            out.push(b);
        }
        out.push(b'"');
    } else {
        out.extend_from_slice(format!("{{{}}}\r\n", s.len()).as_bytes());
        out.extend_from_slice(s);
    }
}

/// Append a mailbox name (stored in UTF-8) as it travels: modified UTF-7, quoted.
pub(crate) fn mailbox(out: &mut Vec<u8>, name: &str) {
    string(out, mutf7::encode(name).as_bytes());
}

/// `(\Seen $Label)`, with `\Recent` when asked.
pub(crate) fn flag_list(out: &mut Vec<u8>, flags: &[String], recent: bool) {
    out.push(b'(');
    let mut first = true;
    for f in flags {
        if !first {
            out.push(b' ');
        }
        first = false;
        out.extend_from_slice(f.as_bytes());
    }
    if recent {
        if !first {
            out.push(b' ');
        }
        out.extend_from_slice(b"\\Recent");
    }
    out.push(b')');
}

/// INTERNALDATE of unix seconds: `"02-Dec-2026 04:45:51 +0000"`.
pub(crate) fn internal_date(ts: i64) -> String {
    let dt = chrono::DateTime::from_timestamp(ts, 0).unwrap_or_default();
    dt.format("\"%d-%b-%Y %H:%M:%S +0000\"").to_string()
}

/// The wire form of one FETCH data item made by `imap-codec` (ENVELOPE, BODYSTRUCTURE, BODY).
pub(crate) fn encode_item(item: MessageDataItem<'static>) -> Vec<u8> {
    let data = Data::Fetch {
        seq: NonZeroU32::MIN,
        items: Vec1::from(item),
    };
    let bytes = ResponseCodec::default()
        .encode(&Response::Data(data))
        .dump();
    let prefix = b"* 1 FETCH (";
    let suffix = b")\r\n";
    if bytes.starts_with(prefix) && bytes.ends_with(suffix) {
        bytes[prefix.len()..bytes.len() - suffix.len()].to_vec()
    } else {
        bytes
    }
}

fn part(out: &mut String, p: &Part) {
    let nums: Vec<String> = p.0.as_ref().iter().map(|n| n.to_string()).collect();
    out.push_str(&nums.join("."));
}

fn field_names(out: &mut String, names: &Vec1<imap_types::core::AString<'_>>) {
    out.push_str(" (");
    let mut first = true;
    for n in names.as_ref() {
        if !first {
            out.push(' ');
        }
        first = false;
        let mut v = Vec::new();
        let bytes: &[u8] = n.as_ref();
        if !bytes.is_empty()
            && bytes
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(b))
        {
            v.extend_from_slice(bytes);
        } else {
            string(&mut v, bytes);
        }
        out.push_str(&String::from_utf8_lossy(&v));
    }
    out.push(')');
}

/// `HEADER.FIELDS (SUBJECT)`, `1.2.TEXT`, ... as the client asked (the text inside `[]`).
pub(crate) fn section_spec(section: Option<&Section<'_>>) -> String {
    let mut out = String::new();
    let prefix = |out: &mut String, p: &Option<Part>| {
        if let Some(p) = p {
            part(out, p);
            out.push('.');
        }
    };
    match section {
        None => {}
        Some(Section::Part(p)) => part(&mut out, p),
        Some(Section::Header(p)) => {
            prefix(&mut out, p);
            out.push_str("HEADER");
        }
        Some(Section::HeaderFields(p, names)) => {
            prefix(&mut out, p);
            out.push_str("HEADER.FIELDS");
            field_names(&mut out, names);
        }
        Some(Section::HeaderFieldsNot(p, names)) => {
            prefix(&mut out, p);
            out.push_str("HEADER.FIELDS.NOT");
            field_names(&mut out, names);
        }
        Some(Section::Text(p)) => {
            prefix(&mut out, p);
            out.push_str("TEXT");
        }
        Some(Section::Mime(p)) => {
            part(&mut out, p);
            out.push_str(".MIME");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_quote_or_literal() {
        let mut out = Vec::new();
        string(&mut out, b"a \"b\" \\c");
        assert_eq!(out, b"\"a \\\"b\\\" \\\\c\"");
        out.clear();
        string(&mut out, "Grüße".as_bytes());
        assert_eq!(out, "{7}\r\nGrüße".as_bytes());
        out.clear();
        mailbox(&mut out, "Entwürfe");
        assert_eq!(out, b"\"Entw&APw-rfe\"");
    }

    #[test]
    fn dates_and_flags() {
        assert_eq!(internal_date(0), "\"01-Jan-1970 00:00:00 +0000\"");
        let mut out = Vec::new();
        flag_list(&mut out, &["\\Seen".into()], true);
        assert_eq!(out, b"(\\Seen \\Recent)");
    }
}
