//! Answers a Spin component's `fermyon:spin/llm` imports (the unversioned v1 and `@2.0.0`, the
//! same interface) with spinfer, for a host that runs components with wasmtime.
//!
//! ```ignore
//! struct State { llm: spinfer_wasmtime::SpinLlm, /* wasi, wasi-http ... */ }
//! spinfer_wasmtime::add_to_linker(&mut linker, |s: &mut State| &mut s.llm)?;
//! // per component instance:
//! let llm = SpinLlm::new(engine.clone(), ["llama2-chat", "all-minilm-l6-v2"]);
//! ```
//!
//! - Access control: only the models in the component's `ai_models` may be called (Spin's
//!   exact `invalid-input` sentence otherwise), checked by [`spinfer::Component`].
//! - A missing `params` means Spin's defaults ([`InferencingParams::default`]).
//! - Inference runs on tokio's blocking pool, not on the async executor's threads.
//! - A result larger than [`SpinLlm::max_result_bytes`] is a `runtime-error`, as Spin's
//!   `max_result_bytes` (128 MiB there, and here by default).

pub mod host;

use spinfer::{EmbeddingsResult, Engine, Error, InferencingParams, InferencingResult};
use std::collections::HashSet;
use std::sync::Arc;
use wasmtime::component::{HasData, Linker};

mod bindings {
    wasmtime::component::bindgen!({
        path: "wit",
        world: "spinfer:host/llm-host",
        imports: { default: async },
    });
}

use bindings::fermyon::spin::llm as v1;
use bindings::fermyon::spin2_0_0::llm as v2;

/// Spin's limit on an LLM result (`max_result_bytes` in Spin's LLM factor).
pub const DEFAULT_MAX_RESULT_BYTES: usize = 128 * 1024 * 1024;

/// The per-instance state a host keeps in its `Store`: the shared engine, this component's
/// `ai_models` and the result limit.
#[derive(Clone)]
pub struct SpinLlm {
    engine: Arc<Engine>,
    ai_models: Arc<HashSet<String>>,
    max_result_bytes: usize,
}

impl SpinLlm {
    /// A component allowed to call the models in `ai_models` (exact, case-sensitive names).
    pub fn new<I, S>(engine: Arc<Engine>, ai_models: I) -> SpinLlm
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        SpinLlm {
            engine,
            ai_models: Arc::new(ai_models.into_iter().map(Into::into).collect()),
            max_result_bytes: DEFAULT_MAX_RESULT_BYTES,
        }
    }

    /// Sets the largest result (text bytes, or 4 bytes per embedding value) a call may return.
    pub fn with_max_result_bytes(mut self, bytes: usize) -> SpinLlm {
        self.max_result_bytes = bytes;
        self
    }

    pub fn max_result_bytes(&self) -> usize {
        self.max_result_bytes
    }

    /// `infer` as the guest sees it, off the async threads.
    pub async fn infer(
        &self,
        model: String,
        prompt: String,
        params: Option<InferencingParams>,
    ) -> Result<InferencingResult, Error> {
        let params = params.unwrap_or_default();
        let result = self
            .blocking(move |engine, allowed| {
                engine
                    .component(allowed.iter().cloned())
                    .infer_with_options(&model, &prompt, params)
            })
            .await?;
        self.limit(result.text.len())?;
        Ok(result)
    }

    /// `generate-embeddings` as the guest sees it, off the async threads.
    pub async fn generate_embeddings(
        &self,
        model: String,
        texts: Vec<String>,
    ) -> Result<EmbeddingsResult, Error> {
        let result = self
            .blocking(move |engine, allowed| {
                engine
                    .component(allowed.iter().cloned())
                    .generate_embeddings(&model, &texts)
            })
            .await?;
        let values: usize = result.embeddings.iter().map(Vec::len).sum();
        self.limit(values.saturating_mul(size_of::<f32>()))?;
        Ok(result)
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Engine, &HashSet<String>) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Error> {
        let engine = Arc::clone(&self.engine);
        let allowed = Arc::clone(&self.ai_models);
        // The engine never panics across its API; a JoinError means the pool is shutting down.
        tokio::task::spawn_blocking(move || f(&engine, &allowed))
            .await
            .unwrap_or_else(|e| Err(runtime(format!("the inference task failed: {e}"))))
    }

    fn limit(&self, bytes: usize) -> Result<(), Error> {
        if bytes > self.max_result_bytes {
            return Err(runtime(format!(
                "the result ({bytes} bytes) is larger than the host's limit of {} bytes",
                self.max_result_bytes
            )));
        }
        Ok(())
    }
}

fn runtime(message: String) -> Error {
    Error::RuntimeError(spinfer::RuntimeError {
        cause: spinfer::Cause::Internal,
        message,
    })
}

struct HasSpinLlm;

impl HasData for HasSpinLlm {
    type Data<'a> = &'a mut SpinLlm;
}

/// Adds `fermyon:spin/llm` and `fermyon:spin/llm@2.0.0` to `linker`, answered by the
/// [`SpinLlm`] that `get` finds in the store's data. The store's engine must have async
/// support on, and calls must come from within a tokio runtime (inference uses its blocking
/// pool).
pub fn add_to_linker<T: Send + 'static>(
    linker: &mut Linker<T>,
    get: fn(&mut T) -> &mut SpinLlm,
) -> wasmtime::Result<()> {
    v1::add_to_linker::<T, HasSpinLlm>(linker, get)?;
    v2::add_to_linker::<T, HasSpinLlm>(linker, get)?;
    Ok(())
}

/// One impl per package: the two interfaces are the same WIT, but bindgen makes distinct types.
macro_rules! host_impl {
    ($m:ident) => {
        impl $m::Host for SpinLlm {
            async fn infer(
                &mut self,
                model: String,
                prompt: String,
                params: Option<$m::InferencingParams>,
            ) -> Result<$m::InferencingResult, $m::Error> {
                let params = params.map(|p| InferencingParams {
                    max_tokens: p.max_tokens,
                    repeat_penalty: p.repeat_penalty,
                    repeat_penalty_last_n_token_count: p.repeat_penalty_last_n_token_count,
                    temperature: p.temperature,
                    top_k: p.top_k,
                    top_p: p.top_p,
                });
                let r = SpinLlm::infer(self, model, prompt, params)
                    .await
                    .map_err(|e| error!($m, e))?;
                Ok($m::InferencingResult {
                    text: r.text,
                    usage: $m::InferencingUsage {
                        prompt_token_count: r.usage.prompt_token_count,
                        generated_token_count: r.usage.generated_token_count,
                    },
                })
            }

            async fn generate_embeddings(
                &mut self,
                model: String,
                text: Vec<String>,
            ) -> Result<$m::EmbeddingsResult, $m::Error> {
                let r = SpinLlm::generate_embeddings(self, model, text)
                    .await
                    .map_err(|e| error!($m, e))?;
                Ok($m::EmbeddingsResult {
                    embeddings: r.embeddings,
                    usage: $m::EmbeddingsUsage {
                        prompt_token_count: r.usage.prompt_token_count,
                    },
                })
            }
        }
    };
}

macro_rules! error {
    ($m:ident, $e:expr) => {
        match $e {
            Error::ModelNotSupported(_) => $m::Error::ModelNotSupported,
            Error::RuntimeError(r) => $m::Error::RuntimeError(r.message),
            Error::InvalidInput(m) => $m::Error::InvalidInput(m),
        }
    };
}

host_impl!(v1);
host_impl!(v2);
