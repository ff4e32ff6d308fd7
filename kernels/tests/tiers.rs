//! Every tier this host can run against the scalar oracle (`scalar.rs`, f64 accumulation),
//! over awkward sizes, each dtype, unaligned starts.
//!
//! Tolerances. f16/bf16 → f32 widening is exact, so the oracle and the tiers multiply the same
//! f32 values and the dtype does not change the bound; only the f32 accumulation order does.
//! Blocked f32 summation of k products has error ≤ ~(k/lanes + log2 lanes)·2^-24·Σ|w_i x_i|,
//! under 1e-5·Σ|w x| for every k here (k ≤ 2048: 132·6e-8 = 8e-6), so products are checked as
//! |y - y_ref| ≤ 1e-5·Σ|w x| + 1e-30. Elementwise ops: exp/erfc polynomials are good to a few
//! ulp (erfc 1.2e-7 fractional, exp's argument rounding ≤ 2e-6 relative for |x| ≤ 8), so
//! |y - y_ref| ≤ 1e-6 + 1e-5·|y_ref|; norms add an f32 sum of squares (same 1e-5 relative).

use spinfer_kernels::{bf16, f16, scalar, Epilogue, Isa, Kernels, Precision, Weights};

mod common;
use common::Rng;

fn tiers() -> Vec<Kernels> {
    Isa::available()
        .into_iter()
        .map(|i| {
            let k = Kernels::for_isa(i).expect("available tier must load");
            assert_eq!(k.isa(), i, "asked for {i}, got {}", k.isa());
            k
        })
        .collect()
}

/// Weights of all three dtypes holding the same values (rounded through f16 and bf16 so every
/// dtype stores them exactly; f16's range is fine for |v| ≤ 2).
struct W {
    f32: Vec<f32>,
    f16: Vec<f16>,
    bf16: Vec<bf16>,
}
impl W {
    fn new(rng: &mut Rng, n: usize) -> W {
        let v: Vec<f32> = rng
            .vec(n, 2.0)
            .into_iter()
            .map(|x| bf16::from_f32(x).to_f32())
            .collect();
        W {
            f16: v.iter().map(|&x| f16::from_f32(x)).collect(),
            bf16: v.iter().map(|&x| bf16::from_f32(x)).collect(),
            f32: v,
        }
    }
    fn all(&self, off: usize) -> [Weights<'_>; 3] {
        [
            Weights::F32(&self.f32[off..]),
            Weights::F16(&self.f16[off..]),
            Weights::Bf16(&self.bf16[off..]),
        ]
    }
}

/// Σ|w_i x_i| for row r of w (rows, k): the scale of the accumulation error.
fn absdot(w: Weights<'_>, x: &[f32]) -> f64 {
    (0..x.len())
        .map(|i| (scalar::weight_at(w, i) as f64 * x[i] as f64).abs())
        .sum()
}

fn check_products(k: &Kernels, w: Weights<'_>, x: &[f32], rows: usize, what: &str) {
    let cols = x.len();
    let mut want = vec![0f32; rows];
    scalar::matvec(w, x, &mut want);
    let mut got = vec![f32::NAN; rows];
    k.matvec(w, x, &mut got);
    for r in 0..rows {
        let wr = w.row(r, cols);
        let tol = 1e-5 * absdot(wr, x) + 1e-30;
        let err = (got[r] as f64 - want[r] as f64).abs();
        assert!(
            err <= tol,
            "{} matvec {what} {rows}x{cols} row {r}: {} vs {} (err {err:e} > {tol:e})",
            k.isa(),
            got[r],
            want[r]
        );
    }
    if rows == 1 {
        let d = k.dot(w.slice(0, cols), x);
        let tol = 1e-5 * absdot(w, x) + 1e-30;
        assert!(
            (d as f64 - want[0] as f64).abs() <= tol,
            "{} dot {what}",
            k.isa()
        );
    }
}

#[test]
fn detected_tiers_really_run() {
    let have = Isa::available();
    assert!(have.contains(&Isa::Scalar) && have.contains(&Isa::Portable));
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
        {
            let k = Kernels::for_isa(Isa::Avx512).expect("avx512 tier");
            assert_eq!(k.isa(), Isa::Avx512);
            assert_eq!(
                k.has_bf16_dot(),
                is_x86_feature_detected!("avx512bf16"),
                "bf16 dot path must be present exactly when the CPU has avx512bf16"
            );
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            let k = Kernels::for_isa(Isa::Avx2).expect("avx2 tier");
            assert_eq!(k.isa(), Isa::Avx2);
        }
        assert!(Kernels::for_isa(Isa::Neon).is_err());
    }
    #[cfg(target_arch = "aarch64")]
    {
        let k = Kernels::for_isa(Isa::Neon).expect("neon tier");
        assert_eq!(k.isa(), Isa::Neon);
        assert!(Kernels::for_isa(Isa::Avx2).is_err());
    }
}

#[test]
fn unknown_or_unavailable_tier_names_what_the_cpu_has() {
    let e = Kernels::for_name("sse9")
        .err()
        .expect("unknown tier must fail");
    for i in Isa::available() {
        assert!(e.0.contains(i.name()), "{e} should list {i}");
    }
    assert!(e.0.contains("sse9"), "{e}");
    let missing = Isa::ALL.into_iter().find(|i| !i.is_available());
    if let Some(m) = missing {
        let e = Kernels::for_name(m.name())
            .err()
            .expect("unavailable tier must fail");
        assert!(
            e.0.contains("this CPU has") && e.0.contains("scalar"),
            "{e}"
        );
    }
    assert_eq!(
        Kernels::for_name("scalar").map(|k| k.isa()),
        Ok(Isa::Scalar)
    );
}

#[test]
fn dot_and_matvec_every_tail() {
    let mut rng = Rng(1);
    for cols in 0..=40 {
        let rows = 1 + cols % 7;
        let w = W::new(&mut rng, rows * cols + 3);
        let x = rng.vec(cols + 1, 1.0);
        for k in tiers() {
            for off in [0, 1] {
                for wt in w.all(off) {
                    let wt = wt.slice(0, rows * cols);
                    check_products(&k, wt, &x[off.min(x.len() - cols)..][..cols], rows, "tail");
                }
            }
        }
    }
}

#[test]
fn matvec_model_sizes() {
    let mut rng = Rng(2);
    for (rows, cols, off) in [(17, 257, 3), (5632, 2048, 1), (64, 2048, 0)] {
        let w = W::new(&mut rng, rows * cols + off);
        let x = rng.vec(cols + 1, 1.0);
        for k in tiers() {
            for wt in w.all(off) {
                check_products(&k, wt.slice(0, rows * cols), &x[1..], rows, "size");
            }
        }
    }
}

#[test]
fn strided_matvec_reads_a_column_block() {
    // Rows `ld` apart: the first `cols` columns of a wider matrix, every tile tail.
    let mut rng = Rng(6);
    for (rows, cols, ld) in [(1, 5, 9), (13, 37, 40), (64, 160, 192), (9, 16, 16)] {
        let w = W::new(&mut rng, rows * ld);
        let x = rng.vec(cols, 1.0);
        for k in tiers() {
            for wt in w.all(0) {
                let wt = wt.slice(0, (rows - 1) * ld + cols);
                let mut got = vec![f32::NAN; rows];
                k.matvec_strided(wt, ld, &x, &mut got);
                for (r, g) in got.iter().enumerate() {
                    let row = wt.slice(r * ld, r * ld + cols);
                    let mut want = [0f32];
                    scalar::matvec(row, &x, &mut want);
                    let tol = 1e-5 * absdot(row, &x) + 1e-30;
                    let err = (*g as f64 - want[0] as f64).abs();
                    assert!(
                        err <= tol,
                        "{} strided row {r} of {rows}x{cols}/{ld}",
                        k.isa()
                    );
                }
            }
        }
    }
}

#[test]
fn matvecs_fused_match_separate_products() {
    // Rows that leave 8-, 4- and 1-row tails, enough of them to run on the pool in blocks that
    // end inside a matrix, and a different dtype per matrix.
    let mut rng = Rng(5);
    let cols = 300;
    let rows = [13, 301, 40];
    let ws: Vec<W> = rows.iter().map(|&r| W::new(&mut rng, r * cols)).collect();
    let x = rng.vec(cols, 1.0);
    for k in tiers() {
        for shift in 0..3 {
            let wts: Vec<Weights<'_>> = (0..3).map(|i| ws[i].all(0)[(i + shift) % 3]).collect();
            let mut ys: Vec<Vec<f32>> = rows.iter().map(|&r| vec![f32::NAN; r]).collect();
            let [y0, y1, y2] = &mut ys[..] else {
                unreachable!()
            };
            k.matvecs(&mut [(wts[0], y0), (wts[1], y1), (wts[2], y2)], &x);
            for i in 0..3 {
                let mut want = vec![0f32; rows[i]];
                scalar::matvec(wts[i], &x, &mut want);
                for r in 0..rows[i] {
                    let tol = 1e-5 * absdot(wts[i].row(r, cols), &x) + 1e-30;
                    let err = (ys[i][r] as f64 - want[r] as f64).abs();
                    assert!(
                        err <= tol,
                        "{} matvecs matrix {i} row {r}: {err:e}",
                        k.isa()
                    );
                }
            }
        }
    }
}

fn check_matmul(rng: &mut Rng, n: usize, m: usize, kk: usize) {
    let w = W::new(rng, m * kk + 1);
    let x = rng.vec(n * kk + 1, 1.0);
    let x = &x[1..]; // odd start: unaligned rows
    for wt in w.all(1) {
        let wt = wt.slice(0, m * kk);
        let mut want = vec![0f32; n * m];
        scalar::matmul(wt, x, n, &mut want);
        for k in tiers() {
            let mut got = vec![f32::NAN; n * m];
            k.matmul_with(Precision::Exact, wt, x, n, &mut got);
            for t in 0..n {
                for r in 0..m {
                    let tol = 1e-5 * absdot(wt.row(r, kk), &x[t * kk..(t + 1) * kk]) + 1e-30;
                    let (g, e) = (got[t * m + r], want[t * m + r]);
                    assert!(
                        ((g - e) as f64).abs() <= tol,
                        "{} matmul {n}x{m}x{kk} {:?} at ({t},{r}): {g} vs {e}",
                        k.isa(),
                        std::mem::discriminant(&wt)
                    );
                }
            }
        }
    }
}

#[test]
fn matmul_awkward_shapes() {
    let mut rng = Rng(3);
    // Edges of the 4×6 / 4×2 / 2×2 / 4×4 tiles, k tails, the 512 k-block and 64-row m-block,
    // and one shape big enough to be split over threads.
    for (n, m, k) in [
        (2, 1, 1),
        (2, 3, 0),
        (3, 5, 7),
        (4, 4, 16),
        (7, 9, 33),
        (13, 17, 257),
        (6, 70, 530),
        (25, 130, 1100),
        (64, 96, 512),
        // One-vector tiles (n ≤ 16, and a last group of ≤ 16 after a full one), with one and
        // with several k-blocks.
        (15, 40, 384),
        (9, 13, 20),
        (40, 61, 1100),
        (47, 25, 513),
        // AVX-512's 64-token groups: last groups of two and three vectors, and f32 rows a
        // multiple of 4 KiB apart (read in place).
        (97, 50, 300),
        (33, 12, 130),
        (80, 14, 2048),
        // One group of ≤ one vector (a decode batch, `op_one`): 8-row tiles read in place (bf16
        // two columns per step: odd k leaves one), a short last tile, rows split over threads.
        (8, 203, 2049),
        (5, 8, 1),
        (4, 17, 2),
    ] {
        check_matmul(&mut rng, n, m, k);
    }
}

/// `matmul_packed` against the oracle, plain and with each epilogue: the product's bound as
/// for `matmul`, then GELU (slope ≤ 1.13) adds its elementwise bound.
#[test]
fn matmul_packed_shapes_and_epilogues() {
    let mut rng = Rng(7);
    // Tile edges (≤ 12 tokens, uneven splits), partial last panels, several k-blocks, a
    // split over threads.
    for (n, m, kk) in [
        (1, 1, 1),
        (13, 40, 1100),
        (25, 33, 513),
        (2, 3, 0),
        (3, 5, 7),
        (13, 17, 33),
        (18, 384, 384),
        (25, 70, 100),
        (40, 61, 257),
        (70, 130, 300),
    ] {
        let w = W::new(&mut rng, m * kk);
        let x = rng.vec(n * kk + 1, 1.0);
        let x = &x[1..]; // odd start: unaligned rows
        let bias = rng.vec(m, 1.0);
        let res = rng.vec(n * m, 1.0);
        for wt in w.all(0) {
            let mut prod = vec![0f32; n * m];
            scalar::matmul(wt, x, n, &mut prod);
            for k in tiers() {
                let pw = k.pack_weights(wt, m, kk);
                for (bi, (b, r, g)) in [
                    (None, None, false),
                    (Some(&bias[..]), None, true),
                    (Some(&bias[..]), Some(&res[..]), false),
                ]
                .into_iter()
                .enumerate()
                {
                    let mut want = prod.clone();
                    for t in 0..n {
                        let row = &mut want[t * m..(t + 1) * m];
                        if let Some(b) = b {
                            scalar::add(row, b);
                        }
                        if let Some(r) = r {
                            scalar::add(row, &r[t * m..(t + 1) * m]);
                        }
                        if g {
                            scalar::gelu(row);
                        }
                    }
                    let mut got = vec![f32::NAN; n * m];
                    let epi = Epilogue {
                        bias: b,
                        residual: r,
                        gelu: g,
                    };
                    k.matmul_packed(&pw, x, n, &mut got, epi);
                    for t in 0..n {
                        for c in 0..m {
                            let (gv, e) = (got[t * m + c], want[t * m + c]);
                            let tol = 1.2e-5 * absdot(wt.row(c, kk), &x[t * kk..(t + 1) * kk])
                                + 1e-6
                                + 1e-5 * e.abs() as f64;
                            assert!(
                                ((gv - e) as f64).abs() <= tol,
                                "{} matmul_packed {n}x{m}x{kk} epilogue {bi} at ({t},{c}): {gv} vs {e}",
                                k.isa()
                            );
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn matmul_n0_and_n1() {
    let mut rng = Rng(4);
    let w = W::new(&mut rng, 5 * 9);
    let x = rng.vec(9, 1.0);
    for k in tiers() {
        for wt in w.all(0) {
            k.matmul(wt, &[], 0, &mut []);
            let mut got = vec![0f32; 5];
            k.matmul(wt, &x, 1, &mut got);
            let mut want = vec![0f32; 5];
            scalar::matvec(wt, &x, &mut want);
            for r in 0..5 {
                assert!((got[r] - want[r]).abs() <= 1e-5 * absdot(wt.row(r, 9), &x) as f32);
            }
        }
    }
}

/// The AVX-512 BF16 path rounds activations to bf16: each product carries a relative error
/// ≤ 2^-9 (bf16 has 8 significant bits, round to nearest), so |y - y_ref| ≤ 2^-9·Σ|w x| plus
/// f32 accumulation; we check 2^-8·Σ|w x|. The test also proves the path ran: its result must
/// differ from the exact one (X here is not bf16-representable).
#[test]
fn bf16_dot_matmul_error_bound() {
    let mut rng = Rng(5);
    let mut ran = false;
    for k in tiers().into_iter().filter(|k| k.has_bf16_dot()) {
        for (n, m, kk) in [(2, 3, 5), (7, 9, 33), (13, 70, 257), (30, 75, 1100)] {
            let w = W::new(&mut rng, m * kk + 1);
            let x = rng.vec(n * kk, 1.0);
            let wt = Weights::Bf16(&w.bf16[1..]);
            let mut want = vec![0f32; n * m];
            scalar::matmul(wt, &x, n, &mut want);
            let mut got = vec![0f32; n * m];
            k.matmul_with(Precision::Bf16Dot, wt, &x, n, &mut got);
            let mut exact = vec![0f32; n * m];
            k.matmul_with(Precision::Exact, wt, &x, n, &mut exact);
            for t in 0..n {
                for r in 0..m {
                    let s = absdot(wt.row(r, kk), &x[t * kk..(t + 1) * kk]);
                    let err = (got[t * m + r] - want[t * m + r]).abs() as f64;
                    assert!(err <= s / 256.0 + 1e-30, "bf16 dot {n}x{m}x{kk} ({t},{r})");
                }
            }
            assert_ne!(got, exact, "bf16 dot path did not run");
            ran = true;
        }
    }
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512bf16") && is_x86_feature_detected!("avx512bw") {
        assert!(ran, "CPU has avx512bf16 but no tier ran the bf16 dot path");
    }
    let _ = ran;
}

fn close(got: &[f32], want: &[f32], what: &str, isa: Isa) {
    assert_eq!(got.len(), want.len());
    for i in 0..got.len() {
        let (g, e) = (got[i], want[i]);
        let ok = (g == e) || ((g - e).abs() as f64) <= 1e-6 + 1e-5 * (e.abs() as f64);
        assert!(ok, "{isa} {what} len {} at {i}: {g} vs {e}", got.len());
    }
}

fn lengths() -> Vec<usize> {
    let mut v: Vec<usize> = (0..=40).collect();
    v.extend([63, 255, 1000, 5632]);
    v
}

#[test]
#[allow(clippy::type_complexity)]
fn elementwise_ops() {
    let mut rng = Rng(6);
    for len in lengths() {
        let a = rng.vec(len + 1, 8.0);
        let b = rng.vec(len + 1, 2.0);
        let c = rng.vec(len + 1, 1.0);
        let (a, b, c) = (&a[1..], &b[1..], &c[..len]); // odd starts
        for k in tiers() {
            let isa = k.isa();
            let unary: [(&str, fn(&Kernels, &mut [f32]), fn(&mut [f32])); 4] = [
                ("softmax", |k, x| k.softmax(x), scalar::softmax),
                ("silu", |k, x| k.silu(x), scalar::silu),
                ("gelu", |k, x| k.gelu(x), scalar::gelu),
                (
                    "scale",
                    |k, x| k.scale(x, -0.37),
                    |x| scalar::scale(x, -0.37),
                ),
            ];
            for (name, f, oracle) in unary {
                let mut got = a.to_vec();
                let mut want = a.to_vec();
                f(&k, &mut got);
                oracle(&mut want);
                close(&got, &want, name, isa);
            }
            let mut got = a.to_vec();
            let mut want = a.to_vec();
            k.silu_mul(&mut got, b);
            scalar::silu_mul(&mut want, b);
            close(&got, &want, "silu_mul", isa);
            let mut got = a.to_vec();
            let mut want = a.to_vec();
            k.add(&mut got, b);
            scalar::add(&mut want, b);
            close(&got, &want, "add", isa);
            let mut got = a.to_vec();
            let mut want = a.to_vec();
            k.axpy(&mut got, 0.3, b);
            scalar::axpy(&mut want, 0.3, b);
            close(&got, &want, "axpy", isa);
            let mut got = vec![0f32; len];
            let mut want = vec![0f32; len];
            k.rmsnorm(a, b, 1e-5, &mut got);
            scalar::rmsnorm(a, b, 1e-5, &mut want);
            close(&got, &want, "rmsnorm", isa);
            k.layernorm(a, b, c, 1e-12, &mut got);
            scalar::layernorm(a, b, c, 1e-12, &mut want);
            close(&got, &want, "layernorm", isa);
        }
    }
}

#[test]
fn softmax_masked_entries_are_exactly_zero() {
    for k in tiers() {
        for len in [3, 17, 40] {
            let mut x: Vec<f32> = (0..len).map(|i| i as f32 * 0.1).collect();
            for i in (0..len).step_by(3) {
                x[i] = f32::NEG_INFINITY;
            }
            k.softmax(&mut x);
            for (i, v) in x.iter().enumerate() {
                assert_eq!(*v == 0.0, i % 3 == 0, "{} {len} {i}: {v}", k.isa());
            }
            let s: f32 = x.iter().sum();
            assert!((s - 1.0).abs() < 1e-5);
        }
    }
}

#[test]
fn gelu_far_tails_keep_relative_accuracy() {
    // The erfc form keeps GELU's tiny negative tail accurate relative to its size.
    let xs: Vec<f32> = (0..64).map(|i| -6.0 + i as f32 * 0.1875).collect();
    for k in tiers() {
        let mut got = xs.clone();
        let mut want = xs.clone();
        k.gelu(&mut got);
        scalar::gelu(&mut want);
        for i in 0..xs.len() {
            let rel = ((got[i] - want[i]) / want[i]).abs();
            assert!(
                got[i] == want[i] || rel < 2e-5,
                "{} gelu({}) = {} vs {}",
                k.isa(),
                xs[i],
                got[i],
                want[i]
            );
        }
    }
}

#[test]
fn rope_and_to_f32() {
    let mut rng = Rng(7);
    for hd in [2, 6, 16, 34, 64, 128] {
        let heads = 3;
        let x = rng.vec(heads * hd + 1, 2.0);
        let cos = rng.vec(hd / 2, 1.0);
        let sin = rng.vec(hd / 2, 1.0);
        for k in tiers() {
            let mut got = x[1..].to_vec();
            let mut want = x[1..].to_vec();
            k.rope(&mut got, hd, &cos, &sin);
            scalar::rope(&mut want, hd, &cos, &sin);
            close(&got, &want, "rope", k.isa());
        }
    }
    for len in lengths() {
        let w = W::new(&mut rng, len + 1);
        for k in tiers() {
            for wt in w.all(1) {
                let mut got = vec![f32::NAN; len];
                let mut want = vec![0f32; len];
                k.to_f32(wt, &mut got);
                scalar::to_f32(wt, &mut want);
                assert_eq!(got, want, "{} to_f32 exact", k.isa());
            }
        }
    }
    // Specials: f16 subnormals, infinities, NaN widen exactly (the NEON tier does this by hand).
    let specials: Vec<f16> = [
        0x0001u16, 0x03ff, 0x0400, 0x7bff, 0x7c00, 0xfc00, 0x8001, 0x3c00,
    ]
    .into_iter()
    .chain([0x7e00])
    .map(f16::from_bits)
    .collect();
    for k in tiers() {
        let mut got = vec![0f32; specials.len()];
        k.to_f32(Weights::F16(&specials), &mut got);
        for (g, h) in got.iter().zip(&specials) {
            let e = h.to_f32();
            assert!(
                g.to_bits() == e.to_bits() || (g.is_nan() && e.is_nan()),
                "{}",
                k.isa()
            );
        }
    }
}

/// The exact policy's choice is bit-identical to `Precision::Exact` for every tier and
/// weight dtype, whatever the process default (tests/amx.rs checks the AMX default).
#[test]
fn exact_policy_is_the_exact_path() {
    let mut rng = Rng(8);
    let (n, m, kk) = (5, 40, 70);
    let w = W::new(&mut rng, m * kk);
    let x = rng.vec(n * kk, 1.0);
    for k in tiers() {
        for wt in w.all(0) {
            let mut a = vec![0f32; n * m];
            let mut b = vec![0f32; n * m];
            let p = spinfer_kernels::Policy::EXACT.precision(wt, n);
            k.matmul_with(p, wt, &x, n, &mut a);
            k.matmul_with(Precision::Exact, wt, &x, n, &mut b);
            assert_eq!(a, b, "{}", k.isa());
        }
    }
}
