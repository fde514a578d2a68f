//! `require_tls` (DESIGN.md §7, issue 13 point 7): no password is accepted before TLS, except
//! on listeners whose local address is in an exempt network (by default loopback). One policy
//! for every login protocol (POP3 USER/PASS and AUTH, IMAP LOGIN/AUTHENTICATE, SMTP AUTH).

use std::net::IpAddr;
use std::str::FromStr;

use crate::ConnContext;

/// An IP network, `addr/len` (a bare address is a single host).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNetwork {
    addr: IpAddr,
    len: u8,
}

impl IpNetwork {
    /// `127.0.0.0/8`.
    pub const LOOPBACK_V4: IpNetwork = IpNetwork {
        addr: IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 0)),
        len: 8,
    };
    /// `::1/128`.
    pub const LOOPBACK_V6: IpNetwork = IpNetwork {
        addr: IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
        len: 128,
    };

    /// Whether `ip` is inside this network (an IPv4-mapped IPv6 address counts as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.len))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for IpNetwork {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not an IP network (addr/len)"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len {
            None => max,
            Some(l) => l
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|l| *l <= max)
                .ok_or_else(|| format!("{s:?}: prefix length must be 0..={max}"))?,
        };
        Ok(IpNetwork { addr, len })
    }
}

impl std::fmt::Display for IpNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// Whether passwords need TLS on a connection. `Default`: required, loopback exempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsPolicy {
    /// Refuse passwords before TLS. Default on.
    pub require_tls: bool,
    /// Local (listener) addresses where plaintext passwords are still accepted. Default
    /// `127.0.0.0/8` and `::1`; a test sets it empty to see the rule on loopback.
    pub exempt: Vec<IpNetwork>,
}

impl Default for TlsPolicy {
    fn default() -> Self {
        Self {
            require_tls: true,
            exempt: vec![IpNetwork::LOOPBACK_V4, IpNetwork::LOOPBACK_V6],
        }
    }
}

impl TlsPolicy {
    /// Passwords accepted anywhere, with or without TLS (tests, development).
    pub fn off() -> Self {
        Self {
            require_tls: false,
            exempt: Vec::new(),
        }
    }

    /// Whether a password may be accepted on this connection now.
    pub fn password_allowed(&self, ctx: &ConnContext) -> bool {
        ctx.tls || self.plaintext_allowed(ctx.local.ip())
    }

    /// Whether a password may be accepted without TLS on a listener at `local`.
    pub fn plaintext_allowed(&self, local: IpAddr) -> bool {
        !self.require_tls || self.exempt.iter().any(|n| n.contains(local))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn networks_parse_and_match() {
        let n: IpNetwork = "10.1.0.0/16".parse().unwrap();
        assert!(n.contains(ip("10.1.2.3")));
        assert!(!n.contains(ip("10.2.0.1")));
        assert!(n.contains(ip("::ffff:10.1.9.9")));
        let all: IpNetwork = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("192.0.2.1")));
        assert!(!all.contains(ip("::2")));
        let host: IpNetwork = "fd00::2".parse().unwrap();
        assert!(host.contains(ip("fd00::2")) && !host.contains(ip("fd00::3")));
        assert!("10.0.0.0/33".parse::<IpNetwork>().is_err());
        assert!("nowhere/8".parse::<IpNetwork>().is_err());
        assert_eq!(IpNetwork::LOOPBACK_V4.to_string(), "127.0.0.0/8");
    }

    #[test]
    fn default_exempts_loopback_only() {
        let p = TlsPolicy::default();
        assert!(p.plaintext_allowed(ip("127.0.0.2")));
        assert!(p.plaintext_allowed(ip("::1")));
        assert!(!p.plaintext_allowed(ip("192.0.2.1")));
        let strict = TlsPolicy {
            exempt: vec![],
            ..TlsPolicy::default()
        };
        assert!(!strict.plaintext_allowed(ip("127.0.0.1")));
        assert!(TlsPolicy::off().plaintext_allowed(ip("192.0.2.1")));
    }
}
