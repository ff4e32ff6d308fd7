//! Prefill's tile for the legacy formats (Q8_0, Q4_0, Q5_0, Q4_1, Q5_1): weight rows eight at a
//! time, each block of the eight transposed once into a small [`Panel`] so that one multiply
//! takes four values of all eight rows against the same four values of one token (broadcast),
//! and the eight rows' sums land in the lanes of one vector.
//!
//! Why: the row-at-a-time body (`legacy::dot_n`) multiplies 32 values of one row per
//! instruction and must then fold each block's partial sums across lanes (`fold4`: nine
//! shuffles and adds per four blocks and token). Here no lane crosses: per block, token and
//! eight rows there are 8 `vpmaddubsw`, 6 adds and 2 `vpmaddwd` (Q4/Q5), then the f32 steps.
//! llama.cpp repacks Q4_0 this way once, at load time, into a second copy of the weights; a
//! panel is only the tile in flight (eight rows, 20 KiB per 2048 columns), rebuilt from
//! the file's blocks while every token of the batch passes over it.
//!
//! Same bits as decode: each (row, token) sum takes `dot_n`'s f32 steps in its order. Lane j of
//! `dot_n`'s accumulator (block 4g + j mod 4, values 0..16 for j < 4, 16..32 after) is vector
//! `acc[j]` here, whose lane r is row r, and the final reduction is `hsum`'s, vector by vector.
//! The integer sums are exact either way. So a token's outputs keep the bits of its lone
//! decode (issue 12), as `tests/quant.rs` checks.

use super::legacy::{head, offset, scales, Group, Legacy, Mul};
use core::arch::x86_64::*;
use std::cell::RefCell;

/// Weight rows per panel.
pub(super) const ROWS: usize = 8;

/// One block of eight weight rows, transposed.
#[derive(Clone, Copy)]
#[repr(C, align(32))]
pub(super) struct Panel {
    /// `w[i]`: values 4i..4i+4 of rows 0..8, four bytes per row, as the loop multiplies them
    /// (the format's unsigned bytes; Q8_0's signed ones, or q + 128 under VNNI).
    w: [[u8; 32]; 8],
    /// The rows' d.
    d: [f32; 8],
    /// The rows' m (Q4_1, Q5_1; zero otherwise).
    m: [f32; 8],
}

const EMPTY: Panel = Panel {
    w: [[0; 32]; 8],
    d: [0.0; 8],
    m: [0.0; 8],
};

thread_local! {
    /// The panels of the rows in flight; grows to the longest row seen.
    static PANELS: RefCell<Vec<Panel>> = const { RefCell::new(Vec::new()) };
}

/// The 8×8 transpose of 32-bit elements: `v[r]` dword i becomes `v[i]` dword r.
#[inline(always)]
pub(super) unsafe fn transpose(v: &mut [__m256i; 8]) {
    let t: [__m256i; 8] = std::array::from_fn(|i| {
        let (a, b) = (v[i & !1], v[i | 1]);
        if i % 2 == 0 {
            _mm256_unpacklo_epi32(a, b) // [a0 b0 a1 b1 | a4 b4 a5 b5]
        } else {
            _mm256_unpackhi_epi32(a, b) // [a2 b2 a3 b3 | a6 b6 a7 b7]
        }
    });
    // u[4q + k]: dword k (and k + 4 in the high lane) of rows 4q..4q+4.
    let mut u = [_mm256_setzero_si256(); 8];
    for q in 0..2 {
        let (lo01, hi01, lo23, hi23) = (t[4 * q], t[4 * q + 1], t[4 * q + 2], t[4 * q + 3]);
        u[4 * q] = _mm256_unpacklo_epi64(lo01, lo23);
        u[4 * q + 1] = _mm256_unpackhi_epi64(lo01, lo23);
        u[4 * q + 2] = _mm256_unpacklo_epi64(hi01, hi23);
        u[4 * q + 3] = _mm256_unpackhi_epi64(hi01, hi23);
    }
    for k in 0..4 {
        v[k] = _mm256_permute2x128_si256::<0x20>(u[k], u[4 + k]);
        v[k + 4] = _mm256_permute2x128_si256::<0x31>(u[k], u[4 + k]);
    }
}

/// Rows 0..8 of `w` (`bpr` blocks each) as `bpr` panels in `out`.
#[inline(always)]
unsafe fn pack<M: Mul, B: Legacy>(w: &[B], bpr: usize, out: &mut [Panel]) {
    for (b, p) in out.iter_mut().enumerate() {
        let mut v = [_mm256_setzero_si256(); 8];
        let mut h = [0u64; 8];
        for r in 0..ROWS {
            let x = &w[r * bpr + b];
            v[r] = x.values();
            if B::SIGNED && M::WIDE {
                v[r] = _mm256_xor_si256(v[r], _mm256_set1_epi8(-128));
            }
            h[r] = head(x);
        }
        transpose(&mut v);
        for (i, v) in v.iter().enumerate() {
            _mm256_store_si256(p.w[i].as_mut_ptr() as *mut __m256i, *v);
        }
        let (d0, m0) = scales::<B>([h[0], h[1], h[2], h[3]]);
        let (d1, m1) = scales::<B>([h[4], h[5], h[6], h[7]]);
        let d = _mm256_set_m128(_mm256_castps256_ps128(d1), _mm256_castps256_ps128(d0));
        _mm256_store_ps(p.d.as_mut_ptr(), d);
        _mm256_store_ps(p.m.as_mut_ptr(), _mm256_set_m128(m1, m0));
    }
}

/// Four activation bytes in every 32-bit lane (one broadcast load).
#[inline(always)]
unsafe fn broadcast(y: &[i8]) -> __m256i {
    debug_assert!(y.len() >= 4);
    // SAFETY: four bytes inside `y`; unaligned read.
    _mm256_set1_epi32((y.as_ptr() as *const i32).read_unaligned())
}

/// The eight rows' sums over values 16h..16h+16 of the block times each of `T` tokens' `ys`
/// (each weight vector loaded once for the T).
#[inline(always)]
unsafe fn half<M: Mul, B: Legacy, const T: usize>(
    p: &Panel,
    h: usize,
    ys: [&[i8; 32]; T],
) -> [__m256i; T] {
    // (No closures: one would not get the caller's target features, and its intrinsics would
    // not inline.)
    let mut s = [_mm256_setzero_si256(); T];
    for g in 4 * h..4 * h + 4 {
        let w = _mm256_load_si256(p.w[g].as_ptr() as *const __m256i);
        for t in 0..T {
            let y = broadcast(&ys[t][4 * g..]);
            s[t] = if !B::SIGNED && !M::WIDE {
                // Values ≤ 31 and |y| ≤ 127: a `vpmaddubsw` pair is ≤ 7874, four of them fit i16.
                _mm256_add_epi16(s[t], _mm256_maddubs_epi16(w, y))
            } else if B::SIGNED && !M::WIDE {
                // The sign trick, as `dot_n`: |w| times y with w's sign.
                M::us8_add(s[t], _mm256_sign_epi8(w, w), _mm256_sign_epi8(y, w))
            } else {
                M::us8_add(s[t], w, y)
            };
        }
    }
    if !B::SIGNED && !M::WIDE {
        for s in &mut s {
            *s = _mm256_madd_epi16(*s, _mm256_set1_epi16(1));
        }
    }
    s
}

/// A token's accumulators: `dot_n`'s lanes j and 4 + j (`acc`), and j (`accm`), each as a
/// vector whose lane r is row r.
#[derive(Clone, Copy)]
struct Acc {
    acc: [__m256; 8],
    accm: [__m256; 4],
}

/// Block `j` of a group (`p`: its panel; `grs`: the T tokens' groups) into each token's
/// accumulators.
#[inline(always)]
unsafe fn block<M: Mul, B: Legacy, const T: usize>(
    p: &Panel,
    grs: [&Group; T],
    j: usize,
    a: &mut [Acc; T],
) {
    let lo = half::<M, B, T>(p, 0, grs.map(|gr| &gr.qs[j]));
    let hi = half::<M, B, T>(p, 1, grs.map(|gr| &gr.qs[j]));
    for t in 0..T {
        let (gr, a) = (grs[t], &mut a[t]);
        let mut lo = lo[t];
        if offset::<M, B>() != 0 {
            lo = _mm256_sub_epi32(lo, _mm256_set1_epi32(gr.corr[j]));
        }
        let sc = _mm256_mul_ps(_mm256_load_ps(p.d.as_ptr()), _mm256_set1_ps(gr.dy[j]));
        a.acc[j] = _mm256_fmadd_ps(sc, _mm256_cvtepi32_ps(lo), a.acc[j]);
        a.acc[4 + j] = _mm256_fmadd_ps(sc, _mm256_cvtepi32_ps(hi[t]), a.acc[4 + j]);
        if B::MIN {
            let m = _mm256_load_ps(p.m.as_ptr());
            a.accm[j] = _mm256_fmadd_ps(m, _mm256_set1_ps(gr.s[j]), a.accm[j]);
        }
    }
}

/// `T` tokens (`gs`: their groups) against the eight rows of `panels`: for each token, row r's
/// output in lane r. The tokens share each panel load; each token's steps are `dot_n`'s.
#[inline(always)]
unsafe fn tokens<M: Mul, B: Legacy, const T: usize>(
    panels: &[Panel],
    gs: [&[Group]; T],
) -> [__m256; T] {
    let zero = Acc {
        acc: [_mm256_setzero_ps(); 8],
        accm: [_mm256_setzero_ps(); 4],
    };
    let mut a = [zero; T];
    let (full, rest) = panels.as_chunks::<4>();
    for (i, p4) in full.iter().enumerate() {
        let grs = gs.map(|g| &g[i]);
        // Written out: a loop over j was left rolled, and the accumulators it indexes went to
        // the stack (a store-to-load chain per block).
        block::<M, B, T>(&p4[0], grs, 0, &mut a);
        block::<M, B, T>(&p4[1], grs, 1, &mut a);
        block::<M, B, T>(&p4[2], grs, 2, &mut a);
        block::<M, B, T>(&p4[3], grs, 3, &mut a);
    }
    // `dot_n` adds zeros for the blocks missing from the last group, which leave its lanes as
    // they are (an accumulator that starts at +0 never holds -0), so they are skipped. Constant
    // indices keep the accumulators in registers.
    if !rest.is_empty() {
        let grs = gs.map(|g| &g[full.len()]);
        block::<M, B, T>(&rest[0], grs, 0, &mut a);
        if rest.len() > 1 {
            block::<M, B, T>(&rest[1], grs, 1, &mut a);
        }
        if rest.len() > 2 {
            block::<M, B, T>(&rest[2], grs, 2, &mut a);
        }
    }
    // `hsum`: ((v0 + v4) + (v2 + v6)) + ((v1 + v5) + (v3 + v7)); `hsum4`: (m0 + m2) + (m1 + m3).
    a.map(|Acc { acc, accm }| {
        let a: [__m256; 4] = std::array::from_fn(|i| _mm256_add_ps(acc[i], acc[4 + i]));
        let s = _mm256_add_ps(_mm256_add_ps(a[0], a[2]), _mm256_add_ps(a[1], a[3]));
        if B::MIN {
            let m = _mm256_add_ps(
                _mm256_add_ps(accm[0], accm[2]),
                _mm256_add_ps(accm[1], accm[3]),
            );
            _mm256_add_ps(s, m)
        } else {
            s
        }
    })
}

/// `f` with this thread's panel buffer.
pub(super) fn with_panels<R>(f: impl FnOnce(&mut Vec<Panel>) -> R) -> R {
    crate::with_scratch(&PANELS, Vec::new, f)
}

/// `out` (n, rows) = the n tokens (`g`: `ng` groups each) × the rows of `w` (`bpr` blocks
/// each) from row `first` on (the rows before are done, by `panel512.rs`), eight rows at a
/// time through `panels`; the last `rows % 8` rows by `one` (`dot_n` for one row, which gives
/// the same bits). Inlined into the callers' `#[target_feature]`
/// functions: nothing here may sit in a closure, which would not get their features.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn tile<M: Mul, B: Legacy>(
    w: &[B],
    bpr: usize,
    g: &[Group],
    n: usize,
    ng: usize,
    out: &mut [f32],
    first: usize,
    panels: &mut Vec<Panel>,
    one: impl Fn(&[B], &[Group]) -> f32,
) {
    let rows = out.len() / n;
    let whole = rows - (rows - first) % ROWS;
    panels.resize(bpr, EMPTY);
    for r0 in (first..whole).step_by(ROWS) {
        pack::<M, B>(&w[r0 * bpr..(r0 + ROWS) * bpr], bpr, panels);
        let at = |t: usize| &g[t * ng..(t + 1) * ng];
        let mut t = 0;
        // Token pairs where there are registers for both sets of accumulators (AVX-512's 32):
        // each panel load then serves two tokens, and loads, not multiplies, bound this loop.
        while M::WIDE && t + 2 <= n {
            let v = tokens::<M, B, 2>(panels, [at(t), at(t + 1)]);
            for (i, v) in v.into_iter().enumerate() {
                let o = &mut out[(t + i) * rows + r0..(t + i) * rows + r0 + ROWS];
                _mm256_storeu_ps(o.as_mut_ptr(), v);
            }
            t += 2;
        }
        for t in t..n {
            let [v] = tokens::<M, B, 1>(panels, [at(t)]);
            let o = &mut out[t * rows + r0..t * rows + r0 + ROWS];
            _mm256_storeu_ps(o.as_mut_ptr(), v);
        }
    }
    for r in whole..rows {
        let x = &w[r * bpr..(r + 1) * bpr];
        for t in 0..n {
            out[t * rows + r] = one(x, &g[t * ng..(t + 1) * ng]);
        }
    }
}
