//! The crate's one error type.

use std::path::PathBuf;

/// Everything that can go wrong in `ds-net`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O error on a socket.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// A read, write, handshake or connect did not finish in time.
    #[error("timed out")]
    Timeout,
    /// A line was longer than the cap; the line was discarded up to and including its LF, so the
    /// session can reply and keep reading.
    #[error("line longer than {max} octets")]
    LineTooLong {
        /// The cap that was exceeded.
        max: usize,
    },
    /// A literal or bulk read asked for more than its cap.
    #[error("{len} octets requested, over the cap of {max}")]
    TooLarge {
        /// Requested length.
        len: usize,
        /// The cap.
        max: usize,
    },
    /// The peer closed the connection in the middle of a line or a literal.
    #[error("connection closed in the middle of a line or literal")]
    UnexpectedEof,
    /// A TLS upgrade was asked for on a stream that already runs TLS.
    #[error("the stream already runs TLS")]
    AlreadyTls,
    /// The client pipelined plaintext after STARTTLS; it must be refused (command injection).
    #[error("{0} octets of plaintext sent after STARTTLS")]
    PlaintextAfterStartTls(usize),
    /// A rustls error (configuration or handshake).
    #[error("tls: {0}")]
    Tls(#[from] rustls::Error),
    /// Bad PEM input.
    #[error("pem: {0}")]
    Pem(#[from] rustls_pki_types::pem::Error),
    /// PEM input without a certificate.
    #[error("no certificate found in PEM input")]
    NoCertificate,
    /// A TLS server name that is neither a DNS name nor an IP address.
    #[error("invalid TLS server name {0:?}")]
    InvalidServerName(String),
    /// Certificate generation failed.
    #[error("certificate generation: {0}")]
    CertGen(#[from] rcgen::Error),
    /// Reading or writing a certificate or key file failed.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// True for [`Error::Timeout`].
    pub fn is_timeout(&self) -> bool {
        matches!(self, Error::Timeout)
    }
}
