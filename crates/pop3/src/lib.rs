//! ds-pop3
