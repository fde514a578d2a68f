//! One IMAP connection: framing of the client's input over our [`LineConn`] (command lines up
//! to 64 KiB, literals up to their cap, `+` continuations sent here), `imap-next`'s sans-IO
//! [`Server`] as the parser and AUTHENTICATE/IDLE state machine, the states of RFC 3501 §3,
//! timeouts, limits, and the dispatch to [`crate::op`].
//!
//! Literals: the session reads them itself (so the cap depends on the command: the message
//! size for APPEND, [`crate::ImapConfig::max_literal`] otherwise) and feeds `imap-next` whole
//! messages with `{n}` rewritten to `{n+}`, so it never sends a continuation of its own.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use ds_access::imap_client::literal_announcement;
use ds_net::{ConnContext, LineConn, MailStream, Shutdown};
use imap_next::server::{Error as ServerError, Event, Options, Server};
use imap_next::{Interrupt, Io, State as _};
use imap_types::command::{Command, CommandBody};
use imap_types::core::Text;
use imap_types::response::{CommandContinuationRequest, Greeting};
use tracing::Instrument;

use crate::mailbox_view::MailboxView;
use crate::response::Reply;
use crate::{Imap, Result};

pub(crate) type Conn = LineConn<MailStream>;

/// RFC 3501 §3.
pub(crate) enum State {
    NotAuthenticated,
    Authenticated,
    Selected(Box<MailboxView>),
    Logout,
}

/// What the loop does after a command.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Flow {
    Continue,
    Close,
    StartTls,
}

enum Wake {
    Read(ds_net::Result<Option<Vec<u8>>>),
    Changed,
    Shutdown,
}

enum Input {
    /// A whole message (command, AUTHENTICATE line or DONE) for `imap-next`.
    Message(Vec<u8>),
    /// Answered here (a refused literal, an overlong line); read on.
    Handled,
    /// End the session (EOF, timeout, shutdown: the goodbye was written).
    Close,
}

pub(crate) struct Session {
    pub imap: Arc<Imap>,
    pub ctx: ConnContext,
    conn: Option<Conn>,
    server: Server,
    pub state: State,
    /// The logged-in account.
    pub account: String,
    /// ENABLE CONDSTORE, or a command that implies it, was seen.
    pub condstore: bool,
    pub client: IpAddr,
    failed_logins: u32,
    bad_commands: u32,
    /// The tag of a running IDLE.
    pub idle_tag: Option<String>,
    /// The tag of a running AUTHENTICATE.
    pub auth_tag: Option<String>,
    /// An event `drain` met that the main loop must handle.
    pending: Option<Event>,
    /// This connection's greeting nonce (`<…@host>`): the peer proof of a forwarded session is
    /// over it. Kept through STARTTLS.
    pub nonce: String,
    /// The front node's details, after an `ID` with a valid proof: this session is a forwarded
    /// one and is never forwarded again.
    pub forwarded: Option<ds_access::imap_client::ForwardedClient>,
    /// The owner's session after a forwarded login: spliced with the client's once the tagged
    /// answer is queued (with what it takes to keep the link when the client logs out).
    pub splice_to: Option<(
        ds_access::owner::OwnerConn,
        Option<ds_access::imap_client::Reuse>,
    )>,
    /// Uncached peer lookups this connection may still cause (DESIGN §9).
    pub fanouts: ds_access::FanoutBudget,
    /// The message of the APPEND being read, streamed into the body store (imap-next gets an
    /// empty literal in its place); taken by [`Session::append`].
    pub staged_append: Option<ds_store::StagedBody>,
}

/// What one message of APPEND may hold in memory while it is received (the writer's buffer and
/// one read), taken from the node's body budget.
const APPEND_IN_FLIGHT: u64 = (ds_store::INLINE_MAX + 2 * APPEND_CHUNK) as u64;
/// APPEND data goes to the body writer in pieces of at most this size.
const APPEND_CHUNK: usize = 64 * 1024;

/// How reading a streamed APPEND literal ended.
enum Streamed {
    Staged(ds_store::StagedBody),
    /// Read and dropped; this reply goes out once the command line is read.
    Refused(Reply),
    Close,
}

/// Run a connection to its end; errors are logged here, once.
pub(crate) async fn run(imap: Arc<Imap>, stream: MailStream, ctx: ConnContext, shutdown: Shutdown) {
    let span = tracing::info_span!(
        "imap",
        client = %ctx.peer,
        user = tracing::field::Empty,
        original_client = tracing::field::Empty,
        forwarded_by = tracing::field::Empty,
    );
    async move {
        let mut conn = LineConn::new(stream);
        conn.set_write_timeout(ds_net::DEFAULT_WRITE_TIMEOUT);
        let imap_hostname = imap.config.hostname.clone();
        let fanouts = imap.locator.fanout_budget();
        let mut session = Session {
            client: ctx.peer.ip(),
            server: new_server(&imap),
            imap,
            ctx,
            conn: Some(conn),
            state: State::NotAuthenticated,
            account: String::new(),
            condstore: false,
            failed_logins: 0,
            bad_commands: 0,
            idle_tag: None,
            auth_tag: None,
            pending: None,
            nonce: ds_access::proof::greeting_nonce(&imap_hostname),
            fanouts,
            forwarded: None,
            splice_to: None,
            staged_append: None,
        };
        match session.serve(&shutdown).await {
            Ok(()) => tracing::debug!("session ended"),
            Err(e) => tracing::info!(error = %e, "session ended with an error"),
        }
        if let Some(mut conn) = session.conn.take() {
            let _ = conn.shutdown().await;
        }
    }
    .instrument(span)
    .await;
}

fn new_server(imap: &Imap) -> Server {
    let mut options = Options::default();
    options.crlf_relaxed = true;
    let cap = imap.config.max_message_size.min(u32::MAX as usize / 2) as u32;
    options.max_literal_size = cap;
    options.max_command_size = cap.saturating_add(4 * 1024 * 1024);
    // The greeting is written by the session itself (it carries the capabilities); imap-next
    // gets a placeholder that is drained and dropped before the first read.
    let greeting = Greeting::ok(None, "ready").unwrap_or_else(|_| unreachable!("static text"));
    let mut server = Server::new(options, greeting);
    // Drop the placeholder greeting's bytes and its event.
    let _ = server.next();
    let _ = server.next();
    server
}

/// The tag at the start of a raw command, if it is a valid tag.
pub(crate) fn raw_tag(bytes: &[u8]) -> Option<String> {
    let end = bytes
        .iter()
        .position(|&b| b == b' ' || b == b'\r' || b == b'\n')
        .unwrap_or(bytes.len());
    let tag = &bytes[..end];
    let valid = !tag.is_empty()
        && tag.len() <= 64
        && tag
            .iter()
            .all(|&b| b > 0x20 && b < 0x7f && !b"(){%*\"\\+".contains(&b));
    valid.then(|| String::from_utf8_lossy(tag).into_owned())
}

/// The command name (second word) of a raw command, upper-cased.
fn raw_command(bytes: &[u8]) -> String {
    let mut words = bytes.split(|&b| b == b' ' || b == b'\r' || b == b'\n');
    let _tag = words.next();
    let mut name = words.next().unwrap_or_default().to_ascii_uppercase();
    if name == b"UID" {
        name = words.next().unwrap_or_default().to_ascii_uppercase();
    }
    String::from_utf8_lossy(&name).into_owned()
}

const KNOWN_COMMANDS: [&str; 30] = [
    "CAPABILITY",
    "NOOP",
    "LOGOUT",
    "STARTTLS",
    "AUTHENTICATE",
    "LOGIN",
    "SELECT",
    "EXAMINE",
    "CREATE",
    "DELETE",
    "RENAME",
    "SUBSCRIBE",
    "UNSUBSCRIBE",
    "LIST",
    "LSUB",
    "STATUS",
    "APPEND",
    "CHECK",
    "CLOSE",
    "EXPUNGE",
    "SEARCH",
    "FETCH",
    "STORE",
    "COPY",
    "MOVE",
    "IDLE",
    "ENABLE",
    "ID",
    "NAMESPACE",
    "UNSELECT",
];

/// A command of two words, tag and name, and nothing after them.
fn is_bare(message: &[u8]) -> bool {
    let line = message.strip_suffix(b"\n").unwrap_or(message);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    line.split(|&b| b == b' ').count() == 2
}

/// Whether the literal announced at the end of `message` is the message of an APPEND (not its
/// mailbox name): it is, unless it directly follows `APPEND` on the first line.
fn is_append_message(message: &[u8], line_start: usize) -> bool {
    if line_start > 0 {
        return true;
    }
    let Some(open) = message.iter().rposition(|&b| b == b'{') else {
        return false;
    };
    // `tag SP APPEND SP` then the announcement: the mailbox is the literal.
    let words: Vec<&[u8]> = message[..open]
        .split(|&b| b == b' ')
        .filter(|w| !w.is_empty())
        .collect();
    words.len() > 2
}

impl Session {
    pub(crate) fn server_mut(&mut self) -> &mut Server {
        &mut self.server
    }

    pub(crate) fn conn(&mut self) -> &mut Conn {
        self.conn
            .as_mut()
            .unwrap_or_else(|| unreachable!("connection taken"))
    }

    /// Queue bytes for the client.
    pub(crate) async fn send(&mut self, bytes: &[u8]) -> Result<()> {
        self.conn().write_all(bytes).await?;
        Ok(())
    }

    pub(crate) fn logged_in(&self) -> bool {
        matches!(self.state, State::Authenticated | State::Selected(_))
    }

    /// Passwords are refused before TLS unless the listener is exempt (loopback by default).
    pub(crate) fn login_disabled(&self) -> bool {
        !self.imap.config.tls_policy.password_allowed(&self.ctx)
    }

    pub(crate) fn starttls_available(&self) -> bool {
        self.imap.tls_acceptor.is_some() && !self.ctx.tls
    }

    /// The CAPABILITY list for the current state.
    pub(crate) fn capabilities(&self) -> String {
        let mut caps = String::from(
            "IMAP4rev1 LITERAL+ ID ENABLE IDLE NAMESPACE UNSELECT UIDPLUS MOVE SPECIAL-USE CHILDREN CONDSTORE",
        );
        if !self.logged_in() {
            if self.starttls_available() {
                caps.push_str(" STARTTLS");
            }
            if self.login_disabled() {
                caps.push_str(" LOGINDISABLED");
            } else {
                caps.push_str(" SASL-IR AUTH=PLAIN");
            }
        }
        caps
    }

    async fn serve(&mut self, shutdown: &Shutdown) -> Result<()> {
        let greeting = format!(
            "* OK [CAPABILITY {}] {} IMAP4rev1 ready {}\r\n",
            self.capabilities(),
            self.imap.config.hostname,
            self.nonce
        );
        self.send(greeting.as_bytes()).await?;
        loop {
            let next = match self.pending.take() {
                Some(event) => Ok(event),
                None => self.server.next(),
            };
            let flow = match next {
                Ok(event) => self.on_event(event).await?,
                Err(Interrupt::Io(Io::Output(bytes))) => {
                    self.send(&bytes).await?;
                    Flow::Continue
                }
                Err(Interrupt::Io(Io::NeedMoreInput)) => match self.read_message(shutdown).await? {
                    Input::Message(bytes) => {
                        self.server.enqueue_input(&bytes);
                        Flow::Continue
                    }
                    Input::Handled => Flow::Continue,
                    Input::Close => Flow::Close,
                },
                Err(Interrupt::Error(e)) => self.on_error(e).await?,
            };
            if let Some((owner, reuse)) = self.splice_to.take() {
                return self.splice(owner, reuse, shutdown).await;
            }
            match flow {
                Flow::Continue => {}
                Flow::Close => {
                    let _ = self.conn().flush().await;
                    return Ok(());
                }
                Flow::StartTls => self.start_tls().await?,
            }
        }
    }

    /// A forwarded login succeeded and its answer is queued: hand the client's pipelined bytes
    /// to the owner and copy both ways until either side ends.
    async fn splice(
        &mut self,
        owner: ds_access::owner::OwnerConn,
        reuse: Option<ds_access::imap_client::Reuse>,
        shutdown: &Shutdown,
    ) -> Result<()> {
        let client = self
            .conn
            .take()
            .unwrap_or_else(|| unreachable!("connection taken"));
        let c = &self.imap.config;
        let relayed = ds_access::imap_relay::relay_session(
            client,
            owner,
            reuse,
            c.idle_timeout,
            c.peer_timeout,
            shutdown,
        )
        .await;
        match relayed {
            Ok(relayed) => {
                if relayed.link_kept {
                    metrics::counter!("dshare_imap_forward_links_kept_total").increment(1);
                }
                relayed.log();
            }
            Err(e) => tracing::info!(error = %e, "forwarded session ended with an error"),
        }
        Ok(())
    }

    async fn start_tls(&mut self) -> Result<()> {
        let Some(acceptor) = self.imap.tls_acceptor.clone() else {
            return Ok(());
        };
        let conn = self
            .conn
            .take()
            .unwrap_or_else(|| unreachable!("connection taken"));
        let conn = conn
            .start_tls(&acceptor, self.imap.config.tls_handshake_timeout)
            .await?;
        self.ctx.update_from(conn.get_ref());
        self.conn = Some(conn);
        // Nothing said before the handshake counts (RFC 3501 §6.2.1).
        self.server = new_server(&self.imap);
        tracing::debug!(sni = ?self.ctx.sni, "STARTTLS done");
        Ok(())
    }

    /// Write what `imap-next` has queued (after `authenticate_*`/`idle_*`), so our own output
    /// follows it in order.
    pub(crate) async fn drain(&mut self) -> Result<()> {
        loop {
            match self.server.next() {
                Err(Interrupt::Io(Io::Output(bytes))) => self.send(&bytes).await?,
                Err(Interrupt::Io(Io::NeedMoreInput)) => return Ok(()),
                Ok(Event::ResponseSent { .. } | Event::GreetingSent { .. }) => {}
                Ok(event) => {
                    self.pending = Some(event);
                    return Ok(());
                }
                Err(Interrupt::Error(e)) => {
                    tracing::debug!(error = %e, "input error while draining");
                    return Ok(());
                }
            }
        }
    }

    fn read_timeout(&self) -> Duration {
        let c = &self.imap.config;
        if self.idle_tag.is_some() {
            c.idle_command_timeout
        } else if self.logged_in() {
            c.idle_timeout
        } else {
            c.auth_timeout
        }
    }

    /// A fresh start for the limits a session counts (a front node's link serves another
    /// client after `UNAUTHENTICATE`).
    pub(crate) fn reset_counters(&mut self) {
        self.failed_logins = 0;
        self.bad_commands = 0;
        self.fanouts = self.imap.locator.fanout_budget();
    }

    /// Count an invalid command; true once the session should be closed.
    fn bad_command(&mut self) -> bool {
        self.bad_commands += 1;
        self.bad_commands > self.imap.config.max_bad_commands
    }

    /// Read one whole message: a line and, while lines end with a literal announcement, the
    /// literal and the next line. Untagged updates are pushed here while IDLE waits.
    async fn read_message(&mut self, shutdown: &Shutdown) -> Result<Input> {
        let max_line = self.imap.config.max_line;
        let timeout = self.read_timeout();
        let first = loop {
            if !self.conn().buffered().contains(&b'\n') {
                self.conn().flush().await?;
            }
            let idling = self.idle_tag.is_some();
            let Session { conn, state, .. } = self;
            let conn = conn
                .as_mut()
                .unwrap_or_else(|| unreachable!("connection taken"));
            let watch = match state {
                State::Selected(view) if idling => Some(view.watch_mut()),
                _ => None,
            };
            let woke = async move {
                match watch {
                    Some(w) => {
                        if w.changed().await.is_err() {
                            std::future::pending::<()>().await;
                        }
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            let wake = tokio::select! {
                read = conn.read_line(max_line, timeout) => Wake::Read(read),
                () = woke => Wake::Changed,
                () = shutdown.wait() => Wake::Shutdown,
            };
            let read = match wake {
                Wake::Read(read) => read,
                Wake::Changed => {
                    // `changed()` marked the value seen: sync regardless.
                    self.sync_view(true, true).await?;
                    if matches!(self.state, State::Logout) {
                        return Ok(Input::Close);
                    }
                    continue;
                }
                Wake::Shutdown => {
                    self.send(b"* BYE [UNAVAILABLE] Server shutting down\r\n")
                        .await?;
                    return Ok(Input::Close);
                }
            };
            match read {
                Ok(Some(line)) => break line,
                Ok(None) => return Ok(Input::Close),
                Err(ds_net::Error::LineTooLong { .. }) => {
                    // Its tag is gone with it, and the client waits for one: say goodbye.
                    self.send(b"* BYE Command line too long\r\n").await?;
                    return Ok(Input::Close);
                }
                Err(ds_net::Error::Timeout) => {
                    tracing::debug!(?timeout, "idle timeout");
                    self.send(b"* BYE Idle timeout, closing\r\n").await?;
                    return Ok(Input::Close);
                }
                Err(ds_net::Error::UnexpectedEof) => return Ok(Input::Close),
                Err(e) => return Err(e.into()),
            }
        };
        if self.idle_tag.is_some() || self.auth_tag.is_some() {
            return Ok(Input::Message(first));
        }
        self.read_literals(first).await
    }

    /// Reads the `len` octets of an APPEND message (its continuation already sent) into the
    /// body store in bounded pieces, within the node's body budget; over the budget or when the
    /// store fails, the octets are read and dropped and the command refused.
    async fn stream_literal(&mut self, len: u64, c: &crate::ImapConfig) -> Result<Streamed> {
        let budget = c.body_budget.try_take(APPEND_IN_FLIGHT);
        let mut no_space = self.below_space_reserve();
        let mut writer = match &budget {
            Some(_) if no_space => None,
            Some(_) => match self.imap.store.bodies().writer() {
                Ok(w) => Some(w),
                Err(e) => {
                    tracing::error!(error = %e, "cannot start storing an APPEND");
                    None
                }
            },
            None => None,
        };
        let mut store_failed = budget.is_some() && writer.is_none() && !no_space;
        let mut left = len;
        while left > 0 {
            if writer.is_some() && self.below_space_reserve() {
                // Dropping the writer removes what was spilled of this message.
                writer = None;
                no_space = true;
            }
            let input = match self.conn().fill_buf(c.command_timeout).await {
                Ok(input) => input,
                Err(ds_net::Error::Timeout) => {
                    self.send(b"* BYE Timeout waiting for literal data\r\n")
                        .await?;
                    return Ok(Streamed::Close);
                }
                Err(ds_net::Error::UnexpectedEof) => return Ok(Streamed::Close),
                Err(e) => return Err(e.into()),
            };
            if input.is_empty() {
                return Ok(Streamed::Close);
            }
            let n = input.len().min(APPEND_CHUNK).min(left as usize);
            if let Some(w) = &mut writer
                && let Err(e) = w.write(&input[..n])
            {
                tracing::error!(error = %e, "storing an APPEND failed");
                writer = None;
                store_failed = true;
            }
            self.conn().consume(n);
            left -= n as u64;
        }
        if no_space {
            return Ok(Streamed::Refused(no_space_reply()));
        }
        if budget.is_none() {
            tracing::warn!("APPEND refused: bodies in flight over the node's budget");
            metrics::counter!("dshare_imap_appends_total", "result" => "no_budget").increment(1);
            return Ok(Streamed::Refused(
                Reply::no("Server busy, try again later").code("UNAVAILABLE"),
            ));
        }
        let finished = match writer {
            Some(w) if !store_failed => tokio::task::spawn_blocking(move || w.finish())
                .await?
                .map_err(crate::Error::from),
            _ => Err(crate::Error::Store(ds_store::Error::Conflict(
                "message body not stored".into(),
            ))),
        };
        drop(budget);
        match finished {
            Ok(body) => Ok(Streamed::Staged(body)),
            Err(e) => {
                tracing::error!(error = %e, "APPEND not stored");
                metrics::counter!("dshare_imap_appends_total", "result" => "error").increment(1);
                Ok(Streamed::Refused(
                    Reply::no("Cannot store the message now").code("SERVERBUG"),
                ))
            }
        }
    }

    /// The free-space reserve of the data disk (#13 point 19): true (logged) when an APPEND
    /// must wait. Asked for every message, so APPEND works again once space returns.
    fn below_space_reserve(&self) -> bool {
        match self.imap.store.check_free_space() {
            Ok(()) => false,
            Err(e) => {
                tracing::warn!(error = %e, "APPEND refused: data disk below its reserve");
                metrics::counter!("dshare_imap_appends_total", "result" => "no_space").increment(1);
                true
            }
        }
    }

    /// The rest of a message whose first line is `first`.
    async fn read_literals(&mut self, first: Vec<u8>) -> Result<Input> {
        self.staged_append = None;
        let c = self.imap.config.clone();
        let tag = raw_tag(&first).unwrap_or_else(|| "*".into());
        let append = raw_command(&first) == "APPEND";
        let cap = if append {
            c.max_message_size
        } else {
            c.max_literal
        };
        let total_cap = cap + 4 * c.max_line;
        let mut message = first;
        let mut line_start = 0;
        while let Some((len, sync)) = literal_announcement(&message[line_start..]) {
            let too_big = len > cap as u64 || message.len() as u64 + len > total_cap as u64;
            if too_big {
                tracing::info!(len, cap, "literal refused");
                let reply = if append {
                    Reply::no("Message too large").code("TOOBIG")
                } else {
                    Reply::bad("Literal too large")
                };
                self.send(&reply.line(&tag)).await?;
                if sync {
                    return Ok(Input::Handled);
                }
                // A non-synchronising literal is on its way: nothing can be trusted after it.
                self.send(b"* BYE Literal too large\r\n").await?;
                return Ok(Input::Close);
            }
            if sync
                && append
                && is_append_message(&message, line_start)
                && self.below_space_reserve()
            {
                // The client waits for `+`: it sends nothing of the message.
                self.send(&no_space_reply().line(&tag)).await?;
                return Ok(Input::Handled);
            }
            if sync {
                // `{n}` → `{n+}` for imap-next, which then sends no continuation itself.
                let end = message.len() - if message.ends_with(b"\r\n") { 3 } else { 2 };
                message.insert(end, b'+');
                self.send(b"+ Ready for literal data\r\n").await?;
                self.conn().flush().await?;
            }
            if append && is_append_message(&message, line_start) {
                let refused = match self.stream_literal(len, &c).await? {
                    Streamed::Staged(body) => {
                        self.staged_append = Some(body);
                        None
                    }
                    Streamed::Refused(reply) => Some(reply),
                    Streamed::Close => return Ok(Input::Close),
                };
                // imap-next parses the command with an empty literal in place of the message.
                let open = message
                    .iter()
                    .rposition(|&b| b == b'{')
                    .unwrap_or(message.len());
                message.truncate(open);
                message.extend_from_slice(b"{0+}\r\n");
                line_start = message.len();
                let line = match self.conn().read_line(c.max_line, c.command_timeout).await {
                    Ok(Some(line)) => line,
                    Ok(None) | Err(ds_net::Error::UnexpectedEof) => return Ok(Input::Close),
                    Err(ds_net::Error::LineTooLong { .. }) => {
                        self.staged_append = None;
                        self.send(&Reply::bad("Command line too long").line(&tag))
                            .await?;
                        return Ok(Input::Handled);
                    }
                    Err(ds_net::Error::Timeout) => {
                        self.send(b"* BYE Timeout waiting for the command\r\n")
                            .await?;
                        return Ok(Input::Close);
                    }
                    Err(e) => return Err(e.into()),
                };
                if let Some(reply) = refused {
                    self.send(&reply.line(&tag)).await?;
                    return Ok(Input::Handled);
                }
                message.extend_from_slice(&line);
                continue;
            }
            let len = len as usize;
            let literal = match self.conn().read_exact(len, cap, c.command_timeout).await {
                Ok(l) => l,
                Err(ds_net::Error::Timeout) => {
                    self.send(b"* BYE Timeout waiting for literal data\r\n")
                        .await?;
                    return Ok(Input::Close);
                }
                Err(ds_net::Error::UnexpectedEof) => return Ok(Input::Close),
                Err(e) => return Err(e.into()),
            };
            message.extend_from_slice(&literal);
            drop(literal);
            line_start = message.len();
            match self.conn().read_line(c.max_line, c.command_timeout).await {
                Ok(Some(line)) => message.extend_from_slice(&line),
                Ok(None) | Err(ds_net::Error::UnexpectedEof) => return Ok(Input::Close),
                Err(ds_net::Error::LineTooLong { .. }) => {
                    self.send(&Reply::bad("Command line too long").line(&tag))
                        .await?;
                    return Ok(Input::Handled);
                }
                Err(ds_net::Error::Timeout) => {
                    self.send(b"* BYE Timeout waiting for the command\r\n")
                        .await?;
                    return Ok(Input::Close);
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(Input::Message(message))
    }

    async fn on_error(&mut self, e: ServerError) -> Result<Flow> {
        let discarded = match &e {
            ServerError::ExpectedCrlfGotLf { discarded_bytes }
            | ServerError::MalformedMessage { discarded_bytes }
            | ServerError::LiteralTooLong { discarded_bytes }
            | ServerError::CommandTooLong { discarded_bytes } => {
                discarded_bytes.declassify().to_vec()
            }
        };
        if self.idle_tag.is_some() {
            // Anything but DONE during IDLE.
            let tag = self.idle_tag.take().unwrap_or_default();
            self.server = new_server(&self.imap);
            self.send(&Reply::bad("Expected DONE").line(&tag)).await?;
            return Ok(Flow::Continue);
        }
        if let Some(tag) = self.auth_tag.take() {
            self.server = new_server(&self.imap);
            self.send(&Reply::bad("Invalid SASL response").line(&tag))
                .await?;
            return Ok(Flow::Continue);
        }
        let tag = raw_tag(&discarded).unwrap_or_else(|| "*".into());
        let name = raw_command(&discarded);
        if name == "UNAUTHENTICATE" && is_bare(&discarded) {
            // Not known to imap-codec: answered here (a front node ending a forwarded session).
            return self.unauthenticate(&tag).await;
        }
        let text = if name.is_empty() {
            "Empty command".to_string()
        } else if KNOWN_COMMANDS.contains(&name.as_str()) {
            format!("Syntax error in {name} arguments")
        } else {
            "Unknown command".to_string()
        };
        tracing::debug!(%tag, command = %name, "malformed command");
        self.send(&Reply::bad(text).line(&tag)).await?;
        if self.bad_command() {
            self.send(b"* BYE Too many invalid commands\r\n").await?;
            return Ok(Flow::Close);
        }
        Ok(Flow::Continue)
    }

    async fn on_event(&mut self, event: Event) -> Result<Flow> {
        match event {
            Event::GreetingSent { .. } | Event::ResponseSent { .. } => Ok(Flow::Continue),
            Event::CommandReceived { command } => self.command(command).await,
            Event::CommandAuthenticateReceived {
                command_authenticate,
            } => self.authenticate(command_authenticate).await,
            Event::AuthenticateDataReceived { authenticate_data } => {
                self.authenticate_data(authenticate_data).await
            }
            Event::IdleCommandReceived { tag } => self.idle(tag.inner().to_string()).await,
            Event::IdleDoneReceived => self.idle_done().await,
        }
    }

    /// Answer AUTHENTICATE/IDLE through imap-next (it tracks their state).
    pub(crate) fn continuation(text: &str) -> CommandContinuationRequest<'static> {
        CommandContinuationRequest::basic(None, Text::unvalidated(text.to_string()))
            .unwrap_or_else(|_| CommandContinuationRequest::base64(Vec::new()))
    }

    async fn command(&mut self, command: Command<'static>) -> Result<Flow> {
        let tag = command.tag.inner().to_string();
        let name = command.body.name();
        tracing::trace!(command = name, "command");
        // Which untagged updates may follow the command (RFC 3501 §7.4.1).
        let expunge_ok = !matches!(
            command.body,
            CommandBody::Fetch { uid: false, .. }
                | CommandBody::Store { uid: false, .. }
                | CommandBody::Search { uid: false, .. }
        );
        let logout = matches!(command.body, CommandBody::Logout);
        let (reply, flow) = self.dispatch(&tag, command.body).await?;
        if reply.kind == "BAD" && self.bad_command() {
            self.send(&reply.line(&tag)).await?;
            self.send(b"* BYE Too many invalid commands\r\n").await?;
            return Ok(Flow::Close);
        }
        if flow == Flow::Continue && matches!(self.state, State::Selected(_)) {
            self.push_updates(expunge_ok).await?;
        }
        if matches!(self.state, State::Logout) {
            if logout {
                self.send(b"* BYE Logging out\r\n").await?;
            }
            self.send(&reply.line(&tag)).await?;
            return Ok(Flow::Close);
        }
        self.send(&reply.line(&tag)).await?;
        if reply.kind == "NO"
            && reply.code.as_deref() == Some("AUTHENTICATIONFAILED")
            && self.after_failed_login()
        {
            self.send(b"* BYE Too many failed logins\r\n").await?;
            return Ok(Flow::Close);
        }
        Ok(flow)
    }

    /// Count a failed login; true once the session should be closed.
    pub(crate) fn after_failed_login(&mut self) -> bool {
        self.failed_logins += 1;
        self.failed_logins >= self.imap.config.max_failed_logins
    }

    /// Send what changed in the selected mailbox since the client last heard.
    pub(crate) async fn push_updates(&mut self, allow_expunge: bool) -> Result<()> {
        self.sync_view(allow_expunge, false).await
    }

    async fn sync_view(&mut self, allow_expunge: bool, force: bool) -> Result<()> {
        let condstore = self.condstore;
        let mail = self.imap.mail.clone();
        let State::Selected(view) = &mut self.state else {
            return Ok(());
        };
        let pending_expunge = allow_expunge && view.messages.iter().any(|m| m.expunged);
        if !(force || view.has_changed() || pending_expunge) {
            return Ok(());
        }
        let out = view.sync(&mail, allow_expunge, condstore)?;
        let gone = view.gone;
        if !out.is_empty() {
            self.send(&out).await?;
        }
        if gone && allow_expunge {
            // Its sequence numbers mean nothing any more: end the session (as Dovecot does).
            self.send(b"* BYE [UNAVAILABLE] The selected mailbox was deleted or renamed\r\n")
                .await?;
            self.state = State::Logout;
        }
        Ok(())
    }
}

/// APPEND while the data disk is below its reserve (Dovecot answers a full disk the same way).
fn no_space_reply() -> Reply {
    Reply::no("Not enough disk space, try again later").code("OVERQUOTA")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn append_message_literals() {
        assert!(is_append_message(b"a APPEND INBOX {5}\r\n", 0));
        assert!(is_append_message(b"a APPEND INBOX (\\Seen) {5+}\r\n", 0));
        assert!(!is_append_message(b"a APPEND {5}\r\n", 0));
        assert!(is_append_message(b"a APPEND {5+}\r\nINBOX {3}\r\n", 17));
    }

    #[test]
    fn literal_announcements() {
        assert_eq!(literal_announcement(b"a LOGIN {5}\r\n"), Some((5, true)));
        assert_eq!(
            literal_announcement(b"a APPEND x {12+}\r\n"),
            Some((12, false))
        );
        assert_eq!(literal_announcement(b"a APPEND x {}\r\n"), None);
        assert_eq!(literal_announcement(b"a NOOP\r\n"), None);
        assert_eq!(literal_announcement(b"a X {1a}\r\n"), None);
    }

    #[test]
    fn tags_and_names() {
        assert_eq!(raw_tag(b"a1 NOOP\r\n").as_deref(), Some("a1"));
        assert_eq!(raw_tag(b"\r\n"), None);
        assert_eq!(raw_tag(b"a{ NOOP\r\n"), None);
        assert_eq!(raw_command(b"a1 uid fetch 1 FLAGS\r\n"), "FETCH");
    }
}
