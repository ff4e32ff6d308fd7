//! Measure this machine's limits in the same run as a benchmark: memory read bandwidth and
//! FMA / BF16-dot peak throughput, so results can be printed as a fraction of them.

use std::time::Instant;

/// A measured read bandwidth and how it was reached.
#[derive(Clone, Debug)]
pub struct Bandwidth {
    /// GB/s (10^9 bytes/s): the fastest reader's best pass.
    pub gbs: f64,
    /// That reader, in words.
    pub method: String,
    /// Every reader tried, with its best pass in GB/s.
    pub tried: Vec<(String, f64)>,
}

/// Multi-threaded read bandwidth in GB/s: [`measure_bandwidth`]'s figure.
pub fn measure_bandwidth_gbs() -> f64 {
    measure_bandwidth().gbs
}

/// The read bandwidth the best of several readers reaches over two 512 MiB buffers (16× a
/// 32 MiB L3): one from the heap, one an anonymous mapping asked for 2 MiB pages (fewer TLB
/// misses); each read with 2, 4 or 8 streams per thread or 4 with software prefetch; by the
/// kernels' thread pool (as the model runs) or by as many fresh threads pinned one per CPU.
/// The readers take turns, four passes each, so a busy neighbour slows them all alike. About
/// 1-3 s. Decode is compared against this: a figure below what the best reader on the machine
/// reaches would flatter decode.
pub fn measure_bandwidth() -> Bandwidth {
    measure_bandwidth_with(512 << 20, 4)
}

enum Placement {
    Pool,
    Pinned,
}

/// [`measure_bandwidth`] over buffers of `bytes` bytes each, `rounds` passes per reader.
pub fn measure_bandwidth_with(bytes: usize, rounds: usize) -> Bandwidth {
    use rayon::prelude::*;
    let n = (bytes / 4).max(1 << 12);
    let threads = rayon::current_num_threads().max(1);
    let tier = crate::kernels();

    let mut heap = vec![0f32; n];
    let huge_before = anon_huge_kib();
    let mut map = huge_map(n * 4);
    let mut bufs: Vec<&mut [f32]> = vec![&mut heap];
    if let Some(m) = map.as_mut() {
        // SAFETY: the mapping is page-aligned (so f32-aligned), `n * 4` bytes long, zeroed, and
        // any bits are a valid f32; the slice borrows `map`, which outlives it.
        bufs.push(unsafe { std::slice::from_raw_parts_mut(m.as_mut_ptr() as *mut f32, n) });
    }
    // Written (in parallel) so reads hit real memory, not the shared zero page. (Pages sit
    // where the pool's threads touched them; this VM has one NUMA node.)
    for b in bufs.iter_mut() {
        b.par_chunks_mut(1 << 16).enumerate().for_each(|(c, x)| {
            for (i, v) in x.iter_mut().enumerate() {
                *v = ((c + i) & 7) as f32;
            }
        });
    }
    // Huge pages are granted (or not) as the pages are first touched.
    let granted = match (huge_before, anon_huge_kib()) {
        (Some(a), Some(b)) => format!(", {} MiB of them granted", b.saturating_sub(a) >> 10),
        _ => String::new(),
    };
    let bufs: Vec<(String, &[f32])> = bufs
        .into_iter()
        .enumerate()
        .map(|(i, b)| {
            let name = match i {
                0 => format!("{} MiB heap", n >> 18),
                _ => format!("{} MiB mmap asking 2 MiB pages{granted}", n >> 18),
            };
            (name, &*b)
        })
        .collect();
    let cpus = allowed_cpus();

    let mut tried = Vec::new();
    for (bi, (bname, _)) in bufs.iter().enumerate() {
        for (r, &(streams, pf)) in crate::simd::READERS.iter().enumerate() {
            for place in [Placement::Pool, Placement::Pinned] {
                if matches!(place, Placement::Pinned) && cpus.len() < threads {
                    continue;
                }
                let how = match place {
                    Placement::Pool => format!("{threads} pool threads"),
                    Placement::Pinned => format!("{threads} threads pinned one per CPU"),
                };
                let pf = if pf { " + prefetch" } else { "" };
                let name = format!(
                    "{how} x {streams} streams{pf}, {} loads, {bname}",
                    tier.isa()
                );
                tried.push((name, bi, r, place, 0f64));
            }
        }
    }
    for _ in 0..rounds {
        for (_, bi, r, place, best) in tried.iter_mut() {
            let buf = bufs[*bi].1;
            let read = tier.t.read[*r];
            let dt = match place {
                Placement::Pool => {
                    let chunk = n.div_ceil(threads);
                    let t = Instant::now();
                    let s: f32 = buf.par_chunks(chunk).map(read).sum();
                    std::hint::black_box(s);
                    t.elapsed().as_secs_f64()
                }
                Placement::Pinned => pinned_pass(buf, threads, &cpus, read),
            };
            *best = best.max((n * 4) as f64 / dt / 1e9);
        }
    }
    drop(bufs);
    drop(map);
    let tried: Vec<(String, f64)> = tried.into_iter().map(|t| (t.0, t.4)).collect();
    let (method, gbs) =
        tried
            .iter()
            .cloned()
            .fold((String::new(), 0f64), |a, b| if b.1 > a.1 { b } else { a });
    Bandwidth { gbs, method, tried }
}

/// One pass over `buf` by `threads` fresh threads, thread t pinned to `cpus[t]` and reading the
/// t-th part; seconds from the first start to the last finish.
fn pinned_pass(buf: &[f32], threads: usize, cpus: &[usize], read: fn(&[f32]) -> f32) -> f64 {
    let chunk = buf.len().div_ceil(threads);
    let go = std::sync::Barrier::new(threads);
    let spans: Vec<(Instant, Instant)> = std::thread::scope(|s| {
        let hs: Vec<_> = buf
            .chunks(chunk)
            .zip(cpus)
            .map(|(part, &cpu)| {
                let go = &go;
                s.spawn(move || {
                    set_affinity(cpu);
                    go.wait();
                    let t = Instant::now();
                    std::hint::black_box(read(part));
                    (t, Instant::now())
                })
            })
            .collect();
        hs.into_iter().filter_map(|h| h.join().ok()).collect()
    });
    let start = spans.iter().map(|s| s.0).min();
    let end = spans.iter().map(|s| s.1).max();
    match (start, end) {
        (Some(a), Some(b)) => (b - a).as_secs_f64().max(1e-9),
        _ => f64::INFINITY,
    }
}

/// Anonymous memory in huge pages now, KiB (Linux `AnonHugePages`), if the OS says.
fn anon_huge_kib() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/smaps_rollup").ok()?;
    let l = s.lines().find(|l| l.starts_with("AnonHugePages:"))?;
    l.split_whitespace().nth(1)?.parse().ok()
}

/// An anonymous mapping of `bytes`, asked (`madvise(MADV_HUGEPAGE)`) for transparent huge
/// pages, which Linux often grants only on request; None where either fails.
fn huge_map(bytes: usize) -> Option<memmap2::MmapMut> {
    let m = memmap2::MmapMut::map_anon(bytes).ok()?;
    #[cfg(target_os = "linux")]
    m.advise(memmap2::Advice::HugePage).ok()?;
    #[cfg(not(target_os = "linux"))]
    return None;
    #[allow(unreachable_code)]
    Some(m)
}

/// CPUs this process may run on (Linux `sched_getaffinity`); empty where unknown.
fn allowed_cpus() -> Vec<usize> {
    let mut mask = [0u64; 16]; // 1024 CPUs
    if affinity_syscall(false, &mut mask) < 0 {
        return Vec::new();
    }
    (0..1024)
        .filter(|&c| mask[c / 64] >> (c % 64) & 1 == 1)
        .collect()
}

/// Pin the calling thread to `cpu` (best effort: a refusal leaves it unpinned).
fn set_affinity(cpu: usize) {
    let mut mask = [0u64; 16];
    if cpu < 1024 {
        mask[cpu / 64] = 1 << (cpu % 64);
        affinity_syscall(true, &mut mask);
    }
}

/// `sched_setaffinity(0, …)` (set) or `sched_getaffinity(0, …)` on the calling thread with a
/// 1024-CPU mask; the raw result (negative errno on failure), -1 off Linux x86-64/aarch64.
#[allow(unused_variables)]
fn affinity_syscall(set: bool, mask: &mut [u64; 16]) -> isize {
    #[allow(unused_mut)]
    let mut ret: isize = -1;
    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    // SAFETY: sched_{set,get}affinity (203/204) read or write at most 128 bytes through the
    // pointer, which points at `mask` (128 bytes, live for the call); pid 0 is this thread.
    // The syscall clobbers rcx and r11.
    unsafe {
        std::arch::asm!(
            "syscall",
            inlateout("rax") if set { 203isize } else { 204isize } => ret,
            in("rdi") 0usize,
            in("rsi") 128usize,
            in("rdx") mask.as_mut_ptr(),
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    #[cfg(all(target_os = "linux", target_arch = "aarch64"))]
    // SAFETY: as above; on aarch64 the calls are 122/123, number in x8, result in x0.
    unsafe {
        std::arch::asm!(
            "svc 0",
            in("x8") if set { 122usize } else { 123usize },
            inlateout("x0") 0isize => ret,
            in("x1") 128usize,
            in("x2") mask.as_mut_ptr(),
            options(nostack),
        );
    }
    ret
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
