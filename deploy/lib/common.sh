# Shared by the deploy scripts: where builds go, and the system packages a fresh machine lacks.

# One target dir outside the clone, shared by CI and local work, so builds are incremental.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/titus-target}"

# Installs the Debian packages the build and tests need, when missing:
#   libclang-dev, clang: bindgen for librocksdb-sys; etcd-server: the benchmark's comparison.
ensure_packages() {
    local missing=()
    for pkg in "$@"; do
        dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        echo "installing: ${missing[*]}" >&2
        local sudo=""
        [ "$(id -u)" -eq 0 ] || sudo="sudo"
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

BUILD_PACKAGES=(libclang-dev clang)
TEST_PACKAGES=(etcd-server busybox-static)
