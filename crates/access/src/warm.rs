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
//!
//! A connection can also come back after use ([`Loan::give_back`], IMAP after `UNAUTHENTICATE`
//! on the owner): one a login took is on loan, and counts against the target until it is given
//! back or its [`Loan`] is dropped, so a front node whose owner links come back opens none.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
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
    /// Connections in use that may come back ([`Loan`]s), counted against `target`.
    lent: usize,
}

impl<T> Default for Slot<T> {
    fn default() -> Self {
        Self {
            ready: Vec::new(),
            opening: 0,
            lent: 0,
        }
    }
}

/// How many given-back connections a key may keep, as a multiple of the target: a front node
/// with several sessions at once gets their links back, still within the owner's connection
/// limits (each waits at most `max_age`).
const GIVEN_BACK_PER_TARGET: usize = 4;

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
    pub fn take_usable(&self, key: &str, usable: impl FnMut(&mut T) -> bool) -> Taken<T> {
        self.take_inner(key, usable, false)
    }

    fn take_inner(
        &self,
        key: &str,
        mut usable: impl FnMut(&mut T) -> bool,
        lend: bool,
    ) -> Taken<T> {
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
        if lend {
            slot.lent += 1;
        }
        let refill = self
            .target
            .saturating_sub(slot.ready.len() + slot.opening + slot.lent);
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

    /// A used connection is back and ready for another login: kept (the youngest first) while
    /// the key holds fewer than [`GIVEN_BACK_PER_TARGET`] × target.
    fn give_back(&self, key: &str, conn: Option<T>) {
        let mut slots = self.lock();
        let slot = slots.entry(key.to_owned()).or_default();
        slot.lent = slot.lent.saturating_sub(1);
        if let Some(conn) = conn
            && slot.ready.len() < self.target * GIVEN_BACK_PER_TARGET
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

/// A connection a login took from a [`WarmPool`] (or opened itself) that may come back: it
/// counts against the key's target until [`Loan::give_back`], or until the loan is dropped (the
/// connection is gone).
#[derive(Debug)]
pub struct Loan<T> {
    pool: Arc<WarmPool<T>>,
    key: String,
    open: bool,
}

impl<T> Loan<T> {
    /// The connection is ready for another login: back in the pool.
    pub fn give_back(mut self, conn: T) {
        self.open = false;
        self.pool.give_back(&self.key, Some(conn));
    }
}

impl<T> Drop for Loan<T> {
    fn drop(&mut self) {
        if self.open {
            self.pool.give_back(&self.key, None);
        }
    }
}

impl<T: Send + 'static> WarmPool<T> {
    /// [`WarmPool::take_usable`], with the refill it asks for started in the background:
    /// each connection opened by a future from `open` (one that fails is logged and counts
    /// as none).
    pub fn take_and_refill<F, Fut, E>(
        self: &Arc<Self>,
        key: &str,
        usable: impl FnMut(&mut T) -> bool,
        open: F,
    ) -> Option<T>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, E>> + Send + 'static,
        E: std::fmt::Display,
    {
        self.take_and_refill_inner(key, usable, open, false).0
    }

    /// [`WarmPool::take_and_refill`] for a connection that may come back: the one taken (or, if
    /// none, the one the caller opens itself) is on [`Loan`] (`None` with a zero target).
    pub fn lend_and_refill<F, Fut, E>(
        self: &Arc<Self>,
        key: &str,
        usable: impl FnMut(&mut T) -> bool,
        open: F,
    ) -> (Option<T>, Option<Loan<T>>)
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, E>> + Send + 'static,
        E: std::fmt::Display,
    {
        self.take_and_refill_inner(key, usable, open, true)
    }

    fn take_and_refill_inner<F, Fut, E>(
        self: &Arc<Self>,
        key: &str,
        usable: impl FnMut(&mut T) -> bool,
        open: F,
        lend: bool,
    ) -> (Option<T>, Option<Loan<T>>)
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, E>> + Send + 'static,
        E: std::fmt::Display,
    {
        let lend = lend && self.target > 0;
        let taken = self.take_inner(key, usable, lend);
        let loan = lend.then(|| Loan {
            pool: Arc::clone(self),
            key: key.to_owned(),
            open: true,
        });
        for _ in 0..taken.refill {
            let (pool, key, opening) = (Arc::clone(self), key.to_owned(), open());
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
        (taken.conn, loan)
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

    #[tokio::test]
    async fn a_connection_on_loan_counts_until_it_is_back_or_gone() {
        let pool = Arc::new(WarmPool::new(1, Duration::from_secs(30)));
        let opened = Arc::new(AtomicU64::new(0));
        let open = || {
            let opened = Arc::clone(&opened);
            async move { Ok::<_, String>(opened.fetch_add(1, Ordering::Relaxed) + 100) }
        };
        // Nothing warm: the caller opens its own, on loan, and that fills the target.
        let (conn, loan) = pool.lend_and_refill("k", |_| true, open);
        assert!(conn.is_none());
        let loan = loan.expect("a loan");
        tokio::task::yield_now().await;
        assert_eq!(
            opened.load(Ordering::Relaxed),
            0,
            "the loan counts against the target"
        );
        loan.give_back(7);
        // The next login takes it back, and again no refill is opened.
        let (conn, loan) = pool.lend_and_refill("k", |_| true, open);
        assert_eq!(conn, Some(7));
        tokio::task::yield_now().await;
        assert_eq!(opened.load(Ordering::Relaxed), 0);
        // This one is not given back: the next login refills.
        drop(loan);
        let (conn, _loan) = pool.lend_and_refill("k", |_| true, open);
        assert!(conn.is_none());
        assert_eq!(pool.take("k").refill, 0, "the loan holds the one slot");
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
