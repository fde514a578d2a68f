//! How an outbound session is secured and authenticated (DESIGN.md §6), after Postfix's
//! `smtp_tls_security_level` and `relayhost` with `smtp_sasl_auth_enable`:
//!
//! - To MX hosts, TLS is opportunistic by default (RFC 7435, [`TlsLevel::May`]): `STARTTLS`
//!   when offered, the certificate not verified (MX host names are not authenticated by DNS
//!   without DNSSEC/DANE), and a failed handshake retried once in plain text on a new
//!   connection. [`TlsLevel::Encrypt`] requires TLS (`4xx` without it); [`TlsLevel::None`]
//!   never starts it.
//! - To a relay host with credentials, TLS verified against the system's roots or the
//!   configured CA is required, and `AUTH PLAIN` follows it; without verified TLS the
//!   credential is never sent and the message is deferred.

use std::sync::Arc;

use crate::SmtpConfig;
use crate::relay::{Client, RcptOutcome, RelaySession, Reply, StartTlsError, has_cap};

/// When outbound sessions use TLS (`outbound.tls`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsLevel {
    /// Never `STARTTLS`.
    None,
    /// `STARTTLS` when the server offers it, unverified; plain text otherwise.
    #[default]
    May,
    /// `STARTTLS` required (unverified); a server without it defers the message.
    Encrypt,
}

impl std::str::FromStr for TlsLevel {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(TlsLevel::None),
            "may" => Ok(TlsLevel::May),
            "encrypt" => Ok(TlsLevel::Encrypt),
            other => Err(format!(
                "{other:?} is not a TLS level (\"may\", \"encrypt\" or \"none\")"
            )),
        }
    }
}

/// The relay host's credential and the verified TLS it is sent over.
pub(crate) struct RelayAuth {
    pub user: String,
    pub password: String,
    /// Trusting the configured CA or the system's roots; `Err`: why there is no such
    /// configuration (then nothing is sent).
    pub tls: Result<Arc<rustls::ClientConfig>, String>,
}

/// How outbound sessions are opened.
pub(crate) struct Transport {
    pub level: TlsLevel,
    /// Opportunistic TLS (no verification); `None` when it could not be built.
    pub unverified: Option<Arc<rustls::ClientConfig>>,
    /// Every outbound message goes to this `host:port` instead of the MX hosts.
    pub relayhost: Option<String>,
    pub relay_auth: Option<RelayAuth>,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("level", &self.level)
            .field("relayhost", &self.relayhost)
            .field(
                "relay_user",
                &self.relay_auth.as_ref().map(|a| a.user.as_str()),
            )
            .finish_non_exhaustive()
    }
}

impl Transport {
    /// A session to `endpoint` (an MX host address, or the relay host). `Err` is the outcome
    /// of every recipient that was to go over it.
    pub(crate) async fn open(
        &self,
        config: &SmtpConfig,
        endpoint: &str,
    ) -> Result<RelaySession, RcptOutcome> {
        match &self.relay_auth {
            Some(auth) => open_authenticated(config, auth, endpoint).await,
            None => self.open_opportunistic(config, endpoint).await,
        }
    }

    /// A session secured as `level` says, unauthenticated.
    async fn open_opportunistic(
        &self,
        config: &SmtpConfig,
        endpoint: &str,
    ) -> Result<RelaySession, RcptOutcome> {
        let (client, caps) = Client::start(config, endpoint).await?;
        let offered = has_cap(&caps, "STARTTLS");
        let tls = match (self.level, &self.unverified) {
            (TlsLevel::None, _) => return Ok(plain(client, caps)),
            (TlsLevel::May, _) if !offered => return Ok(plain(client, caps)),
            (TlsLevel::Encrypt, _) if !offered => {
                tracing::info!(%endpoint, "outbound: no STARTTLS offered, and outbound.tls = \"encrypt\"");
                return Err(RcptOutcome::Retry(format!(
                    "{endpoint} does not offer STARTTLS (outbound.tls = \"encrypt\")"
                )));
            }
            (_, Some(tls)) => tls,
            (TlsLevel::May, None) => return Ok(plain(client, caps)),
            (_, None) => {
                return Err(RcptOutcome::Retry(
                    "no TLS client configuration (outbound.tls = \"encrypt\")".into(),
                ));
            }
        };
        match client.starttls(config, tls, endpoint).await {
            Ok((client, caps)) => Ok(secured(client, caps)),
            Err(StartTlsError::Refused(client, why)) if self.level == TlsLevel::May => {
                tracing::info!(%endpoint, %why, "outbound: STARTTLS refused, going on in plain text");
                Ok(plain(client, caps))
            }
            Err(StartTlsError::Handshake(why)) if self.level == TlsLevel::May => {
                // As Postfix does: the host is tried once more, in plain text.
                tracing::warn!(%endpoint, %why, "outbound: TLS handshake failed, retrying in plain text once");
                let (client, caps) = Client::start(config, endpoint).await?;
                Ok(plain(client, caps))
            }
            Err(e) => Err(RcptOutcome::Retry(e.reason())),
        }
    }
}

fn plain(client: Client, caps: Reply) -> RelaySession {
    metrics::counter!("dshare_outbound_sessions_total", "tls" => "no").increment(1);
    RelaySession::new(client, caps, false)
}

fn secured(client: Client, caps: Reply) -> RelaySession {
    metrics::counter!("dshare_outbound_sessions_total", "tls" => "yes").increment(1);
    RelaySession::new(client, caps, false)
}

/// A session to the relay host: verified TLS, then `AUTH PLAIN`; otherwise nothing is sent.
async fn open_authenticated(
    config: &SmtpConfig,
    auth: &RelayAuth,
    endpoint: &str,
) -> Result<RelaySession, RcptOutcome> {
    let defer = |why: String| {
        tracing::warn!(%endpoint, %why, "outbound: relay host credential not sent, message deferred");
        RcptOutcome::Retry(why)
    };
    let tls = auth.tls.as_ref().map_err(|e| {
        defer(format!(
            "no verified TLS with relay host {endpoint}: no trust anchors ({e})"
        ))
    })?;
    let (client, caps) = Client::start(config, endpoint).await?;
    if !has_cap(&caps, "STARTTLS") {
        return Err(defer(format!(
            "relay host {endpoint} does not offer STARTTLS: the credential is only sent over verified TLS"
        )));
    }
    let (mut client, caps) = client
        .starttls(config, tls, endpoint)
        .await
        .map_err(|e| defer(format!("no verified TLS with relay host: {}", e.reason())))?;
    if !offers_auth_plain(&caps) {
        return Err(defer(format!(
            "relay host {endpoint} does not offer AUTH PLAIN"
        )));
    }
    client
        .auth_plain(&auth.user, &auth.password)
        .await
        .map_err(|e| defer(format!("relay host {endpoint}: {e}")))?;
    Ok(secured(client, caps))
}

/// True when the EHLO reply lists `AUTH` with the `PLAIN` mechanism.
fn offers_auth_plain(caps: &Reply) -> bool {
    caps.lines.iter().skip(1).any(|l| {
        let mut words = l.split_whitespace();
        words.next().is_some_and(|w| w.eq_ignore_ascii_case("AUTH"))
            && words.any(|m| m.eq_ignore_ascii_case("PLAIN"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_parse() {
        assert_eq!("may".parse(), Ok(TlsLevel::May));
        assert_eq!("encrypt".parse(), Ok(TlsLevel::Encrypt));
        assert_eq!("none".parse(), Ok(TlsLevel::None));
        assert!("dane".parse::<TlsLevel>().is_err());
    }
}
