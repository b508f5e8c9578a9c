//! Tests of the Raft layer; each file is named after what it proves.

mod cluster;
mod group_commit;
mod openraft_suite;
mod support;
