//! [`MailStream`]: one stream type over plain TCP and TLS (server or client side), and [`ConnContext`],
//! what a session knows about its connection.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, BufReader, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector, client, server};

use crate::{Error, Result};

/// Read buffer under a client-side TLS stream. rustls asks its transport for 4 KiB at a time,
/// which would be one syscall each; through this buffer a forwarded session's downloads cost a
/// read per 64 KiB instead.
const CLIENT_TLS_READ_BUFFER: usize = 64 * 1024;

/// What a session knows about its connection.
#[derive(Clone, Debug)]
pub struct ConnContext {
    /// The client's address.
    pub peer: SocketAddr,
    /// The local address the client connected to (multihoming picks the domain from it).
    pub local: SocketAddr,
    /// The TLS SNI name, lower-cased; set after a handshake (implicit TLS or STARTTLS), `None` before
    /// or when the client sent none.
    pub sni: Option<String>,
    /// True once the connection runs TLS.
    pub tls: bool,
    /// The listener's protocol name (`"smtp"`, `"pop3s"`, ...).
    pub protocol: &'static str,
    /// The connection's place under the listener's per-IP limit.
    pub ip_slot: crate::IpSlot,
}

impl ConnContext {
    /// Refresh `tls` and `sni` from the stream, after a STARTTLS upgrade.
    pub fn update_from(&mut self, stream: &MailStream) {
        self.tls = stream.is_tls();
        self.sni = stream.sni();
    }
}

/// A TCP connection, plain or TLS.
#[derive(Debug)]
pub enum MailStream {
    /// Plain TCP.
    Plain(TcpStream),
    /// Server side of a TLS connection (implicit TLS or after STARTTLS).
    ServerTls(Box<server::TlsStream<TcpStream>>),
    /// Client side of a TLS connection (relay or forwarding to a peer); the TCP stream is read
    /// through a buffer (see [`CLIENT_TLS_READ_BUFFER`]), written directly.
    ClientTls(Box<client::TlsStream<BufReader<TcpStream>>>),
}

impl From<TcpStream> for MailStream {
    fn from(tcp: TcpStream) -> Self {
        MailStream::Plain(tcp)
    }
}

impl MailStream {
    /// True if the stream runs TLS (either side).
    pub fn is_tls(&self) -> bool {
        !matches!(self, MailStream::Plain(_))
    }

    /// The SNI name the client sent, lower-cased (server side only; `None` otherwise).
    pub fn sni(&self) -> Option<String> {
        match self {
            MailStream::ServerTls(tls) => {
                tls.get_ref().1.server_name().map(str::to_ascii_lowercase)
            }
            _ => None,
        }
    }

    /// The underlying TCP stream.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            MailStream::Plain(tcp) => tcp,
            MailStream::ServerTls(tls) => tls.get_ref().0,
            MailStream::ClientTls(tls) => tls.get_ref().0.get_ref(),
        }
    }

    /// The remote address.
    pub fn peer_addr(&self) -> Result<SocketAddr> {
        Ok(self.tcp().peer_addr()?)
    }

    /// The local address.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.tcp().local_addr()?)
    }

    /// Server-side TLS handshake (implicit TLS, or STARTTLS after the "go ahead" reply), bounded by
    /// `timeout`. Fails with [`Error::AlreadyTls`] if the stream already runs TLS.
    pub async fn accept_tls(self, acceptor: &TlsAcceptor, timeout: Duration) -> Result<MailStream> {
        let MailStream::Plain(tcp) = self else {
            return Err(Error::AlreadyTls);
        };
        let tls = tokio::time::timeout(timeout, acceptor.accept(tcp))
            .await
            .map_err(|_| Error::Timeout)??;
        Ok(MailStream::ServerTls(Box::new(tls)))
    }

    /// Client-side TLS handshake (after the peer accepted STARTTLS, or for implicit TLS), verifying the
    /// peer against `server_name` (a DNS name or an IP address), bounded by `timeout`.
    pub async fn connect_tls(
        self,
        connector: &TlsConnector,
        server_name: &str,
        timeout: Duration,
    ) -> Result<MailStream> {
        let MailStream::Plain(tcp) = self else {
            return Err(Error::AlreadyTls);
        };
        let name = ServerName::try_from(server_name.to_owned())
            .map_err(|_| Error::InvalidServerName(server_name.to_owned()))?;
        let tcp = BufReader::with_capacity(CLIENT_TLS_READ_BUFFER, tcp);
        let tls = tokio::time::timeout(timeout, connector.connect(name, tcp))
            .await
            .map_err(|_| Error::Timeout)??;
        Ok(MailStream::ClientTls(Box::new(tls)))
    }
}

impl AsyncRead for MailStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MailStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            MailStream::ServerTls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            MailStream::ClientTls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for MailStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MailStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            MailStream::ServerTls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            MailStream::ClientTls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MailStream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            MailStream::ServerTls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            MailStream::ClientTls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            MailStream::Plain(s) => s.is_write_vectored(),
            MailStream::ServerTls(s) => s.is_write_vectored(),
            MailStream::ClientTls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MailStream::Plain(s) => Pin::new(s).poll_flush(cx),
            MailStream::ServerTls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            MailStream::ClientTls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MailStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            MailStream::ServerTls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            MailStream::ClientTls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
