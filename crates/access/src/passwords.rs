//! [`PasswordChecker`]: the one place every login protocol (POP3, IMAP, SMTP AUTH) checks a
//! password (#13 point 5). Argon2 is costly (memory and CPU), so:
//!
//! - at most `node_limit` checks run at once on the node (sized to the cores) and at most
//!   `per_ip_limit` for one client address (IPv6 by /64). A check over either bound waits its
//!   turn, but in a bounded line: at most `max_wait`, behind at most `node_waiting` others on
//!   the node and `per_ip_waiting` of its own address; past those the answer is
//!   [`Check::Busy`] at once (a temporary error for the client). So an office whose users all
//!   come from one NAT address and open their mail at nine is served in turn, while a guesser
//!   with sixty connections holds at most its few slots and gets quick refusals;
//! - a verified-credentials cache (Dovecot's auth cache): in memory only, keyed by an HMAC with a
//!   random per-process key of the account's canonical name and the password, for a short TTL.
//!   A hit is honoured only while the account's stored hash and `enabled` flag are what they
//!   were when the password was verified, so `passwd`, `disable` and `delete` drop it at once.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use ds_directory::Directory;
use ring::hmac;
use ring::rand::SecureRandom;

use crate::throttle::ip_key;

/// How long a verified password is remembered.
pub const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(5 * 60);
/// Most remembered credentials.
const MAX_CACHED: usize = 10_000;

/// The outcome of a password check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// The account exists, is enabled, and the password is right.
    Ok,
    /// Wrong password, unknown or disabled account (the same work either way).
    Bad,
    /// Too many checks in progress (node-wide or for this client): try again later.
    Busy,
}

/// Bounds for [`PasswordChecker`].
#[derive(Debug, Clone)]
pub struct CheckerConfig {
    /// Argon2 checks at once on the node.
    pub node_limit: usize,
    /// Argon2 checks at once for one client address (IPv6 by /64).
    pub per_ip_limit: u32,
    /// Checks of one client address running or waiting their turn; more are [`Check::Busy`].
    pub per_ip_waiting: u32,
    /// Checks waiting for one of the node's slots; more are [`Check::Busy`].
    pub node_waiting: usize,
    /// Longest a check waits for its turn before it is [`Check::Busy`].
    pub max_wait: Duration,
    /// Lifetime of a cached verified password; zero disables the cache.
    pub cache_ttl: Duration,
}

impl Default for CheckerConfig {
    fn default() -> Self {
        Self {
            node_limit: std::thread::available_parallelism().map_or(2, |n| n.get()),
            per_ip_limit: 2,
            per_ip_waiting: 16,
            node_waiting: 64,
            max_wait: Duration::from_secs(5),
            cache_ttl: DEFAULT_CACHE_TTL,
        }
    }
}

struct Cached {
    password_hash: String,
    until: Instant,
}

/// Bounded, cached password checks; share one per node (`Arc`).
pub struct PasswordChecker {
    directory: Directory,
    config: CheckerConfig,
    node: std::sync::Arc<tokio::sync::Semaphore>,
    per_ip: Mutex<HashMap<IpAddr, IpLine>>,
    /// Checks waiting for a node slot.
    node_waiting: std::sync::atomic::AtomicUsize,
    cache: Mutex<HashMap<[u8; 32], Cached>>,
    key: hmac::Key,
    argon2_runs: AtomicU64,
    cache_hits: AtomicU64,
    running: AtomicU64,
    peak: AtomicU64,
}

impl std::fmt::Debug for PasswordChecker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PasswordChecker")
            .field("config", &self.config)
            .field("argon2_runs", &self.argon2_runs())
            .finish_non_exhaustive()
    }
}

/// One client address's checks: its slots, and how many checks hold or wait for one.
struct IpLine {
    slots: std::sync::Arc<tokio::sync::Semaphore>,
    users: u32,
}

/// Leaves a client address's line (the map entry goes with its last user).
struct IpSlot<'a> {
    checker: &'a PasswordChecker,
    ip: IpAddr,
}

impl Drop for IpSlot<'_> {
    fn drop(&mut self) {
        let mut per_ip = self
            .checker
            .per_ip
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(line) = per_ip.get_mut(&self.ip) {
            line.users -= 1;
            if line.users == 0 {
                per_ip.remove(&self.ip);
            }
        }
    }
}

impl PasswordChecker {
    /// The node's shared checker when one is given, else one of its own with the default
    /// bounds (a protocol service started alone, in tests).
    pub fn shared_or_default(
        shared: Option<std::sync::Arc<Self>>,
        directory: &Directory,
    ) -> std::sync::Arc<Self> {
        shared.unwrap_or_else(|| {
            std::sync::Arc::new(Self::new(directory.clone(), CheckerConfig::default()))
        })
    }

    pub fn new(directory: Directory, config: CheckerConfig) -> Self {
        let mut key = [0u8; 32];
        // Without randomness the key is still unknown outside the process memory; never fails
        // in practice.
        let _ = ring::rand::SystemRandom::new().fill(&mut key);
        Self {
            directory,
            node: std::sync::Arc::new(tokio::sync::Semaphore::new(config.node_limit.max(1))),
            config,
            per_ip: Mutex::default(),
            node_waiting: std::sync::atomic::AtomicUsize::new(0),
            cache: Mutex::default(),
            key: hmac::Key::new(hmac::HMAC_SHA256, &key),
            argon2_runs: AtomicU64::new(0),
            cache_hits: AtomicU64::new(0),
            running: AtomicU64::new(0),
            peak: AtomicU64::new(0),
        }
    }

    /// Argon2 checks run so far (for tests and metrics).
    pub fn argon2_runs(&self) -> u64 {
        self.argon2_runs.load(Ordering::Relaxed)
    }

    /// Most Argon2 checks that ran at the same time so far.
    pub fn peak_running(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }

    /// Logins answered from the cache so far.
    pub fn cache_hits(&self) -> u64 {
        self.cache_hits.load(Ordering::Relaxed)
    }

    fn cache_key(&self, address: &str, password: &str) -> [u8; 32] {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(address.to_ascii_lowercase().as_bytes());
        ctx.update(&[0]);
        ctx.update(password.as_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.sign().as_ref());
        out
    }

    /// Checks `password` for the account `address` (canonical; an unknown name costs the same
    /// work as a wrong password) for a client at `ip`.
    pub async fn check(&self, ip: IpAddr, address: &str, password: &str) -> crate::Result<Check> {
        let account = self.directory.account(address).map_err(directory_error)?;
        let key = self.cache_key(address, password);
        let remembered = || {
            let hit = account
                .as_ref()
                .is_some_and(|a| a.enabled && self.cached(&key, &a.password_hash));
            if hit {
                self.cache_hits.fetch_add(1, Ordering::Relaxed);
            }
            hit
        };
        if remembered() {
            return Ok(Check::Ok);
        }
        let ip = ip_key(ip);
        let (_line, slots) = {
            let mut per_ip = self.per_ip.lock().unwrap_or_else(PoisonError::into_inner);
            let line = per_ip.entry(ip).or_insert_with(|| IpLine {
                slots: std::sync::Arc::new(tokio::sync::Semaphore::new(
                    self.config.per_ip_limit.max(1) as usize,
                )),
                users: 0,
            });
            if line.users >= self.config.per_ip_waiting.max(self.config.per_ip_limit) {
                tracing::info!(%ip, "password check refused: too many in progress for this client");
                return Ok(Check::Busy);
            }
            line.users += 1;
            (
                IpSlot { checker: self, ip },
                std::sync::Arc::clone(&line.slots),
            )
        };
        let Ok(Ok(_ip_permit)) =
            tokio::time::timeout(self.config.max_wait, slots.acquire_owned()).await
        else {
            tracing::info!(%ip, "password check refused: this client's checks waited too long");
            return Ok(Check::Busy);
        };
        let Some(_permit) = self.node_slot().await else {
            return Ok(Check::Busy);
        };
        // A check that waited in line may find its answer remembered meanwhile (a client
        // that opened several connections at once with the same password).
        if remembered() {
            return Ok(Check::Ok);
        }
        self.argon2_runs.fetch_add(1, Ordering::Relaxed);
        let now_running = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now_running, Ordering::SeqCst);
        let directory = self.directory.clone();
        let (address, password) = (address.to_owned(), password.to_owned());
        let ok =
            tokio::task::spawn_blocking(move || directory.verify_password(&address, &password))
                .await;
        self.running.fetch_sub(1, Ordering::SeqCst);
        let ok = ok
            .map_err(|e| crate::Error::Check(format!("task: {e}")))?
            .map_err(directory_error)?;
        if !ok {
            return Ok(Check::Bad);
        }
        if let Some(account) = account {
            self.remember(key, account.password_hash);
        }
        Ok(Check::Ok)
    }

    /// One of the node's Argon2 slots, waiting in the bounded line for it; `None` when the
    /// line is full or the wait too long.
    async fn node_slot(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        if let Ok(permit) = std::sync::Arc::clone(&self.node).try_acquire_owned() {
            return Some(permit);
        }
        let waiting = self.node_waiting.fetch_add(1, Ordering::SeqCst);
        let permit = if waiting >= self.config.node_waiting {
            None
        } else {
            tokio::time::timeout(
                self.config.max_wait,
                std::sync::Arc::clone(&self.node).acquire_owned(),
            )
            .await
            .ok()
            .and_then(Result::ok)
        };
        self.node_waiting.fetch_sub(1, Ordering::SeqCst);
        if permit.is_none() {
            tracing::warn!("password check refused: the node's Argon2 slots stayed busy");
        }
        permit
    }

    fn cached(&self, key: &[u8; 32], password_hash: &str) -> bool {
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        match cache.get(key) {
            Some(c) if c.until > Instant::now() && c.password_hash == password_hash => true,
            Some(_) => {
                cache.remove(key);
                false
            }
            None => false,
        }
    }

    fn remember(&self, key: [u8; 32], password_hash: String) {
        if self.config.cache_ttl.is_zero() {
            return;
        }
        let now = Instant::now();
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        if cache.len() >= MAX_CACHED {
            cache.retain(|_, c| c.until > now);
            if cache.len() >= MAX_CACHED {
                cache.clear();
            }
        }
        cache.insert(
            key,
            Cached {
                password_hash,
                until: now + self.config.cache_ttl,
            },
        );
    }
}

fn directory_error(e: ds_directory::Error) -> crate::Error {
    crate::Error::Check(format!("directory: {e}"))
}
