//! [`Locate`]: the one question every protocol front asks the cluster — where does an address
//! live (DESIGN.md §4) — in the narrow form SMTP, POP3 and IMAP need. `ds_cluster::Locator`
//! answers it in the node (see `cluster.rs`); [`NoPeers`] answers it for a node without peers and
//! in tests; tests may also answer it with a fixed table. The protocol crates see these types only,
//! never the cluster crate's, so the cluster can change inside without touching them.

use std::future::Future;
use std::pin::Pin;

pub use ds_cluster::FanoutBudget;

/// A boxed, sendable future (the trait is used as `dyn`).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why an address is located (for the Locator's logs and limits; never changes the answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// `RCPT TO`, a queued recipient, a DSN's recipient.
    Rcpt,
    /// `MAIL FROM` check.
    Sender,
    /// A POP3 or IMAP login (or a submission AUTH).
    Login,
}

/// A login protocol, to pick an owner's endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    Smtp,
    Pop3,
    Imap,
}

impl Service {
    /// Lower-case protocol name, for logs.
    pub fn name(self) -> &'static str {
        match self {
            Service::Smtp => "smtp",
            Service::Pop3 => "pop3",
            Service::Imap => "imap",
        }
    }
}

/// The peer node that owns an address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// The owner's node id.
    pub node: String,
    /// The address after the owner's aliases and Router records: deliver / log in with it.
    pub canonical: String,
    /// True if the address is a mailing list on the owner.
    pub is_list: bool,
    /// False for a disabled account.
    pub can_receive: bool,
    /// The owner's SMTP endpoint, `host:port`.
    pub smtp: String,
    /// The owner's POP3 endpoint, `host:port` (empty: none).
    pub pop3: String,
    /// The owner's IMAP endpoint, `host:port` (empty: none).
    pub imap: String,
}

impl Owner {
    /// The owner's endpoint for `service`, `host:port` (empty: it does not serve it).
    pub fn endpoint(&self, service: Service) -> &str {
        match service {
            Service::Smtp => &self.smtp,
            Service::Pop3 => &self.pop3,
            Service::Imap => &self.imap,
        }
    }
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
    /// No node has it.
    Unknown,
    /// A Router `error:text` record (or a routing loop, or a name that is not valid) refuses it:
    /// SMTP answers `550 5.1.1 <text>` (sanitised), a login fails as for an unknown name.
    Refused(String),
    /// The address (after routing) is in a domain this node does not serve.
    External(String),
    /// The question could not be answered now (a peer was unreachable).
    TempFail(String),
}

impl Location {
    /// What a login for `service` can do with this location: only an enabled account on a peer
    /// that serves `service` is forwarded.
    pub fn for_login(self, service: Service) -> LoginOwner {
        match self {
            Location::Remote(owner) if owner.is_list => {
                LoginOwner::NotFound(format!("a mailing list on {}", owner.node))
            }
            Location::Remote(owner) if !owner.can_receive => {
                LoginOwner::NotFound(format!("a disabled account on {}", owner.node))
            }
            Location::Remote(owner) if owner.endpoint(service).is_empty() => {
                LoginOwner::NotFound(format!("{} has no {} endpoint", owner.node, service.name()))
            }
            Location::Remote(owner) => LoginOwner::Remote(owner),
            Location::TempFail(reason) => LoginOwner::TempFail(reason),
            Location::Local { .. } => LoginOwner::NotFound("located on this node".into()),
            Location::LocalList(_) => LoginOwner::NotFound("a mailing list on this node".into()),
            Location::Unknown => LoginOwner::NotFound("unknown in the cluster".into()),
            Location::Refused(text) => LoginOwner::NotFound(format!("refused: {text}")),
            Location::External(a) => LoginOwner::NotFound(format!("outside the cluster: {a}")),
        }
    }
}

/// Where a login for an address this node does not have goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginOwner {
    /// An enabled account on a peer that serves the protocol: forward the session there.
    Remote(Owner),
    /// Nothing a login can open (no node has it, a list, a disabled account, …): the login fails
    /// like a bad password. The text is for the log.
    NotFound(String),
    /// No answer now (a peer could not be asked): `-ERR [SYS/TEMP]`, `NO [UNAVAILABLE]`.
    TempFail(String),
}

/// The owner's answer to a password check for one of its accounts (Minger `Authenticate`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OwnerCheck {
    /// The password is right and the account enabled; the owner's canonical address.
    Ok(String),
    /// Wrong password, unknown or disabled account (the owner counted the failure).
    Bad,
    /// No answer now (owner unreachable, busy, throttling): a temporary error, never "bad
    /// password". The text is for the log.
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

/// The cluster's view of addresses, as the protocol fronts need it.
pub trait Locate: Send + Sync + 'static {
    /// Where `address` (normalised, full) lives: local store, cache, then peers.
    fn locate<'a>(&'a self, address: &'a str, purpose: Purpose) -> BoxFuture<'a, Location>;

    /// Drop any cached owner of `address`, then locate it again: the owner we were told about
    /// answered "no such user" (DESIGN.md §4.5).
    fn relocate<'a>(&'a self, address: &'a str, purpose: Purpose) -> BoxFuture<'a, Location>;

    /// The peers (never this node) that keep a version of the list `list`. Peers that cannot be
    /// asked are left out (and logged by the implementation).
    fn list_keepers<'a>(&'a self, list: &'a str) -> BoxFuture<'a, Vec<ListKeeper>>;

    /// A fresh budget of uncached peer fan-outs for one client connection (DESIGN.md §9):
    /// make one at accept and pass it to every client-driven lookup ([`Locate::locate_bounded`],
    /// [`Locate::locate_login_bounded`]). Unlimited unless the implementation bounds it.
    fn fanout_budget(&self) -> FanoutBudget {
        FanoutBudget::unlimited()
    }

    /// Like [`Locate::locate`], for a client-driven lookup: one that would ask the peers takes a
    /// fan-out from `budget` and is `TempFail` when none is left. Authenticated relay hops, the
    /// queue runner and operators use [`Locate::locate`] (unbounded).
    fn locate_bounded<'a>(
        &'a self,
        address: &'a str,
        purpose: Purpose,
        budget: &'a FanoutBudget,
    ) -> BoxFuture<'a, Location> {
        let _ = budget;
        self.locate(address, purpose)
    }

    /// Like [`Locate::list_keepers`], but `None` when a peer could not be asked (it may keep a
    /// version of the list): the caller keeps the post queued and asks again later rather than
    /// skipping that peer's copy.
    fn list_keepers_checked<'a>(&'a self, list: &'a str) -> BoxFuture<'a, Option<Vec<ListKeeper>>> {
        Box::pin(async move { Some(self.list_keepers(list).await) })
    }

    /// Where a `service` login for `address` (not stored here) goes.
    fn locate_login<'a>(&'a self, address: &'a str, service: Service) -> BoxFuture<'a, LoginOwner> {
        Box::pin(async move {
            self.locate(address, Purpose::Login)
                .await
                .for_login(service)
        })
    }

    /// [`Locate::locate_login`] within a connection's fan-out `budget`.
    fn locate_login_bounded<'a>(
        &'a self,
        address: &'a str,
        service: Service,
        budget: &'a FanoutBudget,
    ) -> BoxFuture<'a, LoginOwner> {
        Box::pin(async move {
            self.locate_bounded(address, Purpose::Login, budget)
                .await
                .for_login(service)
        })
    }

    /// Asks `owner` (a peer) to check `password` for its account `address` on behalf of a
    /// client at `client_ip` (a submission login that arrived here). Only over TLS verified
    /// against the cluster CA; the owner applies its own throttle. Without peers: `TempFail`.
    fn authenticate<'a>(
        &'a self,
        owner: &'a Owner,
        address: &'a str,
        password: &'a str,
        client_ip: std::net::IpAddr,
    ) -> BoxFuture<'a, OwnerCheck> {
        let _ = (address, password, client_ip);
        Box::pin(async move { OwnerCheck::TempFail(format!("cannot ask {}", owner.node)) })
    }

    /// Like [`Locate::locate_login`], after forgetting what is cached about `address`.
    fn relocate_login<'a>(
        &'a self,
        address: &'a str,
        service: Service,
    ) -> BoxFuture<'a, LoginOwner> {
        Box::pin(async move {
            self.relocate(address, Purpose::Login)
                .await
                .for_login(service)
        })
    }
}

/// A locator for a node without peers (and for tests): every address it is asked about is
/// unknown, and no peer keeps a list. (The protocol fronts ask only about addresses their own
/// directory does not have.)
#[derive(Clone, Copy, Debug, Default)]
pub struct NoPeers;

impl Locate for NoPeers {
    fn locate<'a>(&'a self, _address: &'a str, _purpose: Purpose) -> BoxFuture<'a, Location> {
        Box::pin(async { Location::Unknown })
    }

    fn relocate<'a>(&'a self, address: &'a str, purpose: Purpose) -> BoxFuture<'a, Location> {
        self.locate(address, purpose)
    }

    fn list_keepers<'a>(&'a self, _list: &'a str) -> BoxFuture<'a, Vec<ListKeeper>> {
        Box::pin(async { Vec::new() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(is_list: bool, can_receive: bool) -> Owner {
        Owner {
            node: "office-b".into(),
            canonical: "bob@company.com".into(),
            is_list,
            can_receive,
            smtp: "b:25".into(),
            pop3: "b:110".into(),
            imap: String::new(),
        }
    }

    #[test]
    fn only_enabled_remote_accounts_with_the_service_are_logged_into() {
        assert_eq!(
            Location::Remote(owner(false, true)).for_login(Service::Pop3),
            LoginOwner::Remote(owner(false, true))
        );
        for (location, service) in [
            (Location::Remote(owner(false, true)), Service::Imap),
            (Location::Remote(owner(true, true)), Service::Pop3),
            (Location::Remote(owner(false, false)), Service::Pop3),
            (Location::Unknown, Service::Pop3),
            (Location::External("x@y.org".into()), Service::Imap),
        ] {
            assert!(matches!(
                location.for_login(service),
                LoginOwner::NotFound(_)
            ));
        }
        assert_eq!(
            Location::TempFail("peer down".into()).for_login(Service::Imap),
            LoginOwner::TempFail("peer down".into())
        );
    }

    #[tokio::test]
    async fn no_peers_knows_nothing() {
        let l: &dyn Locate = &NoPeers;
        assert_eq!(l.locate("a@b.c", Purpose::Rcpt).await, Location::Unknown);
        assert!(matches!(
            l.locate_login("a@b.c", Service::Imap).await,
            LoginOwner::NotFound(_)
        ));
        assert!(l.list_keepers("team@b.c").await.is_empty());
    }
}
