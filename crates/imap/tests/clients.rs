//! Other real clients: `curl imap://` (LIST, SEARCH, FETCH, UID FETCH) and implicit TLS.

mod common;

use ds_testkit::OutputWithin;
use std::process::Command;

use common::{PASS, USER, message, node, python};

fn curl(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("curl")
        .args([
            "-s",
            "-S",
            "--max-time",
            "20",
            "-u",
            &format!("{USER}:{PASS}"),
        ])
        .args(args)
        .output_bounded()?;
    anyhow::ensure!(
        out.status.success(),
        "curl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_list_search_fetch() -> anyhow::Result<()> {
    let c = node().await?;
    let mail = &c.node(0).node().state.mail;
    let first = message("first", 400);
    let second = message("second", 2000);
    mail.deliver(USER, &first)?;
    mail.deliver(USER, &second)?;
    let base = format!("imap://{}", c.node(0).imap());

    let list = curl(&[&format!("{base}/")])?;
    assert!(
        list.contains(r#"* LIST (\HasNoChildren) "/" "INBOX""#),
        "{list}"
    );
    assert!(list.contains(r#"\Sent) "/" "Sent""#), "{list}");

    let search = curl(&[&format!("{base}/INBOX"), "-X", "SEARCH SUBJECT second"])?;
    assert_eq!(search.trim(), "* SEARCH 2", "{search}");
    let all = curl(&[&format!("{base}/INBOX"), "-X", "UID SEARCH ALL"])?;
    assert_eq!(all.trim(), "* SEARCH 1 2", "{all}");

    let by_uid = curl(&[&format!("{base}/INBOX;UID=2")])?;
    assert_eq!(by_uid.as_bytes(), &second[..], "UID fetch");
    let by_index = curl(&[&format!("{base}/INBOX;MAILINDEX=1")])?;
    assert_eq!(by_index.as_bytes(), &first[..], "index fetch");
    let fetch = curl(&[&format!("{base}/INBOX"), "-X", "UID FETCH 1:* (FLAGS)"])?;
    assert!(fetch.contains("* 1 FETCH (UID 1 FLAGS (\\Seen"), "{fetch}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn implicit_tls() -> anyhow::Result<()> {
    let c = node().await?;
    let out = python(
        c.node(0).imaps(),
        r#"
import ssl
m = imaplib.IMAP4_SSL(HOST, PORT, ssl_context=ssl._create_unverified_context())
print("caps", " ".join(sorted(m.capabilities)))
print("login", m.login(USER, PASS)[0])
print("select", m.select()[0])
m.logout()
"#,
    )?;
    assert!(
        out.contains("login OK") && out.contains("select OK"),
        "{out}"
    );
    assert!(!out.contains("STARTTLS"), "{out}");
    Ok(())
}
