//! Results as data (the `--json` file) and as a table.
//!
//! Every result row carries bench-nbd.sh's columns under the same names and
//! units — `test`, `iops`, `mb_s` (10^6 bytes/s), `p50_us`, `p99_us`, latency
//! submit → complete — plus the equivalent fio command line, so a `ballast
//! bench` run and a fio run of the same export compare test by test.

use std::fmt::Write as _;

use serde::Serialize;

use super::workload::{Measured, TestSpec};

/// The whole run: what was measured, how, and on what.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub tool: &'static str,
    pub version: &'static str,
    /// Seconds since the Unix epoch when the run started.
    pub started_unix: u64,
    pub host: String,
    pub nproc: usize,
    pub suite: &'static str,
    /// `builtin` or `fio`: which load generator measured.
    pub engine: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fio_version: Option<String>,
    pub runtime_s: f64,
    pub ramp_s: f64,
    /// Bytes of each export used, from offset 0.
    pub size: u64,
    pub connections: usize,
    pub prefill: bool,
    pub seed: u64,
    pub targets: Vec<TargetReport>,
    /// `targets[0] / targets[1]` per test, with `--compare`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ratios: Vec<Ratio>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TargetReport {
    /// `A`, or `B` for the `--compare` target.
    pub label: &'static str,
    pub uri: String,
    pub export_size: u64,
    pub structured_replies: bool,
    pub results: Vec<TestResult>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TestResult {
    pub test: &'static str,
    pub title: &'static str,
    pub rw: &'static str,
    pub bs: u32,
    pub iodepth: usize,
    pub iops: f64,
    pub mb_s: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub mean_us: f64,
    pub max_us: f64,
    pub read_iops: f64,
    pub write_iops: f64,
    /// Requests counted in the measured window.
    pub ops: u64,
    /// Length of the measured window.
    pub runtime_s: f64,
    /// Only in the flush test: latency of the FLUSH after each write.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flush_p50_us: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flush_p99_us: Option<f64>,
    /// The fio command line of the same test: the one `--engine fio` ran,
    /// or would run.
    pub fio: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Ratio {
    pub test: &'static str,
    /// `A` IOPS over `B` IOPS (above 1: A is faster).
    pub iops: f64,
    /// `A` p99 over `B` p99 (below 1: A's tail is shorter).
    pub p99: f64,
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

/// `a / b`, or 0 when `b` is 0 (a test that did nothing on B).
pub fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

impl TestResult {
    pub fn new(spec: &TestSpec, m: &Measured, fio: String) -> Self {
        let secs = m.elapsed.as_secs_f64();
        let per_sec = |n: f64| if secs > 0.0 { n / secs } else { 0.0 };
        let flush = (m.flush_latency.count() > 0).then_some(&m.flush_latency);
        TestResult {
            test: spec.name,
            title: spec.title,
            rw: spec.fio_rw(),
            bs: spec.block_size,
            iodepth: spec.queue_depth,
            iops: per_sec(m.ops() as f64),
            mb_s: per_sec(m.bytes as f64) / 1e6,
            p50_us: us(m.latency.quantile(0.50)),
            p99_us: us(m.latency.quantile(0.99)),
            p999_us: us(m.latency.quantile(0.999)),
            mean_us: m.latency.mean() / 1000.0,
            max_us: us(m.latency.max()),
            read_iops: per_sec(m.reads as f64),
            write_iops: per_sec(m.writes as f64),
            ops: m.ops(),
            runtime_s: secs,
            flush_p50_us: flush.map(|h| us(h.quantile(0.50))),
            flush_p99_us: flush.map(|h| us(h.quantile(0.99))),
            fio,
        }
    }
}

impl Report {
    /// Fill `ratios` from the two targets' results, test by test.
    pub fn compute_ratios(&mut self) {
        self.ratios.clear();
        if let [a, b] = &self.targets[..] {
            for ra in &a.results {
                if let Some(rb) = b.results.iter().find(|r| r.test == ra.test) {
                    self.ratios.push(Ratio {
                        test: ra.test,
                        iops: ratio(ra.iops, rb.iops),
                        p99: ratio(ra.p99_us, rb.p99_us),
                    });
                }
            }
        }
    }

    /// The human summary: one target's bench-nbd.sh columns, or both side
    /// by side with the IOPS ratio.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let how = format!(
            "{} suite, {} engine, {}s per test (ramp {}s), {} MiB, {} connection{}",
            self.suite,
            self.engine,
            self.runtime_s,
            self.ramp_s,
            self.size >> 20,
            self.connections,
            if self.connections == 1 { "" } else { "s" }
        );
        match &self.targets[..] {
            [a] => {
                let _ = writeln!(s, "# ballast bench {}: {how}", a.uri);
                let _ = writeln!(
                    s,
                    "{:<15} {:<34} {:>10} {:>9} {:>9} {:>9} {:>9}",
                    "test", "", "IOPS", "MB/s", "p50_us", "p99_us", "p99.9_us"
                );
                for r in &a.results {
                    let _ = writeln!(
                        s,
                        "{:<15} {:<34} {:>10.0} {:>9.1} {:>9.0} {:>9.0} {:>9.0}{}",
                        r.test,
                        r.title,
                        r.iops,
                        r.mb_s,
                        r.p50_us,
                        r.p99_us,
                        r.p999_us,
                        flush_note(r)
                    );
                }
            }
            [a, b] => {
                let _ = writeln!(s, "# ballast bench: A = {}, B = {}: {how}", a.uri, b.uri);
                let _ = writeln!(
                    s,
                    "{:<15} {:<34} {:>10} {:>10} {:>8} {:>10} {:>10}",
                    "test", "", "A_IOPS", "B_IOPS", "A/B", "A_p99us", "B_p99us"
                );
                for ra in &a.results {
                    let Some(rb) = b.results.iter().find(|r| r.test == ra.test) else { continue };
                    let _ = writeln!(
                        s,
                        "{:<15} {:<34} {:>10.0} {:>10.0} {:>7.2}x {:>10.0} {:>10.0}",
                        ra.test,
                        ra.title,
                        ra.iops,
                        rb.iops,
                        ratio(ra.iops, rb.iops),
                        ra.p99_us,
                        rb.p99_us
                    );
                }
            }
            _ => {}
        }
        s
    }
}

fn flush_note(r: &TestResult) -> String {
    match (r.flush_p50_us, r.flush_p99_us) {
        (Some(p50), Some(p99)) => format!("  (write lat; flush p50={p50:.0}us p99={p99:.0}us)"),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::bench::workload::SUITE;
    use std::time::Duration;

    fn measured(ops: u64, lat_ns: u64) -> Measured {
        let mut m = Measured { writes: ops, bytes: ops * 4096, elapsed: Duration::from_secs(2), ..Default::default() };
        for _ in 0..ops {
            m.latency.record(lat_ns);
        }
        m
    }

    fn target(label: &'static str, ops: u64) -> TargetReport {
        TargetReport {
            label,
            uri: format!("nbd://h/{label}"),
            export_size: 1 << 30,
            structured_replies: true,
            results: vec![TestResult::new(&SUITE[0], &measured(ops, 100_000), "fio ...".into())],
        }
    }

    #[test]
    fn results_use_bench_nbd_units() {
        let r = TestResult::new(&SUITE[0], &measured(2000, 250_000), String::new());
        assert_eq!(r.iops, 1000.0);
        assert!((r.mb_s - 4.096).abs() < 1e-9);
        assert!((r.p99_us - 250.0).abs() < 250.0 / 64.0);
        assert_eq!((r.rw, r.bs, r.iodepth), ("randwrite", 4096, 1));
        let empty = TestResult::new(&SUITE[0], &Measured::default(), String::new());
        assert_eq!((empty.iops, empty.p99_us), (0.0, 0.0));
    }

    #[test]
    fn comparison_table_and_json_carry_the_ratio() {
        let mut rep = Report {
            tool: "ballast bench",
            version: "0",
            started_unix: 0,
            host: "h".into(),
            nproc: 2,
            suite: "quick",
            engine: "builtin",
            fio_version: None,
            runtime_s: 2.0,
            ramp_s: 0.0,
            size: 64 << 20,
            connections: 1,
            prefill: true,
            seed: 1,
            targets: vec![target("A", 3000), target("B", 2000)],
            ratios: Vec::new(),
        };
        rep.compute_ratios();
        assert_eq!(rep.ratios.len(), 1);
        assert!((rep.ratios[0].iops - 1.5).abs() < 1e-9);
        let t = rep.table();
        assert!(t.contains("A = nbd://h/A, B = nbd://h/B"), "{t}");
        assert!(t.lines().any(|l| l.starts_with("rw4k_qd1") && l.contains("1.50x")), "{t}");
        let json = serde_json::to_value(&rep).unwrap();
        assert_eq!(json["targets"][1]["results"][0]["test"], "rw4k_qd1");
        assert_eq!(json["targets"][0]["results"][0]["iops"], 1500.0);
        assert!(json["targets"][0]["results"][0].get("flush_p99_us").is_none());
    }
}
