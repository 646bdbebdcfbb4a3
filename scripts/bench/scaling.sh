#!/usr/bin/env bash
# Length scaling of the linear-cost families on one rank: each family at 64k, 256k and 1M
# tokens, each size in its own process (`tome bench case scaling-FAMILY`), in TOME_BENCH_SCALING_ROUNDS
# rounds (3), then time ∝ tokens^k fitted by least squares on log-log to each size's fastest
# round, printed as a Markdown table.
#   scripts/bench/scaling.sh [FAMILY...]     (window blocksparse favor recurrent compressive)
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --locked -q -p tome-cli
families=("$@")
[ ${#families[@]} -gt 0 ] || families=(window blocksparse favor recurrent compressive)
out=$(mktemp)
# Rounds that each take every size in turn; the table keeps each size's fastest round, so that
# one slow spell of a shared machine over one size does not bend the fit.
for round in $(seq 1 "${TOME_BENCH_SCALING_ROUNDS:-3}"); do
  for f in "${families[@]}"; do
    for n in 65536 262144 1048576; do
      target/release/tome bench case "scaling-$f" --tokens "$n" | tee -a "$out"
    done
  done
done
python3 scripts/bench/report.py --scaling "$out"
