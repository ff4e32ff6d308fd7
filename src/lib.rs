//! spinfer: a pure-Rust CPU inference engine implementing Spin's Serverless AI interface
//! (`fermyon:spin/llm`): `infer`, `infer_with_options` and `generate_embeddings` over Llama
//! language models and BERT sentence embedders (all-MiniLM-L6-v2) in Spin's registry layout.

pub mod bench;
pub mod bert;
mod config;
pub mod engine;
mod generate;
pub mod llama;
pub mod sampler;
pub mod tokenizer;
pub mod weights;

pub use engine::{Component, Engine};
pub use spinfer_kernels as kernels;

use std::fmt;

/// Inferencing parameters, as the Spin interface names them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct InferencingParams {
    /// Most tokens to generate; the engine may return fewer (EOS, end of context).
    pub max_tokens: u32,
    /// CTRL-style repeat penalty; 1.0 disables it.
    pub repeat_penalty: f32,
    /// How many of the most recent tokens (prompt + generated) the penalty looks at.
    pub repeat_penalty_last_n_token_count: u32,
    /// Softmax temperature; <= 0 means greedy.
    pub temperature: f32,
    /// Keep only the k most likely tokens; 0 means no limit.
    pub top_k: u32,
    /// Nucleus sampling mass; >= 1 means no cut.
    pub top_p: f32,
}

impl Default for InferencingParams {
    /// Spin's documented defaults.
    fn default() -> Self {
        InferencingParams {
            max_tokens: 100,
            repeat_penalty: 1.1,
            repeat_penalty_last_n_token_count: 64,
            temperature: 0.8,
            top_k: 40,
            top_p: 0.9,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InferencingUsage {
    pub prompt_token_count: u32,
    pub generated_token_count: u32,
}

#[derive(Clone, Debug, PartialEq)]
pub struct InferencingResult {
    /// The continuation only (not the prompt, not the EOS token).
    pub text: String,
    pub usage: InferencingUsage,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EmbeddingsUsage {
    pub prompt_token_count: u32,
}

#[derive(Clone, Debug, PartialEq)]
pub struct EmbeddingsResult {
    pub embeddings: Vec<Vec<f32>>,
    pub usage: EmbeddingsUsage,
}

/// The Spin `error` variant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Error {
    ModelNotSupported,
    RuntimeError(String),
    InvalidInput(String),
}

impl Error {
    /// The variant's name as the WIT spells it.
    pub fn variant(&self) -> &'static str {
        match self {
            Error::ModelNotSupported => "model-not-supported",
            Error::RuntimeError(_) => "runtime-error",
            Error::InvalidInput(_) => "invalid-input",
        }
    }
    pub(crate) fn runtime(msg: impl Into<String>) -> Error {
        Error::RuntimeError(msg.into())
    }
    pub(crate) fn invalid(msg: impl Into<String>) -> Error {
        Error::InvalidInput(msg.into())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::ModelNotSupported => f.write_str("model-not-supported"),
            Error::RuntimeError(m) => write!(f, "runtime-error: {m}"),
            Error::InvalidInput(m) => write!(f, "invalid-input: {m}"),
        }
    }
}

impl std::error::Error for Error {}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The kernels every model and the sampler use: the tier `SPINFER_ISA` names, else the best
/// this CPU has (chosen once per process), or why that tier cannot run here.
pub(crate) fn kernels() -> Result<&'static spinfer_kernels::Kernels> {
    spinfer_kernels::try_kernels().map_err(|e| Error::runtime(format!("kernels unavailable: {e}")))
}
