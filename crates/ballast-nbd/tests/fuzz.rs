//! Seeded randomized robustness test: garbage, half-valid and valid-but-odd
//! traffic. The server must never panic; it must end (with an error or
//! cleanly) once the client closes, and on well-framed traffic it must answer
//! every request exactly once.
//!
//! The seed is printed; replay with `BALLAST_SEED=<seed> cargo test -p
//! ballast-nbd --test fuzz -- --nocapture`.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use ballast_nbd::ServerConfig;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// xorshift64*: tiny, deterministic, no dependency.
struct Rng(u64);

impl Rng {
    /// Seed through splitmix64 so nearby seeds give unrelated streams.
    fn new(seed: u64) -> Self {
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Self((z ^ (z >> 31)) | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

const MAX_BLOCK: u32 = 64 * 1024;

fn handshake_bytes(rng: &mut Rng, structured: bool, meta: bool) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&3u32.to_be_bytes());
    let opt = |b: &mut Vec<u8>, o: u32, d: &[u8]| {
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&o.to_be_bytes());
        b.extend_from_slice(&(d.len() as u32).to_be_bytes());
        b.extend_from_slice(d);
    };
    // A few random options first: the server must answer and carry on.
    for _ in 0..rng.below(4) {
        let o = match rng.below(5) {
            0 => OPT_LIST,
            1 => OPT_INFO,
            2 => OPT_LIST_META,
            3 => OPT_EXTENDED_HEADERS,
            _ => 20 + rng.below(100) as u32,
        };
        let n = rng.below(40) as usize;
        let d = rng.bytes(n);
        opt(&mut b, o, &d);
    }
    if structured {
        opt(&mut b, OPT_STRUCTURED_REPLY, &[]);
    }
    if meta {
        opt(&mut b, OPT_SET_META, &meta_data("vol", &["base:allocation"]));
    }
    opt(&mut b, OPT_GO, &info_data("vol", &[3]));
    b
}

/// A request with plausible-but-random fields; WRITE payloads are complete.
fn random_request(rng: &mut Rng, cookie: u64) -> (Vec<u8>, u16, u32) {
    let typ = match rng.below(20) {
        0 => rng.below(u64::from(u16::MAX)) as u16,
        1 => 8 + rng.below(4) as u16,
        n => {
            [CMD_READ, CMD_WRITE, CMD_FLUSH, CMD_TRIM, CMD_CACHE, CMD_WRITE_ZEROES, CMD_BLOCK_STATUS][(n % 7) as usize]
        }
    };
    let flags = match rng.below(4) {
        0 => 0,
        1 => rng.below(32) as u16,
        2 => 1 << rng.below(16),
        _ => rng.below(u64::from(u16::MAX)) as u16,
    };
    let offset = match rng.below(5) {
        0 => rng.below(SIZE),
        1 => SIZE - rng.below(8192),
        2 => u64::MAX - rng.below(8192),
        3 => rng.next(),
        _ => rng.below(SIZE / 4096) * 4096,
    };
    let len = match rng.below(6) {
        0 => 0,
        1 => 1 + rng.below(8192) as u32,
        2 => MAX_BLOCK + rng.below(3) as u32,
        3 if typ != CMD_WRITE => rng.next() as u32,
        _ => 1 + rng.below(u64::from(MAX_BLOCK)) as u32,
    };
    let mut b = request(flags, typ, cookie, offset, len);
    if typ == CMD_WRITE {
        b.extend(std::iter::repeat_n((cookie & 0xff) as u8, len as usize));
    }
    (b, typ, len)
}

/// Parse replies to well-framed traffic; every cookie answered exactly once.
fn check_replies(out: &[u8], expected: &HashMap<u64, (u16, u32)>, structured: bool) {
    let mut pos = 0usize;
    let take = |pos: &mut usize, n: usize| -> &[u8] {
        assert!(*pos + n <= out.len(), "reply stream cut short at {pos}");
        let s = &out[*pos..*pos + n];
        *pos += n;
        s
    };
    let mut done: HashMap<u64, usize> = HashMap::new();
    while pos < out.len() {
        let magic = u32::from_be_bytes(take(&mut pos, 4).try_into().unwrap());
        match magic {
            SIMPLE_MAGIC => {
                let err = u32::from_be_bytes(take(&mut pos, 4).try_into().unwrap());
                let cookie = u64::from_be_bytes(take(&mut pos, 8).try_into().unwrap());
                let (typ, len) = *expected.get(&cookie).expect("unknown cookie");
                if typ == CMD_READ && err == 0 {
                    assert!(!structured, "simple read reply with structured replies on");
                    take(&mut pos, len as usize);
                }
                *done.entry(cookie).or_default() += 1;
            }
            STRUCT_MAGIC => {
                assert!(structured);
                let flags = u16::from_be_bytes(take(&mut pos, 2).try_into().unwrap());
                let _typ = u16::from_be_bytes(take(&mut pos, 2).try_into().unwrap());
                let cookie = u64::from_be_bytes(take(&mut pos, 8).try_into().unwrap());
                let len = u32::from_be_bytes(take(&mut pos, 4).try_into().unwrap());
                take(&mut pos, len as usize);
                assert!(expected.contains_key(&cookie), "unknown cookie {cookie}");
                if flags & 1 != 0 {
                    *done.entry(cookie).or_default() += 1;
                }
            }
            m => panic!("bad reply magic {m:#x} at {}", pos - 4),
        }
    }
    for cookie in expected.keys() {
        assert_eq!(done.get(cookie), Some(&1), "cookie {cookie} answered once");
    }
}

/// Returns how many requests were checked for a reply.
async fn one_round(rng: &mut Rng, round: usize) -> usize {
    let config =
        ServerConfig { max_in_flight: 1 + rng.below(16) as usize, max_block: MAX_BLOCK, ..ServerConfig::default() };
    let (_, _, server) = setup_with(config);
    let (s, h) = connect(&server);
    let (mut rd, mut wr) = tokio::io::split(s);
    let drain = tokio::spawn(async move {
        let mut out = Vec::new();
        let _ = rd.read_to_end(&mut out).await;
        out
    });

    let mode = rng.below(4);
    let structured = rng.chance(60);
    let meta = structured && rng.chance(70);
    let mut input = Vec::new();
    let mut expected = HashMap::new();
    match mode {
        // Pure garbage from the first byte.
        0 => {
            let n = rng.below(2000) as usize;
            input = rng.bytes(n);
        }
        // Garbage option haggling after valid client flags.
        1 => {
            input.extend_from_slice(&3u32.to_be_bytes());
            for _ in 0..rng.below(8) {
                input.extend_from_slice(&IHAVEOPT.to_be_bytes());
                input.extend_from_slice(&(rng.below(16) as u32).to_be_bytes());
                let n = rng.below(64) as u32;
                let declared = if rng.chance(20) { rng.next() as u32 } else { n };
                input.extend_from_slice(&declared.to_be_bytes());
                input.extend(rng.bytes(n as usize));
            }
        }
        // Valid handshake, then well-framed random requests.
        _ => {
            input = handshake_bytes(rng, structured, meta);
            for cookie in 0..rng.below(60) {
                let (b, typ, len) = random_request(rng, cookie);
                input.extend(b);
                expected.insert(cookie, (typ, len));
            }
            // Mode 3: then garbage (which may or may not parse).
            if mode == 3 {
                let n = rng.below(300) as usize;
                input.extend(rng.bytes(n));
                expected.clear();
            }
        }
    }

    // Stop at DISC (random types include 2) only in checked mode: drop
    // expectations after the first DISC.
    if !expected.is_empty() {
        let mut cookies: Vec<u64> = expected.keys().copied().collect();
        cookies.sort();
        if let Some(first_disc) = cookies.iter().find(|c| expected[c].0 == CMD_DISC).copied() {
            expected.retain(|c, _| *c < first_disc);
        }
    }

    // Write in random pieces; the server may close early, so ignore errors.
    let mut at = 0;
    while at < input.len() {
        let n = (1 + rng.below(5000) as usize).min(input.len() - at);
        if wr.write_all(&input[at..at + n]).await.is_err() {
            break;
        }
        at += n;
    }
    let _ = wr.shutdown().await;

    let res = tokio::time::timeout(Duration::from_secs(20), h)
        .await
        .unwrap_or_else(|_| panic!("round {round}: server did not end"))
        .unwrap_or_else(|e| panic!("round {round}: server task panicked: {e}"));
    drop(wr);
    let out = tokio::time::timeout(Duration::from_secs(20), drain).await.expect("drain hung").expect("drain panicked");
    if mode == 2 {
        // Well-framed traffic may only end cleanly, with every reply.
        res.unwrap_or_else(|e| panic!("round {round}: well-framed traffic failed: {e}"));
        let start = find_transmission_start(&out);
        check_replies(&out[start..], &expected, structured);
    }
    expected.len()
}

/// Skip the handshake replies: the greeting, then option replies up to GO's ACK.
fn find_transmission_start(out: &[u8]) -> usize {
    let mut pos = 18;
    loop {
        let opt = u32::from_be_bytes(out[pos + 8..pos + 12].try_into().unwrap());
        let typ = u32::from_be_bytes(out[pos + 12..pos + 16].try_into().unwrap());
        let len = u32::from_be_bytes(out[pos + 16..pos + 20].try_into().unwrap()) as usize;
        pos += 20 + len;
        if opt == OPT_GO && typ == REP_ACK {
            return pos;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_traffic_never_panics() {
    let seed = std::env::var("BALLAST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
    });
    println!("fuzz seed: BALLAST_SEED={seed}");
    let mut rng = Rng::new(seed);
    let mut checked = 0;
    for round in 0..300 {
        checked += one_round(&mut rng, round).await;
    }
    println!("fuzz: {checked} well-framed requests answered exactly once");
    assert!(checked > 100);
}
