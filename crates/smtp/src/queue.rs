//! [`QueueRunner`]: relays queued messages to the node that owns their recipients.
//!
//! Woken when a message is queued and by a timer (the earliest `next_attempt`, at most a minute).
//! Each due entry is tried per owner endpoint; `250` → delivered, `550` → the Locator's
//! `relocate` once (a new owner is tried at once, the same owner or none → failed, a failed lookup
//! → retried later), other 5xx → failed, 4xx or a connection failure → retried with exponential
//! back-off. A failing owner keeps
//! the message queued; it is never handed to another host. An entry older than the maximum age
//! fails its pending recipients; failures go to the sender as an RFC 3464 DSN (never for a bounce).
//!
//! A pass groups the due entries by the owner endpoint of their first pending recipient; up to
//! [`MAX_OWNERS_AT_ONCE`] workers take whole groups, so each entry is processed by exactly one
//! worker, and a worker relays a group's entries one after another over one authenticated
//! session per endpoint ([`RelaySessions`]), closed when the group is done or idle. Workers
//! run detached from the runner's loop: later passes leave out the endpoints that have a worker
//! and the entries they hold, so a slow or black-holed owner delays only its own mail; and an
//! endpoint that could not be reached is not tried again in the same group.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use ds_net::Shutdown;
use ds_store::RelayMark;
use ds_store::queue::{QueueEntry, RecipientState};

use crate::locate::{Location, Purpose};
use crate::outbound::Spread;
use crate::relay::{Outgoing, RcptOutcome, RelaySessions};
use crate::{Result, Smtp, dsn};
use ds_store::unix_now;

/// Longest sleep between two scans of the queue.
const MAX_SLEEP: Duration = Duration::from_secs(60);
/// Owner endpoints relayed to at the same time (one worker each).
pub(crate) const MAX_OWNERS_AT_ONCE: usize = 8;
/// A relay session unused for this long is closed (Postfix's connection cache time limit).
const SESSION_IDLE: Duration = Duration::from_secs(2);
/// How often expired relay marks are swept (#13 point 18).
const SWEEP_EVERY: Duration = Duration::from_secs(3600);

/// The id a queued message is relayed with (`XDSHARE-ID`): its creation time and queue id,
/// so a node whose database was made anew (its ids starting over) does not reuse one while
/// owners still remember it.
pub(crate) fn relay_id(entry: &QueueEntry) -> String {
    format!("{}.{}", entry.created, entry.id)
}

/// Due entries of one pass that one worker relays in order: those whose first pending recipient
/// has the same owner endpoint.
type Group = Vec<QueueEntry>;

/// Splits due entries, each with its key, into [`Group`]s by key, keeping the due order inside
/// a group and between the groups' first entries.
fn groups(
    keyed: impl IntoIterator<Item = (Option<String>, QueueEntry)>,
) -> Vec<(Option<String>, Group)> {
    let mut index: HashMap<Option<String>, usize> = HashMap::new();
    let mut groups: Vec<(Option<String>, Group)> = Vec::new();
    for (endpoint, entry) in keyed {
        let at = *index.entry(endpoint.clone()).or_insert_with(|| {
            groups.push((endpoint, Vec::new()));
            groups.len() - 1
        });
        groups[at].1.push(entry);
    }
    groups
}

/// The owner endpoint an entry is grouped by: that of its first pending recipient.
fn entry_endpoint(entry: &QueueEntry) -> Option<String> {
    entry.pending().find_map(|r| r.endpoint.clone())
}

/// What the queue runner is working on: the owner endpoints that have a worker and the ids of
/// the entries those workers hold. A pass leaves both out, so a slow or black-holed owner keeps
/// only its own worker busy while later passes relay other owners' mail (#13 point 16).
#[derive(Debug, Default)]
pub(crate) struct InFlight {
    endpoints: HashSet<Option<String>>,
    ids: HashSet<u64>,
    /// After an entry could not even be rescheduled: no pass before this (no spinning on it).
    cool_down_until: Option<std::time::Instant>,
    /// Due outbound entries the last pass left because every worker their destination may
    /// have was busy: the next pass comes when a worker ends, not on the timer.
    parked: HashSet<u64>,
}

/// A worker's claim on its group: released when the worker ends, even by a panic.
struct Claim {
    smtp: Arc<Smtp>,
    endpoint: Option<String>,
    ids: Vec<u64>,
}

impl Drop for Claim {
    fn drop(&mut self) {
        {
            let mut in_flight = self.smtp.in_flight();
            in_flight.endpoints.remove(&self.endpoint);
            for id in &self.ids {
                in_flight.ids.remove(id);
            }
        }
        // The runner looks at the queue again (entries of this owner may be due by now).
        self.smtp.wake.notify_one();
    }
}

/// The queue runner of a node (one per node).
#[derive(Debug, Clone)]
pub struct QueueRunner {
    smtp: Arc<Smtp>,
}

impl QueueRunner {
    pub(crate) fn new(smtp: Arc<Smtp>) -> Self {
        Self { smtp }
    }

    /// Runs until `shutdown`: starts workers for due entries, then sleeps until the next one is
    /// due, a message is queued, a worker ended, or a minute passed. Workers are not waited for:
    /// a pass never waits for a slow owner.
    pub async fn run(self, shutdown: Shutdown) {
        tracing::info!(queued = self.smtp.queue.len(), "queue runner started");
        let mut swept: Option<std::time::Instant> = None;
        loop {
            if shutdown.is_shutdown() {
                break;
            }
            if swept.is_none_or(|at| at.elapsed() >= SWEEP_EVERY) {
                swept = Some(std::time::Instant::now());
                self.sweep_relay_marks().await;
            }
            let wait = match self.start_pass() {
                // Detached: each worker releases its claim and wakes the runner when done.
                Ok(_workers) => self.next_wait(),
                Err(e) => {
                    tracing::error!(error = %e, "queue run failed");
                    Duration::from_secs(5)
                }
            };
            tokio::select! {
                () = self.smtp.wake.notified() => {}
                () = tokio::time::sleep(wait) => {}
                () = shutdown.wait() => break,
            }
        }
        tracing::info!("queue runner stopped");
    }

    /// Processes every due entry not already being worked on once, and waits for that; returns
    /// how long to sleep before the next is due.
    pub async fn run_once(&self) -> Result<Duration> {
        for worker in self.start_pass()? {
            if let Err(e) = worker.await {
                // The entries it held stay due and are tried again after a back-off.
                tracing::error!(error = %e, "queue worker failed");
                self.cool_down();
            }
        }
        Ok(self.next_wait())
    }

    /// Removes the relay marks older than the retention (see
    /// [`crate::SmtpConfig::relay_mark_retention`]); returns how many.
    pub async fn sweep_relay_marks(&self) -> usize {
        let retention = self.smtp.config.relay_mark_retention();
        let cutoff = unix_now().saturating_sub(retention.as_secs().min(i64::MAX as u64) as i64);
        let marks = self.smtp.mail.relay_marks().clone();
        match tokio::task::spawn_blocking(move || marks.sweep(cutoff)).await {
            Ok(Ok(removed)) => {
                if removed > 0 {
                    tracing::info!(removed, "expired relay marks swept");
                }
                removed
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "sweeping relay marks failed");
                0
            }
            Err(e) => {
                tracing::error!(error = %e, "sweeping relay marks failed");
                0
            }
        }
    }

    fn cool_down(&self) {
        self.smtp.in_flight().cool_down_until =
            Some(std::time::Instant::now() + self.smtp.config.backoff(1));
    }

    /// How long to sleep: until the earliest entry no worker holds is due (at least 200 ms, at
    /// most a minute), or the end of a cool-down.
    fn next_wait(&self) -> Duration {
        let queue = &self.smtp.queue;
        metrics::gauge!("dshare_queue_depth").set(queue.len() as f64);
        let (next, cool_down) = {
            let in_flight = self.smtp.in_flight();
            let next = if in_flight.parked.is_empty() {
                queue.next_due_except(&in_flight.ids)
            } else {
                let skip: HashSet<u64> = in_flight.ids.union(&in_flight.parked).copied().collect();
                queue.next_due_except(&skip)
            };
            (next, in_flight.cool_down_until)
        };
        let wait = match next {
            Some(at) => Duration::from_secs(at.saturating_sub(unix_now()).max(0) as u64)
                .clamp(Duration::from_millis(200), MAX_SLEEP),
            None => MAX_SLEEP,
        };
        match cool_down {
            Some(until) => wait.max(until.saturating_duration_since(std::time::Instant::now())),
            None => wait,
        }
    }

    /// Starts one worker per owner endpoint of the due entries, for endpoints without a worker
    /// and as long as worker slots are free ([`MAX_OWNERS_AT_ONCE`]).
    fn start_pass(&self) -> Result<Vec<tokio::task::JoinHandle<()>>> {
        let smtp = &self.smtp;
        let due = {
            let mut in_flight = smtp.in_flight();
            if let Some(until) = in_flight.cool_down_until {
                if std::time::Instant::now() < until {
                    return Ok(Vec::new());
                }
                in_flight.cool_down_until = None;
            }
            let due = smtp.queue.due_except(unix_now(), &in_flight.ids)?;
            let (groups, parked) = self.group(due, &in_flight);
            in_flight.parked = parked;
            groups
        };
        let mut workers = Vec::new();
        for (endpoint, group) in due {
            let Ok(permit) = Arc::clone(&smtp.relay_workers).try_acquire_owned() else {
                tracing::debug!("every queue worker is busy; the rest waits for the next pass");
                break;
            };
            let claim = {
                let mut in_flight = smtp.in_flight();
                if !in_flight.endpoints.insert(endpoint.clone()) {
                    continue;
                }
                let ids: Vec<u64> = group.iter().map(|e| e.id).collect();
                in_flight.ids.extend(ids.iter().copied());
                Claim {
                    smtp: Arc::clone(smtp),
                    endpoint,
                    ids,
                }
            };
            let runner = self.clone();
            workers.push(tokio::spawn(async move {
                let _permit = permit;
                let _claim = claim;
                if runner.work(group).await {
                    runner.cool_down();
                }
            }));
        }
        Ok(workers)
    }

    /// Groups due entries per owner endpoint; entries with only outbound recipients per
    /// destination, spread over as many workers as it may have sessions (see [`Spread`]).
    /// Also returns the ids of those that find no free worker (left for a later pass).
    fn group(
        &self,
        due: Vec<QueueEntry>,
        in_flight: &InFlight,
    ) -> (Vec<(Option<String>, Group)>, HashSet<u64>) {
        let Some(outbound) = &self.smtp.outbound else {
            let keyed = due.into_iter().map(|e| (entry_endpoint(&e), e));
            return (groups(keyed), HashSet::new());
        };
        let mut keyed = Vec::with_capacity(due.len());
        let mut due_per_destination: HashMap<String, usize> = HashMap::new();
        for entry in due {
            if let Some(endpoint) = entry_endpoint(&entry) {
                keyed.push((Some(endpoint), None, entry));
            } else if let Some(destination) = self.outbound_destination(&entry) {
                *due_per_destination.entry(destination.clone()).or_default() += 1;
                keyed.push((None, Some(destination), entry));
            } else {
                keyed.push((None, None, entry));
            }
        }
        let workers = outbound.max_per_destination().min(MAX_OWNERS_AT_ONCE);
        let mut spread = Spread::new(workers, &in_flight.endpoints);
        let mut parked = HashSet::new();
        let keyed = keyed
            .into_iter()
            .filter_map(|(endpoint, destination, entry)| {
                let Some(destination) = destination else {
                    return Some((endpoint, entry));
                };
                match spread.key(&destination, due_per_destination[&destination]) {
                    Some(key) => Some((Some(key), entry)),
                    None => {
                        parked.insert(entry.id);
                        None
                    }
                }
            });
        let groups = groups(keyed.collect::<Vec<_>>());
        (groups, parked)
    }

    /// Where an entry whose first pending recipient is outside every served domain goes: its
    /// domain, or the relay host.
    fn outbound_destination(&self, entry: &QueueEntry) -> Option<String> {
        let outbound = self.smtp.outbound.as_ref()?;
        let domain = entry
            .pending()
            .find_map(|r| r.address.rsplit_once('@').map(|(_, d)| d))
            .filter(|d| !self.smtp.directory.domains().is_served(d))?;
        Some(outbound.destination(domain))
    }

    /// One worker: relays a group's entries in order over its sessions. Returns whether an
    /// entry could not be processed.
    async fn work(&self, group: Group) -> bool {
        let smtp = &self.smtp;
        let mut failed = false;
        let mut sessions = RelaySessions::new(&smtp.config, smtp.relay_tls.as_ref());
        for entry in group {
            let id = entry.id;
            // The claim re-reads the entry: a copy read at the start of the pass may be stale
            // (relayed meanwhile, retried, removed), and an entry is relayed by one worker at
            // a time; an operator's retry leaves a claimed entry alone (#13 point 15).
            let (entry, _claim) = match smtp.queue.claim_due(id, unix_now()) {
                Ok(Some(claimed)) => claimed,
                Ok(None) => {
                    tracing::debug!(id, "queue entry no longer due, skipped");
                    continue;
                }
                Err(e) => {
                    tracing::error!(id, error = %e, "queue entry cannot be claimed");
                    failed = true;
                    continue;
                }
            };
            if let Err(e) = self.process(entry, &mut sessions).await {
                tracing::error!(id, error = %e, "queue entry processing failed");
                failed = true;
            }
            sessions.close_idle(SESSION_IDLE).await;
        }
        sessions.close_all().await;
        failed
    }

    /// One attempt at an entry. Whatever happens, what was achieved (recipients relayed or
    /// delivered) is written back and the entry is rescheduled with back-off, so an error never
    /// leads to relaying the same recipient again at once.
    async fn process(&self, mut entry: QueueEntry, sessions: &mut RelaySessions<'_>) -> Result<()> {
        let smtp = &self.smtp;
        let stored = match entry.body {
            Some(body) => smtp.store.bodies().open(body.id)?.map(|_| body),
            None => None,
        };
        let Some(stored) = stored else {
            tracing::error!(id = entry.id, "queue entry without a body, dropped");
            smtp.queue.remove(entry.id)?;
            return Ok(());
        };
        let body = Outgoing {
            bodies: smtp.store.bodies().clone(),
            prefix: entry.prefix.clone(),
            body: stored,
            relay_id: relay_id(&entry),
            dsn: crate::relay::OutgoingDsn::of(&entry),
        };
        let last_error = self.attempt(&mut entry, &body, sessions).await;
        self.report_successes(&entry, &body.dsn.successes).await;
        self.finish_attempt(entry, last_error).await
    }

    /// The success DSNs of an attempt (best effort: a failure is logged, never retried).
    async fn report_successes(&self, entry: &QueueEntry, successes: &dsn::Successes) {
        let lines: Vec<dsn::Line> = successes
            .take()
            .into_iter()
            .filter_map(|(i, action)| {
                let why = match action {
                    dsn::Action::Relayed => "handed to a next hop that does not report",
                    _ => "delivered to the mailbox",
                };
                entry
                    .recipients
                    .get(i)
                    .map(|r| dsn::Line::new(r, action, why))
            })
            .collect();
        if let Err(e) = self.smtp.report(entry, &lines).await {
            tracing::warn!(id = entry.id, error = %e, "success DSN not sent");
        }
    }

    /// Relays (and relocates) the pending recipients of `entry`, updating their states; returns
    /// the last temporary error.
    async fn attempt(
        &self,
        entry: &mut QueueEntry,
        body: &Outgoing,
        sessions: &mut RelaySessions<'_>,
    ) -> Option<String> {
        let smtp = &self.smtp;
        let mut last_error = None;
        self.expand_lists(entry, &mut last_error).await;
        // Round 0 may relocate a recipient after a 550; round 1 tries the new owners.
        for round in 0..2 {
            let mut groups: BTreeMap<(String, String), Vec<usize>> = BTreeMap::new();
            for i in 0..entry.recipients.len() {
                let r = &entry.recipients[i];
                if r.state != RecipientState::Pending {
                    continue;
                }
                match (r.owner.clone(), r.endpoint.clone()) {
                    (Some(owner), Some(endpoint)) => {
                        groups.entry((owner, endpoint)).or_default().push(i)
                    }
                    // Never located (not written by this crate, but be safe): locate now.
                    // A list post waiting for its keepers: see `expand_lists`.
                    _ if self.is_local_list(&r.address) => {}
                    // Outside every served domain: `deliver_outbound` below.
                    _ if self.smtp.outbound.is_some() && self.is_foreign(&r.address) => {}
                    _ if round == 0 => {
                        let address = r.address.clone();
                        let location = smtp.locator.locate(&address, Purpose::Rcpt).await;
                        self.apply_location(entry, i, location, None, body, &mut last_error)
                            .await;
                        // Located on a peer: relayed in this round.
                        let r = &entry.recipients[i];
                        if let (RecipientState::Pending, Some(owner), Some(endpoint)) =
                            (&r.state, r.owner.clone(), r.endpoint.clone())
                        {
                            groups.entry((owner, endpoint)).or_default().push(i);
                        }
                    }
                    _ => {}
                }
            }
            let mut relocated = false;
            for ((owner, endpoint), indexes) in groups {
                let addresses: Vec<String> = indexes
                    .iter()
                    .map(|&i| entry.recipients[i].address.clone())
                    .collect();
                let started = std::time::Instant::now();
                let outcomes = sessions
                    .relay(&endpoint, &entry.sender, &addresses, body)
                    .await;
                metrics::histogram!("dshare_smtp_relay_seconds")
                    .record(started.elapsed().as_secs_f64());
                for (&i, outcome) in indexes.iter().zip(outcomes) {
                    let address = entry.recipients[i].address.clone();
                    match outcome {
                        RcptOutcome::Delivered => {
                            tracing::info!(id = entry.id, rcpt = %address, %owner, "relayed");
                            metrics::counter!("dshare_smtp_messages_total", "result" => "relayed")
                                .increment(1);
                            entry.recipients[i].state = RecipientState::Delivered;
                            let passes = sessions.passes_dsn(&endpoint);
                            body.dsn
                                .successes
                                .note(entry, i, dsn::Action::Relayed, passes);
                        }
                        RcptOutcome::Failed(reason) => {
                            tracing::info!(id = entry.id, rcpt = %address, %owner, %reason, "relay failed permanently");
                            entry.recipients[i].state = RecipientState::Failed(reason);
                        }
                        RcptOutcome::Retry(reason) => {
                            tracing::info!(id = entry.id, rcpt = %address, %owner, %reason, "relay deferred");
                            last_error = Some(reason);
                        }
                        RcptOutcome::NoSuchUser(reason) => {
                            let is_list_copy = matches!(smtp.directory.list(&address), Ok(Some(_)));
                            if round > 0 || is_list_copy {
                                entry.recipients[i].state = RecipientState::Failed(reason);
                                continue;
                            }
                            tracing::info!(id = entry.id, rcpt = %address, %owner, "owner has no such user, locating again");
                            let location = smtp.locator.relocate(&address, Purpose::Rcpt).await;
                            let before = entry.recipients[i].owner.clone();
                            self.apply_location(
                                entry,
                                i,
                                location,
                                Some(reason),
                                body,
                                &mut last_error,
                            )
                            .await;
                            let r = &entry.recipients[i];
                            relocated |= r.state == RecipientState::Pending && r.owner != before;
                        }
                    }
                }
            }
            if !relocated {
                break;
            }
        }
        self.deliver_outbound(entry, body, &mut last_error).await;
        last_error
    }

    /// True for an address in a domain no node of the cluster serves.
    fn is_foreign(&self, address: &str) -> bool {
        address
            .rsplit_once('@')
            .is_some_and(|(_, domain)| !self.smtp.directory.domains().is_served(domain))
    }

    /// Delivers the pending recipients outside every served domain to their domains' MX
    /// hosts, trying the hosts in order while every recipient is deferred.
    async fn deliver_outbound(
        &self,
        entry: &mut QueueEntry,
        body: &Outgoing,
        last_error: &mut Option<String>,
    ) {
        let Some(outbound) = &self.smtp.outbound else {
            return;
        };
        let mut by_domain: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (i, r) in entry.recipients.iter().enumerate() {
            if r.state == RecipientState::Pending
                && r.owner.is_none()
                && self.is_foreign(&r.address)
            {
                let domain = r.address.rsplit_once('@').map_or("", |(_, d)| d);
                by_domain
                    .entry(domain.to_ascii_lowercase())
                    .or_default()
                    .push(i);
            }
        }
        for (domain, indexes) in by_domain {
            let addresses: Vec<String> = indexes
                .iter()
                .map(|&i| entry.recipients[i].address.clone())
                .collect();
            let message = crate::outbound::Message {
                id: entry.id,
                sender: &entry.sender,
                body,
            };
            let delivery = outbound.deliver(&message, &domain, &addresses).await;
            for (&i, outcome) in indexes.iter().zip(delivery.outcomes) {
                let address = entry.recipients[i].address.clone();
                match outcome {
                    RcptOutcome::Delivered => {
                        tracing::info!(id = entry.id, rcpt = %address, "delivered outbound");
                        metrics::counter!("dshare_smtp_messages_total", "result" => "outbound")
                            .increment(1);
                        entry.recipients[i].state = RecipientState::Delivered;
                        body.dsn.successes.note(
                            entry,
                            i,
                            dsn::Action::Relayed,
                            delivery.passes_dsn,
                        );
                    }
                    RcptOutcome::Failed(reason) | RcptOutcome::NoSuchUser(reason) => {
                        tracing::info!(id = entry.id, rcpt = %address, %reason, "outbound delivery failed permanently");
                        entry.recipients[i].state = RecipientState::Failed(reason);
                    }
                    RcptOutcome::Retry(reason) => {
                        tracing::info!(id = entry.id, rcpt = %address, %reason, "outbound delivery deferred");
                        *last_error = Some(reason);
                    }
                }
            }
        }
    }

    /// True for an address outside the cluster: routed outside, or in a domain no node serves.
    fn is_outside(&self, address: &str, location: &Location) -> bool {
        self.smtp.is_outside(address, location)
    }

    fn is_local_list(&self, address: &str) -> bool {
        matches!(self.smtp.directory.list(address), Ok(Some(_)))
    }

    /// Unlocated recipients that are local lists stand for a post whose peer copies could not be
    /// worked out when it was accepted (a possible keeper could not be asked): work them out
    /// now and add them to the entry, or keep waiting (#13 point 9).
    async fn expand_lists(&self, entry: &mut QueueEntry, last_error: &mut Option<String>) {
        for i in 0..entry.recipients.len() {
            let r = &entry.recipients[i];
            if r.state != RecipientState::Pending
                || r.owner.is_some()
                || !self.is_local_list(&r.address)
            {
                continue;
            }
            let list = r.address.clone();
            let Some(plan) = self.smtp.plan_list_later(&list).await else {
                tracing::info!(id = entry.id, %list, "list keepers still not all reachable, deferred");
                *last_error = Some(format!("list {list}: a possible keeper could not be asked"));
                continue;
            };
            entry.recipients[i].state = RecipientState::Delivered;
            for (node, (endpoint, addresses)) in plan.remote {
                for address in addresses {
                    entry
                        .recipients
                        .push(ds_store::queue::QueuedRecipient::located(
                            address, &node, &endpoint,
                        ));
                }
            }
            for address in plan.unlocated {
                entry
                    .recipients
                    .push(ds_store::queue::QueuedRecipient::new(address));
            }
            tracing::info!(id = entry.id, %list, recipients = entry.recipients.len(), "list post's peer copies worked out");
        }
    }

    /// Applies a (re)location to a pending recipient. `refused` is the old owner's 550 reply. A
    /// local delivery that fails leaves the recipient pending with `last_error` set.
    async fn apply_location(
        &self,
        entry: &mut QueueEntry,
        i: usize,
        location: Location,
        refused: Option<String>,
        body: &Outgoing,
        last_error: &mut Option<String>,
    ) {
        let smtp = &self.smtp;
        let failed = |why: String| RecipientState::Failed(refused.clone().unwrap_or(why));
        let r = &mut entry.recipients[i];
        match location {
            Location::Remote(owner)
                if owner.can_receive && r.owner.as_deref() != Some(&owner.node) =>
            {
                tracing::info!(id = entry.id, rcpt = %r.address, new_owner = %owner.node, "recipient moved, requeued to its owner");
                r.address = owner.canonical;
                r.owner = Some(owner.node);
                r.endpoint = Some(owner.smtp);
            }
            Location::Local {
                address,
                enabled: true,
            } => {
                // The account lives here now: deliver it ourselves (sharing the stored body).
                let prefix = format!("Return-Path: <{}>\r\n{}", entry.sender, body.prefix);
                let stored = body.body;
                let mail = smtp.mail.clone();
                let account = address.clone();
                // At most once, as relays to peers (#13 point 18): a crash before the entry
                // records the delivery must not deliver it again.
                let mark = RelayMark::new(&smtp.config.node_id, &body.relay_id, &address);
                let delivered = tokio::task::spawn_blocking(move || {
                    match mail.deliver_stored(&account, &prefix, &stored, mark.as_ref()) {
                        Err(ds_store::Error::Duplicate(why)) => {
                            tracing::info!(%why, "recipient was delivered before");
                            Ok(0)
                        }
                        other => other,
                    }
                })
                .await
                .map_err(|e| crate::Error::Task(e.to_string()))
                .and_then(|r| r.map_err(crate::Error::from));
                match delivered {
                    Ok(_) => {
                        tracing::info!(id = entry.id, rcpt = %address, "recipient is local now, delivered");
                        r.state = RecipientState::Delivered;
                        body.dsn
                            .successes
                            .note(entry, i, dsn::Action::Delivered, false);
                    }
                    Err(e) => {
                        // Stays pending (the other recipients' outcomes are kept); retried later.
                        tracing::error!(id = entry.id, rcpt = %address, error = %e, "local delivery of a relocated recipient failed");
                        *last_error = Some(format!("local delivery to {address}: {e}"));
                    }
                }
            }
            Location::TempFail(reason) => {
                // Nobody can say now where the recipient lives: keep it queued. After a 550 the
                // refusing owner is forgotten, so the next attempt locates the address afresh.
                tracing::info!(id = entry.id, rcpt = %r.address, %reason, "recipient lookup failed, deferred");
                if refused.is_some() {
                    r.owner = None;
                    r.endpoint = None;
                }
                *last_error = Some(format!("lookup: {reason}"));
            }
            other if refused.is_none() && self.is_outside(&r.address, &other) => {
                // A queued DSN for a sender outside the cluster (#13 point 10): it waits.
                tracing::info!(id = entry.id, rcpt = %r.address, "recipient outside the cluster, kept queued until outbound delivery exists");
                *last_error = Some(format!(
                    "{} is outside the cluster: kept until outbound delivery exists",
                    r.address
                ));
            }
            other => {
                tracing::info!(id = entry.id, rcpt = %r.address, location = ?other, "recipient has no other owner, failed");
                r.state = failed(format!("550 5.1.1 no such user ({other:?})"));
            }
        }
    }

    /// After an attempt: finished or expired entries are removed (with a DSN for failures), the
    /// rest rescheduled with back-off.
    async fn finish_attempt(
        &self,
        mut entry: QueueEntry,
        last_error: Option<String>,
    ) -> Result<()> {
        let smtp = &self.smtp;
        let now = unix_now();
        entry.attempts += 1;
        if last_error.is_some() {
            entry.last_error = last_error;
        }
        let age = now.saturating_sub(entry.created);
        if !entry.is_finished() && age >= smtp.config.max_queue_age.as_secs() as i64 {
            let why = format!(
                "gave up after {} attempts over {age} s; last error: {}",
                entry.attempts,
                entry.last_error.as_deref().unwrap_or("none")
            );
            for r in &mut entry.recipients {
                if r.state == RecipientState::Pending {
                    r.state = RecipientState::Failed(why.clone());
                }
            }
        }
        if entry.is_finished() {
            // RFC 3461: only recipients that did not say NOTIFY=NEVER (or left out FAILURE).
            let failed: Vec<dsn::Line> = entry
                .recipients
                .iter()
                .filter_map(|r| match &r.state {
                    RecipientState::Failed(why) if r.dsn.wants_failure() => {
                        Some(dsn::Line::new(r, dsn::Action::Failed, why.clone()))
                    }
                    _ => None,
                })
                .collect();
            if !failed.is_empty() && !entry.sender.is_empty() {
                metrics::counter!("dshare_smtp_messages_total", "result" => "bounced").increment(1);
            }
            if let Err(e) = smtp.report(&entry, &failed).await {
                // Keep the entry (its recipients' states included) and try the DSN again later.
                let delay = smtp.config.backoff(entry.attempts);
                entry.next_attempt = now + delay.as_secs() as i64;
                entry.last_error = Some(format!("DSN not sent: {e}"));
                smtp.queue.update(&entry)?;
                smtp.store.flush_async().await?;
                return Err(e);
            }
            smtp.queue.remove(entry.id)?;
            tracing::info!(id = entry.id, failed = failed.len(), "queue entry done");
        } else {
            self.warn_delay(&mut entry, age).await;
            let delay = smtp.config.backoff(entry.attempts);
            entry.next_attempt = now + delay.as_secs() as i64;
            smtp.queue.update(&entry)?;
            tracing::info!(id = entry.id, attempts = entry.attempts, retry_in = ?delay, "queue entry deferred");
        }
        smtp.store.flush_async().await?;
        Ok(())
    }

    /// Once a message has waited `delay_warning`: a delay DSN for its pending recipients
    /// that want one (sent once; best effort).
    async fn warn_delay(&self, entry: &mut QueueEntry, age: i64) {
        let after = self.smtp.config.delay_warning;
        if entry.delay_warned || after.is_zero() || age < after.as_secs() as i64 {
            return;
        }
        entry.delay_warned = true;
        let why = entry.last_error.clone().unwrap_or_default();
        let lines: Vec<dsn::Line> = entry
            .pending()
            .filter(|r| r.dsn.wants_delay())
            .map(|r| dsn::Line::new(r, dsn::Action::Delayed, why.clone()))
            .collect();
        if let Err(e) = self.smtp.report(entry, &lines).await {
            tracing::warn!(id = entry.id, error = %e, "delay DSN not sent");
        } else if !lines.is_empty() && !entry.sender.is_empty() {
            tracing::info!(id = entry.id, recipients = lines.len(), "delay DSN sent");
        }
    }
}
