#!/usr/bin/env python3
"""The reference side of tome's benchmark suite: what a user would run instead, on the same
machine with the same thread count, case for case with `tome bench` (same names, same sizes).

    python scripts/bench/reference.py suite [--smoke] [--out FILE]   # every case, each in its own process
    python scripts/bench/reference.py case NAME TOKENS               # one case, one JSON record
    python scripts/bench/reference.py list [--smoke]                 # the suite's cases, `NAME TOKENS` lines

Needs the benchmark venv (scripts/bench/run.sh makes it): torch, transformers,
sentence-transformers, performer-pytorch. Never runs in CI.
"""
import json
import os
import subprocess
import sys
import time

THREADS = int(os.environ.get("TOME_BENCH_THREADS", os.cpu_count() or 2))
HEADS, HEAD_DIM = 8, 64
HIDDEN = HEADS * HEAD_DIM
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def status_mb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    return 0.0


RUNS = 3  # as tome's side: the fastest run is reported, with the highest peak memory of them


def timed(case, tokens, fn, gflop=None, runs=RUNS):
    records = [timed_once(case, tokens, fn, gflop) for _ in range(runs)]
    best = min(records, key=lambda r: r["seconds"])
    return {**best, "peak_increment_mb": max(r["peak_increment_mb"] for r in records), "peak_rss_mb": max(r["peak_rss_mb"] for r in records)}


def timed_once(case, tokens, fn, gflop=None):
    before = status_mb("VmRSS:")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    peak = status_mb("VmHWM:")
    return {"case": case, "tokens": tokens, "seconds": seconds, "gflops": gflop / seconds if gflop else None,
            "peak_increment_mb": max(peak - before, 0.0), "peak_rss_mb": peak}


def run_case(name, n):
    import torch
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    # A `-bf16` case is the same computation with the module, weights and inputs in bfloat16,
    # as a user running PyTorch in bf16 sets it up.
    dtype = torch.bfloat16 if name.endswith("-bf16") else torch.float32
    if name in ("dense", "dense-causal", "dense-bf16"):
        import torch.nn.functional as F
        causal = name == "dense-causal"
        q, k, v = (torch.randn(1, HEADS, n, HEAD_DIM, dtype=dtype) for _ in range(3))
        pairs = n * (n + 1) / 2 if causal else n * n
        with torch.no_grad():
            return timed(name, n, lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal), 4 * pairs * HIDDEN / 1e9)
    if name in ("longformer", "longformer-bf16"):
        from transformers import LongformerConfig
        from transformers.models.longformer.modeling_longformer import LongformerSelfAttention
        cfg = LongformerConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, attention_window=[512])
        attn = LongformerSelfAttention(cfg, layer_id=0).eval().to(dtype)
        x = torch.randn(1, n, HIDDEN, dtype=dtype)
        mask = torch.zeros(1, n)
        none = torch.zeros(1, n, dtype=torch.bool)
        with torch.no_grad():
            return timed(name, n, lambda: attn(x, attention_mask=mask, is_index_masked=none, is_index_global_attn=none, is_global_attn=False))
    if name == "bigbird":
        from transformers import BigBirdConfig, BigBirdModel
        from transformers.models.big_bird.modeling_big_bird import BigBirdBlockSparseAttention
        cfg = BigBirdConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, attention_type="block_sparse", block_size=64, num_random_blocks=3)
        attn = BigBirdBlockSparseAttention(cfg).eval()
        x = torch.randn(1, n, HIDDEN)
        blocked, band, from_mask, to_mask = BigBirdModel.create_masks_for_block_sparse_attn(torch.ones(1, n), 64)
        with torch.no_grad():
            return timed(name, n, lambda: attn(x, band_mask=band, from_mask=from_mask, to_mask=to_mask, from_blocked_mask=blocked, to_blocked_mask=blocked))
    if name == "reformer-lsh":
        from transformers import ReformerConfig
        from transformers.models.reformer.modeling_reformer import LSHSelfAttention
        buckets = 1 << max(1, (max(n // 64, 2) - 1).bit_length())
        cfg = ReformerConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, attention_head_size=HEAD_DIM, lsh_attn_chunk_length=64,
                             num_hashes=1, num_buckets=buckets, lsh_num_chunks_before=1, lsh_num_chunks_after=0, is_decoder=False)
        attn = LSHSelfAttention(cfg).eval()
        x = torch.randn(1, n, HIDDEN)
        with torch.no_grad():
            return timed(name, n, lambda: attn(x))
    if name == "performer":
        from performer_pytorch import FastAttention
        attn = FastAttention(dim_heads=HEAD_DIM, nb_features=256, causal=False)
        q, k, v = (torch.randn(1, HEADS, n, HEAD_DIM) for _ in range(3))
        with torch.no_grad():
            return timed(name, n, lambda: attn(q, k, v))
    if name in ("book", "book-bf16"):
        from sentence_transformers import SentenceTransformer
        model = SentenceTransformer(os.path.join(ROOT, "data/models/all-MiniLM-L6-v2"), device="cpu").to(dtype)
        text = open(os.path.join(ROOT, "data/books/plrabn12.txt"), encoding="utf-8").read()
        ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
        # What a user does today: isolated 256-token chunks (254 + [CLS] and [SEP]).
        chunks = [model.tokenizer.decode(ids[i:i + 254]) for i in range(0, len(ids), 254)]
        model.max_seq_length = 256
        with torch.no_grad():
            record = timed(name, len(ids), lambda: model.encode(chunks, batch_size=32))
        return record
    raise SystemExit(f"unknown case {name}")


def suite(smoke):
    sizes = [512, 1024] if smoke else [4096, 16384]
    cases = [(name, n) for name in ("dense", "dense-causal", "longformer", "bigbird", "reformer-lsh", "performer", "dense-bf16", "longformer-bf16") for n in sizes]
    if not smoke:
        cases += [("book", 0), ("book-bf16", 0)]
    return cases


def main():
    args = sys.argv[1:]
    if args[:1] == ["case"]:
        print(json.dumps(run_case(args[1], int(args[2]))))
        return
    if args[:1] == ["list"]:
        for name, n in suite("--smoke" in args):
            print(name, n)
        return
    if args[:1] == ["suite"]:
        smoke = "--smoke" in args
        out = args[args.index("--out") + 1] if "--out" in args else None
        records = []
        for name, n in suite(smoke):
            done = subprocess.run([sys.executable, __file__, "case", name, str(n)], capture_output=True, text=True)
            if done.returncode != 0:
                print(f"{name} {n}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
                continue
            record = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{record['case']:<16} {record['tokens']:>8} tokens {record['seconds']:>9.4f} s", file=sys.stderr)
            records.append(record)
        text = json.dumps(records, indent=2)
        if out:
            open(out, "w").write(text)
        else:
            print(text)
        return
    raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
