//! The node's durable state: one embedded database with typed tables.
//!
//! This is the only crate that touches sled. Everything above it sees [`Store`] and
//! [`Table`]; no sled type appears in the API, so the engine can be swapped without
//! touching the rest of the workspace. Values are JSON-encoded records; keys are bytes,
//! ordered, so prefix scans give per-account or per-mailbox ranges.

use std::marker::PhantomData;
use std::path::Path;

use serde::Serialize;
use serde::de::DeserializeOwned;

pub mod body;
mod commit;
pub mod mailbox;
mod migrate;
pub mod queue;
pub mod relayed;
mod space;

pub use body::{Bodies, BodyReader, BodyRef, BodyWriter, INLINE_MAX, MessageReader, StagedBody};
pub use mailbox::{MailStore, MailboxImport, MailboxInfo, MessageImport, MessageMeta};
pub use queue::{QueueClaim, QueueEntry, QueueStore, QueuedRecipient, RecipientState};
pub use relayed::{RelayMark, RelayMarks};
pub use space::DEFAULT_MIN_FREE_SPACE;

/// The schema this build writes. Recorded in the database on first open; a database written
/// by a newer schema is refused, an older one is migrated by [`Store::open`].
///
/// - 1: bodies as whole values (`mail_blobs`, `queue_bodies`), per-recipient headers inside them.
/// - 2: bodies in [`Bodies`] (large ones in files), shared by reference count between messages
///   and queue entries; per-recipient headers in a prefix beside the shared body.
pub const SCHEMA_VERSION: u32 = 2;

/// Default bound on sled's page cache (bytes).
pub const DEFAULT_CACHE_CAPACITY: u64 = 64 * 1024 * 1024;

const META_TREE: &str = "meta";
const SCHEMA_KEY: &[u8] = b"schema_version";
/// Where [`Store::probe`] writes its heartbeat.
const PROBE_KEY: &[u8] = b"probe";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("database: {0}")]
    Db(#[from] sled::Error),
    #[error("body file: {0}")]
    Io(#[from] std::io::Error),
    #[error("database transaction: {0}")]
    Transaction(String),
    #[error("record {key:?} in table {table} is corrupt: {source}")]
    Corrupt {
        table: String,
        key: String,
        source: serde_json::Error,
    },
    #[error("cannot encode record: {0}")]
    Encode(#[source] serde_json::Error),
    #[error("database schema {found} is newer than this build ({SCHEMA_VERSION}); upgrade dshare")]
    SchemaTooNew { found: u32 },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    /// A relayed message's recipient was delivered before ([`relayed`]).
    #[error("{0}")]
    Duplicate(String),
    /// The account is being moved to another node: try again shortly.
    #[error("account {0} is being moved; try again later")]
    Frozen(String),
    /// The data disk is below its free-space reserve: new mail waits (`452 4.3.1`).
    #[error("the data disk has {free} bytes free, below the reserve of {reserve}")]
    DiskFull { free: u64, reserve: u64 },
}

impl Error {
    /// Whether this is the free-space reserve refusing a write.
    pub fn is_disk_full(&self) -> bool {
        matches!(self, Error::DiskFull { .. })
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// Unix seconds now: the clock of every timestamp the store keeps (internal dates, queue
/// times, reservations).
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Handle on the node's database. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    commit: std::sync::Arc<commit::GroupCommit>,
    bodies: Bodies,
    reserve: std::sync::Arc<space::SpaceReserve>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (creating if needed) the database in `dir` and checks its schema version; an
    /// older schema is migrated in place. Sled's page cache is bounded by
    /// [`DEFAULT_CACHE_CAPACITY`].
    pub fn open(dir: &Path) -> Result<Self> {
        Self::open_with_cache(dir, DEFAULT_CACHE_CAPACITY)
    }

    /// [`Store::open`] with sled's page cache bounded by `cache_capacity` bytes.
    pub fn open_with_cache(dir: &Path, cache_capacity: u64) -> Result<Self> {
        let config = sled::Config::new()
            .path(dir.join("db"))
            .cache_capacity(cache_capacity)
            .mode(sled::Mode::HighThroughput);
        // A database closed a moment ago in this process (a node restarted in place) may
        // still be letting go of its file lock from sled's background threads: wait briefly
        // rather than fail. Another process holding it still fails after the wait.
        let mut attempts = 0;
        let db = loop {
            match config.open() {
                Err(sled::Error::Io(e))
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.to_string().contains("could not acquire lock") =>
                {
                    attempts += 1;
                    if attempts >= 40 {
                        return Err(sled::Error::Io(e).into());
                    }
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                other => break other?,
            }
        };
        Self::init(db, dir, None)
    }

    /// A database (and body directory) that lives only as long as this handle: for tests.
    pub fn temporary() -> Result<Self> {
        let temp = tempfile::tempdir()?;
        let db = sled::Config::new()
            .path(temp.path().join("db"))
            .cache_capacity(DEFAULT_CACHE_CAPACITY)
            .temporary(true)
            .open()?;
        let dir = temp.path().to_path_buf();
        Self::init(db, &dir, Some(temp))
    }

    fn init(db: sled::Db, dir: &Path, temp: Option<tempfile::TempDir>) -> Result<Self> {
        let meta = db.open_tree(META_TREE)?;
        let found = match meta.get(SCHEMA_KEY)? {
            None => {
                meta.insert(SCHEMA_KEY, &SCHEMA_VERSION.to_be_bytes())?;
                db.flush()?;
                SCHEMA_VERSION
            }
            Some(v) => {
                let found = v
                    .as_ref()
                    .try_into()
                    .map(u32::from_be_bytes)
                    .unwrap_or(u32::MAX);
                if found > SCHEMA_VERSION {
                    return Err(Error::SchemaTooNew { found });
                }
                found
            }
        };
        let bodies = Bodies::open_dir(&db, dir, temp)?;
        if found < 2 {
            migrate::v1_to_v2(&db, &bodies)?;
            meta.insert(SCHEMA_KEY, &2u32.to_be_bytes())?;
            db.flush()?;
            tracing::info!(from = found, to = 2, "database schema migrated");
        }
        let commit = std::sync::Arc::new(commit::GroupCommit::start(db.clone())?);
        let reserve = std::sync::Arc::new(space::SpaceReserve::new(dir));
        Ok(Self {
            db,
            commit,
            bodies,
            reserve,
        })
    }

    /// Sets the free-space reserve of the data disk (bytes; 0 = none, the default of a bare
    /// store). Takes effect at the next check: a node can lower it at run time.
    pub fn set_min_free_space(&self, bytes: u64) {
        self.reserve.set(bytes);
    }

    /// The free-space reserve (bytes).
    pub fn min_free_space(&self) -> u64 {
        self.reserve.get()
    }

    /// Bytes free for this process on the data disk.
    pub fn free_space(&self) -> Result<u64> {
        Ok(self.reserve.free()?)
    }

    /// `Err(DiskFull)` when the data disk is below the reserve: check before accepting new
    /// mail. Asks the file system each time (one `statvfs`), so it clears by itself once
    /// space returns.
    pub fn check_free_space(&self) -> Result<()> {
        self.reserve.check()
    }

    /// Why the database can no longer make writes durable (the error of its latest flush), if
    /// so. sled keeps a write error (a full disk, an I/O error) until the database is opened
    /// again: writes fail with a temporary error, reads go on, and the node reopens the store
    /// once the cause is gone (`ds-server`'s store watch).
    pub fn write_failure(&self) -> Option<String> {
        self.commit.failure()
    }

    /// Writes a heartbeat into the database and reads it: returns at once on a healthy
    /// store. The node's stall watch runs it now and then on a thread of its own, and a probe
    /// that does not return in time means the store has stalled (a deadlock inside sled; see
    /// `vendor/sled/PATCHED.md` for one that was). Not flushed: it is nobody's data.
    pub fn probe(&self) -> Result<()> {
        let meta = self.db.open_tree(META_TREE)?;
        meta.insert(PROBE_KEY, &unix_now().to_be_bytes())?;
        meta.get(PROBE_KEY)?;
        Ok(())
    }

    /// Test hook: stalls every store of this process (sled serialises all its transactions
    /// on one process-wide lock, which a transaction holds while it runs) until `release`
    /// gets a message or is dropped. Blocks: call it on a thread of its own.
    #[doc(hidden)]
    pub fn stall_for_tests(&self, release: &std::sync::mpsc::Receiver<()>) -> Result<()> {
        let meta = self.db.open_tree(META_TREE)?;
        meta.transaction(|_| {
            let _ = release.recv();
            Ok::<_, sled::transaction::ConflictableTransactionError<()>>(())
        })
        .map_err(|e| Error::Transaction(format!("{e:?}")))
    }

    /// Returns once [`Store::check_free_space`] has found the disk below the reserve (at once
    /// if it did since the last call): the body reaper then deletes released files at once,
    /// so space freed by deleting mail counts before the next round.
    pub async fn space_short(&self) {
        self.reserve.short().await;
    }

    /// The body store.
    pub fn bodies(&self) -> &Bodies {
        &self.bodies
    }

    /// The schema version recorded in the database.
    pub fn schema_version(&self) -> Result<u32> {
        let meta = self.db.open_tree(META_TREE)?;
        Ok(meta
            .get(SCHEMA_KEY)?
            .and_then(|v| v.as_ref().try_into().ok().map(u32::from_be_bytes))
            .unwrap_or(0))
    }

    /// A typed table; the same name always yields the same data.
    pub fn table<V>(&self, name: &str) -> Result<Table<V>> {
        Ok(Table {
            name: name.to_string(),
            tree: self.db.open_tree(name)?,
            _v: PhantomData,
        })
    }

    /// A table of raw bytes (message bodies).
    pub fn blobs(&self, name: &str) -> Result<Blobs> {
        Ok(Blobs {
            tree: self.db.open_tree(name)?,
        })
    }

    /// A monotonic id, unique for the life of the database.
    pub fn next_id(&self) -> Result<u64> {
        Ok(self.db.generate_id()?)
    }

    /// Makes every write so far durable on disk. Blocks; from async code use
    /// [`Store::flush_async`].
    pub fn flush(&self) -> Result<()> {
        self.db.flush()?;
        Ok(())
    }

    /// Makes every write so far durable on disk. Concurrent callers share one flush
    /// (group commit); safe to call from many tasks at once.
    pub async fn flush_async(&self) -> Result<()> {
        self.commit.flush().await
    }

    pub(crate) fn tree(&self, name: &str) -> Result<sled::Tree> {
        Ok(self.db.open_tree(name)?)
    }
}

/// A tree of JSON records under byte keys.
pub struct Table<V> {
    name: String,
    tree: sled::Tree,
    _v: PhantomData<fn() -> V>,
}

impl<V> Clone for Table<V> {
    fn clone(&self) -> Self {
        Self {
            name: self.name.clone(),
            tree: self.tree.clone(),
            _v: PhantomData,
        }
    }
}

impl<V> std::fmt::Debug for Table<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Table({})", self.name)
    }
}

impl<V: Serialize + DeserializeOwned> Table<V> {
    fn decode(&self, key: &[u8], bytes: &[u8]) -> Result<V> {
        serde_json::from_slice(bytes).map_err(|source| Error::Corrupt {
            table: self.name.clone(),
            key: String::from_utf8_lossy(key).into_owned(),
            source,
        })
    }

    fn encode(value: &V) -> Result<Vec<u8>> {
        serde_json::to_vec(value).map_err(Error::Encode)
    }

    pub fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<V>> {
        let key = key.as_ref();
        self.tree
            .get(key)?
            .map(|v| self.decode(key, &v))
            .transpose()
    }

    pub fn contains(&self, key: impl AsRef<[u8]>) -> Result<bool> {
        Ok(self.tree.contains_key(key)?)
    }

    /// Writes `value`, returning the previous one.
    pub fn insert(&self, key: impl AsRef<[u8]>, value: &V) -> Result<Option<V>> {
        let key = key.as_ref();
        self.tree
            .insert(key, Self::encode(value)?)?
            .map(|v| self.decode(key, &v))
            .transpose()
    }

    /// Writes `value` only if `key` is absent; `false` if it was present (nothing changed).
    pub fn insert_new(&self, key: impl AsRef<[u8]>, value: &V) -> Result<bool> {
        let res =
            self.tree
                .compare_and_swap(key, None as Option<&[u8]>, Some(Self::encode(value)?))?;
        Ok(res.is_ok())
    }

    pub fn remove(&self, key: impl AsRef<[u8]>) -> Result<Option<V>> {
        let key = key.as_ref();
        self.tree
            .remove(key)?
            .map(|v| self.decode(key, &v))
            .transpose()
    }

    /// Atomically replaces the record with `f(current)`; `None` from `f` deletes it.
    /// `f` may run more than once under contention. Returns the new value.
    pub fn update(
        &self,
        key: impl AsRef<[u8]>,
        mut f: impl FnMut(Option<V>) -> Option<V>,
    ) -> Result<Option<V>> {
        let key = key.as_ref();
        loop {
            let current = self.tree.get(key)?;
            let decoded = current.as_ref().map(|v| self.decode(key, v)).transpose()?;
            let next = f(decoded);
            let encoded = next.as_ref().map(Self::encode).transpose()?;
            match self.tree.compare_and_swap(key, current, encoded)? {
                Ok(()) => return Ok(next),
                Err(_) => continue,
            }
        }
    }

    /// All records in key order.
    pub fn iter(&self) -> impl Iterator<Item = Result<(Vec<u8>, V)>> + '_ {
        self.tree.iter().map(move |kv| {
            let (k, v) = kv?;
            let value = self.decode(&k, &v)?;
            Ok((k.to_vec(), value))
        })
    }

    /// Records whose key starts with `prefix`, in key order.
    pub fn scan_prefix(
        &self,
        prefix: impl AsRef<[u8]>,
    ) -> impl Iterator<Item = Result<(Vec<u8>, V)>> + '_ {
        self.tree.scan_prefix(prefix).map(move |kv| {
            let (k, v) = kv?;
            let value = self.decode(&k, &v)?;
            Ok((k.to_vec(), value))
        })
    }

    pub fn len(&self) -> usize {
        self.tree.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tree.is_empty()
    }
}

/// A tree of raw byte values (message bodies).
#[derive(Clone)]
pub struct Blobs {
    tree: sled::Tree,
}

impl std::fmt::Debug for Blobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Blobs")
    }
}

impl Blobs {
    pub fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<Vec<u8>>> {
        Ok(self.tree.get(key)?.map(|v| v.to_vec()))
    }
    pub fn insert(&self, key: impl AsRef<[u8]>, value: &[u8]) -> Result<()> {
        self.tree.insert(key.as_ref(), value)?;
        Ok(())
    }
    pub fn remove(&self, key: impl AsRef<[u8]>) -> Result<()> {
        self.tree.remove(key)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Serialize, Deserialize, PartialEq, Clone)]
    struct Rec {
        n: u32,
    }

    #[test]
    fn typed_table_roundtrip_and_insert_new() {
        let store = Store::temporary().unwrap();
        let t: Table<Rec> = store.table("t").unwrap();
        assert!(t.insert_new("a", &Rec { n: 1 }).unwrap());
        assert!(!t.insert_new("a", &Rec { n: 2 }).unwrap());
        assert_eq!(t.get("a").unwrap(), Some(Rec { n: 1 }));
        assert_eq!(
            t.update("a", |r| r.map(|r| Rec { n: r.n + 1 })).unwrap(),
            Some(Rec { n: 2 })
        );
        t.insert("ab", &Rec { n: 3 }).unwrap();
        t.insert("b", &Rec { n: 4 }).unwrap();
        let keys: Vec<_> = t.scan_prefix("a").map(|r| r.unwrap().0).collect();
        assert_eq!(keys, vec![b"a".to_vec(), b"ab".to_vec()]);
        assert_eq!(t.remove("a").unwrap(), Some(Rec { n: 2 }));
        assert_eq!(t.get("a").unwrap(), None);
    }

    #[test]
    fn corrupt_record_is_a_typed_error() {
        let store = Store::temporary().unwrap();
        store.tree("t").unwrap().insert("k", b"not json").unwrap();
        let t: Table<Rec> = store.table("t").unwrap();
        assert!(matches!(t.get("k"), Err(Error::Corrupt { .. })));
    }

    #[test]
    fn schema_version_is_recorded_and_newer_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
            store
                .tree(META_TREE)
                .unwrap()
                .insert(SCHEMA_KEY, &(SCHEMA_VERSION + 1).to_be_bytes())
                .unwrap();
            store.flush().unwrap();
        }
        assert!(matches!(
            Store::open(dir.path()),
            Err(Error::SchemaTooNew { .. })
        ));
    }

    #[test]
    fn concurrent_flushes_while_writing_do_not_deadlock() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        rt.block_on(async {
            let mut tasks = vec![];
            for t in 0..32 {
                let store = store.clone();
                tasks.push(tokio::spawn(async move {
                    let table: Table<Rec> = store.table("t").unwrap();
                    for n in 0..50 {
                        table.insert(format!("{t}-{n}"), &Rec { n }).unwrap();
                        store.flush_async().await.unwrap();
                    }
                }));
            }
            let all = futures_join(tasks);
            tokio::time::timeout(std::time::Duration::from_secs(60), all)
                .await
                .expect("flushes deadlocked");
        });
        let t: Table<Rec> = store.table("t").unwrap();
        assert_eq!(t.len(), 32 * 50);
    }

    async fn futures_join(tasks: Vec<tokio::task::JoinHandle<()>>) {
        for t in tasks {
            t.await.unwrap();
        }
    }

    #[test]
    fn dropping_the_last_handle_releases_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(store.flush_async()).unwrap();
        drop(store);
        // The flusher thread let go of its handle: the database opens again.
        let mut reopened = None;
        for _ in 0..50 {
            match Store::open(dir.path()) {
                Ok(s) => {
                    reopened = Some(s);
                    break;
                }
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
            }
        }
        assert!(reopened.is_some());
    }

    /// #13 point 19: the reserve refuses while the disk is below it and clears by itself.
    #[test]
    fn free_space_reserve_refuses_below_it_and_clears_when_lowered() {
        let store = Store::temporary().unwrap();
        store.check_free_space().unwrap();
        let free = store.free_space().unwrap();
        assert!(free > 0);
        store.set_min_free_space(u64::MAX);
        let e = store.check_free_space().unwrap_err();
        assert!(e.is_disk_full(), "{e}");
        store.clone().set_min_free_space(free / 2);
        store.check_free_space().unwrap();
        assert_eq!(store.min_free_space(), free / 2);
    }

    #[test]
    fn data_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            let t: Table<Rec> = store.table("t").unwrap();
            t.insert("k", &Rec { n: 7 }).unwrap();
            store.flush().unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let t: Table<Rec> = store.table("t").unwrap();
        assert_eq!(t.get("k").unwrap(), Some(Rec { n: 7 }));
    }
}
