//! ds-cluster
