//! SMTP load tool: a 2-node cluster in this process, `S` concurrent SMTP sessions each sending
//! `N` messages of 4 KiB over one session (MAIL/RCPT/DATA repeated, `250` required after DATA).
//!
//! Scenarios: (1) local — recipient alice, who lives on node 0, via node 0; (2) relayed —
//! recipient bob, who lives on node 1, via node 0 (accepted into node 0's durable queue, then
//! relayed to node 1). Reports messages accepted per second (first connect to last `250`), p50
//! and p99 of the DATA-to-`250` latency and, for the relayed case, the end-to-end rate (until
//! every accepted message is in bob's INBOX on node 1).
//!
//! Run: `cargo bench -p dshare-e2e --bench smtp_load`; override the load with
//! `SMTP_LOAD_SESSIONS` and `SMTP_LOAD_MESSAGES` (defaults 20 × 500). Without `--bench` among the
//! arguments (`cargo test --all-targets`) it runs a tiny smoke version (2 × 2).

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ds_testkit::{Cluster, TestNode};
use dshare_e2e::{Smtp, env_usize, message};

const SIZE: usize = 4096;
const SENDER: &str = "load@elsewhere.org";
const ALICE: &str = "alice@example.com";
const BOB: &str = "bob@example.com";
const E2E_TIMEOUT: Duration = Duration::from_secs(300);
/// With no progress (a reply, growth of the INBOX polled) for this long the tool reports a stall and exits
/// rather than hanging; longer than the client's 30 s reply timeout.
const STALL: Duration = Duration::from_secs(45);

static EPOCH: OnceLock<Instant> = OnceLock::new();
static PROGRESS_MS: AtomicU64 = AtomicU64::new(0);
static PHASE: AtomicU64 = AtomicU64::new(0);
const PHASES: [&str; 4] = ["cluster start", "local", "relayed", "shutdown"];

fn progress() {
    let epoch = EPOCH.get_or_init(Instant::now);
    PROGRESS_MS.store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
}

/// Exits the process if nothing progressed for [`STALL`] (e.g. a deadlocked store).
fn watchdog() {
    let epoch = *EPOCH.get_or_init(Instant::now);
    std::thread::spawn(move || {
        loop {
            std::thread::sleep(Duration::from_secs(1));
            let last = Duration::from_millis(PROGRESS_MS.load(Ordering::Relaxed));
            if epoch.elapsed().saturating_sub(last) > STALL {
                let phase = PHASES[PHASE.load(Ordering::Relaxed) as usize];
                eprintln!(
                    "smtp_load: STALLED — no progress for {STALL:?} during {phase:?}; the nodes \
                     appear hung (e.g. a store deadlock); giving up"
                );
                std::process::exit(2);
            }
        }
    });
}

/// What one session did.
#[derive(Default)]
struct SessionResult {
    accepted: usize,
    failed: usize,
    latencies: Vec<Duration>,
    last_ok: Option<Instant>,
    errors: Vec<String>,
}

/// What one scenario did.
struct Outcome {
    name: &'static str,
    accepted: usize,
    failed: usize,
    wall: Duration,
    p50: Duration,
    p99: Duration,
    /// Relayed only: time from the first connect until every accepted message was in the INBOX
    /// (`None` if that did not happen within the timeout).
    e2e: Option<Option<Duration>>,
    errors: Vec<String>,
}

async fn session(
    addr: SocketAddr,
    rcpt: &'static str,
    scenario: &'static str,
    client: usize,
    messages: usize,
) -> SessionResult {
    let mut out = SessionResult::default();
    let mut s = match Smtp::connect(addr).await {
        Ok(s) => s,
        Err(e) => {
            out.failed = messages;
            out.errors.push(format!("client {client}: connect: {e:#}"));
            return out;
        }
    };
    for i in 0..messages {
        let body = message(&format!("load-{scenario}-{client}-{i}"), SIZE);
        let r = transaction(&mut s, rcpt, &body).await;
        progress();
        match r {
            Ok(Ok(latency)) => {
                out.accepted += 1;
                out.latencies.push(latency);
                out.last_ok = Some(Instant::now());
            }
            Ok(Err(refused)) => {
                out.failed += 1;
                if out.errors.len() < 3 {
                    out.errors
                        .push(format!("client {client} msg {i}: {refused}"));
                }
            }
            Err(e) => {
                // The session is unusable: the rest of its messages fail.
                out.failed += messages - i;
                out.errors.push(format!("client {client} msg {i}: {e:#}"));
                return out;
            }
        }
    }
    let _ = s.quit().await;
    out
}

/// One MAIL/RCPT/DATA transaction: `Ok(Ok(DATA-to-250 latency))`, `Ok(Err(refusal))` for a
/// refused step (the session stays usable), `Err` for a broken session.
async fn transaction(
    s: &mut Smtp,
    rcpt: &str,
    body: &[u8],
) -> anyhow::Result<Result<Duration, String>> {
    let r = s.cmd(&format!("MAIL FROM:<{SENDER}>")).await?;
    if !r.is(250) {
        s.cmd("RSET").await?;
        return Ok(Err(format!("MAIL {} {}", r.code, r.text)));
    }
    let r = s.cmd(&format!("RCPT TO:<{rcpt}>")).await?;
    if !r.is(250) {
        s.cmd("RSET").await?;
        return Ok(Err(format!("RCPT {} {}", r.code, r.text)));
    }
    let t = Instant::now();
    let r = s.data(body).await?;
    let latency = t.elapsed();
    if !r.is(250) {
        return Ok(Err(format!("DATA {} {}", r.code, r.text)));
    }
    Ok(Ok(latency))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    // Nearest rank.
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Runs one scenario: `sessions` clients against `addr`, each sending `messages` to `rcpt`.
/// With `deliver_to`, also waits until the INBOX there holds `before + accepted` messages.
async fn scenario(
    name: &'static str,
    addr: SocketAddr,
    rcpt: &'static str,
    sessions: usize,
    messages: usize,
    deliver_to: Option<(&TestNode, usize)>,
) -> Outcome {
    let start = Instant::now();
    let tasks: Vec<_> = (0..sessions)
        .map(|client| tokio::spawn(session(addr, rcpt, name, client, messages)))
        .collect();
    let mut accepted = 0;
    let mut failed = 0;
    let mut latencies = Vec::with_capacity(sessions * messages);
    let mut last_ok = None;
    let mut errors = vec![];
    for t in tasks {
        match t.await {
            Ok(r) => {
                accepted += r.accepted;
                failed += r.failed;
                latencies.extend(r.latencies);
                last_ok = last_ok.max(r.last_ok);
                errors.extend(r.errors);
            }
            Err(e) => {
                failed += messages;
                errors.push(format!("session task: {e}"));
            }
        }
    }
    let wall = last_ok.map_or(start.elapsed(), |t| t - start);
    latencies.sort_unstable();

    let e2e = match deliver_to {
        None => None,
        Some((node, before)) => {
            let want = before + accepted;
            let deadline = Instant::now() + E2E_TIMEOUT;
            let mut seen = 0;
            let done = loop {
                let n = node.inbox_len(rcpt);
                if n != seen {
                    // Only growth counts: a stuck relay must trip the watchdog.
                    seen = n;
                    progress();
                }
                if n >= want {
                    break Some(start.elapsed());
                }
                if Instant::now() > deadline {
                    break None;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            Some(done)
        }
    };
    Outcome {
        name,
        accepted,
        failed,
        wall,
        p50: percentile(&latencies, 50.0),
        p99: percentile(&latencies, 99.0),
        e2e,
        errors,
    }
}

fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64().max(1e-9)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn print_header(sessions: usize, messages: usize) {
    println!();
    println!(
        "smtp_load: {sessions} sessions x {messages} messages of {} KiB, 2-node cluster",
        SIZE / 1024
    );
    println!(
        "{:<9} {:>6} {:>5} {:>8} {:>11} {:>8} {:>8} {:>8} {:>8}",
        "scenario", "ok", "fail", "wall s", "accepted/s", "p50 ms", "p99 ms", "e2e s", "e2e/s"
    );
}

fn print_row(o: &Outcome) {
    let (e2e_s, e2e_rate) = match o.e2e {
        None => ("-".to_string(), "-".to_string()),
        Some(None) => ("timeout".to_string(), "-".to_string()),
        Some(Some(d)) => (
            format!("{:.2}", d.as_secs_f64()),
            format!("{:.1}", rate(o.accepted, d)),
        ),
    };
    println!(
        "{:<9} {:>6} {:>5} {:>8.2} {:>11.1} {:>8.2} {:>8.2} {:>8} {:>8}",
        o.name,
        o.accepted,
        o.failed,
        o.wall.as_secs_f64(),
        rate(o.accepted, o.wall),
        ms(o.p50),
        ms(o.p99),
        e2e_s,
        e2e_rate
    );
    for e in o.errors.iter().take(5) {
        println!("  {} error: {e}", o.name);
    }
}

async fn run(sessions: usize, messages: usize) -> anyhow::Result<bool> {
    let c = Cluster::start_with(2, |_, c| {
        c.smtp.retry_base = Duration::from_secs(1);
        c.smtp.retry_max = Duration::from_secs(2);
    })
    .await?;
    c.node(0).add_account(ALICE, "pw").await?;
    c.node(1).add_account(BOB, "pw").await?;
    let via = c.node(0).smtp();
    print_header(sessions, messages);

    PHASE.store(1, Ordering::Relaxed);
    progress();
    let alice_before = c.node(0).inbox_len(ALICE);
    let local = scenario("local", via, ALICE, sessions, messages, None).await;
    let alice_grew = c.node(0).inbox_len(ALICE).saturating_sub(alice_before);
    print_row(&local);

    PHASE.store(2, Ordering::Relaxed);
    progress();

    let bob_before = c.node(1).inbox_len(BOB);
    let relayed = scenario(
        "relayed",
        via,
        BOB,
        sessions,
        messages,
        Some((c.node(1), bob_before)),
    )
    .await;
    let queue_left = c.node(0).node().state.queue.len();
    print_row(&relayed);

    let outcomes = [local, relayed];

    let mut ok = true;
    let total = sessions * messages;
    for o in &outcomes {
        if o.accepted != total || o.failed != 0 {
            eprintln!(
                "{}: {} of {total} accepted, {} failed",
                o.name, o.accepted, o.failed
            );
            ok = false;
        }
    }
    if alice_grew != outcomes[0].accepted {
        eprintln!(
            "local: {} accepted but alice's INBOX grew by {alice_grew}",
            outcomes[0].accepted
        );
        ok = false;
    }
    if outcomes[1].e2e == Some(None) {
        eprintln!("relayed: not every accepted message reached bob's INBOX within {E2E_TIMEOUT:?}");
        ok = false;
    }
    if queue_left != 0 {
        println!("  note: node 0's queue still holds {queue_left} entries after delivery");
    }

    PHASE.store(3, Ordering::Relaxed);
    progress();
    c.shutdown().await;
    Ok(ok)
}

fn main() -> anyhow::Result<()> {
    let bench = std::env::args().any(|a| a == "--bench");
    let (sessions, messages) = if bench {
        (
            env_usize("SMTP_LOAD_SESSIONS", 20),
            env_usize("SMTP_LOAD_MESSAGES", 500),
        )
    } else {
        (2, 2)
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    progress();
    watchdog();
    let ok = rt.block_on(run(sessions, messages))?;
    if !ok {
        std::process::exit(1);
    }
    Ok(())
}
