//! The fused kernel against the naive reference: odd lengths and head dims, causal, windows at
//! and beyond the sequence length, padding masks, fully masked rows, grouped heads, and the
//! merge of partials over split key sets.

use candle_core::{Device, Tensor};
use rand::{rngs::StdRng, Rng, SeedableRng};
use tome_attn::{attention, reference, Mask, Partial};

fn randn(rng: &mut StdRng, shape: (usize, usize, usize)) -> Tensor {
    let n = shape.0 * shape.1 * shape.2;
    let data: Vec<f32> = (0..n).map(|_| rng.random_range(-2.0f32..2.0)).collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(a.len(), b.len());
    a.iter().zip(&b).fold(0f32, |m, (x, y)| {
        if x == y {
            m // equal infinities included
        } else {
            m.max((x - y).abs())
        }
    })
}

fn assert_close(got: &Partial, want: &Partial, tol: f32, what: &str) {
    let (o, l) = (max_diff(&got.out, &want.out), max_diff(&got.lse, &want.lse));
    assert!(o <= tol && l <= tol, "{what}: out diff {o}, lse diff {l}");
}

struct Case {
    heads: usize,
    kv_heads: usize,
    nq: usize,
    nk: usize,
    d: usize,
    causal: bool,
    window: Option<usize>,
    pad_every: Option<usize>,
    q_offset: i64,
}

fn run(case: &Case, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let q = randn(&mut rng, (case.heads, case.nq, case.d));
    let k = randn(&mut rng, (case.kv_heads, case.nk, case.d));
    let v = randn(&mut rng, (case.kv_heads, case.nk, case.d));
    let q_pos: Vec<i64> = (0..case.nq as i64).map(|i| i + case.q_offset).collect();
    let k_pos: Vec<i64> = (0..case.nk as i64).collect();
    let valid: Option<Vec<bool>> = case.pad_every.map(|p| (0..case.nk).map(|j| j % p != p - 1).collect());
    let mask = Mask::full(&q_pos, &k_pos).with_causal(case.causal).with_window(case.window).with_key_valid(valid.as_deref());
    let scale = 1.0 / (case.d as f32).sqrt();
    let got = attention(&q, &k, &v, &mask, scale).unwrap();
    let want = reference::attention(&q, &k, &v, &mask, scale).unwrap();
    let what = format!(
        "h{} kv{} nq{} nk{} d{} causal {} window {:?} pad {:?} off {}",
        case.heads, case.kv_heads, case.nq, case.nk, case.d, case.causal, case.window, case.pad_every, case.q_offset
    );
    assert_close(&got, &want, 2e-5, &what);
}

#[test]
fn matches_reference_over_odd_shapes() {
    let mut seed = 0;
    for &(nq, nk) in &[(1, 1), (7, 7), (63, 65), (130, 130), (200, 77)] {
        for &d in &[1, 5, 16, 33, 64] {
            for &causal in &[false, true] {
                seed += 1;
                run(&Case { heads: 2, kv_heads: 2, nq, nk, d, causal, window: None, pad_every: None, q_offset: 0 }, seed);
            }
        }
    }
}

#[test]
fn windows_at_and_beyond_the_sequence_length() {
    let mut seed = 100;
    for &n in &[1, 9, 64, 150] {
        for &w in &[0, 1, 3, 64, n, n + 5, 1000] {
            for &causal in &[false, true] {
                seed += 1;
                run(&Case { heads: 3, kv_heads: 3, nq: n, nk: n, d: 24, causal, window: Some(w), pad_every: None, q_offset: 0 }, seed);
            }
        }
    }
}

#[test]
fn padding_masks_and_fully_masked_rows() {
    // Every third key is padding.
    run(&Case { heads: 2, kv_heads: 2, nq: 100, nk: 100, d: 17, causal: false, window: Some(5), pad_every: Some(3), q_offset: 0 }, 7);
    run(&Case { heads: 2, kv_heads: 2, nq: 100, nk: 100, d: 17, causal: true, window: None, pad_every: Some(2), q_offset: 0 }, 8);
    // Queries placed after all keys with a window that reaches none of them: every row is empty.
    let mut rng = StdRng::seed_from_u64(9);
    let (q, k, v) = (randn(&mut rng, (2, 10, 8)), randn(&mut rng, (2, 20, 8)), randn(&mut rng, (2, 20, 8)));
    let q_pos: Vec<i64> = (100..110).collect();
    let k_pos: Vec<i64> = (0..20).collect();
    let p = attention(&q, &k, &v, &Mask::full(&q_pos, &k_pos).with_window(Some(10)), 0.5).unwrap();
    let lse = p.lse.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(lse.iter().all(|l| *l == f32::NEG_INFINITY));
    assert!(p.out.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|o| *o == 0.0));
    // All keys padding.
    let none = vec![false; 20];
    let p = attention(&q, &k, &v, &Mask::full(&q_pos, &k_pos).with_key_valid(Some(&none)), 0.5).unwrap();
    assert!(p.lse.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|l| *l == f32::NEG_INFINITY));
    // Causal with queries before all keys.
    let early: Vec<i64> = (-20..-10).collect();
    let p = attention(&q, &k, &v, &Mask::full(&early, &k_pos).with_causal(true), 0.5).unwrap();
    assert!(p.lse.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|l| *l == f32::NEG_INFINITY));
}

#[test]
fn grouped_query_heads_and_offsets() {
    run(&Case { heads: 6, kv_heads: 2, nq: 70, nk: 90, d: 12, causal: true, window: None, pad_every: None, q_offset: 20 }, 11);
    run(&Case { heads: 4, kv_heads: 1, nq: 33, nk: 140, d: 64, causal: false, window: Some(17), pad_every: Some(5), q_offset: 50 }, 12);
}

#[test]
fn merged_partials_over_split_keys_equal_the_whole() {
    let mut rng = StdRng::seed_from_u64(21);
    let (h, nq, nk, d) = (3, 50, 97, 20);
    let (q, k, v) = (randn(&mut rng, (h, nq, d)), randn(&mut rng, (h, nk, d)), randn(&mut rng, (h, nk, d)));
    let q_pos: Vec<i64> = (30..30 + nq as i64).collect();
    let k_pos: Vec<i64> = (0..nk as i64).collect();
    let whole = attention(&q, &k, &v, &Mask::full(&q_pos, &k_pos).with_causal(true), 0.3).unwrap();
    let cuts = [0, 13, 40, 41, 80, nk];
    let parts: Vec<Partial> = cuts
        .windows(2)
        .map(|c| {
            let (a, b) = (c[0], c[1]);
            let kk = k.narrow(1, a, b - a).unwrap();
            let vv = v.narrow(1, a, b - a).unwrap();
            attention(&q, &kk, &vv, &Mask::full(&q_pos, &k_pos[a..b]).with_causal(true), 0.3).unwrap()
        })
        .collect();
    // Left to right, right to left, and as a balanced tree: merge order must not matter.
    let ltr = Partial::merge_all(parts.iter()).unwrap().unwrap();
    let rtl = Partial::merge_all(parts.iter().rev()).unwrap().unwrap();
    let left = parts[0].merge(&parts[1]).unwrap().merge(&parts[2]).unwrap();
    let right = parts[3].merge(&parts[4]).unwrap();
    let tree = left.merge(&right).unwrap();
    for (p, name) in [(&ltr, "left to right"), (&rtl, "right to left"), (&tree, "tree")] {
        assert_close(p, &whole, 1e-5, name);
    }
    // Merging with the empty partial is the identity.
    let e = Partial::empty(h, nq, d).unwrap();
    assert_close(&whole.merge(&e).unwrap(), &whole, 0.0, "empty merge");
}

#[test]
fn bad_arguments_are_errors() {
    let mut rng = StdRng::seed_from_u64(3);
    let (q, k, v) = (randn(&mut rng, (2, 4, 8)), randn(&mut rng, (2, 5, 8)), randn(&mut rng, (2, 5, 8)));
    let q_pos: Vec<i64> = (0..4).collect();
    let k_pos: Vec<i64> = vec![0, 1, 3, 2, 4];
    let err = attention(&q, &k, &v, &Mask::full(&q_pos, &k_pos), 1.0).unwrap_err();
    assert!(err.to_string().contains("sorted"), "{err}");
    let short: Vec<i64> = (0..3).collect();
    assert!(attention(&q, &k, &v, &Mask::full(&q_pos, &short), 1.0).is_err());
    let k3 = randn(&mut rng, (3, 5, 8));
    assert!(attention(&q, &k3, &k3, &Mask::full(&q_pos, &(0..5).collect::<Vec<_>>()), 1.0).is_err());
}
