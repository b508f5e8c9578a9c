//! `--engine fio`: the same suite through fio's nbd engine (libnbd), one fio
//! process per test, its JSON read back into the same [`TestResult`]s, so the
//! table, the JSON file, the plot and `--compare` do not know which engine ran.
//!
//! Each test becomes one fio command built from its [`TestSpec`] — the same
//! command the built-in engine records with its results as "the fio command
//! line of this test" — so the two engines are driven by one definition:
//!
//! - `--rw`, `--bs`, `--rwmixread` from the pattern; `--fsync=1` for the
//!   write+FLUSH test: fio's nbd engine turns each sync into `NBD_CMD_FLUSH`
//!   after every write, and reports it under `sync` (flush latency), the
//!   writes under `write`, as the built-in engine counts them.
//! - `--connections N`: fio's nbd engine opens one connection per job, so the
//!   queue depth is spread over `min(N, depth)` jobs exactly as the built-in
//!   engine spreads its workers round-robin over connections, reported as one
//!   group. Sequential jobs each take their own slice of the region (the
//!   built-in engine shares one cursor).
//! - `--unified_rw_reporting=both`: `mixed` holds reads and writes together
//!   (IOPS, bytes, one latency distribution), as the built-in engine counts
//!   them; `read`/`write` give the split.
//! - Latency is fio's total latency (`lat_ns`: submit → complete, with
//!   `--lat_percentiles=1`), which is what the built-in engine times; fio's
//!   `clat_ns` leaves out the submission (the send on the socket) and is used
//!   only when `lat_ns` has no percentiles.
//! - `--randseed` per test from the run's seed (recorded in the report).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use super::report::TestResult;
use super::workload::{Pattern, TestSpec, Window};

/// How long fio may run beyond ramp + runtime (start, connect, teardown)
/// before the test is declared hung.
const GRACE: Duration = Duration::from_secs(60);

/// A fio that has the nbd engine.
pub struct Fio {
    path: PathBuf,
    pub version: String,
}

impl Fio {
    /// fio on `PATH`, checked for its nbd engine; the error is one line.
    pub async fn find() -> Result<Fio> {
        let Some(path) = on_path("fio") else {
            bail!("--engine fio: fio is not installed (no fio on PATH; Debian package fio)");
        };
        let out = tokio::process::Command::new(&path)
            .arg("--version")
            .stdin(Stdio::null())
            .output()
            .await
            .with_context(|| format!("--engine fio: cannot run {}", path.display()))?;
        let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let eng = tokio::process::Command::new(&path)
            .arg("--enghelp=nbd")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await
            .with_context(|| format!("--engine fio: cannot run {}", path.display()))?;
        if !out.status.success() || !eng.success() {
            bail!("--engine fio: {} ({version}) has no nbd engine (it needs fio built with libnbd)", path.display());
        }
        Ok(Fio { path, version })
    }

    /// Write the first `region` bytes once, 1 MiB at a time, 8 in flight,
    /// then flush (the built-in engine's prefill).
    pub async fn prefill(&self, uri: &str, region: u64) -> Result<()> {
        let args = vec![
            "--name=prefill".to_string(),
            "--ioengine=nbd".into(),
            format!("--uri={uri}"),
            format!("--size={region}"),
            "--rw=write".into(),
            "--bs=1M".into(),
            "--iodepth=8".into(),
            "--end_fsync=1".into(),
            "--output-format=json".into(),
        ];
        // Generous: a slow target writes 1 GiB in a few minutes.
        self.run(&args, Duration::from_secs(600)).await.map(|_| ())
    }

    /// Run one test and read its result.
    pub async fn run_test(&self, spec: &TestSpec, job: &Job<'_>) -> Result<TestResult> {
        let mut argv = job.args(spec);
        argv.push("--output-format=json".into());
        let limit = job.window.ramp + job.window.runtime + GRACE;
        let stdout = self.run(&argv, limit).await?;
        let mut r = parse(spec, &stdout)?;
        r.fio = command_line(&argv);
        Ok(r)
    }

    /// Run fio with `args`; its stdout, or an error with the end of its stderr.
    async fn run(&self, args: &[String], limit: Duration) -> Result<String> {
        let child = tokio::process::Command::new(&self.path)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", self.path.display()))?;
        let out = match tokio::time::timeout(limit, child.wait_with_output()).await {
            Ok(out) => out.context("waiting for fio")?,
            Err(_) => bail!("fio did not finish within {limit:?}: {}", command_line(args)),
        };
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let why = stderr.lines().chain(stdout.lines()).rfind(|l| !l.trim().is_empty()).unwrap_or("no message");
            bail!("fio failed ({}): {}", out.status, why.trim());
        }
        Ok(stdout)
    }
}

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Where and how long one test runs; [`Job::args`] makes its fio arguments.
#[derive(Debug, Clone, Copy)]
pub struct Job<'a> {
    pub uri: &'a str,
    /// Bytes from offset 0, a whole number of MiB.
    pub region: u64,
    pub window: Window,
    pub connections: usize,
    pub seed: u64,
}

impl Job<'_> {
    /// fio's arguments for `spec` (without the output format): global options
    /// first, then one job per connection in use, reported as one group.
    pub fn args(&self, spec: &TestSpec) -> Vec<String> {
        let mut a = vec![
            "--ioengine=nbd".to_string(),
            format!("--uri={}", self.uri),
            format!("--rw={}", spec.fio_rw()),
            format!("--bs={}", spec.block_size),
            "--time_based".into(),
            format!("--runtime={}ms", self.window.runtime.as_millis().max(1)),
            format!("--ramp_time={}ms", self.window.ramp.as_millis()),
            "--lat_percentiles=1".into(),
            "--percentile_list=50:99:99.9".into(),
            "--norandommap".into(),
            "--unified_rw_reporting=both".into(),
            "--group_reporting".into(),
        ];
        match spec.pattern {
            Pattern::RandWriteFlush => a.push("--fsync=1".into()),
            Pattern::RandMix { read_percent } => a.push(format!("--rwmixread={read_percent}")),
            _ => {}
        }
        let sequential = matches!(spec.pattern, Pattern::SeqRead | Pattern::SeqWrite);
        let jobs = self.connections.clamp(1, spec.queue_depth.max(1));
        let slice = self.region / jobs as u64 / u64::from(spec.block_size) * u64::from(spec.block_size);
        if !sequential || jobs == 1 {
            a.push(format!("--size={}", self.region));
        }
        for j in 0..jobs {
            // The built-in engine's round-robin: the first `depth % jobs` get one more.
            let depth = spec.queue_depth / jobs + usize::from(j < spec.queue_depth % jobs);
            a.push(if jobs == 1 { format!("--name={}", spec.name) } else { format!("--name={}.{j}", spec.name) });
            a.push(format!("--iodepth={depth}"));
            a.push(format!("--randseed={}", self.seed.wrapping_add(j as u64)));
            if sequential && jobs > 1 {
                a.push(format!("--offset={}", slice * j as u64));
                a.push(format!("--size={slice}"));
            }
        }
        a
    }
}

/// `fio ARGS` as a shell command line.
pub fn command_line(args: &[String]) -> String {
    let mut s = String::from("fio");
    for a in args {
        s.push(' ');
        if a.chars().all(|c| c.is_ascii_alphanumeric() || "-_=.,:/@%+".contains(c)) {
            s.push_str(a);
        } else {
            s.push('\'');
            s.push_str(&a.replace('\'', r"'\''"));
            s.push('\'');
        }
    }
    s
}

// fio's JSON output (the parts read here; fio 3.x).

#[derive(Deserialize)]
struct Output {
    jobs: Vec<JobOut>,
}

#[derive(Deserialize)]
struct JobOut {
    #[serde(default)]
    error: i64,
    read: Dir,
    write: Dir,
    mixed: Option<Dir>,
    sync: Option<Sync>,
}

#[derive(Deserialize, Default)]
struct Dir {
    #[serde(default)]
    bw_bytes: f64,
    #[serde(default)]
    iops: f64,
    /// Milliseconds.
    #[serde(default)]
    runtime: f64,
    #[serde(default)]
    total_ios: u64,
    #[serde(default)]
    lat_ns: Lat,
    #[serde(default)]
    clat_ns: Lat,
}

#[derive(Deserialize, Default, Clone)]
struct Lat {
    #[serde(default)]
    max: f64,
    #[serde(default)]
    mean: f64,
    #[serde(default)]
    percentile: BTreeMap<String, f64>,
}

#[derive(Deserialize)]
struct Sync {
    #[serde(default)]
    total_ios: u64,
    #[serde(default)]
    lat_ns: Lat,
}

impl Lat {
    /// The `p`th percentile in µs, if fio reported it.
    fn percentile_us(&self, p: f64) -> Option<f64> {
        self.percentile
            .iter()
            .find(|(k, _)| k.parse::<f64>().is_ok_and(|k| (k - p).abs() < 1e-6))
            .map(|(_, v)| v / 1000.0)
    }
}

impl Dir {
    /// The latency distribution to report: total latency, or completion
    /// latency when fio has no percentiles of the total.
    fn latency(&self) -> &Lat {
        if self.lat_ns.percentile.is_empty() {
            &self.clat_ns
        } else {
            &self.lat_ns
        }
    }
}

/// fio's JSON (`--group_reporting --unified_rw_reporting=both`) for `spec`
/// as a result row. fio may print notes before the JSON; they are skipped.
fn parse(spec: &TestSpec, stdout: &str) -> Result<TestResult> {
    let start = stdout.find("\n{").map(|i| i + 1).or_else(|| stdout.starts_with('{').then_some(0));
    let Some(start) = start else { bail!("fio printed no JSON: {}", stdout.trim()) };
    let out: Output = serde_json::from_str(&stdout[start..]).context("reading fio's JSON")?;
    let Some(job) = out.jobs.into_iter().next() else { bail!("fio's JSON has no job") };
    if job.error != 0 {
        bail!("fio reported error {} ({})", job.error, std::io::Error::from_raw_os_error(job.error as i32));
    }
    // Without `mixed` (a fio before 3.26): reads and writes added up, the
    // latency of the direction that did most.
    let mixed = job.mixed.unwrap_or_else(|| {
        let main = if job.read.total_ios >= job.write.total_ios { &job.read } else { &job.write };
        Dir {
            bw_bytes: job.read.bw_bytes + job.write.bw_bytes,
            iops: job.read.iops + job.write.iops,
            runtime: job.read.runtime.max(job.write.runtime),
            total_ios: job.read.total_ios + job.write.total_ios,
            lat_ns: main.lat_ns.clone(),
            clat_ns: main.clat_ns.clone(),
        }
    });
    let lat = mixed.latency();
    let pct = |p: f64| lat.percentile_us(p).with_context(|| format!("fio reported no p{p} latency"));
    let flush = job.sync.filter(|s| s.total_ios > 0).map(|s| s.lat_ns);
    Ok(TestResult {
        test: spec.name,
        title: spec.title,
        rw: spec.fio_rw(),
        bs: spec.block_size,
        iodepth: spec.queue_depth,
        iops: mixed.iops,
        mb_s: mixed.bw_bytes / 1e6,
        p50_us: pct(50.0)?,
        p99_us: pct(99.0)?,
        p999_us: pct(99.9)?,
        mean_us: lat.mean / 1000.0,
        max_us: lat.max / 1000.0,
        read_iops: job.read.iops,
        write_iops: job.write.iops,
        ops: mixed.total_ios,
        runtime_s: mixed.runtime / 1000.0,
        flush_p50_us: flush.as_ref().and_then(|l| l.percentile_us(50.0)),
        flush_p99_us: flush.as_ref().and_then(|l| l.percentile_us(99.0)),
        fio: String::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::bench::workload::SUITE;

    fn job(connections: usize) -> Job<'static> {
        Job {
            uri: "nbd://127.0.0.1:10809/ref",
            region: 64 << 20,
            window: Window { ramp: Duration::from_millis(500), runtime: Duration::from_secs(2) },
            connections,
            seed: 7,
        }
    }

    fn has(args: &[String], a: &str) -> bool {
        args.iter().any(|x| x == a)
    }

    #[test]
    fn every_test_maps_to_fio_options() {
        for spec in &SUITE {
            let a = job(1).args(spec);
            assert!(has(&a, &format!("--rw={}", spec.fio_rw())), "{a:?}");
            assert!(has(&a, &format!("--bs={}", spec.block_size)));
            assert!(has(&a, &format!("--iodepth={}", spec.queue_depth)));
            assert!(has(&a, &format!("--name={}", spec.name)));
            assert!(has(&a, "--runtime=2000ms") && has(&a, "--ramp_time=500ms") && has(&a, "--size=67108864"));
            assert!(has(&a, "--ioengine=nbd") && has(&a, "--uri=nbd://127.0.0.1:10809/ref") && has(&a, "--randseed=7"));
            assert_eq!(has(&a, "--fsync=1"), spec.name == "rw4k_qd1_flush", "{}", spec.name);
            assert_eq!(has(&a, "--rwmixread=70"), spec.name == "mix4k_qd32", "{}", spec.name);
        }
    }

    #[test]
    fn connections_spread_the_depth_like_the_builtin_engine() {
        let qd32 = TestSpec::find("rw4k_qd32").unwrap();
        let a = job(3).args(qd32);
        let depths: Vec<&str> = a.iter().filter_map(|x| x.strip_prefix("--iodepth=")).collect();
        assert_eq!(depths, ["11", "11", "10"]);
        assert!(has(&a, "--name=rw4k_qd32.0") && has(&a, "--name=rw4k_qd32.2") && has(&a, "--group_reporting"));
        // QD1 uses one connection whatever --connections says.
        let qd1 = job(4).args(TestSpec::find("rr4k_qd1").unwrap());
        assert_eq!(qd1.iter().filter(|x| x.starts_with("--name=")).count(), 1);
        // Sequential jobs take disjoint slices of the region.
        let seq = job(2).args(TestSpec::find("sw1m_qd8").unwrap());
        let offsets: Vec<&str> = seq.iter().filter_map(|x| x.strip_prefix("--offset=")).collect();
        let sizes: Vec<&str> = seq.iter().filter_map(|x| x.strip_prefix("--size=")).collect();
        assert_eq!((offsets, sizes), (vec!["0", "33554432"], vec!["33554432", "33554432"]));
    }

    #[test]
    fn command_lines_quote_what_the_shell_would_split() {
        let args = vec!["--uri=nbd+unix:///e?socket=/tmp/a b".to_string(), "--bs=4096".to_string()];
        assert_eq!(command_line(&args), "fio '--uri=nbd+unix:///e?socket=/tmp/a b' --bs=4096");
    }

    /// fio 3.33's output for rw4k_qd1_flush, cut to the fields read, with
    /// the note it prints before the JSON.
    const FLUSH_RUN: &str = r#"fio: connected to NBD server
{
  "fio version" : "fio-3.33",
  "jobs" : [ {
      "jobname" : "rw4k_qd1_flush", "error" : 0,
      "read" : { "io_bytes" : 0, "bw_bytes" : 0, "iops" : 0.0, "runtime" : 0, "total_ios" : 0,
                 "lat_ns" : { "min" : 0, "max" : 0, "mean" : 0.0, "N" : 0 } },
      "write" : { "io_bytes" : 3125248, "bw_bytes" : 2080724, "iops" : 507.989348, "runtime" : 1502, "total_ios" : 763,
        "clat_ns" : { "min" : 6532, "max" : 7679688, "mean" : 396993.9, "N" : 763,
                      "percentile" : { "50.000000" : 272384, "99.000000" : 3948544, "99.900000" : 7700480 } },
        "lat_ns" : { "min" : 155179, "max" : 7765037, "mean" : 430507.4, "N" : 763,
                     "percentile" : { "50.000000" : 301056, "99.000000" : 3948544, "99.900000" : 7766016 } } },
      "sync" : { "total_ios" : 763, "lat_ns" : { "min" : 81272, "max" : 8168429, "mean" : 1503930.7, "N" : 763,
                 "percentile" : { "50.000000" : 477184, "99.000000" : 5472256, "99.900000" : 8159232 } } },
      "mixed" : { "io_bytes" : 3125248, "bw_bytes" : 2080724, "iops" : 507.989348, "runtime" : 1502, "total_ios" : 763,
        "lat_ns" : { "min" : 155179, "max" : 7765037, "mean" : 430507.4, "N" : 763,
                     "percentile" : { "50.000000" : 301056, "99.000000" : 3948544, "99.900000" : 7766016 } } }
  } ]
}
"#;

    #[test]
    fn fio_json_becomes_a_result_row() {
        let spec = TestSpec::find("rw4k_qd1_flush").unwrap();
        let r = parse(spec, FLUSH_RUN).unwrap();
        assert_eq!((r.test, r.rw, r.bs, r.iodepth, r.ops), ("rw4k_qd1_flush", "randwrite", 4096, 1, 763));
        assert!((r.iops - 507.989348).abs() < 1e-9 && (r.write_iops - r.iops).abs() < 1e-9 && r.read_iops == 0.0);
        assert!((r.mb_s - 2.080724).abs() < 1e-9);
        // Total latency, not completion latency.
        assert_eq!((r.p50_us, r.p99_us, r.p999_us), (301.056, 3948.544, 7766.016));
        assert!((r.runtime_s - 1.502).abs() < 1e-9 && (r.max_us - 7765.037).abs() < 1e-9);
        assert_eq!((r.flush_p50_us, r.flush_p99_us), (Some(477.184), Some(5472.256)));
    }

    #[test]
    fn fio_json_without_mixed_or_total_percentiles_still_reads() {
        // An older fio: no `mixed`, only completion-latency percentiles.
        let old = FLUSH_RUN
            .replace("\"mixed\"", "\"unused\"")
            .replace("\"lat_ns\" : { \"min\" : 155179", "\"x\" : { \"min\" : 155179");
        let spec = TestSpec::find("rw4k_qd1").unwrap();
        let r = parse(spec, &old).unwrap();
        assert_eq!((r.ops, r.p50_us), (763, 272.384));
        assert!(parse(spec, "fio: no such file\n").unwrap_err().to_string().contains("no JSON"));
        let failed = FLUSH_RUN.replace("\"error\" : 0", "\"error\" : 5");
        assert!(parse(spec, &failed).unwrap_err().to_string().contains("error 5"));
    }
}
