//! The message functions the session needs, from `ds-message` (ENVELOPE, BODYSTRUCTURE,
//! BODY[section], SEARCH, modified UTF-7), and the parsed-structure cache: ENVELOPE, BODY,
//! BODYSTRUCTURE (as encoded FETCH items) and the header length of a message, computed once per
//! stored body and kept by ds-store beside it ([`ds_store::Bodies::structure`]).

use std::io::{Read, Seek, SeekFrom};
use std::sync::atomic::{AtomicU64, Ordering};

use ds_store::{MessageMeta, MessageReader, Store};
use imap_types::fetch::MessageDataItem;

pub use ds_message::{ParsedMessage, body, body_structure, envelope, mutf7, search, section_bytes};

use crate::response;

/// Largest header read alone (for ENVELOPE, HEADER, TEXT offsets); a longer header means the
/// whole message is read.
pub(crate) const MAX_HEADER: usize = 256 * 1024;
/// Largest cached structure; a bigger one (thousands of parts) is computed on every FETCH.
const MAX_CACHED: usize = 256 * 1024;

static WHOLE_READS: AtomicU64 = AtomicU64::new(0);
static HEADER_READS: AtomicU64 = AtomicU64::new(0);

/// Messages read whole into memory (to parse them, or to search their text) since the process
/// started: a test hook for "the second FETCH BODYSTRUCTURE does not re-read the body".
pub fn whole_reads() -> u64 {
    WHOLE_READS.load(Ordering::Relaxed)
}

/// Message headers read alone since the process started.
pub fn header_reads() -> u64 {
    HEADER_READS.load(Ordering::Relaxed)
}

/// Octets of the header block of `buf` (blank line included) if `buf` holds all of it.
pub(crate) fn header_end(buf: &[u8]) -> Option<usize> {
    if buf.starts_with(b"\r\n") {
        return Some(2);
    }
    if buf.starts_with(b"\n") {
        return Some(1);
    }
    let mut i = 0;
    while let Some(p) = buf[i..].iter().position(|&b| b == b'\n') {
        let next = i + p + 1;
        if buf[next..].starts_with(b"\r\n") {
            return Some(next + 2);
        }
        if buf[next..].starts_with(b"\n") {
            return Some(next + 1);
        }
        i = next;
    }
    None
}

/// A whole message in memory (parsing, SEARCH on text), from its stream.
pub(crate) fn read_whole(reader: &mut MessageReader, size: u64) -> std::io::Result<Vec<u8>> {
    WHOLE_READS.fetch_add(1, Ordering::Relaxed);
    reader.seek(SeekFrom::Start(0))?;
    let mut out = Vec::with_capacity(size.min(64 * 1024 * 1024) as usize);
    reader.read_to_end(&mut out)?;
    Ok(out)
}

/// The header block of a message, read up to the blank line; `None` if there is none within
/// [`MAX_HEADER`] octets (the caller reads the message whole).
pub(crate) fn read_header(
    reader: &mut MessageReader,
    size: u64,
) -> std::io::Result<Option<Vec<u8>>> {
    HEADER_READS.fetch_add(1, Ordering::Relaxed);
    reader.seek(SeekFrom::Start(0))?;
    let mut reader = reader.take(MAX_HEADER as u64);
    let mut buf = Vec::with_capacity(16 * 1024);
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        let n = reader.read(&mut chunk)?;
        if n == 0 {
            // The whole message is a header (no blank line), or the cap was hit.
            let whole = (buf.len() as u64) == size;
            return Ok(whole.then_some(buf));
        }
        buf.extend_from_slice(&chunk[..n]);
        // Headers are small: rescanning from the start keeps the line logic simple.
        if let Some(end) = header_end(&buf) {
            buf.truncate(end);
            return Ok(Some(buf));
        }
    }
}

/// What FETCH needs of a message beyond its metadata, computed once per stored body.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Structure {
    /// Octets of the top-level header, blank line included.
    pub header_len: u64,
    /// `ENVELOPE (...)`, encoded.
    pub envelope: Vec<u8>,
    /// `BODY (...)` and `BODYSTRUCTURE (...)`, encoded; empty when only the header was read.
    pub body: Vec<u8>,
    pub body_structure: Vec<u8>,
}

impl Structure {
    /// From a whole message.
    pub fn of_message(msg: &[u8]) -> Structure {
        let parsed = ParsedMessage::new(msg);
        Structure {
            header_len: parsed.header_len() as u64,
            envelope: response::encode_item(MessageDataItem::Envelope(parsed.envelope())),
            body: response::encode_item(MessageDataItem::Body(parsed.body())),
            body_structure: response::encode_item(MessageDataItem::BodyStructure(
                parsed.body_structure(),
            )),
        }
    }

    /// From the header alone (ENVELOPE and the header length only).
    pub fn of_header(header: &[u8]) -> Structure {
        Structure {
            header_len: header.len() as u64,
            envelope: response::encode_item(MessageDataItem::Envelope(envelope(header))),
            body: Vec::new(),
            body_structure: Vec::new(),
        }
    }

    pub fn complete(&self) -> bool {
        !self.body_structure.is_empty()
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            8 + 12 + self.envelope.len() + self.body.len() + self.body_structure.len(),
        );
        out.extend_from_slice(&self.header_len.to_be_bytes());
        for part in [&self.envelope, &self.body, &self.body_structure] {
            out.extend_from_slice(&(part.len() as u32).to_be_bytes());
            out.extend_from_slice(part);
        }
        out
    }

    fn decode(mut v: &[u8]) -> Option<Structure> {
        let header_len = u64::from_be_bytes(v.get(..8)?.try_into().ok()?);
        v = &v[8..];
        let mut parts = Vec::with_capacity(3);
        for _ in 0..3 {
            let n = u32::from_be_bytes(v.get(..4)?.try_into().ok()?) as usize;
            parts.push(v.get(4..4 + n)?.to_vec());
            v = &v[4 + n..];
        }
        let body_structure = parts.pop()?;
        let body = parts.pop()?;
        let envelope = parts.pop()?;
        Some(Structure {
            header_len,
            envelope,
            body,
            body_structure,
        })
    }

    /// The cached structure of a message, if any.
    pub fn cached(store: &Store, meta: &MessageMeta) -> Option<Structure> {
        let prefix_len = u32::try_from(meta.prefix.len()).ok()?;
        match store.bodies().structure(meta.blob, prefix_len) {
            Ok(v) => v.as_deref().and_then(Structure::decode),
            Err(e) => {
                tracing::warn!(error = %e, "reading a cached message structure failed");
                None
            }
        }
    }

    /// Keeps the structure for the next FETCH (best effort).
    pub fn cache(&self, store: &Store, meta: &MessageMeta) {
        let Ok(prefix_len) = u32::try_from(meta.prefix.len()) else {
            return;
        };
        let v = self.encode();
        if v.len() > MAX_CACHED {
            return;
        }
        if let Err(e) = store.bodies().set_structure(meta.blob, prefix_len, &v) {
            tracing::warn!(error = %e, "caching a message structure failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_end_finds_the_blank_line() {
        assert_eq!(header_end(b"A: b\r\n\r\nbody"), Some(8));
        assert_eq!(header_end(b"A: b\n\nbody"), Some(6));
        assert_eq!(header_end(b"\r\nbody"), Some(2));
        assert_eq!(header_end(b"A: b\r\nC: d\r\n"), None);
    }

    #[test]
    fn structure_round_trips() {
        let s = Structure::of_message(b"Subject: hi\r\n\r\nbody\r\n");
        assert_eq!(s.header_len, 15);
        assert!(s.complete());
        assert_eq!(Structure::decode(&s.encode()), Some(s));
        assert_eq!(Structure::decode(b"short"), None);
    }
}
