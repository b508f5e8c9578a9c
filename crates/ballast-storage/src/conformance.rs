//! The conformance suite every [`BlockStore`] implementation must pass.
//!
//! An implementation's tests build a [`Harness`] and call [`run_all`]. The
//! randomized part is seeded: the seed is printed, and `BALLAST_SEED=<n>`
//! replays it.

use std::collections::BTreeMap;

use ballast_types::{BlockKey, ShardId, VolumeId, BLOCK_SIZE};
use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::store::{BlockSnapshot, BlockStore, Durability, KeyRange, WriteBatch};
use crate::StorageError;

/// How the suite gets stores of one implementation.
pub trait Harness {
    type Store: BlockStore;
    /// A new, empty store.
    fn open(&mut self) -> Self::Store;
    /// Close `store` and open the same data again; `None` for engines that
    /// keep nothing (their durability tests are skipped).
    fn reopen(&mut self, store: Self::Store) -> Option<Self::Store>;
    /// Flip bits in the stored value of `key` without fixing its checksum.
    fn corrupt(&mut self, store: &Self::Store, key: &BlockKey);
}

/// Run every test of the suite.
pub fn run_all<H: Harness>(h: &mut H) {
    put_get_roundtrip(h);
    delete_and_delete_range(h);
    scan_is_ordered_bounded_and_limited(h);
    failed_batch_changes_nothing(h);
    corruption_is_detected_on_every_read_path(h);
    snapshot_is_isolated(h);
    catalog_entries(h);
    concurrent_writers_are_all_visible(h);
    durable_across_reopen(h);
    randomized_against_model(h, seed_from_env());
}

/// The seed for randomized tests: `BALLAST_SEED` if set, else fresh; printed.
pub fn seed_from_env() -> u64 {
    let seed =
        std::env::var("BALLAST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| rand::thread_rng().gen());
    eprintln!("seed: BALLAST_SEED={seed}");
    seed
}

pub fn key(shard: u32, volume: u64, chunk: u64, block: u32) -> BlockKey {
    BlockKey { shard: ShardId(shard), volume: VolumeId(volume), chunk, block }
}

/// A block filled with a pattern derived from `tag`.
pub fn block(tag: u64) -> Bytes {
    let mut v = vec![0u8; BLOCK_SIZE as usize];
    for (i, chunk) in v.chunks_mut(8).enumerate() {
        chunk.copy_from_slice(&(tag.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i as u64).to_le_bytes());
    }
    Bytes::from(v)
}

fn put(store: &impl BlockStore, k: BlockKey, tag: u64) {
    let mut b = WriteBatch::new();
    b.put(k, block(tag));
    store.write(b, Durability::Buffered).expect("put");
}

fn put_get_roundtrip<H: Harness>(h: &mut H) {
    let s = h.open();
    let k = key(1, 2, 3, 4);
    assert_eq!(s.get(&k).expect("get"), None, "a fresh store reads holes");
    put(&s, k, 7);
    assert_eq!(s.get(&k).expect("get"), Some(block(7)));
    put(&s, k, 8);
    assert_eq!(s.get(&k).expect("get"), Some(block(8)), "overwrite wins");
    assert_eq!(s.get(&key(1, 2, 3, 5)).expect("get"), None, "neighbours stay holes");
    let mut b = WriteBatch::new();
    b.put(k, Bytes::from_static(b"short"));
    assert!(matches!(s.write(b, Durability::Buffered), Err(StorageError::BadBlockLength { .. })));
}

fn delete_and_delete_range<H: Harness>(h: &mut H) {
    let s = h.open();
    for shard in 0..3 {
        for blk in 0..10 {
            put(&s, key(shard, 1, 0, blk), blk as u64);
        }
    }
    let mut b = WriteBatch::new();
    b.delete(key(0, 1, 0, 0));
    b.delete_range(KeyRange::new(key(1, 1, 0, 2), key(1, 1, 0, 5)));
    s.write(b, Durability::Sync).expect("write");
    assert_eq!(s.get(&key(0, 1, 0, 0)).expect("get"), None);
    assert!(s.get(&key(0, 1, 0, 1)).expect("get").is_some());
    for blk in 0..10 {
        let gone = (2..5).contains(&blk);
        assert_eq!(s.get(&key(1, 1, 0, blk)).expect("get").is_none(), gone, "block {blk}");
        assert!(s.get(&key(2, 1, 0, blk)).expect("get").is_some(), "other shards untouched");
    }
    let mut b = WriteBatch::new();
    b.delete_range(KeyRange { start: key(2, 0, 0, 0), end: None });
    s.write(b, Durability::Buffered).expect("write");
    assert!(s.scan(&KeyRange { start: key(2, 0, 0, 0), end: None }, 100).expect("scan").is_empty());
    assert_eq!(s.allocated(&KeyRange::new(key(1, 0, 0, 0), key(2, 0, 0, 0)), 100).expect("alloc").len(), 7);
}

fn scan_is_ordered_bounded_and_limited<H: Harness>(h: &mut H) {
    let s = h.open();
    let keys = [key(0, 9, 0, 0), key(1, 1, 0, 3), key(1, 1, 0, 1), key(1, 1, 1, 0), key(1, 2, 0, 0), key(2, 0, 0, 0)];
    for (i, k) in keys.iter().enumerate() {
        put(&s, *k, i as u64);
    }
    let r = KeyRange::new(key(1, 0, 0, 0), key(1, 2, 0, 0));
    let got = s.scan(&r, 100).expect("scan");
    let got_keys: Vec<_> = got.iter().map(|(k, _)| *k).collect();
    assert_eq!(got_keys, vec![key(1, 1, 0, 1), key(1, 1, 0, 3), key(1, 1, 1, 0)]);
    assert_eq!(got[0].1, block(2));
    assert_eq!(s.scan(&r, 2).expect("scan").len(), 2, "limit respected");
    assert_eq!(s.allocated(&r, 100).expect("allocated"), got_keys);
    assert_eq!(s.allocated(&r, 1).expect("allocated").len(), 1);
}

fn failed_batch_changes_nothing<H: Harness>(h: &mut H) {
    let s = h.open();
    let mut b = WriteBatch::new();
    b.put(key(0, 0, 0, 0), block(1));
    b.put_meta(b"m".to_vec(), b"v".to_vec());
    b.put(key(0, 0, 0, 1), Bytes::from(vec![0u8; 100]));
    assert!(s.write(b, Durability::Sync).is_err());
    assert_eq!(s.get(&key(0, 0, 0, 0)).expect("get"), None, "a failed batch applies nothing");
    assert_eq!(s.get_meta(b"m").expect("meta"), None);
}

fn corruption_is_detected_on_every_read_path<H: Harness>(h: &mut H) {
    let s = h.open();
    let k = key(4, 4, 4, 4);
    put(&s, k, 44);
    put(&s, key(4, 4, 4, 5), 45);
    h.corrupt(&s, &k);
    assert!(matches!(s.get(&k), Err(StorageError::Corrupt { .. })), "get must verify");
    let r = KeyRange::new(key(4, 0, 0, 0), key(5, 0, 0, 0));
    assert!(matches!(s.scan(&r, 10), Err(StorageError::Corrupt { .. })), "scan must verify");
    assert!(matches!(s.snapshot().scan(&r, 10), Err(StorageError::Corrupt { .. })), "snapshot scan must verify");
    assert_eq!(s.get(&key(4, 4, 4, 5)).expect("get"), Some(block(45)), "neighbours unaffected");
    assert_eq!(s.allocated(&r, 10).expect("allocated").len(), 2);
    put(&s, k, 46);
    assert_eq!(s.get(&k).expect("get"), Some(block(46)), "a rewrite repairs");
}

fn snapshot_is_isolated<H: Harness>(h: &mut H) {
    let s = h.open();
    for blk in 0..5 {
        put(&s, key(7, 1, 0, blk), blk as u64);
    }
    let snap = s.snapshot();
    put(&s, key(7, 1, 0, 0), 100);
    put(&s, key(7, 1, 0, 9), 109);
    let mut b = WriteBatch::new();
    b.delete(key(7, 1, 0, 1));
    s.write(b, Durability::Buffered).expect("write");
    let r = KeyRange::new(key(7, 0, 0, 0), key(8, 0, 0, 0));
    let old = snap.scan(&r, 100).expect("snapshot scan");
    assert_eq!(old.len(), 5);
    assert_eq!(old[0].1, block(0));
    // Paging through a snapshot: resume after the last key seen.
    let first = snap.scan(&r, 2).expect("page");
    let next_start = BlockKey { block: first[1].0.block + 1, ..first[1].0 };
    let rest = snap.scan(&KeyRange { start: next_start, end: r.end }, 100).expect("page");
    assert_eq!(first.len() + rest.len(), 5);
    let now = s.scan(&r, 100).expect("scan");
    assert_eq!(now.len(), 5);
    assert_eq!(now[0].1, block(100));
}

fn catalog_entries<H: Harness>(h: &mut H) {
    let s = h.open();
    let mut b = WriteBatch::new();
    b.put_meta(b"vol/a".to_vec(), b"1".to_vec());
    b.put_meta(b"vol/b".to_vec(), b"2".to_vec());
    b.put_meta(b"volx".to_vec(), b"3".to_vec());
    s.write(b, Durability::Sync).expect("write");
    assert_eq!(s.get_meta(b"vol/a").expect("meta"), Some(b"1".to_vec()));
    let listed = s.scan_meta(b"vol/").expect("scan meta");
    assert_eq!(listed, vec![(b"vol/a".to_vec(), b"1".to_vec()), (b"vol/b".to_vec(), b"2".to_vec())]);
    let mut b = WriteBatch::new();
    b.delete_meta(b"vol/a".to_vec());
    s.write(b, Durability::Sync).expect("write");
    assert_eq!(s.get_meta(b"vol/a").expect("meta"), None);
}

fn concurrent_writers_are_all_visible<H: Harness>(h: &mut H) {
    let s = h.open();
    std::thread::scope(|scope| {
        for t in 0..4u32 {
            let s = &s;
            scope.spawn(move || {
                for blk in 0..50 {
                    put(s, key(9, t as u64, 0, blk), (t * 1000 + blk) as u64);
                }
            });
        }
    });
    for t in 0..4u32 {
        for blk in 0..50 {
            assert_eq!(s.get(&key(9, t as u64, 0, blk)).expect("get"), Some(block((t * 1000 + blk) as u64)));
        }
    }
}

fn durable_across_reopen<H: Harness>(h: &mut H) {
    let s = h.open();
    put(&s, key(3, 3, 0, 0), 1);
    let mut b = WriteBatch::new();
    b.put(key(3, 3, 0, 1), block(2));
    b.put_meta(b"k".to_vec(), b"v".to_vec());
    s.write(b, Durability::Sync).expect("sync write");
    put(&s, key(3, 3, 0, 2), 3);
    s.sync().expect("sync");
    let Some(s) = h.reopen(s) else { return };
    assert_eq!(s.get(&key(3, 3, 0, 0)).expect("get"), Some(block(1)));
    assert_eq!(s.get(&key(3, 3, 0, 1)).expect("get"), Some(block(2)));
    assert_eq!(s.get(&key(3, 3, 0, 2)).expect("get"), Some(block(3)));
    assert_eq!(s.get_meta(b"k").expect("meta"), Some(b"v".to_vec()));
}

/// Random puts, deletes and range deletes against a `BTreeMap` model.
pub fn randomized_against_model<H: Harness>(h: &mut H, seed: u64) {
    let s = h.open();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut model: BTreeMap<BlockKey, u64> = BTreeMap::new();
    let rand_key =
        |rng: &mut StdRng| key(rng.gen_range(0..3), rng.gen_range(0..3), rng.gen_range(0..4), rng.gen_range(0..16));
    for step in 0..2000u64 {
        let mut b = WriteBatch::new();
        for _ in 0..rng.gen_range(1..4) {
            match rng.gen_range(0..10) {
                0..=6 => {
                    let k = rand_key(&mut rng);
                    b.put(k, block(step));
                    model.insert(k, step);
                }
                7 | 8 => {
                    let k = rand_key(&mut rng);
                    b.delete(k);
                    model.remove(&k);
                }
                _ => {
                    let (a, c) = (rand_key(&mut rng), rand_key(&mut rng));
                    let r = KeyRange::new(a.min(c), a.max(c));
                    b.delete_range(r);
                    model.retain(|k, _| !r.contains(k));
                }
            }
        }
        s.write(b, Durability::Buffered).expect("write");
        if step % 200 == 0 {
            let all = s.scan(&KeyRange { start: key(0, 0, 0, 0), end: None }, usize::MAX).expect("scan");
            let expect: Vec<_> = model.iter().map(|(k, t)| (*k, block(*t))).collect();
            assert!(all == expect, "store diverged from the model at step {step} (BALLAST_SEED={seed})");
        }
    }
    for (k, t) in &model {
        assert_eq!(s.get(k).expect("get"), Some(block(*t)), "BALLAST_SEED={seed}");
    }
}
