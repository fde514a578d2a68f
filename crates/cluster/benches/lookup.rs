//! `Locator::locate` latency and throughput on a three-node loopback cluster (real Minger
//! servers over TLS with a test CA), measured from node 0:
//!
//! * `local`          — the account is in node 0's own directory;
//! * `cached_remote`  — owned by node 1 and already in node 0's positive cache;
//! * `fanout_found`   — owned by node 2, cache entry dropped (`forget`) before every
//!   locate, so each iteration asks both peers and returns on node 2's FOUND;
//! * `fanout_unknown` — nobody has it (no negative cache), so each iteration waits for
//!   NOT FOUND from both peers.
//!
//! After the criterion groups, a fixed-iteration pass timed with `Instant` prints p50/p99
//! latency and sequential lookups per second for each case (only under `cargo bench`).
//! Every case checks the peers' `lookups_served()` counters: the local and cached cases
//! must not reach a peer, each fan-out must.
//!
//! ```text
//! cargo bench -p ds-cluster --bench lookup
//! ```

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use ds_cluster::{Location, Locator, Purpose};
use tokio::runtime::Runtime;

#[path = "../tests/common/mod.rs"]
mod common;
use common::{Cluster, Node, Options};

const LOCAL: &str = "alice@example.com";
const CACHED: &str = "bob@example.com";
const FANOUT: &str = "carol@example.com";
const UNKNOWN: &str = "nobody@example.com";

/// Iterations of the `Instant`-timed percentile pass.
const FAST_ITERATIONS: usize = 2000;
const FANOUT_ITERATIONS: usize = 500;

/// Three nodes serving Minger over TLS on 127.0.0.1 (the tests' fixture), with the
/// default 2 s lookup timeout.
async fn start_cluster() -> Vec<Node> {
    Cluster::start(
        3,
        Options {
            timeout: Duration::from_secs(2),
            ..Options::default()
        },
    )
    .await
    .nodes
}

/// The bench fixture: node 0 locates; nodes 1 and 2 are its peers.
struct Fixture {
    rt: Runtime,
    nodes: Vec<Node>,
}

impl Fixture {
    fn new() -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let nodes = rt.block_on(async {
            let nodes = start_cluster().await;
            nodes[0].directory.add_account(LOCAL, "pw", 0).unwrap();
            nodes[1].directory.add_account(CACHED, "pw", 0).unwrap();
            nodes[2].directory.add_account(FANOUT, "pw", 0).unwrap();
            let l = &nodes[0].locator;
            // Dial both peers (TLS handshakes) and fill the cache before measuring.
            assert!(matches!(
                l.locate(LOCAL, Purpose::Rcpt).await,
                Location::Local { .. }
            ));
            assert_remote(l.locate(CACHED, Purpose::Rcpt).await, "office-1");
            assert_remote(l.locate(FANOUT, Purpose::Rcpt).await, "office-2");
            assert_eq!(l.locate(UNKNOWN, Purpose::Rcpt).await, Location::Unknown);
            nodes
        });
        Self { rt, nodes }
    }

    fn locator(&self) -> Locator {
        self.nodes[0].locator.clone()
    }

    /// `lookups_served()` of peers 1 and 2, after a pause for calls still in flight (a
    /// fan-out returns on the first FOUND without waiting for the other peer).
    fn served(&self) -> [u64; 2] {
        self.rt
            .block_on(async { tokio::time::sleep(Duration::from_millis(100)).await });
        [
            self.nodes[1].service.lookups_served(),
            self.nodes[2].service.lookups_served(),
        ]
    }
}

fn assert_remote(location: Location, node: &str) {
    match location {
        Location::Remote(owner) if owner.node == node => {}
        other => panic!("expected Remote on {node}, got {other:?}"),
    }
}

/// The checks a case's results must pass, and how many peer lookups it must cause.
#[derive(Clone, Copy)]
enum Case {
    Local,
    Cached,
    FanoutFound,
    FanoutUnknown,
}

impl Case {
    const ALL: [Case; 4] = [
        Case::Local,
        Case::Cached,
        Case::FanoutFound,
        Case::FanoutUnknown,
    ];

    fn name(self) -> &'static str {
        match self {
            Case::Local => "local",
            Case::Cached => "cached_remote",
            Case::FanoutFound => "fanout_found",
            Case::FanoutUnknown => "fanout_unknown",
        }
    }

    fn address(self) -> &'static str {
        match self {
            Case::Local => LOCAL,
            Case::Cached => CACHED,
            Case::FanoutFound => FANOUT,
            Case::FanoutUnknown => UNKNOWN,
        }
    }

    fn iterations(self) -> usize {
        match self {
            Case::Local | Case::Cached => FAST_ITERATIONS,
            Case::FanoutFound | Case::FanoutUnknown => FANOUT_ITERATIONS,
        }
    }

    /// One locate, timed; cache entries are dropped first (untimed) for the fan-outs.
    async fn run_once(self, locator: &Locator) -> Duration {
        let address = self.address();
        if let Case::FanoutFound = self {
            locator.forget(address).await;
        }
        let start = Instant::now();
        let location = locator.locate(black_box(address), Purpose::Rcpt).await;
        let elapsed = start.elapsed();
        match self {
            Case::Local => assert!(matches!(location, Location::Local { .. }), "{location:?}"),
            Case::Cached => assert_remote(location, "office-1"),
            Case::FanoutFound => assert_remote(location, "office-2"),
            Case::FanoutUnknown => assert_eq!(location, Location::Unknown),
        }
        elapsed
    }

    /// Checks the peers' lookup counters after `n` iterations: `before` → `after`.
    fn verify(self, n: u64, before: [u64; 2], after: [u64; 2]) -> [u64; 2] {
        let delta = [after[0] - before[0], after[1] - before[1]];
        match self {
            Case::Local | Case::Cached => {
                assert_eq!(delta, [0, 0], "{}: a peer was asked", self.name());
            }
            // The owner (node 2) answers every fan-out; node 1 is asked too, but its call
            // is dropped once node 2's FOUND arrives, so it may not have been counted.
            Case::FanoutFound => {
                assert_eq!(
                    delta[1],
                    n,
                    "{}: not one fan-out per iteration",
                    self.name()
                );
                assert!(delta[0] <= n);
            }
            Case::FanoutUnknown => {
                assert_eq!(
                    delta,
                    [n, n],
                    "{}: not one fan-out per iteration",
                    self.name()
                );
            }
        }
        delta
    }
}

fn criterion_benches(c: &mut Criterion, fixture: &Fixture) {
    for case in Case::ALL {
        let mut group = c.benchmark_group("locate");
        group.throughput(Throughput::Elements(1));
        match case {
            Case::Local | Case::Cached => group
                .sample_size(50)
                .warm_up_time(Duration::from_millis(500))
                .measurement_time(Duration::from_secs(2)),
            Case::FanoutFound | Case::FanoutUnknown => group
                .sample_size(30)
                .warm_up_time(Duration::from_secs(1))
                .measurement_time(Duration::from_secs(4)),
        };
        let iterations = Arc::new(AtomicU64::new(0));
        let before = fixture.served();
        group.bench_function(case.name(), |b| {
            b.to_async(&fixture.rt).iter_custom(|iters| {
                let locator = fixture.locator();
                let iterations = iterations.clone();
                async move {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        total += case.run_once(&locator).await;
                    }
                    iterations.fetch_add(iters, Ordering::Relaxed);
                    total
                }
            });
        });
        group.finish();
        let n = iterations.load(Ordering::Relaxed);
        let delta = case.verify(n, before, fixture.served());
        println!(
            "locate/{}: {n} locates (warm-up included), peer lookups served: office-1 {}, office-2 {}\n",
            case.name(),
            delta[0],
            delta[1]
        );
    }
}

/// A fixed number of sequential locates per case, timed one by one with `Instant`.
fn percentiles(fixture: &Fixture) {
    println!("Percentiles (sequential locates from office-0, one caller, Instant-timed):");
    println!(
        "{:<16} {:>6} {:>12} {:>12} {:>12} {:>14}  peer lookups (office-1, office-2)",
        "case", "n", "p50", "p99", "mean", "locates/s"
    );
    for case in Case::ALL {
        let n = case.iterations();
        let locator = fixture.locator();
        let before = fixture.served();
        let (mut samples, wall) = fixture.rt.block_on(async {
            let mut samples = Vec::with_capacity(n);
            let start = Instant::now();
            for _ in 0..n {
                samples.push(case.run_once(&locator).await);
            }
            (samples, start.elapsed())
        });
        let delta = case.verify(n as u64, before, fixture.served());
        samples.sort_unstable();
        let total: Duration = samples.iter().sum();
        let mean = total / n as u32;
        // Throughput counts only the locate calls (not the untimed `forget`s).
        let per_second = n as f64 / total.as_secs_f64();
        println!(
            "{:<16} {:>6} {:>12.2?} {:>12.2?} {:>12.2?} {:>14.0}  {} / {}   (wall {:.2?})",
            case.name(),
            n,
            percentile(&samples, 50.0),
            percentile(&samples, 99.0),
            mean,
            per_second,
            delta[0],
            delta[1],
            wall,
        );
    }
}

/// Nearest-rank percentile of sorted `samples`.
fn percentile(samples: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * samples.len() as f64).ceil() as usize;
    samples[rank.clamp(1, samples.len()) - 1]
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let fixture = Fixture::new();
    criterion_benches(&mut c, &fixture);
    // `cargo bench` passes `--bench`; `cargo test --benches` does not (criterion then runs
    // each benchmark once as a test, and the percentile pass is skipped).
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--bench") && !args.iter().any(|a| a == "--list") {
        percentiles(&fixture);
    }
    c.final_summary();
}
