//! A Llama model's weights: every tensor the config needs, checked for shape at load and kept as
//! zero-copy handles into the memory-mapped store (dtypes may differ per tensor).

use super::config::LlamaConfig;
use crate::weights::{TensorRef, WeightStore};
use crate::{Error, Result};
use spinfer_kernels::Weights;
use std::path::Path;

/// One decoder layer. Matrices are row-major `(out, in)` as stored.
pub(crate) struct LayerWeights {
    pub wq: TensorRef,       // (n_heads*head_dim, hidden)
    pub wk: TensorRef,       // (kv_heads*head_dim, hidden)
    pub wv: TensorRef,       // (kv_heads*head_dim, hidden)
    pub wo: TensorRef,       // (hidden, n_heads*head_dim)
    pub w_gate: TensorRef,   // (intermediate, hidden)
    pub w_up: TensorRef,     // (intermediate, hidden)
    pub w_down: TensorRef,   // (hidden, intermediate)
    pub attn_norm: Vec<f32>, // (hidden) input_layernorm, widened to f32
    pub ffn_norm: Vec<f32>,  // (hidden) post_attention_layernorm, widened to f32
}

pub(crate) struct ModelWeights {
    pub store: WeightStore,
    pub embed: TensorRef, // (vocab, hidden)
    pub layers: Vec<LayerWeights>,
    pub norm: Vec<f32>,     // (hidden) final norm, widened to f32
    pub lm_head: TensorRef, // (vocab, hidden); the embedding matrix when tied
}

impl ModelWeights {
    /// Open the model folder's safetensors and check every tensor the config needs.
    pub fn load(dir: &Path, cfg: &LlamaConfig) -> Result<ModelWeights> {
        let store = WeightStore::open_dir(dir)?;
        let (h, v, i) = (cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size);
        let (qd, kvd) = (cfg.q_dim(), cfg.kv_dim());
        let mat = |name: &str, shape: [usize; 2]| -> Result<TensorRef> {
            store.get_shaped(name, &shape)?;
            store.tensor_ref(name)
        };
        let embed = mat("model.embed_tokens.weight", [v, h])?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}");
            layers.push(LayerWeights {
                wq: mat(&format!("{p}.self_attn.q_proj.weight"), [qd, h])?,
                wk: mat(&format!("{p}.self_attn.k_proj.weight"), [kvd, h])?,
                wv: mat(&format!("{p}.self_attn.v_proj.weight"), [kvd, h])?,
                wo: mat(&format!("{p}.self_attn.o_proj.weight"), [h, qd])?,
                w_gate: mat(&format!("{p}.mlp.gate_proj.weight"), [i, h])?,
                w_up: mat(&format!("{p}.mlp.up_proj.weight"), [i, h])?,
                w_down: mat(&format!("{p}.mlp.down_proj.weight"), [h, i])?,
                attn_norm: store.get_f32_vec(&format!("{p}.input_layernorm.weight"), &[h])?,
                ffn_norm: store
                    .get_f32_vec(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
            });
        }
        let norm = store.get_f32_vec("model.norm.weight", &[h])?;
        // Tied models reuse the embedding (transformers ignores a stored lm_head then, too).
        let lm_head = if cfg.tie_word_embeddings {
            embed
        } else if store.contains("lm_head.weight") {
            mat("lm_head.weight", [v, h])?
        } else {
            return Err(Error::runtime(format!(
                "tensor \"lm_head.weight\" not found in {} and config.json does not set tie_word_embeddings",
                store.describe()
            )));
        };
        Ok(ModelWeights {
            store,
            embed,
            layers,
            norm,
            lm_head,
        })
    }

    #[inline]
    pub fn w(&self, r: TensorRef) -> Weights<'_> {
        self.store.data(r)
    }

    /// Parameters in the model (embedding and lm_head counted once when tied).
    pub fn n_params(&self, cfg: &LlamaConfig) -> usize {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let per_layer = 2 * h * cfg.q_dim() + 2 * h * cfg.kv_dim() + 3 * h * i + 2 * h;
        let head = if cfg.tie_word_embeddings {
            0
        } else {
            cfg.vocab_size * h
        };
        cfg.vocab_size * h + cfg.num_hidden_layers * per_layer + h + head
    }

    /// Weight bytes one decode step reads: every layer matrix, the lm_head and one embedding row.
    pub fn bytes_per_decode_step(&self, cfg: &LlamaConfig) -> usize {
        let size = |r: TensorRef| self.w(r).bytes();
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                [l.wq, l.wk, l.wv, l.wo, l.w_gate, l.w_up, l.w_down]
                    .into_iter()
                    .map(size)
                    .sum::<usize>()
                    + 2 * 4 * cfg.hidden_size
            })
            .sum();
        let embed_row = self.w(self.embed).row(0, cfg.hidden_size).bytes();
        layers + size(self.lm_head) + embed_row + 4 * cfg.hidden_size
    }
}
