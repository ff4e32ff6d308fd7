//! Plain loops: the oracle every other tier is tested against. Never "optimise" this file;
//! its only job is to be obviously right.

use crate::Weights;

/// Weight element `i` as f32, whatever the storage dtype.
#[inline]
pub fn weight_at(w: Weights<'_>, i: usize) -> f32 {
    match w {
        Weights::F32(s) => s[i],
        Weights::F16(s) => s[i].to_f32(),
        Weights::Bf16(s) => s[i].to_f32(),
        _ => crate::quant::scalar::value_at(w, i),
    }
}

/// sum_i w[i] * x[i], accumulated in f64 so the oracle is more exact than any tier. Block
/// formats are dequantized first (this is the float oracle; `quant::scalar::vec_dot` is the
/// integer one).
pub fn dot(w: Weights<'_>, x: &[f32]) -> f32 {
    if !w.format().is_float() {
        let mut v = vec![0f32; w.len()];
        crate::quant::scalar::dequantize(w, &mut v);
        return dot(Weights::F32(&v), x);
    }
    let mut acc = 0f64;
    for (i, &xi) in x.iter().enumerate() {
        acc += weight_at(w, i) as f64 * xi as f64;
    }
    acc as f32
}

/// y[r] = dot(w[r, :], x) for the rows `w` holds (`w` is `(y.len(), x.len())`).
pub fn matvec(w: Weights<'_>, x: &[f32], y: &mut [f32]) {
    let k = x.len();
    for (r, yr) in y.iter_mut().enumerate() {
        *yr = dot(w.slice(r * k, (r + 1) * k), x);
    }
}

/// y[t, r] = dot(x[t, :], w[r, :]); x: (n, k), w: (m, k), y: (n, m).
pub fn matmul(w: Weights<'_>, x: &[f32], n: usize, y: &mut [f32]) {
    if n == 0 {
        return;
    }
    let k = x.len() / n;
    let m = y.len() / n;
    for t in 0..n {
        matvec(w, &x[t * k..(t + 1) * k], &mut y[t * m..(t + 1) * m]);
        let _ = m;
    }
}

pub fn rmsnorm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let ss: f64 = x.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / x.len().max(1) as f64;
    let inv = 1.0 / (ss + eps as f64).sqrt();
    for i in 0..x.len() {
        out[i] = ((x[i] as f64 * inv) as f32) * weight[i];
    }
}

pub fn layernorm(x: &[f32], weight: &[f32], bias: &[f32], eps: f32, out: &mut [f32]) {
    let n = x.len().max(1) as f64;
    let mean: f64 = x.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var: f64 = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    let inv = 1.0 / (var + eps as f64).sqrt();
    for i in 0..x.len() {
        out[i] = (((x[i] as f64 - mean) * inv) as f32) * weight[i] + bias[i];
    }
}

pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f64;
    for v in x.iter_mut() {
        let e = ((*v - max) as f64).exp();
        *v = e as f32;
        sum += e;
    }
    for v in x.iter_mut() {
        *v = (*v as f64 / sum) as f32;
    }
}

pub fn silu(x: &mut [f32]) {
    for v in x.iter_mut() {
        let f = *v as f64;
        *v = (f / (1.0 + (-f).exp())) as f32;
    }
}

/// gate[i] = silu(gate[i]) * up[i] (the SwiGLU feed-forward).
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        let f = *g as f64;
        *g = (f / (1.0 + (-f).exp()) * u as f64) as f32;
    }
}

/// Exact GELU: 0.5 x (1 + erf(x / sqrt 2)).
pub fn gelu(x: &mut [f32]) {
    for v in x.iter_mut() {
        let f = *v as f64;
        *v = (0.5 * f * (1.0 + erf(f / std::f64::consts::SQRT_2))) as f32;
    }
}

/// erf to ~1e-15 via its Maclaurin series (small |x|) or the continued fraction of erfc.
pub fn erf(x: f64) -> f64 {
    let ax = x.abs();
    let r = if ax < 2.5 {
        // erf(x) = 2/sqrt(pi) * sum_n (-1)^n x^(2n+1) / (n! (2n+1))
        let mut sum = 0.0f64;
        let mut term: f64 = ax;
        let x2 = ax * ax;
        let mut n = 0.0;
        while term.abs() > 1e-17 * sum.abs().max(1e-300) || n < 3.0 {
            sum += term / (2.0 * n + 1.0);
            n += 1.0;
            term *= -x2 / n;
            if n > 200.0 {
                break;
            }
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    } else if ax > 6.0 {
        1.0
    } else {
        // erfc(x) = exp(-x^2)/sqrt(pi) * 1/(x + 1/2/(x + 1/(x + 3/2/(x + ...)))) (Lentz-free, fixed depth)
        let mut f = ax;
        for k in (1..60).rev() {
            f = ax + (k as f64 / 2.0) / f;
        }
        1.0 - (-ax * ax).exp() / std::f64::consts::PI.sqrt() / f
    };
    if x < 0.0 {
        -r
    } else {
        r
    }
}

/// HF Llama rotate-half RoPE on `x` = (n_heads, head_dim) for one position:
/// for i < d/2: (x[i], x[i+d/2]) <- (x[i] c - x[i+d/2] s, x[i+d/2] c + x[i] s), c = cos[i], s = sin[i].
pub fn rope(x: &mut [f32], head_dim: usize, cos: &[f32], sin: &[f32]) {
    let half = head_dim / 2;
    for head in x.chunks_exact_mut(head_dim) {
        for i in 0..half {
            let a = head[i];
            let b = head[i + half];
            head[i] = a * cos[i] - b * sin[i];
            head[i + half] = b * cos[i] + a * sin[i];
        }
    }
}

pub fn add(x: &mut [f32], y: &[f32]) {
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

pub fn scale(x: &mut [f32], s: f32) {
    for a in x.iter_mut() {
        *a *= s;
    }
}

/// Attention's scores (the contract of `simd::attn_scores`): each summed in order of the
/// dimensions by multiply-adds from zero.
pub fn attn_scores(
    kt: &[f32],
    stride: usize,
    len: usize,
    q: &[f32],
    n: usize,
    ld: usize,
    scores: &mut [f32],
) {
    assert!(
        n > 0 && q.len().is_multiple_of(n),
        "attn_scores: q is not (n, hd)"
    );
    let hd = q.len() / n;
    assert!(len <= stride && len <= ld, "attn_scores: rows too short");
    for r in 0..n {
        for j in 0..len {
            let mut a = 0f32;
            for d in 0..hd {
                a = q[r * hd + d].mul_add(kt[d * stride + j], a);
            }
            scores[r * ld + j] = a;
        }
    }
}

/// Attention's outputs (the contract of `simd::attn_values`): each element summed in order of
/// the positions by multiply-adds from zero.
pub fn attn_values(v: &[f32], hd: usize, p: &[f32], ld: usize, lens: &[usize], out: &mut [f32]) {
    assert_eq!(
        out.len(),
        lens.len() * hd,
        "attn_values: out is not (rows, hd)"
    );
    for (r, (o, &len)) in out.chunks_exact_mut(hd.max(1)).zip(lens).enumerate() {
        for (d, o) in o.iter_mut().enumerate() {
            let mut a = 0f32;
            for j in 0..len {
                a = p[r * ld + j].mul_add(v[j * hd + d], a);
            }
            *o = a;
        }
    }
}

/// y += a * x
pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (yi, &xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}

pub fn to_f32(w: Weights<'_>, out: &mut [f32]) {
    if !w.format().is_float() {
        return crate::quant::scalar::dequantize(w, out);
    }
    for (i, o) in out.iter_mut().enumerate() {
        *o = weight_at(w, i);
    }
}

// ---- The scalar tier's table: the bodies above, as the other tiers' tables hold theirs. ----

use crate::simd::{MatmulJob, PwJob};
use crate::Table;

/// Columns r0..r1 of Y through the oracle, for the scalar tier.
fn scalar_matmul_rows(j: &MatmulJob<'_>, r0: usize, r1: usize) {
    for t in 0..j.n {
        let x = &j.x[t * j.k..(t + 1) * j.k];
        for r in r0..r1 {
            let v = dot(j.w.row(r, j.k), x);
            // SAFETY: (t, r) lies in Y (n, m); callers give each thread disjoint r ranges.
            unsafe { *j.y.add(t * j.m + r) = v };
        }
    }
}

/// Panels (single rows: `pw_panel` is 1) p0..p1 of a pre-packed matmul, through the oracle.
fn scalar_matmul_pw(j: &PwJob<'_>, p0: usize, p1: usize) {
    for t in 0..j.n {
        let x = &j.x[t * j.k..(t + 1) * j.k];
        for r in p0..p1 {
            let mut v = dot(Weights::F32(&j.w[r * j.k..(r + 1) * j.k]), x);
            if let Some(b) = j.bias {
                v += b[r];
            }
            if let Some(res) = j.residual {
                v += res[t * j.m + r];
            }
            if j.gelu {
                let mut g = [v];
                gelu(&mut g);
                v = g[0];
            }
            // SAFETY: (t, r) lies in Y (n, m); callers give each thread disjoint r ranges.
            unsafe { *j.y.add(t * j.m + r) = v };
        }
    }
}

fn scalar_burn(iters: usize) -> f32 {
    let mut acc = [0f32; 12];
    for _ in 0..iters {
        for a in acc.iter_mut() {
            *a = a.mul_add(0.999_999, 1e-7);
        }
    }
    acc.iter().sum()
}

/// The scalar tier: the oracle's bodies in the kernel table.
pub(crate) static TABLE: Table = Table {
    dot,
    matvec_ld: |w, ld, x, y| {
        for (r, yr) in y.iter_mut().enumerate() {
            *yr = dot(w.slice(r * ld, r * ld + x.len()), x);
        }
    },
    matmul: scalar_matmul_rows,
    matmul_bf16: None,
    op_width: 0,
    op_rows: 1,
    matmul_pw: scalar_matmul_pw,
    pw_panel: 1,
    rmsnorm,
    layernorm,
    softmax,
    attn_scores,
    attn_values,
    silu,
    silu_mul,
    gelu,
    rope,
    add,
    scale,
    axpy,
    to_f32,
    burn: scalar_burn,
    read: [|x| x.iter().sum(); 4],
    bf16_burn: None,
    qdot: crate::quant::scalar::vec_dot,
    qdot4: crate::quant::scalar::vec_dot4,
    qrows: crate::quant::scalar::matvec_rows,
    qtile: crate::quant::scalar::matmul_tile,
};
