//! x86_64 tiers: AVX2+FMA+F16C and AVX-512F/BW/VL (+ AVX-512 BF16 where present).

pub(crate) mod avx2;
pub(crate) mod avx512;
