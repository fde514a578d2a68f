//! The crate's one error type.

use crate::config::MIN_SECRET_LEN;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid cluster configuration: {0}")]
    Config(String),
    #[error("the cluster secret must be at least {MIN_SECRET_LEN} characters")]
    SecretTooShort,
    #[error(transparent)]
    Directory(#[from] ds_directory::Error),
    #[error(transparent)]
    Store(#[from] ds_store::Error),
    /// The creation guard was refused: `peer` (this node's own id for a local refusal) has
    /// the address, or another creation of it is under way.
    #[error("{address} cannot be created: {reason} (on {peer})")]
    Exists {
        address: String,
        peer: String,
        reason: String,
    },
    /// A peer could not be asked; the operation may be retried (or forced).
    #[error("peer {peer} is unavailable: {reason}")]
    Unavailable { peer: String, reason: String },
    #[error("peer {peer}: {source}")]
    Endpoint {
        peer: String,
        source: tonic::transport::Error,
    },
    #[error("Minger server: {0}")]
    Serve(#[source] tonic::transport::Error),
    /// An account move could not go ahead (nothing was changed unless said otherwise).
    #[error("move: {0}")]
    Move(String),
    #[error("background task failed: {0}")]
    Task(String),
}

pub type Result<T> = std::result::Result<T, Error>;
