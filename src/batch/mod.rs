//! The batch scheduler: concurrent generations on one Llama model decode as one batch.
//!
//! How it is built:
//! - One [`Batcher`] per loaded model (it lives beside the model in the engine's cache), with
//!   one scheduler thread ([`scheduler`]) that owns every sequence's KV cache and sampler.
//! - A caller ([`Batcher::generate`]) tokenizes and checks its prompt on its own thread, queues
//!   a request and blocks on a channel of events (tokens, then the end). The caller's thread
//!   detokenises (the [`Streamer`]) and runs its text callback, so callbacks need not be `Send`
//!   and the scheduler never waits on a caller. A callback's `Break`, the cancel flag, or a
//!   dropped receiver stop the sequence; the scheduler sees it at its next step and frees the
//!   slot and the KV cache at once.
//! - Each step runs every active sequence's next token (and a bounded chunk of each newly
//!   admitted prompt) through one pass over the weights, with attention per sequence against
//!   its own cache (`Forward::step`); a step of one sequence alone takes the lone path, so a
//!   request that runs alone computes exactly what it did before batching.
//! - Prompt chunks beside running decodes are sized by measured step costs (`scheduler`'s
//!   `Pace`), so a step that prefills takes at most about twice a pure decode step.
//! - Batch invariance: block-format (GGUF) weights give a token bit-identical results in any
//!   batch (the quantized kernels run the same arithmetic per token for any token count);
//!   float weights agree within f32 summation order, since one, two to three, and more tokens
//!   take different kernel tiles (`tests/batch.rs` states the bound). Where a model's policy
//!   rounds bf16 products (AMX, AVX-512 BF16 dots), only a prompt's rows round, each on its
//!   own, and generated tokens run exact batched or alone (`llama::forward::Run`): a batched
//!   decode once took AMX where its lone run took the exact matvec, and sampled text changed.
//! - Memory: every sequence's KV cache is allocated whole at admission (prompt + max tokens)
//!   against a byte budget shared by the engine's models, which also holds the prefix cache
//!   ([`prefix`]); a request that does not fit now waits in a bounded queue.
//! - Embeddings ([`embed`]): concurrent calls on one model share forward passes, led by one
//!   of the callers (no thread).

mod embed;
mod prefix;
mod scheduler;

pub(crate) use embed::EmbedBatcher;

use crate::generate::{check_prompt, nothing_generated, plan, Streamer};
use crate::llama::LlamaModel;
use crate::sampler::Sampler;
use crate::{Cause, Error, FinishReason, GenerateOptions, Generation, InferencingUsage, Result};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

/// How the engine shares memory and compute between concurrent requests
/// ([`Engine::with_options`](crate::Engine::with_options)).
#[derive(Clone, Debug, PartialEq)]
pub struct EngineOptions {
    /// Bytes of KV cache for all sequences in flight plus the prefix cache, over all models.
    /// Default: half of the memory available at start (`MemAvailable` in /proc/meminfo), or
    /// 2 GiB where that cannot be read.
    pub kv_budget_bytes: usize,
    /// Most requests per model waiting for a slot or for memory; one more is refused with a
    /// `runtime-error` of cause [`Cause::Overloaded`].
    pub max_queue: usize,
    /// Most sequences per model decoding together in one batch.
    pub max_batch_sequences: usize,
    /// Most prompt tokens a step prefills while other sequences decode (a larger chunk
    /// prefills faster but stalls the running streams longer). Within it the scheduler sizes
    /// each chunk so that the step takes about twice a decode-only step.
    pub prefill_chunk: usize,
    /// Keep the KV of recent prompts (least recently used out first) so that a prompt starting
    /// with one of them prefills only the rest.
    pub prefix_cache: bool,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            kv_budget_bytes: default_kv_budget(),
            max_queue: 64,
            max_batch_sequences: 16,
            prefill_chunk: 128,
            prefix_cache: true,
        }
    }
}

/// Half of `MemAvailable`: the rest stays for the weights' page cache and everything else.
fn default_kv_budget() -> usize {
    let avail = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("MemAvailable:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
    });
    match avail {
        Some(kib) => kib.saturating_mul(1024) / 2,
        None => 2 << 30,
    }
}

/// What the engine is doing now, summed over its loaded models (for a server's metrics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Requests waiting for a slot or for memory.
    pub queued: usize,
    /// Sequences prefilling or decoding.
    pub active: usize,
    pub kv_budget_bytes: usize,
    /// KV bytes held by sequences in flight and the prefix cache.
    pub kv_bytes_used: usize,
    pub prefix_cache_entries: usize,
    pub prefix_cache_bytes: usize,
    /// Prompt tokens not prefilled because the prefix cache had them, since the start.
    pub prefix_tokens_reused: u64,
    /// Batched steps run, and tokens through them (prefill + decode), since the start.
    pub steps: u64,
    pub step_tokens: u64,
    /// Steps that ran two or more sequences together.
    pub batched_steps: u64,
}

/// The engine-wide KV byte budget.
pub(crate) struct Budget {
    limit: usize,
    used: AtomicUsize,
}

impl Budget {
    pub(crate) fn new(limit: usize) -> Budget {
        Budget {
            limit,
            used: AtomicUsize::new(0),
        }
    }

    fn try_acquire(&self, bytes: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                u.checked_add(bytes).filter(|&n| n <= self.limit)
            })
            .is_ok()
    }

    fn release(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::AcqRel);
    }

    pub(crate) fn limit(&self) -> usize {
        self.limit
    }

    pub(crate) fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }
}

/// What the scheduler tells a caller.
enum Event {
    /// A sampled token that is not EOS.
    Token(u32),
    /// The sequence ended; `generated` counts an EOS too.
    Done {
        finish: FinishReason,
        generated: usize,
    },
    Failed(Error),
}

/// A generation waiting for, or holding, a slot.
struct Request {
    ids: Vec<u32>,
    sampler: Sampler,
    max_new: usize,
    capacity: usize,
    kv_bytes: usize,
    /// The caller's flag ([`GenerateOptions::cancel`]) and the caller-side stop (callback
    /// `Break`, or the caller is gone).
    cancel: Option<Arc<AtomicBool>>,
    stop: Arc<AtomicBool>,
    events: Sender<Event>,
}

impl Request {
    fn cancelled(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
            || self
                .cancel
                .as_ref()
                .is_some_and(|c| c.load(Ordering::Relaxed))
    }
}

struct Queue {
    waiting: VecDeque<Request>,
    shutdown: bool,
}

/// State the callers and the scheduler thread share.
struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
    opts: EngineOptions,
    budget: Arc<Budget>,
    active: AtomicUsize,
    prefix_entries: AtomicUsize,
    prefix_bytes: AtomicUsize,
    prefix_reused: AtomicU64,
    steps: AtomicU64,
    step_tokens: AtomicU64,
    batched_steps: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One model's scheduler: the handle callers submit to. Dropping it stops the thread.
pub(crate) struct Batcher {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Batcher {
    /// Starts the scheduler thread for `model`.
    pub(crate) fn start(
        model: Arc<LlamaModel>,
        name: &str,
        opts: EngineOptions,
        budget: Arc<Budget>,
    ) -> Result<Batcher> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                waiting: VecDeque::new(),
                shutdown: false,
            }),
            wake: Condvar::new(),
            opts,
            budget,
            active: AtomicUsize::new(0),
            prefix_entries: AtomicUsize::new(0),
            prefix_bytes: AtomicUsize::new(0),
            prefix_reused: AtomicU64::new(0),
            steps: AtomicU64::new(0),
            step_tokens: AtomicU64::new(0),
            batched_steps: AtomicU64::new(0),
        });
        let s = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name(format!("spinfer-batch-{name}"))
            .spawn(move || scheduler::run(s, model))
            .map_err(|e| Error::internal(format!("cannot start the batch scheduler: {e}")))?;
        Ok(Batcher {
            shared,
            thread: Some(thread),
        })
    }

    /// Adds this model's numbers to `st`.
    pub(crate) fn add_stats(&self, st: &mut EngineStats) {
        let sh = &self.shared;
        st.queued += lock(&sh.queue).waiting.len();
        st.active += sh.active.load(Ordering::Relaxed);
        st.prefix_cache_entries += sh.prefix_entries.load(Ordering::Relaxed);
        st.prefix_cache_bytes += sh.prefix_bytes.load(Ordering::Relaxed);
        st.prefix_tokens_reused += sh.prefix_reused.load(Ordering::Relaxed);
        st.steps += sh.steps.load(Ordering::Relaxed);
        st.step_tokens += sh.step_tokens.load(Ordering::Relaxed);
        st.batched_steps += sh.batched_steps.load(Ordering::Relaxed);
    }

    /// One generation through the scheduler: encode and check on this thread, queue, then
    /// stream the tokens the scheduler sends through a [`Streamer`] into `on_text`.
    /// Same checks, stopping rules and results as the lone loop (`generate_with`).
    #[allow(clippy::too_many_arguments)] // the engine's two callers pass them straight through
    pub(crate) fn generate(
        &self,
        m: &LlamaModel,
        model_name: &str,
        prompt: &str,
        o: &GenerateOptions,
        sampler: Sampler,
        mut on_text: Option<crate::generate::OnText<'_>>,
        mut on_token: Option<&mut dyn FnMut(u32)>,
    ) -> Result<Generation> {
        let ids = m.encode(prompt)?;
        let ctx = m.context_len();
        let n_prompt = ids.len();
        check_prompt(n_prompt, ctx, model_name)?;
        if let Some(t) = ids.iter().find(|&&t| t as usize >= m.vocab_size()) {
            return Err(Error::invalid(format!(
                "token id {t} is outside the vocabulary of {} tokens",
                m.vocab_size()
            )));
        }
        let usage = |generated: usize| InferencingUsage {
            prompt_token_count: n_prompt as u32,
            generated_token_count: generated as u32,
        };
        let user_cancel = || o.cancel.as_ref().is_some_and(|c| c.load(Ordering::Relaxed));
        let max_tokens = o.params.max_tokens;
        let Some((max_new, capacity)) = plan(max_tokens, ctx, n_prompt, user_cancel()) else {
            return Ok(nothing_generated(max_tokens, n_prompt));
        };
        let kv_bytes = m.kv_bytes(capacity);
        let limit = self.shared.budget.limit();
        if kv_bytes > limit {
            return Err(Error::with_cause(Cause::TooLarge, format!(
                "this request needs {kv_bytes} bytes of KV cache ({n_prompt} prompt tokens + {max_new} to generate) but the engine's KV budget is {limit} bytes; it could never run: ask for fewer tokens"
            )));
        }
        let (tx, rx) = channel();
        let stop = Arc::new(AtomicBool::new(false));
        self.submit(Request {
            ids: ids.clone(),
            sampler,
            max_new,
            capacity,
            kv_bytes,
            cancel: o.cancel.clone(),
            stop: Arc::clone(&stop),
            events: tx,
        })?;
        // From here on, leaving this function (an error, a panic in the callback) stops the
        // sequence: the scheduler sees the flag, or the dropped receiver, at its next step.
        let _stop_on_exit = StopOnDrop(stop);
        let mut history = ids;
        let mut streamer = on_text.as_ref().map(|_| Streamer::default());
        let mut generated = 0usize;
        let finish = loop {
            match recv(&rx)? {
                Event::Token(tok) => {
                    if let Some(f) = on_token.as_mut() {
                        f(tok);
                    }
                    generated += 1;
                    history.push(tok);
                    if let (Some(s), Some(f)) = (streamer.as_mut(), on_text.as_mut()) {
                        if s.step(m, &history[n_prompt..], &mut **f)?.is_break() {
                            break FinishReason::Cancelled;
                        }
                    }
                    if generated == max_new {
                        break FinishReason::Length;
                    }
                    if user_cancel() {
                        break FinishReason::Cancelled;
                    }
                }
                Event::Done {
                    finish,
                    generated: g,
                } => {
                    generated = g;
                    break finish;
                }
                Event::Failed(e) => return Err(e),
            }
        };
        let text = m.decode(&history[n_prompt..])?;
        if finish != FinishReason::Cancelled {
            if let (Some(s), Some(f)) = (streamer.as_mut(), on_text.as_mut()) {
                s.finish(&text, &mut **f);
            }
        }
        Ok(Generation {
            text,
            usage: usage(generated),
            finish,
        })
    }

    fn submit(&self, r: Request) -> Result<()> {
        let sh = &self.shared;
        let mut q = lock(&sh.queue);
        if q.waiting.len() >= sh.opts.max_queue {
            return Err(Error::with_cause(
                Cause::Overloaded,
                format!(
                    "the engine is overloaded: {} requests are already waiting for this model (max_queue); try again later",
                    q.waiting.len()
                ),
            ));
        }
        q.waiting.push_back(r);
        drop(q);
        sh.wake.notify_one();
        Ok(())
    }
}

/// Sets the flag when dropped: the caller has stopped listening.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn recv(rx: &Receiver<Event>) -> Result<Event> {
    rx.recv()
        .map_err(|_| Error::internal("the batch scheduler stopped"))
}

impl Drop for Batcher {
    fn drop(&mut self) {
        lock(&self.shared.queue).shutdown = true;
        self.shared.wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
