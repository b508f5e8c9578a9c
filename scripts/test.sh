#!/usr/bin/env bash
# Every check CI runs: formatting, lints, unit and conformance tests, and the
# end-to-end suites that drive real NBD clients against real servers.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
. scripts/env.sh
export CARGO_TERM_COLOR=never
echo "== cargo fmt"; cargo fmt --all -- --check
echo "== cargo build"; cargo build --workspace --all-targets
echo "== cargo clippy"; cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo test"; cargo test --workspace --no-fail-fast -- "$@"
