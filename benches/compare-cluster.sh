#!/usr/bin/env bash
# Compare a 3-replica Ballast volume (three `ballast node` processes on this
# machine, served by `ballast attach`) with qemu-nbd --cache=none on a local
# raw file, in one run, with the same fio suite (../shared/tools/bench-nbd.sh
# or BENCH_NBD=path), alternating the two targets test by test so drift hits
# both, and print the ratio for every test.
#
#   benches/compare-cluster.sh [OUT_DIR]   env: RUNTIME (s per test, 15), SHARDS (8)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
OUT=${1:-$(mktemp -d /tmp/ballast-bench.XXXX)}
BENCH=${BENCH_NBD:-../shared/tools/bench-nbd.sh}
export RUNTIME=${RUNTIME:-15}
SHARDS=${SHARDS:-8}
TESTS=${TESTS:-"rw4k_qd1 rw4k_qd32 rr4k_qd1 rr4k_qd32 sw1m_qd8 sr1m_qd8 rw4k_qd1_flush"}
mkdir -p "$OUT"
cargo build --bins -q
BIN="$CARGO_TARGET_DIR/debug/ballast"

work=$(mktemp -d /var/tmp/ballast-bench-work.XXXX)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

EP=127.0.0.1:7201,127.0.0.1:7202,127.0.0.1:7203
for i in 1 2 3; do
  "$BIN" node --data-dir "$work/node$i" --listen "127.0.0.1:720$i" --advertise "127.0.0.1:720$i" \
    >"$OUT/node$i.log" 2>&1 &
  pids+=($!)
done
"$BIN" cluster init --endpoints "$EP" --replicas 3 --shards "$SHARDS" >/dev/null
"$BIN" volume create bench --size 2GiB --endpoints "$EP" >/dev/null
"$BIN" attach bench --listen 127.0.0.1:10909 --endpoints "$EP" >"$OUT/attach.log" 2>&1 &
pids+=($!)
qemu-img create -q -f raw "$work/ref.raw" 2G
qemu-nbd --cache=none --aio=threads -f raw --persistent --shared=8 -b 127.0.0.1 -p 10910 -x ref "$work/ref.raw" &
pids+=($!)
for port in 10909 10910; do
  for _ in $(seq 300); do nbdinfo --size "nbd://127.0.0.1:$port/" >/dev/null 2>&1 && break; sleep 0.1; done
done

: >"$OUT/ballast.txt"; : >"$OUT/qemu-nbd.txt"
first=1
for t in $TESTS; do
  # Prefill once per target (the first test), then alternate test by test.
  TESTS=$t PREFILL=$first bash "$BENCH" nbd://127.0.0.1:10909/bench "$OUT/b-$t.txt" >/dev/null
  TESTS=$t PREFILL=$first bash "$BENCH" nbd://127.0.0.1:10910/ref "$OUT/q-$t.txt" >/dev/null
  grep -v '^#' "$OUT/b-$t.txt" | tail -n +2 >>"$OUT/ballast.txt"
  grep -v '^#' "$OUT/q-$t.txt" | tail -n +2 >>"$OUT/qemu-nbd.txt"
  first=0
done

commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
{
  echo "# ballast 3 replicas ($SHARDS shards, ballast attach) vs qemu-nbd --cache=none, commit $commit, $(date -u +%F), nproc=$(nproc), ${RUNTIME}s per test"
  printf '%-15s %10s %10s %8s %12s %12s\n' test ballast_IOPS qemu_IOPS ratio ballast_p99us qemu_p99us
  join <(awk '{print $1, $2, $5}' "$OUT/ballast.txt" | sort) \
       <(awk '{print $1, $2, $5}' "$OUT/qemu-nbd.txt" | sort) |
    awk '{r = ($4 > 0) ? $2 / $4 : 0; printf "%-15s %10.0f %10.0f %7.2fx %12.0f %12.0f\n", $1, $2, $4, r, $3, $5}'
} | tee "$OUT/summary.txt"
