//! Nothing acknowledged is lost: a node killed with SIGKILL in the middle of a stream of
//! messages still has, after a restart, every message it answered `250` to.

use ds_testkit::OutputWithin;
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod common;
use common::serve;

/// Sends messages until the connection breaks; records the subjects answered 250.
fn sender(port: u16, id: usize, acked: Arc<Mutex<BTreeSet<String>>>, count: Arc<AtomicUsize>) {
    let Ok(s) = TcpStream::connect(("127.0.0.1", port)) else {
        return;
    };
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut w = s;
    let mut reply = || -> Option<String> {
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).ok()? == 0 {
                return None;
            }
            if line.as_bytes().get(3) != Some(&b'-') {
                return Some(line);
            }
        }
    };
    reply();
    if w.write_all(b"EHLO crash.test\r\n").is_err() || reply().is_none() {
        return;
    }
    for n in 0.. {
        let subject = format!("crash-{id}-{n}");
        // Every third message is larger than the store keeps inline (a body file).
        let lines = if n % 3 == 0 { 4000 } else { 40 };
        let body = format!(
            "Subject: {subject}\r\n\r\n{}END-{subject}\r\n",
            "payload line for the crash test\r\n".repeat(lines)
        );
        let steps = [
            "MAIL FROM:<load@elsewhere.org>\r\n".to_string(),
            "RCPT TO:<alice@example.com>\r\n".to_string(),
            "DATA\r\n".to_string(),
            format!("{body}.\r\n"),
        ];
        for step in &steps {
            if w.write_all(step.as_bytes()).is_err() {
                return;
            }
            match reply() {
                Some(l) if l.starts_with('2') || l.starts_with('3') => {}
                _ => return,
            }
        }
        acked.lock().unwrap().insert(subject);
        count.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn sigkill_mid_stream_loses_no_acknowledged_message() {
    let (_dir, config, (smtp, pop3, admin)) = common::single_node("");
    let node = serve(&config, &[smtp, admin]);
    common::add_account(&config, "alice@example.com", "alice-pw");

    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    let count = Arc::new(AtomicUsize::new(0));
    let senders: Vec<_> = (0..4)
        .map(|id| {
            let (a, c) = (acked.clone(), count.clone());
            std::thread::spawn(move || sender(smtp, id, a, c))
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while count.load(Ordering::SeqCst) < 60 {
        assert!(
            Instant::now() < deadline,
            "too slow to acknowledge messages"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    node.kill(); // SIGKILL
    for s in senders {
        s.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= 60);

    let node = serve(&config, &[pop3]);
    let out = Command::new("python3")
        .arg("-c")
        .arg(format!(
            r#"
import poplib
p = poplib.POP3("127.0.0.1", {pop3}, timeout=60)
p.user("alice"); p.pass_("alice-pw")
for i in range(1, p.stat()[0] + 1):
    lines = p.retr(i)[1]
    for line in lines:
        if line.startswith(b"Subject: "):
            subject = line[9:].decode()
            # Only a complete body counts as stored.
            if lines[-1] == b"END-" + subject.encode():
                print(subject)
p.quit()
"#
        ))
        .output_bounded()
        .unwrap();
    node.kill();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stored: BTreeSet<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    let lost: Vec<_> = acked.difference(&stored).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged messages lost: {lost:?}",
        lost.len()
    );
    eprintln!(
        "{} acknowledged, {} stored after SIGKILL",
        acked.len(),
        stored.len()
    );
}
