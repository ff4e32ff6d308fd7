//! `spinfer bench`: load time, prefill and decode speed, peak RSS and embedding throughput,
//! each printed beside this machine's limits measured in the same run.

use crate::bert::BertModel;
use crate::llama::LlamaModel;
use crate::Result;
use spinfer_kernels::{self as kernels, probe};
use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;

/// What this machine can do, measured now.
#[derive(Clone, Debug)]
pub struct Limits {
    pub threads: usize,
    /// Memory read bandwidth, GB/s: the best reader's.
    pub bandwidth_gbs: f64,
    /// How the best reader read, and every reader tried.
    pub bandwidth: probe::Bandwidth,
    /// f32 FMA peak, GFLOP/s.
    pub fma_gflops: f64,
    /// AVX-512 BF16 dot-product peak, GFLOP/s, where the CPU has it.
    pub bf16_gflops: Option<f64>,
    /// AMX bf16 tile peak, GFLOP/s, where the CPU has it and it is on.
    pub amx_gflops: Option<f64>,
}

pub fn measure_limits() -> Limits {
    let threads = rayon::current_num_threads();
    let bandwidth = probe::measure_bandwidth();
    Limits {
        threads,
        bandwidth_gbs: bandwidth.gbs,
        bandwidth,
        fma_gflops: probe::measure_fma_peak_gflops(threads),
        bf16_gflops: probe::measure_bf16_peak_gflops(threads),
        amx_gflops: probe::measure_amx_peak_gflops(threads),
    }
}

/// Which matmul prefill runs on, and so which peak bounds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrefillPath {
    /// f32 FMA (f32/f16 weights, or bf16 widened exactly).
    Fma,
    /// AVX-512 BF16 dot products.
    Bf16Dot,
    /// AMX tiles (bf16 weights on CPUs with AMX).
    Amx,
}

#[derive(Clone, Debug)]
pub struct LlamaBench {
    /// Load with the files in the page cache (the second load in this process).
    pub load_ms: f64,
    /// The first load in this process, which may have read the files from disk.
    pub first_load_ms: f64,
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    /// The first prefill after load, which also maps the weights' pages in.
    pub first_prefill_ms: f64,
    pub prefill_tok_s: f64,
    pub decode_tok_s: f64,
    /// FLOPs of one prefill of `prompt_tokens` (matmuls + attention + last-token lm_head).
    pub prefill_flops: f64,
    /// Bytes one decode step reads (weights + KV cache at mid-generation depth).
    pub decode_bytes: f64,
    /// The matmul path prefill used for the model's weights.
    pub prefill_path: PrefillPath,
    pub weights_bytes: u64,
    pub kv_bytes: u64,
    pub peak_rss_bytes: Option<u64>,
    /// How much of the mapped files the kernel maps 2 MiB at a time, read while the model is
    /// loaded (Linux: `FilePmdMapped`).
    pub file_2m_bytes: Option<u64>,
}

/// Load twice and time both: the first load may read the files from disk (this VM also
/// reclaims page cache left idle for a while); the second is the warm-cache load.
fn time_load<M>(load: impl Fn() -> Result<M>) -> Result<(f64, f64, M)> {
    let t0 = Instant::now();
    drop(load()?);
    let first = t0.elapsed().as_secs_f64() * 1e3;
    let t0 = Instant::now();
    let model = load()?;
    Ok((first, t0.elapsed().as_secs_f64() * 1e3, model))
}

/// Load a Llama model folder and time a `prompt_tokens` prefill and `gen_tokens` greedy decode steps.
pub fn bench_llama(dir: &Path, prompt_tokens: usize, gen_tokens: usize) -> Result<LlamaBench> {
    let (first_load_ms, load_ms, model) = time_load(|| LlamaModel::load(dir))?;
    let cfg = model.config().clone();
    let prompt_tokens =
        prompt_tokens.clamp(1, model.context_len().saturating_sub(gen_tokens).max(1));

    // Deterministic ordinary token ids (a xorshift stream), starting with BOS like a real prompt.
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut prompt = vec![cfg.bos_token_id.unwrap_or(1)];
    while prompt.len() < prompt_tokens {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        prompt.push((3 + seed % (cfg.vocab_size as u64 - 3)) as u32);
    }

    let capacity = prompt_tokens + gen_tokens;
    let mut state = model.new_state(capacity);
    let t0 = Instant::now();
    model.forward(&mut state, &prompt)?;
    let first_prefill_ms = t0.elapsed().as_secs_f64() * 1e3;

    // Steady state: a fresh request on the loaded model.
    state.reset();
    let t0 = Instant::now();
    let mut logits = model.forward(&mut state, &prompt)?;
    let prefill_s = t0.elapsed().as_secs_f64();
    let t0 = Instant::now();
    for _ in 0..gen_tokens {
        let next = crate::sampler::argmax(logits) as u32;
        logits = model.forward(&mut state, &[next])?;
    }
    let decode_s = t0.elapsed().as_secs_f64();
    let file_2m_bytes = file_2m_bytes();

    let (h, q, kv, inter, layers) = (
        cfg.hidden_size as f64,
        cfg.q_dim() as f64,
        cfg.kv_dim() as f64,
        cfg.intermediate_size as f64,
        cfg.num_hidden_layers as f64,
    );
    let n = prompt_tokens as f64;
    let per_token_matmul = 2.0 * layers * (h * q + 2.0 * h * kv + q * h + 3.0 * h * inter);
    // Causal attention: QKᵀ and PV over n(n+1)/2 (query, key) pairs per layer.
    let attention = 2.0 * 2.0 * layers * q * n * (n + 1.0) / 2.0;
    let prefill_flops = per_token_matmul * n + attention + 2.0 * h * cfg.vocab_size as f64;
    let kv_bytes = (2 * cfg.num_hidden_layers * capacity * cfg.kv_dim() * 4) as u64;
    let mid_depth = (prompt_tokens + gen_tokens / 2) as f64;
    let decode_bytes = model.bytes_per_decode_step() as f64 + 2.0 * layers * mid_depth * kv * 4.0;
    let prefill_path = match model.prompt_precision() {
        kernels::Precision::Amx => PrefillPath::Amx,
        kernels::Precision::Bf16Dot if kernels::kernels().has_bf16_dot() => PrefillPath::Bf16Dot,
        _ => PrefillPath::Fma,
    };

    Ok(LlamaBench {
        load_ms,
        first_load_ms,
        prompt_tokens,
        gen_tokens,
        first_prefill_ms,
        prefill_tok_s: n / prefill_s,
        decode_tok_s: gen_tokens as f64 / decode_s,
        prefill_flops,
        decode_bytes,
        prefill_path,
        weights_bytes: weights_file_bytes(dir),
        kv_bytes,
        peak_rss_bytes: peak_rss_bytes(),
        file_2m_bytes,
    })
}

#[derive(Clone, Debug)]
pub struct EmbedBench {
    /// Load with the files in the page cache (the second load in this process).
    pub load_ms: f64,
    /// The first load in this process, which may have read the files from disk.
    pub first_load_ms: f64,
    /// (batch size, sentences per second, tokens per second)
    pub runs: Vec<(usize, f64, f64)>,
    pub peak_rss_bytes: Option<u64>,
}

/// Sentences per second at batch 1 and 32 on 8-20 word sentences.
pub fn bench_embed(dir: &Path) -> Result<EmbedBench> {
    let (first_load_ms, load_ms, model) = time_load(|| BertModel::load(dir))?;
    let sentences = sample_sentences(64);
    let refs: Vec<&str> = sentences.iter().map(|s| s.as_str()).collect();
    model.embed(&refs[..4])?; // warm-up: maps the weights' pages in
    let mut runs = Vec::new();
    for batch in [1usize, 32] {
        let rounds = if batch == 1 { 64 } else { 4 };
        let mut tokens = 0u64;
        let t0 = Instant::now();
        for r in 0..rounds {
            let start = (r * batch) % (refs.len() - batch + 1);
            tokens += model.embed(&refs[start..start + batch])?.1 as u64;
        }
        let s = t0.elapsed().as_secs_f64();
        runs.push((batch, (rounds * batch) as f64 / s, tokens as f64 / s));
    }
    Ok(EmbedBench {
        load_ms,
        first_load_ms,
        runs,
        peak_rss_bytes: peak_rss_bytes(),
    })
}

/// Deterministic English-like sentences of 8 to 20 words.
pub fn sample_sentences(count: usize) -> Vec<String> {
    const WORDS: &[&str] = &[
        "the",
        "model",
        "reads",
        "every",
        "weight",
        "once",
        "per",
        "token",
        "and",
        "a",
        "small",
        "server",
        "answers",
        "requests",
        "from",
        "many",
        "users",
        "while",
        "memory",
        "bandwidth",
        "limits",
        "how",
        "fast",
        "it",
        "can",
        "decode",
        "text",
        "quickly",
        "under",
        "load",
        "in",
        "cloud",
        "functions",
        "that",
        "start",
        "cold",
        "run",
        "briefly",
        "then",
        "sleep",
        "again",
        "sentence",
        "embeddings",
        "help",
        "search",
        "similar",
        "documents",
        "for",
        "questions",
    ];
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    (0..count)
        .map(|_| {
            let n = 8 + (next() % 13) as usize;
            let words: Vec<&str> = (0..n)
                .map(|_| WORDS[(next() % WORDS.len() as u64) as usize])
                .collect();
            let mut s = words.join(" ");
            s.push('.');
            s
        })
        .collect()
}

pub fn format_limits(l: &Limits) -> String {
    let mut s = format!(
        "machine: {} threads, kernels {}; measured now: memory read {:.1} GB/s, f32 FMA peak {:.0} GFLOP/s",
        l.threads,
        kernels::kernels().isa(),
        l.bandwidth_gbs,
        l.fma_gflops
    );
    if let Some(b) = l.bf16_gflops {
        let _ = write!(s, ", bf16 dot peak {b:.0} GFLOP/s");
    }
    if let Some(a) = l.amx_gflops {
        let _ = write!(s, ", AMX bf16 peak {a:.0} GFLOP/s");
    }
    let slowest = l
        .bandwidth
        .tried
        .iter()
        .map(|t| t.1)
        .fold(f64::INFINITY, f64::min);
    let _ = write!(
        s,
        "\n  (memory read: the best of {} readers, {}; the slowest read {slowest:.1} GB/s)",
        l.bandwidth.tried.len(),
        l.bandwidth.method
    );
    s
}

pub fn format_llama(b: &LlamaBench, l: &Limits) -> String {
    let mut s = String::new();
    let mb = |x: u64| x as f64 / 1e6;
    let _ = writeln!(
        s,
        "load:    {:.1} ms (engine ready; weights mapped, not read; page cache warm; the \
         first load in this process took {:.1} ms)",
        b.load_ms, b.first_load_ms
    );
    let _ = writeln!(
        s,
        "first prefill of {} tokens after load: {:.1} ms (includes mapping the weights' pages)",
        b.prompt_tokens, b.first_prefill_ms
    );
    let gflops = b.prefill_flops * b.prefill_tok_s / b.prompt_tokens as f64 / 1e9;
    let (peak, which) = match (b.prefill_path, l.bf16_gflops) {
        (PrefillPath::Bf16Dot, Some(p)) => (p, "bf16 dot peak"),
        (PrefillPath::Amx, _) => match l.amx_gflops {
            Some(p) => (p, "AMX bf16 peak"),
            None => (l.fma_gflops, "f32 FMA peak (prefill ran on AMX tiles)"),
        },
        _ => (l.fma_gflops, "f32 FMA peak"),
    };
    let _ = writeln!(
        s,
        "prefill: {:.1} tok/s ({} tokens), {:.0} GFLOP/s = {:.0}% of the {which}",
        b.prefill_tok_s,
        b.prompt_tokens,
        gflops,
        100.0 * gflops / peak
    );
    let gbs = b.decode_bytes * b.decode_tok_s / 1e9;
    let _ = writeln!(
        s,
        "decode:  {:.1} tok/s ({} tokens after the prompt), {:.1} GB/s = {:.0}% of measured bandwidth",
        b.decode_tok_s,
        b.gen_tokens,
        gbs,
        100.0 * gbs / l.bandwidth_gbs
    );
    match b.peak_rss_bytes {
        Some(rss) => {
            let _ = writeln!(
                s,
                "peak RSS: {:.0} MB (weights file {:.0} MB + KV cache {:.0} MB + {:.0} MB other)",
                mb(rss),
                mb(b.weights_bytes),
                mb(b.kv_bytes),
                mb(rss) - mb(b.weights_bytes) - mb(b.kv_bytes)
            );
        }
        None => {
            let _ = writeln!(s, "peak RSS: not available on this OS");
        }
    }
    if let Some(m) = b.file_2m_bytes {
        // Decode streams every weight once per token; with 4 KiB pages the prefetchers stop
        // at each page (TinyLlama Q4_0 decoded ~10% slower on Zen 3).
        let _ = writeln!(
            s,
            "weights in 2 MiB pages: {:.0} of {:.0} MB{}",
            mb(m),
            mb(b.weights_bytes),
            if m * 2 < b.weights_bytes {
                " (the page cache holds the file in small pages, e.g. just written; once \
                 dropped (`dd if=FILE iflag=nocache count=0`) and read again it is in large ones)"
            } else {
                ""
            }
        );
    }
    s
}

pub fn format_embed(b: &EmbedBench, l: &Limits) -> String {
    let mut s = format!(
        "load:    {:.1} ms (page cache warm; the first load in this process took {:.1} ms)\n",
        b.load_ms, b.first_load_ms
    );
    for &(batch, sps, tps) in &b.runs {
        let _ = writeln!(
            s,
            "batch {batch:>2}: {sps:.1} sentences/s ({tps:.0} tokens/s)"
        );
    }
    if let Some(rss) = b.peak_rss_bytes {
        let _ = writeln!(s, "peak RSS: {:.0} MB", rss as f64 / 1e6);
    }
    let _ = writeln!(
        s,
        "(f32 FMA peak measured now: {:.0} GFLOP/s)",
        l.fma_gflops
    );
    s
}

/// Total size of the weight files (safetensors or GGUF) in a model folder.
fn weights_file_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    name.ends_with(".safetensors") || name.ends_with(".gguf")
                })
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}
/// Bytes of file mappings the kernel maps 2 MiB at a time (Linux: `FilePmdMapped`).
fn file_2m_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/smaps_rollup").ok()?;
    let line = s.lines().find(|l| l.starts_with("FilePmdMapped:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The process's peak resident set (Linux: VmHWM).
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
