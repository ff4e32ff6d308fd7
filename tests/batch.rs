//! The batch scheduler (src/batch/): a request's results do not depend on what else runs
//! beside it, cancellation frees its slot, the KV budget and queue refuse what cannot run, and
//! the prefix cache gives the same results as a full prefill.

mod llama_common;

use llama_common::*;
use spinfer::internals::kernels::Policy;
use spinfer::internals::llama::{BatchScratch, LlamaModel, Segment};
use spinfer::{
    Cause, ControlFlow, Engine, EngineOptions, FinishReason, GenerateOptions, InferencingParams,
};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

fn registry() -> PathBuf {
    root().join("registry")
}

/// Every Llama fixture: the safetensors ones with transformers references and the GGUF ones.
fn all_models() -> Vec<String> {
    let mut names = fixture_models();
    let mut gguf: Vec<String> = std::fs::read_dir(root().join("registry/llama"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("gguf-"))
        .collect();
    gguf.sort();
    names.extend(gguf);
    names
}

const PROMPTS: [&str; 4] = [
    "The quick brown fox",
    "Once upon a time",
    "Grüße aus Köln, und",
    "Beautiful is better than ugly. Explicit is better than implicit.",
];

fn argmax_margin(x: &[f32]) -> (u32, f32) {
    let i = argmax(x);
    let second = x
        .iter()
        .enumerate()
        .filter(|&(j, _)| j != i as usize)
        .map(|(_, &v)| v)
        .fold(f32::NEG_INFINITY, f32::max);
    (i, x[i as usize] - second)
}

/// NMSE bound between a batched step's logits and a lone run's, for float weights. Under a
/// rounding policy a prompt's rows round to the same bits either way, so what is left is the
/// exact path's: both run the same kernels on the same f32 values; only the matmuls'
/// summation order differs (a matrix-vector product or dot tiles for one token,
/// outer-product tiles for many):
/// per-output relative error ~u·√k with u = 2^-24 and k ≤ a few thousand, i.e. ~1e-6 at
/// worst, NMSE ≤ ~1e-12 per product and ~1e-11 through a few dozen of them (measured: at most
/// 6.4e-13 over every fixture). 1e-10 leaves margin and is ten orders below a wrong result (a
/// token attending to another sequence's cache gives NMSE ~1).
const FLOAT_NMSE: f64 = 1e-10;

/// The same for block-format (quantized GGUF) weights. Their products quantize activations to
/// 8 bits per 32-value block; an activation that the summation order moves by one f32 ulp
/// across a rounding boundary changes by one quantization step (≤ max|x|/127 of its block),
/// the size of the error the format already makes: NMSE up to ~1e-4 per affected product.
/// 1e-3 bounds it, as tests/llama.rs bounds bf16 activation rounding, and stays three orders
/// below a wrong result. (Measured at 3363062: exactly 0 on every block-format fixture, since
/// each x86 tier gives a token the same bits batched or alone, as kernels/tests/quant.rs
/// checks; earlier gguf-q8_0 gave 1.1e-4.)
const BLOCK_NMSE: f64 = 1e-3;

/// The policies a batch must not change results under: exact, and each rounding of a prompt's
/// rows where this CPU has it (AMX; AVX-512 BF16 dots; elsewhere the same as exact). Rounded
/// or not, a row's precision is its token's (prompt or generated), never the batch's, so a
/// rounded prompt row has the same bits in any batch and generated rows stay exact.
const POLICIES: [Policy; 3] = [
    Policy::EXACT,
    Policy {
        amx: true,
        bf16_dot: false,
    },
    Policy {
        amx: false,
        bf16_dot: true,
    },
];

#[test]
fn batched_step_logits_match_lone_runs_on_every_fixture() {
    let n_new = 6;
    let mut worst = 0f64;
    let mut compared = 0;
    for (name, policy) in all_models()
        .into_iter()
        .flat_map(|n| POLICIES.map(|p| (n.clone(), p)))
    {
        let bound = if name.starts_with("gguf-q") {
            BLOCK_NMSE
        } else {
            FLOAT_NMSE
        };
        let m = LlamaModel::load_with(&model_dir(&name), policy)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let prompts: Vec<Vec<u32>> = PROMPTS.iter().map(|p| m.encode(p).unwrap()).collect();
        // Lone: prefill, then greedy decode, recording every step's logits and token.
        let lone: Vec<(Vec<u32>, Vec<Vec<f32>>)> = prompts
            .iter()
            .map(|ids| {
                let mut s = m.new_state(ids.len() + n_new);
                let mut rows = vec![m.forward(&mut s, ids).unwrap().to_vec()];
                let mut toks = Vec::new();
                for _ in 0..n_new {
                    let t = argmax(rows.last().unwrap());
                    toks.push(t);
                    rows.push(m.forward(&mut s, &[t]).unwrap().to_vec());
                }
                (toks, rows)
            })
            .collect();
        // Batched: all four sequences in every step, each fed the lone run's tokens. Prompts
        // are prefilled in chunks of 3 tokens, so early steps mix prefill chunks of some
        // sequences with the decodes of others (the shortest prompt decodes first).
        let mut kvs: Vec<_> = prompts
            .iter()
            .map(|ids| m.try_new_kv(ids.len() + n_new).unwrap())
            .collect();
        let feeds: Vec<Vec<u32>> = prompts
            .iter()
            .zip(&lone)
            .map(|(ids, (toks, _))| ids.iter().chain(toks).copied().collect())
            .collect();
        let mut pos = [0usize; 4];
        let mut got: Vec<Vec<Vec<f32>>> = vec![Vec::new(); 4];
        let mut sc = BatchScratch::default();
        while (0..4).any(|i| got[i].len() < n_new + 1) {
            let mut segs = Vec::new();
            let mut who = Vec::new();
            for (i, kv) in kvs.iter_mut().enumerate() {
                if got[i].len() == n_new + 1 {
                    continue;
                }
                let n_prompt = prompts[i].len();
                let n = if pos[i] < n_prompt {
                    (n_prompt - pos[i]).min(3)
                } else {
                    1
                };
                let logits = pos[i] + n >= n_prompt;
                segs.push(Segment {
                    kv,
                    pos: pos[i],
                    tokens: &feeds[i][pos[i]..pos[i] + n],
                    logits,
                    // As the scheduler marks them (and `forward` takes a lone run's prompt).
                    prompt: n_prompt > 1 && pos[i] < n_prompt,
                });
                who.push((i, n, logits));
            }
            m.step(&mut sc, &mut segs);
            let vocab = m.vocab_size();
            let mut row = 0;
            for (i, n, logits) in who {
                pos[i] += n;
                if logits {
                    got[i].push(sc.logits()[row * vocab..(row + 1) * vocab].to_vec());
                    row += 1;
                }
            }
        }
        for (i, (toks, rows)) in lone.iter().enumerate() {
            for (step, (a, b)) in got[i].iter().zip(rows).enumerate() {
                let e = nmse(a, b);
                worst = worst.max(e);
                assert!(
                    e < bound,
                    "{name} {policy:?} prompt {i} step {step}: NMSE {e:e}"
                );
                // Greedy identical: the same argmax unless the lone run's top two are closer
                // than 10× the RMS difference the bound allows.
                let rms =
                    (b.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / b.len() as f64).sqrt();
                let (t, margin) = argmax_margin(b);
                if (margin as f64) > 10.0 * (bound.sqrt() * rms) && step < n_new {
                    assert_eq!(argmax(a), t, "{name} prompt {i} step {step}");
                    assert_eq!(t, toks[step]);
                }
                compared += 1;
            }
        }
    }
    eprintln!("{compared} logits rows compared; worst NMSE {worst:e}");
}

fn greedy(max_tokens: u32) -> InferencingParams {
    InferencingParams {
        max_tokens,
        temperature: 0.0,
        ..Default::default()
    }
}

fn sampled(max_tokens: u32) -> InferencingParams {
    InferencingParams {
        max_tokens,
        temperature: 0.9,
        top_k: 0,
        top_p: 0.95,
        ..Default::default()
    }
}

#[test]
fn concurrent_generations_match_lone_ones_greedy_and_seeded() {
    // Under the process's default policy, which rounds a prompt's bf16 rows where the CPU
    // has AMX (or, on AMD, AVX-512 BF16 dots): generated tokens run exact whether batched or
    // alone, so the texts are equal on every machine.
    let mut batched = 0;
    for name in all_models() {
        // Greedy and seeded requests, with different lengths so sequences leave mid-batch.
        let jobs: Vec<(&str, InferencingParams, u64)> = PROMPTS
            .iter()
            .enumerate()
            .flat_map(|(i, p)| {
                [
                    (*p, greedy(16 + 4 * i as u32), 0),
                    (*p, sampled(24 - 3 * i as u32), 7 + i as u64),
                ]
            })
            .collect();
        let lone: Vec<_> = {
            let e = Engine::new(registry());
            jobs.iter()
                .map(|(p, params, seed)| e.infer_with_seed(&name, p, *params, *seed).unwrap())
                .collect()
        };
        let engine = Engine::new(registry());
        engine
            .infer_with_seed(&name, "warm up", greedy(1), 0)
            .unwrap(); // load first
        let barrier = Barrier::new(jobs.len());
        let together: Vec<_> = std::thread::scope(|s| {
            let hs: Vec<_> = jobs
                .iter()
                .map(|(p, params, seed)| {
                    let (engine, name, barrier) = (&engine, &name, &barrier);
                    s.spawn(move || {
                        barrier.wait();
                        engine.infer_with_seed(name, p, *params, *seed).unwrap()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(together, lone, "{name}");
        eventually("every sequence gone", || {
            let st = engine.stats();
            (st.active, st.queued) == (0, 0)
        });
        batched += engine.stats().batched_steps;
    }
    // The requests did run together (8 threads released at once, 16+ steps each).
    assert!(batched > 0, "no step ran two sequences together");
}

/// Waits (up to a generous deadline: this is liveness, not speed) until `f` holds.
fn eventually(what: &str, f: impl Fn() -> bool) {
    let end = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn cancelled_requests_leave_and_free_their_memory() {
    let engine = Engine::with_options(
        registry(),
        EngineOptions {
            prefix_cache: false,
            ..Default::default()
        },
    );
    let model = "tiny-llama";
    let long = GenerateOptions {
        params: greedy(100_000), // capped at the context: runs until stopped
        ..Default::default()
    };
    // A callback that says stop.
    let mut n = 0;
    let r = engine
        .generate(model, "Once upon a time", &long, &mut |_| {
            n += 1;
            if n == 3 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .unwrap();
    assert_eq!(r.finish, FinishReason::Cancelled);
    eventually("the broken-off sequence leaves", || {
        let st = engine.stats();
        st.active == 0 && st.kv_bytes_used == 0
    });

    // A flag set from another thread while another request keeps running beside it.
    let flag = Arc::new(AtomicBool::new(false));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        let (engine, flag2) = (&engine, Arc::clone(&flag));
        let stopped = s.spawn(move || {
            let o = GenerateOptions {
                cancel: Some(flag2),
                ..long.clone()
            };
            let mut tx = Some(tx);
            engine
                .generate(model, "The quick brown fox", &o, &mut |_| {
                    if let Some(tx) = tx.take() {
                        tx.send(()).unwrap();
                    }
                    ControlFlow::Continue(())
                })
                .unwrap()
        });
        let other = s.spawn(move || {
            engine
                .infer_with_seed(model, "Beautiful is better", greedy(200), 0)
                .unwrap()
        });
        rx.recv().unwrap();
        flag.store(true, Ordering::Relaxed);
        let r = stopped.join().unwrap();
        assert_eq!(r.finish, FinishReason::Cancelled);
        assert!((r.usage.generated_token_count as usize) < 1000);
        let o = other.join().unwrap();
        assert_eq!(o.usage.generated_token_count, 200);
    });
    eventually("everything freed", || {
        let st = engine.stats();
        st.active == 0 && st.kv_bytes_used == 0
    });
}

#[test]
fn the_kv_budget_and_the_queue_refuse_what_cannot_run() {
    let m = LlamaModel::load(&model_dir("tiny-llama")).unwrap();
    let prompt = "Once upon a time";
    let n_prompt = m.encode(prompt).unwrap().len();
    // Room for one sequence of 200 positions, not two.
    let one = m.kv_bytes(n_prompt + 199);
    let opts = EngineOptions {
        kv_budget_bytes: one + one / 2,
        max_queue: 1,
        prefix_cache: false,
        ..Default::default()
    };
    let engine = Engine::with_options(registry(), opts.clone());
    // Could never fit: a runtime-error saying so, of a cause that says retrying won't help.
    let e = engine
        .infer_with_seed("tiny-llama", prompt, greedy(600), 0)
        .unwrap_err();
    assert_eq!(e.cause(), Some(Cause::TooLarge), "{e}");
    assert!(e.message().unwrap().contains("KV budget"), "{e}");
    // No queue at all: refused as overloaded.
    let no_queue = Engine::with_options(
        registry(),
        EngineOptions {
            max_queue: 0,
            ..opts.clone()
        },
    );
    let e = no_queue
        .infer_with_seed("tiny-llama", prompt, greedy(4), 0)
        .unwrap_err();
    assert_eq!(e.cause(), Some(Cause::Overloaded), "{e}");

    // A runs (holding the budget) until cancelled; B waits in the queue for its memory; C
    // finds the queue full. A tiny model may finish A before B and C are in: then try again.
    let params = greedy(200);
    for attempt in 0.. {
        assert!(attempt < 20, "never caught A running");
        let flag = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let caught = std::thread::scope(|s| {
            let (engine, f) = (&engine, Arc::clone(&flag));
            let a = s.spawn(move || {
                let o = GenerateOptions {
                    params,
                    cancel: Some(f),
                    ..Default::default()
                };
                let mut tx = Some(tx);
                engine
                    .generate("tiny-llama", prompt, &o, &mut |_| {
                        if let Some(tx) = tx.take() {
                            tx.send(()).unwrap();
                        }
                        ControlFlow::Continue(())
                    })
                    .unwrap()
            });
            rx.recv().unwrap();
            let b = s.spawn(move || engine.infer_with_seed("tiny-llama", prompt, params, 0));
            let start = Instant::now();
            while engine.stats().queued == 0 && start.elapsed() < Duration::from_secs(5) {
                std::thread::yield_now();
            }
            let c = engine.infer_with_seed("tiny-llama", prompt, params, 0);
            flag.store(true, Ordering::Relaxed);
            let a = a.join().unwrap();
            let b = b.join().unwrap();
            // B always runs in the end, after A.
            assert_eq!(b.unwrap().usage.generated_token_count, 200);
            if a.finish != FinishReason::Cancelled {
                return false; // A was done before C came: no contention seen
            }
            match c {
                Err(e) => {
                    assert_eq!(e.cause(), Some(Cause::Overloaded), "{e}");
                    assert!(e.message().unwrap().contains("overloaded"), "{e}");
                    true
                }
                // B was not queued yet when C came (it then queued behind B, or ran).
                Ok(_) => false,
            }
        });
        if caught {
            break;
        }
    }
    eventually("all KV freed", || engine.stats().kv_bytes_used == 0);
}

#[test]
fn a_cached_prefix_gives_the_same_results_as_a_full_prefill() {
    // On this machine's kernels the engine's default policy is the exact path unless the CPU
    // has AVX-512 BF16 or AMX; the fixture is f32 either way, so every path is exact f32.
    let model = "llama-mha-f32";
    let system = "You are a helpful assistant. Answer briefly and truthfully. ".repeat(12);
    let questions = [
        "Question: what is the capital of France? Answer:",
        "Question: how many legs has a spider? Answer:",
        "Question: what colour is the sky? Answer:",
    ];
    let cold = Engine::with_options(
        registry(),
        EngineOptions {
            prefix_cache: false,
            ..Default::default()
        },
    );
    let warm = Engine::new(registry());
    let mut reused_before = 0;
    for (i, q) in questions.iter().enumerate() {
        let prompt = format!("{system}{q}");
        let a = cold.infer_with_seed(model, &prompt, greedy(12), 0).unwrap();
        let b = warm.infer_with_seed(model, &prompt, greedy(12), 0).unwrap();
        assert_eq!(a, b, "question {i}");
        let reused = warm.stats().prefix_tokens_reused;
        if i > 0 {
            // The shared system prompt (well over 100 tokens) came from the cache.
            assert!(
                reused - reused_before > 100,
                "question {i}: reused {reused}"
            );
        }
        reused_before = reused;
        // A repeated prompt reuses all but its last token, with the same result.
        let again = warm.infer_with_seed(model, &prompt, greedy(12), 0).unwrap();
        assert_eq!(again, a);
    }
    assert_eq!(cold.stats().prefix_tokens_reused, 0);
    assert!(warm.stats().prefix_cache_entries >= 1);
}

#[test]
fn concurrent_embeddings_share_passes_and_match_lone_calls() {
    let model = "tiny-bert";
    let text = std::fs::read_to_string(root().join("reference/bert/tiny-bert.json")).unwrap();
    let r: serde_json::Value = serde_json::from_str(&text).unwrap();
    let sentences: Vec<String> = r["sentences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["text"].as_str().unwrap().to_string())
        .collect();
    // 8 callers of 4 sentences each (cycling through the reference's).
    let calls: Vec<Vec<String>> = (0..8)
        .map(|c| {
            (0..4)
                .map(|j| sentences[(c * 4 + j) % sentences.len()].clone())
                .collect()
        })
        .collect();
    let lone: Vec<_> = {
        let e = Engine::new(registry());
        calls
            .iter()
            .map(|c| e.generate_embeddings(model, c).unwrap())
            .collect()
    };
    let engine = Engine::new(registry());
    let barrier = Barrier::new(calls.len());
    let together: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = calls
            .iter()
            .map(|c| {
                let (engine, barrier) = (&engine, &barrier);
                s.spawn(move || {
                    barrier.wait();
                    engine.generate_embeddings(model, c).unwrap()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, (a, b)) in together.iter().zip(&lone).enumerate() {
        assert_eq!(a.usage, b.usage, "caller {i}");
        assert_eq!(a.embeddings.len(), 4);
        for (x, y) in a.embeddings.iter().zip(&b.embeddings) {
            // tests/bert.rs's bound for a text beside others in a pass vs alone: the same
            // arithmetic up to float reassociation inside the kernels.
            let d = x
                .iter()
                .zip(y)
                .map(|(p, q)| (p - q).abs())
                .fold(0f32, f32::max);
            assert!(d <= 1e-6, "caller {i}: max|d| {d:e}");
        }
    }
}
