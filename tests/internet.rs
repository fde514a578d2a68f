//! "The Internet" for outbound tests and load tools: a DNS server and an SMTP sink on loopback.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

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

/// An SMTP sink on loopback: answers `rcpt_reply` to RCPT and keeps the messages it takes
/// (and its MAIL and RCPT lines); advertises `DSN` when told to.
#[derive(Clone, Default)]
pub struct Sink {
    rcpt_reply: Arc<Mutex<String>>,
    messages: Arc<Mutex<Vec<String>>>,
    envelopes: Arc<Mutex<Vec<String>>>,
    dsn: Arc<std::sync::atomic::AtomicBool>,
}

impl Sink {
    /// Advertise `DSN` in EHLO from now on.
    pub fn set_dsn(&self, on: bool) {
        self.dsn.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// The MAIL and RCPT lines received, without CRLF.
    pub fn envelopes(&self) -> Vec<String> {
        self.envelopes.lock().unwrap().clone()
    }

    pub fn set_rcpt_reply(&self, reply: &str) {
        *self.rcpt_reply.lock().unwrap() = reply.to_string();
    }

    pub fn messages(&self) -> Vec<String> {
        self.messages.lock().unwrap().clone()
    }

    pub async fn start(&self) -> anyhow::Result<SocketAddr> {
        self.set_rcpt_reply("250 2.1.5 OK");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let sink = self.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let sink = sink.clone();
                tokio::spawn(async move {
                    let _ = sink.session(stream).await;
                });
            }
        });
        Ok(addr)
    }

    async fn session(&self, stream: tokio::net::TcpStream) -> anyhow::Result<()> {
        let (r, mut w) = stream.into_split();
        let mut r = BufReader::new(r);
        w.write_all(b"220 sink.outside.test ESMTP\r\n").await?;
        let mut accepted = 0;
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).await? == 0 {
                return Ok(());
            }
            let verb = line.get(..4).unwrap_or("").to_ascii_uppercase();
            if verb == "MAIL" || verb == "RCPT" {
                self.envelopes
                    .lock()
                    .unwrap()
                    .push(line.trim_end().to_string());
            }
            let reply = match verb.as_str() {
                "EHLO" if self.dsn.load(std::sync::atomic::Ordering::Relaxed) => {
                    "250-sink.outside.test\r\n250-DSN\r\n250 8BITMIME\r\n".to_string()
                }
                "EHLO" => "250-sink.outside.test\r\n250 8BITMIME\r\n".to_string(),
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
                    w.write_all(b"354 go ahead\r\n").await?;
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
                    self.messages.lock().unwrap().push(message);
                    "250 2.0.0 queued\r\n".into()
                }
                "DATA" => "554 5.5.1 no valid recipients\r\n".into(),
                "QUIT" => {
                    w.write_all(b"221 2.0.0 bye\r\n").await?;
                    return Ok(());
                }
                _ => "250 2.0.0 OK\r\n".into(),
            };
            w.write_all(reply.as_bytes()).await?;
        }
    }
}
