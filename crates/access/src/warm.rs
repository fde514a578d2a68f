//! [`WarmPool`]: connections to owners opened ahead of need — TCP connected, TLS verified, the
//! greeting (and its nonce) read — so that a forwarded login costs one round trip to the owner
//! instead of a TCP and a TLS handshake more. A client that logs in for every check (phones,
//! `fetchmail`, webmail) otherwise pays that on every visit through a non-owner.
//!
//! The pool holds nothing it has not been asked for: a key's connections are opened only to
//! refill it after a login took one (or found none), so a node that forwards nothing keeps no
//! connection open, and each key holds at most `target` connections, younger than `max_age`
//! (below the owner's pre-login timeout). What a connection is, and how it is opened, is the
//! protocol's business: the pool only keeps them.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Warm connections per key (an owner's endpoint).
#[derive(Debug)]
pub struct WarmPool<T> {
    slots: Mutex<HashMap<String, Slot<T>>>,
    target: usize,
    max_age: Duration,
    hits: AtomicU64,
    misses: AtomicU64,
}

#[derive(Debug)]
struct Slot<T> {
    ready: Vec<(Instant, T)>,
    /// Connections being opened for this key (counted against `target`).
    opening: usize,
}

impl<T> Default for Slot<T> {
    fn default() -> Self {
        Self {
            ready: Vec::new(),
            opening: 0,
        }
    }
}

/// What [`WarmPool::take`] found.
#[derive(Debug)]
pub struct Taken<T> {
    /// A warm connection, if one was there.
    pub conn: Option<T>,
    /// How many connections the caller should open now and give back with
    /// [`WarmPool::put`] (each already counted as being opened).
    pub refill: usize,
}

impl<T> WarmPool<T> {
    /// A pool keeping up to `target` connections per key, each used within `max_age`;
    /// `target` 0 keeps none (every login opens its own).
    pub fn new(target: usize, max_age: Duration) -> Self {
        Self {
            slots: Mutex::new(HashMap::new()),
            target,
            max_age,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Slot<T>>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The youngest warm connection for `key` that `usable` accepts (older ones than
    /// `max_age`, and ones `usable` refuses, are dropped), and how many to open to bring the
    /// key back to its target.
    pub fn take_usable(&self, key: &str, mut usable: impl FnMut(&mut T) -> bool) -> Taken<T> {
        if self.target == 0 {
            return Taken {
                conn: None,
                refill: 0,
            };
        }
        let mut slots = self.lock();
        let slot = slots.entry(key.to_owned()).or_default();
        let now = Instant::now();
        slot.ready
            .retain(|(born, _)| now.duration_since(*born) < self.max_age);
        let mut conn = None;
        while let Some((_, mut c)) = slot.ready.pop() {
            if usable(&mut c) {
                conn = Some(c);
                break;
            }
        }
        let counter = if conn.is_some() {
            &self.hits
        } else {
            &self.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let refill = self.target.saturating_sub(slot.ready.len() + slot.opening);
        slot.opening += refill;
        Taken { conn, refill }
    }

    /// [`WarmPool::take_usable`] accepting any connection.
    pub fn take(&self, key: &str) -> Taken<T> {
        self.take_usable(key, |_| true)
    }

    /// Gives back the outcome of one opening [`WarmPool::take`] asked for: the connection,
    /// or `None` when it could not be opened.
    pub fn put(&self, key: &str, conn: Option<T>) {
        let mut slots = self.lock();
        let slot = slots.entry(key.to_owned()).or_default();
        slot.opening = slot.opening.saturating_sub(1);
        if let Some(conn) = conn
            && slot.ready.len() < self.target
        {
            slot.ready.push((Instant::now(), conn));
        }
    }

    /// Drops every warm connection for `key` (its owner went away or restarted).
    pub fn clear(&self, key: &str) {
        if let Some(slot) = self.lock().get_mut(key) {
            slot.ready.clear();
        }
    }

    /// Logins that found a warm connection, and ones that did not.
    pub fn stats(&self) -> (u64, u64) {
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
        )
    }
}

impl<T: Send + 'static> WarmPool<T> {
    /// [`WarmPool::take_usable`], with the refill it asks for started in the background:
    /// each connection opened by a future from `open` (one that fails is logged and counts
    /// as none).
    pub fn take_and_refill<F, Fut, E>(
        self: &std::sync::Arc<Self>,
        key: &str,
        usable: impl FnMut(&mut T) -> bool,
        open: F,
    ) -> Option<T>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, E>> + Send + 'static,
        E: std::fmt::Display,
    {
        let taken = self.take_usable(key, usable);
        for _ in 0..taken.refill {
            let (pool, key, opening) = (std::sync::Arc::clone(self), key.to_owned(), open());
            tokio::spawn(async move {
                let conn = opening
                    .await
                    .inspect_err(|e| {
                        tracing::debug!(%key, error = %e, "could not open a warm connection to the owner");
                    })
                    .ok();
                pool.put(&key, conn);
            });
        }
        taken.conn
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refills_what_was_taken_up_to_the_target_and_no_more() {
        let pool = WarmPool::new(2, Duration::from_secs(30));
        let t = pool.take("owner:143");
        assert!(t.conn.is_none());
        assert_eq!(t.refill, 2);
        // Taking again while those two are being opened asks for none.
        assert_eq!(pool.take("owner:143").refill, 0);
        pool.put("owner:143", Some(1));
        pool.put("owner:143", None); // one opening failed
        let t = pool.take("owner:143");
        assert_eq!(t.conn, Some(1));
        assert_eq!(t.refill, 2, "both slots are free again");
        pool.put("owner:143", Some(2));
        pool.put("owner:143", Some(3));
        assert_eq!(pool.take("other:143").conn, None, "keys are apart");
        assert_eq!(pool.take("owner:143").conn, Some(3), "the youngest first");
        assert_eq!(pool.stats(), (2, 3));
    }

    #[test]
    fn old_connections_are_dropped_and_a_zero_target_keeps_none() {
        let pool = WarmPool::new(1, Duration::from_millis(20));
        assert_eq!(pool.take("k").refill, 1);
        pool.put("k", Some("conn"));
        std::thread::sleep(Duration::from_millis(40));
        let t = pool.take("k");
        assert!(t.conn.is_none(), "too old to trust");
        assert_eq!(t.refill, 1);

        let none: WarmPool<u8> = WarmPool::new(0, Duration::from_secs(30));
        let t = none.take("k");
        assert!(t.conn.is_none() && t.refill == 0);
        none.put("k", Some(1));
        assert!(none.take("k").conn.is_none());
    }

    #[test]
    fn unusable_connections_are_dropped_on_the_way() {
        let pool = WarmPool::new(3, Duration::from_secs(30));
        assert_eq!(pool.take("k").refill, 3);
        for c in [1, 2, 3] {
            pool.put("k", Some(c));
        }
        // 3 (the youngest) is closed by its owner: 2 is taken, 3 is gone.
        let t = pool.take_usable("k", |c| *c != 3);
        assert_eq!((t.conn, t.refill), (Some(2), 2));
        assert_eq!(pool.take("k").conn, Some(1));
    }

    #[test]
    fn clear_drops_a_keys_connections() {
        let pool = WarmPool::new(2, Duration::from_secs(30));
        pool.take("k");
        pool.put("k", Some(1));
        pool.put("k", Some(2));
        pool.clear("k");
        assert!(pool.take("k").conn.is_none());
    }
}
