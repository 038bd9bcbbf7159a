#!/usr/bin/env bash
# Runs every fuzz target for N seconds each (default 20). Needs nightly and
# cargo-fuzz (`cargo install cargo-fuzz`).
set -euo pipefail
seconds="${1:-20}"
cd "$(dirname "$0")"
for target in frame_decode message_validate handshake node_apply; do
    echo "== $target (${seconds}s)"
    cargo +nightly fuzz run "$target" -- -max_total_time="$seconds"
done

# arena_file mutates a valid arena, too big to check in: the target writes
# it into its corpus first (a run of no inputs), and every input may be as
# long as it (libFuzzer's default cap is 1 MiB).
echo "== arena_file (${seconds}s)"
export SESSIO_FUZZ_ARENA_SEED="$PWD/corpus/arena_file"
cargo +nightly fuzz run arena_file -- -runs=0
max_len="$(stat -c %s "$SESSIO_FUZZ_ARENA_SEED/seed-small-arena")"
cargo +nightly fuzz run arena_file -- -max_total_time="$seconds" -max_len="$max_len"

echo "fuzz smoke: all targets ran ${seconds}s without a finding"
