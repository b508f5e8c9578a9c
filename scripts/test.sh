#!/usr/bin/env bash
# Every check CI runs: formatting, lints, unit and conformance tests, and the
# end-to-end suites that drive real NBD clients against real servers.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
. scripts/env.sh
export CARGO_TERM_COLOR=never
echo "== cargo fmt"; cargo fmt --all -- --check
# One feature set for every step, so nothing is built twice: `faults` adds
# the fault suite (tests/faults.rs) and its injection points, inert unless driven.
features=(--workspace --features ballast/faults)
echo "== cargo build"; cargo build "${features[@]}" --all-targets
echo "== cargo clippy"; cargo clippy "${features[@]}" --all-targets -- -D warnings
echo "== cargo test"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test "${features[@]}" --no-fail-fast -- "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
echo "== container tests"; bash tests/containers.sh 2>&1 | tee -a "$log"; [ "${PIPESTATUS[0]}" = 0 ] || status=1
set -e
# One closing line for the whole run (cargo prints one per test binary).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) g += $i } }
     END { printf "tests: %d passed, %d failed, %d skipped\n", p, f, g }' "$log"
exit "$status"
