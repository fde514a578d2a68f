//! POP3 forwarding between two real nodes: each has its own store, directory, POP3 server, Minger
//! server and cluster Locator; `company.com` is shared. Node A (front) has alice, node B (owner)
//! has bob (alias robert). The POP3 hop uses STLS against a test CA and a signed XCLIENT.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use ds_access::{BoxFuture, ListKeeper, Locate, Location, Owner, ProofKey, Purpose};
use ds_cluster::{ClusterConfig, Endpoints, Locator, PeerConfig, serve_minger};
use ds_net::tls::{Pki, client_config_with_ca};
use ds_pop3::xclient;
use ds_store::mailbox::INBOX;
use tokio::net::TcpListener;

const MSG1: &[u8] = b"Subject: one\r\n\r\nhello\r\n.leading dot\r\n";
const MSG2: &[u8] = b"Subject: two\r\n\r\nbare\nlf\n";
const MSG3: &[u8] = b"Subject: three\r\n\r\n3\r\n";

struct Pair {
    a: Node,
    b: Node,
    a_pop3: SocketAddr,
    b_pop3: SocketAddr,
    b_locator: Locator,
}

async fn minger(node: &Node, locator: &Locator, listener: TcpListener) {
    let stop = node.trigger.subscribe();
    node_spawn(serve_minger(
        listener,
        locator.minger_service(),
        None,
        stop.wait(),
    ));
}

fn node_spawn(f: impl std::future::Future<Output = ds_cluster::Result<()>> + Send + 'static) {
    tokio::spawn(async move {
        if let Err(e) = f.await {
            eprintln!("minger: {e}");
        }
    });
}

fn cluster_config(
    id: &str,
    pop3: SocketAddr,
    peer: &str,
    peer_minger: SocketAddr,
) -> ClusterConfig {
    let mut config = ClusterConfig::new(
        id,
        Endpoints {
            smtp: "127.0.0.1:9".into(),
            pop3: pop3.to_string(),
            imap: "127.0.0.1:9".into(),
        },
        SECRET,
    );
    config.lookup_timeout = Duration::from_secs(2);
    config.peers = vec![PeerConfig {
        id: peer.into(),
        minger_url: format!("http://{peer_minger}"),
        smtp: None,
    }];
    config
}

impl Pair {
    async fn start() -> Pair {
        let pki = Pki::generate("cluster CA");
        let (cert, key) = pki.issue(&["localhost"], &[ip("127.0.0.1")]);
        let peer_tls = client_config_with_ca(&pki.ca_cert_pem()).unwrap();

        let pop3_a = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let pop3_b = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let minger_a = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let minger_b = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (a_pop3, b_pop3) = (pop3_a.local_addr().unwrap(), pop3_b.local_addr().unwrap());
        let (a_minger, b_minger) = (
            minger_a.local_addr().unwrap(),
            minger_b.local_addr().unwrap(),
        );

        let parts_a = Parts::temporary();
        parts_a.account("alice@company.com");
        parts_a.deliver("alice@company.com", b"Subject: alice\r\n\r\nhi\r\n");
        let parts_b = Parts::temporary();
        parts_b.account("bob@company.com");
        parts_b
            .directory
            .add_alias("robert@company.com", "bob@company.com")
            .unwrap();
        for m in [MSG1, MSG2, MSG3] {
            parts_b.deliver("bob@company.com", m);
        }

        let locator_a = Locator::new(
            cluster_config("office-a", a_pop3, "office-b", b_minger),
            parts_a.directory.clone(),
            &parts_a.store,
        )
        .unwrap();
        let locator_b = Locator::new(
            cluster_config("office-b", b_pop3, "office-a", a_minger),
            parts_b.directory.clone(),
            &parts_b.store,
        )
        .unwrap();

        let mut a = parts_a.node(
            test_config("office-a"),
            Arc::new(locator_a.clone()),
            Some(tls_acceptor(&cert, &key)),
            Some(peer_tls.clone()),
        );
        let mut b = parts_b.node(
            test_config("office-b"),
            Arc::new(locator_b.clone()),
            Some(tls_acceptor(&cert, &key)),
            Some(peer_tls),
        );
        minger(&a, &locator_a, minger_a).await;
        minger(&b, &locator_b, minger_b).await;
        a.serve(pop3_a, None);
        b.serve(pop3_b, None);
        Pair {
            a,
            b,
            a_pop3,
            b_pop3,
            b_locator: locator_b,
        }
    }

    async fn stop(self) {
        self.a.stop().await;
        self.b.stop().await;
    }
}

/// Everything a client can read from a maildrop, without changing it.
async fn read_all(addr: SocketAddr, user: &str) -> Vec<String> {
    let mut c = Client::connect(addr).await;
    let ok = c.login(user, PASSWORD).await;
    assert!(ok.starts_with("+OK bob@company.com has 3 messages"), "{ok}");
    let mut seen = vec![ok, c.cmd("STAT").await];
    for command in [
        "LIST", "UIDL", "RETR 1", "RETR 2", "RETR 3", "TOP 1 0", "TOP 2 1",
    ] {
        let (status, body) = c.multi_cmd(command).await;
        seen.push(status);
        seen.push(String::from_utf8(body).unwrap());
    }
    seen.push(c.cmd("RETR 4").await);
    assert!(c.cmd("QUIT").await.starts_with("+OK"));
    assert!(c.closed().await);
    seen
}

#[tokio::test]
async fn forwarded_session_equals_direct() {
    let pair = Pair::start().await;
    let direct = read_all(pair.b_pop3, "bob").await;
    let forwarded = read_all(pair.a_pop3, "bob").await;
    assert_eq!(forwarded, direct);
    // By alias, and as a full name with %.
    assert_eq!(read_all(pair.a_pop3, "robert").await, direct);
    assert_eq!(read_all(pair.a_pop3, "bob%company.com").await, direct);

    // Deleting through the front node deletes on the owner, at QUIT.
    let mut c = Client::connect(pair.a_pop3).await;
    assert!(c.login("bob", PASSWORD).await.starts_with("+OK"));
    // The session runs on the owner: its maildrop lock is held there.
    assert!(pair.b.pop3.locks().is_locked("bob@company.com"));
    assert!(!pair.a.pop3.locks().is_locked("bob@company.com"));
    let mut direct_client = Client::connect(pair.b_pop3).await;
    assert_eq!(
        direct_client.login("bob", PASSWORD).await,
        "-ERR [IN-USE] Maildrop already locked by another session"
    );
    assert_eq!(c.cmd("DELE 2").await, "+OK message 2 deleted");
    assert_eq!(
        pair.b
            .mail
            .messages("bob@company.com", INBOX)
            .unwrap()
            .len(),
        3
    );
    assert!(c.cmd("QUIT").await.starts_with("+OK"));
    assert!(c.closed().await);
    let left: Vec<u32> = pair
        .b
        .mail
        .messages("bob@company.com", INBOX)
        .unwrap()
        .iter()
        .map(|m| m.uid)
        .collect();
    assert_eq!(left, vec![1, 3]);

    // A dropped forwarded connection deletes nothing.
    let mut c = Client::connect(pair.a_pop3).await;
    assert!(c.login("bob", PASSWORD).await.starts_with("+OK"));
    assert_eq!(c.cmd("DELE 1").await, "+OK message 1 deleted");
    drop(c);
    for _ in 0..200 {
        if !pair.b.pop3.locks().is_locked("bob@company.com") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        pair.b
            .mail
            .messages("bob@company.com", INBOX)
            .unwrap()
            .len(),
        2
    );
    // A's own account is still served locally.
    let mut c = Client::connect(pair.a_pop3).await;
    assert!(
        c.login("alice", PASSWORD)
            .await
            .starts_with("+OK alice@company.com has 1")
    );
    pair.stop().await;
}

#[tokio::test]
async fn forwarded_sasl_plain_and_pipelining() {
    let pair = Pair::start().await;
    let initial = ds_pop3::protocol::encode_plain("robert", PASSWORD);
    let mut c = Client::connect(pair.a_pop3).await;
    // Pipelined: the STAT behind the login goes to the owner with the session.
    c.send(&format!("AUTH PLAIN {initial}\r\nSTAT\r\nUIDL 1\r\n"))
        .await;
    let ok = c.line().await;
    assert!(ok.starts_with("+OK bob@company.com has 3 messages"), "{ok}");
    // Sizes as RETR sends them: MSG2's bare LFs count as CRLF.
    let total: u64 = [MSG1, MSG2, MSG3]
        .iter()
        .map(|m| ds_store::body::LineEnds::of(m))
        .sum();
    assert_eq!(total, (MSG1.len() + MSG2.len() + MSG3.len() + 2) as u64);
    assert_eq!(c.line().await, format!("+OK 3 {total}"));
    assert!(c.line().await.starts_with("+OK 1 "));
    c.cmd("QUIT").await;

    let mut c = Client::connect(pair.a_pop3).await;
    c.send("USER bob\r\nPASS secret\r\nSTAT\r\nQUIT\r\n").await;
    assert_eq!(c.line().await, "+OK send PASS");
    assert!(c.line().await.starts_with("+OK bob@company.com"));
    assert_eq!(c.line().await, format!("+OK 3 {total}"));
    assert!(c.line().await.starts_with("+OK"));
    assert!(c.closed().await);
    pair.stop().await;
}

#[tokio::test]
async fn failures_through_the_front_look_like_direct_ones() {
    let pair = Pair::start().await;
    let mut direct = Client::connect(pair.b_pop3).await;
    let mut front = Client::connect(pair.a_pop3).await;
    assert_eq!(direct.login("bob", "wrong").await, AUTH_FAILED);
    assert_eq!(front.login("bob", "wrong").await, AUTH_FAILED);
    // Unknown in the whole cluster, and unknown domain.
    assert_eq!(front.login("nobody", PASSWORD).await, AUTH_FAILED);
    drop(front);
    let mut front = Client::connect(pair.a_pop3).await;
    assert_eq!(front.login("bob@example.org", PASSWORD).await, AUTH_FAILED);
    // The session is still usable after a forwarded failure.
    assert!(
        front
            .login("bob", PASSWORD)
            .await
            .starts_with("+OK bob@company.com")
    );
    pair.stop().await;
}

/// XCLIENT at the owner: a bad signature is refused; a good one marks the session forwarded, and a
/// forwarded login for an account the owner does not have is refused, never forwarded again.
#[tokio::test]
async fn xclient_is_checked_and_forwarded_logins_are_not_forwarded_again() {
    let pair = Pair::start().await;
    let mut c = Client::connect(pair.b_pop3).await;
    let bad = format!(
        "XCLIENT ADDR=203.0.113.9 PORT=51234 HOP=office-a SIG={}",
        "0".repeat(64)
    );
    assert_eq!(c.cmd(&bad).await, "-ERR XCLIENT refused");
    // Signed for another connection's greeting: refused too.
    let key = ProofKey::from_cluster_secret(SECRET);
    let stolen = xclient::command_line(
        &key,
        "<0.0@office-b.test>",
        ip("203.0.113.9"),
        51234,
        "office-a",
    );
    assert_eq!(c.cmd(stolen.trim_end()).await, "-ERR XCLIENT refused");
    // Signed with the wrong secret: refused.
    drop(c);

    let (mut c, greeting) = connect_with_greeting(pair.b_pop3).await;
    let stamp = ds_pop3::protocol::greeting_timestamp(greeting.as_bytes())
        .unwrap()
        .to_owned();
    let wrong = xclient::command_line(
        &ProofKey::from_cluster_secret("some-other-secret-0123456789"),
        &stamp,
        ip("203.0.113.9"),
        51234,
        "office-a",
    );
    assert_eq!(c.cmd(wrong.trim_end()).await, "-ERR XCLIENT refused");
    let good = xclient::command_line(&key, &stamp, ip("203.0.113.9"), 51234, "office-a");
    assert_eq!(c.cmd(good.trim_end()).await, "+OK XDSRESET");
    assert_eq!(c.cmd(good.trim_end()).await, "-ERR XCLIENT not valid now");
    // alice lives on A: B must not forward back.
    let refused = c.login("alice", PASSWORD).await;
    assert!(refused.starts_with("-ERR [AUTH] "), "{refused}");
    let refused = c.login("nobody", PASSWORD).await;
    assert!(refused.starts_with("-ERR [AUTH] "), "{refused}");
    // Its own accounts work.
    assert!(
        c.login("bob", PASSWORD)
            .await
            .starts_with("+OK bob@company.com")
    );
    pair.stop().await;
}

async fn connect_with_greeting(addr: SocketAddr) -> (Client<tokio::net::TcpStream>, String) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut c = Client::new(tcp);
    let greeting = c.line().await;
    (c, greeting)
}

/// A locator that always gives the same answer.
struct Fixed(Location);

impl Locate for Fixed {
    fn locate<'a>(&'a self, _address: &'a str, _purpose: Purpose) -> BoxFuture<'a, Location> {
        let answer = self.0.clone();
        Box::pin(async move { answer })
    }
    fn relocate<'a>(&'a self, address: &'a str, purpose: Purpose) -> BoxFuture<'a, Location> {
        self.locate(address, purpose)
    }
    fn list_keepers<'a>(&'a self, _list: &'a str) -> BoxFuture<'a, Vec<ListKeeper>> {
        Box::pin(async { Vec::new() })
    }
}

/// bob's owner: `office-b`, serving POP3 at `pop3`.
fn owner_at(node: &str, canonical: &str, pop3: &str) -> Location {
    Location::Remote(Owner {
        node: node.into(),
        canonical: canonical.into(),
        is_list: false,
        can_receive: true,
        smtp: String::new(),
        pop3: pop3.into(),
        imap: String::new(),
    })
}

#[tokio::test]
async fn owner_unreachable_or_tempfail_is_sys_temp() {
    // A port nobody listens on.
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    for answer in [
        owner_at("office-z", "zed@company.com", &closed.to_string()),
        Location::TempFail("peer down".into()),
    ] {
        let parts = Parts::temporary();
        let mut node = parts.node(test_config("a"), Arc::new(Fixed(answer)), None, None);
        let addr = node.listen("127.0.0.1", None).await;
        let mut c = Client::connect(addr).await;
        let reply = c.login("zed", PASSWORD).await;
        assert!(reply.starts_with("-ERR [SYS/TEMP] "), "{reply}");
        node.stop().await;
    }

    // The real Locator with the owner's Minger gone: TempFail for an address not cached yet.
    let pair = Pair::start().await;
    let Pair { a, b, a_pop3, .. } = pair;
    b.stop().await;
    let mut c = Client::connect(a_pop3).await;
    let reply = c.login("bob", PASSWORD).await;
    assert!(reply.starts_with("-ERR [SYS/TEMP] "), "{reply}");
    a.stop().await;
}

/// A stale cache: A believes carol is on B; B answers "not here"; A locates again, once.
#[tokio::test]
async fn stale_owner_is_located_again_once() {
    let pair = Pair::start().await;
    // Prime A's cache with bob → B, then move bob away from B (deleted there).
    let mut c = Client::connect(pair.a_pop3).await;
    assert!(c.login("bob", PASSWORD).await.starts_with("+OK"));
    c.cmd("QUIT").await;
    pair.b.directory.delete_account("bob@company.com").unwrap();
    let _ = &pair.b_locator;
    let mut c = Client::connect(pair.a_pop3).await;
    assert_eq!(c.login("bob", PASSWORD).await, AUTH_FAILED);
    pair.stop().await;
}

/// Shutting the front node down ends a forwarded session at once (the owner's side sees the close
/// and drops the maildrop lock), rather than leaving it spliced until the idle timeout or the
/// drain's grace period.
#[tokio::test]
async fn shutdown_ends_a_forwarded_session() {
    let parts_b = Parts::temporary();
    parts_b.account("bob@company.com");
    parts_b.deliver("bob@company.com", MSG1);
    let pki = Pki::generate("cluster CA");
    let (cert, key) = pki.issue(&["localhost"], &[ip("127.0.0.1")]);
    let peer_tls = client_config_with_ca(&pki.ca_cert_pem()).unwrap();
    let mut b = parts_b.node(
        test_config("office-b"),
        Arc::new(ds_access::NoPeers),
        Some(tls_acceptor(&cert, &key)),
        None,
    );
    let b_pop3 = b.listen("127.0.0.1", None).await;
    let owner = owner_at("office-b", "bob@company.com", &b_pop3.to_string());
    let a = Parts::temporary().node(
        test_config("office-a"),
        Arc::new(Fixed(owner)),
        None,
        Some(peer_tls),
    );

    // The front's connection handler, driven by hand with a shutdown signal of our own.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let front = listener.local_addr().unwrap();
    let (trigger, shutdown) = ds_net::shutdown_pair();
    let pop3 = Arc::clone(&a.pop3);
    let handler = tokio::spawn(async move {
        let (tcp, peer) = listener.accept().await.unwrap();
        let ctx = ds_net::ConnContext {
            peer,
            local: tcp.local_addr().unwrap(),
            sni: None,
            tls: false,
            protocol: "pop3",
            ip_slot: ds_net::IpSlot::default(),
        };
        pop3.handle(ds_net::MailStream::Plain(tcp), ctx, shutdown)
            .await;
    });

    let mut c = Client::connect(front).await;
    let ok = c.login("bob", PASSWORD).await;
    assert!(ok.starts_with("+OK bob@company.com has 1 messages"), "{ok}");
    assert_eq!(c.cmd("STAT").await, format!("+OK 1 {}", MSG1.len()));
    assert!(b.pop3.locks().is_locked("bob@company.com"));

    trigger.trigger();
    tokio::time::timeout(Duration::from_secs(5), handler)
        .await
        .expect("the forwarded session ends on shutdown")
        .unwrap();
    assert!(c.closed().await);
    for _ in 0..100 {
        if !b.pop3.locks().is_locked("bob@company.com") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!b.pop3.locks().is_locked("bob@company.com"));
    // Nothing was deleted, and the owner serves bob again.
    assert_eq!(b.mail.messages("bob@company.com", INBOX).unwrap().len(), 1);
    b.stop().await;
}

/// #13 point 2: without cluster TLS the password is never forwarded: `-ERR [SYS/TEMP]`, and the
/// owner never sees a connection.
#[tokio::test]
async fn no_forwarded_password_without_verified_tls() {
    let owner_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let owner_addr = owner_listener.local_addr().unwrap();
    let owner = owner_at("office-b", "bob@company.com", &owner_addr.to_string());
    let mut a =
        Parts::temporary().node(test_config("office-a"), Arc::new(Fixed(owner)), None, None);
    let addr = a.listen("127.0.0.1", None).await;
    let mut c = Client::connect(addr).await;
    let reply = c.login("bob", PASSWORD).await;
    assert!(reply.starts_with("-ERR [SYS/TEMP] "), "{reply}");
    let accepted = tokio::time::timeout(Duration::from_millis(300), owner_listener.accept()).await;
    assert!(accepted.is_err(), "the owner was contacted without TLS");
    a.stop().await;
}
