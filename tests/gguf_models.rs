//! Tiny random Llama models as GGUF files, one per weight type (made by llama.cpp's converter
//! and quantizer: fixtures/make_gguf_fixtures.py), against transformers' GGUF loader, which
//! dequantizes every weight to float32 with gguf-py and computes in float32
//! (fixtures/reference/gguf/gguf-<type>.json).

use serde_json::Value;
use spinfer::internals::kernels::Policy;
use spinfer::internals::llama::LlamaModel;
use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

const TYPES: [&str; 11] = [
    "f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k",
];

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// ‖a − b‖² / ‖b‖², in f64.
fn nmse(a: &[f32], b: &[f32]) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        num += (x as f64 - y as f64).powi(2);
        den += (y as f64).powi(2);
    }
    num / den
}

fn argmax(x: &[f32]) -> u32 {
    (0..x.len()).fold(0, |b, i| if x[i] > x[b] { i } else { b }) as u32
}

/// NMSE bound of the logits against the float32 reference, by weight type.
///
/// - f32, f16: the same weights in f32 arithmetic; only summation order and the reference's
///   6 significant digits differ (~1e-12, as for the safetensors fixtures): 1e-6.
/// - bf16: as f32 with the exact policy used here (the bf16-activation paths are bounded in
///   tests/llama.rs).
/// - block formats: both sides read the same dequantized weights, but we quantize each
///   activation vector to int8 blocks (llama.cpp's q8_0 / q8_1 / q8_K) before each product,
///   as llama.cpp does. The step is max|x|/127 per block of 32 (256 for the k-quants); with
///   Gaussian-like activations max|x| ≈ 2.5-3σ, so the rounding noise is ≈ 0.6-0.7% of an
///   activation's rms, NMSE ≈ 4e-5 per product. About 15 products lie on the path to the
///   logits here (7 per layer × 2 layers, then the lm_head), so ≈ 6e-4 expected; measured
///   1e-4..6e-4 (printed). 3e-3 bounds that and stays far below a wrong model (NMSE ~1) or a
///   wrongly dequantized block format (~1e-2 and up).
fn bound(ty: &str) -> f64 {
    match ty {
        "f32" | "f16" | "bf16" => 1e-6,
        _ => 3e-3,
    }
}

#[test]
fn every_weight_type_matches_transformers_dequantized_reference() {
    let mut report = Vec::new();
    for ty in TYPES {
        let name = format!("gguf-{ty}");
        let dir = root().join("registry/llama").join(&name);
        let path = root().join(format!("reference/gguf/{name}.json"));
        let r: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let m =
            LlamaModel::load_with(&dir, Policy::EXACT).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            m.eos_ids(),
            &ids(&r["config"]["eos_token_ids"])[..],
            "{name}"
        );
        let v = m.vocab_size();
        let mut worst = 0f64;
        let mut flips = Vec::new();
        for p in r["prompts"].as_array().unwrap() {
            let what = format!("{name}/{}", p["name"].as_str().unwrap());
            let prompt = ids(&p["prompt_ids"]);
            assert_eq!(
                m.encode(p["prompt"].as_str().unwrap()).unwrap(),
                prompt,
                "{what}"
            );
            let greedy = ids(&p["greedy_ids"]);
            // Teacher-forced: the prompt and the reference's greedy ids in one pass.
            let mut all = prompt.clone();
            all.extend_from_slice(&greedy[..greedy.len() - 1]);
            let mut state = m.new_state(all.len());
            let logits = m.forward_all_logits(&mut state, &all).unwrap();
            let rows = p["logits"].as_array().unwrap();
            // The error measured at each step that has a reference row (bounded below), and
            // the largest logit error there.
            let mut step_nmse = Vec::new();
            let mut step_max = Vec::new();
            for (i, want) in rows.iter().enumerate() {
                let got = &logits[(prompt.len() - 1 + i) * v..(prompt.len() + i) * v];
                let want = floats(want);
                let e = nmse(got, &want);
                step_nmse.push(e);
                let m = got.iter().zip(&want).map(|(g, w)| (g - w).abs() as f64);
                step_max.push(m.fold(0f64, f64::max));
                worst = worst.max(e);
                assert!(
                    e <= bound(ty),
                    "{what}: step {i}: logits NMSE {e:.2e} > {:.0e}",
                    bound(ty)
                );
            }
            // Every greedy choice, except where the reference's margin is within what our
            // error can move: 6 × the rms logit error measured at that step (steps past the
            // reference's rows: the prompt's worst measured error), itself bounded above, or
            // 2 × the largest logit error measured at that step (a margin between two logits
            // moves by at most that: rms alone missed a 1.24 margin our error closed to 0.001,
            // gguf-q4_1/short step 6, where f32 summation order then picks the winner).
            let prompt_worst = step_nmse.iter().cloned().fold(0f64, f64::max);
            let mut first_tie = greedy.len();
            for (i, &want) in greedy.iter().enumerate() {
                let row = &logits[(prompt.len() - 1 + i) * v..(prompt.len() + i) * v];
                let ms = row.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / v as f64;
                let e = step_nmse.get(i).copied().unwrap_or(prompt_worst);
                let tie_band = (6.0 * (e * ms).sqrt()).max(2.0 * step_max.get(i).unwrap_or(&0.0));
                let margin = p["margins"][i].as_f64().unwrap();
                let got = argmax(row);
                if margin < tie_band {
                    first_tie = first_tie.min(i);
                    if got != want {
                        flips.push(format!("{what} step {i} (margin {margin} < {tie_band:.2})"));
                    }
                } else {
                    assert_eq!(got, want, "{what}: greedy step {i}, margin {margin}");
                }
            }
            // Free-running decode (one token at a time against the cache) gives the same ids
            // up to the first near-tie.
            let mut state = m.new_state(prompt.len() + greedy.len());
            let mut last = m.forward(&mut state, &prompt).unwrap().to_vec();
            for (i, &want) in greedy[..first_tie].iter().enumerate() {
                assert_eq!(argmax(&last), want, "{what}: decode step {i}");
                last = m.forward(&mut state, &[want]).unwrap().to_vec();
            }
        }
        report.push(format!(
            "{name}: worst logits NMSE {worst:.2e}, near-tie flips {flips:?}"
        ));
    }
    eprintln!("{}", report.join("\n"));
}
