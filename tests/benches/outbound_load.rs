//! Submission and outbound load tool: one node in this process, "the Internet" of
//! tests/internet.rs (a DNS server and an SMTP sink offering STARTTLS) on loopback, and `C`
//! concurrent clients each submitting `N` messages of 4 KiB to `x@outside.test` through the
//! submission port (587-style: STARTTLS verified against the test CA, then AUTH PLAIN), `K`
//! messages per session.
//!
//! Reports submissions per second (first connect until the last `250` of DATA) with the p50/p99
//! DATA-to-`250` latency, and outbound deliveries per second: from the first submission until
//! the sink holds every accepted message (each delivered by the node's queue over its own
//! opportunistic-TLS session to the sink, the MX of `outside.test`).
//!
//! Run: `cargo bench -p dshare-e2e --bench outbound_load`; override the load with
//! `OUTBOUND_LOAD_CLIENTS`, `OUTBOUND_LOAD_MESSAGES` and `OUTBOUND_LOAD_PER_SESSION` (defaults
//! 10 × 100, 10 per session); `OUTBOUND_LOAD_SINK_TLS=0` takes STARTTLS off the sink.
//! Without `--bench` among the arguments (`cargo test --all-targets`) it runs a tiny smoke
//! version (2 × 2).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use ds_net::{LineConn, MailStream, TlsConnector};
use ds_testkit::Cluster;
use dshare_e2e::env_usize;
use dshare_e2e::internet::{Sink, dns_server};

const SIZE: usize = 4096;
const USER: &str = "bob@example.com";
const PASSWORD: &str = "b0b-load-secret";
const RCPT: &str = "x@outside.test";
const TIMEOUT: Duration = Duration::from_secs(30);
/// AUTH attempts of a session while the node answers 454.
const AUTH_TRIES: usize = 100;
/// How long the sink may take to receive every accepted message.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(600);

/// A submission client over [`LineConn`]: STARTTLS, AUTH PLAIN, transactions.
struct Submitter {
    conn: LineConn<MailStream>,
}

impl Submitter {
    async fn reply(&mut self) -> anyhow::Result<(u16, String)> {
        loop {
            let line = self
                .conn
                .read_line(4096, TIMEOUT)
                .await?
                .ok_or_else(|| anyhow::anyhow!("connection closed"))?;
            let line = String::from_utf8_lossy(&line).trim_end().to_string();
            let code: u16 = line.get(..3).unwrap_or("").parse()?;
            if line.as_bytes().get(3) != Some(&b'-') {
                return Ok((code, line));
            }
        }
    }

    async fn cmd(&mut self, line: &str, want: u16) -> anyhow::Result<()> {
        self.conn
            .write_all(format!("{line}\r\n").as_bytes())
            .await?;
        self.conn.flush().await?;
        let (code, text) = self.reply().await?;
        anyhow::ensure!(code == want, "{line:?}: {text}");
        Ok(())
    }

    /// Connects, secures the session with STARTTLS and logs in.
    async fn open(addr: SocketAddr, tls: &Arc<rustls::ClientConfig>) -> anyhow::Result<Self> {
        let tcp = tokio::time::timeout(TIMEOUT, tokio::net::TcpStream::connect(addr)).await??;
        tcp.set_nodelay(true)?;
        let mut s = Submitter {
            conn: LineConn::new(MailStream::Plain(tcp)),
        };
        let (code, text) = s.reply().await?;
        anyhow::ensure!(code == 220, "greeting {text}");
        s.cmd("EHLO load.test", 250).await?;
        s.cmd("STARTTLS", 220).await?;
        let stream = s
            .conn
            .into_inner()
            .connect_tls(
                &TlsConnector::from(Arc::clone(tls)),
                &addr.ip().to_string(),
                TIMEOUT,
            )
            .await?;
        s.conn = LineConn::new(stream);
        s.cmd("EHLO load.test", 250).await?;
        let token =
            base64::engine::general_purpose::STANDARD.encode(format!("\0{USER}\0{PASSWORD}"));
        // 454: the node's bounded password checks are busy (a burst of first logins, before
        // the verified password is cached); a real client tries again a little later.
        for _ in 0..AUTH_TRIES {
            s.conn
                .write_all(format!("AUTH PLAIN {token}\r\n").as_bytes())
                .await?;
            s.conn.flush().await?;
            match s.reply().await? {
                (235, _) => return Ok(s),
                (454, _) => tokio::time::sleep(Duration::from_millis(10)).await,
                (_, text) => anyhow::bail!("AUTH: {text}"),
            }
        }
        anyhow::bail!("AUTH: still 454 after {AUTH_TRIES} tries")
    }

    /// One transaction; the DATA-to-`250` latency.
    async fn submit(&mut self, body: &[u8]) -> anyhow::Result<Duration> {
        self.cmd(&format!("MAIL FROM:<{USER}>"), 250).await?;
        self.cmd(&format!("RCPT TO:<{RCPT}>"), 250).await?;
        self.cmd("DATA", 354).await?;
        let started = Instant::now();
        self.conn.write_all(body).await?;
        self.cmd(".", 250).await?;
        Ok(started.elapsed())
    }
}

/// A 4 KiB message from the user (the sender rules want its own `From:`), dot-stuffing free.
fn body(client: usize, i: usize) -> Vec<u8> {
    let mut m = format!(
        "From: {USER}\r\nTo: {RCPT}\r\nSubject: load-{client}-{i}\r\n\
         Message-ID: <load-{client}-{i}@example.com>\r\n\r\n"
    )
    .into_bytes();
    let line = b"The quick brown fox jumps over the lazy dog, 0123456789.\r\n";
    while m.len() + line.len() <= SIZE {
        m.extend_from_slice(line);
    }
    m
}

#[derive(Default)]
struct ClientResult {
    accepted: usize,
    latencies: Vec<Duration>,
    last_ok: Option<Instant>,
    errors: Vec<String>,
}

async fn client(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    id: usize,
    messages: usize,
    per_session: usize,
) -> ClientResult {
    let mut out = ClientResult::default();
    let mut i = 0;
    while i < messages {
        let mut s = match Submitter::open(addr, &tls).await {
            Ok(s) => s,
            Err(e) => {
                out.errors.push(format!("client {id}: open: {e:#}"));
                return out;
            }
        };
        for _ in 0..per_session.min(messages - i) {
            match s.submit(&body(id, i)).await {
                Ok(latency) => {
                    out.accepted += 1;
                    out.latencies.push(latency);
                    out.last_ok = Some(Instant::now());
                }
                Err(e) => {
                    out.errors.push(format!("client {id} msg {i}: {e:#}"));
                    return out;
                }
            }
            i += 1;
        }
        let _ = s.cmd("QUIT", 221).await;
    }
    out
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64().max(1e-9)
}

async fn run(clients: usize, messages: usize, per_session: usize) -> anyhow::Result<bool> {
    let dns = dns_server().await?;
    let pki = ds_net::tls::Pki::generate("sink CA");
    let (cert, key) = pki.issue(&["mx.outside.test"], &["127.0.0.1".parse()?]);
    let sink_tls = env_usize("OUTBOUND_LOAD_SINK_TLS", 1) != 0;
    let sink = match sink_tls {
        true => Sink::default().with_starttls(&cert, &key)?,
        false => Sink::default(),
    };
    let port = sink.start().await?.port();
    let c = Cluster::start_with(1, move |_, c| {
        c.smtp.retry_base = Duration::from_secs(1);
        c.smtp.retry_max = Duration::from_secs(2);
        c.outbound.dns = vec![dns];
        c.outbound.port = port;
    })
    .await?;
    c.node(0).add_account(USER, PASSWORD).await?;
    let tls = ds_net::tls::client_config_with_ca(&c.pki.ca_cert_pem())?;
    let addr = c.node(0).submission();
    // One login first, as a client that has logged in before: its password check is cached.
    Submitter::open(addr, &tls).await?.cmd("QUIT", 221).await?;

    let start = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|id| tokio::spawn(client(addr, Arc::clone(&tls), id, messages, per_session)))
        .collect();
    let mut accepted = 0;
    let mut latencies = vec![];
    let mut last_ok = None;
    let mut errors = vec![];
    for t in tasks {
        let r = t.await?;
        accepted += r.accepted;
        latencies.extend(r.latencies);
        last_ok = last_ok.max(r.last_ok);
        errors.extend(r.errors);
    }
    let submit_wall = last_ok.map_or(start.elapsed(), |t| t - start);
    latencies.sort_unstable();

    let deadline = Instant::now() + DELIVERY_TIMEOUT;
    let delivered_at = loop {
        if sink.received().len() >= accepted {
            break Some(start.elapsed());
        }
        if Instant::now() > deadline {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let received = sink.received();
    let over_tls = received.iter().filter(|r| r.tls).count();

    println!();
    println!(
        "outbound_load: {clients} clients x {messages} messages of {} KiB, {per_session} per \
         session (STARTTLS + AUTH PLAIN on submission), 1 node, sink {} STARTTLS",
        SIZE / 1024,
        if sink_tls { "with" } else { "without" }
    );
    println!(
        "submission: {accepted} accepted in {:.2} s = {:.1} submissions/s (p50 {:.2} ms, p99 {:.2} ms DATA-to-250)",
        submit_wall.as_secs_f64(),
        rate(accepted, submit_wall),
        percentile(&latencies, 50.0).as_secs_f64() * 1000.0,
        percentile(&latencies, 99.0).as_secs_f64() * 1000.0,
    );
    match delivered_at {
        Some(d) => println!(
            "outbound:   {} delivered to the sink in {:.2} s from the first submission = {:.1} deliveries/s ({over_tls} over TLS, at most {} sessions at once)",
            received.len(),
            d.as_secs_f64(),
            rate(received.len(), d),
            sink.max_sessions(),
        ),
        None => println!(
            "outbound:   only {} of {accepted} reached the sink within {DELIVERY_TIMEOUT:?}",
            received.len()
        ),
    }
    for e in errors.iter().take(5) {
        println!("  error: {e}");
    }
    let ok = errors.is_empty()
        && accepted == clients * messages
        && delivered_at.is_some()
        && (over_tls == received.len() || !sink_tls);
    c.shutdown().await;
    Ok(ok)
}

fn main() -> anyhow::Result<()> {
    let bench = std::env::args().any(|a| a == "--bench");
    let (clients, messages, per_session) = if bench {
        (
            env_usize("OUTBOUND_LOAD_CLIENTS", 10),
            env_usize("OUTBOUND_LOAD_MESSAGES", 100),
            env_usize("OUTBOUND_LOAD_PER_SESSION", 10).max(1),
        )
    } else {
        (2, 2, 1)
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let ok = rt.block_on(run(clients, messages, per_session))?;
    anyhow::ensure!(
        ok,
        "outbound_load: not every message was submitted and delivered over TLS"
    );
    Ok(())
}
