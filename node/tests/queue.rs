//! The queue commands (`postqueue`/`postsuper`-like) and `--json` output, with the real CLI
//! against a two-node test cluster whose second node is down, so mail to it stays queued.

use ds_store::{QueueEntry, QueuedRecipient, unix_now};
use ds_testkit::Cluster;
use serde_json::Value;

mod common;
use common::{cli_config, err, json, ok};

fn queue_to(c: &Cluster, rcpts: &[&str], subject: &str) -> u64 {
    let q = &c.node(0).node().state.queue;
    let recipients = rcpts
        .iter()
        .map(|a| QueuedRecipient {
            owner: Some("node-b".into()),
            endpoint: Some("127.0.0.1:9".into()),
            ..QueuedRecipient::new(*a)
        })
        .collect();
    let now = unix_now();
    let entry = QueueEntry {
        // Not due for a while: only an operator's retry makes it due.
        next_attempt: now + 3600,
        attempts: 1,
        last_error: Some("451 4.4.1 node-b unreachable".into()),
        ..QueueEntry::new("alice@example.com", recipients, now)
    };
    let body = format!(
        "From: alice@example.com\r\nTo: {}\r\nSubject: {subject}\r\n\r\nhello\r\n",
        rcpts.join(", ")
    );
    q.enqueue_entry(entry, body.as_bytes()).unwrap()
}

fn next_in(list: &Value, id: u64) -> i64 {
    let e = list
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["id"] == id)
        .unwrap_or_else(|| panic!("no {id} in {list}"));
    e["next_attempt"].as_i64().unwrap() - unix_now()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_commands_and_json_output() -> anyhow::Result<()> {
    let mut c = Cluster::start(2).await?;
    c.node(0).add_account("alice@example.com", "pw").await?;
    c.node_mut(1).stop().await;
    let dir = tempfile::tempdir()?;
    let cfg = cli_config(dir.path(), &c.node(0).data_dir(), c.node(0).admin());

    assert_eq!(ok(&cfg, &["queue", "list"]).await.trim(), "queue is empty");
    assert_eq!(json(&cfg, &["queue", "list"]).await, Value::Array(vec![]));
    let a = queue_to(&c, &["bob@example.com"], "first");
    let b = queue_to(&c, &["carol@example.com", "dave@example.org"], "second");

    // list, --json and show
    let text = ok(&cfg, &["queue", "list"]).await;
    assert!(
        text.contains(&format!("{a} from=<alice@example.com>")),
        "{text}"
    );
    let list = json(&cfg, &["queue", "list"]).await;
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");
    assert_eq!(list[1]["recipients"][1]["address"], "dave@example.org");
    assert_eq!(list[1]["recipients"][1]["state"], "pending");
    assert_eq!(list[0]["held"], false);
    let show = ok(&cfg, &["queue", "show", &b.to_string()]).await;
    assert!(
        show.contains("Subject: second")
            && show.contains("recipient: carol@example.com owner=node-b")
            && show.contains("state=pending")
            && !show.contains("hello"),
        "{show}"
    );
    let shown = json(&cfg, &["queue", "show", &a.to_string()]).await;
    assert!(
        shown["headers"]
            .as_str()
            .unwrap()
            .contains("Subject: first")
    );
    assert!(
        err(&cfg, &["queue", "show", "999999"])
            .await
            .contains("no queued message")
    );

    // hold / release
    assert!(
        ok(&cfg, &["queue", "hold", &a.to_string()])
            .await
            .contains("1 message(s) held")
    );
    let list = json(&cfg, &["queue", "list"]).await;
    assert_eq!(list[0]["held"], true, "{list}");
    assert!(ok(&cfg, &["queue", "list"]).await.contains(" HELD"));
    // A held message is not retried by a flush.
    assert!(
        ok(&cfg, &["queue", "flush"])
            .await
            .contains("1 message(s) scheduled")
    );
    assert!(
        ok(&cfg, &["queue", "release", "--all"])
            .await
            .contains("1 message(s) released")
    );
    assert_eq!(json(&cfg, &["queue", "list"]).await[0]["held"], false);
    assert!(
        ok(&cfg, &["queue", "hold", "--all"])
            .await
            .contains("2 message(s) held")
    );
    assert!(
        ok(&cfg, &["queue", "release", &b.to_string()])
            .await
            .contains("1 message(s) released")
    );
    ok(&cfg, &["queue", "release", "--all"]).await;
    assert!(err(&cfg, &["queue", "hold"]).await.contains("--all"));
    assert!(
        err(&cfg, &["queue", "hold", "424242"])
            .await
            .contains("no queued message")
    );

    // retry by destination: only the matching message becomes due (the runner then fails
    // against the stopped node and pushes it back, so look at the counts).
    let out = ok(&cfg, &["queue", "retry", "--domain", "example.org"]).await;
    assert!(out.contains("1 message(s) scheduled"), "{out}");
    let out = ok(&cfg, &["queue", "retry", "--node", "node-b"]).await;
    assert!(out.contains("2 message(s) scheduled"), "{out}");
    let out = ok(&cfg, &["queue", "retry", "--node", "node-z"]).await;
    assert!(out.contains("0 message(s) scheduled"), "{out}");
    let out = ok(&cfg, &["queue", "retry", "--all"]).await;
    assert!(out.contains("2 message(s) scheduled"), "{out}");
    let list = json(&cfg, &["queue", "list"]).await;
    assert!(next_in(&list, a) < 3600, "{list}");

    // delete --all-for drops one recipient; the message goes when none is left
    let out = ok(&cfg, &["queue", "delete", "--all-for", "carol@example.com"]).await;
    assert!(
        out.contains("0 message(s) deleted, 1 recipient(s) dropped"),
        "{out}"
    );
    let list = json(&cfg, &["queue", "list"]).await;
    assert_eq!(list[1]["recipients"].as_array().unwrap().len(), 1, "{list}");
    let out = ok(&cfg, &["queue", "delete", "--all-for", "BOB@example.com"]).await;
    assert!(out.contains("1 message(s) deleted"), "{out}");
    let out = ok(&cfg, &["queue", "delete", &b.to_string()]).await;
    assert!(out.contains("1 message(s) deleted"), "{out}");
    assert_eq!(ok(&cfg, &["queue", "list"]).await.trim(), "queue is empty");

    // --json of the other listing commands
    let accounts = json(&cfg, &["account", "list"]).await;
    assert_eq!(accounts[0]["address"], "alice@example.com", "{accounts}");
    assert_eq!(accounts[0]["enabled"], true);
    let peers = json(&cfg, &["peers"]).await;
    assert_eq!(peers[0]["id"], "node-b", "{peers}");
    let look = json(&cfg, &["lookup", "alice"]).await;
    assert!(
        look["outcome"]
            .as_str()
            .unwrap()
            .contains("alice@example.com"),
        "{look}"
    );
    assert!(look["steps"].is_array(), "{look}");
    assert!(
        err(&cfg, &["domain", "list", "--json"])
            .await
            .contains("no JSON")
    );
    c.shutdown().await;
    Ok(())
}
