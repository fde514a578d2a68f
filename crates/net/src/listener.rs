//! The accept loop: connection limits, implicit TLS, one `tracing` span per connection, graceful drain.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tracing::Instrument;

use crate::limits::{IpSlot, PerIpLimiter};
use crate::shutdown::{Drain, Shutdown};
use crate::stream::{ConnContext, MailStream};

/// How a listener accepts connections.
#[derive(Clone)]
pub struct ListenOptions {
    /// Protocol name for logs and [`ConnContext::protocol`] (`"smtp"`, `"imaps"`, ...).
    pub protocol: &'static str,
    /// Implicit TLS (ports 465/993/995): the handshake runs before the handler sees the stream.
    pub implicit_tls: Option<TlsAcceptor>,
    /// Connections open at once over the listener; 0 = no limit. At the limit the loop stops accepting
    /// until one closes.
    pub max_connections: usize,
    /// Connections open at once per client IP; 0 = no limit. Over it a connection is closed at once.
    pub max_per_ip: usize,
    /// Bound on the implicit TLS handshake.
    pub tls_handshake_timeout: Duration,
    /// On shutdown, how long running connections get to finish before they are aborted.
    pub shutdown_grace: Duration,
}

impl ListenOptions {
    /// Plain listener for `protocol` with default limits (1024 connections, 16 per IP, 10 s handshake,
    /// 10 s grace).
    pub fn new(protocol: &'static str) -> Self {
        Self {
            protocol,
            implicit_tls: None,
            max_connections: 1024,
            max_per_ip: 16,
            tls_handshake_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

impl std::fmt::Debug for ListenOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListenOptions")
            .field("protocol", &self.protocol)
            .field("implicit_tls", &self.implicit_tls.is_some())
            .field("max_connections", &self.max_connections)
            .field("max_per_ip", &self.max_per_ip)
            .field("tls_handshake_timeout", &self.tls_handshake_timeout)
            .field("shutdown_grace", &self.shutdown_grace)
            .finish()
    }
}

/// Accept connections until `shutdown` fires, running `handler` on each in its own task inside an
/// `info_span!("conn", proto, peer, local, sni)`. Then stop accepting and wait for the running
/// connections (which got a [`Shutdown`] clone) at most `opts.shutdown_grace`, aborting the rest.
pub async fn serve<H, Fut>(
    listener: TcpListener,
    opts: ListenOptions,
    handler: H,
    shutdown: Shutdown,
) where
    H: Fn(MailStream, ConnContext, Shutdown) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let handler = Arc::new(handler);
    let permits = if opts.max_connections == 0 {
        Semaphore::MAX_PERMITS
    } else {
        opts.max_connections
    };
    let semaphore = Arc::new(Semaphore::new(permits));
    let per_ip = PerIpLimiter::new(opts.max_per_ip);
    let mut drain = Drain::new();
    let local_addr = listener.local_addr().ok();
    tracing::info!(proto = opts.protocol, addr = ?local_addr, "listening");
    let mut backoff = Duration::from_millis(50);

    loop {
        drain.reap();
        let permit = tokio::select! {
            permit = Arc::clone(&semaphore).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break, // closed: never happens, the semaphore is ours
            },
            () = shutdown.wait() => break,
        };
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // EMFILE and friends: wait a little, do not spin.
                    tracing::warn!(proto = opts.protocol, error = %e, "accept failed");
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = shutdown.wait() => break,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            },
            () = shutdown.wait() => break,
        };
        backoff = Duration::from_millis(50);
        let Some(ip_slot) = per_ip.try_acquire(peer.ip()) else {
            tracing::warn!(proto = opts.protocol, %peer, "per-IP connection limit reached, closing");
            drop(tcp);
            continue;
        };
        let local = match tcp.local_addr() {
            Ok(local) => local,
            Err(e) => {
                tracing::debug!(proto = opts.protocol, %peer, error = %e, "no local address");
                continue;
            }
        };
        let span = tracing::info_span!(
            "conn",
            proto = opts.protocol,
            %peer,
            %local,
            sni = tracing::field::Empty
        );
        let handler = Arc::clone(&handler);
        let tls = opts.implicit_tls.clone();
        let handshake_timeout = opts.tls_handshake_timeout;
        let conn_shutdown = shutdown.clone();
        let protocol = opts.protocol;
        drain.spawn(
            async move {
                let _permit = permit;
                let ip_slot = IpSlot::new(ip_slot);
                let Some((stream, mut ctx)) =
                    open(tcp, peer, local, protocol, tls.as_ref(), handshake_timeout).await
                else {
                    return;
                };
                ctx.ip_slot = ip_slot.clone();
                tracing::debug!("connection open");
                handler(stream, ctx, conn_shutdown).await;
                // Whatever still holds the context, the connection is over.
                ip_slot.release();
                tracing::debug!("connection closed");
            }
            .instrument(span),
        );
    }

    drop(listener);
    let running = drain.len();
    tracing::info!(
        proto = opts.protocol,
        running,
        "stopped accepting, draining connections"
    );
    let aborted = drain.wait(opts.shutdown_grace).await;
    if aborted > 0 {
        tracing::warn!(
            proto = opts.protocol,
            aborted,
            "connections aborted after the grace period"
        );
    }
}

/// Build the stream and context of a new connection, running the implicit TLS handshake if asked.
async fn open(
    tcp: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    protocol: &'static str,
    tls: Option<&TlsAcceptor>,
    handshake_timeout: Duration,
) -> Option<(MailStream, ConnContext)> {
    let _ = tcp.set_nodelay(true);
    let mut stream = MailStream::Plain(tcp);
    if let Some(acceptor) = tls {
        stream = match stream.accept_tls(acceptor, handshake_timeout).await {
            Ok(stream) => stream,
            Err(e) => {
                tracing::info!(error = %e, "TLS handshake failed");
                return None;
            }
        };
    }
    let sni = stream.sni();
    if let Some(name) = &sni {
        tracing::Span::current().record("sni", name.as_str());
    }
    let ctx = ConnContext {
        peer,
        local,
        tls: stream.is_tls(),
        sni,
        protocol,
        ip_slot: IpSlot::default(),
    };
    Some((stream, ctx))
}
