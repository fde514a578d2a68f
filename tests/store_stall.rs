//! A store that stalls (a deadlock inside sled: every write and read waits for good) is found
//! by the node's stall watch within `limits.store_stall`, which asks for the reopen that
//! `dshare serve` does by re-executing itself in place (as after a full disk,
//! node/tests/disk_full.rs); a healthy store is never taken for a stalled one, and the node
//! started again holds exactly the mail it acknowledged.
//!
//! A binary of its own: the stall is real, a sled transaction held open, and sled serialises
//! transactions process-wide, so it stalls every database in this process.

use std::time::{Duration, Instant};

use ds_testkit::Cluster;
use dshare_e2e::{Smtp, message};

const ALICE: &str = "alice@example.com";
const STALL: Duration = Duration::from_secs(2);

async fn deliver(c: &Cluster, subject: &str) -> anyhow::Result<()> {
    let mut s = Smtp::connect(c.node(0).smtp()).await?;
    let r = s
        .send("x@elsewhere.org", &[ALICE], &message(subject, 2000))
        .await?;
    assert!(r.iter().all(|r| r.is(250)), "{r:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_store_is_found_and_reopened_and_a_healthy_one_is_left_alone()
-> anyhow::Result<()> {
    let mut c = Cluster::start_with(1, |_, c| c.limits.store_stall = STALL).await?;
    c.node(0).add_account(ALICE, "pw").await?;
    deliver(&c, "before").await?;

    // Healthy: several probe rounds, no reopen.
    let quiet = tokio::time::timeout(3 * STALL, c.node(0).node().store_needs_reopen()).await;
    assert!(
        quiet.is_err(),
        "a healthy store was taken for a stalled one"
    );

    // Stalled: a transaction held open holds every write and read of the store.
    let store = c.node(0).node().state.store.clone();
    let (release, held) = std::sync::mpsc::channel::<()>();
    let stall = std::thread::spawn(move || store.stall_for_tests(&held));
    let stalled_at = Instant::now();
    tokio::time::timeout(10 * STALL, c.node(0).node().store_needs_reopen())
        .await
        .map_err(|_| anyhow::anyhow!("the stall was not found within {:?}", 10 * STALL))?;
    let found = stalled_at.elapsed();
    eprintln!("stall found after {found:?} (limit {STALL:?})");
    assert!(found >= STALL, "found after {found:?}, before the limit");

    // `dshare serve` now drains and re-executes itself: here the node is stopped and
    // started again once the stall is gone (a new process has no stalled transaction).
    drop(release);
    stall.join().unwrap()?;
    c.node_mut(0).stop().await;
    c.node_mut(0).restart().await?;
    assert_eq!(c.node(0).inbox_len(ALICE), 1);
    deliver(&c, "after").await?;
    assert_eq!(c.node(0).inbox_len(ALICE), 2);
    c.shutdown().await;
    Ok(())
}
