//! GGUF load costs on the real SmolLM2-135M-Instruct Q4_1 file: opening it (map + header and
//! metadata parse + validation of all 272 tensors) and building its 49152-token tokenizer from
//! the metadata, then encoding a chat prompt with it.
//!
//! `fixtures/fetch-smollm2.sh && cargo bench --bench gguf`

use criterion::{criterion_group, criterion_main, Criterion};
use spinfer::internals::tokenizer::gguf::tokenizer_from_gguf;
use spinfer::internals::weights::WeightStore;
use std::hint::black_box;
use std::path::PathBuf;

fn bench(c: &mut Criterion) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/real/registry/llama/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !path.is_file() {
        eprintln!(
            "{} is missing: run fixtures/fetch-smollm2.sh",
            path.display()
        );
        return;
    }
    let paths = [path];
    let mut g = c.benchmark_group("gguf-smollm2");
    g.sample_size(20);
    g.bench_function("open_gguf", |b| {
        b.iter(|| black_box(WeightStore::open_gguf(&paths).unwrap()))
    });
    let store = WeightStore::open_gguf(&paths).unwrap();
    let meta = store.metadata().unwrap();
    g.bench_function("tokenizer_from_gguf", |b| {
        b.iter(|| black_box(tokenizer_from_gguf(meta).unwrap()))
    });
    let t = tokenizer_from_gguf(meta).unwrap();
    let prompt = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWrite a haiku about the sea in 2026, please.<|im_end|>\n<|im_start|>assistant\n";
    g.bench_function("encode-chat-prompt", |b| {
        b.iter(|| black_box(t.tokenizer.encode(prompt, true).unwrap()))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
