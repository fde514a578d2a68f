//! Connection limits: [`PerIpLimiter`] counts open connections per client IP address;
//! [`BodyBudget`] bounds the bytes of message bodies held in memory node-wide.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

/// The node-wide budget for message bodies in flight: octets buffered in memory for messages
/// being received (SMTP DATA, IMAP APPEND). A receiver takes its share before it buffers and
/// gives it back when the message is stored or dropped; when the budget is spent, the message is
/// refused with a temporary error. Reported as the gauge `dshare_bodies_in_flight_bytes` and the
/// counter `dshare_bodies_in_flight_refused_total`.
#[derive(Clone, Debug)]
pub struct BodyBudget {
    cap: u64,
    used: Arc<AtomicU64>,
}

impl BodyBudget {
    /// A budget of `cap` octets (0 = none may be taken).
    pub fn new(cap: u64) -> Self {
        Self {
            cap,
            used: Arc::default(),
        }
    }

    /// Takes `n` octets; `None` (and a refusal counted) if that would pass the cap.
    pub fn try_take(&self, n: u64) -> Option<BudgetGuard> {
        let taken = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(n).filter(|&total| total <= self.cap)
            });
        match taken {
            Ok(before) => {
                metrics::gauge!("dshare_bodies_in_flight_bytes").set((before + n) as f64);
                Some(BudgetGuard {
                    n,
                    used: Arc::clone(&self.used),
                })
            }
            Err(_) => {
                metrics::counter!("dshare_bodies_in_flight_refused_total").increment(1);
                None
            }
        }
    }

    /// Octets taken now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }
}

/// A share of a [`BodyBudget`]; dropping it gives the share back.
#[derive(Debug)]
pub struct BudgetGuard {
    n: u64,
    used: Arc<AtomicU64>,
}

impl Drop for BudgetGuard {
    fn drop(&mut self) {
        let before = self.used.fetch_sub(self.n, Ordering::AcqRel);
        metrics::gauge!("dshare_bodies_in_flight_bytes").set(before.saturating_sub(self.n) as f64);
    }
}

/// Counts open connections per IP address and refuses more than `max` at a time.
#[derive(Clone, Debug)]
pub struct PerIpLimiter {
    /// Connections allowed per address; 0 = no limit.
    max: usize,
    /// Open connections per address; an address with none has no entry, so the map is bounded by the
    /// number of open connections.
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl PerIpLimiter {
    /// A limiter allowing `max` connections per address (0 = no limit).
    pub fn new(max: usize) -> Self {
        Self {
            max,
            open: Arc::default(),
        }
    }

    /// Count one more connection from `ip`; `None` if the address is at its limit. The connection
    /// counts until the guard is dropped.
    pub fn try_acquire(&self, ip: IpAddr) -> Option<PerIpGuard> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let count = open.entry(ip).or_insert(0);
        if self.max != 0 && *count >= self.max {
            return None;
        }
        *count += 1;
        Some(PerIpGuard {
            ip,
            open: Arc::clone(&self.open),
        })
    }

    /// Connections currently open from `ip`.
    pub fn count(&self, ip: IpAddr) -> usize {
        let open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        open.get(&ip).copied().unwrap_or(0)
    }
}

/// A connection's [`PerIpGuard`], shared with its session ([`crate::ConnContext::ip_slot`]): a
/// session that learns the connection comes from a cluster peer (a verified forwarding proof)
/// releases it, so the sessions a front node forwards do not count against the limit its one
/// address would otherwise reach (the listener's total limit still applies). Default: no slot.
#[derive(Clone, Default)]
pub struct IpSlot(Arc<Mutex<Option<PerIpGuard>>>);

impl IpSlot {
    /// A handle on `guard`.
    pub fn new(guard: PerIpGuard) -> Self {
        Self(Arc::new(Mutex::new(Some(guard))))
    }

    /// The connection no longer counts against its address's limit.
    pub fn release(&self) {
        let guard = self.0.lock().unwrap_or_else(PoisonError::into_inner).take();
        drop(guard);
    }
}

impl std::fmt::Debug for IpSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let held = self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some();
        f.debug_tuple("IpSlot").field(&held).finish()
    }
}

/// One counted connection; dropping it releases the slot.
#[derive(Debug)]
pub struct PerIpGuard {
    ip: IpAddr,
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl Drop for PerIpGuard {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.ip) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_per_address_and_releases_on_drop() {
        let limiter = PerIpLimiter::new(2);
        let a: IpAddr = [127, 0, 0, 1].into();
        let b: IpAddr = [127, 0, 0, 2].into();
        let g1 = limiter.try_acquire(a).unwrap();
        let _g2 = limiter.try_acquire(a).unwrap();
        assert!(limiter.try_acquire(a).is_none());
        assert!(limiter.try_acquire(b).is_some());
        drop(g1);
        assert_eq!(limiter.count(a), 1);
        assert!(limiter.try_acquire(a).is_some());
        assert_eq!(limiter.count(b), 0);
    }

    #[test]
    fn body_budget_refuses_past_the_cap_and_gives_back_on_drop() {
        let budget = BodyBudget::new(100);
        let a = budget.try_take(60).unwrap();
        assert!(budget.try_take(41).is_none());
        let b = budget.try_take(40).unwrap();
        assert_eq!(budget.used(), 100);
        drop(a);
        assert_eq!(budget.used(), 40);
        drop(b);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn a_released_slot_frees_its_place_once() {
        let limiter = PerIpLimiter::new(1);
        let ip: IpAddr = "198.51.100.7".parse().unwrap();
        let slot = IpSlot::new(limiter.try_acquire(ip).unwrap());
        let held_by_the_session = slot.clone();
        assert!(limiter.try_acquire(ip).is_none());
        held_by_the_session.release();
        assert_eq!(limiter.count(ip), 0);
        let other = limiter.try_acquire(ip).expect("the place is free");
        slot.release();
        assert_eq!(limiter.count(ip), 1, "a second release frees nothing more");
        drop(other);
    }

    #[test]
    fn zero_means_unlimited() {
        let limiter = PerIpLimiter::new(0);
        let a: IpAddr = [127, 0, 0, 1].into();
        let guards: Vec<_> = (0..100).filter_map(|_| limiter.try_acquire(a)).collect();
        assert_eq!(guards.len(), 100);
    }
}
