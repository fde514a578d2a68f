//! The crate's one error type.

/// What can go wrong while reaching or talking to an owner.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The connection (reading, writing, TLS, timeouts).
    #[error(transparent)]
    Net(#[from] ds_net::Error),
    /// A socket operation outside `ds-net`.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The owner could not be reached or broke the protocol while a forwarded login was set up.
    #[error("owner at {endpoint}: {reason}")]
    Owner {
        /// The owner's endpoint, `host:port`.
        endpoint: String,
        /// What went wrong.
        reason: String,
    },
    /// A password could not be checked (the directory, the blocking pool).
    #[error("password check: {0}")]
    Check(String),
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn owner(endpoint: &str, reason: impl Into<String>) -> Self {
        Error::Owner {
            endpoint: endpoint.to_owned(),
            reason: reason.into(),
        }
    }
}
