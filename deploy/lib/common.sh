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
# etcd-server: the benchmark's comparison; busybox-static: the test image; chromium: the web view's
# browser test (headless); faketime, iproute2, iptables, curl: the chaos tests (clock skew, network
# namespaces, partitions, reading a replica's clock; iptables also routes the agents' metadata addresses); debootstrap, docker-compose: the container
# images' Debian base and the compose stack.
TEST_PACKAGES=(etcd-server busybox-static chromium faketime iproute2 iptables curl debootstrap docker-compose)

# The moto server (PyPI `moto[server]`): AWS's EC2 and ELBv2 APIs in memory, for the AWS tests. They
# start their own on a free 127.0.0.1 port.
# grpcio-tools: the Titus V3 API test generates its Python client from our .proto files with it.
ensure_grpc_tools() {
    if ! python3 -c 'import grpc_tools.protoc, grpc' >/dev/null 2>&1; then
        echo "installing: grpcio-tools (pip)" >&2
        python3 -m pip install --quiet --disable-pip-version-check 'grpcio-tools>=1.60,<2'
    fi
    python3 -c 'import grpc_tools.protoc, grpc' || { echo "grpcio-tools did not install" >&2; return 1; }
}

ensure_moto() {
    if ! command -v moto_server >/dev/null 2>&1 || ! python3 -c 'import moto.server, flask' >/dev/null 2>&1; then
        echo "installing: moto[server] (pip)" >&2
        python3 -m pip install --quiet --disable-pip-version-check 'moto[server]>=5,<6'
        command -v pyenv >/dev/null 2>&1 && pyenv rehash || true
    fi
    command -v moto_server >/dev/null 2>&1 || { echo "moto_server is not on PATH after installing moto[server]" >&2; return 1; }
}
