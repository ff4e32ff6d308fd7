//! Decode's Q4_K body on the AVX-512 VNNI tier: a super-block's 256 values in four 512-bit
//! vectors.
//!
//! Why: the 256-bit body (`k4_sums`) takes per 64 values two `vpmaddubsw`, two `vpmaddwd`
//! with the sub-block scales (each scale put in place by a `vpshufb`) and two adds. Here 64
//! values take one `vpmaddubsw` and one `vpdpwssd` (scale multiply and accumulate in one),
//! the scales of two sub-blocks are placed by one `vpermw`, and the nibbles of 128 values
//! come from one load. On Zen 5 the 512-bit bodies run at full width.
//!
//! Measured on a 2-vCPU Zen 5, TinyLlama Q4_K_M, alternating runs: one thread decoded 38-41
//! tok/s against 37-38, two threads 66-67.5 against 62.6-66.
//!
//! Same bits: only the super-block's integer totals (Σ sc·q·q8 and Σ min·bsum, exact in any
//! order) come from here; `k_one` scales and adds them exactly as for the 256-bit body.

use super::{k4_unpack, k_one, Sums1};
use crate::quant::{BlockQ4K, BlockQ8K};
use core::arch::x86_64::*;

/// The 512-bit sums.
pub(super) struct Zmm;

impl Sums1<BlockQ4K> for Zmm {
    #[inline(always)]
    unsafe fn sums1(x: &BlockQ4K, y: &BlockQ8K) -> (__m256i, __m256i) {
        let u = k4_unpack(&x.scales);
        // The eight scales as i16 in words 0..8.
        let sc = _mm512_castsi128_si512(_mm_cvtepu8_epi16(_mm_set_epi32(
            0,
            0,
            u[1] as i32,
            u[0] as i32,
        )));
        // Σ min·bsum as in `k4_sums`: each min twice, beside its sub-block's two 16-value sums.
        let m8 = _mm_set_epi32(0, 0, u[3] as i32, u[2] as i32);
        let mins = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(m8, m8));
        let bs = _mm256_loadu_si256(y.bsums.as_ptr() as *const __m256i);
        let mn = _mm256_madd_epi16(mins, bs);

        let m4 = _mm512_set1_epi8(0xF);
        // Words 0..16 take scale 0, words 16..32 scale 1 (a 64-value chunk's two sub-blocks).
        let pair = _mm512_set_epi64(
            0x0001_0001_0001_0001,
            0x0001_0001_0001_0001,
            0x0001_0001_0001_0001,
            0x0001_0001_0001_0001,
            0,
            0,
            0,
            0,
        );
        let mut main = _mm512_setzero_si512();
        for h in 0..2 {
            // Bytes 64h..64h+64: low nibbles are values 128h..+32 and 128h+64..+96, high
            // nibbles 128h+32..+64 and 128h+96..+128 (32 bytes each, in 128-bit lane pairs).
            let q = _mm512_loadu_si512(x.qs.as_ptr().add(64 * h) as *const _);
            let lo = _mm512_and_si512(q, m4);
            let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(q), m4);
            let v = [
                _mm512_shuffle_i64x2::<0x44>(lo, hi), // values 128h..128h+64
                _mm512_shuffle_i64x2::<0xEE>(lo, hi), // values 128h+64..128h+128
            ];
            for (k, v) in v.into_iter().enumerate() {
                let c = 2 * h + k; // the 64-value chunk: sub-blocks 2c and 2c + 1
                let q8 = _mm512_loadu_si512(y.qs.as_ptr().add(64 * c) as *const _);
                // q·q8 pairwise in i16: ≤ 2·15·127, no saturation.
                let p = _mm512_maddubs_epi16(v, q8);
                let s = _mm512_permutexvar_epi16(
                    _mm512_add_epi16(pair, _mm512_set1_epi16(2 * c as i16)),
                    sc,
                );
                main = _mm512_dpwssd_epi32(main, p, s);
            }
        }
        let main = _mm256_add_epi32(
            _mm512_castsi512_si256(main),
            _mm512_extracti64x4_epi64::<1>(main),
        );
        (main, mn)
    }
}

/// Decode's Q4_K row dot product (`dot_k1`'s bits).
///
/// # Safety
/// The CPU must have the AVX-512 VNNI tier's features (AVX-512 F, VL, BW and VNNI, AVX2, FMA,
/// F16C).
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
pub(super) unsafe fn dot(x: &[BlockQ4K], y: &[BlockQ8K]) -> f32 {
    k_one::<BlockQ4K, Zmm>(x, y)
}
