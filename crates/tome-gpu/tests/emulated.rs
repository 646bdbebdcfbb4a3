//! kernels/attention.cu run on the CPU under tests/emulated/cuda_emulation.h (each CUDA thread
//! of a block a coroutine, barriers and warp shuffles passing control round-robin), against
//! the naive reference: the kernel's indexing, masking, tiling and online softmax are checked
//! here, where there is no GPU. The same cases run on a GPU in tests/gpu.rs.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use candle_core::{DType, Tensor};
use tome_attn::{Mask, Partial};

/// A harness binary (`tests/emulated/NAME.cpp`), compiled with the host's C++ compiler (`CXX`,
/// default `c++`).
fn build(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/emulated");
    let bin = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let status = Command::new(&cxx)
        .args(["-std=c++20", "-O2", "-Wall", "-Wno-unknown-pragmas", "-o"])
        .arg(&bin)
        .arg(dir.join(format!("{name}.cpp")))
        .status()
        .unwrap_or_else(|e| panic!("{cxx}: {e} (scripts/prereqs.sh cxx installs a C++ compiler)"));
    assert!(status.success(), "{name}: the emulated kernels do not compile with {cxx}");
    bin
}

fn harness() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| build("attention_harness"))
}

/// Values as the harness reads them (little-endian, as this host is).
fn bytes_of<T: bytemuck::Pod>(v: &[T]) -> Vec<u8> {
    bytemuck::cast_slice(v).to_vec()
}

fn elements(t: &Tensor) -> Vec<u8> {
    let flat = t.flatten_all().unwrap();
    match t.dtype() {
        DType::BF16 => bytes_of(&flat.to_vec1::<half::bf16>().unwrap().into_iter().map(half::bf16::to_bits).collect::<Vec<_>>()),
        _ => bytes_of(&flat.to_vec1::<f32>().unwrap()),
    }
}

/// Runs `bin IN OUT` on `input`; returns OUT as f32s.
fn run_harness(bin: &Path, input: Vec<u8>) -> Vec<f32> {
    let dir = tempdir();
    let (inp, out) = (dir.join("in"), dir.join("out"));
    std::fs::write(&inp, input).unwrap();
    let status = Command::new(bin).arg(&inp).arg(&out).status().unwrap();
    assert!(status.success(), "{}: {status}", bin.display());
    let raw = std::fs::read(&out).unwrap().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    std::fs::remove_dir_all(&dir).unwrap();
    raw
}

/// One kernel call through the harness.
fn emulated(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Mask<'_>, scale: f32) -> Partial {
    call(harness(), &[i64::from(q.dtype() == DType::BF16)], q, k, v, mask, scale)
}

/// One attention call through harness `bin`: the harness's own leading header words (`mode`),
/// the sizes and the mask's rule, then the scale, q, k, v, the positions and the validity, as
/// the harnesses read them; the partial it wrote.
fn call(bin: &Path, mode: &[i64], q: &Tensor, k: &Tensor, v: &Tensor, mask: &Mask<'_>, scale: f32) -> Partial {
    let (hq, nq, d) = q.dims3().unwrap();
    let (hk, nk, _) = k.dims3().unwrap();
    let dv = v.dims3().unwrap().2;
    let sizes = [hq, hk, nq, nk, d, dv].map(|n| n as i64);
    let rule = [i64::from(mask.causal), mask.window.map_or(-1, |w| w as i64), i64::from(mask.key_valid.is_some())];
    let mut input = bytes_of(&[mode, &sizes, &rule].concat());
    input.extend(scale.to_le_bytes());
    for t in [q, k, v] {
        input.extend(elements(t));
    }
    input.extend(bytes_of(mask.q_pos));
    input.extend(bytes_of(mask.k_pos));
    if let Some(valid) = mask.key_valid {
        input.extend(valid.iter().map(|&b| u8::from(b)));
    }
    let raw = run_harness(bin, input);
    let (o, l) = raw.split_at(hq * nq * dv);
    Partial::from_vecs(o.to_vec(), l.to_vec(), hq, nq, dv).unwrap()
}

fn tempdir() -> PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("emulated-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed)));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn emulated_kernel_matches_the_reference_on_every_case() {
    for case in common::cases() {
        common::check_against_reference(&emulated, &case);
    }
}

#[test]
fn emulated_kernel_partials_of_key_blocks_merge_to_the_whole() {
    for case in common::cases() {
        common::check_blocks_merge(&emulated, &case, 3);
    }
}

/// One call of `attention_mma.cu` through its harness: operands f16 or bf16; the inputs are
/// f32 (rounded to the operands' type first, as a bf16 or f16 run's are) unless `q` is bf16,
/// which the kernel then reads as bits.
fn emulated_mma(f16: bool, q: &Tensor, k: &Tensor, v: &Tensor, mask: &Mask<'_>, scale: f32) -> Partial {
    static MMA: OnceLock<PathBuf> = OnceLock::new();
    call(MMA.get_or_init(|| build("attention_mma_harness")), &[i64::from(f16), i64::from(q.dtype() == DType::BF16)], q, k, v, mask, scale)
}

/// The tensor-core kernel against the naive reference on every case, in bf16 and f16 operands
/// (`common::check_tensor_cores`).
#[test]
fn emulated_tensor_core_kernel_matches_the_reference_on_every_case() {
    for case in common::cases() {
        common::check_tensor_cores(&emulated_mma, &case);
    }
}

/// Every kernel of kernels/layers.cu against its definition (candle's ops, tome-attn's merge):
/// embeddings, layer norm, bias with each activation, bias with residual, heads split and
/// merged back, and partials merged (rows that saw nothing on one side, or on both).
#[test]
fn emulated_layer_kernels_match_their_definitions() {
    use candle_core::Device;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    let (n, hidden, heads, vocab, npos) = (37usize, 48usize, 4usize, 50usize, 40usize);
    let d = hidden / heads;
    let (eps, word_scale) = (1e-12f32, 1.5f32);
    let mut rng = StdRng::seed_from_u64(7);
    let mut vals = |len: usize, scale: f32| -> Vec<f32> { (0..len).map(|_| rng.random_range(-scale..scale)).collect() };
    let word = vals(vocab * hidden, 1.0);
    let position = vals(npos * hidden, 1.0);
    let token_type = vals(hidden, 1.0);
    let (gamma, beta, bias) = (vals(hidden, 2.0), vals(hidden, 1.0), vals(hidden, 1.0));
    let (residual, x) = (vals(n * hidden, 3.0), vals(n * hidden, 4.0));
    let (acc_out, out) = (vals(n * hidden, 1.0), vals(n * hidden, 1.0));
    let (mut acc_lse, mut lse) = (vals(heads * n, 5.0), vals(heads * n, 5.0));
    acc_lse[3] = f32::NEG_INFINITY;
    lse[5] = f32::NEG_INFINITY;
    (acc_lse[8], lse[8]) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
    let ids: Vec<u32> = (0..n).map(|i| (i * 7 % vocab) as u32).collect();
    let pos_ids: Vec<u32> = (0..n).map(|i| (i % npos) as u32).collect();

    let mut input = bytes_of(&[n as i64, hidden as i64, heads as i64, vocab as i64, npos as i64]);
    input.extend(bytes_of(&[eps, word_scale]));
    input.extend(bytes_of(&ids));
    input.extend(bytes_of(&pos_ids));
    let tiny = f32::MIN_POSITIVE / 4.0;
    let to_round = [
        1.0 + 2f32.powi(-8),
        1.0 + 3.0 * 2f32.powi(-8),
        1.0 + 2f32.powi(-8) + 2f32.powi(-20),
        -2.5,
        tiny,
        -tiny,
        f32::MAX,
        f32::INFINITY,
        f32::NAN,
        0.1,
        -0.3,
        1e30,
        3.0e-38,
        65504.0,
        -0.0,
        7.0,
        // f16's edges: past its largest value, its subnormals and their halfway points.
        65519.0,
        65520.0,
        -1.0e-5,
        2f32.powi(-25),
        3.0 * 2f32.powi(-25),
        2f32.powi(-14) * (1.0 - 2f32.powi(-11)),
        5.960_464_5e-8,
        -(1.0 + 2f32.powi(-11)),
    ];
    for v in [&word, &position, &token_type, &gamma, &beta, &bias, &residual, &x, &acc_out, &acc_lse, &out, &lse, &to_round.to_vec()] {
        input.extend(bytes_of(v));
    }
    static LAYERS: OnceLock<PathBuf> = OnceLock::new();
    let got = run_harness(LAYERS.get_or_init(|| build("layers_harness")), input);
    let mut at = 0;
    let mut take = |len: usize| -> Vec<f32> {
        at += len;
        got[at - len..at].to_vec()
    };

    let close = |what: &str, got: &[f32], want: &[f32], tol: f32| {
        assert_eq!(got.len(), want.len(), "{what}");
        for (i, (a, b)) in got.iter().zip(want).enumerate() {
            assert!((a.is_infinite() && a == b) || (a - b).abs() <= tol, "{what}[{i}] = {a}, expected {b}");
        }
    };
    let t = |v: &[f32], shape: (usize, usize)| Tensor::from_slice(v, shape, &Device::Cpu).unwrap();
    let flat = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();

    let embedded: Vec<f32> = (0..n * hidden)
        .map(|i| {
            let (r, c) = (i / hidden, i % hidden);
            (word[ids[r] as usize * hidden + c] * word_scale + position[pos_ids[r] as usize * hidden + c]) + token_type[c]
        })
        .collect();
    close("embed", &take(n * hidden), &embedded, 0.0);

    let norm = candle_nn::LayerNorm::new(Tensor::from_slice(&gamma, hidden, &Device::Cpu).unwrap(), Tensor::from_slice(&beta, hidden, &Device::Cpu).unwrap(), f64::from(eps));
    close("layer norm", &take(n * hidden), &flat(candle_core::Module::forward(&norm, &t(&x, (n, hidden))).unwrap()), 2e-5);

    let biased = t(&x, (n, hidden)).broadcast_add(&Tensor::from_slice(&bias, hidden, &Device::Cpu).unwrap()).unwrap();
    close("bias", &take(n * hidden), &flat(biased.clone()), 0.0);
    close("bias + gelu", &take(n * hidden), &flat(biased.gelu_erf().unwrap()), 2e-6);
    close("bias + gelu (tanh)", &take(n * hidden), &flat(biased.gelu().unwrap()), 2e-6);
    close("bias + relu", &take(n * hidden), &flat(biased.relu().unwrap()), 0.0);
    close("bias + residual", &take(n * hidden), &flat((biased + t(&residual, (n, hidden))).unwrap()), 0.0);

    let split = t(&x, (n, hidden)).reshape((n, heads, d)).unwrap().transpose(0, 1).unwrap().contiguous().unwrap();
    close("split heads", &take(n * hidden), &flat(split), 0.0);
    close("merge heads", &take(n * hidden), &x, 0.0);
    let half = t(&x, (n, hidden)).narrow(1, hidden / 2, hidden / 2).unwrap().reshape((n, heads / 2, d)).unwrap().transpose(0, 1).unwrap().contiguous().unwrap();
    close("split heads of columns", &take(n * hidden / 2), &flat(half), 0.0);

    let rms = candle_nn::RmsNorm::new(Tensor::from_slice(&gamma, hidden, &Device::Cpu).unwrap(), f64::from(eps));
    close("rms norm", &take(n * hidden), &flat(candle_core::Module::forward(&rms, &t(&x, (n, hidden))).unwrap()), 2e-5);
    let (cos, sin) = (take(n * d), take(n * d));
    let rotated: Vec<f32> = (0..n * hidden)
        .map(|i| {
            let (row, t) = ((i / d) % n, i % d);
            let (h, half) = (i / (n * d), d / 2);
            let at = |c: usize| x[row * hidden + h * d + c];
            let (c, s) = (cos[row * d + t], sin[row * d + t]);
            if t < half {
                at(t) * c + (-at(t + half)) * s
            } else {
                at(t) * c + at(t - half) * s
            }
        })
        .collect();
    close("rotary positions", &take(n * hidden), &rotated, 1e-6);
    let swiglu: Vec<f32> = x.iter().zip(&residual).map(|(&g, &u)| (g / (1.0 + (-g).exp())) * u).collect();
    close("silu · up", &take(n * hidden), &swiglu, 1e-5);
    let want: Vec<u32> = to_round.iter().map(|&v| tome_attn::bf16::round_to_bf16(v).to_bits()).collect();
    let count = to_round.len();
    for what in ["bf16 bits", "rounded in place"] {
        let got: Vec<u32> = take(count).iter().map(|v| v.to_bits()).collect();
        for ((g, w), v) in got.iter().zip(&want).zip(&to_round) {
            assert_eq!(g, w, "{what} of {v:e}: {g:#x}, tome-attn rounds to {w:#x}");
        }
    }
    let bits: Vec<u16> = take(count).iter().map(|&v| v as u16).collect();
    let in_place: Vec<u32> = take(count).iter().map(|v| v.to_bits()).collect();
    for (i, v) in to_round.iter().enumerate() {
        let want = half::f16::from_f32(*v);
        assert_eq!(bits[i], want.to_bits(), "f16 bits of {v:e}: {:#x}, half rounds to {:#x}", bits[i], want.to_bits());
        let widened = want.to_f32();
        assert!(in_place[i] == widened.to_bits() || widened.is_nan() && f32::from_bits(in_place[i]).is_nan(), "f16 of {v:e} in place: {:#x}, expected {widened:e}", in_place[i]);
    }

    let partial =
        |o: &[f32], l: &[f32]| Partial { out: Tensor::from_slice(o, (heads, n, d), &Device::Cpu).unwrap(), lse: Tensor::from_slice(l, (heads, n), &Device::Cpu).unwrap() };
    let merged = partial(&acc_out, &acc_lse).merge(&partial(&out, &lse)).unwrap();
    close("merged out", &take(n * hidden), &flat(merged.out), 1e-6);
    close("merged lse", &take(heads * n), &flat(merged.lse), 1e-6);
    let split_row = |h: usize, r: usize| -> Vec<f32> { (0..d).map(|t| x[r * hidden + h * d + t]).collect() };
    let (picked, placed) = ([5, 0, n - 1, 12], [1, n - 7, 2, 7]);
    let gathered: Vec<f32> = (0..heads).flat_map(|h| picked.iter().flat_map(move |&r| split_row(h, r))).collect();
    close("rows gathered", &take(heads * 4 * d), &gathered, 0.0);
    let mut scattered = vec![0f32; n * hidden];
    for h in 0..heads {
        for (&from, &to) in picked.iter().zip(&placed) {
            scattered[(h * n + to) * d..(h * n + to + 1) * d].copy_from_slice(&split_row(h, from));
        }
    }
    close("rows scattered", &take(n * hidden), &scattered, 0.0);
    assert_eq!(at, got.len(), "every output read");
}
