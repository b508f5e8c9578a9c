//! `ballast verify` and the fault suite's workload and checker.
//!
//! [`workload`] runs several concurrent clients of one attached volume
//! against shared hot blocks and records every request's invocation,
//! completion and result; [`checker`] proves from that history that every
//! read returned the latest acknowledged write or a concurrent one, and that
//! no acknowledged write was lost; [`value`] is the self-describing block
//! format that lets a read name the write it returned. [`Report`] sums a
//! history up for people and for JSON.

pub mod checker;
pub mod value;
pub mod workload;

use serde::Serialize;

pub use checker::{check, Op, OpKind, Violation};
pub use value::Observed;
pub use workload::{baseline, read_back, round_blocks, run, Recorder, Workload};

/// A checked history, summed up.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub seed: u64,
    pub seconds: f64,
    pub writes_acked: u64,
    pub writes_failed: u64,
    pub reads: u64,
    pub reads_failed: u64,
    /// Milliseconds: median and 99th percentile of acknowledged writes and reads.
    pub write_ms_p50: f64,
    pub write_ms_p99: f64,
    pub read_ms_p50: f64,
    pub read_ms_p99: f64,
    pub violations: Vec<String>,
    /// First few distinct errors the client returned.
    pub errors: Vec<String>,
}

impl Report {
    /// Check `history` and sum it up.
    pub fn of(seed: u64, history: &[Op]) -> Self {
        let violations = check(history).iter().map(ToString::to_string).collect();
        let mut r = Report {
            seed,
            seconds: history.iter().filter(|o| o.complete != checker::NEVER).map(|o| o.complete).max().unwrap_or(0)
                as f64
                / 1e9,
            writes_acked: 0,
            writes_failed: 0,
            reads: 0,
            reads_failed: 0,
            write_ms_p50: 0.0,
            write_ms_p99: 0.0,
            read_ms_p50: 0.0,
            read_ms_p99: 0.0,
            violations,
            errors: Vec::new(),
        };
        let (mut wl, mut rl) = (Vec::new(), Vec::new());
        for op in history {
            let failed = op.error.is_some();
            match (&op.kind, failed) {
                (OpKind::Write(_), false) => {
                    r.writes_acked += 1;
                    wl.push(op.complete - op.invoke);
                }
                (OpKind::Write(_), true) => r.writes_failed += 1,
                (OpKind::Read(_), false) => {
                    r.reads += 1;
                    rl.push(op.complete - op.invoke);
                }
                (OpKind::Read(_), true) => r.reads_failed += 1,
            }
            if let Some(e) = &op.error {
                if r.errors.len() < 5 && !r.errors.contains(e) {
                    r.errors.push(e.clone());
                }
            }
        }
        (r.write_ms_p50, r.write_ms_p99) = (percentile(&mut wl, 0.5), percentile(&mut wl, 0.99));
        (r.read_ms_p50, r.read_ms_p99) = (percentile(&mut rl, 0.5), percentile(&mut rl, 0.99));
        r
    }

    /// No violation and no failed request.
    pub fn clean(&self) -> bool {
        self.violations.is_empty() && self.writes_failed == 0 && self.reads_failed == 0
    }

    /// Operations per second.
    pub fn rate(&self) -> f64 {
        let ops = self.writes_acked + self.writes_failed + self.reads + self.reads_failed;
        if self.seconds > 0.0 {
            ops as f64 / self.seconds
        } else {
            0.0
        }
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "seed {}: {:.1} s, {} writes acknowledged ({} failed), {} reads ({} failed), {:.0} ops/s",
            self.seed,
            self.seconds,
            self.writes_acked,
            self.writes_failed,
            self.reads,
            self.reads_failed,
            self.rate()
        )?;
        writeln!(
            f,
            "latency ms: write p50 {:.2} p99 {:.2}, read p50 {:.2} p99 {:.2}",
            self.write_ms_p50, self.write_ms_p99, self.read_ms_p50, self.read_ms_p99
        )?;
        for e in &self.errors {
            writeln!(f, "error: {e}")?;
        }
        if self.violations.is_empty() {
            write!(f, "checker: every read returned the latest acknowledged write or a concurrent one")
        } else {
            writeln!(f, "checker: {} violations", self.violations.len())?;
            for v in self.violations.iter().take(20) {
                writeln!(f, "  {v}")?;
            }
            Ok(())
        }
    }
}

fn percentile(ns: &mut [u64], q: f64) -> f64 {
    if ns.is_empty() {
        return 0.0;
    }
    ns.sort_unstable();
    let i = ((ns.len() - 1) as f64 * q).round() as usize;
    ns[i] as f64 / 1e6
}
