//! Outbound transport (DESIGN.md §6, issue 10): how node-a's sessions to "the Internet" (a DNS
//! server and SMTP sinks on loopback, tests/internet.rs) are secured, authenticated and capped.
//!
//! - The MX offers STARTTLS: the message arrives over TLS (unverified, RFC 7435); a broken
//!   handshake is retried once in plain text; `outbound.tls = "encrypt"` defers without it.
//! - `outbound.relayhost`: everything goes to the relay host, over TLS verified against
//!   `relayhost_ca`, authenticated with AUTH PLAIN; a wrong password or an unverified relay
//!   host defers the message (and the credential is not sent without verification).
//! - `outbound.max_per_destination`: a slow sink never sees more sessions than the cap.

use std::net::SocketAddr;
use std::time::Duration;

use ds_server::config::Config;
use ds_testkit::Cluster;
use dshare_e2e::eventually;
use dshare_e2e::internet::{Sink, dns_server, queue_error, submit};

const BOB: (&str, &str) = ("bob@example.com", "b0b-secret");

/// `n` nodes delivering outbound through `dns` to port `port`; bob lives on the last node.
async fn cluster(
    n: usize,
    dns: SocketAddr,
    port: u16,
    tweak: impl Fn(usize, &mut Config),
) -> anyhow::Result<Cluster> {
    let c = Cluster::start_with(n, move |i, c| {
        c.smtp.retry_base = Duration::from_secs(1);
        c.smtp.retry_max = Duration::from_secs(1);
        c.outbound.dns = vec![dns];
        c.outbound.port = port;
        tweak(i, c);
    })
    .await?;
    c.node(n - 1).add_account(BOB.0, BOB.1).await?;
    Ok(c)
}

/// A certificate for the sink (`mx.outside.test`, 127.0.0.1) from a test CA: (CA, cert, key).
fn sink_cert() -> (ds_net::tls::Pki, Vec<u8>, Vec<u8>) {
    let pki = ds_net::tls::Pki::generate("sink test CA");
    let (cert, key) = pki.issue(&["mx.outside.test"], &["127.0.0.1".parse().unwrap()]);
    (pki, cert, key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_is_used_when_the_mx_offers_it() -> anyhow::Result<()> {
    let dns = dns_server().await?;
    let (_pki, cert, key) = sink_cert();
    let sink = Sink::default().with_starttls(&cert, &key)?;
    let port = sink.start().await?.port();
    let c = cluster(2, dns, port, |_, _| {}).await?;
    submit(&c, 0, BOB, "x@outside.test", "over tls", 1)?;
    assert!(
        eventually(Duration::from_secs(20), || !sink.received().is_empty()).await,
        "nothing reached the sink: {:?}",
        c.node(0).node().state.queue_listing()
    );
    let got = &sink.received()[0];
    assert!(got.tls, "the message came in plain text");
    assert!(got.message.contains("Subject: over tls"), "{}", got.message);
    c.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_handshake_is_retried_in_plain_text_and_encrypt_defers() -> anyhow::Result<()> {
    let dns = dns_server().await?;
    let broken = Sink::default().with_broken_starttls();
    let broken_port = broken.start().await?.port();
    let plain = Sink::default();
    let plain_port = plain.start().await?.port();
    // node-a: tls = may towards the broken sink; node-b: tls = encrypt towards a plain sink.
    let c = cluster(2, dns, broken_port, move |i, c| {
        if i == 1 {
            c.outbound.tls = "encrypt".into();
            c.outbound.port = plain_port;
        }
    })
    .await?;
    c.node(0).add_account("carol@example.com", "c4rol").await?;
    submit(
        &c,
        0,
        ("carol@example.com", "c4rol"),
        "x@outside.test",
        "fallback",
        1,
    )?;
    assert!(
        eventually(Duration::from_secs(20), || !broken.received().is_empty()).await,
        "no plain-text retry reached the sink: {:?}",
        c.node(0).node().state.queue_listing()
    );
    assert!(!broken.received()[0].tls);

    submit(&c, 1, BOB, "y@outside.test", "must be encrypted", 1)?;
    assert!(
        eventually(Duration::from_secs(20), || queue_error(&c, 1, "STARTTLS")
            .is_some())
        .await,
        "no deferral for the missing STARTTLS: {:?}",
        c.node(1).node().state.queue_listing()
    );
    assert!(plain.received().is_empty(), "sent without TLS");
    c.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_host_gets_everything_with_auth_over_verified_tls() -> anyhow::Result<()> {
    let dns = dns_server().await?;
    let (pki, cert, key) = sink_cert();
    let relay = Sink::default()
        .with_starttls(&cert, &key)?
        .with_auth("relay-user", "relay-pw");
    let relayhost = relay.start().await?;
    let files = tempfile::tempdir()?;
    let ca = pki.write_ca(files.path())?;
    let right = files.path().join("right.pw");
    std::fs::write(&right, "relay-pw\n")?;
    let wrong = files.path().join("wrong.pw");
    std::fs::write(&wrong, "not-it\n")?;
    // node-a: the right password; node-b: a wrong one; node-c: the right one, but the relay
    // host is checked against the system's roots (which do not know the test CA).
    let c = cluster(3, dns, 1, move |i, c| {
        c.outbound.relayhost = Some(relayhost.to_string());
        c.outbound.relayhost_user = Some("relay-user".into());
        c.outbound.relayhost_password_file =
            Some(if i == 1 { wrong.clone() } else { right.clone() });
        c.outbound.relayhost_ca = (i != 2).then(|| ca.clone());
    })
    .await?;
    c.node(0).add_account("carol@example.com", "c4rol").await?;
    c.node(1).add_account("dave@example.com", "d4ve").await?;
    // nowhere.test has no MX (NXDOMAIN): only the relay host can take it.
    submit(
        &c,
        0,
        ("carol@example.com", "c4rol"),
        "x@nowhere.test",
        "via relay",
        1,
    )?;
    assert!(
        eventually(Duration::from_secs(20), || !relay.received().is_empty()).await,
        "nothing reached the relay host: {:?}",
        c.node(0).node().state.queue_listing()
    );
    let got = &relay.received()[0];
    assert!(got.tls, "relayed in plain text");
    assert_eq!(got.user.as_deref(), Some("relay-user"));
    assert!(
        got.message.contains("Subject: via relay"),
        "{}",
        got.message
    );

    submit(
        &c,
        1,
        ("dave@example.com", "d4ve"),
        "y@nowhere.test",
        "bad pw",
        1,
    )?;
    assert!(
        eventually(Duration::from_secs(20), || queue_error(&c, 1, "535")
            .is_some())
        .await,
        "no deferral for the wrong password: {:?}",
        c.node(1).node().state.queue_listing()
    );

    submit(&c, 2, BOB, "z@nowhere.test", "unverified", 1)?;
    assert!(
        eventually(Duration::from_secs(20), || queue_error(
            &c,
            2,
            "verified TLS"
        )
        .is_some())
        .await,
        "no deferral for the unverified relay host: {:?}",
        c.node(2).node().state.queue_listing()
    );
    assert_eq!(relay.received().len(), 1, "{:?}", relay.received());
    c.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_destination_never_gets_more_sessions_than_the_cap() -> anyhow::Result<()> {
    let dns = dns_server().await?;
    let sink = Sink::default().with_delay(Duration::from_secs(1));
    let port = sink.start().await?.port();
    let c = cluster(1, dns, port, |_, c| c.outbound.max_per_destination = 2).await?;
    submit(&c, 0, BOB, "x@outside.test", "capped", 10)?;
    assert!(
        eventually(Duration::from_secs(30), || sink.received().len() == 10).await,
        "{} of 10 arrived: {:?}",
        sink.received().len(),
        c.node(0).node().state.queue_listing()
    );
    // Delivered in parallel, but never more than the cap.
    assert_eq!(sink.max_sessions(), 2);
    c.shutdown().await;
    Ok(())
}

/// A destination whose only MX host accepts connections and hangs up at once (before any
/// greeting): after the first message found it unreachable, the other messages queued for it
/// wait out the back-off (`smtp.retry_base`) without a connection each, as Postfix leaves a
/// dead destination alone; once it passes, the destination is tried again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_destination_is_left_alone_for_a_while() -> anyhow::Result<()> {
    let dns = dns_server().await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let connections = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = std::sync::Arc::clone(&connections);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            drop(stream);
        }
    });
    let seen = || connections.load(std::sync::atomic::Ordering::SeqCst);
    let c = cluster(1, dns, port, |_, c| {
        c.smtp.retry_base = Duration::from_secs(6);
        c.smtp.retry_max = Duration::from_secs(6);
    })
    .await?;
    submit(&c, 0, BOB, "x@outside.test", "first", 1)?;
    assert!(eventually(Duration::from_secs(10), || seen() >= 1).await);
    let first = seen();
    assert!(
        eventually(Duration::from_secs(5), || queue_error(&c, 0, "closed")
            .is_some())
        .await,
        "{:?}",
        c.node(0).node().state.queue_listing()
    );
    // Three more for the same destination, at once: deferred without connecting.
    submit(&c, 0, BOB, "y@outside.test", "more", 3)?;
    assert!(
        eventually(Duration::from_secs(3), || {
            queue_error(&c, 0, "unreachable moments ago").is_some()
        })
        .await,
        "{:?}",
        c.node(0).node().state.queue_listing()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        seen(),
        first,
        "messages for a dead destination still connected"
    );
    // The back-off passes: the destination is tried again.
    assert!(eventually(Duration::from_secs(15), || seen() > first).await);
    c.shutdown().await;
    Ok(())
}
