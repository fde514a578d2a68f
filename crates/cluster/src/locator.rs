//! The Locator (DESIGN.md §4): where does an address live? Local directory first, then the
//! positive cache, then every peer at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ds_directory::{Address, Directory, Domains, Outcome};
use ds_store::Store;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use moka::future::Cache;

use crate::peer::{Peer, PeerStatus};
use crate::proto::{self, InvalidateRequest, ListPeersRequest, LookupReply, LookupRequest};
use crate::reservation::Reservations;
use crate::server::MingerService;
use crate::{ClusterConfig, Result, ensure_crypto_provider};

/// Most owners kept in the positive cache.
const POSITIVE_CACHE_CAPACITY: u64 = 100_000;
/// Most addresses kept in the negative cache.
const NEGATIVE_CACHE_CAPACITY: u64 = 100_000;
/// Added to the per-peer timeout to bound a whole fan-out.
const FAN_OUT_SLACK: Duration = Duration::from_millis(250);

/// Why an address is located; passed on to peers for their logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    Rcpt,
    Sender,
    Login,
    Admin,
}

impl From<Purpose> for proto::Purpose {
    fn from(p: Purpose) -> Self {
        match p {
            Purpose::Rcpt => proto::Purpose::Rcpt,
            Purpose::Sender => proto::Purpose::Sender,
            Purpose::Login => proto::Purpose::Login,
            Purpose::Admin => proto::Purpose::Admin,
        }
    }
}

/// What a peer has under an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Account,
    List,
}

/// The peer that owns an address, as it answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// The owner's node id (from our configuration, not from the wire).
    pub node: String,
    /// The address after the owner's aliases and Router records: log in / deliver with it.
    pub canonical: String,
    pub kind: Kind,
    /// `false` for a disabled account (Minger status 4).
    pub can_receive: bool,
    /// The owner's endpoints, `host:port`.
    pub smtp: String,
    pub pop3: String,
    pub imap: String,
}

/// Where an address lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// An account on this node.
    Local { address: String, enabled: bool },
    /// A mailing list kept on this node (peers may keep versions of it too).
    LocalList(String),
    /// On a peer.
    Remote(Owner),
    /// In a domain this node does not serve: mail for it goes to the Internet, logins fail.
    RemoteHost(String),
    /// No node has it (or its domain is not shared).
    Unknown,
    /// Refused by a Router `error` record or a routing loop, or not a valid address; the
    /// text says why. Treat like `Unknown`.
    Refused(String),
    /// Some peer could not be asked and none had it: try again later.
    TempFail(String),
}

impl Location {
    /// Label for `dshare_lookups_total{outcome}`.
    pub fn outcome(&self) -> &'static str {
        match self {
            Location::Local { .. } => "local",
            Location::LocalList(_) => "local_list",
            Location::Remote(_) => "remote",
            Location::RemoteHost(_) => "remote_host",
            Location::Unknown => "unknown",
            Location::Refused(_) => "refused",
            Location::TempFail(_) => "tempfail",
        }
    }
}

/// The domains this node shares with its peers: shared in the directory and allowed by the
/// configuration.
#[derive(Debug, Clone)]
pub(crate) struct Scope {
    allowed: Arc<[String]>,
}

impl Scope {
    pub(crate) fn new(allowed: &[String]) -> Result<Self> {
        let allowed = allowed
            .iter()
            .map(|d| ds_directory::name::normalize_domain(d).map_err(ds_directory::Error::from))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(Self {
            allowed: allowed.into(),
        })
    }

    pub(crate) fn shares(&self, domains: &Domains, domain: &str) -> bool {
        domains.is_shared(domain)
            && (self.allowed.is_empty() || self.allowed.iter().any(|d| d == domain))
    }
}

/// The uncached peer fan-outs one client connection may still cause (DESIGN.md §9): an
/// unknown RCPT or login in a shared domain asks every peer, so a client that sends many
/// would make the whole cluster work for it. Over the budget a lookup is `TempFail` (SMTP
/// 451, never 550). Make one per connection with [`Locator::fanout_budget`] and pass it to
/// [`Locator::locate_bounded`]; local addresses and cache hits do not use it up.
#[derive(Debug)]
pub struct FanoutBudget {
    left: AtomicU32,
}

impl FanoutBudget {
    /// A budget of `n` uncached fan-outs.
    pub fn new(n: u32) -> Self {
        Self {
            left: AtomicU32::new(n),
        }
    }

    /// No bound (operators, internal callers such as the queue runner).
    pub fn unlimited() -> Self {
        Self::new(u32::MAX)
    }

    /// Fan-outs still allowed.
    pub fn remaining(&self) -> u32 {
        self.left.load(Ordering::Relaxed)
    }

    /// Takes one fan-out; false when none is left.
    fn take(&self) -> bool {
        self.left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
    }
}

/// The positive and optional negative caches, shared by the Locator and the Minger server
/// (which empties them on `Invalidate`, `Reserve` and `Release`).
#[derive(Clone)]
pub(crate) struct Caches {
    positive: Cache<String, Owner>,
    negative: Option<Cache<String, ()>>,
    /// Bumped by every drop: a fan-out that began before a drop must not cache "no node has
    /// it" afterwards (the drop may be for an address that is being created right now).
    generation: Arc<AtomicU64>,
}

impl Caches {
    fn new(positive_ttl: Duration, negative_ttl: Duration) -> Self {
        Self {
            positive: Cache::builder()
                .max_capacity(POSITIVE_CACHE_CAPACITY)
                .time_to_live(positive_ttl)
                .build(),
            negative: (!negative_ttl.is_zero()).then(|| {
                Cache::builder()
                    .max_capacity(NEGATIVE_CACHE_CAPACITY)
                    .time_to_live(negative_ttl)
                    .build()
            }),
            generation: Arc::new(AtomicU64::new(0)),
        }
    }

    pub(crate) async fn drop_entry(&self, address: &str) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.positive.invalidate(address).await;
        if let Some(negative) = &self.negative {
            negative.invalidate(address).await;
        }
    }
}

/// A fan-out that found no owner.
#[derive(Debug)]
enum Miss {
    NotFound,
    TempFail(String),
}

/// A peer's answer to `Hello`, from [`Locator::hello_peers`].
#[derive(Debug, Clone)]
pub struct PeerHello {
    /// The peer's id as configured here.
    pub id: String,
    pub minger_url: String,
    /// The SMTP endpoint configured here for it, which overrides what it advertises.
    pub smtp_override: Option<String>,
    /// How long the call took (until the answer or the failure).
    pub elapsed: Duration,
    pub reply: std::result::Result<proto::HelloReply, String>,
}

/// A peer that keeps a version of a mailing list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListKeeper {
    pub node: String,
    /// Where to send its copy, `host:port`.
    pub smtp: String,
}

/// The answer to "who else keeps this list?".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListKeepers {
    pub keepers: Vec<ListKeeper>,
    /// Peers that could not be asked, with the reason.
    pub unreachable: Vec<(String, String)>,
}

/// Finds the owner of an address; also the creation guard (see `create_account`).
/// Cheap to clone.
#[derive(Clone)]
pub struct Locator {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) config: ClusterConfig,
    pub(crate) directory: Directory,
    pub(crate) scope: Scope,
    pub(crate) reservations: Reservations,
    pub(crate) caches: Caches,
    pub(crate) peers: Vec<Peer>,
    /// Account moves from this node (DESIGN.md §11).
    pub(crate) moves: crate::moving::Moves,
    /// The mail store, for account moves ([`Locator::attach_mail`]).
    pub(crate) mail: std::sync::OnceLock<ds_store::MailStore>,
    /// Test hook: where moves stop ([`Locator::stop_moves_at`]).
    pub(crate) move_stop: std::sync::Mutex<Option<&'static str>>,
}

impl std::fmt::Debug for Locator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Locator")
            .field("node_id", &self.inner.config.node_id)
            .field("peers", &self.inner.peers.len())
            .finish_non_exhaustive()
    }
}

impl Locator {
    /// Builds the cluster side of a node: peer channels (lazy: nothing is dialled yet),
    /// caches and the reservations table in `store`. Call inside a Tokio runtime.
    pub fn new(config: ClusterConfig, directory: Directory, store: &Store) -> Result<Self> {
        config.validate()?;
        ensure_crypto_provider();
        let peers = config
            .peers
            .iter()
            .map(|p| {
                Peer::new(
                    p,
                    config.ca_pem.as_deref(),
                    &config.secret,
                    config.lookup_timeout,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            inner: Arc::new(Inner {
                scope: Scope::new(&config.allowed_domains)?,
                reservations: Reservations::new(store)?,
                moves: crate::moving::Moves::new(store)?,
                mail: std::sync::OnceLock::new(),
                move_stop: std::sync::Mutex::new(None),
                caches: Caches::new(config.positive_ttl, config.negative_ttl),
                directory,
                peers,
                config,
            }),
        })
    }

    /// The Minger service answering this node's peers, sharing this Locator's caches and
    /// reservations. Serve it with [`crate::serve_minger`].
    pub fn minger_service(&self) -> MingerService {
        let i = &self.inner;
        MingerService::new(
            i.config.node_id.clone(),
            i.config.advertise.clone(),
            &i.config.secret,
            i.directory.clone(),
            i.scope.clone(),
            i.reservations.clone(),
            i.caches.clone(),
        )
        .with_mail(i.mail.get().cloned())
        .with_mover(self.clone())
    }

    pub fn node_id(&self) -> &str {
        &self.inner.config.node_id
    }

    pub fn directory(&self) -> &Directory {
        &self.inner.directory
    }

    /// Whether addresses of `domain` may live on peers (shared and allowed).
    pub fn shares(&self, domain: &str) -> bool {
        self.inner
            .scope
            .shares(self.inner.directory.domains(), domain)
    }

    /// Where `address` lives (DESIGN.md §4). Never fails: trouble is `TempFail`. Unbounded:
    /// for operators and internal callers; client-driven lookups use [`Self::locate_bounded`].
    pub async fn locate(&self, address: &str, purpose: Purpose) -> Location {
        self.locate_bounded(address, purpose, &FanoutBudget::unlimited())
            .await
    }

    /// A fresh per-connection [`FanoutBudget`] of the configured size.
    pub fn fanout_budget(&self) -> FanoutBudget {
        FanoutBudget::new(self.inner.config.fanouts_per_connection)
    }

    /// Like [`Self::locate`], but a lookup that would ask the peers takes one fan-out from
    /// `budget`, and is `TempFail` when none is left.
    pub async fn locate_bounded(
        &self,
        address: &str,
        purpose: Purpose,
        budget: &FanoutBudget,
    ) -> Location {
        let started = std::time::Instant::now();
        let location = self.locate_uncounted(address, purpose, budget).await;
        metrics::histogram!("dshare_lookup_seconds").record(started.elapsed().as_secs_f64());
        metrics::counter!("dshare_lookups_total", "outcome" => location.outcome()).increment(1);
        location
    }

    /// Drops what the caches say about `address`, then locates it again: for a cached owner
    /// that answered "no such user".
    pub async fn relocate(&self, address: &str, purpose: Purpose) -> Location {
        self.forget(address).await;
        self.locate(address, purpose).await
    }

    /// Drops the cache entries of `address` (as given and as resolved here).
    pub async fn forget(&self, address: &str) {
        for key in self.cache_keys(address) {
            self.inner.caches.drop_entry(&key).await;
        }
    }

    /// Test hook: caches `owner` for `address` as a fan-out would (a peer that missed an
    /// `Invalidate` keeps such an entry until its TTL).
    #[doc(hidden)]
    pub async fn remember(&self, address: &str, owner: Owner) {
        self.inner
            .caches
            .positive
            .insert(address.to_string(), owner)
            .await;
    }

    /// The cached owner of `address`, if any (no peer is asked).
    pub async fn cached(&self, address: &str) -> Option<Owner> {
        let key = self.cache_keys(address).pop()?;
        self.inner.caches.positive.get(&key).await
    }

    /// Asks every peer to drop its cache entries for `address` (best effort, logged) and
    /// drops ours: after an account is deleted, renamed or moved.
    pub async fn invalidate_everywhere(&self, address: &str) {
        self.forget(address).await;
        let address = Address::parse(address)
            .map(|a| a.to_string())
            .unwrap_or_else(|_| address.to_string());
        let from_node = self.node_id().to_string();
        let address = address.as_str();
        let calls = self.inner.peers.iter().map(|peer| {
            let request = InvalidateRequest {
                address: address.to_string(),
                from_node: from_node.clone(),
            };
            async move {
                let result = peer
                    .call("invalidate", request, |mut c, r| async move {
                        c.invalidate(r).await
                    })
                    .await;
                if let Err(reason) = result {
                    tracing::warn!(peer = %peer.id, %address, %reason, "invalidate not delivered");
                }
            }
        });
        futures::future::join_all(calls).await;
        tracing::info!(%address, "invalidated on every peer");
    }

    /// Which peers keep a version of the mailing list `list`.
    pub async fn list_keepers(&self, list: &str) -> ListKeepers {
        let list = Address::parse(list)
            .map(|a| a.to_string())
            .unwrap_or_else(|_| list.to_string());
        let calls = self.inner.peers.iter().map(|peer| {
            let request = ListPeersRequest { list: list.clone() };
            async move {
                let result = peer
                    .call("list_peers", request, |mut c, r| async move {
                        c.list_peers(r).await
                    })
                    .await;
                (peer, result)
            }
        });
        let mut out = ListKeepers::default();
        for (peer, result) in futures::future::join_all(calls).await {
            match result {
                Ok(reply) if reply.keeps => out.keepers.push(ListKeeper {
                    node: peer.id.clone(),
                    smtp: peer.smtp_override.clone().unwrap_or(reply.smtp),
                }),
                Ok(_) => {}
                Err(reason) => out.unreachable.push((peer.id.clone(), reason)),
            }
        }
        out
    }

    /// Asks every peer who it is and where its services are (`dshare doctor`), concurrently.
    pub async fn hello_peers(&self) -> Vec<PeerHello> {
        let from_node = self.inner.config.node_id.clone();
        let calls = self.inner.peers.iter().map(|peer| {
            let request = proto::HelloRequest {
                from_node: from_node.clone(),
            };
            async move {
                let started = Instant::now();
                let reply = peer
                    .call("hello", request, |mut c, r| async move { c.hello(r).await })
                    .await;
                PeerHello {
                    id: peer.id.clone(),
                    minger_url: peer.status().minger_url,
                    smtp_override: peer.smtp_override.clone(),
                    elapsed: started.elapsed(),
                    reply,
                }
            }
        });
        futures::future::join_all(calls).await
    }

    /// Asks the peer `node` to check `password` for its account `address` (Minger
    /// `Authenticate`) for a client at `client_ip`. The password goes only to a peer reached
    /// over TLS verified against the cluster CA; an unknown or unreachable peer is `Temp`.
    pub async fn authenticate(
        &self,
        node: &str,
        address: &str,
        password: &str,
        client_ip: std::net::IpAddr,
    ) -> crate::AuthAnswer {
        use crate::AuthAnswer;
        use crate::proto::{AuthResult, AuthenticateRequest};
        let Some(peer) = self.inner.peers.iter().find(|p| p.id == node) else {
            return AuthAnswer::Temp(format!("{node} is not a configured peer"));
        };
        if !peer.verified_tls {
            return AuthAnswer::Temp(format!(
                "{node} is not reached over TLS verified against the cluster CA; no password is sent"
            ));
        }
        let request = AuthenticateRequest {
            address: address.to_string(),
            password: password.to_string(),
            client_ip: client_ip.to_string(),
            from_node: self.inner.config.node_id.clone(),
        };
        let reply = peer
            .call_slow("authenticate", request, |mut c, r| async move {
                c.authenticate(r).await
            })
            .await;
        match reply {
            Ok(reply) => match AuthResult::try_from(reply.result) {
                Ok(AuthResult::Ok) if !reply.canonical.is_empty() => {
                    AuthAnswer::Ok(reply.canonical)
                }
                Ok(AuthResult::Ok) => AuthAnswer::Ok(address.to_string()),
                Ok(AuthResult::Bad) => AuthAnswer::Bad,
                _ => AuthAnswer::Temp(format!("{node} could not check the password now")),
            },
            Err(reason) => AuthAnswer::Temp(reason),
        }
    }

    /// The live creation-guard reservation of `address` on this node, if any.
    pub fn reservation(&self, address: &str) -> Result<Option<crate::Reservation>> {
        self.inner.reservations.get(address)
    }

    /// Each peer's health as seen from here.
    pub fn peers_status(&self) -> Vec<PeerStatus> {
        self.inner.peers.iter().map(Peer::status).collect()
    }

    /// The keys `address` may be cached under: as given (normalised) and, last, as the
    /// local Router resolves it.
    fn cache_keys(&self, address: &str) -> Vec<String> {
        let mut keys = vec![];
        if let Ok(a) = Address::parse(address) {
            keys.push(a.to_string());
        }
        if let Ok(res) = self.inner.directory.resolve_address(address)
            && let Outcome::Unknown(a) = res.outcome
            && !keys.contains(&a)
        {
            keys.push(a);
        }
        keys
    }

    async fn locate_uncounted(
        &self,
        address: &str,
        purpose: Purpose,
        budget: &FanoutBudget,
    ) -> Location {
        let resolution = match self.inner.directory.resolve_address(address) {
            Ok(r) => r,
            Err(ds_directory::Error::Name(e)) => return Location::Refused(e.to_string()),
            Err(e) => {
                tracing::error!(%address, error = %e, "directory failed");
                return Location::TempFail(format!("directory: {e}"));
            }
        };
        let key = match resolution.outcome {
            Outcome::Account { address, enabled } => {
                // Frozen for a move: neither delivered here nor elsewhere yet.
                if let Some(moving) = self.inner.moves.location(&address, true) {
                    return moving;
                }
                return Location::Local { address, enabled };
            }
            Outcome::List(a) => return Location::LocalList(a),
            Outcome::Remote(a) => return Location::RemoteHost(a),
            Outcome::Error(text) => return Location::Refused(text),
            Outcome::Unknown(a) => a,
        };
        let domain = key.rsplit_once('@').map(|(_, d)| d).unwrap_or_default();
        if !self.shares(domain) {
            return Location::Unknown;
        }
        // Moved away from here: forward to the new owner until every cache has expired.
        if let Some(moved) = self.inner.moves.location(&key, false) {
            return moved;
        }
        let caches = &self.inner.caches;
        if let Some(owner) = caches.positive.get(&key).await {
            metrics::counter!("dshare_lookup_cache_total", "result" => "hit").increment(1);
            return Location::Remote(owner);
        }
        if let Some(negative) = &caches.negative
            && negative.contains_key(&key)
        {
            metrics::counter!("dshare_lookup_cache_total", "result" => "hit").increment(1);
            return Location::Unknown;
        }
        metrics::counter!("dshare_lookup_cache_total", "result" => "miss").increment(1);
        if !self.inner.peers.is_empty() && !budget.take() {
            metrics::counter!("dshare_lookup_fanouts_refused_total").increment(1);
            tracing::info!(address = %key, "peer lookup refused: this connection used up its fan-outs");
            return Location::TempFail("too many peer lookups on this connection".into());
        }
        // Concurrent callers for one key share this one fan-out; only a FOUND is cached.
        match caches
            .positive
            .try_get_with(key.clone(), self.fan_out(key, purpose))
            .await
        {
            Ok(owner) => Location::Remote(owner),
            Err(miss) => match &*miss {
                Miss::NotFound => Location::Unknown,
                Miss::TempFail(reason) => Location::TempFail(reason.clone()),
            },
        }
    }

    /// Asks every peer at once; the first FOUND wins.
    async fn fan_out(&self, key: String, purpose: Purpose) -> std::result::Result<Owner, Miss> {
        let generation = self.inner.caches.generation.load(Ordering::SeqCst);
        let request = LookupRequest {
            address: key.clone(),
            purpose: proto::Purpose::from(purpose).into(),
            from_node: self.node_id().to_string(),
        };
        let mut pending: FuturesUnordered<_> = self
            .inner
            .peers
            .iter()
            .map(|peer| {
                let request = request.clone();
                async move {
                    let result = peer
                        .call(
                            "lookup",
                            request,
                            |mut c, r| async move { c.lookup(r).await },
                        )
                        .await;
                    (peer, result)
                }
            })
            .collect();
        let mut failures = vec![];
        let deadline = tokio::time::sleep(self.inner.config.lookup_timeout + FAN_OUT_SLACK);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                next = pending.next() => match next {
                    None => break,
                    Some((peer, Ok(reply))) if reply.found => {
                        let owner = owner_from(peer, reply, &key);
                        tracing::debug!(address = %key, owner = %owner.node, "located on a peer");
                        return Ok(owner);
                    }
                    Some((_, Ok(_))) => {}
                    Some((peer, Err(reason))) => failures.push(format!("{}: {reason}", peer.id)),
                },
                () = &mut deadline => {
                    failures.push(format!("{} peer(s) did not answer in time", pending.len()));
                    break;
                }
            }
        }
        if failures.is_empty() {
            if let Some(negative) = &self.inner.caches.negative
                && self.may_cache_negative(&key, generation)
            {
                negative.insert(key, ()).await;
            }
            Err(Miss::NotFound)
        } else {
            let reason = failures.join("; ");
            tracing::warn!(address = %key, %reason, "lookup failed temporarily");
            Err(Miss::TempFail(reason))
        }
    }
}

impl Locator {
    /// Whether "no node has `key`" may be cached: not while some node holds a creation
    /// reservation for it here (it is being created), and not when a cache drop happened
    /// since the fan-out began (a `Reserve`, `Release` or `Invalidate` raced it).
    fn may_cache_negative(&self, key: &str, generation: u64) -> bool {
        if self.inner.caches.generation.load(Ordering::SeqCst) != generation {
            return false;
        }
        match self.inner.reservations.get(key) {
            Ok(None) => true,
            Ok(Some(_)) => false,
            Err(e) => {
                tracing::warn!(address = %key, error = %e, "reservation table unreadable");
                false
            }
        }
    }
}

fn owner_from(peer: &Peer, reply: LookupReply, key: &str) -> Owner {
    if !reply.owner.is_empty() && reply.owner != peer.id {
        tracing::warn!(peer = %peer.id, claims = %reply.owner, "peer answers under another node id");
    }
    let kind = match proto::Kind::try_from(reply.kind) {
        Ok(proto::Kind::List) => Kind::List,
        _ => Kind::Account,
    };
    Owner {
        node: peer.id.clone(),
        canonical: if reply.canonical.is_empty() {
            key.to_string()
        } else {
            reply.canonical
        },
        kind,
        can_receive: reply.can_receive,
        smtp: peer.smtp_override.clone().unwrap_or(reply.smtp),
        pop3: reply.pop3,
        imap: reply.imap,
    }
}
