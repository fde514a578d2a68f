//! Message submission (DESIGN.md §5 `Authenticate`, §6): a user of node B authenticates at
//! node A on the submission ports (587-style STARTTLS, 465-style implicit TLS) with real
//! clients (Python's smtplib, curl), the owner checks the password over Minger, mail goes to
//! cluster accounts and to the outbound queue; port 25 stays closed to relaying.

use ds_testkit::OutputWithin;
use std::time::Duration;

use ds_testkit::Cluster;
use dshare_e2e::{Smtp, eventually, python};

const BOB: &str = "bob@example.com";
const ALICE: &str = "alice@example.com";
const PW: &str = "b0b-secret";

/// Two nodes: alice lives on node-a, bob on node-b.
async fn cluster() -> anyhow::Result<Cluster> {
    let c = Cluster::start_with(2, |_, c| {
        c.smtp.retry_base = Duration::from_secs(1);
        c.smtp.retry_max = Duration::from_secs(2);
        // Outside recipients stay queued here (tests/outbound.rs delivers them).
        c.outbound.enabled = false;
    })
    .await?;
    c.node(0).add_account(ALICE, "alice-pw").await?;
    c.node(1).add_account(BOB, PW).await?;
    Ok(c)
}

fn ca(c: &Cluster) -> String {
    c.root.path().join("ca.pem").display().to_string()
}

/// Pending outbound recipients in node `i`'s queue.
fn outbound(c: &Cluster, i: usize) -> Vec<String> {
    let state = &c.node(i).node().state;
    state
        .queue
        .list()
        .unwrap_or_default()
        .iter()
        .flat_map(|e| e.pending().cloned().collect::<Vec<_>>())
        .filter(|r| state.destination(r).starts_with("outbound:"))
        .map(|r| r.address)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_of_b_submits_at_a_with_smtplib_starttls() -> anyhow::Result<()> {
    let c = cluster().await?;
    let a = c.node(0).submission();
    let out = python(&format!(
        r#"
import smtplib, ssl
ctx = ssl.create_default_context(cafile="{ca}")
s = smtplib.SMTP("{ip}", {port}, timeout=30)
s.ehlo("laptop.test")
print("auth before tls", s.has_extn("auth"))
code, text = s.mail("{bob}")
print("mail before tls", code, text.decode())
s.rset()
code, text = s.docmd("AUTH", "PLAIN AGJvYkBleGFtcGxlLmNvbQBiMGItc2VjcmV0")
print("auth plain before tls", code)
s.starttls(context=ctx)
s.ehlo("laptop.test")
print("auth after tls", s.esmtp_features.get("auth", "").strip())
s.login("{bob}", "{pw}")
refused = s.sendmail("{bob}", ["{alice}", "x@outside.test"],
    "From: Bob <{bob}>\r\nTo: alice\r\nSubject: from the road\r\n\r\nHello from office B's user.\r\n")
print("refused", refused)
s.quit()
"#,
        ca = ca(&c),
        ip = a.ip(),
        port = a.port(),
        bob = BOB,
        alice = ALICE,
        pw = PW,
    ))?;
    assert!(out.contains("auth before tls False"), "{out}");
    assert!(out.contains("mail before tls 530 5.7.0"), "{out}");
    assert!(out.contains("auth plain before tls 530"), "{out}");
    assert!(out.contains("auth after tls PLAIN LOGIN"), "{out}");
    assert!(out.contains("refused {}"), "{out}");

    let inbox = c.node(0).inbox(ALICE);
    assert_eq!(inbox.len(), 1);
    let text = String::from_utf8_lossy(&inbox[0]);
    assert!(text.starts_with("Return-Path: <bob@example.com>"), "{text}");
    assert!(text.contains("with ESMTPSA"), "{text}");
    // The client's address is not revealed by default.
    let received = text.split("\r\n\r\n").next().unwrap_or("");
    assert!(
        !received.contains("[127.0.0.1]") && !received.contains("(127.0.0.1)"),
        "{text}"
    );
    assert!(text.contains("Hello from office B's user."), "{text}");
    // The outside recipient waits durably in the outbound queue of node-a.
    assert_eq!(outbound(&c, 0), vec!["x@outside.test".to_string()]);
    let (lines, _) = c
        .node(0)
        .node()
        .state
        .queue_listing()
        .map_err(anyhow::Error::msg)?;
    assert!(
        lines
            .iter()
            .any(|l| l.contains("x@outside.test via outbound:outside.test")),
        "{lines:?}"
    );
    c.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_over_implicit_tls_and_starttls() -> anyhow::Result<()> {
    let c = cluster().await?;
    let body =
        "From: bob@example.com\r\nTo: alice@example.com\r\nSubject: curl\r\n\r\nsent by curl\r\n";
    let body_file = c.root.path().join("body.eml");
    std::fs::write(&body_file, body)?;
    let run = |url: String, extra: &[&str]| -> anyhow::Result<std::process::Output> {
        let mut cmd = std::process::Command::new("curl");
        cmd.args(["-sS", "--max-time", "30", "--cacert", &ca(&c)])
            .args(extra)
            .args(["--user", &format!("{BOB}:{PW}")])
            .args(["--mail-from", BOB, "--mail-rcpt", ALICE])
            .args(["--mail-rcpt", "x@outside.test"])
            .arg("--upload-file")
            .arg(&body_file)
            .arg(url);
        Ok(cmd.output_bounded()?)
    };
    let s = c.node(0).submissions();
    let out = run(format!("smtps://{}:{}", s.ip(), s.port()), &[])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let p = c.node(0).submission();
    let out = run(format!("smtp://{}:{}", p.ip(), p.port()), &["--ssl-reqd"])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(c.node(0).inbox_len(ALICE), 2);
    assert_eq!(outbound(&c, 0).len(), 2);
    // Wrong password: curl fails with the server's 535.
    let mut cmd = std::process::Command::new("curl");
    cmd.args(["-sS", "-v", "--max-time", "30", "--cacert", &ca(&c)])
        .args(["--user", &format!("{BOB}:wrong")])
        .args(["--mail-from", BOB, "--mail-rcpt", ALICE])
        .arg("--upload-file")
        .arg(&body_file)
        .arg(format!("smtps://{}:{}", s.ip(), s.port()));
    let out = cmd.output_bounded()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("535 5.7.8"), "{err}");
    assert_eq!(c.node(0).inbox_len(ALICE), 2);
    c.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_unknown_user_and_owner_down() -> anyhow::Result<()> {
    let mut c = cluster().await?;
    let a = c.node(0).submissions();
    let ca_file = ca(&c);
    let script = |user: &str, pw: &str| {
        format!(
            r#"
import smtplib, ssl
ctx = ssl.create_default_context(cafile="{ca}")
s = smtplib.SMTP_SSL("{ip}", {port}, timeout=30, context=ctx)
s.ehlo("laptop.test")
s.user, s.password = "{user}", "{pw}"
try:
    s.auth("PLAIN", s.auth_plain)
    print("login ok")
except smtplib.SMTPAuthenticationError as e:
    print("login refused", e.smtp_code, e.smtp_error.decode())
except smtplib.SMTPResponseException as e:
    print("login error", e.smtp_code, e.smtp_error.decode())
s.quit()
"#,
            ca = ca_file,
            ip = a.ip(),
            port = a.port(),
        )
    };
    // A remote account with a wrong password, the owner refusing it.
    let out = python(&script(BOB, "nope"))?;
    assert!(out.contains("login refused 535 5.7.8"), "{out}");
    // A local account with a wrong password, and a name no node has: the same reply.
    let out = python(&script(ALICE, "nope"))?;
    assert!(out.contains("login refused 535 5.7.8"), "{out}");
    let out = python(&script("nobody@example.com", "nope"))?;
    assert!(out.contains("login refused 535 5.7.8"), "{out}");
    // The bare name resolves in the main domain (DESIGN.md §3), checked by the owner.
    let out = python(&script("bob", PW))?;
    assert!(out.contains("login ok"), "{out}");
    // The owner down: a temporary failure, never "bad password".
    c.node_mut(1).stop().await;
    let out = python(&script(BOB, PW))?;
    assert!(out.contains("login refused 454 4.7.0"), "{out}");
    c.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_25_is_still_no_open_relay() -> anyhow::Result<()> {
    let c = cluster().await?;
    let mut s = Smtp::connect(c.node(0).smtp()).await?;
    let r = s.cmd(&format!("MAIL FROM:<{BOB}>")).await?;
    assert!(r.is(250), "{r:?}");
    let r = s.cmd("RCPT TO:<x@outside.test>").await?;
    assert_eq!((r.code, r.text.starts_with("5.7.1")), (554, true), "{r:?}");
    s.quit().await?;
    // And submission without AUTH relays nothing either.
    let out = python(&format!(
        r#"
import smtplib, ssl
ctx = ssl.create_default_context(cafile="{ca}")
s = smtplib.SMTP("{ip}", {port}, timeout=30)
s.starttls(context=ctx)
s.ehlo("laptop.test")
code, text = s.mail("{bob}")
print("mail without auth", code, text.decode())
s.quit()
"#,
        ca = ca(&c),
        ip = c.node(0).submission().ip(),
        port = c.node(0).submission().port(),
        bob = BOB,
    ))?;
    assert!(out.contains("mail without auth 530 5.7.0"), "{out}");
    assert!(eventually(Duration::from_secs(1), || outbound(&c, 0).is_empty()).await);
    c.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sender_rules_and_added_headers() -> anyhow::Result<()> {
    let c = cluster().await?;
    c.node(1)
        .node()
        .state
        .create_alias("robert@example.com", BOB, false)
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?;
    let a = c.node(0).submissions();
    let out = python(&format!(
        r#"
import smtplib, ssl
ctx = ssl.create_default_context(cafile="{ca}")
s = smtplib.SMTP_SSL("{ip}", {port}, timeout=30, context=ctx)
s.ehlo("laptop.test")
s.user, s.password = "{bob}", "{pw}"
s.auth("PLAIN", s.auth_plain)
for sender in ["alice@example.com", "mallory@example.com", "x@outside.test", ""]:
    code, text = s.mail(sender)
    print("mail", sender or "<>", code, text.decode())
    s.rset()
try:
    s.sendmail("{bob}", ["{alice}"], "From: {alice}\r\nSubject: forged\r\n\r\nforged\r\n")
    print("forged accepted")
except smtplib.SMTPDataError as e:
    print("forged", e.smtp_code, e.smtp_error.decode())
s.sendmail("robert@example.com", ["{alice}"],
    "From: Robert <robert@example.com>\r\nSubject: by alias\r\n\r\nno id, no date\r\n")
print("alias sent")
s.quit()
"#,
        ca = ca(&c),
        ip = a.ip(),
        port = a.port(),
        bob = BOB,
        alice = ALICE,
        pw = PW,
    ))?;
    for sender in [
        "alice@example.com",
        "mallory@example.com",
        "x@outside.test",
        "<>",
    ] {
        assert!(out.contains(&format!("mail {sender} 553 5.7.1")), "{out}");
    }
    assert!(out.contains("forged 553 5.7.1"), "{out}");
    assert!(out.contains("alias sent"), "{out}");
    let inbox = c.node(0).inbox(ALICE);
    assert_eq!(inbox.len(), 1, "only the message by alias arrives");
    let text = String::from_utf8_lossy(&inbox[0]);
    let header = text.split("\r\n\r\n").next().unwrap_or("");
    assert!(header.contains("\r\nMessage-ID: <"), "{text}");
    assert!(header.contains("\r\nDate: "), "{text}");
    assert!(text.ends_with("no id, no date\r\n"), "{text}");
    c.shutdown().await;
    Ok(())
}
