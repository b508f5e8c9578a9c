#!/usr/bin/env bash
# The macro benchmark: a 3-replica Ballast volume (three `ballast node`
# processes on this machine, served by `ballast attach`) against qemu-nbd
# --cache=none on a local raw file of the same size, measured by
# `ballast bench --compare` (the two targets alternate test by test, so drift
# hits both), then recorded in docs/benchmarks.md: a run section (machine,
# table with ratios, plot) appended at the end, and one row in the History
# table. The plot and the JSON go to docs/bench/DATE-COMMIT.{svg,json}.
#
#   benches/run-cluster-bench.sh
#
# Environment (defaults in brackets):
#   SUITE        full | quick [full]
#   RUNTIME      seconds measured per test [the suite's: 15 full, 2 quick]
#   RAMP         seconds per test not counted [the suite's: 2 full, 0 quick]
#   ENGINE       builtin | fio: ballast bench's load generator [builtin]
#   CONNECTIONS  NBD connections per target [1]
#   SHARDS       shards of the pool [8]
#   SIZE         volume and reference file size [2GiB]
#   RECORD       1: write docs/benchmarks.md and docs/bench/; 0: only print,
#                outputs in a kept directory under /tmp [1]
#   WORK_DIR     parent of the nodes' data and the reference file; on the disk
#                to measure, not tmpfs [/var/tmp]
#   WORKER_THREADS  runtime threads of each node and of attach, which all
#                share this machine's cores (as `ballast demo` sets them)
#                [one per four cores, at least 1]
#
# Everything it starts (nodes, attach, qemu-nbd) and its data directory are
# removed on exit, Ctrl-C included; on failure the logs are kept and named.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh

SUITE=${SUITE:-full}
ENGINE=${ENGINE:-builtin}
CONNECTIONS=${CONNECTIONS:-1}
SHARDS=${SHARDS:-8}
SIZE=${SIZE:-2GiB}
RECORD=${RECORD:-1}
WORK_DIR=${WORK_DIR:-/var/tmp}
WORKER_THREADS=${WORKER_THREADS:-$(( $(nproc) / 4 > 1 ? $(nproc) / 4 : 1 ))}
DOC=docs/benchmarks.md

die() { echo "run-cluster-bench: $*" >&2; exit 1; }
case $SUITE in full | quick) ;; *) die "SUITE must be full or quick, not '$SUITE'" ;; esac
case $RECORD in 0 | 1) ;; *) die "RECORD must be 0 or 1, not '$RECORD'" ;; esac
for tool in qemu-nbd python3; do
  command -v "$tool" >/dev/null || die "$tool is needed (Debian: qemu-utils, python3)"
done
if [ "$RECORD" = 1 ]; then
  grep -q '^<!-- history: new rows above this line -->$' "$DOC" || die "$DOC lacks the History marker line"
fi

echo "building ballast (dev profile) ..." >&2
cargo build --bin ballast -q
BIN="$CARGO_TARGET_DIR/debug/ballast"

work=$(mktemp -d "$WORK_DIR/ballast-bench.XXXXXX")
logs="$work/logs"
mkdir -p "$logs"
pids=()
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  if [ "$rc" != 0 ] && [ -d "$logs" ]; then
    kept=$(mktemp -d /tmp/ballast-bench-logs.XXXXXX)
    cp -r "$logs/." "$kept/"
    echo "run-cluster-bench: failed (exit $rc); logs kept in $kept" >&2
  fi
  rm -rf "$work"
  # A RECORD=0 output directory is kept only when there is something in it.
  [ "$RECORD" = 1 ] || [ -z "${out:-}" ] || rmdir "$out" 2>/dev/null || true
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Five free TCP ports, held together while chosen so they are distinct.
read -r P1 P2 P3 PA PQ < <(python3 -c '
import socket
ss = [socket.socket() for _ in range(5)]
for s in ss: s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in ss])
for s in ss: s.close()')
EP="127.0.0.1:$P1,127.0.0.1:$P2,127.0.0.1:$P3"

wait_port() { # PORT WHAT: until something accepts on 127.0.0.1:PORT (60 s)
  for _ in $(seq 600); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  die "$2 did not listen on port $1 within 60 s"
}

echo "starting 3 nodes on ports $P1 $P2 $P3 ..." >&2
i=0
for port in "$P1" "$P2" "$P3"; do
  i=$((i + 1))
  "$BIN" node --data-dir "$work/node$i" --listen "127.0.0.1:$port" --advertise "127.0.0.1:$port" \
    --worker-threads "$WORKER_THREADS" >"$logs/node$i.log" 2>&1 &
  pids+=($!)
done
for port in "$P1" "$P2" "$P3"; do wait_port "$port" "ballast node"; done
"$BIN" cluster init --endpoints "$EP" --replicas 3 --shards "$SHARDS" >"$logs/init.log" 2>&1 ||
  die "cluster init failed: $(tail -n 1 "$logs/init.log")"
"$BIN" volume create bench --size "$SIZE" --endpoints "$EP" >"$logs/volume.log" 2>&1 ||
  die "volume create failed: $(tail -n 1 "$logs/volume.log")"
"$BIN" attach bench --listen "127.0.0.1:$PA" --endpoints "$EP" --worker-threads "$WORKER_THREADS" \
  >"$logs/attach.log" 2>&1 &
pids+=($!)

# The reference: a raw file of the same size, on the same disk, O_DIRECT.
bytes=$(python3 - "$SIZE" <<'PY'
import re, sys
m = re.fullmatch(r"(\d+)\s*([KMGT]i?B?|B)?", sys.argv[1].strip(), re.I)
if not m: sys.exit("SIZE: expected e.g. 2GiB, got " + sys.argv[1])
units = {"": 0, "B": 0, "K": 1, "M": 2, "G": 3, "T": 4}
print(int(m.group(1)) * 1024 ** units[(m.group(2) or "").upper()[:1]])
PY
)
truncate -s "$bytes" "$work/ref.raw"
qemu-nbd --cache=none --aio=threads -f raw --persistent --shared=8 -b 127.0.0.1 -p "$PQ" -x ref \
  "$work/ref.raw" >"$logs/qemu-nbd.log" 2>&1 &
pids+=($!)
wait_port "$PA" "ballast attach"
wait_port "$PQ" "qemu-nbd"

commit=$(git describe --always --dirty --abbrev=7 2>/dev/null || echo unknown)
date=$(date -u +%F)
stamp="$date-$commit"
if [ "$RECORD" = 1 ]; then
  out=docs/bench
  mkdir -p "$out"
else
  out=$(mktemp -d /tmp/ballast-bench-out.XXXXXX)
fi
json="$out/$stamp.json"
svg="$out/$stamp.svg"

# Machine, recorded with the run: the box is shared, so its load matters too.
cpu=$(sed -n 's/^model name[[:space:]]*: *//p' /proc/cpuinfo | head -n 1)
dev=$(df --output=source "$work" | tail -n 1)
disk=$dev
name=$(lsblk -ndo PKNAME "$dev" 2>/dev/null || true)
[ -n "$name" ] || name=$(basename "$dev")
if [ -e "/sys/block/$name" ]; then
  kind="rotational=1"
  [ "$(cat "/sys/block/$name/queue/rotational" 2>/dev/null)" = 0 ] && kind="rotational=0"
  disk="$name ($(lsblk -ndo SIZE "/dev/$name" 2>/dev/null | tr -d ' '), $kind, $(df --output=fstype "$work" | tail -n 1))"
fi
machine="nproc $(nproc), ${cpu:-unknown CPU}, Linux $(uname -r), disk $disk, load average at start $(cut -d' ' -f1-3 /proc/loadavg)"

args=(bench "nbd://127.0.0.1:$PA/bench" --compare "nbd://127.0.0.1:$PQ/ref" --suite "$SUITE"
  --engine "$ENGINE" --connections "$CONNECTIONS" --json "$json" --plot "$svg")
[ -n "${RUNTIME:-}" ] && args+=(--runtime "$RUNTIME")
[ -n "${RAMP:-}" ] && args+=(--ramp "$RAMP")
echo "ballast ${args[*]}" >&2
"$BIN" "${args[@]}" | tee "$logs/table.txt"

if [ "$RECORD" = 0 ]; then
  echo "not recorded (RECORD=0): $json, $svg" >&2
  exit 0
fi

python3 - "$DOC" "$json" "$svg" "$date" "$commit" "$machine" "$SHARDS" "$WORKER_THREADS" <<'PY'
import json, os, sys
doc, json_path, svg, date, commit, machine, shards, threads = sys.argv[1:]
r = json.load(open(json_path))
a, b = r["targets"]
bres = {x["test"]: x for x in b["results"]}
rows = []
for x in a["results"]:
    y = bres.get(x["test"])
    if y is None:
        continue
    ratio = x["iops"] / y["iops"] if y["iops"] > 0 else 0.0
    rows.append((x, y, ratio))
rel = lambda p: os.path.relpath(p, os.path.dirname(doc))
how = f'{r["suite"]} suite, {r["engine"]} engine, {r["runtime_s"]:g} s per test (ramp {r["ramp_s"]:g} s), {r["size"] >> 20} MiB, {r["connections"]} connection(s)'
section = [
    "",
    f"### {date}, commit {commit}: 3 replicas vs qemu-nbd, {how}",
    f"Machine: {machine}.",
    f"Setup: three `ballast node` processes, {shards} shards, 3 replicas, `ballast attach`, {threads} runtime thread(s) each; reference "
    "`qemu-nbd --cache=none --aio=threads` on a raw file on the same disk. "
    f"Plot: [{rel(svg)}]({rel(svg)}); results: [{rel(json_path)}]({rel(json_path)}).",
    "",
    "| test | ballast IOPS | qemu-nbd IOPS | ratio | ballast p50 µs | ballast p99 µs | qemu-nbd p99 µs |",
    "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
]
for x, y, ratio in rows:
    section.append(f'| {x["title"]} | {x["iops"]:.0f} | {y["iops"]:.0f} | {ratio:.2f}× | {x["p50_us"]:.0f} | {x["p99_us"]:.0f} | {y["p99_us"]:.0f} |')
section.append("")

text = open(doc).read()
marker = "<!-- history: new rows above this line -->"
header = next(l for l in text.splitlines() if l.startswith("| date | commit |"))
cols = [c.strip() for c in header.strip("|").split("|")]
ratios = {x["test"]: ratio for x, _, ratio in rows}
cells = {"date": date, "commit": commit, "setup": f"3 replicas, {shards} shards",
         "engine, s per test": f'{r["engine"]}, {r["runtime_s"]:g}'}
row = "| " + " | ".join(cells.get(c) or (f"{ratios[c]:.2f}" if c in ratios else "") for c in cols) + " |"
text = text.replace(marker, row + "\n" + marker, 1)
open(doc, "w").write(text.rstrip("\n") + "\n" + "\n".join(section))
PY
echo "recorded in $DOC (plot $svg); review and commit it with docs/bench/$stamp.*" >&2
