//! The cluster side of a node (DESIGN.md §4–§5): the generated Minger code, the Minger
//! server, the peer client, the [`Locator`] (local directory → cache → peers) and the
//! creation guard ([`Locator::create_account`]).
//!
//! ```text
//! let locator = Locator::new(config, directory, &store)?;      // lazy peer channels
//! tokio::spawn(serve_minger(listener, locator.minger_service(), Some((cert, key)), shutdown));
//! match locator.locate("info@company.com", Purpose::Rcpt).await { … }
//! ```

mod authenticate;
pub mod config;
mod error;
mod guard;
pub mod locator;
mod move_run;
mod moving;
mod peer;
mod reservation;
mod server;

/// Generated from `proto/minger.proto`.
pub mod proto {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("dshare.minger.v1");
}

pub use authenticate::{AuthAnswer, PasswordAuthority};
pub use config::{
    ClusterConfig, DEFAULT_FANOUTS_PER_CONNECTION, DEFAULT_LOOKUP_TIMEOUT, DEFAULT_NEGATIVE_TTL,
    DEFAULT_POSITIVE_TTL, DEFAULT_RESERVATION_TTL, Endpoints, MAX_RESERVATION_TTL, MIN_SECRET_LEN,
    PeerConfig,
};
pub use error::{Error, Result};
pub use locator::{
    FanoutBudget, Kind, ListKeeper, ListKeepers, Location, Locator, Owner, PeerHello, Purpose,
};
pub use move_run::{EVENT_WAIT, MoveCommand, MoveEvent, MoveEvents};
pub use moving::{MOVES_TABLE, MoveProgress, MoveRecord, MoveReport, MoveState, SYNC_WINDOW};
pub use peer::{PeerState, PeerStatus};
pub use reservation::{RESERVATIONS_TABLE, Reservation};
pub use server::{MingerService, serve_minger};

/// The metadata key carrying the cluster secret on every Minger call.
pub const SECRET_HEADER: &str = "x-dshare-secret";

/// Installs ring as the process's rustls crypto provider, once; a provider installed
/// earlier (by the binary) is kept.
pub fn ensure_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}
