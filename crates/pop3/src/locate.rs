//! [`OwnerLocator`]: the one question the POP3 front asks the cluster — which peer owns an
//! address of a shared domain, and at which POP3 endpoint. `ds_cluster::Locator` answers it in the
//! node; tests may answer it with a fixed table.

use std::future::Future;
use std::pin::Pin;

/// A boxed future, for the object-safe [`OwnerLocator`].
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The peer that owns an account, as far as POP3 cares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pop3Owner {
    /// The owner's node id.
    pub node: String,
    /// The address to log in with on the owner (after its aliases and Router records).
    pub canonical: String,
    /// The owner's POP3 endpoint, `host:port`.
    pub pop3: String,
}

/// Where an address of a shared domain lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OwnerLookup {
    /// An account on a peer: forward the session there.
    Remote(Pop3Owner),
    /// Nothing a POP3 login can open (no node has it, a list, a disabled account, …): the login
    /// fails like a bad password. The text is for the log.
    NotFound(String),
    /// No answer now (a peer could not be asked): `-ERR [SYS/TEMP]`.
    TempFail(String),
}

/// Finds the owner of an address this node does not have.
pub trait OwnerLocator: Send + Sync + 'static {
    /// Where `address` lives.
    fn locate_owner<'a>(&'a self, address: &'a str) -> BoxFuture<'a, OwnerLookup>;

    /// Like [`OwnerLocator::locate_owner`], but first forget what is cached about `address`: the
    /// owner we were told about said it does not have it (DESIGN.md §4.5).
    fn relocate_owner<'a>(&'a self, address: &'a str) -> BoxFuture<'a, OwnerLookup> {
        self.locate_owner(address)
    }
}

/// A locator for a node without peers: every address not stored here is unknown.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoPeers;

impl OwnerLocator for NoPeers {
    fn locate_owner<'a>(&'a self, _address: &'a str) -> BoxFuture<'a, OwnerLookup> {
        Box::pin(async { OwnerLookup::NotFound("no peers".into()) })
    }
}
