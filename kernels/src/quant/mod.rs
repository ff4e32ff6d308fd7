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
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ8K {
    pub d: f32,
    pub qs: [i8; QK_K],
    pub bsums: [i16; QK_K / 16],
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
const _: () = assert!(size_of::<BlockQ8K>() == 4 + QK_K + 2 * QK_K / 16);
// Blocks are read in place from a mapping where GGUF guarantees only 2-byte (f16) alignment
// within a tensor; none may need more.
const _: () = assert!(align_of::<BlockQ6K>() == 2 && align_of::<BlockQ4K>() == 2);
const _: () = assert!(align_of::<BlockQ8_0>() == 2 && align_of::<BlockQ5_1>() == 2);

pub mod scalar;
