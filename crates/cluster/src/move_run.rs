//! Running `dshare account move` (or `--abort`) wherever the account lives, with its
//! progress as it goes (DESIGN.md §11).
//!
//! On the owner the move runs in a task of its own (it finishes even if the operator goes
//! away) and its progress comes as events: at most four a second, and one every few seconds
//! even when nothing moved, so that whoever waits can bound each wait. On any other node the
//! owner is located and asked over Minger (`MoveRun`, verified TLS with the cluster secret);
//! it runs the move and streams the same events back. The owner never asks further, so a
//! request cannot go round in circles.

use std::pin::Pin;
use std::time::{Duration, Instant};

use futures::Stream;
use tokio::sync::{mpsc, watch};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::locator::{Location, Locator};
use crate::moving::{MoveProgress, MoveReport, MoveState};
use crate::peer::Peer;
use crate::proto::{
    MoveRunDone, MoveRunEvent, MoveRunProgress, MoveRunRequest, move_run_event::Event,
};
use crate::server::MingerService;
use crate::{Error, Purpose, Result};

/// How often progress is reported at most.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);
/// Progress is repeated this often while nothing moves (the final passes, the switch).
const HEARTBEAT: Duration = Duration::from_secs(5);
/// Bound on the wait for the owner's next event (several heartbeats).
pub const EVENT_WAIT: Duration = Duration::from_secs(120);
/// Events buffered between the move and whoever reports it.
const EVENTS_BUFFERED: usize = 16;

/// What the operator asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MoveCommand {
    pub name: String,
    /// Node id of the new owner (unused by `abort`).
    pub to: String,
    pub dry_run: bool,
    pub abort: bool,
}

/// What a move tells as it runs.
#[derive(Debug, Clone, PartialEq)]
pub enum MoveEvent {
    /// Messages and bytes copied so far, and since when the move runs.
    Progress {
        progress: MoveProgress,
        elapsed: Duration,
    },
    /// The result: lines for the operator and the same as JSON.
    Done { lines: Vec<String>, json: String },
}

/// The events of one run; ends after `Done` or an error.
pub type MoveEvents = ReceiverStream<Result<MoveEvent>>;

impl MoveReport {
    /// The report as JSON, for `--json`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "address": self.address,
            "to": self.to,
            "dry_run": self.dry_run,
            "mailboxes": self.mailboxes.iter().map(|(name, n, b, there)| serde_json::json!({
                "name": name, "messages": n, "bytes": b, "already_there": there,
            })).collect::<Vec<_>>(),
            "aliases": self.aliases,
            "copied": self.copied,
            "copied_bytes": self.copied_bytes,
            "skipped": self.skipped,
            "expunged": self.expunged,
            "seconds": self.elapsed.as_secs_f64(),
        })
    }
}

impl Locator {
    /// Runs `command` on the node that owns the account: here, or on its owner, asked over
    /// Minger. The move goes on to its end even if the events are no longer read.
    pub async fn run_move(&self, command: MoveCommand) -> MoveEvents {
        let (tx, rx) = mpsc::channel(EVENTS_BUFFERED);
        match self.owner_elsewhere(&command.name).await {
            Ok(None) => self.run_move_here(command, tx),
            Ok(Some(owner)) => {
                let this = self.clone();
                tokio::spawn(async move {
                    if let Err(e) = this.run_move_on(&owner, command, &tx).await {
                        let _ = tx.send(Err(e)).await;
                    }
                });
            }
            Err(e) => {
                let _ = tx.send(Err(e)).await;
            }
        }
        ReceiverStream::new(rx)
    }

    /// The peer that owns `name`, or `None` when the move is this node's to run (the
    /// account, an alias of it or an unfinished move of it is here, or nobody has it: the
    /// local run says what is wrong).
    async fn owner_elsewhere(&self, name: &str) -> Result<Option<String>> {
        let dir = &self.inner.directory;
        let address = dir.served_address(name)?.to_string();
        let here = dir.account(&address)?.is_some()
            || dir.alias_of(&address)?.is_some()
            || self
                .inner
                .moves
                .get(&address)?
                .is_some_and(|r| r.state != MoveState::Done);
        if here {
            return Ok(None);
        }
        match self.locate(&address, Purpose::Admin).await {
            Location::Remote(owner) => Ok(Some(owner.node)),
            Location::TempFail(why) => Err(Error::Move(format!(
                "cannot find the owner of {address} now ({why}); run the command on its owner"
            ))),
            _ => Ok(None),
        }
    }

    /// Runs `command` here, sending its events to `tx`.
    fn run_move_here(&self, command: MoveCommand, tx: mpsc::Sender<Result<MoveEvent>>) {
        let started = Instant::now();
        let (progress_tx, mut progress_rx) = watch::channel(MoveProgress::default());
        let this = self.clone();
        let mut work = tokio::spawn(async move {
            if command.abort {
                let lines = this.abort_move(&command.name).await?;
                let json = serde_json::json!({ "aborted": true, "lines": lines }).to_string();
                return Ok(MoveEvent::Done { lines, json });
            }
            let report = this
                .move_account(&command.name, &command.to, command.dry_run, move |p| {
                    progress_tx.send_replace(p);
                })
                .await?;
            Ok(MoveEvent::Done {
                lines: report.lines(),
                json: report.to_json().to_string(),
            })
        });
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(PROGRESS_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last_sent = Instant::now();
            let mut seen = false;
            let progress = |p: MoveProgress| MoveEvent::Progress {
                progress: p,
                elapsed: started.elapsed(),
            };
            loop {
                tokio::select! {
                    biased;
                    // The first progress (the totals, before any message) goes at once.
                    Ok(()) = progress_rx.changed(), if !seen => {
                        seen = true;
                        let p = *progress_rx.borrow_and_update();
                        let _ = tx.send(Ok(progress(p))).await;
                        last_sent = Instant::now();
                    }
                    done = &mut work => {
                        let done = done.map_err(|e| Error::Task(e.to_string())).and_then(|r| r);
                        if seen && done.is_ok() {
                            let p = *progress_rx.borrow_and_update();
                            let _ = tx.send(Ok(progress(p))).await;
                        }
                        let _ = tx.send(done).await;
                        return;
                    }
                    _ = tick.tick() => {
                        let changed = progress_rx.has_changed().unwrap_or(false);
                        seen |= changed;
                        if seen && (changed || last_sent.elapsed() >= HEARTBEAT) {
                            let p = *progress_rx.borrow_and_update();
                            // A gone reader does not stop the move.
                            let _ = tx.send(Ok(progress(p))).await;
                            last_sent = Instant::now();
                        }
                    }
                }
            }
        });
    }

    /// Asks `owner` to run `command` and passes its events on.
    async fn run_move_on(
        &self,
        owner: &str,
        command: MoveCommand,
        tx: &mpsc::Sender<Result<MoveEvent>>,
    ) -> Result<()> {
        let config = self
            .inner
            .config
            .peers
            .iter()
            .find(|p| p.id == owner)
            .ok_or_else(|| Error::Move(format!("{owner} owns the account but is not a peer")))?;
        let peer = Peer::new(
            config,
            self.inner.config.ca_pem.as_deref(),
            &self.inner.config.secret,
            EVENT_WAIT,
        )?;
        let unavailable = |reason: String| Error::Unavailable {
            peer: owner.to_string(),
            reason,
        };
        let (mut client, request) = peer.request(MoveRunRequest {
            address: command.name,
            to: command.to,
            dry_run: command.dry_run,
            abort: command.abort,
            from_node: self.node_id().to_string(),
        });
        tracing::info!(%owner, "account move asked of its owner");
        let mut events = match tokio::time::timeout(EVENT_WAIT, client.move_run(request)).await {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(status)) => return Err(from_owner(owner, &status)),
            Err(_) => return Err(unavailable(format!("no answer within {EVENT_WAIT:?}"))),
        };
        loop {
            let event = match tokio::time::timeout(EVENT_WAIT, events.message()).await {
                Ok(Ok(Some(e))) => e,
                Ok(Ok(None)) => {
                    return Err(unavailable(
                        "the owner ended the move without a result".into(),
                    ));
                }
                Ok(Err(status)) => return Err(from_owner(owner, &status)),
                Err(_) => {
                    return Err(unavailable(format!(
                        "no word from the owner for {EVENT_WAIT:?}; the move may still run there"
                    )));
                }
            };
            let (event, last) = match event.event {
                Some(Event::Progress(p)) => (
                    MoveEvent::Progress {
                        progress: MoveProgress {
                            messages: p.messages,
                            bytes: p.bytes,
                            total_messages: p.total_messages,
                            total_bytes: p.total_bytes,
                        },
                        elapsed: Duration::from_millis(p.elapsed_ms),
                    },
                    false,
                ),
                Some(Event::Done(d)) => (
                    MoveEvent::Done {
                        lines: d.lines,
                        json: d.json,
                    },
                    true,
                ),
                None => continue,
            };
            // A gone reader does not stop the move on the owner either.
            let _ = tx.send(Ok(event)).await;
            if last {
                return Ok(());
            }
        }
    }
}

/// The owner's refusal as this node reports it.
fn from_owner(owner: &str, status: &Status) -> Error {
    match status.code() {
        tonic::Code::FailedPrecondition | tonic::Code::InvalidArgument | tonic::Code::NotFound => {
            Error::Move(format!("{owner}: {}", status.message()))
        }
        _ => Error::Unavailable {
            peer: owner.to_string(),
            reason: crate::peer::describe(status),
        },
    }
}

/// A move error as a Minger status.
fn to_status(e: Error) -> Status {
    match e {
        Error::Move(m) => Status::failed_precondition(m),
        Error::Directory(d) => Status::invalid_argument(d.to_string()),
        e @ Error::Unavailable { .. } => Status::unavailable(e.to_string()),
        e => Status::internal(e.to_string()),
    }
}

/// The events of `MoveRun`.
pub(crate) type MoveRunStream =
    Pin<Box<dyn Stream<Item = std::result::Result<MoveRunEvent, Status>> + Send>>;

impl MingerService {
    pub(crate) async fn do_move_run(
        &self,
        request: Request<MoveRunRequest>,
    ) -> std::result::Result<Response<MoveRunStream>, Status> {
        self.authorize(&request)?;
        let Some(locator) = self.inner.mover.clone() else {
            return Err(Status::unimplemented("this node runs no account moves"));
        };
        let req = request.into_inner();
        tracing::info!(address = %req.address, to = %req.to, abort = req.abort, from = %req.from_node, "account move asked by a peer");
        let (tx, rx) = mpsc::channel(EVENTS_BUFFERED);
        // Only here: the owner never asks further.
        locator.run_move_here(
            MoveCommand {
                name: req.address,
                to: req.to,
                dry_run: req.dry_run,
                abort: req.abort,
            },
            tx,
        );
        let events = ReceiverStream::new(rx).map(|event| {
            let event = match event.map_err(to_status)? {
                MoveEvent::Progress { progress, elapsed } => Event::Progress(MoveRunProgress {
                    messages: progress.messages,
                    bytes: progress.bytes,
                    total_messages: progress.total_messages,
                    total_bytes: progress.total_bytes,
                    elapsed_ms: elapsed.as_millis() as u64,
                }),
                MoveEvent::Done { lines, json } => Event::Done(MoveRunDone { lines, json }),
            };
            Ok(MoveRunEvent { event: Some(event) })
        });
        Ok(Response::new(Box::pin(events)))
    }
}
