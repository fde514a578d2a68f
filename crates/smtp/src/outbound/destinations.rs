//! Per-destination concurrency (`outbound.max_per_destination`, Postfix's
//! `default_destination_concurrency_limit`): at most that many outbound sessions to one
//! destination (a recipient domain, or the relay host) at a time, node-wide.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Destinations with no session and no waiter are forgotten once there are more than this.
const KEEP_IDLE: usize = 64;

/// The sessions open per destination.
#[derive(Debug)]
pub(crate) struct Destinations {
    cap: usize,
    slots: Mutex<HashMap<String, Arc<Semaphore>>>,
}

impl Destinations {
    pub(crate) fn new(cap: usize) -> Self {
        Self {
            cap: cap.max(1),
            slots: Mutex::default(),
        }
    }

    /// The most sessions to one destination.
    pub(crate) fn cap(&self) -> usize {
        self.cap
    }

    /// A session slot for `destination`, waiting at most `wait` for one to free up; `Err`
    /// says why there is none.
    pub(crate) async fn acquire(
        &self,
        destination: &str,
        wait: Duration,
    ) -> Result<OwnedSemaphorePermit, String> {
        let slot = {
            let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            if slots.len() > KEEP_IDLE {
                // A held permit or a waiter holds a clone of its semaphore.
                slots.retain(|_, s| Arc::strong_count(s) > 1);
            }
            Arc::clone(
                slots
                    .entry(destination.to_string())
                    .or_insert_with(|| Arc::new(Semaphore::new(self.cap))),
            )
        };
        match tokio::time::timeout(wait, slot.acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            Ok(Err(_)) => Err(format!("{destination}: session slots closed")),
            Err(_) => Err(format!(
                "{destination}: {} sessions busy for {wait:?} (outbound.max_per_destination)",
                self.cap
            )),
        }
    }
}

/// Fewest entries one queue worker takes for a destination per pass (more when many are due:
/// an equal share of them per worker key). Bounded, so that a worker freed later finds
/// entries left to take rather than one worker holding all of them.
const BATCH: usize = 8;

/// The queue runner's side of the cap: spreads one pass's due entries for a destination over
/// the worker keys `outbound:DEST#0` … `#N-1` that no worker holds (round robin, a share of
/// the due entries each), so up to N workers deliver to it at once (N = the cap, at most the
/// runner's worker count). Entries beyond that wait for a later pass.
#[derive(Debug)]
pub(crate) struct Spread<'a> {
    keys: usize,
    busy: &'a HashSet<Option<String>>,
    /// Entries handed out per destination in this pass.
    taken: HashMap<String, usize>,
}

impl<'a> Spread<'a> {
    pub(crate) fn new(keys: usize, busy: &'a HashSet<Option<String>>) -> Self {
        Self {
            keys: keys.max(1),
            busy,
            taken: HashMap::new(),
        }
    }

    /// The worker key of the next entry for `destination`, of which `due` entries are due in
    /// this pass; `None` when every free worker key has its share (the entry waits for a
    /// later pass).
    pub(crate) fn key(&mut self, destination: &str, due: usize) -> Option<String> {
        let share = due.div_ceil(self.keys).max(BATCH);
        let free: Vec<String> = (0..self.keys)
            .map(|j| format!("outbound:{destination}#{j}"))
            .filter(|k| !self.busy.contains(&Some(k.clone())))
            .collect();
        let taken = self.taken.entry(destination.to_string()).or_default();
        if *taken >= free.len() * share {
            return None;
        }
        *taken += 1;
        Some(free[(*taken - 1) % free.len()].clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_destination_gets_at_most_cap_sessions() {
        let d = Destinations::new(2);
        let a = d
            .acquire("x.test", Duration::from_millis(10))
            .await
            .unwrap();
        let _b = d
            .acquire("x.test", Duration::from_millis(10))
            .await
            .unwrap();
        assert!(
            d.acquire("x.test", Duration::from_millis(10))
                .await
                .is_err()
        );
        // Other destinations are not held up.
        let _c = d
            .acquire("y.test", Duration::from_millis(10))
            .await
            .unwrap();
        drop(a);
        assert!(d.acquire("x.test", Duration::from_millis(10)).await.is_ok());
    }

    #[test]
    fn entries_spread_over_free_keys_only() {
        let mut busy = HashSet::new();
        busy.insert(Some("outbound:x.test#0".to_string()));
        let mut spread = Spread::new(3, &busy);
        let keys: Vec<Option<String>> = (0..2 * BATCH + 1)
            .map(|_| spread.key("x.test", 2 * BATCH + 1))
            .collect();
        assert_eq!(
            keys[..3],
            [
                Some("outbound:x.test#1".into()),
                Some("outbound:x.test#2".into()),
                Some("outbound:x.test#1".into())
            ]
        );
        // Two free keys, a batch each: the rest waits.
        assert!(keys[..2 * BATCH].iter().all(Option::is_some));
        assert_eq!(keys[2 * BATCH], None);
        assert_eq!(
            spread.key("y.test", 1).as_deref(),
            Some("outbound:y.test#0")
        );
        busy.insert(Some("outbound:z.test#0".to_string()));
        let mut spread = Spread::new(1, &busy);
        assert_eq!(spread.key("z.test", 1), None);
        // Many due: a share of them per key (of three), not just a batch.
        let busy = HashSet::new();
        let mut spread = Spread::new(3, &busy);
        let given = (0..300)
            .filter(|_| spread.key("w.test", 300).is_some())
            .count();
        assert_eq!(given, 300);
    }

    #[tokio::test]
    async fn idle_destinations_are_forgotten() {
        let d = Destinations::new(1);
        for i in 0..=KEEP_IDLE + 1 {
            drop(
                d.acquire(&format!("d{i}.test"), Duration::from_millis(10))
                    .await,
            );
        }
        assert!(d.slots.lock().unwrap().len() <= KEEP_IDLE + 1);
    }
}
