//! spinfer: a pure-Rust CPU inference engine implementing Spin's Serverless AI interface
//! (`fermyon:spin/llm`): `infer`, `infer_with_options` and `generate_embeddings` over Llama
//! language models and BERT sentence embedders (all-MiniLM-L6-v2) in Spin's registry layout.

mod batch;
mod bench;
mod bench_concurrency;
mod bert;
mod config;
mod engine;
mod generate;
mod llama;
mod sampler;
mod tokenizer;
mod weights;

pub use batch::{EngineOptions, EngineStats};
pub use engine::{check_model_name, Component, Engine};
pub use llama::ChatMessage;
pub use std::ops::ControlFlow;

/// The layers under [`Engine`], for the CLI, tests, benches and tools built on the engine:
/// models, tokenizer and weight loading, the sampler, the bench and the kernels. No stability
/// promise: hosts use the crate root.
pub mod internals {
    pub use spinfer_kernels as kernels;
    pub mod llama {
        pub use crate::llama::*;
    }
    pub mod bert {
        pub use crate::bert::*;
    }
    pub mod tokenizer {
        pub use crate::tokenizer::*;
    }
    pub mod weights {
        pub use crate::weights::*;
    }
    pub mod sampler {
        pub use crate::sampler::*;
    }
    pub mod bench {
        pub use crate::bench::*;
    }
    /// `spinfer bench --concurrency`: streams at once through the batch scheduler.
    pub mod bench_concurrency {
        pub use crate::bench_concurrency::*;
    }
}

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

/// A generation request beyond Spin's interface: what library hosts and the OpenAI API add.
/// `GenerateOptions::default()` is Spin's defaults with a fresh seed.
#[derive(Clone, Debug, Default)]
pub struct GenerateOptions {
    pub params: InferencingParams,
    /// Fixes the sampler's RNG for reproducible output; `None` draws a fresh seed.
    pub seed: Option<u64>,
    /// OpenAI's additive penalties, in [-2, 2]: each token's logit loses
    /// `frequency_penalty × count + presence_penalty` for a token seen `count` > 0 times in the
    /// repeat-penalty window (the last `repeat_penalty_last_n_token_count` tokens of prompt +
    /// generated, as llama.cpp's penalties use it). Applied after the repeat penalty.
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
    /// Set it (from any thread) to stop the request at its next step, whether it is still
    /// waiting, prefilling or decoding; the result so far comes back with
    /// [`FinishReason::Cancelled`].
    pub cancel: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

/// Why a generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// The model produced an end-of-sequence token.
    Eos,
    /// `max_tokens` were generated, or prompt + generated filled the context.
    Length,
    /// The caller stopped it: the text callback returned `Break`, or `cancel` was set.
    Cancelled,
}

/// The result of [`Engine::generate`].
#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    /// The continuation so far (not the prompt, not the EOS token).
    pub text: String,
    pub usage: InferencingUsage,
    pub finish: FinishReason,
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
    /// Spin's `model-not-supported`, which carries no text over the WIT; the reason (which
    /// tensor has which unsupported type, why a folder is no embedding model) is for logs,
    /// the CLI and the server's error body.
    ModelNotSupported(String),
    RuntimeError(RuntimeError),
    InvalidInput(String),
}

/// A `runtime-error`: Spin sees only the message; the cause is for callers that act on it
/// (a server picks its HTTP status from it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuntimeError {
    pub cause: Cause,
    pub message: String,
}

/// What went wrong behind a `runtime-error`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Cause {
    /// A model file could not be opened, read or mapped.
    Io,
    /// The model's files are there but unusable: invalid JSON or metadata, a missing or
    /// misshapen tensor, a tokenizer that does not load.
    Model,
    /// Not enough room now (queue or memory budget full); the same request may succeed later.
    Overloaded,
    /// The request could never fit the engine's limits (e.g. its KV cache alone is bigger than
    /// the whole KV budget): retrying will not help, asking for fewer tokens may.
    TooLarge,
    /// Anything else: the engine itself failed (no usable kernels, a failed job).
    Internal,
}

impl Error {
    /// The variant's name as the WIT spells it.
    pub fn variant(&self) -> &'static str {
        match self {
            Error::ModelNotSupported(_) => "model-not-supported",
            Error::RuntimeError(_) => "runtime-error",
            Error::InvalidInput(_) => "invalid-input",
        }
    }

    /// The cause of a `runtime-error`.
    pub fn cause(&self) -> Option<Cause> {
        match self {
            Error::RuntimeError(r) => Some(r.cause),
            _ => None,
        }
    }

    /// The message of a `runtime-error` or `invalid-input` (none for `model-not-supported`,
    /// whose WIT variant has no text; see [`Error::reason`]).
    pub fn message(&self) -> Option<&str> {
        match self {
            Error::ModelNotSupported(_) => None,
            Error::RuntimeError(r) => Some(&r.message),
            Error::InvalidInput(m) => Some(m),
        }
    }

    /// What went wrong, in words, for every variant (a `model-not-supported`'s reason too).
    pub fn reason(&self) -> &str {
        match self {
            Error::ModelNotSupported(r) => r,
            Error::RuntimeError(r) => &r.message,
            Error::InvalidInput(m) => m,
        }
    }

    pub(crate) fn not_supported(reason: impl Into<String>) -> Error {
        Error::ModelNotSupported(reason.into())
    }
    pub(crate) fn with_cause(cause: Cause, msg: impl Into<String>) -> Error {
        Error::RuntimeError(RuntimeError {
            cause,
            message: msg.into(),
        })
    }
    /// A model's files are unusable ([`Cause::Model`]).
    pub(crate) fn runtime(msg: impl Into<String>) -> Error {
        Error::with_cause(Cause::Model, msg)
    }
    /// A model file could not be read ([`Cause::Io`]).
    pub(crate) fn io(msg: impl Into<String>) -> Error {
        Error::with_cause(Cause::Io, msg)
    }
    /// The engine failed ([`Cause::Internal`]).
    pub(crate) fn internal(msg: impl Into<String>) -> Error {
        Error::with_cause(Cause::Internal, msg)
    }
    pub(crate) fn invalid(msg: impl Into<String>) -> Error {
        Error::InvalidInput(msg.into())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::ModelNotSupported(r) => write!(f, "model-not-supported: {r}"),
            Error::RuntimeError(r) => write!(f, "runtime-error: {}", r.message),
            Error::InvalidInput(m) => write!(f, "invalid-input: {m}"),
        }
    }
}

impl std::error::Error for Error {}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The kernels every model and the sampler use: the tier `SPINFER_ISA` names, else the best
/// this CPU has (chosen once per process), or why that tier cannot run here.
pub(crate) fn kernels() -> Result<&'static spinfer_kernels::Kernels> {
    spinfer_kernels::try_kernels().map_err(|e| Error::internal(format!("kernels unavailable: {e}")))
}
