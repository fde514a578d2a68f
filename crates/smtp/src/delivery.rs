//! Delivery of an accepted message: local accounts get it in their INBOX, recipients owned by
//! peers are queued (one entry per owner node), list posts fan out; one flush, then `250`.

use std::collections::{BTreeMap, BTreeSet};

use ds_directory::Outcome;
use ds_store::queue::{QueueEntry, QueuedRecipient};
use ds_store::{RelayMark, StagedBody};
use mail_builder::headers::date::Date;

use crate::locate::{Location, Purpose};
use crate::session::{Envelope, Rcpt};
use crate::{Error, Result, Smtp};
use ds_store::unix_now;

/// A queue entry for part of an accepted message, with its `RET` and `ENVID`.
fn queue_entry(env: &Envelope, recipients: Vec<QueuedRecipient>, now: i64) -> QueueEntry {
    QueueEntry {
        envid: env.dsn.envid.clone(),
        ret: env.dsn.ret,
        ..QueueEntry::new(env.sender.clone(), recipients, now)
    }
}

/// Where one accepted message goes.
#[derive(Debug, Default)]
pub(crate) struct Plan {
    /// Local accounts (canonical addresses).
    pub local: BTreeSet<String>,
    /// Per owner node: its SMTP endpoint and the addresses to relay there.
    pub remote: BTreeMap<String, (String, BTreeSet<String>)>,
    /// Addresses to locate later (queued without an owner): list members whose lookup failed
    /// for now, and lists whose peer copies could not be worked out because a peer that may
    /// keep the list could not be asked (#13 point 9).
    pub unlocated: BTreeSet<String>,
    /// Recipients outside every served domain (authenticated submissions): queued for
    /// outbound delivery, grouped per destination domain.
    pub outbound: BTreeMap<String, BTreeSet<String>>,
}

impl Plan {
    pub fn add_remote(&mut self, node: &str, smtp: &str, address: &str) {
        self.remote
            .entry(node.to_string())
            .or_insert_with(|| (smtp.to_string(), BTreeSet::new()))
            .1
            .insert(address.to_string());
    }
}

impl Smtp {
    /// The `Received:` trace header of this node.
    pub(crate) fn received_header(&self, env: &Envelope, rcpt: Option<&str>) -> String {
        let for_clause = rcpt.map(|r| format!("\r\n\tfor <{r}>")).unwrap_or_default();
        // A submission names the client's address only when configured to (DESIGN.md §6).
        let client = match &env.user {
            Some(_) if !self.config.reveal_client => "authenticated".to_string(),
            Some(_) => format!("authenticated, {}", env.peer),
            None => env.peer.to_string(),
        };
        format!(
            "Received: from {} ({})\r\n\tby {} (Domain Share) with {} id {}{};\r\n\t{}\r\n{}",
            if env.helo.is_empty() {
                "unknown"
            } else {
                &env.helo
            },
            client,
            self.config.hostname,
            env.with,
            env.id,
            for_clause,
            Date::new(unix_now()).to_rfc822(),
            env.added_headers,
        )
    }

    /// Works out the local accounts and the peer copies of a message.
    pub(crate) async fn plan(&self, env: &Envelope) -> Plan {
        self.plan_recipients(&env.recipients, env.hop.is_some())
            .await
    }

    async fn plan_recipients(&self, recipients: &[Rcpt], hop: bool) -> Plan {
        let mut plan = Plan::default();
        for rcpt in recipients {
            match rcpt {
                Rcpt::Local(account) => {
                    plan.local.insert(account.clone());
                }
                Rcpt::Remote(owner) => plan.add_remote(&owner.node, &owner.smtp, &owner.canonical),
                Rcpt::Outbound(address) => {
                    let domain = address.rsplit_once('@').map_or("", |(_, d)| d);
                    plan.outbound
                        .entry(domain.to_ascii_lowercase())
                        .or_default()
                        .insert(address.clone());
                }
                Rcpt::List(list) => self.plan_list(list, hop, &mut plan).await,
            }
        }
        plan
    }

    /// A list post: local members get it; unless this is a hop, every peer keeping the list gets
    /// one copy addressed to the list, and members owned by a peer that keeps no version of the
    /// list get theirs directly. What cannot be worked out now (a member whose lookup fails, a
    /// keeper that cannot be asked) is queued unlocated and worked out by the queue runner.
    async fn plan_list(&self, list: &str, hop: bool, plan: &mut Plan) {
        let Some(members) = self.list_members(list) else {
            return;
        };
        if hop {
            // A relayed copy: local members only, never forwarded again.
            self.plan_local_members(list, &members, plan);
            return;
        }
        let Some(keepers) = self.locator.list_keepers_checked(list).await else {
            tracing::warn!(%list, "a possible list keeper could not be asked: local members get the post now, the peers' copies are queued");
            self.plan_local_members(list, &members, plan);
            plan.unlocated.insert(list.to_string());
            return;
        };
        self.plan_members(list, &members, &keepers, true, plan)
            .await;
    }

    fn list_members(&self, list: &str) -> Option<Vec<String>> {
        match self.directory.list(list) {
            Ok(Some(l)) => Some(l.members),
            Ok(None) => {
                tracing::warn!(%list, "list vanished before delivery");
                None
            }
            Err(e) => {
                tracing::error!(%list, error = %e, "cannot read list");
                None
            }
        }
    }

    fn plan_local_members(&self, list: &str, members: &[String], plan: &mut Plan) {
        for member in members {
            match self.directory.resolve_address(member).map(|r| r.outcome) {
                Ok(Outcome::Account {
                    address,
                    enabled: true,
                }) => {
                    plan.local.insert(address);
                }
                other => {
                    tracing::debug!(%list, %member, outcome = ?other, "list member not local, skipped here")
                }
            }
        }
    }

    async fn plan_members(
        &self,
        list: &str,
        members: &[String],
        keepers: &[ds_access::ListKeeper],
        local: bool,
        plan: &mut Plan,
    ) {
        for keeper in keepers {
            if keeper.node != self.config.node_id {
                plan.add_remote(&keeper.node, &keeper.smtp, list);
            }
        }
        for member in members {
            match self.locator.locate(member, Purpose::Rcpt).await {
                Location::Local {
                    address,
                    enabled: true,
                } => {
                    if local {
                        plan.local.insert(address);
                    }
                }
                Location::Remote(owner)
                    if owner.can_receive && !keepers.iter().any(|k| k.node == owner.node) =>
                {
                    plan.add_remote(&owner.node, &owner.smtp, &owner.canonical);
                }
                Location::Remote(_) => {
                    tracing::debug!(%list, %member, "list member covered by a peer's copy")
                }
                Location::TempFail(reason) => {
                    tracing::warn!(%list, %member, %reason, "list member lookup failed, queued to be located later");
                    plan.unlocated.insert(member.clone());
                }
                other => {
                    tracing::info!(%list, %member, location = ?other, "list member on no node, skipped")
                }
            }
        }
    }

    /// For the queue runner: the peer copies of a post to the local list `list` whose keepers
    /// could not all be asked when it was accepted (local members already have it). `None`:
    /// still not possible.
    pub(crate) async fn plan_list_later(&self, list: &str) -> Option<Plan> {
        let mut plan = Plan::default();
        let Some(members) = self.list_members(list) else {
            return Some(plan);
        };
        let keepers = self.locator.list_keepers_checked(list).await?;
        self.plan_members(list, &members, &keepers, false, &mut plan)
            .await;
        Some(plan)
    }

    /// Delivers locally and queues for peers, all sharing the one stored `body` (each copy
    /// with its own `Return-Path`/`Received` prefix), then flushes once. `Ok` = durable.
    pub(crate) async fn accept(&self, env: &Envelope, mut body: StagedBody) -> Result<()> {
        if let (Some(origin), Some(relay_id)) = (&env.hop, &env.relay_id) {
            return self.accept_relayed(env, origin, relay_id, body).await;
        }
        let plan = self.plan(env).await;
        let size = body.body().len;
        let return_path = format!("Return-Path: <{}>\r\n", env.sender);
        let mut local = Vec::new();
        for account in &plan.local {
            let mut header = return_path.clone();
            header.push_str(&self.received_header(env, Some(account)));
            local.push((account.clone(), header));
        }
        let mut remote = Vec::new();
        let now = unix_now();
        for (node, (smtp, addresses)) in &plan.remote {
            let single = (addresses.len() == 1)
                .then(|| addresses.iter().next())
                .flatten();
            let header = self.received_header(env, single.map(String::as_str));
            let recipients: Vec<QueuedRecipient> = addresses
                .iter()
                .map(|a| QueuedRecipient {
                    dsn: env.rcpt_dsn(a),
                    ..QueuedRecipient::located(a, node, smtp)
                })
                .collect();
            let entry = queue_entry(env, recipients, now);
            remote.push((entry, header));
        }
        let signature = if env.user.is_some() && !plan.outbound.is_empty() {
            let (back, signature) = self.dkim_sign(env, body).await?;
            body = back;
            signature
        } else {
            None
        };
        for (domain, addresses) in &plan.outbound {
            // Waits in the queue for outbound delivery; `dshare queue list` shows the domain.
            let recipients = addresses
                .iter()
                .map(|a| QueuedRecipient {
                    dsn: env.rcpt_dsn(a),
                    ..QueuedRecipient::new(a)
                })
                .collect();
            let entry = queue_entry(env, recipients, now);
            tracing::debug!(id = %env.id, %domain, "queued for outbound delivery");
            let mut prefix = signature.clone().unwrap_or_default();
            prefix.push_str(&self.received_header(env, None));
            remote.push((entry, prefix));
        }
        if !plan.unlocated.is_empty() {
            let entry = queue_entry(
                env,
                plan.unlocated.iter().map(QueuedRecipient::new).collect(),
                now,
            );
            remote.push((entry, self.received_header(env, None)));
        }
        let (mail, queue) = (self.mail.clone(), self.queue.clone());
        let body_ref = body.body();
        let queued = tokio::task::spawn_blocking(move || -> Result<usize> {
            let n = remote.len();
            mail.deliver_and_queue(&body, &local, Some((&queue, remote)))?;
            Ok(n)
        })
        .await
        .map_err(|e| Error::Task(e.to_string()))??;
        self.store.flush_async().await?;
        if queued > 0 {
            metrics::gauge!("dshare_queue_depth").set(self.queue.len() as f64);
            self.wake.notify_one();
        }
        tracing::info!(
            id = %env.id,
            sender = %env.sender,
            hop = ?env.hop,
            size,
            local = plan.local.len(),
            queued_for = ?plan.remote.keys().collect::<Vec<_>>(),
            unlocated = plan.unlocated.len(),
            outbound = ?plan.outbound.keys().collect::<Vec<_>>(),
            user = ?env.user,
            "message accepted"
        );
        self.report_local_success(env, &plan.local, &body_ref).await;
        Ok(())
    }

    /// The `DKIM-Signature` of a submitted message that goes out (DESIGN.md §6): signed
    /// once, here, over the header lines we added and the stored body, with the key of its
    /// `From:` domain; `None` without one. The body is handed back.
    async fn dkim_sign(
        &self,
        env: &Envelope,
        body: StagedBody,
    ) -> Result<(StagedBody, Option<String>)> {
        let dkim = std::sync::Arc::clone(&self.config.dkim);
        if dkim.is_empty() {
            return Ok((body, None));
        }
        let head = env.added_headers.clone();
        let (body, signed) = tokio::task::spawn_blocking(move || {
            let signed = body.reader().map_err(|e| e.to_string()).and_then(|mut r| {
                dkim.sign(head.as_bytes(), &mut r)
                    .map_err(|e| e.to_string())
            });
            (body, signed)
        })
        .await
        .map_err(|e| Error::Task(e.to_string()))?;
        match signed {
            Ok(signature) => {
                tracing::debug!(id = %env.id, signed = signature.is_some(), "DKIM");
                Ok((body, signature))
            }
            Err(e) => {
                tracing::warn!(id = %env.id, error = %e, "DKIM signing failed, sent unsigned");
                Ok((body, None))
            }
        }
    }

    /// RFC 3461 `NOTIFY=SUCCESS`: a "delivered" DSN for the local recipients that asked for
    /// one (best effort: the message is delivered whatever becomes of the report).
    async fn report_local_success(
        &self,
        env: &Envelope,
        local: &BTreeSet<String>,
        body: &ds_store::BodyRef,
    ) {
        let lines: Vec<crate::dsn::Line> = local
            .iter()
            .filter_map(|account| {
                let dsn = env.rcpt_dsn.get(account)?;
                dsn.wants_success().then(|| crate::dsn::Line {
                    address: account.clone(),
                    orcpt: dsn.orcpt.clone(),
                    action: crate::dsn::Action::Delivered,
                    why: "delivered to the mailbox".into(),
                })
            })
            .collect();
        if lines.is_empty() || env.sender.is_empty() {
            return;
        }
        let sent = async {
            let (start, _) = self.message_start(&env.added_headers, Some(body))?;
            let about = crate::dsn::About {
                sender: &env.sender,
                envid: env.dsn.envid.as_deref(),
                arrival: unix_now(),
            };
            let returned = crate::dsn::Returned::Headers(crate::dsn::header_part(&start));
            let report = crate::dsn::build(&self.config.hostname, about, &lines, &returned);
            self.send_report(&env.id, &env.sender, report).await
        };
        match sent.await {
            Ok(()) => tracing::info!(id = %env.id, recipients = lines.len(), "success DSN sent"),
            Err(e) => tracing::warn!(id = %env.id, error = %e, "success DSN not sent"),
        }
    }

    /// A message a peer relayed with its queue id (#13 point 18): each recipient is delivered
    /// at most once per `(origin, queue id)`, its [`RelayMark`] written in the same
    /// transaction as the delivery. Recipients marked before are left out (the peer retries
    /// after it lost our `250`); if none is left, nothing is stored and the peer gets `250`.
    async fn accept_relayed(
        &self,
        env: &Envelope,
        origin: &str,
        relay_id: &str,
        mut body: StagedBody,
    ) -> Result<()> {
        let mark = |rcpt: &Rcpt| match rcpt {
            Rcpt::Local(address) | Rcpt::List(address) => RelayMark::new(origin, relay_id, address),
            Rcpt::Remote(_) | Rcpt::Outbound(_) => None,
        };
        // A repeat that races the first delivery loses the commit and is looked at again.
        for _ in 0..3 {
            let mut fresh = Vec::new();
            let mut marks = Vec::new();
            let mut repeated = 0usize;
            for rcpt in &env.recipients {
                match mark(rcpt) {
                    Some(m) if self.mail.relay_marks().contains(&m)? => repeated += 1,
                    Some(m) => {
                        fresh.push(rcpt.clone());
                        marks.push(m);
                    }
                    None => fresh.push(rcpt.clone()),
                }
            }
            if repeated > 0 {
                metrics::counter!("dshare_smtp_relay_repeats_total").increment(repeated as u64);
            }
            if fresh.is_empty() {
                tracing::info!(id = %env.id, %origin, %relay_id, repeated, "relayed message delivered before, not stored again");
                return Ok(());
            }
            let plan = self.plan_recipients(&fresh, true).await;
            let return_path = format!("Return-Path: <{}>\r\n", env.sender);
            let local: Vec<(String, String)> = plan
                .local
                .iter()
                .map(|account| {
                    let mut header = return_path.clone();
                    header.push_str(&self.received_header(env, Some(account)));
                    (account.clone(), header)
                })
                .collect();
            let mail = self.mail.clone();
            let (back, delivered) = tokio::task::spawn_blocking(move || {
                let delivered = mail.deliver_relayed(&body, &local, &marks);
                (body, delivered)
            })
            .await
            .map_err(|e| Error::Task(e.to_string()))?;
            body = back;
            match delivered {
                Ok(_) => {
                    self.store.flush_async().await?;
                    tracing::info!(
                        id = %env.id,
                        sender = %env.sender,
                        hop = %origin,
                        %relay_id,
                        size = body.body().len,
                        local = plan.local.len(),
                        repeated,
                        "message accepted"
                    );
                    self.report_local_success(env, &plan.local, &body.body())
                        .await;
                    return Ok(());
                }
                Err(ds_store::Error::Duplicate(why)) => {
                    tracing::info!(id = %env.id, %origin, %relay_id, %why, "relayed message delivered meanwhile, looking again");
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(Error::Relay(format!(
            "relayed message {origin}/{relay_id} kept racing its own repeats"
        )))
    }
}
