//! Message bodies: written as they arrive, read as a stream or by byte range, shared by reference
//! count between the messages (and queue entries) that hold them.
//!
//! Hybrid storage. A body of at most [`INLINE_MAX`] octets stays in memory while it is received and
//! is stored in sled as one value (`mail_blobs`, the tree name kept from schema 1), so small
//! messages keep going through the group commit alone. A larger body spills to a file
//! `bodies/<2 hex>/<16 hex id>` beside the database, written in chunks as it arrives.
//!
//! Durability order: the file is written and synced (file and directory) by
//! [`BodyWriter::finish`]; only then does a transaction write the reference count
//! (`mail_blob_refs`) together with the message or queue entry that holds the body; the caller's
//! group flush follows, then the client hears `250`. A file is never unlinked before the sled
//! change that dropped its last reference is on disk: releasing the last reference records the id
//! in `body_dead` in the same transaction, and [`Bodies::reap`] (snapshot the dead ids, flush,
//! unlink, forget the ids) deletes the files. At open, files that no reference names (a crash
//! between the file sync and the index commit) are removed.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionalTree};

use crate::{Error, Result};

/// Bodies up to this size are stored in the database; larger ones in files.
pub const INLINE_MAX: usize = 64 * 1024;

pub(crate) const INLINE_TREE: &str = "mail_blobs";
pub(crate) const REFS_TREE: &str = "mail_blob_refs";
pub(crate) const DEAD_TREE: &str = "body_dead";
/// Parsed structure of a message (opaque to the store), keyed by body id and prefix length;
/// dropped by the reaper with the body.
const STRUCTURE_TREE: &str = "body_structure";
const DIR: &str = "bodies";

type TxResult<T> = std::result::Result<T, ConflictableTransactionError<Error>>;

/// A stored body: its id, its length and its length with every line end as CRLF (what POP3
/// sends before byte-stuffing).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct BodyRef {
    pub id: u64,
    pub len: u64,
    /// Length once every bare LF and bare CR became CRLF and a last line without a line end got
    /// one (RFC 1939 sizes).
    pub crlf_len: u64,
}

/// Counts what CRLF-normalising a byte stream would add, chunk by chunk.
#[derive(Debug, Default, Clone)]
pub struct LineEnds {
    len: u64,
    extra: u64,
    prev_cr: bool,
    last: Option<u8>,
}

impl LineEnds {
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts one more chunk.
    pub fn push(&mut self, data: &[u8]) {
        for &b in data {
            match b {
                b'\n' if self.prev_cr => {}
                b'\n' => self.extra += 1,
                _ if self.prev_cr => self.extra += 1,
                _ => {}
            }
            self.prev_cr = b == b'\r';
        }
        if let Some(&b) = data.last() {
            self.last = Some(b);
        }
        self.len += data.len() as u64;
    }

    /// Octets counted.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True if nothing was counted.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The CRLF-normalised length of everything counted.
    pub fn crlf_len(&self) -> u64 {
        let mut n = self.len + self.extra;
        match self.last {
            // A trailing CR is a bare CR: it becomes CRLF.
            Some(b'\r') => n += 1,
            Some(b'\n') | None => {}
            Some(_) => n += 2,
        }
        n
    }

    /// The CRLF-normalised length of `data` alone.
    pub fn of(data: &[u8]) -> u64 {
        let mut c = Self::new();
        c.push(data);
        c.crlf_len()
    }
}

struct Inner {
    db: sled::Db,
    dir: PathBuf,
    inline: sled::Tree,
    refs: sled::Tree,
    dead: sled::Tree,
    structure: sled::Tree,
    /// For [`crate::Store::temporary`]: the directory removed when the last handle goes.
    _temp: Option<tempfile::TempDir>,
}

/// The body store. Cheap to clone; owned by [`crate::Store`].
#[derive(Clone)]
pub struct Bodies {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Bodies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bodies")
            .field("dir", &self.inner.dir)
            .finish_non_exhaustive()
    }
}

fn key(id: u64) -> [u8; 8] {
    id.to_be_bytes()
}

fn structure_key(id: u64, prefix_len: u32) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..8].copy_from_slice(&id.to_be_bytes());
    k[8..].copy_from_slice(&prefix_len.to_be_bytes());
    k
}

fn read_u64(bytes: &[u8]) -> u64 {
    bytes.try_into().map(u64::from_be_bytes).unwrap_or(0)
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)?.sync_all()?;
    Ok(())
}

impl Bodies {
    /// Opens the body store of `db` with its files under `data_dir/bodies`; removes files no
    /// reference names and reaps released ones.
    pub(crate) fn open_dir(
        db: &sled::Db,
        data_dir: &Path,
        temp: Option<tempfile::TempDir>,
    ) -> Result<Bodies> {
        let dir = data_dir.join(DIR);
        let fresh = !dir.exists();
        std::fs::create_dir_all(&dir)?;
        for sub in 0..=255u8 {
            std::fs::create_dir_all(dir.join(format!("{sub:02x}")))?;
        }
        if fresh {
            sync_dir(&dir)?;
            sync_dir(data_dir)?;
        }
        let bodies = Bodies {
            inner: Arc::new(Inner {
                db: db.clone(),
                dir,
                inline: db.open_tree(INLINE_TREE)?,
                refs: db.open_tree(REFS_TREE)?,
                dead: db.open_tree(DEAD_TREE)?,
                structure: db.open_tree(STRUCTURE_TREE)?,
                _temp: temp,
            }),
        };
        bodies.remove_orphans()?;
        bodies.reap()?;
        Ok(bodies)
    }

    fn path(&self, id: u64) -> PathBuf {
        self.inner
            .dir
            .join(format!("{:02x}", id & 0xff))
            .join(format!("{id:016x}"))
    }

    /// Removes body files that no reference names (written, then the process died before the
    /// message was committed).
    fn remove_orphans(&self) -> Result<usize> {
        let mut removed = 0;
        for sub in std::fs::read_dir(&self.inner.dir)? {
            let sub = sub?;
            if !sub.file_type()?.is_dir() {
                continue;
            }
            for file in std::fs::read_dir(sub.path())? {
                let file = file?;
                let name = file.file_name();
                let Some(id) = name.to_str().and_then(|n| u64::from_str_radix(n, 16).ok()) else {
                    continue;
                };
                if !self.inner.refs.contains_key(key(id))?
                    && !self.inner.dead.contains_key(key(id))?
                {
                    std::fs::remove_file(file.path())?;
                    removed += 1;
                }
            }
        }
        if removed > 0 {
            tracing::info!(removed, "removed body files of messages never committed");
        }
        Ok(removed)
    }

    /// Deletes the files of bodies whose last reference is gone, once that is on disk. Returns
    /// how many were deleted. Blocks (it flushes the database).
    pub fn reap(&self) -> Result<usize> {
        let ids: Vec<u64> = self
            .inner
            .dead
            .iter()
            .keys()
            .map(|k| k.map(|k| read_u64(&k)))
            .collect::<std::result::Result<_, _>>()?;
        if ids.is_empty() {
            return Ok(0);
        }
        self.inner.db.flush()?;
        let mut removed = 0;
        for &id in &ids {
            match std::fs::remove_file(self.path(id)) {
                Ok(()) => removed += 1,
                // An inline body (its value went with the release) or a file already gone.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
            for k in self.inner.structure.scan_prefix(key(id)).keys() {
                self.inner.structure.remove(k?)?;
            }
            self.inner.dead.remove(key(id))?;
        }
        Ok(removed)
    }

    /// The cached parsed structure of a message made of a `prefix_len`-octet prefix and body
    /// `id` (what [`Bodies::set_structure`] stored), if any.
    pub fn structure(&self, id: u64, prefix_len: u32) -> Result<Option<Vec<u8>>> {
        Ok(self
            .inner
            .structure
            .get(structure_key(id, prefix_len))?
            .map(|v| v.to_vec()))
    }

    /// Caches the parsed structure of a message (opaque bytes, a few KiB at most: the caller
    /// bounds them). Not durable on its own (it rides on the next flush) and dropped by
    /// [`Bodies::reap`] once the body is released; a body no longer referenced is not cached.
    pub fn set_structure(&self, id: u64, prefix_len: u32, value: &[u8]) -> Result<()> {
        if self.refs(id)? == 0 {
            return Ok(());
        }
        self.inner
            .structure
            .insert(structure_key(id, prefix_len), value)?;
        Ok(())
    }

    /// Number of cached structures (tests).
    pub fn structures_cached(&self) -> usize {
        self.inner.structure.len()
    }

    /// A writer for a new body.
    pub fn writer(&self) -> Result<BodyWriter> {
        Ok(BodyWriter {
            bodies: self.clone(),
            id: self.inner.db.generate_id()?,
            buf: Vec::new(),
            file: None,
            file_created: false,
            lines: LineEnds::new(),
        })
    }

    /// A body staged from bytes at hand (small bodies: DSNs, tests).
    pub fn stage(&self, data: &[u8]) -> Result<StagedBody> {
        let mut w = self.writer()?;
        for chunk in data.chunks(INLINE_MAX) {
            w.write(chunk)?;
        }
        w.finish()
    }

    /// Reads a body from its start; `None` if there is no such body.
    pub fn open(&self, id: u64) -> Result<Option<BodyReader>> {
        if let Some(v) = self.inner.inline.get(key(id))? {
            return Ok(Some(BodyReader {
                source: Source::Inline(std::io::Cursor::new(v)),
            }));
        }
        match File::open(self.path(id)) {
            Ok(f) => Ok(Some(BodyReader {
                source: Source::File(f),
            })),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// A message as a stream: `prefix`, then body `id`; `None` if there is no such body.
    pub fn open_message(&self, prefix: &[u8], id: u64) -> Result<Option<MessageReader>> {
        Ok(self
            .open(id)?
            .map(|body| MessageReader::new(prefix.to_vec(), body)))
    }

    /// `len` octets of a body from `start` (fewer at its end); `None` if there is no such body.
    /// The caller bounds `len`.
    pub fn read_range(&self, id: u64, start: u64, len: usize) -> Result<Option<Vec<u8>>> {
        let Some(mut reader) = self.open(id)? else {
            return Ok(None);
        };
        reader.seek(SeekFrom::Start(start))?;
        let mut out = Vec::with_capacity(len.min(INLINE_MAX));
        reader.take(len as u64).read_to_end(&mut out)?;
        Ok(Some(out))
    }

    /// A whole body in memory: for tests and small bodies only.
    pub fn read_all(&self, id: u64) -> Result<Option<Vec<u8>>> {
        let Some(mut reader) = self.open(id)? else {
            return Ok(None);
        };
        let mut out = Vec::new();
        reader.read_to_end(&mut out)?;
        Ok(Some(out))
    }

    /// The number of references to a body (0 if none).
    pub fn refs(&self, id: u64) -> Result<u64> {
        Ok(self.inner.refs.get(key(id))?.map_or(0, |v| read_u64(&v)))
    }

    /// The directory of the body files.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    pub(crate) fn trees(&self) -> (&sled::Tree, &sled::Tree, &sled::Tree) {
        (&self.inner.inline, &self.inner.refs, &self.inner.dead)
    }

    /// Moves a body kept in the database to a file (schema 1 migration of large bodies): write
    /// and sync the file, then drop the database copy.
    pub(crate) fn spill(&self, id: u64, data: &[u8]) -> Result<()> {
        let path = self.path(id);
        write_synced(&path, data)?;
        self.inner.inline.remove(key(id))?;
        Ok(())
    }

    pub(crate) fn write_file(&self, id: u64, data: &[u8]) -> Result<()> {
        write_synced(&self.path(id), data)
    }
}

fn write_synced(path: &Path, data: &[u8]) -> Result<()> {
    let mut f = File::create(path)?;
    f.write_all(data)?;
    f.sync_all()?;
    if let Some(dir) = path.parent() {
        sync_dir(dir)?;
    }
    Ok(())
}

/// Receives a body chunk by chunk: in memory up to [`INLINE_MAX`], then in a file. Dropped
/// without [`BodyWriter::finish`], it leaves nothing behind.
pub struct BodyWriter {
    bodies: Bodies,
    id: u64,
    buf: Vec<u8>,
    file: Option<File>,
    /// A file exists that nothing references yet (removed on drop).
    file_created: bool,
    lines: LineEnds,
}

impl std::fmt::Debug for BodyWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BodyWriter")
            .field("id", &self.id)
            .field("len", &self.lines.len())
            .finish_non_exhaustive()
    }
}

impl BodyWriter {
    /// Appends a chunk. Memory held stays under [`INLINE_MAX`] whatever the body's size.
    pub fn write(&mut self, data: &[u8]) -> Result<()> {
        self.lines.push(data);
        if let Some(f) = &mut self.file {
            // Written in INLINE_MAX pieces, whatever the callers' chunks.
            self.buf.extend_from_slice(data);
            if self.buf.len() >= INLINE_MAX {
                f.write_all(&self.buf)?;
                self.buf.clear();
            }
            return Ok(());
        }
        if self.buf.len() + data.len() <= INLINE_MAX {
            self.buf.extend_from_slice(data);
            return Ok(());
        }
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(self.bodies.path(self.id))?;
        self.file_created = true;
        f.write_all(&self.buf)?;
        f.write_all(data)?;
        self.buf.clear();
        self.file = Some(f);
        Ok(())
    }

    /// Octets written so far.
    pub fn len(&self) -> u64 {
        self.lines.len()
    }

    /// True if nothing was written.
    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }

    /// Makes the body durable (a file is synced with its directory) and hands it over for a
    /// transaction to reference. Blocks on the disk for a file.
    pub fn finish(mut self) -> Result<StagedBody> {
        let body = BodyRef {
            id: self.id,
            len: self.lines.len(),
            crlf_len: self.lines.crlf_len(),
        };
        let (inline, file) = match self.file.take() {
            Some(mut f) => {
                f.write_all(&self.buf)?;
                self.buf = Vec::new();
                f.sync_all()?;
                drop(f);
                let path = self.bodies.path(self.id);
                if let Some(dir) = path.parent() {
                    sync_dir(dir)?;
                }
                self.file_created = false;
                (None, Some(path))
            }
            None => (Some(std::mem::take(&mut self.buf)), None),
        };
        Ok(StagedBody {
            body,
            inline,
            file,
            committed: AtomicBool::new(false),
        })
    }
}

impl Drop for BodyWriter {
    fn drop(&mut self) {
        if self.file_created {
            self.file = None;
            let _ = std::fs::remove_file(self.bodies.path(self.id));
        }
    }
}

/// A finished body no transaction references yet. Dropped uncommitted, its file is removed.
pub struct StagedBody {
    body: BodyRef,
    inline: Option<Vec<u8>>,
    file: Option<PathBuf>,
    committed: AtomicBool,
}

impl std::fmt::Debug for StagedBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StagedBody")
            .field("body", &self.body)
            .finish_non_exhaustive()
    }
}

impl StagedBody {
    /// What will be stored.
    pub fn body(&self) -> BodyRef {
        self.body
    }

    /// Reads what will be stored (before a transaction references it: to sign it, say).
    pub fn reader(&self) -> Result<Box<dyn std::io::Read + Send + '_>> {
        Ok(match (&self.inline, &self.file) {
            (Some(data), _) => Box::new(data.as_slice()),
            (None, Some(path)) => Box::new(std::io::BufReader::new(File::open(path)?)),
            (None, None) => Box::new(std::io::empty()),
        })
    }

    /// Called after the transaction that referenced the body committed.
    pub(crate) fn mark_committed(&self) {
        self.committed.store(true, Ordering::Release);
    }
}

impl Drop for StagedBody {
    fn drop(&mut self) {
        if !self.committed.load(Ordering::Acquire)
            && let Some(path) = &self.file
        {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The body trees inside a sled transaction: reference counting.
pub(crate) struct BodyTx<'a> {
    pub inline: &'a TransactionalTree,
    pub refs: &'a TransactionalTree,
    pub dead: &'a TransactionalTree,
}

impl BodyTx<'_> {
    fn count(&self, id: u64) -> TxResult<u64> {
        Ok(self.refs.get(key(id))?.map_or(0, |v| read_u64(&v)))
    }

    /// `n` references to a staged body: stored with count `n` the first time, counted up after.
    pub fn add_staged(&self, staged: &StagedBody, n: u64) -> TxResult<()> {
        let id = staged.body.id;
        let count = self.count(id)?;
        if count == 0
            && let Some(data) = &staged.inline
        {
            self.inline.insert(&key(id)[..], data.as_slice())?;
        }
        self.refs
            .insert(&key(id)[..], &(count + n).to_be_bytes()[..])?;
        Ok(())
    }

    /// One more reference to a stored body.
    pub fn retain(&self, id: u64) -> TxResult<()> {
        let count = self.count(id)?;
        self.refs
            .insert(&key(id)[..], &(count + 1).to_be_bytes()[..])?;
        Ok(())
    }

    /// One reference fewer; the last one frees the body (a file through `body_dead`).
    pub fn release(&self, id: u64) -> TxResult<()> {
        let count = self.count(id)?;
        if count <= 1 {
            self.refs.remove(&key(id)[..])?;
            self.inline.remove(&key(id)[..])?;
            // Inline bodies too: the reaper drops their cached structure.
            self.dead.insert(&key(id)[..], &[][..])?;
        } else {
            self.refs
                .insert(&key(id)[..], &(count - 1).to_be_bytes()[..])?;
        }
        Ok(())
    }
}

enum Source {
    Inline(std::io::Cursor<sled::IVec>),
    File(File),
}

/// A body being read: `Read` + `Seek`; the caller's buffer bounds each read.
pub struct BodyReader {
    source: Source,
}

impl std::fmt::Debug for BodyReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BodyReader")
    }
}

impl Read for BodyReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match &mut self.source {
            Source::Inline(c) => c.read(buf),
            Source::File(f) => f.read(buf),
        }
    }
}

impl Seek for BodyReader {
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        match &mut self.source {
            Source::Inline(c) => c.seek(pos),
            Source::File(f) => f.seek(pos),
        }
    }
}

/// A message as stored: its per-recipient prefix, then its shared body.
pub struct MessageReader {
    prefix: Vec<u8>,
    pos: usize,
    body: BodyReader,
}

impl std::fmt::Debug for MessageReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MessageReader")
            .field("prefix", &self.prefix.len())
            .finish_non_exhaustive()
    }
}

impl MessageReader {
    pub(crate) fn new(prefix: Vec<u8>, body: BodyReader) -> Self {
        Self {
            prefix,
            pos: 0,
            body,
        }
    }
}

impl Seek for MessageReader {
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        let plen = self.prefix.len() as u64;
        let target = match pos {
            SeekFrom::Start(n) => n,
            SeekFrom::Current(d) => {
                let cur = if self.pos < self.prefix.len() {
                    self.pos as u64
                } else {
                    plen + self.body.stream_position()?
                };
                cur.checked_add_signed(d).ok_or_else(|| {
                    std::io::Error::new(std::io::ErrorKind::InvalidInput, "seek before start")
                })?
            }
            SeekFrom::End(d) => {
                let end = plen + self.body.seek(SeekFrom::End(0))?;
                end.checked_add_signed(d).ok_or_else(|| {
                    std::io::Error::new(std::io::ErrorKind::InvalidInput, "seek before start")
                })?
            }
        };
        if target < plen {
            self.pos = target as usize;
            self.body.seek(SeekFrom::Start(0))?;
        } else {
            self.pos = self.prefix.len();
            self.body.seek(SeekFrom::Start(target - plen))?;
        }
        Ok(target)
    }
}

impl Read for MessageReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.pos < self.prefix.len() {
            let n = buf.len().min(self.prefix.len() - self.pos);
            buf[..n].copy_from_slice(&self.prefix[self.pos..self.pos + n]);
            self.pos += n;
            return Ok(n);
        }
        self.body.read(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Store;

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    fn commit(store: &Store, staged: &StagedBody) {
        let (inline, refs, dead) = store.bodies().trees();
        use sled::Transactional;
        (inline, refs, dead)
            .transaction(|(inline, refs, dead)| {
                BodyTx { inline, refs, dead }.add_staged(staged, 1)?;
                Ok::<_, ConflictableTransactionError<Error>>(())
            })
            .unwrap();
        staged.mark_committed();
    }

    fn release(store: &Store, id: u64) {
        let (inline, refs, dead) = store.bodies().trees();
        use sled::Transactional;
        (inline, refs, dead)
            .transaction(|(inline, refs, dead)| {
                BodyTx { inline, refs, dead }.release(id)?;
                Ok::<_, ConflictableTransactionError<Error>>(())
            })
            .unwrap();
    }

    #[test]
    fn line_ends_count_like_pop3() {
        for (data, want) in [
            (&b""[..], 0),
            (b"a", 3),
            (b"a\r\n", 3),
            (b"a\n", 3),
            (b"a\n.\nb", 9),
            (b"a\r\r\n", 5),
            (b"a\r", 3),
            (b"a\rb\r\n", 6),
        ] {
            assert_eq!(LineEnds::of(data), want, "{data:?}");
            // Any split gives the same count.
            for cut in 0..data.len() {
                let mut c = LineEnds::new();
                c.push(&data[..cut]);
                c.push(&data[cut..]);
                assert_eq!(c.crlf_len(), want, "{data:?} cut at {cut}");
            }
        }
    }

    #[test]
    fn small_bodies_stay_inline_large_ones_spill_to_a_file() {
        let store = Store::temporary().unwrap();
        let bodies = store.bodies();
        let small = bodies.stage(b"small\r\n").unwrap();
        assert!(small.file.is_none());
        let data = pattern(3 * INLINE_MAX + 17);
        let mut w = bodies.writer().unwrap();
        for chunk in data.chunks(1000) {
            w.write(chunk).unwrap();
        }
        let big = w.finish().unwrap();
        let path = big.file.clone().expect("spilled");
        assert!(path.exists());
        commit(&store, &small);
        commit(&store, &big);
        let id = big.body().id;
        assert_eq!(big.body().len, data.len() as u64);
        assert_eq!(bodies.read_all(id).unwrap().unwrap(), data);
        assert_eq!(
            bodies.read_all(small.body().id).unwrap().unwrap(),
            b"small\r\n"
        );
        // Ranges at the start, across chunk boundaries, in the middle and at the end.
        for (start, len) in [
            (0usize, 10usize),
            (INLINE_MAX - 3, 9),
            (2 * INLINE_MAX + 5, 70_000),
            (data.len() - 5, 5),
            (data.len() - 5, 100),
            (data.len(), 10),
        ] {
            let got = bodies.read_range(id, start as u64, len).unwrap().unwrap();
            let end = (start + len).min(data.len());
            assert_eq!(got, &data[start..end], "range {start}+{len}");
        }
        // Releasing the last reference frees the file only at the reaper.
        release(&store, id);
        assert!(path.exists());
        assert_eq!(bodies.reap().unwrap(), 1);
        assert!(!path.exists());
        assert_eq!(bodies.open(id).unwrap().map(|_| ()), None);
        release(&store, small.body().id);
        assert_eq!(bodies.reap().unwrap(), 0);
        assert!(bodies.open(small.body().id).unwrap().is_none());
    }

    #[test]
    fn message_reader_seeks_across_the_prefix_and_structure_goes_with_the_body() {
        let store = Store::temporary().unwrap();
        let bodies = store.bodies();
        let data = pattern(3 * INLINE_MAX + 17);
        for data in [&data[..], b"small body\r\n"] {
            let staged = bodies.stage(data).unwrap();
            commit(&store, &staged);
            let id = staged.body().id;
            let prefix = b"Received: x\r\n".to_vec();
            let whole: Vec<u8> = prefix.iter().chain(data).copied().collect();
            let mut r = bodies.open_message(&prefix, id).unwrap().unwrap();
            for start in [
                0,
                5,
                prefix.len(),
                prefix.len() + 3,
                whole.len() - 2,
                whole.len(),
            ] {
                assert_eq!(r.seek(SeekFrom::Start(start as u64)).unwrap(), start as u64);
                let mut got = Vec::new();
                r.by_ref().take(70_000).read_to_end(&mut got).unwrap();
                let end = (start + 70_000).min(whole.len());
                assert_eq!(got, &whole[start..end], "seek {start}");
            }
            assert_eq!(r.seek(SeekFrom::End(-3)).unwrap(), whole.len() as u64 - 3);
            bodies.set_structure(id, 14, b"cached").unwrap();
            assert_eq!(
                bodies.structure(id, 14).unwrap().as_deref(),
                Some(&b"cached"[..])
            );
            assert_eq!(bodies.structure(id, 0).unwrap(), None);
            release(&store, id);
            bodies.reap().unwrap();
            assert_eq!(bodies.structure(id, 14).unwrap(), None);
            // A released body is not cached again.
            bodies.set_structure(id, 14, b"late").unwrap();
            assert_eq!(bodies.structure(id, 14).unwrap(), None);
        }
    }

    #[test]
    fn uncommitted_files_disappear() {
        let dir = tempfile::tempdir().unwrap();
        let leftover;
        {
            let store = Store::open(dir.path()).unwrap();
            let bodies = store.bodies();
            let mut w = bodies.writer().unwrap();
            w.write(&pattern(INLINE_MAX + 1)).unwrap();
            let staged = w.finish().unwrap();
            let p = staged.file.clone().unwrap();
            drop(staged);
            assert!(!p.exists(), "dropped staged body removed");
            let mut w = bodies.writer().unwrap();
            w.write(&pattern(INLINE_MAX + 1)).unwrap();
            let staged = w.finish().unwrap();
            leftover = staged.file.clone().unwrap();
            // A crash after the file sync, before any transaction: the file stays behind.
            std::mem::forget(staged);
            assert!(leftover.exists());
        }
        let _store = Store::open(dir.path()).unwrap();
        assert!(!leftover.exists(), "orphan removed at open");
    }

    #[test]
    fn message_reader_serves_prefix_then_body() {
        let store = Store::temporary().unwrap();
        let staged = store.bodies().stage(b"body").unwrap();
        commit(&store, &staged);
        let body = store.bodies().open(staged.body().id).unwrap().unwrap();
        let mut r = MessageReader::new(b"Pre: x\r\n".to_vec(), body);
        let mut out = Vec::new();
        let mut buf = [0u8; 3];
        loop {
            let n = r.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        assert_eq!(out, b"Pre: x\r\nbody");
    }
}
