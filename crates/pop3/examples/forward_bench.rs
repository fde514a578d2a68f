//! Benchmark: retrieve 100 messages of 100 KiB directly from the owner vs through a forwarding
//! node, with the client on plain TCP and on implicit TLS (`pop3s`). The forwarding node always
//! reaches the owner over STLS verified against a cluster CA, as in production (a password never
//! crosses to an owner in plaintext).
//!
//! ```text
//! cargo run --release -p ds-pop3 --example forward_bench [ROUNDS [MODE]] [--pinned]
//! ```
//!
//! ROUNDS (default 9): rounds per mode, the modes interleaved round by round so that a change
//! in the machine's speed hits them alike. MODE (default: all four) runs one mode only:
//! `direct`, `forwarded`, `direct-tls` or `forwarded-tls` (to time one path from outside).
//!
//! Each round logs in, sends `RETR 1..=100` one at a time (like poplib), reads every reply to
//! its final dot and quits. Then 300 login cycles per mode (`USER`, `PASS`, `STAT`, `QUIT`, as a
//! phone checks its mail), median time and CPU per cycle. Reported per mode: median and best wall time per round, throughput,
//! and the ratio forwarded/direct of the medians (plain and TLS client), plus the median of the
//! per-round ratios; and the CPU time of the whole process (client, front node and owner) per
//! round with its ratio: on a machine with fewer cores than busy parties, wall time follows it.
//!
//! `--pinned` (Linux, two cores at least) runs the owner and the client on core 0 and the
//! forwarding node on core 1, each on a one-thread runtime: the forwarding node then has a core
//! of its own, as it has a machine of its own in a deployment, and the ratio shows what
//! forwarding adds to the client's wait (latency, the pipeline) rather than the CPU the
//! three parties would otherwise take from each other.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ds_access::{BoxFuture, ListKeeper, Locate, Location, NoPeers, Owner, ProofKey, Purpose};
use ds_directory::{Directory, Domain, Domains, HashCost};
use ds_net::tls::{Pki, client_config_with_ca, server_config_from_pem};
use ds_net::{ListenOptions, Shutdown, TlsAcceptor, TlsConnector};
use ds_pop3::{Pop3, Pop3Config};
use ds_store::{MailStore, Store};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
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

/// A `pop3` listener (plain, STLS offered) and a `pop3s` one (implicit TLS) for `pop3`.
async fn serve(pop3: Arc<Pop3>, acceptor: &TlsAcceptor) -> (SocketAddr, SocketAddr) {
    let mut addrs = vec![];
    for implicit in [None, Some(acceptor.clone())] {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        addrs.push(listener.local_addr().unwrap());
        let mut options = ListenOptions::new(if implicit.is_some() { "pop3s" } else { "pop3" });
        options.implicit_tls = implicit;
        let pop3 = Arc::clone(&pop3);
        tokio::spawn(ds_net::serve(
            listener,
            options,
            move |s, c, sd| Arc::clone(&pop3).handle(s, c, sd),
            Shutdown::never(),
        ));
    }
    (addrs[0], addrs[1])
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

/// One client session over `stream`: log in, RETR every message, QUIT. Returns the octets read.
async fn session<S: AsyncRead + AsyncWrite + Unpin>(stream: S) -> usize {
    let mut c = BufReader::with_capacity(64 * 1024, stream);
    let mut line = Vec::new();
    let read_line = async |c: &mut BufReader<S>, line: &mut Vec<u8>| {
        line.clear();
        c.read_until(b'\n', line).await.unwrap();
        assert!(!line.is_empty(), "connection closed");
    };
    read_line(&mut c, &mut line).await;
    for cmd in ["USER bob\r\n", "PASS secret\r\n"] {
        c.get_mut().write_all(cmd.as_bytes()).await.unwrap();
        c.get_mut().flush().await.unwrap();
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
        c.get_mut().flush().await.unwrap();
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
    c.get_mut().flush().await.unwrap();
    read_line(&mut c, &mut line).await;
    octets
}

/// One check as a phone makes it: log in, STAT, QUIT (the client's TLS handshake included).
async fn check<S: AsyncRead + AsyncWrite + Unpin>(stream: S) {
    let mut c = BufReader::new(stream);
    let mut line = Vec::new();
    c.read_until(b'\n', &mut line).await.unwrap();
    c.get_mut()
        .write_all(b"USER bob\r\nPASS secret\r\nSTAT\r\nQUIT\r\n")
        .await
        .unwrap();
    c.get_mut().flush().await.unwrap();
    for _ in 0..4 {
        line.clear();
        c.read_until(b'\n', &mut line).await.unwrap();
        assert!(
            line.starts_with(b"+OK"),
            "{}",
            String::from_utf8_lossy(&line)
        );
    }
}

/// One login cycle against `addr` ([`check`]), over TLS if `tls` is given.
async fn login_cycle(addr: SocketAddr, tls: Option<&TlsConnector>) -> Duration {
    let start = Instant::now();
    let tcp = TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    match tls {
        None => check(tcp).await,
        Some(connector) => {
            let name = ServerName::try_from("localhost").unwrap();
            check(connector.connect(name, tcp).await.unwrap()).await;
        }
    }
    start.elapsed()
}

/// One round against `addr`, over TLS if `tls` is given; the TLS handshake is timed too.
async fn round(addr: SocketAddr, tls: Option<&TlsConnector>) -> (Duration, usize) {
    let start = Instant::now();
    let tcp = TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let octets = match tls {
        None => session(tcp).await,
        Some(connector) => {
            let name = ServerName::try_from("localhost").unwrap();
            session(connector.connect(name, tcp).await.unwrap()).await
        }
    };
    (start.elapsed(), octets)
}

/// CPU seconds this process has used (user + system, every thread: client, front node and
/// owner alike), from `/proc/self/stat` (clock ticks of 10 ms); 0 where there is none.
fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces): state is field 3, utime 14.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A runtime for one party: one worker pinned to `core` when `pinned`, else the default.
fn runtime(pinned: bool, core: usize) -> tokio::runtime::Runtime {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    b.enable_all();
    if pinned {
        b.worker_threads(1).on_thread_start(move || {
            let mut set = rustix::thread::CpuSet::new();
            set.set(core);
            rustix::thread::sched_setaffinity(None, &set).expect("pin a thread to a core");
        });
    }
    b.build().unwrap()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let pinned = args.iter().any(|a| a == "--pinned");
    let mut args = args.into_iter().filter(|a| a != "--pinned");
    let rounds: usize = args.next().and_then(|r| r.parse().ok()).unwrap_or(9);
    let only = args.next();
    let owner_rt = runtime(pinned, 0);
    let front_rt = runtime(pinned, 1);
    let client_rt = runtime(pinned, 0);
    let (owner_addrs, front_addrs, client_tls) = setup(&owner_rt, &front_rt);
    client_rt.block_on(bench(
        rounds,
        only,
        pinned,
        owner_addrs,
        front_addrs,
        client_tls,
    ));
}

/// The owner and the front node, each served on its own runtime: their addresses (plain,
/// implicit TLS) and the client's TLS connector.
fn setup(
    owner_rt: &tokio::runtime::Runtime,
    front_rt: &tokio::runtime::Runtime,
) -> (
    (SocketAddr, SocketAddr),
    (SocketAddr, SocketAddr),
    TlsConnector,
) {
    // The owner, with STLS; every node has a certificate of the cluster CA.
    let pki = Pki::generate("bench CA");
    let (cert, key) = pki.issue(&["localhost"], &["127.0.0.1".parse().unwrap()]);
    let acceptor = TlsAcceptor::from(server_config_from_pem(&cert, &key).unwrap());
    let ca_client = client_config_with_ca(&pki.ca_cert_pem()).unwrap();
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
        Some(acceptor.clone()),
        None,
    );
    let (owner_plain, owner_tls) = owner_rt.block_on(serve(owner, &acceptor));

    // The front node: reaches the owner over STLS against the cluster CA.
    let front_store = Store::temporary().unwrap();
    let lookup = Location::Remote(Owner {
        node: "owner".into(),
        canonical: "bob@company.com".into(),
        is_list: false,
        can_receive: true,
        smtp: String::new(),
        pop3: owner_plain.to_string(),
        imap: String::new(),
    });
    let front = Pop3::new(
        config("front"),
        directory(&front_store),
        MailStore::new(&front_store).unwrap(),
        front_store,
        Arc::new(Fixed(lookup)),
        Some(acceptor.clone()),
        Some(Arc::clone(&ca_client)),
    );
    let front_addrs = front_rt.block_on(serve(front, &acceptor));
    // The benchmark client trusts the cluster CA too.
    (
        (owner_plain, owner_tls),
        front_addrs,
        TlsConnector::from(ca_client),
    )
}

async fn bench(
    rounds: usize,
    only: Option<String>,
    pinned: bool,
    (owner_plain, owner_tls): (SocketAddr, SocketAddr),
    (front_plain, front_tls): (SocketAddr, SocketAddr),
    client_tls: TlsConnector,
) {
    let all = [
        ("direct", owner_plain, None),
        ("forwarded", front_plain, None),
        ("direct-tls", owner_tls, Some(&client_tls)),
        ("forwarded-tls", front_tls, Some(&client_tls)),
    ];
    let modes: Vec<_> = all
        .iter()
        .filter(|(name, ..)| only.as_deref().is_none_or(|o| o == *name))
        .collect();
    assert!(!modes.is_empty(), "unknown mode {only:?}");
    // Warm up every path once.
    for (_, addr, tls) in &modes {
        round(*addr, *tls).await;
    }
    let mut times: Vec<Vec<f64>> = vec![vec![]; modes.len()];
    let mut cpu = vec![0.0; modes.len()];
    let mut octets = 0;
    for _ in 0..rounds {
        for (i, (_, addr, tls)) in modes.iter().enumerate() {
            let used = cpu_seconds();
            let (t, n) = round(*addr, *tls).await;
            cpu[i] += cpu_seconds() - used;
            times[i].push(t.as_secs_f64());
            octets = n;
        }
    }
    let mib = octets as f64 / (1024.0 * 1024.0);
    println!(
        "pop3 forward_bench: {MESSAGES} messages x {} KiB ({mib:.1} MiB per round), {rounds} rounds{}",
        MESSAGE_SIZE / 1024,
        if pinned {
            ", pinned: owner and client on core 0, forwarding node on core 1"
        } else {
            ""
        },
    );
    for (i, (name, ..)) in modes.iter().enumerate() {
        let m = median(&times[i]);
        let best = times[i].iter().copied().fold(f64::INFINITY, f64::min);
        println!(
            "{name:<14} median {:>7.1} ms  best {:>7.1} ms  {:>7.1} MiB/s  cpu {:>6.1} ms/round",
            m * 1000.0,
            best * 1000.0,
            mib / m,
            cpu[i] * 1000.0 / rounds as f64,
        );
    }
    // Login cycles (USER, PASS, STAT, QUIT pipelined, as a phone's check), the modes in turn.
    const CYCLES: usize = 300;
    let mut cycle_times: Vec<Vec<f64>> = vec![vec![]; modes.len()];
    let mut cycle_cpu = vec![0.0; modes.len()];
    for _ in 0..CYCLES {
        for (i, (_, addr, tls)) in modes.iter().enumerate() {
            let used = cpu_seconds();
            cycle_times[i].push(login_cycle(*addr, *tls).await.as_secs_f64());
            cycle_cpu[i] += cpu_seconds() - used;
        }
    }
    for (i, (name, ..)) in modes.iter().enumerate() {
        println!(
            "{name:<14} login cycle median {:>6.0} us  cpu {:>6.0} us/cycle",
            median(&cycle_times[i]) * 1e6,
            cycle_cpu[i] * 1e6 / CYCLES as f64,
        );
    }
    if modes.len() == all.len() {
        for (label, d, f) in [("plain", 0, 1), ("tls", 2, 3)] {
            println!(
                "ratio forwarded/direct {label:<5}  login cycle of medians {:.3}  cpu {:.3}",
                median(&cycle_times[f]) / median(&cycle_times[d]),
                cycle_cpu[f] / cycle_cpu[d],
            );
        }
        for (label, d, f) in [("plain", 0, 1), ("tls", 2, 3)] {
            let per_round: Vec<f64> = times[f].iter().zip(&times[d]).map(|(f, d)| f / d).collect();
            println!(
                "ratio forwarded/direct {label:<5}  of medians {:.3}  median of rounds {:.3}  cpu {:.3}",
                median(&times[f]) / median(&times[d]),
                median(&per_round),
                cpu[f] / cpu[d],
            );
        }
    }
}
