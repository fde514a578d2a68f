//! Delivery of an accepted message: local accounts get it in their INBOX, recipients owned by
//! peers are queued (one entry per owner node), list posts fan out; one flush, then `250`.

use std::collections::{BTreeMap, BTreeSet};

use ds_directory::Outcome;
use ds_store::StagedBody;
use ds_store::queue::{QueueEntry, QueuedRecipient};
use mail_builder::headers::date::Date;

use crate::locate::{Location, Purpose};
use crate::session::{Envelope, Rcpt};
use crate::{Error, Result, Smtp};
use ds_store::unix_now;

/// Where one accepted message goes.
#[derive(Debug, Default)]
pub(crate) struct Plan {
    /// Local accounts (canonical addresses).
    pub local: BTreeSet<String>,
    /// Per owner node: its SMTP endpoint and the addresses to relay there.
    pub remote: BTreeMap<String, (String, BTreeSet<String>)>,
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
        format!(
            "Received: from {} ({})\r\n\tby {} (Domain Share) with {} id {}{};\r\n\t{}\r\n",
            if env.helo.is_empty() {
                "unknown"
            } else {
                &env.helo
            },
            env.peer,
            self.config.hostname,
            env.with,
            env.id,
            for_clause,
            Date::new(unix_now()).to_rfc822(),
        )
    }

    /// Works out the local accounts and the peer copies of a message.
    pub(crate) async fn plan(&self, env: &Envelope) -> Plan {
        let mut plan = Plan::default();
        let hop = env.hop.is_some();
        for rcpt in &env.recipients {
            match rcpt {
                Rcpt::Local(account) => {
                    plan.local.insert(account.clone());
                }
                Rcpt::Remote(owner) => plan.add_remote(&owner.node, &owner.smtp, &owner.canonical),
                Rcpt::List(list) => self.plan_list(list, hop, &mut plan).await,
            }
        }
        plan
    }

    /// A list post: local members get it; unless this is a hop, every peer keeping the list gets
    /// one copy addressed to the list, and members owned by a peer that keeps no version of the
    /// list get theirs directly.
    async fn plan_list(&self, list: &str, hop: bool, plan: &mut Plan) {
        let members = match self.directory.list(list) {
            Ok(Some(l)) => l.members,
            Ok(None) => {
                tracing::warn!(%list, "list vanished before delivery");
                return;
            }
            Err(e) => {
                tracing::error!(%list, error = %e, "cannot read list");
                return;
            }
        };
        let keepers = if hop {
            Vec::new()
        } else {
            self.locator.list_keepers(list).await
        };
        for keeper in &keepers {
            if keeper.node != self.config.node_id {
                plan.add_remote(&keeper.node, &keeper.smtp, list);
            }
        }
        for member in members {
            if hop {
                // A relayed copy: local members only, never forwarded again.
                match self.directory.resolve_address(&member).map(|r| r.outcome) {
                    Ok(Outcome::Account {
                        address,
                        enabled: true,
                    }) => {
                        plan.local.insert(address);
                    }
                    other => {
                        tracing::debug!(%list, %member, outcome = ?other, "list member not local, skipped")
                    }
                }
                continue;
            }
            match self.locator.locate(&member, Purpose::Rcpt).await {
                Location::Local {
                    address,
                    enabled: true,
                } => {
                    plan.local.insert(address);
                }
                Location::Remote(owner)
                    if owner.can_receive && !keepers.iter().any(|k| k.node == owner.node) =>
                {
                    plan.add_remote(&owner.node, &owner.smtp, &owner.canonical);
                }
                Location::Remote(_) => {
                    tracing::debug!(%list, %member, "list member covered by a peer's copy")
                }
                other => {
                    tracing::info!(%list, %member, location = ?other, "list member on no node, skipped")
                }
            }
        }
    }

    /// Delivers locally and queues for peers, all sharing the one stored `body` (each copy
    /// with its own `Return-Path`/`Received` prefix), then flushes once. `Ok` = durable.
    pub(crate) async fn accept(&self, env: &Envelope, body: StagedBody) -> Result<()> {
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
                    address: a.clone(),
                    owner: Some(node.clone()),
                    endpoint: Some(smtp.clone()),
                    state: ds_store::queue::RecipientState::Pending,
                })
                .collect();
            let entry = QueueEntry {
                id: 0,
                sender: env.sender.clone(),
                recipients,
                created: now,
                next_attempt: now,
                attempts: 0,
                last_error: None,
                size: 0,
                hop: false,
                envid: None,
                body: None,
                prefix: String::new(),
            };
            remote.push((entry, header));
        }
        let (mail, queue) = (self.mail.clone(), self.queue.clone());
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
            "message accepted"
        );
        Ok(())
    }
}
