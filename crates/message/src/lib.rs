//! ds-message: what a stored message looks like to IMAP (RFC 3501), with no I/O.
//!
//! - [`mutf7`]: modified UTF-7 mailbox names (RFC 3501 §5.1.3).

pub mod mutf7;
