//! Attention's kernels (`Kernels::attn_scores`, `Kernels::attn_values`): a query's results
//! must have the same bits whatever other queries share the call and however many positions
//! there are (prompt chunking and batching must not change a token's numbers), and be right
//! (f64 references, each multiply-add rounding once).

use spinfer_kernels::{Isa, Kernels, ATT_PAD};

mod common;
use common::Rng;

fn tiers() -> Vec<Kernels> {
    Isa::available()
        .into_iter()
        .map(|i| Kernels::for_isa(i).expect("available tier must load"))
        .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn scores_are_the_same_for_any_block_and_length_and_right() {
    let mut rng = Rng(21);
    let pad = |l: usize| l.next_multiple_of(ATT_PAD);
    for hd in [5, 8, 32, 64, 80, 96, 128] {
        let cap = pad(130);
        // Transposed keys (row d: dimension d of every position), finite junk past the end.
        let kt = rng.vec(hd * cap, 1.0);
        for len in [1, 7, 16, 33, 130] {
            for n in [1, 2, 3, 5, 8, 9] {
                let q = rng.vec(n * hd, 1.0);
                for k in tiers() {
                    let ld = pad(len) + 16;
                    let mut got = vec![f32::NAN; n * ld];
                    k.attn_scores(&kt, cap, len, &q, n, ld, &mut got);
                    for t in 0..n {
                        let what = format!("{} hd {hd} len {len} n {n} query {t}", k.isa());
                        let qt = &q[t * hd..(t + 1) * hd];
                        // Alone, and over a longer stretch of keys: the same bits.
                        let mut alone = vec![f32::NAN; pad(130)];
                        k.attn_scores(&kt, cap, 130, qt, 1, pad(130), &mut alone);
                        assert_eq!(
                            bits(&got[t * ld..t * ld + len]),
                            bits(&alone[..len]),
                            "{what}"
                        );
                        for j in 0..len {
                            let (mut want, mut mag) = (0f64, 0f64);
                            for d in 0..hd {
                                let x = qt[d] as f64 * kt[d * cap + j] as f64;
                                want += x;
                                mag += x.abs();
                            }
                            let bound = mag * hd as f64 * f32::EPSILON as f64 / 2.0 + 1e-30;
                            let e = (alone[j] as f64 - want).abs();
                            assert!(e <= bound, "{what} key {j}: {} vs {want}", alone[j]);
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn values_rows_are_the_same_alone_and_in_any_block_and_right() {
    let mut rng = Rng(22);
    for hd in [5, 8, 32, 64, 80, 96, 128] {
        let cap = 70;
        let v = rng.vec(cap * hd, 1.0);
        for n in [1, 2, 3, 4, 5, 9] {
            let ld = cap + 3;
            let p: Vec<f32> = rng.vec(n * ld, 1.0).iter().map(|x| x.abs()).collect();
            // Causal lengths as a prompt chunk has them, plus a zero-length row.
            let lens: Vec<usize> = (0..n)
                .map(|r| (cap - n + r + 1) * (r % 4 != 3) as usize)
                .collect();
            for k in tiers() {
                let mut got = vec![f32::NAN; n * hd];
                k.attn_values(&v, hd, &p, ld, &lens, &mut got);
                for r in 0..n {
                    let mut alone = vec![f32::NAN; hd];
                    let pr = &p[r * ld..(r + 1) * ld];
                    k.attn_values(&v, hd, pr, ld, &lens[r..r + 1], &mut alone);
                    let what = format!("{} hd {hd} n {n} row {r}", k.isa());
                    assert_eq!(bits(&got[r * hd..(r + 1) * hd]), bits(&alone), "{what}");
                    for d in 0..hd {
                        // f64 reference; each of len multiply-adds rounds once (≤ 2^-24 of
                        // the running sum, itself ≤ Σ|p·v|).
                        let (mut want, mut mag) = (0f64, 0f64);
                        for j in 0..lens[r] {
                            let t = pr[j] as f64 * v[j * hd + d] as f64;
                            want += t;
                            mag += t.abs();
                        }
                        let bound = mag * lens[r] as f64 * f32::EPSILON as f64 / 2.0 + 1e-30;
                        let e = (alone[d] as f64 - want).abs();
                        assert!(
                            e <= bound,
                            "{what} d {d}: {} vs {want} (bound {bound})",
                            alone[d]
                        );
                    }
                }
            }
        }
    }
}
