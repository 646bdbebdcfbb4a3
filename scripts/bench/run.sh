#!/usr/bin/env bash
# The benchmark suite, side by side: tome (`tome bench suite`) and what users run instead
# (scripts/bench/reference.py: PyTorch SDPA, transformers' Longformer/BigBird/Reformer attention,
# performer-pytorch, sentence-transformers), on this machine with the same thread count, then
# one table of ratios and a log-log plot in docs/bench/. Not part of CI (a smoke run of tome's
# side is). Takes about ten minutes on 2 cores plus the one-time venv install.
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
target/release/tome bench suite "$@" --out "$out/tome.json"
"$venv/bin/python" scripts/bench/reference.py suite "$@" --out "$out/reference.json"
"$venv/bin/python" scripts/bench/report.py --tome "$out/tome.json" --reference "$out/reference.json" --out docs/bench
