#!/usr/bin/env bash
# Runs every test of the workspace: unit tests, openraft's storage suite on the RocksDB store, the
# cluster tests (real replica processes on loopback), the AWS tests (the real SDK against moto), doc tests, and a short benchmark smoke run.
# Installs what a fresh Debian machine lacks. Usage: bash deploy/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source deploy/lib/common.sh
# The tests' CLI calls name their servers and credentials: a context of this machine's own
# configuration (deploy/local-cluster.sh writes one) must not slip a CA into them.
export TITUS_CLI_CONFIG="${TMPDIR:-/tmp}/titus-test-config-none.toml"
rm -f "$TITUS_CLI_CONFIG"
unset TITUS_CONTEXT
ensure_packages "${BUILD_PACKAGES[@]}" "${TEST_PACKAGES[@]}"
ensure_moto
ensure_grpc_tools

# Formatting first: it fails in a second, before a build that can take minutes.
cargo fmt --all -- --check
bash deploy/build-test-image.sh
cargo build --workspace --all-targets
# The container images of the compose stack, from the debug binaries just built (the compose test
# uses them; deploy/build-images.sh alone builds release ones), and the AWS template, linted.
bash deploy/build-images.sh --profile debug --no-build
bash deploy/aws/validate.sh
# Both compose variants must parse (the 3-replica stack runs in the compose test).
docker-compose -f deploy/compose/docker-compose.yml config -q
docker-compose -f deploy/compose/docker-compose.yml -f deploy/compose/docker-compose.5.yml config -q
cargo test --workspace --doc
# Chaos labs (network namespaces) a killed test run may have left on this machine.
"$CARGO_TARGET_DIR/debug/titus-chaos" lab sweep

# The benchmark must keep working; the short mode proves it, the README has the full run.
"$CARGO_TARGET_DIR/debug/titus-bench" --seconds 1 --clients 1,16 --kills 2 >/dev/null
# The placement run at the gate's fleet size: 10,000 simulated agents must all register (a connection
# cap once stopped the million-task run at 4,095), and every task is placed although a follower is
# wiped and restarted halfway (that once stalled placements for good). About 2 minutes.
"$CARGO_TARGET_DIR/debug/titus-bench" --scheduler-core 1000,10000 --placement 10000,20000 --wipe-follower-at 10000 --placement-limit 400 >/dev/null
echo "bench smoke run: ok"

# The fuzz targets, 30 s each from the corpus in the repo: zero crashes (fuzz/run.sh 600 is the long run).
bash fuzz/run.sh 30

# Last, so that its summary closes the output.
if command -v cargo-nextest >/dev/null 2>&1; then
    cargo nextest run --workspace --no-fail-fast
else
    cargo test --workspace --no-fail-fast
fi
