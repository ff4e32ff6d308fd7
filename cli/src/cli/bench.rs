//! `spinfer bench`: speed of one model beside this machine's limits, measured in the same run.

use super::{Arg, Failure, Parser, DEFAULT_REGISTRY};
use spinfer::internals::bench;
use std::path::Path;

pub const USAGE: &str = "\
Usage: spinfer bench --model NAME [options]

Loads NAME (an inferencing model <registry>/llama/NAME, safetensors or one GGUF file, or an
embedding model <registry>/NAME) and prints load time, prefill and decode tokens/s and peak RSS
(or, for an embedding model, sentences/s at batch 1 and 32), beside the memory bandwidth (the
best of several readers, named in the output) and FMA peak measured in this run.

Options:
  --model NAME          model name (required)
  --registry DIR        model registry [default: .spin/ai-models]
  --prompt-tokens N     prompt length for prefill [default: 128]
  --gen-tokens N        tokens decoded after the prompt [default: 64]
  --threads N           kernel threads [default: all cores]
  --readers             also print every bandwidth reader's figure, not only the best
  --concurrency LIST    instead: streams at once through the batch scheduler, e.g. 1,2,4,8,16
                        (aggregate tok/s, time to first token, inter-token latency p50/p99),
                        then the prefix cache's TTFT (500-token prefix + 20-token question);
                        for an embedding model: 8 callers x 4 sentences vs one caller x 32
  -h, --help            this message
";

pub fn run(args: Vec<String>) -> Result<(), Failure> {
    let mut p = Parser::new(args, USAGE);
    let mut model = None;
    let mut registry = DEFAULT_REGISTRY.to_string();
    let (mut prompt_tokens, mut gen_tokens) = (128usize, 64usize);
    let mut threads: Option<usize> = None;
    let mut readers = false;
    let mut concurrency: Option<Vec<usize>> = None;
    while let Some(arg) = p.next_arg() {
        match arg {
            Arg::Positional(a) => return Err(p.usage_error(format!("unexpected argument '{a}'"))),
            Arg::Flag(f, v) => match f.as_str() {
                "--help" => return Err(Failure::Help(USAGE)),
                "--model" => model = Some(p.value(&f, v)?),
                "--registry" => registry = p.value(&f, v)?,
                "--prompt-tokens" => prompt_tokens = p.parsed(&f, v, "a whole number")?,
                "--gen-tokens" => gen_tokens = p.parsed(&f, v, "a whole number")?,
                "--threads" => threads = Some(p.parsed(&f, v, "a whole number")?),
                "--readers" => {
                    p.no_flag_value(&f, &v)?;
                    readers = true
                }
                "--concurrency" => {
                    let list = p.value(&f, v)?;
                    let levels: Option<Vec<usize>> = list
                        .split(',')
                        .map(|x| x.trim().parse().ok().filter(|&n: &usize| n > 0))
                        .collect();
                    concurrency = Some(levels.ok_or_else(|| {
                        p.usage_error(format!(
                            "--concurrency {list}: need positive numbers, e.g. 1,2,4,8"
                        ))
                    })?);
                }
                _ => return Err(p.unknown(&f)),
            },
        }
    }
    let model = model.ok_or_else(|| p.usage_error("--model NAME is required"))?;
    spinfer::check_model_name(&model)?;
    if let Some(n) = threads {
        if n == 0 || !spinfer::internals::kernels::set_threads(n) {
            return Err(p.usage_error(format!(
                "--threads {n}: need at least 1 (and set before any work)"
            )));
        }
    }

    let registry = Path::new(&registry);
    if let (Some(_), false) = (&concurrency, registry.join("llama").join(&model).is_dir()) {
        use spinfer::internals::bench_concurrency as bc;
        let (many, one) = bc::bench_embed_concurrency(registry, &model, 8, 4, 10)?;
        println!("model: {model} (embeddings): 8 concurrent callers x 4 sentences: {many:.1} sentences/s; one caller x 32: {one:.1} sentences/s");
        return Ok(());
    }
    if let Some(levels) = concurrency {
        use spinfer::internals::bench_concurrency as bc;
        let table = bc::bench_concurrency(registry, &model, &levels, prompt_tokens, gen_tokens)?;
        let prefix = bc::bench_prefix_ttft(registry, &model, 500, 20, 3)?;
        println!("model: {model}; prompts of {prompt_tokens} tokens, {gen_tokens} generated per stream (greedy)");
        print!("{}", bc::format_concurrency(&table, Some(&prefix)));
        return Ok(());
    }
    let llama_dir = registry.join("llama").join(&model);
    let embed_dir = registry.join(&model);
    // The model runs first so its peak RSS is not inflated by the probe's buffer.
    enum Report {
        Llama(bench::LlamaBench),
        Embed(bench::EmbedBench),
    }
    let (dir, report) = if llama_dir.is_dir() {
        let b = bench::bench_llama(&llama_dir, prompt_tokens, gen_tokens)?;
        (llama_dir, Report::Llama(b))
    } else if embed_dir.is_dir() {
        let b = bench::bench_embed(&embed_dir)?;
        (embed_dir, Report::Embed(b))
    } else {
        return Err(Failure::Engine(spinfer::Error::InvalidInput(format!(
            "no model directory found in registry for model '{model}'"
        ))));
    };
    let limits = bench::measure_limits();
    println!("{}", bench::format_limits(&limits));
    if readers {
        for (how, gbs) in &limits.bandwidth.tried {
            println!("    {gbs:5.1} GB/s  {how}");
        }
    }
    match report {
        Report::Llama(b) => {
            println!("model: {} (Llama)", dir.display());
            print!("{}", bench::format_llama(&b, &limits));
        }
        Report::Embed(b) => {
            println!("model: {} (embeddings)", dir.display());
            print!("{}", bench::format_embed(&b, &limits));
        }
    }
    Ok(())
}
