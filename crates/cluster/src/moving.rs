//! Moving an account to another node (DESIGN.md §11).
//!
//! The old owner drives the move and pushes to the new owner over Minger:
//!
//! 1. `MoveBegin`: the new owner says what it already has (UIDs per mailbox), so a re-run
//!    copies only what is missing; an address that is something else there is refused.
//! 2. Copy pass: `MoveMailbox` (UIDVALIDITY and UID counter kept), then one `MovePut` per
//!    missing message, its body streamed in chunks.
//! 3. Freeze: local delivery, APPEND, COPY, flag changes and expunges of the account are
//!    refused (temporarily) and the Locator answers `TempFail` for it here, so SMTP answers
//!    451 and the senders' queues try again; a catch-up pass copies what came meanwhile and
//!    `MoveSync` makes flags and expunges match.
//! 4. Switch, once, under the creation guard's reservation on the new owner: `MoveFinish`
//!    hands over the account record (password hash, enabled flag, aliases, subscriptions);
//!    then the account and its mail are deleted here, a forwarding record (kept until the
//!    positive cache TTL has passed) sends stale peers on to the new owner, and every peer
//!    gets `Invalidate`.
//!
//! The progress of a move is recorded in the `cluster.moves` table, so a move interrupted
//! at any point (a SIGKILL of either node) is finished by running it again.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ds_directory::Account;
use ds_store::{
    MailStore, MailboxImport, MailboxInfo, MessageImport, MessageMeta, Store, Table, unix_now,
};
use serde::{Deserialize, Serialize};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::locator::{Kind, Location, Locator, Owner};
use crate::peer::Peer;
use crate::proto::{
    MoveAbortReply, MoveAbortRequest, MoveBeginReply, MoveBeginRequest, MoveFinishReply,
    MoveFinishRequest, MoveFlags, MoveMailboxReply, MoveMailboxRequest, MoveMailboxState,
    MoveMessageHeader, MovePutChunk, MovePutReply, MoveSyncReply, MoveSyncRequest, ReleaseRequest,
    ReserveRequest, move_put_chunk::Part,
};
use crate::server::MingerService;
use crate::{Error, Result};

/// Name of the store table of moves (old owner's side).
pub const MOVES_TABLE: &str = "cluster.moves";
/// Bound on one move call (one message, one mailbox's final pass, the switch).
const MOVE_CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Size of the body chunks sent.
const CHUNK: usize = 64 * 1024;
/// Messages in flight to the new owner at once.
const PARALLEL_PUTS: usize = 4;
/// Largest message body accepted by `MovePut`.
const MAX_BODY: u64 = 1 << 30;
/// Messages per `MoveSync` window (the new owner refuses more).
pub const SYNC_WINDOW: usize = 4096;
/// How long the switch's reservation lives if never released.
const SWITCH_RESERVATION: Duration = Duration::from_secs(120);

/// Where a move of one address stands (old owner's record).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MoveState {
    /// Mail is being copied; the account is served here as usual.
    Copying,
    /// Deliveries and changes are refused here; the last changes are being copied.
    Frozen,
    /// The new owner has been (or is being) given the account record.
    Switching,
    /// The account lives on the new owner; this record forwards to it until `forward_until`.
    Done,
}

/// A move in the `cluster.moves` table, keyed by address (the account and each alias).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveRecord {
    pub address: String,
    /// The account's canonical address (differs from `address` for an alias).
    pub canonical: String,
    /// The new owner's node id.
    pub to: String,
    pub state: MoveState,
    /// Unix seconds; a `Done` record forwards until then.
    pub forward_until: i64,
    pub enabled: bool,
    /// The new owner's endpoints, `host:port` (known once `Done`).
    pub smtp: String,
    pub pop3: String,
    pub imap: String,
}

/// The moves table.
#[derive(Debug, Clone)]
pub(crate) struct Moves {
    table: Table<MoveRecord>,
    /// Addresses with a move (or an abort) running in this process: one at a time each.
    running: Arc<std::sync::Mutex<HashSet<String>>>,
}

/// An address's turn to be moved or aborted; ends when dropped.
struct Running {
    running: Arc<std::sync::Mutex<HashSet<String>>>,
    address: String,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.address);
    }
}

impl Moves {
    pub(crate) fn new(store: &Store) -> Result<Self> {
        Ok(Self {
            table: store.table(MOVES_TABLE)?,
            running: Arc::default(),
        })
    }

    /// Takes `address`'s turn; refused while another move or abort of it runs here.
    fn start(&self, address: &str) -> Result<Running> {
        let mut set = self.running.lock().unwrap_or_else(|e| e.into_inner());
        if !set.insert(address.to_string()) {
            return Err(Error::Move(format!(
                "a move of {address} is running on this node now"
            )));
        }
        Ok(Running {
            running: Arc::clone(&self.running),
            address: address.to_string(),
        })
    }

    /// Moves not finished: interrupted, or running now.
    pub(crate) fn unfinished(&self) -> Result<Vec<MoveRecord>> {
        let mut out = vec![];
        for entry in self.table.iter() {
            let (_, record) = entry?;
            if record.state != MoveState::Done {
                out.push(record);
            }
        }
        Ok(out)
    }

    pub(crate) fn get(&self, address: &str) -> Result<Option<MoveRecord>> {
        Ok(self.table.get(address)?)
    }

    fn put(&self, record: &MoveRecord) -> Result<()> {
        self.table.insert(&record.address, record)?;
        Ok(())
    }

    /// What the Locator says for an address with a move record, if the record decides it.
    pub(crate) fn location(&self, address: &str, local: bool) -> Option<Location> {
        let record = self.get(address).ok().flatten()?;
        match record.state {
            MoveState::Frozen | MoveState::Switching if local => Some(Location::TempFail(format!(
                "{address} is being moved to {}",
                record.to
            ))),
            MoveState::Done if !local && record.forward_until > unix_now() => {
                Some(Location::Remote(Owner {
                    node: record.to,
                    canonical: record.canonical,
                    kind: Kind::Account,
                    can_receive: record.enabled,
                    smtp: record.smtp,
                    pop3: record.pop3,
                    imap: record.imap,
                }))
            }
            _ => None,
        }
    }
}

/// Progress of a move, reported after each message.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MoveProgress {
    pub messages: u64,
    pub bytes: u64,
    pub total_messages: u64,
    pub total_bytes: u64,
}

/// What a move did (or, dry, would do).
#[derive(Debug, Clone, Default)]
pub struct MoveReport {
    pub address: String,
    pub to: String,
    pub dry_run: bool,
    /// `(name, messages, bytes, already on the new owner)` per mailbox.
    pub mailboxes: Vec<(String, u64, u64, u64)>,
    pub aliases: Vec<String>,
    /// Messages and bytes copied by this run (the catch-up pass included).
    pub copied: u64,
    pub copied_bytes: u64,
    /// Messages the new owner had already (an earlier, interrupted run).
    pub skipped: u64,
    /// Messages expunged on the new owner by the final pass.
    pub expunged: u64,
    pub elapsed: Duration,
}

impl MoveReport {
    /// Printable lines for the operator.
    pub fn lines(&self) -> Vec<String> {
        let mut out = vec![];
        let (n, b): (u64, u64) = self
            .mailboxes
            .iter()
            .fold((0, 0), |(n, b), m| (n + m.1, b + m.2));
        if self.dry_run {
            out.push(format!(
                "would move {} to {}: {} mailboxes, {n} messages, {b} bytes{}",
                self.address,
                self.to,
                self.mailboxes.len(),
                if self.aliases.is_empty() {
                    String::new()
                } else {
                    format!(", aliases {}", self.aliases.join(", "))
                }
            ));
            for (name, n, b, there) in &self.mailboxes {
                out.push(format!(
                    "  {name}: {n} messages, {b} bytes ({there} already on {})",
                    self.to
                ));
            }
            out.push("dry run: nothing changed".into());
            return out;
        }
        let secs = self.elapsed.as_secs_f64().max(0.001);
        out.push(format!(
            "moved {} to {}: {} mailboxes, {n} messages, {b} bytes",
            self.address,
            self.to,
            self.mailboxes.len()
        ));
        out.push(format!(
            "copied {} messages, {} bytes in {:.2} s ({:.1} messages/s, {:.2} MB/s); {} already there; {} expunged by the final pass",
            self.copied,
            self.copied_bytes,
            secs,
            self.copied as f64 / secs,
            self.copied_bytes as f64 / secs / 1e6,
            self.skipped,
            self.expunged
        ));
        out
    }
}

fn remote(peer: &str) -> impl Fn(String) -> Error + '_ {
    move |reason| Error::Unavailable {
        peer: peer.to_string(),
        reason,
    }
}

/// One message as a `MovePut` stream: the header, then the body read from the store in
/// chunks by a blocking task (at most two chunks buffered).
fn message_stream(
    mail: &MailStore,
    address: &str,
    mailbox: &str,
    m: &MessageMeta,
) -> ReceiverStream<MovePutChunk> {
    let body_len = m.size.saturating_sub(m.prefix.len() as u64);
    let header = MovePutChunk {
        part: Some(Part::Header(MoveMessageHeader {
            address: address.to_string(),
            mailbox: mailbox.to_string(),
            uid: m.uid,
            flags: m.flags.clone(),
            internal_date: m.internal_date,
            prefix: m.prefix.clone(),
            body_len,
        })),
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<MovePutChunk>(2);
    // Room for it: the channel is new.
    let _ = tx.try_send(header);
    let bodies = mail.store().bodies().clone();
    let blob = m.blob;
    tokio::task::spawn_blocking(move || {
        let Ok(Some(mut reader)) = bodies.open(blob) else {
            return;
        };
        let mut buf = vec![0u8; CHUNK];
        loop {
            match reader.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let chunk = MovePutChunk {
                        part: Some(Part::Data(buf[..n].to_vec())),
                    };
                    if tx.blocking_send(chunk).is_err() {
                        return;
                    }
                }
            }
        }
    });
    ReceiverStream::new(rx)
}

impl Locator {
    /// Gives the Locator (and the Minger service made from it) the node's mail store, which
    /// account moves need on both sides. Call once, before [`Locator::minger_service`].
    pub fn attach_mail(&self, mail: MailStore) {
        let _ = self.inner.mail.set(mail);
    }

    /// Test hook: the next moves stop at `stage` (`"copied"`, `"frozen"`, `"switching"`,
    /// `"finished"`) as if the node died there: no cleanup, the state stays as recorded.
    #[doc(hidden)]
    pub fn stop_moves_at(&self, stage: Option<&'static str>) {
        *self
            .inner
            .move_stop
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = stage;
    }

    fn stop_here(&self, stage: &'static str) -> Result<()> {
        let at = *self
            .inner
            .move_stop
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if at == Some(stage) {
            tracing::warn!(stage, "account move stopped by the test hook");
            return Err(Error::Move(format!("stopped at {stage} (test hook)")));
        }
        Ok(())
    }

    /// The move record of `address` on this node, if any.
    pub fn move_record(&self, address: &str) -> Result<Option<MoveRecord>> {
        self.inner.moves.get(address)
    }

    /// Moves the local account `name` with all its mail to peer `to` (DESIGN.md §11), or with
    /// `dry_run` says what would move and changes nothing. Resumes an interrupted move.
    /// `progress` is called after each message copied.
    pub async fn move_account(
        &self,
        name: &str,
        to: &str,
        dry_run: bool,
        progress: impl Fn(MoveProgress) + Send + Sync,
    ) -> Result<MoveReport> {
        let started = Instant::now();
        let mail = self
            .inner
            .mail
            .get()
            .cloned()
            .ok_or_else(|| Error::Move("this node has no mail store attached".into()))?;
        let dir = &self.inner.directory;
        let moves = &self.inner.moves;
        let me = self.node_id().to_string();
        let address = dir.served_address(name)?.to_string();
        let _turn = moves.start(&address)?;
        if to == me {
            return Err(Error::Move(format!("{to} is this node")));
        }
        let Some(peer_config) = self.inner.config.peers.iter().find(|p| p.id == to) else {
            let known: Vec<&str> = self
                .inner
                .config
                .peers
                .iter()
                .map(|p| p.id.as_str())
                .collect();
            return Err(Error::Move(format!(
                "unknown node {to:?} (peers: {})",
                known.join(", ")
            )));
        };
        let account = match dir.account(&address)? {
            Some(a) => a,
            None => {
                if let Some(target) = dir.alias_of(&address)? {
                    return Err(Error::Move(format!(
                        "{address} is an alias of {target}; move the account {target}"
                    )));
                }
                if let Some(r) = moves.get(&address)?
                    && r.state == MoveState::Done
                {
                    return Err(Error::Move(format!(
                        "{address} was moved to {} already",
                        r.to
                    )));
                }
                return Err(Error::Move(format!("no account {address} on this node")));
            }
        };
        let record = moves.get(&address)?;
        if let Some(r) = &record
            && r.to != to
            && r.state != MoveState::Done
        {
            return Err(Error::Move(format!(
                "a move of {address} to {} is under way; run it again to finish it",
                r.to
            )));
        }
        let switching = record
            .as_ref()
            .is_some_and(|r| r.state == MoveState::Switching);
        let peer = Arc::new(Peer::new(
            peer_config,
            self.inner.config.ca_pem.as_deref(),
            &self.inner.config.secret,
            MOVE_CALL_TIMEOUT,
        )?);
        let begin = peer
            .call(
                "move_begin",
                MoveBeginRequest {
                    address: address.clone(),
                    from_node: me.clone(),
                },
                |mut c, r| async move { c.move_begin(r).await },
            )
            .await
            .map_err(remote(to))?;
        if !begin.refused.is_empty() {
            return Err(Error::Move(format!("{to} refuses: {}", begin.refused)));
        }
        if begin.account_exists && !switching {
            return Err(Error::Move(format!(
                "{to} has an account {address} already"
            )));
        }
        // What the new owner has, by mailbox name and UIDVALIDITY: a name deleted and
        // created again here since is another mailbox.
        let mut present: HashMap<(String, u32), HashSet<u32>> = begin
            .mailboxes
            .into_iter()
            .map(|m: MoveMailboxState| ((m.name, m.uidvalidity), m.uids.into_iter().collect()))
            .collect();

        let mut report = MoveReport {
            address: address.clone(),
            to: to.to_string(),
            dry_run,
            aliases: account.aliases.clone(),
            ..Default::default()
        };
        let inventory = |mail: &MailStore| -> Result<Vec<(MailboxInfo, Vec<MessageMeta>)>> {
            mail.list_mailboxes(&address)?
                .into_iter()
                .map(|info| {
                    let messages = mail.export_messages(&info)?;
                    Ok((info, messages))
                })
                .collect()
        };
        let boxes = inventory(&mail)?;
        for (info, messages) in &boxes {
            let there = present.get(&(info.name.clone(), info.uidvalidity));
            report.mailboxes.push((
                info.name.clone(),
                messages.len() as u64,
                messages.iter().map(|m| m.size).sum(),
                messages
                    .iter()
                    .filter(|m| there.is_some_and(|t| t.contains(&m.uid)))
                    .count() as u64,
            ));
        }
        if dry_run {
            report.elapsed = started.elapsed();
            return Ok(report);
        }
        report.skipped = report.mailboxes.iter().map(|m| m.3).sum();

        let mut finish_reply = None;
        if !begin.account_exists {
            let mut record = MoveRecord {
                address: address.clone(),
                canonical: address.clone(),
                to: to.to_string(),
                state: MoveState::Copying,
                forward_until: 0,
                enabled: account.enabled,
                smtp: String::new(),
                pop3: String::new(),
                imap: String::new(),
            };
            moves.put(&record)?;
            let (total_messages, total_bytes) = missing(&boxes, &present);
            let mut totals = MoveProgress {
                total_messages,
                total_bytes,
                ..Default::default()
            };
            progress(totals);
            self.copy_pass(
                &peer,
                &mail,
                &address,
                &boxes,
                &mut present,
                &mut report,
                &mut totals,
                &progress,
            )
            .await?;

            self.stop_here("copied")?;
            // Freeze, then copy what came meanwhile and make flags and expunges match.
            mail.freeze(&address, true)?;
            record.state = MoveState::Frozen;
            moves.put(&record)?;
            mail.store().flush_async().await?;
            self.forget(&address).await;
            self.stop_here("frozen")?;
            let boxes = inventory(&mail)?;
            let (more_messages, more_bytes) = missing(&boxes, &present);
            totals.total_messages += more_messages;
            totals.total_bytes += more_bytes;
            let copy = self
                .copy_pass(
                    &peer,
                    &mail,
                    &address,
                    &boxes,
                    &mut present,
                    &mut report,
                    &mut totals,
                    &progress,
                )
                .await;
            if let Err(e) = copy {
                return Err(self.thaw(&mail, &record, e).await);
            }
            for (info, messages) in &boxes {
                for request in sync_windows(&address, info, messages) {
                    let sent = request.messages.len();
                    match peer
                        .call("move_sync", request, |mut c, r| async move {
                            c.move_sync(r).await
                        })
                        .await
                    {
                        Ok(reply) if reply.present as usize == sent => {
                            report.expunged += u64::from(reply.expunged);
                        }
                        // The new owner restarted and lost messages it had not flushed yet.
                        Ok(reply) => {
                            let e = Error::Move(format!(
                                "{to} has {} of the {sent} messages of a part of {}: it lost some (restarted?); run the move again to copy them",
                                reply.present, info.name
                            ));
                            return Err(self.thaw(&mail, &record, e).await);
                        }
                        Err(reason) => {
                            return Err(self.thaw(&mail, &record, remote(to)(reason)).await);
                        }
                    }
                }
            }
            // The switch, under our reservation of the address on the new owner.
            let reserve = peer
                .call(
                    "reserve",
                    ReserveRequest {
                        address: address.clone(),
                        from_node: me.clone(),
                        ttl_seconds: SWITCH_RESERVATION.as_secs() as u32,
                    },
                    |mut c, r| async move { c.reserve(r).await },
                )
                .await;
            match reserve {
                Ok(r) if r.granted => {}
                Ok(r) => {
                    let e = Error::Move(format!("{to} refused the reservation: {}", r.reason));
                    return Err(self.thaw(&mail, &record, e).await);
                }
                Err(reason) => return Err(self.thaw(&mail, &record, remote(to)(reason)).await),
            }
            record.state = MoveState::Switching;
            moves.put(&record)?;
            mail.store().flush_async().await?;
            self.stop_here("switching")?;
            finish_reply = Some(
                self.finish_call(&peer, &mail, &account, &boxes_names(&boxes))
                    .await?,
            );
        }
        let reply = match finish_reply {
            Some(r) => r,
            // Resumed after the new owner took the account record: ask it again (idempotent).
            None => {
                let names = mail
                    .list_mailboxes(&address)?
                    .into_iter()
                    .map(|m| m.name)
                    .collect::<Vec<_>>();
                self.finish_call(&peer, &mail, &account, &names).await?
            }
        };
        self.stop_here("finished")?;
        self.finish_here(&mail, &account, to, &reply).await?;
        let _ = peer
            .call(
                "release",
                ReleaseRequest {
                    address: address.clone(),
                    from_node: me.clone(),
                },
                |mut c, r| async move { c.release(r).await },
            )
            .await;
        self.invalidate_everywhere(&address).await;
        for alias in &account.aliases {
            self.invalidate_everywhere(alias).await;
        }
        report.elapsed = started.elapsed();
        tracing::info!(%address, %to, copied = report.copied, bytes = report.copied_bytes, elapsed = ?report.elapsed, "account moved");
        Ok(report)
    }

    /// Moves started here and not finished (interrupted, or running now).
    pub fn unfinished_moves(&self) -> Result<Vec<MoveRecord>> {
        self.inner.moves.unfinished()
    }

    /// Cancels an unfinished move of `name` from this node: the new owner drops its partial
    /// copy (and our reservation), then the account is thawed and served here again, as
    /// before the move; nothing of it is lost. Refused once the new owner has the account
    /// (the switch happened: run the move again to finish it). Returns lines for the operator.
    pub async fn abort_move(&self, name: &str) -> Result<Vec<String>> {
        let moves = &self.inner.moves;
        let address = self.inner.directory.served_address(name)?.to_string();
        let _turn = moves.start(&address)?;
        let record = match moves.get(&address)? {
            None => return Err(Error::Move(format!("no move of {address} to abort here"))),
            Some(r) if r.state == MoveState::Done => {
                return Err(Error::Move(format!(
                    "{address} was moved to {} already; to bring it back, run `dshare account move {address} --to {}` there",
                    r.to,
                    self.node_id()
                )));
            }
            Some(r) => r,
        };
        let mail = self
            .inner
            .mail
            .get()
            .cloned()
            .ok_or_else(|| Error::Move("this node has no mail store attached".into()))?;
        let to = record.to.clone();
        let peer_config = self
            .inner
            .config
            .peers
            .iter()
            .find(|p| p.id == to)
            .ok_or_else(|| Error::Move(format!("{to} is no longer a peer of this node")))?;
        let peer = Peer::new(
            peer_config,
            self.inner.config.ca_pem.as_deref(),
            &self.inner.config.secret,
            MOVE_CALL_TIMEOUT,
        )?;
        let me = self.node_id().to_string();
        // The new owner refuses (an account there already) once the switch happened; before
        // `Switching` was recorded it cannot have happened.
        let dropped = peer
            .call(
                "move_abort",
                MoveAbortRequest {
                    address: address.clone(),
                    from_node: me,
                },
                |mut c, r| async move { c.move_abort(r).await },
            )
            .await;
        let dropped = match dropped {
            Ok(reply) => reply,
            Err(reason) if record.state == MoveState::Switching => {
                return Err(Error::Move(format!(
                    "cannot abort: {to} may have taken {address} already and does not answer ({reason}); run the move again to finish it"
                )));
            }
            Err(reason) if reason.contains("FailedPrecondition") => {
                return Err(Error::Move(format!(
                    "cannot abort: {to} has the account already ({reason}); run `dshare account move {address} --to {to}` to finish the move"
                )));
            }
            Err(reason) => return Err(remote(&to)(reason)),
        };
        mail.freeze(&address, false)?;
        moves.table.remove(&address)?;
        mail.store().flush_async().await?;
        self.invalidate_everywhere(&address).await;
        tracing::warn!(%address, %to, mailboxes = dropped.mailboxes, messages = dropped.messages, "account move aborted");
        Ok(vec![
            format!("aborted the move of {address} to {to}: it is served by this node again"),
            format!(
                "{to} dropped its partial copy ({} mailboxes, {} messages)",
                dropped.mailboxes, dropped.messages
            ),
        ])
    }

    /// Undoes a freeze after a failure before the switch: the account is served here again.
    async fn thaw(&self, mail: &MailStore, record: &MoveRecord, error: Error) -> Error {
        let mut record = record.clone();
        record.state = MoveState::Copying;
        if let Err(e) = self.inner.moves.put(&record) {
            tracing::error!(error = %e, "cannot record the move's state");
        }
        if let Err(e) = mail.freeze(&record.address, false) {
            tracing::error!(error = %e, "cannot thaw the account");
        }
        let _ = mail.store().flush_async().await;
        self.forget(&record.address).await;
        tracing::warn!(address = %record.address, error = %error, "move stopped before the switch; the account stays here");
        error
    }

    #[allow(clippy::too_many_arguments)]
    async fn copy_pass(
        &self,
        peer: &Arc<Peer>,
        mail: &MailStore,
        address: &str,
        boxes: &[(MailboxInfo, Vec<MessageMeta>)],
        present: &mut HashMap<(String, u32), HashSet<u32>>,
        report: &mut MoveReport,
        totals: &mut MoveProgress,
        progress: &(impl Fn(MoveProgress) + Send + Sync),
    ) -> Result<()> {
        let to = peer.id.clone();
        let subscriptions: HashSet<String> = mail.subscriptions(address)?.into_iter().collect();
        for (info, messages) in boxes {
            let request = MoveMailboxRequest {
                address: address.to_string(),
                name: info.name.clone(),
                uidvalidity: info.uidvalidity,
                uidnext: info.uidnext,
                special_use: info.special_use.clone().unwrap_or_default(),
                subscribed: info.subscribed || subscriptions.contains(&info.name),
            };
            peer.call("move_mailbox", request, |mut c, r| async move {
                c.move_mailbox(r).await
            })
            .await
            .map_err(remote(&to))?;
            let there = present
                .entry((info.name.clone(), info.uidvalidity))
                .or_default();
            let missing: Vec<MessageMeta> = messages
                .iter()
                .filter(|m| !there.contains(&m.uid))
                .cloned()
                .collect();
            let mut pending = missing.into_iter();
            let mut running = tokio::task::JoinSet::new();
            loop {
                while running.len() < PARALLEL_PUTS {
                    let Some(m) = pending.next() else { break };
                    let (peer, mail) = (Arc::clone(peer), mail.clone());
                    let (address, name) = (address.to_string(), info.name.clone());
                    running.spawn(async move {
                        let stream = message_stream(&mail, &address, &name, &m);
                        let (mut client, request) = peer.request(stream);
                        let result =
                            match tokio::time::timeout(peer.timeout(), client.move_put(request))
                                .await
                            {
                                Ok(Ok(reply)) => Ok(reply.into_inner()),
                                Ok(Err(status)) => Err(crate::peer::describe(&status)),
                                Err(_) => Err(format!("no answer within {:?}", peer.timeout())),
                            };
                        (m, result)
                    });
                }
                let Some(joined) = running.join_next().await else {
                    break;
                };
                let (m, result) = joined.map_err(|e| Error::Task(e.to_string()))?;
                let reply = result.map_err(remote(&to))?;
                there.insert(m.uid);
                if reply.stored {
                    report.copied += 1;
                    report.copied_bytes += m.size;
                } else {
                    report.skipped += 1;
                }
                totals.messages += 1;
                totals.bytes += m.size;
                progress(*totals);
                pause_for_tests(totals.messages).await;
            }
        }
        Ok(())
    }

    async fn finish_call(
        &self,
        peer: &Peer,
        mail: &MailStore,
        account: &Account,
        mailboxes: &[String],
    ) -> Result<MoveFinishReply> {
        let routes = routes_to(&self.inner.directory, &account.address)?;
        let request = MoveFinishRequest {
            routes,
            address: account.address.clone(),
            from_node: self.node_id().to_string(),
            password_hash: account.password_hash.clone(),
            enabled: account.enabled,
            created: account.created,
            aliases: account.aliases.clone(),
            subscriptions: mail.subscriptions(&account.address)?,
            mailboxes: mailboxes.to_vec(),
        };
        peer.call("move_finish", request, |mut c, r| async move {
            c.move_finish(r).await
        })
        .await
        .map_err(remote(&peer.id))
    }

    /// The old owner's side of the switch: the account and its mail leave, forwarding
    /// records take their place.
    async fn finish_here(
        &self,
        mail: &MailStore,
        account: &Account,
        to: &str,
        reply: &MoveFinishReply,
    ) -> Result<()> {
        let address = account.address.clone();
        let smtp = self
            .inner
            .config
            .peers
            .iter()
            .find(|p| p.id == to)
            .and_then(|p| p.smtp.clone())
            .unwrap_or_else(|| reply.smtp.clone());
        let forward_until = unix_now()
            .saturating_add(self.inner.config.positive_ttl.as_secs() as i64)
            .saturating_add(60);
        for a in std::iter::once(&address).chain(&account.aliases) {
            self.inner.moves.put(&MoveRecord {
                address: a.clone(),
                canonical: address.clone(),
                to: to.to_string(),
                state: MoveState::Done,
                forward_until,
                enabled: account.enabled,
                smtp: smtp.clone(),
                pop3: reply.pop3.clone(),
                imap: reply.imap.clone(),
            })?;
        }
        let dir = self.inner.directory.clone();
        let m = mail.clone();
        let a = address.clone();
        let routes = routes_to(&dir, &a)?;
        tokio::task::spawn_blocking(move || -> Result<()> {
            for pattern in &routes {
                match dir.delete_route(pattern) {
                    Ok(_) | Err(ds_directory::Error::NotFound(..)) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            match dir.delete_account(&a) {
                Ok(_) | Err(ds_directory::Error::NotFound(..)) => {}
                Err(e) => return Err(e.into()),
            }
            m.delete_account(&a)?;
            m.freeze(&a, false)?;
            Ok(())
        })
        .await
        .map_err(|e| Error::Task(e.to_string()))??;
        mail.store().flush_async().await?;
        Ok(())
    }
}

/// The patterns of this node's Router records that name exactly `address` (domain-wide
/// records stay: they are about a domain, not an account).
fn routes_to(dir: &ds_directory::Directory, address: &str) -> Result<Vec<String>> {
    Ok(dir
        .routes()?
        .into_iter()
        .filter(|r| {
            !r.pattern.starts_with("*@")
                && matches!(&r.target, ds_directory::RouteTarget::Address(a) if a == address)
        })
        .map(|r| r.pattern)
        .collect())
}

/// Test hook for the tests that SIGKILL a real `dshare serve` in the middle of a copy: with
/// `DSHARE_TEST_MOVE_PAUSE_AFTER=N` and `DSHARE_TEST_MOVE_PAUSE_FILE=PATH` in the node's
/// environment, each run of a move creates PATH after its N-th message and waits (up to two
/// minutes) until the test removes it. Without both variables it does nothing.
async fn pause_for_tests(copied: u64) {
    let (Ok(after), Ok(path)) = (
        std::env::var("DSHARE_TEST_MOVE_PAUSE_AFTER"),
        std::env::var("DSHARE_TEST_MOVE_PAUSE_FILE"),
    ) else {
        return;
    };
    if after.parse::<u64>().ok() != Some(copied) {
        return;
    }
    tracing::warn!(copied, %path, "account move paused by the test hook");
    if let Err(e) = std::fs::write(&path, b"") {
        tracing::error!(error = %e, %path, "test hook: cannot create the pause file");
        return;
    }
    let until = Instant::now() + Duration::from_secs(120);
    while std::path::Path::new(&path).exists() && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Messages and bytes of `boxes` the new owner does not have yet.
fn missing(
    boxes: &[(MailboxInfo, Vec<MessageMeta>)],
    present: &HashMap<(String, u32), HashSet<u32>>,
) -> (u64, u64) {
    boxes
        .iter()
        .flat_map(|(i, ms)| {
            let there = present.get(&(i.name.clone(), i.uidvalidity));
            ms.iter()
                .filter(move |m| !there.is_some_and(|p| p.contains(&m.uid)))
        })
        .fold((0, 0), |(n, b), m| (n + 1, b + m.size))
}

/// A mailbox's final pass as `MoveSync` windows of at most [`SYNC_WINDOW`] messages that
/// together cover every UID.
fn sync_windows(
    address: &str,
    info: &MailboxInfo,
    messages: &[MessageMeta],
) -> Vec<MoveSyncRequest> {
    let mut sorted: Vec<&MessageMeta> = messages.iter().collect();
    sorted.sort_unstable_by_key(|m| m.uid);
    let chunks: Vec<&[&MessageMeta]> = if sorted.is_empty() {
        vec![&[]]
    } else {
        sorted.chunks(SYNC_WINDOW).collect()
    };
    let last = chunks.len() - 1;
    let mut first_uid = 1;
    chunks
        .into_iter()
        .enumerate()
        .map(|(i, chunk)| {
            let last_uid = match chunk.last() {
                Some(m) if i < last => m.uid,
                _ => u32::MAX,
            };
            let request = MoveSyncRequest {
                address: address.to_string(),
                mailbox: info.name.clone(),
                uidnext: info.uidnext,
                messages: chunk
                    .iter()
                    .map(|m| MoveFlags {
                        uid: m.uid,
                        flags: m.flags.clone(),
                    })
                    .collect(),
                first_uid,
                last_uid,
            };
            first_uid = last_uid.saturating_add(1);
            request
        })
        .collect()
}

fn boxes_names(boxes: &[(MailboxInfo, Vec<MessageMeta>)]) -> Vec<String> {
    boxes.iter().map(|(i, _)| i.name.clone()).collect()
}

// ---- The new owner's side -------------------------------------------------------------

fn internal(context: &str, e: impl std::fmt::Display) -> Status {
    tracing::error!(error = %e, "{context}");
    Status::internal(format!("{context}: {e}"))
}

impl MingerService {
    fn mail(&self) -> std::result::Result<MailStore, Status> {
        self.inner
            .mail
            .clone()
            .ok_or_else(|| Status::unimplemented("this node takes no account moves"))
    }

    /// The address as this node writes it; an account here refuses further copying.
    fn move_target(&self, address: &str) -> std::result::Result<String, Status> {
        let address = self
            .inner
            .directory
            .served_address(address)
            .map_err(|e| Status::invalid_argument(e.to_string()))?
            .to_string();
        if self
            .inner
            .directory
            .account(&address)
            .map_err(|e| internal("move", e))?
            .is_some()
        {
            return Err(Status::failed_precondition(format!(
                "{address} is an account here already"
            )));
        }
        Ok(address)
    }

    pub(crate) async fn do_move_begin(
        &self,
        request: Request<MoveBeginRequest>,
    ) -> std::result::Result<Response<MoveBeginReply>, Status> {
        self.authorize(&request)?;
        let mail = self.mail()?;
        let req = request.into_inner();
        let dir = &self.inner.directory;
        let address = dir
            .served_address(&req.address)
            .map_err(|e| Status::invalid_argument(e.to_string()))?
            .to_string();
        let account_exists = dir
            .account(&address)
            .map_err(|e| internal("move begin", e))?
            .is_some();
        let refused = if account_exists {
            String::new()
        } else {
            match dir
                .taken_as(&address)
                .map_err(|e| internal("move begin", e))?
            {
                Some(kind) => format!("{address} is {kind} here"),
                None => String::new(),
            }
        };
        let mut mailboxes = vec![];
        if refused.is_empty() && !account_exists {
            for info in mail
                .list_mailboxes(&address)
                .map_err(|e| internal("move begin", e))?
            {
                let uids = mail
                    .export_messages(&info)
                    .map_err(|e| internal("move begin", e))?
                    .iter()
                    .map(|m| m.uid)
                    .collect();
                mailboxes.push(MoveMailboxState {
                    name: info.name,
                    uidvalidity: info.uidvalidity,
                    uids,
                });
            }
        }
        tracing::info!(%address, from = %req.from_node, account_exists, %refused, "account move asked");
        Ok(Response::new(MoveBeginReply {
            account_exists,
            refused,
            mailboxes,
        }))
    }

    pub(crate) async fn do_move_mailbox(
        &self,
        request: Request<MoveMailboxRequest>,
    ) -> std::result::Result<Response<MoveMailboxReply>, Status> {
        self.authorize(&request)?;
        let mail = self.mail()?;
        let req = request.into_inner();
        let address = self.move_target(&req.address)?;
        let import = MailboxImport {
            name: req.name,
            uidvalidity: req.uidvalidity,
            uidnext: req.uidnext,
            special_use: (!req.special_use.is_empty()).then_some(req.special_use),
            subscribed: req.subscribed,
        };
        match mail.import_mailbox(&address, &import) {
            Ok(_) => {}
            // The name was deleted and created again on the old owner since an earlier run:
            // what was copied of the old one goes.
            Err(ds_store::Error::Conflict(_)) => {
                mail.discard_import(&address, &import.name)
                    .map_err(|e| Status::failed_precondition(e.to_string()))?;
                mail.import_mailbox(&address, &import)
                    .map_err(|e| Status::failed_precondition(e.to_string()))?;
            }
            Err(e) => return Err(Status::failed_precondition(e.to_string())),
        }
        Ok(Response::new(MoveMailboxReply {}))
    }

    pub(crate) async fn do_move_put(
        &self,
        request: Request<Streaming<MovePutChunk>>,
    ) -> std::result::Result<Response<MovePutReply>, Status> {
        self.authorize(&request)?;
        let mail = self.mail()?;
        let mut stream = request.into_inner();
        let header = match stream.message().await? {
            Some(MovePutChunk {
                part: Some(Part::Header(h)),
            }) => h,
            _ => return Err(Status::invalid_argument("MovePut must start with a header")),
        };
        let address = self.move_target(&header.address)?;
        if header.body_len > MAX_BODY {
            return Err(Status::invalid_argument("message too large"));
        }
        let mut writer = mail
            .store()
            .bodies()
            .writer()
            .map_err(|e| internal("move put", e))?;
        while let Some(chunk) = stream.message().await? {
            let Some(Part::Data(data)) = chunk.part else {
                return Err(Status::invalid_argument("a second header"));
            };
            if writer.len() + data.len() as u64 > header.body_len {
                return Err(Status::invalid_argument("more body than announced"));
            }
            writer.write(&data).map_err(|e| internal("move put", e))?;
        }
        if writer.len() != header.body_len {
            return Err(Status::data_loss("body shorter than announced"));
        }
        let stored = tokio::task::spawn_blocking(move || -> ds_store::Result<bool> {
            let staged = writer.finish()?;
            let message = MessageImport {
                uid: header.uid,
                flags: header.flags,
                internal_date: header.internal_date,
                prefix: header.prefix,
            };
            mail.import_message(&address, &header.mailbox, &message, &staged)
        })
        .await
        .map_err(|e| internal("move put", e))?
        .map_err(|e| match e {
            ds_store::Error::NotFound(m) => Status::failed_precondition(m),
            e => internal("move put", e),
        })?;
        Ok(Response::new(MovePutReply { stored }))
    }

    pub(crate) async fn do_move_sync(
        &self,
        request: Request<MoveSyncRequest>,
    ) -> std::result::Result<Response<MoveSyncReply>, Status> {
        self.authorize(&request)?;
        let mail = self.mail()?;
        let req = request.into_inner();
        let address = self.move_target(&req.address)?;
        if req.messages.len() > SYNC_WINDOW {
            return Err(Status::invalid_argument(format!(
                "more than {SYNC_WINDOW} messages in one MoveSync"
            )));
        }
        let window = match (req.first_uid, req.last_uid) {
            // A sender from before windows: the whole mailbox in one message.
            (0, 0) => 1..=u32::MAX,
            (first, last) if first <= last => first..=last,
            _ => return Err(Status::invalid_argument("an empty MoveSync window")),
        };
        if let Some(m) = req.messages.iter().find(|m| !window.contains(&m.uid)) {
            return Err(Status::invalid_argument(format!(
                "UID {} outside its MoveSync window",
                m.uid
            )));
        }
        let flags: Vec<(u32, Vec<String>)> =
            req.messages.into_iter().map(|m| (m.uid, m.flags)).collect();
        let m = mail.clone();
        let (expunged, present) = tokio::task::spawn_blocking(move || -> ds_store::Result<_> {
            let expunged =
                m.reconcile_mailbox(&address, &req.mailbox, window.clone(), &flags, req.uidnext)?;
            let present = m
                .uids(&address, &req.mailbox)?
                .into_iter()
                .filter(|uid| window.contains(uid))
                .count();
            Ok((expunged, present))
        })
        .await
        .map_err(|e| internal("move sync", e))?
        .map_err(|e| internal("move sync", e))?;
        // What is reported present survives a crash of this node from now on.
        mail.store()
            .flush_async()
            .await
            .map_err(|e| internal("move sync", e))?;
        Ok(Response::new(MoveSyncReply {
            expunged: expunged as u32,
            present: present as u32,
        }))
    }

    pub(crate) async fn do_move_abort(
        &self,
        request: Request<MoveAbortRequest>,
    ) -> std::result::Result<Response<MoveAbortReply>, Status> {
        self.authorize(&request)?;
        let mail = self.mail()?;
        let req = request.into_inner();
        let address = self.move_target(&req.address)?;
        let m = mail.clone();
        let a = address.clone();
        let (mailboxes, messages) =
            tokio::task::spawn_blocking(move || -> ds_store::Result<(u32, u64)> {
                let boxes = m.list_mailboxes(&a)?;
                let messages = boxes.iter().map(|b| u64::from(b.messages)).sum();
                m.discard_account_import(&a)?;
                Ok((boxes.len() as u32, messages))
            })
            .await
            .map_err(|e| internal("move abort", e))?
            .map_err(|e| internal("move abort", e))?;
        self.inner
            .reservations
            .release(&address, &req.from_node)
            .map_err(|e| internal("move abort", e))?;
        mail.store()
            .flush_async()
            .await
            .map_err(|e| internal("move abort", e))?;
        tracing::warn!(%address, from = %req.from_node, mailboxes, messages, "account move aborted: partial copy dropped");
        Ok(Response::new(MoveAbortReply {
            mailboxes,
            messages,
        }))
    }

    pub(crate) async fn do_move_finish(
        &self,
        request: Request<MoveFinishRequest>,
    ) -> std::result::Result<Response<MoveFinishReply>, Status> {
        self.authorize(&request)?;
        let mail = self.mail()?;
        let req = request.into_inner();
        let dir = self.inner.directory.clone();
        let address = dir
            .served_address(&req.address)
            .map_err(|e| Status::invalid_argument(e.to_string()))?
            .to_string();
        let existing = dir
            .account(&address)
            .map_err(|e| internal("move finish", e))?;
        let resumed = existing
            .as_ref()
            .is_some_and(|a| a.password_hash == req.password_hash);
        if !resumed {
            let held = self
                .inner
                .reservations
                .get(&address)
                .map_err(|e| internal("move finish", e))?;
            if held.is_none_or(|r| r.node != req.from_node) {
                return Err(Status::failed_precondition(format!(
                    "{address} is not reserved for {}",
                    req.from_node
                )));
            }
            let account = Account {
                address: address.clone(),
                password_hash: req.password_hash.clone(),
                enabled: req.enabled,
                created: req.created,
                aliases: req.aliases.clone(),
            };
            let routes = req.routes.clone();
            let keep: HashSet<String> = req.mailboxes.iter().cloned().collect();
            let subscriptions = req.subscriptions.clone();
            let a = address.clone();
            let m = mail.clone();
            tokio::task::spawn_blocking(move || -> std::result::Result<(), String> {
                for info in m.list_mailboxes(&a).map_err(|e| e.to_string())? {
                    if !keep.contains(&info.name) {
                        m.delete_mailbox(&a, &info.name)
                            .map_err(|e| e.to_string())?;
                    }
                }
                for name in &subscriptions {
                    m.set_subscription(&a, name, true)
                        .map_err(|e| e.to_string())?;
                }
                m.mark_provisioned(&a).map_err(|e| e.to_string())?;
                m.create_account(&a).map_err(|e| e.to_string())?;
                dir.import_account(&account).map_err(|e| e.to_string())?;
                for pattern in &routes {
                    if let Err(e) = dir.add_route(pattern, &a) {
                        tracing::warn!(%pattern, error = %e, "Router record of a moved account not added");
                    }
                }
                Ok(())
            })
            .await
            .map_err(|e| internal("move finish", e))?
            .map_err(Status::failed_precondition)?;
            mail.store()
                .flush_async()
                .await
                .map_err(|e| internal("move finish", e))?;
            tracing::info!(%address, from = %req.from_node, "account moved here");
        }
        self.inner.caches.drop_entry(&address).await;
        for alias in &req.aliases {
            self.inner.caches.drop_entry(alias).await;
        }
        let a = &self.inner.advertise;
        Ok(Response::new(MoveFinishReply {
            smtp: a.smtp.clone(),
            pop3: a.pop3.clone(),
            imap: a.imap.clone(),
        }))
    }
}
