#!/usr/bin/env bash
# bf16 next to f32, tome next to PyTorch, side by side in rounds on this machine: dense attention
# (SDPA), Longformer-pattern window attention (transformers' LongformerSelfAttention) and the
# whole book (sentence-transformers on isolated 256-token chunks against tome's late chunking),
# each in f32 and in bf16. Writes docs/bench/bf16.json and a Markdown table, docs/bench/bf16.md.
# Not part of CI; needs the benchmark venv of scripts/bench/run.sh.
#   scripts/bench/bf16.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
venv="${TOME_BENCH_VENV:-$HOME/.venvs/tome-bench}"
py="$venv/bin/python"
[ -x "$py" ] || { echo "make the venv first: scripts/bench/run.sh does" >&2; exit 1; }
scripts/fetch_data.sh
cargo build --release --locked -q -p tome-cli
tome=target/release/tome
out=$(mktemp -d)
cases=("dense 4096" "dense-bf16 4096" "dense 16384" "dense-bf16 16384" "longformer 4096" "longformer-bf16 4096"
  "longformer 16384" "longformer-bf16 16384" "book 0" "book-bf16 0")
for round in $(seq 1 "${TOME_BENCH_ROUNDS:-2}"); do
  for c in "${cases[@]}"; do
    read -r name tokens <<< "$c"
    sides=(tome reference)
    [ $((round % 2)) -eq 1 ] || sides=(reference tome)
    for side in "${sides[@]}"; do
      if [ "$side" = tome ]; then
        "$tome" bench case "$name" --tokens "$tokens" | tail -n 1 | sed 's/^{/{"side":"tome",/' >> "$out/all.jsonl"
      else
        "$py" scripts/bench/reference.py case "$name" "$tokens" | tail -n 1 | sed 's/^{/{"side":"reference",/' >> "$out/all.jsonl"
      fi
      echo "$side (round $round) $(tail -n 1 "$out/all.jsonl")" >&2
    done
  done
done
"$py" - "$out/all.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
best = {}
for r in rows:
    key = (r["side"], r["case"], r["tokens"] if not r["case"].startswith("book") else 0)
    if key not in best or r["seconds"] < best[key]["seconds"]:
        best[key] = r
json.dump(sorted(best.values(), key=lambda r: (r["case"], r["tokens"], r["side"])), open("docs/bench/bf16.json", "w"), indent=2)
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
flags = open("/proc/cpuinfo").read()
kinds = [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
lines = [f"# bf16 against f32, tome against PyTorch", "",
         f"`scripts/bench/bf16.sh`: {cpu}, {len([l for l in flags.splitlines() if l.startswith('processor')])} threads, bf16 instructions: {', '.join(kinds) or 'none'}.",
         "Fastest of the rounds, each side in its own process, the sides alternating.", "",
         "| case | tokens | PyTorch f32 | PyTorch bf16 | tome f32 | tome bf16 | tome bf16 vs PyTorch bf16 |", "|---|---|---|---|---|---|---|"]
for case in ("dense", "longformer", "book"):
    sizes = sorted({k[2] for k in best if k[1] == case})
    for n in sizes:
        get = lambda side, c: best.get((side, c, n), {}).get("seconds")
        ref32, ref16, t32, t16 = get("reference", case), get("reference", case + "-bf16"), get("tome", case), get("tome", case + "-bf16")
        tokens = best.get(("tome", case, n), {}).get("tokens", n)
        fmt = lambda s: f"{s:.3f} s" if s else "—"
        ratio = f"{ref16 / t16:.2f}x" if ref16 and t16 else "—"
        lines.append(f"| {case} | {tokens} | {fmt(ref32)} | {fmt(ref16)} | {fmt(t32)} | {fmt(t16)} | {ratio} |")
open("docs/bench/bf16.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
