//! `ballast scrub`: run a scrub pass now on every node that is up and wait
//! for it: `Admin.Scrub` starts them (through the meta leader), then
//! `ClusterStatus` is polled until every started node reports a pass more
//! than it had (two more when one was already running, so the pass that
//! counts began after the request). Prints per node and in total: blocks
//! checked, damaged blocks found, repaired, not repaired; copies that
//! differed from their shard's majority, realigned, not realigned, and
//! blocks with no majority. Exit 1 when a damaged block could not be
//! repaired, a divergent copy was not realigned, a block had no majority,
//! or the wait timed out.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use ballast_client::ClientConfig;
use ballast_types::{format_size, Retryable, ScrubReport};
use serde::Serialize;

use super::admin::{ConnArgs, OutArgs};
use super::output::{self, node_name, ScrubView};

#[derive(clap::Args)]
pub struct ScrubArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Give up waiting after this long (e.g. 30m, 2h); the passes go on.
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = parse_timeout)]
    pub timeout: Duration,
    /// Start the passes and return without waiting.
    #[arg(long)]
    pub no_wait: bool,
    #[command(flatten)]
    pub out: OutArgs,
}

fn parse_timeout(s: &str) -> Result<Duration, String> {
    super::node_config::parse_duration(s)
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct ScrubResultView {
    pub nodes: Vec<ScrubView>,
    pub blocks_checked: u64,
    pub bytes_checked: u64,
    pub corrupt_found: u64,
    pub repaired: u64,
    pub unrepaired: u64,
    pub divergent_found: u64,
    pub realigned: u64,
    pub unrealigned: u64,
    pub no_majority: u64,
}

/// The totals of `nodes`' last passes.
pub fn result_view(nodes: Vec<ScrubView>) -> ScrubResultView {
    let sum = |f: fn(&ScrubView) -> u64| nodes.iter().map(f).fold(0u64, u64::saturating_add);
    ScrubResultView {
        blocks_checked: sum(|n| n.blocks_checked),
        bytes_checked: sum(|n| n.bytes_checked),
        corrupt_found: sum(|n| n.corrupt_found),
        repaired: sum(|n| n.repaired),
        unrepaired: sum(|n| n.unrepaired),
        divergent_found: sum(|n| n.divergent_found),
        realigned: sum(|n| n.realigned),
        unrealigned: sum(|n| n.unrealigned),
        no_majority: sum(|n| n.no_majority),
        nodes,
    }
}

pub fn result_table(v: &ScrubResultView) -> String {
    let mut out = output::scrub_table(&v.nodes, output::now_unix_ms());
    out.push_str(&format!(
        "\n{} blocks ({}) checked on {} node(s): {} corrupt found, {} repaired, {} not repaired\n",
        v.blocks_checked,
        format_size(v.bytes_checked),
        v.nodes.len(),
        v.corrupt_found,
        v.repaired,
        v.unrepaired
    ));
    out.push_str(&format!(
        "replicas compared: {} divergent found, {} realigned, {} not realigned, {} without a majority\n",
        v.divergent_found, v.realigned, v.unrealigned, v.no_majority
    ));
    out
}

/// The pass count each node must reach for a pass that started after the
/// request.
pub fn targets(started: &[ScrubReport]) -> BTreeMap<u64, u64> {
    started.iter().map(|r| (r.node.0, r.passes + 1 + u64::from(r.running))).collect()
}

pub async fn run(args: ScrubArgs) -> Result<()> {
    let admin = args.conn.admin(ClientConfig::default())?;
    let started = admin.scrub().await?;
    if started.is_empty() {
        bail!("no node answered the scrub request");
    }
    if args.no_wait {
        let names: Vec<String> = started.iter().map(|r| node_name(r.node.0)).collect();
        println!("scrub started on {}", names.join(", "));
        return Ok(());
    }
    let want = targets(&started);
    let deadline = Instant::now() + args.timeout;
    let mut seen: BTreeMap<u64, u64> = BTreeMap::new();
    let done: Vec<ScrubReport> = loop {
        let status = match admin.status().await {
            Ok(s) => Some(s),
            Err(e) if e.is_retryable() => None,
            Err(e) => return Err(e.into()),
        };
        if let Some(s) = status {
            for r in &s.scrub {
                seen.insert(r.node.0, r.passes);
            }
            let finished: Vec<ScrubReport> =
                s.scrub.iter().filter(|r| want.get(&r.node.0).is_some_and(|w| r.passes >= *w)).copied().collect();
            if finished.len() == want.len() {
                break finished;
            }
        }
        if Instant::now() > deadline {
            let waiting: Vec<String> = want
                .iter()
                .filter(|(n, w)| seen.get(n).is_none_or(|p| p < w))
                .map(|(n, w)| match seen.get(n) {
                    Some(p) => format!("{} ({p} of {w} passes)", node_name(*n)),
                    None => format!("{} (no report)", node_name(*n)),
                })
                .collect();
            bail!(
                "scrub still running after {:?} on {} (it goes on; `ballast cluster status` shows it)",
                args.timeout,
                waiting.join(", ")
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let view = result_view(done.iter().map(output::scrub_view).collect());
    output::print(args.out.output, &view, result_table)?;
    if view.unrepaired > 0 {
        bail!("{} damaged block(s) could not be repaired (no healthy replica, or the repair failed)", view.unrepaired);
    }
    if view.no_majority > 0 {
        bail!("{} block(s) differ between replicas with no majority value: left as they are", view.no_majority);
    }
    if view.unrealigned > 0 {
        bail!(
            "{} divergent copies were not realigned (written meanwhile, or no majority copy; the next pass retries)",
            view.unrealigned
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ballast_types::NodeId;

    #[test]
    fn a_running_pass_does_not_count_and_totals_add_up() {
        let r = |node, passes, running| ScrubReport { node: NodeId(node), passes, running, ..Default::default() };
        assert_eq!(targets(&[r(1, 0, false), r(2, 4, true)]), BTreeMap::from([(1, 1), (2, 6)]));
        let v = |node, corrupt, repaired| ScrubView {
            node,
            passes: 1,
            running: false,
            last_finished_unix_ms: Some(1),
            blocks_checked: 10,
            bytes_checked: 40960,
            corrupt_found: corrupt,
            repaired,
            unrepaired: corrupt - repaired,
            divergent_found: corrupt * 2,
            realigned: repaired * 2,
            unrealigned: (corrupt - repaired) * 2,
            no_majority: node - 1,
        };
        let view = result_view(vec![v(1, 0, 0), v(2, 3, 2)]);
        assert_eq!((view.blocks_checked, view.corrupt_found, view.repaired, view.unrepaired), (20, 3, 2, 1));
        assert_eq!((view.divergent_found, view.realigned, view.unrealigned, view.no_majority), (6, 4, 2, 1));
        let t = result_table(&view);
        assert!(
            t.contains("20 blocks (80 KiB) checked on 2 node(s): 3 corrupt found, 2 repaired, 1 not repaired"),
            "{t}"
        );
        assert!(
            t.contains("replicas compared: 6 divergent found, 4 realigned, 2 not realigned, 1 without a majority"),
            "{t}"
        );
        assert!(t.lines().any(|l| l.starts_with("node-2 ")), "{t}");
    }
}
