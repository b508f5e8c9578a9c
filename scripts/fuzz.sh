#!/usr/bin/env bash
# Coverage-guided fuzzing with cargo-fuzz (libFuzzer + AddressSanitizer) on
# the stable toolchain: RUSTC_BOOTSTRAP=1 lets stable rustc take the
# `-Zsanitizer` flags cargo-fuzz passes. Installs cargo-fuzz if missing.
#
#   scripts/fuzz.sh                 every target, 30 s each
#   scripts/fuzz.sh TARGET [SECS]   one target (nbd_request, nbd_option,
#                                   nbd_client_reply, proto_conversions)
#   scripts/fuzz.sh all SECS        every target, SECS each
#
# The committed seeds in fuzz/corpus/TARGET are read, never written: what
# libFuzzer learns goes to $CARGO_TARGET_DIR/fuzz-corpus/TARGET and is kept
# between runs. A crash leaves its input in fuzz/artifacts/TARGET/ and fails
# the script; replay it with `cargo fuzz run --fuzz-dir fuzz TARGET FILE`.
# See docs/fuzzing.md.
set -euo pipefail
cd "$(dirname "$0")/.."

TARGETS=(nbd_request nbd_option nbd_client_reply proto_conversions)
target="${1:-all}"
secs="${2:-30}"
if ! [[ "$secs" =~ ^[0-9]+$ ]] || [ "$secs" -lt 1 ]; then
    echo "fuzz.sh: SECS must be a positive number of seconds, not '$secs'" >&2
    exit 2
fi
if [ "$target" = all ]; then
    run=("${TARGETS[@]}")
elif [[ " ${TARGETS[*]} " == *" $target "* ]]; then
    run=("$target")
else
    echo "fuzz.sh: unknown target '$target' (one of: all ${TARGETS[*]})" >&2
    exit 2
fi

# Its own build directory: the sanitizer flags differ from the workspace's,
# and sharing one would make each rebuild the other's dependencies.
export CARGO_TARGET_DIR="${BALLAST_FUZZ_TARGET_DIR:-$HOME/.cache/ballast-fuzz-target}"
export RUSTC_BOOTSTRAP=1
mkdir -p "$CARGO_TARGET_DIR"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz (a few minutes, once)"
    cargo install cargo-fuzz --locked
fi

for t in "${run[@]}"; do
    work="$CARGO_TARGET_DIR/fuzz-corpus/$t"
    mkdir -p "$work"
    echo "== $t: ${secs}s"
    # -rss_limit_mb: no input may make a target use 2 GiB.
    cargo fuzz run --fuzz-dir fuzz "$t" "$work" "fuzz/corpus/$t" -- \
        -max_total_time="$secs" -rss_limit_mb=2048 -print_final_stats=1
done
