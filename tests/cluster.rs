//! Three real nodes on 127.0.0.1–3 sharing example.com: lookups, caches, temporary
//! failures, the creation guard and invalidation (DESIGN.md §4, §5).

use std::time::{Duration, Instant};

use ds_cluster::{Location, Purpose};
use ds_testkit::Cluster;

fn remote_node(loc: &Location) -> Option<&str> {
    match loc {
        Location::Remote(o) => Some(o.node.as_str()),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_remote_unknown_and_tempfail() -> anyhow::Result<()> {
    let mut c = Cluster::start(3).await?;
    c.node(0)
        .add_account("alice@example.com", "pw-alice")
        .await?;
    c.node(1).add_account("bob@example.com", "pw-bob").await?;
    c.node(2)
        .add_account("carol@example.com", "pw-carol")
        .await?;
    let a = &c.node(0).node().state.locator;

    assert!(matches!(
        a.locate("Alice@Example.com", Purpose::Rcpt).await,
        Location::Local { ref address, enabled: true } if address == "alice@example.com"
    ));
    let bob = a.locate("bob@example.com", Purpose::Rcpt).await;
    assert_eq!(remote_node(&bob), Some("node-b"), "{bob:?}");
    let Location::Remote(owner) = &bob else {
        unreachable!()
    };
    assert_eq!(owner.smtp, c.node(1).smtp().to_string());
    assert_eq!(owner.pop3, c.node(1).pop3().to_string());
    assert_eq!(
        a.locate("nobody@example.com", Purpose::Rcpt).await,
        Location::Unknown
    );

    // bob is cached on node-a; stop both owners.
    c.node_mut(1).stop().await;
    c.node_mut(2).stop().await;
    let a = &c.node(0).node().state.locator;
    let started = Instant::now();
    let carol = a.locate("carol@example.com", Purpose::Rcpt).await;
    assert!(matches!(carol, Location::TempFail(_)), "{carol:?}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    // An unknown address is a temporary failure too while peers cannot be asked …
    assert!(matches!(
        a.locate("stranger@example.com", Purpose::Rcpt).await,
        Location::TempFail(_)
    ));
    // … unless every peer said "no" a moment ago (the short negative cache).
    assert_eq!(
        a.locate("nobody@example.com", Purpose::Rcpt).await,
        Location::Unknown
    );
    // The cached owner still resolves.
    assert_eq!(
        remote_node(&a.locate("bob@example.com", Purpose::Rcpt).await),
        Some("node-b")
    );
    let report = c.node(0).node().state.peers_report().join("\n");
    assert!(
        report.contains("node-c") && report.contains("down"),
        "{report}"
    );

    // Back up: the uncached address resolves again.
    c.node_mut(2).restart().await?;
    let a = &c.node(0).node().state.locator;
    assert_eq!(
        remote_node(&a.locate("carol@example.com", Purpose::Rcpt).await),
        Some("node-c")
    );
    c.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creation_guard_race_and_unreachable_peer() -> anyhow::Result<()> {
    let mut c = Cluster::start(3).await?;
    for round in 0..3 {
        let name = format!("race{round}@example.com");
        let (r0, r1, r2) = tokio::join!(
            c.node(0).add_account(&name, "pw"),
            c.node(1).add_account(&name, "pw"),
            c.node(2).add_account(&name, "pw"),
        );
        let ok = [r0.is_ok(), r1.is_ok(), r2.is_ok()];
        assert_eq!(
            ok.iter().filter(|x| **x).count(),
            1,
            "round {round}: {ok:?}"
        );
        let owners = c
            .nodes
            .iter()
            .filter(|n| n.node().state.directory.account(&name).unwrap().is_some())
            .count();
        assert_eq!(owners, 1);
    }
    // An address a peer has cannot be created elsewhere.
    c.node(1).add_account("taken@example.com", "pw").await?;
    let e = c
        .node(0)
        .add_account("taken@example.com", "pw")
        .await
        .unwrap_err();
    assert!(e.to_string().contains("taken@example.com"), "{e}");

    // A stopped peer makes creation fail with a temporary error, unless forced.
    c.node_mut(2).stop().await;
    let st = c
        .node(0)
        .node()
        .state
        .create_account("lonely@example.com", "pw", false)
        .await
        .unwrap_err();
    assert_eq!(st.code(), tonic::Code::Unavailable, "{st:?}");
    assert!(
        c.node(0)
            .node()
            .state
            .directory
            .account("lonely@example.com")?
            .is_none()
    );
    c.node(0)
        .node()
        .state
        .create_account("lonely@example.com", "pw", true)
        .await
        .expect("forced creation");
    c.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_an_account_invalidates_peer_caches() -> anyhow::Result<()> {
    let c = Cluster::start(3).await?;
    c.node(1).add_account("bob@example.com", "pw").await?;
    for i in [0, 2] {
        let l = &c.node(i).node().state.locator;
        assert_eq!(
            remote_node(&l.locate("bob@example.com", Purpose::Rcpt).await),
            Some("node-b")
        );
        assert!(l.cached("bob@example.com").await.is_some());
    }
    let b = &c.node(1).node().state;
    b.mail
        .deliver("bob@example.com", b"Subject: old\r\n\r\nold mail\r\n")?;
    b.delete_account("bob@example.com").await?;
    // The mailboxes went with the account: a new bob starts empty.
    c.node(1).add_account("bob@example.com", "pw2").await?;
    assert!(b.mail.messages("bob@example.com", "INBOX")?.is_empty());
    b.delete_account("bob@example.com").await?;
    for i in [0, 2] {
        let l = &c.node(i).node().state.locator;
        assert!(
            l.cached("bob@example.com").await.is_none(),
            "node {i} still caches bob"
        );
        assert_eq!(
            l.locate("bob@example.com", Purpose::Rcpt).await,
            Location::Unknown
        );
    }
    c.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_the_wrong_secret_learns_nothing() -> anyhow::Result<()> {
    let c = Cluster::start_with(3, |i, cfg| {
        if i == 2 {
            let p = cfg.node.data_dir.join("other.secret");
            std::fs::write(&p, "a-completely-different-secret").unwrap();
            cfg.cluster.secret_file = Some(p);
        }
    })
    .await?;
    // node-c cannot be asked (it is refused), so creating needs --force.
    assert!(
        c.node(0)
            .add_account("alice@example.com", "pw")
            .await
            .is_err()
    );
    c.node(0)
        .node()
        .state
        .create_account("alice@example.com", "pw", true)
        .await
        .expect("forced creation");
    let intruder = &c.node(2).node().state.locator;
    let loc = intruder.locate("alice@example.com", Purpose::Rcpt).await;
    assert!(matches!(loc, Location::TempFail(_)), "{loc:?}");
    // And the honest nodes cannot use it either: node-b sees a failure, not an answer.
    let b = &c.node(1).node().state.locator;
    assert_eq!(
        remote_node(&b.locate("alice@example.com", Purpose::Rcpt).await),
        Some("node-a")
    );
    let loc = b.locate("ghost@example.com", Purpose::Rcpt).await;
    assert!(matches!(loc, Location::TempFail(_)), "{loc:?}");
    c.shutdown().await;
    Ok(())
}

/// DESIGN.md §5: the Minger credential is a key derived from the secret for that purpose
/// alone; a caller that has only the raw secret (or the relay or session key) is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minger_takes_the_derived_key_not_the_raw_secret() -> anyhow::Result<()> {
    use ds_cluster::proto::{LookupRequest, minger_client::MingerClient};
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

    let c = Cluster::start(2).await?;
    c.node(0).add_account("alice@example.com", "pw").await?;
    let ca = std::fs::read(c.node(0).config.tls.cluster_ca.as_ref().unwrap())?;
    let addr = c.node(0).minger();
    let channel = Endpoint::from_shared(format!("https://{addr}"))?
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca))
                .domain_name(addr.ip().to_string()),
        )?
        .connect()
        .await?;
    let keys = ds_server::ClusterKeys::derive(ds_testkit::TEST_SECRET);
    let lookup = |credential: String| {
        let mut client = MingerClient::new(channel.clone());
        async move {
            let mut req = tonic::Request::new(LookupRequest {
                address: "alice@example.com".into(),
                purpose: 1,
                from_node: "node-b".into(),
            });
            req.metadata_mut()
                .insert(ds_cluster::SECRET_HEADER, credential.parse().unwrap());
            client.lookup(req).await
        }
    };
    for wrong in [
        ds_testkit::TEST_SECRET.to_string(),
        keys.relay.clone(),
        keys.session.clone(),
    ] {
        let e = lookup(wrong).await.expect_err("refused");
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
    }
    let reply = lookup(keys.minger.clone()).await?.into_inner();
    assert!(reply.found);
    assert_eq!(reply.owner, "node-a");
    // And the nodes themselves, which derive the same keys, keep finding each other.
    let b = &c.node(1).node().state.locator;
    assert_eq!(
        remote_node(&b.locate("alice@example.com", Purpose::Rcpt).await),
        Some("node-a")
    );
    c.shutdown().await;
    Ok(())
}

/// Issue 13 point 12: `account enable` drops peers' cached "cannot receive" as disable does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enabling_an_account_invalidates_peer_caches() -> anyhow::Result<()> {
    let c = Cluster::start(2).await?;
    c.node(1).add_account("bob@example.com", "pw").await?;
    let b = &c.node(1).node().state;
    b.set_enabled("bob@example.com", false).await?;
    let a = &c.node(0).node().state.locator;
    let loc = a.locate("bob@example.com", Purpose::Rcpt).await;
    assert!(
        matches!(&loc, Location::Remote(o) if !o.can_receive),
        "{loc:?}"
    );
    assert!(a.cached("bob@example.com").await.is_some());
    b.set_enabled("bob@example.com", true).await?;
    assert!(
        a.cached("bob@example.com").await.is_none(),
        "node-a still caches the disabled bob"
    );
    let loc = a.locate("bob@example.com", Purpose::Rcpt).await;
    assert!(
        matches!(&loc, Location::Remote(o) if o.can_receive),
        "{loc:?}"
    );
    c.shutdown().await;
    Ok(())
}

/// Issue 13 point 14: aliases and lists go through the creation guard, so an address is an
/// account, an alias or a list on one node only (lists of one name may be shared).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aliases_and_lists_are_created_under_the_guard() -> anyhow::Result<()> {
    let c = Cluster::start(2).await?;
    let (a, b) = (&c.node(0).node().state, &c.node(1).node().state);
    c.node(0).add_account("alice@example.com", "pw").await?;
    c.node(1).add_account("sales@example.com", "pw").await?;
    // An alias on A cannot take the name of B's account …
    let e = a
        .create_alias("sales@example.com", "alice@example.com", false)
        .await
        .expect_err("sales is an account on node-b");
    assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e:?}");
    assert!(a.directory.taken_as("sales@example.com")?.is_none());
    // … nor can a list.
    let e = a
        .create_list("sales@example.com", false)
        .await
        .expect_err("sales is an account on node-b");
    assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e:?}");
    // A free alias works, and then B cannot create an account, alias or list under it.
    a.create_alias("info@example.com", "alice@example.com", false)
        .await?;
    assert!(
        c.node(1)
            .add_account("info@example.com", "pw")
            .await
            .is_err()
    );
    let e = b
        .create_alias("info@example.com", "sales@example.com", false)
        .await
        .expect_err("info is an alias on node-a");
    assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e:?}");
    let e = b.create_list("info@example.com", false).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e:?}");
    // Lists of one name on several nodes are list sharing: allowed; an alias of that name is not.
    a.create_list("team@example.com", false).await?;
    b.create_list("team@example.com", false).await?;
    let e = b
        .create_alias("team@example.com", "sales@example.com", false)
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e:?}");
    c.shutdown().await;
    Ok(())
}

/// A Minger client for node `i` with the cluster's derived credential, as a peer would call.
async fn minger_client(
    c: &Cluster,
    i: usize,
) -> anyhow::Result<(
    ds_cluster::proto::minger_client::MingerClient<tonic::transport::Channel>,
    tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
)> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
    let ca = std::fs::read(c.node(i).config.tls.cluster_ca.as_ref().unwrap())?;
    let addr = c.node(i).minger();
    let channel = Endpoint::from_shared(format!("https://{addr}"))?
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca))
                .domain_name(addr.ip().to_string()),
        )?
        .connect()
        .await?;
    let key = ds_server::ClusterKeys::derive(ds_testkit::TEST_SECRET).minger;
    Ok((
        ds_cluster::proto::minger_client::MingerClient::new(channel),
        key.parse()?,
    ))
}

/// Issue 13 point 6: the negative cache is on by default and safe: a `Reserve` drops the
/// entry, and nothing negative is cached while a reservation lives, so an address that is
/// being created is never hidden.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negative_cache_never_hides_an_address_being_created() -> anyhow::Result<()> {
    let c = Cluster::start(2).await?;
    let a = &c.node(0).node().state.locator;
    let b = &c.node(1).node().state;
    // The cache is on: an address made behind the guard's back stays hidden for a while.
    assert_eq!(
        a.locate("ghost@example.com", Purpose::Rcpt).await,
        Location::Unknown
    );
    b.directory.add_account("ghost@example.com", "pw", 0)?;
    assert_eq!(
        a.locate("ghost@example.com", Purpose::Rcpt).await,
        Location::Unknown,
        "negative cache expected on by default"
    );
    // Through the guard: node-a learns "new" is unknown, then node-b reserves it on node-a.
    assert_eq!(
        a.locate("new@example.com", Purpose::Rcpt).await,
        Location::Unknown
    );
    let (mut minger, key) = minger_client(&c, 0).await?;
    let mut req = tonic::Request::new(ds_cluster::proto::ReserveRequest {
        address: "new@example.com".into(),
        from_node: "node-b".into(),
        ttl_seconds: 60,
    });
    req.metadata_mut().insert(ds_cluster::SECRET_HEADER, key);
    assert!(minger.reserve(req).await?.into_inner().granted);
    // While it is reserved, a lookup (node-b does not have it yet) caches nothing …
    assert_eq!(
        a.locate("new@example.com", Purpose::Rcpt).await,
        Location::Unknown
    );
    // … so once node-b has it (even if its Release never arrives), node-a finds it.
    b.directory.add_account("new@example.com", "pw", 0)?;
    assert_eq!(
        remote_node(&a.locate("new@example.com", Purpose::Rcpt).await),
        Some("node-b")
    );
    // And the whole guard: node-a caches "later" as unknown, node-b creates it.
    assert_eq!(
        a.locate("later@example.com", Purpose::Rcpt).await,
        Location::Unknown
    );
    c.node(1).add_account("later@example.com", "pw").await?;
    assert_eq!(
        remote_node(&a.locate("later@example.com", Purpose::Rcpt).await),
        Some("node-b")
    );
    c.shutdown().await;
    Ok(())
}

/// Issue 13 point 6: a client connection may cause only so many uncached fan-outs; then its
/// lookups are TempFail (451), while local addresses and cached owners still answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uncached_fanouts_are_bounded_per_connection() -> anyhow::Result<()> {
    let c = Cluster::start_with(2, |_, cfg| cfg.cluster.fanouts_per_connection = 2).await?;
    c.node(0).add_account("alice@example.com", "pw").await?;
    c.node(1).add_account("bob@example.com", "pw").await?;
    let a = &c.node(0).node().state.locator;
    let budget = a.fanout_budget();
    assert_eq!(budget.remaining(), 2);
    let bob = a
        .locate_bounded("bob@example.com", Purpose::Rcpt, &budget)
        .await;
    assert_eq!(remote_node(&bob), Some("node-b"));
    assert_eq!(
        a.locate_bounded("nobody1@example.com", Purpose::Rcpt, &budget)
            .await,
        Location::Unknown
    );
    assert_eq!(budget.remaining(), 0);
    let over = a
        .locate_bounded("nobody2@example.com", Purpose::Rcpt, &budget)
        .await;
    assert!(matches!(over, Location::TempFail(_)), "{over:?}");
    // Cache hits and local accounts cost nothing.
    let bob = a
        .locate_bounded("bob@example.com", Purpose::Rcpt, &budget)
        .await;
    assert_eq!(remote_node(&bob), Some("node-b"));
    let nobody = a
        .locate_bounded("nobody1@example.com", Purpose::Rcpt, &budget)
        .await;
    assert_eq!(nobody, Location::Unknown, "negative cache hit");
    assert!(matches!(
        a.locate_bounded("alice@example.com", Purpose::Rcpt, &budget)
            .await,
        Location::Local { .. }
    ));
    // A new connection gets a new budget.
    let fresh = a.fanout_budget();
    assert_eq!(
        a.locate_bounded("nobody2@example.com", Purpose::Rcpt, &fresh)
            .await,
        Location::Unknown
    );
    c.shutdown().await;
    Ok(())
}

/// Issue 13 point 11: on a node-to-node relay hop, a recipient whose lookup is TempFail gets
/// 451 4.4.3 (the sender keeps it queued), not 550 5.1.1 (a bounce).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_hop_gets_451_for_a_tempfail_lookup() -> anyhow::Result<()> {
    let mut c = Cluster::start(3).await?;
    c.node(0).add_account("alice@example.com", "pw").await?;
    c.node_mut(2).stop().await;
    let smtp = c.node(0).smtp();
    let relay_key = ds_server::ClusterKeys::derive(ds_testkit::TEST_SECRET).relay;
    let script = format!(
        r#"
import smtplib, ssl, base64
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
s = smtplib.SMTP("{ip}", {port}, timeout=30)
s.ehlo("node-b.test"); s.starttls(context=ctx); s.ehlo("node-b.test")
token = base64.b64encode(b"\x00dshare-peer/node-b\x00{relay_key}").decode()
print(s.docmd("AUTH", "PLAIN " + token)[0])
print(s.docmd("MAIL", "FROM:<bob@example.com>")[0])
print(s.docmd("RCPT", "TO:<alice@example.com>")[0])
code, text = s.docmd("RCPT", "TO:<somebody@example.com>")
print(code, text.decode())
s.quit()
"#,
        ip = smtp.ip(),
        port = smtp.port(),
    );
    let out = tokio::task::spawn_blocking(move || dshare_e2e::python(&script)).await??;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(&lines[..3], ["235", "250", "250"], "{out}");
    assert!(lines[3].starts_with("451 4.4.3"), "{out}");
    c.shutdown().await;
    Ok(())
}
