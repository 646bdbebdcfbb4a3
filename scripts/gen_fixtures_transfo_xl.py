#!/usr/bin/env python3
"""Generate tome-model's Transformer-XL and Compressive Transformer golden fixtures.

Writes (all small, committed) under crates/tome-model/tests/fixtures/:

  transfo-xl-tiny/      random TransfoXLModel (transformers 4.37.2): adaptive embedding with
                        cutoffs [20, 50], div_val 2 (three clusters, each with its own
                        projection), relative positional attention, per-layer r_w_bias /
                        r_r_bias (untie_r), mem_len 12, clamp_len 10. The 40-token document
                        is run as consecutive segments of segment_len 8, the first with
                        explicit empty memories, each next one with the mems the previous
                        call returned.
      config.json, model.safetensors   save_pretrained() output
      input_ids.npy                    int64   [40]
      last_hidden_state.npy            float32 [40, 32]  segments of 8, outputs concatenated
      last_hidden_state_seg16.npy      float32 [40, 32]  the same with segments 16 + 16 + 8
      last_hidden_state_same_length.npy float32 [40, 32] segments of 8 with same_length true
      meta.json                        versions, seeds, command, notes (what the reference
                                       computes, with line numbers of modeling_transfo_xl.py)
  compressive-tiny/     tome's own Compressive Transformer schema (docs/models/compressive.md):
                        the same kind of random TransfoXLModel (here cutoffs [] and div_val 1:
                        one embedding table, no projection) plus per-layer Conv1d compression
                        weights `layers.{i}.compress.{weight,bias}`. The golden runs the
                        model's own RelPartialLearnableDecoderLayer modules with a per-layer
                        (mem, cmem) pair: segment_len 8, mem_len 8, cmem_len 8, rate 2.
      config.json                      TransfoXLConfig fields + model_type "tome-compressive",
                                       cmem_len, compression_rate, compression ("conv")
      model.safetensors, input_ids.npy (int64 [40])
      last_hidden_state.npy            float32 [40, 32]  compression "conv"
      last_hidden_state_mean.npy       float32 [40, 32]  same weights, compression "mean"
      last_hidden_state_max.npy        float32 [40, 32]  same weights, compression "max"
      meta.json

Every golden is also recomputed by an independent float64 NumPy implementation written
from the notes in meta.json (`numpy_forward` below) and must agree to 1e-4; every
fixture is reloaded from disk and recomputed; and every parameter tensor is checked to
matter (replacing it by zeros, or ones for LayerNorm gammas, changes the golden by
more than 1e-3).

Reference environment. transformers 5.x has no Transformer-XL; the last 4.x release
whose forward runs unpatched is 4.37.2 (transformers.models.deprecated.transfo_xl;
from 4.38.2 on the forward fails on `.type_as(dtype=`). Rather than a second torch,
transformers 4.37.2 is installed as an overlay directory on top of the main reference
venv (/root/.venvs/tome-ref, see scripts/gen_fixtures.py) and put first on PYTHONPATH:

  /root/.venvs/tome-ref/bin/pip install --target /root/.venvs/xl-overlay --no-deps \\
      transformers==4.37.2 tokenizers==0.15.2 huggingface-hub==0.23.5 \\
      requests==2.32.3 urllib3==2.2.3 charset-normalizer==3.4.0 certifi==2024.8.30

(huggingface-hub 0.23.5 imports `requests`, which the 5.x venv lacks; everything else
-- torch, numpy, safetensors, packaging, filelock, regex, tqdm, pyyaml -- comes from
the venv.) The committed fixtures were produced with Python 3.11.7, torch==2.15.0
(+cu132 wheel, run on CPU), transformers==4.37.2, tokenizers==0.15.2,
huggingface-hub==0.23.5, safetensors==0.8.0, numpy==2.4.6 (recorded in each meta.json).

Run from anywhere:

  PYTHONPATH=/root/.venvs/xl-overlay /root/.venvs/tome-ref/bin/python scripts/gen_fixtures_transfo_xl.py
  (or with `transfo-xl-tiny` / `compressive-tiny` as arguments to regenerate one)

Parameters: as in scripts/gen_fixtures.py every parameter is re-drawn after
construction from torch.Generator(seed + 1000), in named_parameters() order: weights
(Linear weights, embedding tables, embedding projections, Conv1d weights) ~ N(0, 0.2);
biases (names ending `.bias`, and the attention biases r_w_bias / r_r_bias) ~ N(0, 0.1);
LayerNorm (recognised by module type) gamma ~ 1 + N(0, 0.1), beta ~ N(0, 0.1). The
buffer pos_emb.inv_freq is left as constructed.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
from pathlib import Path

import numpy as np
import safetensors
import safetensors.numpy
import safetensors.torch
import torch
import transformers

if transformers.__version__ != "4.37.2":
    sys.exit(
        f"transformers {transformers.__version__} imported from {transformers.__file__}: "
        "run with PYTHONPATH=/root/.venvs/xl-overlay (transformers 4.37.2), see the docstring"
    )

import huggingface_hub  # noqa: E402
import tokenizers  # noqa: E402
from transformers.models.deprecated.transfo_xl import TransfoXLConfig, TransfoXLModel  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
FIXTURES = REPO_ROOT / "crates" / "tome-model" / "tests" / "fixtures"
COMMAND = "PYTHONPATH=/root/.venvs/xl-overlay /root/.venvs/tome-ref/bin/python scripts/gen_fixtures_transfo_xl.py"
SETUP = (
    "/root/.venvs/tome-ref/bin/pip install --target /root/.venvs/xl-overlay --no-deps "
    "transformers==4.37.2 tokenizers==0.15.2 huggingface-hub==0.23.5 requests==2.32.3 "
    "urllib3==2.2.3 charset-normalizer==3.4.0 certifi==2024.8.30  (overlay on the tome-ref venv "
    "of scripts/gen_fixtures.py: torch, numpy, safetensors from there)"
)
PARAMETER_INIT = (
    "re-drawn after construction from torch.Generator(seed + 1000) in named_parameters() order: "
    "weights (Linear, embedding tables, emb_projs, Conv1d) ~ N(0, 0.2); biases (*.bias, r_w_bias, "
    "r_r_bias) ~ N(0, 0.1); LayerNorm weight ~ 1 + N(0, 0.1), LayerNorm bias ~ N(0, 0.1); the buffer "
    "pos_emb.inv_freq is left as constructed"
)
SRC = "transformers 4.37.2 models/deprecated/transfo_xl/modeling_transfo_xl.py"

XL_SIZES = dict(
    vocab_size=100,
    d_model=32,
    d_embed=32,
    n_head=4,
    d_head=8,
    d_inner=37,
    n_layer=2,
    clamp_len=10,
    same_length=False,
    attn_type=0,
    pre_lnorm=False,
    untie_r=True,
    dropout=0.0,
    dropatt=0.0,
    layer_norm_epsilon=1e-5,
)


def versions() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "huggingface_hub": huggingface_hub.__version__,
        "safetensors": safetensors.__version__,
        "numpy": np.__version__,
    }


def randomize_parameters(model: torch.nn.Module, seed: int) -> None:
    """Re-draw every parameter so that each part of the network matters."""
    g = torch.Generator().manual_seed(seed + 1000)
    layer_norm_params = {
        f"{module_name}.{param_name}" if module_name else param_name
        for module_name, module in model.named_modules()
        if isinstance(module, torch.nn.LayerNorm)
        for param_name, _ in module.named_parameters(recurse=False)
    }
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            is_layer_norm = name in layer_norm_params
            if is_layer_norm and name.endswith(".weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif is_layer_norm or name.endswith(".bias") or name.endswith("r_w_bias") or name.endswith("r_r_bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(0.2 * noise)


def safetensors_keys_shapes(path: Path) -> dict:
    with safetensors.safe_open(str(path), framework="np") as f:
        return {k: list(f.get_slice(k).get_shape()) for k in sorted(f.keys())}


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def segments(n: int, segment_len: int) -> list[tuple[int, int]]:
    return [(s, min(s + segment_len, n)) for s in range(0, n, segment_len)]


def draw_input_ids(vocab_size: int, n: int, cutoffs: list[int]) -> torch.Tensor:
    """Random ids on the global generator, with every cluster boundary id placed somewhere."""
    ids = torch.randint(0, vocab_size, (n,), dtype=torch.int64)
    edges = sorted({0, vocab_size - 1, *cutoffs, *[c - 1 for c in cutoffs]})
    spots = [3, 11, 17, 26, 30, 38, 21, 34][: len(edges)]
    for pos, tok in zip(spots, edges):
        ids[pos] = tok
    return ids


# ---------------------------------------------------------------------------
# Transformer-XL through the HF model's own forward
# ---------------------------------------------------------------------------


def run_xl(model: TransfoXLModel, ids: torch.Tensor, segment_len: int) -> np.ndarray:
    """Consecutive segments; first with explicit empty mems, then the returned mems."""
    d = model.config.d_model
    mems = [torch.zeros(0, 1, d) for _ in range(model.config.n_layer)]
    outs = []
    with torch.no_grad():
        for s, e in segments(len(ids), segment_len):
            out = model(ids[None, s:e], mems=mems)
            assert len(out.mems) == model.config.n_layer
            expect = min(model.config.mem_len, mems[0].size(0) + (e - s))
            assert all(m.shape == (expect, 1, d) for m in out.mems), [m.shape for m in out.mems]
            mems = out.mems
            outs.append(out.last_hidden_state[0])
    return torch.cat(outs).to(torch.float32).numpy()


# ---------------------------------------------------------------------------
# Compressive Transformer on the HF model's layers
# ---------------------------------------------------------------------------


def compress_torch(layer, ev: torch.Tensor, rate: int, compression: str) -> torch.Tensor:
    """ev [n, 1, d] (oldest first) -> [n / rate, 1, d]."""
    n, bsz, d = ev.shape
    assert bsz == 1
    if n % rate:
        raise ValueError(f"{n} evicted memories is not a multiple of the compression rate {rate}")
    x = ev[:, 0]
    if compression == "mean":
        out = x.view(n // rate, rate, d).mean(dim=1)
    elif compression == "max":
        out = x.view(n // rate, rate, d).amax(dim=1)
    elif compression == "conv":
        out = layer.compress(x.t()[None])[0].t()  # Conv1d(d, d, kernel=rate, stride=rate)
    else:
        raise ValueError(compression)
    return out[:, None]


def run_compressive(
    model: TransfoXLModel,
    ids: torch.Tensor,
    segment_len: int,
    mem_len: int,
    cmem_len: int,
    rate: int,
    compression: str,
    schedule: list | None = None,
) -> np.ndarray:
    """The reference forward: the model's embedding, positional embedding and decoder layers,
    each layer attending to mems = cat(cmem_i, mem_i)."""
    cfg = model.config
    d, L = cfg.d_model, cfg.n_layer
    mem = [torch.zeros(0, 1, d) for _ in range(L)]
    cmem = [torch.zeros(0, 1, d) for _ in range(L)]
    outs = []
    with torch.no_grad():
        for s, e in segments(len(ids), segment_len):
            qlen = e - s
            x = model.word_emb(ids[s:e, None])  # [qlen, 1, d]
            mlens = {cmem[i].size(0) + mem[i].size(0) for i in range(L)}
            assert len(mlens) == 1
            mlen = mlens.pop()
            klen = mlen + qlen
            mask = torch.triu(torch.ones(qlen, klen, dtype=torch.bool), diagonal=1 + mlen)[:, :, None]
            pos_seq = torch.arange(klen - 1, -1, -1.0)
            if cfg.clamp_len > 0:
                pos_seq.clamp_(max=cfg.clamp_len)
            pos_emb = model.pos_emb(pos_seq)
            inputs = []
            for i, layer in enumerate(model.layers):
                inputs.append(x)
                x = layer(x, pos_emb, dec_attn_mask=mask, mems=torch.cat([cmem[i], mem[i]], 0))[0]
            outs.append(x[:, 0])
            if schedule is not None:
                schedule.append({"tokens": [s, e], "cmem_len": cmem[0].size(0), "mem_len": mem[0].size(0)})
            for i, layer in enumerate(model.layers):
                all_i = torch.cat([mem[i], inputs[i]], 0)
                n_ev = max(0, all_i.size(0) - mem_len)
                if n_ev > 0 and cmem_len > 0:
                    comp = compress_torch(layer, all_i[:n_ev], rate, compression)
                    c = torch.cat([cmem[i], comp], 0)
                    cmem[i] = c[max(0, c.size(0) - cmem_len):]
                mem[i] = all_i[max(0, all_i.size(0) - mem_len):]
    return torch.cat(outs).to(torch.float32).numpy()


# ---------------------------------------------------------------------------
# Independent float64 NumPy implementation, written from the notes
# ---------------------------------------------------------------------------


def _layer_norm(x, g, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * g + b


def numpy_forward(W: dict, cfg: dict, ids: np.ndarray, segment_len: int,
                  compression: str | None = None) -> np.ndarray:
    W = {k: v.astype(np.float64) for k, v in W.items()}
    d, H, dh, L = cfg["d_model"], cfg["n_head"], cfg["d_head"], cfg["n_layer"]
    mem_len, eps, clamp = cfg["mem_len"], cfg["layer_norm_epsilon"], cfg["clamp_len"]
    cmem_len = cfg.get("cmem_len", 0) if compression else 0
    rate = cfg.get("compression_rate", 1)
    bounds = [0, *cfg["cutoffs"], cfg["vocab_size"]]

    def embed(tok):
        out = np.zeros((len(tok), d))
        for c in range(len(bounds) - 1):
            sel = (tok >= bounds[c]) & (tok < bounds[c + 1])
            e = W[f"word_emb.emb_layers.{c}.weight"][tok[sel] - bounds[c]]
            proj = W.get(f"word_emb.emb_projs.{c}")
            out[sel] = e @ proj.T if proj is not None else e
        return out * np.sqrt(d)

    inv_freq = 1.0 / 10000 ** (np.arange(0, d, 2) / d)

    def compress(i, ev):
        n = len(ev)
        assert n % rate == 0
        g = ev.reshape(n // rate, rate, d)
        if compression == "mean":
            return g.mean(1)
        if compression == "max":
            return g.max(1)
        w, b = W[f"layers.{i}.compress.weight"], W[f"layers.{i}.compress.bias"]  # [o, c, t]
        return np.einsum("gtc,oct->go", g, w) + b

    mem = [np.zeros((0, d)) for _ in range(L)]
    cmem = [np.zeros((0, d)) for _ in range(L)]
    outs = []
    for s, e in segments(len(ids), segment_len):
        qlen = e - s
        h = embed(ids[s:e])
        mlen = len(cmem[0]) + len(mem[0])
        klen = mlen + qlen
        # relative distance dist = (mlen + i) - j of query i and key j, clamped
        dist = np.arange(klen)
        ang = np.minimum(dist, clamp if clamp > 0 else klen)[:, None] * inv_freq[None]
        sinus = np.concatenate([np.sin(ang), np.cos(ang)], -1)  # [klen, d] by distance
        inputs = []
        for i in range(L):
            p = f"layers.{i}."
            inputs.append(h)
            ctx = np.concatenate([cmem[i], mem[i], h])  # [klen, d]
            qkv = ctx @ W[p + "dec_attn.qkv_net.weight"].T
            q = qkv[-qlen:, : H * dh].reshape(qlen, H, dh)
            k = qkv[:, H * dh: 2 * H * dh].reshape(klen, H, dh)
            v = qkv[:, 2 * H * dh:].reshape(klen, H, dh)
            r = (sinus @ W[p + "dec_attn.r_net.weight"].T).reshape(klen, H, dh)  # by distance
            u, vb = W[p + "dec_attn.r_w_bias"], W[p + "dec_attn.r_r_bias"]  # [H, dh]
            ac = np.einsum("ihd,jhd->hij", q + u, k)
            bd_by_dist = np.einsum("ihd,rhd->hir", q + vb, r)
            qi, kj = np.meshgrid(np.arange(qlen), np.arange(klen), indexing="ij")
            dd = mlen + qi - kj
            bd = np.take_along_axis(bd_by_dist, np.clip(dd, 0, klen - 1)[None].repeat(H, 0), axis=2)
            score = (ac + bd) / np.sqrt(dh)
            score = np.where((dd < 0)[None], -np.inf, score)
            score = score - score.max(-1, keepdims=True)
            prob = np.exp(score)
            prob /= prob.sum(-1, keepdims=True)
            att = np.einsum("hij,jhd->ihd", prob, v).reshape(qlen, H * dh)
            h1 = _layer_norm(h + att @ W[p + "dec_attn.o_net.weight"].T,
                             W[p + "dec_attn.layer_norm.weight"], W[p + "dec_attn.layer_norm.bias"], eps)
            ff = np.maximum(h1 @ W[p + "pos_ff.CoreNet.0.weight"].T + W[p + "pos_ff.CoreNet.0.bias"], 0)
            ff = ff @ W[p + "pos_ff.CoreNet.3.weight"].T + W[p + "pos_ff.CoreNet.3.bias"]
            h = _layer_norm(h1 + ff, W[p + "pos_ff.layer_norm.weight"], W[p + "pos_ff.layer_norm.bias"], eps)
        outs.append(h)  # no final norm
        for i in range(L):
            all_i = np.concatenate([mem[i], inputs[i]])
            n_ev = max(0, len(all_i) - mem_len)
            if n_ev > 0 and cmem_len > 0:
                c = np.concatenate([cmem[i], compress(i, all_i[:n_ev])])
                cmem[i] = c[max(0, len(c) - cmem_len):]
            mem[i] = all_i[max(0, len(all_i) - mem_len):]
    return np.concatenate(outs)


def check_sensitivity(model: torch.nn.Module, golden: np.ndarray, fn) -> dict:
    """Replace each parameter by zeros (LayerNorm gammas by ones); the golden must move."""
    changes = {}
    ln = {f"{mn}.weight" for mn, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)}
    with torch.no_grad():
        for name, p in model.named_parameters():
            saved = p.detach().clone()
            p.fill_(1.0 if name in ln else 0.0)
            changes[name] = float(np.abs(fn() - golden).max())
            p.copy_(saved)
    weak = {k: v for k, v in changes.items() if not v > 1e-3}
    assert not weak, f"parameters that do not matter: {weak}"
    return changes


# ---------------------------------------------------------------------------
# Notes: what the reference computes (line numbers of modeling_transfo_xl.py 4.37.2)
# ---------------------------------------------------------------------------

XL_NOTES = {
    "source": SRC + "; all line numbers below refer to that file",
    "layout": "the model works in [len, bsz, d] internally (input_ids transposed at line 894, output "
    "transposed back at line 984); everything here is for bsz = 1",
    "adaptive_embedding": "AdaptiveEmbedding(vocab_size, d_embed, d_proj=d_model, cutoffs, div_val) "
    "(lines 399-456, built at 775-777). Cluster bounds cutoff_ends = [0, *cutoffs, vocab_size] "
    "= [0, 20, 50, 100]. div_val != 1 (lines 420-425): cluster c has table "
    "word_emb.emb_layers.{c}.weight [n_c, d_embed // div_val**c] (here [20, 32], [30, 16], [50, 8]) "
    "and projection word_emb.emb_projs.{c} [d_model, d_embed // div_val**c] (here [32, 32], [32, 16], "
    "[32, 8]; note: a plain tensor name, no `.weight`). Token t in [l_c, r_c): "
    "e = emb_layers[c].weight[t - l_c] @ emb_projs[c]^T (F.linear, line 447). div_val == 1 (lines "
    "416-419, 428-431): one table emb_layers.0.weight [vocab, d_embed], and emb_projs.0 [d_model, "
    "d_embed] only if d_model != d_embed (otherwise no projection at all). Then every embedding is "
    "multiplied by emb_scale = sqrt(d_proj) = sqrt(d_model) (lines 410, 454), in both cases",
    "positional_embedding": "PositionalEmbedding(d_model) (lines 178-194, built at 813): inv_freq = "
    "1 / 10000^(arange(0, d_model, 2) / d_model) (line 184, float32, d_model/2 entries; stored as the "
    "persistent buffer pos_emb.inv_freq in model.safetensors); pos_emb = cat([sin(pos_seq x inv_freq), "
    "cos(pos_seq x inv_freq)], -1): all d_model/2 sines first, then all cosines, NOT interleaved "
    "(lines 188-189). pos_seq = arange(klen - 1, -1, -1.0) = klen-1, klen-2, ..., 0 (descending, "
    "float), klen = mlen + qlen; if clamp_len > 0, pos_seq.clamp_(max=clamp_len) (lines 945-948; "
    "clamp_len <= 0 means no clamp). Row k of pos_emb is the embedding of relative distance klen-1-k",
    "attention_projections": "RelPartialLearnableMultiHeadAttn (lines 234-369): qkv_net = "
    "Linear(d_model, 3*n_head*d_head, bias=False) (line 254), weight [96, 32]: rows 0..31 are q, "
    "32..63 k, 64..95 v (torch.chunk(.., 3, -1), line 298); head n uses features n*d_head .. "
    "(n+1)*d_head-1 of each (view, lines 311-313). r_net = Linear(d_model, n_head*d_head, bias=False) "
    "(line 273), weight [32, 32], applied to pos_emb (line 296). o_net = Linear(n_head*d_head, "
    "d_model, bias=False) (line 258), weight [32, 32]. No projection has a bias. k and v are "
    "computed from cat([mems, w]) (line 291, [mlen + qlen, d]); q is the last qlen rows (line 299)",
    "attention_scores": "AC[i, j] = (q_i + r_w_bias[n]) . k_j (lines 318-319); BD = (q_i + "
    "r_r_bias[n]) . r_k with r = r_net(pos_emb) (lines 321-322), then _rel_shift (lines 275-285: "
    "prepend a zero column, view as [klen+1, qlen], drop the first row, view back as [qlen, klen]). "
    "After the shift, for every unmasked entry (j <= i + mlen) BD[i, j] = (q_i + r_r_bias) . "
    "r_net(pos_emb(min(i + mlen - j, clamp_len))): the relative distance is the query's absolute "
    "index (mlen + i) minus the key's (j), 0 for the query itself. Masked entries hold leftovers of "
    "the shift and are overwritten by the mask. score = (AC + BD) * scale, scale = 1 / sqrt(d_head) "
    "(lines 262, 326-327)",
    "mask": "dec_attn_mask = triu(ones(qlen, klen), diagonal = 1 + mlen) (lines 938-940): key j is "
    "masked for query i iff j > i + mlen (causal over [mems; segment], every memory row visible). "
    "Masked scores are set with masked_fill to finfo(float32).min = -3.4028234663852886e+38 (lines "
    "329-339; the fill is skipped when nothing is masked, line 332), so they get softmax weight "
    "exactly 0. softmax over the key axis (dim=1 of [qlen, klen, bsz, n_head], line 342). "
    "same_length=True (not used here, lines 929-936) additionally masks tril(ones, -s) with "
    "mask_len = klen - mem_len (config mem_len), s = qlen - mask_len if mask_len > 0 else qlen: "
    "query i then sees only keys j > i - s, i.e. itself and the previous mem_len keys",
    "attention_output": "attn_vec = sum_j p[i, j] v_j per head, heads concatenated in head order "
    "(lines 350-353); attn_out = o_net(attn_vec) (line 356)",
    "layer": "RelPartialLearnableDecoderLayer (lines 372-396), pre_lnorm False (post-LN): "
    "h1 = dec_attn.layer_norm(w + attn_out) (line 364); out = pos_ff.layer_norm(h1 + "
    "CoreNet(h1)) (line 229), CoreNet = Sequential(Linear(d_model, d_inner) [with bias], ReLU, "
    "Dropout, Linear(d_inner, d_model) [with bias], Dropout) (lines 205-211): weights "
    "pos_ff.CoreNet.0.{weight [37, 32], bias [37]} and pos_ff.CoreNet.3.{weight [32, 37], bias [32]} "
    "(indices 1, 2, 4 are ReLU / Dropout, no parameters). LayerNorm eps = layer_norm_epsilon = 1e-5, "
    "biased variance (torch LayerNorm). pre_lnorm True (not used) would be w + attn(LN(cat)) with the "
    "LN applied to [mems; w] before qkv_net (lines 292-293, 361) and inp + CoreNet(LN(inp))",
    "relative_biases": "untie_r True: per layer layers.{i}.dec_attn.r_w_bias and r_r_bias, "
    "[n_head, d_head] (lines 266-268); r_w_bias is added to q for the content term AC, r_r_bias "
    "for the position term BD. untie_r False (lines 785-787, 801-802): one pair at the top level, "
    "`r_w_bias`, `r_r_bias` [n_head, d_head], shared by every layer; save_pretrained then writes "
    "only those two top-level keys (the per-layer aliases are removed as shared tensors) and "
    "from_pretrained re-ties them",
    "model": "TransfoXLModel.forward (lines 873-994): word_emb -> drop (identity, dropout 0) -> "
    "for each layer i: hids.append(core_out) (line 954), core_out = layer(core_out, pos_emb, "
    "dec_attn_mask, mems=mems[i]) (lines 953-964). The output is the last layer's output after "
    "dropout only: NO final LayerNorm (line 970). mlen = mems[0].size(0) (line 927)",
    "memory": "what is stored is each layer's INPUT, hids[i] (line 954): hids[0] is the scaled "
    "embedding, hids[1] the output of layer 0, ...; the last layer's output is not stored; n_layer "
    "memories. _update_mems (lines 848-865): new_mems[i] = cat([mems[i], hids[i]], 0)[beg:end] "
    "with end = mlen + qlen, beg = max(0, end - mem_len), i.e. the last mem_len rows, detached "
    "(config mem_len, 12 here). With mems=None and mem_len > 0 the model would start from "
    "init_mems = zeros(mem_len, bsz, d_model) per layer (lines 836-846, 902-903), which the "
    "zeros would be ATTENDED to; the fixture instead passes explicit empty mems, n_layer tensors "
    "of shape [0, 1, d_model], so the first segment has mlen = 0",
    "segments": "segment_len 8: tokens [0,8) with mlen 0, [8,16) with mlen 8, then mlen 12 for "
    "[16,24), [24,32), [32,40); last_hidden_state = the five segment outputs concatenated. "
    "last_hidden_state_seg16.npy: segments [0,16) mlen 0, [16,32) mlen 12, [32,40) (qlen 8) mlen 12. "
    "Both goldens agree on rows 0..23 (in both runs token t < 24 attends to exactly the same rows) "
    "and differ from row 24 on",
    "config": "4.37.2's TransfoXLConfig has no tgt_len / ext_len fields (the forward never used "
    "them); tie_projs, sample_softmax, adaptive, init* and proj_init_std only concern the LM head "
    "or initialisation; eos_token_id 0. Real checkpoints (transfo-xl-wt103) are "
    "TransfoXLLMHeadModel with a `transformer.` prefix on these names plus crit.* adaptive-softmax "
    "weights, div_val 4, cutoffs [20000, 40000, 200000], same_length true, clamp_len 1000",
    "dtype": "float32 throughout; softmax in float32 (masked_fill on attn_score.float())",
}


# ---------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------


def clean_save_pretrained(model, out: Path) -> None:
    model.save_pretrained(out, safe_serialization=True)
    for extra in out.iterdir():
        if extra.name not in ("config.json", "model.safetensors"):
            shutil.rmtree(extra) if extra.is_dir() else extra.unlink()
    (out / "model.safetensors").chmod(0o644)


def load_weights(path: Path) -> dict:
    return safetensors.numpy.load_file(str(path))


def gen_transfo_xl() -> None:
    name, seed, seq_len, segment_len = "transfo-xl-tiny", 20, 40, 8
    out = FIXTURES / name
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)

    config = TransfoXLConfig(**XL_SIZES, cutoffs=[20, 50], div_val=2, mem_len=12)
    torch.manual_seed(seed)
    model = TransfoXLModel(config)
    randomize_parameters(model, seed)
    model.eval()
    ids = draw_input_ids(config.vocab_size, seq_len, config.cutoffs)

    golden = run_xl(model, ids, segment_len)
    golden16 = run_xl(model, ids, 16)
    # same_length (the default of TransfoXLConfig and of the published checkpoints): every
    # query sees the last mem_len keys, itself included. TransfoXLModel reads the flag at forward.
    model.same_length = True
    golden_same = run_xl(model, ids, segment_len)
    model.same_length = False
    assert np.abs(golden_same - golden).max() > 1e-2
    diff_rows = np.where(np.abs(golden - golden16).max(1) > 1e-5)[0]
    assert len(diff_rows) and diff_rows[0] == 24, diff_rows

    # Direct layer calls (the compressive reference, with no compressed memory) = model.forward.
    direct = run_compressive(model, ids, segment_len, config.mem_len, 0, 1, "mean")
    assert np.abs(direct - golden).max() < 1e-6, np.abs(direct - golden).max()

    clean_save_pretrained(model, out)
    np.save(out / "input_ids.npy", ids.numpy().astype(np.int64))
    np.save(out / "last_hidden_state.npy", golden)
    np.save(out / "last_hidden_state_seg16.npy", golden16)
    np.save(out / "last_hidden_state_same_length.npy", golden_same)

    sens = check_sensitivity(model, golden, lambda: run_xl(model, ids, segment_len))

    # Verify: reload, recompute with HF, and recompute independently with NumPy.
    ids_back = np.load(out / "input_ids.npy")
    assert ids_back.dtype == np.int64 and ids_back.shape == (seq_len,)
    gold_back = np.load(out / "last_hidden_state.npy")
    gold16_back = np.load(out / "last_hidden_state_seg16.npy")
    for g in (gold_back, gold16_back):
        assert g.dtype == np.float32 and g.shape == (seq_len, config.d_model)
    reloaded = TransfoXLModel.from_pretrained(out).eval()
    reload_diff = max(
        float(np.abs(run_xl(reloaded, torch.from_numpy(ids_back), segment_len) - gold_back).max()),
        float(np.abs(run_xl(reloaded, torch.from_numpy(ids_back), 16) - gold16_back).max()),
    )
    assert reload_diff < 1e-6, reload_diff
    cfg_json = json.loads((out / "config.json").read_text())
    W = load_weights(out / "model.safetensors")
    np_diff = max(
        float(np.abs(numpy_forward(W, cfg_json, ids_back, segment_len) - gold_back).max()),
        float(np.abs(numpy_forward(W, cfg_json, ids_back, 16) - gold16_back).max()),
    )
    assert np_diff < 1e-4, np_diff

    keys = safetensors_keys_shapes(out / "model.safetensors")
    clusters = [int(((ids >= lo) & (ids < hi)).sum()) for lo, hi in zip([0, 20, 50], [20, 50, 100])]
    write_json(out / "meta.json", {
        "model_class": "TransfoXLModel",
        "seed": seed,
        "seed_note": "torch.manual_seed(seed); model = TransfoXLModel(config); parameters re-drawn "
        "(parameter_init); input_ids = torch.randint(0, vocab_size, (40,)) right after on the global "
        "generator, then the cluster-boundary ids [0, 19, 20, 49, 50, 99] written at positions "
        "[3, 11, 17, 26, 30, 38]",
        "parameter_init": PARAMETER_INIT,
        "seq_len": seq_len,
        "segment_len": segment_len,
        "input_id_range": [0, config.vocab_size],
        "tokens_per_cluster": clusters,
        "golden": "for each consecutive segment of segment_len tokens: out = model(input_ids[None, s:e], "
        "mems=mems); mems = out.mems; the first call gets mems = [zeros(0, 1, d_model)] * n_layer "
        "(explicit empty memories). last_hidden_state = cat of out.last_hidden_state[0], float32, "
        "eval mode, dropout 0",
        "golden_seg16": "last_hidden_state_seg16.npy: the same with segment_len 16 (segments 16, 16, 8); "
        f"equal to last_hidden_state.npy on rows 0..{int(diff_rows[0]) - 1}, different from row "
        f"{int(diff_rows[0])} on (max abs difference {float(np.abs(golden - golden16).max()):.3f})",
        "golden_same_length": "last_hidden_state_same_length.npy: segment_len 8 with model.same_length "
        "= True (dec_attn_mask also masks keys at distance >= mem_len, lines 929-936)",
        "golden_std": float(gold_back.std()),
        "golden_seg16_std": float(gold16_back.std()),
        "checks": {
            "reload_max_abs_diff": reload_diff,
            "numpy_float64_reimplementation_max_abs_diff": np_diff,
            "min_change_when_a_parameter_is_zeroed": min(sens.values()),
        },
        "notes": XL_NOTES,
        "safetensors_keys": list(keys),
        "safetensors_shapes": keys,
        "versions": versions(),
        "setup": SETUP,
        "command": COMMAND,
    })
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"{name}: keys={len(keys)} std={gold_back.std():.4f} seg16 std={gold16_back.std():.4f} "
          f"reload-diff={reload_diff:.1e} numpy-diff={np_diff:.1e} "
          f"min-sensitivity={min(sens.values()):.3f} clusters={clusters} total {size} bytes")


COMPRESSIVE_NOTES = {
    "schema": "docs/models/compressive.md (tome's own; no Hugging Face class)",
    "reference": "TransfoXLModel (" + SRC + ") with a torch.nn.Conv1d(d_model, d_model, kernel_size="
    "rate, stride=rate) attached as layers[i].compress; per segment: x = model.word_emb(ids) "
    "(scaled embedding), mlen = len(cmem_i) + len(mem_i) (the same for every layer), klen = mlen + "
    "qlen, dec_attn_mask = triu(ones(qlen, klen), 1 + mlen), pos_seq = klen-1 .. 0 clamped to "
    "clamp_len, pos_emb = model.pos_emb(pos_seq); for each layer x = layers[i](x, pos_emb, "
    "dec_attn_mask, mems=cat([cmem_i, mem_i])) -- exactly TransfoXLModel.forward's loop (lines "
    "942-964) with the memory replaced by [cmem_i; mem_i]; the output is the last layer's output "
    "(no final norm). Everything inside a layer is as in transfo-xl-tiny's notes",
    "positions": "a compressed memory row counts as one position, like any other key: key j of "
    "[cmem; mem; segment] has relative distance (mlen + i) - j to query i, clamped to clamp_len; "
    "causal mask j <= mlen + i; every cmem and mem row is visible to every query",
    "memory_update": "after the segment, per layer i, with layer_input_i the layer's input "
    "for this segment (layer 0: the scaled embedding): all_i = cat(mem_i, layer_input_i); "
    "n_ev = len(all_i) - mem_len; if n_ev > 0: evicted = all_i[:n_ev] (oldest rows), "
    "n_ev % rate must be 0, cmem_i = cat(cmem_i, compress(evicted))[-cmem_len:]; then "
    "mem_i = all_i[-mem_len:]. The first segment starts with empty mem and cmem",
    "compression": "mean: out[g] = mean(evicted[g*rate .. g*rate+rate-1]); max: elementwise max "
    "over the same group; conv: out[g, o] = bias[o] + sum_{c, t} weight[o, c, t] * "
    "evicted[g*rate + t, c] (torch Conv1d on evicted^T, weight [d_model, d_model, rate], "
    "bias [d_model]). The conv weights are stored (and used only) for compression \"conv\"; "
    "the mean/max goldens use the same file",
    "schedule": "segment_len 8, mem_len 8, cmem_len 8, rate 2, 40 tokens: segments with "
    "(len cmem, len mem) before the segment = (0, 0), (0, 8), (4, 8), (8, 8), (8, 8): each "
    "segment evicts 8 rows from the second on (8 -> 4 compressed rows); the 4th segment's update "
    "drops the 4 oldest compressed rows",
    "embedding": "cutoffs [] and div_val 1: one table word_emb.emb_layers.0.weight [100, 32] and, "
    "since d_embed == d_model, no projection (no word_emb.emb_projs.* key); embedding = "
    "table[t] * sqrt(d_model)",
}


def compressive_config_json(base: dict, cmem_len: int, rate: int, compression: str) -> dict:
    cfg = dict(base)
    cfg["model_type"] = "tome-compressive"
    cfg["architectures"] = ["TomeCompressiveModel"]
    cfg["cmem_len"] = cmem_len
    cfg["compression_rate"] = rate
    cfg["compression"] = compression
    return dict(sorted(cfg.items()))


def build_compressive(config: TransfoXLConfig, rate: int) -> TransfoXLModel:
    model = TransfoXLModel(config)
    for layer in model.layers:
        layer.compress = torch.nn.Conv1d(config.d_model, config.d_model, kernel_size=rate, stride=rate)
    return model


def gen_compressive() -> None:
    name, seed, seq_len, segment_len = "compressive-tiny", 21, 40, 8
    mem_len, cmem_len, rate = 8, 8, 2
    out = FIXTURES / name
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)

    config = TransfoXLConfig(**XL_SIZES, cutoffs=[], div_val=1, mem_len=mem_len)
    torch.manual_seed(seed)
    model = build_compressive(config, rate)
    randomize_parameters(model, seed)
    model.eval()
    ids = draw_input_ids(config.vocab_size, seq_len, [])

    schedule: list = []
    goldens = {
        c: run_compressive(model, ids, segment_len, mem_len, cmem_len, rate, c,
                           schedule if c == "conv" else None)
        for c in ("conv", "mean", "max")
    }
    assert [(x["cmem_len"], x["mem_len"]) for x in schedule] == [(0, 0), (0, 8), (4, 8), (8, 8), (8, 8)], schedule
    plain_xl = run_compressive(model, ids, segment_len, mem_len, 0, rate, "conv")
    for a in ("conv", "mean", "max"):
        assert np.abs(goldens[a][:16] - plain_xl[:16]).max() < 1e-6  # no cmem before segment 3
        assert np.abs(goldens[a][16:] - plain_xl[16:]).max() > 1e-3
        for b in ("conv", "mean", "max"):
            if a < b:
                assert np.abs(goldens[a][16:] - goldens[b][16:]).max() > 1e-3, (a, b)

    clean_save_pretrained(model, out)
    base = json.loads((out / "config.json").read_text())
    write_json(out / "config.json", compressive_config_json(base, cmem_len, rate, "conv"))
    np.save(out / "input_ids.npy", ids.numpy().astype(np.int64))
    np.save(out / "last_hidden_state.npy", goldens["conv"])
    np.save(out / "last_hidden_state_mean.npy", goldens["mean"])
    np.save(out / "last_hidden_state_max.npy", goldens["max"])

    sens = check_sensitivity(
        model, goldens["conv"],
        lambda: run_compressive(model, ids, segment_len, mem_len, cmem_len, rate, "conv"))

    # Verify: rebuild from config.json + model.safetensors alone, recompute; NumPy recompute.
    cfg_json = json.loads((out / "config.json").read_text())
    xl_fields = {k: v for k, v in cfg_json.items()
                 if k not in ("model_type", "architectures", "cmem_len", "compression_rate", "compression",
                              "transformers_version", "torch_dtype", "tie_projs")}
    re_config = TransfoXLConfig(**xl_fields)
    reloaded = build_compressive(re_config, cfg_json["compression_rate"])
    reloaded.load_state_dict(safetensors.torch.load_file(str(out / "model.safetensors")), strict=True)
    reloaded.eval()
    ids_back = np.load(out / "input_ids.npy")
    assert ids_back.dtype == np.int64 and ids_back.shape == (seq_len,)
    W = load_weights(out / "model.safetensors")
    reload_diff, np_diff, stds = 0.0, 0.0, {}
    for c, fname in (("conv", "last_hidden_state.npy"), ("mean", "last_hidden_state_mean.npy"),
                     ("max", "last_hidden_state_max.npy")):
        g = np.load(out / fname)
        assert g.dtype == np.float32 and g.shape == (seq_len, config.d_model)
        again = run_compressive(reloaded, torch.from_numpy(ids_back), segment_len, cfg_json["mem_len"],
                                cfg_json["cmem_len"], cfg_json["compression_rate"], c)
        reload_diff = max(reload_diff, float(np.abs(again - g).max()))
        np_diff = max(np_diff, float(np.abs(numpy_forward(W, cfg_json, ids_back, segment_len, c) - g).max()))
        stds[fname] = float(g.std())
    assert reload_diff < 1e-6, reload_diff
    assert np_diff < 1e-4, np_diff

    keys = safetensors_keys_shapes(out / "model.safetensors")
    write_json(out / "meta.json", {
        "model": "tome's Compressive Transformer (docs/models/compressive.md)",
        "seed": seed,
        "seed_note": "torch.manual_seed(seed); model = TransfoXLModel(config) then layers[i].compress = "
        "Conv1d(d_model, d_model, rate, stride=rate) for each layer in order; parameters re-drawn "
        "(parameter_init); input_ids = torch.randint(0, vocab_size, (40,)) right after on the global "
        "generator, then ids [0, 99] written at positions [3, 11]",
        "parameter_init": PARAMETER_INIT,
        "seq_len": seq_len,
        "segment_len": segment_len,
        "mem_len": mem_len,
        "cmem_len": cmem_len,
        "compression_rate": rate,
        "input_id_range": [0, config.vocab_size],
        "golden": "last_hidden_state.npy: compression \"conv\" (as config.json says); "
        "last_hidden_state_mean.npy / last_hidden_state_max.npy: the same weights and input with "
        "compression \"mean\" / \"max\" (conv weights unused). Segment outputs concatenated, float32",
        "golden_std": stds,
        "memory_schedule": schedule,
        "checks": {
            "reload_max_abs_diff": reload_diff,
            "numpy_float64_reimplementation_max_abs_diff": np_diff,
            "min_change_when_a_parameter_is_zeroed": min(sens.values()),
            "rows_equal_to_plain_xl": "rows 0..15 equal plain Transformer-XL with mem_len 8 (no cmem yet); "
            "rows 16..39 differ, and differ between conv / mean / max",
        },
        "notes": COMPRESSIVE_NOTES,
        "safetensors_keys": list(keys),
        "safetensors_shapes": keys,
        "versions": versions(),
        "setup": SETUP,
        "command": COMMAND,
    })
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"{name}: keys={len(keys)} std={stds} reload-diff={reload_diff:.1e} numpy-diff={np_diff:.1e} "
          f"min-sensitivity={min(sens.values()):.3f} total {size} bytes")


def main() -> None:
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    FIXTURES.mkdir(parents=True, exist_ok=True)
    gens = {"transfo-xl-tiny": gen_transfo_xl, "compressive-tiny": gen_compressive}
    for name in sys.argv[1:] or list(gens):
        gens[name]()


if __name__ == "__main__":
    main()
