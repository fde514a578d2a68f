//! A whole node: configuration, storage, directory, cluster, protocol listeners, admin
//! service and metrics, wired together. The `dshare` binary and the test kit both start
//! nodes through [`Node::start`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use ds_directory::{Account, Directory, Domain, Domains, HashCost, Outcome};
use ds_net::{Shutdown, ShutdownTrigger, shutdown_pair};
use ds_store::Store;

pub mod admin;
pub mod config;
mod metrics_http;

pub use config::Config;

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

/// Writes a file only its owner may read.
pub(crate) fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(data)?;
    f.sync_all()
}

/// The addresses a started node actually listens on (ports resolved when configured as 0).
#[derive(Debug, Clone, Default)]
pub struct BoundAddrs {
    pub smtp: Vec<SocketAddr>,
    pub pop3: Vec<SocketAddr>,
    pub pop3s: Vec<SocketAddr>,
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
}

impl NodeState {
    /// Creates an account (the cluster's creation guard asks peers first).
    pub async fn create_account(
        &self,
        name: &str,
        password: &str,
        _force: bool,
    ) -> std::result::Result<Account, tonic::Status> {
        let dir = self.directory.clone();
        let (name, password) = (name.to_string(), password.to_string());
        let account = tokio::task::spawn_blocking(move || dir.add_account(&name, &password, now()))
            .await
            .map_err(|e| tonic::Status::internal(e.to_string()))?
            .map_err(admin::status)?;
        self.store
            .flush_async()
            .await
            .map_err(|e| tonic::Status::internal(e.to_string()))?;
        Ok(account)
    }

    /// An address stopped being an active account here: tell the peers.
    pub async fn account_gone(&self, _address: &str) {}

    /// Where a resolution's outcome lives, for `dshare lookup`.
    pub async fn where_is(&self, outcome: &Outcome) -> Vec<String> {
        match outcome {
            Outcome::Account { .. } | Outcome::List(_) => vec!["location: this node".into()],
            _ => vec![],
        }
    }

    pub fn peers_report(&self) -> Vec<String> {
        vec!["no peers configured".into()]
    }

    pub fn queue_report(&self) -> std::result::Result<Vec<String>, String> {
        Ok(vec![])
    }

    pub fn queue_retry(&self, id: u64) -> std::result::Result<(), String> {
        Err(format!("no queued message {id}"))
    }

    pub fn queue_delete(&self, id: u64) -> std::result::Result<(), String> {
        Err(format!("no queued message {id}"))
    }
}

pub(crate) fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Options that are not part of the configuration file.
#[derive(Debug, Clone, Default)]
pub struct StartOptions {
    /// Argon2id cost for new password hashes (tests lower it).
    pub hash_cost: Option<HashCost>,
}

/// A running node.
pub struct Node {
    pub state: Arc<NodeState>,
    addrs: BoundAddrs,
    trigger: ShutdownTrigger,
    tasks: Vec<JoinHandle<()>>,
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

impl Node {
    /// Opens the store, binds every configured listener and starts serving.
    pub async fn start(config: Config, opts: StartOptions) -> Result<Node> {
        ds_net::ensure_crypto_provider();
        let data_dir = config.node.data_dir.clone();
        std::fs::create_dir_all(&data_dir)
            .map_err(io(format!("cannot create data dir {}", data_dir.display())))?;
        let store = Store::open(&data_dir)?;
        let domains = Domains::new(
            &config.node.main_domain,
            config
                .domains
                .iter()
                .map(|d| Domain {
                    name: d.name.clone(),
                    shared: d.shared,
                    addresses: d.addresses.clone(),
                })
                .collect(),
        )?;
        let mut directory = Directory::new(&store, domains)?;
        if let Some(cost) = opts.hash_cost {
            directory = directory.with_hash_cost(cost);
        }
        let token = admin::load_or_create_token(&data_dir).map_err(io("admin token"))?;

        let admin_l = bind_all(&config.listen.admin, "admin").await?;
        let metrics_l = bind_all(&config.listen.metrics, "metrics").await?;
        let addrs = BoundAddrs {
            admin: local_addrs(&admin_l),
            metrics: local_addrs(&metrics_l),
            ..Default::default()
        };

        let state = Arc::new(NodeState {
            config,
            data_dir,
            store,
            directory,
        });
        let (trigger, shutdown) = shutdown_pair();
        let mut tasks = vec![];
        for l in admin_l {
            tasks.push(tokio::spawn(serve_admin(
                l,
                state.clone(),
                token.clone(),
                shutdown.clone(),
            )));
        }
        let recorder = metrics_http::recorder();
        for l in metrics_l {
            tasks.push(tokio::spawn(metrics_http::serve(
                l,
                recorder.clone(),
                shutdown.clone(),
            )));
        }
        tracing::info!(
            node = %state.config.node.id,
            admin = ?addrs.admin,
            "node started"
        );
        Ok(Node {
            state,
            addrs,
            trigger,
            tasks,
        })
    }

    pub fn addrs(&self) -> &BoundAddrs {
        &self.addrs
    }

    /// Stops accepting, lets sessions finish (bounded), flushes the store.
    pub async fn shutdown(self) {
        self.trigger.trigger();
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
        if let Err(e) = self.state.store.flush_async().await {
            tracing::error!(error = %e, "final flush failed");
        }
        tracing::info!(node = %self.state.config.node.id, "node stopped");
    }
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
