//! Outbound delivery (DESIGN.md §6): recipients outside every served domain — from
//! authenticated submissions and DSNs only, MX intake never queues them — are delivered to the
//! MX hosts of their domain. [`Mx`] finds the hosts (MX records in preference order, each
//! host's A/AAAA addresses; no MX: the domain's own A/AAAA, RFC 5321 §5.1; a null MX or no
//! such domain: permanent); the queue runner tries them in order over plain SMTP sessions
//! (no peer AUTH) and keeps the message queued with back-off while every host defers.
//!
//! Not yet: opportunistic STARTTLS, a `relayhost`, per-destination concurrency caps.

use std::net::SocketAddr;
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;

/// Most MX hosts (and addresses) tried per destination and attempt.
const MAX_HOSTS: usize = 10;
/// Bound on one DNS query (the resolver tries each server this long).
const DNS_TIMEOUT: Duration = Duration::from_secs(5);

/// Settings of outbound delivery.
#[derive(Debug, Clone)]
pub struct OutboundConfig {
    /// DNS servers to ask (UDP and TCP); empty = the system's (`/etc/resolv.conf`).
    pub dns: Vec<SocketAddr>,
    /// The SMTP port of MX hosts (25; tests point it at a sink on loopback).
    pub port: u16,
}

impl Default for OutboundConfig {
    fn default() -> Self {
        Self {
            dns: Vec::new(),
            port: 25,
        }
    }
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
