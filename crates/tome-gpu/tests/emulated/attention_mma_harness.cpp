// Runs kernels/attention_mma.cu under cuda_emulation.h on one call read from a file:
//   attention_mma_harness IN OUT
// IN (little-endian): i64 f16 (operands: 0 bf16, 1 f16), bits (inputs: 0 f32, 1 bf16 bits), hq,
// hk, nq, nk, d, dv, causal, window, has_valid; f32 scale; q, k, v (f32, or bf16 bits as u16);
// i64 q_pos[nq], k_pos[nk]; u8 valid[nk] if has_valid.
// OUT: f32 out[hq * nq * dv], then f32 lse[hq * nq].
#include "cuda_emulation.h"
#include "harness_io.h"
#include "../../kernels/convert.cuh"
#include "../../kernels/key_range.cuh"
#include "../../kernels/attention_mma.cu"

template <class T, class Op>
static void run(FILE* in, const long long* h, float scale, std::vector<float>& out, std::vector<float>& lse) {
    const long long hq = h[2], hk = h[3], nq = h[4], nk = h[5], d = h[6], dv = h[7];
    auto q = read_vec<T>(in, hq * nq * d);
    auto k = read_vec<T>(in, hk * nk * d);
    auto v = read_vec<T>(in, hk * nk * dv);
    auto q_pos = read_vec<long long>(in, nq);
    auto k_pos = read_vec<long long>(in, nk);
    auto valid = read_vec<unsigned char>(in, h[10] ? nk : 0);
    const unsigned char* valid_ptr = h[10] ? valid.data() : nullptr;
    emu::launch((unsigned)((nq + TOME_MMA_ROWS - 1) / TOME_MMA_ROWS), (unsigned)hq, TOME_MMA_THREADS, [&] {
        tome_attention_mma<T, Op>(q.data(), k.data(), v.data(), q_pos.data(), k_pos.data(), valid_ptr, (int)hq, (int)hk,
                                  (int)nq, (int)nk, (int)d, (int)dv, (int)h[8], h[9], scale, out.data(), lse.data());
    });
}

int main(int argc, char** argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: attention_mma_harness IN OUT\n");
        return 2;
    }
    FILE* in = fopen(argv[1], "rb");
    if (!in) return 2;
    long long h[11];
    float scale;
    if (fread(h, sizeof h[0], 11, in) != 11 || fread(&scale, sizeof scale, 1, in) != 1) return 2;
    std::vector<float> out(h[2] * h[4] * h[7], NAN), lse(h[2] * h[4], NAN);
    if (h[1]) {
        run<tome_bf16_in, tome_op_bf16>(in, h, scale, out, lse);
    } else if (h[0]) {
        run<float, tome_op_f16>(in, h, scale, out, lse);
    } else {
        run<float, tome_op_bf16>(in, h, scale, out, lse);
    }
    fclose(in);
    return write_floats(argv[2], {&out, &lse}) ? 0 : 2;
}
