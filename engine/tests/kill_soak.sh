#!/usr/bin/env bash
# Repeats the kill -9 test to measure how often it passes, quiet or with CPU
# hogs beside it:  engine/tests/kill_soak.sh [runs] [hogs]
# (defaults: 20 runs, 0 hogs). Runs the release and the debug build; prints
# one line per run and the pass counts. Extra environment (SESSIO_KILLS=...)
# reaches the test.
set -uo pipefail
cd "$(dirname "$0")/../.."
runs=${1:-20}
hogs=${2:-0}
hog_pids=()
cleanup() { for p in "${hog_pids[@]}"; do kill "$p" 2>/dev/null; done; }
trap cleanup EXIT
for ((h = 0; h < hogs; h++)); do
    yes > /dev/null &
    hog_pids+=($!)
done
for profile in release debug; do
    flag=$([ "$profile" = release ] && echo --release)
    bin=$(cargo test -p sessio-engine $flag --test crash --no-run --message-format=json 2>/dev/null \
        | grep -o '"executable":"[^"]*crash-[^"]*"' | tail -1 | cut -d'"' -f4)
    [ -x "$bin" ] || { echo "could not build the crash test ($profile)"; exit 2; }
    pass=0
    for ((i = 1; i <= runs; i++)); do
        out=$(RUST_BACKTRACE=0 "$bin" random_kills 2>&1)
        if grep -q "^1 passed" <<<"$out"; then
            pass=$((pass + 1))
            verdict=ok
        else
            verdict=FAILED
        fi
        summary=$(grep -o '[0-9]* collections returned [0-9]* blocks' <<<"$out")
        lost=$(grep -o 'leaked_blocks: [0-9]*' <<<"$out")
        echo "$profile run $i/$runs ($hogs hogs): $verdict; $summary; final $lost"
        [ "$verdict" = ok ] || grep -E "panicked|blocks lost|grew" <<<"$out" | head -3
    done
    echo "== $profile: $pass of $runs passed with $hogs hogs"
done
