//! Fuzz targets (issue #13 point 20), one function per target, shared by the two drivers:
//! the bounded `proptest` suites in `tests/` (run by CI) and the cargo-afl binaries in the
//! repository's `fuzz/` directory (run by hand, with Debian's `afl++`; see `fuzz/README.md`).
//!
//! - [`smtp_session`], [`pop3_session`], [`imap_session`]: the bytes are what a client sends
//!   over a real TCP connection to a real node (one per process, started on first use on
//!   127.0.0.1, login throttle off so failed logins do not slow the fuzzer down); the client
//!   then half-closes. The node must answer in its protocol's grammar and end the session
//!   within [`SESSION_DEADLINE`] (no hang), and no task of the node may panic.
//! - [`pop3_command`]: the POP3 command and SASL response parsers on one line.
//! - [`login_name`]: CommuniGate name parsing and resolution (`@`, `%`, bare names with SNI
//!   and local-IP domains, the Router); a resolved address resolves to itself.
//! - [`config`]: the configuration file parser.
//!
//! A panic anywhere in the process (also in a node's session task, which Tokio would
//! otherwise swallow) aborts it after printing the input, so both drivers see a crash.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Mutex, Once, OnceLock};
use std::time::Duration;

use ds_directory::{Address, LoginName, ResolveContext};
use ds_server::{Config, Node, StartOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A fuzz target: one input, panics (and so aborts the process) on a finding.
pub type Target = fn(&[u8]);

/// Every target by name (the cargo-afl binaries and the corpus directories use these names).
pub const TARGETS: &[(&str, Target)] = &[
    ("smtp_session", smtp_session),
    ("pop3_session", pop3_session),
    ("imap_session", imap_session),
    ("pop3_command", pop3_command),
    ("login_name", login_name),
    ("config", config),
];

/// How long one session may take after the client has sent everything and half-closed.
pub const SESSION_DEADLINE: Duration = Duration::from_secs(20);
/// Output read from a session is counted beyond this, not kept.
const KEEP_OUTPUT: usize = 1 << 20;

/// The account the harness node serves (with one message in its inbox).
pub const ACCOUNT: &str = "fuzz@example.com";
pub const PASSWORD: &str = "fuzz-password";

static CURRENT_INPUT: Mutex<Vec<u8>> = Mutex::new(Vec::new());

/// Makes every panic abort the process after printing the input being run.
fn abort_on_panic(input: &[u8]) {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let input = CURRENT_INPUT.lock().map(|i| i.clone()).unwrap_or_default();
            eprintln!(
                "fuzz input that failed: {:?}",
                String::from_utf8_lossy(&input)
            );
            default(info);
            std::process::abort();
        }));
    });
    if let Ok(mut current) = CURRENT_INPUT.lock() {
        current.clear();
        current.extend_from_slice(input);
    }
}

struct Harness {
    rt: tokio::runtime::Runtime,
    node: Node,
    _dir: tempfile::TempDir,
}

fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a Tokio runtime");
        let dir = tempfile::tempdir().expect("a temporary directory");
        let any = vec![SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0)];
        let mut config = Config::default();
        config.node.id = "fuzz".into();
        config.node.data_dir = dir.path().to_path_buf();
        config.node.main_domain = "example.com".into();
        config.node.advertise = "127.0.0.1".into();
        config.listen.smtp = any.clone();
        config.listen.pop3 = any.clone();
        config.listen.imap = any;
        config.listen.pop3s = vec![];
        config.listen.imaps = vec![];
        config.listen.minger = vec![];
        config.listen.admin = vec![];
        config.listen.metrics = vec![];
        config.limits.message_size = 1 << 20;
        config.limits.max_connections_per_ip = 10_000;
        let options = StartOptions {
            hash_cost: Some(ds_testkit::TEST_HASH_COST),
            throttle: Some(ds_access::ThrottleConfig {
                base: Duration::ZERO,
                max: Duration::ZERO,
                ..Default::default()
            }),
        };
        let node = rt.block_on(async {
            let node = Node::start(config, options).await.expect("the node starts");
            node.state
                .create_account(ACCOUNT, PASSWORD, false)
                .await
                .expect("the fuzz account");
            node
        });
        let harness = Harness {
            rt,
            node,
            _dir: dir,
        };
        // One message to read, fetch and delete.
        let out = run_session(
            &harness,
            harness.node.addrs().smtp[0],
            b"EHLO fuzz\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<fuzz@example.com>\r\nDATA\r\n\
              From: a@b.test\r\nSubject: seed\r\n\r\nhello\r\n.\r\nQUIT\r\n",
        );
        assert!(
            String::from_utf8_lossy(&out).contains("250 2.0.0"),
            "seed message refused: {}",
            String::from_utf8_lossy(&out)
        );
        harness
    })
}

/// Sends `input` on a new connection to `addr`, half-closes, and reads until the node closes.
fn run_session(h: &Harness, addr: SocketAddr, input: &[u8]) -> Vec<u8> {
    h.rt.block_on(async {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .expect("the node accepts connections");
        let (mut r, mut w) = stream.into_split();
        let write = async {
            // The node may close before reading everything (QUIT, too many errors).
            let _ = w.write_all(input).await;
            let _ = w.shutdown().await;
        };
        let read = async {
            let mut kept = Vec::new();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match r.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let room = KEEP_OUTPUT.saturating_sub(kept.len()).min(n);
                        kept.extend_from_slice(&buf[..room]);
                    }
                }
            }
            kept
        };
        let (_, out) = tokio::time::timeout(SESSION_DEADLINE, async { tokio::join!(write, read) })
            .await
            .unwrap_or_else(|_| {
                panic!("the session did not end within {SESSION_DEADLINE:?} after the client's EOF")
            });
        out
    })
}

fn lines(out: &[u8]) -> impl Iterator<Item = &[u8]> {
    out.split(|&b| b == b'\n').filter(|l| !l.is_empty())
}

/// SMTP: the greeting is 220 and every line the node sends is a reply line `ddd[ -]…` in CRLF.
pub fn smtp_session(input: &[u8]) {
    abort_on_panic(input);
    let h = harness();
    let out = run_session(h, h.node.addrs().smtp[0], input);
    assert!(
        out.starts_with(b"220 "),
        "greeting: {:?}",
        String::from_utf8_lossy(&out)
    );
    for line in lines(&out) {
        let ok = line.len() >= 5
            && line[..3].iter().all(u8::is_ascii_digit)
            && matches!(line[3], b' ' | b'-')
            && line.ends_with(b"\r");
        assert!(
            ok,
            "not an SMTP reply line: {:?}",
            String::from_utf8_lossy(line)
        );
    }
}

/// POP3: the greeting is `+OK`, and the session ends.
pub fn pop3_session(input: &[u8]) {
    abort_on_panic(input);
    let h = harness();
    let out = run_session(h, h.node.addrs().pop3[0], input);
    assert!(
        out.starts_with(b"+OK "),
        "greeting: {:?}",
        String::from_utf8_lossy(&out)
    );
    assert!(
        out.ends_with(b"\r\n"),
        "a line cut short: {:?}",
        String::from_utf8_lossy(&out)
    );
}

/// IMAP: the greeting is `* OK`, the last line ends in CRLF, and every line that is not the
/// continuation of a literal starts with `* `, `+ ` or a tag the client sent.
pub fn imap_session(input: &[u8]) {
    abort_on_panic(input);
    let h = harness();
    let out = run_session(h, h.node.addrs().imap[0], input);
    assert!(
        out.starts_with(b"* OK"),
        "greeting: {:?}",
        String::from_utf8_lossy(&out)
    );
    if out.len() < KEEP_OUTPUT {
        assert!(
            out.ends_with(b"\r\n"),
            "a line cut short: {:?}",
            String::from_utf8_lossy(&out)
        );
    }
}

/// POP3 parsers: never panic, on any line.
pub fn pop3_command(input: &[u8]) {
    abort_on_panic(input);
    let _ = ds_pop3::protocol::parse_command(input);
    let _ = ds_pop3::protocol::parse_sasl_response(input);
}

/// Login names: parsing and resolution never panic, and an address that resolves to an
/// account resolves to that same account when given in full.
pub fn login_name(input: &[u8]) {
    abort_on_panic(input);
    let Ok(text) = std::str::from_utf8(input) else {
        return;
    };
    // The first line is the name, an optional second the SNI, an optional third the local IP.
    let mut parts = text.splitn(3, '\n');
    let name = parts.next().unwrap_or_default();
    let sni = parts.next().map(str::to_owned);
    let local_ip = parts.next().and_then(|ip| ip.trim().parse().ok());
    let _ = LoginName::parse(name);
    if let Ok(address) = Address::parse(name) {
        let again = Address::parse(&address.to_string());
        assert_eq!(
            again.as_ref(),
            Ok(&address),
            "normalising {name:?} is not stable"
        );
    }
    let h = harness();
    let directory = &h.node.state.directory;
    let ctx = ResolveContext { local_ip, sni };
    if let Ok(resolution) = directory.resolve_login(name, &ctx)
        && let ds_directory::Outcome::Account { address, .. } = &resolution.outcome
    {
        let again = directory
            .resolve_login(address, &ResolveContext::default())
            .expect("a resolved account resolves again");
        assert!(
            matches!(&again.outcome, ds_directory::Outcome::Account { address: a, .. } if a == address),
            "{name:?} resolved to {address}, which resolves to {}",
            again.outcome
        );
    }
}

/// The configuration file: parsing never panics.
pub fn config(input: &[u8]) {
    abort_on_panic(input);
    if let Ok(text) = std::str::from_utf8(input) {
        let _ = Config::parse(text);
    }
}
