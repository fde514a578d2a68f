//! ds-pop3: the POP3 server of a Domain Share node (DESIGN.md §7), and POP3 forwarding.
//!
//! - [`protocol`]: the sans-IO command parser and the SASL/byte-stuffing helpers.
//! - [`Pop3`]: one per node, shared by every listener (`pop3` and implicit-TLS `pop3s`);
//!   [`Pop3::handle`] is the connection handler for [`ds_net::serve`].
//! - Local accounts are served from the node's INBOXes (RFC 1939 + CAPA, UIDL, TOP, USER, SASL
//!   PLAIN, STLS, RESP-CODES, AUTH-RESP-CODE, PIPELINING); accounts owned by a peer are proxied to
//!   the owner after it accepted the client's credentials ([`forward`]), with the client's address
//!   passed in a signed `XCLIENT` ([`xclient`]).
//! - The cluster lookup, the login throttle, the peer proof, the owner connection, the splice and
//!   the maildrop locks (`-ERR [IN-USE]`) come from `ds-access`, shared with the other protocols.

use std::sync::Arc;
use std::time::Duration;

use ds_access::{Locate, MailboxLocks, ProofKey};
use ds_directory::Directory;
use ds_net::{ConnContext, MailStream, Shutdown, TlsAcceptor};
use ds_store::{MailStore, Store};

mod error;
pub mod forward;
pub mod maildrop;
pub mod protocol;
pub mod relay;
mod session;
pub mod xclient;

pub use ds_access::{LoginThrottle, ThrottleConfig};
pub use error::{Error, Result};

/// How the POP3 service behaves. `Default` gives the documented defaults.
#[derive(Clone)]
pub struct Pop3Config {
    /// Host name in the greeting and in the APOP-style timestamp.
    pub hostname: String,
    /// This node's id: the `HOP` of the `XCLIENT` it sends when forwarding.
    pub node_id: String,
    /// Idle timeout once logged in (and of a forwarded session's splice). Default 10 min.
    pub idle_timeout: Duration,
    /// Idle timeout before authentication. Default 60 s.
    pub auth_timeout: Duration,
    /// The session-proof key: signs the `XCLIENT` we send and checks the ones we receive. Without
    /// it this node neither forwards nor accepts forwarded sessions.
    pub proof_key: Option<ProofKey>,
    /// Failed logins in one session before it is closed. Default 3.
    pub max_failed_logins: u32,
    /// Invalid commands in one session before it is closed. Default 20.
    pub max_bad_commands: u32,
    /// Bound on connecting to an owner, and on each of its replies while the forwarded login is
    /// set up (its password check may be throttled). Default 30 s.
    pub peer_timeout: Duration,
    /// Bound on a TLS handshake (STLS, and to an owner). Default 10 s.
    pub tls_handshake_timeout: Duration,
    /// Connections per owner kept ready (STLS done, greeting read) for forwarded logins,
    /// opened only after a forwarded login used one ([`ds_access::WarmPool`]); 0: none.
    /// Default 2.
    pub warm_connections: usize,
    /// Failed-login delays; share one with the node's other login protocols.
    pub throttle: Arc<LoginThrottle>,
    /// The node's bounded, cached password checks (shared with IMAP and SMTP AUTH); `None`:
    /// [`Pop3::new`] makes one of its own with the default bounds.
    pub passwords: Option<Arc<ds_access::PasswordChecker>>,
    /// `require_tls`: where USER/PASS and AUTH are refused before STLS (CAPA then lists
    /// neither USER nor SASL). Default: required, loopback listeners exempt.
    pub tls_policy: ds_net::TlsPolicy,
}

impl Default for Pop3Config {
    fn default() -> Self {
        Self {
            hostname: "localhost".into(),
            node_id: "node".into(),
            idle_timeout: Duration::from_secs(10 * 60),
            auth_timeout: Duration::from_secs(60),
            proof_key: None,
            max_failed_logins: 3,
            max_bad_commands: 20,
            peer_timeout: Duration::from_secs(30),
            tls_handshake_timeout: Duration::from_secs(10),
            warm_connections: 2,
            throttle: Arc::new(LoginThrottle::default()),
            passwords: None,
            tls_policy: ds_net::TlsPolicy::default(),
        }
    }
}

impl std::fmt::Debug for Pop3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pop3Config")
            .field("hostname", &self.hostname)
            .field("node_id", &self.node_id)
            .field("idle_timeout", &self.idle_timeout)
            .field("auth_timeout", &self.auth_timeout)
            .field("proof_key", &self.proof_key.as_ref().map(|_| "<set>"))
            .field("max_failed_logins", &self.max_failed_logins)
            .field("max_bad_commands", &self.max_bad_commands)
            .field("peer_timeout", &self.peer_timeout)
            .field("tls_handshake_timeout", &self.tls_handshake_timeout)
            .field("throttle", &self.throttle)
            .field("tls_policy", &self.tls_policy)
            .finish()
    }
}

/// The POP3 service of a node: shared (`Arc`) by its listeners and connections.
pub struct Pop3 {
    pub(crate) config: Pop3Config,
    pub(crate) directory: Directory,
    pub(crate) mail: MailStore,
    pub(crate) store: Store,
    pub(crate) locator: Arc<dyn Locate>,
    /// For STLS; `None`: STLS is not offered.
    pub(crate) tls_acceptor: Option<TlsAcceptor>,
    /// Trusts the cluster CA; `Some`: connections to owners must be upgraded with STLS.
    pub(crate) peer_tls: Option<Arc<rustls::ClientConfig>>,
    pub(crate) locks: MailboxLocks,
    pub(crate) passwords: Arc<ds_access::PasswordChecker>,
    /// Connections to owners ready for forwarded logins.
    pub(crate) warm: Arc<ds_access::WarmPool<forward::ReadyConn>>,
}

/// How long a warm connection may wait for a login: well below an owner's pre-login timeout.
const WARM_MAX_AGE: Duration = Duration::from_secs(30);

impl std::fmt::Debug for Pop3 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pop3")
            .field("config", &self.config)
            .field("stls", &self.tls_acceptor.is_some())
            .field("peer_tls", &self.peer_tls.is_some())
            .finish_non_exhaustive()
    }
}

impl Pop3 {
    /// The service. `locator` answers for addresses of shared domains this node does not have
    /// (`ds_cluster::Locator` implements [`Locate`]; `ds_access::NoPeers` for a lone node).
    /// `tls_acceptor` enables STLS; `peer_tls` (trusting the cluster CA) makes forwarded sessions
    /// use STLS to the owner.
    pub fn new(
        config: Pop3Config,
        directory: Directory,
        mail: MailStore,
        store: Store,
        locator: Arc<dyn Locate>,
        tls_acceptor: Option<TlsAcceptor>,
        peer_tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Arc<Pop3> {
        let passwords =
            ds_access::PasswordChecker::shared_or_default(config.passwords.clone(), &directory);
        let warm = Arc::new(ds_access::WarmPool::new(
            config.warm_connections,
            WARM_MAX_AGE,
        ));
        Arc::new(Pop3 {
            passwords,
            warm,
            config,
            directory,
            mail,
            store,
            locator,
            tls_acceptor,
            peer_tls,
            locks: MailboxLocks::new(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &Pop3Config {
        &self.config
    }

    /// The maildrop locks (to see whether an account is in a session).
    /// The password checker logins go through.
    pub fn passwords(&self) -> &ds_access::PasswordChecker {
        &self.passwords
    }

    pub fn locks(&self) -> &MailboxLocks {
        &self.locks
    }

    /// Serve one connection until the client quits, it times out, or `shutdown` fires. Errors are
    /// logged here, once. Use as the handler of [`ds_net::serve`]:
    /// `move |s, c, sd| Arc::clone(&pop3).handle(s, c, sd)`.
    pub async fn handle(self: Arc<Self>, stream: MailStream, ctx: ConnContext, shutdown: Shutdown) {
        session::run(self, stream, ctx, shutdown).await;
    }
}

/// Count a login attempt in `dshare_pop3_logins_total{result}`.
pub(crate) fn count_login(result: &'static str) {
    metrics::counter!("dshare_pop3_logins_total", "result" => result).increment(1);
}
