//! Tests of the Raft layer; each file is named after what it proves.

mod cluster;
mod group_commit;
mod integrity;
mod meta_cluster;
mod openraft_suite;
mod support;
