//! DKIM signing (RFC 6376) with mail-auth: per domain a selector and a private key file
//! (`[outbound] dkim = [{ domain, selector, key_file }]`). Mail from authenticated submission
//! that leaves for outbound delivery is signed once, by the node that accepted it, with the key
//! of its `From:` domain (or of a parent domain); so are DSNs from our domains that go out.
//! [`generate`] makes a new RSA key and the DNS record to publish (`dshare dkim generate`).

use std::io::Read;
use std::path::PathBuf;

use mail_auth::common::crypto::{Ed25519Key, RsaKey, Sha256, SigningKey};
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dkim::{DkimSigner, Done};
use rsa::pkcs1::EncodeRsaPrivateKey;
use rsa::pkcs8::EncodePublicKey;
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject;

/// Header fields signed when present (RFC 6376 §5.4.1's recommendations).
const SIGNED_HEADERS: [&str; 12] = [
    "From",
    "Reply-To",
    "Subject",
    "Date",
    "To",
    "Cc",
    "Message-ID",
    "In-Reply-To",
    "References",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
];
/// A header section longer than this is not signed (it would be held whole in memory).
pub(crate) const MAX_SIGNED_HEADER: usize = 256 * 1024;
/// Octets read from the store per step of signing.
const CHUNK: usize = 64 * 1024;
/// Size of generated RSA keys.
pub const RSA_BITS: usize = 2048;

/// One signing domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DkimConfig {
    pub domain: String,
    pub selector: String,
    /// PEM: an RSA key (PKCS#1 or PKCS#8) or an Ed25519 key (PKCS#8).
    pub key_file: PathBuf,
}

/// A key that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("DKIM key for {domain} ({path}): {why}")]
pub struct KeyError {
    pub domain: String,
    pub path: String,
    pub why: String,
}

enum Signer {
    Rsa(DkimSigner<RsaKey<Sha256>, Done>),
    Ed25519(DkimSigner<Ed25519Key, Done>),
}

/// The signing keys of a node, by domain.
#[derive(Default)]
pub struct Dkim {
    signers: Vec<(String, String, Signer)>,
}

impl std::fmt::Debug for Dkim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(
                self.signers
                    .iter()
                    .map(|(d, s, _)| format!("{s}._domainkey.{d}")),
            )
            .finish()
    }
}

fn builder<T: SigningKey>(key: T, c: &DkimConfig) -> DkimSigner<T, Done> {
    DkimSigner::from_key(key)
        .domain(c.domain.to_ascii_lowercase())
        .selector(c.selector.clone())
        .headers(SIGNED_HEADERS)
}

/// Reads and checks one key file.
fn load_signer(c: &DkimConfig) -> Result<Signer, KeyError> {
    let fail = |why: String| KeyError {
        domain: c.domain.clone(),
        path: c.key_file.display().to_string(),
        why,
    };
    if c.domain.is_empty() || c.selector.is_empty() {
        return Err(fail("domain and selector must not be empty".into()));
    }
    let pem = std::fs::read(&c.key_file).map_err(|e| fail(format!("cannot read it: {e}")))?;
    let der = PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| fail(format!("no PEM private key in it: {e}")))?;
    let pkcs8 = match &der {
        PrivateKeyDer::Pkcs8(k) => Some(k.secret_pkcs8_der().to_vec()),
        _ => None,
    };
    match RsaKey::<Sha256>::from_key_der(der) {
        Ok(key) => Ok(Signer::Rsa(builder(key, c))),
        Err(rsa_error) => match pkcs8.map(|der| Ed25519Key::from_pkcs8_der(&der)) {
            Some(Ok(key)) => Ok(Signer::Ed25519(builder(key, c))),
            _ => Err(fail(format!(
                "neither an RSA nor an Ed25519 key: {rsa_error}"
            ))),
        },
    }
}

impl Dkim {
    /// Loads every configured key; the first that cannot be used is the error.
    pub fn load(configs: &[DkimConfig]) -> Result<Dkim, KeyError> {
        let mut signers = Vec::new();
        for c in configs {
            let signer = load_signer(c)?;
            signers.push((c.domain.to_ascii_lowercase(), c.selector.clone(), signer));
        }
        Ok(Dkim { signers })
    }

    pub fn is_empty(&self) -> bool {
        self.signers.is_empty()
    }

    /// The key for `domain`: its own, else the closest parent domain's.
    fn signer_for(&self, domain: &str) -> Option<&Signer> {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        let mut name = domain.as_str();
        loop {
            if let Some((_, _, s)) = self.signers.iter().find(|(d, _, _)| d == name) {
                return Some(s);
            }
            name = name.split_once('.')?.1;
        }
    }

    /// Whether a message from `domain` would be signed.
    pub fn signs(&self, domain: &str) -> bool {
        self.signer_for(domain).is_some()
    }

    /// The `DKIM-Signature` header field (with CRLF) for the message `head` + `rest`, with
    /// the key of its `From:` domain; `Ok(None)` when no key fits or the header section is
    /// longer than [`MAX_SIGNED_HEADER`] (then it goes out unsigned). Reads `rest` in chunks.
    pub fn sign(&self, head: &[u8], rest: &mut dyn Read) -> std::io::Result<Option<String>> {
        if self.is_empty() {
            return Ok(None);
        }
        // The header section, bounded, for the `From:` domain.
        let mut start = head.to_vec();
        let mut buf = vec![0u8; CHUNK];
        let header_end = loop {
            if let Some(end) = start.windows(4).position(|w| w == b"\r\n\r\n") {
                break Some(end + 4);
            }
            if start.len() > MAX_SIGNED_HEADER {
                break None;
            }
            let n = rest.read(&mut buf)?;
            if n == 0 {
                break None;
            }
            start.extend_from_slice(&buf[..n]);
        };
        let Some(header_end) = header_end else {
            tracing::info!("DKIM: no header section end within bounds, not signed");
            return Ok(None);
        };
        let Some(domain) = from_domain(&start[..header_end]) else {
            return Ok(None);
        };
        let Some(signer) = self.signer_for(&domain) else {
            return Ok(None);
        };
        let signed = match signer {
            Signer::Rsa(s) => stream(s, &start, rest, &mut buf)?,
            Signer::Ed25519(s) => stream(s, &start, rest, &mut buf)?,
        };
        match signed {
            Ok(header) => Ok(Some(header)),
            Err(e) => {
                tracing::warn!(%domain, error = %e, "DKIM signing failed, sent unsigned");
                Ok(None)
            }
        }
    }

    /// The signed form of a whole message in memory (a DSN): its signature prepended, or the
    /// message as it was.
    pub fn sign_message(&self, message: Vec<u8>) -> Vec<u8> {
        match self.sign(&message, &mut std::io::empty()) {
            Ok(Some(header)) => {
                let mut signed = header.into_bytes();
                signed.extend_from_slice(&message);
                signed
            }
            _ => message,
        }
    }
}

fn stream<T: SigningKey>(
    signer: &DkimSigner<T, Done>,
    start: &[u8],
    rest: &mut dyn Read,
    buf: &mut [u8],
) -> std::io::Result<Result<String, mail_auth::Error>>
where
    <<T as SigningKey>::Hasher as mail_auth::common::crypto::HashImpl>::Context:
        mail_auth::common::crypto::HashContext,
{
    let mut s = signer.sign_streaming();
    s.write(start);
    loop {
        let n = rest.read(buf)?;
        if n == 0 {
            break;
        }
        s.write(&buf[..n]);
    }
    Ok(s.finish().map(|sig| sig.to_header()))
}

/// The domain of the first `From:` address of a header section.
fn from_domain(header: &[u8]) -> Option<String> {
    let message = mail_parser::MessageParser::new().parse_headers(header)?;
    let address = message.from()?.first()?.address()?;
    Some(address.rsplit_once('@')?.1.to_ascii_lowercase())
}

/// A new RSA key for `domain`: the private key (PKCS#1 PEM) and the DNS TXT record that
/// publishes its public half under `selector`.
pub fn generate(domain: &str, selector: &str) -> Result<(String, String), String> {
    let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, RSA_BITS)
        .map_err(|e| format!("generating an RSA key: {e}"))?;
    let pem = key
        .to_pkcs1_pem(rsa::pkcs8::LineEnding::LF)
        .map_err(|e| format!("encoding the key: {e}"))?;
    let public = rsa::RsaPublicKey::from(&key)
        .to_public_key_der()
        .map_err(|e| format!("encoding the public key: {e}"))?;
    let p = crate::base64::encode(public.as_bytes());
    Ok((pem.to_string(), dns_record(domain, selector, "rsa", &p)))
}

/// `S._domainkey.DOMAIN. IN TXT "v=DKIM1; k=…; p=…"`, the value cut into strings of at most
/// 255 characters (RFC 1035), as zone files and DNS consoles take it.
pub fn dns_record(domain: &str, selector: &str, k: &str, p: &str) -> String {
    let value = format!("v=DKIM1; k={k}; p={p}");
    let strings: Vec<String> = value
        .as_bytes()
        .chunks(255)
        .map(|c| format!("\"{}\"", String::from_utf8_lossy(c)))
        .collect();
    format!(
        "{selector}._domainkey.{}. IN TXT {}",
        domain.trim_end_matches('.'),
        strings.join(" ")
    )
}

/// Checks that `path` holds a usable key (for `check-config`).
pub fn check_key(config: &DkimConfig) -> Result<(), KeyError> {
    load_signer(config).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_with_the_from_domain_or_its_parent_and_reports_bad_keys() {
        let dir = tempfile::tempdir().unwrap();
        let (pem, record) = generate("company.com", "s1").unwrap();
        assert!(record.starts_with("s1._domainkey.company.com. IN TXT \"v=DKIM1; k=rsa; p="));
        let key_file = dir.path().join("k.pem");
        std::fs::write(&key_file, pem).unwrap();
        let config = DkimConfig {
            domain: "company.com".into(),
            selector: "s1".into(),
            key_file: key_file.clone(),
        };
        let dkim = Dkim::load(std::slice::from_ref(&config)).unwrap();
        assert!(dkim.signs("company.com") && dkim.signs("mx.Company.com"));
        assert!(!dkim.signs("other.org") && !dkim.signs("com"));
        let msg = b"From: Bob <bob@company.com>\r\nSubject: hi\r\n\r\nbody\r\n";
        let header = dkim.sign(&msg[..20], &mut &msg[20..]).unwrap().unwrap();
        assert!(header.starts_with("DKIM-Signature:"), "{header}");
        assert!(header.contains("d=company.com") && header.contains("s=s1"));
        let other = b"From: x@other.org\r\n\r\nbody\r\n";
        assert!(dkim.sign(other, &mut std::io::empty()).unwrap().is_none());
        assert_eq!(dkim.sign_message(other.to_vec()), other.to_vec());
        // A DSN from one of our host names is signed with its parent domain's key.
        let dsn = crate::dsn::build(
            "mx.company.com",
            crate::dsn::About {
                sender: "someone@other.org",
                envid: None,
                arrival: 0,
            },
            &[],
            &crate::dsn::Returned::Headers("Subject: x\r\n".into()),
        );
        let signed = String::from_utf8(dkim.sign_message(dsn)).unwrap();
        assert!(
            signed.starts_with("DKIM-Signature:") && signed.contains("d=company.com"),
            "{signed}"
        );

        std::fs::write(&key_file, "not a key").unwrap();
        let e = Dkim::load(std::slice::from_ref(&config))
            .unwrap_err()
            .to_string();
        assert!(e.contains("company.com") && e.contains("k.pem"), "{e}");
        let missing = DkimConfig {
            key_file: dir.path().join("gone.pem"),
            ..config
        };
        let e = check_key(&missing).unwrap_err().to_string();
        assert!(e.contains("cannot read it"), "{e}");
    }
}
