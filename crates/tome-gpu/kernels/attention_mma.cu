// Attention partials on tensor cores, for bf16 and f16 runs: attention.cu's arguments, mask rule
// and result (the mergeable partial (out, lse) of a key block), with both products as
// m16n8k16 `mma` instructions on 16-bit operands accumulating in f32.
//
// Operands: queries, keys and values enter as bf16 or f16 values (a bf16 or f16 run has
// rounded them so already: the conversion is then exact), and the probabilities enter the
// second product rounded to the same type, as flash attention's do. Scores, the softmax
// statistics, the running output and (out, lse) stay f32. Inputs are f32, or bf16 bits.
//
// A block owns MMA_ROWS query rows of one head, 16 rows a warp. A warp keeps its rows' queries
// as A fragments in registers, and per key tile of MMA_KEYS keys computes the scores S = Q K^T
// into C fragments, masks them by position (attention.cu's rule), updates the online softmax
// (a row's four threads agree on its maximum through two shuffles), and multiplies the
// probabilities, rounded and repacked from the C fragments into A fragments, by the tile's
// values. Keys are staged in shared memory as rows, values transposed, both padded so that a
// fragment's loads fall in distinct banks. Head sizes are multiples of 8, up to MMA_MAX_DIM
// (queries and keys are padded with zeros to a multiple of 16).
//
// Fragments of m16n8k16 (PTX ISA, "Matrix Fragments for mma.m16n8k16"): with g = lane / 4 and
// t = lane % 4, A (16 x 16, row-major) holds (g, 2t..2t+1), (g+8, 2t..), (g, 2t+8..),
// (g+8, 2t+8..) in its four registers, the lower column in the lower half; B (16 x 8, by
// column) holds (2t..2t+1, g) and (2t+8..2t+9, g); C (16 x 8, f32) holds (g, 2t), (g, 2t+1),
// (g+8, 2t), (g+8, 2t+1).
//
// Block-uniform like attention.cu (every thread reaches every barrier, shuffle and mma), so
// the CPU emulation in tests/emulated runs it, with its own model of `mma`. convert.cuh and
// key_range.cuh precede this source wherever it is compiled.

#define TOME_MMA_WARPS 4
#define TOME_MMA_ROWS (16 * TOME_MMA_WARPS)
#define TOME_MMA_THREADS (32 * TOME_MMA_WARPS)
#define TOME_MMA_KEYS 64
#define TOME_MMA_MAX_DIM 128
// Row padding of the shared tiles, in 16-bit elements: rows 16 bytes apart modulo 128 put a
// fragment's eight rows in distinct banks.
#define TOME_MMA_PAD 8

#ifndef INFINITY
#define INFINITY __uint_as_float(0x7f800000u)
#endif

struct tome_bf16_in {
    unsigned short bits;
};

// The operand types: which 16-bit format a product reads.
struct tome_op_bf16 {};
struct tome_op_f16 {};

__device__ __forceinline__ unsigned short tome_operand(float x, tome_op_bf16) { return tome_bf16_bits(x); }
__device__ __forceinline__ unsigned short tome_operand(float x, tome_op_f16) { return tome_f16_bits(x); }

__device__ __forceinline__ float tome_input(float x) { return x; }
__device__ __forceinline__ float tome_input(tome_bf16_in x) { return __uint_as_float(((unsigned int)x.bits) << 16); }

__device__ __forceinline__ unsigned int tome_pack(unsigned short lo, unsigned short hi) {
    return (unsigned int)lo | ((unsigned int)hi << 16);
}

// Two adjacent 16-bit elements of shared memory as one register (the lower at `p`).
__device__ __forceinline__ unsigned int tome_pair(const unsigned short* p) {
#ifdef TOME_EMULATED
    return tome_pack(p[0], p[1]);
#else
    return *reinterpret_cast<const unsigned int*>(p);
#endif
}

#ifdef TOME_EMULATED
// The CPU emulation's model of the instruction (tests/emulated/cuda_emulation.h).
__device__ __forceinline__ void tome_mma(float c[4], const unsigned int a[4], const unsigned int b[2], tome_op_bf16) {
    emu::mma_m16n8k16(c, a, b, [](unsigned short x) { return __uint_as_float(((unsigned int)x) << 16); });
}

__device__ __forceinline__ void tome_mma(float c[4], const unsigned int a[4], const unsigned int b[2], tome_op_f16) {
    emu::mma_m16n8k16(c, a, b, tome_f16_value);
}
#else
// c += a b on tensor cores (m16n8k16, f32 accumulation), the operands in format TYPE.
#define TOME_MMA_M16N8K16(TYPE, c, a, b)                                                                  \
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." TYPE "." TYPE                                   \
                 ".f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"                \
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                                          \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]))

__device__ __forceinline__ void tome_mma(float c[4], const unsigned int a[4], const unsigned int b[2], tome_op_bf16) {
    TOME_MMA_M16N8K16("bf16", c, a, b);
}

__device__ __forceinline__ void tome_mma(float c[4], const unsigned int a[4], const unsigned int b[2], tome_op_f16) {
    TOME_MMA_M16N8K16("f16", c, a, b);
}
#endif

template <typename T, typename Op>
__device__ void tome_attention_mma(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                   const long long* __restrict__ q_pos, const long long* __restrict__ k_pos,
                                   const unsigned char* __restrict__ key_valid, int hq, int hk, int nq, int nk,
                                   int d, int dv, int causal, long long window, float scale,
                                   float* __restrict__ out, float* __restrict__ lse) {
    __shared__ __align__(16) unsigned short ks[TOME_MMA_KEYS][TOME_MMA_MAX_DIM + TOME_MMA_PAD];
    __shared__ __align__(16) unsigned short vt[TOME_MMA_MAX_DIM][TOME_MMA_KEYS + TOME_MMA_PAD];
    __shared__ long long key_pos[TOME_MMA_KEYS];
    __shared__ unsigned char key_ok[TOME_MMA_KEYS];
    __shared__ int key_range[2];

    const int tid = threadIdx.x;
    const int warp = tid / 32;
    const int lane = tid % 32;
    const int g = lane / 4;
    const int t = lane % 4;
    const int h = blockIdx.y;
    const int kvh = h / (hq / hk);
    const int first_row = blockIdx.x * TOME_MMA_ROWS;
    // This thread's two rows of its warp's sixteen: g and g + 8.
    const int rows[2] = {first_row + 16 * warp + g, first_row + 16 * warp + g + 8};
    const bool has_row[2] = {rows[0] < nq, rows[1] < nq};
    const long long my_pos[2] = {has_row[0] ? q_pos[rows[0]] : 0, has_row[1] ? q_pos[rows[1]] : 0};
    const Op op{};

    if (tid == 0) {
        tome_visible_keys(q_pos, first_row, min(nq, first_row + TOME_MMA_ROWS), k_pos, nk, causal, window, key_range);
    }

    // The warp's queries as A fragments, one per 16 columns of the head.
    unsigned int qa[TOME_MMA_MAX_DIM / 16][4];
#pragma unroll
    for (int s = 0; s < TOME_MMA_MAX_DIM / 16; ++s) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const int row = r % 2;
            const int col = 16 * s + 2 * t + (r / 2) * 8;
            unsigned short lo = 0, hi = 0;
            if (has_row[row] && col < d) {
                const long long at = ((long long)h * nq + rows[row]) * d + col;
                lo = tome_operand(tome_input(q[at]), op);
                hi = tome_operand(tome_input(q[at + 1]), op);
            }
            qa[s][r] = tome_pack(lo, hi);
        }
    }

    float acc[TOME_MMA_MAX_DIM / 8][4];
#pragma unroll
    for (int j = 0; j < TOME_MMA_MAX_DIM / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            acc[j][e] = 0.0f;
        }
    }
    // Per row: the running maximum, and this thread's share of the running sum.
    float row_max[2] = {-INFINITY, -INFINITY};
    float row_sum[2] = {0.0f, 0.0f};
    __syncthreads();
    const int begin = key_range[0];
    const int end = key_range[1];

    // Key columns past d up to the next multiple of 16 are zeros (as are the queries'), so a
    // head of 8 or 24 columns multiplies as one of 16 or 32.
    const int d16 = (d + 15) / 16 * 16;
    for (int tile = begin; tile < end; tile += TOME_MMA_KEYS) {
        for (int idx = tid; idx < TOME_MMA_KEYS * (d16 / 2); idx += TOME_MMA_THREADS) {
            const int j = idx / (d16 / 2);
            const int c = 2 * (idx % (d16 / 2));
            const int key = tile + j;
            unsigned short lo = 0, hi = 0;
            if (key < end && c < d) {
                const long long at = ((long long)kvh * nk + key) * d + c;
                lo = tome_operand(tome_input(k[at]), op);
                hi = tome_operand(tome_input(k[at + 1]), op);
            }
            ks[j][c] = lo;
            ks[j][c + 1] = hi;
        }
        for (int idx = tid; idx < TOME_MMA_KEYS * dv; idx += TOME_MMA_THREADS) {
            const int j = idx / dv;
            const int c = idx % dv;
            const int key = tile + j;
            vt[c][j] = key < end ? tome_operand(tome_input(v[((long long)kvh * nk + key) * dv + c]), op) : 0;
        }
        if (tid < TOME_MMA_KEYS) {
            const int key = tile + tid;
            key_pos[tid] = key < end ? k_pos[key] : 0;
            key_ok[tid] = key < end && (key_valid == 0 || key_valid[key] != 0);
        }
        __syncthreads();

        // Scores of the warp's rows against the tile's keys, eight keys a fragment.
        float s[TOME_MMA_KEYS / 8][4];
#pragma unroll
        for (int n = 0; n < TOME_MMA_KEYS / 8; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                s[n][e] = 0.0f;
            }
#pragma unroll
            for (int kk = 0; kk < TOME_MMA_MAX_DIM / 16; ++kk) {
                if (16 * kk < d) {
                    const unsigned int b[2] = {tome_pair(&ks[8 * n + g][16 * kk + 2 * t]), tome_pair(&ks[8 * n + g][16 * kk + 2 * t + 8])};
                    tome_mma(s[n], qa[kk], b, op);
                }
            }
        }

        float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int n = 0; n < TOME_MMA_KEYS / 8; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int row = e / 2;
                const int j = 8 * n + 2 * t + (e % 2);
                const long long kp = key_pos[j];
                const long long qp = my_pos[row];
                const bool visible = has_row[row] && key_ok[j] && (!causal || kp <= qp) &&
                                     (window < 0 || (kp <= qp ? qp - kp : kp - qp) <= window);
                s[n][e] = visible ? s[n][e] * scale : -INFINITY;
                tile_max[row] = fmaxf(tile_max[row], s[n][e]);
            }
        }
        float rescale[2];
        float new_max[2];
#pragma unroll
        for (int row = 0; row < 2; ++row) {
            tile_max[row] = fmaxf(tile_max[row], __shfl_xor_sync(0xffffffffu, tile_max[row], 1));
            tile_max[row] = fmaxf(tile_max[row], __shfl_xor_sync(0xffffffffu, tile_max[row], 2));
            new_max[row] = fmaxf(row_max[row], tile_max[row]);
            // A row that has seen nothing yet keeps everything at zero.
            rescale[row] = new_max[row] == -INFINITY ? 1.0f : expf(row_max[row] - new_max[row]);
            row_sum[row] *= rescale[row];
            row_max[row] = new_max[row];
        }
#pragma unroll
        for (int j = 0; j < TOME_MMA_MAX_DIM / 8; ++j) {
            acc[j][0] *= rescale[0];
            acc[j][1] *= rescale[0];
            acc[j][2] *= rescale[1];
            acc[j][3] *= rescale[1];
        }
        // Probabilities, summed in f32, and rounded into A fragments of sixteen keys each.
        unsigned int pa[TOME_MMA_KEYS / 16][4];
#pragma unroll
        for (int n = 0; n < TOME_MMA_KEYS / 8; ++n) {
            unsigned short bits[4];
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int row = e / 2;
                const float p = s[n][e] == -INFINITY ? 0.0f : expf(s[n][e] - new_max[row]);
                row_sum[row] += p;
                bits[e] = tome_operand(p, op);
            }
            // Keys 8n.. are the lower (n even) or upper (n odd) eight of their sixteen.
            pa[n / 2][(n % 2) * 2 + 0] = tome_pack(bits[0], bits[1]);
            pa[n / 2][(n % 2) * 2 + 1] = tome_pack(bits[2], bits[3]);
        }
#pragma unroll
        for (int kk = 0; kk < TOME_MMA_KEYS / 16; ++kk) {
#pragma unroll
            for (int j = 0; j < TOME_MMA_MAX_DIM / 8; ++j) {
                if (8 * j < dv) {
                    const unsigned int b[2] = {tome_pair(&vt[8 * j + g][16 * kk + 2 * t]), tome_pair(&vt[8 * j + g][16 * kk + 2 * t + 8])};
                    tome_mma(acc[j], pa[kk], b, op);
                }
            }
        }
        __syncthreads();
    }

#pragma unroll
    for (int row = 0; row < 2; ++row) {
        row_sum[row] += __shfl_xor_sync(0xffffffffu, row_sum[row], 1);
        row_sum[row] += __shfl_xor_sync(0xffffffffu, row_sum[row], 2);
    }
#pragma unroll
    for (int row = 0; row < 2; ++row) {
        if (has_row[row]) {
            const bool seen = row_sum[row] > 0.0f;
            const float inv = seen ? 1.0f / row_sum[row] : 0.0f;
            const long long base = ((long long)h * nq + rows[row]) * dv;
#pragma unroll
            for (int j = 0; j < TOME_MMA_MAX_DIM / 8; ++j) {
                const int c = 8 * j + 2 * t;
                if (c < dv) {
                    out[base + c] = acc[j][2 * row] * inv;
                    out[base + c + 1] = acc[j][2 * row + 1] * inv;
                }
            }
            if (t == 0) {
                lse[(long long)h * nq + rows[row]] = seen ? row_max[row] + logf(row_sum[row]) : -INFINITY;
            }
        }
    }
}

#define TOME_ATTENTION_MMA_ENTRY(NAME, T, OP)                                                                   \
    extern "C" __global__ void __launch_bounds__(TOME_MMA_THREADS)                                              \
        NAME(const T* q, const T* k, const T* v, const long long* q_pos, const long long* k_pos,                \
             const unsigned char* key_valid, int hq, int hk, int nq, int nk, int d, int dv, int causal,         \
             long long window, float scale, float* out, float* lse) {                                           \
        tome_attention_mma<T, OP>(q, k, v, q_pos, k_pos, key_valid, hq, hk, nq, nk, d, dv, causal, window,     \
                                  scale, out, lse);                                                             \
    }

// f32 inputs (a bf16 or f16 run's, already rounded) as bf16 or f16 operands; bf16 bits as bf16.
TOME_ATTENTION_MMA_ENTRY(tome_attention_mma_bf16, float, tome_op_bf16)
TOME_ATTENTION_MMA_ENTRY(tome_attention_mma_f16, float, tome_op_f16)
TOME_ATTENTION_MMA_ENTRY(tome_attention_mma_bf16_bits, tome_bf16_in, tome_op_bf16)
