//! [`MaildropLocks`]: the in-process exclusive lock on an account's maildrop (RFC 1939 §8), held
//! from a successful login to the end of the session. A second session gets `-ERR [IN-USE]`.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};

/// The accounts whose maildrop is open in a session. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct MaildropLocks {
    held: Arc<Mutex<HashSet<String>>>,
}

impl MaildropLocks {
    /// No maildrop locked.
    pub fn new() -> Self {
        Self::default()
    }

    /// Lock `account`'s maildrop; `None` if another session holds it. Released when the guard is
    /// dropped (however the session ends).
    pub fn try_lock(&self, account: &str) -> Option<MaildropGuard> {
        let key = account.to_ascii_lowercase();
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        if !held.insert(key.clone()) {
            return None;
        }
        Some(MaildropGuard {
            account: key,
            held: Arc::clone(&self.held),
        })
    }

    /// Whether `account`'s maildrop is locked now.
    pub fn is_locked(&self, account: &str) -> bool {
        let held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        held.contains(&account.to_ascii_lowercase())
    }
}

/// A held maildrop lock.
#[derive(Debug)]
pub struct MaildropGuard {
    account: String,
    held: Arc<Mutex<HashSet<String>>>,
}

impl Drop for MaildropGuard {
    fn drop(&mut self) {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        held.remove(&self.account);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclusive_until_dropped() {
        let locks = MaildropLocks::new();
        let g = locks.try_lock("info@company.com").unwrap();
        assert!(locks.try_lock("INFO@company.com").is_none());
        assert!(locks.try_lock("info@client1.com").is_some());
        drop(g);
        assert!(!locks.is_locked("info@company.com"));
        assert!(locks.try_lock("info@company.com").is_some());
    }
}
