//! Test kit for the POP3 tests: nodes with temporary stores, listeners on loopback, a raw line
//! client.

#![allow(dead_code)]

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ds_access::{Locate, LoginThrottle, ProofKey};
use ds_directory::{Directory, Domain, Domains, HashCost};
use ds_net::{ListenOptions, ShutdownTrigger, TlsAcceptor, shutdown_pair};
use ds_pop3::{Pop3, Pop3Config, ThrottleConfig};
use ds_store::{MailStore, Store};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

pub const SECRET: &str = "test-cluster-secret-0123456789";
pub const PASSWORD: &str = "secret";
pub const AUTH_FAILED: &str = "-ERR [AUTH] Authentication failed";

pub const CHEAP: HashCost = HashCost {
    memory_kib: 64,
    iterations: 1,
};

pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// The CommuniGate Pro multihoming sample: company.com (main, shared, 127.0.0.1), client1.com
/// (127.0.0.2), client2.com (no address).
pub fn sample_domains() -> Domains {
    Domains::new(
        "company.com",
        vec![
            Domain {
                name: "company.com".into(),
                shared: true,
                addresses: vec![ip("127.0.0.1")],
            },
            Domain {
                name: "client1.com".into(),
                shared: false,
                addresses: vec![ip("127.0.0.2")],
            },
            Domain {
                name: "client2.com".into(),
                shared: false,
                addresses: vec![],
            },
        ],
    )
    .unwrap()
}

pub fn test_config(node_id: &str) -> Pop3Config {
    Pop3Config {
        hostname: format!("{node_id}.test"),
        node_id: node_id.into(),
        proof_key: Some(ProofKey::from_cluster_secret(SECRET)),
        throttle: Arc::new(LoginThrottle::new(ThrottleConfig {
            base: Duration::from_millis(5),
            max: Duration::from_millis(20),
            ..ThrottleConfig::default()
        })),
        ..Pop3Config::default()
    }
}

/// One node's POP3 side.
pub struct Node {
    pub store: Store,
    pub directory: Directory,
    pub mail: MailStore,
    pub pop3: Arc<Pop3>,
    pub trigger: ShutdownTrigger,
    pub tasks: Vec<JoinHandle<()>>,
}

/// Store, directory and mail store of a node, before its Pop3 is built.
pub struct Parts {
    pub store: Store,
    pub directory: Directory,
    pub mail: MailStore,
}

impl Parts {
    pub fn temporary() -> Parts {
        Parts::with_store(Store::temporary().unwrap())
    }

    pub fn with_store(store: Store) -> Parts {
        let directory = Directory::new(&store, sample_domains())
            .unwrap()
            .with_hash_cost(CHEAP);
        let mail = MailStore::new(&store).unwrap();
        Parts {
            store,
            directory,
            mail,
        }
    }

    pub fn account(&self, address: &str) {
        self.directory.add_account(address, PASSWORD, 0).unwrap();
    }

    pub fn deliver(&self, account: &str, body: &[u8]) -> u32 {
        self.mail.deliver(account, body).unwrap()
    }

    pub fn node(
        self,
        config: Pop3Config,
        locator: Arc<dyn Locate>,
        tls_acceptor: Option<TlsAcceptor>,
        peer_tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Node {
        let pop3 = Pop3::new(
            config,
            self.directory.clone(),
            self.mail.clone(),
            self.store.clone(),
            locator,
            tls_acceptor,
            peer_tls,
        );
        let (trigger, _) = shutdown_pair();
        Node {
            store: self.store,
            directory: self.directory,
            mail: self.mail,
            pop3,
            trigger,
            tasks: vec![],
        }
    }
}

impl Node {
    /// Serve POP3 on an already bound listener.
    pub fn serve(&mut self, listener: TcpListener, implicit_tls: Option<TlsAcceptor>) {
        let mut opts = ListenOptions::new(if implicit_tls.is_some() {
            "pop3s"
        } else {
            "pop3"
        });
        opts.implicit_tls = implicit_tls;
        opts.shutdown_grace = Duration::from_millis(200);
        // Tests open many connections from 127.0.0.1 at once.
        opts.max_per_ip = 256;
        let pop3 = Arc::clone(&self.pop3);
        self.tasks.push(tokio::spawn(ds_net::serve(
            listener,
            opts,
            move |s, c, sd| Arc::clone(&pop3).handle(s, c, sd),
            self.trigger.subscribe(),
        )));
    }

    /// Bind `ip:0` and serve POP3 there.
    pub async fn listen(&mut self, ip: &str, implicit_tls: Option<TlsAcceptor>) -> SocketAddr {
        let listener = TcpListener::bind((self.ip(ip), 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        self.serve(listener, implicit_tls);
        addr
    }

    fn ip(&self, s: &str) -> IpAddr {
        ip(s)
    }

    /// Stop the listeners and wait for them.
    pub async fn stop(mut self) {
        self.trigger.trigger();
        for task in self.tasks.drain(..) {
            task.await.unwrap();
        }
    }
}

pub fn tls_acceptor(cert_pem: &[u8], key_pem: &[u8]) -> TlsAcceptor {
    TlsAcceptor::from(ds_net::tls::server_config_from_pem(cert_pem, key_pem).unwrap())
}

/// A raw POP3 client over any stream.
pub struct Client<S> {
    pub stream: BufReader<S>,
}

pub const WAIT: Duration = Duration::from_secs(20);

impl Client<TcpStream> {
    pub async fn connect(addr: SocketAddr) -> Client<TcpStream> {
        let tcp = tokio::time::timeout(WAIT, TcpStream::connect(addr))
            .await
            .unwrap()
            .unwrap();
        let mut client = Client {
            stream: BufReader::new(tcp),
        };
        let greeting = client.line().await;
        assert!(greeting.starts_with("+OK "), "{greeting}");
        client
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    pub fn new(stream: S) -> Self {
        Client {
            stream: BufReader::new(stream),
        }
    }

    /// One line, CRLF stripped; "" at EOF.
    pub async fn line(&mut self) -> String {
        let mut line = String::new();
        tokio::time::timeout(WAIT, self.stream.read_line(&mut line))
            .await
            .expect("reply in time")
            .unwrap();
        line.trim_end_matches(['\r', '\n']).to_owned()
    }

    pub async fn send(&mut self, data: &str) {
        self.stream
            .get_mut()
            .write_all(data.as_bytes())
            .await
            .unwrap();
        self.stream.get_mut().flush().await.unwrap();
    }

    /// Send a command, return its status line.
    pub async fn cmd(&mut self, command: &str) -> String {
        self.send(&format!("{command}\r\n")).await;
        self.line().await
    }

    /// The body of a multi-line reply, raw (still byte-stuffed), up to the final dot line.
    pub async fn multi(&mut self) -> Vec<u8> {
        let mut body = Vec::new();
        loop {
            let mut line = Vec::new();
            let n = tokio::time::timeout(WAIT, self.stream.read_until(b'\n', &mut line))
                .await
                .expect("multi-line reply in time")
                .unwrap();
            assert!(n > 0, "EOF in a multi-line reply");
            if line == b".\r\n" {
                return body;
            }
            body.extend_from_slice(&line);
        }
    }

    /// A command with a multi-line answer: (status, raw body).
    pub async fn multi_cmd(&mut self, command: &str) -> (String, Vec<u8>) {
        let status = self.cmd(command).await;
        if status.starts_with("+OK") {
            (status, self.multi().await)
        } else {
            (status, Vec::new())
        }
    }

    pub async fn login(&mut self, user: &str, password: &str) -> String {
        let ok = self.cmd(&format!("USER {user}")).await;
        assert!(ok.starts_with("+OK"), "{ok}");
        self.cmd(&format!("PASS {password}")).await
    }

    /// True once the server closed the connection.
    pub async fn closed(&mut self) -> bool {
        self.line().await.is_empty()
    }
}

/// Lines of a multi-line body, as strings.
pub fn lines(body: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(body)
        .split("\r\n")
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Run python3 with `script` and arguments; its stdout.
pub async fn python(script: &str, args: &[String]) -> String {
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(240),
        tokio::process::Command::new("python3")
            .arg("-c")
            .arg(script)
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("python3 ran over 240 s")
    .expect("python3 runs");
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Run curl with arguments; (success, stdout, stderr).
pub async fn curl(args: &[String]) -> (bool, String, String) {
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(240),
        tokio::process::Command::new("curl")
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("curl ran over 240 s")
    .expect("curl runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
