// Conversions between f32 and the 16-bit floating-point types, as tome's CPU code makes them,
// shared by the kernels that need them: this text precedes each such source wherever it is
// compiled (NVRTC: `kernels.rs`; the CPU emulation: the harnesses include it first).

// bf16 bits of x, rounded to nearest even, subnormals flushed to a signed zero, NaN kept quiet:
// tome-attn's `to_bf16_bits`, bit for bit.
__device__ __forceinline__ unsigned short tome_bf16_bits(float x) {
    const unsigned int bits = __float_as_uint(x);
    const unsigned int magnitude = bits & 0x7fffffffu;
    if (magnitude > 0x7f800000u) return (unsigned short)((bits >> 16) | 0x40u);
    if (magnitude < 0x00800000u) return (unsigned short)((bits >> 16) & 0x8000u);
    return (unsigned short)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

// f16 bits of x, rounded to nearest even, overflow to infinity, NaN kept quiet with its top
// payload bits: the `half` crate's `f16::from_f32`, bit for bit.
__device__ __forceinline__ unsigned short tome_f16_bits(float value) {
    const unsigned int x = __float_as_uint(value);
    const unsigned int sign = (x & 0x80000000u) >> 16, exp = x & 0x7f800000u, man = x & 0x007fffffu;
    if (exp == 0x7f800000u) return (unsigned short)(sign | 0x7c00u | (man ? 0x0200u : 0u) | (man >> 13));
    const int half_exp = (int)(exp >> 23) - 127 + 15;
    if (half_exp >= 0x1f) return (unsigned short)(sign | 0x7c00u);
    if (half_exp <= 0) {
        if (14 - half_exp > 24) return (unsigned short)sign;  // below half the smallest subnormal
        const unsigned int m = man | 0x00800000u;
        const unsigned int round_bit = 1u << (13 - half_exp);
        const unsigned int half_man = (m >> (14 - half_exp)) + ((m & round_bit) && (m & (3u * round_bit - 1u)) ? 1u : 0u);
        return (unsigned short)(sign | half_man);
    }
    const unsigned int bits = sign | ((unsigned int)half_exp << 10) | (man >> 13);
    return (unsigned short)(bits + ((man & 0x1000u) && (man & 0x2fffu) ? 1u : 0u));
}

// The f32 value of f16 bits (exact).
__device__ __forceinline__ float tome_f16_value(unsigned short h) {
    const unsigned int sign = ((unsigned int)h & 0x8000u) << 16;
    const unsigned int exp = ((unsigned int)h >> 10) & 0x1fu, man = (unsigned int)h & 0x3ffu;
    if (exp == 0x1fu) return __uint_as_float(sign | 0x7f800000u | (man ? 0x00400000u : 0u) | (man << 13));
    if (exp == 0) {
        const float m = (float)man * 5.9604644775390625e-8f;  // man · 2^-24
        return sign ? -m : m;
    }
    return __uint_as_float(sign | ((exp + 112u) << 23) | (man << 13));
}

