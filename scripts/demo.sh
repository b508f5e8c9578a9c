#!/usr/bin/env bash
# Build Ballast, start a three-node cluster on this machine (ports 7101-7103,
# data and logs in ./ballast-data) and serve the volume `demo` from it at
# nbd://127.0.0.1:10809/demo. Arguments go to `ballast demo` (try --help).
# Ctrl-C detaches the volume and stops the nodes; data stays for the next run.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh build
. scripts/env.sh
cargo build --bin ballast
exec "$CARGO_TARGET_DIR/debug/ballast" demo "$@"
