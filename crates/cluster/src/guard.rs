//! The creation guard (DESIGN.md §5): an account is created only after every peer agreed
//! to hold its address for us, so two nodes creating one address never both succeed.

use std::hash::BuildHasher;
use std::time::Duration;

use ds_directory::Account;

use crate::locator::Locator;
use crate::peer::Peer;
use crate::proto::{Refusal, ReleaseRequest, ReserveRequest};
use crate::reservation::Refused;
use crate::{DEFAULT_RESERVATION_TTL, Error, Result};

/// Rounds of a creation that meets a concurrent creation of the same address.
const MAX_ATTEMPTS: u32 = 6;

/// One round of the guard.
enum Attempt {
    Done(Account),
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
    Reserved(String),
    Unreachable(String),
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
        let address = self.inner.directory.served_address(name)?;
        let shared = self.shares(address.domain());
        let address = address.to_string();
        let mut attempt = 1;
        loop {
            match self
                .attempt_create(&address, password, force, shared, now)
                .await?
            {
                Attempt::Done(account) => return Ok(account),
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

    async fn attempt_create(
        &self,
        address: &str,
        password: &str,
        force: bool,
        shared: bool,
        now: i64,
    ) -> Result<Attempt> {
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
                Answer::Taken(reason) => {
                    taken.get_or_insert((peer.id.clone(), reason));
                }
                Answer::Reserved(reason) => {
                    reserved.get_or_insert((peer.id.clone(), reason));
                }
                Answer::Unreachable(reason) => {
                    if force {
                        tracing::warn!(%address, peer = %peer.id, %reason, "account creation forced past an unreachable peer");
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

        let directory = self.inner.directory.clone();
        let (name, pw) = (address.to_string(), password.to_string());
        // Argon2 is CPU-bound: keep it off the async workers.
        let created = tokio::task::spawn_blocking(move || directory.add_account(&name, &pw, now))
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
