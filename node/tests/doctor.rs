//! `dshare doctor`: every peer checked end to end (Minger, SMTP relay, POP3, IMAP with TLS
//! verified against the cluster CA), with the real CLI against a three-node test cluster whose
//! third node is down.

use ds_testkit::Cluster;
use serde_json::Value;

mod common;
use common::{cli_config, dshare, json};

fn checks_of<'a>(report: &'a Value, peer: &str) -> &'a Vec<Value> {
    report["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == peer)
        .unwrap_or_else(|| panic!("no {peer} in {report}"))["checks"]
        .as_array()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_checks_every_peer_and_names_the_down_one() -> anyhow::Result<()> {
    let mut c = Cluster::start(3).await?;
    let dir = tempfile::tempdir()?;
    let cfg = cli_config(dir.path(), &c.node(0).data_dir(), c.node(0).admin());

    // All up: every check passes and the command succeeds.
    let out = dshare(&cfg, &["doctor"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("2 peer(s), all checks passed"), "{text}");
    for check in ["minger", "smtp", "pop3", "imap"] {
        assert!(
            text.lines()
                .any(|l| l.starts_with("node-b") && l.contains(check) && l.contains(" ok ")),
            "{check}: {text}"
        );
    }
    let report = json(&cfg, &["doctor"]).await;
    assert_eq!(report["ok"], true, "{report}");
    let b = checks_of(&report, "node-b");
    assert_eq!(b.len(), 4, "{report}");
    let detail = |checks: &Vec<Value>, name: &str| -> String {
        let c = checks.iter().find(|c| c["check"] == name).unwrap();
        format!("{} {}", c["ok"], c["detail"].as_str().unwrap())
    };
    assert!(detail(b, "minger").contains("node node-b"), "{report}");
    assert!(
        detail(b, "smtp").contains(&c.node(1).smtp().to_string()),
        "{report}"
    );
    assert!(detail(b, "imap").contains("STARTTLS verified"), "{report}");
    assert!(detail(b, "pop3").contains("STLS verified"), "{report}");

    // node-c down: its checks fail, node-b's still pass, and the command fails.
    c.node_mut(2).stop().await;
    let out = dshare(&cfg, &["doctor"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("2 peer(s), 1 with problems"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("node-c") && l.contains("minger") && l.contains("FAIL")),
        "{text}"
    );
    let out = dshare(&cfg, &["doctor", "--json"]).await;
    let report: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(report["ok"], false, "{report}");
    let down = checks_of(&report, "node-c");
    assert!(down.iter().all(|c| c["ok"] == false), "{report}");
    assert!(
        checks_of(&report, "node-b").iter().all(|c| c["ok"] == true),
        "{report}"
    );

    c.shutdown().await;
    Ok(())
}
