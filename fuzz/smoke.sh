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
echo "fuzz smoke: all targets ran ${seconds}s without a finding"
