//! From a login name or an address to an outcome (DESIGN.md §3), recording every step so
//! that `dshare lookup` can show how a name resolved.

use std::fmt;
use std::net::IpAddr;

use crate::name::{Address, LoginName};
use crate::{Directory, MAX_ROUTE_STEPS, Result, RouteTarget};

/// What the client's connection says about the domain a bare name belongs to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResolveContext {
    /// The local address the client connected to.
    pub local_ip: Option<IpAddr>,
    /// The TLS SNI host name, if the client sent one.
    pub sni: Option<String>,
}

/// One step of a resolution, for display.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// Which rule applied.
    pub rule: &'static str,
    /// The address (or text) it produced.
    pub result: String,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:<12} {}", self.rule, self.result)
    }
}

/// Where a name ends up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// An account stored on this node.
    Account { address: String, enabled: bool },
    /// A mailing list kept on this node.
    List(String),
    /// An address in a domain this node does not serve.
    Remote(String),
    /// An address in a served domain that nothing here claims (a shared domain's peers may
    /// have it).
    Unknown(String),
    /// A Router error: a loop or an explicit `error` record.
    Error(String),
}

impl Outcome {
    /// The address the outcome is about, if any.
    pub fn address(&self) -> Option<&str> {
        match self {
            Outcome::Account { address, .. }
            | Outcome::List(address)
            | Outcome::Remote(address)
            | Outcome::Unknown(address) => Some(address),
            Outcome::Error(_) => None,
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Account { address, enabled } => write!(
                f,
                "account {address}{}",
                if *enabled { "" } else { " (disabled)" }
            ),
            Outcome::List(a) => write!(f, "mailing list {a}"),
            Outcome::Remote(a) => write!(f, "remote address {a}"),
            Outcome::Unknown(a) => write!(f, "unknown {a}"),
            Outcome::Error(e) => write!(f, "error: {e}"),
        }
    }
}

/// A resolution: the steps taken and the outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolution {
    pub steps: Vec<Step>,
    pub outcome: Outcome,
}

fn unmap(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

impl Directory {
    /// Resolves a login name typed by a client (POP3 USER, IMAP LOGIN, SASL PLAIN).
    pub fn resolve_login(&self, name: &str, ctx: &ResolveContext) -> Result<Resolution> {
        let mut steps = vec![];
        let addr = match LoginName::parse(name)? {
            LoginName::Full(addr) => {
                steps.push(Step {
                    rule: "full name",
                    result: addr.to_string(),
                });
                addr
            }
            LoginName::Bare(local) => {
                let domains = self.domains();
                let sni = ctx.sni.as_deref().and_then(|s| domains.for_sni(s));
                let by_ip = ctx.local_ip.map(unmap).and_then(|ip| domains.for_ip(ip));
                let (rule, domain) = match (sni, by_ip) {
                    (Some(d), _) => ("TLS SNI", d),
                    (None, Some(d)) => ("local IP", d),
                    (None, None) => ("main domain", domains.main()),
                };
                let addr = Address::new(&local, domain)?;
                steps.push(Step {
                    rule,
                    result: addr.to_string(),
                });
                addr
            }
        };
        self.route(addr, steps)
    }

    /// Resolves a full address (an SMTP recipient or sender).
    pub fn resolve_address(&self, address: &str) -> Result<Resolution> {
        let addr = Address::parse(address)?;
        self.route(
            addr.clone(),
            vec![Step {
                rule: "address",
                result: addr.to_string(),
            }],
        )
    }

    /// Applies Router records and aliases until an account, a list, a remote address or an
    /// error is reached.
    fn route(&self, mut addr: Address, mut steps: Vec<Step>) -> Result<Resolution> {
        for _ in 0..MAX_ROUTE_STEPS {
            if let Some(route) = self.route_for(&addr)? {
                match route.target {
                    RouteTarget::Error(text) => {
                        steps.push(Step {
                            rule: "router",
                            result: format!("error: {text}"),
                        });
                        return Ok(Resolution {
                            steps,
                            outcome: Outcome::Error(text),
                        });
                    }
                    RouteTarget::Address(target) => {
                        let target = match target.split_once('@') {
                            Some(("*", domain)) => format!("{}@{domain}", addr.local()),
                            _ => target,
                        };
                        addr = Address::parse(&target)?;
                        steps.push(Step {
                            rule: "router",
                            result: addr.to_string(),
                        });
                        continue;
                    }
                }
            }
            let full = addr.to_string();
            if !self.domains().is_served(addr.domain()) {
                return Ok(Resolution {
                    steps,
                    outcome: Outcome::Remote(full),
                });
            }
            if let Some(account) = self.account(&full)? {
                return Ok(Resolution {
                    steps,
                    outcome: Outcome::Account {
                        address: full,
                        enabled: account.enabled,
                    },
                });
            }
            if let Some(target) = self.alias_target(&full)? {
                addr = Address::parse(&target)?;
                steps.push(Step {
                    rule: "alias",
                    result: addr.to_string(),
                });
                continue;
            }
            if self.has_list(&full)? {
                return Ok(Resolution {
                    steps,
                    outcome: Outcome::List(full),
                });
            }
            // The implicit last-resort record: postmaster@ and abuse@ of a served domain.
            if let Some(target) = self.postmaster()
                && matches!(addr.local(), "postmaster" | "abuse")
                && !target.eq_ignore_ascii_case(&full)
            {
                addr = Address::parse(target)?;
                steps.push(Step {
                    rule: "postmaster",
                    result: addr.to_string(),
                });
                continue;
            }
            return Ok(Resolution {
                steps,
                outcome: Outcome::Unknown(full),
            });
        }
        Ok(Resolution {
            steps,
            outcome: Outcome::Error(format!("routing loop: more than {MAX_ROUTE_STEPS} steps")),
        })
    }
}
