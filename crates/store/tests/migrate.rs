//! A schema-1 database written by the schema-1 code (`examples/make_v1_fixture.rs`, run at commit
//! 1bb5ce9) opens, is migrated to schema 2, and reads back byte-exact.

use std::path::Path;

use ds_store::mailbox::INBOX;
use ds_store::{INLINE_MAX, MailStore, QueueStore, SCHEMA_VERSION, Store};

fn big_body() -> Vec<u8> {
    let mut b = b"Subject: big\r\nFrom: a@x.org\r\n\r\n".to_vec();
    let mut i = 0u32;
    while b.len() < 100_000 {
        b.extend_from_slice(format!("line {i} of the big message .\r\n").as_bytes());
        i += 1;
    }
    b
}

fn unpack(to: &Path) {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v1.tar.gz");
    let status = std::process::Command::new("tar")
        .arg("xzf")
        .arg(&fixture)
        .arg("-C")
        .arg(to)
        .status()
        .unwrap();
    assert!(status.success());
}

fn files_under(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                files_under(&e.path())
            } else {
                1
            }
        })
        .sum()
}

#[test]
fn schema_1_database_is_migrated_in_place() {
    let dir = tempfile::tempdir().unwrap();
    unpack(dir.path());
    let data = dir.path().join("v1");
    {
        let store = Store::open(&data).unwrap();
        assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
        check(&store);
        // Two large bodies moved to files: the mail one (shared with its copy) and a queued one.
        assert_eq!(files_under(&data.join("bodies")), 2);
    }
    // Opening again is a no-op and everything is still there.
    let store = Store::open(&data).unwrap();
    check(&store);
    let mail = MailStore::new(&store).unwrap();
    // Expunging both copies of the large message frees its file (after the reaper).
    let big = mail
        .message("alice@company.com", INBOX, 2)
        .unwrap()
        .unwrap();
    mail.expunge("alice@company.com", INBOX, &[2]).unwrap();
    assert!(mail.body(big.blob).unwrap().is_some(), "the copy keeps it");
    let trash = mail.messages("alice@company.com", "Trash").unwrap();
    let uid = trash.iter().find(|m| m.blob == big.blob).unwrap().uid;
    mail.expunge("alice@company.com", "Trash", &[uid]).unwrap();
    store.bodies().reap().unwrap();
    assert_eq!(files_under(&data.join("bodies")), 1);
}

fn check(store: &Store) {
    let mail = MailStore::new(store).unwrap();
    let queue = QueueStore::new(store).unwrap();
    let a = "alice@company.com";
    let inbox = mail.messages(a, INBOX).unwrap();
    assert_eq!(inbox.len(), 2);
    assert_eq!(
        mail.message_body(a, INBOX, 1).unwrap().unwrap(),
        b"Return-Path: <x@y.org>\r\nSubject: one\r\n\r\nhello\r\n"
    );
    assert_eq!(inbox[0].flags, ["\\Seen", "$Work"]);
    let big = big_body();
    assert!(big.len() > INLINE_MAX);
    assert_eq!(mail.message_body(a, INBOX, 2).unwrap().unwrap(), big);
    assert_eq!(inbox[1].size, big.len() as u64);
    assert_eq!(inbox[1].pop3_size, big.len() as u64);
    assert_eq!(
        mail.read_message_range(&inbox[1], 99_000, 10)
            .unwrap()
            .unwrap(),
        &big[99_000..99_010]
    );
    // The copies share the bodies.
    let trash = mail.messages(a, "Trash").unwrap();
    assert_eq!(trash.len(), 2);
    assert_eq!(trash[0].blob, inbox[0].blob);
    assert_eq!(trash[1].blob, inbox[1].blob);
    assert_eq!(store.bodies().refs(inbox[1].blob).unwrap(), 2);
    // A body with bare LFs: POP3 sends CRLF, and says so in its size.
    let bob = mail.messages("bob@company.com", INBOX).unwrap();
    let raw = b"Subject: bare\n\nbare LF body\n.dot\n";
    assert_eq!(bob[0].size, raw.len() as u64);
    assert_eq!(bob[0].pop3_size, raw.len() as u64 + 4);
    // Queue entries reference their bodies.
    let entries = queue.list().unwrap();
    assert_eq!(entries.len(), 2);
    assert_eq!(
        queue.body(entries[0].id).unwrap().unwrap(),
        b"Received: by here\r\nSubject: queued\r\n\r\nqueued body\r\n"
    );
    assert_eq!(queue.body(entries[1].id).unwrap().unwrap(), big);
    assert!(entries[1].hop);
    assert_eq!(entries[1].size, big.len() as u64);
    assert_eq!(queue.due(1_700_000_000).unwrap().len(), 1);
}
