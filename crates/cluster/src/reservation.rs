//! Creation-guard reservations: an address held for one node while it creates an account.
//! Kept in the store so that a peer's reservation and this node's own creation exclude each
//! other through one atomic compare-and-swap.

use std::time::Duration;

use ds_directory::Directory;
use ds_store::{Store, Table, unix_now};
use serde::{Deserialize, Serialize};

use crate::Result;

/// Name of the store table.
pub const RESERVATIONS_TABLE: &str = "cluster.reservations";

/// An address held for `node` until `expires`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    pub address: String,
    /// Id of the node creating the address.
    pub node: String,
    /// Unix seconds; a reservation past this is dead and may be replaced.
    pub expires: i64,
}

/// What [`Directory::taken_as`] calls a mailing list.
pub(crate) const LIST: &str = "a mailing list";

/// Why a reservation was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The address is an account, alias or list here.
    Taken(&'static str),
    /// Another node holds a live reservation.
    Reserved(String),
}

#[derive(Debug, Clone)]
pub(crate) struct Reservations {
    table: Table<Reservation>,
}

impl Reservations {
    pub(crate) fn new(store: &Store) -> Result<Self> {
        Ok(Self {
            table: store.table(RESERVATIONS_TABLE)?,
        })
    }

    /// Holds `address` for `node` unless another node holds it or it exists here.
    ///
    /// The reservation is written first and the directory checked after, so a local
    /// creation that finishes between the two cannot slip through: it either sees our
    /// reservation or we see its account.
    pub(crate) fn reserve(
        &self,
        directory: &Directory,
        address: &str,
        node: &str,
        ttl: Duration,
    ) -> Result<std::result::Result<(), Refused>> {
        let now = unix_now();
        let expires = now.saturating_add(ttl.as_secs().max(1) as i64);
        let mut holder = None;
        self.table.update(address, |current| {
            holder = None;
            match current {
                Some(r) if r.node != node && r.expires > now => {
                    holder = Some(r.node.clone());
                    Some(r)
                }
                _ => Some(Reservation {
                    address: address.to_string(),
                    node: node.to_string(),
                    expires,
                }),
            }
        })?;
        if let Some(holder) = holder {
            return Ok(Err(Refused::Reserved(holder)));
        }
        if let Some(kind) = directory.taken_as(address)? {
            self.release(address, node)?;
            return Ok(Err(Refused::Taken(kind)));
        }
        Ok(Ok(()))
    }

    /// Drops the reservation if `node` holds it; `true` if one was dropped.
    pub(crate) fn release(&self, address: &str, node: &str) -> Result<bool> {
        let mut dropped = false;
        self.table.update(address, |current| {
            dropped = false;
            match current {
                Some(r) if r.node == node => {
                    dropped = true;
                    None
                }
                other => other,
            }
        })?;
        Ok(dropped)
    }

    /// The live reservation of `address`, if any.
    pub(crate) fn get(&self, address: &str) -> Result<Option<Reservation>> {
        let now = unix_now();
        Ok(self.table.get(address)?.filter(|r| r.expires > now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ds_directory::{Domain, Domains, HashCost};

    fn setup() -> (Store, Directory, Reservations) {
        let store = Store::temporary().unwrap();
        let domains = Domains::new(
            "example.com",
            vec![Domain {
                name: "example.com".into(),
                shared: true,
                addresses: vec![],
            }],
        )
        .unwrap();
        let dir = Directory::new(&store, domains)
            .unwrap()
            .with_hash_cost(HashCost {
                memory_kib: 64,
                iterations: 1,
            });
        let r = Reservations::new(&store).unwrap();
        (store, dir, r)
    }

    #[test]
    fn one_holder_at_a_time() {
        let (_s, dir, r) = setup();
        let ttl = Duration::from_secs(60);
        let a = "x@example.com";
        assert_eq!(r.reserve(&dir, a, "n1", ttl).unwrap(), Ok(()));
        assert_eq!(r.reserve(&dir, a, "n1", ttl).unwrap(), Ok(()), "refresh");
        assert_eq!(
            r.reserve(&dir, a, "n2", ttl).unwrap(),
            Err(Refused::Reserved("n1".into()))
        );
        assert!(!r.release(a, "n2").unwrap(), "not n2's to release");
        assert_eq!(r.get(a).unwrap().unwrap().node, "n1");
        assert!(r.release(a, "n1").unwrap());
        assert_eq!(r.reserve(&dir, a, "n2", ttl).unwrap(), Ok(()));
    }

    #[test]
    fn taken_addresses_and_dead_reservations() {
        let (_s, dir, r) = setup();
        dir.add_account("taken@example.com", "pw", 0).unwrap();
        assert_eq!(
            r.reserve(&dir, "taken@example.com", "n1", Duration::from_secs(60))
                .unwrap(),
            Err(Refused::Taken("an account"))
        );
        assert_eq!(r.get("taken@example.com").unwrap(), None, "no leftover");
        r.table
            .insert(
                "old@example.com",
                &Reservation {
                    address: "old@example.com".into(),
                    node: "n1".into(),
                    expires: unix_now() - 1,
                },
            )
            .unwrap();
        assert_eq!(r.get("old@example.com").unwrap(), None);
        assert_eq!(
            r.reserve(&dir, "old@example.com", "n2", Duration::from_secs(60))
                .unwrap(),
            Ok(())
        );
    }
}
