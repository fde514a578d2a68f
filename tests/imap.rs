//! IMAP through real nodes (DESIGN.md §7): a session forwarded by node A to the owner B looks
//! exactly like a direct one on B, checked with Python's imaplib, raw sockets and curl.

use ds_testkit::OutputWithin;
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use ds_testkit::Cluster;
use dshare_e2e::{Smtp, eventually, python};

/// A multipart message with an attachment and a UTF-8 (encoded-word) subject.
fn multipart() -> Vec<u8> {
    let mut attachment = String::new();
    for i in 0..40 {
        attachment.push_str(&format!(
            "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaGlqa2xtbm9w{i:04}\r\n"
        ));
    }
    format!(
        "From: Alice Example <alice@example.org>\r\n\
To: Bob <bob@example.com>\r\n\
Subject: =?UTF-8?B?R3LDvMOfZSBhdXMgS8O2bG4g4pyT?=\r\n\
Date: Wed, 02 Dec 2026 06:00:00 +0000\r\n\
Message-ID: <multipart-1@example.org>\r\n\
MIME-Version: 1.0\r\n\
Content-Type: multipart/mixed; boundary=\"b0undary\"\r\n\
\r\n\
This is a multi-part message.\r\n\
--b0undary\r\n\
Content-Type: text/plain; charset=utf-8\r\n\
Content-Transfer-Encoding: 8bit\r\n\
\r\n\
Hallo Bob, schöne Grüße.\r\n\
--b0undary\r\n\
Content-Type: application/octet-stream; name=\"data.bin\"\r\n\
Content-Disposition: attachment; filename=\"data.bin\"\r\n\
Content-Transfer-Encoding: base64\r\n\
\r\n\
{attachment}--b0undary--\r\n"
    )
    .into_bytes()
}

/// Log in (LOGIN), EXAMINE INBOX and print what must be the same direct and forwarded.
fn imap_dump(addr: SocketAddr, user: &str, pass: &str) -> anyhow::Result<String> {
    python(&format!(
        r#"
import imaplib, hashlib, base64
M = imaplib.IMAP4("{ip}", {port}, timeout=30)
typ, data = M.login("{user}", "{pass}")
print("login", typ)
print("examine", M.select("INBOX", readonly=True))
typ, data = M.fetch("1:*", "(UID RFC822.SIZE INTERNALDATE ENVELOPE BODYSTRUCTURE BODY.PEEK[])")
for item in data:
    if isinstance(item, tuple):
        print("fetch", item[0])
        print("body", len(item[1]), hashlib.sha256(item[1]).hexdigest())
        print("b64", base64.b64encode(item[1]).decode())
    else:
        print("tail", item)
print("search", M.search(None, "ALL"))
print("search-from", M.search(None, "FROM", "alice"))
print("uid-search", M.uid("SEARCH", "ALL"))
print("list", sorted(M.list()[1]))
M.logout()
"#,
        ip = addr.ip(),
        port = addr.port()
    ))
}

fn curl(addr: SocketAddr, path: &str, request: Option<&str>) -> anyhow::Result<String> {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "30", "-u", "bob@example.com:bob-pass"]);
    if let Some(r) = request {
        cmd.args(["-X", r]);
    }
    let out = cmd
        .arg(format!("imap://{}:{}/{path}", addr.ip(), addr.port()))
        .output_bounded()?;
    anyhow::ensure!(
        out.status.success(),
        "curl {path}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_session_equals_direct_session() -> anyhow::Result<()> {
    let c = Cluster::start(3).await?;
    c.node(1).add_account("bob@example.com", "bob-pass").await?;
    let sent = multipart();
    // Sent through node C, relayed to B.
    let mut s = Smtp::connect(c.node(2).smtp()).await?;
    let r = s
        .send("alice@example.org", &["bob@example.com"], &sent)
        .await?;
    assert!(r.iter().all(|r| r.is(250)), "{r:?}");
    s.quit().await?;
    assert!(
        eventually(Duration::from_secs(20), || c
            .node(1)
            .inbox_len("bob@example.com")
            == 1)
        .await
    );

    let direct = imap_dump(c.node(1).imap(), "bob", "bob-pass")?;
    let via_a = imap_dump(c.node(0).imap(), "bob", "bob-pass")?;
    assert_eq!(
        direct, via_a,
        "forwarded session differs from the direct one"
    );
    // BODY[] is the owner's prefix and then exactly what was sent.
    let body = body_of(&via_a)?;
    assert!(
        body.ends_with(&sent),
        "BODY[] does not end with the sent message"
    );
    assert!(
        via_a.contains("=?UTF-8?B?R3LDvMOfZSBhdXMgS8O2bG4g4pyT?="),
        "{via_a}"
    );

    // curl: LIST, SEARCH, FETCH, UID FETCH through A equal the direct answers.
    let (a, b) = (c.node(0).imap(), c.node(1).imap());
    for (path, req) in [
        ("", None),
        ("INBOX", Some("SEARCH ALL")),
        ("INBOX;MAILINDEX=1", None),
        ("INBOX;UID=1", None),
    ] {
        let via = curl(a, path, req)?;
        assert_eq!(via, curl(b, path, req)?, "curl {path} {req:?}");
        assert!(!via.is_empty(), "curl {path}");
    }

    // The commands that change things, through A: AUTHENTICATE PLAIN, STORE, SEARCH, APPEND,
    // COPY, EXPUNGE, and IDLE seeing a delivery made through C.
    let out = python(&format!(
        r#"
import imaplib, smtplib, socket, time
M = imaplib.IMAP4("{ip}", {port}, timeout=30)
print("auth", M.authenticate("PLAIN", lambda _: b"\0bob\0bob-pass")[0])
print("select", M.select("INBOX")[0])
print("store", M.store("1", "+FLAGS", "(\\Flagged)"))
print("flagged", M.search(None, "FLAGGED"))
print("append", M.append("INBOX", "(\\Seen)", None, b"From: me@example.com\r\nSubject: appended\r\n\r\nhello\r\n")[0])
print("create", M.create("Archive")[0])
print("copy", M.copy("1:2", "Archive")[0])
print("store2", M.store("2", "+FLAGS", "(\\Deleted)")[0])
print("expunge", M.expunge())
print("status", M.status("Archive", "(MESSAGES)"))
# IDLE by hand (imaplib has none): a delivery through C must show up as EXISTS.
tag = b"i1"
M.send(tag + b" IDLE\r\n")
print("idle", M.readline().strip())
s = smtplib.SMTP("{sip}", {sport}, timeout=30)
s.sendmail("carol@example.org", ["bob@example.com"], b"From: carol@example.org\r\nSubject: idle\r\n\r\nwake up\r\n")
s.quit()
deadline = time.time() + 20
seen = False
while time.time() < deadline:
    line = M.readline()
    if b"EXISTS" in line:
        seen = True
        break
M.send(b"DONE\r\n")
while True:
    line = M.readline()
    if line.startswith(tag):
        print("idle-done", line.strip())
        break
print("idle-saw-exists", seen)
M.logout()
"#,
        ip = a.ip(),
        port = a.port(),
        sip = c.node(2).smtp().ip(),
        sport = c.node(2).smtp().port(),
    ))?;
    for want in [
        "auth OK",
        "select OK",
        "flagged ('OK', [b'1'])",
        "append OK",
        "copy OK",
        "expunge ('OK', [b'2'])",
        "status ('OK', [b'\"Archive\" (MESSAGES 2)'])",
        "idle b'+",
        "idle-done b'i1 OK",
        "idle-saw-exists True",
    ] {
        assert!(out.contains(want), "{want} missing in:\n{out}");
    }
    // The changes happened on the owner: the dumps still agree.
    assert_eq!(
        imap_dump(b, "bob@example.com", "bob-pass")?,
        imap_dump(a, "bob@example.com", "bob-pass")?
    );

    // Commands pipelined behind LOGIN (a `{n+}` literal) and behind AUTHENTICATE PLAIN with an
    // initial response reach the owner.
    let out = python(&format!(
        r#"
import socket, base64
def run(payload):
    s = socket.create_connection(("{ip}", {port}), timeout=30)
    f = s.makefile("rb")
    f.readline()
    s.sendall(payload)
    out = []
    while True:
        line = f.readline()
        if not line:
            break
        out.append(line.decode().strip())
        if line.startswith(b"c "):
            break
    s.close()
    return out
ir = base64.b64encode(b"\0bob\0bob-pass")
print(run(b"a LOGIN {{3+}}\r\nbob bob-pass\r\nb SELECT INBOX\r\nc LOGOUT\r\n"))
print(run(b"a AUTHENTICATE PLAIN " + ir + b"\r\nb EXAMINE INBOX\r\nc LOGOUT\r\n"))
"#,
        ip = a.ip(),
        port = a.port()
    ))?;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    for l in &lines {
        assert!(l.contains("a OK [CAPABILITY IMAP4rev1"), "{l}");
        assert!(l.contains("b OK [READ-"), "{l}");
        assert!(l.contains("c OK"), "{l}");
    }
    c.shutdown().await;
    Ok(())
}

/// The first BODY[] of an [`imap_dump`].
fn body_of(dump: &str) -> anyhow::Result<Vec<u8>> {
    let b64 = dump
        .lines()
        .find_map(|l| l.strip_prefix("b64 "))
        .ok_or_else(|| anyhow::anyhow!("no body in {dump}"))?;
    let hex = python(&format!(
        "import base64,sys; sys.stdout.write(base64.b64decode('{b64}').hex())"
    ))?;
    Ok((0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect())
}

/// RFC822.SIZE and BODYSTRUCTURE of a multipart message on the owner: RFC822.SIZE equals the
/// length of BODY[], and BODYSTRUCTURE lists every part.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multipart_size_and_structure() -> anyhow::Result<()> {
    let c = Cluster::start(2).await?;
    c.node(1).add_account("bob@example.com", "bob-pass").await?;
    let mut s = Smtp::connect(c.node(1).smtp()).await?;
    let r = s
        .send("alice@example.org", &["bob@example.com"], &multipart())
        .await?;
    assert!(r.iter().all(|r| r.is(250)), "{r:?}");
    s.quit().await?;
    let via_a = imap_dump(c.node(0).imap(), "bob", "bob-pass")?;
    let body = body_of(&via_a)?;
    assert!(
        via_a.contains(&format!("RFC822.SIZE {}", body.len())),
        "{via_a}"
    );
    // Media types compare case-insensitively (RFC 2045); both parts and the subtype are listed.
    let structure = via_a.to_ascii_lowercase();
    assert!(structure.contains("((\"text\" \"plain\""), "{via_a}");
    assert!(
        structure.contains("(\"application\" \"octet-stream\""),
        "{via_a}"
    );
    assert!(
        structure.contains("\"mixed\" (\"boundary\" \"b0undary\")"),
        "{via_a}"
    );
    assert!(structure.contains("\"attachment\""), "{via_a}");
    c.shutdown().await;
    Ok(())
}

/// imaplib LOGIN through `addr`; prints the server's answer.
fn login_answer(addr: SocketAddr, user: &str, pass: &str) -> anyhow::Result<String> {
    python(&format!(
        r#"
import imaplib
M = imaplib.IMAP4("{ip}", {port}, timeout=60)
try:
    print(M.login("{user}", "{pass}")[0])
except imaplib.IMAP4.error as e:
    print(e.args[0].decode() if isinstance(e.args[0], bytes) else e.args[0])
"#,
        ip = addr.ip(),
        port = addr.port()
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_password_and_unknown_user_look_the_same() -> anyhow::Result<()> {
    let c = Cluster::start(2).await?;
    c.node(1).add_account("bob@example.com", "bob-pass").await?;
    let a = c.node(0).imap();
    let wrong = login_answer(a, "bob", "wrong")?;
    let unknown = login_answer(a, "nobody", "bob-pass")?;
    assert!(wrong.contains("[AUTHENTICATIONFAILED]"), "{wrong}");
    assert_eq!(wrong, unknown);
    assert_eq!(login_answer(a, "bob", "bob-pass")?.trim(), "OK");
    c.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_down_is_unavailable() -> anyhow::Result<()> {
    let mut c = Cluster::start(2).await?;
    c.node(1).add_account("bob@example.com", "bob-pass").await?;
    c.node_mut(1).stop().await;
    let started = Instant::now();
    let out = login_answer(c.node(0).imap(), "bob", "bob-pass")?;
    let took = started.elapsed();
    assert!(out.contains("[UNAVAILABLE]"), "{out}");
    // The lookup timeout is 800 ms in tests; generous slack for a loaded machine.
    assert!(took < Duration::from_secs(10), "took {took:?}");
    c.shutdown().await;
    Ok(())
}

/// A front node's forwarded sessions come from its one address: once their proof is checked
/// they no longer count against the owner's per-IP limit (else an office of a few users, each
/// with a mail client's several connections, would be refused by a limit meant for one client).
/// A client connecting directly still meets the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_sessions_do_not_count_against_the_owners_per_ip_limit() -> anyhow::Result<()> {
    let c = Cluster::start_with(2, |i, config| {
        config.cluster.warm_connections = 1;
        if i == 1 {
            config.limits.max_connections_per_ip = 3;
        }
    })
    .await?;
    for i in 0..6 {
        c.node(1)
            .add_account(&format!("u{i}@example.com"), "pw")
            .await?;
    }
    let (imap, pop3, owner) = (c.node(0).imap(), c.node(0).pop3(), c.node(1).imap());
    let out = python(&format!(
        r#"
import imaplib, poplib, socket
imap, pop = [], []
for i in range(6):
    m = imaplib.IMAP4("{ip}", {imap_port}, timeout=30)
    m.login("u%d@example.com" % i, "pw")
    imap.append(m)
    p = poplib.POP3("{ip}", {pop_port}, timeout=30)
    p.user("u%d@example.com" % i); p.pass_("pw")
    pop.append(p)
print(sum(m.select("INBOX")[0] == "OK" for m in imap), sum(p.stat() == (0, 0) for p in pop))
for m in imap: m.logout()
for p in pop: p.quit()
# Direct clients from one address still meet the limit of 3.
greeted = 0
socks = []
for i in range(4):
    s = socket.create_connection(("{owner_ip}", {owner_port}), timeout=10, source_address=("127.0.0.9", 0))
    socks.append(s)
    try:
        greeted += s.recv(100).startswith(b"* OK")
    except ConnectionResetError:
        pass
print(greeted)
"#,
        ip = imap.ip(),
        imap_port = imap.port(),
        pop_port = pop3.port(),
        owner_ip = owner.ip(),
        owner_port = owner.port(),
    ))?;
    assert_eq!(
        out.split_whitespace().collect::<Vec<_>>(),
        ["6", "6", "3"],
        "{out}"
    );
    c.shutdown().await;
    Ok(())
}
