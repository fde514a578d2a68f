//! Prometheus text exposition on a plain HTTP listener (`GET /metrics`).
//!
//! One recorder serves the whole process (several in-process nodes in tests share it).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use ds_net::Shutdown;
use subtle::ConstantTimeEq;

use crate::NodeState;

/// The request carries the admin token (header or query), compared in constant time.
fn authorized(req: &str, token: &str) -> bool {
    let from_header = req.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("authorization")
            .then(|| v.trim().strip_prefix("Bearer ").unwrap_or("").to_string())
    });
    let from_query = req
        .lines()
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|path| path.split_once("token="))
        .map(|(_, t)| t.split('&').next().unwrap_or("").to_string());
    [from_header, from_query]
        .into_iter()
        .flatten()
        .any(|given| !given.is_empty() && bool::from(given.as_bytes().ct_eq(token.as_bytes())))
}

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// The process-wide recorder's handle; `None` if another recorder was installed first.
pub fn recorder() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Suffix("_seconds".into()),
                    crate::telemetry::SECONDS_BUCKETS,
                )
                .ok()?
                .install_recorder()
                .ok()
        })
        .clone()
}

/// Answers `GET /metrics` (and `/`) with the current metrics and `GET /status` with the status
/// page; one small request per connection. On a listener that is not loopback the status
/// page needs the admin token (`Authorization: Bearer TOKEN` or `?token=TOKEN`).
pub async fn serve(
    l: TcpListener,
    handle: Option<PrometheusHandle>,
    node: Arc<NodeState>,
    token: String,
    shutdown: Shutdown,
) {
    let loopback = l
        .local_addr()
        .map(|a| a.ip().is_loopback())
        .unwrap_or(false);
    let token = Arc::new(token);
    loop {
        let (mut sock, _) = tokio::select! {
            r = l.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.wait() => return,
        };
        let handle = handle.clone();
        let node = node.clone();
        let token = token.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let n = match tokio::time::timeout(Duration::from_secs(5), sock.read(&mut buf)).await {
                Ok(Ok(n)) => n,
                _ => return,
            };
            let req = String::from_utf8_lossy(&buf[..n]);
            let text = "text/plain; version=0.0.4";
            let (status, ctype, body) =
                if req.starts_with("GET /metrics") || req.starts_with("GET / ") {
                    let body = handle.map(|h| h.render()).unwrap_or_default();
                    ("200 OK", text, body)
                } else if req.starts_with("GET /status") {
                    if loopback || authorized(&req, &token) {
                        let n = node.clone();
                        let body = tokio::task::spawn_blocking(move || n.status_html())
                            .await
                            .unwrap_or_default();
                        ("200 OK", "text/html; charset=utf-8", body)
                    } else {
                        (
                            "401 Unauthorized",
                            text,
                            "the admin token is needed\n".to_string(),
                        )
                    }
                } else {
                    ("404 Not Found", text, "not found\n".to_string())
                };
            let resp = format!(
                "HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ =
                tokio::time::timeout(Duration::from_secs(5), sock.write_all(resp.as_bytes())).await;
        });
    }
}
