#!/usr/bin/env bash
# The benchmark suite, side by side: tome (`tome bench case`, every case of `tome bench list`) and what users run instead
# (scripts/bench/reference.py: PyTorch SDPA, transformers' Longformer/BigBird/Reformer attention,
# performer-pytorch, sentence-transformers), on this machine with the same thread count, then
# one table of ratios and a log-log plot in docs/bench/. Not part of CI (a smoke run of tome's
# side is). Takes about half an hour on 2 cores plus the one-time venv install.
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
# Rounds, each taking the cases in turn, each tome case next to its reference (where there is
# one): a shared machine's slow spells then fall on both sides of a comparison, not on
# one side's whole suite, and one slow spell cannot decide a ratio alone, for the report keeps
# each side's fastest round. Comparisons run TOME_BENCH_ROUNDS rounds (default 2); the
# length-scaling cases (tome alone) TOME_BENCH_SCALING_ROUNDS (default 3), as a fitted exponent
# compares sizes measured minutes apart.
"$py" scripts/bench/reference.py list "$@" > "$out/reference-cases"
"$tome" bench list "$@" > "$out/cases"
rounds="${TOME_BENCH_ROUNDS:-2}"
scaling_rounds="${TOME_BENCH_SCALING_ROUNDS:-3}"
for round in $(seq 1 $((rounds > scaling_rounds ? rounds : scaling_rounds))); do
  while read -r name tokens; do
    case "$name" in
      fma-peak) [ "$round" -eq 1 ] || continue ;;
      scaling-*) [ "$round" -le "$scaling_rounds" ] || continue ;;
      *) [ "$round" -le "$rounds" ] || continue ;;
    esac
    # Which side goes first alternates from round to round, so that whatever the case before
    # leaves behind (a heavy reference process, a cold cache) falls on each side alike.
    sides=(tome reference)
    [ $((round % 2)) -eq 1 ] || sides=(reference tome)
    for side in "${sides[@]}"; do
      if [ "$side" = tome ]; then
        "$tome" bench case "$name" --tokens "$tokens" >> "$out/tome.jsonl"
        echo "tome      (round $round) $(tail -n 1 "$out/tome.jsonl")" >&2
      elif grep -qx "$name $tokens" "$out/reference-cases"; then
        "$py" scripts/bench/reference.py case "$name" "$tokens" >> "$out/reference.jsonl"
        echo "reference (round $round) $(tail -n 1 "$out/reference.jsonl")" >&2
      fi
    done
  done < "$out/cases"
done
"$py" scripts/bench/report.py --tome "$out/tome.jsonl" --reference "$out/reference.jsonl" --out docs/bench
