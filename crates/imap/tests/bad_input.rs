//! Bad input gets BAD/NO with the right tag, the session goes on (or ends cleanly), and
//! nothing crashes or hangs.

mod common;

use common::{node, python};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_answered() -> anyhow::Result<()> {
    let c = node().await?;
    let out = python(
        c.node(0).imap(),
        r#"
s = socket.create_connection((HOST, PORT))
s.settimeout(10)
f = s.makefile("rb")
f.readline()
def ask(raw, tag):
    s.sendall(raw)
    got = []
    while True:
        l = f.readline()
        if not l:
            got.append("EOF"); break
        l = l.decode("latin-1").rstrip("\r\n")
        got.append(l)
        if l.startswith(tag + " ") or l.startswith("+ "):
            break
    return got
print("unknown", ask(b"a1 FOOBAR\r\n", "a1"))
print("syntax", ask(b"a2 SELECT\r\n", "a2"))
print("state", ask(b"a3 SELECT INBOX\r\n", "a3"))
print("fetch unauth", ask(b"a4 FETCH 1 FLAGS\r\n", "a4"))
print("8bit", ask(b"a5 LOGIN b\xe9b secret\r\n", "a5"))
print("empty", ask(b"\r\n", "*"))
print("huge literal", ask(b"a6 LOGIN {100000000}\r\n", "a6"))
print("login", ask(("a7 LOGIN " + USER + " " + PASS + "\r\n").encode(), "a7"))
print("unbalanced", ask(b"a8 FETCH 1 (FLAGS\r\n", "a8"))
print("not selected", ask(b"a9 FETCH 1 FLAGS\r\n", "a9"))
print("huge append", ask(b"b1 APPEND INBOX {999999999}\r\n", "b1"))
print("select", ask(b"b2 SELECT INBOX\r\n", "b2")[-1])
print("bad seq", ask(b"b3 FETCH 5 FLAGS\r\n", "b3"))
print("bad set", ask(b"b4 FETCH 0:x FLAGS\r\n", "b4"))
print("bad store", ask(b"b5 STORE 1 FLAGS\r\n", "b5"))
print("sort", ask(b"b6 SORT (DATE) UTF-8 ALL\r\n", "b6"))
print("append literal", ask(b"b7 APPEND INBOX (\\Seen) {5}\r\n", "b7"))
print("append data", ask(b"hello\r\n", "b7"))
print("alive", ask(b"b8 NOOP\r\n", "b8"))
print("long line", ask(b"b9 NOOP " + b"x" * 70000 + b"\r\n", "b9"))
s.close()

# A literal announced and never sent: the client gives up, the server is fine.
s = socket.create_connection((HOST, PORT)); s.settimeout(10); f = s.makefile("rb"); f.readline()
s.sendall(b"c1 LOGIN {5}\r\n")
print("announced", f.readline().decode().strip())
s.close()
m = imaplib.IMAP4(HOST, PORT); m.login(USER, PASS)
print("next session", m.noop()[0])
m.logout()
"#,
    )?;
    print!("{out}");
    for want in [
        "unknown ['a1 BAD Unknown command']",
        "syntax ['a2 BAD Syntax error in SELECT arguments']",
        "state ['a3 BAD Log in first']",
        "fetch unauth ['a4 BAD",
        "8bit ['a5 BAD",
        "empty ['* BAD",
        "huge literal ['a6 BAD Literal too large']",
        "login ['a7 OK",
        "unbalanced ['a8 BAD",
        "not selected ['a9 BAD No mailbox selected']",
        "huge append ['b1 NO [TOOBIG]",
        "select b2 OK",
        "bad seq ['b3 BAD",
        "bad set ['b4 BAD",
        "bad store ['b5 BAD",
        "sort ['b6 BAD",
        "append literal ['+ Ready for literal data']",
        "b7 OK [APPENDUID",
        "alive [",
        "b8 OK NOOP completed",
        "long line ['* BYE Command line too long', 'EOF']",
        "announced + Ready",
        "next session OK",
    ] {
        assert!(out.contains(want), "missing {want:?} in\n{out}");
    }
    Ok(())
}
