//! The fuzz targets of `ds-fuzz` under proptest, with a bounded number of cases so CI can run
//! them on every change (issue #13 point 20). Inputs are built from each protocol's own
//! commands and arbitrary bytes, so that most cases get past the first command; the seeds of
//! the cargo-afl corpus (`fuzz/corpus/`) run first, as regression cases.

use proptest::prelude::*;

/// Cases per target; `PROPTEST_CASES` overrides it for a longer run.
fn cases(default: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(default);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// A session: lines picked from `words` or made of arbitrary bytes, CRLF or LF ended.
fn session(words: &'static [&'static str]) -> impl Strategy<Value = Vec<u8>> {
    let line = prop_oneof![
        4 => proptest::sample::select(words).prop_map(|w| w.as_bytes().to_vec()),
        1 => proptest::collection::vec(any::<u8>(), 0..200),
        1 => proptest::sample::select(words).prop_flat_map(|w| {
            proptest::collection::vec(any::<u8>(), 0..40).prop_map(move |tail| {
                let mut l = w.as_bytes().to_vec();
                l.push(b' ');
                l.extend(tail);
                l
            })
        }),
    ];
    let end = prop_oneof![4 => Just(&b"\r\n"[..]), 1 => Just(&b"\n"[..]), 1 => Just(&b""[..])];
    proptest::collection::vec((line, end), 0..12).prop_map(|lines| {
        lines
            .into_iter()
            .flat_map(|(mut l, e)| {
                l.extend_from_slice(e);
                l
            })
            .collect()
    })
}

const SMTP: &[&str] = &[
    "EHLO fuzz.test",
    "HELO fuzz.test",
    "MAIL FROM:<a@b.test>",
    "MAIL FROM:<> SIZE=100 BODY=8BITMIME",
    "RCPT TO:<fuzz@example.com>",
    "RCPT TO:<postmaster>",
    "RCPT TO:<nobody@example.com> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;x@y",
    "DATA",
    "Subject: x",
    ".",
    "..",
    "BDAT 5 LAST",
    "RSET",
    "NOOP",
    "VRFY fuzz",
    "HELP",
    "AUTH PLAIN AGZ1enpAZXhhbXBsZS5jb20AZnV6ei1wYXNzd29yZA==",
    "STARTTLS",
    "QUIT",
];

const POP3: &[&str] = &[
    "CAPA",
    "USER fuzz@example.com",
    "USER fuzz%example.com",
    "PASS fuzz-password",
    "PASS wrong",
    "AUTH PLAIN",
    "AUTH PLAIN AGZ1enpAZXhhbXBsZS5jb20AZnV6ei1wYXNzd29yZA==",
    "AGZ1enpAZXhhbXBsZS5jb20AZnV6ei1wYXNzd29yZA==",
    "*",
    "STAT",
    "LIST",
    "LIST 1",
    "UIDL",
    "RETR 1",
    "TOP 1 0",
    "DELE 1",
    "RSET",
    "NOOP",
    "STLS",
    "XCLIENT ADDR=1.2.3.4",
    "QUIT",
];

const IMAP: &[&str] = &[
    "a CAPABILITY",
    "a LOGIN fuzz@example.com fuzz-password",
    "a LOGIN {16+}",
    "fuzz@example.com fuzz-password",
    "a AUTHENTICATE PLAIN AGZ1enpAZXhhbXBsZS5jb20AZnV6ei1wYXNzd29yZA==",
    "a SELECT INBOX",
    "a EXAMINE INBOX",
    "a FETCH 1:* (FLAGS ENVELOPE BODYSTRUCTURE RFC822.SIZE)",
    "a FETCH 1 BODY.PEEK[HEADER.FIELDS (SUBJECT)]<0.10>",
    "a UID FETCH 1:* BODY[]",
    "a SEARCH TEXT hello OR SEEN NOT DELETED",
    "a STORE 1 +FLAGS (\\Seen $x)",
    "a COPY 1 Trash",
    "a MOVE 1 Archive",
    "a APPEND INBOX {5+}",
    "hello",
    "a CREATE a/b",
    "a LIST \"\" *",
    "a STATUS INBOX (MESSAGES UIDNEXT)",
    "a IDLE",
    "DONE",
    "a EXPUNGE",
    "a CLOSE",
    "a ENABLE CONDSTORE",
    "a STARTTLS",
    "a LOGOUT",
];

proptest! {
    #![proptest_config(cases(48))]

    #[test]
    fn smtp_session(input in session(SMTP)) {
        ds_fuzz::smtp_session(&input);
    }

    #[test]
    fn pop3_session(input in session(POP3)) {
        ds_fuzz::pop3_session(&input);
    }

    #[test]
    fn imap_session(input in session(IMAP)) {
        ds_fuzz::imap_session(&input);
    }
}

proptest! {
    #![proptest_config(cases(2000))]

    #[test]
    fn pop3_command(input in session(POP3)) {
        for line in input.split(|&b| b == b'\n') {
            ds_fuzz::pop3_command(line);
        }
    }

    #[test]
    fn login_name(
        name in prop_oneof![
            "[a-zA-Z0-9._%@+-]{0,40}",
            "\\PC{0,40}",
            "[a-z]{1,8}[@%][a-z]{1,8}(\\.[a-z]{1,4}){0,2}",
        ],
        sni in proptest::option::of("[a-zA-Z0-9.-]{0,20}"),
        ip in proptest::option::of("127\\.0\\.0\\.[0-9]{1,3}"),
    ) {
        let mut input = name.replace('\n', "");
        if sni.is_some() || ip.is_some() {
            input.push('\n');
            input.push_str(&sni.unwrap_or_default());
        }
        if let Some(ip) = ip {
            input.push('\n');
            input.push_str(&ip);
        }
        ds_fuzz::login_name(input.as_bytes());
    }

    #[test]
    fn config(input in prop_oneof![
        "\\PC{0,300}",
        "(\\[(node|listen|limits|tls|cluster|smtp|domains)\\]\n([a-z_]{1,12} = (\"[^\"\n]{0,20}\"|[0-9]{1,6}|true|\\[\\]|\\[\"[0-9.:]{0,22}\"\\])\n){0,4}){0,4}",
    ]) {
        ds_fuzz::config(input.as_bytes());
    }
}

/// The seeds of the cargo-afl corpus, as fixed regression cases.
#[test]
fn corpus_seeds() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus");

    let mut ran = 0;
    for &(target, run) in ds_fuzz::TARGETS {
        let dir = root.join(target);
        let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        for entry in entries {
            let path = entry.unwrap().path();
            run(&std::fs::read(&path).unwrap());
            ran += 1;
        }
    }
    assert!(ran >= 12, "only {ran} corpus seeds");
}
