//! Kernel throughput per second of CPU time actually received (from
//! /proc/thread-self/schedstat), single-threaded: a shared, oversubscribed machine makes
//! wall-clock rates meaningless, but work per on-CPU second still shows how close a kernel
//! runs to the core's peak. `cargo run --release -p spinfer-kernels --example cpu_efficiency`

use spinfer_kernels::{bf16, f16, kernels, probe, Precision, Weights};

/// Nanoseconds this thread has spent on a CPU (Linux only; wall-clock time elsewhere).
fn oncpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| {
            use std::time::{SystemTime, UNIX_EPOCH};
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
        })
}

fn per_cpu_second(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let t = oncpu_ns();
    for _ in 0..reps {
        f();
    }
    (oncpu_ns() - t) as f64 / 1e9 / reps as f64
}

fn main() {
    spinfer_kernels::set_threads(1);
    let k = kernels();
    let fma = probe::measure_fma_peak_gflops(1);
    println!(
        "tier {} (1 thread); wall-clock FMA peak probe: {fma:.0} GFLOP/s",
        k.isa()
    );
    let (n, m, kk) = (128, 2048, 2048);
    let v: Vec<f32> = (0..m * kk)
        .map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 1e-4)
        .collect();
    let x: Vec<f32> = (0..n * kk)
        .map(|i| ((i * 104729 % 1000) as f32 - 500.0) * 1e-3)
        .collect();
    let wf16: Vec<f16> = v.iter().map(|&a| f16::from_f32(a)).collect();
    let wbf16: Vec<bf16> = v.iter().map(|&a| bf16::from_f32(a)).collect();
    let mut y = vec![0f32; n * m];
    let flop = 2.0 * (n * m * kk) as f64;
    // The peaks measured the same way (per on-CPU second).
    let mut fl = 0.0;
    let s = per_cpu_second(3, || fl = probe::run_fma_burn(5_000_000));
    println!("f32 FMA peak: {:.1} GFLOP per CPU-second", fl / s / 1e9);
    if probe::run_bf16_burn(1).is_some() {
        let s = per_cpu_second(3, || fl = probe::run_bf16_burn(5_000_000).unwrap_or(0.0));
        println!("bf16 dot peak: {:.1} GFLOP per CPU-second", fl / s / 1e9);
    }
    for (name, w, p) in [
        ("f32", Weights::F32(&v), Precision::Exact),
        ("f16", Weights::F16(&wf16), Precision::Exact),
        ("bf16 exact", Weights::Bf16(&wbf16), Precision::Exact),
        ("bf16 dot", Weights::Bf16(&wbf16), Precision::Bf16Dot),
    ] {
        let s = per_cpu_second(5, || k.matmul_with(p, w, &x, n, &mut y));
        println!(
            "matmul {n}x{m}x{kk} {name:>10}: {:6.1} GFLOP per CPU-second",
            flop / s / 1e9
        );
    }
    // Cache-resident shapes: how fast the tile kernel runs when memory is not in the way.
    for (n, m, kk) in [
        (24usize, 16usize, 256usize),
        (120, 16, 1024),
        (120, 64, 1024),
        (24, 256, 1024),
    ] {
        let mut y = vec![0f32; n * m];
        let s = per_cpu_second(2000, || {
            k.matmul_with(
                Precision::Exact,
                Weights::F32(&v[..m * kk]),
                &x[..n * kk],
                n,
                &mut y,
            )
        });
        let flop = 2.0 * (n * m * kk) as f64;
        println!(
            "matmul {n}x{m}x{kk} f32 (in cache): {:6.1} GFLOP per CPU-second",
            flop / s / 1e9
        );
    }
    let mut yv = vec![0f32; 32000];
    let wv: Vec<bf16> = (0..32000 * 2048)
        .map(|i| bf16::from_f32((i % 17) as f32 * 1e-3))
        .collect();
    let s = per_cpu_second(5, || k.matvec(Weights::Bf16(&wv), &x[..2048], &mut yv));
    println!(
        "matvec 32000x2048 bf16: {:.1} GB per CPU-second",
        (32000.0 * 2048.0 * 2.0) / s / 1e9
    );
}
