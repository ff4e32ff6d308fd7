//! NEON integer dot products of weight blocks with quantized activations, the approach of
//! ggml's `arch/arm/quants.c`: unpack each block's weights to signed bytes, multiply them with
//! the activation bytes into i32 lanes, reduce the lanes to one i32 per block, then one f32
//! FMA per block (two with a min part).
//!
//! Two bodies share every line but the 16-byte dot:
//! - `sdot` (the `dotprod` extension, ARMv8.2+: Cortex-A55/A76, Neoverse, Apple): `SDOT`;
//! - `mull` (plain NEON, e.g. Cortex-A53/A72, Raspberry Pi 3/4): `SMULL` + `SADALP`.
//!
//! The entry points pick one per call (`has_dotprod`). Both form the same exact integer sum per
//! block (which lane holds which product differs, but the lanes are reduced in integers before
//! any float work), and then run the same float operations, so they agree bit for bit (a unit
//! test below checks it). Nothing can overflow: i8 × i8 ≤ 2^14 in i16 (`SMULL`), and every
//! i32 sum is far below 2^31 (the largest, a Q6_K super-block, is ≤ 16·128·16·32·128 = 2^27).
//!
//! `vdotq_s32` is not stable Rust (1.95; `stdarch_neon_dotprod`), so `SDOT` is inline `asm!`.

use super::*;
use crate::Weights;
use core::arch::aarch64::*;
use core::arch::asm;
use half::f16;

/// Whether the CPU has the dot-product extension. std detects it once and caches the answer;
/// the entry points below ask once per call.
#[inline]
fn has_dotprod() -> bool {
    std::arch::is_aarch64_feature_detected!("dotprod")
}

/// The 16-byte integer dot of a body.
trait Dot: Copy {
    /// `acc` plus the 16 products `a[i]·b[i]`, spread over the four lanes (how is the body's).
    unsafe fn dot(self, acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t;
}

/// `SDOT`: lane i += Σ of products 4i..4i+4.
#[derive(Clone, Copy)]
struct Sdot;

impl Dot for Sdot {
    #[inline(always)]
    unsafe fn dot(self, mut acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
        // SAFETY: `Sdot` is only used by the `sdot` body, whose functions are compiled with
        // `dotprod` and entered only where the CPU has it (`has_dotprod`). Registers only.
        asm!(
            "sdot {acc:v}.4s, {a:v}.16b, {b:v}.16b",
            acc = inout(vreg) acc,
            a = in(vreg) a,
            b = in(vreg) b,
            options(pure, nomem, nostack, preserves_flags)
        );
        acc
    }
}

/// Plain NEON: i8 × i8 → i16 (`SMULL`, exact), then pairs added into the i32 lanes (`SADALP`).
#[derive(Clone, Copy)]
struct Mull;

impl Dot for Mull {
    #[inline(always)]
    unsafe fn dot(self, acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
        let lo = vmull_s8(vget_low_s8(a), vget_low_s8(b));
        let hi = vmull_high_s8(a, b);
        vpadalq_s16(vpadalq_s16(acc, lo), hi)
    }
}

/// Σ of 32 products: `a` (two vectors) with the 32 bytes at `b`.
///
/// # Safety
/// `b` must point to 32 readable bytes.
#[inline(always)]
unsafe fn dot32<D: Dot>(d: D, a: [int8x16_t; 2], b: *const i8) -> int32x4_t {
    let p = d.dot(vdupq_n_s32(0), a[0], vld1q_s8(b));
    d.dot(p, a[1], vld1q_s8(b.add(16)))
}

/// f16 → f32 by `FCVT` (base AArch64 floating point; the f16 conversion intrinsics are not
/// stable Rust, and `half` would check for the `fp16` extension on every call).
#[inline(always)]
fn h2f(h: f16) -> f32 {
    let out: f32;
    // SAFETY: `FCVT Sd, Hn` is in every AArch64 CPU's base FP; it touches only registers.
    unsafe {
        asm!(
            "fcvt {o:s}, {i:h}",
            o = lateout(vreg) out,
            i = in(vreg) h.to_bits(),
            options(pure, nomem, nostack, preserves_flags)
        );
    }
    out
}

/// 16 nibbles → 32 bytes: the low nibbles of the 16 bytes (values 0..16), then their high
/// nibbles (values 16..32), as [`BlockQ4_0`] lays them out.
#[inline(always)]
unsafe fn nibbles(p: &[u8; 16]) -> [uint8x16_t; 2] {
    let v = vld1q_u8(p.as_ptr());
    [vandq_u8(v, vdupq_n_u8(0xF)), vshrq_n_u8::<4>(v)]
}

/// The 32 bits of a Q5 `qh` → 32 bytes, 0xFF where bit j is set.
#[inline(always)]
unsafe fn bits(qh: [u8; 4]) -> [uint8x16_t; 2] {
    // Byte k of each half tests bit k mod 8 of qh byte 2·half + k / 8.
    let bit = vreinterpretq_u8_u64(vdupq_n_u64(0x8040_2010_0804_0201));
    let lo = vcombine_u8(vdup_n_u8(qh[0]), vdup_n_u8(qh[1]));
    let hi = vcombine_u8(vdup_n_u8(qh[2]), vdup_n_u8(qh[3]));
    [vtstq_u8(lo, bit), vtstq_u8(hi, bit)]
}

#[inline(always)]
unsafe fn s8(v: uint8x16_t) -> int8x16_t {
    vreinterpretq_s8_u8(v)
}

/// A weight block of a format dotted with Q8_0 activations: value j = `d · values[j]`.
trait Legacy0 {
    /// The 32 values as signed bytes (value j in lane j mod 16 of vector j / 16), and `d`.
    unsafe fn values(&self) -> ([int8x16_t; 2], f32);
}

impl Legacy0 for BlockQ8_0 {
    #[inline(always)]
    unsafe fn values(&self) -> ([int8x16_t; 2], f32) {
        let p = self.qs.as_ptr();
        ([vld1q_s8(p), vld1q_s8(p.add(16))], h2f(self.d))
    }
}

impl Legacy0 for BlockQ4_0 {
    #[inline(always)]
    unsafe fn values(&self) -> ([int8x16_t; 2], f32) {
        let eight = vdupq_n_s8(8);
        let n = nibbles(&self.qs);
        (n.map(|v| vsubq_s8(s8(v), eight)), h2f(self.d))
    }
}

impl Legacy0 for BlockQ5_0 {
    #[inline(always)]
    unsafe fn values(&self) -> ([int8x16_t; 2], f32) {
        // Where the fifth bit is clear, q - 16 = nibble - 16 = (nibble | 0xF0) as i8.
        let (n, b) = (nibbles(&self.qs), bits(self.qh));
        let hi = vdupq_n_u8(0xF0);
        let v = [0, 1].map(|i| s8(vorrq_u8(n[i], vbicq_u8(hi, b[i]))));
        (v, h2f(self.d))
    }
}

/// A weight block of a format dotted with Q8_1 activations: value j = `d · values[j] + m`.
trait Legacy1 {
    /// The 32 values q ≥ 0 as bytes (laid out as [`Legacy0::values`]), `d` and `m`.
    unsafe fn values(&self) -> ([int8x16_t; 2], f32, f32);
}

impl Legacy1 for BlockQ4_1 {
    #[inline(always)]
    unsafe fn values(&self) -> ([int8x16_t; 2], f32, f32) {
        (nibbles(&self.qs).map(|v| s8(v)), h2f(self.d), h2f(self.m))
    }
}

impl Legacy1 for BlockQ5_1 {
    #[inline(always)]
    unsafe fn values(&self) -> ([int8x16_t; 2], f32, f32) {
        let (n, b) = (nibbles(&self.qs), bits(self.qh));
        let sixteen = vdupq_n_u8(0x10);
        let v = [0, 1].map(|i| s8(vorrq_u8(n[i], vandq_u8(b[i], sixteen))));
        (v, h2f(self.d), h2f(self.m))
    }
}

// The multi-token bodies: one weight row against `N` tokens' activations, each weight block
// unpacked once. The single-token dots are these with N = 1, so a token's sum runs in the same
// order alone (decode) or beside others (prefill, batches): issue 12's batch invariance. Each
// token has its own scalar accumulator, summed block by block in order.

/// Q8_0 / Q4_0 / Q5_0 against Q8_0: Σ (d·dy)·Σq·qy.
#[inline(always)]
unsafe fn legacy0_n<D: Dot, B: Legacy0, const N: usize>(
    d: D,
    x: &[B],
    ys: [&[BlockQ8_0]; N],
) -> [f32; N] {
    let mut acc = [0f32; N];
    for (i, x) in x.iter().enumerate() {
        let (q, dx) = x.values();
        for t in 0..N {
            let y = &ys[t][i];
            let s = vaddvq_s32(dot32(d, q, y.qs.as_ptr()));
            acc[t] = (dx * h2f(y.d)).mul_add(s as f32, acc[t]);
        }
    }
    acc
}

/// Q4_1 / Q5_1 against Q8_1: Σ (d·dy)·Σq·qy + m·s.
#[inline(always)]
unsafe fn legacy1_n<D: Dot, B: Legacy1, const N: usize>(
    d: D,
    x: &[B],
    ys: [&[BlockQ8_1]; N],
) -> [f32; N] {
    let mut acc = [0f32; N];
    for (i, x) in x.iter().enumerate() {
        let (q, dx, m) = x.values();
        for t in 0..N {
            let y = &ys[t][i];
            let s = vaddvq_s32(dot32(d, q, y.qs.as_ptr()));
            acc[t] = (dx * h2f(y.d)).mul_add(s as f32, acc[t]);
            acc[t] = m.mul_add(h2f(y.s), acc[t]);
        }
    }
    acc
}

/// The twelve packed scale bytes of a Q4_K / Q5_K super-block as the eight 6-bit scales and
/// the eight 6-bit mins (the same values as `scalar::scale_min_k4`, four at a time).
#[inline(always)]
fn k4_unpack(s: &[u8; K_SCALE_SIZE]) -> ([u8; 8], [u8; 8]) {
    const M1: u32 = 0x3f3f3f3f;
    const M2: u32 = 0x0f0f0f0f;
    const M3: u32 = 0x03030303;
    let w = |i: usize| u32::from_le_bytes([s[i], s[i + 1], s[i + 2], s[i + 3]]);
    let (u0, u1, u2) = (w(0), w(4), w(8));
    let sc0 = u0 & M1;
    let sc1 = (u2 & M2) | (((u0 >> 6) & M3) << 4);
    let m0 = u1 & M1;
    let m1 = ((u2 >> 4) & M2) | (((u1 >> 6) & M3) << 4);
    let cat = |a: u32, b: u32| (a as u64 | (b as u64) << 32).to_le_bytes();
    (cat(sc0, sc1), cat(m0, m1))
}

/// Σ mins[k] · (bsums[2k] + bsums[2k + 1]): the min part of a Q4_K / Q5_K super-block's dot,
/// exact (pair sums ≤ 2·16·128 fit i16; products widen to i32).
#[inline(always)]
unsafe fn k4_mins(mins: [u8; 8], bsums: &[i16; QK_K / 16]) -> i32 {
    let p = bsums.as_ptr();
    let pairs = vpaddq_s16(vld1q_s16(p), vld1q_s16(p.add(8)));
    let m = vreinterpretq_s16_u16(vmovl_u8(vld1_u8(mins.as_ptr())));
    let s = vmull_s16(vget_low_s16(pairs), vget_low_s16(m));
    vaddvq_s32(vmlal_high_s16(s, pairs, m))
}

/// A Q4_K / Q5_K super-block, for one body over both (Q4_K has no fifth bits).
trait K4 {
    fn parts(&self) -> (f16, f16, &[u8; K_SCALE_SIZE], &[u8; QK_K / 2]);
    fn qh(&self) -> Option<&[u8; QK_K / 8]>;
}

impl K4 for BlockQ4K {
    #[inline(always)]
    fn parts(&self) -> (f16, f16, &[u8; K_SCALE_SIZE], &[u8; QK_K / 2]) {
        (self.d, self.dmin, &self.scales, &self.qs)
    }
    #[inline(always)]
    fn qh(&self) -> Option<&[u8; QK_K / 8]> {
        None
    }
}

impl K4 for BlockQ5K {
    #[inline(always)]
    fn parts(&self) -> (f16, f16, &[u8; K_SCALE_SIZE], &[u8; QK_K / 2]) {
        (self.d, self.dmin, &self.scales, &self.qs)
    }
    #[inline(always)]
    fn qh(&self) -> Option<&[u8; QK_K / 8]> {
        Some(&self.qh)
    }
}

/// Q4_K / Q5_K against Q8_K: Σ (d·dy)·Σ sc·Σq·qy - (dmin·dy)·Σ m·bsums.
#[inline(always)]
unsafe fn k4_n<D: Dot, B: K4, const N: usize>(d: D, x: &[B], ys: [&[BlockQ8K]; N]) -> [f32; N] {
    let m4 = vdupq_n_u8(0xF);
    let mut acc = [0f32; N];
    for (i, x) in x.iter().enumerate() {
        let (xd, xdmin, scales, qs) = x.parts();
        let qh = x.qh();
        let (sc, mins) = k4_unpack(scales);
        // Bit 2j of qh[l] is the fifth bit of value l of 64-value group j's low half, bit 2j + 1
        // of its high half; shifted down by 2 per group.
        let mut h = match qh {
            Some(qh) => [vld1q_u8(qh.as_ptr()), vld1q_u8(qh.as_ptr().add(16))],
            None => [vdupq_n_u8(0); 2],
        };
        let mut sumi = [vdupq_n_s32(0); N];
        for j in 0..QK_K / 64 {
            let p = qs.as_ptr().add(32 * j);
            let v = [vld1q_u8(p), vld1q_u8(p.add(16))];
            let lo = [0, 1].map(|k| {
                let hb = vshlq_n_u8::<4>(vandq_u8(h[k], vdupq_n_u8(1)));
                s8(vorrq_u8(vandq_u8(v[k], m4), hb))
            });
            let hi = [0, 1].map(|k| {
                let hb = vshlq_n_u8::<3>(vandq_u8(h[k], vdupq_n_u8(2)));
                s8(vorrq_u8(vshrq_n_u8::<4>(v[k]), hb))
            });
            h = h.map(|v| vshrq_n_u8::<2>(v));
            let (sl, sh) = (sc[2 * j] as i32, sc[2 * j + 1] as i32);
            for t in 0..N {
                let q8 = ys[t][i].qs.as_ptr().add(64 * j);
                let pl = dot32(d, lo, q8);
                let ph = dot32(d, hi, q8.add(32));
                sumi[t] = vmlaq_n_s32(vmlaq_n_s32(sumi[t], pl, sl), ph, sh);
            }
        }
        let (dx, dmx) = (h2f(xd), h2f(xdmin));
        for t in 0..N {
            let y = &ys[t][i];
            let s = vaddvq_s32(sumi[t]);
            let m = k4_mins(mins, &y.bsums);
            acc[t] = (dx * y.d).mul_add(s as f32, acc[t]);
            acc[t] = (-(dmx * y.d)).mul_add(m as f32, acc[t]);
        }
    }
    acc
}

/// Q6_K against Q8_K: Σ (d·dy)·Σ scales·Σ(q - 32)·qy.
#[inline(always)]
unsafe fn q6_k_n<D: Dot, const N: usize>(d: D, x: &[BlockQ6K], ys: [&[BlockQ8K]; N]) -> [f32; N] {
    let m4 = vdupq_n_u8(0xF);
    let m2 = vdupq_n_u8(3);
    let m32 = vdupq_n_s8(32);
    let mut acc = [0f32; N];
    for (i, x) in x.iter().enumerate() {
        let mut sumi = [vdupq_n_s32(0); N];
        for j in 0..2 {
            let ld = |p: *const u8| [vld1q_u8(p), vld1q_u8(p.add(16))];
            let b1 = ld(x.ql.as_ptr().add(64 * j));
            let b2 = ld(x.ql.as_ptr().add(64 * j + 32));
            let bh = ld(x.qh.as_ptr().add(32 * j));
            for k in 0..2 {
                // The four quarters of this 128 (values 32·quarter + 16·k ..+16), q - 32.
                let hb = bh[k];
                let q = [
                    vorrq_u8(vandq_u8(b1[k], m4), vshlq_n_u8::<4>(vandq_u8(hb, m2))),
                    vorrq_u8(
                        vandq_u8(b2[k], m4),
                        vshlq_n_u8::<4>(vandq_u8(vshrq_n_u8::<2>(hb), m2)),
                    ),
                    vorrq_u8(
                        vshrq_n_u8::<4>(b1[k]),
                        vshlq_n_u8::<4>(vandq_u8(vshrq_n_u8::<4>(hb), m2)),
                    ),
                    vorrq_u8(vshrq_n_u8::<4>(b2[k]), vshlq_n_u8::<4>(vshrq_n_u8::<6>(hb))),
                ]
                .map(|v| vsubq_s8(s8(v), m32));
                for (quarter, &qv) in q.iter().enumerate() {
                    // 16 values, one scale.
                    let o = 128 * j + 32 * quarter + 16 * k;
                    let sc = x.scales[8 * j + 2 * quarter + k] as i32;
                    for t in 0..N {
                        let q8 = vld1q_s8(ys[t][i].qs.as_ptr().add(o));
                        let p = d.dot(vdupq_n_s32(0), qv, q8);
                        sumi[t] = vmlaq_n_s32(sumi[t], p, sc);
                    }
                }
            }
        }
        let dx = h2f(x.d);
        for t in 0..N {
            let s = vaddvq_s32(sumi[t]);
            acc[t] = (dx * ys[t][i].d).mul_add(s as f32, acc[t]);
        }
    }
    acc
}

/// The per-format functions and the four entry points of one body (`$D`), every function
/// compiled with `$feat` so the inlined bodies see the body's instructions.
macro_rules! body {
    ($m:ident, $feat:literal, $D:expr) => {
        mod $m {
            use super::*;

            #[target_feature(enable = $feat)]
            unsafe fn q8_0<const N: usize>(x: &[BlockQ8_0], ys: [&[BlockQ8_0]; N]) -> [f32; N] {
                legacy0_n($D, x, ys)
            }
            #[target_feature(enable = $feat)]
            unsafe fn q4_0<const N: usize>(x: &[BlockQ4_0], ys: [&[BlockQ8_0]; N]) -> [f32; N] {
                legacy0_n($D, x, ys)
            }
            #[target_feature(enable = $feat)]
            unsafe fn q5_0<const N: usize>(x: &[BlockQ5_0], ys: [&[BlockQ8_0]; N]) -> [f32; N] {
                legacy0_n($D, x, ys)
            }
            #[target_feature(enable = $feat)]
            unsafe fn q4_1<const N: usize>(x: &[BlockQ4_1], ys: [&[BlockQ8_1]; N]) -> [f32; N] {
                legacy1_n($D, x, ys)
            }
            #[target_feature(enable = $feat)]
            unsafe fn q5_1<const N: usize>(x: &[BlockQ5_1], ys: [&[BlockQ8_1]; N]) -> [f32; N] {
                legacy1_n($D, x, ys)
            }
            #[target_feature(enable = $feat)]
            unsafe fn q4_k<const N: usize>(x: &[BlockQ4K], ys: [&[BlockQ8K]; N]) -> [f32; N] {
                k4_n($D, x, ys)
            }
            #[target_feature(enable = $feat)]
            unsafe fn q5_k<const N: usize>(x: &[BlockQ5K], ys: [&[BlockQ8K]; N]) -> [f32; N] {
                k4_n($D, x, ys)
            }
            #[target_feature(enable = $feat)]
            unsafe fn q6_k<const N: usize>(x: &[BlockQ6K], ys: [&[BlockQ8K]; N]) -> [f32; N] {
                q6_k_n($D, x, ys)
            }

            #[target_feature(enable = $feat)]
            pub(super) unsafe fn vec_dot(w: Weights<'_>, a: Acts<'_>) -> f32 {
                assert_eq!(w.len(), a.len(), "vec_dot: length mismatch");
                match (w, a) {
                    (Weights::Q8_0(w), Acts::Q8_0(a)) => q8_0(w, [a])[0],
                    (Weights::Q4_0(w), Acts::Q8_0(a)) => q4_0(w, [a])[0],
                    (Weights::Q5_0(w), Acts::Q8_0(a)) => q5_0(w, [a])[0],
                    (Weights::Q4_1(w), Acts::Q8_1(a)) => q4_1(w, [a])[0],
                    (Weights::Q5_1(w), Acts::Q8_1(a)) => q5_1(w, [a])[0],
                    (Weights::Q4K(w), Acts::Q8K(a)) => q4_k(w, [a])[0],
                    (Weights::Q5K(w), Acts::Q8K(a)) => q5_k(w, [a])[0],
                    (Weights::Q6K(w), Acts::Q8K(a)) => q6_k(w, [a])[0],
                    _ => panic!(
                        "vec_dot: {} weights with {:?} activations",
                        w.format().name(),
                        a.format()
                    ),
                }
            }

            #[target_feature(enable = $feat)]
            pub(super) unsafe fn vec_dot4(w: Weights<'_>, a: [Acts<'_>; 4]) -> [f32; 4] {
                for a in &a {
                    assert_eq!(w.len(), a.len(), "vec_dot4: length mismatch");
                }
                use Acts as A;
                match (w, a) {
                    (Weights::Q8_0(w), [A::Q8_0(a), A::Q8_0(b), A::Q8_0(c), A::Q8_0(d)]) => {
                        q8_0(w, [a, b, c, d])
                    }
                    (Weights::Q4_0(w), [A::Q8_0(a), A::Q8_0(b), A::Q8_0(c), A::Q8_0(d)]) => {
                        q4_0(w, [a, b, c, d])
                    }
                    (Weights::Q5_0(w), [A::Q8_0(a), A::Q8_0(b), A::Q8_0(c), A::Q8_0(d)]) => {
                        q5_0(w, [a, b, c, d])
                    }
                    (Weights::Q4_1(w), [A::Q8_1(a), A::Q8_1(b), A::Q8_1(c), A::Q8_1(d)]) => {
                        q4_1(w, [a, b, c, d])
                    }
                    (Weights::Q5_1(w), [A::Q8_1(a), A::Q8_1(b), A::Q8_1(c), A::Q8_1(d)]) => {
                        q5_1(w, [a, b, c, d])
                    }
                    (Weights::Q4K(w), [A::Q8K(a), A::Q8K(b), A::Q8K(c), A::Q8K(d)]) => {
                        q4_k(w, [a, b, c, d])
                    }
                    (Weights::Q5K(w), [A::Q8K(a), A::Q8K(b), A::Q8K(c), A::Q8K(d)]) => {
                        q5_k(w, [a, b, c, d])
                    }
                    (Weights::Q6K(w), [A::Q8K(a), A::Q8K(b), A::Q8K(c), A::Q8K(d)]) => {
                        q6_k(w, [a, b, c, d])
                    }
                    // Mismatched formats: `vec_dot` names them in its panic.
                    _ => a.map(|a| vec_dot(w, a)),
                }
            }

            #[target_feature(enable = $feat)]
            pub(super) unsafe fn matvec_rows(w: Weights<'_>, a: Acts<'_>, y: &mut [f32]) {
                assert_eq!(w.len(), a.len() * y.len(), "matvec_rows: shapes");
                macro_rules! go {
                    ($w:expr, $a:expr, $dot:ident) => {{
                        let bpr = $a.len();
                        if bpr > 0 {
                            for (y, w) in y.iter_mut().zip($w.chunks_exact(bpr)) {
                                *y = $dot(w, [$a])[0];
                            }
                        } else {
                            y.fill(0.0);
                        }
                    }};
                }
                match (w, a) {
                    (Weights::Q8_0(w), Acts::Q8_0(a)) => go!(w, a, q8_0),
                    (Weights::Q4_0(w), Acts::Q8_0(a)) => go!(w, a, q4_0),
                    (Weights::Q5_0(w), Acts::Q8_0(a)) => go!(w, a, q5_0),
                    (Weights::Q4_1(w), Acts::Q8_1(a)) => go!(w, a, q4_1),
                    (Weights::Q5_1(w), Acts::Q8_1(a)) => go!(w, a, q5_1),
                    (Weights::Q4K(w), Acts::Q8K(a)) => go!(w, a, q4_k),
                    (Weights::Q5K(w), Acts::Q8K(a)) => go!(w, a, q5_k),
                    (Weights::Q6K(w), Acts::Q8K(a)) => go!(w, a, q6_k),
                    _ => panic!(
                        "matvec_rows: {} weights with {:?} activations",
                        w.format().name(),
                        a.format()
                    ),
                }
            }

            #[target_feature(enable = $feat)]
            pub(super) unsafe fn matmul_tile(
                w: Weights<'_>,
                a: Acts<'_>,
                n: usize,
                out: &mut [f32],
            ) {
                assert!(
                    n > 0 && a.len().is_multiple_of(n),
                    "matmul_tile: acts are not n rows"
                );
                let k = a.len() / n;
                assert!(
                    k > 0 && w.len().is_multiple_of(k) && out.len() == n * (w.len() / k),
                    "matmul_tile: shapes"
                );
                macro_rules! go {
                    ($w:expr, $a:expr, $dot:ident) => {{
                        let bpr = $a.len() / n;
                        tile_loop(
                            $w,
                            bpr,
                            n,
                            out,
                            |t| &$a[t * bpr..(t + 1) * bpr],
                            // SAFETY: this body's target features (the caller checked them).
                            |x, y| unsafe { $dot(x, [y])[0] },
                            |x, ys| unsafe { $dot(x, ys) },
                            |x, ys: [_; 4]| unsafe { $dot(x, ys) },
                        )
                    }};
                }
                match (w, a) {
                    (Weights::Q8_0(w), Acts::Q8_0(a)) => go!(w, a, q8_0),
                    (Weights::Q4_0(w), Acts::Q8_0(a)) => go!(w, a, q4_0),
                    (Weights::Q5_0(w), Acts::Q8_0(a)) => go!(w, a, q5_0),
                    (Weights::Q4_1(w), Acts::Q8_1(a)) => go!(w, a, q4_1),
                    (Weights::Q5_1(w), Acts::Q8_1(a)) => go!(w, a, q5_1),
                    (Weights::Q4K(w), Acts::Q8K(a)) => go!(w, a, q4_k),
                    (Weights::Q5K(w), Acts::Q8K(a)) => go!(w, a, q5_k),
                    (Weights::Q6K(w), Acts::Q8K(a)) => go!(w, a, q6_k),
                    _ => panic!(
                        "matmul_tile: {} weights with {:?} activations",
                        w.format().name(),
                        a.format()
                    ),
                }
            }
        }
    };
}

body!(sdot, "neon,dotprod", Sdot);
body!(mull, "neon", Mull);

/// The tier's dot product (same contract as [`super::scalar::vec_dot`]).
///
/// # Safety
/// The CPU must have NEON (every AArch64 CPU Rust targets does).
#[target_feature(enable = "neon")]
pub(crate) unsafe fn vec_dot(w: Weights<'_>, a: Acts<'_>) -> f32 {
    if has_dotprod() {
        // SAFETY: the CPU has dotprod (just checked).
        unsafe { sdot::vec_dot(w, a) }
    } else {
        mull::vec_dot(w, a)
    }
}

/// One weight row against four tokens' activations (the prefill matmul's inner step): exactly
/// the sums of four [`vec_dot`]s (the same bodies, the same order).
///
/// # Safety
/// The CPU must have NEON.
#[target_feature(enable = "neon")]
pub(crate) unsafe fn vec_dot4(w: Weights<'_>, a: [Acts<'_>; 4]) -> [f32; 4] {
    if has_dotprod() {
        // SAFETY: the CPU has dotprod (just checked).
        unsafe { sdot::vec_dot4(w, a) }
    } else {
        mull::vec_dot4(w, a)
    }
}

/// `y[r]` = row `r` of `w` (rows of `a.len()` values) dotted with `a`: decode's matvec rows,
/// the format and the body chosen once for all of them.
///
/// # Safety
/// The CPU must have NEON.
#[target_feature(enable = "neon")]
pub(crate) unsafe fn matvec_rows(w: Weights<'_>, a: Acts<'_>, y: &mut [f32]) {
    if has_dotprod() {
        // SAFETY: the CPU has dotprod (just checked).
        unsafe { sdot::matvec_rows(w, a, y) }
    } else {
        mull::matvec_rows(w, a, y)
    }
}

/// `out` (n, rows) = `a` (n tokens) × the rows of `w`: the prefill matmul's tile, four tokens
/// at a time (each weight block unpacked once for the four), the last n mod 4 one at a time;
/// every token's outputs equal [`matvec_rows`]' bit for bit.
///
/// # Safety
/// The CPU must have NEON.
#[target_feature(enable = "neon")]
pub(crate) unsafe fn matmul_tile(w: Weights<'_>, a: Acts<'_>, n: usize, out: &mut [f32]) {
    if has_dotprod() {
        // SAFETY: the CPU has dotprod (just checked).
        unsafe { sdot::matmul_tile(w, a, n, out) }
    } else {
        mull::matmul_tile(w, a, n, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// xorshift64: random bits for blocks.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn bytes<const N: usize>(&mut self) -> [u8; N] {
            std::array::from_fn(|_| self.next() as u8)
        }
        /// A finite scale of either sign, of the size real files hold.
        fn scale(&mut self) -> f16 {
            let v = (1 + self.next() % 1000) as f32 * 1e-5;
            f16::from_f32(if self.next() & 1 == 1 { -v } else { v })
        }
        fn f32s(&mut self, n: usize) -> Vec<f32> {
            (0..n)
                .map(|_| (self.next() % 20001) as f32 / 1e4 - 1.0)
                .collect()
        }
    }

    /// The two bodies give the same bits through all four entry points, every format (the
    /// tier tests check the body this CPU runs against the oracle; this checks the other).
    #[test]
    fn plain_body_equals_dotprod_body_bit_for_bit() {
        if !has_dotprod() {
            eprintln!("no dotprod on this CPU: only the plain body runs here");
            return;
        }
        let mut r = Rng(0x9e37_79b9_7f4a_7c15);
        let nb = 5 * 3;
        macro_rules! blocks {
            ($v:ident, $b:expr) => {{
                let v: Vec<_> = (0..nb).map(|_| $b).collect();
                check(&mut r, Weights::$v(&v));
            }};
        }
        blocks!(
            Q8_0,
            BlockQ8_0 {
                d: r.scale(),
                qs: r.bytes().map(|b| b as i8)
            }
        );
        blocks!(
            Q4_0,
            BlockQ4_0 {
                d: r.scale(),
                qs: r.bytes()
            }
        );
        blocks!(
            Q5_0,
            BlockQ5_0 {
                d: r.scale(),
                qh: r.bytes(),
                qs: r.bytes()
            }
        );
        blocks!(
            Q4_1,
            BlockQ4_1 {
                d: r.scale(),
                m: r.scale(),
                qs: r.bytes()
            }
        );
        blocks!(
            Q5_1,
            BlockQ5_1 {
                d: r.scale(),
                m: r.scale(),
                qh: r.bytes(),
                qs: r.bytes()
            }
        );
        blocks!(
            Q4K,
            BlockQ4K {
                d: r.scale(),
                dmin: r.scale(),
                scales: r.bytes(),
                qs: r.bytes()
            }
        );
        blocks!(
            Q5K,
            BlockQ5K {
                d: r.scale(),
                dmin: r.scale(),
                scales: r.bytes(),
                qh: r.bytes(),
                qs: r.bytes()
            }
        );
        blocks!(
            Q6K,
            BlockQ6K {
                ql: r.bytes(),
                qh: r.bytes(),
                scales: r.bytes().map(|b| b as i8),
                d: r.scale()
            }
        );
    }

    /// `w` as 5 rows of 3 blocks, against 6 tokens.
    fn check(r: &mut Rng, w: Weights<'_>) {
        let (rows, n, f) = (5, 6, w.format());
        let cols = w.len() / rows;
        let x = r.f32s(n * cols);
        let mut buf = ActBuf::new();
        let a = buf.quantize(f.act_format().unwrap(), &x);
        let tok = |t: usize| a.slice(t * cols, (t + 1) * cols);
        let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        let (row, name) = (w.row(1, cols), f.name());
        // SAFETY: the caller checked the CPU has dotprod, and NEON is in every AArch64 CPU.
        unsafe {
            assert_eq!(
                sdot::vec_dot(row, tok(2)).to_bits(),
                mull::vec_dot(row, tok(2)).to_bits(),
                "{name} vec_dot"
            );
            let a4 = [tok(0), tok(1), tok(2), tok(3)];
            let (s4, m4) = (sdot::vec_dot4(row, a4), mull::vec_dot4(row, a4));
            assert_eq!(bits(&s4), bits(&m4), "{name} vec_dot4");
            let (mut ys, mut ym) = (vec![0f32; rows], vec![0f32; rows]);
            sdot::matvec_rows(w, tok(5), &mut ys);
            mull::matvec_rows(w, tok(5), &mut ym);
            assert_eq!(bits(&ys), bits(&ym), "{name} matvec_rows");
            let (mut ts, mut tm) = (vec![0f32; n * rows], vec![0f32; n * rows]);
            sdot::matmul_tile(w, a, n, &mut ts);
            mull::matmul_tile(w, a, n, &mut tm);
            assert_eq!(bits(&ts), bits(&tm), "{name} matmul_tile");
        }
    }
}
