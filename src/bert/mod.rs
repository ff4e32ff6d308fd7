//! BERT-family sentence embedders (all-MiniLM-L6-v2): config, weights, masked forward, mean
//! pooling, L2 normalisation.
//!
//! Interface the engine relies on (keep these names):
//! - `BertModel::load(dir) -> Result<BertModel>`: tokenizer.json + model.safetensors
//!   (+ optional config.json, sentence_bert_config.json).
//! - `model.embed(texts) -> Result<(Vec<Vec<f32>>, u32)>`: one L2-normalised vector per text and
//!   the total prompt token count.

use crate::{Error, Result};
use std::path::Path;

pub struct BertModel {}

impl BertModel {
    pub fn load(dir: &Path) -> Result<BertModel> {
        Err(Error::runtime(format!(
            "bert loading not implemented yet ({})",
            dir.display()
        )))
    }
    pub fn embed(&self, _texts: &[&str]) -> Result<(Vec<Vec<f32>>, u32)> {
        Err(Error::runtime("not implemented"))
    }
}
