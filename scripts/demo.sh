#!/usr/bin/env bash
# Build Ballast and serve the volume `demo` at nbd://127.0.0.1:10809/demo.
# Arguments go to `ballast demo` (try --help). Ctrl-C stops it; data stays.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh build
. scripts/env.sh
cargo build --bin ballast
exec "$CARGO_TARGET_DIR/debug/ballast" demo "$@"
