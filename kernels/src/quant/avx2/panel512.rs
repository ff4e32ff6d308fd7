//! Prefill's legacy tile on the AVX-512 VNNI tier: `panel.rs`'s panels sixteen rows wide, one
//! 512-bit `vpdpbusd` per four values of sixteen rows and a token.
//!
//! Why: on Zen 5 (full-width 512-bit units) the 256-bit panels ran `vpdpbusd` at half the
//! width the core has; a 512-bit one does twice the work per instruction (on Zen 4 and Sapphire
//! Rapids the same work per cycle, in half the instructions). TinyLlama Q4_0 prefill of 512
//! tokens on a 2-vCPU Zen 5, three alternating rounds: 183-187 tok/s with the eight-row
//! panels one token per pass, 219-223 with two tokens per pass, 338-365 with these (llama.cpp
//! 265-280 at 128 tokens in the same session).
//!
//! Same bits as `panel.rs` and decode: lane r of every vector is row r, and each lane takes
//! exactly the steps of the 256-bit panel's lane (exact integer sums, then the same mul, convert
//! and FMA in the same order, and `hsum`'s final reduction vector by vector).

use super::legacy::{head, offset, scales, Group, Legacy, Vnni};
use super::panel::transpose;
use core::arch::x86_64::*;
use std::cell::RefCell;

/// Weight rows per panel.
pub(super) const ROWS: usize = 16;

/// One block of sixteen weight rows, transposed.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub(super) struct Panel {
    /// `w[i]`: values 4i..4i+4 of rows 0..16, four bytes per row (q + OFFSET; Q8_0's q + 128).
    w: [[u8; 64]; 8],
    /// The rows' d.
    d: [f32; 16],
    /// The rows' m (Q4_1, Q5_1; zero otherwise).
    m: [f32; 16],
}

const EMPTY: Panel = Panel {
    w: [[0; 64]; 8],
    d: [0.0; 16],
    m: [0.0; 16],
};

thread_local! {
    /// The panels of the rows in flight; grows to the longest row seen.
    static PANELS: RefCell<Vec<Panel>> = const { RefCell::new(Vec::new()) };
}

/// Rows 0..16 of `w` (`bpr` blocks each) as `bpr` panels in `out`: each half of eight rows
/// through the 256-bit panel's 8×8 transpose into one half of the 512-bit vectors.
#[inline(always)]
unsafe fn pack<B: Legacy>(w: &[B], bpr: usize, out: &mut [Panel]) {
    for (b, p) in out.iter_mut().enumerate() {
        for half in 0..2 {
            let mut v = [_mm256_setzero_si256(); 8];
            let mut h = [0u64; 8];
            for r in 0..8 {
                let x = &w[(8 * half + r) * bpr + b];
                v[r] = x.values();
                if B::SIGNED {
                    v[r] = _mm256_xor_si256(v[r], _mm256_set1_epi8(-128));
                }
                h[r] = head(x);
            }
            transpose(&mut v);
            for (i, v) in v.iter().enumerate() {
                _mm256_store_si256(p.w[i][32 * half..].as_mut_ptr() as *mut __m256i, *v);
            }
            for q in 0..2 {
                let (d, m) = scales::<B>([h[4 * q], h[4 * q + 1], h[4 * q + 2], h[4 * q + 3]]);
                let at = 8 * half + 4 * q;
                _mm_storeu_ps(p.d[at..].as_mut_ptr(), _mm256_castps256_ps128(d));
                _mm_storeu_ps(p.m[at..].as_mut_ptr(), m);
            }
        }
    }
}

/// The sixteen rows' sums over values 16h..16h+16 of the block times each of `T` tokens' `ys`.
#[inline(always)]
unsafe fn half<B: Legacy, const T: usize>(p: &Panel, h: usize, ys: [&[i8; 32]; T]) -> [__m512i; T] {
    let mut s = [_mm512_setzero_si512(); T];
    for g in 4 * h..4 * h + 4 {
        let w = _mm512_load_si512(p.w[g].as_ptr() as *const __m512i);
        for t in 0..T {
            // SAFETY: four bytes inside the token's block; unaligned read.
            let y = (ys[t][4 * g..].as_ptr() as *const i32).read_unaligned();
            s[t] = _mm512_dpbusd_epi32(s[t], w, _mm512_set1_epi32(y));
        }
    }
    s
}

/// A token's accumulators: `dot_n`'s lanes j and 4 + j (`acc`), and j (`accm`), each as a
/// vector whose lane r is row r.
#[derive(Clone, Copy)]
struct Acc {
    acc: [__m512; 8],
    accm: [__m512; 4],
}

/// Block `j` of a group (`p`: its panel; `grs`: the T tokens' groups) into each token's
/// accumulators.
#[inline(always)]
unsafe fn block<B: Legacy, const T: usize>(
    p: &Panel,
    grs: [&Group; T],
    j: usize,
    a: &mut [Acc; T],
) {
    let lo = half::<B, T>(p, 0, grs.map(|gr| &gr.qs[j]));
    let hi = half::<B, T>(p, 1, grs.map(|gr| &gr.qs[j]));
    for t in 0..T {
        let (gr, a) = (grs[t], &mut a[t]);
        let mut lo = lo[t];
        if offset::<Vnni, B>() != 0 {
            lo = _mm512_sub_epi32(lo, _mm512_set1_epi32(gr.corr[j]));
        }
        let sc = _mm512_mul_ps(_mm512_load_ps(p.d.as_ptr()), _mm512_set1_ps(gr.dy[j]));
        a.acc[j] = _mm512_fmadd_ps(sc, _mm512_cvtepi32_ps(lo), a.acc[j]);
        a.acc[4 + j] = _mm512_fmadd_ps(sc, _mm512_cvtepi32_ps(hi[t]), a.acc[4 + j]);
        if B::MIN {
            let m = _mm512_load_ps(p.m.as_ptr());
            a.accm[j] = _mm512_fmadd_ps(m, _mm512_set1_ps(gr.s[j]), a.accm[j]);
        }
    }
}

/// `T` tokens (`gs`: their groups) against the sixteen rows of `panels`: for each token, row
/// r's output in lane r.
#[inline(always)]
unsafe fn tokens<B: Legacy, const T: usize>(panels: &[Panel], gs: [&[Group]; T]) -> [__m512; T] {
    let zero = Acc {
        acc: [_mm512_setzero_ps(); 8],
        accm: [_mm512_setzero_ps(); 4],
    };
    let mut a = [zero; T];
    let (full, rest) = panels.as_chunks::<4>();
    for (i, p4) in full.iter().enumerate() {
        let grs = gs.map(|g| &g[i]);
        // Written out, so that the accumulators stay in registers (see `panel.rs`).
        block::<B, T>(&p4[0], grs, 0, &mut a);
        block::<B, T>(&p4[1], grs, 1, &mut a);
        block::<B, T>(&p4[2], grs, 2, &mut a);
        block::<B, T>(&p4[3], grs, 3, &mut a);
    }
    // The last group's missing blocks are skipped, as in `panel.rs`.
    if !rest.is_empty() {
        let grs = gs.map(|g| &g[full.len()]);
        block::<B, T>(&rest[0], grs, 0, &mut a);
        if rest.len() > 1 {
            block::<B, T>(&rest[1], grs, 1, &mut a);
        }
        if rest.len() > 2 {
            block::<B, T>(&rest[2], grs, 2, &mut a);
        }
    }
    // `hsum`: ((v0 + v4) + (v2 + v6)) + ((v1 + v5) + (v3 + v7)); `hsum4`: (m0 + m2) + (m1 + m3).
    a.map(|Acc { acc, accm }| {
        let a: [__m512; 4] = std::array::from_fn(|i| _mm512_add_ps(acc[i], acc[4 + i]));
        let s = _mm512_add_ps(_mm512_add_ps(a[0], a[2]), _mm512_add_ps(a[1], a[3]));
        if B::MIN {
            let m = _mm512_add_ps(
                _mm512_add_ps(accm[0], accm[2]),
                _mm512_add_ps(accm[1], accm[3]),
            );
            _mm512_add_ps(s, m)
        } else {
            s
        }
    })
}

/// `f` with this thread's panel buffer.
pub(super) fn with_panels<R>(f: impl FnOnce(&mut Vec<Panel>) -> R) -> R {
    crate::with_scratch(&PANELS, Vec::new, f)
}

/// `out` (n, rows) = the n tokens (`g`: `ng` groups each) × the first `rows - rows % 16` rows
/// of `w` (`bpr` blocks each), sixteen rows and two tokens at a time. Returns the rows done;
/// `panel.rs` takes the rest. Inlined into the VNNI entry point (its target features), so
/// nothing here may sit in a closure.
#[inline(always)]
pub(super) unsafe fn tile<B: Legacy>(
    w: &[B],
    bpr: usize,
    g: &[Group],
    n: usize,
    ng: usize,
    out: &mut [f32],
    panels: &mut Vec<Panel>,
) -> usize {
    let rows = out.len() / n;
    let whole = rows - rows % ROWS;
    if whole == 0 {
        return 0;
    }
    panels.resize(bpr, EMPTY);
    for r0 in (0..whole).step_by(ROWS) {
        pack::<B>(&w[r0 * bpr..(r0 + ROWS) * bpr], bpr, panels);
        let mut t = 0;
        while t < n {
            // Two tokens share each panel load; a last odd one goes alone.
            let vs: [__m512; 2] = if t + 2 <= n {
                tokens::<B, 2>(
                    panels,
                    [&g[t * ng..(t + 1) * ng], &g[(t + 1) * ng..(t + 2) * ng]],
                )
            } else {
                let [v] = tokens::<B, 1>(panels, [&g[t * ng..(t + 1) * ng]]);
                [v, v]
            };
            for (i, v) in vs.into_iter().enumerate().take(n - t) {
                let o = &mut out[(t + i) * rows + r0..(t + i) * rows + r0 + ROWS];
                _mm512_storeu_ps(o.as_mut_ptr(), v);
            }
            t += 2;
        }
    }
    whole
}
