#!/usr/bin/env bash
# Rolling upgrade (or restart) of the compose stack's control plane: one replica at a time, each
# recreated from the image tag in TITUS_IMAGE_TAG (default latest) and waited for until healthy
# (it knows the leader and has caught up) before the next; the leader last, after leadership has
# been moved away with `titus cluster step-down`. Clients see no failed request: writes and reads
# wait out the one election (about a second) within the SDK's retries.
#
# Usage: deploy/compose/rolling-upgrade.sh [-p PROJECT] [-f COMPOSE_FILE]...
#   TITUS_IMAGE_TAG=v2 deploy/compose/rolling-upgrade.sh -p titus
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
PROJECT=titus
FILES=()
while [ $# -gt 0 ]; do
    case "$1" in
        -p) PROJECT="$2"; shift 2 ;;
        -f) FILES+=(-f "$2"); shift 2 ;;
        *) echo "usage: $0 [-p PROJECT] [-f COMPOSE_FILE]..." >&2; exit 2 ;;
    esac
done
[ "${#FILES[@]}" -gt 0 ] || FILES=(-f "$here/docker-compose.yml")

compose() { docker-compose -p "$PROJECT" "${FILES[@]}" "$@"; }
mapfile -t REPLICAS < <(compose config --services | grep '^replica-' | sort)
SERVERS="$(printf '%s:8001,' "${REPLICAS[@]}")"
SERVERS="${SERVERS%,}"

# The titus CLI inside a running replica's container (the stack's names resolve there).
titus_via() { compose exec -T "$1" titus --server "$SERVERS" "${@:2}"; }

health() { docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}' "$(compose ps -q "$1")" 2>/dev/null || echo missing; }

wait_healthy() {
    local deadline=$((SECONDS + ${TITUS_UPGRADE_WAIT_SECONDS:-180}))
    until [ "$(health "$1")" = healthy ]; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo "$1 is not healthy after ${TITUS_UPGRADE_WAIT_SECONDS:-180} s; stopping the upgrade here" >&2
            compose logs --tail 30 "$1" >&2
            exit 1
        fi
        sleep 1
    done
}

# The leader's service name, asked of a healthy replica other than $1.
leader_service() {
    local via id
    for via in "${REPLICAS[@]}"; do
        [ "$via" != "${1:-}" ] && [ "$(health "$via")" = healthy ] || continue
        id="$(titus_via "$via" -o json cluster status | sed -n 's/.*"leaderId": \([0-9]*\).*/\1/p' | head -1)"
        if [ -n "$id" ] && [ "$id" != 0 ]; then
            echo "replica-$id"
            return
        fi
    done
    echo "no healthy replica knows a leader" >&2
    return 1
}

recreate() {
    echo "upgrading $1"
    compose up -d --no-deps --force-recreate "$1" >/dev/null
    wait_healthy "$1"
    echo "$1 is healthy"
}

for r in "${REPLICAS[@]}"; do wait_healthy "$r"; done
last="$(leader_service)"
echo "leader: $last; it goes last"
for r in "${REPLICAS[@]}"; do
    [ "$r" = "$last" ] || recreate "$r"
done
# Hand leadership over first if it still leads (it may have moved meanwhile, to an upgraded replica).
if [ "$(leader_service)" = "$last" ]; then
    other="$(printf '%s\n' "${REPLICAS[@]}" | grep -vx "$last" | head -1)"
    echo "moving leadership away from $last"
    titus_via "$other" cluster step-down --timeout 10s
fi
recreate "$last"
echo "rolling upgrade done; leader now: $(leader_service)"
