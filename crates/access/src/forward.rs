//! The last step of every forwarded login: once the owner accepted it and its answer was queued
//! for the client, hand the client's pipelined bytes to the owner, the owner's early bytes to the
//! client, and copy both ways ([`ds_net::splice`]) until either side closes, the session is idle,
//! or the node shuts down.

use std::time::Duration;

use ds_net::{MailStream, Shutdown};
use tokio::io::AsyncWriteExt;

use crate::Result;
use crate::owner::OwnerConn;

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
    mut client: ds_net::LineConn<MailStream>,
    owner: OwnerConn,
    idle_timeout: Duration,
    shutdown: &Shutdown,
) -> Result<Option<Copied>> {
    client.flush().await?;
    let (mut client, client_buffered) = client.into_parts();
    let (mut owner, owner_buffered) = owner.into_parts();
    let write_timeout = ds_net::DEFAULT_WRITE_TIMEOUT;
    write_all_timeout(&mut owner, &client_buffered, write_timeout).await?;
    write_all_timeout(&mut client, &owner_buffered, write_timeout).await?;
    tokio::select! {
        copied = ds_net::splice(client, owner, idle_timeout) => {
            let (up, down) = copied?;
            Ok(Some(Copied { up, down }))
        }
        () = shutdown.wait() => Ok(None),
    }
}

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
