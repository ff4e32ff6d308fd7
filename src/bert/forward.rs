//! The BERT encoder over a packed batch: every sentence's tokens end to end in one
//! `(tokens, hidden)` activation, so each dense layer is one matrix-matrix product over the
//! whole batch, while attention runs per (sentence, head) over that sentence's tokens only.
//! Nothing is padded, so no mask is needed and a vector cannot depend on its batch.

use super::{BertConfig, BertModel};
use crate::{Error, Result};
use rayon::prelude::*;
use spinfer_kernels::{Epilogue, Kernels, Precision, Weights};

/// Activations for up to `cap` packed tokens, kept by the model between calls.
pub(super) struct Scratch {
    cap: usize,
    x: Vec<f32>,    // (tokens, hidden): the hidden states
    tmp: Vec<f32>,  // (tokens, hidden): dense outputs before LayerNorm; the attention context
    qkv: Vec<f32>,  // (tokens, 3 hidden): q, k, v side by side
    qh: Vec<f32>,   // (heads, tokens, head_dim): q per head, scaled by 1/sqrt(head_dim)
    kh: Vec<f32>,   // (heads, tokens, head_dim)
    vt: Vec<f32>,   // (heads, [per sentence (head_dim, len)]): v per head, transposed
    ctxh: Vec<f32>, // (heads, tokens, head_dim): attention output per head
    ffn: Vec<f32>,  // (tokens, intermediate)
}

impl Scratch {
    pub(super) fn new(cfg: &BertConfig, cap: usize) -> Scratch {
        let th = cap * cfg.hidden_size;
        Scratch {
            cap,
            x: vec![0.0; th],
            tmp: vec![0.0; th],
            qkv: vec![0.0; 3 * th],
            qh: vec![0.0; th],
            kh: vec![0.0; th],
            vt: vec![0.0; th],
            ctxh: vec![0.0; th],
            ffn: vec![0.0; cap * cfg.intermediate_size],
        }
    }

    pub(super) fn cap(&self) -> usize {
        self.cap
    }
}

/// Rows per parallel chunk for LayerNorm, and the fewest rows worth splitting.
const ROWS_PER_TASK: usize = 16;
const PAR_ROWS: usize = 64;
/// Fewest attention multiply-adds per product (Σ len² · hidden) worth splitting.
const ATTN_PAR_MIN: usize = 1 << 19;

/// Embed token sequences (each non-empty, at most the window) into L2-normalised vectors.
pub(super) fn forward(m: &BertModel, seqs: &[Vec<u32>], s: &mut Scratch) -> Result<Vec<Vec<f32>>> {
    let kern = m.kern;
    let cfg = &m.cfg;
    let (h, inter, nh, d) = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_attention_heads,
        cfg.head_dim(),
    );
    let lens: Vec<usize> = seqs.iter().map(|q| q.len()).collect();
    let mut offs = Vec::with_capacity(seqs.len()); // first packed row of each sentence
    let mut t = 0;
    for &l in &lens {
        offs.push(t);
        t += l;
    }
    if t == 0 {
        return Ok(Vec::new());
    }
    if t > s.cap
        || lens
            .iter()
            .any(|&l| l == 0 || l > cfg.max_position_embeddings)
    {
        return Err(Error::runtime(format!(
            "bert forward: bad packing ({t} tokens, scratch for {})",
            s.cap
        )));
    }
    let th = t * h;

    // Embeddings: word + position + token type 0, then LayerNorm (into x).
    let word = m.store.data(m.word_emb); // (vocab_size, hidden)
    let pos = m.store.data(m.pos_emb); // (max_position_embeddings, hidden)
    let mut pos_row = vec![0f32; h]; // (hidden)
    for (i, ids) in seqs.iter().enumerate() {
        for (p, &id) in ids.iter().enumerate() {
            let row = &mut s.tmp[(offs[i] + p) * h..(offs[i] + p + 1) * h];
            kern.to_f32(word.row(id as usize, h), row);
            kern.to_f32(pos.row(p, h), &mut pos_row);
            kern.add(row, &pos_row);
            kern.add(row, &m.type0);
        }
    }
    layernorm_rows(
        kern,
        &s.tmp[..th],
        &m.emb_ln_w,
        &m.emb_ln_b,
        cfg,
        &mut s.x[..th],
    );

    let scale = 1.0 / (d as f32).sqrt();
    for layer in &m.layers {
        // Q, K, V: (t, 3 hidden), biases added in the product's epilogue.
        let epi = Epilogue {
            bias: Some(&layer.bqkv),
            ..Epilogue::default()
        };
        kern.matmul_packed(&layer.wqkv, &s.x[..th], t, &mut s.qkv[..3 * th], epi);

        // Head-major copies so each (sentence, head) block is contiguous for the matmuls.
        for hd in 0..nh {
            let blk = hd * t * d;
            for r in 0..t {
                let src = r * 3 * h + hd * d;
                s.qh[blk + r * d..blk + (r + 1) * d].copy_from_slice(&s.qkv[src..src + d]);
                s.kh[blk + r * d..blk + (r + 1) * d].copy_from_slice(&s.qkv[src + h..src + h + d]);
            }
            for (i, &l) in lens.iter().enumerate() {
                let vt = &mut s.vt[blk + offs[i] * d..blk + (offs[i] + l) * d]; // (d, l)
                for p in 0..l {
                    let src = (offs[i] + p) * 3 * h + 2 * h + hd * d;
                    for c in 0..d {
                        vt[c * l + p] = s.qkv[src + c];
                    }
                }
            }
        }
        kern.scale(&mut s.qh[..th], scale);

        // Attention per (head, sentence), in parallel; each writes its own block of ctxh.
        let mut tasks: Vec<(usize, usize, &mut [f32])> = Vec::with_capacity(nh * seqs.len());
        for (hd, head_blk) in s.ctxh[..th].chunks_mut(t * d).enumerate() {
            let mut rest = head_blk;
            for (i, &l) in lens.iter().enumerate() {
                let (mine, tail) = rest.split_at_mut(l * d);
                tasks.push((hd, i, mine));
                rest = tail;
            }
        }
        let (qh, kh, vt) = (&s.qh[..th], &s.kh[..th], &s.vt[..th]);
        let attend = |scores: &mut Vec<f32>, (hd, i, out): (usize, usize, &mut [f32])| {
            let (l, base) = (lens[i], hd * t * d + offs[i] * d);
            scores.resize(l * l, 0.0);
            let sc = &mut scores[..l * l]; // (l, l): query rows, key columns
            matmul(
                kern,
                Weights::F32(&kh[base..base + l * d]),
                &qh[base..base + l * d],
                l,
                sc,
            );
            for row in sc.chunks_exact_mut(l) {
                kern.softmax(row);
            }
            // out (l, d) = P (l, l) · V (l, d), with V given transposed as (d, l).
            matmul(kern, Weights::F32(&vt[base..base + l * d]), sc, l, out);
        };
        // A few short sentences are less work than a fork/join: run them here.
        let work: usize = lens.iter().map(|&l| l * l).sum::<usize>() * h;
        if work < ATTN_PAR_MIN {
            let mut scores = Vec::new();
            tasks.into_iter().for_each(|task| attend(&mut scores, task));
        } else {
            tasks.into_par_iter().for_each_init(Vec::new, attend);
        }

        // Back to (t, hidden) in tmp, then the output dense + bias + residual, LayerNorm.
        for hd in 0..nh {
            let blk = hd * t * d;
            for r in 0..t {
                let dst = r * h + hd * d;
                s.tmp[dst..dst + d].copy_from_slice(&s.ctxh[blk + r * d..blk + (r + 1) * d]);
            }
        }
        let dense = &mut s.qkv[..th]; // q, k, v are spent
        let epi = Epilogue {
            bias: Some(&layer.bo),
            residual: Some(&s.x[..th]),
            gelu: false,
        };
        kern.matmul_packed(&layer.wo, &s.tmp[..th], t, dense, epi);
        layernorm_rows(kern, dense, &layer.ln1_w, &layer.ln1_b, cfg, &mut s.x[..th]);

        // Feed-forward: GELU(x W_upᵀ + b) W_downᵀ + b, residual, LayerNorm.
        let ti = t * inter;
        let epi = Epilogue {
            bias: Some(&layer.b_up),
            residual: None,
            gelu: true,
        };
        kern.matmul_packed(&layer.w_up, &s.x[..th], t, &mut s.ffn[..ti], epi);
        let epi = Epilogue {
            bias: Some(&layer.b_down),
            residual: Some(&s.x[..th]),
            gelu: false,
        };
        kern.matmul_packed(&layer.w_down, &s.ffn[..ti], t, &mut s.tmp[..th], epi);
        layernorm_rows(
            kern,
            &s.tmp[..th],
            &layer.ln2_w,
            &layer.ln2_b,
            cfg,
            &mut s.x[..th],
        );
    }

    // Mean over each sentence's tokens (all real: nothing is padded), then L2 normalise.
    let mut out = Vec::with_capacity(seqs.len());
    for (i, &l) in lens.iter().enumerate() {
        let mut acc = vec![0f64; h]; // (hidden)
        for r in offs[i]..offs[i] + l {
            for (a, &v) in acc.iter_mut().zip(&s.x[r * h..(r + 1) * h]) {
                *a += v as f64;
            }
        }
        let mean: Vec<f64> = acc.iter().map(|a| a / l as f64).collect();
        // sentence-transformers' Normalize: x / max(||x||, 1e-12).
        let norm = mean.iter().map(|a| a * a).sum::<f64>().sqrt().max(1e-12);
        out.push(mean.iter().map(|a| (a / norm) as f32).collect());
    }
    Ok(out)
}

/// Y = X Wᵀ in f32 throughout: bf16 weights are widened, activations never rounded to bf16
/// (the bf16 dot path would cost ~1e-3 relative error, far past what exactness allows here).
fn matmul(kern: &Kernels, w: Weights<'_>, x: &[f32], n: usize, y: &mut [f32]) {
    kern.matmul_with(Precision::Exact, w, x, n, y)
}

fn layernorm_rows(
    kern: &Kernels,
    x: &[f32],
    w: &[f32],
    b: &[f32],
    cfg: &BertConfig,
    out: &mut [f32],
) {
    let h = w.len();
    // Small batches on this thread: a fork/join costs more than a few rows.
    if out.len() < PAR_ROWS * h {
        for (orow, xrow) in out.chunks_exact_mut(h).zip(x.chunks_exact(h)) {
            kern.layernorm(xrow, w, b, cfg.layer_norm_eps, orow);
        }
        return;
    }
    out.par_chunks_mut(ROWS_PER_TASK * h)
        .zip(x.par_chunks(ROWS_PER_TASK * h))
        .for_each(|(o, xs)| {
            for (orow, xrow) in o.chunks_exact_mut(h).zip(xs.chunks_exact(h)) {
                kern.layernorm(xrow, w, b, cfg.layer_norm_eps, orow);
            }
        });
}
