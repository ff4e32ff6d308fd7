//! The Spin-facing engine: registry lookup (contract §2), model cache, access control (§3),
//! generation (§4) and embeddings (§5).
//!
//! Public API:
//! - [`Engine::new`]`(registry)`; `Engine` is `Send + Sync`: share it (e.g. in an `Arc`) between
//!   threads. Models load once, on first use, and are shared by all requests; each request gets
//!   its own KV cache and scratch. No lock is held during an inference, and a load holds only
//!   that model's slot (requests for other models go on).
//! - [`Engine::infer`], [`Engine::infer_with_options`], [`Engine::infer_streaming`] (text
//!   fragments as they are produced, optional fixed seed), [`Engine::generate_embeddings`].
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

use crate::bert::BertModel;
use crate::llama::{LlamaModel, LlamaState};
use crate::sampler::{fresh_seed, Sampler};
use crate::{
    EmbeddingsResult, EmbeddingsUsage, Error, InferencingParams, InferencingResult,
    InferencingUsage, Result,
};
use std::collections::{HashMap, HashSet};
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

/// The engine a host links: one per registry, shared by all components.
pub struct Engine {
    registry: PathBuf,
    llamas: Cache<LlamaModel>,
    berts: Cache<BertModel>,
    loads: AtomicUsize,
}

impl Engine {
    /// An engine over a Spin model registry (usually `<app>/.spin/ai-models`). Nothing is read
    /// until the first request.
    pub fn new(registry: impl Into<PathBuf>) -> Engine {
        Engine {
            registry: registry.into(),
            llamas: Cache::new(),
            berts: Cache::new(),
            loads: AtomicUsize::new(0),
        }
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
        self.generate(model, prompt, &params, None, None)
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
        self.generate(model, prompt, &params, seed, Some(on_text))
    }

    /// Non-streaming generation with a fixed seed.
    pub fn infer_with_seed(
        &self,
        model: &str,
        prompt: &str,
        params: InferencingParams,
        seed: u64,
    ) -> Result<InferencingResult> {
        self.generate(model, prompt, &params, Some(seed), None)
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
        let (embeddings, tokens) = m.embed(&refs)?;
        Ok(EmbeddingsResult {
            embeddings,
            usage: EmbeddingsUsage {
                prompt_token_count: tokens,
            },
        })
    }

    /// Loads (or finds loaded) the inferencing model `<registry>/llama/<name>/`.
    pub fn inferencing_model(&self, name: &str) -> Result<Arc<LlamaModel>> {
        check_model_name(name)?;
        self.llamas.get_or_load(name, || {
            let dir = self.registry.join("llama").join(name);
            if !dir.is_dir() {
                return Err(Error::invalid(format!(
                    "no model directory found in registry for model '{name}'"
                )));
            }
            let m = LlamaModel::load(&dir)?;
            self.loads.fetch_add(1, Ordering::SeqCst);
            Ok(m)
        })
    }

    /// Loads (or finds loaded) the embedding model `<registry>/<name>/`. A folder that is not a
    /// BERT-family sentence embedder (or no folder) is `model-not-supported`.
    pub fn embedding_model(&self, name: &str) -> Result<Arc<BertModel>> {
        check_model_name(name)?;
        self.berts.get_or_load(name, || {
            let dir = self.registry.join(name);
            if !looks_like_bert(&dir) {
                return Err(Error::ModelNotSupported);
            }
            let m = BertModel::load(&dir)?;
            self.loads.fetch_add(1, Ordering::SeqCst);
            Ok(m)
        })
    }

    fn generate(
        &self,
        model: &str,
        prompt: &str,
        params: &InferencingParams,
        seed: Option<u64>,
        on_text: Option<&mut dyn FnMut(&str)>,
    ) -> Result<InferencingResult> {
        // Parameters are checked before the model is touched.
        let mut sampler = Sampler::new(params, seed.unwrap_or_else(fresh_seed))?;
        let m = self.inferencing_model(model)?;
        generate_with(&*m, model, prompt, params.max_tokens, &mut sampler, on_text)
    }
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

/// What generation needs from a causal language model (implemented by [`LlamaModel`]; a fake in
/// the tests exercises the loop without weights).
pub(crate) trait CausalLm {
    type State;
    fn encode(&self, prompt: &str) -> Result<Vec<u32>>;
    fn decode(&self, ids: &[u32]) -> Result<String>;
    fn eos_ids(&self) -> &[u32];
    fn context_len(&self) -> usize;
    fn new_state(&self, capacity: usize) -> Self::State;
    fn forward<'s>(&self, state: &'s mut Self::State, tokens: &[u32]) -> Result<&'s [f32]>;
}

impl CausalLm for LlamaModel {
    type State = LlamaState;
    fn encode(&self, prompt: &str) -> Result<Vec<u32>> {
        LlamaModel::encode(self, prompt)
    }
    fn decode(&self, ids: &[u32]) -> Result<String> {
        LlamaModel::decode(self, ids)
    }
    fn eos_ids(&self) -> &[u32] {
        LlamaModel::eos_ids(self)
    }
    fn context_len(&self) -> usize {
        LlamaModel::context_len(self)
    }
    fn new_state(&self, capacity: usize) -> LlamaState {
        LlamaModel::new_state(self, capacity)
    }
    fn forward<'s>(&self, state: &'s mut LlamaState, tokens: &[u32]) -> Result<&'s [f32]> {
        LlamaModel::forward(self, state, tokens)
    }
}

/// The generation loop: encode, check the length, prefill the prompt in one batch, then sample
/// and feed one token at a time until EOS, `max_tokens`, or the context is full.
pub(crate) fn generate_with<M: CausalLm>(
    m: &M,
    model_name: &str,
    prompt: &str,
    max_tokens: u32,
    sampler: &mut Sampler,
    mut on_text: Option<&mut dyn FnMut(&str)>,
) -> Result<InferencingResult> {
    let prompt_ids = m.encode(prompt)?;
    let ctx = m.context_len();
    let n_prompt = prompt_ids.len();
    if n_prompt == 0 {
        return Err(Error::invalid(
            "the prompt is empty and this model's tokenizer adds no start token, so there is nothing to generate from",
        ));
    }
    if n_prompt >= ctx {
        return Err(Error::invalid(format!(
            "the prompt is {n_prompt} tokens long but model '{model_name}' has a context of {ctx} tokens; the prompt must be shorter than the context"
        )));
    }
    let usage = |generated: usize| InferencingUsage {
        prompt_token_count: n_prompt as u32,
        generated_token_count: generated as u32,
    };
    let max_tokens = max_tokens as usize;
    if max_tokens == 0 {
        return Ok(InferencingResult {
            text: String::new(),
            usage: usage(0),
        });
    }
    // Prompt + generated never exceed the context; the last token sampled is never fed back,
    // so the cache needs one position less than that total.
    let max_new = max_tokens.min(ctx - n_prompt);
    let capacity = (n_prompt + max_new - 1).max(n_prompt);
    let mut state = m.new_state(capacity);

    // history = prompt + generated (the repeat penalty looks at both).
    let mut history = Vec::with_capacity(n_prompt + max_new);
    history.extend_from_slice(&prompt_ids);
    let eos = m.eos_ids();
    let mut streamer = on_text.as_ref().map(|_| Streamer::default());
    let mut generated = 0usize;

    let mut logits = m.forward(&mut state, &prompt_ids)?;
    if logits.is_empty() {
        return Err(Error::runtime(format!(
            "model '{model_name}' produced no logits (its vocabulary is empty)"
        )));
    }
    loop {
        let tok = sampler.sample(logits, &history);
        generated += 1;
        if eos.contains(&tok) {
            break;
        }
        history.push(tok);
        if let (Some(s), Some(f)) = (streamer.as_mut(), on_text.as_mut()) {
            s.step(m, &history[n_prompt..], &mut **f)?;
        }
        if generated == max_new {
            break;
        }
        logits = m.forward(&mut state, &[tok])?;
    }
    let text = m.decode(&history[n_prompt..])?;
    if let (Some(s), Some(f)) = (streamer.as_mut(), on_text.as_mut()) {
        s.finish(&text, &mut **f);
    }
    Ok(InferencingResult {
        text,
        usage: usage(generated),
    })
}

/// Incremental detokenisation (the text-generation-inference scheme): decode a short window of
/// recent tokens with and without the newest ones and emit the difference, so each step costs a
/// few tokens' decode rather than the whole text. Two things make a decoded tail unstable, and
/// both are held back until settled:
/// - text ending in U+FFFD: an incomplete UTF-8 character (byte-level BPE);
/// - a trailing run of byte-fallback tokens (SentencePiece `<0xNN>`): the decoder turns the whole
///   run into U+FFFDs if it is not valid UTF-8 as a whole, so an `<0x17>` already shown as
///   "\x17" could turn into U+FFFD when an `<0xC3>` follows. A token that decodes alone to at
///   most one ASCII character or U+FFFD may be such a token; the run is settled by the next
///   token that is not (a single-character piece like "1" is held one step needlessly, which
///   costs nothing but latency).
#[derive(Default)]
struct Streamer {
    /// Start of the decode window (tokens before it are settled).
    prefix: usize,
    /// Tokens before `read` have been emitted.
    read: usize,
    /// The text emitted so far, to check the final text against.
    emitted: String,
}

impl Streamer {
    fn step<M: CausalLm>(&mut self, m: &M, gen: &[u32], f: &mut dyn FnMut(&str)) -> Result<()> {
        let Some(&last) = gen.last() else {
            return Ok(());
        };
        let alone = m.decode(&[last])?;
        let mut chars = alone.chars();
        let maybe_byte = match (chars.next(), chars.next()) {
            (None, _) => true,
            (Some(c), None) => c.is_ascii() || c == '\u{FFFD}',
            _ => false,
        };
        if maybe_byte {
            return Ok(());
        }
        let before = m.decode(&gen[self.prefix..self.read])?;
        let now = m.decode(&gen[self.prefix..])?;
        if now.len() > before.len() && now.starts_with(&before) && !now.ends_with('\u{FFFD}') {
            let fresh = &now[before.len()..];
            f(fresh);
            self.emitted.push_str(fresh);
            self.prefix = self.read;
            self.read = gen.len();
        }
        Ok(())
    }

    /// Emits whatever the final text has beyond what was streamed (held-back tokens, a trailing
    /// incomplete character).
    fn finish(&mut self, text: &str, f: &mut dyn FnMut(&str)) {
        debug_assert!(
            text.starts_with(&self.emitted),
            "streamed text is not a prefix"
        );
        if let Some(rest) = text.strip_prefix(self.emitted.as_str()) {
            if !rest.is_empty() {
                f(rest);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake model with a SentencePiece-like vocabulary: ids 0..256 are byte-fallback tokens
    /// `<0xNN>`, 256 = BOS, 257 = EOS, 300.. are the multi-byte pieces of `PIECES`. Decoding
    /// follows tokenizers' ByteFallback (a run of byte tokens that is not valid UTF-8 as a whole
    /// becomes one U+FFFD per byte) or, with `byte_level`, lossy UTF-8 over all bytes (GPT-2
    /// style byte-level BPE). It "predicts" a fixed script: the logits put all mass on
    /// `script[pos - prompt_len]`.
    struct Fake {
        script: Vec<u32>,
        ctx: usize,
        add_bos: bool,
        byte_level: bool,
    }
    struct FakeState {
        pos: usize,
        prompt_len: usize,
        capacity: usize,
        logits: Vec<f32>,
    }
    const BOS: u32 = 256;
    const EOS: u32 = 257;
    const PIECES: &[&[u8]] = &[
        b"Hello",
        b" world",
        b"ab",
        b"cd",
        b" x",
        b"yz",
        b"\xE2",
        b"\x82\xAC!",
        b"\xF0\x9F",
        b"\xA6\x80z",
    ];
    fn piece(i: usize) -> u32 {
        300 + i as u32
    }

    impl Fake {
        fn new(script: Vec<u32>, ctx: usize) -> Fake {
            Fake {
                script,
                ctx,
                add_bos: true,
                byte_level: false,
            }
        }
    }

    impl CausalLm for Fake {
        type State = FakeState;
        fn encode(&self, prompt: &str) -> Result<Vec<u32>> {
            let mut v: Vec<u32> = if self.add_bos { vec![BOS] } else { vec![] };
            v.extend(prompt.bytes().map(u32::from));
            Ok(v)
        }
        fn decode(&self, ids: &[u32]) -> Result<String> {
            let bytes_of = |t: u32| -> &[u8] {
                match t {
                    0..=255 => &[],
                    256 | 257 => &[],
                    _ => PIECES[(t - 300) as usize],
                }
            };
            if self.byte_level {
                let mut b = Vec::new();
                for &t in ids {
                    if t < 256 {
                        b.push(t as u8);
                    } else {
                        b.extend_from_slice(bytes_of(t));
                    }
                }
                return Ok(String::from_utf8_lossy(&b).into_owned());
            }
            let mut out = String::new();
            let mut run: Vec<u8> = Vec::new();
            let flush = |run: &mut Vec<u8>, out: &mut String| {
                match std::str::from_utf8(run) {
                    Ok(s) => out.push_str(s),
                    Err(_) => run.iter().for_each(|_| out.push('\u{FFFD}')),
                }
                run.clear();
            };
            for &t in ids {
                if t < 256 {
                    run.push(t as u8);
                } else {
                    flush(&mut run, &mut out);
                    out.push_str(&String::from_utf8_lossy(bytes_of(t)));
                }
            }
            flush(&mut run, &mut out);
            Ok(out)
        }
        fn eos_ids(&self) -> &[u32] {
            &[EOS]
        }
        fn context_len(&self) -> usize {
            self.ctx
        }
        fn new_state(&self, capacity: usize) -> FakeState {
            FakeState {
                pos: 0,
                prompt_len: 0,
                capacity,
                logits: vec![0.0; 300 + PIECES.len()],
            }
        }
        fn forward<'s>(&self, st: &'s mut FakeState, tokens: &[u32]) -> Result<&'s [f32]> {
            if st.pos == 0 {
                st.prompt_len = tokens.len();
            }
            st.pos += tokens.len();
            assert!(st.pos <= st.capacity, "KV cache overflow");
            assert!(st.pos <= self.ctx, "past the context");
            let next = self
                .script
                .get(st.pos - st.prompt_len)
                .copied()
                .unwrap_or(b'.' as u32);
            st.logits.iter_mut().for_each(|l| *l = -10.0);
            st.logits[next as usize] = 10.0;
            Ok(&st.logits)
        }
    }

    fn greedy(max_tokens: u32) -> (InferencingParams, Sampler) {
        let p = InferencingParams {
            temperature: 0.0,
            max_tokens,
            ..Default::default()
        };
        (p, Sampler::new(&p, 0).unwrap())
    }

    fn script(s: &str, eos: bool) -> Vec<u32> {
        let mut v: Vec<u32> = s.bytes().map(u32::from).collect();
        if eos {
            v.push(EOS);
        }
        v
    }

    fn run(m: &Fake, prompt: &str, max: u32) -> Result<(InferencingResult, Vec<String>)> {
        let (_, mut s) = greedy(max);
        let mut frags = Vec::new();
        let r = generate_with(
            m,
            "fake",
            prompt,
            max,
            &mut s,
            Some(&mut |t: &str| frags.push(t.to_string())),
        )?;
        Ok((r, frags))
    }

    #[test]
    fn stops_at_eos_which_counts_but_is_not_text() {
        let m = Fake::new(vec![piece(0), piece(1), b'!' as u32, EOS], 100);
        let (r, frags) = run(&m, "ab", 50).unwrap();
        assert_eq!(r.text, "Hello world!");
        assert_eq!(r.usage.prompt_token_count, 3); // <s> a b
        assert_eq!(r.usage.generated_token_count, 4); // Hello, " world", "!", </s>
                                                      // "!" may be a byte token: held until the end.
        assert_eq!(frags, ["Hello", " world", "!"]);
    }

    #[test]
    fn stops_at_max_tokens() {
        let m = Fake::new(script("hello world", true), 100);
        let (r, _) = run(&m, "x", 5).unwrap();
        assert_eq!(r.text, "hello");
        assert_eq!(r.usage.generated_token_count, 5);
    }

    #[test]
    fn stops_when_context_is_full() {
        // ctx 6, prompt <s> a b = 3 tokens: at most 3 generated (6 in all), cache never overflows.
        let m = Fake::new(script("abcdefgh", false), 6);
        let (r, frags) = run(&m, "ab", 100).unwrap();
        assert_eq!(r.text, "abc");
        assert_eq!(r.usage.generated_token_count, 3);
        assert_eq!(frags.concat(), "abc");
    }

    #[test]
    fn prompt_must_be_shorter_than_context() {
        let m = Fake::new(vec![], 4);
        // <s> + 3 bytes = 4 = context.
        match run(&m, "abc", 10) {
            Err(Error::InvalidInput(msg)) => assert_eq!(
                msg,
                "the prompt is 4 tokens long but model 'fake' has a context of 4 tokens; the prompt must be shorter than the context"
            ),
            other => panic!("{other:?}"),
        }
        // One shorter works and generates exactly one token.
        let m = Fake::new(script("z", false), 4);
        let (r, _) = run(&m, "ab", 10).unwrap();
        assert_eq!((r.text.as_str(), r.usage.generated_token_count), ("z", 1));
    }

    #[test]
    fn max_tokens_zero_returns_empty_text() {
        let m = Fake::new(script("abc", false), 100);
        let (r, frags) = run(&m, "hello", 0).unwrap();
        assert_eq!(r.text, "");
        assert_eq!(r.usage.generated_token_count, 0);
        assert_eq!(r.usage.prompt_token_count, 6);
        assert!(frags.is_empty());
    }

    #[test]
    fn empty_prompt_is_bos_only_or_an_error_without_bos() {
        let m = Fake::new(script("ok", true), 100);
        let (r, _) = run(&m, "", 10).unwrap();
        assert_eq!((r.text.as_str(), r.usage.prompt_token_count), ("ok", 1));
        let mut m = Fake::new(script("ok", true), 100);
        m.add_bos = false;
        assert!(matches!(run(&m, "", 10), Err(Error::InvalidInput(_))));
    }

    #[test]
    fn streaming_holds_byte_fallback_runs_until_settled() {
        // "ab" <0xC3> <0xA9> "cd" <0x17> <0xC3> " x" "yz": the first run is "é"; the second is
        // not valid UTF-8 as a whole, so the decoder turns even the <0x17> into U+FFFD — it must
        // not have been streamed as "\x17" before <0xC3> arrived.
        let m = Fake::new(
            vec![
                piece(2),
                0xC3,
                0xA9,
                piece(3),
                0x17,
                0xC3,
                piece(4),
                piece(5),
                EOS,
            ],
            100,
        );
        let (r, frags) = run(&m, "", 100).unwrap();
        assert_eq!(r.text, "abécd\u{FFFD}\u{FFFD} xyz");
        assert_eq!(frags, ["ab", "écd", "\u{FFFD}\u{FFFD} x", "yz"]);
        // A valid run of ASCII bytes, then a piece.
        let m = Fake::new(vec![0x17, b'q' as u32, piece(5), EOS], 100);
        let (r, frags) = run(&m, "", 100).unwrap();
        assert_eq!(r.text, "\u{17}qyz");
        assert_eq!(frags, ["\u{17}qyz"]);
    }

    #[test]
    fn streaming_waits_for_complete_utf8_in_byte_level_vocabularies() {
        // Pieces split "€" (E2 | 82 AC) and "🦀" (F0 9F | A6 80).
        let mut m = Fake::new(
            vec![piece(0), piece(6), piece(7), piece(8), piece(9), EOS],
            100,
        );
        m.byte_level = true;
        let (r, frags) = run(&m, "", 100).unwrap();
        assert_eq!(r.text, "Hello€!🦀z");
        assert_eq!(frags, ["Hello", "€!", "🦀z"]);
    }

    #[test]
    fn trailing_incomplete_character_is_flushed_at_the_end() {
        // Generation stops (max_tokens) inside "€": the text holds U+FFFD, and the fragments
        // still concatenate to it.
        let mut m = Fake::new(vec![piece(0), piece(6), piece(7)], 100);
        m.byte_level = true;
        let (r, frags) = run(&m, "", 2).unwrap();
        assert_eq!(r.text, "Hello\u{FFFD}");
        assert_eq!(frags, ["Hello", "\u{FFFD}"]);
        // Byte-fallback: byte tokens "a" E2 82 form one invalid run: three U+FFFD (the "a" too).
        let m = Fake::new(script("a\u{20AC}", false), 100);
        let (r, frags) = run(&m, "", 3).unwrap();
        assert_eq!(r.text, "\u{FFFD}\u{FFFD}\u{FFFD}");
        assert_eq!(frags.concat(), r.text);
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
