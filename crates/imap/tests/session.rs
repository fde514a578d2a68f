//! The IMAP server through a real node and Python's imaplib: capabilities, login, states.

mod common;

use common::{PASS, USER, node, python};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capability_login_noop_logout() -> anyhow::Result<()> {
    let c = node().await?;
    let out = python(
        c.node(0).imap(),
        r#"
m = imaplib.IMAP4(HOST, PORT)
print("welcome", m.welcome.decode())
print("caps", " ".join(sorted(m.capabilities)))
typ, data = m.noop()
print("noop", typ)
try:
    m.login(USER, "wrong")
except imaplib.IMAP4.error as e:
    print("bad", e)
typ, data = m.login(USER, PASS)
print("login", typ, data[0].decode())
typ, data = m.capability()
print("caps2", data[0].decode())
typ, data = m.noop()
print("noop2", typ)
typ, data = m.logout()
print("logout", typ)
"#,
    )?;
    print!("{out}");
    assert!(out.contains("welcome * OK [CAPABILITY IMAP4rev1"), "{out}");
    assert!(out.contains("AUTH=PLAIN"), "{out}");
    assert!(out.contains("STARTTLS"), "{out}");
    assert!(out.contains("noop OK"), "{out}");
    assert!(out.contains("bad b'[AUTHENTICATIONFAILED]"), "{out}");
    assert!(out.contains("login OK"), "{out}");
    assert!(out.contains("caps2 IMAP4rev1") && !out.contains("caps2 IMAP4rev1 LITERAL+ ID ENABLE IDLE NAMESPACE UNSELECT UIDPLUS MOVE SPECIAL-USE CHILDREN CONDSTORE AUTH"), "{out}");
    assert!(out.contains("noop2 OK"), "{out}");
    assert!(out.contains("logout BYE"), "{out}");
    let _ = (USER, PASS);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authenticate_plain_and_starttls() -> anyhow::Result<()> {
    let c = node().await?;
    let out = python(
        c.node(0).imap(),
        r#"
import ssl, base64
m = imaplib.IMAP4(HOST, PORT)
m.starttls(ssl._create_unverified_context())
print("tls caps", " ".join(sorted(m.capabilities)))
typ, data = m.authenticate("PLAIN", lambda _: ("\0" + USER + "\0" + PASS).encode())
print("auth", typ)
m.logout()
# SASL-IR by hand
s = socket.create_connection((HOST, PORT))
f = s.makefile("rb")
f.readline()
ir = base64.b64encode(("\0" + USER + "\0" + PASS).encode()).decode()
s.sendall(("a AUTHENTICATE PLAIN " + ir + "\r\n").encode())
print("ir", f.readline().decode().strip())
s.sendall(b"b AUTHENTICATE PLAIN\r\n")
print("again", f.readline().decode().strip())
s.close()
s = socket.create_connection((HOST, PORT))
f = s.makefile("rb")
f.readline()
s.sendall(b"c AUTHENTICATE PLAIN\r\n")
print("cont", f.readline().decode().strip())
s.sendall(b"*\r\n")
print("cancel", f.readline().decode().strip())
s.sendall(b"d AUTHENTICATE PLAIN\r\n")
f.readline()
s.sendall(base64.b64encode(b"\0bob\0nope") + b"\r\n")
print("fail", f.readline().decode().strip())
s.close()
"#,
    )?;
    print!("{out}");
    assert!(
        out.contains("tls caps") && !out.contains("tls caps STARTTLS"),
        "{out}"
    );
    assert!(out.contains("auth OK"), "{out}");
    assert!(out.contains("ir a OK [CAPABILITY IMAP4rev1"), "{out}");
    assert!(out.contains("again b BAD"), "{out}");
    assert!(out.contains("cont +"), "{out}");
    assert!(out.contains("cancel c BAD"), "{out}");
    assert!(out.contains("fail d NO [AUTHENTICATIONFAILED]"), "{out}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn account_on_a_peer_is_forwarded_and_bad_logins_fail_alike() -> anyhow::Result<()> {
    let c = ds_testkit::Cluster::start(2).await?;
    c.node(1).add_account(USER, PASS).await?;
    let script = r#"
for name, pw in [("bob", PASS), ("bob", "wrong"), ("nobody", PASS)]:
    m = imaplib.IMAP4(HOST, PORT)
    try:
        print(name, pw == PASS, m.login(name, pw))
    except imaplib.IMAP4.error as e:
        print(name, pw == PASS, e)
"#;
    let out = python(c.node(0).imap(), script)?;
    print!("{out}");
    // The owner (node 1) accepted the password: the client sees the owner's capabilities.
    assert!(
        out.contains("bob True ('OK', [b'[CAPABILITY IMAP4rev1"),
        "{out}"
    );
    // A wrong password and an unknown user get the same answer.
    assert!(out.contains("bob False b'[AUTHENTICATIONFAILED]"), "{out}");
    assert!(
        out.contains("nobody True b'[AUTHENTICATIONFAILED]"),
        "{out}"
    );
    let direct = python(
        c.node(1).imap(),
        "m = imaplib.IMAP4(HOST, PORT)\nprint(m.login('bob', PASS)[0])\n",
    )?;
    assert!(direct.contains("OK"), "{direct}");
    Ok(())
}
