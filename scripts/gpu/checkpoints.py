#!/usr/bin/env python3
"""Random-weight (seeded) checkpoints of real sizes, with their inputs and transformers' outputs,
for the GPU exactness check (scripts/gpu-check.sh). Nothing is downloaded.

    python3 scripts/gpu/checkpoints.py DIR [--models minilm,longformer,gpt2,llama]
                                           [--device cuda|cpu] [--tiny] [--no-golden]

For each model, DIR/<model>/ gets
    config.json, model.safetensors    Hugging Face format, f32 (save_pretrained)
    input_ids.npy                     int64 [tokens], seeded random ids
    golden_last_hidden_state.npy      f32 [tokens, hidden]: transformers on --device, f32,
                                      TF32 off, eager attention (skipped with --no-golden)
and one JSON line per model goes to stdout: {"model", "dir", "tokens", "status", "error"?}.
A model that fails is reported and the others still written.

--tiny: small shapes (a CPU check of this script). Without torch only the configs and ids are
written (--no-golden is implied); the weights need torch.
"""
import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

SEED = 1234


def minilm(tiny):
    """MiniLM-L6 (all-MiniLM-L6-v2's shape); run on 512 tokens, its learned positions."""
    cfg = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
               intermediate_size=1536, max_position_embeddings=512, type_vocab_size=2,
               hidden_act="gelu", layer_norm_eps=1e-12, pad_token_id=0)
    tokens = 512
    if tiny:
        # the real vocabulary and positions: the dry run's book goes through the real tokenizer
        cfg.update(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
        tokens = 64
    # ids from 1000 up: past [PAD], [UNK], [CLS], [SEP], [MASK] and the unused ones.
    return "BertModel", "BertConfig", cfg, tokens, min(1000, cfg["vocab_size"] // 2)


def longformer(tiny):
    """Longformer-base with 4,096 positions (RoBERTa positions: 2 more), window 512, global
    attention on three tokens (`global_tokens`)."""
    cfg = dict(vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
               intermediate_size=3072, max_position_embeddings=4098, attention_window=512,
               type_vocab_size=1, hidden_act="gelu", layer_norm_eps=1e-5,
               pad_token_id=1, bos_token_id=0, eos_token_id=2)
    tokens = 4096
    if tiny:
        cfg.update(vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=64, max_position_embeddings=130, attention_window=16)
        tokens = 128
    return "LongformerModel", "LongformerConfig", cfg, tokens, 3  # past <s>, <pad>, </s>


def gpt2(tiny):
    """GPT-2 small, 1,024 tokens (its positions)."""
    cfg = dict(vocab_size=50257, n_embd=768, n_layer=12, n_head=12, n_positions=1024)
    tokens = 1024
    if tiny:
        cfg.update(vocab_size=1000, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=999, eos_token_id=999)
        tokens = 64
    return "GPT2Model", "GPT2Config", cfg, tokens, 0


def llama(tiny):
    """A Llama-shaped model with grouped-query attention (8 heads, 2 key/value heads)."""
    cfg = dict(vocab_size=32000, hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
               num_key_value_heads=2, intermediate_size=1408, max_position_embeddings=2048,
               hidden_act="silu", rms_norm_eps=1e-5, rope_theta=10000.0,
               tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    tokens = 1024
    if tiny:
        cfg.update(vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128)
        tokens = 64
    return "LlamaModel", "LlamaConfig", cfg, tokens, 3


MODELS = {"minilm": minilm, "longformer": longformer, "gpt2": gpt2, "llama": llama}


def input_ids(tokens, low, vocab, seed):
    import numpy as np
    rng = np.random.default_rng(seed)
    return rng.integers(low, vocab, size=tokens, dtype=np.int64)


def have_torch():
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
        return True
    except ImportError:
        return False


def randomize(model, seed):
    """Re-draw every parameter (seeded, on the CPU: the same numbers on every machine) so that
    each part matters: norm weights 1 + N(0, 0.1), biases N(0, 0.02), the rest N(0, 0.02)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    norms = {f"{m}.{p}" if m else p
             for m, module in model.named_modules()
             if "norm" in type(module).__name__.lower()
             for p, _ in module.named_parameters(recurse=False)}
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            is_norm = name in norms or "LayerNorm" in name or ".ln_" in name or name.startswith("ln_")
            if is_norm and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.02 * noise)


def write_checkpoint(out, model_cls, config_cls, cfg, seed):
    import torch
    import transformers
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**cfg)
    model = getattr(transformers, model_cls)(config).eval()
    randomize(model, seed)
    model.save_pretrained(out, safe_serialization=True)
    for extra in os.listdir(out):  # e.g. generation_config.json
        if extra not in ("config.json", "model.safetensors"):
            os.remove(os.path.join(out, extra))


def load_model(out, model_cls, device):
    """The checkpoint as transformers reads it, eager attention, refusing missing weights."""
    import transformers
    cls = getattr(transformers, model_cls)
    try:
        model, info = cls.from_pretrained(out, attn_implementation="eager", output_loading_info=True,
                                          torch_dtype="float32")
    except (TypeError, ValueError):
        model, info = cls.from_pretrained(out, output_loading_info=True)
    parameters = dict(model.named_parameters())  # buffers (position ids, causal masks) may be absent
    missing = [k for k in info.get("missing_keys", []) if k in parameters]
    if missing:
        raise RuntimeError(f"weights missing from {out}: {missing[:5]}")
    return model.float().eval().to(device)


# Longformer's global tokens: the first, middle and last (tome's --global-tokens).
def global_tokens(key, tokens):
    return [0, tokens // 2, tokens - 1] if key == "longformer" else []


def golden(out, model_cls, ids, device, globals_at):
    import numpy as np
    import torch
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = load_model(out, model_cls, device)
    with torch.no_grad():
        x = torch.from_numpy(ids).unsqueeze(0).to(device)
        extra = {}
        if globals_at:
            mask = torch.zeros_like(x)
            mask[0, globals_at] = 1
            extra["global_attention_mask"] = mask
        hidden = model(input_ids=x, **extra).last_hidden_state[0]
    np.save(os.path.join(out, "golden_last_hidden_state.npy"), hidden.float().cpu().numpy().astype(np.float32))


def make(root, key, device, tiny, with_golden, with_weights):
    import numpy as np
    model_cls, config_cls, cfg, tokens, low = MODELS[key](tiny)
    out = os.path.join(root, key)
    os.makedirs(out, exist_ok=True)
    seed = SEED + sorted(MODELS).index(key)
    if with_weights:
        write_checkpoint(out, model_cls, config_cls, cfg, seed)
    else:
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump({"architectures": [model_cls], "model_type": config_cls[:-6].lower(), **cfg}, f, indent=2)
    ids = input_ids(tokens, low, cfg["vocab_size"], seed)
    np.save(os.path.join(out, "input_ids.npy"), ids)
    globals_at = global_tokens(key, tokens)
    if with_golden:
        golden(out, model_cls, ids, device, globals_at)
    return {"model": key, "architecture": model_cls, "dir": out, "tokens": tokens,
            "hidden": cfg.get("hidden_size", cfg.get("n_embd")), "global_tokens": globals_at}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--no-golden", action="store_true")
    args = ap.parse_args()
    torch_ok = have_torch()
    failures = 0
    for key in args.models.split(","):
        start = time.perf_counter()
        try:
            row = make(args.dir, key, args.device, args.tiny, torch_ok and not args.no_golden, torch_ok)
            row["status"] = "ok" if torch_ok else "config and ids only (no torch)"
        except Exception as e:  # one model's failure must not lose the others
            row = {"model": key, "status": "failed", "error": f"{type(e).__name__}: {e}"[:500]}
            failures += 1
        row["seconds"] = round(time.perf_counter() - start, 2)
        print(json.dumps(row), flush=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
