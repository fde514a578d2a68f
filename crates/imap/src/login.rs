//! Login: DESIGN.md §3–§4 resolution of the name (`@`, `%`, SNI, multihoming, Router) and the
//! password check, exactly as POP3 does it.
//!
//! The throttle and the owner lookup are the node's shared ones from ds-access. Accounts owned by
//! a peer are forwarded ([`forward`]): the owner checks the password, and its session is spliced
//! with the client's. A session that was itself forwarded (a verified `ID`) is never forwarded
//! again: a login for an account this node does not have gets
//! [`ds_access::imap_client::NOT_HERE_TEXT`].

use std::net::IpAddr;

use ds_access::imap_client::{self, OwnerLogin, OwnerLoginError, OwnerSession, OwnerTls, Timeouts};
pub use ds_access::sasl::{PlainCredentials, Secret, decode_plain};
use ds_access::{Check, LoginOwner, Owner, Service};
use ds_directory::{Outcome, ResolveContext};
use ds_net::{ConnContext, TlsConnector};

use crate::{Imap, count_login};

/// What a login attempt came to.
#[derive(Debug)]
pub enum LoginOutcome {
    /// Logged in to a local account (its canonical address).
    Local(String),
    /// Bad name or password, unknown user, list, …: `NO [AUTHENTICATIONFAILED]`.
    Failed,
    /// The owner of the account, a peer, accepted the login: answer the client with the owner's
    /// capabilities, then splice.
    Forwarded(Box<OwnerSession>, Owner),
    /// A forwarded session asked for an account this node does not have:
    /// `NO [AUTHENTICATIONFAILED]` + [`NOT_HERE_TEXT`], so the front node locates once more.
    NotHere,
    /// The owner is down or no answer now: `NO [UNAVAILABLE]`.
    Unavailable,
}

/// Who is logging in: the connection, the address failed logins count against (the original
/// client's for a forwarded session), whether the session was forwarded to us, and its id.
#[derive(Debug, Clone, Copy)]
pub struct Attempt<'a> {
    /// The client's connection to this node.
    pub ctx: &'a ConnContext,
    /// The address throttled and logged.
    pub client: IpAddr,
    /// The session came from a front node with a valid proof: never forward it again.
    pub forwarded: bool,
    /// This session's id (sent to the owner as `x-session-id`).
    pub session_id: &'a str,
    /// The connection's budget of uncached peer lookups.
    pub fanouts: &'a ds_access::FanoutBudget,
}

fn domain_of(address: &str) -> &str {
    address.rsplit_once('@').map_or("", |(_, d)| d)
}

/// Resolve `name`, check `password`, apply and record the throttle. `client` is the address
/// failed logins are counted against.
pub async fn login(
    imap: &Imap,
    attempt: Attempt<'_>,
    name: &str,
    password: &Secret,
) -> LoginOutcome {
    let Attempt { ctx, client, .. } = attempt;
    let rctx = ResolveContext {
        local_ip: Some(ctx.local.ip()),
        sni: ctx.sni.clone(),
    };
    let resolution = match imap.directory.resolve_login(name, &rctx) {
        Ok(r) => r,
        Err(ds_directory::Error::Name(_)) => {
            throttle_wait(imap, client, None).await;
            let _ = verify(
                imap,
                client,
                &format!("invalid@{}", imap.config.hostname),
                password,
            )
            .await;
            return failed(imap, client, None, "invalid login name");
        }
        Err(e) => return temp_failed(&format!("resolving: {e}")),
    };
    match resolution.outcome {
        Outcome::Account { address, .. } => {
            throttle_wait(imap, client, Some(&address)).await;
            match verify(imap, client, &address, password).await {
                Ok(Check::Ok) => {
                    imap.config.throttle.record_success(&address);
                    count_login("ok");
                    LoginOutcome::Local(address)
                }
                Ok(Check::Bad) => failed(imap, client, Some(&address), "bad password or disabled"),
                Ok(Check::Busy) => temp_failed("too many password checks in progress"),
                Err(e) => temp_failed(&format!("verifying: {e}")),
            }
        }
        Outcome::Unknown(address)
            if !attempt.forwarded && imap.directory.domains().is_shared(domain_of(&address)) =>
        {
            throttle_wait(imap, client, Some(&address)).await;
            forward(imap, attempt, &address, password).await
        }
        outcome if attempt.forwarded => {
            // Same work as a bad password; never forwarded again: tell the front node its owner
            // was wrong.
            let address = outcome.address().map(str::to_owned);
            throttle_wait(imap, client, address.as_deref()).await;
            let _ = verify(
                imap,
                client,
                address.as_deref().unwrap_or("unknown@invalid"),
                password,
            )
            .await;
            imap.config
                .throttle
                .record_failure(client, address.as_deref());
            count_login("failed");
            tracing::info!(%outcome, "forwarded login for an account not on this node");
            LoginOutcome::NotHere
        }
        outcome => {
            let address = outcome.address().map(str::to_owned);
            throttle_wait(imap, client, address.as_deref()).await;
            let _ = verify(
                imap,
                client,
                address.as_deref().unwrap_or("unknown@invalid"),
                password,
            )
            .await;
            failed(imap, client, address.as_deref(), &outcome.to_string())
        }
    }
}

/// An address of a shared domain this node does not have: find its owner and log in there,
/// locating once more if the cached owner turns out to be stale.
async fn forward(
    imap: &Imap,
    attempt: Attempt<'_>,
    address: &str,
    password: &Secret,
) -> LoginOutcome {
    let client = attempt.client;
    let mut lookup = imap
        .locator
        .locate_login_bounded(address, Service::Imap, attempt.fanouts)
        .await;
    for round in 0..2 {
        let owner = match lookup {
            LoginOwner::Remote(owner) => owner,
            LoginOwner::NotFound(reason) => {
                let _ = verify(imap, client, address, password).await;
                return failed(imap, client, Some(address), &reason);
            }
            LoginOwner::TempFail(reason) => return temp_failed(&format!("locating: {reason}")),
        };
        match login_at(imap, attempt, &owner, password).await {
            Ok(session) => {
                imap.config.throttle.record_success(&owner.canonical);
                count_login("forwarded");
                let link = match (session.reused, session.warm) {
                    (true, _) => "reused",
                    (false, true) => "warm",
                    (false, false) => "fresh",
                };
                metrics::counter!("dshare_imap_forward_links_total", "link" => link).increment(1);
                tracing::Span::current().record("user", owner.canonical.as_str());
                tracing::info!(owner = %owner.node, link, "logged in on the owner, forwarding");
                return LoginOutcome::Forwarded(Box::new(session), owner);
            }
            Err(OwnerLoginError::NotHere) if round == 0 => {
                tracing::info!(owner = %owner.node, "owner does not have the account, locating again");
                lookup = imap.locator.relocate_login(address, Service::Imap).await;
            }
            Err(OwnerLoginError::NotHere) => {
                return failed(
                    imap,
                    client,
                    Some(address),
                    "owner does not have the account",
                );
            }
            Err(OwnerLoginError::BadCredentials(text)) => {
                tracing::debug!(owner = %owner.node, %text, "owner refused the credentials");
                return failed(imap, client, Some(address), "refused by the owner");
            }
            Err(OwnerLoginError::Unavailable(reason)) => {
                return temp_failed(&format!("owner {}: {reason}", owner.node));
            }
        }
    }
    failed(
        imap,
        client,
        Some(address),
        "owner does not have the account",
    )
}

/// One forwarded login at `owner`'s IMAP endpoint.
async fn login_at(
    imap: &Imap,
    attempt: Attempt<'_>,
    owner: &Owner,
    password: &Secret,
) -> Result<OwnerSession, OwnerLoginError> {
    let c = &imap.config;
    let Some(key) = c.proof_key.as_ref() else {
        return Err(OwnerLoginError::Unavailable(
            "no cluster secret configured, cannot forward".into(),
        ));
    };
    if owner.imap.is_empty() {
        return Err(OwnerLoginError::Unavailable(
            "the owner has no IMAP endpoint".into(),
        ));
    }
    let connector = c.peer_tls.clone().map(TlsConnector::from);
    let tls = match &connector {
        Some(connector) => OwnerTls::StartTls(connector),
        None => OwnerTls::None,
    };
    imap_client::login_at_owner_pooled(
        OwnerLogin {
            endpoint: &owner.imap,
            tls,
            server_name: "",
            canonical: &owner.canonical,
            password: password.expose(),
            client: attempt.ctx,
            session_id: attempt.session_id,
            key,
            hop: 1,
            timeouts: Timeouts {
                reply: c.peer_timeout,
                tls_handshake: c.tls_handshake_timeout,
            },
        },
        &imap.warm,
    )
    .await
}

fn failed(imap: &Imap, client: IpAddr, account: Option<&str>, reason: &str) -> LoginOutcome {
    imap.config.throttle.record_failure(client, account);
    count_login("failed");
    tracing::info!(account, reason, "login failed");
    LoginOutcome::Failed
}

fn temp_failed(reason: &str) -> LoginOutcome {
    count_login("tempfail");
    tracing::warn!(reason, "login failed temporarily");
    LoginOutcome::Unavailable
}

async fn throttle_wait(imap: &Imap, client: IpAddr, account: Option<&str>) {
    let delay = imap.config.throttle.delay(client, account);
    if !delay.is_zero() {
        tracing::debug!(?delay, "login throttled");
        tokio::time::sleep(delay).await;
    }
}

/// The node's bounded, cached password check (Argon2 off the async threads), shared with POP3.
async fn verify(
    imap: &Imap,
    client: IpAddr,
    address: &str,
    password: &Secret,
) -> crate::Result<Check> {
    Ok(imap
        .passwords
        .check(client, address, password.expose())
        .await?)
}
