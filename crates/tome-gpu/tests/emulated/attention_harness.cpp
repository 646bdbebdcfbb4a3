// Runs kernels/attention.cu under cuda_emulation.h on one call read from a file:
//   attention_harness IN OUT
// IN (little-endian): i64 bf16, hq, hk, nq, nk, d, dv, causal, window, has_valid; f32 scale;
// q, k, v (f32, or bf16 bits as u16); i64 q_pos[nq], k_pos[nk]; u8 valid[nk] if has_valid.
// OUT: f32 out[hq * nq * dv], then f32 lse[hq * nq].
#include "cuda_emulation.h"
#include "harness_io.h"
#include "../../kernels/key_range.cuh"
#include "../../kernels/attention.cu"

template <class T>
static void run(FILE* in, const long long* h, float scale, std::vector<float>& out, std::vector<float>& lse) {
    const long long hq = h[1], hk = h[2], nq = h[3], nk = h[4], d = h[5], dv = h[6];
    auto q = read_vec<T>(in, hq * nq * d);
    auto k = read_vec<T>(in, hk * nk * d);
    auto v = read_vec<T>(in, hk * nk * dv);
    auto q_pos = read_vec<long long>(in, nq);
    auto k_pos = read_vec<long long>(in, nk);
    auto valid = read_vec<unsigned char>(in, h[9] ? nk : 0);
    const unsigned char* valid_ptr = h[9] ? valid.data() : nullptr;
    emu::launch((unsigned)((nq + TOME_ROWS - 1) / TOME_ROWS), (unsigned)hq, TOME_THREADS, [&] {
        tome_attention<T>(q.data(), k.data(), v.data(), q_pos.data(), k_pos.data(), valid_ptr, (int)hq, (int)hk,
                          (int)nq, (int)nk, (int)d, (int)dv, (int)h[7], h[8], scale, out.data(), lse.data());
    });
}

int main(int argc, char** argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: attention_harness IN OUT\n");
        return 2;
    }
    FILE* in = fopen(argv[1], "rb");
    if (!in) return 2;
    long long h[10];
    float scale;
    if (fread(h, sizeof h[0], 10, in) != 10 || fread(&scale, sizeof scale, 1, in) != 1) return 2;
    std::vector<float> out(h[1] * h[3] * h[6], NAN), lse(h[1] * h[3], NAN);
    if (h[0]) {
        run<tome_bf16>(in, h, scale, out, lse);
    } else {
        run<float>(in, h, scale, out, lse);
    }
    fclose(in);
    return write_floats(argv[2], {&out, &lse}) ? 0 : 2;
}
