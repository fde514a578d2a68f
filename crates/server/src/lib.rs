//! ds-server
