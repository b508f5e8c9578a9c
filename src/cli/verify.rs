//! `ballast verify`: run the fault suite's workload and history checker
//! against a live cluster for as long as asked, and report.
//!
//! Several concurrent clients of one attached volume write self-describing
//! values to shared hot blocks (a few in each of the first chunks, so every
//! shard takes part) and read them; every request's invocation, completion
//! and result is recorded. At the end every hot block is read back and the
//! checker proves that each read returned the latest acknowledged write or
//! a concurrent one, and that no acknowledged write was lost. Exit status 1
//! on any violation (failed requests are reported; `--strict` fails on them
//! too).
//!
//! It overwrites the hot blocks: without `--overwrite` it only runs on a
//! volume it creates (and deletes afterwards unless `--keep`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ballast::verify::{baseline, read_back, round_blocks, run as run_workload, Recorder, Report, Workload};
use ballast_client::{ClientConfig, ClientError, ClusterExports};
use ballast_nbd::ExportProvider;
use ballast_types::{CreateVolume, ErrorCode, Geometry};

use super::admin::{ConnArgs, OutArgs, DEFAULT_POOL};
use super::output::{self, Output};
use super::{parse_name, parse_volume_size};

#[derive(clap::Args)]
pub struct VerifyArgs {
    /// The volume to run on; created (and deleted afterwards) when missing.
    #[arg(default_value = "ballast-verify", value_parser = parse_name)]
    pub volume: String,
    /// How long to run (e.g. 30s, 10m, 2h).
    #[arg(long, default_value = "60s", value_parser = super::node_config::parse_duration)]
    pub duration: Duration,
    /// Concurrent clients.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub workers: u32,
    /// Chunks the hot blocks are spread over (each lands in some shard).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub chunks: u64,
    /// Hot blocks in each of those chunks.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub blocks_per_chunk: u64,
    /// Share of writes, in percent.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub write_percent: u8,
    /// Seed of the workload's choices [default: random, printed].
    #[arg(long, env = "BALLAST_SEED")]
    pub seed: Option<u64>,
    /// Size of the volume when it is created.
    #[arg(long, default_value = "1GiB", value_parser = parse_volume_size)]
    pub size: u64,
    /// Pool of the volume when it is created.
    #[arg(long, default_value = DEFAULT_POOL, value_parser = parse_name)]
    pub pool: String,
    /// Run on an existing volume, overwriting its hot blocks.
    #[arg(long)]
    pub overwrite: bool,
    /// Keep a volume this command created.
    #[arg(long)]
    pub keep: bool,
    /// Also fail (exit 1) when any request failed.
    #[arg(long)]
    pub strict: bool,
    #[command(flatten)]
    pub conn: ConnArgs,
    #[command(flatten)]
    pub out: OutArgs,
}

pub async fn run(args: VerifyArgs) -> Result<()> {
    let config = ClientConfig::default();
    let admin = args.conn.admin(config)?;
    let created = match admin.volume(&args.volume).await {
        Ok(_) if args.overwrite => false,
        Ok(_) => bail!(
            "volume {:?} exists; verify overwrites blocks of it: pass --overwrite to allow that, or name a new volume",
            args.volume
        ),
        Err(ClientError::Api(e)) if matches!(e.code, ErrorCode::NotFound | ErrorCode::NoSuchVolume) => {
            let req = CreateVolume { name: args.volume.clone(), size: args.size, pool: args.pool.clone() };
            admin.create_volume(&req).await.with_context(|| format!("creating volume {:?}", args.volume))?;
            true
        }
        Err(e) => return Err(e).with_context(|| format!("looking up volume {:?}", args.volume)),
    };
    let info = admin.volume(&args.volume).await?;
    let geometry = Geometry::default();
    let chunks = args.chunks.min(info.size / geometry.chunk_size).max(1);
    let per_chunk = args.blocks_per_chunk.min(geometry.blocks_per_chunk());
    let seed = args.seed.unwrap_or_else(rand::random);
    eprintln!(
        "ballast verify: seed {seed} (replay with --seed {seed}); {} workers on {} hot blocks of {:?} for {:?}",
        args.workers,
        chunks * per_chunk,
        args.volume,
        args.duration
    );
    let exports = ClusterExports::attach_one(admin.clone(), &args.volume, false, false, config).await?;
    let outcome = exercise(&args, &exports, seed, chunks, per_chunk).await;
    let detached = exports.detach_all().await.context("detaching");
    let report = outcome?;
    detached?;
    if created && !args.keep {
        admin.delete_volume(&args.volume).await.context("deleting the volume verify created")?;
    }
    output::print(args.out.output, &report, |r| format!("{r}\n"))?;
    if !report.violations.is_empty() {
        bail!("{} violations: acknowledged data was lost or a read was stale", report.violations.len());
    }
    if args.strict && !report.clean() {
        bail!("{} requests failed", report.writes_failed + report.reads_failed);
    }
    if args.out.output == Output::Table && report.clean() {
        println!("verified: no acknowledged write lost, no stale read");
    }
    Ok(())
}

async fn exercise(
    args: &VerifyArgs,
    exports: &Arc<ClusterExports>,
    seed: u64,
    chunks: u64,
    per_chunk: u64,
) -> Result<Report> {
    let dev = exports.open("").await?.context("the attached volume is not served")?;
    let blocks = round_blocks(seed % 128, chunks, per_chunk, Geometry::default().blocks_per_chunk());
    let w = Workload { seed, workers: args.workers, blocks, write_ratio: f64::from(args.write_percent) / 100.0 };
    let rec = Recorder::new();
    baseline(&w.blocks, &*dev, &rec).await.map_err(anyhow::Error::msg)?;
    let running = {
        let (w, dev, rec) = (w.clone(), dev.clone(), rec.clone());
        tokio::spawn(async move { run_workload(&w, dev, rec).await })
    };
    let started = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_secs(10));
    ticker.tick().await;
    while started.elapsed() < args.duration {
        let left = args.duration.saturating_sub(started.elapsed());
        tokio::select! {
            _ = ticker.tick() => {
                let h = rec.history();
                let failed = h.iter().filter(|o| o.error.is_some()).count();
                eprintln!("  {:>5.0} s: {} operations, {failed} failed", started.elapsed().as_secs_f64(), h.len());
            }
            () = tokio::time::sleep(left) => break,
        }
    }
    rec.stop();
    running.await.context("workload task")?;
    read_back(&w.blocks, &*dev, &rec).await;
    Ok(Report::of(seed, &rec.history()))
}
