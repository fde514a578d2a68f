//! TLS: rustls configurations built with the `ring` provider explicitly (no global provider needed),
//! PEM loading through `rustls-pki-types`, the self-signed certificate of a node without `[tls]`
//! configuration, and [`Pki`], a small certificate authority for development and tests.

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::{Error, Result};

/// File name of the self-signed certificate in the data dir.
pub const SELF_SIGNED_CERT_FILE: &str = "tls-cert.pem";
/// File name of the self-signed certificate's key in the data dir (mode 0600).
pub const SELF_SIGNED_KEY_FILE: &str = "tls-key.pem";

/// The ring provider, the only one this workspace uses, with the AES-128-GCM suites first.
///
/// Every octet of a forwarded session crosses one TLS hop between nodes, and both nodes'
/// preference decides its suite (rustls servers follow the client's order). AES-128-GCM is as
/// safe for this as AES-256-GCM and about a third cheaper per octet, and its TLS 1.3 suite hashes
/// with SHA-256 (in hardware on most CPUs) where the AES-256 suite's SHA-384 is not: each
/// forwarded login's handshake costs less too. Clients that prefer another suite still get it.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    // A stable sort: only the AES-128-GCM suites move forward, the rest keep ring's order.
    provider.cipher_suites.sort_by_key(|suite| {
        !matches!(
            suite.suite(),
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
                | rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
                | rustls::CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
        )
    });
    Arc::new(provider)
}

/// Install ring as the process-wide default provider (for libraries that build their own configs,
/// like tonic). Safe to call more than once.
pub fn ensure_crypto_provider() {
    // An error only means a provider is installed already.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Every certificate in a PEM buffer (at least one).
pub fn certs_from_pem(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem).collect::<Result<Vec<_>, _>>()?;
    if certs.is_empty() {
        return Err(Error::NoCertificate);
    }
    Ok(certs)
}

/// The first private key (PKCS#8, PKCS#1 or SEC1) in a PEM buffer.
pub fn key_from_pem(pem: &[u8]) -> Result<PrivateKeyDer<'static>> {
    Ok(PrivateKeyDer::from_pem_slice(pem)?)
}

/// A server configuration from a PEM certificate chain (leaf first) and its PEM private key.
pub fn server_config_from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<Arc<ServerConfig>> {
    let certs = certs_from_pem(cert_pem)?;
    let key = key_from_pem(key_pem)?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    Ok(Arc::new(config))
}

/// A client configuration that trusts the certificates in `ca_pem` and nothing else (the cluster CA).
pub fn client_config_with_ca(ca_pem: &[u8]) -> Result<Arc<ClientConfig>> {
    let mut roots = RootCertStore::empty();
    for cert in certs_from_pem(ca_pem)? {
        roots.add(cert)?;
    }
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Where the system's trust anchors usually are (Debian/Ubuntu/Alpine, Fedora/RHEL, BSD/macOS,
/// SUSE); `SSL_CERT_FILE` comes first, as for OpenSSL.
const SYSTEM_ROOT_FILES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
    "/etc/ssl/ca-bundle.pem",
];

/// A client configuration that trusts the system's root certificates (the PEM bundle named by
/// `SSL_CERT_FILE`, else the first of the usual bundle files). Certificates of the bundle that
/// do not parse are skipped; a bundle without any usable one is an error.
pub fn client_config_system_roots() -> Result<Arc<ClientConfig>> {
    let from_env = std::env::var_os("SSL_CERT_FILE").map(PathBuf::from);
    let path = from_env
        .into_iter()
        .chain(SYSTEM_ROOT_FILES.iter().map(PathBuf::from))
        .find(|p| p.is_file())
        .ok_or(Error::NoCertificate)?;
    let pem = read_file(&path)?;
    let mut roots = RootCertStore::empty();
    let certs = CertificateDer::pem_slice_iter(&pem).filter_map(|c| c.ok());
    let (added, _ignored) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(Error::NoCertificate);
    }
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// A client configuration that encrypts but does not authenticate the server: any certificate
/// is taken (its handshake signatures are still checked). For opportunistic TLS to MX hosts
/// (RFC 7435), where the alternative is plain text; never where a credential is sent.
pub fn client_config_unverified() -> Result<Arc<ClientConfig>> {
    let provider = provider();
    let verifier = Arc::new(AnyServerCert {
        algorithms: provider.signature_verification_algorithms,
    });
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The verifier of [`client_config_unverified`].
#[derive(Debug)]
struct AnyServerCert {
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl rustls::client::danger::ServerCertVerifier for AnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> std::result::Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The node's certificate when none is configured: generated with rcgen on first start for `names`
/// (DNS names or IP addresses; `localhost` if empty), written to `data_dir/tls-cert.pem` and
/// `data_dir/tls-key.pem` (mode 0600), and read back from there afterwards. Returns
/// `(cert_pem, key_pem)`. Blocking file I/O: call it at startup.
pub fn load_or_create_self_signed(data_dir: &Path, names: &[String]) -> Result<(Vec<u8>, Vec<u8>)> {
    let cert_path = data_dir.join(SELF_SIGNED_CERT_FILE);
    let key_path = data_dir.join(SELF_SIGNED_KEY_FILE);
    let (cert_exists, key_exists) = (cert_path.exists(), key_path.exists());
    if cert_exists && key_exists {
        let cert = read_file(&cert_path)?;
        let key = read_file(&key_path)?;
        return Ok((cert, key));
    }
    if cert_exists || key_exists {
        tracing::warn!(dir = %data_dir.display(), "incomplete self-signed certificate, generating a new one");
    }
    let names = if names.is_empty() {
        vec!["localhost".to_owned()]
    } else {
        names.to_vec()
    };
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(names.clone())?;
    params
        .distinguished_name
        .push(DnType::CommonName, names[0].as_str());
    let cert = params.self_signed(&key)?;
    let (cert_pem, key_pem) = (cert.pem().into_bytes(), key.serialize_pem().into_bytes());

    fs::create_dir_all(data_dir).map_err(|source| Error::File {
        path: data_dir.to_owned(),
        source,
    })?;
    // Key first: a cert without its key is useless, and both are replaced atomically (rename).
    write_atomic(&key_path, &key_pem, true)?;
    write_atomic(&cert_path, &cert_pem, false)?;
    tracing::info!(dir = %data_dir.display(), ?names, "generated a self-signed TLS certificate");
    Ok((cert_pem, key_pem))
}

fn read_file(path: &Path) -> Result<Vec<u8>> {
    fs::read(path).map_err(|source| Error::File {
        path: path.to_owned(),
        source,
    })
}

/// Write `data` to a temporary file beside `path`, then rename it over `path`.
fn write_atomic(path: &Path, data: &[u8], private: bool) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let file_err = |source| Error::File {
        path: tmp.clone(),
        source,
    };
    let _ = fs::remove_file(&tmp);
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut file = options.open(&tmp).map_err(file_err)?;
    file.write_all(data).map_err(file_err)?;
    file.sync_all().map_err(file_err)?;
    drop(file);
    fs::rename(&tmp, path).map_err(|source| Error::File {
        path: path.to_owned(),
        source,
    })
}

/// A small certificate authority for development and tests: one CA, leaf certificates for node
/// names and addresses, usable for server and client authentication.
#[derive(Debug)]
pub struct Pki {
    ca_pem: Vec<u8>,
    issuer: Issuer<'static, KeyPair>,
}

impl Pki {
    /// A new CA named `ca_name`. Panics if key generation fails (dev/test helper; see
    /// [`Pki::try_generate`]).
    pub fn generate(ca_name: &str) -> Pki {
        Self::try_generate(ca_name).expect("generating a test CA")
    }

    /// A new CA named `ca_name`.
    pub fn try_generate(ca_name: &str) -> Result<Pki> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, ca_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key)?;
        Ok(Pki {
            ca_pem: cert.pem().into_bytes(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA certificate (PEM), the trust anchor for [`client_config_with_ca`].
    pub fn ca_cert_pem(&self) -> Vec<u8> {
        self.ca_pem.clone()
    }

    /// A leaf certificate for DNS `names` and `ips`, signed by the CA: `(cert_pem, key_pem)`. Panics
    /// on a name that is not a valid DNS name (dev/test helper; see [`Pki::try_issue`]).
    pub fn issue(&self, names: &[&str], ips: &[IpAddr]) -> (Vec<u8>, Vec<u8>) {
        self.try_issue(names, ips)
            .expect("issuing a test certificate")
    }

    /// A leaf certificate for DNS `names` and `ips`, signed by the CA: `(cert_pem, key_pem)`.
    pub fn try_issue(&self, names: &[&str], ips: &[IpAddr]) -> Result<(Vec<u8>, Vec<u8>)> {
        let key = KeyPair::generate()?;
        let mut params =
            CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())?;
        params
            .subject_alt_names
            .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        let cn = names
            .first()
            .map(|n| (*n).to_owned())
            .or_else(|| ips.first().map(ToString::to_string));
        if let Some(cn) = cn {
            params.distinguished_name.push(DnType::CommonName, cn);
        }
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem().into_bytes(), key.serialize_pem().into_bytes()))
    }

    /// Write the CA certificate to `dir/ca.pem` and return the path.
    pub fn write_ca(&self, dir: &Path) -> Result<PathBuf> {
        let path = dir.join("ca.pem");
        fs::write(&path, &self.ca_pem).map_err(|source| Error::File {
            path: path.clone(),
            source,
        })?;
        Ok(path)
    }
}
