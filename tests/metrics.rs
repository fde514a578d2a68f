//! `/metrics` counts what a node did. A test binary of its own: the Prometheus recorder is
//! process-wide, so no other test may add to the counters read here.

use ds_cluster::{Location, Purpose};
use ds_testkit::Cluster;
use dshare_e2e::internet::{Sink, dns_server, queue_error, submit};
use dshare_e2e::{Smtp, eventually, message};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

async fn scrape(addr: std::net::SocketAddr) -> anyhow::Result<String> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await?;
    let mut body = String::new();
    s.read_to_string(&mut body).await?;
    anyhow::ensure!(body.starts_with("HTTP/1.1 200"), "{body}");
    Ok(body)
}

/// The value of the series whose line starts with `series`, 0 if absent.
fn value(body: &str, series: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// The tests of this binary run one at a time: each reads deltas of process-wide counters.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_lookups_cache_hits_and_peer_latency() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let c = Cluster::start(2).await?;
    c.node(1).add_account("bob@example.com", "pw").await?;
    let addr = c.node(0).node().addrs().metrics[0];
    let before = scrape(addr).await?;
    let a = &c.node(0).node().state.locator;
    for _ in 0..3 {
        assert!(matches!(
            a.locate("bob@example.com", Purpose::Rcpt).await,
            Location::Remote(_)
        ));
    }
    let after = scrape(addr).await?;
    let delta = |series: &str| value(&after, series) - value(&before, series);
    assert_eq!(
        delta("dshare_lookups_total{outcome=\"remote\"}"),
        3.0,
        "{after}"
    );
    assert_eq!(
        delta("dshare_lookup_cache_total{result=\"miss\"}"),
        1.0,
        "{after}"
    );
    assert_eq!(
        delta("dshare_lookup_cache_total{result=\"hit\"}"),
        2.0,
        "{after}"
    );
    assert!(
        after.contains("dshare_peer_rpc_seconds_count{peer=\"node-b\"}"),
        "{after}"
    );

    // Relay latency: a message for bob through node-a is relayed to node-b.
    let mut smtp = Smtp::connect(c.node(0).smtp()).await?;
    let replies = smtp
        .send(
            "someone@elsewhere.test",
            &["bob@example.com"],
            &message("hi", 200),
        )
        .await?;
    assert!(replies.iter().all(|r| r.is(250)), "{replies:?}");
    smtp.quit().await?;
    assert!(
        eventually(std::time::Duration::from_secs(20), || c
            .node(1)
            .inbox_len("bob@example.com")
            == 1)
        .await,
        "not relayed"
    );
    // node-a records the relay's time after node-b stored the message: poll for it.
    let mut relayed = scrape(addr).await?;
    for _ in 0..50 {
        if value(&relayed, "dshare_smtp_relay_seconds_count") >= 1.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        relayed = scrape(addr).await?;
    }
    assert!(
        value(&relayed, "dshare_smtp_relay_seconds_count") >= 1.0,
        "{relayed}"
    );

    // POP3 login latency, on node-b (loopback: USER/PASS allowed without TLS).
    let b_metrics = c.node(1).node().addrs().metrics[0];
    let before = scrape(b_metrics).await?;
    let pop = tokio::net::TcpStream::connect(c.node(1).pop3()).await?;
    let mut pop = tokio::io::BufReader::new(pop);
    let mut line = String::new();
    for cmd in ["", "USER bob@example.com\r\n", "PASS pw\r\n", "QUIT\r\n"] {
        pop.get_mut().write_all(cmd.as_bytes()).await?;
        line.clear();
        pop.read_line(&mut line).await?;
        assert!(line.starts_with("+OK"), "{cmd:?}: {line}");
    }
    let after = scrape(b_metrics).await?;
    let series = "dshare_login_seconds_count{protocol=\"pop3\"}";
    assert_eq!(
        value(&after, series) - value(&before, series),
        1.0,
        "{after}"
    );
    c.shutdown().await;
    Ok(())
}

/// One IMAP login (through whichever node `addr` is) and a SELECT: the INBOX count.
fn imap_login(addr: std::net::SocketAddr) -> anyhow::Result<String> {
    dshare_e2e::python(&format!(
        r#"
import imaplib
m = imaplib.IMAP4("{ip}", {port}, timeout=30)
m.login("bob@example.com", "pw")
print(m.select("INBOX")[0])
m.logout()
"#,
        ip = addr.ip(),
        port = addr.port(),
    ))
}

/// One POP3 login through `addr` (USER/PASS, or AUTH PLAIN when `sasl`): the STAT count.
fn pop3_login(addr: std::net::SocketAddr, sasl: bool) -> anyhow::Result<String> {
    dshare_e2e::python(&format!(
        r#"
import poplib, base64
p = poplib.POP3("{ip}", {port}, timeout=30)
if {sasl}:
    p._shortcmd("AUTH PLAIN " + base64.b64encode(b"\0bob@example.com\0pw").decode())
else:
    p.user("bob@example.com"); p.pass_("pw")
print(p.stat()[0])
p.quit()
"#,
        ip = addr.ip(),
        port = addr.port(),
        sasl = if sasl { "True" } else { "False" },
    ))
}

/// Issue 9: a forwarded IMAP or POP3 login takes a connection to the owner kept warm (TLS
/// up, greeting read) once an earlier login asked for it, and one the owner closed meanwhile (it
/// restarted) costs a fresh connection, not a failed login.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_logins_use_warm_connections_to_the_owner() -> anyhow::Result<()> {
    let logs = dshare_e2e::capture_logs();
    let r = forwarded_logins_inner().await;
    if r.is_err() {
        eprintln!("{}", logs.text());
    }
    r
}
async fn forwarded_logins_inner() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mut c = Cluster::start(2).await?;
    c.node(1).add_account("bob@example.com", "pw").await?;
    let metrics = c.node(0).node().addrs().metrics[0];
    let imap = c.node(0).imap();
    let links = |body: &str, link: &str| {
        value(
            body,
            &format!("dshare_imap_forward_links_total{{link=\"{link}\"}}"),
        )
    };
    let before = scrape(metrics).await?;
    assert_eq!(imap_login(imap)?.trim(), "OK");
    // The first login opened its own link and asked for warm ones; they are ready shortly.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    for _ in 0..3 {
        assert_eq!(imap_login(imap)?.trim(), "OK");
    }
    let after = scrape(metrics).await?;
    // Each client logs out: its link comes back to the pool (reused) beside the warm ones.
    let warm = links(&after, "warm") + links(&after, "reused")
        - links(&before, "warm")
        - links(&before, "reused");
    let fresh = links(&after, "fresh") - links(&before, "fresh");
    assert!(warm >= 3.0, "warm or reused {warm}, fresh {fresh}");
    assert!(fresh <= 1.0, "warm or reused {warm}, fresh {fresh}");

    // POP3 likewise, both ways of logging in.
    let pop3 = c.node(0).pop3();
    let pop3_links = |body: &str, link: &str| {
        value(
            body,
            &format!("dshare_pop3_forward_links_total{{link=\"{link}\"}}"),
        )
    };
    let before = scrape(metrics).await?;
    assert_eq!(pop3_login(pop3, false)?.trim(), "0");
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    for sasl in [false, true, false] {
        assert_eq!(pop3_login(pop3, sasl)?.trim(), "0");
    }
    let after = scrape(metrics).await?;
    let warm = pop3_links(&after, "warm") + pop3_links(&after, "reused")
        - pop3_links(&before, "warm")
        - pop3_links(&before, "reused");
    let fresh = pop3_links(&after, "fresh") - pop3_links(&before, "fresh");
    assert!(
        warm >= 3.0 && fresh <= 1.0,
        "warm or reused {warm}, fresh {fresh}"
    );

    // The owner restarts: its warm connections are dead, the logins still work, and a wrong
    // password on a warm connection is still a wrong password.
    c.node_mut(1).stop().await;
    c.node_mut(1).restart().await?;
    assert_eq!(imap_login(imap)?.trim(), "OK");
    assert_eq!(imap_login(imap)?.trim(), "OK");
    assert_eq!(pop3_login(pop3, false)?.trim(), "0");
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(pop3_login(pop3, true)?.trim(), "0");
    let wrong = dshare_e2e::python(&format!(
        r#"
import poplib
p = poplib.POP3("{ip}", {port}, timeout=30)
p.user("bob@example.com")
try:
    p.pass_("wrong")
except poplib.error_proto as e:
    print(e)
"#,
        ip = pop3.ip(),
        port = pop3.port(),
    ))?;
    assert!(wrong.contains("-ERR [AUTH]"), "{wrong}");
    c.shutdown().await;
    Ok(())
}

/// Two nodes with one warm link per owner (so the link counts are exact), bob and dave on
/// node 1, and `bodies` in bob's INBOX.
async fn link_cluster(bodies: &[&[u8]]) -> anyhow::Result<Cluster> {
    let c = Cluster::start_with(2, |_, config| config.cluster.warm_connections = 1).await?;
    for user in ["bob@example.com", "dave@example.com"] {
        c.node(1).add_account(user, "pw").await?;
    }
    let state = &c.node(1).node().state;
    for (n, body) in bodies.iter().enumerate() {
        let date = 1_700_000_000 + n as i64;
        state
            .mail
            .append("bob@example.com", "INBOX", body, &[], date)?;
    }
    state.store.flush_async().await?;
    Ok(c)
}

/// Two sessions through `addr` in turn (one link), each writing the Python bytes expressions
/// `login`, `invalid` (12 invalid commands) and `end` at once: each must see 12 `refusal`s and
/// `ok`, so the owner's count of invalid commands (20 allowed) started afresh for the second.
fn twice_under_the_limit(
    addr: std::net::SocketAddr,
    login: &str,
    invalid: &str,
    end: &str,
    refusal: &str,
    ok: &str,
) -> anyhow::Result<()> {
    let twice = dshare_e2e::python(&format!(
        r#"
import socket
for _ in range(2):
    s = socket.create_connection(("{ip}", {port}), timeout=30)
    f = s.makefile("rb")
    f.readline()
    s.sendall({login} + {invalid} + {end})
    out = f.read().decode()
    print(out.count("{refusal}"), "{ok}" in out)
"#,
        ip = addr.ip(),
        port = addr.port(),
    ))?;
    anyhow::ensure!(twice.lines().eq(["12 True", "12 True"]), "{twice}");
    Ok(())
}

/// Runs `script` in Python after a raw TCP connection to `addr` (`s`, with `f` reading it)
/// and its greeting line; returns what the script printed.
fn raw_session(addr: std::net::SocketAddr, script: &str) -> anyhow::Result<String> {
    dshare_e2e::python(&format!(
        "import socket, sys\ns = socket.create_connection(({:?}, {}), timeout=30)\n\
         f = s.makefile(\"rb\")\nf.readline()\n{script}",
        addr.ip().to_string(),
        addr.port()
    ))
}

/// Forwarded `protocol` logins that used a link of kind `link`.
fn links_of(body: &str, protocol: &str, link: &str) -> f64 {
    value(
        body,
        &format!("dshare_{protocol}_forward_links_total{{link=\"{link}\"}}"),
    )
}

/// Issue 9: a forwarded IMAP session that ends with LOGOUT leaves its link to the owner for the
/// next login (the front node ends the owner's session with `UNAUTHENTICATE` instead of passing
/// LOGOUT on), and so does one whose client closes between commands. The answers to commands
/// pipelined before the LOGOUT all reach the client (a 300 KB literal among them), the next
/// user on the link sees only their own mailbox, a wrong
/// password on it stays wrong, and a client cannot send `UNAUTHENTICATE` itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logged_out_forwarded_imap_session_leaves_its_link_for_the_next_login()
-> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mut big = message("big", 300_000);
    // Lines of the message that look like commands and answers are message text.
    big.extend_from_slice(b"d LOGOUT\r\nd OK LOGOUT completed\r\n");
    let c = link_cluster(&[&big]).await?;
    let metrics = c.node(0).node().addrs().metrics[0];
    let imap = c.node(0).imap();
    let links = |body: &str, link: &str| links_of(body, "imap", link);
    let before = scrape(metrics).await?;

    // Everything after the login in one write, LOGOUT last.
    let out = raw_session(
        imap,
        r#"
s.sendall(b"a LOGIN bob@example.com pw\r\n")
line = f.readline()
assert line.startswith(b"a OK"), line
assert b"XDSHARE" not in line, line
s.sendall(b"b SELECT INBOX\r\nc FETCH 1 BODY[]\r\nd LOGOUT\r\n")
sys.stdout.buffer.write(f.read())
"#,
    )?;
    assert!(out.contains("b OK ["), "{out:.300}");
    assert!(
        out.contains(&format!("BODY[] {{{}}}\r\n", big.len())),
        "{out:.300}"
    );
    assert!(
        out.contains(&*String::from_utf8_lossy(&big)),
        "the body arrived whole"
    );
    assert!(
        out.ends_with(
            ")\r\nc OK FETCH completed\r\n* BYE Logging out\r\nd OK LOGOUT completed\r\n"
        ),
        "{}",
        &out[out.len().saturating_sub(300)..]
    );

    // A client that closes its side after a command, without LOGOUT, still gets the answer,
    // and the link is kept as well.
    let closed = raw_session(
        imap,
        r#"
s.sendall(b"a LOGIN bob@example.com pw\r\nb STATUS INBOX (MESSAGES)\r\n")
s.shutdown(socket.SHUT_WR)
sys.stdout.buffer.write(f.read())
"#,
    )?;
    assert!(
        closed.ends_with("(MESSAGES 1)\r\nb OK STATUS completed\r\n"),
        "{closed}"
    );

    // The next login (another user) takes the same link, and sees its own mailbox.
    let dave = dshare_e2e::python(&format!(
        r#"
import imaplib
m = imaplib.IMAP4("{ip}", {port}, timeout=30)
m.login("dave@example.com", "pw")
print(m.select("INBOX")[1][0].decode())
m.logout()
"#,
        ip = imap.ip(),
        port = imap.port(),
    ))?;
    assert_eq!(dave.trim(), "0", "dave's INBOX, not bob's");
    let after = scrape(metrics).await?;
    let reused = links(&after, "reused") - links(&before, "reused");
    let fresh = links(&after, "fresh") - links(&before, "fresh");
    assert_eq!(
        (fresh, reused),
        (1.0, 2.0),
        "the later logins used the first one's link"
    );
    let kept = value(&after, "dshare_imap_forward_links_kept_total")
        - value(&before, "dshare_imap_forward_links_kept_total");
    assert_eq!(kept, 3.0);

    // What one client did wrong does not count against the next one on the link: two
    // sessions of 12 invalid commands each, under the owner's limit of 20 per session.
    let login = r#"b"a LOGIN bob@example.com pw\r\n""#;
    let invalid = r#"b"".join(b"x%d FOO\r\n" % i for i in range(12))"#;
    let end = r#"b"n NOOP\r\nl LOGOUT\r\n""#;
    twice_under_the_limit(imap, login, invalid, end, " BAD ", "n OK NOOP completed")?;
    let kept_again = value(
        &scrape(metrics).await?,
        "dshare_imap_forward_links_kept_total",
    ) - value(&after, "dshare_imap_forward_links_kept_total");
    assert_eq!(kept_again, 2.0, "both sessions ended with their link kept");

    // A wrong password on a reused link is refused as anywhere, and a client's own
    // UNAUTHENTICATE (any tag) is an unknown command: it stays logged in.
    let own = dshare_e2e::python(&format!(
        r#"
import imaplib, socket
m = imaplib.IMAP4("{ip}", {port}, timeout=30)
try:
    m.login("dave@example.com", "wrong")
except imaplib.IMAP4.error as e:
    print("refused", e)
s = socket.create_connection(("{ip}", {port}), timeout=30)
f = s.makefile("rb")
f.readline()
s.sendall(b"a LOGIN bob@example.com pw\r\n")
f.readline()
for tag in [b"u1", b"0" * 64]:
    s.sendall(tag + b" UNAUTHENTICATE\r\nn NOOP\r\n")
    print(f.readline().decode().strip())
    print(f.readline().decode().strip())
s.sendall(b"s SELECT INBOX\r\n")
while True:
    line = f.readline().decode()
    if line.startswith("s "):
        print(line.strip())
        break
"#,
        ip = imap.ip(),
        port = imap.port(),
    ))?;
    let lines: Vec<&str> = own.lines().collect();
    assert!(
        lines[0].contains("refused") && lines[0].contains("AUTHENTICATIONFAILED"),
        "{own}"
    );
    assert!(lines[1].starts_with("u1 BAD"), "{own}");
    assert_eq!(lines[2], "n OK NOOP completed", "{own}");
    assert!(
        lines[3].starts_with(&format!("{} BAD", "0".repeat(64))),
        "{own}"
    );
    assert!(lines[5].starts_with("s OK [READ-WRITE]"), "{own}");
    c.shutdown().await;
    Ok(())
}

/// Issue 9: a forwarded POP3 session that ends with QUIT leaves its link to the owner for the
/// next login (the front node ends the owner's session with `XDSRESET`, which runs the
/// UPDATE, instead of passing QUIT on). The answer to a RETR pipelined before the QUIT reaches
/// the client whole, the DELE is committed before the QUIT is answered, the next user on the
/// link sees only their own maildrop, and a client cannot send `XDSRESET` itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_pop3_session_that_quits_leaves_its_link_for_the_next_login()
-> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mut big = message("big", 200_000);
    // A line of the message that looks like the owner's answer is message text.
    big.extend_from_slice(b"+OK 0000 0 <1.2@owner>\r\n");
    let c = link_cluster(&[b"Subject: one\r\n\r\nfirst\r\n", &big]).await?;
    let metrics = c.node(0).node().addrs().metrics[0];
    let pop3 = c.node(0).pop3();
    let links = |body: &str, link: &str| links_of(body, "pop3", link);
    let before = scrape(metrics).await?;

    let out = raw_session(
        pop3,
        r#"
s.sendall(b"USER bob@example.com\r\nPASS pw\r\n")
f.readline(); line = f.readline()
assert line.startswith(b"+OK"), line
s.sendall(b"DELE 1\r\nRETR 2\r\nQUIT\r\n")
sys.stdout.buffer.write(f.read())
"#,
    )?;
    assert!(out.starts_with("+OK"), "{out:.200}");
    let stuffed = String::from_utf8_lossy(&big).replace("\r\n.", "\r\n..");
    assert!(out.contains(&stuffed), "the message arrived whole");
    assert!(
        out.ends_with("\r\n.\r\n+OK POP3 server signing off (1 messages left)\r\n"),
        "{}",
        &out[out.len().saturating_sub(200)..]
    );
    assert_eq!(
        c.node(1).inbox_len("bob@example.com"),
        1,
        "the DELE was committed"
    );

    // The next logins take the same link: another user sees their own maildrop, and bob's
    // maildrop is free again at once.
    let next = dshare_e2e::python(&format!(
        r#"
import poplib
for user in ["dave@example.com", "bob@example.com"]:
    p = poplib.POP3("{ip}", {port}, timeout=30)
    p.user(user); p.pass_("pw")
    print(p.stat()[0])
    p.quit()
"#,
        ip = pop3.ip(),
        port = pop3.port(),
    ))?;
    assert_eq!(next.split_whitespace().collect::<Vec<_>>(), ["0", "1"]);
    let after = scrape(metrics).await?;
    let reused = links(&after, "reused") - links(&before, "reused");
    let fresh = links(&after, "fresh") - links(&before, "fresh");
    assert_eq!((fresh, reused), (1.0, 2.0), "one link for the three logins");
    let kept = value(&after, "dshare_pop3_forward_links_kept_total")
        - value(&before, "dshare_pop3_forward_links_kept_total");
    assert_eq!(kept, 3.0);

    // What one client did wrong does not count against the next one on the link: two
    // sessions of 12 invalid commands each, under the owner's limit of 20 per session.
    let login = r#"b"USER bob@example.com\r\nPASS pw\r\n""#;
    let end = r#"b"STAT\r\nQUIT\r\n""#;
    twice_under_the_limit(pop3, login, r#"b"FOO\r\n" * 12"#, end, "-ERR", "+OK 1 ")?;

    // A client that goes away without QUIT: its DELE is not committed (no UPDATE), it still
    // gets the answers it asked for, and the link is kept all the same.
    let kept_before = value(
        &scrape(metrics).await?,
        "dshare_pop3_forward_links_kept_total",
    );
    let gone = raw_session(
        pop3,
        r#"
s.sendall(b"USER bob@example.com\r\nPASS pw\r\nDELE 1\r\n")
s.shutdown(socket.SHUT_WR)
sys.stdout.buffer.write(f.read())
"#,
    )?;
    assert!(gone.ends_with("+OK message 1 deleted\r\n"), "{gone}");
    assert_eq!(c.node(1).inbox_len("bob@example.com"), 1, "no UPDATE");
    let kept = value(
        &scrape(metrics).await?,
        "dshare_pop3_forward_links_kept_total",
    ) - kept_before;
    assert_eq!(kept, 1.0);

    // A client's own XDSRESET is an unknown command, and it stays logged in.
    let own = raw_session(
        pop3,
        r#"
s.sendall(b"USER bob@example.com\r\nPASS pw\r\n")
f.readline(); f.readline()
s.sendall(b"XDSRESET " + b"0" * 64 + b"\r\nSTAT\r\n")
print(f.readline().decode().strip())
print(f.readline().decode().strip())
"#,
    )?;
    let lines: Vec<&str> = own.lines().collect();
    assert!(lines[0].starts_with("-ERR"), "{own}");
    assert!(lines[1].starts_with("+OK 1 "), "{own}");
    c.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_deliveries_are_counted_per_outcome() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let dns = dns_server().await?;
    let sink = Sink::default();
    let port = sink.start().await?.port();
    let c = Cluster::start_with(1, move |_, c| {
        c.smtp.retry_base = std::time::Duration::from_secs(1);
        c.smtp.retry_max = std::time::Duration::from_secs(1);
        c.outbound.dns = vec![dns];
        c.outbound.port = port;
    })
    .await?;
    let bob = ("bob@example.com", "b0b-secret");
    c.node(0).add_account(bob.0, bob.1).await?;
    let addr = c.node(0).node().addrs().metrics[0];
    let before = scrape(addr).await?;
    let delivered = "dshare_outbound_deliveries_total{result=\"delivered\"}";
    let deferred = "dshare_outbound_deliveries_total{result=\"deferred\"}";
    let bounced = "dshare_outbound_deliveries_total{result=\"bounced\"}";
    for series in [delivered, deferred, bounced] {
        assert!(before.contains(series), "{series} not registered: {before}");
    }
    submit(&c, 0, bob, "x@outside.test", "counted", 1)?;
    let wait = std::time::Duration::from_secs(20);
    assert!(eventually(wait, || sink.messages().len() == 1).await);
    sink.set_rcpt_reply("451 4.3.0 later");
    submit(&c, 0, bob, "y@outside.test", "deferred", 1)?;
    assert!(eventually(wait, || queue_error(&c, 0, "451").is_some()).await);
    sink.set_rcpt_reply("550 5.1.1 no such user");
    // The deferred message is refused on its retry: bounced to bob (local).
    assert!(eventually(wait, || c.node(0).inbox_len(bob.0) == 1).await);
    let after = scrape(addr).await?;
    let delta = |series: &str| value(&after, series) - value(&before, series);
    assert_eq!(delta(delivered), 1.0, "{after}");
    assert!(delta(deferred) >= 1.0, "{after}");
    assert_eq!(delta(bounced), 1.0, "{after}");
    assert!(delta("dshare_outbound_seconds_count") >= 3.0, "{after}");
    c.shutdown().await;
    Ok(())
}
