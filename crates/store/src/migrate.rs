//! Schema migrations, run by [`crate::Store::open`] before anything else uses the database.
//!
//! Each step is idempotent, so a crash in the middle is finished by the next open: the schema
//! version is written only after the step and a flush.

use std::io::Read;

use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};

use crate::body::{BodyRef, INLINE_MAX, LineEnds};
use crate::mailbox::{MESSAGES, MessageMeta};
use crate::queue::{ENTRIES, QueueEntry, V1_BODIES};
use crate::{Bodies, Error, Result};

fn corrupt(table: &str, key: &[u8], source: serde_json::Error) -> Error {
    Error::Corrupt {
        table: table.to_string(),
        key: format!("{key:?}"),
        source,
    }
}

fn id_of(key: &[u8]) -> u64 {
    key.try_into().map(u64::from_be_bytes).unwrap_or(0)
}

/// Schema 1 → 2: large mail bodies move to files; every message gets its POP3 size; queue
/// bodies move from `queue_bodies` into the shared body store, referenced by their entries.
pub(crate) fn v1_to_v2(db: &sled::Db, bodies: &Bodies) -> Result<()> {
    let (inline, refs, dead) = bodies.trees();

    // 1. Mail bodies over the inline limit become files (their reference counts stay).
    let mut large = Vec::new();
    for kv in inline.iter() {
        let (k, v) = kv?;
        if v.len() > INLINE_MAX {
            large.push(id_of(&k));
        }
    }
    for id in &large {
        if let Some(data) = inline.get(id.to_be_bytes())? {
            bodies.spill(*id, &data)?;
        }
    }

    // 2. Every message's size as POP3 sends it.
    let messages = db.open_tree(MESSAGES)?;
    for kv in messages.iter() {
        let (k, v) = kv?;
        let mut meta: MessageMeta =
            serde_json::from_slice(&v).map_err(|e| corrupt(MESSAGES, &k, e))?;
        if meta.pop3_size != 0 || meta.size == 0 {
            continue;
        }
        let mut lines = LineEnds::new();
        lines.push(meta.prefix.as_bytes());
        if let Some(mut reader) = bodies.open(meta.blob)? {
            let mut buf = vec![0u8; INLINE_MAX];
            loop {
                let n = reader.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                lines.push(&buf[..n]);
            }
        }
        meta.pop3_size = lines.crlf_len();
        messages.insert(k, serde_json::to_vec(&meta).map_err(Error::Encode)?)?;
    }

    // 3. Queue bodies: into the body store under the entry's id (ids are unique across the
    //    database), referenced by the entry, in one transaction per entry.
    let v1 = db.open_tree(V1_BODIES)?;
    let entries = db.open_tree(ENTRIES)?;
    for kv in v1.iter() {
        let (k, data) = kv?;
        let id = id_of(&k);
        let Some(v) = entries.get(&k)? else {
            v1.remove(&k)?;
            continue;
        };
        let mut entry: QueueEntry =
            serde_json::from_slice(&v).map_err(|e| corrupt(ENTRIES, &k, e))?;
        let spilled = data.len() > INLINE_MAX;
        if spilled {
            bodies.write_file(id, &data)?;
        }
        entry.body = Some(BodyRef {
            id,
            len: data.len() as u64,
            crlf_len: LineEnds::of(&data),
        });
        entry.size = data.len() as u64;
        let encoded = serde_json::to_vec(&entry).map_err(Error::Encode)?;
        (&entries, inline, refs, dead, &v1)
            .transaction(|(entries, inline, refs, _dead, v1)| {
                if !spilled {
                    inline.insert(&k[..], &data[..])?;
                }
                refs.insert(&k[..], &1u64.to_be_bytes()[..])?;
                entries.insert(&k[..], encoded.as_slice())?;
                v1.remove(&k[..])?;
                Ok::<_, ConflictableTransactionError<Error>>(())
            })
            .map_err(|e| match e {
                TransactionError::Abort(e) => e,
                TransactionError::Storage(e) => Error::Db(e),
            })?;
    }
    db.flush()?;
    Ok(())
}
