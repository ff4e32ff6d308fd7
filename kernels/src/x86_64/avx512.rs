//! AVX-512F/BW/VL tier: 16 lanes; f16 weights widen with `vcvtph2ps`, bf16 with a shift.
//!
//! Where the CPU has AVX-512 BF16, matmul with bf16 weights can use `vdpbf16ps` instead
//! (see [`bf16dot`]): the activations are rounded to bf16 (8 significant bits, relative error
//! ≤ 2^-9 per element) and products accumulate in f32. Each output then carries a relative
//! error of roughly 2^-9 · sqrt(k)·rms(w·x)/|y| — about 0.1-0.5% for k = 2048 — the same trade
//! llama.cpp makes for bf16 models (its vec_dot type for BF16 is BF16). Whether it is the
//! default is a fixed rule from the CPU (`bf16_dot_choice`: AMD only): it pays where
//! `vdpbf16ps` runs at twice the f32 FMA FLOP rate (Zen 4), not on Sapphire Rapids (about
//! half). `SPINFER_BF16_DOT` overrides it; each model's `Policy` picks per call. Matrix-vector products (decode) are
//! memory-bound and always exact.

use crate::simd::{MatmulJob, Simd, MC};
use crate::{Table, Weights};
use core::arch::x86_64::*;

#[derive(Clone, Copy)]
pub(crate) struct Avx512;

impl Simd for Avx512 {
    type V = __m512;
    const N: usize = 16;
    #[inline(always)]
    unsafe fn splat(self, x: f32) -> __m512 {
        _mm512_set1_ps(x)
    }
    #[inline(always)]
    unsafe fn load(self, p: *const f32) -> __m512 {
        _mm512_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32, v: __m512) {
        _mm512_storeu_ps(p, v)
    }
    #[inline(always)]
    unsafe fn load_f16(self, p: *const u16) -> __m512 {
        _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
    }
    #[inline(always)]
    unsafe fn load_bf16(self, p: *const u16) -> __m512 {
        let w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i));
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(w))
    }
    #[inline(always)]
    unsafe fn add(self, a: __m512, b: __m512) -> __m512 {
        _mm512_add_ps(a, b)
    }
    #[inline(always)]
    unsafe fn sub(self, a: __m512, b: __m512) -> __m512 {
        _mm512_sub_ps(a, b)
    }
    #[inline(always)]
    unsafe fn mul(self, a: __m512, b: __m512) -> __m512 {
        _mm512_mul_ps(a, b)
    }
    #[inline(always)]
    unsafe fn div(self, a: __m512, b: __m512) -> __m512 {
        _mm512_div_ps(a, b)
    }
    #[inline(always)]
    unsafe fn fma(self, a: __m512, b: __m512, c: __m512) -> __m512 {
        _mm512_fmadd_ps(a, b, c)
    }
    #[inline(always)]
    unsafe fn max(self, a: __m512, b: __m512) -> __m512 {
        _mm512_max_ps(a, b)
    }
    #[inline(always)]
    unsafe fn min(self, a: __m512, b: __m512) -> __m512 {
        _mm512_min_ps(a, b)
    }
    #[inline(always)]
    unsafe fn abs(self, a: __m512) -> __m512 {
        _mm512_abs_ps(a)
    }
    #[inline(always)]
    unsafe fn round(self, a: __m512) -> __m512 {
        _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(a)
    }
    #[inline(always)]
    unsafe fn pow2i(self, n: __m512) -> __m512 {
        let e = _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127));
        _mm512_castsi512_ps(_mm512_slli_epi32::<23>(e))
    }
    #[inline(always)]
    unsafe fn select_lt(self, a: __m512, b: __m512, t: __m512, f: __m512) -> __m512 {
        _mm512_mask_blend_ps(_mm512_cmp_ps_mask::<_CMP_LT_OQ>(a, b), f, t)
    }
    #[inline(always)]
    unsafe fn hsum(self, v: __m512) -> f32 {
        _mm512_reduce_add_ps(v)
    }
    #[inline(always)]
    unsafe fn hmax(self, v: __m512) -> f32 {
        _mm512_reduce_max_ps(v)
    }
}

/// The quantized kernels: the AVX2 bodies, with AVX-512 VNNI's `vpdpbusd` in the legacy
/// formats' bodies where the CPU has it (`quant/avx2.rs`).
mod quant {
    use crate::quant::{avx2, Acts};
    use crate::Weights;

    fn vnni() -> bool {
        is_x86_feature_detected!("avx512vnni")
    }

    // SAFETY (all four): the AVX-512 tier is only handed out where the CPU also has AVX2
    // (checked in `Isa::is_available`), FMA, F16C and AVX-512 F and VL; VNNI is checked here.
    pub(super) fn dot(w: Weights<'_>, a: Acts<'_>) -> f32 {
        unsafe {
            if vnni() {
                avx2::vec_dot::<true>(w, a)
            } else {
                avx2::vec_dot::<false>(w, a)
            }
        }
    }
    pub(super) fn dot4(w: Weights<'_>, a: [Acts<'_>; 4]) -> [f32; 4] {
        unsafe {
            if vnni() {
                avx2::vec_dot4::<true>(w, a)
            } else {
                avx2::vec_dot4::<false>(w, a)
            }
        }
    }
    pub(super) fn rows(w: Weights<'_>, a: Acts<'_>, y: &mut [f32]) {
        unsafe {
            if vnni() {
                avx2::matvec_rows::<true>(w, a, y)
            } else {
                avx2::matvec_rows::<false>(w, a, y)
            }
        }
    }
    pub(super) fn tile(w: Weights<'_>, a: Acts<'_>, n: usize, out: &mut [f32]) {
        unsafe {
            if vnni() {
                avx2::matmul_tile::<true>(w, a, n, out)
            } else {
                avx2::matmul_tile::<false>(w, a, n, out)
            }
        }
    }
}

mod plain {
    use super::{quant, Avx512};
    crate::simd::tier_table!(TABLE {
        simd: Avx512,
        attr: target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c"),
        op_tile: (6, 4),
        packed_tile: (12, 2),
        bf16_matmul: None,
        bf16_burn: None,
        quant_dot: quant::dot,
        quant_dot4: quant::dot4,
        quant_rows: quant::rows,
        quant_tile: quant::tile,
    });
}

mod with_bf16 {
    use super::{bf16dot, quant, Avx512};
    crate::simd::tier_table!(TABLE {
        simd: Avx512,
        attr: target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c"),
        op_tile: (6, 4),
        packed_tile: (12, 2),
        bf16_matmul: Some(crate::Bf16Mm {
            cvt: |x, o| unsafe { bf16dot::cvt(x, o) },
            mm: |j, a, b| unsafe { bf16dot::matmul_rows(j, a, b) },
        }),
        bf16_burn: Some(|i| unsafe { bf16dot::burn(i) }),
        quant_dot: quant::dot,
        quant_dot4: quant::dot4,
        quant_rows: quant::rows,
        quant_tile: quant::tile,
    });
}

/// The AVX-512 table, with the BF16 dot path when this CPU has `avx512bf16`.
pub(crate) fn table() -> &'static Table {
    if is_x86_feature_detected!("avx512bf16") {
        &with_bf16::TABLE
    } else {
        &plain::TABLE
    }
}

/// `vdpbf16ps` matmul: Y (n, m) += Xb (n, k) · Wᵀ with bf16 X and W, f32 accumulation.
pub(crate) mod bf16dot {
    use super::*;

    /// K-block in elements: an X tile (6 tokens × KCB bf16 = 12 KiB) stays in L1.
    const KCB: usize = 1024;
    const RT: usize = 4;
    const TT: usize = 6;

    #[inline(always)]
    unsafe fn bh(v: __m512i) -> __m512bh {
        // SAFETY: both are 64-byte plain vector types; __m512bh is 32 bf16 lanes.
        core::mem::transmute(v)
    }

    #[inline(always)]
    fn bf(x: u16) -> f32 {
        f32::from_bits((x as u32) << 16)
    }

    #[inline(always)]
    unsafe fn tile<const R: usize, const T: usize>(
        w: [*const u16; R],
        x: [*const u16; T],
        k: usize,
    ) -> [[f32; R]; T] {
        let mut acc = [[_mm512_setzero_ps(); R]; T];
        let mut i = 0;
        while i + 32 <= k {
            let mut wv = [bh(_mm512_setzero_si512()); R];
            for r in 0..R {
                wv[r] = bh(_mm512_loadu_si512(w[r].add(i) as *const __m512i));
            }
            for t in 0..T {
                let xv = bh(_mm512_loadu_si512(x[t].add(i) as *const __m512i));
                for r in 0..R {
                    acc[t][r] = _mm512_dpbf16_ps(acc[t][r], wv[r], xv);
                }
            }
            i += 32;
        }
        let mut out = [[0f32; R]; T];
        for t in 0..T {
            for r in 0..R {
                let mut v = _mm512_reduce_add_ps(acc[t][r]);
                for j in i..k {
                    v += bf(*w[r].add(j)) * bf(*x[t].add(j));
                }
                out[t][r] = v;
            }
        }
        out
    }

    /// Write (first k-block) or accumulate a result tile into Y.
    #[inline(always)]
    unsafe fn put<const R: usize, const T: usize>(
        y: *mut f32,
        m: usize,
        t0: usize,
        r0: usize,
        o: &[[f32; R]; T],
        first: bool,
    ) {
        for t in 0..T {
            let row = y.add((t0 + t) * m + r0);
            for r in 0..R {
                if first {
                    *row.add(r) = o[t][r];
                } else {
                    *row.add(r) += o[t][r];
                }
            }
        }
    }

    /// Y[:, r0..r1] of `job` (whose `w` must be bf16 and `xb` X rounded to bf16).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub(crate) unsafe fn matmul_rows(job: &MatmulJob<'_>, r0: usize, r1: usize) {
        let Weights::Bf16(w) = job.w else {
            unreachable!("bf16 dot path called with non-bf16 weights")
        };
        let (n, k, m, y) = (job.n, job.k, job.m, job.y);
        let wp = w.as_ptr() as *const u16;
        let mut kb = 0;
        while kb < k.max(1) {
            let kc = KCB.min(k - kb);
            let first = kb == 0;
            let xp = job.xb.as_ptr().add(kb);
            let mut rb = r0;
            while rb < r1 {
                let rows = MC.min(r1 - rb);
                let wb = wp.add(rb * k + kb);
                let mut t = 0;
                while t < n {
                    let tt = TT.min(n - t);
                    let mut r = 0;
                    while r < rows {
                        let rr = RT.min(rows - r);
                        if rr == RT && tt == TT {
                            let mut wr = [wb; RT];
                            for i in 0..RT {
                                wr[i] = wb.add((r + i) * k);
                            }
                            let mut xr = [xp; TT];
                            for i in 0..TT {
                                xr[i] = xp.add((t + i) * k);
                            }
                            let o = tile::<RT, TT>(wr, xr, kc);
                            put(y, m, t, rb + r, &o, first);
                        } else {
                            for i in 0..rr {
                                for j in 0..tt {
                                    let o = tile::<1, 1>(
                                        [wb.add((r + i) * k)],
                                        [xp.add((t + j) * k)],
                                        kc,
                                    );
                                    put(y, m, t + j, rb + r + i, &o, first);
                                }
                            }
                        }
                        r += rr;
                    }
                    t += tt;
                }
                rb += rows;
            }
            kb += KCB;
        }
    }

    /// f32 → bf16 bits, round to nearest even (`vcvtneps2bf16`).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub(crate) unsafe fn cvt(x: &[f32], out: &mut [u16]) {
        let len = x.len().min(out.len());
        let mut i = 0;
        while i + 16 <= len {
            let v: __m256i =
                core::mem::transmute(_mm512_cvtneps_pbh(_mm512_loadu_ps(x.as_ptr().add(i))));
            _mm256_storeu_si256(out.as_mut_ptr().add(i) as *mut __m256i, v);
            i += 16;
        }
        for j in i..len {
            out[j] = crate::bf16::from_f32(x[j]).to_bits();
        }
    }

    /// 12 independent `vdpbf16ps` chains for `iters` rounds: 12·64 FLOP a round.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub(crate) unsafe fn burn(iters: usize) -> f32 {
        let mut acc = [_mm512_setzero_ps(); 12];
        let a = bh(_mm512_set1_epi16(0x3f80)); // 1.0
        let b = bh(_mm512_set1_epi16(0x3380)); // ~6e-8
        for _ in 0..iters {
            for v in acc.iter_mut() {
                *v = _mm512_dpbf16_ps(*v, a, b);
            }
        }
        let mut t = _mm512_setzero_ps();
        for v in acc {
            t = _mm512_add_ps(t, v);
        }
        _mm512_reduce_add_ps(t)
    }
}
