//! Memory stays bounded while 5 clients each APPEND a 20 MiB message and FETCH it back at once:
//! the test process's own RSS (the node runs in it; the imaplib clients are other processes) is
//! sampled throughout and may grow by less than 64 MiB; every message reads back byte-exact.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::{node, python};

const CLIENTS: usize = 5;
/// Allowed RSS growth of the test process (the node).
const MAX_GROWTH: u64 = 64 << 20;

fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    kib * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_large_appends_and_fetches_stay_bounded() -> anyhow::Result<()> {
    let c = node().await?;
    let addr = c.node(0).imap();
    let base = rss();
    let peak = Arc::new(AtomicU64::new(base));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, done) = (Arc::clone(&peak), Arc::clone(&done));
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                peak.fetch_max(rss(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            std::thread::spawn(move || {
                python(
                    addr,
                    &format!(
                        r#"
import hashlib
line = b'{d}' * 70 + b'\r\n'
body = b'Subject: big {i}\r\n\r\n' + line * (20 * 1024 * 1024 // len(line))
m = imaplib.IMAP4(HOST, PORT)
m.login(USER, PASS)
typ, d = m.append('INBOX', None, None, body)
uid = d[0].split()[2].rstrip(b']').decode()
m.select('INBOX')
typ, d = m.uid('FETCH', uid, '(BODY.PEEK[])')
got = d[0][1]
print(typ, len(got) == len(body), hashlib.sha256(got).digest() == hashlib.sha256(body).digest())
m.logout()
"#,
                        d = i % 10
                    ),
                )
            })
        })
        .collect();
    let mut outs = Vec::new();
    for t in clients {
        outs.push(
            tokio::task::spawn_blocking(move || t.join())
                .await?
                .map_err(|_| anyhow::anyhow!("client thread panicked"))??,
        );
    }
    done.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    let growth = peak.load(Ordering::Relaxed).saturating_sub(base);
    println!(
        "RSS base {} MiB, peak growth {} MiB during {CLIENTS} × 20 MiB APPEND + FETCH",
        base >> 20,
        growth >> 20
    );
    for out in &outs {
        assert_eq!(out.trim(), "OK True True");
    }
    assert!(growth < MAX_GROWTH, "RSS grew by {} MiB", growth >> 20);
    Ok(())
}
