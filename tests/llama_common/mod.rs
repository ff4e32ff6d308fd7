//! Shared by tests/llama*.rs: fixture paths, the reference JSON, NMSE, and the check of every
//! fixture model against transformers' float32 references (made by fixtures/make_llama_fixtures.py).
#![allow(dead_code)]

use serde_json::Value;
use spinfer::internals::kernels::Policy;
use spinfer::internals::llama::LlamaModel;
use std::path::PathBuf;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

pub fn model_dir(name: &str) -> PathBuf {
    root().join("registry/llama").join(name)
}

pub fn reference(name: &str) -> Value {
    let path = root().join(format!("reference/llama/{name}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    serde_json::from_str(&text).unwrap()
}

/// Every fixture model that has a reference.
pub fn fixture_models() -> Vec<String> {
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

pub fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// ‖a − b‖² / ‖b‖², accumulated in f64.
pub fn nmse(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let (mut num, mut den) = (0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        num += (x as f64 - y as f64).powi(2);
        den += (y as f64).powi(2);
    }
    num / den
}

/// The first index of the maximum (torch.argmax's tie rule).
pub fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
}

/// Greedy ids, text, and every step's logits of every fixture model and prompt against the
/// reference; `bound(dtype)` is the NMSE bound for a model stored in `dtype`. Returns one line
/// per model with the worst NMSE seen.
pub fn check_all_fixtures(policy: Policy, bound: impl Fn(&str) -> f64) -> Vec<String> {
    let mut report = Vec::new();
    for name in fixture_models() {
        let r = reference(&name);
        let dir = model_dir(&name);
        let model = LlamaModel::load_with(&dir, policy).unwrap_or_else(|e| panic!("{name}: {e}"));
        let dtype = r["dtype"].as_str().unwrap();
        let bound = bound(dtype);
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
            assert_eq!(
                ref_logits.len(),
                want.len(),
                "{what}: one logits row per id"
            );
            for (step, ref_step) in ref_logits.iter().enumerate() {
                let e = nmse(&logits, ref_step);
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
    report
}
