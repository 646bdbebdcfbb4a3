//! f32 ⇄ bfloat16 as the products use them: rounding to nearest even, subnormals flushed to
//! zero (as `vdpbf16ps` reads them), NaN kept quiet.

/// The bf16 bits nearest `x` (ties to even); subnormals become zero of the same sign. Written
/// without branches, so that loops over it vectorise.
#[inline(always)]
pub fn to_bf16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    let magnitude = bits & 0x7fff_ffff;
    // Adding 0x7fff plus the lowest kept bit rounds half to even; a carry into the exponent is
    // the correct rounding up (to the next binade, or to infinity past the largest finite).
    // bf16 has f32's exponent range, so a normal value stays normal (or becomes infinite).
    let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16;
    let quiet_nan = (bits >> 16) | 0x40;
    let signed_zero = (bits >> 16) & 0x8000;
    let out = if magnitude > 0x7f80_0000 {
        quiet_nan
    } else if magnitude < 0x0080_0000 {
        signed_zero
    } else {
        rounded
    };
    out as u16
}

/// The f32 value of bf16 bits (exact).
#[inline(always)]
pub fn from_bf16_bits(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// `x` rounded to the nearest bf16 value, as f32.
#[inline(always)]
pub fn round_to_bf16(x: f32) -> f32 {
    from_bf16_bits(to_bf16_bits(x))
}

/// Two bf16 values in one 32-bit lane, `lo` in the low half: the element order of a
/// `vdpbf16ps` operand pair.
#[inline(always)]
pub(crate) fn pair(lo: f32, hi: f32) -> u32 {
    to_bf16_bits(lo) as u32 | ((to_bf16_bits(hi) as u32) << 16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_to_nearest_even_and_flushes_subnormals() {
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to the even one, 1.
        assert_eq!(round_to_bf16(1.0 + 2f32.powi(-8)), 1.0);
        // 1 + 3·2^-8 is halfway between 1 + 2^-7 (odd) and 1 + 2^-6 (even).
        assert_eq!(round_to_bf16(1.0 + 3.0 * 2f32.powi(-8)), 1.0 + 2f32.powi(-6));
        assert_eq!(round_to_bf16(1.0 + 2f32.powi(-8) + 2f32.powi(-20)), 1.0 + 2f32.powi(-7));
        assert_eq!(round_to_bf16(-2.5), -2.5);
        assert_eq!(to_bf16_bits(f32::MIN_POSITIVE / 4.0), 0);
        assert_eq!(to_bf16_bits(-f32::MIN_POSITIVE / 4.0), 0x8000);
        assert!(round_to_bf16(f32::NAN).is_nan());
        assert_eq!(round_to_bf16(f32::INFINITY), f32::INFINITY);
        assert_eq!(round_to_bf16(f32::MAX), f32::INFINITY);
        assert_eq!(pair(1.0, -2.0), 0xc000_3f80);
    }
}
