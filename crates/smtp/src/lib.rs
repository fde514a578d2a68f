//! ds-smtp
