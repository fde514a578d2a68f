//! #13 point 19 with the real process: `dshare serve` on a 48 MiB tmpfs that another program
//! fills to the last block. The store meets ENOSPC (sled keeps that error until reopened):
//! mail gets temporary errors and POP3 reads go on; once the space returns the node
//! re-executes itself in place (same PID, so no supervisor is involved), reopens its store,
//! and takes mail again on the same ports, holding exactly the mail it acknowledged.

use std::time::{Duration, Instant};

mod common;
use common::{free_port, send, serve, stat};
use ds_testkit::SmallDisk;

#[test]
fn the_real_node_reopens_its_store_in_place_when_the_disk_has_room_again() {
    let Some(disk) = SmallDisk::mount(48).unwrap() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (smtp, pop3, admin) = (free_port(), free_port(), free_port());
    let config = common::single_node_config(
        dir.path(),
        &disk.data_dir(),
        (smtp, pop3, admin),
        "[limits]\nmin_free_space = 0",
    );
    let mut node = serve(&config, &[smtp, pop3, admin]);
    let pid = node.0.id();
    common::add_account(&config, "alice@example.com", "alice-pw");
    for i in 0..3 {
        assert_eq!(send(smtp, &format!("before{i}")), 250);
    }

    let filler = disk.fill().unwrap();
    for i in 0..4 {
        let code = send(smtp, &format!("full{i}"));
        assert_eq!(code / 100, 4, "a message on a full disk got {code}");
    }
    assert!(stat(pop3).is_some_and(|n| n >= 3), "reads stopped");

    std::fs::remove_file(&filler).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(
            node.0.try_wait().unwrap().is_none(),
            "the node exited instead of reopening its store"
        );
        // The store watch looks every 2 s; then the node drains and starts again in place.
        if send(smtp, "healed") == 250 {
            break;
        }
        assert!(Instant::now() < deadline, "the node never took mail again");
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(node.0.id(), pid);
    assert!(node.0.try_wait().unwrap().is_none());
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    assert!(
        environ.split(|&b| b == 0).any(|v| v == b"DSHARE_REEXEC=1"),
        "the process did not re-execute itself"
    );
    assert_eq!(
        stat(pop3),
        Some(4),
        "the three acknowledged messages and the one after"
    );
}
