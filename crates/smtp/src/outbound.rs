//! Outbound delivery (DESIGN.md §6): recipients outside every served domain — from
//! authenticated submissions and DSNs only, MX intake never queues them — are delivered to the
//! MX hosts of their domain. [`Mx`] finds the hosts (MX records in preference order, each
//! host's A/AAAA addresses; no MX: the domain's own A/AAAA, RFC 5321 §5.1; a null MX or no
//! such domain: permanent); the queue runner tries them in order over SMTP sessions (no peer
//! AUTH) and keeps the message queued with back-off while every host defers. [`Outbound`] is
//! what the queue runner uses: the route (the MX hosts, or the relay host for everything),
//! the transport ([`transport`]: opportunistic STARTTLS, the relay host's verified TLS and
//! AUTH), the per-destination session cap ([`destinations`]) and the per-outcome metrics.
//!
//! A destination none of whose hosts could be reached (connection, greeting or TLS failed on
//! every one) is left alone for a while (`smtp.retry_base`): its other queued messages are
//! deferred without a connection, as Postfix marks a dead destination, instead of each of them
//! waiting out the timeouts of the same unreachable hosts.
//!
//! Not yet: DANE/MTA-STS (verified TLS to MX hosts), connection reuse across queued messages.

mod destinations;
mod transport;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;

use destinations::Destinations;
pub(crate) use destinations::Spread;
use transport::RelayAuth;
pub use transport::TlsLevel;
pub(crate) use transport::Transport;

use crate::SmtpConfig;
use crate::relay::{Outgoing, RcptOutcome, RelaySessions};

/// Most MX hosts (and addresses) tried per destination and attempt.
const MAX_HOSTS: usize = 10;
/// Bound on one DNS query (the resolver tries each server this long).
const DNS_TIMEOUT: Duration = Duration::from_secs(5);

/// Settings of outbound delivery.
#[derive(Clone)]
pub struct OutboundConfig {
    /// DNS servers to ask (UDP and TCP); empty = the system's (`/etc/resolv.conf`).
    pub dns: Vec<SocketAddr>,
    /// The SMTP port of MX hosts (25; tests point it at a sink on loopback).
    pub port: u16,
    /// TLS towards MX hosts (and a relay host without credentials).
    pub tls: TlsLevel,
    /// `host:port` every outbound message goes to instead of the MX hosts.
    pub relayhost: Option<String>,
    /// The relay host's `AUTH PLAIN` credential (user, password); only sent over TLS verified
    /// against `relayhost_ca` or the system's roots. Never logged.
    pub relayhost_auth: Option<(String, String)>,
    /// Trust anchors (PEM) for the relay host; `None`: the system's roots.
    pub relayhost_ca: Option<Vec<u8>>,
    /// Most sessions to one destination at a time (Postfix's default is 20).
    pub max_per_destination: usize,
}

impl Default for OutboundConfig {
    fn default() -> Self {
        Self {
            dns: Vec::new(),
            port: 25,
            tls: TlsLevel::May,
            relayhost: None,
            relayhost_auth: None,
            relayhost_ca: None,
            max_per_destination: 20,
        }
    }
}

impl std::fmt::Debug for OutboundConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboundConfig")
            .field("dns", &self.dns)
            .field("port", &self.port)
            .field("tls", &self.tls)
            .field("relayhost", &self.relayhost)
            .field(
                "relayhost_user",
                &self.relayhost_auth.as_ref().map(|(u, _)| u.as_str()),
            )
            .field("relayhost_ca", &self.relayhost_ca.is_some())
            .field("max_per_destination", &self.max_per_destination)
            .finish()
    }
}

/// What one outbound attempt of a message to one domain came to.
pub(crate) struct Delivery {
    /// One outcome per recipient, in order.
    pub outcomes: Vec<RcptOutcome>,
    /// The host that took the message advertised `DSN` (it was handed the DSN requests and
    /// reports success itself).
    pub passes_dsn: bool,
}

impl Delivery {
    fn undelivered(outcomes: Vec<RcptOutcome>) -> Self {
        Self {
            outcomes,
            passes_dsn: false,
        }
    }
}

/// A queued message to deliver outbound.
#[derive(Debug)]
pub(crate) struct Message<'a> {
    /// Its queue id (for the log).
    pub id: u64,
    pub sender: &'a str,
    pub body: &'a Outgoing,
}

/// Outbound delivery of a node: routes, transport, session caps.
#[derive(Debug)]
pub(crate) struct Outbound {
    /// Session settings (the cluster secret cleared: never the relay key towards the Internet).
    session: SmtpConfig,
    mx: Mx,
    transport: Transport,
    destinations: Destinations,
    /// Destinations found unreachable: until when they are left alone, and why.
    unreachable: std::sync::Mutex<std::collections::HashMap<String, (Instant, String)>>,
}

/// Most destinations remembered as unreachable (expired ones are dropped first).
const MAX_UNREACHABLE: usize = 10_000;

impl Outbound {
    /// Outbound delivery as `config.outbound` says; `None` when it is off or there is no DNS
    /// resolver (logged).
    pub(crate) fn new(config: &SmtpConfig) -> Option<Outbound> {
        let o = config.outbound.as_ref()?;
        let mx = match Mx::new(o) {
            Ok(mx) => mx,
            Err(e) => {
                tracing::error!(error = %e, "outbound delivery off: no DNS resolver");
                return None;
            }
        };
        let mut session = config.clone();
        session.cluster_secret.clear();
        let unverified = ds_net::tls::client_config_unverified()
            .inspect_err(|e| tracing::error!(error = %e, "outbound: no TLS client configuration"))
            .ok();
        let relay_auth = o.relayhost_auth.as_ref().map(|(user, password)| RelayAuth {
            user: user.clone(),
            password: password.clone(),
            tls: relayhost_tls(o.relayhost_ca.as_deref()),
        });
        Some(Outbound {
            session,
            mx,
            transport: Transport {
                level: o.tls,
                unverified,
                relayhost: o.relayhost.clone(),
                relay_auth,
            },
            destinations: Destinations::new(o.max_per_destination),
            unreachable: std::sync::Mutex::default(),
        })
    }

    /// Where mail for `domain` goes, for the session cap: the relay host or the domain.
    pub(crate) fn destination(&self, domain: &str) -> String {
        match &self.transport.relayhost {
            Some(relayhost) => relayhost.clone(),
            None => domain.to_ascii_lowercase(),
        }
    }

    /// The most sessions to one destination.
    pub(crate) fn max_per_destination(&self) -> usize {
        self.destinations.cap()
    }

    /// One delivery attempt of `message` to its recipients `addresses` in `domain`: every
    /// recipient gets an outcome. The hosts are tried in order while all of them defer.
    /// Delivers `message` to the `addresses` of `domain`: through its MX hosts in order (or
    /// the relay host) while every recipient is deferred.
    pub(crate) async fn deliver(
        &self,
        message: &Message<'_>,
        domain: &str,
        addresses: &[String],
    ) -> Delivery {
        let started = Instant::now();
        let delivery = self.attempt(message, domain, addresses).await;
        metrics::histogram!("dshare_outbound_seconds").record(started.elapsed().as_secs_f64());
        for outcome in &delivery.outcomes {
            let result = match outcome {
                RcptOutcome::Delivered => "delivered",
                RcptOutcome::Retry(_) => "deferred",
                RcptOutcome::Failed(_) | RcptOutcome::NoSuchUser(_) => "bounced",
            };
            metrics::counter!("dshare_outbound_deliveries_total", "result" => result).increment(1);
        }
        delivery
    }

    async fn attempt(&self, message: &Message<'_>, domain: &str, addresses: &[String]) -> Delivery {
        let id = message.id;
        let n = addresses.len();
        let hosts = match self.hosts(domain).await {
            Ok(hosts) => hosts,
            Err(outcome) => {
                tracing::info!(id, %domain, why = outcome.reason(), "outbound: no route");
                return Delivery::undelivered(vec![outcome; n]);
            }
        };
        let destination = self.destination(domain);
        if let Some(why) = self.backing_off(&destination) {
            tracing::debug!(id, %destination, %why, "outbound: destination left alone for now");
            return Delivery::undelivered(vec![RcptOutcome::Retry(why); n]);
        }
        let _slot = match self
            .destinations
            .acquire(&destination, self.session.relay_timeout)
            .await
        {
            Ok(slot) => slot,
            Err(why) => return Delivery::undelivered(vec![RcptOutcome::Retry(why); n]),
        };
        let mut sessions = RelaySessions::outbound(&self.session, &self.transport);
        let mut outcomes = Vec::new();
        let mut last_host = None;
        for host in &hosts {
            last_host = Some(host);
            outcomes = sessions
                .relay(host, message.sender, addresses, message.body)
                .await;
            if !outcomes.iter().all(|o| matches!(o, RcptOutcome::Retry(_))) {
                break;
            }
            tracing::info!(id, %domain, %host, "outbound: host deferred, trying the next");
        }
        let passes_dsn = last_host.is_some_and(|host| sessions.passes_dsn(host));
        if !hosts.is_empty() && hosts.iter().all(|host| sessions.unreachable(host)) {
            let why = outcomes.first().map_or("", RcptOutcome::reason);
            self.leave_alone(&destination, why);
        }
        sessions.close_all().await;
        Delivery {
            outcomes,
            passes_dsn,
        }
    }

    fn unreachable_map(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, (Instant, String)>> {
        self.unreachable
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Why `destination` is left alone now, if it is (its hosts were unreachable lately).
    fn backing_off(&self, destination: &str) -> Option<String> {
        let mut map = self.unreachable_map();
        let (until, why) = map.get(destination)?;
        if Instant::now() >= *until {
            map.remove(destination);
            return None;
        }
        Some(format!(
            "{destination} was unreachable moments ago ({why}); not tried again yet"
        ))
    }

    /// Leaves `destination` alone for `smtp.retry_base`: none of its hosts could be reached.
    fn leave_alone(&self, destination: &str, why: &str) {
        let now = Instant::now();
        let mut map = self.unreachable_map();
        if map.len() >= MAX_UNREACHABLE {
            map.retain(|_, (until, _)| *until > now);
        }
        if map.len() < MAX_UNREACHABLE {
            tracing::info!(%destination, %why, "outbound: destination unreachable, its mail waits");
            map.insert(
                destination.to_string(),
                (now + self.session.retry_base, why.to_string()),
            );
        }
    }

    /// The hosts (`host:port`) to try for `domain`, best first; `Err`: the outcome of every
    /// recipient (no such domain: failed; no answer: deferred).
    async fn hosts(&self, domain: &str) -> Result<Vec<String>, RcptOutcome> {
        if let Some(relayhost) = &self.transport.relayhost {
            return Ok(vec![relayhost.clone()]);
        }
        match self.mx.route(domain).await {
            Route::Hosts(hosts) => Ok(hosts.iter().map(ToString::to_string).collect()),
            Route::Permanent(why) => Err(RcptOutcome::Failed(format!("550 5.4.4 {why}"))),
            Route::Temporary(why) => Err(RcptOutcome::Retry(why)),
        }
    }
}

/// The TLS configuration the relay host is verified with: `ca` (PEM), else the system's roots.
fn relayhost_tls(ca: Option<&[u8]>) -> Result<Arc<rustls::ClientConfig>, String> {
    let tls = match ca {
        Some(pem) => ds_net::tls::client_config_with_ca(pem)
            .map_err(|e| format!("outbound.relayhost_ca: {e}")),
        None => ds_net::tls::client_config_system_roots()
            .map_err(|e| format!("the system's root certificates: {e}")),
    };
    if let Err(e) = &tls {
        tracing::error!(error = %e, "outbound: the relay host cannot be verified; its credential will not be sent");
    }
    tls
}

/// Where mail for a domain goes now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Route {
    /// Addresses to try, in order.
    Hosts(Vec<SocketAddr>),
    /// The domain takes no mail (no such domain, null MX, no address at all).
    Permanent(String),
    /// No answer now.
    Temporary(String),
}

/// MX lookups for outbound delivery.
pub(crate) struct Mx {
    resolver: TokioResolver,
    port: u16,
}

impl std::fmt::Debug for Mx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mx").field("port", &self.port).finish()
    }
}

impl Mx {
    pub fn new(config: &OutboundConfig) -> Result<Mx, String> {
        let provider = TokioRuntimeProvider::default();
        let mut builder = if config.dns.is_empty() {
            TokioResolver::builder(provider)
                .map_err(|e| format!("system DNS configuration: {e}"))?
        } else {
            let servers = config
                .dns
                .iter()
                .map(|a| {
                    let mut udp = ConnectionConfig::udp();
                    udp.port = a.port();
                    let mut tcp = ConnectionConfig::tcp();
                    tcp.port = a.port();
                    NameServerConfig::new(a.ip(), true, vec![udp, tcp])
                })
                .collect();
            TokioResolver::builder_with_config(ResolverConfig::from_name_servers(servers), provider)
        };
        let options = builder.options_mut();
        options.timeout = DNS_TIMEOUT;
        options.attempts = 2;
        // Names are always absolute here: never try search domains.
        options.ndots = 0;
        let resolver = builder.build().map_err(|e| format!("DNS resolver: {e}"))?;
        Ok(Mx {
            resolver,
            port: config.port,
        })
    }

    /// The hosts for `domain`, best first.
    pub async fn route(&self, domain: &str) -> Route {
        let fqdn = format!("{}.", domain.trim_end_matches('.'));
        let mut exchanges: Vec<(u16, String)> = match self.resolver.mx_lookup(fqdn.as_str()).await {
            Ok(lookup) => lookup
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    RData::MX(mx) => Some((mx.preference, mx.exchange.to_ascii())),
                    _ => None,
                })
                .collect(),
            Err(e) if e.is_nx_domain() => {
                return Route::Permanent(format!("no such domain {domain}"));
            }
            Err(e) if e.is_no_records_found() => Vec::new(),
            Err(e) => return Route::Temporary(format!("MX lookup of {domain}: {e}")),
        };
        if exchanges.is_empty() {
            // RFC 5321 §5.1: the domain itself is the host.
            return match self.addresses(&fqdn).await {
                Ok(hosts) if hosts.is_empty() => {
                    Route::Permanent(format!("{domain} has no MX and no address"))
                }
                Ok(hosts) => Route::Hosts(hosts),
                Err(e) => Route::Temporary(e),
            };
        }
        exchanges.sort_by_key(|(preference, _)| *preference);
        // RFC 7505: a null MX says the domain takes no mail.
        if exchanges
            .iter()
            .any(|(_, host)| host == "." || host.is_empty())
        {
            return Route::Permanent(format!("{domain} takes no mail (null MX)"));
        }
        let mut hosts = Vec::new();
        let mut last_error = None;
        for (_, exchange) in exchanges.iter().take(MAX_HOSTS) {
            match self.addresses(exchange).await {
                Ok(found) => hosts.extend(found),
                Err(e) => last_error = Some(e),
            }
            if hosts.len() >= MAX_HOSTS {
                break;
            }
        }
        hosts.dedup();
        hosts.truncate(MAX_HOSTS);
        match (hosts.is_empty(), last_error) {
            (false, _) => Route::Hosts(hosts),
            (true, Some(e)) => Route::Temporary(e),
            (true, None) => Route::Permanent(format!("the MX hosts of {domain} have no address")),
        }
    }

    /// A host's A/AAAA addresses with the SMTP port; none when it has none.
    async fn addresses(&self, host: &str) -> Result<Vec<SocketAddr>, String> {
        match self.resolver.lookup_ip(host).await {
            Ok(ips) => Ok(ips
                .iter()
                .map(|ip| SocketAddr::new(ip, self.port))
                .collect()),
            Err(e) if e.is_nx_domain() || e.is_no_records_found() => Ok(Vec::new()),
            Err(e) => Err(format!("address lookup of {host}: {e}")),
        }
    }
}
