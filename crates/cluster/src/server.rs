//! The server side of Minger: answers peers from this node's directory only (never by
//! asking other peers), guards creations with reservations, drops cache entries on request.

use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ds_directory::{Address, Directory, Outcome};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status};

use crate::locator::{Caches, Scope};
use crate::proto::minger_server::{Minger, MingerServer};
use crate::proto::{
    AuthResult, AuthenticateReply, AuthenticateRequest, HelloReply, HelloRequest, InvalidateReply,
    InvalidateRequest, Kind, ListPeersReply, ListPeersRequest, LookupReply, LookupRequest,
    MoveBeginReply, MoveBeginRequest, MoveFinishReply, MoveFinishRequest, MoveMailboxReply,
    MoveMailboxRequest, MovePutChunk, MovePutReply, MoveSyncReply, MoveSyncRequest, Purpose,
    Refusal, ReleaseReply, ReleaseRequest, ReserveReply, ReserveRequest,
};
use crate::reservation::{Refused, Reservations};
use crate::{AuthAnswer, PasswordAuthority};
use crate::{
    DEFAULT_RESERVATION_TTL, Endpoints, Error, MAX_RESERVATION_TTL, Result, SECRET_HEADER,
    ensure_crypto_provider,
};

/// Bound on any one request handled by the Minger server.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Concurrent requests per peer connection.
const CONCURRENCY_PER_CONNECTION: usize = 64;

/// The Minger service of one node. Cheap to clone.
#[derive(Clone)]
pub struct MingerService {
    pub(crate) inner: Arc<Inner>,
    /// Checks passwords for `Authenticate`; without one every check is `TEMP`.
    authority: Option<Arc<dyn PasswordAuthority>>,
}

pub(crate) struct Inner {
    pub(crate) node_id: String,
    pub(crate) advertise: Endpoints,
    secret: Vec<u8>,
    pub(crate) directory: Directory,
    scope: Scope,
    pub(crate) reservations: Reservations,
    pub(crate) caches: Caches,
    lookups: AtomicU64,
    /// The mail store account moves write into; `None`: moves are refused.
    pub(crate) mail: Option<ds_store::MailStore>,
    /// Runs the moves peers ask this node (the owner) to run; `None`: refused.
    pub(crate) mover: Option<crate::Locator>,
}

impl std::fmt::Debug for MingerService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MingerService")
            .field("node_id", &self.inner.node_id)
            .finish_non_exhaustive()
    }
}

impl MingerService {
    pub(crate) fn new(
        node_id: String,
        advertise: Endpoints,
        secret: &str,
        directory: Directory,
        scope: Scope,
        reservations: Reservations,
        caches: Caches,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                node_id,
                advertise,
                secret: secret.as_bytes().to_vec(),
                directory,
                scope,
                reservations,
                caches,
                lookups: AtomicU64::new(0),
                mail: None,
                mover: None,
            }),
            authority: None,
        }
    }

    /// Answers `Authenticate` with `authority` (the node's password checker and throttle).
    pub fn with_authority(mut self, authority: Arc<dyn PasswordAuthority>) -> Self {
        self.authority = Some(authority);
        self
    }

    /// The mail store account moves write into (before the service is shared).
    pub(crate) fn with_mail(mut self, mail: Option<ds_store::MailStore>) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.mail = mail;
        }
        self
    }

    /// The Locator that runs the moves peers ask for (before the service is shared).
    pub(crate) fn with_mover(mut self, locator: crate::Locator) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.mover = Some(locator);
        }
        self
    }

    /// Authenticated `Lookup` calls served so far.
    pub fn lookups_served(&self) -> u64 {
        self.inner.lookups.load(Ordering::Relaxed)
    }

    /// Checks the cluster secret in constant time; a caller without it learns nothing.
    pub(crate) fn authorize<T>(&self, request: &Request<T>) -> std::result::Result<(), Status> {
        let given = request
            .metadata()
            .get(SECRET_HEADER)
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        if bool::from(given.ct_eq(&self.inner.secret)) {
            Ok(())
        } else {
            tracing::warn!(remote = ?request.remote_addr(), "Minger call without the cluster secret");
            Err(Status::unauthenticated(""))
        }
    }

    fn internal(context: &str, error: impl std::fmt::Display) -> Status {
        tracing::error!(%error, "{context}");
        Status::internal("")
    }
}

fn parse(address: &str) -> std::result::Result<String, Status> {
    Address::parse(address)
        .map(|a| a.to_string())
        .map_err(|e| Status::invalid_argument(e.to_string()))
}

#[tonic::async_trait]
impl Minger for MingerService {
    async fn lookup(
        &self,
        request: Request<LookupRequest>,
    ) -> std::result::Result<Response<LookupReply>, Status> {
        self.authorize(&request)?;
        self.inner.lookups.fetch_add(1, Ordering::Relaxed);
        let req = request.into_inner();
        let purpose = Purpose::try_from(req.purpose).unwrap_or(Purpose::Unspecified);
        let not_found = Response::new(LookupReply::default());
        let Ok(address) = Address::parse(&req.address) else {
            return Ok(not_found);
        };
        if !self
            .inner
            .scope
            .shares(self.inner.directory.domains(), address.domain())
        {
            tracing::debug!(address = %address, from = %req.from_node, "lookup outside the shared domains");
            return Ok(not_found);
        }
        let resolution = self
            .inner
            .directory
            .resolve_address(&address.to_string())
            .map_err(|e| Self::internal("Minger lookup", e))?;
        let (kind, canonical, can_receive) = match resolution.outcome {
            Outcome::Account { address, enabled } => (Kind::Account, address, enabled),
            Outcome::List(address) => (Kind::List, address, true),
            _ => {
                tracing::debug!(address = %address, from = %req.from_node, purpose = purpose.as_str_name(), "lookup: not found");
                return Ok(not_found);
            }
        };
        tracing::debug!(address = %address, from = %req.from_node, purpose = purpose.as_str_name(), %canonical, "lookup: found");
        let advertise = &self.inner.advertise;
        Ok(Response::new(LookupReply {
            found: true,
            kind: kind.into(),
            canonical,
            owner: self.inner.node_id.clone(),
            can_receive,
            smtp: advertise.smtp.clone(),
            pop3: advertise.pop3.clone(),
            imap: advertise.imap.clone(),
        }))
    }

    async fn reserve(
        &self,
        request: Request<ReserveRequest>,
    ) -> std::result::Result<Response<ReserveReply>, Status> {
        self.authorize(&request)?;
        let req = request.into_inner();
        let address = parse(&req.address)?;
        if req.from_node.is_empty() {
            return Err(Status::invalid_argument("from_node is empty"));
        }
        let ttl = match req.ttl_seconds {
            0 => DEFAULT_RESERVATION_TTL,
            s => Duration::from_secs(s.into()).min(MAX_RESERVATION_TTL),
        };
        let outcome = self
            .inner
            .reservations
            .reserve(&self.inner.directory, &address, &req.from_node, ttl)
            .map_err(|e| Self::internal("Minger reserve", e))?;
        let reply = match outcome {
            Ok(()) => ReserveReply {
                granted: true,
                reason: String::new(),
                refusal: Refusal::None.into(),
            },
            Err(Refused::Taken(kind)) => ReserveReply {
                granted: false,
                reason: format!("exists as {kind}"),
                refusal: if kind == crate::reservation::LIST {
                    Refusal::TakenList.into()
                } else {
                    Refusal::Taken.into()
                },
            },
            Err(Refused::Reserved(holder)) => ReserveReply {
                granted: false,
                reason: format!("being created by {holder}"),
                refusal: Refusal::Reserved.into(),
            },
        };
        // The address may come into existence on the asking node: a "no node has it" we
        // cached must not hide it (DESIGN.md §4; the negative cache).
        self.inner.caches.drop_entry(&address).await;
        tracing::info!(%address, from = %req.from_node, granted = reply.granted, reason = %reply.reason, "reservation asked");
        Ok(Response::new(reply))
    }

    async fn release(
        &self,
        request: Request<ReleaseRequest>,
    ) -> std::result::Result<Response<ReleaseReply>, Status> {
        self.authorize(&request)?;
        let req = request.into_inner();
        let address = parse(&req.address)?;
        self.inner
            .reservations
            .release(&address, &req.from_node)
            .map_err(|e| Self::internal("Minger release", e))?;
        // The address may have just come into existence elsewhere: drop what we believed.
        self.inner.caches.drop_entry(&address).await;
        Ok(Response::new(ReleaseReply {}))
    }

    async fn invalidate(
        &self,
        request: Request<InvalidateRequest>,
    ) -> std::result::Result<Response<InvalidateReply>, Status> {
        self.authorize(&request)?;
        let req = request.into_inner();
        let address = parse(&req.address)?;
        tracing::info!(%address, from = %req.from_node, "cache entry invalidated by peer");
        self.inner.caches.drop_entry(&address).await;
        Ok(Response::new(InvalidateReply {}))
    }

    async fn authenticate(
        &self,
        request: Request<AuthenticateRequest>,
    ) -> std::result::Result<Response<AuthenticateReply>, Status> {
        self.authorize(&request)?;
        let req = request.into_inner();
        let (address, from, client) = (
            req.address.clone(),
            req.from_node.clone(),
            req.client_ip.clone(),
        );
        let answer = self.check_password(req).await;
        let reply = match &answer {
            AuthAnswer::Ok(canonical) => AuthenticateReply {
                result: AuthResult::Ok.into(),
                canonical: canonical.clone(),
            },
            AuthAnswer::Bad => AuthenticateReply {
                result: AuthResult::Bad.into(),
                canonical: String::new(),
            },
            AuthAnswer::Temp(_) => AuthenticateReply {
                result: AuthResult::Temp.into(),
                canonical: String::new(),
            },
        };
        match answer {
            AuthAnswer::Temp(reason) => {
                tracing::warn!(%address, %from, %client, %reason, "peer password check: temporary failure")
            }
            AuthAnswer::Ok(_) => {
                tracing::info!(%address, %from, %client, "peer password check: ok")
            }
            AuthAnswer::Bad => {
                tracing::info!(%address, %from, %client, "peer password check: refused")
            }
        }
        Ok(Response::new(reply))
    }

    async fn list_peers(
        &self,
        request: Request<ListPeersRequest>,
    ) -> std::result::Result<Response<ListPeersReply>, Status> {
        self.authorize(&request)?;
        let req = request.into_inner();
        let list = parse(&req.list)?;
        let keeps = self
            .inner
            .directory
            .list(&list)
            .map_err(|e| Self::internal("Minger list peers", e))?
            .is_some();
        Ok(Response::new(ListPeersReply {
            keeps,
            owner: self.inner.node_id.clone(),
            smtp: self.inner.advertise.smtp.clone(),
        }))
    }

    async fn hello(
        &self,
        request: Request<HelloRequest>,
    ) -> std::result::Result<Response<HelloReply>, Status> {
        self.authorize(&request)?;
        let a = &self.inner.advertise;
        Ok(Response::new(HelloReply {
            node_id: self.inner.node_id.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            smtp: a.smtp.clone(),
            pop3: a.pop3.clone(),
            imap: a.imap.clone(),
        }))
    }

    async fn move_begin(
        &self,
        request: Request<MoveBeginRequest>,
    ) -> std::result::Result<Response<MoveBeginReply>, Status> {
        self.do_move_begin(request).await
    }

    async fn move_mailbox(
        &self,
        request: Request<MoveMailboxRequest>,
    ) -> std::result::Result<Response<MoveMailboxReply>, Status> {
        self.do_move_mailbox(request).await
    }

    async fn move_put(
        &self,
        request: Request<tonic::Streaming<MovePutChunk>>,
    ) -> std::result::Result<Response<MovePutReply>, Status> {
        self.do_move_put(request).await
    }

    async fn move_sync(
        &self,
        request: Request<MoveSyncRequest>,
    ) -> std::result::Result<Response<MoveSyncReply>, Status> {
        self.do_move_sync(request).await
    }

    async fn move_finish(
        &self,
        request: Request<MoveFinishRequest>,
    ) -> std::result::Result<Response<MoveFinishReply>, Status> {
        self.do_move_finish(request).await
    }

    type MoveRunStream = crate::move_run::MoveRunStream;

    async fn move_run(
        &self,
        request: Request<crate::proto::MoveRunRequest>,
    ) -> std::result::Result<Response<Self::MoveRunStream>, Status> {
        self.do_move_run(request).await
    }

    async fn move_abort(
        &self,
        request: Request<crate::proto::MoveAbortRequest>,
    ) -> std::result::Result<Response<crate::proto::MoveAbortReply>, Status> {
        self.do_move_abort(request).await
    }
}

impl MingerService {
    async fn check_password(&self, req: AuthenticateRequest) -> AuthAnswer {
        let Some(authority) = &self.authority else {
            return AuthAnswer::Temp("this node checks no passwords for peers".into());
        };
        let Ok(address) = Address::parse(&req.address) else {
            return AuthAnswer::Bad;
        };
        if !self
            .inner
            .scope
            .shares(self.inner.directory.domains(), address.domain())
        {
            return AuthAnswer::Bad;
        }
        let client_ip = req
            .client_ip
            .parse()
            .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
        authority
            .check(&address.to_string(), &req.password, client_ip)
            .await
    }
}

/// Serves Minger (and gRPC health, reporting SERVING) on `listener` until `shutdown`
/// resolves. `tls` is `(cert_pem, key_pem)`; `None` serves plaintext (loopback only).
pub async fn serve_minger(
    listener: TcpListener,
    service: MingerService,
    tls: Option<(Vec<u8>, Vec<u8>)>,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    ensure_crypto_provider();
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<MingerServer<MingerService>>().await;
    let mut builder = Server::builder()
        .timeout(REQUEST_TIMEOUT)
        .concurrency_limit_per_connection(CONCURRENCY_PER_CONNECTION)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)));
    if let Some((cert, key)) = tls {
        builder = builder
            .tls_config(ServerTlsConfig::new().identity(Identity::from_pem(cert, key)))
            .map_err(Error::Serve)?;
    }
    let local = listener.local_addr().ok();
    tracing::info!(addr = ?local, node = %service.inner.node_id, "Minger listening");
    builder
        .add_service(health_service)
        .add_service(MingerServer::new(service))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown,
        )
        .await
        .map_err(Error::Serve)
}
