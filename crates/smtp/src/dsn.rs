//! RFC 3464 delivery status notifications: `multipart/report; report-type=delivery-status` with a
//! human-readable part, a `message/delivery-status` part and the original headers
//! (`text/rfc822-headers`), built with mail-builder.

use ds_store::queue::QueueEntry;
use mail_builder::MessageBuilder;
use mail_builder::headers::content_type::ContentType;
use mail_builder::headers::date::Date;
use mail_builder::headers::raw::Raw;
use mail_builder::mime::MimePart;

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

/// `5.x.y` status for a reply text like `RCPT: 550 5.1.1 ...`, else `5.0.0`.
fn status_of(reason: &str) -> String {
    reason
        .split_whitespace()
        .find(|w| {
            let parts: Vec<&str> = w.split('.').collect();
            parts.len() == 3
                && parts[0] == "5"
                && parts
                    .iter()
                    .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        })
        .unwrap_or(if reason.starts_with("gave up") {
            "4.4.7"
        } else {
            "5.0.0"
        })
        .to_string()
}

/// The DSN for `failed` `(recipient, reason)` pairs of `entry`, addressed to its sender.
pub(crate) fn build(
    hostname: &str,
    entry: &QueueEntry,
    failed: &[(String, String)],
    original_headers: &str,
) -> Vec<u8> {
    let now = ds_store::unix_now();
    let mut text = format!(
        "This is the mail system at {hostname}.\r\n\r\n\
         Your message could not be delivered to the following recipients:\r\n\r\n"
    );
    for (rcpt, why) in failed {
        text.push_str(&format!("  <{rcpt}>: {}\r\n", one_line(why)));
    }
    let mut status = format!(
        "Reporting-MTA: dns; {hostname}\r\nArrival-Date: {}\r\n",
        Date::new(entry.created).to_rfc822()
    );
    if let Some(envid) = &entry.envid {
        status.push_str(&format!("Original-Envelope-Id: {envid}\r\n"));
    }
    for (rcpt, why) in failed {
        let code = status_of(why);
        // An expired message (gave up) is a permanent failure of a transient condition.
        let code = if code.starts_with('4') {
            "5.4.7".to_string()
        } else {
            code
        };
        status.push_str(&format!(
            "\r\nFinal-Recipient: rfc822; {rcpt}\r\nAction: failed\r\nStatus: {code}\r\n\
             Diagnostic-Code: smtp; {}\r\nLast-Attempt-Date: {}\r\n",
            one_line(why),
            Date::new(now).to_rfc822()
        ));
    }
    let parts = vec![
        MimePart::new(ContentType::new("text/plain"), text),
        MimePart::new(
            ContentType::new("message/delivery-status"),
            status.into_bytes(),
        )
        .transfer_encoding("7bit"),
        MimePart::new(
            ContentType::new("text/rfc822-headers"),
            original_headers.as_bytes().to_vec(),
        )
        .transfer_encoding("8bit"),
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
        .to(entry.sender.as_str())
        .subject("Undelivered Mail Returned to Sender")
        .header("Auto-Submitted", Raw::new("auto-replied"))
        .date(Date::new(now))
        .body(report)
        .write_to_vec()
        .unwrap_or_default()
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
            sender: "alice@company.com".into(),
            recipients: vec![QueuedRecipient::new("bob@company.com")],
            created: 1_700_000_000,
            next_attempt: 0,
            attempts: 3,
            last_error: None,
            size: 10,
            hop: false,
            envid: None,
            body: None,
            prefix: String::new(),
        };
        let headers = header_part(b"Subject: hi\r\nFrom: a@b\r\n\r\nbody\r\n");
        assert_eq!(headers, "Subject: hi\r\nFrom: a@b\r\n");
        let dsn = build(
            "mx.company.com",
            &entry,
            &[(
                "bob@company.com".into(),
                "RCPT: 550 5.1.1 no such user".into(),
            )],
            &headers,
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
        assert_eq!(status_of("gave up after 3 attempts"), "4.4.7");
    }
}
