//! Many sessions on one mailbox: each sees the others' APPEND, flag changes and EXPUNGE at the
//! right moments; `\Recent` goes to one session; IDLE hears an SMTP delivery within a second.

mod common;

use common::{message, node, python};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sessions_see_each_other() -> anyhow::Result<()> {
    let c = node().await?;
    let mail = &c.node(0).node().state.mail;
    mail.deliver(common::USER, &message("first", 300))?;
    let out = python(
        c.node(0).imap(),
        r#"
a = imaplib.IMAP4(HOST, PORT); a.login(USER, PASS); a.select("INBOX")
b = imaplib.IMAP4(HOST, PORT); b.login(USER, PASS); b.select("INBOX")
def untagged(m):
    r = dict(m.untagged_responses); m.untagged_responses.clear(); return r
untagged(a); untagged(b)
a.append("INBOX", None, None, b"Subject: two\r\n\r\nbody\r\n")
print("b after append", b.noop(), untagged(b))
print("recent a", a.fetch("2", "(FLAGS)")[1], "recent b", b.fetch("2", "(FLAGS)")[1])
a.store("1", "+FLAGS", "(\\Flagged)")
untagged(a)
print("b after store", b.noop(), untagged(b))
a.store("1", "+FLAGS", "(\\Deleted)")
a.expunge()
print("b fetch during pending expunge", b.fetch("1:2", "(UID)"), untagged(b))
print("b store during pending expunge", b.store("2", "+FLAGS", "(\\Seen)"), untagged(b))
print("b search during pending expunge", b.search(None, "ALL"), untagged(b))
print("b noop", b.noop(), untagged(b))
print("b fetch after", b.fetch("1:*", "(UID FLAGS)"))
a.logout(); b.logout()
"#,
    )?;
    print!("{out}");
    assert!(
        out.contains("b after append ('OK', [b'NOOP completed']) {'EXISTS': [b'2'], 'RECENT'"),
        "{out}"
    );
    let recent_a = out.contains("recent a [b'2 (FLAGS (\\\\Recent))']");
    let recent_b = out.contains("recent b [b'2 (FLAGS (\\\\Recent))']");
    assert!(
        recent_a ^ recent_b,
        "\\Recent must go to exactly one session:\n{out}"
    );
    assert!(
        out.contains(
            "b after store ('OK', [b'NOOP completed']) {'FETCH': [b'1 (UID 1 FLAGS (\\\\Flagged"
        ),
        "{out}"
    );
    // No EXPUNGE during FETCH/STORE/SEARCH; the expunged message is refused or still there.
    for cmd in ["fetch", "store", "search"] {
        let line = out
            .lines()
            .find(|l| l.starts_with(&format!("b {cmd} during")))
            .unwrap_or("");
        assert!(!line.contains("'EXPUNGE'"), "{line}");
    }
    assert!(
        out.contains("[EXPUNGEISSUED]") || out.contains("b fetch during pending expunge ('OK'"),
        "{out}"
    );
    assert!(
        out.contains("b search during pending expunge ('OK', [b'2'])"),
        "{out}"
    );
    assert!(
        out.contains("b noop ('OK', [b'NOOP completed']) {'EXPUNGE': [b'1']"),
        "{out}"
    );
    assert!(
        out.contains("b fetch after ('OK', [b'1 (UID 2 FLAGS (\\\\Seen"),
        "{out}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_hears_smtp_delivery_within_a_second() -> anyhow::Result<()> {
    let c = node().await?;
    let smtp = c.node(0).smtp();
    let out = python(
        c.node(0).imap(),
        &format!(
            r#"
import smtplib
s = socket.create_connection((HOST, PORT))
f = s.makefile("rb")
f.readline()
def cmd(line):
    s.sendall(line)
    out = []
    while True:
        l = f.readline().decode()
        out.append(l.strip())
        if l.startswith(line.split(b" ")[0].decode() + " "):
            return out
cmd(("a LOGIN " + USER + " " + PASS + "\r\n").encode())
print("select", cmd(b"b SELECT INBOX\r\n")[-1])
s.sendall(b"c IDLE\r\n")
print("idle", f.readline().decode().strip())
t0 = time.time()
smtp = smtplib.SMTP("{ip}", {port})
smtp.sendmail("x@elsewhere.org", [USER], b"Subject: ping\r\n\r\nhello\r\n")
smtp.quit()
t1 = time.time()
s.settimeout(5)
line = f.readline().decode().strip()
t2 = time.time()
print("pushed", line, "after", round(t2 - t1, 3))
s.sendall(b"DONE\r\n")
rest = []
while True:
    l = f.readline().decode().strip()
    rest.append(l)
    if l.startswith("c "):
        break
print("done", rest)
s.sendall(b"d LOGOUT\r\n")
"#,
            ip = smtp.ip(),
            port = smtp.port()
        ),
    )?;
    print!("{out}");
    assert!(out.contains("idle + idling"), "{out}");
    assert!(out.contains("pushed * 1 EXISTS"), "{out}");
    let secs: f64 = out
        .split("after ")
        .nth(1)
        .and_then(|s| s.lines().next())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(99.0);
    assert!(secs < 1.0, "IDLE push took {secs} s");
    assert!(out.contains("c OK IDLE terminated"), "{out}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn selected_mailbox_deleted_elsewhere_ends_the_session() -> anyhow::Result<()> {
    let c = node().await?;
    let out = python(
        c.node(0).imap(),
        r#"
a = imaplib.IMAP4(HOST, PORT); a.login(USER, PASS)
a.create("Work"); a.append("Work", None, None, b"Subject: w\r\n\r\nw\r\n")
print("select", a.select("Work")[0])
b = imaplib.IMAP4(HOST, PORT); b.login(USER, PASS)
print("delete", b.delete("Work")[0])
try:
    print("noop", a.noop())
except imaplib.IMAP4.abort as e:
    print("aborted", e)
print("bye", a.untagged_responses.get("BYE"))
print("b still fine", b.noop()[0])
"#,
    )?;
    print!("{out}");
    assert!(out.contains("delete OK"), "{out}");
    assert!(out.contains("deleted or renamed"), "{out}");
    assert!(out.contains("b still fine OK"), "{out}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pop3_and_imap_on_one_maildrop_agree() -> anyhow::Result<()> {
    let c = node().await?;
    let mail = &c.node(0).node().state.mail;
    for i in 0..3 {
        mail.deliver(common::USER, &message(&format!("p{i}"), 300))?;
    }
    let pop3 = c.node(0).pop3();
    let out = python(
        c.node(0).imap(),
        &format!(
            r#"
import poplib
m = imaplib.IMAP4(HOST, PORT); m.login(USER, PASS); m.select("INBOX")
m.store("3", "+FLAGS", "(\\Seen)")
p = poplib.POP3("{ip}", {port}); p.user(USER); p.pass_(PASS)
print("pop stat", p.stat())
p.dele(1); p.quit()
print("imap noop", m.noop()[0], m.untagged_responses.get("EXPUNGE"))
print("imap uids", m.fetch("1:*", "(UID)")[1])
m.logout()
"#,
            ip = pop3.ip(),
            port = pop3.port()
        ),
    )?;
    print!("{out}");
    assert!(out.contains("pop stat (3,"), "{out}");
    assert!(out.contains("imap noop OK [b'1']"), "{out}");
    assert!(
        out.contains("imap uids [b'1 (UID 2)', b'2 (UID 3)']"),
        "{out}"
    );
    Ok(())
}
