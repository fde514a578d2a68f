//! Benchmark: retrieve 100 messages of 100 KiB directly from the owner vs through a forwarding
//! node (plain hop, and STLS hop against a cluster CA as in production).
//!
//! ```text
//! cargo run --release -p ds-pop3 --example forward_bench [rounds]
//! ```
//!
//! Each round logs in, sends `RETR 1..=100` one at a time (like poplib), reads every reply to
//! its final dot and quits. Reported: median and best wall time per round, and the ratio to direct.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ds_access::{BoxFuture, ListKeeper, Locate, Location, NoPeers, Owner, ProofKey, Purpose};
use ds_directory::{Directory, Domain, Domains, HashCost};
use ds_net::tls::{Pki, client_config_with_ca, server_config_from_pem};
use ds_net::{ListenOptions, Shutdown, TlsAcceptor};
use ds_pop3::{Pop3, Pop3Config};
use ds_store::{MailStore, Store};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

const MESSAGES: usize = 100;
const MESSAGE_SIZE: usize = 100 * 1024;
const SECRET: &str = "bench-cluster-secret-0123456789";

struct Fixed(Location);

impl Locate for Fixed {
    fn locate<'a>(&'a self, _address: &'a str, _purpose: Purpose) -> BoxFuture<'a, Location> {
        let answer = self.0.clone();
        Box::pin(async move { answer })
    }
    fn relocate<'a>(&'a self, address: &'a str, purpose: Purpose) -> BoxFuture<'a, Location> {
        self.locate(address, purpose)
    }
    fn list_keepers<'a>(&'a self, _list: &'a str) -> BoxFuture<'a, Vec<ListKeeper>> {
        Box::pin(async { Vec::new() })
    }
}

fn directory(store: &Store) -> Directory {
    let domains = Domains::new(
        "company.com",
        vec![Domain {
            name: "company.com".into(),
            shared: true,
            addresses: vec![],
        }],
    )
    .unwrap();
    Directory::new(store, domains)
        .unwrap()
        .with_hash_cost(HashCost {
            memory_kib: 64,
            iterations: 1,
        })
}

fn config(id: &str) -> Pop3Config {
    Pop3Config {
        hostname: format!("{id}.bench"),
        node_id: id.into(),
        proof_key: Some(ProofKey::from_cluster_secret(SECRET)),
        ..Pop3Config::default()
    }
}

async fn serve(pop3: Arc<Pop3>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(ds_net::serve(
        listener,
        ListenOptions::new("pop3"),
        move |s, c, sd| Arc::clone(&pop3).handle(s, c, sd),
        Shutdown::never(),
    ));
    addr
}

/// A message of about `MESSAGE_SIZE` octets: 78-character lines, some starting with a dot.
fn message(n: usize) -> Vec<u8> {
    let mut m = format!("Subject: message {n}\r\nFrom: a@example.net\r\n\r\n").into_bytes();
    let mut i = 0;
    while m.len() < MESSAGE_SIZE {
        let lead = if i % 50 == 0 { '.' } else { 'x' };
        m.extend_from_slice(format!("{lead}{:076}\r\n", i).as_bytes());
        i += 1;
    }
    m
}

async fn round(addr: SocketAddr) -> (Duration, usize) {
    let start = Instant::now();
    let tcp = TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let mut c = BufReader::with_capacity(64 * 1024, tcp);
    let mut line = Vec::new();
    let read_line = async |c: &mut BufReader<TcpStream>, line: &mut Vec<u8>| {
        line.clear();
        c.read_until(b'\n', line).await.unwrap();
        assert!(!line.is_empty(), "connection closed");
    };
    read_line(&mut c, &mut line).await;
    for cmd in ["USER bob\r\n", "PASS secret\r\n"] {
        c.get_mut().write_all(cmd.as_bytes()).await.unwrap();
        read_line(&mut c, &mut line).await;
        assert!(
            line.starts_with(b"+OK"),
            "{}",
            String::from_utf8_lossy(&line)
        );
    }
    let mut octets = 0;
    for n in 1..=MESSAGES {
        c.get_mut()
            .write_all(format!("RETR {n}\r\n").as_bytes())
            .await
            .unwrap();
        read_line(&mut c, &mut line).await;
        assert!(line.starts_with(b"+OK"));
        loop {
            read_line(&mut c, &mut line).await;
            if line == b".\r\n" {
                break;
            }
            octets += line.len();
        }
    }
    c.get_mut().write_all(b"QUIT\r\n").await.unwrap();
    read_line(&mut c, &mut line).await;
    (start.elapsed(), octets)
}

#[tokio::main]
async fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|r| r.parse().ok())
        .unwrap_or(7);

    // The owner, with STLS.
    let pki = Pki::generate("bench CA");
    let (cert, key) = pki.issue(&["localhost"], &["127.0.0.1".parse().unwrap()]);
    let acceptor = TlsAcceptor::from(server_config_from_pem(&cert, &key).unwrap());
    let store = Store::temporary().unwrap();
    let dir = directory(&store);
    dir.add_account("bob@company.com", "secret", 0).unwrap();
    let mail = MailStore::new(&store).unwrap();
    for n in 0..MESSAGES {
        mail.deliver("bob@company.com", &message(n)).unwrap();
    }
    let owner = Pop3::new(
        config("owner"),
        dir,
        mail,
        store,
        Arc::new(NoPeers),
        Some(acceptor),
        None,
    );
    let owner_addr = serve(owner).await;

    // Two front nodes: plain hop and STLS hop.
    let front = |peer_tls: Option<Arc<rustls::ClientConfig>>| {
        let store = Store::temporary().unwrap();
        let lookup = Location::Remote(Owner {
            node: "owner".into(),
            canonical: "bob@company.com".into(),
            is_list: false,
            can_receive: true,
            smtp: String::new(),
            pop3: owner_addr.to_string(),
            imap: String::new(),
        });
        Pop3::new(
            config("front"),
            directory(&store),
            MailStore::new(&store).unwrap(),
            store,
            Arc::new(Fixed(lookup)),
            None,
            peer_tls,
        )
    };
    let plain_front = serve(front(None)).await;
    let tls_front = serve(front(Some(
        client_config_with_ca(&pki.ca_cert_pem()).unwrap(),
    )))
    .await;

    let modes = [
        ("direct", owner_addr),
        ("forwarded (plain hop)", plain_front),
        ("forwarded (STLS hop)", tls_front),
    ];
    // Warm up every path once.
    for (_, addr) in modes {
        round(addr).await;
    }
    let mut times: Vec<Vec<Duration>> = vec![vec![]; modes.len()];
    let mut octets = 0;
    for _ in 0..rounds {
        for (i, (_, addr)) in modes.iter().enumerate() {
            let (t, n) = round(*addr).await;
            times[i].push(t);
            octets = n;
        }
    }
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let direct = median(&mut times[0].clone());
    println!(
        "{MESSAGES} messages x {} KiB ({:.1} MiB per round), {rounds} rounds",
        MESSAGE_SIZE / 1024,
        octets as f64 / (1024.0 * 1024.0)
    );
    for (i, (name, _)) in modes.iter().enumerate() {
        let m = median(&mut times[i]);
        println!(
            "{name:<24} median {:>8.1} ms  best {:>8.1} ms  {:>7.1} MiB/s  ratio {:.2}",
            m.as_secs_f64() * 1000.0,
            times[i][0].as_secs_f64() * 1000.0,
            octets as f64 / (1024.0 * 1024.0) / m.as_secs_f64(),
            m.as_secs_f64() / direct.as_secs_f64()
        );
    }
}
