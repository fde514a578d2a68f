//! Fault campaign (issue 13 point 21): not a CI test, a tool to run by hand.
//!
//! **Kill run.** Starts a cluster of real `dshare` processes (2–3 nodes on 127.0.0.1, .2, .3,
//! TLS with a generated CA, one shared secret), runs mixed load — SMTP sessions to random
//! nodes for random recipients (so some are delivered locally and some relayed, a fifth of the
//! messages to two recipients at once), and POP3 logins to random nodes for random accounts
//! (forwarded when the account lives elsewhere) — and meanwhile SIGKILLs a random node N times,
//! restarting it each time. Then it lets the queues drain, stops the nodes, opens each node's
//! database and counts, per (message, recipient), acknowledged (`250` after DATA) against
//! stored: lost (acknowledged, not stored), doubled (stored more than once) and stored without
//! an acknowledgement (the client saw the connection die after the commit: allowed).
//!
//! **Peer-fault run.** A fresh two-node cluster where node A reaches node B's Minger through a
//! small TCP proxy in this tool, switched between: B stopped (nothing listens), black-holed
//! (TCP accepted, never answered), slow (each chunk delayed, once below and once above the
//! lookup timeout) and frozen (B's process SIGSTOPped). In each mode it asks node A for
//! accounts of B that A never looked up (`RCPT TO`, and POP3 logins): `550`/`-ERR [AUTH]` for
//! an existing account is a wrong answer (must be 0); it reports the time to each `451`.
//!
//! Run (the binary is `target/debug/dshare` unless `--bin` or `DSHARE_BIN` says otherwise):
//!
//! ```text
//! cargo build -p dshare
//! cargo run -p dshare-e2e --example fault_campaign -- --kills 100 --nodes 2
//! ```
//!
//! Options: `--nodes N` (2–3), `--kills N`, `--clients N` (SMTP load sessions at once),
//! `--seed N`, `--bin PATH`, `--no-kills`, `--no-peer-faults`, `--keep` (keep the data
//! directories and logs, printed at the end). The exit status is 1 if a message was lost or
//! doubled or an existing account was refused.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};

use ds_testkit::node_ip;
use dshare_e2e::processes::{DOMAIN, free_port, own_minger, write_configs};

const PASSWORD: &str = "campaign-password-1";
const SENDER: &str = "load@elsewhere.org";
const USERS_PER_NODE: usize = 3;
/// Bound on every client step (connect, each reply).
const STEP: Duration = Duration::from_secs(20);
/// How long a started node may take to greet on SMTP.
const READY: Duration = Duration::from_secs(90);
/// How long the queues may take to drain after the load.
const DRAIN: Duration = Duration::from_secs(300);

// ---------------------------------------------------------------------------------------------
// Arguments and a small random generator (no dependency for either).

struct Args {
    nodes: usize,
    kills: usize,
    clients: usize,
    seed: u64,
    bin: PathBuf,
    kill_run: bool,
    peer_faults: bool,
    keep: bool,
}

fn args() -> anyhow::Result<Args> {
    let default_bin = std::env::var_os("DSHARE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../target/debug/dshare")
                .to_path_buf()
        });
    let mut a = Args {
        nodes: 2,
        kills: 100,
        clients: 4,
        seed: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64),
        bin: default_bin,
        kill_run: true,
        peer_faults: true,
        keep: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--nodes" => a.nodes = value()?.parse()?,
            "--kills" => a.kills = value()?.parse()?,
            "--clients" => a.clients = value()?.parse()?,
            "--seed" => a.seed = value()?.parse()?,
            "--bin" => a.bin = value()?.into(),
            "--no-kills" => a.kill_run = false,
            "--no-peer-faults" => a.peer_faults = false,
            "--keep" => a.keep = true,
            "--bench" => {} // `cargo bench`-style invocations pass it
            other => bail!("unknown argument {other:?} (see the header of fault_campaign.rs)"),
        }
    }
    if !(2..=3).contains(&a.nodes) {
        bail!("--nodes must be 2 or 3");
    }
    if !a.bin.exists() {
        bail!(
            "no dshare binary at {} (cargo build -p dshare, or give --bin)",
            a.bin.display()
        );
    }
    Ok(a)
}

/// xorshift64*: plenty for picking nodes and recipients.
#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.next() % (hi - lo).max(1))
    }
}

// ---------------------------------------------------------------------------------------------
// A cluster of dshare processes.

struct Ports {
    smtp: u16,
    pop3: u16,
    minger: u16,
    metrics: u16,
}

struct ClusterNode {
    id: String,
    ip: IpAddr,
    dir: PathBuf,
    config: PathBuf,
    ports: Ports,
    child: Option<Child>,
    starts: u32,
}

impl ClusterNode {
    fn smtp(&self) -> SocketAddr {
        SocketAddr::new(self.ip, self.ports.smtp)
    }
    fn pop3(&self) -> SocketAddr {
        SocketAddr::new(self.ip, self.ports.pop3)
    }
    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }
}

struct Cluster {
    bin: PathBuf,
    nodes: Vec<ClusterNode>,
    root: tempfile::TempDir,
}

impl Cluster {
    /// Writes the configurations of `n` nodes. `minger_for(j)` is the Minger address peers
    /// use for node `j` (its own listener, or a fault proxy in front of it).
    fn create(
        bin: &Path,
        n: usize,
        minger_for: impl Fn(usize, u16) -> anyhow::Result<SocketAddr>,
    ) -> anyhow::Result<Cluster> {
        let root = tempfile::Builder::new()
            .prefix("dshare-campaign-")
            .tempdir()?;
        let extra = "[smtp]\nretry_base = \"1s\"\nretry_max = \"5s\"\n";
        let nodes = write_configs(root.path(), n, minger_for, extra)?
            .into_iter()
            .map(|p| ClusterNode {
                id: p.id,
                ip: p.ip,
                dir: p.dir,
                config: p.config,
                ports: Ports {
                    smtp: p.smtp,
                    pop3: p.pop3,
                    minger: p.minger,
                    metrics: p.metrics,
                },
                child: None,
                starts: 0,
            })
            .collect();
        Ok(Cluster {
            bin: bin.to_path_buf(),
            nodes,
            root,
        })
    }

    fn start(&mut self, i: usize) -> anyhow::Result<()> {
        let node = &mut self.nodes[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.dir.join("node.log"))?;
        let child = Command::new(&self.bin)
            .arg("--config")
            .arg(&node.config)
            .arg("serve")
            // Warnings, and the owner's line for a relay it had delivered before (counted).
            .env("RUST_LOG", "warn,ds_smtp::delivery=info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        node.child = Some(child);
        node.starts += 1;
        Ok(())
    }

    /// Waits until node `i` greets on SMTP.
    async fn ready(&mut self, i: usize) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let addr = self.nodes[i].smtp();
        while started.elapsed() < READY {
            if let Some(child) = &mut self.nodes[i].child
                && let Ok(Some(status)) = child.try_wait()
            {
                bail!(
                    "{} exited at start ({status}); see {}",
                    self.nodes[i].id,
                    self.nodes[i].dir.join("node.log").display()
                );
            }
            if let Ok(Ok(mut s)) =
                tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr)).await
            {
                let mut buf = [0u8; 4];
                if let Ok(Ok(4)) =
                    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf)).await
                    && &buf[..3] == b"220"
                {
                    let _ = s.write_all(b"QUIT\r\n").await;
                    return Ok(started.elapsed());
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("{} did not greet within {READY:?}", self.nodes[i].id)
    }

    async fn kill(&mut self, i: usize) -> anyhow::Result<()> {
        if let Some(mut child) = self.nodes[i].child.take() {
            child.start_kill()?; // SIGKILL
            let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
        }
        Ok(())
    }

    /// SIGTERM and a bounded wait for the graceful stop (then SIGKILL).
    async fn stop(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            if let Some(pid) = child.id() {
                signal(pid, "TERM").await;
            }
            if tokio::time::timeout(Duration::from_secs(30), child.wait())
                .await
                .is_err()
            {
                let _ = child.start_kill();
                let _ = child.wait().await;
            }
        }
    }

    fn pid(&self, i: usize) -> Option<u32> {
        self.nodes[i].child.as_ref().and_then(Child::id)
    }

    /// `dshare -c CONFIG ARGS...` (an admin command against the running node).
    async fn admin(&self, i: usize, args: &[&str]) -> anyhow::Result<String> {
        let out = tokio::time::timeout(
            Duration::from_secs(60),
            Command::new(&self.bin)
                .arg("--config")
                .arg(&self.nodes[i].config)
                .args(args)
                .stdin(Stdio::null())
                .kill_on_drop(true)
                .output(),
        )
        .await
        .context("admin command timed out")??;
        if !out.status.success() {
            bail!(
                "dshare {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The node's `dshare_queue_depth` gauge (from its metrics listener, with its admin token).
    async fn queue_depth(&self, i: usize) -> Option<u64> {
        let node = &self.nodes[i];
        let token = std::fs::read_to_string(node.data_dir().join("admin.token")).ok()?;
        let addr = SocketAddr::new(node.ip, node.ports.metrics);
        let text = tokio::time::timeout(STEP, async {
            let mut s = TcpStream::connect(addr).await.ok()?;
            let req = format!(
                "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
                token.trim()
            );
            s.write_all(req.as_bytes()).await.ok()?;
            let mut body = Vec::new();
            s.read_to_end(&mut body).await.ok()?;
            Some(String::from_utf8_lossy(&body).into_owned())
        })
        .await
        .ok()??;
        text.lines()
            .find(|l| l.starts_with("dshare_queue_depth"))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse::<f64>().ok())
            .map(|v| v as u64)
    }
}

async fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .await;
}

fn account(node: usize, user: usize) -> String {
    format!("n{node}u{user}@{DOMAIN}")
}

// ---------------------------------------------------------------------------------------------
// Clients.

/// A line-based client for SMTP and POP3 with a bound on every step.
struct Conn {
    r: BufReader<tokio::net::tcp::OwnedReadHalf>,
    w: tokio::net::tcp::OwnedWriteHalf,
}

impl Conn {
    async fn open(addr: SocketAddr) -> anyhow::Result<Conn> {
        let s = tokio::time::timeout(STEP, TcpStream::connect(addr))
            .await
            .context("connect timed out")??;
        let (r, w) = s.into_split();
        Ok(Conn {
            r: BufReader::new(r),
            w,
        })
    }

    async fn line(&mut self) -> anyhow::Result<String> {
        let mut line = String::new();
        let n = tokio::time::timeout(STEP, self.r.read_line(&mut line))
            .await
            .context("reply timed out")??;
        if n == 0 {
            bail!("connection closed");
        }
        Ok(line.trim_end().to_string())
    }

    /// An SMTP reply (the last line of a multi-line one).
    async fn reply(&mut self) -> anyhow::Result<(u16, String)> {
        loop {
            let line = self.line().await?;
            if line.as_bytes().get(3) == Some(&b'-') {
                continue;
            }
            let code = line.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0);
            return Ok((code, line));
        }
    }

    async fn send(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        tokio::time::timeout(STEP, self.w.write_all(bytes))
            .await
            .context("write timed out")??;
        Ok(())
    }

    async fn cmd(&mut self, line: &str) -> anyhow::Result<(u16, String)> {
        self.send(format!("{line}\r\n").as_bytes()).await?;
        self.reply().await
    }

    async fn pop(&mut self, line: &str) -> anyhow::Result<String> {
        self.send(format!("{line}\r\n").as_bytes()).await?;
        self.line().await
    }
}

/// What the load saw.
#[derive(Default)]
struct Tally {
    /// (message seq, recipient) pairs whose DATA got 250.
    acked: Mutex<Vec<(u64, String)>>,
    /// Messages sent whose DATA did not get 250 (an error or a dead connection).
    unacked_messages: AtomicU64,
    smtp_sessions: AtomicU64,
    connect_failures: AtomicU64,
    rcpt_temp: AtomicU64,
    /// 550 to RCPT for an existing account: wrong whatever happens.
    rcpt_refused: AtomicU64,
    pop3_ok: AtomicU64,
    pop3_temp: AtomicU64,
    /// `-ERR [AUTH]` for an existing account with its password: wrong.
    pop3_auth_refused: AtomicU64,
    pop3_other: AtomicU64,
    pop3_unreachable: AtomicU64,
    /// The first few "other" POP3 replies, for the report.
    pop3_samples: Mutex<Vec<String>>,
}

/// One SMTP load session: a few messages to random accounts over one connection.
async fn smtp_session(
    addr: SocketAddr,
    accounts: &[String],
    rng: &mut Rng,
    seq: &AtomicU64,
    tally: &Tally,
) -> anyhow::Result<()> {
    let mut c = Conn::open(addr).await?;
    tally.smtp_sessions.fetch_add(1, Ordering::Relaxed);
    let (code, _) = c.reply().await?;
    if code != 220 {
        bail!("greeting {code}");
    }
    c.cmd("EHLO campaign.test").await?;
    for _ in 0..1 + rng.below(5) {
        let mut rcpts = vec![accounts[rng.below(accounts.len())].clone()];
        if rng.below(5) == 0 {
            let other = accounts[rng.below(accounts.len())].clone();
            if other != rcpts[0] {
                rcpts.push(other);
            }
        }
        let (code, line) = c.cmd(&format!("MAIL FROM:<{SENDER}>")).await?;
        if code != 250 {
            bail!("MAIL: {line}");
        }
        let mut accepted = Vec::new();
        for r in &rcpts {
            let (code, _) = c.cmd(&format!("RCPT TO:<{r}>")).await?;
            match code {
                250 => accepted.push(r.clone()),
                550 => {
                    tally.rcpt_refused.fetch_add(1, Ordering::Relaxed);
                }
                _ => {
                    tally.rcpt_temp.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        if accepted.is_empty() {
            c.cmd("RSET").await?;
            continue;
        }
        let n = seq.fetch_add(1, Ordering::Relaxed);
        let (code, _) = c.cmd("DATA").await?;
        if code != 354 {
            tally.unacked_messages.fetch_add(1, Ordering::Relaxed);
            c.cmd("RSET").await?;
            continue;
        }
        let body = format!(
            "From: {SENDER}\r\nTo: {}\r\nSubject: campaign {n}\r\nMessage-ID: <fc-{n}@campaign.test>\r\nX-Campaign-Seq: {n}\r\n\r\nfault campaign message {n}\r\n.\r\n",
            accepted.join(", ")
        );
        c.send(body.as_bytes()).await?;
        let reply = c.reply().await;
        match reply {
            Ok((250, _)) => {
                let mut acked = tally.acked.lock().unwrap();
                for r in accepted {
                    acked.push((n, r));
                }
            }
            Ok(_) => {
                tally.unacked_messages.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                tally.unacked_messages.fetch_add(1, Ordering::Relaxed);
                return Err(e);
            }
        }
    }
    let _ = c.cmd("QUIT").await;
    Ok(())
}

/// How a POP3 login ended.
#[derive(Debug, PartialEq, Eq)]
enum PopOutcome {
    Ok,
    Temp,
    AuthRefused,
    Other(String),
}

async fn pop3_login(addr: SocketAddr, user: &str, stat: bool) -> anyhow::Result<PopOutcome> {
    let mut c = Conn::open(addr).await?;
    let greeting = c.line().await?;
    if !greeting.starts_with("+OK") {
        return Ok(PopOutcome::Other(greeting));
    }
    let r = c.pop(&format!("USER {user}")).await?;
    if !r.starts_with("+OK") {
        return Ok(classify(&r));
    }
    let r = c.pop(&format!("PASS {PASSWORD}")).await?;
    if !r.starts_with("+OK") {
        return Ok(classify(&r));
    }
    if stat {
        let r = c.pop("STAT").await?;
        if !r.starts_with("+OK") {
            return Ok(PopOutcome::Other(r));
        }
    }
    let _ = c.pop("QUIT").await;
    Ok(PopOutcome::Ok)
}

fn classify(reply: &str) -> PopOutcome {
    if reply.contains("[AUTH]") {
        PopOutcome::AuthRefused
    } else if reply.contains("[SYS/TEMP]") || reply.contains("[IN-USE]") {
        PopOutcome::Temp
    } else {
        PopOutcome::Other(reply.to_string())
    }
}

// ---------------------------------------------------------------------------------------------
// Kill run.

struct KillReport {
    kills: usize,
    acked: usize,
    stored_pairs: usize,
    lost: usize,
    doubled: usize,
    stored_unacked: usize,
    queued_left: usize,
    /// Relays the owners answered 250 without storing (delivered before), from their logs.
    repeats: usize,
    wall: Duration,
}

async fn kill_run(a: &Args) -> anyhow::Result<KillReport> {
    let started = Instant::now();
    let mut cluster = Cluster::create(&a.bin, a.nodes, own_minger)?;
    println!(
        "kill run: {} nodes, data in {}",
        a.nodes,
        cluster.root.path().display()
    );
    for i in 0..a.nodes {
        cluster.start(i)?;
    }
    for i in 0..a.nodes {
        cluster.ready(i).await?;
    }
    let mut accounts = Vec::new();
    for i in 0..a.nodes {
        for u in 0..USERS_PER_NODE {
            let name = account(i, u);
            cluster
                .admin(i, &["account", "add", &name, "--password", PASSWORD])
                .await?;
            accounts.push(name);
        }
    }
    let accounts = Arc::new(accounts);
    let smtp_addrs: Vec<SocketAddr> = cluster.nodes.iter().map(ClusterNode::smtp).collect();
    let pop3_addrs: Vec<SocketAddr> = cluster.nodes.iter().map(ClusterNode::pop3).collect();
    let tally = Arc::new(Tally::default());
    let seq = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = Vec::new();
    for k in 0..a.clients {
        let (accounts, tally, seq, stop, addrs) = (
            accounts.clone(),
            tally.clone(),
            seq.clone(),
            stop.clone(),
            smtp_addrs.clone(),
        );
        let mut rng = Rng::new(a.seed ^ (k as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let addr = addrs[rng.below(addrs.len())];
                if smtp_session(addr, &accounts, &mut rng, &seq, &tally)
                    .await
                    .is_err()
                {
                    tally.connect_failures.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }));
    }
    {
        let (accounts, tally, stop, addrs) = (
            accounts.clone(),
            tally.clone(),
            stop.clone(),
            pop3_addrs.clone(),
        );
        let mut rng = Rng::new(a.seed ^ 0xA5A5_A5A5);
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let addr = addrs[rng.below(addrs.len())];
                let user = accounts[rng.below(accounts.len())].clone();
                match pop3_login(addr, &user, true).await {
                    Ok(PopOutcome::Ok) => tally.pop3_ok.fetch_add(1, Ordering::Relaxed),
                    Ok(PopOutcome::Temp) => tally.pop3_temp.fetch_add(1, Ordering::Relaxed),
                    Ok(PopOutcome::AuthRefused) => {
                        tally.pop3_auth_refused.fetch_add(1, Ordering::Relaxed)
                    }
                    Ok(PopOutcome::Other(reply)) => {
                        let mut samples = tally.pop3_samples.lock().unwrap();
                        if samples.len() < 3 && !samples.contains(&reply) {
                            samples.push(reply);
                        }
                        tally.pop3_other.fetch_add(1, Ordering::Relaxed)
                    }
                    Err(_) => tally.pop3_unreachable.fetch_add(1, Ordering::Relaxed),
                };
                tokio::time::sleep(rng.millis(100, 400)).await;
            }
        }));
    }
    let mut rng = Rng::new(a.seed);
    let mut restart_times = Vec::new();
    for k in 0..a.kills {
        tokio::time::sleep(rng.millis(300, 2500)).await;
        let victim = rng.below(a.nodes);
        cluster.kill(victim).await?;
        // Sometimes a second node goes down too before the first is back.
        let second = (a.nodes > 1 && rng.below(4) == 0).then(|| (victim + 1) % a.nodes);
        if let Some(s) = second {
            tokio::time::sleep(rng.millis(0, 500)).await;
            cluster.kill(s).await?;
        }
        tokio::time::sleep(rng.millis(0, 1000)).await;
        for i in std::iter::once(victim).chain(second) {
            cluster.start(i)?;
            restart_times.push(cluster.ready(i).await?);
        }
        if (k + 1) % 10 == 0 {
            println!(
                "  {} kills, {} messages acknowledged so far",
                k + 1,
                tally.acked.lock().unwrap().len()
            );
        }
    }
    // Some load after the last kill too.
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    for l in load {
        let _ = tokio::time::timeout(Duration::from_secs(60), l).await;
    }
    // Drain: every queue empty twice in a row.
    let drain_start = Instant::now();
    let mut empty_in_a_row = 0;
    while drain_start.elapsed() < DRAIN && empty_in_a_row < 2 {
        let mut total = 0;
        for i in 0..a.nodes {
            total += cluster.queue_depth(i).await.unwrap_or(u64::MAX / 4);
        }
        empty_in_a_row = if total == 0 { empty_in_a_row + 1 } else { 0 };
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    for i in 0..a.nodes {
        cluster.stop(i).await;
    }
    let mut repeats = 0;
    for node in &cluster.nodes {
        let log = std::fs::read(node.dir.join("node.log")).unwrap_or_default();
        repeats += String::from_utf8_lossy(&log)
            .matches("relayed message delivered before, not stored again")
            .count();
    }
    // Count what the databases hold.
    let mut stored: HashMap<(u64, String), usize> = HashMap::new();
    let mut queued_left = 0;
    for (i, node) in cluster.nodes.iter().enumerate() {
        let store = ds_store::Store::open(&node.data_dir())
            .with_context(|| format!("opening {}'s database", node.id))?;
        let mail = ds_store::MailStore::new(&store)?;
        queued_left += ds_store::QueueStore::new(&store)?.len();
        for u in 0..USERS_PER_NODE {
            let name = account(i, u);
            for meta in mail.messages(&name, "INBOX").unwrap_or_default() {
                let Some(body) = mail.message_body(&name, "INBOX", meta.uid)? else {
                    continue;
                };
                if let Some(n) = campaign_seq(&body) {
                    *stored.entry((n, name.clone())).or_default() += 1;
                }
            }
        }
    }
    let acked = tally.acked.lock().unwrap().clone();
    let lost = acked.iter().filter(|k| !stored.contains_key(k)).count();
    let doubled: usize = stored.values().map(|&c| c.saturating_sub(1)).sum();
    let acked_set: std::collections::HashSet<&(u64, String)> = acked.iter().collect();
    let stored_unacked = stored.keys().filter(|k| !acked_set.contains(k)).count();
    restart_times.sort();
    println!(
        "  restarts: {} (time to greet: median {:?}, max {:?})",
        restart_times.len(),
        restart_times
            .get(restart_times.len() / 2)
            .copied()
            .unwrap_or_default(),
        restart_times.last().copied().unwrap_or_default()
    );
    println!(
        "  load: {} SMTP sessions, {} failed connections/sessions, {} messages without 250, RCPT 4xx {}, RCPT 550 for existing accounts {}",
        tally.smtp_sessions.load(Ordering::Relaxed),
        tally.connect_failures.load(Ordering::Relaxed),
        tally.unacked_messages.load(Ordering::Relaxed),
        tally.rcpt_temp.load(Ordering::Relaxed),
        tally.rcpt_refused.load(Ordering::Relaxed),
    );
    println!(
        "  POP3 logins: {} ok, {} [SYS/TEMP], {} [AUTH] for existing accounts, {} other replies, {} connections failed",
        tally.pop3_ok.load(Ordering::Relaxed),
        tally.pop3_temp.load(Ordering::Relaxed),
        tally.pop3_auth_refused.load(Ordering::Relaxed),
        tally.pop3_other.load(Ordering::Relaxed),
        tally.pop3_unreachable.load(Ordering::Relaxed),
    );
    for sample in tally.pop3_samples.lock().unwrap().iter() {
        println!("    other POP3 reply: {sample}");
    }
    if a.keep {
        let root = cluster.root.keep();
        println!("  kept {}", root.display());
    }
    Ok(KillReport {
        kills: a.kills,
        acked: acked.len(),
        stored_pairs: stored.values().sum(),
        lost,
        doubled,
        stored_unacked,
        queued_left,
        repeats,
        wall: started.elapsed(),
    })
}

/// The `X-Campaign-Seq` of a stored message.
fn campaign_seq(message: &[u8]) -> Option<u64> {
    let text = String::from_utf8_lossy(message);
    let header_end = text.find("\r\n\r\n").unwrap_or(text.len());
    text[..header_end]
        .lines()
        .find_map(|l| l.strip_prefix("X-Campaign-Seq: "))
        .and_then(|v| v.trim().parse().ok())
}

// ---------------------------------------------------------------------------------------------
// Peer-fault run.

/// What the fault proxy in front of node B's Minger does with connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Mode {
    /// Passes bytes both ways.
    Pass = 0,
    /// Nothing listens (connection refused).
    Closed = 1,
    /// Accepts and never answers.
    BlackHole = 2,
    /// Passes bytes, each chunk delayed by the proxy's delay.
    Slow = 3,
}

struct Proxy {
    mode: AtomicU8,
    delay_ms: AtomicU64,
}

impl Proxy {
    fn mode(&self) -> Mode {
        match self.mode.load(Ordering::SeqCst) {
            1 => Mode::Closed,
            2 => Mode::BlackHole,
            3 => Mode::Slow,
            _ => Mode::Pass,
        }
    }
    fn set(&self, mode: Mode, delay: Duration) {
        self.delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
        self.mode.store(mode as u8, Ordering::SeqCst);
    }
}

/// The proxy on `listen`, forwarding to `upstream`; rebinding after a `Closed` spell.
async fn run_proxy(proxy: Arc<Proxy>, listen: SocketAddr, upstream: SocketAddr) {
    let mut held: Vec<TcpStream> = Vec::new();
    loop {
        if proxy.mode() == Mode::Closed {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        let Ok(listener) = TcpListener::bind(listen).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        while proxy.mode() != Mode::Closed {
            let Ok(Ok((client, _))) =
                tokio::time::timeout(Duration::from_millis(50), listener.accept()).await
            else {
                continue;
            };
            match proxy.mode() {
                Mode::BlackHole => {
                    // Kept open and never read: the bytes sit in the kernel's buffers.
                    held.push(client);
                    if held.len() > 256 {
                        held.remove(0);
                    }
                }
                Mode::Closed => drop(client),
                Mode::Pass | Mode::Slow => {
                    let proxy = proxy.clone();
                    tokio::spawn(async move {
                        let Ok(Ok(server)) = tokio::time::timeout(
                            Duration::from_secs(5),
                            TcpStream::connect(upstream),
                        )
                        .await
                        else {
                            return;
                        };
                        let (cr, cw) = client.into_split();
                        let (sr, sw) = server.into_split();
                        tokio::select! {
                            _ = pipe(cr, sw, proxy.clone()) => {}
                            _ = pipe(sr, cw, proxy) => {}
                        }
                    });
                }
            }
        }
        drop(listener);
        held.clear();
    }
}

/// Copies one direction of a proxied connection. Connections made before a fault follow it
/// too, as they would with a real fault: closed when B is stopped, never answered again while
/// it is black-holed (until the mode changes back), delayed while it is slow.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    proxy: Arc<Proxy>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match proxy.mode() {
            Mode::Closed => return,
            Mode::BlackHole => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            Mode::Pass | Mode::Slow => {}
        }
        let n = match tokio::time::timeout(Duration::from_millis(50), from.read(&mut buf)).await {
            Err(_) => continue,
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(n)) => n,
        };
        if proxy.mode() == Mode::Slow {
            let d = proxy.delay_ms.load(Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(d)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// One fault mode's answers at node A for accounts of node B.
#[derive(Default)]
struct FaultRow {
    mode: String,
    rcpt_250: usize,
    rcpt_451: usize,
    /// 550 for an existing account: must be 0.
    rcpt_550: usize,
    rcpt_other: usize,
    /// Time from RCPT to its 451.
    to_451: Vec<Duration>,
    pop3_temp: usize,
    /// `-ERR [AUTH]` for an existing account with its password: must be 0.
    pop3_auth: usize,
    pop3_ok: usize,
    pop3_other: usize,
    to_pop3_temp: Vec<Duration>,
}

async fn probe(
    row: &mut FaultRow,
    smtp: SocketAddr,
    pop3: SocketAddr,
    fresh: &mut impl Iterator<Item = String>,
    n: usize,
) -> anyhow::Result<()> {
    for _ in 0..n {
        let user = fresh.next().context("out of fresh accounts")?;
        let mut c = Conn::open(smtp).await?;
        c.reply().await?;
        c.cmd("EHLO probe.test").await?;
        c.cmd(&format!("MAIL FROM:<{SENDER}>")).await?;
        let t = Instant::now();
        let (code, _) = c.cmd(&format!("RCPT TO:<{user}>")).await?;
        let took = t.elapsed();
        match code {
            250 => row.rcpt_250 += 1,
            451 => {
                row.rcpt_451 += 1;
                row.to_451.push(took);
            }
            550 => row.rcpt_550 += 1,
            _ => row.rcpt_other += 1,
        }
        let _ = c.cmd("QUIT").await;
        let user = fresh.next().context("out of fresh accounts")?;
        let t = Instant::now();
        match pop3_login(pop3, &user, false).await {
            Ok(PopOutcome::Ok) => row.pop3_ok += 1,
            Ok(PopOutcome::Temp) => {
                row.pop3_temp += 1;
                row.to_pop3_temp.push(t.elapsed());
            }
            Ok(PopOutcome::AuthRefused) => row.pop3_auth += 1,
            Ok(PopOutcome::Other(_)) | Err(_) => row.pop3_other += 1,
        }
    }
    Ok(())
}

async fn peer_fault_run(a: &Args) -> anyhow::Result<Vec<FaultRow>> {
    const PROBES: usize = 4;
    // A reaches B's Minger through the proxy; B reaches A directly.
    let proxy_addr = SocketAddr::new(node_ip(1), free_port(node_ip(1))?);
    let mut cluster = Cluster::create(&a.bin, 2, |j, port| {
        if j == 1 {
            Ok(proxy_addr)
        } else {
            own_minger(j, port)
        }
    })?;
    println!("peer-fault run: data in {}", cluster.root.path().display());
    let b_minger = SocketAddr::new(node_ip(1), cluster.nodes[1].ports.minger);
    let proxy = Arc::new(Proxy {
        mode: AtomicU8::new(Mode::Pass as u8),
        delay_ms: AtomicU64::new(0),
    });
    let proxy_task = tokio::spawn(run_proxy(proxy.clone(), proxy_addr, b_minger));
    for i in 0..2 {
        cluster.start(i)?;
    }
    for i in 0..2 {
        cluster.ready(i).await?;
    }
    // Accounts on B that A never looks up before its probe (so never cached at A).
    let modes: [(&str, Mode, Duration, bool); 6] = [
        ("healthy", Mode::Pass, Duration::ZERO, false),
        (
            "slow 300 ms/chunk",
            Mode::Slow,
            Duration::from_millis(300),
            false,
        ),
        ("slow 3 s/chunk", Mode::Slow, Duration::from_secs(3), false),
        ("black-holed", Mode::BlackHole, Duration::ZERO, false),
        ("stopped", Mode::Closed, Duration::ZERO, false),
        ("frozen (SIGSTOP)", Mode::Pass, Duration::ZERO, true),
    ];
    let needed = modes.len() * PROBES * 2;
    let mut names = Vec::new();
    for u in 0..needed {
        let name = format!("pf{u}@{DOMAIN}");
        cluster
            .admin(1, &["account", "add", &name, "--password", PASSWORD])
            .await?;
        names.push(name);
    }
    let mut fresh = names.into_iter();
    let (smtp, pop3) = (cluster.nodes[0].smtp(), cluster.nodes[0].pop3());
    let mut rows = Vec::new();
    for (name, mode, delay, freeze) in modes {
        proxy.set(mode, delay);
        let pid = cluster.pid(1);
        if freeze && let Some(pid) = pid {
            signal(pid, "STOP").await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut row = FaultRow {
            mode: name.to_string(),
            ..FaultRow::default()
        };
        let probed = probe(&mut row, smtp, pop3, &mut fresh, PROBES).await;
        if freeze && let Some(pid) = pid {
            signal(pid, "CONT").await;
        }
        proxy.set(Mode::Pass, Duration::ZERO);
        probed?;
        rows.push(row);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    proxy_task.abort();
    for i in 0..2 {
        cluster.stop(i).await;
    }
    if a.keep {
        let root = cluster.root.keep();
        println!("  kept {}", root.display());
    }
    Ok(rows)
}

fn stats(v: &[Duration]) -> String {
    if v.is_empty() {
        return "-".into();
    }
    let mut v = v.to_vec();
    v.sort();
    format!(
        "min {:.2}s / median {:.2}s / max {:.2}s",
        v[0].as_secs_f64(),
        v[v.len() / 2].as_secs_f64(),
        v[v.len() - 1].as_secs_f64()
    )
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = args()?;
    println!(
        "fault campaign: seed {}, binary {}",
        a.seed,
        a.bin.display()
    );
    let mut bad = false;
    if a.kill_run {
        let r = kill_run(&a).await?;
        println!(
            "KILL RUN: {} kills of random nodes in {:.0} s: acked {} (message, recipient) pairs, stored {}, lost {}, doubled {}, stored without 250 {}, left queued {}; repeated relays answered 250 without a copy: {}",
            r.kills,
            r.wall.as_secs_f64(),
            r.acked,
            r.stored_pairs,
            r.lost,
            r.doubled,
            r.stored_unacked,
            r.queued_left,
            r.repeats
        );
        bad |= r.lost > 0 || r.doubled > 0;
    }
    if a.peer_faults {
        let rows = peer_fault_run(&a).await?;
        println!("PEER-FAULT RUN (node A asked for accounts of node B it never looked up):");
        let mut summary = BTreeMap::new();
        for r in &rows {
            println!(
                "  {:<18} RCPT: 250 {} / 451 {} / 550 {} / other {}; time to 451: {}",
                r.mode,
                r.rcpt_250,
                r.rcpt_451,
                r.rcpt_550,
                r.rcpt_other,
                stats(&r.to_451)
            );
            println!(
                "  {:<18} POP3: ok {} / [SYS/TEMP] {} / [AUTH] {} / other {}; time to [SYS/TEMP]: {}",
                "",
                r.pop3_ok,
                r.pop3_temp,
                r.pop3_auth,
                r.pop3_other,
                stats(&r.to_pop3_temp)
            );
            *summary.entry("550 for existing accounts").or_insert(0) += r.rcpt_550;
            *summary.entry("[AUTH] for existing accounts").or_insert(0) += r.pop3_auth;
        }
        for (k, v) in &summary {
            println!("  total {k}: {v} (must be 0)");
            bad |= *v > 0;
        }
    }
    if bad {
        std::process::exit(1);
    }
    Ok(())
}
