//! The conformance suite every [`LogStore`] implementation must pass.
//!
//! An implementation's tests build a [`LogHarness`] and call [`run_all`]. The
//! randomized part is seeded: the seed is printed, and `BALLAST_SEED=<n>`
//! replays it.

use std::collections::BTreeMap;

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::conformance::seed_from_env;
use crate::log::{GroupId, LogBatch, LogStore};

/// How the suite gets stores of one implementation.
pub trait LogHarness {
    type Store: LogStore;
    /// A new, empty store.
    fn open(&mut self) -> Self::Store;
    /// Close `store` and open the same data again; `None` for engines that
    /// keep nothing (their durability tests are skipped).
    fn reopen(&mut self, store: Self::Store) -> Option<Self::Store>;
}

/// Run every test of the suite.
pub fn run_all<H: LogHarness>(h: &mut H) {
    append_read_last_first(h);
    groups_are_isolated(h);
    truncate_and_purge(h);
    batch_is_ordered(h);
    state_values(h);
    delete_group_removes_everything(h);
    extreme_groups_and_indexes(h);
    durable_across_reopen(h);
    randomized_against_model(h, seed_from_env());
}

fn entry(group: GroupId, index: u64) -> Bytes {
    Bytes::from(format!("g{group}-i{index}"))
}

fn indexes(v: &[(u64, Bytes)]) -> Vec<u64> {
    v.iter().map(|(i, _)| *i).collect()
}

fn append_read_last_first<H: LogHarness>(h: &mut H) {
    let s = h.open();
    assert_eq!(s.last(1).expect("last"), None, "a fresh store has no entries");
    assert_eq!(s.first(1).expect("first"), None);
    s.append((1..=10).map(|i| (1, i, entry(1, i))).collect(), true).expect("append");
    let got = s.read(1, 3..6).expect("read");
    assert_eq!(got, vec![(3, entry(1, 3)), (4, entry(1, 4)), (5, entry(1, 5))]);
    assert_eq!(indexes(&s.read(1, 0..100).expect("read")), (1..=10).collect::<Vec<_>>());
    assert!(s.read(1, 5..5).expect("read").is_empty(), "an empty range reads nothing");
    assert!(s.read(1, 11..20).expect("read").is_empty());
    assert_eq!(s.last(1).expect("last"), Some((10, entry(1, 10))));
    assert_eq!(s.first(1).expect("first"), Some(1));
    s.append(vec![(1, 10, Bytes::from_static(b"new"))], false).expect("overwrite");
    assert_eq!(s.last(1).expect("last"), Some((10, Bytes::from_static(b"new"))), "an append replaces");
}

fn groups_are_isolated<H: LogHarness>(h: &mut H) {
    let s = h.open();
    let mut b = LogBatch::new();
    for g in [3, 4, 5] {
        for i in 0..5 {
            b.append(g, i, entry(g, i));
        }
    }
    s.write(b, true).expect("write");
    assert_eq!(s.last(4).expect("last"), Some((4, entry(4, 4))));
    assert_eq!(s.last(6).expect("last"), None);
    assert_eq!(s.last(2).expect("last"), None);
    s.truncate_from(4, 0).expect("truncate");
    s.purge_upto(5, 3).expect("purge");
    assert_eq!(s.last(4).expect("last"), None);
    assert_eq!(indexes(&s.read(3, 0..10).expect("read")), vec![0, 1, 2, 3, 4], "neighbours untouched");
    assert_eq!(indexes(&s.read(5, 0..10).expect("read")), vec![4]);
    assert_eq!(s.first(5).expect("first"), Some(4));
}

fn truncate_and_purge<H: LogHarness>(h: &mut H) {
    let s = h.open();
    s.append((0..20).map(|i| (7, i, entry(7, i))).collect(), true).expect("append");
    s.truncate_from(7, 15).expect("truncate");
    assert_eq!(s.last(7).expect("last").map(|e| e.0), Some(14));
    s.purge_upto(7, 4).expect("purge");
    assert_eq!(s.first(7).expect("first"), Some(5));
    assert_eq!(indexes(&s.read(7, 0..100).expect("read")), (5..15).collect::<Vec<_>>());
    s.purge_upto(7, 100).expect("purge all");
    assert_eq!(s.last(7).expect("last"), None);
}

fn batch_is_ordered<H: LogHarness>(h: &mut H) {
    let s = h.open();
    s.append((1..=5).map(|i| (2, i, entry(2, i))).collect(), true).expect("append");
    // A conflicting suffix replaced in one batch: truncate, then append.
    let mut b = LogBatch::new();
    b.truncate_from(2, 3);
    b.append(2, 3, Bytes::from_static(b"term2"));
    b.put_state(2, "vote", Bytes::from_static(b"v2"));
    s.write(b, true).expect("write");
    assert_eq!(indexes(&s.read(2, 0..10).expect("read")), vec![1, 2, 3]);
    assert_eq!(s.last(2).expect("last"), Some((3, Bytes::from_static(b"term2"))));
    assert_eq!(s.get_state(2, "vote").expect("state"), Some(Bytes::from_static(b"v2")));
}

fn state_values<H: LogHarness>(h: &mut H) {
    let s = h.open();
    assert_eq!(s.get_state(1, "vote").expect("state"), None);
    s.put_state(1, "vote", Bytes::from_static(b"a")).expect("put");
    s.put_state(1, "vote-x", Bytes::from_static(b"x")).expect("put");
    s.put_state(2, "vote", Bytes::from_static(b"b")).expect("put");
    assert_eq!(s.get_state(1, "vote").expect("state"), Some(Bytes::from_static(b"a")));
    assert_eq!(s.get_state(2, "vote").expect("state"), Some(Bytes::from_static(b"b")));
    assert_eq!(s.get_state(1, "vot").expect("state"), None, "names are exact, not prefixes");
    let mut b = LogBatch::new();
    b.delete_state(1, "vote");
    s.write(b, true).expect("delete");
    assert_eq!(s.get_state(1, "vote").expect("state"), None);
    assert_eq!(s.get_state(1, "vote-x").expect("state"), Some(Bytes::from_static(b"x")));
}

fn delete_group_removes_everything<H: LogHarness>(h: &mut H) {
    let s = h.open();
    for g in [8, 9, 10] {
        s.append((0..4).map(|i| (g, i, entry(g, i))).collect(), false).expect("append");
        s.put_state(g, "vote", entry(g, 0)).expect("put");
    }
    s.put_state(10, "purged", entry(10, 1)).expect("put");
    s.delete_group(9, &[]).expect("delete group");
    assert_eq!(s.last(9).expect("last"), None);
    assert_eq!(s.get_state(9, "vote").expect("state"), None);
    for g in [8, 10] {
        assert_eq!(s.last(g).expect("last").map(|e| e.0), Some(3), "group {g} untouched");
        assert_eq!(s.get_state(g, "vote").expect("state"), Some(entry(g, 0)));
    }
    // Keeping a state value: everything else of the group goes, durably.
    s.delete_group(10, &["vote", "absent"]).expect("delete group keeping its vote");
    s.sync().expect("sync");
    assert_eq!(s.last(10).expect("last"), None);
    assert_eq!(s.first(10).expect("first"), None);
    assert_eq!(s.get_state(10, "purged").expect("state"), None);
    assert_eq!(s.get_state(10, "absent").expect("state"), None);
    assert_eq!(s.get_state(10, "vote").expect("state"), Some(entry(10, 0)));
    assert_eq!(s.last(8).expect("last").map(|e| e.0), Some(3), "group 8 untouched");
}

fn extreme_groups_and_indexes<H: LogHarness>(h: &mut H) {
    let s = h.open();
    let max = u64::MAX;
    s.append(vec![(max, 0, entry(max, 0)), (max, max, entry(max, max)), (0, max, entry(0, max))], true)
        .expect("append");
    assert_eq!(s.last(max).expect("last"), Some((max, entry(max, max))));
    assert_eq!(s.last(0).expect("last"), Some((max, entry(0, max))));
    assert_eq!(s.first(max).expect("first"), Some(0));
    s.purge_upto(max, max).expect("purge");
    assert_eq!(s.last(max).expect("last"), None);
    assert_eq!(s.last(0).expect("last").map(|e| e.0), Some(max), "group 0 untouched");
    s.put_state(max, "vote", Bytes::from_static(b"m")).expect("put");
    s.delete_group(max, &[]).expect("delete");
    assert_eq!(s.get_state(max, "vote").expect("state"), None);
    assert_eq!(s.last(0).expect("last").map(|e| e.0), Some(max));
}

fn durable_across_reopen<H: LogHarness>(h: &mut H) {
    let s = h.open();
    s.append((0..10).map(|i| (1, i, entry(1, i))).collect(), true).expect("append");
    s.put_state(1, "vote", Bytes::from_static(b"v")).expect("vote");
    s.truncate_from(1, 8).expect("truncate");
    s.purge_upto(1, 1).expect("purge");
    s.append(vec![(2, 0, entry(2, 0))], false).expect("append");
    s.sync().expect("sync");
    let Some(s) = h.reopen(s) else { return };
    assert_eq!(indexes(&s.read(1, 0..100).expect("read")), (2..8).collect::<Vec<_>>());
    assert_eq!(s.get_state(1, "vote").expect("state"), Some(Bytes::from_static(b"v")));
    assert_eq!(s.last(2).expect("last"), Some((0, entry(2, 0))));
}

/// Random batches of appends, truncations, purges and state writes over a
/// few groups against a `BTreeMap` model.
pub fn randomized_against_model<H: LogHarness>(h: &mut H, seed: u64) {
    let s = h.open();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut model: BTreeMap<(GroupId, u64), Bytes> = BTreeMap::new();
    let mut states: BTreeMap<(GroupId, String), Bytes> = BTreeMap::new();
    for step in 0..1500u64 {
        let mut b = LogBatch::new();
        for _ in 0..rng.gen_range(1..5) {
            let g = rng.gen_range(0..4u64);
            let i = rng.gen_range(0..64u64);
            match rng.gen_range(0..10) {
                0..=5 => {
                    let v = Bytes::from(format!("{step}-{g}-{i}"));
                    b.append(g, i, v.clone());
                    model.insert((g, i), v);
                }
                6 => {
                    b.truncate_from(g, i);
                    model.retain(|(mg, mi), _| *mg != g || *mi < i);
                }
                7 => {
                    b.purge_upto(g, i);
                    model.retain(|(mg, mi), _| *mg != g || *mi > i);
                }
                8 => {
                    let k = format!("k{}", i % 3);
                    let v = Bytes::from(format!("{step}"));
                    b.put_state(g, k.clone(), v.clone());
                    states.insert((g, k), v);
                }
                _ => {
                    let k = format!("k{}", i % 3);
                    b.delete_state(g, k.clone());
                    states.remove(&(g, k));
                }
            }
        }
        s.write(b, rng.gen_bool(0.1)).expect("write");
        if step % 100 == 0 || step == 1499 {
            for g in 0..4u64 {
                let want: Vec<_> = model.range((g, 0)..=(g, u64::MAX)).map(|((_, i), v)| (*i, v.clone())).collect();
                let got = s.read(g, 0..u64::MAX).expect("read");
                assert!(got == want, "group {g} diverged from the model at step {step} (BALLAST_SEED={seed})");
                assert_eq!(s.last(g).expect("last"), want.last().cloned(), "BALLAST_SEED={seed}");
                assert_eq!(s.first(g).expect("first"), want.first().map(|e| e.0), "BALLAST_SEED={seed}");
                for k in 0..3 {
                    let k = format!("k{k}");
                    assert_eq!(
                        s.get_state(g, &k).expect("state"),
                        states.get(&(g, k.clone())).cloned(),
                        "BALLAST_SEED={seed}"
                    );
                }
            }
        }
    }
}
