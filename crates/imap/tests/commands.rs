//! Every command through imaplib against a real node.

mod common;

use common::{USER, message, node, python};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mailbox_commands() -> anyhow::Result<()> {
    let c = node().await?;
    let out = python(
        c.node(0).imap(),
        r#"
m = imaplib.IMAP4(HOST, PORT)
m.login(USER, PASS)
print("list", m.list())
print("create", m.create("Work/2024/Q1"))
print("create utf7", m.create("&AMQ-pfel"))
print("create again", m.create("Work"))
print("list %", m.list("\"\"", "%"))
print("list work", m.list("Work/", "*"))
print("delete parent", m.delete("Work/2024"))
print("list noselect", m.list("Work/", "%"))
print("rename", m.rename("Work", "Archive"))
print("list arch", m.list("\"\"", "Archive*"))
print("subscribe", m.subscribe("Archive/2024/Q1"))
print("subscribe ghost", m.subscribe("Ghost"))
print("lsub", m.lsub("\"\"", "*"))
print("unsubscribe", m.unsubscribe("Ghost"))
print("status", m.status("INBOX", "(MESSAGES RECENT UIDNEXT UIDVALIDITY UNSEEN HIGHESTMODSEQ)"))
print("status missing", m.status("Nope", "(MESSAGES)"))
print("delete inbox", m.delete("INBOX"))
print("namespace", m.namespace())
print("id", m.xatom("ID", "NIL"), m.untagged_responses.pop("ID", None))
print("enable", m._simple_command("ENABLE", "CONDSTORE"), m.untagged_responses.pop("ENABLED", None))
print("list empty", m.list("\"\"", '""'))
m.logout()
"#,
    )?;
    print!("{out}");
    for want in [
        r#"(\\HasNoChildren) "/" "INBOX""#,
        r#"(\\HasNoChildren \\Sent) "/" "Sent""#,
        "create ('OK'",
        "create utf7 ('OK'",
        "create again ('NO', [b'[ALREADYEXISTS]",
        r#"(\\HasNoChildren) "/" "&AMQ-pfel""#,
        r#"(\\HasChildren) "/" "Work""#,
        r#"(\\HasNoChildren) "/" "Work/2024/Q1""#,
        r#"(\\Noselect \\HasChildren) "/" "Work/2024""#,
        "rename ('OK'",
        "Archive/2024/Q1",
        "subscribe ghost ('OK'",
        r#"lsub ('OK', [b'() "/" "INBOX"'"#,
        r#"b'(\\Noselect) "/" "Ghost"'"#,
        "status ('OK', [b'\"INBOX\" (MESSAGES 0 RECENT 0 UIDNEXT 1 UIDVALIDITY",
        "status missing ('NO'",
        "delete inbox ('NO'",
        r#"namespace ('OK', [b'(("" "/")) NIL NIL'])"#,
        "dshare",
        "[b'CONDSTORE']",
        r#"list empty ('OK', [b'(\\Noselect) "/" ""'])"#,
    ] {
        assert!(out.contains(want), "missing {want:?} in\n{out}");
    }
    assert!(!out.contains("Ghost'") || out.contains("lsub"), "{out}");
    let _ = USER;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn select_fetch_store_search_copy_move_expunge() -> anyhow::Result<()> {
    let c = node().await?;
    let mail = &c.node(0).node().state.mail;
    for i in 0..3 {
        mail.deliver(USER, &message(&format!("m{i}"), 500 + i * 100))?;
    }
    let out = python(
        c.node(0).imap(),
        r#"
m = imaplib.IMAP4(HOST, PORT)
m.login(USER, PASS)
typ, data = m.select("INBOX")
print("select", typ, data, m.untagged_responses)
print("fetch fast", m.fetch("1:*", "(FLAGS INTERNALDATE RFC822.SIZE UID)"))
print("fetch env", m.fetch("1", "(ENVELOPE)"))
print("fetch bs", m.fetch("1", "(BODYSTRUCTURE)"))
print("fetch peek", m.fetch("2", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])"))
print("flags after peek", m.fetch("2", "(FLAGS)"))
typ, data = m.fetch("2", "(BODY[])")
print("body len", len(data[0][1]), data[0][0])
print("flags after body", m.fetch("2", "(FLAGS)"))
print("partial", m.fetch("3", "(BODY.PEEK[]<0.10>)"))
print("text", m.fetch("3", "(BODY.PEEK[TEXT]<0.5>)"))
print("rfc822.header", m.fetch("3", "(RFC822.HEADER)")[1][0][1][:30])
print("uid fetch", m.uid("FETCH", "2:*", "(FLAGS)"))
print("store", m.store("1", "+FLAGS", "(\\Flagged $Work)"))
print("store silent", m.store("3", "+FLAGS.SILENT", "(\\Deleted)"))
print("search flagged", m.search(None, "FLAGGED"))
print("search utf8", m.search("UTF-8", "SUBJECT", "m1"))
print("search unseen", m.search(None, "UNSEEN"))
print("search or", m.search(None, "OR", "KEYWORD", "$Work", "DELETED"))
print("search not larger", m.search(None, "NOT", "LARGER", "550"))
print("search since", m.search(None, "SINCE", "1-Jan-2000"))
print("uid search", m.uid("SEARCH", "ALL"))
print("search bad charset", m.search("KOI8-R", "ALL"))
print("copy", m.copy("1:2", "Trash"))
print("uid copy", m.uid("COPY", "1", "Nope"))
print("move", m._simple_command("MOVE", "1", "Junk"), m.untagged_responses.pop("OK", None))
print("expunge", m.expunge())
print("after", m.fetch("1:*", "(UID FLAGS)"))
print("append", m.append("INBOX", "(\\Seen)", imaplib.Time2Internaldate(1_000_000_000), b"Subject: appended\r\n\r\nhello\r\n"))
print("noop", m.noop(), m.untagged_responses)
print("appended", m.fetch("*", "(INTERNALDATE FLAGS BODY[])"))
m.store("1", "+FLAGS", "(\\Deleted)")
print("uid expunge", m.uid("EXPUNGE", "999"))
print("close", m.close())
print("examine", m.select("Trash", readonly=True))
print("ro store", m.store("1", "+FLAGS", "(\\Seen)"))
print("unselect", m._simple_command("UNSELECT"))
try:
    m._simple_command("FETCH", "1", "FLAGS")
except imaplib.IMAP4.error as e:
    print("fetch unselected", e)
print("append missing", m.append("Nope", None, None, b"x\r\n"))
m.select("Trash")
print("check", m.check())
print("condstore", m.fetch("1:*", "(MODSEQ)"))
typ, data = m.fetch("1", "(MODSEQ)")
print("unchangedsince", m._simple_command("STORE", "1:2", "(UNCHANGEDSINCE 1)", "+FLAGS", "(\\Answered)"))
m.logout()
"#,
    )?;
    print!("{out}");
    for want in [
        "select OK [b'3']",
        "'UIDVALIDITY'",
        "RFC822.SIZE 480",
        r#"INTERNALDATE ""#,
        r#"ENVELOPE ("Mon, 7 Feb 1994 21:52:25 -0800" "m0" (("Sender" NIL "sender" "example.org"))"#,
        r#"BODYSTRUCTURE ("TEXT" "plain" ("charset" "us-ascii") NIL NIL "7BIT""#,
        "BODY[HEADER.FIELDS (SUBJECT)] {",
        "Subject: m1",
        "flags after peek ('OK', [b'2 (FLAGS (\\\\Recent))'])",
        "body len 596 b'2 (BODY[] {596}'",
        "flags after body ('OK', [b'2 (FLAGS (\\\\Seen \\\\Recent))'])",
        "BODY[]<0> {10}",
        "BODY[TEXT]<0> {5}",
        "rfc822.header b'From: Sender <sender@example.o'",
        "UID 3 FLAGS",
        "store ('OK', [b'1 (FLAGS (\\\\Flagged $Work \\\\Recent))'])",
        "store silent ('OK', [None])",
        "search flagged ('OK', [b'1'])",
        "search utf8 ('OK', [b'2'])",
        "search unseen ('OK', [b'1 3'])",
        "search or ('OK', [b'1 3'])",
        "search not larger ('OK', [b'1'])",
        "search since ('OK', [b'1 2 3'])",
        "uid search ('OK', [b'1 2 3'])",
        "search bad charset ('NO', [b'[BADCHARSET",
        "copy ('OK', [b'[COPYUID",
        "uid copy ('NO', [b'[TRYCREATE]",
        "[b'[COPYUID",
        "expunge ('OK', [b'1', b'2'])",
        "after ('OK', [b'1 (UID 2 FLAGS (\\\\Seen \\\\Recent))'])",
        "append ('OK', [b'[APPENDUID",
        "'EXISTS': [b'3', b'2']",
        "09-Sep-2001 01:46:40 +0000",
        "Subject: appended",
        "uid expunge ('OK'",
        "close ('OK'",
        "examine ('OK', [b'2'])",
        "ro store ('NO'",
        "unselect ('OK'",
        "fetch unselected FETCH command error: BAD",
        "append missing ('NO', [b'[TRYCREATE]",
        "check ('OK'",
        "MODSEQ (",
        "[MODIFIED",
    ] {
        assert!(out.contains(want), "missing {want:?} in\n{out}");
    }
    Ok(())
}
