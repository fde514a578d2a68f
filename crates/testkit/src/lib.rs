//! Test-only: real nodes in this process on loopback ephemeral ports, with temporary data
//! directories and a test certificate authority.
//!
//! `Cluster::start(n)` starts `n` nodes sharing `example.com`; node `i` listens on
//! `127.0.0.{i+1}`, talks Minger to the others over TLS verified against the test CA, and
//! knows the shared secret. Nodes can be stopped and restarted on the same data and ports.

mod process;
mod small_disk;
pub use process::{OutputWithin, PROGRAM_LIMIT, Watchdog, python, test_limit};
pub use small_disk::SmallDisk;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use anyhow::Context;
use tempfile::TempDir;

use ds_directory::HashCost;
use ds_net::tls::Pki;
use ds_server::config::{Domain, PeerSection};
use ds_server::{Config, Node, StartOptions};

/// A cheap Argon2id cost so tests do not spend their time hashing.
pub const TEST_HASH_COST: HashCost = HashCost {
    memory_kib: 64,
    iterations: 1,
};

/// The shared secret of test clusters.
pub const TEST_SECRET: &str = "test-cluster-secret-0123456789";

/// The loopback address of node `i`.
pub fn node_ip(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, (i + 1) as u8))
}

fn any_port(ip: IpAddr) -> Vec<SocketAddr> {
    vec![SocketAddr::new(ip, 0)]
}

/// One node of a test cluster; it keeps its data directory across restarts.
pub struct TestNode {
    pub config: Config,
    node: Option<Node>,
    minger: SocketAddr,
    _dir: TempDir,
}

impl TestNode {
    /// The running node. Panics if it is stopped.
    pub fn node(&self) -> &Node {
        self.node.as_ref().expect("node is stopped")
    }

    pub fn is_running(&self) -> bool {
        self.node.is_some()
    }

    pub fn id(&self) -> &str {
        &self.config.node.id
    }

    pub fn smtp(&self) -> SocketAddr {
        self.node().addrs().smtp[0]
    }

    pub fn pop3(&self) -> SocketAddr {
        self.node().addrs().pop3[0]
    }

    pub fn pop3s(&self) -> SocketAddr {
        self.node().addrs().pop3s[0]
    }

    pub fn imap(&self) -> SocketAddr {
        self.node().addrs().imap[0]
    }

    pub fn imaps(&self) -> SocketAddr {
        self.node().addrs().imaps[0]
    }

    /// The submission listener (STARTTLS, like port 587).
    pub fn submission(&self) -> SocketAddr {
        self.node().addrs().submission[0]
    }

    /// The submissions listener (implicit TLS, like port 465).
    pub fn submissions(&self) -> SocketAddr {
        self.node().addrs().submissions[0]
    }

    pub fn admin(&self) -> SocketAddr {
        self.node().addrs().admin[0]
    }

    pub fn minger(&self) -> SocketAddr {
        self.minger
    }

    pub fn data_dir(&self) -> PathBuf {
        self.config.node.data_dir.clone()
    }

    /// The bodies in an account's INBOX on this node, in UID order (none if it has no INBOX).
    pub fn inbox(&self, account: &str) -> Vec<Vec<u8>> {
        let mail = &self.node().state.mail;
        mail.messages(account, "INBOX")
            .unwrap_or_default()
            .iter()
            .filter_map(|m| mail.message_body(account, "INBOX", m.uid).ok().flatten())
            .collect()
    }

    /// How many messages an account's INBOX on this node holds.
    pub fn inbox_len(&self, account: &str) -> usize {
        let mail = &self.node().state.mail;
        mail.messages(account, "INBOX").map_or(0, |m| m.len())
    }

    /// Creates an account through the node's creation guard (peers are asked first).
    pub async fn add_account(&self, name: &str, password: &str) -> anyhow::Result<()> {
        self.node()
            .state
            .create_account(name, password, false)
            .await
            .map_err(|s| anyhow::anyhow!("{}: {}", name, s.message()))?;
        Ok(())
    }

    /// Stops the node (graceful); its data and addresses stay for [`TestNode::restart`].
    pub async fn stop(&mut self) {
        if let Some(node) = self.node.take() {
            // A restarted node keeps its ports, as a real one would: peers cache them.
            let a = node.addrs().clone();
            let l = &mut self.config.listen;
            (l.smtp, l.pop3, l.pop3s, l.imap, l.imaps, l.admin, l.metrics) =
                (a.smtp, a.pop3, a.pop3s, a.imap, a.imaps, a.admin, a.metrics);
            (l.submission, l.submissions) = (a.submission, a.submissions);
            node.shutdown().await;
        }
    }

    /// Starts the node again on the same data directory and the same ports.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(self.node.is_none(), "node is running");
        self.node = Some(start_node(self.config.clone()).await?);
        Ok(())
    }
}

async fn start_node(config: Config) -> anyhow::Result<Node> {
    let id = config.node.id.clone();
    Node::start(
        config,
        StartOptions {
            hash_cost: Some(TEST_HASH_COST),
            ..Default::default()
        },
    )
    .await
    .with_context(|| format!("starting {id}"))
}

/// Several nodes sharing `example.com`.
pub struct Cluster {
    pub nodes: Vec<TestNode>,
    pub pki: Pki,
    pub root: TempDir,
    /// Ends the test process if the test that started the cluster hangs ([`test_limit`]).
    _watchdog: Watchdog,
}

/// Whether starting failed because a port was taken.
fn port_taken(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::AddrInUse)
            || c.to_string().contains("Address already in use")
    })
}

impl Cluster {
    /// Starts `n` nodes with the default test configuration.
    pub async fn start(n: usize) -> anyhow::Result<Cluster> {
        Self::start_with(n, |_, _| {}).await
    }

    /// Starts `n` nodes, letting `tweak` change each configuration first.
    ///
    /// The Minger ports are picked before the nodes start (every node names its peers), so
    /// another process may take one in between: then the whole cluster is started again on
    /// new ports, a few times.
    pub async fn start_with(
        n: usize,
        tweak: impl Fn(usize, &mut Config),
    ) -> anyhow::Result<Cluster> {
        let mut attempt = 1;
        loop {
            match Self::try_start_with(n, &tweak).await {
                Err(e) if attempt < 5 && port_taken(&e) => {
                    eprintln!("a test port was taken meanwhile ({e:#}); starting again");
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    async fn try_start_with(
        n: usize,
        tweak: &impl Fn(usize, &mut Config),
    ) -> anyhow::Result<Cluster> {
        let watchdog = Watchdog::start(test_limit());
        ds_net::ensure_crypto_provider();
        let root = tempfile::tempdir()?;
        let pki = Pki::generate("dshare test CA");
        let ca = root.path().join("ca.pem");
        std::fs::write(&ca, pki.ca_cert_pem())?;
        let secret = root.path().join("cluster.secret");
        std::fs::write(&secret, TEST_SECRET)?;

        // Minger ports are fixed first so that every node can name its peers.
        let mut minger = vec![];
        for i in 0..n {
            let l = std::net::TcpListener::bind(SocketAddr::new(node_ip(i), 0))?;
            minger.push(l.local_addr()?);
        }
        let mut configs = vec![];
        for i in 0..n {
            let dir = tempfile::tempdir()?;
            let id = format!("node-{}", (b'a' + i as u8) as char);
            let (cert, key) = pki.issue(&["localhost", &id], &[node_ip(i)]);
            std::fs::write(dir.path().join("cert.pem"), cert)?;
            std::fs::write(dir.path().join("key.pem"), key)?;
            let mut c = Config::default();
            c.node.id = id;
            c.node.data_dir = dir.path().to_path_buf();
            c.node.main_domain = "example.com".into();
            c.node.advertise = node_ip(i).to_string();
            c.domains = vec![Domain {
                name: "example.com".into(),
                shared: true,
                addresses: vec![],
            }];
            let ip = node_ip(i);
            c.listen.smtp = any_port(ip);
            c.listen.pop3 = any_port(ip);
            c.listen.pop3s = any_port(ip);
            c.listen.imap = any_port(ip);
            c.listen.imaps = any_port(ip);
            c.listen.submission = any_port(ip);
            c.listen.submissions = any_port(ip);
            c.listen.minger = vec![minger[i]];
            c.listen.admin = any_port(ip);
            c.listen.metrics = any_port(ip);
            c.tls.cert = Some(dir.path().join("cert.pem"));
            c.tls.key = Some(dir.path().join("key.pem"));
            c.tls.cluster_ca = Some(ca.clone());
            c.cluster.secret_file = Some(secret.clone());
            c.cluster.lookup_timeout = std::time::Duration::from_millis(800);
            c.cluster.peers = (0..n)
                .filter(|&j| j != i)
                .map(|j| PeerSection {
                    id: format!("node-{}", (b'a' + j as u8) as char),
                    minger: format!("https://{}", minger[j]),
                    smtp: None,
                })
                .collect();
            tweak(i, &mut c);
            configs.push((c, dir, minger[i]));
        }
        let mut nodes = vec![];
        for (config, dir, minger) in configs {
            let node = start_node(config.clone()).await?;
            nodes.push(TestNode {
                config,
                node: Some(node),
                minger,
                _dir: dir,
            });
        }
        Ok(Cluster {
            nodes,
            pki,
            root,
            _watchdog: watchdog,
        })
    }

    /// A single node: the embedded defaults on ephemeral ports.
    pub async fn single() -> anyhow::Result<Cluster> {
        Self::start(1).await
    }

    pub fn node(&self, i: usize) -> &TestNode {
        &self.nodes[i]
    }

    pub fn node_mut(&mut self, i: usize) -> &mut TestNode {
        &mut self.nodes[i]
    }

    /// Stops every node.
    pub async fn shutdown(mut self) {
        for n in &mut self.nodes {
            n.stop().await;
        }
    }
}
