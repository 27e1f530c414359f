#!/usr/bin/env bash
# Builds the local test image `titus/busybox:latest` without any registry: Debian's busybox-static
# in a one-binary rootfs, `docker import`ed. Idempotent: does nothing when the image exists at this
# script's VERSION (raise it when the applets change, so an older image is rebuilt).
set -euo pipefail
IMAGE="${TITUS_TEST_IMAGE:-titus/busybox:latest}"
VERSION=3
if [ "$(docker image inspect --format '{{index .Config.Labels "titus.test-image"}}' "$IMAGE" 2>/dev/null)" = "$VERSION" ]; then
    exit 0
fi
if ! dpkg -s busybox-static >/dev/null 2>&1; then
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq busybox-static >/dev/null
fi
root="$(mktemp -d)"
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/bin" "$root/tmp" "$root/etc"
cp /bin/busybox "$root/bin/busybox"
# ping (ICMP datagram sockets, no privilege) and arping (a raw packet socket, NET_RAW) are how the
# tests tell network isolation from a missing capability.
for applet in sh sleep echo cat ls true false env id hostname wget nc date ps kill ping arping ip seq test touch rm mkdir httpd; do
    ln -s busybox "$root/bin/$applet"
done
echo "root:x:0:0:root:/:/bin/sh" >"$root/etc/passwd"
tar -C "$root" -c . | docker import --change 'ENV PATH=/bin' --change 'CMD ["/bin/sh"]' \
    --change "LABEL titus.test-image=$VERSION" - "$IMAGE" >/dev/null
echo "built $IMAGE"
