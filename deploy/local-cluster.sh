#!/usr/bin/env bash
# A local HA control plane on loopback: 3 replicas (peer ports 7001-7003, api ports 8001-8003).
#   deploy/local-cluster.sh up      build, start the replicas, wait for a leader, run the demo
#   deploy/local-cluster.sh status  cluster status as the replicas see it
#   deploy/local-cluster.sh down    stop the replicas (SIGTERM), keep their data
#   deploy/local-cluster.sh clean   stop and delete their data
set -euo pipefail
cd "$(dirname "$0")/.."
source deploy/lib/common.sh

DIR="${TITUS_LOCAL_DIR:-$HOME/.local/share/titus-local}"
BIN="$CARGO_TARGET_DIR/debug"
SERVERS="127.0.0.1:8001,127.0.0.1:8002,127.0.0.1:8003"
MEMBERS=(--member "1=127.0.0.1:7001/127.0.0.1:8001" --member "2=127.0.0.1:7002/127.0.0.1:8002" --member "3=127.0.0.1:7003/127.0.0.1:8003")

running() { [ -f "$DIR/replica-$1.pid" ] && kill -0 "$(cat "$DIR/replica-$1.pid")" 2>/dev/null; }

titus() { "$BIN/titus" --server "$SERVERS" "$@"; }

up() {
    ensure_packages "${BUILD_PACKAGES[@]}"
    cargo build -p titus-control-plane -p titus-client --bins
    mkdir -p "$DIR"
    for id in 1 2 3; do
        if running "$id"; then
            echo "replica $id already running (pid $(cat "$DIR/replica-$id.pid"))"
            continue
        fi
        nohup "$BIN/titus-control-plane" --node-id "$id" --data-dir "$DIR/data-$id" \
            --peer-listen "127.0.0.1:700$id" --api-listen "127.0.0.1:800$id" "${MEMBERS[@]}" \
            >>"$DIR/replica-$id.log" 2>&1 &
        echo $! >"$DIR/replica-$id.pid"
        echo "replica $id started (pid $!, log $DIR/replica-$id.log)"
    done
    echo "waiting for a leader..."
    for _ in $(seq 1 120); do
        if titus -o json cluster status 2>/dev/null | grep -q '"leaderId": [1-9]'; then break; fi
        sleep 0.5
    done
    titus cluster status
    echo
    echo "demo: a Critical-tier capacity group, replicated through Raft"
    titus capacity-group create demo-critical --tier critical --cpu 2 --memory-mb 4096 --disk-mb 10240 --network-mbps 256 --instances 4 \
        || titus capacity-group get demo-critical
    titus capacity-group list
    cat <<MSG

The cluster is up. Try:
  $BIN/titus --server $SERVERS cluster status
  kill -9 \$(cat $DIR/replica-1.pid)   # the others elect a new leader; nothing acknowledged is lost
  deploy/local-cluster.sh up            # restarts what is not running
  deploy/local-cluster.sh down          # stop (data kept in $DIR)
MSG
}

down() {
    for id in 1 2 3; do
        if running "$id"; then
            kill -TERM "$(cat "$DIR/replica-$id.pid")"
            echo "replica $id stopping"
        fi
        rm -f "$DIR/replica-$id.pid"
    done
}

case "${1:-up}" in
    up) up ;;
    down) down ;;
    status) titus cluster status ;;
    clean) down; sleep 1; rm -rf "$DIR"; echo "removed $DIR" ;;
    *) echo "usage: $0 [up|status|down|clean]" >&2; exit 2 ;;
esac
