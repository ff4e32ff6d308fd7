//! The AMX bf16 matmul (`Precision::Amx`) against the scalar oracle.
//!
//! Tolerance: AMX rounds activations to bf16 (8 significant bits, round to nearest even:
//! relative error ≤ 2^-9 per product) and accumulates in f32, so |y - y_ref| ≤ 2^-9·Σ|w x|
//! plus f32 accumulation error; we check 2^-8·Σ|w x|, the bound of the AVX-512 BF16 dot test.
//! Σ|w x| is computed exactly enough by the oracle on |W| and |X|.

use spinfer_kernels::{bf16, scalar, Isa, Kernels, Precision, Weights};

mod common;
use common::Rng;

fn avx512() -> Option<Kernels> {
    Kernels::for_isa(Isa::Avx512).ok()
}

/// `len` random bf16 values.
fn bf16s(rng: &mut Rng, len: usize) -> Vec<bf16> {
    rng.vec(len, 1.0)
        .iter()
        .map(|&v| bf16::from_f32(v))
        .collect()
}

/// AMX result for (n, m, k) checked against the oracle; returns whether AMX ran.
fn check(k: &Kernels, rng: &mut Rng, n: usize, m: usize, kk: usize) {
    // Offset by one element: W rows and X rows start unaligned.
    let wv = bf16s(rng, m * kk + 1);
    let w = Weights::Bf16(&wv[1..]);
    let xv = rng.vec(n * kk + 1, 1.0);
    let x = &xv[1..];
    let mut want = vec![0f32; n * m];
    scalar::matmul(w, x, n, &mut want);
    let wa: Vec<bf16> = wv[1..]
        .iter()
        .map(|v| bf16::from_f32(v.to_f32().abs()))
        .collect();
    let xa: Vec<f32> = x.iter().map(|v| v.abs()).collect();
    let mut sum_abs = vec![0f32; n * m];
    scalar::matmul(Weights::Bf16(&wa), &xa, n, &mut sum_abs);
    let before = spinfer_kernels::amx_calls();
    let mut got = vec![f32::NAN; n * m];
    k.matmul_with(Precision::Amx, w, x, n, &mut got);
    assert!(
        spinfer_kernels::amx_calls() > before,
        "AMX path did not run for {n}x{m}x{kk}"
    );
    for t in 0..n {
        for r in 0..m {
            let (g, e) = (got[t * m + r], want[t * m + r]);
            let tol = sum_abs[t * m + r] as f64 * (1.0 + 1e-4) / 256.0 + 1e-30;
            assert!(
                ((g - e) as f64).abs() <= tol,
                "AMX {n}x{m}x{kk} at ({t},{r}): {g} vs {e} (tol {tol})"
            );
        }
    }
}

#[test]
fn amx_matches_oracle_on_awkward_shapes() {
    if !spinfer_kernels::amx_available() {
        eprintln!("AMX not available here; amx_runs_where_the_cpu_has_it decides if that is ok");
        return;
    }
    let k = avx512().expect("AMX CPUs have AVX-512");
    let mut rng = Rng(11);
    // Tails of the 16-row / 16-token tiles, the 32-wide k step, the 2×2 tile block, and
    // sizes split over threads; 17×257 and a model-sized 128×5632×2048.
    for (n, m, kk) in [
        (2, 3, 5),
        (2, 1, 1),
        (16, 16, 32),
        (17, 17, 257),
        (13, 70, 257),
        (33, 50, 31),
        (40, 64, 1),
        (31, 33, 64),
        (48, 100, 95),
        (64, 130, 1100),
        (128, 5632, 2048),
    ] {
        check(&k, &mut rng, n, m, kk);
    }
}

#[test]
fn amx_runs_where_the_cpu_has_it() {
    if !spinfer_kernels::cpu_has_amx() {
        assert!(!spinfer_kernels::amx_available());
        return;
    }
    assert!(
        spinfer_kernels::amx_available(),
        "CPU reports AMX-TILE/AMX-BF16 but the tile-data permission (arch_prctl) failed"
    );
    let k = avx512().expect("AMX CPUs have AVX-512");
    let mut rng = Rng(12);
    check(&k, &mut rng, 20, 40, 70);
}

/// `matmul` takes AMX by default for bf16 weights and n ≥ 2 (unless SPINFER_AMX=0), and the
/// exact policy's choice is the exact path bit for bit, whatever the process default.
#[test]
fn matmul_default_uses_amx_and_the_exact_policy_does_not() {
    let Some(k) = avx512() else { return };
    let mut rng = Rng(13);
    let (n, m, kk) = (24, 48, 100);
    let wv = bf16s(&mut rng, m * kk);
    let w = Weights::Bf16(&wv);
    let x = rng.vec(n * kk, 1.0);
    let env_off = matches!(
        std::env::var("SPINFER_AMX").as_deref(),
        Ok("0" | "off" | "false")
    );
    assert_eq!(
        spinfer_kernels::amx_enabled(),
        spinfer_kernels::amx_available() && !env_off
    );
    let mut y = vec![0f32; n * m];
    if spinfer_kernels::amx_enabled() {
        let before = spinfer_kernels::amx_calls();
        k.matmul(w, &x, n, &mut y);
        assert!(
            spinfer_kernels::amx_calls() > before,
            "default matmul skipped AMX"
        );
    }
    let exact_policy = spinfer_kernels::Policy::EXACT.precision(w, n);
    assert_eq!(exact_policy, Precision::Exact);
    k.matmul_with(exact_policy, w, &x, n, &mut y);
    let mut exact = vec![0f32; n * m];
    k.matmul_with(Precision::Exact, w, &x, n, &mut exact);
    assert_eq!(y, exact);
    let amx_policy = spinfer_kernels::Policy {
        amx: true,
        bf16_dot: false,
    };
    let want = if spinfer_kernels::amx_available() {
        Precision::Amx
    } else {
        Precision::Exact
    };
    assert_eq!(amx_policy.precision(w, n), want);
}

/// The rounded precisions compute each token row on its own: a row's bits are the same alone
/// (n = 1, which must not fall back to the exact matrix-vector product) and at any place in
/// any batch. Models rely on it to round a prompt's rows the same however they are chunked or
/// batched (src/llama/forward.rs, `Run`).
#[test]
fn rounded_rows_are_the_same_alone_and_in_any_batch() {
    let Some(k) = avx512() else { return };
    let mut rng = Rng(14);
    let (m, kk) = (70, 300);
    let wv = bf16s(&mut rng, m * kk);
    let w = Weights::Bf16(&wv);
    let x = rng.vec(37 * kk, 1.0);
    let mut precisions = Vec::new();
    if spinfer_kernels::amx_available() {
        precisions.push(Precision::Amx);
    }
    if k.has_bf16_dot() {
        precisions.push(Precision::Bf16Dot);
    }
    for p in precisions {
        let mut batch = vec![0f32; 37 * m];
        k.matmul_with(p, w, &x, 37, &mut batch);
        let mut exact = vec![0f32; m];
        k.matvec(w, &x[..kk], &mut exact);
        for (t0, n) in [(0, 1), (5, 1), (36, 1), (3, 2), (10, 17), (1, 33)] {
            let mut y = vec![0f32; n * m];
            k.matmul_with(p, w, &x[t0 * kk..(t0 + n) * kk], n, &mut y);
            assert_eq!(
                y,
                batch[t0 * m..(t0 + n) * m],
                "{p:?} rows {t0}..{}",
                t0 + n
            );
        }
        let mut one = vec![0f32; m];
        k.matmul_with(p, w, &x[..kk], 1, &mut one);
        assert_ne!(one, exact, "{p:?} with one token took the exact matvec");
    }
}
