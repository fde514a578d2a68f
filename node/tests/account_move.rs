//! `dshare account move` with the real CLI against in-process test clusters: cancelling a
//! move that died (`--abort`), and what `dshare doctor` says about it.

use std::time::Duration;

use ds_testkit::Cluster;
use dshare_e2e::{Smtp, eventually, python};

mod common;
use common::{cli_config, dshare, ok};

const PASS: &str = "mover-pass";

/// An account on B with 12 messages in INBOX and `Work`, some with flags and keywords.
async fn seed(c: &Cluster, user: &str) -> anyhow::Result<()> {
    dshare_e2e::seed_small_account(c, 1, user, PASS, 12).await
}

/// `(mailbox, uid, flags)` of every message of `user` in `mail`.
fn view(mail: &ds_store::MailStore, user: &str) -> anyhow::Result<Vec<(String, u32, Vec<String>)>> {
    let mut out = vec![];
    for info in mail.list_mailboxes(user)? {
        for m in mail.messages(user, &info.name)? {
            out.push((info.name.clone(), m.uid, m.flags));
        }
    }
    Ok(out)
}

/// The count of `user`'s INBOX over POP3 at `addr`.
fn pop3_count(addr: std::net::SocketAddr, user: &str) -> anyhow::Result<String> {
    Ok(python(&format!(
        "import poplib\nP = poplib.POP3('{}', {}, timeout=30)\nP.user('{user}')\nP.pass_('{PASS}')\nprint(P.stat()[0])\nP.quit()\n",
        addr.ip(),
        addr.port()
    ))?
    .trim()
    .to_string())
}

/// B dies with the account frozen and half copied to C. `dshare doctor` names the frozen
/// account with the two ways out; `dshare account move --abort` (run on A, which asks the
/// node that has the move) unfreezes it on B, C drops
/// its partial copy (no trace left), mail and logins work on B again, and a later move runs
/// cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_move_that_died_frozen_is_aborted_and_nothing_is_lost() -> anyhow::Result<()> {
    let mut c = Cluster::start(3).await?;
    let user = "frozen@example.com";
    seed(&c, user).await?;
    let before = view(&c.node(1).node().state.mail, user)?;
    let b = c.node(1).node().state.clone();
    b.locator.stop_moves_at(Some("frozen"));
    assert!(b.move_account(user, "node-c", false).await.is_err());
    drop(b);
    // B dies there and comes back: still frozen, C holds a partial copy.
    c.node_mut(1).stop().await;
    c.node_mut(1).restart().await?;
    let b = c.node(1).node().state.clone();
    let cn = c.node(2).node().state.clone();
    assert!(b.mail.is_frozen(user)?);
    assert!(!cn.mail.list_mailboxes(user)?.is_empty());

    let dir = tempfile::tempdir()?;
    let cfg = cli_config(dir.path(), &c.node(1).data_dir(), c.node(1).admin());
    let doctor = dshare(&cfg, &["doctor"]).await;
    let text = String::from_utf8_lossy(&doctor.stdout);
    assert!(!doctor.status.success(), "{text}");
    let line = text
        .lines()
        .find(|l| l.contains(user))
        .unwrap_or_else(|| panic!("no line for {user}: {text}"));
    assert!(line.contains("FROZEN"), "{line}");
    assert!(
        line.contains(&format!("dshare account move {user} --to node-c")),
        "{line}"
    );
    assert!(
        line.contains(&format!("dshare account move {user} --abort")),
        "{line}"
    );

    // Through A, which cannot locate the frozen account: it finds the node with the move.
    let dir_a = tempfile::tempdir()?;
    let cfg_a = cli_config(dir_a.path(), &c.node(0).data_dir(), c.node(0).admin());
    let out = ok(&cfg_a, &["account", "move", user, "--abort"]).await;
    assert!(out.contains("aborted the move"), "{out}");
    let boxes = b.mail.list_mailboxes(user)?.len();
    assert!(
        out.contains(&format!(
            "node-c dropped its partial copy ({boxes} mailboxes, 12 messages)"
        )),
        "{out}"
    );

    // B: as before the move, and working.
    assert!(!b.mail.is_frozen(user)?);
    assert!(b.locator.move_record(user)?.is_none());
    assert_eq!(view(&b.mail, user)?, before);
    // C: no trace.
    assert!(cn.directory.account(user)?.is_none());
    assert!(cn.mail.list_mailboxes(user)?.is_empty());
    assert!(!cn.mail.is_provisioned(user)?);
    assert!(cn.locator.reservation(user)?.is_none());
    // Mail through A reaches B; POP3 through A and B logs in there.
    let mut s = Smtp::connect(c.node(0).smtp()).await?;
    let r = s
        .send(
            "sender@example.org",
            &[user],
            b"Subject: after\r\n\r\nafter the abort\r\n",
        )
        .await?;
    assert!(r.iter().all(|r| r.is(250)), "{r:?}");
    s.quit().await?;
    assert!(
        eventually(Duration::from_secs(30), || c.node(1).inbox_len(user) == 5).await,
        "B has {} of 5",
        c.node(1).inbox_len(user)
    );
    assert_eq!(pop3_count(c.node(0).pop3(), user)?, "5");
    assert_eq!(pop3_count(c.node(1).pop3(), user)?, "5");
    // doctor is content again; nothing is left to abort.
    let doctor = dshare(&cfg, &["doctor"]).await;
    let text = String::from_utf8_lossy(&doctor.stdout);
    assert!(doctor.status.success(), "{text}");
    assert!(!text.contains(user), "{text}");
    let again = dshare(&cfg, &["account", "move", user, "--abort"]).await;
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("no move of"),
        "{again:?}"
    );
    // A new move runs cleanly from the start.
    let report = b.move_account(user, "node-c", false).await?;
    assert_eq!((report.copied, report.skipped), (13, 0), "{report:?}");
    assert!(cn.directory.account(user)?.is_some());
    c.shutdown().await;
    Ok(())
}

/// `n` messages of about 3 kB in `user`'s INBOX on B.
async fn seed_many(c: &Cluster, user: &str, n: usize) -> anyhow::Result<()> {
    c.node(1).add_account(user, PASS).await?;
    let mail = &c.node(1).node().state.mail;
    for i in 0..n {
        mail.append(
            user,
            "INBOX",
            &dshare_e2e::message(&format!("{user}-{i}"), 3000),
            &[],
            1_700_000_000,
        )?;
    }
    c.node(1).node().state.store.flush_async().await?;
    Ok(())
}

/// The progress lines of a move's output, checked: counts never go back, the last one is
/// the whole; returns how many there are.
fn check_progress(text: &str, n: usize) -> usize {
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("progress: "))
        .collect();
    let done: Vec<usize> = lines
        .iter()
        .map(|l| {
            l["progress: ".len()..]
                .split('/')
                .next()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    assert!(done.windows(2).all(|w| w[0] <= w[1]), "{text}");
    let last = lines
        .last()
        .unwrap_or_else(|| panic!("no progress: {text}"));
    assert!(
        last.starts_with(&format!("progress: {n}/{n} messages, ")),
        "{text}"
    );
    assert!(
        last.contains("(100%)") && last.ends_with("ETA 0s"),
        "{text}"
    );
    assert!(
        last.contains(" messages/s, ") && last.contains(" MB/s"),
        "{text}"
    );
    lines.len()
}

/// `dshare account move` on the owner shows its progress (plain lines when not on a
/// terminal), then the summary; with `--json` the progress goes to standard error and the
/// summary as JSON to standard output.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_cli_shows_the_progress_then_the_summary() -> anyhow::Result<()> {
    const N: usize = 300;
    let c = Cluster::start(3).await?;
    let dir = tempfile::tempdir()?;
    let cfg = cli_config(dir.path(), &c.node(1).data_dir(), c.node(1).admin());
    let user = "progress@example.com";
    seed_many(&c, user, N).await?;
    let out = ok(&cfg, &["account", "move", user, "--to", "node-c"]).await;
    let lines = check_progress(&out, N);
    assert!(lines >= 2, "{out}");
    let summary: Vec<&str> = out
        .lines()
        .skip_while(|l| l.starts_with("progress: "))
        .collect();
    assert!(
        summary[0].starts_with(&format!("moved {user} to node-c: ")),
        "{out}"
    );
    assert!(
        summary[1].starts_with(&format!("copied {N} messages, ")),
        "{out}"
    );
    assert_eq!(c.node(2).inbox_len(user), N);

    let user = "progress-json@example.com";
    seed_many(&c, user, N).await?;
    let out = dshare(&cfg, &["account", "move", user, "--to", "node-c", "--json"]).await;
    assert!(out.status.success(), "{out:?}");
    check_progress(&String::from_utf8_lossy(&out.stderr), N);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(report["copied"], N, "{report}");
    assert_eq!(report["to"], "node-c", "{report}");

    // On a terminal the line is redrawn in place.
    let user = "progress-tty@example.com";
    seed_many(&c, user, N).await?;
    let cfg_arg = cfg.display().to_string();
    let (status, text) = tokio::task::spawn_blocking(move || {
        dshare_e2e::on_terminal(
            std::path::Path::new(common::BIN),
            &["-c", &cfg_arg, "account", "move", user, "--to", "node-c"],
        )
    })
    .await??;
    assert!(status.success(), "{text}");
    let drawn: Vec<&str> = text
        .split('\r')
        .filter(|l| l.starts_with("progress: "))
        .collect();
    assert!(drawn.len() >= 2, "{text:?}");
    assert!(drawn.iter().all(|l| l.contains("\x1b[K")), "{text:?}");
    assert!(
        drawn[..drawn.len() - 1].iter().all(|l| !l.contains('\n')),
        "a line ended before the last: {text:?}"
    );
    assert!(
        drawn
            .last()
            .unwrap()
            .starts_with(&format!("progress: {N}/{N} messages")),
        "{text:?}"
    );
    assert!(
        text.contains(&format!("moved {user} to node-c: ")),
        "{text:?}"
    );
    c.shutdown().await;
    Ok(())
}

/// `dshare account move` on a node that does not own the account: it asks the owner over
/// Minger, the owner runs the move, and the CLI shows the same progress and summary; an
/// unknown account is refused there as on the owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_move_run_on_another_node_is_run_by_the_owner() -> anyhow::Result<()> {
    const N: usize = 200;
    let c = Cluster::start(3).await?;
    let dir = tempfile::tempdir()?;
    // The CLI talks to A; the account lives on B and goes to C.
    let cfg = cli_config(dir.path(), &c.node(0).data_dir(), c.node(0).admin());
    let user = "remote-run@example.com";
    seed_many(&c, user, N).await?;
    let dry = ok(
        &cfg,
        &["account", "move", user, "--to", "node-c", "--dry-run"],
    )
    .await;
    assert!(
        dry.contains(&format!("would move {user} to node-c")),
        "{dry}"
    );
    assert!(c.node(1).node().state.directory.account(user)?.is_some());
    let out = ok(&cfg, &["account", "move", user, "--to", "node-c"]).await;
    check_progress(&out, N);
    assert!(
        out.contains(&format!("moved {user} to node-c: "))
            && out.contains(&format!("copied {N} messages, ")),
        "{out}"
    );
    assert!(c.node(1).node().state.directory.account(user)?.is_none());
    assert!(c.node(2).node().state.directory.account(user)?.is_some());
    assert_eq!(c.node(2).inbox_len(user), N);
    assert_eq!(pop3_count(c.node(0).pop3(), user)?, N.to_string());
    let refused = dshare(
        &cfg,
        &["account", "move", "nobody@example.com", "--to", "node-c"],
    )
    .await;
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("no account nobody@example.com"),
        "{refused:?}"
    );
    c.shutdown().await;
    Ok(())
}
