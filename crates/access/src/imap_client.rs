//! IMAP forwarding, front side (DESIGN.md §7): open a session on the owner of an account and log
//! in there with the client's password, passing the client's address in an `ID` command with
//! Dovecot's keys and the peer proof. The IMAP server relays the outcome to its client (its own
//! tag, `OK [CAPABILITY <owner's>]`, `NO [AUTHENTICATIONFAILED]`, `NO [UNAVAILABLE]`) and, on
//! success, hands both connections to [`crate::splice_session`].
//!
//! The dialogue, after an optional `STARTTLS` verified against the cluster CA (sent right after
//! connecting, without waiting for the greeting):
//!
//! ```text
//! S: * OK [CAPABILITY IMAP4rev1 ...] owner.example ready <nonce>
//! C: ds1 ID ("x-originating-ip" "203.0.113.9" "x-originating-port" "51234"
//!        "x-connected-ip" "192.0.2.1" "x-session-id" "9f0c…" "x-dshare-hop" "1" "x-dshare-sig" "…")
//! C: ds2 LOGIN "bob@company.com" "password"          (a literal when a quoted string cannot hold it)
//! S: * ID NIL
//! S: ds1 OK ID completed
//! S: ds2 OK [CAPABILITY IMAP4rev1 ...] Logged in     (or ds3 CAPABILITY is asked)
//! ```
//!
//! A quoted LOGIN is pipelined behind ID (one round trip); one with a literal waits for the ID
//! answer and the literal's continuation.
//!
//! **The nonce** is the first `<…@…>` token of the owner's greeting line (the greeting the
//! client side reads first, before any STARTTLS), made with [`crate::proof::greeting_nonce`] and
//! found with [`crate::proof::nonce_in`]. The owner keeps it for the whole connection.
//!
//! **The proof** ([`ID_SIG`]) is [`crate::proof::sign`] over the nonce and the fields, in this
//! order: `x-originating-ip`, `x-originating-port`, `x-connected-ip`, `x-session-id`,
//! `x-dshare-hop`. The owner checks it with [`verify_imap_id`]; without a valid proof it ignores
//! every one of these fields. A session with a valid proof is a forwarded one: the owner never
//! forwards its login again, and answers a login for an account it does not have with
//! [`NOT_HERE_TEXT`], so the front node can drop its cached owner and locate once more.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ds_net::{ConnContext, TlsConnector};

use crate::owner::{self as link, OwnerConn};
use crate::proof::{self, ProofKey};
use crate::warm::WarmPool;

/// `ID` key: the client's address as the front node saw it.
pub const ID_ORIGINATING_IP: &str = "x-originating-ip";
/// `ID` key: the client's port.
pub const ID_ORIGINATING_PORT: &str = "x-originating-port";
/// `ID` key: the front node's address the client connected to.
pub const ID_CONNECTED_IP: &str = "x-connected-ip";
/// `ID` key: the front node's id for the session (in both nodes' logs).
pub const ID_SESSION_ID: &str = "x-session-id";
/// `ID` key: how many nodes have forwarded this session (1 from the front node).
pub const ID_HOP: &str = "x-dshare-hop";
/// `ID` key: the peer proof, lower-case hex.
pub const ID_SIG: &str = "x-dshare-sig";

/// The text of the owner's tagged `NO [AUTHENTICATIONFAILED]` to a forwarded login for an
/// account it does not have (the front node's cached owner is stale).
pub const NOT_HERE_TEXT: &str = "Authentication failed (no such account on this node)";

/// Longest response line read from the owner (literals included).
const MAX_RESPONSE: usize = 64 * 1024;
/// Most untagged responses read while waiting for one tagged response.
const MAX_UNTAGGED: usize = 256;

/// How to secure the connection to the owner.
#[derive(Clone, Copy)]
pub enum OwnerTls<'a> {
    /// No verified TLS (a cluster without a CA): [`login_at_owner`] refuses to send the
    /// password and answers [`OwnerLoginError::Unavailable`] without connecting (#13 point 2).
    None,
    /// `STARTTLS` after the greeting (the owner's `imap` endpoint).
    StartTls(&'a TlsConnector),
    /// TLS from the first octet (an `imaps` endpoint).
    Implicit(&'a TlsConnector),
}

impl std::fmt::Debug for OwnerTls<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            OwnerTls::None => "None",
            OwnerTls::StartTls(_) => "StartTls",
            OwnerTls::Implicit(_) => "Implicit",
        })
    }
}

/// Bounds on setting a forwarded login up.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// Connecting, and each response of the owner (its password check may be throttled).
    pub reply: Duration,
    /// The TLS handshake.
    pub tls_handshake: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            reply: Duration::from_secs(30),
            tls_handshake: Duration::from_secs(10),
        }
    }
}

/// Everything [`login_at_owner`] needs. Its `Debug` leaves the password out.
#[derive(Clone, Copy)]
pub struct OwnerLogin<'a> {
    /// The owner's IMAP endpoint, `host:port`.
    pub endpoint: &'a str,
    /// TLS to the owner (a connector that trusts the cluster CA only).
    pub tls: OwnerTls<'a>,
    /// The name the owner's certificate must carry; empty: the host of `endpoint`.
    pub server_name: &'a str,
    /// The account's canonical name on the owner.
    pub canonical: &'a str,
    /// The client's password; sent to the owner only, never kept.
    pub password: &'a str,
    /// The client's connection to this node.
    pub client: &'a ConnContext,
    /// This node's id for the session, sent as `x-session-id`.
    pub session_id: &'a str,
    /// The session-proof key.
    pub key: &'a ProofKey,
    /// The hop count to send (1 from the node the client connected to).
    pub hop: u32,
    /// Bounds.
    pub timeouts: Timeouts,
}

impl std::fmt::Debug for OwnerLogin<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnerLogin")
            .field("endpoint", &self.endpoint)
            .field("tls", &self.tls)
            .field("server_name", &self.server_name)
            .field("canonical", &self.canonical)
            .field("client", &self.client.peer)
            .field("session_id", &self.session_id)
            .field("hop", &self.hop)
            .field("timeouts", &self.timeouts)
            .finish_non_exhaustive()
    }
}

/// The capability a logged-in forwarded session on the owner shows when the owner can
/// `UNAUTHENTICATE` it for the front node (the front node never shows it to its client).
pub const UNAUTHENTICATE_CAPABILITY: &str = "XDSHARE-UNAUTHENTICATE";

/// What the front node needs to keep an owner link for another login.
#[derive(Debug)]
pub struct Reuse {
    /// The owner connection's nonce (the one the login's proof was over).
    pub nonce: String,
    /// The cluster's proof key.
    pub key: ProofKey,
    /// The link's place in the pool; the loan ends with the session.
    pub loan: crate::warm::Loan<ReadyConn>,
}

/// A session logged in on the owner: splice `conn` with the client after answering it.
#[derive(Debug)]
pub struct OwnerSession {
    /// The connection, after the owner's tagged `OK` to `LOGIN` (nothing else is buffered from it
    /// unless the owner sent untagged data early; [`crate::splice_session`] passes that on).
    pub conn: OwnerConn,
    /// The owner's capabilities after login, as atoms (`IMAP4rev1`, `IDLE`, …).
    pub capabilities: Vec<String>,
    /// The login used a warm connection from a [`WarmPool`].
    pub warm: bool,
    /// That warm connection had served a session before (see `imap_relay`).
    pub reused: bool,
    /// The owner can end this session with `UNAUTHENTICATE` and the link can go back to the
    /// pool: give it to `imap_relay::relay_session`.
    pub reuse: Option<Reuse>,
}

/// Why a forwarded login did not open a session.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OwnerLoginError {
    /// The owner refused the credentials: the client gets `NO [AUTHENTICATIONFAILED]`.
    #[error("the owner refused the credentials: {0}")]
    BadCredentials(String),
    /// The owner does not have the account ([`NOT_HERE_TEXT`]): locate again once.
    #[error("the owner does not have the account")]
    NotHere,
    /// The owner could not be used (unreachable, TLS, proof refused, protocol, `[UNAVAILABLE]`):
    /// the client gets `NO [UNAVAILABLE]`.
    #[error("owner unavailable: {0}")]
    Unavailable(String),
}

type LoginResult<T> = Result<T, OwnerLoginError>;

fn unavailable(reason: impl std::fmt::Display) -> OwnerLoginError {
    OwnerLoginError::Unavailable(reason.to_string())
}

/// The client's address and the forwarding details from a verified `ID`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardedClient {
    /// The real client.
    pub addr: SocketAddr,
    /// The front node's address the client connected to.
    pub connected_ip: IpAddr,
    /// The front node's session id.
    pub session_id: String,
    /// How many nodes forwarded the session (at least 1).
    pub hop: u32,
}

/// A connection to an owner made ready for a forwarded login by [`open_owner`]: connected,
/// TLS verified, the greeting read and its nonce kept. It may wait in a [`WarmPool`] (below the
/// owner's pre-login timeout) until a login takes it.
#[derive(Debug)]
pub struct ReadyConn {
    conn: OwnerConn,
    nonce: String,
    literal_plus: bool,
    reused: bool,
}

impl ReadyConn {
    /// A link whose session the owner ended with `UNAUTHENTICATE`, answered with `nonce`.
    pub(crate) fn reused(conn: OwnerConn, nonce: String) -> Self {
        Self {
            conn,
            nonce,
            literal_plus: false,
            reused: true,
        }
    }
}

/// Connect to the owner's IMAP `endpoint` and make the connection ready for a login: TLS as
/// `tls` says (verified for `server_name`, empty: the host of `endpoint`), the greeting read.
pub async fn open_owner(
    endpoint: &str,
    tls: OwnerTls<'_>,
    server_name: &str,
    t: Timeouts,
) -> LoginResult<ReadyConn> {
    let server_name = if server_name.is_empty() {
        link::host_of(endpoint)
    } else {
        server_name
    };
    if let OwnerTls::None = tls {
        tracing::warn!(
            %endpoint,
            "not forwarding an IMAP login: no cluster CA configured, and a password is never sent without verified TLS"
        );
        return Err(unavailable(
            "no verified TLS (no cluster CA): the password is never sent in plaintext",
        ));
    }
    let mut conn = link::connect(endpoint, t.reply)
        .await
        .map_err(unavailable)?;
    if let OwnerTls::StartTls(_) = tls {
        // Sent at once, not after the greeting: the owner reads it once it has greeted, and a
        // round trip is saved on every forwarded login.
        write_command(&mut conn, b"ds0 STARTTLS\r\n").await?;
        flush(&mut conn).await?;
    }
    if let OwnerTls::Implicit(connector) = tls {
        let (stream, _) = conn.into_parts();
        let stream = stream
            .connect_tls(connector, server_name, t.tls_handshake)
            .await
            .map_err(|e| unavailable(format!("TLS: {e}")))?;
        conn = OwnerConn::new(stream);
    }
    let greeting = read_response(&mut conn, endpoint, t.reply).await?;
    let Some(rest) = strip_prefix_ci(&greeting, b"* OK") else {
        return Err(unavailable(format!(
            "greeting: {}",
            String::from_utf8_lossy(&greeting).trim_end()
        )));
    };
    let nonce = proof::nonce_in(rest)
        .ok_or_else(|| unavailable("greeting without a nonce"))?
        .to_owned();
    let mut literal_plus = capabilities_in(rest)
        .is_some_and(|caps| caps.iter().any(|c| c.eq_ignore_ascii_case("LITERAL+")));

    if let OwnerTls::StartTls(connector) = tls {
        let done = read_tagged(&mut conn, endpoint, "ds0", t.reply).await?;
        if done.status != Status::Ok {
            return Err(unavailable(format!("STARTTLS refused: {}", done.text)));
        }
        conn = link::start_tls(conn, endpoint, connector, t.tls_handshake)
            .await
            .map_err(unavailable)?;
        // RFC 3501 §6.2.1: what was said before TLS is forgotten; LITERAL+ is asked again below
        // only if needed.
        literal_plus = false;
    }
    Ok(ReadyConn {
        conn,
        nonce,
        literal_plus,
        reused: false,
    })
}

/// Connect to the owner, pass the client's address with the proof, and log in as
/// `login.canonical` with `login.password`.
pub async fn login_at_owner(login: OwnerLogin<'_>) -> LoginResult<OwnerSession> {
    let ready = open_owner(login.endpoint, login.tls, login.server_name, login.timeouts).await?;
    login_on(ready, &login).await.map_err(|(e, _)| e)
}

/// [`login_at_owner`] on a warm connection from `pool` when there is one (one round trip to
/// the owner instead of three), refilling the pool in the background. A warm connection the
/// owner has closed meanwhile (it restarted) costs a fresh one, not a failed login.
pub async fn login_at_owner_pooled(
    login: OwnerLogin<'_>,
    pool: &Arc<WarmPool<ReadyConn>>,
) -> LoginResult<OwnerSession> {
    let (connector, implicit) = match login.tls {
        OwnerTls::None => return login_at_owner(login).await,
        OwnerTls::StartTls(c) => (c.clone(), false),
        OwnerTls::Implicit(c) => (c.clone(), true),
    };
    let key = format!("{} {} {implicit}", login.endpoint, login.server_name);
    let (warm, loan) = pool.lend_and_refill(
        &key,
        |ready| link::is_quiet(&mut ready.conn),
        || {
            let connector = connector.clone();
            let (endpoint, server_name) = (login.endpoint.to_owned(), login.server_name.to_owned());
            let timeouts = login.timeouts;
            async move {
                let tls = if implicit {
                    OwnerTls::Implicit(&connector)
                } else {
                    OwnerTls::StartTls(&connector)
                };
                open_owner(&endpoint, tls, &server_name, timeouts).await
            }
        },
    );
    let lend = |mut session: OwnerSession, nonce: String| {
        if let Some(loan) = loan
            && session
                .capabilities
                .iter()
                .any(|c| c.eq_ignore_ascii_case(UNAUTHENTICATE_CAPABILITY))
        {
            session.reuse = Some(Reuse {
                nonce,
                key: login.key.clone(),
                loan,
            });
        }
        session
    };
    if let Some(ready) = warm {
        let (reused, nonce) = (ready.reused, ready.nonce.clone());
        match login_on(ready, &login).await {
            Ok(session) => {
                let session = OwnerSession {
                    warm: true,
                    reused,
                    ..session
                };
                return Ok(lend(session, nonce));
            }
            Err((e, false)) => return Err(e),
            Err((e, true)) => {
                tracing::debug!(endpoint = %login.endpoint, error = %e, "a warm connection was closed by the owner; opening a fresh one");
                pool.clear(&key);
            }
        }
    }
    let ready = open_owner(login.endpoint, login.tls, login.server_name, login.timeouts).await?;
    let nonce = ready.nonce.clone();
    let session = login_on(ready, &login).await.map_err(|(e, _)| e)?;
    Ok(lend(session, nonce))
}

/// `ID` with the proof and `LOGIN` on a ready connection. An error comes with whether the
/// connection was dead before the owner answered anything (a warm connection the owner
/// closed: worth one fresh try).
async fn login_on(
    ready: ReadyConn,
    login: &OwnerLogin<'_>,
) -> Result<OwnerSession, (OwnerLoginError, bool)> {
    let t = login.timeouts;
    let ReadyConn {
        mut conn,
        nonce,
        literal_plus,
        reused: _,
    } = ready;
    let id = id_command("ds1", &nonce, login).map_err(|e| (e, false))?;
    // LOGIN goes with ID when it needs no literal (one round trip instead of two): the owner
    // reads them in order, ID first. The password goes to the same verified owner either way.
    let quoted_login = quoted_login_command(login).map_err(|e| (e, false))?;
    let sent = async {
        write_command(&mut conn, id.as_bytes()).await?;
        if let Some(line) = &quoted_login {
            write_command(&mut conn, line).await?;
        }
        flush(&mut conn).await?;
        read_tagged(&mut conn, login.endpoint, "ds1", t.reply).await
    };
    let done = sent.await.map_err(|e| (e, true))?;
    if done.status != Status::Ok {
        return Err((unavailable(format!("ID refused: {}", done.text)), false));
    }
    finish_login(conn, login, quoted_login.is_some(), literal_plus)
        .await
        .map_err(|e| (e, false))
}

/// The rest of a forwarded login once `ID` was accepted: `LOGIN`'s answer (and the
/// capabilities, asked for if the owner did not send them with it).
async fn finish_login(
    mut conn: OwnerConn,
    login: &OwnerLogin<'_>,
    login_sent: bool,
    literal_plus: bool,
) -> LoginResult<OwnerSession> {
    let t = login.timeouts;
    let done = if login_sent {
        read_tagged(&mut conn, login.endpoint, "ds2", t.reply).await?
    } else {
        send_login(&mut conn, login, literal_plus).await?
    };
    match done.status {
        Status::Ok => {}
        Status::No if done.text.contains(NOT_HERE_TEXT) => return Err(OwnerLoginError::NotHere),
        Status::No if done.code.eq_ignore_ascii_case("UNAVAILABLE") => {
            return Err(unavailable(format!("LOGIN: {}", done.text)));
        }
        Status::No => return Err(OwnerLoginError::BadCredentials(done.text)),
        Status::Bad => return Err(unavailable(format!("LOGIN: BAD {}", done.text))),
    }
    let capabilities = match done.capabilities {
        Some(caps) => caps,
        None => {
            let done = tagged(
                &mut conn,
                login.endpoint,
                "ds3",
                b"ds3 CAPABILITY\r\n",
                t.reply,
            )
            .await?;
            match (done.status, done.capabilities) {
                (Status::Ok, Some(caps)) => caps,
                _ => return Err(unavailable("no CAPABILITY after login")),
            }
        }
    };
    Ok(OwnerSession {
        conn,
        capabilities,
        warm: false,
        reused: false,
        reuse: None,
    })
}

/// The owner-side check of a forwarded session's `ID` fields (`(key, value)`, keys compared
/// case-insensitively; a `NIL` value is `None`) for this connection's greeting `nonce`. `Some`
/// only with every field present and well-formed, a hop of at least 1 and a valid proof.
pub fn verify_imap_id<'a>(
    fields: impl IntoIterator<Item = (&'a str, Option<&'a str>)>,
    nonce: &str,
    key: &ProofKey,
) -> Option<ForwardedClient> {
    let mut values: [Option<&str>; 6] = [None; 6];
    let keys = [
        ID_ORIGINATING_IP,
        ID_ORIGINATING_PORT,
        ID_CONNECTED_IP,
        ID_SESSION_ID,
        ID_HOP,
        ID_SIG,
    ];
    for (k, v) in fields {
        if let Some(i) = keys.iter().position(|known| known.eq_ignore_ascii_case(k)) {
            if values[i].is_some() {
                return None; // a key given twice: refuse rather than guess
            }
            values[i] = Some(v?);
        }
    }
    let [
        Some(ip),
        Some(port),
        Some(connected),
        Some(session_id),
        Some(hop),
        Some(sig),
    ] = values
    else {
        return None;
    };
    if !proof::verify(key, nonce, &[ip, port, connected, session_id, hop], sig) {
        return None;
    }
    let hop: u32 = hop.parse().ok().filter(|&h| h >= 1)?;
    Some(ForwardedClient {
        addr: SocketAddr::new(ip.parse().ok()?, port.parse().ok()?),
        connected_ip: connected.parse().ok()?,
        session_id: session_id.to_owned(),
        hop,
    })
}

/// `tag ID (...)` with the client's address and the proof, CRLF included.
fn id_command(tag: &str, nonce: &str, login: &OwnerLogin<'_>) -> LoginResult<String> {
    let ip = login.client.peer.ip().to_string();
    let port = login.client.peer.port().to_string();
    let connected = login.client.local.ip().to_string();
    let hop = login.hop.to_string();
    let session_id = login.session_id;
    if !session_id
        .bytes()
        .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
    {
        return Err(unavailable("session id not sendable as a quoted string"));
    }
    let sig = proof::sign(
        login.key,
        nonce,
        &[&ip, &port, &connected, session_id, &hop],
    )
    .ok_or_else(|| unavailable("cannot sign the ID fields"))?;
    let pairs = [
        (ID_ORIGINATING_IP, ip.as_str()),
        (ID_ORIGINATING_PORT, &port),
        (ID_CONNECTED_IP, &connected),
        (ID_SESSION_ID, session_id),
        (ID_HOP, &hop),
        (ID_SIG, &sig),
    ];
    let list: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("\"{k}\" \"{v}\""))
        .collect();
    Ok(format!("{tag} ID ({})\r\n", list.join(" ")))
}

/// Whether `s` can be sent as an IMAP quoted string (7-bit TEXT-CHARs).
fn quotable(s: &str) -> bool {
    s.bytes()
        .all(|b| (0x01..0x80).contains(&b) && b != b'\r' && b != b'\n')
}

fn quoted(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// `ds2 LOGIN name password`, each a quoted string or, when it cannot be one, a literal
/// (`{n+}` when the owner advertised LITERAL+, else a synchronising literal that waits for the
/// owner's `+`). A NUL can be sent in neither: such a password is refused as bad credentials.
/// `ds2 LOGIN "name" "password"` when both can be quoted (`None`: a literal is needed, see
/// [`send_login`]).
fn quoted_login_command(login: &OwnerLogin<'_>) -> LoginResult<Option<Vec<u8>>> {
    check_no_nul(login)?;
    if !quotable(login.canonical) || !quotable(login.password) {
        return Ok(None);
    }
    Ok(Some(
        format!(
            "ds2 LOGIN {} {}\r\n",
            quoted(login.canonical),
            quoted(login.password)
        )
        .into_bytes(),
    ))
}

fn check_no_nul(login: &OwnerLogin<'_>) -> LoginResult<()> {
    if login.password.contains('\0') || login.canonical.contains('\0') {
        return Err(OwnerLoginError::BadCredentials(
            "a NUL in the credentials".into(),
        ));
    }
    Ok(())
}

async fn send_login(
    conn: &mut OwnerConn,
    login: &OwnerLogin<'_>,
    literal_plus: bool,
) -> LoginResult<Tagged> {
    let t = login.timeouts;
    check_no_nul(login)?;
    let mut pending = b"ds2 LOGIN ".to_vec();
    for (i, arg) in [login.canonical, login.password].into_iter().enumerate() {
        let last = i == 1;
        if quotable(arg) {
            pending.extend_from_slice(quoted(arg).as_bytes());
            pending.extend_from_slice(if last { b"\r\n" } else { b" " });
            continue;
        }
        let plus = if literal_plus { "+" } else { "" };
        pending.extend_from_slice(format!("{{{}{plus}}}\r\n", arg.len()).as_bytes());
        conn.write_all(&pending)
            .await
            .map_err(|e| unavailable(format!("writing LOGIN: {e}")))?;
        pending.clear();
        if !literal_plus {
            conn.flush()
                .await
                .map_err(|e| unavailable(format!("writing LOGIN: {e}")))?;
            let line = read_response(conn, login.endpoint, t.reply).await?;
            if !line.starts_with(b"+") {
                // The owner refused the literal: its tagged answer ends the command.
                return parse_tagged("ds2", &line)
                    .ok_or_else(|| unavailable("unexpected answer to a literal"));
            }
        }
        pending.extend_from_slice(arg.as_bytes());
        pending.extend_from_slice(if last { b"\r\n" } else { b" " });
    }
    tagged(conn, login.endpoint, "ds2", &pending, t.reply).await
}

/// A tagged response's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Ok,
    No,
    Bad,
}

/// A tagged response, and the capabilities seen while waiting for it.
#[derive(Debug)]
struct Tagged {
    status: Status,
    /// The response code's atom (`UNAVAILABLE`, `CAPABILITY`, …), empty without one.
    code: String,
    /// The human-readable text, code included.
    text: String,
    capabilities: Option<Vec<String>>,
}

fn parse_tagged(tag: &str, line: &[u8]) -> Option<Tagged> {
    let rest = line.strip_prefix(tag.as_bytes())?.strip_prefix(b" ")?;
    let text = String::from_utf8_lossy(rest).trim_end().to_owned();
    let (status, after) = text.split_once(' ').unwrap_or((text.as_str(), ""));
    let status = match status.to_ascii_uppercase().as_str() {
        "OK" => Status::Ok,
        "NO" => Status::No,
        "BAD" => Status::Bad,
        _ => return None,
    };
    let code = after
        .strip_prefix('[')
        .map(|c| {
            c.split([' ', ']'])
                .next()
                .unwrap_or_default()
                .to_ascii_uppercase()
        })
        .unwrap_or_default();
    Some(Tagged {
        status,
        code,
        capabilities: capabilities_in(after.as_bytes()),
        text: after.to_owned(),
    })
}

/// The atoms of a `[CAPABILITY …]` response code anywhere in `text`.
fn capabilities_in(text: &[u8]) -> Option<Vec<String>> {
    let text = std::str::from_utf8(text).ok()?;
    let start = text.to_ascii_uppercase().find("[CAPABILITY ")? + "[CAPABILITY ".len();
    let end = start + text[start..].find(']')?;
    Some(
        text[start..end]
            .split_whitespace()
            .map(str::to_owned)
            .collect(),
    )
}

/// Send `command` and read responses up to the one tagged `tag`; an untagged `CAPABILITY` on the
/// way is kept.
async fn tagged(
    conn: &mut OwnerConn,
    endpoint: &str,
    tag: &str,
    command: &[u8],
    timeout: Duration,
) -> LoginResult<Tagged> {
    write_command(conn, command).await?;
    flush(conn).await?;
    read_tagged(conn, endpoint, tag, timeout).await
}

/// Queue `command` (sent at the next [`flush`]).
async fn write_command(conn: &mut OwnerConn, command: &[u8]) -> LoginResult<()> {
    conn.write_all(command)
        .await
        .map_err(|e| unavailable(format!("writing: {e}")))
}

async fn flush(conn: &mut OwnerConn) -> LoginResult<()> {
    conn.flush()
        .await
        .map_err(|e| unavailable(format!("writing: {e}")))
}

/// Read responses up to the one tagged `tag`; an untagged `CAPABILITY` on the way is kept.
async fn read_tagged(
    conn: &mut OwnerConn,
    endpoint: &str,
    tag: &str,
    timeout: Duration,
) -> LoginResult<Tagged> {
    let mut capabilities = None;
    for _ in 0..MAX_UNTAGGED {
        let line = read_response(conn, endpoint, timeout).await?;
        if let Some(rest) = strip_prefix_ci(&line, b"* CAPABILITY ") {
            let text = String::from_utf8_lossy(rest);
            capabilities = Some(text.split_whitespace().map(str::to_owned).collect());
            continue;
        }
        if line.starts_with(b"* ") {
            continue;
        }
        if line.starts_with(b"+") {
            return Err(unavailable("unexpected continuation request"));
        }
        let mut done = parse_tagged(tag, &line).ok_or_else(|| {
            unavailable(format!(
                "unexpected response: {}",
                String::from_utf8_lossy(&line).trim_end()
            ))
        })?;
        if done.capabilities.is_none() {
            done.capabilities = capabilities;
        }
        return Ok(done);
    }
    Err(unavailable("too many untagged responses"))
}

/// One response line, with any literals it announces read into it (`{n}` CRLF and n octets),
/// at most [`MAX_RESPONSE`] octets in all.
async fn read_response(
    conn: &mut OwnerConn,
    endpoint: &str,
    timeout: Duration,
) -> LoginResult<Vec<u8>> {
    let mut out = link::read_reply(conn, endpoint, MAX_RESPONSE, timeout)
        .await
        .map_err(unavailable)?;
    while let Some(len) = trailing_literal(&out) {
        let room = MAX_RESPONSE.saturating_sub(out.len());
        let literal = conn
            .read_exact(len, room, timeout)
            .await
            .map_err(|e| unavailable(format!("reading a response: {e}")))?;
        out.extend_from_slice(&literal);
        let more = link::read_reply(conn, endpoint, room.saturating_sub(len), timeout)
            .await
            .map_err(unavailable)?;
        out.extend_from_slice(&more);
    }
    Ok(out)
}

/// `n` if `line` ends with `{n}` CRLF (or `{n+}`).
fn trailing_literal(line: &[u8]) -> Option<usize> {
    literal_announcement(line).and_then(|(n, _)| usize::try_from(n).ok())
}

/// A literal announced at the end of a line: `(octets, synchronising)` for `{n}` or `{n+}`,
/// then CRLF or LF.
pub fn literal_announcement(end: &[u8]) -> Option<(u64, bool)> {
    let end = end.strip_suffix(b"\n")?;
    let end = end.strip_suffix(b"\r").unwrap_or(end);
    let end = end.strip_suffix(b"}")?;
    let open = end.iter().rposition(|&b| b == b'{')?;
    let inner = &end[open + 1..];
    let (digits, sync) = match inner.strip_suffix(b"+") {
        Some(d) => (d, false),
        None => (inner, true),
    };
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some((std::str::from_utf8(digits).ok()?.parse().ok()?, sync))
}

fn strip_prefix_ci<'a>(line: &'a [u8], prefix: &[u8]) -> Option<&'a [u8]> {
    (line.len() >= prefix.len() && line[..prefix.len()].eq_ignore_ascii_case(prefix))
        .then(|| &line[prefix.len()..])
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    use tokio::net::TcpListener;

    use super::*;

    const SECRET: &str = "0123456789abcdef-cluster";
    const CAPS: &str = "IMAP4rev1 LITERAL+ IDLE";

    /// How the in-test owner answers `LOGIN`.
    #[derive(Clone, Copy)]
    enum Answer {
        OkWithCaps,
        OkThenAskCaps,
        No,
        NotHere,
        Unavailable,
    }

    struct Seen {
        forwarded: Option<ForwardedClient>,
        login_args: Vec<Vec<u8>>,
    }

    fn ctx() -> ConnContext {
        ConnContext {
            peer: "203.0.113.9:51234".parse().unwrap(),
            local: "192.0.2.1:143".parse().unwrap(),
            sni: None,
            tls: true,
            protocol: "imaps",
            ip_slot: ds_net::IpSlot::default(),
        }
    }

    /// Parse `("k" "v" ...)` of our own ID command (quoted strings only).
    fn id_fields(line: &str) -> Vec<(String, String)> {
        let inner = &line[line.find('(').unwrap() + 1..line.rfind(')').unwrap()];
        let strings: Vec<String> = inner
            .split('"')
            .enumerate()
            .filter(|(i, _)| i % 2 == 1)
            .map(|(_, s)| s.to_owned())
            .collect();
        strings
            .chunks(2)
            .map(|p| (p[0].clone(), p[1].clone()))
            .collect()
    }

    /// A login of bob with hop 1.
    fn request<'a>(
        endpoint: &'a str,
        tls: OwnerTls<'a>,
        password: &'a str,
        client: &'a ConnContext,
        session_id: &'a str,
        key: &'a ProofKey,
    ) -> OwnerLogin<'a> {
        OwnerLogin {
            endpoint,
            tls,
            server_name: "",
            canonical: "bob@company.com",
            password,
            client,
            session_id,
            key,
            hop: 1,
            timeouts: Timeouts::default(),
        }
    }

    /// The quoted strings of `s`, unescaped.
    fn unquote_all(s: &str) -> Vec<Vec<u8>> {
        let mut out = vec![];
        let mut chars = s.chars();
        while let Some(c) = chars.next() {
            if c != '"' {
                continue;
            }
            let mut q = String::new();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => q.extend(chars.next()),
                    '"' => break,
                    c => q.push(c),
                }
            }
            out.push(q.into_bytes());
        }
        out
    }

    /// A tiny IMAP-ish owner: greeting with a nonce and (optionally) LITERAL+, `ID`, `LOGIN` with
    /// quoted strings or literals, `CAPABILITY`. Returns what it saw.
    async fn owner(
        listener: TcpListener,
        literal_plus: bool,
        answer: Answer,
        tls: Option<ds_net::TlsAcceptor>,
    ) -> Seen {
        let (tcp, _) = listener.accept().await.unwrap();
        let nonce = proof::greeting_nonce("owner.test");
        let caps = if literal_plus { CAPS } else { "IMAP4rev1" };
        let greeting = format!("* OK [CAPABILITY {caps}] owner.test ready {nonce}\r\n");
        let mut c = BufReader::new(tcp);
        c.get_mut().write_all(greeting.as_bytes()).await.unwrap();
        let Some(acceptor) = tls else {
            return script(c, &nonce, literal_plus, answer).await;
        };
        let mut line = String::new();
        c.read_line(&mut line).await.unwrap();
        assert_eq!(line, "ds0 STARTTLS\r\n");
        c.get_mut()
            .write_all(b"ds0 OK Begin TLS negotiation now\r\n")
            .await
            .unwrap();
        assert!(c.buffer().is_empty());
        let tls = acceptor.accept(c.into_inner()).await.unwrap();
        // RFC 3501 §6.2.1: the client forgets LITERAL+ learnt before TLS.
        script(BufReader::new(tls), &nonce, false, answer).await
    }

    /// The owner's side of the dialogue after the greeting (and TLS).
    async fn script<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
        mut c: BufReader<S>,
        nonce: &str,
        literal_plus: bool,
        answer: Answer,
    ) -> Seen {
        let mut seen = Seen {
            forwarded: None,
            login_args: vec![],
        };
        let key = ProofKey::from_cluster_secret(SECRET);
        loop {
            let mut line = String::new();
            // The end (a TLS client may close without close_notify).
            if c.read_line(&mut line).await.unwrap_or(0) == 0 {
                return seen;
            }
            let (tag, rest) = line.trim_end().split_once(' ').unwrap();
            let tag = tag.to_owned();
            let upper = rest.to_ascii_uppercase();
            let reply = if upper.starts_with("ID ") {
                let fields = id_fields(rest);
                seen.forwarded = verify_imap_id(
                    fields.iter().map(|(k, v)| (k.as_str(), Some(v.as_str()))),
                    nonce,
                    &key,
                );
                format!("* ID (\"name\" {{5}}\r\nowner)\r\n{tag} OK ID completed\r\n")
            } else if upper.starts_with("LOGIN ") {
                // Arguments: quoted strings or literals, in order.
                let mut args = vec![];
                let mut rest = rest["LOGIN ".len()..].to_owned();
                loop {
                    let rest_trim = rest.trim_end().to_owned();
                    if let Some(open) = rest_trim.strip_suffix('}').and_then(|r| r.rfind('{')) {
                        let spec = &rest_trim[open + 1..rest_trim.len() - 1];
                        let (n, plus) = match spec.strip_suffix('+') {
                            Some(n) => (n, true),
                            None => (spec, false),
                        };
                        assert_eq!(plus, literal_plus, "literal kind");
                        let before = rest_trim[..open].trim();
                        if !before.is_empty() {
                            args.push(before.trim_matches('"').as_bytes().to_vec());
                        }
                        if !plus {
                            c.get_mut().write_all(b"+ go ahead\r\n").await.unwrap();
                        }
                        let mut lit = vec![0; n.parse().unwrap()];
                        c.read_exact(&mut lit).await.unwrap();
                        args.push(lit);
                        rest.clear();
                        c.read_line(&mut rest).await.unwrap();
                        if rest.trim().is_empty() {
                            break;
                        }
                    } else {
                        args.extend(unquote_all(&rest_trim));
                        break;
                    }
                }
                seen.login_args = args;
                match answer {
                    Answer::OkWithCaps => {
                        format!("{tag} OK [CAPABILITY {CAPS} MOVE] Logged in\r\n")
                    }
                    Answer::OkThenAskCaps => format!("{tag} OK Logged in\r\n"),
                    Answer::No => {
                        format!("{tag} NO [AUTHENTICATIONFAILED] Authentication failed\r\n")
                    }
                    Answer::NotHere => {
                        format!("{tag} NO [AUTHENTICATIONFAILED] {NOT_HERE_TEXT}\r\n")
                    }
                    Answer::Unavailable => format!("{tag} NO [UNAVAILABLE] try later\r\n"),
                }
            } else if upper == "CAPABILITY" {
                format!("* CAPABILITY {CAPS} UIDPLUS\r\n{tag} OK done\r\n")
            } else {
                format!("{tag} BAD unknown\r\n")
            };
            c.get_mut().write_all(reply.as_bytes()).await.unwrap();
        }
    }

    async fn run(
        password: &str,
        literal_plus: bool,
        answer: Answer,
    ) -> (LoginResult<OwnerSession>, Seen) {
        let pki = ds_net::tls::Pki::generate("owner CA");
        run_with(password, literal_plus, answer, Some((&pki, &pki))).await
    }

    #[tokio::test]
    async fn no_password_without_verified_tls() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = listener.local_addr().unwrap().to_string();
        let key = ProofKey::from_cluster_secret(SECRET);
        let client = ctx();
        let result =
            login_at_owner(request(&endpoint, OwnerTls::None, "x", &client, "s", &key)).await;
        match result {
            Err(OwnerLoginError::Unavailable(reason)) => {
                assert!(reason.contains("plaintext"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        let accepted = tokio::time::timeout(Duration::from_millis(100), listener.accept()).await;
        assert!(accepted.is_err(), "the owner was contacted without TLS");
    }

    /// With `tls`: the owner offers STARTTLS with a certificate of a test CA for `localhost`, and
    /// the client trusts that CA only.
    async fn run_with(
        password: &str,
        literal_plus: bool,
        answer: Answer,
        tls: Option<(&ds_net::tls::Pki, &ds_net::tls::Pki)>,
    ) -> (LoginResult<OwnerSession>, Seen) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let endpoint = format!("localhost:{port}");
        let (acceptor, connector) = match tls {
            None => (None, None),
            Some((server_ca, trusted_ca)) => {
                let (cert, key) = server_ca.issue(&["localhost"], &[]);
                let server = ds_net::tls::server_config_from_pem(&cert, &key).unwrap();
                let client = ds_net::tls::client_config_with_ca(&trusted_ca.ca_cert_pem()).unwrap();
                (
                    Some(ds_net::TlsAcceptor::from(server)),
                    Some(TlsConnector::from(client)),
                )
            }
        };
        let server = tokio::spawn(owner(listener, literal_plus, answer, acceptor));
        let key = ProofKey::from_cluster_secret(SECRET);
        let client = ctx();
        let result = login_at_owner(request(
            &endpoint,
            connector
                .as_ref()
                .map_or(OwnerTls::None, OwnerTls::StartTls),
            password,
            &client,
            "s-42",
            &key,
        ))
        .await;
        // Let the owner see the end of the connection.
        let result = match result {
            Ok(mut s) => {
                let _ = s.conn.shutdown().await;
                Ok(s)
            }
            Err(e) => Err(e),
        };
        (result, server.await.unwrap())
    }

    #[tokio::test]
    async fn login_with_quoted_strings_and_capabilities_from_the_tagged_ok() {
        let (result, seen) = run("pass \"word\"", true, Answer::OkWithCaps).await;
        let session = result.unwrap();
        assert_eq!(
            session.capabilities,
            ["IMAP4rev1", "LITERAL+", "IDLE", "MOVE"]
        );
        assert_eq!(
            seen.login_args,
            [b"bob@company.com".to_vec(), br#"pass "word""#.to_vec()]
        );
        assert_eq!(
            seen.forwarded,
            Some(ForwardedClient {
                addr: "203.0.113.9:51234".parse().unwrap(),
                connected_ip: "192.0.2.1".parse().unwrap(),
                session_id: "s-42".into(),
                hop: 1,
            })
        );
    }

    #[tokio::test]
    async fn eight_bit_password_goes_as_a_literal() {
        for literal_plus in [true, false] {
            let (result, seen) = run("pässwörd", literal_plus, Answer::OkThenAskCaps).await;
            let session = result.unwrap();
            assert_eq!(
                session.capabilities,
                ["IMAP4rev1", "LITERAL+", "IDLE", "UIDPLUS"]
            );
            assert_eq!(seen.login_args[1], "pässwörd".as_bytes());
        }
    }

    #[tokio::test]
    async fn starttls_verified_against_the_cluster_ca() {
        let ca = ds_net::tls::Pki::generate("cluster CA");
        let (result, seen) = run_with("pw", true, Answer::OkWithCaps, Some((&ca, &ca))).await;
        assert!(result.unwrap().conn.get_ref().is_tls());
        assert_eq!(seen.forwarded.unwrap().hop, 1);
        // A certificate from another CA: no login is attempted.
        let other = ds_net::tls::Pki::generate("other CA");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (cert, key) = other.issue(&["localhost"], &[]);
        let acceptor =
            ds_net::TlsAcceptor::from(ds_net::tls::server_config_from_pem(&cert, &key).unwrap());
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut c = BufReader::new(tcp);
            c.get_mut()
                .write_all(b"* OK ready <1.2@owner.test>\r\n")
                .await
                .unwrap();
            let mut line = String::new();
            c.read_line(&mut line).await.unwrap();
            c.get_mut().write_all(b"ds0 OK go\r\n").await.unwrap();
            // The handshake fails on the client's side.
            let _ = acceptor.accept(c.into_inner()).await;
        });
        let connector =
            TlsConnector::from(ds_net::tls::client_config_with_ca(&ca.ca_cert_pem()).unwrap());
        let endpoint = format!("localhost:{port}");
        let (client, key) = (ctx(), ProofKey::from_cluster_secret(SECRET));
        let result = login_at_owner(request(
            &endpoint,
            OwnerTls::StartTls(&connector),
            "pw",
            &client,
            "s",
            &key,
        ))
        .await;
        let Err(OwnerLoginError::Unavailable(reason)) = result else {
            panic!("{result:?}")
        };
        assert!(reason.contains("TLS"), "{reason}");
        server.await.unwrap();
    }

    #[tokio::test]
    async fn refusals() {
        let (result, _) = run("wrong", true, Answer::No).await;
        assert!(matches!(result, Err(OwnerLoginError::BadCredentials(_))));
        let (result, _) = run("x", true, Answer::NotHere).await;
        assert_eq!(result.unwrap_err(), OwnerLoginError::NotHere);
        let (result, _) = run("x", true, Answer::Unavailable).await;
        assert!(matches!(result, Err(OwnerLoginError::Unavailable(_))));
    }

    #[tokio::test]
    async fn owner_down_is_unavailable() {
        let endpoint = {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            l.local_addr().unwrap().to_string()
        };
        let key = ProofKey::from_cluster_secret(SECRET);
        let client = ctx();
        let result =
            login_at_owner(request(&endpoint, OwnerTls::None, "x", &client, "s", &key)).await;
        assert!(matches!(result, Err(OwnerLoginError::Unavailable(_))));
    }

    #[test]
    fn id_verification() {
        let key = ProofKey::from_cluster_secret(SECRET);
        let nonce = "<00.1@owner.test>";
        let client = ctx();
        let login = OwnerLogin {
            endpoint: "owner:143",
            tls: OwnerTls::None,
            server_name: "",
            canonical: "bob@company.com",
            password: "x",
            client: &client,
            session_id: "s-1",
            key: &key,
            hop: 2,
            timeouts: Timeouts::default(),
        };
        let line = id_command("t", nonce, &login).unwrap();
        let fields = id_fields(&line);
        let check = |fields: &[(String, String)], nonce: &str, key: &ProofKey| {
            verify_imap_id(
                fields.iter().map(|(k, v)| (k.as_str(), Some(v.as_str()))),
                nonce,
                key,
            )
        };
        assert_eq!(check(&fields, nonce, &key).unwrap().hop, 2);
        // Keys are case-insensitive; unknown keys are ignored.
        let mut upper: Vec<_> = fields
            .iter()
            .map(|(k, v)| (k.to_ascii_uppercase(), v.clone()))
            .collect();
        upper.push(("name".into(), "x".into()));
        assert!(check(&upper, nonce, &key).is_some());
        assert!(check(&fields, "<00.2@owner.test>", &key).is_none());
        assert!(check(&fields, nonce, &ProofKey::new(b"other key 0123456789")).is_none());
        for i in 0..fields.len() {
            let mut changed = fields.clone();
            changed[i].1.push('0');
            assert!(check(&changed, nonce, &key).is_none(), "{}", fields[i].0);
            let mut missing = fields.clone();
            missing.remove(i);
            assert!(check(&missing, nonce, &key).is_none());
        }
        let mut twice = fields.clone();
        twice.push(fields[0].clone());
        assert!(check(&twice, nonce, &key).is_none());
        assert!(verify_imap_id([(ID_SIG, None)], nonce, &key).is_none());
    }

    #[test]
    fn response_parsing() {
        let t = parse_tagged("ds2", b"ds2 NO [UNAVAILABLE] later\r\n").unwrap();
        assert_eq!((t.status, t.code.as_str()), (Status::No, "UNAVAILABLE"));
        let t = parse_tagged("ds2", b"ds2 ok [CAPABILITY IMAP4rev1 IDLE] hi\r\n").unwrap();
        assert_eq!(t.status, Status::Ok);
        assert_eq!(t.capabilities.unwrap(), ["IMAP4rev1", "IDLE"]);
        assert!(parse_tagged("ds2", b"ds1 OK x\r\n").is_none());
        assert!(parse_tagged("ds2", b"ds2 MAYBE x\r\n").is_none());
        assert_eq!(trailing_literal(b"* ID (\"a\" {12}\r\n"), Some(12));
        assert_eq!(trailing_literal(b"x {3+}\r\n"), Some(3));
        assert_eq!(trailing_literal(b"x {a}\r\n"), None);
        assert_eq!(trailing_literal(b"x\r\n"), None);
        assert!(quotable("a \"b\" \\c"));
        assert!(!quotable("ä") && !quotable("a\r\nb"));
        assert_eq!(quoted(r#"a"b\c"#), r#""a\"b\\c""#);
    }
}
