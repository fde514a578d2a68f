//! Programs run by tests (the `dshare` CLI, Python's mail clients, mbsync, a pseudo
//! terminal…) with a bound on their time: a program that hangs is killed with everything it
//! started, and the test fails with what it printed, instead of holding the whole run.

use std::io::{self, Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What a test program may take unless its test says otherwise: far over what any of them
/// needs on a loaded machine, far under a CI run's own limit.
pub const PROGRAM_LIMIT: Duration = Duration::from_secs(240);

/// How long output still pipes in after the program exited (a grandchild may hold it).
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(10);

/// `Command::output` with a time limit.
pub trait OutputWithin {
    /// Runs the program with standard input empty and its output captured, as
    /// [`Command::output`] does. After `limit` the program and every process of its group
    /// are killed, and the error (kind `TimedOut`) carries the output so far.
    fn output_within(&mut self, limit: Duration) -> io::Result<Output>;

    /// [`OutputWithin::output_within`] with [`PROGRAM_LIMIT`].
    fn output_bounded(&mut self) -> io::Result<Output> {
        self.output_within(PROGRAM_LIMIT)
    }
}

impl OutputWithin for Command {
    fn output_within(&mut self, limit: Duration) -> io::Result<Output> {
        let mut child = self
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // A group of its own, so a kill reaches what it started too.
            .process_group(0)
            .spawn()?;
        let stdout = Collected::start(child.stdout.take());
        let stderr = Collected::start(child.stderr.take());
        let Some(status) = wait_until(&mut child, Instant::now() + limit)? else {
            kill_group(&mut child);
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "{:?} ran over {limit:?} and was killed\n--- its standard output:\n{}\n--- its standard error:\n{}",
                    self.get_program(),
                    String::from_utf8_lossy(&stdout.snapshot()),
                    String::from_utf8_lossy(&stderr.snapshot()),
                ),
            ));
        };
        let deadline = Instant::now() + DRAIN_AFTER_EXIT;
        Ok(Output {
            status,
            stdout: stdout.finish(deadline),
            stderr: stderr.finish(deadline),
        })
    }
}

/// The child's exit status, or `None` once `deadline` passed.
fn wait_until(child: &mut Child, deadline: Instant) -> io::Result<Option<ExitStatus>> {
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(None);
        }
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(25));
    }
}

fn kill_group(child: &mut Child) {
    if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
        let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// One output stream of the child, read to its end on a thread of its own.
struct Collected {
    bytes: Arc<Mutex<Vec<u8>>>,
    reader: Option<JoinHandle<()>>,
}

impl Collected {
    fn start(stream: Option<impl Read + Send + 'static>) -> Self {
        let bytes = Arc::new(Mutex::new(Vec::new()));
        let reader = stream.map(|mut stream| {
            let bytes = bytes.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 16 * 1024];
                while let Ok(n @ 1..) = stream.read(&mut buf) {
                    bytes.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            })
        });
        Self { bytes, reader }
    }

    fn snapshot(&self) -> Vec<u8> {
        self.bytes.lock().unwrap().clone()
    }

    /// All of it, or what came by `deadline` if something else still holds the stream.
    fn finish(mut self, deadline: Instant) -> Vec<u8> {
        if let Some(reader) = self.reader.take() {
            while !reader.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(2));
            }
            if reader.is_finished() {
                let _ = reader.join();
            }
        }
        std::mem::take(&mut *self.bytes.lock().unwrap())
    }
}

/// Runs a Python 3 script (Python's standard mail clients count as real clients) with
/// [`PROGRAM_LIMIT`] and returns its standard output; fails with its standard error.
pub fn python(script: &str) -> anyhow::Result<String> {
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .output_bounded()
        .map_err(|e| anyhow::anyhow!("running python3: {e}"))?;
    if !out.status.success() {
        anyhow::bail!(
            "python failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// What a test holding a [`Watchdog`] may take (`DSHARE_TEST_LIMIT_SECS` to change it): the
/// longest test takes a minute or two on a loaded machine.
pub fn test_limit() -> Duration {
    std::env::var("DSHARE_TEST_LIMIT_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(Duration::from_secs(900), Duration::from_secs)
}

/// Ends the whole test process, naming the test, if it is still held after its limit: a test
/// that hangs fails the run there and then, instead of holding it until the CI's own limit.
pub struct Watchdog {
    _held: std::sync::mpsc::Sender<()>,
}

impl Watchdog {
    /// Watches the test running on this thread (libtest names the thread after the test).
    pub fn start(limit: Duration) -> Self {
        let test = std::thread::current()
            .name()
            .unwrap_or("a test")
            .to_string();
        let (held, dropped) = std::sync::mpsc::channel::<()>();
        let watch = move || {
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = dropped.recv_timeout(limit) {
                // Past libtest's capture of `eprintln!`, which would die with the process.
                let _ = writeln!(
                    std::io::stderr(),
                    "\nWATCHDOG: {test} still runs after {limit:?}; ending the test process so that the run fails here"
                );
                std::process::exit(101);
            }
        };
        // Without a thread there is no watch, and the test runs as it would have.
        let _ = std::thread::Builder::new()
            .name("test-watchdog".into())
            .spawn(watch);
        Self { _held: held }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_and_status_come_back() {
        let out = Command::new("sh")
            .args(["-c", "printf out; printf err >&2; exit 3"])
            .output_bounded()
            .unwrap();
        assert_eq!(out.stdout, b"out");
        assert_eq!(out.stderr, b"err");
        assert_eq!(out.status.code(), Some(3));
    }

    #[test]
    fn a_hanging_program_and_its_children_are_killed_with_their_output_in_the_error() {
        let started = Instant::now();
        let err = Command::new("sh")
            .args(["-c", "printf so-far; sleep 60 & sleep 60"])
            .output_within(Duration::from_millis(300))
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(err.to_string().contains("so-far"), "{err}");
        // The background sleep held the pipe: it was killed with the group.
        assert!(started.elapsed() < Duration::from_secs(30));
    }

    #[test]
    fn a_watchdog_let_go_in_time_ends_nothing() {
        let dog = Watchdog::start(Duration::from_millis(200));
        drop(dog);
        std::thread::sleep(Duration::from_millis(400));
        // Still here: the process was not ended.
    }
}
