//! Prefill's tile for the k-quants (Q4_K, Q5_K, Q6_K): as `panel.rs` does for the legacy
//! formats, eight weight rows' super-blocks are transposed into a [`KPanel`] so that one
//! `vpmaddubsw` takes four values of all eight rows against the same four values of a token
//! (broadcast). The i16 sums of each run of values (16 for Q4_K / Q5_K, 8 for Q6_K, whose
//! larger values fill an i16 sooner) are then scaled by the eight rows' sub-block scales in
//! one `vpmaddwd`, where the row-at-a-time bodies spend one per 32 values, row and token;
//! four tokens share each weight load.
//!
//! Same bits as decode: the integer totals per super-block (Σ sc·q·q8 and Q4_K / Q5_K's
//! Σ min·bsum, or Q6_K's Σ sc·(q + 32)·q8 - 32·Σ sc·bsum) are exact in any order, and each
//! (row, token) then takes `k_epilogue`'s f32 multiply-adds per super-block in its order,
//! lane r of a vector being row r.

use super::panel::transpose;
use super::{k4_unpack, q6_values, KBlock, K4};
use crate::quant::{BlockQ4K, BlockQ5K, BlockQ6K, BlockQ8K, QK_K};
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
    /// `w[8c + i]`: values 32c + 4i .. +4 of rows 0..8 (four bytes per row), unsigned as the
    /// format stores them.
    w: [[u8; 32]; 64],
    /// `sc[v]`: the scale of values 16v..16v + 16 of row r in i16 lanes 2r and 2r + 1.
    sc: [[i16; 16]; 16],
    /// `mn[p]`: row r's two factors in i16 lanes 2r, 2r + 1 for pair p of the activations'
    /// sums: Q4_K / Q5_K the mins of sub-blocks 2p, 2p + 1 (p < 4); Q6_K the scales of
    /// 16-value blocks 2p, 2p + 1.
    mn: [[i16; 16]; 8],
    /// The rows' d, and their -dmin (Q4_K / Q5_K).
    d: [f32; 8],
    ndmin: [f32; 8],
}

const EMPTY: KPanel = KPanel {
    w: [[0; 32]; 64],
    sc: [[0; 16]; 16],
    mn: [[0; 16]; 8],
    d: [0.0; 8],
    ndmin: [0.0; 8],
};

thread_local! {
    /// The panels of the rows in flight; grows to the longest row seen.
    static PANELS: RefCell<Vec<KPanel>> = const { RefCell::new(Vec::new()) };
}

/// A k-quant super-block as a panel holds it.
pub(super) trait Paneled: KBlock {
    /// Groups of four values whose `vpmaddubsw` sums fit an i16 before `vpmaddwd` scales them
    /// (|q8| ≤ 127: values ≤ 31 give pairs ≤ 7874, four fit; ≤ 63 give ≤ 16002, two fit).
    const RUN: usize;
    /// Values 32c..32c + 32 (c = 0..8) as unsigned bytes.
    unsafe fn chunks(&self) -> [__m256i; 8];
    /// Row `r`'s scales, mins or sums' factors, d and -dmin into `p`.
    fn fill(&self, r: usize, p: &mut KPanel);
}

#[inline(always)]
unsafe fn k4_chunks<B: K4>(x: &B) -> [__m256i; 8] {
    let mut c = [_mm256_setzero_si256(); 8];
    for j in 0..QK_K / 64 {
        (c[2 * j], c[2 * j + 1]) = x.values(j);
    }
    c
}

#[inline(always)]
fn k4_fill<B: K4 + KBlock>(x: &B, r: usize, p: &mut KPanel) {
    let u = k4_unpack(x.head().2);
    let sc = (u[0] as u64 | (u[1] as u64) << 32).to_le_bytes();
    let mn = (u[2] as u64 | (u[3] as u64) << 32).to_le_bytes();
    for v in 0..16 {
        p.sc[v][2 * r] = sc[v / 2] as i16;
        p.sc[v][2 * r + 1] = sc[v / 2] as i16;
    }
    for q in 0..4 {
        p.mn[q][2 * r] = mn[2 * q] as i16;
        p.mn[q][2 * r + 1] = mn[2 * q + 1] as i16;
    }
    // SAFETY: plain f16 conversions (F16C: the callers' CPU check).
    let (d, dmin) = unsafe { x.scales() };
    p.d[r] = d;
    p.ndmin[r] = -dmin;
}

macro_rules! k4_paneled {
    ($B:ty, $run:expr) => {
        impl Paneled for $B {
            const RUN: usize = $run;
            #[inline(always)]
            unsafe fn chunks(&self) -> [__m256i; 8] {
                k4_chunks(self)
            }
            #[inline(always)]
            fn fill(&self, r: usize, p: &mut KPanel) {
                k4_fill(self, r, p)
            }
        }
    };
}
k4_paneled!(BlockQ4K, 4);
k4_paneled!(BlockQ5K, 4);

impl Paneled for BlockQ6K {
    const RUN: usize = 2;
    #[inline(always)]
    unsafe fn chunks(&self) -> [__m256i; 8] {
        let (a, b) = (q6_values(self, 0), q6_values(self, 1));
        [a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3]]
    }
    #[inline(always)]
    fn fill(&self, r: usize, p: &mut KPanel) {
        for v in 0..16 {
            p.sc[v][2 * r] = self.scales[v] as i16;
            p.sc[v][2 * r + 1] = self.scales[v] as i16;
        }
        for q in 0..8 {
            p.mn[q][2 * r] = self.scales[2 * q] as i16;
            p.mn[q][2 * r + 1] = self.scales[2 * q + 1] as i16;
        }
        // SAFETY: as in `k4_fill`.
        p.d[r] = unsafe { self.scales().0 };
    }
}

/// Rows 0..8 of `w` (`bpr` super-blocks each) as `bpr` panels in `out`.
#[inline(always)]
unsafe fn pack<B: Paneled>(w: &[B], bpr: usize, out: &mut [KPanel]) {
    for (b, p) in out.iter_mut().enumerate() {
        let mut v: [[__m256i; 8]; ROWS] = [[_mm256_setzero_si256(); 8]; ROWS];
        for (r, v) in v.iter_mut().enumerate() {
            *v = w[r * bpr + b].chunks();
            w[r * bpr + b].fill(r, p);
        }
        for c in 0..8 {
            let mut t: [__m256i; ROWS] = std::array::from_fn(|r| v[r][c]);
            transpose(&mut t);
            for (i, t) in t.iter().enumerate() {
                _mm256_store_si256(p.w[8 * c + i].as_mut_ptr() as *mut __m256i, *t);
            }
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
unsafe fn tokens<B: Paneled, const N: usize>(
    panels: &[KPanel],
    ys: [&[BlockQ8K]; N],
    acc: &mut [__m256; N],
) {
    for (b, p) in panels.iter().enumerate() {
        let mut main = [_mm256_setzero_si256(); N];
        for v in 0..16 {
            // Values 16v..16v + 16 (groups 4v..4v + 4), one scale per row.
            let sc = _mm256_load_si256(p.sc[v].as_ptr() as *const __m256i);
            for g0 in (4 * v..4 * v + 4).step_by(B::RUN) {
                let mut s = [_mm256_setzero_si256(); N];
                for g in g0..g0 + B::RUN {
                    let w = load(&p.w[g]);
                    for t in 0..N {
                        let q = ys[t][b].qs.as_ptr().add(4 * g) as *const i32;
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
            let bs = &y.bsums;
            let dy = _mm256_set1_ps(y.d);
            if B::MINS {
                // Σ min·(each sub-block's 32-value sum, two bsums), two sub-blocks per madd.
                let mut mn = _mm256_setzero_si256();
                for q in 0..4 {
                    let b0 = bs[4 * q].wrapping_add(bs[4 * q + 1]); // |·| ≤ 32·127
                    let b1 = bs[4 * q + 2].wrapping_add(bs[4 * q + 3]);
                    let pair = (b0 as u16 as u32 | (b1 as u16 as u32) << 16) as i32;
                    let m = _mm256_load_si256(p.mn[q].as_ptr() as *const __m256i);
                    mn = _mm256_add_epi32(mn, _mm256_madd_epi16(m, _mm256_set1_epi32(pair)));
                }
                // `k_epilogue`: acc = fma(-dmin·dy, Σmin, acc), then fma(d·dy, Σmain, acc).
                let dn = _mm256_mul_ps(_mm256_load_ps(p.ndmin.as_ptr()), dy);
                acc[t] = _mm256_fmadd_ps(dn, _mm256_cvtepi32_ps(mn), acc[t]);
            } else {
                // Q6_K's values are q + 32: take 32·Σ sc·bsum off.
                let mut c = _mm256_setzero_si256();
                for q in 0..8 {
                    let pair =
                        (bs[2 * q] as u16 as u32 | (bs[2 * q + 1] as u16 as u32) << 16) as i32;
                    let m = _mm256_load_si256(p.mn[q].as_ptr() as *const __m256i);
                    c = _mm256_add_epi32(c, _mm256_madd_epi16(m, _mm256_set1_epi32(pair)));
                }
                main[t] = _mm256_sub_epi32(main[t], _mm256_slli_epi32::<5>(c));
            }
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
pub(super) unsafe fn tile<B: Paneled>(w: &[B], a: &[BlockQ8K], n: usize, out: &mut [f32]) {
    crate::with_scratch(&PANELS, Vec::new, |panels| {
        // SAFETY: the caller's CPU check.
        unsafe { tile_with(w, a, n, out, panels) }
    })
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_with<B: Paneled>(
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
                tokens::<B, TOKENS>(panels, ys, &mut acc);
                TOKENS
            } else {
                let mut one = [acc[0]];
                tokens::<B, 1>(panels, [at(t)], &mut one);
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
