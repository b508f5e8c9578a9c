//! ballast-node
