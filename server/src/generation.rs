//! One generation on a blocking thread, its text forwarded to the async side through a bounded
//! channel; stop strings held back so that one split over fragments never leaks; cancelled
//! when the client goes away or the request timeout passes.

use crate::http::{Failure, RequestLog};
use crate::State;
use spinfer::{FinishReason, GenerateOptions, InferencingUsage};
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// Why the text ended, in OpenAI's terms plus the two ways it can be cut short.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// End of sequence or a stop string.
    Stop,
    /// `max_tokens`, or the context is full.
    Length,
    /// The request timeout passed.
    Timeout,
    /// The client went away.
    Gone,
}

impl Finish {
    pub fn openai(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length | Finish::Timeout | Finish::Gone => "length",
        }
    }
}

pub struct Outcome {
    /// The whole text, cut before a stop string.
    pub text: String,
    pub usage: InferencingUsage,
    pub finish: Finish,
}

/// The prompt as given, or a conversation to render through the model's chat template (on the
/// blocking thread: it may load the model).
pub enum Prompt {
    Text(String),
    Chat(Vec<spinfer::ChatMessage>),
}

pub enum Event {
    /// Text that can be sent (never part of a stop string).
    Text(String),
    Done(Result<Outcome, Failure>),
}

/// Sets the cancel flag when dropped: held by whatever is waiting for the events (the handler,
/// or the task feeding the response stream), so a client that goes away stops the generation.
pub struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Queue depth of the event channel: a slow reader holds back the generation instead of
/// buffering text without bound.
const CHANNEL: usize = 32;

/// Starts `prompt` on `model`: waits for an engine slot (or fails with 503 when the queue is
/// full), then runs on a blocking thread. `stream`: send the text as it comes, else only `Done`.
pub async fn start(
    state: &Arc<State>,
    log: &RequestLog,
    model: String,
    prompt: Prompt,
    mut opts: GenerateOptions,
    stops: Vec<String>,
    stream: bool,
) -> Result<(mpsc::Receiver<Event>, CancelOnDrop), Failure> {
    let slot = state.slot().await?;
    let cancel = Arc::new(AtomicBool::new(false));
    opts.cancel = Some(Arc::clone(&cancel));
    let timed_out = Arc::new(AtomicBool::new(false));
    let (done_tx, done_rx) = oneshot::channel::<()>();
    {
        let (cancel, timed_out) = (Arc::clone(&cancel), Arc::clone(&timed_out));
        let limit = state.cfg.request_timeout;
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(limit) => {
                    timed_out.store(true, Ordering::SeqCst);
                    cancel.store(true, Ordering::SeqCst);
                }
                _ = done_rx => {}
            }
        });
    }
    let (tx, rx) = mpsc::channel(CHANNEL);
    let engine = Arc::clone(&state.engine);
    let log = log.clone();
    let hold = log.hold();
    let guard = CancelOnDrop(Arc::clone(&cancel));
    tokio::task::spawn_blocking(move || {
        let _hold = hold;
        let _done = done_tx;
        let metrics = log.metrics();
        metrics.active.fetch_add(1, Ordering::SeqCst);
        let mut filter = StopFilter::new(stops);
        let mut first = true;
        let prompt = match prompt {
            Prompt::Text(p) => Ok(p),
            Prompt::Chat(msgs) => engine.chat_prompt(&model, &msgs),
        };
        let r = prompt.and_then(|prompt| {
            engine.generate(&model, &prompt, &opts, &mut |frag| {
                if first {
                    first = false;
                    log.metrics().first_token(log.elapsed().as_secs_f64());
                }
                let out = filter.push(frag);
                if stream && !out.is_empty() && tx.blocking_send(Event::Text(out)).is_err() {
                    cancel.store(true, Ordering::SeqCst);
                    return ControlFlow::Break(());
                }
                if filter.hit {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            })
        });
        metrics.active.fetch_sub(1, Ordering::SeqCst);
        // The engine's work is over: free the slot before the client can see the end, so a
        // client's next request never finds its own finished one still holding it.
        drop(slot);
        let done = match r {
            Err(e) => Err(Failure::from(e)),
            Ok(g) => {
                let finish = if filter.hit {
                    Finish::Stop
                } else {
                    match g.finish {
                        FinishReason::Eos => Finish::Stop,
                        FinishReason::Length => Finish::Length,
                        FinishReason::Cancelled if timed_out.load(Ordering::SeqCst) => {
                            Finish::Timeout
                        }
                        FinishReason::Cancelled => Finish::Gone,
                    }
                };
                let rest = filter.finish();
                if stream && !rest.is_empty() {
                    let _ = tx.blocking_send(Event::Text(rest));
                }
                log.update(|f| {
                    f.prompt_tokens = Some(g.usage.prompt_token_count);
                    f.completion_tokens = Some(g.usage.generated_token_count);
                    f.finish = Some(match finish {
                        Finish::Stop => "stop",
                        Finish::Length => "length",
                        Finish::Timeout => "timeout",
                        Finish::Gone => "client-gone",
                    });
                    metrics.tokens(f);
                });
                Ok(Outcome {
                    text: filter.text(),
                    usage: g.usage,
                    finish,
                })
            }
        };
        if let Err(f) = &done {
            log.update(|l| l.error = Some(f.message.clone()));
        }
        let _ = tx.blocking_send(Event::Done(done));
    });
    Ok((rx, guard))
}

/// Waits for the end of a non-streamed generation.
pub async fn finish(mut rx: mpsc::Receiver<Event>) -> Result<Outcome, Failure> {
    while let Some(ev) = rx.recv().await {
        if let Event::Done(r) = ev {
            return match r {
                Ok(o) if o.finish == Finish::Timeout => Err(Failure::timeout(
                    "the request timeout passed before the generation finished",
                )),
                r => r,
            };
        }
    }
    Err(Failure::internal(
        "the generation thread ended without a result",
    ))
}

/// Holds back text that could be the start of a stop string; cuts at the first stop string.
pub struct StopFilter {
    stops: Vec<String>,
    acc: String,
    /// `acc[..sent]` has been released.
    sent: usize,
    /// A stop string was found; `acc` was cut before it.
    pub hit: bool,
}

impl StopFilter {
    pub fn new(stops: Vec<String>) -> StopFilter {
        StopFilter {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            acc: String::new(),
            sent: 0,
            hit: false,
        }
    }

    /// Adds a fragment; returns the text that is now safe to release.
    pub fn push(&mut self, frag: &str) -> String {
        if self.hit {
            return String::new();
        }
        self.acc.push_str(frag);
        // A stop string cannot start before `sent`: that text was released only once no stop
        // string could start there.
        let tail = &self.acc[self.sent..];
        if let Some(pos) = self
            .stops
            .iter()
            .filter_map(|s| tail.find(s.as_str()))
            .min()
        {
            let out = tail[..pos].to_string();
            self.acc.truncate(self.sent + pos);
            self.sent = self.acc.len();
            self.hit = true;
            return out;
        }
        // Release up to the first position where the rest could still grow into a stop string.
        let hold = tail
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| self.stops.iter().any(|s| s.starts_with(&tail[i..])))
            .unwrap_or(tail.len());
        let out = tail[..hold].to_string();
        self.sent += hold;
        out
    }

    /// The end of the text: whatever was held back (no stop string came).
    pub fn finish(&mut self) -> String {
        let out = self.acc[self.sent..].to_string();
        self.sent = self.acc.len();
        out
    }

    pub fn text(&self) -> String {
        self.acc.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::StopFilter;

    /// Every split of the text into two-byte-ish fragments gives the same released text, and
    /// nothing of a stop string is released.
    #[test]
    fn stop_strings_split_over_fragments() {
        let text = "Hello wor|ld. The END is near END";
        for stop in ["END", "|ld", "near END", "zz"] {
            let expected = match text.find(stop) {
                Some(p) => &text[..p],
                None => text,
            };
            for size in 1..6 {
                let mut f = StopFilter::new(vec![stop.to_string(), "never".into()]);
                let mut out = String::new();
                let chars: Vec<char> = text.chars().collect();
                for chunk in chars.chunks(size) {
                    let frag: String = chunk.iter().collect();
                    let released = f.push(&frag);
                    out.push_str(&released);
                    assert!(!out.contains(stop), "{stop:?} leaked: {out:?}");
                    if f.hit {
                        break;
                    }
                }
                out.push_str(&f.finish());
                assert_eq!(out, expected, "stop {stop:?}, fragments of {size}");
                assert_eq!(f.text(), expected);
            }
        }
    }

    #[test]
    fn held_back_prefix_released_when_it_does_not_complete() {
        let mut f = StopFilter::new(vec!["</s>".into()]);
        assert_eq!(f.push("a</"), "a");
        assert_eq!(f.push("b"), "</b");
        assert_eq!(f.push("é</"), "é");
        assert_eq!(f.finish(), "</");
        assert!(!f.hit);
    }
}
