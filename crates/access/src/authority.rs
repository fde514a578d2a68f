//! [`OwnerPasswords`]: the owner's side of Minger `Authenticate` (DESIGN.md §5) — a peer asks
//! this node to check a password for one of its accounts; the check runs through the node's
//! [`PasswordChecker`] and [`LoginThrottle`], as a login that arrived here would.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use ds_cluster::{AuthAnswer, PasswordAuthority};
use ds_directory::{Directory, Outcome};

use crate::{Check, LoginThrottle, PasswordChecker};

/// Longest throttle delay the owner waits out inside one `Authenticate` call (the call is
/// bounded by `ds_cluster`'s authenticate timeout).
const MAX_WAIT: Duration = Duration::from_secs(6);

/// Checks this node's passwords for peers with the node's own checker and throttle.
#[derive(Debug)]
pub struct OwnerPasswords {
    directory: Directory,
    passwords: Arc<PasswordChecker>,
    throttle: Arc<LoginThrottle>,
}

impl OwnerPasswords {
    pub fn new(
        directory: Directory,
        passwords: Arc<PasswordChecker>,
        throttle: Arc<LoginThrottle>,
    ) -> Self {
        Self {
            directory,
            passwords,
            throttle,
        }
    }

    async fn answer(&self, address: &str, password: &str, ip: IpAddr) -> AuthAnswer {
        let account = match self.directory.resolve_address(address) {
            Ok(r) => match r.outcome {
                Outcome::Account { address, .. } => Some(address),
                _ => None,
            },
            Err(e) => return AuthAnswer::Temp(format!("resolving: {e}")),
        };
        let delay = self.throttle.delay(ip, account.as_deref()).min(MAX_WAIT);
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        // An unknown name costs the same work as a wrong password.
        let name = account.as_deref().unwrap_or("unknown@invalid");
        match self.passwords.check(ip, name, password).await {
            Ok(Check::Ok) => match account {
                Some(account) => {
                    self.throttle.record_success(&account);
                    AuthAnswer::Ok(account)
                }
                None => AuthAnswer::Bad,
            },
            Ok(Check::Bad) => {
                self.throttle.record_failure(ip, account.as_deref());
                AuthAnswer::Bad
            }
            Ok(Check::Busy) => AuthAnswer::Temp("too many password checks in progress".into()),
            Err(e) => AuthAnswer::Temp(format!("password check: {e}")),
        }
    }
}

impl PasswordAuthority for OwnerPasswords {
    fn check<'a>(
        &'a self,
        address: &'a str,
        password: &'a str,
        client_ip: IpAddr,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = AuthAnswer> + Send + 'a>> {
        Box::pin(self.answer(address, password, client_ip))
    }
}
