//! The engine through its public API: access control, registry lookup, validation, generation on
//! the fixture models against the transformers references, streaming, seeds, concurrency,
//! embeddings.
//!
//! Fixture tests read `fixtures/registry` and `fixtures/reference` (made by the scripts in
//! `fixtures/`, see fixtures/README.md). The real all-MiniLM-L6-v2 is not committed: its test
//! runs when `fixtures/fetch-minilm.sh` has laid it out and says so when it has not.

use serde_json::Value;
use spinfer::{ControlFlow, Engine, Error, FinishReason, GenerateOptions, InferencingParams};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn registry() -> PathBuf {
    root().join("fixtures/registry")
}

fn reference(kind: &str, name: &str) -> Value {
    let p = root().join(format!("fixtures/reference/{kind}/{name}.json"));
    let bytes = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_slice(&bytes).unwrap()
}

/// Every Llama fixture model that has a reference file.
fn llama_fixtures() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(registry().join("llama"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| {
                    root()
                        .join(format!("fixtures/reference/llama/{n}.json"))
                        .is_file()
                })
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Greedy without a repeat penalty, as the transformers references were generated.
fn greedy(max_tokens: u32) -> InferencingParams {
    InferencingParams {
        temperature: 0.0,
        repeat_penalty: 1.0,
        max_tokens,
        ..Default::default()
    }
}

/// A fresh empty folder under the system temp dir, removed on drop.
struct TempDir(PathBuf);
impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "spinfer-engine-test-{}-{}-{tag}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn access_error(model: &str) -> Error {
    Error::InvalidInput(format!(
        "The component does not have access to use '{model}'. To give the component access, add '{model}' to the 'ai_models' key for the component in your spin.toml manifest"
    ))
}

// ---------------------------------------------------------------- access control (contract §3)

#[test]
fn access_control_answers_spins_exact_error_before_touching_files() {
    // The registry does not even exist: the answer comes from the ai_models list alone.
    let engine = Engine::new("/nonexistent/spinfer/registry");
    let c = engine.component(["llama2-chat", "all-minilm-l6-v2"]);
    assert_eq!(
        c.infer("codellama-instruct", "hi").unwrap_err(),
        access_error("codellama-instruct")
    );
    assert_eq!(
        c.infer_with_options("x", "hi", greedy(3)).unwrap_err(),
        access_error("x")
    );
    let mut sink = |_: &str| {};
    assert_eq!(
        c.infer_streaming("x", "hi", greedy(3), Some(1), &mut sink)
            .unwrap_err(),
        access_error("x")
    );
    assert_eq!(
        c.generate_embeddings("other", &["a"]).unwrap_err(),
        access_error("other")
    );
    // Exact and case-sensitive; a traversal name that is not listed is an access error too.
    assert_eq!(
        c.infer("Llama2-Chat", "hi").unwrap_err(),
        access_error("Llama2-Chat")
    );
    assert_eq!(
        c.generate_embeddings("../all-minilm-l6-v2", &["a"])
            .unwrap_err(),
        access_error("../all-minilm-l6-v2")
    );
    // An empty list allows nothing.
    let none = engine.component(Vec::<String>::new());
    assert_eq!(
        none.infer("llama2-chat", "hi").unwrap_err(),
        access_error("llama2-chat")
    );
    // Allowed names go on to the registry (which does not exist here).
    assert_eq!(
        c.infer("llama2-chat", "hi").unwrap_err(),
        Error::InvalidInput("no model directory found in registry for model 'llama2-chat'".into())
    );
    let e = c
        .generate_embeddings("all-minilm-l6-v2", &["a"])
        .unwrap_err();
    assert!(
        matches!(&e, Error::ModelNotSupported(r) if r.contains("all-minilm-l6-v2")),
        "{e}"
    );
    assert_eq!(engine.load_count(), 0);
}

#[test]
fn a_listed_model_works_through_the_component_and_others_do_not_load() {
    let Some(model) = llama_fixtures().into_iter().find(|n| n == "tiny-llama") else {
        eprintln!("no tiny-llama fixture yet: skipped");
        return;
    };
    let engine = Engine::new(registry());
    let c = engine.component([model.clone()]);
    let r = c
        .infer_with_options(&model, "The quick brown fox", greedy(4))
        .unwrap();
    assert_eq!(r.usage.generated_token_count, 4);
    // A model present in the registry but not listed: access error, nothing more loaded.
    let other = llama_fixtures().into_iter().find(|n| n != &model).unwrap();
    assert_eq!(c.infer(&other, "x").unwrap_err(), access_error(&other));
    assert_eq!(engine.load_count(), 1);
}

// ---------------------------------------------------------------- registry (contract §2)

#[test]
fn missing_inferencing_model_has_spins_text() {
    let tmp = TempDir::new("missing");
    std::fs::create_dir_all(tmp.path().join("llama")).unwrap();
    let engine = Engine::new(tmp.path());
    for name in ["llama2-chat", "codellama-instruct", "all-minilm-l6-v2"] {
        assert_eq!(
            engine.infer(name, "hello").unwrap_err(),
            Error::InvalidInput(format!(
                "no model directory found in registry for model '{name}'"
            ))
        );
    }
    // A file (not a folder) of that name is not a model directory either.
    std::fs::write(tmp.path().join("llama/afile"), b"x").unwrap();
    assert_eq!(
        engine.infer("afile", "hello").unwrap_err(),
        Error::InvalidInput("no model directory found in registry for model 'afile'".into())
    );
    assert_eq!(engine.load_count(), 0);
}

#[test]
fn names_that_could_leave_the_registry_are_invalid_input() {
    // Layout: <tmp>/registry/llama/ (empty) and, outside it, folders that the bad names would
    // reach: <tmp>/outside/ and <tmp>/llama/outside.
    let tmp = TempDir::new("traversal");
    let reg = tmp.path().join("registry");
    std::fs::create_dir_all(reg.join("llama")).unwrap();
    for d in ["outside", "llama/outside", "registry/outside-x"] {
        let d = tmp.path().join(d);
        std::fs::create_dir_all(&d).unwrap();
        for f in ["config.json", "tokenizer.json", "model.safetensors"] {
            std::fs::write(d.join(f), b"{}").unwrap();
        }
    }
    let engine = Engine::new(&reg);
    let bad = [
        "",
        ".",
        "..",
        "../outside",
        "../../outside",
        "../../llama/outside",
        "..\\outside",
        "llama/../../outside",
        "/etc",
        "sub/dir",
        "nul\0byte",
    ];
    for name in bad {
        match engine.infer_with_options(name, "x", greedy(1)) {
            Err(Error::InvalidInput(m)) => assert!(m.starts_with("model name "), "{name:?}: {m}"),
            other => panic!("infer {name:?}: {other:?}"),
        }
        match engine.generate_embeddings(name, &["x"]) {
            Err(Error::InvalidInput(m)) => assert!(m.starts_with("model name "), "{name:?}: {m}"),
            other => panic!("embed {name:?}: {other:?}"),
        }
    }
    assert_eq!(engine.load_count(), 0);
}

#[test]
fn folders_that_are_not_bert_embedders_are_model_not_supported() {
    let tmp = TempDir::new("not-bert");
    let reg = tmp.path();
    // A llama model folder, a folder without weights, a folder whose config says llama.
    std::fs::create_dir_all(reg.join("llama/some-llm")).unwrap();
    std::fs::create_dir_all(reg.join("no-weights")).unwrap();
    std::fs::write(reg.join("no-weights/tokenizer.json"), b"{}").unwrap();
    std::fs::create_dir_all(reg.join("a-llama")).unwrap();
    for f in ["tokenizer.json", "model.safetensors"] {
        std::fs::write(reg.join("a-llama").join(f), b"{}").unwrap();
    }
    std::fs::write(
        reg.join("a-llama/config.json"),
        br#"{"model_type": "llama"}"#,
    )
    .unwrap();
    let engine = Engine::new(reg);
    for name in [
        "llama",
        "no-weights",
        "a-llama",
        "absent",
        "all-minilm-l6-v2",
    ] {
        let e = engine.generate_embeddings(name, &["hello"]).unwrap_err();
        assert!(
            matches!(&e, Error::ModelNotSupported(r) if r.contains(name)),
            "{name}: {e}"
        );
    }
    assert_eq!(engine.load_count(), 0);
}

#[test]
fn a_failed_load_is_not_cached() {
    if !registry().join("llama/tiny-llama/config.json").is_file() {
        eprintln!("no tiny-llama fixture yet: skipped");
        return;
    }
    // The folder exists but is empty: the load fails (naming the missing file) ...
    let tmp = TempDir::new("failed-load");
    let dir = tmp.path().join("llama/m");
    std::fs::create_dir_all(&dir).unwrap();
    let engine = Engine::new(tmp.path());
    match engine.infer_with_options("m", "hi", greedy(2)) {
        Err(e @ Error::RuntimeError(_)) => {
            // The message names what is missing.
            assert_eq!(e.cause(), Some(spinfer::Cause::Model), "{e}");
            assert!(e.message().unwrap().contains("model.safetensors"), "{e}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(engine.load_count(), 0);
    // ... and once the files are there, the same engine loads it.
    for e in std::fs::read_dir(registry().join("llama/tiny-llama")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    let r = engine.infer_with_options("m", "hi", greedy(2)).unwrap();
    assert_eq!(r.usage.generated_token_count, 2);
    assert_eq!(engine.load_count(), 1);
}

// ---------------------------------------------------------------- validation

#[test]
fn meaningless_parameters_are_invalid_input_naming_the_value() {
    // Parameters are checked before the registry: no model is needed.
    let engine = Engine::new("/nonexistent");
    let d = InferencingParams::default();
    let cases = [
        (
            InferencingParams {
                temperature: f32::NAN,
                ..d
            },
            "temperature NaN",
        ),
        (
            InferencingParams {
                temperature: f32::NEG_INFINITY,
                ..d
            },
            "temperature -inf",
        ),
        (
            InferencingParams {
                repeat_penalty: 0.0,
                ..d
            },
            "repeat_penalty 0",
        ),
        (
            InferencingParams {
                repeat_penalty: -2.0,
                ..d
            },
            "repeat_penalty -2",
        ),
        (
            InferencingParams {
                repeat_penalty: f32::INFINITY,
                ..d
            },
            "repeat_penalty inf",
        ),
        (InferencingParams { top_p: -0.5, ..d }, "top_p -0.5"),
        (
            InferencingParams {
                top_p: f32::NAN,
                ..d
            },
            "top_p NaN",
        ),
    ];
    for (p, what) in cases {
        match engine.infer_with_options("m", "hi", p) {
            Err(Error::InvalidInput(m)) => assert!(m.starts_with(what), "{what}: {m}"),
            other => panic!("{what}: {other:?}"),
        }
    }
}

#[test]
fn prompt_longer_than_the_context_is_invalid_input_naming_the_lengths() {
    let Some(model) = llama_fixtures().into_iter().next() else {
        eprintln!("no llama fixtures yet: skipped");
        return;
    };
    let ctx = reference("llama", &model)["config"]["max_position_embeddings"]
        .as_u64()
        .unwrap();
    let engine = Engine::new(registry());
    let prompt = "The quick brown fox jumps over the lazy dog. ".repeat(ctx as usize / 4);
    let dir = registry().join("llama").join(&model);
    let n = spinfer::internals::llama::LlamaModel::load(&dir)
        .unwrap()
        .encode(&prompt)
        .unwrap()
        .len();
    assert!(n as u64 >= ctx);
    assert_eq!(
        engine.infer(&model, &prompt).unwrap_err(),
        Error::InvalidInput(format!(
            "the prompt is {n} tokens long but model '{model}' has a context of {ctx} tokens; the prompt must be shorter than the context"
        ))
    );
}

#[test]
fn max_tokens_zero_returns_empty_text_and_the_prompt_count() {
    let Some(model) = llama_fixtures().into_iter().next() else {
        eprintln!("no llama fixtures yet: skipped");
        return;
    };
    let r = reference("llama", &model);
    let short = &r["prompts"][0];
    let engine = Engine::new(registry());
    let out = engine
        .infer_with_options(&model, short["prompt"].as_str().unwrap(), greedy(0))
        .unwrap();
    assert_eq!(out.text, "");
    assert_eq!(out.usage.generated_token_count, 0);
    assert_eq!(
        out.usage.prompt_token_count as usize,
        short["prompt_ids"].as_array().unwrap().len()
    );
}

// ---------------------------------------------------------------- generation vs transformers

/// Greedy generation through the engine equals transformers' greedy output on every fixture
/// model and prompt (short, non-ASCII, empty = `<s>` alone, long), EOS stops included.
#[test]
fn greedy_generation_matches_the_transformers_reference() {
    let models = llama_fixtures();
    if models.is_empty() {
        eprintln!("no llama fixtures yet: skipped");
        return;
    }
    let engine = Engine::new(registry());
    for model in &models {
        let r = reference("llama", model);
        let n_new = r["n_new"].as_u64().unwrap() as u32;
        for p in r["prompts"].as_array().unwrap() {
            let prompt = p["prompt"].as_str().unwrap();
            let out = engine
                .infer_with_options(model, prompt, greedy(n_new))
                .unwrap_or_else(|e| panic!("{model}/{}: {e}", p["name"]));
            let what = format!("{model}/{}", p["name"]);
            assert_eq!(out.text, p["greedy_text"].as_str().unwrap(), "{what}");
            assert_eq!(
                out.usage.generated_token_count as usize,
                p["greedy_ids"].as_array().unwrap().len(),
                "{what}"
            );
            assert_eq!(
                out.usage.prompt_token_count as usize,
                p["prompt_ids"].as_array().unwrap().len(),
                "{what}"
            );
        }
    }
    assert_eq!(engine.load_count(), models.len());
}

#[test]
fn streamed_fragments_concatenate_to_the_text() {
    let models = llama_fixtures();
    if models.is_empty() {
        eprintln!("no llama fixtures yet: skipped");
        return;
    }
    let engine = Engine::new(registry());
    for model in &models {
        let r = reference("llama", model);
        for p in r["prompts"].as_array().unwrap() {
            let prompt = p["prompt"].as_str().unwrap();
            // Greedy: the same text as the reference, in fragments of complete UTF-8.
            let mut frags: Vec<String> = Vec::new();
            let out = engine
                .infer_streaming(model, prompt, greedy(12), None, &mut |t| {
                    frags.push(t.to_string())
                })
                .unwrap();
            assert_eq!(frags.concat(), out.text, "{model}/{}", p["name"]);
            assert_eq!(out.text, p["greedy_text"].as_str().unwrap());
            assert!(frags.iter().all(|f| !f.is_empty()));
            // Sampled, longer: still concatenates.
            let params = InferencingParams {
                max_tokens: 40,
                temperature: 1.2,
                ..Default::default()
            };
            let mut s = String::new();
            let out = engine
                .infer_streaming(model, prompt, params, Some(7), &mut |t| s.push_str(t))
                .unwrap();
            assert_eq!(s, out.text, "{model}/{} sampled", p["name"]);
        }
    }
}

#[test]
fn generate_reports_finish_and_stops_when_asked() {
    let Some(model) = llama_fixtures().into_iter().find(|n| n == "llama-gqa-bf16") else {
        eprintln!("no llama-gqa-bf16 fixture yet: skipped");
        return;
    };
    let engine = Engine::new(registry());
    let r = reference("llama", &model);
    let p = &r["prompts"][0];
    let prompt = p["prompt"].as_str().unwrap();
    let opts = GenerateOptions {
        params: greedy(12),
        ..Default::default()
    };
    let mut frags = Vec::new();
    let full = engine
        .generate(&model, prompt, &opts, &mut |t| {
            frags.push(t.to_string());
            ControlFlow::Continue(())
        })
        .unwrap();
    // Same text as the transformers reference; 12 tokens without EOS is a length finish.
    assert_eq!(full.text, p["greedy_text"].as_str().unwrap());
    assert_eq!(frags.concat(), full.text);
    assert_eq!(full.usage.generated_token_count, 12);
    assert_eq!(full.finish, FinishReason::Length);

    // Break after the second fragment: the text is exactly those fragments.
    let mut seen = Vec::new();
    let cut = engine
        .generate(&model, prompt, &opts, &mut |t| {
            seen.push(t.to_string());
            if seen.len() == 2 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .unwrap();
    assert_eq!(cut.finish, FinishReason::Cancelled);
    assert_eq!(cut.text, seen.concat());
    assert!(full.text.starts_with(&cut.text) && cut.text.len() < full.text.len());

    // A cancel flag set beforehand: nothing generated.
    let flag = Arc::new(AtomicBool::new(true));
    let none = engine
        .generate(
            &model,
            prompt,
            &GenerateOptions {
                cancel: Some(flag),
                ..opts.clone()
            },
            &mut |_| ControlFlow::Continue(()),
        )
        .unwrap();
    assert_eq!(
        (none.text.as_str(), none.finish),
        ("", FinishReason::Cancelled)
    );

    // OpenAI penalties out of range are invalid-input, before the model is touched.
    let bad = GenerateOptions {
        frequency_penalty: 3.0,
        ..opts
    };
    let e = Engine::new("/nonexistent")
        .generate("x", "hi", &bad, &mut |_| ControlFlow::Continue(()))
        .unwrap_err();
    assert!(matches!(e, Error::InvalidInput(ref m) if m.contains("frequency_penalty 3")));
}

#[test]
fn concurrent_embedding_requests_get_their_own_vectors() {
    // Concurrent callers are embedded together (src/bert/batcher.rs); each must get exactly
    // the vectors and token count its texts get alone. Tiny-bert always; MiniLM when fetched.
    let mut models = vec![("tiny-bert".to_string(), registry())];
    let real = root().join("fixtures/real/registry");
    if real.join("all-minilm-l6-v2").is_dir() {
        models.push(("all-minilm-l6-v2".to_string(), real));
    }
    let texts: Vec<String> = (0..32)
        .map(|i| {
            format!(
                "sentence number {i} about {}",
                ["cats", "the sea", "bread"][i % 3]
            )
        })
        .collect();
    for (model, reg) in models {
        let engine = Engine::new(reg);
        let alone: Vec<_> = texts
            .chunks(4)
            .map(|c| engine.generate_embeddings(&model, c).unwrap())
            .collect();
        for _round in 0..3 {
            let go = std::sync::Barrier::new(8);
            std::thread::scope(|sc| {
                for (c, want) in texts.chunks(4).zip(&alone) {
                    let (engine, model, go) = (&engine, &model, &go);
                    sc.spawn(move || {
                        go.wait();
                        let got = engine.generate_embeddings(model, c).unwrap();
                        assert_eq!(got.usage, want.usage);
                        for (g, w) in got.embeddings.iter().zip(&want.embeddings) {
                            // Vectors never depend on their batch (no padding); allow only
                            // float reassociation inside kernels, as tests/bert.rs does.
                            let d = g
                                .iter()
                                .zip(w)
                                .map(|(a, b)| (a - b).abs())
                                .fold(0.0, f32::max);
                            assert!(d <= 1e-6, "{model}: {d:e}");
                        }
                    });
                }
            });
        }
    }
}

#[test]
fn a_fixed_seed_reproduces_sampled_output() {
    let Some(model) = llama_fixtures().into_iter().find(|n| n == "tiny-llama") else {
        eprintln!("no tiny-llama fixture yet: skipped");
        return;
    };
    let engine = Engine::new(registry());
    let params = InferencingParams {
        max_tokens: 30,
        temperature: 1.5,
        top_k: 0,
        top_p: 1.0,
        ..Default::default()
    };
    let run = |seed| {
        engine
            .infer_with_seed(&model, "Once upon a time", params, seed)
            .unwrap()
    };
    let a = run(42);
    assert_eq!(a, run(42));
    let mut s = String::new();
    let streamed = engine
        .infer_streaming(&model, "Once upon a time", params, Some(42), &mut |t| {
            s.push_str(t)
        })
        .unwrap();
    assert_eq!(streamed, a);
    // Other seeds give other texts (at T = 1.5 with no cut, 5 seeds all agreeing with seed 42
    // over 30 tokens would mean the seed is ignored).
    assert!((1..=5).any(|seed| run(seed).text != a.text));
    // Default (fresh) seeds vary too.
    let texts: std::collections::HashSet<String> = (0..5)
        .map(|_| {
            engine
                .infer_with_options(&model, "Once upon a time", params)
                .unwrap()
                .text
        })
        .collect();
    assert!(texts.len() > 1);
}

#[test]
fn concurrent_requests_match_sequential_ones_and_load_once() {
    let Some(model) = llama_fixtures().into_iter().find(|n| n == "tiny-llama") else {
        eprintln!("no tiny-llama fixture yet: skipped");
        return;
    };
    let prompts = [
        "The quick brown fox",
        "",
        "Grüße aus Köln",
        "Beautiful is better",
    ];
    let params = InferencingParams {
        max_tokens: 20,
        ..Default::default()
    };
    let sequential: Vec<_> = {
        let e = Engine::new(registry());
        prompts
            .iter()
            .enumerate()
            .map(|(i, p)| e.infer_with_seed(&model, p, params, i as u64).unwrap())
            .collect()
    };
    let engine = Engine::new(registry());
    let concurrent: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let engine = &engine;
                let model = &model;
                s.spawn(move || engine.infer_with_seed(model, p, params, i as u64).unwrap())
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(concurrent, sequential);
    assert_eq!(engine.load_count(), 1);
}

// ---------------------------------------------------------------- embeddings

fn check_embeddings_against(engine: &Engine, model: &str, reference: &Value) {
    let sentences = reference["sentences"].as_array().unwrap();
    let texts: Vec<String> = sentences
        .iter()
        .map(|s| s["text"].as_str().unwrap().to_string())
        .collect();
    let out = engine.generate_embeddings(model, &texts).unwrap();
    assert_eq!(out.embeddings.len(), texts.len());
    let tokens: u64 = sentences
        .iter()
        .map(|s| s["token_count"].as_u64().unwrap())
        .sum();
    assert_eq!(out.usage.prompt_token_count as u64, tokens);
    for (got, s) in out.embeddings.iter().zip(sentences) {
        let want: Vec<f64> = s["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert_eq!(got.len(), want.len());
        // Both are unit vectors: cosine = dot. The bert tests bound the error tightly; here we
        // check the engine hands back each sentence's own vector, in order.
        let cos: f64 = got.iter().zip(&want).map(|(&a, &b)| a as f64 * b).sum();
        assert!(cos > 0.9999, "{model} {:?}: cosine {cos}", s["text"]);
    }
    // An empty list is an empty answer.
    let none = engine
        .generate_embeddings(model, &Vec::<String>::new())
        .unwrap();
    assert!(none.embeddings.is_empty());
    assert_eq!(none.usage.prompt_token_count, 0);
}

#[test]
fn embeddings_through_the_engine_match_the_reference() {
    let reg = registry();
    let names: Vec<String> = ["tiny-bert", "tiny-bert-legacy"]
        .iter()
        .filter(|n| reg.join(n).is_dir())
        .map(|n| n.to_string())
        .collect();
    if names.is_empty() {
        eprintln!("no bert fixtures yet: skipped");
        return;
    }
    let engine = Engine::new(&reg);
    for n in &names {
        check_embeddings_against(&engine, n, &reference("bert", n));
        let c = engine.component([n.as_str()]);
        assert_eq!(
            c.generate_embeddings(n, &["x"]).unwrap().embeddings.len(),
            1
        );
    }
    assert_eq!(engine.load_count(), names.len());
}

#[test]
fn real_minilm_through_the_engine() {
    let reg = root().join("fixtures/real/registry");
    if !reg.join("all-minilm-l6-v2/model.safetensors").is_file() {
        eprintln!("all-MiniLM-L6-v2 not fetched (fixtures/fetch-minilm.sh): skipped");
        return;
    }
    let engine = Engine::new(&reg);
    check_embeddings_against(
        &engine,
        "all-minilm-l6-v2",
        &reference("bert", "all-minilm-l6-v2"),
    );
    let c = engine.component(["all-minilm-l6-v2"]);
    let r = c
        .generate_embeddings("all-minilm-l6-v2", &["hello world"])
        .unwrap();
    assert_eq!(r.embeddings[0].len(), 384);
}
