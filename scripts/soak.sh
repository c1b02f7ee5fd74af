#!/usr/bin/env bash
# Crash-safety soak: the SIGKILL loop of tests/crash.rs (`kill_loop`) for thousands of cycles,
# in release mode.
#
#   scripts/soak.sh [CYCLES] [SEED]
#
# CYCLES defaults to 2000. SEED defaults to a random one; it is printed first, and a failure
# prints it again with the failing cycle. Replay a failure with: scripts/soak.sh CYCLES SEED
# (the kill instants, workload and durability modes replay exactly; thread timing does not).
set -euo pipefail
cd "$(dirname "$0")/.."

cycles="${1:-2000}"
seed="${2:-${OMNIQ_CRASH_SEED:-$(od -An -N8 -tu8 /dev/urandom | tr -d ' ')}}"

echo "soak: OMNIQ_CRASH_CYCLES=$cycles OMNIQ_CRASH_SEED=$seed"
start=$(date +%s)
OMNIQ_CRASH_CYCLES="$cycles" OMNIQ_CRASH_SEED="$seed" \
    cargo test --release --test crash -- --exact kill_loop --nocapture
echo "soak: $cycles cycles passed in $(( $(date +%s) - start )) s (seed $seed)"
