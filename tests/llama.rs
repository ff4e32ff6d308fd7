//! The Llama model against transformers' float32 references (fixtures/reference/llama/*.json,
//! made by fixtures/make_llama_fixtures.py), with the default and the exact precision policy, and
//! its errors on bad model folders.

mod llama_common;

use spinfer::internals::kernels::Policy;

use llama_common::*;
use spinfer::internals::llama::LlamaModel;
use spinfer::Error;
use std::path::{Path, PathBuf};

/// NMSE bound for a model's logits, by stored weight dtype.
///
/// Both sides compute in f32 from the same stored weights (transformers upcasts them), so for
/// f32 and f16 weights the only differences are accumulation order and the 6 significant digits
/// the reference keeps: per-element relative error ~1e-6 at most, i.e. NMSE ~1e-12..1e-9 after a
/// few layers (measured: 3e-12..6e-12); 1e-6 leaves margin and is still six orders below a wrong
/// model (NMSE ~1).
/// For bf16 weights the kernels' matmul may round activations to bf16 for AVX-512 BF16 dot
/// products (prefill only; the decode matvec stays f32, but decode steps read the K/V the
/// prefill wrote): relative error up to 2^-9 per rounded input, NMSE ~(2^-9)²/3 ≈ 1.3e-6 per
/// product, about eight rounded products per layer, amplified by the fixtures' random weights
/// (scaled for clear greedy margins): measured here up to 7e-5; fixtures/check_llama_bf16_rounding.py
/// rounds every linear input to bf16 in transformers and finds at most 1.9e-4 (llama-mqa-bf16)
/// and no argmax flips. 1e-3 bounds that and stays three orders below a wrong model. The AMX
/// matmul (prefill of ≥ 2 tokens, `AMX_MIN_N`, where the CPU has AMX) rounds the same inputs the same way
/// (round to nearest even, f32 accumulation), so the same bound applies. With f32
/// activations bf16 models measure ~4e-12 too (the exact-policy test below).
fn nmse_bound(policy: Policy, dtype: &str) -> f64 {
    let k = spinfer::internals::kernels::kernels();
    let rounds = (k.has_bf16_dot() && policy.bf16_dot)
        || (policy.amx && spinfer::internals::kernels::amx_available());
    match dtype {
        "bfloat16" if rounds => 1e-3,
        _ => 1e-6,
    }
}

#[test]
fn greedy_and_logits_match_transformers_on_every_fixture() {
    let policy = Policy::from_env();
    let report = check_all_fixtures(policy, |d| nmse_bound(policy, d));
    eprintln!(
        "kernels: {}, {policy:?}\n{}",
        spinfer::internals::kernels::kernels().isa(),
        report.join("\n")
    );
}

/// The same check with bf16 weights computed exactly (widened to f32, f32 activations and
/// accumulation) instead of through bf16 dot products or AMX tiles: every dtype meets the f32
/// accumulation-order bound. Runs beside the default-policy test in the same process.
#[test]
fn exact_policy_matches_transformers_on_every_fixture() {
    let report = check_all_fixtures(Policy::EXACT, |d| nmse_bound(Policy::EXACT, d));
    eprintln!(
        "kernels: {}, exact\n{}",
        spinfer::internals::kernels::kernels().isa(),
        report.join("\n")
    );
}

#[test]
fn long_prompt_runs_in_chunks_and_fills_the_cache() {
    // The "long" prompts are longer than one prefill chunk, so they exercise chunking and
    // attention over earlier chunks' cache; checked above against transformers. Here: the
    // state's position and the capacity limits.
    let model = LlamaModel::load(&model_dir("tiny-llama")).unwrap();
    let r = reference("tiny-llama");
    let long = r["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "long")
        .unwrap();
    let prompt_ids = ids(&long["prompt_ids"]);
    assert!(prompt_ids.len() > spinfer::internals::llama::MAX_BATCH);
    let mut state = model.new_state(prompt_ids.len());
    model.forward(&mut state, &prompt_ids).unwrap();
    assert_eq!(state.pos(), prompt_ids.len());
    // The cache is full: one more token is invalid input, and the state is unchanged.
    let e = model.forward(&mut state, &[5]).unwrap_err();
    assert!(
        matches!(e, Error::InvalidInput(ref m) if m.contains("capacity")),
        "{e}"
    );
    assert_eq!(state.pos(), prompt_ids.len());
}

#[test]
fn too_long_prompt_and_bad_token_are_invalid_input() {
    let model = LlamaModel::load(&model_dir("tiny-llama")).unwrap();
    let ctx = model.context_len();
    assert_eq!(ctx, 1024);
    let mut state = model.new_state(ctx + 100);
    assert_eq!(state.capacity(), ctx);
    let too_long = vec![5u32; ctx + 1];
    let e = model.forward(&mut state, &too_long).unwrap_err();
    assert!(
        matches!(e, Error::InvalidInput(ref m) if m.contains("context of 1024")),
        "{e}"
    );
    let e = model.forward(&mut state, &[1, 512]).unwrap_err();
    assert!(
        matches!(e, Error::InvalidInput(ref m) if m.contains("token id 512")),
        "{e}"
    );
    let e = model.forward(&mut state, &[]).unwrap_err();
    assert!(matches!(e, Error::InvalidInput(_)), "{e}");
    assert_eq!(state.pos(), 0);
}

// ---- bad model folders ----

/// A copy of a fixture model folder in a fresh temp dir.
struct TempModel(PathBuf);

impl TempModel {
    fn copy_of(name: &str, tag: &str) -> TempModel {
        let dir = std::env::temp_dir().join(format!(
            "spinfer-llama-test-{}-{tag}-{}",
            std::process::id(),
            name
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for e in std::fs::read_dir(model_dir(name)).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
        }
        TempModel(dir)
    }
    fn path(&self) -> &Path {
        &self.0
    }
    /// Rewrite model.safetensors through `edit` on (name, dtype, shape, bytes) entries.
    fn edit_weights(
        &self,
        edit: impl FnOnce(&mut Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>),
    ) {
        let file = self.0.join("model.safetensors");
        let bytes = std::fs::read(&file).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut entries: Vec<_> = st
            .tensors()
            .into_iter()
            .map(|(n, t)| (n, t.dtype(), t.shape().to_vec(), t.data().to_vec()))
            .collect();
        edit(&mut entries);
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = entries
            .iter()
            .map(|(n, d, s, b)| {
                (
                    n.clone(),
                    safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
                )
            })
            .collect();
        let out = safetensors::serialize(views, None).unwrap();
        std::fs::write(&file, out).unwrap();
    }
}

impl Drop for TempModel {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The cause a failed load reports.
fn load_cause(dir: &Path) -> Option<spinfer::Cause> {
    LlamaModel::load(dir).err().and_then(|e| e.cause())
}

fn load_err(dir: &Path) -> String {
    match LlamaModel::load(dir) {
        Ok(_) => panic!("expected an error loading {}", dir.display()),
        Err(e) => {
            assert!(matches!(e, Error::RuntimeError(_)), "{e:?}");
            e.to_string()
        }
    }
}

const Q0: &str = "model.layers.0.self_attn.q_proj.weight";

#[test]
fn missing_tensor_is_named() {
    let m = TempModel::copy_of("tiny-llama", "missing");
    m.edit_weights(|e| e.retain(|(n, ..)| n != Q0));
    let e = load_err(m.path());
    assert!(e.contains(Q0) && e.contains("model.safetensors"), "{e}");
}

#[test]
fn missing_lm_head_of_an_untied_model_is_named() {
    let m = TempModel::copy_of("tiny-llama", "nohead");
    m.edit_weights(|e| e.retain(|(n, ..)| n != "lm_head.weight"));
    let e = load_err(m.path());
    assert!(
        e.contains("lm_head.weight") && e.contains("tie_word_embeddings"),
        "{e}"
    );
}

#[test]
fn wrong_shape_is_named() {
    let m = TempModel::copy_of("tiny-llama", "shape");
    m.edit_weights(|e| {
        let t = e.iter_mut().find(|(n, ..)| n == Q0).unwrap();
        // (64, 64) stored as (32, 128): same bytes, wrong shape.
        t.2 = vec![32, 128];
    });
    let e = load_err(m.path());
    assert!(
        e.contains(Q0) && e.contains("[32, 128]") && e.contains("[64, 64]"),
        "{e}"
    );
}

#[test]
fn wrong_dtype_is_named() {
    let m = TempModel::copy_of("tiny-llama", "dtype");
    m.edit_weights(|e| {
        let t = e.iter_mut().find(|(n, ..)| n == Q0).unwrap();
        // bf16 (64, 64) -> I32 (64, 32): same byte count.
        t.1 = safetensors::Dtype::I32;
        t.2 = vec![64, 32];
    });
    let e = load_err(m.path());
    assert!(e.contains(Q0) && e.contains("I32"), "{e}");
}

#[test]
fn corrupt_header_is_named() {
    let m = TempModel::copy_of("tiny-llama", "corrupt");
    let file = m.path().join("model.safetensors");
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[8..16].copy_from_slice(b"garbage!");
    std::fs::write(&file, &bytes).unwrap();
    let e = load_err(m.path());
    assert!(
        e.contains("model.safetensors") && e.contains("not a valid safetensors"),
        "{e}"
    );
    assert_eq!(load_cause(m.path()), Some(spinfer::Cause::Model));
}

#[test]
fn missing_files_are_named() {
    let m = TempModel::copy_of("tiny-llama", "noconfig");
    std::fs::remove_file(m.path().join("config.json")).unwrap();
    let e = load_err(m.path());
    assert!(e.contains("config.json"), "{e}");
    assert_eq!(load_cause(m.path()), Some(spinfer::Cause::Io));

    let m = TempModel::copy_of("tiny-llama", "notok");
    std::fs::remove_file(m.path().join("tokenizer.json")).unwrap();
    let e = load_err(m.path());
    assert!(e.contains("tokenizer.json"), "{e}");

    let m = TempModel::copy_of("tiny-llama", "noweights");
    std::fs::remove_file(m.path().join("model.safetensors")).unwrap();
    let e = load_err(m.path());
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn unknown_rope_type_is_named() {
    let m = TempModel::copy_of("llama-rope-llama3", "rope");
    let cfg = m.path().join("config.json");
    let text = std::fs::read_to_string(&cfg).unwrap();
    assert!(text.contains("\"llama3\""));
    std::fs::write(&cfg, text.replace("\"llama3\"", "\"dynamic\"")).unwrap();
    let e = load_err(m.path());
    assert!(
        e.contains("config.json") && e.contains("\"dynamic\""),
        "{e}"
    );
}

#[test]
fn model_is_shareable_across_threads() {
    // The engine caches one model and serves requests from several threads.
    fn shareable<T: Send + Sync>() {}
    fn sendable<T: Send>() {}
    shareable::<LlamaModel>();
    sendable::<spinfer::internals::llama::LlamaState>();
    let model = std::sync::Arc::new(LlamaModel::load(&model_dir("tiny-llama")).unwrap());
    let ids = model.encode("The quick brown fox").unwrap();
    let runs: Vec<Vec<f32>> = (0..2)
        .map(|_| {
            let (m, ids) = (model.clone(), ids.clone());
            std::thread::spawn(move || {
                let mut s = m.new_state(ids.len());
                m.forward(&mut s, &ids).unwrap().to_vec()
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect();
    assert_eq!(runs[0], runs[1]);
}

#[test]
fn concurrent_decodes_match_a_lone_one() {
    // Decode steps run on a team of the pool's threads; concurrent requests (from plain
    // threads and from inside the pool) must neither deadlock nor change the numbers.
    use rayon::prelude::*;
    let model = LlamaModel::load(&model_dir("tiny-llama")).unwrap();
    let ids = model.encode("The quick brown fox").unwrap();
    let run = || {
        let mut s = model.new_state(ids.len() + 12);
        let mut logits = model.forward(&mut s, &ids).unwrap().to_vec();
        let mut out = Vec::new();
        for _ in 0..12 {
            let next = argmax(&logits);
            out.push(next);
            logits = model.forward(&mut s, &[next]).unwrap().to_vec();
        }
        (out, logits)
    };
    let alone = run();
    std::thread::scope(|sc| {
        let hs: Vec<_> = (0..3).map(|_| sc.spawn(run)).collect();
        for h in hs {
            assert_eq!(h.join().unwrap(), alone);
        }
    });
    let in_pool: Vec<_> = (0..4).into_par_iter().map(|_| run()).collect();
    for r in in_pool {
        assert_eq!(r, alone);
    }
}

#[test]
fn decode_of_unknown_ids_does_not_panic() {
    let model = LlamaModel::load(&model_dir("tiny-llama")).unwrap();
    // Ids past the tokenizer's vocabulary have no text: either skipped or a clear error.
    match model.decode(&[300, 99_999, 301]) {
        Ok(text) => assert_eq!(text, model.decode(&[300, 301]).unwrap()),
        Err(e) => assert!(matches!(e, Error::RuntimeError(_)), "{e:?}"),
    }
}

#[test]
fn thread_count_does_not_change_results() {
    // The thread count stays a process-wide speed knob (`SPINFER_THREADS` / `set_threads`)
    // because no kernel splits a sum across threads: each output element is computed by one
    // thread in a fixed order. So a model gives bit-identical logits on 1 thread and on all of
    // them, and two models with different thread counts could not differ in their numbers.
    // Checked on every fixture format (safetensors f32/f16/bf16 and the GGUF block formats),
    // prefill (batched matmul) and decode (team matvec), default and exact policy.
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let mut names = fixture_models();
    names.extend(
        std::fs::read_dir(root().join("registry/llama"))
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with("gguf-")),
    );
    for policy in [Policy::from_env(), Policy::EXACT] {
        for name in &names {
            let model = LlamaModel::load_with(&model_dir(name), policy).unwrap();
            let ids = model.encode("The quick brown fox jumps over").unwrap();
            let run = || {
                let mut s = model.new_state(ids.len() + 4);
                let mut all = model.forward(&mut s, &ids).unwrap().to_vec();
                for t in [1u32, 5, 9, 3] {
                    all.extend_from_slice(model.forward(&mut s, &[t]).unwrap());
                }
                all.iter().map(|x| x.to_bits()).collect::<Vec<u32>>()
            };
            let many = run();
            assert_eq!(one.install(run), many, "{name} with {policy:?}");
        }
    }
}
