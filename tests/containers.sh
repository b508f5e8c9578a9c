#!/usr/bin/env bash
# Container tests: the image, the compose cluster (deploy/compose.yaml) and the
# NBD gateway, driven with fio's nbd engine (4 KiB random writes, CRC32C
# verification) through node loss, a network partition, a full `down`/`up`,
# and scaling out to five nodes (deploy/compose.scale5.yaml).
#
#   bash tests/containers.sh
#
# Needs a Docker Engine with Compose (`docker compose` or `docker-compose`),
# fio, nbdinfo and python3. Without an engine that answers it prints one
# SKIPPED line and exits 0; the closing `test result:` line counts it as
# ignored, never as passed (scripts/test.sh adds it to its total).
#
# Environment: BALLAST_CT_PORT (host port of the gateway; a free one by default),
# BALLAST_CT_BINARY (put this binary in the image instead of `cargo build --bins`),
# BALLAST_CT_KEEP=1 (leave the cluster running when a step fails, to look at it).
set -euo pipefail
cd "$(dirname "$0")/.."

start=$SECONDS
say() { printf '[containers %3ds] %s\n' "$((SECONDS - start))" "$*"; }
result() { echo "test result: $1. $2 passed; $3 failed; $4 ignored (container tests)"; }

if ! docker info >/dev/null 2>&1; then
  result ok 0 0 1
  echo "SKIPPED: container tests: no Docker Engine answers"
  exit 0
fi

if docker compose version >/dev/null 2>&1; then
  compose=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
  compose=(docker-compose)
else
  echo "container tests: a Docker Engine answers but neither \`docker compose\` nor docker-compose exists" >&2
  result FAILED 0 1 0
  exit 1
fi
for tool in fio nbdinfo python3; do
  command -v "$tool" >/dev/null || { echo "container tests: $tool not found (scripts/setup.sh test)" >&2; result FAILED 0 1 0; exit 1; }
done

project="ballast-ct-$$"
port=${BALLAST_CT_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
volume=ctvol
uri="nbd://127.0.0.1:$port/$volume"
endpoints=node1:7100,node2:7100,node3:7100
export BALLAST_NBD_PORT=$port BALLAST_VOLUME=$volume BALLAST_VOLUME_SIZE=1GiB BALLAST_SHARDS=4 BALLAST_IMAGE=ballast:dev
work=$(mktemp -d)
fio_pids=()

dc() { "${compose[@]}" -p "$project" -f deploy/compose.yaml "$@"; }
dc5() { "${compose[@]}" -p "$project" -f deploy/compose.yaml -f deploy/compose.scale5.yaml "$@"; }

finish() {
  local rc=$?
  for p in "${fio_pids[@]}"; do kill "$p" 2>/dev/null || true; done
  if [ "$rc" != 0 ]; then
    say "FAILED (exit $rc); the gateway's and init's last log lines, and the nodes' last warnings:"
    dc5 logs --no-color --tail=30 gateway init 2>&1 | cut -c1-400 || true
    dc5 logs --no-color --tail=400 node1 node2 node3 node4 node5 2>&1 | grep -E 'WARN|ERROR' | tail -n 40 | cut -c1-400 || true
    if [ "${BALLAST_CT_KEEP:-}" = 1 ]; then
      say "BALLAST_CT_KEEP=1: left running as compose project $project (work dir $work)"
      result FAILED 0 1 0
      exit "$rc"
    fi
  fi
  say "tearing down: down -v (project $project)"
  dc5 down -v --remove-orphans >/dev/null 2>&1 || true
  rm -rf "$work"
  if [ "$rc" = 0 ]; then result ok 1 0 0; else result FAILED 0 1 0; fi
  exit "$rc"
}
trap finish EXIT
trap 'exit 130' INT TERM

fail() { say "FAIL: $*" >&2; exit 1; }

cid() { dc5 ps -q "$1"; }

# The compose network the nodes talk on (`<project>_cluster`).
cluster_net() {
  docker inspect -f '{{range $k, $v := .NetworkSettings.Networks}}{{println $k}}{{end}}' "$(cid node1)" | grep '_cluster$'
}

# Readings of `cluster status --output json`: `summary` (nodes, up, under-
# replicated shards) or `shards` (shard replicas per node address).
cat >"$work/status.py" <<'PY'
import json, sys
what, text = sys.argv[1], sys.argv[2]
try:
    s = json.loads(text)
except ValueError:
    print("no status")
    sys.exit(0)
if what == "summary":
    up = sum(1 for n in s["nodes"] if n["up"])
    under = ",".join(str(i) for i in s["under_replicated"]) or "none"
    print("%d nodes, %d up, under-replicated shards: %s" % (len(s["nodes"]), up, under))
else:
    print(" ".join("%s=%d" % (n["addr"], n["shards"]) for n in s["nodes"]))
PY
status_py() { python3 "$work/status.py" "$@"; }

# `ballast cluster status` as JSON, asked from inside the gateway container.
status_json() {
  docker exec "$(cid gateway)" ballast cluster status --endpoints "$endpoints" --output json 2>&1
}

# Wait until `cluster status` reads like the glob $1 (see status.py), for up
# to $2 seconds (120).
wait_status() {
  local want=$1 deadline=$((SECONDS + ${2:-120})) s summary
  while :; do
    s=$(status_json || true)
    summary=$(status_py summary "$s")
    # shellcheck disable=SC2254
    case $summary in $want) say "cluster: $summary"; return 0 ;; esac
    [ "$SECONDS" -lt "$deadline" ] || fail "cluster status not \"$want\" in time: $summary; status: $s"
    sleep 2
  done
}
# Every one of $1 nodes up, no shard under-replicated.
wait_healthy() { wait_status "$1 nodes, $1 up, under-replicated shards: none" "${2:-120}"; }

wait_gateway() {
  local deadline=$((SECONDS + 120)) size
  until size=$(nbdinfo --size "$uri" 2>/dev/null); do
    [ "$SECONDS" -lt "$deadline" ] || fail "the gateway did not serve $uri in time"
    sleep 1
  done
  [ "$size" = $((1 << 30)) ] || fail "nbdinfo --size $uri: $size, expected 1 GiB"
  say "gateway serves $uri ($size bytes)"
}

# One fio job over NBD: 4 KiB random writes over [offset, offset+size), at
# most $rate a second (so that a step's faults land while it writes, however
# fast the machine), each block checked by CRC32C afterwards; with `verify`,
# only the check (same seed, so the same blocks and contents). Prints MiB
# written/read; any error fails.
rate=150
fio_job() {
  local name=$1 seed=$2 offset=$3 size=$4 mode=${5:-write} target=${6:-$uri} out="$work/$1.json"
  local args=(--name="$name" --ioengine=nbd --uri="$target" --rw=randwrite --bs=4k --iodepth=16
    --offset="$offset" --size="$size" --randseed="$seed" --rate_iops="$rate" --verify=crc32c --do_verify=1
    --verify_fatal=1 --verify_state_save=0 --output-format=json)
  [ "$mode" = verify ] && args+=(--verify_only=1)
  if ! (cd "$work" && fio "${args[@]}" >"$out" 2>"$work/$name.err"); then
    cat "$work/$name.err" >&2
    fail "fio $name exited with an error"
  fi
  python3 - "$out" "$work/$name.err" "$mode" <<'PY' || fail "fio $name reported an error"
import json, sys
out, err, mode = sys.argv[1:]
text = open(out).read()
log = text[:text.find("{")] + open(err).read()
for bad in ("verify: bad", "verify failed", "bad magic", "crc32c: verify", "io_u error", "fio: pid"):
    if bad in log:
        sys.exit(f"fio printed {bad!r}:\n{log}")
doc = json.loads(text[text.find("{"):])
w = r = 0
for j in doc["jobs"]:
    if j["error"] != 0:
        sys.exit(f"fio job {j['jobname']}: error {j['error']}")
    w += j["write"]["io_bytes"]
    r += j["read"]["io_bytes"]
if r == 0 or (mode == "write" and w == 0):
    sys.exit(f"fio did no I/O: wrote {w}, read {r}")
if mode == "write":
    print(f"{w >> 20} MiB written, {r >> 20} MiB read back and verified")
else:
    print(f"{r >> 20} MiB read and verified")
PY
}

MiB=$((1 << 20))
# Regions of the 1 GiB volume, one per step: name seed offset size.
A=(loss 11 0 $((12 * MiB)))
B=(partition 12 $((64 * MiB)) $((8 * MiB)))
C=(scaled 13 0 $((8 * MiB)))

# ---- 0. the deployment files parse -----------------------------------------------
dc5 config -q
if command -v kubectl >/dev/null 2>&1; then
  say "kubectl kustomize deploy/kubernetes: $(kubectl kustomize deploy/kubernetes | grep -c '^kind:') objects"
else
  say "kubectl not found: the Kubernetes manifests are not rendered here (tests/deploy_manifests.rs checks their flags)"
fi

# ---- 1. image ------------------------------------------------------------------
build=(deploy/build-image.sh --offline --tag "$BALLAST_IMAGE")
[ -n "${BALLAST_CT_BINARY:-}" ] && build+=(--binary "$BALLAST_CT_BINARY")
say "building the image offline (${build[*]})"
"${build[@]}" 2>&1 | grep -v -i -e 'legacy builder is deprecated' -e 'install the buildx' -e 'docs.docker.com/go/buildx' -e '^ *$'

say "image: $(docker image inspect -f '{{.Id}} {{.Size}} bytes' "$BALLAST_IMAGE")"

# ---- 2. cluster ----------------------------------------------------------------
say "up: 3 nodes, init, gateway on 127.0.0.1:$port (compose project $project, ${compose[*]})"
dc up -d
say "init said: $(docker logs "$(cid init)" 2>&1 | tr '\n' ' ' | cut -c1-300)"
wait_gateway
wait_healthy 3

# ---- 3. a node killed during writes ----------------------------------------------
say "fio ${A[0]}: writing $((A[3] / MiB)) MiB with verify; node1 gets docker kill'd during the writes"
node1=$(cid node1)
fio_job "${A[@]}" >"$work/A.out" 2>&1 &
fio_pids=($!)
sleep 5
kill -0 "${fio_pids[0]}" 2>/dev/null || { cat "$work/A.out"; fail "fio ended before node1 was killed"; }
docker kill "$node1" >/dev/null
say "killed node1 ($(docker inspect -f '{{.State.Status}}' "$node1")) while fio writes"
wait "${fio_pids[0]}" || { cat "$work/A.out"; fail "fio failed while node1 was down"; }
fio_pids=()
say "fio ${A[0]} with node1 down: $(tail -n 1 "$work/A.out")"
r=$(fio_job "${A[@]}" verify)
say "read back ${A[0]} with node1 still down: $r"
docker start "$node1" >/dev/null
say "started node1 again"
wait_healthy 3

# ---- 4. a node partitioned --------------------------------------------------------
net=$(cluster_net)
# Verify both regions written so far; $1 says when, in the log line.
verify_a_and_b() {
  local r
  r=$(fio_job "${A[@]}" verify)
  say "verify ${A[0]}$1: $r"
  r=$(fio_job "${B[@]}" verify)
  say "verify ${B[0]}$1: $r"
}
victim=$(cid node2)
ip_of() { docker inspect -f "{{with index .NetworkSettings.Networks \"$net\"}}{{.IPAddress}}{{end}}" "$victim"; }
old_ip=$(ip_of)
docker network disconnect "$net" "$victim"
cut_at=$SECONDS
say "disconnected node2 ($old_ip) from $net"
wait_status "3 nodes, 2 up, under-replicated shards: [0-9]*"
r=$(fio_job "${B[@]}")
say "fio ${B[0]} during the partition: $r"
sleep 5
docker network connect --alias node2 "$net" "$victim"
say "reconnected node2 after $((SECONDS - cut_at)) s away, now at $(ip_of)"
wait_healthy 3
verify_a_and_b ""

# ---- 5. down and up again: the named volumes keep every block ------------------
say "down (volumes kept), then up again"
dc down
dc up -d
say "init on a cluster that exists: $(docker logs "$(cid init)" 2>&1 | tr '\n' ' ' | cut -c1-300)"
wait_gateway
wait_healthy 3
verify_a_and_b " after down/up"

# ---- 6. scale out to five nodes ----------------------------------------------------
say "scaling out: deploy/compose.scale5.yaml adds node4 and node5 (--join)"
dc5 up -d node4 node5
wait_healthy 5
# Existing shards stay where they are; a pool created now spreads over all five.
admin() { docker exec "$(cid gateway)" ballast "$@" --endpoints "$endpoints"; }
admin pool create wide --replicas 3 --shards 8 >/dev/null
admin volume create ctwide --size 256MiB --pool wide >/dev/null
wait_healthy 5
shards=$(status_py shards "$(status_json)")
say "shard replicas per node after pool create wide: $shards"
case $shards in *node4:7100=0*|*node5:7100=0*) fail "a new node holds no replica of the new pool: $shards" ;; esac
r=$(fio_job "${C[@]}" write "nbd://127.0.0.1:$port/ctwide")
say "fio ${C[0]} on volume ctwide (pool wide, five nodes): $r"
r=$(fio_job "${A[@]}" verify)
say "verify ${A[0]} on the five-node cluster: $r"

say "PASSED in $((SECONDS - start)) s"
