#!/usr/bin/env bash
# Container tests: the image, the compose cluster (deploy/compose.yaml) and the
# NBD gateway, driven with fio's nbd engine (4 KiB random writes, CRC32C
# verification) through node loss, a network partition, a full `down`/`up`,
# and scaling out to five nodes (deploy/compose.scale5.yaml); then the Docker
# volume plugin (deploy/compose.plugin.yaml): a volume created with
# `docker volume create -d`, written by one container, read back by a second
# one after a storage node was killed, removed.
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
# The plugin step needs root (it makes its mount directory a shared mount). It
# registers the driver `ballast` (one name for every run: Docker remembers a
# socket plugin it has used until the daemon restarts, and every `docker volume
# ls` waits ~15 s for each remembered plugin that does not answer), so it
# refuses to run while a ballast plugin socket exists already.
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
dcp() { dc5 -f deploy/compose.plugin.yaml "$@"; }

plugin_name=ballast
plugin_root=/var/lib/ballast/ct-$project
plugin_sock=/run/docker/plugins/$plugin_name.sock
client_image=ballast-ct-client:$$
plugin_volume=ctpg
plugin_started=""
export BALLAST_PLUGIN_NAME=$plugin_name BALLAST_PLUGIN_ROOT=$plugin_root

# Leave Docker as it was: no volume of the test driver, no plugin socket, no
# mount or loop device under the plugin's root, no shared bind of it.
plugin_cleanup() {
  [ -n "$plugin_started" ] || return 0
  docker ps -aq --filter "ancestor=$client_image" | xargs -r docker rm -f >/dev/null 2>&1 || true
  docker volume rm -f "$plugin_volume" >/dev/null 2>&1 || true
  dcp stop -t 60 docker-plugin >/dev/null 2>&1 || true
  dcp rm -f docker-plugin >/dev/null 2>&1 || true
  docker volume rm -f "$plugin_volume" >/dev/null 2>&1 || true
  rm -f "$plugin_sock"
  local m left
  left=$(findmnt -R -n -o TARGET "$plugin_root" 2>/dev/null | tail -n +2 | sort -r || true)
  for m in $left; do say "cleanup: unmounting what the plugin left: $m"; umount -l "$m" || true; done
  for m in $(losetup -n -O NAME,BACK-FILE -l 2>/dev/null | awk -v r="$plugin_root/" 'index($2, r) == 1 { print $1 }'); do
    say "cleanup: detaching loop device $m"; losetup -d "$m" || true
  done
  if findmnt -n "$plugin_root" >/dev/null 2>&1; then umount -l "$plugin_root" || true; fi
  rm -rf "$plugin_root"
  docker rmi "$client_image" >/dev/null 2>&1 || true
}

finish() {
  local rc=$?
  for p in "${fio_pids[@]}"; do kill "$p" 2>/dev/null || true; done
  if [ "$rc" != 0 ]; then
    say "FAILED (exit $rc); the gateway's and init's last log lines, and the nodes' last warnings:"
    dcp logs --no-color --tail=30 gateway init docker-plugin 2>&1 | cut -c1-400 || true
    dc5 logs --no-color --tail=400 node1 node2 node3 node4 node5 2>&1 | grep -E 'WARN|ERROR' | tail -n 40 | cut -c1-400 || true
    if [ "${BALLAST_CT_KEEP:-}" = 1 ]; then
      say "BALLAST_CT_KEEP=1: left running as compose project $project (work dir $work)"
      result FAILED 0 1 0
      exit "$rc"
    fi
  fi
  plugin_cleanup
  say "tearing down: down -v (project $project)"
  dcp down -v --remove-orphans >/dev/null 2>&1 || true
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
dcp config -q
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

# ---- 7. the Docker volume plugin: two containers in turn, a node killed between ----
# The containers that use the volume run an image made here from this
# machine's sh, dd, sha256sum and sync (nothing is pulled).
make_client_image() {
  local root=$work/client t f
  mkdir -p "$root/bin" "$root/tmp" "$root/dev" "$root/proc" "$root/data"
  for t in sh dd sha256sum sync; do
    f=$(command -v "$t")
    cp -L "$f" "$root/bin/$t"
    ldd "$f" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' | while read -r f; do
      cp -L --parents "$f" "$root/"
    done
  done
  tar -C "$root" --numeric-owner --owner=0 --group=0 -cf - . | docker import - "$client_image" >/dev/null
}
# The mounts under the plugin's root, on this host (what Docker sees).
plugin_mounts() { findmnt -R -n -o TARGET "$plugin_root" | tail -n +2 | tr '\n' ' '; }

if [ "$(id -u)" != 0 ]; then
  say "SKIPPED: the docker-plugin step needs root (a shared mount for $plugin_root)"
else
  say "docker-plugin: driver $plugin_name, mounts under $plugin_root (bind-mounted rshared)"
  [ ! -e "$plugin_sock" ] || fail "$plugin_sock exists: another ballast plugin runs here; stop it first"
  mkdir -p "$plugin_root"
  plugin_started=1
  mount --bind "$plugin_root" "$plugin_root"
  mount --make-shared "$plugin_root"
  dcp up -d --no-deps docker-plugin
  deadline=$((SECONDS + 60))
  until [ -S "$plugin_sock" ]; do
    [ "$SECONDS" -lt "$deadline" ] || fail "the plugin did not create $plugin_sock in time"
    sleep 1
  done
  make_client_image

  docker volume create -d "$plugin_name" --opt size=1GiB --opt replicas=3 "$plugin_volume" >/dev/null
  out=$(docker volume create -d "$plugin_name" --opt size=1GiB --opt colour=red ctbad 2>&1) &&
    fail "a volume with an unknown option was created: $out"
  case $out in *'unknown option "colour"'*) ;; *) fail "unknown option refused with: $out" ;; esac
  info=$(docker volume inspect -f '{{.Driver}} {{.Scope}} {{printf "%.0f" .Status.size}} {{.Status.replicas}}' "$plugin_volume")
  [ "$info" = "$plugin_name global $((1 << 30)) 3" ] || fail "docker volume inspect $plugin_volume: $info"
  admin volume info "$plugin_volume" >/dev/null || fail "the cluster has no volume $plugin_volume"
  say "docker volume create: $plugin_volume ($info), in the cluster too"

  w=$(docker run --rm -v "$plugin_volume:/data" "$client_image" /bin/sh -c \
    'dd if=/dev/urandom of=/data/blob bs=1M count=16 2>/dev/null && sync && sha256sum /data/blob') ||
    fail "the first container could not write to the volume"
  sum=${w%% *}
  [ ${#sum} = 64 ] || fail "the first container printed $w"
  left=$(plugin_mounts)
  [ -z "$left" ] || fail "still mounted after the first container ended: $left"
  say "first container wrote 16 MiB to /data/blob (sha256 ${sum:0:16}…); unmounted and detached after it"

  node2=$(cid node2)
  docker kill "$node2" >/dev/null
  say "killed node2 ($(docker inspect -f '{{.State.Status}}' "$node2"))"
  r=$(docker run --rm -v "$plugin_volume:/data" "$client_image" /bin/sh -c 'sha256sum /data/blob') ||
    fail "the second container could not read the volume with node2 down"
  [ "${r%% *}" = "$sum" ] || fail "the second container read sha256 ${r%% *}, the first wrote $sum"
  say "second container, with node2 down, read the same 16 MiB back (sha256 matches)"
  docker start "$node2" >/dev/null
  wait_healthy 5

  docker volume rm "$plugin_volume" >/dev/null
  if docker volume ls -q | grep -qx "$plugin_volume"; then fail "docker still lists $plugin_volume"; fi
  if admin volume info "$plugin_volume" >/dev/null 2>&1; then fail "the cluster still has $plugin_volume"; fi
  dcp stop -t 60 docker-plugin >/dev/null 2>&1
  [ ! -e "$plugin_sock" ] || fail "the stopped plugin left $plugin_sock"
  say "docker volume rm: gone from Docker and the cluster; the stopped plugin removed its socket"
fi

say "PASSED in $((SECONDS - start)) s"
