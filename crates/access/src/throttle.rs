//! [`LoginThrottle`]: a growing delay after failed logins, per client IP address and per account
//! (DESIGN.md §9). Each failure doubles the delay (from `base` up to `max`); a key that has been
//! quiet for `forget_after` starts over. One throttle is shared by every login protocol of a node
//! (POP3, IMAP, SMTP AUTH), so a guesser cannot switch protocols to start over.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// The key a client address is counted under: an IPv6 address by its /64 (one host usually
/// has a whole /64), an IPv4-mapped IPv6 address as IPv4.
pub fn ip_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let bits = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(std::net::Ipv6Addr::from(bits))
            }
        },
    }
}

/// The throttle's knobs.
#[derive(Clone, Debug)]
pub struct ThrottleConfig {
    /// Delay after the first failure.
    pub base: Duration,
    /// Longest delay.
    pub max: Duration,
    /// A key with no failure for this long is forgotten.
    pub forget_after: Duration,
    /// Most keys remembered per kind (IPs, accounts); beyond it the oldest quiet ones are dropped.
    pub max_entries: usize,
}

impl Default for ThrottleConfig {
    fn default() -> Self {
        Self {
            base: Duration::from_millis(500),
            max: Duration::from_secs(8),
            forget_after: Duration::from_secs(15 * 60),
            max_entries: 100_000,
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    failures: u32,
    last: Instant,
}

#[derive(Debug)]
struct Table<K> {
    entries: HashMap<K, Entry>,
}

impl<K: Hash + Eq + Clone> Table<K> {
    fn delay(&self, key: &K, cfg: &ThrottleConfig, now: Instant) -> Duration {
        match self.entries.get(key) {
            Some(e) if now.duration_since(e.last) < cfg.forget_after && e.failures > 0 => {
                let shift = (e.failures - 1).min(30);
                cfg.base.saturating_mul(1u32 << shift).min(cfg.max)
            }
            _ => Duration::ZERO,
        }
    }

    fn fail(&mut self, key: &K, cfg: &ThrottleConfig, now: Instant) {
        // At least one key, or there would be no median to cut at (and nothing to throttle).
        let max_entries = cfg.max_entries.max(1);
        if self.entries.len() >= max_entries && !self.entries.contains_key(key) {
            self.entries
                .retain(|_, e| now.duration_since(e.last) < cfg.forget_after);
            if self.entries.len() >= max_entries {
                // Still full of live keys: drop the oldest half rather than grow without bound.
                let mut ages: Vec<Instant> = self.entries.values().map(|e| e.last).collect();
                ages.sort_unstable();
                if let Some(&cut) = ages.get(ages.len() / 2) {
                    self.entries.retain(|_, e| e.last > cut);
                }
            }
        }
        let entry = self.entries.entry(key.clone()).or_insert(Entry {
            failures: 0,
            last: now,
        });
        if now.duration_since(entry.last) >= cfg.forget_after {
            entry.failures = 0;
        }
        entry.failures = entry.failures.saturating_add(1);
        entry.last = now;
    }

    fn forget(&mut self, key: &K) {
        self.entries.remove(key);
    }
}

/// Growing delays after failed logins, per client IP and per account. Cheap to share (`Arc`).
#[derive(Debug)]
pub struct LoginThrottle {
    config: ThrottleConfig,
    ips: Mutex<Table<IpAddr>>,
    accounts: Mutex<Table<String>>,
}

impl Default for LoginThrottle {
    fn default() -> Self {
        Self::new(ThrottleConfig::default())
    }
}

impl LoginThrottle {
    /// A throttle with these knobs.
    pub fn new(config: ThrottleConfig) -> Self {
        Self {
            config,
            ips: Mutex::new(Table {
                entries: HashMap::new(),
            }),
            accounts: Mutex::new(Table {
                entries: HashMap::new(),
            }),
        }
    }

    /// How long to wait before checking a login from `ip` for `account` (the larger of the two
    /// delays; zero when neither failed lately).
    pub fn delay(&self, ip: IpAddr, account: Option<&str>) -> Duration {
        let now = Instant::now();
        let by_ip = self
            .ips
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .delay(&ip_key(ip), &self.config, now);
        let by_account = account.map_or(Duration::ZERO, |a| {
            self.accounts
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .delay(&a.to_ascii_lowercase(), &self.config, now)
        });
        by_ip.max(by_account)
    }

    /// Count a failed login from `ip` (for `account`, when the name resolved to one).
    pub fn record_failure(&self, ip: IpAddr, account: Option<&str>) {
        let now = Instant::now();
        self.ips
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .fail(&ip_key(ip), &self.config, now);
        if let Some(a) = account {
            self.accounts
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .fail(&a.to_ascii_lowercase(), &self.config, now);
        }
    }

    /// A successful login for `account`: its failures are forgotten. The IP's are kept, so one good
    /// account does not reset an address that is guessing others.
    pub fn record_success(&self, account: &str) {
        self.accounts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .forget(&account.to_ascii_lowercase());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));
    const OTHER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 2));

    #[tokio::test(start_paused = true)]
    async fn doubles_caps_and_forgets() {
        let t = LoginThrottle::default();
        assert_eq!(t.delay(IP, Some("a@x")), Duration::ZERO);
        let mut seen = vec![];
        for _ in 0..7 {
            t.record_failure(IP, Some("a@x"));
            seen.push(t.delay(IP, None).as_millis());
        }
        assert_eq!(seen, [500, 1000, 2000, 4000, 8000, 8000, 8000]);
        // The account is throttled from another address too, and names are case-insensitive.
        assert_eq!(t.delay(OTHER, Some("A@X")), Duration::from_secs(8));
        assert_eq!(t.delay(OTHER, Some("b@x")), Duration::ZERO);
        tokio::time::advance(Duration::from_secs(14 * 60)).await;
        assert_eq!(t.delay(IP, None), Duration::from_secs(8));
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(t.delay(IP, Some("a@x")), Duration::ZERO);
        // After the quiet period a failure starts over.
        t.record_failure(IP, None);
        assert_eq!(t.delay(IP, None), Duration::from_millis(500));
    }

    #[tokio::test(start_paused = true)]
    async fn success_forgets_the_account_not_the_ip() {
        let t = LoginThrottle::default();
        t.record_failure(IP, Some("a@x"));
        t.record_failure(IP, Some("a@x"));
        t.record_success("a@x");
        assert_eq!(t.delay(OTHER, Some("a@x")), Duration::ZERO);
        assert_eq!(t.delay(IP, Some("a@x")), Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn bounded() {
        let t = LoginThrottle::new(ThrottleConfig {
            max_entries: 10,
            ..ThrottleConfig::default()
        });
        for i in 0..100u8 {
            t.record_failure(IpAddr::V4([10, 0, 0, i].into()), None);
            tokio::time::advance(Duration::from_millis(1)).await;
        }
        assert!(t.ips.lock().unwrap().entries.len() <= 10);
        assert!(t.delay(IpAddr::V4([10, 0, 0, 99].into()), None) > Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn zero_max_entries_does_not_panic() {
        let t = LoginThrottle::new(ThrottleConfig {
            max_entries: 0,
            ..ThrottleConfig::default()
        });
        t.record_failure(IP, Some("a@x"));
        t.record_failure(OTHER, Some("b@x"));
        assert!(t.ips.lock().unwrap().entries.len() <= 1);
        assert_eq!(t.delay(OTHER, Some("b@x")), Duration::from_millis(500));
    }
}
