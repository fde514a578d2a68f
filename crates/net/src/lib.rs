//! ds-net: the networking base shared by the SMTP, POP3 and IMAP servers and the node.
//!
//! - [`MailStream`] and [`ConnContext`]: one stream type over plain TCP, server-side TLS and client-side
//!   TLS, and what a session knows about its connection (peer, local address, SNI).
//! - [`LineConn`]: buffered line/literal reading with caps and timeouts, buffered writing.
//! - [`serve`]: the accept loop (connection limits, implicit TLS, one `tracing` span per connection,
//!   graceful drain on shutdown).
//! - [`Shutdown`] / [`ShutdownTrigger`] / [`Drain`]: the shutdown signal and the task tracker.
//! - [`splice`]: the two-way byte copy used to proxy a session to the owning node.
//! - [`TlsPolicy`]: `require_tls`, where passwords need TLS first.
//! - [`tls`]: rustls configurations (ring provider only), self-signed certificates, a small dev/test CA.

mod error;
mod limits;
mod line;
mod listener;
mod shutdown;
mod splice;
mod stream;
pub mod tls;
mod tls_policy;

pub use error::{Error, Result};
pub use limits::{BodyBudget, BudgetGuard, IpSlot, PerIpGuard, PerIpLimiter};
pub use line::{DEFAULT_WRITE_TIMEOUT, LineConn};
pub use listener::{ListenOptions, serve};
pub use shutdown::{Drain, Shutdown, ShutdownTrigger, os_signal, shutdown_pair};
pub use splice::{Gate, Gated, PassAll, splice, splice_gated};
pub use stream::{ConnContext, MailStream};
pub use tls::ensure_crypto_provider;
pub use tls_policy::{IpNetwork, TlsPolicy};
pub use tokio_rustls::{TlsAcceptor, TlsConnector};
