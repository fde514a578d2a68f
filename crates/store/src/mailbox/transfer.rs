//! Moving an account's mailboxes to another node (DESIGN.md §11): the import side keeps the
//! source's UIDs and UIDVALIDITY and is idempotent (a message is keyed by mailbox and UID, so
//! a re-run skips what is there); the export side freezes an account so that no delivery or
//! APPEND commits while the last changes are copied.
//!
//! The freeze marker lives in the mailbox tree under `\x01frozen\0account` (no account name
//! starts with `\x01`, so it never shows up in an account's prefix scan) and is read inside
//! the delivery transactions, so a delivery either committed before the freeze (and the
//! final copy pass sees it) or is refused with [`crate::Error::Frozen`].

use std::collections::HashSet;

use super::{
    AccountRecord, MailStore, MailboxInfo, MessageMeta, TxResult, abort, canonical_name, encode,
    is_seen, mailbox_key, new_mailbox, normalize_flags, not_found, sizes, validate_name,
};
use crate::{Error, Result, StagedBody, unix_now};

const FROZEN_PREFIX: &[u8] = b"\x01frozen\0";

pub(super) fn frozen_key(account: &str) -> Vec<u8> {
    let mut k = FROZEN_PREFIX.to_vec();
    k.extend_from_slice(account.as_bytes());
    k
}

/// A mailbox as the source node describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailboxImport {
    pub name: String,
    pub uidvalidity: u32,
    pub uidnext: u32,
    pub special_use: Option<String>,
    pub subscribed: bool,
}

/// A message as the source node describes it (its body comes separately).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageImport {
    pub uid: u32,
    pub flags: Vec<String>,
    /// Unix seconds.
    pub internal_date: i64,
    /// The message's own first lines (ending with CRLF), or empty.
    pub prefix: String,
}

impl MailStore {
    /// Stops every delivery, APPEND, COPY and MOVE into `account`'s mailboxes (`on`), or
    /// lets them go on again. Those refused fail with [`Error::Frozen`] (a temporary error).
    pub fn freeze(&self, account: &str, on: bool) -> Result<()> {
        let key = frozen_key(account);
        if on {
            self.mailboxes.insert(key, &[][..])?;
        } else {
            self.mailboxes.remove(key)?;
        }
        Ok(())
    }

    /// Whether `account` is frozen by [`MailStore::freeze`].
    pub fn is_frozen(&self, account: &str) -> Result<bool> {
        Ok(self.mailboxes.contains_key(frozen_key(account))?)
    }

    /// Creates a mailbox with the source's UIDVALIDITY and UID counter, or checks that the
    /// one already here (an earlier, interrupted run) has the same UIDVALIDITY; raises its
    /// UID counter and sets its subscription. `Conflict` when the name exists here with
    /// another UIDVALIDITY.
    pub fn import_mailbox(&self, account: &str, m: &MailboxImport) -> Result<MailboxInfo> {
        // The account is arriving (a move, under the creation guard's reservation): a
        // tombstone left by an earlier move away or deletion must not refuse it.
        self.deleted.remove(account)?;
        let name = canonical_name(&m.name);
        validate_name(&name)?;
        let key = mailbox_key(account, &name);
        let fresh = new_mailbox(
            self.store.next_id()?,
            &name,
            m.uidvalidity,
            m.special_use.as_deref(),
            m.subscribed,
        );
        let info = self.transact(|tx| {
            let mut info = match tx.mailbox(&key)? {
                Some(info) if info.uidvalidity != m.uidvalidity => {
                    return Err(abort(Error::Conflict(format!(
                        "mailbox {name:?} exists here with another UIDVALIDITY"
                    ))));
                }
                Some(info) => info,
                None => fresh.clone(),
            };
            info.uidnext = info.uidnext.max(m.uidnext);
            info.subscribed = m.subscribed;
            info.special_use = m.special_use.clone();
            tx.put_mailbox(&key, &info)?;
            Ok(info)
        })?;
        // A UIDVALIDITY handed out here later must not repeat the imported one.
        self.counters
            .update_and_fetch(super::UIDVALIDITY_KEY, |old| {
                let last = old
                    .and_then(|v| v.try_into().ok().map(u32::from_be_bytes))
                    .unwrap_or(0);
                Some(last.max(m.uidvalidity).to_be_bytes().to_vec())
            })?;
        Ok(info)
    }

    /// Drops a partly imported mailbox (INBOX too) with its messages: the source's mailbox
    /// of that name was created again (another UIDVALIDITY) since the copy began.
    pub fn discard_import(&self, account: &str, name: &str) -> Result<()> {
        self.remove_mailbox(account, &canonical_name(name))
    }

    /// The UIDs present in a mailbox (empty when it does not exist).
    pub fn uids(&self, account: &str, mailbox: &str) -> Result<Vec<u32>> {
        match self.mailbox(account, mailbox)? {
            Some(info) => Ok(self.scan_messages(info.id)?.iter().map(|m| m.uid).collect()),
            None => Ok(Vec::new()),
        }
    }

    /// Stores a message under the source's UID; `false` (and nothing written) if the mailbox
    /// already has that UID, so a re-run of a move skips it. `NotFound` if the mailbox does
    /// not exist.
    pub fn import_message(
        &self,
        account: &str,
        mailbox: &str,
        message: &MessageImport,
        body: &StagedBody,
    ) -> Result<bool> {
        let MessageImport {
            uid,
            ref flags,
            internal_date,
            ref prefix,
        } = *message;
        let prefix = prefix.as_str();
        super::check_prefix(prefix)?;
        if uid == 0 {
            return Err(Error::Conflict("UID 0".into()));
        }
        let name = canonical_name(mailbox);
        let key = mailbox_key(account, &name);
        let flags = normalize_flags(flags);
        let body_ref = body.body();
        let (size, pop3_size) = sizes(prefix, &body_ref);
        let stored = self.transact(|tx| {
            let mut info = tx
                .mailbox(&key)?
                .ok_or_else(|| abort(not_found(account, &name)))?;
            if tx.message(info.id, uid)?.is_some() {
                return Ok(false);
            }
            info.highest_modseq += 1;
            let meta = MessageMeta {
                uid,
                flags: flags.clone(),
                internal_date,
                size,
                modseq: info.highest_modseq,
                blob: body_ref.id,
                prefix: prefix.to_string(),
                pop3_size,
            };
            tx.body.add_staged(body, 1)?;
            info.uidnext = info.uidnext.max(uid.saturating_add(1));
            info.messages += 1;
            if !is_seen(&meta.flags) {
                info.unseen += 1;
            }
            tx.put_message(info.id, &meta)?;
            tx.put_mailbox(&key, &info)?;
            Ok(true)
        })?;
        if stored {
            body.mark_committed();
            self.changed(account, &name);
        }
        Ok(stored)
    }

    /// Makes the UIDs `window` of a mailbox match the source's at the end of a move: `flags`
    /// for each UID the source has there, every other UID of the window expunged, the UID
    /// counter at least `uidnext`. A large mailbox is made to match window by window. Returns
    /// the number of messages expunged. `NotFound` if the mailbox does not exist.
    pub fn reconcile_mailbox(
        &self,
        account: &str,
        mailbox: &str,
        window: std::ops::RangeInclusive<u32>,
        flags: &[(u32, Vec<String>)],
        uidnext: u32,
    ) -> Result<usize> {
        let name = canonical_name(mailbox);
        let keep: HashSet<u32> = flags.iter().map(|(uid, _)| *uid).collect();
        let gone: Vec<u32> = self
            .uids(account, &name)?
            .into_iter()
            .filter(|uid| window.contains(uid) && !keep.contains(uid))
            .collect();
        let removed = self.expunge(account, &name, &gone)?.len();
        for (uid, f) in flags {
            match self.set_flags(account, &name, *uid, f) {
                Ok(_) | Err(Error::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        let key = mailbox_key(account, &name);
        self.transact(|tx| {
            let mut info = tx
                .mailbox(&key)?
                .ok_or_else(|| abort(not_found(account, &name)))?;
            if info.uidnext < uidnext {
                info.uidnext = uidnext;
                tx.put_mailbox(&key, &info)?;
            }
            Ok(())
        })?;
        Ok(removed)
    }

    /// Records the account as provisioned without creating its default mailboxes (an
    /// imported account has its own set; one the user deleted must not come back).
    pub fn mark_provisioned(&self, account: &str) -> Result<()> {
        if self.accounts.contains_key(account)? {
            return Ok(());
        }
        let record = AccountRecord {
            provisioned: unix_now(),
        };
        self.accounts.insert(account, encode(&record)?)?;
        Ok(())
    }

    /// Whether `account` is provisioned here (has a provisioning record).
    pub fn is_provisioned(&self, account: &str) -> Result<bool> {
        Ok(self.accounts.contains_key(account)?)
    }

    /// The message metadata of a mailbox, decoded (export side).
    pub fn export_messages(&self, info: &MailboxInfo) -> Result<Vec<MessageMeta>> {
        self.scan_messages(info.id)
    }
}

/// Refuses a change to a frozen account inside a transaction.
pub(super) fn check_open(tx: &sled::transaction::TransactionalTree, account: &str) -> TxResult<()> {
    if tx.get(frozen_key(account))?.is_some() {
        return Err(abort(Error::Frozen(account.to_string())));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Store;

    fn import(name: &str, uidvalidity: u32, uidnext: u32) -> MailboxImport {
        MailboxImport {
            name: name.into(),
            uidvalidity,
            uidnext,
            special_use: None,
            subscribed: true,
        }
    }

    #[test]
    fn an_account_deleted_here_before_can_move_back() {
        // B→C then C→B: B deleted the account at the first switch (a tombstone).
        let store = Store::temporary().unwrap();
        let mail = MailStore::new(&store).unwrap();
        mail.create_account("a@x").unwrap();
        mail.delete_account("a@x").unwrap();
        assert!(mail.ensure_account("a@x").is_err());
        mail.import_mailbox("a@x", &import("INBOX", 77, 5)).unwrap();
        mail.mark_provisioned("a@x").unwrap();
        mail.ensure_account("a@x").unwrap();
        let info = mail.mailbox("a@x", "INBOX").unwrap().unwrap();
        assert_eq!(info.uidvalidity, 77);
    }

    #[test]
    fn import_keeps_uids_and_uidvalidity_and_skips_what_is_there() {
        let store = Store::temporary().unwrap();
        let mail = MailStore::new(&store).unwrap();
        let info = mail
            .import_mailbox("a@x", &import("Work", 1234, 10))
            .unwrap();
        assert_eq!((info.uidvalidity, info.uidnext), (1234, 10));
        let body = |t: &[u8]| store.bodies().stage(t).unwrap();
        let flags = vec!["\\Seen".to_string(), "Kw".to_string()];
        let imp = |uid, flags: &[String], date, prefix: &str| MessageImport {
            uid,
            flags: flags.to_vec(),
            internal_date: date,
            prefix: prefix.into(),
        };
        let put =
            |m: MessageImport, b: &[u8]| mail.import_message("a@x", "Work", &m, &body(b)).unwrap();
        assert!(put(imp(7, &flags, 99, "X-P: 1\r\n"), b"hi\r\n"));
        assert!(!put(imp(7, &flags, 99, ""), b"other\r\n"));
        assert!(put(imp(3, &[], 98, ""), b"three\r\n"));
        let m = mail.message("a@x", "Work", 7).unwrap().unwrap();
        assert_eq!((m.flags.clone(), m.internal_date), (flags, 99));
        assert_eq!(
            mail.message_body("a@x", "Work", 7).unwrap().unwrap(),
            b"X-P: 1\r\nhi\r\n"
        );
        let info = mail.mailbox("a@x", "Work").unwrap().unwrap();
        assert_eq!((info.messages, info.unseen, info.uidnext), (2, 1, 10));
        // Again (a resumed move): fine; another UIDVALIDITY: refused.
        mail.import_mailbox("a@x", &import("Work", 1234, 10))
            .unwrap();
        assert!(mail.import_mailbox("a@x", &import("Work", 99, 10)).is_err());
        // A mailbox created here later gets a UIDVALIDITY above the imported one.
        let later = mail.create_mailbox("a@x", "Later", None).unwrap();
        assert!(later.uidvalidity > 1234);
        // The final pass, window by window: flags as given, the rest of the window expunged.
        let gone = mail
            .reconcile_mailbox("a@x", "Work", 5..=u32::MAX, &[], 12)
            .unwrap();
        assert_eq!(gone, 1);
        assert_eq!(mail.uids("a@x", "Work").unwrap(), vec![3]);
        let gone = mail
            .reconcile_mailbox("a@x", "Work", 1..=4, &[(3, vec!["\\Flagged".into()])], 12)
            .unwrap();
        assert_eq!(gone, 0);
        assert_eq!(
            mail.message("a@x", "Work", 3).unwrap().unwrap().flags,
            vec!["\\Flagged".to_string()]
        );
        let gone = mail
            .reconcile_mailbox("a@x", "Work", 1..=u32::MAX, &[], 12)
            .unwrap();
        assert_eq!(gone, 1);
        assert!(mail.uids("a@x", "Work").unwrap().is_empty());
        let info = mail.mailbox("a@x", "Work").unwrap().unwrap();
        assert_eq!(info.uidnext, 12);
    }

    #[test]
    fn a_frozen_account_takes_no_delivery_append_or_flag_change() {
        let store = Store::temporary().unwrap();
        let mail = MailStore::new(&store).unwrap();
        mail.deliver("a@x", b"one\r\n").unwrap();
        mail.freeze("a@x", true).unwrap();
        assert!(mail.is_frozen("a@x").unwrap());
        assert!(matches!(
            mail.deliver("a@x", b"two\r\n"),
            Err(Error::Frozen(_))
        ));
        assert!(matches!(
            mail.append("a@x", "INBOX", b"x\r\n", &[], 1),
            Err(Error::Frozen(_))
        ));
        assert!(matches!(
            mail.add_flags("a@x", "INBOX", 1, &["\\Seen".into()]),
            Err(Error::Frozen(_))
        ));
        // Other accounts are not affected; the list of mailboxes is unchanged.
        mail.deliver("b@x", b"three\r\n").unwrap();
        assert_eq!(mail.list_mailboxes("a@x").unwrap().len(), 5);
        mail.freeze("a@x", false).unwrap();
        mail.deliver("a@x", b"two\r\n").unwrap();
        assert_eq!(mail.uids("a@x", "INBOX").unwrap(), vec![1, 2]);
    }
}
