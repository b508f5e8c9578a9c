//! The node's `/metrics` text: gauges computed from the node's state at each
//! scrape (identity, replicas, leaders, map version).

use std::fmt::Write as _;

use ballast_types::MapVersion;

use crate::node::NodeInner;

/// The node's state in the Prometheus text format.
pub(crate) fn render(inner: &NodeInner) -> String {
    let me = inner.id();
    let groups = inner.groups.groups();
    let shards = groups.iter().filter(|g| g.shard().is_some()).count();
    let leaders = groups
        .iter()
        .filter(|g| g.shard().is_some())
        .filter(|g| inner.groups.get(**g).and_then(|r| r.group.leader()).is_some_and(|(l, _)| l == me))
        .count();
    let meta_leader = inner.meta.get().and_then(|m| m.leader()).is_some_and(|(l, _)| l == me);
    let map_version: MapVersion = inner.map.map().version;
    let mut out = String::new();
    let cluster = inner.identity.get().map_or(0, |i| i.cluster.0);
    let _ = writeln!(out, "# HELP ballast_node_info This node's identity (0 before it joins a cluster).");
    let _ = writeln!(out, "# TYPE ballast_node_info gauge");
    let _ = writeln!(out, "ballast_node_info{{node=\"{me}\",cluster=\"{cluster}\",addr=\"{}\"}} 1", inner.advertise);
    let _ = writeln!(out, "# HELP ballast_node_shard_replicas Shard replicas running on this node.");
    let _ = writeln!(out, "# TYPE ballast_node_shard_replicas gauge");
    let _ = writeln!(out, "ballast_node_shard_replicas {shards}");
    let _ = writeln!(out, "# HELP ballast_node_shard_leaders Shards this node leads.");
    let _ = writeln!(out, "# TYPE ballast_node_shard_leaders gauge");
    let _ = writeln!(out, "ballast_node_shard_leaders {leaders}");
    let _ = writeln!(out, "# HELP ballast_node_meta_leader 1 when this node leads the meta group.");
    let _ = writeln!(out, "# TYPE ballast_node_meta_leader gauge");
    let _ = writeln!(out, "ballast_node_meta_leader {}", u8::from(meta_leader));
    let _ = writeln!(out, "# HELP ballast_node_map_version Version of the placement map this node holds.");
    let _ = writeln!(out, "# TYPE ballast_node_map_version gauge");
    let _ = writeln!(out, "ballast_node_map_version {}", map_version.0);
    out
}
