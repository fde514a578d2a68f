//! RFC 3464 delivery status notifications: `multipart/report; report-type=delivery-status` with a
//! human-readable part, a `message/delivery-status` part and the original headers
//! (`text/rfc822-headers`), built with mail-builder.

use std::sync::{Arc, Mutex};

use ds_store::queue::{QueueEntry, QueuedRecipient, Ret};
use ds_store::unix_now;
use mail_builder::MessageBuilder;
use mail_builder::headers::content_type::ContentType;
use mail_builder::headers::date::Date;
use mail_builder::headers::raw::Raw;
use mail_builder::mime::MimePart;

use crate::locate::{Location, Purpose};
use crate::{Result, Smtp};

/// Cap on the original headers quoted in a DSN.
pub(crate) const MAX_QUOTED_HEADERS: usize = 64 * 1024;

/// The header section of a message (up to the first empty line), capped.
pub(crate) fn header_part(body: &[u8]) -> String {
    let end = body
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 2)
        .unwrap_or(body.len())
        .min(MAX_QUOTED_HEADERS);
    String::from_utf8_lossy(&body[..end]).into_owned()
}

/// How much of a message `RET=FULL` returns whole; a bigger one is returned as its header
/// section (as Postfix's `bounce_size_limit`).
pub(crate) const MAX_RETURNED_FULL: u64 = 256 * 1024;

/// What a DSN reports for one recipient (RFC 3464 `Action`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    Failed,
    Delayed,
    Delivered,
    /// Handed to a next hop that does not take DSN requests.
    Relayed,
}

impl Action {
    fn word(self) -> &'static str {
        match self {
            Action::Failed => "failed",
            Action::Delayed => "delayed",
            Action::Delivered => "delivered",
            Action::Relayed => "relayed",
        }
    }
}

/// One recipient in a DSN.
#[derive(Debug, Clone)]
pub(crate) struct Line {
    pub address: String,
    /// `ORCPT`, reported as `Original-Recipient`.
    pub orcpt: Option<String>,
    pub action: Action,
    /// The reason (a reply text like `RCPT: 550 5.1.1 ...`), or what happened.
    pub why: String,
}

impl Line {
    pub fn new(r: &QueuedRecipient, action: Action, why: impl Into<String>) -> Line {
        Line {
            address: r.address.clone(),
            orcpt: r.dsn.orcpt.clone(),
            action,
            why: why.into(),
        }
    }
}

/// The message a DSN is about: its sender, `ENVID` and arrival.
#[derive(Debug, Clone, Copy)]
pub(crate) struct About<'a> {
    pub sender: &'a str,
    pub envid: Option<&'a str>,
    pub arrival: i64,
}

impl<'a> From<&'a QueueEntry> for About<'a> {
    fn from(entry: &'a QueueEntry) -> Self {
        About {
            sender: &entry.sender,
            envid: entry.envid.as_deref(),
            arrival: entry.created,
        }
    }
}

/// What a DSN returns of the original message.
#[derive(Debug, Clone)]
pub(crate) enum Returned {
    /// `text/rfc822-headers` (`RET=HDRS`, the default, and success or delay reports).
    Headers(String),
    /// `message/rfc822` (`RET=FULL` on a failure, up to [`MAX_RETURNED_FULL`]).
    Full(Vec<u8>),
}

impl Returned {
    /// The returned part for `action` from the start of the message (`start` holds the whole
    /// message when it is at most [`MAX_RETURNED_FULL`] long and `RET=FULL` asked for it).
    pub fn of(start: &[u8], whole: bool, ret: Option<Ret>, action: Action) -> Returned {
        if whole && ret == Some(Ret::Full) && action == Action::Failed {
            Returned::Full(start.to_vec())
        } else {
            Returned::Headers(header_part(start))
        }
    }
}

/// `c.x.y` status for a reply text like `RCPT: 550 5.1.1 ...` (class `c` as `action` needs),
/// else a generic one.
fn status_of(reason: &str, action: Action) -> String {
    let class = match action {
        Action::Failed => "5",
        Action::Delayed => "4",
        Action::Delivered | Action::Relayed => return "2.0.0".into(),
    };
    let found = reason.split_whitespace().find(|w| {
        let parts: Vec<&str> = w.split('.').collect();
        parts.len() == 3
            && parts[0] == class
            && parts
                .iter()
                .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
    });
    match (found, action) {
        (Some(code), _) => code.to_string(),
        // An expired message (gave up) is a permanent failure of a transient condition.
        (None, Action::Failed) if reason.starts_with("gave up") => "5.4.7".into(),
        (None, Action::Failed) => "5.0.0".into(),
        (None, _) => "4.0.0".into(),
    }
}

/// The DSN for `lines` about a message, addressed to its sender.
pub(crate) fn build(
    hostname: &str,
    about: About<'_>,
    lines: &[Line],
    returned: &Returned,
) -> Vec<u8> {
    let now = ds_store::unix_now();
    let worst = [Action::Failed, Action::Delayed, Action::Relayed]
        .into_iter()
        .find(|a| lines.iter().any(|l| l.action == *a))
        .unwrap_or(Action::Delivered);
    let (subject, intro) = match worst {
        Action::Failed => (
            "Undelivered Mail Returned to Sender",
            "Your message could not be delivered to the following recipients:",
        ),
        Action::Delayed => (
            "Delayed Mail (still being retried)",
            "Your message could not be delivered yet to the following recipients; \
             delivery will be tried again:",
        ),
        Action::Delivered | Action::Relayed => (
            "Successful Mail Delivery Report",
            "Your message was delivered to the following recipients (or handed on, where \
             it says relayed):",
        ),
    };
    let mut text = format!("This is the mail system at {hostname}.\r\n\r\n{intro}\r\n\r\n");
    for l in lines {
        text.push_str(&format!(
            "  <{}>: {}: {}\r\n",
            l.address,
            l.action.word(),
            one_line(&l.why)
        ));
    }
    let mut status = format!(
        "Reporting-MTA: dns; {hostname}\r\nArrival-Date: {}\r\n",
        Date::new(about.arrival).to_rfc822()
    );
    if let Some(envid) = about.envid {
        status.push_str(&format!("Original-Envelope-Id: {}\r\n", one_line(envid)));
    }
    for l in lines {
        status.push_str("\r\n");
        if let Some(orcpt) = &l.orcpt {
            status.push_str(&format!(
                "Original-Recipient: rfc822; {}\r\n",
                one_line(orcpt)
            ));
        }
        status.push_str(&format!(
            "Final-Recipient: rfc822; {}\r\nAction: {}\r\nStatus: {}\r\n",
            l.address,
            l.action.word(),
            status_of(&l.why, l.action)
        ));
        if matches!(l.action, Action::Failed | Action::Delayed) {
            status.push_str(&format!(
                "Diagnostic-Code: smtp; {}\r\nLast-Attempt-Date: {}\r\n",
                one_line(&l.why),
                Date::new(now).to_rfc822()
            ));
        }
    }
    let original = match returned {
        Returned::Headers(headers) => MimePart::new(
            ContentType::new("text/rfc822-headers"),
            headers.as_bytes().to_vec(),
        ),
        Returned::Full(message) => {
            MimePart::new(ContentType::new("message/rfc822"), message.clone())
        }
    }
    .transfer_encoding("8bit");
    let parts = vec![
        MimePart::new(ContentType::new("text/plain"), text),
        MimePart::new(
            ContentType::new("message/delivery-status"),
            status.into_bytes(),
        )
        .transfer_encoding("7bit"),
        original,
    ];
    let report = MimePart::new(
        ContentType::new("multipart/report").attribute("report-type", "delivery-status"),
        parts,
    );
    MessageBuilder::new()
        .from((
            "Mail Delivery System".to_string(),
            format!("MAILER-DAEMON@{hostname}"),
        ))
        .to(about.sender)
        .subject(subject)
        .header("Auto-Submitted", Raw::new("auto-replied"))
        .date(Date::new(now))
        .body(report)
        .write_to_vec()
        .unwrap_or_default()
}

/// Recipients delivered (or relayed without DSN) during one queue attempt whose sender asked for
/// a success DSN, by index into the entry's recipients; reported after the attempt.
#[derive(Debug, Clone, Default)]
pub(crate) struct Successes(Arc<Mutex<Vec<(usize, Action)>>>);

impl Successes {
    /// Notes that recipient `i` of `entry` was delivered here, or handed to a next hop that
    /// `passes_dsn` (which then reports) or not (we report "relayed").
    pub fn note(&self, entry: &QueueEntry, i: usize, action: Action, passes_dsn: bool) {
        let wanted = entry
            .recipients
            .get(i)
            .is_some_and(|r| r.dsn.wants_success());
        if wanted && !(action == Action::Relayed && passes_dsn) {
            self.0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((i, action));
        }
    }

    pub fn take(&self) -> Vec<(usize, Action)> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl Smtp {
    /// The start of a stored message (prefix and body): the whole of it when it is at most
    /// [`MAX_RETURNED_FULL`] long (then `true`), else enough for its header section.
    pub(crate) fn message_start(
        &self,
        prefix: &str,
        body: Option<&ds_store::BodyRef>,
    ) -> Result<(Vec<u8>, bool)> {
        let Some(body) = body else {
            return Ok((prefix.as_bytes().to_vec(), true));
        };
        let whole = prefix.len() as u64 + body.len <= MAX_RETURNED_FULL;
        let cap = if whole {
            MAX_RETURNED_FULL
        } else {
            MAX_QUOTED_HEADERS as u64 + 4
        };
        let mut start = Vec::new();
        if let Some(reader) = self
            .store
            .bodies()
            .open_message(prefix.as_bytes(), body.id)?
        {
            std::io::Read::read_to_end(&mut std::io::Read::take(reader, cap), &mut start)?;
        }
        Ok((start, whole))
    }

    /// Sends the DSN for `lines` of a queued message to its sender (never for a DSN: a
    /// null sender gets nothing). `RET` decides what is returned of a failed message.
    pub(crate) async fn report(&self, entry: &QueueEntry, lines: &[Line]) -> Result<()> {
        if lines.is_empty() {
            return Ok(());
        }
        if entry.sender.is_empty() {
            tracing::warn!(
                id = entry.id,
                "DSN for a DSN not sent (never bounce a bounce)"
            );
            return Ok(());
        }
        let (start, whole) = self.message_start(&entry.prefix, entry.body.as_ref())?;
        let action = lines[0].action;
        let returned = Returned::of(&start, whole, entry.ret, action);
        let report = build(&self.config.hostname, About::from(entry), lines, &returned);
        self.send_report(&entry.id.to_string(), &entry.sender, report)
            .await
    }

    /// Delivers a DSN to `sender`: into its mailbox here, queued for its owner node, or queued
    /// for outbound delivery when it lives outside the cluster.
    pub(crate) async fn send_report(&self, id: &str, sender: &str, report: Vec<u8>) -> Result<()> {
        let (address, location) = match ds_directory::Address::parse(sender) {
            Ok(a) => {
                let address = a.to_string();
                let location = self.locator.locate(&address, Purpose::Rcpt).await;
                (address, location)
            }
            Err(_) => (sender.to_string(), Location::Unknown),
        };
        let queue = |rcpt: QueuedRecipient, report: &[u8]| {
            self.queue
                .enqueue("", vec![rcpt], report, false, unix_now())
        };
        match location {
            Location::Local { address, .. } => {
                let mut message = b"Return-Path: <>\r\n".to_vec();
                message.extend_from_slice(&report);
                let mail = self.mail.clone();
                tokio::task::spawn_blocking(move || mail.deliver(&address, &message))
                    .await
                    .map_err(|e| crate::Error::Task(e.to_string()))??;
                tracing::info!(%id, %sender, "DSN delivered locally");
            }
            Location::Remote(owner) => {
                let rcpt = QueuedRecipient::located(&owner.canonical, &owner.node, &owner.smtp);
                let dsn_id = queue(rcpt, &report)?;
                tracing::info!(%id, dsn_id, %sender, owner = %owner.node, "DSN queued");
            }
            Location::TempFail(reason) => {
                // Queued with its recipient not located yet: the runner locates it on a later
                // attempt (and bounces nothing if it fails: the DSN's sender is empty).
                let dsn_id = queue(QueuedRecipient::new(address), &report)?;
                tracing::info!(%id, dsn_id, %sender, %reason, "DSN queued, sender lookup failed for now");
            }
            location if self.is_outside(&address, &location) => {
                // Through outbound delivery (kept queued until it expires on a node without),
                // signed when it is from one of our DKIM domains.
                let report = self.config.dkim.sign_message(report);
                let dsn_id = queue(QueuedRecipient::new(address), &report)?;
                tracing::info!(%id, dsn_id, %sender, "DSN queued for a sender outside the cluster");
            }
            other => {
                tracing::warn!(%id, %sender, location = ?other, "DSN dropped: no node has the sender");
            }
        }
        Ok(())
    }

    /// True for an address outside the cluster: routed outside, or in a domain no node serves.
    pub(crate) fn is_outside(&self, address: &str, location: &Location) -> bool {
        match location {
            Location::External(_) => true,
            Location::Unknown => address
                .rsplit_once('@')
                .is_none_or(|(_, domain)| !self.directory.domains().is_served(domain)),
            _ => false,
        }
    }
}

fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(500)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ds_store::queue::QueuedRecipient;

    #[test]
    fn builds_a_delivery_status_report() {
        let entry = QueueEntry {
            id: 1,
            next_attempt: 0,
            attempts: 3,
            size: 10,
            ..QueueEntry::new(
                "alice@company.com",
                vec![QueuedRecipient::new("bob@company.com")],
                1_700_000_000,
            )
        };
        let headers = header_part(b"Subject: hi\r\nFrom: a@b\r\n\r\nbody\r\n");
        assert_eq!(headers, "Subject: hi\r\nFrom: a@b\r\n");
        let dsn = build(
            "mx.company.com",
            About::from(&entry),
            &[Line {
                address: "bob@company.com".into(),
                orcpt: None,
                action: Action::Failed,
                why: "RCPT: 550 5.1.1 no such user".into(),
            }],
            &Returned::Headers(headers),
        );
        let text = String::from_utf8(dsn).unwrap();
        use mail_parser::MimeHeaders;
        let msg = mail_parser::MessageParser::default()
            .parse(text.as_bytes())
            .unwrap();
        assert_eq!(msg.content_type().unwrap().ctype(), "multipart");
        assert_eq!(msg.content_type().unwrap().subtype(), Some("report"));
        assert!(
            text.contains("report-type=delivery-status")
                || text.contains("report-type=\"delivery-status\"")
        );
        assert!(
            text.contains("Content-Type: message/delivery-status"),
            "{text}"
        );
        assert!(
            text.contains("Final-Recipient: rfc822; bob@company.com"),
            "{text}"
        );
        assert!(text.contains("Status: 5.1.1"));
        assert!(text.contains("Action: failed"));
        assert!(text.contains("Subject: hi"));
        assert!(text.contains("Auto-Submitted: auto-replied"));
        assert_eq!(
            status_of("gave up after 3 attempts", Action::Failed),
            "5.4.7"
        );
        assert_eq!(status_of("RCPT: 451 4.3.0 later", Action::Delayed), "4.3.0");
        assert_eq!(status_of("", Action::Relayed), "2.0.0");
    }
}
