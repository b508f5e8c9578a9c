#!/usr/bin/env bash
# Compare `ballast demo` (one node, RocksDB) with qemu-nbd on a local raw file,
# in one run, with the same fio suite (../shared/tools/bench-nbd.sh or
# BENCH_NBD=path), and print the ratio for every test.
#
#   benches/compare-local.sh [OUT_DIR]     env: RUNTIME (s per test, 15), SIZE (bytes, 1 GiB)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
OUT=${1:-$(mktemp -d /tmp/ballast-bench.XXXX)}
BENCH=${BENCH_NBD:-../shared/tools/bench-nbd.sh}
[ -x "$BENCH" ] || BENCH="bash $BENCH"
export RUNTIME=${RUNTIME:-15}
mkdir -p "$OUT"
cargo build --workspace --all-targets -q
BIN="$CARGO_TARGET_DIR/debug/ballast"

work=$(mktemp -d /var/tmp/ballast-bench-work.XXXX)
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
pids=()
trap cleanup EXIT

"$BIN" demo --data-dir "$work/ballast" --size 2GiB --listen 127.0.0.1:10909 >"$OUT/ballast.log" 2>&1 &
pids+=($!)
qemu-img create -q -f raw "$work/ref.raw" 2G
qemu-nbd --cache=none --aio=threads -f raw --persistent --shared=8 -b 127.0.0.1 -p 10910 -x ref "$work/ref.raw" &
pids+=($!)
for port in 10909 10910; do
  for _ in $(seq 100); do nbdinfo --size "nbd://127.0.0.1:$port/" >/dev/null 2>&1 && break; sleep 0.1; done
done

$BENCH nbd://127.0.0.1:10909/demo "$OUT/ballast.txt" >/dev/null
$BENCH nbd://127.0.0.1:10910/ref "$OUT/qemu-nbd.txt" >/dev/null

commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
{
  echo "# ballast demo (1 node, RocksDB) vs qemu-nbd --cache=none, commit $commit, $(date -u +%F), nproc=$(nproc), ${RUNTIME}s per test"
  printf '%-15s %10s %10s %8s %12s %12s\n' test ballast_IOPS qemu_IOPS ratio ballast_p99us qemu_p99us
  join <(grep -v '^#' "$OUT/ballast.txt" | tail -n +2 | awk '{print $1, $2, $5}' | sort) \
       <(grep -v '^#' "$OUT/qemu-nbd.txt" | tail -n +2 | awk '{print $1, $2, $5}' | sort) |
    awk '{r = ($4 > 0) ? $2 / $4 : 0; printf "%-15s %10.0f %10.0f %7.2fx %12.0f %12.0f\n", $1, $2, $4, r, $3, $5}'
} | tee "$OUT/summary.txt"
