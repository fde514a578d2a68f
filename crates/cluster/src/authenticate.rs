//! Minger `Authenticate` (DESIGN.md §5): a login for an account on another node is checked
//! by its owner. The owner's side is a [`PasswordAuthority`] (the node's password checker and
//! login throttle, which live above this crate) handed to [`crate::MingerService`]; the asking
//! side is [`crate::Locator::authenticate`].

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;

/// The owner's answer to a password check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthAnswer {
    /// Right password, enabled account: its canonical address.
    Ok(String),
    /// Wrong password, unknown or disabled account.
    Bad,
    /// No answer now (busy, store error, owner unreachable): a temporary error, never "bad
    /// password". The text is for the log.
    Temp(String),
}

/// Checks passwords of this node's accounts for peers, with the node's own throttle.
pub trait PasswordAuthority: Send + Sync + 'static {
    /// Checks `password` for the account `address` (full, normalised) on behalf of a client
    /// at `client_ip`.
    fn check<'a>(
        &'a self,
        address: &'a str,
        password: &'a str,
        client_ip: IpAddr,
    ) -> Pin<Box<dyn Future<Output = AuthAnswer> + Send + 'a>>;
}
