//! [`splice`]: copy bytes both ways between two streams, used to proxy a POP3/IMAP session to the node
//! that owns the mailbox.
//!
//! Tuned for throughput, since every octet of a forwarded session passes here: both directions run in
//! one task over the two streams as they are (no `split`, so no lock per read or write), each with a
//! buffer (8 KiB, grown to 64 KiB once a direction fills it at once) that is filled with everything
//! the source has ready before it is written (a TLS source yields one 16 KiB record per read:
//! gathered, a 100 KiB answer is two writes and two wake-ups of the reader on the far side instead
//! of seven), and output is flushed only when the source has nothing more ready. The idle and
//! half-close limits are kept by a watchdog that reads the time only when the task wakes, and
//! re-arms its timer only when it fired (or must fire sooner), not on every read.
//!
//! [`splice_gated`] is the same copy over borrowed streams with a [`Gate`] on each direction: it
//! sees every octet in order (a protocol's framing can be followed at no extra copy) and can end
//! the splice at a point of its choosing with both streams open, which is how a forwarding node
//! takes over a client's LOGOUT or QUIT and keeps its link to the owner.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use crate::Result;

/// Size of each direction's copy buffer, once the direction has carried a full buffer's worth at
/// once.
const BUF_SIZE: usize = 64 * 1024;

/// Each direction's buffer to begin with: enough for commands and short answers, and cheap to
/// set up for the short sessions of clients that log in for every check. A direction that fills
/// it in one go (a download) grows it to [`BUF_SIZE`], once.
const FIRST_BUF_SIZE: usize = 8 * 1024;

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
    let (mut a, mut b) = (a, b);
    let gated = splice_gated(&mut a, &mut b, idle_timeout, &mut PassAll, &mut PassAll).await?;
    Ok((gated.a_to_b, gated.b_to_a))
}

/// Looks at what one direction of a [`splice_gated`] carries, in order, before it is written.
pub trait Gate {
    /// `data` was just read from the source (it follows what was passed before). `None`: write
    /// it all. `Some(n)`: write only `data[..n]`, then end this direction without passing on an
    /// EOF (the rest of `data` is dropped, the source is not read again) and end the splice as
    /// soon as the other direction has written everything it read.
    fn pass(&mut self, data: &[u8]) -> Option<usize>;

    /// The source sent EOF. `false` (the default): pass it on as a write shutdown. `true`: end
    /// this direction without passing it on, as [`Gate::pass`] returning `Some` does.
    fn at_eof(&mut self) -> bool {
        false
    }
}

/// A [`Gate`] that passes everything.
#[derive(Clone, Copy, Debug, Default)]
pub struct PassAll;

impl Gate for PassAll {
    fn pass(&mut self, _data: &[u8]) -> Option<usize> {
        None
    }
}

/// How a [`splice_gated`] ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Gated {
    /// Octets read from `a` (and written to `b`, unless a gate stopped it).
    pub a_to_b: u64,
    /// Octets read from `b`.
    pub b_to_a: u64,
    /// A gate stopped its direction: both streams are open, and every octet read was written
    /// and flushed but the ones the gate held back. `false`: the splice ended by EOF or the idle
    /// timeout.
    pub stopped: bool,
}

/// [`splice`] over borrowed streams, each direction through a [`Gate`] (`a_gate` sees what `a`
/// sends, `b_gate` what `b` sends): the caller keeps both streams, and a gate can end the splice
/// at a point of its choosing with both streams still open.
pub async fn splice_gated<A, B>(
    a: &mut A,
    b: &mut B,
    idle_timeout: Duration,
    a_gate: &mut impl Gate,
    b_gate: &mut impl Gate,
) -> Result<Gated>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let activity = Activity {
        start: Instant::now(),
        last_ms: AtomicU64::new(0),
        closed: AtomicBool::new(false),
    };
    let mut a = Watched {
        inner: a,
        activity: &activity,
        read: 0,
    };
    let mut b = Watched {
        inner: b,
        activity: &activity,
        read: 0,
    };
    let linger = LINGER.min(idle_timeout);
    let mut stopped = false;
    let outcome = {
        let copy = Bidirectional {
            a: &mut a,
            b: &mut b,
            a_to_b: OneWay::new(a_gate),
            b_to_a: OneWay::new(b_gate),
            stopped: &mut stopped,
        };
        let watchdog = Watchdog {
            activity: &activity,
            idle_timeout,
            linger,
            sleep: Box::pin(tokio::time::sleep(idle_timeout)),
        };
        tokio::select! {
            biased;
            res = copy => res,
            () = watchdog => Ok(()),
        }
    };
    outcome?;
    Ok(Gated {
        a_to_b: a.read,
        b_to_a: b.read,
        stopped,
    })
}

/// Both directions, polled in turn; done when both are.
struct Bidirectional<'s, 'g, A, B, GA, GB> {
    a: &'s mut A,
    b: &'s mut B,
    a_to_b: OneWay<'g, GA>,
    b_to_a: OneWay<'g, GB>,
    stopped: &'s mut bool,
}

impl<A, B, GA, GB> Future for Bidirectional<'_, '_, A, B, GA, GB>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
    GA: Gate,
    GB: Gate,
{
    type Output = io::Result<()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let forward = this.a_to_b.poll_copy(cx, &mut *this.a, &mut *this.b)?;
        let backward = this.b_to_a.poll_copy(cx, &mut *this.b, &mut *this.a)?;
        if forward.is_ready() && backward.is_ready() {
            return Poll::Ready(Ok(()));
        }
        // A gate stopped its direction: done once the other one has nothing read and unwritten.
        let stopped = (this.a_to_b.stopped && this.b_to_a.drained())
            || (this.b_to_a.stopped && this.a_to_b.drained());
        if stopped {
            *this.stopped = true;
            return Poll::Ready(Ok(()));
        }
        Poll::Pending
    }
}

/// One direction's buffer: `buf[written..filled]` is waiting to be written.
struct OneWay<'g, G> {
    gate: &'g mut G,
    /// The gate ended this direction; what it let through is written and flushed.
    stopped: bool,
    /// The gate ended this direction once `buf[..filled]` is written.
    stopping: bool,
    buf: Vec<u8>,
    filled: usize,
    written: usize,
    /// The source sent EOF.
    eof: bool,
    /// Written since the last flush.
    unflushed: bool,
    /// EOF passed on (write side shut down): this direction is over.
    done: bool,
}

impl<'g, G: Gate> OneWay<'g, G> {
    fn new(gate: &'g mut G) -> Self {
        Self {
            gate,
            stopped: false,
            stopping: false,
            buf: vec![0; FIRST_BUF_SIZE],
            filled: 0,
            written: 0,
            eof: false,
            unflushed: false,
            done: false,
        }
    }

    /// Move what can be moved now; `Ready` once EOF has been passed on.
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        from: &mut R,
        to: &mut W,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        if self.done {
            return Poll::Ready(Ok(()));
        }
        if self.stopped {
            return Poll::Pending;
        }
        loop {
            // Gather everything the source has ready, up to a full buffer.
            let mut read_pending = false;
            while !self.eof && !self.stopping && self.filled < self.buf.len() {
                let mut rb = ReadBuf::new(&mut self.buf[self.filled..]);
                match Pin::new(&mut *from).poll_read(cx, &mut rb) {
                    Poll::Ready(Ok(())) if rb.filled().is_empty() => {
                        if self.gate.at_eof() {
                            self.stopping = true;
                        } else {
                            self.eof = true;
                        }
                    }
                    Poll::Ready(Ok(())) => {
                        let n = rb.filled().len();
                        match self.gate.pass(&self.buf[self.filled..self.filled + n]) {
                            None => self.filled += n,
                            Some(kept) => {
                                self.filled += kept.min(n);
                                self.stopping = true;
                            }
                        }
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        read_pending = true;
                        break;
                    }
                }
            }
            if self.filled == self.buf.len() && self.buf.len() < BUF_SIZE {
                // More was ready than the first buffer holds: this direction carries bulk.
                self.buf.resize(BUF_SIZE, 0);
            }
            if self.written < self.filled {
                match Pin::new(&mut *to).poll_write(cx, &self.buf[self.written..self.filled]) {
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                    }
                    Poll::Ready(Ok(n)) => {
                        self.written += n;
                        self.unflushed = true;
                        if self.written == self.filled {
                            self.written = 0;
                            self.filled = 0;
                        }
                        continue;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => return Poll::Pending,
                }
            }
            // Everything read so far is written: flush before waiting for more, or at the end.
            if self.unflushed {
                match Pin::new(&mut *to).poll_flush(cx) {
                    Poll::Ready(Ok(())) => self.unflushed = false,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => return Poll::Pending,
                }
            }
            if self.stopping {
                self.stopped = true;
                return Poll::Pending;
            }
            if self.eof {
                // The other side may be gone already; its error does not matter any more.
                return match Pin::new(&mut *to).poll_shutdown(cx) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(_) => {
                        self.done = true;
                        Poll::Ready(Ok(()))
                    }
                };
            }
            if read_pending {
                return Poll::Pending;
            }
        }
    }
}

impl<G> OneWay<'_, G> {
    /// Everything read is written and flushed.
    fn drained(&self) -> bool {
        self.done || (self.written == self.filled && !self.unflushed)
    }
}

/// When an octet last moved, and whether a side has closed; shared by both directions.
struct Activity {
    start: Instant,
    /// Milliseconds since `start` of the last octet read, either way, or of the first EOF.
    last_ms: AtomicU64,
    /// A side has sent EOF: the other direction only lingers.
    closed: AtomicBool,
}

impl Activity {
    fn mark(&self) {
        let elapsed = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(elapsed, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// A stream that records activity on the shared [`Activity`] and counts what was read from it.
struct Watched<'a, S> {
    inner: S,
    activity: &'a Activity,
    read: u64,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<'_, S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            let n = buf.filled().len() - before;
            if n == 0 {
                if buf.remaining() > 0 && !this.activity.closed.swap(true, Ordering::Relaxed) {
                    // The first EOF starts the other direction's linger.
                    this.activity.mark();
                }
            } else {
                this.read += n as u64;
                this.activity.mark();
            }
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<'_, S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Ready once nothing moved for the idle timeout, or for the linger after a side closed. Its
/// deadline is worked out afresh each time the task wakes, so activity and a close are seen at once.
struct Watchdog<'a> {
    activity: &'a Activity,
    idle_timeout: Duration,
    linger: Duration,
    sleep: Pin<Box<tokio::time::Sleep>>,
}

impl Future for Watchdog<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        loop {
            let closed = this.activity.closed.load(Ordering::Relaxed);
            let allowed = if closed {
                this.linger
            } else {
                this.idle_timeout
            };
            let deadline = this.activity.last() + allowed;
            if Instant::now() >= deadline {
                if closed {
                    tracing::debug!(linger = ?this.linger, "splice: other side closed, this one stalled; closing");
                } else {
                    tracing::debug!(idle_timeout = ?this.idle_timeout, "splice idle, closing");
                }
                return Poll::Ready(());
            }
            // The timer is moved only when it must fire earlier (a side closed) or has fired
            // too early (octets moved since it was set): not on every wake-up, which would
            // re-register it with the timer wheel once per read.
            if this.sleep.deadline() > deadline || this.sleep.is_elapsed() {
                this.sleep.as_mut().reset(deadline);
            }
            if this.sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
    }
}
