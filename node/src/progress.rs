//! The progress of `dshare account move`: messages and bytes done of the total, rate and
//! ETA, redrawn in place on a terminal, or a plain line every few seconds otherwise (a log
//! file, a pipe), always ending with the last state before the summary.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use ds_server::admin::proto::MoveProgress;

/// Plain lines come at most this often.
const PLAIN_EVERY: Duration = Duration::from_secs(3);

/// Where the progress goes and what was shown.
pub struct Display {
    /// Standard error (when standard output carries JSON), else standard output.
    to_stderr: bool,
    tty: bool,
    /// A line is drawn in place and not ended yet (terminal).
    drawn: bool,
    last_plain: Option<Instant>,
    /// The latest progress, and whether it was printed.
    latest: Option<(MoveProgress, bool)>,
}

impl Display {
    pub fn new(json: bool) -> Self {
        let tty = if json {
            std::io::stderr().is_terminal()
        } else {
            std::io::stdout().is_terminal()
        };
        Self {
            to_stderr: json,
            tty,
            drawn: false,
            last_plain: None,
            latest: None,
        }
    }

    fn write(&self, text: &str) {
        // A closed terminal or pipe does not stop the move: the node runs it.
        let _ = if self.to_stderr {
            let mut e = std::io::stderr().lock();
            e.write_all(text.as_bytes()).and_then(|()| e.flush())
        } else {
            let mut o = std::io::stdout().lock();
            o.write_all(text.as_bytes()).and_then(|()| o.flush())
        };
    }

    pub fn show(&mut self, p: &MoveProgress) {
        let line = line(p);
        if self.tty {
            self.write(&format!("\r{line}\x1b[K"));
            self.drawn = true;
            self.latest = Some((*p, true));
        } else if self.last_plain.is_none_or(|t| t.elapsed() >= PLAIN_EVERY) {
            self.write(&format!("{line}\n"));
            self.last_plain = Some(Instant::now());
            self.latest = Some((*p, true));
        } else {
            self.latest = Some((*p, false));
        }
    }

    /// Ends the progress display: the last state is on screen, the cursor on a new line.
    pub fn finish(&mut self) {
        if self.drawn {
            self.write("\n");
            self.drawn = false;
        } else if let Some((p, false)) = self.latest {
            self.write(&format!("{}\n", line(&p)));
        }
        self.latest = None;
    }
}

/// `progress: 120/505 messages, 2.1 MB/10.3 MB (20%), 35.2 messages/s, 0.61 MB/s, ETA 14s`
pub fn line(p: &MoveProgress) -> String {
    let secs = (p.elapsed_ms as f64 / 1000.0).max(0.001);
    let done = if p.total_bytes > 0 {
        p.bytes as f64 / p.total_bytes as f64
    } else if p.total_messages > 0 {
        p.messages as f64 / p.total_messages as f64
    } else {
        1.0
    };
    let eta = if done >= 1.0 {
        "ETA 0s".to_string()
    } else if done > 0.0 {
        format!("ETA {}", duration(secs / done - secs))
    } else {
        "ETA -".to_string()
    };
    format!(
        "progress: {}/{} messages, {}/{} ({:.0}%), {:.1} messages/s, {:.2} MB/s, {eta}",
        p.messages,
        p.total_messages,
        bytes(p.bytes),
        bytes(p.total_bytes),
        (done * 100.0).min(100.0),
        p.messages as f64 / secs,
        p.bytes as f64 / secs / 1e6,
    )
}

fn bytes(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2} GB", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.1} MB", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1} kB", n as f64 / 1e3),
        n => format!("{n} B"),
    }
}

fn duration(secs: f64) -> String {
    let s = secs.round() as u64;
    match s {
        s if s >= 3600 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        s if s >= 60 => format!("{}m{:02}s", s / 60, s % 60),
        s => format!("{s}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_says_counts_rate_and_eta() {
        let p = MoveProgress {
            messages: 50,
            bytes: 2_500_000,
            total_messages: 200,
            total_bytes: 10_000_000,
            elapsed_ms: 10_000,
        };
        assert_eq!(
            line(&p),
            "progress: 50/200 messages, 2.5 MB/10.0 MB (25%), 5.0 messages/s, 0.25 MB/s, ETA 30s"
        );
        let p = MoveProgress {
            bytes: 10_000_000,
            messages: 200,
            ..p
        };
        assert!(line(&p).ends_with("(100%), 20.0 messages/s, 1.00 MB/s, ETA 0s"));
    }
}
