//! Quick Llama timing on one model folder: load time, prefill tok/s, decode tok/s (greedy).
//! The full bench with machine limits is `spinfer bench`; this is for the model's own numbers.
//!
//! cargo run --release --example llama_bench -- DIR [PROMPT_TOKENS=128] [GEN_TOKENS=32] [THREADS]

use spinfer::internals::llama::LlamaModel;
use std::path::PathBuf;
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(dir) = args.first().map(PathBuf::from) else {
        eprintln!("usage: llama_bench DIR [PROMPT_TOKENS] [GEN_TOKENS] [THREADS]");
        std::process::exit(2);
    };
    let num = |i: usize, default: usize| {
        args.get(i)
            .map(|s| s.parse::<usize>().expect("a number"))
            .unwrap_or(default)
    };
    let (n_prompt, n_gen) = (num(1, 128), num(2, 32));
    if let Some(t) = args.get(3) {
        spinfer::internals::kernels::set_threads(t.parse().expect("a thread count"));
    }

    let t0 = Instant::now();
    let model = match LlamaModel::load(&dir) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    };
    let load = t0.elapsed();
    let cfg = model.config();
    println!(
        "model {} ({:.2} B params, {:.2} GB read per decode step), kernels {}, {} threads",
        dir.display(),
        model.n_params() as f64 / 1e9,
        model.bytes_per_decode_step() as f64 / 1e9,
        spinfer::internals::kernels::kernels().isa(),
        rayon::current_num_threads()
    );
    let t0 = Instant::now();
    let _ = spinfer::internals::tokenizer::from_file(&dir.join("tokenizer.json"));
    let tok = t0.elapsed();
    println!(
        "load: {:.1} ms (of which tokenizer.json alone takes about {:.1} ms)",
        load.as_secs_f64() * 1e3,
        tok.as_secs_f64() * 1e3
    );

    // A deterministic prompt of ordinary (non-special) token ids.
    let mut seed = 0x9e3779b97f4a7c15u64;
    let mut prompt = vec![cfg.bos_token_id.unwrap_or(1)];
    while prompt.len() < n_prompt {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        prompt.push(259 + (seed % (cfg.vocab_size as u64 - 259)) as u32);
    }

    let t0 = Instant::now();
    let mut state = model.new_state(n_prompt + n_gen);
    let alloc = t0.elapsed();
    let t0 = Instant::now();
    let mut logits = model.forward(&mut state, &prompt).expect("prefill");
    let prefill = t0.elapsed().as_secs_f64();
    let t0 = Instant::now();
    for _ in 0..n_gen {
        let next = logits
            .iter()
            .enumerate()
            .fold((0, f32::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b })
            .0 as u32;
        logits = model.forward(&mut state, &[next]).expect("decode");
    }
    let decode = t0.elapsed().as_secs_f64();
    // Prefill again with the weights' pages mapped, and count the CPU time all threads got:
    // on a shared machine tokens per CPU-second show the kernels' efficiency, wall time not.
    let mut state2 = model.new_state(n_prompt + n_gen);
    let (t0, c0) = (Instant::now(), process_cpu_ns());
    model.forward(&mut state2, &prompt).expect("prefill");
    let (wall2, cpu2) = (
        t0.elapsed().as_secs_f64(),
        (process_cpu_ns() - c0) as f64 / 1e9,
    );
    println!("state alloc: {:.2} ms", alloc.as_secs_f64() * 1e3);
    println!(
        "prefill {n_prompt} tokens: {:.2} s, {:.1} tok/s, {:.1} GFLOP/s (matmuls)",
        prefill,
        n_prompt as f64 / prefill,
        2.0 * model.n_params() as f64 * n_prompt as f64 / prefill / 1e9
    );
    println!(
        "prefill again (pages mapped): {:.2} s, {:.1} tok/s; {:.2} CPU-s, {:.1} tok per CPU-second, {:.1} GFLOP per CPU-second",
        wall2,
        n_prompt as f64 / wall2,
        cpu2,
        n_prompt as f64 / cpu2,
        2.0 * model.n_params() as f64 * n_prompt as f64 / cpu2 / 1e9
    );
    println!(
        "decode {n_gen} tokens: {:.2} s, {:.2} tok/s, {:.1} GB/s of weights",
        decode,
        n_gen as f64 / decode,
        model.bytes_per_decode_step() as f64 * n_gen as f64 / decode / 1e9
    );
}

/// CPU time all of this process's threads have had, from /proc/self/task/*/schedstat (Linux;
/// 0 elsewhere).
fn process_cpu_ns() -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}
