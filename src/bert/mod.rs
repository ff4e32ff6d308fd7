//! BERT-family sentence embedders (all-MiniLM-L6-v2): config, weights, masked forward, mean
//! pooling, L2 normalisation.
//!
//! Interface the engine relies on (keep these names):
//! - `BertModel::load(dir) -> Result<BertModel>`: tokenizer.json + model.safetensors
//!   (+ optional config.json, sentence_bert_config.json).
//! - `model.embed(texts) -> Result<(Vec<Vec<f32>>, u32)>`: one L2-normalised vector per text and
//!   the total prompt token count.
//!
//! What it computes is what sentence-transformers computes for this model family: tokens
//! truncated to the window (256 by default, `sentence_bert_config.json` `max_seq_length` wins,
//! never past the position table) with [CLS]/[SEP] as the tokenizer's post-processor adds them,
//! the BERT encoder with each sentence attending only to its own tokens, mean over the
//! sentence's tokens, L2 normalisation. No padding exists: sentences are packed end to end, so
//! no compute goes to padding and a vector never depends on its batch.

pub mod config;
mod forward;

pub use config::BertConfig;

use crate::weights::{TensorRef, WeightStore};
use crate::{Error, Result};
use spinfer_kernels::{Kernels, PackedWeights, Weights};
use std::borrow::Cow;
use std::path::Path;
use std::sync::Mutex;
use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

/// Most tokens one forward pass packs; bigger requests run in several passes (results do not
/// depend on the split) so scratch memory stays bounded (~40 MB for MiniLM).
const MAX_PASS_TOKENS: usize = 2048;

/// A loaded embedder: the tokenizer, the memory-mapped weights and handles to the matrices in
/// them (resolved and shape-checked at load; the store owns the mapping, so views are made per
/// call). Small vectors (biases, LayerNorm parameters) are widened to f32 at load.
pub struct BertModel {
    cfg: BertConfig,
    /// Tokens per input at most, [CLS] and [SEP] included.
    window: usize,
    /// sentence-transformers' `do_lower_case`: lowercase the text before tokenizing.
    lowercase: bool,
    tokenizer: Tokenizer,
    kern: &'static Kernels,
    store: WeightStore,
    word_emb: TensorRef, // (vocab_size, hidden)
    pos_emb: TensorRef,  // (max_position_embeddings, hidden)
    type0: Vec<f32>,     // (hidden): token type 0's embedding row
    emb_ln_w: Vec<f32>,  // (hidden)
    emb_ln_b: Vec<f32>,  // (hidden)
    layers: Vec<Layer>,
    /// Activation buffers kept between calls: fresh ones would be page-faulted in every call.
    scratch: Mutex<Option<forward::Scratch>>,
}

/// One encoder layer. Matrices are widened to f32 and repacked for `matmul_packed` at load
/// (~42 MB for MiniLM): repacking per call would cost as much as a batch-1 product itself.
struct Layer {
    wqkv: PackedWeights,   // (3 hidden, hidden): query, key, value rows, one product
    wo: PackedWeights,     // (hidden, hidden)
    w_up: PackedWeights,   // (intermediate, hidden)
    w_down: PackedWeights, // (hidden, intermediate)
    bqkv: Vec<f32>,        // (3 hidden)
    bo: Vec<f32>,          // (hidden)
    b_up: Vec<f32>,        // (intermediate)
    b_down: Vec<f32>,      // (hidden)
    ln1_w: Vec<f32>,       // (hidden) after attention
    ln1_b: Vec<f32>,       // (hidden)
    ln2_w: Vec<f32>,       // (hidden) after the feed-forward
    ln2_b: Vec<f32>,       // (hidden)
}

impl BertModel {
    /// Load `<dir>/{tokenizer.json, model.safetensors}` (+ optional `config.json`,
    /// `sentence_bert_config.json`, `1_Pooling/config.json`). Weights are mapped, not copied.
    pub fn load(dir: &Path) -> Result<BertModel> {
        let cfg = BertConfig::from_dir(dir)?;
        let (window, lowercase) = config::seq_window(dir, &cfg)?;
        config::check_pooling(dir)?;
        let tokenizer = load_tokenizer(&dir.join("tokenizer.json"), window, cfg.vocab_size)?;
        let store = WeightStore::open_dir(dir)?;

        let kern = crate::kernels()?;
        let (h, inter) = (cfg.hidden_size, cfg.intermediate_size);
        let n = Names::detect(&store);
        let mat = |name: String, shape: [usize; 2]| -> Result<TensorRef> {
            store.get_shaped(&name, &shape)?;
            store.tensor_ref(&name)
        };
        let packed = |name: String, shape: [usize; 2]| -> Result<PackedWeights> {
            let t = store.get_shaped(&name, &shape)?;
            Ok(kern.pack_weights(t.data, shape[0], shape[1]))
        };
        let vec = |name: String, len: usize| store.get_f32_vec(&name, &[len]);
        let ln = |base: &str| -> Result<(Vec<f32>, Vec<f32>)> {
            let (w, b) = n.layernorm(&store, base);
            Ok((vec(w, h)?, vec(b, h)?))
        };

        let word_emb = mat(
            n.name("embeddings.word_embeddings.weight"),
            [cfg.vocab_size, h],
        )?;
        let pos_emb = mat(
            n.name("embeddings.position_embeddings.weight"),
            [cfg.max_position_embeddings, h],
        )?;
        let types = store.get_f32_vec(
            &n.name("embeddings.token_type_embeddings.weight"),
            &[cfg.type_vocab_size, h],
        )?;
        let type0 = types[..h].to_vec();
        let (emb_ln_w, emb_ln_b) = ln("embeddings.LayerNorm")?;

        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("encoder.layer.{i}.");
            let (ln1_w, ln1_b) = ln(&format!("{p}attention.output.LayerNorm"))?;
            let (ln2_w, ln2_b) = ln(&format!("{p}output.LayerNorm"))?;
            // Q, K and V stacked into one (3h, h) matrix: one product, one pass over X.
            let mut qkv = Vec::with_capacity(3 * h * h);
            let mut bqkv = Vec::with_capacity(3 * h);
            for part in ["query", "key", "value"] {
                let name = n.name(&format!("{p}attention.self.{part}.weight"));
                qkv.extend(store.get_f32_vec(&name, &[h, h])?);
                bqkv.extend(vec(n.name(&format!("{p}attention.self.{part}.bias")), h)?);
            }
            layers.push(Layer {
                wqkv: kern.pack_weights(Weights::F32(&qkv), 3 * h, h),
                wo: packed(n.name(&format!("{p}attention.output.dense.weight")), [h, h])?,
                w_up: packed(n.name(&format!("{p}intermediate.dense.weight")), [inter, h])?,
                w_down: packed(n.name(&format!("{p}output.dense.weight")), [h, inter])?,
                bqkv,
                bo: vec(n.name(&format!("{p}attention.output.dense.bias")), h)?,
                b_up: vec(n.name(&format!("{p}intermediate.dense.bias")), inter)?,
                b_down: vec(n.name(&format!("{p}output.dense.bias")), h)?,
                ln1_w,
                ln1_b,
                ln2_w,
                ln2_b,
            });
        }
        // Pooler weights (if any) are ignored: sentence-transformers mean-pools instead.
        Ok(BertModel {
            cfg,
            window,
            lowercase,
            tokenizer,
            kern,
            store,
            word_emb,
            pos_emb,
            type0,
            emb_ln_w,
            emb_ln_b,
            layers,
            scratch: Mutex::new(None),
        })
    }

    pub fn config(&self) -> &BertConfig {
        &self.cfg
    }

    /// Embedding width.
    pub fn dim(&self) -> usize {
        self.cfg.hidden_size
    }

    /// Most tokens of one input the model sees ([CLS] and [SEP] included).
    pub fn max_tokens(&self) -> usize {
        self.window
    }

    /// The token ids the model sees for `text`: truncated to the window, [CLS]/[SEP] added.
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        let text: Cow<str> = if self.lowercase {
            Cow::Owned(text.to_lowercase())
        } else {
            Cow::Borrowed(text)
        };
        let enc = self
            .tokenizer
            .encode(text.as_ref(), true)
            .map_err(|e| Error::runtime(format!("tokenizer failed: {e}")))?;
        let ids = enc.get_ids();
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.cfg.vocab_size) {
            return Err(Error::runtime(format!(
                "tokenizer produced id {bad}, outside the model's vocabulary of {}",
                self.cfg.vocab_size
            )));
        }
        Ok(ids.to_vec())
    }

    /// One L2-normalised vector per text, and the prompt token count.
    ///
    /// The count is the sum over inputs of the tokens the model actually saw: after truncation
    /// to the window, [CLS] and [SEP] included (so "" counts 2). That is what was computed on,
    /// and what OpenAI-style `usage.prompt_tokens` reports for the same request.
    pub fn embed(&self, texts: &[&str]) -> Result<(Vec<Vec<f32>>, u32)> {
        if texts.is_empty() {
            return Ok((Vec::new(), 0));
        }
        let (seqs, count) = self.tokenize_all(texts)?;
        Ok((self.embed_ids(&seqs)?, count))
    }

    /// Every text's token ids (as the model sees them) and their total count.
    pub fn tokenize_all(&self, texts: &[&str]) -> Result<(Vec<Vec<u32>>, u32)> {
        let mut seqs = Vec::with_capacity(texts.len());
        let mut count: u64 = 0;
        for (i, text) in texts.iter().enumerate() {
            let ids = self
                .tokenize(text)
                .map_err(|e| Error::runtime(format!("input {i}: {e}")))?;
            count += ids.len() as u64;
            seqs.push(ids);
        }
        let count = u32::try_from(count).map_err(|_| {
            Error::invalid(format!(
                "{count} tokens in one request: more than a u32 usage count can hold"
            ))
        })?;
        Ok((seqs, count))
    }

    /// One L2-normalised vector per token sequence (from [`BertModel::tokenize_all`]), in
    /// passes of up to a token budget. Each sequence attends to itself alone, so its vector
    /// does not depend on the others in its pass (concurrent callers' texts share passes).
    pub fn embed_ids(&self, seqs: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        if seqs.is_empty() {
            return Ok(Vec::new());
        }
        // Passes of at most MAX_PASS_TOKENS tokens (one input is at most `window` <= 512).
        let pass_tokens = seqs
            .iter()
            .map(|s| s.len())
            .sum::<usize>()
            .min(MAX_PASS_TOKENS.max(self.window));
        // The kept scratch if it is free and big enough; concurrent callers get their own.
        let mut kept = self.scratch.try_lock().ok();
        let mut fresh = None;
        let scratch = match kept.as_deref_mut() {
            Some(Some(s)) if s.cap() >= pass_tokens => s,
            Some(slot) => slot.insert(forward::Scratch::new(&self.cfg, pass_tokens)),
            None => fresh.insert(forward::Scratch::new(&self.cfg, pass_tokens)),
        };
        let mut out = Vec::with_capacity(seqs.len());
        let mut start = 0;
        while start < seqs.len() {
            let mut end = start;
            let mut tokens = 0;
            while end < seqs.len() && tokens + seqs[end].len() <= pass_tokens {
                tokens += seqs[end].len();
                end += 1;
            }
            out.extend(forward::forward(self, &seqs[start..end], scratch)?);
            start = end;
        }
        Ok(out)
    }
}

/// Where a checkpoint puts its tensors: with or without the `bert.` prefix; LayerNorm as
/// `weight`/`bias` or the older `gamma`/`beta`.
struct Names {
    prefix: &'static str,
}

impl Names {
    fn detect(store: &WeightStore) -> Names {
        let prefixed = store.contains("bert.embeddings.word_embeddings.weight")
            && !store.contains("embeddings.word_embeddings.weight");
        Names {
            prefix: if prefixed { "bert." } else { "" },
        }
    }

    fn name(&self, s: &str) -> String {
        format!("{}{s}", self.prefix)
    }

    /// (weight, bias) names of a LayerNorm; `weight`/`bias` unless only `gamma` is there.
    fn layernorm(&self, store: &WeightStore, base: &str) -> (String, String) {
        let w = self.name(&format!("{base}.weight"));
        let g = self.name(&format!("{base}.gamma"));
        if !store.contains(&w) && store.contains(&g) {
            (g, self.name(&format!("{base}.beta")))
        } else {
            (w, self.name(&format!("{base}.bias")))
        }
    }
}

/// The tokenizer with its file's own truncation/padding replaced by ours: no padding (we never
/// pad), truncation to `window` tokens including the special ones.
fn load_tokenizer(path: &Path, window: usize, vocab_size: usize) -> Result<Tokenizer> {
    if !path.is_file() {
        return Err(Error::runtime(format!(
            "tokenizer file {} not found",
            path.display()
        )));
    }
    let mut tok = crate::tokenizer::from_file(path)
        .map_err(|e| Error::runtime(format!("cannot load tokenizer {}: {e}", path.display())))?;
    tok.with_padding(None);
    tok.with_truncation(Some(TruncationParams {
        direction: TruncationDirection::Right,
        max_length: window,
        strategy: TruncationStrategy::LongestFirst,
        stride: 0,
    }))
    .map_err(|e| {
        Error::runtime(format!(
            "{}: cannot truncate to {window}: {e}",
            path.display()
        ))
    })?;
    let n = tok.get_vocab_size(true);
    if n > vocab_size {
        return Err(Error::runtime(format!(
            "{} has {n} tokens but the model's vocabulary has only {vocab_size}",
            path.display()
        )));
    }
    Ok(tok)
}
