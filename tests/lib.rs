//! Shared helpers for the end-to-end tests and load tools: a raw SMTP client over TCP and a
//! way to run Python's standard mail clients.

pub mod internet;
pub mod processes;

use ds_testkit::OutputWithin;
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const TIMEOUT: Duration = Duration::from_secs(30);

/// A reply: code and the text of its last line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub text: String,
}

impl Reply {
    pub fn is(&self, code: u16) -> bool {
        self.code == code
    }
}

/// A minimal SMTP client speaking raw bytes, for exact assertions.
pub struct Smtp {
    r: BufReader<tokio::net::tcp::OwnedReadHalf>,
    w: tokio::net::tcp::OwnedWriteHalf,
}

impl Smtp {
    /// Connects, reads the greeting and says EHLO.
    pub async fn connect(addr: SocketAddr) -> anyhow::Result<Smtp> {
        let s = tokio::time::timeout(TIMEOUT, TcpStream::connect(addr)).await??;
        let (r, w) = s.into_split();
        let mut c = Smtp {
            r: BufReader::new(r),
            w,
        };
        let greet = c.reply().await?;
        anyhow::ensure!(greet.is(220), "greeting {greet:?}");
        let ehlo = c.cmd("EHLO client.test").await?;
        anyhow::ensure!(ehlo.is(250), "EHLO {ehlo:?}");
        Ok(c)
    }

    /// Reads one (possibly multi-line) reply.
    pub async fn reply(&mut self) -> anyhow::Result<Reply> {
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(TIMEOUT, self.r.read_line(&mut line))
                .await
                .context("reply timed out")??;
            if n == 0 {
                bail!("connection closed");
            }
            let line = line.trim_end();
            if line.len() < 3 {
                bail!("short reply {line:?}");
            }
            let code: u16 = line[..3].parse().context("reply code")?;
            if line.as_bytes().get(3) != Some(&b'-') {
                return Ok(Reply {
                    code,
                    text: line.get(4..).unwrap_or("").to_string(),
                });
            }
        }
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        tokio::time::timeout(TIMEOUT, self.w.write_all(bytes)).await??;
        Ok(())
    }

    pub async fn cmd(&mut self, line: &str) -> anyhow::Result<Reply> {
        self.send_raw(format!("{line}\r\n").as_bytes()).await?;
        self.reply().await
    }

    /// Sends DATA and the body (dot-stuffed here; `body` uses CRLF line ends).
    pub async fn data(&mut self, body: &[u8]) -> anyhow::Result<Reply> {
        let r = self.cmd("DATA").await?;
        if !r.is(354) {
            return Ok(r);
        }
        let mut out = Vec::with_capacity(body.len() + 64);
        for line in body.split_inclusive(|b| *b == b'\n') {
            if line.starts_with(b".") {
                out.push(b'.');
            }
            out.extend_from_slice(line);
        }
        if !out.ends_with(b"\r\n") {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b".\r\n");
        self.send_raw(&out).await?;
        self.reply().await
    }

    /// One whole transaction; returns the replies to MAIL, each RCPT and DATA.
    pub async fn send(
        &mut self,
        from: &str,
        to: &[&str],
        body: &[u8],
    ) -> anyhow::Result<Vec<Reply>> {
        let mut out = vec![self.cmd(&format!("MAIL FROM:<{from}>")).await?];
        for t in to {
            out.push(self.cmd(&format!("RCPT TO:<{t}>")).await?);
        }
        if out[1..].iter().any(|r| r.is(250)) && out[0].is(250) {
            out.push(self.data(body).await?);
        } else {
            self.cmd("RSET").await?;
        }
        Ok(out)
    }

    pub async fn quit(mut self) -> anyhow::Result<()> {
        let _ = self.cmd("QUIT").await;
        Ok(())
    }
}

/// A test message of about `size` bytes with CRLF line ends.
pub fn message(subject: &str, size: usize) -> Vec<u8> {
    let mut m = format!(
        "From: sender@example.org\r\nTo: someone@example.com\r\nSubject: {subject}\r\nMessage-ID: <{subject}@test>\r\n\r\n"
    )
    .into_bytes();
    let line = b"The quick brown fox jumps over the lazy dog, 0123456789.\r\n";
    while m.len() + line.len() <= size {
        m.extend_from_slice(line);
    }
    m
}

pub use ds_testkit::python;

/// Runs `program` with `args` on a pseudo terminal of its own (standard output and error),
/// as on an operator's screen, and returns what the terminal showed and the exit status.
/// Python's `os.openpty` makes the terminal; the program is killed after
/// [`ds_testkit::PROGRAM_LIMIT`].
pub fn on_terminal(
    program: &std::path::Path,
    args: &[&str],
) -> anyhow::Result<(std::process::ExitStatus, String)> {
    const RUN: &str = r#"
import os, subprocess, sys
master, slave = os.openpty()
child = subprocess.Popen(sys.argv[1:], stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
os.close(slave)
shown = bytearray()
while True:
    try:
        data = os.read(master, 65536)
    except OSError:  # EIO: every writer of the terminal is gone
        break
    if not data:
        break
    shown += data
sys.stdout.buffer.write(shown)
sys.exit(child.wait())
"#;
    let out = Command::new("python3")
        .args(["-c", RUN])
        .arg(program)
        .args(args)
        .output_bounded()
        .context("running a program on a pseudo terminal")?;
    Ok((
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
    ))
}

/// A user submitting over 587-style STARTTLS with Python's smtplib, the server verified
/// against the cluster CA `ca`.
pub struct Submitter<'a> {
    pub ca: std::path::PathBuf,
    pub server: SocketAddr,
    pub user: &'a str,
    pub password: &'a str,
}

impl<'a> Submitter<'a> {
    /// `user` at the submission listener of node `i` of `c`.
    pub fn new(c: &ds_testkit::Cluster, i: usize, user: &'a str, password: &'a str) -> Self {
        Self {
            ca: c.root.path().join("ca.pem"),
            server: c.node(i).submission(),
            user,
            password,
        }
    }

    /// Sends `message` from the user to `to` with the given `MAIL` and `RCPT` options;
    /// prints `dsn offered True|False` and `refused {…}` (smtplib's refused recipients).
    pub fn send(
        &self,
        to: &[&str],
        message: &str,
        mail_options: &[&str],
        rcpt_options: &[&str],
    ) -> anyhow::Result<String> {
        python(&format!(
            r#"
import smtplib, ssl
ctx = ssl.create_default_context(cafile="{ca}")
s = smtplib.SMTP("{ip}", {port}, timeout=30)
s.starttls(context=ctx)
s.login("{user}", "{pw}")
print("dsn offered", s.has_extn("dsn"))
print("refused", s.sendmail("{user}", {to:?}, {message:?},
    mail_options={mail_options:?}, rcpt_options={rcpt_options:?}))
s.quit()
"#,
            ca = self.ca.display(),
            ip = self.server.ip(),
            port = self.server.port(),
            user = self.user,
            pw = self.password,
        ))
    }
}
/// Polls `f` until it is true or `timeout` passes.
pub async fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Everything the process logs at `info` and above, captured in memory: for tests that read a
/// node's log lines. Installs the global subscriber, so call it once per test binary.
/// A TCP connection to `server` from the local address `from` (a loopback address no node
/// uses, so logs can show that the owner saw the original client): the client's address and
/// the two halves, the reading one buffered.
pub async fn connect_from(
    from: std::net::IpAddr,
    server: SocketAddr,
) -> anyhow::Result<(
    SocketAddr,
    BufReader<tokio::net::tcp::OwnedReadHalf>,
    tokio::net::tcp::OwnedWriteHalf,
)> {
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(from, 0))?;
    let stream = sock.connect(server).await?;
    let client = stream.local_addr()?;
    let (r, w) = stream.into_split();
    Ok((client, BufReader::new(r), w))
}

pub fn capture_logs() -> CapturedLogs {
    let logs = CapturedLogs::default();
    let writer = logs.clone();
    tracing_subscriber::fmt()
        .with_env_filter("info")
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .init();
    logs
}

/// The log output [`capture_logs`] collects.
#[derive(Clone, Default)]
pub struct CapturedLogs(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl CapturedLogs {
    /// What was logged so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for CapturedLogs {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A small account on test node `node`: `n` messages of 0.7–3.5 kB, every third in INBOX,
/// the others in `Work`, half of them `\Seen` with the keyword `Kw`.
pub async fn seed_small_account(
    c: &ds_testkit::Cluster,
    node: usize,
    user: &str,
    password: &str,
    n: usize,
) -> anyhow::Result<()> {
    c.node(node).add_account(user, password).await?;
    let state = &c.node(node).node().state;
    state.mail.create_mailbox(user, "Work", None)?;
    for i in 0..n {
        let flags: Vec<String> = if i % 2 == 0 {
            vec!["\\Seen".into(), "Kw".into()]
        } else {
            vec![]
        };
        let folder = if i % 3 == 0 { "INBOX" } else { "Work" };
        state.mail.append(
            user,
            folder,
            &message(&format!("{user}-{i}"), 700 + i * 90),
            &flags,
            1_700_000_000 + i as i64,
        )?;
    }
    state.store.flush_async().await?;
    Ok(())
}

/// A number from the environment variable `name` (load tools), else `default`.
pub fn env_usize(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(v) => v.trim().parse().unwrap_or_else(|_| {
            eprintln!("{name}={v:?} is not a number; using {default}");
            default
        }),
        Err(_) => default,
    }
}
