//! `BODY[section]` contents (RFC 3501 §6.4.5): byte-exact slices of the stored message.
//!
//! Part numbers follow the MIME tree: a non-multipart message's part 1 is its body; a part of a
//! message/rfc822 part addresses the encapsulated message (`2.1` is the first part of the message
//! in part 2, or its body when that message is not multipart). `HEADER`, `HEADER.FIELDS(.NOT)` and
//! `TEXT` after a part number apply to message/rfc822 parts only; `MIME` is a part's own header.
//! A part that does not exist gives `None`.

use std::borrow::Cow;
use std::num::NonZeroU32;

use imap_types::core::AString;
use imap_types::fetch::{Part, Section};

use crate::mime::{self, Content, Entity};

/// The content of `BODY[section]`: `None` section = the whole message; `mime: true` with a
/// [`Section::Part`] = `BODY[part.MIME]` (imap-types also models that as [`Section::Mime`]).
/// `None` if the part does not exist.
pub fn section_bytes(msg: &[u8], section: Option<&Section<'_>>, mime: bool) -> Option<Vec<u8>> {
    match section {
        None => Some(msg.to_vec()),
        Some(_) => section_of(msg, &mime::parse(msg), section, mime).map(Cow::into_owned),
    }
}

/// [`section_bytes`] over an already parsed tree; borrowed unless HEADER.FIELDS(.NOT) had to
/// assemble the fields.
pub(crate) fn section_of<'m>(
    msg: &'m [u8],
    root: &Entity,
    section: Option<&Section<'_>>,
    mime: bool,
) -> Option<Cow<'m, [u8]>> {
    let Some(section) = section else {
        return Some(Cow::Borrowed(msg));
    };
    let slice = |r: std::ops::Range<usize>| Some(Cow::Borrowed(&msg[r]));
    match section {
        Section::Part(part) if mime => slice(find(root, part)?.header.clone()),
        Section::Mime(part) => slice(find(root, part)?.header.clone()),
        Section::Part(part) => slice(find(root, part)?.body.clone()),
        Section::Header(part) => slice(message_at(root, part.as_ref())?.header.clone()),
        Section::Text(part) => slice(message_at(root, part.as_ref())?.body.clone()),
        Section::HeaderFields(part, names) => Some(Cow::Owned(header_fields(
            msg,
            message_at(root, part.as_ref())?,
            names.as_ref(),
            true,
        ))),
        Section::HeaderFieldsNot(part, names) => Some(Cow::Owned(header_fields(
            msg,
            message_at(root, part.as_ref())?,
            names.as_ref(),
            false,
        ))),
    }
}

/// The entity a part number names.
fn find<'e>(root: &'e Entity, part: &Part) -> Option<&'e Entity> {
    let numbers: &[NonZeroU32] = part.0.as_ref();
    let (first, rest) = numbers.split_first()?;
    let mut cur = match &root.content {
        Content::Multipart(children) => children.get(index(*first)?)?,
        _ if first.get() == 1 => root,
        _ => return None,
    };
    for n in rest {
        cur = cur.subparts().get(index(*n)?)?;
    }
    Some(cur)
}

fn index(n: NonZeroU32) -> Option<usize> {
    usize::try_from(n.get() - 1).ok()
}

/// The message a HEADER/TEXT specifier applies to: the whole message, or the message inside
/// the message/rfc822 part named by `part`.
fn message_at<'e>(root: &'e Entity, part: Option<&Part>) -> Option<&'e Entity> {
    let Some(part) = part else {
        return Some(root);
    };
    match &find(root, part)?.content {
        Content::Message(inner) => Some(inner),
        _ => None,
    }
}

/// The fields of `e`'s header whose names are (`keep`) or are not (`!keep`) in `names`, in
/// their original order and form, then the blank line.
fn header_fields(msg: &[u8], e: &Entity, names: &[AString<'_>], keep: bool) -> Vec<u8> {
    let mut out = Vec::new();
    for f in &e.fields {
        let name = &msg[f.name.clone()];
        let listed = names.iter().any(|n| n.as_ref().eq_ignore_ascii_case(name));
        if listed == keep {
            out.extend_from_slice(&msg[f.line.clone()]);
            if !out.ends_with(b"\n") {
                out.extend_from_slice(b"\r\n");
            }
        }
    }
    out.extend_from_slice(b"\r\n");
    out
}
