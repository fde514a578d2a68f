//! [`OwnerLocator`] for the cluster's [`Locator`]: the node passes its Locator to [`crate::Pop3`].

use ds_cluster::{Kind, Location, Locator, Purpose};

use crate::locate::{BoxFuture, OwnerLocator, OwnerLookup, Pop3Owner};

/// What a POP3 login can do with a location.
pub(crate) fn lookup_of(location: Location) -> OwnerLookup {
    match location {
        Location::Remote(owner) if owner.kind != Kind::Account => {
            OwnerLookup::NotFound(format!("a mailing list on {}", owner.node))
        }
        Location::Remote(owner) if !owner.can_receive => {
            OwnerLookup::NotFound(format!("a disabled account on {}", owner.node))
        }
        Location::Remote(owner) if owner.pop3.is_empty() => {
            OwnerLookup::NotFound(format!("{} has no POP3 endpoint", owner.node))
        }
        Location::Remote(owner) => OwnerLookup::Remote(Pop3Owner {
            node: owner.node,
            canonical: owner.canonical,
            pop3: owner.pop3,
        }),
        Location::TempFail(reason) => OwnerLookup::TempFail(reason),
        other => OwnerLookup::NotFound(format!("located as {}", other.outcome())),
    }
}

impl OwnerLocator for Locator {
    fn locate_owner<'a>(&'a self, address: &'a str) -> BoxFuture<'a, OwnerLookup> {
        Box::pin(async move { lookup_of(self.locate(address, Purpose::Login).await) })
    }

    fn relocate_owner<'a>(&'a self, address: &'a str) -> BoxFuture<'a, OwnerLookup> {
        Box::pin(async move { lookup_of(self.relocate(address, Purpose::Login).await) })
    }
}

#[cfg(test)]
mod tests {
    use ds_cluster::Owner;

    use super::*;

    fn owner(kind: Kind, can_receive: bool) -> Owner {
        Owner {
            node: "office-b".into(),
            canonical: "bob@company.com".into(),
            kind,
            can_receive,
            smtp: "b:25".into(),
            pop3: "b:110".into(),
            imap: "b:143".into(),
        }
    }

    #[test]
    fn only_enabled_remote_accounts_are_forwarded() {
        assert_eq!(
            lookup_of(Location::Remote(owner(Kind::Account, true))),
            OwnerLookup::Remote(Pop3Owner {
                node: "office-b".into(),
                canonical: "bob@company.com".into(),
                pop3: "b:110".into(),
            })
        );
        assert!(matches!(
            lookup_of(Location::Remote(owner(Kind::List, true))),
            OwnerLookup::NotFound(_)
        ));
        assert!(matches!(
            lookup_of(Location::Remote(owner(Kind::Account, false))),
            OwnerLookup::NotFound(_)
        ));
        assert!(matches!(
            lookup_of(Location::Unknown),
            OwnerLookup::NotFound(_)
        ));
        assert_eq!(
            lookup_of(Location::TempFail("peer down".into())),
            OwnerLookup::TempFail("peer down".into())
        );
    }
}
