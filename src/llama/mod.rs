//! Llama-architecture language models: config, weights, forward pass (prefill + decode), KV cache.
//!
//! Interface the engine relies on (keep these names):
//! - `LlamaModel::load(dir) -> Result<LlamaModel>` reads config.json (+ generation_config.json),
//!   tokenizer.json and the safetensors weights (mmap, zero copy).
//! - `model.encode(prompt) -> Result<Vec<u32>>` (post-processor applied: `<s>` prepended),
//!   `model.decode(ids) -> Result<String>`, `model.eos_ids()`, `model.context_len()`,
//!   `model.vocab_size()`.
//! - `model.new_state(capacity) -> LlamaState`: KV cache + scratch for `capacity` positions,
//!   allocated once per request.
//! - `model.forward(&mut state, tokens) -> Result<&[f32]>`: runs `tokens` at positions
//!   `state.pos()..` (several tokens = one batched prefill), returns the last token's logits.

use crate::{Error, Result};
use std::path::Path;

pub struct LlamaModel {}

pub struct LlamaState {
    pos: usize,
    logits: Vec<f32>,
}

impl LlamaState {
    /// Positions already in the KV cache.
    pub fn pos(&self) -> usize {
        self.pos
    }
}

impl LlamaModel {
    pub fn load(dir: &Path) -> Result<LlamaModel> {
        Err(Error::runtime(format!(
            "llama loading not implemented yet ({})",
            dir.display()
        )))
    }
    pub fn encode(&self, _prompt: &str) -> Result<Vec<u32>> {
        Err(Error::runtime("not implemented"))
    }
    pub fn decode(&self, _ids: &[u32]) -> Result<String> {
        Err(Error::runtime("not implemented"))
    }
    pub fn eos_ids(&self) -> &[u32] {
        &[]
    }
    pub fn context_len(&self) -> usize {
        0
    }
    pub fn vocab_size(&self) -> usize {
        0
    }
    pub fn new_state(&self, _capacity: usize) -> LlamaState {
        LlamaState {
            pos: 0,
            logits: Vec::new(),
        }
    }
    pub fn forward<'s>(&self, state: &'s mut LlamaState, _tokens: &[u32]) -> Result<&'s [f32]> {
        Ok(&state.logits)
    }
}
