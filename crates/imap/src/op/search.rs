//! SEARCH and UID SEARCH (CHARSET UTF-8/US-ASCII, every RFC 3501 key, MODSEQ).

use imap_types::core::{Charset, Vec1};
use imap_types::search::SearchKey;

use crate::Result;
use crate::msg::search::{self, Candidate};
use crate::response::Reply;
use crate::session::{Session, State};

struct Entry<'a> {
    seq: u32,
    uid: u32,
    flags: &'a [String],
    internal_date: i64,
    size: u64,
    message: Option<Vec<u8>>,
    recent: bool,
    modseq: u64,
    max_seq: u32,
    max_uid: u32,
}

impl Candidate for Entry<'_> {
    fn seq(&self) -> u32 {
        self.seq
    }
    fn uid(&self) -> u32 {
        self.uid
    }
    fn flags(&self) -> &[String] {
        self.flags
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
        self.max_seq
    }
    fn max_uid(&self) -> u32 {
        self.max_uid
    }
}

fn has_modseq(key: &SearchKey<'_>) -> bool {
    match key {
        SearchKey::ModSequence { .. } => true,
        SearchKey::And(keys) => keys.as_ref().iter().any(has_modseq),
        SearchKey::Or(a, b) => has_modseq(a) || has_modseq(b),
        SearchKey::Not(k) => has_modseq(k),
        _ => false,
    }
}

impl Session {
    pub(crate) async fn search(
        &mut self,
        charset: Option<Charset<'static>>,
        criteria: Vec1<SearchKey<'static>>,
        uid: bool,
    ) -> Result<Reply> {
        if let Some(c) = &charset {
            let c: &str = c.as_ref();
            if !c.eq_ignore_ascii_case("UTF-8") && !c.eq_ignore_ascii_case("US-ASCII") {
                return Ok(Reply::no("Unsupported charset").code("BADCHARSET (UTF-8 US-ASCII)"));
            }
        }
        let key = SearchKey::And(criteria);
        if has_modseq(&key) {
            self.condstore = true;
        }
        let State::Selected(view) = &self.state else {
            return Ok(Reply::bad("No mailbox selected"));
        };
        let uids: Vec<u32> = view.messages.iter().map(|m| m.uid).collect();
        let recent: Vec<bool> = view.messages.iter().map(|m| m.recent).collect();
        let max_seq = view.exists();
        let max_uid = view.max_uid();
        let metas = match self.current_metas(&uids) {
            Ok(m) => m,
            Err(e) => return Ok(super::store_error(&e)),
        };
        let needs_message = search::needs_message(&key);
        let mut hits = Vec::new();
        let mut top_modseq = 0;
        for (i, uid_i) in uids.iter().enumerate() {
            let Some(meta) = metas.get(uid_i) else {
                continue;
            };
            let message = if needs_message {
                match self.message_bytes(meta) {
                    Ok(m) => m,
                    Err(e) => return Ok(super::store_error(&e)),
                }
            } else {
                None
            };
            let entry = Entry {
                seq: i as u32 + 1,
                uid: meta.uid,
                flags: &meta.flags,
                internal_date: meta.internal_date,
                size: meta.size,
                message,
                recent: recent[i],
                modseq: meta.modseq,
                max_seq,
                max_uid,
            };
            if search::matches(&key, &entry) {
                hits.push(if uid { meta.uid } else { i as u32 + 1 });
                top_modseq = top_modseq.max(meta.modseq);
            }
        }
        let mut line = String::from("* SEARCH");
        for h in &hits {
            line.push(' ');
            line.push_str(&h.to_string());
        }
        if has_modseq(&key) && !hits.is_empty() {
            line.push_str(&format!(" (MODSEQ {top_modseq})"));
        }
        line.push_str("\r\n");
        self.send(line.as_bytes()).await?;
        Ok(Reply::ok("SEARCH completed"))
    }
}
