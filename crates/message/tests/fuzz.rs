//! No input makes the crate panic, recurse without bound or produce an unencodable value:
//! every truncation of the test messages, deterministic pseudo-random mutations of them,
//! random bytes, and deep / wide MIME nesting.

mod common;

use common::{
    BARE, FORWARD, MIXED, body_text, bodystructure_text, envelope_text, search_key, section,
};
use ds_message::search::{Candidate, matches};
use ds_message::{MAX_PARTS, body, body_structure, envelope, section_bytes};

/// xorshift64*: deterministic, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

struct Any<'m>(&'m [u8]);

impl Candidate for Any<'_> {
    fn seq(&self) -> u32 {
        1
    }
    fn uid(&self) -> u32 {
        1
    }
    fn flags(&self) -> &[String] {
        &[]
    }
    fn internal_date(&self) -> i64 {
        i64::MIN
    }
    fn size(&self) -> u64 {
        self.0.len() as u64
    }
    fn message(&self) -> Option<&[u8]> {
        Some(self.0)
    }
    fn is_recent(&self) -> bool {
        false
    }
    fn modseq(&self) -> u64 {
        1
    }
    fn max_seq(&self) -> u32 {
        1
    }
    fn max_uid(&self) -> u32 {
        1
    }
}

/// Runs everything on `msg`; the imap-codec encoding checks that every value is valid IMAP.
fn exercise(
    msg: &[u8],
    sections: &[Option<imap_codec::imap_types::fetch::Section<'static>>],
    keys: &[imap_codec::imap_types::search::SearchKey<'static>],
) {
    let _ = envelope_text(envelope(msg));
    let _ = bodystructure_text(body_structure(msg));
    let _ = body_text(body(msg));
    for s in sections {
        let _ = section_bytes(msg, s.as_ref(), false);
        let _ = section_bytes(msg, s.as_ref(), true);
    }
    for k in keys {
        let _ = matches(k, &Any(msg));
    }
}

fn fixtures() -> (
    Vec<Option<imap_codec::imap_types::fetch::Section<'static>>>,
    Vec<imap_codec::imap_types::search::SearchKey<'static>>,
) {
    let sections = [
        "",
        "HEADER",
        "TEXT",
        "1",
        "2",
        "1.1",
        "1.2.MIME",
        "2.HEADER",
        "2.1.TEXT",
        "2.HEADER.FIELDS (FROM)",
        "HEADER.FIELDS.NOT (TO)",
    ]
    .into_iter()
    .map(section)
    .collect();
    let keys = [
        "FROM a",
        "BODY b",
        "TEXT c",
        "SENTON 1-Jan-2020",
        "HEADER X-Y z",
        "SINCE 1-Jan-1970",
    ]
    .into_iter()
    .map(search_key)
    .collect();
    (sections, keys)
}

#[test]
fn truncations_never_panic() {
    let (sections, keys) = fixtures();
    for msg in [MIXED, FORWARD, BARE] {
        for cut in 0..=msg.len() {
            exercise(&msg[..cut], &sections, &keys);
            exercise(&msg[cut..], &sections, &keys);
        }
    }
}

#[test]
fn mutations_never_panic() {
    let (sections, keys) = fixtures();
    let interesting: &[&[u8]] = &[
        b"\r\n",
        b"\n",
        b"--",
        b"--outer",
        b"--inner--",
        b"--XX",
        b":",
        b";",
        b"\"",
        b"(",
        b")",
        b"<",
        b">",
        b"@",
        b"\0",
        b"\xff\xfe",
        b"=?",
        b"?=",
        b"=?utf-8?b?",
        b"Content-Type: multipart/mixed; boundary=outer\r\n",
        b"Content-Type: message/rfc822\r\n\r\n",
        b" ",
        b"\t",
        b"\\",
        b"*",
        b"'",
    ];
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for round in 0..3000 {
        let base = [MIXED, FORWARD, BARE][round % 3];
        let mut msg = base.to_vec();
        for _ in 0..1 + rng.below(8) {
            let at = rng.below(msg.len() + 1);
            match rng.below(4) {
                0 => {
                    let piece = interesting[rng.below(interesting.len())];
                    msg.splice(at..at, piece.iter().copied());
                }
                1 => {
                    let end = (at + rng.below(16)).min(msg.len());
                    msg.drain(at..end);
                }
                2 if at < msg.len() => msg[at] = rng.next() as u8,
                _ => {
                    let from = rng.below(msg.len());
                    let end = (from + rng.below(64)).min(msg.len());
                    let copy = msg[from..end].to_vec();
                    msg.splice(at..at, copy);
                }
            }
        }
        exercise(&msg, &sections, &keys);
    }
    for _ in 0..500 {
        let len = rng.below(512);
        let msg: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        exercise(&msg, &sections, &keys);
    }
}

#[test]
fn deep_nesting_is_capped() {
    // 5000 nested multiparts and 5000 nested message/rfc822: bounded depth, no stack overflow.
    let mut deep = Vec::new();
    for i in 0..5000 {
        deep.extend_from_slice(
            format!("Content-Type: multipart/mixed; boundary=b{i}\r\n\r\n--b{i}\r\n").as_bytes(),
        );
    }
    deep.extend_from_slice(b"\r\nleaf\r\n");
    let mut nested = Vec::new();
    for _ in 0..5000 {
        nested.extend_from_slice(b"Content-Type: message/rfc822\r\n\r\n");
    }
    nested.extend_from_slice(b"Subject: bottom\r\n\r\nleaf\r\n");
    let (sections, keys) = fixtures();
    for msg in [&deep, &nested] {
        // Run on a thread with a small stack: recursion must stay shallow.
        let msg = msg.clone();
        let (sections, keys) = (sections.clone(), keys.clone());
        std::thread::Builder::new()
            .stack_size(1 << 21)
            .spawn(move || exercise(&msg, &sections, &keys))
            .unwrap()
            .join()
            .unwrap();
    }
    let deep_section: String = (0..40).map(|_| "1").collect::<Vec<_>>().join(".");
    assert!(section_bytes(&deep, section(&deep_section).as_ref(), false).is_none());
}

#[test]
fn wide_multipart_is_capped() {
    let mut wide = b"Content-Type: multipart/mixed; boundary=w\r\n\r\n".to_vec();
    for i in 0..5000 {
        wide.extend_from_slice(format!("--w\r\n\r\npart {i}\r\n").as_bytes());
    }
    wide.extend_from_slice(b"--w--\r\n");
    let imap_codec::imap_types::body::BodyStructure::Multi { bodies, .. } = body_structure(&wide)
    else {
        panic!("not multipart")
    };
    assert!(
        bodies.as_ref().len() < MAX_PARTS,
        "{}",
        bodies.as_ref().len()
    );
    assert_eq!(
        section_bytes(&wide, section("5").as_ref(), false).as_deref(),
        Some(&b"part 4"[..])
    );
    assert!(section_bytes(&wide, section("4999").as_ref(), false).is_none());
}
