//! [`MailboxLocks`]: in-process exclusive locks by name, held by a session for as long as it needs
//! a mailbox to itself. A name is whatever the protocol locks: POP3 locks an account's maildrop
//! (RFC 1939 §8: from a successful login to the end of the session; a second session gets
//! `-ERR [IN-USE]`) under the account's address; IMAP may lock `account/mailbox` for an operation.
//! Names are compared case-insensitively (ASCII).

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};

/// The names locked now. Cheap to clone (clones share the locks).
#[derive(Clone, Debug, Default)]
pub struct MailboxLocks {
    held: Arc<Mutex<HashSet<String>>>,
}

impl MailboxLocks {
    /// Nothing locked.
    pub fn new() -> Self {
        Self::default()
    }

    /// Lock `name`; `None` if another session holds it. Released when the guard is dropped
    /// (however the session ends).
    pub fn try_lock(&self, name: &str) -> Option<MailboxGuard> {
        let key = name.to_ascii_lowercase();
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        if !held.insert(key.clone()) {
            return None;
        }
        Some(MailboxGuard {
            name: key,
            held: Arc::clone(&self.held),
        })
    }

    /// Whether `name` is locked now.
    pub fn is_locked(&self, name: &str) -> bool {
        let held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        held.contains(&name.to_ascii_lowercase())
    }
}

/// A held lock; dropping it releases the name.
#[derive(Debug)]
pub struct MailboxGuard {
    name: String,
    held: Arc<Mutex<HashSet<String>>>,
}

impl Drop for MailboxGuard {
    fn drop(&mut self) {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        held.remove(&self.name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclusive_until_dropped() {
        let locks = MailboxLocks::new();
        let g = locks.try_lock("info@company.com").unwrap();
        assert!(locks.try_lock("INFO@company.com").is_none());
        assert!(locks.try_lock("info@client1.com").is_some());
        drop(g);
        assert!(!locks.is_locked("info@company.com"));
        assert!(locks.try_lock("info@company.com").is_some());
        // Any name: an IMAP mailbox beside a POP3 maildrop.
        let _inbox = locks.try_lock("info@company.com/INBOX").unwrap();
        assert!(locks.is_locked("INFO@company.com/inbox"));
        assert!(!locks.is_locked("info@company.com"));
    }
}
