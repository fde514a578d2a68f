//! What many IMAP sessions on one mailbox need from the store (DESIGN.md §7):
//!
//! - change notification: a `tokio::sync::watch` per mailbox id carrying its `highest_modseq`,
//!   sent after every committed change by whichever writer made it (SMTP delivery, APPEND,
//!   COPY/MOVE, STORE, EXPUNGE, POP3), so IDLE wakes within moments;
//! - an expunge log `(mailbox id, modseq, uid)` for "what vanished since modseq";
//! - the `\Recent` high-water mark per mailbox, claimed atomically by one session;
//! - subscriptions kept by name, so they outlive a deleted mailbox (RFC 3501 §6.3.6);
//! - keywords in use, for `FLAGS`/`PERMANENTFLAGS`;
//! - `STORE ... UNCHANGEDSINCE` (RFC 7162) in one transaction.
//!
//! Trees: `mail_expunged` (`id ++ modseq ++ uid` → empty), `mail_recent` (`id` → last UID
//! given out as recent, u32 BE), `mail_subscriptions` (`account \0 name` → empty).

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use tokio::sync::watch;

use super::{
    FlagOp, MailStore, MessageMeta, abort, account_prefix, canonical_name, has_flag, is_seen,
    mailbox_key, normalize_flags, not_found,
};
use crate::{Result, Store};

const EXPUNGED: &str = "mail_expunged";
const RECENT: &str = "mail_recent";
const SUBSCRIPTIONS: &str = "mail_subscriptions";

/// The per-store synchronisation state (shared by every clone of a [`MailStore`]).
pub(super) struct SyncState {
    watchers: Mutex<HashMap<u64, watch::Sender<u64>>>,
    expunged: sled::Tree,
    recent: sled::Tree,
    subscriptions: sled::Tree,
}

impl SyncState {
    pub(super) fn new(store: &Store) -> Result<SyncState> {
        Ok(SyncState {
            watchers: Mutex::new(HashMap::new()),
            expunged: store.tree(EXPUNGED)?,
            recent: store.tree(RECENT)?,
            subscriptions: store.tree(SUBSCRIPTIONS)?,
        })
    }
}

fn expunge_key(mailbox: u64, modseq: u64, uid: u32) -> [u8; 20] {
    let mut k = [0u8; 20];
    k[..8].copy_from_slice(&mailbox.to_be_bytes());
    k[8..16].copy_from_slice(&modseq.to_be_bytes());
    k[16..].copy_from_slice(&uid.to_be_bytes());
    k
}

impl MailStore {
    /// A receiver that sees every committed change of mailbox `id` (the value is the mailbox's
    /// `highest_modseq` after the change). Cheap; the sender is dropped when nobody watches.
    pub fn watch_mailbox(&self, id: u64) -> watch::Receiver<u64> {
        let mut map = self
            .sync
            .watchers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        map.retain(|_, tx| tx.receiver_count() > 0);
        map.entry(id)
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    /// The hook run after a committed change to `account`'s mailbox `name`: wakes its watchers.
    pub(super) fn changed(&self, account: &str, name: &str) {
        let Ok(Some(info)) = self.read_mailbox(account, &canonical_name(name)) else {
            return;
        };
        self.notify(info.id, info.highest_modseq);
    }

    pub(super) fn notify(&self, id: u64, modseq: u64) {
        let map = self
            .sync
            .watchers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(tx) = map.get(&id) {
            tx.send_replace(modseq);
        }
    }

    /// The hook run after messages were expunged from a mailbox: logs them and wakes watchers.
    pub(super) fn expunged(&self, account: &str, name: &str, uids: &[u32]) {
        let Ok(Some(info)) = self.read_mailbox(account, &canonical_name(name)) else {
            return;
        };
        for &uid in uids {
            let key = expunge_key(info.id, info.highest_modseq, uid);
            if let Err(e) = self.sync.expunged.insert(&key[..], &[][..]) {
                tracing::warn!(error = %e, "expunge log write failed");
            }
        }
        self.notify(info.id, info.highest_modseq);
    }

    /// UIDs expunged from mailbox `id` with a mod-sequence above `modseq`, ascending.
    pub fn expunged_since(&self, id: u64, modseq: u64) -> Result<Vec<u32>> {
        let start = expunge_key(id, modseq.saturating_add(1), 0);
        let end = expunge_key(id, u64::MAX, u32::MAX);
        let mut uids = Vec::new();
        for kv in self.sync.expunged.range(start..=end) {
            let (k, _) = kv?;
            if let Ok(b) = <[u8; 4]>::try_from(&k[16..20]) {
                uids.push(u32::from_be_bytes(b));
            }
        }
        uids.sort_unstable();
        uids.dedup();
        Ok(uids)
    }

    /// Claims `\Recent` for the messages of mailbox `id` up to UID `up_to` (RFC 3501 §2.3.2:
    /// exactly one session sees a message as recent). Returns the previous mark: the caller's
    /// recent messages are those with `mark < uid <= up_to`. Atomic across sessions.
    pub fn claim_recent(&self, id: u64, up_to: u32) -> Result<u32> {
        let old = self.sync.recent.fetch_and_update(id.to_be_bytes(), |old| {
            let last = old
                .and_then(|v| <[u8; 4]>::try_from(v).ok())
                .map_or(0, u32::from_be_bytes);
            Some(last.max(up_to).to_be_bytes().to_vec())
        })?;
        Ok(old
            .and_then(|v| <[u8; 4]>::try_from(v.as_ref()).ok())
            .map_or(0, u32::from_be_bytes))
    }

    /// How many messages of mailbox `id` nobody has claimed as recent yet (STATUS RECENT),
    /// given its UIDs.
    pub fn unclaimed_recent(&self, id: u64, uids: impl Iterator<Item = u32>) -> Result<u32> {
        let mark = self
            .sync
            .recent
            .get(id.to_be_bytes())?
            .and_then(|v| <[u8; 4]>::try_from(v.as_ref()).ok())
            .map_or(0, u32::from_be_bytes);
        Ok(uids.filter(|&u| u > mark).count() as u32)
    }

    /// Subscribes to (or unsubscribes from) a name, whether or not the mailbox exists; the
    /// subscription outlives the mailbox (IMAP `SUBSCRIBE`/`UNSUBSCRIBE`).
    pub fn set_subscription(&self, account: &str, name: &str, on: bool) -> Result<()> {
        let name = canonical_name(name);
        let key = mailbox_key(account, &name);
        if on {
            self.sync.subscriptions.insert(key, &[][..])?;
        } else {
            self.sync.subscriptions.remove(key)?;
        }
        match self.subscribe(account, &name, on) {
            Ok(()) | Err(crate::Error::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The names the account is subscribed to (existing or not), sorted, INBOX first.
    pub fn subscriptions(&self, account: &str) -> Result<Vec<String>> {
        let prefix = account_prefix(account);
        let mut names: Vec<String> = Vec::new();
        for kv in self.sync.subscriptions.scan_prefix(&prefix) {
            let (k, _) = kv?;
            names.push(String::from_utf8_lossy(&k[prefix.len()..]).into_owned());
        }
        for m in self.list_mailboxes(account)? {
            if m.subscribed {
                names.push(m.name);
            }
        }
        names.sort_by(|a, b| (a != super::INBOX, a).cmp(&(b != super::INBOX, b)));
        names.dedup();
        Ok(names)
    }

    /// The keywords (non-system flags) used by any message of the mailbox, sorted.
    pub fn keywords(&self, account: &str, mailbox: &str) -> Result<Vec<String>> {
        let mut out: Vec<String> = Vec::new();
        for m in self.messages(account, mailbox)? {
            for f in m.flags {
                if !f.starts_with('\\') && !has_flag(&out, &f) {
                    out.push(f);
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// [`MailStore::store_flags`] with CONDSTORE's `UNCHANGEDSINCE`: a message whose modseq is
    /// above `unchanged_since` is left alone and its UID returned in the second list. Returns
    /// the metadata of every message found and not refused (changed or not), in UID order.
    pub fn store_flags_unchanged_since(
        &self,
        account: &str,
        mailbox: &str,
        uids: &[u32],
        op: FlagOp,
        flags: &[String],
        unchanged_since: u64,
    ) -> Result<(Vec<MessageMeta>, Vec<u32>)> {
        let name = canonical_name(mailbox);
        let key = mailbox_key(account, &name);
        let flags = normalize_flags(flags);
        let mut uids = uids.to_vec();
        uids.sort_unstable();
        uids.dedup();
        let result = self.transact(|tx| {
            super::transfer::check_open(tx.mailboxes, account)?;
            let mut info = tx
                .mailbox(&key)?
                .ok_or_else(|| abort(not_found(account, &name)))?;
            let modseq = info.highest_modseq + 1;
            let mut changed = false;
            let mut out = Vec::with_capacity(uids.len());
            let mut refused = Vec::new();
            for &uid in &uids {
                let Some(mut meta) = tx.message(info.id, uid)? else {
                    continue;
                };
                if meta.modseq > unchanged_since {
                    refused.push(uid);
                    continue;
                }
                let new_flags = match op {
                    FlagOp::Replace => flags.clone(),
                    FlagOp::Add => {
                        let mut all = meta.flags.clone();
                        all.extend(flags.iter().cloned());
                        normalize_flags(&all)
                    }
                    FlagOp::Remove => meta
                        .flags
                        .iter()
                        .filter(|f| !has_flag(&flags, f))
                        .cloned()
                        .collect(),
                };
                let same = new_flags.len() == meta.flags.len()
                    && new_flags.iter().all(|f| has_flag(&meta.flags, f));
                if !same {
                    match (is_seen(&meta.flags), is_seen(&new_flags)) {
                        (false, true) => info.unseen = info.unseen.saturating_sub(1),
                        (true, false) => info.unseen += 1,
                        _ => {}
                    }
                    meta.flags = new_flags;
                    meta.modseq = modseq;
                    tx.put_message(info.id, &meta)?;
                    changed = true;
                }
                out.push(meta);
            }
            if changed {
                info.highest_modseq = modseq;
                tx.put_mailbox(&key, &info)?;
            }
            Ok((out, refused))
        });
        if result.is_ok() {
            self.changed(account, &name);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::super::INBOX;
    use super::*;

    const A: &str = "info@company.com";

    fn mail() -> (Store, MailStore) {
        let store = Store::temporary().unwrap();
        let mail = MailStore::new(&store).unwrap();
        mail.ensure_account(A).unwrap();
        (store, mail)
    }

    #[test]
    fn every_writer_wakes_watchers() {
        let (_store, mail) = mail();
        let id = mail.mailbox(A, INBOX).unwrap().unwrap().id;
        let mut rx = mail.watch_mailbox(id);
        assert!(!rx.has_changed().unwrap());
        mail.deliver(A, b"x").unwrap();
        assert!(rx.has_changed().unwrap());
        let seen = *rx.borrow_and_update();
        mail.store_flags(A, INBOX, &[1], FlagOp::Add, &["\\Seen".into()])
            .unwrap();
        assert!(rx.has_changed().unwrap());
        assert!(*rx.borrow_and_update() > seen);
        mail.copy(A, INBOX, &[1], "Trash").unwrap();
        assert!(!rx.has_changed().unwrap());
        mail.expunge(A, INBOX, &[1]).unwrap();
        assert!(rx.has_changed().unwrap());
    }

    #[test]
    fn expunge_log_and_recent_claims() {
        let (_store, mail) = mail();
        for _ in 0..3 {
            mail.deliver(A, b"m").unwrap();
        }
        let info = mail.mailbox(A, INBOX).unwrap().unwrap();
        mail.expunge(A, INBOX, &[2]).unwrap();
        mail.move_messages(A, INBOX, &[3], "Junk").unwrap();
        assert_eq!(
            mail.expunged_since(info.id, info.highest_modseq).unwrap(),
            [2, 3]
        );
        assert_eq!(mail.claim_recent(info.id, 3).unwrap(), 0);
        assert_eq!(mail.claim_recent(info.id, 3).unwrap(), 3);
        assert_eq!(mail.claim_recent(info.id, 2).unwrap(), 3);
        assert_eq!(
            mail.unclaimed_recent(info.id, [1, 3, 4].into_iter())
                .unwrap(),
            1
        );
    }

    #[test]
    fn subscriptions_outlive_mailboxes() {
        let (_store, mail) = mail();
        mail.create_mailbox(A, "Lists", None).unwrap();
        mail.set_subscription(A, "Lists", true).unwrap();
        mail.set_subscription(A, "Future", true).unwrap();
        mail.delete_mailbox(A, "Lists").unwrap();
        let subs = mail.subscriptions(A).unwrap();
        assert!(subs.contains(&"Lists".to_string()));
        assert!(subs.contains(&"Future".to_string()));
        assert_eq!(subs[0], INBOX);
        mail.set_subscription(A, "Future", false).unwrap();
        assert!(
            !mail
                .subscriptions(A)
                .unwrap()
                .contains(&"Future".to_string())
        );
    }

    #[test]
    fn unchanged_since_refuses_newer_messages() {
        let (_store, mail) = mail();
        mail.deliver(A, b"a").unwrap();
        mail.deliver(A, b"b").unwrap();
        let m1 = mail.message(A, INBOX, 1).unwrap().unwrap();
        mail.store_flags(A, INBOX, &[2], FlagOp::Add, &["$Work".into()])
            .unwrap();
        let (done, refused) = mail
            .store_flags_unchanged_since(
                A,
                INBOX,
                &[1, 2],
                FlagOp::Add,
                &["\\Flagged".into()],
                m1.modseq,
            )
            .unwrap();
        assert_eq!(refused, [2]);
        assert_eq!(done.len(), 1);
        assert!(done[0].has_flag("\\Flagged"));
        assert_eq!(mail.keywords(A, INBOX).unwrap(), ["$Work"]);
    }
}
