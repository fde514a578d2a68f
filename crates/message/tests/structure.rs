//! ENVELOPE, BODYSTRUCTURE, BODY and BODY[section] of real-world-shaped messages, checked as the
//! IMAP text imap-codec puts on the wire (hand-checked against RFC 3501 §7.4.2 and Dovecot).

mod common;

use common::{BARE, FORWARD, MIXED, body_text, bodystructure_text, envelope_text, section};
use ds_message::{body, body_structure, envelope, section_bytes};

#[test]
fn envelope_mixed() {
    let from = r#"(("=?UTF-8?Q?J=C3=B6rg_M=C3=BCller?=" NIL "joerg" "example.de"))"#;
    assert_eq!(
        envelope_text(envelope(MIXED)),
        format!(
            r#"("Tue, 01 Dec 2026 10:00:00 +0100" "=?UTF-8?B?R3LDvMOfZSBhdXMgTcO8bmNoZW4=?=" {from} {from} {from} (("Alice" NIL "alice" "example.com")(NIL NIL "bob" "example.org")) ((NIL NIL "Team" NIL)(NIL NIL "carol" "example.net")(NIL NIL NIL NIL)) NIL NIL "<m1@example.de>")"#
        )
    );
}

#[test]
fn envelope_missing_headers() {
    assert_eq!(
        envelope_text(envelope(BARE)),
        r#"(NIL "only" NIL NIL NIL NIL NIL NIL NIL NIL)"#
    );
    assert_eq!(
        envelope_text(envelope(b"")),
        "(NIL NIL NIL NIL NIL NIL NIL NIL NIL NIL)"
    );
}

#[test]
fn envelope_sender_reply_to_and_quoting() {
    let msg = b"From: a@x.org\r\nSender: s@x.org\r\nReply-To: \"R \\\"Q\\\" S\" <r@x.org>\r\nIn-Reply-To: <p@x.org>\r\nSubject: folded\r\n line \"quoted\" \\ back\r\n\r\n";
    assert_eq!(
        envelope_text(envelope(msg)),
        r#"(NIL "folded line \"quoted\" \\ back" ((NIL NIL "a" "x.org")) ((NIL NIL "s" "x.org")) (("R \"Q\" S" NIL "r" "x.org")) NIL NIL NIL "<p@x.org>" NIL)"#
    );
}

#[test]
fn envelope_utf8_subject_is_a_literal() {
    // RFC 6532: raw UTF-8 in a header. Quoted strings are 7-bit, so it goes out as a literal.
    let msg = "Subject: Grüße\r\nFrom: Jörg <jörg@bücher.de>\r\n\r\nx".as_bytes();
    let text = envelope_text(envelope(msg));
    assert_eq!(
        text,
        "(NIL {7}\r\nGrüße (({5}\r\nJörg NIL {5}\r\njörg {10}\r\nbücher.de)) (({5}\r\nJörg NIL {5}\r\njörg {10}\r\nbücher.de)) (({5}\r\nJörg NIL {5}\r\njörg {10}\r\nbücher.de)) NIL NIL NIL NIL NIL)"
    );
}

#[test]
fn bodystructure_mixed() {
    let plain =
        r#"("TEXT" "plain" ("charset" "utf-8") NIL NIL "quoted-printable" 19 1 NIL NIL NIL NIL)"#;
    let html = r#"("TEXT" "html" ("charset" "utf-8") NIL NIL "7BIT" 25 1 NIL NIL NIL NIL)"#;
    let pdf = r#"("application" "pdf" ("name" "report.pdf") NIL NIL "base64" 20 NIL ("attachment" ("filename" "report.pdf")) NIL NIL)"#;
    assert_eq!(
        bodystructure_text(body_structure(MIXED)),
        format!(
            r#"(({plain}{html} "alternative" ("boundary" "inner") NIL NIL NIL){pdf} "mixed" ("boundary" "outer") NIL NIL NIL)"#
        )
    );
    assert_eq!(
        body_text(body(MIXED)),
        r#"((("TEXT" "plain" ("charset" "utf-8") NIL NIL "quoted-printable" 19 1)("TEXT" "html" ("charset" "utf-8") NIL NIL "7BIT" 25 1) "alternative")("application" "pdf" ("name" "report.pdf") NIL NIL "base64" 20) "mixed")"#
    );
}

#[test]
fn bodystructure_message_rfc822() {
    let inner_env = r#"("Mon, 30 Nov 2026 08:00:00 +0000" "hello" (("Inner" NIL "inner" "example.org")) (("Inner" NIL "inner" "example.org")) (("Inner" NIL "inner" "example.org")) NIL NIL NIL NIL NIL)"#;
    let inner_body =
        r#"("TEXT" "plain" ("charset" "us-ascii") NIL NIL "7BIT" 36 2 NIL NIL NIL NIL)"#;
    assert_eq!(
        bodystructure_text(body_structure(FORWARD)),
        format!(
            r#"(("TEXT" "plain" ("charset" "us-ascii") NIL NIL "7BIT" 13 1 NIL NIL NIL NIL)("MESSAGE" "RFC822" NIL NIL NIL "7BIT" 126 {inner_env} {inner_body} 6 NIL NIL NIL NIL) "mixed" ("boundary" "XX") NIL NIL NIL)"#
        )
    );
    assert_eq!(
        envelope_text(envelope(FORWARD)),
        r#"(NIL "Fwd: hello" ((NIL NIL "outer" "example.com")) ((NIL NIL "outer" "example.com")) ((NIL NIL "outer" "example.com")) ((NIL NIL "undisclosed-recipients" NIL)(NIL NIL NIL NIL)) NIL NIL NIL NIL)"#
    );
}

#[test]
fn bodystructure_defaults_and_extension_fields() {
    assert_eq!(
        bodystructure_text(body_structure(BARE)),
        r#"("TEXT" "plain" ("charset" "us-ascii") NIL NIL "7BIT" 4 1 NIL NIL NIL NIL)"#
    );
    let msg = b"Content-Type: image/png; name*0=\"a very long \"; name*1=\"name.png\"\r\nContent-ID: <img1@x>\r\nContent-Description: A picture\r\nContent-MD5: Q2hlY2sgSW50ZWdyaXR5IQ==\r\nContent-Disposition: inline\r\nContent-Language: en, de\r\nContent-Location: http://example.com/a.png\r\nContent-Transfer-Encoding: BASE64\r\n\r\niVBORw0KGgo=\r\n";
    assert_eq!(
        bodystructure_text(body_structure(msg)),
        r#"("image" "png" ("name*0" "a very long " "name*1" "name.png") "<img1@x>" "A picture" "BASE64" 14 "Q2hlY2sgSW50ZWdyaXR5IQ==" ("inline" NIL) ("en" "de") "http://example.com/a.png")"#
    );
    // A multipart without any part still has one (empty) body: BODYSTRUCTURE needs one.
    let msg = b"Content-Type: multipart/mixed; boundary=nothere\r\n\r\nno parts at all\r\n";
    assert_eq!(
        bodystructure_text(body_structure(msg)),
        r#"(("TEXT" "plain" ("charset" "us-ascii") NIL NIL "7BIT" 0 0 NIL NIL NIL NIL) "mixed" ("boundary" "nothere") NIL NIL NIL)"#
    );
    // Encoded message/rfc822 keeps the message form (NIL envelope, empty body).
    let msg = b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: base64\r\n\r\nRnJvbTogYUBiCgp4\r\n";
    assert_eq!(
        body_text(body(msg)),
        r#"("MESSAGE" "RFC822" NIL NIL NIL "base64" 18 (NIL NIL NIL NIL NIL NIL NIL NIL NIL NIL) ("TEXT" "plain" ("charset" "us-ascii") NIL NIL "7BIT" 0 0) 1)"#
    );
}

fn get(msg: &[u8], spec: &str) -> Option<Vec<u8>> {
    section_bytes(msg, section(spec).as_ref(), false)
}

#[track_caller]
fn check(msg: &[u8], spec: &str, want: Option<&[u8]>) {
    let got = get(msg, spec);
    assert_eq!(
        got.as_deref().map(String::from_utf8_lossy),
        want.map(String::from_utf8_lossy),
        "BODY[{spec}]"
    );
}

#[test]
fn sections_of_forwarded_message() {
    let inner = b"From: Inner <inner@example.org>\r\nSubject: hello\r\nDate: Mon, 30 Nov 2026 08:00:00 +0000\r\n\r\nInner body line 1\r\nInner body line 2";
    check(FORWARD, "", Some(FORWARD));
    check(
        FORWARD,
        "HEADER",
        Some(b"From: outer@example.com\r\nTo: undisclosed-recipients:;\r\nSubject: Fwd: hello\r\nContent-Type: multipart/mixed; boundary=XX\r\n\r\n"),
    );
    check(FORWARD, "TEXT", Some(&FORWARD[122..]));
    assert!(FORWARD[122..].starts_with(b"--XX\r\nContent-Type: text/plain"));
    check(FORWARD, "1", Some(b"See attached."));
    check(FORWARD, "1.MIME", Some(b"Content-Type: text/plain\r\n\r\n"));
    check(FORWARD, "2", Some(inner));
    check(
        FORWARD,
        "2.MIME",
        Some(b"Content-Type: message/rfc822\r\n\r\n"),
    );
    check(FORWARD, "2.HEADER", Some(&inner[..90]));
    assert!(inner[..90].ends_with(b"+0000\r\n\r\n"));
    check(
        FORWARD,
        "2.TEXT",
        Some(b"Inner body line 1\r\nInner body line 2"),
    );
    check(
        FORWARD,
        "2.1",
        Some(b"Inner body line 1\r\nInner body line 2"),
    );
    check(FORWARD, "2.1.MIME", Some(&inner[..90]));
    check(
        FORWARD,
        "2.HEADER.FIELDS (SUBJECT)",
        Some(b"Subject: hello\r\n\r\n"),
    );
    check(
        FORWARD,
        "HEADER.FIELDS (subject FROM)",
        Some(b"From: outer@example.com\r\nSubject: Fwd: hello\r\n\r\n"),
    );
    check(
        FORWARD,
        "HEADER.FIELDS.NOT (Subject Content-Type)",
        Some(b"From: outer@example.com\r\nTo: undisclosed-recipients:;\r\n\r\n"),
    );
    check(FORWARD, "HEADER.FIELDS (X-Absent)", Some(b"\r\n"));
    for missing in ["3", "1.1", "1.HEADER", "1.TEXT", "2.2", "2.1.1", "4.1"] {
        check(FORWARD, missing, None);
    }
    // `mime: true` on a part section is BODY[part.MIME].
    assert_eq!(
        section_bytes(FORWARD, section("2").as_ref(), true).as_deref(),
        Some(&b"Content-Type: message/rfc822\r\n\r\n"[..])
    );
}

#[test]
fn sections_of_mixed_message() {
    let alt_body: &[u8] = b"--inner\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\nHall=C3=B6chen Welt\r\n--inner\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<p>Hello <b>world</b></p>\r\n--inner--";
    check(MIXED, "1", Some(alt_body));
    check(
        MIXED,
        "1.MIME",
        Some(b"Content-Type: multipart/alternative; boundary=\"inner\"\r\n\r\n"),
    );
    check(MIXED, "1.1", Some(b"Hall=C3=B6chen Welt"));
    check(MIXED, "1.2", Some(b"<p>Hello <b>world</b></p>"));
    check(
        MIXED,
        "1.2.MIME",
        Some(b"Content-Type: text/html; charset=utf-8\r\n\r\n"),
    );
    check(MIXED, "2", Some(b"JVBERi0xLjQKJcfsj6IK"));
    check(MIXED, "3", None);
    check(MIXED, "1.3", None);
}

#[test]
fn sections_of_single_part_message() {
    check(BARE, "1", Some(b"body"));
    check(BARE, "TEXT", Some(b"body"));
    check(BARE, "1.MIME", Some(b"Subject: only\r\n\r\n"));
    check(BARE, "HEADER", Some(b"Subject: only\r\n\r\n"));
    check(BARE, "2", None);
    check(BARE, "1.1", None);
    // Folded fields come back as written.
    let msg = b"Subject: a\r\n\tfolded one\r\nX-A: 1\r\nx-a: 2\r\n\r\n";
    check(
        msg,
        "HEADER.FIELDS (SUBJECT X-A)",
        Some(b"Subject: a\r\n\tfolded one\r\nX-A: 1\r\nx-a: 2\r\n\r\n"),
    );
    check(
        msg,
        "HEADER.FIELDS.NOT (SUBJECT)",
        Some(b"X-A: 1\r\nx-a: 2\r\n\r\n"),
    );
    // A message without a blank line is all header.
    check(b"Subject: x\r\n", "TEXT", Some(b""));
    check(b"Subject: x\r\n", "HEADER", Some(b"Subject: x\r\n"));
}

#[test]
fn rfc3501_fetch_example() {
    // The message behind the FETCH example of RFC 3501 §7.4.2: 3028 octets in 92 lines of body.
    let mut msg = b"Date: Wed, 17 Jul 1996 02:23:25 -0700 (PDT)\r\n\
From: Terry Gray <gray@cac.washington.edu>\r\n\
Subject: IMAP4rev1 WG mtg summary and minutes\r\n\
To: imap@cac.washington.edu\r\n\
cc: minutes@CNRI.Reston.VA.US, John Klensin <KLENSIN@MIT.EDU>\r\n\
Message-Id: <B27397-0100000@cac.washington.edu>\r\n\
MIME-Version: 1.0\r\n\
Content-Type: TEXT/PLAIN; CHARSET=US-ASCII\r\n\r\n"
        .to_vec();
    for line in 0..92 {
        let width = if line < 84 { 31 } else { 30 };
        msg.extend(std::iter::repeat_n(b'x', width));
        msg.extend_from_slice(b"\r\n");
    }
    assert_eq!(
        envelope_text(envelope(&msg)),
        r#"("Wed, 17 Jul 1996 02:23:25 -0700 (PDT)" "IMAP4rev1 WG mtg summary and minutes" (("Terry Gray" NIL "gray" "cac.washington.edu")) (("Terry Gray" NIL "gray" "cac.washington.edu")) (("Terry Gray" NIL "gray" "cac.washington.edu")) ((NIL NIL "imap" "cac.washington.edu")) ((NIL NIL "minutes" "CNRI.Reston.VA.US")("John Klensin" NIL "KLENSIN" "MIT.EDU")) NIL NIL "<B27397-0100000@cac.washington.edu>")"#
    );
    assert_eq!(
        body_text(body(&msg)),
        r#"("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 3028 92)"#
    );
}

#[test]
fn parsed_message_answers_like_the_free_functions() {
    use std::borrow::Cow;
    for msg in [MIXED, FORWARD, BARE] {
        let parsed = ds_message::ParsedMessage::new(msg);
        assert_eq!(parsed.envelope(), envelope(msg));
        assert_eq!(parsed.body_structure(), body_structure(msg));
        assert_eq!(parsed.body(), body(msg));
        for spec in [
            "",
            "HEADER",
            "TEXT",
            "1",
            "2",
            "1.1",
            "2.HEADER",
            "2.1",
            "HEADER.FIELDS (FROM)",
        ] {
            let s = section(spec);
            for mime in [false, true] {
                assert_eq!(
                    parsed.section(s.as_ref(), mime).map(Cow::into_owned),
                    section_bytes(msg, s.as_ref(), mime),
                    "{spec}"
                );
            }
        }
        assert!(matches!(
            parsed.section(section("TEXT").as_ref(), false),
            Some(Cow::Borrowed(_))
        ));
        assert_eq!(
            &msg[parsed.header_len()..],
            &section_bytes(msg, section("TEXT").as_ref(), false).unwrap()[..]
        );
    }
}
