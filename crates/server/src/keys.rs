//! One key per purpose, derived from the cluster secret (DESIGN.md §5): the Minger
//! credential, the SMTP relay's peer AUTH password and the session proof (POP3 `XCLIENT`
//! / IMAP `ID` HMAC) each use their own HKDF-SHA256 output, so a key that leaks from one
//! purpose (say a relay AUTH seen by a misconfigured peer) opens nothing else. Every node
//! derives the same keys from the same secret, so a cluster keeps working.

use std::fmt;

use ring::hkdf;

/// HKDF salt: fixed, so every node derives the same keys; versioned, so a change of scheme
/// gives new keys.
const SALT: &[u8] = b"dshare cluster keys v1";
/// Purpose labels (HKDF `info`).
const MINGER_LABEL: &[u8] = b"dshare minger credential v1";
const RELAY_LABEL: &[u8] = b"dshare smtp relay auth v1";
const SESSION_LABEL: &[u8] = b"dshare session proof v1";

/// The derived keys, each as 64 lower-case hex characters (printable ASCII, so they fit
/// the services' secret strings and gRPC metadata).
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterKeys {
    /// Sent with, and checked on, every Minger call.
    pub minger: String,
    /// The password of the SMTP relay's peer `AUTH PLAIN`.
    pub relay: String,
    /// The HMAC key of the peer proof of forwarded sessions (POP3 `XCLIENT ... SIG`, IMAP `ID`).
    pub session: String,
}

impl fmt::Debug for ClusterKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterKeys(<redacted>)")
    }
}

impl ClusterKeys {
    /// Derives every purpose's key from the cluster secret.
    pub fn derive(secret: &str) -> Self {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, SALT).extract(secret.as_bytes());
        let key = |label: &[u8]| {
            let mut out = [0u8; 32];
            let info = [label];
            prk.expand(&info, hkdf::HKDF_SHA256)
                .and_then(|okm| okm.fill(&mut out))
                .expect("32 bytes is a valid HKDF-SHA256 output length");
            out.iter().map(|b| format!("{b:02x}")).collect::<String>()
        };
        Self {
            minger: key(MINGER_LABEL),
            relay: key(RELAY_LABEL),
            session: key(SESSION_LABEL),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "test-cluster-secret-0123456789";

    #[test]
    fn each_purpose_has_its_own_key_and_none_is_the_secret() {
        let k = ClusterKeys::derive(SECRET);
        for key in [&k.minger, &k.relay, &k.session] {
            assert_ne!(key, SECRET);
            assert!(!key.contains(SECRET));
            assert_eq!(key.len(), 64);
            assert!(key.bytes().all(|b| b.is_ascii_hexdigit()));
        }
        assert_ne!(k.minger, k.relay);
        assert_ne!(k.minger, k.session);
        assert_ne!(k.relay, k.session);
        assert!(!format!("{k:?}").contains(&k.minger));
    }

    #[test]
    fn every_node_derives_the_same_keys_and_another_secret_others() {
        assert_eq!(ClusterKeys::derive(SECRET), ClusterKeys::derive(SECRET));
        let other = ClusterKeys::derive("another-secret-0123456789");
        assert_ne!(other.minger, ClusterKeys::derive(SECRET).minger);
    }

    /// RFC 5869 test case 1 through ring, so the construction is HKDF-SHA256 itself.
    #[test]
    fn ring_hkdf_matches_rfc5869() {
        let ikm = [0x0bu8; 22];
        let salt: Vec<u8> = (0x00..=0x0c).collect();
        let info: Vec<u8> = (0xf0..=0xf9).collect();
        struct L(usize);
        impl hkdf::KeyType for L {
            fn len(&self) -> usize {
                self.0
            }
        }
        let mut okm = [0u8; 42];
        hkdf::Salt::new(hkdf::HKDF_SHA256, &salt)
            .extract(&ikm)
            .expand(&[&info], L(42))
            .unwrap()
            .fill(&mut okm)
            .unwrap();
        let hex: String = okm.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
        );
    }
}
