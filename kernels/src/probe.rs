//! Measure this machine's limits in the same run as a benchmark: memory read bandwidth and
//! FMA / BF16-dot peak throughput, so results can be printed as a fraction of them.

use std::time::Instant;

/// Multi-threaded read bandwidth in GB/s (10^9 bytes/s) over a 1 GiB buffer (larger than the
/// last-level cache a VM typically gets), read by the active tier's vector loads in several
/// streams per thread; best of five passes. Takes well under a second.
pub fn measure_bandwidth_gbs() -> f64 {
    measure_bandwidth_gbs_with(1 << 30)
}

/// [`measure_bandwidth_gbs`] over a buffer of `bytes` bytes, on the kernels' thread pool.
pub fn measure_bandwidth_gbs_with(bytes: usize) -> f64 {
    use rayon::prelude::*;
    let n = (bytes / 4).max(1 << 12);
    let threads = rayon::current_num_threads().max(1);
    let chunk = n.div_ceil(threads);
    // Written (in parallel) so reads hit real memory, not the shared zero page.
    let buf: Vec<f32> = (0..n).into_par_iter().map(|i| (i & 7) as f32).collect();
    let read = crate::kernels().t.read;
    let mut best = 0f64;
    for _ in 0..5 {
        let t = Instant::now();
        let s: f32 = buf.par_chunks(chunk).map(read).sum();
        let dt = t.elapsed().as_secs_f64();
        std::hint::black_box(s);
        best = best.max((n * 4) as f64 / dt / 1e9);
    }
    best
}

fn peak(threads: usize, f: fn(usize) -> f32, flop_per_iter: f64) -> f64 {
    let threads = threads.max(1);
    f(200_000); // warm up (clock ramp, page in code)
    let iters = 4_000_000;
    let mut best = 0f64;
    for _ in 0..2 {
        let t = Instant::now();
        std::thread::scope(|s| {
            let hs: Vec<_> = (0..threads).map(|_| s.spawn(move || f(iters))).collect();
            for h in hs {
                std::hint::black_box(h.join().unwrap_or(0.0));
            }
        });
        let dt = t.elapsed().as_secs_f64();
        best = best.max(flop_per_iter * iters as f64 * threads as f64 / dt / 1e9);
    }
    best
}

/// f32 FMA peak in GFLOP/s of the active tier on `threads` threads (one FMA = 2 FLOP).
pub fn measure_fma_peak_gflops(threads: usize) -> f64 {
    let k = crate::kernels();
    peak(threads, k.t.burn, 12.0 * k.isa().lanes() as f64 * 2.0)
}

/// AVX-512 BF16 dot-product peak in GFLOP/s on `threads` threads (one `vdpbf16ps` = 64 FLOP),
/// or None where the active tier has none.
pub fn measure_bf16_peak_gflops(threads: usize) -> Option<f64> {
    let f = crate::kernels().t.bf16_burn?;
    Some(peak(threads, f, 12.0 * 64.0))
}

/// AMX `tdpbf16ps` peak in GFLOP/s on `threads` threads, or None where AMX is unavailable
/// (or switched off) or the active tier is not AVX-512.
pub fn measure_amx_peak_gflops(threads: usize) -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    if crate::kernels().isa() == crate::Isa::Avx512 && crate::amx_enabled() {
        // A round of four tdpbf16ps takes ~64 cycles, 20 times an FMA round: an eighth of the
        // rounds keeps the run short. SAFETY: amx_enabled implies the CPU has AMX and Linux
        // granted its permission.
        return Some(peak(
            threads,
            |i| unsafe { crate::x86_64::amx::burn(i / 8) },
            65536.0 / 8.0,
        ));
    }
    let _ = threads;
    None
}

/// Run `iters` rounds of the active tier's FMA burn loop on this thread; returns the FLOPs done
/// (for callers that time it themselves, e.g. per on-CPU second on a shared machine).
pub fn run_fma_burn(iters: usize) -> f64 {
    let k = crate::kernels();
    std::hint::black_box((k.t.burn)(iters));
    12.0 * k.isa().lanes() as f64 * 2.0 * iters as f64
}

/// As [`run_fma_burn`] for the bf16 dot-product loop; None where the tier has none.
pub fn run_bf16_burn(iters: usize) -> Option<f64> {
    let f = crate::kernels().t.bf16_burn?;
    std::hint::black_box(f(iters));
    Some(12.0 * 64.0 * iters as f64)
}
