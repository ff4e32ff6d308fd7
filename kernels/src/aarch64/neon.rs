//! NEON tier: 4 lanes. f16 → f32 by integer bit manipulation (the `float16x4_t` conversion
//! intrinsics are not stable Rust), bf16 → f32 by a shift.

use crate::simd::Simd;
use core::arch::aarch64::*;

#[derive(Clone, Copy)]
pub(crate) struct Neon;

impl Simd for Neon {
    type V = float32x4_t;
    const N: usize = 4;
    #[inline(always)]
    unsafe fn splat(self, x: f32) -> float32x4_t {
        vdupq_n_f32(x)
    }
    #[inline(always)]
    unsafe fn load(self, p: *const f32) -> float32x4_t {
        vld1q_f32(p)
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32, v: float32x4_t) {
        vst1q_f32(p, v)
    }
    #[inline(always)]
    unsafe fn load_f16(self, p: *const u16) -> float32x4_t {
        // |h| << 13 is the f32 bit pattern of |h| · 2^-112 for normals and subnormals alike;
        // multiply by 2^112 and patch Inf/NaN's exponent, then restore the sign.
        let h = vmovl_u16(vld1_u16(p));
        let em = vandq_u32(h, vdupq_n_u32(0x7fff));
        let sign = vshlq_n_u32::<16>(vandq_u32(h, vdupq_n_u32(0x8000)));
        let v = vmulq_f32(
            vreinterpretq_f32_u32(vshlq_n_u32::<13>(em)),
            vdupq_n_f32(f32::from_bits(0x7780_0000)),
        );
        let infnan = vandq_u32(vcgeq_u32(em, vdupq_n_u32(0x7c00)), vdupq_n_u32(0x7f80_0000));
        let bits = vorrq_u32(vorrq_u32(vreinterpretq_u32_f32(v), infnan), sign);
        vreinterpretq_f32_u32(bits)
    }
    #[inline(always)]
    unsafe fn load_bf16(self, p: *const u16) -> float32x4_t {
        vreinterpretq_f32_u32(vshlq_n_u32::<16>(vmovl_u16(vld1_u16(p))))
    }
    #[inline(always)]
    unsafe fn add(self, a: float32x4_t, b: float32x4_t) -> float32x4_t {
        vaddq_f32(a, b)
    }
    #[inline(always)]
    unsafe fn sub(self, a: float32x4_t, b: float32x4_t) -> float32x4_t {
        vsubq_f32(a, b)
    }
    #[inline(always)]
    unsafe fn mul(self, a: float32x4_t, b: float32x4_t) -> float32x4_t {
        vmulq_f32(a, b)
    }
    #[inline(always)]
    unsafe fn div(self, a: float32x4_t, b: float32x4_t) -> float32x4_t {
        vdivq_f32(a, b)
    }
    #[inline(always)]
    unsafe fn fma(self, a: float32x4_t, b: float32x4_t, c: float32x4_t) -> float32x4_t {
        vfmaq_f32(c, a, b)
    }
    #[inline(always)]
    unsafe fn max(self, a: float32x4_t, b: float32x4_t) -> float32x4_t {
        vmaxq_f32(a, b)
    }
    #[inline(always)]
    unsafe fn min(self, a: float32x4_t, b: float32x4_t) -> float32x4_t {
        vminq_f32(a, b)
    }
    #[inline(always)]
    unsafe fn abs(self, a: float32x4_t) -> float32x4_t {
        vabsq_f32(a)
    }
    #[inline(always)]
    unsafe fn round(self, a: float32x4_t) -> float32x4_t {
        vrndnq_f32(a)
    }
    #[inline(always)]
    unsafe fn pow2i(self, n: float32x4_t) -> float32x4_t {
        let e = vaddq_s32(vcvtnq_s32_f32(n), vdupq_n_s32(127));
        vreinterpretq_f32_s32(vshlq_n_s32::<23>(e))
    }
    #[inline(always)]
    unsafe fn select_lt(
        self,
        a: float32x4_t,
        b: float32x4_t,
        t: float32x4_t,
        f: float32x4_t,
    ) -> float32x4_t {
        vbslq_f32(vcltq_f32(a, b), t, f)
    }
    #[inline(always)]
    unsafe fn hsum(self, v: float32x4_t) -> f32 {
        vaddvq_f32(v)
    }
    #[inline(always)]
    unsafe fn hmax(self, v: float32x4_t) -> f32 {
        vmaxvq_f32(v)
    }
}

crate::simd::tier_table!(TABLE {
    simd: Neon,
    attr: target_feature(enable = "neon"),
    op_tile: (8, 2),
    packed_tile: (8, 2),
    bf16_matmul: None,
    bf16_burn: None,
    // SAFETY: this table is only handed out where the CPU has NEON; the bodies check for
    // dotprod themselves (`quant::neon`).
    quant_dot: |w, a| unsafe { crate::quant::neon::vec_dot(w, a) },
    quant_dot4: |w, a| unsafe { crate::quant::neon::vec_dot4(w, a) },
    quant_rows: |w, a, y| unsafe { crate::quant::neon::matvec_rows(w, a, y) },
    quant_tile: |w, a, n, o| unsafe { crate::quant::neon::matmul_tile(w, a, n, o) },
});
