//! BODYSTRUCTURE and BODY (RFC 3501 §7.4.2) from the MIME tree.
//!
//! Types, subtypes, parameters and field values are sent as written (RFC 2231 continuations and
//! charsets kept raw); a missing Content-Type is `text/plain; charset=us-ascii` (message/rfc822
//! inside multipart/digest), a missing transfer encoding `7BIT`, and a text part without a charset
//! gets `charset=us-ascii`. Sizes are octets of the body as stored; text and message/rfc822 parts
//! carry their line count. BODYSTRUCTURE adds the extension data (MD5, disposition, language,
//! location, and multipart parameters); BODY leaves it out.

use imap_types::body::{
    BasicFields, Body, BodyStructure, Disposition, Language, Location, MultiPartExtensionData,
    SinglePartExtensionData, SpecificFields,
};
use imap_types::core::{IString, Vec1};
use imap_types::envelope::Envelope;

use crate::envelope::envelope_of;
use crate::mime::{self, Content, Entity, count_lines, parse_disposition, trim, unfold};
use crate::{istring, nstring};

/// BODYSTRUCTURE of a message, with extension data.
pub fn body_structure(msg: &[u8]) -> BodyStructure<'static> {
    structure_of(msg, &mime::parse(msg), true)
}

/// BODY (the non-extensible BODYSTRUCTURE) of a message.
pub fn body(msg: &[u8]) -> BodyStructure<'static> {
    structure_of(msg, &mime::parse(msg), false)
}

fn params(list: &[(Vec<u8>, Vec<u8>)]) -> Vec<(IString<'static>, IString<'static>)> {
    list.iter().map(|(n, v)| (istring(n), istring(v))).collect()
}

fn u32_len(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// The disposition / language / location tail, all present (NIL where absent) as Dovecot sends it.
fn disposition_tail(msg: &[u8], e: &Entity) -> Option<Disposition<'static>> {
    let field = |name: &str| e.field(msg, name).map(unfold);
    let disposition = field("content-disposition")
        .and_then(|v| parse_disposition(&v))
        .map(|(kind, p)| (istring(&kind), params(&p)));
    let language = field("content-language")
        .map(|v| {
            v.split(|&b| b == b',')
                .map(trim)
                .filter(|l| !l.is_empty())
                .map(istring)
                .collect()
        })
        .unwrap_or_default();
    let location = field("content-location").map(|v| trim(&v).to_vec());
    Some(Disposition {
        disposition,
        tail: Some(Language {
            language,
            tail: Some(Location {
                location: nstring(location.as_deref()),
                extensions: Vec::new(),
            }),
        }),
    })
}

pub(crate) fn structure_of(msg: &[u8], e: &Entity, extended: bool) -> BodyStructure<'static> {
    if let Content::Multipart(children) = &e.content {
        let bodies: Vec<BodyStructure<'static>> = children
            .iter()
            .map(|c| structure_of(msg, c, extended))
            .collect();
        let bodies = Vec1::try_from(bodies).unwrap_or_else(|_| Vec1::from(empty_text()));
        return BodyStructure::Multi {
            bodies,
            subtype: istring(&e.ctype.subtype),
            extension_data: extended.then(|| MultiPartExtensionData {
                parameter_list: params(&e.ctype.params),
                tail: disposition_tail(msg, e),
            }),
        };
    }
    let body_bytes = &msg[e.body.clone()];
    let mut parameter_list = params(&e.ctype.params);
    let is_text = e.ctype.is("text", None);
    if is_text && e.ctype.param("charset").is_none() {
        parameter_list.push((istring(b"charset"), istring(b"us-ascii")));
    }
    let encoding = e
        .field(msg, "content-transfer-encoding")
        .map(|v| trim(&unfold(v)).to_vec());
    let basic = BasicFields {
        parameter_list,
        id: nstring(
            e.field(msg, "content-id")
                .map(|v| trim(&unfold(v)).to_vec())
                .as_deref(),
        ),
        description: nstring(
            e.field(msg, "content-description")
                .map(|v| trim(&unfold(v)).to_vec())
                .as_deref(),
        ),
        content_transfer_encoding: istring(
            encoding
                .as_deref()
                .filter(|v| !v.is_empty())
                .unwrap_or(&b"7BIT"[..]),
        ),
        size: u32_len(body_bytes.len()),
    };
    let specific = match &e.content {
        Content::Message(inner) => SpecificFields::Message {
            envelope: Box::new(envelope_of(msg, inner)),
            body_structure: Box::new(structure_of(msg, inner, extended)),
            number_of_lines: count_lines(body_bytes),
        },
        // An encoded (or too deeply nested) message/rfc822 still needs the message form on the
        // wire, or clients misparse it: NIL envelope, empty body.
        _ if e.ctype.is("message", Some("rfc822")) => SpecificFields::Message {
            envelope: Box::new(empty_envelope()),
            body_structure: Box::new(empty_text()),
            number_of_lines: count_lines(body_bytes),
        },
        _ if is_text => SpecificFields::Text {
            subtype: istring(&e.ctype.subtype),
            number_of_lines: count_lines(body_bytes),
        },
        _ => SpecificFields::Basic {
            r#type: istring(&e.ctype.mtype),
            subtype: istring(&e.ctype.subtype),
        },
    };
    BodyStructure::Single {
        body: Body { basic, specific },
        extension_data: extended.then(|| SinglePartExtensionData {
            md5: nstring(
                e.field(msg, "content-md5")
                    .map(|v| trim(&unfold(v)).to_vec())
                    .as_deref(),
            ),
            tail: disposition_tail(msg, e),
        }),
    }
}

fn empty_text() -> BodyStructure<'static> {
    BodyStructure::Single {
        body: Body {
            basic: BasicFields {
                parameter_list: vec![(istring(b"charset"), istring(b"us-ascii"))],
                id: nstring(None),
                description: nstring(None),
                content_transfer_encoding: istring(b"7BIT"),
                size: 0,
            },
            specific: SpecificFields::Text {
                subtype: istring(b"plain"),
                number_of_lines: 0,
            },
        },
        extension_data: None,
    }
}

fn empty_envelope() -> Envelope<'static> {
    Envelope {
        date: nstring(None),
        subject: nstring(None),
        from: Vec::new(),
        sender: Vec::new(),
        reply_to: Vec::new(),
        to: Vec::new(),
        cc: Vec::new(),
        bcc: Vec::new(),
        in_reply_to: nstring(None),
        message_id: nstring(None),
    }
}
