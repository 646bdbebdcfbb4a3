// Runs every kernel of kernels/layers.cu under cuda_emulation.h on inputs read from a file:
//   layers_harness IN OUT
// IN (little-endian): i64 n, hidden, heads, vocab, positions; f32 eps, word_scale; u32 ids[n],
// position_ids[n]; f32 word[vocab * hidden], position[positions * hidden], token_type[hidden],
// gamma[hidden], beta[hidden], bias[hidden], residual[n * hidden], x[n * hidden],
// acc_out[n * hidden], acc_lse[heads * n], out[n * hidden], lse[heads * n], to_round[ROUND].
// OUT: f32 embedded, normed (x), then x + bias under each activation 0..3, x + bias + residual,
// x split into heads, that merged back into rows, the second half of x's columns split into
// heads / 2 heads, x's RMS norm, the rotary cos and sin tables, x's heads rotated, SwiGLU of x
// and residual, to_round's bf16 bits widened and rounded in place, its f16 bits (as floats) and
// rounded in place, the merged partial's out then
// lse, four rows of the heads gathered, then scattered among zeros.
#include "cuda_emulation.h"
#include "harness_io.h"
#include "../../kernels/convert.cuh"
#include "../../kernels/layers.cu"

// Values rounded to bf16 and f16.
constexpr int ROUND = 24;

static unsigned spread(long long total) { return (unsigned)((total + 255) / 256); }

int main(int argc, char** argv) {
    if (argc != 3) return 2;
    FILE* in = fopen(argv[1], "rb");
    if (!in) return 2;
    auto h = read_vec<long long>(in, 5);
    const long long n = h[0], hidden = h[1], heads = h[2], vocab = h[3], npos = h[4];
    auto f = read_vec<float>(in, 2);
    const float eps = f[0], word_scale = f[1];
    auto ids = read_vec<unsigned>(in, n), pos_ids = read_vec<unsigned>(in, n);
    auto word = read_vec<float>(in, vocab * hidden), position = read_vec<float>(in, npos * hidden);
    auto token_type = read_vec<float>(in, hidden), gamma = read_vec<float>(in, hidden), beta = read_vec<float>(in, hidden);
    auto bias = read_vec<float>(in, hidden), residual = read_vec<float>(in, n * hidden), x = read_vec<float>(in, n * hidden);
    auto acc_out = read_vec<float>(in, n * hidden), acc_lse = read_vec<float>(in, heads * n);
    auto out = read_vec<float>(in, n * hidden), lse = read_vec<float>(in, heads * n);
    auto to_round = read_vec<float>(in, ROUND);
    fclose(in);

    const long long total = n * hidden;
    const int d = (int)(hidden / heads);
    std::vector<float> results;
    auto keep = [&](const std::vector<float>& v) { results.insert(results.end(), v.begin(), v.end()); };

    std::vector<float> embedded(total);
    emu::launch((unsigned)n, 1, TOME_ROW_THREADS, [&] {
        tome_embed(ids.data(), pos_ids.data(), word.data(), position.data(), token_type.data(), word_scale, (int)n,
                   (int)hidden, embedded.data());
    });
    keep(embedded);
    std::vector<float> normed(total);
    emu::launch((unsigned)n, 1, TOME_ROW_THREADS, [&] {
        tome_layer_norm(x.data(), gamma.data(), beta.data(), (int)n, (int)hidden, eps, normed.data());
    });
    keep(normed);
    for (int act = 0; act < 4; ++act) {
        std::vector<float> y = x;
        emu::launch(spread(total), 1, 256, [&] { tome_bias_activation(y.data(), bias.data(), n, (int)hidden, act); });
        keep(y);
    }
    std::vector<float> summed = x;
    emu::launch(spread(total), 1, 256, [&] { tome_bias_residual(summed.data(), bias.data(), residual.data(), n, (int)hidden); });
    keep(summed);
    std::vector<float> split(total), back(total);
    emu::launch(spread(total), 1, 256, [&] { tome_split_heads(x.data(), (int)n, (int)heads, d, (int)hidden, 0, split.data()); });
    emu::launch(spread(total), 1, 256, [&] { tome_merge_heads(split.data(), (int)n, (int)heads, d, back.data()); });
    keep(split);
    keep(back);
    // The second half of each row's columns as heads / 2 heads (a fused projection's part).
    std::vector<float> part(total / 2);
    emu::launch(spread(total / 2), 1, 256, [&] {
        tome_split_heads(x.data(), (int)n, (int)(heads / 2), d, (int)hidden, (int)(hidden / 2), part.data());
    });
    keep(part);
    // RMS norm of x; rotary positions on x as heads (cos/sin: position angles of each row); SwiGLU
    // of x (gate) and residual (up).
    std::vector<float> rms(total);
    emu::launch((unsigned)n, 1, TOME_ROW_THREADS, [&] { tome_rms_norm(x.data(), gamma.data(), (int)n, (int)hidden, eps, rms.data()); });
    keep(rms);
    std::vector<float> cos_table(n * d), sin_table(n * d);
    for (long long i = 0; i < n; ++i) {
        for (int t = 0; t < d; ++t) {
            const float angle = (float)(i + 3) / powf(10000.0f, (float)(2 * (t % (d / 2))) / d);
            cos_table[i * d + t] = cosf(angle);
            sin_table[i * d + t] = sinf(angle);
        }
    }
    std::vector<float> rotated = split;
    emu::launch(spread(total / 2), 1, 256, [&] { tome_rope(rotated.data(), cos_table.data(), sin_table.data(), (int)heads, (int)n, d); });
    keep(cos_table);
    keep(sin_table);
    keep(rotated);
    std::vector<float> swiglu = x;
    emu::launch(spread(total), 1, 256, [&] { tome_silu_mul(swiglu.data(), residual.data(), total); });
    keep(swiglu);
    // bf16 of ROUND values (ties, subnormals, overflow, NaN), as bits widened back, and in place.
    std::vector<unsigned short> bits(ROUND);
    emu::launch(1, 1, 256, [&] { tome_to_bf16(to_round.data(), bits.data(), ROUND); });
    std::vector<float> widened(ROUND);
    for (int i = 0; i < ROUND; ++i) widened[i] = __uint_as_float(((unsigned)bits[i]) << 16);
    keep(widened);
    std::vector<float> rounded = to_round;
    emu::launch(1, 1, 256, [&] { tome_round_bf16(rounded.data(), ROUND); });
    keep(rounded);
    // The same values to f16: bits (one per f32 slot), and rounded in place.
    emu::launch(1, 1, 256, [&] { tome_to_f16(to_round.data(), bits.data(), ROUND); });
    for (int i = 0; i < ROUND; ++i) widened[i] = (float)bits[i];
    keep(widened);
    rounded = to_round;
    emu::launch(1, 1, 256, [&] { tome_round_f16(rounded.data(), ROUND); });
    keep(rounded);
    emu::launch(spread(heads * n), 1, 256, [&] {
        tome_merge_partials(acc_out.data(), acc_lse.data(), out.data(), lse.data(), heads * n, d);
    });
    keep(acc_out);
    keep(acc_lse);
    // Rows 5, 0, n-1 and 12 of x's heads gathered, then scattered into zeros at rows 1, n-7, 2, 7.
    const int picked[4] = {5, 0, (int)n - 1, 12}, placed[4] = {1, (int)n - 7, 2, 7}, in_order[4] = {0, 1, 2, 3};
    std::vector<float> gathered(heads * 4 * d), scattered(total, 0.0f);
    emu::launch(spread(heads * 4 * d), 1, 256, [&] { tome_copy_rows(split.data(), (int)n, picked, gathered.data(), 4, in_order, (int)heads, 4, d); });
    emu::launch(spread(heads * 4 * d), 1, 256, [&] { tome_copy_rows(gathered.data(), 4, in_order, scattered.data(), (int)n, placed, (int)heads, 4, d); });
    keep(gathered);
    keep(scattered);

    return write_floats(argv[2], {&results}) ? 0 : 2;
}
