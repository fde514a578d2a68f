//! Running the real `dshare` binary from tests.
#![allow(dead_code)]

use ds_testkit::OutputWithin;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_dshare");

/// A port free on 127.0.0.1 right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `dshare serve` process, killed (SIGKILL) when dropped.
pub struct Serve(pub Child);

impl Serve {
    /// Kills the node with SIGKILL and reaps it.
    pub fn kill(mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `dshare serve --config` and waits until each of `ports` on 127.0.0.1 accepts.
pub fn serve(config: &Path, ports: &[u16]) -> Serve {
    let addrs: Vec<SocketAddr> = ports
        .iter()
        .map(|p| SocketAddr::from(([127, 0, 0, 1], *p)))
        .collect();
    serve_env(config, &addrs, &[])
}

/// Starts `dshare serve --config` with `env` added to its environment and its log in
/// `CONFIG.log`, and waits until each of `addrs` accepts.
pub fn serve_env(config: &Path, addrs: &[SocketAddr], env: &[(&str, &str)]) -> Serve {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(config.with_extension("log"))
        .unwrap();
    let child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(config)
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let node = Serve(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    for &addr in addrs {
        let port = addr.port();
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            assert!(Instant::now() < deadline, "node did not listen on {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    node
}

/// A one-node config in `dir` (`node.toml`): SMTP, POP3 and admin on 127.0.0.1 at the given
/// ports, data in `data_dir`, and `extra` TOML appended (sections of its own).
pub fn single_node_config(
    dir: &Path,
    data_dir: &Path,
    (smtp, pop3, admin): (u16, u16, u16),
    extra: &str,
) -> PathBuf {
    let config = dir.join("node.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[node]
id = "single"
data_dir = "{}"
[listen]
smtp = ["127.0.0.1:{smtp}"]
pop3 = ["127.0.0.1:{pop3}"]
imap = []
submission = []
submissions = []
minger = []
admin = ["127.0.0.1:{admin}"]
metrics = []
{extra}
"#,
            data_dir.display()
        ),
    )
    .unwrap();
    config
}

/// A one-node setup in a new temporary directory: [`single_node_config`] on three free
/// ports, data in `DIR/data`. Returns the directory (keep it), the config and the ports
/// `(smtp, pop3, admin)`.
pub fn single_node(extra: &str) -> (tempfile::TempDir, PathBuf, (u16, u16, u16)) {
    let dir = tempfile::tempdir().unwrap();
    let ports = (free_port(), free_port(), free_port());
    let config = single_node_config(dir.path(), &dir.path().join("data"), ports, extra);
    (dir, config, ports)
}

/// `dshare account add ADDRESS --password PASSWORD` against the node of `config`; panics
/// with the CLI's error output when it fails.
pub fn add_account(config: &Path, address: &str, password: &str) {
    let out = Command::new(BIN)
        .arg("-c")
        .arg(config)
        .args(["account", "add", address, "--password", password])
        .output_bounded()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

// The admin CLI against an in-process test node.

/// A config file that points the CLI at a test node (its data dir holds the admin token).
pub fn cli_config(dir: &Path, data_dir: &Path, admin: std::net::SocketAddr) -> PathBuf {
    let path = dir.join("cli.toml");
    std::fs::write(
        &path,
        format!(
            "[node]\nid = \"node-a\"\ndata_dir = \"{}\"\n\n[listen]\nadmin = [\"{admin}\"]\n",
            data_dir.display()
        ),
    )
    .unwrap();
    path
}

pub async fn dshare(cfg: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.arg("-c").arg(cfg).args(args);
    tokio::task::spawn_blocking(move || cmd.output_bounded().unwrap())
        .await
        .unwrap()
}

pub async fn ok(cfg: &Path, args: &[&str]) -> String {
    let out = dshare(cfg, args).await;
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

pub async fn err(cfg: &Path, args: &[&str]) -> String {
    let out = dshare(cfg, args).await;
    assert!(!out.status.success(), "{args:?} unexpectedly succeeded");
    String::from_utf8(out.stderr).unwrap()
}

pub async fn json(cfg: &Path, args: &[&str]) -> serde_json::Value {
    let mut a = args.to_vec();
    a.push("--json");
    let out = ok(cfg, &a).await;
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {out}"))
}

/// Sends one small message to alice@example.com by SMTP; the final reply code, or 0 when the node did not answer.
pub fn send(smtp: u16, subject: &str) -> u16 {
    let out = Command::new("python3")
        .arg("-c")
        .arg(format!(
            r#"
import smtplib
try:
    s = smtplib.SMTP("127.0.0.1", {smtp}, timeout=20)
    s.sendmail("x@elsewhere.org", ["alice@example.com"], "Subject: {subject}\r\n\r\n" + "x" * 4000 + "\r\n")
    print(250)
    s.quit()
except smtplib.SMTPResponseException as e:
    print(e.smtp_code)
except smtplib.SMTPRecipientsRefused as e:
    print(list(e.recipients.values())[0][0])
except Exception:
    print(0)
"#
        ))
        .output_bounded()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

/// POP3 STAT of alice@example.com (password `alice-pw`), or `None` when the node did not serve it.
pub fn stat(pop3: u16) -> Option<usize> {
    let out = Command::new("python3")
        .arg("-c")
        .arg(format!(
            r#"
import poplib
p = poplib.POP3("127.0.0.1", {pop3}, timeout=20)
p.user("alice@example.com"); p.pass_("alice-pw")
print(p.stat()[0])
"#
        ))
        .output_bounded()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}
