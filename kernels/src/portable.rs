//! Portable tier: `wide::f32x8`, for targets without a hand-written tier. Half-precision loads
//! widen lane by lane (no conversion instructions assumed).

use crate::simd::Simd;
use wide::f32x8;

#[derive(Clone, Copy)]
pub(crate) struct Portable;

impl Simd for Portable {
    type V = f32x8;
    const N: usize = 8;
    #[inline(always)]
    unsafe fn splat(self, x: f32) -> f32x8 {
        f32x8::splat(x)
    }
    #[inline(always)]
    unsafe fn load(self, p: *const f32) -> f32x8 {
        f32x8::new(std::ptr::read_unaligned(p as *const [f32; 8]))
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32, v: f32x8) {
        std::ptr::write_unaligned(p as *mut [f32; 8], v.to_array())
    }
    #[inline(always)]
    unsafe fn load_f16(self, p: *const u16) -> f32x8 {
        let h = std::ptr::read_unaligned(p as *const [u16; 8]);
        f32x8::new(h.map(|b| crate::f16::from_bits(b).to_f32()))
    }
    #[inline(always)]
    unsafe fn load_bf16(self, p: *const u16) -> f32x8 {
        let h = std::ptr::read_unaligned(p as *const [u16; 8]);
        f32x8::new(h.map(|b| f32::from_bits((b as u32) << 16)))
    }
    #[inline(always)]
    unsafe fn add(self, a: f32x8, b: f32x8) -> f32x8 {
        a + b
    }
    #[inline(always)]
    unsafe fn sub(self, a: f32x8, b: f32x8) -> f32x8 {
        a - b
    }
    #[inline(always)]
    unsafe fn mul(self, a: f32x8, b: f32x8) -> f32x8 {
        a * b
    }
    #[inline(always)]
    unsafe fn div(self, a: f32x8, b: f32x8) -> f32x8 {
        a / b
    }
    #[inline(always)]
    unsafe fn fma(self, a: f32x8, b: f32x8, c: f32x8) -> f32x8 {
        a.mul_add(b, c)
    }
    #[inline(always)]
    unsafe fn max(self, a: f32x8, b: f32x8) -> f32x8 {
        a.max(b)
    }
    #[inline(always)]
    unsafe fn min(self, a: f32x8, b: f32x8) -> f32x8 {
        a.min(b)
    }
    #[inline(always)]
    unsafe fn abs(self, a: f32x8) -> f32x8 {
        a.abs()
    }
    #[inline(always)]
    unsafe fn round(self, a: f32x8) -> f32x8 {
        a.round()
    }
    #[inline(always)]
    unsafe fn pow2i(self, n: f32x8) -> f32x8 {
        f32x8::new(
            n.to_array()
                .map(|v| f32::from_bits(((v as i32 + 127) as u32) << 23)),
        )
    }
    #[inline(always)]
    unsafe fn select_lt(self, a: f32x8, b: f32x8, t: f32x8, f: f32x8) -> f32x8 {
        a.simd_lt(b).select(t, f)
    }
    #[inline(always)]
    unsafe fn hsum(self, v: f32x8) -> f32 {
        v.reduce_add()
    }
    #[inline(always)]
    unsafe fn hmax(self, v: f32x8) -> f32 {
        v.to_array().into_iter().fold(f32::NEG_INFINITY, f32::max)
    }
}

// Block formats: the oracle's integer dots (`quant::scalar::vec_dot`, the macro's default)
// for now; a `wide` body would gain little over what the compiler makes of those loops.
crate::simd::tier_table!(TABLE {
    simd: Portable,
    attr: inline,
    op_tile: (4, 1),
    packed_tile: (4, 1),
    bf16_matmul: None,
    bf16_burn: None,
});
