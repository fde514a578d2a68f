//! [`LineConn`]: a buffered connection for line-based protocols. Lines and literals are read with a cap
//! and a timeout; output is buffered until [`LineConn::flush`] (so pipelined replies go out together).

use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use crate::stream::MailStream;
use crate::{Error, Result};

/// Default timeout for flushing output to the peer.
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// Size of one socket read.
const READ_CHUNK: usize = 8 * 1024;

/// Output buffered beyond this size is flushed by [`LineConn::write_all`] itself.
const WRITE_HIGH_WATER: usize = 64 * 1024;

/// A buffered connection over any byte stream.
#[derive(Debug)]
pub struct LineConn<S> {
    stream: S,
    /// Received but not yet consumed input. Never grows past the current cap plus one read chunk.
    rbuf: BytesMut,
    /// Bytes of `rbuf` already known to hold no LF.
    scanned: usize,
    /// True while the rest of an overlong line is being thrown away.
    discarding: bool,
    /// Output not yet written to the stream; flushed at [`WRITE_HIGH_WATER`].
    wbuf: BytesMut,
    write_timeout: Duration,
}

impl<S: AsyncRead + AsyncWrite + Unpin> LineConn<S> {
    /// Wrap a stream.
    pub fn new(stream: S) -> Self {
        Self::with_buffered(stream, &[])
    }

    /// Wrap a stream whose first bytes were already read elsewhere (they are read first).
    pub fn with_buffered(stream: S, buffered: &[u8]) -> Self {
        Self {
            stream,
            rbuf: BytesMut::from(buffered),
            scanned: 0,
            discarding: false,
            wbuf: BytesMut::new(),
            write_timeout: DEFAULT_WRITE_TIMEOUT,
        }
    }

    /// Set the timeout used by [`LineConn::flush`] (and the implicit flush of a large write).
    pub fn set_write_timeout(&mut self, timeout: Duration) {
        self.write_timeout = timeout;
    }

    /// Read one line, LF included (CRLF or bare LF, returned as sent).
    ///
    /// - `Ok(None)`: clean end of stream (no partial line pending).
    /// - [`Error::LineTooLong`]: the line (terminator included) was longer than `max_len`; it has been
    ///   discarded up to and including its LF, so the caller can reply and call `read_line` again.
    /// - [`Error::Timeout`]: no complete line within `timeout` (the partial line stays buffered).
    /// - [`Error::UnexpectedEof`]: the peer closed in the middle of a line.
    pub async fn read_line(
        &mut self,
        max_len: usize,
        timeout: Duration,
    ) -> Result<Option<Vec<u8>>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(pos) = self.rbuf[self.scanned..].iter().position(|&b| b == b'\n') {
                let end = self.scanned + pos + 1;
                self.scanned = 0;
                if self.discarding {
                    self.discarding = false;
                    self.rbuf.advance(end);
                    return Err(Error::LineTooLong { max: max_len });
                }
                let line = self.rbuf.split_to(end);
                if line.len() > max_len {
                    return Err(Error::LineTooLong { max: max_len });
                }
                return Ok(Some(line.to_vec()));
            }
            self.scanned = self.rbuf.len();
            if self.discarding || self.rbuf.len() > max_len {
                // Too long already: throw the input away until the LF shows up.
                self.discarding = true;
                self.rbuf.clear();
                self.scanned = 0;
            }
            if self.fill(deadline).await? == 0 {
                if self.rbuf.is_empty() && !self.discarding {
                    return Ok(None);
                }
                self.rbuf.clear();
                self.scanned = 0;
                self.discarding = false;
                return Err(Error::UnexpectedEof);
            }
        }
    }

    /// Read exactly `len` octets (an IMAP literal, a BDAT chunk). `len` over `max` fails with
    /// [`Error::TooLarge`] without reading anything.
    pub async fn read_exact(
        &mut self,
        len: usize,
        max: usize,
        timeout: Duration,
    ) -> Result<Vec<u8>> {
        if len > max {
            return Err(Error::TooLarge { len, max });
        }
        let deadline = Instant::now() + timeout;
        let mut out = Vec::with_capacity(len.min(READ_CHUNK * 8));
        while out.len() < len {
            if self.rbuf.is_empty() && self.fill(deadline).await? == 0 {
                return Err(Error::UnexpectedEof);
            }
            let take = (len - out.len()).min(self.rbuf.len());
            out.extend_from_slice(&self.rbuf.split_to(take));
            self.scanned = 0;
        }
        Ok(out)
    }

    /// Read whatever is available, at most `max` octets (buffered input first). `Ok(None)` at end of
    /// stream.
    pub async fn read_some(&mut self, max: usize, timeout: Duration) -> Result<Option<Vec<u8>>> {
        if max == 0 {
            return Ok(Some(Vec::new()));
        }
        if self.rbuf.is_empty() {
            let deadline = Instant::now() + timeout;
            if self.fill(deadline).await? == 0 {
                return Ok(None);
            }
        }
        let take = max.min(self.rbuf.len());
        self.scanned = 0;
        Ok(Some(self.rbuf.split_to(take).to_vec()))
    }

    /// The input buffered now, after one read (bounded by `timeout`) if there was none: at most
    /// what was buffered plus one socket read. Empty = end of stream. Nothing is consumed: call
    /// [`LineConn::consume`] with what was used; the rest (commands pipelined after a message,
    /// say) stays buffered for the next read.
    pub async fn fill_buf(&mut self, timeout: Duration) -> Result<&[u8]> {
        if self.rbuf.is_empty() {
            let deadline = Instant::now() + timeout;
            self.fill(deadline).await?;
        }
        Ok(&self.rbuf)
    }

    /// The input buffered now, read until it holds at least `n` octets (or the stream ended:
    /// then what there is), within `timeout`. Nothing is consumed.
    pub async fn peek(&mut self, n: usize, timeout: Duration) -> Result<&[u8]> {
        let deadline = Instant::now() + timeout;
        while self.rbuf.len() < n {
            if self.fill(deadline).await? == 0 {
                break;
            }
        }
        Ok(&self.rbuf)
    }

    /// Drops the first `n` octets of the buffered input (after [`LineConn::fill_buf`]).
    pub fn consume(&mut self, n: usize) {
        let n = n.min(self.rbuf.len());
        self.rbuf.advance(n);
        self.scanned = 0;
        self.discarding = false;
    }

    /// Queue output; it is written on [`LineConn::flush`], or at once when a lot is queued. A
    /// large `data` (a message body's chunk) that would fill the buffer is written from where it
    /// is, after what was queued before it, without being copied into the buffer first.
    pub async fn write_all(&mut self, data: &[u8]) -> Result<()> {
        if self.wbuf.len() + data.len() < WRITE_HIGH_WATER {
            self.wbuf.extend_from_slice(data);
            return Ok(());
        }
        if data.len() < WRITE_HIGH_WATER / 2 {
            // Small: one write with what is queued.
            self.wbuf.extend_from_slice(data);
            return self.flush().await;
        }
        self.write_out(data).await
    }

    /// Write all queued output and flush the stream, bounded by the write timeout.
    pub async fn flush(&mut self) -> Result<()> {
        self.write_out(&[]).await
    }

    /// Write the queued output, then `data`, and flush the stream, bounded by the write timeout.
    /// Both go out in one vectored write where the stream takes one.
    async fn write_out(&mut self, mut data: &[u8]) -> Result<()> {
        let stream = &mut self.stream;
        let wbuf = &mut self.wbuf;
        tokio::time::timeout(self.write_timeout, async {
            while !wbuf.is_empty() || !data.is_empty() {
                let n = if wbuf.is_empty() {
                    stream.write(data).await?
                } else if data.is_empty() || !stream.is_write_vectored() {
                    stream.write(wbuf).await?
                } else {
                    let bufs = [std::io::IoSlice::new(wbuf), std::io::IoSlice::new(data)];
                    stream.write_vectored(&bufs).await?
                };
                if n == 0 {
                    return Err(std::io::Error::from(std::io::ErrorKind::WriteZero));
                }
                let queued = n.min(wbuf.len());
                wbuf.advance(queued);
                data = &data[n - queued..];
            }
            stream.flush().await
        })
        .await
        .map_err(|_| Error::Timeout)??;
        Ok(())
    }

    /// Flush, then shut down the write side of the stream (TLS close_notify, TCP FIN).
    pub async fn shutdown(&mut self) -> Result<()> {
        self.flush().await?;
        tokio::time::timeout(self.write_timeout, self.stream.shutdown())
            .await
            .map_err(|_| Error::Timeout)??;
        Ok(())
    }

    /// Input received but not consumed yet.
    pub fn buffered(&self) -> &[u8] {
        &self.rbuf
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &S {
        &self.stream
    }

    /// The wrapped stream, mutably. Reading from it directly bypasses the buffer.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.stream
    }

    /// Take the stream apart: the stream and the input already buffered (after STARTTLS that input is
    /// pipelined plaintext and must be refused; for a splice it must be sent on first). Output not yet
    /// flushed is dropped: call [`LineConn::flush`] first.
    pub fn into_parts(self) -> (S, Vec<u8>) {
        if !self.wbuf.is_empty() {
            tracing::warn!(octets = self.wbuf.len(), "unflushed output dropped");
        }
        (self.stream, self.rbuf.to_vec())
    }

    /// The stream alone; see [`LineConn::into_parts`] (buffered input is dropped).
    pub fn into_inner(self) -> S {
        self.into_parts().0
    }

    /// One read into `rbuf`, bounded by `deadline`. Returns the number of octets read (0 = EOF).
    async fn fill(&mut self, deadline: Instant) -> Result<usize> {
        self.rbuf.reserve(READ_CHUNK);
        let n = tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.rbuf))
            .await
            .map_err(|_| Error::Timeout)??;
        Ok(n)
    }
}

impl LineConn<MailStream> {
    /// STARTTLS, server side, after the "go ahead" reply was queued: flush it, refuse pipelined
    /// plaintext ([`Error::PlaintextAfterStartTls`]), run the handshake bounded by `timeout`.
    pub async fn start_tls(
        mut self,
        acceptor: &tokio_rustls::TlsAcceptor,
        timeout: Duration,
    ) -> Result<LineConn<MailStream>> {
        self.flush().await?;
        let write_timeout = self.write_timeout;
        let (stream, buffered) = self.into_parts();
        if !buffered.is_empty() {
            return Err(Error::PlaintextAfterStartTls(buffered.len()));
        }
        let stream = stream.accept_tls(acceptor, timeout).await?;
        let mut conn = LineConn::new(stream);
        conn.set_write_timeout(write_timeout);
        Ok(conn)
    }
}
