# Sourced by the scripts: one build directory outside the clone, reused by
# every clone and every run on this machine (RocksDB takes ~12 minutes cold).
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/ballast-target}"
mkdir -p "$CARGO_TARGET_DIR"
