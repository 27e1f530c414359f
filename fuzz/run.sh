#!/usr/bin/env bash
# Runs the fuzz targets (cargo-fuzz, libFuzzer) for a bounded time each, from the corpus kept in
# fuzz/corpus/<target>; inputs that make a target crash are written to fuzz/artifacts/<target>
# and fail the run. CI runs the short mode from deploy/test.sh.
#   bash fuzz/run.sh            30 s per target (the CI smoke run)
#   bash fuzz/run.sh 600        10 minutes per target (the long run)
#   FUZZ_MERGE=1 bash fuzz/run.sh 600   also folds new coverage into fuzz/corpus (then commit it)
# The machine has only a stable toolchain: RUSTC_BOOTSTRAP=1 lets it take the nightly flags
# cargo-fuzz passes (-Zsanitizer=address and friends).
set -euo pipefail
cd "$(dirname "$0")"
SECONDS_PER_TARGET="${1:-30}"
export RUSTC_BOOTSTRAP=1
# Outside the clone and kept between runs, like the workspace's target dir.
export CARGO_TARGET_DIR="${TITUS_FUZZ_TARGET_DIR:-$HOME/.cache/titus-fuzz-target}"
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi
for target in job_descriptor agent_message raft_entry; do
    mkdir -p "corpus/$target"
    # Runs grow a scratch copy: the corpus in the repo changes only by an explicit merge.
    scratch="$(mktemp -d)"
    cp -r "corpus/$target/." "$scratch/"
    log="$scratch.log"
    status=0
    cargo fuzz run --sanitizer address "$target" "$scratch" -- \
        -max_total_time="$SECONDS_PER_TARGET" -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1 \
        >"$log" 2>&1 || status=$?
    grep -E "^(stat::number_of_executed_units|stat::peak_rss_mb|#[0-9]+ *DONE|==[0-9]+==ERROR|SUMMARY)|panicked" "$log" || tail -20 "$log"
    if [ "${FUZZ_MERGE:-0}" = 1 ]; then
        cargo fuzz cmin "$target" "$scratch" >/dev/null 2>&1 || true
        rm -rf "corpus/$target" && mkdir -p "corpus/$target" && cp -r "$scratch/." "corpus/$target/"
    fi
    rm -rf "$scratch" "$log"
    if [ "$status" -ne 0 ]; then
        echo "fuzz target $target FAILED (exit $status); the input is in fuzz/artifacts/$target" >&2
        exit 1
    fi
    echo "fuzz target $target: ${SECONDS_PER_TARGET}s, no crash"
done
