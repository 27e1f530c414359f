#!/usr/bin/env bash
# Builds the container images with no registry:
#   titus/control-plane:TAG  titus-control-plane and the titus CLI on a Debian bookworm base
#   titus/agent:TAG          titus-agent and the titus CLI on the same base
#   titus/moto:TAG           the moto server (AWS's EC2 and ELBv2 APIs) for the compose stack
# The base is made by debootstrap from Debian's packages (minbase, plus ca-certificates and curl for
# health checks); moto is installed into its own base from wheels pip downloads on this host. Both
# bases are cached as images (titus/base:bookworm, titus/moto-base:bookworm), so a rebuild only
# copies the binaries in.
#
# Usage: deploy/build-images.sh [--profile release|debug] [--tag TAG] [--no-build]
#   --profile  which build of the binaries goes in (default release; the tests use debug, the build
#              they already have)
#   --no-build use the binaries in the target dir as they are
set -euo pipefail
cd "$(dirname "$0")/.."
source deploy/lib/common.sh

PROFILE=release
TAG="${TITUS_IMAGE_TAG:-latest}"
BUILD=1
while [ $# -gt 0 ]; do
    case "$1" in
        --profile) PROFILE="$2"; shift 2 ;;
        --tag) TAG="$2"; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        *) echo "usage: $0 [--profile release|debug] [--tag TAG] [--no-build]" >&2; exit 2 ;;
    esac
done
case "$PROFILE" in release | debug) ;; *) echo "--profile must be release or debug" >&2; exit 2 ;; esac

BINARIES=(titus-control-plane titus-agent titus)
SUITE=bookworm
MIRROR="${TITUS_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
# The service user of the images; the same uid as in the systemd units' sysusers file.
TITUS_UID=10001

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

if [ "$BUILD" = 1 ]; then
    ensure_packages "${BUILD_PACKAGES[@]}"
    if [ "$PROFILE" = release ]; then
        cargo build --release -p titus-control-plane -p titus-agent -p titus-client
    else
        # The same selection as deploy/test.sh, so the shared target dir is reused, not rebuilt.
        cargo build --workspace --all-targets
    fi
fi
for b in "${BINARIES[@]}"; do
    [ -x "$CARGO_TARGET_DIR/$PROFILE/$b" ] || { echo "missing $CARGO_TARGET_DIR/$PROFILE/$b; build it or drop --no-build" >&2; exit 1; }
done

# A debootstrap'd root file system, trimmed, imported as image $1 (once; cached as that image).
make_base() {
    local image="$1" include="$2" root="$work/root-${1//[:\/]/-}"
    if docker image inspect "$image" >/dev/null 2>&1; then
        return
    fi
    ensure_packages debootstrap
    echo "building $image with debootstrap ($SUITE, $MIRROR)" >&2
    debootstrap --variant=minbase --include="$include" "$SUITE" "$root" "$MIRROR" >"$work/debootstrap.log" 2>&1 ||
        { tail -20 "$work/debootstrap.log" >&2; return 1; }
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* \
        "$root"/usr/share/man/* "$root"/usr/share/locale/*
    if [ -n "${3:-}" ]; then "$3" "$root"; fi
    echo "titus:x:$TITUS_UID:$TITUS_UID:titus:/var/lib/titus:/usr/sbin/nologin" >>"$root/etc/passwd"
    echo "titus:x:$TITUS_UID:" >>"$root/etc/group"
    mkdir -p "$root/var/lib/titus" "$root/etc/titus"
    chown "$TITUS_UID:$TITUS_UID" "$root/var/lib/titus"
    tar --numeric-owner -C "$root" -c . | docker import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' - "$image" >/dev/null
    rm -rf "$root"
    echo "built $image" >&2
}

# moto from PyPI: downloaded here (pip's own index settings and certificates), installed offline
# into the image's Python (the same 3.11 minor version, so the same wheels).
install_moto() {
    local root="$1"
    # The host's pip picks wheels for its own Python; the image's is Debian bookworm's 3.11.
    local host image
    host="$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
    image="$(chroot "$root" python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
    if [ "$host" != "$image" ]; then
        echo "moto image: this host's python3 is $host, the image's $image; wheels would not match" >&2
        return 1
    fi
    mkdir -p "$root/tmp/wheels"
    python3 -m pip download --quiet --disable-pip-version-check 'moto[server]>=5,<6' -d "$root/tmp/wheels"
    chroot "$root" python3 -m pip install --quiet --break-system-packages --no-cache-dir --no-index \
        --find-links /tmp/wheels 'moto[server]>=5,<6'
    rm -rf "$root/tmp/wheels"
}

make_base titus/base:bookworm ca-certificates,curl
make_base titus/moto-base:bookworm ca-certificates,curl,python3,python3-pip install_moto

# An image from `base` with `files` copied into /usr/local/bin, committed with `changes`.
commit_image() {
    local base="$1" image="$2"
    shift 2
    local bin="$work/bin-${image//[:\/]/-}"
    mkdir -p "$bin"
    local changes=()
    while [ $# -gt 0 ] && [ "$1" != -- ]; do
        cp "$CARGO_TARGET_DIR/$PROFILE/$1" "$bin/$1"
        # Debug builds carry their own debug info; the image does not need it.
        strip --strip-debug "$bin/$1" 2>/dev/null || true
        shift
    done
    shift
    while [ $# -gt 0 ]; do changes+=(--change "$1"); shift; done
    local c
    c="$(docker create "$base" /bin/true)"
    for f in "$bin"/*; do docker cp "$f" "$c:/usr/local/bin/" >/dev/null; done
    docker commit "${changes[@]}" "$c" "$image" >/dev/null
    docker rm "$c" >/dev/null
    echo "built $image ($PROFILE binaries)"
}

commit_image titus/base:bookworm "titus/control-plane:$TAG" titus-control-plane titus -- \
    "USER titus" "WORKDIR /var/lib/titus" 'ENTRYPOINT ["/usr/local/bin/titus-control-plane"]' 'CMD []' \
    "EXPOSE 7001 8001 9001" "LABEL org.opencontainers.image.title=titus-control-plane"
# The agent runs as root: it talks to the Docker socket, which is root-equivalent anyway.
commit_image titus/base:bookworm "titus/agent:$TAG" titus-agent titus -- \
    'ENTRYPOINT ["/usr/local/bin/titus-agent"]' 'CMD []' "EXPOSE 9100" "LABEL org.opencontainers.image.title=titus-agent"
docker tag titus/moto-base:bookworm "titus/moto:$TAG"
echo "built titus/moto:$TAG"
