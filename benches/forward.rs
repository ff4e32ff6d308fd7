//! Whole Llama forward passes: prefill of 128 tokens and one decode step at depth 128.
//!
//! `cargo bench --bench forward` runs on `SPINFER_BENCH_MODEL` (a Llama model folder), else on
//! the TinyLlama-1.1B-shaped bf16 model that `fixtures/make_bench_models.py` writes, else on the
//! bundled `tiny-llama`. Criterion's elem/s is tokens/s; the model's bytes per decode step and
//! the machine's limits (measured now) are printed first, so GB/s and GFLOP/s follow from it.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use spinfer::internals::kernels::probe;
use spinfer::internals::llama::LlamaModel;
use std::hint::black_box;
use std::path::PathBuf;
use std::time::Duration;

fn model_dir() -> PathBuf {
    if let Ok(d) = std::env::var("SPINFER_BENCH_MODEL") {
        return PathBuf::from(d);
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let big = root.join("bench-models/llama/tinyllama-1.1b-bf16");
    if big.is_dir() {
        big
    } else {
        root.join("registry/llama/tiny-llama")
    }
}

fn forward(c: &mut Criterion) {
    const PROMPT: usize = 128;
    let dir = model_dir();
    let model = LlamaModel::load(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let threads = rayon::current_num_threads();
    println!(
        "model {} ({:.3} B params, {:.3} GB read per decode step); {threads} threads; measured now: \
         memory read {:.1} GB/s, f32 FMA peak {:.0} GFLOP/s",
        dir.display(),
        model.n_params() as f64 / 1e9,
        model.bytes_per_decode_step() as f64 / 1e9,
        probe::measure_bandwidth_gbs(),
        probe::measure_fma_peak_gflops(threads),
    );
    // Ordinary token ids after BOS; any in-vocabulary ids do the same work.
    let vocab = model.vocab_size() as u32;
    let prompt: Vec<u32> = std::iter::once(model.bos_id().unwrap_or(1))
        .chain((1..PROMPT as u32).map(|i| 3 + (i * 7919) % (vocab - 3)))
        .collect();
    let mut state = model.new_state(PROMPT + 1);

    let mut g = c.benchmark_group("llama");
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    g.throughput(Throughput::Elements(PROMPT as u64));
    g.bench_function("prefill-128", |b| {
        b.iter(|| {
            state.reset();
            black_box(model.forward(&mut state, &prompt).expect("prefill")[0])
        })
    });
    state.reset();
    model.forward(&mut state, &prompt).expect("prefill");
    g.throughput(Throughput::Elements(1));
    g.bench_function("decode-step-at-128", |b| {
        b.iter(|| {
            state.truncate(PROMPT);
            black_box(model.forward(&mut state, &[prompt[1]]).expect("decode")[0])
        })
    });
    g.finish();
}

criterion_group!(benches, forward);
criterion_main!(benches);
