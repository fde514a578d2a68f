//! The `dshare` binary end to end: a real node process, driven by the real CLI.

use ds_testkit::OutputWithin;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

mod common;
use common::{BIN, free_port, serve};

/// A config with two domains on 127.0.0.1 (company.com, main) and 127.0.0.2 (client1.com),
/// plus client2.com with no address: the CommuniGate Pro multihoming sample.
fn write_config(dir: &Path, admin: u16) -> std::path::PathBuf {
    let path = dir.join("node.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[node]
id = "office-a"
data_dir = "{data}"
main_domain = "company.com"

[[domain]]
name = "company.com"
addresses = ["127.0.0.1"]

[[domain]]
name = "client1.com"
addresses = ["127.0.0.2"]

[[domain]]
name = "client2.com"

[listen]
smtp = []
pop3 = []
imap = []
submission = []
submissions = []
minger = []
admin = ["127.0.0.1:{admin}"]
metrics = []
"#,
            data = dir.join("data").display()
        ),
    )
    .unwrap();
    path
}

fn dshare(config: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(BIN)
        .arg("-c")
        .arg(config)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        let mut input = child.stdin.take().unwrap();
        if let Some(s) = stdin {
            input.write_all(s.as_bytes()).unwrap();
        }
    }
    child.wait_with_output().unwrap()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// `dshare serve --config cfg` fails at start: its error output.
fn serve_refused(cfg: &Path) -> String {
    let out = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(cfg)
        .output_bounded()
        .unwrap();
    err(&out)
}

fn err(out: &Output) -> String {
    assert!(!out.status.success(), "unexpectedly succeeded");
    String::from_utf8(out.stderr.clone()).unwrap()
}

#[test]
fn accounts_survive_restart_and_bad_input_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let admin = free_port();
    let cfg = write_config(dir.path(), admin);
    let node = serve(&cfg, &[admin]);

    let out = dshare(
        &cfg,
        &["account", "add", "info", "--password-stdin"],
        Some("s3cret\n"),
    );
    assert_eq!(ok(&out).trim(), "created info@company.com");
    let long = format!("{}@company.com", "a".repeat(300));
    let bad: &[(&[&str], &str)] = &[
        (&["account", "add", "", "--password", "x"], "empty name"),
        (
            &["account", "add", "@", "--password", "x"],
            "empty local part",
        ),
        (
            &["account", "add", "a@@b", "--password", "x"],
            "not allowed",
        ),
        (
            &["account", "add", &long, "--password", "x"],
            "longer than 64",
        ),
        (
            &["account", "add", "a\u{1}b", "--password", "x"],
            "control character",
        ),
        (
            &["account", "add", "x@unknown.org", "--password", "x"],
            "not served",
        ),
        (
            &["account", "add", "INFO@company.com", "--password", "x"],
            "exists as an account",
        ),
        (&["account", "add", "nopass"], "--password-stdin"),
    ];
    for (args, want) in bad {
        let e = err(&dshare(&cfg, args, None));
        assert!(e.contains(want), "{args:?}: {e}");
    }
    ok(&dshare(&cfg, &["route", "add", "<a>", "b"], None));
    let e = err(&dshare(&cfg, &["route", "add", "<b>", "a"], None));
    assert!(e.contains("routing loop"), "{e}");
    assert_eq!(
        ok(&dshare(&cfg, &["route", "list"], None)).lines().count(),
        1
    );
    assert_eq!(
        ok(&dshare(&cfg, &["account", "list"], None)).trim(),
        "info@company.com"
    );

    // Moves that cannot go ahead say why and change nothing.
    let moves: &[(&[&str], &str)] = &[
        (
            &["account", "move", "info", "--to", "node-z", "--dry-run"],
            "unknown node \"node-z\"",
        ),
        (
            &["account", "move", "info", "--to", "node-z"],
            "unknown node",
        ),
        (
            &["account", "move", "nobody", "--to", "node-z"],
            "unknown node",
        ),
    ];
    for (args, want) in moves {
        let e = err(&dshare(&cfg, args, None));
        assert!(e.contains(want), "{args:?}: {e}");
    }
    assert_eq!(
        ok(&dshare(&cfg, &["account", "list"], None)).trim(),
        "info@company.com"
    );

    // A restart keeps the account.
    drop(node);
    let _node = serve(&cfg, &[admin]);
    assert_eq!(
        ok(&dshare(&cfg, &["account", "list"], None)).trim(),
        "info@company.com"
    );
}

#[test]
fn lookup_shows_the_communigate_samples() {
    let dir = tempfile::tempdir().unwrap();
    let admin = free_port();
    let cfg = write_config(dir.path(), admin);
    let _node = serve(&cfg, &[admin]);
    for a in [
        "info@company.com",
        "info@client1.com",
        "info%client2.com",
        "j.smith@client1.com",
    ] {
        ok(&dshare(
            &cfg,
            &["account", "add", a, "--password", "pw"],
            None,
        ));
    }
    ok(&dshare(
        &cfg,
        &["account", "add", "john", "--password", "pw"],
        None,
    ));
    ok(&dshare(&cfg, &["alias", "add", "john_smith", "john"], None));

    let look = |args: &[&str]| {
        let mut a = vec!["lookup"];
        a.extend_from_slice(args);
        ok(&dshare(&cfg, &a, None))
    };
    let out = look(&["info", "--local-ip", "127.0.0.1"]);
    assert!(
        out.contains("local IP") && out.contains("outcome: account info@company.com"),
        "{out}"
    );
    let out = look(&["info", "--local-ip", "127.0.0.2"]);
    assert!(out.contains("outcome: account info@client1.com"), "{out}");
    let out = look(&["info%client2.com", "--local-ip", "127.0.0.1"]);
    assert!(
        out.contains("full name") && out.contains("outcome: account info@client2.com"),
        "{out}"
    );
    let out = look(&[
        "info",
        "--local-ip",
        "127.0.0.1",
        "--sni",
        "mail.client2.com",
    ]);
    assert!(
        out.contains("TLS SNI") && out.contains("outcome: account info@client2.com"),
        "{out}"
    );
    let out = look(&["john_smith"]);
    assert!(
        out.contains("alias") && out.contains("outcome: account john@company.com"),
        "{out}"
    );

    // The account moves to client1.com as j.smith.
    ok(&dshare(&cfg, &["account", "del", "john"], None));
    ok(&dshare(
        &cfg,
        &["route", "add", "<john>", "j.smith@client1.com"],
        None,
    ));
    let out = look(&["john", "--local-ip", "127.0.0.1"]);
    assert!(
        out.contains("router") && out.contains("outcome: account j.smith@client1.com"),
        "{out}"
    );
    let out = look(&["nobody"]);
    assert!(out.contains("outcome: unknown nobody@company.com"), "{out}");
    let e = err(&dshare(
        &cfg,
        &["lookup", "info", "--local-ip", "banana"],
        None,
    ));
    assert!(e.contains("banana"), "{e}");
}

#[test]
fn malformed_config_is_refused_with_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "[node]\nid = \"x\"\nmain_domian = \"a.com\"\n").unwrap();
    let e = serve_refused(&cfg);
    assert!(e.contains("main_domian"), "{e}");
    std::fs::write(&cfg, "[node\n").unwrap();
    serve_refused(&cfg);
}

#[test]
fn wrong_admin_token_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let admin = free_port();
    let cfg = write_config(dir.path(), admin);
    let _node = serve(&cfg, &[admin]);
    std::fs::write(dir.path().join("data/admin.token"), "not-the-token").unwrap();
    let e = err(&dshare(&cfg, &["account", "list"], None));
    assert!(e.contains("bad admin token"), "{e}");
}

#[test]
fn json_logs() {
    let dir = tempfile::tempdir().unwrap();
    let admin = free_port();
    let cfg = write_config(dir.path(), admin);
    let mut child = Command::new(BIN)
        .args(["--log-format", "json", "serve", "--config"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut first = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stderr), &mut first).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        first.trim_start().starts_with('{') && first.contains("\"level\""),
        "{first}"
    );
}

#[test]
fn sigterm_drains_and_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let admin = free_port();
    let cfg = write_config(dir.path(), admin);
    let mut node = serve(&cfg, &[admin]);
    let pid = node.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let status = loop {
        if let Some(status) = node.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still running after SIGTERM"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
}

/// A node config using the files `dshare pki` wrote in `pki` (cert and key of `cert_of` and
/// `key_of`), the cluster CA `ca` and the secret file `secret`.
fn tls_config(dir: &Path, cert: &Path, key: &Path, ca: &Path, secret: &Path) -> std::path::PathBuf {
    let path = dir.join("tls.toml");
    let (p1, p2) = (free_port(), free_port());
    std::fs::write(
        &path,
        format!(
            r#"
[node]
id = "node-a"
advertise = "node-a"
data_dir = "{data}"
main_domain = "company.com"

[listen]
smtp = ["127.0.0.1:{p1}"]
pop3 = []
imap = []
submission = []
submissions = []
minger = []
admin = ["127.0.0.1:{p2}"]
metrics = []

[tls]
cert = "{cert}"
key = "{key}"
cluster_ca = "{ca}"

[cluster]
secret_file = "{secret}"

[[cluster.peer]]
id = "node-b"
minger = "https://node-b:4069"
"#,
            data = dir.join("data").display(),
            cert = cert.display(),
            key = key.display(),
            ca = ca.display(),
            secret = secret.display(),
        ),
    )
    .unwrap();
    path
}

#[test]
fn check_config_names_each_problem_with_its_fix() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    let other = dir.path().join("other");
    for (out, nodes) in [(&pki, &["node-a", "node-b"][..]), (&other, &["x"][..])] {
        let st = Command::new(BIN)
            .arg("pki")
            .arg("--out")
            .arg(out)
            .args(nodes)
            .output_bounded()
            .unwrap();
        assert!(
            st.status.success(),
            "{}",
            String::from_utf8_lossy(&st.stderr)
        );
    }
    let check = |cfg: &Path| {
        Command::new(BIN)
            .arg("check-config")
            .arg(cfg)
            .output_bounded()
            .unwrap()
    };
    // A good configuration.
    let good = tls_config(
        dir.path(),
        &pki.join("node-a.cert.pem"),
        &pki.join("node-a.key.pem"),
        &pki.join("ca.pem"),
        &pki.join("cluster.secret"),
    );
    let out = ok(&check(&good));
    assert!(out.contains("no problems found"), "{out}");

    // Wrong key for the certificate, a short secret, a CA that did not issue the certificate.
    let short = dir.path().join("short.secret");
    std::fs::write(&short, "tooshort").unwrap();
    let bad = tls_config(
        dir.path(),
        &pki.join("node-a.cert.pem"),
        &pki.join("node-b.key.pem"),
        &other.join("ca.pem"),
        &short,
    );
    let out = check(&bad);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("does not match the certificate"), "{text}");
    assert!(text.contains("8 characters; at least 16"), "{text}");
    assert!(
        text.contains("did not issue this node's certificate"),
        "{text}"
    );
    assert_eq!(text.matches("  fix: ").count(), 3, "{text}");

    // `serve` refuses the same configuration, naming the problems.
    let e = serve_refused(&bad);
    assert!(
        e.contains("does not match the certificate") && e.contains("check-config"),
        "{e}"
    );

    // A port in use is named by check-config.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let text = std::fs::read_to_string(&good).unwrap();
    let smtp_line = text
        .lines()
        .find(|l| l.starts_with("smtp = "))
        .unwrap()
        .to_string();
    std::fs::write(
        &good,
        text.replace(&smtp_line, &format!("smtp = [\"127.0.0.1:{port}\"]")),
    )
    .unwrap();
    let out = check(&good);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        text.contains(&format!("listen.smtp: cannot bind 127.0.0.1:{port}")),
        "{text}"
    );
}

/// Runs a python3 smtplib script; returns its output.
fn python(script: &str) -> String {
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .output_bounded()
        .unwrap();
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn rcpt_codes(port: u16, rcpts: &[&str]) -> Vec<u16> {
    let list: Vec<String> = rcpts.iter().map(|r| format!("{r:?}")).collect();
    let out = python(&format!(
        r#"
import smtplib
s = smtplib.SMTP("127.0.0.1", {port}, timeout=20)
s.ehlo("client.example.net")
s.mail("someone@example.net")
for r in [{}]:
    print(s.rcpt(r)[0])
s.quit()
"#,
        list.join(", ")
    ));
    out.lines().map(|l| l.trim().parse().unwrap()).collect()
}

#[test]
fn postmaster_and_abuse_go_to_the_operator_address() {
    let dir = tempfile::tempdir().unwrap();
    let admin = free_port();
    let smtp = free_port();
    let cfg = write_config(dir.path(), admin);
    let text = std::fs::read_to_string(&cfg).unwrap();
    let text = text
        .replace("smtp = []", &format!("smtp = [\"127.0.0.1:{smtp}\"]"))
        .replace(
            "main_domain = \"company.com\"",
            "main_domain = \"company.com\"\npostmaster = \"ops@company.com\"",
        );
    std::fs::write(&cfg, text).unwrap();
    let _node = serve(&cfg, &[admin, smtp]);
    ok(&dshare(
        &cfg,
        &["account", "add", "ops", "--password", "pw"],
        None,
    ));
    ok(&dshare(
        &cfg,
        &["account", "add", "abuse@client1.com", "--password", "pw"],
        None,
    ));
    let codes = rcpt_codes(
        smtp,
        &[
            "postmaster",
            "Postmaster@company.com",
            "postmaster@client1.com",
            "abuse@client2.com",
            "nobody@company.com",
        ],
    );
    assert_eq!(codes, [250, 250, 250, 250, 550]);
    let out = ok(&dshare(&cfg, &["lookup", "abuse@client2.com"], None));
    assert!(
        out.contains("postmaster") && out.contains("outcome: account ops@company.com"),
        "{out}"
    );
    // An account of that name wins over the implicit record.
    let out = ok(&dshare(&cfg, &["lookup", "abuse@client1.com"], None));
    assert!(out.contains("outcome: account abuse@client1.com"), "{out}");
}

#[test]
fn embedded_defaults_accept_postmaster_on_a_fresh_node() {
    // The embedded defaults listen on fixed loopback ports.
    for port in [2525u16, 1110, 1143, 4069, 4070, 9100] {
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
            eprintln!("SKIPPED: port {port} is in use, cannot run the embedded defaults here");
            return;
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let child = Command::new(BIN)
        .arg("serve")
        .current_dir(dir.path())
        .env_remove("DSHARE_CONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _node = common::Serve(child);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", 2525)).is_err() {
        assert!(std::time::Instant::now() < deadline, "node did not start");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // The account is made just after the listeners open.
    std::thread::sleep(std::time::Duration::from_millis(500));
    let codes = rcpt_codes(
        2525,
        &[
            "<postmaster>",
            "postmaster@example.com",
            "abuse@example.com",
            "x@example.com",
        ],
    );
    assert_eq!(codes, [250, 250, 250, 550]);
}

#[test]
fn dkim_generate_writes_a_private_key_and_check_config_reads_it() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("company.pem");
    let generate = || {
        Command::new(BIN)
            .args([
                "dkim",
                "generate",
                "Company.com",
                "--selector",
                "s1",
                "--out",
            ])
            .arg(&key)
            .output_bounded()
            .unwrap()
    };
    let record = ok(&generate());
    assert!(
        record.starts_with("s1._domainkey.company.com. IN TXT \"v=DKIM1; k=rsa; p="),
        "{record}"
    );
    // A 2048-bit key does not fit one DNS string: several, each at most 255 characters.
    let strings: Vec<&str> = record.trim_end().split('"').skip(1).step_by(2).collect();
    assert!(
        strings.len() >= 2 && strings.iter().all(|s| s.len() <= 255),
        "{record}"
    );
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let pem = std::fs::read_to_string(&key).unwrap();
    assert!(pem.starts_with("-----BEGIN RSA PRIVATE KEY-----"), "{pem}");
    // A key is never overwritten.
    let e = err(&generate());
    assert!(e.contains("exists"), "{e}");
    assert_eq!(std::fs::read_to_string(&key).unwrap(), pem);

    // check-config takes the key, and names an unreadable one with its fix.
    let cfg = write_config(dir.path(), free_port());
    let base = std::fs::read_to_string(&cfg).unwrap();
    let with_key = |path: &Path| {
        std::fs::write(
            &cfg,
            format!(
                "{base}\n[outbound]\ndkim = [{{ domain = \"company.com\", selector = \"s1\", key_file = \"{}\" }}]\n",
                path.display()
            ),
        )
        .unwrap();
        Command::new(BIN)
            .arg("check-config")
            .arg(&cfg)
            .output_bounded()
            .unwrap()
    };
    let out = ok(&with_key(&key));
    assert!(out.contains("no problems found"), "{out}");
    let out = with_key(&dir.path().join("missing.pem"));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("DKIM key for company.com") && text.contains("cannot read it"),
        "{text}"
    );
    assert!(text.contains("dshare dkim generate company.com"), "{text}");
    // `serve` refuses it too.
    let e = serve_refused(&cfg);
    assert!(e.contains("DKIM key for company.com"), "{e}");
}
