//! The crate's one error type. Protocol failures become POP3 replies; these are what ends a
//! connection (and is logged once, at the task boundary).

/// Everything that can end a POP3 session or a forwarding attempt.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The connection (reading, writing, TLS).
    #[error(transparent)]
    Net(#[from] ds_net::Error),
    /// Reaching the owner or splicing a forwarded session.
    #[error(transparent)]
    Access(#[from] ds_access::Error),
    /// The mailbox store.
    #[error("store: {0}")]
    Store(#[from] ds_store::Error),
    /// The directory.
    #[error("directory: {0}")]
    Directory(#[from] ds_directory::Error),
    /// A socket operation outside `ds-net`.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The owner of a forwarded session misbehaved or could not be reached.
    #[error("owner {node}: {reason}")]
    Owner {
        /// The owner's node id.
        node: String,
        /// What went wrong.
        reason: String,
    },
    /// A blocking task failed.
    #[error("background task: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
