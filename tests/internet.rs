//! "The Internet" for outbound tests and load tools: a DNS server and an SMTP sink on loopback.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ds_net::{MailStream, TlsAcceptor};

use hickory_proto::op::{Message, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, MX, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// A DNS server on loopback: `outside.test` has MX 10 `mx.outside.test`, which is 127.0.0.1;
/// every other name does not exist.
pub async fn dns_server() -> anyhow::Result<SocketAddr> {
    dns_server_with_txt(Vec::new()).await
}

/// [`dns_server`], which also answers TXT queries for the given absolute names (a DKIM key
/// record, say; a long value is cut into strings of 255).
pub async fn dns_server_with_txt(txt: Vec<(String, String)>) -> anyhow::Result<SocketAddr> {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    let addr = socket.local_addr()?;
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        loop {
            let Ok((n, from)) = socket.recv_from(&mut buf).await else {
                return;
            };
            let Ok(query) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            let mut reply = Message::response(query.metadata.id, OpCode::Query);
            reply.metadata.recursion_desired = query.metadata.recursion_desired;
            reply.metadata.recursion_available = true;
            reply.metadata.authoritative = true;
            for q in &query.queries {
                reply.add_query(q.clone());
                let name = q.name.to_ascii().to_ascii_lowercase();
                if let Some((_, value)) = txt.iter().find(|(n, _)| n.eq_ignore_ascii_case(&name)) {
                    if q.query_type == RecordType::TXT {
                        let strings = value
                            .as_bytes()
                            .chunks(255)
                            .map(|c| String::from_utf8_lossy(c).into_owned())
                            .collect();
                        reply.add_answer(Record::from_rdata(
                            q.name.clone(),
                            60,
                            RData::TXT(TXT::new(strings)),
                        ));
                    }
                    continue;
                }
                match (name.as_str(), q.query_type) {
                    ("outside.test.", RecordType::MX) => {
                        let mx = Name::from_ascii("mx.outside.test.").expect("name");
                        reply.add_answer(Record::from_rdata(
                            q.name.clone(),
                            60,
                            RData::MX(MX::new(10, mx)),
                        ));
                    }
                    ("mx.outside.test.", RecordType::A) => {
                        reply.add_answer(Record::from_rdata(
                            q.name.clone(),
                            60,
                            RData::A(A([127, 0, 0, 1].into())),
                        ));
                    }
                    ("outside.test.", _) | ("mx.outside.test.", _) => {}
                    _ => reply.metadata.response_code = ResponseCode::NXDomain,
                }
            }
            if let Ok(bytes) = reply.to_vec() {
                let _ = socket.send_to(&bytes, from).await;
            }
        }
    });
    Ok(addr)
}

/// "The Internet" of a test: [`dns_server`]'s address, a started [`Sink`] and its address.
pub async fn start() -> anyhow::Result<(SocketAddr, Sink, SocketAddr)> {
    let dns = dns_server().await?;
    let sink = Sink::default();
    let sink_addr = sink.start().await?;
    Ok((dns, sink, sink_addr))
}

/// `user` (password `pw`) submits `count` messages to `to` at node `at` over 587 STARTTLS
/// ([`crate::Submitter`]); fails unless every message was accepted.
pub fn submit(
    c: &ds_testkit::Cluster,
    at: usize,
    (user, pw): (&str, &str),
    to: &str,
    subject: &str,
    count: usize,
) -> anyhow::Result<()> {
    let submitter = crate::Submitter::new(c, at, user, pw);
    for i in 0..count {
        let message = format!("From: {user}\r\nTo: {to}\r\nSubject: {subject} {i}\r\n\r\nout\r\n");
        let out = submitter.send(&[to], &message, &[], &[])?;
        anyhow::ensure!(out.contains("refused {}"), "{out}");
    }
    Ok(())
}

/// The last error of a queue entry of node `i` that contains `what`.
pub fn queue_error(c: &ds_testkit::Cluster, i: usize, what: &str) -> Option<String> {
    c.node(i)
        .node()
        .state
        .queue
        .list()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|e| e.last_error)
        .find(|e| e.contains(what))
}

/// A message the sink took, and how.
#[derive(Debug, Clone)]
pub struct Received {
    pub message: String,
    /// The session ran TLS (STARTTLS) when the message came.
    pub tls: bool,
    /// The AUTH identity of the session, if it authenticated.
    pub user: Option<String>,
}

/// What a sink session does with `STARTTLS`.
#[derive(Clone)]
enum StartTls {
    Off,
    On(TlsAcceptor),
    /// Offered, but the handshake is broken: `220`, then junk, then the connection closes.
    Broken,
}

/// An SMTP sink on loopback: answers `rcpt_reply` to RCPT and keeps the messages it takes
/// (and its MAIL and RCPT lines); advertises `DSN` when told to. Optionally it offers STARTTLS, requires AUTH PLAIN (after TLS), takes `delay` before
/// answering the end of DATA, and counts the sessions open at once.
#[derive(Clone)]
pub struct Sink {
    rcpt_reply: Arc<Mutex<String>>,
    messages: Arc<Mutex<Vec<Received>>>,
    envelopes: Arc<Mutex<Vec<String>>>,
    dsn: Arc<AtomicBool>,
    starttls: StartTls,
    auth: Option<(String, String)>,
    delay: Duration,
    open: Arc<AtomicUsize>,
    max_open: Arc<AtomicUsize>,
}

impl Default for Sink {
    fn default() -> Self {
        Self {
            rcpt_reply: Arc::default(),
            messages: Arc::default(),
            envelopes: Arc::default(),
            dsn: Arc::default(),
            starttls: StartTls::Off,
            auth: None,
            delay: Duration::ZERO,
            open: Arc::default(),
            max_open: Arc::default(),
        }
    }
}

/// Bound on every wait of a sink session.
const SINK_TIMEOUT: Duration = Duration::from_secs(30);

impl Sink {
    /// Offers STARTTLS with this certificate (PEM chain and key).
    pub fn with_starttls(mut self, cert_pem: &[u8], key_pem: &[u8]) -> anyhow::Result<Sink> {
        let config = ds_net::tls::server_config_from_pem(cert_pem, key_pem)?;
        self.starttls = StartTls::On(TlsAcceptor::from(config));
        Ok(self)
    }

    /// Offers STARTTLS but breaks every handshake.
    pub fn with_broken_starttls(mut self) -> Sink {
        self.starttls = StartTls::Broken;
        self
    }

    /// Requires AUTH PLAIN as `user` with `password` (offered after STARTTLS only) before MAIL.
    pub fn with_auth(mut self, user: &str, password: &str) -> Sink {
        self.auth = Some((user.into(), password.into()));
        self
    }

    /// Waits this long before answering the end of each message.
    pub fn with_delay(mut self, delay: Duration) -> Sink {
        self.delay = delay;
        self
    }

    /// Advertise `DSN` in EHLO from now on.
    pub fn set_dsn(&self, on: bool) {
        self.dsn.store(on, Ordering::Relaxed);
    }

    /// The MAIL and RCPT lines received, without CRLF.
    pub fn envelopes(&self) -> Vec<String> {
        self.envelopes.lock().unwrap().clone()
    }

    pub fn set_rcpt_reply(&self, reply: &str) {
        *self.rcpt_reply.lock().unwrap() = reply.to_string();
    }

    pub fn messages(&self) -> Vec<String> {
        self.received().into_iter().map(|r| r.message).collect()
    }

    pub fn received(&self) -> Vec<Received> {
        self.messages.lock().unwrap().clone()
    }

    /// The most sessions that were open at once.
    pub fn max_sessions(&self) -> usize {
        self.max_open.load(Ordering::SeqCst)
    }

    pub async fn start(&self) -> anyhow::Result<SocketAddr> {
        self.set_rcpt_reply("250 2.1.5 OK");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let sink = self.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                // No Nagle: the TLS handshake's small writes would wait for delayed ACKs.
                let _ = stream.set_nodelay(true);
                let sink = sink.clone();
                tokio::spawn(async move {
                    let session = sink.session(MailStream::Plain(stream));
                    let _ = tokio::time::timeout(SINK_TIMEOUT, session).await;
                });
            }
        });
        Ok(addr)
    }

    fn ehlo(&self, tls: bool, user: &Option<String>) -> String {
        let mut caps = vec!["sink.outside.test"];
        if self.dsn.load(Ordering::Relaxed) {
            caps.push("DSN");
        }
        caps.push("8BITMIME");
        if !tls && !matches!(self.starttls, StartTls::Off) {
            caps.push("STARTTLS");
        }
        if tls && self.auth.is_some() && user.is_none() {
            caps.push("AUTH PLAIN");
        }
        let last = caps.len() - 1;
        caps.iter()
            .enumerate()
            .map(|(i, c)| format!("250{}{c}\r\n", if i == last { ' ' } else { '-' }))
            .collect()
    }

    /// `AUTH PLAIN <token>`: the user if the credential is right.
    fn check_auth(&self, line: &str) -> Option<String> {
        use base64::Engine;
        let (user, password) = self.auth.as_ref()?;
        let token = line.split_whitespace().nth(2)?;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(token)
            .ok()?;
        let parts: Vec<&[u8]> = decoded.split(|b| *b == 0).collect();
        (parts.len() == 3 && parts[1] == user.as_bytes() && parts[2] == password.as_bytes())
            .then(|| user.clone())
    }

    async fn session(&self, stream: MailStream) -> anyhow::Result<()> {
        let mut open = OpenSession::new(self);
        let mut r = BufReader::new(stream);
        send(&mut r, b"220 sink.outside.test ESMTP\r\n").await?;
        let mut accepted = 0;
        let mut user = None;
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).await? == 0 {
                return Ok(());
            }
            let tls = r.get_ref().is_tls();
            let verb = line.get(..4).unwrap_or("").to_ascii_uppercase();
            if verb == "MAIL" || verb == "RCPT" {
                self.envelopes
                    .lock()
                    .unwrap()
                    .push(line.trim_end().to_string());
            }
            let reply = match verb.as_str() {
                "EHLO" => self.ehlo(tls, &user),
                "STAR" if !tls => {
                    send(&mut r, b"220 2.0.0 go ahead\r\n").await?;
                    let stream = r.into_inner();
                    let acceptor = match &self.starttls {
                        StartTls::On(acceptor) => acceptor.clone(),
                        StartTls::Broken | StartTls::Off => {
                            let MailStream::Plain(mut tcp) = stream else {
                                return Ok(());
                            };
                            tcp.write_all(b"this is not TLS\r\n").await?;
                            return Ok(());
                        }
                    };
                    r = BufReader::new(stream.accept_tls(&acceptor, SINK_TIMEOUT).await?);
                    continue;
                }
                "AUTH" if tls => match self.check_auth(&line) {
                    Some(u) => {
                        user = Some(u);
                        "235 2.7.0 OK\r\n".into()
                    }
                    None => "535 5.7.8 bad credentials\r\n".into(),
                },
                "MAIL" if self.auth.is_some() && user.is_none() => {
                    "530 5.7.0 authentication required\r\n".into()
                }
                "MAIL" => {
                    accepted = 0;
                    "250 2.1.0 OK\r\n".into()
                }
                "RCPT" => {
                    let reply = self.rcpt_reply.lock().unwrap().clone();
                    if reply.starts_with('2') {
                        accepted += 1;
                    }
                    format!("{reply}\r\n")
                }
                "DATA" if accepted > 0 => {
                    send(&mut r, b"354 go ahead\r\n").await?;
                    let mut message = String::new();
                    loop {
                        let mut l = String::new();
                        if r.read_line(&mut l).await? == 0 {
                            return Ok(());
                        }
                        if l == ".\r\n" {
                            break;
                        }
                        message.push_str(l.strip_prefix('.').unwrap_or(&l));
                    }
                    tokio::time::sleep(self.delay).await;
                    self.messages.lock().unwrap().push(Received {
                        message,
                        tls,
                        user: user.clone(),
                    });
                    "250 2.0.0 queued\r\n".into()
                }
                "DATA" => "554 5.5.1 no valid recipients\r\n".into(),
                "QUIT" => {
                    // Over for the count before the client sees the reply (and opens the next).
                    open.end();
                    send(&mut r, b"221 2.0.0 bye\r\n").await?;
                    return Ok(());
                }
                _ => "250 2.0.0 OK\r\n".into(),
            };
            send(&mut r, reply.as_bytes()).await?;
        }
    }
}

/// A sink session counted as open until [`OpenSession::end`] or its drop.
struct OpenSession<'a> {
    open: &'a AtomicUsize,
    ended: bool,
}

impl<'a> OpenSession<'a> {
    fn new(sink: &'a Sink) -> Self {
        let now = sink.open.fetch_add(1, Ordering::SeqCst) + 1;
        sink.max_open.fetch_max(now, Ordering::SeqCst);
        Self {
            open: &sink.open,
            ended: false,
        }
    }

    fn end(&mut self) {
        if !self.ended {
            self.ended = true;
            self.open.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl Drop for OpenSession<'_> {
    fn drop(&mut self) {
        self.end();
    }
}

async fn send(r: &mut BufReader<MailStream>, bytes: &[u8]) -> std::io::Result<()> {
    r.get_mut().write_all(bytes).await?;
    r.get_mut().flush().await
}
