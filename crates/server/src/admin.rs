//! The operator's admin service (gRPC on loopback, token from the data directory) and the
//! client the `dshare` CLI uses to reach it.

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use futures::Stream;
use std::pin::Pin;
use subtle::ConstantTimeEq;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

use ds_directory::{Error as DirError, ResolveContext};

use crate::{NodeState, move_status};

pub mod proto {
    tonic::include_proto!("dshare.admin.v1");
}

use proto::admin_request::Op;
use proto::{AdminReply, AdminRequest};

/// Name of the token file in the data directory.
pub const TOKEN_FILE: &str = "admin.token";

/// Reads the admin token, creating it (mode 0600) on first start.
pub fn load_or_create_token(data_dir: &Path) -> std::io::Result<String> {
    let path = data_dir.join(TOKEN_FILE);
    match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => return Ok(t.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let token = crate::random_hex(32);
    crate::write_private(&path, token.as_bytes())?;
    Ok(token)
}

/// Reads the token a CLI needs to talk to the node whose data directory is `data_dir`.
pub fn read_token(data_dir: &Path) -> std::io::Result<String> {
    Ok(std::fs::read_to_string(data_dir.join(TOKEN_FILE))?
        .trim()
        .to_string())
}

/// Checks `authorization: Bearer <token>` in constant time.
#[derive(Clone)]
pub struct TokenCheck {
    token: Arc<String>,
}

impl TokenCheck {
    pub fn new(token: String) -> Self {
        Self {
            token: Arc::new(token),
        }
    }
}

impl tonic::service::Interceptor for TokenCheck {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let given = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if given.as_bytes().ct_eq(self.token.as_bytes()).into() {
            Ok(req)
        } else {
            Err(Status::unauthenticated("bad admin token"))
        }
    }
}

/// The admin service over the node's state.
pub struct AdminService {
    pub(crate) node: Arc<NodeState>,
}

pub(crate) fn status(e: DirError) -> Status {
    match e {
        DirError::Name(_) | DirError::BadRoute(_) | DirError::RoutingLoop => {
            Status::invalid_argument(e.to_string())
        }
        DirError::UnknownDomain(_) => Status::failed_precondition(e.to_string()),
        DirError::Exists(..) => Status::already_exists(e.to_string()),
        DirError::NotFound(..) => Status::not_found(e.to_string()),
        _ => Status::internal(e.to_string()),
    }
}

fn lines(v: impl IntoIterator<Item = String>) -> Response<AdminReply> {
    Response::new(AdminReply {
        lines: v.into_iter().collect(),
        json: String::new(),
    })
}

fn with_json(v: Vec<String>, json: serde_json::Value) -> Response<AdminReply> {
    Response::new(AdminReply {
        lines: v,
        json: json.to_string(),
    })
}

fn selection(s: proto::QueueSelect) -> crate::queue_admin::Selection {
    let opt = |x: String| (!x.is_empty()).then_some(x);
    crate::queue_admin::Selection {
        ids: s.ids,
        all: s.all,
        node: opt(s.node),
        domain: opt(s.domain),
        recipient: opt(s.recipient),
    }
}

fn one(s: impl Into<String>) -> Response<AdminReply> {
    lines([s.into()])
}

fn move_command(m: proto::AccountMove) -> ds_cluster::MoveCommand {
    ds_cluster::MoveCommand {
        name: m.name,
        to: m.to,
        dry_run: m.dry_run,
        abort: m.abort,
    }
}

/// The events of `Move`.
type MoveStream = Pin<Box<dyn Stream<Item = Result<proto::MoveEvent, Status>> + Send>>;

#[tonic::async_trait]
impl proto::admin_server::Admin for AdminService {
    type MoveStream = MoveStream;

    async fn r#move(
        &self,
        req: Request<proto::AccountMove>,
    ) -> Result<Response<MoveStream>, Status> {
        let events = self.node.run_move(move_command(req.into_inner())).await;
        let events = events.map(|event| {
            let event = match event.map_err(move_status)? {
                ds_cluster::MoveEvent::Progress { progress, elapsed } => {
                    proto::move_event::Event::Progress(proto::MoveProgress {
                        messages: progress.messages,
                        bytes: progress.bytes,
                        total_messages: progress.total_messages,
                        total_bytes: progress.total_bytes,
                        elapsed_ms: elapsed.as_millis() as u64,
                    })
                }
                ds_cluster::MoveEvent::Done { lines, json } => {
                    proto::move_event::Event::Done(AdminReply { lines, json })
                }
            };
            Ok(proto::MoveEvent { event: Some(event) })
        });
        Ok(Response::new(Box::pin(events)))
    }

    async fn run(&self, req: Request<AdminRequest>) -> Result<Response<AdminReply>, Status> {
        let op = req
            .into_inner()
            .op
            .ok_or_else(|| Status::invalid_argument("empty request"))?;
        let reply = self.execute(op).await?;
        // What the operator was told is done is on disk.
        self.node
            .store
            .flush_async()
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(reply)
    }
}

impl AdminService {
    async fn execute(&self, op: Op) -> Result<Response<AdminReply>, Status> {
        let dir = &self.node.directory;
        // Directory work hashes passwords and touches the disk: keep it off the reactor.
        let node = self.node.clone();
        match op {
            Op::AccountAdd(a) => {
                if a.password.is_empty() {
                    return Err(Status::invalid_argument("empty password"));
                }
                let account = node.create_account(&a.name, &a.password, a.force).await?;
                Ok(one(format!("created {}", account.address)))
            }
            Op::AccountDel(n) => {
                let account = node.delete_account(&n.name).await?;
                Ok(one(format!("deleted {}", account.address)))
            }
            // Without progress: the result only.
            Op::AccountMove(m) => {
                let mut events = node.run_move(move_command(m)).await;
                while let Some(event) = events.next().await {
                    if let ds_cluster::MoveEvent::Done { lines, json } =
                        event.map_err(move_status)?
                    {
                        return Ok(with_json(
                            lines,
                            serde_json::from_str(&json).unwrap_or_default(),
                        ));
                    }
                }
                Err(Status::internal("the move ended without a result"))
            }
            Op::AccountList(f) => {
                let domain = (!f.domain.is_empty()).then_some(f.domain.as_str());
                let accounts = dir.accounts(domain).map_err(status)?;
                let json = serde_json::Value::Array(
                    accounts
                        .iter()
                        .map(|a| {
                            serde_json::json!({
                                "address": a.address,
                                "enabled": a.enabled,
                                "aliases": a.aliases,
                            })
                        })
                        .collect(),
                );
                Ok(with_json(
                    accounts
                        .into_iter()
                        .map(|a| {
                            let mut s = a.address;
                            if !a.enabled {
                                s.push_str(" (disabled)");
                            }
                            if !a.aliases.is_empty() {
                                s.push_str(&format!(" aliases: {}", a.aliases.join(", ")));
                            }
                            s
                        })
                        .collect(),
                    json,
                ))
            }
            Op::AccountPasswd(a) => {
                if a.password.is_empty() {
                    return Err(Status::invalid_argument("empty password"));
                }
                let d = dir.clone();
                tokio::task::spawn_blocking(move || d.set_password(&a.name, &a.password))
                    .await
                    .map_err(|e| Status::internal(e.to_string()))?
                    .map_err(status)?;
                Ok(one("password changed"))
            }
            Op::AccountEnable(n) => {
                node.set_enabled(&n.name, true).await?;
                Ok(one("enabled"))
            }
            Op::AccountDisable(n) => {
                node.set_enabled(&n.name, false).await?;
                Ok(one("disabled"))
            }
            Op::AliasAdd(p) => {
                node.create_alias(&p.first, &p.second, false).await?;
                Ok(one("alias added"))
            }
            Op::AliasDel(n) => {
                dir.delete_alias(&n.name).map_err(status)?;
                let addr = dir.served_address(&n.name).map_err(status)?.to_string();
                node.account_gone(&addr).await;
                Ok(one("alias deleted"))
            }
            Op::RouteAdd(p) => {
                let r = dir.add_route(&p.first, &p.second).map_err(status)?;
                Ok(one(format!("added {r}")))
            }
            Op::RouteDel(n) => {
                let r = dir.delete_route(&n.name).map_err(status)?;
                Ok(one(format!("deleted {r}")))
            }
            Op::RouteList(_) => Ok(lines(
                dir.routes()
                    .map_err(status)?
                    .into_iter()
                    .map(|r| r.to_string()),
            )),
            Op::ListAdd(n) => {
                let l = node.create_list(&n.name, false).await?;
                Ok(one(format!("created list {}", l.address)))
            }
            Op::ListDel(n) => {
                let l = dir.delete_list(&n.name).map_err(status)?;
                Ok(one(format!("deleted list {}", l.address)))
            }
            Op::ListMembers(n) => {
                let addr = dir.served_address(&n.name).map_err(status)?.to_string();
                let l = dir
                    .list(&addr)
                    .map_err(status)?
                    .ok_or_else(|| Status::not_found(format!("no such mailing list: {addr}")))?;
                Ok(lines(l.members))
            }
            Op::ListSubscribe(p) => {
                let changed = dir.subscribe(&p.first, &p.second).map_err(status)?;
                Ok(one(if changed {
                    "subscribed"
                } else {
                    "already a member"
                }))
            }
            Op::ListUnsubscribe(p) => {
                let changed = dir.unsubscribe(&p.first, &p.second).map_err(status)?;
                Ok(one(if changed {
                    "unsubscribed"
                } else {
                    "not a member"
                }))
            }
            Op::DomainList(_) => Ok(lines(dir.domains().iter().map(|d| {
                let mut s = d.name.clone();
                if d.name == dir.domains().main() {
                    s.push_str(" (main)");
                }
                if d.shared {
                    s.push_str(" shared");
                }
                if !d.addresses.is_empty() {
                    let ips: Vec<String> = d.addresses.iter().map(|a| a.to_string()).collect();
                    s.push_str(&format!(" addresses: {}", ips.join(", ")));
                }
                s
            }))),
            Op::Lookup(l) => {
                let local_ip = if l.local_ip.is_empty() {
                    None
                } else {
                    Some(l.local_ip.parse::<IpAddr>().map_err(|_| {
                        Status::invalid_argument(format!("bad IP address {:?}", l.local_ip))
                    })?)
                };
                let ctx = ResolveContext {
                    local_ip,
                    sni: (!l.sni.is_empty()).then_some(l.sni),
                };
                let res = dir.resolve_login(&l.name, &ctx).map_err(status)?;
                let mut out: Vec<String> = res
                    .steps
                    .iter()
                    .enumerate()
                    .map(|(i, s)| format!("{}. {s}", i + 1))
                    .collect();
                let steps: Vec<String> = res.steps.iter().map(|s| s.to_string()).collect();
                out.push(format!("local outcome: {}", res.outcome));
                let located = node.where_is(&res.outcome).await;
                out.extend(located.iter().cloned());
                let json = serde_json::json!({
                    "name": l.name,
                    "steps": steps,
                    "outcome": res.outcome.to_string(),
                    "location": located,
                });
                Ok(with_json(out, json))
            }
            Op::Peers(_) => Ok(with_json(node.peers_report(), node.peers_json())),
            Op::Doctor(_) => {
                let reports = crate::doctor::run(&node).await;
                let moves = node.unfinished_moves()?;
                let mut table = crate::doctor::table(&reports);
                table.extend(moves.iter().cloned());
                let mut json = crate::doctor::to_json(&reports);
                json["ok"] = (json["ok"] == true && moves.is_empty()).into();
                json["moves"] = moves.into();
                Ok(with_json(table, json))
            }
            Op::QueueList(_) => {
                let (l, j) = node.queue_listing().map_err(Status::internal)?;
                Ok(with_json(l, j))
            }
            Op::QueueShow(id) => {
                let (l, j) = node.queue_show(id.id).map_err(Status::not_found)?;
                Ok(with_json(l, j))
            }
            Op::QueueRetrySelect(s) => {
                let n = node
                    .queue_retry_selected(&selection(s))
                    .map_err(Status::failed_precondition)?;
                Ok(one(format!("{n} message(s) scheduled now")))
            }
            Op::QueueHold(s) => {
                let n = node
                    .queue_hold_selected(&selection(s), true)
                    .map_err(Status::failed_precondition)?;
                Ok(one(format!("{n} message(s) held")))
            }
            Op::QueueRelease(s) => {
                let n = node
                    .queue_hold_selected(&selection(s), false)
                    .map_err(Status::failed_precondition)?;
                Ok(one(format!("{n} message(s) released")))
            }
            Op::QueueDeleteSelect(s) => {
                let n = node
                    .queue_delete_selected(&selection(s))
                    .map_err(Status::failed_precondition)?;
                let busy = if n.busy > 0 {
                    format!(
                        "; {} message(s) were being delivered and were left alone: run again",
                        n.busy
                    )
                } else {
                    String::new()
                };
                Ok(one(format!(
                    "{} message(s) deleted, {} recipient(s) dropped{busy}",
                    n.removed, n.dropped
                )))
            }
            Op::QueueRetry(id) => {
                node.queue_retry(id.id).map_err(Status::not_found)?;
                Ok(one(format!("message {} scheduled now", id.id)))
            }
            Op::QueueDelete(id) => {
                node.queue_delete(id.id).map_err(Status::not_found)?;
                Ok(one(format!("message {} deleted", id.id)))
            }
        }
    }
}

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_token_file_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let token = super::load_or_create_token(dir.path()).unwrap();
        let path = dir.path().join(super::TOKEN_FILE);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(super::read_token(dir.path()).unwrap(), token);
    }
}
