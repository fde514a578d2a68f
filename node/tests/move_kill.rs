//! An account move survives a SIGKILL of a real `dshare serve` process: three node
//! processes (TLS with a generated CA, one cluster secret); the old owner B, then the new
//! owner C, is killed in the middle of the copy (the test-only hook
//! `DSHARE_TEST_MOVE_PAUSE_AFTER` holds B's copy after that many messages), restarted, and
//! the same `dshare account move` run again finishes the move. POP3 through the third node A
//! then shows every message once: the same count and the same bodies by SHA-256.

use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ds_testkit::node_ip;
use dshare_e2e::python;

mod common;
use common::{BIN, Serve, serve_env};

/// Messages per account.
const MESSAGES: usize = 300;
/// Where the hook holds the old owner's copy.
const PAUSE_AFTER: usize = 100;
const DOMAIN: &str = "example.com";
const PASS: &str = "kill-pass";

struct Node {
    ip: IpAddr,
    config: PathBuf,
    smtp: u16,
    pop3: u16,
    admin: u16,
}

impl Node {
    fn addrs(&self) -> Vec<SocketAddr> {
        [self.smtp, self.pop3, self.admin]
            .map(|p| SocketAddr::new(self.ip, p))
            .to_vec()
    }
}

fn free_port(ip: IpAddr) -> u16 {
    TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn write_private(path: &Path, data: &[u8]) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .unwrap();
    f.write_all(data).unwrap();
}

/// Configurations of three nodes, A, B and C, that know each other.
fn cluster(root: &Path) -> Vec<Node> {
    ds_net::ensure_crypto_provider();
    let pki = ds_net::tls::Pki::generate("move kill CA");
    let ca = root.join("ca.pem");
    std::fs::write(&ca, pki.ca_cert_pem()).unwrap();
    let secret = root.join("cluster.secret");
    write_private(&secret, b"move-kill-cluster-secret-0123456789abcdef");
    let ids = ["node-a", "node-b", "node-c"];
    let ports: Vec<(u16, u16, u16, u16, u16)> = (0..3)
        .map(|i| {
            let ip = node_ip(i);
            (
                free_port(ip),
                free_port(ip),
                free_port(ip),
                free_port(ip),
                free_port(ip),
            )
        })
        .collect();
    let mut nodes = vec![];
    for (i, id) in ids.iter().enumerate() {
        let ip = node_ip(i);
        let (smtp, pop3, imap, minger, admin) = ports[i];
        let dir = root.join(id);
        std::fs::create_dir_all(dir.join("data")).unwrap();
        let (cert, key) = pki.issue(&["localhost", id], &[ip]);
        std::fs::write(dir.join("cert.pem"), cert).unwrap();
        write_private(&dir.join("key.pem"), &key);
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
metrics = []

[tls]
cert = "{dir}/cert.pem"
key = "{dir}/key.pem"
cluster_ca = "{ca}"

[cluster]
secret_file = "{secret}"
"#,
            data = dir.join("data").display(),
            dir = dir.display(),
            ca = ca.display(),
            secret = secret.display(),
        );
        for (j, peer) in ids.iter().enumerate().filter(|&(j, _)| j != i) {
            toml.push_str(&format!(
                "\n[[cluster.peer]]\nid = \"{peer}\"\nminger = \"https://{}:{}\"\n",
                node_ip(j),
                ports[j].3
            ));
        }
        let config = dir.join("node.toml");
        std::fs::write(&config, toml).unwrap();
        nodes.push(Node {
            ip,
            config,
            smtp,
            pop3,
            admin,
        });
    }
    nodes
}

/// The pause file of the hook, and the environment that turns it on.
fn hook(root: &Path) -> (PathBuf, [(String, String); 2]) {
    let file = root.join("move-paused");
    let env = [
        (
            "DSHARE_TEST_MOVE_PAUSE_AFTER".to_string(),
            PAUSE_AFTER.to_string(),
        ),
        (
            "DSHARE_TEST_MOVE_PAUSE_FILE".to_string(),
            file.display().to_string(),
        ),
    ];
    (file, env)
}

fn start(node: &Node, env: &[(String, String)]) -> Serve {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    serve_env(&node.config, &node.addrs(), &env)
}

fn cli(node: &Node, args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.arg("-c")
        .arg(&node.config)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

fn cli_ok(node: &Node, args: &[&str]) -> String {
    let out = cli(node, args).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `MESSAGES` messages of 1–5 kB with distinct bodies, sent to `user` at `node` by SMTP.
fn seed(node: &Node, user: &str) {
    cli_ok(node, &["account", "add", user, "--password", PASS]);
    python(&format!(
        r#"
import smtplib
s = smtplib.SMTP("{ip}", {port}, timeout=30)
for i in range({MESSAGES}):
    body = "Subject: {user} {{0}}\r\n\r\n{{1}}\r\n".format(i, ("line %d of message %d\r\n" % (i, i)) * (40 + i % 160))
    s.sendmail("sender@elsewhere.org", ["{user}"], body)
s.quit()
"#,
        ip = node.ip,
        port = node.smtp
    ))
    .unwrap();
}

/// `user`'s INBOX over POP3 at `node`: the count, then the SHA-256 of each message, sorted.
fn pop3_view(node: &Node, user: &str) -> String {
    python(&format!(
        r#"
import poplib, hashlib
P = poplib.POP3("{ip}", {port}, timeout=30)
P.user("{user}")
P.pass_("{PASS}")
n = P.stat()[0]
hashes = sorted(hashlib.sha256(b"\r\n".join(P.retr(i)[1])).hexdigest() for i in range(1, n + 1))
P.quit()
print("count", n)
print("\n".join(hashes))
"#,
        ip = node.ip,
        port = node.pop3
    ))
    .unwrap()
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts `dshare account move USER --to node-c` on B and waits until the hook holds it.
fn move_until_paused(b: &Node, user: &str, pause: &Path) -> Child {
    let child = cli(b, &["account", "move", user, "--to", "node-c"])
        .spawn()
        .unwrap();
    wait_for("the move to pause", Duration::from_secs(60), || {
        pause.exists()
    });
    child
}

/// Runs the move again to its end, letting it go on each time the hook holds it.
fn move_to_the_end(b: &Node, user: &str, pause: &Path) -> String {
    let mut child = cli(b, &["account", "move", user, "--to", "node-c"])
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the move did not end");
        let _ = std::fs::remove_file(pause);
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// The summary's "N already there".
fn already_there(summary: &str) -> usize {
    let (before, _) = summary
        .split_once(" already there")
        .unwrap_or_else(|| panic!("no summary: {summary}"));
    before.rsplit(' ').next().unwrap().parse().unwrap()
}

#[test]
fn a_move_finishes_after_a_sigkill_of_the_old_owner_then_of_the_new_owner() {
    let root = tempfile::tempdir().unwrap();
    let nodes = cluster(root.path());
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    let (pause, env) = hook(root.path());
    let _a = start(a, &[]);
    let mut node_b = start(b, &env);
    let node_c = start(c, &[]);

    // 1. The old owner B is killed with the copy held after PAUSE_AFTER messages.
    let user = format!("kill-old@{DOMAIN}");
    seed(b, &user);
    let expected = pop3_view(a, &user);
    assert!(
        expected.starts_with(&format!("count {MESSAGES}\n")),
        "{expected}"
    );
    let started = Instant::now();
    let cli_run = move_until_paused(b, &user, &pause);
    node_b.kill();
    let out = cli_run.wait_with_output().unwrap();
    assert!(!out.status.success(), "the move went on without B: {out:?}");
    std::fs::remove_file(&pause).unwrap();
    node_b = start(b, &env);
    let summary = move_to_the_end(b, &user, &pause);
    assert!(
        summary.contains(&format!("moved {user} to node-c")),
        "{summary}"
    );
    assert!(already_there(&summary) >= PAUSE_AFTER, "{summary}");
    assert_eq!(pop3_view(a, &user), expected, "through A");
    assert_eq!(pop3_view(c, &user), expected, "on C");
    assert!(!cli_ok(b, &["account", "list"]).contains(&user));
    assert!(cli_ok(c, &["account", "list"]).contains(&user));
    eprintln!("killing the old owner: {:?}", started.elapsed());

    // 2. The new owner C is killed with B's copy held after PAUSE_AFTER messages.
    let user = format!("kill-new@{DOMAIN}");
    seed(b, &user);
    let expected = pop3_view(a, &user);
    assert!(
        expected.starts_with(&format!("count {MESSAGES}\n")),
        "{expected}"
    );
    let started = Instant::now();
    let cli_run = move_until_paused(b, &user, &pause);
    node_c.kill();
    std::fs::remove_file(&pause).unwrap();
    let out = cli_run.wait_with_output().unwrap();
    assert!(!out.status.success(), "the move went on without C: {out:?}");
    // B still serves the account, nothing frozen.
    assert_eq!(pop3_view(b, &user), expected, "on B after C died");
    let _node_c = start(c, &[]);
    let summary = move_to_the_end(b, &user, &pause);
    assert!(
        summary.contains(&format!("moved {user} to node-c")),
        "{summary}"
    );
    assert!(already_there(&summary) >= PAUSE_AFTER, "{summary}");
    assert_eq!(pop3_view(a, &user), expected, "through A");
    assert!(!cli_ok(b, &["account", "list"]).contains(&user));
    eprintln!("killing the new owner: {:?}", started.elapsed());
    drop(node_b);
}
