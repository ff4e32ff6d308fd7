//! The legacy 32-value formats (Q8_0, Q4_0, Q5_0 against Q8_0 activations; Q4_1, Q5_1 against
//! Q8_1) on AVX2, four blocks per step.
//!
//! Per block only integer work remains: unpack, `vpmaddubsw`, `vpmaddwd`. Four blocks' eight
//! i32 partial sums are then folded into one vector (two unpack + add steps give [P0..P3] in
//! each 128-bit lane), converted once and scaled by the four blocks' dx·dy in one FMA. ggml's
//! one convert, broadcast and FMA per block (and two f16 converts) made decode compute-bound:
//! 7.7 cycles per Q4_0 block on Zen 3 even from L3.
//!
//! What depends only on the activations (dy as f32, k·Σy, Q8_1's s) is made once per call in
//! [`Group`]s, not once per weight row. Weights stored as q + k (Q4_0: k = 8, Q5_0: 16) are
//! multiplied as unsigned q and corrected by k·Σy, which saves the sign trick (`vpsubb` and two
//! `vpsignb`) per block; Q8_0's signed values keep it.
//!
//! A token's sum runs in the same order alone (N = 1) or beside three others (N = 4), so a
//! batched token equals its lone decode bit for bit.
//!
//! The bodies are compiled twice ([`Mul`]): with `vpmaddubsw` + `vpmaddwd` for AVX2, and with
//! AVX-512 VNNI's `vpdpbusd` (the same four-product i32 sums in one instruction, on 256-bit
//! vectors) for the AVX-512 tier where the CPU has it. The integer sums are identical (no pair
//! saturates, see `avx2.rs`), so both give the same bits.

use super::{bits, hsum, hsum4, load, nibbles};
use crate::quant::*;
use core::arch::x86_64::*;
use half::f16;
use std::cell::RefCell;

/// How 32 unsigned bytes times 32 signed bytes become eight i32 sums of four products each.
pub(super) trait Mul {
    /// No product pair saturates, whatever the bytes: signed weights (Q8_0) can then be taken
    /// as q + 128, unsigned, and corrected by 128·Σy like Q4_0's q + 8, instead of moving
    /// their sign onto the activations (two `vpsignb` per block and token).
    const WIDE: bool;
    unsafe fn us8(a: __m256i, b: __m256i) -> __m256i;
    /// Prefill's tile over the first rows of `w` in 512-bit panels where the tier has them
    /// (`panel512.rs`): returns the rows done, and `panel.rs` takes the rest.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn wide_tile<B: Legacy>(
        _w: &[B],
        _bpr: usize,
        _g: &[Group],
        _n: usize,
        _ng: usize,
        _out: &mut [f32],
        _panels: &mut Vec<super::panel512::Panel>,
    ) -> usize {
        0
    }
    /// `acc` plus [`Mul::us8`].
    #[inline(always)]
    unsafe fn us8_add(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
        _mm256_add_epi32(acc, Self::us8(a, b))
    }
}

/// AVX2: `vpmaddubsw` (pairs to i16) then `vpmaddwd` with ones (pairs of pairs to i32).
pub(super) struct Avx2;
impl Mul for Avx2 {
    const WIDE: bool = false;
    #[inline(always)]
    unsafe fn us8(a: __m256i, b: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1))
    }
}

/// AVX-512 VNNI (with VL): one `vpdpbusd`, which never saturates.
pub(super) struct Vnni;
impl Mul for Vnni {
    const WIDE: bool = true;
    #[inline(always)]
    unsafe fn us8(a: __m256i, b: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(_mm256_setzero_si256(), a, b)
    }
    #[inline(always)]
    unsafe fn us8_add(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(acc, a, b)
    }
    #[inline(always)]
    unsafe fn wide_tile<B: Legacy>(
        w: &[B],
        bpr: usize,
        g: &[Group],
        n: usize,
        ng: usize,
        out: &mut [f32],
        panels: &mut Vec<super::panel512::Panel>,
    ) -> usize {
        super::panel512::tile(w, bpr, g, n, ng, out, panels)
    }
}

/// An activation block: 32 signed values and their scale(s).
pub(super) trait Act: Copy {
    fn qs(&self) -> &[i8; QK];
    fn d(&self) -> f16;
    /// Q8_1's s = d·Σq (Q8_0 has none: zero).
    fn s(&self) -> f16;
}

impl Act for BlockQ8_0 {
    fn qs(&self) -> &[i8; QK] {
        &self.qs
    }
    fn d(&self) -> f16 {
        self.d
    }
    fn s(&self) -> f16 {
        f16::ZERO
    }
}

impl Act for BlockQ8_1 {
    fn qs(&self) -> &[i8; QK] {
        &self.qs
    }
    fn d(&self) -> f16 {
        self.d
    }
    fn s(&self) -> f16 {
        self.s
    }
}

/// A legacy weight block as the loop multiplies it. Every one begins with `d` (f16), and the
/// MIN formats with `m` right after it (asserted below).
pub(super) trait Legacy: Copy {
    /// The activations it multiplies.
    type A: Act;
    /// The values are stored as q + OFFSET (Q4_0: 8, Q5_0: 16); 0: taken as they are.
    const OFFSET: i32;
    /// Values are signed bytes (Q8_0): their sign moves onto the activations for `vpmaddubsw`.
    const SIGNED: bool;
    /// d·q + m (Q4_1, Q5_1): the block's m times the activations' s is added.
    const MIN: bool;
    /// The 32 values as bytes: unsigned (stored values, q + OFFSET), or signed if SIGNED.
    unsafe fn values(&self) -> __m256i;
}

impl Legacy for BlockQ8_0 {
    type A = BlockQ8_0;
    const OFFSET: i32 = 0;
    const SIGNED: bool = true;
    const MIN: bool = false;
    #[inline(always)]
    unsafe fn values(&self) -> __m256i {
        load(self.qs.as_ptr() as _)
    }
}

impl Legacy for BlockQ4_0 {
    type A = BlockQ8_0;
    const OFFSET: i32 = 8;
    const SIGNED: bool = false;
    const MIN: bool = false;
    #[inline(always)]
    unsafe fn values(&self) -> __m256i {
        nibbles(&self.qs)
    }
}

impl Legacy for BlockQ5_0 {
    type A = BlockQ8_0;
    const OFFSET: i32 = 16;
    const SIGNED: bool = false;
    const MIN: bool = false;
    #[inline(always)]
    unsafe fn values(&self) -> __m256i {
        five_bits(&self.qs, self.qh)
    }
}

impl Legacy for BlockQ4_1 {
    type A = BlockQ8_1;
    const OFFSET: i32 = 0;
    const SIGNED: bool = false;
    const MIN: bool = true;
    #[inline(always)]
    unsafe fn values(&self) -> __m256i {
        nibbles(&self.qs)
    }
}

impl Legacy for BlockQ5_1 {
    type A = BlockQ8_1;
    const OFFSET: i32 = 0;
    const SIGNED: bool = false;
    const MIN: bool = true;
    #[inline(always)]
    unsafe fn values(&self) -> __m256i {
        five_bits(&self.qs, self.qh)
    }
}

/// What the loop adds to a format's values to multiply them as unsigned bytes: the stored
/// offset, or 128 for signed values when `M` is [`Mul::WIDE`] (|(q + 128)·y| ≤ 255·127, four
/// to an i32 lane); its OFFSET·Σy is taken off per block.
pub(super) const fn offset<M: Mul, B: Legacy>() -> i32 {
    if B::SIGNED && M::WIDE {
        128
    } else {
        B::OFFSET
    }
}

const _: () = assert!(core::mem::offset_of!(BlockQ8_0, d) == 0);
const _: () = assert!(core::mem::offset_of!(BlockQ4_0, d) == 0);
const _: () = assert!(core::mem::offset_of!(BlockQ5_0, d) == 0);
const _: () = assert!(core::mem::offset_of!(BlockQ4_1, m) == 2);
const _: () = assert!(core::mem::offset_of!(BlockQ5_1, m) == 2);

/// A Q5 block's 32 values q (0..=31): the nibbles, with bit j of `qh` as bit 4 of value j.
#[inline(always)]
unsafe fn five_bits(qs: &[u8; QK / 2], qh: [u8; 4]) -> __m256i {
    let hi = _mm256_and_si256(bits(qh), _mm256_set1_epi8(0x10));
    _mm256_or_si256(nibbles(qs), hi)
}

/// One token's activations for four consecutive blocks, prepared once per call. 64-byte
/// aligned (its size is 192), so that `legacy512.rs` loads two blocks' values from one line.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub(super) struct Group {
    /// dy of the four blocks, twice (the layout of the folded sums).
    pub(super) dy: [f32; 8],
    /// OFFSET·Σq of each block (values multiplied as q + OFFSET, see [`offset`]).
    pub(super) corr: [i32; 4],
    /// Q8_1's s of each block.
    pub(super) s: [f32; 4],
    /// Each block's 32 values, copied here (zeros past the row's end): one aligned load per
    /// block at a fixed offset, where pointers into the 34-byte blocks cost a load more.
    pub(super) qs: [[i8; QK]; 4],
}

const EMPTY: Group = Group {
    dy: [0.0; 8],
    corr: [0; 4],
    s: [0.0; 4],
    qs: [[0; QK]; 4],
};

thread_local! {
    /// Prepared activations; grows to the largest call seen.
    static GROUPS: RefCell<Vec<Group>> = const { RefCell::new(Vec::new()) };
}

/// `y` (one token's row of blocks) as groups of four in `out` (`y.len().div_ceil(4)` of
/// them); blocks past the end have zero scales and values.
pub(super) fn prepare<A: Act>(y: &[A], offset: i32, out: &mut [Group]) {
    debug_assert_eq!(out.len(), y.len().div_ceil(4));
    for (out, y) in out.iter_mut().zip(y.chunks(4)) {
        let mut g = EMPTY;
        for (j, b) in y.iter().enumerate() {
            let d = b.d().to_f32();
            g.dy[j] = d;
            g.dy[4 + j] = d;
            if offset != 0 {
                g.corr[j] = offset * b.qs().iter().map(|&q| q as i32).sum::<i32>();
            }
            g.s[j] = b.s().to_f32();
            g.qs[j] = *b.qs();
        }
        *out = g;
    }
}

/// The first four bytes of a block: d, and m for the MIN formats (asserted above; every block
/// is at least 18 bytes).
#[inline(always)]
pub(super) unsafe fn head<B: Legacy>(b: &B) -> u64 {
    // SAFETY: the four bytes lie inside `*b` (see above); unaligned read, any bits are valid.
    (b as *const B as *const u32).read_unaligned() as u64
}

/// Four blocks' d as f32 twice over ([d0..d3 | d0..d3], the folded sums' layout), and their m
/// (MIN formats; zero otherwise), from their [`head`]s.
#[inline(always)]
pub(super) unsafe fn scales<B: Legacy>(h: [u64; 4]) -> (__m256, __m128) {
    if B::MIN {
        // [d0 m0 d1 m1 d2 m2 d3 m3]
        let f = _mm256_cvtph_ps(_mm_set_epi64x(
            (h[2] | h[3] << 32) as i64,
            (h[0] | h[1] << 32) as i64,
        ));
        let d = _mm256_permutevar8x32_ps(f, _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6));
        let m = _mm256_permutevar8x32_ps(f, _mm256_setr_epi32(1, 3, 5, 7, 1, 3, 5, 7));
        (d, _mm256_castps256_ps128(m))
    } else {
        let m16 = 0xffff;
        let h = (h[0] & m16) | (h[1] & m16) << 16 | (h[2] & m16) << 32 | (h[3] & m16) << 48;
        let d = _mm_cvtph_ps(_mm_cvtsi64_si128(h as i64));
        (_mm256_set_m128(d, d), _mm_setzero_ps())
    }
}

/// A group's values and scales: `K` blocks (four, or the 1..=3 at a row's end), with zero
/// values and scales in place of the missing ones (they add nothing).
///
/// The four d put together here cost about a fifth of a Q4_0 row on one Zen 3 core (from L3
/// 16-17 GB/s, 20-21 with constant scales and wrong results), but no other way to get them
/// was cheaper: one `vpgatherdd` for two groups (13.5), `vpinsrw` from memory (the same),
/// halves stored per row and converted before the row (the same; converted a row later,
/// slower).
#[inline(always)]
unsafe fn unpack<B: Legacy, const K: usize>(x: &[B; K]) -> ([__m256i; 4], __m256, __m128) {
    let mut q = [_mm256_setzero_si256(); 4];
    let mut h = [0u64; 4];
    for j in 0..K {
        q[j] = x[j].values();
        h[j] = head(&x[j]);
    }
    let (d, m) = scales::<B>(h);
    (q, d, m)
}

/// Four blocks' eight i32 partial sums each → [P0, P1, P2, P3] in each 128-bit lane (the low
/// lane sums each block's values 0..16, the high lane 16..32).
#[inline(always)]
unsafe fn fold4(p: [__m256i; 4]) -> __m256i {
    // [p0₀+p0₂, p1₀+p1₂, p0₁+p0₃, p1₁+p1₃] per lane, then the same for p2, p3.
    let a = _mm256_add_epi32(
        _mm256_unpacklo_epi32(p[0], p[1]),
        _mm256_unpackhi_epi32(p[0], p[1]),
    );
    let b = _mm256_add_epi32(
        _mm256_unpacklo_epi32(p[2], p[3]),
        _mm256_unpackhi_epi32(p[2], p[3]),
    );
    _mm256_add_epi32(_mm256_unpacklo_epi64(a, b), _mm256_unpackhi_epi64(a, b))
}

/// Blocks 4g..4g+K of one weight row (`x`: 4 blocks, or the 1..=3 at the row's end) against
/// `N` tokens' groups `g`. A short group's missing blocks are zero vectors without loads or
/// multiplies, so its sums are the same bits as a full step over zero blocks (what the panels
/// compute) at the cost of K blocks: SmolLM2's 576-column rows end in a group of two.
#[inline(always)]
pub(super) unsafe fn step<M: Mul, B: Legacy, const N: usize, const K: usize>(
    x: &[B; K],
    ys: [&[Group]; N],
    g: usize,
    acc: &mut [__m256; N],
    accm: &mut [__m128; N],
) {
    let (q, d, m) = unpack(x);
    // Signed values: their sign moves onto the activations, or (WIDE) they become q + 128.
    let sign_trick = B::SIGNED && !M::WIDE;
    // (No closures here: one defined in this function would not get the caller's target
    // features, and its intrinsics would not inline.)
    let mut u = q;
    for j in 0..K {
        if sign_trick {
            u[j] = _mm256_sign_epi8(q[j], q[j]);
        } else if B::SIGNED {
            u[j] = _mm256_xor_si256(q[j], _mm256_set1_epi8(-128));
        }
    }
    for t in 0..N {
        let gr = &ys[t][g];
        let mut p = [_mm256_setzero_si256(); 4];
        for j in 0..K {
            let y = _mm256_load_si256(gr.qs[j].as_ptr() as *const __m256i);
            let y = if sign_trick {
                _mm256_sign_epi8(y, q[j])
            } else {
                y
            };
            p[j] = M::us8(u[j], y);
        }
        let mut s = fold4(p);
        if offset::<M, B>() != 0 {
            let c = _mm_load_si128(gr.corr.as_ptr() as *const __m128i);
            s = _mm256_sub_epi32(s, _mm256_zextsi128_si256(c));
        }
        let sc = _mm256_mul_ps(d, _mm256_load_ps(gr.dy.as_ptr()));
        acc[t] = _mm256_fmadd_ps(sc, _mm256_cvtepi32_ps(s), acc[t]);
        if B::MIN {
            accm[t] = _mm_fmadd_ps(m, _mm_load_ps(gr.s.as_ptr()), accm[t]);
        }
    }
}

/// One weight row `x` against `N` tokens' prepared activations: four blocks per step, then
/// the last `x.len() % 4`.
#[inline(always)]
unsafe fn dot_n<M: Mul, B: Legacy, const N: usize>(x: &[B], ys: [&[Group]; N]) -> [f32; N] {
    let mut acc = [_mm256_setzero_ps(); N];
    let mut accm = [_mm_setzero_ps(); N];
    let (full, rest) = x.as_chunks::<4>();
    for (g, x4) in full.iter().enumerate() {
        if N == 1 {
            // Decode: keep the memory busy ahead of the arithmetic (see `PREFETCH_BYTES`).
            super::prefetch_ahead(x4);
        }
        step::<M, B, N, 4>(x4, ys, g, &mut acc, &mut accm);
    }
    // The 1..=3 blocks left, in place (the lengths match, so the conversions cannot fail).
    let g = full.len();
    match rest.len() {
        0 => {}
        1 => step::<M, B, N, 1>(rest.try_into().unwrap(), ys, g, &mut acc, &mut accm),
        2 => step::<M, B, N, 2>(rest.try_into().unwrap(), ys, g, &mut acc, &mut accm),
        _ => step::<M, B, N, 3>(rest.try_into().unwrap(), ys, g, &mut acc, &mut accm),
    }
    let mut out = [0.0; N];
    for t in 0..N {
        out[t] = if B::MIN {
            hsum(acc[t]) + hsum4(accm[t])
        } else {
            hsum(acc[t])
        };
    }
    out
}

/// `f` with this thread's group buffer holding `len` groups.
pub(super) fn with_groups<R>(len: usize, f: impl FnOnce(&mut [Group]) -> R) -> R {
    crate::with_scratch(&GROUPS, Vec::new, |g| {
        g.resize(len, EMPTY);
        f(&mut g[..len])
    })
}

/// Tokens from which prefill's tile transposes eight weight rows at a time into a panel
/// (`avx2/panel.rs`) rather than taking each row alone. By instruction count, packing a block
/// of eight rows costs about one token's row-at-a-time dot, so two tokens already gain; only
/// 64 tokens were measured (see `avx2.rs`).
const PANEL_MIN_TOKENS: usize = 2;

/// The entry points (`dot`, `dot4`, `rows`, `tile`) for one [`Mul`], compiled with its target
/// features so that the `#[inline(always)]` bodies above inline into them.
macro_rules! entry_points {
    ($name:ident, $M:ty, $feat:literal) => {
        pub(in crate::quant) mod $name {
            use super::*;

            /// `vec_dot` for a legacy format.
            ///
            /// # Safety
            /// The CPU must have the features named above.
            #[target_feature(enable = $feat)]
            pub(in crate::quant) unsafe fn dot<B: Legacy>(x: &[B], y: &[B::A]) -> f32 {
                with_groups(y.len().div_ceil(4), |g| {
                    prepare(y, offset::<$M, B>(), g);
                    // SAFETY: the caller's CPU check.
                    unsafe { dot_with::<B, 1>(x, [g])[0] }
                })
            }

            #[target_feature(enable = $feat)]
            unsafe fn dot_with<B: Legacy, const N: usize>(x: &[B], ys: [&[Group]; N]) -> [f32; N] {
                dot_n::<$M, B, N>(x, ys)
            }

            /// `vec_dot4` for a legacy format.
            ///
            /// # Safety
            /// The CPU must have the features named above.
            #[target_feature(enable = $feat)]
            pub(in crate::quant) unsafe fn dot4<B: Legacy>(x: &[B], ys: [&[B::A]; 4]) -> [f32; 4] {
                let ng = x.len().div_ceil(4);
                with_groups(4 * ng, |g| {
                    for (t, y) in ys.iter().enumerate() {
                        prepare(y, offset::<$M, B>(), &mut g[t * ng..(t + 1) * ng]);
                    }
                    let (a, b) = g.split_at(2 * ng);
                    let ((g0, g1), (g2, g3)) = (a.split_at(ng), b.split_at(ng));
                    // SAFETY: the caller's CPU check.
                    unsafe { dot_with::<B, 4>(x, [g0, g1, g2, g3]) }
                })
            }

            /// `matvec_rows` for a legacy format: `out[r]` = row r of `w` · `y`.
            ///
            /// # Safety
            /// The CPU must have the features named above.
            #[target_feature(enable = $feat)]
            pub(in crate::quant) unsafe fn rows<B: Legacy>(w: &[B], y: &[B::A], out: &mut [f32]) {
                let bpr = y.len();
                if bpr == 0 {
                    return out.fill(0.0);
                }
                with_groups(bpr.div_ceil(4), |g| {
                    prepare(y, offset::<$M, B>(), g);
                    // SAFETY: the caller's CPU check.
                    unsafe { rows_with::<B>(w, bpr, g, out) }
                })
            }

            #[target_feature(enable = $feat)]
            unsafe fn rows_with<B: Legacy>(w: &[B], bpr: usize, g: &[Group], out: &mut [f32]) {
                crate::quant::avx2::streams(w, bpr, |x| dot_n::<$M, B, 1>(x, [g])[0], out)
            }

            /// `matmul_tile` for a legacy format: `out` (n, rows) = the n token rows of `a` × the
            /// rows of `w`, with the activations prepared once for all the rows.
            ///
            /// # Safety
            /// The CPU must have the features named above.
            #[target_feature(enable = $feat)]
            pub(in crate::quant) unsafe fn tile<B: Legacy>(
                w: &[B],
                a: &[B::A],
                n: usize,
                out: &mut [f32],
            ) {
                let bpr = a.len() / n;
                let ng = bpr.div_ceil(4);
                with_groups(n * ng, |g| {
                    for t in 0..n {
                        prepare(
                            &a[t * bpr..(t + 1) * bpr],
                            offset::<$M, B>(),
                            &mut g[t * ng..(t + 1) * ng],
                        );
                    }
                    super::super::panel::with_panels(|panels| {
                        super::super::panel512::with_panels(|wide| {
                            // SAFETY: the caller's CPU check.
                            unsafe { tile_with::<B>(w, bpr, g, n, ng, out, panels, wide) }
                        })
                    })
                })
            }

            #[target_feature(enable = $feat)]
            #[allow(clippy::too_many_arguments)]
            unsafe fn tile_with<B: Legacy>(
                w: &[B],
                bpr: usize,
                g: &[Group],
                n: usize,
                ng: usize,
                out: &mut [f32],
                panels: &mut Vec<super::super::panel::Panel>,
                wide: &mut Vec<super::super::panel512::Panel>,
            ) {
                let one = |x: &[B], y: &[Group]| dot_n::<$M, B, 1>(x, [y])[0];
                if n >= PANEL_MIN_TOKENS {
                    let done = <$M>::wide_tile(w, bpr, g, n, ng, out, wide);
                    return super::super::panel::tile::<$M, B>(
                        w, bpr, g, n, ng, out, done, panels, one,
                    );
                }
                tile_loop(
                    w,
                    bpr,
                    n,
                    out,
                    |t| &g[t * ng..(t + 1) * ng],
                    one,
                    |x, ys| dot_n::<$M, B, 4>(x, ys),
                    |x, ys| dot_n::<$M, B, 4>(x, ys),
                )
            }
        }
    };
}
entry_points!(avx2, Avx2, "avx2,fma,f16c");
entry_points!(vnni, Vnni, "avx2,fma,f16c,avx512f,avx512vl,avx512vnni");
