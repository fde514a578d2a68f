//! Real messages through real clients: a multipart message delivered by SMTP and fetched with
//! imaplib (BODY[] byte-exact, RFC822.SIZE, ENVELOPE, BODYSTRUCTURE, part sections, partial
//! fetches of a large body, SEARCH on decoded text), the structure cache, and non-ASCII folder
//! names in modified UTF-7.

mod common;

use common::{node, python};

/// A PDF-like attachment: `n` base64 lines of 76 characters.
fn base64_lines(n: usize) -> String {
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for l in 0..n {
        for c in 0..76 {
            out.push(alphabet[(l * 7 + c * 3) % 64] as char);
        }
        out.push_str("\r\n");
    }
    out
}

/// text/plain + text/html alternative and a base64 attachment, UTF-8 encoded-word subject.
fn multipart() -> String {
    format!(
        "From: =?UTF-8?Q?J=C3=B6rg_M=C3=BCller?= <joerg@example.org>\r\n\
To: Bob <bob@example.com>\r\n\
Cc: carol@example.net\r\n\
Subject: =?UTF-8?B?R3LDvMOfZSBhdXMgS8O2bG4=?=\r\n\
Date: Tue, 1 Dec 2026 10:00:00 +0100\r\n\
Message-ID: <multi-1@example.org>\r\n\
MIME-Version: 1.0\r\n\
Content-Type: multipart/mixed; boundary=\"outer\"\r\n\
\r\n\
This is a multi-part message in MIME format.\r\n\
--outer\r\n\
Content-Type: multipart/alternative; boundary=\"inner\"\r\n\
\r\n\
--inner\r\n\
Content-Type: text/plain; charset=utf-8\r\n\
Content-Transfer-Encoding: quoted-printable\r\n\
\r\n\
Hallo Bob, das Wetter ist sch=C3=B6n.\r\n\
--inner\r\n\
Content-Type: text/html; charset=utf-8\r\n\
\r\n\
<p>Hallo Bob</p>\r\n\
--inner--\r\n\
\r\n\
--outer\r\n\
Content-Type: application/pdf; name=\"report.pdf\"\r\n\
Content-Disposition: attachment; filename=\"report.pdf\"\r\n\
Content-Transfer-Encoding: base64\r\n\
\r\n\
{}--outer--\r\n",
        base64_lines(4)
    )
}

fn py_bytes(b: &[u8]) -> String {
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("bytes.fromhex('{hex}')")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multipart_message_through_smtp_and_imap() -> anyhow::Result<()> {
    let c = node().await?;
    let msg = multipart();
    let smtp = c.node(0).smtp();
    let out_dir = tempfile::tempdir()?;
    let script = format!(
        r#"
import smtplib
MSG = {msg}
s = smtplib.SMTP('{ip}', {port})
s.sendmail('joerg@example.org', [USER], MSG)
s.quit()
m = imaplib.IMAP4(HOST, PORT)
m.login(USER, PASS)
m.select('INBOX')
typ, d = m.fetch('1', '(RFC822.SIZE BODY.PEEK[])')
head, body = d[0]
size = int(head.split(b'RFC822.SIZE ')[1].split(b' ')[0])
print('size-ok', size == len(body), body.endswith(MSG))
open('{dir}/body', 'wb').write(body)
typ, d = m.fetch('1', '(ENVELOPE)')
print('ENV', d[0].decode())
typ, d = m.fetch('1', '(BODYSTRUCTURE)')
print('BS', d[0].decode())
typ, d = m.fetch('1', '(BODY)')
print('BODY', d[0].decode())
typ, d = m.fetch('1', '(BODY.PEEK[1])')
print('PART1', repr(d[0][1]))
typ, d = m.fetch('1', '(BODY.PEEK[1.2])')
print('PART12', repr(d[0][1]))
typ, d = m.fetch('1', '(BODY.PEEK[2.MIME])')
print('MIME2', repr(d[0][1]))
typ, d = m.fetch('1', '(BODY.PEEK[HEADER.FIELDS (SUBJECT)])')
print('FIELDS', repr(d[0][1]))
m.literal = 'Köln'.encode('utf-8')
print('SEARCH-SUBJ', m.search('UTF-8', 'SUBJECT'))
m.literal = 'schön'.encode('utf-8')
print('SEARCH-BODY', m.search('UTF-8', 'BODY'))
print('SEARCH-TEXT', m.search(None, 'TEXT', 'Wetter'), m.search(None, 'TEXT', 'carol'))
print('SEARCH-NONE', m.search(None, 'BODY', 'nowhere'))
m.logout()
"#,
        msg = py_bytes(msg.as_bytes()),
        ip = smtp.ip(),
        port = smtp.port(),
        dir = out_dir.path().display(),
    );
    let reads = ds_imap::msg::whole_reads();
    let out = python(c.node(0).imap(), &script)?;
    print!("{out}");
    let want = [
        "size-ok True True",
        r#"ENV 1 (ENVELOPE ("Tue, 1 Dec 2026 10:00:00 +0100" "=?UTF-8?B?R3LDvMOfZSBhdXMgS8O2bG4=?=" (("=?UTF-8?Q?J=C3=B6rg_M=C3=BCller?=" NIL "joerg" "example.org")) (("=?UTF-8?Q?J=C3=B6rg_M=C3=BCller?=" NIL "joerg" "example.org")) (("=?UTF-8?Q?J=C3=B6rg_M=C3=BCller?=" NIL "joerg" "example.org")) (("Bob" NIL "bob" "example.com")) ((NIL NIL "carol" "example.net")) NIL NIL "<multi-1@example.org>"))"#,
        r#"BS 1 (BODYSTRUCTURE ((("TEXT" "plain" ("charset" "utf-8") NIL NIL "quoted-printable" 37 1 NIL NIL NIL NIL)("TEXT" "html" ("charset" "utf-8") NIL NIL "7BIT" 16 1 NIL NIL NIL NIL) "alternative" ("boundary" "inner") NIL NIL NIL)("application" "pdf" ("name" "report.pdf") NIL NIL "base64" 310 NIL ("attachment" ("filename" "report.pdf")) NIL NIL) "mixed" ("boundary" "outer") NIL NIL NIL))"#,
        r#"BODY 1 (BODY ((("TEXT" "plain" ("charset" "utf-8") NIL NIL "quoted-printable" 37 1)("TEXT" "html" ("charset" "utf-8") NIL NIL "7BIT" 16 1) "alternative")("application" "pdf" ("name" "report.pdf") NIL NIL "base64" 310) "mixed"))"#,
        r#"PART1 b'--inner\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\nHallo Bob, das Wetter ist sch=C3=B6n.\r\n--inner\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<p>Hallo Bob</p>\r\n--inner--\r\n'"#,
        "PART12 b'<p>Hallo Bob</p>'",
        r#"MIME2 b'Content-Type: application/pdf; name="report.pdf"\r\nContent-Disposition: attachment; filename="report.pdf"\r\nContent-Transfer-Encoding: base64\r\n\r\n'"#,
        r#"FIELDS b'Subject: =?UTF-8?B?R3LDvMOfZSBhdXMgS8O2bG4=?=\r\n\r\n'"#,
        "SEARCH-SUBJ ('OK', [b'1'])",
        "SEARCH-BODY ('OK', [b'1'])",
        "SEARCH-TEXT ('OK', [b'1']) ('OK', [b'1'])",
        "SEARCH-NONE ('OK', [b''])",
    ];
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines, want);
    // BODY[] byte-exact with the store (the delivery's own Received/Return-Path lines first).
    let stored = c.node(0).inbox(common::USER).remove(0);
    assert_eq!(std::fs::read(out_dir.path().join("body"))?, stored);
    assert!(stored.ends_with(msg.as_bytes()));

    // The structure is parsed once per body: FETCH BODYSTRUCTURE again reads nothing whole.
    let before = ds_imap::msg::whole_reads();
    assert!(before > reads, "the first BODYSTRUCTURE parsed the message");
    let out = python(
        c.node(0).imap(),
        r#"
m = imaplib.IMAP4(HOST, PORT)
m.login(USER, PASS)
m.select('INBOX')
for _ in range(3):
    print(m.fetch('1', '(BODYSTRUCTURE ENVELOPE BODY RFC822.HEADER BODY.PEEK[TEXT]<0.10>)')[1])
m.logout()
"#,
    )?;
    assert!(out.contains("BODYSTRUCTURE ((("), "{out}");
    assert_eq!(
        ds_imap::msg::whole_reads(),
        before,
        "second FETCH re-read the body"
    );
    assert!(c.node(0).node().state.store.bodies().structures_cached() >= 1);
    Ok(())
}

/// Partial fetches at the start, middle and end of a body over 1 MiB (streamed from the store).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_fetch_of_a_large_body() -> anyhow::Result<()> {
    let c = node().await?;
    let out = python(
        c.node(0).imap(),
        r#"
import hashlib
body = b'Subject: big\r\n\r\n' + b''.join(b'%08d the quick brown fox jumps over the lazy dog\r\n' % i for i in range(30000))
assert len(body) > 1 << 20
m = imaplib.IMAP4(HOST, PORT)
m.login(USER, PASS)
print(m.append('INBOX', None, None, body)[0])
m.select('INBOX')
n = len(body)
for start, ln in [(0, 100), (n // 2 - 7, 70000), (n - 50, 100), (n + 5, 10)]:
    typ, d = m.fetch('1', '(BODY.PEEK[]<%d.%d>)' % (start, ln))
    got = d[0][1] if isinstance(d[0], tuple) else b''
    print('range', got == body[start:start + ln], len(got))
typ, d = m.fetch('1', '(BODY.PEEK[TEXT]<100.50> RFC822.SIZE)')
print('text', d[0][1] == body[16 + 100:16 + 150], d[1] == b' RFC822.SIZE %d)' % n)
typ, d = m.fetch('1', '(BODY.PEEK[])')
print('whole', d[0][1] == body)
m.logout()
"#,
    )?;
    print!("{out}");
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [
            "OK",
            "range True 100",
            "range True 70000",
            "range True 50",
            "range True 0",
            "text True True",
            "whole True",
        ]
    );
    Ok(())
}

/// Mailbox names travel in modified UTF-7 and are stored in UTF-8.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_ascii_folders() -> anyhow::Result<()> {
    let c = node().await?;
    let out = python(
        c.node(0).imap(),
        r#"
m = imaplib.IMAP4(HOST, PORT)
m.login(USER, PASS)
print(m.create('Entw&APw-rfe')[0])
print(m.append('Entw&APw-rfe', None, None, b'Subject: draft\r\n\r\nx\r\n')[0])
print(m.status('Entw&APw-rfe', '(MESSAGES)')[1][0].decode())
print(m.select('Entw&APw-rfe')[1][0].decode())
m.close()
print(m.rename('Entw&APw-rfe', '&U,BTFw-/&ZeVnLIqe-')[0])
print(m.list('""', '&U,BTFw-*')[1])
print(m.select('&U,BTFw-/&ZeVnLIqe-')[1][0].decode())
try:
    print(m.create('bad&Jjo!')[0])
except imaplib.IMAP4.error as e:
    print('BAD' if 'BAD' in str(e) else e)
m.logout()
"#,
    )?;
    print!("{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[..4],
        ["OK", "OK", "\"Entw&APw-rfe\" (MESSAGES 1)", "1"]
    );
    assert_eq!(lines[4], "OK");
    assert!(lines[5].contains("\"&U,BTFw-/&ZeVnLIqe-\""), "{out}");
    assert!(lines[5].contains("\"&U,BTFw-\""), "{out}");
    assert_eq!(lines[6], "1");
    assert_eq!(lines[7], "BAD", "{out}");
    // Stored in UTF-8.
    let mail = &c.node(0).node().state.mail;
    let names: Vec<String> = mail
        .list_mailboxes(common::USER)?
        .into_iter()
        .map(|m| m.name)
        .collect();
    assert!(names.iter().any(|n| n == "台北/日本語"), "{names:?}");
    assert!(!names.iter().any(|n| n.contains('&')), "{names:?}");
    Ok(())
}
