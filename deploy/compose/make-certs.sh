#!/usr/bin/env bash
# The compose stack's private CA and certificates, made with `titus certs init` into
# deploy/compose/tls (or $TITUS_TLS_DIR): replicas 1-5 (names replica-N, localhost, 127.0.0.1),
# agents ${TITUS_AGENT_PREFIX}agent-1 and -2, and the client `admin` (an admin in cluster-N.toml;
# the CLI inside the replica containers uses it). Each container mounts only its own folder,
# tls/replica-N or tls/agent-N, holding the CA certificate and its own certificate and key; the CA
# key never leaves tls/. An existing CA is kept; the other certificates are issued again and
# replaced in place (written aside and renamed), which running containers pick up.
#   TITUS=path/to/titus deploy/compose/make-certs.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
DIR="${TITUS_TLS_DIR:-$here/tls}"
TITUS="${TITUS:-$(command -v titus || echo "${CARGO_TARGET_DIR:-$HOME/.cache/titus-target}/debug/titus")}"
prefix="${TITUS_AGENT_PREFIX:-}"
"$TITUS" certs init "$DIR" --replicas 1,2,3,4,5 --agents "${prefix}agent-1,${prefix}agent-2" --clients admin \
    --hosts localhost,127.0.0.1,replica-1,replica-2,replica-3,replica-4,replica-5 >/dev/null

# One folder per container. The replicas run as user titus (uid 10001) and must read their keys;
# the agents run as root.
share() { # FOLDER FILE...
    local folder="$DIR/$1"
    shift
    install -d -m 0750 -o 10001 -g 10001 "$folder"
    for f in "$@"; do
        install -m 0600 -o 10001 -g 10001 "$DIR/$f" "$folder/.$f.tmp"
        mv -f "$folder/.$f.tmp" "$folder/$f"
    done
}
for n in 1 2 3 4 5; do
    share "replica-$n" ca.pem "replica-$n.pem" "replica-$n.key" client-admin.pem client-admin.key
done
for n in 1 2; do
    share "agent-$n" ca.pem "agent-${prefix}agent-$n.pem" "agent-${prefix}agent-$n.key"
done
chmod 0700 "$DIR"
echo "certificates for the compose stack in $DIR (one folder per container)"
