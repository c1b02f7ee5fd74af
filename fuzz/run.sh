#!/usr/bin/env bash
# Runs every fuzz target for SECONDS (default 60) each, without cargo-fuzz: builds the targets
# with nightly and the same sanitizer-coverage flags cargo-fuzz uses, then runs libFuzzer with
# a scratch corpus first (new inputs go there) and the checked-in corpus second.
#   fuzz/run.sh [SECONDS] [TARGET...]
# Crashes are written to fuzz/artifacts/<target>-*. To fold new coverage into the checked-in
# corpus: fuzz/target/x86_64-unknown-linux-gnu/release/<target> -merge=1 fuzz/corpus/<target> <scratch>
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(task_record log_entry meta keys envelope)
triple=x86_64-unknown-linux-gnu
RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks" \
  cargo +nightly build --release --target "$triple" --bins
mkdir -p artifacts
failed=0
for t in "${targets[@]}"; do
  scratch=$(mktemp -d)
  echo "== $t (${secs}s)"
  if ! "target/$triple/release/$t" "$scratch" "corpus/$t" -max_total_time="$secs" -max_len=4096 \
      -rss_limit_mb=2048 -artifact_prefix="artifacts/$t-" > "$scratch.log" 2>&1; then
    failed=1
    tail -40 "$scratch.log"
  fi
  grep -E "Done [0-9]+ runs" "$scratch.log" || true
  rm -rf "$scratch" "$scratch.log"
done
exit $failed
