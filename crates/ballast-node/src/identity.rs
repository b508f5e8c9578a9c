//! A node's identity: which cluster it belongs to, its node id, whether it
//! is a voter of the meta group, and the addresses it asks for the cluster
//! map. Assigned once (by `cluster init` or by joining), stored in the first
//! data dir, and read back on every start, so a restarted node needs no
//! outside help to take up its replicas again.
//!
//! Format, version 1 (text, replaced atomically like the replica manifest):
//! the line `ballast-identity v1`, then `cluster <id>`, `node <id>`,
//! `meta <0|1>` and one `seed <host:port>` line per seed.

use std::fs;
use std::path::Path;

use ballast_types::{ClusterId, NodeId};

use crate::manifest::{replace_file, ManifestError};

const FILE: &str = "ballast-identity";
const HEADER_V1: &str = "ballast-identity v1";

/// Who this node is. Never changes once written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub cluster: ClusterId,
    pub node: NodeId,
    /// This node holds a replica of the meta group (group 0).
    pub meta: bool,
    /// Where to fetch the cluster map when this node holds no meta replica
    /// (the meta members, or the endpoints it joined through).
    pub seeds: Vec<String>,
}

impl Identity {
    pub fn validate(&self) -> Result<(), String> {
        if self.cluster.0 == 0 || self.node.0 == 0 {
            return Err("cluster and node ids must not be 0".into());
        }
        for s in &self.seeds {
            ballast_types::validate_addr(s).map_err(|e| format!("seed {s:?}: {e}"))?;
        }
        Ok(())
    }
}

/// The identity stored in `dir`, if any.
pub fn load(dir: &Path) -> Result<Option<Identity>, ManifestError> {
    let p = dir.join(FILE);
    let err = |reason: String| ManifestError { path: p.clone(), reason };
    let text = match fs::read_to_string(&p) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(err(e.to_string())),
    };
    let mut lines = text.lines();
    match lines.next() {
        Some(HEADER_V1) => {}
        other => return Err(err(format!("unknown header {other:?} (this build reads {HEADER_V1:?})"))),
    }
    let (mut cluster, mut node, mut meta, mut seeds) = (0u64, 0u64, false, Vec::new());
    for line in lines.filter(|l| !l.trim().is_empty()) {
        let (key, value) = line.trim().split_once(' ').ok_or_else(|| err(format!("bad line {line:?}")))?;
        let num = || value.parse::<u64>().map_err(|e| err(format!("bad number in {line:?}: {e}")));
        match key {
            "cluster" => cluster = num()?,
            "node" => node = num()?,
            "meta" => meta = num()? == 1,
            "seed" => seeds.push(value.to_string()),
            _ => return Err(err(format!("unknown key in {line:?}"))),
        }
    }
    let id = Identity { cluster: ClusterId(cluster), node: NodeId(node), meta, seeds };
    id.validate().map_err(err)?;
    Ok(Some(id))
}

/// Write `id` to `dir`; durable on return.
pub fn store(dir: &Path, id: &Identity) -> Result<(), ManifestError> {
    let mut text = format!("{HEADER_V1}\ncluster {}\nnode {}\nmeta {}\n", id.cluster.0, id.node.0, u8::from(id.meta));
    for s in &id.seeds {
        text.push_str(&format!("seed {s}\n"));
    }
    replace_file(dir, FILE, &text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_roundtrip_and_bad_files_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(load(dir.path()).expect("none yet"), None);
        let id = Identity {
            cluster: ClusterId(99),
            node: NodeId(2),
            meta: true,
            seeds: vec!["10.0.0.1:7100".into(), "n2:7100".into()],
        };
        store(dir.path(), &id).expect("store");
        assert_eq!(load(dir.path()).expect("load"), Some(id));
        for bad in ["ballast-identity v2\n", "ballast-identity v1\ncluster 0\nnode 1\n", "ballast-identity v1\nx 1\n"] {
            fs::write(dir.path().join(FILE), bad).expect("write");
            assert!(load(dir.path()).is_err(), "{bad:?}");
        }
    }
}
