//! One kernel body for every vector tier.
//!
//! Matrix products come in two forms. Dot-product tiles (`tile`: R weight rows × T tokens,
//! reduced horizontally at the end) serve matvec and matmul with few tokens, reading the stored
//! dtype directly. With at least half a panel of tokens, matmul packs X into panels of
//! `NV·N` tokens and runs outer-product tiles (`op_tile`: MR broadcast weights × NV vectors of
//! tokens), which keep every operand in L1 and need no horizontal sums — about twice as fast.
//!
//! Each tier implements [`Simd`] over its own register type; the `#[inline(always)]` bodies
//! here are instantiated inside that tier's `#[target_feature]` wrappers (see `tier_table!`),
//! so the intrinsics inline with the right features enabled. No closures in hot loops: they would not inherit the target features.

use crate::block_formats;
use crate::{bf16, f16, Weights};

/// A vector register of `N` f32 lanes and the few operations the kernels need.
///
/// # Safety
/// Every method may execute instructions of the tier's ISA: call them only from code compiled
/// for (and running on) a CPU with those features. Pointers must be valid for `N` elements.
pub(crate) trait Simd: Copy {
    type V: Copy;
    const N: usize;
    unsafe fn splat(self, x: f32) -> Self::V;
    unsafe fn load(self, p: *const f32) -> Self::V;
    unsafe fn store(self, p: *mut f32, v: Self::V);
    /// N IEEE half-precision values (as raw bits) widened to f32.
    unsafe fn load_f16(self, p: *const u16) -> Self::V;
    /// N bfloat16 values (as raw bits) widened to f32 (shift left by 16).
    unsafe fn load_bf16(self, p: *const u16) -> Self::V;
    unsafe fn add(self, a: Self::V, b: Self::V) -> Self::V;
    unsafe fn sub(self, a: Self::V, b: Self::V) -> Self::V;
    unsafe fn mul(self, a: Self::V, b: Self::V) -> Self::V;
    unsafe fn div(self, a: Self::V, b: Self::V) -> Self::V;
    /// a * b + c, fused.
    unsafe fn fma(self, a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    unsafe fn max(self, a: Self::V, b: Self::V) -> Self::V;
    unsafe fn min(self, a: Self::V, b: Self::V) -> Self::V;
    unsafe fn abs(self, a: Self::V) -> Self::V;
    /// Round to the nearest integer (ties to even).
    unsafe fn round(self, a: Self::V) -> Self::V;
    /// 2^n for integer-valued n in [-126, 127].
    unsafe fn pow2i(self, n: Self::V) -> Self::V;
    /// a < b ? t : f, per lane.
    unsafe fn select_lt(self, a: Self::V, b: Self::V, t: Self::V, f: Self::V) -> Self::V;
    unsafe fn hsum(self, v: Self::V) -> f32;
    unsafe fn hmax(self, v: Self::V) -> f32;
    /// Bytes ahead that matvec prefetches each weight stream into L1 (0: none, the hardware
    /// prefetchers alone).
    const MATVEC_AHEAD: usize = 4096;
}

/// A weight dtype the kernels read directly from storage.
pub(crate) trait Elem: Copy + Send + Sync + 'static {
    /// Whether `Self` is f32 (matmul can then read weights in place instead of widening).
    const IS_F32: bool = false;
    unsafe fn vload<S: Simd>(s: S, p: *const Self) -> S::V;
    fn f(self) -> f32;
}
impl Elem for f32 {
    const IS_F32: bool = true;
    #[inline(always)]
    unsafe fn vload<S: Simd>(s: S, p: *const f32) -> S::V {
        s.load(p)
    }
    #[inline(always)]
    fn f(self) -> f32 {
        self
    }
}
impl Elem for f16 {
    #[inline(always)]
    unsafe fn vload<S: Simd>(s: S, p: *const f16) -> S::V {
        s.load_f16(p as *const u16)
    }
    #[inline(always)]
    fn f(self) -> f32 {
        self.to_f32()
    }
}
impl Elem for bf16 {
    #[inline(always)]
    unsafe fn vload<S: Simd>(s: S, p: *const bf16) -> S::V {
        s.load_bf16(p as *const u16)
    }
    #[inline(always)]
    fn f(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
}

/// Hint the CPU to fetch the cache line holding `p` into L1 (a no-op elsewhere).
/// Never faults, so `p` may point past the end of the weights.
#[inline(always)]
fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: prefetch is a hint; SSE is part of the x86_64 baseline.
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(p as *const i8)
    };
    #[cfg(target_arch = "aarch64")]
    // SAFETY: `prfm` is a hint and does not fault.
    unsafe {
        core::arch::asm!("prfm pldl1keep, [{0}]", in(reg) p, options(nostack, readonly, preserves_flags))
    };
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    let _ = p;
}

/// Hint the CPU to fetch the cache line holding `p` into L2 (a no-op elsewhere). Never faults.
#[inline(always)]
fn prefetch_l2<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: prefetch is a hint; SSE is part of the x86_64 baseline.
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T1 }>(p as *const i8)
    };
    #[cfg(target_arch = "aarch64")]
    // SAFETY: `prfm` is a hint and does not fault.
    unsafe {
        core::arch::asm!("prfm pldl2keep, [{0}]", in(reg) p, options(nostack, readonly, preserves_flags))
    };
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    let _ = p;
}

/// Largest lane count of any tier (AVX-512: 16).
const MAXN: usize = 16;

/// Load `len < N` floats into a zero-padded vector.
#[inline(always)]
unsafe fn load_tail<S: Simd>(s: S, p: *const f32, len: usize) -> S::V {
    let mut buf = [0f32; MAXN];
    std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), len);
    s.load(buf.as_ptr())
}

/// Load `len ≤ N` floats, zero-padded.
#[inline(always)]
unsafe fn load_n<S: Simd>(s: S, p: *const f32, len: usize) -> S::V {
    if len == S::N {
        s.load(p)
    } else {
        load_tail(s, p, len)
    }
}

/// Store the first `len < N` lanes of `v`.
#[inline(always)]
unsafe fn store_tail<S: Simd>(s: S, p: *mut f32, len: usize, v: S::V) {
    let mut buf = [0f32; MAXN];
    s.store(buf.as_mut_ptr(), v);
    std::ptr::copy_nonoverlapping(buf.as_ptr(), p, len);
}

// ---------------------------------------------------------------- products

/// Dot products of `R` weight rows with `T` activation rows over `k` elements,
/// out[t][r] = sum_j w[r][j] x[t][j], one accumulator register per (t, r) pair. Prefetches, for
/// each weight row, the element `ahead` places on (none if 0): matvec rows are often exactly
/// one 4 KiB page, where the hardware prefetcher stops and would have to retrain on every row.
#[inline(always)]
unsafe fn tile_pf<S: Simd, E: Elem, const R: usize, const T: usize>(
    s: S,
    w: [*const E; R],
    x: [*const f32; T],
    k: usize,
    ahead: usize,
) -> [[f32; R]; T] {
    let n = S::N;
    let mut acc = [[s.splat(0.0); R]; T];
    let mut i = 0;
    while i + n <= k {
        if ahead != 0 && (i * std::mem::size_of::<E>()).is_multiple_of(64) {
            for p in w {
                prefetch(p.wrapping_add(i + ahead));
            }
        }
        let mut wv = [s.splat(0.0); R];
        for r in 0..R {
            wv[r] = E::vload(s, w[r].add(i));
        }
        for t in 0..T {
            let xv = s.load(x[t].add(i));
            for r in 0..R {
                acc[t][r] = s.fma(wv[r], xv, acc[t][r]);
            }
        }
        i += n;
    }
    let mut out = [[0f32; R]; T];
    for t in 0..T {
        for r in 0..R {
            let mut v = s.hsum(acc[t][r]);
            for j in i..k {
                v += (*w[r].add(j)).f() * *x[t].add(j);
            }
            out[t][r] = v;
        }
    }
    out
}

/// y = W x as `R` streams: stream j takes the j-th R-th of the rows in order, so each stream
/// reads contiguous memory and (where the tier asks, [`Simd::MATVEC_AHEAD`]) can prefetch a
/// fixed distance ahead across its rows. Eight streams keep more cache-line fetches in flight
/// than one or four (a few % more bandwidth).
#[inline(always)]
unsafe fn matvec_e<S: Simd, E: Elem>(s: S, w: &[E], ld: usize, x: &[f32], y: &mut [f32]) {
    const R: usize = 8;
    let (k, rows) = (x.len(), y.len());
    debug_assert!(rows == 0 || (rows - 1) * ld + k <= w.len());
    let wp = w.as_ptr();
    let ahead = S::MATVEC_AHEAD / std::mem::size_of::<E>();
    let sub = rows / R;
    for rr in 0..sub {
        let ws: [*const E; R] = std::array::from_fn(|j| wp.add((j * sub + rr) * ld));
        let o = tile_pf::<S, E, R, 1>(s, ws, [x.as_ptr()], k, ahead);
        for (j, v) in o[0].into_iter().enumerate() {
            y[j * sub + rr] = v;
        }
    }
    for r in R * sub..rows {
        y[r] = tile_pf::<S, E, 1, 1>(s, [wp.add(r * ld)], [x.as_ptr()], k, ahead)[0][0];
    }
}

#[inline(always)]
pub(crate) unsafe fn matvec<S: Simd>(s: S, w: Weights<'_>, x: &[f32], y: &mut [f32]) {
    matvec_ld(s, w, x.len(), x, y)
}

/// y = W x with W's rows `ld` elements apart.
#[inline(always)]
pub(crate) unsafe fn matvec_ld<S: Simd>(s: S, w: Weights<'_>, ld: usize, x: &[f32], y: &mut [f32]) {
    match w {
        Weights::F32(w) => matvec_e(s, w, ld, x, y),
        Weights::F16(w) => matvec_e(s, w, ld, x, y),
        Weights::Bf16(w) => matvec_e(s, w, ld, x, y),
        block_formats!() => unreachable!(
            "{} blocks reach the float kernels: `Kernels` routes them to `quant`",
            w.format().name()
        ),
    }
}

#[inline(always)]
pub(crate) unsafe fn dot<S: Simd>(s: S, w: Weights<'_>, x: &[f32]) -> f32 {
    let mut y = [0f32];
    matvec(s, w, x, &mut y);
    y[0]
}

/// Y[:, r0..r1] = X W[r0..r1, :]ᵀ for a few tokens (n ≤ N: a batch of decodes). Each (token,
/// row) is summed exactly as [`matvec`] sums it (`tile_pf`'s vector lanes over k, then the
/// horizontal sum, then the tail), so a decode batch gives each token what its lone decode
/// would from the same cache. Dot products rather than outer products: one weight load (and
/// widening) serves every token, so the FMA units, not conversions and broadcasts, set the
/// pace (8 tokens of bf16 on Zen 3: 60-69 GFLOP/s on two threads; the outer-product tiles ran
/// at about half that per thread in the same loaded-machine comparison).
#[inline(always)]
pub(crate) unsafe fn matmul_few<S: Simd>(s: S, job: &MatmulJob<'_>, r0: usize, r1: usize) {
    match job.w {
        Weights::F32(w) => few::<S, f32>(s, job, w, r0, r1),
        Weights::F16(w) => few::<S, f16>(s, job, w, r0, r1),
        Weights::Bf16(w) => few::<S, bf16>(s, job, w, r0, r1),
        block_formats!() => unreachable!(
            "{} blocks reach the float kernels: `Kernels` routes them to `quant`",
            job.w.format().name()
        ),
    }
}

/// Most tokens one [`few`] tile holds (8 accumulators: AVX2 has 16 registers).
const FEW_T: usize = 8;
/// [`few`]'s k-block: X's piece (8 tokens × 512 floats = 16 KiB) stays in L1 across the rows
/// of a block; a whole X (8 × 2048 floats) would not, and every FMA would wait on L2.
const FEW_KC: usize = 512;
/// [`few`]'s row block: its parked vector sums (16 rows × 8 tokens × N lanes) stay in L1.
/// 512 × 16 beat 256 × 32, 1024 × 16 and 2048 × 8 at 8 tokens of bf16 on Zen 3.
const FEW_MB: usize = 16;

thread_local! {
    /// [`few`]'s parked vector sums between k-blocks.
    static FEW: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

#[inline(always)]
unsafe fn few<S: Simd, E: Elem>(s: S, job: &MatmulJob<'_>, w: &[E], r0: usize, r1: usize) {
    let nl = S::N;
    let (n, k, m, y) = (job.n, job.k, job.m, job.y);
    let wp = w.as_ptr();
    // The vector part of k (the rest is `tile_pf`'s scalar tail, added after the hsum).
    let kv = k - k % nl;
    // X copied with rows k + PAD apart: rows a multiple of 4 KiB apart (k = 1024, 2048, ...)
    // all map to one L1 set, and 8 tokens' rows plus the weights overflow its 8 ways.
    let xs = k + PAD;
    let need = FEW_MB * n * nl + n * xs;
    // Pointer taken out of the closure (closures do not inherit target features).
    let park = FEW.with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < need {
            p.resize(need, 0.0);
        }
        p.as_mut_ptr()
    });
    // SAFETY: `park` is this thread's FEW scratch (`need` floats: the parked sums, then X's
    // copy), alive for the thread and not used by anything else during this call (nothing
    // below yields to the pool).
    let x = park.add(FEW_MB * n * nl);
    for t in 0..n {
        std::ptr::copy_nonoverlapping(job.x.as_ptr().add(t * k), x.add(t * xs), k);
    }
    let mut rb = r0;
    while rb < r1 {
        let rows = FEW_MB.min(r1 - rb);
        let mut kb = 0;
        while kb < kv {
            let kc = FEW_KC.min(kv - kb);
            for r in 0..rows {
                let wr = wp.add((rb + r) * k);
                // Four rows ahead: one row's piece is too little time to hide DRAM latency.
                let pf = wr.wrapping_add(4 * k + kb);
                let mut t0 = 0;
                while t0 < n {
                    let g = (n - t0).min(FEW_T);
                    let pk = park.add((r * n + t0) * nl);
                    let xg = x.add(t0 * xs);
                    macro_rules! go {
                        ($($t:literal)*) => {
                            match g {
                                $($t => few_piece::<S, E, $t>(s, wr, xg, xs, kb, kc, pk, pf),)*
                                _ => few_piece::<S, E, FEW_T>(s, wr, xg, xs, kb, kc, pk, pf),
                            }
                        };
                    }
                    go!(1 2 3 4 5 6 7);
                    t0 += g;
                }
            }
            kb += kc;
        }
        // Each (token, row): the horizontal sum, then the tail in order, as `tile_pf` does.
        for r in 0..rows {
            let wr = wp.add((rb + r) * k);
            for t in 0..n {
                let mut v = if kv == 0 {
                    0.0
                } else {
                    s.hsum(s.load(park.add((r * n + t) * nl)))
                };
                for j in kv..k {
                    v += (*wr.add(j)).f() * *x.add(t * xs + j);
                }
                *y.add(t * m + rb + r) = v;
            }
        }
        rb += rows;
    }
}

/// One row's columns `kb..kb + kc` (vector part) for T tokens of X (rows `xs` apart), summed
/// into the parked lane sums at `pk` (T vectors; zero at kb = 0) in `tile_pf`'s order;
/// prefetches `pf`'s piece, a few rows on, once per cache line.
#[inline(always)]
unsafe fn few_piece<S: Simd, E: Elem, const T: usize>(
    s: S,
    wr: *const E,
    x: *const f32,
    xs: usize,
    kb: usize,
    kc: usize,
    pk: *mut f32,
    pf: *const E,
) {
    let nl = S::N;
    let mut acc = [s.splat(0.0); T];
    if kb > 0 {
        for t in 0..T {
            acc[t] = s.load(pk.add(t * nl));
        }
    }
    // One prefetch per 64 bytes of weights, outside the vector loop: a test per vector cost
    // about as much as the FMAs' issue slots.
    let line = (64 / std::mem::size_of::<E>()).max(nl);
    let mut i = kb;
    let end = kb + kc;
    while i < end {
        // Unlike matvec's long streams, these pieces of a block of rows are too short for the
        // hardware prefetcher: without this, 8 tokens ran at 55% of the speed (Zen 3).
        prefetch(pf.wrapping_add(i - kb));
        let stop = (i + line).min(end);
        while i < stop {
            let wv = E::vload(s, wr.add(i));
            for t in 0..T {
                acc[t] = s.fma(wv, s.load(x.add(t * xs + i)), acc[t]);
            }
            i += nl;
        }
    }
    for t in 0..T {
        s.store(pk.add(t * nl), acc[t]);
    }
}

/// One matrix product job: Y (n, m) = X (n, k) · Wᵀ, W (m, k). `y` is shared between threads
/// that each write a disjoint range of its columns.
pub(crate) struct MatmulJob<'a> {
    pub w: Weights<'a>,
    pub x: &'a [f32],
    /// X rounded to bf16 (n, k), for the AVX-512 BF16 path only.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // read only by x86_64/avx512.rs
    pub xb: &'a [u16],
    /// X packed for the outer-product path ([`pack_x`]); empty for the dot-product path.
    pub xp: &'a [f32],
    pub n: usize,
    pub k: usize,
    pub m: usize,
    pub y: *mut f32,
}
// SAFETY: `y` is only written through disjoint column ranges by the threads sharing a job
// (see `Kernels::matmul`), and the borrowed slices are read-only.
unsafe impl Sync for MatmulJob<'_> {}

/// M-block: rows per block of the outer-product and AVX-512 BF16 matmuls.
pub(crate) const MC: usize = 64;

/// Padding (floats) added to packed row strides. Rows of 1024 or 2048 floats are a multiple
/// of 4 KiB apart, so every row of a tile would map to the same L1 set and evict each other;
/// 16 floats (one line) shifts each row to the next set.
const PAD: usize = 16;

/// X (n, k) packed for the outer-product matmul: groups of `tw` tokens, each `[k][tw]`
/// (token index fastest), zero-padded to whole groups. `xp.len()` = n.div_ceil(tw)·k·tw.
pub(crate) fn pack_x(x: &[f32], n: usize, k: usize, tw: usize, xp: &mut [f32]) {
    use rayon::prelude::*;
    let pack = |(g, panel): (usize, &mut [f32])| {
        // k outer, tokens inner: sequential writes; the tw source rows' current cache lines
        // stay in L1 across 16 consecutive k.
        let live = tw.min(n - (g * tw).min(n));
        let rows = &x[g * tw * k..(g * tw + live) * k];
        for (kk, out) in panel.chunks_exact_mut(tw).enumerate() {
            for (j, o) in out[..live].iter_mut().enumerate() {
                *o = rows[j * k + kk];
            }
            out[live..].fill(0.0);
        }
    };
    // A fork/join costs more than packing a few panels.
    if n * k < 1 << 17 {
        xp.chunks_mut((k * tw).max(1)).enumerate().for_each(pack);
    } else {
        xp.par_chunks_mut((k * tw).max(1))
            .enumerate()
            .for_each(pack);
    }
}

thread_local! {
    /// Per-thread scratch of the outer-product path: a widened W block and the Yᵀ partial sums.
    static OP: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Y[:, r0..r1] by outer products: per k step, NV vectors of packed X (NV·N tokens) times MR
/// broadcast weights accumulate into MR×NV registers. Each FMA needs no fresh cache line from
/// L2 (X panel and W tile rows are read sequentially) and no horizontal sums, unlike the
/// dot products; W is widened once per block and reused by every token group.
#[inline(always)]
pub(crate) unsafe fn matmul_op<S: Simd, const MR: usize, const NV: usize>(
    s: S,
    job: &MatmulJob<'_>,
    r0: usize,
    r1: usize,
) {
    match job.w {
        Weights::F32(w) => op::<S, f32, MR, NV>(s, job, w, r0, r1),
        Weights::F16(w) => op::<S, f16, MR, NV>(s, job, w, r0, r1),
        Weights::Bf16(w) => op::<S, bf16, MR, NV>(s, job, w, r0, r1),
        block_formats!() => unreachable!(
            "{} blocks reach the float kernels: `Kernels` routes them to `quant`",
            job.w.format().name()
        ),
    }
}

#[inline(always)]
unsafe fn op<S: Simd, E: Elem, const MR: usize, const NV: usize>(
    s: S,
    job: &MatmulJob<'_>,
    w: &[E],
    r0: usize,
    r1: usize,
) {
    let tw = NV * S::N;
    let (n, k, m, y) = (job.n, job.k, job.m, job.y);
    let ng = n.div_ceil(tw);
    let ytw = ng * tw;
    let mcb = MR * (MC / MR).max(1); // rows per block, a multiple of MR
                                     // K-block: the group's X panel (kc × tw floats: ≤ 32 KiB for AVX-512) stays in L1 while
                                     // the MR weight rows stream past it; blocks of equal size, multiples of 16.
    let kcb = k.div_ceil(k.div_ceil(KC_OP)).next_multiple_of(16);
    // Partial sums live in registers within a k-block and go straight to Y after the last
    // one; only products longer than one k-block park them in the Yᵀ scratch in between.
    let multi = k > kcb;
    // f32 weights are read in place (prefetched into L2 a block ahead, below): copying them
    // cost more than the L1 set conflicts of rows 4 KiB apart (k a multiple of 1024), which
    // MR ≤ 8 rows do not exhaust.
    let direct = E::IS_F32;
    // Copied rows are whole (k + PAD floats): one sequential pass over each weight row per
    // block keeps the hardware prefetcher streaming, unlike k-block pieces of rows.
    let ws = k + PAD;
    let need = mcb * ws + if multi { mcb * ytw } else { 0 };
    // Pointer taken out of the closure (closures do not inherit target features).
    let buf = OP.with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < need {
            p.resize(need, 0.0);
        }
        p.as_mut_ptr()
    });
    // SAFETY: `buf` is this thread's OP scratch (`need` floats), alive for the thread and not
    // used by anything else during this call (nothing below yields to the pool).
    let (wp, yt) = (buf, buf.add(mcb * ws));
    let mut rb = r0;
    while rb < r1 {
        let rows = mcb.min(r1 - rb);
        let rpad = rows.next_multiple_of(MR);
        // Rows `..full` are read in place (f32 only); the rest, padded with zero rows to a
        // whole tile, are widened into the scratch.
        let full = if direct { rows - rows % MR } else { 0 };
        for i in full..rows {
            let src = std::slice::from_raw_parts(w.as_ptr().add((rb + i) * k), k);
            let dst = wp.add((i - full) * ws);
            widen(s, src, std::slice::from_raw_parts_mut(dst, k));
        }
        for i in rows..rpad {
            std::ptr::write_bytes(wp.add((i - full) * ws), 0, k);
        }
        // While this block computes, prefetch the next one (past r1 too: the pool hands the
        // next rows to this thread more often than not) into L2, spread over all its tiles:
        // otherwise widening it waits on DRAM with the FMA units idle.
        let next = rb + rows;
        let next_rows = mcb.min(m - next);
        let pf_lines = (next_rows * k * std::mem::size_of::<E>()).div_ceil(64);
        let tiles = k.div_ceil(kcb) * ng * (rpad / MR);
        let pf_per = pf_lines.div_ceil(tiles.max(1));
        let mut pf = w.as_ptr().wrapping_add(next * k) as *const u8;
        let pf_end = pf.wrapping_add(pf_lines * 64);
        let mut kb = 0;
        while kb < k {
            let kc = kcb.min(k - kb);
            let (first, last) = (kb == 0, kb + kc >= k);
            for g in 0..ng {
                let t0 = g * tw;
                let live = tw.min(n - t0);
                let xg = job.xp.as_ptr().add(g * k * tw + kb * tw);
                let mut rt = 0;
                while rt < rpad {
                    let d = Dest {
                        yt: yt.add(rt * ytw + t0),
                        ytw,
                        y: y.add(t0 * m + rb + rt),
                        m,
                        rows: MR.min(rows - rt),
                        toks: live,
                        first,
                        last,
                    };
                    let (wt, st) = if rt < full {
                        ((w.as_ptr() as *const f32).add((rb + rt) * k + kb), k)
                    } else {
                        (wp.add((rt - full) * ws + kb) as *const f32, ws)
                    };
                    // A last group of fewer tokens runs a tile of just enough vectors
                    // rather than wasting FMAs on padding.
                    let npf = pf_per.min((pf_end as usize - pf as usize) / 64);
                    macro_rules! go {
                        ($($c:literal)*) => {
                            match live.div_ceil(S::N) {
                                $($c if $c < NV => {
                                    op_tile::<S, MR, $c>(s, wt, st, kc, xg, tw, &d, pf, npf)
                                })*
                                _ => op_tile::<S, MR, NV>(s, wt, st, kc, xg, tw, &d, pf, npf),
                            }
                        };
                    }
                    go!(1 2 3);
                    pf = pf.wrapping_add(npf * 64);
                    rt += MR;
                }
            }
            kb += kc;
        }
        rb += rows;
    }
}

/// Largest k-block of the outer-product matmul (its X panel: KC_OP × NV·N floats).
const KC_OP: usize = 64;

/// Where an outer-product tile's sums go: the Yᵀ scratch between k-blocks (`yt`, row stride
/// `ytw`), Y itself (`y`, row stride `m`; `rows` weight rows × `toks` tokens live) after the
/// last. `first`: start from zero rather than `yt`.
struct Dest {
    yt: *mut f32,
    ytw: usize,
    y: *mut f32,
    m: usize,
    rows: usize,
    toks: usize,
    first: bool,
    last: bool,
}

/// Largest MR·NV·N of any tier's outer-product tile (AVX-512: 12·2·16 = 384).
const OP_TILE_MAX: usize = 1024;

#[inline(always)]
unsafe fn op_tile<S: Simd, const MR: usize, const NV: usize>(
    s: S,
    wp: *const f32,
    ws: usize,
    kc: usize,
    xg: *const f32,
    tw: usize,
    d: &Dest,
    pf: *const u8,
    npf: usize,
) {
    let n = S::N;
    let mut acc = [[s.splat(0.0); NV]; MR];
    if !d.first {
        for r in 0..MR {
            for v in 0..NV {
                acc[r][v] = s.load(d.yt.add(r * d.ytw + v * n));
            }
        }
    }
    // Row pointers up front: indexing them by kk needs no per-row address arithmetic.
    let mut wr = [wp; MR];
    for r in 0..MR {
        wr[r] = wp.add(r * ws);
    }
    for kk in 0..kc {
        // One L2 prefetch (of the next block's weights) every 4 steps, the rest after.
        if kk % 4 == 0 && kk / 4 < npf {
            prefetch_l2(pf.wrapping_add(kk / 4 * 64));
        }
        let mut xv = [s.splat(0.0); NV];
        for v in 0..NV {
            xv[v] = s.load(xg.add(kk * tw + v * n));
        }
        for r in 0..MR {
            let b = s.splat(*wr[r].add(kk));
            for v in 0..NV {
                acc[r][v] = s.fma(b, xv[v], acc[r][v]);
            }
        }
    }
    for i in kc.div_ceil(4)..npf {
        prefetch_l2(pf.wrapping_add(i * 64));
    }
    if !d.last {
        for r in 0..MR {
            for v in 0..NV {
                s.store(d.yt.add(r * d.ytw + v * n), acc[r][v]);
            }
        }
        return;
    }
    // Transpose through an L1-resident buffer: Y rows are tokens, the tile's vectors are not.
    let tn = NV * n;
    debug_assert!(MR * tn <= OP_TILE_MAX);
    let mut tb = std::mem::MaybeUninit::<[f32; OP_TILE_MAX]>::uninit();
    let tp = tb.as_mut_ptr() as *mut f32;
    for r in 0..MR {
        for v in 0..NV {
            s.store(tp.add(r * tn + v * n), acc[r][v]);
        }
    }
    let toks = d.toks.min(tn);
    for t in 0..toks {
        let row = d.y.add(t * d.m);
        for r in 0..d.rows {
            *row.add(r) = *tp.add(r * tn + t);
        }
    }
}

// ---------------------------------------------------------------- pre-packed weights

/// W (m, k) repacked for [`matmul_pw`]: panels of `p` rows, each stored `[k][p]` (row index
/// fastest) so one k step of a panel is `p / N` whole vectors; the last panel is padded with
/// zero rows. `p = 1` is plain row-major W (the scalar tier).
pub(crate) fn pack_w<E: Elem>(w: &[E], m: usize, k: usize, p: usize) -> Vec<f32> {
    let mut out = vec![0f32; m.div_ceil(p) * p * k];
    for (pi, panel) in out.chunks_exact_mut((p * k).max(1)).enumerate() {
        for r in 0..p.min(m - pi * p) {
            let row = &w[(pi * p + r) * k..(pi * p + r + 1) * k];
            for (kk, &v) in row.iter().enumerate() {
                panel[kk * p + r] = v.f();
            }
        }
    }
    out
}

/// Y (n, m) = act(X (n, k) · Wᵀ + bias + residual) with W packed by [`pack_w`]; `y` is shared
/// between threads that each write a disjoint range of panels (columns).
pub(crate) struct PwJob<'a> {
    pub w: &'a [f32],
    pub p: usize,
    pub x: &'a [f32],
    pub n: usize,
    pub k: usize,
    pub m: usize,
    pub y: *mut f32,
    /// (m): added to every row.
    pub bias: Option<&'a [f32]>,
    /// (n, m): added after the bias.
    pub residual: Option<&'a [f32]>,
    /// Exact GELU last.
    pub gelu: bool,
}
// SAFETY: as `MatmulJob`: threads write disjoint column ranges of `y`, the rest is read-only.
unsafe impl Sync for PwJob<'_> {}

/// Panels `p0..p1` of Y for all tokens. Each tile holds T tokens × NV vectors of output columns
/// in registers: per k step NV loads of the panel and T broadcasts of X, no horizontal sums,
/// and results go straight to Y's rows (the vectors run along Y's columns), so no token
/// padding and no transpose: a 20-token batch wastes nothing.
#[inline(always)]
pub(crate) unsafe fn matmul_pw<S: Simd, const T: usize, const NV: usize>(
    s: S,
    j: &PwJob<'_>,
    p0: usize,
    p1: usize,
) {
    debug_assert_eq!(j.p, NV * S::N);
    // Tiles of near-equal size (n = 13: 7 + 6, not 12 + 1): a thin tile has too few
    // independent FMA chains to hide their latency.
    let nt = j.n.div_ceil(T);
    for pi in p0..p1 {
        let mut t = 0;
        for i in 0..nt {
            let tt = j.n / nt + usize::from(i < j.n % nt);
            macro_rules! go {
                ($($c:literal)*) => {
                    match tt {
                        $($c => pw_tile::<S, $c, NV>(s, j, pi, t),)*
                        _ => unreachable!("tile of {tt} tokens"),
                    }
                };
            }
            go!(1 2 3 4 5 6 7 8 9 10 11 12);
            t += tt;
        }
    }
}

#[inline(always)]
unsafe fn pw_tile<S: Simd, const T: usize, const NV: usize>(
    s: S,
    j: &PwJob<'_>,
    pi: usize,
    t0: usize,
) {
    let (n, k, p) = (S::N, j.k, j.p);
    let wp = j.w.as_ptr().add(pi * p * k);
    let xp = j.x.as_ptr().add(t0 * k);
    let mut acc = [[s.splat(0.0); NV]; T];
    for kk in 0..k {
        let mut wv = [s.splat(0.0); NV];
        for v in 0..NV {
            wv[v] = s.load(wp.add(kk * p + v * n));
        }
        for t in 0..T {
            let b = s.splat(*xp.add(t * k + kk));
            for v in 0..NV {
                acc[t][v] = s.fma(wv[v], b, acc[t][v]);
            }
        }
    }
    // Epilogue on the registers; the last panel may be only partly live.
    let c0 = pi * p;
    let live = p.min(j.m - c0);
    for v in 0..NV {
        let c = c0 + v * n;
        let len = n.min(live.saturating_sub(v * n));
        if len == 0 {
            break;
        }
        // A match, not `map`: closures would not inherit the target features.
        #[allow(clippy::manual_map)]
        let bias = match j.bias {
            Some(b) => Some(load_n(s, b.as_ptr().add(c), len)),
            None => None,
        };
        for t in 0..T {
            let row = (t0 + t) * j.m + c;
            let mut a = acc[t][v];
            if let Some(b) = bias {
                a = s.add(a, b);
            }
            if let Some(r) = j.residual {
                a = s.add(a, load_n(s, r.as_ptr().add(row), len));
            }
            if j.gelu {
                a = gelu_v(s, a);
            }
            if len == n {
                s.store(j.y.add(row), a);
            } else {
                store_tail(s, j.y.add(row), len, a);
            }
        }
    }
}

#[inline(always)]
unsafe fn widen<S: Simd, E: Elem>(s: S, src: &[E], dst: &mut [f32]) {
    let n = S::N;
    let len = src.len().min(dst.len());
    let mut i = 0;
    while i + n <= len {
        s.store(dst.as_mut_ptr().add(i), E::vload(s, src.as_ptr().add(i)));
        i += n;
    }
    for j in i..len {
        dst[j] = src[j].f();
    }
}

#[inline(always)]
pub(crate) unsafe fn to_f32<S: Simd>(s: S, w: Weights<'_>, out: &mut [f32]) {
    match w {
        Weights::F32(w) => out.copy_from_slice(w),
        Weights::F16(w) => widen(s, w, out),
        Weights::Bf16(w) => widen(s, w, out),
        block_formats!() => unreachable!(
            "{} blocks reach the float kernels: `Kernels` routes them to `quant`",
            w.format().name()
        ),
    }
}

// ---------------------------------------------------------------- math

/// e^x, Cephes-style: x = n ln2 + r, |r| <= ln2/2, degree-6 polynomial; ~1 ulp.
/// Inputs below -87.3 give 0 (so masked scores of -inf vanish exactly).
#[inline(always)]
#[allow(clippy::excessive_precision)] // constants as published (Cephes expf)
pub(crate) unsafe fn exp<S: Simd>(s: S, x: S::V) -> S::V {
    let lo = s.splat(-87.33654);
    let xc = s.min(s.max(x, lo), s.splat(88.72283));
    let n = s.round(s.mul(xc, s.splat(std::f32::consts::LOG2_E)));
    let r = s.fma(n, s.splat(-0.693_359_4), xc);
    let r = s.fma(n, s.splat(2.121_944_4e-4), r);
    let mut p = s.splat(1.987_569_1e-4);
    p = s.fma(p, r, s.splat(1.398_199_9e-3));
    p = s.fma(p, r, s.splat(8.333_452e-3));
    p = s.fma(p, r, s.splat(4.166_579_6e-2));
    p = s.fma(p, r, s.splat(1.666_666_5e-1));
    p = s.fma(p, r, s.splat(5.000_000_1e-1));
    let r2 = s.mul(r, r);
    let e = s.add(s.fma(p, r2, r), s.splat(1.0));
    let v = s.mul(e, s.pow2i(n));
    s.select_lt(x, lo, s.splat(0.0), v)
}

/// erfc(z) for z >= 0 (Numerical Recipes `erfcc`, fractional error < 1.2e-7 everywhere).
#[inline(always)]
#[allow(clippy::excessive_precision)] // coefficients as published (Numerical Recipes)
unsafe fn erfc_pos<S: Simd>(s: S, z: S::V) -> S::V {
    let one = s.splat(1.0);
    let t = s.div(one, s.fma(s.splat(0.5), z, one));
    let c = [
        0.170_872_77,
        -0.822_152_23,
        1.488_515_87,
        -1.135_203_98,
        0.278_868_07,
        -0.186_288_06,
        0.096_784_18,
        0.374_091_96,
        1.000_023_68,
        -1.265_512_23,
    ];
    let mut p = s.splat(c[0]);
    for &ci in &c[1..] {
        p = s.fma(p, t, s.splat(ci));
    }
    // exp(-z^2 + p)
    let a = s.fma(s.sub(s.splat(0.0), z), z, p);
    s.mul(t, exp(s, a))
}

/// GELU(x) = x Φ(x) = 0.5 x erfc(-x/√2); for x >= 0 written as x - 0.5 x erfc(x/√2) so both
/// sides keep the relative accuracy of erfc.
#[inline(always)]
unsafe fn gelu_v<S: Simd>(s: S, x: S::V) -> S::V {
    let z = s.mul(s.abs(x), s.splat(std::f32::consts::FRAC_1_SQRT_2));
    let h = s.mul(s.mul(s.splat(0.5), x), erfc_pos(s, z));
    s.select_lt(x, s.splat(0.0), h, s.sub(x, h))
}

/// x / (1 + e^-x)
#[inline(always)]
unsafe fn silu_v<S: Simd>(s: S, x: S::V) -> S::V {
    let e = exp(s, s.sub(s.splat(0.0), x));
    s.div(x, s.add(s.splat(1.0), e))
}

// ---------------------------------------------------------------- elementwise

#[inline(always)]
pub(crate) unsafe fn silu<S: Simd>(s: S, x: &mut [f32]) {
    let (n, p) = (S::N, x.as_mut_ptr());
    let mut i = 0;
    while i + n <= x.len() {
        s.store(p.add(i), silu_v(s, s.load(p.add(i))));
        i += n;
    }
    if i < x.len() {
        let v = silu_v(s, load_tail(s, p.add(i), x.len() - i));
        store_tail(s, p.add(i), x.len() - i, v);
    }
}

#[inline(always)]
pub(crate) unsafe fn silu_mul<S: Simd>(s: S, g: &mut [f32], u: &[f32]) {
    let (n, p, q) = (S::N, g.as_mut_ptr(), u.as_ptr());
    let len = g.len().min(u.len());
    let mut i = 0;
    while i + n <= len {
        s.store(
            p.add(i),
            s.mul(silu_v(s, s.load(p.add(i))), s.load(q.add(i))),
        );
        i += n;
    }
    if i < len {
        let v = s.mul(
            silu_v(s, load_tail(s, p.add(i), len - i)),
            load_tail(s, q.add(i), len - i),
        );
        store_tail(s, p.add(i), len - i, v);
    }
}

#[inline(always)]
pub(crate) unsafe fn gelu<S: Simd>(s: S, x: &mut [f32]) {
    let (n, p) = (S::N, x.as_mut_ptr());
    let mut i = 0;
    while i + n <= x.len() {
        s.store(p.add(i), gelu_v(s, s.load(p.add(i))));
        i += n;
    }
    if i < x.len() {
        let v = gelu_v(s, load_tail(s, p.add(i), x.len() - i));
        store_tail(s, p.add(i), x.len() - i, v);
    }
}

/// Sum of squares (two accumulators).
#[inline(always)]
unsafe fn sumsq<S: Simd>(s: S, x: &[f32], shift: f32) -> f32 {
    let (n, p) = (S::N, x.as_ptr());
    let c = s.splat(shift);
    let (mut a0, mut a1) = (s.splat(0.0), s.splat(0.0));
    let mut i = 0;
    while i + 2 * n <= x.len() {
        let v0 = s.sub(s.load(p.add(i)), c);
        let v1 = s.sub(s.load(p.add(i + n)), c);
        a0 = s.fma(v0, v0, a0);
        a1 = s.fma(v1, v1, a1);
        i += 2 * n;
    }
    let mut acc = s.hsum(s.add(a0, a1));
    for &v in &x[i..] {
        acc += (v - shift) * (v - shift);
    }
    acc
}

#[inline(always)]
unsafe fn sum<S: Simd>(s: S, x: &[f32]) -> f32 {
    let (n, p) = (S::N, x.as_ptr());
    let (mut a0, mut a1) = (s.splat(0.0), s.splat(0.0));
    let mut i = 0;
    while i + 2 * n <= x.len() {
        a0 = s.add(s.load(p.add(i)), a0);
        a1 = s.add(s.load(p.add(i + n)), a1);
        i += 2 * n;
    }
    let mut acc = s.hsum(s.add(a0, a1));
    for &v in &x[i..] {
        acc += v;
    }
    acc
}

/// out = (x - c) * a * w (+ b)
#[inline(always)]
unsafe fn norm_apply<S: Simd>(
    s: S,
    x: &[f32],
    c: f32,
    a: f32,
    w: &[f32],
    b: Option<&[f32]>,
    out: &mut [f32],
) {
    let n = S::N;
    let len = x.len();
    let (xp, wp, op) = (x.as_ptr(), w.as_ptr(), out.as_mut_ptr());
    let (cv, av) = (s.splat(c), s.splat(a));
    let mut i = 0;
    while i + n <= len {
        let v = s.mul(s.mul(s.sub(s.load(xp.add(i)), cv), av), s.load(wp.add(i)));
        let v = match b {
            Some(b) => s.add(v, s.load(b.as_ptr().add(i))),
            None => v,
        };
        s.store(op.add(i), v);
        i += n;
    }
    for j in i..len {
        let v = (x[j] - c) * a * w[j];
        out[j] = match b {
            Some(b) => v + b[j],
            None => v,
        };
    }
}

#[inline(always)]
pub(crate) unsafe fn rmsnorm<S: Simd>(s: S, x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let ms = sumsq(s, x, 0.0) / x.len().max(1) as f32;
    let inv = 1.0 / (ms + eps).sqrt();
    norm_apply(s, x, 0.0, inv, w, None, out);
}

#[inline(always)]
pub(crate) unsafe fn layernorm<S: Simd>(
    s: S,
    x: &[f32],
    w: &[f32],
    b: &[f32],
    eps: f32,
    out: &mut [f32],
) {
    let nn = x.len().max(1) as f32;
    let mean = sum(s, x) / nn;
    let var = sumsq(s, x, mean) / nn;
    let inv = 1.0 / (var + eps).sqrt();
    norm_apply(s, x, mean, inv, w, Some(b), out);
}

#[inline(always)]
pub(crate) unsafe fn softmax<S: Simd>(s: S, x: &mut [f32]) {
    let (n, p) = (S::N, x.as_mut_ptr());
    let len = x.len();
    if len == 0 {
        return;
    }
    let mut mv = s.splat(f32::NEG_INFINITY);
    let mut i = 0;
    while i + n <= len {
        mv = s.max(mv, s.load(p.add(i)));
        i += n;
    }
    let mut mx = s.hmax(mv);
    for &v in &x[i..] {
        mx = mx.max(v);
    }
    let mxv = s.splat(mx);
    let mut acc = s.splat(0.0);
    let mut i = 0;
    while i + n <= len {
        let e = exp(s, s.sub(s.load(p.add(i)), mxv));
        s.store(p.add(i), e);
        acc = s.add(acc, e);
        i += n;
    }
    let mut total = s.hsum(acc);
    if i < len {
        // Padding lanes are excluded from the sum by storing only the live lanes and summing
        // them in scalar.
        let e = exp(s, s.sub(load_tail(s, p.add(i), len - i), mxv));
        store_tail(s, p.add(i), len - i, e);
        for &v in &x[i..] {
            total += v;
        }
    }
    scale(s, x, 1.0 / total);
}

#[inline(always)]
pub(crate) unsafe fn rope<S: Simd>(s: S, x: &mut [f32], hd: usize, cos: &[f32], sin: &[f32]) {
    let n = S::N;
    let half = hd / 2;
    let (cp, sp) = (cos.as_ptr(), sin.as_ptr());
    for head in x.chunks_exact_mut(hd) {
        let p = head.as_mut_ptr();
        let mut i = 0;
        while i + n <= half {
            let a = s.load(p.add(i));
            let b = s.load(p.add(i + half));
            let c = s.load(cp.add(i));
            let sn = s.load(sp.add(i));
            s.store(p.add(i), s.sub(s.mul(a, c), s.mul(b, sn)));
            s.store(p.add(i + half), s.fma(a, sn, s.mul(b, c)));
            i += n;
        }
        for j in i..half {
            let (a, b) = (head[j], head[j + half]);
            head[j] = a * cos[j] - b * sin[j];
            head[j + half] = b * cos[j] + a * sin[j];
        }
    }
}

#[inline(always)]
pub(crate) unsafe fn add<S: Simd>(s: S, x: &mut [f32], y: &[f32]) {
    let (n, p, q) = (S::N, x.as_mut_ptr(), y.as_ptr());
    let len = x.len().min(y.len());
    let mut i = 0;
    while i + n <= len {
        s.store(p.add(i), s.add(s.load(p.add(i)), s.load(q.add(i))));
        i += n;
    }
    for j in i..len {
        x[j] += y[j];
    }
}

#[inline(always)]
pub(crate) unsafe fn scale<S: Simd>(s: S, x: &mut [f32], a: f32) {
    let (n, p) = (S::N, x.as_mut_ptr());
    let av = s.splat(a);
    let mut i = 0;
    while i + n <= x.len() {
        s.store(p.add(i), s.mul(s.load(p.add(i)), av));
        i += n;
    }
    for v in &mut x[i..] {
        *v *= a;
    }
}

#[inline(always)]
pub(crate) unsafe fn axpy<S: Simd>(s: S, y: &mut [f32], a: f32, x: &[f32]) {
    let (n, p, q) = (S::N, y.as_mut_ptr(), x.as_ptr());
    let len = x.len().min(y.len());
    let av = s.splat(a);
    let mut i = 0;
    while i + n <= len {
        s.store(p.add(i), s.fma(av, s.load(q.add(i)), s.load(p.add(i))));
        i += n;
    }
    for j in i..len {
        y[j] += a * x[j];
    }
}

/// The padding of attention's key and score rows: a multiple of every tier's lane count, so
/// [`attn_scores`] reads and writes whole vectors and never takes a scalar tail whose extent
/// would depend on the length (and so on how a prompt was chunked).
pub const ATT_PAD: usize = 16;

/// Attention's scores: `scores[r·ld + j]` = Σ_d q[r·hd + d] · kt[d·stride + j] for j < len
/// (`kt` a kv head's keys transposed: row d holds dimension d of every position, `stride`
/// apart). Each score is summed in order of d by multiply-adds from zero, each position in
/// its own vector lane, so a query's scores have the same bits whatever other queries share
/// the call and however long the keys are. Entries len..len rounded up to [`ATT_PAD`] are
/// written with values to ignore; `stride` and `ld` must leave room for them.
#[inline(always)]
pub(crate) unsafe fn attn_scores<S: Simd>(
    s: S,
    kt: &[f32],
    stride: usize,
    len: usize,
    q: &[f32],
    n: usize,
    ld: usize,
    scores: &mut [f32],
) {
    assert!(
        n > 0 && q.len().is_multiple_of(n),
        "attn_scores: q is not (n, hd)"
    );
    let hd = q.len() / n;
    let end = len.next_multiple_of(ATT_PAD);
    assert!(end <= stride && end <= ld, "attn_scores: rows not padded");
    assert!(
        hd == 0 || kt.len() >= (hd - 1) * stride + end,
        "attn_scores: keys too short"
    );
    assert!(
        scores.len() >= (n - 1) * ld + end,
        "attn_scores: scores too short"
    );
    let mut r = 0;
    while r < n {
        let take = rows_at_once::<S>(n - r);
        match take {
            4 => scores_rows::<S, 4>(s, kt, stride, end, q, hd, r, ld, scores),
            2 => scores_rows::<S, 2>(s, kt, stride, end, q, hd, r, ld, scores),
            _ => scores_rows::<S, 1>(s, kt, stride, end, q, hd, r, ld, scores),
        }
        r += take;
    }
}

/// How many of `left` rows the attention kernels take at once: four rows × four vectors of
/// sums fill half of AVX-512's 32 registers; with 16 registers, two rows.
#[inline(always)]
fn rows_at_once<S: Simd>(left: usize) -> usize {
    if S::N >= 16 && left >= 4 {
        4
    } else if left >= 2 {
        2
    } else {
        1
    }
}

/// [`attn_scores`] for query rows r0..r0 + R, positions 0..end (a multiple of N).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn scores_rows<S: Simd, const R: usize>(
    s: S,
    kt: &[f32],
    stride: usize,
    end: usize,
    q: &[f32],
    hd: usize,
    r0: usize,
    ld: usize,
    scores: &mut [f32],
) {
    let nl = S::N;
    let mut j0 = 0;
    // A lone query (decode) needs eight independent sums in flight to hide the FMA latency.
    while R == 1 && end - j0 >= 8 * nl {
        scores_tile::<S, R, 8>(s, kt, stride, j0, q, hd, r0, ld, scores);
        j0 += 8 * nl;
    }
    while j0 < end {
        if end - j0 >= 4 * nl {
            scores_tile::<S, R, 4>(s, kt, stride, j0, q, hd, r0, ld, scores);
            j0 += 4 * nl;
        } else {
            scores_tile::<S, R, 1>(s, kt, stride, j0, q, hd, r0, ld, scores);
            j0 += nl;
        }
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn scores_tile<S: Simd, const R: usize, const NV: usize>(
    s: S,
    kt: &[f32],
    stride: usize,
    j0: usize,
    q: &[f32],
    hd: usize,
    r0: usize,
    ld: usize,
    scores: &mut [f32],
) {
    let nl = S::N;
    let (kp, qp, sp) = (kt.as_ptr(), q.as_ptr(), scores.as_mut_ptr());
    let mut acc = [[s.splat(0.0); NV]; R];
    for d in 0..hd {
        let mut x = [s.splat(0.0); NV];
        for (c, x) in x.iter_mut().enumerate() {
            *x = s.load(kp.add(d * stride + j0 + c * nl));
        }
        for (i, acc) in acc.iter_mut().enumerate() {
            let a = s.splat(*qp.add((r0 + i) * hd + d));
            for c in 0..NV {
                acc[c] = s.fma(a, x[c], acc[c]);
            }
        }
    }
    for (i, acc) in acc.iter().enumerate() {
        for (c, &v) in acc.iter().enumerate() {
            s.store(sp.add((r0 + i) * ld + j0 + c * nl), v);
        }
    }
}

/// Attention's outputs: row r of `out` (`hd` values) = Σ_{j < lens[r]} p[r·ld + j] · v[j]
/// (`v` rows of `hd` values: a kv head's values by position). Each element is summed in
/// order of j by multiply-adds from zero, so a row gets the same bits whatever other rows
/// share the call: a prompt token's attention does not depend on how the prompt was chunked
/// or batched. Rows are taken a few at a time so each value row loaded serves all of them.
#[inline(always)]
pub(crate) unsafe fn attn_values<S: Simd>(
    s: S,
    v: &[f32],
    hd: usize,
    p: &[f32],
    ld: usize,
    lens: &[usize],
    out: &mut [f32],
) {
    let nr = lens.len();
    assert_eq!(out.len(), nr * hd, "attn_values: out is not (rows, hd)");
    let end = lens.iter().copied().max().unwrap_or(0);
    assert!(v.len() >= end * hd, "attn_values: too few value rows");
    assert!(
        lens.iter()
            .enumerate()
            .all(|(r, &l)| l == 0 || r * ld + l <= p.len()),
        "attn_values: weights too short"
    );
    let mut r = 0;
    while r < nr {
        let take = rows_at_once::<S>(nr - r);
        match take {
            4 => values_rows::<S, 4>(s, v, hd, p, ld, &lens[r..r + 4], r, out),
            2 => values_rows::<S, 2>(s, v, hd, p, ld, &lens[r..r + 2], r, out),
            _ => values_rows::<S, 1>(s, v, hd, p, ld, &lens[r..r + 1], r, out),
        }
        r += take;
    }
}

/// [`attn_values`] for rows r0..r0 + R: four vectors of each row at a time, then one.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn values_rows<S: Simd, const R: usize>(
    s: S,
    v: &[f32],
    hd: usize,
    p: &[f32],
    ld: usize,
    lens: &[usize],
    r0: usize,
    out: &mut [f32],
) {
    let nl = S::N;
    let hv = hd - hd % nl;
    let mut d0 = 0;
    while d0 < hv {
        if hv - d0 >= 4 * nl {
            values_tile::<S, R, 4>(s, v, hd, p, ld, lens, r0, d0, out);
            d0 += 4 * nl;
        } else {
            values_tile::<S, R, 1>(s, v, hd, p, ld, lens, r0, d0, out);
            d0 += nl;
        }
    }
    // The last hd % N values of each row, one at a time (the same order).
    let (vp, pp, op) = (v.as_ptr(), p.as_ptr(), out.as_mut_ptr());
    for (i, &len) in lens.iter().enumerate() {
        for d in hv..hd {
            let mut a = 0f32;
            for j in 0..len {
                a = (*pp.add((r0 + i) * ld + j)).mul_add(*vp.add(j * hd + d), a);
            }
            *op.add((r0 + i) * hd + d) = a;
        }
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn values_tile<S: Simd, const R: usize, const NV: usize>(
    s: S,
    v: &[f32],
    hd: usize,
    p: &[f32],
    ld: usize,
    lens: &[usize],
    r0: usize,
    d0: usize,
    out: &mut [f32],
) {
    let nl = S::N;
    let (vp, pp, op) = (v.as_ptr(), p.as_ptr(), out.as_mut_ptr());
    let end = lens.iter().copied().max().unwrap_or(0);
    let mut acc = [[s.splat(0.0); NV]; R];
    for j in 0..end {
        let mut x = [s.splat(0.0); NV];
        for (c, x) in x.iter_mut().enumerate() {
            *x = s.load(vp.add(j * hd + d0 + c * nl));
        }
        for (i, acc) in acc.iter_mut().enumerate() {
            if j < lens[i] {
                let a = s.splat(*pp.add((r0 + i) * ld + j));
                for c in 0..NV {
                    acc[c] = s.fma(a, x[c], acc[c]);
                }
            }
        }
    }
    for (i, acc) in acc.iter().enumerate() {
        for (c, &v) in acc.iter().enumerate() {
            s.store(op.add((r0 + i) * hd + d0 + c * nl), v);
        }
    }
}

/// Spin independent FMA chains for `iters` rounds (the probe's FMA peak): 2·N·12 FLOP a round.
#[inline(always)]
pub(crate) unsafe fn burn<S: Simd>(s: S, iters: usize) -> f32 {
    let mut acc = [s.splat(0.0); 12];
    for (i, a) in acc.iter_mut().enumerate() {
        *a = s.splat(i as f32 * 1e-3);
    }
    let (m, c) = (s.splat(0.999_999), s.splat(1e-7));
    for _ in 0..iters {
        for a in acc.iter_mut() {
            *a = s.fma(*a, m, c);
        }
    }
    let mut t = s.splat(0.0);
    for a in acc {
        t = s.add(t, a);
    }
    s.hsum(t)
}

/// Sum `x` as `STREAMS` sequential streams far apart, a cache line per stream per step:
/// several streams keep more lines in flight than one, and which count streams fastest differs
/// between machines, so the probe tries several (see [`READERS`]). With `PF`, each stream also
/// prefetches 1 KiB ahead into L1, as the matvec kernels do.
#[inline(always)]
pub(crate) unsafe fn read<S: Simd, const STREAMS: usize, const PF: bool>(s: S, x: &[f32]) -> f32 {
    const LINE: usize = 16; // f32 per 64-byte cache line
    const AHEAD: usize = 256; // f32 = 1 KiB
    let len = x.len() / STREAMS / LINE * LINE;
    let p = x.as_ptr();
    let mut acc = [s.splat(0.0); STREAMS];
    let mut i = 0;
    while i < len {
        for (j, a) in acc.iter_mut().enumerate() {
            if PF {
                prefetch(p.wrapping_add(j * len + i + AHEAD));
            }
            let mut v = 0;
            while v < LINE {
                *a = s.add(*a, s.load(p.add(j * len + i + v)));
                v += S::N;
            }
        }
        i += LINE;
    }
    let mut t = s.splat(0.0);
    for a in acc {
        t = s.add(t, a);
    }
    s.hsum(t) + x[STREAMS * len..].iter().sum::<f32>()
}

/// The probe's readers: (streams per thread, prefetch), in the order of `Table::read`.
pub(crate) const READERS: [(usize, bool); 4] = [(2, false), (4, false), (8, false), (4, true)];

/// Per-tier fn-pointer table from the generic bodies. `$attr` is the wrappers' attribute
/// (`target_feature(enable = "...")`, or `inline` for the portable tier); invoke once per module;
/// `simd`: the tier's [`Simd`] token (a unit struct); `op_tile`: the outer-product tile (weight rows × token vectors);
/// `packed_tile`: the pre-packed-weights tile (tokens × vectors of output columns);
/// `quant_dot`/`quant_dot4`: block-format dots (default: the oracle's).
macro_rules! tier_table {
    // Named form, without quantized dots: the oracle's.
    ($name:ident {
        simd: $S:ident,
        attr: $attr:meta,
        op_tile: ($mr:literal, $nv:literal),
        packed_tile: ($pt:literal, $pnv:literal),
        bf16_matmul: $bf16mm:expr,
        bf16_burn: $bf16burn:expr $(,)?
    }) => {
        crate::simd::tier_table!($name {
            simd: $S,
            attr: $attr,
            op_tile: ($mr, $nv),
            packed_tile: ($pt, $pnv),
            bf16_matmul: $bf16mm,
            bf16_burn: $bf16burn,
            quant_dot: crate::quant::scalar::vec_dot,
            quant_dot4: crate::quant::scalar::vec_dot4,
            quant_rows: crate::quant::scalar::matvec_rows,
            quant_tile: crate::quant::scalar::matmul_tile,
        });
    };
    ($name:ident {
        simd: $S:ident,
        attr: $attr:meta,
        op_tile: ($mr:literal, $nv:literal),
        packed_tile: ($pt:literal, $pnv:literal),
        bf16_matmul: $bf16mm:expr,
        bf16_burn: $bf16burn:expr,
        quant_dot: $qdot:expr,
        quant_dot4: $qdot4:expr,
        quant_rows: $qrows:expr,
        quant_tile: $qtile:expr $(,)?
    }) => {
        use crate::simd as g;
        use crate::Weights;
        // SAFETY (all wrappers below): the table holding these fns is only handed out by
        // `Kernels::for_isa` after the CPU was checked for the features in `$attr`.
        #[$attr]
        unsafe fn dot_(w: Weights<'_>, x: &[f32]) -> f32 {
            g::dot($S, w, x)
        }
        #[$attr]
        unsafe fn matvec_ld_(w: Weights<'_>, ld: usize, x: &[f32], y: &mut [f32]) {
            g::matvec_ld($S, w, ld, x, y)
        }
        #[$attr]
        unsafe fn matmul_(j: &g::MatmulJob<'_>, r0: usize, r1: usize) {
            if j.xp.is_empty() {
                g::matmul_few($S, j, r0, r1)
            } else {
                g::matmul_op::<_, $mr, $nv>($S, j, r0, r1)
            }
        }
        #[$attr]
        unsafe fn matmul_pw_(j: &g::PwJob<'_>, p0: usize, p1: usize) {
            g::matmul_pw::<_, $pt, $pnv>($S, j, p0, p1)
        }
        #[$attr]
        unsafe fn rmsnorm_(x: &[f32], w: &[f32], e: f32, o: &mut [f32]) {
            g::rmsnorm($S, x, w, e, o)
        }
        #[$attr]
        unsafe fn layernorm_(x: &[f32], w: &[f32], b: &[f32], e: f32, o: &mut [f32]) {
            g::layernorm($S, x, w, b, e, o)
        }
        #[$attr]
        unsafe fn attn_values_(
            v: &[f32],
            hd: usize,
            p: &[f32],
            ld: usize,
            lens: &[usize],
            out: &mut [f32],
        ) {
            g::attn_values($S, v, hd, p, ld, lens, out)
        }
        #[$attr]
        #[allow(clippy::too_many_arguments)]
        unsafe fn attn_scores_(
            kt: &[f32],
            stride: usize,
            len: usize,
            q: &[f32],
            n: usize,
            ld: usize,
            scores: &mut [f32],
        ) {
            g::attn_scores($S, kt, stride, len, q, n, ld, scores)
        }
        #[$attr]
        unsafe fn softmax_(x: &mut [f32]) {
            g::softmax($S, x)
        }
        #[$attr]
        unsafe fn silu_(x: &mut [f32]) {
            g::silu($S, x)
        }
        #[$attr]
        unsafe fn silu_mul_(x: &mut [f32], u: &[f32]) {
            g::silu_mul($S, x, u)
        }
        #[$attr]
        unsafe fn gelu_(x: &mut [f32]) {
            g::gelu($S, x)
        }
        #[$attr]
        unsafe fn rope_(x: &mut [f32], hd: usize, c: &[f32], s: &[f32]) {
            g::rope($S, x, hd, c, s)
        }
        #[$attr]
        unsafe fn add_(x: &mut [f32], y: &[f32]) {
            g::add($S, x, y)
        }
        #[$attr]
        unsafe fn scale_(x: &mut [f32], a: f32) {
            g::scale($S, x, a)
        }
        #[$attr]
        unsafe fn axpy_(y: &mut [f32], a: f32, x: &[f32]) {
            g::axpy($S, y, a, x)
        }
        #[$attr]
        unsafe fn to_f32_(w: Weights<'_>, o: &mut [f32]) {
            g::to_f32($S, w, o)
        }
        #[$attr]
        unsafe fn burn_(iters: usize) -> f32 {
            g::burn($S, iters)
        }
        #[$attr]
        unsafe fn read2_(x: &[f32]) -> f32 {
            g::read::<_, 2, false>($S, x)
        }
        #[$attr]
        unsafe fn read4_(x: &[f32]) -> f32 {
            g::read::<_, 4, false>($S, x)
        }
        #[$attr]
        unsafe fn read8_(x: &[f32]) -> f32 {
            g::read::<_, 8, false>($S, x)
        }
        #[$attr]
        unsafe fn read4pf_(x: &[f32]) -> f32 {
            g::read::<_, 4, true>($S, x)
        }

        pub(crate) static $name: crate::Table = crate::Table {
            dot: |w, x| unsafe { dot_(w, x) },
            matvec_ld: |w, ld, x, y| unsafe { matvec_ld_(w, ld, x, y) },
            matmul: |j, a, b| unsafe { matmul_(j, a, b) },
            matmul_bf16: $bf16mm,
            op_width: $nv * <$S as g::Simd>::N,
            op_rows: $mr,
            matmul_pw: |j, a, b| unsafe { matmul_pw_(j, a, b) },
            pw_panel: $pnv * <$S as g::Simd>::N,
            rmsnorm: |x, w, e, o| unsafe { rmsnorm_(x, w, e, o) },
            layernorm: |x, w, b, e, o| unsafe { layernorm_(x, w, b, e, o) },
            softmax: |x| unsafe { softmax_(x) },
            attn_scores: |kt, st, len, q, n, ld, sc| unsafe {
                attn_scores_(kt, st, len, q, n, ld, sc)
            },
            attn_values: |v, hd, p, ld, lens, out| unsafe { attn_values_(v, hd, p, ld, lens, out) },
            silu: |x| unsafe { silu_(x) },
            silu_mul: |x, u| unsafe { silu_mul_(x, u) },
            gelu: |x| unsafe { gelu_(x) },
            rope: |x, h, c, s| unsafe { rope_(x, h, c, s) },
            add: |x, y| unsafe { add_(x, y) },
            scale: |x, a| unsafe { scale_(x, a) },
            axpy: |y, a, x| unsafe { axpy_(y, a, x) },
            to_f32: |w, o| unsafe { to_f32_(w, o) },
            burn: |i| unsafe { burn_(i) },
            read: [
                |x| unsafe { read2_(x) },
                |x| unsafe { read4_(x) },
                |x| unsafe { read8_(x) },
                |x| unsafe { read4pf_(x) },
            ],
            bf16_burn: $bf16burn,
            qdot: $qdot,
            qdot4: $qdot4,
            qrows: $qrows,
            qtile: $qtile,
        };
    };
}
pub(crate) use tier_table;
