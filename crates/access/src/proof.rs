//! The peer proof (DESIGN.md §7): how an owner knows that a forwarded session comes from a peer,
//! whatever the protocol. The owner puts a fresh nonce in its greeting ([`greeting_nonce`], the
//! `<random.unixtime@host>` form of an APOP timestamp); the front node signs that nonce together
//! with what it claims about the client ([`sign`]); the owner checks the signature for its own
//! nonce ([`verify`]), so a proof cannot be replayed on another connection. POP3 carries it in
//! `XCLIENT ... SIG=`, IMAP in `ID (... "x-dshare-sig" ...)`.
//!
//! The signature is lower-case hex HMAC-SHA256 under a [`ProofKey`] over
//!
//! ```text
//! nonce LF field1 LF field2 LF … fieldN
//! ```
//!
//! with the fields in an order each protocol fixes (POP3: addr, port, hop). No field may contain
//! an LF (such a proof is never made nor accepted), so the message is unambiguous.

use std::fmt::Write as _;

use ring::hmac;
use ring::rand::SecureRandom;

/// Shortest cluster secret accepted for a proof key (the cluster's own minimum).
pub const MIN_SECRET_LEN: usize = ds_cluster::MIN_SECRET_LEN;

/// The key that signs and checks session proofs. Cheap to clone; its `Debug` shows nothing.
#[derive(Clone)]
pub struct ProofKey(hmac::Key);

impl std::fmt::Debug for ProofKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProofKey(<redacted>)")
    }
}

impl ProofKey {
    /// A key from raw key material.
    pub fn new(key: &[u8]) -> Self {
        ProofKey(hmac::Key::new(hmac::HMAC_SHA256, key))
    }

    /// The session-proof key from its text form: the node passes the session key it derived from
    /// the cluster secret (HKDF, one key per purpose, DESIGN.md §5; `ds_server`'s `ClusterKeys`).
    pub fn from_cluster_secret(secret: &str) -> Self {
        if secret.len() < MIN_SECRET_LEN {
            tracing::warn!("cluster secret shorter than {MIN_SECRET_LEN} characters");
        }
        Self::new(secret.as_bytes())
    }
}

/// A fresh greeting nonce for `hostname`: `<24 hex digits.unixtime@hostname>`.
pub fn greeting_nonce(hostname: &str) -> String {
    let mut nonce = [0u8; 12];
    // A failure of the system RNG leaves zeros; the time still varies. It should never happen.
    if ring::rand::SystemRandom::new().fill(&mut nonce).is_err() {
        tracing::error!("system random number generator failed");
    }
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!("<{}.{unix}@{hostname}>", hex(&nonce))
}

/// The nonce in a greeting line: the first `<…>` that contains an `@` (an APOP-style timestamp).
pub fn nonce_in(greeting: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(greeting).ok()?.trim_end();
    let start = text.find('<')?;
    let end = start + text[start..].find('>')?;
    let nonce = &text[start..=end];
    nonce.contains('@').then_some(nonce)
}

fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
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

fn message(nonce: &str, fields: &[&str]) -> Option<Vec<u8>> {
    if nonce.contains('\n') || fields.iter().any(|f| f.contains('\n')) {
        return None;
    }
    let mut m = nonce.as_bytes().to_vec();
    for field in fields {
        m.push(b'\n');
        m.extend_from_slice(field.as_bytes());
    }
    Some(m)
}

/// The proof for `fields` on the connection whose greeting carried `nonce`: lower-case hex.
/// `None` if a field contains an LF.
pub fn sign(key: &ProofKey, nonce: &str, fields: &[&str]) -> Option<String> {
    let message = message(nonce, fields)?;
    Some(hex(hmac::sign(&key.0, &message).as_ref()))
}

/// Whether `signature` (hex, any case) proves `fields` for this connection's `nonce` under `key`
/// (constant-time comparison of the tags).
pub fn verify(key: &ProofKey, nonce: &str, fields: &[&str], signature: &str) -> bool {
    let (Some(tag), Some(message)) = (unhex(signature), message(nonce, fields)) else {
        return false;
    };
    hmac::verify(&key.0, &message, &tag).is_ok()
}

/// The field [`sign`] signs, with the connection's current nonce, to make the tag a front node
/// puts on the command that ends a forwarded session and keeps the link (IMAP `UNAUTHENTICATE`,
/// POP3 `XDSRESET`).
const END_FIELD: &str = "end-of-session";

/// The tag of the command that ends a forwarded session on the connection whose nonce is
/// `nonce`: only a peer with the cluster key can make it, and it is good for that nonce only.
pub fn end_tag(key: &ProofKey, nonce: &str) -> Option<String> {
    sign(key, nonce, &[END_FIELD])
}

/// Whether `tag` is [`end_tag`] for `nonce` (constant-time).
pub fn is_end_tag(key: &ProofKey, nonce: &str, tag: &str) -> bool {
    verify(key, nonce, &[END_FIELD], tag)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_then_verify() {
        let key = ProofKey::from_cluster_secret("0123456789abcdef-cluster");
        let nonce = "<1a2b.1700000000@owner.example>";
        let fields = ["203.0.113.9", "51234", "office-a"];
        let sig = sign(&key, nonce, &fields).unwrap();
        assert_eq!(sig.len(), 64);
        assert!(verify(&key, nonce, &fields, &sig));
        assert!(verify(&key, nonce, &fields, &sig.to_ascii_uppercase()));
        let other_key = ProofKey::new(b"another secret of 16+");
        assert!(!verify(&other_key, nonce, &fields, &sig));
        assert!(!verify(&key, "<other@owner.example>", &fields, &sig));
        assert!(!verify(
            &key,
            nonce,
            &["203.0.113.9", "51235", "office-a"],
            &sig
        ));
        assert!(!verify(&key, nonce, &["203.0.113.9", "51234"], &sig));
        assert!(!verify(&key, nonce, &fields, &sig[..62]));
        assert!(!verify(&key, nonce, &fields, "zz"));
        // Fields cannot be shifted across the separator.
        assert!(sign(&key, nonce, &["a\nb"]).is_none());
        assert!(!verify(
            &key,
            nonce,
            &["a\nb"],
            &sign(&key, nonce, &["a", "b"]).unwrap()
        ));
    }

    #[test]
    fn end_tags_are_bound_to_the_nonce() {
        let key = ProofKey::new(b"0123456789abcdef-cluster");
        let tag = end_tag(&key, "<1.2@owner>").unwrap();
        assert!(tag.len() <= 64 && tag.bytes().all(|b| b.is_ascii_hexdigit()));
        assert!(is_end_tag(&key, "<1.2@owner>", &tag));
        assert!(!is_end_tag(&key, "<1.3@owner>", &tag));
        assert!(!is_end_tag(&key, "<1.2@owner>", "a1"));
        assert_ne!(
            Some(tag),
            sign(&key, "<1.2@owner>", &[]),
            "not a plain proof"
        );
    }

    #[test]
    fn nonces() {
        let n = greeting_nonce("owner.example");
        assert!(n.starts_with('<') && n.ends_with("@owner.example>"), "{n}");
        assert_ne!(n, greeting_nonce("owner.example"));
        let greeting = format!("+OK owner.example POP3 server ready {n}\r\n");
        assert_eq!(nonce_in(greeting.as_bytes()), Some(n.as_str()));
        let greeting = format!("* OK [CAPABILITY IMAP4rev1] ready {n}\r\n");
        assert_eq!(nonce_in(greeting.as_bytes()), Some(n.as_str()));
        assert_eq!(nonce_in(b"+OK ready <1.2@host>\r\n"), Some("<1.2@host>"));
        assert_eq!(nonce_in(b"+OK ready\r\n"), None);
        assert_eq!(nonce_in(b"+OK <nohost>\r\n"), None);
    }
}
