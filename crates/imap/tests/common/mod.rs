//! Shared by the IMAP tests: a one-node cluster with an account, and a Python runner.

#![allow(dead_code)]

use ds_testkit::Cluster;

pub const USER: &str = "bob@example.com";
pub const PASS: &str = "bob-pass";

/// One node with `bob@example.com`.
pub async fn node() -> anyhow::Result<Cluster> {
    let c = Cluster::start(1).await?;
    c.node(0).add_account(USER, PASS).await?;
    Ok(c)
}

/// Runs a Python 3 script with `HOST`/`PORT` set and returns its standard output; fails with
/// its standard error.
pub fn python(addr: std::net::SocketAddr, script: &str) -> anyhow::Result<String> {
    let prelude = format!(
        "import imaplib, sys, socket, time\nHOST = '{}'\nPORT = {}\nUSER = '{USER}'\nPASS = '{PASS}'\n",
        addr.ip(),
        addr.port()
    );
    ds_testkit::python(&format!("{prelude}{script}"))
}

/// A message with a subject and a body of about `size` bytes.
pub fn message(subject: &str, size: usize) -> Vec<u8> {
    let mut m = format!(
        "From: Sender <sender@example.org>\r\nTo: bob@example.com\r\nSubject: {subject}\r\nDate: Mon, 7 Feb 1994 21:52:25 -0800\r\nMessage-ID: <{subject}@test>\r\n\r\n"
    )
    .into_bytes();
    let line = b"The quick brown fox jumps over the lazy dog, 0123456789.\r\n";
    while m.len() + line.len() <= size {
        m.extend_from_slice(line);
    }
    m
}
