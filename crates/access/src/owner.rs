//! Reaching an owner (DESIGN.md §7): a TCP connection with a timeout (`TCP_NODELAY`, so the
//! small replies of a login dialogue and of the spliced session are not held back), line replies
//! with a cap and a timeout, and the STARTTLS step verified against the cluster CA. The protocol
//! dialogues (POP3 `STLS`/`XCLIENT`/`USER`, IMAP `STARTTLS`/`ID`/`LOGIN`) are built on these.

use std::time::Duration;

use ds_net::{LineConn, MailStream, TlsConnector};
use tokio::net::TcpStream;

use crate::{Error, Result};

/// A connection to an owner, buffered for line dialogues.
pub type OwnerConn = LineConn<MailStream>;

/// The host part of `host:port` (`[v6]:port` too), for TLS server-name checks.
pub fn host_of(endpoint: &str) -> &str {
    let host = endpoint.rsplit_once(':').map_or(endpoint, |(host, _)| host);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// Whether a connection that has waited idle (a warm one) is still quiet: nothing buffered,
/// and the owner has sent nothing since and not closed it. An owner that shuts down greets
/// its idle connections with a last `-ERR`/`* BYE` line; such a connection must not be used
/// for a login. Never waits: one read attempt that must find nothing ready.
pub fn is_quiet(conn: &mut OwnerConn) -> bool {
    use tokio::io::{AsyncRead, ReadBuf};
    if !conn.buffered().is_empty() {
        return false;
    }
    let mut byte = [0u8; 1];
    let mut buf = ReadBuf::new(&mut byte);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    // Ready means data, EOF or an error: not quiet. (A byte read here is lost, and so is the
    // connection: it is dropped.)
    std::pin::Pin::new(conn.get_mut())
        .poll_read(&mut cx, &mut buf)
        .is_pending()
}

/// Connect to `endpoint` (`host:port`) within `timeout`, with `TCP_NODELAY`.
pub async fn connect(endpoint: &str, timeout: Duration) -> Result<OwnerConn> {
    let tcp = tokio::time::timeout(timeout, TcpStream::connect(endpoint))
        .await
        .map_err(|_| Error::owner(endpoint, "connecting timed out"))?
        .map_err(|e| Error::owner(endpoint, format!("connecting: {e}")))?;
    let _ = tcp.set_nodelay(true);
    Ok(LineConn::new(MailStream::Plain(tcp)))
}

/// One reply line of at most `max_len` octets, ending in CRLF (a bare LF is made CRLF). The
/// owner closing the connection is an error.
pub async fn read_reply(
    conn: &mut OwnerConn,
    endpoint: &str,
    max_len: usize,
    timeout: Duration,
) -> Result<Vec<u8>> {
    match conn.read_line(max_len, timeout).await {
        Ok(Some(mut line)) => {
            if !line.ends_with(b"\r\n") {
                line.pop();
                line.extend_from_slice(b"\r\n");
            }
            Ok(line)
        }
        Ok(None) => Err(Error::owner(endpoint, "closed the connection")),
        Err(e) => Err(Error::owner(endpoint, format!("reading a reply: {e}"))),
    }
}

/// Send `line` (CRLF included) and read one reply line.
pub async fn command(
    conn: &mut OwnerConn,
    endpoint: &str,
    line: &[u8],
    max_len: usize,
    timeout: Duration,
) -> Result<Vec<u8>> {
    conn.write_all(line).await?;
    conn.flush().await?;
    read_reply(conn, endpoint, max_len, timeout).await
}

/// The TLS handshake after the owner accepted STARTTLS (`STLS`): refuses an owner that sent
/// anything after its go-ahead, and verifies its certificate for the host of `endpoint` with
/// `connector` (which trusts the cluster CA only), within `timeout`.
pub async fn start_tls(
    conn: OwnerConn,
    endpoint: &str,
    connector: &TlsConnector,
    timeout: Duration,
) -> Result<OwnerConn> {
    let (stream, buffered) = conn.into_parts();
    if !buffered.is_empty() {
        return Err(Error::owner(endpoint, "sent data after its STARTTLS reply"));
    }
    let stream = stream
        .connect_tls(connector, host_of(endpoint), timeout)
        .await
        .map_err(|e| Error::owner(endpoint, format!("TLS: {e}")))?;
    Ok(LineConn::new(stream))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts() {
        assert_eq!(host_of("office-b.example.net:110"), "office-b.example.net");
        assert_eq!(host_of("127.0.0.1:1110"), "127.0.0.1");
        assert_eq!(host_of("[::1]:1110"), "::1");
        assert_eq!(host_of("office-b"), "office-b");
    }

    #[tokio::test]
    async fn connect_failures_name_the_endpoint() {
        let closed = {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            l.local_addr().unwrap().to_string()
        };
        let e = connect(&closed, Duration::from_secs(5)).await.unwrap_err();
        assert!(e.to_string().contains(&closed), "{e}");
    }
}
