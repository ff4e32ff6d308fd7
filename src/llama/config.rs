//! `config.json` (+ `generation_config.json`) of a Llama model, in the transformers 4.x form
//! (`rope_theta`, `rope_scaling`, `torch_dtype`) and the 5.x form (`rope_parameters`, `dtype`).

use crate::config::{parse_json_object, Fields};
use crate::weights::gguf::Metadata;
use crate::{Error, Result};
use serde_json::Value;
use std::path::Path;

/// How RoPE frequencies are rescaled for long contexts.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE (`rope_type` "default" or no scaling block).
    None,
    /// Every inverse frequency divided by `factor`.
    Linear { factor: f64 },
    /// Llama 3.1's piecewise scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Equal to `num_attention_heads` for MHA, fewer for GQA, 1 for MQA.
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub max_position_embeddings: usize,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    /// From config.json and generation_config.json (union, in that order, no repeats).
    pub eos_token_ids: Vec<u32>,
    /// `dtype` / `torch_dtype` as written (informational: each tensor's stored dtype is used).
    pub dtype: Option<String>,
    /// RoPE rotates adjacent pairs (x[2i], x[2i+1]) instead of halves (x[i], x[i + d/2]):
    /// llama.cpp's converter permutes the rows of Q and K so that its pairwise RoPE gives
    /// transformers' results; rotating the pairs of those permuted rows gives the same scores.
    pub rope_interleaved: bool,
    /// Per-frequency divisors from a GGUF's `rope_freqs.weight` (llama3-style scaling as
    /// llama.cpp stores it), applied after `rope_scaling`.
    pub rope_freq_factors: Option<Vec<f32>>,
}

impl LlamaConfig {
    /// Read `dir/config.json` and, when present, `dir/generation_config.json`.
    pub fn load(dir: &Path) -> Result<LlamaConfig> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| Error::io(format!("cannot read {}: {e}", path.display())))?;
        let mut cfg = LlamaConfig::from_json_str(&text, &path.display().to_string())?;
        let gen = dir.join("generation_config.json");
        if gen.is_file() {
            let text = std::fs::read_to_string(&gen)
                .map_err(|e| Error::io(format!("cannot read {}: {e}", gen.display())))?;
            cfg.merge_generation_config(&text, &gen.display().to_string())?;
        }
        Ok(cfg)
    }

    /// Parse config.json text; `origin` names the file in errors.
    pub fn from_json_str(text: &str, origin: &str) -> Result<LlamaConfig> {
        let o = &parse_json_object(text, origin)?;
        let f = Fields { o, origin };

        if let Some(mt) = f.str_opt("model_type")? {
            // Other families (Mistral's sliding window, Qwen's biases, ...) compute differently.
            if mt != "llama" {
                return Err(Error::runtime(format!(
                    "{origin}: model_type {mt:?} is not a Llama-architecture model"
                )));
            }
        }
        if let Some(act) = f.str_opt("hidden_act")? {
            if act != "silu" {
                return Err(Error::runtime(format!(
                    "{origin}: hidden_act {act:?} is not supported (Llama uses \"silu\")"
                )));
            }
        }
        for key in ["attention_bias", "mlp_bias"] {
            if f.bool_opt(key)?.unwrap_or(false) {
                return Err(Error::runtime(format!(
                    "{origin}: {key} = true is not supported (Llama projections have no bias)"
                )));
            }
        }

        let hidden_size = f.usize_req("hidden_size")?;
        let num_attention_heads = f.usize_req("num_attention_heads")?;
        let num_key_value_heads = f
            .usize_opt("num_key_value_heads")?
            .unwrap_or(num_attention_heads);
        let head_dim = match f.usize_opt("head_dim")? {
            Some(d) => d,
            None if num_attention_heads > 0 => hidden_size / num_attention_heads,
            None => 0,
        };
        let max_position_embeddings = f.usize_opt("max_position_embeddings")?.unwrap_or(2048);

        // RoPE: 5.x `rope_parameters` holds theta and scaling; 4.x has `rope_theta` + `rope_scaling`.
        let rope_block = match (o.get("rope_parameters"), o.get("rope_scaling")) {
            (Some(Value::Object(m)), _) => Some(m),
            (Some(Value::Null) | None, Some(Value::Object(m))) => Some(m),
            (Some(Value::Null) | None, Some(Value::Null) | None) => None,
            (Some(_), _) => {
                return Err(Error::runtime(format!(
                    "{origin}: rope_parameters must be an object"
                )))
            }
            (_, Some(_)) => {
                return Err(Error::runtime(format!(
                    "{origin}: rope_scaling must be an object or null"
                )))
            }
        };
        let mut rope_theta = f.f64_opt("rope_theta")?;
        let mut rope_scaling = RopeScaling::None;
        if let Some(m) = rope_block {
            let rf = Fields {
                o: m,
                origin: &format!("{origin} (rope parameters)"),
            };
            if let Some(t) = rf.f64_opt("rope_theta")? {
                rope_theta = Some(t);
            }
            let kind = match rf.str_opt("rope_type")? {
                Some(k) => Some(k),
                None => rf.str_opt("type")?,
            };
            rope_scaling = match kind.unwrap_or("default") {
                "default" => RopeScaling::None,
                "linear" => RopeScaling::Linear {
                    factor: rf.f64_req("factor")?,
                },
                "llama3" => RopeScaling::Llama3 {
                    factor: rf.f64_req("factor")?,
                    low_freq_factor: rf.f64_req("low_freq_factor")?,
                    high_freq_factor: rf.f64_req("high_freq_factor")?,
                    original_max_position_embeddings: match rf
                        .usize_opt("original_max_position_embeddings")?
                    {
                        Some(n) => n,
                        None => max_position_embeddings,
                    },
                },
                other => {
                    return Err(Error::runtime(format!(
                        "{origin}: rope type {other:?} is not supported (supported: default, linear, llama3)"
                    )))
                }
            };
        }
        let rope_theta = rope_theta.unwrap_or(10000.0);

        let dtype = match f.str_opt("dtype")? {
            Some(d) => Some(d.to_string()),
            None => f.str_opt("torch_dtype")?.map(|s| s.to_string()),
        };

        let cfg = LlamaConfig {
            vocab_size: f.usize_req("vocab_size")?,
            hidden_size,
            intermediate_size: f.usize_req("intermediate_size")?,
            num_hidden_layers: f.usize_req("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: f.f64_opt("rms_norm_eps")?.unwrap_or(1e-6) as f32,
            max_position_embeddings,
            rope_theta,
            rope_scaling,
            tie_word_embeddings: f.bool_opt("tie_word_embeddings")?.unwrap_or(false),
            bos_token_id: f.ids_opt("bos_token_id")?.and_then(|v| v.first().copied()),
            eos_token_ids: f.ids_opt("eos_token_id")?.unwrap_or_default(),
            dtype,
            rope_interleaved: false,
            rope_freq_factors: None,
        };
        cfg.validate(origin)?;
        Ok(cfg)
    }

    /// The config of a GGUF model from its `llama.*` and `tokenizer.ggml.*` metadata (as
    /// llama.cpp's `llm_load_hparams` reads them). `tied`: the file has no `output` tensor.
    pub fn from_gguf(meta: &Metadata, tied: bool) -> Result<LlamaConfig> {
        let origin = meta.source();
        let arch = meta.require("general.architecture", meta.get_str("general.architecture"))?;
        if arch != "llama" {
            return Err(Error::runtime(format!(
                "{origin}: general.architecture {arch:?} is not supported (only \"llama\")"
            )));
        }
        let u = |key: &str| -> Result<Option<usize>> { Ok(meta.get_u64(key)?.map(|v| v as usize)) };
        let req =
            |key: &str| -> Result<usize> { Ok(meta.require(key, meta.get_u64(key))? as usize) };
        let hidden_size = req("llama.embedding_length")?;
        let num_attention_heads = req("llama.attention.head_count")?;
        let num_key_value_heads =
            u("llama.attention.head_count_kv")?.unwrap_or(num_attention_heads);
        let head_dim = match u("llama.attention.key_length")? {
            Some(d) => d,
            None if num_attention_heads > 0 => hidden_size / num_attention_heads,
            None => 0,
        };
        if let Some(d) = u("llama.attention.value_length")? {
            if d != head_dim {
                return Err(Error::runtime(format!(
                    "{origin}: llama.attention.value_length {d} differs from the key length {head_dim}, which Llama does not do"
                )));
            }
        }
        if let Some(d) = u("llama.rope.dimension_count")? {
            if d != head_dim {
                return Err(Error::runtime(format!(
                    "{origin}: llama.rope.dimension_count {d} is not the head size {head_dim}; partial rotary embeddings are not supported"
                )));
            }
        }
        let vocab_size = match u("llama.vocab_size")? {
            Some(v) => v,
            None => meta
                .get_str_array("tokenizer.ggml.tokens")?
                .map(|t| t.len())
                .ok_or_else(|| {
                    Error::runtime(format!(
                        "{origin}: neither llama.vocab_size nor tokenizer.ggml.tokens is present"
                    ))
                })?,
        };
        let max_position_embeddings = u("llama.context_length")?.unwrap_or(2048);
        let rope_scaling = match meta.get_str("llama.rope.scaling.type")? {
            None | Some("none") => RopeScaling::None,
            Some("linear") => RopeScaling::Linear {
                factor: meta.require("llama.rope.scaling.factor", meta.get_f32("llama.rope.scaling.factor"))? as f64,
            },
            Some(other) => {
                return Err(Error::runtime(format!(
                    "{origin}: llama.rope.scaling.type {other:?} is not supported (supported: none, linear; llama3 scaling comes as rope_freqs.weight)"
                )))
            }
        };
        // llama.cpp stops at any end-of-generation token: EOS, and EOT where the vocab has one.
        let mut eos_token_ids = Vec::new();
        for key in ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"] {
            if let Some(id) = meta.get_u32(key)? {
                if !eos_token_ids.contains(&id) {
                    eos_token_ids.push(id);
                }
            }
        }
        let cfg = LlamaConfig {
            vocab_size,
            hidden_size,
            intermediate_size: req("llama.feed_forward_length")?,
            num_hidden_layers: req("llama.block_count")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: meta
                .get_f32("llama.attention.layer_norm_rms_epsilon")?
                .unwrap_or(1e-5),
            max_position_embeddings,
            rope_theta: meta.get_f32("llama.rope.freq_base")?.unwrap_or(10000.0) as f64,
            rope_scaling,
            tie_word_embeddings: tied,
            bos_token_id: meta.get_u32("tokenizer.ggml.bos_token_id")?,
            eos_token_ids,
            dtype: None,
            rope_interleaved: true,
            rope_freq_factors: None,
        };
        cfg.validate(origin)?;
        Ok(cfg)
    }

    /// Add the EOS ids of generation_config.json (text) to those of config.json.
    pub fn merge_generation_config(&mut self, text: &str, origin: &str) -> Result<()> {
        let o = &parse_json_object(text, origin)?;
        let f = Fields { o, origin };
        for id in f.ids_opt("eos_token_id")?.unwrap_or_default() {
            if !self.eos_token_ids.contains(&id) {
                self.eos_token_ids.push(id);
            }
        }
        if self.bos_token_id.is_none() {
            self.bos_token_id = f.ids_opt("bos_token_id")?.and_then(|v| v.first().copied());
        }
        Ok(())
    }

    fn validate(&self, origin: &str) -> Result<()> {
        let bad = |msg: String| Err(Error::runtime(format!("{origin}: {msg}")));
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v == 0 {
                return bad(format!("{name} must be greater than 0"));
            }
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return bad(format!(
                "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!(
                "head_dim ({}) must be even for RoPE",
                self.head_dim
            ));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0) {
            return bad(format!(
                "rms_norm_eps ({}) must be finite and >= 0",
                self.rms_norm_eps
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return bad(format!(
                "rope_theta ({}) must be finite and > 0",
                self.rope_theta
            ));
        }
        match self.rope_scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => {
                if !(factor.is_finite() && factor > 0.0) {
                    return bad(format!("linear rope factor ({factor}) must be > 0"));
                }
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let ok = factor.is_finite()
                    && factor > 0.0
                    && low_freq_factor.is_finite()
                    && low_freq_factor > 0.0
                    && high_freq_factor.is_finite()
                    && high_freq_factor > low_freq_factor
                    && original_max_position_embeddings > 0;
                if !ok {
                    return bad(format!(
                        "llama3 rope parameters need factor > 0, 0 < low_freq_factor < high_freq_factor and original_max_position_embeddings > 0 (got {factor}, {low_freq_factor}, {high_freq_factor}, {original_max_position_embeddings})"
                    ));
                }
            }
        }
        for id in self.eos_token_ids.iter().chain(self.bos_token_id.iter()) {
            if *id as usize >= self.vocab_size {
                return bad(format!(
                    "special token id {id} is outside the vocabulary (vocab_size {})",
                    self.vocab_size
                ));
            }
        }
        Ok(())
    }

    /// Width of the query projection output: num_attention_heads * head_dim.
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// Width of each of the key and value projections: num_key_value_heads * head_dim.
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// RoPE inverse frequencies (head_dim / 2 of them), computed in f32 step by step as
    /// transformers does (`1 / theta^(2i/d)`, then the linear or llama3 rescaling).
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        let mut inv: Vec<f32> = (0..d / 2)
            .map(|i| {
                let e = (2 * i) as f32 / d as f32;
                let p = (self.rope_theta).powf(e as f64) as f32;
                1.0f32 / p
            })
            .collect();
        if let Some(factors) = &self.rope_freq_factors {
            for (f, d) in inv.iter_mut().zip(factors) {
                *f /= d;
            }
        }
        match self.rope_scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => {
                for f in &mut inv {
                    *f /= factor as f32;
                }
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let old = original_max_position_embeddings as f64;
                let low_wavelen = (old / low_freq_factor) as f32;
                let high_wavelen = (old / high_freq_factor) as f32;
                let span = (high_freq_factor - low_freq_factor) as f32;
                let (factor, lo) = (factor as f32, low_freq_factor as f32);
                for f in &mut inv {
                    let wavelen = (2.0 * std::f64::consts::PI) as f32 / *f;
                    let scaled = if wavelen > low_wavelen {
                        *f / factor
                    } else {
                        *f
                    };
                    let medium = wavelen >= high_wavelen && wavelen <= low_wavelen;
                    *f = if medium {
                        let s = (old as f32 / wavelen - lo) / span;
                        (1.0 - s) * scaled / factor + s * scaled
                    } else {
                        scaled
                    };
                }
            }
        }
        inv
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V4: &str = r#"{
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632,
        "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
        "rms_norm_eps": 1e-05, "max_position_embeddings": 2048, "rope_theta": 10000.0,
        "rope_scaling": null, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
        "bos_token_id": 1, "eos_token_id": 2
    }"#;

    const V5: &str = r#"{
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 32,
        "rms_norm_eps": 1e-06, "max_position_embeddings": 4096, "tie_word_embeddings": true,
        "dtype": "float32", "bos_token_id": 0, "eos_token_id": [1, 7],
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    }"#;

    #[test]
    fn parses_transformers_4_form() {
        let c = LlamaConfig::from_json_str(V4, "config.json").unwrap();
        assert_eq!(c.num_key_value_heads, 4);
        assert_eq!(c.head_dim, 64);
        assert_eq!(c.rope_theta, 10000.0);
        assert_eq!(c.rope_scaling, RopeScaling::None);
        assert_eq!(c.eos_token_ids, vec![2]);
        assert_eq!(c.bos_token_id, Some(1));
        assert_eq!(c.dtype.as_deref(), Some("bfloat16"));
        assert!(!c.tie_word_embeddings);
        assert_eq!(c.rms_norm_eps, 1e-5);
    }

    #[test]
    fn parses_transformers_5_form() {
        let c = LlamaConfig::from_json_str(V5, "config.json").unwrap();
        assert_eq!(c.head_dim, 32);
        assert_eq!(c.num_key_value_heads, 1);
        assert_eq!(c.rope_theta, 500000.0);
        assert_eq!(
            c.rope_scaling,
            RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 64
            }
        );
        assert_eq!(c.eos_token_ids, vec![1, 7]);
        assert!(c.tie_word_embeddings);
        assert_eq!(c.dtype.as_deref(), Some("float32"));
    }

    #[test]
    fn kv_heads_default_to_heads_and_4x_scaling_forms() {
        let text = V4.replace("\"num_key_value_heads\": 4,", "").replace(
            "\"rope_scaling\": null",
            "\"rope_scaling\": {\"type\": \"linear\", \"factor\": 2.0}",
        );
        let c = LlamaConfig::from_json_str(&text, "config.json").unwrap();
        assert_eq!(c.num_key_value_heads, 32);
        assert_eq!(c.rope_scaling, RopeScaling::Linear { factor: 2.0 });
        // Linear scaling divides each default inverse frequency by the factor.
        let mut plain = c.clone();
        plain.rope_scaling = RopeScaling::None;
        for (a, b) in c.rope_inv_freq().iter().zip(plain.rope_inv_freq()) {
            assert_eq!(*a, b / 2.0);
        }
    }

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let c = LlamaConfig::from_json_str(V5, "config.json").unwrap();
        let mut plain = c.clone();
        plain.rope_scaling = RopeScaling::None;
        let (s, p) = (c.rope_inv_freq(), plain.rope_inv_freq());
        // Wavelength below original/high_freq_factor (16): unchanged.
        assert_eq!(s[0], p[0]);
        // The lowest frequency (wavelength far above 64) is divided by the factor.
        let last = s.len() - 1;
        assert_eq!(s[last], p[last] / 8.0);
        // In between the result lies between the two.
        for i in 0..s.len() {
            assert!(s[i] <= p[i] && s[i] >= p[i] / 8.0);
        }
    }

    #[test]
    fn generation_config_eos_is_merged() {
        let mut c = LlamaConfig::from_json_str(V4, "config.json").unwrap();
        c.merge_generation_config(r#"{"eos_token_id": [2, 5]}"#, "generation_config.json")
            .unwrap();
        assert_eq!(c.eos_token_ids, vec![2, 5]);
    }

    fn err_of(text: &str) -> String {
        match LlamaConfig::from_json_str(text, "/m/config.json") {
            Err(e) => e.to_string(),
            Ok(_) => panic!("expected an error"),
        }
    }

    #[test]
    fn errors_name_the_file_and_the_problem() {
        let e = err_of(&V5.replace("\"llama3\"", "\"yarn\""));
        assert!(e.contains("/m/config.json") && e.contains("yarn"), "{e}");
        let e = err_of(&V4.replace("\"num_key_value_heads\": 4", "\"num_key_value_heads\": 5"));
        assert!(
            e.contains("/m/config.json") && e.contains("num_key_value_heads"),
            "{e}"
        );
        let e = err_of(&V4.replace("\"hidden_size\": 2048,", ""));
        assert!(e.contains("missing hidden_size"), "{e}");
        let e = err_of(&V5.replace("\"head_dim\": 32", "\"head_dim\": 33"));
        assert!(e.contains("head_dim"), "{e}");
        let e = err_of(&V4.replace("\"num_hidden_layers\": 22", "\"num_hidden_layers\": 0"));
        assert!(e.contains("num_hidden_layers"), "{e}");
        let e = err_of(&V4.replace("\"vocab_size\": 32000", "\"vocab_size\": \"big\""));
        assert!(e.contains("vocab_size"), "{e}");
        let e = err_of(&V4.replace("\"llama\"", "\"gemma\""));
        assert!(e.contains("\"gemma\""), "{e}");
        let e = err_of("{not json");
        assert!(e.contains("/m/config.json") && e.contains("JSON"), "{e}");
        let e = err_of(&V5.replace("\"factor\": 8.0,", ""));
        assert!(e.contains("factor"), "{e}");
    }
}
