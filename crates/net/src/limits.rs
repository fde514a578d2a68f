//! Connection limits: [`PerIpLimiter`] counts open connections per client IP address.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

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
    fn zero_means_unlimited() {
        let limiter = PerIpLimiter::new(0);
        let a: IpAddr = [127, 0, 0, 1].into();
        let guards: Vec<_> = (0..100).filter_map(|_| limiter.try_acquire(a)).collect();
        assert_eq!(guards.len(), 100);
    }
}
