//! `dshare dev-cluster`: several nodes in one process, one per loopback address, sharing
//! `example.com` over TLS with a generated CA and secret, with demo accounts spread over
//! them. The same shape as `docker-compose.yml`, without Docker.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use ds_server::{Config, Node, StartOptions};

const DEMO_PASSWORD: &str = "demo-password";
const DEMO_USERS: &[&str] = &["alice", "bob", "carol", "dave", "erin", "frank"];

fn ip(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, (i + 1) as u8))
}

fn node_id(i: usize) -> String {
    format!("office-{}", (b'a' + i as u8) as char)
}

/// Configurations for `n` nodes whose files live under `root`.
pub fn configs(n: usize, root: &Path) -> anyhow::Result<Vec<Config>> {
    if !(1..=9).contains(&n) {
        bail!("--nodes must be between 1 and 9");
    }
    std::fs::create_dir_all(root)?;
    let pki = ds_net::tls::Pki::generate("Domain Share dev CA");
    let ca = root.join("ca.pem");
    std::fs::write(&ca, pki.ca_cert_pem())?;
    let secret = root.join("cluster.secret");
    if !secret.exists() {
        write_private(&secret, new_secret().as_bytes())?;
    }
    let mut out = vec![];
    for i in 0..n {
        let id = node_id(i);
        let dir = root.join(&id);
        std::fs::create_dir_all(&dir)?;
        let (cert, key) = pki.issue(&["localhost", &id], &[ip(i)]);
        std::fs::write(dir.join("cert.pem"), cert)?;
        write_private(&dir.join("key.pem"), &key)?;
        let a = ip(i);
        let mut toml = format!(
            r#"[node]
id = "{id}"
data_dir = "{dir}"
main_domain = "example.com"
advertise = "{a}"

[[domain]]
name = "example.com"
shared = true

[listen]
smtp = ["{a}:2525"]
pop3 = ["{a}:1110"]
pop3s = ["{a}:1995"]
imap = ["{a}:1143"]
imaps = ["{a}:1993"]
submission = ["{a}:1587"]
submissions = ["{a}:1465"]
minger = ["{a}:4069"]
admin = ["{a}:4070"]
metrics = ["{a}:9100"]

[tls]
cert = "{dir}/cert.pem"
key = "{dir}/key.pem"
cluster_ca = "{ca}"

[cluster]
secret_file = "{secret}"
"#,
            dir = dir.display(),
            ca = ca.display(),
            secret = secret.display(),
        );
        for j in (0..n).filter(|&j| j != i) {
            toml.push_str(&format!(
                "\n[[cluster.peer]]\nid = \"{}\"\nminger = \"https://{}:4069\"\n",
                node_id(j),
                ip(j)
            ));
        }
        let path = dir.join("node.toml");
        std::fs::write(&path, &toml)?;
        out.push(Config::load(&path)?);
    }
    Ok(out)
}

/// Private keys and the cluster secret: readable by their owner only (mode 0600).
fn write_private(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    ds_server::write_private(path, data).with_context(|| format!("writing {}", path.display()))
}

fn new_secret() -> String {
    (0..40)
        .map(|_| char::from(b'a' + rand::random_range(0..26u8)))
        .collect()
}

/// `dshare pki`: a CA, one certificate per node (its id as host name, plus `localhost`)
/// and a fresh cluster secret, for a real deployment such as `docker-compose.yml`.
pub fn write_pki(out: &Path, nodes: &[String]) -> anyhow::Result<()> {
    std::fs::create_dir_all(out)?;
    let pki = ds_net::tls::Pki::generate("Domain Share cluster CA");
    std::fs::write(out.join("ca.pem"), pki.ca_cert_pem())?;
    for id in nodes {
        let (cert, key) = pki.issue(&[id.as_str(), "localhost"], &[]);
        std::fs::write(out.join(format!("{id}.cert.pem")), cert)?;
        write_private(&out.join(format!("{id}.key.pem")), &key)?;
    }
    let secret = out.join("cluster.secret");
    if !secret.exists() {
        write_private(&secret, new_secret().as_bytes())?;
    }
    println!(
        "wrote ca.pem, a certificate and key for {} and cluster.secret in {}",
        nodes.join(", "),
        out.display()
    );
    Ok(())
}

/// `dshare dkim generate`: a new RSA key for `domain` in `out` (0600, never overwriting a
/// key), and the DNS record to publish for it on stdout.
pub fn write_dkim_key(domain: &str, selector: &str, out: Option<PathBuf>) -> anyhow::Result<()> {
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    anyhow::ensure!(
        domain.contains('.') && !selector.is_empty() && !selector.contains(char::is_whitespace),
        "give a domain like company.com and a selector without spaces"
    );
    let out = out.unwrap_or_else(|| PathBuf::from(format!("{domain}.{selector}.dkim.pem")));
    anyhow::ensure!(
        !out.exists(),
        "{} exists: a published key is not replaced (give another --out or --selector)",
        out.display()
    );
    let (key, record) =
        ds_smtp::dkim::generate(&domain, selector).map_err(|e| anyhow::anyhow!(e))?;
    write_private(&out, key.as_bytes())?;
    eprintln!(
        "wrote the private key to {}; publish this record, then add\n  \
         dkim = [{{ domain = \"{domain}\", selector = \"{selector}\", key_file = \"{}\" }}]\n\
         to [outbound]:",
        out.display(),
        out.display()
    );
    println!("{record}");
    Ok(())
}

pub async fn run(n: usize, data_dir: Option<PathBuf>) -> anyhow::Result<()> {
    let root = data_dir
        .unwrap_or_else(|| std::env::temp_dir().join(format!("dshare-dev-{}", std::process::id())));
    let mut nodes = vec![];
    for c in configs(n, &root)? {
        let id = c.node.id.clone();
        let node = Node::start(c, StartOptions::default())
            .await
            .with_context(|| format!("starting {id}"))?;
        nodes.push(node);
    }
    for (k, user) in DEMO_USERS.iter().enumerate() {
        let node = &nodes[k % nodes.len()];
        let name = format!("{user}@example.com");
        match node.state.create_account(&name, DEMO_PASSWORD, false).await {
            Ok(_) => {}
            Err(e) if e.code() == tonic::Code::AlreadyExists => {}
            Err(e) => bail!("creating {name}: {}", e.message()),
        }
    }
    println!(
        "Domain Share dev cluster: {n} nodes sharing example.com (data in {})",
        root.display()
    );
    for (i, node) in nodes.iter().enumerate() {
        let owned: Vec<String> = DEMO_USERS
            .iter()
            .enumerate()
            .filter(|(k, _)| k % n == i)
            .map(|(_, u)| format!("{u}@example.com"))
            .collect();
        println!(
            "  {}  {}: SMTP :2525  POP3 :1110  POP3S :1995  IMAP :1143  IMAPS :1993  admin :4070   owns {}",
            node.state.config.node.id,
            ip(i),
            owned.join(", ")
        );
    }
    println!("Every demo password is {DEMO_PASSWORD:?}. Try:");
    println!(
        "  python3 -c \"import poplib; p=poplib.POP3('127.0.0.1',1110); p.user('bob'); p.pass_('{DEMO_PASSWORD}'); print(p.stat())\""
    );
    println!(
        "  python3 -c \"import imaplib; m=imaplib.IMAP4('127.0.0.2',1143); m.login('bob','{DEMO_PASSWORD}'); print(m.select())\""
    );
    println!(
        "  python3 -c \"import smtplib; smtplib.SMTP('127.0.0.3',2525).sendmail('alice@example.com',['bob@example.com'],'Subject: hi\\r\\n\\r\\nhello')\""
    );
    println!(
        "  dshare -c {}/office-a/node.toml lookup bob",
        root.display()
    );
    ds_net::os_signal().await?;
    for node in nodes {
        node.shutdown().await;
    }
    Ok(())
}

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn pki_writes_keys_and_secret_private() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("secrets");
        write_pki(&out, &["office-a".into(), "office-b".into()]).unwrap();
        for f in ["office-a.key.pem", "office-b.key.pem", "cluster.secret"] {
            assert_eq!(mode(&out.join(f)), 0o600, "{f}");
        }
        // A world-readable secret left by an older version is tightened when rewritten.
        std::fs::set_permissions(
            out.join("office-a.key.pem"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        write_pki(&out, &["office-a".into()]).unwrap();
        assert_eq!(mode(&out.join("office-a.key.pem")), 0o600);
    }

    #[test]
    fn dev_cluster_writes_keys_and_secret_private() {
        let tmp = tempfile::tempdir().unwrap();
        let configs = configs(2, tmp.path()).unwrap();
        assert_eq!(mode(&tmp.path().join("cluster.secret")), 0o600);
        for c in &configs {
            assert_eq!(mode(c.tls.key.as_ref().unwrap()), 0o600);
        }
    }
}
