//! IMAP load through real nodes: the same work directly on the owner (node B) and through a
//! forwarding node (A → B over STARTTLS verified against the cluster CA, as in production).
//!
//! ```text
//! cargo bench -p dshare-e2e --bench imap_load [-- CLIENTS SECONDS ROUNDS]
//! ```
//!
//! - `session`: CLIENTS clients, each logged in once, loop SELECT, FETCH 1:* (FLAGS), STORE,
//!   APPEND, EXPUNGE (ops = commands completed).
//! - `login`: CLIENTS clients loop connect, LOGIN, SELECT, FETCH 1 (BODY.PEEK[]), LOGOUT
//!   (ops = cycles; the password check dominates).
//! - `download`: one client, `FETCH 1:100 BODY.PEEK[]` of 100 × 100 KiB, ROUNDS times; median
//!   and best wall time.
//!
//! Each figure is printed direct and forwarded, with the ratio forwarded/direct.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use ds_testkit::Cluster;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

const TIMEOUT: Duration = Duration::from_secs(60);

/// A minimal IMAP client: tagged commands, responses read to the tagged line, literals skipped.
struct Client {
    r: BufReader<OwnedReadHalf>,
    w: OwnedWriteHalf,
    n: u64,
    /// Octets of literals received by the last command.
    literal_octets: usize,
}

impl Client {
    async fn connect(addr: SocketAddr) -> anyhow::Result<Client> {
        let s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        let (r, w) = s.into_split();
        let mut c = Client {
            r: BufReader::with_capacity(256 * 1024, r),
            w,
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
        self.w.write_all(&out).await?;
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
    addr: SocketAddr,
    user: &str,
    clients: usize,
    secs: u64,
) -> anyhow::Result<f64> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..clients {
        let user = user.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(addr).await?;
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

async fn login_load(
    addr: SocketAddr,
    user: &str,
    clients: usize,
    secs: u64,
) -> anyhow::Result<f64> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let user = user.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut cycles = 0u64;
            while Instant::now() < deadline {
                let mut c = Client::connect(addr).await?;
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

async fn download(addr: SocketAddr, user: &str, rounds: usize) -> anyhow::Result<(f64, f64)> {
    let mut times = Vec::new();
    for _ in 0..rounds {
        let started = Instant::now();
        let mut c = Client::connect(addr).await?;
        c.cmd(&format!("LOGIN {user} pass"), None).await?;
        c.cmd("EXAMINE INBOX", None).await?;
        c.cmd("FETCH 1:100 (BODY.PEEK[])", None).await?;
        anyhow::ensure!(c.literal_octets >= 100 * 100 * 1000, "short download");
        c.cmd("LOGOUT", None).await?;
        times.push(started.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok((times[times.len() / 2], times[0]))
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
    let c = Cluster::start(2).await?;
    for user in ["load", "login", "big"] {
        c.node(1)
            .add_account(&format!("{user}@example.com"), "pass")
            .await?;
    }
    let (a, b) = (c.node(0).imap(), c.node(1).imap());
    // Seed: one message for the login cycle, 100 × 100 KiB for the download.
    let mut s = Client::connect(b).await?;
    s.cmd("LOGIN login pass", None).await?;
    s.cmd("APPEND INBOX", Some(&message(0, 4096))).await?;
    s.cmd("LOGOUT", None).await?;
    let mut s = Client::connect(b).await?;
    s.cmd("LOGIN big pass", None).await?;
    let big = message(0, 100 * 1024);
    for _ in 0..100 {
        s.cmd("APPEND INBOX", Some(&big)).await?;
    }
    s.cmd("LOGOUT", None).await?;

    println!("imap_load: {clients} clients, {secs} s per run, {rounds} download rounds");
    let d = session_load(b, "load", clients, secs).await?;
    let f = session_load(a, "load", clients, secs).await?;
    println!(
        "session  direct {d:8.1} ops/s  forwarded {f:8.1} ops/s  slowdown {:.3}",
        d / f
    );
    let d = login_load(b, "login", clients, secs).await?;
    let f = login_load(a, "login", clients, secs).await?;
    println!(
        "login    direct {d:8.1} cycles/s  forwarded {f:8.1} cycles/s  slowdown {:.3}",
        d / f
    );
    // Warm both paths once, then measure.
    download(b, "big", 1).await?;
    download(a, "big", 1).await?;
    let (dm, db) = download(b, "big", rounds).await?;
    let (fm, fb) = download(a, "big", rounds).await?;
    println!(
        "download 100 x 100 KiB  direct median {dm:.4} s best {db:.4} s  forwarded median {fm:.4} s best {fb:.4} s  ratio median {:.3} best {:.3}",
        fm / dm,
        fb / db
    );
    c.shutdown().await;
    Ok(())
}
