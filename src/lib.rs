//! The `ballast` binary's library half: the pieces the command line wires
//! together, public so the end-to-end tests can start them in-process.

pub mod local;
pub mod verify;
