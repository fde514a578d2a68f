//! [`RecipientLocator`]: what the SMTP side asks of the cluster's `Locator` (DESIGN.md §4).
//! Kept narrow so the session and the queue can be tested with a fake, and so the cluster crate
//! can change inside without touching SMTP.

use std::future::Future;
use std::pin::Pin;

/// A boxed, sendable future (the trait is used as `dyn`).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why an address is located (for the Locator's logs and limits; never changes the answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// `RCPT TO`, a queued recipient, a DSN's recipient.
    Rcpt,
    /// `MAIL FROM` check.
    Sender,
}

/// The peer node that owns an address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// The owner's node id.
    pub node: String,
    /// The address after the owner's aliases and Router records.
    pub canonical: String,
    /// True if the address is a mailing list on the owner.
    pub is_list: bool,
    /// False for a disabled account.
    pub can_receive: bool,
    /// The owner's SMTP endpoint, `host:port`.
    pub smtp: String,
}

/// Where an address lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// An account stored on this node (canonical address).
    Local { address: String, enabled: bool },
    /// A mailing list kept on this node.
    LocalList(String),
    /// An address owned by a peer.
    Remote(Owner),
    /// No node has it (or a Router error record refuses it).
    Unknown,
    /// The address (after routing) is in a domain this node does not serve.
    External(String),
    /// The question could not be answered now (a peer was unreachable).
    TempFail(String),
}

/// A peer that keeps a version of a mailing list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListKeeper {
    /// Its node id.
    pub node: String,
    /// Its SMTP endpoint, `host:port`.
    pub smtp: String,
}

/// The cluster's view of addresses, as the SMTP server needs it.
pub trait RecipientLocator: Send + Sync + 'static {
    /// Where `address` (normalised, full) lives: local store, cache, then peers.
    fn locate<'a>(&'a self, address: &'a str, purpose: Purpose) -> BoxFuture<'a, Location>;

    /// Drop any cached owner of `address`, then locate it again (after an owner answered
    /// "no such user").
    fn relocate<'a>(&'a self, address: &'a str) -> BoxFuture<'a, Location>;

    /// The peers (never this node) that keep a version of the list `list`. Peers that cannot be
    /// asked are left out (and logged by the implementation).
    fn list_keepers<'a>(&'a self, list: &'a str) -> BoxFuture<'a, Vec<ListKeeper>>;
}
