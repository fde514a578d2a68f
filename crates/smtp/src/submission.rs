//! Message submission (RFC 6409 on 587 with STARTTLS, RFC 8314 implicit TLS on 465;
//! DESIGN.md §6): user AUTH (PLAIN and LOGIN, with initial responses) only over TLS, the
//! login name resolved as for POP3 and IMAP (DESIGN.md §3), the password checked here for a
//! local account or by its owner through Minger `Authenticate`, the shared login throttle,
//! and the sender rules.

use std::borrow::Cow;
use std::time::Instant;

use ds_access::sasl::{Secret, decode_plain};
use ds_access::{Check, LoginOwner, OwnerCheck, Service};
use ds_directory::{Address, Outcome, ResolveContext};
use ds_net::{LineConn, MailStream};
use smtp_proto::{AUTH_LOGIN, AUTH_PLAIN};

use crate::base64;
use crate::headers::Headers;
use crate::locate::{Location, Purpose};
use crate::reply::*;
use crate::session::Session;

/// `334` prompts of AUTH LOGIN ("Username:", "Password:").
const LOGIN_USER: &str = "334 VXNlcm5hbWU6\r\n";
const LOGIN_PASSWORD: &str = "334 UGFzc3dvcmQ6\r\n";
/// Longest login name or password accepted (as POP3 and IMAP).
const MAX_FIELD: usize = ds_access::sasl::MAX_FIELD_LEN;

/// Counts a submission login in `dshare_submission_logins_total{result}`.
fn count_login(result: &'static str, started: Instant) {
    metrics::counter!("dshare_submission_logins_total", "result" => result).increment(1);
    metrics::histogram!("dshare_login_seconds", "protocol" => "smtp")
        .record(started.elapsed().as_secs_f64());
}

/// A SASL response line, or the reply that ends the exchange.
type Sasl = Result<Vec<u8>, &'static str>;

impl Session {
    /// `AUTH` on a submission listener.
    pub(crate) async fn auth_user(
        &mut self,
        conn: &mut LineConn<MailStream>,
        mechanism: u64,
        initial: &str,
    ) -> crate::Result<Cow<'static, str>> {
        if !self.ctx.tls {
            return Ok(MUST_STARTTLS.into());
        }
        if self.user.is_some() {
            return Ok(ALREADY_AUTH.into());
        }
        if self.tx.is_some() {
            return Ok(AUTH_IN_TX.into());
        }
        let (name, password) = match mechanism {
            AUTH_PLAIN => {
                let message = match self.sasl_response(conn, AUTH_CONTINUE, initial).await? {
                    Ok(m) => m,
                    Err(reply) => return Ok(reply.into()),
                };
                match decode_plain(&message) {
                    Ok(c) if c.authzid.is_empty() || c.authzid == c.authcid => {
                        (c.authcid, c.password)
                    }
                    // Acting for someone else is not offered: the same reply as a bad password.
                    Ok(_) => return Ok(AUTH_FAILED.into()),
                    Err(_) => return Ok(AUTH_BAD_B64.into()),
                }
            }
            AUTH_LOGIN => {
                let user = match self.sasl_response(conn, LOGIN_USER, initial).await? {
                    Ok(u) => u,
                    Err(reply) => return Ok(reply.into()),
                };
                let password = match self.sasl_response(conn, LOGIN_PASSWORD, "").await? {
                    Ok(p) => p,
                    Err(reply) => return Ok(reply.into()),
                };
                match (String::from_utf8(user), String::from_utf8(password)) {
                    (Ok(u), Ok(p))
                        if !u.is_empty()
                            && !p.is_empty()
                            && u.len() <= MAX_FIELD
                            && p.len() <= MAX_FIELD =>
                    {
                        (u, Secret::new(p))
                    }
                    _ => return Ok(AUTH_BAD_B64.into()),
                }
            }
            _ => return Ok(AUTH_MECH.into()),
        };
        Ok(self.login(&name, &password).await.into())
    }

    /// The client's (base64) answer to `prompt`, or `initial` when it sent one with the
    /// command; `*` cancels, `=` is empty.
    async fn sasl_response(
        &mut self,
        conn: &mut LineConn<MailStream>,
        prompt: &str,
        initial: &str,
    ) -> crate::Result<Sasl> {
        let response = if initial.is_empty() {
            conn.write_all(prompt.as_bytes()).await?;
            conn.flush().await?;
            let (max_line, idle) = (self.smtp.config.max_line, self.smtp.config.idle_timeout);
            match conn.read_line(max_line, idle).await {
                Ok(Some(line)) => String::from_utf8_lossy(&line).trim_end().to_string(),
                Ok(None) => return Err(ds_net::Error::UnexpectedEof.into()),
                Err(ds_net::Error::LineTooLong { .. }) => return Ok(Err(LINE_TOO_LONG)),
                Err(e) => return Err(e.into()),
            }
        } else {
            initial.to_string()
        };
        if response == "*" {
            return Ok(Err(AUTH_CANCELLED));
        }
        if response == "=" {
            return Ok(Ok(Vec::new()));
        }
        Ok(base64::decode(&response).ok_or(AUTH_BAD_B64))
    }

    /// DESIGN.md §3–§5: resolve the login name, then check the password here (a local
    /// account) or at the owner (an account on a peer). Unknown names, lists and the like get
    /// the same work and reply as a bad password.
    async fn login(&mut self, name: &str, password: &Secret) -> &'static str {
        let started = Instant::now();
        let ctx = ResolveContext {
            local_ip: Some(self.ctx.local.ip()),
            sni: self.ctx.sni.clone(),
        };
        let outcome = match self.smtp.directory.resolve_login(name, &ctx) {
            Ok(r) => r.outcome,
            Err(ds_directory::Error::Name(_)) => {
                return self
                    .login_failed(None, password, "invalid login name", started)
                    .await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "AUTH: resolving the login name failed");
                count_login("tempfail", started);
                return AUTH_TEMP;
            }
        };
        match outcome {
            Outcome::Account { address, .. } => self.login_local(address, password, started).await,
            Outcome::Unknown(address)
                if self
                    .smtp
                    .directory
                    .domains()
                    .is_shared(address.rsplit_once('@').map_or("", |(_, d)| d)) =>
            {
                self.login_remote(address, password, started).await
            }
            other => {
                let address = other.address().map(str::to_owned);
                let reason = format!("{other}");
                self.login_failed(address, password, &reason, started).await
            }
        }
    }

    async fn throttle_wait(&self, account: Option<&str>) {
        let delay = self.smtp.config.throttle.delay(self.ctx.peer.ip(), account);
        if !delay.is_zero() {
            tracing::debug!(?delay, "AUTH throttled");
            tokio::time::sleep(delay).await;
        }
    }

    async fn login_local(
        &mut self,
        address: String,
        password: &Secret,
        started: Instant,
    ) -> &'static str {
        self.throttle_wait(Some(&address)).await;
        let ip = self.ctx.peer.ip();
        match self
            .smtp
            .passwords
            .check(ip, &address, password.expose())
            .await
        {
            Ok(Check::Ok) => self.logged_in(address, started),
            Ok(Check::Bad) => {
                self.failed(Some(&address), "bad password or disabled account", started)
            }
            Ok(Check::Busy) => {
                tracing::info!(account = %address, "AUTH deferred: too many password checks");
                count_login("tempfail", started);
                AUTH_TEMP
            }
            Err(e) => {
                tracing::warn!(account = %address, error = %e, "AUTH: password check failed");
                count_login("tempfail", started);
                AUTH_TEMP
            }
        }
    }

    async fn login_remote(
        &mut self,
        address: String,
        password: &Secret,
        started: Instant,
    ) -> &'static str {
        self.throttle_wait(Some(&address)).await;
        let owner = match self
            .smtp
            .locator
            .locate_login_bounded(&address, Service::Smtp, &self.fanouts)
            .await
        {
            LoginOwner::Remote(owner) => owner,
            LoginOwner::NotFound(reason) => {
                return self
                    .login_failed(Some(address), password, &reason, started)
                    .await;
            }
            LoginOwner::TempFail(reason) => {
                tracing::warn!(account = %address, %reason, "AUTH deferred: owner lookup failed");
                count_login("tempfail", started);
                return AUTH_TEMP;
            }
        };
        let ip = self.ctx.peer.ip();
        match self
            .smtp
            .locator
            .authenticate(&owner, &owner.canonical, password.expose(), ip)
            .await
        {
            OwnerCheck::Ok(canonical) => {
                tracing::info!(owner = %owner.node, "AUTH checked by the owner");
                self.logged_in(canonical, started)
            }
            OwnerCheck::Bad => self.failed(
                Some(&owner.canonical),
                &format!("the owner {} refused the password", owner.node),
                started,
            ),
            OwnerCheck::TempFail(reason) => {
                tracing::warn!(account = %owner.canonical, owner = %owner.node, %reason, "AUTH deferred: the owner could not check the password");
                count_login("tempfail", started);
                AUTH_TEMP
            }
        }
    }

    /// A name that opens nothing: spend the work of a real check, then fail.
    async fn login_failed(
        &mut self,
        address: Option<String>,
        password: &Secret,
        reason: &str,
        started: Instant,
    ) -> &'static str {
        self.throttle_wait(address.as_deref()).await;
        let ip = self.ctx.peer.ip();
        let _ = self
            .smtp
            .passwords
            .check(
                ip,
                address.as_deref().unwrap_or("unknown@invalid"),
                password.expose(),
            )
            .await;
        self.failed(address.as_deref(), reason, started)
    }

    fn failed(&mut self, account: Option<&str>, reason: &str, started: Instant) -> &'static str {
        self.smtp
            .config
            .throttle
            .record_failure(self.ctx.peer.ip(), account);
        tracing::info!(account = ?account, %reason, "AUTH failed");
        count_login("failed", started);
        AUTH_FAILED
    }

    fn logged_in(&mut self, account: String, started: Instant) -> &'static str {
        self.smtp.config.throttle.record_success(&account);
        tracing::info!(user = %account, "AUTH ok (submission)");
        count_login("ok", started);
        self.user = Some(account);
        AUTH_OK
    }

    /// `MAIL FROM` on a submission listener: TLS and AUTH first, then the sender must be the
    /// authenticated account or one of its aliases (DESIGN.md §6), unless its domain is
    /// exempt. The null sender is refused (users do not send bounces).
    pub(crate) async fn submission_sender(&self, sender: &str) -> Result<(), Cow<'static, str>> {
        if !self.ctx.tls {
            return Err(MUST_STARTTLS.into());
        }
        let Some(user) = &self.user else {
            return Err(AUTH_REQUIRED.into());
        };
        if self.sender_exempt(user) {
            return Ok(());
        }
        match self.owns_address(user, sender).await {
            Ok(true) => Ok(()),
            Ok(false) => {
                tracing::info!(%user, %sender, "MAIL refused: not the authenticated account's address");
                Err(SENDER_NOT_OWNED.into())
            }
            Err(reason) => {
                tracing::warn!(%user, %sender, %reason, "MAIL deferred: sender lookup failed");
                Err(TEMPFAIL_LOOKUP.into())
            }
        }
    }

    /// After DATA on a submission listener: every `From:` address must be the account or one of
    /// its aliases (553 5.7.1 otherwise, unless the domain is exempt); returns the header lines
    /// to add (`Message-ID`, `Date`, and `From` when the message has none).
    pub(crate) async fn check_headers(
        &self,
        user: &str,
        sender: &str,
        headers: Headers,
    ) -> Result<String, Cow<'static, str>> {
        if !self.sender_exempt(user) {
            if headers.has_from && headers.from.is_empty() {
                tracing::info!(%user, "message refused: From: has no address");
                return Err(FROM_NOT_OWNED.into());
            }
            for from in &headers.from {
                match self.owns_address(user, from).await {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::info!(%user, %from, "message refused: From: is not the authenticated account's address");
                        return Err(FROM_NOT_OWNED.into());
                    }
                    Err(reason) => {
                        tracing::warn!(%user, %from, %reason, "message deferred: From: lookup failed");
                        return Err(TEMPFAIL_LOOKUP.into());
                    }
                }
            }
            if headers.overflow && !headers.has_from {
                tracing::info!(%user, "message refused: header section too large to check From:");
                return Err(HEADER_TOO_LARGE.into());
            }
        }
        let mut added = String::new();
        if !headers.has_from && !headers.overflow {
            added.push_str(&format!("From: <{sender}>\r\n"));
        }
        if !headers.has_message_id && !headers.overflow {
            added.push_str(&format!(
                "Message-ID: <{}@{}>\r\n",
                self.smtp.new_id(),
                self.smtp.config.hostname
            ));
        }
        if !headers.has_date && !headers.overflow {
            let now = ds_store::unix_now();
            added.push_str(&format!(
                "Date: {}\r\n",
                mail_builder::headers::date::Date::new(now).to_rfc822()
            ));
        }
        Ok(added)
    }

    /// Whether the sender rules are off for `user`'s domain.
    pub(crate) fn sender_exempt(&self, user: &str) -> bool {
        let domain = user.rsplit_once('@').map_or("", |(_, d)| d);
        self.smtp
            .config
            .any_sender_domains
            .iter()
            .any(|d| d.eq_ignore_ascii_case(domain))
    }

    /// Whether `address` is `user` or one of its aliases (Router records included), wherever
    /// the account lives. `Err`: no answer now.
    pub(crate) async fn owns_address(&self, user: &str, address: &str) -> Result<bool, String> {
        let Ok(parsed) = Address::parse(address) else {
            return Ok(false);
        };
        let normal = parsed.to_string();
        if normal.eq_ignore_ascii_case(user) {
            return Ok(true);
        }
        if !self.smtp.directory.domains().is_served(parsed.domain()) {
            return Ok(false);
        }
        let canonical = match self
            .smtp
            .locator
            .locate_bounded(&normal, Purpose::Sender, &self.fanouts)
            .await
        {
            Location::Local { address, .. } => address,
            Location::Remote(owner) if !owner.is_list => owner.canonical,
            Location::TempFail(reason) => return Err(reason),
            _ => return Ok(false),
        };
        Ok(canonical.eq_ignore_ascii_case(user))
    }
}
