// The per-token pieces of a transformer layer on the GPU, in f32: embeddings, layer norm, bias
// with activation, bias with residual, heads split out of and merged back into rows, the merge
// of two attention partials, rows copied between heads, and rounding to bf16 and f16. Matrix
// products are cuBLAS's; attention is attention.cu.
//
// Rows are row-major ([n, cols]); heads are [heads, n, head_dim]. Every kernel is block-uniform
// (see attention.cu): the CPU emulation in tests/emulated runs them too. The bf16 and f16
// conversions are convert.cuh's, which precedes this source wherever it is compiled.

#define TOME_ROW_THREADS 128

#ifndef INFINITY
#define INFINITY __uint_as_float(0x7f800000u)
#endif

// The sum of `value` over the block's TOME_ROW_THREADS threads, returned to every thread.
__device__ __forceinline__ float tome_block_sum(float value, float* scratch) {
    scratch[threadIdx.x] = value;
    __syncthreads();
    for (int stride = TOME_ROW_THREADS / 2; stride > 0; stride /= 2) {
        if ((int)threadIdx.x < stride) {
            scratch[threadIdx.x] += scratch[threadIdx.x + stride];
        }
        __syncthreads();
    }
    const float total = scratch[0];
    __syncthreads();
    return total;
}

// out[i] = word[ids[i]] * word_scale + position[position_ids[i]] + token_type[0], one block a row.
extern "C" __global__ void __launch_bounds__(TOME_ROW_THREADS)
    tome_embed(const unsigned int* ids, const unsigned int* position_ids, const float* word, const float* position,
               const float* token_type, float word_scale, int n, int hidden, float* out) {
    const int row = blockIdx.x;
    if (row >= n) return;
    const float* w = word + (long long)ids[row] * hidden;
    const float* p = position + (long long)position_ids[row] * hidden;
    for (int c = threadIdx.x; c < hidden; c += TOME_ROW_THREADS) {
        out[(long long)row * hidden + c] = (w[c] * word_scale + p[c]) + token_type[c];
    }
}

// Layer norm of each row (biased variance, as PyTorch), in place or not; one block a row.
extern "C" __global__ void __launch_bounds__(TOME_ROW_THREADS)
    tome_layer_norm(const float* x, const float* gamma, const float* beta, int n, int cols, float eps, float* out) {
    __shared__ float scratch[TOME_ROW_THREADS];
    const int row = blockIdx.x;
    if (row >= n) return;  // the whole block: no barrier is left waiting
    const float* r = x + (long long)row * cols;
    float sum = 0.0f;
    for (int c = threadIdx.x; c < cols; c += TOME_ROW_THREADS) sum += r[c];
    const float mean = tome_block_sum(sum, scratch) / cols;
    float squares = 0.0f;
    for (int c = threadIdx.x; c < cols; c += TOME_ROW_THREADS) {
        const float d = r[c] - mean;
        squares += d * d;
    }
    const float inv = rsqrtf(tome_block_sum(squares, scratch) / cols + eps);
    float* o = out + (long long)row * cols;
    for (int c = threadIdx.x; c < cols; c += TOME_ROW_THREADS) {
        o[c] = (r[c] - mean) * inv * gamma[c] + beta[c];
    }
}

// RMS norm of each row (x · rsqrt(mean(x²) + eps) · gamma, as Llama), in place or not; one
// block a row.
extern "C" __global__ void __launch_bounds__(TOME_ROW_THREADS)
    tome_rms_norm(const float* x, const float* gamma, int n, int cols, float eps, float* out) {
    __shared__ float scratch[TOME_ROW_THREADS];
    const int row = blockIdx.x;
    if (row >= n) return;  // the whole block: no barrier is left waiting
    const float* r = x + (long long)row * cols;
    float squares = 0.0f;
    for (int c = threadIdx.x; c < cols; c += TOME_ROW_THREADS) squares += r[c] * r[c];
    const float inv = rsqrtf(tome_block_sum(squares, scratch) / cols + eps);
    float* o = out + (long long)row * cols;
    for (int c = threadIdx.x; c < cols; c += TOME_ROW_THREADS) o[c] = r[c] * inv * gamma[c];
}

// Rotary positions in place on heads [heads, n, d] (d even), the halves rotated as Llama's
// `rotate_half`: x·cos + (-x₂, x₁)·sin, with cos and sin [n, d] for each row's position.
extern "C" __global__ void tome_rope(float* x, const float* cos_table, const float* sin_table, int heads, int n, int d) {
    const int half = d / 2;
    const long long total = (long long)heads * n * half;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (long long)gridDim.x * blockDim.x) {
        const long long row = i / half;  // (head, token)
        const int t = (int)(i % half);
        const long long token = row % n;
        float* r = x + row * d;
        const float* c = cos_table + token * d;
        const float* s = sin_table + token * d;
        const float x1 = r[t], x2 = r[t + half];
        r[t] = x1 * c[t] + (-x2) * s[t];
        r[t + half] = x2 * c[t + half] + x1 * s[t + half];
    }
}

// gate = silu(gate) · up (SwiGLU), both [total].
extern "C" __global__ void tome_silu_mul(float* gate, const float* up, long long total) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (long long)gridDim.x * blockDim.x) {
        const float g = gate[i];
        gate[i] = (g / (1.0f + expf(-g))) * up[i];
    }
}

// y = bf16(x), as bits.
extern "C" __global__ void tome_to_bf16(const float* x, unsigned short* y, long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        y[i] = tome_bf16_bits(x[i]);
    }
}

// x = bf16(x), kept as f32 (what a bf16 run's attention takes).
extern "C" __global__ void tome_round_bf16(float* x, long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        x[i] = __uint_as_float(((unsigned int)tome_bf16_bits(x[i])) << 16);
    }
}

// y = f16(x), as bits.
extern "C" __global__ void tome_to_f16(const float* x, unsigned short* y, long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        y[i] = tome_f16_bits(x[i]);
    }
}

// x = f16(x), kept as f32 (what an f16 run's attention takes).
extern "C" __global__ void tome_round_f16(float* x, long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        x[i] = tome_f16_value(tome_f16_bits(x[i]));
    }
}

// x = act(x + bias), x [n, cols]. act: 0 none, 1 GELU (erf), 2 GELU (tanh), 3 ReLU.
extern "C" __global__ void tome_bias_activation(float* x, const float* bias, long long n, int cols, int act) {
    const long long total = n * cols;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (long long)gridDim.x * blockDim.x) {
        const float v = x[i] + bias[i % cols];
        float y = v;
        if (act == 1) {
            y = 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
        } else if (act == 2) {
            y = 0.5f * v * (1.0f + tanhf(0.79788456080286536f * (v + 0.044715f * v * v * v)));
        } else if (act == 3) {
            y = fmaxf(v, 0.0f);
        }
        x[i] = y;
    }
}

// x = x + bias + residual, all [n, cols].
extern "C" __global__ void tome_bias_residual(float* x, const float* bias, const float* residual, long long n, int cols) {
    const long long total = n * cols;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (long long)gridDim.x * blockDim.x) {
        x[i] = (x[i] + bias[i % cols]) + residual[i];
    }
}

// Columns col_offset .. col_offset + heads * d of rows [n, row_stride] -> heads [heads, n, d]
// (a fused q/k/v projection's part: row_stride 3 · heads · d).
extern "C" __global__ void tome_split_heads(const float* rows, int n, int heads, int d, int row_stride, int col_offset,
                                            float* out) {
    const long long total = (long long)n * heads * d;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (long long)gridDim.x * blockDim.x) {
        const long long row = i / ((long long)heads * d);
        const int rest = (int)(i % ((long long)heads * d));
        const int h = rest / d, t = rest % d;
        out[((long long)h * n + row) * d + t] = rows[row * row_stride + col_offset + rest];
    }
}

// heads [heads, n, d] -> rows [n, heads * d].
extern "C" __global__ void tome_merge_heads(const float* in, int n, int heads, int d, float* rows) {
    const long long total = (long long)n * heads * d;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (long long)gridDim.x * blockDim.x) {
        const long long row = i / ((long long)heads * d);
        const int rest = (int)(i % ((long long)heads * d));
        const int h = rest / d, t = rest % d;
        rows[i] = in[((long long)h * n + row) * d + t];
    }
}

// dst[h, dst_rows[i], :] = src[h, src_rows[i], :] for i < m in every head h, src [heads, src_n,
// d] and dst [heads, dst_n, d]: selected rows gathered (dst_rows 0..m) or scattered back
// (src_rows 0..m). Indices are checked on the host; dst_rows name each row at most once.
extern "C" __global__ void tome_copy_rows(const float* src, int src_n, const int* src_rows, float* dst, int dst_n,
                                          const int* dst_rows, int heads, int m, int d) {
    const long long total = (long long)heads * m * d;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (long long)gridDim.x * blockDim.x) {
        const long long row = i / d;  // (head, selected row)
        const int t = (int)(i % d);
        const int h = (int)(row / m), r = (int)(row % m);
        dst[((long long)h * dst_n + dst_rows[r]) * d + t] = src[((long long)h * src_n + src_rows[r]) * d + t];
    }
}

// (acc_out, acc_lse) = merge((acc_out, acc_lse), (out, lse)): partials of the same queries over
// disjoint keys, rows of width d, one thread a row (the formula of tome-attn's `Partial::merge`).
extern "C" __global__ void tome_merge_partials(float* acc_out, float* acc_lse, const float* out, const float* lse, long long rows,
                                               int d) {
    for (long long row = (long long)blockIdx.x * blockDim.x + threadIdx.x; row < rows; row += (long long)gridDim.x * blockDim.x) {
        const float a = acc_lse[row], b = lse[row];
        const float m = fmaxf(a, b);
        float* o = acc_out + row * d;
        const float* r = out + row * d;
        if (m == -INFINITY) {
            for (int t = 0; t < d; ++t) o[t] = 0.0f;
            acc_lse[row] = -INFINITY;
            continue;
        }
        const float ea = expf(a - m), eb = expf(b - m);
        const float total = ea + eb;
        const float wa = ea / total, wb = eb / total;
        for (int t = 0; t < d; ++t) o[t] = wa * o[t] + wb * r[t];
        acc_lse[row] = m + logf(total);
    }
}
