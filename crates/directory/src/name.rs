//! Mail addresses and login names: parsing, validation and normalisation.
//!
//! A full name is `local@domain` or `local%domain` (split at the last `@`, else at the last
//! `%`). The domain is IDNA-mapped to ASCII and lower-cased; the local part is compared
//! case-insensitively, so it is stored lower-cased.

use std::fmt;

/// Longest local part (RFC 5321 §4.5.3.1.1).
pub const MAX_LOCAL_LEN: usize = 64;
/// Longest domain (RFC 5321 §4.5.3.1.2).
pub const MAX_DOMAIN_LEN: usize = 255;
/// Longest name accepted as input at all, before any parsing.
pub const MAX_NAME_LEN: usize = 320;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("empty name")]
    Empty,
    #[error("name longer than {MAX_NAME_LEN} characters")]
    TooLong,
    #[error("name contains a control character or a space")]
    ControlCharacter,
    #[error("empty local part")]
    EmptyLocal,
    #[error("local part longer than {MAX_LOCAL_LEN} octets")]
    LocalTooLong,
    #[error("local part contains {0:?}, which is not allowed")]
    BadLocalChar(char),
    #[error("local part has a misplaced dot")]
    BadDot,
    #[error("empty domain")]
    EmptyDomain,
    #[error("invalid domain {0:?}")]
    BadDomain(String),
}

/// A normalised mail address: lower-case local part and ASCII lower-case domain.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Address {
    local: String,
    domain: String,
}

impl Address {
    /// Parses a full name (`local@domain` or `local%domain`).
    pub fn parse(name: &str) -> Result<Self, NameError> {
        check_raw(name)?;
        let (local, domain) = split_full(name).ok_or(NameError::EmptyDomain)?;
        Self::new(local, domain)
    }

    /// Builds an address from a local part and a domain, validating and normalising both.
    pub fn new(local: &str, domain: &str) -> Result<Self, NameError> {
        Ok(Self {
            local: normalize_local(local)?,
            domain: normalize_domain(domain)?,
        })
    }

    pub fn local(&self) -> &str {
        &self.local
    }

    pub fn domain(&self) -> &str {
        &self.domain
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.local, self.domain)
    }
}

/// A login name as typed by a client: either full or bare (no domain).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginName {
    Full(Address),
    Bare(String),
}

impl LoginName {
    pub fn parse(name: &str) -> Result<Self, NameError> {
        check_raw(name)?;
        if name.contains(['@', '%']) {
            return Address::parse(name).map(LoginName::Full);
        }
        Ok(LoginName::Bare(normalize_local(name)?))
    }
}

/// Rejects what no name may contain, before splitting.
fn check_raw(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.chars().count() > MAX_NAME_LEN {
        return Err(NameError::TooLong);
    }
    if name.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(NameError::ControlCharacter);
    }
    Ok(())
}

/// Splits at the last `@`, else at the last `%`.
fn split_full(name: &str) -> Option<(&str, &str)> {
    name.rsplit_once('@').or_else(|| name.rsplit_once('%'))
}

/// Validates a dot-atom local part (UTF-8 allowed for SMTPUTF8) and lower-cases it.
pub fn normalize_local(local: &str) -> Result<String, NameError> {
    if local.is_empty() {
        return Err(NameError::EmptyLocal);
    }
    if local.len() > MAX_LOCAL_LEN {
        return Err(NameError::LocalTooLong);
    }
    for c in local.chars() {
        let ok = c.is_alphanumeric() || "!#$&'*+-/=?^_`{|}~.".contains(c);
        if !ok || c.is_control() {
            return Err(NameError::BadLocalChar(c));
        }
    }
    if local.starts_with('.') || local.ends_with('.') || local.contains("..") {
        return Err(NameError::BadDot);
    }
    Ok(local.to_lowercase())
}

/// IDNA-maps a domain to lower-case ASCII and validates its labels.
pub fn normalize_domain(domain: &str) -> Result<String, NameError> {
    let domain = domain.strip_suffix('.').unwrap_or(domain);
    if domain.is_empty() {
        return Err(NameError::EmptyDomain);
    }
    let bad = || NameError::BadDomain(domain.to_string());
    let ascii = idna::domain_to_ascii(domain).map_err(|_| bad())?;
    if ascii.is_empty() || ascii.len() > MAX_DOMAIN_LEN {
        return Err(bad());
    }
    for label in ascii.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !ok {
            return Err(bad());
        }
    }
    Ok(ascii.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_names_split_at_last_at_then_percent() {
        let a = Address::parse("Info%Client2.COM").unwrap();
        assert_eq!(a.to_string(), "info@client2.com");
        let a = Address::parse("info@company.com").unwrap();
        assert_eq!(a.to_string(), "info@company.com");
        // A `%` before the last `@` stays in the local part and is not allowed there.
        assert_eq!(
            Address::parse("a%b@c.com"),
            Err(NameError::BadLocalChar('%'))
        );
    }

    #[test]
    fn idna_domains_become_ascii() {
        let a = Address::parse("jörg@Bücher.example").unwrap();
        assert_eq!(a.domain(), "xn--bcher-kva.example");
        assert_eq!(a.local(), "jörg");
    }

    #[test]
    fn bad_names_are_refused() {
        let long = "a".repeat(300);
        let cases: &[(&str, NameError)] = &[
            ("", NameError::Empty),
            ("@", NameError::EmptyLocal),
            ("a@@b", NameError::BadLocalChar('@')),
            ("@b.com", NameError::EmptyLocal),
            ("a@", NameError::EmptyDomain),
            ("a\u{7}b", NameError::ControlCharacter),
            ("a b@c.com", NameError::ControlCharacter),
            ("a\r\n@c.com", NameError::ControlCharacter),
            (".a@c.com", NameError::BadDot),
            ("a..b@c.com", NameError::BadDot),
            ("a@bad_domain", NameError::BadDomain("bad_domain".into())),
            ("a@-x.com", NameError::BadDomain("-x.com".into())),
            ("a@x..com", NameError::BadDomain("x..com".into())),
        ];
        for (input, err) in cases {
            assert_eq!(
                &LoginName::parse(input).unwrap_err(),
                err,
                "input {input:?}"
            );
        }
        assert_eq!(
            LoginName::parse(&format!("{long}@c.com")).unwrap_err(),
            NameError::LocalTooLong
        );
        assert_eq!(
            LoginName::parse(&long).unwrap_err(),
            NameError::LocalTooLong
        );
        assert_eq!(
            LoginName::parse(&"a".repeat(400)).unwrap_err(),
            NameError::TooLong
        );
    }

    #[test]
    fn bare_names() {
        assert_eq!(
            LoginName::parse("Info").unwrap(),
            LoginName::Bare("info".into())
        );
    }
}
