//! POP3 through real nodes: sessions forwarded to the owning node look exactly like direct
//! ones (DESIGN.md §3, §7), checked with Python's poplib and curl.

use ds_testkit::OutputWithin;
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use ds_server::config::Domain;
use ds_testkit::Cluster;
use dshare_e2e::{Smtp, eventually, message, python};

/// A poplib session that prints STAT, the UIDL list and every message's SHA-256.
fn pop_dump(addr: SocketAddr, user: &str, pass: &str) -> anyhow::Result<String> {
    python(&format!(
        r#"
import poplib, hashlib
p = poplib.POP3("{ip}", {port}, timeout=30)
p.user("{user}")
p.pass_("{pass}")
print("stat", p.stat())
print("uidl", p.uidl()[1])
for i in range(1, p.stat()[0] + 1):
    lines = p.retr(i)[1]
    print("msg", i, hashlib.sha256(b"\r\n".join(lines)).hexdigest())
p.quit()
"#,
        ip = addr.ip(),
        port = addr.port()
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_session_equals_direct_session() -> anyhow::Result<()> {
    let c = Cluster::start(3).await?;
    c.node(1).add_account("bob@example.com", "bob-pass").await?;
    // Mail for bob arrives at node-c and is relayed to node-b.
    let mut s = Smtp::connect(c.node(2).smtp()).await?;
    for i in 0..3 {
        let r = s
            .send(
                "x@elsewhere.org",
                &["bob@example.com"],
                &message(&format!("m{i}"), 3000),
            )
            .await?;
        assert!(r.iter().all(|r| r.is(250)), "{r:?}");
    }
    s.quit().await?;
    assert!(
        eventually(Duration::from_secs(20), || c
            .node(1)
            .inbox_len("bob@example.com")
            == 3)
        .await
    );

    let direct = pop_dump(c.node(1).pop3(), "bob", "bob-pass")?;
    let via_a = pop_dump(c.node(0).pop3(), "bob", "bob-pass")?;
    assert!(direct.contains("stat (3,"), "{direct}");
    assert_eq!(
        direct, via_a,
        "forwarded session differs from the direct one"
    );
    // A full name works the same way.
    assert_eq!(
        via_a,
        pop_dump(c.node(0).pop3(), "bob@example.com", "bob-pass")?
    );

    // A wrong password and an unknown user get the same reply through the front node.
    let out = python(&format!(
        r#"
import poplib
for user, pw in (("bob", "wrong"), ("nobody", "bob-pass")):
    p = poplib.POP3("{ip}", {port}, timeout=30)
    p.user(user)
    try:
        p.pass_(pw)
        print("accepted", user)
    except poplib.error_proto as e:
        print(e.args[0].decode())
"#,
        ip = c.node(0).pop3().ip(),
        port = c.node(0).pop3().port()
    ))?;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert_eq!(lines[0], lines[1], "{out}");
    assert!(lines[0].starts_with("-ERR [AUTH]"), "{out}");

    // curl lists and retrieves through the front node too.
    let a = c.node(0).pop3();
    let curl = |path: &str| {
        Command::new("curl")
            .args(["-sS", "--max-time", "30", "-u", "bob@example.com:bob-pass"])
            .arg(format!("pop3://{}:{}/{path}", a.ip(), a.port()))
            .output_bounded()
    };
    let list = curl("")?;
    assert!(
        list.status.success(),
        "{}",
        String::from_utf8_lossy(&list.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&list.stdout).lines().count(), 3);
    let m2 = curl("2")?;
    assert!(String::from_utf8_lossy(&m2.stdout).contains("Subject: m1"));

    // Deleting through the front node deletes on the owner, at QUIT.
    python(&format!(
        r#"
import poplib
p = poplib.POP3("{ip}", {port}, timeout=30)
p.user("bob"); p.pass_("bob-pass")
p.dele(1)
p.quit()
"#,
        ip = a.ip(),
        port = a.port()
    ))?;
    assert_eq!(c.node(1).inbox_len("bob@example.com"), 2);
    c.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_down_is_a_temporary_failure() -> anyhow::Result<()> {
    let mut c = Cluster::start(2).await?;
    c.node(1).add_account("bob@example.com", "bob-pass").await?;
    c.node_mut(1).stop().await;
    let a = c.node(0).pop3();
    let out = python(&format!(
        r#"
import poplib
p = poplib.POP3("{ip}", {port}, timeout=30)
p.user("bob")
try:
    p.pass_("bob-pass")
except poplib.error_proto as e:
    print(e.args[0].decode())
"#,
        ip = a.ip(),
        port = a.port()
    ))?;
    assert!(out.starts_with("-ERR [SYS/TEMP]"), "{out}");
    c.shutdown().await;
    Ok(())
}

/// The CommuniGate Pro multihoming sample on a whole node: company.com (main) on 127.0.0.1,
/// client1.com on 127.0.0.2, client2.com by name or SNI.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multihoming_sample_over_pop3() -> anyhow::Result<()> {
    let c = Cluster::start_with(1, |_, cfg| {
        cfg.node.main_domain = "company.com".into();
        cfg.domains = vec![
            Domain {
                name: "company.com".into(),
                shared: false,
                addresses: vec!["127.0.0.1".parse().unwrap()],
            },
            Domain {
                name: "client1.com".into(),
                shared: false,
                addresses: vec!["127.0.0.2".parse().unwrap()],
            },
            Domain {
                name: "client2.com".into(),
                shared: false,
                addresses: vec![],
            },
        ];
        cfg.listen.pop3 = vec![
            "127.0.0.1:0".parse().unwrap(),
            "127.0.0.2:0".parse().unwrap(),
        ];
        cfg.listen.pop3s = vec!["127.0.0.1:0".parse().unwrap()];
    })
    .await?;
    let n = c.node(0);
    for (d, count) in [("company.com", 1), ("client1.com", 2), ("client2.com", 3)] {
        let acct = format!("info@{d}");
        n.add_account(&acct, "pw").await?;
        for k in 0..count {
            n.node()
                .state
                .mail
                .deliver(&acct, &message(&format!("{d}-{k}"), 200))?;
        }
    }
    let addrs = &n.node().addrs().pop3;
    let stat = |addr: SocketAddr, user: &str| {
        python(&format!(
            r#"
import poplib
p = poplib.POP3("{}", {}, timeout=30)
p.user("{user}"); p.pass_("pw")
print(p.stat()[0])
p.quit()
"#,
            addr.ip(),
            addr.port()
        ))
        .map(|s| s.trim().to_string())
    };
    assert_eq!(
        stat(addrs[0], "info")?,
        "1",
        "info on 127.0.0.1 is company.com's"
    );
    assert_eq!(
        stat(addrs[1], "info")?,
        "2",
        "info on 127.0.0.2 is client1.com's"
    );
    assert_eq!(stat(addrs[0], "info%client2.com")?, "3");

    // SNI mail.client2.com on 127.0.0.1 (implicit TLS), with curl.
    let s = n.pop3s();
    let ca = c.root.path().join("ca.pem");
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "30", "--cacert"])
        .arg(&ca)
        .args([
            "--resolve",
            &format!("mail.client2.com:{}:127.0.0.1", s.port()),
        ])
        .args(["-k", "-u", "info:pw"])
        .arg(format!("pop3s://mail.client2.com:{}/", s.port()))
        .output_bounded()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 3);
    c.shutdown().await;
    Ok(())
}
