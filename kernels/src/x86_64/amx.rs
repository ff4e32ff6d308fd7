//! AMX (Advanced Matrix Extensions) bf16 matmul: `tdpbf16ps` on 16×16 f32 tiles.
//!
//! Y = X Wᵀ is computed as Cᵀ = W · Xᵀ so the mmap'd bf16 weights are the A operand as they
//! lie: a tile is 16 rows × 32 bf16 (64 bytes) of W loaded with stride k·2 bytes. The B
//! operand is X rounded to bf16 (round to nearest even, like the AVX-512 BF16 dot path) and
//! packed once per call in the VNNI layout `tdpbf16ps` wants (see [`pack_x`]). Accumulation
//! is f32, so the accuracy class is that of `Precision::Bf16Dot`: each product carries a
//! relative error ≤ 2^-9 from rounding the activation. Stable Rust has no AMX intrinsics, so
//! the instructions are written with `asm!`.
//!
//! Block-format weights (GGUF's Q4_0 ... Q6_K) take the same path for a model's prompt rows:
//! each 32-row slab is dequantized (the oracle's values, rounded to bf16: ≤ 2^-9 relative per
//! weight) into the packed A tiles it is copied into anyway, once for every token of the call.
//! Prefill of TinyLlama-1.1B, 128 tokens, 2 threads, Sapphire Rapids, against the AVX-512
//! VNNI integer path (alternating runs, tok/s): Q4_0 52-75 → 95-153 (4 of 4), Q4_K_M 68-81 →
//! 100-115 (4 of 4), Q8_0 62-69 → 104-110 (4 of 4), with the oracle's scalar dequantization
//! compiled for AVX-512 here. The rounding is finer than the integer path's int8 activations
//! (2^-8 of a block's largest value), so the prompt is, if anything, closer to the f32 product.
//!
//! Linux hands out tile state only after `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`;
//! [`available`] asks once per process and says no if the CPU lacks AMX or the kernel refuses.

use crate::simd::MatmulJob;
use crate::Weights;
use core::arch::asm;
use core::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
use std::sync::OnceLock;

/// Tokens per B tile and weight rows per A/C tile.
const T: usize = 16;
/// bf16 elements of K per tile step (64 bytes of a row).
const KB: usize = 32;

/// Whether this CPU reports AMX-TILE and AMX-BF16 (CPUID leaf 7: EDX bits 24 and 22).
pub(crate) fn cpu_has_amx() -> bool {
    use core::arch::x86_64::__cpuid_count;
    // Leaf 7 only where the CPU has it (max leaf in leaf 0's EAX).
    if __cpuid_count(0, 0).eax < 7 {
        return false;
    }
    let edx = __cpuid_count(7, 0).edx;
    edx & (1 << 24) != 0 && edx & (1 << 22) != 0
}

/// `arch_prctl(code, arg)`; returns the raw syscall result (0 = success, -errno).
fn arch_prctl(code: u64, arg: u64) -> i64 {
    let ret: i64;
    // SAFETY: arch_prctl (158) with ARCH_REQ_XCOMP_PERM / ARCH_GET_XCOMP_PERM only changes or
    // reads this process's permitted XSAVE features; GET writes one u64 through `arg`, which
    // callers point at a live local. The syscall clobbers rcx and r11.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") 158i64 => ret,
            in("rdi") code,
            in("rsi") arg,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret
}

const ARCH_GET_XCOMP_PERM: u64 = 0x1022;
const ARCH_REQ_XCOMP_PERM: u64 = 0x1023;
const XFEATURE_XTILEDATA: u64 = 18;

/// AMX usable in this process: CPU support, and Linux granted tile-data permission (asked once).
pub(crate) fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        if !cfg!(target_os = "linux") || !cpu_has_amx() {
            return false;
        }
        if arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0 {
            return false;
        }
        let mut perm = 0u64;
        let r = arch_prctl(ARCH_GET_XCOMP_PERM, &mut perm as *mut u64 as u64);
        r == 0 && perm & (1 << XFEATURE_XTILEDATA) != 0 && perm & (1 << 17) != 0
    })
}

/// Palette-1 tile configuration: every tile is 16 rows × 64 bytes.
/// tmm0..3: C (16 weight rows × 16 tokens, f32); tmm4,5: A (16 W rows × 32 bf16);
/// tmm6,7: B (16 k-pairs × 16 tokens × 2 bf16).
#[repr(C, align(64))]
struct TileCfg([u8; 64]);

const CFG: TileCfg = {
    let mut c = [0u8; 64];
    c[0] = 1; // palette
    let mut i = 0;
    while i < 8 {
        c[16 + 2 * i] = 64; // colsb (u16, little endian)
        c[48 + i] = 16; // rows
        i += 1;
    }
    TileCfg(c)
};

/// f32 → bf16 bits, round to nearest even; NaN stays a (quiet) NaN.
#[inline(always)]
fn to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// Elements of the packed X for `n` tokens and `k` columns.
pub(crate) fn packed_len(n: usize, k: usize) -> usize {
    n.div_ceil(2 * T) * 2 * T * k.next_multiple_of(KB)
}

/// Pack X (n, k) as bf16 B tiles: token block `b` (16 tokens, n padded with zero tokens to a
/// multiple of 32), k-pair `p` (k padded with zeros to a multiple of 32), token `t`:
/// `xp[((b·kp/2 + p)·16 + t)·2 + e] = bf16(X[16b + t][2p + e])`. One B tile (16 k-pairs) is
/// then 1 KiB of contiguous memory: row stride 64 bytes.
pub(crate) fn pack_x(x: &[f32], n: usize, k: usize, xp: &mut [u16]) {
    let kp = k.next_multiple_of(KB);
    let blk = kp * T; // u16 per token block
    debug_assert_eq!(xp.len(), packed_len(n, k));
    // Written in order, one 64-byte row (16 tokens' pairs) at a time, from 16 row streams.
    let fill = |b: usize, dst: &mut [u16]| {
        let toks = n.saturating_sub(b * T).min(T);
        let rows: [&[f32]; T] = std::array::from_fn(|t| {
            if t < toks {
                &x[(b * T + t) * k..][..k]
            } else {
                &[]
            }
        });
        let full = k / 2; // k-pairs with both elements inside k
        for (p, d) in dst.chunks_exact_mut(2 * T).enumerate() {
            if p < full && toks == T {
                for t in 0..T {
                    d[2 * t] = to_bf16(rows[t][2 * p]);
                    d[2 * t + 1] = to_bf16(rows[t][2 * p + 1]);
                }
            } else {
                for t in 0..T {
                    let at = |i: usize| {
                        if t < toks && i < k {
                            to_bf16(rows[t][i])
                        } else {
                            0
                        }
                    };
                    d[2 * t] = at(2 * p);
                    d[2 * t + 1] = at(2 * p + 1);
                }
            }
        }
    };
    // In parallel only where there is a pool to share it (one thread: stay on the caller).
    if n * k >= 1 << 15 && rayon::current_num_threads() > 1 {
        use rayon::prelude::*;
        xp.par_chunks_mut(blk)
            .enumerate()
            .for_each(|(b, d)| fill(b, d));
    } else {
        for (b, d) in xp.chunks_mut(blk).enumerate() {
            fill(b, d)
        }
    }
}

/// Columns r0..r1 of Y (= W rows r0..r1) from `job.xb`, which holds X packed by [`pack_x`].
///
/// # Safety
/// [`available`] must be true; `job.w` bf16 or block-format (m, k) (see
/// `crate::amx_takes`) and `job.xb` packed for (n, k); callers
/// give concurrent calls disjoint row ranges of Y.
pub(crate) unsafe fn matmul_rows(job: &MatmulJob<'_>, r0: usize, r1: usize) {
    let (n, k, m, y) = (job.n, job.k, job.m, job.y);
    debug_assert!(r1 <= m && job.xb.len() == packed_len(n, k));
    debug_assert!(crate::amx_takes(job.w));
    let kp = k.next_multiple_of(KB);
    let (kfull, ktail) = (k / KB, k % KB);
    // W's rows by bytes (bf16, or blocks: a block-format row is dequantized into `row` below).
    let row_bytes = job.w.format().row_bytes(k).expect("whole blocks per row");
    let wb = job.w.as_byte_ptr();
    let bf16 = matches!(job.w, Weights::Bf16(_));
    let mut row_f32: Vec<f32> = if bf16 { Vec::new() } else { vec![0.0; k] };
    let mut row: Vec<u16> = if bf16 { Vec::new() } else { vec![0; kp] };
    let xb = job.xb.as_ptr();
    let tblocks = n.div_ceil(2 * T); // pairs of token blocks

    // Each 32-row slab of W is first copied into `apack` as A tiles: block i (rows 16i..),
    // k-step s: 16 rows × 32 bf16 = 1 KiB contiguous. Loading tiles straight from W touches 16
    // rows (16 pages) per load, every token block again; packed, the later loads are
    // contiguous L2 hits. Rows past m and columns past k are zero.
    let ksteps = kp / KB;
    let mut apack: Vec<u16> = vec![0; 2 * ksteps * T * KB];
    // The 2×2 C tiles of each token-block pair of the current 32-row slab.
    let mut c: Vec<Ctiles> = (0..tblocks).map(|_| Ctiles([0.0; 4 * T * T])).collect();

    // SAFETY: CFG is a valid palette-1 configuration; tile state is per thread and released
    // below, and `available` obtained the kernel's permission.
    asm!("ldtilecfg [{}]", in(reg) &CFG as *const TileCfg, options(nostack, readonly));

    let mut rb = r0;
    while rb < r1 {
        let rows = (r1 - rb).min(2 * T);
        let h = [rows.min(T), rows.saturating_sub(T)];
        for i in 0..2 {
            for r in 0..T {
                let dst = apack.as_mut_ptr().add(i * ksteps * T * KB + r * KB);
                if r >= h[i] {
                    for st in 0..ksteps {
                        std::ptr::write_bytes(dst.add(st * T * KB), 0, KB);
                    }
                    continue;
                }
                // SAFETY: row rb+16i+r lies in W (m, k); each step writes one 64-byte row of
                // a tile inside `apack`.
                let wr = rb + i * T + r;
                let mut src = wb.add(wr * row_bytes) as *const u16;
                if !bf16 {
                    dequant_bf16(job.w.row(wr, k), &mut row_f32, &mut row);
                    src = row.as_ptr();
                }
                for st in 0..kfull {
                    std::ptr::copy_nonoverlapping(src.add(st * KB), dst.add(st * T * KB), KB);
                }
                if ktail > 0 {
                    let d = dst.add(kfull * T * KB);
                    std::ptr::copy_nonoverlapping(src.add(kfull * KB), d, ktail);
                    std::ptr::write_bytes(d.add(ktail), 0, KB - ktail);
                }
            }
        }
        let (a0, a1) = (apack.as_ptr(), apack.as_ptr().add(ksteps * T * KB));
        // While this slab computes, prefetch the next one's rows, spread over all its k-steps:
        // the first token-block pair reads the slab from memory, 16 rows (pages) per tile
        // load, and would otherwise wait on DRAM latency at every step.
        let next = (rb + 2 * T).min(m);
        let next_rows = (m - next).min(2 * T);
        let lines = row_bytes / 64; // whole 64-byte lines per row
        let per_step = (next_rows * lines).div_ceil(tblocks * ksteps);
        for tb in 0..tblocks {
            let b0 = xb.add(2 * tb * kp * T);
            let b1 = b0.add(kp * T);
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack, nomem)
            );
            // SAFETY (the steps and the store): A tiles lie in `apack` (ksteps of 1 KiB per
            // block); B tiles lie in the packed X, which covers kp columns of 2·tblocks token
            // blocks; `c[tb]` is one `Ctiles`.
            for st in 0..ksteps {
                let first = (tb * ksteps + st) * per_step;
                for l in first..(first + per_step).min(next_rows * lines) {
                    let p = wb.add((next + l / lines) * row_bytes + (l % lines) * 64);
                    _mm_prefetch::<_MM_HINT_T0>(p as *const i8);
                }
                step(
                    a0.add(st * T * KB),
                    a1.add(st * T * KB),
                    KB * 2,
                    KB * 2,
                    b0.add(st * KB * T),
                    b1.add(st * KB * T),
                );
            }
            ctiles(c[tb].0.as_mut_ptr());
        }
        for tb in 0..tblocks {
            // C tile (i, j): W rows rb+16i.., tokens 32tb+16j..; Y[t][r] = C[r][t].
            for i in 0..2 {
                for j in 0..2 {
                    let ct = &c[tb].0[(2 * i + j) * T * T..][..T * T];
                    let t0 = 2 * tb * T + j * T;
                    for t in 0..T.min(n.saturating_sub(t0)) {
                        // SAFETY: (t0+t, rb+16i+r) lies in Y (n, m) and in this call's rows.
                        let yr = y.add((t0 + t) * m + rb + i * T);
                        for r in 0..h[i] {
                            *yr.add(r) = ct[r * T + t];
                        }
                    }
                }
            }
        }
        rb += rows;
    }
    // SAFETY: ends this thread's use of tile state (set up by ldtilecfg above).
    asm!("tilerelease", options(nostack, nomem));
}

/// A block-format row's values (the oracle's dequantization) rounded to bf16 into `out`
/// (zeros past the row stay zero), through `f`. Compiled for AVX-512 so that the oracle's
/// loops, inlined here, vectorize.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn dequant_bf16(w: Weights<'_>, f: &mut [f32], out: &mut [u16]) {
    crate::quant::scalar::dequantize(w, f);
    for (d, &v) in out.iter_mut().zip(f.iter()) {
        *d = to_bf16(v);
    }
}

#[repr(C, align(64))]
struct Ctiles([f32; 4 * T * T]);

/// Store the four C tiles tmm0..3 to `cp` (four 16×16 f32 tiles, row stride 64 bytes).
///
/// # Safety
/// `cp` points at a `Ctiles`; tiles configured by `matmul_rows`.
#[inline(always)]
unsafe fn ctiles(cp: *mut f32) {
    asm!(
        "tilestored [{c0} + {s}*1], tmm0",
        "tilestored [{c1} + {s}*1], tmm1",
        "tilestored [{c2} + {s}*1], tmm2",
        "tilestored [{c3} + {s}*1], tmm3",
        c0 = in(reg) cp,
        c1 = in(reg) cp.add(T * T),
        c2 = in(reg) cp.add(2 * T * T),
        c3 = in(reg) cp.add(3 * T * T),
        s = in(reg) 64usize,
        options(nostack),
    );
}

/// One k-step of the 2×2 block: C(i,j) += A_i · B_j.
///
/// # Safety
/// Tiles configured by `matmul_rows`; each pointer addresses 16 rows of 64 readable bytes at
/// its stride (B tiles: 64).
#[inline(always)]
unsafe fn step(
    a0: *const u16,
    a1: *const u16,
    s0: usize,
    s1: usize,
    b0: *const u16,
    b1: *const u16,
) {
    asm!(
        "tileloadd tmm4, [{a0} + {s0}*1]",
        "tileloadd tmm6, [{b0} + {sb}*1]",
        "tileloadd tmm7, [{b1} + {sb}*1]",
        "tileloadd tmm5, [{a1} + {s1}*1]",
        "tdpbf16ps tmm0, tmm4, tmm6",
        "tdpbf16ps tmm1, tmm4, tmm7",
        "tdpbf16ps tmm2, tmm5, tmm6",
        "tdpbf16ps tmm3, tmm5, tmm7",
        a0 = in(reg) a0,
        a1 = in(reg) a1,
        s0 = in(reg) s0,
        s1 = in(reg) s1,
        b0 = in(reg) b0,
        b1 = in(reg) b1,
        sb = in(reg) 64usize,
        options(nostack, readonly),
    );
}

/// `iters` rounds of four independent `tdpbf16ps` on tiles in registers (the probe's AMX
/// peak): 4 · 16·16·32 · 2 FLOP a round.
///
/// # Safety
/// [`available`] must be true.
pub(crate) unsafe fn burn(iters: usize) -> f32 {
    let mut buf = Ctiles([0.0; 4 * T * T]);
    let p = buf.0.as_mut_ptr();
    // SAFETY: CFG is a valid palette-1 configuration; `buf` holds 16 rows of 64 bytes for the
    // loads and four tiles for the stores; tile state is released at the end.
    asm!("ldtilecfg [{}]", in(reg) &CFG as *const TileCfg, options(nostack, readonly));
    asm!(
        "tilezero tmm0",
        "tilezero tmm1",
        "tilezero tmm2",
        "tilezero tmm3",
        "tileloadd tmm4, [{p} + {s}*1]",
        "tileloadd tmm5, [{p} + {s}*1]",
        "tileloadd tmm6, [{p} + {s}*1]",
        "tileloadd tmm7, [{p} + {s}*1]",
        p = in(reg) p,
        s = in(reg) 64usize,
        options(nostack, readonly),
    );
    for _ in 0..iters {
        asm!(
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            options(nostack, nomem),
        );
    }
    ctiles(p);
    asm!("tilerelease", options(nostack, nomem));
    buf.0.iter().sum()
}
