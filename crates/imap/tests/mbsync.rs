//! mbsync (isync) two-way sync between a local Maildir and the node: pull, incremental pull,
//! a flag pushed, a message pushed, a deletion pushed; directly on the owner and through a
//! forwarding node (DESIGN.md §7), with identical results.

mod common;

use common::{USER, message, node, python};
use ds_testkit::Cluster;
use ds_testkit::OutputWithin;

fn have_mbsync() -> bool {
    let found = std::process::Command::new("mbsync")
        .arg("-v")
        .output_bounded()
        .is_ok();
    if !found {
        eprintln!("mbsync not installed (Debian package isync): skipped");
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mbsync_two_way() -> anyhow::Result<()> {
    if !have_mbsync() {
        return Ok(());
    }
    let c = node().await?;
    check(&sync_session(&c, 0, 0)?);
    Ok(())
}

/// Account on node B, mbsync through node A: the same outcome as directly on B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mbsync_two_way_forwarded() -> anyhow::Result<()> {
    if !have_mbsync() {
        return Ok(());
    }
    let direct = {
        let c = Cluster::start(2).await?;
        c.node(1).add_account(USER, common::PASS).await?;
        sync_session(&c, 1, 1)?
    };
    let c = Cluster::start(2).await?;
    c.node(1).add_account(USER, common::PASS).await?;
    let forwarded = sync_session(&c, 1, 0)?;
    check(&forwarded);
    assert_eq!(direct, forwarded, "forwarded mbsync differs from direct");
    Ok(())
}

fn check(out: &str) {
    for want in [
        "pull rc 0",
        "pulled 3",
        "incremental 4",
        "Flagged",
        "server after push 5",
        "server after delete 4",
        "local after delete 4",
    ] {
        assert!(out.contains(want), "missing {want:?} in\n{out}");
    }
}

/// Seed three messages on node `owner`, then run the mbsync steps against node `via`; the
/// script's report.
fn sync_session(c: &Cluster, owner: usize, via: usize) -> anyhow::Result<String> {
    let mail = &c.node(owner).node().state.mail;
    for i in 0..3 {
        mail.deliver(common::USER, &message(&format!("pull{i}"), 700))?;
    }
    let dir = tempfile::tempdir()?;
    let root = dir.path().display().to_string();
    let out = python(
        c.node(via).imap(),
        &format!(
            r#"
import os, subprocess, glob
ROOT = "{root}"
os.makedirs(ROOT + "/mail", exist_ok=True)
open(ROOT + "/rc", "w").write(f"""
IMAPAccount test
Host {{HOST}}
Port {{PORT}}
User {{USER}}
Pass {{PASS}}
SSLType None
AuthMechs LOGIN
Timeout 20

IMAPStore remote
Account test

MaildirStore local
Path {{ROOT}}/mail/
Inbox {{ROOT}}/mail/INBOX
SubFolders Verbatim

Channel test
Far :remote:
Near :local:
Patterns INBOX
Create Both
Expunge Both
SyncState *
Sync All
""")
def sync(what):
    r = subprocess.run(["mbsync", "-c", ROOT + "/rc", "-a"], capture_output=True, text=True, timeout=60)
    print(what, "rc", r.returncode, r.stderr.strip().replace("\n", " | ")[:300])
def local():
    return sorted(glob.glob(ROOT + "/mail/INBOX/cur/*") + glob.glob(ROOT + "/mail/INBOX/new/*"))
def server():
    m = imaplib.IMAP4(HOST, PORT); m.login(USER, PASS); m.select("INBOX")
    typ, data = m.fetch("1:*", "(UID FLAGS)") if int(m.select("INBOX")[1][0]) else ("OK", [])
    m.logout()
    return [d.decode() for d in data if d]
sync("pull")
print("pulled", len(local()))
m = imaplib.IMAP4(HOST, PORT); m.login(USER, PASS)
m.append("INBOX", None, None, b"Subject: later\r\n\r\nincremental\r\n")
m.logout()
sync("incremental")
print("incremental", len(local()))
f = local()[0]
base = f.split(":2,")[0] if ":2," in f else f
os.rename(f, base + ":2," + "".join(sorted(set((f.split(":2,")[1] if ":2," in f else "") + "F"))))
sync("flag")
print("server after flag", server())
new = ROOT + "/mail/INBOX/new/1700000000.local.pushed"
open(new, "wb").write(b"Subject: pushed\r\n\r\nfrom the maildir\r\n")
sync("push")
print("server after push", len(server()))
os.remove(local()[1])
sync("delete")
print("server after delete", len(server()))
print("local after delete", len(local()))
"#
        ),
    )?;
    print!("{out}");
    Ok(out)
}
