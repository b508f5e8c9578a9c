//! Runs every fuzz target on stable Rust, without libFuzzer: the committed
//! seeds, then seeded random mutations of them (bit flips, byte changes,
//! cuts, splices, inserted interesting values), through the same `run`
//! functions cargo-fuzz drives. It proves the targets and their oracles
//! work and finds shallow bugs; coverage-guided depth needs `scripts/fuzz.sh`.
//!
//! The seed is printed; `BALLAST_SEED=<n> cargo test --test smoke` replays a
//! failure. `BALLAST_FUZZ_ITERS` sets the mutations per target (default 2000).

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use ballast_fuzz::{nbd_client_reply, nbd_option, nbd_request, proto_conversions, seeds};

/// SplitMix64: tiny, seedable, identical everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

fn seed() -> u64 {
    let seed = match std::env::var("BALLAST_SEED") {
        Ok(s) => s.parse().expect("BALLAST_SEED must be a u64"),
        Err(_) => SystemTime::now().duration_since(UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64),
    };
    println!("seed: {seed} (replay with BALLAST_SEED={seed})");
    seed
}

fn iterations() -> usize {
    std::env::var("BALLAST_FUZZ_ITERS").ok().and_then(|s| s.parse().ok()).unwrap_or(2000)
}

/// Values that sit on the parsers' boundaries.
const INTERESTING: &[u64] = &[0, 1, 0x7f, 0xff, 0x100, 0xffff, 0x1_0000, 0x7fff_ffff, 0xffff_ffff, u64::MAX, 4096, 512];

/// One random change to `input`, borrowing from `other` for splices.
fn mutate(r: &mut Rng, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..=r.below(4) {
        let len = v.len();
        match r.below(6) {
            0 if len > 0 => {
                let i = r.below(len);
                v[i] ^= 1 << r.below(8);
            }
            1 if len > 0 => {
                let i = r.below(len);
                v[i] = r.next() as u8;
            }
            2 if len > 0 => v.truncate(r.below(len)),
            3 => {
                let at = r.below(len + 1);
                let from = r.below(other.len() + 1);
                let n = r.below(other.len() - from + 1).min(256);
                let tail = v.split_off(at);
                v.extend_from_slice(&other[from..from + n]);
                v.extend_from_slice(&tail);
            }
            4 if len > 0 => {
                // An interesting value, big-endian as on the NBD wire, 1 to 8 bytes wide.
                let width = 1 + r.below(8);
                let at = r.below(len);
                let val = INTERESTING[r.below(INTERESTING.len())].to_be_bytes();
                for (k, b) in val[8 - width..].iter().enumerate() {
                    if let Some(slot) = v.get_mut(at + k) {
                        *slot = *b;
                    }
                }
            }
            _ => {
                let at = r.below(len + 1);
                let n = r.below(16);
                let tail = v.split_off(at);
                v.extend((0..n).map(|_| r.next() as u8));
                v.extend_from_slice(&tail);
            }
        }
    }
    v
}

fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus").join(target)
}

fn smoke(target: &str, run: fn(&[u8])) {
    let seeds: Vec<Vec<u8>> = seeds::all()
        .into_iter()
        .find(|(t, _)| *t == target)
        .expect("a known target")
        .1
        .into_iter()
        .map(|s| s.1)
        .collect();
    for s in &seeds {
        run(s);
    }
    let mut r = Rng(seed());
    for i in 0..iterations() {
        let base = &seeds[r.below(seeds.len())];
        let other = &seeds[r.below(seeds.len())];
        let input = mutate(&mut r, base, other);
        let res = std::panic::catch_unwind(|| run(&input));
        if res.is_err() {
            let path = std::env::temp_dir().join(format!("{target}-crash-{i}"));
            let _ = std::fs::write(&path, &input);
            panic!("{target} failed on mutation {i}; input saved to {}", path.display());
        }
    }
}

#[test]
fn nbd_request_survives_seeds_and_mutations() {
    smoke("nbd_request", nbd_request::run);
}

#[test]
fn nbd_option_survives_seeds_and_mutations() {
    smoke("nbd_option", nbd_option::run);
}

#[test]
fn nbd_client_reply_survives_seeds_and_mutations() {
    smoke("nbd_client_reply", nbd_client_reply::run);
}

#[test]
fn proto_conversions_survive_seeds_and_mutations() {
    smoke("proto_conversions", proto_conversions::run);
}

/// Every file in `corpus/<target>/` is replayed too: the committed seeds and
/// any crash reproducer dropped there (name it `seed-…` to commit it).
#[test]
fn every_committed_corpus_file_passes() {
    type Target = (&'static str, fn(&[u8]));
    let targets: [Target; 4] = [
        ("nbd_request", nbd_request::run),
        ("nbd_option", nbd_option::run),
        ("nbd_client_reply", nbd_client_reply::run),
        ("proto_conversions", proto_conversions::run),
    ];
    for (target, run) in targets {
        let dir = corpus_dir(target);
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.expect("a directory entry").path();
            run(&std::fs::read(&path).expect("a corpus file reads"));
        }
    }
}

/// The committed seeds are the ones `seeds.rs` builds;
/// `BALLAST_WRITE_SEEDS=1 cargo test --test smoke seeds` rewrites them.
#[test]
fn committed_seeds_match_the_generator() {
    let write = std::env::var_os("BALLAST_WRITE_SEEDS").is_some();
    for (target, seeds) in seeds::all() {
        let dir = corpus_dir(target);
        for (name, bytes) in seeds {
            let path = dir.join(&name);
            if write {
                std::fs::create_dir_all(&dir).expect("corpus dir");
                std::fs::write(&path, &bytes).expect("seed written");
            } else {
                let on_disk = std::fs::read(&path).unwrap_or_else(|e| {
                    panic!("{}: {e} (run BALLAST_WRITE_SEEDS=1 cargo test --test smoke seeds)", path.display())
                });
                assert_eq!(on_disk, bytes, "{} is stale (BALLAST_WRITE_SEEDS=1 rewrites it)", path.display());
            }
        }
    }
}
