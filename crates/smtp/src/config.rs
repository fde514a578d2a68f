//! [`SmtpConfig`]: the SMTP server's and the queue's settings (DESIGN.md §9 limits).

use std::fmt;
use std::time::Duration;

/// Default node-wide budget for message bodies in flight (octets).
pub const DEFAULT_BODIES_IN_FLIGHT: u64 = 256 * 1024 * 1024;

/// Settings of the SMTP server and the relay queue. `Default` gives the DESIGN.md values.
#[derive(Clone)]
pub struct SmtpConfig {
    /// This node's host name: the greeting, `Received: by`, DSN `Reporting-MTA`.
    pub hostname: String,
    /// This node's id; the peer AUTH identity is `dshare-peer/<node_id>`.
    pub node_id: String,
    /// Largest message accepted (octets, before our trace headers); advertised as `SIZE`.
    pub max_message_size: usize,
    /// Recipients per transaction; over it `452 4.5.3`.
    pub max_recipients: usize,
    /// Longest command line, CRLF included; over it `500 5.5.2`.
    pub max_line: usize,
    /// Bound on a whole command line (from when the session waits for it to its LF, however
    /// slowly its octets come) and on each wait for input during DATA; then `421 4.4.2`.
    pub idle_timeout: Duration,
    /// Bound on a whole DATA transfer (from `354` to the final dot), however slowly it comes;
    /// then `421 4.4.2` and nothing is kept. RFC 5321 §4.5.3.2 asks at least 10 minutes of the
    /// client for the reply after it, which this leaves to the client.
    pub data_timeout: Duration,
    /// Refuse `MAIL FROM` senders in a shared domain that no node owns (`550 5.1.0`).
    pub sender_check: bool,
    /// A queued message older than this is bounced to its sender (RFC 3464 DSN).
    pub max_queue_age: Duration,
    /// A message queued this long gets one delay DSN (RFC 3461 `NOTIFY=DELAY`, the default);
    /// zero: none (Postfix's `delay_warning_time`).
    pub delay_warning: Duration,
    /// First retry delay; doubled per attempt up to `retry_max`. Whole seconds (the queue keeps
    /// Unix seconds); at least one second is used.
    pub retry_base: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
    /// The cluster secret, the password of peer AUTH in both directions. Empty: peers cannot
    /// authenticate and relays do not authenticate. Never logged.
    pub cluster_secret: String,
    /// Bound on each step of a relay connection (connect, each reply, each write, TLS handshake); the
    /// message transfer itself gets ten times as long.
    pub relay_timeout: Duration,
    /// Commands with an error reply before the session is closed with `421`.
    pub max_errors: usize,
    /// The node-wide budget for message bodies in flight (shared with IMAP APPEND); a message
    /// that cannot get its share is refused with `452 4.3.1`.
    pub body_budget: ds_net::BodyBudget,
    /// `require_tls`: where AUTH is refused before STARTTLS (`538 5.7.11`, not offered in
    /// EHLO). Default: required, loopback listeners exempt. Shared by every listener (MX
    /// intake, submission).
    pub tls_policy: ds_net::TlsPolicy,
    /// The node's login throttle, shared with POP3 and IMAP (submission AUTH counts failures
    /// in it too).
    pub throttle: std::sync::Arc<ds_access::LoginThrottle>,
    /// The node's bounded password checker; `None`: one of the service's own.
    pub passwords: Option<std::sync::Arc<ds_access::PasswordChecker>>,
    /// Submission: the `Received` line names the client's IP address (default off: only its
    /// EHLO name and that it authenticated).
    pub reveal_client: bool,
    /// Submission: domains whose users may use any envelope sender and `From:` (the sender
    /// rules of DESIGN.md §6 are off for them).
    pub any_sender_domains: Vec<String>,
    /// Delivery to recipients outside every served domain (MX lookup); `None`: such
    /// recipients stay queued until they expire.
    pub outbound: Option<crate::OutboundConfig>,
    /// DKIM keys: submitted mail and DSNs from these domains are signed before they go out.
    pub dkim: std::sync::Arc<crate::dkim::Dkim>,
}

impl Default for SmtpConfig {
    fn default() -> Self {
        Self {
            hostname: "localhost".into(),
            node_id: "node".into(),
            max_message_size: 50 * 1024 * 1024,
            max_recipients: 100,
            max_line: 1000,
            idle_timeout: Duration::from_secs(5 * 60),
            data_timeout: Duration::from_secs(10 * 60),
            sender_check: true,
            max_queue_age: Duration::from_secs(5 * 24 * 3600),
            delay_warning: Duration::from_secs(4 * 3600),
            retry_base: Duration::from_secs(60),
            retry_max: Duration::from_secs(3600),
            cluster_secret: String::new(),
            relay_timeout: Duration::from_secs(60),
            max_errors: 20,
            body_budget: ds_net::BodyBudget::new(DEFAULT_BODIES_IN_FLIGHT),
            tls_policy: ds_net::TlsPolicy::default(),
            throttle: std::sync::Arc::new(ds_access::LoginThrottle::default()),
            passwords: None,
            reveal_client: false,
            any_sender_domains: Vec::new(),
            outbound: None,
            dkim: Default::default(),
        }
    }
}

impl fmt::Debug for SmtpConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SmtpConfig")
            .field("hostname", &self.hostname)
            .field("node_id", &self.node_id)
            .field("max_message_size", &self.max_message_size)
            .field("max_recipients", &self.max_recipients)
            .field("max_line", &self.max_line)
            .field("idle_timeout", &self.idle_timeout)
            .field("data_timeout", &self.data_timeout)
            .field("sender_check", &self.sender_check)
            .field("max_queue_age", &self.max_queue_age)
            .field("delay_warning", &self.delay_warning)
            .field("retry_base", &self.retry_base)
            .field("retry_max", &self.retry_max)
            .field("cluster_secret", &"<redacted>")
            .field("relay_timeout", &self.relay_timeout)
            .field("max_errors", &self.max_errors)
            .field("body_budget", &self.body_budget)
            .field("tls_policy", &self.tls_policy)
            .field("reveal_client", &self.reveal_client)
            .field("any_sender_domains", &self.any_sender_domains)
            .field("outbound", &self.outbound)
            .field("dkim", &self.dkim)
            .finish_non_exhaustive()
    }
}

impl SmtpConfig {
    /// Delay before retry number `attempts` (1-based): `retry_base * 2^(attempts-1)`, capped.
    pub fn backoff(&self, attempts: u32) -> Duration {
        let base = self.retry_base.max(Duration::from_secs(1));
        let factor = 1u32 << attempts.saturating_sub(1).min(20);
        base.saturating_mul(factor).min(self.retry_max.max(base))
    }

    /// How long an owner remembers a relayed message it delivered (#13 point 18): longer
    /// than a sender may retry it (the maximum queue age and one more back-off), with a day's
    /// margin for clocks and for peers configured with a somewhat longer age.
    pub fn relay_mark_retention(&self) -> Duration {
        self.max_queue_age
            .saturating_add(self.retry_max)
            .saturating_add(Duration::from_secs(24 * 3600))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let c = SmtpConfig::default();
        let secs: Vec<u64> = (1..=8).map(|a| c.backoff(a).as_secs()).collect();
        assert_eq!(secs, [60, 120, 240, 480, 960, 1920, 3600, 3600]);
        assert_eq!(c.backoff(1000).as_secs(), 3600);
        assert!(c.relay_mark_retention() > c.max_queue_age + c.retry_max);
        assert!(!format!("{c:?}").contains("secret\": \""));
    }
}
