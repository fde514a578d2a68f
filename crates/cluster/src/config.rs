//! The cluster side of a node's configuration (DESIGN.md §8 `[cluster]`), already parsed:
//! the binary reads the TOML and the secret file and builds a [`ClusterConfig`].

use std::fmt;
use std::time::Duration;

use crate::{Error, Result};

/// Shortest accepted cluster secret, in characters.
pub const MIN_SECRET_LEN: usize = 16;
/// How long a peer's answer `FOUND` is trusted.
pub const DEFAULT_POSITIVE_TTL: Duration = Duration::from_secs(5 * 24 * 3600);
/// Per-peer bound on one Minger call.
pub const DEFAULT_LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);
/// How long "no node has it" is trusted. Safe because `Reserve` drops the entry on every
/// peer before an address is created, and nothing is cached while a reservation lives.
pub const DEFAULT_NEGATIVE_TTL: Duration = Duration::from_secs(60);
/// Uncached peer fan-outs one client connection may cause.
pub const DEFAULT_FANOUTS_PER_CONNECTION: u32 = 20;
/// Lifetime of a creation-guard reservation that is never released.
pub const DEFAULT_RESERVATION_TTL: Duration = Duration::from_secs(60);
/// Longest reservation a peer may ask for.
pub const MAX_RESERVATION_TTL: Duration = Duration::from_secs(600);

/// Where this node's mail services can be reached by peers, each `host:port`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Endpoints {
    pub smtp: String,
    pub pop3: String,
    pub imap: String,
}

/// One other node of the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    /// Its node id, unique in the cluster.
    pub id: String,
    /// `https://host:port` (verified against [`ClusterConfig::ca_pem`]) or `http://host:port`
    /// (plaintext, for loopback only).
    pub minger_url: String,
    /// Its SMTP endpoint `host:port`; when set, it overrides what the peer advertises.
    pub smtp: Option<String>,
}

/// The cluster side of a node.
#[derive(Clone)]
pub struct ClusterConfig {
    /// This node's id, unique in the cluster.
    pub node_id: String,
    /// The endpoints this node advertises to its peers.
    pub advertise: Endpoints,
    /// Shared by every node; at least [`MIN_SECRET_LEN`] printable ASCII characters. Never logged.
    pub secret: String,
    pub peers: Vec<PeerConfig>,
    /// PEM trust anchor(s) for `https` peers.
    pub ca_pem: Option<Vec<u8>>,
    /// Lifetime of a cached owner (default 5 days).
    pub positive_ttl: Duration,
    /// Lifetime of a cached "no peer has it" (default 60 s); zero disables the negative cache.
    pub negative_ttl: Duration,
    /// Uncached peer fan-outs per client connection ([`crate::FanoutBudget`], default 20).
    pub fanouts_per_connection: u32,
    /// Per-peer bound on a Minger call (default 2 s); a whole lookup is bounded by it too.
    pub lookup_timeout: Duration,
    /// Domains shared with peers; empty = every shared domain.
    pub allowed_domains: Vec<String>,
}

impl fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterConfig")
            .field("node_id", &self.node_id)
            .field("advertise", &self.advertise)
            .field("secret", &"<redacted>")
            .field("peers", &self.peers)
            .field("ca_pem", &self.ca_pem.as_ref().map(|_| "<pem>"))
            .field("positive_ttl", &self.positive_ttl)
            .field("negative_ttl", &self.negative_ttl)
            .field("fanouts_per_connection", &self.fanouts_per_connection)
            .field("lookup_timeout", &self.lookup_timeout)
            .field("allowed_domains", &self.allowed_domains)
            .finish()
    }
}

impl ClusterConfig {
    /// A configuration with no peers and the default TTLs and timeout.
    pub fn new(
        node_id: impl Into<String>,
        advertise: Endpoints,
        secret: impl Into<String>,
    ) -> Self {
        Self {
            node_id: node_id.into(),
            advertise,
            secret: secret.into(),
            peers: vec![],
            ca_pem: None,
            positive_ttl: DEFAULT_POSITIVE_TTL,
            negative_ttl: DEFAULT_NEGATIVE_TTL,
            fanouts_per_connection: DEFAULT_FANOUTS_PER_CONNECTION,
            lookup_timeout: DEFAULT_LOOKUP_TIMEOUT,
            allowed_domains: vec![],
        }
    }

    /// Checks the invariants the rest of the crate relies on.
    pub fn validate(&self) -> Result<()> {
        if self.node_id.trim().is_empty() {
            return Err(Error::Config("node id is empty".into()));
        }
        check_secret(&self.secret)?;
        if self.lookup_timeout.is_zero() {
            return Err(Error::Config("lookup_timeout must be positive".into()));
        }
        let mut seen = std::collections::BTreeSet::new();
        for peer in &self.peers {
            if peer.id.trim().is_empty() {
                return Err(Error::Config("a peer has an empty id".into()));
            }
            if peer.id == self.node_id {
                return Err(Error::Config(format!(
                    "peer {} has this node's own id",
                    peer.id
                )));
            }
            if !seen.insert(peer.id.as_str()) {
                return Err(Error::Config(format!("peer {} listed twice", peer.id)));
            }
            if peer.minger_url.starts_with("https://") {
                if self.ca_pem.is_none() {
                    return Err(Error::Config(format!(
                        "peer {} uses https but no cluster CA is configured",
                        peer.id
                    )));
                }
            } else if !peer.minger_url.starts_with("http://") {
                return Err(Error::Config(format!(
                    "peer {}: minger URL {:?} must start with https:// or http://",
                    peer.id, peer.minger_url
                )));
            }
        }
        Ok(())
    }
}

/// The secret travels as gRPC metadata: it must be printable ASCII without spaces.
pub(crate) fn check_secret(secret: &str) -> Result<()> {
    if secret.chars().count() < MIN_SECRET_LEN {
        return Err(Error::SecretTooShort);
    }
    if !secret.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Error::Config(
            "the cluster secret must be printable ASCII without spaces".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ClusterConfig {
        ClusterConfig::new("a", Endpoints::default(), "0123456789abcdef")
    }

    #[test]
    fn defaults() {
        let c = config();
        assert_eq!(c.positive_ttl, Duration::from_secs(432_000));
        assert_eq!(c.negative_ttl, Duration::from_secs(60));
        assert_eq!(c.fanouts_per_connection, 20);
        assert_eq!(c.lookup_timeout, Duration::from_secs(2));
        c.validate().unwrap();
        assert!(!format!("{c:?}").contains("0123456789abcdef"));
    }

    #[test]
    fn short_or_odd_secret_is_refused() {
        let mut c = config();
        c.secret = "short".into();
        assert!(matches!(c.validate(), Err(Error::SecretTooShort)));
        c.secret = "0123456789 abcdef".into();
        assert!(matches!(c.validate(), Err(Error::Config(_))));
    }

    #[test]
    fn peers_are_checked() {
        let mut c = config();
        c.peers.push(PeerConfig {
            id: "b".into(),
            minger_url: "https://b:4069".into(),
            smtp: None,
        });
        assert!(
            matches!(c.validate(), Err(Error::Config(_))),
            "https needs a CA"
        );
        c.ca_pem = Some(b"pem".to_vec());
        c.validate().unwrap();
        c.peers.push(c.peers[0].clone());
        assert!(matches!(c.validate(), Err(Error::Config(_))), "duplicate");
        c.peers.pop();
        c.peers[0].minger_url = "ftp://b".into();
        assert!(matches!(c.validate(), Err(Error::Config(_))));
        c.peers[0].minger_url = "http://b:1".into();
        c.peers[0].id = "a".into();
        assert!(matches!(c.validate(), Err(Error::Config(_))), "own id");
    }
}
