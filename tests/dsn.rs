//! RFC 3461 DSN parameters end to end (DESIGN.md §6): Python's smtplib sends `RET`/`ENVID`
//! with `mail_options` and `NOTIFY`/`ORCPT` with `rcpt_options`; "the Internet" is the DNS
//! server and SMTP sink of `internet.rs`. bob lives on node-b and submits at node-a; his DSNs
//! arrive in his mailbox on node-b.

use std::net::SocketAddr;
use std::time::Duration;

use ds_testkit::Cluster;
use dshare_e2e::internet;
use dshare_e2e::{Submitter, eventually, python};

const BOB: &str = "bob@example.com";
const ALICE: &str = "alice@example.com";
const DAVE: &str = "dave@example.com";
const PW: &str = "b0b-secret";

async fn cluster(
    dns: SocketAddr,
    sink: SocketAddr,
    delay_warning: Duration,
) -> anyhow::Result<Cluster> {
    let c = Cluster::start_with(2, move |_, c| {
        c.smtp.retry_base = Duration::from_secs(1);
        c.smtp.retry_max = Duration::from_secs(1);
        c.smtp.delay_warning = delay_warning;
        c.outbound.dns = vec![dns];
        c.outbound.port = sink.port();
    })
    .await?;
    c.node(0).add_account(ALICE, "alice-pw").await?;
    c.node(1).add_account(BOB, PW).await?;
    c.node(1).add_account(DAVE, "dave-pw").await?;
    Ok(c)
}

/// bob submits at node-a over STARTTLS to `to` with the given MAIL and RCPT options.
fn submit(
    c: &Cluster,
    to: &[&str],
    subject: &str,
    mail_options: &[&str],
    rcpt_options: &[&str],
) -> anyhow::Result<String> {
    let bob = Submitter::new(c, 0, BOB, PW);
    let message = format!(
        "From: {BOB}\r\nTo: someone\r\nSubject: {subject}\r\n\r\nthe body text of {subject}\r\n"
    );
    bob.send(to, &message, mail_options, rcpt_options)
}

fn inbox(c: &Cluster) -> Vec<String> {
    c.node(1)
        .inbox(BOB)
        .iter()
        .map(|m| String::from_utf8_lossy(m).into_owned())
        .collect()
}

async fn wait_for_dsn(c: &Cluster, n: usize) -> anyhow::Result<Vec<String>> {
    anyhow::ensure!(
        eventually(Duration::from_secs(30), || c.node(1).inbox_len(BOB) >= n).await,
        "bob has {} messages, expected {n}; queue of a: {:?}",
        c.node(1).inbox_len(BOB),
        c.node(0).node().state.queue_listing()
    );
    Ok(inbox(c))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dsn_is_advertised_and_bad_parameters_are_refused() -> anyhow::Result<()> {
    let c = Cluster::start(1).await?;
    c.node(0).add_account(ALICE, "alice-pw").await?;
    // MX intake (port 25), with smtplib. (Submission: the tests below; relay sessions: a
    // success request relayed to dave's owner comes back as its "delivered" DSN.)
    let mx = c.node(0).smtp();
    let out = python(&format!(
        r#"
import smtplib
s = smtplib.SMTP("{ip}", {port}, timeout=30)
s.ehlo("client.test")
print("dsn", s.has_extn("dsn"))
print("ret", s.mail("x@outside.test", ["RET=BOGUS"]))
print("both", s.mail("x@outside.test", ["RET=FULL", "RET=HDRS"]))
print("envid", s.mail("x@outside.test", ["ENVID=a+0D+0Ab"]))
print("ok", s.mail("x@outside.test", ["RET=HDRS", "ENVID=q+2B1"]))
print("never+success", s.rcpt("{alice}", ["NOTIFY=NEVER,SUCCESS"]))
print("orcpt", s.rcpt("{alice}", ["ORCPT=x822;a@b"]))
print("good", s.rcpt("{alice}", ["NOTIFY=SUCCESS,DELAY", "ORCPT=rfc822;pm+2Bx@b.test"]))
s.quit()
"#,
        ip = mx.ip(),
        port = mx.port(),
        alice = ALICE,
    ))?;
    assert!(out.contains("dsn True"), "{out}");
    for bad in ["ret", "both", "envid", "never+success", "orcpt"] {
        assert!(
            out.contains(&format!("{bad} (501, b'5.5.4")),
            "{bad}: {out}"
        );
    }
    assert!(out.contains("ok (250"), "{out}");
    assert!(out.contains("good (250"), "{out}");
    c.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_ret_envid_and_orcpt_are_honoured_on_the_way_out() -> anyhow::Result<()> {
    let (dns, sink, sink_addr) = internet::start().await?;
    let c = cluster(dns, sink_addr, Duration::from_secs(3600)).await?;

    // The sink does not take DSN requests: a success request gets a "relayed" DSN from us.
    let out = submit(
        &c,
        &["x@outside.test"],
        "relayed-one",
        &["RET=HDRS", "ENVID=env+2B1"],
        &["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;X@Outside.test"],
    )?;
    assert!(out.contains("dsn offered True"), "{out}");
    assert!(out.contains("refused {}"), "{out}");
    let dsns = wait_for_dsn(&c, 1).await?;
    let d = &dsns[0];
    assert!(d.contains("Action: relayed"), "{d}");
    assert!(d.contains("Original-Envelope-Id: env+1"), "{d}");
    assert!(
        d.contains("Original-Recipient: rfc822; X@Outside.test"),
        "{d}"
    );
    assert!(d.contains("Final-Recipient: rfc822; x@outside.test"), "{d}");
    assert_eq!(sink.messages().len(), 1);
    // Without DSN at the sink nothing of it was sent there.
    assert!(
        sink.envelopes().iter().all(|l| !l.contains("NOTIFY")),
        "{:?}",
        sink.envelopes()
    );

    // A sink that takes them gets the parameters passed on, and bob gets nothing more.
    sink.set_dsn(true);
    submit(
        &c,
        &["y@outside.test"],
        "passed-on",
        &["RET=FULL", "ENVID=e2"],
        &["NOTIFY=SUCCESS", "ORCPT=rfc822;y@outside.test"],
    )?;
    assert!(eventually(Duration::from_secs(20), || sink.messages().len() == 2).await);
    let env = sink.envelopes();
    assert!(
        env.iter()
            .any(|l| l.starts_with("MAIL FROM:<bob@example.com>")
                && l.contains(" RET=FULL")
                && l.contains(" ENVID=e2")),
        "{env:?}"
    );
    assert!(
        env.iter().any(|l| l
            .starts_with("RCPT TO:<y@outside.test> NOTIFY=SUCCESS ORCPT=rfc822;y@outside.test")),
        "{env:?}"
    );

    // Failures: NOTIFY=NEVER gets no DSN; RET=HDRS returns the header section only, RET=FULL
    // the whole message; the default is a failure DSN.
    sink.set_rcpt_reply("550 5.1.1 no such user");
    submit(
        &c,
        &["never@outside.test"],
        "never-one",
        &[],
        &["NOTIFY=NEVER"],
    )?;
    submit(
        &c,
        &["delayonly@outside.test"],
        "delay-only",
        &[],
        &["NOTIFY=DELAY"],
    )?;
    submit(&c, &["hdrs@outside.test"], "hdrs-one", &["RET=HDRS"], &[])?;
    let dsns = wait_for_dsn(&c, 2).await?;
    let d = &dsns[1];
    assert!(
        d.contains("Action: failed") && d.contains("hdrs@outside.test"),
        "{d}"
    );
    assert!(d.contains("text/rfc822-headers"), "{d}");
    assert!(d.contains("Subject: hdrs-one"), "{d}");
    assert!(!d.contains("the body text of hdrs-one"), "{d}");
    submit(&c, &["full@outside.test"], "full-one", &["RET=FULL"], &[])?;
    let dsns = wait_for_dsn(&c, 3).await?;
    let d = &dsns[2];
    assert!(d.contains("message/rfc822"), "{d}");
    assert!(d.contains("the body text of full-one"), "{d}");
    // The NEVER and DELAY-only messages failed before these and were never reported.
    let all = inbox(&c);
    assert_eq!(all.len(), 3, "{all:?}");
    assert!(
        all.iter()
            .all(|m| !m.contains("never-one") && !m.contains("delay-only")),
        "{all:?}"
    );
    c.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn success_dsns_on_delivery_and_one_delay_dsn() -> anyhow::Result<()> {
    let (dns, sink, sink_addr) = internet::start().await?;
    let c = cluster(dns, sink_addr, Duration::from_secs(2)).await?;

    // alice lives on node-a (delivered where bob submitted), dave on node-b (relayed there
    // with the request passed on; node-b reports): one "delivered" DSN each.
    let out = submit(
        &c,
        &[ALICE, DAVE],
        "hello-both",
        &["ENVID=both"],
        &["NOTIFY=SUCCESS"],
    )?;
    assert!(out.contains("refused {}"), "{out}");
    let dsns = wait_for_dsn(&c, 2).await?;
    for rcpt in [ALICE, DAVE] {
        assert!(
            dsns.iter().any(|d| d.contains("Action: delivered")
                && d.contains(&format!("Final-Recipient: rfc822; {rcpt}"))
                && d.contains("Original-Envelope-Id: both")),
            "{rcpt}: {dsns:?}"
        );
    }
    assert_eq!(c.node(1).inbox_len(DAVE), 1);
    assert_eq!(c.node(0).inbox_len(ALICE), 1);

    // A message that keeps being deferred: one delay DSN after `delay_warning`, not one
    // per retry; one with NOTIFY=FAILURE only gets none.
    sink.set_rcpt_reply("451 4.3.0 try later");
    submit(&c, &["late@outside.test"], "late-one", &[], &[])?;
    submit(
        &c,
        &["quiet@outside.test"],
        "quiet-one",
        &[],
        &["NOTIFY=FAILURE"],
    )?;
    let dsns = wait_for_dsn(&c, 3).await?;
    let d = &dsns[2];
    assert!(d.contains("Action: delayed"), "{d}");
    assert!(d.contains("Status: 4.3.0"), "{d}");
    assert!(d.contains("late@outside.test"), "{d}");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let all = inbox(&c);
    assert_eq!(all.len(), 3, "a second delay DSN or one for quiet: {all:?}");
    let entries = c.node(0).node().state.queue.list()?;
    assert!(
        entries.iter().filter(|e| e.delay_warned).count() >= 1
            && entries.iter().all(|e| e.attempts >= 2),
        "{entries:?}"
    );
    c.shutdown().await;
    Ok(())
}
