//! The fixture shared by the Minger tests and the lookup benchmark: real Minger servers on
//! 127.0.0.1 over TLS (a test CA from `ds_net::tls::Pki`), each with its own store and
//! directory, sharing `example.com`.
#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ds_cluster::{ClusterConfig, Endpoints, Locator, MingerService, PeerConfig, serve_minger};
use ds_directory::{Directory, Domain, Domains, HashCost};
use ds_net::tls::Pki;
use ds_store::Store;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const SECRET: &str = "correct-horse-battery-staple";

pub fn directory(store: &Store) -> Directory {
    let domains = Domains::new(
        "example.com",
        vec![
            Domain {
                name: "example.com".into(),
                shared: true,
                addresses: vec![],
            },
            Domain {
                name: "private.example".into(),
                shared: false,
                addresses: vec![],
            },
        ],
    )
    .unwrap();
    Directory::new(store, domains)
        .unwrap()
        .with_hash_cost(HashCost {
            memory_kib: 64,
            iterations: 1,
        })
}

pub fn endpoints(id: &str) -> Endpoints {
    Endpoints {
        smtp: format!("{id}.test:25"),
        pop3: format!("{id}.test:110"),
        imap: format!("{id}.test:143"),
    }
}

pub fn url(addr: SocketAddr) -> String {
    format!("https://127.0.0.1:{}", addr.port())
}

pub struct Node {
    pub id: String,
    pub addr: SocketAddr,
    pub locator: Locator,
    pub service: MingerService,
    pub directory: Directory,
    pub tls: (Vec<u8>, Vec<u8>),
    pub _store: Store,
    pub server: Option<(oneshot::Sender<()>, JoinHandle<ds_cluster::Result<()>>)>,
}

impl Node {
    pub async fn start_server(&mut self, listener: TcpListener) {
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(serve_minger(
            listener,
            self.service.clone(),
            Some(self.tls.clone()),
            async {
                let _ = rx.await;
            },
        ));
        self.server = Some((tx, task));
    }

    pub async fn stop(&mut self) {
        if let Some((tx, task)) = self.server.take() {
            let _ = tx.send(());
            let abort = task.abort_handle();
            if tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
    }

    pub async fn restart(&mut self) {
        let listener = TcpListener::bind(self.addr).await.unwrap();
        self.start_server(listener).await;
    }
}

pub struct Options {
    pub timeout: Duration,
    pub negative_ttl: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            timeout: Duration::from_millis(400),
            negative_ttl: Duration::ZERO,
        }
    }
}

pub struct Cluster {
    pub pki: Arc<Pki>,
    pub nodes: Vec<Node>,
}

impl Cluster {
    pub async fn start(n: usize, options: Options) -> Self {
        let pki = Arc::new(Pki::generate("test cluster CA"));
        let mut listeners = vec![];
        for _ in 0..n {
            listeners.push(TcpListener::bind("127.0.0.1:0").await.unwrap());
        }
        let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
        let mut nodes = vec![];
        for (i, listener) in listeners.into_iter().enumerate() {
            let id = format!("office-{i}");
            let mut config = ClusterConfig::new(&id, endpoints(&id), SECRET);
            config.ca_pem = Some(pki.ca_cert_pem());
            config.lookup_timeout = options.timeout;
            config.negative_ttl = options.negative_ttl;
            config.peers = addrs
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(j, addr)| PeerConfig {
                    id: format!("office-{j}"),
                    minger_url: url(*addr),
                    smtp: None,
                })
                .collect();
            let store = Store::temporary().unwrap();
            let directory = directory(&store);
            let locator = Locator::new(config, directory.clone(), &store).unwrap();
            let mut node = Node {
                id,
                addr: addrs[i],
                service: locator.minger_service(),
                locator,
                directory,
                tls: pki.issue(&["localhost"], &[IpAddr::V4(Ipv4Addr::LOCALHOST)]),
                _store: store,
                server: None,
            };
            node.start_server(listener).await;
            nodes.push(node);
        }
        Self { pki, nodes }
    }

    pub fn lookups_served(&self) -> Vec<u64> {
        self.nodes
            .iter()
            .map(|n| n.service.lookups_served())
            .collect()
    }

    /// A locator outside the cluster, with its own store, pointing at every node.
    pub fn outsider(&self, ca_pem: &[u8], secret: &str) -> Locator {
        let mut config = ClusterConfig::new("outsider", endpoints("outsider"), secret);
        config.ca_pem = Some(ca_pem.to_vec());
        config.lookup_timeout = Duration::from_millis(400);
        config.peers = self
            .nodes
            .iter()
            .map(|n| PeerConfig {
                id: n.id.clone(),
                minger_url: url(n.addr),
                smtp: None,
            })
            .collect();
        let store = Store::temporary().unwrap();
        Locator::new(config, directory(&store), &store).unwrap()
    }

    /// A locator outside the cluster asking node `i` and a peer that accepts TCP (kernel
    /// backlog) but never speaks TLS. Keep the returned listener alive for the test.
    pub async fn with_silent_peer(&self, i: usize, timeout: Duration) -> (Locator, TcpListener) {
        let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut config = ClusterConfig::new("office-x", endpoints("office-x"), SECRET);
        config.ca_pem = Some(self.pki.ca_cert_pem());
        config.lookup_timeout = timeout;
        config.peers = vec![
            PeerConfig {
                id: self.nodes[i].id.clone(),
                minger_url: url(self.nodes[i].addr),
                smtp: None,
            },
            PeerConfig {
                id: "silent".into(),
                minger_url: url(silent.local_addr().unwrap()),
                smtp: None,
            },
        ];
        let store = Store::temporary().unwrap();
        let locator = Locator::new(config, directory(&store), &store).unwrap();
        (locator, silent)
    }

    /// A raw gRPC channel to node `i`, over TLS verified against the test CA.
    pub async fn channel(&self, i: usize) -> tonic::transport::Channel {
        tonic::transport::Endpoint::from_shared(url(self.nodes[i].addr))
            .unwrap()
            .tls_config(
                tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(
                        self.pki.ca_cert_pem(),
                    ))
                    .domain_name("localhost"),
            )
            .unwrap()
            .connect()
            .await
            .unwrap()
    }
}
