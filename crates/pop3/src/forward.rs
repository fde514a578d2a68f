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

/// Connect to `owner`'s POP3 endpoint, set the session up for `client` and log in as
/// `owner.canonical` with `password`. `Err` means the owner could not be used (unreachable, no TLS, `XCLIENT` refused):
/// the client gets `-ERR [SYS/TEMP]`.
pub async fn login_at_owner(
    pop3: &Pop3,
    owner: &Owner,
    client: SocketAddr,
    method: LoginMethod,
    password: &Secret,
) -> Result<OwnerAnswer> {
    let timeout = pop3.config.peer_timeout;
    let key = pop3
        .config
        .proof_key
        .as_ref()
        .ok_or_else(|| owner_err(owner, "no cluster secret configured, cannot forward"))?;

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

    {
        let tls = peer_tls;
        let reply = read_reply(&mut conn, owner, timeout).await?;
        expect_ok(&reply, owner, "STLS (TLS is required)")?;
        conn = link::start_tls(
            conn,
            &owner.pop3,
            &TlsConnector::from(tls.clone()),
            pop3.config.tls_handshake_timeout,
        )
        .await
        .map_err(|e| owner_err(owner, e.to_string()))?;
    }

    let line = xclient::command_line(
        key,
        &timestamp,
        client.ip(),
        client.port(),
        &pop3.config.node_id,
    );
    let reply = command(&mut conn, owner, line.as_bytes(), timeout).await?;
    expect_ok(&reply, owner, "XCLIENT")?;

    let reply = match method {
        LoginMethod::UserPass => {
            // Both at once (one round trip): a refused USER ends the login and the connection,
            // whatever the owner says to the PASS behind it.
            let user_pass = format!("USER {}\r\nPASS {}\r\n", owner.canonical, password.expose());
            send(&mut conn, owner, user_pass.as_bytes()).await?;
            let reply = read_reply(&mut conn, owner, timeout).await?;
            if !protocol::is_ok(&reply) {
                return Ok(refused(reply));
            }
            read_reply(&mut conn, owner, timeout).await?
        }
        LoginMethod::SaslPlain => {
            let initial = protocol::encode_plain(&owner.canonical, password.expose());
            if initial.len() <= MAX_INITIAL_RESPONSE {
                let auth = format!("AUTH PLAIN {initial}\r\n");
                command(&mut conn, owner, auth.as_bytes(), timeout).await?
            } else {
                let go_ahead = command(&mut conn, owner, b"AUTH PLAIN\r\n", timeout).await?;
                if !go_ahead.starts_with(b"+ ") && go_ahead != b"+\r\n" {
                    return Ok(refused(go_ahead));
                }
                let response = format!("{initial}\r\n");
                command(&mut conn, owner, response.as_bytes(), timeout).await?
            }
        }
    };
    if protocol::is_ok(&reply) {
        Ok(OwnerAnswer::Accepted { conn, reply })
    } else {
        Ok(refused(reply))
    }
}

fn refused(reply: Vec<u8>) -> OwnerAnswer {
    let not_here = reply == NOT_HERE.as_bytes();
    OwnerAnswer::Refused { reply, not_here }
}
