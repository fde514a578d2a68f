//! Relay marks: which messages relayed by peers a node has already delivered (#13 point 18).
//!
//! A sending node relays a queued message with its queue id; the owner writes one
//! [`RelayMark`] per delivered recipient — `(origin node, queue id, recipient)` — in the same
//! sled transaction as the delivery ([`crate::MailStore::deliver_relayed`]). If the sender dies
//! after the owner's `250` but before it recorded it, its retry finds the marks and gets `250`
//! without a second copy. Marks are kept longer than any retry (the queue's maximum age plus a
//! margin) and removed by [`RelayMarks::sweep`].
//!
//! Layout: tree `relay_marks`, key `origin \0 queue id \0 recipient`, value the Unix time the
//! mark was written (i64 big-endian).

use crate::{Result, Store};

pub(crate) const RELAY_MARKS: &str = "relay_marks";

/// Longest origin, queue id or recipient a mark holds (longer parts are refused by
/// [`RelayMark::new`]).
pub const MAX_MARK_PART: usize = 512;

/// One relayed `(origin node, queue id, recipient)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayMark(Vec<u8>);

impl RelayMark {
    /// The mark of `recipient` (the canonical address it was delivered to) in the message
    /// `queue_id` relayed by `origin`. `None` if a part is empty, too long or holds a NUL.
    pub fn new(origin: &str, queue_id: &str, recipient: &str) -> Option<RelayMark> {
        let parts = [origin, queue_id, recipient];
        if parts
            .iter()
            .any(|p| p.is_empty() || p.len() > MAX_MARK_PART || p.contains('\0'))
        {
            return None;
        }
        Some(RelayMark(parts.join("\0").into_bytes()))
    }

    pub(crate) fn key(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Display for RelayMark {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&String::from_utf8_lossy(&self.0).replace('\0', " "))
    }
}

/// The relay marks of a node's database. Cheap to clone.
#[derive(Debug, Clone)]
pub struct RelayMarks {
    tree: sled::Tree,
}

/// Marks removed per batch of a sweep (each batch is one pass over part of the tree).
const SWEEP_BATCH: usize = 4096;

impl RelayMarks {
    pub fn new(store: &Store) -> Result<RelayMarks> {
        Ok(RelayMarks {
            tree: store.tree(RELAY_MARKS)?,
        })
    }

    pub(crate) fn tree(&self) -> &sled::Tree {
        &self.tree
    }

    /// True if the mark was written (and not swept yet).
    pub fn contains(&self, mark: &RelayMark) -> Result<bool> {
        Ok(self.tree.contains_key(mark.key())?)
    }

    /// How many marks there are.
    pub fn len(&self) -> usize {
        self.tree.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tree.is_empty()
    }

    /// Removes the marks written before `cutoff` (Unix seconds); returns how many. Does not
    /// flush (a swept mark that comes back after a crash is swept again).
    pub fn sweep(&self, cutoff: i64) -> Result<usize> {
        let mut removed = 0;
        let mut from: Vec<u8> = Vec::new();
        loop {
            let mut old = Vec::new();
            let mut last = None;
            for kv in self.tree.range(from.as_slice()..).take(SWEEP_BATCH) {
                let (k, v) = kv?;
                if written_at(&v) < cutoff {
                    old.push((k.clone(), v));
                }
                last = Some(k);
            }
            let Some(last) = last else {
                return Ok(removed);
            };
            for (k, v) in old {
                // Only if it was not written again meanwhile.
                if self
                    .tree
                    .compare_and_swap(&k, Some(&v), None::<&[u8]>)?
                    .is_ok()
                {
                    removed += 1;
                }
            }
            from = last.to_vec();
            from.push(0);
        }
    }

    /// Writes a mark at `at` outside a delivery: for tests of the sweep.
    #[doc(hidden)]
    pub fn insert_at(&self, mark: &RelayMark, at: i64) -> Result<()> {
        self.tree.insert(mark.key(), &at.to_be_bytes()[..])?;
        Ok(())
    }
}

/// The time in a mark's value (0, so swept at once, if it is not 8 bytes).
pub(crate) fn written_at(value: &[u8]) -> i64 {
    <[u8; 8]>::try_from(value).map_or(0, i64::from_be_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_refuse_empty_long_or_nul_parts() {
        assert!(RelayMark::new("a", "1.2", "bob@company.com").is_some());
        assert!(RelayMark::new("", "1.2", "bob@company.com").is_none());
        assert!(RelayMark::new("a", "1\0x", "bob@company.com").is_none());
        assert!(RelayMark::new("a", &"1".repeat(MAX_MARK_PART + 1), "b@c").is_none());
        // The parts cannot run into each other.
        assert_ne!(
            RelayMark::new("a", "b", "c@d"),
            RelayMark::new("a\0b", "c", "d")
        );
    }

    #[test]
    fn sweep_removes_only_marks_older_than_the_cutoff() {
        let store = Store::temporary().unwrap();
        let marks = RelayMarks::new(&store).unwrap();
        let now = crate::unix_now();
        let old: Vec<RelayMark> = (0..(SWEEP_BATCH + 10))
            .map(|i| RelayMark::new("a", &format!("100.{i}"), "bob@company.com").unwrap())
            .collect();
        for m in &old {
            marks.insert_at(m, now - 6 * 24 * 3600).unwrap();
        }
        let fresh = RelayMark::new("b", "200.1", "bob@company.com").unwrap();
        marks.insert_at(&fresh, now).unwrap();
        assert_eq!(marks.len(), old.len() + 1);
        let cutoff = now - 5 * 24 * 3600;
        assert_eq!(marks.sweep(cutoff).unwrap(), old.len());
        assert_eq!(marks.len(), 1);
        assert!(marks.contains(&fresh).unwrap());
        assert!(!marks.contains(&old[0]).unwrap());
        assert_eq!(marks.sweep(cutoff).unwrap(), 0, "nothing left to sweep");
    }

    #[test]
    fn a_marked_delivery_is_refused_the_second_time_and_stores_nothing() {
        let store = Store::temporary().unwrap();
        let mail = crate::MailStore::new(&store).unwrap();
        let bob = "bob@company.com".to_string();
        let mark = RelayMark::new("a", "1700000000.42", &bob).unwrap();
        let local = [(bob.clone(), "Received: relayed\r\n".to_string())];
        let staged = store
            .bodies()
            .stage(b"Subject: once\r\n\r\nbody\r\n")
            .unwrap();
        let uids = mail
            .deliver_relayed(&staged, &local, std::slice::from_ref(&mark))
            .unwrap();
        assert_eq!(uids, vec![1]);
        assert!(mail.relay_marks().contains(&mark).unwrap());
        let again = store
            .bodies()
            .stage(b"Subject: once\r\n\r\nbody\r\n")
            .unwrap();
        let err = mail
            .deliver_relayed(&again, &local, std::slice::from_ref(&mark))
            .unwrap_err();
        assert!(matches!(err, crate::Error::Duplicate(_)), "{err}");
        assert_eq!(mail.messages(&bob, crate::mailbox::INBOX).unwrap().len(), 1);
        // Another recipient of the same relayed message is a delivery of its own.
        let other = RelayMark::new("a", "1700000000.42", "carol@company.com").unwrap();
        let local = [("carol@company.com".to_string(), String::new())];
        mail.deliver_relayed(&again, &local, &[other]).unwrap();
        assert_eq!(mail.relay_marks().len(), 2);
    }
}
