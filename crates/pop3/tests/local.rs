//! The POP3 server for local accounts, over real sockets: RFC 1939 sessions, UPDATE semantics,
//! UIDL stability, IN-USE, failed logins, SASL PLAIN, STLS, multihoming, poplib and curl.

mod common;

use std::sync::Arc;

use common::*;
use ds_access::NoPeers;
use ds_net::tls::{Pki, client_config_with_ca};
use ds_store::Store;
use ds_store::mailbox::INBOX;
use rustls_pki_types::ServerName;
use tokio_rustls::TlsConnector;

const MSG1: &[u8] =
    b"Subject: one\r\nFrom: a@example.net\r\n\r\nfirst line\r\n.dot line\r\n..two dots\r\nlast\r\n";
const MSG2: &[u8] = b"Subject: two\nFrom: b@example.net\n\nbare lf\n.\nend";
const MSG3: &[u8] = b"Subject: three\r\n\r\nl1\r\nl2\r\nl3\r\n";

fn company() -> Parts {
    let parts = Parts::temporary();
    parts.account("info@company.com");
    parts.account("info@client1.com");
    parts.account("info@client2.com");
    parts
}

async fn node_with(parts: Parts) -> (Node, std::net::SocketAddr) {
    let mut node = parts.node(test_config("a"), Arc::new(NoPeers), None, None);
    let addr = node.listen("127.0.0.1", None).await;
    (node, addr)
}

#[tokio::test]
async fn rfc1939_session_with_update_at_quit() {
    let parts = company();
    parts.deliver("info@company.com", MSG1);
    parts.deliver("info@company.com", MSG2);
    parts.deliver("info@company.com", MSG3);
    let (node, addr) = node_with(parts).await;

    let mut c = Client::connect(addr).await;
    assert_eq!(c.cmd("STAT").await, "-ERR command not valid in this state");
    assert_eq!(c.cmd("PASS x").await, "-ERR send USER first");
    let ok = c.login("info", PASSWORD).await;
    assert!(
        ok.starts_with("+OK info@company.com has 3 messages"),
        "{ok}"
    );

    // Sizes as RETR sends them (before byte-stuffing): MSG2's bare LFs count as CRLF and its
    // last line gets one.
    let sizes = [MSG1.len(), MSG2.len() + 7, MSG3.len()];
    let total: usize = sizes.iter().sum();
    assert_eq!(c.cmd("STAT").await, format!("+OK 3 {total}"));
    let (status, body) = c.multi_cmd("LIST").await;
    assert!(status.starts_with("+OK 3 messages"), "{status}");
    assert_eq!(
        lines(&body),
        vec![
            format!("1 {}", sizes[0]),
            format!("2 {}", sizes[1]),
            format!("3 {}", sizes[2])
        ]
    );
    assert_eq!(c.cmd("LIST 2").await, format!("+OK 2 {}", sizes[1]));
    assert_eq!(c.cmd("LIST 4").await, "-ERR no such message");
    assert_eq!(c.cmd("LIST 0").await, "-ERR invalid number");

    // RETR: byte-stuffed, CRLF everywhere.
    let (status, body) = c.multi_cmd("RETR 1").await;
    assert_eq!(status, format!("+OK {} octets", sizes[0]));
    assert_eq!(
        body,
        b"Subject: one\r\nFrom: a@example.net\r\n\r\nfirst line\r\n..dot line\r\n...two dots\r\nlast\r\n"
    );
    let (status, body) = c.multi_cmd("RETR 2").await;
    assert_eq!(
        body,
        b"Subject: two\r\nFrom: b@example.net\r\n\r\nbare lf\r\n..\r\nend\r\n"
    );
    // What LIST said is what RETR sent (one stuffed period aside).
    assert_eq!(status, format!("+OK {} octets", sizes[1]));
    assert_eq!(body.len() - 1, sizes[1]);
    // TOP.
    let (status, body) = c.multi_cmd("TOP 3 1").await;
    assert!(status.starts_with("+OK"), "{status}");
    assert_eq!(body, b"Subject: three\r\n\r\nl1\r\n");
    let (_, body) = c.multi_cmd("TOP 1 0").await;
    assert_eq!(body, b"Subject: one\r\nFrom: a@example.net\r\n\r\n");

    // UIDL: <uidvalidity>.<uid>.
    let uidvalidity = node
        .mail
        .mailbox("info@company.com", INBOX)
        .unwrap()
        .unwrap()
        .uidvalidity;
    let (_, body) = c.multi_cmd("UIDL").await;
    assert_eq!(
        lines(&body),
        (1..=3)
            .map(|n| format!("{n} {uidvalidity}.{n}"))
            .collect::<Vec<_>>()
    );
    assert_eq!(c.cmd("UIDL 2").await, format!("+OK 2 {uidvalidity}.2"));

    // DELE, RSET, DELE again.
    assert_eq!(c.cmd("DELE 1").await, "+OK message 1 deleted");
    assert_eq!(c.cmd("DELE 1").await, "-ERR message already deleted");
    assert_eq!(c.cmd("RETR 1").await, "-ERR message already deleted");
    assert_eq!(
        c.cmd("STAT").await,
        format!("+OK 2 {}", sizes[1] + sizes[2])
    );
    let (_, body) = c.multi_cmd("LIST").await;
    assert_eq!(lines(&body).len(), 2);
    assert!(
        c.cmd("RSET")
            .await
            .starts_with("+OK maildrop has 3 messages")
    );
    assert_eq!(c.cmd("DELE 1").await, "+OK message 1 deleted");
    assert_eq!(c.cmd("DELE 3").await, "+OK message 3 deleted");
    assert_eq!(c.cmd("NOOP").await, "+OK");
    // Nothing is removed before QUIT.
    assert_eq!(
        node.mail.messages("info@company.com", INBOX).unwrap().len(),
        3
    );
    let bye = c.cmd("QUIT").await;
    assert!(
        bye.starts_with("+OK") && bye.contains("1 messages left"),
        "{bye}"
    );
    assert!(c.closed().await);
    let left: Vec<u32> = node
        .mail
        .messages("info@company.com", INBOX)
        .unwrap()
        .iter()
        .map(|m| m.uid)
        .collect();
    assert_eq!(left, vec![2]);

    // The next session sees message 2 as number 1 with the same unique id.
    let mut c = Client::connect(addr).await;
    assert!(c.login("info", PASSWORD).await.contains("has 1 messages"));
    assert_eq!(c.cmd("UIDL 1").await, format!("+OK 1 {uidvalidity}.2"));
    assert_eq!(c.cmd("QUIT").await.get(..3), Some("+OK"));
    node.stop().await;
}

#[tokio::test]
async fn dropped_connection_deletes_nothing() {
    let parts = company();
    parts.deliver("info@company.com", MSG1);
    parts.deliver("info@company.com", MSG3);
    let (node, addr) = node_with(parts).await;
    let mut c = Client::connect(addr).await;
    assert!(c.login("info", PASSWORD).await.starts_with("+OK"));
    assert_eq!(c.cmd("DELE 1").await, "+OK message 1 deleted");
    assert_eq!(c.cmd("DELE 2").await, "+OK message 2 deleted");
    drop(c);
    // The lock goes with the session; then the mail is all there.
    for _ in 0..100 {
        if !node.pop3.locks().is_locked("info@company.com") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(!node.pop3.locks().is_locked("info@company.com"));
    assert_eq!(
        node.mail.messages("info@company.com", INBOX).unwrap().len(),
        2
    );
    let mut c = Client::connect(addr).await;
    assert!(c.login("info", PASSWORD).await.contains("has 2 messages"));
    node.stop().await;
}

#[tokio::test]
async fn uidl_is_stable_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let first = {
        let parts = Parts::with_store(Store::open(dir.path()).unwrap());
        parts.account("info@company.com");
        parts.deliver("info@company.com", MSG1);
        parts.deliver("info@company.com", MSG3);
        parts.store.flush().unwrap();
        let (node, addr) = node_with(parts).await;
        let mut c = Client::connect(addr).await;
        c.login("info", PASSWORD).await;
        let (_, body) = c.multi_cmd("UIDL").await;
        c.cmd("QUIT").await;
        node.stop().await;
        lines(&body)
    };
    // Everything above is dropped: the database is closed. Reopen it.
    let parts = Parts::with_store(Store::open(dir.path()).unwrap());
    let (node, addr) = node_with(parts).await;
    let mut c = Client::connect(addr).await;
    c.login("info", PASSWORD).await;
    let (_, body) = c.multi_cmd("UIDL").await;
    assert_eq!(lines(&body), first);
    assert_eq!(first.len(), 2);
    node.stop().await;
}

#[tokio::test]
async fn second_session_gets_in_use() {
    let parts = company();
    parts.deliver("info@company.com", MSG1);
    let (node, addr) = node_with(parts).await;
    let mut a = Client::connect(addr).await;
    assert!(a.login("info", PASSWORD).await.starts_with("+OK"));
    let mut b = Client::connect(addr).await;
    assert_eq!(
        b.login("info@company.com", PASSWORD).await,
        "-ERR [IN-USE] Maildrop already locked by another session"
    );
    // Another account is not affected.
    let mut other = Client::connect(addr).await;
    assert!(
        other
            .login("info%client1.com", PASSWORD)
            .await
            .starts_with("+OK")
    );
    assert!(a.cmd("QUIT").await.starts_with("+OK"));
    assert!(a.closed().await);
    assert!(b.login("info", PASSWORD).await.starts_with("+OK"));
    node.stop().await;
}

#[tokio::test]
async fn bad_password_and_unknown_user_look_the_same() {
    let parts = company();
    parts.directory.add_list("staff@company.com").unwrap();
    parts.account("off@company.com");
    parts
        .directory
        .set_enabled("off@company.com", false)
        .unwrap();
    let (node, addr) = node_with(parts).await;
    let mut c = Client::connect(addr).await;
    // Wrong password, unknown user, a list, a disabled account, a foreign domain: one reply.
    assert_eq!(c.cmd("USER info").await, "+OK send PASS");
    assert_eq!(c.cmd("PASS wrong").await, AUTH_FAILED);
    assert_eq!(c.cmd("USER nobody").await, "+OK send PASS");
    assert_eq!(c.cmd("PASS secret").await, AUTH_FAILED);
    // The third failure closes the session.
    assert_eq!(c.login("staff", PASSWORD).await, AUTH_FAILED);
    assert!(c.closed().await);

    let mut c = Client::connect(addr).await;
    assert_eq!(c.login("off", PASSWORD).await, AUTH_FAILED);
    assert_eq!(c.login("someone@example.org", PASSWORD).await, AUTH_FAILED);
    drop(c);
    let mut c = Client::connect(addr).await;
    assert_eq!(
        c.cmd("APOP info 0123456789abcdef0123456789abcdef")
            .await
            .get(..4),
        Some("-ERR")
    );
    assert!(c.login("info", PASSWORD).await.starts_with("+OK"));
    node.stop().await;
}

#[tokio::test]
async fn capa_and_garbage() {
    let (node, addr) = node_with(company()).await;
    let mut c = Client::connect(addr).await;
    let (status, body) = c.multi_cmd("CAPA").await;
    assert_eq!(status, "+OK Capability list follows");
    let capa = lines(&body);
    for want in [
        "TOP",
        "UIDL",
        "USER",
        "RESP-CODES",
        "AUTH-RESP-CODE",
        "SASL PLAIN",
        "PIPELINING",
        "EXPIRE NEVER",
        "IMPLEMENTATION dshare",
    ] {
        assert!(
            capa.contains(&want.to_owned()),
            "{want} missing from {capa:?}"
        );
    }
    // No TLS acceptor: no STLS.
    assert!(!capa.contains(&"STLS".to_owned()));
    assert_eq!(c.cmd("STLS").await, "-ERR STLS not available");
    assert_eq!(c.cmd("FOO bar").await, "-ERR unknown command");
    assert_eq!(
        c.cmd(&format!("USER {}", "x".repeat(300))).await,
        "-ERR argument too long"
    );
    assert_eq!(c.cmd(&"y".repeat(2000)).await, "-ERR line too long");
    assert_eq!(
        c.cmd("RETR 1").await,
        "-ERR command not valid in this state"
    );
    assert_eq!(c.cmd("RETR 99999999999").await, "-ERR invalid number");
    // Still usable; PIPELINING: three commands in one write.
    c.send("USER info\r\nPASS secret\r\nSTAT\r\n").await;
    assert_eq!(c.line().await, "+OK send PASS");
    assert!(c.line().await.starts_with("+OK info@company.com"));
    assert_eq!(c.line().await, "+OK 0 0");
    assert_eq!(c.cmd("RETR 99999999999").await, "-ERR invalid number");
    assert_eq!(c.cmd("RETR -1").await, "-ERR invalid number");
    let (_, body) = c.multi_cmd("CAPA").await;
    assert!(!lines(&body).contains(&"USER".to_owned()));
    node.stop().await;
}

#[tokio::test]
async fn sasl_plain() {
    let parts = company();
    parts.deliver("info@client2.com", MSG3);
    let (node, addr) = node_with(parts).await;
    let plain = |authz: &str, user: &str, pass: &str| {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(format!("{authz}\0{user}\0{pass}"))
    };
    let mut c = Client::connect(addr).await;
    let (status, body) = c.multi_cmd("AUTH").await;
    assert!(status.starts_with("+OK"));
    assert_eq!(lines(&body), vec!["PLAIN"]);
    assert_eq!(
        c.cmd("AUTH CRAM-MD5").await,
        "-ERR unsupported SASL mechanism"
    );
    // Continuation, cancelled.
    assert_eq!(c.cmd("AUTH PLAIN").await, "+ ");
    assert_eq!(c.cmd("*").await, "-ERR authentication cancelled");
    // Bad password, with an initial response.
    assert_eq!(
        c.cmd(&format!("AUTH PLAIN {}", plain("", "info", "nope")))
            .await,
        AUTH_FAILED
    );
    // Continuation, good credentials.
    assert_eq!(c.cmd("AUTH PLAIN").await, "+ ");
    let ok = c.cmd(&plain("", "info%client2.com", PASSWORD)).await;
    assert!(
        ok.starts_with("+OK info@client2.com has 1 messages"),
        "{ok}"
    );
    c.cmd("QUIT").await;

    let mut c = Client::connect(addr).await;
    // An authorization identity other than the user is refused.
    assert_eq!(
        c.cmd(&format!(
            "AUTH PLAIN {}",
            plain("info@client1.com", "info", PASSWORD)
        ))
        .await,
        AUTH_FAILED
    );
    assert_eq!(c.cmd("AUTH PLAIN !!!!").await, "-ERR invalid base64");
    let ok = c
        .cmd(&format!("AUTH PLAIN {}", plain("info", "info", PASSWORD)))
        .await;
    assert!(ok.starts_with("+OK info@company.com"), "{ok}");
    node.stop().await;
}

async fn tls_connect(
    tcp: tokio::net::TcpStream,
    ca: &[u8],
    name: &str,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let connector = TlsConnector::from(client_config_with_ca(ca).unwrap());
    connector
        .connect(ServerName::try_from(name.to_owned()).unwrap(), tcp)
        .await
        .unwrap()
}

#[tokio::test]
async fn stls() {
    let pki = Pki::generate("test CA");
    let (cert, key) = pki.issue(&["localhost", "mail.client2.com"], &[ip("127.0.0.1")]);
    let parts = company();
    parts.deliver("info@client2.com", MSG1);
    let mut node = parts.node(
        test_config("a"),
        Arc::new(NoPeers),
        Some(tls_acceptor(&cert, &key)),
        None,
    );
    let addr = node.listen("127.0.0.1", None).await;

    let mut c = Client::connect(addr).await;
    let (_, body) = c.multi_cmd("CAPA").await;
    assert!(lines(&body).contains(&"STLS".to_owned()));
    assert_eq!(c.cmd("USER info").await, "+OK send PASS");
    assert_eq!(c.cmd("STLS").await, "+OK Begin TLS negotiation");
    assert!(c.stream.buffer().is_empty());
    let tcp = c.stream.into_inner();
    // SNI picks the domain after STLS too.
    let mut c = Client::new(tls_connect(tcp, &pki.ca_cert_pem(), "mail.client2.com").await);
    let (_, body) = c.multi_cmd("CAPA").await;
    assert!(!lines(&body).contains(&"STLS".to_owned()));
    assert_eq!(c.cmd("STLS").await, "-ERR already using TLS");
    // USER from before the handshake is forgotten.
    assert_eq!(c.cmd("PASS secret").await, "-ERR send USER first");
    let ok = c.login("info", PASSWORD).await;
    assert!(ok.starts_with("+OK info@client2.com"), "{ok}");
    let (_, body) = c.multi_cmd("RETR 1").await;
    assert!(body.starts_with(b"Subject: one"));
    c.cmd("QUIT").await;

    // Plaintext pipelined behind STLS is refused: the connection is closed.
    let mut c = Client::connect(addr).await;
    c.send("STLS\r\nUSER info\r\n").await;
    assert_eq!(c.line().await, "+OK Begin TLS negotiation");
    assert!(c.closed().await);
    node.stop().await;
}

/// `require_tls` (#13 point 7): on a listener that is not exempt (the exempt list emptied, so
/// 127.0.0.1 counts as outside) CAPA lists neither USER nor SASL before STLS, USER, PASS and
/// AUTH get `-ERR [AUTH]` without a password check, and after STLS poplib logs in.
#[tokio::test]
async fn require_tls_refuses_passwords_before_stls() {
    let pki = Pki::generate("test CA");
    let (cert, key) = pki.issue(&["localhost"], &[ip("127.0.0.1")]);
    let parts = company();
    parts.deliver("info@company.com", MSG1);
    let mut config = test_config("a");
    config.tls_policy.exempt.clear();
    let mut node = parts.node(
        config,
        Arc::new(NoPeers),
        Some(tls_acceptor(&cert, &key)),
        None,
    );
    let addr = node.listen("127.0.0.1", None).await;
    let script = r#"
import poplib, ssl, sys, json
p = poplib.POP3(sys.argv[1], int(sys.argv[2]), timeout=10)
out = {"capa": sorted(p.capa().keys())}
for cmd in ("USER info", "PASS secret", "AUTH PLAIN AGluZm8Ac2VjcmV0", "AUTH"):
    try:
        out[cmd] = p._shortcmd(cmd).decode()
    except poplib.error_proto as e:
        out[cmd] = e.args[0].decode()
p.stls(ssl._create_unverified_context())
out["tls_capa"] = sorted(p.capa().keys())
p.user("info"); p.pass_("secret")
out["stat"] = list(p.stat())
p.quit()
print(json.dumps(out))
"#;
    let out = python(script, &[addr.ip().to_string(), addr.port().to_string()]).await;
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let capa: Vec<&str> = v["capa"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert!(capa.contains(&"STLS"), "{out}");
    assert!(!capa.contains(&"USER") && !capa.contains(&"SASL"), "{out}");
    for cmd in [
        "USER info",
        "PASS secret",
        "AUTH PLAIN AGluZm8Ac2VjcmV0",
        "AUTH",
    ] {
        assert!(
            v[cmd]
                .as_str()
                .unwrap()
                .starts_with("-ERR [AUTH] Plaintext"),
            "{cmd}: {out}"
        );
    }
    let tls_capa = v["tls_capa"].as_array().unwrap();
    assert!(
        tls_capa.contains(&"USER".into()) && tls_capa.contains(&"SASL".into()),
        "{out}"
    );
    assert_eq!(v["stat"], serde_json::json!([1, MSG1.len()]));
    node.stop().await;
}

/// The CommuniGate Pro sample (DESIGN.md §3), with Python's poplib on 127.0.0.1/127.0.0.2 and
/// curl over implicit TLS with SNI `mail.client2.com`.
#[tokio::test]
async fn communigate_multihoming_sample() {
    let pki = Pki::generate("test CA");
    let (cert, key) = pki.issue(&["mail.client2.com", "localhost"], &[ip("127.0.0.1")]);
    let parts = company();
    parts.deliver(
        "info@company.com",
        b"Subject: for company\r\n\r\nhello company\r\n",
    );
    parts.deliver(
        "info@client1.com",
        b"Subject: for client1\r\n\r\nhello client1\r\n",
    );
    parts.deliver(
        "info@client2.com",
        b"Subject: for client2\r\n\r\nhello client2\r\n",
    );
    let mut node = parts.node(test_config("a"), Arc::new(NoPeers), None, None);
    let one = node.listen("127.0.0.1", None).await;
    let two = node.listen("127.0.0.2", None).await;
    let pop3s = node
        .listen("127.0.0.1", Some(tls_acceptor(&cert, &key)))
        .await;

    let script = r#"
import poplib, sys
host, port, user = sys.argv[1], int(sys.argv[2]), sys.argv[3]
p = poplib.POP3(host, port, timeout=10)
p.user(user)
p.pass_("secret")
resp, lines, octets = p.retr(1)
print(lines[0].decode())
p.quit()
"#;
    for (addr, user, want) in [
        (one, "info", "Subject: for company"),
        (two, "info", "Subject: for client1"),
        (one, "info%client2.com", "Subject: for client2"),
        (two, "info@company.com", "Subject: for company"),
    ] {
        let out = python(
            script,
            &[addr.ip().to_string(), addr.port().to_string(), user.into()],
        )
        .await;
        assert_eq!(out.trim(), want, "{user} on {addr}");
    }

    let dir = tempfile::tempdir().unwrap();
    let ca = pki.write_ca(dir.path()).unwrap();
    let port = pop3s.port();
    let (ok, out, err) = curl(&[
        "-sS".into(),
        "--max-time".into(),
        "20".into(),
        "--cacert".into(),
        ca.display().to_string(),
        "--resolve".into(),
        format!("mail.client2.com:{port}:127.0.0.1"),
        "-u".into(),
        "info:secret".into(),
        format!("pop3s://mail.client2.com:{port}/1"),
    ])
    .await;
    assert!(ok, "curl failed: {err}");
    assert!(out.contains("Subject: for client2"), "{out}");
    assert!(out.contains("hello client2"), "{out}");

    // curl over plain POP3 on 127.0.0.2: the bare name is client1's.
    let (ok, out, err) = curl(&[
        "-sS".into(),
        "--max-time".into(),
        "20".into(),
        "-u".into(),
        "info:secret".into(),
        format!("pop3://127.0.0.2:{}/1", two.port()),
    ])
    .await;
    assert!(ok, "curl failed: {err}");
    assert!(out.contains("hello client1"), "{out}");
    node.stop().await;
}

/// A full session with Python's poplib, which un-stuffs dots: the lines equal the stored ones.
#[tokio::test]
async fn poplib_full_session() {
    let parts = company();
    parts.deliver("info@company.com", MSG1);
    parts.deliver("info@company.com", MSG3);
    let (node, addr) = node_with(parts).await;
    let script = r#"
import poplib, sys, json
p = poplib.POP3(sys.argv[1], int(sys.argv[2]), timeout=10)
out = {"capa": sorted(p.capa().keys())}
p.user("info"); p.pass_("secret")
out["stat"] = list(p.stat())
out["list"] = [x.decode() for x in p.list()[1]]
out["uidl"] = [x.decode() for x in p.uidl()[1]]
out["retr"] = [x.decode() for x in p.retr(1)[1]]
out["top"] = [x.decode() for x in p.top(2, 1)[1]]
out["dele"] = p.dele(1).decode()
out["quit"] = p.quit().decode()
print(json.dumps(out))
"#;
    let out = python(script, &[addr.ip().to_string(), addr.port().to_string()]).await;
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["stat"], serde_json::json!([2, MSG1.len() + MSG3.len()]));
    assert_eq!(
        v["retr"],
        serde_json::json!([
            "Subject: one",
            "From: a@example.net",
            "",
            "first line",
            ".dot line",
            "..two dots",
            "last"
        ])
    );
    assert_eq!(v["top"], serde_json::json!(["Subject: three", "", "l1"]));
    assert_eq!(v["list"].as_array().unwrap().len(), 2);
    assert_eq!(v["uidl"].as_array().unwrap().len(), 2);
    assert!(v["capa"].as_array().unwrap().contains(&"UIDL".into()));
    assert!(v["quit"].as_str().unwrap().starts_with("+OK"));
    assert_eq!(
        node.mail.messages("info@company.com", INBOX).unwrap().len(),
        1
    );
    node.stop().await;
}

#[tokio::test]
async fn shutdown_closes_sessions_without_update() {
    let parts = company();
    parts.deliver("info@company.com", MSG1);
    let (node, addr) = node_with(parts).await;
    let mut c = Client::connect(addr).await;
    c.login("info", PASSWORD).await;
    assert_eq!(c.cmd("DELE 1").await, "+OK message 1 deleted");
    node.trigger.trigger();
    assert_eq!(c.line().await, "-ERR [SYS/TEMP] Server shutting down");
    assert_eq!(
        node.mail.messages("info@company.com", INBOX).unwrap().len(),
        1
    );
    node.stop().await;
}

#[tokio::test]
async fn large_message_is_streamed_and_its_size_is_what_retr_sends() {
    let parts = company();
    // Bigger than the store keeps inline and than one read: dot lines, bare LFs, a long line.
    let mut msg = b"Subject: big\r\nFrom: a@example.net\n\r\n".to_vec();
    for i in 0..20_000 {
        msg.extend_from_slice(format!(".line {i}\n").as_bytes());
    }
    msg.extend_from_slice(&vec![b'x'; 100_000]);
    msg.extend_from_slice(b"\r\nlast");
    parts.deliver("info@company.com", &msg);
    let (_node, addr) = node_with(parts).await;
    let mut c = Client::connect(addr).await;
    assert!(c.login("info", PASSWORD).await.starts_with("+OK"));
    let list = c.cmd("LIST 1").await;
    let size: usize = list.rsplit(' ').next().unwrap().parse().unwrap();
    let (status, body) = c.multi_cmd("RETR 1").await;
    assert_eq!(status, format!("+OK {size} octets"));
    // Un-stuff: a line starting with ".." lost nothing but its first period.
    let mut unstuffed = Vec::new();
    for line in body.split_inclusive(|&b| b == b'\n') {
        unstuffed.extend_from_slice(line.strip_prefix(b".").unwrap_or(line));
    }
    assert_eq!(unstuffed.len(), size);
    let mut want = Vec::new();
    let text = msg.clone();
    for line in text.split(|&b| b == b'\n') {
        want.extend_from_slice(line.strip_suffix(b"\r").unwrap_or(line));
        want.extend_from_slice(b"\r\n");
    }
    assert_eq!(unstuffed, want);
    let (_, top) = c.multi_cmd("TOP 1 2").await;
    assert_eq!(
        top,
        b"Subject: big\r\nFrom: a@example.net\r\n\r\n..line 0\r\n..line 1\r\n"
    );
    c.cmd("QUIT").await;
}

/// #13 point 8: a command line that comes a byte every 100 ms is bounded as a whole (the
/// authorization timeout here), not only the wait between its bytes.
#[tokio::test]
async fn a_slow_command_line_hits_its_deadline() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut config = test_config("a");
    config.auth_timeout = std::time::Duration::from_secs(1);
    let mut node = company().node(config, Arc::new(NoPeers), None, None);
    let addr = node.listen("127.0.0.1", None).await;
    let s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut r, mut w) = s.into_split();
    let reader = tokio::spawn(async move {
        let mut out = Vec::new();
        let _ =
            tokio::time::timeout(std::time::Duration::from_secs(30), r.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    });
    for b in b"USER info@company.com-and-some-more-octets-arriving-slowly\r\n" {
        if w.write_all(&[*b]).await.is_err() || reader.is_finished() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let answer = reader.await.unwrap();
    assert!(answer.contains("-ERR idle timeout"), "{answer}");
    assert!(!answer.contains("+OK info"), "{answer}");
    node.stop().await;
}

/// #13 point 5: a right password after a verified login is answered from the cache (no Argon2);
/// a changed password drops the entry at once.
#[tokio::test]
async fn verified_credentials_are_cached_until_the_password_changes() {
    let (node, addr) = node_with(company()).await;
    let checker = node.pop3.passwords();
    let mut c = Client::connect(addr).await;
    assert!(
        c.login("info@company.com", PASSWORD)
            .await
            .starts_with("+OK")
    );
    c.cmd("QUIT").await;
    let runs = checker.argon2_runs();
    assert_eq!(runs, 1);
    for _ in 0..3 {
        let mut c = Client::connect(addr).await;
        assert!(
            c.login("info@company.com", PASSWORD)
                .await
                .starts_with("+OK")
        );
        c.cmd("QUIT").await;
    }
    assert_eq!(checker.argon2_runs(), runs, "reconnects skip Argon2");
    assert_eq!(checker.cache_hits(), 3);
    // passwd: the cached entry no longer counts.
    node.directory
        .set_password("info@company.com", "a-new-password")
        .unwrap();
    let mut c = Client::connect(addr).await;
    assert!(
        c.login("info@company.com", PASSWORD)
            .await
            .starts_with("-ERR")
    );
    assert_eq!(checker.argon2_runs(), runs + 1);
    // disable: neither.
    let mut c = Client::connect(addr).await;
    assert!(
        c.login("info@company.com", "a-new-password")
            .await
            .starts_with("+OK")
    );
    c.cmd("QUIT").await;
    node.directory
        .set_enabled("info@company.com", false)
        .unwrap();
    let mut c = Client::connect(addr).await;
    assert!(
        c.login("info@company.com", "a-new-password")
            .await
            .starts_with("-ERR")
    );
}

/// #13 point 5: 60 connections guessing at once never run more Argon2 checks at a time than the
/// node's bound; the rest get a quick temporary error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_guessing_is_bounded() {
    let parts = company();
    let checker = Arc::new(ds_access::PasswordChecker::new(
        parts.directory.clone(),
        ds_access::CheckerConfig {
            node_limit: 2,
            per_ip_limit: 60,
            ..ds_access::CheckerConfig::default()
        },
    ));
    let mut config = test_config("a");
    config.passwords = Some(checker.clone());
    let mut node = parts.node(config, Arc::new(NoPeers), None, None);
    let addr = node.listen("127.0.0.1", None).await;
    let mut tasks = Vec::new();
    for i in 0..60 {
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(addr).await;
            c.login("info@company.com", &format!("guess-{i}")).await
        }));
    }
    let mut busy = 0;
    for t in tasks {
        let reply = t.await.unwrap();
        assert!(reply.starts_with("-ERR"), "{reply}");
        busy += usize::from(reply.starts_with("-ERR [SYS/TEMP]"));
    }
    assert!(checker.peak_running() <= 2, "{}", checker.peak_running());
    assert_eq!(checker.argon2_runs() as usize + busy, 60);
    node.stop().await;
}

/// A checker with `config`'s bounds over `parts`, and an account `address` whose check takes a
/// while (the default Argon2 cost is far too slow for a debug build; this one lets checks
/// started together all arrive while the first runs).
fn checker_with_slow_account(
    parts: &Parts,
    address: &str,
    password: &str,
    config: ds_access::CheckerConfig,
) -> Arc<ds_access::PasswordChecker> {
    parts
        .directory
        .clone()
        .with_hash_cost(ds_directory::HashCost {
            memory_kib: 4096,
            iterations: 2,
        })
        .add_account(address, password, 0)
        .unwrap();
    Arc::new(ds_access::PasswordChecker::new(
        parts.directory.clone(),
        config,
    ))
}

/// `passwords.len()` checks of `address` from `ip`, all started at once; their answers.
async fn checks_at_once(
    checker: &Arc<ds_access::PasswordChecker>,
    ip: &str,
    address: &str,
    passwords: Vec<String>,
) -> Vec<ds_access::Check> {
    let ip: std::net::IpAddr = ip.parse().unwrap();
    let tasks: Vec<_> = passwords
        .into_iter()
        .map(|password| {
            let (checker, address) = (Arc::clone(checker), address.to_owned());
            tokio::spawn(async move { checker.check(ip, &address, &password).await.unwrap() })
        })
        .collect();
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    answers
}

/// The bounded line for password checks: an office behind one NAT address, all opening their
/// mail at once, is served in turn (nobody gets a temporary error), never more than the
/// bounds running at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_logging_in_at_once_waits_its_turn() {
    let parts = company();
    let checker = checker_with_slow_account(
        &parts,
        "office@company.com",
        "right",
        ds_access::CheckerConfig {
            node_limit: 2,
            per_ip_limit: 2,
            cache_ttl: std::time::Duration::ZERO,
            ..ds_access::CheckerConfig::default()
        },
    );
    let answers = checks_at_once(
        &checker,
        "198.51.100.7",
        "office@company.com",
        vec!["right".to_string(); 12],
    )
    .await;
    assert!(
        answers.iter().all(|a| *a == ds_access::Check::Ok),
        "{answers:?}"
    );
    assert_eq!(checker.argon2_runs(), 12);
    assert!(checker.peak_running() <= 2, "{}", checker.peak_running());
}

/// Past the line's length for one address the answer is a quick temporary error: a guesser's
/// extra connections hold nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_beyond_its_line_is_refused_at_once() {
    let parts = company();
    let checker = checker_with_slow_account(
        &parts,
        "slow@company.com",
        "right",
        ds_access::CheckerConfig {
            node_limit: 1,
            per_ip_limit: 1,
            per_ip_waiting: 4,
            ..ds_access::CheckerConfig::default()
        },
    );
    let guesses = (0..10).map(|i| format!("guess-{i}")).collect();
    let answers = checks_at_once(&checker, "203.0.113.66", "slow@company.com", guesses).await;
    let busy = answers
        .iter()
        .filter(|a| **a == ds_access::Check::Busy)
        .count();
    assert!(
        answers
            .iter()
            .all(|a| matches!(a, ds_access::Check::Busy | ds_access::Check::Bad)),
        "{answers:?}"
    );
    assert_eq!((busy, checker.argon2_runs()), (6, 4));
}

/// A client opening several connections at once with the same password (phones, IMAP clients)
/// costs one Argon2 per slot, not one per connection: the ones that waited in line find the
/// verified password remembered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_in_line_with_the_same_password_use_the_remembered_check() {
    let parts = company();
    let checker = checker_with_slow_account(
        &parts,
        "phone@company.com",
        "right",
        ds_access::CheckerConfig {
            node_limit: 2,
            per_ip_limit: 1,
            ..ds_access::CheckerConfig::default()
        },
    );
    let answers = checks_at_once(
        &checker,
        "192.0.2.44",
        "phone@company.com",
        vec!["right".to_string(); 6],
    )
    .await;
    assert!(
        answers.iter().all(|a| *a == ds_access::Check::Ok),
        "{answers:?}"
    );
    assert_eq!((checker.argon2_runs(), checker.cache_hits()), (1, 5));
}
