//! POP3 forwarding, front side: open a session on the owner of an account (DESIGN.md §7) —
//! connect with a timeout, upgrade with STLS against the cluster CA when configured, pass the
//! client's address in a signed `XCLIENT`, log in with the canonical name and the client's
//! password — and report the owner's answer. The caller relays the answer and, on `+OK`, splices
//! the two connections. The password is only ever held for the length of the login.

use std::net::SocketAddr;
use std::time::Duration;

use ds_access::Owner;
use ds_access::owner::{self as link, OwnerConn};
use ds_net::TlsConnector;

use crate::protocol::{self, MAX_COMMAND_LINE, MAX_INITIAL_RESPONSE, Secret};
use crate::{Error, Pop3, Result, xclient};

/// The reply an owner gives to a forwarded login for an account it does not have. The front node
/// recognises it (its cached owner is stale), locates the address once more, and shows the client
/// the plain [`AUTH_FAILED`](crate::session::AUTH_FAILED) text if that fails too.
pub const NOT_HERE: &str = "-ERR [AUTH] Authentication failed (no such account on this node)\r\n";

/// How the client logged in; the owner is asked the same way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoginMethod {
    /// `USER` + `PASS`.
    UserPass,
    /// `AUTH PLAIN`.
    SaslPlain,
}

/// What the owner said to the forwarded login.
#[derive(Debug)]
pub enum OwnerAnswer {
    /// `+OK`: the session is open on the owner; relay `reply`, then splice.
    Accepted {
        /// The connection to the owner, logged in.
        conn: OwnerConn,
        /// The owner's `+OK` line, CRLF included.
        reply: Vec<u8>,
        /// The owner can end the session with `XDSRESET` and the link can go back to the
        /// pool ([`crate::relay`]).
        reuse: Option<Reuse>,
    },
    /// `-ERR`: relay `reply` (unless `not_here`, see [`NOT_HERE`]).
    Refused {
        /// The owner's `-ERR` line, CRLF included.
        reply: Vec<u8>,
        /// The owner does not have the account.
        not_here: bool,
    },
}

fn owner_err(owner: &Owner, reason: impl Into<String>) -> Error {
    Error::Owner {
        node: owner.node.clone(),
        reason: reason.into(),
    }
}

/// One status line from the owner, CRLF-terminated.
async fn read_reply(conn: &mut OwnerConn, owner: &Owner, timeout: Duration) -> Result<Vec<u8>> {
    link::read_reply(conn, &owner.pop3, MAX_COMMAND_LINE, timeout)
        .await
        .map_err(|e| owner_err(owner, e.to_string()))
}

/// Send `data` (CRLF included) without waiting for a reply.
async fn send(conn: &mut OwnerConn, owner: &Owner, data: &[u8]) -> Result<()> {
    conn.write_all(data)
        .await
        .map_err(|e| owner_err(owner, e.to_string()))?;
    conn.flush()
        .await
        .map_err(|e| owner_err(owner, e.to_string()))
}

async fn command(
    conn: &mut OwnerConn,
    owner: &Owner,
    line: &[u8],
    timeout: Duration,
) -> Result<Vec<u8>> {
    link::command(conn, &owner.pop3, line, MAX_COMMAND_LINE, timeout)
        .await
        .map_err(|e| owner_err(owner, e.to_string()))
}

fn expect_ok(reply: &[u8], owner: &Owner, what: &str) -> Result<()> {
    if protocol::is_ok(reply) {
        Ok(())
    } else {
        Err(owner_err(
            owner,
            format!(
                "{what} refused: {}",
                String::from_utf8_lossy(reply).trim_end()
            ),
        ))
    }
}

/// A connection to an owner made ready for a forwarded login: STLS done and verified, the
/// greeting's timestamp (the proof's nonce) kept. It may wait in the warm pool (below the
/// owner's pre-login timeout) until a login takes it.
#[derive(Debug)]
pub struct ReadyConn {
    conn: OwnerConn,
    timestamp: String,
    /// The link served a session before (its owner session was ended with `XDSRESET`).
    reused: bool,
}

impl ReadyConn {
    /// A link whose session the owner ended with `XDSRESET`, answered with `timestamp`.
    pub(crate) fn reused(conn: OwnerConn, timestamp: String) -> Self {
        Self {
            conn,
            timestamp,
            reused: true,
        }
    }
}

/// What the front node needs to keep an owner link for another login.
#[derive(Debug)]
pub struct Reuse {
    /// The owner connection's current timestamp (the login's proof was over it).
    pub timestamp: String,
    /// The link's place in the pool; the loan ends with the session.
    pub loan: ds_access::Loan<ReadyConn>,
}

/// Connect to `owner`'s POP3 endpoint and make the connection ready for a login.
async fn open_owner(
    owner: &Owner,
    peer_tls: &TlsConnector,
    timeout: Duration,
    tls_handshake_timeout: Duration,
) -> Result<ReadyConn> {
    let mut conn = link::connect(&owner.pop3, timeout)
        .await
        .map_err(|e| owner_err(owner, e.to_string()))?;
    // STLS goes out at once, not after the greeting and a CAPA: the owner reads it once it has
    // greeted, and two round trips are saved on every forwarded login. An owner without STLS
    // refuses it, and TLS is required.
    send(&mut conn, owner, b"STLS\r\n").await?;

    let greeting = read_reply(&mut conn, owner, timeout).await?;
    expect_ok(&greeting, owner, "greeting")?;
    let timestamp = protocol::greeting_timestamp(&greeting)
        .ok_or_else(|| owner_err(owner, "greeting without a timestamp"))?
        .to_owned();
    let reply = read_reply(&mut conn, owner, timeout).await?;
    expect_ok(&reply, owner, "STLS (TLS is required)")?;
    let conn = link::start_tls(conn, &owner.pop3, peer_tls, tls_handshake_timeout)
        .await
        .map_err(|e| owner_err(owner, e.to_string()))?;
    Ok(ReadyConn {
        conn,
        timestamp,
        reused: false,
    })
}

/// Connect to `owner`'s POP3 endpoint (or take a warm connection to it), set the session up
/// for `client` and log in as `owner.canonical` with `password`. `Err` means the owner could
/// not be used (unreachable, no TLS, `XCLIENT` refused): the client gets `-ERR [SYS/TEMP]`.
pub async fn login_at_owner(
    pop3: &Pop3,
    owner: &Owner,
    client: SocketAddr,
    method: LoginMethod,
    password: &Secret,
) -> Result<OwnerAnswer> {
    let timeout = pop3.config.peer_timeout;
    if pop3.config.proof_key.is_none() {
        return Err(owner_err(
            owner,
            "no cluster secret configured, cannot forward",
        ));
    }
    let Some(peer_tls) = &pop3.peer_tls else {
        // #13 point 2: the client's password never crosses the network in plaintext.
        tracing::warn!(
            owner = %owner.node,
            "not forwarding a login: no cluster CA configured, and a password is never sent without verified TLS"
        );
        return Err(owner_err(
            owner,
            "no verified TLS (no cluster CA): the password is never sent in plaintext",
        ));
    };
    let connector = TlsConnector::from(peer_tls.clone());
    let handshake = pop3.config.tls_handshake_timeout;
    let (warm, loan) = pop3.warm.lend_and_refill(
        &owner.pop3,
        |ready| link::is_quiet(&mut ready.conn),
        || {
            let (owner, connector) = (owner.clone(), connector.clone());
            async move { open_owner(&owner, &connector, timeout, handshake).await }
        },
    );
    // An accepted login on an owner that can reset the session takes the loan along.
    let lend = |(answer, reusable): (OwnerAnswer, Option<String>)| match (answer, reusable, loan) {
        (OwnerAnswer::Accepted { conn, reply, .. }, Some(timestamp), Some(loan)) => {
            OwnerAnswer::Accepted {
                conn,
                reply,
                reuse: Some(Reuse { timestamp, loan }),
            }
        }
        (answer, ..) => answer,
    };
    if let Some(ready) = warm {
        let link = if ready.reused { "reused" } else { "warm" };
        match login_on(pop3, ready, owner, client, method, password).await {
            Ok(answer) => {
                count_link(link);
                return Ok(lend(answer));
            }
            Err((e, false)) => return Err(e),
            Err((e, true)) => {
                tracing::debug!(owner = %owner.node, error = %e, "a warm connection was closed by the owner; opening a fresh one");
                pop3.warm.clear(&owner.pop3);
            }
        }
    }
    let ready = open_owner(owner, &connector, timeout, handshake).await?;
    let answer = login_on(pop3, ready, owner, client, method, password)
        .await
        .map_err(|(e, _)| e)?;
    count_link("fresh");
    Ok(lend(answer))
}

fn count_link(link: &'static str) {
    metrics::counter!("dshare_pop3_forward_links_total", "link" => link).increment(1);
}

/// The word in the owner's answer to `XCLIENT` that says it takes `XDSRESET`.
const RESET: &[u8] = b"XDSRESET";

/// `XCLIENT` with the proof and the login on a ready connection, and the connection's
/// timestamp if the owner can reset the session for another login. An error comes with
/// whether the connection was dead before the owner answered anything (a warm connection the
/// owner closed: worth one fresh try).
async fn login_on(
    pop3: &Pop3,
    ready: ReadyConn,
    owner: &Owner,
    client: SocketAddr,
    method: LoginMethod,
    password: &Secret,
) -> std::result::Result<(OwnerAnswer, Option<String>), (Error, bool)> {
    let timeout = pop3.config.peer_timeout;
    let ReadyConn {
        mut conn,
        timestamp,
        reused: _,
    } = ready;
    let Some(key) = pop3.config.proof_key.as_ref() else {
        return Err((owner_err(owner, "no cluster secret configured"), false));
    };
    let line = xclient::command_line(
        key,
        &timestamp,
        client.ip(),
        client.port(),
        &pop3.config.node_id,
    );
    // USER + PASS (or an AUTH PLAIN with its initial response) go with XCLIENT: one round
    // trip. The owner reads them in order, so they are answered as the forwarded client's; if
    // it refuses XCLIENT the login is given up whatever it says to the rest.
    let pipelined = match method {
        LoginMethod::UserPass => Some(format!(
            "USER {}\r\nPASS {}\r\n",
            owner.canonical,
            password.expose()
        )),
        LoginMethod::SaslPlain => {
            let initial = protocol::encode_plain(&owner.canonical, password.expose());
            (initial.len() <= MAX_INITIAL_RESPONSE).then(|| format!("AUTH PLAIN {initial}\r\n"))
        }
    };
    let first = async {
        let mut out = line.into_bytes();
        if let Some(rest) = &pipelined {
            out.extend_from_slice(rest.as_bytes());
        }
        send(&mut conn, owner, &out).await?;
        read_reply(&mut conn, owner, timeout).await
    };
    let reply = first.await.map_err(|e| (e, true))?;
    // An owner shutting down answers `-ERR [SYS/TEMP]` to a connection it had open: for a
    // warm one, worth one fresh try like a closed one.
    let shutting_down = reply.starts_with(b"-ERR [SYS/TEMP]");
    expect_ok(&reply, owner, "XCLIENT").map_err(|e| (e, shutting_down))?;
    // The owner can end the session for us and keep the link (an older one says just `+OK`).
    let reusable = reply.windows(RESET.len()).any(|w| w == RESET);
    finish_login(
        &mut conn,
        owner,
        method,
        password,
        pipelined.is_some(),
        timeout,
    )
    .await
    .map_err(|e| (e, false))
    .map(|reply| match reply {
        Ok(reply) => (
            OwnerAnswer::Accepted {
                conn,
                reply,
                reuse: None,
            },
            reusable.then_some(timestamp),
        ),
        Err(reply) => (refused(reply), None),
    })
}

/// The login's answer once `XCLIENT` was accepted: `Ok(+OK line)` or `Err(-ERR line)`.
async fn finish_login(
    conn: &mut OwnerConn,
    owner: &Owner,
    method: LoginMethod,
    password: &Secret,
    sent: bool,
    timeout: Duration,
) -> Result<std::result::Result<Vec<u8>, Vec<u8>>> {
    let reply = match method {
        LoginMethod::UserPass => {
            // A refused USER ends the login and the connection, whatever the owner says to
            // the PASS behind it.
            let reply = read_reply(conn, owner, timeout).await?;
            if !protocol::is_ok(&reply) {
                return Ok(Err(reply));
            }
            read_reply(conn, owner, timeout).await?
        }
        LoginMethod::SaslPlain if sent => read_reply(conn, owner, timeout).await?,
        LoginMethod::SaslPlain => {
            let initial = protocol::encode_plain(&owner.canonical, password.expose());
            let go_ahead = command(conn, owner, b"AUTH PLAIN\r\n", timeout).await?;
            if !go_ahead.starts_with(b"+ ") && go_ahead != b"+\r\n" {
                return Ok(Err(go_ahead));
            }
            let response = format!("{initial}\r\n");
            command(conn, owner, response.as_bytes(), timeout).await?
        }
    };
    Ok(if protocol::is_ok(&reply) {
        Ok(reply)
    } else {
        Err(reply)
    })
}

fn refused(reply: Vec<u8>) -> OwnerAnswer {
    let not_here = reply == NOT_HERE.as_bytes();
    OwnerAnswer::Refused { reply, not_here }
}
