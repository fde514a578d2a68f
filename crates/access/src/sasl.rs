//! SASL PLAIN (RFC 4616), shared by every login protocol: the decoded message's fields, and
//! [`Secret`], a password that never reaches a log.

use std::fmt;

/// Longest field of a PLAIN message, in octets (POP3's longest argument, RFC 2449).
pub const MAX_FIELD_LEN: usize = 255;

/// A value that must never be logged (passwords, SASL responses). `Debug` prints a placeholder.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    /// Wrap a secret.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself; keep it out of logs.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// The three fields of a SASL PLAIN message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlainCredentials {
    /// Authorization identity; empty when the client acts as itself.
    pub authzid: String,
    /// Authentication identity: the login name.
    pub authcid: String,
    /// The password.
    pub password: Secret,
}

/// Why a PLAIN message was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PlainError {
    /// Not three NUL-separated UTF-8 fields with a name and a password.
    #[error("invalid PLAIN message")]
    Malformed,
    /// A field longer than [`MAX_FIELD_LEN`].
    #[error("argument too long")]
    TooLong,
}

/// Split a decoded PLAIN message into its fields (each must be UTF-8, non-empty except the
/// authzid, and at most [`MAX_FIELD_LEN`] octets).
pub fn decode_plain(message: &[u8]) -> Result<PlainCredentials, PlainError> {
    let mut parts = message.split(|&b| b == 0);
    let (Some(authzid), Some(authcid), Some(password), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(PlainError::Malformed);
    };
    let field = |bytes: &[u8]| -> Result<String, PlainError> {
        if bytes.len() > MAX_FIELD_LEN {
            return Err(PlainError::TooLong);
        }
        String::from_utf8(bytes.to_vec()).map_err(|_| PlainError::Malformed)
    };
    let (authzid, authcid, password) = (field(authzid)?, field(authcid)?, field(password)?);
    if authcid.is_empty() || password.is_empty() {
        return Err(PlainError::Malformed);
    }
    Ok(PlainCredentials {
        authzid,
        authcid,
        password: Secret::new(password),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_fields() {
        let c = decode_plain(b"\0bob\0pw").unwrap();
        assert_eq!((c.authzid.as_str(), c.authcid.as_str()), ("", "bob"));
        assert_eq!(c.password.expose(), "pw");
        assert_eq!(format!("{:?}", c.password), "Secret(<redacted>)");
        assert_eq!(decode_plain(b"bob\0pw"), Err(PlainError::Malformed));
        assert_eq!(decode_plain(b"\0\0pw"), Err(PlainError::Malformed));
        assert_eq!(decode_plain(b"\0bob\0"), Err(PlainError::Malformed));
        let long = [b"\0bob\0".as_slice(), &[b'x'; 256]].concat();
        assert_eq!(decode_plain(&long), Err(PlainError::TooLong));
    }
}
