//! STORE and UID STORE: FLAGS, +FLAGS, -FLAGS (.SILENT), UNCHANGEDSINCE (CONDSTORE).

use ds_store::mailbox::FlagOp;
use imap_types::command::StoreModifier;
use imap_types::flag::{Flag, StoreResponse, StoreType};
use imap_types::sequence::SequenceSet;

use crate::Result;
use crate::response::{self, Reply};
use crate::session::{Session, State};

/// `1:3,5` from sorted numbers.
pub(crate) fn compress(nums: &[u32]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < nums.len() {
        let start = nums[i];
        let mut end = start;
        while i + 1 < nums.len() && nums[i + 1] == end + 1 {
            i += 1;
            end = nums[i];
        }
        parts.push(if start == end {
            start.to_string()
        } else {
            format!("{start}:{end}")
        });
        i += 1;
    }
    parts.join(",")
}

impl Session {
    pub(crate) async fn store(
        &mut self,
        set: &SequenceSet,
        kind: StoreType,
        response_kind: StoreResponse,
        flags: Vec<Flag<'static>>,
        uid: bool,
        modifiers: Vec<StoreModifier>,
    ) -> Result<Reply> {
        let unchanged_since = modifiers
            .iter()
            .map(|StoreModifier::UnchangedSince(v)| *v)
            .next();
        if unchanged_since.is_some() {
            self.condstore = true;
        }
        let condstore = self.condstore;
        let State::Selected(view) = &self.state else {
            return Ok(Reply::bad("No mailbox selected"));
        };
        if view.read_only {
            return Ok(Reply::no("Mailbox is read-only").code("READ-ONLY"));
        }
        let Some(indices) = view.resolve(set, uid) else {
            return Ok(Reply::bad("Invalid message sequence number"));
        };
        let uids: Vec<u32> = indices
            .iter()
            .filter(|&&i| !view.messages[i].expunged)
            .map(|&i| view.messages[i].uid)
            .collect();
        let expunged_asked = indices.iter().any(|&i| view.messages[i].expunged);
        let (account, name) = (view.account.clone(), view.name.clone());
        let flags: Vec<String> = flags.iter().map(|f| f.to_string()).collect();
        let op = match kind {
            StoreType::Replace => FlagOp::Replace,
            StoreType::Add => FlagOp::Add,
            StoreType::Remove => FlagOp::Remove,
        };
        let mail = self.imap.mail.clone();
        let result = match unchanged_since {
            Some(since) => {
                mail.store_flags_unchanged_since(&account, &name, &uids, op, &flags, since)
            }
            None => mail
                .store_flags(&account, &name, &uids, op, &flags)
                .map(|m| (m, Vec::new())),
        };
        let (metas, refused) = match result {
            Ok(r) => r,
            Err(e) => return Ok(super::store_error(&e)),
        };
        let mut out = Vec::new();
        let State::Selected(view) = &mut self.state else {
            return Ok(Reply::bad("No mailbox selected"));
        };
        for meta in &metas {
            view.note_flags(meta);
            if response_kind == StoreResponse::Silent && unchanged_since.is_none() {
                continue;
            }
            let Some(i) = view.messages.iter().position(|m| m.uid == meta.uid) else {
                continue;
            };
            out.extend_from_slice(format!("* {} FETCH (", i + 1).as_bytes());
            if uid {
                out.extend_from_slice(format!("UID {} ", meta.uid).as_bytes());
            }
            out.extend_from_slice(b"FLAGS ");
            response::flag_list(&mut out, &meta.flags, view.messages[i].recent);
            if condstore {
                out.extend_from_slice(format!(" MODSEQ ({})", meta.modseq).as_bytes());
            }
            out.extend_from_slice(b")\r\n");
        }
        let refused_ids: Vec<u32> = if uid {
            refused
        } else {
            refused
                .iter()
                .filter_map(|u| view.messages.iter().position(|m| m.uid == *u))
                .map(|i| i as u32 + 1)
                .collect()
        };
        self.send(&out).await?;
        if !refused_ids.is_empty() {
            let mut ids = refused_ids;
            ids.sort_unstable();
            return Ok(
                Reply::ok("Conditional STORE failed").code(format!("MODIFIED {}", compress(&ids)))
            );
        }
        if expunged_asked {
            return Ok(Reply::no("Some messages were expunged").code("EXPUNGEISSUED"));
        }
        Ok(Reply::ok("STORE completed"))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn compress_ranges() {
        assert_eq!(super::compress(&[1, 2, 3, 5, 7, 8]), "1:3,5,7:8");
        assert_eq!(super::compress(&[]), "");
    }
}
