//! ds-testkit
