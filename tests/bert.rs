//! BERT embedder against references made by fixtures/make_bert_reference.py:
//! all-MiniLM-L6-v2 vs sentence-transformers (the model itself is laid out by
//! fixtures/fetch-minilm.sh), tiny random BERTs vs transformers, and load errors.

use spinfer::internals::bert::BertModel;
use spinfer::Error;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

struct RefSentence {
    text: String,
    token_count: usize,
    input_ids: Vec<u32>,
    embedding: Vec<f32>,
}

struct Reference {
    max_seq_length: usize,
    sentences: Vec<RefSentence>,
}

fn reference(name: &str) -> Reference {
    let path = root().join(format!("fixtures/reference/bert/{name}.json"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let json: serde_json::Value = serde_json::from_str(&text).expect("reference is JSON");
    let sentences = json["sentences"]
        .as_array()
        .expect("sentences")
        .iter()
        .map(|s| RefSentence {
            text: s["text"].as_str().expect("text").to_string(),
            token_count: s["token_count"].as_u64().expect("token_count") as usize,
            input_ids: s["input_ids"]
                .as_array()
                .expect("input_ids")
                .iter()
                .map(|v| v.as_u64().expect("id") as u32)
                .collect(),
            embedding: s["embedding"]
                .as_array()
                .expect("embedding")
                .iter()
                .map(|v| v.as_f64().expect("float") as f32)
                .collect(),
        })
        .collect();
    Reference {
        max_seq_length: json["max_seq_length"].as_u64().expect("max_seq_length") as usize,
        sentences,
    }
}

/// The real model, or a failure that says how to get it (never a silent skip).
fn minilm_dir() -> PathBuf {
    let dir = root().join("fixtures/real/registry/all-minilm-l6-v2");
    assert!(
        dir.join("model.safetensors").is_file() && dir.join("tokenizer.json").is_file(),
        "the real all-MiniLM-L6-v2 is missing at {}: run fixtures/fetch-minilm.sh first",
        dir.display()
    );
    dir
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

fn max_abs(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).abs())
        .fold(0.0, f64::max)
}

/// Every vector within (cosine >= min_cos, max |d| <= max_d) of the reference; prints the worst.
fn check(what: &str, got: &[Vec<f32>], r: &Reference, min_cos: f64, max_d: f64) {
    assert_eq!(got.len(), r.sentences.len(), "{what}: one vector per input");
    let (mut worst_cos, mut worst_d) = (1.0f64, 0.0f64);
    for (g, s) in got.iter().zip(&r.sentences) {
        assert_eq!(g.len(), s.embedding.len(), "{what}: dimension");
        let (c, d) = (cosine(g, &s.embedding), max_abs(g, &s.embedding));
        assert!(
            c >= min_cos && d <= max_d,
            "{what}: {:?}: cosine {c:.9} (need >= {min_cos}), max|d| {d:.3e} (need <= {max_d:e})",
            s.text
        );
        worst_cos = worst_cos.min(c);
        worst_d = worst_d.max(d);
    }
    println!("{what}: worst cosine {worst_cos:.9}, worst max|d| {worst_d:.3e}");
}

fn texts(r: &Reference) -> Vec<&str> {
    r.sentences.iter().map(|s| s.text.as_str()).collect()
}

fn check_model(model: &BertModel, r: &Reference, name: &str, min_cos: f64, max_d: f64) {
    assert_eq!(model.max_tokens(), r.max_seq_length, "{name}: window");
    // The tokens the model sees are the reference's, one by one.
    for s in &r.sentences {
        assert_eq!(
            model.tokenize(&s.text).unwrap(),
            s.input_ids,
            "{name}: ids of {:?}",
            s.text
        );
    }
    // All in one batch.
    let (vecs, count) = model.embed(&texts(r)).unwrap();
    check(&format!("{name} batched"), &vecs, r, min_cos, max_d);
    let total: usize = r.sentences.iter().map(|s| s.token_count).sum();
    assert_eq!(count as usize, total, "{name}: usage over the batch");
    // Each alone.
    let mut alone = Vec::new();
    for s in &r.sentences {
        let (v, c) = model.embed(&[&s.text]).unwrap();
        assert_eq!(c as usize, s.token_count, "{name}: usage of {:?}", s.text);
        alone.extend(v);
    }
    check(&format!("{name} alone"), &alone, r, min_cos, max_d);
}

#[test]
fn minilm_matches_sentence_transformers() {
    let model = BertModel::load(&minilm_dir()).unwrap();
    assert_eq!(model.dim(), 384);
    check_model(
        &model,
        &reference("all-minilm-l6-v2"),
        "all-minilm-l6-v2",
        0.99999,
        1e-4,
    );
}

#[test]
fn minilm_vector_does_not_depend_on_batch() {
    let model = BertModel::load(&minilm_dir()).unwrap();
    let r = reference("all-minilm-l6-v2");
    let t = texts(&r);
    let probe = "A man is eating food while sitting on a bench in the park.";
    let (alone, _) = model.embed(&[probe]).unwrap();
    let batches: Vec<Vec<&str>> = vec![
        vec!["", probe, "Hi"],
        vec![t[19], t[18], probe, t[17]], // beside inputs at the 256 window
        vec![probe, probe],
        // ~2600 tokens: more than one forward pass (passes hold at most 2048 tokens).
        t.iter().chain(t.iter()).copied().chain([probe]).collect(),
    ];
    for b in &batches {
        let (vecs, count) = model.embed(b).unwrap();
        if b.len() > 2 * t.len() {
            check(
                "all-minilm-l6-v2 twice, split over passes",
                &vecs[..t.len()],
                &r,
                0.99999,
                1e-4,
            );
            check(
                "(second copy)",
                &vecs[t.len()..2 * t.len()],
                &r,
                0.99999,
                1e-4,
            );
            let per: usize = r.sentences.iter().map(|s| s.token_count).sum();
            assert_eq!(count as usize, 2 * per + 16, "usage over passes");
        }
        for (i, text) in b.iter().enumerate() {
            if *text == probe {
                let d = max_abs(&vecs[i], &alone[0]);
                // Mathematically identical; allow only float reassociation inside kernels.
                assert!(
                    d <= 1e-6,
                    "batch of {}: position {i} differs by {d:e}",
                    b.len()
                );
            }
        }
    }
}

#[test]
fn empty_list_gives_nothing() {
    let model = BertModel::load(&root().join("fixtures/registry/tiny-bert")).unwrap();
    let (vecs, count) = model.embed(&[]).unwrap();
    assert!(vecs.is_empty());
    assert_eq!(count, 0);
}

#[test]
fn minilm_without_config_json_uses_minilm_shape() {
    let src = minilm_dir();
    let dir = TempDir::new("noconfig");
    for f in [
        "tokenizer.json",
        "model.safetensors",
        "sentence_bert_config.json",
    ] {
        link(&src.join(f), &dir.0.join(f));
    }
    let model = BertModel::load(&dir.0).unwrap();
    let r = reference("all-minilm-l6-v2");
    let (vecs, _) = model.embed(&texts(&r)).unwrap();
    check(
        "all-minilm-l6-v2 without config.json",
        &vecs,
        &r,
        0.99999,
        1e-4,
    );
}

#[test]
fn tiny_bert_matches_transformers() {
    // f32, plain names, window = max_position_embeddings (128); its tokenizer.json says
    // truncate at 16 and pad to 24, which must be overridden.
    let model = BertModel::load(&root().join("fixtures/registry/tiny-bert")).unwrap();
    assert_eq!(model.dim(), 36);
    check_model(&model, &reference("tiny-bert"), "tiny-bert", 0.999999, 1e-5);
}

#[test]
fn tiny_bert_legacy_names_bf16_and_window_40() {
    // bf16, `bert.` prefix, LayerNorm gamma/beta, a pooler, sentence_bert_config.json window 40.
    let model = BertModel::load(&root().join("fixtures/registry/tiny-bert-legacy")).unwrap();
    check_model(
        &model,
        &reference("tiny-bert-legacy"),
        "tiny-bert-legacy",
        0.999999,
        1e-5,
    );
}

// ---- load errors ---------------------------------------------------------------------------

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "spinfer-bert-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn link(src: &Path, dst: &Path) {
    #[cfg(unix)]
    std::os::unix::fs::symlink(src, dst).unwrap();
    #[cfg(not(unix))]
    std::fs::copy(src, dst).map(|_| ()).unwrap();
}

/// A copy of tiny-bert to break.
fn tiny_copy(tag: &str) -> TempDir {
    let dir = TempDir::new(tag);
    let src = root().join("fixtures/registry/tiny-bert");
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.0.join(e.file_name())).unwrap();
    }
    dir
}

fn load_err(dir: &Path) -> String {
    match BertModel::load(dir) {
        Ok(_) => panic!("{} loaded but should not have", dir.display()),
        Err(e @ Error::RuntimeError(_)) | Err(e @ Error::InvalidInput(_)) => e.to_string(),
        Err(e) => panic!("unexpected error {e}"),
    }
}

fn edit_config(dir: &Path, key: &str, value: serde_json::Value) {
    let p = dir.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    cfg[key] = value;
    std::fs::write(&p, cfg.to_string()).unwrap();
}

#[test]
fn missing_tokenizer_is_an_error_naming_it() {
    let d = tiny_copy("notok");
    std::fs::remove_file(d.0.join("tokenizer.json")).unwrap();
    let e = load_err(&d.0);
    assert!(e.contains("tokenizer.json"), "{e}");
}

#[test]
fn missing_weights_is_an_error_naming_them() {
    let d = tiny_copy("noweights");
    std::fs::remove_file(d.0.join("model.safetensors")).unwrap();
    let e = load_err(&d.0);
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn corrupt_weights_is_an_error_naming_the_file() {
    let d = tiny_copy("corrupt");
    let p = d.0.join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap(); // truncated
    let e = load_err(&d.0);
    assert!(e.contains("model.safetensors"), "{e}");
    std::fs::write(&p, b"not a safetensors file at all").unwrap();
    let e = load_err(&d.0);
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn wrong_shape_is_an_error_naming_the_tensor() {
    let d = tiny_copy("shape");
    edit_config(&d.0, "intermediate_size", 99.into());
    let e = load_err(&d.0);
    assert!(
        e.contains("encoder.layer.0.intermediate.dense.weight") && e.contains("[100, 36]"),
        "{e}"
    );
}

#[test]
fn missing_tensor_is_an_error_naming_it() {
    let d = tiny_copy("layers");
    edit_config(&d.0, "num_hidden_layers", 3.into());
    let e = load_err(&d.0);
    assert!(e.contains("encoder.layer.2."), "{e}");
}

#[test]
fn activation_other_than_exact_gelu_is_refused() {
    for act in ["gelu_new", "relu", "gelu_pytorch_tanh"] {
        let d = tiny_copy("act");
        edit_config(&d.0, "hidden_act", act.into());
        let e = load_err(&d.0);
        assert!(e.contains("hidden_act") && e.contains(act), "{e}");
    }
}

#[test]
fn bad_configs_are_errors_naming_the_file() {
    let d = tiny_copy("badjson");
    std::fs::write(d.0.join("config.json"), "{ not json").unwrap();
    let e = load_err(&d.0);
    assert!(e.contains("config.json"), "{e}");

    let d = tiny_copy("heads");
    edit_config(&d.0, "num_attention_heads", 5.into());
    let e = load_err(&d.0);
    assert!(e.contains("num_attention_heads"), "{e}");

    let d = tiny_copy("window");
    std::fs::write(
        d.0.join("sentence_bert_config.json"),
        r#"{"max_seq_length": 1}"#,
    )
    .unwrap();
    let e = load_err(&d.0);
    assert!(
        e.contains("sentence_bert_config.json") && e.contains("max_seq_length"),
        "{e}"
    );

    let d = tiny_copy("pooling");
    std::fs::create_dir(d.0.join("1_Pooling")).unwrap();
    std::fs::write(
        d.0.join("1_Pooling/config.json"),
        r#"{"pooling_mode_cls_token": true, "pooling_mode_mean_tokens": false}"#,
    )
    .unwrap();
    let e = load_err(&d.0);
    assert!(e.contains("1_Pooling") && e.contains("mean"), "{e}");
}

#[test]
fn tokenizer_larger_than_the_vocabulary_is_refused() {
    let d = tiny_copy("vocab");
    edit_config(&d.0, "vocab_size", 100.into());
    let e = load_err(&d.0);
    assert!(e.contains("tokenizer.json") && e.contains("100"), "{e}");
}

#[test]
fn model_can_be_shared_between_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<BertModel>();
    // And concurrent calls give the same vectors as one call.
    let model = BertModel::load(&root().join("fixtures/registry/tiny-bert")).unwrap();
    let r = reference("tiny-bert");
    let t = texts(&r);
    let (want, _) = model.embed(&t).unwrap();
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..3)
            .map(|_| s.spawn(|| model.embed(&t).unwrap().0))
            .collect();
        for h in hs {
            assert_eq!(h.join().unwrap(), want);
        }
    });
}
