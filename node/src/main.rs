//! `dshare`: run a Domain Share node, or manage a running one through its admin service.

use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};

use ds_server::admin::proto::{self, admin_client::AdminClient, admin_request::Op};
use ds_server::{Config, Node, StartOptions};

mod dev_cluster;
mod progress;

#[derive(Parser, Debug)]
#[command(
    name = "dshare",
    version,
    about = "Domain Share: one e-mail domain, several offices"
)]
struct Cli {
    /// Configuration file (TOML). Without one, the embedded defaults are used.
    #[arg(short = 'c', long = "config", global = true, env = "DSHARE_CONFIG")]
    config: Option<PathBuf>,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Admin service address (default: the configuration's first admin listener).
    #[arg(long, global = true)]
    admin: Option<SocketAddr>,
    /// Print the result as JSON (queue list/show, account list, peers, lookup).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Copy, Clone, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum DkimCmd {
    /// Write a new RSA private key for DOMAIN (mode 0600) and print the DNS TXT record to
    /// publish; then add `{ domain, selector, key_file }` to `[outbound] dkim`.
    Generate {
        domain: String,
        #[arg(long, default_value = "dshare")]
        selector: String,
        /// Where the key goes (default: DOMAIN.SELECTOR.dkim.pem here); never overwritten.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a node (embedded defaults when no --config is given).
    Serve,
    /// Check a configuration and its files (certificate, key, cluster CA, secret, ports);
    /// prints each problem with its fix.
    CheckConfig {
        /// The configuration file (default: --config).
        file: Option<PathBuf>,
    },
    /// Manage accounts.
    #[command(subcommand)]
    Account(AccountCmd),
    /// Manage account aliases.
    #[command(subcommand)]
    Alias(AliasCmd),
    /// Manage Router records (`<john> = j.smith@client1.com`).
    #[command(subcommand)]
    Route(RouteCmd),
    /// Manage mailing lists.
    #[command(subcommand)]
    List(ListCmd),
    /// Show the served domains.
    #[command(subcommand)]
    Domain(DomainCmd),
    /// Show how a name resolves, step by step, and where it lives.
    Lookup {
        name: String,
        /// The local IP address the client would have connected to.
        #[arg(long)]
        local_ip: Option<IpAddr>,
        /// The TLS SNI host name the client would have sent.
        #[arg(long)]
        sni: Option<String>,
    },
    /// Show each peer's state, last round trip and last error.
    Peers,
    /// Check each peer end to end from this node: Minger, the SMTP relay, POP3 and IMAP, each
    /// with TLS verified against the cluster CA. Exits non-zero when a check fails.
    Doctor,
    /// Inspect and manage the outbound queue.
    #[command(subcommand)]
    Queue(QueueCmd),
    /// Generate a cluster CA, a certificate per node and the shared secret, for deployment.
    Pki {
        /// Output directory (files: ca.pem, NODE.cert.pem, NODE.key.pem, cluster.secret).
        #[arg(long)]
        out: PathBuf,
        /// Node ids (also their host names in the certificates).
        #[arg(required = true)]
        nodes: Vec<String>,
    },
    /// DKIM signing keys.
    #[command(subcommand)]
    Dkim(DkimCmd),
    /// Start several nodes in this process on 127.0.0.1, 127.0.0.2, … with demo accounts.
    DevCluster {
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Where the nodes keep their data (default: a fresh temporary directory).
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
}

#[derive(Args, Debug)]
struct PasswordArgs {
    /// Read the password from standard input (one line).
    #[arg(long, conflicts_with = "password")]
    password_stdin: bool,
    /// The password on the command line (for scripts; visible to other local users).
    #[arg(long)]
    password: Option<String>,
}

impl PasswordArgs {
    fn get(&self) -> anyhow::Result<String> {
        let pw = if let Some(p) = &self.password {
            p.clone()
        } else if self.password_stdin {
            let mut s = String::new();
            std::io::stdin()
                .take(4096)
                .read_to_string(&mut s)
                .context("reading the password from standard input")?;
            s.lines().next().unwrap_or("").to_string()
        } else {
            bail!("give the password with --password-stdin or --password");
        };
        if pw.is_empty() {
            bail!("empty password");
        }
        Ok(pw)
    }
}

#[derive(Subcommand, Debug)]
enum AccountCmd {
    /// Create an account (every peer is asked first).
    Add {
        name: String,
        #[command(flatten)]
        password: PasswordArgs,
        /// Create even if a peer cannot be asked (logged).
        #[arg(long)]
        force: bool,
    },
    /// Delete an account.
    Del {
        name: String,
    },
    /// List accounts.
    List {
        #[arg(long)]
        domain: Option<String>,
    },
    /// Change a password.
    Passwd {
        name: String,
        #[command(flatten)]
        password: PasswordArgs,
    },
    Enable {
        name: String,
    },
    Disable {
        name: String,
    },
    /// Move an account with all its mail to another node (run on its owner).
    Move {
        name: String,
        /// Node id of the new owner.
        #[arg(long, required_unless_present = "abort")]
        to: Option<String>,
        /// Only print what would move; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Cancel an interrupted move: the new owner drops its partial copy and the account
        /// is served by this node again (nothing is lost).
        #[arg(long, conflicts_with_all = ["to", "dry_run"])]
        abort: bool,
    },
}

#[derive(Subcommand, Debug)]
enum AliasCmd {
    /// Add ALIAS as another name of ACCOUNT.
    Add {
        alias: String,
        account: String,
    },
    Del {
        alias: String,
    },
}

#[derive(Subcommand, Debug)]
enum RouteCmd {
    /// Add a Router record: PATTERN (`<john>`, `<x@dom>`, `<*@dom>`) = TARGET (address or `error:text`).
    Add {
        pattern: String,
        target: String,
    },
    Del {
        pattern: String,
    },
    List,
}

#[derive(Subcommand, Debug)]
enum ListCmd {
    Add { name: String },
    Del { name: String },
    Members { name: String },
    Subscribe { list: String, member: String },
    Unsubscribe { list: String, member: String },
}

#[derive(Subcommand, Debug)]
enum DomainCmd {
    List,
}

/// Which queued messages a command applies to.
#[derive(Args, Debug)]
struct QueueSelectArgs {
    /// Message ids.
    ids: Vec<u64>,
    /// Every queued message.
    #[arg(long)]
    all: bool,
    /// Messages with a pending recipient on this node.
    #[arg(long)]
    node: Option<String>,
    /// Messages with a pending recipient in this domain.
    #[arg(long)]
    domain: Option<String>,
}

impl QueueSelectArgs {
    fn into_proto(self) -> proto::QueueSelect {
        proto::QueueSelect {
            ids: self.ids,
            all: self.all,
            node: self.node.unwrap_or_default(),
            domain: self.domain.unwrap_or_default(),
            recipient: String::new(),
        }
    }
}

#[derive(Subcommand, Debug)]
enum QueueCmd {
    /// List the queued messages.
    List,
    /// Show one message: envelope, status per recipient, header.
    Show { id: u64 },
    /// Try queued messages again now (like `postqueue -f` / `postqueue -s`).
    Retry {
        #[command(flatten)]
        select: QueueSelectArgs,
    },
    /// Try every queued message again now (`queue retry --all`).
    Flush,
    /// Keep messages queued without trying them (like `postsuper -h`).
    Hold {
        #[command(flatten)]
        select: QueueSelectArgs,
    },
    /// Let held messages go, trying them at once (like `postsuper -H`).
    Release {
        #[command(flatten)]
        select: QueueSelectArgs,
    },
    /// Drop queued messages without a bounce (like `postsuper -d`).
    Delete {
        #[command(flatten)]
        select: QueueSelectArgs,
        /// Drop this recipient from every message; a message goes when none is left.
        #[arg(long)]
        all_for: Option<String>,
    },
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => b.init(),
        LogFormat::Json => b.json().init(),
    }
}

fn load_config(path: &Option<PathBuf>) -> anyhow::Result<Config> {
    Ok(match path {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    })
}

/// How long the exit waits for blocking work still running (a thread stuck in a stalled
/// store would otherwise hold it for good; everything acknowledged is on disk by then).
const EXIT_WAIT: Duration = Duration::from_secs(10);

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logs(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("dshare: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let code = match runtime.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dshare: {e:#}");
            std::process::ExitCode::FAILURE
        }
    };
    runtime.shutdown_timeout(EXIT_WAIT);
    code
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::CheckConfig { file } = &cli.command {
        return check_config(file.as_ref().or(cli.config.as_ref()));
    }
    let config = load_config(&cli.config)?;
    let op = match cli.command {
        Command::Serve => return serve(config, cli.config.is_none()).await,
        Command::CheckConfig { .. } => unreachable!("handled above"),
        Command::DevCluster { nodes, data_dir } => return dev_cluster::run(nodes, data_dir).await,
        Command::Pki { out, nodes } => return dev_cluster::write_pki(&out, &nodes),
        Command::Dkim(DkimCmd::Generate {
            domain,
            selector,
            out,
        }) => return dev_cluster::write_dkim_key(&domain, &selector, out),
        Command::Account(c) => match c {
            AccountCmd::Add {
                name,
                password,
                force,
            } => Op::AccountAdd(proto::AccountAdd {
                name,
                password: password.get()?,
                force,
            }),
            AccountCmd::Del { name } => Op::AccountDel(proto::Name { name }),
            AccountCmd::Move {
                name,
                to,
                dry_run,
                abort,
            } => Op::AccountMove(proto::AccountMove {
                name,
                to: to.unwrap_or_default(),
                dry_run,
                abort,
            }),
            AccountCmd::List { domain } => Op::AccountList(proto::DomainFilter {
                domain: domain.unwrap_or_default(),
            }),
            AccountCmd::Passwd { name, password } => Op::AccountPasswd(proto::AccountAdd {
                name,
                password: password.get()?,
                force: false,
            }),
            AccountCmd::Enable { name } => Op::AccountEnable(proto::Name { name }),
            AccountCmd::Disable { name } => Op::AccountDisable(proto::Name { name }),
        },
        Command::Alias(c) => match c {
            AliasCmd::Add { alias, account } => Op::AliasAdd(proto::Pair {
                first: alias,
                second: account,
            }),
            AliasCmd::Del { alias } => Op::AliasDel(proto::Name { name: alias }),
        },
        Command::Route(c) => match c {
            RouteCmd::Add { pattern, target } => Op::RouteAdd(proto::Pair {
                first: pattern,
                second: target,
            }),
            RouteCmd::Del { pattern } => Op::RouteDel(proto::Name { name: pattern }),
            RouteCmd::List => Op::RouteList(proto::Empty {}),
        },
        Command::List(c) => match c {
            ListCmd::Add { name } => Op::ListAdd(proto::Name { name }),
            ListCmd::Del { name } => Op::ListDel(proto::Name { name }),
            ListCmd::Members { name } => Op::ListMembers(proto::Name { name }),
            ListCmd::Subscribe { list, member } => Op::ListSubscribe(proto::Pair {
                first: list,
                second: member,
            }),
            ListCmd::Unsubscribe { list, member } => Op::ListUnsubscribe(proto::Pair {
                first: list,
                second: member,
            }),
        },
        Command::Domain(DomainCmd::List) => Op::DomainList(proto::Empty {}),
        Command::Lookup {
            name,
            local_ip,
            sni,
        } => Op::Lookup(proto::Lookup {
            name,
            local_ip: local_ip.map(|ip| ip.to_string()).unwrap_or_default(),
            sni: sni.unwrap_or_default(),
        }),
        Command::Peers => Op::Peers(proto::Empty {}),
        Command::Doctor => Op::Doctor(proto::Empty {}),
        Command::Queue(c) => match c {
            QueueCmd::List => Op::QueueList(proto::Empty {}),
            QueueCmd::Show { id } => Op::QueueShow(proto::Id { id }),
            QueueCmd::Retry { select } => Op::QueueRetrySelect(select.into_proto()),
            QueueCmd::Flush => Op::QueueRetrySelect(proto::QueueSelect {
                all: true,
                ..Default::default()
            }),
            QueueCmd::Hold { select } => Op::QueueHold(select.into_proto()),
            QueueCmd::Release { select } => Op::QueueRelease(select.into_proto()),
            QueueCmd::Delete { select, all_for } => {
                let mut s = select.into_proto();
                s.recipient = all_for.unwrap_or_default();
                Op::QueueDeleteSelect(s)
            }
        },
    };
    if let Op::AccountMove(m) = op {
        return account_move(&config, cli.admin, m, cli.json).await;
    }
    let doctor = matches!(op, Op::Doctor(_));
    let reply = admin_call(&config, cli.admin, op, cli.json).await?;
    if doctor {
        let v: serde_json::Value =
            serde_json::from_str(&reply.json).context("the node's doctor report is not JSON")?;
        if v["ok"] != serde_json::Value::Bool(true) {
            bail!("some checks failed (see above)");
        }
    }
    Ok(())
}

fn check_config(file: Option<&PathBuf>) -> anyhow::Result<()> {
    let path = file.context("give the configuration file: dshare check-config FILE")?;
    let config = Config::load(path)?;
    let findings =
        ds_server::check::check_config(&config, ds_server::check::CheckOptions { ports: true });
    for f in &findings {
        println!("{f}");
    }
    let errors = findings
        .iter()
        .filter(|f| f.severity == ds_server::check::Severity::Error)
        .count();
    if errors > 0 {
        bail!("{errors} problem(s) in {}", path.display());
    }
    println!("{}: no problems found", path.display());
    Ok(())
}

async fn serve(config: Config, embedded_defaults: bool) -> anyhow::Result<()> {
    // The same checks as `check-config`, but the ports: binding reports those.
    let findings =
        ds_server::check::check_config(&config, ds_server::check::CheckOptions::default());
    let mut errors = 0;
    for f in &findings {
        if f.severity == ds_server::check::Severity::Error {
            errors += 1;
            eprintln!("{f}");
        } else {
            tracing::warn!("{f}");
        }
    }
    if errors > 0 {
        bail!(
            "{errors} problem(s) in the configuration (see above; `dshare check-config` lists them)"
        );
    }
    let node = Node::start(config, StartOptions::default()).await?;
    if embedded_defaults {
        node.state.ensure_postmaster_account().await;
    }
    let a = node.addrs();
    tracing::info!(smtp = ?a.smtp, pop3 = ?a.pop3, imap = ?a.imap, admin = ?a.admin, "ready");
    if std::env::var_os(REEXEC_ENV).is_some() {
        tracing::warn!("started again in place to reopen the store");
    }
    stall_store_for_tests(&node);
    let stop = watch_signals()?;
    tokio::select! {
        signal = stop => {
            let failed = signal.is_err();
            if !failed {
                tracing::info!("signal received, draining");
            }
            node.shutdown().await;
            if failed {
                bail!("the signal watch failed (see the log)");
            }
            Ok(())
        }
        () = node.store_needs_reopen() => {
            tracing::warn!("draining to reopen the store: this process starts again in place");
            // A stalled store may hold every worker of the runtime, and the drain with them:
            // past the grace, a plain thread starts the process again itself.
            let _ = std::thread::Builder::new()
                .name("dshare-reopen".into())
                .spawn(|| {
                    std::thread::sleep(REOPEN_GRACE);
                    if !STOPPING.load(Ordering::SeqCst) {
                        tracing::error!(grace = ?REOPEN_GRACE, "the drain did not end: starting again now");
                        if let Err(e) = reexec() {
                            tracing::error!(error = %e, "cannot start again");
                            std::process::exit(1);
                        }
                    }
                });
            node.shutdown().await;
            if STOPPING.load(Ordering::SeqCst) {
                // A stop came during the drain: stop, do not start again.
                return Ok(());
            }
            reexec()
        }
    }
}

/// Test hook for `node/tests/store_stall.rs`: with `DSHARE_TEST_STALL_STORE_FILE=PATH` in the
/// environment, the node stalls its store for good (a sled transaction held open, as a
/// deadlock inside sled would) as soon as PATH exists, and removes PATH. Without the variable
/// it does nothing.
fn stall_store_for_tests(node: &Node) {
    let Some(path) = std::env::var_os("DSHARE_TEST_STALL_STORE_FILE") else {
        return;
    };
    let store = node.state.store.clone();
    let _ = std::thread::Builder::new()
        .name("test-stall".into())
        .spawn(move || {
            let path = std::path::PathBuf::from(path);
            while std::fs::remove_file(&path).is_err() {
                std::thread::sleep(Duration::from_millis(50));
            }
            tracing::warn!("test hook: stalling the store");
            let (_never, release) = std::sync::mpsc::channel::<()>();
            let _ = store.stall_for_tests(&release);
        });
}

/// Set once SIGTERM or SIGINT has come: the process stops, it does not start again.
static STOPPING: AtomicBool = AtomicBool::new(false);

/// How long a drain after SIGTERM/SIGINT may take before the process ends anyway.
const STOP_GRACE: Duration = Duration::from_secs(120);

/// Waits for SIGTERM or SIGINT on a thread of its own, with a small runtime of its own: a
/// stalled store may hold every worker of the node's runtime, and a stop must still stop.
/// The receiver completes when a signal has come; if the process still runs
/// [`STOP_GRACE`] later, the thread ends it.
fn watch_signals() -> anyhow::Result<tokio::sync::oneshot::Receiver<()>> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the signal watch")?;
    std::thread::Builder::new()
        .name("dshare-signals".into())
        .spawn(move || {
            runtime.block_on(async {
                if let Err(e) = ds_net::os_signal().await {
                    tracing::error!(error = %e, "cannot watch for signals");
                    return;
                }
                STOPPING.store(true, Ordering::SeqCst);
                let _ = tx.send(());
                tokio::time::sleep(STOP_GRACE).await;
                tracing::error!(grace = ?STOP_GRACE, "the drain did not end: stopping now");
                std::process::exit(1);
            });
        })
        .context("cannot start the signal watch")?;
    Ok(rx)
}

/// How long the drain before a reopen may take before the process starts again anyway.
const REOPEN_GRACE: Duration = Duration::from_secs(60);

/// Set in the environment of a node that re-executed itself to reopen its store.
const REEXEC_ENV: &str = "DSHARE_REEXEC";

/// Replaces this process with a fresh `dshare` of the same arguments (same PID, so a
/// supervisor sees no restart). sled keeps a write error until its database is opened
/// again, and every part of the node holds the store, so starting anew is how the store
/// is reopened. Sockets and files are close-on-exec.
fn reexec() -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().context("cannot find the dshare executable")?;
    let err = std::process::Command::new(&exe)
        .args(std::env::args_os().skip(1))
        .env(REEXEC_ENV, "1")
        .exec();
    Err(anyhow::Error::new(err).context(format!("cannot re-execute {}", exe.display())))
}

/// The `authorization` header of every admin call.
#[derive(Clone)]
struct Bearer(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

type Admin =
    AdminClient<tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>>;

/// A client of the node's admin service; `timeout` bounds each call (until its first reply).
async fn admin_client(
    config: &Config,
    admin: Option<SocketAddr>,
    timeout: Duration,
) -> anyhow::Result<Admin> {
    let mut addr = admin
        .or_else(|| config.listen.admin.first().copied())
        .context("no admin listener configured (give --admin)")?;
    if addr.ip().is_unspecified() {
        addr.set_ip(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    let token = ds_server::admin::read_token(&config.node.data_dir).with_context(|| {
        format!(
            "reading the admin token in {} (is the node's data directory here?)",
            config.node.data_dir.display()
        )
    })?;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(timeout)
        .connect()
        .await
        .with_context(|| format!("cannot reach the node's admin service at {addr}"))?;
    Ok(AdminClient::with_interceptor(
        channel,
        Bearer(format!("Bearer {token}").parse()?),
    ))
}

/// Sends one command to the node's admin service, prints the reply and returns it.
async fn admin_call(
    config: &Config,
    admin: Option<SocketAddr>,
    op: Op,
    json: bool,
) -> anyhow::Result<proto::AdminReply> {
    let mut client = admin_client(config, admin, Duration::from_secs(60)).await?;
    match client.run(proto::AdminRequest { op: Some(op) }).await {
        Ok(reply) => {
            let reply = reply.into_inner();
            print_reply(&reply, json)?;
            Ok(reply)
        }
        Err(status) => bail!("{}", status.message()),
    }
}

fn print_reply(reply: &proto::AdminReply, json: bool) -> anyhow::Result<()> {
    if json {
        if reply.json.is_empty() {
            bail!("this command has no JSON output");
        }
        println!("{}", reply.json);
    } else {
        for line in &reply.lines {
            println!("{line}");
        }
    }
    Ok(())
}

/// `dshare account move`: runs on the account's owner (this node asks it if need be), shows
/// the progress as it goes, then the summary.
async fn account_move(
    config: &Config,
    admin: Option<SocketAddr>,
    request: proto::AccountMove,
    json: bool,
) -> anyhow::Result<()> {
    let mut client = admin_client(config, admin, ds_cluster::EVENT_WAIT).await?;
    let mut events = match client.r#move(request).await {
        Ok(r) => r.into_inner(),
        Err(status) => bail!("{}", status.message()),
    };
    let mut display = progress::Display::new(json);
    loop {
        let event = match tokio::time::timeout(ds_cluster::EVENT_WAIT, events.message()).await {
            Ok(Ok(Some(e))) => e,
            Ok(Ok(None)) => {
                display.finish();
                bail!(
                    "the node ended the move without a result; run the command again to see where it stands"
                );
            }
            Ok(Err(status)) => {
                display.finish();
                bail!("{}", status.message());
            }
            Err(_) => {
                display.finish();
                bail!(
                    "no word from the node for {:?}; the move may still run there (run the command again to finish it)",
                    ds_cluster::EVENT_WAIT
                );
            }
        };
        match event.event {
            Some(proto::move_event::Event::Progress(p)) => display.show(&p),
            Some(proto::move_event::Event::Done(reply)) => {
                display.finish();
                return print_reply(&reply, json);
            }
            None => {}
        }
    }
}
