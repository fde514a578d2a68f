//! Test kit for ds-smtp: in-process nodes on ephemeral loopback ports, temporary stores, a
//! Locator that is the cluster's real one for local addresses plus a table of remote owners.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ds_cluster::{ClusterConfig, Endpoints};
use ds_directory::{Directory, Domain, Domains, HashCost};
use ds_net::{ListenOptions, MailStream, ShutdownTrigger, TlsAcceptor, serve, shutdown_pair};
use ds_smtp::{BoxFuture, ListKeeper, Locate, Location, Owner, Purpose, Smtp, SmtpConfig};
use ds_store::Store;
use ds_store::mailbox::MailStore;
use ds_store::queue::QueueStore;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

pub const SECRET: &str = "0123456789abcdef-cluster";
pub const DOMAIN: &str = "company.com";

/// The cluster's Locator for local addresses, then a table of peer-owned addresses.
pub struct TestLocator {
    pub local: ds_cluster::Locator,
    pub remote: Mutex<HashMap<String, Owner>>,
    /// Fixed answers of `locate` (before the local store and `remote`).
    pub located: Mutex<HashMap<String, Location>>,
    /// What `relocate` answers (defaults to `remote`).
    pub relocated: Mutex<HashMap<String, Location>>,
    pub keepers: Mutex<HashMap<String, Vec<ListKeeper>>>,
    pub relocations: Mutex<Vec<String>>,
    /// While true, `list_keepers_checked` answers that a peer could not be asked.
    pub keepers_down: Mutex<bool>,
}

impl TestLocator {
    pub fn set_remote(&self, address: &str, node: &str, smtp: &str) {
        self.remote.lock().unwrap().insert(
            address.to_string(),
            Owner {
                node: node.to_string(),
                canonical: address.to_string(),
                is_list: false,
                can_receive: true,
                smtp: smtp.to_string(),
                pop3: String::new(),
                imap: String::new(),
            },
        );
    }

    async fn find(&self, address: &str, purpose: Purpose) -> Location {
        let fixed = self.located.lock().unwrap().get(address).cloned();
        if let Some(location) = fixed {
            return location;
        }
        let found = Locate::locate(&self.local, address, purpose).await;
        if found == Location::Unknown
            && let Some(owner) = self.remote.lock().unwrap().get(address)
        {
            return Location::Remote(owner.clone());
        }
        found
    }
}

impl Locate for TestLocator {
    fn locate<'a>(&'a self, address: &'a str, purpose: Purpose) -> BoxFuture<'a, Location> {
        Box::pin(self.find(address, purpose))
    }
    fn relocate<'a>(&'a self, address: &'a str, purpose: Purpose) -> BoxFuture<'a, Location> {
        Box::pin(async move {
            self.relocations.lock().unwrap().push(address.to_string());
            let fixed = self.relocated.lock().unwrap().get(address).cloned();
            match fixed {
                Some(l) => l,
                None => self.find(address, purpose).await,
            }
        })
    }
    fn list_keepers_checked<'a>(&'a self, list: &'a str) -> BoxFuture<'a, Option<Vec<ListKeeper>>> {
        Box::pin(async move {
            if *self.keepers_down.lock().unwrap() {
                return None;
            }
            Some(self.list_keepers(list).await)
        })
    }
    fn list_keepers<'a>(&'a self, list: &'a str) -> BoxFuture<'a, Vec<ListKeeper>> {
        Box::pin(async move {
            self.keepers
                .lock()
                .unwrap()
                .get(list)
                .cloned()
                .unwrap_or_default()
        })
    }
}

pub struct Node {
    pub id: String,
    pub store: Store,
    pub directory: Directory,
    pub mail: MailStore,
    pub queue: QueueStore,
    pub smtp: Arc<Smtp>,
    pub locator: Arc<TestLocator>,
    pub addr: std::net::SocketAddr,
    trigger: ShutdownTrigger,
}

impl Drop for Node {
    fn drop(&mut self) {
        self.trigger.trigger();
    }
}

pub fn config(id: &str) -> SmtpConfig {
    SmtpConfig {
        hostname: format!("{id}.test"),
        node_id: id.to_string(),
        cluster_secret: SECRET.to_string(),
        retry_base: Duration::from_secs(1),
        retry_max: Duration::from_secs(2),
        relay_timeout: Duration::from_secs(5),
        ..SmtpConfig::default()
    }
}

pub struct NodeOptions {
    pub config: SmtpConfig,
    pub accounts: Vec<&'static str>,
    pub tls: Option<TlsAcceptor>,
    pub relay_tls: Option<Arc<rustls::ClientConfig>>,
    pub listener: Option<TcpListener>,
    pub queue_runner: bool,
}

/// One test CA for every node of a test binary: nodes serve STARTTLS with a certificate for
/// `localhost` and `127.0.0.1`, and relay with verified TLS (the relay key is never sent
/// without it).
pub struct DevTls {
    pub acceptor: TlsAcceptor,
    pub client: Arc<rustls::ClientConfig>,
}

pub fn dev_tls() -> &'static DevTls {
    static TLS: std::sync::OnceLock<DevTls> = std::sync::OnceLock::new();
    TLS.get_or_init(|| {
        let pki = ds_net::tls::Pki::generate("smtp test CA");
        let (cert, key) = pki.issue(&["localhost"], &["127.0.0.1".parse().unwrap()]);
        DevTls {
            acceptor: TlsAcceptor::from(ds_net::tls::server_config_from_pem(&cert, &key).unwrap()),
            client: ds_net::tls::client_config_with_ca(&pki.ca_cert_pem()).unwrap(),
        }
    })
}

impl NodeOptions {
    pub fn new(id: &str, accounts: &[&'static str]) -> Self {
        Self {
            config: config(id),
            accounts: accounts.to_vec(),
            tls: Some(dev_tls().acceptor.clone()),
            relay_tls: Some(dev_tls().client.clone()),
            listener: None,
            queue_runner: true,
        }
    }
}

impl NodeOptions {
    /// A node without STARTTLS (a client may AUTH in plaintext on loopback) that relays
    /// without TLS (and so, as the relay key is never sent without TLS, without one).
    pub fn plain(id: &str, accounts: &[&'static str]) -> Self {
        let mut opts = Self::new(id, accounts);
        opts.tls = None;
        opts
    }

    /// Relays in plaintext to scripted peers: no TLS, no relay key.
    pub fn plaintext_relay(&mut self) {
        self.relay_tls = None;
        self.config.cluster_secret.clear();
    }
}

pub async fn start(id: &str, accounts: &[&'static str]) -> Node {
    start_with(NodeOptions::new(id, accounts)).await
}

pub async fn start_with(opts: NodeOptions) -> Node {
    let id = opts.config.node_id.clone();
    let store = Store::temporary().unwrap();
    let domains = Domains::new(
        DOMAIN,
        vec![Domain {
            name: DOMAIN.into(),
            shared: true,
            addresses: vec![],
        }],
    )
    .unwrap();
    let directory = Directory::new(&store, domains)
        .unwrap()
        .with_hash_cost(HashCost {
            memory_kib: 64,
            iterations: 1,
        });
    for a in &opts.accounts {
        directory.add_account(a, "password", 0).unwrap();
    }
    let mail = MailStore::new(&store).unwrap();
    let queue = QueueStore::new(&store).unwrap();
    let cluster = ClusterConfig::new(id.clone(), Endpoints::default(), SECRET);
    let local = ds_cluster::Locator::new(cluster, directory.clone(), &store).unwrap();
    let locator = Arc::new(TestLocator {
        local,
        remote: Mutex::default(),
        located: Mutex::default(),
        relocated: Mutex::default(),
        keepers: Mutex::default(),
        relocations: Mutex::default(),
        keepers_down: Mutex::default(),
    });
    let smtp = Smtp::new(
        opts.config,
        directory.clone(),
        mail.clone(),
        queue.clone(),
        store.clone(),
        locator.clone(),
        opts.tls,
        opts.relay_tls,
    );
    let listener = match opts.listener {
        Some(l) => l,
        None => TcpListener::bind("127.0.0.1:0").await.unwrap(),
    };
    let addr = listener.local_addr().unwrap();
    let (trigger, shutdown) = shutdown_pair();
    let handler = {
        let smtp = smtp.clone();
        move |stream: MailStream, ctx, sd| smtp.clone().handle(stream, ctx, sd)
    };
    tokio::spawn(serve(
        listener,
        ListenOptions::new("smtp"),
        handler,
        shutdown.clone(),
    ));
    if opts.queue_runner {
        tokio::spawn(smtp.clone().run_queue(shutdown));
    }
    Node {
        id,
        store,
        directory,
        mail,
        queue,
        smtp,
        locator,
        addr,
        trigger,
    }
}

impl Node {
    /// Bodies in an account's INBOX.
    pub fn inbox(&self, account: &str) -> Vec<Vec<u8>> {
        let Ok(messages) = self.mail.messages(account, "INBOX") else {
            return vec![];
        };
        messages
            .iter()
            .map(|m| {
                self.mail
                    .message_body(account, "INBOX", m.uid)
                    .unwrap()
                    .unwrap()
            })
            .collect()
    }

    /// Waits (up to `secs`) until the INBOX holds `n` messages.
    pub async fn wait_inbox(&self, account: &str, n: usize, secs: u64) -> Vec<Vec<u8>> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let inbox = self.inbox(account);
            if inbox.len() >= n || tokio::time::Instant::now() > deadline {
                return inbox;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A raw SMTP client over a byte stream.
pub struct Client<S> {
    pub stream: BufReader<S>,
}

pub async fn connect(addr: std::net::SocketAddr) -> Client<tokio::net::TcpStream> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut c = Client {
        stream: BufReader::new(tcp),
    };
    let greeting = c.reply().await;
    assert!(greeting.starts_with("220 "), "{greeting}");
    c
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> Client<S> {
    /// One complete (possibly multi-line) reply.
    pub async fn reply(&mut self) -> String {
        let mut out = String::new();
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(Duration::from_secs(30), self.stream.read_line(&mut line))
                .await
                .expect("reply timed out")
                .unwrap();
            assert!(n > 0, "connection closed; got so far: {out:?}");
            out.push_str(&line);
            if line.as_bytes().get(3) != Some(&b'-') {
                return out;
            }
        }
    }

    pub async fn send(&mut self, data: &[u8]) {
        self.stream.get_mut().write_all(data).await.unwrap();
    }

    pub async fn cmd(&mut self, line: &str) -> String {
        self.send(format!("{line}\r\n").as_bytes()).await;
        self.reply().await
    }

    /// Sends a command and asserts its reply starts with `want` (a code, or code and
    /// enhanced status); returns the reply.
    pub async fn expect(&mut self, line: &str, want: &str) -> String {
        let reply = self.cmd(line).await;
        assert!(
            reply.starts_with(want),
            "{line:?}: expected {want}, got {reply:?}"
        );
        reply
    }

    /// Reads until EOF.
    pub async fn rest(&mut self) -> String {
        let mut s = Vec::new();
        let _ =
            tokio::time::timeout(Duration::from_secs(10), self.stream.read_to_end(&mut s)).await;
        String::from_utf8_lossy(&s).into_owned()
    }
}

/// Dot-stuffs a body and appends the end marker (the client side of DATA).
pub fn stuffed(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut line_start = true;
    let mut prev = 0u8;
    for &b in body {
        if line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        line_start = prev == b'\r' && b == b'\n';
        prev = b;
    }
    out.extend_from_slice(b".\r\n");
    out
}

/// Everything after the trace headers we prepend (Return-Path and Received).
pub fn strip_trace(message: &[u8]) -> &[u8] {
    let mut rest = message;
    loop {
        let Some(line_end) = rest.windows(2).position(|w| w == b"\r\n") else {
            return rest;
        };
        let line_end = line_end + 2;
        let is_trace = rest.starts_with(b"Return-Path:") || rest.starts_with(b"Received:");
        let is_cont = rest.starts_with(b"\t");
        if !(is_trace || is_cont) {
            return rest;
        }
        rest = &rest[line_end..];
    }
}

pub fn b64(data: &[u8]) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
