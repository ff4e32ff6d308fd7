//! Block formats: the oracle (`quant/scalar.rs`) against gguf-py, its int8 path against an f64
//! float dot, and every tier's products against the oracle.
//!
//! Tier vs oracle bound. Both quantize x with the same (oracle) code, so they hold the same
//! activation blocks, and both form the same integer sums exactly (i32, far from overflow;
//! `vpmaddubsw` never saturates, see `quant/avx2.rs`). They differ only in the f32 work after:
//! each block contributes ≤ 2 terms (scale product × integer, min part), k-quant blocks ≤ 12
//! (eight lane sums, four lanes of min sums), each term formed with ≤ 3 roundings, and the
//! terms are summed in different orders. A sum of N such terms is within (N + 3)·u·Σ|terms| of
//! the exact value (u = 2^-24), so the two differ by ≤ 2·(N + 3)·u·Σ|terms|, N = 12·blocks + 16.
//! Σ|terms| ≤ Σ_i (|ŵ_i| + 2|μ_i|)·|x̂_i|, where ŵ is the dequantized weight, μ its min part
//! (the block with its quants zeroed, formats with a min only: ŵ = a + μ, |a| ≤ |ŵ| + |μ|) and
//! x̂ the dequantized activation.

use serde_json::Value;
use spinfer_kernels::quant::{scalar as q, ActBuf};
use spinfer_kernels::team::{self, Shared};
use spinfer_kernels::{
    f16, scalar, ActFormat, Acts, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1,
    BlockQ6K, BlockQ8_0, Format, Isa, Kernels, Weights,
};

mod common;
use common::Rng;

/// Every block format (the formats that are not one value per slot).
fn block_formats() -> Vec<Format> {
    Format::ALL.into_iter().filter(|f| !f.is_float()).collect()
}

fn tiers() -> Vec<Kernels> {
    Isa::available()
        .into_iter()
        .map(|i| Kernels::for_isa(i).expect("available tier must load"))
        .collect()
}

/// Owned blocks of one format.
#[derive(Clone)]
enum Store {
    Q8_0(Vec<BlockQ8_0>),
    Q4_0(Vec<BlockQ4_0>),
    Q4_1(Vec<BlockQ4_1>),
    Q5_0(Vec<BlockQ5_0>),
    Q5_1(Vec<BlockQ5_1>),
    Q4K(Vec<BlockQ4K>),
    Q5K(Vec<BlockQ5K>),
    Q6K(Vec<BlockQ6K>),
}

fn bytes<const N: usize>(rng: &mut Rng) -> [u8; N] {
    std::array::from_fn(|_| rng.next() as u8)
}

/// A scale of the size real files hold, sign random when `signed`.
fn scale(rng: &mut Rng, signed: bool) -> f16 {
    let v = 1e-3 + rng.f(1.0).abs() * 2e-2;
    f16::from_f32(if signed && rng.next() & 1 == 1 { -v } else { v })
}

impl Store {
    /// `n` random blocks: random quant bits, finite scales.
    fn random(f: Format, n: usize, rng: &mut Rng) -> Store {
        match f {
            Format::Q8_0 => Store::Q8_0(
                (0..n)
                    .map(|_| BlockQ8_0 {
                        d: scale(rng, true),
                        qs: bytes::<32>(rng).map(|b| b as i8),
                    })
                    .collect(),
            ),
            Format::Q4_0 => Store::Q4_0(
                (0..n)
                    .map(|_| BlockQ4_0 {
                        d: scale(rng, true),
                        qs: bytes(rng),
                    })
                    .collect(),
            ),
            Format::Q4_1 => Store::Q4_1(
                (0..n)
                    .map(|_| BlockQ4_1 {
                        d: scale(rng, false),
                        m: f16::from_f32(-scale(rng, false).to_f32() * 8.0),
                        qs: bytes(rng),
                    })
                    .collect(),
            ),
            Format::Q5_0 => Store::Q5_0(
                (0..n)
                    .map(|_| BlockQ5_0 {
                        d: scale(rng, true),
                        qh: bytes(rng),
                        qs: bytes(rng),
                    })
                    .collect(),
            ),
            Format::Q5_1 => Store::Q5_1(
                (0..n)
                    .map(|_| BlockQ5_1 {
                        d: scale(rng, false),
                        m: f16::from_f32(-scale(rng, false).to_f32() * 16.0),
                        qh: bytes(rng),
                        qs: bytes(rng),
                    })
                    .collect(),
            ),
            Format::Q4K => Store::Q4K(
                (0..n)
                    .map(|_| BlockQ4K {
                        d: f16::from_f32(scale(rng, false).to_f32() / 16.0),
                        dmin: f16::from_f32(scale(rng, false).to_f32() / 16.0),
                        scales: bytes(rng),
                        qs: bytes(rng),
                    })
                    .collect(),
            ),
            Format::Q5K => Store::Q5K(
                (0..n)
                    .map(|_| BlockQ5K {
                        d: f16::from_f32(scale(rng, false).to_f32() / 16.0),
                        dmin: f16::from_f32(scale(rng, false).to_f32() / 16.0),
                        scales: bytes(rng),
                        qh: bytes(rng),
                        qs: bytes(rng),
                    })
                    .collect(),
            ),
            Format::Q6K => Store::Q6K(
                (0..n)
                    .map(|_| BlockQ6K {
                        ql: bytes(rng),
                        qh: bytes(rng),
                        scales: bytes::<16>(rng).map(|b| b as i8),
                        d: f16::from_f32(scale(rng, true).to_f32() / 64.0),
                    })
                    .collect(),
            ),
            _ => unreachable!("float format"),
        }
    }

    fn w(&self) -> Weights<'_> {
        match self {
            Store::Q8_0(b) => Weights::Q8_0(b),
            Store::Q4_0(b) => Weights::Q4_0(b),
            Store::Q4_1(b) => Weights::Q4_1(b),
            Store::Q5_0(b) => Weights::Q5_0(b),
            Store::Q5_1(b) => Weights::Q5_1(b),
            Store::Q4K(b) => Weights::Q4K(b),
            Store::Q5K(b) => Weights::Q5K(b),
            Store::Q6K(b) => Weights::Q6K(b),
        }
    }

    /// The min part μ of each value (the block with its quants zeroed), 0 where the format has
    /// no min.
    fn mins(&self) -> Vec<f32> {
        let mut z = self.clone();
        match &mut z {
            Store::Q4_1(b) => b.iter_mut().for_each(|b| b.qs = [0; 16]),
            Store::Q5_1(b) => b.iter_mut().for_each(|b| (b.qs, b.qh) = ([0; 16], [0; 4])),
            Store::Q4K(b) => b.iter_mut().for_each(|b| b.qs = [0; 128]),
            Store::Q5K(b) => b
                .iter_mut()
                .for_each(|b| (b.qs, b.qh) = ([0; 128], [0; 32])),
            _ => return vec![0.0; self.w().len()],
        }
        deq(z.w())
    }
}

fn deq(w: Weights<'_>) -> Vec<f32> {
    let mut v = vec![0f32; w.len()];
    q::dequantize(w, &mut v);
    v
}

/// Activations with a different magnitude in every 32 values (as hidden states have).
fn acts_x(rng: &mut Rng, n: usize) -> Vec<f32> {
    let mut x = rng.vec(n, 1.0);
    for c in x.chunks_mut(32) {
        let s = 0.1 + rng.f(1.0).abs() * 3.0;
        c.iter_mut().for_each(|v| *v *= s);
    }
    x
}

/// The oracle: x quantized by the oracle, then `vec_dot` per row.
fn oracle(w: Weights<'_>, cols: usize, x: &[f32]) -> Vec<f32> {
    let mut b = ActBuf::new();
    let a = b.quantize(w.format().act_format().unwrap(), x);
    (0..w.len() / cols)
        .map(|r| q::vec_dot(w.row(r, cols), a))
        .collect()
}

/// Per-row bound on |tier - oracle| (see the top of the file).
struct Bound {
    wdq: Vec<f32>,
    mu: Vec<f32>,
    f: Format,
}
impl Bound {
    fn new(s: &Store) -> Bound {
        Bound {
            wdq: deq(s.w()),
            mu: s.mins(),
            f: s.w().format(),
        }
    }
    fn row(&self, r: usize, x: &[f32]) -> f64 {
        let cols = x.len();
        let mut b = ActBuf::new();
        let xq = q::dequantize_acts(b.quantize(self.f.act_format().unwrap(), x));
        let s: f64 = (0..cols)
            .map(|i| {
                let (w, m) = (self.wdq[r * cols + i], self.mu[r * cols + i]);
                (w.abs() as f64 + 2.0 * m.abs() as f64) * xq[i].abs() as f64
            })
            .sum();
        let n = 12 * (cols / self.f.block_len()) + 16;
        2.0 * (n + 3) as f64 * 2f64.powi(-24) * s + 1e-30
    }
}

fn check(what: &str, got: &[f32], want: &[f32], bound: &Bound, x: &[f32]) {
    assert_eq!(got.len(), want.len());
    for r in 0..got.len() {
        let tol = bound.row(r, x);
        let err = (got[r] as f64 - want[r] as f64).abs();
        assert!(
            err <= tol,
            "{what} row {r}: {} vs oracle {} (err {err:e} > {tol:e})",
            got[r],
            want[r]
        );
    }
}

fn col_sizes(f: Format) -> &'static [usize] {
    if f.block_len() == 256 {
        &[256, 768, 1024]
    } else {
        &[32, 96, 192, 224, 1024]
    }
}

#[test]
fn dot_and_matvec_match_oracle_every_tier() {
    let mut rng = Rng(1);
    for f in block_formats() {
        for &cols in col_sizes(f) {
            for rows in [1, 7, 33, 257] {
                let s = Store::random(f, rows * cols / f.block_len(), &mut rng);
                let x = acts_x(&mut rng, cols);
                let want = oracle(s.w(), cols, &x);
                let bound = Bound::new(&s);
                for k in tiers() {
                    let what = format!("{} {} {rows}x{cols}", k.isa(), f.name());
                    let mut y = vec![f32::NAN; rows];
                    k.matvec(s.w(), &x, &mut y);
                    check(&format!("matvec {what}"), &y, &want, &bound, &x);
                    let d = k.dot(s.w().row(0, cols), &x);
                    check(&format!("dot {what}"), &[d], &want[..1], &bound, &x);
                }
            }
        }
    }
}

#[test]
fn matvecs_mixed_formats_and_team_match_oracle() {
    let mut rng = Rng(2);
    // Four matrices needing all three activation formats, and one float matrix with them.
    let sets: [[Format; 4]; 3] = [
        [Format::Q4K, Format::Q4K, Format::Q6K, Format::Q5K],
        [Format::Q4_0, Format::Q4_1, Format::Q8_0, Format::Q5_1],
        [Format::Q4K, Format::Q8_0, Format::Q5_0, Format::Q6K],
    ];
    for set in sets {
        for (cols, rows) in [(256, [1, 7, 33, 257]), (512, [257, 1, 33, 7])] {
            let stores: Vec<Store> = set
                .iter()
                .zip(rows)
                .map(|(&f, r)| Store::random(f, r * cols / f.block_len(), &mut rng))
                .collect();
            let x = acts_x(&mut rng, cols);
            let wants: Vec<Vec<f32>> = stores.iter().map(|s| oracle(s.w(), cols, &x)).collect();
            let bounds: Vec<Bound> = stores.iter().map(Bound::new).collect();
            let fl = rng.vec(5 * cols, 1.0);
            for k in tiers() {
                let mut ys: Vec<Vec<f32>> = rows.iter().map(|&r| vec![f32::NAN; r]).collect();
                let mut jobs: Vec<(Weights<'_>, &mut [f32])> = stores
                    .iter()
                    .zip(ys.iter_mut())
                    .map(|(s, y)| (s.w(), y.as_mut_slice()))
                    .collect();
                k.matvecs(&mut jobs, &x);
                for i in 0..4 {
                    let what = format!("matvecs {} {:?} #{i} cols {cols}", k.isa(), set);
                    check(&what, &ys[i], &wants[i], &bounds[i], &x);
                }
                // A float matrix beside block formats: the same result as its own matvec.
                let (mut yf, mut yq, mut yf1) = (vec![0f32; 5], vec![0f32; rows[0]], vec![0f32; 5]);
                k.matvecs(
                    &mut [(Weights::F32(&fl), &mut yf), (stores[0].w(), &mut yq)],
                    &x,
                );
                k.matvec(Weights::F32(&fl), &x, &mut yf1);
                assert_eq!(yf, yf1, "{} float matrix inside matvecs", k.isa());
                check(
                    "matvecs with a float matrix",
                    &yq,
                    &wants[0],
                    &bounds[0],
                    &x,
                );

                // The same on a team: every thread quantizes x itself.
                let mut ys: Vec<Vec<f32>> = rows.iter().map(|&r| vec![f32::NAN; r]).collect();
                {
                    let jobs: Vec<(Weights<'_>, Shared<'_>)> = stores
                        .iter()
                        .zip(ys.iter_mut())
                        .map(|(s, y)| (s.w(), Shared::new(y)))
                        .collect();
                    // Another test's team may hold the pool for a moment.
                    while !team::try_run(|t| t.matvecs(&k, &jobs, &x)).expect("team job") {
                        std::thread::yield_now();
                    }
                }
                for i in 0..4 {
                    let what = format!("team matvecs {} {:?} #{i} cols {cols}", k.isa(), set);
                    check(&what, &ys[i], &wants[i], &bounds[i], &x);
                }
            }
        }
    }
}

#[test]
fn matmul_matches_oracle_every_tier() {
    let mut rng = Rng(3);
    for f in block_formats() {
        let cols = if f.block_len() == 256 { 512 } else { 96 };
        for (rows, ns) in [
            (33, (1..=17).collect::<Vec<_>>()),
            (257, vec![2, 17]),
            (7, vec![5]),
        ] {
            let s = Store::random(f, rows * cols / f.block_len(), &mut rng);
            let bound = Bound::new(&s);
            for &n in &ns {
                let x = acts_x(&mut rng, n * cols);
                let want: Vec<Vec<f32>> = (0..n)
                    .map(|t| oracle(s.w(), cols, &x[t * cols..(t + 1) * cols]))
                    .collect();
                for k in tiers() {
                    let mut y = vec![f32::NAN; n * rows];
                    k.matmul(s.w(), &x, n, &mut y);
                    for t in 0..n {
                        let what = format!(
                            "matmul {} {} {rows}x{cols} n {n} token {t}",
                            k.isa(),
                            f.name()
                        );
                        let xt = &x[t * cols..(t + 1) * cols];
                        check(&what, &y[t * rows..(t + 1) * rows], &want[t], &bound, xt);
                    }
                }
            }
        }
    }
}

#[test]
fn matmul_token_rows_equal_matvec_bit_for_bit() {
    // Batch invariance (issue 12): a token's outputs must not depend on how many tokens share
    // the product, or a batched request could sample differently than it would alone. The
    // single-token dots are the multi-token bodies with N = 1, so this holds exactly; 13 and
    // 16 tokens pass through the eight- and four-token groups of the k-quant tiles. The legacy
    // formats' panels take dot_n's steps in its order: 45 rows are two sixteen-row panels, one
    // eight-row panel and five lone rows on AVX-512 (five eight-row panels on AVX2), odd token
    // counts leave a token out of the panels' pairs, and the column counts give rows of 1, 3,
    // 6, 7 and 32 blocks (whole groups of four and a partial last one of each length).
    let mut rng = Rng(11);
    for f in block_formats() {
        for &cols in col_sizes(f) {
            let rows = 45;
            let s = Store::random(f, rows * cols / f.block_len(), &mut rng);
            for n in [1, 2, 3, 4, 9, 13, 16] {
                let x = acts_x(&mut rng, n * cols);
                for k in tiers() {
                    let mut y = vec![f32::NAN; n * rows];
                    k.matmul(s.w(), &x, n, &mut y);
                    for t in 0..n {
                        let mut alone = vec![f32::NAN; rows];
                        k.matvec(s.w(), &x[t * cols..(t + 1) * cols], &mut alone);
                        let got: Vec<u32> = y[t * rows..(t + 1) * rows]
                            .iter()
                            .map(|v| v.to_bits())
                            .collect();
                        let want: Vec<u32> = alone.iter().map(|v| v.to_bits()).collect();
                        assert_eq!(
                            got,
                            want,
                            "{} {} {cols} columns n {n} token {t}",
                            k.isa(),
                            f.name()
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn to_f32_and_value_at_equal_dequantize() {
    let mut rng = Rng(4);
    for f in block_formats() {
        let s = Store::random(f, 3, &mut rng);
        let want = deq(s.w());
        for k in tiers() {
            let mut got = vec![f32::NAN; want.len()];
            k.to_f32(s.w(), &mut got);
            assert_eq!(got, want, "{} to_f32 {}", k.isa(), f.name());
        }
        let mut got = vec![f32::NAN; want.len()];
        scalar::to_f32(s.w(), &mut got);
        assert_eq!(got, want, "scalar::to_f32 {}", f.name());
        for i in (0..want.len()).step_by(7) {
            assert_eq!(q::value_at(s.w(), i).to_bits(), want[i].to_bits());
            assert_eq!(scalar::weight_at(s.w(), i).to_bits(), want[i].to_bits());
        }
    }
}

/// The int8 path against the float dot of the dequantized weights with unquantized x.
/// Rounding x to the q8 grid (step h = d of its block: max|x|/127) errs by e_i uniform in
/// ±h/2, independent across values: E[(Σ ŵ_i e_i)²] = Σ ŵ_i² h_i²/12. On top, the f16 rounding
/// of d (Q8_0, Q8_1: relative ≤ 2^-11, the same for a whole block, so ≤ 2^-11·|Σ_block ŵx|) and
/// of s (Q8_1: ≤ 2^-11·|μ·s|), taken as worst-case, summed per row and squared. Over 64 rows ×
/// ≥ 1024 values the sample mean of the random part is within a few percent of its
/// expectation, so the NMSE must stay below twice the predicted one.
#[test]
fn int8_path_close_to_float_dot() {
    let mut rng = Rng(5);
    let (rows, cols) = (64, 1024);
    for f in block_formats() {
        let s = Store::random(f, rows * cols / f.block_len(), &mut rng);
        let (wdq, mu) = (deq(s.w()), s.mins());
        let x = acts_x(&mut rng, cols);
        let got = oracle(s.w(), cols, &x);
        let af = f.act_format().unwrap();
        let h: Vec<f64> = x
            .chunks(af.block_len())
            .flat_map(|b| {
                let m = b.iter().fold(0f32, |a, v| a.max(v.abs())) as f64 / 127.0;
                std::iter::repeat_n(m, b.len())
            })
            .collect();
        let (mut err, mut norm, mut pred) = (0f64, 0f64, 0f64);
        for r in 0..rows {
            let w = &wdq[r * cols..(r + 1) * cols];
            let want: f64 = (0..cols).map(|i| w[i] as f64 * x[i] as f64).sum();
            err += (got[r] as f64 - want).powi(2);
            norm += want * want;
            pred += (0..cols)
                .map(|i| (w[i] as f64 * h[i]).powi(2) / 12.0)
                .sum::<f64>();
            if af != ActFormat::Q8K {
                let mut det = 0f64;
                for b in (0..cols).step_by(32) {
                    let blk: f64 = (b..b + 32).map(|i| w[i] as f64 * x[i] as f64).sum();
                    let sx: f64 = (b..b + 32).map(|i| x[i] as f64).sum();
                    det += 2f64.powi(-11) * (blk.abs() + (mu[r * cols + b] as f64 * sx).abs());
                }
                pred += det * det;
            }
        }
        let (nmse, bound) = (err / norm, 2.0 * pred / norm);
        assert!(
            nmse <= bound,
            "{}: int8 path NMSE {nmse:e} > {bound:e}",
            f.name()
        );
        // And it is not vacuous: rounding x really happened.
        assert!(nmse > 0.0, "{}", f.name());
    }
}

#[test]
#[should_panic(expected = "multiple of 256 values")]
fn k_quant_rows_must_be_whole_blocks() {
    let s = Store::random(Format::Q4K, 2, &mut Rng(6));
    let x = vec![0f32; 128];
    let mut y = vec![0f32; 4];
    Kernels::for_isa(Isa::Scalar)
        .unwrap()
        .matvec(s.w(), &x, &mut y);
}

#[test]
fn q8_k_quantizer_invariants() {
    // gguf-py cannot quantize Q8_K, so its definition is checked directly: the value of largest
    // magnitude maps to ∓127 (d = max / -127), every value is within half a step, bsums hold
    // the sums of 16, and zeros stay zero.
    let mut rng = Rng(7);
    let mut x = acts_x(&mut rng, 1024);
    x[256..512].iter_mut().for_each(|v| *v = 0.0);
    let mut b = ActBuf::new();
    let Acts::Q8K(a) = b.quantize(ActFormat::Q8K, &x) else {
        panic!("Q8_K")
    };
    for (blk, xs) in a.iter().zip(x.chunks(256)) {
        let (mut amax, mut max) = (0f32, 0f32);
        xs.iter().for_each(|&v| {
            if v.abs() > amax {
                (amax, max) = (v.abs(), v)
            }
        });
        assert_eq!(
            blk.d,
            if amax == 0.0 {
                0.0
            } else {
                1.0 / (-127.0 / max)
            }
        );
        for (j, (&q, &v)) in blk.qs.iter().zip(xs).enumerate() {
            let e = (q as f32 * blk.d - v).abs();
            assert!(e <= amax / 127.0 * 0.5001, "{j}: {q} vs {v}");
        }
        for g in 0..16 {
            let s: i32 = blk.qs[16 * g..16 * g + 16].iter().map(|&q| q as i32).sum();
            assert_eq!(blk.bsums[g] as i32, s);
        }
    }
}

// ---------------------------------------------------------------- gguf-py reference

fn reference() -> Value {
    let p = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../fixtures/reference/quant/blocks.json"
    );
    serde_json::from_str(&std::fs::read_to_string(p).expect("blocks.json")).expect("json")
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap())
        .collect()
}

fn f32s(s: &str) -> Vec<f32> {
    hex(s)
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

/// `bytes` copied to a 2-byte aligned place (GGUF's guarantee) in `buf`.
fn aligned<'a>(buf: &'a mut Vec<u8>, bytes: &[u8]) -> &'a [u8] {
    buf.resize(bytes.len() + 1, 0);
    let off = buf.as_ptr().align_offset(2);
    buf[off..off + bytes.len()].copy_from_slice(bytes);
    &buf[off..off + bytes.len()]
}

/// Our dequantization equals gguf-py's bit for bit: both compute each value as the same f32
/// products of f16 scales (widened exactly) and small integers, in the same order, with no
/// fused multiply-add (numpy does not fuse; neither does Rust without being asked).
#[test]
fn dequantize_matches_gguf_py() {
    let r = reference();
    let formats = r["formats"].as_array().unwrap();
    assert_eq!(formats.len(), block_formats().len());
    for e in formats {
        let name = e["format"].as_str().unwrap();
        let f = block_formats()
            .into_iter()
            .find(|f| f.name() == name)
            .unwrap();
        let mut buf = Vec::new();
        let w = Weights::from_bytes(f, aligned(&mut buf, &hex(e["blocks"].as_str().unwrap())))
            .expect("whole blocks");
        let want = f32s(e["values"].as_str().unwrap());
        let (rows, cols) = (
            e["rows"].as_u64().unwrap() as usize,
            e["cols"].as_u64().unwrap() as usize,
        );
        assert_eq!(w.len(), rows * cols, "{name}");
        let got = deq(w);
        for i in 0..want.len() {
            assert_eq!(
                got[i].to_bits(),
                want[i].to_bits(),
                "{name} value {i}: {} vs gguf-py {}",
                got[i],
                want[i]
            );
        }
        for k in tiers() {
            let mut row = vec![0f32; cols];
            k.to_f32(w.row(rows - 1, cols), &mut row);
            assert_eq!(row, want[(rows - 1) * cols..], "{} to_f32 {name}", k.isa());
        }
    }
}

/// Our Q8_0 (and Q8_1's d and qs, the same formula) activation quantizer equals gguf-py's
/// Q8_0 quantize, which is written to be bit-exact with ggml's `quantize_row_q8_0_ref`;
/// the reference rows include values on rounding ties (rounded away from zero).
#[test]
fn activation_quantizer_matches_gguf_py() {
    let r = reference();
    for e in r["q8_0_activations"].as_array().unwrap() {
        let x = f32s(e["x"].as_str().unwrap());
        let mut buf = Vec::new();
        let Weights::Q8_0(want) = Weights::from_bytes(
            Format::Q8_0,
            aligned(&mut buf, &hex(e["blocks"].as_str().unwrap())),
        )
        .unwrap() else {
            unreachable!()
        };
        let mut b = ActBuf::new();
        let Acts::Q8_0(got) = b.quantize(ActFormat::Q8_0, &x) else {
            unreachable!()
        };
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert_eq!((g.d.to_bits(), g.qs), (w.d.to_bits(), w.qs), "block {i}");
        }
        let mut b1 = ActBuf::new();
        let Acts::Q8_1(got1) = b1.quantize(ActFormat::Q8_1, &x) else {
            unreachable!()
        };
        for (i, (g, w)) in got1.iter().zip(want).enumerate() {
            assert_eq!(
                (g.d.to_bits(), g.qs),
                (w.d.to_bits(), w.qs),
                "q8_1 block {i}"
            );
            // s = d·Σq with d before its rounding to f16 (ggml's quantize_row_q8_1_ref).
            let xs = &x[32 * i..32 * i + 32];
            let d = xs.iter().fold(0f32, |a, v| a.max(v.abs())) / 127.0;
            let sum: i32 = g.qs.iter().map(|&q| q as i32).sum();
            assert_eq!(
                g.s.to_bits(),
                f16::from_f32(sum as f32 * d).to_bits(),
                "q8_1 s {i}"
            );
        }
    }
}

// ---------------------------------------------------------------- exact integer paths

/// Power-of-two scales make every f32 step exact, so the integer sums can be checked for
/// equality, not within a bound: weights' f16 scales (and Q4_1/Q5_1 mins, k-quant dmin) are
/// ±2^e, activations are built directly with d = 2^e and |q| ≤ 31 (s and bsums consistent).
/// Every term is then a multiple of the smallest scale product and every partial sum, in any
/// order, is bounded by S = Σ(|ŵ| + 2|μ|)|x̂| (see the top of the file); when S is below 2^24
/// such units (checked per case) all f32 additions are exact, and the oracle, every tier and
/// the f64 Σ ŵ·x̂ must agree exactly.
fn pow2_store(f: Format, n: usize, rng: &mut Rng) -> Store {
    let mut s = Store::random(f, n, rng);
    let mut p2 = |neg: bool| {
        let e = (rng.next() % 2) as i32 - 1;
        let v = 2f32.powi(e);
        f16::from_f32(if neg && rng.next() & 1 == 1 { -v } else { v })
    };
    match &mut s {
        Store::Q8_0(b) => b.iter_mut().for_each(|b| b.d = p2(true)),
        Store::Q4_0(b) => b.iter_mut().for_each(|b| b.d = p2(true)),
        Store::Q5_0(b) => b.iter_mut().for_each(|b| b.d = p2(true)),
        Store::Q4_1(b) => b
            .iter_mut()
            .for_each(|b| (b.d, b.m) = (p2(false), p2(true))),
        Store::Q5_1(b) => b
            .iter_mut()
            .for_each(|b| (b.d, b.m) = (p2(false), p2(true))),
        Store::Q4K(b) => b
            .iter_mut()
            .for_each(|b| (b.d, b.dmin) = (p2(false), p2(false))),
        Store::Q5K(b) => b
            .iter_mut()
            .for_each(|b| (b.d, b.dmin) = (p2(false), p2(false))),
        // Sub-block scales in -8..=7 (the full i8 range is covered by the bounded tests):
        // with ±127 no 512-value case stays below 2^24 units.
        Store::Q6K(b) => b.iter_mut().for_each(|b| {
            b.d = p2(true);
            b.scales = b.scales.map(|v| (v & 0x0F) - 8);
        }),
    }
    s
}

enum ActStore {
    Q8_0(Vec<BlockQ8_0>),
    Q8_1(Vec<spinfer_kernels::BlockQ8_1>),
    Q8K(Vec<spinfer_kernels::BlockQ8K>),
}
impl ActStore {
    fn random(f: ActFormat, n: usize, rng: &mut Rng) -> ActStore {
        let mut q = |_| ((rng.next() % 63) as i32 - 31) as i8;
        let d = 0.5f32;
        match f {
            ActFormat::Q8_0 => ActStore::Q8_0(
                (0..n / 32)
                    .map(|_| BlockQ8_0 {
                        d: f16::from_f32(d),
                        qs: std::array::from_fn(&mut q),
                    })
                    .collect(),
            ),
            ActFormat::Q8_1 => ActStore::Q8_1(
                (0..n / 32)
                    .map(|_| {
                        let qs: [i8; 32] = std::array::from_fn(&mut q);
                        let sum: i32 = qs.iter().map(|&v| v as i32).sum();
                        spinfer_kernels::BlockQ8_1 {
                            d: f16::from_f32(d),
                            s: f16::from_f32(sum as f32 * d),
                            qs,
                        }
                    })
                    .collect(),
            ),
            ActFormat::Q8K => ActStore::Q8K(
                (0..n / 256)
                    .map(|_| {
                        let qs: [i8; 256] = std::array::from_fn(&mut q);
                        let bsums = std::array::from_fn(|g| {
                            qs[16 * g..16 * g + 16].iter().map(|&v| v as i16).sum()
                        });
                        spinfer_kernels::BlockQ8K { d, qs, bsums }
                    })
                    .collect(),
            ),
        }
    }
    fn acts(&self) -> Acts<'_> {
        match self {
            ActStore::Q8_0(a) => Acts::Q8_0(a),
            ActStore::Q8_1(a) => Acts::Q8_1(a),
            ActStore::Q8K(a) => Acts::Q8K(a),
        }
    }
}

#[test]
fn integer_sums_exact_with_power_of_two_scales() {
    let mut rng = Rng(8);
    // Each tier's one-token and four-token dots (the latter through matmul's inner step).
    for f in block_formats() {
        let cols = 512;
        let s = pow2_store(f, cols / f.block_len(), &mut rng);
        let (wdq, mu) = (deq(s.w()), s.mins());
        let acts: Vec<ActStore> = (0..4)
            .map(|_| ActStore::random(f.act_format().unwrap(), cols, &mut rng))
            .collect();
        for a in &acts {
            let xq = q::dequantize_acts(a.acts());
            let exact: f64 = (0..cols).map(|i| wdq[i] as f64 * xq[i] as f64).sum();
            // The smallest scale product is 2^-1 · 2^-1 · 0.5 (activation d).
            let unit = 0.125f64;
            let bound: f64 = (0..cols)
                .map(|i| (wdq[i].abs() as f64 + 2.0 * mu[i].abs() as f64) * xq[i].abs() as f64)
                .sum();
            assert!(
                bound / unit < (1u64 << 24) as f64,
                "{}: case too large to be exact",
                f.name()
            );
            let oracle = q::vec_dot(s.w(), a.acts());
            assert_eq!(oracle as f64, exact, "oracle {}", f.name());
        }
        let a4: [Acts<'_>; 4] = std::array::from_fn(|t| acts[t].acts());
        let want: [f32; 4] = a4.map(|a| q::vec_dot(s.w(), a));
        for k in tiers() {
            for t in 0..4 {
                let got = k.dot_quantized(s.w(), a4[t]);
                assert_eq!(got, want[t], "{} dot {} token {t}", k.isa(), f.name());
            }
            let got = k.dot4_quantized(s.w(), a4);
            assert_eq!(got, want, "{} dot4 {}", k.isa(), f.name());
        }
    }
}

/// `ActBuf` (the AVX2 quantizers where the CPU has them) equals the oracle's quantizers bit
/// for bit: random rows at many scales, rounding ties (amax = 127 makes d = 1, so x = k + ½
/// is an exact tie), zero blocks, and blocks whose largest magnitude appears with both signs
/// (Q8_K keeps the first).
#[test]
fn activation_buffer_quantizes_as_the_oracle() {
    let mut rng = Rng(9);
    let mut x = Vec::new();
    for s in [1e-6f32, 1e-2, 1.0, 37.0, 3e4] {
        x.extend(rng.vec(1024, s));
    }
    let mut ties: Vec<f32> = (0..1024).map(|i| (i % 255) as f32 - 127.0 + 0.5).collect();
    ties.iter_mut().step_by(32).for_each(|v| *v = 127.0);
    x.extend(ties);
    x.extend(std::iter::repeat_n(0.0, 512));
    let mut both: Vec<f32> = rng.vec(512, 1.0);
    both[7] = -3.0;
    both[100] = 3.0;
    both[256 + 9] = 3.0;
    both[256 + 200] = -3.0;
    x.extend(both);
    assert_eq!(x.len() % 256, 0);

    let mut b = ActBuf::new();
    let Acts::Q8_0(got) = b.quantize(ActFormat::Q8_0, &x) else {
        unreachable!()
    };
    let mut want = vec![got[0]; got.len()];
    q::quantize_q8_0(&x, &mut want);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(
            (g.d.to_bits(), g.qs),
            (w.d.to_bits(), w.qs),
            "q8_0 block {i}"
        );
    }
    let Acts::Q8_1(got) = b.quantize(ActFormat::Q8_1, &x) else {
        unreachable!()
    };
    let mut want = vec![got[0]; got.len()];
    q::quantize_q8_1(&x, &mut want);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(
            (g.d.to_bits(), g.s.to_bits(), g.qs),
            (w.d.to_bits(), w.s.to_bits(), w.qs),
            "q8_1 block {i}"
        );
    }
    let Acts::Q8K(got) = b.quantize(ActFormat::Q8K, &x) else {
        unreachable!()
    };
    let mut want = vec![got[0]; got.len()];
    q::quantize_q8_k(&x, &mut want);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(
            (g.d.to_bits(), g.qs, g.bsums),
            (w.d.to_bits(), w.qs, w.bsums),
            "q8_K block {i}"
        );
    }
}

/// AMX on block-format weights (`Precision::Amx`, the prompt path of models on AMX CPUs):
/// each weight row dequantized by the oracle and rounded to bf16, the activations rounded to
/// bf16, f32 accumulation. Each rounding moves a product by ≤ 2^-9 relative, so the result is
/// within 2^-8·Σ|ŵ x| (plus f32 summation) of the f32 product of the dequantized weights, the
/// bound `tests/amx.rs` uses for bf16 weights. Each row is computed on its own: the same bits
/// alone as in a batch.
#[test]
fn amx_on_block_formats_matches_the_dequantized_product() {
    use spinfer_kernels::Precision;
    if !spinfer_kernels::amx_available() {
        eprintln!("AMX not available here: nothing to check");
        return;
    }
    let k = Kernels::for_isa(Isa::Avx512).expect("AMX CPUs have AVX-512");
    let mut rng = Rng(21);
    for f in block_formats() {
        let cols = if f.block_len() == 256 { 512 } else { 96 };
        for (rows, n) in [(33, 17), (7, 1), (40, 33)] {
            let s = Store::random(f, rows * cols / f.block_len(), &mut rng);
            let wdq = deq(s.w());
            let x = acts_x(&mut rng, n * cols);
            let before = spinfer_kernels::amx_calls();
            let mut y = vec![f32::NAN; n * rows];
            k.matmul_with(Precision::Amx, s.w(), &x, n, &mut y);
            assert!(
                spinfer_kernels::amx_calls() > before,
                "{} AMX did not run",
                f.name()
            );
            for t in 0..n {
                let xt = &x[t * cols..(t + 1) * cols];
                for r in 0..rows {
                    let wr = &wdq[r * cols..(r + 1) * cols];
                    let exact: f64 = wr.iter().zip(xt).map(|(&w, &v)| w as f64 * v as f64).sum();
                    let abs: f64 = wr
                        .iter()
                        .zip(xt)
                        .map(|(&w, &v)| (w as f64 * v as f64).abs())
                        .sum();
                    let tol = abs * (1.0 + 1e-4) / 256.0 + 1e-30;
                    let got = y[t * rows + r] as f64;
                    assert!(
                        (got - exact).abs() <= tol,
                        "AMX {} {rows}x{cols} n {n} ({t},{r}): {got} vs {exact} (tol {tol:e})",
                        f.name()
                    );
                }
            }
            // The first token alone gives its batched row's bits.
            let mut one = vec![0f32; rows];
            k.matmul_with(Precision::Amx, s.w(), &x[..cols], 1, &mut one);
            assert_eq!(one, y[..rows], "{} token 0 alone vs batched", f.name());
        }
    }
}
