//! Decode's body for Q4_0 and Q4_1 on the AVX-512 VNNI tier: four blocks per step in 512-bit
//! vectors.
//!
//! Why: with the weights streaming at 50-90 GB/s (Zen 5, 2 threads), decode is bound by the
//! instructions per block, not by memory. The 256-bit body (`legacy.rs`) spends ~52 per four
//! Q4_0 blocks, a quarter of them on putting four f16 scales together with scalar loads and
//! shifts and on folding the four blocks' partial sums. Here:
//! - two 64-byte loads cover the four blocks (72 or 80 bytes); one `vpermt2w` per two blocks
//!   (the nibbles start at an even offset) puts each block's 16 nibble bytes twice side by
//!   side, and one shift and mask leave values 0..16 and 16..32: the layout of the
//!   activations (`Group::qs`), so no activation is moved;
//! - one `vpermw` gathers the four d (and m) from the first load;
//! - two `vpdpbusd` make the eight partial sums of each block, and two `vpermt2d` and two adds
//!   fold them to the 256-bit body's [P0..P3 (values 0..16) | P0..P3 (16..32)].
//!
//! Measured on a 2-vCPU Zen 5, TinyLlama Q4_0, alternating runs: one thread decoded 51-53
//! tok/s against 45-46 (+13%), SmolLM2 Q4_1 263-285 against 250-258. On two threads the
//! gain shrinks to about +10% when the machine's memory runs fast (88-90 tok/s against 80-82)
//! and to nothing when it runs slow (the bandwidth probe reads either ~55 or ~90 GB/s here):
//! there, memory is the bound.
//!
//! Same bits: the integer sums are exact in any order, and from the folded sums on every step
//! is the 256-bit body's (`legacy::step`: subtract the offset's correction, scale by d·dy,
//! convert, FMA into the same eight lanes); a row's last 1..=3 blocks go through that step
//! itself. `tests/quant.rs` checks decode against the batched tiles bit for bit.

use super::legacy::{offset, prepare, step, with_groups, Group, Legacy, Vnni};
use super::{hsum, hsum4, prefetch_ahead, streams};
use core::arch::x86_64::*;

/// The formats this body takes: 16 bytes of nibbles right after the head (d, or d and m).
pub(super) trait Nibbles: Legacy {
    /// Where the nibbles start in a block (even: they are moved as 16-bit words).
    const QS_AT: usize;
}
impl Nibbles for crate::quant::BlockQ4_0 {
    const QS_AT: usize = 2;
}
impl Nibbles for crate::quant::BlockQ4_1 {
    const QS_AT: usize = 4;
}

/// The permutations for one format, made once per call.
struct Perms {
    /// Blocks 0, 1 and 2, 3: each block's nibbles twice (lanes 2b and 2b + 1).
    v01: __m512i,
    v23: __m512i,
    /// Per 16-bit lane: 0, or 4 in the 128-bit lanes that keep the high nibbles.
    shift: __m512i,
    /// The four d twice (words 0..8), then the four m (words 8..12).
    heads: __m512i,
    /// The two halves of the fold: lane k and k + 8 of their sum hold two partial sums of
    /// each of the eight (block, half) groups.
    fold_a: __m512i,
    fold_b: __m512i,
}

impl Perms {
    #[inline(always)]
    unsafe fn new<B: Nibbles>() -> Perms {
        const { assert!(B::QS_AT.is_multiple_of(2) && size_of::<B>().is_multiple_of(2)) };
        let size = size_of::<B>();
        // Word indices. The second load starts at byte 4·size − 64; words past the first
        // load's 32 come from it (`vpermt2w` indices 32..64).
        let at = |byte: usize| if byte < 64 { byte / 2 } else { 32 + (byte - (4 * size - 64)) / 2 } as u16;
        let vals = |first: usize| -> [u16; 32] {
            std::array::from_fn(|i| at((first + i / 16) * size + B::QS_AT + 2 * (i % 8)))
        };
        let heads: [u16; 32] = std::array::from_fn(|i| match i {
            0..8 => (i % 4 * size / 2) as u16,
            8..12 => ((i - 8) * size / 2 + 1) as u16,
            _ => 0,
        });
        // Group k: (block k, values 0..16) for k < 4, (block k − 4, values 16..32) after; its
        // four partial sums start at lane 8·block (+ 4 for the high half) of p01 ++ p23.
        let base = |k: usize| if k < 4 { 8 * k } else { 8 * (k - 4) + 4 } as u32;
        let fold =
            |o: u32| -> [u32; 16] { std::array::from_fn(|i| base(i % 8) + o + (i / 8) as u32) };
        let shift: [u16; 32] = std::array::from_fn(|i| if (i / 8) % 2 == 1 { 4 } else { 0 });
        let load = |p: *const u8| _mm512_loadu_si512(p as *const _);
        Perms {
            v01: load(vals(0).as_ptr() as *const u8),
            v23: load(vals(2).as_ptr() as *const u8),
            shift: load(shift.as_ptr() as *const u8),
            heads: load(heads.as_ptr() as *const u8),
            fold_a: load(fold(0).as_ptr() as *const u8),
            fold_b: load(fold(2).as_ptr() as *const u8),
        }
    }
}

/// One weight row `x` against one token's groups `g`: `legacy::dot_n` with N = 1, same bits.
#[inline(always)]
unsafe fn dot<B: Nibbles>(x: &[B], g: &[Group], p: &Perms) -> f32 {
    let mut acc = [_mm256_setzero_ps()];
    let mut accm = [_mm_setzero_ps()];
    let (full, rest) = x.as_chunks::<4>();
    let second = 4 * size_of::<B>() - 64;
    let low4 = _mm512_set1_epi8(0x0f);
    for (x4, gr) in full.iter().zip(g) {
        prefetch_ahead(x4);
        let base = x4.as_ptr() as *const u8;
        let a = _mm512_loadu_si512(base as *const _);
        let b = _mm512_loadu_si512(base.add(second) as *const _);
        let v01 = _mm512_permutex2var_epi16(a, p.v01, b);
        let v23 = _mm512_permutex2var_epi16(a, p.v23, b);
        let v01 = _mm512_and_si512(_mm512_srlv_epi16(v01, p.shift), low4);
        let v23 = _mm512_and_si512(_mm512_srlv_epi16(v23, p.shift), low4);
        let y01 = _mm512_load_si512(gr.qs[0].as_ptr() as *const _);
        let y23 = _mm512_load_si512(gr.qs[2].as_ptr() as *const _);
        let p01 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), v01, y01);
        let p23 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), v23, y23);
        let u = _mm512_add_epi32(
            _mm512_permutex2var_epi32(p01, p.fold_a, p23),
            _mm512_permutex2var_epi32(p01, p.fold_b, p23),
        );
        let mut s = _mm256_add_epi32(_mm512_castsi512_si256(u), _mm512_extracti64x4_epi64::<1>(u));
        if offset::<Vnni, B>() != 0 {
            let c = _mm_load_si128(gr.corr.as_ptr() as *const __m128i);
            s = _mm256_sub_epi32(s, _mm256_zextsi128_si256(c));
        }
        let h = _mm512_permutexvar_epi16(p.heads, a);
        let d = _mm256_cvtph_ps(_mm512_castsi512_si128(h));
        let sc = _mm256_mul_ps(d, _mm256_load_ps(gr.dy.as_ptr()));
        acc[0] = _mm256_fmadd_ps(sc, _mm256_cvtepi32_ps(s), acc[0]);
        if B::MIN {
            let m = _mm_cvtph_ps(_mm512_extracti32x4_epi32::<1>(h));
            accm[0] = _mm_fmadd_ps(m, _mm_load_ps(gr.s.as_ptr()), accm[0]);
        }
    }
    let i = full.len();
    match rest.len() {
        0 => {}
        1 => step::<Vnni, B, 1, 1>(rest.try_into().unwrap(), [g], i, &mut acc, &mut accm),
        2 => step::<Vnni, B, 1, 2>(rest.try_into().unwrap(), [g], i, &mut acc, &mut accm),
        _ => step::<Vnni, B, 1, 3>(rest.try_into().unwrap(), [g], i, &mut acc, &mut accm),
    }
    if B::MIN {
        hsum(acc[0]) + hsum4(accm[0])
    } else {
        hsum(acc[0])
    }
}

/// `matvec_rows` for Q4_0 and Q4_1: `out[r]` = row r of `w` · `y`.
///
/// # Safety
/// The CPU must have the AVX-512 VNNI tier's features (AVX-512 F, VL, BW and VNNI, AVX2, FMA,
/// F16C).
pub(super) unsafe fn rows<B: Nibbles>(w: &[B], y: &[B::A], out: &mut [f32]) {
    let bpr = y.len();
    if bpr == 0 {
        return out.fill(0.0);
    }
    with_groups(bpr.div_ceil(4), |g| {
        prepare(y, offset::<Vnni, B>(), g);
        // SAFETY: the caller's CPU check.
        unsafe { rows_with::<B>(w, bpr, g, out) }
    })
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
unsafe fn rows_with<B: Nibbles>(w: &[B], bpr: usize, g: &[Group], out: &mut [f32]) {
    let p = Perms::new::<B>();
    streams(w, bpr, |x| dot::<B>(x, g, &p), out)
}
