//! Mailboxes: each account's folders and the messages in them, shaped for IMAP4rev1
//! (UIDPLUS, MOVE, SPECIAL-USE, CONDSTORE-style mod-sequences) and used by SMTP local
//! delivery and POP3 as well.
//!
//! Layout (all trees private to this module):
//! - `mail_mailboxes`: `account \0 name` → JSON [`MailboxInfo`] (the record keeps the UID and
//!   mod-sequence counters and the message/unseen counts, so `STATUS` is one read);
//! - `mail_messages`: `mailbox id (u64 BE) ++ uid (u32 BE)` → JSON [`MessageMeta`];
//! - bodies in [`crate::Bodies`] (`mail_blobs` for small ones, files for large ones, reference
//!   counts in `mail_blob_refs`): copies, and the recipients of one delivery, share a body;
//!   a message keeps its own `prefix` (`Return-Path`/`Received` lines) beside the shared body;
//! - `mail_accounts`: `account` → when its default mailboxes were provisioned;
//! - `mail_deleted_accounts`: `account` → when it was deleted (a tombstone): no mailbox of it
//!   is created again until [`MailStore::create_account`] (a new account of that name) clears
//!   it, so a delivery racing `account del` cannot bring the old one's mailboxes back;
//! - `mail_counters`: the last UIDVALIDITY handed out.
//!
//! Every change to messages runs as one sled transaction over the mailbox record, the message
//! index and the blob trees. Nothing here flushes: callers make writes durable with
//! [`Store::flush_async`] before acknowledging a client.
//!
//! Invariants: UIDs strictly increase within a mailbox and are never reused (the counter lives
//! in the mailbox record, which a rename keeps); UIDVALIDITY values are unique for the life
//! of the database (time-seeded, strictly increasing), so a name that is deleted and created
//! again gets a new one; every change bumps the mailbox's `highest_modseq`.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};

use crate::body::{BodyRef, BodyTx, DEAD_TREE, INLINE_TREE, LineEnds, MessageReader, REFS_TREE};
use crate::queue::{QueueEntry, QueueStore};
use crate::relayed::{RelayMark, RelayMarks};
use crate::{Error, Result, StagedBody, Store, unix_now};

mod sync;
mod transfer;

pub use transfer::{MailboxImport, MessageImport};

pub(crate) const MAILBOXES: &str = "mail_mailboxes";
pub(crate) const MESSAGES: &str = "mail_messages";
#[cfg(test)]
const BLOBS: &str = INLINE_TREE;
#[cfg(test)]
const BLOB_REFS: &str = REFS_TREE;
const ACCOUNTS: &str = "mail_accounts";
const DELETED_ACCOUNTS: &str = "mail_deleted_accounts";
const COUNTERS: &str = "mail_counters";
const UIDVALIDITY_KEY: &[u8] = b"uidvalidity";

/// How often an operation that raced with a concurrent change rescans before giving up.
const MAX_RESCANS: usize = 64;
/// Longest mailbox name accepted, in bytes.
const MAX_NAME_LEN: usize = 512;

/// The one mailbox every account has; its name is case-insensitive.
pub const INBOX: &str = "INBOX";
/// The hierarchy delimiter of mailbox names.
pub const DELIMITER: char = '/';
/// Mailboxes [`MailStore::ensure_account`] creates besides INBOX, with their SPECIAL-USE
/// attribute (RFC 6154).
pub const DEFAULT_MAILBOXES: [(&str, &str); 4] = [
    ("Sent", "\\Sent"),
    ("Drafts", "\\Drafts"),
    ("Trash", "\\Trash"),
    ("Junk", "\\Junk"),
];

/// A mailbox and its counters (what IMAP `SELECT`/`STATUS`/`LIST` need).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct MailboxInfo {
    /// Internal identity; survives renames, never reused.
    pub id: u64,
    pub name: String,
    /// Changes only when the name is deleted and created again.
    pub uidvalidity: u32,
    /// The UID the next message will get; only ever grows.
    pub uidnext: u32,
    /// The mod-sequence of the latest change (append, flag change, expunge) in this mailbox.
    pub highest_modseq: u64,
    /// SPECIAL-USE attribute, e.g. `"\\Sent"`.
    pub special_use: Option<String>,
    pub subscribed: bool,
    /// Number of messages.
    pub messages: u32,
    /// Number of messages without `\Seen`.
    pub unseen: u32,
}

/// One message of a mailbox.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct MessageMeta {
    pub uid: u32,
    /// Normalised flags: system flags in canonical case, no duplicates (case-insensitive),
    /// never `\Recent` (a session property, not stored).
    pub flags: Vec<String>,
    /// Unix seconds.
    pub internal_date: i64,
    /// Size of the message in bytes, prefix and body (RFC822.SIZE).
    pub size: u64,
    /// The mod-sequence of the last change to this message.
    pub modseq: u64,
    /// Body id in [`crate::Bodies`]; shared by copies of the message and by the other
    /// recipients of the same delivery.
    pub blob: u64,
    /// This message's own first lines (`Return-Path`, `Received`), served before the shared
    /// body; empty for messages stored whole.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub prefix: String,
    /// Size as POP3 sends it (every line end CRLF, before byte-stuffing).
    #[serde(default)]
    pub pop3_size: u64,
}

impl MessageMeta {
    /// Whether the message carries `flag` (case-insensitive, as IMAP flags are).
    pub fn has_flag(&self, flag: &str) -> bool {
        has_flag(&self.flags, flag)
    }
}

/// How [`MailStore::store_flags`] combines the given flags with a message's flags
/// (IMAP `STORE FLAGS`, `+FLAGS`, `-FLAGS`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlagOp {
    Replace,
    Add,
    Remove,
}

#[derive(Serialize, Deserialize, Debug)]
struct AccountRecord {
    provisioned: i64,
}

/// The mailbox store. Cheap to clone.
#[derive(Clone)]
pub struct MailStore {
    store: Store,
    mailboxes: sled::Tree,
    messages: sled::Tree,
    blobs: sled::Tree,
    refs: sled::Tree,
    dead: sled::Tree,
    accounts: sled::Tree,
    /// Tombstones of deleted accounts (see the module header).
    deleted: sled::Tree,
    counters: sled::Tree,
    /// Relayed messages already delivered ([`crate::relayed`]).
    relayed: RelayMarks,
    /// Change notification, expunge log, `\Recent`, subscriptions ([`sync`]).
    sync: std::sync::Arc<sync::SyncState>,
}

impl std::fmt::Debug for MailStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MailStore").finish_non_exhaustive()
    }
}

type TxResult<T> = std::result::Result<T, ConflictableTransactionError<Error>>;

fn abort(e: Error) -> ConflictableTransactionError<Error> {
    ConflictableTransactionError::Abort(e)
}

fn tx_result<T>(r: std::result::Result<T, TransactionError<Error>>) -> Result<T> {
    r.map_err(|e| match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => Error::Db(e),
    })
}

fn decode<T: DeserializeOwned>(
    table: &str,
    key: impl FnOnce() -> String,
    bytes: &[u8],
) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|source| Error::Corrupt {
        table: table.to_string(),
        key: key(),
        source,
    })
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(Error::Encode)
}

fn account_prefix(account: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(account.len() + 1);
    k.extend_from_slice(account.as_bytes());
    k.push(0);
    k
}

fn mailbox_key(account: &str, name: &str) -> Vec<u8> {
    let mut k = account_prefix(account);
    k.extend_from_slice(name.as_bytes());
    k
}

fn message_key(mailbox: u64, uid: u32) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..8].copy_from_slice(&mailbox.to_be_bytes());
    k[8..].copy_from_slice(&uid.to_be_bytes());
    k
}

/// A message's sizes from its prefix and body.
fn sizes(prefix: &str, body: &BodyRef) -> (u64, u64) {
    (
        prefix.len() as u64 + body.len,
        LineEnds::of(prefix.as_bytes()) + body.crlf_len,
    )
}

fn check_prefix(prefix: &str) -> Result<()> {
    if !prefix.is_empty() && !prefix.ends_with("\r\n") {
        return Err(Error::Conflict(
            "a message prefix must end with CRLF".to_string(),
        ));
    }
    Ok(())
}

/// `INBOX` in any case is INBOX; other names are case-sensitive.
pub fn canonical_name(name: &str) -> String {
    if name.eq_ignore_ascii_case(INBOX) {
        INBOX.to_string()
    } else {
        name.to_string()
    }
}

fn validate_name(name: &str) -> Result<()> {
    let bad = name.is_empty()
        || name.len() > MAX_NAME_LEN
        || name.starts_with(DELIMITER)
        || name.ends_with(DELIMITER)
        || name.contains("//")
        || name.chars().any(|c| c.is_control() || c == '*' || c == '%');
    if bad {
        return Err(Error::Conflict(format!("invalid mailbox name {name:?}")));
    }
    Ok(())
}

/// The superior names of `name` ("a/b/c" → "a", "a/b").
fn parents(name: &str) -> Vec<&str> {
    name.match_indices(DELIMITER)
        .map(|(i, _)| &name[..i])
        .collect()
}

fn has_flag(flags: &[String], flag: &str) -> bool {
    flags.iter().any(|f| f.eq_ignore_ascii_case(flag))
}

const SYSTEM_FLAGS: [&str; 5] = ["\\Seen", "\\Answered", "\\Flagged", "\\Deleted", "\\Draft"];

/// Canonical case for system flags, no duplicates (case-insensitive), no `\Recent`,
/// no empty flags; keeps first-seen order.
pub fn normalize_flags(flags: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(flags.len());
    for f in flags {
        if f.is_empty() || f.eq_ignore_ascii_case("\\Recent") {
            continue;
        }
        let f = SYSTEM_FLAGS
            .iter()
            .find(|s| s.eq_ignore_ascii_case(f))
            .map_or_else(|| f.clone(), |s| s.to_string());
        if !has_flag(&out, &f) {
            out.push(f);
        }
    }
    out
}

fn is_seen(flags: &[String]) -> bool {
    has_flag(flags, "\\Seen")
}

fn new_mailbox(
    id: u64,
    name: &str,
    uidvalidity: u32,
    special_use: Option<&str>,
    subscribed: bool,
) -> MailboxInfo {
    MailboxInfo {
        id,
        name: name.to_string(),
        uidvalidity,
        uidnext: 1,
        highest_modseq: 1,
        special_use: special_use.map(str::to_string),
        subscribed,
        messages: 0,
        unseen: 0,
    }
}

fn account_deleted(account: &str) -> Error {
    Error::NotFound(format!("account {account} was deleted"))
}

fn not_found(account: &str, name: &str) -> Error {
    Error::NotFound(format!("no mailbox {name:?} for {account}"))
}

/// The transactional view over the trees that change together.
struct Tx<'a> {
    mailboxes: &'a TransactionalTree,
    messages: &'a TransactionalTree,
    body: BodyTx<'a>,
}

impl Tx<'_> {
    fn mailbox(&self, key: &[u8]) -> TxResult<Option<MailboxInfo>> {
        match self.mailboxes.get(key)? {
            None => Ok(None),
            Some(v) => decode(
                MAILBOXES,
                || String::from_utf8_lossy(key).replace('\0', " "),
                &v,
            )
            .map(Some)
            .map_err(abort),
        }
    }

    fn put_mailbox(&self, key: &[u8], info: &MailboxInfo) -> TxResult<()> {
        self.mailboxes.insert(key, encode(info).map_err(abort)?)?;
        Ok(())
    }

    fn message(&self, mailbox: u64, uid: u32) -> TxResult<Option<MessageMeta>> {
        match self.messages.get(message_key(mailbox, uid))? {
            None => Ok(None),
            Some(v) => decode(MESSAGES, || format!("{mailbox}/{uid}"), &v)
                .map(Some)
                .map_err(abort),
        }
    }

    fn put_message(&self, mailbox: u64, meta: &MessageMeta) -> TxResult<()> {
        self.messages.insert(
            &message_key(mailbox, meta.uid)[..],
            encode(meta).map_err(abort)?,
        )?;
        Ok(())
    }

    fn remove_message(&self, mailbox: u64, uid: u32) -> TxResult<()> {
        self.messages.remove(&message_key(mailbox, uid)[..])?;
        Ok(())
    }

    fn retain_blob(&self, blob: u64) -> TxResult<()> {
        self.body.retain(blob)
    }

    fn release_blob(&self, blob: u64) -> TxResult<()> {
        self.body.release(blob)
    }

    /// Removes a message from `info` (the caller writes `info` back), releasing its blob.
    fn drop_message(&self, info: &mut MailboxInfo, meta: &MessageMeta) -> TxResult<()> {
        self.remove_message(info.id, meta.uid)?;
        self.release_blob(meta.blob)?;
        info.messages = info.messages.saturating_sub(1);
        if !is_seen(&meta.flags) {
            info.unseen = info.unseen.saturating_sub(1);
        }
        Ok(())
    }

    /// Gives `meta` the next UID of `info` (the caller writes `info` back).
    fn add_message(&self, info: &mut MailboxInfo, meta: &mut MessageMeta) -> TxResult<()> {
        if info.uidnext == u32::MAX {
            return Err(abort(Error::Conflict(format!(
                "mailbox {:?} has used up its UIDs",
                info.name
            ))));
        }
        meta.uid = info.uidnext;
        meta.modseq = info.highest_modseq;
        info.uidnext += 1;
        info.messages += 1;
        if !is_seen(&meta.flags) {
            info.unseen += 1;
        }
        self.put_message(info.id, meta)
    }
}

impl MailStore {
    pub fn new(store: &Store) -> Result<MailStore> {
        Ok(MailStore {
            store: store.clone(),
            mailboxes: store.tree(MAILBOXES)?,
            messages: store.tree(MESSAGES)?,
            blobs: store.tree(INLINE_TREE)?,
            refs: store.tree(REFS_TREE)?,
            dead: store.tree(DEAD_TREE)?,
            accounts: store.tree(ACCOUNTS)?,
            deleted: store.tree(DELETED_ACCOUNTS)?,
            counters: store.tree(COUNTERS)?,
            relayed: RelayMarks::new(store)?,
            sync: std::sync::Arc::new(sync::SyncState::new(store)?),
        })
    }

    /// The database this mail store lives in (to flush it).
    pub fn store(&self) -> &Store {
        &self.store
    }

    fn transact<T>(&self, f: impl Fn(&Tx<'_>) -> TxResult<T>) -> Result<T> {
        tx_result(
            (
                &self.mailboxes,
                &self.messages,
                &self.blobs,
                &self.refs,
                &self.dead,
            )
                .transaction(|(mailboxes, messages, inline, refs, dead)| {
                    f(&Tx {
                        mailboxes,
                        messages,
                        body: BodyTx { inline, refs, dead },
                    })
                }),
        )
    }

    /// A UIDVALIDITY never handed out before: the current time, or one more than the last.
    fn next_uidvalidity(&self) -> Result<u32> {
        let now = unix_now().clamp(1, i64::from(u32::MAX)) as u32;
        let next = |old: Option<&[u8]>| {
            let last = old
                .and_then(|v| v.try_into().ok().map(u32::from_be_bytes))
                .unwrap_or(0);
            now.max(last.wrapping_add(1)).max(1)
        };
        let new = self.counters.update_and_fetch(UIDVALIDITY_KEY, |old| {
            Some(next(old).to_be_bytes().to_vec())
        })?;
        Ok(new
            .and_then(|v| v.as_ref().try_into().ok().map(u32::from_be_bytes))
            .unwrap_or(now))
    }

    fn fresh_mailbox(
        &self,
        name: &str,
        special_use: Option<&str>,
        subscribed: bool,
    ) -> Result<MailboxInfo> {
        Ok(new_mailbox(
            self.store.next_id()?,
            name,
            self.next_uidvalidity()?,
            special_use,
            subscribed,
        ))
    }

    /// Creates `name` unless it exists; `true` if it was created.
    fn create_if_missing(
        &self,
        account: &str,
        name: &str,
        special_use: Option<&str>,
        subscribed: bool,
    ) -> Result<bool> {
        let key = mailbox_key(account, name);
        if self.mailboxes.contains_key(&key)? {
            return Ok(false);
        }
        let info = self.fresh_mailbox(name, special_use, subscribed)?;
        self.put_new_mailbox(account, &key, &info)
    }

    /// Writes a new mailbox record unless one exists (`false`), in one transaction with the
    /// check that the account was not deleted (`NotFound`).
    fn put_new_mailbox(&self, account: &str, key: &[u8], info: &MailboxInfo) -> Result<bool> {
        let value = encode(info)?;
        tx_result(
            (&self.mailboxes, &self.deleted).transaction(|(mailboxes, deleted)| {
                if deleted.get(account.as_bytes())?.is_some() {
                    return Err(abort(account_deleted(account)));
                }
                if mailboxes.get(key)?.is_some() {
                    return Ok(false);
                }
                mailboxes.insert(key, value.as_slice())?;
                Ok(true)
            }),
        )
    }

    fn read_mailbox(&self, account: &str, name: &str) -> Result<Option<MailboxInfo>> {
        let key = mailbox_key(account, name);
        self.mailboxes
            .get(&key)?
            .map(|v| decode(MAILBOXES, || format!("{account} {name}"), &v))
            .transpose()
    }

    fn require_mailbox(&self, account: &str, name: &str) -> Result<MailboxInfo> {
        self.read_mailbox(account, name)?
            .ok_or_else(|| not_found(account, name))
    }

    fn scan_messages(&self, mailbox: u64) -> Result<Vec<MessageMeta>> {
        self.messages
            .scan_prefix(mailbox.to_be_bytes())
            .map(|kv| {
                let (k, v) = kv?;
                decode(MESSAGES, || format!("{mailbox}/{:?}", &k[8..]), &v)
            })
            .collect()
    }

    /// Creates INBOX and, the first time, the [`DEFAULT_MAILBOXES`] with their SPECIAL-USE
    /// attributes. Idempotent and cheap once done; a default mailbox the user deleted is not
    /// created again, INBOX always is.
    /// `NotFound` if the account was deleted ([`MailStore::delete_account`]) and not created
    /// again with [`MailStore::create_account`].
    pub fn ensure_account(&self, account: &str) -> Result<()> {
        if self.deleted.contains_key(account)? {
            return Err(account_deleted(account));
        }
        let provisioned = self.accounts.contains_key(account)?;
        if provisioned && self.mailboxes.contains_key(mailbox_key(account, INBOX))? {
            return Ok(());
        }
        self.create_if_missing(account, INBOX, None, true)?;
        if !provisioned {
            for (name, special_use) in DEFAULT_MAILBOXES {
                self.create_if_missing(account, name, Some(special_use), true)?;
            }
            let record = AccountRecord {
                provisioned: unix_now(),
            };
            self.accounts.insert(account, encode(&record)?)?;
        }
        Ok(())
    }

    /// Creates a mailbox (and any missing superior names, unsubscribed, like IMAP `CREATE`).
    /// `Conflict` if it exists or the name is invalid. New mailboxes are not subscribed.
    pub fn create_mailbox(
        &self,
        account: &str,
        name: &str,
        special_use: Option<&str>,
    ) -> Result<MailboxInfo> {
        let name = canonical_name(name);
        validate_name(&name)?;
        for parent in parents(&name) {
            self.create_if_missing(account, parent, None, false)?;
        }
        let key = mailbox_key(account, &name);
        if self.mailboxes.contains_key(&key)? {
            return Err(Error::Conflict(format!("mailbox {name:?} exists")));
        }
        let info = self.fresh_mailbox(&name, special_use, false)?;
        if !self.put_new_mailbox(account, &key, &info)? {
            return Err(Error::Conflict(format!("mailbox {name:?} exists")));
        }
        Ok(info)
    }

    /// Renames a mailbox and its inferiors (`a` → `b` also renames `a/x` → `b/x`); the
    /// mailbox keeps its id, UIDVALIDITY and UIDs. Renaming INBOX moves its messages to the new
    /// name and leaves a new empty INBOX (RFC 3501 §6.3.5); INBOX's inferiors stay put.
    /// `NotFound` if `from` is missing, `Conflict` if `to` exists or is invalid.
    pub fn rename_mailbox(&self, account: &str, from: &str, to: &str) -> Result<()> {
        let from = canonical_name(from);
        let to = canonical_name(to);
        validate_name(&to)?;
        if to == INBOX || to == from {
            return Err(Error::Conflict(format!("mailbox {to:?} exists")));
        }
        if to.starts_with(&format!("{from}{DELIMITER}")) {
            return Err(Error::Conflict(format!(
                "cannot rename {from:?} into its own inferior {to:?}"
            )));
        }
        self.require_mailbox(account, &from)?;
        if self.mailboxes.contains_key(mailbox_key(account, &to))? {
            return Err(Error::Conflict(format!("mailbox {to:?} exists")));
        }
        for parent in parents(&to) {
            self.create_if_missing(account, parent, None, false)?;
        }

        if from == INBOX {
            let fresh = self.fresh_mailbox(INBOX, None, true)?;
            let inbox_key = mailbox_key(account, INBOX);
            let to_key = mailbox_key(account, &to);
            return self.transact(|tx| {
                let mut old = tx
                    .mailbox(&inbox_key)?
                    .ok_or_else(|| abort(not_found(account, INBOX)))?;
                if tx.mailbox(&to_key)?.is_some() {
                    return Err(abort(Error::Conflict(format!("mailbox {to:?} exists"))));
                }
                old.name = to.clone();
                old.special_use = None;
                tx.put_mailbox(&to_key, &old)?;
                tx.put_mailbox(&inbox_key, &fresh)?;
                Ok(())
            });
        }

        // The mailbox and its inferiors, as (old name, new name).
        let child_prefix = mailbox_key(account, &format!("{from}{DELIMITER}"));
        let mut renames = vec![(from.clone(), to.clone())];
        for kv in self.mailboxes.scan_prefix(&child_prefix) {
            let (k, _) = kv?;
            let old = String::from_utf8_lossy(&k[account.len() + 1..]).into_owned();
            let new = format!("{to}{}", &old[from.len()..]);
            renames.push((old, new));
        }
        self.transact(|tx| {
            for (i, (old, new)) in renames.iter().enumerate() {
                let old_key = mailbox_key(account, old);
                let new_key = mailbox_key(account, new);
                let Some(mut info) = tx.mailbox(&old_key)? else {
                    if i == 0 {
                        return Err(abort(not_found(account, old)));
                    }
                    continue;
                };
                if tx.mailbox(&new_key)?.is_some() {
                    return Err(abort(Error::Conflict(format!("mailbox {new:?} exists"))));
                }
                info.name = new.clone();
                tx.mailboxes.remove(old_key)?;
                tx.put_mailbox(&new_key, &info)?;
            }
            Ok(())
        })
    }

    /// Deletes a mailbox and its messages (not INBOX: `Conflict`). Inferior mailboxes are
    /// left as they are (as IMAP4rev2 allows). `NotFound` if it does not exist.
    pub fn delete_mailbox(&self, account: &str, name: &str) -> Result<()> {
        let name = canonical_name(name);
        if name == INBOX {
            return Err(Error::Conflict("INBOX cannot be deleted".to_string()));
        }
        self.remove_mailbox(account, &name)
    }

    fn remove_mailbox(&self, account: &str, name: &str) -> Result<()> {
        let key = mailbox_key(account, name);
        for _ in 0..MAX_RESCANS {
            let snapshot = self.require_mailbox(account, name)?;
            let messages = self.scan_messages(snapshot.id)?;
            // Every change to the mailbox bumps highest_modseq: if it moved since the scan,
            // a message may be missing from the list, so scan again.
            let done = self.transact(|tx| {
                let Some(info) = tx.mailbox(&key)? else {
                    return Err(abort(not_found(account, name)));
                };
                if info.id != snapshot.id || info.highest_modseq != snapshot.highest_modseq {
                    return Ok(false);
                }
                for meta in &messages {
                    tx.remove_message(info.id, meta.uid)?;
                    tx.release_blob(meta.blob)?;
                }
                tx.mailboxes.remove(&key[..])?;
                Ok(true)
            })?;
            if done {
                self.notify(snapshot.id, u64::MAX);
                return Ok(());
            }
        }
        Err(Error::Conflict(format!(
            "mailbox {name:?} keeps changing; try again"
        )))
    }

    /// A new account (`account add`): clears the tombstone of a deleted account of the same
    /// name, then [`MailStore::ensure_account`]. The new account starts empty.
    pub fn create_account(&self, account: &str) -> Result<()> {
        self.deleted.remove(account)?;
        self.ensure_account(account)
    }

    /// Removes all of an account's mailboxes and messages, and its provisioning record. The
    /// tombstone is written first, so nothing (a delivery that located the account before it
    /// was deleted, say) creates a mailbox of it afterwards; see [`MailStore::create_account`].
    pub fn delete_account(&self, account: &str) -> Result<()> {
        self.deleted.insert(account, encode(&unix_now())?)?;
        self.remove_account_mail(account)
    }

    /// Removes all of an account's mailboxes and messages, and its provisioning record,
    /// without a tombstone: the partial copy of an account whose move here was aborted
    /// (DESIGN.md §11) leaves no trace.
    pub fn discard_account_import(&self, account: &str) -> Result<()> {
        self.remove_account_mail(account)
    }

    fn remove_account_mail(&self, account: &str) -> Result<()> {
        let names = self
            .list_mailboxes(account)?
            .into_iter()
            .map(|m| m.name)
            .collect::<Vec<_>>();
        for name in names {
            match self.remove_mailbox(account, &name) {
                Ok(()) | Err(Error::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        self.accounts.remove(account)?;
        Ok(())
    }

    /// The account's mailboxes: INBOX first, then by name.
    pub fn list_mailboxes(&self, account: &str) -> Result<Vec<MailboxInfo>> {
        let mut list = self
            .mailboxes
            .scan_prefix(account_prefix(account))
            .map(|kv| {
                let (k, v) = kv?;
                decode(MAILBOXES, || String::from_utf8_lossy(&k).into_owned(), &v)
            })
            .collect::<Result<Vec<MailboxInfo>>>()?;
        if let Some(i) = list.iter().position(|m| m.name == INBOX) {
            let inbox = list.remove(i);
            list.insert(0, inbox);
        }
        Ok(list)
    }

    /// One mailbox by name (INBOX case-insensitive, other names case-sensitive).
    pub fn mailbox(&self, account: &str, name: &str) -> Result<Option<MailboxInfo>> {
        self.read_mailbox(account, &canonical_name(name))
    }

    /// Sets the mailbox's subscription (IMAP `SUBSCRIBE`/`UNSUBSCRIBE`). `NotFound` if the
    /// mailbox does not exist.
    pub fn subscribe(&self, account: &str, name: &str, subscribed: bool) -> Result<()> {
        let name = canonical_name(name);
        let key = mailbox_key(account, &name);
        self.transact(|tx| {
            let mut info = tx
                .mailbox(&key)?
                .ok_or_else(|| abort(not_found(account, &name)))?;
            if info.subscribed != subscribed {
                info.subscribed = subscribed;
                tx.put_mailbox(&key, &info)?;
            }
            Ok(())
        })
    }

    /// Stores a message in a mailbox; returns `(uidvalidity, uid)` for `APPENDUID`.
    /// Atomic; does not flush (call [`Store::flush_async`] before acknowledging).
    /// `NotFound` if the mailbox does not exist (IMAP: `NO [TRYCREATE]`).
    pub fn append(
        &self,
        account: &str,
        mailbox: &str,
        body: &[u8],
        flags: &[String],
        internal_date: i64,
    ) -> Result<(u32, u32)> {
        let staged = self.store.bodies().stage(body)?;
        self.append_staged(account, mailbox, &staged, flags, internal_date)
    }

    /// [`MailStore::append`] of a body received through a [`crate::BodyWriter`] (IMAP
    /// `APPEND` of a large literal).
    pub fn append_staged(
        &self,
        account: &str,
        mailbox: &str,
        body: &StagedBody,
        flags: &[String],
        internal_date: i64,
    ) -> Result<(u32, u32)> {
        let name = canonical_name(mailbox);
        let key = mailbox_key(account, &name);
        let flags = normalize_flags(flags);
        let body_ref = body.body();
        let (size, pop3_size) = sizes("", &body_ref);
        let done = self.transact(|tx| {
            transfer::check_open(tx.mailboxes, account)?;
            let mut info = tx
                .mailbox(&key)?
                .ok_or_else(|| abort(not_found(account, &name)))?;
            info.highest_modseq += 1;
            let mut meta = MessageMeta {
                uid: 0,
                flags: flags.clone(),
                internal_date,
                size,
                modseq: 0,
                blob: body_ref.id,
                prefix: String::new(),
                pop3_size,
            };
            tx.body.add_staged(body, 1)?;
            tx.add_message(&mut info, &mut meta)?;
            tx.put_mailbox(&key, &info)?;
            Ok((info.uidvalidity, meta.uid))
        })?;
        body.mark_committed();
        self.changed(account, &name);
        Ok(done)
    }

    /// Local delivery: [`MailStore::ensure_account`], then appends to INBOX with no flags and
    /// the current time. Returns the UID. Does not flush.
    pub fn deliver(&self, account: &str, body: &[u8]) -> Result<u32> {
        let staged = self.store.bodies().stage(body)?;
        let uids = self.deliver_shared(&staged, &[(account.to_string(), String::new())])?;
        Ok(uids[0])
    }

    /// Delivers one stored body to the INBOX of every `(account, prefix)`, each message with
    /// its own prefix (which must end with CRLF) and all sharing the body: one transaction,
    /// one reference per message. Returns the UIDs in order. Does not flush.
    pub fn deliver_shared(
        &self,
        body: &StagedBody,
        local: &[(String, String)],
    ) -> Result<Vec<u32>> {
        self.deliver_and_queue(body, local, None)
            .map(|(uids, _)| uids)
    }

    /// Delivers a body already stored (a queue entry's, say) to one more account's INBOX.
    /// With a `mark`, the delivery happens at most once: the mark is written in the same
    /// transaction, and `Error::Duplicate` (nothing stored) says it was done before.
    pub fn deliver_stored(
        &self,
        account: &str,
        prefix: &str,
        body: &BodyRef,
        mark: Option<&RelayMark>,
    ) -> Result<u32> {
        check_prefix(prefix)?;
        self.ensure_account(account)?;
        let key = mailbox_key(account, INBOX);
        let (size, pop3_size) = sizes(prefix, body);
        let now = unix_now();
        let written_at = now.to_be_bytes();
        tx_result(
            (
                &self.mailboxes,
                &self.messages,
                &self.blobs,
                &self.refs,
                &self.dead,
                self.relayed.tree(),
            )
                .transaction(|(mailboxes, messages, inline, refs, dead, relayed)| {
                    let tx = Tx {
                        mailboxes,
                        messages,
                        body: BodyTx { inline, refs, dead },
                    };
                    if let Some(mark) = mark {
                        if relayed.get(mark.key())?.is_some() {
                            return Err(abort(Error::Duplicate(format!(
                                "already delivered: {mark}"
                            ))));
                        }
                        relayed.insert(mark.key(), &written_at[..])?;
                    }
                    transfer::check_open(tx.mailboxes, account)?;
                    let mut info = tx
                        .mailbox(&key)?
                        .ok_or_else(|| abort(not_found(account, INBOX)))?;
                    info.highest_modseq += 1;
                    let mut meta = MessageMeta {
                        uid: 0,
                        flags: Vec::new(),
                        internal_date: now,
                        size,
                        modseq: 0,
                        blob: body.id,
                        prefix: prefix.to_string(),
                        pop3_size,
                    };
                    tx.retain_blob(body.id)?;
                    tx.add_message(&mut info, &mut meta)?;
                    tx.put_mailbox(&key, &info)?;
                    Ok(meta.uid)
                }),
        )
        .inspect(|_| self.changed(account, INBOX))
    }

    /// The acceptance of one message: the body goes to the INBOX of each local `(account,
    /// prefix)` and into each queue entry (`(entry, prefix)`; ids, sizes and the body reference
    /// are set here), all in one transaction sharing one stored body. Returns the UIDs and the
    /// queue entry ids. Does not flush.
    pub fn deliver_and_queue(
        &self,
        body: &StagedBody,
        local: &[(String, String)],
        queued: Option<(&QueueStore, Vec<(QueueEntry, String)>)>,
    ) -> Result<(Vec<u32>, Vec<u64>)> {
        self.deliver_marked(body, local, queued, &[])
    }

    /// [`MailStore::deliver_shared`] of a message relayed by a peer: `marks` (one per
    /// delivered recipient, see [`crate::relayed`]) are written in the same transaction as the
    /// messages. `Error::Duplicate` (and nothing stored) if one of them is there already: the
    /// caller leaves those recipients out and tries again. Does not flush.
    pub fn deliver_relayed(
        &self,
        body: &StagedBody,
        local: &[(String, String)],
        marks: &[RelayMark],
    ) -> Result<Vec<u32>> {
        self.deliver_marked(body, local, None, marks)
            .map(|(uids, _)| uids)
    }

    /// The relay marks of this database.
    pub fn relay_marks(&self) -> &RelayMarks {
        &self.relayed
    }

    fn deliver_marked(
        &self,
        body: &StagedBody,
        local: &[(String, String)],
        queued: Option<(&QueueStore, Vec<(QueueEntry, String)>)>,
        marks: &[RelayMark],
    ) -> Result<(Vec<u32>, Vec<u64>)> {
        for (account, prefix) in local {
            check_prefix(prefix)?;
            self.ensure_account(account)?;
        }
        let body_ref = body.body();
        let now = unix_now();
        let keys: Vec<Vec<u8>> = local
            .iter()
            .map(|(account, _)| mailbox_key(account, INBOX))
            .collect();
        let (queue, entries) = match queued {
            Some((queue, entries)) => {
                let mut prepared = Vec::with_capacity(entries.len());
                for (mut entry, prefix) in entries {
                    check_prefix(&prefix)?;
                    entry.id = self.store.next_id()?;
                    entry.size = prefix.len() as u64 + body_ref.len;
                    entry.body = Some(body_ref);
                    entry.prefix = prefix;
                    prepared.push(entry);
                }
                (Some(queue), prepared)
            }
            None => (None, Vec::new()),
        };
        let count = (local.len() + entries.len()) as u64;
        if count == 0 && marks.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let encoded: Vec<Vec<u8>> = entries
            .iter()
            .map(|e| serde_json::to_vec(e).map_err(Error::Encode))
            .collect::<Result<_>>()?;
        let entries_tree = match queue {
            Some(q) => q.entries_tree().clone(),
            None => self.store.tree(crate::queue::ENTRIES)?,
        };
        let written_at = now.to_be_bytes();
        let uids = tx_result(
            (
                &self.mailboxes,
                &self.messages,
                &self.blobs,
                &self.refs,
                &self.dead,
                &entries_tree,
                self.relayed.tree(),
            )
                .transaction(
                    |(mailboxes, messages, inline, refs, dead, q, relayed)| {
                        let tx = Tx {
                            mailboxes,
                            messages,
                            body: BodyTx { inline, refs, dead },
                        };
                        for mark in marks {
                            if relayed.get(mark.key())?.is_some() {
                                return Err(abort(Error::Duplicate(format!(
                                    "relayed message already delivered: {mark}"
                                ))));
                            }
                            relayed.insert(mark.key(), &written_at[..])?;
                        }
                        if count > 0 {
                            tx.body.add_staged(body, count)?;
                        }
                        let mut uids = Vec::with_capacity(local.len());
                        for ((account, prefix), key) in local.iter().zip(&keys) {
                            transfer::check_open(mailboxes, account)?;
                            let mut info = tx
                                .mailbox(key)?
                                .ok_or_else(|| abort(not_found(account, INBOX)))?;
                            info.highest_modseq += 1;
                            let (size, pop3_size) = sizes(prefix, &body_ref);
                            let mut meta = MessageMeta {
                                uid: 0,
                                flags: Vec::new(),
                                internal_date: now,
                                size,
                                modseq: 0,
                                blob: body_ref.id,
                                prefix: prefix.clone(),
                                pop3_size,
                            };
                            tx.add_message(&mut info, &mut meta)?;
                            tx.put_mailbox(key, &info)?;
                            uids.push(meta.uid);
                        }
                        for (entry, bytes) in entries.iter().zip(&encoded) {
                            q.insert(&entry.id.to_be_bytes()[..], bytes.as_slice())?;
                        }
                        Ok(uids)
                    },
                ),
        )?;
        if count > 0 {
            body.mark_committed();
        }
        for (account, _) in local {
            self.changed(account, INBOX);
        }
        let ids = entries.iter().map(|e| e.id).collect();
        if let Some(queue) = queue {
            for entry in &entries {
                queue.scheduled(entry);
            }
        }
        Ok((uids, ids))
    }

    /// The mailbox's messages in UID order. `NotFound` if the mailbox does not exist.
    pub fn messages(&self, account: &str, mailbox: &str) -> Result<Vec<MessageMeta>> {
        let info = self.require_mailbox(account, &canonical_name(mailbox))?;
        self.scan_messages(info.id)
    }

    /// Messages whose modseq is above `modseq` (CONDSTORE `CHANGEDSINCE`), in UID order.
    pub fn changed_since(
        &self,
        account: &str,
        mailbox: &str,
        modseq: u64,
    ) -> Result<Vec<MessageMeta>> {
        let mut list = self.messages(account, mailbox)?;
        list.retain(|m| m.modseq > modseq);
        Ok(list)
    }

    /// One message; `None` if there is no such UID. `NotFound` if the mailbox does not exist.
    pub fn message(&self, account: &str, mailbox: &str, uid: u32) -> Result<Option<MessageMeta>> {
        let info = self.require_mailbox(account, &canonical_name(mailbox))?;
        self.messages
            .get(message_key(info.id, uid))?
            .map(|v| decode(MESSAGES, || format!("{}/{uid}", info.id), &v))
            .transpose()
    }

    /// A shared body by the `blob` of its [`MessageMeta`] (without the message's prefix), whole
    /// in memory: for tests and small bodies. Callers must only pass blob ids taken from the
    /// authenticated account's own messages.
    pub fn body(&self, blob: u64) -> Result<Option<Vec<u8>>> {
        self.store.bodies().read_all(blob)
    }

    /// A whole message (prefix and body) by account, mailbox and UID, in memory: for tests and
    /// small messages; servers use [`MailStore::open_message`]. `None` if there is no such
    /// message.
    pub fn message_body(&self, account: &str, mailbox: &str, uid: u32) -> Result<Option<Vec<u8>>> {
        let Some(meta) = self.message(account, mailbox, uid)? else {
            return Ok(None);
        };
        let Some(mut reader) = self.open_message(&meta)? else {
            return Ok(None);
        };
        let mut out = Vec::with_capacity(meta.size as usize);
        std::io::Read::read_to_end(&mut reader, &mut out)?;
        Ok(Some(out))
    }

    /// A message as a stream: its prefix, then its body. `None` if the body is gone (the
    /// message was expunged meanwhile). Reads are blocking file reads of the caller's size.
    pub fn open_message(&self, meta: &MessageMeta) -> Result<Option<MessageReader>> {
        Ok(self
            .store
            .bodies()
            .open(meta.blob)?
            .map(|body| MessageReader::new(meta.prefix.as_bytes().to_vec(), body)))
    }

    /// `len` octets of a message (prefix and body) from `start`, fewer at its end (IMAP partial
    /// `BODY[]<start.len>`). The caller bounds `len`. `None` if the body is gone.
    pub fn read_message_range(
        &self,
        meta: &MessageMeta,
        start: u64,
        len: usize,
    ) -> Result<Option<Vec<u8>>> {
        let prefix = meta.prefix.as_bytes();
        let mut out = Vec::new();
        let mut start = start;
        let mut len = len;
        if (start as usize) < prefix.len() {
            let s = start as usize;
            let e = (s + len).min(prefix.len());
            out.extend_from_slice(&prefix[s..e]);
            len -= e - s;
            start = prefix.len() as u64;
        }
        let body_start = start - prefix.len() as u64;
        if len == 0 {
            // Still report a vanished body.
            return Ok(self.store.bodies().open(meta.blob)?.map(|_| out));
        }
        match self.store.bodies().read_range(meta.blob, body_start, len)? {
            None => Ok(None),
            Some(rest) => {
                out.extend_from_slice(&rest);
                Ok(Some(out))
            }
        }
    }

    /// Changes the flags of the given messages (IMAP `STORE`); UIDs that do not exist are
    /// skipped. Messages whose flags actually change get a new modseq (one per call). Returns
    /// the resulting metadata of every message found, in UID order.
    pub fn store_flags(
        &self,
        account: &str,
        mailbox: &str,
        uids: &[u32],
        op: FlagOp,
        flags: &[String],
    ) -> Result<Vec<MessageMeta>> {
        // No message can have changed after the highest mod-sequence: nothing is refused.
        self.store_flags_unchanged_since(account, mailbox, uids, op, flags, u64::MAX)
            .map(|(found, _refused)| found)
    }

    fn flags_of_one(
        &self,
        account: &str,
        mailbox: &str,
        uid: u32,
        op: FlagOp,
        flags: &[String],
    ) -> Result<MessageMeta> {
        self.store_flags(account, mailbox, &[uid], op, flags)?
            .pop()
            .ok_or_else(|| Error::NotFound(format!("no message {uid} in {mailbox:?}")))
    }

    /// Replaces a message's flags. `NotFound` if there is no such message.
    pub fn set_flags(
        &self,
        account: &str,
        mailbox: &str,
        uid: u32,
        flags: &[String],
    ) -> Result<MessageMeta> {
        self.flags_of_one(account, mailbox, uid, FlagOp::Replace, flags)
    }

    /// Adds flags to a message. `NotFound` if there is no such message.
    pub fn add_flags(
        &self,
        account: &str,
        mailbox: &str,
        uid: u32,
        flags: &[String],
    ) -> Result<MessageMeta> {
        self.flags_of_one(account, mailbox, uid, FlagOp::Add, flags)
    }

    /// Removes flags from a message. `NotFound` if there is no such message.
    pub fn remove_flags(
        &self,
        account: &str,
        mailbox: &str,
        uid: u32,
        flags: &[String],
    ) -> Result<MessageMeta> {
        self.flags_of_one(account, mailbox, uid, FlagOp::Remove, flags)
    }

    /// Removes the given messages (UIDs that do not exist are skipped) and releases their
    /// bodies. Returns the removed UIDs in ascending order (for `EXPUNGE`/`VANISHED`).
    pub fn expunge(&self, account: &str, mailbox: &str, uids: &[u32]) -> Result<Vec<u32>> {
        self.expunge_where(account, mailbox, uids, false)
    }

    /// Removes the messages flagged `\Deleted` (IMAP `EXPUNGE`/`CLOSE`); returns their UIDs.
    pub fn expunge_deleted(&self, account: &str, mailbox: &str) -> Result<Vec<u32>> {
        let uids = self
            .messages(account, mailbox)?
            .into_iter()
            .filter(|m| m.has_flag("\\Deleted"))
            .map(|m| m.uid)
            .collect::<Vec<_>>();
        self.expunge_where(account, mailbox, &uids, true)
    }

    fn expunge_where(
        &self,
        account: &str,
        mailbox: &str,
        uids: &[u32],
        only_deleted: bool,
    ) -> Result<Vec<u32>> {
        let name = canonical_name(mailbox);
        let key = mailbox_key(account, &name);
        let mut uids = uids.to_vec();
        uids.sort_unstable();
        uids.dedup();
        self.transact(|tx| {
            transfer::check_open(tx.mailboxes, account)?;
            let mut info = tx
                .mailbox(&key)?
                .ok_or_else(|| abort(not_found(account, &name)))?;
            let mut removed = Vec::with_capacity(uids.len());
            for &uid in &uids {
                let Some(meta) = tx.message(info.id, uid)? else {
                    continue;
                };
                if only_deleted && !meta.has_flag("\\Deleted") {
                    continue;
                }
                tx.drop_message(&mut info, &meta)?;
                removed.push(uid);
            }
            if !removed.is_empty() {
                info.highest_modseq += 1;
                tx.put_mailbox(&key, &info)?;
            }
            Ok(removed)
        })
        .inspect(|removed| self.expunged(account, &name, removed))
    }

    /// Copies messages to another (or the same) mailbox, sharing their bodies. Returns the
    /// `(source uid, new uid)` pairs in source UID order (UIDPLUS `COPYUID`); the target's
    /// UIDVALIDITY is in [`MailStore::mailbox`]. UIDs that do not exist are skipped.
    /// `NotFound` if either mailbox does not exist.
    pub fn copy(
        &self,
        account: &str,
        from: &str,
        uids: &[u32],
        to: &str,
    ) -> Result<Vec<(u32, u32)>> {
        self.copy_or_move(account, from, uids, to, false)
    }

    /// Moves messages atomically (copy and expunge in one transaction, RFC 6851); returns the
    /// `(source uid, new uid)` pairs like [`MailStore::copy`].
    pub fn move_messages(
        &self,
        account: &str,
        from: &str,
        uids: &[u32],
        to: &str,
    ) -> Result<Vec<(u32, u32)>> {
        self.copy_or_move(account, from, uids, to, true)
    }

    fn copy_or_move(
        &self,
        account: &str,
        from: &str,
        uids: &[u32],
        to: &str,
        remove_source: bool,
    ) -> Result<Vec<(u32, u32)>> {
        let from = canonical_name(from);
        let to = canonical_name(to);
        let from_key = mailbox_key(account, &from);
        let to_key = mailbox_key(account, &to);
        let mut uids = uids.to_vec();
        uids.sort_unstable();
        uids.dedup();
        self.transact(|tx| {
            transfer::check_open(tx.mailboxes, account)?;
            let source = tx
                .mailbox(&from_key)?
                .ok_or_else(|| abort(not_found(account, &from)))?;
            let mut target = tx
                .mailbox(&to_key)?
                .ok_or_else(|| abort(not_found(account, &to)))?;
            let mut found = Vec::with_capacity(uids.len());
            for &uid in &uids {
                if let Some(meta) = tx.message(source.id, uid)? {
                    found.push(meta);
                }
            }
            if found.is_empty() {
                return Ok(Vec::new());
            }
            target.highest_modseq += 1;
            let mut pairs = Vec::with_capacity(found.len());
            for meta in &found {
                let mut copy = meta.clone();
                tx.add_message(&mut target, &mut copy)?;
                tx.retain_blob(meta.blob)?;
                pairs.push((meta.uid, copy.uid));
            }
            tx.put_mailbox(&to_key, &target)?;
            if remove_source {
                // Re-read: the source may be the target just written.
                let mut source = tx
                    .mailbox(&from_key)?
                    .ok_or_else(|| abort(not_found(account, &from)))?;
                for meta in &found {
                    tx.drop_message(&mut source, meta)?;
                }
                source.highest_modseq += 1;
                tx.put_mailbox(&from_key, &source)?;
            }
            Ok(pairs)
        })
        .inspect(|pairs| {
            self.changed(account, &to);
            if remove_source {
                let gone: Vec<u32> = pairs.iter().map(|p| p.0).collect();
                self.expunged(account, &from, &gone);
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "info@company.com";

    fn flags(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn mail() -> (Store, MailStore) {
        let store = Store::temporary().unwrap();
        let mail = MailStore::new(&store).unwrap();
        mail.ensure_account(A).unwrap();
        (store, mail)
    }

    /// #13 point 13: a delivery that located the account before `account del` and runs after
    /// it creates nothing, and a new account of that name starts empty.
    #[test]
    fn a_delivery_racing_account_deletion_recreates_nothing() {
        let (store, mail) = mail();
        mail.deliver(A, b"Subject: old\r\n\r\nold\r\n").unwrap();
        mail.delete_account(A).unwrap();
        assert!(matches!(
            mail.deliver(A, b"Subject: late\r\n\r\nlate\r\n"),
            Err(Error::NotFound(_))
        ));
        let staged = store.bodies().stage(b"late too\r\n").unwrap();
        let body = staged.body();
        let queued = QueueStore::new(&store).unwrap();
        assert!(
            mail.deliver_and_queue(
                &staged,
                &[(A.to_string(), String::new())],
                Some((&queued, vec![]))
            )
            .is_err()
        );
        drop(staged);
        assert!(mail.deliver_stored(A, "", &body, None).is_err());
        assert!(
            mail.ensure_account(A).is_err(),
            "a login does not bring it back"
        );
        assert!(mail.create_mailbox(A, "Archive", None).is_err());
        assert!(mail.list_mailboxes(A).unwrap().is_empty());
        // A new account of that name starts empty, with its defaults, and takes mail.
        mail.create_account(A).unwrap();
        assert!(mail.messages(A, INBOX).unwrap().is_empty());
        assert_eq!(mail.list_mailboxes(A).unwrap().len(), 5);
        mail.deliver(A, b"Subject: new\r\n\r\nnew\r\n").unwrap();
        assert_eq!(mail.messages(A, INBOX).unwrap().len(), 1);
        // Deleting it again removes the tombstone's successor too.
        mail.delete_account(A).unwrap();
        assert!(mail.list_mailboxes(A).unwrap().is_empty());
    }

    #[test]
    fn ensure_account_creates_defaults_once() {
        let (_store, mail) = mail();
        mail.ensure_account(A).unwrap();
        let list = mail.list_mailboxes(A).unwrap();
        let names: Vec<_> = list.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["INBOX", "Drafts", "Junk", "Sent", "Trash"]);
        let sent = mail.mailbox(A, "Sent").unwrap().unwrap();
        assert_eq!(sent.special_use.as_deref(), Some("\\Sent"));
        assert!(sent.subscribed);
        assert!(mail.mailbox(A, "inbox").unwrap().is_some());
        assert!(mail.mailbox(A, "sent").unwrap().is_none());
        // A deleted default stays deleted; INBOX is always there.
        mail.delete_mailbox(A, "Junk").unwrap();
        mail.ensure_account(A).unwrap();
        assert!(mail.mailbox(A, "Junk").unwrap().is_none());
        assert!(matches!(
            mail.delete_mailbox(A, "Inbox"),
            Err(Error::Conflict(_))
        ));
        // Distinct UIDVALIDITY per mailbox.
        let mut v: Vec<_> = list.iter().map(|m| m.uidvalidity).collect();
        v.sort_unstable();
        v.dedup();
        assert_eq!(v.len(), list.len());
    }

    #[test]
    fn append_and_fetch_binary_bodies_byte_exact() {
        let (_store, mail) = mail();
        let bodies: Vec<Vec<u8>> = vec![
            b"Subject: hi\r\n\r\nline\r\n.\r\n".to_vec(),
            vec![0, 1, 2, 0xff, b'\r', b'\n', 0x80, 0, b'\n', b'\r'],
            (0..=255u8).cycle().take(70_000).collect(),
            Vec::new(),
        ];
        let inbox = mail.mailbox(A, INBOX).unwrap().unwrap();
        for (i, body) in bodies.iter().enumerate() {
            let (validity, uid) = mail
                .append(
                    A,
                    "inbox",
                    body,
                    &flags(&["\\seen", "$Label"]),
                    1_000 + i as i64,
                )
                .unwrap();
            assert_eq!(validity, inbox.uidvalidity);
            assert_eq!(uid, i as u32 + 1);
        }
        let list = mail.messages(A, INBOX).unwrap();
        assert_eq!(list.len(), bodies.len());
        for (meta, body) in list.iter().zip(&bodies) {
            assert_eq!(meta.size, body.len() as u64);
            assert_eq!(meta.flags, flags(&["\\Seen", "$Label"]));
            assert_eq!(mail.body(meta.blob).unwrap().as_ref(), Some(body));
            assert_eq!(
                mail.message_body(A, INBOX, meta.uid).unwrap().as_ref(),
                Some(body)
            );
        }
        assert_eq!(list[1].internal_date, 1_001);
        assert_eq!(mail.message(A, INBOX, 2).unwrap().unwrap(), list[1]);
        assert_eq!(mail.message(A, INBOX, 99).unwrap(), None);
        let info = mail.mailbox(A, INBOX).unwrap().unwrap();
        assert_eq!((info.messages, info.unseen, info.uidnext), (4, 0, 5));
        assert!(matches!(
            mail.append(A, "Nope", b"x", &[], 0),
            Err(Error::NotFound(_))
        ));
        let uid = mail.deliver(A, b"delivered").unwrap();
        assert_eq!(uid, 5);
        let info = mail.mailbox(A, INBOX).unwrap().unwrap();
        assert_eq!((info.messages, info.unseen), (5, 1));
    }

    #[test]
    fn one_body_for_many_recipients_each_with_its_prefix() {
        let (store, mail) = mail();
        let queue = QueueStore::new(&store).unwrap();
        let body: Vec<u8> = b"Subject: shared\n\nbare lf\n"
            .iter()
            .copied()
            .chain((0..100_000).map(|i| b'a' + (i % 26) as u8))
            .collect();
        let staged = store.bodies().stage(&body).unwrap();
        let local = vec![
            (
                A.to_string(),
                "Return-Path: <s@x>\r\nReceived: for a\r\n".to_string(),
            ),
            (
                "b@company.com".to_string(),
                "Received: for b\r\n".to_string(),
            ),
        ];
        let entry = QueueEntry {
            id: 0,
            sender: "s@x".into(),
            recipients: vec![crate::queue::QueuedRecipient::new("c@company.com")],
            created: 1,
            next_attempt: 1,
            attempts: 0,
            last_error: None,
            size: 0,
            hop: false,
            envid: None,
            ret: None,
            delay_warned: false,
            body: None,
            prefix: String::new(),
        };
        let (uids, ids) = mail
            .deliver_and_queue(
                &staged,
                &local,
                Some((&queue, vec![(entry, "Received: queued\r\n".to_string())])),
            )
            .unwrap();
        assert_eq!((uids, ids.len()), (vec![1, 1], 1));
        let id = staged.body().id;
        drop(staged);
        assert_eq!(store.bodies().refs(id).unwrap(), 3);
        assert_eq!(queue.due(1).unwrap().len(), 1);
        for (account, prefix) in &local {
            let meta = mail.message(account, INBOX, 1).unwrap().unwrap();
            let mut whole = prefix.as_bytes().to_vec();
            whole.extend_from_slice(&body);
            assert_eq!(meta.size, whole.len() as u64);
            assert_eq!(meta.pop3_size, whole.len() as u64 + 3 + 2);
            assert_eq!(
                mail.message_body(account, INBOX, 1).unwrap().unwrap(),
                whole
            );
            let p = prefix.len() as u64;
            for (start, len) in [
                (0, 5),
                (p - 2, 6),
                (p + 1000, 70_000),
                (whole.len() as u64 - 4, 9),
            ] {
                let got = mail.read_message_range(&meta, start, len).unwrap().unwrap();
                let end = (start as usize + len).min(whole.len());
                assert_eq!(got, &whole[start as usize..end]);
            }
        }
        let queued = queue.body(ids[0]).unwrap().unwrap();
        assert!(queued.starts_with(b"Received: queued\r\nSubject: shared\n"));
        // Releasing all three frees the body.
        mail.expunge(A, INBOX, &[1]).unwrap();
        mail.expunge("b@company.com", INBOX, &[1]).unwrap();
        assert!(mail.body(id).unwrap().is_some());
        queue.remove(ids[0]).unwrap();
        assert_eq!(store.bodies().reap().unwrap(), 1);
        assert!(mail.body(id).unwrap().is_none());
    }

    #[test]
    fn deliver_provisions_new_account() {
        let store = Store::temporary().unwrap();
        let mail = MailStore::new(&store).unwrap();
        assert_eq!(mail.deliver("new@company.com", b"x").unwrap(), 1);
        assert_eq!(mail.list_mailboxes("new@company.com").unwrap().len(), 5);
        assert!(mail.list_mailboxes(A).unwrap().is_empty());
    }

    #[test]
    fn uids_are_monotonic_across_expunge_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let validity;
        {
            let store = Store::open(dir.path()).unwrap();
            let mail = MailStore::new(&store).unwrap();
            mail.ensure_account(A).unwrap();
            for _ in 0..3 {
                mail.deliver(A, b"m").unwrap();
            }
            assert_eq!(mail.expunge(A, INBOX, &[3, 2, 42]).unwrap(), vec![2, 3]);
            validity = mail.mailbox(A, INBOX).unwrap().unwrap().uidvalidity;
            store.flush().unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let mail = MailStore::new(&store).unwrap();
        let info = mail.mailbox(A, INBOX).unwrap().unwrap();
        assert_eq!(
            (info.uidvalidity, info.uidnext, info.messages),
            (validity, 4, 1)
        );
        assert_eq!(mail.deliver(A, b"n").unwrap(), 4);
        let uids: Vec<_> = mail
            .messages(A, INBOX)
            .unwrap()
            .iter()
            .map(|m| m.uid)
            .collect();
        assert_eq!(uids, [1, 4]);
    }

    #[test]
    fn recreated_mailbox_gets_new_uidvalidity() {
        let (_store, mail) = mail();
        let first = mail.create_mailbox(A, "Work", None).unwrap();
        mail.append(A, "Work", b"x", &[], 0).unwrap();
        mail.delete_mailbox(A, "Work").unwrap();
        let second = mail.create_mailbox(A, "Work", None).unwrap();
        assert!(second.uidvalidity > first.uidvalidity);
        assert_ne!(second.id, first.id);
        assert!(mail.messages(A, "Work").unwrap().is_empty());
        assert!(matches!(
            mail.create_mailbox(A, "Work", None),
            Err(Error::Conflict(_))
        ));
        assert!(matches!(
            mail.create_mailbox(A, "a//b", None),
            Err(Error::Conflict(_))
        ));
    }

    #[test]
    fn create_makes_parents_and_rename_moves_inferiors() {
        let (_store, mail) = mail();
        mail.create_mailbox(A, "Projects/2024/Q1", None).unwrap();
        assert!(mail.mailbox(A, "Projects").unwrap().is_some());
        assert!(mail.mailbox(A, "Projects/2024").unwrap().is_some());
        let (_, uid) = mail.append(A, "Projects/2024/Q1", b"q1", &[], 0).unwrap();
        let before = mail.mailbox(A, "Projects/2024/Q1").unwrap().unwrap();
        mail.rename_mailbox(A, "Projects", "Archive/Old").unwrap();
        assert!(mail.mailbox(A, "Projects").unwrap().is_none());
        assert!(mail.mailbox(A, "Projects/2024/Q1").unwrap().is_none());
        assert!(mail.mailbox(A, "Archive").unwrap().is_some());
        let after = mail.mailbox(A, "Archive/Old/2024/Q1").unwrap().unwrap();
        assert_eq!(
            (after.id, after.uidvalidity),
            (before.id, before.uidvalidity)
        );
        assert_eq!(
            mail.message_body(A, "Archive/Old/2024/Q1", uid).unwrap(),
            Some(b"q1".to_vec())
        );
        assert!(matches!(
            mail.rename_mailbox(A, "Sent", "Drafts"),
            Err(Error::Conflict(_))
        ));
        assert!(matches!(
            mail.rename_mailbox(A, "Missing", "Other"),
            Err(Error::NotFound(_))
        ));
    }

    #[test]
    fn renaming_inbox_moves_messages_and_leaves_empty_inbox() {
        let (_store, mail) = mail();
        mail.deliver(A, b"one").unwrap();
        mail.deliver(A, b"two").unwrap();
        let old = mail.mailbox(A, INBOX).unwrap().unwrap();
        mail.rename_mailbox(A, "inbox", "Old Mail").unwrap();
        let moved = mail.mailbox(A, "Old Mail").unwrap().unwrap();
        assert_eq!(
            (moved.uidvalidity, moved.messages, moved.uidnext),
            (old.uidvalidity, 2, 3)
        );
        let bodies: Vec<_> = mail
            .messages(A, "Old Mail")
            .unwrap()
            .iter()
            .map(|m| mail.body(m.blob).unwrap().unwrap())
            .collect();
        assert_eq!(bodies, [b"one".to_vec(), b"two".to_vec()]);
        let inbox = mail.mailbox(A, INBOX).unwrap().unwrap();
        assert_eq!((inbox.messages, inbox.uidnext), (0, 1));
        assert_ne!(inbox.uidvalidity, old.uidvalidity);
        assert!(mail.messages(A, INBOX).unwrap().is_empty());
        assert_eq!(mail.list_mailboxes(A).unwrap()[0].name, INBOX);
        assert_eq!(mail.deliver(A, b"three").unwrap(), 1);
        assert!(matches!(
            mail.rename_mailbox(A, "Sent", "INBOX"),
            Err(Error::Conflict(_))
        ));
    }

    #[test]
    fn copy_shares_blob_and_survives_source_expunge() {
        let (_store, mail) = mail();
        let (_, uid) = mail
            .append(A, INBOX, b"shared\0body\r\n", &flags(&["\\Flagged"]), 7)
            .unwrap();
        mail.append(A, "Trash", b"t", &[], 0).unwrap();
        let pairs = mail.copy(A, INBOX, &[uid, 99], "Trash").unwrap();
        assert_eq!(pairs, [(uid, 2)]);
        let src = mail.message(A, INBOX, uid).unwrap().unwrap();
        let dst = mail.message(A, "Trash", 2).unwrap().unwrap();
        assert_eq!(src.blob, dst.blob);
        assert_eq!(
            (dst.flags.clone(), dst.internal_date),
            (src.flags.clone(), 7)
        );
        assert_eq!(mail.expunge(A, INBOX, &[uid]).unwrap(), [uid]);
        assert_eq!(
            mail.body(dst.blob).unwrap(),
            Some(b"shared\0body\r\n".to_vec())
        );
        assert_eq!(mail.expunge(A, "Trash", &[2]).unwrap(), [2]);
        assert_eq!(mail.body(dst.blob).unwrap(), None);
        assert!(matches!(
            mail.copy(A, INBOX, &[1], "Nope"),
            Err(Error::NotFound(_))
        ));
    }

    #[test]
    fn move_is_copy_plus_expunge() {
        let (_store, mail) = mail();
        for _ in 0..3 {
            mail.deliver(A, b"m").unwrap();
        }
        let pairs = mail.move_messages(A, INBOX, &[1, 3], "Junk").unwrap();
        assert_eq!(pairs, [(1, 1), (3, 2)]);
        let inbox = mail.mailbox(A, INBOX).unwrap().unwrap();
        let junk = mail.mailbox(A, "Junk").unwrap().unwrap();
        assert_eq!((inbox.messages, inbox.unseen), (1, 1));
        assert_eq!((junk.messages, junk.unseen, junk.uidnext), (2, 2, 3));
        let m = mail.message(A, "Junk", 2).unwrap().unwrap();
        assert_eq!(mail.body(m.blob).unwrap(), Some(b"m".to_vec()));
        // Moving within one mailbox renumbers.
        assert_eq!(
            mail.move_messages(A, "Junk", &[1], "Junk").unwrap(),
            [(1, 3)]
        );
        let uids: Vec<_> = mail
            .messages(A, "Junk")
            .unwrap()
            .iter()
            .map(|m| m.uid)
            .collect();
        assert_eq!(uids, [2, 3]);
        assert_eq!(mail.mailbox(A, "Junk").unwrap().unwrap().messages, 2);
        let m = mail.message(A, "Junk", 3).unwrap().unwrap();
        assert_eq!(mail.body(m.blob).unwrap(), Some(b"m".to_vec()));
    }

    #[test]
    fn flags_bump_modseq_and_track_unseen() {
        let (_store, mail) = mail();
        mail.deliver(A, b"a").unwrap();
        mail.deliver(A, b"b").unwrap();
        let start = mail.mailbox(A, INBOX).unwrap().unwrap();
        assert_eq!(start.unseen, 2);
        let m = mail.add_flags(A, INBOX, 1, &flags(&["\\SEEN"])).unwrap();
        assert_eq!(m.flags, flags(&["\\Seen"]));
        assert!(m.modseq > start.highest_modseq);
        let info = mail.mailbox(A, INBOX).unwrap().unwrap();
        assert_eq!((info.unseen, info.highest_modseq), (1, m.modseq));
        // No change: no new modseq.
        let same = mail.add_flags(A, INBOX, 1, &flags(&["\\Seen"])).unwrap();
        assert_eq!(same.modseq, m.modseq);
        let m2 = mail
            .set_flags(A, INBOX, 1, &flags(&["\\Flagged", "\\Deleted", "\\Recent"]))
            .unwrap();
        assert_eq!(m2.flags, flags(&["\\Flagged", "\\Deleted"]));
        assert!(m2.modseq > m.modseq);
        assert_eq!(mail.mailbox(A, INBOX).unwrap().unwrap().unseen, 2);
        let m3 = mail
            .remove_flags(A, INBOX, 1, &flags(&["\\flagged"]))
            .unwrap();
        assert_eq!(m3.flags, flags(&["\\Deleted"]));
        let changed: Vec<_> = mail
            .changed_since(A, INBOX, m.modseq)
            .unwrap()
            .iter()
            .map(|m| m.uid)
            .collect();
        assert_eq!(changed, [1]);
        assert!(matches!(
            mail.set_flags(A, INBOX, 9, &[]),
            Err(Error::NotFound(_))
        ));
        let before = mail.mailbox(A, INBOX).unwrap().unwrap().highest_modseq;
        assert_eq!(mail.expunge_deleted(A, INBOX).unwrap(), [1]);
        let info = mail.mailbox(A, INBOX).unwrap().unwrap();
        assert!(info.highest_modseq > before);
        assert_eq!((info.messages, info.unseen), (1, 1));
    }

    #[test]
    fn delete_account_removes_everything() {
        let (store, mail) = mail();
        let other = "other@company.com";
        mail.deliver(other, b"keep").unwrap();
        let (_, uid) = mail.append(A, "Sent", b"s", &[], 0).unwrap();
        mail.deliver(A, b"x").unwrap();
        mail.copy(A, "Sent", &[uid], INBOX).unwrap();
        mail.delete_account(A).unwrap();
        assert!(mail.list_mailboxes(A).unwrap().is_empty());
        assert_eq!(mail.list_mailboxes(other).unwrap().len(), 5);
        assert_eq!(mail.messages(other, INBOX).unwrap().len(), 1);
        assert_eq!(store.tree(BLOBS).unwrap().len(), 1);
        assert_eq!(store.tree(BLOB_REFS).unwrap().len(), 1);
        assert_eq!(store.tree(MESSAGES).unwrap().len(), 1);
        // The account can come back as a new one, provisioned afresh.
        mail.create_account(A).unwrap();
        assert_eq!(mail.list_mailboxes(A).unwrap().len(), 5);
    }

    #[test]
    fn subscribe_toggles() {
        let (_store, mail) = mail();
        let created = mail.create_mailbox(A, "Lists", None).unwrap();
        assert!(!created.subscribed);
        mail.subscribe(A, "Lists", true).unwrap();
        assert!(mail.mailbox(A, "Lists").unwrap().unwrap().subscribed);
        mail.subscribe(A, "Lists", false).unwrap();
        assert!(!mail.mailbox(A, "Lists").unwrap().unwrap().subscribed);
        assert!(matches!(
            mail.subscribe(A, "Nope", true),
            Err(Error::NotFound(_))
        ));
    }

    #[test]
    fn concurrent_appends_get_distinct_uids() {
        let (_store, mail) = mail();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let mail = mail.clone();
                std::thread::spawn(move || {
                    (0..25)
                        .map(|i| mail.deliver(A, format!("{t}-{i}").as_bytes()).unwrap())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut uids: Vec<u32> = threads
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        uids.sort_unstable();
        assert_eq!(uids, (1..=100).collect::<Vec<_>>());
        let info = mail.mailbox(A, INBOX).unwrap().unwrap();
        assert_eq!((info.messages, info.uidnext, info.unseen), (100, 101, 100));
        assert_eq!(mail.messages(A, INBOX).unwrap().len(), 100);
    }
}
