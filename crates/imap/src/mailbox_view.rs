//! [`MailboxView`]: a selected mailbox as one session sees it. The store is shared by every
//! session (and SMTP, POP3); the view keeps what this session has announced to its client —
//! the sequence-number ↔ UID map, the flags last sent, `\Recent`, the keywords — and turns
//! the store's changes into untagged EXPUNGE/EXISTS/RECENT/FETCH/FLAGS responses when the
//! rules of RFC 3501 §7.4.1 allow (never EXPUNGE during FETCH, STORE or SEARCH).

use std::collections::HashMap;

use ds_store::{MailStore, MessageMeta};
use imap_types::sequence::{SeqOrUid, Sequence, SequenceSet};
use tokio::sync::watch;

use crate::response;

/// One message as announced to the client.
#[derive(Debug, Clone)]
pub struct ViewMessage {
    pub uid: u32,
    pub flags: Vec<String>,
    pub modseq: u64,
    /// Recent for this session (it claimed the message).
    pub recent: bool,
    /// Gone from the store, EXPUNGE not sent yet: the sequence number stays taken.
    pub expunged: bool,
}

/// A selected mailbox.
#[derive(Debug)]
pub struct MailboxView {
    pub account: String,
    pub name: String,
    pub id: u64,
    pub uidvalidity: u32,
    /// EXAMINE: no flag changes, no `\Recent` claims, no EXPUNGE.
    pub read_only: bool,
    /// Sequence number `n` is `messages[n - 1]`.
    pub messages: Vec<ViewMessage>,
    /// Keywords announced in FLAGS.
    pub keywords: Vec<String>,
    pub highest_modseq: u64,
    watch: watch::Receiver<u64>,
    /// Set when the mailbox disappeared (deleted or renamed by another session).
    pub gone: bool,
}

/// System flags every mailbox allows.
pub const SYSTEM_FLAGS: [&str; 5] = ["\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft"];

impl MailboxView {
    /// Open `name` of `account`: claims `\Recent` unless read-only. `NotFound` if missing.
    pub fn open(
        mail: &MailStore,
        account: &str,
        name: &str,
        read_only: bool,
    ) -> ds_store::Result<MailboxView> {
        let info = mail
            .mailbox(account, name)?
            .ok_or_else(|| ds_store::Error::NotFound(format!("no mailbox {name:?}")))?;
        let watch = mail.watch_mailbox(info.id);
        let metas = mail.messages(account, &info.name)?;
        let max_uid = metas.last().map_or(0, |m| m.uid);
        let mark = if read_only {
            u32::MAX
        } else {
            mail.claim_recent(info.id, max_uid)?
        };
        let mut keywords = Vec::new();
        let messages = metas
            .iter()
            .map(|m| {
                add_keywords(&mut keywords, &m.flags);
                ViewMessage {
                    uid: m.uid,
                    flags: m.flags.clone(),
                    modseq: m.modseq,
                    recent: m.uid > mark,
                    expunged: false,
                }
            })
            .collect();
        keywords.sort();
        Ok(MailboxView {
            account: account.to_string(),
            name: info.name,
            id: info.id,
            uidvalidity: info.uidvalidity,
            read_only,
            messages,
            keywords,
            highest_modseq: info.highest_modseq,
            watch,
            gone: false,
        })
    }

    /// Messages the client knows about (EXISTS).
    pub fn exists(&self) -> u32 {
        self.messages.len() as u32
    }

    pub fn recent(&self) -> u32 {
        self.messages.iter().filter(|m| m.recent).count() as u32
    }

    pub fn max_uid(&self) -> u32 {
        self.messages.last().map_or(0, |m| m.uid)
    }

    /// `(\Answered ... $Label)` for FLAGS.
    pub fn flags_response(&self) -> Vec<u8> {
        let mut all: Vec<String> = SYSTEM_FLAGS.iter().map(|s| s.to_string()).collect();
        all.extend(self.keywords.iter().cloned());
        let mut out = b"* FLAGS ".to_vec();
        response::flag_list(&mut out, &all, false);
        out.extend_from_slice(b"\r\n");
        if self.read_only {
            out.extend_from_slice(b"* OK [PERMANENTFLAGS ()] Read-only mailbox\r\n");
        } else {
            all.push("\\*".into());
            out.extend_from_slice(b"* OK [PERMANENTFLAGS ");
            response::flag_list(&mut out, &all, false);
            out.extend_from_slice(b"] Flags permitted\r\n");
        }
        out
    }

    /// The watch that fires on changes of the mailbox by anyone.
    pub fn watch_mut(&mut self) -> &mut watch::Receiver<u64> {
        &mut self.watch
    }

    /// Whether the store changed since the last [`MailboxView::sync`].
    pub fn has_changed(&self) -> bool {
        self.watch.has_changed().unwrap_or(false)
    }

    /// Indices into `messages` for a sequence set (`uid`: a UID set, unknown UIDs skipped);
    /// `None` for a sequence number beyond EXISTS (a BAD).
    pub fn resolve(&self, set: &SequenceSet, uid: bool) -> Option<Vec<usize>> {
        if uid {
            let max = self.max_uid();
            let out: Vec<usize> = self
                .messages
                .iter()
                .enumerate()
                .filter(|(_, m)| crate::msg::search::in_set(set, m.uid, max))
                .map(|(i, _)| i)
                .collect();
            return Some(out);
        }
        let max = self.exists();
        let mut out = Vec::new();
        let v = |s: &SeqOrUid| match s {
            SeqOrUid::Value(v) => v.get(),
            SeqOrUid::Asterisk => max,
        };
        for s in set.0.as_ref() {
            let (lo, hi) = match s {
                Sequence::Single(a) => (v(a), v(a)),
                Sequence::Range(a, b) => (v(a).min(v(b)), v(a).max(v(b))),
            };
            if hi > max || lo == 0 {
                return None;
            }
            out.extend((lo as usize - 1)..(hi as usize));
        }
        out.sort_unstable();
        out.dedup();
        Some(out)
    }

    /// Record flags this session itself set (so [`MailboxView::sync`] does not repeat them).
    pub fn note_flags(&mut self, meta: &MessageMeta) {
        if let Some(m) = self.messages.iter_mut().find(|m| m.uid == meta.uid) {
            m.flags = meta.flags.clone();
            m.modseq = meta.modseq;
        }
        let mut kw = std::mem::take(&mut self.keywords);
        add_keywords(&mut kw, &meta.flags);
        self.keywords = kw;
    }

    /// Bring the view up to date with the store and return the untagged responses that tell
    /// the client. `allow_expunge`: false during FETCH, STORE and SEARCH (by sequence number):
    /// expunged messages then keep their numbers until a later command. `condstore`: add
    /// MODSEQ to flag updates.
    pub fn sync(
        &mut self,
        mail: &MailStore,
        allow_expunge: bool,
        condstore: bool,
    ) -> ds_store::Result<Vec<u8>> {
        self.watch.borrow_and_update();
        let same = mail
            .mailbox(&self.account, &self.name)?
            .is_some_and(|i| i.id == self.id);
        // Deleted, or renamed (a new mailbox may have taken the name): every message is gone.
        let metas = if same {
            match mail.messages(&self.account, &self.name) {
                Ok(m) => m,
                Err(ds_store::Error::NotFound(_)) => Vec::new(),
                Err(e) => return Err(e),
            }
        } else {
            self.gone = true;
            Vec::new()
        };
        let current: HashMap<u32, &MessageMeta> = metas.iter().map(|m| (m.uid, m)).collect();
        let mut out = Vec::new();

        // Keywords first: FETCH FLAGS below may use them.
        let before = self.keywords.len();
        for m in &metas {
            add_keywords(&mut self.keywords, &m.flags);
        }
        if self.keywords.len() != before {
            self.keywords.sort();
            out.extend(self.flags_response());
        }

        let mut flag_changes: Vec<u32> = Vec::new();
        for m in &mut self.messages {
            if m.expunged {
                continue;
            }
            match current.get(&m.uid) {
                None => m.expunged = true,
                Some(meta) if meta.modseq > m.modseq || meta.flags != m.flags => {
                    let changed = meta.flags != m.flags;
                    m.flags = meta.flags.clone();
                    m.modseq = meta.modseq;
                    if changed || condstore {
                        flag_changes.push(m.uid);
                    }
                }
                Some(_) => {}
            }
        }

        let mut count_changed = false;
        if allow_expunge {
            for i in (0..self.messages.len()).rev() {
                if self.messages[i].expunged {
                    out.extend_from_slice(format!("* {} EXPUNGE\r\n", i + 1).as_bytes());
                    self.messages.remove(i);
                }
            }
        }

        let max_uid = self.max_uid();
        let new: Vec<&MessageMeta> = metas.iter().filter(|m| m.uid > max_uid).collect();
        if !new.is_empty() {
            let top = new.last().map_or(0, |m| m.uid);
            let mark = if self.read_only {
                u32::MAX
            } else {
                mail.claim_recent(self.id, top)?
            };
            for m in new {
                self.messages.push(ViewMessage {
                    uid: m.uid,
                    flags: m.flags.clone(),
                    modseq: m.modseq,
                    recent: m.uid > mark,
                    expunged: false,
                });
            }
            count_changed = true;
        }
        if count_changed {
            out.extend_from_slice(format!("* {} EXISTS\r\n", self.exists()).as_bytes());
            out.extend_from_slice(format!("* {} RECENT\r\n", self.recent()).as_bytes());
        }
        for uid in flag_changes {
            let Some(i) = self.messages.iter().position(|m| m.uid == uid) else {
                continue;
            };
            let m = &self.messages[i];
            out.extend_from_slice(format!("* {} FETCH (UID {uid} FLAGS ", i + 1).as_bytes());
            response::flag_list(&mut out, &m.flags, m.recent);
            if condstore {
                out.extend_from_slice(format!(" MODSEQ ({})", m.modseq).as_bytes());
            }
            out.extend_from_slice(b")\r\n");
        }
        if let Some(top) = metas.iter().map(|m| m.modseq).max() {
            self.highest_modseq = self.highest_modseq.max(top);
        }
        if let Ok(Some(info)) = mail.mailbox(&self.account, &self.name)
            && info.id == self.id
        {
            self.highest_modseq = self.highest_modseq.max(info.highest_modseq);
        }
        Ok(out)
    }
}

fn add_keywords(keywords: &mut Vec<String>, flags: &[String]) {
    for f in flags {
        if !f.starts_with('\\') && !keywords.iter().any(|k| k.eq_ignore_ascii_case(f)) {
            keywords.push(f.clone());
        }
    }
}
