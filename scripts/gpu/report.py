#!/usr/bin/env python3
"""The GPU check's results: one JSON file of everything, and the Markdown made from it.

    python3 scripts/gpu/report.py merge OUT          # OUT/parts/* -> OUT/gpu-check.json + .md
    python3 scripts/gpu/report.py render FILE.json [--md FILE.md]   # Markdown (stdout without --md)

`merge` reads what scripts/gpu-check.sh's steps left in OUT/parts (env.json, libs.json,
tests.json, checkpoints.jsonl, exactness.json, timings.json, steps.jsonl); a missing part is
recorded as missing. Empty cells stay empty: nothing is estimated. Needs only the standard library.
"""
import argparse
import json
import os
import sys
import time

GOAL_TEXT = {"gpu-dense-bf16": "≥ 0.7x SDPA flash", "gpu-longformer": "≥ 10x", "gpu-book": "≥ 1x"}


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return {"missing": os.path.basename(path)}
    except ValueError as e:
        return {"unreadable": f"{os.path.basename(path)}: {e}"}


def read_jsonl(path):
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line.startswith("{"):
                    try:
                        rows.append(json.loads(line))
                    except ValueError:
                        rows.append({"unreadable": line[:200]})
    return rows


def merge(out):
    parts = os.path.join(out, "parts")
    result = {
        "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "steps": read_jsonl(os.path.join(parts, "steps.jsonl")),
        "environment": read_json(os.path.join(parts, "env.json")),
        "libraries": read_json(os.path.join(parts, "libs.json")),
        "tests": read_json(os.path.join(parts, "tests.json")).get("tests", []),
        "checkpoints": read_jsonl(os.path.join(parts, "checkpoints.jsonl")),
    }
    exactness = read_json(os.path.join(parts, "exactness.json"))
    result["exactness"] = exactness.get("exactness", [])
    result["tolerances"] = {"golden": exactness.get("tolerance_golden"), "ranks": exactness.get("tolerance_ranks")}
    result["timings"] = read_json(os.path.join(parts, "timings.json")).get("timings", [])
    with open(os.path.join(out, "gpu-check.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(out, "gpu-check.md"), "w") as f:
        f.write(markdown(result))


# --- Markdown -------------------------------------------------------------------------------

def cell(value, fmt=None):
    if value is None or value == "":
        return ""
    if fmt and isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, fmt)
    return str(value).replace("|", "\\|").replace("\n", " ")


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) if rows else "(none)"


def environment_line(env, libs):
    gpus = env.get("gpus") or []
    parts = []
    for g in gpus:
        parts.append(", ".join(v for v in g.values() if v))
    if not gpus:
        parts.append(f"no GPU listed ({env.get('nvidia_smi', 'nvidia-smi not run')})")
    for key, label in (("torch", "torch"), ("torch_cuda", "CUDA (torch)"), ("transformers", "transformers"),
                       ("sentence_transformers", "sentence-transformers"), ("python", "Python")):
        if env.get(key):
            parts.append(f"{label} {env[key]}")
    for stem, path in (libs.get("libs") or {}).items():
        parts.append(f"{stem}: {path}")
    return "; ".join(parts)


def steps_table(steps):
    return table(["step", "status", "seconds"],
                 [[cell(s.get("step")), cell(s.get("status")), cell(s.get("seconds"))] for s in steps])


def tests_table(tests):
    return table(["executable", "status", "passed", "failed", "ignored", "failed tests", "seconds"],
                 [[cell(t.get("executable")), cell(t.get("status")), cell(t.get("passed")), cell(t.get("failed")),
                   cell(t.get("ignored")), cell(", ".join(t.get("failures") or [])), cell(t.get("seconds"))]
                  for t in tests])


def exactness_table(rows):
    return table(["model", "architecture", "tokens", "device", "ranks", "max abs diff vs transformers",
                  "max abs diff vs 1 rank", "status", "seconds"],
                 [[cell(r.get("model")), cell(r.get("architecture")), cell(r.get("tokens")), cell(r.get("device")),
                   cell(r.get("ranks")), cell(r.get("max_abs_diff_golden"), ".2e"), cell(r.get("max_abs_diff_1_rank"), ".2e"),
                   cell(r.get("status")), cell(r.get("seconds"))] for r in rows])


def side(record, key):
    return (record or {}).get(key)


def timing_notes(r):
    notes = []
    if r.get("status") and r["status"] not in ("ok", "incomplete"):
        notes.append(r["status"])
    for key, label in (("reference_error", "PyTorch"), ("tome_error", "tome"), ("tome_bench_error", "tome bench")):
        if r.get(key):
            notes.append(f"{label}: {r[key]}")
    for record, label in ((r.get("reference"), "PyTorch"), (r.get("tome"), "tome")):
        if side(record, "how"):
            notes.append(f"{label}: {record['how']}")
    return "; ".join(notes)


def timings_table(rows):
    def meets(r):
        return "" if "meets_goal" not in r else ("yes" if r["meets_goal"] else "no")
    return table(["case", "tokens", "PyTorch s", "tome s", "PyTorch GFLOP/s", "tome GFLOP/s",
                  "ratio (PyTorch s / tome s)", "goal", "meets goal", "notes"],
                 [[cell(r.get("case")), cell(r.get("tokens")), cell(side(r.get("reference"), "seconds"), ".4g"),
                   cell(side(r.get("tome"), "seconds"), ".4g"), cell(side(r.get("reference"), "gflops"), ".1f"),
                   cell(side(r.get("tome"), "gflops"), ".1f"), cell(r.get("ratio"), ".3g"),
                   GOAL_TEXT.get(r.get("case"), ""), meets(r), cell(timing_notes(r))] for r in rows])


def markdown(result):
    tol = result.get("tolerances") or {}
    return "\n\n".join([
        "# GPU check",
        f"Written {result.get('written', '')} by scripts/gpu-check.sh (scripts/gpu/report.py from gpu-check.json).",
        "Environment: " + environment_line(result.get("environment") or {}, result.get("libraries") or {}),
        "## Steps",
        steps_table(result.get("steps") or []),
        "## Tests",
        "Each test executable of the GPU test crates, run with `--include-ignored --test-threads=1`.",
        tests_table(result.get("tests") or []),
        "## Exactness",
        f"tome's last hidden state against transformers' on the GPU (f32, TF32 off, eager attention; "
        f"pass: max abs diff ≤ {tol.get('golden')}), and 4 ranks against 1 rank (≤ {tol.get('ranks')}). "
        "Random-weight checkpoints of real sizes from scripts/gpu/checkpoints.py.",
        exactness_table(result.get("exactness") or []),
        "## Timings",
        "Each side warmed up once, then the best of 3; ratio = PyTorch seconds / tome seconds (above 1: tome is faster).",
        timings_table(result.get("timings") or []),
    ]) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("merge")
    p.add_argument("out")
    p = sub.add_parser("render")
    p.add_argument("json")
    p.add_argument("--md")
    args = ap.parse_args()
    if args.command == "merge":
        merge(args.out)
        return
    text = markdown(read_json(args.json))
    if args.md:
        with open(args.md, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
