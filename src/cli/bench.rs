//! `ballast bench`: a fixed benchmark suite against any NBD export, with a
//! built-in load generator (the [`ballast_nbd::client`] NBD client on tokio),
//! optionally against a second export test by test for a ratio.
//!
//! The suite is bench-nbd.sh's (fio's nbd engine) plus a 70/30 mix, under the
//! same test names and columns, so the two tools' results compare directly;
//! each result also records the fio command line of the same test, and
//! `--engine fio` runs exactly those command lines instead of the built-in
//! generator.
//!
//! - [`workload`]: the tests and the load generator.
//! - [`fio`]: the fio command of each test, running it, reading its JSON.
//! - [`histogram`]: per-worker latency histograms.
//! - [`report`]: the JSON document and the table.
//! - [`plot`]: the SVG.
//!
//! The suite WRITES to the first `--size` bytes of every export it runs on.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use ballast_nbd::client::{ConnectOptions, ExportInfo, NbdClient, NbdUri};
use ballast_types::{format_size, parse_size};

use super::UsageError;

mod fio;
mod histogram;
mod plot;
mod report;
mod workload;

use report::{Report, TargetReport, TestResult};
use workload::{Payload, TestSpec, Window, SUITE};

/// How long a handshake may take before the target is declared unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// bench-nbd.sh refuses exports smaller than this too.
const MIN_REGION: u64 = 16 << 20;
const MIB: u64 = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Suite {
    /// 2 s per test, no ramp, at most 256 MiB of each export: a smoke test.
    Quick,
    /// bench-nbd.sh's settings: 15 s per test after a 2 s ramp, at most 1 GiB.
    Full,
}

impl Suite {
    fn name(self) -> &'static str {
        match self {
            Suite::Quick => "quick",
            Suite::Full => "full",
        }
    }
    fn runtime(self) -> f64 {
        match self {
            Suite::Quick => 2.0,
            Suite::Full => 15.0,
        }
    }
    fn ramp(self) -> f64 {
        match self {
            Suite::Quick => 0.0,
            Suite::Full => 2.0,
        }
    }
    fn max_size(self) -> u64 {
        match self {
            Suite::Quick => 256 * MIB,
            Suite::Full => 1024 * MIB,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Engine {
    /// The built-in asynchronous NBD load generator.
    Builtin,
    /// fio with its nbd engine (libnbd), one fio run per test.
    Fio,
}

impl Engine {
    fn name(self) -> &'static str {
        match self {
            Engine::Builtin => "builtin",
            Engine::Fio => "fio",
        }
    }
}

#[derive(clap::Args)]
pub struct BenchArgs {
    /// The export to measure: nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH.
    /// The suite WRITES to it.
    #[arg(value_parser = parse_uri)]
    pub target: NbdUri,
    /// A second export, run alternately with the first, test by test; the table shows their ratio.
    #[arg(long, value_parser = parse_uri, value_name = "URI")]
    pub compare: Option<NbdUri>,
    /// quick: 2 s per test, no ramp, at most 256 MiB; full: 15 s after a 2 s ramp, at most 1 GiB.
    #[arg(long, value_enum, default_value = "full")]
    pub suite: Suite,
    /// Seconds measured per test (overrides the suite's).
    #[arg(long, value_parser = parse_seconds, value_name = "SECS")]
    pub runtime: Option<f64>,
    /// Seconds at the start of each test that are not counted (overrides the suite's).
    #[arg(long, value_parser = parse_ramp, value_name = "SECS")]
    pub ramp: Option<f64>,
    /// Bytes of each export to use, from offset 0, e.g. 512MiB (default: the suite's maximum, or less
    /// if an export is smaller).
    #[arg(long, value_parser = parse_region, value_name = "SIZE")]
    pub size: Option<u64>,
    /// The load generator: builtin, or fio (the same tests through `fio --ioengine=nbd`; fio must be installed).
    #[arg(long, value_enum, default_value = "builtin")]
    pub engine: Engine,
    /// TCP connections per target; the queue depth of each test is spread over them.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64), value_name = "N")]
    pub connections: u16,
    /// Only these tests, comma-separated (default: all of them, in order).
    #[arg(long, value_delimiter = ',', value_parser = parse_test, value_name = "NAMES")]
    pub tests: Vec<&'static TestSpec>,
    /// Do not write the region once before the suite (reads may then hit holes).
    #[arg(long)]
    pub no_prefill: bool,
    /// Write the results as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Draw IOPS and p99 latency per test into this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
}

fn parse_uri(s: &str) -> Result<NbdUri, String> {
    s.parse().map_err(|e: ballast_nbd::client::ClientError| e.to_string())
}

fn parse_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v <= 86_400.0 => Ok(v),
        _ => Err(format!("invalid duration {s:?}: expected seconds, more than 0 and at most 86400")),
    }
}

fn parse_ramp(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=3_600.0).contains(&v) => Ok(v),
        _ => Err(format!("invalid ramp {s:?}: expected seconds, 0 to 3600")),
    }
}

fn parse_region(s: &str) -> Result<u64, String> {
    let v = parse_size(s)?;
    if v < MIN_REGION {
        return Err(format!("size {s:?} is below the minimum of {}", format_size(MIN_REGION)));
    }
    Ok(v)
}

fn parse_test(s: &str) -> Result<&'static TestSpec, String> {
    TestSpec::find(s.trim()).ok_or_else(|| {
        let names: Vec<_> = SUITE.iter().map(|t| t.name).collect();
        format!("unknown test {s:?} (tests: {})", names.join(", "))
    })
}

/// Refuse an output path that cannot be written before spending minutes
/// on the suite.
fn check_output(path: &Path, what: &str) -> Result<(), UsageError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return Err(UsageError(format!("--{what} {}: no such directory {}", path.display(), dir.display())));
    }
    if path.is_dir() {
        return Err(UsageError(format!("--{what} {}: is a directory", path.display())));
    }
    Ok(())
}

/// One target: what it reported at the handshake, and its connections
/// (none with `--engine fio`, which makes its own).
struct Target {
    label: &'static str,
    uri: NbdUri,
    info: ExportInfo,
    clients: Vec<NbdClient>,
}

impl Target {
    async fn disconnect(&mut self) {
        for c in self.clients.drain(..) {
            // The results are in (or fio is about to connect); a server that
            // closes untidily does not spoil them.
            if let Err(e) = c.disconnect().await {
                eprintln!("ballast bench: note: disconnecting from {}: {e}", self.uri);
            }
        }
    }
}

async fn connect(label: &'static str, uri: &NbdUri, connections: u16) -> Result<Target> {
    let opts = ConnectOptions::default();
    let mut clients = Vec::with_capacity(usize::from(connections));
    for _ in 0..connections {
        let c = tokio::time::timeout(CONNECT_TIMEOUT, NbdClient::connect(uri, &opts))
            .await
            .map_err(|_| anyhow::anyhow!("no NBD handshake within {CONNECT_TIMEOUT:?}"))
            .and_then(|r| r.map_err(anyhow::Error::from))
            .with_context(|| format!("cannot connect to {uri}"))?;
        let info = c.info();
        if info.read_only() {
            bail!("{uri} is read-only: the suite writes to the export");
        }
        if !info.can_flush() {
            bail!("{uri} does not support FLUSH, which the suite needs");
        }
        clients.push(c);
    }
    if connections > 1 && !clients[0].info().can_multi_conn() {
        eprintln!("ballast bench: note: {uri} does not advertise multi-conn; measuring several connections anyway");
    }
    let info = clients[0].info().clone();
    Ok(Target { label, uri: uri.clone(), info, clients })
}

pub async fn run(args: BenchArgs) -> Result<()> {
    if let Some(p) = &args.json {
        check_output(p, "json")?;
    }
    if let Some(p) = &args.plot {
        check_output(p, "plot")?;
        if p.extension().and_then(|e| e.to_str()).is_none_or(|e| !e.eq_ignore_ascii_case("svg")) {
            return Err(UsageError(format!("--plot {}: the plot is SVG, name the file *.svg", p.display())).into());
        }
    }
    let runtime = args.runtime.unwrap_or(args.suite.runtime());
    let ramp = args.ramp.unwrap_or(args.suite.ramp());
    let tests: Vec<&TestSpec> = if args.tests.is_empty() { SUITE.iter().collect() } else { args.tests.clone() };

    let fio = match args.engine {
        Engine::Fio => Some(fio::Fio::find().await?),
        Engine::Builtin => None,
    };
    // fio makes its own connections: one here checks the export, then closes.
    let connections = if fio.is_some() { 1 } else { args.connections };
    let mut targets = vec![connect("A", &args.target, connections).await?];
    if let Some(uri) = &args.compare {
        targets.push(connect("B", uri, connections).await?);
    }
    if fio.is_some() {
        for t in &mut targets {
            t.disconnect().await;
        }
    }
    // The same region on both targets, or the comparison is not like for like.
    let smallest = targets.iter().map(|t| t.info.size).min().unwrap_or(0);
    let region = args.size.unwrap_or(args.suite.max_size()).min(smallest) / MIB * MIB;
    if region < MIN_REGION {
        bail!(
            "the export is too small: {} usable, the suite needs at least {}",
            format_size(smallest),
            format_size(MIN_REGION)
        );
    }

    let started = SystemTime::now();
    let seed = started.duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    let payload = Payload::new(seed);
    let window = Window { ramp: Duration::from_secs_f64(ramp), runtime: Duration::from_secs_f64(runtime) };

    if !args.no_prefill {
        for t in &targets {
            eprintln!("prefill: writing {} of {} ...", format_size(region), t.uri);
            match &fio {
                None => workload::prefill(&t.clients, region, &payload).await.map_err(anyhow::Error::from),
                Some(f) => f.prefill(&t.uri.to_string(), region).await,
            }
            .with_context(|| format!("prefilling {}", t.uri))?;
        }
    }

    let mut reports: Vec<TargetReport> = targets
        .iter()
        .map(|t| TargetReport {
            label: t.label,
            uri: t.uri.to_string(),
            export_size: t.info.size,
            structured_replies: t.info.structured_replies,
            results: Vec::new(),
        })
        .collect();
    // Alternate targets test by test, so drift on the machine hits both alike.
    for (i, spec) in tests.iter().enumerate() {
        let test_seed = seed.wrapping_add(i as u64);
        for (t, rep) in targets.iter().zip(reports.iter_mut()) {
            let job =
                fio::Job { uri: &rep.uri, region, window, connections: usize::from(args.connections), seed: test_seed };
            let r = match &fio {
                None => {
                    let m = workload::run_test(&t.clients, spec, region, window, &payload, test_seed)
                        .await
                        .with_context(|| format!("{} on {}", spec.name, t.uri))?;
                    TestResult::new(spec, &m, fio::command_line(&job.args(spec)))
                }
                Some(f) => {
                    f.run_test(spec, &job).await.with_context(|| format!("{} on {} with fio", spec.name, t.uri))?
                }
            };
            eprintln!(
                "{:<15} {}  {:>9.0} IOPS  p50 {:>7.0} us  p99 {:>7.0} us",
                spec.name, t.label, r.iops, r.p50_us, r.p99_us
            );
            rep.results.push(r);
        }
    }
    for t in &mut targets {
        t.disconnect().await;
    }

    let mut report = Report {
        tool: "ballast bench",
        version: env!("CARGO_PKG_VERSION"),
        started_unix: started.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        host: std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default(),
        nproc: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        suite: args.suite.name(),
        engine: args.engine.name(),
        fio_version: fio.map(|f| f.version),
        runtime_s: runtime,
        ramp_s: ramp,
        size: region,
        connections: usize::from(args.connections),
        prefill: !args.no_prefill,
        seed,
        targets: reports,
        ratios: Vec::new(),
    };
    report.compute_ratios();
    print!("{}", report.table());
    if let Some(p) = &args.json {
        let text = serde_json::to_string_pretty(&report).context("encoding the results")?;
        std::fs::write(p, text + "\n").with_context(|| format!("cannot write {}", p.display()))?;
    }
    if let Some(p) = &args.plot {
        plot::draw(p, &report).with_context(|| format!("cannot write {}", p.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn value_parsers_refuse_with_a_reason() {
        assert!(parse_uri("nbd://127.0.0.1:10809/x").is_ok());
        assert!(parse_uri("127.0.0.1:10809").unwrap_err().contains("expected nbd://"));
        assert_eq!(parse_seconds("1.5"), Ok(1.5));
        for bad in ["0", "-1", "nan", "inf", "1e9", "soon"] {
            assert!(parse_seconds(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_ramp("0"), Ok(0.0));
        assert!(parse_ramp("-0.5").is_err());
        assert_eq!(parse_region("64MiB"), Ok(64 << 20));
        assert!(parse_region("1MiB").unwrap_err().contains("minimum"));
        assert_eq!(parse_test("sr1m_qd8").map(|t| t.name), Ok("sr1m_qd8"));
        assert!(parse_test("rw4k_qd64").unwrap_err().contains("rw4k_qd1"));
    }

    #[test]
    fn outputs_are_checked_before_the_run() {
        let dir = std::env::temp_dir();
        assert!(check_output(&dir.join("r.json"), "json").is_ok());
        assert!(check_output(Path::new("r.json"), "json").is_ok());
        assert!(check_output(&dir, "json").is_err());
        assert!(check_output(Path::new("/no/such/dir/r.json"), "json").is_err());
    }
}
