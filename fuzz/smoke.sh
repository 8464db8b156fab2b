#!/usr/bin/env bash
# Builds every fuzz target and runs each for FUZZ_SECONDS (default 20) from a fresh copy of its
# committed seeds, then prints executions per second per target. Exits non-zero if any target
# crashes, fails an assertion, leaks, or times out; its reproducer is left in
# fuzz/artifacts/<target>/.
#
# Debug assertions are on (-a): integer overflow and debug_assert! are findings too.
set -euo pipefail

cd "$(dirname "$0")/.."
seconds="${FUZZ_SECONDS:-20}"
logs="$(mktemp -d)"
trap 'rm -rf "$logs"' EXIT

cargo +nightly fuzz build -a
# Run the binaries just built rather than `cargo fuzz run`, which rebuilds first: every target
# then tests the same sources, even if the tree changes while the smoke run is going.
host="$(rustc +nightly -vV | sed -n 's/^host: //p')"
bin_dir="fuzz/target/$host/release"

mapfile -t targets < <(cargo +nightly fuzz list)
failed=()
for target in "${targets[@]}"; do
    corpus="$logs/corpus-$target"
    mkdir -p "$corpus"
    if [ -d "fuzz/seeds/$target" ]; then
        cp fuzz/seeds/"$target"/* "$corpus"/
    fi
    echo "== $target: ${seconds}s from $(ls "$corpus" | wc -l) seeds"
    mkdir -p "fuzz/artifacts/$target"
    if ! ASAN_OPTIONS="${ASAN_OPTIONS:-detect_odr_violation=0}" "$bin_dir/$target" "$corpus" \
        -artifact_prefix="fuzz/artifacts/$target/" -max_total_time="$seconds" -timeout=10 \
        -print_final_stats=1 >"$logs/$target.log" 2>&1; then
        failed+=("$target")
        tail -n 40 "$logs/$target.log"
    fi
done

echo
printf '%-16s %12s %10s %8s\n' target executions exec/s corpus
for target in "${targets[@]}"; do
    log="$logs/$target.log"
    runs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)"
    rate="$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)"
    size="$(ls "$logs/corpus-$target" | wc -l)"
    printf '%-16s %12s %10s %8s\n' "$target" "${runs:-?}" "${rate:-?}" "$size"
done

if [ "${#failed[@]}" -gt 0 ]; then
    echo "FAILED: ${failed[*]} (reproducers in fuzz/artifacts/)" >&2
    exit 1
fi
echo "all ${#targets[@]} targets ran ${seconds}s without a finding"
