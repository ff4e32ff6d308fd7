//! The Spin-facing engine: registry lookup (contract §2), model cache, access control (§3),
//! generation (§4) and embeddings (§5).
//!
//! Public API:
//! - [`Engine::new`]`(registry)`; `Engine` is `Send + Sync`: share it (e.g. in an `Arc`) between
//!   threads. Models load once, on first use, and are shared by all requests. Generations on
//!   one model run through its batch scheduler (src/batch/): concurrent requests decode
//!   together, each with its own KV cache, sampler and callback, within a KV memory budget and
//!   a bounded queue ([`Engine::with_options`], [`EngineOptions`]; [`Engine::stats`]).
//!   Concurrent embedding calls on one model share forward passes. A load holds only that
//!   model's slot (requests for other models go on).
//! - [`Engine::infer`], [`Engine::infer_with_options`], [`Engine::infer_streaming`] (text
//!   fragments as they are produced, optional fixed seed), [`Engine::generate_embeddings`].
//! - [`Engine::generate`]: everything at once ([`GenerateOptions`]: seed, OpenAI penalties, a
//!   cancel flag; a text callback that can say stop; the [`FinishReason`](crate::FinishReason)).
//! - [`Engine::component`]`(ai_models)`: a [`Component`] view with the same methods that allows
//!   only the listed models, as Spin's manifest `ai_models` key does.
//!
//! Defined behaviour (contract §4 leaves these open):
//! - `max_tokens == 0`: no generation; the result is empty text, 0 generated tokens, and the
//!   prompt's token count (the prompt is still tokenized and checked against the context).
//! - Empty prompt: allowed. A Llama tokenizer turns it into `<s>` alone, so generation starts
//!   from the beginning-of-sequence token. If a tokenizer adds nothing, it is `invalid-input`.
//! - The prompt must be shorter than the context (`invalid-input` otherwise); generation stops at
//!   the first EOS id, after `max_tokens`, or when prompt + generated fill the context.
//! - Seed: fresh per request unless the caller fixes one ([`Engine::infer_streaming`]).

use crate::batch::{Batcher, Budget, EmbedBatcher, EngineOptions, EngineStats};
use crate::bert::BertModel;
use crate::generate::OnText;
use crate::llama::{ChatMessage, LlamaModel};
use crate::sampler::{fresh_seed, Sampler};
use crate::{
    EmbeddingsResult, EmbeddingsUsage, Error, GenerateOptions, Generation, InferencingParams,
    InferencingResult, Result,
};
use std::collections::{HashMap, HashSet};
use std::ops::ControlFlow;
use std::path::{Component as PathComponent, Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// One cache entry: the slot's own lock is held while *this* model loads, so a second request
/// for it waits for that load instead of starting another; `None` after a failed load, so the
/// next request tries again.
type Slot<M> = Arc<Mutex<Option<Arc<M>>>>;

/// Models by name; the map's lock is only held to find or insert a slot.
struct Cache<M> {
    slots: Mutex<HashMap<String, Slot<M>>>,
}

impl<M> Cache<M> {
    fn new() -> Self {
        Cache {
            slots: Mutex::new(HashMap::new()),
        }
    }

    /// The models loaded so far (one waiting on a load is skipped, not waited for).
    fn loaded(&self) -> Vec<Arc<M>> {
        let slots: Vec<Slot<M>> = lock(&self.slots).values().cloned().collect();
        slots
            .iter()
            .filter_map(|s| s.try_lock().ok().and_then(|g| g.clone()))
            .collect()
    }

    fn get_or_load(&self, name: &str, load: impl FnOnce() -> Result<M>) -> Result<Arc<M>> {
        let slot = {
            let mut map = lock(&self.slots);
            Arc::clone(map.entry(name.to_string()).or_default())
        };
        let mut guard = lock(&slot);
        if let Some(m) = guard.as_ref() {
            return Ok(Arc::clone(m));
        }
        let m = Arc::new(load()?);
        *guard = Some(Arc::clone(&m));
        Ok(m)
    }
}

/// A poisoned lock only means another request panicked; the data (a map of Arcs) is still sound.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A loaded Llama model and its batch scheduler (whose thread holds the model too).
pub(crate) struct LlamaEntry {
    pub(crate) model: Arc<LlamaModel>,
    batcher: Batcher,
}

/// A loaded embedding model and the batcher its concurrent callers share.
pub(crate) struct BertEntry {
    model: BertModel,
    batcher: EmbedBatcher,
}

/// The engine a host links: one per registry, shared by all components.
pub struct Engine {
    registry: PathBuf,
    options: EngineOptions,
    budget: Arc<Budget>,
    llamas: Cache<LlamaEntry>,
    berts: Cache<BertEntry>,
    loads: AtomicUsize,
}

impl Engine {
    /// An engine over a Spin model registry (usually `<app>/.spin/ai-models`). Nothing is read
    /// until the first request. Default [`EngineOptions`].
    pub fn new(registry: impl Into<PathBuf>) -> Engine {
        Engine::with_options(registry, EngineOptions::default())
    }

    /// [`Engine::new`] with the given KV budget, queue and batch limits.
    pub fn with_options(registry: impl Into<PathBuf>, options: EngineOptions) -> Engine {
        Engine {
            registry: registry.into(),
            budget: Arc::new(Budget::new(options.kv_budget_bytes)),
            options,
            llamas: Cache::new(),
            berts: Cache::new(),
            loads: AtomicUsize::new(0),
        }
    }

    pub fn options(&self) -> &EngineOptions {
        &self.options
    }

    /// Queue depth, sequences in flight and KV memory, summed over the loaded models.
    pub fn stats(&self) -> EngineStats {
        let mut st = EngineStats {
            kv_budget_bytes: self.budget.limit(),
            kv_bytes_used: self.budget.used(),
            ..Default::default()
        };
        for e in self.llamas.loaded() {
            e.batcher.add_stats(&mut st);
        }
        st
    }

    pub fn registry(&self) -> &Path {
        &self.registry
    }

    /// How many model loads succeeded so far (each model loads once; for tests and monitoring).
    pub fn load_count(&self) -> usize {
        self.loads.load(Ordering::SeqCst)
    }

    /// A view for one component: only the models in `ai_models` may be called.
    pub fn component<I, S>(&self, ai_models: I) -> Component<'_>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Component {
            engine: self,
            allowed: ai_models.into_iter().map(Into::into).collect(),
        }
    }

    /// `infer(model, prompt)` with Spin's default parameters.
    pub fn infer(&self, model: &str, prompt: &str) -> Result<InferencingResult> {
        self.infer_with_options(model, prompt, InferencingParams::default())
    }

    pub fn infer_with_options(
        &self,
        model: &str,
        prompt: &str,
        params: InferencingParams,
    ) -> Result<InferencingResult> {
        self.run(model, prompt, &with_params(params, None), None)
            .map(into_result)
    }

    /// The full generation call, for servers and hosts: Spin's parameters plus seed, OpenAI's
    /// penalties and a cancel flag ([`GenerateOptions`]). `on_text` receives the text as it is
    /// produced, in fragments that are each complete UTF-8; returning `Break` stops the
    /// generation at once (the fragments so far are the text returned, finish `Cancelled`).
    /// Otherwise the fragments' concatenation equals the returned `text`.
    pub fn generate(
        &self,
        model: &str,
        prompt: &str,
        options: &GenerateOptions,
        on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
    ) -> Result<Generation> {
        self.run(model, prompt, options, Some(on_text))
    }

    /// Generation for library users: `on_text` receives the text as it is produced, in
    /// fragments that are each complete UTF-8 (a character split over several tokens waits for
    /// its last byte); their concatenation equals the returned `text`. `seed`: `Some` fixes the
    /// sampler's RNG for reproducible output; `None` draws a fresh seed.
    pub fn infer_streaming(
        &self,
        model: &str,
        prompt: &str,
        params: InferencingParams,
        seed: Option<u64>,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<InferencingResult> {
        let mut f = |t: &str| {
            on_text(t);
            ControlFlow::Continue(())
        };
        self.run(model, prompt, &with_params(params, seed), Some(&mut f))
            .map(into_result)
    }

    /// Non-streaming generation with a fixed seed.
    pub fn infer_with_seed(
        &self,
        model: &str,
        prompt: &str,
        params: InferencingParams,
        seed: u64,
    ) -> Result<InferencingResult> {
        self.run(model, prompt, &with_params(params, Some(seed)), None)
            .map(into_result)
    }

    /// The prompt for a conversation with `model`: the messages through the model's chat
    /// template, ending with the assistant's turn opened (pass it to the `infer` calls).
    pub fn chat_prompt(&self, model: &str, messages: &[ChatMessage]) -> Result<String> {
        self.inferencing_model(model)?.chat_prompt(messages)
    }

    /// One L2-normalised vector per text, in order; `prompt_token_count` sums the texts' tokens.
    pub fn generate_embeddings<S: AsRef<str>>(
        &self,
        model: &str,
        texts: &[S],
    ) -> Result<EmbeddingsResult> {
        let m = self.embedding_model(model)?;
        if texts.is_empty() {
            return Ok(EmbeddingsResult {
                embeddings: Vec::new(),
                usage: EmbeddingsUsage::default(),
            });
        }
        let refs: Vec<&str> = texts.iter().map(AsRef::as_ref).collect();
        let (embeddings, tokens) = guarded(|| {
            let (seqs, tokens) = m.model.tokenize_all(&refs)?;
            Ok((m.batcher.embed(&m.model, seqs)?, tokens))
        })?;
        Ok(EmbeddingsResult {
            embeddings,
            usage: EmbeddingsUsage {
                prompt_token_count: tokens,
            },
        })
    }

    /// Loads (or finds loaded) the inferencing model `<registry>/llama/<name>/`.
    pub(crate) fn inferencing_model(&self, name: &str) -> Result<Arc<LlamaModel>> {
        Ok(Arc::clone(&self.llama_entry(name)?.model))
    }

    fn llama_entry(&self, name: &str) -> Result<Arc<LlamaEntry>> {
        check_model_name(name)?;
        self.llamas.get_or_load(name, || {
            let dir = self.registry.join("llama").join(name);
            if !dir.is_dir() {
                return Err(Error::invalid(format!(
                    "no model directory found in registry for model '{name}'"
                )));
            }
            let model = Arc::new(LlamaModel::load(&dir)?);
            let batcher = Batcher::start(
                Arc::clone(&model),
                name,
                self.options.clone(),
                Arc::clone(&self.budget),
            )?;
            self.loads.fetch_add(1, Ordering::SeqCst);
            Ok(LlamaEntry { model, batcher })
        })
    }

    /// Loads (or finds loaded) the embedding model `<registry>/<name>/`. A folder that is not a
    /// BERT-family sentence embedder (or no folder) is `model-not-supported`.
    pub(crate) fn embedding_model(&self, name: &str) -> Result<Arc<BertEntry>> {
        check_model_name(name)?;
        self.berts.get_or_load(name, || {
            let dir = self.registry.join(name);
            if !looks_like_bert(&dir) {
                return Err(Error::not_supported(format!(
                    "{} is not a sentence-embedding model (a BERT folder with tokenizer.json \
                     and model.safetensors)",
                    dir.display()
                )));
            }
            let model = BertModel::load(&dir)?;
            self.loads.fetch_add(1, Ordering::SeqCst);
            Ok(BertEntry {
                model,
                batcher: EmbedBatcher::default(),
            })
        })
    }

    fn run(
        &self,
        model: &str,
        prompt: &str,
        o: &GenerateOptions,
        on_text: Option<OnText<'_>>,
    ) -> Result<Generation> {
        // Parameters are checked before the model is touched.
        let sampler = Sampler::new(&o.params, o.seed.unwrap_or_else(fresh_seed))?
            .with_openai_penalties(o.frequency_penalty, o.presence_penalty)?;
        let e = self.llama_entry(model)?;
        guarded(|| {
            e.batcher
                .generate(&e.model, model, prompt, o, sampler, on_text, None)
        })
    }

    /// [`Engine::generate`] without text, calling `on_token` with each generated token id as
    /// it arrives (the concurrency bench times tokens, not fragments).
    pub(crate) fn generate_tokens(
        &self,
        model: &str,
        prompt: &str,
        o: &GenerateOptions,
        on_token: &mut dyn FnMut(u32),
    ) -> Result<Generation> {
        let sampler = Sampler::new(&o.params, o.seed.unwrap_or_else(fresh_seed))?
            .with_openai_penalties(o.frequency_penalty, o.presence_penalty)?;
        let e = self.llama_entry(model)?;
        guarded(|| {
            e.batcher
                .generate(&e.model, model, prompt, o, sampler, None, Some(on_token))
        })
    }
}

fn with_params(params: InferencingParams, seed: Option<u64>) -> GenerateOptions {
    GenerateOptions {
        params,
        seed,
        ..Default::default()
    }
}

fn into_result(g: Generation) -> InferencingResult {
    InferencingResult {
        text: g.text,
        usage: g.usage,
    }
}

/// Runs `f`, turning a panic (a bug) into an `Internal` runtime error, so that no panic
/// crosses the public API and a host (or server) goes on with the next request. Models hold
/// no state a failed request could leave half-written: each request has its own.
fn guarded<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|p| {
        let msg = p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        Err(Error::internal(format!("the engine failed: {msg}")))
    })
}

/// A component's view of the engine: the same calls, but only for the models in its
/// `ai_models` list (exact, case-sensitive), checked before any file is touched.
pub struct Component<'e> {
    engine: &'e Engine,
    allowed: HashSet<String>,
}

impl Component<'_> {
    fn check(&self, model: &str) -> Result<()> {
        if self.allowed.contains(model) {
            Ok(())
        } else {
            Err(Error::invalid(format!(
                "The component does not have access to use '{model}'. To give the component access, add '{model}' to the 'ai_models' key for the component in your spin.toml manifest"
            )))
        }
    }

    pub fn infer(&self, model: &str, prompt: &str) -> Result<InferencingResult> {
        self.check(model)?;
        self.engine.infer(model, prompt)
    }

    pub fn infer_with_options(
        &self,
        model: &str,
        prompt: &str,
        params: InferencingParams,
    ) -> Result<InferencingResult> {
        self.check(model)?;
        self.engine.infer_with_options(model, prompt, params)
    }

    pub fn infer_streaming(
        &self,
        model: &str,
        prompt: &str,
        params: InferencingParams,
        seed: Option<u64>,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<InferencingResult> {
        self.check(model)?;
        self.engine
            .infer_streaming(model, prompt, params, seed, on_text)
    }

    pub fn infer_with_seed(
        &self,
        model: &str,
        prompt: &str,
        params: InferencingParams,
        seed: u64,
    ) -> Result<InferencingResult> {
        self.check(model)?;
        self.engine.infer_with_seed(model, prompt, params, seed)
    }

    pub fn generate(
        &self,
        model: &str,
        prompt: &str,
        options: &GenerateOptions,
        on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
    ) -> Result<Generation> {
        self.check(model)?;
        self.engine.generate(model, prompt, options, on_text)
    }

    pub fn chat_prompt(&self, model: &str, messages: &[ChatMessage]) -> Result<String> {
        self.check(model)?;
        self.engine.chat_prompt(model, messages)
    }

    pub fn generate_embeddings<S: AsRef<str>>(
        &self,
        model: &str,
        texts: &[S],
    ) -> Result<EmbeddingsResult> {
        self.check(model)?;
        self.engine.generate_embeddings(model, texts)
    }
}

/// A model name must be one plain folder name: no separators, no `..`, no NUL, not empty, nothing
/// the platform would read as a root or drive prefix. Checked before any path is built.
pub fn check_model_name(name: &str) -> Result<()> {
    let bad = |why: &str| {
        Err(Error::invalid(format!(
            "model name {name:?} is not a valid model name: {why}"
        )))
    };
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.contains('\0') {
        return bad("it contains a NUL character");
    }
    if name.contains('/') || name.contains('\\') {
        return bad("it contains a path separator");
    }
    if name.contains("..") {
        return bad("it contains '..'");
    }
    if name == "." {
        return bad("it names the registry folder itself");
    }
    // On Windows "C:x" is drive-relative and "x:y" names a stream; elsewhere ':' is ordinary
    // (names like "llama3:8b" work).
    if cfg!(windows) && name.contains(':') {
        return bad("it contains ':' (a drive or stream prefix on Windows)");
    }
    let mut parts = Path::new(name).components();
    match (parts.next(), parts.next()) {
        (Some(PathComponent::Normal(_)), None) => Ok(()),
        _ => bad("it is not a single folder name"),
    }
}

/// The embedding folder holds a tokenizer and safetensors weights, and its config (when there is
/// one) says BERT. Anything else is not a model we can embed with.
fn looks_like_bert(dir: &Path) -> bool {
    if !dir.is_dir() || !dir.join("tokenizer.json").is_file() {
        return false;
    }
    if !dir.join("model.safetensors").is_file() {
        return false;
    }
    match std::fs::read(dir.join("config.json")) {
        Err(_) => true, // no config: the all-MiniLM-L6-v2 shape applies (contract §2)
        Ok(bytes) => match serde_json::from_slice::<serde_json::Value>(&bytes) {
            // A config we cannot read: let the loader name the problem.
            Err(_) => true,
            Ok(cfg) => match cfg.get("model_type").and_then(|v| v.as_str()) {
                None => true,
                Some(t) => t == "bert",
            },
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_an_internal_error() {
        let e = guarded::<()>(|| panic!("kernel bug")).unwrap_err();
        assert_eq!(e.cause(), Some(crate::Cause::Internal));
        assert!(e.message().unwrap().contains("kernel bug"), "{e}");
        assert_eq!(guarded(|| Ok(3)), Ok(3));
    }

    #[test]
    fn model_names_that_could_leave_the_registry_are_rejected() {
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "a/b",
            "a\\b",
            "x\0y",
            "/etc",
            "..foo",
            "foo..",
            "llama/../x",
        ] {
            match check_model_name(bad) {
                Err(Error::InvalidInput(m)) => assert!(m.starts_with("model name "), "{m}"),
                other => panic!("{bad:?}: {other:?}"),
            }
        }
        for good in [
            "tiny-llama",
            "llama2-chat",
            "all-minilm-l6-v2",
            "a.b",
            "A_b c",
        ] {
            assert!(check_model_name(good).is_ok(), "{good}");
        }
        assert_eq!(check_model_name("C:x").is_err(), cfg!(windows));
        assert_eq!(check_model_name("llama3:8b").is_err(), cfg!(windows));
    }

    #[test]
    fn engine_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Engine>();
        check::<Component<'_>>();
    }

    #[test]
    fn cache_loads_once_and_does_not_cache_failures() {
        let cache: Cache<u32> = Cache::new();
        let calls = AtomicUsize::new(0);
        let fail = || -> Result<u32> {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(Error::runtime("boom"))
        };
        assert!(cache.get_or_load("m", fail).is_err());
        assert!(cache.get_or_load("m", fail).is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        // Concurrent first uses of one model: one load; the others wait and share it.
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    let v = cache
                        .get_or_load("m", || {
                            calls.fetch_add(1, Ordering::SeqCst);
                            std::thread::sleep(std::time::Duration::from_millis(20));
                            Ok(7)
                        })
                        .unwrap();
                    assert_eq!(*v, 7);
                });
            }
        });
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn a_slow_load_does_not_block_other_models() {
        // While "slow" loads (holding its slot), "fast" loads and returns.
        let cache: Cache<u32> = Cache::new();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let cache = &cache;
        std::thread::scope(|s| {
            s.spawn(move || {
                cache
                    .get_or_load("slow", || {
                        rx.recv().ok(); // wait until "fast" has loaded
                        Ok(1)
                    })
                    .unwrap();
            });
            std::thread::sleep(std::time::Duration::from_millis(20));
            assert_eq!(*cache.get_or_load("fast", || Ok(2)).unwrap(), 2);
            tx.send(()).unwrap();
        });
    }
}
