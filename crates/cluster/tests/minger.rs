//! Three real Minger servers on loopback over TLS, each with its own store and directory,
//! sharing `example.com`.

use std::time::{Duration, Instant};

use ds_cluster::proto::LookupRequest;
use ds_cluster::proto::minger_client::MingerClient;
use ds_cluster::{Error, Kind, Location, PeerState, Purpose};
mod common;
use common::*;

fn remote(location: Location) -> ds_cluster::Owner {
    match location {
        Location::Remote(owner) => owner,
        other => panic!("expected Remote, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_remote_and_unknown_lookups() {
    let c = Cluster::start(3, Options::default()).await;
    let (a, b, cc) = (&c.nodes[0], &c.nodes[1], &c.nodes[2]);
    a.directory
        .add_account("alice@example.com", "pw", 0)
        .unwrap();
    b.directory.add_account("bob@example.com", "pw", 0).unwrap();
    b.directory
        .add_alias("robert@example.com", "bob@example.com")
        .unwrap();
    cc.directory
        .add_account("carol@example.com", "pw", 0)
        .unwrap();
    cc.directory
        .set_enabled("carol@example.com", false)
        .unwrap();
    b.directory.add_list("team@example.com").unwrap();
    b.directory
        .add_account("hidden@private.example", "pw", 0)
        .unwrap();

    assert_eq!(
        a.locator.locate("Alice@Example.com", Purpose::Rcpt).await,
        Location::Local {
            address: "alice@example.com".into(),
            enabled: true
        }
    );

    let owner = remote(a.locator.locate("bob@example.com", Purpose::Login).await);
    assert_eq!(owner.node, "office-1");
    assert_eq!(owner.canonical, "bob@example.com");
    assert_eq!(owner.kind, Kind::Account);
    assert!(owner.can_receive);
    assert_eq!(
        (
            owner.smtp.as_str(),
            owner.pop3.as_str(),
            owner.imap.as_str()
        ),
        ("office-1.test:25", "office-1.test:110", "office-1.test:143")
    );

    // An alias on the owner: the canonical name comes back.
    let owner = remote(a.locator.locate("robert@example.com", Purpose::Rcpt).await);
    assert_eq!(
        (owner.node.as_str(), owner.canonical.as_str()),
        ("office-1", "bob@example.com")
    );

    // A disabled account is found but cannot receive (Minger status 4).
    let owner = remote(a.locator.locate("carol@example.com", Purpose::Rcpt).await);
    assert_eq!(owner.node, "office-2");
    assert!(!owner.can_receive);

    let owner = remote(a.locator.locate("team@example.com", Purpose::Rcpt).await);
    assert_eq!(owner.kind, Kind::List);
    assert_eq!(
        b.locator.locate("team@example.com", Purpose::Rcpt).await,
        Location::LocalList("team@example.com".into())
    );
    let keepers = a.locator.list_keepers("team@example.com").await;
    assert_eq!(keepers.keepers.len(), 1);
    assert_eq!(keepers.keepers[0].node, "office-1");
    assert!(keepers.unreachable.is_empty());

    assert_eq!(
        a.locator.locate("nobody@example.com", Purpose::Rcpt).await,
        Location::Unknown
    );
    assert_eq!(
        a.locator
            .locate("someone@elsewhere.org", Purpose::Rcpt)
            .await,
        Location::RemoteHost("someone@elsewhere.org".into())
    );
    assert!(matches!(
        a.locator.locate("not an address", Purpose::Rcpt).await,
        Location::Refused(_)
    ));

    // A domain that is not shared is never asked of peers.
    let before = c.lookups_served();
    assert_eq!(
        a.locator
            .locate("hidden@private.example", Purpose::Rcpt)
            .await,
        Location::Unknown
    );
    assert_eq!(c.lookups_served(), before);

    let status = a.locator.peers_status();
    assert_eq!(status.len(), 2);
    assert!(
        status
            .iter()
            .all(|s| s.state == PeerState::Up && s.last_rtt.is_some())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_peer_is_tempfail_but_cached_owner_still_resolves() {
    let mut c = Cluster::start(3, Options::default()).await;
    c.nodes[1]
        .directory
        .add_account("bob@example.com", "pw", 0)
        .unwrap();
    let a = c.nodes[0].locator.clone();
    assert_eq!(
        remote(a.locate("bob@example.com", Purpose::Rcpt).await).node,
        "office-1"
    );

    c.nodes[1].stop().await;

    // Cached: still resolves while its owner is down.
    assert_eq!(
        remote(a.locate("bob@example.com", Purpose::Rcpt).await).node,
        "office-1"
    );

    // Uncached: the stopped peer might have it, so TempFail, never Unknown, within the timeout.
    let started = Instant::now();
    let location = a.locate("nobody@example.com", Purpose::Rcpt).await;
    assert!(
        matches!(location, Location::TempFail(ref r) if r.contains("office-1")),
        "{location:?}"
    );
    assert!(
        started.elapsed() < Duration::from_millis(1000),
        "{:?}",
        started.elapsed()
    );
    let status = a.peers_status();
    let down = status.iter().find(|s| s.id == "office-1").unwrap();
    assert_eq!(down.state, PeerState::Down);
    assert!(down.last_error.is_some());

    // Back up: the lazy channel reconnects.
    c.nodes[1].restart().await;
    assert_eq!(
        a.locate("nobody@example.com", Purpose::Rcpt).await,
        Location::Unknown
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_peer_costs_at_most_the_timeout() {
    let c = Cluster::start(2, Options::default()).await;
    let (locator, _silent) = c.with_silent_peer(0, Duration::from_millis(1000)).await;
    let started = Instant::now();
    let location = locator.locate("nobody@example.com", Purpose::Rcpt).await;
    assert!(
        matches!(location, Location::TempFail(ref r) if r.contains("silent")),
        "{location:?}"
    );
    assert!(
        started.elapsed() < Duration::from_millis(1800),
        "{:?}",
        started.elapsed()
    );

    // A FOUND from a live peer wins without waiting for the silent one.
    c.nodes[0]
        .directory
        .add_account("zed@example.com", "pw", 0)
        .unwrap();
    let started = Instant::now();
    assert_eq!(
        remote(locator.locate("zed@example.com", Purpose::Rcpt).await).node,
        "office-0"
    );
    assert!(
        started.elapsed() < Duration::from_millis(800),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_secret_and_foreign_ca_are_refused() {
    let c = Cluster::start(2, Options::default()).await;
    c.nodes[1]
        .directory
        .add_account("bob@example.com", "pw", 0)
        .unwrap();

    // A raw client: no secret, then a wrong one.
    let channel = c.channel(1).await;
    let mut client = MingerClient::new(channel);
    let request = LookupRequest {
        address: "bob@example.com".into(),
        purpose: 1,
        from_node: "intruder".into(),
    };
    let status = client.lookup(request.clone()).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    assert!(status.message().is_empty());
    let mut wrong = tonic::Request::new(request.clone());
    wrong.metadata_mut().insert(
        ds_cluster::SECRET_HEADER,
        "wrong-secret-0123456789".parse().unwrap(),
    );
    let status = client.lookup(wrong).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    let mut right = tonic::Request::new(request);
    right
        .metadata_mut()
        .insert(ds_cluster::SECRET_HEADER, SECRET.parse().unwrap());
    assert!(client.lookup(right).await.unwrap().into_inner().found);
    assert_eq!(
        c.nodes[1].service.lookups_served(),
        1,
        "refused calls are not served"
    );

    // A Locator with the wrong secret: TempFail, not Unknown.
    let outsider = c.outsider(&c.pki.ca_cert_pem(), "wrong-secret-0123456789");
    let location = outsider.locate("bob@example.com", Purpose::Rcpt).await;
    assert!(
        matches!(location, Location::TempFail(ref r) if r.contains("Unauthenticated")),
        "{location:?}"
    );

    // A Locator that trusts another CA refuses the peers' certificates: TempFail.
    let other = ds_net::tls::Pki::generate("another CA");
    let outsider = c.outsider(&other.ca_cert_pem(), SECRET);
    let location = outsider.locate("bob@example.com", Purpose::Rcpt).await;
    assert!(matches!(location, Location::TempFail(_)), "{location:?}");
    assert_eq!(c.nodes[1].service.lookups_served(), 1);

    // With the right CA and secret the outsider finds bob.
    let insider = c.outsider(&c.pki.ca_cert_pem(), SECRET);
    assert_eq!(
        remote(insider.locate("bob@example.com", Purpose::Rcpt).await).node,
        "office-1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_lookups_share_one_fan_out() {
    let c = Cluster::start(3, Options::default()).await;
    c.nodes[1]
        .directory
        .add_account("bob@example.com", "pw", 0)
        .unwrap();
    let a = c.nodes[0].locator.clone();
    let lookups = (0..20).map(|_| {
        let a = a.clone();
        tokio::spawn(async move { a.locate("bob@example.com", Purpose::Rcpt).await })
    });
    for result in futures::future::join_all(lookups).await {
        assert_eq!(remote(result.unwrap()).node, "office-1");
    }
    let served = c.lookups_served();
    assert_eq!(served[1], 1, "{served:?}");
    assert!(served[2] <= 1, "{served:?}");

    // Misses are shared too while the fan-out is under way: a silent peer keeps it open
    // for the whole timeout, so all 20 callers join the first one.
    let (x, _silent) = c.with_silent_peer(1, Duration::from_millis(400)).await;
    let lookups = (0..20).map(|_| {
        let x = x.clone();
        tokio::spawn(async move { x.locate("nobody@example.com", Purpose::Rcpt).await })
    });
    for result in futures::future::join_all(lookups).await {
        assert!(matches!(result.unwrap(), Location::TempFail(_)));
    }
    assert_eq!(c.lookups_served()[1], served[1] + 1);
    // A miss is not cached: the next lookup asks again.
    x.locate("nobody@example.com", Purpose::Rcpt).await;
    assert_eq!(c.lookups_served()[1], served[1] + 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negative_cache_when_enabled() {
    let c = Cluster::start(
        2,
        Options {
            negative_ttl: Duration::from_secs(3600),
            ..Options::default()
        },
    )
    .await;
    let a = &c.nodes[0].locator;
    assert_eq!(
        a.locate("new@example.com", Purpose::Rcpt).await,
        Location::Unknown
    );
    assert_eq!(
        a.locate("new@example.com", Purpose::Rcpt).await,
        Location::Unknown
    );
    assert_eq!(c.nodes[1].service.lookups_served(), 1);
    // Creating it through the guard releases the reservation everywhere, which drops the
    // negative entry on the peers.
    c.nodes[1]
        .locator
        .create_account("new@example.com", "pw", false, 0)
        .await
        .unwrap();
    assert_eq!(
        remote(a.locate("new@example.com", Purpose::Rcpt).await).node,
        "office-1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidate_clears_the_cache_on_other_nodes() {
    let c = Cluster::start(3, Options::default()).await;
    let (a, b, cc) = (&c.nodes[0], &c.nodes[1], &c.nodes[2]);
    b.directory
        .add_account("mover@example.com", "pw", 0)
        .unwrap();
    assert_eq!(
        remote(a.locator.locate("mover@example.com", Purpose::Rcpt).await).node,
        "office-1"
    );
    assert!(a.locator.cached("mover@example.com").await.is_some());

    // The account moves from office-1 to office-2.
    b.directory.delete_account("mover@example.com").unwrap();
    cc.directory
        .add_account("mover@example.com", "pw", 0)
        .unwrap();
    // Still cached on office-0 until invalidated.
    assert_eq!(
        remote(a.locator.locate("mover@example.com", Purpose::Rcpt).await).node,
        "office-1"
    );
    b.locator.invalidate_everywhere("mover@example.com").await;
    assert!(a.locator.cached("mover@example.com").await.is_none());
    assert_eq!(
        remote(a.locator.locate("mover@example.com", Purpose::Rcpt).await).node,
        "office-2"
    );

    // relocate() = forget + locate, for a cached owner that turned out wrong.
    cc.directory.delete_account("mover@example.com").unwrap();
    b.directory
        .add_account("mover@example.com", "pw", 0)
        .unwrap();
    assert_eq!(
        remote(a.locator.relocate("mover@example.com", Purpose::Rcpt).await).node,
        "office-1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creation_race_yields_exactly_one_account() {
    let c = Cluster::start(3, Options::default()).await;
    for round in 0..4 {
        let name = format!("race{round}@example.com");
        let (r0, r1, r2) = tokio::join!(
            c.nodes[0].locator.create_account(&name, "pw", false, 0),
            c.nodes[1].locator.create_account(&name, "pw", false, 0),
            c.nodes[2].locator.create_account(&name, "pw", false, 0),
        );
        let results = [r0, r1, r2];
        let ok = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(ok, 1, "round {round}: {results:?}");
        for r in &results {
            if let Err(e) = r {
                assert!(matches!(e, Error::Exists { .. }), "{e:?}");
            }
        }
        let existing = c
            .nodes
            .iter()
            .filter(|n| n.directory.account(&name).unwrap().is_some())
            .count();
        assert_eq!(existing, 1, "round {round}");
    }

    // Taken on a peer: refused with the peer's name; taken locally: refused too.
    let err = c.nodes[0]
        .locator
        .create_account("race0@example.com", "pw", false, 0)
        .await;
    assert!(matches!(err, Err(Error::Exists { .. })), "{err:?}");
    let owner = c
        .nodes
        .iter()
        .find(|n| n.directory.account("race0@example.com").unwrap().is_some())
        .unwrap();
    let err = owner
        .locator
        .create_account("race0@example.com", "pw", false, 0)
        .await;
    assert!(
        matches!(err, Err(Error::Exists { ref peer, .. }) if *peer == owner.id),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creation_with_a_peer_down_needs_force() {
    let mut c = Cluster::start(3, Options::default()).await;
    c.nodes[2].stop().await;
    let a = c.nodes[0].locator.clone();
    let err = a.create_account("new@example.com", "pw", false, 0).await;
    assert!(
        matches!(err, Err(Error::Unavailable { ref peer, .. }) if peer == "office-2"),
        "{err:?}"
    );
    assert!(
        c.nodes[0]
            .directory
            .account("new@example.com")
            .unwrap()
            .is_none()
    );
    // The refused attempt left no reservation behind: office-1 may create it.
    let account = c.nodes[1]
        .locator
        .create_account("new@example.com", "pw", true, 0)
        .await
        .unwrap();
    assert_eq!(account.address, "new@example.com");
    // A domain that is not shared needs no peer at all.
    a.create_account("solo@private.example", "pw", false, 0)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_service_reports_serving() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let c = Cluster::start(1, Options::default()).await;
    let channel = c.channel(0).await;
    let mut health = HealthClient::new(channel);
    let reply = health
        .check(HealthCheckRequest {
            service: "dshare.minger.v1.Minger".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.status(), ServingStatus::Serving);
}
