//! The scheduler thread of one model: admits queued requests as slots and memory allow, runs
//! one batched step after another over every active sequence, samples each one's next token
//! and sends it to its caller.

use super::prefix::PrefixCache;
use super::{lock, Event, Request, Shared};
use crate::llama::{BatchScratch, KvCache, LlamaModel, LlamaState, Segment, MAX_BATCH};
use crate::{Error, FinishReason};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A sequence in flight: its request, its cache and how far it has run.
struct Seq {
    req: Request,
    kv: KvCache,
    /// Prompt + generated tokens (the repeat penalty's history; the prompt is prefilled from it).
    history: Vec<u32>,
    n_prompt: usize,
    /// Positions in the cache.
    pos: usize,
    generated: usize,
}

impl Seq {
    /// Tokens still to run before this sequence has logits to sample from.
    fn pending(&self) -> usize {
        self.history.len() - self.pos
    }

    /// Whether its next tokens are a prompt's in `forward::Run`'s sense: of a prompt of two or
    /// more tokens (as `LlamaModel::forward` takes it), however it is chunked or restored.
    fn prompt(&self) -> bool {
        self.n_prompt > 1 && self.pos < self.n_prompt
    }
}

/// How long a step that prefills beside running decodes may take, in pure decode steps: the
/// running streams' inter-token latency is at most this many times their usual one.
const STALL_FACTOR: f64 = 2.0;
/// The fewest prompt tokens such a step prefills, so a long prompt still makes progress.
const MIN_CHUNK: usize = 8;

/// The scheduler's measured costs, which size the prefill chunks run beside decodes: a fixed
/// token count would stall a 1B model's streams for seconds (128 tokens ≈ 2.2 s on two Zen 3
/// cores) yet be needlessly small for a 135M one. Chunk sizes only change which tokens share
/// a step, not what a sequence computes (see the module doc on batch invariance).
#[derive(Default)]
struct Pace {
    /// Seconds of a step that only decodes (moving average).
    decode_s: Option<f64>,
    /// Seconds per prefilled token beyond that (moving average).
    token_s: Option<f64>,
}

impl Pace {
    /// Prompt tokens for a step beside running decodes, at most `max`.
    fn allowance(&self, max: usize) -> usize {
        match (self.decode_s, self.token_s) {
            (Some(d), Some(t)) if t > 0.0 => {
                let n = ((STALL_FACTOR - 1.0) * d / t) as usize;
                n.clamp(MIN_CHUNK.min(max), max)
            }
            // Not measured yet: the first steps (often prefill alone) will tell.
            _ => max,
        }
    }

    fn observe(&mut self, secs: f64, decodes: usize, prefilled: usize) {
        let avg = |old: Option<f64>, new: f64| Some(old.map_or(new, |o| 0.8 * o + 0.2 * new));
        if prefilled == 0 {
            if decodes > 0 {
                self.decode_s = avg(self.decode_s, secs);
            }
        } else if prefilled >= MIN_CHUNK {
            let base = if decodes > 0 {
                self.decode_s.unwrap_or(0.0)
            } else {
                0.0
            };
            let per = (secs - base).max(0.0) / prefilled as f64;
            self.token_s = avg(self.token_s, per);
        }
    }
}

/// How long an idle scheduler waits for more of a burst of requests before its first step.
const GATHER: Duration = Duration::from_millis(5);

/// When a request waits for memory another model holds, how often to look again.
const RETRY: Duration = Duration::from_millis(20);

pub(super) fn run(sh: Arc<Shared>, m: Arc<LlamaModel>) {
    let opts = sh.opts.clone();
    let mut active: Vec<Seq> = Vec::new();
    let mut prefix = PrefixCache::default();
    let mut pace = Pace::default();
    let mut lone = m.scratch_state(m.context_len());
    let mut batch = BatchScratch::default();
    let mut lone_logits = Vec::new();
    let eos = m.eos_ids().to_vec();
    // The prefix cache may use at most half the budget, so that it never starves admission
    // for long (its entries are evicted on demand anyway).
    let prefix_max = if opts.prefix_cache {
        sh.budget.limit() / 2
    } else {
        0
    };
    loop {
        // Admit what fits, or sleep until there is something to do.
        {
            let mut q = lock(&sh.queue);
            let mut gathered = false;
            loop {
                if q.shutdown && active.is_empty() && q.waiting.is_empty() {
                    prefix.clear(&sh.budget);
                    return;
                }
                // Requests cancelled while waiting leave the queue now, wherever they are.
                q.waiting.retain(|r| {
                    if r.cancelled() {
                        let _ = r.events.send(Event::Done {
                            finish: FinishReason::Cancelled,
                            generated: 0,
                        });
                    }
                    !r.cancelled()
                });
                // Idle when work arrives: requests sent at the same moment (a burst of callers)
                // get GATHER to queue, so their prompts prefill in one step instead of the
                // later ones trickling in beside the first one's decodes.
                if active.is_empty() && !q.waiting.is_empty() && !gathered {
                    gathered = true;
                    let until = Instant::now() + GATHER;
                    while q.waiting.len() < opts.max_batch_sequences && !q.shutdown {
                        let now = Instant::now();
                        if now >= until {
                            break;
                        }
                        q = sh
                            .wake
                            .wait_timeout(q, until - now)
                            .unwrap_or_else(|e| e.into_inner())
                            .0;
                    }
                }
                while active.len() < opts.max_batch_sequences.max(1) {
                    let Some(r) = q.waiting.front() else { break };
                    let need = r.kv_bytes;
                    let mut got = sh.budget.try_acquire(need);
                    while !got && prefix.evict_lru(&sh.budget) {
                        got = sh.budget.try_acquire(need);
                    }
                    if !got {
                        break; // first come, first served: wait for memory
                    }
                    let r = q.waiting.pop_front().expect("front");
                    match m.try_new_kv(r.capacity) {
                        Ok(mut kv) => {
                            let reused = if opts.prefix_cache {
                                prefix.restore(&r.ids, &mut kv)
                            } else {
                                0
                            };
                            sh.prefix_reused.fetch_add(reused as u64, Ordering::Relaxed);
                            let mut history = Vec::new();
                            if history.try_reserve_exact(r.ids.len() + r.max_new).is_err() {
                                sh.budget.release(need);
                                let _ = r.events.send(Event::Failed(Error::with_cause(
                                    crate::Cause::Overloaded,
                                    "out of memory for the token history",
                                )));
                                continue;
                            }
                            history.extend_from_slice(&r.ids);
                            active.push(Seq {
                                n_prompt: r.ids.len(),
                                req: r,
                                kv,
                                history,
                                pos: reused,
                                generated: 0,
                            });
                        }
                        Err(e) => {
                            sh.budget.release(need);
                            let _ = r.events.send(Event::Failed(e));
                        }
                    }
                }
                if !active.is_empty() {
                    break;
                }
                if q.waiting.is_empty() {
                    q = sh.wake.wait(q).unwrap_or_else(|e| e.into_inner());
                } else {
                    // Waiting for memory that other models hold: look again shortly.
                    q = sh
                        .wake
                        .wait_timeout(q, RETRY)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
        }
        sh.active.store(active.len(), Ordering::Relaxed);

        // Cancelled sequences leave before the step: slot and cache freed now.
        active.retain(|s| {
            if s.req.cancelled() {
                let _ = s.req.events.send(Event::Done {
                    finish: FinishReason::Cancelled,
                    generated: s.generated,
                });
                sh.budget.release(s.req.kv_bytes);
                false
            } else {
                true
            }
        });
        if active.is_empty() {
            sh.active.store(0, Ordering::Relaxed);
            continue;
        }

        // The step's plan: every decode's one token, then prompt chunks within the prefill
        // allowance (larger when nothing decodes: nobody waits on it).
        let decoding = active.iter().any(|s| s.pos >= s.n_prompt);
        let mut allowance = if decoding {
            pace.allowance(opts.prefill_chunk.max(1))
        } else {
            MAX_BATCH.max(opts.prefill_chunk)
        };
        let mut take = vec![0usize; active.len()];
        for (i, s) in active.iter().enumerate() {
            if s.pos >= s.n_prompt {
                take[i] = s.pending();
            }
        }
        for (i, s) in active.iter().enumerate() {
            if s.pos < s.n_prompt && allowance > 0 {
                take[i] = s.pending().min(allowance).min(MAX_BATCH);
                allowance -= take[i];
            }
        }

        // The step itself; a panic (a bug) fails this step's sequences, not the thread.
        let started = Instant::now();
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            step(
                &m,
                &mut active,
                &take,
                &mut lone,
                &mut batch,
                &mut lone_logits,
            )
        }));
        let rows = match ran {
            Ok(Ok(rows)) => rows,
            Ok(Err(e)) => {
                fail_step(&sh, &mut active, &take, e);
                continue;
            }
            Err(p) => {
                let msg = p
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                fail_step(
                    &sh,
                    &mut active,
                    &take,
                    Error::internal(format!("the engine failed: {msg}")),
                );
                continue;
            }
        };
        let decodes = (0..active.len())
            .filter(|&i| take[i] > 0 && active[i].pos >= active[i].n_prompt)
            .count();
        let prefilled = take.iter().sum::<usize>() - decodes;
        pace.observe(started.elapsed().as_secs_f64(), decodes, prefilled);
        sh.steps.fetch_add(1, Ordering::Relaxed);
        if matches!(rows, Rows::Batch) {
            sh.batched_steps.fetch_add(1, Ordering::Relaxed);
        }
        sh.step_tokens
            .fetch_add(take.iter().sum::<usize>() as u64, Ordering::Relaxed);

        // Sample, send, and retire what has ended.
        let vocab = m.vocab_size();
        let mut row = 0;
        let mut keep = vec![true; active.len()];
        for (i, s) in active.iter_mut().enumerate() {
            if take[i] == 0 {
                continue;
            }
            s.pos += take[i];
            if s.pos == s.n_prompt && opts.prefix_cache && s.generated == 0 {
                prefix.insert(&m, &s.req.ids, &s.kv, &sh.budget, prefix_max);
            }
            if s.pending() > 0 {
                continue; // more prompt to prefill
            }
            let logits = match &rows {
                Rows::Lone => &lone_logits[..],
                Rows::Batch => &batch.logits[row * vocab..(row + 1) * vocab],
            };
            row += 1;
            let tok = s.req.sampler.sample(logits, &s.history);
            s.generated += 1;
            let end = if eos.contains(&tok) {
                Some(FinishReason::Eos)
            } else {
                s.history.push(tok);
                if s.req.events.send(Event::Token(tok)).is_err() {
                    keep[i] = false; // the caller is gone
                    None
                } else if s.generated == s.req.max_new {
                    Some(FinishReason::Length)
                } else {
                    None
                }
            };
            if let Some(finish) = end {
                let _ = s.req.events.send(Event::Done {
                    finish,
                    generated: s.generated,
                });
                keep[i] = false;
            }
        }
        let mut i = 0;
        active.retain(|s| {
            let k = keep[i];
            i += 1;
            if !k {
                sh.budget.release(s.req.kv_bytes);
            }
            k
        });
        sh.active.store(active.len(), Ordering::Relaxed);
        sh.prefix_entries.store(prefix.len(), Ordering::Relaxed);
        sh.prefix_bytes.store(prefix.bytes(), Ordering::Relaxed);
    }
}

/// Where a step's logits are.
enum Rows {
    /// One sequence ran alone: its logits were copied out of the lone scratch's borrow.
    Lone,
    /// In `BatchScratch::logits`, one row per segment that wanted logits.
    Batch,
}

/// Runs the planned tokens: alone through the lone path when one sequence runs, else as one
/// batched step.
fn step(
    m: &LlamaModel,
    active: &mut [Seq],
    take: &[usize],
    lone: &mut LlamaState,
    batch: &mut BatchScratch,
    lone_logits: &mut Vec<f32>,
) -> crate::Result<Rows> {
    let running: Vec<usize> = (0..active.len()).filter(|&i| take[i] > 0).collect();
    if let [i] = running[..] {
        let s = &mut active[i];
        let prompt = s.prompt();
        let tokens = &s.history[s.pos..s.pos + take[i]];
        let logits = m.forward_on(lone, &mut s.kv, s.pos, tokens, prompt)?;
        lone_logits.clear();
        lone_logits.extend_from_slice(logits);
        return Ok(Rows::Lone);
    }
    let mut segs: Vec<Segment<'_>> = active
        .iter_mut()
        .zip(take)
        .filter(|(_, &n)| n > 0)
        .map(|(s, &n)| Segment {
            logits: s.pos + n == s.history.len(),
            prompt: s.prompt(),
            tokens: &s.history[s.pos..s.pos + n],
            pos: s.pos,
            kv: &mut s.kv,
        })
        .collect();
    m.step(batch, &mut segs);
    Ok(Rows::Batch)
}

/// A step failed: its sequences get the error and leave.
fn fail_step(sh: &Shared, active: &mut Vec<Seq>, take: &[usize], e: Error) {
    let mut i = 0;
    active.retain(|s| {
        let failed = take[i] > 0;
        i += 1;
        if failed {
            let _ = s.req.events.send(Event::Failed(e.clone()));
            sh.budget.release(s.req.kv_bytes);
        }
        !failed
    });
    sh.active.store(active.len(), Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rule of `Pace`: a step beside decodes may add (STALL_FACTOR - 1) decode-steps' time
    /// of prefill, never below MIN_CHUNK tokens nor above the configured chunk.
    #[test]
    fn pace_sizes_chunks_from_measured_costs() {
        let mut p = Pace::default();
        assert_eq!(p.allowance(128), 128, "unmeasured: the configured chunk");
        p.observe(0.1, 8, 0); // a decode-only step of 100 ms
        p.observe(1.0, 0, 50); // 50 prompt tokens alone: 20 ms each
        assert_eq!(
            p.allowance(128),
            MIN_CHUNK,
            "100 ms / 20 ms = 5, raised to the minimum"
        );
        // Steps that prefill beside decodes count only the time beyond a decode step.
        let mut q = Pace::default();
        q.observe(0.5, 8, 0);
        q.observe(0.5 + 10.0 * 0.008, 8, 10);
        assert_eq!(q.allowance(128), 62, "500 ms / 8 ms = 62.5");
        assert_eq!(q.allowance(32), 32, "capped by the configured chunk");
        // Steps of fewer than MIN_CHUNK prompt tokens are too short to time per token.
        let mut r = Pace::default();
        r.observe(0.5, 8, 0);
        r.observe(5.0, 8, 1);
        assert_eq!(r.allowance(128), 128);
    }
}
