//! A whole node: configuration, storage, directory, cluster, protocol listeners, admin
//! service and metrics, wired together. The `dshare` binary and the test kit both start
//! nodes through [`Node::start`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use ds_cluster::{ClusterConfig, Endpoints, Location, Locator, PeerConfig, Purpose};
use ds_directory::{Account, Directory, Domains, HashCost, Outcome};
use ds_net::{ListenOptions, TlsAcceptor};
use ds_net::{Shutdown, ShutdownTrigger, shutdown_pair};
use ds_store::{MailStore, QueueStore, Store, unix_now};

pub mod admin;
pub mod check;
pub mod config;
pub mod doctor;
pub mod keys;
mod metrics_http;
pub mod queue_admin;
pub mod status;
pub mod telemetry;

pub use config::Config;
pub use keys::ClusterKeys;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("configuration: {0}")]
    Config(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] ds_store::Error),
    #[error(transparent)]
    Directory(#[from] ds_directory::Error),
    #[error(transparent)]
    Net(#[from] ds_net::Error),
    #[error(transparent)]
    Cluster(#[from] ds_cluster::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// Hex of `n` random bytes.
pub(crate) fn random_hex(n: usize) -> String {
    let bytes: Vec<u8> = (0..n).map(|_| rand::random::<u8>()).collect();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes a file only its owner may read (mode 0600 on Unix, also when it already exists).
pub fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    // `mode` only applies to a new file: tighten one that existed.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    f.write_all(data)?;
    f.sync_all()
}

/// The addresses a started node actually listens on (ports resolved when configured as 0).
#[derive(Debug, Clone, Default)]
pub struct BoundAddrs {
    pub smtp: Vec<SocketAddr>,
    pub pop3: Vec<SocketAddr>,
    pub pop3s: Vec<SocketAddr>,
    pub imap: Vec<SocketAddr>,
    pub imaps: Vec<SocketAddr>,
    pub submission: Vec<SocketAddr>,
    pub submissions: Vec<SocketAddr>,
    pub minger: Vec<SocketAddr>,
    pub admin: Vec<SocketAddr>,
    pub metrics: Vec<SocketAddr>,
}

/// What every part of a running node shares.
pub struct NodeState {
    pub config: Config,
    pub data_dir: PathBuf,
    pub store: Store,
    pub directory: Directory,
    pub locator: Locator,
    pub mail: MailStore,
    pub queue: QueueStore,
    /// Wakes the queue runner after an operator's `queue retry`.
    queue_wake: Arc<tokio::sync::Notify>,
    /// The last hour of samples, for the status page.
    pub history: status::History,
    pub started: std::time::Instant,
    /// TLS to peers, verified against the cluster CA (`None` without a CA: no peers).
    pub peer_tls: Option<Arc<rustls::ClientConfig>>,
}

impl NodeState {
    /// Creates an account after every peer reserved its address (the creation guard).
    pub async fn create_account(
        &self,
        name: &str,
        password: &str,
        force: bool,
    ) -> std::result::Result<Account, tonic::Status> {
        let account = self
            .locator
            .create_account(name, password, force, unix_now())
            .await
            .map_err(guard_status)?;
        // A new account starts empty even where one of that name was deleted.
        self.mail
            .create_account(&account.address)
            .map_err(|e| tonic::Status::internal(e.to_string()))?;
        self.store
            .flush_async()
            .await
            .map_err(|e| tonic::Status::internal(e.to_string()))?;
        Ok(account)
    }

    /// Adds an alias to a local account after every peer reserved the alias's address (the
    /// creation guard), so it cannot name an account or alias elsewhere in the cluster.
    pub async fn create_alias(
        &self,
        alias: &str,
        account: &str,
        force: bool,
    ) -> std::result::Result<(), tonic::Status> {
        self.locator
            .create_alias(alias, account, force)
            .await
            .map_err(guard_status)
    }

    /// Creates a mailing list under the creation guard (peers' lists of the same name are
    /// list sharing and allowed; their accounts and aliases are not).
    pub async fn create_list(
        &self,
        name: &str,
        force: bool,
    ) -> std::result::Result<ds_directory::MailingList, tonic::Status> {
        self.locator
            .create_list(name, force)
            .await
            .map_err(guard_status)
    }

    /// Enables or disables an account; either way every peer drops what it cached about
    /// it, so a re-enabled account is not refused from a stale "cannot receive".
    pub async fn set_enabled(
        &self,
        name: &str,
        enabled: bool,
    ) -> std::result::Result<(), tonic::Status> {
        self.directory
            .set_enabled(name, enabled)
            .map_err(admin::status)?;
        let addr = self
            .directory
            .served_address(name)
            .map_err(admin::status)?
            .to_string();
        self.account_gone(&addr).await;
        Ok(())
    }

    /// Deletes an account, its aliases and its mailboxes, and drops it from peers' caches.
    pub async fn delete_account(&self, name: &str) -> std::result::Result<Account, tonic::Status> {
        let account = self.directory.delete_account(name).map_err(admin::status)?;
        self.mail
            .delete_account(&account.address)
            .map_err(|e| tonic::Status::internal(e.to_string()))?;
        self.store
            .flush_async()
            .await
            .map_err(|e| tonic::Status::internal(e.to_string()))?;
        self.account_gone(&account.address).await;
        Ok(account)
    }

    /// Moves a local account with its mail to peer `to` (DESIGN.md §11); progress is
    /// logged. An account that lives elsewhere is refused with where it lives.
    pub async fn move_account(
        &self,
        name: &str,
        to: &str,
        dry_run: bool,
    ) -> std::result::Result<ds_cluster::MoveReport, tonic::Status> {
        let address = self
            .directory
            .served_address(name)
            .map_err(admin::status)?
            .to_string();
        let is_local = self
            .directory
            .account(&address)
            .map_err(admin::status)?
            .is_some();
        if !is_local
            && self
                .directory
                .alias_of(&address)
                .map_err(admin::status)?
                .is_none()
            && let Location::Remote(owner) = self.locator.locate(&address, Purpose::Admin).await
        {
            return Err(tonic::Status::failed_precondition(format!(
                "{address} lives on node {}; run the move there",
                owner.node
            )));
        }
        let last = std::sync::Mutex::new(std::time::Instant::now());
        let started = std::time::Instant::now();
        let progress = |p: ds_cluster::MoveProgress| {
            let mut last = last.lock().unwrap_or_else(|e| e.into_inner());
            if last.elapsed() < Duration::from_secs(2) && p.messages < p.total_messages {
                return;
            }
            *last = std::time::Instant::now();
            let secs = started.elapsed().as_secs_f64().max(0.001);
            let rate = p.bytes as f64 / secs;
            let eta = if rate > 0.0 {
                p.total_bytes.saturating_sub(p.bytes) as f64 / rate
            } else {
                0.0
            };
            tracing::info!(
                account = %address,
                messages = p.messages,
                of_messages = p.total_messages,
                bytes = p.bytes,
                of_bytes = p.total_bytes,
                mb_per_s = rate / 1e6,
                eta_s = eta,
                "account move progress"
            );
        };
        self.locator
            .move_account(&address, to, dry_run, progress)
            .await
            .map_err(move_status)
    }

    /// Runs `dshare account move` (or `--abort`) on the account's owner, this node or a
    /// peer, with its progress (DESIGN.md §11).
    pub async fn run_move(&self, command: ds_cluster::MoveCommand) -> ds_cluster::MoveEvents {
        self.locator.run_move(command).await
    }

    /// Moves started here and not finished, one line each with what to do about it.
    pub fn unfinished_moves(&self) -> std::result::Result<Vec<String>, tonic::Status> {
        Ok(self
            .locator
            .unfinished_moves()
            .map_err(move_status)?
            .into_iter()
            .map(|r| {
                let state = match r.state {
                    ds_cluster::MoveState::Copying => "being copied (still served here)",
                    _ => "FROZEN (mail for it waits with 451)",
                };
                format!(
                    "account {a} is {state} by a move to {to} that is running or was interrupted: finish it with `dshare account move {a} --to {to}` or cancel it with `dshare account move {a} --abort`",
                    a = r.address,
                    to = r.to
                )
            })
            .collect())
    }

    /// An address stopped being an active account here: drop it from every peer's cache.
    pub async fn account_gone(&self, address: &str) {
        self.locator.invalidate_everywhere(address).await;
    }

    /// Where a resolution's outcome lives, for `dshare lookup`.
    pub async fn where_is(&self, outcome: &Outcome) -> Vec<String> {
        match outcome {
            Outcome::Account { .. } | Outcome::List(_) => vec!["location: this node".into()],
            Outcome::Unknown(addr) => {
                let loc = self.locator.locate(addr, Purpose::Admin).await;
                vec![match loc {
                    Location::Remote(o) => format!(
                        "location: node {} as {} ({}{}), smtp {} pop3 {}",
                        o.node,
                        o.canonical,
                        match o.kind {
                            ds_cluster::Kind::Account => "account",
                            ds_cluster::Kind::List => "list",
                        },
                        if o.can_receive { "" } else { ", disabled" },
                        o.smtp,
                        o.pop3
                    ),
                    Location::TempFail(why) => {
                        format!("location: temporarily unknown ({why})")
                    }
                    Location::Unknown => "location: no node has it".into(),
                    other => format!("location: {}", other.outcome()),
                }]
            }
            _ => vec![],
        }
    }

    /// Each peer's state, last round trip and last error, as JSON.
    pub fn peers_json(&self) -> serde_json::Value {
        let secs = |t: Option<std::time::SystemTime>| {
            t.and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_secs())
        };
        serde_json::Value::Array(
            self.locator
                .peers_status()
                .into_iter()
                .map(|p| {
                    serde_json::json!({
                        "id": p.id,
                        "minger": p.minger_url,
                        "state": peer_state_name(&p.state),
                        "rtt_ms": p.last_rtt.map(|r| r.as_secs_f64() * 1000.0),
                        "last_success": secs(p.last_success),
                        "last_error": p.last_error,
                        "last_error_at": secs(p.last_error_at),
                    })
                })
                .collect(),
        )
    }

    pub fn peers_report(&self) -> Vec<String> {
        let peers = self.locator.peers_status();
        if peers.is_empty() {
            return vec!["no peers configured".into()];
        }
        peers
            .into_iter()
            .map(|p| {
                let state = peer_state_name(&p.state);
                let mut s = format!("{} {} {state}", p.id, p.minger_url);
                if let Some(rtt) = p.last_rtt {
                    s.push_str(&format!(" rtt={:.1}ms", rtt.as_secs_f64() * 1000.0));
                }
                if let Some(e) = p.last_error {
                    s.push_str(&format!(" last_error={e:?}"));
                }
                s
            })
            .collect()
    }

    /// Makes a queued message due now. A message being relayed at this moment is left to
    /// that attempt (it reschedules it itself), so it is never relayed twice.
    pub fn queue_retry(&self, id: u64) -> std::result::Result<(), String> {
        let rescheduled = self.queue.retry_now(id).map_err(|e| match e {
            ds_store::Error::NotFound(_) => format!("no queued message {id}"),
            other => other.to_string(),
        })?;
        if !rescheduled {
            tracing::info!(id, "queue retry: the message is being relayed right now");
        }
        self.queue_wake.notify_one();
        Ok(())
    }

    pub fn queue_delete(&self, id: u64) -> std::result::Result<(), String> {
        match self.queue.remove(id).map_err(|e| e.to_string())? {
            Some(_) => {
                tracing::warn!(id, "queued message deleted by the operator");
                Ok(())
            }
            None => Err(format!("no queued message {id}")),
        }
    }
}

pub(crate) fn peer_state_name(s: &ds_cluster::PeerState) -> &'static str {
    match s {
        ds_cluster::PeerState::Unknown => "unknown",
        ds_cluster::PeerState::Up => "up",
        ds_cluster::PeerState::Down => "down",
    }
}

/// A refused creation (account, alias, list) as the admin service answers it.
fn guard_status(e: ds_cluster::Error) -> tonic::Status {
    use ds_cluster::Error as E;
    match e {
        E::Directory(d) => admin::status(d),
        E::Exists { .. } => tonic::Status::already_exists(e.to_string()),
        E::Unavailable { .. } => tonic::Status::unavailable(format!(
            "{e}; nothing was created (retry, or --force to create anyway)"
        )),
        other => tonic::Status::internal(other.to_string()),
    }
}

/// Where postmaster@ and abuse@ go: `[node] postmaster`, else `postmaster@MAIN_DOMAIN`.
fn postmaster_address(config: &Config) -> String {
    config
        .node
        .postmaster
        .clone()
        .unwrap_or_else(|| format!("postmaster@{}", config.node.main_domain))
}

impl NodeState {
    /// Makes the local account `postmaster@MAIN_DOMAIN` (random password) unless the name is
    /// taken: for the embedded defaults, so that postmaster@ and abuse@ reach someone.
    pub async fn ensure_postmaster_account(&self) {
        let addr = format!("postmaster@{}", self.config.node.main_domain);
        match self.directory.taken_as(&addr) {
            Ok(Some(_)) => {}
            Ok(None) => {
                let d = self.directory.clone();
                let a = addr.clone();
                let made = tokio::task::spawn_blocking(move || {
                    d.add_account(&a, &random_hex(16), unix_now())
                })
                .await;
                match made {
                    Ok(Ok(_)) => tracing::info!(
                        address = %addr,
                        "made the postmaster account; set its password with `dshare account passwd`"
                    ),
                    Ok(Err(e)) => {
                        tracing::warn!(address = %addr, error = %e, "cannot make the postmaster account")
                    }
                    Err(e) => tracing::warn!(error = %e, "postmaster account task failed"),
                }
                let _ = self.store.flush_async().await;
            }
            Err(e) => {
                tracing::warn!(address = %addr, error = %e, "cannot check the postmaster account")
            }
        }
    }
}

/// How often the sampled gauges (uptime, queue, peers) are refreshed.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(10);

/// Options that are not part of the configuration file.
#[derive(Debug, Clone, Default)]
pub struct StartOptions {
    /// Argon2id cost for new password hashes (tests lower it).
    pub hash_cost: Option<HashCost>,
    /// Delays of the login throttle (the fuzzing harness turns them off; default: the
    /// throttle's own defaults).
    pub throttle: Option<ds_access::ThrottleConfig>,
}

/// A running node.
pub struct Node {
    pub state: Arc<NodeState>,
    addrs: BoundAddrs,
    trigger: ShutdownTrigger,
    tasks: Vec<JoinHandle<()>>,
    reopen: Arc<tokio::sync::Notify>,
    /// Ends the stall watch's thread ([`watch_for_stall`]) when the node stops or is dropped.
    stall_watch: StopOnDrop,
}

/// Sets its flag when dropped.
struct StopOnDrop(Arc<std::sync::atomic::AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

async fn bind_all(addrs: &[SocketAddr], what: &str) -> Result<Vec<TcpListener>> {
    let mut out = vec![];
    for a in addrs {
        out.push(
            TcpListener::bind(a)
                .await
                .map_err(io(format!("cannot listen for {what} on {a}")))?,
        );
    }
    Ok(out)
}

fn local_addrs(ls: &[TcpListener]) -> Vec<SocketAddr> {
    ls.iter().filter_map(|l| l.local_addr().ok()).collect()
}

/// How often released body files are deleted.
const REAP_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

/// Least time between two rounds of the reaper woken by a full disk.
const REAP_GAP: std::time::Duration = std::time::Duration::from_secs(1);

/// Deletes the files of released message bodies now and then (the store keeps them until the
/// release is on disk), and at once when the disk is below its reserve, until shutdown.
async fn reap_bodies(store: Store, shutdown: ds_net::Shutdown) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(REAP_EVERY) => {}
            () = store.space_short() => {}
            () = shutdown.wait() => return,
        }
        let bodies = store.bodies().clone();
        match tokio::task::spawn_blocking(move || bodies.reap()).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::debug!(deleted = n, "released message bodies deleted"),
            Ok(Err(e)) => tracing::warn!(error = %e, "deleting released message bodies failed"),
            Err(e) => tracing::warn!(error = %e, "body reaper task failed"),
        }
        tokio::time::sleep(REAP_GAP).await;
    }
}

/// Watches for a store that has stalled (a deadlock inside sled: every write and read waits
/// for good; see `vendor/sled/PATCHED.md` for one that was): every [`STORE_PROBE_EVERY`] a
/// [`Store::probe`] runs on a thread of its own, and one that has not returned within `stall`
/// asks for a reopen ([`Node::store_needs_reopen`]). All of it runs on plain threads: the
/// runtime's workers may all be stuck in the stalled store. Ends when `stopped` is set.
fn watch_for_stall(
    store: Store,
    stall: Duration,
    reopen: Arc<tokio::sync::Notify>,
    stopped: Arc<std::sync::atomic::AtomicBool>,
) {
    use std::sync::atomic::Ordering;
    use std::sync::mpsc::RecvTimeoutError;
    let probe_every = STORE_PROBE_EVERY.min(stall / 2);
    loop {
        let next = std::time::Instant::now() + probe_every;
        while std::time::Instant::now() < next {
            if stopped.load(Ordering::Relaxed) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100).min(probe_every));
        }
        let (tx, answer) = std::sync::mpsc::channel();
        let s = store.clone();
        let probe = std::thread::Builder::new()
            .name("dshare-probe".into())
            .spawn(move || {
                let _ = tx.send(s.probe());
            });
        if let Err(e) = probe {
            tracing::warn!(error = %e, "cannot start a store probe");
            continue;
        }
        let started = std::time::Instant::now();
        match answer.recv_timeout(stall) {
            Ok(Err(e)) if store.write_failure().is_none() => {
                tracing::warn!(error = %e, "store probe failed");
            }
            Err(RecvTimeoutError::Timeout) if !stopped.load(Ordering::Relaxed) => {
                tracing::error!(
                    waited = ?started.elapsed(),
                    "the store has stalled (a probe of one small write has not returned): \
                     starting again in place"
                );
                reopen.notify_one();
                return;
            }
            _ => {}
        }
    }
}

/// How often the store watch looks at the store's health.
const STORE_WATCH_EVERY: std::time::Duration = std::time::Duration::from_secs(2);
/// How often the stall watch probes the store (at most; more often under a short
/// `limits.store_stall`).
const STORE_PROBE_EVERY: std::time::Duration = std::time::Duration::from_secs(10);
/// Free space a failed store waits for before it is reopened (or the reserve, if larger).
const REOPEN_MIN_FREE: u64 = 16 * 1024 * 1024;

/// Watches for a store that can no longer write (sled keeps a write error, a full disk
/// say, until the database is opened again). Meanwhile new mail gets temporary errors and
/// reads go on; once the disk has room again it asks for a reopen ([`Node::store_needs_reopen`]).
async fn watch_store(store: Store, reopen: Arc<tokio::sync::Notify>, shutdown: ds_net::Shutdown) {
    let mut reported = false;
    loop {
        tokio::select! {
            () = tokio::time::sleep(STORE_WATCH_EVERY) => {}
            () = shutdown.wait() => return,
        }
        let Some(why) = store.write_failure() else {
            continue;
        };
        let need = store.min_free_space().max(REOPEN_MIN_FREE);
        if !reported {
            reported = true;
            tracing::error!(
                error = %why,
                need_free = need,
                "the store cannot write (disk full or I/O error): new mail gets temporary \
                 errors, reads go on; the store is reopened once the disk has room"
            );
        }
        match store.free_space() {
            Ok(free) if free >= need => {
                tracing::warn!(free, "the disk has room again: reopening the store");
                reopen.notify_one();
                return;
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot read free space"),
        }
    }
}

impl Node {
    /// Opens the store, binds every configured listener and starts serving.
    pub async fn start(config: Config, opts: StartOptions) -> Result<Node> {
        ds_net::ensure_crypto_provider();
        let started = std::time::Instant::now();
        // The recorder first, so every series registered below is kept.
        let recorder = metrics_http::recorder();
        let peer_ids: Vec<String> = config.cluster.peers.iter().map(|p| p.id.clone()).collect();
        telemetry::register_all(&config.node.id, &peer_ids);
        let data_dir = config.node.data_dir.clone();
        std::fs::create_dir_all(&data_dir)
            .map_err(io(format!("cannot create data dir {}", data_dir.display())))?;
        let store = Store::open_with_cache(&data_dir, config.limits.db_cache)?;
        store.set_min_free_space(config.limits.min_free_space);
        let domains = Domains::new(&config.node.main_domain, config.domains.clone())?;
        let mut directory = Directory::new(&store, domains)?;
        if let Some(cost) = opts.hash_cost {
            directory = directory.with_hash_cost(cost);
        }
        directory = directory.with_postmaster(Some(postmaster_address(&config)));
        let token = admin::load_or_create_token(&data_dir).map_err(io("admin token"))?;
        let tls = load_tls(&config, &data_dir)?;
        let secret = load_secret(&config, &data_dir)?;
        // One key per purpose (DESIGN.md §5); the raw secret goes no further than here.
        let keys = ClusterKeys::derive(&secret);
        drop(secret);
        let ca_pem = match &config.tls.cluster_ca {
            Some(p) => Some(std::fs::read(p).map_err(io(format!("reading {}", p.display())))?),
            None => None,
        };

        let smtp_l = bind_all(&config.listen.smtp, "SMTP").await?;
        let pop3_l = bind_all(&config.listen.pop3, "POP3").await?;
        let pop3s_l = bind_all(&config.listen.pop3s, "POP3S").await?;
        let imap_l = bind_all(&config.listen.imap, "IMAP").await?;
        let imaps_l = bind_all(&config.listen.imaps, "IMAPS").await?;
        let submission_l = bind_all(&config.listen.submission, "submission").await?;
        let submissions_l = bind_all(&config.listen.submissions, "submissions").await?;
        let minger_l = bind_all(&config.listen.minger, "Minger").await?;
        let admin_l = bind_all(&config.listen.admin, "admin").await?;
        let metrics_l = bind_all(&config.listen.metrics, "metrics").await?;
        let addrs = BoundAddrs {
            smtp: local_addrs(&smtp_l),
            pop3: local_addrs(&pop3_l),
            pop3s: local_addrs(&pop3s_l),
            imap: local_addrs(&imap_l),
            imaps: local_addrs(&imaps_l),
            submission: local_addrs(&submission_l),
            submissions: local_addrs(&submissions_l),
            minger: local_addrs(&minger_l),
            admin: local_addrs(&admin_l),
            metrics: local_addrs(&metrics_l),
        };

        let endpoint = |a: &[SocketAddr]| {
            a.first()
                .map(|a| format!("{}:{}", config.node.advertise, a.port()))
                .unwrap_or_default()
        };
        let mut cluster = ClusterConfig::new(
            config.node.id.clone(),
            Endpoints {
                smtp: endpoint(&addrs.smtp),
                pop3: endpoint(&addrs.pop3),
                imap: endpoint(&addrs.imap),
            },
            keys.minger.clone(),
        );
        cluster.peers = config
            .cluster
            .peers
            .iter()
            .map(|p| PeerConfig {
                id: p.id.clone(),
                minger_url: p.minger.clone(),
                smtp: p.smtp.clone(),
            })
            .collect();
        cluster.ca_pem = ca_pem.clone();
        cluster.positive_ttl = config.cluster.positive_ttl;
        cluster.negative_ttl = config.cluster.negative_ttl;
        cluster.fanouts_per_connection = config.cluster.fanouts_per_connection;
        cluster.lookup_timeout = config.cluster.lookup_timeout;
        cluster.allowed_domains = config.cluster.allowed_domains.clone();
        let locator = Locator::new(cluster, directory.clone(), &store)?;

        let mail = MailStore::new(&store)?;
        locator.attach_mail(mail.clone());
        let queue = QueueStore::new(&store)?;
        let acceptor = TlsAcceptor::from(tls.server.clone());
        let peer_tls = match &ca_pem {
            Some(ca) => Some(ds_net::tls::client_config_with_ca(ca)?),
            None => None,
        };
        let limits = config.limits.clone();
        let tls_policy = config.tls.policy()?;
        // Shared by every protocol that receives message bodies.
        let body_budget = ds_net::BodyBudget::new(limits.bodies_in_flight);
        let listen_opts = |protocol: &'static str| ListenOptions {
            max_connections: limits.max_connections,
            max_per_ip: limits.max_connections_per_ip,
            ..ListenOptions::new(protocol)
        };
        // Shared by every login protocol of the node.
        let throttle = Arc::new(
            opts.throttle
                .map(ds_access::LoginThrottle::new)
                .unwrap_or_default(),
        );
        // Bounded, cached password checks, one set of bounds for every login protocol
        // (#13 point 5): POP3, IMAP, submission AUTH and peers' Minger `Authenticate`.
        let passwords = Arc::new(ds_access::PasswordChecker::new(
            directory.clone(),
            ds_access::CheckerConfig::default(),
        ));
        let dkim = ds_smtp::dkim::Dkim::load(
            &config
                .outbound
                .dkim
                .iter()
                .map(config::DkimSection::to_smtp)
                .collect::<Vec<_>>(),
        )
        .map_err(|e| Error::Config(e.to_string()))?;
        let smtp = ds_smtp::Smtp::new(
            ds_smtp::SmtpConfig {
                hostname: config.node.advertise.clone(),
                node_id: config.node.id.clone(),
                max_message_size: limits.message_size,
                max_recipients: limits.recipients,
                max_line: limits.smtp_line,
                idle_timeout: limits.smtp_idle,
                sender_check: config.smtp.sender_check,
                max_queue_age: config.smtp.max_queue_age,
                retry_base: config.smtp.retry_base,
                retry_max: config.smtp.retry_max,
                delay_warning: config.smtp.delay_warning,
                cluster_secret: keys.relay.clone(),
                body_budget: body_budget.clone(),
                tls_policy: tls_policy.clone(),
                throttle: Arc::clone(&throttle),
                passwords: Some(Arc::clone(&passwords)),
                reveal_client: config.submission.reveal_client,
                any_sender_domains: config.submission.any_sender_domains.clone(),
                dkim: Arc::new(dkim),
                outbound: match config.outbound.enabled {
                    true => Some(config.outbound.to_smtp()?),
                    false => None,
                },
                ..Default::default()
            },
            directory.clone(),
            mail.clone(),
            queue.clone(),
            store.clone(),
            Arc::new(locator.clone()),
            Some(acceptor.clone()),
            peer_tls.clone(),
        );
        let proof_key = ds_access::ProofKey::from_cluster_secret(&keys.session);
        let pop3 = ds_pop3::Pop3::new(
            ds_pop3::Pop3Config {
                hostname: config.node.advertise.clone(),
                node_id: config.node.id.clone(),
                idle_timeout: limits.pop3_idle,
                proof_key: Some(proof_key.clone()),
                throttle: Arc::clone(&throttle),
                passwords: Some(Arc::clone(&passwords)),
                tls_policy: tls_policy.clone(),
                warm_connections: config.cluster.warm_connections,
                ..Default::default()
            },
            directory.clone(),
            mail.clone(),
            store.clone(),
            Arc::new(locator.clone()),
            Some(acceptor.clone()),
            peer_tls.clone(),
        );
        let imap = ds_imap::Imap::new(
            ds_imap::ImapConfig {
                hostname: config.node.advertise.clone(),
                idle_timeout: limits.imap_idle,
                max_message_size: limits.message_size,
                throttle: Arc::clone(&throttle),
                passwords: Some(Arc::clone(&passwords)),
                proof_key: Some(proof_key.clone()),
                peer_tls: peer_tls.clone(),
                body_budget: body_budget.clone(),
                tls_policy: tls_policy.clone(),
                warm_connections: config.cluster.warm_connections,
                ..Default::default()
            },
            directory.clone(),
            mail.clone(),
            store.clone(),
            Arc::new(locator.clone()),
            Some(acceptor.clone()),
        );
        let state = Arc::new(NodeState {
            config,
            data_dir,
            store,
            directory,
            locator,
            mail,
            queue,
            queue_wake: smtp.queue_waker(),
            history: status::History::default(),
            started,
            peer_tls: peer_tls.clone(),
        });
        let (trigger, shutdown) = shutdown_pair();
        let mut tasks = vec![];
        tasks.push(tokio::spawn(telemetry::run_sampler(
            state.clone(),
            recorder.clone(),
            SAMPLE_EVERY,
            shutdown.clone(),
        )));
        for l in admin_l {
            tasks.push(tokio::spawn(serve_admin(
                l,
                state.clone(),
                token.clone(),
                shutdown.clone(),
            )));
        }
        // MX intake, then submission (587, STARTTLS) and submissions (465, implicit TLS):
        // the session tells them apart by the listener's protocol name.
        let smtp_listeners = smtp_l
            .into_iter()
            .map(|l| (l, "smtp", None))
            .chain(submission_l.into_iter().map(|l| (l, "submission", None)))
            .chain(
                submissions_l
                    .into_iter()
                    .map(|l| (l, "submissions", Some(acceptor.clone()))),
            );
        for (l, protocol, implicit_tls) in smtp_listeners {
            let s = smtp.clone();
            tasks.push(tokio::spawn(ds_net::serve(
                l,
                ListenOptions {
                    implicit_tls,
                    ..listen_opts(protocol)
                },
                move |st, ctx, sd| s.clone().handle(st, ctx, sd),
                shutdown.clone(),
            )));
        }
        tasks.push(tokio::spawn(smtp.clone().run_queue(shutdown.clone())));
        tasks.push(tokio::spawn(reap_bodies(
            state.store.clone(),
            shutdown.clone(),
        )));
        let reopen = Arc::new(tokio::sync::Notify::new());
        tasks.push(tokio::spawn(watch_store(
            state.store.clone(),
            Arc::clone(&reopen),
            shutdown.clone(),
        )));
        let stall_watch_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        {
            let (store, stall) = (state.store.clone(), state.config.limits.store_stall);
            let (reopen, stopped) = (Arc::clone(&reopen), Arc::clone(&stall_watch_stop));
            std::thread::Builder::new()
                .name("dshare-stall-watch".into())
                .spawn(move || watch_for_stall(store, stall, reopen, stopped))
                .map_err(io("cannot start the store's stall watch".to_string()))?;
        }
        let pop3_listeners = pop3_l
            .into_iter()
            .map(|l| (l, None))
            .chain(pop3s_l.into_iter().map(|l| (l, Some(acceptor.clone()))));
        for (l, implicit_tls) in pop3_listeners {
            let p = pop3.clone();
            let protocol = if implicit_tls.is_some() {
                "pop3s"
            } else {
                "pop3"
            };
            tasks.push(tokio::spawn(ds_net::serve(
                l,
                ListenOptions {
                    implicit_tls,
                    ..listen_opts(protocol)
                },
                move |st, ctx, sd| p.clone().handle(st, ctx, sd),
                shutdown.clone(),
            )));
        }
        let imap_listeners = imap_l
            .into_iter()
            .map(|l| (l, None))
            .chain(imaps_l.into_iter().map(|l| (l, Some(acceptor.clone()))));
        for (l, implicit_tls) in imap_listeners {
            let i = imap.clone();
            let protocol = if implicit_tls.is_some() {
                "imaps"
            } else {
                "imap"
            };
            tasks.push(tokio::spawn(ds_net::serve(
                l,
                ListenOptions {
                    implicit_tls,
                    ..listen_opts(protocol)
                },
                move |st, ctx, sd| i.clone().handle(st, ctx, sd),
                shutdown.clone(),
            )));
        }
        // Peers' submission logins for our accounts are checked with our checker and throttle.
        let authority: Arc<dyn ds_cluster::PasswordAuthority> =
            Arc::new(ds_access::OwnerPasswords::new(
                state.directory.clone(),
                Arc::clone(&passwords),
                Arc::clone(&throttle),
            ));
        for l in minger_l {
            let svc = state
                .locator
                .minger_service()
                .with_authority(Arc::clone(&authority));
            let tls = Some((tls.cert.clone(), tls.key.clone()));
            let stop = shutdown.clone();
            tasks.push(tokio::spawn(async move {
                if let Err(e) = ds_cluster::serve_minger(l, svc, tls, stop.wait()).await {
                    tracing::error!(error = %e, "Minger service failed");
                }
            }));
        }
        for l in metrics_l {
            tasks.push(tokio::spawn(metrics_http::serve(
                l,
                recorder.clone(),
                state.clone(),
                token.clone(),
                shutdown.clone(),
            )));
        }
        tracing::info!(
            node = %state.config.node.id,
            smtp = ?addrs.smtp,
            pop3 = ?addrs.pop3,
            imap = ?addrs.imap,
            submission = ?addrs.submission,
            submissions = ?addrs.submissions,
            minger = ?addrs.minger,
            admin = ?addrs.admin,
            "node started"
        );
        Ok(Node {
            state,
            addrs,
            trigger,
            tasks,
            reopen,
            stall_watch: StopOnDrop(stall_watch_stop),
        })
    }

    pub fn addrs(&self) -> &BoundAddrs {
        &self.addrs
    }

    /// Returns when the store needs opening again: it failed to write (sled keeps such an
    /// error until the database is opened again) and the disk has room again, or it stalled
    /// ([`watch_for_stall`]). The caller stops the node and starts it anew on the same data
    /// (`dshare serve` re-executes itself in place).
    pub async fn store_needs_reopen(&self) {
        self.reopen.notified().await;
    }

    /// Stops accepting, lets sessions finish (bounded), flushes the store.
    pub async fn shutdown(self) {
        self.trigger.trigger();
        drop(self.stall_watch);
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
        // Bounded like the stall watch's probe: a stalled store must not hold the restart
        // that frees it. Nothing acknowledged waits for this flush (each was flushed first).
        let stall = self.state.config.limits.store_stall;
        match tokio::time::timeout(stall, self.state.store.flush_async()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "final flush failed"),
            Err(_) => {
                tracing::error!(waited = ?stall, "final flush did not return: the store stalled")
            }
        }
        tracing::info!(node = %self.state.config.node.id, "node stopped");
    }
}

/// The node's certificate and key (PEM).
#[derive(Clone)]
pub struct TlsMaterial {
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
    /// The same certificate as a rustls configuration, for the mail listeners.
    pub server: Arc<rustls::ServerConfig>,
}

fn load_tls(config: &Config, data_dir: &Path) -> Result<TlsMaterial> {
    let (cert, key) = match (&config.tls.cert, &config.tls.key) {
        (Some(c), Some(k)) => (
            std::fs::read(c).map_err(io(format!("reading {}", c.display())))?,
            std::fs::read(k).map_err(io(format!("reading {}", k.display())))?,
        ),
        _ => {
            let mut names = vec![config.node.advertise.clone(), "localhost".to_string()];
            names.extend(config.domains.iter().map(|d| d.name.clone()));
            names.push(config.node.main_domain.clone());
            names.dedup();
            ds_net::tls::load_or_create_self_signed(data_dir, &names)?
        }
    };
    // Parsed now, so a bad certificate fails the start, not the first handshake.
    let server = ds_net::tls::server_config_from_pem(&cert, &key)?;
    Ok(TlsMaterial { cert, key, server })
}

/// The cluster secret: from `cluster.secret_file`, else generated once in the data dir.
fn load_secret(config: &Config, data_dir: &Path) -> Result<String> {
    let path = match &config.cluster.secret_file {
        Some(p) => p.clone(),
        None => {
            let p = data_dir.join("cluster.secret");
            if !p.exists() {
                write_private(&p, random_hex(24).as_bytes()).map_err(io("cluster secret"))?;
            }
            p
        }
    };
    let secret = std::fs::read_to_string(&path)
        .map_err(io(format!("reading {}", path.display())))?
        .trim()
        .to_string();
    if secret.chars().count() < ds_cluster::config::MIN_SECRET_LEN {
        return Err(Error::Config(format!(
            "{}: the cluster secret must be at least {} characters",
            path.display(),
            ds_cluster::config::MIN_SECRET_LEN
        )));
    }
    Ok(secret)
}

async fn serve_admin(l: TcpListener, state: Arc<NodeState>, token: String, shutdown: Shutdown) {
    let svc = admin::proto::admin_server::AdminServer::with_interceptor(
        admin::AdminService { node: state },
        admin::TokenCheck::new(token),
    );
    let res = tonic::transport::Server::builder()
        .add_service(svc)
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(l),
            shutdown.wait(),
        )
        .await;
    if let Err(e) = res {
        tracing::error!(error = %e, "admin service failed");
    }
}

/// A move's error as the operator sees it.
pub(crate) fn move_status(e: ds_cluster::Error) -> tonic::Status {
    match e {
        ds_cluster::Error::Move(m) => tonic::Status::failed_precondition(m),
        ds_cluster::Error::Unavailable { .. } => tonic::Status::unavailable(e.to_string()),
        ds_cluster::Error::Directory(d) => admin::status(d),
        e => tonic::Status::internal(e.to_string()),
    }
}
