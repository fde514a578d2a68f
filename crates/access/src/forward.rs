//! The last step of every forwarded login: once the owner accepted it and its answer was queued
//! for the client, hand the client's pipelined bytes to the owner, the owner's early bytes to the
//! client, and copy both ways ([`ds_net::splice`]) until either side closes, the session is idle,
//! or the node shuts down.

use std::time::Duration;

use ds_net::{Gate, LineConn, MailStream, Shutdown};
use tokio::io::AsyncWriteExt;

use crate::Result;
use crate::owner::OwnerConn;
use crate::warm::Loan;

/// Octets copied by a finished forwarded session.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Copied {
    /// Client → owner.
    pub up: u64,
    /// Owner → client.
    pub down: u64,
}

/// Flush what is queued for the client, send the bytes each side sent early (the client's
/// commands pipelined behind its login go to the owner first), then splice until either side
/// closes or nothing moved for `idle_timeout`. `None`: `shutdown` fired and both connections were
/// dropped (the owner ends its session without committing anything).
pub async fn splice_session(
    client: LineConn<MailStream>,
    owner: OwnerConn,
    idle_timeout: Duration,
    shutdown: &Shutdown,
) -> Result<Option<Copied>> {
    let (mut up, mut down) = (ds_net::PassAll, ds_net::PassAll);
    let ended = splice_until(client, owner, &mut up, &mut down, idle_timeout, shutdown).await?;
    // Gates that pass everything never stop the splice.
    Ok(ended.map_or_else(|relayed| relayed.copied, |ending| Some(ending.copied)))
}

/// How a relayed session ended ([`splice_until`], [`finish`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Relayed {
    /// Octets copied each way; `None`: the node shut down and both connections were dropped.
    pub copied: Option<Copied>,
    /// The client ended the session and the owner link went back to the pool.
    pub link_kept: bool,
}

impl From<Option<Copied>> for Relayed {
    /// A session that ended without its link kept ([`splice_session`]).
    fn from(copied: Option<Copied>) -> Self {
        Self {
            copied,
            link_kept: false,
        }
    }
}

impl Relayed {
    /// Log the end of the forwarded session (the front node's one line for it).
    pub fn log(&self) {
        match self.copied {
            Some(copied) => tracing::info!(
                up = copied.up,
                down = copied.down,
                link_kept = self.link_kept,
                "forwarded session ended"
            ),
            None => tracing::info!("shutting down, forwarded session closed"),
        }
    }
}

/// A relayed session whose client asked to end it ([`splice_until`]): everything before that
/// request was copied both ways; the request itself was not passed on.
#[derive(Debug)]
pub struct Ending {
    /// The client's connection.
    pub client: MailStream,
    /// The owner's connection.
    pub owner: OwnerConn,
    /// What was copied so far.
    pub copied: Copied,
}

/// [`splice_session`] through a gate on each direction (`up` sees the client's octets, `down`
/// the owner's, the pipelined ones first): `Ok(Ok(_))` once `up` stopped the client's direction
/// (the client asked to end the session), `Ok(Err(_))` when the session ended otherwise.
pub async fn splice_until(
    client: LineConn<MailStream>,
    owner: OwnerConn,
    up: &mut impl Gate,
    down: &mut impl Gate,
    idle_timeout: Duration,
    shutdown: &Shutdown,
) -> Result<std::result::Result<Ending, Relayed>> {
    let mut client = client;
    client.flush().await?;
    let (mut client, client_buffered) = client.into_parts();
    let (mut owner, owner_buffered) = owner.into_parts();
    let write_timeout = ds_net::DEFAULT_WRITE_TIMEOUT;
    let stop = up.pass(&client_buffered);
    let sent = &client_buffered[..stop.unwrap_or(client_buffered.len())];
    down.pass(&owner_buffered);
    write_all_timeout(&mut owner, sent, write_timeout).await?;
    write_all_timeout(&mut client, &owner_buffered, write_timeout).await?;
    let mut copied = Copied::default();
    if stop.is_none() {
        let gated = tokio::select! {
            gated = ds_net::splice_gated(&mut client, &mut owner, idle_timeout, up, down) => gated?,
            () = shutdown.wait() => return Ok(Err(Relayed::default())),
        };
        copied = Copied {
            up: gated.a_to_b,
            down: gated.b_to_a,
        };
        if !gated.stopped {
            return Ok(Err(Relayed {
                copied: Some(copied),
                link_kept: false,
            }));
        }
    }
    Ok(Ok(Ending {
        client,
        owner: LineConn::new(owner),
        copied,
    }))
}

/// A relayed session whose owner link may be kept: [`splice_until`] with the gate `up` on the
/// client's side (everything the owner sends passes); once `up` stops it, `end` ends the
/// owner's session (given the gate, the client to pass the owner's last output to, and the
/// owner link) and returns what to answer the client and the link made ready again, if it is;
/// then [`finish`]. `end` bounds its waits (and gives up on the node's shutdown) itself.
pub async fn relay_ending<G: Gate, T>(
    client: LineConn<MailStream>,
    owner: OwnerConn,
    up: &mut G,
    loan: Loan<T>,
    idle_timeout: Duration,
    shutdown: &Shutdown,
    end: impl AsyncFnOnce(&mut G, &mut MailStream, OwnerConn) -> (Vec<u8>, Option<T>),
) -> Result<Relayed> {
    let mut down = ds_net::PassAll;
    let ending = splice_until(client, owner, up, &mut down, idle_timeout, shutdown).await?;
    let Ending {
        mut client,
        owner,
        copied,
    } = match ending {
        Ok(ending) => ending,
        Err(relayed) => return Ok(relayed),
    };
    let (answer, ready) = end(up, &mut client, owner).await;
    finish(&mut client, &answer, loan, ready, copied).await
}

/// The end of a session the front node answers itself ([`splice_until`] stopped): `answer`
/// to the client, whose connection is then closed, and the owner link back to the pool when
/// `ready` (else the loan ends and the link is dropped).
pub async fn finish<T>(
    client: &mut MailStream,
    answer: &[u8],
    loan: Loan<T>,
    ready: Option<T>,
    copied: Copied,
) -> Result<Relayed> {
    let timeout = ds_net::DEFAULT_WRITE_TIMEOUT;
    let answered = write_all_timeout(client, answer, timeout).await;
    let _ = tokio::time::timeout(timeout, client.shutdown()).await;
    let link_kept = ready.is_some();
    match ready {
        Some(ready) => loan.give_back(ready),
        None => drop(loan),
    }
    answered?;
    Ok(Relayed {
        copied: Some(copied),
        link_kept,
    })
}

/// The owner's side of ending a relayed session: send `command` (tagged with the unguessable
/// [`crate::proof::end_tag`]), pass on to the client what the owner still sends for the commands
/// before it, and return the owner's answer: the first line, at a line start, that begins with
/// one of `answers` (each holds the tag, so neither a client nor a message can make one; no
/// framing of the owner's output is needed to find it). `None`: the owner could not be asked,
/// closed, or did not answer within `timeout` for a read; or the client is gone.
pub async fn end_on_owner(
    client: &mut MailStream,
    owner: &mut OwnerConn,
    command: &[u8],
    answers: &[&[u8]],
    timeout: Duration,
) -> Option<Vec<u8>> {
    let sent = async {
        owner.write_all(command).await?;
        owner.flush().await
    };
    if let Err(e) = sent.await {
        tracing::debug!(error = %e, "could not send the end of the session to the owner");
        return None;
    }
    let longest = answers.iter().map(|a| a.len()).max().unwrap_or(0);
    // Where the splice stopped is not always a line start; a wrong guess here only costs a
    // look at the start of a line's rest, which cannot hold the tag.
    let mut at_line_start = true;
    loop {
        if at_line_start {
            let head = owner.peek(longest, timeout).await.ok()?;
            if head.is_empty() {
                return None;
            }
            if answers.iter().any(|a| head.starts_with(a)) {
                return owner.read_line(MAX_ANSWER, timeout).await.ok()?;
            }
        }
        // The rest of the line (or all that is buffered of it): pass it on.
        let chunk = owner.fill_buf(timeout).await.ok()?;
        if chunk.is_empty() {
            return None;
        }
        let n = memchr::memchr(b'\n', chunk).map_or(chunk.len(), |p| p + 1);
        at_line_start = chunk[n - 1] == b'\n';
        let piece = chunk[..n].to_vec();
        owner.consume(n);
        write_all_timeout(client, &piece, ds_net::DEFAULT_WRITE_TIMEOUT)
            .await
            .ok()?;
    }
}

/// Longest answer line to the command that ends a relayed session.
const MAX_ANSWER: usize = 1024;

/// Write `data` and flush, within `timeout` (nothing to do for no data).
pub async fn write_all_timeout(
    stream: &mut MailStream,
    data: &[u8],
    timeout: Duration,
) -> Result<()> {
    if data.is_empty() {
        return Ok(());
    }
    tokio::time::timeout(timeout, async {
        stream.write_all(data).await?;
        stream.flush().await
    })
    .await
    .map_err(|_| ds_net::Error::Timeout)??;
    Ok(())
}
