//! Outbound delivery (DESIGN.md §6): "the Internet" is a DNS server and an SMTP sink on
//! loopback. A user of node-b submits at node-a over 587 STARTTLS; node-a looks up the MX of
//! `outside.test` (our DNS server), resolves the MX host and delivers to the sink. A sink
//! answering 451 gets the message after a retry; one answering 550 makes the sender's DSN
//! arrive in its mailbox on node-b; and a message from an outside sender that expires in the
//! queue bounces to the sink through the same outbound path.

use std::net::SocketAddr;
use std::time::Duration;

use ds_testkit::Cluster;
use dshare_e2e::internet::{Sink, dns_server};
use dshare_e2e::{Smtp, Submitter, eventually, message};

const BOB: &str = "bob@example.com";
const PW: &str = "b0b-secret";

async fn cluster(dns: SocketAddr, sink: SocketAddr) -> anyhow::Result<Cluster> {
    let c = Cluster::start_with(2, move |_, c| {
        c.smtp.retry_base = Duration::from_secs(1);
        c.smtp.retry_max = Duration::from_secs(1);
        c.outbound.dns = vec![dns];
        c.outbound.port = sink.port();
    })
    .await?;
    c.node(1).add_account(BOB, PW).await?;
    Ok(c)
}

/// bob (on node-b) submits at node-a over STARTTLS to `to`.
fn submit(c: &Cluster, to: &str, subject: &str) -> anyhow::Result<String> {
    let bob = Submitter::new(c, 0, BOB, PW);
    let message = format!(
        "From: {BOB}\r\nTo: {to}\r\nSubject: {subject}\r\n\r\n.leading dot\r\nout into the world\r\n"
    );
    bob.send(&[to], &message, &[], &[])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submitted_mail_reaches_the_mx_of_its_domain() -> anyhow::Result<()> {
    let dns = dns_server().await?;
    let sink = Sink::default();
    let sink_addr = sink.start().await?;
    let c = cluster(dns, sink_addr).await?;
    let out = submit(&c, "x@outside.test", "hello out there")?;
    assert!(out.contains("refused {}"), "{out}");
    assert!(
        eventually(Duration::from_secs(20), || !sink.messages().is_empty()).await,
        "nothing reached the sink; queue: {:?}",
        c.node(0).node().state.queue_listing()
    );
    let m = &sink.messages()[0];
    assert!(m.contains("Subject: hello out there"), "{m}");
    assert!(
        m.contains("\r\n.leading dot\r\nout into the world\r\n"),
        "{m}"
    );
    assert!(m.contains("with ESMTPSA"), "{m}");
    assert!(
        eventually(Duration::from_secs(10), || c
            .node(0)
            .node()
            .state
            .queue
            .is_empty())
        .await,
        "delivered entry left in the queue"
    );
    c.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deferred_then_delivered_and_refused_then_bounced() -> anyhow::Result<()> {
    let dns = dns_server().await?;
    let sink = Sink::default();
    let sink_addr = sink.start().await?;
    let c = cluster(dns, sink_addr).await?;
    // 451: kept queued and retried; then the sink takes it.
    sink.set_rcpt_reply("451 4.3.0 try later");
    let out = submit(&c, "later@outside.test", "deferred")?;
    assert!(out.contains("refused {}"), "{out}");
    let state = &c.node(0).node().state;
    assert!(
        eventually(Duration::from_secs(20), || {
            state
                .queue
                .list()
                .unwrap_or_default()
                .iter()
                .any(|e| e.last_error.as_deref().is_some_and(|x| x.contains("451")))
        })
        .await,
        "no deferral recorded: {:?}",
        state.queue_listing()
    );
    assert!(sink.messages().is_empty());
    sink.set_rcpt_reply("250 2.1.5 OK");
    assert!(
        eventually(Duration::from_secs(20), || sink.messages().len() == 1).await,
        "not delivered after the retry: {:?}",
        state.queue_listing()
    );
    assert!(sink.messages()[0].contains("Subject: deferred"));

    // 550: the sender (on node-b) gets a DSN in its mailbox.
    sink.set_rcpt_reply("550 5.1.1 no such user");
    let out = submit(&c, "nobody@outside.test", "refused")?;
    assert!(out.contains("refused {}"), "{out}");
    assert!(
        eventually(Duration::from_secs(30), || c.node(1).inbox_len(BOB) == 1).await,
        "no DSN for bob: queue of a {:?}",
        state.queue_listing()
    );
    let dsn = String::from_utf8_lossy(&c.node(1).inbox(BOB)[0]).into_owned();
    assert!(dsn.contains("nobody@outside.test"), "{dsn}");
    assert!(dsn.contains("550 5.1.1"), "{dsn}");
    assert_eq!(sink.messages().len(), 1);
    c.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outside_senders_expired_message_bounces_to_the_sink() -> anyhow::Result<()> {
    let dns = dns_server().await?;
    let sink = Sink::default();
    let sink_addr = sink.start().await?;
    let mut c = Cluster::start_with(2, move |_, c| {
        c.smtp.retry_base = Duration::from_secs(1);
        c.smtp.retry_max = Duration::from_secs(1);
        c.smtp.max_queue_age = Duration::from_secs(3);
        c.outbound.dns = vec![dns];
        c.outbound.port = sink_addr.port();
    })
    .await?;
    c.node(1).add_account(BOB, PW).await?;
    // node-a learns that bob lives on node-b, then node-b stops: bob's mail waits at node-a.
    let loc = c
        .node(0)
        .node()
        .state
        .locator
        .locate(BOB, ds_cluster::Purpose::Rcpt)
        .await;
    anyhow::ensure!(matches!(loc, ds_cluster::Location::Remote(_)), "{loc:?}");
    c.node_mut(1).stop().await;
    let mut s = Smtp::connect(c.node(0).smtp()).await?;
    let r = s
        .send(
            "someone@outside.test",
            &[BOB],
            &message("never-arrives", 512),
        )
        .await?;
    assert!(r.iter().all(|r| r.is(250)), "{r:?}");
    s.quit().await?;
    assert!(
        eventually(Duration::from_secs(30), || sink.messages().iter().any(
            |m| m.contains("bob@example.com") && m.contains("never-arrives")
        ))
        .await,
        "no DSN reached the sink: {:?}; queue {:?}",
        sink.messages(),
        c.node(0).node().state.queue_listing()
    );
    c.shutdown().await;
    Ok(())
}
