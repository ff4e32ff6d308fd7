//! Prefill's tile for Q4_K and Q5_K: as `panel.rs` does for the legacy formats, eight weight
//! rows' super-blocks are transposed into a [`KPanel`] so that one `vpmaddubsw` takes four
//! values of all eight rows against the same four values of a token (broadcast). Each
//! 16-value half sub-block's sums are then scaled by the eight rows' sub-block scales in one
//! `vpmaddwd`, where the row-at-a-time body (`k4_sums`) spends one per 32 values, row and
//! token; four tokens share each weight load.
//!
//! Same bits as decode: the integer totals (Σ sc·q·q8 and Σ min·bsum per super-block) are
//! exact in any order, and each (row, token) then takes `k_epilogue`'s two f32 multiply-adds
//! per super-block in its order, lane r of a vector being row r.

use super::panel::transpose;
use super::{k4_unpack, KBlock, K4};
use crate::quant::{BlockQ8K, QK_K};
use core::arch::x86_64::*;
use std::cell::RefCell;

/// Weight rows per panel.
const ROWS: usize = 8;
/// Tokens per pass over a panel.
const TOKENS: usize = 4;

/// One super-block of eight weight rows, transposed.
#[derive(Clone, Copy)]
#[repr(C, align(32))]
pub(super) struct KPanel {
    /// `w[8c + i]`: values 32c + 4i .. +4 of rows 0..8 (sub-block c, group i), four bytes per
    /// row.
    w: [[u8; 32]; 64],
    /// `sc[c]`: sub-block c's scale of row r in i16 lanes 2r and 2r + 1.
    sc: [[i16; 16]; 8],
    /// `mn[p]`: the mins of sub-blocks 2p and 2p + 1 of row r in i16 lanes 2r and 2r + 1.
    mn: [[i16; 16]; 4],
    /// The rows' d, and their -dmin.
    d: [f32; 8],
    ndmin: [f32; 8],
}

const EMPTY: KPanel = KPanel {
    w: [[0; 32]; 64],
    sc: [[0; 16]; 8],
    mn: [[0; 16]; 4],
    d: [0.0; 8],
    ndmin: [0.0; 8],
};

thread_local! {
    /// The panels of the rows in flight; grows to the longest row seen.
    static PANELS: RefCell<Vec<KPanel>> = const { RefCell::new(Vec::new()) };
}

/// Rows 0..8 of `w` (`bpr` super-blocks each) as `bpr` panels in `out`.
#[inline(always)]
unsafe fn pack<B: K4 + KBlock>(w: &[B], bpr: usize, out: &mut [KPanel]) {
    for (b, p) in out.iter_mut().enumerate() {
        for j in 0..QK_K / 64 {
            // Values 64j.. and 64j + 32..: sub-blocks 2j and 2j + 1.
            let mut lo = [_mm256_setzero_si256(); ROWS];
            let mut hi = [_mm256_setzero_si256(); ROWS];
            for r in 0..ROWS {
                (lo[r], hi[r]) = w[r * bpr + b].values(j);
            }
            transpose(&mut lo);
            transpose(&mut hi);
            for i in 0..8 {
                _mm256_store_si256(p.w[16 * j + i].as_mut_ptr() as *mut __m256i, lo[i]);
                _mm256_store_si256(p.w[16 * j + 8 + i].as_mut_ptr() as *mut __m256i, hi[i]);
            }
        }
        for r in 0..ROWS {
            let x = &w[r * bpr + b];
            let u = k4_unpack(x.head().2);
            let sc = (u[0] as u64 | (u[1] as u64) << 32).to_le_bytes();
            let mn = (u[2] as u64 | (u[3] as u64) << 32).to_le_bytes();
            for c in 0..8 {
                p.sc[c][2 * r] = sc[c] as i16;
                p.sc[c][2 * r + 1] = sc[c] as i16;
            }
            for q in 0..4 {
                p.mn[q][2 * r] = mn[2 * q] as i16;
                p.mn[q][2 * r + 1] = mn[2 * q + 1] as i16;
            }
            let (d, dmin) = x.scales();
            p.d[r] = d;
            p.ndmin[r] = -dmin;
        }
    }
}

#[inline(always)]
unsafe fn load(p: &[u8; 32]) -> __m256i {
    _mm256_load_si256(p.as_ptr() as *const __m256i)
}

/// `N` tokens' blocks (`ys[t]`: a row of them) against the eight rows of `panels`: each
/// token's outputs added into `acc[t]`, row r in lane r.
#[inline(always)]
unsafe fn tokens<const N: usize>(panels: &[KPanel], ys: [&[BlockQ8K]; N], acc: &mut [__m256; N]) {
    for (b, p) in panels.iter().enumerate() {
        let mut main = [_mm256_setzero_si256(); N];
        for c in 0..8 {
            let sc = _mm256_load_si256(p.sc[c].as_ptr() as *const __m256i);
            for h in 0..2 {
                // Values ≤ 31 and |q8| ≤ 127: a `vpmaddubsw` pair is ≤ 7874, four fit an i16.
                let mut s = [_mm256_setzero_si256(); N];
                for i in 4 * h..4 * h + 4 {
                    let w = load(&p.w[8 * c + i]);
                    for t in 0..N {
                        let q = ys[t][b].qs.as_ptr().add(32 * c + 4 * i) as *const i32;
                        let y = _mm256_set1_epi32(q.read_unaligned());
                        s[t] = _mm256_add_epi16(s[t], _mm256_maddubs_epi16(w, y));
                    }
                }
                for t in 0..N {
                    main[t] = _mm256_add_epi32(main[t], _mm256_madd_epi16(s[t], sc));
                }
            }
        }
        for t in 0..N {
            let y = &ys[t][b];
            // Σ min·(the 32-value sums, two 16-value bsums each), two sub-blocks per vpmaddwd.
            let mut mn = _mm256_setzero_si256();
            for q in 0..4 {
                let b0 = y.bsums[4 * q].wrapping_add(y.bsums[4 * q + 1]);
                let b1 = y.bsums[4 * q + 2].wrapping_add(y.bsums[4 * q + 3]);
                let pair = (b0 as u16 as u32 | (b1 as u16 as u32) << 16) as i32;
                let m = _mm256_load_si256(p.mn[q].as_ptr() as *const __m256i);
                mn = _mm256_add_epi32(mn, _mm256_madd_epi16(m, _mm256_set1_epi32(pair)));
            }
            // `k_epilogue`: acc = fma(-dmin·dy, Σmin, acc), then fma(d·dy, Σmain, acc).
            let dy = _mm256_set1_ps(y.d);
            let dn = _mm256_mul_ps(_mm256_load_ps(p.ndmin.as_ptr()), dy);
            acc[t] = _mm256_fmadd_ps(dn, _mm256_cvtepi32_ps(mn), acc[t]);
            let dd = _mm256_mul_ps(_mm256_load_ps(p.d.as_ptr()), dy);
            acc[t] = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(main[t]), acc[t]);
        }
    }
}

/// `out` (n, rows) = the n token rows of `a` (`bpr` super-blocks each) × the rows of `w`,
/// eight rows at a time through panels; the last `rows % 8` rows by the one-row dot (the same
/// bits).
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C.
pub(super) unsafe fn tile<B: K4 + KBlock>(w: &[B], a: &[BlockQ8K], n: usize, out: &mut [f32]) {
    crate::with_scratch(&PANELS, Vec::new, |panels| {
        // SAFETY: the caller's CPU check.
        unsafe { tile_with(w, a, n, out, panels) }
    })
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_with<B: K4 + KBlock>(
    w: &[B],
    a: &[BlockQ8K],
    n: usize,
    out: &mut [f32],
    panels: &mut Vec<KPanel>,
) {
    let bpr = a.len() / n;
    let rows = out.len() / n;
    let whole = rows - rows % ROWS;
    let at = |t: usize| &a[t * bpr..(t + 1) * bpr];
    panels.resize(bpr, EMPTY);
    for r0 in (0..whole).step_by(ROWS) {
        pack::<B>(&w[r0 * bpr..(r0 + ROWS) * bpr], bpr, panels);
        let mut t = 0;
        while t < n {
            let mut acc = [_mm256_setzero_ps(); TOKENS];
            let k = if t + TOKENS <= n {
                let ys = [at(t), at(t + 1), at(t + 2), at(t + 3)];
                tokens::<TOKENS>(panels, ys, &mut acc);
                TOKENS
            } else {
                let mut one = [acc[0]];
                tokens::<1>(panels, [at(t)], &mut one);
                acc[0] = one[0];
                1
            };
            for (i, v) in acc.iter().take(k).enumerate() {
                let o = &mut out[(t + i) * rows + r0..(t + i) * rows + r0 + ROWS];
                _mm256_storeu_ps(o.as_mut_ptr(), *v);
            }
            t += k;
        }
    }
    for r in whole..rows {
        let x = &w[r * bpr..(r + 1) * bpr];
        for t in 0..n {
            out[t * rows + r] = super::dot_k1(x, at(t));
        }
    }
}
