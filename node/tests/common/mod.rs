//! Running the real `dshare` binary from tests.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_dshare");

/// A port free on 127.0.0.1 right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `dshare serve` process, killed (SIGKILL) when dropped.
pub struct Serve(pub Child);

impl Serve {
    /// Kills the node with SIGKILL and reaps it.
    pub fn kill(mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `dshare serve --config` and waits until each of `ports` on 127.0.0.1 accepts.
pub fn serve(config: &Path, ports: &[u16]) -> Serve {
    let child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let node = Serve(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    for port in ports {
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            assert!(Instant::now() < deadline, "node did not listen on {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    node
}
