//! Embeddings batching: concurrent `generate_embeddings` calls on one model share forward
//! passes, up to a token budget. No thread of its own: the first caller to find no pass
//! running leads, running passes over everything queued (its own texts among them) until the
//! queue is empty; the others wait for their vectors.

use crate::bert::BertModel;
use crate::{Error, Result};
use std::collections::VecDeque;
use std::sync::mpsc::{channel, Sender};
use std::sync::Mutex;

/// Most tokens the leader gathers from several callers into one call (a single caller's
/// larger request still goes alone; the model splits it into passes of its own).
const BATCH_TOKENS: usize = 2048;

struct Job {
    seqs: Vec<Vec<u32>>,
    tokens: usize,
    done: Sender<Result<Vec<Vec<f32>>>>,
}

#[derive(Default)]
struct State {
    pending: VecDeque<Job>,
    running: bool,
}

#[derive(Default)]
pub(crate) struct EmbedBatcher {
    state: Mutex<State>,
}

impl EmbedBatcher {
    /// The vectors of `seqs` (token ids from [`BertModel::tokenize_all`]), computed in a pass
    /// shared with whatever other callers are waiting.
    pub(crate) fn embed(&self, m: &BertModel, seqs: Vec<Vec<u32>>) -> Result<Vec<Vec<f32>>> {
        let (tx, rx) = channel();
        let tokens = seqs.iter().map(Vec::len).sum();
        let lead = {
            let mut st = super::lock(&self.state);
            st.pending.push_back(Job {
                seqs,
                tokens,
                done: tx,
            });
            !std::mem::replace(&mut st.running, true)
        };
        if lead {
            self.lead(m);
        }
        rx.recv()
            .map_err(|_| Error::internal("the embeddings batch stopped"))?
    }

    /// Runs passes until nobody waits.
    fn lead(&self, m: &BertModel) {
        loop {
            let jobs: Vec<Job> = {
                let mut st = super::lock(&self.state);
                let mut jobs = Vec::new();
                let mut tokens = 0;
                while let Some(j) = st.pending.front() {
                    if !jobs.is_empty() && tokens + j.tokens > BATCH_TOKENS {
                        break;
                    }
                    tokens += j.tokens;
                    jobs.push(st.pending.pop_front().expect("front"));
                }
                if jobs.is_empty() {
                    st.running = false;
                    return;
                }
                jobs
            };
            let all: Vec<Vec<u32>> = jobs.iter().flat_map(|j| j.seqs.iter().cloned()).collect();
            // A panic (a bug) fails this pass's callers, not the ones after them.
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| m.embed_ids(&all)))
                .unwrap_or_else(|_| Err(Error::internal("the engine failed while embedding")));
            match r {
                Ok(mut vecs) => {
                    for j in jobs.into_iter().rev() {
                        let mine = vecs.split_off(vecs.len() - j.seqs.len());
                        let _ = j.done.send(Ok(mine));
                    }
                }
                Err(e) => {
                    for j in jobs {
                        let _ = j.done.send(Err(e.clone()));
                    }
                }
            }
        }
    }
}
