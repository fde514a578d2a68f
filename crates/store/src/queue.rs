//! The durable outbound queue: messages waiting to be relayed to the peer node that owns
//! their recipients.
//!
//! Layout: `queue` maps the entry id (u64 BE) to a JSON [`QueueEntry`], which references its
//! body in [`crate::Bodies`] (shared with the local recipients of the same message) and keeps
//! its own prefix (the `Received` line). An entry and its body reference are written and
//! removed together in one transaction. Nothing here flushes: the SMTP server calls
//! [`Store::flush_async`] before it answers `250` to the message it queued. (Schema 1 kept
//! bodies in `queue_bodies`; the migration moves them.)

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};

use crate::body::{BodyRef, BodyTx, DEAD_TREE, INLINE_TREE, MessageReader, REFS_TREE};
use crate::{Error, Result, StagedBody, Store, Table};

pub(crate) const ENTRIES: &str = "queue";
/// Ids of entries the operator holds (`dshare queue hold`): kept, never due, until released.
pub(crate) const HELD: &str = "queue_held";
/// Schema 1's bodies; read only by the migration.
pub(crate) const V1_BODIES: &str = "queue_bodies";

/// What has become of one recipient of a queued message.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum RecipientState {
    /// Not delivered yet; retried at the entry's `next_attempt`.
    Pending,
    Delivered,
    /// Permanently failed, with the reason (for the DSN).
    Failed(String),
}

/// RFC 3461 `NOTIFY` of one recipient: which DSNs its sender asked for (`NEVER`: none).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Notify {
    pub success: bool,
    pub failure: bool,
    pub delay: bool,
}

/// RFC 3461 parameters of one recipient (`NOTIFY`, `ORCPT`); empty when none were given.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct RcptDsn {
    /// `None`: not given (a failure and a delay DSN are sent, no success DSN).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify: Option<Notify>,
    /// `ORCPT=rfc822;` address, decoded from xtext.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub orcpt: Option<String>,
}

impl RcptDsn {
    pub fn is_empty(&self) -> bool {
        self.notify.is_none() && self.orcpt.is_none()
    }

    /// A failure DSN is wanted (the default).
    pub fn wants_failure(&self) -> bool {
        self.notify.is_none_or(|n| n.failure)
    }

    /// A delay DSN is wanted (the default).
    pub fn wants_delay(&self) -> bool {
        self.notify.is_none_or(|n| n.delay)
    }

    /// A success DSN is wanted (only when asked for).
    pub fn wants_success(&self) -> bool {
        self.notify.is_some_and(|n| n.success)
    }
}

/// RFC 3461 `RET`: what a failure DSN returns of the message.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ret {
    /// The whole message.
    Full,
    /// Its header section only.
    Hdrs,
}

/// One recipient of a queued message.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct QueuedRecipient {
    pub address: String,
    /// The node that owns the recipient, once located.
    pub owner: Option<String>,
    /// The owner's SMTP endpoint, once located.
    pub endpoint: Option<String>,
    pub state: RecipientState,
    /// DSN parameters given with the recipient (entries written before they existed have none).
    #[serde(default, skip_serializing_if = "RcptDsn::is_empty")]
    pub dsn: RcptDsn,
}

impl QueuedRecipient {
    /// A pending recipient whose owner is not known yet.
    pub fn new(address: impl Into<String>) -> Self {
        Self {
            address: address.into(),
            owner: None,
            endpoint: None,
            state: RecipientState::Pending,
            dsn: RcptDsn::default(),
        }
    }

    /// A pending recipient located at `owner`'s `endpoint`.
    pub fn located(address: impl Into<String>, owner: &str, endpoint: &str) -> Self {
        Self {
            owner: Some(owner.to_string()),
            endpoint: Some(endpoint.to_string()),
            ..Self::new(address)
        }
    }
}

/// A queued message (the body is stored separately, see [`QueueStore::body`]).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct QueueEntry {
    /// Assigned by [`QueueStore::enqueue`]; increases with time.
    pub id: u64,
    /// The reverse-path; empty for bounces.
    pub sender: String,
    pub recipients: Vec<QueuedRecipient>,
    /// Unix seconds.
    pub created: i64,
    /// Unix seconds; the entry is due when this is not after now.
    pub next_attempt: i64,
    pub attempts: u32,
    pub last_error: Option<String>,
    /// Message size in bytes (prefix and body).
    pub size: u64,
    /// The message was itself relayed by a peer: never forward it again.
    pub hop: bool,
    /// DSN envelope id (RFC 3461 `ENVID`).
    pub envid: Option<String>,
    /// RFC 3461 `RET` of the message, if given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ret: Option<Ret>,
    /// A delay DSN was sent for it (sent once).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub delay_warned: bool,
    /// The stored body (set by the store when the entry is queued).
    #[serde(default)]
    pub body: Option<BodyRef>,
    /// Lines sent before the body (this node's `Received`); ends with CRLF or is empty.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub prefix: String,
}

impl QueueEntry {
    /// A new entry from `sender` to `recipients`, due at `now`; the id, size and body are set
    /// when it is stored.
    pub fn new(sender: impl Into<String>, recipients: Vec<QueuedRecipient>, now: i64) -> Self {
        Self {
            id: 0,
            sender: sender.into(),
            recipients,
            created: now,
            next_attempt: now,
            attempts: 0,
            last_error: None,
            size: 0,
            hop: false,
            envid: None,
            ret: None,
            delay_warned: false,
            body: None,
            prefix: String::new(),
        }
    }

    /// Recipients still waiting for delivery.
    pub fn pending(&self) -> impl Iterator<Item = &QueuedRecipient> {
        self.recipients
            .iter()
            .filter(|r| r.state == RecipientState::Pending)
    }

    /// No recipient is pending any more.
    pub fn is_finished(&self) -> bool {
        self.pending().next().is_none()
    }
}

/// The in-memory schedule, rebuilt from disk at start: due entries, the next due time and the
/// length without scanning the queue. Every change to an entry's `next_attempt`, hold or
/// claim writes the database and this under one lock, so the two never disagree (an
/// operator's retry racing the runner left a stale second slot that made the entry due twice
/// and relayed it twice: #13 point 15).
#[derive(Debug, Default)]
struct Schedule {
    /// `next_attempt` of every entry (held and claimed ones included): one slot per id.
    at: HashMap<u64, i64>,
    /// `(next_attempt, id)` of the entries that are neither held nor claimed.
    due: BTreeSet<(i64, u64)>,
    /// Held entry ids (see [`HELD`]): never due until released.
    held: BTreeSet<u64>,
    /// Entries a queue worker is relaying now ([`QueueStore::claim_due`]).
    claimed: HashSet<u64>,
}

impl Schedule {
    fn waiting(&self, id: u64) -> bool {
        !self.held.contains(&id) && !self.claimed.contains(&id)
    }

    /// Sets (or, with `None`, forgets) an entry's `next_attempt`.
    fn set(&mut self, id: u64, at: Option<i64>) {
        if let Some(old) = self.at.remove(&id) {
            self.due.remove(&(old, id));
        }
        if let Some(at) = at {
            self.at.insert(id, at);
            if self.waiting(id) {
                self.due.insert((at, id));
            }
        }
    }

    /// Takes an entry out of `due` (held or claimed).
    fn park(&mut self, id: u64) {
        if let Some(at) = self.at.get(&id) {
            self.due.remove(&(*at, id));
        }
    }

    /// Puts an entry back into `due` if it is waiting again.
    fn unpark(&mut self, id: u64) {
        if let Some(at) = self.at.get(&id)
            && self.waiting(id)
        {
            self.due.insert((*at, id));
        }
    }
}

/// The outbound queue. Cheap to clone; a node builds one and clones it, since the clones
/// share the in-memory schedule.
#[derive(Clone)]
pub struct QueueStore {
    store: Store,
    entries: Table<QueueEntry>,
    entries_tree: sled::Tree,
    inline: sled::Tree,
    refs: sled::Tree,
    dead: sled::Tree,
    schedule: Arc<Mutex<Schedule>>,
    /// On-disk set of held entry ids (see [`HELD`]).
    held_tree: sled::Tree,
}

/// A queue worker's claim on one entry ([`QueueStore::claim_due`]): while it lives the entry
/// is not due for anyone else and an operator's retry leaves it alone; dropping it (even by a
/// panic) makes the entry wait for its `next_attempt` again.
pub struct QueueClaim {
    queue: QueueStore,
    id: u64,
}

impl std::fmt::Debug for QueueClaim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueClaim").field("id", &self.id).finish()
    }
}

impl Drop for QueueClaim {
    fn drop(&mut self) {
        let mut s = self.queue.schedule();
        s.claimed.remove(&self.id);
        s.unpark(self.id);
    }
}

impl std::fmt::Debug for QueueStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueStore").finish_non_exhaustive()
    }
}

fn key(id: u64) -> [u8; 8] {
    id.to_be_bytes()
}

fn tx_result<T>(r: std::result::Result<T, TransactionError<Error>>) -> Result<T> {
    r.map_err(|e| match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => Error::Db(e),
    })
}

impl QueueStore {
    pub fn new(store: &Store) -> Result<QueueStore> {
        let entries: Table<QueueEntry> = store.table(ENTRIES)?;
        let held_tree = store.tree(HELD)?;
        let mut schedule = Schedule::default();
        for kv in held_tree.iter() {
            let (k, _) = kv?;
            if let Ok(b) = <[u8; 8]>::try_from(k.as_ref()) {
                schedule.held.insert(u64::from_be_bytes(b));
            }
        }
        for kv in entries.iter() {
            let (_, e) = kv?;
            schedule.set(e.id, Some(e.next_attempt));
        }
        // A hold whose entry is gone (removed before the hold was cleaned up) holds nothing.
        let at = &schedule.at;
        schedule.held.retain(|id| at.contains_key(id));
        Ok(QueueStore {
            store: store.clone(),
            entries,
            entries_tree: store.tree(ENTRIES)?,
            inline: store.tree(INLINE_TREE)?,
            refs: store.tree(REFS_TREE)?,
            dead: store.tree(DEAD_TREE)?,
            schedule: Arc::new(Mutex::new(schedule)),
            held_tree,
        })
    }

    /// Whether the operator holds entry `id` (the runner skips held entries).
    pub fn is_held(&self, id: u64) -> bool {
        self.schedule().held.contains(&id)
    }

    /// Whether a queue worker is relaying entry `id` now.
    pub fn is_claimed(&self, id: u64) -> bool {
        self.schedule().claimed.contains(&id)
    }

    /// Holds an entry: it stays queued but is never due until [`Self::release`]. Returns
    /// whether it was newly held; `NotFound` if there is no such entry. Does not flush.
    pub fn hold(&self, id: u64) -> Result<bool> {
        let mut s = self.schedule();
        if self.get(id)?.is_none() {
            return Err(Error::NotFound(format!("no queue entry {id}")));
        }
        if self.held_tree.insert(key(id), &[][..])?.is_some() {
            return Ok(false);
        }
        s.held.insert(id);
        s.park(id);
        Ok(true)
    }

    /// Releases a held entry and makes it due at once (unless a worker has it claimed).
    /// Returns whether it was held; `NotFound` if there is no such entry. Does not flush.
    pub fn release(&self, id: u64) -> Result<bool> {
        let was = {
            let mut s = self.schedule();
            let was = self.held_tree.remove(key(id))?.is_some();
            s.held.remove(&id);
            if self.get(id)?.is_none() {
                return Err(Error::NotFound(format!("no queue entry {id}")));
            }
            s.unpark(id);
            was
        };
        if was {
            self.retry_now(id)?;
        }
        Ok(was)
    }

    /// Number of held entries.
    pub fn held_len(&self) -> usize {
        self.schedule().held.len()
    }

    fn schedule(&self) -> MutexGuard<'_, Schedule> {
        self.schedule.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn entries_tree(&self) -> &sled::Tree {
        &self.entries_tree
    }

    /// Adds an entry written by another module's transaction to the schedule.
    pub(crate) fn scheduled(&self, entry: &QueueEntry) {
        self.schedule().set(entry.id, Some(entry.next_attempt));
    }

    /// When the earliest waiting entry is due, if any.
    pub fn next_due(&self) -> Option<i64> {
        self.schedule().due.first().map(|(at, _)| *at)
    }

    /// When the earliest entry not in `skip` is due, if any (the queue runner leaves out the
    /// entries it is working on).
    pub fn next_due_except(&self, skip: &std::collections::HashSet<u64>) -> Option<i64> {
        self.schedule()
            .due
            .iter()
            .find(|(_, id)| !skip.contains(id))
            .map(|(at, _)| *at)
    }

    /// Claims a due entry for relaying: `None` if it is gone, held, not due at `now`, or
    /// already claimed; else its current state (read under the claim, so never a stale copy)
    /// and the claim. While claimed, [`Self::retry_now`] leaves it alone; the worker's
    /// [`Self::update`] or [`Self::remove`] ends the attempt and dropping the claim lets the
    /// entry wait for its (new) `next_attempt`.
    pub fn claim_due(&self, id: u64, now: i64) -> Result<Option<(QueueEntry, QueueClaim)>> {
        let mut s = self.schedule();
        if !s.waiting(id) {
            return Ok(None);
        }
        let Some(entry) = self.get(id)? else {
            s.set(id, None);
            return Ok(None);
        };
        if entry.next_attempt > now {
            s.set(id, Some(entry.next_attempt));
            return Ok(None);
        }
        s.claimed.insert(id);
        s.park(id);
        let claim = QueueClaim {
            queue: self.clone(),
            id,
        };
        Ok(Some((entry, claim)))
    }

    /// Like [`Self::due`], leaving out the ids in `skip` (not even read).
    pub fn due_except(
        &self,
        now: i64,
        skip: &std::collections::HashSet<u64>,
    ) -> Result<Vec<QueueEntry>> {
        let ids: Vec<u64> = self
            .schedule()
            .due
            .range(..=(now, u64::MAX))
            .map(|(_, id)| *id)
            .filter(|id| !skip.contains(id))
            .collect();
        let mut due = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(e) = self.get(id)? {
                due.push(e);
            }
        }
        Ok(due)
    }

    /// Queues a message for its recipients, due at once. Returns the entry id.
    /// Atomic; does not flush.
    pub fn enqueue(
        &self,
        sender: &str,
        recipients: Vec<QueuedRecipient>,
        body: &[u8],
        hop: bool,
        now: i64,
    ) -> Result<u64> {
        self.enqueue_entry(
            QueueEntry {
                id: 0,
                sender: sender.to_string(),
                recipients,
                created: now,
                next_attempt: now,
                attempts: 0,
                last_error: None,
                size: 0,
                hop,
                envid: None,
                ret: None,
                delay_warned: false,
                body: None,
                prefix: String::new(),
            },
            body,
        )
    }

    /// Queues a prepared entry (e.g. with an `envid`) with the whole message as its body;
    /// `id`, `size` and `body` are assigned here. Returns the entry id. Atomic; does not flush.
    pub fn enqueue_entry(&self, entry: QueueEntry, body: &[u8]) -> Result<u64> {
        let staged = self.store.bodies().stage(body)?;
        self.enqueue_staged(entry, &staged)
    }

    /// Queues a prepared entry whose body was received through a [`crate::BodyWriter`]; the
    /// entry's `prefix` is kept. Returns the entry id. Atomic; does not flush.
    pub fn enqueue_staged(&self, mut entry: QueueEntry, body: &StagedBody) -> Result<u64> {
        if !entry.prefix.is_empty() && !entry.prefix.ends_with("\r\n") {
            return Err(Error::Conflict(
                "a message prefix must end with CRLF".into(),
            ));
        }
        let body_ref = body.body();
        entry.id = self.store.next_id()?;
        entry.size = entry.prefix.len() as u64 + body_ref.len;
        entry.body = Some(body_ref);
        let encoded = serde_json::to_vec(&entry).map_err(Error::Encode)?;
        let k = key(entry.id);
        let mut s = self.schedule();
        tx_result(
            (&self.entries_tree, &self.inline, &self.refs, &self.dead).transaction(
                |(entries, inline, refs, dead)| {
                    BodyTx { inline, refs, dead }.add_staged(body, 1)?;
                    entries.insert(&k[..], encoded.as_slice())?;
                    Ok::<_, ConflictableTransactionError<Error>>(())
                },
            ),
        )?;
        body.mark_committed();
        s.set(entry.id, Some(entry.next_attempt));
        Ok(entry.id)
    }

    pub fn get(&self, id: u64) -> Result<Option<QueueEntry>> {
        self.entries.get(key(id))
    }

    /// The whole message (prefix and body) of an entry, in memory: for tests and small
    /// messages; the relay uses [`QueueStore::open`].
    pub fn body(&self, id: u64) -> Result<Option<Vec<u8>>> {
        let Some(entry) = self.get(id)? else {
            return Ok(None);
        };
        let Some(mut reader) = self.open(&entry)? else {
            return Ok(None);
        };
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut reader, &mut out)?;
        Ok(Some(out))
    }

    /// An entry's message as a stream: its prefix, then its body. `None` if it has no body.
    pub fn open(&self, entry: &QueueEntry) -> Result<Option<MessageReader>> {
        let Some(body) = entry.body else {
            return Ok(None);
        };
        Ok(self
            .store
            .bodies()
            .open(body.id)?
            .map(|r| MessageReader::new(entry.prefix.as_bytes().to_vec(), r)))
    }

    /// Every entry, oldest first.
    pub fn list(&self) -> Result<Vec<QueueEntry>> {
        self.entries.iter().map(|kv| kv.map(|(_, v)| v)).collect()
    }

    /// Entries whose `next_attempt` is not after `now`, earliest first; reads only those.
    pub fn due(&self, now: i64) -> Result<Vec<QueueEntry>> {
        let ids: Vec<u64> = self
            .schedule()
            .due
            .range(..=(now, u64::MAX))
            .map(|(_, id)| *id)
            .collect();
        let mut due = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(e) = self.get(id)? {
                due.push(e);
            }
        }
        Ok(due)
    }

    /// Writes back an entry (after an attempt). `NotFound` if it was removed meanwhile;
    /// an update never brings a removed entry back.
    pub fn update(&self, entry: &QueueEntry) -> Result<()> {
        let mut s = self.schedule();
        let updated = self
            .entries
            .update(key(entry.id), |current| current.map(|_| entry.clone()))?;
        match updated {
            Some(_) => {
                s.set(entry.id, Some(entry.next_attempt));
                Ok(())
            }
            None => Err(Error::NotFound(format!("no queue entry {}", entry.id))),
        }
    }

    /// Drops the recipients `drop` selects from an entry that no worker is delivering,
    /// against its current stored state (an operator's `queue delete --recipient`), and
    /// removes the entry once no recipient is pending. Returns how many recipients were
    /// dropped and whether the entry went, `None` if it is gone, and `Conflict` while a
    /// worker has it claimed: the worker's own write-back would undo the change.
    pub fn drop_recipients(
        &self,
        id: u64,
        mut drop: impl FnMut(&QueuedRecipient) -> bool,
    ) -> Result<Option<(usize, bool)>> {
        let finished = {
            // Under the schedule lock no worker can claim the entry meanwhile.
            let s = self.schedule();
            if s.claimed.contains(&id) {
                return Err(Error::Conflict(format!(
                    "queued message {id} is being delivered right now; try again in a moment"
                )));
            }
            let mut dropped = 0;
            let updated = self.entries.update(key(id), |current| {
                current.map(|mut e| {
                    let before = e.recipients.len();
                    e.recipients.retain(|r| !drop(r));
                    dropped = before - e.recipients.len();
                    e
                })
            })?;
            let Some(entry) = updated else {
                return Ok(None);
            };
            (dropped, entry.is_finished())
        };
        if finished.1 {
            self.remove(id)?;
        }
        Ok(Some(finished))
    }

    /// Removes an entry and releases its body; returns the entry if it was there.
    pub fn remove(&self, id: u64) -> Result<Option<QueueEntry>> {
        let k = key(id);
        let mut s = self.schedule();
        let removed = tx_result(
            (&self.entries_tree, &self.inline, &self.refs, &self.dead).transaction(
                |(entries, inline, refs, dead)| {
                    let Some(v) = entries.remove(&k[..])? else {
                        return Ok(None);
                    };
                    let entry: QueueEntry = serde_json::from_slice(&v).map_err(|source| {
                        ConflictableTransactionError::Abort(Error::Corrupt {
                            table: ENTRIES.to_string(),
                            key: id.to_string(),
                            source,
                        })
                    })?;
                    if let Some(body) = entry.body {
                        BodyTx { inline, refs, dead }.release(body.id)?;
                    }
                    Ok::<_, ConflictableTransactionError<Error>>(Some(entry))
                },
            ),
        )?;
        if removed.is_some() {
            s.set(id, None);
            if s.held.remove(&id) {
                self.held_tree.remove(k)?;
            }
        }
        Ok(removed)
    }

    /// Makes an entry due at once; `Ok(false)` if a queue worker is relaying it right now
    /// (it reschedules the entry itself when the attempt ends; rescheduling it here would make
    /// it due twice). `NotFound` if there is no such entry. Does not flush.
    pub fn retry_now(&self, id: u64) -> Result<bool> {
        let mut s = self.schedule();
        if s.claimed.contains(&id) {
            return if self.get(id)?.is_some() {
                Ok(false)
            } else {
                Err(Error::NotFound(format!("no queue entry {id}")))
            };
        }
        let updated = self.entries.update(key(id), |current| {
            current.map(|mut e| {
                e.next_attempt = 0;
                e
            })
        })?;
        match updated {
            Some(_) => {
                s.set(id, Some(0));
                Ok(true)
            }
            None => {
                s.set(id, None);
                Err(Error::NotFound(format!("no queue entry {id}")))
            }
        }
    }

    /// Number of queued entries, held and claimed ones included (from the schedule: no scan).
    pub fn len(&self) -> usize {
        self.schedule().at.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rcpts(list: &[&str]) -> Vec<QueuedRecipient> {
        list.iter().map(|a| QueuedRecipient::new(*a)).collect()
    }

    #[test]
    fn enqueue_list_due_update_remove() {
        let store = Store::temporary().unwrap();
        let q = QueueStore::new(&store).unwrap();
        assert!(q.is_empty());
        let a = q
            .enqueue(
                "a@x.com",
                rcpts(&["b@company.com"]),
                b"body\r\n\0",
                false,
                100,
            )
            .unwrap();
        let b = q
            .enqueue(
                "",
                rcpts(&["c@company.com", "d@company.com"]),
                b"bounce",
                true,
                200,
            )
            .unwrap();
        assert!(b > a);
        assert_eq!(q.len(), 2);
        let list = q.list().unwrap();
        assert_eq!(list.iter().map(|e| e.id).collect::<Vec<_>>(), [a, b]);
        assert_eq!(list[0].size, 7);
        assert!(list[1].hop && list[1].sender.is_empty());
        assert_eq!(q.body(a).unwrap(), Some(b"body\r\n\0".to_vec()));

        assert_eq!(q.due(150).unwrap().len(), 1);
        assert_eq!(q.next_due(), Some(100));
        let mut e = q.get(a).unwrap().unwrap();
        e.attempts += 1;
        e.next_attempt = 1_000;
        e.last_error = Some("451 try later".into());
        e.recipients[0].owner = Some("node-2".into());
        e.recipients[0].state = RecipientState::Failed("550 no".into());
        q.update(&e).unwrap();
        assert_eq!(q.get(a).unwrap().unwrap(), e);
        assert!(q.get(a).unwrap().unwrap().is_finished());
        assert_eq!(
            q.due(500).unwrap().iter().map(|e| e.id).collect::<Vec<_>>(),
            [b]
        );
        assert_eq!(q.next_due(), Some(200));
        q.retry_now(a).unwrap();
        assert_eq!(q.next_due(), Some(0));
        assert_eq!(q.due(500).unwrap().len(), 2);

        assert_eq!(q.remove(a).unwrap().map(|e| e.id), Some(a));
        assert_eq!(q.body(a).unwrap(), None);
        assert_eq!(q.get(a).unwrap(), None);
        assert_eq!(q.remove(a).unwrap(), None);
        assert!(matches!(q.update(&e), Err(Error::NotFound(_))));
        assert!(q.get(a).unwrap().is_none());
        assert!(matches!(q.retry_now(a), Err(Error::NotFound(_))));
        assert_eq!(q.len(), 1);
        assert_eq!(q.next_due(), Some(200));
        assert_eq!(store.tree(INLINE_TREE).unwrap().len(), 1);
    }

    #[test]
    fn held_entries_are_never_due_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b);
        {
            let store = Store::open(dir.path()).unwrap();
            let q = QueueStore::new(&store).unwrap();
            a = q.enqueue("", rcpts(&["x@c.com"]), b"a", false, 1).unwrap();
            b = q.enqueue("", rcpts(&["y@c.com"]), b"b", false, 1).unwrap();
            assert!(q.hold(a).unwrap());
            assert!(!q.hold(a).unwrap(), "already held");
            assert!(q.is_held(a) && !q.is_held(b));
            assert_eq!(q.len(), 2);
            assert_eq!(
                q.due(10).unwrap().iter().map(|e| e.id).collect::<Vec<_>>(),
                [b]
            );
            // An attempt that ends after the hold does not make it due again.
            let mut e = q.get(a).unwrap().unwrap();
            e.next_attempt = 5;
            q.update(&e).unwrap();
            q.retry_now(a).unwrap();
            assert_eq!(q.due(10).unwrap().len(), 1);
            assert!(matches!(q.hold(999), Err(Error::NotFound(_))));
            store.flush().unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let q = QueueStore::new(&store).unwrap();
        assert!(q.is_held(a));
        assert_eq!(q.len(), 2);
        assert_eq!(q.due(10).unwrap().len(), 1);
        assert!(q.release(a).unwrap());
        assert!(!q.release(a).unwrap());
        assert_eq!(q.due(10).unwrap().len(), 2);
        q.hold(b).unwrap();
        q.remove(b).unwrap();
        assert_eq!((q.len(), q.held_len()), (1, 0));
    }

    /// #13 point 15: an operator's retry racing the end of an attempt (the runner's update)
    /// leaves the entry exactly one slot in the schedule, at the time the database has; a
    /// second slot made it due twice, and the runner relayed it twice.
    #[test]
    fn retry_racing_attempts_leaves_one_slot() {
        let store = Store::temporary().unwrap();
        let q = QueueStore::new(&store).unwrap();
        let id = q.enqueue("", rcpts(&["x@c.com"]), b"m", false, 1).unwrap();
        let entry = q.get(id).unwrap().unwrap();
        const ROUNDS: i64 = 20_000;
        std::thread::scope(|s| {
            s.spawn(|| {
                for _ in 0..ROUNDS {
                    q.retry_now(id).unwrap();
                }
            });
            s.spawn(|| {
                let mut e = entry.clone();
                for i in 0..ROUNDS {
                    e.next_attempt = 1_000_000 + i;
                    q.update(&e).unwrap();
                }
            });
        });
        let at = q.get(id).unwrap().unwrap().next_attempt;
        assert_eq!(q.len(), 1, "one entry, one slot");
        assert_eq!(q.next_due(), Some(at));
        assert_eq!(q.due(i64::MAX).unwrap().len(), 1);
    }

    /// #13 point 15: a claimed entry (a worker relays it) is neither retried nor claimed again;
    /// the worker's update decides when it is due next, and the claim reads the current state.
    #[test]
    fn a_claimed_entry_is_not_retried_nor_claimed_twice() {
        let store = Store::temporary().unwrap();
        let q = QueueStore::new(&store).unwrap();
        let id = q.enqueue("", rcpts(&["x@c.com"]), b"m", false, 10).unwrap();
        assert!(q.claim_due(id, 9).unwrap().is_none(), "not due yet");
        let (mut e, claim) = q.claim_due(id, 10).unwrap().unwrap();
        assert!(q.is_claimed(id));
        assert!(
            q.claim_due(id, 10).unwrap().is_none(),
            "one worker at a time"
        );
        assert_eq!(q.due(100).unwrap().len(), 0);
        assert_eq!(q.next_due(), None);
        // The operator's retry while it is relayed changes nothing.
        assert!(!q.retry_now(id).unwrap());
        assert_eq!(q.get(id).unwrap().unwrap().next_attempt, 10);
        // The attempt ends with a back-off.
        e.attempts = 1;
        e.next_attempt = 500;
        q.update(&e).unwrap();
        drop(claim);
        assert!(!q.is_claimed(id));
        assert_eq!((q.len(), q.next_due()), (1, Some(500)));
        assert!(q.due(100).unwrap().is_empty(), "no second attempt now");
        assert!(q.claim_due(id, 100).unwrap().is_none());
        // Retried once it is no longer claimed: due at once, and the claim reads it afresh.
        assert!(q.retry_now(id).unwrap());
        let (fresh, claim) = q.claim_due(id, 100).unwrap().unwrap();
        assert_eq!((fresh.attempts, fresh.next_attempt), (1, 0));
        // Removed under the claim (delivered): gone from the schedule when the claim ends.
        q.remove(id).unwrap();
        drop(claim);
        assert!(q.is_empty());
        assert!(q.claim_due(id, 100).unwrap().is_none());
        assert!(matches!(q.retry_now(id), Err(Error::NotFound(_))));
        // Held entries are never claimed.
        let h = q.enqueue("", rcpts(&["y@c.com"]), b"h", false, 1).unwrap();
        q.hold(h).unwrap();
        assert!(q.claim_due(h, 100).unwrap().is_none());
        q.release(h).unwrap();
        assert!(q.claim_due(h, 100).unwrap().is_some());
    }

    #[test]
    fn dropping_recipients_waits_for_a_claim_and_works_on_the_current_entry() {
        let store = Store::temporary().unwrap();
        let q = QueueStore::new(&store).unwrap();
        let id = q
            .enqueue(
                "",
                rcpts(&["a@c.com", "b@c.com", "x@d.com"]),
                b"m",
                false,
                10,
            )
            .unwrap();
        let is_c = |r: &QueuedRecipient| r.address.ends_with("@c.com");
        // A worker has it: the operator's change would be undone by its write-back.
        let (mut e, claim) = q.claim_due(id, 10).unwrap().unwrap();
        assert!(matches!(
            q.drop_recipients(id, is_c),
            Err(Error::Conflict(_))
        ));
        assert_eq!(q.get(id).unwrap().unwrap().recipients.len(), 3);
        e.attempts = 1;
        e.last_error = Some("deferred".into());
        q.update(&e).unwrap();
        drop(claim);
        // Not claimed: dropped from the stored state, the worker's update kept.
        assert_eq!(q.drop_recipients(id, is_c).unwrap(), Some((2, false)));
        let now = q.get(id).unwrap().unwrap();
        assert_eq!(now.recipients.len(), 1);
        assert_eq!(
            (now.attempts, now.last_error.as_deref()),
            (1, Some("deferred"))
        );
        // The last pending recipient dropped: the entry goes, body and all.
        assert_eq!(
            q.drop_recipients(id, |r| r.address == "x@d.com").unwrap(),
            Some((1, true))
        );
        assert!(q.get(id).unwrap().is_none() && q.is_empty());
        assert_eq!(q.drop_recipients(id, is_c).unwrap(), None);
    }

    #[test]
    fn enqueue_entry_keeps_envid() {
        let store = Store::temporary().unwrap();
        let q = QueueStore::new(&store).unwrap();
        let template = QueueEntry {
            id: 0,
            sender: "a@x.com".into(),
            recipients: rcpts(&["b@company.com"]),
            created: 5,
            next_attempt: 5,
            attempts: 0,
            last_error: None,
            size: 0,
            hop: false,
            envid: Some("ENV1".into()),
            ret: Some(Ret::Hdrs),
            delay_warned: false,
            body: None,
            prefix: String::new(),
        };
        let id = q.enqueue_entry(template, b"xyz").unwrap();
        let e = q.get(id).unwrap().unwrap();
        assert_eq!((e.envid.as_deref(), e.size, e.id), (Some("ENV1"), 3, id));
        assert_eq!(e.ret, Some(Ret::Hdrs));
    }

    #[test]
    fn entries_written_before_dsn_parameters_still_read() {
        // An entry as schema 2 wrote it, before `ret`, `delay_warned` and recipients' `dsn`.
        let old = r#"{"id":7,"sender":"a@x.com","recipients":[{"address":"b@company.com",
            "owner":null,"endpoint":null,"state":"Pending"}],"created":5,"next_attempt":5,
            "attempts":0,"last_error":null,"size":3,"hop":false,"envid":null}"#;
        let e: QueueEntry = serde_json::from_str(old).unwrap();
        assert_eq!((e.ret, e.delay_warned), (None, false));
        assert!(e.recipients[0].dsn.is_empty());
        assert!(e.recipients[0].dsn.wants_failure() && !e.recipients[0].dsn.wants_success());
        // And nothing new is written for an entry without DSN parameters.
        let json = serde_json::to_string(&e).unwrap();
        assert!(!json.contains("dsn") && !json.contains("ret"), "{json}");
        let mut e = e;
        e.recipients[0].dsn.notify = Some(Notify::default());
        let back: QueueEntry = serde_json::from_str(&serde_json::to_string(&e).unwrap()).unwrap();
        assert!(!back.recipients[0].dsn.wants_failure());
    }

    #[test]
    fn queue_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let id;
        {
            let store = Store::open(dir.path()).unwrap();
            let q = QueueStore::new(&store).unwrap();
            id = q
                .enqueue("a@x.com", rcpts(&["b@company.com"]), b"persist", false, 1)
                .unwrap();
            store.flush().unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let q = QueueStore::new(&store).unwrap();
        assert_eq!(q.len(), 1);
        assert_eq!(q.due(1).unwrap().len(), 1, "schedule rebuilt from disk");
        let e = q.get(id).unwrap().unwrap();
        assert_eq!(e.recipients[0].address, "b@company.com");
        assert_eq!(q.body(id).unwrap(), Some(b"persist".to_vec()));
        let next = q
            .enqueue("", rcpts(&["c@company.com"]), b"n", false, 2)
            .unwrap();
        assert!(next > id);
    }
}
