//! The operator's status page (`GET /status` on the metrics listener): this node, its peers,
//! the queue, lookup and login rates, recent errors, and small SVG graphs of the last hour
//! from an in-memory history. Plain HTML/CSS/SVG, no external assets; it reloads itself.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write;
use std::sync::Mutex;

use metrics_exporter_prometheus::PrometheusHandle;

use ds_store::unix_now;

use crate::NodeState;

/// Samples kept: one hour at one every 10 s.
pub const HISTORY_LEN: usize = 360;

/// One sample of the node's numbers (counters are running totals).
#[derive(Debug, Clone, Default)]
pub struct Sample {
    pub at: i64,
    pub queue: f64,
    pub lookups: f64,
    pub cache_hits: f64,
    pub cache_misses: f64,
    pub logins: f64,
    pub delivered: f64,
    /// Round trip per peer, in milliseconds.
    pub peer_rtt: BTreeMap<String, f64>,
}

/// The last hour of samples.
#[derive(Debug, Default)]
pub struct History {
    samples: Mutex<VecDeque<Sample>>,
}

/// Sum of every series named `name` (any labels) in a Prometheus text rendering.
fn total(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn labelled(text: &str, name: &str, label: &str) -> f64 {
    let prefix = format!("{name}{{{label}}}");
    text.lines()
        .filter_map(|l| l.strip_prefix(&prefix)?.trim().parse::<f64>().ok())
        .sum()
}

impl History {
    /// Takes a sample now (blocking: reads the queue).
    pub fn record(&self, node: &NodeState, handle: Option<&PrometheusHandle>) {
        let text = handle.map(|h| h.render()).unwrap_or_default();
        let mut s = Sample {
            at: unix_now(),
            queue: node.queue.len() as f64,
            lookups: total(&text, "dshare_lookups_total"),
            cache_hits: labelled(&text, "dshare_lookup_cache_total", "result=\"hit\""),
            cache_misses: labelled(&text, "dshare_lookup_cache_total", "result=\"miss\""),
            logins: total(&text, "dshare_pop3_logins_total")
                + total(&text, "dshare_imap_logins_total"),
            delivered: labelled(&text, "dshare_smtp_messages_total", "result=\"accepted\"")
                + labelled(&text, "dshare_smtp_messages_total", "result=\"relayed\""),
            ..Default::default()
        };
        for p in node.locator.peers_status() {
            if let Some(rtt) = p.last_rtt {
                s.peer_rtt.insert(p.id, rtt.as_secs_f64() * 1000.0);
            }
        }
        let mut v = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        if v.len() == HISTORY_LEN {
            v.pop_front();
        }
        v.push_back(s);
    }

    fn snapshot(&self) -> Vec<Sample> {
        self.samples
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Per-minute rate of a running total between consecutive samples.
fn rates(samples: &[Sample], f: impl Fn(&Sample) -> f64) -> Vec<f64> {
    samples
        .windows(2)
        .map(|w| {
            let dt = (w[1].at - w[0].at).max(1) as f64;
            ((f(&w[1]) - f(&w[0])).max(0.0)) * 60.0 / dt
        })
        .collect()
}

/// A small line graph of `values` (oldest first).
fn sparkline(title: &str, values: &[f64], unit: &str) -> String {
    let (w, h) = (300.0, 60.0);
    let max = values.iter().cloned().fold(0.0_f64, f64::max);
    let top = if max > 0.0 { max } else { 1.0 };
    let n = values.len().max(2) as f64 - 1.0;
    let points: Vec<String> = values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            format!(
                "{:.1},{:.1}",
                i as f64 * w / n,
                h - 4.0 - (v / top) * (h - 8.0)
            )
        })
        .collect();
    let last = values.last().cloned().unwrap_or(0.0);
    format!(
        r##"<figure><figcaption>{} <b>{last:.1}{unit}</b> <small>max {max:.1}</small></figcaption><svg viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" aria-label="{}"><rect width="{w}" height="{h}" fill="#f6f8fa"/><polyline fill="none" stroke="#0969da" stroke-width="2" points="{}"/></svg></figure>"##,
        esc(title),
        esc(title),
        points.join(" ")
    )
}

const STYLE: &str = "body{font:14px system-ui,sans-serif;margin:1.5em;color:#1f2328}\
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.1em;margin:1.2em 0 .4em}\
table{border-collapse:collapse}td,th{padding:.25em .7em;border-bottom:1px solid #d0d7de;text-align:left}\
.up{color:#1a7f37;font-weight:bold}.down{color:#cf222e;font-weight:bold}.unknown{color:#9a6700}\
.grid{display:flex;flex-wrap:wrap;gap:1em}figure{margin:0}figcaption{font-size:.9em}\
.muted{color:#656d76}.err{color:#cf222e}";

impl NodeState {
    /// The status page.
    pub fn status_html(&self) -> String {
        let now = unix_now();
        let samples = self.history.snapshot();
        let q = self.queue_summary();
        let peers = self.locator.peers_status();
        let mut h = String::with_capacity(16 * 1024);
        let _ = write!(
            h,
            "<!doctype html><html><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"10\">\
<title>dshare {id}</title><style>{STYLE}</style></head><body>\
<h1>Domain Share node <code>{id}</code></h1><div class=\"muted\">version {ver} · main domain {dom} · up {up}s · page made at unix {now}, reloads every 10 s</div>",
            id = esc(&self.config.node.id),
            ver = env!("CARGO_PKG_VERSION"),
            dom = esc(&self.config.node.main_domain),
            up = self.started.elapsed().as_secs(),
        );

        h.push_str("<h2>Peers</h2>");
        if peers.is_empty() {
            h.push_str("<p class=\"muted\">no peers configured</p>");
        } else {
            h.push_str("<table id=\"peers\"><tr><th>peer</th><th>state</th><th>RTT</th><th>Minger</th><th>last error</th></tr>");
            for p in &peers {
                let state = crate::peer_state_name(&p.state);
                let _ = write!(
                    h,
                    "<tr class=\"peer\"><td>{}</td><td class=\"{state}\">{state}</td><td>{}</td><td>{}</td><td class=\"err\">{}</td></tr>",
                    esc(&p.id),
                    p.last_rtt
                        .map(|r| format!("{:.1} ms", r.as_secs_f64() * 1000.0))
                        .unwrap_or_else(|| "–".into()),
                    esc(&p.minger_url),
                    esc(p.last_error.as_deref().unwrap_or("")),
                );
            }
            h.push_str("</table>");
        }

        let _ = write!(
            h,
            "<h2>Queue</h2><p id=\"queue\">{} message(s), {} held, oldest {}s</p>",
            q.size, q.held, q.oldest_age
        );
        if !q.by_destination.is_empty() {
            h.push_str("<table><tr><th>destination</th><th>pending recipients</th></tr>");
            for (dest, n) in &q.by_destination {
                let _ = write!(h, "<tr><td>{}</td><td>{n}</td></tr>", esc(dest));
            }
            h.push_str("</table>");
        }
        if let Ok((lines, _)) = self.queue_listing()
            && q.size > 0
        {
            h.push_str("<ul class=\"entries\">");
            for l in lines.iter().take(20) {
                let _ = write!(h, "<li><code>{}</code></li>", esc(l));
            }
            h.push_str("</ul>");
        }

        let last = samples.last().cloned().unwrap_or_default();
        let lookups_total = last.cache_hits + last.cache_misses;
        let ratio = if lookups_total > 0.0 {
            format!("{:.0}%", last.cache_hits * 100.0 / lookups_total)
        } else {
            "–".into()
        };
        let per_min = |f: fn(&Sample) -> f64| {
            rates(&samples[samples.len().saturating_sub(7)..], f)
                .iter()
                .fold(0.0, |a, b| a + b)
                / 6.0_f64.min(samples.len().saturating_sub(1).max(1) as f64)
        };
        let _ = write!(
            h,
            "<h2>Traffic</h2><table><tr><th>lookups / min</th><th>cache hit ratio</th><th>logins / min</th><th>deliveries / min</th></tr>\
<tr><td>{:.1}</td><td>{ratio}</td><td>{:.1}</td><td>{:.1}</td></tr></table>",
            per_min(|s| s.lookups),
            per_min(|s| s.logins),
            per_min(|s| s.delivered),
        );

        h.push_str("<h2>Last hour</h2><div class=\"grid\">");
        h.push_str(&sparkline(
            "queue size",
            &samples.iter().map(|s| s.queue).collect::<Vec<_>>(),
            "",
        ));
        h.push_str(&sparkline(
            "lookups / min",
            &rates(&samples, |s| s.lookups),
            "",
        ));
        h.push_str(&sparkline(
            "logins / min",
            &rates(&samples, |s| s.logins),
            "",
        ));
        h.push_str(&sparkline(
            "deliveries / min",
            &rates(&samples, |s| s.delivered),
            "",
        ));
        for p in &peers {
            let v: Vec<f64> = samples
                .iter()
                .map(|s| s.peer_rtt.get(&p.id).cloned().unwrap_or(0.0))
                .collect();
            h.push_str(&sparkline(&format!("RTT {}", p.id), &v, " ms"));
        }
        h.push_str("</div>");

        h.push_str("<h2>Recent errors</h2><ul id=\"errors\">");
        let mut any = false;
        for p in &peers {
            if let Some(e) = &p.last_error {
                any = true;
                let _ = write!(h, "<li class=\"err\">peer {}: {}</li>", esc(&p.id), esc(e));
            }
        }
        for (id, e) in &q.recent_failures {
            any = true;
            let _ = write!(h, "<li class=\"err\">queue {id}: {}</li>", esc(e));
        }
        if !any {
            h.push_str("<li class=\"muted\">none</li>");
        }
        h.push_str("</ul></body></html>");
        h
    }
}
