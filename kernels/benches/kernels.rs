//! Kernel throughput at real model sizes, beside this machine's limits measured in the same
//! run. matvec reports bytes of weights read per second (`matvec` one matrix from cache,
//! `matvec-stack` a model-sized stack from memory, as decode reads it); matmul reports FLOPs as
//! criterion "elements", so its Gelem/s column reads as GFLOP/s (2·n·m·k FLOP per product).
//!
//! `cargo bench -p spinfer-kernels --bench kernels` (add a filter such as `matvec/bf16` to run
//! fewer). Sample counts are small: the machine is shared.

use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use spinfer_kernels::{bf16, f16, kernels, probe, Format, Precision, Weights};
use std::hint::black_box;
use std::time::Duration;

/// Deterministic values in [-1, 1) (splitmix64; no rand crate).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

struct Mats {
    f32: Vec<f32>,
    f16: Vec<f16>,
    bf16: Vec<bf16>,
}
impl Mats {
    fn new(n: usize) -> Mats {
        let v: Vec<f32> = values(n, 7).iter().map(|x| x * 0.05).collect();
        Mats {
            f16: v.iter().map(|&x| f16::from_f32(x)).collect(),
            bf16: v.iter().map(|&x| bf16::from_f32(x)).collect(),
            f32: v,
        }
    }
    fn get(&self, rows: usize, cols: usize) -> [(&'static str, Weights<'_>); 3] {
        let n = rows * cols;
        [
            ("bf16", Weights::Bf16(&self.bf16[..n])),
            ("f16", Weights::F16(&self.f16[..n])),
            ("f32", Weights::F32(&self.f32[..n])),
        ]
    }
}

/// Random blocks of a quantized format (pseudo-random bytes, every f16 scale set to a finite
/// value), 2-byte aligned as in a GGUF mapping. Speed does not depend on the values.
struct QMat {
    buf: Vec<u8>,
    off: usize,
    len: usize,
    f: Format,
}
impl QMat {
    fn new(f: Format, rows: usize, cols: usize) -> QMat {
        let len = f.row_bytes(cols).unwrap() * rows;
        let mut buf: Vec<u8> = values(len.div_ceil(4), 11)
            .iter()
            .flat_map(|v| v.to_bits().to_le_bytes())
            .collect();
        buf.resize(len + 1, 0);
        let off = buf.as_ptr().align_offset(2);
        let scales: &[usize] = match f {
            Format::Q6K => &[208],
            Format::Q4_1 | Format::Q5_1 | Format::Q4K | Format::Q5K => &[0, 2],
            _ => &[0],
        };
        let d = f16::from_f32(0.01).to_le_bytes();
        for b in buf[off..off + len].chunks_exact_mut(f.block_bytes()) {
            for &o in scales {
                b[o..o + 2].copy_from_slice(&d);
            }
        }
        QMat { buf, off, len, f }
    }
    fn w(&self) -> Weights<'_> {
        Weights::from_bytes(self.f, &self.buf[self.off..self.off + self.len]).unwrap()
    }
}

const QUANT: [(&str, Format); 4] = [
    ("q8_0", Format::Q8_0),
    ("q4_0", Format::Q4_0),
    ("q4_k", Format::Q4K),
    ("q6_k", Format::Q6K),
];

fn matvec(c: &mut Criterion) {
    let k = kernels();
    let mats = Mats::new(32000 * 2048);
    let x = values(2048, 3);
    let mut g = c.benchmark_group("matvec");
    for (rows, cols) in [(2048, 2048), (5632, 2048), (32000, 2048)] {
        for (name, w) in mats.get(rows, cols) {
            let mut y = vec![0f32; rows];
            g.throughput(Throughput::Bytes(w.bytes() as u64));
            g.bench_function(BenchmarkId::new(name, format!("{rows}x{cols}")), |b| {
                b.iter(|| k.matvec(black_box(w), black_box(&x), &mut y))
            });
        }
    }
    // Block formats: GB/s of quantized bytes read (x is quantized inside each call).
    for (rows, cols) in [(2048, 2048), (5632, 2048)] {
        for (name, f) in QUANT {
            let m = QMat::new(f, rows, cols);
            let w = m.w();
            let mut y = vec![0f32; rows];
            g.throughput(Throughput::Bytes(w.bytes() as u64));
            g.bench_function(BenchmarkId::new(name, format!("{rows}x{cols}")), |b| {
                b.iter(|| k.matvec(black_box(w), black_box(&x), &mut y))
            });
        }
    }
    g.finish();
}

/// Decode as a model runs it: one matvec per matrix through a stack of TinyLlama FFN-sized
/// matrices (5632 x 2048) far larger than the caches, so that the weights come from memory
/// (`matvec` above reads one matrix over and over, from cache). Quantized bytes per second,
/// to set beside the bandwidth printed at the start (criterion prints GiB/s: x 1.074 for
/// GB/s).
fn matvec_stack(c: &mut Criterion) {
    let k = kernels();
    let (rows, cols) = (5632, 2048);
    let x = values(cols, 3);
    let mut y = vec![0f32; rows];
    let mut g = c.benchmark_group("matvec-stack");
    for (name, f) in QUANT {
        let count = (512 << 20) / (f.row_bytes(cols).unwrap() * rows);
        let m = QMat::new(f, count * rows, cols);
        let w = m.w();
        let n = rows * cols;
        g.throughput(Throughput::Bytes(w.bytes() as u64));
        g.bench_function(
            BenchmarkId::new(name, format!("{count}x{rows}x{cols}")),
            |b| {
                b.iter(|| {
                    for i in 0..count {
                        k.matvec(black_box(w.slice(i * n, (i + 1) * n)), &x, &mut y)
                    }
                })
            },
        );
    }
    g.finish();
}

fn matmul(c: &mut Criterion) {
    let k = kernels();
    let (n, m, kk) = (128, 2048, 2048);
    let mats = Mats::new(m * kk);
    let x = values(n * kk, 5);
    let mut y = vec![0f32; n * m];
    let mut g = c.benchmark_group("matmul");
    // Elements = FLOPs, so criterion's Gelem/s is GFLOP/s.
    g.throughput(Throughput::Elements((2 * n * m * kk) as u64));
    // The default path (what the models get: AMX for bf16 where available), plus the exact,
    // AVX-512 BF16 dot and AMX paths for bf16.
    for (name, w) in mats.get(m, kk) {
        g.bench_function(BenchmarkId::new(name, format!("{n}x{m}x{kk}")), |b| {
            b.iter(|| k.matmul(black_box(w), &x, n, &mut y))
        });
        if name == "bf16" {
            g.bench_function(
                BenchmarkId::new("bf16-exact", format!("{n}x{m}x{kk}")),
                |b| b.iter(|| k.matmul_with(Precision::Exact, black_box(w), &x, n, &mut y)),
            );
        }
        if name == "bf16" && spinfer_kernels::amx_available() {
            g.bench_function(BenchmarkId::new("bf16-amx", format!("{n}x{m}x{kk}")), |b| {
                b.iter(|| k.matmul_with(Precision::Amx, black_box(w), &x, n, &mut y))
            });
        }
        if name == "bf16" && k.has_bf16_dot() {
            g.bench_function(BenchmarkId::new("bf16-dot", format!("{n}x{m}x{kk}")), |b| {
                b.iter(|| k.matmul_with(Precision::Bf16Dot, black_box(w), &x, n, &mut y))
            });
        }
    }
    for (name, f) in QUANT {
        let qm = QMat::new(f, m, kk);
        let w = qm.w();
        g.bench_function(BenchmarkId::new(name, format!("{n}x{m}x{kk}")), |b| {
            b.iter(|| k.matmul(black_box(w), &x, n, &mut y))
        });
    }
    g.finish();
}

/// A decode step of the batch scheduler: 8 sequences' tokens through a TinyLlama FFN matrix,
/// where the weights are read once for all 8 (memory and FMA limits both near).
fn matmul_batch(c: &mut Criterion) {
    let k = kernels();
    let (n, m, kk) = (8, 5632, 2048);
    let mats = Mats::new(m * kk);
    let x = values(n * kk, 5);
    let mut y = vec![0f32; n * m];
    let mut g = c.benchmark_group("matmul-batch");
    g.throughput(Throughput::Elements((2 * n * m * kk) as u64));
    for (name, w) in mats.get(m, kk) {
        g.bench_function(BenchmarkId::new(name, format!("{n}x{m}x{kk}")), |b| {
            b.iter(|| k.matmul(black_box(w), &x, n, &mut y))
        });
    }
    g.finish();
}

fn print_limits() {
    let threads = rayon::current_num_threads();
    let k = kernels();
    println!(
        "tier: {}, threads: {threads}, bf16 dot by default: {}, AMX by default: {}",
        k.isa(),
        spinfer_kernels::bf16_dot_enabled(),
        spinfer_kernels::amx_enabled()
    );
    println!(
        "measured memory read bandwidth: {:.1} GB/s",
        probe::measure_bandwidth_gbs()
    );
    println!(
        "measured f32 FMA peak: {:.0} GFLOP/s",
        probe::measure_fma_peak_gflops(threads)
    );
    if let Some(p) = probe::measure_bf16_peak_gflops(threads) {
        println!("measured bf16 dot peak: {p:.0} GFLOP/s");
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    targets = matvec, matvec_stack, matmul, matmul_batch
}

fn main() {
    print_limits();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
