//! ds-imap: the IMAP4rev1 server of a Domain Share node (DESIGN.md §7).
//!
//! - [`Imap`]: one per node, shared by every listener (`imap` with STARTTLS and implicit-TLS
//!   `imaps`); [`Imap::handle`] is the connection handler for [`ds_net::serve`].
//! - [`session`]: one connection: the input framing over our [`ds_net::LineConn`] (lines and
//!   literals with caps and timeouts), `imap-next`'s sans-IO server as the parser and
//!   AUTHENTICATE/IDLE state machine, the state machine of RFC 3501 and the dispatch to [`op`].
//! - [`op`]: one small module per command family, so a reader finds a command by its name.
//! - [`mailbox_view`]: a selected mailbox as one session sees it (sequence numbers, `\Recent`,
//!   changes not yet announced).
//! - [`login`]: name resolution, the node's shared password checker, throttle and fan-out
//!   budget (ds-access), and forwarding to the owner.
//! - [`msg`]: the session's use of ds-message (ENVELOPE, BODYSTRUCTURE, BODY[section], SEARCH,
//!   modified UTF-7) and the per-body structure cache.
//!
//! Accounts owned by a peer are forwarded ([`login`], `ds_access::imap_client`): the owner's
//! session is spliced with the client's after a login the owner accepted.

use std::sync::Arc;
use std::time::Duration;

use ds_access::{Locate, LoginThrottle, ProofKey};
use ds_directory::Directory;
use ds_net::{ConnContext, MailStream, Shutdown, TlsAcceptor};
use ds_store::{MailStore, Store};

mod error;
pub mod login;
pub mod mailbox_view;
pub mod msg;
mod op;
mod response;
mod session;

pub use error::{Error, Result};

/// How the IMAP service behaves. `Default` gives the documented defaults.
#[derive(Clone, Debug)]
pub struct ImapConfig {
    /// Host name in the greeting.
    pub hostname: String,
    /// Idle timeout once logged in (RFC 3501 §5.4: at least 30 min). Default 30 min.
    pub idle_timeout: Duration,
    /// Idle timeout before authentication. Default 60 s.
    pub auth_timeout: Duration,
    /// Longest one IDLE may last before the server ends it (clients re-issue IDLE every
    /// 29 min). Default 31 min.
    pub idle_command_timeout: Duration,
    /// Bound on receiving a whole command (its literals included) once it started.
    /// Default 5 min.
    pub command_timeout: Duration,
    /// Longest command line (without literals). Default 64 KiB.
    pub max_line: usize,
    /// Largest literal of any command but APPEND. Default 64 KiB.
    pub max_literal: usize,
    /// Largest message APPEND accepts (the node's message size limit). Default 50 MiB.
    pub max_message_size: usize,
    /// `require_tls`: where passwords are refused before TLS (`LOGINDISABLED`). Default:
    /// required, loopback listeners exempt.
    pub tls_policy: ds_net::TlsPolicy,
    /// Failed logins in one session before it is closed. Default 3.
    pub max_failed_logins: u32,
    /// Invalid commands in one session before it is closed. Default 20.
    pub max_bad_commands: u32,
    /// Bound on a TLS handshake (STARTTLS). Default 10 s.
    pub tls_handshake_timeout: Duration,
    /// Failed-login delays: one throttle per node, shared with every login protocol.
    pub throttle: Arc<LoginThrottle>,
    /// The node's bounded, cached password checks, shared with every login protocol. `None`:
    /// one of this service's own with the default bounds.
    pub passwords: Option<Arc<ds_access::PasswordChecker>>,
    /// The session-proof key: signs the `ID` this node sends when forwarding and checks the ones
    /// it receives. Without it this node neither forwards nor accepts forwarded sessions.
    pub proof_key: Option<ProofKey>,
    /// Trusts the cluster CA; `Some`: connections to owners are upgraded with STARTTLS.
    /// `None`: plaintext to owners (a cluster without a CA: tests, development).
    pub peer_tls: Option<Arc<rustls::ClientConfig>>,
    /// Bound on connecting to an owner and on each of its replies while a forwarded login is set
    /// up. Default 30 s.
    pub peer_timeout: Duration,
    /// Connections per owner kept ready (TLS up, greeting read) for forwarded logins, opened
    /// only after a forwarded login used one ([`ds_access::WarmPool`]); 0: none. Default 2.
    pub warm_connections: usize,
    /// Bytes of message bodies in flight, node-wide (shared with SMTP DATA): APPEND takes its
    /// share while it receives a message. Default: a budget of its own of 256 MiB.
    pub body_budget: ds_net::BodyBudget,
}

impl Default for ImapConfig {
    fn default() -> Self {
        Self {
            hostname: "localhost".into(),
            idle_timeout: Duration::from_secs(30 * 60),
            auth_timeout: Duration::from_secs(60),
            idle_command_timeout: Duration::from_secs(31 * 60),
            command_timeout: Duration::from_secs(5 * 60),
            max_line: 64 * 1024,
            max_literal: 64 * 1024,
            max_message_size: 50 * 1024 * 1024,
            tls_policy: ds_net::TlsPolicy::default(),
            max_failed_logins: 3,
            max_bad_commands: 20,
            tls_handshake_timeout: Duration::from_secs(10),
            throttle: Arc::new(LoginThrottle::default()),
            passwords: None,
            proof_key: None,
            peer_tls: None,
            peer_timeout: Duration::from_secs(30),
            warm_connections: 2,
            body_budget: ds_net::BodyBudget::new(256 * 1024 * 1024),
        }
    }
}

/// The IMAP service of a node: shared (`Arc`) by its listeners and connections.
pub struct Imap {
    pub(crate) config: ImapConfig,
    pub(crate) directory: Directory,
    pub(crate) mail: MailStore,
    pub(crate) store: Store,
    pub(crate) locator: Arc<dyn Locate>,
    pub(crate) passwords: Arc<ds_access::PasswordChecker>,
    /// For STARTTLS; `None`: STARTTLS is not offered.
    pub(crate) tls_acceptor: Option<TlsAcceptor>,
    /// Connections to owners ready for forwarded logins.
    pub(crate) warm: Arc<ds_access::WarmPool<ds_access::imap_client::ReadyConn>>,
}

/// How long a warm connection may wait for a login: well below an owner's pre-login timeout
/// (`auth_timeout`, 60 s by default).
const WARM_MAX_AGE: Duration = Duration::from_secs(30);

impl std::fmt::Debug for Imap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Imap")
            .field("config", &self.config)
            .field("starttls", &self.tls_acceptor.is_some())
            .finish_non_exhaustive()
    }
}

impl Imap {
    /// The service. `locator` answers for addresses of shared domains this node does not have;
    /// `tls_acceptor` enables STARTTLS.
    pub fn new(
        config: ImapConfig,
        directory: Directory,
        mail: MailStore,
        store: Store,
        locator: Arc<dyn Locate>,
        tls_acceptor: Option<TlsAcceptor>,
    ) -> Arc<Imap> {
        let passwords =
            ds_access::PasswordChecker::shared_or_default(config.passwords.clone(), &directory);
        let warm = Arc::new(ds_access::WarmPool::new(
            config.warm_connections,
            WARM_MAX_AGE,
        ));
        Arc::new(Imap {
            passwords,
            warm,
            config,
            directory,
            mail,
            store,
            locator,
            tls_acceptor,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ImapConfig {
        &self.config
    }

    /// Forwarded logins that found a warm connection to the owner, and ones that did not.
    pub fn warm_stats(&self) -> (u64, u64) {
        self.warm.stats()
    }

    /// Serve one connection until the client logs out, it times out, or `shutdown` fires.
    /// Errors are logged here, once. Use as the handler of [`ds_net::serve`]:
    /// `move |s, c, sd| Arc::clone(&imap).handle(s, c, sd)`.
    pub async fn handle(self: Arc<Self>, stream: MailStream, ctx: ConnContext, shutdown: Shutdown) {
        session::run(self, stream, ctx, shutdown).await;
    }
}

/// Count a login attempt in `dshare_imap_logins_total{result}`.
pub(crate) fn count_login(result: &'static str) {
    metrics::counter!("dshare_imap_logins_total", "result" => result).increment(1);
}
