//! `deploy/grafana/ballast-dashboard.json` is a Grafana dashboard that a
//! current Grafana imports (schema 36 or later, a Prometheus datasource
//! variable every query uses), and every metric it queries is one the code
//! registers: a node's families, the NBD server's and the client's.

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::Value;

fn dashboard() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/grafana/ballast-dashboard.json");
    let text = std::fs::read_to_string(&path).expect("read the dashboard");
    serde_json::from_str(&text).expect("the dashboard is JSON")
}

/// Every family any Ballast process exports.
fn registered() -> BTreeSet<String> {
    ballast_nbd::metrics::register();
    ballast_client::metrics::register();
    ballast_node::metrics::family_names().into_iter().collect()
}

#[test]
fn the_dashboard_queries_only_metrics_the_code_registers() {
    let d = dashboard();
    assert!(d["schemaVersion"].as_u64().is_some_and(|v| v >= 36), "schemaVersion {}", d["schemaVersion"]);
    let vars = d["templating"]["list"].as_array().expect("templating.list");
    assert!(
        vars.iter().any(|v| v["name"] == "datasource" && v["type"] == "datasource" && v["query"] == "prometheus"),
        "a Prometheus datasource variable named datasource"
    );
    let known = registered();
    let panels = d["panels"].as_array().expect("panels");
    let mut queried = BTreeSet::new();
    let mut ids = BTreeSet::new();
    for p in panels.iter().filter(|p| p["type"] != "row") {
        let title = p["title"].as_str().unwrap_or("?");
        assert!(ids.insert(p["id"].as_u64().expect("panel id")), "{title}: duplicate panel id");
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}: uses the datasource variable");
        let targets = p["targets"].as_array().unwrap_or_else(|| panic!("{title}: no targets"));
        assert!(!targets.is_empty(), "{title}: no targets");
        for t in targets {
            let expr = t["expr"].as_str().unwrap_or_else(|| panic!("{title}: a target without expr"));
            assert_eq!(expr.matches('(').count(), expr.matches(')').count(), "{title}: unbalanced {expr}");
            let mut rest = expr;
            while let Some(i) = rest.find("ballast_") {
                let tail = &rest[i..];
                let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
                let name = &tail[..end];
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .filter_map(|s| name.strip_suffix(s))
                    .find(|f| known.contains(*f))
                    .unwrap_or(name);
                assert!(known.contains(family), "{title}: {name} is not a registered metric (known: {known:?})");
                queried.insert(family.to_string());
                rest = &tail[end..];
            }
        }
    }
    // The list: each has a panel.
    for must in [
        "ballast_nbd_requests_total",
        "ballast_nbd_bytes_total",
        "ballast_nbd_request_duration_seconds",
        "ballast_raft_commit_seconds",
        "ballast_raft_apply_seconds",
        "ballast_raft_append_seconds",
        "ballast_raft_log_fsync_seconds",
        "ballast_raft_log_batch_appends",
        "ballast_node_shard_replicas",
        "ballast_node_shard_leaders",
        "ballast_shards_under_replicated",
        "ballast_checksum_errors_total",
        "ballast_rebuild_bytes_total",
        "ballast_scrub_bytes_total",
    ] {
        assert!(queried.contains(must), "no panel shows {must}");
    }
}
