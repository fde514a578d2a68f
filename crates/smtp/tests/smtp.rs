//! The SMTP server, local delivery, the relay queue and DSNs, on real loopback sockets.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use ds_net::TlsAcceptor;
use ds_net::tls::{Pki, client_config_with_ca, server_config_from_pem};

const ALICE: &str = "alice@company.com";
const BOB: &str = "bob@company.com";

#[tokio::test]
async fn ehlo_advertises_the_extensions() {
    let node = start_with(NodeOptions::plain("a", &[ALICE])).await;
    let mut c = connect(node.addr).await;
    let ehlo = c.cmd("EHLO client.example").await;
    for ext in [
        "250-PIPELINING",
        "250-SIZE 52428800",
        "250-8BITMIME",
        "250-ENHANCEDSTATUSCODES",
        "250-SMTPUTF8",
        "250 AUTH PLAIN",
    ] {
        assert!(ehlo.contains(ext), "{ext} missing in {ehlo}");
    }
    assert!(
        !ehlo.contains("STARTTLS"),
        "no acceptor, no STARTTLS: {ehlo}"
    );
    c.expect("HELP", "214 ").await;
    c.expect("VRFY bob", "252 ").await;
    c.expect("NOOP", "250 2.0.0").await;
    c.expect("EXPN list", "502 5.5.1").await;
    c.expect("FOO bar", "500 5.5.1").await;
    c.expect("QUIT", "221 2.0.0").await;
}

#[tokio::test]
async fn local_delivery_is_byte_exact() {
    let node = start("a", &[ALICE, BOB]).await;
    let mut c = connect(node.addr).await;
    c.cmd("EHLO client.example").await;
    c.expect("MAIL FROM:<sender@outside.org> BODY=8BITMIME", "250 2.1.0")
        .await;
    c.expect("RCPT TO:<Alice@Company.com>", "250 2.1.5").await;
    c.expect("RCPT TO:<bob@company.com>", "250 2.1.5").await;
    c.expect("DATA", "354 ").await;
    // Dot lines, 8-bit octets, NUL, bare LF and bare CR are all kept as sent.
    let body: &[u8] = b"Subject: dots\r\n\r\n.leading dot\r\n..two dots\r\n.\tdot tab\r\n\
        caf\xc3\xa9 \xff\x00 8bit\r\nbare\nlf\n.\nnot the end\r\nbare\rcr\r\n...\r\nend\r\n";
    c.send(&stuffed(body)).await;
    let reply = c.reply().await;
    assert!(reply.starts_with("250 2.0.0"), "{reply}");
    for account in [ALICE, BOB] {
        let inbox = node.inbox(account);
        assert_eq!(inbox.len(), 1);
        let msg = &inbox[0];
        assert!(msg.starts_with(b"Return-Path: <sender@outside.org>\r\nReceived: from client.example (127.0.0.1)\r\n\tby a.test (Domain Share) with ESMTP id "));
        let text = String::from_utf8_lossy(msg);
        assert!(text.contains(&format!("for <{account}>;")), "{text}");
        assert_eq!(strip_trace(msg), body);
    }
    // An empty message and RSET between transactions.
    c.cmd("MAIL FROM:<>").await;
    c.cmd("RSET").await;
    c.expect("RCPT TO:<bob@company.com>", "503 5.5.1").await;
    c.cmd("MAIL FROM:<>").await;
    c.cmd("RCPT TO:<bob@company.com>").await;
    c.expect("DATA", "354").await;
    c.expect(".", "250 2.0.0").await;
    let inbox = node.inbox(BOB);
    assert_eq!(inbox.len(), 2);
    assert!(inbox[1].starts_with(b"Return-Path: <>\r\n"));
    assert_eq!(strip_trace(&inbox[1]), b"");
}

#[tokio::test]
async fn recipients_and_senders_are_checked() {
    let node = start("a", &[ALICE]).await;
    let mut c = connect(node.addr).await;
    c.expect("MAIL FROM:<x@outside.org>", "503 5.5.1").await;
    c.cmd("EHLO client.example").await;
    // A sender in the shared domain that no node owns.
    c.expect("MAIL FROM:<ghost@company.com>", "550 5.1.0").await;
    c.expect("MAIL FROM:<alice@company.com>", "250 2.1.0").await;
    c.expect("MAIL FROM:<alice@company.com>", "503 5.5.1").await;
    c.expect("RCPT TO:<nobody@company.com>", "550 5.1.1").await;
    c.expect("RCPT TO:<someone@elsewhere.org>", "554 5.7.1")
        .await;
    // `<postmaster>` without a domain is the main domain's postmaster (RFC 5321 §4.5.1):
    // located like any address (here nobody has it), never a syntax error.
    let r = c.cmd("RCPT TO:<Postmaster>").await;
    assert!(r.starts_with("550 5.1.1"), "{r}");
    let r = c.cmd("RCPT TO:<broken").await;
    assert!(r.starts_with("501 5."), "{r}");
    assert!(
        c.cmd("DATA").await.starts_with("503 5.5.1"),
        "no recipient yet"
    );
    c.expect("RCPT TO:<alice@company.com>", "250 2.1.5").await;
}

#[tokio::test]
async fn pipelined_commands_are_answered_in_order() {
    let node = start("a", &[ALICE, BOB]).await;
    let mut c = connect(node.addr).await;
    c.send(
        b"EHLO client.example\r\nMAIL FROM:<x@outside.org>\r\nRCPT TO:<alice@company.com>\r\n\
          RCPT TO:<nobody@company.com>\r\nRCPT TO:<bob@company.com>\r\nDATA\r\n",
    )
    .await;
    assert!(c.reply().await.starts_with("250-"));
    assert!(c.reply().await.starts_with("250 2.1.0"));
    assert!(c.reply().await.starts_with("250 2.1.5"));
    assert!(c.reply().await.starts_with("550 5.1.1"));
    assert!(c.reply().await.starts_with("250 2.1.5"));
    assert!(c.reply().await.starts_with("354"));
    c.send(b"Subject: p\r\n\r\nhello\r\n.\r\nMAIL FROM:<>\r\nRCPT TO:<bob@company.com>\r\nDATA\r\nsecond\r\n.\r\nQUIT\r\n")
        .await;
    assert!(c.reply().await.starts_with("250 2.0.0"));
    assert!(c.reply().await.starts_with("250 2.1.0"));
    assert!(c.reply().await.starts_with("250 2.1.5"));
    assert!(c.reply().await.starts_with("354"));
    assert!(c.reply().await.starts_with("250 2.0.0"));
    assert!(c.reply().await.starts_with("221"));
    assert_eq!(node.inbox(ALICE).len(), 1);
    assert_eq!(node.inbox(BOB).len(), 2);
    assert_eq!(strip_trace(&node.inbox(BOB)[1]), b"second\r\n");
}

#[tokio::test]
async fn limits_have_their_codes() {
    let mut opts = NodeOptions::new("a", &[ALICE, BOB, "carol@company.com", "dave@company.com"]);
    opts.config.max_recipients = 3;
    opts.config.max_message_size = 1000;
    opts.config.max_errors = 50;
    let node = start_with(opts).await;
    let mut c = connect(node.addr).await;
    c.cmd("EHLO client.example").await;
    let long = format!("NOOP {}", "x".repeat(2000));
    assert!(c.cmd(&long).await.starts_with("500 5.5.2"));
    assert!(
        c.cmd("NOOP").await.starts_with("250"),
        "session goes on after a long line"
    );
    c.expect("MAIL FROM:<x@outside.org> SIZE=5000", "552 5.3.4")
        .await;
    c.expect("MAIL FROM:<x@outside.org> SIZE=500", "250").await;
    for r in [ALICE, BOB, "carol@company.com"] {
        assert!(
            c.cmd(&format!("RCPT TO:<{r}>"))
                .await
                .starts_with("250 2.1.5")
        );
    }
    c.expect("RCPT TO:<dave@company.com>", "452 4.5.3").await;
    c.expect("DATA", "354").await;
    let mut big = Vec::new();
    for _ in 0..30 {
        big.extend_from_slice(&[b'y'; 60]);
        big.extend_from_slice(b"\r\n");
    }
    c.send(&stuffed(&big)).await;
    assert!(c.reply().await.starts_with("552 5.3.4"));
    assert!(node.inbox(ALICE).is_empty());
    // The session is usable after a refused message.
    c.cmd("MAIL FROM:<>").await;
    c.cmd("RCPT TO:<alice@company.com>").await;
    c.cmd("DATA").await;
    c.expect("small\r\n.", "250 2.0.0").await;
}

#[tokio::test]
async fn too_many_errors_and_idle_timeout_close_the_session() {
    let mut opts = NodeOptions::new("a", &[ALICE]);
    opts.config.max_errors = 3;
    opts.config.idle_timeout = Duration::from_millis(500);
    let node = start_with(opts).await;
    let mut c = connect(node.addr).await;
    for _ in 0..3 {
        c.expect("BOGUS", "500").await;
    }
    c.expect("BOGUS", "421").await;
    let mut c = connect(node.addr).await;
    let reply = c.reply().await;
    assert!(reply.starts_with("421 4.4.2"), "{reply}");
}

fn pki_acceptor() -> (Pki, TlsAcceptor) {
    let pki = Pki::generate("test CA");
    let (cert, key) = pki.issue(&["localhost"], &["127.0.0.1".parse().unwrap()]);
    let config = server_config_from_pem(&cert, &key).unwrap();
    (pki, TlsAcceptor::from(config))
}

#[tokio::test]
async fn starttls_upgrades_and_resets_the_session() {
    let (pki, acceptor) = pki_acceptor();
    let mut opts = NodeOptions::new("a", &[ALICE]);
    opts.tls = Some(acceptor);
    let node = start_with(opts).await;
    let mut c = connect(node.addr).await;
    let ehlo = c.cmd("EHLO client.example").await;
    assert!(ehlo.contains("250 STARTTLS"), "{ehlo}");
    assert!(!ehlo.contains("AUTH"), "no AUTH before TLS: {ehlo}");
    c.expect("AUTH PLAIN AGR1bW15AHg=", "538 5.7.11").await;
    c.expect("STARTTLS", "220 2.0.0").await;
    let tcp = c.stream.into_inner();
    let connector = ds_net::TlsConnector::from(client_config_with_ca(&pki.ca_cert_pem()).unwrap());
    let tls = connector
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    let mut c = Client {
        stream: tokio::io::BufReader::new(tls),
    };
    assert!(
        c.cmd("MAIL FROM:<x@outside.org>").await.starts_with("503"),
        "state reset after TLS"
    );
    let ehlo = c.cmd("EHLO client.example").await;
    assert!(!ehlo.contains("STARTTLS"), "{ehlo}");
    assert!(ehlo.contains("AUTH PLAIN"), "{ehlo}");
    c.expect("STARTTLS", "503").await;
    c.cmd("MAIL FROM:<x@outside.org>").await;
    c.cmd("RCPT TO:<alice@company.com>").await;
    c.cmd("DATA").await;
    c.expect("Subject: tls\r\n\r\nsecret\r\n.", "250 2.0.0")
        .await;
    let msg = String::from_utf8(node.inbox(ALICE).remove(0)).unwrap();
    assert!(msg.contains("with ESMTPS id"), "{msg}");
}

#[tokio::test]
async fn twenty_mib_message_arrives_byte_exact() {
    let node = start("a", &[ALICE]).await;
    let mut body = b"Subject: big\r\n\r\n".to_vec();
    let mut x: u32 = 12345;
    while body.len() < 20 * 1024 * 1024 {
        // Pseudo-random 8-bit lines, some starting with a period.
        let len = 1 + (x % 200) as usize;
        for _ in 0..len {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            let b = (x >> 16) as u8;
            body.push(if b == b'\r' || b == b'\n' { b'.' } else { b });
        }
        body.extend_from_slice(b"\r\n");
    }
    let mut c = connect(node.addr).await;
    c.cmd("EHLO client.example").await;
    c.cmd("MAIL FROM:<x@outside.org> BODY=8BITMIME").await;
    c.cmd("RCPT TO:<alice@company.com>").await;
    c.expect("DATA", "354").await;
    let started = std::time::Instant::now();
    c.send(&stuffed(&body)).await;
    let reply = c.reply().await;
    let elapsed = started.elapsed();
    assert!(reply.starts_with("250 2.0.0"), "{reply}");
    eprintln!("20 MiB message accepted in {elapsed:?}");
    let inbox = node.inbox(ALICE);
    assert_eq!(strip_trace(&inbox[0]).len(), body.len());
    assert!(strip_trace(&inbox[0]) == body.as_slice());
}

#[tokio::test]
async fn python_smtplib_delivers() {
    let node = start("a", &[ALICE]).await;
    let port = node.addr.port();
    let script = format!(
        r#"
import smtplib
from email.message import EmailMessage
m = EmailMessage()
m["From"] = "py@outside.org"
m["To"] = "alice@company.com"
m["Subject"] = "from python"
m.set_content(".dot line\nnon-ascii: café\n")
with smtplib.SMTP("127.0.0.1", {port}, timeout=30) as s:
    s.ehlo("python.example")
    assert s.has_extn("pipelining") and s.has_extn("8bitmime") and s.has_extn("smtputf8")
    print(s.send_message(m))
    try:
        s.sendmail("py@outside.org", ["nobody@company.com"], "Subject: x\r\n\r\nx\r\n")
    except smtplib.SMTPRecipientsRefused as e:
        print("refused", e.recipients["nobody@company.com"][0])
"#
    );
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(240),
        tokio::process::Command::new("python3")
            .arg("-c")
            .arg(script)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("python3 ran over 240 s")
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("refused 550"), "{stdout}");
    let msg = String::from_utf8(node.inbox(ALICE).remove(0)).unwrap();
    assert!(msg.contains("Subject: from python"));
    assert!(msg.contains(".dot line"), "{msg}");
}

/// `require_tls` (#13 point 7): a node without STARTTLS accepts AUTH in plaintext only on an
/// exempt listener (loopback by default); with the exempt list emptied, 127.0.0.1 counts as
/// outside, AUTH is not offered and gets `538 5.7.11` before any secret is checked.
#[tokio::test]
async fn require_tls_refuses_plaintext_auth_off_the_exempt_networks() {
    let mut opts = NodeOptions::plain("b", &[BOB]);
    opts.config.tls_policy.exempt.clear();
    let node = start_with(opts).await;
    let mut c = connect(node.addr).await;
    let ehlo = c.cmd("EHLO a.test").await;
    assert!(!ehlo.contains("AUTH"), "{ehlo}");
    let token = b64(format!("\0dshare-peer/a\0{SECRET}").as_bytes());
    c.expect(&format!("AUTH PLAIN {token}"), "538 5.7.11").await;
    c.expect("AUTH PLAIN", "538 5.7.11").await;
    // Mail without AUTH still flows.
    c.cmd("MAIL FROM:<x@outside.org>").await;
    c.expect("RCPT TO:<bob@company.com>", "250 2.1.5").await;

    // Loopback exempt (the default): the same node offers AUTH in plaintext.
    let node = start_with(NodeOptions::plain("b", &[BOB])).await;
    let mut c = connect(node.addr).await;
    assert!(c.cmd("EHLO a.test").await.contains("AUTH PLAIN"));
    assert!(
        c.cmd(&format!("AUTH PLAIN {token}"))
            .await
            .starts_with("235")
    );
}

#[tokio::test]
async fn peer_auth_marks_a_hop_that_delivers_locally_only() {
    let node = start_with(NodeOptions::plain("b", &[BOB])).await;
    node.locator.set_remote(ALICE, "a", "127.0.0.1:9");
    let mut c = connect(node.addr).await;
    c.cmd("EHLO a.test").await;
    // Regular users cannot authenticate; a wrong secret neither.
    let user = b64(b"\0bob@company.com\0password");
    c.expect(&format!("AUTH PLAIN {user}"), "535 5.7.8").await;
    let wrong = b64(b"\0dshare-peer/a\0not-the-secret-at-all");
    c.expect(&format!("AUTH PLAIN {wrong}"), "535 5.7.8").await;
    // Without a hop, a peer-owned recipient is accepted (it would be queued).
    c.cmd("MAIL FROM:<x@outside.org>").await;
    c.expect("RCPT TO:<alice@company.com>", "250 2.1.5").await;
    c.cmd("RSET").await;
    // The peer, with the initial response on a second line.
    c.expect("AUTH PLAIN", "334").await;
    let token = b64(format!("\0dshare-peer/a\0{SECRET}").as_bytes());
    assert!(c.cmd(&token).await.starts_with("235 2.7.0"));
    c.cmd("MAIL FROM:<x@outside.org>").await;
    c.expect("RCPT TO:<alice@company.com>", "550 5.1.1").await;
    c.expect("RCPT TO:<bob@company.com>", "250 2.1.5").await;
    c.cmd("DATA").await;
    c.expect("hop\r\n.", "250 2.0.0").await;
    assert!(node.queue.is_empty(), "a hop never queues");
    let msg = String::from_utf8(node.inbox(BOB).remove(0)).unwrap();
    assert!(msg.contains("with ESMTPA id"), "{msg}");
}

/// Binds a port and frees it: nothing listens there (until a node binds it again).
async fn free_port() -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

/// One message in a fresh session; every recipient and the end of DATA must get `250`.
async fn send_simple(node: &Node, from: &str, to: &[&str], body: &str) -> String {
    let mut c = connect(node.addr).await;
    c.cmd("EHLO client.example").await;
    c.cmd(&format!("MAIL FROM:<{from}>")).await;
    for r in to {
        let reply = c.cmd(&format!("RCPT TO:<{r}>")).await;
        assert!(reply.starts_with("250"), "{r}: {reply}");
    }
    c.cmd("DATA").await;
    c.send(&stuffed(body.as_bytes())).await;
    let reply = c.reply().await;
    assert!(reply.starts_with("250 2.0.0"), "end of DATA: {reply}");
    reply
}

#[tokio::test]
async fn queue_retries_an_owner_that_is_down_then_delivers() {
    let b_addr = free_port().await;
    let a = start("a", &[ALICE]).await;
    a.locator.set_remote(BOB, "b", &b_addr.to_string());
    send_simple(
        &a,
        ALICE,
        &[ALICE, BOB],
        "Subject: mixed\r\n\r\nhi both\r\n",
    )
    .await;
    // Local copy at once, the remote one queued and failing while b is down.
    assert_eq!(a.inbox(ALICE).len(), 1);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let entries = a.queue.list().unwrap();
    assert_eq!(entries.len(), 1);
    assert!(entries[0].attempts >= 1, "{entries:?}");
    assert!(
        entries[0]
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("connect"),
        "{entries:?}"
    );
    assert_eq!(entries[0].recipients[0].owner.as_deref(), Some("b"));
    // b comes up on the advertised port; the back-off (1 s, 2 s) brings the message over.
    let mut opts = NodeOptions::new("b", &[BOB]);
    opts.listener = Some(tokio::net::TcpListener::bind(b_addr).await.unwrap());
    let b = start_with(opts).await;
    let inbox = b.wait_inbox(BOB, 1, 15).await;
    assert_eq!(inbox.len(), 1, "relayed after the owner came up");
    let msg = String::from_utf8(inbox[0].clone()).unwrap();
    assert!(
        msg.starts_with("Return-Path: <alice@company.com>\r\nReceived: from a.test"),
        "{msg}"
    );
    assert!(
        msg.contains("by b.test (Domain Share) with ESMTPSA"),
        "{msg}"
    );
    assert!(
        msg.contains("by a.test (Domain Share) with ESMTP id"),
        "{msg}"
    );
    assert!(msg.ends_with("\r\n\r\nhi both\r\n"), "{msg}");
    for _ in 0..50 {
        if a.queue.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(a.queue.is_empty());
}

#[tokio::test]
async fn queue_relays_over_starttls_with_the_cluster_ca() {
    let (pki, acceptor) = pki_acceptor();
    let mut opts = NodeOptions::new("b", &[BOB]);
    opts.tls = Some(acceptor);
    let b = start_with(opts).await;
    let mut opts = NodeOptions::new("a", &[ALICE]);
    opts.relay_tls = Some(client_config_with_ca(&pki.ca_cert_pem()).unwrap());
    let a = start_with(opts).await;
    a.locator
        .set_remote(BOB, "b", &format!("localhost:{}", b.addr.port()));
    send_simple(&a, ALICE, &[BOB], "Subject: tls relay\r\n\r\n.dot\r\n").await;
    let inbox = b.wait_inbox(BOB, 1, 10).await;
    assert_eq!(inbox.len(), 1);
    let msg = String::from_utf8(inbox[0].clone()).unwrap();
    assert!(msg.contains("with ESMTPSA"), "{msg}");
    assert!(msg.ends_with("\r\n\r\n.dot\r\n"), "{msg}");
}

#[tokio::test]
async fn stale_owner_550_relocates_once() {
    // c does not have bob (stale cache); relocation finds b.
    let b = start("b", &[BOB]).await;
    let c = start("c", &[]).await;
    let a = start("a", &[ALICE]).await;
    a.locator.set_remote(BOB, "c", &c.addr.to_string());
    a.locator.relocated.lock().unwrap().insert(
        BOB.to_string(),
        ds_smtp::Location::Remote(ds_smtp::Owner {
            node: "b".into(),
            canonical: BOB.into(),
            is_list: false,
            can_receive: true,
            smtp: b.addr.to_string(),
            pop3: String::new(),
            imap: String::new(),
        }),
    );
    send_simple(&a, ALICE, &[BOB], "Subject: moved\r\n\r\nx\r\n").await;
    assert_eq!(b.wait_inbox(BOB, 1, 10).await.len(), 1);
    assert_eq!(a.locator.relocations.lock().unwrap().as_slice(), [BOB]);
    assert!(
        c.queue.is_empty(),
        "the stale owner never forwards a relayed message"
    );

    // Now relocation answers the same owner: the recipient fails and alice gets a DSN.
    let ghost = "ghost@company.com";
    a.locator.set_remote(ghost, "c", &c.addr.to_string());
    send_simple(&a, ALICE, &[ghost], "Subject: lost\r\n\r\nx\r\n").await;
    let inbox = a.wait_inbox(ALICE, 1, 10).await;
    assert_eq!(inbox.len(), 1);
    let dsn = String::from_utf8(inbox[0].clone()).unwrap();
    assert!(dsn.starts_with("Return-Path: <>\r\n"), "{dsn}");
    assert!(
        dsn.contains("Final-Recipient: rfc822; ghost@company.com"),
        "{dsn}"
    );
    assert!(dsn.contains("Status: 5.1.1"), "{dsn}");
    assert!(dsn.contains("Subject: lost"), "{dsn}");
}

#[tokio::test]
async fn expired_message_bounces_to_the_sender() {
    let down = free_port().await;
    let mut opts = NodeOptions::new("a", &[ALICE]);
    opts.config.max_queue_age = Duration::from_secs(2);
    let a = start_with(opts).await;
    a.locator.set_remote(BOB, "b", &down.to_string());
    send_simple(&a, ALICE, &[BOB], "Subject: doomed\r\n\r\nx\r\n").await;
    let inbox = a.wait_inbox(ALICE, 1, 15).await;
    assert_eq!(inbox.len(), 1, "DSN after the maximum age");
    let dsn = String::from_utf8(inbox[0].clone()).unwrap();
    assert!(dsn.contains("multipart/report"), "{dsn}");
    assert!(dsn.contains("report-type"), "{dsn}");
    assert!(dsn.contains("message/delivery-status"), "{dsn}");
    assert!(dsn.contains("Action: failed"), "{dsn}");
    assert!(dsn.contains("Status: 5.4.7"), "{dsn}");
    assert!(a.queue.is_empty());
    // A bounce is never bounced: an expired message with an empty sender just goes away.
    send_simple(&a, "", &[BOB], "Subject: bounce\r\n\r\nx\r\n").await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(a.queue.is_empty());
    assert_eq!(a.inbox(ALICE).len(), 1);
}

#[tokio::test]
async fn list_post_goes_to_local_members_and_one_copy_per_keeper() {
    let b = start("b", &[BOB]).await;
    b.directory.add_list("team").unwrap();
    b.directory.subscribe("team", BOB).unwrap();
    b.directory.subscribe("team", ALICE).unwrap();
    let a = start("a", &[ALICE, "carol@company.com"]).await;
    a.directory.add_list("team").unwrap();
    a.directory.subscribe("team", ALICE).unwrap();
    a.directory.subscribe("team", "carol@company.com").unwrap();
    a.directory.subscribe("team", "nobody@company.com").unwrap();
    a.locator.keepers.lock().unwrap().insert(
        "team@company.com".into(),
        vec![ds_smtp::ListKeeper {
            node: "b".into(),
            smtp: b.addr.to_string(),
        }],
    );
    send_simple(
        &a,
        "x@outside.org",
        &["team@company.com"],
        "Subject: team\r\n\r\nhello team\r\n",
    )
    .await;
    assert_eq!(a.inbox(ALICE).len(), 1);
    assert_eq!(a.inbox("carol@company.com").len(), 1);
    // b's copy is delivered to b's local members only (alice is on b's list too, but not local).
    assert_eq!(b.wait_inbox(BOB, 1, 10).await.len(), 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(b.queue.is_empty());
    assert_eq!(a.inbox(ALICE).len(), 1);
}

#[allow(dead_code)]
fn _assert_send(s: Arc<ds_smtp::Smtp>) -> impl Send {
    s.run_queue(ds_net::Shutdown::never())
}

/// A fake peer that sends `greeting` on every connection, then stays silent. Returns its address.
async fn fake_peer(greeting: &'static [u8]) -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            use tokio::io::AsyncWriteExt;
            let _ = s.write_all(greeting).await;
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(30)).await;
                drop(s);
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_non_ascii_reply_from_a_peer_does_not_panic_the_queue_runner() {
    let peer = fake_peer("25\u{e9} greeting with a split character\r\n".as_bytes()).await;
    let mut opts = NodeOptions::new("a", &[ALICE]);
    opts.queue_runner = false;
    let a = start_with(opts).await;
    a.locator.set_remote(BOB, "b", &peer.to_string());
    send_simple(&a, ALICE, &[BOB], "Subject: x\r\n\r\nx\r\n").await;
    let runner = a.smtp.queue_runner();
    let pass = tokio::spawn(async move { runner.run_once().await.map(|_| ()) });
    let result = pass.await;
    assert!(result.is_ok(), "queue runner panicked: {result:?}");
    let entries = a.queue.list().unwrap();
    assert_eq!(entries.len(), 1, "kept for a retry");
    assert_eq!(entries[0].attempts, 1);
    let error = entries[0].last_error.clone().unwrap_or_default();
    assert!(error.contains("bad reply"), "{error}");
}

#[tokio::test]
async fn a_local_error_in_a_queue_run_keeps_what_was_relayed_and_backs_off() {
    // One entry for c: dave is relayed to c; c answers 550 for carol (a stale owner) and
    // relocation says carol is now local to a, whose delivery then fails (a corrupt mailbox
    // record).
    let carol = "carol@company.com";
    let dave = "dave@company.com";
    let broken = "broken@company.com";
    let c = start("c", &[dave]).await;
    let a = start("a", &[ALICE]).await;
    a.store
        .blobs("mail_mailboxes")
        .unwrap()
        .insert(format!("{broken}\0INBOX"), b"not a mailbox record")
        .unwrap();
    a.locator.set_remote(dave, "c", &c.addr.to_string());
    a.locator.set_remote(carol, "c", &c.addr.to_string());
    a.locator.relocated.lock().unwrap().insert(
        carol.to_string(),
        ds_smtp::Location::Local {
            address: broken.to_string(),
            enabled: true,
        },
    );
    send_simple(&a, ALICE, &[carol, dave], "Subject: x\r\n\r\nonce\r\n").await;
    assert_eq!(c.wait_inbox(dave, 1, 10).await.len(), 1);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(c.inbox(dave).len(), 1, "dave is never relayed twice");
    let tries = a.locator.relocations.lock().unwrap().len();
    assert!(
        tries <= 3,
        "back-off after a local error, not a hot loop: {tries} tries"
    );
    let entries = a.queue.list().unwrap();
    assert_eq!(entries.len(), 1, "{entries:?}");
    let states: Vec<_> = entries[0].recipients.iter().map(|r| &r.state).collect();
    assert_eq!(
        states,
        [
            &ds_store::queue::RecipientState::Pending,
            &ds_store::queue::RecipientState::Delivered,
        ],
        "{entries:?}"
    );
    assert!(entries[0].attempts >= 1);
}

#[tokio::test]
async fn a_dsn_that_cannot_be_delivered_keeps_the_entry_and_backs_off() {
    // ghost fails for good at c; the DSN goes to a local sender whose mailbox record is corrupt.
    let sender = "broken@company.com";
    let ghost = "ghost@company.com";
    let c = start("c", &[]).await;
    let a = start("a", &[ALICE, sender]).await;
    a.store
        .blobs("mail_mailboxes")
        .unwrap()
        .insert(format!("{sender}\0INBOX"), b"not a mailbox record")
        .unwrap();
    a.locator.set_remote(ghost, "c", &c.addr.to_string());
    send_simple(&a, sender, &[ghost], "Subject: x\r\n\r\nx\r\n").await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let tries = a.locator.relocations.lock().unwrap().len();
    assert_eq!(tries, 1, "the failed recipient is not relayed again");
    let entries = a.queue.list().unwrap();
    assert_eq!(entries.len(), 1, "kept until the DSN is out");
    assert!(
        matches!(
            entries[0].recipients[0].state,
            ds_store::queue::RecipientState::Failed(_)
        ),
        "{entries:?}"
    );
    let error = entries[0].last_error.clone().unwrap_or_default();
    assert!(error.contains("DSN not sent"), "{error}");
}

/// A fake peer that answers EHLO, MAIL, RCPT and DATA, then stops reading (its receive
/// window fills up and the sender's writes block).
async fn stalling_peer() -> std::net::SocketAddr {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut s = tokio::io::BufReader::new(s);
                let _ = s.get_mut().write_all(b"220 stall ESMTP\r\n").await;
                let mut line = String::new();
                while s.read_line(&mut line).await.unwrap_or(0) > 0 {
                    let reply: &[u8] = match line.get(..4).unwrap_or("") {
                        "EHLO" => b"250-stall\r\n250 SIZE 100000000\r\n",
                        "DATA" => b"354 go\r\n",
                        "AUTH" => b"235 ok\r\n",
                        _ => b"250 ok\r\n",
                    };
                    let _ = s.get_mut().write_all(reply).await;
                    if line.starts_with("DATA") {
                        tokio::time::sleep(Duration::from_secs(120)).await;
                        return;
                    }
                    line.clear();
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_peer_that_stops_reading_the_body_times_out() {
    let peer = stalling_peer().await;
    let mut opts = NodeOptions::new("a", &[ALICE]);
    opts.plaintext_relay();
    opts.queue_runner = false;
    opts.config.relay_timeout = Duration::from_millis(300);
    let a = start_with(opts).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let body = vec![b'x'; 32 << 20];
    let rcpt = ds_store::queue::QueuedRecipient {
        address: BOB.into(),
        owner: Some("b".into()),
        endpoint: Some(peer.to_string()),
        state: ds_store::queue::RecipientState::Pending,
        dsn: Default::default(),
    };
    a.queue
        .enqueue(ALICE, vec![rcpt], &body, false, now)
        .unwrap();
    let started = std::time::Instant::now();
    let pass = tokio::time::timeout(Duration::from_secs(20), a.smtp.queue_runner().run_once())
        .await
        .expect("the relay attempt is bounded by ten relay timeouts");
    assert!(pass.is_ok(), "{pass:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
    let entries = a.queue.list().unwrap();
    assert_eq!(entries.len(), 1);
    let error = entries[0].last_error.clone().unwrap_or_default();
    assert!(error.contains("body"), "{error}");
}

#[tokio::test]
async fn a_lookup_that_fails_after_a_550_defers_instead_of_bouncing() {
    // c no longer has carol; when a asks again, the peers cannot be reached.
    let carol = "carol@company.com";
    let c = start("c", &[]).await;
    let a = start("a", &[ALICE]).await;
    a.locator.set_remote(carol, "c", &c.addr.to_string());
    a.locator.relocated.lock().unwrap().insert(
        carol.to_string(),
        ds_smtp::Location::TempFail("peer b unreachable".into()),
    );
    send_simple(&a, ALICE, &[carol], "Subject: x\r\n\r\nx\r\n").await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(a.inbox(ALICE).is_empty(), "no DSN for a temporary failure");
    let entries = a.queue.list().unwrap();
    assert_eq!(entries.len(), 1, "still queued");
    let r = &entries[0].recipients[0];
    assert_eq!(r.state, ds_store::queue::RecipientState::Pending, "{r:?}");
    assert_eq!(r.owner, None, "the refusing owner is forgotten: {r:?}");
    let error = entries[0].last_error.clone().unwrap_or_default();
    assert!(error.contains("peer b unreachable"), "{error}");
}

#[tokio::test]
async fn a_dsn_whose_sender_cannot_be_located_now_is_queued_not_dropped() {
    let carol = "carol@company.com";
    let ghost = "ghost@company.com";
    let b = start("b", &[carol]).await;
    let c = start("c", &[]).await;
    let a = start("a", &[ALICE]).await;
    a.locator.set_remote(ghost, "c", &c.addr.to_string());
    a.locator.located.lock().unwrap().insert(
        carol.to_string(),
        ds_smtp::Location::TempFail("peer b unreachable".into()),
    );
    // carol (on b) wrote to ghost, who fails for good; the DSN's lookup of carol tempfails.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let rcpt = ds_store::queue::QueuedRecipient {
        address: ghost.into(),
        owner: Some("c".into()),
        endpoint: Some(c.addr.to_string()),
        state: ds_store::queue::RecipientState::Pending,
        dsn: Default::default(),
    };
    a.queue
        .enqueue(carol, vec![rcpt], b"Subject: lost\r\n\r\nx\r\n", false, now)
        .unwrap();
    a.smtp.queue_waker().notify_one();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let entries = a.queue.list().unwrap();
    assert_eq!(entries.len(), 1, "the DSN waits in the queue: {entries:?}");
    assert_eq!(entries[0].sender, "");
    // The peers answer again: the DSN reaches carol on b.
    a.locator.located.lock().unwrap().clear();
    a.locator.set_remote(carol, "b", &b.addr.to_string());
    let inbox = b.wait_inbox(carol, 1, 10).await;
    assert_eq!(inbox.len(), 1);
    let dsn = String::from_utf8(inbox[0].clone()).unwrap();
    assert!(
        dsn.contains("Final-Recipient: rfc822; ghost@company.com"),
        "{dsn}"
    );
}

#[tokio::test]
async fn plaintext_pipelined_after_starttls_is_refused() {
    // CVE-2011-0411: commands sent in clear text with STARTTLS must not run inside TLS.
    let (_pki, acceptor) = pki_acceptor();
    let mut opts = NodeOptions::new("a", &[ALICE]);
    opts.tls = Some(acceptor);
    let node = start_with(opts).await;
    let mut c = connect(node.addr).await;
    c.cmd("EHLO client.example").await;
    c.send(b"STARTTLS\r\nMAIL FROM:<x@outside.org>\r\n").await;
    assert!(c.reply().await.starts_with("220 2.0.0"));
    let rest = c.rest().await;
    assert_eq!(rest, "", "the connection is closed, nothing answered");
}

/// A TCP relay in front of `target` that counts the connections it accepted and those that
/// ended. Returns its address and the two counters.
async fn counting_proxy(
    target: std::net::SocketAddr,
) -> (
    std::net::SocketAddr,
    Arc<std::sync::atomic::AtomicUsize>,
    Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let opened = Arc::new(AtomicUsize::new(0));
    let closed = Arc::new(AtomicUsize::new(0));
    let (o, c) = (opened.clone(), closed.clone());
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = l.accept().await {
            o.fetch_add(1, Ordering::SeqCst);
            let c = c.clone();
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
                c.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    (addr, opened, closed)
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Queues a message for `rcpt` at the owner `node` listening on `endpoint`.
fn enqueue_for(node: &Node, rcpt: &str, owner: &str, endpoint: &str, body: &str) -> u64 {
    let r = ds_store::queue::QueuedRecipient {
        address: rcpt.into(),
        owner: Some(owner.into()),
        endpoint: Some(endpoint.into()),
        state: ds_store::queue::RecipientState::Pending,
        dsn: Default::default(),
    };
    node.queue
        .enqueue(ALICE, vec![r], body.as_bytes(), false, unix_now())
        .unwrap()
}

#[tokio::test]
async fn one_tls_session_per_owner_carries_consecutive_messages() {
    use std::sync::atomic::Ordering;
    let carol = "carol@company.com";
    let pki = Pki::generate("test CA");
    let acceptor = || {
        let (cert, key) = pki.issue(&["localhost"], &["127.0.0.1".parse().unwrap()]);
        TlsAcceptor::from(server_config_from_pem(&cert, &key).unwrap())
    };
    let mut opts = NodeOptions::new("b", &[BOB]);
    opts.tls = Some(acceptor());
    let b = start_with(opts).await;
    let mut opts = NodeOptions::new("c", &[carol]);
    opts.tls = Some(acceptor());
    let c = start_with(opts).await;
    let mut opts = NodeOptions::new("a", &[ALICE]);
    opts.relay_tls = Some(client_config_with_ca(&pki.ca_cert_pem()).unwrap());
    opts.queue_runner = false;
    let a = start_with(opts).await;
    let (to_b, b_opened, b_closed) = counting_proxy(b.addr).await;
    let (to_c, c_opened, c_closed) = counting_proxy(c.addr).await;
    let to_b = format!("localhost:{}", to_b.port());
    let to_c = format!("localhost:{}", to_c.port());
    const N: usize = 6;
    for i in 0..N {
        enqueue_for(
            &a,
            BOB,
            "b",
            &to_b,
            &format!("Subject: b{i}\r\n\r\nfor bob {i}\r\n"),
        );
        enqueue_for(
            &a,
            carol,
            "c",
            &to_c,
            &format!("Subject: c{i}\r\n\r\nfor carol {i}\r\n"),
        );
    }
    a.smtp.queue_runner().run_once().await.unwrap();
    assert!(a.queue.is_empty(), "{:?}", a.queue.list().unwrap());
    for (node, account, who) in [(&b, BOB, "bob"), (&c, carol, "carol")] {
        let inbox = node.inbox(account);
        assert_eq!(inbox.len(), N, "each message once");
        for (i, m) in inbox.iter().enumerate() {
            let m = String::from_utf8_lossy(m);
            assert!(m.contains("with ESMTPSA"), "TLS and peer AUTH: {m}");
            assert!(m.ends_with(&format!("for {who} {i}\r\n")), "in order: {m}");
        }
    }
    assert_eq!(b_opened.load(Ordering::SeqCst), 1, "one session to b");
    assert_eq!(c_opened.load(Ordering::SeqCst), 1, "one session to c");
    // The pass closed its sessions when it was done.
    for _ in 0..50 {
        if b_closed.load(Ordering::SeqCst) == 1 && c_closed.load(Ordering::SeqCst) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(b_closed.load(Ordering::SeqCst), 1, "session to b closed");
    assert_eq!(c_closed.load(Ordering::SeqCst), 1, "session to c closed");
}

/// What a [`scripted_peer`] saw.
#[derive(Default)]
struct PeerLog {
    connections: std::sync::atomic::AtomicUsize,
    /// The bodies received (end of DATA seen), in order, answered or not.
    bodies: std::sync::Mutex<Vec<String>>,
}

/// A minimal SMTP peer. Each connection is closed, without a word, after `per_session`
/// accepted messages; the `die_on`-th body overall (1-based) is read but never answered (the
/// connection is closed instead).
async fn scripted_peer(
    per_session: usize,
    die_on: Option<usize>,
) -> (std::net::SocketAddr, Arc<PeerLog>) {
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let log = Arc::new(PeerLog::default());
    let peer_log = log.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            peer_log.connections.fetch_add(1, Ordering::SeqCst);
            let log = peer_log.clone();
            tokio::spawn(async move {
                let mut s = tokio::io::BufReader::new(s);
                let _ = s.get_mut().write_all(b"220 scripted ESMTP\r\n").await;
                let mut accepted = 0;
                let mut line = String::new();
                while s.read_line(&mut line).await.unwrap_or(0) > 0 {
                    let reply: &[u8] = match line.get(..4).unwrap_or("") {
                        "EHLO" => b"250-scripted\r\n250 SIZE 100000000\r\n",
                        "AUTH" => b"235 ok\r\n",
                        "QUIT" => b"221 bye\r\n",
                        "DATA" => b"354 go\r\n",
                        _ => b"250 ok\r\n",
                    };
                    let _ = s.get_mut().write_all(reply).await;
                    if line.starts_with("QUIT") {
                        return;
                    }
                    if line.starts_with("DATA") {
                        let mut body = String::new();
                        loop {
                            let mut l = String::new();
                            if s.read_line(&mut l).await.unwrap_or(0) == 0 {
                                return;
                            }
                            if l == ".\r\n" {
                                break;
                            }
                            body.push_str(&l);
                        }
                        let n = {
                            let mut bodies = log.bodies.lock().unwrap();
                            bodies.push(body);
                            bodies.len()
                        };
                        if die_on == Some(n) {
                            return;
                        }
                        let _ = s.get_mut().write_all(b"250 queued\r\n").await;
                        accepted += 1;
                        if accepted == per_session {
                            return;
                        }
                    }
                    line.clear();
                }
            });
        }
    });
    (addr, log)
}

#[tokio::test]
async fn a_reused_session_closed_between_messages_is_reopened_once() {
    use std::sync::atomic::Ordering;
    // The peer drops every session after two messages: the third finds its cached session
    // dead at RSET and goes over a new one, in the same pass.
    let (peer, log) = scripted_peer(2, None).await;
    let mut opts = NodeOptions::new("a", &[ALICE]);
    opts.plaintext_relay();
    opts.queue_runner = false;
    let a = start_with(opts).await;
    let endpoint = peer.to_string();
    for i in 0..5 {
        enqueue_for(
            &a,
            BOB,
            "b",
            &endpoint,
            &format!("Subject: {i}\r\n\r\nmessage {i}\r\n"),
        );
    }
    a.smtp.queue_runner().run_once().await.unwrap();
    assert!(a.queue.is_empty(), "{:?}", a.queue.list().unwrap());
    let bodies = log.bodies.lock().unwrap().clone();
    let expected: Vec<String> = (0..5)
        .map(|i| format!("Subject: {i}\r\n\r\nmessage {i}\r\n"))
        .collect();
    assert_eq!(bodies, expected, "every message once, in order");
    assert_eq!(log.connections.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn a_reused_session_lost_after_the_body_keeps_that_entry_only() {
    use std::sync::atomic::Ordering;
    // The session dies after the second body, before its reply: that entry stays queued with
    // its error (not sent again in this pass); the ones before and after are relayed.
    let (peer, log) = scripted_peer(usize::MAX, Some(2)).await;
    let mut opts = NodeOptions::new("a", &[ALICE]);
    opts.plaintext_relay();
    opts.queue_runner = false;
    let a = start_with(opts).await;
    let endpoint = peer.to_string();
    let ids: Vec<u64> = (0..3)
        .map(|i| {
            enqueue_for(
                &a,
                BOB,
                "b",
                &endpoint,
                &format!("Subject: {i}\r\n\r\nmessage {i}\r\n"),
            )
        })
        .collect();
    a.smtp.queue_runner().run_once().await.unwrap();
    let bodies = log.bodies.lock().unwrap().clone();
    let expected: Vec<String> = (0..3)
        .map(|i| format!("Subject: {i}\r\n\r\nmessage {i}\r\n"))
        .collect();
    assert_eq!(
        bodies, expected,
        "the unanswered message is not sent again at once"
    );
    assert_eq!(log.connections.load(Ordering::SeqCst), 2);
    let entries = a.queue.list().unwrap();
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entries[0].id, ids[1]);
    assert_eq!(entries[0].attempts, 1);
    assert_eq!(
        entries[0].recipients[0].state,
        ds_store::queue::RecipientState::Pending
    );
    let error = entries[0].last_error.clone().unwrap_or_default();
    assert!(error.contains("connection closed"), "{error}");
}

#[tokio::test]
async fn no_relay_key_without_verified_tls() {
    // #13 point 2: without a cluster CA the relay key is never sent; the message waits.
    let b = start("b", &[BOB]).await;
    let mut opts = NodeOptions::new("a", &[ALICE]);
    opts.relay_tls = None;
    opts.queue_runner = false;
    let a = start_with(opts).await;
    a.locator.set_remote(BOB, "b", &b.addr.to_string());
    send_simple(&a, ALICE, &[BOB], "Subject: x\r\n\r\nx\r\n").await;
    a.smtp.queue_runner().run_once().await.unwrap();
    let entries = a.queue.list().unwrap();
    assert_eq!(entries.len(), 1, "kept for a retry");
    let error = entries[0].last_error.clone().unwrap_or_default();
    assert!(error.contains("never sent in plaintext"), "{error}");
    assert!(b.inbox(BOB).is_empty());
}

#[tokio::test]
async fn list_member_or_keeper_not_located_now_is_queued_and_located_later() {
    // #13 point 9: a member whose lookup fails and a keeper that cannot be asked are queued,
    // not skipped, and get the post once they can be located.
    let carol = "carol@company.com";
    let b = start("b", &[BOB, carol]).await;
    b.directory.add_list("team").unwrap();
    b.directory.subscribe("team", BOB).unwrap();
    let mut opts = NodeOptions::new("a", &[ALICE]);
    opts.queue_runner = false;
    let a = start_with(opts).await;
    a.directory.add_list("team").unwrap();
    a.directory.subscribe("team", ALICE).unwrap();
    a.directory.subscribe("team", carol).unwrap();
    a.locator.located.lock().unwrap().insert(
        carol.to_string(),
        ds_smtp::Location::TempFail("peer b unreachable".into()),
    );
    *a.locator.keepers_down.lock().unwrap() = true;
    send_simple(
        &a,
        "x@outside.org",
        &["team@company.com"],
        "Subject: team\r\n\r\nhello team\r\n",
    )
    .await;
    assert_eq!(a.inbox(ALICE).len(), 1, "local members get it at once");
    a.smtp.queue_runner().run_once().await.unwrap();
    let entries = a.queue.list().unwrap();
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert!(
        entries[0]
            .pending()
            .any(|r| r.address == "team@company.com")
    );
    assert!(b.inbox(BOB).is_empty() && b.inbox(carol).is_empty());

    // The peer is back and keeps the list: it gets one copy for its members (carol lives on b,
    // so b's copy covers her as usual).
    a.locator.located.lock().unwrap().clear();
    a.locator.set_remote(carol, "b", &b.addr.to_string());
    *a.locator.keepers_down.lock().unwrap() = false;
    a.locator.keepers.lock().unwrap().insert(
        "team@company.com".into(),
        vec![ds_smtp::ListKeeper {
            node: "b".into(),
            smtp: b.addr.to_string(),
        }],
    );
    for e in a.queue.list().unwrap() {
        a.queue.retry_now(e.id).unwrap();
    }
    for _ in 0..50 {
        a.smtp.queue_runner().run_once().await.unwrap();
        if a.queue.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(a.queue.is_empty(), "{:?}", a.queue.list().unwrap());
    assert_eq!(b.wait_inbox(BOB, 1, 10).await.len(), 1, "the keeper's copy");
    assert_eq!(a.inbox(ALICE).len(), 1, "no second local copy");
}

#[tokio::test]
async fn list_member_whose_lookup_fails_is_queued() {
    let carol = "carol@company.com";
    let b = start("b", &[carol]).await;
    let mut opts = NodeOptions::new("a", &[ALICE]);
    opts.queue_runner = false;
    let a = start_with(opts).await;
    a.directory.add_list("team").unwrap();
    a.directory.subscribe("team", ALICE).unwrap();
    a.directory.subscribe("team", carol).unwrap();
    a.locator.located.lock().unwrap().insert(
        carol.to_string(),
        ds_smtp::Location::TempFail("peer b unreachable".into()),
    );
    send_simple(
        &a,
        "x@outside.org",
        &["team@company.com"],
        "Subject: t\r\n\r\nhi\r\n",
    )
    .await;
    assert_eq!(a.inbox(ALICE).len(), 1);
    let entries = a.queue.list().unwrap();
    assert_eq!(entries.len(), 1, "carol's copy is queued, not skipped");
    assert!(
        entries[0]
            .pending()
            .any(|r| r.address == carol && r.owner.is_none())
    );
    a.smtp.queue_runner().run_once().await.unwrap();
    assert_eq!(a.queue.list().unwrap().len(), 1, "still waiting");
    a.locator.located.lock().unwrap().clear();
    a.locator.set_remote(carol, "b", &b.addr.to_string());
    for e in a.queue.list().unwrap() {
        a.queue.retry_now(e.id).unwrap();
    }
    a.smtp.queue_runner().run_once().await.unwrap();
    assert_eq!(b.wait_inbox(carol, 1, 10).await.len(), 1);
    assert!(a.queue.is_empty());
}

#[tokio::test]
async fn dsn_for_a_sender_outside_the_cluster_stays_queued() {
    // #13 point 10: no outbound delivery yet, so the DSN waits in the queue (never dropped).
    let c = start("c", &[]).await;
    let mut opts = NodeOptions::new("a", &[ALICE]);
    opts.queue_runner = false;
    let a = start_with(opts).await;
    let ghost = "ghost@company.com";
    a.locator.set_remote(ghost, "c", &c.addr.to_string());
    send_simple(&a, "x@outside.org", &[ghost], "Subject: lost\r\n\r\nx\r\n").await;
    a.smtp.queue_runner().run_once().await.unwrap();
    let entries = a.queue.list().unwrap();
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entries[0].sender, "", "the DSN");
    assert_eq!(entries[0].recipients[0].address, "x@outside.org");
    for e in a.queue.list().unwrap() {
        a.queue.retry_now(e.id).unwrap();
    }
    a.smtp.queue_runner().run_once().await.unwrap();
    let entries = a.queue.list().unwrap();
    assert_eq!(entries.len(), 1, "still queued after another attempt");
    let error = entries[0].last_error.clone().unwrap_or_default();
    assert!(error.contains("outside the cluster"), "{error}");
}

#[tokio::test]
async fn a_black_holed_owner_does_not_hold_other_owners_mail() {
    // #13 point 16: bob's owner accepts TCP and never answers; carol's mail, queued while
    // bob's relay waits out its timeout, goes out meanwhile.
    let hole = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hole_addr = hole.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = hole.accept().await {
            held.push(s);
        }
    });
    let carol = "carol@company.com";
    let c = start("c", &[carol]).await;
    let mut opts = NodeOptions::new("a", &[ALICE]);
    opts.config.relay_timeout = Duration::from_secs(60);
    let a = start_with(opts).await;
    a.locator.set_remote(BOB, "b", &hole_addr.to_string());
    a.locator.set_remote(carol, "c", &c.addr.to_string());
    for i in 0..3 {
        send_simple(
            &a,
            ALICE,
            &[BOB],
            &format!("Subject: to the hole {i}\r\n\r\nx\r\n"),
        )
        .await;
    }
    // The runner is now waiting on the black hole.
    tokio::time::sleep(Duration::from_millis(300)).await;
    send_simple(&a, ALICE, &[carol], "Subject: for carol\r\n\r\nx\r\n").await;
    // Well under the 60 s relay timeout bob's worker is waiting out.
    assert_eq!(c.wait_inbox(carol, 1, 20).await.len(), 1);
    assert_eq!(a.queue.len(), 3, "bob's mail waits");
}

/// Sends `bytes` one at a time, 100 ms apart, until the server closes; returns what it answered.
async fn trickle(addr: std::net::SocketAddr, preamble: &[u8], bytes: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(preamble).await.unwrap();
    let (mut r, mut w) = s.into_split();
    let reader = tokio::spawn(async move {
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(30), r.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    });
    for b in bytes {
        if w.write_all(&[*b]).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        if reader.is_finished() {
            break;
        }
    }
    drop(w);
    reader.await.unwrap()
}

#[tokio::test]
async fn a_slow_command_line_and_a_slow_data_transfer_hit_their_deadlines() {
    // #13 point 8: a byte every 100 ms never counts as idle, but a whole line and a whole
    // DATA transfer have deadlines.
    let mut opts = NodeOptions::new("a", &[ALICE]);
    opts.config.idle_timeout = Duration::from_secs(1);
    let node = start_with(opts).await;
    let answer = trickle(node.addr, b"", &[b'x'; 40]).await;
    assert!(answer.contains("421 4.4.2"), "{answer}");

    let mut opts = NodeOptions::new("a", &[ALICE]);
    opts.config.idle_timeout = Duration::from_secs(5);
    opts.config.data_timeout = Duration::from_secs(1);
    let node = start_with(opts).await;
    let preamble =
        format!("EHLO c.example\r\nMAIL FROM:<x@outside.org>\r\nRCPT TO:<{ALICE}>\r\nDATA\r\n");
    let answer = trickle(node.addr, preamble.as_bytes(), &[b'y'; 60]).await;
    assert!(answer.contains("354 "), "{answer}");
    assert!(answer.contains("421 4.4.2"), "{answer}");
    assert!(node.inbox(ALICE).is_empty());
}

#[tokio::test]
async fn a_router_error_record_reaches_the_client_as_its_text() {
    // #13 point 17: `error:text` gives `550 5.1.1 <text>` (one safe line), not a generic reply.
    let node = start("a", &[ALICE]).await;
    node.locator.located.lock().unwrap().insert(
        "old@company.com".into(),
        ds_smtp::Location::Refused("moved to new@company.com\r\n250 ok".into()),
    );
    let mut c = connect(node.addr).await;
    c.cmd("EHLO client.example").await;
    c.cmd("MAIL FROM:<x@outside.org>").await;
    let reply = c.cmd("RCPT TO:<old@company.com>").await;
    assert_eq!(reply, "550 5.1.1 moved to new@company.com  250 ok\r\n");
}

#[tokio::test]
async fn a_relay_repeated_by_a_restarted_sender_is_stored_once() {
    // #13 point 18: the sender relays, the owner delivers and answers 250, the sender dies
    // before it records that and relays the same queue entry again after its restart. Two
    // senders with the same node id and the same queue entry (same id, same creation time)
    // stand for the sender before and after the crash; both use the real relay client over
    // TLS with peer AUTH to a real owner.
    let b = start("b", &[BOB]).await;
    let endpoint = format!("localhost:{}", b.addr.port());
    let created = unix_now();
    let mut ids = Vec::new();
    let mut senders = Vec::new();
    for _ in 0..2 {
        let mut opts = NodeOptions::new("a", &[ALICE]);
        opts.queue_runner = false;
        let a = start_with(opts).await;
        let r = ds_store::queue::QueuedRecipient {
            address: BOB.into(),
            owner: Some("b".into()),
            endpoint: Some(endpoint.clone()),
            state: ds_store::queue::RecipientState::Pending,
            dsn: Default::default(),
        };
        ids.push(
            a.queue
                .enqueue(
                    ALICE,
                    vec![r],
                    b"Subject: once\r\n\r\nonly once\r\n",
                    false,
                    created,
                )
                .unwrap(),
        );
        senders.push(a);
    }
    assert_eq!(
        ids[0], ids[1],
        "the same queue entry before and after the crash"
    );
    for a in &senders {
        a.smtp.queue_runner().run_once().await.unwrap();
        // 250 from the owner: the entry is done, without a bounce to the sender.
        assert!(a.queue.is_empty(), "{:?}", a.queue.list().unwrap());
        assert!(a.inbox(ALICE).is_empty(), "no DSN: the owner answered 250");
    }
    let inbox = b.inbox(BOB);
    assert_eq!(inbox.len(), 1, "stored once");
    assert!(String::from_utf8_lossy(&inbox[0]).ends_with("only once\r\n"));
    assert_eq!(b.mail.relay_marks().len(), 1);
    // Another message of the same sender is a message of its own.
    let a = &senders[1];
    enqueue_for(a, BOB, "b", &endpoint, "Subject: two\r\n\r\nanother\r\n");
    a.smtp.queue_runner().run_once().await.unwrap();
    assert_eq!(b.inbox(BOB).len(), 2);
}

#[tokio::test]
async fn relay_ids_are_taken_from_peers_only_and_a_repeat_gets_250_without_a_copy() {
    let carol = "carol@company.com";
    let node = start_with(NodeOptions::plain("b", &[BOB, carol])).await;
    let mut c = connect(node.addr).await;
    let ehlo = c.cmd("EHLO a.test").await;
    assert!(ehlo.contains("XDSHARE-ID"), "{ehlo}");
    // Not a peer: the parameter is refused like any unknown one.
    c.expect("MAIL FROM:<x@outside.org> XDSHARE-ID=17.1", "555 5.5.4")
        .await;
    let token = b64(format!("\0dshare-peer/a\0{SECRET}").as_bytes());
    c.expect(&format!("AUTH PLAIN {token}"), "235").await;
    for round in 0..2 {
        c.expect("MAIL FROM:<x@outside.org> SIZE=40 XDSHARE-ID=17.1", "250")
            .await;
        c.expect("RCPT TO:<bob@company.com>", "250 2.1.5").await;
        c.cmd("DATA").await;
        let reply = c
            .expect("Subject: relayed\r\n\r\nhop\r\n.", "250 2.0.0")
            .await;
        assert!(reply.contains("id="), "round {round}: {reply}");
    }
    assert_eq!(node.inbox(BOB).len(), 1, "the repeat is not stored");
    // The same message with one more recipient: only the new one gets it.
    c.cmd("MAIL FROM:<x@outside.org> XDSHARE-ID=17.1").await;
    c.expect("RCPT TO:<bob@company.com>", "250").await;
    c.expect("RCPT TO:<carol@company.com>", "250").await;
    c.cmd("DATA").await;
    c.expect("Subject: relayed\r\n\r\nhop\r\n.", "250 2.0.0")
        .await;
    assert_eq!(node.inbox(BOB).len(), 1);
    assert_eq!(node.inbox(carol).len(), 1);
    // Another message id is another message; without one a hop delivers as before.
    c.cmd("MAIL FROM:<x@outside.org> XDSHARE-ID=17.2").await;
    c.cmd("RCPT TO:<bob@company.com>").await;
    c.cmd("DATA").await;
    c.expect("second\r\n.", "250 2.0.0").await;
    c.cmd("MAIL FROM:<x@outside.org>").await;
    c.cmd("RCPT TO:<bob@company.com>").await;
    c.cmd("DATA").await;
    c.expect("third\r\n.", "250 2.0.0").await;
    assert_eq!(node.inbox(BOB).len(), 3);
    assert_eq!(node.mail.relay_marks().len(), 3);
}

/// A peer that takes one message per connection and answers its DATA only when `go` is
/// notified; the bodies it received are in the returned list.
async fn gated_peer() -> (
    std::net::SocketAddr,
    Arc<std::sync::Mutex<Vec<String>>>,
    Arc<tokio::sync::Notify>,
) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let bodies = Arc::new(std::sync::Mutex::new(Vec::new()));
    let go = Arc::new(tokio::sync::Notify::new());
    let (log, gate) = (bodies.clone(), go.clone());
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let (log, gate) = (log.clone(), gate.clone());
            tokio::spawn(async move {
                let mut s = tokio::io::BufReader::new(s);
                let _ = s.get_mut().write_all(b"220 gated ESMTP\r\n").await;
                let mut line = String::new();
                while s.read_line(&mut line).await.unwrap_or(0) > 0 {
                    let reply: &[u8] = match line.get(..4).unwrap_or("") {
                        "EHLO" => b"250-gated\r\n250 SIZE 100000000\r\n",
                        "QUIT" => b"221 bye\r\n",
                        "DATA" => b"354 go\r\n",
                        _ => b"250 ok\r\n",
                    };
                    let _ = s.get_mut().write_all(reply).await;
                    if line.starts_with("DATA") {
                        let mut body = String::new();
                        loop {
                            let mut l = String::new();
                            if s.read_line(&mut l).await.unwrap_or(0) == 0 {
                                return;
                            }
                            if l == ".\r\n" {
                                break;
                            }
                            body.push_str(&l);
                        }
                        log.lock().unwrap().push(body);
                        gate.notified().await;
                        let _ = s.get_mut().write_all(b"250 queued\r\n").await;
                    }
                    line.clear();
                }
            });
        }
    });
    (addr, bodies, go)
}

/// #13 point 15: an operator's `queue retry` while the entry is being relayed leaves it to
/// that attempt (the worker holds a claim on it): no second pass takes it, and once the owner
/// answers it is gone; the owner got it exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_during_a_relay_does_not_send_twice() {
    let (peer, bodies, go) = gated_peer().await;
    let mut opts = NodeOptions::new("a", &[ALICE]);
    opts.plaintext_relay();
    opts.queue_runner = false;
    let a = start_with(opts).await;
    let body = "Subject: once\r\n\r\nonce\r\n";
    let id = enqueue_for(&a, BOB, "b", &peer.to_string(), body);
    let runner = a.smtp.queue_runner();
    let pass = tokio::spawn(async move { runner.run_once().await.unwrap() });
    for _ in 0..400 {
        if !bodies.lock().unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(bodies.lock().unwrap().len(), 1, "the relay reached DATA");
    assert!(a.queue.is_claimed(id));
    assert!(!a.queue.retry_now(id).unwrap(), "being relayed: left alone");
    assert_eq!(a.queue.len(), 1);
    // Another pass meanwhile starts nothing for it.
    a.smtp.queue_runner().run_once().await.unwrap();
    go.notify_one();
    tokio::time::timeout(Duration::from_secs(30), pass)
        .await
        .unwrap()
        .unwrap();
    assert!(a.queue.is_empty(), "{:?}", a.queue.list().unwrap());
    assert!(!a.queue.is_claimed(id));
    a.smtp.queue_runner().run_once().await.unwrap();
    assert_eq!(bodies.lock().unwrap().clone(), [body.to_string()]);
}
