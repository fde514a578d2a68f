//! Every RFC 3501 SEARCH key (and CONDSTORE's MODSEQ), parsed from IMAP text by imap-codec and
//! evaluated against real-world-shaped messages.

mod common;

use common::{FORWARD, MIXED, search_key};
use ds_message::search::{Candidate, matches, needs_message};

struct Stored {
    seq: u32,
    uid: u32,
    flags: Vec<String>,
    internal_date: i64,
    size: u64,
    message: Option<Vec<u8>>,
    recent: bool,
    modseq: u64,
}

impl Candidate for Stored {
    fn seq(&self) -> u32 {
        self.seq
    }
    fn uid(&self) -> u32 {
        self.uid
    }
    fn flags(&self) -> &[String] {
        &self.flags
    }
    fn internal_date(&self) -> i64 {
        self.internal_date
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn message(&self) -> Option<&[u8]> {
        self.message.as_deref()
    }
    fn is_recent(&self) -> bool {
        self.recent
    }
    fn modseq(&self) -> u64 {
        self.modseq
    }
    fn max_seq(&self) -> u32 {
        5
    }
    fn max_uid(&self) -> u32 {
        50
    }
}

/// 2026-12-01 09:30:00 UTC.
const DEC_1: i64 = 1_796_117_400;

fn mixed() -> Stored {
    Stored {
        seq: 3,
        uid: 30,
        flags: vec!["\\Seen".into(), "\\Flagged".into(), "$Work".into()],
        internal_date: DEC_1,
        size: 1500,
        message: Some(MIXED.to_vec()),
        recent: false,
        modseq: 7,
    }
}

#[track_caller]
fn expect(c: &Stored, cases: &[(&str, bool)]) {
    for (criteria, want) in cases {
        assert_eq!(
            matches(&search_key(criteria), c),
            *want,
            "SEARCH {criteria}"
        );
    }
}

#[test]
fn flag_keys() {
    expect(
        &mixed(),
        &[
            ("ALL", true),
            ("ANSWERED", false),
            ("UNANSWERED", true),
            ("DELETED", false),
            ("UNDELETED", true),
            ("DRAFT", false),
            ("UNDRAFT", true),
            ("FLAGGED", true),
            ("UNFLAGGED", false),
            ("SEEN", true),
            ("UNSEEN", false),
            ("KEYWORD $Work", true),
            ("KEYWORD $work", true),
            ("KEYWORD $Other", false),
            ("UNKEYWORD $Work", false),
            ("UNKEYWORD $Other", true),
            ("RECENT", false),
            ("NEW", false),
            ("OLD", true),
        ],
    );
    let mut fresh = mixed();
    fresh.recent = true;
    fresh.flags.clear();
    expect(
        &fresh,
        &[
            ("RECENT", true),
            ("NEW", true),
            ("OLD", false),
            ("UNSEEN", true),
        ],
    );
    fresh.flags.push("\\Seen".into());
    expect(&fresh, &[("NEW", false), ("RECENT", true)]);
}

#[test]
fn size_date_and_set_keys() {
    expect(
        &mixed(),
        &[
            ("LARGER 1000", true),
            ("LARGER 1500", false),
            ("SMALLER 1501", true),
            ("SMALLER 1500", false),
            ("BEFORE 2-Dec-2026", true),
            ("BEFORE 1-Dec-2026", false),
            ("ON 1-Dec-2026", true),
            ("ON 30-Nov-2026", false),
            ("SINCE 1-Dec-2026", true),
            ("SINCE 2-Dec-2026", false),
            ("3", true),
            ("1:2", false),
            ("2:*", true),
            ("*", false),
            ("5:3", true),
            ("1,3,5", true),
            ("UID 30", true),
            ("UID 1:29", false),
            ("UID 31:*", false),
            ("UID 30:*", true),
            ("UID *", false),
            ("MODSEQ 7", true),
            ("MODSEQ 8", false),
        ],
    );
    let mut last = mixed();
    last.seq = 5;
    last.uid = 50;
    expect(&last, &[("*", true), ("UID *", true), ("4:*", true)]);
}

#[test]
fn header_keys_match_decoded_text() {
    expect(
        &mixed(),
        &[
            ("FROM jörg", true),
            ("FROM \"JÖRG MÜLLER\"", true),
            ("FROM joerg@example.de", true),
            ("FROM nobody", false),
            ("TO alice", true),
            ("TO bob@example.org", true),
            ("TO carol", false),
            ("CC carol", true),
            ("BCC carol", false),
            ("SUBJECT grüße", true),
            ("SUBJECT \"aus München\"", true),
            ("SUBJECT R3LD", false),
            ("HEADER Message-ID m1@example", true),
            ("HEADER message-id m2@", false),
            ("HEADER MIME-Version \"\"", true),
            ("HEADER X-Missing \"\"", false),
            ("SENTON 1-Dec-2026", true),
            ("SENTBEFORE 1-Dec-2026", false),
            ("SENTBEFORE 2-Dec-2026", true),
            ("SENTSINCE 1-Dec-2026", true),
            ("SENTSINCE 2-Dec-2026", false),
        ],
    );
}

#[test]
fn body_and_text_keys_match_decoded_parts() {
    expect(
        &mixed(),
        &[
            ("BODY hallöchen", true),
            ("BODY HALLÖCHEN", true),
            ("BODY Hall=C3", false),
            ("BODY world", true),
            ("BODY JVBER", false),
            ("BODY grüße", false),
            ("TEXT grüße", true),
            ("TEXT hallöchen", true),
            ("TEXT absent-word", false),
        ],
    );
    let fwd = Stored {
        message: Some(FORWARD.to_vec()),
        ..mixed()
    };
    expect(
        &fwd,
        &[
            ("BODY \"inner body line 2\"", true),
            ("BODY attached", true),
            ("FROM inner", false),
            ("SUBJECT fwd", true),
            // No Date: header: SENT* fall back to the internal date.
            ("SENTON 1-Dec-2026", true),
        ],
    );
}

#[test]
fn boolean_keys() {
    expect(
        &mixed(),
        &[
            ("NOT SEEN", false),
            ("NOT DRAFT", true),
            ("OR SEEN DRAFT", true),
            ("OR DRAFT DELETED", false),
            ("(SEEN FLAGGED)", true),
            ("(SEEN DRAFT)", false),
            ("SEEN FLAGGED", true),
            ("SEEN DRAFT", false),
            ("NOT (OR DRAFT (DELETED FROM jörg))", true),
            ("OR NOT SEEN (SUBJECT grüße LARGER 10)", true),
        ],
    );
}

#[test]
fn needs_message_only_for_content_keys() {
    for (criteria, want) in [
        ("SEEN", false),
        ("UID 1:*", false),
        ("1:3 LARGER 5 SINCE 1-Jan-2020", false),
        ("FROM x", true),
        ("OR SEEN BODY x", true),
        ("NOT SENTON 1-Jan-2020", true),
        ("(UNSEEN HEADER X-A b)", true),
        ("TEXT a", true),
    ] {
        assert_eq!(needs_message(&search_key(criteria)), want, "{criteria}");
    }
    // Without the message, content keys do not match.
    let c = Stored {
        message: None,
        ..mixed()
    };
    expect(
        &c,
        &[
            ("FROM jörg", false),
            ("BODY world", false),
            ("SEEN", true),
            ("SENTON 1-Dec-2026", false),
        ],
    );
}
