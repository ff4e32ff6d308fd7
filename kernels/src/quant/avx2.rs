//! AVX2 integer dot products of weight blocks with quantized activations, the approach of
//! ggml's `arch/x86/quants.c`: unpack weights to bytes, `vpmaddubsw` (unsigned × signed bytes
//! → i16 pairs) then `vpmaddwd` (→ i32, with ones or the sub-block scales), f32 scales after.
//! The integer sums equal the oracle's exactly; only the f32 scale products and their
//! summation order differ (see `tests/quant.rs`).
//!
//! Which path runs where:
//! - decode (one token): [`matvec_rows`], each row a dot product; the rows of a thread's block
//!   are read as [`STREAMS`] interleaved sequential streams, prefetched [`PREFETCH_BYTES`]
//!   ahead (memory and arithmetic both bound it, and must overlap);
//! - prefill and decode batches: [`matmul_tile`], tiles of `TILE_ROWS` weight rows passed
//!   eight tokens at a time for the k-quants (each block unpacked once per group: more tokens
//!   amortize the unpacking, and the k-quant bodies keep only one token's sums live at a time,
//!   so eight cost no spills);
//! - the legacy formats (`avx2/legacy.rs`) fold four blocks' sums into one vector before the
//!   f32 work. From two tokens on, their tile instead transposes eight weight rows at a time
//!   into a panel (`avx2/panel.rs`): one `vpmaddubsw` then takes four values of eight rows,
//!   and nothing crosses lanes. Q4_0 prefill went from 88 to 115-125 GOP/s and Q4_1 from 80
//!   to 109 on one Zen 3 thread (64 tokens, alternating runs), with the same bits as decode.
//!   The k-quants do the same from four tokens on (`avx2/kpanel.rs`: four tokens share each
//!   weight load, and one `vpmaddwd` scales eight rows' 16 or 8 values): on one Zen 3 thread
//!   Q4_K prefill went from 96 to 134 GOP/s, Q5_K from 80 to 136 and Q6_K from 104 to 138
//!   (64 tokens), and TinyLlama Q4_K_M prefill from 62 to 96 tok/s on two. Below four tokens,
//!   and for the last rows % 8, the k-quants scale their sub-blocks in the integer
//!   `vpmaddwd`, reduce each super-block to one exact i32 total per token (eight tokens, or
//!   eight super-blocks of one token, in one transposing reduction) and then do scalar f32
//!   multiply-adds per token.
//!   Together (eight tokens, integer totals) these took Q4_K prefill from 82 to 101 GOP/s on
//!   one Zen 3 thread (64 tokens, six alternating runs each), where four tokens with eight f32
//!   lanes each spilled registers.
//!
//! Both run the integer path. No dequantize-to-float prefill path was built: `vpmaddubsw` +
//! `vpmaddwd` do 32 multiply-adds in two instructions where an f32 FMA does 8 in one, and on
//! Zen 3 the f32 tiles on bf16 weights of TinyLlama's shape prefilled 44-74 tok/s, the range
//! the integer path reaches on Q4_0 (56-57), before any dequantization cost. On AMX machines
//! a model's prompt rows instead go through bf16 tiles dequantized per 32-row slab
//! (`x86_64/amx.rs`): on Sapphire Rapids TinyLlama prefill ran 1.4-2x the VNNI integer path.
//! Kernels::matmul itself, and every generated token, stay on the integer path. A token gives the same bits alone or in a batch:
//! the single-token dots are the multi-token bodies with N = 1 (k-quants: the same scalar
//! operations per token, see [`k_epilogue`]).
//!
//! `vpmaddubsw` saturates at ±32767; no pair here comes near it: |w| ≤ 128 (Q8_0) or ≤ 63 with
//! |q8| ≤ 127 (activations never hold -128: every quantizer here maps to -127..=127), so a
//! pair is ≤ 2·128·127 = 32512. Used by the AVX-512 tier too (every AVX-512 CPU has AVX2),
//! which passes `VNNI = true` where the CPU has AVX-512 VNNI: the legacy formats' bodies then
//! use `vpdpbusd` (see `avx2/legacy.rs`; also checked against the oracle on an emulated CPU by
//! `.ci/avx512-emulated.sh`), and three bodies move to 512-bit vectors, each giving the bits of
//! the 256-bit one it replaces:
//! - legacy prefill: sixteen-row panels, two tokens per pass (`avx2/panel512.rs`);
//! - Q4_0 / Q4_1 decode: four blocks per step (`avx2/legacy512.rs`);
//! - Q4_K decode: a super-block in four vectors, `vpdpwssd` folding in the sub-block scales
//!   (`avx2/q4k512.rs`).
//! On Zen 5 (2 threads, alternating runs; the figures are in each module's docs) TinyLlama
//! Q4_0 prefill of 512 tokens went from 183-187 to 338-365 tok/s, and one thread's decode
//! gained 13% (Q4_0) and 5-8% (Q4_K).
//! A 512-bit Q6_K decode body was tried the same way and gained nothing measurable (not kept).
//! The k-quant prefill panels keep `vpmaddubsw` + `vpmaddwd`.

use super::*;
use crate::Weights;
use core::arch::x86_64::*;
use half::f16;

mod kpanel;
mod legacy;
mod legacy512;
mod panel;
mod panel512;
mod q4k512;

/// A legacy-format entry point (`dot`, `dot4`, `rows`, `tile`) of the VNNI bodies when `VNNI`,
/// else of the AVX2 ones.
macro_rules! legacy {
    ($vnni:expr, $f:ident($($arg:expr),*)) => {
        if $vnni {
            legacy::vnni::$f($($arg),*)
        } else {
            legacy::avx2::$f($($arg),*)
        }
    };
}

/// The tier's dot product (same contract as [`super::scalar::vec_dot`]).
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C, and AVX-512 F, VL and VNNI if `VNNI`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn vec_dot<const VNNI: bool>(w: Weights<'_>, a: Acts<'_>) -> f32 {
    assert_eq!(w.len(), a.len(), "vec_dot: length mismatch");
    match (w, a) {
        (Weights::Q8_0(w), Acts::Q8_0(a)) => legacy!(VNNI, dot(w, a)),
        (Weights::Q4_0(w), Acts::Q8_0(a)) => legacy!(VNNI, dot(w, a)),
        (Weights::Q5_0(w), Acts::Q8_0(a)) => legacy!(VNNI, dot(w, a)),
        (Weights::Q4_1(w), Acts::Q8_1(a)) => legacy!(VNNI, dot(w, a)),
        (Weights::Q5_1(w), Acts::Q8_1(a)) => legacy!(VNNI, dot(w, a)),
        (Weights::Q4K(w), Acts::Q8K(a)) => dot_k1(w, a),
        (Weights::Q5K(w), Acts::Q8K(a)) => dot_k1(w, a),
        (Weights::Q6K(w), Acts::Q8K(a)) => dot_k1(w, a),
        _ => panic!(
            "vec_dot: {} weights with {:?} activations",
            w.format().name(),
            a.format()
        ),
    }
}

#[inline(always)]
unsafe fn h2f(h: f16) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h.to_bits() as i32)))
}

#[inline(always)]
unsafe fn load(p: *const u8) -> __m256i {
    _mm256_loadu_si256(p as *const __m256i)
}

/// 32 nibbles → 32 bytes: the low nibbles of the 16 bytes, then their high nibbles.
#[inline(always)]
unsafe fn nibbles(p: &[u8; 16]) -> __m256i {
    // The 16 bytes in both lanes (a load), the high lane shifted right by 4: one shift where a
    // shift and an insert were.
    let t = _mm256_broadcastsi128_si256(_mm_loadu_si128(p.as_ptr() as *const __m128i));
    let b = _mm256_srlv_epi64(t, _mm256_set_epi64x(4, 4, 0, 0));
    _mm256_and_si256(b, _mm256_set1_epi8(0xF))
}

/// 32 bits → 32 bytes, 0xFF where bit j is set.
#[inline(always)]
unsafe fn bits(qh: [u8; 4]) -> __m256i {
    let x = _mm256_set1_epi32(i32::from_le_bytes(qh));
    let shuf = _mm256_set_epi64x(
        0x0303030303030303,
        0x0202020202020202,
        0x0101010101010101,
        0,
    );
    let b = _mm256_shuffle_epi8(x, shuf);
    let b = _mm256_or_si256(b, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
    _mm256_cmpeq_epi8(b, _mm256_set1_epi64x(-1))
}

#[inline(always)]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
    _mm_cvtss_f32(s)
}

// The single-token dots are the multi-token bodies with N = 1: each token's sum then runs in
// the same order whether it is computed alone (decode) or beside others (prefill, a batch of
// sequences), so a request's numbers do not depend on what else runs with it (issue 12).

/// The twelve packed scale bytes of a Q4_K / Q5_K super-block as sixteen bytes: the eight
/// 6-bit scales, then the eight 6-bit mins (ggml's `utmp` shuffle; the same values as
/// `scale_min_k4`).
#[inline(always)]
fn k4_unpack(s: &[u8; K_SCALE_SIZE]) -> [u32; 4] {
    const M1: u32 = 0x3f3f3f3f;
    const M2: u32 = 0x0f0f0f0f;
    const M3: u32 = 0x03030303;
    let w = |i: usize| u32::from_le_bytes([s[i], s[i + 1], s[i + 2], s[i + 3]]);
    let (u0, u1, u2) = (w(0), w(4), w(8));
    [
        u0 & M1,
        (u2 & M2) | (((u0 >> 6) & M3) << 4),
        u1 & M1,
        ((u2 >> 4) & M2) | (((u1 >> 6) & M3) << 4),
    ]
}

/// Scale `i` (0..8) of a super-block's scales (i16, in both 128-bit lanes) in every i16 lane.
#[inline(always)]
unsafe fn scale(sc: __m256i, i: usize) -> __m256i {
    _mm256_shuffle_epi8(sc, _mm256_set1_epi16((((2 * i + 1) << 8) | (2 * i)) as i16))
}

#[inline(always)]
unsafe fn hsum4(v: __m128) -> f32 {
    let s = _mm_add_ps(v, _mm_movehl_ps(v, v));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
}

/// A Q4_K or Q5_K super-block: d·sc·q - dmin·m per 32-value sub-block, q 4 or 5 bits.
trait K4 {
    fn head(&self) -> (f16, f16, &[u8; K_SCALE_SIZE]);
    /// Values 64j..64j+32 and 64j+32..64j+64 as unsigned bytes.
    unsafe fn values(&self, j: usize) -> (__m256i, __m256i);
}

impl K4 for BlockQ4K {
    fn head(&self) -> (f16, f16, &[u8; K_SCALE_SIZE]) {
        (self.d, self.dmin, &self.scales)
    }
    #[inline(always)]
    unsafe fn values(&self, j: usize) -> (__m256i, __m256i) {
        k4_nibbles(&self.qs, j)
    }
}

impl K4 for BlockQ5K {
    fn head(&self) -> (f16, f16, &[u8; K_SCALE_SIZE]) {
        (self.d, self.dmin, &self.scales)
    }
    #[inline(always)]
    unsafe fn values(&self, j: usize) -> (__m256i, __m256i) {
        let (lo, hi) = k4_nibbles(&self.qs, j);
        let hb = load(self.qh.as_ptr());
        let sixteen = _mm256_set1_epi8(16);
        // Bit 2j of qh[l] is the fifth bit of value l of the low half, bit 2j+1 of the high.
        let ml = _mm256_set1_epi8((1u8 << (2 * j)) as i8);
        let mh = _mm256_set1_epi8((1u8 << (2 * j + 1)) as i8);
        let hl = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(hb, ml), ml), sixteen);
        let hh = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(hb, mh), mh), sixteen);
        (_mm256_or_si256(lo, hl), _mm256_or_si256(hi, hh))
    }
}

/// The low and high nibbles of bytes 32j..32j+32 of `qs` (values 64j.. and 64j+32..).
#[inline(always)]
unsafe fn k4_nibbles(qs: &[u8; QK_K / 2], j: usize) -> (__m256i, __m256i) {
    let m4 = _mm256_set1_epi8(0xF);
    let q4 = load(qs.as_ptr().add(32 * j));
    let lo = _mm256_and_si256(q4, m4);
    (lo, _mm256_and_si256(_mm256_srli_epi16::<4>(q4), m4))
}

// Generic, but each format and N is its own function (not inlined into its caller): one
// inlining budget per body.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_k1<B: KBlock>(x: &[B], y: &[BlockQ8K]) -> f32 {
    k_one::<B, Ymm>(x, y)
}
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_k<B: KBlock, const N: usize>(x: &[B], ys: [&[BlockQ8K]; N]) -> [f32; N] {
    k_n(x, ys)
}

/// A k-quant super-block as the dot products see it: per token, integer sums as eight i32
/// lanes (exact), then f32 scales once per super-block.
trait KBlock {
    /// Whether the format subtracts mins (Q4_K, Q5_K: dmin·Σ min·bsum).
    const MINS: bool;
    /// Per token, Σ sc·q·q8 and (formats with mins) Σ min·bsum.
    unsafe fn sums<const N: usize>(&self, ys: [&BlockQ8K; N]) -> ([__m256i; N], [__m256i; N]);
    /// d and dmin.
    unsafe fn scales(&self) -> (f32, f32);
}

macro_rules! k4_block {
    ($B:ty) => {
        impl KBlock for $B {
            const MINS: bool = true;
            #[inline(always)]
            unsafe fn sums<const N: usize>(
                &self,
                ys: [&BlockQ8K; N],
            ) -> ([__m256i; N], [__m256i; N]) {
                k4_sums(self, ys)
            }
            #[inline(always)]
            unsafe fn scales(&self) -> (f32, f32) {
                (h2f(self.d), h2f(self.dmin))
            }
        }
    };
}
k4_block!(BlockQ4K);
k4_block!(BlockQ5K);

impl KBlock for BlockQ6K {
    const MINS: bool = false;
    #[inline(always)]
    unsafe fn sums<const N: usize>(&self, ys: [&BlockQ8K; N]) -> ([__m256i; N], [__m256i; N]) {
        (q6_sums(self, ys), [_mm256_setzero_si256(); N])
    }
    #[inline(always)]
    unsafe fn scales(&self) -> (f32, f32) {
        (h2f(self.d), 0.0)
    }
}

/// The totals of eight vectors of eight i32, one per lane (exact: integer adds).
#[inline(always)]
unsafe fn reduce8(v: &[__m256i; 8]) -> __m256i {
    let h0 = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
    let h1 = _mm256_hadd_epi32(_mm256_hadd_epi32(v[4], v[5]), _mm256_hadd_epi32(v[6], v[7]));
    _mm256_add_epi32(
        _mm256_permute2x128_si256::<0x20>(h0, h1),
        _mm256_permute2x128_si256::<0x31>(h0, h1),
    )
}

/// The total of one vector of eight i32 (exact).
#[inline(always)]
unsafe fn hsum_i32(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
    _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32::<1>(s)))
}

/// Per token, each super-block's integer totals (exact) are scaled and added to one f32
/// accumulator: `acc = fma(d·dy, Σ, fma(-dmin·dy, Σmin, acc))`. These are the same scalar
/// operations whether a token runs alone or in a lane beside seven others, so its bits do
/// not depend on N; eight tokens' totals come from one transposing reduction ([`reduce8`]).
#[inline(always)]
unsafe fn k_epilogue<const N: usize>(
    acc: &mut [f32; N],
    main: &[__m256i; N],
    mins: Option<&[__m256i; N]>,
    (dx, dmx): (f32, f32),
    yd: &[f32; N],
) {
    if N.is_multiple_of(8) {
        for c in (0..N).step_by(8) {
            let m: &[__m256i; 8] = main[c..c + 8].try_into().unwrap();
            let dy = _mm256_loadu_ps(yd[c..].as_ptr());
            let mut a = _mm256_loadu_ps(acc[c..].as_ptr());
            if let Some(mins) = mins {
                let mn: &[__m256i; 8] = mins[c..c + 8].try_into().unwrap();
                let dm = _mm256_mul_ps(_mm256_set1_ps(-dmx), dy);
                a = _mm256_fmadd_ps(dm, _mm256_cvtepi32_ps(reduce8(mn)), a);
            }
            let d = _mm256_mul_ps(_mm256_set1_ps(dx), dy);
            a = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(reduce8(m)), a);
            _mm256_storeu_ps(acc[c..].as_mut_ptr(), a);
        }
    } else {
        for t in 0..N {
            let dy = yd[t];
            if let Some(mins) = mins {
                // Both totals from one reduction: [Σmain, Σmin, Σmain, Σmin].
                let h = _mm256_hadd_epi32(main[t], mins[t]);
                let s = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256::<1>(h));
                let s = _mm_cvtepi32_ps(_mm_hadd_epi32(s, s));
                let (sm, sn) = (_mm_cvtss_f32(s), _mm_cvtss_f32(_mm_movehdup_ps(s)));
                acc[t] = (-dmx * dy).mul_add(sn, acc[t]);
                acc[t] = (dx * dy).mul_add(sm, acc[t]);
            } else {
                acc[t] = (dx * dy).mul_add(hsum_i32(main[t]) as f32, acc[t]);
            }
        }
    }
}

/// How decode takes one super-block's integer totals against one token: [`KBlock::sums`] with
/// N = 1 ([`Ymm`]), or a 512-bit body that gives the same totals (`q4k512.rs`).
trait Sums1<B> {
    unsafe fn sums1(x: &B, y: &BlockQ8K) -> (__m256i, __m256i);
}

/// The 256-bit bodies.
struct Ymm;
impl<B: KBlock> Sums1<B> for Ymm {
    #[inline(always)]
    unsafe fn sums1(x: &B, y: &BlockQ8K) -> (__m256i, __m256i) {
        let ([m], [n]) = x.sums([y]);
        (m, n)
    }
}

/// One row against one token: the scalar sequence of [`k_epilogue`], with the totals of eight
/// super-blocks at a time taken by one [`reduce8`] (fewer instructions than a reduction per
/// super-block, which is what the last `len mod 8` super-blocks get). Only the totals of each
/// super-block come from `S`, so every `S` gives the same bits.
#[inline(always)]
unsafe fn k_one<B: KBlock, S: Sums1<B>>(x: &[B], y: &[BlockQ8K]) -> f32 {
    let mut acc = 0f32;
    let mut c0 = 0;
    while c0 + 8 <= x.len() {
        let (mut m, mut n) = ([_mm256_setzero_si256(); 8], [_mm256_setzero_si256(); 8]);
        let (mut dm, mut dn) = ([0f32; 8], [0f32; 8]);
        for c in 0..8 {
            let i = c0 + c;
            prefetch_ahead(&x[i]);
            let (sm, sn) = S::sums1(&x[i], &y[i]);
            let (dx, dmx) = x[i].scales();
            (m[c], n[c], dm[c], dn[c]) = (sm, sn, dx * y[i].d, -dmx * y[i].d);
        }
        let (mut tm, mut tn) = ([0f32; 8], [0f32; 8]);
        _mm256_storeu_ps(tm.as_mut_ptr(), _mm256_cvtepi32_ps(reduce8(&m)));
        if B::MINS {
            _mm256_storeu_ps(tn.as_mut_ptr(), _mm256_cvtepi32_ps(reduce8(&n)));
        }
        for c in 0..8 {
            if B::MINS {
                acc = dn[c].mul_add(tn[c], acc);
            }
            acc = dm[c].mul_add(tm[c], acc);
        }
        c0 += 8;
    }
    let mut e = [acc];
    for i in c0..x.len() {
        prefetch_ahead(&x[i]);
        let (sm, sn) = S::sums1(&x[i], &y[i]);
        k_epilogue(
            &mut e,
            &[sm],
            B::MINS.then_some(&[sn]),
            x[i].scales(),
            &[y[i].d],
        );
    }
    e[0]
}

/// One row against `N` tokens' activations: each weight block is unpacked once.
#[inline(always)]
unsafe fn k_n<B: KBlock, const N: usize>(x: &[B], ys: [&[BlockQ8K]; N]) -> [f32; N] {
    let mut acc = [0f32; N];
    for (i, x) in x.iter().enumerate() {
        let mut yb = [&ys[0][i]; N];
        let mut dy = [0f32; N];
        for t in 0..N {
            (yb[t], dy[t]) = (&ys[t][i], ys[t][i].d);
        }
        let (main, mn) = x.sums(yb);
        k_epilogue(&mut acc, &main, B::MINS.then_some(&mn), x.scales(), &dy);
    }
    acc
}

/// A Q4_K / Q5_K super-block against `N` tokens' blocks: per token, the integer sums
/// Σ sc·q·q8 and Σ min·bsum as eight i32 lanes each.
#[inline(always)]
unsafe fn k4_sums<B: K4, const N: usize>(
    x: &B,
    ys: [&BlockQ8K; N],
) -> ([__m256i; N], [__m256i; N]) {
    let u = k4_unpack(x.head().2);
    let sc = _mm256_cvtepu8_epi16(_mm_set_epi32(0, 0, u[1] as i32, u[0] as i32));
    let sc = _mm256_permute4x64_epi64::<0x44>(sc);
    // Each min twice, beside the two 16-value sums (`bsums`) of its sub-block.
    let m8 = _mm_set_epi32(0, 0, u[3] as i32, u[2] as i32);
    let mins = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(m8, m8));
    let mut main = [_mm256_setzero_si256(); N];
    let mut mn = [_mm256_setzero_si256(); N];
    for (t, y) in ys.iter().enumerate() {
        // Σ bsums·mins (≤ 2·16·127·63 per lane).
        let bs = _mm256_loadu_si256(y.bsums.as_ptr() as *const __m256i);
        mn[t] = _mm256_madd_epi16(mins, bs);
    }
    for j in 0..QK_K / 64 {
        let (lo, hi) = x.values(j);
        let (sl, sh) = (scale(sc, 2 * j), scale(sc, 2 * j + 1));
        for (t, y) in ys.iter().enumerate() {
            let q8 = y.qs.as_ptr().add(64 * j);
            let pl = _mm256_madd_epi16(sl, _mm256_maddubs_epi16(lo, load(q8 as _)));
            let ph = _mm256_madd_epi16(sh, _mm256_maddubs_epi16(hi, load(q8.add(32) as _)));
            main[t] = _mm256_add_epi32(main[t], _mm256_add_epi32(pl, ph));
        }
    }
    (main, mn)
}

/// Values 128j..128j+128 of a Q6_K super-block (the stored q + 32, 0..63) as four vectors
/// of 32, in order.
#[inline(always)]
unsafe fn q6_values(x: &BlockQ6K, j: usize) -> [__m256i; 4] {
    let m4 = _mm256_set1_epi8(0xF);
    let m2 = _mm256_set1_epi8(3);
    let b1 = load(x.ql.as_ptr().add(64 * j));
    let b2 = load(x.ql.as_ptr().add(64 * j + 32));
    let bh = load(x.qh.as_ptr().add(32 * j));
    [
        _mm256_or_si256(
            _mm256_and_si256(b1, m4),
            _mm256_slli_epi16::<4>(_mm256_and_si256(bh, m2)),
        ),
        _mm256_or_si256(
            _mm256_and_si256(b2, m4),
            _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<2>(bh), m2)),
        ),
        _mm256_or_si256(
            _mm256_and_si256(_mm256_srli_epi16::<4>(b1), m4),
            _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<4>(bh), m2)),
        ),
        _mm256_or_si256(
            _mm256_and_si256(_mm256_srli_epi16::<4>(b2), m4),
            _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<6>(bh), m2)),
        ),
    ]
}

/// A Q6_K super-block against `N` tokens' blocks. Values are multiplied as stored (q + 32,
/// unsigned for `vpmaddubsw`); the 32·Σ sc·q8 this adds is taken off once per super-block from
/// the activations' 16-value sums (`bsums`).
#[inline(always)]
unsafe fn q6_sums<const N: usize>(x: &BlockQ6K, ys: [&BlockQ8K; N]) -> [__m256i; N] {
    let mut sumi = [_mm256_setzero_si256(); N];
    // Σ sc·bsum over the 16 sub-blocks (|Σ| ≤ 16·128·16·127, far inside i32).
    let sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(x.scales.as_ptr() as *const __m128i));
    for t in 0..N {
        let bs = _mm256_loadu_si256(ys[t].bsums.as_ptr() as *const __m256i);
        sumi[t] = _mm256_sub_epi32(sumi[t], _mm256_slli_epi32::<5>(_mm256_madd_epi16(sc16, bs)));
    }
    for j in 0..2 {
        // Scales 8j..8j+8 as i16 in both lanes, for one `vpshufb` per quarter below.
        let sch = if j == 0 {
            _mm256_permute4x64_epi64::<0x44>(sc16)
        } else {
            _mm256_permute4x64_epi64::<0xEE>(sc16)
        };
        let q = q6_values(x, j);
        for (k, &qk) in q.iter().enumerate() {
            // Values 0..15 of the quarter use scale 8j+2k (low lane), 16..31 the next.
            let (b0, b1) = ((4 * k) as i16, (4 * k + 2) as i16);
            let sc = _mm256_shuffle_epi8(
                sch,
                _mm256_set_m128i(
                    _mm_set1_epi16(b1 | (b1 + 1) << 8),
                    _mm_set1_epi16(b0 | (b0 + 1) << 8),
                ),
            );
            for t in 0..N {
                let q8 = load(ys[t].qs.as_ptr().add(128 * j + 32 * k) as _);
                // (q + 32)·q8 pairwise in i16: ≤ 2·63·127.
                let p = _mm256_maddubs_epi16(qk, q8);
                sumi[t] = _mm256_add_epi32(sumi[t], _mm256_madd_epi16(sc, p));
            }
        }
    }
    sumi
}

/// One weight row against four tokens' activations (the prefill matmul's inner step): exactly
/// the sums of four [`vec_dot`]s (the same bodies, the same order).
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C, and AVX-512 F, VL and VNNI if `VNNI`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn vec_dot4<const VNNI: bool>(w: Weights<'_>, a: [Acts<'_>; 4]) -> [f32; 4] {
    for a in &a {
        assert_eq!(w.len(), a.len(), "vec_dot4: length mismatch");
    }
    match (w, a) {
        (Weights::Q4K(w), [Acts::Q8K(a), Acts::Q8K(b), Acts::Q8K(c), Acts::Q8K(d)]) => {
            dot_k(w, [a, b, c, d])
        }
        (Weights::Q6K(w), [Acts::Q8K(a), Acts::Q8K(b), Acts::Q8K(c), Acts::Q8K(d)]) => {
            dot_k(w, [a, b, c, d])
        }
        (Weights::Q8_0(w), [Acts::Q8_0(a), Acts::Q8_0(b), Acts::Q8_0(c), Acts::Q8_0(d)]) => {
            legacy!(VNNI, dot4(w, [a, b, c, d]))
        }
        (Weights::Q4_0(w), [Acts::Q8_0(a), Acts::Q8_0(b), Acts::Q8_0(c), Acts::Q8_0(d)]) => {
            legacy!(VNNI, dot4(w, [a, b, c, d]))
        }
        (Weights::Q5_0(w), [Acts::Q8_0(a), Acts::Q8_0(b), Acts::Q8_0(c), Acts::Q8_0(d)]) => {
            legacy!(VNNI, dot4(w, [a, b, c, d]))
        }
        (Weights::Q4_1(w), [Acts::Q8_1(a), Acts::Q8_1(b), Acts::Q8_1(c), Acts::Q8_1(d)]) => {
            legacy!(VNNI, dot4(w, [a, b, c, d]))
        }
        (Weights::Q5_1(w), [Acts::Q8_1(a), Acts::Q8_1(b), Acts::Q8_1(c), Acts::Q8_1(d)]) => {
            legacy!(VNNI, dot4(w, [a, b, c, d]))
        }
        _ => a.map(|a| vec_dot::<VNNI>(w, a)),
    }
}

/// Tokens from which k-quant prefill goes through eight-row panels (`avx2/kpanel.rs`), which
/// pass four tokens at a time over each panel.
const KPANEL_MIN_TOKENS: usize = 4;

/// Concurrent read streams of decode's matvec per thread.
const STREAMS: usize = 2;

/// How far ahead of its loads decode's dot product prefetches: with each group of blocks it
/// reads, it asks for the lines 2 KiB further on in the same stream (into the stream's next
/// row). Decode does about as much arithmetic per byte as one core's share of the memory
/// delivers, and without help the two barely overlap (a matvec ran at about 1/(1/compute +
/// 1/memory)); the hardware prefetchers alone do not run far enough ahead. On Zen 3, 2
/// threads, a model-sized stack of 2048-column matrices from DRAM on 2 MiB pages
/// (alternating runs, GB/s): Q4_0 13.6 -> 17.7 (mean of four; against whole rows prefetched 4
/// rows ahead, which this replaces), Q4_1 14.0 -> 16.7, Q8_0 15.4 -> 17.5, Q4_K 15.2 ->
/// 17.4, Q6_K 15.5 -> 18.2 (means of three). 1536 and 3072 bytes did about as well as 2048,
/// 1024 worse; whole rows ahead had lost on Q8_0 (14.9 -> 11.5), whose bursts of 34
/// prefetches per row came all at once. Exactly one prefetch per line (a group's 72 or 136
/// bytes ask for some lines twice here) did no better: Q4_0 17.5 and 17.6 GB/s against 19.9
/// and 19.7 in one process, 24.2-24.9 against 24.6-25.4 in another; Q8_0, Q4_1 and Q4_K
/// within 3% (Zen 3, both bodies interleaved in one process, medians of 10-12).
const PREFETCH_BYTES: usize = 2048;

/// Prefetch the lines of the bytes of `*p`, [`PREFETCH_BYTES`] further on. Past the end of
/// the weights is harmless: a prefetch never faults, and the address is never dereferenced.
#[inline(always)]
unsafe fn prefetch_ahead<T>(p: *const T) {
    let p = p as *const i8;
    let mut o = 0;
    while o < size_of::<T>() {
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH_BYTES + o));
        o += 64;
    }
}

/// `out[r] = dot(row r)` for every row of `w` (`bpr` blocks each), the rows cut into `STREAMS`
/// contiguous segments computed in turn (row i of each, then row i + 1 of each): several
/// sequential streams through memory, which the prefetchers follow side by side. On Zen 3
/// (2 threads, TinyLlama Q4_0) one stream per thread decoded 17.3 tok/s, two 18.7, four 17.9
/// (means of four interleaved runs; a standalone Q4_0/Q4_K matvec from DRAM read 11-12 GB/s
/// with one, 13-14 with two to four). Adjacent rows interleaved would instead be short
/// streams the prefetchers lose. The dot products prefetch ahead within their stream
/// ([`PREFETCH_BYTES`]).
#[inline(always)]
unsafe fn streams<B>(w: &[B], bpr: usize, mut dot: impl FnMut(&[B]) -> f32, out: &mut [f32]) {
    let rows = out.len();
    let seg = rows.div_ceil(STREAMS);
    for i in 0..seg {
        for s in 0..STREAMS {
            let r = s * seg + i;
            if r < rows {
                out[r] = dot(&w[r * bpr..(r + 1) * bpr]);
            }
        }
    }
}

/// `y[r]` = row `r` of `w` (rows of `a.len()` values) dotted with `a`: decode's matvec
/// rows, the formats matched once for all of them.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C, and AVX-512 F, VL, BW and VNNI if `VNNI` (the
/// AVX-512 tier checks BW).
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn matvec_rows<const VNNI: bool>(w: Weights<'_>, a: Acts<'_>, y: &mut [f32]) {
    assert_eq!(w.len(), a.len() * y.len(), "matvec_rows: shapes");
    macro_rules! go {
        ($y:expr, $w:expr, $a:expr, $dot:path) => {{
            let bpr = $a.len();
            if bpr > 0 {
                streams($w, bpr, |x| $dot(x, $a), $y);
            } else {
                $y.fill(0.0);
            }
        }};
    }
    match (w, a) {
        (Weights::Q8_0(w), Acts::Q8_0(a)) => legacy!(VNNI, rows(w, a, y)),
        (Weights::Q4_0(w), Acts::Q8_0(a)) if VNNI => legacy512::rows(w, a, y),
        (Weights::Q4_0(w), Acts::Q8_0(a)) => legacy!(VNNI, rows(w, a, y)),
        (Weights::Q5_0(w), Acts::Q8_0(a)) => legacy!(VNNI, rows(w, a, y)),
        (Weights::Q4_1(w), Acts::Q8_1(a)) if VNNI => legacy512::rows(w, a, y),
        (Weights::Q4_1(w), Acts::Q8_1(a)) => legacy!(VNNI, rows(w, a, y)),
        (Weights::Q5_1(w), Acts::Q8_1(a)) => legacy!(VNNI, rows(w, a, y)),
        (Weights::Q4K(w), Acts::Q8K(a)) if VNNI => go!(y, w, a, q4k512::dot),
        (Weights::Q4K(w), Acts::Q8K(a)) => go!(y, w, a, dot_k1),
        (Weights::Q5K(w), Acts::Q8K(a)) => go!(y, w, a, dot_k1),
        (Weights::Q6K(w), Acts::Q8K(a)) => go!(y, w, a, dot_k1),
        _ => panic!(
            "matvec_rows: {} weights with {:?} activations",
            w.format().name(),
            a.format()
        ),
    }
}

/// `out` (n, rows) = `a` (n tokens) × the rows of `w`: the prefill matmul, in the order of
/// [`tile_loop`] through the `dot4` and single-token bodies.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C, and AVX-512 F, VL and VNNI if `VNNI`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn matmul_tile<const VNNI: bool>(
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
        ($w:expr, $a:expr) => {{
            let bpr = $a.len() / n;
            tile_loop(
                $w,
                bpr,
                n,
                out,
                |t| &$a[t * bpr..(t + 1) * bpr],
                // SAFETY: this function's contract (AVX2, FMA, F16C).
                |x, y| unsafe { dot_k1(x, y) },
                |x, ys| unsafe { dot_k::<_, 4>(x, ys) },
                |x, ys| unsafe { dot_k::<_, 8>(x, ys) },
            )
        }};
    }
    match (w, a) {
        (Weights::Q8_0(w), Acts::Q8_0(a)) => legacy!(VNNI, tile(w, a, n, out)),
        (Weights::Q4_0(w), Acts::Q8_0(a)) => legacy!(VNNI, tile(w, a, n, out)),
        (Weights::Q5_0(w), Acts::Q8_0(a)) => legacy!(VNNI, tile(w, a, n, out)),
        (Weights::Q4_1(w), Acts::Q8_1(a)) => legacy!(VNNI, tile(w, a, n, out)),
        (Weights::Q5_1(w), Acts::Q8_1(a)) => legacy!(VNNI, tile(w, a, n, out)),
        (Weights::Q4K(w), Acts::Q8K(a)) if n >= KPANEL_MIN_TOKENS => kpanel::tile(w, a, n, out),
        (Weights::Q5K(w), Acts::Q8K(a)) if n >= KPANEL_MIN_TOKENS => kpanel::tile(w, a, n, out),
        (Weights::Q4K(w), Acts::Q8K(a)) => go!(w, a),
        (Weights::Q5K(w), Acts::Q8K(a)) => go!(w, a),
        (Weights::Q6K(w), Acts::Q8K(a)) if n >= KPANEL_MIN_TOKENS => kpanel::tile(w, a, n, out),
        (Weights::Q6K(w), Acts::Q8K(a)) => go!(w, a),
        _ => panic!(
            "matmul_tile: {} weights with {:?} activations",
            w.format().name(),
            a.format()
        ),
    }
}

// ---------------------------------------------------------------- activation quantizers

/// f32 → i8 for 32 values in four vectors (values already in -127..=127), in order.
#[inline(always)]
unsafe fn pack32(q: [__m256i; 4], out: *mut i8) {
    let a = _mm256_packs_epi32(q[0], q[1]);
    let b = _mm256_packs_epi32(q[2], q[3]);
    let p = _mm256_packs_epi16(a, b);
    // packs work per 128-bit lane: restore the order of the 32-bit groups.
    let p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(out as *mut __m256i, p);
}

/// `roundf`: to nearest, ties away from zero (what `quantize_row_q8_{0,1}_ref` use), made of
/// exact steps: t = trunc(v) and v - t are exact, so ties are seen exactly.
#[inline(always)]
unsafe fn round_away(v: __m256) -> __m256 {
    let t = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(v);
    let sign = _mm256_and_ps(v, _mm256_set1_ps(-0.0));
    let diff = _mm256_andnot_ps(_mm256_set1_ps(-0.0), _mm256_sub_ps(v, t));
    let up = _mm256_and_ps(
        _mm256_cmp_ps::<_CMP_GE_OQ>(diff, _mm256_set1_ps(0.5)),
        _mm256_set1_ps(1.0),
    );
    _mm256_add_ps(t, _mm256_or_ps(up, sign))
}

/// One 32-value block as the Q8_0/Q8_1 reference does it: d = max|x|/127, q = roundf(x/d);
/// returns d (f32) and Σq.
#[inline(always)]
unsafe fn q8_block(x: &[f32], qs: &mut [i8; QK]) -> (f32, i32) {
    // No closures here: they would not inherit the caller's target features, and their
    // intrinsics would stay calls.
    let abs = _mm256_set1_ps(-0.0);
    let p = x.as_ptr();
    let v = [
        _mm256_loadu_ps(p),
        _mm256_loadu_ps(p.add(8)),
        _mm256_loadu_ps(p.add(16)),
        _mm256_loadu_ps(p.add(24)),
    ];
    let m01 = _mm256_max_ps(_mm256_andnot_ps(abs, v[0]), _mm256_andnot_ps(abs, v[1]));
    let m23 = _mm256_max_ps(_mm256_andnot_ps(abs, v[2]), _mm256_andnot_ps(abs, v[3]));
    let m = _mm256_max_ps(m01, m23);
    let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps::<1>(m, m)));
    let d = amax / 127.0;
    let id = _mm256_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
    let q = [
        _mm256_cvttps_epi32(round_away(_mm256_mul_ps(v[0], id))),
        _mm256_cvttps_epi32(round_away(_mm256_mul_ps(v[1], id))),
        _mm256_cvttps_epi32(round_away(_mm256_mul_ps(v[2], id))),
        _mm256_cvttps_epi32(round_away(_mm256_mul_ps(v[3], id))),
    ];
    pack32(q, qs.as_mut_ptr());
    let s = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
    let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256::<1>(s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
    (d, _mm_cvtsi128_si32(s))
}

/// [`scalar::quantize_q8_0`], bit for bit.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn quantize_q8_0(x: &[f32], y: &mut [BlockQ8_0]) {
    assert_eq!(x.len(), y.len() * QK, "quantize_q8_0: length mismatch");
    for (x, y) in x.chunks_exact(QK).zip(y.iter_mut()) {
        let (d, _) = q8_block(x, &mut y.qs);
        y.d = f16::from_f32(d);
    }
}

/// [`scalar::quantize_q8_1`], bit for bit.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn quantize_q8_1(x: &[f32], y: &mut [BlockQ8_1]) {
    assert_eq!(x.len(), y.len() * QK, "quantize_q8_1: length mismatch");
    for (x, y) in x.chunks_exact(QK).zip(y.iter_mut()) {
        let (d, sum) = q8_block(x, &mut y.qs);
        y.d = f16::from_f32(d);
        y.s = f16::from_f32(sum as f32 * d);
    }
}

/// [`scalar::quantize_q8_k`], bit for bit.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn quantize_q8_k(x: &[f32], y: &mut [BlockQ8K]) {
    assert_eq!(x.len(), y.len() * QK_K, "quantize_q8_k: length mismatch");
    let abs = _mm256_set1_ps(-0.0);
    for (x, y) in x.chunks_exact(QK_K).zip(y.iter_mut()) {
        let mut m = _mm256_setzero_ps();
        for i in 0..QK_K / 8 {
            m = _mm256_max_ps(
                m,
                _mm256_andnot_ps(abs, _mm256_loadu_ps(x.as_ptr().add(8 * i))),
            );
        }
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps::<1>(m, m)));
        if amax == 0.0 {
            *y = scalar::ZERO_Q8K;
            continue;
        }
        // The reference keeps the first value of largest magnitude (and its sign).
        let max = *x.iter().find(|v| v.abs() == amax).unwrap();
        let iscale = -127.0 / max;
        let is = _mm256_set1_ps(iscale);
        let cap = _mm256_set1_epi32(127);
        for g in 0..QK_K / 32 {
            let mut q = [_mm256_setzero_si256(); 4];
            for (i, q) in q.iter_mut().enumerate() {
                let v = _mm256_mul_ps(is, _mm256_loadu_ps(x.as_ptr().add(32 * g + 8 * i)));
                let r = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v);
                *q = _mm256_min_epi32(_mm256_cvtps_epi32(r), cap);
            }
            pack32(q, y.qs.as_mut_ptr().add(32 * g));
            for h in 0..2 {
                let s = _mm256_add_epi32(q[2 * h], q[2 * h + 1]);
                let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256::<1>(s));
                let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
                let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
                y.bsums[2 * g + h] = _mm_cvtsi128_si32(s) as i16;
            }
        }
        y.d = 1.0 / iscale;
    }
}
