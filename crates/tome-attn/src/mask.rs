//! Which keys each query may see, expressed through global token positions.
//!
//! Every family's mask in tome reduces to three rules evaluated on global positions: key
//! validity (padding), causality and a one-sided window (Longformer: `|i - j| <= w`). Global
//! positions travel with the tokens, so the same rule holds whichever rank computes the block.

/// The visibility rule of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct Mask<'a> {
    /// Global position of each query row.
    pub q_pos: &'a [i64],
    /// Global position of each key row; must be sorted ascending (blocks are found by search).
    pub k_pos: &'a [i64],
    /// Per key: may it be attended to at all (`false` for padding or excluded keys).
    pub key_valid: Option<&'a [bool]>,
    /// Keys after the query are invisible.
    pub causal: bool,
    /// One-sided window: only keys with `|q - k| <= w` are visible.
    pub window: Option<usize>,
}

impl<'a> Mask<'a> {
    /// All keys visible to all queries (subject to the positions' lengths).
    pub fn full(q_pos: &'a [i64], k_pos: &'a [i64]) -> Self {
        Mask { q_pos, k_pos, key_valid: None, causal: false, window: None }
    }

    pub fn with_causal(mut self, causal: bool) -> Self {
        self.causal = causal;
        self
    }

    pub fn with_window(mut self, window: Option<usize>) -> Self {
        self.window = window;
        self
    }

    pub fn with_key_valid(mut self, key_valid: Option<&'a [bool]>) -> Self {
        self.key_valid = key_valid;
        self
    }

    /// Does query `qi` see key `kj`? The one definition every kernel and reference uses.
    #[inline(always)]
    pub fn allows(&self, qi: usize, kj: usize) -> bool {
        let (qp, kp) = (self.q_pos[qi], self.k_pos[kj]);
        self.key_valid.is_none_or(|v| v[kj]) && (!self.causal || kp <= qp) && self.window.is_none_or(|w| qp.abs_diff(kp) <= w as u64)
    }

    /// The closed range of query positions that see a (valid) key at position `kp`: the same
    /// rule as [`Mask::allows`], turned around.
    #[inline(always)]
    pub(crate) fn query_position_bounds(&self, kp: i64) -> (i64, i64) {
        let mut lo = if self.causal { kp } else { i64::MIN };
        let mut hi = i64::MAX;
        if let Some(w) = self.window {
            lo = lo.max(kp.saturating_sub(w as i64));
            hi = kp.saturating_add(w as i64);
        }
        (lo, hi)
    }

    /// The half-open range of key positions that any query in `[q_min, q_max]` can see.
    pub(crate) fn key_position_bounds(&self, q_min: i64, q_max: i64) -> (i64, i64) {
        let mut lo = i64::MIN;
        let mut hi = i64::MAX;
        if self.causal {
            hi = hi.min(q_max.saturating_add(1));
        }
        if let Some(w) = self.window {
            let w = w as i64;
            lo = lo.max(q_min.saturating_sub(w));
            hi = hi.min(q_max.saturating_add(w).saturating_add(1));
        }
        (lo, hi)
    }

    /// Whether every (query, key) pair of the two position ranges passes the positional rules
    /// (validity is checked separately).
    pub(crate) fn positions_all_visible(&self, q: (i64, i64), k: (i64, i64)) -> bool {
        let (q_min, q_max) = q;
        let (k_min, k_max) = k;
        (!self.causal || k_max <= q_min)
            && self.window.is_none_or(|w| {
                let w = w as i64;
                q_max - k_min <= w && k_max - q_min <= w
            })
    }
}
