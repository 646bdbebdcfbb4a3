// A CUDA thread block run on one CPU thread, for testing kernels' logic where there is no GPU.
//
// Each CUDA thread of a block is a ucontext of its own; __syncthreads() and warp shuffles pass
// control round-robin to the next thread, so every thread has reached a barrier before any
// leaves it. Blocks run one after another, so __shared__ variables are function statics.
// Kernels must be block-uniform (every thread reaches the same barriers and shuffles), as
// tome's are. Arithmetic is the host's: results match a GPU's up to rounding, not bit for bit.
#pragma once

#include <math.h>
#include <string.h>
#include <ucontext.h>

#include <array>
#include <functional>
#include <memory>
#include <vector>

// Kernels choose their emulated paths (shared memory read element by element, `mma` modelled
// below) by this.
#define TOME_EMULATED 1

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static

struct tome_dim3 {
    unsigned x = 0, y = 0, z = 0;
};
inline tome_dim3 threadIdx, blockIdx, blockDim, gridDim;

struct alignas(16) float4 {
    float x, y, z, w;
};

inline float __uint_as_float(unsigned u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline unsigned __float_as_uint(float f) {
    unsigned u;
    memcpy(&u, &f, sizeof u);
    return u;
}
template <class T>
inline T min(T a, T b) {
    return a < b ? a : b;
}
template <class T>
inline T max(T a, T b) {
    return a > b ? a : b;
}

namespace emu {
constexpr size_t STACK_BYTES = 256 * 1024;
inline std::vector<ucontext_t> contexts;
inline std::vector<std::unique_ptr<char[]>> stacks;
inline ucontext_t scheduler;
inline std::function<void()> body;
inline std::vector<float> lanes;

// Hands control to the next thread; returns when every other thread has done the same.
inline void barrier() {
    const unsigned t = threadIdx.x;
    const unsigned next = (t + 1) % blockDim.x;
    if (next == t) return;
    threadIdx.x = next;
    swapcontext(&contexts[t], &contexts[next]);
}

inline void thread_main() {
    body();
    const unsigned t = threadIdx.x;
    if (t + 1 < blockDim.x) {
        threadIdx.x = t + 1;
        setcontext(&contexts[t + 1]);
    } else {
        setcontext(&scheduler);
    }
}

// Runs `kernel` on a grid of (grid_x, grid_y) blocks of `threads` threads.
inline void launch(unsigned grid_x, unsigned grid_y, unsigned threads, std::function<void()> kernel) {
    gridDim = {grid_x, grid_y, 1};
    blockDim = {threads, 1, 1};
    body = std::move(kernel);
    contexts.assign(threads, ucontext_t{});
    lanes.assign(threads, 0.0f);
    while (stacks.size() < threads) stacks.emplace_back(new char[STACK_BYTES]);
    for (unsigned by = 0; by < grid_y; ++by) {
        for (unsigned bx = 0; bx < grid_x; ++bx) {
            blockIdx = {bx, by, 0};
            for (unsigned t = 0; t < threads; ++t) {
                getcontext(&contexts[t]);
                contexts[t].uc_stack.ss_sp = stacks[t].get();
                contexts[t].uc_stack.ss_size = STACK_BYTES;
                contexts[t].uc_link = nullptr;
                makecontext(&contexts[t], thread_main, 0);
            }
            threadIdx = {0, 0, 0};
            swapcontext(&scheduler, &contexts[0]);
        }
    }
}
}  // namespace emu

inline void __syncthreads() { emu::barrier(); }

namespace emu {
inline std::vector<std::array<unsigned, 6>> fragments;

// `mma.sync.aligned.m16n8k16.row.col.f32.<t>.<t>.f32` for the warp of the calling thread: every
// lane posts its A (four registers) and B (two) fragments, then computes its four elements of
// D = A B + C from its warp's, with `value` reading a 16-bit operand. Fragment layout as in the
// PTX ISA (attention_mma.cu's header); sums in f32, in k order (a GPU's order and rounding
// inside the instruction may differ slightly).
template <class Value>
inline void mma_m16n8k16(float c[4], const unsigned a[4], const unsigned b[2], Value value) {
    const unsigned tid = threadIdx.x;
    if (fragments.size() < blockDim.x) fragments.resize(blockDim.x);
    fragments[tid] = {a[0], a[1], a[2], a[3], b[0], b[1]};
    barrier();
    const unsigned warp = tid & ~31u, lane = tid & 31u, g = lane / 4, t = lane % 4;
    auto element = [&](unsigned at_lane, int reg, int high) {
        const unsigned r = fragments[warp + at_lane][reg];
        return value((unsigned short)(high ? r >> 16 : r & 0xffffu));
    };
    // A(r, k): lane 4 (r mod 8) + (k mod 8) / 2, register r / 8 + 2 (k / 8), half k mod 2.
    auto A = [&](int r, int k) { return element(4 * (r % 8) + (k % 8) / 2, r / 8 + 2 * (k / 8), k % 2); };
    // B(k, n): lane 4 n + (k mod 8) / 2, register k / 8 (after A's four), half k mod 2.
    auto B = [&](int k, int n) { return element(4 * n + (k % 8) / 2, 4 + k / 8, k % 2); };
    float d[4];
    for (int e = 0; e < 4; ++e) {
        const int r = (int)g + 8 * (e / 2), n = 2 * (int)t + e % 2;
        float sum = c[e];
        for (int k = 0; k < 16; ++k) sum += A(r, k) * B(k, n);
        d[e] = sum;
    }
    barrier();
    for (int e = 0; e < 4; ++e) c[e] = d[e];
}
}  // namespace emu

inline float __shfl_xor_sync(unsigned, float value, int lane_mask) {
    const unsigned t = threadIdx.x;
    emu::lanes[t] = value;
    emu::barrier();
    const float other = emu::lanes[(t & ~31u) | ((t & 31u) ^ (unsigned)lane_mask)];
    emu::barrier();
    return other;
}
