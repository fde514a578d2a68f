//! Login: DESIGN.md §3–§4 resolution of the name (`@`, `%`, SNI, multihoming, Router) and the
//! password check, exactly as POP3 does it.
//!
//! The throttle and the owner lookup are the node's shared ones from ds-access; the SASL PLAIN
//! decoding is POP3's. Accounts owned by a peer are not forwarded yet ([`remote_account`]).

use std::net::IpAddr;

use ds_access::{LoginOwner, Service};
use ds_directory::{Outcome, ResolveContext};
use ds_net::ConnContext;
pub use ds_pop3::protocol::{PlainCredentials, Secret, decode_plain};

use crate::{Imap, count_login};

/// What a login attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginOutcome {
    /// Logged in to a local account (its canonical address).
    Local(String),
    /// Bad name or password, unknown user, list, …: `NO [AUTHENTICATIONFAILED]`.
    Failed,
    /// The account is on another node, or no answer now: `NO [UNAVAILABLE]`.
    Unavailable,
}

fn domain_of(address: &str) -> &str {
    address.rsplit_once('@').map_or("", |(_, d)| d)
}

/// Resolve `name`, check `password`, apply and record the throttle. `client` is the address
/// failed logins are counted against.
pub async fn login(
    imap: &Imap,
    ctx: &ConnContext,
    client: IpAddr,
    name: &str,
    password: &Secret,
) -> LoginOutcome {
    let rctx = ResolveContext {
        local_ip: Some(ctx.local.ip()),
        sni: ctx.sni.clone(),
    };
    let resolution = match imap.directory.resolve_login(name, &rctx) {
        Ok(r) => r,
        Err(ds_directory::Error::Name(_)) => {
            throttle_wait(imap, client, None).await;
            let _ = verify(imap, &format!("invalid@{}", imap.config.hostname), password).await;
            return failed(imap, client, None, "invalid login name");
        }
        Err(e) => return temp_failed(&format!("resolving: {e}")),
    };
    match resolution.outcome {
        Outcome::Account { address, .. } => {
            throttle_wait(imap, client, Some(&address)).await;
            match verify(imap, &address, password).await {
                Ok(true) => {
                    imap.config.throttle.record_success(&address);
                    count_login("ok");
                    LoginOutcome::Local(address)
                }
                Ok(false) => failed(imap, client, Some(&address), "bad password or disabled"),
                Err(e) => temp_failed(&format!("verifying: {e}")),
            }
        }
        Outcome::Unknown(address) if imap.directory.domains().is_shared(domain_of(&address)) => {
            throttle_wait(imap, client, Some(&address)).await;
            match imap.locator.locate_login(&address, Service::Imap).await {
                LoginOwner::Remote(owner) => remote_account(&address, &owner.node),
                LoginOwner::NotFound(reason) => {
                    let _ = verify(imap, &address, password).await;
                    failed(imap, client, Some(&address), &reason)
                }
                LoginOwner::TempFail(reason) => temp_failed(&format!("locating: {reason}")),
            }
        }
        outcome => {
            let address = outcome.address().map(str::to_owned);
            throttle_wait(imap, client, address.as_deref()).await;
            let _ = verify(
                imap,
                address.as_deref().unwrap_or("unknown@invalid"),
                password,
            )
            .await;
            failed(imap, client, address.as_deref(), &outcome.to_string())
        }
    }
}

/// An account owned by a peer. Forwarding arrives with ds-access; until then the client is
/// told to come back later (it should use the owner directly).
fn remote_account(address: &str, owner: &str) -> LoginOutcome {
    count_login("tempfail");
    tracing::info!(
        account = address,
        owner,
        "account on a peer: IMAP forwarding not available"
    );
    LoginOutcome::Unavailable
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

/// Argon2 off the async threads.
async fn verify(imap: &Imap, address: &str, password: &Secret) -> crate::Result<bool> {
    let directory = imap.directory.clone();
    let address = address.to_owned();
    let password = password.clone();
    Ok(
        tokio::task::spawn_blocking(move || directory.verify_password(&address, password.expose()))
            .await??,
    )
}
