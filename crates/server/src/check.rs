//! `dshare check-config`: what is wrong with a configuration and its files, each problem with
//! its fix. `serve` runs the file checks at start (a port in use shows up when binding).

use std::sync::Arc;

use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

use crate::Config;

/// How bad a finding is: an error stops `serve`; a warning is logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Warning,
}

/// One problem and what to do about it.
#[derive(Debug, Clone)]
pub struct Finding {
    pub severity: Severity,
    pub problem: String,
    pub fix: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(f, "{s}: {}\n  fix: {}", self.problem, self.fix)
    }
}

/// Which checks to run besides the files'.
#[derive(Debug, Clone, Copy, Default)]
pub struct CheckOptions {
    /// Try to bind every listener address (not while the node itself runs).
    pub ports: bool,
}

fn error(problem: String, fix: impl Into<String>) -> Finding {
    Finding {
        severity: Severity::Error,
        problem,
        fix: fix.into(),
    }
}

fn read(path: &std::path::Path, what: &str, out: &mut Vec<Finding>) -> Option<Vec<u8>> {
    match std::fs::read(path) {
        Ok(b) => Some(b),
        Err(e) => {
            out.push(error(
                format!("cannot read the {what} {}: {e}", path.display()),
                "check the path and its permissions (`dshare pki` makes the files)",
            ));
            None
        }
    }
}

/// Checks the certificate and key, the cluster CA, the secret and (optionally) the ports.
pub fn check_config(config: &Config, opts: CheckOptions) -> Vec<Finding> {
    let mut out = vec![];
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut own_chain: Option<Vec<CertificateDer<'static>>> = None;
    match (&config.tls.cert, &config.tls.key) {
        (Some(cert), Some(key)) => {
            let certs =
                read(cert, "certificate", &mut out).and_then(
                    |pem| match ds_net::tls::certs_from_pem(&pem) {
                        Ok(c) => Some(c),
                        Err(e) => {
                            out.push(error(
                                format!("{}: not a PEM certificate: {e}", cert.display()),
                                "point tls.cert at the node's PEM certificate (leaf first)",
                            ));
                            None
                        }
                    },
                );
            let private =
                read(key, "private key", &mut out).and_then(|pem| match ds_net::tls::key_from_pem(
                    &pem,
                ) {
                    Ok(k) => Some(k),
                    Err(e) => {
                        out.push(error(
                            format!("{}: not a PEM private key: {e}", key.display()),
                            "point tls.key at the node's PEM private key",
                        ));
                        None
                    }
                });
            own_chain = certs.clone();
            if let (Some(certs), Some(private)) = (certs, private) {
                match rustls::sign::CertifiedKey::from_der(certs, private, &provider) {
                    Ok(_) => {}
                    Err(e) => out.push(error(
                        format!(
                            "the private key {} does not match the certificate {}: {e}",
                            key.display(),
                            cert.display()
                        ),
                        "use the key the certificate was issued for (e.g. NODE.key.pem with NODE.cert.pem from `dshare pki`)",
                    )),
                }
            }
        }
        (Some(_), None) | (None, Some(_)) => out.push(error(
            "only one of tls.cert and tls.key is set".into(),
            "set both, or neither for a self-signed certificate in the data directory",
        )),
        (None, None) => {}
    }

    if !config.cluster.peers.is_empty() && config.tls.cluster_ca.is_none() {
        out.push(error(
            "peers are configured but tls.cluster_ca is not".into(),
            "set tls.cluster_ca to the cluster CA certificate (`dshare pki` makes ca.pem)",
        ));
    }
    for p in &config.cluster.peers {
        if !p.minger.starts_with("https://") {
            out.push(error(
                format!("peer {}: Minger URL {:?} is not https", p.id, p.minger),
                "write it as https://HOST:4069 (Minger always runs over TLS)",
            ));
        }
    }
    if let Some(ca) = &config.tls.cluster_ca
        && let Some(pem) = read(ca, "cluster CA", &mut out)
    {
        check_ca(config, ca, &pem, own_chain.as_deref(), &provider, &mut out);
    }

    if let Some(path) = &config.cluster.secret_file
        && let Some(bytes) = read(path, "cluster secret", &mut out)
    {
        let n = String::from_utf8_lossy(&bytes).trim().chars().count();
        if n < ds_cluster::config::MIN_SECRET_LEN {
            out.push(error(
                format!(
                    "the cluster secret in {} is {n} characters; at least {} are needed",
                    path.display(),
                    ds_cluster::config::MIN_SECRET_LEN
                ),
                format!(
                    "write a longer one on every node, e.g. `head -c 24 /dev/urandom | base64 > {}`",
                    path.display()
                ),
            ));
        }
    }

    for d in &config.outbound.dkim {
        if let Err(e) = ds_smtp::dkim::check_key(&d.to_smtp()) {
            out.push(error(
                e.to_string(),
                format!(
                    "make a key with `dshare dkim generate {} --selector {} --out {}` and \
                     publish the DNS record it prints, or fix the path and its permissions",
                    d.domain,
                    d.selector,
                    d.key_file.display()
                ),
            ));
        }
    }

    check_outbound(config, &mut out);
    if opts.ports {
        check_ports(config, &mut out);
    }
    out
}

/// The relay host's password file and CA can be read and parsed.
fn check_outbound(config: &Config, out: &mut Vec<Finding>) {
    if !config.outbound.enabled {
        return;
    }
    match config.outbound.to_smtp() {
        Err(e) => out.push(error(
            e.to_string(),
            "check outbound.relayhost_password_file and outbound.relayhost_ca",
        )),
        Ok(o) => {
            if let Some(pem) = &o.relayhost_ca
                && let Err(e) = ds_net::tls::certs_from_pem(pem)
            {
                out.push(error(
                    format!("outbound.relayhost_ca: not a PEM certificate: {e}"),
                    "point outbound.relayhost_ca at the relay host's CA certificate (PEM)",
                ));
            }
        }
    }
}

fn check_ca(
    config: &Config,
    ca: &std::path::Path,
    pem: &[u8],
    own_chain: Option<&[CertificateDer<'static>]>,
    provider: &Arc<rustls::crypto::CryptoProvider>,
    out: &mut Vec<Finding>,
) {
    let mut roots = rustls::RootCertStore::empty();
    let added = ds_net::tls::certs_from_pem(pem)
        .map_err(|e| e.to_string())
        .and_then(|certs| {
            certs
                .into_iter()
                .try_for_each(|c| roots.add(c))
                .map_err(|e| e.to_string())
        });
    if let Err(e) = added {
        out.push(error(
            format!("{}: not a usable CA certificate: {e}", ca.display()),
            "point tls.cluster_ca at the cluster CA's PEM certificate (ca.pem from `dshare pki`)",
        ));
        return;
    }
    let Some(chain) = own_chain else {
        return;
    };
    let verifier = match rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    {
        Ok(v) => v,
        Err(e) => {
            out.push(error(
                format!("{}: {e}", ca.display()),
                "point tls.cluster_ca at the cluster CA certificate",
            ));
            return;
        }
    };
    // Peers reach this node by its advertised name (or its node id).
    let mut names = vec![config.node.advertise.clone()];
    if config.node.id != config.node.advertise {
        names.push(config.node.id.clone());
    }
    let mut last_err = None;
    for name in &names {
        let Ok(server_name) = ServerName::try_from(name.clone()) else {
            continue;
        };
        match verifier.verify_server_cert(
            &chain[0],
            &chain[1..],
            &server_name,
            &[],
            UnixTime::now(),
        ) {
            Ok(_) => return,
            Err(e) => last_err = Some(e),
        }
    }
    let e = last_err
        .map(|e| e.to_string())
        .unwrap_or_else(|| "no usable name".into());
    let unknown_issuer = e.contains("UnknownIssuer") || e.contains("BadSignature");
    if unknown_issuer {
        out.push(error(
            format!(
                "the cluster CA {} did not issue this node's certificate ({e}): peers will refuse it",
                ca.display()
            ),
            "issue the node's certificate from the cluster CA (`dshare pki`), or use that CA's ca.pem",
        ));
    } else {
        out.push(error(
            format!(
                "this node's certificate is not valid for {} under the cluster CA {}: {e}",
                names.join(" or "),
                ca.display()
            ),
            "issue a certificate whose names include node.advertise (`dshare pki NODE`)",
        ));
    }
}

fn check_ports(config: &Config, out: &mut Vec<Finding>) {
    let l = &config.listen;
    let all = [
        ("smtp", &l.smtp),
        ("pop3", &l.pop3),
        ("pop3s", &l.pop3s),
        ("imap", &l.imap),
        ("imaps", &l.imaps),
        ("minger", &l.minger),
        ("admin", &l.admin),
        ("metrics", &l.metrics),
    ];
    for (what, addrs) in all {
        for a in addrs.iter() {
            if a.port() == 0 {
                continue;
            }
            if let Err(e) = std::net::TcpListener::bind(a) {
                out.push(error(
                    format!("listen.{what}: cannot bind {a}: {e}"),
                    if e.kind() == std::io::ErrorKind::AddrInUse {
                        "stop what uses the port (another dshare?), or change the port".to_string()
                    } else {
                        "use an address of this host; ports below 1024 need CAP_NET_BIND_SERVICE"
                            .to_string()
                    },
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreadable_relayhost_files_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "not a certificate").unwrap();
        let text = format!(
            "[outbound]\nrelayhost = \"smtp.example.net:587\"\nrelayhost_user = \"me\"\n\
             relayhost_password_file = \"{}\"\n",
            dir.path().join("missing.pw").display()
        );
        let config = Config::parse(&text).unwrap();
        let found = check_config(&config, CheckOptions::default());
        assert!(
            found
                .iter()
                .any(|f| f.problem.contains("relayhost_password_file")),
            "{found:?}"
        );
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "secret\n").unwrap();
        let text = format!(
            "[outbound]\nrelayhost = \"smtp.example.net:587\"\nrelayhost_user = \"me\"\n\
             relayhost_password_file = \"{}\"\nrelayhost_ca = \"{}\"\n",
            pw.display(),
            ca.display()
        );
        let config = Config::parse(&text).unwrap();
        let found = check_config(&config, CheckOptions::default());
        assert!(
            found.iter().any(|f| f.problem.contains("relayhost_ca")),
            "{found:?}"
        );
    }
}
