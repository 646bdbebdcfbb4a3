#!/usr/bin/env python3
"""The PyTorch side of the GPU timings in scripts/gpu-check.sh, case for case with
`tome bench case NAME --tokens N` (same names, same sizes, same JSON fields).

    python3 scripts/gpu/reference.py case NAME TOKENS [--device cuda|cpu]
        [--model DIR] [--book FILE]      # gpu-book only

prints one JSON line {"case", "tokens", "seconds", "gflops", "device", "how"}: each case is run
once to warm up, then 3 times, each between torch.cuda.synchronize() calls; the fastest counts.

Cases
    gpu-dense-bf16   F.scaled_dot_product_attention, q, k, v [1, 8, N, 64] bf16, non-causal,
                     the flash backend only; gflops = 4 N^2 64 8 / 1e9 / seconds
    gpu-dense        the same in f32 (TF32 off), the memory-efficient backend (math if the
                     efficient one refuses)
    gpu-longformer   transformers' LongformerSelfAttention (hidden 512, 8 heads, window 512),
                     f32, TF32 off, input [1, N, 512], local attention only
    gpu-book         a whole book (TOKENS 0; N > 0: its first N tokens) in isolated 256-token
                     chunks, batch 64, fp16, as sentence-transformers computes it, from the
                     MiniLM-L6 directory --model (random weights and the real tokenizer)

--device cpu runs the same code on the CPU (a check of this script with small TOKENS).
No network: HF_HUB_OFFLINE and TRANSFORMERS_OFFLINE are set.
"""
import argparse
import inspect
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

HEADS, HEAD_DIM = 8, 64
HIDDEN = HEADS * HEAD_DIM
WINDOW = 512
RUNS = 3


def synchronize(device):
    import torch
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def best_of(fn, device, runs=RUNS):
    """Seconds of the fastest of `runs` calls, after one call to warm up."""
    fn()
    synchronize(device)
    times = []
    for _ in range(runs):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times)


def no_tf32():
    import torch
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def dense(n, device, dtype_name):
    """SDPA on [1, 8, N, 64]: flash for bf16; memory-efficient (else math) for f32."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    no_tf32()
    dtype = getattr(torch, dtype_name)
    q, k, v = (torch.randn(1, HEADS, n, HEAD_DIM, dtype=dtype, device=device) for _ in range(3))
    backends = [SDPBackend.FLASH_ATTENTION] if dtype == torch.bfloat16 else [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    last_error = None
    for backend in backends:
        def run():
            with torch.no_grad(), sdpa_kernel(backend):
                F.scaled_dot_product_attention(q, k, v, is_causal=False)
        try:
            seconds = best_of(run, device)
        except RuntimeError as e:  # this backend refuses these inputs on this GPU
            last_error = e
            continue
        return seconds, 4 * n * n * HIDDEN / 1e9, f"SDPA {backend.name}, {dtype_name}"
    raise last_error


def longformer_call(attn, x, mask, none):
    """attn(x, ...) with the arguments the installed transformers' forward takes."""
    params = inspect.signature(attn.forward).parameters
    offered = {"attention_mask": mask, "is_index_masked": none, "is_index_global_attn": none,
               "is_global_attn": False, "output_attentions": False}
    kwargs = {k: v for k, v in offered.items() if k in params}
    if "layer_head_mask" in params:
        kwargs["layer_head_mask"] = None
    return lambda: attn(x, **kwargs)


def longformer(n, device):
    import torch
    from transformers import LongformerConfig
    from transformers.models.longformer.modeling_longformer import LongformerSelfAttention
    no_tf32()
    cfg = LongformerConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, attention_window=[WINDOW])
    attn = LongformerSelfAttention(cfg, layer_id=0).eval().to(device)
    x = torch.randn(1, n, HIDDEN, device=device)
    mask = torch.zeros(1, n, device=device)  # 0: local attention (1 would be global, -1 masked)
    none = torch.zeros(1, n, dtype=torch.bool, device=device)
    call = longformer_call(attn, x, mask, none)

    def run():
        with torch.no_grad():
            call()
    return best_of(run, device), None, "transformers LongformerSelfAttention, f32"


def book_chunks(tokenizer, text, n):
    """What a user does today: isolated 256-token chunks (254 + [CLS] and [SEP])."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if n > 0:
        ids = ids[:n]
    return ids, [tokenizer.decode(ids[i:i + 254]) for i in range(0, len(ids), 254)]


def book_sentence_transformers(model_dir, text, n, device):
    import torch
    from sentence_transformers import SentenceTransformer
    model = SentenceTransformer(model_dir, device=device)
    if device.startswith("cuda"):
        model = model.half()
    model.max_seq_length = 256
    ids, chunks = book_chunks(model.tokenizer, text, n)

    def run():
        with torch.no_grad():
            model.encode(chunks, batch_size=64)
    precision = "fp16" if device.startswith("cuda") else "f32"
    return len(ids), best_of(run, device), f"sentence-transformers encode, {precision}, batch 64"


def book_transformers(model_dir, text, n, device):
    """The same computation without sentence-transformers: BertModel + mean pooling."""
    import torch
    from transformers import AutoTokenizer, BertModel
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    model = BertModel.from_pretrained(model_dir).to(device=device, dtype=dtype).eval()
    ids, chunks = book_chunks(tokenizer, text, n)

    def run():
        with torch.no_grad():
            for i in range(0, len(chunks), 64):
                batch = tokenizer(chunks[i:i + 64], padding=True, truncation=True, max_length=256, return_tensors="pt").to(device)
                hidden = model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
                torch.nn.functional.normalize(pooled.float(), dim=-1).cpu()
    return len(ids), best_of(run, device), (f"transformers BertModel + mean pooling, {str(dtype)[6:]}, batch 64 "
                                            "(sentence-transformers could not load the directory)")


def book(n, device, model_dir, book_path):
    if not model_dir or not book_path:
        raise SystemExit("gpu-book needs --model DIR and --book FILE")
    text = open(book_path, encoding="utf-8").read()
    try:
        tokens, seconds, how = book_sentence_transformers(model_dir, text, n, device)
    except Exception as e:  # noqa: BLE001 - fall back, and say so in the row
        tokens, seconds, how = book_transformers(model_dir, text, n, device)
        how += f" [{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}]"
    return tokens, seconds, how


def run_case(name, n, device, model_dir=None, book_path=None):
    import torch
    torch.manual_seed(0)
    gflop = None
    if name == "gpu-dense-bf16":
        seconds, gflop, how = dense(n, device, "bfloat16")
    elif name == "gpu-dense":
        seconds, gflop, how = dense(n, device, "float32")
    elif name == "gpu-longformer":
        seconds, gflop, how = longformer(n, device)
    elif name == "gpu-book":
        n, seconds, how = book(n, device, model_dir, book_path)
    else:
        raise SystemExit(f"unknown case {name}")
    return {"case": name, "tokens": n, "seconds": seconds, "gflops": gflop / seconds if gflop else None,
            "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu", "how": how}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["case"])
    ap.add_argument("name")
    ap.add_argument("tokens", type=int)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--model")
    ap.add_argument("--book")
    args = ap.parse_args()
    print(json.dumps(run_case(args.name, args.tokens, args.device, args.model, args.book)), flush=True)


if __name__ == "__main__":
    main()
