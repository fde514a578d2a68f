//! The client side of Minger: one lazily connected channel per peer, the secret on every
//! call, a timeout on every call, and the peer's health as seen from here.

use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Uri};
use tonic::{Request, Response, Status};

use crate::proto::minger_client::MingerClient;
use crate::{Error, PeerConfig, Result, SECRET_HEADER};

/// How a peer looked on the last call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerState {
    /// Never called yet.
    Unknown,
    /// The last call succeeded.
    Up,
    /// The last call failed.
    Down,
}

/// A peer's health, for operators (`dshare` status, metrics).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStatus {
    pub id: String,
    pub minger_url: String,
    pub state: PeerState,
    /// Round-trip time of the last successful call.
    pub last_rtt: Option<Duration>,
    pub last_success: Option<SystemTime>,
    pub last_error: Option<String>,
    pub last_error_at: Option<SystemTime>,
}

/// Bound on an `Authenticate` call: the owner may wait out its login throttle and run Argon2.
pub(crate) const AUTHENTICATE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub(crate) struct Peer {
    pub(crate) id: String,
    pub(crate) smtp_override: Option<String>,
    url: String,
    client: MingerClient<Channel>,
    /// A second lazy channel whose requests may take [`AUTHENTICATE_TIMEOUT`].
    slow_client: MingerClient<Channel>,
    /// The channel runs TLS verified against the cluster CA (an `https://` URL).
    pub(crate) verified_tls: bool,
    secret: MetadataValue<Ascii>,
    timeout: Duration,
    status: Mutex<PeerStatus>,
}

/// Builds the lazy channel: nothing is dialled until the first call.
fn channel(
    peer: &PeerConfig,
    ca_pem: Option<&[u8]>,
    timeout: Duration,
    request_timeout: Duration,
) -> Result<Channel> {
    let endpoint_err = |source| Error::Endpoint {
        peer: peer.id.clone(),
        source,
    };
    let uri: Uri = peer
        .minger_url
        .parse()
        .map_err(|e| Error::Config(format!("peer {}: bad URL: {e}", peer.id)))?;
    let mut endpoint = Endpoint::from(uri.clone())
        .connect_timeout(timeout)
        .timeout(request_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(timeout);
    match uri.scheme_str() {
        Some("https") => {
            let ca = ca_pem.ok_or_else(|| {
                Error::Config(format!("peer {} uses https without a cluster CA", peer.id))
            })?;
            let host = uri
                .host()
                .ok_or_else(|| Error::Config(format!("peer {}: URL has no host", peer.id)))?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let tls = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca))
                .domain_name(host);
            endpoint = endpoint.tls_config(tls).map_err(endpoint_err)?;
        }
        Some("http") => {}
        _ => {
            return Err(Error::Config(format!(
                "peer {}: minger URL must be https:// or http://",
                peer.id
            )));
        }
    }
    Ok(endpoint.connect_lazy())
}

/// A failed call in a few words: the gRPC code, its message and the transport's reason.
pub(crate) fn describe(status: &Status) -> String {
    let mut text = format!("{:?}", status.code());
    if !status.message().is_empty() {
        text.push_str(": ");
        text.push_str(status.message());
    }
    let mut source = std::error::Error::source(status);
    let mut depth = 0;
    while let Some(s) = source {
        if depth >= 4 {
            break;
        }
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
        depth += 1;
    }
    text
}

impl Peer {
    pub(crate) fn new(
        config: &PeerConfig,
        ca_pem: Option<&[u8]>,
        secret: &str,
        timeout: Duration,
    ) -> Result<Self> {
        let secret = MetadataValue::try_from(secret)
            .map_err(|_| Error::Config("the cluster secret is not valid metadata".into()))?;
        Ok(Self {
            id: config.id.clone(),
            smtp_override: config.smtp.clone(),
            url: config.minger_url.clone(),
            client: MingerClient::new(channel(config, ca_pem, timeout, timeout)?),
            slow_client: MingerClient::new(channel(
                config,
                ca_pem,
                timeout,
                AUTHENTICATE_TIMEOUT.max(timeout),
            )?),
            verified_tls: config.minger_url.starts_with("https://") && ca_pem.is_some(),
            secret,
            timeout,
            status: Mutex::new(PeerStatus {
                id: config.id.clone(),
                minger_url: config.minger_url.clone(),
                state: PeerState::Unknown,
                last_rtt: None,
                last_success: None,
                last_error: None,
                last_error_at: None,
            }),
        })
    }

    pub(crate) fn status(&self) -> PeerStatus {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// A client and a request carrying the secret and the timeout, for calls that
    /// [`Peer::call`] cannot make (client streaming). Not recorded in the peer's status.
    pub(crate) fn request<T>(&self, message: T) -> (MingerClient<Channel>, Request<T>) {
        let mut request = Request::new(message);
        request
            .metadata_mut()
            .insert(SECRET_HEADER, self.secret.clone());
        request.set_timeout(self.timeout);
        (self.client.clone(), request)
    }

    /// The bound on one call.
    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// One call to the peer, with the secret, bounded by the timeout, recorded in the
    /// peer's status and the metrics. `Err` carries a short reason.
    pub(crate) async fn call<Req, Rep, F, Fut>(
        &self,
        rpc: &'static str,
        message: Req,
        f: F,
    ) -> std::result::Result<Rep, String>
    where
        F: FnOnce(MingerClient<Channel>, Request<Req>) -> Fut,
        Fut: Future<Output = std::result::Result<Response<Rep>, Status>>,
    {
        self.call_on(&self.client, self.timeout, rpc, message, f)
            .await
    }

    /// [`Peer::call`] for a request that may take up to [`AUTHENTICATE_TIMEOUT`].
    pub(crate) async fn call_slow<Req, Rep, F, Fut>(
        &self,
        rpc: &'static str,
        message: Req,
        f: F,
    ) -> std::result::Result<Rep, String>
    where
        F: FnOnce(MingerClient<Channel>, Request<Req>) -> Fut,
        Fut: Future<Output = std::result::Result<Response<Rep>, Status>>,
    {
        let timeout = AUTHENTICATE_TIMEOUT.max(self.timeout);
        self.call_on(&self.slow_client, timeout, rpc, message, f)
            .await
    }

    async fn call_on<Req, Rep, F, Fut>(
        &self,
        client: &MingerClient<Channel>,
        timeout: Duration,
        rpc: &'static str,
        message: Req,
        f: F,
    ) -> std::result::Result<Rep, String>
    where
        F: FnOnce(MingerClient<Channel>, Request<Req>) -> Fut,
        Fut: Future<Output = std::result::Result<Response<Rep>, Status>>,
    {
        let mut request = Request::new(message);
        request
            .metadata_mut()
            .insert(SECRET_HEADER, self.secret.clone());
        request.set_timeout(timeout);
        let started = Instant::now();
        let outcome = tokio::time::timeout(timeout, f(client.clone(), request)).await;
        let rtt = started.elapsed();
        metrics::histogram!("dshare_peer_rpc_seconds", "peer" => self.id.clone())
            .record(rtt.as_secs_f64());
        let result = match outcome {
            Ok(Ok(reply)) => Ok(reply.into_inner()),
            Ok(Err(status)) => Err(describe(&status)),
            Err(_) => Err(format!("no answer within {timeout:?}")),
        };
        let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        match &result {
            Ok(_) => {
                status.state = PeerState::Up;
                status.last_rtt = Some(rtt);
                status.last_success = Some(SystemTime::now());
            }
            Err(reason) => {
                metrics::counter!("dshare_peer_errors_total", "peer" => self.id.clone())
                    .increment(1);
                if status.state != PeerState::Down {
                    tracing::warn!(peer = %self.id, url = %self.url, rpc, %reason, "peer call failed");
                } else {
                    tracing::debug!(peer = %self.id, rpc, %reason, "peer call failed");
                }
                status.state = PeerState::Down;
                status.last_error = Some(reason.clone());
                status.last_error_at = Some(SystemTime::now());
            }
        }
        result
    }
}
