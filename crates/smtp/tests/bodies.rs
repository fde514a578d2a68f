//! The message path of bodies: long lines, bodies larger than one chunk, one stored copy for
//! many recipients, the size cap and the node's budget for bodies in flight.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use ds_net::BodyBudget;

const ALICE: &str = "alice@company.com";
const BOB: &str = "bob@company.com";

fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => dir_size(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

/// A body of `len` octets in lines of `line` octets (CRLF included); `line = 0`: one line.
fn body(len: usize, line: usize, seed: u8) -> Vec<u8> {
    let mut b = Vec::with_capacity(len);
    let mut col = 0;
    while b.len() < len - 2 {
        if line > 0 && col == line - 2 {
            b.extend_from_slice(b"\r\n");
            col = 0;
            continue;
        }
        b.push(b'a' + ((b.len() as u8).wrapping_mul(31) ^ seed) % 26);
        col += 1;
    }
    b.extend_from_slice(b"\r\n");
    b
}

async fn send_to(node: &Node, rcpts: &[&str], data: &[u8]) -> String {
    let mut c = connect(node.addr).await;
    c.cmd("EHLO client.example").await;
    c.expect("MAIL FROM:<sender@outside.org>", "250").await;
    for r in rcpts {
        c.expect(&format!("RCPT TO:<{r}>"), "250").await;
    }
    c.expect("DATA", "354").await;
    let wire = stuffed(data);
    for chunk in wire.chunks(1 << 20) {
        c.send(chunk).await;
    }
    c.reply().await
}

#[tokio::test]
async fn a_long_single_line_is_stored_byte_exact() {
    let node = start("a", &[ALICE]).await;
    let data = body(3 << 20, 0, 1);
    let reply = send_to(&node, &[ALICE], &data).await;
    assert!(reply.starts_with("250 2.0.0"), "{reply}");
    let inbox = node.inbox(ALICE);
    assert_eq!(strip_trace(&inbox[0]), &data[..]);
    // Sizes: RFC822.SIZE is the prefix and the body; POP3's equals it (all CRLF).
    let meta = &node.mail.messages(ALICE, "INBOX").unwrap()[0];
    assert_eq!(meta.size, inbox[0].len() as u64);
    assert_eq!(meta.pop3_size, meta.size);
    // Range reads in the prefix, across it, in the body and at the end.
    let whole = &inbox[0];
    let p = meta.prefix.len();
    for (start, len) in [
        (0, 10),
        (p - 3, 10),
        (p + 70_000, 200_000),
        (whole.len() - 7, 100),
    ] {
        let got = node
            .mail
            .read_message_range(meta, start as u64, len)
            .unwrap()
            .unwrap();
        assert_eq!(got, &whole[start..(start + len).min(whole.len())]);
    }
}

#[tokio::test]
async fn fifty_recipients_share_one_stored_body() {
    let accounts: Vec<&'static str> = (0..50)
        .map(|i| &*Box::leak(format!("user{i}@company.com").into_boxed_str()))
        .collect();
    let node = start("a", &accounts).await;
    let dir = node.store.bodies().dir().parent().unwrap().to_path_buf();
    // Warm up the database files so their growth is not counted.
    let reply = send_to(&node, &[accounts[0]], b"Subject: warm\r\n\r\nup\r\n").await;
    assert!(reply.starts_with("250"), "{reply}");
    node.store.flush().unwrap();
    let before = dir_size(&dir);
    let data = body(10 << 20, 100, 2);
    let reply = send_to(&node, &accounts, &data).await;
    assert!(reply.starts_with("250 2.0.0"), "{reply}");
    node.store.flush().unwrap();
    let grown = dir_size(&dir) - before;
    eprintln!("50 recipients of a 10 MiB message: data dir grew by {grown} octets");
    assert!(
        grown < 14 << 20,
        "50 recipients of 10 MiB grew the data dir by {grown} octets"
    );
    let first = node.mail.messages(accounts[0], "INBOX").unwrap()[1].blob;
    for a in &accounts {
        let metas = node.mail.messages(a, "INBOX").unwrap();
        let meta = metas.last().unwrap();
        assert_eq!(meta.blob, first);
        assert!(meta.prefix.contains(&format!("for <{a}>")));
        assert_eq!(node.mail.body(meta.blob).unwrap().unwrap(), data);
    }
    assert_eq!(node.store.bodies().refs(first).unwrap(), 50);
    // Expunging all but one keeps the body; the last one frees it (after the reaper).
    for a in &accounts {
        let uid = node.mail.messages(a, "INBOX").unwrap().last().unwrap().uid;
        node.mail.expunge(a, "INBOX", &[uid]).unwrap();
    }
    assert_eq!(node.store.bodies().refs(first).unwrap(), 0);
    assert_eq!(node.store.bodies().reap().unwrap(), 1);
    assert!(node.mail.body(first).unwrap().is_none());
}

#[tokio::test]
async fn over_the_size_cap_is_drained_then_refused_and_nothing_stored() {
    let mut opts = NodeOptions::new("a", &[ALICE]);
    opts.config.max_message_size = 200_000;
    let node = start_with(opts).await;
    let mut c = connect(node.addr).await;
    c.cmd("EHLO client.example").await;
    c.expect("MAIL FROM:<s@outside.org>", "250").await;
    c.expect(&format!("RCPT TO:<{ALICE}>"), "250").await;
    c.expect("DATA", "354").await;
    // A single line far over the cap, then pipelined commands after the end marker.
    c.send(&body(1 << 20, 0, 3)).await;
    c.send(b".\r\nNOOP\r\n").await;
    let reply = c.reply().await;
    assert!(reply.starts_with("552 5.3.4"), "{reply}");
    let noop = c.reply().await;
    assert!(noop.starts_with("250"), "pipelined NOOP: {noop}");
    assert!(node.inbox(ALICE).is_empty());
    let files = dir_size(node.store.bodies().dir());
    assert_eq!(files, 0, "no body file left behind");
    // The session goes on.
    c.expect("MAIL FROM:<s@outside.org>", "250").await;
    c.expect(&format!("RCPT TO:<{ALICE}>"), "250").await;
    c.expect("DATA", "354").await;
    c.send(b"small\r\n.\r\n").await;
    assert!(c.reply().await.starts_with("250"));
    assert_eq!(node.inbox(ALICE).len(), 1);
}

#[tokio::test]
async fn no_budget_for_bodies_in_flight_is_452() {
    let mut opts = NodeOptions::new("a", &[ALICE]);
    opts.config.body_budget = BodyBudget::new(1000);
    let node = start_with(opts).await;
    let reply = send_to(&node, &[ALICE], b"Subject: x\r\n\r\nhello\r\n").await;
    assert!(reply.starts_with("452 4.3.1"), "{reply}");
    assert!(node.inbox(ALICE).is_empty());
}

#[tokio::test]
async fn a_multi_chunk_body_is_relayed_byte_exact() {
    let b = start("b", &[BOB]).await;
    let a = start("a", &[]).await;
    a.locator.set_remote(BOB, "b", &b.addr.to_string());
    // Lines starting with dots, across chunk boundaries.
    let mut data = Vec::new();
    for i in 0..40_000 {
        data.extend_from_slice(format!(".line {i} ..\r\n").as_bytes());
    }
    let reply = send_to(&a, &[BOB], &data).await;
    assert!(reply.starts_with("250 2.0.0"), "{reply}");
    let inbox = b.wait_inbox(BOB, 1, 30).await;
    assert_eq!(inbox.len(), 1);
    assert_eq!(strip_trace(&inbox[0]), &data[..]);
    // The queue's copy is gone once relayed (file freed at the reaper).
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(a.queue.is_empty());
    a.store.bodies().reap().unwrap();
    assert_eq!(dir_size(a.store.bodies().dir()), 0);
}
