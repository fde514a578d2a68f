//! The status page in a real browser: headless Chromium loads it from a three-node cluster
//! with one peer down and a queued message, and the page must show both. Skipped, loudly,
//! when Chromium is not installed (`.ci/run` installs it). Set `DSHARE_SCREENSHOT=path.png`
//! to keep the screenshot (docs/status.png was made that way).

use ds_testkit::OutputWithin;
use std::process::Command;

use ds_cluster::Purpose;
use ds_store::{QueueEntry, QueuedRecipient, unix_now};
use ds_testkit::Cluster;

fn chromium() -> Option<&'static str> {
    ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|b| {
            Command::new(b)
                .arg("--version")
                .output_bounded()
                .is_ok_and(|o| o.status.success())
        })
}

fn browser(
    bin: &str,
    profile: &std::path::Path,
    extra: &[String],
    url: &str,
) -> std::process::Output {
    let mut cmd = Command::new(bin);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,1000",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .args(extra)
    .arg(url);
    cmd.output_bounded().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_shows_a_down_peer_and_the_queue_in_chromium() -> anyhow::Result<()> {
    let Some(bin) = chromium() else {
        eprintln!("\n*** SKIPPED: chromium is not installed (apt-get install -y chromium) ***\n");
        return Ok(());
    };
    let mut c = Cluster::start(3).await?;
    c.node(1).add_account("bob@example.com", "pw").await?;
    c.node_mut(2).stop().await;
    let a = c.node(0).node().state.clone();
    // A lookup asks every peer: node-b answers, node-c is down.
    let _ = a.locator.locate("bob@example.com", Purpose::Rcpt).await;
    let _ = a.locator.locate("nobody@example.com", Purpose::Rcpt).await;
    let now = unix_now();
    let id = a.queue.enqueue_entry(
        QueueEntry {
            next_attempt: now + 3600,
            attempts: 3,
            last_error: Some("451 4.4.1 node-c: connection refused".into()),
            ..QueueEntry::new(
                "alice@example.com",
                vec![QueuedRecipient {
                    owner: Some("node-c".into()),
                    endpoint: Some("127.0.0.3:9".into()),
                    ..QueuedRecipient::new("carol@example.com")
                }],
                now - 600,
            )
        },
        b"Subject: for carol\r\n\r\nhi\r\n",
    )?;
    let url = format!("http://{}/status", c.node(0).node().addrs().metrics[0]);
    let profile = tempfile::tempdir()?;
    let (bin, p, u) = (bin.to_string(), profile.path().to_path_buf(), url.clone());
    let dom =
        tokio::task::spawn_blocking(move || browser(&bin, &p, &["--dump-dom".into()], &u)).await?;
    let html = String::from_utf8_lossy(&dom.stdout).to_string();
    assert!(
        html.contains("<td>node-c</td><td class=\"down\">down</td>"),
        "{html}"
    );
    assert!(
        html.contains("<td>node-b</td><td class=\"up\">up</td>"),
        "{html}"
    );
    assert!(html.contains("1 message(s), 0 held"), "{html}");
    assert!(
        html.contains(&format!("{id} from=&lt;alice@example.com&gt;")),
        "{html}"
    );
    assert!(html.contains("carol@example.com via node-c"), "{html}");
    assert!(html.contains("<svg"), "{html}");

    let shot = match std::env::var("DSHARE_SCREENSHOT") {
        Ok(p) => std::path::PathBuf::from(p),
        Err(_) => profile.path().join("status.png"),
    };
    let (bin, p, u, s) = (
        chromium().unwrap().to_string(),
        profile.path().to_path_buf(),
        url,
        shot.clone(),
    );
    let out = tokio::task::spawn_blocking(move || {
        browser(&bin, &p, &[format!("--screenshot={}", s.display())], &u)
    })
    .await?;
    let png = std::fs::read(&shot).unwrap_or_else(|e| {
        panic!(
            "no screenshot ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
    c.shutdown().await;
    Ok(())
}
