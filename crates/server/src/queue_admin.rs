//! The operator's queue commands (like Postfix's `postqueue`/`postsuper`): list, show,
//! retry/flush by selection, hold/release, delete, and the summary the status page and the
//! metrics use.

use std::collections::BTreeMap;
use std::io::Read;

use serde_json::{Value, json};

use ds_store::{QueueEntry, QueuedRecipient, RecipientState, unix_now};

use crate::NodeState;

/// The most header bytes `queue show` reads from a message.
pub const MAX_SHOWN_HEADER: usize = 64 * 1024;

/// Which queued messages a command applies to.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// These ids (each must exist); when empty, the filters below apply.
    pub ids: Vec<u64>,
    /// Every message (combined with the filters).
    pub all: bool,
    /// A pending recipient owned by this node.
    pub node: Option<String>,
    /// A pending recipient in this domain.
    pub domain: Option<String>,
    /// A pending recipient with this address.
    pub recipient: Option<String>,
}

fn domain_of(address: &str) -> &str {
    address.rsplit_once('@').map(|(_, d)| d).unwrap_or("")
}

impl Selection {
    fn has_filter(&self) -> bool {
        self.node.is_some() || self.domain.is_some() || self.recipient.is_some()
    }

    fn recipient_matches(&self, r: &QueuedRecipient) -> bool {
        r.state == RecipientState::Pending
            && self
                .node
                .as_ref()
                .is_none_or(|n| r.owner.as_deref() == Some(n.as_str()))
            && self
                .domain
                .as_ref()
                .is_none_or(|d| domain_of(&r.address).eq_ignore_ascii_case(d))
            && self
                .recipient
                .as_ref()
                .is_none_or(|a| r.address.eq_ignore_ascii_case(a))
    }

    fn matches(&self, e: &QueueEntry) -> bool {
        if !self.ids.is_empty() {
            return self.ids.contains(&e.id);
        }
        if self.has_filter() {
            return e.recipients.iter().any(|r| self.recipient_matches(r));
        }
        self.all
    }
}

/// What `queue delete` did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DeleteCounts {
    /// Messages removed.
    pub removed: usize,
    /// Recipients dropped (recipient filters).
    pub dropped: usize,
    /// Messages left alone because a delivery attempt had them at that moment.
    pub busy: usize,
}

/// What the queue holds, in numbers.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct QueueSummary {
    pub size: usize,
    pub held: usize,
    /// Seconds; 0 when empty.
    pub oldest_age: i64,
    /// Pending recipients per destination node (`outbound:DOMAIN` = Internet delivery, `?` =
    /// not located yet).
    pub by_destination: BTreeMap<String, usize>,
    /// The latest errors: `(id, error)`, newest attempts first, at most 10.
    pub recent_failures: Vec<(u64, String)>,
}

fn state_name(s: &RecipientState) -> (&'static str, Option<&str>) {
    match s {
        RecipientState::Pending => ("pending", None),
        RecipientState::Delivered => ("delivered", None),
        RecipientState::Failed(why) => ("failed", Some(why.as_str())),
    }
}

fn recipient_json(r: &QueuedRecipient) -> Value {
    let (state, reason) = state_name(&r.state);
    json!({
        "address": r.address,
        "owner": r.owner,
        "endpoint": r.endpoint,
        "state": state,
        "reason": reason,
    })
}

impl NodeState {
    /// Where a queued recipient goes: its owner node, `outbound:DOMAIN` for a recipient
    /// outside every served domain (Internet delivery), `?` when not located yet.
    pub fn destination(&self, r: &QueuedRecipient) -> String {
        match &r.owner {
            Some(owner) => owner.clone(),
            None => {
                let domain = domain_of(&r.address);
                if self.directory.domains().is_served(domain) {
                    "?".into()
                } else {
                    format!("outbound:{}", domain.to_ascii_lowercase())
                }
            }
        }
    }

    fn recipient_json(&self, r: &QueuedRecipient) -> Value {
        let mut v = recipient_json(r);
        v["destination"] = json!(self.destination(r));
        v
    }

    fn entry_json(&self, e: &QueueEntry, now: i64) -> Value {
        json!({
            "id": e.id,
            "sender": e.sender,
            "size": e.size,
            "created": e.created,
            "age": now - e.created,
            "attempts": e.attempts,
            "next_attempt": e.next_attempt,
            "held": self.queue.is_held(e.id),
            "hop": e.hop,
            "last_error": e.last_error,
            "recipients": e.recipients.iter().map(|r| self.recipient_json(r)).collect::<Vec<_>>(),
        })
    }

    /// The queue, one line per message, and the same as JSON.
    pub fn queue_listing(&self) -> Result<(Vec<String>, Value), String> {
        let entries = self.queue.list().map_err(|e| e.to_string())?;
        let now = unix_now();
        let json = Value::Array(entries.iter().map(|e| self.entry_json(e, now)).collect());
        if entries.is_empty() {
            return Ok((vec!["queue is empty".into()], json));
        }
        let lines = entries
            .into_iter()
            .map(|e| {
                let rcpts: Vec<String> = e
                    .recipients
                    .iter()
                    .map(|r| {
                        let to = self.destination(r);
                        format!("{} via {to} {}", r.address, state_name(&r.state).0)
                    })
                    .collect();
                format!(
                    "{} from=<{}> size={} age={}s attempts={} next_in={}s{}{} to: {}{}",
                    e.id,
                    e.sender,
                    e.size,
                    now - e.created,
                    e.attempts,
                    (e.next_attempt - now).max(0),
                    if self.queue.is_held(e.id) {
                        " HELD"
                    } else {
                        ""
                    },
                    if e.hop { " hop" } else { "" },
                    rcpts.join(", "),
                    e.last_error
                        .map(|x| format!(" last_error={x:?}"))
                        .unwrap_or_default()
                )
            })
            .collect();
        Ok((lines, json))
    }

    /// The queue, one line per message (`dshare queue list`).
    pub fn queue_report(&self) -> Result<Vec<String>, String> {
        self.queue_listing().map(|(lines, _)| lines)
    }

    /// One message: its envelope, each recipient's status and its header (at most
    /// [`MAX_SHOWN_HEADER`] bytes read).
    pub fn queue_show(&self, id: u64) -> Result<(Vec<String>, Value), String> {
        let entry = self
            .queue
            .get(id)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("no queued message {id}"))?;
        let now = unix_now();
        let mut header = Vec::new();
        if let Some(reader) = self.queue.open(&entry).map_err(|e| e.to_string())? {
            reader
                .take(MAX_SHOWN_HEADER as u64)
                .read_to_end(&mut header)
                .map_err(|e| format!("reading message {id}: {e}"))?;
        }
        let truncated = match header.windows(4).position(|w| w == b"\r\n\r\n") {
            Some(end) => {
                header.truncate(end);
                false
            }
            None => header.len() >= MAX_SHOWN_HEADER,
        };
        let header = String::from_utf8_lossy(&header).into_owned();
        let mut lines = vec![
            format!("id: {}", entry.id),
            format!("from: <{}>", entry.sender),
            format!("size: {}", entry.size),
            format!("age: {}s", now - entry.created),
            format!("attempts: {}", entry.attempts),
            format!("next attempt in: {}s", (entry.next_attempt - now).max(0)),
            format!("held: {}", self.queue.is_held(id)),
        ];
        if let Some(e) = &entry.last_error {
            lines.push(format!("last error: {e}"));
        }
        for r in &entry.recipients {
            let (state, reason) = state_name(&r.state);
            lines.push(format!(
                "recipient: {} owner={} endpoint={} state={state}{}",
                r.address,
                r.owner.as_deref().unwrap_or("?"),
                r.endpoint.as_deref().unwrap_or("?"),
                reason.map(|x| format!(" reason={x:?}")).unwrap_or_default()
            ));
        }
        lines.push("headers:".into());
        lines.extend(header.lines().map(|l| format!("  {l}")));
        if truncated {
            lines.push(format!(
                "  (header longer than {MAX_SHOWN_HEADER} bytes, cut)"
            ));
        }
        let mut json = self.entry_json(&entry, now);
        json["headers"] = Value::String(header);
        json["headers_truncated"] = Value::Bool(truncated);
        Ok((lines, json))
    }

    /// The ids a selection names; every explicit id must exist.
    fn select(&self, sel: &Selection) -> Result<Vec<QueueEntry>, String> {
        if sel.ids.is_empty() && !sel.all && !sel.has_filter() {
            return Err("give message ids, --all, or a filter (--node, --domain)".into());
        }
        let entries = self.queue.list().map_err(|e| e.to_string())?;
        for id in &sel.ids {
            if !entries.iter().any(|e| e.id == *id) {
                return Err(format!("no queued message {id}"));
            }
        }
        Ok(entries.into_iter().filter(|e| sel.matches(e)).collect())
    }

    /// Makes the selected messages due now (held ones stay held). Returns how many.
    pub fn queue_retry_selected(&self, sel: &Selection) -> Result<usize, String> {
        let mut n = 0;
        for e in self.select(sel)? {
            if self.queue.is_held(e.id) {
                continue;
            }
            match self.queue.retry_now(e.id) {
                Ok(true) => n += 1,
                // Being relayed right now: the attempt reschedules it.
                Ok(false) | Err(ds_store::Error::NotFound(_)) => {}
                Err(other) => return Err(other.to_string()),
            }
        }
        self.queue_wake.notify_one();
        Ok(n)
    }

    /// Holds (or releases, making them due) the selected messages. Returns how many changed.
    pub fn queue_hold_selected(&self, sel: &Selection, hold: bool) -> Result<usize, String> {
        let mut n = 0;
        for e in self.select(sel)? {
            let r = if hold {
                self.queue.hold(e.id)
            } else {
                self.queue.release(e.id)
            };
            match r {
                Ok(true) => {
                    n += 1;
                    tracing::info!(
                        id = e.id,
                        hold,
                        "queued message held/released by the operator"
                    );
                }
                Ok(false) | Err(ds_store::Error::NotFound(_)) => {}
                Err(other) => return Err(other.to_string()),
            }
        }
        if !hold {
            self.queue_wake.notify_one();
        }
        Ok(n)
    }

    /// Deletes the selected messages without a bounce. With a recipient filter only, the
    /// matching recipients are dropped and a message is removed once none is pending; a
    /// message being delivered at that moment is left alone (counted as busy: run again).
    pub fn queue_delete_selected(&self, sel: &Selection) -> Result<DeleteCounts, String> {
        let mut n = DeleteCounts::default();
        let per_recipient = sel.ids.is_empty() && !sel.all && sel.has_filter();
        for e in self.select(sel)? {
            if per_recipient {
                match self
                    .queue
                    .drop_recipients(e.id, |r| sel.recipient_matches(r))
                {
                    Ok(Some((dropped, gone))) => {
                        n.dropped += dropped;
                        if gone {
                            tracing::warn!(id = e.id, "queued message deleted by the operator");
                            n.removed += 1;
                        }
                    }
                    Ok(None) => {}
                    Err(ds_store::Error::Conflict(_)) => n.busy += 1,
                    Err(other) => return Err(other.to_string()),
                }
                continue;
            }
            if self
                .queue
                .remove(e.id)
                .map_err(|x| x.to_string())?
                .is_some()
            {
                tracing::warn!(id = e.id, "queued message deleted by the operator");
                n.removed += 1;
            }
        }
        Ok(n)
    }

    /// Size, held count, oldest age, per-destination counts and recent failures.
    pub fn queue_summary(&self) -> QueueSummary {
        let Ok(entries) = self.queue.list() else {
            return QueueSummary::default();
        };
        let now = unix_now();
        let mut s = QueueSummary {
            size: entries.len(),
            held: self.queue.held_len(),
            oldest_age: entries
                .iter()
                .map(|e| now - e.created)
                .max()
                .unwrap_or(0)
                .max(0),
            ..Default::default()
        };
        for e in &entries {
            for r in e.pending() {
                *s.by_destination.entry(self.destination(r)).or_default() += 1;
            }
        }
        let mut failures: Vec<(i64, u64, String)> = entries
            .iter()
            .filter_map(|e| {
                e.last_error
                    .as_ref()
                    .map(|x| (e.next_attempt, e.id, x.clone()))
            })
            .collect();
        failures.sort_by(|a, b| b.cmp(a));
        s.recent_failures = failures
            .into_iter()
            .take(10)
            .map(|(_, id, x)| (id, x))
            .collect();
        s
    }
}
