//! The oracle for the block formats: plain loops that follow llama.cpp's `dequantize_row_*`,
//! `quantize_row_q8_{0,1,K}_ref` and `ggml_vec_dot_*_generic` (ggml-quants.c, ggml-cpu/quants.c)
//! step by step, in the same f32 operation order. Never "optimise" this file.

use super::*;
use crate::Weights;
use half::f16;

pub(crate) const ZERO_Q8_0: BlockQ8_0 = BlockQ8_0 {
    d: f16::ZERO,
    qs: [0; QK],
};
pub(crate) const ZERO_Q8_1: BlockQ8_1 = BlockQ8_1 {
    d: f16::ZERO,
    s: f16::ZERO,
    qs: [0; QK],
};
pub(crate) const ZERO_Q8K: BlockQ8K = BlockQ8K {
    d: 0.0,
    qs: [0; QK_K],
    bsums: [0; QK_K / 16],
};

// ---------------------------------------------------------------- dequantization

/// Value `i` of quantized weights, dequantized to f32 (float formats widen).
pub fn value_at(w: Weights<'_>, i: usize) -> f32 {
    let b = w.format().block_len();
    let blk = w.slice(i / b * b, (i / b + 1) * b);
    let mut out = [0f32; QK_K];
    dequantize(blk, &mut out[..b]);
    out[i % b]
}

/// Every value of `w` as f32: `out.len() == w.len()`.
#[inline(always)]
pub fn dequantize(w: Weights<'_>, out: &mut [f32]) {
    assert_eq!(out.len(), w.len(), "dequantize: length mismatch");
    match w {
        Weights::F32(s) => out.copy_from_slice(s),
        Weights::F16(s) => out.iter_mut().zip(s).for_each(|(o, v)| *o = v.to_f32()),
        Weights::Bf16(s) => out.iter_mut().zip(s).for_each(|(o, v)| *o = v.to_f32()),
        Weights::Q8_0(s) => zip(s, out, QK, dequantize_q8_0),
        Weights::Q4_0(s) => zip(s, out, QK, dequantize_q4_0),
        Weights::Q4_1(s) => zip(s, out, QK, dequantize_q4_1),
        Weights::Q5_0(s) => zip(s, out, QK, dequantize_q5_0),
        Weights::Q5_1(s) => zip(s, out, QK, dequantize_q5_1),
        Weights::Q4K(s) => zip(s, out, QK_K, dequantize_q4_k),
        Weights::Q5K(s) => zip(s, out, QK_K, dequantize_q5_k),
        Weights::Q6K(s) => zip(s, out, QK_K, dequantize_q6_k),
    }
}

#[inline(always)]
fn zip<B>(blocks: &[B], out: &mut [f32], n: usize, f: fn(&B, &mut [f32])) {
    for (b, y) in blocks.iter().zip(out.chunks_exact_mut(n)) {
        f(b, y)
    }
}

#[inline(always)]
fn dequantize_q8_0(x: &BlockQ8_0, y: &mut [f32]) {
    let d = x.d.to_f32();
    for j in 0..QK {
        y[j] = x.qs[j] as f32 * d;
    }
}

#[inline(always)]
fn dequantize_q4_0(x: &BlockQ4_0, y: &mut [f32]) {
    let d = x.d.to_f32();
    for j in 0..QK / 2 {
        let x0 = (x.qs[j] & 0x0F) as i32 - 8;
        let x1 = (x.qs[j] >> 4) as i32 - 8;
        y[j] = x0 as f32 * d;
        y[j + QK / 2] = x1 as f32 * d;
    }
}

#[inline(always)]
fn dequantize_q4_1(x: &BlockQ4_1, y: &mut [f32]) {
    let (d, m) = (x.d.to_f32(), x.m.to_f32());
    for j in 0..QK / 2 {
        let x0 = (x.qs[j] & 0x0F) as i32;
        let x1 = (x.qs[j] >> 4) as i32;
        y[j] = x0 as f32 * d + m;
        y[j + QK / 2] = x1 as f32 * d + m;
    }
}

#[inline(always)]
fn dequantize_q5_0(x: &BlockQ5_0, y: &mut [f32]) {
    let d = x.d.to_f32();
    let qh = u32::from_le_bytes(x.qh);
    for j in 0..QK / 2 {
        let xh_0 = ((qh >> j) << 4) & 0x10;
        let xh_1 = (qh >> (j + 12)) & 0x10;
        let x0 = ((x.qs[j] & 0x0F) as u32 | xh_0) as i32 - 16;
        let x1 = ((x.qs[j] >> 4) as u32 | xh_1) as i32 - 16;
        y[j] = x0 as f32 * d;
        y[j + QK / 2] = x1 as f32 * d;
    }
}

#[inline(always)]
fn dequantize_q5_1(x: &BlockQ5_1, y: &mut [f32]) {
    let (d, m) = (x.d.to_f32(), x.m.to_f32());
    let qh = u32::from_le_bytes(x.qh);
    for j in 0..QK / 2 {
        let xh_0 = ((qh >> j) << 4) & 0x10;
        let xh_1 = (qh >> (j + 12)) & 0x10;
        let x0 = ((x.qs[j] & 0x0F) as u32 | xh_0) as i32;
        let x1 = ((x.qs[j] >> 4) as u32 | xh_1) as i32;
        y[j] = x0 as f32 * d + m;
        y[j + QK / 2] = x1 as f32 * d + m;
    }
}

/// The 6-bit (scale, min) of sub-block `j` (0..8) of a Q4_K / Q5_K super-block.
pub fn scale_min_k4(j: usize, q: &[u8; K_SCALE_SIZE]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

#[inline(always)]
fn dequantize_q4_k(x: &BlockQ4K, y: &mut [f32]) {
    let (d, min) = (x.d.to_f32(), x.dmin.to_f32());
    let mut o = 0;
    for (k, q) in x.qs.chunks_exact(32).enumerate() {
        let (sc, m) = scale_min_k4(2 * k, &x.scales);
        let (d1, m1) = (d * sc as f32, min * m as f32);
        let (sc, m) = scale_min_k4(2 * k + 1, &x.scales);
        let (d2, m2) = (d * sc as f32, min * m as f32);
        for l in 0..32 {
            y[o + l] = d1 * (q[l] & 0xF) as f32 - m1;
            y[o + 32 + l] = d2 * (q[l] >> 4) as f32 - m2;
        }
        o += 64;
    }
}

#[inline(always)]
fn dequantize_q5_k(x: &BlockQ5K, y: &mut [f32]) {
    let (d, min) = (x.d.to_f32(), x.dmin.to_f32());
    let (mut u1, mut u2) = (1u8, 2u8);
    let mut o = 0;
    for (k, ql) in x.qs.chunks_exact(32).enumerate() {
        let (sc, m) = scale_min_k4(2 * k, &x.scales);
        let (d1, m1) = (d * sc as f32, min * m as f32);
        let (sc, m) = scale_min_k4(2 * k + 1, &x.scales);
        let (d2, m2) = (d * sc as f32, min * m as f32);
        for l in 0..32 {
            let h = if x.qh[l] & u1 != 0 { 16 } else { 0 };
            y[o + l] = d1 * ((ql[l] & 0xF) + h) as f32 - m1;
        }
        for l in 0..32 {
            let h = if x.qh[l] & u2 != 0 { 16 } else { 0 };
            y[o + 32 + l] = d2 * ((ql[l] >> 4) + h) as f32 - m2;
        }
        o += 64;
        u1 <<= 2;
        u2 <<= 2;
    }
}

/// The 6-bit value `l` (0..256) of a Q6_K super-block, minus 32.
fn q6(x: &BlockQ6K, idx: usize) -> i8 {
    let (n, r) = (idx / 128, idx % 128);
    let (quarter, l) = (r / 32, r % 32);
    let ql = &x.ql[n * 64..];
    let qh = x.qh[n * 32 + l];
    let low = match quarter {
        0 => ql[l] & 0xF,
        1 => ql[l + 32] & 0xF,
        2 => ql[l] >> 4,
        _ => ql[l + 32] >> 4,
    };
    ((low | (((qh >> (2 * quarter)) & 3) << 4)) as i8) - 32
}

#[inline(always)]
fn dequantize_q6_k(x: &BlockQ6K, y: &mut [f32]) {
    let d = x.d.to_f32();
    for n in 0..2 {
        for l in 0..32 {
            let is = l / 16;
            for quarter in 0..4 {
                let sc = x.scales[n * 8 + is + 2 * quarter];
                let q = q6(x, n * 128 + quarter * 32 + l);
                y[n * 128 + quarter * 32 + l] = d * sc as f32 * q as f32;
            }
        }
    }
}

// ---------------------------------------------------------------- activation quantization

/// `quantize_row_q8_0_ref`: per block d = max|x| / 127, q = round(x / d) (ties away from 0).
pub fn quantize_q8_0(x: &[f32], y: &mut [BlockQ8_0]) {
    assert_eq!(x.len(), y.len() * QK, "quantize_q8_0: length mismatch");
    for (x, y) in x.chunks_exact(QK).zip(y.iter_mut()) {
        let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        y.d = f16::from_f32(d);
        for j in 0..QK {
            y.qs[j] = (x[j] * id).round() as i8;
        }
    }
}

/// `quantize_row_q8_1_ref`: as Q8_0, plus s = d · Σq (d as f32, before rounding to f16).
pub fn quantize_q8_1(x: &[f32], y: &mut [BlockQ8_1]) {
    assert_eq!(x.len(), y.len() * QK, "quantize_q8_1: length mismatch");
    for (x, y) in x.chunks_exact(QK).zip(y.iter_mut()) {
        let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        y.d = f16::from_f32(d);
        let mut sum = 0i32;
        for j in 0..QK / 2 {
            y.qs[j] = (x[j] * id).round() as i8;
            y.qs[QK / 2 + j] = (x[QK / 2 + j] * id).round() as i8;
            sum += y.qs[j] as i32 + y.qs[QK / 2 + j] as i32;
        }
        y.s = f16::from_f32(sum as f32 * d);
    }
}

/// `quantize_row_q8_K_ref`: per super-block the value of largest magnitude `max` maps to -127
/// (q = nearest_int(-127/max · x), ties to even, capped at 127), d = 1 / (-127/max), plus the
/// sums of each 16. An all-zero block gets d = 0 and zero sums (llama.cpp leaves the sums
/// unset there; they only ever meet d = 0).
pub fn quantize_q8_k(x: &[f32], y: &mut [BlockQ8K]) {
    assert_eq!(x.len(), y.len() * QK_K, "quantize_q8_k: length mismatch");
    for (x, y) in x.chunks_exact(QK_K).zip(y.iter_mut()) {
        let (mut max, mut amax) = (0f32, 0f32);
        for &v in x {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        if amax == 0.0 {
            *y = ZERO_Q8K;
            continue;
        }
        let iscale = -127.0 / max;
        for j in 0..QK_K {
            let v = (iscale * x[j]).round_ties_even() as i32;
            y.qs[j] = v.min(127) as i8;
        }
        for j in 0..QK_K / 16 {
            y.bsums[j] = y.qs[j * 16..(j + 1) * 16].iter().map(|&q| q as i16).sum();
        }
        y.d = 1.0 / iscale;
    }
}

/// Activations back to f32 (`d · q`), for tests and error bounds.
pub fn dequantize_acts(a: Acts<'_>) -> Vec<f32> {
    match a {
        Acts::Q8_0(a) => a
            .iter()
            .flat_map(|b| b.qs.map(|q| q as f32 * b.d.to_f32()))
            .collect(),
        Acts::Q8_1(a) => a
            .iter()
            .flat_map(|b| b.qs.map(|q| q as f32 * b.d.to_f32()))
            .collect(),
        Acts::Q8K(a) => a
            .iter()
            .flat_map(|b| b.qs.map(|q| q as f32 * b.d))
            .collect(),
    }
}

// ---------------------------------------------------------------- dot products

/// The integer dot product of a weight row with activations quantized to its
/// [`Format::act_format`] (`ggml_vec_dot_<w>_<act>_generic`). Panics on a float format, a
/// mismatched activation format or lengths.
pub fn vec_dot(w: Weights<'_>, a: Acts<'_>) -> f32 {
    assert_eq!(w.len(), a.len(), "vec_dot: length mismatch");
    match (w, a) {
        (Weights::Q8_0(w), Acts::Q8_0(a)) => dot_q8_0(w, a),
        (Weights::Q4_0(w), Acts::Q8_0(a)) => dot_q4_0(w, a),
        (Weights::Q5_0(w), Acts::Q8_0(a)) => dot_q5_0(w, a),
        (Weights::Q4_1(w), Acts::Q8_1(a)) => dot_q4_1(w, a),
        (Weights::Q5_1(w), Acts::Q8_1(a)) => dot_q5_1(w, a),
        (Weights::Q4K(w), Acts::Q8K(a)) => dot_q4_k(w, a),
        (Weights::Q5K(w), Acts::Q8K(a)) => dot_q5_k(w, a),
        (Weights::Q6K(w), Acts::Q8K(a)) => dot_q6_k(w, a),
        _ => panic!(
            "vec_dot: {} weights with {:?} activations",
            w.format().name(),
            a.format()
        ),
    }
}

/// [`vec_dot`] of one row with four tokens' activations (the shape of the tiers' prefill step).
pub fn vec_dot4(w: Weights<'_>, a: [Acts<'_>; 4]) -> [f32; 4] {
    a.map(|a| vec_dot(w, a))
}

/// `y[r]` = row `r` of `w` (rows of `a.len()` values) · `a`, by [`vec_dot`].
pub fn matvec_rows(w: Weights<'_>, a: Acts<'_>, y: &mut [f32]) {
    let k = a.len();
    assert_eq!(w.len(), k * y.len(), "matvec_rows: shapes");
    for (r, y) in y.iter_mut().enumerate() {
        *y = vec_dot(w.row(r, k), a);
    }
}

/// `out` (n, rows) = `a` (n tokens of k values) × the rows of `w`, by [`vec_dot`].
pub fn matmul_tile(w: Weights<'_>, a: Acts<'_>, n: usize, out: &mut [f32]) {
    assert!(
        n > 0 && a.len().is_multiple_of(n),
        "matmul_tile: acts are not n rows"
    );
    let k = a.len() / n;
    let rows = out.len() / n;
    assert_eq!(w.len(), rows * k, "matmul_tile: shapes");
    for t in 0..n {
        let at = a.slice(t * k, (t + 1) * k);
        for r in 0..rows {
            out[t * rows + r] = vec_dot(w.row(r, k), at);
        }
    }
}

fn dot_q8_0(x: &[BlockQ8_0], y: &[BlockQ8_0]) -> f32 {
    let mut sumf = 0f32;
    for (x, y) in x.iter().zip(y) {
        let mut sumi = 0i32;
        for j in 0..QK {
            sumi += x.qs[j] as i32 * y.qs[j] as i32;
        }
        sumf += sumi as f32 * (x.d.to_f32() * y.d.to_f32());
    }
    sumf
}

fn dot_q4_0(x: &[BlockQ4_0], y: &[BlockQ8_0]) -> f32 {
    let mut sumf = 0f32;
    for (x, y) in x.iter().zip(y) {
        let (mut sumi0, mut sumi1) = (0i32, 0i32);
        for j in 0..QK / 2 {
            let v0 = (x.qs[j] & 0x0F) as i32 - 8;
            let v1 = (x.qs[j] >> 4) as i32 - 8;
            sumi0 += v0 * y.qs[j] as i32;
            sumi1 += v1 * y.qs[j + QK / 2] as i32;
        }
        let sumi = sumi0 + sumi1;
        sumf += sumi as f32 * x.d.to_f32() * y.d.to_f32();
    }
    sumf
}

fn dot_q4_1(x: &[BlockQ4_1], y: &[BlockQ8_1]) -> f32 {
    let mut sumf = 0f32;
    for (x, y) in x.iter().zip(y) {
        let (mut sumi0, mut sumi1) = (0i32, 0i32);
        for j in 0..QK / 2 {
            let v0 = (x.qs[j] & 0x0F) as i32;
            let v1 = (x.qs[j] >> 4) as i32;
            sumi0 += v0 * y.qs[j] as i32;
            sumi1 += v1 * y.qs[j + QK / 2] as i32;
        }
        let sumi = sumi0 + sumi1;
        sumf += (x.d.to_f32() * y.d.to_f32()) * sumi as f32 + x.m.to_f32() * y.s.to_f32();
    }
    sumf
}

fn dot_q5_0(x: &[BlockQ5_0], y: &[BlockQ8_0]) -> f32 {
    let mut sumf = 0f32;
    for (x, y) in x.iter().zip(y) {
        let qh = u32::from_le_bytes(x.qh);
        let (mut sumi0, mut sumi1) = (0i32, 0i32);
        for j in 0..QK / 2 {
            let xh_0 = ((qh & (1 << j)) >> j) << 4;
            let xh_1 = (qh & (1 << (j + 16))) >> (j + 12);
            let x0 = ((x.qs[j] & 0x0F) as u32 | xh_0) as i32 - 16;
            let x1 = ((x.qs[j] >> 4) as u32 | xh_1) as i32 - 16;
            sumi0 += x0 * y.qs[j] as i32;
            sumi1 += x1 * y.qs[j + QK / 2] as i32;
        }
        let sumi = sumi0 + sumi1;
        sumf += (x.d.to_f32() * y.d.to_f32()) * sumi as f32;
    }
    sumf
}

fn dot_q5_1(x: &[BlockQ5_1], y: &[BlockQ8_1]) -> f32 {
    let mut sumf = 0f32;
    for (x, y) in x.iter().zip(y) {
        let qh = u32::from_le_bytes(x.qh);
        let (mut sumi0, mut sumi1) = (0i32, 0i32);
        for j in 0..QK / 2 {
            let xh_0 = ((qh >> j) << 4) & 0x10;
            let xh_1 = (qh >> (j + 12)) & 0x10;
            let x0 = ((x.qs[j] & 0xF) as u32 | xh_0) as i32;
            let x1 = ((x.qs[j] >> 4) as u32 | xh_1) as i32;
            sumi0 += x0 * y.qs[j] as i32;
            sumi1 += x1 * y.qs[j + QK / 2] as i32;
        }
        let sumi = sumi0 + sumi1;
        sumf += (x.d.to_f32() * y.d.to_f32()) * sumi as f32 + x.m.to_f32() * y.s.to_f32();
    }
    sumf
}

/// The k-quant tail shared by the generic Q4_K / Q5_K / Q6_K dots: `aux8` holds the super-
/// block's 256 integer weights, `scales` the scale of each group of `256 / scales.len()`;
/// products accumulate in eight i32 lanes as ggml's `aux32`.
fn k_lanes(aux8: &[i8; QK_K], scales: &[i32], q8: &[i8; QK_K]) -> [i32; 8] {
    let mut aux32 = [0i32; 8];
    let per = QK_K / scales.len();
    for (g, &scale) in scales.iter().enumerate() {
        for c in (0..per).step_by(8) {
            let o = g * per + c;
            for l in 0..8 {
                let aux16 = q8[o + l] as i16 * aux8[o + l] as i16;
                aux32[l] += scale * aux16 as i32;
            }
        }
    }
    aux32
}

fn dot_q4_k(x: &[BlockQ4K], y: &[BlockQ8K]) -> f32 {
    let mut sums = [0f32; 8];
    let mut sumf = 0f32;
    for (x, y) in x.iter().zip(y) {
        let mut aux8 = [0i8; QK_K];
        for (j, q4) in x.qs.chunks_exact(32).enumerate() {
            for l in 0..32 {
                aux8[j * 64 + l] = (q4[l] & 0xF) as i8;
                aux8[j * 64 + 32 + l] = (q4[l] >> 4) as i8;
            }
        }
        let sm: [(u8, u8); 8] = std::array::from_fn(|j| scale_min_k4(j, &x.scales));
        let mut sumi = 0i32;
        for j in 0..QK_K / 16 {
            sumi += y.bsums[j] as i32 * sm[j / 2].1 as i32;
        }
        let scales = sm.map(|(s, _)| s as i32);
        let aux32 = k_lanes(&aux8, &scales, &y.qs);
        let d = x.d.to_f32() * y.d;
        for l in 0..8 {
            sums[l] += d * aux32[l] as f32;
        }
        let dmin = x.dmin.to_f32() * y.d;
        sumf -= dmin * sumi as f32;
    }
    for l in 0..8 {
        sumf += sums[l];
    }
    sumf
}

fn dot_q5_k(x: &[BlockQ5K], y: &[BlockQ8K]) -> f32 {
    let mut sums = [0f32; 8];
    let mut sumf = 0f32;
    for (x, y) in x.iter().zip(y) {
        let mut aux8 = [0i8; QK_K];
        let mut m = 1u8;
        for (j, q4) in x.qs.chunks_exact(32).enumerate() {
            for l in 0..32 {
                let h = if x.qh[l] & m != 0 { 16 } else { 0 };
                aux8[j * 64 + l] = (q4[l] & 0xF) as i8 + h;
            }
            m <<= 1;
            for l in 0..32 {
                let h = if x.qh[l] & m != 0 { 16 } else { 0 };
                aux8[j * 64 + 32 + l] = (q4[l] >> 4) as i8 + h;
            }
            m <<= 1;
        }
        let sm: [(u8, u8); 8] = std::array::from_fn(|j| scale_min_k4(j, &x.scales));
        let mut sumi = 0i32;
        for j in 0..QK_K / 16 {
            sumi += y.bsums[j] as i32 * sm[j / 2].1 as i32;
        }
        let scales = sm.map(|(s, _)| s as i32);
        let aux32 = k_lanes(&aux8, &scales, &y.qs);
        let d = x.d.to_f32() * y.d;
        for l in 0..8 {
            sums[l] += d * aux32[l] as f32;
        }
        let dmin = x.dmin.to_f32() * y.d;
        sumf -= dmin * sumi as f32;
    }
    for l in 0..8 {
        sumf += sums[l];
    }
    sumf
}

fn dot_q6_k(x: &[BlockQ6K], y: &[BlockQ8K]) -> f32 {
    let mut sums = [0f32; 8];
    for (x, y) in x.iter().zip(y) {
        let aux8: [i8; QK_K] = std::array::from_fn(|i| q6(x, i));
        let scales = x.scales.map(|s| s as i32);
        let aux32 = k_lanes(&aux8, &scales, &y.qs);
        let d = x.d.to_f32() * y.d;
        for l in 0..8 {
            sums[l] += d * aux32[l] as f32;
        }
    }
    let mut sumf = 0f32;
    for l in 0..8 {
        sumf += sums[l];
    }
    sumf
}
