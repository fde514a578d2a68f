//! A fresh node's `/metrics` lists every series with HELP and TYPE before any traffic. A test
//! binary of its own: the Prometheus recorder is process-wide.

use ds_server::telemetry::{CATALOG, Kind};
use ds_testkit::Cluster;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn scrape(addr: std::net::SocketAddr) -> anyhow::Result<String> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await?;
    let mut body = String::new();
    s.read_to_string(&mut body).await?;
    anyhow::ensure!(body.starts_with("HTTP/1.1 200"), "{body}");
    Ok(body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_node_lists_every_series_with_help_and_type() -> anyhow::Result<()> {
    let c = Cluster::start(2).await?;
    let body = scrape(c.node(0).node().addrs().metrics[0]).await?;
    for s in CATALOG {
        let kind = match s.kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        };
        assert!(
            body.contains(&format!("# HELP {} ", s.name)),
            "no HELP for {}:\n{body}",
            s.name
        );
        assert!(
            body.contains(&format!("# TYPE {} {kind}\n", s.name)),
            "no TYPE {kind} for {}:\n{body}",
            s.name
        );
        let sample = match s.kind {
            Kind::Histogram => format!("{}_count", s.name),
            _ => s.name.to_string(),
        };
        assert!(
            body.lines().any(|l| l.starts_with(&sample)),
            "no sample of {}:\n{body}",
            s.name
        );
    }
    // Labelled series are there at zero, one per label value and per peer.
    assert!(
        body.contains("dshare_smtp_messages_total{result=\"accepted\"} 0"),
        "{body}"
    );
    assert!(
        body.contains("dshare_peer_errors_total{peer=\"node-b\"} 0"),
        "{body}"
    );
    assert!(body.contains("dshare_build_info{"), "{body}");
    c.shutdown().await;
    Ok(())
}
