#!/usr/bin/env bash
# Length scaling of the linear-cost families on one rank (issue: every seed family as an exact
# sequence-parallel operator). Runs each family at 64k, 256k and 1M tokens in its own process,
# then fits time ∝ tokens^k by least squares on log-log and prints a Markdown table.
#   scripts/bench/scaling.sh [FAMILY...]
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --locked -q -p tome-dist --example scaling
families=("$@")
[ ${#families[@]} -gt 0 ] || families=(window blocksparse blocksparse-eval local favor favor-causal recurrent compressive)
out=$(mktemp)
for f in "${families[@]}"; do
  for n in 65536 262144 1048576; do
    target/release/examples/scaling "$f" "$n" | tee -a "$out"
  done
done
python3 - "$out" <<'PY'
import json, math, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print("\n| family | 64k s | 256k s | 1M s | exponent | peak RSS at 1M (MB) |")
print("|---|---|---|---|---|---|")
for fam in dict.fromkeys(r["family"] for r in rows):
    rs = sorted((r for r in rows if r["family"] == fam), key=lambda r: r["tokens"])
    xs = [math.log(r["tokens"]) for r in rs]; ys = [math.log(r["seconds"]) for r in rs]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    k = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    print(f"| {fam} | " + " | ".join(f"{r['seconds']:.2f}" for r in rs) + f" | {k:.3f} | {rs[-1]['peak_rss_mb']:.0f} |")
PY
