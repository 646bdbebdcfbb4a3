//! The attention cases every GPU-kernel test runs (on a GPU, and under the CPU emulation), and
//! the checks against tome-attn's naive reference.

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tome_attn::{reference, Mask, Partial};

/// One call: sizes, positions and the mask's rule.
pub struct Case {
    pub name: &'static str,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub value_dim: usize,
    pub q_pos: Vec<i64>,
    pub k_pos: Vec<i64>,
    pub key_valid: Option<Vec<bool>>,
    pub causal: bool,
    pub window: Option<usize>,
    pub bf16: bool,
}

impl Case {
    fn new(name: &'static str, heads: usize, head_dim: usize, q_pos: Vec<i64>, k_pos: Vec<i64>) -> Self {
        Case { name, heads, kv_heads: heads, head_dim, value_dim: head_dim, q_pos, k_pos, key_valid: None, causal: false, window: None, bf16: false }
    }

    pub fn mask(&self) -> Mask<'_> {
        Mask::full(&self.q_pos, &self.k_pos).with_causal(self.causal).with_window(self.window).with_key_valid(self.key_valid.as_deref())
    }

    pub fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }

    /// Random q, k, v (normal, seeded by the case), in bf16 where the case says so.
    pub fn tensors(&self) -> (Tensor, Tensor, Tensor) {
        let mut rng = StdRng::seed_from_u64(self.name.bytes().map(u64::from).sum());
        let mut make = |h: usize, n: usize, d: usize| {
            let data: Vec<f32> = (0..h * n * d).map(|_| rng.random_range(-2.0f32..2.0)).collect();
            let t = Tensor::from_vec(data, (h, n, d), &Device::Cpu).unwrap();
            if self.bf16 {
                t.to_dtype(DType::BF16).unwrap()
            } else {
                t
            }
        };
        let q = make(self.heads, self.q_pos.len(), self.head_dim);
        let k = make(self.kv_heads, self.k_pos.len(), self.head_dim);
        let v = make(self.kv_heads, self.k_pos.len(), self.value_dim);
        (q, k, v)
    }
}

fn range(a: i64, b: i64) -> Vec<i64> {
    (a..b).collect()
}

/// Every case: each masking rule, ragged tiles, grouped-query heads, rows that see nothing,
/// queries in two runs (a zigzag shard), keys of another rank, head sizes 8..128, bf16.
pub fn cases() -> Vec<Case> {
    let valid: Vec<bool> = (0..120).map(|j| j < 100 && j % 7 != 3).collect();
    let zigzag = range(0, 32).into_iter().chain(range(224, 256)).collect();
    vec![
        Case::new("full", 2, 64, range(0, 70), range(0, 90)),
        Case { causal: true, ..Case::new("causal", 2, 32, range(0, 130), range(0, 130)) },
        Case { window: Some(17), ..Case::new("window", 2, 64, range(0, 200), range(0, 200)) },
        Case { window: Some(9), causal: true, ..Case::new("causal window", 1, 64, range(0, 150), range(0, 150)) },
        Case { key_valid: Some(valid), ..Case::new("padding", 2, 128, range(0, 80), range(0, 120)) },
        Case { kv_heads: 2, causal: true, ..Case::new("grouped heads", 4, 64, range(0, 100), range(0, 100)) },
        Case { kv_heads: 1, ..Case::new("one kv head", 3, 32, range(0, 40), range(0, 75)) },
        Case { value_dim: 32, ..Case::new("value dim", 2, 64, range(0, 66), range(0, 66)) },
        Case { causal: true, ..Case::new("zigzag queries", 2, 64, zigzag, range(0, 256)) },
        Case { window: Some(450), ..Case::new("remote block", 1, 64, range(500, 564), range(0, 100)) },
        Case { causal: true, ..Case::new("nothing visible", 1, 64, range(0, 20), range(40, 90)) },
        Case { causal: true, bf16: true, ..Case::new("bf16 causal", 2, 64, range(0, 100), range(0, 100)) },
        Case { window: Some(33), bf16: true, ..Case::new("bf16 window", 2, 128, range(0, 150), range(0, 150)) },
        Case { causal: true, ..Case::new("narrow heads", 4, 8, range(0, 70), range(0, 70)) },
        Case { value_dim: 40, ..Case::new("heads of 24", 2, 24, range(0, 50), range(0, 80)) },
    ]
}

/// A kernel under test: `tome_attn::attention`'s arguments and result.
pub type Kernel<'a> = dyn Fn(&Tensor, &Tensor, &Tensor, &Mask<'_>, f32) -> Partial + 'a;

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn assert_close(case: &str, what: &str, got: &Tensor, want: &Tensor, tol: f32) {
    let (g, w) = (values(got), values(want));
    assert_eq!(g.len(), w.len(), "{case}: {what} sizes");
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        let same_infinity = a.is_infinite() && a == b;
        assert!(same_infinity || (a - b).abs() <= tol, "{case}: {what}[{i}] = {a}, reference {b}");
    }
}

/// The kernel against the naive reference (f64 softmax), on the inputs as the kernel read them
/// (bf16 widened to f32): outputs and log-sum-exps within 2e-5, rows that see nothing 0 / -inf.
pub fn check_against_reference(kernel: &Kernel<'_>, case: &Case) {
    let (q, k, v) = case.tensors();
    let got = kernel(&q, &k, &v, &case.mask(), case.scale());
    let wide = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
    let want = reference::attention(&wide(&q), &wide(&k), &wide(&v), &case.mask(), case.scale()).unwrap();
    assert_close(case.name, "out", &got.out, &want.out, 2e-5);
    assert_close(case.name, "lse", &got.lse, &want.lse, 2e-5);
}

/// The keys split into `parts` blocks (as ranks hold them), each block's partial from the kernel,
/// merged: the same as one call over every key, within 1e-5.
pub fn check_blocks_merge(kernel: &Kernel<'_>, case: &Case, parts: usize) {
    let (q, k, v) = case.tensors();
    let whole = kernel(&q, &k, &v, &case.mask(), case.scale());
    let nk = case.k_pos.len();
    let mut partials = Vec::new();
    for p in 0..parts {
        let (a, b) = (p * nk / parts, (p + 1) * nk / parts);
        let valid = case.key_valid.as_ref().map(|m| m[a..b].to_vec());
        let mask = Mask::full(&case.q_pos, &case.k_pos[a..b]).with_causal(case.causal).with_window(case.window).with_key_valid(valid.as_deref());
        partials.push(kernel(&q, &k.narrow(1, a, b - a).unwrap(), &v.narrow(1, a, b - a).unwrap(), &mask, case.scale()));
    }
    let merged = Partial::merge_all(&partials).unwrap().unwrap();
    assert_close(case.name, "merged out", &merged.out, &whole.out, 1e-5);
    assert_close(case.name, "merged lse", &merged.lse, &whole.lse, 1e-5);
}

/// A tensor-core kernel under test: f16 operands (else bf16), then `Kernel`'s arguments.
pub type TensorCoreKernel<'a> = dyn Fn(bool, &Tensor, &Tensor, &Tensor, &Mask<'_>, f32) -> Partial + 'a;

/// The tensor-core kernel against the naive reference on `case`, in bf16 and f16 operands (a
/// bf16 case's tensors read as bf16 bits): the scores are exact products summed in f32, so
/// log-sum-exps agree within 1e-4; the probabilities enter the second product rounded to the
/// operands' type (relative error 2^-9 in bf16, 2^-12 in f16), so outputs agree within that of
/// the values' largest magnitude (2), with room: 8e-3 and 1.5e-3. A fragment read from the wrong
/// lane or register is off by the values' own size.
pub fn check_tensor_cores(kernel: &TensorCoreKernel<'_>, case: &Case) {
    let round = |t: &Tensor, to: DType| t.to_dtype(to).unwrap().to_dtype(DType::F32).unwrap();
    let (q, k, v) = case.tensors();
    let operands: &[(bool, DType, f32)] = if case.bf16 { &[(false, DType::BF16, 8e-3)] } else { &[(false, DType::BF16, 8e-3), (true, DType::F16, 1.5e-3)] };
    for &(f16, dtype, tol) in operands {
        let (q, k, v) = if case.bf16 { (q.clone(), k.clone(), v.clone()) } else { (round(&q, dtype), round(&k, dtype), round(&v, dtype)) };
        let got = kernel(f16, &q, &k, &v, &case.mask(), case.scale());
        let wide = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let want = reference::attention(&wide(&q), &wide(&k), &wide(&v), &case.mask(), case.scale()).unwrap();
        let name = format!("{} ({dtype:?} operands)", case.name);
        assert_close(&name, "out", &got.out, &want.out, tol);
        assert_close(&name, "lse", &got.lse, &want.lse, 1e-4);
    }
}
