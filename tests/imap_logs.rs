//! The owner's logs name the original client of a forwarded IMAP session, not the front
//! node (DESIGN.md §7). A test binary of its own, since it installs the global log
//! subscriber.

use ds_testkit::Cluster;
use dshare_e2e::{capture_logs, connect_from};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_logs_the_original_client_address_imap() -> anyhow::Result<()> {
    let logs = capture_logs();

    let c = Cluster::start(2).await?;
    c.node(1).add_account("bob@example.com", "bob-pass").await?;

    // The client comes from 127.0.0.5, a loopback address no node uses.
    let (client, mut r, mut w) = connect_from("127.0.0.5".parse()?, c.node(0).imap()).await?;
    let mut line = String::new();
    r.read_line(&mut line).await?;
    for cmd in ["a LOGIN bob bob-pass", "b SELECT INBOX", "c LOGOUT"] {
        w.write_all(format!("{cmd}\r\n").as_bytes()).await?;
        let tag = &cmd[..2];
        loop {
            line.clear();
            r.read_line(&mut line).await?;
            assert!(!line.is_empty(), "{cmd}: connection closed");
            if line.starts_with(tag) {
                break;
            }
        }
        assert!(line.starts_with(&format!("{tag}OK")), "{cmd}: {line}");
    }
    drop((r, w));
    c.shutdown().await;

    let text = logs.text();
    let owner_lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("forwarded session") && l.contains("front="))
        .collect();
    assert!(
        !owner_lines.is_empty(),
        "no forwarded session logged:\n{text}"
    );
    assert!(
        owner_lines
            .iter()
            .any(|l| l.contains(&format!("original_client={client}"))),
        "owner does not log client {client}:\n{}",
        owner_lines.join("\n")
    );
    Ok(())
}
