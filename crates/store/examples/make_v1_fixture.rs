//! Writes the schema-1 database used by the migration test (`tests/fixtures/v1.tar.gz`).
//! Run once with the schema-1 code: `cargo run -p ds-store --example make_v1_fixture -- DIR`.

use ds_store::mailbox::INBOX;
use ds_store::queue::QueuedRecipient;
use ds_store::{MailStore, QueueStore, Store};

fn big_body() -> Vec<u8> {
    let mut b = b"Subject: big\r\nFrom: a@x.org\r\n\r\n".to_vec();
    let mut i = 0u32;
    while b.len() < 100_000 {
        b.extend_from_slice(format!("line {i} of the big message .\r\n").as_bytes());
        i += 1;
    }
    b
}

fn main() {
    let dir = std::env::args().nth(1).expect("usage: make_v1_fixture DIR");
    let dir = std::path::Path::new(&dir);
    let store = Store::open(dir).unwrap();
    let mail = MailStore::new(&store).unwrap();
    let queue = QueueStore::new(&store).unwrap();
    let a = "alice@company.com";
    let b = "bob@company.com";
    mail.deliver(
        a,
        b"Return-Path: <x@y.org>\r\nSubject: one\r\n\r\nhello\r\n",
    )
    .unwrap();
    mail.deliver(a, &big_body()).unwrap();
    mail.deliver(b, b"Subject: bare\n\nbare LF body\n.dot\n")
        .unwrap();
    mail.add_flags(a, INBOX, 1, &["\\Seen".to_string(), "$Work".to_string()])
        .unwrap();
    mail.copy(a, INBOX, &[1, 2], "Trash").unwrap();
    queue
        .enqueue(
            "alice@company.com",
            vec![QueuedRecipient::new("carol@company.com")],
            b"Received: by here\r\nSubject: queued\r\n\r\nqueued body\r\n",
            false,
            1_700_000_000,
        )
        .unwrap();
    queue
        .enqueue(
            "",
            vec![QueuedRecipient::new("dave@company.com")],
            &big_body(),
            true,
            1_700_000_001,
        )
        .unwrap();
    store.flush().unwrap();
    println!("schema {}", store.schema_version().unwrap());
}
