//! ds-message: what a stored message looks like to IMAP (RFC 3501), with no I/O.
//!
//! - [`envelope`]: the ENVELOPE of a message (raw header values, RFC 3501 §7.4.2).
//! - [`body_structure`] / [`body`]: BODYSTRUCTURE (with extension data) and BODY.
//! - [`section_bytes`]: the bytes of `BODY[section]` (HEADER, HEADER.FIELDS(.NOT), TEXT, MIME,
//!   part numbers through message/rfc822 parts), byte-exact slices of the stored message.
//! - [`search`]: evaluates a SEARCH key against one message ([`search::Candidate`]).
//! - [`mutf7`]: modified UTF-7 mailbox names (RFC 3501 §5.1.3).
//!
//! [`ParsedMessage`] parses once and answers all of these for one message (a FETCH of several
//! items); the free functions parse on every call.
//!
//! Every function accepts any bytes: malformed MIME gives a best-effort answer, never a panic,
//! and the work is bounded ([`MAX_DEPTH`], [`MAX_PARTS`]).

use std::borrow::Cow;

use imap_types::body::BodyStructure;
use imap_types::core::{IString, Literal, NString, Quoted};
use imap_types::envelope::Envelope;
use imap_types::fetch::Section;

mod bodystructure;
mod envelope;
mod mime;
pub mod mutf7;
pub mod search;
mod section;

pub use bodystructure::{body, body_structure};
pub use envelope::envelope;
pub use mime::{MAX_DEPTH, MAX_PARTS};
pub use section::section_bytes;

/// An IMAP string for arbitrary header bytes: quoted when it fits the quoted syntax, else a
/// literal (8-bit/UTF-8 text, RFC 6532). NUL, CR and LF are dropped (unfolding), so the value is
/// always valid for both.
pub(crate) fn istring(v: &[u8]) -> IString<'static> {
    let clean: Vec<u8> = v
        .iter()
        .copied()
        .filter(|&b| b != 0 && b != b'\r' && b != b'\n')
        .collect();
    if Quoted::validate(&clean).is_ok() {
        // Validated: only TEXT-CHARs, so ASCII.
        IString::Quoted(Quoted::unvalidated(
            String::from_utf8_lossy(&clean).into_owned(),
        ))
    } else {
        IString::Literal(Literal::unvalidated(clean))
    }
}

pub(crate) fn nstring(v: Option<&[u8]>) -> NString<'static> {
    NString(v.map(istring))
}

/// One message, its MIME structure parsed once (byte ranges only, the message is borrowed).
#[derive(Debug, Clone)]
pub struct ParsedMessage<'m> {
    msg: &'m [u8],
    root: mime::Entity,
}

impl<'m> ParsedMessage<'m> {
    pub fn new(msg: &'m [u8]) -> Self {
        ParsedMessage {
            msg,
            root: mime::parse(msg),
        }
    }

    /// The raw message.
    pub fn raw(&self) -> &'m [u8] {
        self.msg
    }

    /// Octets of the top-level header, blank line included (where `BODY[TEXT]` starts).
    pub fn header_len(&self) -> usize {
        self.root.header.len()
    }

    /// See [`envelope()`].
    pub fn envelope(&self) -> Envelope<'static> {
        envelope::envelope_of(self.msg, &self.root)
    }

    /// See [`body_structure()`].
    pub fn body_structure(&self) -> BodyStructure<'static> {
        bodystructure::structure_of(self.msg, &self.root, true)
    }

    /// See [`body()`].
    pub fn body(&self) -> BodyStructure<'static> {
        bodystructure::structure_of(self.msg, &self.root, false)
    }

    /// See [`section_bytes()`]; borrowed from the message except for HEADER.FIELDS(.NOT).
    pub fn section(&self, section: Option<&Section<'_>>, mime: bool) -> Option<Cow<'m, [u8]>> {
        section::section_of(self.msg, &self.root, section, mime)
    }
}
