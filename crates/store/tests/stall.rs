//! The store never stalls under concurrent transactional writers whose data comes and goes
//! (the pattern of a mailbox moved away, a queue drained, bodies reaped): sled 0.34.7 could
//! deadlock there when its file shrank (vendor/sled/PATCHED.md).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sled::Transactional;

/// How long the workload runs (`STORE_STALL_SECONDS` to soak longer).
fn run_for() -> Duration {
    let secs = std::env::var("STORE_STALL_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(6);
    Duration::from_secs(secs)
}

/// No operation finishing for this long is a stall (each takes milliseconds).
const STALL: Duration = Duration::from_secs(30);

const WRITERS: u64 = 8;
/// Values per writer, written and then removed, round after round.
const VALUES: u64 = 48;
const VALUE_LEN: usize = 24 * 1024;

#[test]
fn transactional_writers_that_grow_and_shrink_the_file_never_stall() {
    let dir = tempfile::tempdir().unwrap();
    // As the node opens it (ds_store::Store::open_with_cache), with small segments so the
    // file grows and shrinks by many of them.
    let db = sled::Config::new()
        .path(dir.path().join("db"))
        .cache_capacity(8 << 20)
        .segment_size(256 * 1024)
        .mode(sled::Mode::HighThroughput)
        .open()
        .unwrap();
    let messages = db.open_tree("messages").unwrap();
    let index = db.open_tree("index").unwrap();
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));

    let mut threads = vec![];
    for w in 0..WRITERS {
        let (messages, index, done, stop) =
            (messages.clone(), index.clone(), done.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            let value = vec![w as u8; VALUE_LEN];
            while !stop.load(Ordering::Relaxed) {
                for i in 0..VALUES {
                    let key = (w << 32 | i).to_be_bytes();
                    (&messages, &index)
                        .transaction(|(m, x)| {
                            m.insert(&key, value.as_slice())?;
                            x.insert(&key, &key)?;
                            Ok::<_, sled::transaction::ConflictableTransactionError<()>>(())
                        })
                        .unwrap();
                    done.fetch_add(1, Ordering::Relaxed);
                }
                for i in 0..VALUES {
                    let key = (w << 32 | i).to_be_bytes();
                    (&messages, &index)
                        .transaction(|(m, x)| {
                            m.remove(&key)?;
                            x.remove(&key)?;
                            Ok::<_, sled::transaction::ConflictableTransactionError<()>>(())
                        })
                        .unwrap();
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    // Durable commits, as the node's group commit asks for them; and readers scanning.
    for scan in [false, true] {
        let (db, messages, done, stop) = (db.clone(), messages.clone(), done.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if scan {
                    let _ = messages.iter().keys().count();
                } else {
                    db.flush().unwrap();
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }

    let started = Instant::now();
    let (mut last, mut moved) = (0, Instant::now());
    while started.elapsed() < run_for() {
        std::thread::sleep(Duration::from_millis(100));
        let now = done.load(Ordering::Relaxed);
        if now != last {
            (last, moved) = (now, Instant::now());
        }
        // Stuck threads are left behind: the test process ends with the test.
        assert!(
            moved.elapsed() < STALL,
            "the store stalled: no operation finished for {STALL:?} after {last}"
        );
    }
    stop.store(true, Ordering::Relaxed);
    let deadline = Instant::now() + STALL;
    while !threads.iter().all(|t| t.is_finished()) {
        assert!(
            Instant::now() < deadline,
            "the store stalled: the workload did not stop within {STALL:?} ({} operations done)",
            done.load(Ordering::Relaxed)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    for t in threads {
        t.join().unwrap();
    }
    eprintln!(
        "{last} operations in {:?}, file {} KiB",
        started.elapsed(),
        db.size_on_disk().unwrap() / 1024
    );
}
