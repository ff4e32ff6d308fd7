//! `spinfer bench --concurrency 1,2,4,8,16`: many streams at once on one model through the
//! engine's batch scheduler, and the prefix cache's time to first token cold and warm.

use crate::{Engine, EngineOptions, GenerateOptions, InferencingParams, Result};
use std::path::Path;
use std::sync::Barrier;
use std::time::{Duration, Instant};

/// One concurrency level's numbers.
#[derive(Clone, Debug)]
pub struct ConcurrencyLevel {
    pub streams: usize,
    pub generated: usize,
    pub wall_s: f64,
    /// Generated tokens per second over all streams.
    pub tok_s: f64,
    /// Time to first token, median and worst over the streams (ms).
    pub ttft_p50_ms: f64,
    pub ttft_max_ms: f64,
    /// Gaps between a stream's consecutive tokens, over all streams (ms).
    pub itl_p50_ms: f64,
    pub itl_p99_ms: f64,
}

/// Time to first token of a long shared prefix + a short question.
#[derive(Clone, Debug)]
pub struct PrefixTtft {
    pub prefix_tokens: usize,
    pub question_tokens: usize,
    /// Medians over the runs (ms).
    pub cold_ms: f64,
    pub warm_ms: f64,
}

fn params(max_tokens: u32) -> GenerateOptions {
    GenerateOptions {
        params: InferencingParams {
            max_tokens,
            temperature: 0.0,
            repeat_penalty: 1.0,
            ..Default::default()
        },
        seed: Some(0),
        ..Default::default()
    }
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let i = ((v.len() - 1) as f64 * p).round() as usize;
    v[i]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Text of at least `tokens` tokens for `model`, distinct per `tag`.
fn text_of(engine: &Engine, model: &str, tag: &str, tokens: usize) -> Result<String> {
    const WORDS: &[&str] = &[
        "river", "stone", "garden", "light", "window", "market", "silver", "forest", "letter",
        "morning", "harbor", "engine", "paper", "summer", "valley", "candle", "bridge", "winter",
    ];
    let m = engine.inferencing_model(model)?;
    let mut s = format!("{tag}:");
    let mut i = tag.bytes().map(usize::from).sum::<usize>();
    while m.encode(&s)?.len() < tokens {
        s.push(' ');
        s.push_str(WORDS[i % WORDS.len()]);
        i = i.wrapping_mul(31).wrapping_add(7);
    }
    Ok(s)
}

/// Runs `streams` concurrent generations of `gen_tokens` after `prompt_tokens`-token prompts
/// (each stream its own prompt), for each level in `levels`.
pub fn bench_concurrency(
    registry: &Path,
    model: &str,
    levels: &[usize],
    prompt_tokens: usize,
    gen_tokens: usize,
) -> Result<Vec<ConcurrencyLevel>> {
    let max = levels.iter().copied().max().unwrap_or(1);
    let engine = Engine::with_options(
        registry,
        EngineOptions {
            prefix_cache: false, // every stream pays its prefill, as distinct prompts would
            max_batch_sequences: max,
            max_queue: max,
            ..Default::default()
        },
    );
    let prompts: Vec<String> = (0..max)
        .map(|i| text_of(&engine, model, &format!("Stream {i}"), prompt_tokens))
        .collect::<Result<_>>()?;
    engine.generate_tokens(model, &prompts[0], &params(4), &mut |_| {})?; // warm up
    let o = params(gen_tokens as u32);
    let mut out = Vec::new();
    for &n in levels {
        let barrier = Barrier::new(n);
        let runs: Vec<Result<(Duration, Vec<Instant>, Instant)>> = std::thread::scope(|s| {
            let hs: Vec<_> = prompts[..n]
                .iter()
                .map(|p| {
                    let (engine, barrier, o) = (&engine, &barrier, &o);
                    s.spawn(move || {
                        barrier.wait();
                        let t0 = Instant::now();
                        let mut times = Vec::with_capacity(gen_tokens);
                        engine.generate_tokens(model, p, o, &mut |_| times.push(Instant::now()))?;
                        let first = times.first().map_or(Duration::ZERO, |t| *t - t0);
                        Ok((first, times, t0))
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| h.join().expect("bench thread panicked"))
                .collect()
        });
        let runs = runs.into_iter().collect::<Result<Vec<_>>>()?;
        let start = runs.iter().map(|r| r.2).min().expect("a stream");
        let end = runs
            .iter()
            .filter_map(|r| r.1.last().copied())
            .max()
            .unwrap_or(start);
        let generated: usize = runs.iter().map(|r| r.1.len()).sum();
        let mut ttft: Vec<f64> = runs.iter().map(|r| ms(r.0)).collect();
        let mut itl: Vec<f64> = runs
            .iter()
            .flat_map(|r| r.1.windows(2).map(|w| ms(w[1] - w[0])))
            .collect();
        let wall_s = (end - start).as_secs_f64();
        out.push(ConcurrencyLevel {
            streams: n,
            generated,
            wall_s,
            tok_s: generated as f64 / wall_s,
            ttft_p50_ms: pct(&mut ttft, 0.5),
            ttft_max_ms: pct(&mut ttft, 1.0),
            itl_p50_ms: pct(&mut itl, 0.5),
            itl_p99_ms: pct(&mut itl, 0.99),
        });
    }
    Ok(out)
}

/// Time to first token of a `prefix_tokens` shared prefix + a `question_tokens` question:
/// cold (a prefix never seen) and warm (the prefix cached by an earlier request), medians of
/// `runs` each.
pub fn bench_prefix_ttft(
    registry: &Path,
    model: &str,
    prefix_tokens: usize,
    question_tokens: usize,
    runs: usize,
) -> Result<PrefixTtft> {
    let engine = Engine::new(registry);
    let one = params(1);
    let ttft = |prompt: &str| -> Result<f64> {
        let t0 = Instant::now();
        let mut first = None;
        engine.generate_tokens(model, prompt, &one, &mut |_| {
            first.get_or_insert_with(Instant::now);
        })?;
        Ok(ms(first.unwrap_or_else(Instant::now) - t0))
    };
    engine.generate_tokens(model, "warm up", &one, &mut |_| {})?;
    let (mut cold, mut warm) = (Vec::new(), Vec::new());
    for r in 0..runs.max(1) {
        let prefix = text_of(&engine, model, &format!("System {r}"), prefix_tokens)?;
        let q1 = text_of(&engine, model, &format!(" Question {r}a"), question_tokens)?;
        let q2 = text_of(&engine, model, &format!(" Question {r}b"), question_tokens)?;
        cold.push(ttft(&format!("{prefix}{q1}"))?);
        warm.push(ttft(&format!("{prefix}{q2}"))?);
    }
    Ok(PrefixTtft {
        prefix_tokens,
        question_tokens,
        cold_ms: pct(&mut cold, 0.5),
        warm_ms: pct(&mut warm, 0.5),
    })
}

/// The table `spinfer bench --concurrency` prints.
pub fn format_concurrency(levels: &[ConcurrencyLevel], prefix: Option<&PrefixTtft>) -> String {
    let mut s = String::from(
        "streams  generated  tok/s (all)  x single  TTFT p50 ms  TTFT max ms  ITL p50 ms  ITL p99 ms\n",
    );
    let single = levels.iter().find(|l| l.streams == 1).map(|l| l.tok_s);
    for l in levels {
        let x = single.map_or(String::from("-"), |b| format!("{:.2}", l.tok_s / b));
        s.push_str(&format!(
            "{:>7}  {:>9}  {:>11.1}  {:>8}  {:>11.1}  {:>11.1}  {:>10.2}  {:>10.2}\n",
            l.streams,
            l.generated,
            l.tok_s,
            x,
            l.ttft_p50_ms,
            l.ttft_max_ms,
            l.itl_p50_ms,
            l.itl_p99_ms
        ));
    }
    if let Some(p) = prefix {
        s.push_str(&format!(
            "prefix cache: {} prefix + {} question tokens: TTFT cold {:.1} ms, warm {:.1} ms ({:.1}x)\n",
            p.prefix_tokens,
            p.question_tokens,
            p.cold_ms,
            p.warm_ms,
            p.cold_ms / p.warm_ms
        ));
    }
    s
}

/// Embeddings throughput: `callers` concurrent callers of `per_call` sentences each against
/// one caller with all of them in one call, `rounds` times each; sentences/s of both.
pub fn bench_embed_concurrency(
    registry: &Path,
    model: &str,
    callers: usize,
    per_call: usize,
    rounds: usize,
) -> Result<(f64, f64)> {
    let engine = Engine::new(registry);
    let texts: Vec<String> = (0..callers * per_call)
        .map(|i| format!("Sentence number {i} talks about the weather and a walk in the park."))
        .collect();
    engine.generate_embeddings(model, &texts[..1])?; // load
    let t0 = Instant::now();
    for _ in 0..rounds {
        engine.generate_embeddings(model, &texts)?;
    }
    let one = (texts.len() * rounds) as f64 / t0.elapsed().as_secs_f64();
    let t0 = Instant::now();
    for _ in 0..rounds {
        std::thread::scope(|s| {
            let hs: Vec<_> = texts
                .chunks(per_call)
                .map(|c| s.spawn(|| engine.generate_embeddings(model, c).map(|_| ())))
                .collect();
            hs.into_iter()
                .map(|h| h.join().expect("bench thread panicked"))
                .collect::<Result<Vec<()>>>()
        })?;
    }
    let many = (texts.len() * rounds) as f64 / t0.elapsed().as_secs_f64();
    Ok((many, one))
}
