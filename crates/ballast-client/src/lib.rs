//! ballast-client
