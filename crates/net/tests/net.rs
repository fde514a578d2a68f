//! End-to-end tests of ds-net over real loopback sockets.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use ds_net::tls::{Pki, client_config_with_ca, load_or_create_self_signed, server_config_from_pem};
use ds_net::{
    ConnContext, Error, LineConn, ListenOptions, MailStream, Shutdown, TlsAcceptor, TlsConnector,
    serve, shutdown_pair, splice,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const T: Duration = Duration::from_secs(5);
const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// A connected (client, server) pair of TCP streams.
async fn tcp_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
    (client.unwrap(), accepted.unwrap().0)
}

async fn bind() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (listener, addr)
}

fn test_tls() -> (TlsAcceptor, TlsConnector) {
    let pki = Pki::generate("Test CA");
    let (cert, key) = pki.issue(&["mail.client2.com", "localhost"], &[LOCALHOST]);
    let server = server_config_from_pem(&cert, &key).unwrap();
    let client = client_config_with_ca(&pki.ca_cert_pem()).unwrap();
    (TlsAcceptor::from(server), TlsConnector::from(client))
}

#[tokio::test]
async fn overlong_line_is_discarded_and_the_next_line_still_works() {
    let (mut client, server) = tcp_pair().await;
    let mut conn = LineConn::new(server);
    let mut input = vec![b'x'; 5000];
    input.extend_from_slice(b"\r\nNOOP\r\n");
    client.write_all(&input).await.unwrap();

    let err = conn.read_line(1000, T).await.unwrap_err();
    assert!(matches!(err, Error::LineTooLong { max: 1000 }), "{err:?}");
    assert_eq!(conn.read_line(1000, T).await.unwrap().unwrap(), b"NOOP\r\n");

    // A line of exactly max_len (terminator included) is accepted.
    client.write_all(b"12345678\r\n").await.unwrap();
    assert_eq!(
        conn.read_line(10, T).await.unwrap().unwrap(),
        b"12345678\r\n"
    );

    // Overlong line arriving in pieces.
    for _ in 0..4 {
        client.write_all(&[b'y'; 700]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    client.write_all(b"\nQUIT\n").await.unwrap();
    assert!(matches!(
        conn.read_line(1000, T).await,
        Err(Error::LineTooLong { .. })
    ));
    assert_eq!(conn.read_line(1000, T).await.unwrap().unwrap(), b"QUIT\n");
}

#[tokio::test]
async fn eof_and_timeout() {
    let (mut client, server) = tcp_pair().await;
    let mut conn = LineConn::new(server);

    let started = Instant::now();
    let err = conn
        .read_line(100, Duration::from_millis(100))
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err:?}");
    assert!(started.elapsed() >= Duration::from_millis(100));

    // A partial line survives a timeout.
    client.write_all(b"HEL").await.unwrap();
    assert!(
        conn.read_line(100, Duration::from_millis(100))
            .await
            .unwrap_err()
            .is_timeout()
    );
    client.write_all(b"O\r\nBYE\r\n").await.unwrap();
    assert_eq!(conn.read_line(100, T).await.unwrap().unwrap(), b"HELO\r\n");
    drop(client);
    assert_eq!(conn.read_line(100, T).await.unwrap().unwrap(), b"BYE\r\n");
    assert!(conn.read_line(100, T).await.unwrap().is_none());

    // EOF in the middle of a line.
    let (mut client, server) = tcp_pair().await;
    let mut conn = LineConn::new(server);
    client.write_all(b"partial").await.unwrap();
    drop(client);
    assert!(matches!(
        conn.read_line(100, T).await,
        Err(Error::UnexpectedEof)
    ));
}

#[tokio::test]
async fn literals_and_bulk_reads() {
    let (mut client, server) = tcp_pair().await;
    let mut conn = LineConn::new(server);
    client
        .write_all(b"A1 APPEND {5}\r\nhello world")
        .await
        .unwrap();
    assert_eq!(
        conn.read_line(100, T).await.unwrap().unwrap(),
        b"A1 APPEND {5}\r\n"
    );
    assert_eq!(conn.read_exact(5, 10, T).await.unwrap(), b"hello");
    assert!(matches!(
        conn.read_exact(11, 10, T).await,
        Err(Error::TooLarge { len: 11, max: 10 })
    ));
    assert_eq!(conn.read_some(3, T).await.unwrap().unwrap(), b" wo");
    assert_eq!(conn.read_some(100, T).await.unwrap().unwrap(), b"rld");
    conn.write_all(b"+OK\r\n").await.unwrap();
    conn.flush().await.unwrap();
    let mut reply = [0u8; 5];
    client.read_exact(&mut reply).await.unwrap();
    assert_eq!(&reply, b"+OK\r\n");
    drop(client);
    assert!(conn.read_some(100, T).await.unwrap().is_none());
    assert!(matches!(
        conn.read_exact(1, 10, T).await,
        Err(Error::UnexpectedEof)
    ));
}

#[tokio::test]
async fn starttls_upgrade_sees_sni() {
    let (acceptor, connector) = test_tls();
    let (client, server) = tcp_pair().await;

    let server_task = tokio::spawn(async move {
        let mut conn = LineConn::new(MailStream::from(server));
        conn.write_all(b"220 ready\r\n").await?;
        conn.flush().await?;
        let line = conn.read_line(512, T).await?.unwrap_or_default();
        assert_eq!(line, b"STARTTLS\r\n");
        conn.write_all(b"220 go ahead\r\n").await?;
        let mut conn = conn.start_tls(&acceptor, T).await?;
        let stream = conn.get_ref();
        assert!(stream.is_tls());
        let sni = stream.sni();
        let line = conn.read_line(512, T).await?.unwrap_or_default();
        conn.write_all(&line).await?;
        conn.flush().await?;
        Ok::<_, Error>(sni)
    });

    let mut conn = LineConn::new(MailStream::from(client));
    assert_eq!(
        conn.read_line(512, T).await.unwrap().unwrap(),
        b"220 ready\r\n"
    );
    conn.write_all(b"STARTTLS\r\n").await.unwrap();
    conn.flush().await.unwrap();
    assert_eq!(
        conn.read_line(512, T).await.unwrap().unwrap(),
        b"220 go ahead\r\n"
    );
    let (stream, buffered) = conn.into_parts();
    assert!(buffered.is_empty());
    let stream = stream
        .connect_tls(&connector, "MAIL.client2.com", T)
        .await
        .unwrap();
    assert!(stream.is_tls());
    let mut conn = LineConn::new(stream);
    conn.write_all(b"EHLO secure\r\n").await.unwrap();
    conn.flush().await.unwrap();
    assert_eq!(
        conn.read_line(512, T).await.unwrap().unwrap(),
        b"EHLO secure\r\n"
    );

    let sni = server_task.await.unwrap().unwrap();
    assert_eq!(sni.as_deref(), Some("mail.client2.com"));

    // Upgrading twice fails.
    let (acceptor, _) = test_tls();
    let err = conn
        .into_inner()
        .accept_tls(&acceptor, T)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::AlreadyTls));
}

#[tokio::test]
async fn plaintext_pipelined_after_starttls_is_refused() {
    let (acceptor, _) = test_tls();
    let (mut client, server) = tcp_pair().await;
    client
        .write_all(b"STARTTLS\r\nMAIL FROM:<evil@x>\r\n")
        .await
        .unwrap();
    let mut conn = LineConn::new(MailStream::from(server));
    assert_eq!(
        conn.read_line(512, T).await.unwrap().unwrap(),
        b"STARTTLS\r\n"
    );
    let err = conn.start_tls(&acceptor, T).await.unwrap_err();
    assert!(matches!(err, Error::PlaintextAfterStartTls(20)), "{err:?}");
}

#[tokio::test]
async fn client_rejects_certificate_from_another_ca() {
    let (acceptor, _) = test_tls();
    let other = Pki::generate("Other CA");
    let connector = TlsConnector::from(client_config_with_ca(&other.ca_cert_pem()).unwrap());
    let (client, server) = tcp_pair().await;
    let server_task =
        tokio::spawn(async move { MailStream::from(server).accept_tls(&acceptor, T).await });
    let err = MailStream::from(client)
        .connect_tls(&connector, "localhost", T)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("certificate"), "{err}");
    assert!(server_task.await.unwrap().is_err());
}

#[tokio::test]
async fn implicit_tls_via_serve() {
    let (acceptor, connector) = test_tls();
    let (listener, addr) = bind().await;
    let (trigger, shutdown) = shutdown_pair();
    let opts = ListenOptions {
        implicit_tls: Some(acceptor),
        ..ListenOptions::new("imaps")
    };
    let handler = |stream: MailStream, ctx: ConnContext, _shutdown: Shutdown| async move {
        let mut conn = LineConn::new(stream);
        let reply = format!(
            "* OK {} tls={} sni={} local={}\r\n",
            ctx.protocol,
            ctx.tls,
            ctx.sni.as_deref().unwrap_or("-"),
            ctx.local
        );
        if conn.write_all(reply.as_bytes()).await.is_ok() {
            let _ = conn.flush().await;
        }
    };
    let server = tokio::spawn(serve(listener, opts, handler, shutdown));

    let tcp = TcpStream::connect(addr).await.unwrap();
    let stream = MailStream::from(tcp)
        .connect_tls(&connector, "mail.client2.com", T)
        .await
        .unwrap();
    let mut conn = LineConn::new(stream);
    let line = conn.read_line(512, T).await.unwrap().unwrap();
    assert_eq!(
        String::from_utf8(line).unwrap(),
        format!("* OK imaps tls=true sni=mail.client2.com local={addr}\r\n")
    );

    // A plaintext client never gets a handler; the failed handshake is dropped.
    let mut plain = TcpStream::connect(addr).await.unwrap();
    plain.write_all(b"a001 LOGIN x y\r\n").await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(T, plain.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert!(!buf[..n].starts_with(b"* OK"));

    trigger.trigger();
    tokio::time::timeout(T, server).await.unwrap().unwrap();
}

/// A handler that greets, then waits for the shutdown (or the client's close) and says goodbye.
async fn greet_and_wait(stream: MailStream, _ctx: ConnContext, shutdown: Shutdown) {
    let mut conn = LineConn::new(stream);
    if conn.write_all(b"+OK hello\r\n").await.is_err() || conn.flush().await.is_err() {
        return;
    }
    tokio::select! {
        () = shutdown.wait() => {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let _ = conn.write_all(b"+OK bye\r\n").await;
            let _ = conn.flush().await;
        }
        _ = conn.read_line(512, Duration::from_secs(30)) => {}
    }
}

#[tokio::test]
async fn per_ip_limit_closes_the_second_connection() {
    let (listener, addr) = bind().await;
    let (trigger, shutdown) = shutdown_pair();
    let opts = ListenOptions {
        max_per_ip: 1,
        ..ListenOptions::new("pop3")
    };
    let server = tokio::spawn(serve(listener, opts, greet_and_wait, shutdown));

    let mut first = LineConn::new(TcpStream::connect(addr).await.unwrap());
    assert_eq!(
        first.read_line(512, T).await.unwrap().unwrap(),
        b"+OK hello\r\n"
    );

    let mut second = LineConn::new(TcpStream::connect(addr).await.unwrap());
    match second.read_line(512, T).await {
        Ok(None) | Err(Error::Io(_)) => {}
        other => panic!("second connection not closed: {other:?}"),
    }

    // Once the first one is gone, a new one is accepted.
    drop(first);
    let mut third = None;
    for _ in 0..50 {
        let mut conn = LineConn::new(TcpStream::connect(addr).await.unwrap());
        if let Ok(Some(line)) = conn.read_line(512, T).await {
            assert_eq!(line, b"+OK hello\r\n");
            third = Some(conn);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(third.is_some());

    trigger.trigger();
    tokio::time::timeout(T, server).await.unwrap().unwrap();
}

#[tokio::test]
async fn graceful_shutdown_waits_for_running_connections() {
    let (listener, addr) = bind().await;
    let (trigger, shutdown) = shutdown_pair();
    let server = tokio::spawn(serve(
        listener,
        ListenOptions::new("pop3"),
        greet_and_wait,
        shutdown,
    ));

    let mut conn = LineConn::new(TcpStream::connect(addr).await.unwrap());
    assert_eq!(
        conn.read_line(512, T).await.unwrap().unwrap(),
        b"+OK hello\r\n"
    );

    let started = Instant::now();
    trigger.trigger();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        !server.is_finished(),
        "serve returned before the connection finished"
    );
    // The listener is closed: new connections are refused.
    assert!(TcpStream::connect(addr).await.is_err());

    assert_eq!(
        conn.read_line(512, T).await.unwrap().unwrap(),
        b"+OK bye\r\n"
    );
    tokio::time::timeout(T, server).await.unwrap().unwrap();
    assert!(started.elapsed() >= Duration::from_millis(200));
}

#[tokio::test]
async fn shutdown_grace_aborts_stuck_connections() {
    let (listener, addr) = bind().await;
    let (trigger, shutdown) = shutdown_pair();
    let opts = ListenOptions {
        shutdown_grace: Duration::from_millis(100),
        ..ListenOptions::new("smtp")
    };
    let stuck = |stream: MailStream, _ctx: ConnContext, _shutdown: Shutdown| async move {
        let mut conn = LineConn::new(stream);
        let _ = conn.write_all(b"220 hi\r\n").await;
        let _ = conn.flush().await;
        tokio::time::sleep(Duration::from_secs(3600)).await;
    };
    let server = tokio::spawn(serve(listener, opts, stuck, shutdown));
    let mut conn = LineConn::new(TcpStream::connect(addr).await.unwrap());
    assert_eq!(
        conn.read_line(512, T).await.unwrap().unwrap(),
        b"220 hi\r\n"
    );
    trigger.trigger();
    tokio::time::timeout(T, server).await.unwrap().unwrap();
    // The aborted task dropped its socket.
    assert!(conn.read_line(512, T).await.unwrap().is_none());
}

#[tokio::test]
async fn splice_copies_both_ways() {
    // client <-> proxy_in ==splice== proxy_out <-> owner
    let (mut client, proxy_in) = tcp_pair().await;
    let (proxy_out, mut owner) = tcp_pair().await;
    let proxy = tokio::spawn(splice(proxy_in, proxy_out, T));

    owner.write_all(b"* OK owner ready\r\n").await.unwrap();
    let mut buf = [0u8; 18];
    client.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"* OK owner ready\r\n");

    let big = vec![b'z'; 300_000];
    let (written, read) = tokio::join!(client.write_all(&big), async {
        let mut got = vec![0u8; big.len()];
        owner.read_exact(&mut got).await.map(|_| got)
    });
    written.unwrap();
    assert_eq!(read.unwrap(), big);

    client.write_all(b"a LOGOUT\r\n").await.unwrap();
    let mut buf = [0u8; 10];
    owner.read_exact(&mut buf).await.unwrap();
    owner.write_all(b"* BYE\r\n").await.unwrap();
    drop(owner);
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).await.unwrap();
    assert_eq!(rest, b"* BYE\r\n");
    drop(client);

    let (up, down) = tokio::time::timeout(T, proxy)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(up, 300_000 + 10);
    assert_eq!(down, 18 + 7);
}

#[tokio::test]
async fn splice_ends_when_idle() {
    let (_client, proxy_in) = tcp_pair().await;
    let (proxy_out, _owner) = tcp_pair().await;
    let started = Instant::now();
    let counts = splice(proxy_in, proxy_out, Duration::from_millis(150))
        .await
        .unwrap();
    assert_eq!(counts, (0, 0));
    assert!(started.elapsed() >= Duration::from_millis(150));
}

#[test]
fn self_signed_certificate_is_created_once_and_reused() {
    let dir = tempfile::tempdir().unwrap();
    let names = vec!["mail.example.com".to_owned(), "127.0.0.1".to_owned()];
    let (cert, key) = load_or_create_self_signed(dir.path(), &names).unwrap();
    let (cert2, key2) = load_or_create_self_signed(dir.path(), &names).unwrap();
    assert_eq!(cert, cert2);
    assert_eq!(key, key2);
    assert!(cert.starts_with(b"-----BEGIN CERTIFICATE-----"));
    server_config_from_pem(&cert, &key).unwrap();
    // The certificate is its own trust anchor.
    client_config_with_ca(&cert).unwrap();

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("tls-key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}

#[test]
fn bad_pem_is_a_typed_error() {
    assert!(matches!(
        server_config_from_pem(b"garbage", b"garbage"),
        Err(Error::NoCertificate)
    ));
    let pki = Pki::generate("CA");
    let (cert, _) = pki.issue(&["a.example"], &[]);
    assert!(server_config_from_pem(&cert, b"").is_err());
    ds_net::ensure_crypto_provider();
    ds_net::ensure_crypto_provider();
}

#[tokio::test]
async fn shutdown_signal_reaches_every_clone() {
    let (trigger, shutdown) = shutdown_pair();
    let other = shutdown.clone();
    let late = trigger.subscribe();
    assert!(!shutdown.is_shutdown());
    let waiter = tokio::spawn(other.wait());
    trigger.trigger();
    tokio::time::timeout(T, waiter).await.unwrap().unwrap();
    assert!(shutdown.is_shutdown());
    assert!(late.is_shutdown());
    tokio::time::timeout(T, late.wait()).await.unwrap();

    let (trigger, shutdown) = shutdown_pair();
    drop(trigger);
    tokio::time::timeout(T, shutdown.wait()).await.unwrap();

    let never = Shutdown::never();
    assert!(
        tokio::time::timeout(Duration::from_millis(20), never.wait())
            .await
            .is_err()
    );
}

/// The client half-closes after its last command (`… QUIT` then FIN, as `nc -N` or a script does);
/// the owner's answer is long and slow to come. The splice must keep copying it while it keeps
/// moving, not cut it a fixed few seconds after the client's FIN.
#[tokio::test(start_paused = true)]
async fn splice_keeps_draining_after_a_half_close_while_data_moves() {
    let (mut client, proxy_in) = tokio::io::duplex(64);
    let (proxy_out, mut owner) = tokio::io::duplex(64);
    let proxy = tokio::spawn(splice(proxy_in, proxy_out, Duration::from_secs(600)));

    client.write_all(b"RETR 1\r\n").await.unwrap();
    client.shutdown().await.unwrap();
    let mut cmd = Vec::new();
    owner.read_to_end(&mut cmd).await.unwrap();
    assert_eq!(cmd, b"RETR 1\r\n");

    // 20 chunks, one every 2 s: 40 s in all, never 5 s without an octet.
    let sender = tokio::spawn(async move {
        for i in 0..20u8 {
            tokio::time::sleep(Duration::from_secs(2)).await;
            owner.write_all(&[b'a' + i; 10]).await.unwrap();
        }
        owner.shutdown().await.unwrap();
    });
    let mut got = Vec::new();
    client.read_to_end(&mut got).await.unwrap();
    assert_eq!(got.len(), 200, "answer cut after the client's FIN");
    sender.await.unwrap();
    let (up, down) = proxy.await.unwrap().unwrap();
    assert_eq!((up, down), (8, 200));
}

/// After one side closed, the other direction is dropped once it stops moving for a while.
#[tokio::test(start_paused = true)]
async fn splice_ends_soon_after_a_half_close_when_nothing_moves() {
    let (mut client, proxy_in) = tokio::io::duplex(64);
    let (proxy_out, _owner) = tokio::io::duplex(64);
    let started = tokio::time::Instant::now();
    let proxy = tokio::spawn(splice(proxy_in, proxy_out, Duration::from_secs(600)));
    client.shutdown().await.unwrap();
    proxy.await.unwrap().unwrap();
    let took = started.elapsed();
    assert!(took < Duration::from_secs(60), "{took:?}");
}
