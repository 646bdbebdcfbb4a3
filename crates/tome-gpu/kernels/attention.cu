// Blockwise attention with an online softmax on the GPU, returning the mergeable partial
// (out, lse) of a key block: the CUDA twin of tome-attn's `flash::attention`, with the same
// arguments and the same visibility rule (`Mask::allows`: key validity, causality, a one-sided
// window, all on global positions).
//
// Layout (row-major): q [hq, nq, d], k [hk, nk, d], v [hk, nk, dv] of element T (f32, or bf16
// bits widened on load); out [hq, nq, dv] and lse [hq, nq] in f32. Query head h reads key/value
// head h / (hq / hk). A row that sees no key gets out = 0 and lse = -inf.
//
// A block owns ROWS query rows of one head, LANES threads per row; each thread holds a quarter
// of its row's query and output in registers, in groups of four columns (lane l owns columns
// 4(l + LANES g) .. +3), so shared memory is read four floats at a time. Key and value tiles of
// KEYS rows are staged in shared memory as f32. Keys are sorted by position: the block finds the
// key range its rows can see by binary search and walks only that (windows cost O(n w), causal
// blocks above the diagonal are never read). Scores, softmax statistics and outputs are f32.
//
// The code is block-uniform (every thread runs every loop and shuffle; rows past nq compute
// with nothing visible), which the CPU emulation in tests/emulated relies on. The key range
// is key_range.cuh's, which precedes this source wherever it is compiled.

#define TOME_ROWS 64
#define TOME_LANES 4
#define TOME_THREADS (TOME_ROWS * TOME_LANES)
#define TOME_KEYS 32
#define TOME_MAX_DIM 128
#define TOME_GROUPS (TOME_MAX_DIM / (4 * TOME_LANES))

// NVRTC has no <math.h>: +infinity from its bits.
#ifndef INFINITY
#define INFINITY __uint_as_float(0x7f800000u)
#endif

struct tome_bf16 {
    unsigned short bits;
};

__device__ __forceinline__ float tome_to_f32(float x) { return x; }
__device__ __forceinline__ float tome_to_f32(tome_bf16 x) { return __uint_as_float(((unsigned int)x.bits) << 16); }

template <typename T>
__device__ void tome_attention(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                               const long long* __restrict__ q_pos, const long long* __restrict__ k_pos,
                               const unsigned char* __restrict__ key_valid, int hq, int hk, int nq, int nk, int d,
                               int dv, int causal, long long window, float scale, float* __restrict__ out,
                               float* __restrict__ lse) {
    __shared__ __align__(16) float ks[TOME_KEYS][TOME_MAX_DIM];
    __shared__ __align__(16) float vs[TOME_KEYS][TOME_MAX_DIM];
    __shared__ long long key_pos[TOME_KEYS];
    __shared__ unsigned char key_ok[TOME_KEYS];
    __shared__ int key_range[2];

    const int tid = threadIdx.x;
    const int row = tid / TOME_LANES;
    const int lane = tid % TOME_LANES;
    const int h = blockIdx.y;
    const int kvh = h / (hq / hk);
    const int qi = blockIdx.x * TOME_ROWS + row;
    const bool has_row = qi < nq;
    const long long my_pos = has_row ? q_pos[qi] : 0;

    // The key range any row of this block can see, from the positional rules alone.
    if (tid == 0) {
        const int first = blockIdx.x * TOME_ROWS;
        tome_visible_keys(q_pos, first, min(nq, first + TOME_ROWS), k_pos, nk, causal, window, key_range);
    }

    float qr[TOME_GROUPS][4];
    float acc[TOME_GROUPS][4];
#pragma unroll
    for (int g = 0; g < TOME_GROUPS; ++g) {
        const int c = 4 * (lane + TOME_LANES * g);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            qr[g][e] = (has_row && c + e < d) ? tome_to_f32(q[((long long)h * nq + qi) * d + c + e]) : 0.0f;
            acc[g][e] = 0.0f;
        }
    }
    float row_max = -INFINITY;
    float row_sum = 0.0f;
    __syncthreads();
    const int begin = key_range[0];
    const int end = key_range[1];

    for (int tile = begin; tile < end; tile += TOME_KEYS) {
        const int width = d > dv ? d : dv;
        for (int idx = tid; idx < TOME_KEYS * width; idx += TOME_THREADS) {
            const int j = idx / width;
            const int c = idx % width;
            const int key = tile + j;
            const long long base = (long long)kvh * nk + key;
            if (c < d) {
                ks[j][c] = key < end ? tome_to_f32(k[base * d + c]) : 0.0f;
            }
            if (c < dv) {
                vs[j][c] = key < end ? tome_to_f32(v[base * dv + c]) : 0.0f;
            }
        }
        if (tid < TOME_KEYS) {
            const int key = tile + tid;
            key_pos[tid] = key < end ? k_pos[key] : 0;
            key_ok[tid] = key < end && (key_valid == 0 || key_valid[key] != 0);
        }
        __syncthreads();

        float scores[TOME_KEYS];
        float tile_max = -INFINITY;
#pragma unroll
        for (int j = 0; j < TOME_KEYS; ++j) {
            float dot = 0.0f;
#pragma unroll
            for (int g = 0; g < TOME_GROUPS; ++g) {
                const int c = 4 * (lane + TOME_LANES * g);
                if (c < d) {
                    const float4 kk = *reinterpret_cast<const float4*>(&ks[j][c]);
                    dot = fmaf(qr[g][0], kk.x, dot);
                    dot = fmaf(qr[g][1], kk.y, dot);
                    dot = fmaf(qr[g][2], kk.z, dot);
                    dot = fmaf(qr[g][3], kk.w, dot);
                }
            }
            dot += __shfl_xor_sync(0xffffffffu, dot, 1);
            dot += __shfl_xor_sync(0xffffffffu, dot, 2);
            const long long kp = key_pos[j];
            const bool visible = has_row && key_ok[j] && (!causal || kp <= my_pos) &&
                                 (window < 0 || (kp <= my_pos ? my_pos - kp : kp - my_pos) <= window);
            scores[j] = visible ? dot * scale : -INFINITY;
            tile_max = fmaxf(tile_max, scores[j]);
        }

        const float new_max = fmaxf(row_max, tile_max);
        if (new_max != -INFINITY) {
            const float rescale = expf(row_max - new_max);
            row_sum *= rescale;
#pragma unroll
            for (int g = 0; g < TOME_GROUPS; ++g) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    acc[g][e] *= rescale;
                }
            }
#pragma unroll
            for (int j = 0; j < TOME_KEYS; ++j) {
                const float p = expf(scores[j] - new_max);
                row_sum += p;
#pragma unroll
                for (int g = 0; g < TOME_GROUPS; ++g) {
                    const int c = 4 * (lane + TOME_LANES * g);
                    if (c < dv) {
                        const float4 vv = *reinterpret_cast<const float4*>(&vs[j][c]);
                        acc[g][0] = fmaf(p, vv.x, acc[g][0]);
                        acc[g][1] = fmaf(p, vv.y, acc[g][1]);
                        acc[g][2] = fmaf(p, vv.z, acc[g][2]);
                        acc[g][3] = fmaf(p, vv.w, acc[g][3]);
                    }
                }
            }
            row_max = new_max;
        }
        __syncthreads();
    }

    if (has_row) {
        const bool seen = row_sum > 0.0f;
        const float inv = seen ? 1.0f / row_sum : 0.0f;
#pragma unroll
        for (int g = 0; g < TOME_GROUPS; ++g) {
            const int c = 4 * (lane + TOME_LANES * g);
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                if (c + e < dv) {
                    out[((long long)h * nq + qi) * dv + c + e] = acc[g][e] * inv;
                }
            }
        }
        if (lane == 0) {
            lse[(long long)h * nq + qi] = seen ? row_max + logf(row_sum) : -INFINITY;
        }
    }
}

#define TOME_ATTENTION_ENTRY(NAME, T)                                                                       \
    extern "C" __global__ void __launch_bounds__(TOME_THREADS) NAME(const T* q, const T* k, const T* v, const long long* q_pos,             \
                                    const long long* k_pos, const unsigned char* key_valid, int hq, int hk, \
                                    int nq, int nk, int d, int dv, int causal, long long window,            \
                                    float scale, float* out, float* lse) {                                  \
        tome_attention<T>(q, k, v, q_pos, k_pos, key_valid, hq, hk, nq, nk, d, dv, causal, window, scale,   \
                          out, lse);                                                                        \
    }

TOME_ATTENTION_ENTRY(tome_attention_f32, float)
TOME_ATTENTION_ENTRY(tome_attention_bf16, tome_bf16)
