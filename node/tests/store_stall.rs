//! The real `dshare serve` with a store that stalls for good (a sled transaction held open by
//! the `DSHARE_TEST_STALL_STORE_FILE` hook, as a deadlock inside sled would): the store watch
//! finds it after `limits.store_stall`, and the node re-executes itself in place (same PID),
//! holding exactly the mail it acknowledged. A SIGTERM during a stall still ends the process
//! in bounded time, though a session is stuck in the store.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{send, serve_env, stat};

fn reexecuted(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/environ"))
        .is_ok_and(|env| env.split(|&b| b == 0).any(|v| v == b"DSHARE_REEXEC=1"))
}

/// Creates the hook's file and waits until the node took it (the store is stalled then).
fn stall(file: &std::path::Path) {
    std::fs::write(file, b"").unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while file.exists() {
        assert!(
            Instant::now() < deadline,
            "the node did not take the stall file"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_stalled_store_restarts_the_node_in_place_and_sigterm_still_ends_it() {
    let (dir, config, (smtp, pop3, admin)) = common::single_node("[limits]\nstore_stall = \"2s\"");
    let file = dir.path().join("stall");
    let addrs: Vec<SocketAddr> = [smtp, pop3, admin]
        .iter()
        .map(|p| SocketAddr::from(([127, 0, 0, 1], *p)))
        .collect();
    let mut node = serve_env(
        &config,
        &addrs,
        &[("DSHARE_TEST_STALL_STORE_FILE", file.to_str().unwrap())],
    );
    let pid = node.0.id();
    common::add_account(&config, "alice@example.com", "alice-pw");
    assert_eq!(send(smtp, "before"), 250);

    // 1. The store stalls: the node finds it and starts again in place.
    stall(&file);
    let stalled = Instant::now();
    let deadline = stalled + Duration::from_secs(90);
    while !reexecuted(pid) {
        assert!(
            node.0.try_wait().unwrap().is_none(),
            "the node exited instead of starting again"
        );
        assert!(Instant::now() < deadline, "the node never started again");
        std::thread::sleep(Duration::from_millis(50));
    }
    let restarted = stalled.elapsed();
    while send(smtp, "after") != 250 {
        assert!(Instant::now() < deadline, "the node never took mail again");
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "re-executed {restarted:?} after the stall, taking mail after {:?}",
        stalled.elapsed()
    );
    assert!(restarted >= Duration::from_secs(2), "{restarted:?}");
    assert_eq!(node.0.id(), pid);
    assert_eq!(
        stat(pop3),
        Some(2),
        "the acknowledged message and the one after"
    );
    let log = std::fs::read_to_string(config.with_extension("log")).unwrap();
    assert!(log.contains("the store has stalled"), "{log}");

    // 2. Stalled again, with a session stuck in the store: SIGTERM ends the process anyway.
    stall(&file);
    let mut stuck = Command::new("python3")
        .arg("-c")
        .arg(format!(
            "import smtplib\ns = smtplib.SMTP('127.0.0.1', {smtp}, timeout=60)\n\
             s.sendmail('x@elsewhere.org', ['alice@example.com'], 'Subject: stuck\\r\\n\\r\\nx\\r\\n')\n"
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let termed = Instant::now();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
    let status = loop {
        if let Some(status) = node.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            termed.elapsed() < Duration::from_secs(60),
            "SIGTERM did not end a node whose store stalled; its log:\n{}",
            std::fs::read_to_string(config.with_extension("log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    eprintln!("exited {:?} after SIGTERM: {status:?}", termed.elapsed());
    let _ = stuck.kill();
    let _ = stuck.wait();
}
