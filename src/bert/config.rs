//! The model folder's JSON: `config.json` (optional: all-MiniLM-L6-v2's shape when absent),
//! `sentence_bert_config.json` (truncation window) and `1_Pooling/config.json` (must be mean).

use crate::config::{read_json_object, Fields};
use crate::{Error, Result};
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
        let o = &read_json_object(&path)?;
        let origin = &path.display().to_string();
        let f = Fields { o, origin };
        let bad = |field: &str, why: &str| {
            Error::runtime(format!("{}: \"{field}\" {why}", path.display()))
        };
        let positive = |field: &str, default: usize| -> Result<usize> {
            match f.usize_opt(field)? {
                None => Ok(default),
                Some(n) if n > 0 && n <= u32::MAX as usize => Ok(n),
                Some(n) => Err(bad(
                    field,
                    &format!("must be a positive integer, found {n}"),
                )),
            }
        };

        if let Some(t) = f.str_opt("model_type")? {
            if t != "bert" {
                return Err(bad(
                    "model_type",
                    &format!("is {t:?}; only \"bert\" encoders are supported"),
                ));
            }
        }
        // The model was trained with exact (erf) GELU; tanh approximations or other
        // activations would silently give different vectors.
        if let Some(act) = f.str_opt("hidden_act")? {
            if act != "gelu" {
                return Err(bad(
                    "hidden_act",
                    &format!("is {act:?}; only \"gelu\" (exact, erf form) is supported"),
                ));
            }
        }
        if let Some(p) = f.str_opt("position_embedding_type")? {
            if p != "absolute" {
                return Err(bad(
                    "position_embedding_type",
                    &format!("is {p:?}; only \"absolute\" is supported"),
                ));
            }
        }
        let eps = match f.f64_opt("layer_norm_eps")? {
            None => 1e-12,
            Some(e) if e > 0.0 && e.is_finite() => e as f32,
            Some(e) => return Err(bad("layer_norm_eps", &format!("must be > 0, found {e}"))),
        };
        let cfg = BertConfig {
            vocab_size: positive("vocab_size", 30522)?,
            hidden_size: positive("hidden_size", 768)?,
            num_hidden_layers: positive("num_hidden_layers", 12)?,
            num_attention_heads: positive("num_attention_heads", 12)?,
            intermediate_size: positive("intermediate_size", 3072)?,
            max_position_embeddings: positive("max_position_embeddings", 512)?,
            type_vocab_size: positive("type_vocab_size", 2)?,
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
        let o = &read_json_object(&path)?;
        let origin = &path.display().to_string();
        let f = Fields { o, origin };
        if let Some(n) = f.usize_opt("max_seq_length")? {
            if n < 2 {
                return Err(Error::runtime(format!(
                    "{origin}: \"max_seq_length\" must be an integer >= 2 (room for [CLS] and [SEP]), found {n}"
                )));
            }
            window = n;
        }
        lower = f.bool_opt("do_lower_case")?.unwrap_or(false);
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
    let o = &read_json_object(&path)?;
    let origin = &path.display().to_string();
    let f = Fields { o, origin };
    if let Some(mode) = f.str_opt("pooling_mode")? {
        if mode != "mean" {
            return Err(Error::runtime(format!(
                "{origin}: pooling_mode {mode:?} is not supported; only mean pooling is"
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
    let mut others_on = false;
    for k in others {
        others_on |= f.bool_opt(k)?.unwrap_or(false);
    }
    if f.bool_opt("pooling_mode_mean_tokens")? == Some(false) || others_on {
        return Err(Error::runtime(format!(
            "{}: only mean pooling (pooling_mode_mean_tokens alone) is supported",
            path.display()
        )));
    }
    Ok(())
}
