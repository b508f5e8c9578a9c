//! The replica manifest of a disk: which shards have a replica on it, so a
//! restarted node reopens them before anyone (the meta group) tells it
//! anything. One small text file per data dir, replaced atomically (write a
//! temporary file, fsync, rename, fsync the directory).
//!
//! Format, version 1: the line `ballast-replicas v1`, then one shard id per
//! line. A newer version is refused rather than misread.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use ballast_types::ShardId;

const FILE: &str = "ballast-replicas";
const HEADER_V1: &str = "ballast-replicas v1";

#[derive(Debug, thiserror::Error)]
#[error("replica manifest {path}: {reason}")]
pub struct ManifestError {
    pub path: PathBuf,
    pub reason: String,
}

fn path(dir: &Path) -> PathBuf {
    dir.join(FILE)
}

/// The shards with a replica on the disk at `dir` (none if no manifest).
pub fn load(dir: &Path) -> Result<Vec<ShardId>, ManifestError> {
    let p = path(dir);
    let err = |reason: String| ManifestError { path: p.clone(), reason };
    let text = match fs::read_to_string(&p) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(err(e.to_string())),
    };
    let mut lines = text.lines();
    match lines.next() {
        Some(HEADER_V1) => {}
        other => return Err(err(format!("unknown header {other:?} (this build reads {HEADER_V1:?})"))),
    }
    let mut shards = Vec::new();
    for line in lines.filter(|l| !l.trim().is_empty()) {
        let id = line.trim().parse::<u32>().map_err(|e| err(format!("bad shard id {line:?}: {e}")))?;
        shards.push(ShardId(id));
    }
    shards.sort();
    shards.dedup();
    Ok(shards)
}

/// Replace the manifest of `dir` with `shards`; durable on return.
pub fn store(dir: &Path, shards: &[ShardId]) -> Result<(), ManifestError> {
    let mut text = format!("{HEADER_V1}\n");
    for s in shards {
        text.push_str(&format!("{}\n", s.0));
    }
    replace_file(dir, FILE, &text)
}

/// Replace `dir/name` with `text` atomically; durable on return (write a
/// temporary file, fsync, rename, fsync the directory).
pub(crate) fn replace_file(dir: &Path, name: &str, text: &str) -> Result<(), ManifestError> {
    let p = dir.join(name);
    let err = |e: std::io::Error| ManifestError { path: p.clone(), reason: e.to_string() };
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = fs::File::create(&tmp).map_err(err)?;
    f.write_all(text.as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)?;
    fs::rename(&tmp, &p).map_err(err)?;
    fs::File::open(dir).and_then(|d| d.sync_all()).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_roundtrip_and_unknown_versions_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(load(dir.path()).expect("none yet"), Vec::<ShardId>::new());
        store(dir.path(), &[ShardId(7), ShardId(2)]).expect("store");
        assert_eq!(load(dir.path()).expect("load"), vec![ShardId(2), ShardId(7)]);
        store(dir.path(), &[]).expect("store empty");
        assert!(load(dir.path()).expect("load").is_empty());
        fs::write(path(dir.path()), "ballast-replicas v2\n1\n").expect("write");
        assert!(load(dir.path()).is_err());
    }
}
