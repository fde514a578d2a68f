//! Limits and TLS policy: LOGINDISABLED before STARTTLS off loopback, big messages byte-exact
//! both ways, CONDSTORE CHANGEDSINCE.

mod common;

use std::net::{IpAddr, SocketAddr};

use common::{PASS, USER, message, node, python};
use ds_testkit::Cluster;

/// A non-loopback address of this machine, if it has one.
fn outside_ip() -> Option<IpAddr> {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect("192.0.2.254:9").ok()?;
    let ip = s.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_disabled_before_tls_off_loopback() -> anyhow::Result<()> {
    let Some(ip) = outside_ip() else {
        eprintln!("no non-loopback address: skipped");
        return Ok(());
    };
    let c = Cluster::start_with(1, |_, cfg| {
        cfg.listen.imap = vec![SocketAddr::new(IpAddr::from([0, 0, 0, 0]), 0)];
    })
    .await?;
    c.node(0).add_account(USER, PASS).await?;
    let addr = SocketAddr::new(ip, c.node(0).imap().port());
    let out = python(
        addr,
        r#"
import ssl
m = imaplib.IMAP4(HOST, PORT)
print("caps", " ".join(sorted(m.capabilities)))
try:
    m.login(USER, PASS)
except imaplib.IMAP4.error as e:
    print("plain login", e)
m.starttls(ssl._create_unverified_context())
print("tls caps", " ".join(sorted(m.capabilities)))
print("login", m.login(USER, PASS)[0])
m.logout()
"#,
    )?;
    print!("{out}");
    assert!(
        out.contains("LOGINDISABLED") && out.contains("STARTTLS"),
        "{out}"
    );
    assert!(
        !out.lines().next().unwrap_or("").contains("AUTH=PLAIN"),
        "{out}"
    );
    assert!(out.contains("plain login b'[PRIVACYREQUIRED]"), "{out}");
    assert!(
        out.contains("AUTH=PLAIN") && out.contains("login OK"),
        "{out}"
    );
    Ok(())
}

/// `require_tls` from the node's configuration (#13 point 7): with `tls.require_tls_exempt`
/// emptied, a loopback listener counts as outside, so the rule is tested on any machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_disabled_on_a_listener_that_is_not_exempt() -> anyhow::Result<()> {
    let c = Cluster::start_with(1, |_, cfg| {
        cfg.tls.require_tls_exempt.clear();
    })
    .await?;
    c.node(0).add_account(USER, PASS).await?;
    let out = python(
        c.node(0).imap(),
        r#"
import ssl
m = imaplib.IMAP4(HOST, PORT)
print("caps", " ".join(sorted(m.capabilities)))
try:
    m.login(USER, PASS)
except imaplib.IMAP4.error as e:
    print("plain login", e)
m.starttls(ssl._create_unverified_context())
print("login", m.login(USER, PASS)[0])
m.logout()
"#,
    )?;
    print!("{out}");
    let first = out.lines().next().unwrap_or("");
    assert!(
        first.contains("LOGINDISABLED") && !first.contains("AUTH=PLAIN"),
        "{out}"
    );
    assert!(out.contains("plain login b'[PRIVACYREQUIRED]"), "{out}");
    assert!(out.contains("login OK"), "{out}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_messages_are_byte_exact_and_changedsince() -> anyhow::Result<()> {
    let c = node().await?;
    let mail = &c.node(0).node().state.mail;
    let big = message("big", 8 * 1024 * 1024);
    mail.deliver(USER, &big)?;
    let out = python(
        c.node(0).imap(),
        &format!(
            r#"
import hashlib
m = imaplib.IMAP4(HOST, PORT)
m.login(USER, PASS)
m.select("INBOX")
typ, data = m.fetch("1", "(RFC822.SIZE BODY.PEEK[])")
print("fetched", len(data[0][1]), hashlib.sha256(data[0][1]).hexdigest(), data[0][0][:40])
up = (b"Subject: up\r\n\r\n" + b"0123456789abcdef\r\n" * 400000)
t = time.time()
print("append", m.append("INBOX", None, None, up)[0], round(time.time() - t, 2))
typ, data = m.fetch("2", "(BODY.PEEK[])")
print("roundtrip", data[0][1] == up)
typ, data = m.fetch("1:*", "(MODSEQ)")
ms = int(data[1].decode().split("MODSEQ (")[1].split(")")[0])
m.store("1", "+FLAGS", "(\\Flagged)")
print("changedsince", m.fetch("1:*", "(FLAGS) (CHANGEDSINCE %d)" % ms))
print("want", "{sha}")
m.logout()
"#,
            sha = sha256_hex(&big)
        ),
    )?;
    print!("{out}");
    let want = out
        .lines()
        .find_map(|l| l.strip_prefix("want "))
        .unwrap_or("x");
    assert!(
        out.contains(&format!("fetched {} {want}", big.len())),
        "{out}"
    );
    assert!(out.contains("append OK"), "{out}");
    assert!(out.contains("roundtrip True"), "{out}");
    assert!(
        out.contains("changedsince ('OK', [b'1 (FLAGS (\\\\Flagged \\\\Recent) MODSEQ ("),
        "{out}"
    );
    assert!(!out.contains("b'2 (FLAGS"), "{out}");
    Ok(())
}

fn sha256_hex(data: &[u8]) -> String {
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import hashlib,sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            if let Some(mut stdin) = child.stdin.take() {
                stdin.write_all(data)?;
            }
            child.wait_with_output()
        });
    out.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// Downloads 100 × 100 KiB with one UID FETCH per message and prints how long it took (a
/// measurement for the log, no timed assertion).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_100_messages_of_100_kib() -> anyhow::Result<()> {
    let c = node().await?;
    let mail = &c.node(0).node().state.mail;
    let body = message("load", 100 * 1024);
    for _ in 0..100 {
        mail.deliver(USER, &body)?;
    }
    let out = python(
        c.node(0).imap(),
        r#"
m = imaplib.IMAP4(HOST, PORT)
m.login(USER, PASS)
m.select("INBOX", readonly=True)
runs = []
for _ in range(3):
    t = time.time(); total = 0
    for uid in range(1, 101):
        typ, data = m.uid("FETCH", str(uid), "(BODY.PEEK[])")
        total += len(data[0][1])
    runs.append(time.time() - t)
print("bytes", total, "median_s", round(sorted(runs)[1], 3))
m.logout()
"#,
    )?;
    println!("IMAP FETCH 100 x 100 KiB direct: {out}");
    assert!(
        out.contains(&format!("bytes {}", body.len() * 100)),
        "{out}"
    );
    Ok(())
}
