//! An account move survives a SIGKILL of a real `dshare serve` process: three node
//! processes (TLS with a generated CA, one cluster secret); the old owner B, then the new
//! owner C, is killed in the middle of the copy (the test-only hook
//! `DSHARE_TEST_MOVE_PAUSE_AFTER` holds B's copy after that many messages), restarted, and
//! the same `dshare account move` run again finishes the move. POP3 through the third node A
//! then shows every message once: the same count and the same bodies by SHA-256.

use ds_testkit::OutputWithin;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dshare_e2e::processes::{DOMAIN, ProcessNode as Node, own_minger, write_configs};
use dshare_e2e::python;

mod common;
use common::{BIN, Serve, serve_env};

/// Messages per account.
const MESSAGES: usize = 300;
/// Where the hook holds the old owner's copy.
const PAUSE_AFTER: usize = 100;
const PASS: &str = "kill-pass";

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
    let addrs = [node.smtp, node.pop3, node.admin].map(|p| node.addr(p));
    serve_env(&node.config, &addrs, &env)
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
    let out = cli(node, args).output_bounded().unwrap();
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

/// Seeds `user` on B; returns its POP3 view through A.
fn seeded(a: &Node, b: &Node, user: &str) -> String {
    seed(b, user);
    let expected = pop3_view(a, user);
    assert!(
        expected.starts_with(&format!("count {MESSAGES}\n")),
        "{expected}"
    );
    expected
}

/// The move of `user` finished (`summary`): C owns it, B does not, and POP3 through A and
/// on C shows `expected`.
fn moved(nodes: &[Node], user: &str, summary: &str, expected: &str) {
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    assert!(
        summary.contains(&format!("moved {user} to node-c")),
        "{summary}"
    );
    assert_eq!(pop3_view(a, user), expected, "through A");
    assert_eq!(pop3_view(c, user), expected, "on C");
    assert!(!cli_ok(b, &["account", "list"]).contains(user));
    assert!(cli_ok(c, &["account", "list"]).contains(user));
}

#[test]
fn a_move_finishes_after_a_sigkill_of_the_old_owner_then_of_the_new_owner() {
    let root = tempfile::tempdir().unwrap();
    let nodes = write_configs(root.path(), 3, own_minger, "").unwrap();
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    let (pause, env) = hook(root.path());
    let _a = start(a, &[]);
    let mut node_b = start(b, &env);
    let node_c = start(c, &[]);

    // 1. The old owner B is killed with the copy held after PAUSE_AFTER messages.
    let user = format!("kill-old@{DOMAIN}");
    let expected = seeded(a, b, &user);
    let started = Instant::now();
    let cli_run = move_until_paused(b, &user, &pause);
    node_b.kill();
    let out = cli_run.wait_with_output().unwrap();
    assert!(!out.status.success(), "the move went on without B: {out:?}");
    std::fs::remove_file(&pause).unwrap();
    node_b = start(b, &env);
    let summary = move_to_the_end(b, &user, &pause);
    // What B had sent before it died was on C's disk (C flushes at each MoveSync, and
    // its store on its own within moments) and is not sent again.
    assert!(already_there(&summary) > 0, "{summary}");
    moved(&nodes, &user, &summary, &expected);
    eprintln!("killing the old owner: {:?}", started.elapsed());

    // 2. The new owner C is killed with B's copy held; B goes on and fails while C is down,
    //    and the account stays B's, not frozen.
    let user = format!("kill-new@{DOMAIN}");
    let expected = seeded(a, b, &user);
    let started = Instant::now();
    let cli_run = move_until_paused(b, &user, &pause);
    node_c.kill();
    std::fs::remove_file(&pause).unwrap();
    let out = cli_run.wait_with_output().unwrap();
    assert!(!out.status.success(), "the move went on without C: {out:?}");
    assert_eq!(pop3_view(b, &user), expected, "on B after C died");
    let _node_c = start(c, &[]);
    let summary = move_to_the_end(b, &user, &pause);
    moved(&nodes, &user, &summary, &expected);
    eprintln!("killing the new owner: {:?}", started.elapsed());

    drop(node_b);
}
