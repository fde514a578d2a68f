//! The creation guard (DESIGN.md §5): an account, alias or list is created only after every
//! peer agreed to hold its address for us, so two nodes creating one address never both
//! succeed and one address never names two things in the cluster.

use std::hash::BuildHasher;
use std::time::Duration;

use ds_directory::{Account, MailingList};

use crate::locator::Locator;
use crate::peer::Peer;
use crate::proto::{Refusal, ReleaseRequest, ReserveRequest};
use crate::reservation::Refused;
use crate::{DEFAULT_RESERVATION_TTL, Error, Result};

/// Rounds of a creation that meets a concurrent creation of the same address.
const MAX_ATTEMPTS: u32 = 6;

/// One round of the guard.
enum Attempt<T> {
    Done(T),
    /// Another node is creating the address right now.
    Contended {
        peer: String,
        reason: String,
    },
}

/// What one peer said to `Reserve`.
enum Answer {
    Granted,
    Taken(String),
    /// The peer keeps a mailing list of that name.
    TakenList(String),
    Reserved(String),
    Unreachable(String),
}

/// What is being created under the guard: only a list may share its address with lists
/// of the same name on peers (list sharing, DESIGN.md §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Creating {
    Account,
    Alias,
    List,
}

/// A random pause that grows with the attempt, so racing creators drift apart.
fn backoff(attempt: u32) -> Duration {
    let r = std::collections::hash_map::RandomState::new().hash_one(attempt);
    Duration::from_millis(20 + r % (120 * u64::from(attempt)))
}

impl Locator {
    /// Creates an account after every peer reserved its address (DESIGN.md §5).
    ///
    /// Refused with [`Error::Exists`] when the address exists here or on a peer, or another
    /// node keeps creating it; [`Error::Unavailable`] when a peer cannot be asked, unless
    /// `force` (then a warning is logged and the creation goes ahead).
    pub async fn create_account(
        &self,
        name: &str,
        password: &str,
        force: bool,
        now: i64,
    ) -> Result<Account> {
        let directory = self.inner.directory.clone();
        let password = password.to_string();
        self.create_guarded(name, force, Creating::Account, move |address| {
            directory.add_account(address, &password, now)
        })
        .await
    }

    /// Adds `alias` (a new address) to a local `account`, under the creation guard like an
    /// account, so one address never names two things in the cluster.
    pub async fn create_alias(&self, alias: &str, account: &str, force: bool) -> Result<()> {
        let directory = self.inner.directory.clone();
        let account = account.to_string();
        self.create_guarded(alias, force, Creating::Alias, move |address| {
            directory.add_alias(address, &account)
        })
        .await
    }

    /// Creates a mailing list under the creation guard: refused when a peer has the address
    /// as an account or alias; peers keeping a list of the same name are fine (list sharing).
    pub async fn create_list(&self, name: &str, force: bool) -> Result<MailingList> {
        let directory = self.inner.directory.clone();
        self.create_guarded(name, force, Creating::List, move |address| {
            directory.add_list(address)
        })
        .await
    }

    async fn create_guarded<T, F>(
        &self,
        name: &str,
        force: bool,
        creating: Creating,
        create: F,
    ) -> Result<T>
    where
        T: Send + 'static,
        F: Fn(&str) -> ds_directory::Result<T> + Clone + Send + 'static,
    {
        let address = self.inner.directory.served_address(name)?;
        let shared = self.shares(address.domain());
        let address = address.to_string();
        let mut attempt = 1;
        loop {
            match self
                .attempt_create(&address, force, shared, creating, create.clone())
                .await?
            {
                Attempt::Done(created) => {
                    // A "no node has it" cached here must not hide what now exists.
                    self.forget(&address).await;
                    return Ok(created);
                }
                Attempt::Contended { peer, reason } => {
                    if attempt >= MAX_ATTEMPTS {
                        return Err(Error::Exists {
                            address,
                            peer,
                            reason,
                        });
                    }
                    tracing::debug!(%address, %peer, %reason, attempt, "concurrent creation, retrying");
                    tokio::time::sleep(backoff(attempt)).await;
                    attempt += 1;
                }
            }
        }
    }

    async fn attempt_create<T, F>(
        &self,
        address: &str,
        force: bool,
        shared: bool,
        creating: Creating,
        create: F,
    ) -> Result<Attempt<T>>
    where
        T: Send + 'static,
        F: Fn(&str) -> ds_directory::Result<T> + Send + 'static,
    {
        let me = self.node_id().to_string();
        let local = &self.inner.reservations;
        match local.reserve(&self.inner.directory, address, &me, DEFAULT_RESERVATION_TTL)? {
            Ok(()) => {}
            Err(Refused::Taken(kind)) => {
                return Err(Error::Exists {
                    address: address.to_string(),
                    peer: me,
                    reason: format!("exists as {kind}"),
                });
            }
            Err(Refused::Reserved(holder)) => {
                return Ok(Attempt::Contended {
                    peer: me,
                    reason: format!("being created by {holder}"),
                });
            }
        }

        let peers: &[Peer] = if shared { &self.inner.peers } else { &[] };
        let answers = futures::future::join_all(peers.iter().map(|peer| {
            let request = ReserveRequest {
                address: address.to_string(),
                from_node: me.clone(),
                ttl_seconds: DEFAULT_RESERVATION_TTL.as_secs() as u32,
            };
            async move {
                let answer = match peer
                    .call(
                        "reserve",
                        request,
                        |mut c, r| async move { c.reserve(r).await },
                    )
                    .await
                {
                    Ok(reply) if reply.granted => Answer::Granted,
                    Ok(reply) if reply.refusal == i32::from(Refusal::Reserved) => {
                        Answer::Reserved(reply.reason)
                    }
                    Ok(reply) if reply.refusal == i32::from(Refusal::TakenList) => {
                        Answer::TakenList(reply.reason)
                    }
                    Ok(reply) => Answer::Taken(reply.reason),
                    Err(reason) => Answer::Unreachable(reason),
                };
                (peer, answer)
            }
        }))
        .await;

        let mut granted = vec![];
        let mut taken = None;
        let mut reserved = None;
        let mut unreachable = None;
        for (peer, answer) in answers {
            match answer {
                Answer::Granted => granted.push(peer),
                // The peer keeps a version of the same list: that is list sharing.
                Answer::TakenList(_) if creating == Creating::List => {}
                Answer::Taken(reason) | Answer::TakenList(reason) => {
                    taken.get_or_insert((peer.id.clone(), reason));
                }
                Answer::Reserved(reason) => {
                    reserved.get_or_insert((peer.id.clone(), reason));
                }
                Answer::Unreachable(reason) => {
                    if force {
                        tracing::warn!(%address, peer = %peer.id, %reason, ?creating, "creation forced past an unreachable peer");
                    } else {
                        unreachable.get_or_insert((peer.id.clone(), reason));
                    }
                }
            }
        }
        let refusal = if let Some((peer, reason)) = taken {
            Some(Err(Error::Exists {
                address: address.to_string(),
                peer,
                reason,
            }))
        } else if let Some((peer, reason)) = reserved {
            Some(Ok(Attempt::Contended { peer, reason }))
        } else {
            unreachable.map(|(peer, reason)| Err(Error::Unavailable { peer, reason }))
        };
        if let Some(refusal) = refusal {
            self.release_all(address, &granted).await;
            return refusal;
        }

        let name = address.to_string();
        // Argon2 (for an account) is CPU-bound and the store touches the disk: keep it off
        // the async workers.
        let created = tokio::task::spawn_blocking(move || create(&name))
            .await
            .map_err(|e| Error::Task(e.to_string()));
        self.release_all(address, &granted).await;
        Ok(Attempt::Done(created??))
    }

    /// Drops our reservation here and on the peers that granted one (best effort: they
    /// expire anyway).
    async fn release_all(&self, address: &str, granted: &[&Peer]) {
        let me = self.node_id().to_string();
        if let Err(e) = self.inner.reservations.release(address, &me) {
            tracing::warn!(%address, error = %e, "cannot release local reservation");
        }
        futures::future::join_all(granted.iter().map(|peer| {
            let request = ReleaseRequest {
                address: address.to_string(),
                from_node: me.clone(),
            };
            async move {
                if let Err(reason) = peer
                    .call("release", request, |mut c, r| async move {
                        c.release(r).await
                    })
                    .await
                {
                    tracing::warn!(%address, peer = %peer.id, %reason, "reservation not released; it will expire");
                }
            }
        }))
        .await;
    }
}
