//! `dshare doctor` (issue #12): checks each peer end to end from this node, the way mail and
//! sessions will reach it — a Minger `Hello` (is it there, is it the node we think, where are
//! its services), then the SMTP relay (`EHLO`, `STARTTLS`, `EHLO` over TLS verified against the
//! cluster CA), POP3 `STLS` and IMAP `STARTTLS`, each verified the same way. Every step is
//! bounded by [`STEP_TIMEOUT`]; peers are checked concurrently.

use std::time::{Duration, Instant};

use ds_access::owner::{self, OwnerConn};
use ds_net::TlsConnector;
use serde_json::json;

use crate::NodeState;

/// Bound on one step (connect, one reply, a TLS handshake) of a check.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest reply line read from a peer.
const MAX_REPLY: usize = 4096;
/// Most lines of a multi-line reply (SMTP `EHLO`, IMAP untagged data) read before giving up.
const MAX_LINES: usize = 100;

/// The outcome of one check of one peer.
#[derive(Debug, Clone)]
pub struct CheckResult {
    /// `minger`, `smtp`, `pop3` or `imap`.
    pub check: &'static str,
    pub ok: bool,
    /// How long the whole check took, when it ran.
    pub elapsed: Option<Duration>,
    /// What was checked, or what went wrong.
    pub detail: String,
}

/// Every check of one peer.
#[derive(Debug, Clone)]
pub struct PeerReport {
    pub id: String,
    pub checks: Vec<CheckResult>,
}

impl PeerReport {
    pub fn ok(&self) -> bool {
        self.checks.iter().all(|c| c.ok)
    }
}

/// Checks every configured peer, concurrently.
pub async fn run(node: &NodeState) -> Vec<PeerReport> {
    let hellos = node.locator.hello_peers().await;
    let checks = hellos.into_iter().map(|h| async move {
        let mut checks = vec![];
        let (smtp, pop3, imap) = match &h.reply {
            Ok(reply) => {
                let detail = if reply.node_id != h.id {
                    format!(
                        "answers as node {:?}, configured as {:?}: fix [[cluster.peers]] id",
                        reply.node_id, h.id
                    )
                } else {
                    format!("node {}, version {}", reply.node_id, reply.version)
                };
                checks.push(CheckResult {
                    check: "minger",
                    ok: reply.node_id == h.id,
                    elapsed: Some(h.elapsed),
                    detail,
                });
                (
                    h.smtp_override
                        .clone()
                        .unwrap_or_else(|| reply.smtp.clone()),
                    reply.pop3.clone(),
                    reply.imap.clone(),
                )
            }
            Err(e) => {
                checks.push(CheckResult {
                    check: "minger",
                    ok: false,
                    elapsed: Some(h.elapsed),
                    detail: format!("{}: {e}", h.minger_url),
                });
                (
                    h.smtp_override.clone().unwrap_or_default(),
                    String::new(),
                    String::new(),
                )
            }
        };
        let tls = node.peer_tls.clone().map(TlsConnector::from);
        let tls = tls.as_ref();
        let (s, p, i) = tokio::join!(
            timed(
                "smtp",
                &smtp,
                tls,
                check_smtp(&smtp, tls, &node.config.node.advertise)
            ),
            timed("pop3", &pop3, tls, check_pop3(&pop3, tls)),
            timed("imap", &imap, tls, check_imap(&imap, tls)),
        );
        checks.extend([s, p, i]);
        PeerReport { id: h.id, checks }
    });
    futures::future::join_all(checks).await
}

/// Runs one protocol check against `endpoint`, or explains why it could not run.
async fn timed(
    check: &'static str,
    endpoint: &str,
    tls: Option<&TlsConnector>,
    f: impl std::future::Future<Output = Result<String, String>>,
) -> CheckResult {
    if endpoint.is_empty() {
        return CheckResult {
            check,
            ok: false,
            elapsed: None,
            detail: "not checked: endpoint unknown (Minger did not answer, or the peer does not advertise it)".into(),
        };
    }
    if tls.is_none() {
        return CheckResult {
            check,
            ok: false,
            elapsed: None,
            detail: "not checked: no cluster CA configured ([tls] cluster_ca)".into(),
        };
    }
    let started = Instant::now();
    let result = f.await;
    let elapsed = Some(started.elapsed());
    match result {
        Ok(detail) => CheckResult {
            check,
            ok: true,
            elapsed,
            detail: format!("{endpoint}: {detail}"),
        },
        Err(e) => CheckResult {
            check,
            ok: false,
            elapsed,
            detail: e,
        },
    }
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// Reads one line and checks it starts with `want`.
async fn expect(conn: &mut OwnerConn, endpoint: &str, want: &str) -> Result<Vec<u8>, String> {
    let line = owner::read_reply(conn, endpoint, MAX_REPLY, STEP_TIMEOUT)
        .await
        .map_err(err)?;
    if line.starts_with(want.as_bytes()) {
        Ok(line)
    } else {
        Err(format!(
            "{endpoint}: expected {want:?}, got {:?}",
            String::from_utf8_lossy(&line).trim_end()
        ))
    }
}

/// Sends `line` and reads an SMTP reply (all its lines); returns the lines when the code is `code`.
async fn smtp_cmd(
    conn: &mut OwnerConn,
    endpoint: &str,
    line: Option<&str>,
    code: &str,
) -> Result<Vec<String>, String> {
    if let Some(line) = line {
        conn.write_all(format!("{line}\r\n").as_bytes())
            .await
            .map_err(err)?;
        conn.flush().await.map_err(err)?;
    }
    let mut lines = vec![];
    for _ in 0..MAX_LINES {
        let l = owner::read_reply(conn, endpoint, MAX_REPLY, STEP_TIMEOUT)
            .await
            .map_err(err)?;
        let l = String::from_utf8_lossy(&l).trim_end().to_string();
        let last = l.as_bytes().get(3) != Some(&b'-');
        if !l.starts_with(code) {
            return Err(format!(
                "{endpoint}: {} got {l:?}",
                line.unwrap_or("greeting")
            ));
        }
        lines.push(l);
        if last {
            return Ok(lines);
        }
    }
    Err(format!("{endpoint}: reply longer than {MAX_LINES} lines"))
}

async fn check_smtp(
    endpoint: &str,
    tls: Option<&TlsConnector>,
    helo: &str,
) -> Result<String, String> {
    let tls = tls.ok_or("no cluster CA")?;
    let mut conn = owner::connect(endpoint, STEP_TIMEOUT).await.map_err(err)?;
    smtp_cmd(&mut conn, endpoint, None, "220").await?;
    let ehlo = smtp_cmd(&mut conn, endpoint, Some(&format!("EHLO {helo}")), "250").await?;
    if !ehlo.iter().any(|l| {
        l.get(4..)
            .is_some_and(|k| k.eq_ignore_ascii_case("STARTTLS"))
    }) {
        return Err(format!("{endpoint}: STARTTLS not offered"));
    }
    smtp_cmd(&mut conn, endpoint, Some("STARTTLS"), "220").await?;
    let mut conn = owner::start_tls(conn, endpoint, tls, STEP_TIMEOUT)
        .await
        .map_err(err)?;
    smtp_cmd(&mut conn, endpoint, Some(&format!("EHLO {helo}")), "250").await?;
    let _ = smtp_cmd(&mut conn, endpoint, Some("QUIT"), "221").await;
    Ok("EHLO, STARTTLS verified, EHLO".into())
}

async fn check_pop3(endpoint: &str, tls: Option<&TlsConnector>) -> Result<String, String> {
    let tls = tls.ok_or("no cluster CA")?;
    let mut conn = owner::connect(endpoint, STEP_TIMEOUT).await.map_err(err)?;
    expect(&mut conn, endpoint, "+OK").await?;
    owner::command(&mut conn, endpoint, b"STLS\r\n", MAX_REPLY, STEP_TIMEOUT)
        .await
        .map_err(err)
        .and_then(|l| {
            if l.starts_with(b"+OK") {
                Ok(())
            } else {
                Err(format!(
                    "{endpoint}: STLS refused: {}",
                    String::from_utf8_lossy(&l).trim_end()
                ))
            }
        })?;
    let mut conn = owner::start_tls(conn, endpoint, tls, STEP_TIMEOUT)
        .await
        .map_err(err)?;
    let l = owner::command(&mut conn, endpoint, b"QUIT\r\n", MAX_REPLY, STEP_TIMEOUT)
        .await
        .map_err(err)?;
    if !l.starts_with(b"+OK") {
        return Err(format!(
            "{endpoint}: QUIT over TLS: {}",
            String::from_utf8_lossy(&l).trim_end()
        ));
    }
    Ok("STLS verified".into())
}

/// Reads untagged lines until the one tagged `tag`; it must be OK.
async fn imap_tagged(
    conn: &mut OwnerConn,
    endpoint: &str,
    tag: &str,
    what: &str,
) -> Result<(), String> {
    for _ in 0..MAX_LINES {
        let l = owner::read_reply(conn, endpoint, MAX_REPLY, STEP_TIMEOUT)
            .await
            .map_err(err)?;
        if let Some(rest) = l.strip_prefix(format!("{tag} ").as_bytes()) {
            return if rest.starts_with(b"OK") {
                Ok(())
            } else {
                Err(format!(
                    "{endpoint}: {what}: {}",
                    String::from_utf8_lossy(&l).trim_end()
                ))
            };
        }
    }
    Err(format!(
        "{endpoint}: {what}: no tagged reply within {MAX_LINES} lines"
    ))
}

async fn check_imap(endpoint: &str, tls: Option<&TlsConnector>) -> Result<String, String> {
    let tls = tls.ok_or("no cluster CA")?;
    let mut conn = owner::connect(endpoint, STEP_TIMEOUT).await.map_err(err)?;
    expect(&mut conn, endpoint, "* OK").await?;
    conn.write_all(b"d1 STARTTLS\r\n").await.map_err(err)?;
    conn.flush().await.map_err(err)?;
    imap_tagged(&mut conn, endpoint, "d1", "STARTTLS").await?;
    let mut conn = owner::start_tls(conn, endpoint, tls, STEP_TIMEOUT)
        .await
        .map_err(err)?;
    conn.write_all(b"d2 LOGOUT\r\n").await.map_err(err)?;
    conn.flush().await.map_err(err)?;
    imap_tagged(&mut conn, endpoint, "d2", "LOGOUT over TLS").await?;
    Ok("STARTTLS verified".into())
}

/// The reports as a table, one line per check, and a summary line.
pub fn table(reports: &[PeerReport]) -> Vec<String> {
    if reports.is_empty() {
        return vec!["no peers configured".into()];
    }
    let w = reports.iter().map(|r| r.id.len()).max().unwrap_or(4).max(4);
    let mut out = vec![format!(
        "{:w$}  {:6}  {:4}  {:>8}  DETAIL",
        "PEER", "CHECK", "OK", "MS"
    )];
    for r in reports {
        for c in &r.checks {
            let ms = c.elapsed.map_or("-".to_string(), |d| {
                format!("{:.1}", d.as_secs_f64() * 1000.0)
            });
            let ok = match (c.ok, c.elapsed) {
                (true, _) => "ok",
                (false, Some(_)) => "FAIL",
                (false, None) => "skip",
            };
            out.push(format!(
                "{:w$}  {:6}  {ok:4}  {ms:>8}  {}",
                r.id, c.check, c.detail
            ));
        }
    }
    let bad = reports.iter().filter(|r| !r.ok()).count();
    out.push(if bad == 0 {
        format!("{} peer(s), all checks passed", reports.len())
    } else {
        format!("{} peer(s), {bad} with problems", reports.len())
    });
    out
}

/// The reports as JSON: `{"ok": bool, "peers": [{"id", "ok", "checks": [...]}]}`.
pub fn to_json(reports: &[PeerReport]) -> serde_json::Value {
    json!({
        "ok": reports.iter().all(PeerReport::ok),
        "peers": reports.iter().map(|r| json!({
            "id": r.id,
            "ok": r.ok(),
            "checks": r.checks.iter().map(|c| json!({
                "check": c.check,
                "ok": c.ok,
                "ms": c.elapsed.map(|d| d.as_secs_f64() * 1000.0),
                "detail": c.detail,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}
