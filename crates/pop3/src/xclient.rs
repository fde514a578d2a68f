//! `XCLIENT`: how a front node tells the owner who the real client is, and how the owner knows the
//! line comes from a peer. The signature is HMAC-SHA256, keyed with the cluster secret, over the
//! owner's greeting timestamp (a fresh `<nonce.time@host>` per connection, so a signature cannot be
//! replayed on another connection) and the attributes:
//!
//! ```text
//! timestamp LF addr LF port LF hop
//! ```

use std::fmt::Write as _;
use std::net::IpAddr;

use ring::hmac;

use crate::protocol::Xclient;

fn message(timestamp: &str, addr: IpAddr, port: u16, hop: &str) -> Vec<u8> {
    format!("{timestamp}\n{addr}\n{port}\n{hop}").into_bytes()
}

fn key(secret: &str) -> hmac::Key {
    hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes())
}

/// The lower-case hex signature of an `XCLIENT` for the greeting `timestamp`.
pub fn sign(secret: &str, timestamp: &str, addr: IpAddr, port: u16, hop: &str) -> String {
    let tag = hmac::sign(&key(secret), &message(timestamp, addr, port, hop));
    let mut hex = String::with_capacity(64);
    for b in tag.as_ref() {
        let _ = write!(hex, "{b:02x}");
    }
    hex
}

/// The full `XCLIENT` command line, CRLF included.
pub fn command_line(secret: &str, timestamp: &str, addr: IpAddr, port: u16, hop: &str) -> String {
    let sig = sign(secret, timestamp, addr, port, hop);
    format!("XCLIENT ADDR={addr} PORT={port} HOP={hop} SIG={sig}\r\n")
}

fn unhex(hex: &str) -> Option<Vec<u8>> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Whether `x` was signed with `secret` for this connection's greeting `timestamp` (constant-time
/// comparison of the tags).
pub fn verify(secret: &str, timestamp: &str, x: &Xclient) -> bool {
    let Some(tag) = unhex(&x.sig) else {
        return false;
    };
    hmac::verify(
        &key(secret),
        &message(timestamp, x.addr, x.port, &x.hop),
        &tag,
    )
    .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Command, parse_command};

    #[test]
    fn sign_then_verify() {
        let secret = "0123456789abcdef-cluster";
        let ts = "<1a2b.1700000000@owner.example>";
        let addr: IpAddr = "203.0.113.9".parse().unwrap();
        let line = command_line(secret, ts, addr, 51234, "office-a");
        let Ok(Command::Xclient(x)) = parse_command(line.as_bytes()) else {
            panic!("{line}")
        };
        assert!(verify(secret, ts, &x));
        assert!(!verify("another secret of 16+", ts, &x));
        assert!(!verify(secret, "<other@owner.example>", &x));
        let mut moved = x.clone();
        moved.port = 51235;
        assert!(!verify(secret, ts, &moved));
        let mut other = x.clone();
        other.addr = "203.0.113.10".parse().unwrap();
        assert!(!verify(secret, ts, &other));
        let mut hop = x;
        hop.hop = "office-b".into();
        assert!(!verify(secret, ts, &hop));
    }
}
