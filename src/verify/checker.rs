//! The history checker: proves, block by block, that every read returned
//! the latest acknowledged write or one concurrent with the read, and that
//! no acknowledged write was lost.
//!
//! Each block is a register. Times are the client's own clock (one
//! process): an operation *invokes* before its request is sent and
//! *completes* when its answer arrived. A write that failed (error or
//! deadline) is indeterminate: it may have taken effect at any time after
//! its invocation, so it may be read, but never proves another value stale.
//! A write `a` *precedes* a write `b` when `a` completed before `b` was
//! invoked. The rules, for every read `r` that observed write `w` (or the
//! initial zeros, which precede every write):
//! 1. `w` is a write to this block (not garbage, not a phantom id);
//! 2. `w` was invoked before `r` completed (no reading the future);
//! 3. no acknowledged write `x` with `w` preceding `x` completed before `r`
//!    was invoked (no stale read; the final read-back after the workload
//!    makes this "no acknowledged write is lost");
//! 4. no earlier read `q` (completed before `r` was invoked) observed a
//!    write that `w` precedes (no going back in time).
//!
//! These are necessary conditions of linearizability for a register; they
//! are what a lost or reordered write, a stale leader or a torn block
//! breaks.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use super::value::Observed;

/// "Never": the completion time of an indeterminate write.
pub const NEVER: u64 = u64::MAX;

/// One operation of the history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Op {
    pub worker: u32,
    pub block: u64,
    pub kind: OpKind,
    /// Nanoseconds since the workload started.
    pub invoke: u64,
    /// Nanoseconds since the workload started; [`NEVER`] for a failed write.
    pub complete: u64,
    /// The error, if the operation failed.
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpKind {
    Write(u64),
    Read(Observed),
}

/// A broken rule, with the operations that show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub block: u64,
    pub rule: &'static str,
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "block {}: {}: {}", self.block, self.rule, self.detail)
    }
}

#[derive(Debug, Clone, Copy)]
struct W {
    invoke: u64,
    complete: u64,
    acked: bool,
}

/// The initial zeros: precede everything.
const INITIAL: W = W { invoke: 0, complete: 0, acked: true };

fn precedes(a: W, b: W) -> bool {
    a.complete != NEVER && a.complete < b.invoke
}

/// Check a whole history (any order). Failed reads are ignored.
pub fn check(history: &[Op]) -> Vec<Violation> {
    let mut writes: HashMap<u64, BTreeMap<u64, W>> = HashMap::new();
    let mut reads: HashMap<u64, Vec<&Op>> = HashMap::new();
    for op in history {
        match &op.kind {
            OpKind::Write(id) => {
                let acked = op.error.is_none();
                let w = W { invoke: op.invoke, complete: if acked { op.complete } else { NEVER }, acked };
                writes.entry(op.block).or_default().insert(*id, w);
            }
            OpKind::Read(_) if op.error.is_none() => reads.entry(op.block).or_default().push(op),
            OpKind::Read(_) => {}
        }
    }
    let empty = BTreeMap::new();
    let mut out = Vec::new();
    let mut blocks: Vec<_> = reads.keys().copied().collect();
    blocks.sort_unstable();
    for block in blocks {
        let ws = writes.get(&block).unwrap_or(&empty);
        let mut rs = reads.remove(&block).unwrap_or_default();
        rs.sort_by_key(|r| (r.invoke, r.complete));
        // Acknowledged writes by completion time, for rule 3.
        let mut acked: Vec<(u64, W)> = ws.iter().filter(|(_, w)| w.acked).map(|(id, w)| (*id, *w)).collect();
        acked.sort_by_key(|(_, w)| w.complete);
        // (completion, observed) of reads so far, for rule 4.
        let mut seen: Vec<(u64, W, String)> = Vec::new();
        for r in rs {
            let OpKind::Read(obs) = &r.kind else { continue };
            let (w, name) = match obs {
                Observed::Initial => (INITIAL, "the initial zeros".to_string()),
                Observed::Garbage(why) => {
                    out.push(violation(
                        block,
                        "garbage",
                        format!("read by worker {} at {}: {why}", r.worker, ms(r.invoke)),
                    ));
                    continue;
                }
                Observed::Write(id) => match ws.get(id) {
                    Some(w) => (*w, format!("write {id}")),
                    None => {
                        out.push(violation(
                            block,
                            "phantom",
                            format!("read at {} returned write {id}, never issued to this block", ms(r.invoke)),
                        ));
                        continue;
                    }
                },
            };
            if w.invoke > r.complete {
                out.push(violation(
                    block,
                    "future read",
                    format!(
                        "read [{}, {}] returned {name}, invoked only at {}",
                        ms(r.invoke),
                        ms(r.complete),
                        ms(w.invoke)
                    ),
                ));
            }
            // Rule 3: an acknowledged write after `w` finished before the read began.
            if let Some((id, x)) =
                acked.iter().take_while(|(_, x)| x.complete < r.invoke).find(|(_, x)| precedes(w, *x))
            {
                out.push(violation(
                    block,
                    "stale read",
                    format!(
                        "read at {} returned {name}, but write {id} was acknowledged at {} after it",
                        ms(r.invoke),
                        ms(x.complete)
                    ),
                ));
            }
            // Rule 4: an earlier read saw something `w` precedes.
            if let Some((_, _, earlier)) =
                seen.iter().find(|(done, seen_w, _)| *done < r.invoke && precedes(w, *seen_w))
            {
                out.push(violation(
                    block,
                    "went back in time",
                    format!(
                        "read at {} returned {name} after an earlier read returned the newer {earlier}",
                        ms(r.invoke)
                    ),
                ));
            }
            seen.push((r.complete, w, name));
        }
    }
    out
}

fn violation(block: u64, rule: &'static str, detail: String) -> Violation {
    Violation { block, rule, detail }
}

fn ms(ns: u64) -> String {
    if ns == NEVER {
        "never".into()
    } else {
        format!("{:.3}s", ns as f64 / 1e9)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(block: u64, id: u64, invoke: u64, complete: u64) -> Op {
        Op { worker: 0, block, kind: OpKind::Write(id), invoke, complete, error: None }
    }
    fn failed(block: u64, id: u64, invoke: u64) -> Op {
        Op { worker: 0, block, kind: OpKind::Write(id), invoke, complete: NEVER, error: Some("deadline".into()) }
    }
    fn read(block: u64, obs: Observed, invoke: u64, complete: u64) -> Op {
        Op { worker: 1, block, kind: OpKind::Read(obs), invoke, complete, error: None }
    }
    fn rules(h: &[Op]) -> Vec<&'static str> {
        check(h).into_iter().map(|v| v.rule).collect()
    }

    #[test]
    fn latest_and_concurrent_values_pass() {
        let h = [
            read(1, Observed::Initial, 1, 2),
            write(1, 10, 3, 5),
            read(1, Observed::Write(10), 6, 7),
            write(1, 11, 8, 20),
            // Concurrent with write 11: either value is fine.
            read(1, Observed::Write(10), 9, 10),
            read(1, Observed::Write(11), 11, 12),
            read(1, Observed::Write(11), 21, 22),
        ];
        assert_eq!(rules(&h), Vec::<&str>::new());
    }

    #[test]
    fn a_lost_acknowledged_write_is_a_stale_read() {
        let h = [write(1, 10, 1, 2), write(1, 11, 3, 4), read(1, Observed::Write(10), 5, 6)];
        assert_eq!(rules(&h), ["stale read"]);
        let h = [write(1, 10, 1, 2), read(1, Observed::Initial, 5, 6)];
        assert_eq!(rules(&h), ["stale read"]);
    }

    #[test]
    fn failed_writes_may_appear_but_prove_nothing() {
        let h = [
            write(1, 10, 1, 2),
            failed(1, 11, 3),
            read(1, Observed::Write(10), 5, 6),
            read(1, Observed::Write(11), 7, 8),
            // Write 11 may land late: 10 again is allowed only if nothing acked after it.
        ];
        assert_eq!(rules(&h), Vec::<&str>::new());
        // But the failed write can't be read before it was invoked.
        let h = [read(1, Observed::Write(11), 1, 2), failed(1, 11, 3)];
        assert_eq!(rules(&h), ["future read"]);
    }

    #[test]
    fn garbage_phantoms_and_time_travel_are_caught() {
        assert_eq!(rules(&[read(1, Observed::Garbage("torn".into()), 1, 2)]), ["garbage"]);
        assert_eq!(rules(&[read(1, Observed::Write(99), 1, 2)]), ["phantom"]);
        let h = [
            write(1, 10, 1, 2),
            write(1, 11, 3, 30),
            read(1, Observed::Write(11), 4, 5),
            // 11 is still in flight, but a read already saw it: 10 is the past now.
            read(1, Observed::Write(10), 6, 7),
        ];
        assert_eq!(rules(&h), ["went back in time"]);
    }

    #[test]
    fn blocks_are_independent() {
        let h = [
            write(1, 10, 1, 2),
            write(2, 20, 3, 4),
            read(1, Observed::Write(10), 5, 6),
            read(2, Observed::Write(20), 5, 6),
        ];
        assert_eq!(rules(&h), Vec::<&str>::new());
        let h = [write(1, 10, 1, 2), read(2, Observed::Write(10), 5, 6)];
        assert_eq!(rules(&h), ["phantom"]);
    }
}
