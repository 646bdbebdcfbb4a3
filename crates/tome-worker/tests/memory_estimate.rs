//! The activation estimate against the heap a job's ranks really use. A counting global
//! allocator (this test binary is a process of its own) records, for each rank, the peak of the
//! live heap bytes its threads allocated while every rank of a job runs [`run_rank`] on an
//! in-process group, above what was live before (the weights, built at random from a config);
//! the rank's estimate must cover that peak, and on the main families exceed the highest rank's
//! by at most a fifth.

use std::alloc::{GlobalAlloc, Layout as AllocLayout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use candle_core::{DType, Device, Shape as TensorShape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use tome_dist::{run_ranks, Frame, Group, InProcessGroup, Layout};
use tome_model::{EncodeOptions, ModelConfig, ModelDir, Pooling};
use tome_worker::{activation_bytes, pool_targets, run_rank, JobSpec, RankWork};

/// Counts live heap bytes and their peak for each rank: an allocation is charged to the rank
/// whose thread made it (`tome-rank-R` and its pool's `tome-rank-R.I`), until it is freed by
/// whichever thread, through a tag in a header before the block.
struct Counting;

/// Ranks counted apart; allocations of other threads are counted under the last slot.
const SLOTS: usize = 8;
const OTHER: u8 = SLOTS as u8 - 1;
const UNKNOWN: u8 = u8::MAX;

static LIVE: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];
static PEAK: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];

thread_local! {
    static TAG: Cell<u8> = const { Cell::new(UNKNOWN) };
}

/// The slot of the calling thread, from its name the first time.
fn slot() -> u8 {
    TAG.with(|t| {
        if t.get() == UNKNOWN {
            // Reading the name may allocate: those allocations count as other.
            t.set(OTHER);
            let rank = std::thread::current().name().and_then(|n| n.strip_prefix("tome-rank-")).and_then(|n| n.split('.').next()).and_then(|r| r.parse::<u8>().ok());
            t.set(rank.filter(|&r| r < OTHER).unwrap_or(OTHER));
        }
        t.get()
    })
}

/// Bytes before each block: the tag, kept aligned for the block.
fn header(layout: AllocLayout) -> usize {
    layout.align().max(16)
}

// SAFETY: blocks come from the system allocator with room for a header in front; the pointer
// handed out is the block's start plus the header, aligned as asked, and dealloc undoes that.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: AllocLayout) -> *mut u8 {
        let pad = header(layout);
        let Ok(full) = AllocLayout::from_size_align(layout.size() + pad, layout.align().max(16)) else { return std::ptr::null_mut() };
        let base = unsafe { System.alloc(full) };
        if base.is_null() {
            return base;
        }
        let s = slot();
        unsafe { base.add(pad - 1).write(s) };
        let now = LIVE[s as usize].fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK[s as usize].fetch_max(now, Ordering::Relaxed);
        unsafe { base.add(pad) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: AllocLayout) {
        let pad = header(layout);
        let s = unsafe { ptr.sub(1).read() };
        LIVE[s as usize].fetch_sub(layout.size(), Ordering::Relaxed);
        let full = unsafe { AllocLayout::from_size_align_unchecked(layout.size() + pad, layout.align().max(16)) };
        unsafe { System.dealloc(ptr.sub(pad), full) };
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Random weights of any name and shape (small uniform values, deterministic per name), so a
/// model of any width can be built from a config alone.
struct RandomWeights;

impl SimpleBackend for RandomWeights {
    fn get(&self, s: TensorShape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let mut state = name.bytes().fold(0x9e37_79b9_7f4a_7c15u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3));
        let values: Vec<f32> = (0..s.elem_count())
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2
            })
            .collect();
        Tensor::from_vec(values, s, dev)?.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("no shape for {name}")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        false
    }
}

fn model(config: &str) -> ModelDir {
    let vb = VarBuilder::from_backend(Box::new(RandomWeights), DType::F32, Device::Cpu);
    let model = ModelConfig::from_json(config).unwrap().load(vb).unwrap_or_else(|e| panic!("{e}"));
    ModelDir { path: "random".into(), model, tokenizer: None, pooling: Pooling::Mean, normalize: false }
}

/// The in-process group as a worker's peer group behaves for memory: a received frame is
/// decoded into tensors of the receiving rank's own (the in-process group hands over the
/// sender's), which the receiver's thread allocates and so is charged for.
struct Decoding<'a>(&'a InProcessGroup);

impl Group for Decoding<'_> {
    fn rank(&self) -> usize {
        self.0.rank()
    }

    fn size(&self) -> usize {
        self.0.size()
    }

    fn send(&self, dst: usize, frame: Frame) -> tome_dist::Result<()> {
        self.0.send(dst, frame)
    }

    fn recv(&self, src: usize) -> tome_dist::Result<Frame> {
        Ok(self.0.recv(src)?.iter().map(Tensor::copy).collect::<candle_core::Result<_>>()?)
    }

    fn bytes_sent(&self) -> u64 {
        self.0.bytes_sent()
    }
}

struct Case {
    name: &'static str,
    config: String,
    tokens: usize,
    ranks: usize,
    opts: EncodeOptions,
    log_probs: bool,
    /// Pool chunks of this many tokens besides the document (encoders).
    chunk: Option<usize>,
}

/// (measured peak, estimate) of each rank of the case, in bytes, and the peak of what other
/// threads allocated meanwhile.
fn measure(case: &Case) -> (Vec<(u64, u64)>, u64) {
    let dir = model(&case.config);
    let vocab = dir.model.shape().vocab_size as u32;
    let ids: Vec<u32> = (0..case.tokens as u32).map(|i| (i * 7919 + 13) % vocab).collect();
    let doc = dir.model.prepare(ids, &case.opts).unwrap();
    let mut spec = JobSpec::new(Arc::new(dir), Arc::new(doc), case.ranks, Layout::Contiguous).unwrap();
    spec.log_probs = case.log_probs;
    spec.document = !case.log_probs;
    if let Some(c) = case.chunk {
        spec.chunks = (0..case.tokens).step_by(c).map(|s| s..(s + c).min(case.tokens)).collect();
    }
    let (doc, plan) = (&spec.doc, &spec.plan);
    let spans = pool_targets(doc.len(), spec.document, &spec.chunks);
    let shape = spec.model.model.shape();
    let estimates: Vec<u64> = (0..case.ranks).map(|r| activation_bytes(&shape, &spec.rank_load(r))).collect();
    let inputs: Vec<_> = (0..case.ranks).map(|r| doc.shard(plan, r)).collect();
    let next: Vec<_> = (0..case.ranks).map(|r| doc.next_ids(plan, r)).collect();
    let before: Vec<usize> = LIVE.iter().map(|l| l.load(Ordering::Relaxed)).collect();
    for (p, b) in PEAK.iter().zip(&before) {
        p.store(*b, Ordering::Relaxed);
    }
    let outputs = run_ranks(case.ranks, |g: &InProcessGroup| {
        let r = g.rank();
        let work = RankWork {
            model: &spec.model,
            plan,
            input: &inputs[r],
            spans: &spans,
            pooling: spec.pooling,
            hidden: spec.hidden,
            next_ids: spec.log_probs.then_some(next[r].as_slice()),
            device: spec.device,
            gpu_slot: r,
        };
        run_rank(&Decoding(g), &work, &mut |_| true)
    })
    .unwrap();
    let peaks: Vec<u64> = PEAK.iter().zip(&before).map(|(p, b)| (p.load(Ordering::Relaxed) - b) as u64).collect();
    drop(outputs);
    (peaks.iter().copied().zip(estimates).collect(), peaks[OTHER as usize])
}

fn bert(model_type: &str, hidden: usize, layers: usize, extra: &str) -> String {
    format!(
        r#"{{"model_type": "{model_type}", "vocab_size": 1000, "hidden_size": {hidden}, "num_hidden_layers": {layers}, "num_attention_heads": 4,
            "intermediate_size": {}, "max_position_embeddings": 65536, "type_vocab_size": 1, "hidden_act": "gelu"{extra}}}"#,
        4 * hidden
    )
}

fn llama(hidden: usize) -> String {
    format!(
        r#"{{"model_type": "llama", "vocab_size": 4000, "hidden_size": {hidden}, "intermediate_size": {}, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 65536, "rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": false}}"#,
        4 * hidden
    )
}

/// The other architectures and families, small: (name, config.json).
fn others(h: usize) -> Vec<(&'static str, String)> {
    let (i, kv) = (4 * h, h / 4);
    vec![
        ("GPT-2", format!(r#"{{"model_type": "gpt2", "n_embd": {h}, "n_head": 4, "n_layer": 2, "n_positions": 65536, "vocab_size": 4000, "activation_function": "gelu_new"}}"#)),
        (
            "GPT-Neo, global and local layers",
            format!(
                r#"{{"model_type": "gpt_neo", "hidden_size": {h}, "num_heads": 4, "num_layers": 2, "attention_types": [[["global", "local"], 1]], "intermediate_size": {i},
                    "max_position_embeddings": 65536, "vocab_size": 4000, "window_size": 256, "activation_function": "gelu_new"}}"#
            ),
        ),
        ("Longformer, window attention", bert("longformer", h, 2, r#", "attention_window": 256, "pad_token_id": 1"#)),
        ("Performer, FAVOR+", bert("tome-performer", h, 2, r#", "nb_features": 64"#)),
        ("Performer, causal FAVOR+", bert("tome-performer", h, 2, r#", "nb_features": 64, "causal": true"#)),
        (
            "Switch Transformers, experts and relative bias",
            format!(
                r#"{{"model_type": "switch_transformers", "d_model": {h}, "d_ff": {i}, "d_kv": {kv}, "num_heads": 4, "num_layers": 2, "num_experts": 4, "expert_capacity": 65536,
                    "encoder_sparse_step": 2, "vocab_size": 1000, "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128, "dense_act_fn": "relu"}}"#
            ),
        ),
        (
            "MPNet, relative bias",
            format!(
                r#"{{"model_type": "mpnet", "hidden_size": {h}, "intermediate_size": {i}, "num_attention_heads": 4, "num_hidden_layers": 2, "max_position_embeddings": 65536,
                    "vocab_size": 1000, "relative_attention_num_buckets": 32, "hidden_act": "gelu", "pad_token_id": 1}}"#
            ),
        ),
        (
            "ModernBERT, global and sliding layers",
            format!(
                r#"{{"model_type": "modernbert", "hidden_size": {h}, "intermediate_size": {i}, "num_attention_heads": 4, "num_hidden_layers": 2,
                    "layer_types": ["full_attention", "sliding_attention"], "global_attn_every_n_layers": 2, "local_attention": 256, "max_position_embeddings": 65536,
                    "vocab_size": 1000, "hidden_activation": "gelu", "rope_parameters": {{"full_attention": {{"rope_theta": 160000.0, "rope_type": "default"}},
                    "sliding_attention": {{"rope_theta": 10000.0, "rope_type": "default"}}}}}}"#
            ),
        ),
        (
            "Reformer, local and LSH layers",
            format!(
                r#"{{"model_type": "reformer", "attention_head_size": {}, "attn_layers": ["local", "lsh"], "axial_pos_embds": true, "axial_pos_embds_dim": [{}, {}],
                    "axial_pos_shape": [128, 128], "feed_forward_size": {i}, "hidden_act": "gelu", "hidden_size": {h}, "local_attn_chunk_length": 64,
                    "local_num_chunks_after": 0, "local_num_chunks_before": 1, "lsh_attn_chunk_length": 64, "lsh_num_chunks_after": 0, "lsh_num_chunks_before": 1,
                    "max_position_embeddings": 16384, "num_attention_heads": 2, "num_buckets": 128, "num_hashes": 2, "num_hidden_layers": 2, "vocab_size": 1000,
                    "is_decoder": false}}"#,
                h / 2,
                h / 2,
                h / 2
            ),
        ),
        (
            "Transformer-XL, segment memories",
            format!(
                r#"{{"model_type": "transfo-xl", "adaptive": false, "cutoffs": [], "div_val": 1, "d_embed": {h}, "d_model": {h}, "d_head": {kv}, "n_head": 4, "d_inner": {i},
                    "mem_len": 256, "n_layer": 2, "vocab_size": 1000, "clamp_len": 1000, "tie_projs": [false]}}"#
            ),
        ),
        (
            "Compressive Transformer, memories and compressed memories",
            format!(
                r#"{{"model_type": "tome-compressive", "adaptive": true, "cutoffs": [], "div_val": 1, "d_embed": {h}, "d_model": {h}, "d_head": {kv}, "n_head": 4,
                    "d_inner": {i}, "mem_len": 256, "cmem_len": 128, "compression": "conv", "compression_rate": 2, "n_layer": 2, "vocab_size": 1000, "clamp_len": 1000,
                    "same_length": false, "tie_projs": [false]}}"#
            ),
        ),
    ]
}

/// Each rank's estimate covers the peak its run reaches, and is at most a fifth above the
/// highest rank's for the main families at thousands of tokens a rank (activations dominate) on
/// two ranks, so that what other ranks send is counted; for every other architecture and
/// family, on shorter shards, it covers the peak. One test, its cases in turn: the counters are
/// the process's.
#[test]
fn estimates_cover_measured_peaks() {
    let plain = EncodeOptions::default;
    let case = |name, config, opts, log_probs| Case { name, config, tokens: 12_288, ranks: 2, opts, log_probs, chunk: None };
    let banded = [
        case("BERT, dense ring attention", bert("bert", 128, 2, ""), plain(), false),
        case(
            "Longformer, window attention with global tokens",
            bert("longformer", 128, 2, r#", "attention_window": 256, "pad_token_id": 1"#),
            EncodeOptions { global_tokens: vec![0, 100, 7000], ..Default::default() },
            false,
        ),
        case("BigBird, block-sparse attention", bert("big_bird", 128, 2, r#", "block_size": 64, "num_random_blocks": 3"#), plain(), false),
        case("Llama, causal with log-probs", llama(128), plain(), true),
        // Window layers stream: on long shards pooling the last hidden states is the peak.
        Case {
            name: "Longformer, window attention, pooled into chunks",
            config: bert("longformer", 128, 2, r#", "attention_window": 256, "pad_token_id": 1"#),
            tokens: 65_536,
            ranks: 2,
            opts: plain(),
            log_probs: false,
            chunk: Some(256),
        },
    ];
    let covered: Vec<Case> = others(64).into_iter().map(|(name, config)| Case { name, config, tokens: 4096, ranks: 2, opts: plain(), log_probs: false, chunk: None }).collect();
    let mut report = String::new();
    let mut outside = Vec::new();
    for (case, most) in banded.iter().map(|c| (c, 1.2)).chain(covered.iter().map(|c| (c, f64::INFINITY))) {
        let (ranks, other) = measure(case);
        // Every rank within its estimate; the band holds for the rank that peaks highest (ranks
        // with equal shards have equal estimates, and which of them peaks highest depends on
        // when frames arrive).
        let highest = ranks.iter().map(|&(peak, estimate)| estimate as f64 / peak as f64).fold(f64::INFINITY, f64::min);
        for (r, (peak, estimate)) in ranks.into_iter().enumerate() {
            let ratio = estimate as f64 / peak as f64;
            report += &format!("{}, rank {r} of {} tokens: peak {peak} B, estimate {estimate} B ({ratio:.2}x)\n", case.name, case.tokens / case.ranks);
            if ratio < 1.0 {
                outside.push(format!("{} (rank {r})", case.name));
            }
        }
        if highest > most {
            outside.push(case.name.to_string());
        }
        report += &format!("  other threads: {other} B\n");
    }
    println!("{report}");
    assert!(outside.is_empty(), "estimates under a rank's measured peak, or more than a fifth above the highest where the band applies: {outside:?}\n{report}");
}
