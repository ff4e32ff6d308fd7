//! The Llama model against transformers' float32 references (fixtures/reference/llama/*.json,
//! made by fixtures/make_llama_fixtures.py), and its errors on bad model folders.

use serde_json::Value;
use spinfer::llama::LlamaModel;
use spinfer::Error;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

fn model_dir(name: &str) -> PathBuf {
    root().join("registry/llama").join(name)
}

fn reference(name: &str) -> Value {
    let path = root().join(format!("reference/llama/{name}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    serde_json::from_str(&text).unwrap()
}

/// Every fixture model that has a reference.
fn fixture_models() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(root().join("reference/llama"))
        .unwrap()
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            let stem = name.strip_suffix(".json")?;
            model_dir(stem).is_dir().then(|| stem.to_string())
        })
        .collect();
    names.sort();
    assert!(
        names.len() >= 5,
        "expected the fixture models, found {names:?}"
    );
    names
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// ‖a − b‖² / ‖b‖², accumulated in f64.
fn nmse(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let (mut num, mut den) = (0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        num += (x as f64 - y as f64).powi(2);
        den += (y as f64).powi(2);
    }
    num / den
}

/// The first index of the maximum (torch.argmax's tie rule).
fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
}

/// NMSE bound for a model's logits, by stored weight dtype.
///
/// Both sides compute in f32 from the same stored weights (transformers upcasts them), so for
/// f32 and f16 weights the only differences are accumulation order and the 6 significant digits
/// the reference keeps: per-element relative error ~1e-6 at most, i.e. NMSE ~1e-12..1e-9 after a
/// few layers; 1e-6 leaves margin and is still six orders below a wrong model (NMSE ~1).
/// For bf16 weights the kernels' matmul may round activations to bf16 for AVX-512 BF16 dot
/// products (prefill only; the decode matvec stays f32, but decode steps read the K/V the
/// prefill wrote): relative error ~2^-9 per rounded input, NMSE ~(2^-9)²/3 ≈ 1.3e-6 per product,
/// compounded over the layers and the logit projection; 1e-4 bounds that.
fn nmse_bound(dtype: &str) -> f64 {
    match dtype {
        "bfloat16" => 1e-4,
        _ => 1e-6,
    }
}

#[test]
fn greedy_and_logits_match_transformers_on_every_fixture() {
    let mut report = Vec::new();
    for name in fixture_models() {
        let r = reference(&name);
        let dir = model_dir(&name);
        let model = LlamaModel::load(&dir).unwrap_or_else(|e| panic!("{name}: {e}"));
        let dtype = r["dtype"].as_str().unwrap();
        let bound = nmse_bound(dtype);
        let eos: Vec<u32> = ids(&r["config"]["eos_token_ids"]);
        assert_eq!(model.eos_ids(), &eos[..], "{name}: eos ids");
        let n_new = r["n_new"].as_u64().unwrap() as usize;
        let (mut worst_prefill, mut worst_decode) = (0f64, 0f64);
        for p in r["prompts"].as_array().unwrap() {
            let pname = p["name"].as_str().unwrap();
            let what = format!("{name}/{pname}");
            let prompt_ids = ids(&p["prompt_ids"]);
            assert_eq!(
                model.encode(p["prompt"].as_str().unwrap()).unwrap(),
                prompt_ids,
                "{what}: prompt ids"
            );
            let want = ids(&p["greedy_ids"]);
            let ref_logits: Vec<Vec<f32>> =
                p["logits"].as_array().unwrap().iter().map(floats).collect();

            // Prefill in one pass, then decode our own argmax one token at a time.
            let mut state = model.new_state(prompt_ids.len() + n_new);
            let mut got = Vec::new();
            let mut logits = model.forward(&mut state, &prompt_ids).unwrap().to_vec();
            for step in 0..want.len() {
                let e = nmse(&logits, &ref_logits[step]);
                assert!(e < bound, "{what}: step {step} NMSE {e:e} > {bound:e}");
                if step == 0 {
                    worst_prefill = worst_prefill.max(e);
                } else {
                    worst_decode = worst_decode.max(e);
                }
                let next = argmax(&logits);
                got.push(next);
                if eos.contains(&next) || got.len() == n_new {
                    break;
                }
                logits = model.forward(&mut state, &[next]).unwrap().to_vec();
            }
            assert_eq!(got, want, "{what}: greedy ids");
            assert_eq!(
                eos.contains(got.last().unwrap()),
                p["stopped_by_eos"].as_bool().unwrap(),
                "{what}: stop reason"
            );
            let text_ids = match got.last() {
                Some(t) if eos.contains(t) => &got[..got.len() - 1],
                _ => &got[..],
            };
            assert_eq!(
                model.decode(text_ids).unwrap(),
                p["greedy_text"].as_str().unwrap(),
                "{what}: text"
            );

            // Every prompt position's logits, from the batched pass and token by token.
            if let Some(all) = p.get("prefill_logits_all").and_then(|v| v.as_array()) {
                let vocab = model.vocab_size();
                let mut s = model.new_state(prompt_ids.len());
                let batched = model.forward_all_logits(&mut s, &prompt_ids).unwrap();
                let mut s = model.new_state(prompt_ids.len());
                for (t, want_row) in all.iter().enumerate() {
                    let want_row = floats(want_row);
                    let e = nmse(&batched[t * vocab..(t + 1) * vocab], &want_row);
                    assert!(e < bound, "{what}: prefill position {t} NMSE {e:e}");
                    worst_prefill = worst_prefill.max(e);
                    let one = model.forward(&mut s, &prompt_ids[t..t + 1]).unwrap();
                    let e = nmse(one, &want_row);
                    assert!(e < bound, "{what}: one-by-one position {t} NMSE {e:e}");
                    worst_decode = worst_decode.max(e);
                }
            }
        }
        report.push(format!(
            "{name:20} {dtype:9} bound {bound:.0e}  worst NMSE prefill {worst_prefill:.2e} decode {worst_decode:.2e}"
        ));
    }
    eprintln!("{}", report.join("\n"));
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
    assert!(prompt_ids.len() > spinfer::llama::MAX_BATCH);
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
}

#[test]
fn missing_files_are_named() {
    let m = TempModel::copy_of("tiny-llama", "noconfig");
    std::fs::remove_file(m.path().join("config.json")).unwrap();
    let e = load_err(m.path());
    assert!(e.contains("config.json"), "{e}");

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
    sendable::<spinfer::llama::LlamaState>();
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
