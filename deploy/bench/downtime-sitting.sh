#!/bin/bash
# One sitting of the downtime benchmark (BENCHMARKS.md): RUNS rounds, each running every
# configuration once (interleaved, so that the machine's drift spreads over all of them), every
# run's output kept in OUT, then `bmfleet-bench summarize` prints the medians, the ratios (per
# run: bmfleet against the manual procedure and the physical floor of the same run) and the
# growth with the day's changes. As root, nothing else running, after
# `cargo build --release --workspace --bins`. The arguments go to every run, e.g.
#   bash deploy/bench/downtime-sitting.sh --files 20000 --db-rows 200000
# Environment: RUNS (3), PROFILES ("clustered scattered"), LANDINGS ("last-second live"),
# CHURNS ("0.01 0.05"), OUT (bench-sitting-<time>), BIN (./target/release/bmfleet-bench).
set -euo pipefail
BIN=${BIN:-./target/release/bmfleet-bench}
RUNS=${RUNS:-3}
PROFILES=${PROFILES:-clustered scattered}
LANDINGS=${LANDINGS:-last-second live}
CHURNS=${CHURNS:-0.01 0.05}
OUT=${OUT:-bench-sitting-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT"
for run in $(seq 1 "$RUNS"); do
  for profile in $PROFILES; do
    for lands in $LANDINGS; do
      for churn in $CHURNS; do
        name="$OUT/$profile-$lands-$churn-run$run.txt"
        echo "== run $run: --db-churn $profile --day-lands $lands --churn $churn → $name"
        "$BIN" downtime --paths stream --db-churn "$profile" --day-lands "$lands" \
          --churn "$churn" "$@" > "$name" 2>&1 || { tail -20 "$name"; exit 1; }
        grep -E '^\| \(b\) bmfleet|^\| \(a\) manual|/floor' "$name" || true
      done
    done
  done
done
"$BIN" summarize "$OUT"/*.txt | tee "$OUT/summary.md"
