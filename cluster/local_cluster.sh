#!/usr/bin/env bash
# A two-node Ray cluster on this machine, with token auth, for trying `orch submit`.
#
#   cluster/local_cluster.sh start     # head + a second node; prints the two exports to use
#   cluster/local_cluster.sh stop      # stops both nodes and every process they started
#
# Settings (environment):
#   ORCH_CLUSTER_DIR     where the cluster keeps its files and token (default /tmp/orch-cluster;
#                        keep it short: Ray's socket paths live under it)
#   ORCH_DASHBOARD_PORT  Jobs API / dashboard port (default 8265)
#   ORCH_GCS_PORT        head port (default 6379)
#   ORCH_CPUS_PER_NODE   logical CPUs per node (default 2)
#   ORCH_HOST            address the nodes listen on (default 127.0.0.1: nothing off this machine)
# The nodes are separate raylets with their own resources; the second node also offers the
# custom resource `node2: 1`, so a workload can ask for it.
set -euo pipefail

DIR="${ORCH_CLUSTER_DIR:-/tmp/orch-cluster}"
DASHBOARD_PORT="${ORCH_DASHBOARD_PORT:-8265}"
GCS_PORT="${ORCH_GCS_PORT:-6379}"
CPUS="${ORCH_CPUS_PER_NODE:-2}"
HOST="${ORCH_HOST:-127.0.0.1}"
TOKEN_FILE="$DIR/auth_token"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

start() {
  mkdir -p "$DIR"
  if [[ ! -s "$TOKEN_FILE" ]]; then
    (umask 077 && python3 -c 'import secrets; print(secrets.token_hex(32))' > "$TOKEN_FILE")
  fi
  # Token auth on both nodes: the Jobs API then refuses anyone without the token.
  export RAY_AUTH_MODE=token
  RAY_AUTH_TOKEN="$(cat "$TOKEN_FILE")"
  export RAY_AUTH_TOKEN
  common=(--node-ip-address="$HOST" --num-cpus="$CPUS" --object-store-memory=500000000
          --disable-usage-stats)
  # Explicit ports for what would otherwise collide between two nodes (or with a local Ray).
  ray start --head "${common[@]}" --temp-dir="$DIR/ray" --port="$GCS_PORT" \
    --dashboard-host="$HOST" --dashboard-port="$DASHBOARD_PORT" \
    --ray-client-server-port="$(free_port)" --dashboard-agent-listen-port="$(free_port)" \
    --metrics-export-port="$(free_port)" >"$DIR/head.log" 2>&1
  # Its own temp dir, as on a second machine: nodes sharing one would share (and garbage-collect)
  # each other's unpacked job working directories.
  ray start --address="$HOST:$GCS_PORT" "${common[@]}" --temp-dir="$DIR/ray2" \
    --resources='{"node2": 1}' --dashboard-agent-listen-port="$(free_port)" \
    --metrics-export-port="$(free_port)" >"$DIR/node2.log" 2>&1
  echo "export ORCH_ADDRESS=http://$HOST:$DASHBOARD_PORT"
  echo "export RAY_AUTH_TOKEN_PATH=$TOKEN_FILE"
}

stop() {
  # `ray stop` would stop every Ray on the machine; stop only the processes of this cluster
  # (their command lines name its directories, ray/ and ray2/) and what they started.
  python3 - "$DIR/ray" <<'EOF'
import sys

import psutil

root = sys.argv[1]
me = {psutil.Process().pid, *(p.pid for p in psutil.Process().parents())}
procs = set()
for proc in psutil.process_iter(["cmdline"]):
    if proc.pid not in me and root in " ".join(proc.info["cmdline"] or []):
        procs.add(proc)
        try:
            procs.update(proc.children(recursive=True))
        except psutil.NoSuchProcess:
            pass
for proc in procs:
    try:
        proc.terminate()
    except psutil.NoSuchProcess:
        pass
_, alive = psutil.wait_procs(procs, timeout=10)
for proc in alive:
    try:
        proc.kill()
    except psutil.NoSuchProcess:
        pass
print(f"stopped {len(procs)} process(es) of the cluster in {root}")
EOF
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
