//! Memory stays bounded whatever the message: the process's own RSS is sampled while 10
//! connections each send a 40 MiB single-line DATA and 10 send 40 MiB messages of ordinary lines,
//! all at once; every accepted message must read back byte-exact (hash compare).

mod common;

use std::hash::Hasher;
use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::*;
use tokio::io::AsyncWriteExt;

const SIZE: usize = 40 << 20;
const CONNECTIONS: usize = 20;
/// Allowed RSS growth of the whole test process (node and clients).
const MAX_GROWTH: u64 = 64 << 20;

fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

/// One 64 KiB piece of the message of connection `i` (no CR, LF or leading dot).
fn piece(i: usize) -> Vec<u8> {
    (0..64 * 1024)
        .map(|n| b'a' + ((n * 7 + i * 13 + n / 1000) % 26) as u8)
        .collect()
}

/// Sends a 40 MiB message to `rcpt`; returns the hash and length of the body as stored.
async fn send(addr: std::net::SocketAddr, i: usize, rcpt: &str) -> (u64, u64) {
    // From several loopback addresses: the listener allows 16 connections per address.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind(std::net::SocketAddr::from((
            [127, 0, 0, 10 + (i / 8) as u8],
            0,
        )))
        .unwrap();
    let tcp = socket.connect(addr).await.unwrap();
    let mut c = Client {
        stream: tokio::io::BufReader::new(tcp),
    };
    assert!(c.reply().await.starts_with("220"));
    c.cmd("EHLO client.example").await;
    c.expect("MAIL FROM:<load@outside.org>", "250").await;
    c.expect(&format!("RCPT TO:<{rcpt}>"), "250").await;
    c.expect("DATA", "354").await;
    let single_line = i < CONNECTIONS / 2;
    let piece = piece(i);
    let mut hash = std::collections::hash_map::DefaultHasher::new();
    let mut sent = 0usize;
    let mut col = 0usize;
    let mut wire = Vec::with_capacity(piece.len() + piece.len() / 500 * 2);
    while sent < SIZE {
        wire.clear();
        if single_line {
            wire.extend_from_slice(&piece);
        } else {
            for &b in &piece {
                wire.push(b);
                col += 1;
                if col == 998 {
                    wire.extend_from_slice(b"\r\n");
                    col = 0;
                }
            }
        }
        hash.write(&wire);
        sent += wire.len();
        c.stream.get_mut().write_all(&wire).await.unwrap();
    }
    hash.write(b"\r\n");
    c.send(b"\r\n.\r\n").await;
    let reply = c.reply().await;
    assert!(reply.starts_with("250 2.0.0"), "connection {i}: {reply}");
    (hash.finish(), sent as u64 + 2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_40_mib_messages_keep_rss_bounded() {
    let accounts: Vec<&'static str> = (0..CONNECTIONS)
        .map(|i| &*Box::leak(format!("user{i}@company.com").into_boxed_str()))
        .collect();
    let node = start("a", &accounts).await;
    // Warm up: one small message through the whole path.
    let mut c = connect(node.addr).await;
    c.cmd("EHLO client.example").await;
    c.expect("MAIL FROM:<w@outside.org>", "250").await;
    c.expect(&format!("RCPT TO:<{}>", accounts[0]), "250").await;
    c.expect("DATA", "354").await;
    c.expect("warm up\r\n.", "250").await;
    drop(c);

    let baseline = rss();
    let peak = Arc::new(AtomicU64::new(baseline));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, stop) = (Arc::clone(&peak), Arc::clone(&stop));
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(rss(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let mut tasks = Vec::new();
    for (i, &account) in accounts.iter().enumerate() {
        let addr = node.addr;
        tasks.push(tokio::spawn(async move { send(addr, i, account).await }));
    }
    let mut sent = Vec::new();
    for t in tasks {
        sent.push(
            tokio::time::timeout(Duration::from_secs(600), t)
                .await
                .expect("sending timed out")
                .unwrap(),
        );
    }
    stop.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    let growth = peak.load(Ordering::Relaxed).saturating_sub(baseline);
    eprintln!(
        "RSS baseline {} MiB, peak growth {} MiB",
        baseline >> 20,
        growth >> 20
    );
    assert!(
        growth < MAX_GROWTH,
        "RSS grew by {} MiB (baseline {} MiB)",
        growth >> 20,
        baseline >> 20
    );

    for (i, (account, (hash, len))) in accounts.iter().zip(sent).enumerate() {
        let metas = node.mail.messages(account, "INBOX").unwrap();
        let meta = metas.last().unwrap();
        let mut reader = node.store.bodies().open(meta.blob).unwrap().unwrap();
        let mut got = std::collections::hash_map::DefaultHasher::new();
        let mut buf = vec![0u8; 1 << 16];
        let mut n = 0u64;
        loop {
            let k = reader.read(&mut buf).unwrap();
            if k == 0 {
                break;
            }
            got.write(&buf[..k]);
            n += k as u64;
        }
        assert_eq!(n, len, "connection {i}: length");
        assert_eq!(got.finish(), hash, "connection {i}: content");
        assert_eq!(meta.size, meta.prefix.len() as u64 + len);
    }
}
