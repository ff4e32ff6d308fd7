//! f32 matmul throughput at the all-MiniLM-L6-v2 shapes (n = 15: one sentence; n = 470: 32
//! packed sentences) and a TinyLlama prefill shape, per second of CPU time the whole process
//! received (all threads, from /proc/self/task/*/schedstat) and per wall second. On a shared
//! machine the CPU-time rate is the meaningful one; a thread spinning in the pool counts.
//! `cargo run --release -p spinfer-kernels --example matmul_shapes -- [threads] [n]`

use spinfer_kernels::{kernels, Precision, Weights};
use std::time::Instant;

/// Nanoseconds all of this process's threads have spent on a CPU (Linux).
fn process_oncpu_ns() -> u64 {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    dir.filter_map(|e| {
        let p = e.ok()?.path().join("schedstat");
        std::fs::read_to_string(p)
            .ok()?
            .split_whitespace()
            .next()?
            .parse::<u64>()
            .ok()
    })
    .sum()
}

fn main() {
    let threads: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(2);
    spinfer_kernels::set_threads(threads);
    let k = kernels();
    println!("tier {}, {threads} threads", k.isa());
    let c = process_oncpu_ns();
    let fl = spinfer_kernels::probe::run_fma_burn(20_000_000);
    println!(
        "f32 FMA burn (1 thread): {:.1} GFLOP per CPU-second",
        fl / ((process_oncpu_ns() - c) as f64 / 1e9) / 1e9
    );
    let arg = |i: usize| {
        std::env::args()
            .nth(i)
            .and_then(|a| a.parse::<usize>().ok())
    };
    let mut shapes = vec![
        (15usize, 384usize, 384usize),
        (15, 384, 1536),
        (15, 1536, 384),
        (470, 384, 384),
        (470, 384, 1536),
        (470, 1536, 384),
        (128, 2048, 2048),
    ];
    // `[threads] n k m` measures just that shape.
    if let (Some(n), Some(kk), Some(m)) = (arg(2), arg(3), arg(4)) {
        shapes = vec![(n, kk, m)];
    }
    // An optional second argument keeps only the shapes with that n.
    let only: Option<usize> = std::env::args().nth(2).and_then(|a| a.parse().ok());
    for (n, kk, m) in shapes {
        if only.is_some_and(|o| o != n) {
            continue;
        }
        let w: Vec<f32> = (0..m * kk)
            .map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 1e-4)
            .collect();
        let x: Vec<f32> = (0..n * kk)
            .map(|i| ((i * 104729 % 1000) as f32 - 500.0) * 1e-3)
            .collect();
        let mut y = vec![0f32; n * m];
        let flop = 2.0 * (n * m * kk) as f64;
        // About 2 GFLOP per sample (CPU time is accounted at scheduler ticks), median of 5.
        let reps = ((2e9 / flop) as usize).max(3);
        let mut run = || k.matmul_with(Precision::Exact, Weights::F32(&w), &x, n, &mut y);
        run();
        let mut samples: Vec<(f64, f64)> = (0..5)
            .map(|_| {
                let (t, c) = (Instant::now(), process_oncpu_ns());
                for _ in 0..reps {
                    run();
                }
                let cpu = (process_oncpu_ns() - c) as f64 / 1e9;
                let wall = t.elapsed().as_secs_f64();
                let work = flop * reps as f64 / 1e9;
                (work / cpu, work / wall)
            })
            .collect();
        samples.sort_by(|a, b| a.0.total_cmp(&b.0));
        let best = samples[samples.len() / 2];
        println!(
            "matmul n={n:4} k={kk:4} m={m:5}: {:6.1} GFLOP per CPU-second, {:6.1} GFLOP/s wall",
            best.0, best.1
        );
    }
}
