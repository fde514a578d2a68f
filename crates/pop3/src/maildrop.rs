//! [`Maildrop`]: the POP3 view of an account's INBOX for one session — a numbered snapshot taken
//! at login, deletion marks kept in memory and applied only in the UPDATE state (QUIT), and unique
//! ids that stay the same across sessions and restarts (`<uidvalidity>.<uid>`).

use ds_store::MailStore;
use ds_store::mailbox::INBOX;

use crate::Result;

/// One message of the snapshot.
#[derive(Clone, Debug)]
pub struct DropEntry {
    /// The message's IMAP UID in INBOX.
    pub uid: u32,
    /// Size in octets as RETR sends it (every line end CRLF), before byte-stuffing.
    pub size: u64,
    /// Marked by `DELE` in this session.
    pub deleted: bool,
}

/// Why a message number cannot be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoMessage {
    /// No message with that number.
    NoSuch,
    /// Marked deleted in this session.
    Deleted,
}

impl NoMessage {
    /// The reply text.
    pub fn reply(self) -> &'static str {
        match self {
            NoMessage::NoSuch => "-ERR no such message\r\n",
            NoMessage::Deleted => "-ERR message already deleted\r\n",
        }
    }
}

/// An account's maildrop as one session sees it.
#[derive(Debug)]
pub struct Maildrop {
    account: String,
    /// The store's id of the INBOX snapshotted (its watchers learn when it is removed).
    inbox_id: u64,
    uidvalidity: u32,
    entries: Vec<DropEntry>,
}

impl Maildrop {
    /// Snapshot `account`'s INBOX (created if the account never had one).
    pub fn open(mail: &MailStore, account: &str) -> Result<Maildrop> {
        mail.ensure_account(account)?;
        let info = mail
            .mailbox(account, INBOX)?
            .ok_or_else(|| ds_store::Error::NotFound(format!("no INBOX for {account}")))?;
        let entries = mail
            .messages(account, INBOX)?
            .into_iter()
            .map(|m| DropEntry {
                uid: m.uid,
                size: if m.pop3_size == 0 {
                    m.size
                } else {
                    m.pop3_size
                },
                deleted: false,
            })
            .collect();
        Ok(Maildrop {
            account: account.to_owned(),
            inbox_id: info.id,
            uidvalidity: info.uidvalidity,
            entries,
        })
    }

    /// The account.
    pub fn account(&self) -> &str {
        &self.account
    }

    /// A receiver woken by every change of the INBOX; it reads `u64::MAX` once the INBOX is
    /// removed (the account deleted, or moved to another node).
    pub fn watch(&self, mail: &MailStore) -> tokio::sync::watch::Receiver<u64> {
        mail.watch_mailbox(self.inbox_id)
    }

    /// Message `n` (1-based), unless it does not exist or is marked deleted.
    pub fn get(&self, n: u32) -> Result<&DropEntry, NoMessage> {
        let entry = n
            .checked_sub(1)
            .and_then(|i| self.entries.get(i as usize))
            .ok_or(NoMessage::NoSuch)?;
        if entry.deleted {
            Err(NoMessage::Deleted)
        } else {
            Ok(entry)
        }
    }

    /// Mark message `n` deleted.
    pub fn delete(&mut self, n: u32) -> Result<(), NoMessage> {
        self.get(n)?;
        self.entries[(n - 1) as usize].deleted = true;
        Ok(())
    }

    /// Unmark every message (RSET).
    pub fn reset(&mut self) {
        for e in &mut self.entries {
            e.deleted = false;
        }
    }

    /// Messages not marked deleted and their total size (STAT).
    pub fn stat(&self) -> (usize, u64) {
        self.live()
            .fold((0, 0), |(n, s), (_, e)| (n + 1, s + e.size))
    }

    /// `(number, entry)` of every message not marked deleted.
    pub fn live(&self) -> impl Iterator<Item = (u32, &DropEntry)> {
        self.entries
            .iter()
            .enumerate()
            .filter(|(_, e)| !e.deleted)
            .map(|(i, e)| (i as u32 + 1, e))
    }

    /// The unique id of an entry: stable for the life of the message.
    pub fn unique_id(&self, entry: &DropEntry) -> String {
        format!("{}.{}", self.uidvalidity, entry.uid)
    }

    /// UIDs marked deleted.
    pub fn deleted_uids(&self) -> Vec<u32> {
        self.entries
            .iter()
            .filter(|e| e.deleted)
            .map(|e| e.uid)
            .collect()
    }

    /// Remove the messages marked deleted (the UPDATE state). Does not flush.
    pub fn commit(&self, mail: &MailStore) -> Result<usize> {
        let uids = self.deleted_uids();
        if uids.is_empty() {
            return Ok(0);
        }
        Ok(mail.expunge(&self.account, INBOX, &uids)?.len())
    }
}
