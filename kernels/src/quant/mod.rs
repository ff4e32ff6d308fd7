//! Block formats: how a weight row is stored, and the `#[repr(C)]` block of each quantized
//! format, laid out byte for byte as llama.cpp's `ggml-common.h` lays it out (GGUF files hold
//! these blocks; we read them in place from the mapping).
//!
//! A row of `cols` values is `cols / block_len` blocks; float formats are blocks of one value.

use half::f16;

/// The storage format of a weight matrix's rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Format {
    F32,
    F16,
    Bf16,
    Q8_0,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q4K,
    Q5K,
    Q6K,
}

impl Format {
    pub const ALL: [Format; 11] = [
        Format::F32,
        Format::F16,
        Format::Bf16,
        Format::Q8_0,
        Format::Q4_0,
        Format::Q4_1,
        Format::Q5_0,
        Format::Q5_1,
        Format::Q4K,
        Format::Q5K,
        Format::Q6K,
    ];

    /// Values per block.
    pub const fn block_len(self) -> usize {
        match self {
            Format::F32 | Format::F16 | Format::Bf16 => 1,
            Format::Q8_0 | Format::Q4_0 | Format::Q4_1 | Format::Q5_0 | Format::Q5_1 => QK,
            Format::Q4K | Format::Q5K | Format::Q6K => QK_K,
        }
    }

    /// Bytes per block.
    pub const fn block_bytes(self) -> usize {
        match self {
            Format::F32 => 4,
            Format::F16 | Format::Bf16 => 2,
            Format::Q8_0 => size_of::<BlockQ8_0>(),
            Format::Q4_0 => size_of::<BlockQ4_0>(),
            Format::Q4_1 => size_of::<BlockQ4_1>(),
            Format::Q5_0 => size_of::<BlockQ5_0>(),
            Format::Q5_1 => size_of::<BlockQ5_1>(),
            Format::Q4K => size_of::<BlockQ4K>(),
            Format::Q5K => size_of::<BlockQ5K>(),
            Format::Q6K => size_of::<BlockQ6K>(),
        }
    }

    /// Whether values are stored one per slot (f32, f16, bf16) rather than in scaled blocks.
    pub const fn is_float(self) -> bool {
        matches!(self, Format::F32 | Format::F16 | Format::Bf16)
    }

    /// Alignment a block needs in memory (its widest field).
    pub const fn align(self) -> usize {
        match self {
            Format::F32 => 4,
            _ => 2,
        }
    }

    /// Bytes of a row of `cols` values, or `None` when `cols` is not a whole number of blocks
    /// (or the size overflows).
    pub fn row_bytes(self, cols: usize) -> Option<usize> {
        if !cols.is_multiple_of(self.block_len()) {
            return None;
        }
        (cols / self.block_len()).checked_mul(self.block_bytes())
    }

    /// llama.cpp's name for the format (`Q4_K`, `BF16`, ...).
    pub const fn name(self) -> &'static str {
        match self {
            Format::F32 => "F32",
            Format::F16 => "F16",
            Format::Bf16 => "BF16",
            Format::Q8_0 => "Q8_0",
            Format::Q4_0 => "Q4_0",
            Format::Q4_1 => "Q4_1",
            Format::Q5_0 => "Q5_0",
            Format::Q5_1 => "Q5_1",
            Format::Q4K => "Q4_K",
            Format::Q5K => "Q5_K",
            Format::Q6K => "Q6_K",
        }
    }

    /// The format of a `ggml_type` id as GGUF stores it; `None` for types we do not compute
    /// with (Q2_K, Q3_K, IQ*, TQ*, ...).
    pub const fn from_ggml_type(id: u32) -> Option<Format> {
        Some(match id {
            0 => Format::F32,
            1 => Format::F16,
            2 => Format::Q4_0,
            3 => Format::Q4_1,
            6 => Format::Q5_0,
            7 => Format::Q5_1,
            8 => Format::Q8_0,
            12 => Format::Q4K,
            13 => Format::Q5K,
            14 => Format::Q6K,
            30 => Format::Bf16,
            _ => return None,
        })
    }
}

/// Values per block of the legacy formats (Q4_0 .. Q8_0).
pub const QK: usize = 32;
/// Values per super-block of the k-quants.
pub const QK_K: usize = 256;
/// Bytes of packed 6-bit scales and mins in a Q4_K / Q5_K super-block.
pub const K_SCALE_SIZE: usize = 12;

/// 32 values: `d * q`, q in -128..=127.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ8_0 {
    pub d: f16,
    pub qs: [i8; QK],
}

/// 32 values: `d * (q - 8)`, q a nibble; value j in the low nibble of `qs[j]`, j + 16 in the high.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ4_0 {
    pub d: f16,
    pub qs: [u8; QK / 2],
}

/// 32 values: `d * q + m`, q a nibble, laid out as in [`BlockQ4_0`].
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ4_1 {
    pub d: f16,
    pub m: f16,
    pub qs: [u8; QK / 2],
}

/// 32 values: `d * (q - 16)`, q 5 bits: nibbles as in [`BlockQ4_0`], bit 4 of value j in bit j
/// of `qh` (little-endian u32).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ5_0 {
    pub d: f16,
    pub qh: [u8; 4],
    pub qs: [u8; QK / 2],
}

/// 32 values: `d * q + m`, q 5 bits, laid out as in [`BlockQ5_0`].
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ5_1 {
    pub d: f16,
    pub m: f16,
    pub qh: [u8; 4],
    pub qs: [u8; QK / 2],
}

/// 256 values in 8 sub-blocks of 32: `d * sc * q - dmin * m`, q a nibble, (sc, m) 6-bit pairs
/// packed in `scales` (see llama.cpp's `get_scale_min_k4`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ4K {
    pub d: f16,
    pub dmin: f16,
    pub scales: [u8; K_SCALE_SIZE],
    pub qs: [u8; QK_K / 2],
}

/// 256 values as [`BlockQ4K`] with a fifth bit per value in `qh`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ5K {
    pub d: f16,
    pub dmin: f16,
    pub scales: [u8; K_SCALE_SIZE],
    pub qh: [u8; QK_K / 8],
    pub qs: [u8; QK_K / 2],
}

/// 256 values in 16 sub-blocks of 16: `d * scales[i] * (q - 32)`, q 6 bits (low 4 in `ql`,
/// high 2 in `qh`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ6K {
    pub ql: [u8; QK_K / 2],
    pub qh: [u8; QK_K / 4],
    pub scales: [i8; QK_K / 16],
    pub d: f16,
}

/// Activations for the k-quant dot products: 256 values `d * q`, with the sums of each 16.
/// Only ever made here (no file holds it), so unlike llama.cpp's `block_q8_K` (d first, 292
/// bytes) the values come first in a 32-byte aligned block: every 32-value load of them is
/// aligned, where half of llama.cpp's split a cache line.
#[repr(C, align(32))]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ8K {
    pub qs: [i8; QK_K],
    pub bsums: [i16; QK_K / 16],
    pub d: f32,
}

/// Activations for the Q4_1 / Q5_1 dot products: 32 values `d * q`, and `s = d * Σq`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ8_1 {
    pub d: f16,
    pub s: f16,
    pub qs: [i8; QK],
}

// The sizes llama.cpp asserts in ggml-common.h: a GGUF's bytes are these structs.
const _: () = assert!(size_of::<BlockQ8_0>() == 2 + QK);
const _: () = assert!(size_of::<BlockQ4_0>() == 2 + QK / 2);
const _: () = assert!(size_of::<BlockQ4_1>() == 4 + QK / 2);
const _: () = assert!(size_of::<BlockQ5_0>() == 2 + 4 + QK / 2);
const _: () = assert!(size_of::<BlockQ5_1>() == 4 + 4 + QK / 2);
const _: () = assert!(size_of::<BlockQ4K>() == 4 + K_SCALE_SIZE + QK_K / 2);
const _: () = assert!(size_of::<BlockQ5K>() == 4 + K_SCALE_SIZE + QK_K / 8 + QK_K / 2);
const _: () = assert!(size_of::<BlockQ6K>() == 2 + QK_K / 16 + 3 * QK_K / 4);
const _: () = assert!(size_of::<BlockQ8_1>() == 4 + QK);
const _: () = assert!(size_of::<BlockQ8K>() == 320 && core::mem::offset_of!(BlockQ8K, qs) == 0);
// Blocks are read in place from a mapping where GGUF guarantees only 2-byte (f16) alignment
// within a tensor; none may need more.
const _: () = assert!(align_of::<BlockQ6K>() == 2 && align_of::<BlockQ4K>() == 2);
const _: () = assert!(align_of::<BlockQ8_0>() == 2 && align_of::<BlockQ5_1>() == 2);

/// How activations are quantized for the integer dot product with a weight format (llama.cpp's
/// `vec_dot_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActFormat {
    Q8_0,
    Q8_1,
    Q8K,
}

impl Format {
    /// The activation format of the integer dot product, `None` for float formats.
    pub const fn act_format(self) -> Option<ActFormat> {
        match self {
            Format::F32 | Format::F16 | Format::Bf16 => None,
            Format::Q8_0 | Format::Q4_0 | Format::Q5_0 => Some(ActFormat::Q8_0),
            Format::Q4_1 | Format::Q5_1 => Some(ActFormat::Q8_1),
            Format::Q4K | Format::Q5K | Format::Q6K => Some(ActFormat::Q8K),
        }
    }
}

impl ActFormat {
    /// Values per block.
    pub const fn block_len(self) -> usize {
        match self {
            ActFormat::Q8_0 | ActFormat::Q8_1 => QK,
            ActFormat::Q8K => QK_K,
        }
    }
}

/// Quantized activations (one or more rows of blocks), borrowed.
#[derive(Clone, Copy, Debug)]
pub enum Acts<'a> {
    Q8_0(&'a [BlockQ8_0]),
    Q8_1(&'a [BlockQ8_1]),
    Q8K(&'a [BlockQ8K]),
}

impl<'a> Acts<'a> {
    pub fn format(&self) -> ActFormat {
        match self {
            Acts::Q8_0(_) => ActFormat::Q8_0,
            Acts::Q8_1(_) => ActFormat::Q8_1,
            Acts::Q8K(_) => ActFormat::Q8K,
        }
    }
    /// Values held.
    pub fn len(&self) -> usize {
        match self {
            Acts::Q8_0(a) => a.len() * QK,
            Acts::Q8_1(a) => a.len() * QK,
            Acts::Q8K(a) => a.len() * QK_K,
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Values `start..end`; both on block boundaries.
    pub fn slice(&self, start: usize, end: usize) -> Acts<'a> {
        let b = self.format().block_len();
        assert!(
            start.is_multiple_of(b) && end.is_multiple_of(b),
            "Acts::slice: {start}..{end} splits a block"
        );
        match *self {
            Acts::Q8_0(a) => Acts::Q8_0(&a[start / b..end / b]),
            Acts::Q8_1(a) => Acts::Q8_1(&a[start / b..end / b]),
            Acts::Q8K(a) => Acts::Q8K(&a[start / b..end / b]),
        }
    }
}

/// Owned buffers for quantized activations, one per activation format, grown as needed and
/// reused between calls (the kernels keep one per thread).
#[derive(Default)]
pub struct ActBuf {
    q8_0: Vec<BlockQ8_0>,
    q8_1: Vec<BlockQ8_1>,
    q8k: Vec<BlockQ8K>,
}

impl ActBuf {
    pub const fn new() -> ActBuf {
        ActBuf {
            q8_0: Vec::new(),
            q8_1: Vec::new(),
            q8k: Vec::new(),
        }
    }

    /// `x` (any number of rows, each a whole number of blocks) quantized to `f` with the
    /// oracle's quantizer, in this buffer.
    pub fn quantize(&mut self, f: ActFormat, x: &[f32]) -> Acts<'_> {
        self.fill(f, x);
        self.get(f)
    }

    /// Quantize `x` to `f` into this buffer (read it back with [`ActBuf::get`]); other
    /// formats' contents stay.
    pub fn fill(&mut self, f: ActFormat, x: &[f32]) {
        assert!(
            x.len().is_multiple_of(f.block_len()),
            "quantize: {} values are not whole {}-value blocks",
            x.len(),
            f.block_len()
        );
        let n = x.len() / f.block_len();
        match f {
            ActFormat::Q8_0 => {
                self.q8_0.resize(n, scalar::ZERO_Q8_0);
                quantize_q8_0(x, &mut self.q8_0);
            }
            ActFormat::Q8_1 => {
                self.q8_1.resize(n, scalar::ZERO_Q8_1);
                quantize_q8_1(x, &mut self.q8_1);
            }
            ActFormat::Q8K => {
                self.q8k.resize(n, scalar::ZERO_Q8K);
                quantize_q8_k(x, &mut self.q8k);
            }
        }
    }

    /// `x` quantized to every activation format the given weight formats need; returns self
    /// to read them with [`ActBuf::get`].
    pub fn fill_for(&mut self, formats: impl Iterator<Item = Format>, x: &[f32]) -> &ActBuf {
        let mut done = [false; 3];
        for f in formats {
            if let Some(af) = f.act_format() {
                if x.len().is_multiple_of(af.block_len()) && !done[af as usize] {
                    done[af as usize] = true;
                    self.fill(af, x);
                }
            }
        }
        self
    }

    /// The last activations quantized to `f`.
    pub fn get(&self, f: ActFormat) -> Acts<'_> {
        match f {
            ActFormat::Q8_0 => Acts::Q8_0(&self.q8_0),
            ActFormat::Q8_1 => Acts::Q8_1(&self.q8_1),
            ActFormat::Q8K => Acts::Q8K(&self.q8k),
        }
    }

    /// As [`ActBuf::quantize`], rows quantized in parallel on the thread pool (prefill's X).
    pub fn quantize_par(&mut self, f: ActFormat, x: &[f32], row: usize) -> Acts<'_> {
        use rayon::prelude::*;
        assert!(row > 0 && row.is_multiple_of(f.block_len()) && x.len().is_multiple_of(row));
        let n = x.len() / f.block_len();
        let bpr = row / f.block_len();
        match f {
            ActFormat::Q8_0 => {
                self.q8_0.resize(n, scalar::ZERO_Q8_0);
                self.q8_0
                    .par_chunks_mut(bpr)
                    .zip(x.par_chunks(row))
                    .for_each(|(o, x)| quantize_q8_0(x, o));
                Acts::Q8_0(&self.q8_0)
            }
            ActFormat::Q8_1 => {
                self.q8_1.resize(n, scalar::ZERO_Q8_1);
                self.q8_1
                    .par_chunks_mut(bpr)
                    .zip(x.par_chunks(row))
                    .for_each(|(o, x)| quantize_q8_1(x, o));
                Acts::Q8_1(&self.q8_1)
            }
            ActFormat::Q8K => {
                self.q8k.resize(n, scalar::ZERO_Q8K);
                self.q8k
                    .par_chunks_mut(bpr)
                    .zip(x.par_chunks(row))
                    .for_each(|(o, x)| quantize_q8_k(x, o));
                Acts::Q8K(&self.q8k)
            }
        }
    }
}

/// Weight rows per tile of the prefill matmul: 16 rows of 2048 Q8_0 values (34 KiB) stay in
/// cache while every token group passes over them.
pub(crate) const TILE_ROWS: usize = 16;

/// The prefill tile's loop order, shared by the tiers' `matmul_tile`: `out` (n, rows) for the
/// rows of `w` (`bpr` blocks each), in tiles of [`TILE_ROWS`] rows, each passed `G` tokens at a
/// time (`group`: each weight block unpacked once for the G), then four at a time (`four`, when
/// G > 4), then the last few one at a time (`one`). Token t's activations are `at(t)`. Every
/// body gives a token the same bits, so the grouping never changes a result.
#[inline(always)]
pub(crate) fn tile_loop<'a, W, A: ?Sized + 'a, const G: usize>(
    w: &[W],
    bpr: usize,
    n: usize,
    out: &mut [f32],
    at: impl Fn(usize) -> &'a A,
    one: impl Fn(&[W], &'a A) -> f32,
    four: impl Fn(&[W], [&'a A; 4]) -> [f32; 4],
    group: impl Fn(&[W], [&'a A; G]) -> [f32; G],
) {
    let rows = out.len() / n;
    for r0 in (0..rows).step_by(TILE_ROWS) {
        let tile = &w[r0 * bpr..(r0 + TILE_ROWS).min(rows) * bpr];
        let mut t = 0;
        while t + G <= n {
            let ys: [&'a A; G] = std::array::from_fn(|i| at(t + i));
            for (r, x) in (r0..).zip(tile.chunks_exact(bpr)) {
                for (i, v) in group(x, ys).into_iter().enumerate() {
                    out[(t + i) * rows + r] = v;
                }
            }
            t += G;
        }
        while G > 4 && t + 4 <= n {
            let ys = [at(t), at(t + 1), at(t + 2), at(t + 3)];
            for (r, x) in (r0..).zip(tile.chunks_exact(bpr)) {
                for (i, v) in four(x, ys).into_iter().enumerate() {
                    out[(t + i) * rows + r] = v;
                }
            }
            t += 4;
        }
        for t in t..n {
            let y = at(t);
            for (r, x) in (r0..).zip(tile.chunks_exact(bpr)) {
                out[t * rows + r] = one(x, y);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2;
#[cfg(target_arch = "aarch64")]
pub(crate) mod neon;
pub mod scalar;

/// Whether the AVX2 quantizers can run (std caches the detection).
#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

/// The activation quantizers `ActBuf` uses: the AVX2 ones where the CPU has them (bit-exact
/// with the oracle's, as `tests/quant.rs` checks, so every tier sees the same activations),
/// else the oracle's.
macro_rules! fast_quantizer {
    ($name:ident, $B:ty) => {
        fn $name(x: &[f32], y: &mut [$B]) {
            #[cfg(target_arch = "x86_64")]
            if has_avx2() {
                // SAFETY: the CPU has AVX2, FMA and F16C (checked just above).
                return unsafe { avx2::$name(x, y) };
            }
            scalar::$name(x, y)
        }
    };
}
fast_quantizer!(quantize_q8_0, BlockQ8_0);
fast_quantizer!(quantize_q8_1, BlockQ8_1);
fast_quantizer!(quantize_q8_k, BlockQ8K);
