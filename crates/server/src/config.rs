//! The node's TOML configuration (DESIGN.md §8). Every section has defaults, so an empty
//! file, or no file at all, is a working single node on loopback.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

pub use ds_directory::Domain;

use crate::{Error, Result};

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub node: NodeSection,
    #[serde(rename = "domain")]
    pub domains: Vec<Domain>,
    pub listen: ListenSection,
    pub tls: TlsSection,
    pub cluster: ClusterSection,
    pub limits: LimitsSection,
    pub smtp: SmtpSection,
    pub submission: SubmissionSection,
    pub outbound: OutboundSection,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeSection {
    /// Unique in the cluster.
    pub id: String,
    /// Where the database, certificates, the admin token and the cluster secret live.
    pub data_dir: PathBuf,
    /// The domain a bare name takes when neither SNI nor the local address names one.
    pub main_domain: String,
    /// Host name peers use to reach this node's SMTP/POP3/IMAP.
    pub advertise: String,
    /// Where mail to postmaster@ and abuse@ of every served domain goes, unless an account,
    /// alias or Router record of that name exists (RFC 5321 §4.5.1, RFC 2142). Unset:
    /// `postmaster@MAIN_DOMAIN` (on the embedded defaults a local account made on first start).
    pub postmaster: Option<String>,
}

impl Default for NodeSection {
    fn default() -> Self {
        Self {
            id: "node-1".into(),
            data_dir: PathBuf::from("dshare-data"),
            main_domain: "example.com".into(),
            advertise: "127.0.0.1".into(),
            postmaster: None,
        }
    }
}

/// Each service listens on a list of `host:port`; an empty list disables it.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ListenSection {
    pub smtp: Vec<SocketAddr>,
    pub pop3: Vec<SocketAddr>,
    pub pop3s: Vec<SocketAddr>,
    pub imap: Vec<SocketAddr>,
    pub imaps: Vec<SocketAddr>,
    /// Message submission with STARTTLS (RFC 6409, port 587).
    pub submission: Vec<SocketAddr>,
    /// Message submission over implicit TLS (RFC 8314, port 465).
    pub submissions: Vec<SocketAddr>,
    pub minger: Vec<SocketAddr>,
    pub admin: Vec<SocketAddr>,
    pub metrics: Vec<SocketAddr>,
}

fn lo(port: u16) -> Vec<SocketAddr> {
    vec![SocketAddr::from(([127, 0, 0, 1], port))]
}

impl Default for ListenSection {
    fn default() -> Self {
        Self {
            smtp: lo(2525),
            pop3: lo(1110),
            pop3s: vec![],
            imap: lo(1143),
            imaps: vec![],
            submission: lo(1587),
            submissions: lo(1465),
            minger: lo(4069),
            admin: lo(4070),
            metrics: lo(9100),
        }
    }
}

/// Absent: a self-signed certificate made in `data_dir` on first start.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsSection {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Trust anchor for node-to-node connections.
    pub cluster_ca: Option<PathBuf>,
    /// Refuse passwords before TLS (POP3 USER/PASS/AUTH before STLS, IMAP `LOGINDISABLED`,
    /// SMTP AUTH before STARTTLS) on every listener whose address is not in
    /// `require_tls_exempt`. Default on.
    pub require_tls: bool,
    /// Listener networks where plaintext passwords are still accepted (`addr/len`). Default
    /// loopback: `["127.0.0.0/8", "::1/128"]`.
    pub require_tls_exempt: Vec<String>,
}

impl Default for TlsSection {
    fn default() -> Self {
        let policy = ds_net::TlsPolicy::default();
        Self {
            cert: None,
            key: None,
            cluster_ca: None,
            require_tls: policy.require_tls,
            require_tls_exempt: policy.exempt.iter().map(|n| n.to_string()).collect(),
        }
    }
}

impl TlsSection {
    /// The `require_tls` policy every login protocol applies.
    pub fn policy(&self) -> Result<ds_net::TlsPolicy> {
        let exempt = self
            .require_tls_exempt
            .iter()
            .map(|n| {
                n.parse()
                    .map_err(|e| Error::Config(format!("tls.require_tls_exempt: {e}")))
            })
            .collect::<Result<_>>()?;
        Ok(ds_net::TlsPolicy {
            require_tls: self.require_tls,
            exempt,
        })
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterSection {
    /// File holding the shared secret (≥ 16 characters). Absent: one is generated in
    /// `data_dir` (fine for a single node; a cluster must share one).
    pub secret_file: Option<PathBuf>,
    #[serde(deserialize_with = "duration")]
    pub positive_ttl: Duration,
    /// How long "no node has it" is cached (0 = off). Safe: a peer that gets `Reserve` for an
    /// address drops its entry before the address is created.
    #[serde(deserialize_with = "duration")]
    pub negative_ttl: Duration,
    /// Uncached peer fan-outs one client connection may cause; then lookups are TempFail.
    pub fanouts_per_connection: u32,
    /// Connections per owner kept ready (TLS up, greeting read) for forwarded POP3 and IMAP
    /// logins, after a forwarded login used one; 0 = none (every login opens its own).
    pub warm_connections: usize,
    #[serde(deserialize_with = "duration")]
    pub lookup_timeout: Duration,
    /// Domains shared with peers; empty = every shared domain.
    pub allowed_domains: Vec<String>,
    #[serde(rename = "peer")]
    pub peers: Vec<PeerSection>,
}

impl Default for ClusterSection {
    fn default() -> Self {
        Self {
            secret_file: None,
            positive_ttl: Duration::from_secs(5 * 24 * 3600),
            negative_ttl: ds_cluster::DEFAULT_NEGATIVE_TTL,
            fanouts_per_connection: ds_cluster::DEFAULT_FANOUTS_PER_CONNECTION,
            warm_connections: 2,
            lookup_timeout: Duration::from_secs(2),
            allowed_domains: vec![],
            peers: vec![],
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerSection {
    pub id: String,
    /// `https://host:port`, always TLS verified against `tls.cluster_ca` (DESIGN.md §5).
    pub minger: String,
    /// The peer's SMTP endpoint, when it differs from what its lookups advertise.
    #[serde(default)]
    pub smtp: Option<String>,
}

/// Limits of DESIGN.md §9.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsSection {
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    pub smtp_line: usize,
    pub message_size: usize,
    pub recipients: usize,
    #[serde(deserialize_with = "duration")]
    pub smtp_idle: Duration,
    #[serde(deserialize_with = "duration")]
    pub pop3_idle: Duration,
    #[serde(deserialize_with = "duration")]
    pub imap_idle: Duration,
    /// Node-wide bytes of message bodies held in memory while being received; past it new
    /// messages get `452 4.3.1`.
    pub bodies_in_flight: u64,
    /// Bound on the database's page cache (bytes).
    pub db_cache: u64,
    /// Free space (bytes) kept on the data disk, like Postfix's `queue_minfree`: below it new
    /// mail gets `452 4.3.1` (SMTP) or `NO [OVERQUOTA]` (IMAP APPEND) while reads go on;
    /// mail flows again by itself once space returns. 0 = no reserve. Default 100 MiB.
    pub min_free_space: u64,
    /// A probe of the store (one small write and read) that has not returned after this long
    /// means the store has stalled: the node logs it and starts again in place, as after a
    /// full disk. Default 2 minutes (a healthy probe takes microseconds).
    #[serde(deserialize_with = "duration")]
    pub store_stall: Duration,
}

impl Default for LimitsSection {
    fn default() -> Self {
        Self {
            max_connections: 1000,
            max_connections_per_ip: 50,
            smtp_line: 1000,
            message_size: 50 * 1024 * 1024,
            recipients: 100,
            smtp_idle: Duration::from_secs(300),
            pop3_idle: Duration::from_secs(600),
            imap_idle: Duration::from_secs(1800),
            bodies_in_flight: ds_smtp::DEFAULT_BODIES_IN_FLIGHT,
            db_cache: ds_store::DEFAULT_CACHE_CAPACITY,
            min_free_space: ds_store::DEFAULT_MIN_FREE_SPACE,
            store_stall: Duration::from_secs(120),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SmtpSection {
    /// Refuse `MAIL FROM` in a shared domain that no node owns.
    pub sender_check: bool,
    /// Oldest a queued message may get before it bounces.
    #[serde(deserialize_with = "duration")]
    pub max_queue_age: Duration,
    /// First retry delay of a queued message; doubled per attempt up to `retry_max`.
    #[serde(deserialize_with = "duration")]
    pub retry_base: Duration,
    #[serde(deserialize_with = "duration")]
    pub retry_max: Duration,
    /// A message queued this long gets one delay DSN (unless its recipients said
    /// `NOTIFY=NEVER` or left out `DELAY`); "0s": none.
    #[serde(deserialize_with = "duration")]
    pub delay_warning: Duration,
}

impl Default for SmtpSection {
    fn default() -> Self {
        Self {
            sender_check: true,
            max_queue_age: Duration::from_secs(5 * 24 * 3600),
            retry_base: Duration::from_secs(60),
            retry_max: Duration::from_secs(3600),
            delay_warning: Duration::from_secs(4 * 3600),
        }
    }
}

/// Message submission (DESIGN.md §6).
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct SubmissionSection {
    /// The `Received` line of a submitted message names the client's IP address.
    pub reveal_client: bool,
    /// Domains whose users may send with any envelope sender and `From:` (else 553 5.7.1
    /// unless it is the account or one of its aliases).
    pub any_sender_domains: Vec<String>,
}

/// Internet delivery for authenticated submissions and DSNs (DESIGN.md §6).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutboundSection {
    /// Deliver to recipients outside every served domain; off: they stay queued until they
    /// expire (and their senders get a DSN).
    pub enabled: bool,
    /// Resolver addresses (`ip:port`) for MX lookups; empty = the system's.
    pub dns: Vec<SocketAddr>,
    /// The SMTP port of MX hosts (25).
    pub port: u16,
    /// TLS towards MX hosts: `"may"` (STARTTLS when offered, unverified, RFC 7435),
    /// `"encrypt"` (STARTTLS required, else deferred) or `"none"`.
    pub tls: String,
    /// `host:port` that every outbound message goes to instead of the MX hosts (a
    /// smarthost).
    pub relayhost: Option<String>,
    /// The relay host's AUTH PLAIN user; needs `relayhost_password_file`. The password is
    /// only sent over TLS verified against `relayhost_ca` or the system's roots.
    pub relayhost_user: Option<String>,
    /// File holding the relay host's password (first line).
    pub relayhost_password_file: Option<PathBuf>,
    /// CA certificate(s) (PEM) the relay host is verified with; absent: the system's roots.
    pub relayhost_ca: Option<PathBuf>,
    /// Most sessions to one destination (a domain, or the relay host) at a time.
    pub max_per_destination: usize,
    /// DKIM signing keys, one per domain: `[{ domain, selector, key_file }]`.
    pub dkim: Vec<DkimSection>,
}

/// One DKIM signing domain (`dshare dkim generate` makes the key and prints its DNS record).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DkimSection {
    pub domain: String,
    pub selector: String,
    pub key_file: PathBuf,
}

impl DkimSection {
    pub fn to_smtp(&self) -> ds_smtp::dkim::DkimConfig {
        ds_smtp::dkim::DkimConfig {
            domain: self.domain.clone(),
            selector: self.selector.clone(),
            key_file: self.key_file.clone(),
        }
    }
}

impl Default for OutboundSection {
    fn default() -> Self {
        Self {
            enabled: true,
            dns: vec![],
            port: 25,
            dkim: vec![],
            tls: "may".into(),
            relayhost: None,
            relayhost_user: None,
            relayhost_password_file: None,
            relayhost_ca: None,
            max_per_destination: 20,
        }
    }
}

impl OutboundSection {
    fn validate(&self) -> Result<()> {
        let bad = |why: String| Err(Error::Config(format!("outbound.{why}")));
        if let Err(e) = self.tls.parse::<ds_smtp::TlsLevel>() {
            return bad(format!("tls: {e}"));
        }
        if self.max_per_destination == 0 {
            return bad("max_per_destination must be at least 1".into());
        }
        if let Some(relayhost) = &self.relayhost
            && relayhost
                .rsplit_once(':')
                .is_none_or(|(host, port)| host.is_empty() || port.parse::<u16>().is_err())
        {
            return bad(format!(
                "relayhost {relayhost:?} must be host:port (e.g. \"smtp.example.net:587\")"
            ));
        }
        match (&self.relayhost_user, &self.relayhost_password_file) {
            (Some(_), None) => {
                return bad("relayhost_user is set but relayhost_password_file is not".into());
            }
            (None, Some(_)) => {
                return bad("relayhost_password_file is set but relayhost_user is not".into());
            }
            _ => {}
        }
        if self.relayhost.is_none()
            && (self.relayhost_user.is_some() || self.relayhost_ca.is_some())
        {
            return bad("relayhost_user and relayhost_ca need relayhost".into());
        }
        Ok(())
    }

    /// The settings for ds-smtp; reads the relay host's password and CA files.
    pub fn to_smtp(&self) -> Result<ds_smtp::OutboundConfig> {
        let read = |path: &Path, what: &str| {
            std::fs::read(path)
                .map_err(|e| Error::Config(format!("outbound.{what} {}: {e}", path.display())))
        };
        let relayhost_auth = match (&self.relayhost_user, &self.relayhost_password_file) {
            (Some(user), Some(file)) => {
                let text = read(file, "relayhost_password_file")?;
                let password = String::from_utf8_lossy(&text)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_string();
                if password.is_empty() {
                    return Err(Error::Config(format!(
                        "outbound.relayhost_password_file {} is empty",
                        file.display()
                    )));
                }
                Some((user.clone(), password))
            }
            _ => None,
        };
        let relayhost_ca = match &self.relayhost_ca {
            Some(path) => Some(read(path, "relayhost_ca")?),
            None => None,
        };
        Ok(ds_smtp::OutboundConfig {
            dns: self.dns.clone(),
            port: self.port,
            tls: self
                .tls
                .parse()
                .map_err(|e| Error::Config(format!("outbound.tls: {e}")))?,
            relayhost: self.relayhost.clone(),
            relayhost_auth,
            relayhost_ca,
            max_per_destination: self.max_per_destination,
        })
    }
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s).map_err(serde::de::Error::custom)
}

impl Config {
    /// Parses a configuration text; unknown keys are an error that names the key.
    pub fn parse(text: &str) -> Result<Self> {
        let config: Config = toml::from_str(text).map_err(|e| Error::Config(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        Self::parse(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
    }

    fn validate(&self) -> Result<()> {
        if self.node.id.is_empty()
            || !self
                .node
                .id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        {
            return Err(Error::Config(format!(
                "node.id {:?} must be non-empty letters, digits, '-', '_' or '.'",
                self.node.id
            )));
        }
        if (self.tls.cert.is_some()) != (self.tls.key.is_some()) {
            return Err(Error::Config("tls.cert and tls.key go together".into()));
        }
        if !self.cluster.peers.is_empty() && self.tls.cluster_ca.is_none() {
            return Err(Error::Config(
                "cluster peers are configured but tls.cluster_ca is not: node-to-node traffic \
                 (Minger, relay, forwarded logins) only runs over TLS verified against the \
                 cluster CA. Add `cluster_ca = \"/path/to/ca.pem\"` under [tls], and a node \
                 certificate signed by it as tls.cert/tls.key (`dshare pki --out DIR NODE...` \
                 makes the files)"
                    .into(),
            ));
        }
        for p in &self.cluster.peers {
            if p.minger.starts_with("http://") {
                return Err(Error::Config(format!(
                    "cluster.peer {}: minger {:?} is plaintext; Minger is TLS only: write \
                     \"https://{}\" (verified against tls.cluster_ca)",
                    p.id,
                    p.minger,
                    &p.minger["http://".len()..]
                )));
            }
            if !p.minger.starts_with("https://") {
                return Err(Error::Config(format!(
                    "cluster.peer {}: minger must be an https://host:port URL",
                    p.id
                )));
            }
            if p.id == self.node.id {
                return Err(Error::Config(format!(
                    "cluster.peer {} has this node's own id",
                    p.id
                )));
            }
        }
        self.tls.policy()?;
        self.outbound.validate()?;
        if self.limits.smtp_line < 512 {
            return Err(Error::Config(
                "limits.smtp_line must be at least 512 (RFC 5321)".into(),
            ));
        }
        if self.limits.store_stall < Duration::from_secs(1) {
            return Err(Error::Config(
                "limits.store_stall must be at least 1s (a healthy store answers its probe in \
                 microseconds; the default is 2m)"
                    .into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"
[node]
id = "office-a"
data_dir = "/var/lib/dshare"
main_domain = "company.com"
advertise = "office-a.example.net"

[[domain]]
name = "company.com"
shared = true
addresses = ["192.0.2.1"]

[[domain]]
name = "client1.com"
addresses = ["192.0.2.2"]

[listen]
smtp = ["0.0.0.0:25"]
pop3 = ["0.0.0.0:110"]
pop3s = ["0.0.0.0:995"]
imap = ["0.0.0.0:143"]
imaps = ["0.0.0.0:993"]
submission = ["0.0.0.0:587"]
submissions = ["0.0.0.0:465"]
minger = ["0.0.0.0:4069"]
admin = ["127.0.0.1:4070"]
metrics = ["127.0.0.1:9100"]

[tls]
cert = "/etc/dshare/cert.pem"
key = "/etc/dshare/key.pem"
cluster_ca = "/etc/dshare/ca.pem"

[cluster]
secret_file = "/etc/dshare/cluster.secret"
positive_ttl = "5d"
negative_ttl = "0s"
lookup_timeout = "2s"
allowed_domains = []

[[cluster.peer]]
id = "office-b"
minger = "https://office-b.example.net:4069"
smtp = "office-b.example.net:25"
"#;

    #[test]
    fn design_sample_parses() {
        let c = Config::parse(SAMPLE).unwrap();
        assert_eq!(c.node.id, "office-a");
        assert_eq!(c.domains.len(), 2);
        assert!(c.domains[0].shared);
        assert_eq!(c.listen.pop3s[0].port(), 995);
        assert_eq!(c.listen.submission[0].port(), 587);
        assert_eq!(c.listen.submissions[0].port(), 465);
        assert_eq!(c.cluster.positive_ttl, Duration::from_secs(432000));
        assert_eq!(
            c.cluster.peers[0].smtp.as_deref(),
            Some("office-b.example.net:25")
        );
    }

    #[test]
    fn store_stall_parses_and_is_at_least_a_second() {
        let base = "[node]\nid = \"a\"\n";
        assert_eq!(
            Config::parse(base).unwrap().limits.store_stall,
            Duration::from_secs(120)
        );
        let c = Config::parse(&format!("{base}[limits]\nstore_stall = \"5m\"\n")).unwrap();
        assert_eq!(c.limits.store_stall, Duration::from_secs(300));
        let e = Config::parse(&format!("{base}[limits]\nstore_stall = \"0s\"\n")).unwrap_err();
        assert!(e.to_string().contains("limits.store_stall"), "{e}");
    }

    #[test]
    fn dkim_keys_and_delay_warning_parse() {
        let c = Config::parse(
            "[smtp]\ndelay_warning = \"30m\"\n[outbound]\ndkim = [{ domain = \"company.com\", \
             selector = \"s1\", key_file = \"/etc/dshare/company.pem\" }]\n",
        )
        .unwrap();
        assert_eq!(c.smtp.delay_warning, Duration::from_secs(1800));
        let d = c.outbound.dkim[0].to_smtp();
        assert_eq!(
            (d.domain.as_str(), d.selector.as_str()),
            ("company.com", "s1")
        );
        assert_eq!(d.key_file, PathBuf::from("/etc/dshare/company.pem"));
        let c = Config::parse("").unwrap();
        assert!(c.outbound.dkim.is_empty());
        assert_eq!(c.smtp.delay_warning, Duration::from_secs(4 * 3600));
        let e = Config::parse("[outbound]\ndkim = [{ domain = \"a.com\", selector = \"s\" }]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("key_file"), "{e}");
    }

    #[test]
    fn empty_file_is_the_embedded_defaults() {
        let c = Config::parse("").unwrap();
        assert_eq!(c.node.main_domain, "example.com");
        assert_eq!(c.listen.smtp[0].port(), 2525);
        assert_eq!(c.listen.submission[0].port(), 1587);
        assert_eq!(c.listen.submissions[0].port(), 1465);
        assert_eq!(c.cluster.lookup_timeout, Duration::from_secs(2));
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = Config::parse("[node]\nidd = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("idd"), "{e}");
        let e = Config::parse("[clusterr]\n").unwrap_err().to_string();
        assert!(e.contains("clusterr"), "{e}");
        let e = Config::parse("[[domain]]\nname = \"a.com\"\nshard = true\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("shard"), "{e}");
    }

    #[test]
    fn malformed_values_are_refused() {
        assert!(Config::parse("[cluster]\npositive_ttl = \"five days\"\n").is_err());
        assert!(Config::parse("[listen]\nsmtp = [\"nowhere\"]\n").is_err());
        assert!(Config::parse("[node\n").is_err());
        assert!(Config::parse("[node]\nid = \"a b\"\n").is_err());
        assert!(Config::parse("[[cluster.peer]]\nid = \"b\"\nminger = \"b:4069\"\n").is_err());
    }

    #[test]
    fn peers_need_the_cluster_ca_and_https() {
        let peer = "[[cluster.peer]]\nid = \"b\"\nminger = \"https://b:4069\"\n";
        let e = Config::parse(peer).unwrap_err().to_string();
        assert!(e.contains("cluster_ca") && e.contains("dshare pki"), "{e}");
        let ca = "[tls]\ncluster_ca = \"/etc/dshare/ca.pem\"\n";
        Config::parse(&format!("{ca}{peer}")).unwrap();
        let plain = "[[cluster.peer]]\nid = \"b\"\nminger = \"http://b:4069\"\n";
        let e = Config::parse(&format!("{ca}{plain}"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("TLS only") && e.contains("https://b:4069"),
            "{e}"
        );
        // A single node needs no CA.
        Config::parse("[node]\nid = \"solo\"\n").unwrap();
    }

    #[test]
    fn require_tls_is_on_with_loopback_exempt() {
        let c = Config::parse("").unwrap();
        let p = c.tls.policy().unwrap();
        assert!(p.require_tls);
        assert!(p.plaintext_allowed("127.0.0.1".parse().unwrap()));
        assert!(!p.plaintext_allowed("192.0.2.1".parse().unwrap()));
        let c = Config::parse("[tls]\nrequire_tls_exempt = []\n").unwrap();
        assert!(
            !c.tls
                .policy()
                .unwrap()
                .plaintext_allowed("127.0.0.1".parse().unwrap())
        );
        let c = Config::parse("[tls]\nrequire_tls = false\n").unwrap();
        assert!(
            c.tls
                .policy()
                .unwrap()
                .plaintext_allowed("192.0.2.1".parse().unwrap())
        );
        let e = Config::parse("[tls]\nrequire_tls_exempt = [\"10.0.0.0/40\"]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("require_tls_exempt"), "{e}");
    }
}

#[cfg(test)]
mod outbound_tests {
    use super::*;

    #[test]
    fn relayhost_settings_are_checked() {
        let c = Config::parse("").unwrap();
        assert_eq!(c.outbound.tls, "may");
        assert_eq!(c.outbound.max_per_destination, 20);
        let e = Config::parse(
            "[outbound]\nrelayhost = \"smtp.example.net:587\"\nrelayhost_user = \"me\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("relayhost_password_file"), "{e}");
        let e = Config::parse("[outbound]\nrelayhost = \"smtp.example.net\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("host:port"), "{e}");
        let e = Config::parse("[outbound]\ntls = \"dane\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("outbound.tls"), "{e}");
        assert!(Config::parse("[outbound]\nmax_per_destination = 0\n").is_err());
        assert!(Config::parse("[outbound]\nrelayhost_user = \"me\"\n").is_err());

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "s3cret\n").unwrap();
        let c = Config::parse(&format!(
            "[outbound]\nrelayhost = \"smtp.example.net:587\"\nrelayhost_user = \"me\"\n\
             relayhost_password_file = \"{}\"\ntls = \"encrypt\"\n",
            file.display()
        ))
        .unwrap();
        let o = c.outbound.to_smtp().unwrap();
        assert_eq!(o.relayhost_auth, Some(("me".into(), "s3cret".into())));
        assert_eq!(o.tls, ds_smtp::TlsLevel::Encrypt);
        assert!(!format!("{o:?}").contains("s3cret"));
    }
}

#[cfg(test)]
mod deploy_tests {
    use super::*;

    /// The docker-compose configurations in `deploy/` must stay valid.
    #[test]
    fn deploy_configs_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let c = Config::load(&path).unwrap();
                assert_eq!(c.cluster.peers.len(), 2, "{}", path.display());
                assert!(c.domains.iter().any(|d| d.shared));
                n += 1;
            }
        }
        assert_eq!(n, 3);
    }
}
