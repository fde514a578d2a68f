//! SMTP across three real nodes: local delivery, relays to the owner, temporary failures,
//! the durable queue, lists, and byte-exact bodies (DESIGN.md §4, §6).

use std::time::Duration;

use ds_cluster::Purpose;
use ds_testkit::{Cluster, TestNode};
use dshare_e2e::{Smtp, eventually, message, python};

fn queue_empty(n: &TestNode) -> bool {
    n.node().state.queue.is_empty()
}

/// node-a learns that carol lives on node-c, node-c stops, and a message for carol is
/// accepted by node-a into its queue.
async fn queue_for_stopped_owner(c: &mut Cluster, subject: &str) -> anyhow::Result<()> {
    let loc = c
        .node(0)
        .node()
        .state
        .locator
        .locate("carol@example.com", Purpose::Rcpt)
        .await;
    anyhow::ensure!(matches!(loc, ds_cluster::Location::Remote(_)), "{loc:?}");
    c.node_mut(2).stop().await;
    let mut s = Smtp::connect(c.node(0).smtp()).await?;
    let r = s
        .send(
            "x@elsewhere.org",
            &["carol@example.com"],
            &message(subject, 2048),
        )
        .await?;
    anyhow::ensure!(r.iter().all(|r| r.is(250)), "{r:?}");
    s.quit().await
}

async fn cluster() -> anyhow::Result<Cluster> {
    Cluster::start_with(3, |_, c| {
        c.smtp.retry_base = Duration::from_secs(1);
        c.smtp.retry_max = Duration::from_secs(2);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_and_relayed_delivery_with_python_smtplib() -> anyhow::Result<()> {
    let c = cluster().await?;
    c.node(0).add_account("alice@example.com", "pw").await?;
    c.node(2).add_account("carol@example.com", "pw").await?;
    let a = c.node(0).smtp();
    let out = python(&format!(
        r#"
import smtplib
s = smtplib.SMTP("{}", {}, timeout=30)
s.ehlo("py.test")
refused = s.sendmail("someone@elsewhere.org", ["alice@example.com", "Carol@Example.com"],
    "Subject: hello\r\nMessage-ID: <py1@test>\r\n\r\nHello from Python.\r\n")
print("refused", refused)
try:
    s.sendmail("someone@elsewhere.org", ["nobody@example.com"], "Subject: x\r\n\r\nx\r\n")
except smtplib.SMTPRecipientsRefused as e:
    print("nobody", e.recipients["nobody@example.com"][0])
s.quit()
"#,
        a.ip(),
        a.port()
    ))?;
    assert!(out.contains("refused {}"), "{out}");
    assert!(out.contains("nobody 550"), "{out}");

    let alice = c.node(0).inbox("alice@example.com");
    assert_eq!(alice.len(), 1);
    let text = String::from_utf8_lossy(&alice[0]);
    assert!(
        text.starts_with("Return-Path: <someone@elsewhere.org>"),
        "{text}"
    );
    assert!(text.contains("Received: from py.test"), "{text}");
    assert!(text.ends_with("Hello from Python.\r\n"), "{text}");

    assert!(
        eventually(Duration::from_secs(20), || c
            .node(2)
            .inbox("carol@example.com")
            .len()
            == 1)
        .await,
        "relayed message did not reach node-c"
    );
    let carol = String::from_utf8_lossy(&c.node(2).inbox("carol@example.com")[0]).into_owned();
    assert!(carol.contains("Message-ID: <py1@test>"), "{carol}");
    assert!(
        carol.starts_with("Return-Path: <someone@elsewhere.org>"),
        "{carol}"
    );
    // Nothing landed anywhere else, and the queue drained.
    assert!(c.node(0).inbox("carol@example.com").is_empty());
    assert!(eventually(Duration::from_secs(5), || queue_empty(c.node(0))).await);
    c.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reply_codes_follow_the_locator() -> anyhow::Result<()> {
    let mut c = cluster().await?;
    c.node(2).add_account("carol@example.com", "pw").await?;
    let mut s = Smtp::connect(c.node(0).smtp()).await?;
    assert!(s.cmd("MAIL FROM:<x@elsewhere.org>").await?.is(250));
    let r = s.cmd("RCPT TO:<nobody@example.com>").await?;
    assert_eq!((r.code, &r.text[..5]), (550, "5.1.1"), "{r:?}");
    let r = s.cmd("RCPT TO:<someone@elsewhere.org>").await?;
    assert_eq!((r.code, &r.text[..5]), (554, "5.7.1"), "{r:?}");
    s.cmd("RSET").await?;
    // The sender check: a shared-domain sender nobody owns.
    let r = s.cmd("MAIL FROM:<ghost@example.com>").await?;
    assert_eq!((r.code, &r.text[..5]), (550, "5.1.0"), "{r:?}");
    s.quit().await?;

    // Owner stopped and not cached: a temporary failure, never "unknown".
    c.node_mut(2).stop().await;
    let mut s = Smtp::connect(c.node(0).smtp()).await?;
    assert!(s.cmd("MAIL FROM:<x@elsewhere.org>").await?.is(250));
    let r = s.cmd("RCPT TO:<carol@example.com>").await?;
    assert_eq!((r.code, &r.text[..5]), (451, "4.4.3"), "{r:?}");
    // (Addresses not asked about before: every peer's "no" a moment ago is cached briefly.)
    let r = s.cmd("RCPT TO:<nobody2@example.com>").await?;
    assert_eq!((r.code, &r.text[..5]), (451, "4.4.3"), "{r:?}");
    s.cmd("RSET").await?;
    let r = s.cmd("MAIL FROM:<ghost2@example.com>").await?;
    assert_eq!((r.code, &r.text[..5]), (451, "4.4.3"), "{r:?}");
    s.quit().await?;
    c.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_owner_stopped_message_waits_in_the_queue() -> anyhow::Result<()> {
    let mut c = cluster().await?;
    c.node(2).add_account("carol@example.com", "pw").await?;
    queue_for_stopped_owner(&mut c, "queued").await?;
    let q = c.node(0).node().state.queue_report().unwrap().join("\n");
    assert!(q.contains("carol@example.com"), "{q}");

    // Let a retry fail while the owner is down, then bring it back: the back-off (1–2 s
    // here) delivers it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(c.node(0).node().state.queue.len(), 1);
    c.node_mut(2).restart().await?;
    let carol = || c.node(2).inbox("carol@example.com").len() == 1;
    assert!(
        eventually(Duration::from_secs(30), carol).await,
        "queued message was not delivered after the owner came back"
    );
    assert!(eventually(Duration::from_secs(5), || queue_empty(c.node(0))).await);
    c.shutdown().await;
    Ok(())
}

/// `dshare queue retry` delivers now what the back-off would only try in a minute, and
/// `queue delete` of an unknown id is an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_retry_delivers_before_the_back_off() -> anyhow::Result<()> {
    let mut c = Cluster::start_with(3, |_, cfg| {
        cfg.smtp.retry_base = Duration::from_secs(60);
        cfg.smtp.retry_max = Duration::from_secs(60);
    })
    .await?;
    c.node(2).add_account("carol@example.com", "pw").await?;
    queue_for_stopped_owner(&mut c, "retry").await?;

    // The first attempt fails at once and the next one is a minute away.
    let a = &c.node(0).node().state;
    let failed = || {
        a.queue
            .list()
            .ok()
            .and_then(|l| l.first().cloned())
            .is_some_and(|e| e.attempts >= 1)
    };
    assert!(eventually(Duration::from_secs(10), failed).await);
    let id = a.queue.list()?[0].id;
    c.node_mut(2).restart().await?;
    let carol = || c.node(2).inbox("carol@example.com").len() == 1;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !carol(),
        "delivered before the back-off ended without a retry"
    );

    let a = &c.node(0).node().state;
    assert!(a.queue_delete(999_999).is_err());
    assert!(a.queue_retry(999_999).is_err());
    a.queue_retry(id).map_err(anyhow::Error::msg)?;
    assert!(
        eventually(Duration::from_secs(20), carol).await,
        "queue retry did not deliver"
    );
    assert!(eventually(Duration::from_secs(5), || queue_empty(c.node(0))).await);
    c.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_post_reaches_members_on_every_node_once() -> anyhow::Result<()> {
    let c = cluster().await?;
    let members = ["alice", "bob", "carol"];
    for (i, m) in members.iter().enumerate() {
        let n = c.node(i);
        n.add_account(&format!("{m}@example.com"), "pw").await?;
        let dir = &n.node().state.directory;
        dir.add_list("team@example.com")?;
        dir.subscribe("team@example.com", &format!("{m}@example.com"))?;
    }
    let mut s = Smtp::connect(c.node(1).smtp()).await?;
    let r = s
        .send(
            "x@elsewhere.org",
            &["team@example.com"],
            &message("listpost", 1024),
        )
        .await?;
    assert!(r.iter().all(|r| r.is(250)), "{r:?}");
    s.quit().await?;
    for (i, m) in members.iter().enumerate() {
        let addr = format!("{m}@example.com");
        assert!(
            eventually(Duration::from_secs(20), || c.node(i).inbox(&addr).len()
                == 1)
            .await,
            "{addr} did not get the post"
        );
    }
    // No duplicates turn up later.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for (i, m) in members.iter().enumerate() {
        assert_eq!(c.node(i).inbox(&format!("{m}@example.com")).len(), 1, "{m}");
    }
    c.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_arrive_byte_exact_through_a_relay() -> anyhow::Result<()> {
    let c = cluster().await?;
    c.node(2).add_account("carol@example.com", "pw").await?;
    let mut dotted = b"Subject: dots\r\n\r\n.\r\n..\r\n.leading dot\r\nend\r\n".to_vec();
    dotted.extend_from_slice(b"8-bit: \xc3\xa9t\xc3\xa9 \xff\xfe\r\n");
    let mut big = message("big", 20 * 1024 * 1024);
    big.extend_from_slice(b".\r\n..two\r\n\xe2\x82\xac\r\n");
    let mut s = Smtp::connect(c.node(0).smtp()).await?;
    for body in [&dotted, &big] {
        let r = s
            .send("x@elsewhere.org", &["carol@example.com"], body)
            .await?;
        assert!(r.iter().all(|r| r.is(250)), "{r:?}");
    }
    s.quit().await?;
    assert!(
        eventually(Duration::from_secs(60), || c
            .node(2)
            .inbox("carol@example.com")
            .len()
            == 2)
        .await
    );
    let got = c.node(2).inbox("carol@example.com");
    assert!(got[0].ends_with(&dotted), "dot-stuffed/8-bit body changed");
    assert!(got[1].ends_with(&big), "20 MiB body changed");
    assert!(got[1].len() < big.len() + 2048);
    c.shutdown().await;
    Ok(())
}

/// Issue 13 point 6: 100 unknown RCPTs pipelined in one transaction for a shared domain,
/// with the peer up: only the connection's budget of them asks the peer (550 5.1.1), the
/// rest get 451 at once; a new connection has a new budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_pipelined_rcpts_fan_out_only_within_the_connection_budget() -> anyhow::Result<()> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let c = Cluster::start_with(2, |_, cfg| cfg.cluster.fanouts_per_connection = 5).await?;
    c.node(1).add_account("bob@example.com", "pw").await?;
    let replies = |tag: &'static str| {
        let addr = c.node(0).smtp();
        async move {
            let mut s = tokio::net::TcpStream::connect(addr).await?;
            let mut batch = String::from("EHLO client.example\r\nMAIL FROM:<x@elsewhere.org>\r\n");
            for i in 0..100 {
                batch.push_str(&format!("RCPT TO:<nobody-{tag}-{i}@example.com>\r\n"));
            }
            batch.push_str("QUIT\r\n");
            s.write_all(batch.as_bytes()).await?;
            let mut lines = BufReader::new(s).lines();
            let mut codes = Vec::new();
            while let Some(line) =
                tokio::time::timeout(Duration::from_secs(60), lines.next_line()).await??
            {
                if line.len() >= 4 && &line[3..4] == " " {
                    codes.push(line[..3].to_string());
                }
            }
            anyhow::Ok(codes)
        }
    };
    let codes = replies("a").await?;
    // greeting, EHLO, MAIL, 100 x RCPT, QUIT
    anyhow::ensure!(codes.len() == 104, "{codes:?}");
    let rcpts = &codes[3..103];
    let asked = rcpts.iter().filter(|c| *c == "550").count();
    let deferred = rcpts.iter().filter(|c| *c == "451").count();
    anyhow::ensure!(
        asked == 5 && deferred == 95,
        "550: {asked}, 451: {deferred}"
    );
    // The budget is per connection, and a known owner still answers (cached or not).
    let mut s = Smtp::connect(c.node(0).smtp()).await?;
    let r = s
        .send("x@elsewhere.org", &["bob@example.com"], &message("hi", 100))
        .await?;
    anyhow::ensure!(r.iter().all(|r| r.is(250)), "{r:?}");
    s.quit().await?;
    c.shutdown().await;
    Ok(())
}

/// #13 point 19: below the data disk's free-space reserve new mail gets `452 4.3.1` (MAIL
/// FROM, and DATA of a transaction begun before) and IMAP APPEND `NO [OVERQUOTA]`, while POP3
/// and IMAP keep serving the mail already there; once the reserve is met again (here: the
/// reserve lowered at run time, as freed space would) mail flows without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn below_the_free_space_reserve_new_mail_waits_and_reads_go_on() -> anyhow::Result<()> {
    let c = Cluster::start(1).await?;
    let n = c.node(0);
    n.add_account("alice@example.com", "pw").await?;
    let store = n.node().state.store.clone();
    assert_eq!(store.min_free_space(), ds_store::DEFAULT_MIN_FREE_SPACE);
    let mut s = Smtp::connect(n.smtp()).await?;
    let r = s
        .send(
            "x@elsewhere.org",
            &["alice@example.com"],
            &message("before", 4096),
        )
        .await?;
    anyhow::ensure!(r.iter().all(|r| r.is(250)), "{r:?}");

    // A transaction begun before the disk filled up, and one after.
    anyhow::ensure!(s.cmd("MAIL FROM:<x@elsewhere.org>").await?.is(250));
    anyhow::ensure!(s.cmd("RCPT TO:<alice@example.com>").await?.is(250));
    store.set_min_free_space(u64::MAX);
    let data = s.cmd("DATA").await?;
    assert!(data.is(452) && data.text.starts_with("4.3.1"), "{data:?}");
    let mail = s.cmd("MAIL FROM:<x@elsewhere.org>").await?;
    assert!(mail.is(452) && mail.text.starts_with("4.3.1"), "{mail:?}");
    anyhow::ensure!(s.cmd("NOOP").await?.is(250), "the session goes on");

    let reads = || {
        python(&format!(
            r#"
import imaplib, poplib
p = poplib.POP3("{ip}", {pop3}, timeout=30)
p.user("alice"); p.pass_("pw")
print("stat", p.stat()[0])
print("retr", len(p.retr(1)[1]) > 10)
p.quit()
m = imaplib.IMAP4("{ip}", {imap}, timeout=30)
m.login("alice", "pw")
print("select", m.select("INBOX")[1][0].decode())
try:
    print("append", m.append("INBOX", None, None, b"Subject: appended\r\n\r\nx\r\n"))
except imaplib.IMAP4.error as e:
    print("append", e)
m.logout()
"#,
            ip = n.pop3().ip(),
            pop3 = n.pop3().port(),
            imap = n.imap().port(),
        ))
    };
    let out = reads()?;
    print!("{out}");
    assert!(
        out.contains("stat 1\n") && out.contains("retr True"),
        "{out}"
    );
    assert!(out.contains("select 1\n"), "{out}");
    assert!(out.contains("[OVERQUOTA]"), "{out}");
    assert_eq!(n.inbox_len("alice@example.com"), 1);

    // Space is back: the same session's next message goes through, and APPEND works.
    store.set_min_free_space(store.free_space()? / 2);
    let r = s
        .send(
            "x@elsewhere.org",
            &["alice@example.com"],
            &message("after", 4096),
        )
        .await?;
    anyhow::ensure!(r.iter().all(|r| r.is(250)), "{r:?}");
    s.quit().await?;
    let out = reads()?;
    assert!(out.contains("stat 2\n"), "{out}");
    assert!(out.contains("append ('OK'"), "{out}");
    assert_eq!(n.inbox_len("alice@example.com"), 3);
    Ok(())
}
