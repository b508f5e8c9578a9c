//! Fuzz targets for Ballast's parsers of untrusted bytes.
//!
//! Each module has one entry point, `run(&[u8])`, used three ways: by the
//! cargo-fuzz binaries in `fuzz_targets/` (libFuzzer, coverage-guided), by
//! the smoke test in `tests/smoke.rs` (the committed seeds plus seeded random
//! inputs, on stable Rust with plain `cargo test`), and by `seeds` to write
//! the seed corpora. A target fails by panicking; every panic, including one
//! caught inside the server's per-request `catch_unwind`, is a finding.
//!
//! - [`nbd_request`]: the server's transmission phase (request decoding,
//!   validation, payload framing, reply building) over an in-memory pipe.
//! - [`nbd_option`]: the server's handshake (client flags, option haggling).
//! - [`nbd_client_reply`]: the NBD client's handshake and reply parsing
//!   against a server that sends arbitrary bytes.
//! - [`proto_conversions`]: prost decoding of every Data/Raft/Admin message
//!   and its `TryFrom` conversion into `ballast_types`, with a stable round
//!   trip for whatever converts.

pub mod harness;
pub mod nbd_client_reply;
pub mod nbd_option;
pub mod nbd_request;
pub mod proto_conversions;
pub mod seeds;
