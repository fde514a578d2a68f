//! Configurations for a cluster of real `dshare serve` processes: node `i` is `node-a`,
//! `node-b`, … on 127.0.0.`i+1` with free ports, a certificate from one generated CA and
//! one cluster secret, every node a peer of the others and the shared domain `example.com`.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use ds_testkit::node_ip;

/// The domain every node serves (shared).
pub const DOMAIN: &str = "example.com";

/// One node's configuration file and ports.
#[derive(Debug, Clone)]
pub struct ProcessNode {
    pub id: String,
    pub ip: IpAddr,
    /// Its directory: `node.toml`, `cert.pem`, `key.pem` and `data/`.
    pub dir: PathBuf,
    pub config: PathBuf,
    pub smtp: u16,
    pub pop3: u16,
    pub imap: u16,
    pub minger: u16,
    pub admin: u16,
    pub metrics: u16,
}

impl ProcessNode {
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.ip, port)
    }
}

pub fn node_id(i: usize) -> String {
    format!("node-{}", (b'a' + i as u8) as char)
}

/// A port free on `ip` right now.
pub fn free_port(ip: IpAddr) -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind(SocketAddr::new(ip, 0))?
        .local_addr()?
        .port())
}

/// Writes a file readable by its owner only.
pub fn write_private(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(data)?;
    Ok(())
}

/// For [`write_configs`]: peers reach node `j`'s Minger at its own listener.
pub fn own_minger(j: usize, port: u16) -> anyhow::Result<SocketAddr> {
    Ok(SocketAddr::new(node_ip(j), port))
}

/// Writes the configurations of `n` nodes under `root`. `minger_for(j, port)` is the Minger
/// address peers use for node `j` listening on `port` (itself, or a proxy in front of it);
/// `extra` is appended to each configuration (more sections, e.g. `[smtp]`).
pub fn write_configs(
    root: &Path,
    n: usize,
    minger_for: impl Fn(usize, u16) -> anyhow::Result<SocketAddr>,
    extra: &str,
) -> anyhow::Result<Vec<ProcessNode>> {
    ds_net::ensure_crypto_provider();
    let pki = ds_net::tls::Pki::generate("test cluster CA");
    let ca = root.join("ca.pem");
    std::fs::write(&ca, pki.ca_cert_pem())?;
    let secret = root.join("cluster.secret");
    write_private(&secret, b"test-cluster-secret-0123456789abcdef")?;
    let mut nodes = Vec::new();
    for i in 0..n {
        let ip = node_ip(i);
        let id = node_id(i);
        let dir = root.join(&id);
        std::fs::create_dir_all(dir.join("data"))?;
        nodes.push(ProcessNode {
            config: dir.join("node.toml"),
            dir,
            id,
            ip,
            smtp: free_port(ip)?,
            pop3: free_port(ip)?,
            imap: free_port(ip)?,
            minger: free_port(ip)?,
            admin: free_port(ip)?,
            metrics: free_port(ip)?,
        });
    }
    let peer_minger: Vec<SocketAddr> = nodes
        .iter()
        .enumerate()
        .map(|(j, node)| minger_for(j, node.minger))
        .collect::<anyhow::Result<_>>()?;
    for (i, node) in nodes.iter().enumerate() {
        let (id, ip, dir) = (&node.id, node.ip, &node.dir);
        let (cert, key) = pki.issue(&["localhost", id], &[ip]);
        std::fs::write(dir.join("cert.pem"), cert)?;
        write_private(&dir.join("key.pem"), &key)?;
        let mut toml = format!(
            r#"[node]
id = "{id}"
data_dir = "{data}"
main_domain = "{DOMAIN}"
advertise = "{ip}"

[[domain]]
name = "{DOMAIN}"
shared = true

[listen]
smtp = ["{ip}:{smtp}"]
pop3 = ["{ip}:{pop3}"]
pop3s = []
imap = ["{ip}:{imap}"]
imaps = []
submission = []
submissions = []
minger = ["{ip}:{minger}"]
admin = ["{ip}:{admin}"]
metrics = ["{ip}:{metrics}"]

[tls]
cert = "{dir}/cert.pem"
key = "{dir}/key.pem"
cluster_ca = "{ca}"

[cluster]
secret_file = "{secret}"
"#,
            data = node.data_dir().display(),
            dir = dir.display(),
            ca = ca.display(),
            secret = secret.display(),
            smtp = node.smtp,
            pop3 = node.pop3,
            imap = node.imap,
            minger = node.minger,
            admin = node.admin,
            metrics = node.metrics,
        );
        for (j, peer) in nodes.iter().enumerate().filter(|&(j, _)| j != i) {
            toml.push_str(&format!(
                "\n[[cluster.peer]]\nid = \"{}\"\nminger = \"https://{}\"\n",
                peer.id, peer_minger[j]
            ));
        }
        toml.push('\n');
        toml.push_str(extra);
        std::fs::write(&node.config, toml)?;
    }
    Ok(nodes)
}
