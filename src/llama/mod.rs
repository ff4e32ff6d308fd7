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
//!
//! Also: `config()`, `n_params()`, `bytes_per_decode_step()` (for the bench),
//! `forward_all_logits()` (every position's logits, for tests).
//!
//! Precision: activations, the KV cache and all accumulation are f32; weights are read in their
//! stored dtype. The one exception is the prefill matmul with bf16 weights, which may round
//! activations to bf16 for AVX-512 BF16 dot products or AMX tiles, as the model's
//! `kernels::Policy` allows (default from `SPINFER_BF16_DOT` / `SPINFER_AMX`; `load_with` sets
//! it per model); tests/llama.rs bounds both paths against transformers.

pub mod chat;
pub mod config;
mod forward;
mod kv_cache;
mod model;

pub use chat::ChatMessage;
pub use config::{LlamaConfig, RopeScaling};
pub use forward::{BatchScratch, LlamaState, Segment, MAX_BATCH};
pub use kv_cache::KvCache;

use crate::weights::WeightStore;
use crate::{Error, Result};
use forward::Forward;
use model::{ModelWeights, Naming};
use spinfer_kernels::{Kernels, Policy};
use std::path::Path;
use tokenizers::Tokenizer;

pub struct LlamaModel {
    cfg: LlamaConfig,
    weights: ModelWeights,
    tokenizer: Tokenizer,
    /// The model's Jinja chat template (GGUF metadata, or the files beside safetensors).
    chat_template: Option<String>,
    kernels: &'static Kernels,
    policy: Policy,
    inv_freq: Vec<f32>, // (head_dim/2) RoPE inverse frequencies, scaling applied
}

impl LlamaModel {
    /// Load a model folder: config.json (+ generation_config.json), tokenizer.json and the
    /// weights. Nothing proportional to the weights' size happens here (they are mapped).
    pub fn load(dir: &Path) -> Result<LlamaModel> {
        LlamaModel::load_with(dir, Policy::from_env())
    }

    /// [`LlamaModel::load`] with the given precision policy for its bf16 matmuls instead of the
    /// process default (see `kernels::Policy`).
    pub fn load_with(dir: &Path, policy: Policy) -> Result<LlamaModel> {
        let store = WeightStore::open_dir(dir)?;
        let (cfg, tokenizer, weights, chat_template) = match store.metadata() {
            // GGUF: config, tokenizer and chat template from the metadata.
            Some(meta) => {
                let tied = !store.contains("output.weight");
                let mut cfg = LlamaConfig::from_gguf(meta, tied)?;
                if store.contains("rope_freqs.weight") {
                    let half = cfg.head_dim / 2;
                    cfg.rope_freq_factors = Some(store.get_f32_vec("rope_freqs.weight", &[half])?);
                }
                let tok = crate::tokenizer::gguf::tokenizer_for(&store)?;
                let template = meta.get_str("tokenizer.chat_template")?.map(str::to_string);
                let tokenizer = tok.tokenizer;
                let weights = ModelWeights::from_store(store, &cfg, Naming::Gguf)?;
                (cfg, tokenizer, weights, template)
            }
            None => {
                let cfg = LlamaConfig::load(dir)?;
                let tok_path = dir.join("tokenizer.json");
                let tokenizer = crate::tokenizer::from_file(&tok_path).map_err(|e| {
                    Error::runtime(format!("cannot load {}: {e}", tok_path.display()))
                })?;
                let template = chat::template_beside(dir)?;
                let weights = ModelWeights::from_store(store, &cfg, Naming::Hf)?;
                (cfg, tokenizer, weights, template)
            }
        };
        let kernels = crate::kernels()?;
        let inv_freq = cfg.rope_inv_freq();
        Ok(LlamaModel {
            cfg,
            weights,
            tokenizer,
            chat_template,
            kernels,
            policy,
            inv_freq,
        })
    }

    /// Token ids of `prompt`, with the tokenizer's post-processor applied (Llama: `<s>` first).
    pub fn encode(&self, prompt: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(prompt, true)
            .map_err(|e| Error::invalid(format!("cannot tokenize the prompt: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The prompt for a conversation, through the model's chat template, ending with the
    /// assistant's turn opened. A model without a template is `invalid-input`.
    pub fn chat_prompt(&self, messages: &[ChatMessage]) -> Result<String> {
        let Some(template) = &self.chat_template else {
            return Err(Error::invalid(
                "this model has no chat template (GGUF tokenizer.chat_template, chat_template.jinja or tokenizer_config.json); send a plain prompt instead",
            ));
        };
        let text = |id: Option<u32>| {
            id.and_then(|i| self.tokenizer.id_to_token(i))
                .unwrap_or_default()
        };
        let eos = text(self.cfg.eos_token_ids.first().copied());
        chat::render(template, messages, &text(self.cfg.bos_token_id), &eos)
    }

    /// Whether the model has a chat template.
    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// Text of `ids` decoded all at once (byte-fallback pieces merged; special tokens kept).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, false)
            .map_err(|e| Error::internal(format!("cannot decode token ids: {e}")))
    }

    pub fn eos_ids(&self) -> &[u32] {
        &self.cfg.eos_token_ids
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.cfg.bos_token_id
    }

    /// Most positions a sequence may use (`max_position_embeddings`).
    pub fn context_len(&self) -> usize {
        self.cfg.max_position_embeddings
    }

    pub fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }

    /// How this model's bf16 matmuls may round.
    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// The precision a prompt's matmuls take (see `forward::Run`): AMX for bf16 and
    /// block-format weights where the CPU has it and the policy allows, else as the policy says.
    pub fn prompt_precision(&self) -> spinfer_kernels::Precision {
        self.fwd().prompt_precision()
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// Parameters in the model (a tied embedding counted once).
    pub fn n_params(&self) -> usize {
        self.weights.n_params(&self.cfg)
    }

    /// Weight bytes one decode step reads (for bandwidth ratios in the bench).
    pub fn bytes_per_decode_step(&self) -> usize {
        self.weights.bytes_per_decode_step(&self.cfg)
    }

    /// A KV cache and scratch for `capacity` positions (capped at the context), allocated now.
    pub fn new_state(&self, capacity: usize) -> LlamaState {
        LlamaState::new(&self.cfg, capacity)
    }

    /// Bytes of a KV cache for `capacity` positions.
    pub fn kv_bytes(&self, capacity: usize) -> usize {
        let c = &self.cfg;
        KvCache::bytes_for(
            c.num_hidden_layers,
            c.num_key_value_heads,
            c.head_dim,
            capacity,
        )
    }

    /// A KV cache for `capacity` positions; an allocation failure is an error, not an abort.
    pub fn try_new_kv(&self, capacity: usize) -> Result<KvCache> {
        let c = &self.cfg;
        KvCache::try_new(
            c.num_hidden_layers,
            c.num_key_value_heads,
            c.head_dim,
            capacity,
        )
        .map_err(|e| {
            Error::with_cause(
                crate::Cause::Overloaded,
                format!(
                    "cannot allocate a KV cache of {} bytes: {e}",
                    self.kv_bytes(capacity)
                ),
            )
        })
    }

    /// Scratch for running one sequence at a time on a cache held elsewhere (the batch
    /// scheduler's lone steps), for sequences of up to `max_len` positions.
    pub(crate) fn scratch_state(&self, max_len: usize) -> LlamaState {
        LlamaState::scratch(&self.cfg, max_len)
    }

    /// [`LlamaModel::forward`] of `tokens` at positions `pos..` of `kv`, on `scratch`: exactly
    /// the lone path (so a request running alone in the scheduler computes what it did before).
    pub(crate) fn forward_on<'s>(
        &self,
        scratch: &'s mut LlamaState,
        kv: &mut KvCache,
        pos: usize,
        tokens: &[u32],
        prompt: bool,
    ) -> Result<&'s [f32]> {
        scratch.with_kv(kv, pos, |s| self.run(s, tokens, prompt, None))?;
        Ok(scratch.logits())
    }

    /// One batched step over several sequences (see `Forward::step`); the logits of the
    /// segments that want them are left in `sc.logits`, in order.
    pub fn step(&self, sc: &mut BatchScratch, segs: &mut [Segment<'_>]) {
        self.fwd().step(sc, segs)
    }

    fn fwd(&self) -> Forward<'_> {
        Forward {
            cfg: &self.cfg,
            w: &self.weights,
            k: self.kernels,
            policy: self.policy,
            inv_freq: &self.inv_freq,
        }
    }

    /// Run `tokens` at positions `state.pos()..` (a prompt in batches of up to [`MAX_BATCH`]
    /// tokens, or one token against the cache) and return the last token's logits.
    ///
    /// Two or more tokens are a prompt, one token a decode step: a prompt's matmuls round as
    /// the model's policy allows (AMX for bf16 and block-format weights, bf16 dots for bf16),
    /// a decode step's are exact (block formats: the int8 path).
    pub fn forward<'s>(&self, state: &'s mut LlamaState, tokens: &[u32]) -> Result<&'s [f32]> {
        self.run(state, tokens, tokens.len() > 1, None)?;
        Ok(state.logits())
    }

    /// Like [`LlamaModel::forward`] but returns every token's logits, `(tokens.len(), vocab)`.
    pub fn forward_all_logits(&self, state: &mut LlamaState, tokens: &[u32]) -> Result<Vec<f32>> {
        let mut all = Vec::with_capacity(tokens.len() * self.cfg.vocab_size);
        self.run(state, tokens, tokens.len() > 1, Some(&mut all))?;
        Ok(all)
    }

    /// Checks, then batches of at most the state's batch size; a lone token (decode, or a
    /// prompt's that would not round) runs on a team unless every token's logits are wanted.
    /// `prompt`: the tokens are a prompt's (see `forward::Run`).
    fn run(
        &self,
        state: &mut LlamaState,
        tokens: &[u32],
        prompt: bool,
        mut all: Option<&mut Vec<f32>>,
    ) -> Result<()> {
        let f = self.fwd();
        f.check(state, tokens)?;
        let exact = !prompt || !f.rounds_prompts();
        for chunk in tokens.chunks(state.batch()) {
            match (chunk, all.as_deref_mut()) {
                ([token], None) if exact => f.decode(state, *token)?,
                (_, all) => f.chunk(state, chunk, prompt, all),
            }
        }
        Ok(())
    }
}
