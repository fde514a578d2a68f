//! ds-access: what every login protocol of a node shares (DESIGN.md §2, §7) — the layer between
//! the protocol fronts (`ds-smtp`, `ds-pop3`, `ds-imap`) and the cluster.
//!
//! - [`locate`]: [`Locate`], the one interface over the cluster's `Locator` (implemented for
//!   `ds_cluster::Locator`; [`NoPeers`] for a node without peers and tests), with the owner's
//!   endpoints per protocol and [`Location::for_login`].
//! - [`throttle`]: [`LoginThrottle`], growing delays after failed logins per IP and per account,
//!   one per node for every protocol.
//! - [`proof`]: the peer proof of a forwarded session, an HMAC under a [`ProofKey`] over the
//!   owner's greeting nonce and the forwarded fields.
//! - [`owner`]: connecting to an owner with timeouts, line replies, STARTTLS verified against the
//!   cluster CA.
//! - [`forward`]: passing pipelined bytes on and splicing a logged-in session.
//! - [`sasl`]: SASL PLAIN decoding and [`sasl::Secret`], for every login protocol.
//! - [`OwnerPasswords`]: the owner's side of Minger `Authenticate` (a peer asks this node to
//!   check a password of one of its accounts); [`Locate::authenticate`] is the asking side.
//! - [`lock`]: [`MailboxLocks`], exclusive in-process locks by name (POP3 maildrops, IMAP
//!   mailboxes).
//! - [`warm`]: [`WarmPool`], connections to owners opened ahead of need (TLS up, greeting
//!   read), so a forwarded login costs one round trip.
//! - [`imap_client`]: the IMAP forwarding dialogue with the owner (`STARTTLS`, `ID` with the
//!   proof, `LOGIN`), and [`imap_client::verify_imap_id`] for the owner side.
//! - [`imap_relay`]: a forwarded IMAP session after its login, whose owner link is kept for
//!   the next login when the client logs out.
//!
//! The byte splice itself stays in `ds-net` ([`ds_net::splice`]): it is stream mechanics with no
//! knowledge of owners or protocols, next to the stream type it is tuned for.

mod authority;
mod cluster;
mod error;
pub mod forward;
pub mod imap_client;
pub mod imap_relay;
pub mod locate;
pub mod lock;
pub mod owner;
pub mod passwords;
pub mod proof;
pub mod sasl;
pub mod throttle;
pub mod warm;

pub use authority::OwnerPasswords;
pub use error::{Error, Result};
pub use forward::{Copied, splice_session};
pub use locate::{
    BoxFuture, FanoutBudget, ListKeeper, Locate, Location, LoginOwner, NoPeers, Owner, OwnerCheck,
    Purpose, Service,
};
pub use lock::{MailboxGuard, MailboxLocks};
pub use passwords::{Check, CheckerConfig, PasswordChecker};
pub use proof::ProofKey;
pub use throttle::{LoginThrottle, ThrottleConfig, ip_key};
pub use warm::{Loan, WarmPool};
