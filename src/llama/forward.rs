//! The forward pass: a batch of tokens (prefill, matrix-matrix kernels) or a single token
//! (decode, matrix-vector kernels) against a KV cache allocated once per state.

use super::config::LlamaConfig;
use super::kv_cache::{KvCache, KvHead};
use super::model::ModelWeights;
use crate::{Error, Result};
use rayon::prelude::*;
use spinfer_kernels::team::{self, Shared};
use spinfer_kernels::{Kernels, Policy, Precision, Weights, ATT_PAD};

/// Most tokens one pass processes; longer prompts run in chunks of this size so scratch stays
/// bounded (the weights are then streamed once per chunk, which costs little at this size).
pub const MAX_BATCH: usize = 256;

/// Most query rows (tokens × the query heads of one kv head) a prompt's attention takes per
/// pass over a kv head's keys and values: 16 rows of 64-value heads keep the block's
/// scores and queries in L1 while each key and value row is loaded once for all of them.
const ATT_ROWS: usize = 16;

thread_local! {
    /// Prompt attention's per-thread scratch: a work item's gathered queries, their lengths
    /// and their scores (kept between items, so the per-step path allocates nothing).
    static ATT_SCRATCH: std::cell::RefCell<(Vec<f32>, Vec<usize>, Vec<f32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new(), Vec::new())) };
}

/// KV cache and activation scratch for one sequence. Everything is allocated in `new`.
pub struct LlamaState {
    pos: usize,
    batch: usize,
    kv: KvCache,
    x: Vec<f32>,         // (batch, hidden) residual stream
    xn: Vec<f32>,        // (batch, hidden) normed input / projection output
    q: Vec<f32>,         // (batch, n_heads*head_dim)
    k: Vec<f32>,         // (batch, kv_heads*head_dim) new keys, before they go to the cache
    v: Vec<f32>,         // (batch, kv_heads*head_dim) new values, before they go to the cache
    att_heads: Vec<f32>, // (batch, n_heads*head_dim) attention output by kv head (`attention`)
    att: Vec<f32>,       // (batch, n_heads*head_dim) attention output, token-major
    scores: Vec<f32>,    // (n_heads, capacity rounded up to ATT_PAD) decode's attention weights
    gate: Vec<f32>,      // (batch, intermediate)
    up: Vec<f32>,        // (batch, intermediate)
    cos: Vec<f32>,       // (batch, head_dim/2) RoPE cos for the batch's positions
    sin: Vec<f32>,       // (batch, head_dim/2)
    logits: Vec<f32>,    // (vocab) of the last token run
}

impl LlamaState {
    pub(crate) fn new(cfg: &LlamaConfig, capacity: usize) -> LlamaState {
        let capacity = capacity.min(cfg.max_position_embeddings);
        let batch = capacity.clamp(1, MAX_BATCH);
        let (h, qd, kvd) = (cfg.hidden_size, cfg.q_dim(), cfg.kv_dim());
        LlamaState {
            pos: 0,
            batch,
            kv: KvCache::new(
                cfg.num_hidden_layers,
                cfg.num_key_value_heads,
                cfg.head_dim,
                capacity,
            ),
            x: vec![0.0; batch * h],
            xn: vec![0.0; batch * h],
            q: vec![0.0; batch * qd],
            k: vec![0.0; batch * kvd],
            v: vec![0.0; batch * kvd],
            att_heads: vec![0.0; batch * qd],
            att: vec![0.0; batch * qd],
            scores: vec![0.0; cfg.num_attention_heads * capacity.max(1).next_multiple_of(ATT_PAD)],
            gate: vec![0.0; batch * cfg.intermediate_size],
            up: vec![0.0; batch * cfg.intermediate_size],
            cos: vec![0.0; batch * cfg.head_dim / 2],
            sin: vec![0.0; batch * cfg.head_dim / 2],
            logits: vec![0.0; cfg.vocab_size],
        }
    }

    /// Scratch for one sequence at a time whose KV cache lives elsewhere (the batch
    /// scheduler's): no KV of its own, attention rows for up to `max_len` positions. Lend it a
    /// cache with [`LlamaState::with_kv`].
    pub(crate) fn scratch(cfg: &LlamaConfig, max_len: usize) -> LlamaState {
        let mut s = LlamaState::new(cfg, 0);
        s.batch = MAX_BATCH;
        let (h, qd, kvd, inter) = (
            cfg.hidden_size,
            cfg.q_dim(),
            cfg.kv_dim(),
            cfg.intermediate_size,
        );
        let b = MAX_BATCH;
        s.x = vec![0.0; b * h];
        s.xn = vec![0.0; b * h];
        s.q = vec![0.0; b * qd];
        s.k = vec![0.0; b * kvd];
        s.v = vec![0.0; b * kvd];
        s.att_heads = vec![0.0; b * qd];
        s.att = vec![0.0; b * qd];
        s.gate = vec![0.0; b * inter];
        s.up = vec![0.0; b * inter];
        s.cos = vec![0.0; b * cfg.head_dim / 2];
        s.sin = vec![0.0; b * cfg.head_dim / 2];
        s.scores = vec![0.0; cfg.num_attention_heads * max_len.max(1).next_multiple_of(ATT_PAD)];
        s
    }

    /// Runs `f` on this scratch with `kv` (holding `pos` positions) as its cache; returns the
    /// cache, with the positions `f` added, to its owner afterwards (also if `f` fails).
    pub(crate) fn with_kv<T>(
        &mut self,
        kv: &mut KvCache,
        pos: usize,
        f: impl FnOnce(&mut LlamaState) -> T,
    ) -> T {
        std::mem::swap(&mut self.kv, kv);
        self.pos = pos;
        let r = f(self);
        std::mem::swap(&mut self.kv, kv);
        r
    }

    /// Positions already in the KV cache.
    pub fn pos(&self) -> usize {
        self.pos
    }

    /// Most positions this state can hold (the requested capacity, capped at the context).
    pub fn capacity(&self) -> usize {
        self.kv.capacity()
    }

    /// Forget the sequence; the buffers are kept.
    pub fn reset(&mut self) {
        self.pos = 0;
    }

    /// Keep only the first `pos` positions (no-op if there are fewer), e.g. to rerun a decode
    /// step at the same depth; later cache entries are simply overwritten.
    pub fn truncate(&mut self, pos: usize) {
        self.pos = self.pos.min(pos);
    }

    /// Logits of the last token run (vocab).
    pub fn logits(&self) -> &[f32] {
        &self.logits
    }

    /// Most tokens one pass takes.
    pub(crate) fn batch(&self) -> usize {
        self.batch
    }
}

pub(crate) struct Forward<'a> {
    pub cfg: &'a LlamaConfig,
    pub w: &'a ModelWeights,
    pub k: &'static Kernels,
    pub policy: Policy,
    pub inv_freq: &'a [f32], // (head_dim/2)
}

/// Consecutive token rows of one kind in a pass (`end`: one past its last row). A prompt's
/// rows take the rounded precision the model's [`Policy`] allows (AMX tiles for bf16 and
/// block-format weights, or bf16 dots: prefill speed); generated tokens' rows run exact (for
/// block formats: the int8 path), as a lone decode does.
/// The kind is the token's own, never the batch's: a token then computes the same alone, in
/// any prompt chunk, or beside other sequences' tokens (the rounded kernels compute each row
/// on its own). A prompt of one token counts as generated, as `LlamaModel::forward` sees it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Run {
    pub end: usize,
    pub prompt: bool,
}

impl Forward<'_> {
    fn precision(&self, w: Weights<'_>, prompt: bool) -> Precision {
        if prompt {
            self.policy.prompt(w)
        } else {
            Precision::Exact
        }
    }

    /// The precision of a prompt's rows through this model's layer matrices.
    pub fn prompt_precision(&self) -> Precision {
        match self.w.layers.first() {
            Some(lw) => self.policy.prompt(self.w.w(lw.w_up)),
            None => Precision::Exact,
        }
    }

    /// Whether a prompt's rows round anywhere in this model (its matrices and policy).
    pub fn rounds_prompts(&self) -> bool {
        self.prompt_precision() != Precision::Exact
    }

    /// y = x Wᵀ for the rows of `runs` (x `(n, k)`, y `(n, m)`, n the last run's end), each
    /// run at its kind's precision; neighbouring runs of one precision share a call, and a
    /// lone exact row is a matrix-vector product.
    fn matmul(&self, w: Weights<'_>, x: &[f32], runs: &[Run], y: &mut [f32]) {
        let n = runs.last().map_or(0, |r| r.end);
        let (k, m) = (x.len() / n, y.len() / n);
        let mut start = 0;
        for (i, r) in runs.iter().enumerate() {
            let p = self.precision(w, r.prompt);
            if runs
                .get(i + 1)
                .is_some_and(|next| self.precision(w, next.prompt) == p)
            {
                continue;
            }
            let (x, y) = (&x[start * k..r.end * k], &mut y[start * m..r.end * m]);
            self.k.matmul_with(p, w, x, r.end - start, y);
            start = r.end;
        }
    }

    /// Whether a single row of this kind may take the fused matrix-vector products.
    fn exact_row(&self, runs: &[Run], ws: &[Weights<'_>]) -> bool {
        matches!(runs, [r] if r.end == 1 && ws.iter().all(|&w| self.precision(w, r.prompt) == Precision::Exact))
    }

    /// Check a request before touching the state.
    pub fn check(&self, state: &LlamaState, tokens: &[u32]) -> Result<()> {
        if tokens.is_empty() {
            return Err(Error::invalid("no tokens to run"));
        }
        let end = state.pos + tokens.len();
        if end > self.cfg.max_position_embeddings {
            return Err(Error::invalid(format!(
                "{} tokens at position {} exceed the model's context of {} tokens",
                tokens.len(),
                state.pos,
                self.cfg.max_position_embeddings
            )));
        }
        if end > state.capacity() {
            return Err(Error::invalid(format!(
                "{} tokens at position {} exceed the KV cache capacity of {} tokens",
                tokens.len(),
                state.pos,
                state.capacity()
            )));
        }
        if let Some(t) = tokens.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
            return Err(Error::invalid(format!(
                "token id {t} is outside the vocabulary of {} tokens",
                self.cfg.vocab_size
            )));
        }
        Ok(())
    }

    /// RoPE cos/sin of positions `p0..p0+n` into `cos`, `sin` (n, head_dim/2): the angle is
    /// f32 (position * inv_freq), as transformers computes it, then cos/sin in f64.
    fn rope_angles(&self, p0: usize, n: usize, cos: &mut [f32], sin: &mut [f32]) {
        let half = self.inv_freq.len();
        for t in 0..n {
            let p = (p0 + t) as f32;
            for (i, &f) in self.inv_freq.iter().enumerate() {
                let a = (p * f) as f64;
                cos[t * half + i] = a.cos() as f32;
                sin[t * half + i] = a.sin() as f32;
            }
        }
    }

    /// RoPE on `x` = (heads, head_dim) at one position, in the model's pairing: halves
    /// (transformers' rotate_half) through the kernels, or adjacent pairs for GGUF's permuted
    /// Q/K rows (a few hundred values per token: a plain loop, same arithmetic per pair).
    fn rope(&self, x: &mut [f32], cos: &[f32], sin: &[f32]) {
        let hd = self.cfg.head_dim;
        if !self.cfg.rope_interleaved {
            return self.k.rope(x, hd, cos, sin);
        }
        for head in x.chunks_exact_mut(hd) {
            for (i, pair) in head.chunks_exact_mut(2).enumerate() {
                let (a, b) = (pair[0], pair[1]);
                pair[0] = a * cos[i] - b * sin[i];
                pair[1] = b * cos[i] + a * sin[i];
            }
        }
    }

    /// Attention of query rows `q` (RoPE applied; `hd` values each) of heads sharing the kv
    /// head `kv`, row r over positions `0..lens[r]`: `out` row r = V softmax(K q_r /
    /// sqrt(head_dim)). `scores` is scratch for (rows, max len rounded up to `ATT_PAD`).
    /// Each key and value row is read once for all the rows, and a row's bits do not depend
    /// on the others (`attn_scores`, `attn_values`): a token's attention is the same however
    /// its prompt was chunked or batched and whether it runs alone. On the calling thread.
    fn attend(
        &self,
        kv: KvHead<'_>,
        q: &[f32],
        lens: &[usize],
        scores: &mut [f32],
        out: &mut [f32],
    ) {
        let k = self.k;
        let hd = self.cfg.head_dim;
        let (n, len) = (lens.len(), lens.iter().copied().max().unwrap_or(0));
        let ld = len.next_multiple_of(ATT_PAD);
        let scores = &mut scores[..n * ld];
        let (kt, stride) = kv.keys();
        k.attn_scores(kt, stride, len, q, n, ld, scores);
        let scale = (hd as f64).powf(-0.5) as f32;
        for (r, &lr) in lens.iter().enumerate() {
            let s = &mut scores[r * ld..r * ld + lr];
            k.scale(s, scale);
            k.softmax(s);
        }
        k.attn_values(kv.values(len), hd, scores, ld, lens, out);
    }

    /// Attention of layer `l` for the tokens of `segs` (each a cache, the position of its
    /// first token and its number of tokens; their queries are consecutive rows of `q`, keys
    /// and values already in the caches) into `att` (tokens, n_heads·hd), with `heads` as
    /// scratch of the same size. Work items are (segment, kv head, block of tokens): the
    /// block's queries of every head sharing the kv head, up to [`ATT_ROWS`] rows, go through
    /// [`Forward::attend`] together, in parallel when there is enough work.
    fn attention(
        &self,
        l: usize,
        segs: &[(&KvCache, usize, usize)],
        q: &[f32],
        heads: &mut [f32],
        att: &mut [f32],
    ) {
        let cfg = self.cfg;
        let (qd, hd, nkv) = (cfg.q_dim(), cfg.head_dim, cfg.num_key_value_heads);
        let group = cfg.num_attention_heads / nkv;
        let tb = (ATT_ROWS / group).max(1);
        // Item outputs are carved from `heads` in order: (segment, kv head, token, head in
        // group, hd).
        let mut items = Vec::new();
        let (mut rest, mut t0, mut work) = (&mut heads[..], 0, 0);
        for &(kv, pos, ns) in segs {
            work += cfg.num_attention_heads * ns * (pos + ns) * hd;
            for g in 0..nkv {
                for b0 in (0..ns).step_by(tb) {
                    let b1 = (b0 + tb).min(ns);
                    let (o, r) = std::mem::take(&mut rest).split_at_mut((b1 - b0) * group * hd);
                    rest = r;
                    items.push((kv, pos, t0, g, b0..b1, o));
                }
            }
            t0 += ns;
        }
        type Item<'a> = (
            &'a KvCache,
            usize,
            usize,
            usize,
            std::ops::Range<usize>,
            &'a mut [f32],
        );
        let one = |(kv, pos, t0, g, b, out): Item<'_>| {
            ATT_SCRATCH.with_borrow_mut(|(qb, lens, scores)| {
                qb.clear();
                lens.clear();
                for i in b.clone() {
                    let t = t0 + i;
                    qb.extend_from_slice(
                        &q[t * qd + g * group * hd..t * qd + (g + 1) * group * hd],
                    );
                    lens.extend(std::iter::repeat_n(pos + i + 1, group));
                }
                scores.resize(lens.len() * (pos + b.end).next_multiple_of(ATT_PAD), 0.0);
                self.attend(kv.head(l, g), qb, lens, scores, out);
            })
        };
        if work >= 1 << 16 && items.len() > 1 {
            items.into_par_iter().for_each(one);
        } else {
            items.into_iter().for_each(one);
        }
        // (segment, kv head, token, head in group, hd) -> (token, n_heads·hd)
        let (mut base, w) = (0, group * hd);
        for &(_, _, ns) in segs {
            for g in 0..nkv {
                for i in 0..ns {
                    let src = base * qd + (g * ns + i) * w;
                    let dst = (base + i) * qd + g * w;
                    att[dst..dst + w].copy_from_slice(&heads[src..src + w]);
                }
            }
            base += ns;
        }
    }

    /// Run `tokens` (at most `state.batch`; a prompt's if `prompt`, see [`Run`]) at positions
    /// `state.pos..` as one batch; leaves the final hidden states in `state.x` and writes the
    /// last token's logits; with `all_logits`, also appends every token's logits there (tests).
    pub fn chunk(
        &self,
        s: &mut LlamaState,
        tokens: &[u32],
        prompt: bool,
        all_logits: Option<&mut Vec<f32>>,
    ) {
        let (cfg, k, n) = (self.cfg, self.k, tokens.len());
        let runs = [Run { end: n, prompt }];
        debug_assert!(n >= 1 && n <= s.batch && s.pos + n <= s.capacity());
        let h = cfg.hidden_size;
        let embed = self.w.w(self.w.embed);
        for (t, &tok) in tokens.iter().enumerate() {
            k.to_f32(embed.row(tok as usize, h), &mut s.x[t * h..(t + 1) * h]);
        }
        self.rope_angles(s.pos, n, &mut s.cos, &mut s.sin);
        for l in 0..self.w.layers.len() {
            self.attn_block(s, l, &runs);
            self.ffn_block(s, l, &runs);
        }

        // Final norm and lm_head: only the last row unless every row's logits were asked for.
        let lm_head = self.w.w(self.w.lm_head);
        let first = if all_logits.is_some() { 0 } else { n - 1 };
        let mut all = all_logits;
        for t in first..n {
            let r = t * h..(t + 1) * h;
            k.rmsnorm(
                &s.x[r.clone()],
                &self.w.norm,
                cfg.rms_norm_eps,
                &mut s.xn[r.clone()],
            );
            k.matvec(lm_head, &s.xn[r], &mut s.logits);
            if let Some(all) = all.as_deref_mut() {
                all.extend_from_slice(&s.logits);
            }
        }
        s.pos += n;
    }

    /// Attention block of layer `l` for the `n` tokens in `s.x` at positions `s.pos..`:
    /// x += Wo · attention(RoPE(Wq xn), cache + RoPE(Wk xn), cache + Wv xn), xn = rmsnorm(x).
    fn attn_block(&self, s: &mut LlamaState, l: usize, runs: &[Run]) {
        let (cfg, k, lw) = (self.cfg, self.k, &self.w.layers[l]);
        let n = runs.last().map_or(0, |r| r.end);
        let (h, qd, kvd, hd) = (cfg.hidden_size, cfg.q_dim(), cfg.kv_dim(), cfg.head_dim);
        let (p0, half) = (s.pos, hd / 2);
        let (x, xn) = (&mut s.x[..n * h], &mut s.xn[..n * h]);
        for t in 0..n {
            let r = t * h..(t + 1) * h;
            k.rmsnorm(&x[r.clone()], &lw.attn_norm, cfg.rms_norm_eps, &mut xn[r]);
        }
        let (q, kn, vn) = (&mut s.q[..n * qd], &mut s.k[..n * kvd], &mut s.v[..n * kvd]);
        let (wq, wk, wv) = (self.w.w(lw.wq), self.w.w(lw.wk), self.w.w(lw.wv));
        if self.exact_row(runs, &[wq, wk, wv]) {
            k.matvecs(&mut [(wq, &mut *q), (wk, &mut *kn), (wv, &mut *vn)], xn);
        } else {
            self.matmul(wq, xn, runs, q);
            self.matmul(wk, xn, runs, kn);
            self.matmul(wv, xn, runs, vn);
        }
        for t in 0..n {
            let (c, sn) = (
                &s.cos[t * half..(t + 1) * half],
                &s.sin[t * half..(t + 1) * half],
            );
            self.rope(&mut q[t * qd..(t + 1) * qd], c, sn);
            self.rope(&mut kn[t * kvd..(t + 1) * kvd], c, sn);
            for g in 0..cfg.num_key_value_heads {
                let r = t * kvd + g * hd..t * kvd + (g + 1) * hd;
                s.kv.head_mut(l, g).write(p0 + t, &kn[r.clone()], &vn[r]);
            }
        }

        let seg = [(&s.kv, p0, n)];
        self.attention(l, &seg, q, &mut s.att_heads[..n * qd], &mut s.att[..n * qd]);
        let att = &s.att[..n * qd];
        self.matmul(self.w.w(lw.wo), att, runs, xn);
        k.add(x, xn);
    }

    /// SwiGLU feed-forward block of layer `l`: x += W_down (silu(W_gate xn) * W_up xn).
    fn ffn_block(&self, s: &mut LlamaState, l: usize, runs: &[Run]) {
        let (h, n) = (self.cfg.hidden_size, runs.last().map_or(0, |r| r.end));
        let (x, xn) = (&mut s.x[..n * h], &mut s.xn[..n * h]);
        self.ffn(l, runs, x, xn, &mut s.gate, &mut s.up);
    }

    /// [`Forward::ffn_block`] on the rows of `runs` in `x`, with `xn`, `gate`, `up` as scratch.
    fn ffn(
        &self,
        l: usize,
        runs: &[Run],
        x: &mut [f32],
        xn: &mut [f32],
        gate: &mut [f32],
        up: &mut [f32],
    ) {
        let (cfg, k, lw) = (self.cfg, self.k, &self.w.layers[l]);
        let (h, inter) = (cfg.hidden_size, cfg.intermediate_size);
        let n = runs.last().map_or(0, |r| r.end);
        let (gate, up) = (&mut gate[..n * inter], &mut up[..n * inter]);
        for t in 0..n {
            let r = t * h..(t + 1) * h;
            k.rmsnorm(&x[r.clone()], &lw.ffn_norm, cfg.rms_norm_eps, &mut xn[r]);
        }
        let (wg, wu) = (self.w.w(lw.w_gate), self.w.w(lw.w_up));
        if self.exact_row(runs, &[wg, wu]) {
            k.matvecs(&mut [(wg, &mut *gate), (wu, &mut *up)], xn);
        } else {
            self.matmul(wg, xn, runs, gate);
            self.matmul(wu, xn, runs, up);
        }
        k.silu_mul(gate, up);
        self.matmul(self.w.w(lw.w_down), gate, runs, xn);
        k.add(x, xn);
    }

    /// One token at position `s.pos` (decode), the whole pass on one [`team`] of threads:
    /// one fork/join per token, spinning barriers between the dependent steps, and the rows of
    /// every matrix shared out between the threads. The same steps as
    /// [`Forward::attn_block`] + [`Forward::ffn_block`] (same kernels, same order, so the
    /// same numbers), which it falls back to where no team can be formed.
    pub fn decode(&self, s: &mut LlamaState, token: u32) -> Result<()> {
        let (cfg, k) = (self.cfg, self.k);
        let (h, qd, kvd, hd) = (cfg.hidden_size, cfg.q_dim(), cfg.kv_dim(), cfg.head_dim);
        let (eps, p0, half) = (cfg.rms_norm_eps, s.pos, hd / 2);
        let group = cfg.num_attention_heads / cfg.num_key_value_heads;
        let len = p0 + 1; // causal: positions 0..=p0

        k.to_f32(self.w.w(self.w.embed).row(token as usize, h), &mut s.x[..h]);
        self.rope_angles(p0, 1, &mut s.cos, &mut s.sin);
        let (cos, sin) = (&s.cos[..half], &s.sin[..half]);
        let layout = s.kv.layout();
        let (k_store, v_store) = s.kv.storage_mut();
        let (k_store, v_store) = (Shared::new(k_store), Shared::new(v_store));
        let x = Shared::new(&mut s.x[..h]);
        let xn = Shared::new(&mut s.xn[..h]);
        let q = Shared::new(&mut s.q[..qd]);
        let kn = Shared::new(&mut s.k[..kvd]);
        let vn = Shared::new(&mut s.v[..kvd]);
        let att = Shared::new(&mut s.att[..qd]);
        let gate = Shared::new(&mut s.gate[..cfg.intermediate_size]);
        let up = Shared::new(&mut s.up[..cfg.intermediate_size]);
        let scores = Shared::new(&mut s.scores);
        let logits = Shared::new(&mut s.logits);
        let row = scores.len() / cfg.num_attention_heads;

        let nkv = cfg.num_key_value_heads;
        let inter = cfg.intermediate_size;
        // Every step below reaches the shared buffers through the team's helpers, which hand
        // each thread disjoint parts (or thread 0 all of them) between two barriers.
        let lens = vec![len; group];
        let ran = team::try_run(|t| {
            for (l, lw) in self.w.layers.iter().enumerate() {
                t.serial([x, xn], |[x, xn]| k.rmsnorm(x, &lw.attn_norm, eps, xn));
                let (wq, wk, wv) = (self.w.w(lw.wq), self.w.w(lw.wk), self.w.w(lw.wv));
                t.matvecs_shared(k, &[(wq, q), (wk, kn), (wv, vn)], xn);

                // The new key (RoPE'd) and value into the cache, by kv head (chunk g of each
                // buffer is kv head g's).
                let layer = layout.range(l, 0).start..layout.range(l, nkv - 1).end;
                let per = layout.range(l, 0).len();
                let bufs = [
                    (k_store.sub(layer.clone()), per),
                    (v_store.sub(layer), per),
                    (kn, hd),
                    (vn, hd),
                ];
                t.share_chunks(nkv, bufs, |_, [kc, vc, kg, vg]| {
                    self.rope(kg, cos, sin);
                    layout.head(kc, vc).write(p0, kg, vg);
                });
                // Then attention by kv head: its query heads together, so its keys and
                // values are read once. (SmolLM2's three kv heads leave one of two threads
                // idle a third of the time, but by query head, reading each kv head three
                // times, decoded slower: at 1024 positions 69-79 tok/s against 72-96.)
                t.share_chunks(
                    nkv,
                    [(q, group * hd), (scores, group * row), (att, group * hd)],
                    |g, [qh, sc, out]| {
                        let r = layout.range(l, g);
                        // SAFETY: nothing writes the cache in this phase (the writes above
                        // ended with its barrier); the outputs are other buffers.
                        let (kc, vc) = unsafe { (&k_store.get()[r.clone()], &v_store.get()[r]) };
                        self.rope(qh, cos, sin);
                        self.attend(layout.head_ref(kc, vc), qh, &lens, sc, out);
                    },
                );
                t.matvecs_shared(k, &[(self.w.w(lw.wo), xn)], att);
                t.serial([x, xn], |[x, xn]| {
                    k.add(x, xn);
                    k.rmsnorm(x, &lw.ffn_norm, eps, xn);
                });

                // SwiGLU feed-forward block.
                let (wg, wu) = (self.w.w(lw.w_gate), self.w.w(lw.w_up));
                t.matvecs_shared(k, &[(wg, gate), (wu, up)], xn);
                const SILU_BLOCK: usize = 1024;
                let blocks = inter.div_ceil(SILU_BLOCK);
                t.share_chunks(
                    blocks,
                    [(gate, SILU_BLOCK), (up, SILU_BLOCK)],
                    |_, [g, u]| k.silu_mul(g, u),
                );
                t.matvecs_shared(k, &[(self.w.w(lw.w_down), xn)], gate);
                t.serial([x, xn], |[x, xn]| k.add(x, xn));
            }
            t.serial([x, xn], |[x, xn]| k.rmsnorm(x, &self.w.norm, eps, xn));
            t.matvecs_shared(k, &[(self.w.w(self.w.lm_head), logits)], xn);
        });
        match ran {
            Ok(true) => s.pos += 1,
            // No team here (see `team::try_run`): the batched path gives the same numbers.
            Ok(false) => self.chunk(s, &[token], false, None),
            Err(e) => return Err(Error::internal(format!("decode failed: {e}"))),
        }
        Ok(())
    }
}

/// One sequence's part of a batched step: `tokens` at positions `pos..` against its own cache.
pub struct Segment<'a> {
    pub kv: &'a mut KvCache,
    pub pos: usize,
    pub tokens: &'a [u32],
    /// Whether its last token's logits are wanted (a decode, or a prompt's last chunk).
    pub logits: bool,
    /// Whether its tokens are a prompt's (of two or more tokens): such rows may round where
    /// the model's policy allows (AMX, bf16 dots), generated tokens' rows run exact.
    pub prompt: bool,
}

/// Activation scratch for batched steps; grows on demand.
#[derive(Default)]
pub struct BatchScratch {
    x: Vec<f32>,
    xn: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    att_heads: Vec<f32>,
    att: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// (segments wanting logits, vocab), in segment order.
    pub(crate) logits: Vec<f32>,
}

impl BatchScratch {
    /// The last step's logits: one vocab-long row per segment that wanted them, in order.
    pub fn logits(&self) -> &[f32] {
        &self.logits
    }

    fn fit(&mut self, cfg: &LlamaConfig, n: usize, out_rows: usize) {
        let (h, qd, kvd, inter) = (
            cfg.hidden_size,
            cfg.q_dim(),
            cfg.kv_dim(),
            cfg.intermediate_size,
        );
        let half = cfg.head_dim / 2;
        for (v, len) in [
            (&mut self.x, n * h),
            (&mut self.xn, n * h),
            (&mut self.q, n * qd),
            (&mut self.k, n * kvd),
            (&mut self.v, n * kvd),
            (&mut self.att_heads, n * qd),
            (&mut self.att, n * qd),
            (&mut self.gate, n * inter),
            (&mut self.up, n * inter),
            (&mut self.cos, n * half),
            (&mut self.sin, n * half),
            (&mut self.logits, out_rows * cfg.vocab_size),
        ] {
            v.resize(len, 0.0);
        }
    }
}

impl Forward<'_> {
    /// One batched step over several sequences (the batch scheduler's): every segment's tokens
    /// go through each weight matrix in one matrix-matrix product (or one per kind of row, see
    /// [`Run`], where the model rounds prompts), attention runs per sequence against its own
    /// cache. The same kernels as [`Forward::chunk`] in the same order per token, at the same
    /// precision, so a token's numbers differ from a lone run only by the exact matmul's
    /// summation order for a different token count. Leaves the logits of segments that want them in
    /// `sc.logits`; the caller advances each sequence's position by its token count.
    pub fn step(&self, sc: &mut BatchScratch, segs: &mut [Segment<'_>]) {
        let (cfg, k) = (self.cfg, self.k);
        let (h, half) = (cfg.hidden_size, cfg.head_dim / 2);
        let n: usize = segs.iter().map(|s| s.tokens.len()).sum();
        let out_rows = segs.iter().filter(|s| s.logits).count();
        sc.fit(cfg, n, out_rows);
        // Rows by kind, neighbouring segments of one kind merged.
        let mut runs: Vec<Run> = Vec::with_capacity(segs.len());
        let mut end = 0;
        for s in segs.iter() {
            end += s.tokens.len();
            match runs.last_mut() {
                Some(r) if r.prompt == s.prompt => r.end = end,
                _ => runs.push(Run {
                    end,
                    prompt: s.prompt,
                }),
            }
        }
        let embed = self.w.w(self.w.embed);
        let mut t = 0;
        for s in segs.iter() {
            debug_assert!(s.pos + s.tokens.len() <= s.kv.capacity());
            for (i, &tok) in s.tokens.iter().enumerate() {
                k.to_f32(embed.row(tok as usize, h), &mut sc.x[t * h..(t + 1) * h]);
                let r = t * half..(t + 1) * half;
                self.rope_angles(s.pos + i, 1, &mut sc.cos[r.clone()], &mut sc.sin[r]);
                t += 1;
            }
        }
        for l in 0..self.w.layers.len() {
            self.step_attn(sc, segs, l, &runs);
            self.ffn(
                l,
                &runs,
                &mut sc.x[..n * h],
                &mut sc.xn[..n * h],
                &mut sc.gate,
                &mut sc.up,
            );
        }
        // Final norm of the rows that want logits, gathered; then lm_head over them at once.
        let mut t = 0;
        let mut row = 0;
        for s in segs.iter() {
            t += s.tokens.len();
            if s.logits {
                let last = (t - 1) * h..t * h;
                k.rmsnorm(
                    &sc.x[last],
                    &self.w.norm,
                    cfg.rms_norm_eps,
                    &mut sc.xn[row * h..(row + 1) * h],
                );
                row += 1;
            }
        }
        if out_rows > 0 {
            // Exact, as the lone path's per-token lm_head matrix-vector products.
            let lm_head = self.w.w(self.w.lm_head);
            let exact = [Run {
                end: out_rows,
                prompt: false,
            }];
            self.matmul(lm_head, &sc.xn[..out_rows * h], &exact, &mut sc.logits);
        }
    }

    /// [`Forward::attn_block`] over the segments of a batched step.
    fn step_attn(&self, sc: &mut BatchScratch, segs: &mut [Segment<'_>], l: usize, runs: &[Run]) {
        let (cfg, k, lw) = (self.cfg, self.k, &self.w.layers[l]);
        let n = runs.last().map_or(0, |r| r.end);
        let (h, qd, kvd, hd) = (cfg.hidden_size, cfg.q_dim(), cfg.kv_dim(), cfg.head_dim);
        let half = hd / 2;
        let (x, xn) = (&mut sc.x[..n * h], &mut sc.xn[..n * h]);
        for t in 0..n {
            let r = t * h..(t + 1) * h;
            k.rmsnorm(&x[r.clone()], &lw.attn_norm, cfg.rms_norm_eps, &mut xn[r]);
        }
        let (q, kn, vn) = (
            &mut sc.q[..n * qd],
            &mut sc.k[..n * kvd],
            &mut sc.v[..n * kvd],
        );
        self.matmul(self.w.w(lw.wq), xn, runs, q);
        self.matmul(self.w.w(lw.wk), xn, runs, kn);
        self.matmul(self.w.w(lw.wv), xn, runs, vn);
        let mut t = 0;
        for s in segs.iter_mut() {
            for i in 0..s.tokens.len() {
                let (c, sn) = (
                    &sc.cos[t * half..(t + 1) * half],
                    &sc.sin[t * half..(t + 1) * half],
                );
                self.rope(&mut q[t * qd..(t + 1) * qd], c, sn);
                self.rope(&mut kn[t * kvd..(t + 1) * kvd], c, sn);
                for g in 0..cfg.num_key_value_heads {
                    let r = t * kvd + g * hd..t * kvd + (g + 1) * hd;
                    s.kv.head_mut(l, g).write(s.pos + i, &kn[r.clone()], &vn[r]);
                }
                t += 1;
            }
        }

        let seg: Vec<_> = segs
            .iter()
            .map(|s| (&*s.kv, s.pos, s.tokens.len()))
            .collect();
        self.attention(
            l,
            &seg,
            q,
            &mut sc.att_heads[..n * qd],
            &mut sc.att[..n * qd],
        );
        let att = &sc.att[..n * qd];
        self.matmul(self.w.w(lw.wo), att, runs, xn);
        k.add(x, xn);
    }
}
