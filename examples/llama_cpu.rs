//! Llama prefill and decode timed in CPU time as well as wall time, for a shared, busy machine
//! where wall time mostly measures the other tenants: with one thread (the default here), CPU
//! time is this thread's own (`/proc/thread-self/schedstat`, ns), so tokens per CPU-second is
//! the single-core speed whatever else runs. Linux only.
//!
//! cargo run --release --example llama_cpu -- DIR [PROMPT_TOKENS=128] [GEN_TOKENS=64] [THREADS=1]

use spinfer::internals::llama::LlamaModel;
use std::path::PathBuf;
use std::time::Instant;

/// This thread's CPU time in seconds.
fn cpu() -> f64 {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").expect("schedstat");
    s.split_whitespace().next().unwrap().parse::<f64>().unwrap() / 1e9
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(dir) = args.first().map(PathBuf::from) else {
        eprintln!("usage: llama_cpu DIR [PROMPT_TOKENS] [GEN_TOKENS] [THREADS]");
        std::process::exit(2);
    };
    let num = |i: usize, default: usize| {
        args.get(i)
            .map(|s| s.parse::<usize>().expect("a number"))
            .unwrap_or(default)
    };
    let (n_prompt, n_gen, threads) = (num(1, 128), num(2, 64), num(3, 1));
    spinfer::internals::kernels::set_threads(threads);
    let model = LlamaModel::load(&dir).unwrap_or_else(|e| panic!("{e}"));
    let prompt: Vec<u32> = (0..n_prompt as u32)
        .map(|i| 1 + (i * 7919) % 40000)
        .collect();
    let mut state = model.new_state(n_prompt + n_gen);
    model.forward(&mut state, &prompt).unwrap(); // maps the pages in
    for rep in 0..3 {
        state.reset();
        let (t0, c0) = (Instant::now(), cpu());
        let mut logits = model.forward(&mut state, &prompt).unwrap().to_vec();
        let (pw, pc) = (t0.elapsed().as_secs_f64(), cpu() - c0);
        let (t0, c0) = (Instant::now(), cpu());
        for _ in 0..n_gen {
            let next = logits
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .unwrap()
                .0 as u32;
            logits = model.forward(&mut state, &[next]).unwrap().to_vec();
        }
        let (dw, dc) = (t0.elapsed().as_secs_f64(), cpu() - c0);
        let n = n_prompt as f64;
        let g = n_gen as f64;
        println!(
            "rep {rep}: prefill {n_prompt}: {:.1} tok/s wall, {:.1} tok/CPU-s (main thread); decode {n_gen} after it: {:.1} tok/s wall, {:.1} tok/CPU-s",
            n / pw,
            n / pc,
            g / dw,
            g / dc
        );
    }
}
