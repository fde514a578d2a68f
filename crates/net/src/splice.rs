//! [`splice`]: copy bytes both ways between two streams, used to proxy a POP3/IMAP session to the node
//! that owns the mailbox.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::time::Instant;

use crate::Result;

/// Size of each direction's copy buffer.
const BUF_SIZE: usize = 16 * 1024;

/// After one side closed, how long the other direction may go without moving an octet before the
/// splice ends (capped by the idle timeout). While it keeps moving it is not cut: a client that
/// half-closes after its last command still gets the whole (possibly long) answer.
const LINGER: Duration = Duration::from_secs(5);

/// Copy `a` → `b` and `b` → `a` until one side closes (its EOF is passed on as a write shutdown and the
/// other direction may finish, as long as it never stalls for the short linger), or nothing moved for
/// `idle_timeout`.
/// Returns the octets copied `(a to b, b to a)`. An I/O error on either side ends the splice with the
/// error.
pub async fn splice<A, B>(a: A, b: B, idle_timeout: Duration) -> Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let start = Instant::now();
    // Milliseconds since `start` of the last octet moved, either way.
    let last_activity = AtomicU64::new(0);
    let a_to_b = AtomicU64::new(0);
    let b_to_a = AtomicU64::new(0);
    let (mut a_read, mut a_write) = tokio::io::split(a);
    let (mut b_read, mut b_write) = tokio::io::split(b);

    let idle = async {
        loop {
            let last = Duration::from_millis(last_activity.load(Ordering::Relaxed));
            let deadline = start + last + idle_timeout;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    };
    tokio::pin!(idle);

    let forward = copy_one_way(&mut a_read, &mut b_write, &a_to_b, &last_activity, start);
    let backward = copy_one_way(&mut b_read, &mut a_write, &b_to_a, &last_activity, start);
    tokio::pin!(forward, backward);

    let linger = LINGER.min(idle_timeout);
    let outcome: Result<()> = tokio::select! {
        res = &mut forward => match res {
            Ok(()) => finish(backward, linger, &last_activity, start).await,
            Err(e) => Err(e),
        },
        res = &mut backward => match res {
            Ok(()) => finish(forward, linger, &last_activity, start).await,
            Err(e) => Err(e),
        },
        () = &mut idle => {
            tracing::debug!(?idle_timeout, "splice idle, closing");
            Ok(())
        }
    };
    outcome?;
    Ok((
        a_to_b.load(Ordering::Relaxed),
        b_to_a.load(Ordering::Relaxed),
    ))
}

/// Let the remaining direction run until it ends or moves nothing for `linger` (counted from the
/// other side's EOF or the last octet copied, whichever is later).
async fn finish(
    mut rest: std::pin::Pin<&mut impl std::future::Future<Output = Result<()>>>,
    linger: Duration,
    last_activity: &AtomicU64,
    start: Instant,
) -> Result<()> {
    loop {
        let last = Duration::from_millis(last_activity.load(Ordering::Relaxed));
        let deadline = start + last + linger;
        if Instant::now() >= deadline {
            tracing::debug!(
                ?linger,
                "splice: other side closed, this one stalled; closing"
            );
            return Ok(());
        }
        tokio::select! {
            res = &mut rest => return res,
            () = tokio::time::sleep_until(deadline) => {}
        }
    }
}

fn mark(last_activity: &AtomicU64, start: Instant) {
    let elapsed = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
    last_activity.store(elapsed, Ordering::Relaxed);
}

/// Copy until EOF, then shut down the writer.
async fn copy_one_way<R, W>(
    from: &mut ReadHalf<R>,
    to: &mut WriteHalf<W>,
    copied: &AtomicU64,
    last_activity: &AtomicU64,
    start: Instant,
) -> Result<()>
where
    R: AsyncRead,
    W: AsyncWrite,
{
    let mut buf = vec![0u8; BUF_SIZE];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            // Pass the close on; the other side may already be gone. The EOF starts the
            // other direction's linger.
            let _ = to.shutdown().await;
            mark(last_activity, start);
            return Ok(());
        }
        to.write_all(&buf[..n]).await?;
        to.flush().await?;
        copied.fetch_add(n as u64, Ordering::Relaxed);
        mark(last_activity, start);
    }
}
