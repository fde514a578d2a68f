//! One POP3 connection: the AUTHORIZATION → TRANSACTION → UPDATE state machine of RFC 1939 with
//! CAPA, RESP-CODES, AUTH-RESP-CODE, SASL PLAIN, STLS and PIPELINING, the login of §3/§4 of
//! DESIGN.md, and the hand-over to [`crate::forward`] for accounts owned by a peer.

use std::net::SocketAddr;
use std::sync::Arc;

use ds_access::{LoginOwner, MailboxGuard, Owner, Service};
use ds_directory::{Outcome, ResolveContext};
use ds_net::{ConnContext, LineConn, MailStream, Shutdown};
use ds_store::mailbox::INBOX;
use tracing::Instrument;

use crate::forward::{self, LoginMethod, NOT_HERE, OwnerAnswer};
use crate::maildrop::Maildrop;
use crate::protocol::{
    self, Command, MAX_COMMAND_LINE, MAX_SASL_LINE, ParseError, SaslResponse, Secret, Xclient,
};
use crate::{Pop3, Result, count_login, xclient};

/// The reply to every failed login, whatever the reason (bad password, unknown user, list, …).
pub const AUTH_FAILED: &str = "-ERR [AUTH] Authentication failed\r\n";
/// A password before STLS on a listener that requires TLS (RFC 3206 has no better code).
const PRIVACY_REQUIRED: &str =
    "-ERR [AUTH] Plaintext authentication disallowed on non-secure connections, use STLS first\r\n";
const TEMP_FAILED: &str = "-ERR [SYS/TEMP] Temporary failure, try again later\r\n";
/// The end of a session whose maildrop was removed (its account moved away or deleted).
const ACCOUNT_GONE: &str = "-ERR [SYS/TEMP] This mailbox has moved or gone, log in again\r\n";
const BAD_STATE: &str = "-ERR command not valid in this state\r\n";

type Conn = LineConn<MailStream>;

/// Octets of a message read from the store per write to the client.
const SEND_CHUNK: usize = 64 * 1024;

/// What the read loop does after a command.
enum Flow {
    Continue,
    Close,
    StartTls,
    /// Logged in on the owner; its `+OK` was queued for the client.
    Splice(Box<(Conn, Option<crate::forward::Reuse>)>),
}

enum State {
    Authorization {
        /// The name of the last `USER`.
        user: Option<String>,
    },
    Transaction {
        maildrop: Maildrop,
        /// Changes of the INBOX: the session ends when it is removed under it.
        inbox: tokio::sync::watch::Receiver<u64>,
        _lock: MailboxGuard,
    },
}

struct Session {
    pop3: Arc<Pop3>,
    ctx: ConnContext,
    /// The APOP-style timestamp of our greeting; `XCLIENT` signatures cover it.
    timestamp: String,
    /// The real client: the peer, or the address a verified `XCLIENT` gave.
    client: SocketAddr,
    /// The node that forwarded this session, after a verified `XCLIENT`.
    forwarded_by: Option<String>,
    state: State,
    failed_logins: u32,
    bad_commands: u32,
    /// Uncached peer fan-outs this client's logins may still cause.
    fanouts: ds_access::FanoutBudget,
}

/// Run a connection to its end; errors are logged here, once.
pub(crate) async fn run(pop3: Arc<Pop3>, stream: MailStream, ctx: ConnContext, shutdown: Shutdown) {
    let span = tracing::info_span!(
        "pop3",
        client = %ctx.peer,
        forwarded_by = tracing::field::Empty,
        user = tracing::field::Empty,
        owner = tracing::field::Empty,
    );
    async move {
        let timestamp = ds_access::proof::greeting_nonce(&pop3.config.hostname);
        let mut session = Session {
            fanouts: pop3.locator.fanout_budget(),
            client: ctx.peer,
            pop3,
            ctx,
            timestamp,
            forwarded_by: None,
            state: State::Authorization { user: None },
            failed_logins: 0,
            bad_commands: 0,
        };
        match session.serve(stream, shutdown).await {
            Ok(()) => tracing::debug!("session ended"),
            Err(e) => tracing::info!(error = %e, "session ended with an error"),
        }
    }
    .instrument(span)
    .await;
}

/// Resolves once the INBOX of a session in the TRANSACTION state is removed from the store;
/// never in another state.
async fn inbox_removed(state: &mut State) {
    let State::Transaction { inbox, .. } = state else {
        return std::future::pending().await;
    };
    loop {
        if *inbox.borrow_and_update() == u64::MAX {
            return;
        }
        if inbox.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

fn domain_of(address: &str) -> &str {
    address.rsplit_once('@').map_or("", |(_, d)| d)
}

impl Session {
    async fn serve(&mut self, stream: MailStream, shutdown: Shutdown) -> Result<()> {
        let mut conn = LineConn::new(stream);
        let greeting = format!(
            "+OK {} POP3 server ready {}\r\n",
            self.pop3.config.hostname, self.timestamp
        );
        conn.write_all(greeting.as_bytes()).await?;
        loop {
            // PIPELINING: answer a batch of commands with one write; flush once no complete
            // command is waiting.
            if !conn.buffered().contains(&b'\n') {
                conn.flush().await?;
            }
            let timeout = match self.state {
                State::Authorization { .. } => self.pop3.config.auth_timeout,
                State::Transaction { .. } => self.pop3.config.idle_timeout,
            };
            let read = tokio::select! {
                read = conn.read_line(MAX_COMMAND_LINE, timeout) => read,
                () = shutdown.wait() => {
                    conn.write_all(b"-ERR [SYS/TEMP] Server shutting down\r\n").await?;
                    let _ = conn.shutdown().await;
                    return Ok(());
                }
                () = inbox_removed(&mut self.state) => {
                    // The account was deleted or moved to another node (DESIGN.md §11): its
                    // messages are no longer here; a new login finds where they are.
                    tracing::info!("maildrop removed under the session (account moved or deleted)");
                    self.state = State::Authorization { user: None };
                    return self.close(conn, ACCOUNT_GONE).await;
                }
            };
            let line = match read {
                Ok(Some(line)) => line,
                // Dropped connection: no UPDATE state, nothing is deleted.
                Ok(None) => return Ok(()),
                Err(ds_net::Error::LineTooLong { .. }) => {
                    conn.write_all(b"-ERR line too long\r\n").await?;
                    if self.bad_command() {
                        return self.close(conn, "-ERR too many errors\r\n").await;
                    }
                    continue;
                }
                Err(ds_net::Error::Timeout) => {
                    tracing::debug!(?timeout, "idle timeout");
                    return self.close(conn, "-ERR idle timeout, closing\r\n").await;
                }
                Err(e) => return Err(e.into()),
            };
            let command = match protocol::parse_command(&line) {
                Ok(command) => command,
                Err(e) => {
                    let reply = match e {
                        ParseError::UnknownCommand => "-ERR unknown command\r\n".to_owned(),
                        e => format!("-ERR {e}\r\n"),
                    };
                    conn.write_all(reply.as_bytes()).await?;
                    if self.bad_command() {
                        return self.close(conn, "-ERR too many errors\r\n").await;
                    }
                    continue;
                }
            };
            tracing::trace!(command = command.name(), "command");
            match self.dispatch(&mut conn, command).await? {
                Flow::Continue => {}
                Flow::Close => {
                    let _ = conn.shutdown().await;
                    return Ok(());
                }
                Flow::StartTls => {
                    let Some(acceptor) = self.pop3.tls_acceptor.clone() else {
                        return Ok(());
                    };
                    conn = conn
                        .start_tls(&acceptor, self.pop3.config.tls_handshake_timeout)
                        .await?;
                    self.ctx.update_from(conn.get_ref());
                    // RFC 2595: forget what was said before the handshake.
                    self.state = State::Authorization { user: None };
                    tracing::debug!(sni = ?self.ctx.sni, "STLS done");
                }
                Flow::Splice(owner) => {
                    let (owner, reuse) = *owner;
                    return self.splice(conn, owner, reuse, &shutdown).await;
                }
            }
        }
    }

    /// Count an invalid command; true once the session should be closed.
    fn bad_command(&mut self) -> bool {
        self.bad_commands += 1;
        self.bad_commands > self.pop3.config.max_bad_commands
    }

    async fn close(&self, mut conn: Conn, reply: &str) -> Result<()> {
        conn.write_all(reply.as_bytes()).await?;
        let _ = conn.shutdown().await;
        Ok(())
    }

    async fn dispatch(&mut self, conn: &mut Conn, command: Command) -> Result<Flow> {
        match command {
            Command::Capa => {
                let reply = self.capabilities();
                conn.write_all(reply.as_bytes()).await?;
                return Ok(Flow::Continue);
            }
            Command::Quit => return self.quit(conn).await,
            Command::XdshareReset { tag, update } => return self.reset(conn, &tag, update).await,
            _ => {}
        }
        if matches!(self.state, State::Authorization { .. }) {
            self.authorization(conn, command).await
        } else {
            self.transaction(conn, command).await
        }
    }

    fn capabilities(&self) -> String {
        let mut capa = String::from("+OK Capability list follows\r\nTOP\r\nUIDL\r\n");
        let authorization = matches!(self.state, State::Authorization { .. });
        if authorization {
            if self.password_allowed() {
                capa.push_str("USER\r\nSASL PLAIN\r\n");
            }
            if self.pop3.tls_acceptor.is_some() && !self.ctx.tls {
                capa.push_str("STLS\r\n");
            }
        }
        capa.push_str(
            "RESP-CODES\r\nAUTH-RESP-CODE\r\nPIPELINING\r\nEXPIRE NEVER\r\n\
             IMPLEMENTATION dshare\r\n.\r\n",
        );
        capa
    }

    async fn quit(&mut self, conn: &mut Conn) -> Result<Flow> {
        if !matches!(self.state, State::Transaction { .. }) {
            conn.write_all(b"+OK Bye\r\n").await?;
            return Ok(Flow::Close);
        }
        let reply = match self.update().await {
            Ok(left) => format!(
                "+OK {} POP3 server signing off ({left} messages left)\r\n",
                self.pop3.config.hostname
            ),
            Err(()) => "-ERR [SYS/TEMP] Some deleted messages were not removed\r\n".to_owned(),
        };
        conn.write_all(reply.as_bytes()).await?;
        Ok(Flow::Close)
    }

    /// The UPDATE state (in TRANSACTION): the deletions committed and flushed, the maildrop
    /// released — before the reply goes out: a client (or a front node relaying for one) that
    /// reconnects as soon as it reads it must not find it still locked. `Ok`: messages left.
    async fn update(&mut self) -> std::result::Result<usize, ()> {
        let State::Transaction { maildrop, .. } = &self.state else {
            return Ok(0);
        };
        let committed = match maildrop.commit(&self.pop3.mail) {
            Ok(n) => self
                .pop3
                .store
                .flush_async()
                .await
                .map(|()| n)
                .map_err(crate::Error::from),
            Err(e) => Err(e),
        };
        let outcome = match committed {
            Ok(removed) => {
                tracing::info!(removed, "maildrop updated");
                Ok(maildrop.stat().0)
            }
            Err(e) => {
                tracing::warn!(error = %e, "UPDATE failed");
                Err(())
            }
        };
        self.state = State::Authorization { user: None };
        outcome
    }

    /// `XDSRESET tag [NOUPDATE]`: a front node ends the forwarded session it relays (its client
    /// sent QUIT, or went away without it: `NOUPDATE`) and keeps the link for another login. Only in a session whose `XCLIENT` was
    /// verified and only with the tag [`ds_access::proof::end_tag`] over this connection's
    /// timestamp; anything else is an unknown command. UPDATE as for QUIT, then AUTHORIZATION
    /// with a fresh timestamp: `+OK tag left timestamp`, or `-ERR tag …` and the end of the
    /// connection when the UPDATE failed.
    async fn reset(&mut self, conn: &mut Conn, tag: &str, update: bool) -> Result<Flow> {
        let proven = match (&self.forwarded_by, &self.pop3.config.proof_key) {
            (Some(_), Some(key)) => ds_access::proof::is_end_tag(key, &self.timestamp, tag),
            _ => false,
        };
        if !proven || !matches!(self.state, State::Transaction { .. }) {
            conn.write_all(b"-ERR Unknown command\r\n").await?;
            return Ok(if self.bad_command() {
                Flow::Close
            } else {
                Flow::Continue
            });
        }
        let left = if update {
            self.update().await
        } else {
            // The client went away without QUIT: no UPDATE (RFC 1939 §6), nothing removed.
            let State::Transaction { maildrop, .. } = &mut self.state else {
                unreachable!("checked above")
            };
            maildrop.reset();
            let left = maildrop.stat().0;
            self.state = State::Authorization { user: None };
            Ok(left)
        };
        let Ok(left) = left else {
            conn.write_all(
                format!("-ERR {tag} [SYS/TEMP] Some deleted messages were not removed\r\n")
                    .as_bytes(),
            )
            .await?;
            return Ok(Flow::Close);
        };
        tracing::info!(
            "forwarded session ended by the front node; the link waits for another login"
        );
        self.timestamp = ds_access::proof::greeting_nonce(&self.pop3.config.hostname);
        self.forwarded_by = None;
        self.client = self.ctx.peer;
        // Nothing of this session's counts against the next one on the link.
        self.failed_logins = 0;
        self.bad_commands = 0;
        self.fanouts = self.pop3.locator.fanout_budget();
        let span = tracing::Span::current();
        span.record("client", tracing::field::display(self.client));
        for field in ["forwarded_by", "user"] {
            span.record(field, "");
        }
        conn.write_all(format!("+OK {tag} {left} {}\r\n", self.timestamp).as_bytes())
            .await?;
        Ok(Flow::Continue)
    }

    /// `require_tls`: whether a password may be sent on this connection now.
    fn password_allowed(&self) -> bool {
        self.pop3.config.tls_policy.password_allowed(&self.ctx)
    }

    async fn authorization(&mut self, conn: &mut Conn, command: Command) -> Result<Flow> {
        if matches!(
            command,
            Command::User(_) | Command::Pass(_) | Command::Auth { .. }
        ) && !self.password_allowed()
        {
            tracing::info!(local = %self.ctx.local, "login refused: no TLS yet (require_tls)");
            conn.write_all(PRIVACY_REQUIRED.as_bytes()).await?;
            return Ok(Flow::Continue);
        }
        let State::Authorization { user } = &mut self.state else {
            return Ok(Flow::Continue);
        };
        match command {
            Command::User(name) => {
                *user = Some(name);
                conn.write_all(b"+OK send PASS\r\n").await?;
                Ok(Flow::Continue)
            }
            Command::Pass(password) => {
                let Some(name) = user.take() else {
                    conn.write_all(b"-ERR send USER first\r\n").await?;
                    return Ok(Flow::Continue);
                };
                self.login(conn, &name, password, LoginMethod::UserPass)
                    .await
            }
            Command::Apop => {
                conn.write_all(b"-ERR APOP is not supported, use USER/PASS or AUTH PLAIN\r\n")
                    .await?;
                Ok(Flow::Continue)
            }
            Command::Auth { mechanism, initial } => self.auth(conn, mechanism, initial).await,
            Command::Stls => {
                if self.ctx.tls {
                    conn.write_all(b"-ERR already using TLS\r\n").await?;
                    Ok(Flow::Continue)
                } else if self.pop3.tls_acceptor.is_none() {
                    conn.write_all(b"-ERR STLS not available\r\n").await?;
                    Ok(Flow::Continue)
                } else {
                    conn.write_all(b"+OK Begin TLS negotiation\r\n").await?;
                    Ok(Flow::StartTls)
                }
            }
            Command::Xclient(x) => {
                let after_user = user.is_some();
                let reply = self.xclient(&x, after_user);
                conn.write_all(reply.as_bytes()).await?;
                Ok(Flow::Continue)
            }
            _ => {
                conn.write_all(BAD_STATE.as_bytes()).await?;
                Ok(if self.bad_command() {
                    Flow::Close
                } else {
                    Flow::Continue
                })
            }
        }
    }

    /// A peer's `XCLIENT`: accepted once, before `USER`, when its signature checks.
    fn xclient(&mut self, x: &Xclient, after_user: bool) -> &'static str {
        let Some(key) = &self.pop3.config.proof_key else {
            tracing::warn!(hop = %x.hop, "XCLIENT refused: no cluster secret configured");
            return "-ERR XCLIENT not available\r\n";
        };
        if self.forwarded_by.is_some() || after_user {
            return "-ERR XCLIENT not valid now\r\n";
        }
        if !xclient::verify(key, &self.timestamp, x) {
            tracing::warn!(hop = %x.hop, "XCLIENT refused: bad signature");
            return "-ERR XCLIENT refused\r\n";
        }
        self.client = SocketAddr::new(x.addr, x.port);
        self.forwarded_by = Some(x.hop.clone());
        // A peer's forwarded session: not counted against the front node's address's limit.
        self.ctx.ip_slot.release();
        let span = tracing::Span::current();
        span.record("client", tracing::field::display(self.client));
        span.record("forwarded_by", x.hop.as_str());
        tracing::info!(peer = %self.ctx.peer, "forwarded session");
        // Told to the front node only: it may end the session with XDSRESET.
        "+OK XDSRESET\r\n"
    }

    async fn auth(
        &mut self,
        conn: &mut Conn,
        mechanism: Option<String>,
        initial: Option<Secret>,
    ) -> Result<Flow> {
        match mechanism.as_deref() {
            None => {
                conn.write_all(b"+OK SASL mechanisms follow\r\nPLAIN\r\n.\r\n")
                    .await?;
                return Ok(Flow::Continue);
            }
            Some("PLAIN") => {}
            Some(_) => {
                conn.write_all(b"-ERR unsupported SASL mechanism\r\n")
                    .await?;
                return Ok(Flow::Continue);
            }
        }
        let message = match initial {
            Some(initial) => protocol::decode_sasl(initial.expose()),
            None => {
                conn.write_all(b"+ \r\n").await?;
                conn.flush().await?;
                let line = match conn
                    .read_line(MAX_SASL_LINE, self.pop3.config.auth_timeout)
                    .await
                {
                    Ok(Some(line)) => line,
                    Ok(None) => return Ok(Flow::Close),
                    Err(ds_net::Error::LineTooLong { .. }) => {
                        conn.write_all(b"-ERR SASL response too long\r\n").await?;
                        return Ok(Flow::Continue);
                    }
                    Err(e) => return Err(e.into()),
                };
                match protocol::parse_sasl_response(&line) {
                    Ok(SaslResponse::Cancel) => {
                        conn.write_all(b"-ERR authentication cancelled\r\n").await?;
                        return Ok(Flow::Continue);
                    }
                    Ok(SaslResponse::Data(data)) => Ok(data),
                    Err(e) => Err(e),
                }
            }
        };
        let credentials = message.and_then(|m| protocol::decode_plain(&m.0));
        let credentials = match credentials {
            Ok(c) => c,
            Err(e) => {
                let reply = format!("-ERR {e}\r\n");
                conn.write_all(reply.as_bytes()).await?;
                return Ok(Flow::Continue);
            }
        };
        if !credentials.authzid.is_empty() && credentials.authzid != credentials.authcid {
            // No proxy authorization: acting as someone else is a failed login.
            return self
                .auth_failed(conn, None, "SASL authorization identity differs")
                .await;
        }
        self.login(
            conn,
            &credentials.authcid,
            credentials.password,
            LoginMethod::SaslPlain,
        )
        .await
    }

    /// A login, timed in `dshare_login_seconds{protocol=pop3}`.
    async fn login(
        &mut self,
        conn: &mut Conn,
        name: &str,
        password: Secret,
        method: LoginMethod,
    ) -> Result<Flow> {
        let started = std::time::Instant::now();
        let flow = self.resolve_and_login(conn, name, password, method).await;
        metrics::histogram!("dshare_login_seconds", "protocol" => "pop3")
            .record(started.elapsed().as_secs_f64());
        flow
    }

    /// DESIGN.md §3–§4: resolve the name, then check the password here or forward to the owner.
    async fn resolve_and_login(
        &mut self,
        conn: &mut Conn,
        name: &str,
        password: Secret,
        method: LoginMethod,
    ) -> Result<Flow> {
        let ctx = ResolveContext {
            local_ip: Some(self.ctx.local.ip()),
            sni: self.ctx.sni.clone(),
        };
        let resolution = match self.pop3.directory.resolve_login(name, &ctx) {
            Ok(resolution) => resolution,
            Err(ds_directory::Error::Name(_)) => {
                self.throttle_wait(None).await;
                // Only to spend the same time as a real check: its result does not matter.
                let _ = self
                    .verify(&format!("invalid@{}", self.pop3.config.hostname), &password)
                    .await;
                return self.auth_failed(conn, None, "invalid login name").await;
            }
            Err(e) => return self.temp_failed(conn, &format!("resolving: {e}")).await,
        };
        match resolution.outcome {
            Outcome::Account { address, .. } => self.login_local(conn, address, password).await,
            Outcome::Unknown(address)
                if self.forwarded_by.is_none()
                    && self.pop3.directory.domains().is_shared(domain_of(&address)) =>
            {
                self.login_remote(conn, address, password, method).await
            }
            outcome => {
                // Same work and the same reply as a bad password.
                let address = outcome.address().map(str::to_owned);
                self.throttle_wait(address.as_deref()).await;
                let _ = self
                    .verify(address.as_deref().unwrap_or("unknown@invalid"), &password)
                    .await;
                if self.forwarded_by.is_some() {
                    // Never forwarded again: tell the front node its owner was wrong.
                    self.pop3
                        .config
                        .throttle
                        .record_failure(self.client.ip(), address.as_deref());
                    count_login("failed");
                    tracing::info!(%outcome, "forwarded login for an account not on this node");
                    conn.write_all(NOT_HERE.as_bytes()).await?;
                    return Ok(Flow::Continue);
                }
                let reason = format!("{outcome}");
                self.auth_failed(conn, address.as_deref(), &reason).await
            }
        }
    }

    async fn throttle_wait(&self, account: Option<&str>) {
        let delay = self.pop3.config.throttle.delay(self.client.ip(), account);
        if !delay.is_zero() {
            tracing::debug!(?delay, "login throttled");
            tokio::time::sleep(delay).await;
        }
    }

    /// The node's bounded, cached check (Argon2 off the async threads).
    async fn verify(&self, address: &str, password: &Secret) -> Result<ds_access::Check> {
        Ok(self
            .pop3
            .passwords
            .check(self.client.ip(), address, password.expose())
            .await?)
    }

    async fn login_local(
        &mut self,
        conn: &mut Conn,
        address: String,
        password: Secret,
    ) -> Result<Flow> {
        self.throttle_wait(Some(&address)).await;
        let ok = match self.verify(&address, &password).await {
            Ok(ds_access::Check::Ok) => true,
            Ok(ds_access::Check::Bad) => false,
            Ok(ds_access::Check::Busy) => {
                return self
                    .temp_failed(conn, "too many password checks in progress")
                    .await;
            }
            Err(e) => return self.temp_failed(conn, &format!("verifying: {e}")).await,
        };
        if !ok {
            return self
                .auth_failed(conn, Some(&address), "bad password or disabled account")
                .await;
        }
        self.pop3.config.throttle.record_success(&address);
        let Some(lock) = self.pop3.locks.try_lock(&address) else {
            count_login("in_use");
            tracing::info!(account = %address, "maildrop in use");
            conn.write_all(b"-ERR [IN-USE] Maildrop already locked by another session\r\n")
                .await?;
            return Ok(Flow::Continue);
        };
        let maildrop = match Maildrop::open(&self.pop3.mail, &address) {
            Ok(m) => m,
            Err(e) => {
                return self
                    .temp_failed(conn, &format!("opening maildrop: {e}"))
                    .await;
            }
        };
        let (count, size) = maildrop.stat();
        tracing::Span::current().record("user", address.as_str());
        tracing::info!(messages = count, "logged in");
        count_login("ok");
        let reply = format!("+OK {address} has {count} messages ({size} octets)\r\n");
        conn.write_all(reply.as_bytes()).await?;
        self.state = State::Transaction {
            inbox: maildrop.watch(&self.pop3.mail),
            maildrop,
            _lock: lock,
        };
        Ok(Flow::Continue)
    }

    async fn login_remote(
        &mut self,
        conn: &mut Conn,
        address: String,
        password: Secret,
        method: LoginMethod,
    ) -> Result<Flow> {
        self.throttle_wait(Some(&address)).await;
        let mut lookup = self
            .pop3
            .locator
            .locate_login_bounded(&address, Service::Pop3, &self.fanouts)
            .await;
        for attempt in 0..2 {
            let owner = match lookup {
                LoginOwner::Remote(owner) => owner,
                LoginOwner::NotFound(reason) => {
                    let _ = self.verify(&address, &password).await;
                    return self.auth_failed(conn, Some(&address), &reason).await;
                }
                LoginOwner::TempFail(reason) => {
                    return self.temp_failed(conn, &format!("locating: {reason}")).await;
                }
            };
            match forward::login_at_owner(&self.pop3, &owner, self.client, method, &password).await
            {
                Ok(OwnerAnswer::Accepted {
                    conn: owner_conn,
                    reply,
                    reuse,
                }) => {
                    return self
                        .forwarded(conn, &owner, (owner_conn, reuse), &reply)
                        .await;
                }
                Ok(OwnerAnswer::Refused { not_here: true, .. }) if attempt == 0 => {
                    tracing::info!(owner = %owner.node, "owner does not have the account, locating again");
                    lookup = self
                        .pop3
                        .locator
                        .relocate_login(&address, Service::Pop3)
                        .await;
                }
                Ok(OwnerAnswer::Refused { reply, not_here }) => {
                    let reply = if not_here {
                        AUTH_FAILED.as_bytes().to_vec()
                    } else {
                        reply
                    };
                    return self.refused_by_owner(conn, &address, &owner, &reply).await;
                }
                Err(e) => return self.temp_failed(conn, &e.to_string()).await,
            }
        }
        self.auth_failed(conn, Some(&address), "owner does not have the account")
            .await
    }

    async fn forwarded(
        &mut self,
        conn: &mut Conn,
        owner: &Owner,
        owner_conn: (Conn, Option<crate::forward::Reuse>),
        reply: &[u8],
    ) -> Result<Flow> {
        let span = tracing::Span::current();
        span.record("user", owner.canonical.as_str());
        span.record("owner", owner.node.as_str());
        self.pop3.config.throttle.record_success(&owner.canonical);
        count_login("forwarded");
        tracing::info!("logged in on the owner, forwarding");
        conn.write_all(reply).await?;
        Ok(Flow::Splice(Box::new(owner_conn)))
    }

    async fn refused_by_owner(
        &mut self,
        conn: &mut Conn,
        address: &str,
        owner: &Owner,
        reply: &[u8],
    ) -> Result<Flow> {
        let text = String::from_utf8_lossy(reply);
        if text.starts_with("-ERR [AUTH]") || !text.starts_with("-ERR [") {
            // A failed login as far as throttling goes (the owner throttled too).
            self.pop3
                .config
                .throttle
                .record_failure(self.client.ip(), Some(address));
            self.failed_logins += 1;
            count_login("failed");
        } else if text.starts_with("-ERR [IN-USE]") {
            count_login("in_use");
        } else {
            count_login("tempfail");
        }
        tracing::info!(owner = %owner.node, reply = %text.trim_end(), "owner refused the login");
        conn.write_all(reply).await?;
        Ok(self.after_failure())
    }

    fn after_failure(&self) -> Flow {
        if self.failed_logins >= self.pop3.config.max_failed_logins {
            tracing::info!(
                failures = self.failed_logins,
                "too many failed logins, closing"
            );
            Flow::Close
        } else {
            Flow::Continue
        }
    }

    async fn auth_failed(
        &mut self,
        conn: &mut Conn,
        account: Option<&str>,
        reason: &str,
    ) -> Result<Flow> {
        self.pop3
            .config
            .throttle
            .record_failure(self.client.ip(), account);
        self.failed_logins += 1;
        count_login("failed");
        tracing::info!(account, reason, "login failed");
        conn.write_all(AUTH_FAILED.as_bytes()).await?;
        Ok(self.after_failure())
    }

    async fn temp_failed(&mut self, conn: &mut Conn, reason: &str) -> Result<Flow> {
        count_login("tempfail");
        tracing::warn!(reason, "login failed temporarily");
        conn.write_all(TEMP_FAILED.as_bytes()).await?;
        Ok(Flow::Continue)
    }

    async fn transaction(&mut self, conn: &mut Conn, command: Command) -> Result<Flow> {
        let State::Transaction { maildrop, .. } = &mut self.state else {
            return Ok(Flow::Continue);
        };
        let mut out = Vec::new();
        match command {
            Command::Stat => {
                let (count, size) = maildrop.stat();
                out.extend_from_slice(format!("+OK {count} {size}\r\n").as_bytes());
            }
            Command::List(None) => {
                let (count, size) = maildrop.stat();
                out.extend_from_slice(
                    format!("+OK {count} messages ({size} octets)\r\n").as_bytes(),
                );
                for (n, e) in maildrop.live() {
                    out.extend_from_slice(format!("{n} {}\r\n", e.size).as_bytes());
                }
                out.extend_from_slice(b".\r\n");
            }
            Command::List(Some(n)) => match maildrop.get(n) {
                Ok(e) => out.extend_from_slice(format!("+OK {n} {}\r\n", e.size).as_bytes()),
                Err(e) => out.extend_from_slice(e.reply().as_bytes()),
            },
            Command::Uidl(None) => {
                out.extend_from_slice(b"+OK unique-id listing follows\r\n");
                for (n, e) in maildrop.live() {
                    out.extend_from_slice(format!("{n} {}\r\n", maildrop.unique_id(e)).as_bytes());
                }
                out.extend_from_slice(b".\r\n");
            }
            Command::Uidl(Some(n)) => match maildrop.get(n) {
                Ok(e) => out
                    .extend_from_slice(format!("+OK {n} {}\r\n", maildrop.unique_id(e)).as_bytes()),
                Err(e) => out.extend_from_slice(e.reply().as_bytes()),
            },
            Command::Retr(n) => {
                self.send_message(conn, n, None).await?;
                return Ok(Flow::Continue);
            }
            Command::Top { msg, lines } => {
                self.send_message(conn, msg, Some(lines)).await?;
                return Ok(Flow::Continue);
            }
            Command::Dele(n) => match maildrop.delete(n) {
                Ok(()) => out.extend_from_slice(format!("+OK message {n} deleted\r\n").as_bytes()),
                Err(e) => out.extend_from_slice(e.reply().as_bytes()),
            },
            Command::Noop => out.extend_from_slice(b"+OK\r\n"),
            Command::Rset => {
                maildrop.reset();
                let (count, size) = maildrop.stat();
                out.extend_from_slice(
                    format!("+OK maildrop has {count} messages ({size} octets)\r\n").as_bytes(),
                );
            }
            _ => {
                conn.write_all(BAD_STATE.as_bytes()).await?;
                return Ok(if self.bad_command() {
                    Flow::Close
                } else {
                    Flow::Continue
                });
            }
        }
        conn.write_all(&out).await?;
        Ok(Flow::Continue)
    }

    /// RETR (`lines = None`) or TOP: the status line, the byte-stuffed message, the final dot;
    /// the message is read from the store and sent in chunks (TOP stops reading once it has its
    /// lines).
    async fn send_message(&self, conn: &mut Conn, n: u32, lines: Option<u32>) -> Result<()> {
        let State::Transaction { maildrop, .. } = &self.state else {
            return Ok(());
        };
        let entry = match maildrop.get(n) {
            Ok(e) => e,
            Err(e) => {
                conn.write_all(e.reply().as_bytes()).await?;
                return Ok(());
            }
        };
        let mail = &self.pop3.mail;
        let opened =
            mail.message(maildrop.account(), INBOX, entry.uid)
                .and_then(|meta| match meta {
                    Some(meta) => mail.open_message(&meta),
                    None => Ok(None),
                });
        let mut reader = match opened {
            Ok(Some(reader)) => reader,
            Ok(None) => {
                conn.write_all(b"-ERR message no longer available\r\n")
                    .await?;
                return Ok(());
            }
            Err(e) => {
                tracing::warn!(error = %e, uid = entry.uid, "reading a message failed");
                conn.write_all(b"-ERR [SYS/TEMP] cannot read the message now\r\n")
                    .await?;
                return Ok(());
            }
        };
        let status = match lines {
            None => format!("+OK {} octets\r\n", entry.size),
            Some(_) => "+OK top of message follows\r\n".to_string(),
        };
        conn.write_all(status.as_bytes()).await?;
        let mut stuffer = protocol::MessageStuffer::new(lines);
        let mut buf = vec![0u8; SEND_CHUNK];
        let mut out = Vec::with_capacity(SEND_CHUNK + SEND_CHUNK / 8);
        loop {
            // A failure here ends the session: the client already has `+OK` and part of the
            // message.
            let got = std::io::Read::read(&mut reader, &mut buf)?;
            if got == 0 {
                break;
            }
            out.clear();
            stuffer.push(&buf[..got], &mut out);
            conn.write_all(&out).await?;
            if stuffer.is_done() {
                break;
            }
        }
        out.clear();
        stuffer.finish(&mut out);
        out.extend_from_slice(b".\r\n");
        conn.write_all(&out).await?;
        Ok(())
    }

    /// Copy bytes between the client and the owner until either side closes, the splice is idle,
    /// or this node shuts down (both connections are then closed: the owner ends its session
    /// without an UPDATE and releases the maildrop).
    async fn splice(
        &self,
        client: Conn,
        owner: Conn,
        reuse: Option<crate::forward::Reuse>,
        shutdown: &Shutdown,
    ) -> Result<()> {
        let c = &self.pop3.config;
        let reuse = reuse.zip(c.proof_key.as_ref());
        let relayed = crate::relay::relay_session(
            client,
            owner,
            reuse,
            c.idle_timeout,
            c.peer_timeout,
            shutdown,
        )
        .await?;
        if relayed.link_kept {
            metrics::counter!("dshare_pop3_forward_links_kept_total").increment(1);
        }
        relayed.log();
        Ok(())
    }
}
