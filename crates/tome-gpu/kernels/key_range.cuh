// What both attention kernels share: the range of keys (sorted by position) that a block's
// query rows can see under the mask's positional rules. This text precedes attention.cu and
// attention_mma.cu wherever they are compiled (NVRTC: `kernels.rs`; the CPU emulation: the
// harnesses include it first).

// Index of the first key whose position is >= p (keys sorted ascending).
__device__ __forceinline__ int tome_lower_bound(const long long* pos, int n, long long p) {
    int lo = 0, hi = n;
    while (lo < hi) {
        const int mid = lo + (hi - lo) / 2;
        if (pos[mid] < p) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    return lo;
}

// The keys [range[0], range[1]) that queries first..last-1 (positions q_pos) can see: all but
// those after the last query under a causal mask and those beyond a window (window >= 0) of
// every query. Run by one thread.
__device__ __forceinline__ void tome_visible_keys(const long long* q_pos, int first, int last, const long long* k_pos, int nk,
                                                  int causal, long long window, int* range) {
    long long q_min = q_pos[first], q_max = q_pos[first];
    for (int i = first + 1; i < last; ++i) {
        q_min = min(q_min, q_pos[i]);
        q_max = max(q_max, q_pos[i]);
    }
    int begin = 0, end = nk;
    if (causal) {
        end = tome_lower_bound(k_pos, nk, q_max + 1);
    }
    if (window >= 0) {
        begin = tome_lower_bound(k_pos, nk, q_min - window);
        end = min(end, tome_lower_bound(k_pos, nk, q_max + window + 1));
    }
    range[0] = begin;
    range[1] = max(begin, end);
}
