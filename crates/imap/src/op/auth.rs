//! Not-authenticated state and session-wide commands: LOGIN, AUTHENTICATE PLAIN (SASL-IR),
//! STARTTLS, ID, ENABLE.

use std::borrow::Cow;

use imap_next::types::CommandAuthenticate;
use imap_types::auth::{AuthMechanism, AuthenticateData};
use imap_types::core::{AString, IString, NString, Tag, Vec1};
use imap_types::extensions::enable::CapabilityEnable;
use imap_types::response::{Code, CodeOther, Status};
use imap_types::secret::Secret as ImapSecret;

use ds_access::imap_client::UNAUTHENTICATE_CAPABILITY;
use ds_access::imap_client::{NOT_HERE_TEXT, verify_imap_id};

use crate::Result;
use crate::login::{self, LoginOutcome, Secret};
use crate::response::Reply;
use crate::session::{Flow, Session, State};

const AUTH_FAILED: &str = "AUTHENTICATIONFAILED";

/// A session id for the `x-session-id` field: the random part of the greeting nonce.
fn session_id(nonce: &str) -> String {
    nonce
        .trim_start_matches('<')
        .split(['@', '.'])
        .next()
        .unwrap_or_default()
        .to_owned()
}

impl Session {
    pub(crate) fn starttls(&mut self) -> Result<(Reply, Flow)> {
        if self.ctx.tls {
            return Ok((Reply::bad("TLS is already active"), Flow::Continue));
        }
        if self.imap.tls_acceptor.is_none() {
            return Ok((Reply::bad("STARTTLS is not available"), Flow::Continue));
        }
        if self.logged_in() {
            return Ok((Reply::bad("Already logged in"), Flow::Continue));
        }
        Ok((Reply::ok("Begin TLS negotiation now"), Flow::StartTls))
    }

    /// The outcome of a login as a reply; on success the session is authenticated.
    async fn try_login(&mut self, name: &str, password: &Secret) -> Result<Reply> {
        let session_id = session_id(&self.nonce);
        let attempt = login::Attempt {
            ctx: &self.ctx,
            client: self.client,
            forwarded: self.forwarded.is_some(),
            session_id: &session_id,
            fanouts: &self.fanouts,
        };
        let started = std::time::Instant::now();
        let outcome = login::login(&self.imap, attempt, name, password).await;
        metrics::histogram!("dshare_login_seconds", "protocol" => "imap")
            .record(started.elapsed().as_secs_f64());
        Ok(match outcome {
            LoginOutcome::Local(account) => {
                if let Err(e) = self.imap.mail.ensure_account(&account) {
                    tracing::warn!(error = %e, "provisioning mailboxes failed");
                    return Ok(Reply::no("Try again later").code("UNAVAILABLE"));
                }
                tracing::Span::current().record("user", account.as_str());
                tracing::info!("logged in");
                self.account = account;
                self.state = State::Authenticated;
                let mut caps = self.capabilities();
                if self.forwarded.is_some() {
                    // Told to the front node only: it may end this session and keep the link.
                    caps.push(' ');
                    caps.push_str(UNAUTHENTICATE_CAPABILITY);
                }
                Reply::ok("Logged in").code(format!("CAPABILITY {caps}"))
            }
            LoginOutcome::Forwarded(owner_session, _owner) => {
                let owner_session = *owner_session;
                let caps: Vec<&str> = owner_session
                    .capabilities
                    .iter()
                    .map(String::as_str)
                    .filter(|c| !c.eq_ignore_ascii_case(UNAUTHENTICATE_CAPABILITY))
                    .collect();
                let reply = Reply::ok("Logged in").code(format!("CAPABILITY {}", caps.join(" ")));
                self.splice_to = Some((owner_session.conn, owner_session.reuse));
                reply
            }
            LoginOutcome::NotHere => Reply::no(NOT_HERE_TEXT).code(AUTH_FAILED),
            LoginOutcome::Failed => Reply::no("Authentication failed").code(AUTH_FAILED),
            LoginOutcome::Unavailable => {
                Reply::no("Service temporarily unavailable, try again later").code("UNAVAILABLE")
            }
        })
    }

    pub(crate) async fn login_command(
        &mut self,
        username: AString<'static>,
        password: ImapSecret<AString<'static>>,
    ) -> Result<Reply> {
        if self.logged_in() {
            return Ok(Reply::bad("Already logged in"));
        }
        if self.login_disabled() {
            return Ok(Reply::no("Use STARTTLS first").code("PRIVACYREQUIRED"));
        }
        let name = String::from_utf8_lossy(username.as_ref()).into_owned();
        let raw: &[u8] = password.declassify().as_ref();
        let password = Secret::new(String::from_utf8_lossy(raw).into_owned());
        self.try_login(&name, &password).await
    }

    fn tagged_status(tag: &str, reply: &Reply) -> Status<'static> {
        let tag = Tag::try_from(tag.to_string()).unwrap_or_else(|_| Tag::unvalidated("*"));
        let code = reply
            .code
            .as_ref()
            .map(|c| Code::Other(CodeOther::unvalidated(c.clone().into_bytes())));
        let text = imap_types::core::Text::unvalidated(reply.text.clone());
        let body = imap_types::response::StatusBody {
            kind: match reply.kind {
                "OK" => imap_types::response::StatusKind::Ok,
                "NO" => imap_types::response::StatusKind::No,
                _ => imap_types::response::StatusKind::Bad,
            },
            code,
            text,
        };
        Status::Tagged(imap_types::response::Tagged { tag, body })
    }

    /// End an AUTHENTICATE exchange with `reply`.
    async fn finish_auth(&mut self, tag: &str, reply: Reply) -> Result<Flow> {
        self.auth_tag = None;
        let failed = reply.code.as_deref() == Some(AUTH_FAILED);
        let status = Self::tagged_status(tag, &reply);
        if self.server_mut().authenticate_finish(status).is_err() {
            self.send(&reply.line(tag)).await?;
        }
        self.drain().await?;
        if failed && self.after_failed_login() {
            self.send(b"* BYE Too many failed logins\r\n").await?;
            return Ok(Flow::Close);
        }
        Ok(Flow::Continue)
    }

    pub(crate) async fn authenticate(&mut self, cmd: CommandAuthenticate) -> Result<Flow> {
        let tag = cmd.tag.inner().to_string();
        if self.logged_in() {
            return self
                .finish_auth(&tag, Reply::bad("Already logged in"))
                .await;
        }
        if self.login_disabled() {
            return self
                .finish_auth(
                    &tag,
                    Reply::no("Use STARTTLS first").code("PRIVACYREQUIRED"),
                )
                .await;
        }
        if cmd.mechanism != AuthMechanism::Plain {
            return self
                .finish_auth(
                    &tag,
                    Reply::no("Unsupported mechanism, use PLAIN").code("CANNOT"),
                )
                .await;
        }
        match cmd.initial_response {
            Some(ir) => {
                let data: Cow<'static, [u8]> = ir.declassify().clone();
                self.auth_tag = Some(tag.clone());
                self.plain(&tag, &data).await
            }
            None => {
                self.auth_tag = Some(tag);
                let cont = imap_types::response::CommandContinuationRequest::base64(Vec::new());
                if self.server_mut().authenticate_continue(cont).is_err() {
                    tracing::warn!("imap-next refused the AUTHENTICATE continuation");
                }
                self.drain().await?;
                Ok(Flow::Continue)
            }
        }
    }

    pub(crate) async fn authenticate_data(
        &mut self,
        data: AuthenticateData<'static>,
    ) -> Result<Flow> {
        let tag = self.auth_tag.clone().unwrap_or_else(|| "*".into());
        match data {
            AuthenticateData::Cancel => {
                self.finish_auth(&tag, Reply::bad("Authentication cancelled"))
                    .await
            }
            AuthenticateData::Continue(bytes) => {
                let data = bytes.declassify().clone();
                self.plain(&tag, &data).await
            }
        }
    }

    async fn plain(&mut self, tag: &str, message: &[u8]) -> Result<Flow> {
        let creds = match login::decode_plain(message) {
            Ok(c) => c,
            Err(e) => return self.finish_auth(tag, Reply::bad(format!("{e}"))).await,
        };
        if !creds.authzid.is_empty() && creds.authzid != creds.authcid {
            return self
                .finish_auth(tag, Reply::no("Authentication failed").code(AUTH_FAILED))
                .await;
        }
        let reply = self.try_login(&creds.authcid, &creds.password).await?;
        self.finish_auth(tag, reply).await
    }

    /// `UNAUTHENTICATE` (RFC 8437) from the front node of a forwarded session, tagged with
    /// the proof over this connection's nonce ([`ds_access::imap_relay`]): back to the
    /// not-authenticated state, everything of the session dropped, and a fresh nonce (in the
    /// answer) for the next forwarded login on this connection. Anyone else gets `BAD`, as for
    /// an unknown command.
    pub(crate) async fn unauthenticate(&mut self, tag: &str) -> Result<Flow> {
        let proven = match (&self.forwarded, self.imap.config.proof_key.as_ref()) {
            (Some(_), Some(key)) => ds_access::proof::is_end_tag(key, &self.nonce, tag),
            _ => false,
        };
        if !proven || !self.logged_in() || self.idle_tag.is_some() {
            self.send(&Reply::bad("Unknown command").line(tag)).await?;
            return Ok(Flow::Continue);
        }
        tracing::info!(
            "forwarded session ended by the front node; the link waits for another login"
        );
        self.state = State::NotAuthenticated;
        self.account.clear();
        self.condstore = false;
        self.forwarded = None;
        self.client = self.ctx.peer.ip();
        // Nothing of this session's counts against the next one on the link.
        self.reset_counters();
        self.nonce = ds_access::proof::greeting_nonce(&self.imap.config.hostname);
        let span = tracing::Span::current();
        for field in ["user", "original_client", "forwarded_by"] {
            span.record(field, "");
        }
        let line = format!("{tag} OK Unauthenticated, ready {}\r\n", self.nonce);
        self.send(line.as_bytes()).await?;
        Ok(Flow::Continue)
    }

    /// `ID`: our identification; before login, from a peer with a valid proof over this
    /// connection's nonce, the original client's address (DESIGN.md §7). Without a valid proof
    /// the forwarding fields are ignored.
    pub(crate) async fn id(
        &mut self,
        parameters: Option<Vec<(IString<'static>, NString<'static>)>>,
    ) -> Result<Reply> {
        if let (Some(parameters), Some(key), false, None) = (
            &parameters,
            self.imap.config.proof_key.as_ref(),
            self.logged_in(),
            &self.forwarded,
        ) {
            let fields: Vec<(String, Option<String>)> = parameters
                .iter()
                .map(|(k, v)| {
                    let k = String::from_utf8_lossy(k.as_ref()).into_owned();
                    let v =
                        v.0.as_ref()
                            .map(|v| String::from_utf8_lossy(v.as_ref()).into_owned());
                    (k, v)
                })
                .collect();
            let forwarding = fields
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case(ds_access::imap_client::ID_SIG));
            let verified = verify_imap_id(
                fields.iter().map(|(k, v)| (k.as_str(), v.as_deref())),
                &self.nonce,
                key,
            );
            match verified {
                Some(client) => {
                    let span = tracing::Span::current();
                    span.record("original_client", client.addr.to_string().as_str());
                    span.record("forwarded_by", client.connected_ip.to_string().as_str());
                    tracing::info!(
                        original_client = %client.addr,
                        front = %client.connected_ip,
                        front_session = %client.session_id,
                        hop = client.hop,
                        "forwarded session"
                    );
                    self.client = client.addr.ip();
                    self.forwarded = Some(client);
                    // A peer's forwarded session: not counted against the front node's
                    // address's connection limit.
                    self.ctx.ip_slot.release();
                }
                None if forwarding => {
                    tracing::warn!("ID with a forwarding proof that does not verify: ignored")
                }
                None => {}
            }
        }
        let line = format!(
            "* ID (\"name\" \"dshare\" \"version\" \"{}\")\r\n",
            env!("CARGO_PKG_VERSION")
        );
        self.send(line.as_bytes()).await?;
        Ok(Reply::ok("ID completed"))
    }

    pub(crate) async fn enable(
        &mut self,
        capabilities: Vec1<CapabilityEnable<'static>>,
    ) -> Result<Reply> {
        let mut enabled = Vec::new();
        for c in capabilities.as_ref() {
            if matches!(c, CapabilityEnable::CondStore) && !enabled.contains(&"CONDSTORE") {
                self.condstore = true;
                enabled.push("CONDSTORE");
            }
        }
        let mut line = String::from("* ENABLED");
        for e in enabled {
            line.push(' ');
            line.push_str(e);
        }
        line.push_str("\r\n");
        self.send(line.as_bytes()).await?;
        Ok(Reply::ok("ENABLE completed"))
    }
}
