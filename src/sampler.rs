//! Token sampling with Spin's semantics (contract §4): repeat penalty, temperature, top-k, top-p,
//! and a draw from a seeded PRNG.
//!
//! Order, as Spin's candle backend (and transformers) do it:
//! 1. Repeat penalty (CTRL form), in every mode, greedy included, on each *distinct* token
//!    among the last `n` tokens of prompt + generated: `logit >= 0 ? logit / p : logit * p`.
//!    `p == 1` or `n == 0`: none.
//! 2. `temperature <= 0`: greedy — argmax of the penalised logits, the first maximum on ties.
//!    No randomness.
//! 3. `softmax(logits / T)` over the whole vocabulary.
//! 4. Keep the `k` most likely tokens (`k == 0` or `k >= vocab`: all).
//! 5. Among those, in descending probability, keep the smallest prefix whose cumulative
//!    probability (of the full softmax, as candle computes it) reaches `top_p`; at least one
//!    token. `top_p >= 1`: no cut.
//! 6. Renormalise what is kept and draw with [`Rng`] (xoshiro256**, seeded by splitmix64).
//!
//! All buffers live in [`Sampler`] and are reused: no allocation per token.

use crate::{Error, InferencingParams, Result};
use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// splitmix64: turns any 64-bit seed into well-mixed state words (Vigna's recommended seeder).
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// xoshiro256** (Blackman & Vigna): small, fast, and good enough for sampling.
#[derive(Clone, Debug)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    pub fn new(seed: u64) -> Rng {
        let mut sm = seed;
        let s = [
            splitmix64(&mut sm),
            splitmix64(&mut sm),
            splitmix64(&mut sm),
            splitmix64(&mut sm),
        ];
        // splitmix64 never yields four zero words in a row, so the state is never all-zero.
        Rng { s }
    }

    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// A fresh seed for a request that did not fix one: std's randomly keyed `RandomState` hashes a
/// process-wide counter and the time, so concurrent requests get different seeds.
pub fn fresh_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    h.write_u128(nanos);
    h.finish()
}

/// Checks the parameters the sampler cannot give a meaning to. The message names the value and
/// says why. (`max_tokens`, `top_k` and the penalty window accept every value.)
pub fn validate(params: &InferencingParams) -> Result<()> {
    let t = params.temperature;
    if !t.is_finite() {
        return Err(Error::invalid(format!(
            "temperature {t} is not a finite number (use a value <= 0 for greedy decoding)"
        )));
    }
    let p = params.repeat_penalty;
    if !p.is_finite() || p <= 0.0 {
        return Err(Error::invalid(format!(
            "repeat_penalty {p} must be a finite number greater than 0 (1 disables the penalty)"
        )));
    }
    let top_p = params.top_p;
    if !top_p.is_finite() || top_p < 0.0 {
        return Err(Error::invalid(format!(
            "top_p {top_p} must be a finite number >= 0 (values >= 1 disable the cut)"
        )));
    }
    Ok(())
}

/// Picks the next token from a logits vector. One per request; reuses its buffers.
pub struct Sampler {
    temperature: f32,
    top_k: usize,
    top_p: f32,
    repeat_penalty: f32,
    last_n: usize,
    /// OpenAI's additive penalties (0 = off), over the same window as the repeat penalty.
    frequency_penalty: f32,
    presence_penalty: f32,
    rng: Rng,
    /// (vocab,) penalised logits, then probabilities.
    probs: Vec<f32>,
    /// (vocab,) candidate token ids; a prefix of it is the kept set.
    idx: Vec<u32>,
    /// (<= last_n,) the window's tokens, sorted.
    recent: Vec<u32>,
    /// (top_k,) min-heap of (probability bits, Reverse(id)) for small top-k.
    heap: BinaryHeap<Reverse<(u32, Reverse<u32>)>>,
    kernels: &'static spinfer_kernels::Kernels,
}

/// Up to this k, top-k uses a heap scan; above it, a partition of all ids.
const HEAP_TOP_K: usize = 256;

impl Sampler {
    /// Validates `params` (see [`validate`]) and seeds the RNG.
    pub fn new(params: &InferencingParams, seed: u64) -> Result<Sampler> {
        validate(params)?;
        Ok(Sampler {
            temperature: params.temperature,
            top_k: params.top_k as usize,
            top_p: params.top_p,
            repeat_penalty: params.repeat_penalty,
            last_n: params.repeat_penalty_last_n_token_count as usize,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            rng: Rng::new(seed),
            probs: Vec::new(),
            idx: Vec::new(),
            recent: Vec::new(),
            heap: BinaryHeap::new(),
            kernels: crate::kernels()?,
        })
    }

    /// Adds OpenAI's `frequency_penalty` and `presence_penalty` (each in [-2, 2], as OpenAI
    /// allows): a token seen `count` > 0 times in the window loses `frequency × count +
    /// presence` from its logit, after the repeat penalty (llama.cpp's order).
    pub fn with_openai_penalties(mut self, frequency: f32, presence: f32) -> Result<Sampler> {
        for (name, v) in [
            ("frequency_penalty", frequency),
            ("presence_penalty", presence),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return Err(Error::invalid(format!(
                    "{name} {v} must be a number between -2 and 2"
                )));
            }
        }
        self.frequency_penalty = frequency;
        self.presence_penalty = presence;
        Ok(self)
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }

    /// The next token given the logits of the last position and the tokens so far
    /// (prompt + generated, oldest first). Ids outside the vocabulary in `history` are ignored.
    /// Panics only if `logits` is empty.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        assert!(!logits.is_empty(), "sampler: empty logits");
        // The penalty comes first in every mode, greedy included, as in Spin (candle's
        // `apply_repeat_penalty` before argmax) and transformers (contract §4).
        if self.is_greedy() && !self.penalizes() {
            return argmax(logits) as u32;
        }
        let v = logits.len();
        self.probs.clear();
        self.probs.extend_from_slice(logits);
        self.apply_repeat_penalty(history);
        if self.is_greedy() {
            return argmax(&self.probs) as u32;
        }

        // softmax(logits / T) over the whole vocabulary, in place.
        let inv_t = 1.0 / self.temperature;
        self.kernels.scale(&mut self.probs, inv_t);
        self.kernels.softmax(&mut self.probs);

        let probs = &self.probs;
        let desc = |a: &u32, b: &u32| {
            probs[*b as usize]
                .total_cmp(&probs[*a as usize])
                .then(a.cmp(b))
        };

        // Top-k: the k most likely first (unsorted). A small k scans once with a size-k min-heap
        // (most tokens are rejected by one comparison); a large k partitions all ids.
        let k = if self.top_k == 0 || self.top_k >= v {
            self.idx.clear();
            self.idx.extend(0..v as u32);
            v
        } else if self.top_k <= HEAP_TOP_K {
            top_k_heap(probs, self.top_k, &mut self.heap, &mut self.idx);
            self.top_k
        } else {
            self.idx.clear();
            self.idx.extend(0..v as u32);
            self.idx.select_nth_unstable_by(self.top_k - 1, desc);
            self.top_k
        };

        // Top-p inside the k: sort only the prefix needed to reach the mass.
        let kept = if self.top_p >= 1.0 {
            k
        } else {
            nucleus_len(&mut self.idx[..k], probs, self.top_p as f64)
        };

        // Draw from the kept set, renormalised.
        let kept_ids = &self.idx[..kept];
        let total: f64 = kept_ids.iter().map(|&i| probs[i as usize] as f64).sum();
        let target = self.rng.next_f64() * total;
        let mut acc = 0.0f64;
        for &i in kept_ids {
            acc += probs[i as usize] as f64;
            if target < acc {
                return i;
            }
        }
        // Rounding left the target past the last bucket: take the last kept token.
        kept_ids[kept - 1]
    }

    fn penalizes(&self) -> bool {
        self.last_n > 0
            && (self.repeat_penalty != 1.0
                || self.frequency_penalty != 0.0
                || self.presence_penalty != 0.0)
    }

    fn apply_repeat_penalty(&mut self, history: &[u32]) {
        if !self.penalizes() {
            return;
        }
        let (p, freq, pres) = (
            self.repeat_penalty,
            self.frequency_penalty,
            self.presence_penalty,
        );
        let start = history.len().saturating_sub(self.last_n);
        self.recent.clear();
        self.recent.extend_from_slice(&history[start..]);
        self.recent.sort_unstable();
        // Each distinct token once for the repeat penalty; its count for the frequency penalty.
        for run in self.recent.chunk_by(|a, b| a == b) {
            if let Some(l) = self.probs.get_mut(run[0] as usize) {
                *l = if *l >= 0.0 { *l / p } else { *l * p };
                *l -= freq * run.len() as f32 + pres;
            }
        }
    }
}

/// The ids of the `k` most likely tokens (ties: lower id first), unsorted, into `out`.
/// Probabilities are >= 0, so their f32 bit patterns order like the values.
fn top_k_heap(
    probs: &[f32],
    k: usize,
    heap: &mut BinaryHeap<Reverse<(u32, Reverse<u32>)>>,
    out: &mut Vec<u32>,
) {
    heap.clear();
    for (i, &p) in probs.iter().enumerate() {
        let key = (p.to_bits(), Reverse(i as u32));
        if heap.len() < k {
            heap.push(Reverse(key));
        } else if let Some(mut min) = heap.peek_mut() {
            if key > min.0 {
                *min = Reverse(key);
            }
        }
    }
    out.clear();
    out.extend(heap.drain().map(|Reverse((_, Reverse(i)))| i));
}

/// Index of the first maximum (NaN never wins over a number).
pub fn argmax(xs: &[f32]) -> usize {
    let mut best = 0;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &x) in xs.iter().enumerate() {
        if x > best_v {
            best = i;
            best_v = x;
        }
    }
    best
}

/// Sorts the head of `ids` by descending probability far enough to hold the smallest prefix whose
/// cumulative probability reaches `top_p`, and returns that prefix's length (>= 1). Grows the
/// sorted window geometrically, so a peaked distribution costs one partition of a small window
/// instead of a sort of the whole vocabulary.
fn nucleus_len(ids: &mut [u32], probs: &[f32], top_p: f64) -> usize {
    let n = ids.len();
    let desc = |a: &u32, b: &u32| {
        probs[*b as usize]
            .total_cmp(&probs[*a as usize])
            .then(a.cmp(b))
    };
    let mut sorted = 0; // ids[..sorted] are the `sorted` most likely, in order.
    let mut cum = 0.0f64;
    let mut window = 64.min(n);
    loop {
        if window < n {
            ids[sorted..].select_nth_unstable_by(window - sorted - 1, desc);
        }
        ids[sorted..window].sort_unstable_by(desc);
        for j in sorted..window {
            cum += probs[ids[j] as usize] as f64;
            if cum >= top_p {
                return j + 1;
            }
        }
        sorted = window;
        if window == n {
            // Rounding kept the sum under top_p: everything is kept.
            return n;
        }
        window = (window * 4).min(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(t: f32, k: u32, p: f32, pen: f32, n: u32) -> InferencingParams {
        InferencingParams {
            max_tokens: 10,
            repeat_penalty: pen,
            repeat_penalty_last_n_token_count: n,
            temperature: t,
            top_k: k,
            top_p: p,
        }
    }

    #[test]
    fn rng_is_deterministic_and_seed_dependent() {
        let a: Vec<u64> = {
            let mut r = Rng::new(42);
            (0..8).map(|_| r.next_u64()).collect()
        };
        let b: Vec<u64> = {
            let mut r = Rng::new(42);
            (0..8).map(|_| r.next_u64()).collect()
        };
        let c: Vec<u64> = {
            let mut r = Rng::new(43);
            (0..8).map(|_| r.next_u64()).collect()
        };
        assert_eq!(a, b);
        assert_ne!(a, c);
        let mut r = Rng::new(0);
        for _ in 0..10_000 {
            let x = r.next_f64();
            assert!((0.0..1.0).contains(&x));
        }
    }

    #[test]
    fn rng_mean_is_one_half() {
        // Mean of 1e6 U(0,1) draws: std 1/sqrt(12e6) ≈ 2.9e-4; allow 5 sigma.
        let mut r = Rng::new(7);
        let n = 1_000_000;
        let m: f64 = (0..n).map(|_| r.next_f64()).sum::<f64>() / n as f64;
        assert!((m - 0.5).abs() < 5.0 * 2.9e-4, "mean {m}");
    }

    #[test]
    fn fresh_seeds_differ() {
        let a = fresh_seed();
        let b = fresh_seed();
        assert_ne!(a, b);
    }

    #[test]
    fn greedy_picks_first_max_of_the_penalised_logits() {
        let logits = [1.0, 3.0, -2.0, 3.0, 0.5];
        for t in [0.0, -1.0] {
            // No penalty: the first of the tied maxima.
            let mut s = Sampler::new(&params(t, 40, 0.9, 1.0, 64), 1).unwrap();
            assert!(s.is_greedy());
            assert_eq!(s.sample(&logits, &[1, 1, 1]), 1);
            // Penalty 2 on token 1 (in the history): 3.0 / 2 < 3.0, so token 3 wins.
            let mut s = Sampler::new(&params(t, 40, 0.9, 2.0, 64), 1).unwrap();
            assert_eq!(s.sample(&logits, &[1, 1, 1]), 3);
            // Outside the last n = 1 tokens, token 1 is not penalised.
            let mut s = Sampler::new(&params(t, 40, 0.9, 2.0, 1), 1).unwrap();
            assert_eq!(s.sample(&logits, &[1, 4]), 1);
        }
        assert_eq!(argmax(&[f32::NAN, 0.0, -1.0]), 1);
        assert_eq!(argmax(&[-5.0]), 0);
    }

    #[test]
    fn openai_penalties_subtract_count_times_frequency_plus_presence() {
        // Logits [3.0, 2.5, 1.0]; the window has token 0 twice and token 1 once.
        let logits = [3.0, 2.5, 1.0];
        let pick = |f: f32, pres: f32, hist: &[u32]| {
            Sampler::new(&params(0.0, 40, 0.9, 1.0, 64), 1)
                .unwrap()
                .with_openai_penalties(f, pres)
                .unwrap()
                .sample(&logits, hist)
        };
        let hist = [0, 1, 0];
        // f 0.2, p 0.1: [3.0 - 0.5, 2.5 - 0.3, 1.0] = [2.5, 2.2, 1.0] → 0.
        assert_eq!(pick(0.2, 0.1, &hist), 0);
        // f 0.6, p 0.1: [3.0 - 1.3, 2.5 - 0.7, 1.0] = [1.7, 1.8, 1.0] → 1 (the count matters).
        assert_eq!(pick(0.6, 0.1, &hist), 1);
        // p 1.6 alone does not count repeats: [1.4, 0.9, 1.0] → 0.
        assert_eq!(pick(0.0, 1.6, &hist), 0);
        // f 1.0: [1.0, 1.5, 1.0] → 1.
        assert_eq!(pick(1.0, 0.0, &hist), 1);
        // Negative presence encourages a seen token: only token 1 seen, [3.0, 4.5, 1.0] → 1.
        assert_eq!(pick(0.0, -2.0, &[1]), 1);
        // Outside the window (last n = 64 here, so use an empty history): no change → 0.
        assert_eq!(pick(2.0, 2.0, &[]), 0);
        // Out of OpenAI's range: invalid-input naming the value.
        for (f, pres) in [(2.5, 0.0), (0.0, -2.1), (f32::NAN, 0.0)] {
            let e = Sampler::new(&params(0.0, 40, 0.9, 1.0, 64), 1)
                .unwrap()
                .with_openai_penalties(f, pres)
                .err()
                .unwrap();
            assert!(matches!(e, Error::InvalidInput(ref m) if m.contains("between -2 and 2")));
        }
    }

    #[test]
    fn top_k_one_is_greedy_on_penalised_logits() {
        // Logits [2.0, 1.9, -1.0]; penalty 2 on token 0: 2.0 / 2 = 1.0 < 1.9, so token 1 wins.
        // Negative logits are multiplied: token 2 in history → -2.0, still last.
        let logits = [2.0, 1.9, -1.0];
        let mut s = Sampler::new(&params(0.7, 1, 1.0, 2.0, 64), 9).unwrap();
        for _ in 0..100 {
            assert_eq!(s.sample(&logits, &[0, 2]), 1);
        }
        // Without the token in the last n=1 tokens, no penalty: token 0 wins.
        let mut s = Sampler::new(&params(0.7, 1, 1.0, 2.0, 1), 9).unwrap();
        assert_eq!(s.sample(&logits, &[0, 2]), 0);
        // n = 0 or p = 1: no penalty.
        let mut s = Sampler::new(&params(0.7, 1, 1.0, 2.0, 0), 9).unwrap();
        assert_eq!(s.sample(&logits, &[0]), 0);
        let mut s = Sampler::new(&params(0.7, 1, 1.0, 1.0, 64), 9).unwrap();
        assert_eq!(s.sample(&logits, &[0]), 0);
    }

    #[test]
    fn penalty_counts_distinct_tokens_once() {
        // Token 0 appears 3 times: divided once (4.0 / 2 = 2.0), not three times (0.5).
        // Logits [4.0, 1.5]: after one division 2.0 > 1.5 → token 0 under top-k 1.
        let mut s = Sampler::new(&params(1.0, 1, 1.0, 2.0, 64), 3).unwrap();
        assert_eq!(s.sample(&[4.0, 1.5], &[0, 0, 0]), 0);
        // Penalty < 1 boosts: [1.0, 1.5] with p = 0.5 on token 0 → 2.0 > 1.5.
        let mut s = Sampler::new(&params(1.0, 1, 1.0, 0.5, 64), 3).unwrap();
        assert_eq!(s.sample(&[1.0, 1.5], &[0]), 0);
        // Ids outside the vocabulary in the history are ignored.
        let mut s = Sampler::new(&params(1.0, 1, 1.0, 2.0, 64), 3).unwrap();
        assert_eq!(s.sample(&[1.0, 1.5], &[99]), 1);
    }

    #[test]
    fn top_p_cut_by_hand() {
        // probs = softmax([ln 0.5, ln 0.3, ln 0.15, ln 0.05]) = [0.5, 0.3, 0.15, 0.05] at T = 1.
        // top_p 0.5: cumulative 0.5 >= 0.5 after token 0 → {0}: always 0.
        // top_p 0.6: 0.5 < 0.6, 0.8 >= 0.6 → {0, 1}: token 2, 3 never drawn.
        // top_p 0.0: at least one token → {0}.
        let logits = [0.5f32.ln(), 0.3f32.ln(), 0.15f32.ln(), 0.05f32.ln()];
        for (p, allowed) in [(0.5, vec![0u32]), (0.6, vec![0, 1]), (0.0, vec![0])] {
            let mut s = Sampler::new(&params(1.0, 0, p, 1.0, 64), 5).unwrap();
            let mut seen = [false; 4];
            for _ in 0..2000 {
                let t = s.sample(&logits, &[]);
                assert!(allowed.contains(&t), "top_p {p}: drew {t}");
                seen[t as usize] = true;
            }
            for &a in &allowed {
                assert!(seen[a as usize], "top_p {p}: never drew {a}");
            }
        }
    }

    #[test]
    fn fixed_seed_is_reproducible() {
        let logits: Vec<f32> = (0..100).map(|i| ((i * 37) % 23) as f32 * 0.3).collect();
        let draw = |seed| {
            let mut s = Sampler::new(&InferencingParams::default(), seed).unwrap();
            (0..50)
                .map(|_| s.sample(&logits, &[3, 4]))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(11), draw(11));
        assert_ne!(draw(11), draw(12));
    }

    #[test]
    fn validation_rejects_meaningless_values() {
        let ok = InferencingParams::default();
        assert!(validate(&ok).is_ok());
        let cases: Vec<(InferencingParams, &str)> = vec![
            (
                InferencingParams {
                    temperature: f32::NAN,
                    ..ok
                },
                "temperature NaN",
            ),
            (
                InferencingParams {
                    temperature: f32::INFINITY,
                    ..ok
                },
                "temperature inf",
            ),
            (
                InferencingParams {
                    repeat_penalty: 0.0,
                    ..ok
                },
                "repeat_penalty 0",
            ),
            (
                InferencingParams {
                    repeat_penalty: -1.1,
                    ..ok
                },
                "repeat_penalty -1.1",
            ),
            (
                InferencingParams {
                    repeat_penalty: f32::NAN,
                    ..ok
                },
                "repeat_penalty NaN",
            ),
            (InferencingParams { top_p: -0.1, ..ok }, "top_p -0.1"),
            (
                InferencingParams {
                    top_p: f32::INFINITY,
                    ..ok
                },
                "top_p inf",
            ),
        ];
        for (p, what) in cases {
            match validate(&p) {
                Err(Error::InvalidInput(m)) => {
                    let (name, value) = what.split_once(' ').unwrap();
                    assert!(m.starts_with(name), "{m}");
                    assert!(m.contains(value), "{m}");
                }
                other => panic!("{what}: {other:?}"),
            }
            assert!(Sampler::new(&p, 0).is_err());
        }
        // Documented results rather than errors: negative temperature = greedy, top_p 0 and
        // top_p > 1 are accepted, top_k 0 = off, max_tokens 0 is the engine's business.
        for p in [
            InferencingParams {
                temperature: -3.0,
                ..ok
            },
            InferencingParams { top_p: 0.0, ..ok },
            InferencingParams { top_p: 7.0, ..ok },
            InferencingParams { top_k: 0, ..ok },
            InferencingParams {
                max_tokens: 0,
                ..ok
            },
        ] {
            assert!(validate(&p).is_ok(), "{p:?}");
        }
    }

    /// The intended distribution, computed independently from the definition in f64 with a full
    /// sort: penalty, softmax(l / T), top-k, top-p on the full-softmax probabilities, renormalise.
    fn reference(
        logits: &[f32],
        history: &[u32],
        t: f64,
        k: usize,
        p: f64,
        pen: f64,
        n: usize,
    ) -> Vec<f64> {
        let mut l: Vec<f64> = logits.iter().map(|&x| x as f64).collect();
        if pen != 1.0 && n > 0 {
            let start = history.len().saturating_sub(n);
            let mut d: Vec<u32> = history[start..].to_vec();
            d.sort();
            d.dedup();
            for t in d {
                let x = &mut l[t as usize];
                *x = if *x >= 0.0 { *x / pen } else { *x * pen };
            }
        }
        let m = l.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = l.iter().map(|x| ((x - m) / t).exp()).collect();
        let z: f64 = e.iter().sum();
        let probs: Vec<f64> = e.iter().map(|x| x / z).collect();
        let mut order: Vec<usize> = (0..probs.len()).collect();
        order.sort_by(|&a, &b| probs[b].partial_cmp(&probs[a]).unwrap().then(a.cmp(&b)));
        let k = if k == 0 || k >= probs.len() {
            probs.len()
        } else {
            k
        };
        let mut kept = k;
        if p < 1.0 {
            let mut cum = 0.0;
            for (j, &i) in order[..k].iter().enumerate() {
                cum += probs[i];
                if cum >= p {
                    kept = j + 1;
                    break;
                }
            }
        }
        let mut out = vec![0.0; probs.len()];
        let s: f64 = order[..kept].iter().map(|&i| probs[i]).sum();
        for &i in &order[..kept] {
            out[i] = probs[i] / s;
        }
        out
    }

    /// Draws N tokens and compares each token's frequency with the reference probability q.
    /// The count is Binomial(N, q): std = sqrt(N q (1 - q)). We allow 5 std per token (plus one
    /// count for q = 0 tokens, which must never be drawn at all): with ≤ 64 tokens the chance
    /// of a false failure is < 64 * 6e-7.
    fn check_distribution(
        logits: &[f32],
        history: &[u32],
        t: f32,
        k: u32,
        p: f32,
        pen: f32,
        n: u32,
    ) {
        const N: usize = 200_000;
        let q = reference(
            logits, history, t as f64, k as usize, p as f64, pen as f64, n as usize,
        );
        let mut s = Sampler::new(&params(t, k, p, pen, n), 0xC0FFEE ^ k as u64).unwrap();
        let mut counts = vec![0usize; logits.len()];
        for _ in 0..N {
            counts[s.sample(logits, history) as usize] += 1;
        }
        for (i, (&c, &qi)) in counts.iter().zip(&q).enumerate() {
            if qi == 0.0 {
                assert_eq!(
                    c, 0,
                    "token {i} outside the kept set was drawn (T{t} k{k} p{p})"
                );
                continue;
            }
            let expected = N as f64 * qi;
            let std = (N as f64 * qi * (1.0 - qi)).sqrt();
            assert!(
                (c as f64 - expected).abs() <= 5.0 * std + 1.0,
                "token {i}: {c} draws, expected {expected:.1} ± {std:.1} (T{t} k{k} p{p} pen{pen})"
            );
        }
    }

    fn test_logits() -> Vec<f32> {
        // 50 logits with ties, negatives and a spread of magnitudes.
        (0..50)
            .map(|i| ((i * 7919) % 31) as f32 * 0.17 - 2.0)
            .collect()
    }

    #[test]
    fn distribution_plain_softmax() {
        check_distribution(&test_logits(), &[], 1.0, 0, 1.0, 1.0, 64);
    }

    #[test]
    fn distribution_temperature_and_top_k() {
        check_distribution(&test_logits(), &[], 0.7, 5, 1.0, 1.0, 64);
        check_distribution(&test_logits(), &[], 2.5, 12, 1.0, 1.0, 64);
    }

    #[test]
    fn distribution_top_p() {
        check_distribution(&test_logits(), &[], 1.0, 0, 0.5, 1.0, 64);
        check_distribution(&test_logits(), &[], 0.5, 0, 0.9, 1.0, 64);
    }

    #[test]
    fn distribution_spin_defaults_with_penalty() {
        // T 0.8, k 40, p 0.9, penalty 1.1 over the last 64 (history has repeats and negatives).
        let hist: Vec<u32> = (0..80).map(|i| (i * 13 % 50) as u32).collect();
        check_distribution(&test_logits(), &hist, 0.8, 40, 0.9, 1.1, 64);
        check_distribution(&test_logits(), &[3, 3, 17, 40, 1], 1.3, 8, 0.7, 1.8, 3);
    }

    #[test]
    fn top_k_heap_and_partition_keep_the_same_set() {
        // 1000 probabilities with many ties: the heap (k <= 256) and the partition (k > 256)
        // must both keep exactly the k first ids of a full sort (ties: lower id first).
        let probs: Vec<f32> = (0..1000).map(|i| ((i * 7919) % 37) as f32 / 37.0).collect();
        let mut order: Vec<u32> = (0..1000).collect();
        order.sort_by(|&a, &b| {
            probs[b as usize]
                .total_cmp(&probs[a as usize])
                .then(a.cmp(&b))
        });
        let mut heap = BinaryHeap::new();
        let mut out = Vec::new();
        for k in [1, 2, 40, 256] {
            top_k_heap(&probs, k, &mut heap, &mut out);
            out.sort();
            let mut want = order[..k].to_vec();
            want.sort();
            assert_eq!(out, want, "k {k}");
        }
        // Through the sampler, k = 300 (partition) and k = 40 (heap): nothing outside is drawn.
        let logits: Vec<f32> = probs.iter().map(|p| p * 3.0).collect();
        for k in [40u32, 300] {
            let allowed: std::collections::HashSet<u32> =
                order[..k as usize].iter().copied().collect();
            let mut s = Sampler::new(&params(1.0, k, 1.0, 1.0, 0), 2).unwrap();
            for _ in 0..5000 {
                assert!(allowed.contains(&s.sample(&logits, &[])), "k {k}");
            }
        }
    }

    #[test]
    fn nucleus_window_grows_past_64() {
        // 1000 nearly flat logits: top_p 0.9 needs ~900 tokens, so the window grows 64 → 256 →
        // 1000. Compare the kept set with a full sort.
        let logits: Vec<f32> = (0..1000).map(|i| (i % 97) as f32 * 0.001).collect();
        let q = reference(&logits, &[], 1.0, 0, 0.9, 1.0, 0);
        let kept_ref = q.iter().filter(|&&x| x > 0.0).count();
        let mut s = Sampler::new(&params(1.0, 0, 0.9, 1.0, 0), 1).unwrap();
        s.sample(&logits, &[]);
        let probs = s.probs.clone();
        let mut ids: Vec<u32> = (0..1000).collect();
        let kept = nucleus_len(&mut ids, &probs, 0.9);
        assert_eq!(kept, kept_ref);
        for &i in &ids[..kept] {
            assert!(
                q[i as usize] > 0.0,
                "token {i} kept by the sampler, not the reference"
            );
        }
    }
}
