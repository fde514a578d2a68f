//! `XCLIENT`: how a front node tells the owner who the real client is, with the peer proof of
//! [`ds_access::proof`] over the owner's greeting timestamp and the fields `addr`, `port`, `hop`
//! (in that order).

use std::net::IpAddr;

use ds_access::ProofKey;
use ds_access::proof;

use crate::protocol::Xclient;

/// The full `XCLIENT` command line, CRLF included, for the greeting `timestamp`.
pub fn command_line(key: &ProofKey, timestamp: &str, addr: IpAddr, port: u16, hop: &str) -> String {
    let (addr, port) = (addr.to_string(), port.to_string());
    // A node id never holds an LF (it is one token on the wire); an empty proof is refused.
    let sig = proof::sign(key, timestamp, &[&addr, &port, hop]).unwrap_or_default();
    format!("XCLIENT ADDR={addr} PORT={port} HOP={hop} SIG={sig}\r\n")
}

/// Whether `x` carries a valid proof for this connection's greeting `timestamp`.
pub fn verify(key: &ProofKey, timestamp: &str, x: &Xclient) -> bool {
    let (addr, port) = (x.addr.to_string(), x.port.to_string());
    proof::verify(key, timestamp, &[&addr, &port, &x.hop], &x.sig)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Command, parse_command};

    #[test]
    fn sign_then_verify() {
        let key = ProofKey::from_cluster_secret("0123456789abcdef-cluster");
        let ts = "<1a2b.1700000000@owner.example>";
        let addr: IpAddr = "203.0.113.9".parse().unwrap();
        let line = command_line(&key, ts, addr, 51234, "office-a");
        let Ok(Command::Xclient(x)) = parse_command(line.as_bytes()) else {
            panic!("{line}")
        };
        assert!(verify(&key, ts, &x));
        assert!(!verify(&ProofKey::new(b"another secret of 16+"), ts, &x));
        assert!(!verify(&key, "<other@owner.example>", &x));
        let mut moved = x.clone();
        moved.port = 51235;
        assert!(!verify(&key, ts, &moved));
        let mut hop = x;
        hop.hop = "office-b".into();
        assert!(!verify(&key, ts, &hop));
    }
}
