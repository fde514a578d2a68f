//! The durable outbound queue: messages waiting to be relayed to the peer node that owns
//! their recipients.
//!
//! Layout: `queue` maps the entry id (u64 BE) to a JSON [`QueueEntry`], which references its
//! body in [`crate::Bodies`] (shared with the local recipients of the same message) and keeps
//! its own prefix (the `Received` line). An entry and its body reference are written and
//! removed together in one transaction. Nothing here flushes: the SMTP server calls
//! [`Store::flush_async`] before it answers `250` to the message it queued. (Schema 1 kept
//! bodies in `queue_bodies`; the migration moves them.)

use std::collections::BTreeSet;
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

/// One recipient of a queued message.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct QueuedRecipient {
    pub address: String,
    /// The node that owns the recipient, once located.
    pub owner: Option<String>,
    /// The owner's SMTP endpoint, once located.
    pub endpoint: Option<String>,
    pub state: RecipientState,
}

impl QueuedRecipient {
    /// A pending recipient whose owner is not known yet.
    pub fn new(address: impl Into<String>) -> Self {
        Self {
            address: address.into(),
            owner: None,
            endpoint: None,
            state: RecipientState::Pending,
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
    /// The stored body (set by the store when the entry is queued).
    #[serde(default)]
    pub body: Option<BodyRef>,
    /// Lines sent before the body (this node's `Received`); ends with CRLF or is empty.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub prefix: String,
}

impl QueueEntry {
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
    /// `(next_attempt, id)` of every entry, rebuilt from disk at start: due entries, the
    /// next due time and the length without scanning the queue.
    schedule: Arc<Mutex<BTreeSet<(i64, u64)>>>,
    /// On-disk set of held entry ids (see [`HELD`]).
    held_tree: sled::Tree,
    /// Held entry ids: out of the schedule, so the runner never sees them as due.
    held: Arc<Mutex<BTreeSet<u64>>>,
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
        let mut held = BTreeSet::new();
        for kv in held_tree.iter() {
            let (k, _) = kv?;
            if let Ok(b) = <[u8; 8]>::try_from(k.as_ref()) {
                held.insert(u64::from_be_bytes(b));
            }
        }
        let schedule = entries
            .iter()
            .filter_map(|kv| match kv {
                Ok((_, e)) if held.contains(&e.id) => None,
                Ok((_, e)) => Some(Ok((e.next_attempt, e.id))),
                Err(e) => Some(Err(e)),
            })
            .collect::<Result<BTreeSet<_>>>()?;
        Ok(QueueStore {
            store: store.clone(),
            entries,
            entries_tree: store.tree(ENTRIES)?,
            inline: store.tree(INLINE_TREE)?,
            refs: store.tree(REFS_TREE)?,
            dead: store.tree(DEAD_TREE)?,
            schedule: Arc::new(Mutex::new(schedule)),
            held_tree,
            held: Arc::new(Mutex::new(held)),
        })
    }

    fn held_ids(&self) -> MutexGuard<'_, BTreeSet<u64>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the operator holds entry `id` (the runner skips held entries).
    pub fn is_held(&self, id: u64) -> bool {
        self.held_ids().contains(&id)
    }

    /// Holds an entry: it stays queued but is never due until [`Self::release`]. Returns
    /// whether it was newly held; `NotFound` if there is no such entry. Does not flush.
    pub fn hold(&self, id: u64) -> Result<bool> {
        let Some(entry) = self.get(id)? else {
            return Err(Error::NotFound(format!("no queue entry {id}")));
        };
        if self.held_tree.insert(key(id), &[][..])?.is_some() {
            return Ok(false);
        }
        self.held_ids().insert(id);
        self.schedule().remove(&(entry.next_attempt, id));
        Ok(true)
    }

    /// Releases a held entry and makes it due at once. Returns whether it was held;
    /// `NotFound` if there is no such entry. Does not flush.
    pub fn release(&self, id: u64) -> Result<bool> {
        if self.get(id)?.is_none() {
            self.held_tree.remove(key(id))?;
            self.held_ids().remove(&id);
            return Err(Error::NotFound(format!("no queue entry {id}")));
        }
        let was = self.held_tree.remove(key(id))?.is_some();
        self.held_ids().remove(&id);
        if was {
            self.retry_now(id)?;
        }
        Ok(was)
    }

    /// Number of held entries.
    pub fn held_len(&self) -> usize {
        self.held_ids().len()
    }

    fn schedule(&self) -> MutexGuard<'_, BTreeSet<(i64, u64)>> {
        self.schedule.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Moves an entry in the schedule after its `next_attempt` changed.
    fn reschedule(&self, id: u64, old: Option<i64>, new: Option<i64>) {
        let held = self.is_held(id);
        let mut s = self.schedule();
        if let Some(old) = old {
            s.remove(&(old, id));
        }
        if let Some(new) = new
            && !held
        {
            s.insert((new, id));
        }
    }

    pub(crate) fn entries_tree(&self) -> &sled::Tree {
        &self.entries_tree
    }

    /// Adds an entry written by another module's transaction to the schedule.
    pub(crate) fn scheduled(&self, entry: &QueueEntry) {
        self.reschedule(entry.id, None, Some(entry.next_attempt));
    }

    /// When the earliest entry is due, if any.
    pub fn next_due(&self) -> Option<i64> {
        self.schedule().first().map(|(at, _)| *at)
    }

    /// When the earliest entry not in `skip` is due, if any (the queue runner leaves out the
    /// entries it is working on).
    pub fn next_due_except(&self, skip: &std::collections::HashSet<u64>) -> Option<i64> {
        self.schedule()
            .iter()
            .find(|(_, id)| !skip.contains(id))
            .map(|(at, _)| *at)
    }

    /// Like [`Self::due`], leaving out the ids in `skip` (not even read).
    pub fn due_except(
        &self,
        now: i64,
        skip: &std::collections::HashSet<u64>,
    ) -> Result<Vec<QueueEntry>> {
        let ids: Vec<u64> = self
            .schedule()
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
        self.reschedule(entry.id, None, Some(entry.next_attempt));
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
        let mut old = None;
        let updated = self.entries.update(key(entry.id), |current| {
            old = current.as_ref().map(|c| c.next_attempt);
            current.map(|_| entry.clone())
        })?;
        match updated {
            Some(_) => {
                self.reschedule(entry.id, old, Some(entry.next_attempt));
                Ok(())
            }
            None => Err(Error::NotFound(format!("no queue entry {}", entry.id))),
        }
    }

    /// Removes an entry and releases its body; returns the entry if it was there.
    pub fn remove(&self, id: u64) -> Result<Option<QueueEntry>> {
        let k = key(id);
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
        if let Some(e) = &removed {
            self.reschedule(id, Some(e.next_attempt), None);
            if self.held_ids().remove(&id) {
                self.held_tree.remove(k)?;
            }
        }
        Ok(removed)
    }

    /// Makes an entry due at once. `NotFound` if there is no such entry.
    pub fn retry_now(&self, id: u64) -> Result<()> {
        let mut old = None;
        let updated = self.entries.update(key(id), |current| {
            old = current.as_ref().map(|c| c.next_attempt);
            current.map(|mut e| {
                e.next_attempt = 0;
                e
            })
        })?;
        match updated {
            Some(_) => {
                self.reschedule(id, old, Some(0));
                Ok(())
            }
            None => Err(Error::NotFound(format!("no queue entry {id}"))),
        }
    }

    /// Number of queued entries, held ones included (from the schedule: no scan).
    pub fn len(&self) -> usize {
        self.schedule().len() + self.held_len()
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
            body: None,
            prefix: String::new(),
        };
        let id = q.enqueue_entry(template, b"xyz").unwrap();
        let e = q.get(id).unwrap().unwrap();
        assert_eq!((e.envid.as_deref(), e.size, e.id), (Some("ENV1"), 3, id));
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
