//! The model folder's JSON: `config.json` (optional: all-MiniLM-L6-v2's shape when absent),
//! `sentence_bert_config.json` (truncation window) and `1_Pooling/config.json` (must be mean).

use crate::{Error, Result};
use serde_json::Value;
use std::path::Path;

/// The encoder's shape, as transformers' `BertConfig` names it.
#[derive(Clone, Debug, PartialEq)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f32,
}

impl BertConfig {
    /// all-MiniLM-L6-v2: what the contract says applies when `config.json` is absent.
    pub fn minilm() -> BertConfig {
        BertConfig {
            vocab_size: 30522,
            hidden_size: 384,
            num_hidden_layers: 6,
            num_attention_heads: 12,
            intermediate_size: 1536,
            max_position_embeddings: 512,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
        }
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// `<dir>/config.json`, or the MiniLM shape if there is none. Fields a present file leaves
    /// out take transformers' `BertConfig` defaults, as transformers would.
    pub fn from_dir(dir: &Path) -> Result<BertConfig> {
        let path = dir.join("config.json");
        if !path.exists() {
            return Ok(BertConfig::minilm());
        }
        let json = read_json(&path)?;
        let bad = |field: &str, why: &str| {
            Error::runtime(format!("{}: \"{field}\" {why}", path.display()))
        };
        let usize_field = |field: &str, default: usize| -> Result<usize> {
            match json.get(field) {
                None | Some(Value::Null) => Ok(default),
                Some(v) => match v.as_u64() {
                    Some(n) if n > 0 && n <= u32::MAX as u64 => Ok(n as usize),
                    _ => Err(bad(
                        field,
                        &format!("must be a positive integer, found {v}"),
                    )),
                },
            }
        };
        let str_field = |field: &str| json.get(field).and_then(|v| v.as_str());

        if let Some(t) = str_field("model_type") {
            if t != "bert" {
                return Err(bad(
                    "model_type",
                    &format!("is {t:?}; only \"bert\" encoders are supported"),
                ));
            }
        }
        // The model was trained with exact (erf) GELU; tanh approximations or other
        // activations would silently give different vectors.
        match json.get("hidden_act") {
            None => {}
            Some(Value::String(s)) if s == "gelu" => {}
            Some(v) => {
                return Err(bad(
                    "hidden_act",
                    &format!("is {v}; only \"gelu\" (exact, erf form) is supported"),
                ))
            }
        }
        if let Some(p) = str_field("position_embedding_type") {
            if p != "absolute" {
                return Err(bad(
                    "position_embedding_type",
                    &format!("is {p:?}; only \"absolute\" is supported"),
                ));
            }
        }
        let eps = match json.get("layer_norm_eps") {
            None | Some(Value::Null) => 1e-12,
            Some(v) => match v.as_f64() {
                Some(e) if e > 0.0 && e.is_finite() => e as f32,
                _ => return Err(bad("layer_norm_eps", &format!("must be > 0, found {v}"))),
            },
        };
        let cfg = BertConfig {
            vocab_size: usize_field("vocab_size", 30522)?,
            hidden_size: usize_field("hidden_size", 768)?,
            num_hidden_layers: usize_field("num_hidden_layers", 12)?,
            num_attention_heads: usize_field("num_attention_heads", 12)?,
            intermediate_size: usize_field("intermediate_size", 3072)?,
            max_position_embeddings: usize_field("max_position_embeddings", 512)?,
            type_vocab_size: usize_field("type_vocab_size", 2)?,
            layer_norm_eps: eps,
        };
        if !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads) {
            return Err(bad(
                "hidden_size",
                &format!(
                    "({}) is not a multiple of num_attention_heads ({})",
                    cfg.hidden_size, cfg.num_attention_heads
                ),
            ));
        }
        Ok(cfg)
    }
}

/// The sentence-transformers window: `sentence_bert_config.json`'s `max_seq_length` if present,
/// else 256 (all-MiniLM-L6-v2's model card), never more than the position table.
/// Also returns `do_lower_case` (sentence-transformers lowercases the text itself when set).
pub fn seq_window(dir: &Path, cfg: &BertConfig) -> Result<(usize, bool)> {
    const DEFAULT_WINDOW: usize = 256;
    let path = dir.join("sentence_bert_config.json");
    let (mut window, mut lower) = (DEFAULT_WINDOW, false);
    if path.exists() {
        let json = read_json(&path)?;
        if let Some(v) = json.get("max_seq_length") {
            match v.as_u64() {
                Some(n) if n >= 2 => window = n as usize,
                _ => {
                    return Err(Error::runtime(format!(
                        "{}: \"max_seq_length\" must be an integer >= 2 (room for [CLS] and [SEP]), found {v}",
                        path.display()
                    )))
                }
            }
        }
        lower = json
            .get("do_lower_case")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
    }
    Ok((window.min(cfg.max_position_embeddings), lower))
}

/// sentence-transformers' pooling config, when present, must ask for mean pooling only:
/// that is the only pooling implemented, and anything else would give silently wrong vectors.
pub fn check_pooling(dir: &Path) -> Result<()> {
    let path = dir.join("1_Pooling").join("config.json");
    if !path.exists() {
        return Ok(());
    }
    let json = read_json(&path)?;
    let flag = |k: &str| json.get(k).and_then(|v| v.as_bool());
    if let Some(mode) = json.get("pooling_mode").and_then(|v| v.as_str()) {
        if mode != "mean" {
            return Err(Error::runtime(format!(
                "{}: pooling_mode {mode:?} is not supported; only mean pooling is",
                path.display()
            )));
        }
        return Ok(());
    }
    let others = [
        "pooling_mode_cls_token",
        "pooling_mode_max_tokens",
        "pooling_mode_mean_sqrt_len_tokens",
        "pooling_mode_weightedmean_tokens",
        "pooling_mode_lasttoken",
    ];
    if flag("pooling_mode_mean_tokens") == Some(false)
        || others.iter().any(|k| flag(k) == Some(true))
    {
        return Err(Error::runtime(format!(
            "{}: only mean pooling (pooling_mode_mean_tokens alone) is supported",
            path.display()
        )));
    }
    Ok(())
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::runtime(format!("cannot read {}: {e}", path.display())))?;
    serde_json::from_str(&text)
        .map_err(|e| Error::runtime(format!("{} is not valid JSON: {e}", path.display())))
}
