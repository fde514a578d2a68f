//! The fixed replies of the server session, one place for DESIGN.md §4 and §9 codes.

pub(crate) const OK: &str = "250 2.0.0 OK\r\n";
pub(crate) const SENDER_OK: &str = "250 2.1.0 Sender OK\r\n";
pub(crate) const RCPT_OK: &str = "250 2.1.5 Recipient OK\r\n";
pub(crate) const DATA_GO: &str = "354 Start mail input; end with <CRLF>.<CRLF>\r\n";
pub(crate) const VRFY: &str =
    "252 2.1.5 Cannot VRFY user, but will accept message and attempt delivery\r\n";
pub(crate) const HELP: &str =
    "214 2.0.0 Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP STARTTLS AUTH\r\n";
pub(crate) const STARTTLS_GO: &str = "220 2.0.0 Ready to start TLS\r\n";
pub(crate) const AUTH_OK: &str = "235 2.7.0 Authentication successful\r\n";
pub(crate) const AUTH_CONTINUE: &str = "334 \r\n";

pub(crate) const UNKNOWN_USER: &str = "550 5.1.1 No such user here\r\n";
pub(crate) const UNKNOWN_SENDER: &str =
    "550 5.1.0 Sender address rejected: no such user in this domain\r\n";
pub(crate) const DISABLED: &str = "550 5.2.1 Mailbox disabled, not accepting messages\r\n";
pub(crate) const TEMPFAIL_LOOKUP: &str = "451 4.4.3 Address lookup failed, try again later\r\n";
pub(crate) const RELAY_DENIED: &str = "554 5.7.1 Relaying denied\r\n";
pub(crate) const EXTERNAL_DENIED: &str =
    "550 5.7.1 Forwarding outside this domain is not supported\r\n";
pub(crate) const TOO_MANY_RCPTS: &str = "452 4.5.3 Too many recipients\r\n";
pub(crate) const TOO_BIG: &str = "552 5.3.4 Message size exceeds fixed maximum message size\r\n";
pub(crate) const LINE_TOO_LONG: &str = "500 5.5.2 Line too long\r\n";
pub(crate) const UNKNOWN_COMMAND: &str = "500 5.5.1 Command unrecognized\r\n";
pub(crate) const NEED_MAIL: &str = "503 5.5.1 Need MAIL command first\r\n";
pub(crate) const NEED_RCPT: &str = "503 5.5.1 Need RCPT command first\r\n";
pub(crate) const NEED_HELO: &str = "503 5.5.1 Send EHLO or HELO first\r\n";
pub(crate) const NESTED_MAIL: &str = "503 5.5.1 Sender already specified\r\n";
pub(crate) const ALREADY_TLS: &str = "503 5.5.1 TLS already active\r\n";
pub(crate) const ALREADY_AUTH: &str = "503 5.5.1 Already authenticated\r\n";
pub(crate) const AUTH_IN_TX: &str = "503 5.5.1 AUTH not permitted during a mail transaction\r\n";
pub(crate) const NO_TLS: &str = "502 5.5.1 STARTTLS not available\r\n";
pub(crate) const NOT_IMPLEMENTED: &str = "502 5.5.1 Command not implemented\r\n";
pub(crate) const AUTH_FAILED: &str = "535 5.7.8 Authentication credentials invalid\r\n";
pub(crate) const AUTH_ENCRYPT: &str =
    "538 5.7.11 Encryption required for requested authentication mechanism\r\n";
pub(crate) const AUTH_MECH: &str = "504 5.5.4 Unrecognized authentication type\r\n";
pub(crate) const AUTH_CANCELLED: &str = "501 5.0.0 Authentication cancelled\r\n";
pub(crate) const AUTH_BAD_B64: &str = "501 5.5.2 Cannot decode response\r\n";
/// The data disk is below its free-space reserve (`limits.min_free_space`).
pub(crate) const NO_SPACE: &str = "452 4.3.1 Insufficient system storage, try again later\r\n";
pub(crate) const TEMP_LOCAL: &str = "451 4.3.0 Local error in processing, try again later\r\n";
pub(crate) const NO_BUDGET: &str =
    "452 4.3.1 Insufficient system resources (too many messages in flight), try again later\r\n";
pub(crate) const TIMEOUT: &str = "421 4.4.2 Idle timeout, closing connection\r\n";
pub(crate) const TOO_MANY_ERRORS: &str = "421 4.7.0 Too many errors, closing connection\r\n";
pub(crate) const SHUTTING_DOWN: &str = "421 4.3.2 Service shutting down\r\n";
pub(crate) const BAD_8BIT_ADDR: &str = "553 5.6.7 Non-ASCII address requires SMTPUTF8\r\n";
pub(crate) const MUST_STARTTLS: &str = "530 5.7.0 Must issue a STARTTLS command first\r\n";
pub(crate) const AUTH_REQUIRED: &str = "530 5.7.0 Authentication required\r\n";
pub(crate) const AUTH_TEMP: &str =
    "454 4.7.0 Temporary authentication failure, try again later\r\n";
pub(crate) const SENDER_NOT_OWNED: &str =
    "553 5.7.1 Sender address not owned by the authenticated user\r\n";
pub(crate) const FROM_NOT_OWNED: &str =
    "553 5.7.1 From: header address not owned by the authenticated user\r\n";
pub(crate) const HEADER_TOO_LARGE: &str =
    "553 5.7.1 Header section too large to check the From: address\r\n";
