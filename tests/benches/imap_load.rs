//! IMAP load through real nodes: the same work directly on the owner (node B) and through a
//! forwarding node (A → B over STARTTLS verified against the cluster CA, as in production).
//!
//! ```text
//! cargo bench -p dshare-e2e --bench imap_load [-- CLIENTS SECONDS ROUNDS REPEATS [PARTS]]
//! ```
//!
//! Defaults: 8 clients, 5 s per run, 11 download rounds, 3 repeats, every part. PARTS picks
//! some: a comma-separated list of `session`, `login`, `download` (to profile one of them).
//!
//! - `session`: CLIENTS clients, each logged in once, loop SELECT, APPEND, FETCH 1:* (FLAGS),
//!   STORE, EXPUNGE (ops = commands completed).
//! - `login`: CLIENTS clients loop connect, LOGIN, SELECT, FETCH 1 (BODY.PEEK[]), LOGOUT
//!   (ops = cycles), on plain TCP and on implicit TLS (`imaps`, a handshake per cycle).
//! - `download`: one client, `FETCH 1:100 BODY.PEEK[]` of 100 × 100 KiB, ROUNDS times, plain and
//!   TLS; median and best wall time.
//!
//! The session and login runs are repeated REPEATS times, direct and forwarded in turn (so a
//! change in the machine's speed hits both alike); the download rounds alternate likewise. Each
//! figure is the median, printed direct and forwarded with the cost of forwarding as
//! forwarded/direct time (= direct/forwarded rate; 1.00 = free): the ratio of the medians and
//! the median of the per-run ratios.

use std::net::SocketAddr;
use std::pin::Pin;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use ds_net::TlsConnector;
use ds_testkit::Cluster;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const TIMEOUT: Duration = Duration::from_secs(60);

/// A client's byte stream: plain TCP or TLS.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Where the clients connect: the address, and TLS (implicit) or not.
#[derive(Clone)]
struct Target {
    addr: SocketAddr,
    tls: Option<TlsConnector>,
}

/// A minimal IMAP client: tagged commands, responses read to the tagged line, literals skipped.
struct Client {
    r: BufReader<Pin<Box<dyn Io>>>,
    n: u64,
    /// Octets of literals received by the last command.
    literal_octets: usize,
}

impl Client {
    async fn connect(target: &Target) -> anyhow::Result<Client> {
        let s = TcpStream::connect(target.addr).await?;
        s.set_nodelay(true)?;
        let stream: Pin<Box<dyn Io>> = match &target.tls {
            None => Box::pin(s),
            Some(connector) => {
                let name = ServerName::try_from("localhost")?;
                Box::pin(connector.connect(name, s).await?)
            }
        };
        let mut c = Client {
            r: BufReader::with_capacity(256 * 1024, stream),
            n: 0,
            literal_octets: 0,
        };
        c.line().await?;
        Ok(c)
    }

    async fn line(&mut self) -> anyhow::Result<Vec<u8>> {
        let mut line = Vec::new();
        tokio::time::timeout(TIMEOUT, self.r.read_until(b'\n', &mut line))
            .await
            .context("timeout")??;
        if line.is_empty() {
            bail!("connection closed");
        }
        Ok(line)
    }

    /// Send `tag command` (with an optional literal after a `{n+}`) and read to the tagged
    /// answer, which must be OK.
    async fn cmd(&mut self, command: &str, literal: Option<&[u8]>) -> anyhow::Result<()> {
        self.n += 1;
        let tag = format!("t{}", self.n);
        let mut out = format!("{tag} {command}").into_bytes();
        if let Some(l) = literal {
            out.extend_from_slice(format!(" {{{}+}}\r\n", l.len()).as_bytes());
            out.extend_from_slice(l);
        }
        out.extend_from_slice(b"\r\n");
        self.r.get_mut().write_all(&out).await?;
        self.r.get_mut().flush().await?;
        self.literal_octets = 0;
        loop {
            let line = self.line().await?;
            if let Some(n) = trailing_literal(&line) {
                let mut skip = (&mut self.r).take(n as u64);
                let got = tokio::io::copy(&mut skip, &mut tokio::io::sink()).await?;
                self.literal_octets += got as usize;
                continue;
            }
            if line.starts_with(tag.as_bytes()) && line.get(tag.len()) == Some(&b' ') {
                if !line[tag.len() + 1..].starts_with(b"OK") {
                    bail!("{command}: {}", String::from_utf8_lossy(&line));
                }
                return Ok(());
            }
        }
    }
}

fn trailing_literal(line: &[u8]) -> Option<usize> {
    let line = line.strip_suffix(b"\r\n")?.strip_suffix(b"}")?;
    let open = line.iter().rposition(|&b| b == b'{')?;
    std::str::from_utf8(&line[open + 1..]).ok()?.parse().ok()
}

fn message(i: usize, size: usize) -> Vec<u8> {
    let mut m = format!("From: load@example.org\r\nSubject: load {i}\r\n\r\n").into_bytes();
    let line = b"The quick brown fox jumps over the lazy dog, 0123456789 ABCDEFGHIJ.\r\n";
    while m.len() + line.len() <= size {
        m.extend_from_slice(line);
    }
    m
}

async fn session_load(
    target: &Target,
    user: &str,
    clients: usize,
    secs: u64,
) -> anyhow::Result<f64> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..clients {
        let user = user.to_owned();
        let target = target.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(&target).await?;
            c.cmd(&format!("LOGIN {user} pass"), None).await?;
            let mailbox = format!("load{i}");
            let _ = c.cmd(&format!("CREATE {mailbox}"), None).await;
            let body = message(i, 2048);
            let mut ops = 0u64;
            while Instant::now() < deadline {
                c.cmd(&format!("SELECT {mailbox}"), None).await?;
                c.cmd(&format!("APPEND {mailbox}"), Some(&body)).await?;
                c.cmd("FETCH 1:* (FLAGS)", None).await?;
                c.cmd("STORE 1:* +FLAGS.SILENT (\\Deleted)", None).await?;
                c.cmd("EXPUNGE", None).await?;
                ops += 5;
            }
            c.cmd("LOGOUT", None).await?;
            anyhow::Ok(ops)
        }));
    }
    let mut ops = 0;
    for t in tasks {
        ops += t.await??;
    }
    Ok(ops as f64 / started.elapsed().as_secs_f64())
}

async fn login_load(target: &Target, user: &str, clients: usize, secs: u64) -> anyhow::Result<f64> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let user = user.to_owned();
        let target = target.clone();
        tasks.push(tokio::spawn(async move {
            let mut cycles = 0u64;
            while Instant::now() < deadline {
                let mut c = Client::connect(&target).await?;
                c.cmd(&format!("LOGIN {user} pass"), None).await?;
                c.cmd("SELECT INBOX", None).await?;
                c.cmd("FETCH 1 (BODY.PEEK[])", None).await?;
                c.cmd("LOGOUT", None).await?;
                cycles += 1;
            }
            anyhow::Ok(cycles)
        }));
    }
    let mut cycles = 0;
    for t in tasks {
        cycles += t.await??;
    }
    Ok(cycles as f64 / started.elapsed().as_secs_f64())
}

/// One download round: wall time of connect, LOGIN, EXAMINE, `FETCH 1:100 (BODY.PEEK[])`,
/// LOGOUT.
async fn download(target: &Target, user: &str) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut c = Client::connect(target).await?;
    c.cmd(&format!("LOGIN {user} pass"), None).await?;
    c.cmd("EXAMINE INBOX", None).await?;
    c.cmd("FETCH 1:100 (BODY.PEEK[])", None).await?;
    anyhow::ensure!(c.literal_octets >= 100 * 100 * 1000, "short download");
    c.cmd("LOGOUT", None).await?;
    Ok(started.elapsed().as_secs_f64())
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs `run` on the direct then the forwarded target, `repeats` times; returns the figures
/// `(direct, forwarded)` in run order.
async fn paired<F, Fut>(
    direct: &Target,
    forwarded: &Target,
    repeats: usize,
    mut run: F,
) -> anyhow::Result<(Vec<f64>, Vec<f64>)>
where
    F: FnMut(Target) -> Fut,
    Fut: Future<Output = anyhow::Result<f64>>,
{
    let (mut d, mut f) = (Vec::new(), Vec::new());
    for _ in 0..repeats {
        d.push(run(direct.clone()).await?);
        f.push(run(forwarded.clone()).await?);
    }
    Ok((d, f))
}

/// One line for rates (higher is better): medians and the cost of forwarding.
fn report_rate(name: &str, unit: &str, d: &[f64], f: &[f64]) {
    let per_run: Vec<f64> = d.iter().zip(f).map(|(d, f)| d / f).collect();
    println!(
        "{name:<14} direct {:8.1} {unit}  forwarded {:8.1} {unit}  forwarded/direct time: of medians {:.3}  median of runs {:.3}",
        median(d),
        median(f),
        median(d) / median(f),
        median(&per_run),
    );
}

/// One line for wall times (lower is better).
fn report_time(name: &str, d: &[f64], f: &[f64]) {
    let per_run: Vec<f64> = f.iter().zip(d).map(|(f, d)| f / d).collect();
    let best = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
    println!(
        "{name:<14} direct median {:.4} s best {:.4} s  forwarded median {:.4} s best {:.4} s  forwarded/direct: of medians {:.3}  median of rounds {:.3}",
        median(d),
        best(d),
        median(f),
        best(f),
        median(f) / median(d),
        median(&per_run),
    );
}

fn arg(i: usize, default: u64) -> u64 {
    std::env::args()
        .filter(|a| !a.starts_with('-'))
        .nth(i)
        .and_then(|a| a.parse().ok())
        .unwrap_or(default)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let clients = arg(1, 8) as usize;
    let secs = arg(2, 5);
    let rounds = arg(3, 11) as usize;
    let repeats = arg(4, 3).max(1) as usize;
    let parts = std::env::args()
        .filter(|a| !a.starts_with('-'))
        .nth(5)
        .unwrap_or_else(|| "session,login,download".into());
    let part = |name: &str| parts.split(',').any(|p| p == name);
    let c = Cluster::start(2).await?;
    for user in ["load", "login", "big"] {
        c.node(1)
            .add_account(&format!("{user}@example.com"), "pass")
            .await?;
    }
    let tls = TlsConnector::from(ds_net::tls::client_config_with_ca(&c.pki.ca_cert_pem())?);
    let target = |addr, tls: Option<&TlsConnector>| Target {
        addr,
        tls: tls.cloned(),
    };
    let (a, b) = (
        target(c.node(0).imap(), None),
        target(c.node(1).imap(), None),
    );
    let (a_tls, b_tls) = (
        target(c.node(0).imaps(), Some(&tls)),
        target(c.node(1).imaps(), Some(&tls)),
    );
    // Seed: one message for the login cycle, 100 × 100 KiB for the download.
    let mut s = Client::connect(&b).await?;
    s.cmd("LOGIN login pass", None).await?;
    s.cmd("APPEND INBOX", Some(&message(0, 4096))).await?;
    s.cmd("LOGOUT", None).await?;
    let mut s = Client::connect(&b).await?;
    s.cmd("LOGIN big pass", None).await?;
    let big = message(0, 100 * 1024);
    for _ in 0..100 {
        s.cmd("APPEND INBOX", Some(&big)).await?;
    }
    s.cmd("LOGOUT", None).await?;

    // One forwarded login per account first: the front node learns each owner (the lookup is
    // cached), as it would have long before in a running cluster.
    for user in ["load", "login", "big"] {
        let mut c = Client::connect(&a).await?;
        c.cmd(&format!("LOGIN {user} pass"), None).await?;
        c.cmd("LOGOUT", None).await?;
    }

    println!(
        "imap_load: {clients} clients, {secs} s per run, {repeats} repeats, {rounds} download rounds"
    );
    if part("session") {
        let (d, f) = paired(&b, &a, repeats, |t| async move {
            session_load(&t, "load", clients, secs).await
        })
        .await?;
        report_rate("session", "ops/s", &d, &f);
    }
    let logins = [("login", &b, &a), ("login tls", &b_tls, &a_tls)];
    for (name, direct, forwarded) in logins.into_iter().filter(|_| part("login")) {
        let (d, f) = paired(direct, forwarded, repeats, |t| async move {
            login_load(&t, "login", clients, secs).await
        })
        .await?;
        report_rate(name, "cycles/s", &d, &f);
    }
    let downloads = [("download", &b, &a), ("download tls", &b_tls, &a_tls)];
    for (name, direct, forwarded) in downloads.into_iter().filter(|_| part("download")) {
        // Warm both paths once, then measure.
        download(direct, "big").await?;
        download(forwarded, "big").await?;
        let (d, f) = paired(direct, forwarded, rounds, |t| async move {
            download(&t, "big").await
        })
        .await?;
        report_time(name, &d, &f);
    }
    c.shutdown().await;
    Ok(())
}
