//! ds-message: what a stored message looks like to IMAP (RFC 3501), with no I/O.
//!
//! - [`envelope`]: the ENVELOPE of a message (raw header values, RFC 3501 §7.4.2).
//! - [`body_structure`] / [`body`]: BODYSTRUCTURE (with extension data) and BODY.
//! - [`section_bytes`]: the bytes of `BODY[section]` (HEADER, HEADER.FIELDS(.NOT), TEXT, MIME,
//!   part numbers through message/rfc822 parts), byte-exact slices of the stored message.
//! - [`search`]: evaluates a SEARCH key against one message ([`search::Candidate`]).
//! - [`mutf7`]: modified UTF-7 mailbox names (RFC 3501 §5.1.3).
//!
//! Every function accepts any bytes: malformed MIME gives a best-effort answer, never a panic,
//! and the work is bounded ([`MAX_DEPTH`], [`MAX_PARTS`]).

use imap_types::core::{IString, Literal, NString, Quoted};

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
