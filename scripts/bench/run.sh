#!/usr/bin/env bash
# The benchmark suite, side by side: tome (`tome bench case`, every case of `tome bench list`) and what users run instead
# (scripts/bench/reference.py: PyTorch SDPA, transformers' Longformer/BigBird/Reformer attention,
# performer-pytorch, sentence-transformers), on this machine with the same thread count, then
# one table of ratios and a log-log plot in docs/bench/. Not part of CI (a smoke run of tome's
# side is). Takes about twenty minutes on 2 cores plus the one-time venv install.
#   scripts/bench/run.sh [--smoke]
set -euo pipefail
cd "$(dirname "$0")/../.."
venv="${TOME_BENCH_VENV:-$HOME/.venvs/tome-bench}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q torch transformers sentence-transformers performer-pytorch matplotlib
fi
scripts/fetch_data.sh
cargo build --release --locked -q -p tome-cli
out=$(mktemp -d)
py="$venv/bin/python"
tome=target/release/tome
# Case by case, each tome case followed at once by its reference (where there is one): a shared
# machine's slow spells then fall on both sides of a comparison, not on one side's whole suite.
"$py" scripts/bench/reference.py list "$@" > "$out/reference-cases"
"$tome" bench list "$@" > "$out/cases"
while read -r name tokens; do
  "$tome" bench case "$name" --tokens "$tokens" >> "$out/tome.jsonl"
  echo "tome      $(tail -n 1 "$out/tome.jsonl")" >&2
  if grep -qx "$name $tokens" "$out/reference-cases"; then
    "$py" scripts/bench/reference.py case "$name" "$tokens" >> "$out/reference.jsonl"
    echo "reference $(tail -n 1 "$out/reference.jsonl")" >&2
  fi
done < "$out/cases"
# The length-scaling cases (tome alone) again, in rounds that each take every size in turn: a
# fitted exponent compares sizes measured minutes apart, and one slow spell over one size bends
# it. The report keeps each size's fastest round.
for round in $(seq 2 "${TOME_BENCH_SCALING_ROUNDS:-3}"); do
  grep '^scaling-' "$out/cases" | while read -r name tokens; do
    "$tome" bench case "$name" --tokens "$tokens" >> "$out/tome.jsonl"
    echo "tome      (round $round) $(tail -n 1 "$out/tome.jsonl")" >&2
  done
done
"$py" scripts/bench/report.py --tome "$out/tome.jsonl" --reference "$out/reference.jsonl" --out docs/bench
