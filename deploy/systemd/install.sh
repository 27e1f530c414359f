#!/usr/bin/env bash
# Installs Titus as systemd services on this host. Run as root:
#
#   deploy/systemd/install.sh BIN_DIR
#
# BIN_DIR holds release binaries (titus-control-plane, titus-agent, titus), e.g.
# $CARGO_TARGET_DIR/release; whichever of them are there are installed. The script:
#   - copies the binaries to /usr/local/bin (replacing a running one safely: new file, then rename);
#   - copies the units next to this script to /etc/systemd/system;
#   - copies titus.sysusers.conf to /etc/sysusers.d/titus.conf and runs systemd-sysusers, which
#     creates the system user and group `titus`;
#   - copies the config templates (deploy/control-plane.toml, deploy/agent.toml) to /etc/titus/,
#     never overwriting a config that is already there;
#   - runs systemctl daemon-reload.
# It enables and starts nothing. Next: edit /etc/titus/control-plane.toml (node-id, listen
# addresses, initial-members) or /etc/titus/agent.toml (agent-id, servers), then
#   systemctl enable --now titus-control-plane     # on a replica host
#   systemctl enable --now titus-agent             # on an agent host (needs Docker)
# After an upgrade (re-running this script), `systemctl restart` the services, one replica at a
# time. Safe to re-run. The CloudFormation template (deploy/aws/titus.yaml) runs it at first boot.
#
# The tests never run it (they only check its syntax with `bash -n`).
set -euo pipefail

usage() { echo "usage: $0 BIN_DIR" >&2; exit 2; }
[ "$#" -eq 1 ] || usage
bin_dir=$1
[ -d "$bin_dir" ] || { echo "$0: $bin_dir: not a directory" >&2; exit 2; }
[ "$(id -u)" -eq 0 ] || { echo "$0: must run as root" >&2; exit 1; }

here=$(cd "$(dirname "$0")" && pwd)
templates=$(dirname "$here")

installed=0
for name in titus-control-plane titus-agent titus; do
    [ -f "$bin_dir/$name" ] || continue
    install -m 0755 "$bin_dir/$name" "/usr/local/bin/.$name.new"
    mv -f "/usr/local/bin/.$name.new" "/usr/local/bin/$name"
    echo "installed /usr/local/bin/$name"
    installed=$((installed + 1))
done
[ "$installed" -gt 0 ] || { echo "$0: no titus binaries in $bin_dir" >&2; exit 1; }

for unit in titus-control-plane.service titus-agent.service; do
    install -m 0644 "$here/$unit" "/etc/systemd/system/$unit"
done

install -d -m 0755 /etc/sysusers.d
install -m 0644 "$here/titus.sysusers.conf" /etc/sysusers.d/titus.conf
systemd-sysusers /etc/sysusers.d/titus.conf

# Configs: owned by root (the services cannot change them), readable by group titus, no one else.
install -d -m 0755 /etc/titus
for config in control-plane.toml agent.toml; do
    if [ -e "/etc/titus/$config" ]; then
        echo "kept /etc/titus/$config (already there; compare with $templates/$config)"
    else
        install -m 0640 -o root -g titus "$templates/$config" "/etc/titus/$config"
        echo "installed /etc/titus/$config (a template: edit it before starting the service)"
    fi
done

systemctl daemon-reload
echo "done: edit /etc/titus/*.toml, then systemctl enable --now titus-control-plane (or titus-agent)"
