//! Switch Transformer top-1 routing with expert capacity (Fedus et al. 2021, "Switch
//! Transformers"; Hugging Face `SwitchTransformersTop1Router`, eval mode).
//!
//! The router runs in f32: probabilities are the softmax of `x Wᵀ`, each token goes to its
//! argmax expert with that probability. Each expert takes at most `capacity` tokens of the
//! sequence, in token order; a token past its expert's capacity is dropped (its expert output is
//! zero, so only the residual carries it). Capacity is decided in *global* token order, so a
//! shard needs only how many tokens of each expert came before it.

/// Top-1 choice per token: `(expert, probability)` from router logits `[tokens][experts]`.
pub fn route(logits: &[Vec<f32>]) -> Vec<(usize, f32)> {
    logits
        .iter()
        .map(|row| {
            let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let z: f32 = row.iter().map(|x| (x - m).exp()).sum();
            let (e, best) = row.iter().enumerate().fold((0, f32::NEG_INFINITY), |acc, (i, &x)| if x > acc.1 { (i, x) } else { acc });
            (e, (best - m).exp() / z)
        })
        .collect()
}

/// Tokens per expert among `choices`.
pub fn counts(choices: &[(usize, f32)], experts: usize) -> Vec<usize> {
    let mut c = vec![0; experts];
    for &(e, _) in choices {
        c[e] += 1;
    }
    c
}

/// Which tokens keep their expert, given how many tokens of each expert came before this run.
pub fn kept(choices: &[(usize, f32)], before: &[usize], capacity: usize) -> Vec<bool> {
    let mut seen = before.to_vec();
    choices
        .iter()
        .map(|&(e, _)| {
            seen[e] += 1;
            seen[e] <= capacity
        })
        .collect()
}
