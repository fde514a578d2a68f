//! [`splice`]: copy bytes both ways between two streams, used to proxy a POP3/IMAP session to the node
//! that owns the mailbox.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::time::Instant;

use crate::Result;

/// Size of each direction's copy buffer.
const BUF_SIZE: usize = 16 * 1024;

/// After one side closed, how long the other direction may still drain (capped by the idle timeout).
const LINGER: Duration = Duration::from_secs(5);

/// Copy `a` → `b` and `b` → `a` until one side closes (its EOF is passed on as a write shutdown and the
/// other direction gets a short linger to finish), or nothing moved for `idle_timeout`.
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
            Ok(()) => finish(backward, linger).await,
            Err(e) => Err(e),
        },
        res = &mut backward => match res {
            Ok(()) => finish(forward, linger).await,
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

/// Let the remaining direction run for at most `linger`.
async fn finish(
    rest: std::pin::Pin<&mut impl std::future::Future<Output = Result<()>>>,
    linger: Duration,
) -> Result<()> {
    match tokio::time::timeout(linger, rest).await {
        Ok(res) => res,
        Err(_) => Ok(()),
    }
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
            // Pass the close on; the other side may already be gone.
            let _ = to.shutdown().await;
            return Ok(());
        }
        to.write_all(&buf[..n]).await?;
        to.flush().await?;
        copied.fetch_add(n as u64, Ordering::Relaxed);
        let elapsed = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
        last_activity.store(elapsed, Ordering::Relaxed);
    }
}
