//! A Llama model's weights: every tensor the config needs, checked for shape at load and kept as
//! zero-copy handles into the memory-mapped store (dtypes may differ per tensor).

use super::config::LlamaConfig;
use crate::weights::{TensorRef, WeightStore};
use crate::{Error, Result};
use spinfer_kernels::Weights;

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

/// Tensor names: transformers' (safetensors) or llama.cpp's (GGUF).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Naming {
    Hf,
    Gguf,
}

impl Naming {
    fn embed(self) -> &'static str {
        match self {
            Naming::Hf => "model.embed_tokens.weight",
            Naming::Gguf => "token_embd.weight",
        }
    }
    fn norm(self) -> &'static str {
        match self {
            Naming::Hf => "model.norm.weight",
            Naming::Gguf => "output_norm.weight",
        }
    }
    fn lm_head(self) -> &'static str {
        match self {
            Naming::Hf => "lm_head.weight",
            Naming::Gguf => "output.weight",
        }
    }
    /// Layer `l`'s tensor `part`, named in transformers' terms.
    fn layer(self, l: usize, part: &str) -> String {
        match self {
            Naming::Hf => format!("model.layers.{l}.{part}.weight"),
            Naming::Gguf => {
                let g = match part {
                    "self_attn.q_proj" => "attn_q",
                    "self_attn.k_proj" => "attn_k",
                    "self_attn.v_proj" => "attn_v",
                    "self_attn.o_proj" => "attn_output",
                    "mlp.gate_proj" => "ffn_gate",
                    "mlp.up_proj" => "ffn_up",
                    "mlp.down_proj" => "ffn_down",
                    "input_layernorm" => "attn_norm",
                    "post_attention_layernorm" => "ffn_norm",
                    other => other,
                };
                format!("blk.{l}.{g}.weight")
            }
        }
    }
}

impl ModelWeights {
    /// Check every tensor the config needs in an opened store, named as `naming` says.
    pub fn from_store(
        store: WeightStore,
        cfg: &LlamaConfig,
        naming: Naming,
    ) -> Result<ModelWeights> {
        let (h, v, i) = (cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size);
        let (qd, kvd) = (cfg.q_dim(), cfg.kv_dim());
        let mat = |name: &str, shape: [usize; 2]| -> Result<TensorRef> {
            store.get_shaped(name, &shape)?;
            store.tensor_ref(name)
        };
        let embed = mat(naming.embed(), [v, h])?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let n = |part: &str| naming.layer(l, part);
            layers.push(LayerWeights {
                wq: mat(&n("self_attn.q_proj"), [qd, h])?,
                wk: mat(&n("self_attn.k_proj"), [kvd, h])?,
                wv: mat(&n("self_attn.v_proj"), [kvd, h])?,
                wo: mat(&n("self_attn.o_proj"), [h, qd])?,
                w_gate: mat(&n("mlp.gate_proj"), [i, h])?,
                w_up: mat(&n("mlp.up_proj"), [i, h])?,
                w_down: mat(&n("mlp.down_proj"), [h, i])?,
                attn_norm: store.get_f32_vec(&n("input_layernorm"), &[h])?,
                ffn_norm: store.get_f32_vec(&n("post_attention_layernorm"), &[h])?,
            });
        }
        let norm = store.get_f32_vec(naming.norm(), &[h])?;
        // Tied models reuse the embedding (transformers ignores a stored lm_head then, too).
        let lm_head = if cfg.tie_word_embeddings {
            embed
        } else if store.contains(naming.lm_head()) {
            mat(naming.lm_head(), [v, h])?
        } else {
            return Err(Error::runtime(format!(
                "tensor {:?} not found in {} and config.json does not set tie_word_embeddings",
                naming.lm_head(),
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
