#!/usr/bin/env bash
# A local HA cluster on loopback: 3 control-plane replicas (peer ports 7001-7003, api ports
# 8001-8003) and one agent running containers in the local Docker daemon.
#   deploy/local-cluster.sh up      build, start everything, wait for a leader, run the demo jobs
#   deploy/local-cluster.sh status  cluster status as the replicas see it
#   deploy/local-cluster.sh down    stop the replicas (SIGTERM), keep their data
#   deploy/local-cluster.sh clean   stop and delete their data
# Mutual TLS: `titus certs init` makes a CA and certificates in $DIR/tls on the first `up`; the
# `titus` calls here use the admin client certificate (export the TITUS_CA/CERT/KEY lines printed
# at the end to do the same). TITUS_LOCAL_INSECURE=1 runs plaintext instead (needed by titus-chaos,
# whose deployment files carry no certificates).
set -euo pipefail
cd "$(dirname "$0")/.."
source deploy/lib/common.sh

DIR="${TITUS_LOCAL_DIR:-$HOME/.local/share/titus-local}"
BIN="$CARGO_TARGET_DIR/debug"
SERVERS="127.0.0.1:8001,127.0.0.1:8002,127.0.0.1:8003"
MEMBERS=(--member "1=127.0.0.1:7001/127.0.0.1:8001" --member "2=127.0.0.1:7002/127.0.0.1:8002" --member "3=127.0.0.1:7003/127.0.0.1:8003")

TLS="$DIR/tls"
if [ "${TITUS_LOCAL_INSECURE:-0}" = 1 ]; then
    REPLICA_SECURITY() { echo "--insecure"; }
    AGENT_SECURITY="--insecure"
else
    REPLICA_SECURITY() {
        echo "--tls-ca $TLS/ca.pem --tls-cert $TLS/replica-$1.pem --tls-key $TLS/replica-$1.key --security-config $DIR/security.toml"
    }
    AGENT_SECURITY="--tls-ca $TLS/ca.pem --tls-cert $TLS/agent-local-agent.pem --tls-key $TLS/agent-local-agent.key"
    export TITUS_CA="$TLS/ca.pem" TITUS_CERT="$TLS/client-admin.pem" TITUS_KEY="$TLS/client-admin.key"
fi

# The CA, the replicas', the agent's and the admin client's certificates, and the replicas' security
# settings (the client certificate `admin` is an admin); made once, kept across `up`s (edit
# security.toml in place: the replicas reload it).
make_certs() {
    [ "${TITUS_LOCAL_INSECURE:-0}" = 1 ] && return 0
    if [ ! -f "$TLS/ca.pem" ]; then
        "$BIN/titus" certs init "$TLS" --replicas 1,2,3 --agents local-agent --clients admin >/dev/null
        echo "certificates written to $TLS"
    fi
    # Written once: principals, tokens and revocations added to it survive `up` (replicas reload
    # it while running).
    if [ ! -f "$DIR/security.toml" ]; then
        printf '[[principals]]\nname = "admin"\nrole = "admin"\n' >"$DIR/security.toml"
    fi
}

running() { [ -f "$DIR/replica-$1.pid" ] && kill -0 "$(cat "$DIR/replica-$1.pid")" 2>/dev/null; }

titus() { "$BIN/titus" --server "$SERVERS" "$@"; }

# The command lines (no spaces inside an argument), shared by `up` and the chaos deployment file.
replica_cmd() {
    echo "$BIN/titus-control-plane --node-id $1 --data-dir $DIR/data-$1 --peer-listen 127.0.0.1:700$1" \
        "--api-listen 127.0.0.1:800$1 --admin-listen 127.0.0.1:900$1 ${MEMBERS[*]} $(REPLICA_SECURITY "$1")"
}
agent_cmd() {
    echo "$BIN/titus-agent --agent-id local-agent --servers $SERVERS --cpu 4 --memory-mb 4096" \
        "--attribute zone=local-a --admin-listen 127.0.0.1:9100 --finished-logs-dir $DIR/finished-logs $AGENT_SECURITY"
}

# A titus-chaos deployment file for this cluster: kill, pause, clock skew and agent faults work on
# it; partitions need each replica in its own network namespace (`titus-chaos lab up`).
write_chaos_deployment() {
    {
        echo "# Written by deploy/local-cluster.sh. titus-chaos -d $DIR/chaos.yaml kill --target leader"
        echo "replicas:"
        for id in 1 2 3; do
            printf "  - id: %s\n    api: 127.0.0.1:800%s\n    ip: 127.0.0.1\n    admin: 127.0.0.1:900%s\n" "$id" "$id" "$id"
            printf "    process:\n      pid_file: %s\n      restart: '%s'\n      log: %s\n" \
                "$DIR/replica-$id.pid" "$(replica_cmd "$id")" "$DIR/replica-$id.log"
        done
        echo "agents:"
        printf "  - id: local-agent\n    ip: 127.0.0.1\n    process:\n      pid_file: %s\n      restart: '%s'\n      log: %s\n" \
            "$DIR/replica-agent.pid" "$(agent_cmd)" "$DIR/agent.log"
    } >"$DIR/chaos.yaml"
}

# `titus` on the PATH (a link in ~/.local/bin) and a context `local` for this cluster, made the
# current one: `titus job list` then works as typed, in any shell.
install_cli() {
    mkdir -p "$HOME/.local/bin"
    ln -sf "$BIN/titus" "$HOME/.local/bin/titus"
    "$BIN/titus" config delete-context local >/dev/null 2>&1 || true
    if [ "${TITUS_LOCAL_INSECURE:-0}" = 1 ]; then
        "$BIN/titus" config set-context local --servers "$SERVERS" --current >/dev/null
    else
        "$BIN/titus" config set-context local --servers "$SERVERS" --ca-file "$TLS/ca.pem" \
            --cert-file "$TLS/client-admin.pem" --key-file "$TLS/client-admin.key" --current >/dev/null
    fi
}

up() {
    ensure_packages "${BUILD_PACKAGES[@]}"
    # The same selection as deploy/test.sh: another one unifies features differently and rebuilds
    # aws-sdk-ec2 (25 minutes here) instead of reusing the shared target dir.
    cargo build --workspace --all-targets
    bash deploy/build-test-image.sh
    mkdir -p "$DIR"
    make_certs
    for id in 1 2 3; do
        if running "$id"; then
            echo "replica $id already running (pid $(cat "$DIR/replica-$id.pid"))"
            continue
        fi
        # shellcheck disable=SC2046
        nohup $(replica_cmd "$id") >>"$DIR/replica-$id.log" 2>&1 &
        echo $! >"$DIR/replica-$id.pid"
        echo "replica $id started (pid $!, log $DIR/replica-$id.log)"
    done
    if running agent; then
        echo "agent already running (pid $(cat "$DIR/replica-agent.pid"))"
    else
        # shellcheck disable=SC2046
        nohup $(agent_cmd) >>"$DIR/agent.log" 2>&1 &
        echo $! >"$DIR/replica-agent.pid"
        echo "agent started (pid $!, log $DIR/agent.log)"
    fi
    write_chaos_deployment
    install_cli
    echo "waiting for a leader..."
    for _ in $(seq 1 120); do
        if titus -o json cluster status 2>/dev/null | grep -q '"leaderId": [1-9]'; then break; fi
        sleep 0.5
    done
    titus cluster status
    echo
    echo "demo: a Critical-tier capacity group, replicated through Raft"
    titus capacity-group create demo-critical --tier critical --cpu 2 --memory-mb 4096 --disk-mb 10240 --network-mbps 256 --instances 4 2>/dev/null \
        || titus capacity-group get demo-critical
    titus capacity-group list
    echo
    if titus job list --filter appName=demo-service --filter jobState=Accepted | grep -q demo-service; then
        echo "demo jobs already submitted"
    else
        echo "demo: a batch job and a service job, run by the agent in Docker"
        titus job submit --app demo-batch --image titus/busybox:latest --cpu 0.5 --memory-mb 64 --batch-size 2 -- sh -c 'echo hello from titus; sleep 5'
        titus job submit --app demo-service --image titus/busybox:latest --cpu 0.5 --memory-mb 64 --desired 2 --max 4 -- sleep 3600
    fi
    for _ in $(seq 1 60); do
        if [ "$(titus -o json job list --filter appName=demo-service | grep -c '"id"')" -ge 1 ] &&
            job=$(titus -o json job list --filter appName=demo-service --filter jobState=Accepted | sed -n 's/.*"id": "\(.*\)".*/\1/p' | head -1) &&
            [ "$(titus -o json task list "$job" | grep -c '"Started"')" -ge 2 ]; then
            break
        fi
        sleep 0.5
    done
    titus job list
    echo
    titus task list "$job"
    cat <<MSG

The cluster is up (mutual TLS unless TITUS_LOCAL_INSECURE=1). \`titus\` is linked into ~/.local/bin
and its context \`local\` (servers and the admin certificate) is the current one
(titus config get-contexts). $(case ":$PATH:" in *":$HOME/.local/bin:"*) ;; *) echo "Add ~/.local/bin to your PATH: export PATH=\$HOME/.local/bin:\$PATH";; esac)
Then try:
  titus cluster status
  titus job list
  titus task list JOB_ID
  titus task logs TASK_ID -f            # a task's output (titus job logs JOB_ID: all its tasks)
  titus task exec -it TASK_ID -- sh     # a shell in a running task's container
  titus job resize JOB_ID --desired 3
  docker ps --filter label=titus.agent.id=local-agent
  open http://127.0.0.1:9001/ui         # read-only web view (any replica: 9001-9003)
  curl -s 127.0.0.1:9001/metrics        # Prometheus metrics (agent: 127.0.0.1:9100/metrics)
  kill -9 \$(cat $DIR/replica-1.pid)   # the others elect a new leader; no container restarts
  titus audit                           # who changed what (the audit log)
  # with TITUS_LOCAL_INSECURE=1 only (chaos deployment files carry no certificates):
  $BIN/titus-chaos -d $DIR/chaos.yaml kill --target leader --restart-after 5s
  deploy/local-cluster.sh up            # restarts what is not running
  deploy/local-cluster.sh down          # stop (data kept in $DIR)
MSG
}

down() {
    for id in 1 2 3 agent; do
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
    clean)
        down
        sleep 1
        docker ps -aq --filter label=titus.agent.id=local-agent | xargs -r docker rm -f >/dev/null
        docker network ls -q --filter label=titus.agent.id=local-agent | xargs -r docker network rm >/dev/null
        # The agent's metadata routes (nat rules commented titus-metadata:local-agent), as root.
        if command -v iptables >/dev/null 2>&1; then
            iptables -w -t nat -S PREROUTING 2>/dev/null | grep 'titus-metadata:local-agent' | sed 's/^-A //; s/"//g' |
                while read -r rule; do
                    # shellcheck disable=SC2086 # the rule's words, as iptables printed them
                    iptables -w -t nat -D $rule || true
                done
        fi
        "$BIN/titus" config delete-context local >/dev/null 2>&1 || true
        rm -rf "$DIR"
        echo "removed $DIR, the context local and the agent's containers, networks and metadata routes"
        ;;
    *) echo "usage: $0 [up|status|down|clean]" >&2; exit 2 ;;
esac
