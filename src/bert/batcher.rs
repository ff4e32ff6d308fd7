//! Concurrent embedding requests on one model share passes over the weights (issue 12).
//!
//! Leader/follower, no thread of its own: a caller that finds no batch running takes every
//! waiting request (its own included, in arrival order, up to a token budget), embeds them in
//! one call and hands each its vectors; callers that arrive meanwhile wait and form the next
//! batch. One caller with 32 sentences and 8 callers with 4 each then cost about the same.

use crate::{Error, Result};
use std::collections::{HashMap, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Condvar, Mutex, MutexGuard};

/// Most tokens one batch gathers from waiting requests; a single bigger request runs alone.
/// Past a few thousand tokens a pass is compute-bound, so bigger batches gain nothing and only
/// make the requests behind them wait.
const BATCH_TOKENS: usize = 8192;

type Seqs = Vec<Vec<u32>>;
type Vectors = Vec<Vec<f32>>;

#[derive(Default)]
struct State {
    /// Requests not yet taken by a leader, oldest first.
    waiting: VecDeque<(u64, Seqs)>,
    /// A leader is embedding a batch now.
    running: bool,
    next_id: u64,
    /// Results not yet picked up by their callers.
    done: HashMap<u64, Result<Vectors>>,
}

#[derive(Default)]
pub(crate) struct Batcher {
    state: Mutex<State>,
    wake: Condvar,
}

impl Batcher {
    /// The vectors of `seqs` (one per sequence), computed by `run` together with whatever other
    /// requests are waiting. `run` must give each sequence a vector that does not depend on
    /// the other sequences of the call (true of the packed BERT forward).
    pub(crate) fn embed(
        &self,
        seqs: Seqs,
        run: impl Fn(&[Vec<u32>]) -> Result<Vectors>,
    ) -> Result<Vectors> {
        let mut st = lock(&self.state);
        let id = st.next_id;
        st.next_id += 1;
        st.waiting.push_back((id, seqs));
        loop {
            if let Some(r) = st.done.remove(&id) {
                return r;
            }
            if st.running {
                st = self.wake.wait(st).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            // Lead the next batch (it may not include this request if older ones fill it).
            st.running = true;
            let mut batch = Vec::new();
            let mut tokens = 0;
            while let Some((_, s)) = st.waiting.front() {
                let t: usize = s.iter().map(Vec::len).sum();
                if !batch.is_empty() && tokens + t > BATCH_TOKENS {
                    break;
                }
                tokens += t;
                batch.extend(st.waiting.pop_front());
            }
            drop(st);
            let results = run_batch(&batch, &run);
            st = lock(&self.state);
            for ((id, _), r) in batch.iter().zip(results) {
                st.done.insert(*id, r);
            }
            st.running = false;
            self.wake.notify_all();
        }
    }
}

/// One `run` over all the batch's sequences, split back per request. A panic becomes an error
/// for every request of the batch (and never leaves `running` set, which would hang them all).
fn run_batch(
    batch: &[(u64, Seqs)],
    run: &impl Fn(&[Vec<u32>]) -> Result<Vectors>,
) -> Vec<Result<Vectors>> {
    let all: Seqs = batch.iter().flat_map(|(_, s)| s.iter().cloned()).collect();
    let out = catch_unwind(AssertUnwindSafe(|| run(&all)))
        .unwrap_or_else(|_| Err(Error::internal("the engine failed while embedding a batch")));
    match out {
        Ok(vectors) if vectors.len() == all.len() => {
            let mut it = vectors.into_iter();
            batch
                .iter()
                .map(|(_, s)| Ok(it.by_ref().take(s.len()).collect()))
                .collect()
        }
        Ok(vectors) => {
            let e = Error::internal(format!(
                "embedding a batch gave {} vectors for {} inputs",
                vectors.len(),
                all.len()
            ));
            batch.iter().map(|_| Err(e.clone())).collect()
        }
        Err(e) => batch.iter().map(|_| Err(e.clone())).collect(),
    }
}

/// A poisoned lock only means a caller panicked outside `run`; the queue itself is sound.
fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Barrier;

    /// A fake embedder: each sequence's "vector" is its ids as floats; records the most
    /// sequences one call saw.
    fn fake(most: &AtomicUsize) -> impl Fn(&[Vec<u32>]) -> Result<Vectors> + '_ {
        move |seqs| {
            most.fetch_max(seqs.len(), Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(100));
            Ok(seqs
                .iter()
                .map(|s| s.iter().map(|&x| x as f32).collect())
                .collect())
        }
    }

    #[test]
    fn concurrent_requests_share_calls_and_each_gets_its_own_vectors() {
        let b = Batcher::default();
        let calls = AtomicUsize::new(0);
        let go = Barrier::new(8);
        std::thread::scope(|sc| {
            for i in 0..8u32 {
                let (b, calls, go) = (&b, &calls, &go);
                sc.spawn(move || {
                    go.wait();
                    let seqs: Seqs = (0..4).map(|j| vec![i, j, 7]).collect();
                    let out = b.embed(seqs.clone(), fake(calls)).unwrap();
                    let want: Vectors = seqs
                        .iter()
                        .map(|s| s.iter().map(|&x| x as f32).collect())
                        .collect();
                    assert_eq!(out, want);
                });
            }
        });
        // Each call takes 100 ms: the first request leads, the others arrive meanwhile and
        // are embedded together in the next call (or the first, if they came in time).
        let most = calls.load(Ordering::SeqCst);
        assert!(
            most >= 8,
            "no call held two requests (at most {most} sequences)"
        );
    }

    #[test]
    fn a_panicking_run_is_an_error_and_the_next_request_works() {
        let b = Batcher::default();
        let e = b
            .embed(vec![vec![1]], |_| -> Result<Vectors> { panic!("boom") })
            .unwrap_err();
        assert_eq!(e.cause(), Some(crate::Cause::Internal));
        let calls = AtomicUsize::new(0);
        assert_eq!(
            b.embed(vec![vec![2]], fake(&calls)).unwrap(),
            vec![vec![2.0]]
        );
    }
}
