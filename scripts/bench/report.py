#!/usr/bin/env python3
"""Merges tome's and the references' benchmark records into one table of ratios (Markdown and
JSON) and a log-log plot of time and peak memory against tokens.

    python scripts/bench/report.py --tome tome.json --reference reference.json --out docs/bench
    python scripts/bench/report.py --scaling records.jsonl      # length-scaling table only
"""
import argparse
import json
import math
import os
import platform
import subprocess

REFERENCE_NAMES = {
    "dense": "PyTorch scaled_dot_product_attention",
    "dense-causal": "PyTorch scaled_dot_product_attention (causal)",
    "longformer": "transformers LongformerSelfAttention",
    "bigbird": "transformers BigBirdBlockSparseAttention",
    "reformer-lsh": "transformers LSHSelfAttention",
    "performer": "performer-pytorch FastAttention",
    "book": "sentence-transformers, isolated 256-token chunks",
}


def exponent(rows):
    xs = [math.log(r["tokens"]) for r in rows]
    ys = [math.log(r["seconds"]) for r in rows]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def fastest_rounds(records):
    """One record per (case, tokens) where rounds repeated it: the fastest round's record (its
    time, and the GFLOP/s and FMA peak measured with it), the highest memory of all rounds, and
    how many rounds there were."""
    merged = {}
    for r in records:
        key = (r["case"], r["tokens"])
        m = merged.get(key)
        if m is None:
            merged[key] = dict(r, rounds=r.get("rounds", 1))
            continue
        memory = {mem: max(m[mem], r[mem]) for mem in ("peak_rss_mb", "peak_increment_mb")}
        merged[key] = dict(r if r["seconds"] < m["seconds"] else m, rounds=m["rounds"] + r.get("rounds", 1), **memory)
    return list(merged.values())


def scaling_table(records):
    lines = ["| family | tokens | seconds (fastest round) | rounds | peak RSS (MB) |", "|---|---|---|---|---|"]
    fits = []
    records = fastest_rounds(r for r in records if r["case"].startswith("scaling-"))
    for fam in dict.fromkeys(r["case"] for r in records):
        rows = sorted((r for r in records if r["case"] == fam), key=lambda r: r["tokens"])
        for r in rows:
            lines.append(f"| {fam[len('scaling-'):]} | {r['tokens']} | {r['seconds']:.3f} | {r['rounds']} | {r['peak_rss_mb']:.0f} |")
        if len(rows) >= 2:
            fits.append((fam[len("scaling-"):], exponent(rows), rows[-1]))
    lines += ["", "| family | fitted exponent | tokens at largest | peak RSS there (MB) |", "|---|---|---|---|"]
    lines += [f"| {f} | {k:.3f} | {r['tokens']} | {r['peak_rss_mb']:.0f} |" for f, k, r in fits]
    return "\n".join(lines), [{"family": f, "exponent": k} for f, k, _ in fits]


def machine():
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def records(path):
    """The records of a file: one JSON array, or one JSON record per line (other lines skipped)."""
    text = open(path).read()
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip().startswith("{")]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tome")
    ap.add_argument("--reference")
    ap.add_argument("--out")
    ap.add_argument("--scaling")
    a = ap.parse_args()
    if a.scaling:
        print(scaling_table(records(a.scaling))[0])
        return
    tome = fastest_rounds(records(a.tome))
    ref = {(r["case"], r["tokens"]): r for r in fastest_rounds(records(a.reference))}
    peak = next((r["gflops"] for r in tome if r["case"] == "fma-peak"), None)
    rows, table = [], ["| case | tokens | tome s | reference s | speed-up | tome GFLOP/s (% of the FMA peak around the run) | tome peak +MB | reference peak +MB | reference |",
                       "|---|---|---|---|---|---|---|---|---|"]
    for r in tome:
        if r["case"] not in REFERENCE_NAMES:
            continue
        key = (r["case"], r["tokens"]) if r["case"] != "book" else next((k for k in ref if k[0] == "book"), None)
        x = ref.get(key) if key else None
        speedup = x["seconds"] / r["seconds"] if x else None
        if r["case"] == "book" and x:
            speedup = (r["tokens"] / r["seconds"]) / (x["tokens"] / x["seconds"])  # tokens/s ratio
        # Against the peak measured around the run itself where the record has one.
        run_peak = r.get("fma_peak_gflops") or peak
        gf = f"{r['gflops']:.1f} ({100 * r['gflops'] / run_peak:.0f}% of {run_peak:.0f})" if r.get("gflops") and run_peak else ""
        table.append(f"| {r['case']} | {r['tokens']} | {r['seconds']:.3f} | {x['seconds']:.3f} | {speedup:.2f}× | {gf} | {r['peak_increment_mb']:.0f} | {x['peak_increment_mb']:.0f} | {REFERENCE_NAMES[r['case']]} |"
                     if x else f"| {r['case']} | {r['tokens']} | {r['seconds']:.3f} | — | — | {gf} | {r['peak_increment_mb']:.0f} | — | {REFERENCE_NAMES[r['case']]} |")
        rows.append({"case": r["case"], "tokens": r["tokens"], "tome": r, "reference": x, "speedup": speedup})
    rounds = max((r["rounds"] for r in tome if r["case"] in REFERENCE_NAMES), default=1)
    scaling_md, fits = scaling_table(tome)
    md = "\n".join([
        "# Benchmarks", "",
        f"Machine: {machine()}. Measured FMA peak: {peak:.0f} GFLOP/s (f32) at the start of the run; cases with a FLOP count"
        " measure it again just before and after each timed run and are read against the higher of the two around"
        " their fastest run." if peak else f"Machine: {machine()}.",
        f"Each case ran in its own process, with the same thread count on both sides, in {rounds} rounds that each took every",
        "case in turn, tome's run and its reference's next to each other, which first alternating from round to round.",
        "A round reports the fastest of 3 runs in its process;",
        "each side's time is its fastest round and its memory the highest of all; speed-up is reference time / tome time",
        "(for the book: tome tokens/s / reference tokens/s); peak +MB is the resident-memory high-water mark above the",
        "process's memory before the timed call. Produced by scripts/bench/run.sh.", "",
        *table, "", "## Length scaling (tome, one rank, 2 heads × 16)", "",
        "Each size ran in its own process, in rounds that took every size in turn. Every timed run covers 1M tokens",
        "(a smaller size repeats its call: 16 times at 64k), so runs last alike at every size; a round reports the",
        "fastest of at least 3 runs (or of 2 seconds of runs), per call. A size's time is its fastest round, and the",
        "exponent is fitted to those.", "",
        scaling_md, "", "![time and peak memory against tokens](bench.png)", "",
        # What the numbers mean and what bounds them is written by hand, beside the table.
        "Notes on the latest run (goals met and missed, profiles, what bounds each): [NOTES.md](NOTES.md).", ""])
    os.makedirs(a.out, exist_ok=True)
    open(os.path.join(a.out, "README.md"), "w").write(md)
    json.dump({"machine": machine(), "fma_peak_gflops": peak, "comparisons": rows, "scaling": fits}, open(os.path.join(a.out, "bench.json"), "w"), indent=2)
    plot(tome, list(ref.values()), os.path.join(a.out, "bench.png"))
    print(md)


def plot(tome, ref, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (t_ax, m_ax) = plt.subplots(1, 2, figsize=(13, 5))
    # One colour per case: tome solid with circles, its reference dashed with squares.
    cases = list(dict.fromkeys(r["case"] for r in tome + ref if r["tokens"] > 0))
    colour = {c: plt.get_cmap("tab20")(i % 20) for i, c in enumerate(cases)}
    for side, records, style in (("tome", tome, "-o"), ("reference", ref, "--s")):
        for case in dict.fromkeys(r["case"] for r in records):
            rows = sorted((r for r in records if r["case"] == case and r["tokens"] > 0), key=lambda r: r["tokens"])
            if len(rows) < 2:
                continue
            xs = [r["tokens"] for r in rows]
            t_ax.plot(xs, [r["seconds"] for r in rows], style, color=colour[case], label=f"{case} ({side})")
            m_ax.plot(xs, [max(r["peak_increment_mb"], 0.1) for r in rows], style, color=colour[case], label=f"{case} ({side})")
    for ax, label in ((t_ax, "seconds"), (m_ax, "peak memory increment (MB)")):
        ax.set_xscale("log"), ax.set_yscale("log"), ax.set_xlabel("tokens"), ax.set_ylabel(label), ax.grid(True, which="both", alpha=0.3)
    t_ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
