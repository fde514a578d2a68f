//! The node's directory: domains, accounts, aliases, Router records and mailing lists, and
//! the resolution of login names and addresses (DESIGN.md §3).
//!
//! Resolution is pure: it reads the store, never the network. Whether an address that is
//! not here lives on a peer is the cluster's `Locator`'s question, not this crate's.

use std::collections::BTreeMap;
use std::net::IpAddr;

use argon2::password_hash::{PasswordHasher, PasswordVerifier, phc::PasswordHash};
use argon2::{Algorithm, Argon2, Params, Version};
use serde::{Deserialize, Serialize};

use ds_store::{Store, Table};

pub mod name;
mod resolve;

pub use name::{Address, LoginName, NameError};
pub use resolve::{Outcome, Resolution, ResolveContext, Step};

/// Router steps before a resolution is declared a loop.
pub const MAX_ROUTE_STEPS: usize = 10;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Name(#[from] NameError),
    #[error(transparent)]
    Store(#[from] ds_store::Error),
    #[error("domain {0} is not served by this node")]
    UnknownDomain(String),
    #[error("{0} already exists as {1}")]
    Exists(String, &'static str),
    #[error("no such {1}: {0}")]
    NotFound(String, &'static str),
    #[error("routing loop: more than {MAX_ROUTE_STEPS} steps")]
    RoutingLoop,
    #[error("invalid Router record: {0}")]
    BadRoute(String),
    #[error("password hashing failed: {0}")]
    Hash(String),
    #[error("invalid configuration: {0}")]
    Config(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// One domain this node serves: a `[[domain]]` section of the configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Domain {
    /// Normalised to ASCII lower case by [`Domains::new`].
    pub name: String,
    /// Its accounts are split across the cluster: misses are asked of peers.
    #[serde(default)]
    pub shared: bool,
    /// Local IP addresses assigned to this domain (multihoming).
    #[serde(default)]
    pub addresses: Vec<IpAddr>,
}

/// The set of served domains, with the main domain and the IP-to-domain map.
#[derive(Debug, Clone)]
pub struct Domains {
    main: String,
    by_name: BTreeMap<String, Domain>,
    by_ip: BTreeMap<IpAddr, String>,
}

impl Domains {
    /// Builds the domain set; the main domain is added (unshared) if not listed.
    pub fn new(main: &str, domains: Vec<Domain>) -> Result<Self> {
        let main = name::normalize_domain(main)?;
        let mut by_name = BTreeMap::new();
        let mut by_ip = BTreeMap::new();
        for mut d in domains {
            d.name = name::normalize_domain(&d.name)?;
            for ip in &d.addresses {
                if let Some(other) = by_ip.insert(*ip, d.name.clone()) {
                    return Err(Error::Config(format!(
                        "address {ip} is assigned to both {other} and {}",
                        d.name
                    )));
                }
            }
            if by_name.insert(d.name.clone(), d.clone()).is_some() {
                return Err(Error::Config(format!("domain {} listed twice", d.name)));
            }
        }
        by_name.entry(main.clone()).or_insert_with(|| Domain {
            name: main.clone(),
            shared: false,
            addresses: vec![],
        });
        Ok(Self {
            main,
            by_name,
            by_ip,
        })
    }

    pub fn main(&self) -> &str {
        &self.main
    }

    pub fn get(&self, name: &str) -> Option<&Domain> {
        self.by_name.get(name)
    }

    pub fn is_served(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    pub fn is_shared(&self, name: &str) -> bool {
        self.by_name.get(name).is_some_and(|d| d.shared)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Domain> {
        self.by_name.values()
    }

    pub fn for_ip(&self, ip: IpAddr) -> Option<&str> {
        self.by_ip.get(&ip).map(String::as_str)
    }

    /// The served domain named by a TLS SNI host name: the domain itself or
    /// `mail.`/`imap.`/`pop.`/`smtp.` + domain.
    pub fn for_sni(&self, sni: &str) -> Option<&str> {
        let sni = name::normalize_domain(sni).ok()?;
        if let Some(d) = self.by_name.get(&sni) {
            return Some(&d.name);
        }
        for prefix in ["mail.", "imap.", "pop.", "smtp."] {
            if let Some(rest) = sni.strip_prefix(prefix)
                && let Some(d) = self.by_name.get(rest)
            {
                return Some(&d.name);
            }
        }
        None
    }
}

/// A mail account stored on this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    /// Canonical address, the table key.
    pub address: String,
    /// Argon2id PHC string; never logged.
    pub password_hash: String,
    pub enabled: bool,
    /// Unix seconds.
    pub created: i64,
    /// Full addresses of this account's aliases.
    #[serde(default)]
    pub aliases: Vec<String>,
}

/// A mailing list kept on this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MailingList {
    pub address: String,
    pub members: Vec<String>,
}

/// What a Router record's right side says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RouteTarget {
    /// Rewrite to this address; a `*` in its local part is replaced by the original local part.
    Address(String),
    /// Refuse with this text.
    Error(String),
}

/// A Router record: `<pattern> = target`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// Normalised left side: `local@domain`, or `*@domain` for a whole domain.
    pub pattern: String,
    pub target: RouteTarget,
}

impl std::fmt::Display for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.target {
            RouteTarget::Address(a) => write!(f, "<{}> = {}", self.pattern, a),
            RouteTarget::Error(e) => write!(f, "<{}> = error:{}", self.pattern, e),
        }
    }
}

/// Argon2id cost; tests may lower it.
#[derive(Debug, Clone, Copy)]
pub struct HashCost {
    pub memory_kib: u32,
    pub iterations: u32,
}

impl Default for HashCost {
    fn default() -> Self {
        // OWASP's second Argon2id profile: 19 MiB, 2 iterations, 1 lane.
        Self {
            memory_kib: 19 * 1024,
            iterations: 2,
        }
    }
}

/// The directory: domains from configuration, records from the store.
#[derive(Clone, Debug)]
pub struct Directory {
    domains: Domains,
    accounts: Table<Account>,
    aliases: Table<String>,
    routes: Table<Route>,
    lists: Table<MailingList>,
    cost: HashCost,
    /// The operator's address: the implicit last-resort target of postmaster@ and abuse@.
    postmaster: Option<String>,
}

/// A hash verified on unknown accounts, so that an unknown user costs the same time as a
/// wrong password. Made once, with the directory's cost.
static DUMMY_HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();

impl Directory {
    pub fn new(store: &Store, domains: Domains) -> Result<Self> {
        Ok(Self {
            domains,
            accounts: store.table("dir.accounts")?,
            aliases: store.table("dir.aliases")?,
            routes: store.table("dir.routes")?,
            lists: store.table("dir.lists")?,
            cost: HashCost::default(),
            postmaster: None,
        })
    }

    /// Routes postmaster@ and abuse@ of every served domain to `address` when no account,
    /// alias, list or Router record of that name exists (RFC 5321 §4.5.1, RFC 2142).
    pub fn with_postmaster(mut self, address: Option<String>) -> Self {
        self.postmaster = address;
        self
    }

    /// The operator address postmaster@ and abuse@ fall back to, if any.
    pub fn postmaster(&self) -> Option<&str> {
        self.postmaster.as_deref()
    }

    /// Sets the Argon2id cost for new hashes (existing hashes keep theirs).
    pub fn with_hash_cost(mut self, cost: HashCost) -> Self {
        self.cost = cost;
        self
    }

    pub fn domains(&self) -> &Domains {
        &self.domains
    }

    /// Parses an address given by an operator: a bare name takes the main domain; the
    /// domain must be served here.
    pub fn served_address(&self, name: &str) -> Result<Address> {
        let addr = match LoginName::parse(name)? {
            LoginName::Full(a) => a,
            LoginName::Bare(local) => Address::new(&local, self.domains.main())?,
        };
        if !self.domains.is_served(addr.domain()) {
            return Err(Error::UnknownDomain(addr.domain().to_string()));
        }
        Ok(addr)
    }

    /// What already uses this address here, if anything.
    pub fn taken_as(&self, addr: &str) -> Result<Option<&'static str>> {
        Ok(if self.accounts.contains(addr)? {
            Some("an account")
        } else if self.aliases.contains(addr)? {
            Some("an alias")
        } else if self.lists.contains(addr)? {
            Some("a mailing list")
        } else {
            None
        })
    }

    fn hasher(&self) -> Result<Argon2<'static>> {
        let params = Params::new(self.cost.memory_kib, self.cost.iterations, 1, None)
            .map_err(|e| Error::Hash(e.to_string()))?;
        Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, params))
    }

    pub fn hash_password(&self, password: &str) -> Result<String> {
        Ok(self
            .hasher()?
            .hash_password(password.as_bytes())
            .map_err(|e| Error::Hash(e.to_string()))?
            .to_string())
    }

    /// Creates an account. The caller (the creation guard) has already made sure no peer
    /// has it.
    pub fn add_account(&self, name: &str, password: &str, now: i64) -> Result<Account> {
        let addr = self.served_address(name)?.to_string();
        if let Some(kind) = self.taken_as(&addr)? {
            return Err(Error::Exists(addr, kind));
        }
        let account = Account {
            address: addr.clone(),
            password_hash: self.hash_password(password)?,
            enabled: true,
            created: now,
            aliases: vec![],
        };
        if !self.accounts.insert_new(&addr, &account)? {
            return Err(Error::Exists(addr, "an account"));
        }
        tracing::info!(account = %addr, "account created");
        Ok(account)
    }

    /// Stores an account record handed over by another node (an account move, DESIGN.md §11)
    /// with its password hash and aliases as they are. Idempotent: the same record again is
    /// fine; an address or alias that is something else here is `Exists`. The caller (the
    /// move, under the creation guard's reservation) has made sure no peer has it.
    pub fn import_account(&self, account: &Account) -> Result<()> {
        let addr = self.served_address(&account.address)?.to_string();
        match self.accounts.get(&addr)? {
            Some(existing) if existing.password_hash == account.password_hash => {}
            Some(_) => return Err(Error::Exists(addr, "an account")),
            None => {
                if let Some(kind) = self.taken_as(&addr)? {
                    return Err(Error::Exists(addr, kind));
                }
            }
        }
        for alias in &account.aliases {
            let alias = self.served_address(alias)?.to_string();
            match self.aliases.get(&alias)? {
                Some(target) if target == addr => {}
                Some(_) => return Err(Error::Exists(alias, "an alias")),
                None => {
                    if let Some(kind) = self.taken_as(&alias)? {
                        return Err(Error::Exists(alias, kind));
                    }
                    self.aliases.insert(&alias, &addr)?;
                }
            }
        }
        let mut record = account.clone();
        record.address = addr.clone();
        self.accounts.insert(&addr, &record)?;
        tracing::info!(account = %addr, "account imported");
        Ok(())
    }

    /// The alias `address` stands for, if it is an alias here.
    pub fn alias_of(&self, address: &str) -> Result<Option<String>> {
        Ok(self.aliases.get(address)?)
    }

    pub fn account(&self, address: &str) -> Result<Option<Account>> {
        Ok(self.accounts.get(address)?)
    }

    /// Deletes an account and its aliases.
    pub fn delete_account(&self, name: &str) -> Result<Account> {
        let addr = self.served_address(name)?.to_string();
        let account = self
            .accounts
            .remove(&addr)?
            .ok_or_else(|| Error::NotFound(addr.clone(), "account"))?;
        for alias in &account.aliases {
            self.aliases.remove(alias)?;
        }
        tracing::info!(account = %addr, "account deleted");
        Ok(account)
    }

    pub fn set_password(&self, name: &str, password: &str) -> Result<()> {
        let addr = self.served_address(name)?.to_string();
        let hash = self.hash_password(password)?;
        self.update_account(&addr, |a| a.password_hash = hash.clone())
    }

    pub fn set_enabled(&self, name: &str, enabled: bool) -> Result<()> {
        let addr = self.served_address(name)?.to_string();
        self.update_account(&addr, |a| a.enabled = enabled)
    }

    fn update_account(&self, addr: &str, mut f: impl FnMut(&mut Account)) -> Result<()> {
        let updated = self.accounts.update(addr, |a| {
            a.map(|mut a| {
                f(&mut a);
                a
            })
        })?;
        updated
            .map(|_| ())
            .ok_or_else(|| Error::NotFound(addr.to_string(), "account"))
    }

    /// Accounts, optionally of one domain, in address order.
    pub fn accounts(&self, domain: Option<&str>) -> Result<Vec<Account>> {
        let suffix = domain.map(|d| format!("@{d}"));
        let mut out = vec![];
        for kv in self.accounts.iter() {
            let (_, a) = kv?;
            if suffix.as_deref().is_none_or(|s| a.address.ends_with(s)) {
                out.push(a);
            }
        }
        Ok(out)
    }

    /// Checks a password in constant work whether or not the account exists.
    /// Disabled accounts never authenticate.
    pub fn verify_password(&self, address: &str, password: &str) -> Result<bool> {
        let account = self.accounts.get(address)?;
        let dummy;
        let stored = match &account {
            Some(a) => a.password_hash.as_str(),
            None => {
                dummy = match DUMMY_HASH.get() {
                    Some(h) => h.clone(),
                    None => {
                        let h = self.hash_password("no such account")?;
                        DUMMY_HASH.get_or_init(|| h).clone()
                    }
                };
                dummy.as_str()
            }
        };
        let ok = PasswordHash::new(stored).is_ok_and(|hash| {
            Argon2::default()
                .verify_password(password.as_bytes(), &hash)
                .is_ok()
        });
        Ok(ok && account.is_some_and(|a| a.enabled))
    }

    /// Adds an alias (another name of an account, in any served domain).
    pub fn add_alias(&self, alias: &str, account: &str) -> Result<()> {
        let alias = self.served_address(alias)?.to_string();
        let account = self.served_address(account)?.to_string();
        if let Some(kind) = self.taken_as(&alias)? {
            return Err(Error::Exists(alias, kind));
        }
        if !self.accounts.contains(&account)? {
            return Err(Error::NotFound(account, "account"));
        }
        if !self.aliases.insert_new(&alias, &account)? {
            return Err(Error::Exists(alias, "an alias"));
        }
        self.update_account(&account, |a| {
            if !a.aliases.contains(&alias) {
                a.aliases.push(alias.clone());
            }
        })
    }

    pub fn delete_alias(&self, alias: &str) -> Result<()> {
        let alias = self.served_address(alias)?.to_string();
        let account = self
            .aliases
            .remove(&alias)?
            .ok_or_else(|| Error::NotFound(alias.clone(), "alias"))?;
        // The account may be gone already; that is fine.
        let _ = self.update_account(&account, |a| a.aliases.retain(|x| x != &alias));
        Ok(())
    }

    /// Parses a Router record's left side: `<john>`, `<john@domain>`, `<*@domain>`; the
    /// angle brackets are optional; a bare name means the main domain.
    pub fn parse_route_pattern(&self, pattern: &str) -> Result<String> {
        let p = pattern.trim();
        let p = p
            .strip_prefix('<')
            .and_then(|p| p.strip_suffix('>'))
            .unwrap_or(p);
        if let Some(domain) = p.strip_prefix("*@") {
            return Ok(format!("*@{}", name::normalize_domain(domain)?));
        }
        Ok(match LoginName::parse(p)? {
            LoginName::Full(a) => a.to_string(),
            LoginName::Bare(local) => Address::new(&local, self.domains.main())?.to_string(),
        })
    }

    /// Parses a Router record's right side: an address (bare = main domain, `*` allowed in
    /// the local part) or `error[:text]`.
    pub fn parse_route_target(&self, target: &str) -> Result<RouteTarget> {
        let t = target.trim();
        if let Some(rest) = t.strip_prefix("error") {
            let text = rest.trim_start_matches(':').trim();
            let text = if text.is_empty() {
                "address rejected"
            } else {
                text
            };
            if text.chars().any(char::is_control) {
                return Err(Error::BadRoute("control character in error text".into()));
            }
            return Ok(RouteTarget::Error(text.to_string()));
        }
        let t = t
            .strip_prefix('<')
            .and_then(|t| t.strip_suffix('>'))
            .unwrap_or(t);
        // `*` is allowed by the local-part grammar, so targets like `*@other.com` parse.
        let addr = match LoginName::parse(t)? {
            LoginName::Full(a) => a,
            LoginName::Bare(local) => Address::new(&local, self.domains.main())?,
        };
        Ok(RouteTarget::Address(addr.to_string()))
    }

    /// Adds (or replaces) a Router record. A record that would make a loop is refused.
    pub fn add_route(&self, pattern: &str, target: &str) -> Result<Route> {
        let route = Route {
            pattern: self.parse_route_pattern(pattern)?,
            target: self.parse_route_target(target)?,
        };
        let previous = self.routes.insert(&route.pattern, &route)?;
        // Refuse a record that closes a loop: resolve what it routes and undo on a loop.
        if let RouteTarget::Address(_) = route.target {
            let probe = route.pattern.replace("*@", "postmaster@");
            let res = self.resolve_address(&probe)?;
            if matches!(res.outcome, Outcome::Error(ref e) if e.starts_with("routing loop")) {
                match previous {
                    Some(p) => self.routes.insert(&p.pattern, &p)?,
                    None => self.routes.remove(&route.pattern)?,
                };
                return Err(Error::RoutingLoop);
            }
        }
        tracing::info!(route = %route, "router record added");
        Ok(route)
    }

    pub fn delete_route(&self, pattern: &str) -> Result<Route> {
        let pattern = self.parse_route_pattern(pattern)?;
        self.routes
            .remove(&pattern)?
            .ok_or_else(|| Error::NotFound(pattern, "Router record"))
    }

    pub fn routes(&self) -> Result<Vec<Route>> {
        self.routes.iter().map(|kv| Ok(kv?.1)).collect()
    }

    pub fn add_list(&self, name: &str) -> Result<MailingList> {
        let addr = self.served_address(name)?.to_string();
        if let Some(kind) = self.taken_as(&addr)? {
            return Err(Error::Exists(addr, kind));
        }
        let list = MailingList {
            address: addr.clone(),
            members: vec![],
        };
        if !self.lists.insert_new(&addr, &list)? {
            return Err(Error::Exists(addr, "a mailing list"));
        }
        Ok(list)
    }

    pub fn delete_list(&self, name: &str) -> Result<MailingList> {
        let addr = self.served_address(name)?.to_string();
        self.lists
            .remove(&addr)?
            .ok_or_else(|| Error::NotFound(addr, "mailing list"))
    }

    pub fn list(&self, address: &str) -> Result<Option<MailingList>> {
        Ok(self.lists.get(address)?)
    }

    pub fn lists(&self) -> Result<Vec<MailingList>> {
        self.lists.iter().map(|kv| Ok(kv?.1)).collect()
    }

    /// Adds a member (any valid address, local or not) to a list; `false` if already there.
    pub fn subscribe(&self, list: &str, member: &str) -> Result<bool> {
        self.change_members(list, member, true)
    }

    /// Removes a member; `false` if it was not there.
    pub fn unsubscribe(&self, list: &str, member: &str) -> Result<bool> {
        self.change_members(list, member, false)
    }

    fn change_members(&self, list: &str, member: &str, add: bool) -> Result<bool> {
        let list = self.served_address(list)?.to_string();
        let member = Address::parse(member)?.to_string();
        let mut changed = false;
        let updated = self.lists.update(&list, |l| {
            l.map(|mut l| {
                let present = l.members.contains(&member);
                changed = present != add;
                if add && !present {
                    l.members.push(member.clone());
                } else if !add {
                    l.members.retain(|m| m != &member);
                }
                l
            })
        })?;
        if updated.is_none() {
            return Err(Error::NotFound(list, "mailing list"));
        }
        Ok(changed)
    }

    pub(crate) fn route_for(&self, addr: &Address) -> Result<Option<Route>> {
        if let Some(r) = self.routes.get(addr.to_string())? {
            return Ok(Some(r));
        }
        Ok(self.routes.get(format!("*@{}", addr.domain()))?)
    }

    pub(crate) fn alias_target(&self, addr: &str) -> Result<Option<String>> {
        Ok(self.aliases.get(addr)?)
    }

    pub(crate) fn has_list(&self, addr: &str) -> Result<bool> {
        Ok(self.lists.contains(addr)?)
    }
}

#[cfg(test)]
mod tests;
