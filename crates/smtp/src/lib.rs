//! ds-smtp: the SMTP side of a Domain Share node (DESIGN.md §6).
//!
//! - [`Smtp`]: the server session (ESMTP with PIPELINING, SIZE, 8BITMIME, ENHANCEDSTATUSCODES,
//!   STARTTLS, SMTPUTF8, and `AUTH PLAIN` for peer nodes), local delivery and queueing; on
//!   submission listeners (587/465) user AUTH PLAIN/LOGIN after TLS and the sender rules.
//! - [`QueueRunner`]: relays queued messages to the owner node's SMTP endpoint, with back-off, a
//!   single re-location on `550`, and an RFC 3464 DSN after the maximum queue age.
//! - Where addresses live is asked through `ds_access::Locate` (the cluster's `Locator` in the
//!   node, fakes in tests); its types are re-exported here.
//!
//! Reply codes follow DESIGN.md §4 and §9.

mod base64;
mod config;
mod data;
mod delivery;
pub mod dkim;
mod dsn;
mod dsn_params;
mod headers;
mod outbound;
mod queue;
mod relay;
mod reply;
mod session;
mod submission;

pub use config::{DEFAULT_BODIES_IN_FLIGHT, SmtpConfig};
pub use data::{DataEnd, DataReader};
/// The crate's modules name the shared lookup types as `crate::locate::…`.
use ds_access::locate;
pub use ds_access::{BoxFuture, ListKeeper, Locate, Location, Owner, Purpose};
pub use outbound::{OutboundConfig, TlsLevel};
pub use queue::QueueRunner;
pub use session::Smtp;

/// Prefix of the SASL authentication id a peer node relays with: `dshare-peer/<node-id>`.
pub const PEER_AUTH_PREFIX: &str = "dshare-peer/";

/// Everything that can go wrong in `ds-smtp` outside a client-facing reply.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] ds_store::Error),
    #[error(transparent)]
    Directory(#[from] ds_directory::Error),
    #[error(transparent)]
    Net(#[from] ds_net::Error),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The relay peer answered with a reply that ends the attempt.
    #[error("peer replied: {0}")]
    Reply(String),
    /// The relay peer broke the protocol or the attempt could not be made.
    #[error("relay: {0}")]
    Relay(String),
    #[error("background task failed: {0}")]
    Task(String),
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
