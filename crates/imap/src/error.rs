//! The crate's error type: what ends a session (I/O, store) as opposed to a protocol reply.

/// Why a session ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Net(#[from] ds_net::Error),
    #[error(transparent)]
    Store(#[from] ds_store::Error),
    #[error(transparent)]
    Directory(#[from] ds_directory::Error),
    #[error(transparent)]
    Access(#[from] ds_access::Error),
    #[error("background task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// The crate's `Result`.
pub type Result<T> = std::result::Result<T, Error>;
