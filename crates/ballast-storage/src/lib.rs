//! Block storage for shard data.
//!
//! [`BlockStore`] is the contract every engine implements; it knows nothing of
//! RocksDB. [`MemStore`] keeps blocks in memory (tests, caches), [`RocksStore`]
//! keeps them in one RocksDB per disk. Both must pass [`conformance`].
//!
//! [`VolumeView`] turns byte ranges of one volume into block operations,
//! including read-modify-write for pieces smaller than a block.

pub mod conformance;
mod error;
mod log;
pub mod log_conformance;
mod mem;
mod rocks;
mod rocks_log;
mod store;
mod value;
mod volume;

pub use error::StorageError;
pub use log::{GroupId, LogBatch, LogOp, LogStore, MemLogStore};
pub use mem::MemStore;
pub use rocks::{RocksConfig, RocksStore};
pub use store::{BlockSnapshot, BlockStore, Durability, KeyRange, MetaEntry, WriteBatch, WriteOp};
pub use value::{decode_block, encode_block, VALUE_FORMAT_V1};
pub use volume::{Segment, VolumeView};
