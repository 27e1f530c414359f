#!/usr/bin/env bash
# The compose stack's private CA and certificates, made with `titus certs init` into
# deploy/compose/tls (or $TITUS_TLS_DIR), which the compose files mount read-only at /etc/titus/tls:
# replicas 1-5 (names replica-N, localhost, 127.0.0.1), agents ${TITUS_AGENT_PREFIX}agent-1 and -2,
# and the client `admin` (an admin in cluster-N.toml; the CLI inside the replica containers uses it).
# An existing CA is kept; the other certificates are issued again. Run before the first `up`:
#   TITUS=path/to/titus deploy/compose/make-certs.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
DIR="${TITUS_TLS_DIR:-$here/tls}"
TITUS="${TITUS:-$(command -v titus || echo "${CARGO_TARGET_DIR:-$HOME/.cache/titus-target}/debug/titus")}"
prefix="${TITUS_AGENT_PREFIX:-}"
"$TITUS" certs init "$DIR" --replicas 1,2,3,4,5 --agents "${prefix}agent-1,${prefix}agent-2" --clients admin \
    --hosts localhost,127.0.0.1,replica-1,replica-2,replica-3,replica-4,replica-5 >/dev/null
# The replicas run as user titus (uid 10001) and must read their keys; the agents run as root.
chown -R 10001:10001 "$DIR"
echo "certificates for the compose stack in $DIR"
