//! Rough throughput of the IMAP view on large and adversarial messages (not a benchmark gate):
//! `cargo run --release -p ds-message --example measure`.

use std::time::Instant;

use ds_message::search::{Candidate, matches};
use ds_message::{ParsedMessage, body_structure};
use imap_types::core::AString;
use imap_types::search::SearchKey;

struct One<'m>(&'m [u8]);

impl Candidate for One<'_> {
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
        0
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

fn time(label: &str, bytes: usize, f: impl Fn()) {
    let start = Instant::now();
    let rounds = 5;
    for _ in 0..rounds {
        f();
    }
    let per = start.elapsed().as_secs_f64() / f64::from(rounds);
    println!(
        "{label:<44} {:>9.2} ms  {:>8.0} MB/s",
        per * 1e3,
        bytes as f64 / per / 1e6
    );
}

fn main() {
    // 20 MB: a text part and a base64 attachment of 76-column lines.
    let mut big = b"From: a@example.com\r\nSubject: big\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nhello needle\r\n--B\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n".to_vec();
    while big.len() < 20_000_000 {
        big.extend_from_slice(&[b'Q'; 76]);
        big.extend_from_slice(b"\r\n");
    }
    big.extend_from_slice(b"--B--\r\n");
    // 20 MB of 5-line parts (hits MAX_PARTS), and 5000 nested multiparts (hits MAX_DEPTH).
    let mut wide = b"Content-Type: multipart/mixed; boundary=w\r\n\r\n".to_vec();
    while wide.len() < 20_000_000 {
        wide.extend_from_slice(b"--w\r\nContent-Type: text/plain\r\n\r\nsome text\r\n");
    }
    let mut deep = Vec::new();
    for i in 0..5000 {
        deep.extend_from_slice(
            format!("Content-Type: multipart/mixed; boundary=b{i}\r\n\r\n--b{i}\r\n").as_bytes(),
        );
    }
    let body_key = SearchKey::Body(AString::try_from("needle").unwrap());
    for (name, msg) in [
        ("20 MB attachment", &big),
        ("20 MB of small parts", &wide),
        ("5000 nested multiparts", &deep),
    ] {
        time(&format!("{name}: BODYSTRUCTURE"), msg.len(), || {
            let _ = body_structure(msg);
        });
        time(
            &format!("{name}: parse + ENVELOPE + BODY[1]"),
            msg.len(),
            || {
                let p = ParsedMessage::new(msg);
                let _ = p.envelope();
                let _ = p.section(None, false);
            },
        );
        time(&format!("{name}: SEARCH BODY"), msg.len(), || {
            let _ = matches(&body_key, &One(msg));
        });
    }
}
