//! DKIM signing (DESIGN.md §6): a key made as `dshare dkim generate` makes it, its record
//! published in "the Internet"'s DNS; bob (on node-b) submits at node-a, which signs once for
//! example.com; the message that reaches the sink verifies with mail-auth's DKIM verifier,
//! asking the same DNS server for the key.

use std::time::Duration;

use ds_testkit::Cluster;
use dshare_e2e::internet::{Sink, dns_server_with_txt};
use dshare_e2e::{Submitter, eventually};
use mail_auth::hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ResolverConfig, ResolverOpts,
};
use mail_auth::{AuthenticatedMessage, DkimResult, MessageAuthenticator};

const BOB: &str = "bob@example.com";
const PW: &str = "b0b-secret";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submitted_mail_is_signed_once_and_verifies() -> anyhow::Result<()> {
    let keys = tempfile::tempdir()?;
    let (pem, record) =
        ds_smtp::dkim::generate("example.com", "s1").map_err(|e| anyhow::anyhow!(e))?;
    let key_file = keys.path().join("example.com.pem");
    std::fs::write(&key_file, pem)?;
    // The TXT value as published: the quoted strings of the printed record, joined.
    let value: String = record
        .split_once(" IN TXT ")
        .map(|(_, v)| v.split('"').skip(1).step_by(2).collect())
        .unwrap_or_default();
    assert!(value.starts_with("v=DKIM1; k=rsa; p="), "{record}");
    let dns = dns_server_with_txt(vec![("s1._domainkey.example.com.".into(), value)]).await?;
    let sink = Sink::default();
    let sink_addr = sink.start().await?;
    let kf = key_file.clone();
    let c = Cluster::start_with(2, move |_, c| {
        c.outbound.dns = vec![dns];
        c.outbound.port = sink_addr.port();
        c.outbound.dkim = vec![ds_server::config::DkimSection {
            domain: "example.com".into(),
            selector: "s1".into(),
            key_file: kf.clone(),
        }];
    })
    .await?;
    c.node(1).add_account(BOB, PW).await?;

    let bob = Submitter::new(&c, 0, BOB, PW);
    let out = bob.send(
        &["x@outside.test"],
        "From: Bob <bob@example.com>\r\nTo: x@outside.test\r\nSubject: signed\r\n\r\nSigned  body \r\n\r\n\r\n",
        &[],
        &[],
    )?;
    assert!(out.contains("refused {}"), "{out}");
    assert!(
        eventually(Duration::from_secs(20), || !sink.messages().is_empty()).await,
        "nothing reached the sink"
    );
    let m = sink.messages()[0].clone();
    assert_eq!(m.matches("DKIM-Signature:").count(), 1, "{m}");
    assert!(m.contains("d=example.com") && m.contains("s=s1"), "{m}");

    let (mut udp, mut tcp) = (ConnectionConfig::udp(), ConnectionConfig::tcp());
    udp.port = dns.port();
    tcp.port = dns.port();
    let servers = NameServerConfig::new(dns.ip(), true, vec![udp, tcp]);
    let verifier = MessageAuthenticator::new(
        ResolverConfig::from_name_servers(vec![servers]),
        ResolverOpts::default(),
    )?;
    let parsed = AuthenticatedMessage::parse(m.as_bytes()).expect("parses");
    let results = verifier.verify_dkim(&parsed).await;
    assert_eq!(results.len(), 1, "{results:?}");
    assert_eq!(results[0].result(), &DkimResult::Pass, "{results:?}\n{m}");

    // The verifier is not a rubber stamp: a changed body fails.
    let tampered = m.replace("Signed  body", "Signed  b0dy");
    let parsed = AuthenticatedMessage::parse(tampered.as_bytes()).expect("parses");
    let results = verifier.verify_dkim(&parsed).await;
    assert!(
        matches!(
            results[0].result(),
            DkimResult::Fail(_) | DkimResult::Neutral(_)
        ),
        "{results:?}"
    );
    c.shutdown().await;
    Ok(())
}
