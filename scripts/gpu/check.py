#!/usr/bin/env python3
"""The steps of scripts/gpu-check.sh that produce figures; each writes one JSON file, and a step
that breaks records why in it rather than losing the others' rows.

    check.py env OUT.json                         GPU (nvidia-smi), Python packages
    check.py libs SCRATCH OUT.json                finds NVRTC and cuBLAS; prints `export` lines
    check.py tests BINDIR OUT.json                runs each test executable, counts from libtest
    check.py exactness TOME CKDIR WORK OUT.json   tome's last hidden state against transformers'
    check.py timings TOME CKDIR WORK OUT.json     scripts/gpu/reference.py beside `tome bench`

Common options: --budget SECONDS (the step's share of the run; subprocesses get what is left).
Runs with the GPU machine's python3 (3.10+); torch is imported only where a step needs it.
"""
import argparse
import glob
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
GOLDEN_TOL = 1e-4  # tome against transformers, f32 on the GPU
RANKS_TOL = 1e-5   # 4 ranks against 1 rank


class Clock:
    """The step's budget: each subprocess gets at most what is left (and at most its own cap)."""

    def __init__(self, budget):
        self.end = time.monotonic() + budget

    def left(self, cap):
        return max(1, min(cap, int(self.end - time.monotonic())))

    def out(self):
        return time.monotonic() >= self.end


def run(cmd, timeout, env=None, cwd=None):
    """(returncode, stdout, stderr, seconds); returncode 124 on timeout, 127 if it cannot start."""
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
        rc, out, err = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as e:
        rc, out, err = 124, _text(e.stdout), _text(e.stderr) + f"\ntimed out after {timeout} s"
    except OSError as e:
        rc, out, err = 127, "", f"{cmd[0]}: {e}"
    return rc, out, err, time.perf_counter() - start


def _text(b):
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def first_line(text):
    for line in text.splitlines():
        if line.strip():
            return line.strip()[:300]
    return ""


def error_line(text):
    """The first line that names an error, else the first line."""
    for line in text.splitlines():
        if "error" in line.lower():
            return line.strip()[:300]
    return first_line(text)


def last_json(text):
    """The last line of `text` that is a JSON object."""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None


def write(path, obj):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


# --- env ------------------------------------------------------------------------------------

def env_step(args):
    info = {"python": sys.version.split()[0]}
    rc, out, err, _ = run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,compute_cap", "--format=csv"], 30)
    info["nvidia_smi"] = out.strip() if rc == 0 else f"failed: {first_line(err) or rc}"
    lines = out.strip().splitlines() if rc == 0 else []
    if len(lines) > 1:
        keys = [k.strip() for k in lines[0].split(",")]
        info["gpus"] = [dict(zip(keys, (v.strip() for v in line.split(",")))) for line in lines[1:]]
    for module in ("numpy", "torch", "transformers", "sentence_transformers"):
        try:
            info[module] = __import__(module).__version__
        except Exception as e:  # noqa: BLE001 - recorded
            info[module] = f"missing: {type(e).__name__}: {e}"[:200]
    try:
        import torch
        info["torch_cuda"] = torch.version.cuda
        info["torch_cuda_available"] = torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - torch missing, already recorded
        pass
    write(args.out, info)


# --- libs -----------------------------------------------------------------------------------

def lib_dirs():
    """Directories that may hold NVRTC and cuBLAS, most likely first."""
    dirs = []
    roots = [os.environ.get("CUDA_HOME", ""), os.environ.get("CUDA_PATH", "")] + sorted(glob.glob("/usr/local/cuda*"), reverse=True)
    for root in filter(None, roots):
        dirs += [os.path.join(root, "lib64")] + sorted(glob.glob(os.path.join(root, "targets", "*", "lib")))
    spec = importlib.util.find_spec("nvidia")  # torch's CUDA wheels (a namespace package)
    for base in (spec.submodule_search_locations or []) if spec else []:
        for parent, _, files in os.walk(base):
            if any(f.startswith(("libnvrtc.so", "libcublas.so")) for f in files):
                dirs.append(parent)
    return [d for i, d in enumerate(dirs) if os.path.isdir(d) and d not in dirs[:i]]


def find_lib(stem, dirs):
    """(directory, file, major) of the best `stem.so*`: soname .12 first, then plain .so, then any."""
    found = []
    for d in dirs:
        for path in glob.glob(os.path.join(d, stem + ".so*")):
            name = os.path.basename(path)
            m = re.fullmatch(re.escape(stem) + r"\.so(?:\.(\d+))?(?:\.[\d.]+)?", name)
            if m:
                found.append((d, name, m.group(1)))
    for want in ("12", None):
        for d, name, major in found:
            if major == want and name in (f"{stem}.so.12", f"{stem}.so"):
                return d, name, major
    return found[0] if found else None


def libs_step(args):
    dirs = lib_dirs()
    scratch = os.path.abspath(args.scratch)
    os.makedirs(scratch, exist_ok=True)
    record = {"searched": dirs, "libs": {}}
    path_dirs, nvrtc_dir, linked = [], None, False
    for stem in ("libnvrtc", "libcublas"):
        hit = find_lib(stem, dirs)
        if not hit:
            record["libs"][stem] = "not found"
            continue
        d, name, major = hit
        record["libs"][stem] = os.path.join(d, name)
        path_dirs.append(d)  # its companions (libnvrtc-builtins, libcublasLt) by soname
        directory = d
        if major not in ("12", None):  # only e.g. .so.13: tome asks for .so.12 or plain .so
            link = os.path.join(scratch, stem + ".so")
            if os.path.lexists(link):
                os.remove(link)
            os.symlink(os.path.join(d, name), link)
            record["libs"][stem] += f" (linked as {link})"
            directory, linked = scratch, True
        if stem == "libnvrtc":
            nvrtc_dir = directory
    if linked:
        path_dirs.insert(0, scratch)
    old = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(":") if p]
    ld_path = ":".join(dict.fromkeys(path_dirs + old))
    record["LD_LIBRARY_PATH"] = ld_path
    record["TOME_NVRTC_DIR"] = nvrtc_dir
    write(args.out, record)
    print(f"export LD_LIBRARY_PATH={shlex.quote(ld_path)}")
    if nvrtc_dir:
        print(f"export TOME_NVRTC_DIR={shlex.quote(nvrtc_dir)}")


# --- tests ----------------------------------------------------------------------------------

RESULT = re.compile(r"test result: (\w+)\. (\d+) passed; (\d+) failed; (\d+) ignored")


def parse_libtest(text):
    """Summed counts of every `test result:` line, and the names of failed tests."""
    counts = {"passed": 0, "failed": 0, "ignored": 0}
    for m in RESULT.finditer(text):
        for key, value in zip(("passed", "failed", "ignored"), m.groups()[1:]):
            counts[key] += int(value)
    counts["failures"] = re.findall(r"^test (\S+) \.\.\. FAILED", text, re.M)
    return counts


def crate_dir(executable):
    """crates/<crate> for an executable named <crate>-<test>: libtest under cargo runs there."""
    dirs = sorted(glob.glob(os.path.join(ROOT, "crates", "*", "Cargo.toml")), key=len, reverse=True)
    for manifest in dirs:
        crate = os.path.dirname(manifest)
        if executable.startswith(os.path.basename(crate) + "-"):
            return crate
    return ROOT


def tests_step(args):
    clock, rows = Clock(args.budget), []
    os.makedirs(args.logs, exist_ok=True)
    for path in sorted(glob.glob(os.path.join(args.bindir, "*"))):
        name = os.path.basename(path)
        if "emulated" in name:
            rows.append({"executable": name, "status": "skipped: CPU emulation, run in CI"})
            continue
        if clock.out():
            rows.append({"executable": name, "status": "not run: out of time"})
            continue
        rc, out, err, seconds = run([path, "--include-ignored", "--test-threads=1"], clock.left(args.cap), cwd=crate_dir(name))
        with open(os.path.join(args.logs, name + ".log"), "w") as f:
            f.write(out + "\n--- stderr ---\n" + err)
        row = {"executable": name, "rc": rc, "seconds": round(seconds, 2), **parse_libtest(out)}
        if rc == 0 and row["failed"] == 0:
            row["status"] = "ok"
        elif rc == 124:
            row["status"] = "timed out"
        else:
            row["status"] = "failed" if row["passed"] + row["failed"] else f"failed: {first_line(err) or rc}"
        rows.append(row)
    if not rows:
        rows.append({"executable": "(none)", "status": f"not run: no test executables in {args.bindir}"})
    write(args.out, {"tests": rows})


# --- exactness ------------------------------------------------------------------------------

def max_abs_diff(a_path, b_path):
    import numpy as np
    a, b = np.load(a_path), np.load(b_path)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} against {b.shape}")
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))


def refusal(err, model):
    """True where tome's stderr says it will not run this model on the GPU."""
    text = err.lower()
    names = {model["model"], model.get("architecture", "").lower(), model.get("family", "")}
    names |= {"bert", "minilm"} if model["model"] == "minilm" else set()
    names |= {"gpt-2", "gpt2"} if model["model"] == "gpt2" else set()
    says_gpu = any(w in text for w in ("gpu", "cuda", "device"))
    says_no = any(w in text for w in ("not supported", "unsupported", "refuse", "not implemented", "cannot run",
                                      "does not run", "not available", "not yet", "only on the cpu", "cpu only"))
    return says_gpu and says_no and any(n and n in text for n in names)


def tome_hidden(tome, model, device, ranks, work, clock, dtype="f32"):
    """Runs tome on the model's ids; (row, path of its last_hidden_state.npy or None)."""
    out = os.path.join(work, f"{model['model']}-{device}-{dtype}-r{ranks}")
    shutil.rmtree(out, ignore_errors=True)
    cmd = [tome, "process", "--ids", os.path.join(model["dir"], "input_ids.npy"), "--emit", "hidden-states",
           "--model", model["dir"], "--out", out, "--ranks", str(ranks), "--device", device, "--dtype", dtype,
           "--quiet"]
    if model.get("global_tokens"):
        cmd += ["--global-tokens", ",".join(str(g) for g in model["global_tokens"])]
    rc, _, err, seconds = run(cmd, clock.left(180))
    row = {"model": model["model"], "architecture": model.get("architecture"), "tokens": model.get("tokens"),
           "device": device if dtype == "f32" else f"{device}, {dtype}", "ranks": ranks, "seconds": round(seconds, 2)}
    if rc != 0:
        row["status"] = ("refused: " if refusal(err, model) else "failed: ") + (error_line(err) or f"exit {rc}")
        return row, None
    path = os.path.join(out, "last_hidden_state.npy")
    if not os.path.exists(path):
        row["status"] = "failed: no last_hidden_state.npy"
        return row, None
    return row, path


def compare(row, path, golden, single):
    """Fills the row's differences and its pass/fail."""
    try:
        row["max_abs_diff_golden"] = max_abs_diff(path, golden)
        ok = row["max_abs_diff_golden"] <= GOLDEN_TOL
        if single:
            row["max_abs_diff_1_rank"] = max_abs_diff(path, single)
            ok = ok and row["max_abs_diff_1_rank"] <= RANKS_TOL
        row["status"] = "pass" if ok else "fail"
    except Exception as e:  # noqa: BLE001 - recorded
        row["status"] = f"failed: {type(e).__name__}: {e}"[:300]


def measure_low_precision(row, path, golden):
    """A bf16 or f16 run against the f32 golden: the largest |difference| and the cosine between the
    mean-pooled rows (what README states per model), measured, not judged."""
    import numpy as np
    try:
        a, b = np.load(path).astype(np.float64), np.load(golden).astype(np.float64)
        row["max_abs_diff_golden"] = float(np.max(np.abs(a - b)))
        pa, pb = a.mean(axis=0), b.mean(axis=0)
        row["cosine_mean_pooled"] = float(pa @ pb / (np.linalg.norm(pa) * np.linalg.norm(pb)))
        row["status"] = f"measured: cosine of mean-pooled rows {row['cosine_mean_pooled']:.6f}"
    except Exception as e:  # noqa: BLE001 - recorded
        row["status"] = f"failed: {type(e).__name__}: {e}"[:300]


def read_checkpoints(ckdir):
    """The models checkpoints.py wrote (its JSON lines in CKDIR/checkpoints.jsonl)."""
    models = []
    listing = os.path.join(ckdir, "checkpoints.jsonl")
    if os.path.exists(listing):
        with open(listing) as f:
            models = [json.loads(line) for line in f if line.strip().startswith("{")]
    return models


def exactness_step(args):
    clock, rows = Clock(args.budget), []
    plan = [(m, "cuda") for m in read_checkpoints(args.ckdir)]
    plan += [(m, "cpu") for m, _ in plan if m["model"] == "minilm"]  # a sanity row
    if not plan:
        rows.append({"model": "all", "status": "not run: no checkpoints (see the checkpoints step)"})
    for model, device in plan:
        golden = os.path.join(model.get("dir", ""), "golden_last_hidden_state.npy")
        if model.get("status") != "ok" or not os.path.exists(golden):
            rows.append({"model": model["model"], "device": device, "status": f"not run: checkpoint {model.get('status')}: {model.get('error', 'no golden')}"[:300]})
            continue
        single = None
        for ranks in (1, 4):
            if clock.out():
                rows.append({"model": model["model"], "device": device, "ranks": ranks, "status": "not run: out of time"})
                continue
            row, path = tome_hidden(args.tome, model, device, ranks, args.work, clock)
            if path:
                compare(row, path, golden, single)
                single = single or path
            rows.append(row)
            write(args.out, {"tolerance_golden": GOLDEN_TOL, "tolerance_ranks": RANKS_TOL, "exactness": rows})
        # bf16 and f16 on the GPU against the f32 golden: the error README states per model.
        for dtype in ("bf16", "f16"):
            if device == "cuda" and not clock.out():
                row, path = tome_hidden(args.tome, model, device, 1, args.work, clock, dtype=dtype)
                if path:
                    measure_low_precision(row, path, golden)
                rows.append(row)
                write(args.out, {"tolerance_golden": GOLDEN_TOL, "tolerance_ranks": RANKS_TOL, "exactness": rows})
    write(args.out, {"tolerance_golden": GOLDEN_TOL, "tolerance_ranks": RANKS_TOL, "exactness": rows})


# --- timings --------------------------------------------------------------------------------

CASES = [("gpu-dense-bf16", 16384), ("gpu-dense-bf16", 65536), ("gpu-dense", 16384),
         ("gpu-longformer", 4096), ("gpu-longformer", 16384), ("gpu-book", 0)]
GOALS = {"gpu-dense-bf16": 0.7, "gpu-longformer": 10.0, "gpu-book": 1.0}  # reference s / tome s
DATA = os.environ.get("TOME_DATA_DIR", os.path.join(ROOT, "data"))
BOOK = os.path.join(DATA, "books", "plrabn12.txt")
TOKENIZER = os.path.join(DATA, "models", "all-MiniLM-L6-v2")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json",
                   "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json", "1_Pooling")


def book_model(ckdir, work):
    """(directory, None): MiniLM-L6's random weights with the real tokenizer files (and
    sentence-transformers' module files) beside them; (None, why) where it cannot be made."""
    weights = os.path.join(ckdir, "minilm")
    if not (os.path.exists(BOOK) and os.path.exists(os.path.join(TOKENIZER, "tokenizer.json"))):
        return None, "not run: data not carried"
    if not os.path.exists(os.path.join(weights, "model.safetensors")):
        return None, "not run: no MiniLM checkpoint (see the checkpoints step)"
    out = os.path.join(work, "book-minilm")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    for name in ("config.json", "model.safetensors"):
        os.symlink(os.path.join(weights, name), os.path.join(out, name))
    for name in TOKENIZER_FILES:
        src = os.path.join(TOKENIZER, name)
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(out, name))
        elif os.path.exists(src):
            shutil.copy(src, out)
    return out, None


def reference_side(name, tokens, model_dir, clock, device):
    cmd = [sys.executable, os.path.join(HERE, "reference.py"), "case", name, str(tokens), "--device", device]
    if name == "gpu-book":
        cmd += ["--model", model_dir, "--book", BOOK]
    rc, out, err, _ = run(cmd, clock.left(90))
    record = last_json(out) if rc == 0 else None
    return record, None if record else (first_line(err.splitlines()[-1] if err.strip() else "") or f"exit {rc}")


def tome_bench(tome, name, tokens, clock, model_dir=None):
    # gpu-book reads its model (random weights, real tokenizer) and the book from here.
    env = dict(os.environ)
    if model_dir:
        env["TOME_BENCH_BOOK_MODEL"] = model_dir
        env["TOME_DATA_DIR"] = DATA
    rc, out, err, _ = run([tome, "bench", "case", name, "--tokens", str(tokens)], clock.left(90), env=env)
    record = last_json(out) if rc == 0 else None
    return record, None if record else (error_line(err) or f"exit {rc}")


def tome_book_process(tome, model_dir, work, clock):
    """Wall time of `tome process` on the book: once to warm up, then the best of 3."""
    out = os.path.join(work, "book-out")
    cmd = [tome, "process", BOOK, "--model", model_dir, "--device", "cuda", "--attention", "window:512",
           "--positions", "tile", "--ranks", "1", "--out", out, "--quiet"]
    times = []
    for _ in range(4):
        rc, _, err, seconds = run(cmd, clock.left(120))
        if rc != 0:
            return None, error_line(err) or f"exit {rc}"
        times.append(seconds)
    return {"case": "gpu-book", "tokens": 0, "seconds": min(times[1:]), "gflops": None,
            "how": "wall time of `tome process` (process start, model load and tokenizing included)"}, None


def timing_row(args, name, tokens, book, clock):
    row = {"case": name, "tokens": tokens, "goal": GOALS.get(name)}
    model_dir, why_not = book
    if name == "gpu-book" and model_dir is None:
        row["status"] = why_not
        return row
    row["reference"], row["reference_error"] = reference_side(name, tokens, model_dir, clock, args.device)
    row["tome"], row["tome_error"] = tome_bench(args.tome, name, tokens, clock, model_dir if name == "gpu-book" else None)
    if name == "gpu-book" and row["tome"] is None:
        bench_error = row["tome_error"]
        row["tome"], row["tome_error"] = tome_book_process(args.tome, model_dir, args.work, clock)
        row["tome_bench_error"] = bench_error
    if row["reference"] and name == "gpu-book":
        row["tokens"] = row["reference"]["tokens"]
    if row["reference"] and row["tome"] and row["tome"].get("seconds"):
        row["ratio"] = row["reference"]["seconds"] / row["tome"]["seconds"]
        if row["goal"] is not None:
            row["meets_goal"] = row["ratio"] >= row["goal"]
    row["status"] = "ok" if "ratio" in row else "incomplete"
    return row


def timings_step(args):
    clock, rows = Clock(args.budget), []
    os.makedirs(args.work, exist_ok=True)
    try:
        book = book_model(args.ckdir, args.work)
    except OSError as e:
        book = None, f"not run: the book's model directory: {e}"
    cases = [(c.split(":")[0], int(c.split(":")[1])) for c in args.cases.split(",")] if args.cases else CASES
    for name, tokens in cases:
        if clock.out():
            rows.append({"case": name, "tokens": tokens, "goal": GOALS.get(name), "status": "not run: out of time"})
            continue
        rows.append(timing_row(args, name, tokens, book, clock))
        write(args.out, {"timings": rows})
    write(args.out, {"timings": rows})


# --- main -----------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="step", required=True)
    p = sub.add_parser("env")
    p.add_argument("out")
    p.set_defaults(fn=env_step)
    p = sub.add_parser("libs")
    p.add_argument("scratch")
    p.add_argument("out")
    p.set_defaults(fn=libs_step)
    p = sub.add_parser("tests")
    p.add_argument("bindir")
    p.add_argument("out")
    p.add_argument("--logs", default="out/gpu-check/test-logs")
    p.add_argument("--cap", type=int, default=120, help="seconds per executable at most")
    p.set_defaults(fn=tests_step)
    for name, fn in (("exactness", exactness_step), ("timings", timings_step)):
        p = sub.add_parser(name)
        p.add_argument("tome")
        p.add_argument("ckdir")
        p.add_argument("work")
        p.add_argument("out")
        p.set_defaults(fn=fn)
    p.add_argument("--cases", help="NAME:TOKENS,... instead of the check's own (a CPU check of this script)")
    p.add_argument("--device", default="cuda", help="the reference side's device")
    for p in sub.choices.values():
        p.add_argument("--budget", type=int, default=300)
    args = ap.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
