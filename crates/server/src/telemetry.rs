//! Every metric series the node exports, described (HELP, TYPE) and registered at start, so
//! a fresh node's `/metrics` already lists them all at zero; and the sampler that keeps the
//! gauges (uptime, queue size and age, peer up/down) current.
//!
//! A new `metrics::counter!/gauge!/histogram!` anywhere in the workspace belongs in
//! [`CATALOG`] too (the test `every_series_in_the_workspace_is_in_the_catalog` checks it).

use std::sync::Arc;
use std::time::{Duration, Instant};

use ds_net::Shutdown;

use crate::NodeState;

/// What kind of series a catalog entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// One series of the catalog.
#[derive(Debug, Clone, Copy)]
pub struct Series {
    pub name: &'static str,
    pub kind: Kind,
    pub help: &'static str,
    /// The label this series is split by, with the values registered at start (`""` = none).
    /// A label `peer` is registered once per configured peer instead.
    pub label: &'static str,
    pub values: &'static [&'static str],
}

const fn s(
    name: &'static str,
    kind: Kind,
    help: &'static str,
    label: &'static str,
    values: &'static [&'static str],
) -> Series {
    Series {
        name,
        kind,
        help,
        label,
        values,
    }
}

const LOGIN_RESULTS: &[&str] = &["ok", "failed", "tempfail", "forwarded", "in_use"];

/// Every series the node exports.
pub const CATALOG: &[Series] = &[
    s(
        "dshare_build_info",
        Kind::Gauge,
        "Always 1; the labels say which build and node this is.",
        "",
        &[],
    ),
    s(
        "dshare_uptime_seconds",
        Kind::Gauge,
        "Seconds since this node started.",
        "",
        &[],
    ),
    s(
        "dshare_bodies_in_flight_bytes",
        Kind::Gauge,
        "Bytes of message bodies being received right now (node-wide budget).",
        "",
        &[],
    ),
    s(
        "dshare_bodies_in_flight_refused_total",
        Kind::Counter,
        "Messages refused because the node-wide body budget was used up.",
        "",
        &[],
    ),
    s(
        "dshare_queue_depth",
        Kind::Gauge,
        "Messages in the outbound queue.",
        "",
        &[],
    ),
    s(
        "dshare_queue_held",
        Kind::Gauge,
        "Messages in the outbound queue held by the operator.",
        "",
        &[],
    ),
    s(
        "dshare_queue_oldest_age_seconds",
        Kind::Gauge,
        "Age of the oldest message in the outbound queue (0 when empty).",
        "",
        &[],
    ),
    s(
        "dshare_smtp_messages_total",
        Kind::Counter,
        "Messages handled by SMTP, by result.",
        "result",
        &[
            "accepted",
            "relayed",
            "outbound",
            "refused",
            "bounced",
            "too_big",
            "no_budget",
            "no_space",
            "error",
        ],
    ),
    s(
        "dshare_outbound_deliveries_total",
        Kind::Counter,
        "Recipients of outbound delivery attempts (to MX hosts or the relay host), by outcome.",
        "result",
        &["delivered", "deferred", "bounced"],
    ),
    s(
        "dshare_outbound_seconds",
        Kind::Histogram,
        "Time of one outbound delivery attempt of a message to a destination (route, connect, transfer).",
        "",
        &[],
    ),
    s(
        "dshare_outbound_sessions_total",
        Kind::Counter,
        "SMTP sessions opened to MX hosts or the relay host, by whether they run TLS.",
        "tls",
        &["yes", "no"],
    ),
    s(
        "dshare_smtp_relay_sessions_total",
        Kind::Counter,
        "SMTP sessions opened to peers to relay queued mail.",
        "",
        &[],
    ),
    s(
        "dshare_smtp_relay_repeats_total",
        Kind::Counter,
        "Recipients of relays a peer repeated after this node had delivered them (answered 250, not stored again).",
        "",
        &[],
    ),
    s(
        "dshare_smtp_relay_seconds",
        Kind::Histogram,
        "Time to relay one queued message to its owner's SMTP.",
        "",
        &[],
    ),
    s(
        "dshare_imap_appends_total",
        Kind::Counter,
        "IMAP APPENDs refused while their message was received, by reason.",
        "result",
        &["no_budget", "no_space", "error"],
    ),
    s(
        "dshare_imap_logins_total",
        Kind::Counter,
        "IMAP login attempts, by result.",
        "result",
        LOGIN_RESULTS,
    ),
    s(
        "dshare_pop3_forward_links_total",
        Kind::Counter,
        "Forwarded POP3 logins by the connection to the owner they used: one kept warm \
         (STLS done, greeting read), one an earlier session left when its client quit, or one \
         opened for the login.",
        "link",
        &["warm", "reused", "fresh"],
    ),
    s(
        "dshare_pop3_forward_links_kept_total",
        Kind::Counter,
        "Forwarded POP3 sessions whose client quit and whose link to the owner went back to \
         the pool (the owner ended the session with XDSRESET).",
        "",
        &[],
    ),
    s(
        "dshare_imap_forward_links_total",
        Kind::Counter,
        "Forwarded IMAP logins by the connection to the owner they used: one kept warm \
         (TLS up, greeting read), one an earlier session left when its client logged out, or \
         one opened for the login.",
        "link",
        &["warm", "reused", "fresh"],
    ),
    s(
        "dshare_imap_forward_links_kept_total",
        Kind::Counter,
        "Forwarded IMAP sessions whose client logged out and whose link to the owner went back \
         to the pool (the owner ended the session with UNAUTHENTICATE).",
        "",
        &[],
    ),
    s(
        "dshare_submission_logins_total",
        Kind::Counter,
        "Submission (SMTP AUTH) login attempts, by result.",
        "result",
        LOGIN_RESULTS,
    ),
    s(
        "dshare_pop3_logins_total",
        Kind::Counter,
        "POP3 login attempts, by result.",
        "result",
        LOGIN_RESULTS,
    ),
    s(
        "dshare_login_seconds",
        Kind::Histogram,
        "Time to answer a login (POP3, IMAP, SMTP AUTH), by protocol.",
        "protocol",
        &["pop3", "imap", "smtp"],
    ),
    s(
        "dshare_lookups_total",
        Kind::Counter,
        "Address lookups by the Locator, by outcome.",
        "outcome",
        &[
            "local",
            "local_list",
            "remote",
            "remote_host",
            "unknown",
            "refused",
            "tempfail",
        ],
    ),
    s(
        "dshare_lookup_seconds",
        Kind::Histogram,
        "Time to locate an address (local store, cache or peers).",
        "",
        &[],
    ),
    s(
        "dshare_lookup_cache_total",
        Kind::Counter,
        "Locator cache lookups, by result.",
        "result",
        &["hit", "miss"],
    ),
    s(
        "dshare_lookup_fanouts_refused_total",
        Kind::Counter,
        "Peer fan-outs refused because a client used up its budget.",
        "",
        &[],
    ),
    s(
        "dshare_peer_rpc_seconds",
        Kind::Histogram,
        "Round trip of Minger calls to a peer.",
        "peer",
        &[],
    ),
    s(
        "dshare_peer_errors_total",
        Kind::Counter,
        "Failed Minger calls to a peer.",
        "peer",
        &[],
    ),
    s(
        "dshare_peer_up",
        Kind::Gauge,
        "1 when the last Minger call to the peer succeeded, else 0.",
        "peer",
        &[],
    ),
];

/// Buckets for every `*_seconds` histogram.
pub const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

fn register(name: &'static str, kind: Kind, labels: Vec<(&'static str, String)>) {
    match kind {
        Kind::Counter => metrics::counter!(name, &labels).increment(0),
        Kind::Gauge => metrics::gauge!(name, &labels).increment(0.0),
        Kind::Histogram => {
            let _ = metrics::histogram!(name, &labels);
        }
    }
}

/// Describes every series and registers each at zero. `peers` are the configured peer ids.
pub fn register_all(node_id: &str, peers: &[String]) {
    for series in CATALOG {
        let help = series.help;
        match series.kind {
            Kind::Counter => metrics::describe_counter!(series.name, help),
            Kind::Gauge => metrics::describe_gauge!(series.name, help),
            Kind::Histogram => metrics::describe_histogram!(series.name, help),
        }
        if series.label.is_empty() {
            if series.name != "dshare_build_info" {
                register(series.name, series.kind, vec![]);
            }
        } else if series.label == "peer" {
            for p in peers {
                register(series.name, series.kind, vec![("peer", p.clone())]);
            }
        } else {
            for v in series.values {
                register(
                    series.name,
                    series.kind,
                    vec![(series.label, v.to_string())],
                );
            }
        }
    }
    metrics::gauge!(
        "dshare_build_info",
        "version" => env!("CARGO_PKG_VERSION"),
        "node" => node_id.to_string()
    )
    .set(1.0);
}

/// Updates the sampled gauges now.
pub(crate) fn sample(node: &NodeState, started: Instant) {
    metrics::gauge!("dshare_uptime_seconds").set(started.elapsed().as_secs_f64());
    let q = node.queue_summary();
    metrics::gauge!("dshare_queue_depth").set(q.size as f64);
    metrics::gauge!("dshare_queue_held").set(q.held as f64);
    metrics::gauge!("dshare_queue_oldest_age_seconds").set(q.oldest_age as f64);
    for p in node.locator.peers_status() {
        let up = matches!(p.state, ds_cluster::PeerState::Up);
        metrics::gauge!("dshare_peer_up", "peer" => p.id).set(if up { 1.0 } else { 0.0 });
    }
}

/// Keeps the sampled gauges current until `shutdown` (every `every`).
pub(crate) async fn run_sampler(
    node: Arc<NodeState>,
    handle: Option<metrics_exporter_prometheus::PrometheusHandle>,
    every: Duration,
    shutdown: Shutdown,
) {
    loop {
        let n = node.clone();
        let h = handle.clone();
        // Reads the queue from the store: off the reactor.
        let _ = tokio::task::spawn_blocking(move || {
            sample(&n, n.started);
            n.history.record(&n, h.as_ref());
        })
        .await;
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = shutdown.wait() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `metrics::{counter,gauge,histogram}!("name"` literal in the workspace's sources.
    fn names_in(dir: &std::path::Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                if !p.ends_with("target") {
                    names_in(&p, out);
                }
            } else if p.extension().is_some_and(|x| x == "rs") {
                let text = std::fs::read_to_string(&p).unwrap();
                for macro_name in ["counter!(\"", "gauge!(\"", "histogram!(\""] {
                    for (i, _) in text.match_indices(macro_name) {
                        let rest = &text[i + macro_name.len()..];
                        if let Some(end) = rest.find('"') {
                            out.push(rest[..end].to_string());
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn every_series_in_the_workspace_is_in_the_catalog() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let mut names = vec![];
        names_in(&root.join("crates"), &mut names);
        assert!(names.len() > 10, "{names:?}");
        for n in names {
            assert!(
                CATALOG.iter().any(|s| s.name == n),
                "{n} is recorded but not in telemetry::CATALOG"
            );
        }
    }
}
