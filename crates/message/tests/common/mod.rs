//! Real-world-shaped test messages and helpers shared by the integration tests.
#![allow(dead_code)]

use std::num::NonZeroU32;

use imap_codec::encode::Encoder;
use imap_codec::imap_types::body::BodyStructure;
use imap_codec::imap_types::command::CommandBody;
use imap_codec::imap_types::core::Vec1;
use imap_codec::imap_types::envelope::Envelope;
use imap_codec::imap_types::fetch::{MessageDataItem, Section};
use imap_codec::imap_types::response::{Data, Response};
use imap_codec::imap_types::search::SearchKey;
use imap_codec::{CommandCodec, ResponseCodec, decode::Decoder};

/// multipart/mixed: (multipart/alternative: text/plain QP + text/html) + base64 PDF attachment,
/// UTF-8 encoded-word From and Subject ("Grüße aus München"), a group in Cc.
pub const MIXED: &[u8] = b"From: =?UTF-8?Q?J=C3=B6rg_M=C3=BCller?= <joerg@example.de>\r\n\
To: Alice <alice@example.com>, bob@example.org\r\n\
Cc: Team: carol@example.net;\r\n\
Subject: =?UTF-8?B?R3LDvMOfZSBhdXMgTcO8bmNoZW4=?=\r\n\
Date: Tue, 01 Dec 2026 10:00:00 +0100\r\n\
Message-ID: <m1@example.de>\r\n\
MIME-Version: 1.0\r\n\
Content-Type: multipart/mixed; boundary=\"outer\"\r\n\
\r\n\
This is a multi-part message in MIME format.\r\n\
--outer\r\n\
Content-Type: multipart/alternative; boundary=\"inner\"\r\n\
\r\n\
--inner\r\n\
Content-Type: text/plain; charset=utf-8\r\n\
Content-Transfer-Encoding: quoted-printable\r\n\
\r\n\
Hall=C3=B6chen Welt\r\n\
--inner\r\n\
Content-Type: text/html; charset=utf-8\r\n\
\r\n\
<p>Hello <b>world</b></p>\r\n\
--inner--\r\n\
--outer\r\n\
Content-Type: application/pdf; name=\"report.pdf\"\r\n\
Content-Disposition: attachment; filename=\"report.pdf\"\r\n\
Content-Transfer-Encoding: base64\r\n\
\r\n\
JVBERi0xLjQKJcfsj6IK\r\n\
--outer--\r\n";

/// multipart/mixed with a text part and a message/rfc822 part.
pub const FORWARD: &[u8] = b"From: outer@example.com\r\n\
To: undisclosed-recipients:;\r\n\
Subject: Fwd: hello\r\n\
Content-Type: multipart/mixed; boundary=XX\r\n\
\r\n\
--XX\r\n\
Content-Type: text/plain\r\n\
\r\n\
See attached.\r\n\
--XX\r\n\
Content-Type: message/rfc822\r\n\
\r\n\
From: Inner <inner@example.org>\r\n\
Subject: hello\r\n\
Date: Mon, 30 Nov 2026 08:00:00 +0000\r\n\
\r\n\
Inner body line 1\r\n\
Inner body line 2\r\n\
--XX--\r\n";

/// A bare message: only a Subject, no MIME headers.
pub const BARE: &[u8] = b"Subject: only\r\n\r\nbody";

/// `* 1 FETCH (item)` as imap-codec encodes it.
fn fetch_line(item: MessageDataItem<'static>) -> String {
    let response = Response::Data(Data::Fetch {
        seq: NonZeroU32::new(1).unwrap(),
        items: Vec1::from(item),
    });
    String::from_utf8_lossy(&ResponseCodec::default().encode(&response).dump()).into_owned()
}

/// The ENVELOPE as IMAP text.
pub fn envelope_text(env: Envelope<'static>) -> String {
    let line = fetch_line(MessageDataItem::Envelope(env));
    line.strip_prefix("* 1 FETCH (ENVELOPE ")
        .unwrap()
        .strip_suffix(")\r\n")
        .unwrap()
        .to_string()
}

/// The BODYSTRUCTURE as IMAP text.
pub fn bodystructure_text(bs: BodyStructure<'static>) -> String {
    let line = fetch_line(MessageDataItem::BodyStructure(bs));
    line.strip_prefix("* 1 FETCH (BODYSTRUCTURE ")
        .unwrap()
        .strip_suffix(")\r\n")
        .unwrap()
        .to_string()
}

/// The BODY as IMAP text.
pub fn body_text(bs: BodyStructure<'static>) -> String {
    let line = fetch_line(MessageDataItem::Body(bs));
    line.strip_prefix("* 1 FETCH (BODY ")
        .unwrap()
        .strip_suffix(")\r\n")
        .unwrap()
        .to_string()
}

/// Parses `criteria` as the arguments of a SEARCH command into one key.
/// Non-ASCII words or quoted strings in `criteria` are sent as literals (what a client does).
pub fn search_key(criteria: &str) -> SearchKey<'static> {
    let line = format!("A SEARCH {}\r\n", literalize(criteria));
    let (_, cmd) = CommandCodec::default()
        .decode_static(line.as_bytes())
        .unwrap_or_else(|e| panic!("{criteria}: {e:?}"));
    let CommandBody::Search { criteria, .. } = cmd.body else {
        panic!("not a SEARCH")
    };
    let mut keys = criteria.into_inner();
    if keys.len() == 1 {
        keys.pop().unwrap()
    } else {
        SearchKey::And(Vec1::try_from(keys).unwrap())
    }
}

/// Parses `spec` (what goes between the brackets of BODY[…]) into a section.
pub fn section(spec: &str) -> Option<Section<'static>> {
    use imap_codec::imap_types::fetch::{MacroOrMessageDataItemNames, MessageDataItemName};
    let line = format!("A FETCH 1 BODY[{spec}]\r\n");
    let (_, cmd) = CommandCodec::default()
        .decode_static(line.as_bytes())
        .unwrap_or_else(|e| panic!("{spec}: {e:?}"));
    let CommandBody::Fetch {
        macro_or_item_names: MacroOrMessageDataItemNames::MessageDataItemNames(mut names),
        ..
    } = cmd.body
    else {
        panic!("not a FETCH")
    };
    let Some(MessageDataItemName::BodyExt { section, .. }) = names.pop() else {
        panic!("not BODY[]")
    };
    section
}

/// Rewrites non-ASCII words and quoted strings as IMAP literals.
fn literalize(criteria: &str) -> String {
    let mut out = String::new();
    let mut chars = criteria.chars().peekable();
    while let Some(c) = chars.next() {
        let word = if c == '"' {
            let mut w = String::new();
            for c in chars.by_ref() {
                if c == '"' {
                    break;
                }
                w.push(c);
            }
            if w.is_ascii() {
                out.push('"');
                out.push_str(&w);
                out.push('"');
                continue;
            }
            w
        } else if " ()".contains(c) {
            out.push(c);
            continue;
        } else {
            let mut w = c.to_string();
            while let Some(&n) = chars.peek() {
                if " ()".contains(n) {
                    break;
                }
                w.push(n);
                chars.next();
            }
            if w.is_ascii() {
                out.push_str(&w);
                continue;
            }
            w
        };
        out.push_str(&format!("{{{}}}\r\n{word}", word.len()));
    }
    out
}
