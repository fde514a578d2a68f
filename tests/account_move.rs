//! Moving an account with its mail from node B to node C (DESIGN.md §11), checked through
//! every node with Python's imaplib and poplib, while mail for it keeps arriving through A.

use std::net::SocketAddr;
use std::time::Duration;

use ds_cluster::{Location, Purpose};
use ds_testkit::Cluster;
use dshare_e2e::{Smtp, eventually, python};

const USER: &str = "mover@example.com";
const PASS: &str = "mover-pass";
/// Messages seeded per folder (three folders).
const PER_FOLDER: usize = 250;
/// Messages sent through A while the move runs.
const DURING: usize = 8;

async fn cluster() -> anyhow::Result<Cluster> {
    Cluster::start_with(3, |_, c| {
        c.smtp.retry_base = Duration::from_millis(500);
        c.smtp.retry_max = Duration::from_secs(1);
    })
    .await
}

/// Every folder, every message (UID, flags without `\Recent`, SHA-256 of the whole message),
/// one line each, sorted; as seen over IMAP at `addr`.
fn imap_view(addr: SocketAddr) -> anyhow::Result<String> {
    imap_view_of(addr, USER, PASS)
}

fn imap_view_of(addr: SocketAddr, user: &str, pass: &str) -> anyhow::Result<String> {
    python(&format!(
        r#"
import imaplib, hashlib, re
M = imaplib.IMAP4("{ip}", {port}, timeout=30)
M.login("{user}", "{pw}")
out = []
for line in M.list()[1]:
    name = line.decode().rsplit(' "/" ', 1)[1].strip('"')
    typ, data = M.select('"%s"' % name, readonly=True)
    st = M.status('"%s"' % name, "(UIDVALIDITY)")[1][0].decode()
    out.append("box %s %s %s" % (name, data[0].decode(), re.search(r"UIDVALIDITY (\d+)", st).group(1)))
    if int(data[0]) == 0:
        continue
    typ, data = M.uid("FETCH", "1:*", "(FLAGS BODY.PEEK[])")
    for item in data:
        if not isinstance(item, tuple):
            continue
        head = item[0].decode()
        uid = re.search(r"UID (\d+)", head).group(1)
        flags = sorted(f for f in re.search(r"FLAGS \(([^)]*)\)", head).group(1).split() if f != "\\Recent")
        out.append("msg %s %s %s %s" % (name, uid, ",".join(flags), hashlib.sha256(item[1]).hexdigest()))
M.logout()
print("\n".join(sorted(out)))
"#,
        ip = addr.ip(),
        port = addr.port(),
        user = user,
        pw = pass
    ))
}

/// The INBOX over POP3 at `addr`: count, then each message's SHA-256, in order.
fn pop3_view(addr: SocketAddr) -> anyhow::Result<String> {
    python(&format!(
        r#"
import poplib, hashlib
P = poplib.POP3("{ip}", {port}, timeout=30)
P.user("{user}")
P.pass_("{pw}")
n, size = P.stat()
print("count", n)
for i in range(1, n + 1):
    lines = P.retr(i)[1]
    print(hashlib.sha256(b"\r\n".join(lines) + b"\r\n").hexdigest())
P.quit()
"#,
        ip = addr.ip(),
        port = addr.port(),
        user = USER,
        pw = PASS
    ))
}

/// Seeds three folders on B: INBOX by SMTP through A, `Work` and `Archive/2025` (and its
/// parent) by the store with flags and keywords.
async fn seed(c: &Cluster) -> anyhow::Result<()> {
    c.node(1).add_account(USER, PASS).await?;
    let mut s = Smtp::connect(c.node(0).smtp()).await?;
    for i in 0..5 {
        let body = dshare_e2e::message(&format!("inbox-{i}"), 300 + i * 50);
        let r = s.send("sender@example.org", &[USER], &body).await?;
        anyhow::ensure!(r.iter().all(|r| r.is(250)), "{r:?}");
    }
    s.quit().await?;
    let b = &c.node(1).node().state;
    anyhow::ensure!(
        eventually(Duration::from_secs(20), || c.node(1).inbox_len(USER) == 5).await,
        "seed mail did not arrive"
    );
    let mail = &b.mail;
    mail.create_mailbox(USER, "Work", None)?;
    mail.create_mailbox(USER, "Archive/2025", None)?;
    mail.set_subscription(USER, "Work", true)?;
    for i in 0..PER_FOLDER {
        let flags: Vec<String> = match i % 4 {
            0 => vec!["\\Seen".into()],
            1 => vec!["\\Seen".into(), "\\Flagged".into(), "$Label1".into()],
            2 => vec!["Project-X".into()],
            _ => vec![],
        };
        let big = if i == 7 { 300_000 } else { 500 + i * 37 };
        mail.append(
            USER,
            "Work",
            &dshare_e2e::message(&format!("work-{i}"), big),
            &flags,
            1_700_000_000 + i as i64,
        )?;
        mail.append(
            USER,
            "Archive/2025",
            &dshare_e2e::message(&format!("archive-{i}"), 400 + i),
            &flags,
            1_600_000_000 + i as i64,
        )?;
    }
    // An expunged message: the UIDs have a gap that must survive the move.
    let uids = mail.uids(USER, "Work")?;
    mail.expunge(USER, "Work", &uids[3..4])?;
    b.store.flush_async().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn move_account_b_to_c_while_mail_arrives() -> anyhow::Result<()> {
    let c = cluster().await?;
    seed(&c).await?;
    let before = imap_view(c.node(1).imap())?;
    assert!(before.contains("box Work"), "{before}");
    c.node(1)
        .node()
        .state
        .directory
        .add_route("<mv.route>", USER)?;
    // A caches B as the owner.
    let a = &c.node(0).node().state.locator;
    assert!(
        matches!(a.locate(USER, Purpose::Rcpt).await, Location::Remote(ref o) if o.node == "node-b")
    );

    // Mail through A during the move.
    let smtp_a = c.node(0).smtp();
    let sender = tokio::spawn(async move {
        let mut sent = vec![];
        for i in 0..DURING {
            let subject = format!("during-{i}");
            let body = dshare_e2e::message(&subject, 600);
            let mut s = Smtp::connect(smtp_a).await?;
            let r = s.send("sender@example.org", &[USER], &body).await?;
            anyhow::ensure!(r.iter().all(|r| r.is(250)), "{r:?}");
            s.quit().await?;
            sent.push(subject);
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
        anyhow::Ok(sent)
    });

    let b = &c.node(1).node().state;
    let report = b.move_account(USER, "node-c", false).await?;
    let lines = report.lines();
    println!("{}", lines.join("\n"));
    assert!(
        lines[0].starts_with("moved mover@example.com to node-c"),
        "{lines:?}"
    );
    let sent = sender.await??;
    assert_eq!(sent.len(), DURING);

    // Ownership: C has it, B does not and forwards.
    let cn = &c.node(2).node().state;
    assert!(cn.directory.account(USER)?.is_some());
    assert!(b.directory.account(USER)?.is_none());
    assert!(b.mail.list_mailboxes(USER)?.is_empty());
    // The Router record naming the account moved with it.
    assert!(b.directory.routes()?.is_empty());
    assert_eq!(cn.directory.routes()?.len(), 1);
    assert!(matches!(
        a.locate("mv.route@example.com", Purpose::Rcpt).await,
        Location::Remote(ref o) if o.node == "node-c" && o.canonical == USER
    ));
    assert!(
        matches!(b.locator.locate(USER, Purpose::Rcpt).await, Location::Remote(ref o) if o.node == "node-c")
    );
    assert!(
        matches!(a.locate(USER, Purpose::Rcpt).await, Location::Remote(ref o) if o.node == "node-c")
    );

    // Every message sent during the move arrives once, on C.
    let inbox_total = 5 + DURING;
    assert!(
        eventually(Duration::from_secs(60), || c.node(2).inbox_len(USER)
            >= inbox_total)
        .await,
        "C has {} of {inbox_total}",
        c.node(2).inbox_len(USER)
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let inbox = c.node(2).inbox(USER);
    assert_eq!(inbox.len(), inbox_total);
    for subject in &sent {
        let needle = format!("Subject: {subject}\r\n");
        let n = inbox
            .iter()
            .filter(|m| m.windows(needle.len()).any(|w| w == needle.as_bytes()))
            .count();
        assert_eq!(n, 1, "{subject} arrived {n} times");
    }

    // The same mailbox through A, B and C, over IMAP and POP3; the folders, UIDs,
    // UIDVALIDITY, flags and bodies seeded before the move are unchanged.
    let via_c = imap_view(c.node(2).imap())?;
    assert_eq!(imap_view(c.node(0).imap())?, via_c);
    assert_eq!(imap_view(c.node(1).imap())?, via_c);
    for line in before
        .lines()
        .filter(|l| !l.starts_with("msg INBOX") && !l.starts_with("box INBOX"))
    {
        assert!(via_c.contains(line), "lost in the move: {line}\n{via_c}");
    }
    let pop_c = pop3_view(c.node(2).pop3())?;
    assert!(
        pop_c.starts_with(&format!("count {inbox_total}\n")),
        "{pop_c}"
    );
    assert_eq!(pop3_view(c.node(0).pop3())?, pop_c);
    assert_eq!(pop3_view(c.node(1).pop3())?, pop_c);

    // Mail sent to B directly (a peer with a stale cache would) reaches C.
    let mut s = Smtp::connect(c.node(1).smtp()).await?;
    let r = s
        .send(
            "sender@example.org",
            &[USER],
            &dshare_e2e::message("stale", 500),
        )
        .await?;
    assert!(r.iter().all(|r| r.is(250)), "{r:?}");
    s.quit().await?;
    assert!(
        eventually(Duration::from_secs(30), || c.node(2).inbox_len(USER)
            == inbox_total + 1)
        .await
    );
    c.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dry_run_and_refusals_change_nothing() -> anyhow::Result<()> {
    let mut c = cluster().await?;
    seed(&c).await?;
    let before = imap_view(c.node(1).imap())?;
    let b = c.node(1).node().state.clone();

    let dry = b.move_account(USER, "node-c", true).await?;
    let lines = dry.lines();
    assert!(
        lines[0].starts_with("would move mover@example.com to node-c"),
        "{lines:?}"
    );
    assert!(lines.iter().any(|l| l.contains("Work: ")), "{lines:?}");
    assert_eq!(
        lines.last().map(String::as_str),
        Some("dry run: nothing changed")
    );

    let unknown = b.move_account(USER, "node-x", false).await.unwrap_err();
    assert!(unknown.message().contains("unknown node"), "{unknown:?}");
    b.create_alias("mover2@example.com", USER, false).await?;
    let alias = b
        .move_account("mover2@example.com", "node-c", false)
        .await
        .unwrap_err();
    assert!(alias.message().contains("is an alias of"), "{alias:?}");
    let itself = b.move_account(USER, "node-b", false).await.unwrap_err();
    assert!(itself.message().contains("this node"), "{itself:?}");

    c.node_mut(2).stop().await;
    let down = b.move_account(USER, "node-c", false).await.unwrap_err();
    assert_eq!(down.code(), tonic::Code::Unavailable, "{down:?}");
    c.node_mut(2).restart().await?;

    // Nothing changed: B still owns and serves the same mailbox, C has nothing.
    assert!(b.directory.account(USER)?.is_some());
    assert!(!b.mail.is_frozen(USER)?);
    assert!(b.locator.move_record(USER)?.is_none());
    let cn = &c.node(2).node().state;
    assert!(cn.directory.account(USER)?.is_none());
    assert!(cn.mail.list_mailboxes(USER)?.is_empty());
    assert_eq!(imap_view(c.node(1).imap())?, before);
    assert_eq!(imap_view(c.node(0).imap())?, before);
    c.shutdown().await;
    Ok(())
}

/// A small account on B: 30 messages in INBOX and `Work`, flags and keywords.
async fn seed_small(c: &Cluster, user: &str) -> anyhow::Result<()> {
    dshare_e2e::seed_small_account(c, 1, user, PASS, 30).await
}

/// B "dies" at each stage of a move (the test hook stops the move there with no cleanup,
/// then B restarts from its data directory); running the move again finishes it with the
/// same mailbox on C, nothing lost or doubled, and one owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn move_resumes_after_the_old_owner_dies_at_each_stage() -> anyhow::Result<()> {
    let mut c = cluster().await?;
    for (i, stage) in ["copied", "frozen", "switching", "finished"]
        .into_iter()
        .enumerate()
    {
        let user = format!("resume{i}@example.com");
        seed_small(&c, &user).await?;
        let before = imap_view_of(c.node(1).imap(), &user, PASS)?;
        c.node(1).node().state.locator.stop_moves_at(Some(stage));
        let stopped = c
            .node(1)
            .node()
            .state
            .move_account(&user, "node-c", false)
            .await;
        assert!(stopped.is_err(), "{stage}: {stopped:?}");
        c.node_mut(1).stop().await;
        c.node_mut(1).restart().await?;
        let report = c
            .node(1)
            .node()
            .state
            .move_account(&user, "node-c", false)
            .await?;
        println!("{stage}: {}", report.lines().join(" / "));
        let b = &c.node(1).node().state;
        assert!(b.directory.account(&user)?.is_none(), "{stage}");
        assert!(
            c.node(2).node().state.directory.account(&user)?.is_some(),
            "{stage}"
        );
        assert_eq!(
            imap_view_of(c.node(2).imap(), &user, PASS)?,
            before,
            "{stage}"
        );
        assert_eq!(
            imap_view_of(c.node(1).imap(), &user, PASS)?,
            before,
            "{stage}"
        );
    }
    c.shutdown().await;
    Ok(())
}

/// The new owner stops in the middle of the copy: the move fails with nothing switched (B
/// still serves the account), and running it again copies only what is missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn move_resumes_after_the_new_owner_stops_mid_copy() -> anyhow::Result<()> {
    let mut c = cluster().await?;
    let user = "resume-target@example.com";
    seed_small(&c, user).await?;
    let before = imap_view_of(c.node(1).imap(), user, PASS)?;
    let locator = c.node(1).node().state.locator.clone();
    let (tx, mut rx) = tokio::sync::watch::channel(0u64);
    let mover = tokio::spawn(async move {
        locator
            .move_account(user, "node-c", false, move |p| {
                let _ = tx.send(p.messages);
                // Slow enough for the test to stop C in the middle.
                std::thread::sleep(Duration::from_millis(150));
            })
            .await
    });
    rx.wait_for(|n| *n >= 10).await?;
    c.node_mut(2).stop().await;
    let failed = mover.await?;
    assert!(failed.is_err(), "{failed:?}");
    let b = &c.node(1).node().state;
    assert!(b.directory.account(user)?.is_some());
    assert!(!b.mail.is_frozen(user)?);
    assert_eq!(imap_view_of(c.node(1).imap(), user, PASS)?, before);
    c.node_mut(2).restart().await?;
    let report = c
        .node(1)
        .node()
        .state
        .move_account(user, "node-c", false)
        .await?;
    println!("{}", report.lines().join(" / "));
    assert!(report.skipped >= 10, "{report:?}");
    assert_eq!(report.copied + report.skipped, 30, "{report:?}");
    assert_eq!(imap_view_of(c.node(2).imap(), user, PASS)?, before);
    assert_eq!(imap_view_of(c.node(0).imap(), user, PASS)?, before);
    c.shutdown().await;
    Ok(())
}

/// A peer that missed the `Invalidate` (its cache still says B) delivers and logs in
/// correctly: B's forwarding record sends it on to C.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stale_cache_still_delivers_and_logs_in() -> anyhow::Result<()> {
    let c = cluster().await?;
    let user = "stale@example.com";
    seed_small(&c, user).await?;
    let a = c.node(0).node().state.locator.clone();
    let Location::Remote(old) = a.locate(user, Purpose::Rcpt).await else {
        anyhow::bail!("not located on B");
    };
    assert_eq!(old.node, "node-b");
    let before = imap_view_of(c.node(1).imap(), user, PASS)?;
    c.node(1)
        .node()
        .state
        .move_account(user, "node-c", false)
        .await?;
    // A got the Invalidate; put the stale entry back.
    a.remember(user, old.clone()).await;
    assert_eq!(
        a.cached(user).await.map(|o| o.node),
        Some("node-b".to_string())
    );

    let mut s = Smtp::connect(c.node(0).smtp()).await?;
    let r = s
        .send(
            "sender@example.org",
            &[user],
            &dshare_e2e::message("stale-cache", 500),
        )
        .await?;
    assert!(r.iter().all(|r| r.is(250)), "{r:?}");
    s.quit().await?;
    let inbox = 10 + 1;
    assert!(
        eventually(Duration::from_secs(30), || c.node(2).inbox_len(user)
            == inbox)
        .await,
        "C has {} of {inbox}",
        c.node(2).inbox_len(user)
    );
    a.remember(user, old.clone()).await;
    let via_a = imap_view_of(c.node(0).imap(), user, PASS)?;
    assert_eq!(via_a, imap_view_of(c.node(2).imap(), user, PASS)?);
    for line in before.lines().filter(|l| !l.starts_with("box INBOX")) {
        assert!(via_a.contains(line), "{line}\n{via_a}");
    }
    a.remember(user, old).await;
    let pop = python(&format!(
        "import poplib\nP = poplib.POP3('{}', {}, timeout=30)\nP.user('{user}')\nP.pass_('{PASS}')\nprint(P.stat()[0])\nP.quit()\n",
        c.node(0).pop3().ip(),
        c.node(0).pop3().port()
    ))?;
    assert_eq!(pop.trim(), inbox.to_string());
    c.shutdown().await;
    Ok(())
}

/// Move throughput over loopback TLS (run by hand):
/// `MOVE_MESSAGES=2000 MOVE_SIZE=20000 cargo test -p dshare-e2e --test account_move -- --ignored --nocapture throughput`
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "a measurement, run by hand"]
async fn throughput() -> anyhow::Result<()> {
    let n: usize = std::env::var("MOVE_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let size: usize = std::env::var("MOVE_SIZE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let c = cluster().await?;
    let user = "bulk@example.com";
    c.node(1).add_account(user, PASS).await?;
    let mail = &c.node(1).node().state.mail;
    for i in 0..n {
        let folder = ["INBOX", "Sent", "Trash"][i % 3];
        mail.append(
            user,
            folder,
            &dshare_e2e::message(&format!("bulk-{i}"), size),
            &["\\Seen".to_string()],
            1_700_000_000,
        )?;
    }
    c.node(1).node().state.store.flush_async().await?;
    let report = c
        .node(1)
        .node()
        .state
        .move_account(user, "node-c", false)
        .await?;
    println!("{}", report.lines().join("\n"));
    assert_eq!(report.copied as usize, n);
    c.shutdown().await;
    Ok(())
}

/// Reads IMAP lines until one starts with `until` (a tag) or is an untagged BYE.
async fn imap_until(
    r: &mut tokio::io::BufReader<tokio::net::tcp::OwnedReadHalf>,
    until: &str,
) -> anyhow::Result<Vec<String>> {
    use tokio::io::AsyncBufReadExt;
    let mut lines = vec![];
    loop {
        let mut line = String::new();
        let n = tokio::time::timeout(Duration::from_secs(30), r.read_line(&mut line)).await??;
        if n == 0 {
            return Ok(lines);
        }
        let done = line.starts_with(until) || line.starts_with("* BYE");
        lines.push(line.trim_end().to_string());
        if done {
            return Ok(lines);
        }
    }
}

/// An IMAP session open on the old owner when the account moves ends with
/// `BYE [UNAVAILABLE]`; logging in again (through the old owner) reaches the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn open_sessions_on_the_old_owner_end_with_unavailable() -> anyhow::Result<()> {
    use tokio::io::AsyncWriteExt;
    let c = cluster().await?;
    let user = "session@example.com";
    seed_small(&c, user).await?;
    let stream = tokio::net::TcpStream::connect(c.node(1).imap()).await?;
    let (r, mut w) = stream.into_split();
    let mut r = tokio::io::BufReader::new(r);
    imap_until(&mut r, "* OK").await?;
    w.write_all(format!("a LOGIN {user} {PASS}\r\n").as_bytes())
        .await?;
    let login = imap_until(&mut r, "a ").await?;
    assert!(
        login.last().is_some_and(|l| l.starts_with("a OK")),
        "{login:?}"
    );
    w.write_all(b"b SELECT INBOX\r\n").await?;
    let select = imap_until(&mut r, "b ").await?;
    assert!(
        select.last().is_some_and(|l| l.starts_with("b OK")),
        "{select:?}"
    );

    c.node(1)
        .node()
        .state
        .move_account(user, "node-c", false)
        .await?;
    let _ = w.write_all(b"c NOOP\r\n").await;
    let after = imap_until(&mut r, "c ").await?;
    assert!(
        after.iter().any(|l| l.starts_with("* BYE [UNAVAILABLE]")),
        "{after:?}"
    );
    let again = imap_view_of(c.node(1).imap(), user, PASS)?;
    assert_eq!(again, imap_view_of(c.node(2).imap(), user, PASS)?);
    c.shutdown().await;
    Ok(())
}

/// A folder deleted and created again on the old owner between two runs of a move (another
/// UIDVALIDITY) replaces what the first run copied of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_folder_created_again_between_runs_is_copied_afresh() -> anyhow::Result<()> {
    let c = cluster().await?;
    let user = "again@example.com";
    seed_small(&c, user).await?;
    let b = c.node(1).node().state.clone();
    b.locator.stop_moves_at(Some("copied"));
    assert!(b.move_account(user, "node-c", false).await.is_err());
    b.locator.stop_moves_at(None);
    b.mail.delete_mailbox(user, "Work")?;
    b.mail.create_mailbox(user, "Work", None)?;
    b.mail.append(
        user,
        "Work",
        b"Subject: new\r\n\r\nnew\r\n",
        &[],
        1_700_000_000,
    )?;
    b.mail.rename_mailbox(user, "INBOX", "Old-Inbox")?;
    b.store.flush_async().await?;
    let before = imap_view_of(c.node(1).imap(), user, PASS)?;
    b.move_account(user, "node-c", false).await?;
    assert_eq!(imap_view_of(c.node(2).imap(), user, PASS)?, before);
    c.shutdown().await;
    Ok(())
}

/// A POP3 session open on the old owner when the account moves ends with `-ERR [SYS/TEMP]`
/// (it does not go on serving a maildrop that is no longer there); logging in again through
/// the old owner reaches the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn open_pop3_sessions_on_the_old_owner_end_with_sys_temp() -> anyhow::Result<()> {
    let c = cluster().await?;
    let user = "pop-session@example.com";
    seed_small(&c, user).await?;
    let dir = tempfile::tempdir()?;
    let (ready, moved) = (dir.path().join("ready"), dir.path().join("moved"));
    let b = c.node(1).pop3();
    let script = format!(
        r#"
import poplib, os, time
P = poplib.POP3("{ip}", {port}, timeout=30)
P.user("{user}")
P.pass_("{PASS}")
print("before", P.stat()[0])
open("{ready}", "w").close()
deadline = time.time() + 30
while not os.path.exists("{moved}") and time.time() < deadline:
    time.sleep(0.05)
try:
    print("noop", P.noop().decode())
except poplib.error_proto as e:
    print("noop", e.args[0].decode())
P2 = poplib.POP3("{ip}", {port}, timeout=30)
P2.user("{user}")
P2.pass_("{PASS}")
print("again", P2.stat()[0])
P2.quit()
"#,
        ip = b.ip(),
        port = b.port(),
        ready = ready.display(),
        moved = moved.display(),
    );
    let client = tokio::task::spawn_blocking(move || python(&script));
    anyhow::ensure!(
        eventually(Duration::from_secs(30), || ready.exists()).await,
        "the POP3 client did not log in"
    );
    c.node(1)
        .node()
        .state
        .move_account(user, "node-c", false)
        .await?;
    std::fs::write(&moved, b"")?;
    let out = client.await??;
    assert!(out.contains("before 10"), "{out}");
    assert!(out.contains("noop -ERR [SYS/TEMP]"), "{out}");
    assert!(out.contains("again 10"), "{out}");
    c.shutdown().await;
    Ok(())
}

/// The final pass of a mailbox larger than one `MoveSync` window (4096 messages) goes window
/// by window: flag changes and expunges made between two runs, on both sides of a window's
/// edge, reach the new owner, and nothing else is expunged there.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_mailbox_larger_than_one_sync_window_is_reconciled_whole() -> anyhow::Result<()> {
    const N: usize = ds_cluster::SYNC_WINDOW + 300;
    let c = cluster().await?;
    let user = "big@example.com";
    c.node(1).add_account(user, PASS).await?;
    let b = c.node(1).node().state.clone();
    b.mail.create_mailbox(user, "Big", None)?;
    for i in 0..N {
        b.mail.append(
            user,
            "Big",
            format!("Subject: {i}\r\n\r\nbody {i}\r\n").as_bytes(),
            &[],
            1_700_000_000,
        )?;
    }
    b.store.flush_async().await?;
    b.locator.stop_moves_at(Some("copied"));
    assert!(b.move_account(user, "node-c", false).await.is_err());
    b.locator.stop_moves_at(None);
    // Changes on both sides of the first window's edge (UID 4096).
    let uids = b.mail.uids(user, "Big")?;
    for uid in [uids[5], uids[4095], uids[4096], uids[N - 1]] {
        b.mail
            .add_flags(user, "Big", uid, &["\\Seen".into(), "Kw".into()])?;
    }
    b.mail.expunge(
        user,
        "Big",
        &[uids[10], uids[4094], uids[4097], uids[N - 2]],
    )?;
    b.store.flush_async().await?;
    let view = |mail: &ds_store::MailStore| -> anyhow::Result<Vec<(u32, Vec<String>)>> {
        Ok(mail
            .messages(user, "Big")?
            .into_iter()
            .map(|m| (m.uid, m.flags))
            .collect())
    };
    let before = view(&b.mail)?;
    assert_eq!(before.len(), N - 4);
    let report = b.move_account(user, "node-c", false).await?;
    assert_eq!(report.expunged, 4, "{report:?}");
    assert_eq!(view(&c.node(2).node().state.mail)?, before);
    c.shutdown().await;
    Ok(())
}

/// The new owner loses messages it had acknowledged (as after a crash before its store was
/// flushed, when it is back before the old owner's next call): the final pass sees it and
/// the move stops before the switch, nothing lost; running it again copies them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_switch_waits_for_every_message_on_the_new_owners_disk() -> anyhow::Result<()> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let c = cluster().await?;
    let user = "lost-on-target@example.com";
    seed_small(&c, user).await?;
    let before = imap_view_of(c.node(1).imap(), user, PASS)?;
    let b = c.node(1).node().state.clone();
    let target = c.node(2).node().state.mail.clone();
    let lost = AtomicBool::new(false);
    let failed = b
        .locator
        .move_account(user, "node-c", false, |p| {
            if p.messages == 30 && !lost.swap(true, Ordering::SeqCst) {
                let uids = target.uids(user, "Work").unwrap();
                target.expunge(user, "Work", &uids[..2]).unwrap();
            }
        })
        .await;
    assert!(lost.load(Ordering::SeqCst));
    let e = failed.expect_err("switched without two messages");
    assert!(e.to_string().contains("lost some"), "{e}");
    assert!(b.directory.account(user)?.is_some());
    assert!(!b.mail.is_frozen(user)?);
    let report = b.move_account(user, "node-c", false).await?;
    assert_eq!(report.copied, 2, "{report:?}");
    assert_eq!(imap_view_of(c.node(2).imap(), user, PASS)?, before);
    c.shutdown().await;
    Ok(())
}
