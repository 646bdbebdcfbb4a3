//! The arithmetic a job asks for: [`Precision::F32`] is exact (DESIGN §1), [`Precision::Bf16`]
//! stores weights and attention inputs in bfloat16 and accumulates in f32, with f32 softmax
//! statistics, f32 (out, lse) partials and f32 norms and residual sums.

use std::fmt;
use std::str::FromStr;

/// The arithmetic of a job's matrix products and attention inputs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Precision {
    /// f32 throughout: the exact path every golden fixture holds.
    #[default]
    F32,
    /// Weights and attention inputs in bfloat16 (rounded to nearest even), products accumulated
    /// in f32; everything that crosses ranks and every norm stays f32.
    Bf16,
    /// As `Bf16` with IEEE half precision (10 mantissa bits, largest value 65504) in place of
    /// bfloat16: GPU ranks only.
    F16,
}

impl Precision {
    /// Every precision, in the order messages list them.
    pub const ALL: &[Precision] = &[Precision::F32, Precision::Bf16, Precision::F16];

    /// The precisions CPU ranks compute in (f16 has no fast path on CPUs, and bf16 its range).
    pub const CPU: &[Precision] = &[Precision::F32, Precision::Bf16];

    /// Its name on the command line and the wire (`f32`, `bf16`, `f16`).
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::F16 => "f16",
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Precision {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Precision::ALL.iter().copied().find(|p| p.name() == s).ok_or_else(|| {
            let names: Vec<_> = Precision::ALL.iter().map(|p| p.name()).collect();
            format!("unknown dtype `{s}`; one of {}", names.join(", "))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_ones_are_refused_with_the_list() {
        for &p in Precision::ALL {
            assert_eq!(p.name().parse::<Precision>(), Ok(p));
        }
        assert_eq!("f8".parse::<Precision>(), Err("unknown dtype `f8`; one of f32, bf16, f16".to_string()));
    }
}
