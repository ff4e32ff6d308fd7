//! Numeric kernels for spinfer: a safe slice API over per-ISA implementations chosen once at
//! runtime. Knows nothing about models.
//!
//! Tiers: `scalar` (the oracle), `portable` (`wide` vectors), `avx2` (AVX2+FMA+F16C),
//! `avx512` (AVX-512F/BW/VL, with AVX-512 BF16 where present, AVX-512 VNNI for the legacy
//! quantized formats where present, and AMX bf16 tiles for matmuls with bf16 weights, and for
//! models' prompts on block-format weights, where the CPU and OS allow: see
//! `x86_64/amx.rs`), `neon` (aarch64).
//! `SPINFER_ISA=scalar|portable|avx2|avx512|neon` forces one.
//!
//! Block formats (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K, laid out as GGUF stores them)
//! multiply activations quantized to int8 the way llama.cpp does (`quant/`): an integer dot per
//! block, then f32 scales. `quant/scalar.rs` is their oracle.

// Index loops over const-sized tiles unroll predictably in SIMD code; the tile routines take
// many plain arguments on purpose.
#![allow(clippy::needless_range_loop, clippy::too_many_arguments)]

pub use half::{bf16, f16};
use quant::ActBuf;
pub use quant::{
    ActFormat, Acts, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K,
    BlockQ8K, BlockQ8_0, BlockQ8_1, Format,
};
pub use simd::ATT_PAD;

pub mod probe;
pub mod quant;
pub mod scalar;
pub mod team;

#[cfg(target_arch = "aarch64")]
mod aarch64;
mod portable;
mod simd;
#[cfg(target_arch = "x86_64")]
mod x86_64;

use rayon::prelude::*;
use simd::{MatmulJob, PwJob};
use std::cell::RefCell;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

use std::fmt;
use std::sync::OnceLock;

/// A row-major matrix of weights borrowed from (memory-mapped) storage, as stored: a slice of
/// blocks of its [`Format`] (float formats are blocks of one value). Lengths and offsets
/// (`len`, `slice`, `row`) count values; slices must start and end on block boundaries.
#[derive(Clone, Copy, Debug)]
pub enum Weights<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    Bf16(&'a [bf16]),
    Q8_0(&'a [BlockQ8_0]),
    Q4_0(&'a [BlockQ4_0]),
    Q4_1(&'a [BlockQ4_1]),
    Q5_0(&'a [BlockQ5_0]),
    Q5_1(&'a [BlockQ5_1]),
    Q4K(&'a [BlockQ4K]),
    Q5K(&'a [BlockQ5K]),
    Q6K(&'a [BlockQ6K]),
}

/// A pattern matching every block-format variant of [`Weights`] (the float kernels' match arms
/// that must never see them name them all through this, so a new format is one edit).
macro_rules! block_formats {
    () => {
        Weights::Q8_0(_)
            | Weights::Q4_0(_)
            | Weights::Q4_1(_)
            | Weights::Q5_0(_)
            | Weights::Q5_1(_)
            | Weights::Q4K(_)
            | Weights::Q5K(_)
            | Weights::Q6K(_)
    };
}
pub(crate) use block_formats;

/// `$body` with `$s` bound to the typed block slice of any variant of `$w`.
macro_rules! with_blocks {
    ($w:expr, $s:ident => $body:expr) => {
        match $w {
            Weights::F32($s) => $body,
            Weights::F16($s) => $body,
            Weights::Bf16($s) => $body,
            Weights::Q8_0($s) => $body,
            Weights::Q4_0($s) => $body,
            Weights::Q4_1($s) => $body,
            Weights::Q5_0($s) => $body,
            Weights::Q5_1($s) => $body,
            Weights::Q4K($s) => $body,
            Weights::Q5K($s) => $body,
            Weights::Q6K($s) => $body,
        }
    };
}

/// The same variant of `Weights` over `$s` (a sub-slice of the matched one).
macro_rules! map_blocks {
    ($w:expr, $s:ident => $body:expr) => {
        match $w {
            Weights::F32($s) => Weights::F32($body),
            Weights::F16($s) => Weights::F16($body),
            Weights::Bf16($s) => Weights::Bf16($body),
            Weights::Q8_0($s) => Weights::Q8_0($body),
            Weights::Q4_0($s) => Weights::Q4_0($body),
            Weights::Q4_1($s) => Weights::Q4_1($body),
            Weights::Q5_0($s) => Weights::Q5_0($body),
            Weights::Q5_1($s) => Weights::Q5_1($body),
            Weights::Q4K($s) => Weights::Q4K($body),
            Weights::Q5K($s) => Weights::Q5K($body),
            Weights::Q6K($s) => Weights::Q6K($body),
        }
    };
}

impl<'a> Weights<'a> {
    pub fn format(&self) -> Format {
        match self {
            Weights::F32(_) => Format::F32,
            Weights::F16(_) => Format::F16,
            Weights::Bf16(_) => Format::Bf16,
            Weights::Q8_0(_) => Format::Q8_0,
            Weights::Q4_0(_) => Format::Q4_0,
            Weights::Q4_1(_) => Format::Q4_1,
            Weights::Q5_0(_) => Format::Q5_0,
            Weights::Q5_1(_) => Format::Q5_1,
            Weights::Q4K(_) => Format::Q4K,
            Weights::Q5K(_) => Format::Q5K,
            Weights::Q6K(_) => Format::Q6K,
        }
    }
    /// Blocks held.
    pub fn blocks(&self) -> usize {
        with_blocks!(self, s => s.len())
    }
    /// Values held.
    pub fn len(&self) -> usize {
        self.blocks() * self.format().block_len()
    }
    pub fn is_empty(&self) -> bool {
        self.blocks() == 0
    }
    /// The first byte of the blocks.
    #[cfg(target_arch = "x86_64")]
    pub(crate) fn as_byte_ptr(&self) -> *const u8 {
        with_blocks!(self, s => s.as_ptr() as *const u8)
    }
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.blocks() * self.format().block_bytes()
    }
    /// `bytes` read in place as blocks of `format`, or `None` when the length is not a whole
    /// number of blocks or the start is not aligned for them. Blocks are plain old data (any
    /// bit pattern is a valid value), stored little-endian as on every target we build for.
    pub fn from_bytes(format: Format, bytes: &'a [u8]) -> Option<Weights<'a>> {
        let (n, rem) = (
            bytes.len() / format.block_bytes(),
            bytes.len() % format.block_bytes(),
        );
        if rem != 0 || !(bytes.as_ptr() as usize).is_multiple_of(format.align()) {
            return None;
        }
        let p = bytes.as_ptr();
        // SAFETY: `n` whole blocks lie in `bytes` (checked), its start is aligned for the block
        // type (checked; `quant` asserts no block needs more than `Format::align`), every block
        // type is `repr(C)` of integers and f16/bf16/f32 that accept any bits, and the borrow
        // keeps the lifetime of `bytes`.
        unsafe {
            use std::slice::from_raw_parts as raw;
            Some(match format {
                Format::F32 => Weights::F32(raw(p.cast(), n)),
                Format::F16 => Weights::F16(raw(p.cast(), n)),
                Format::Bf16 => Weights::Bf16(raw(p.cast(), n)),
                Format::Q8_0 => Weights::Q8_0(raw(p.cast(), n)),
                Format::Q4_0 => Weights::Q4_0(raw(p.cast(), n)),
                Format::Q4_1 => Weights::Q4_1(raw(p.cast(), n)),
                Format::Q5_0 => Weights::Q5_0(raw(p.cast(), n)),
                Format::Q5_1 => Weights::Q5_1(raw(p.cast(), n)),
                Format::Q4K => Weights::Q4K(raw(p.cast(), n)),
                Format::Q5K => Weights::Q5K(raw(p.cast(), n)),
                Format::Q6K => Weights::Q6K(raw(p.cast(), n)),
            })
        }
    }
    /// Values `start..end`, same format; both must lie on block boundaries.
    pub fn slice(&self, start: usize, end: usize) -> Weights<'a> {
        let b = self.format().block_len();
        assert!(
            start.is_multiple_of(b) && end.is_multiple_of(b),
            "Weights::slice: {start}..{end} splits a {}-value {} block",
            b,
            self.format().name()
        );
        let (s0, s1) = (start / b, end / b);
        map_blocks!(*self, s => &s[s0..s1])
    }
    /// Row `r` of a matrix with `cols` columns.
    pub fn row(&self, r: usize, cols: usize) -> Weights<'a> {
        self.slice(r * cols, (r + 1) * cols)
    }
}

/// An instruction-set tier.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Isa {
    Scalar,
    Portable,
    Avx2,
    Avx512,
    Neon,
}

impl Isa {
    pub const ALL: [Isa; 5] = [
        Isa::Scalar,
        Isa::Portable,
        Isa::Avx2,
        Isa::Avx512,
        Isa::Neon,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Neon => "neon",
        }
    }

    /// f32 lanes in one of the tier's vectors.
    pub fn lanes(self) -> usize {
        match self {
            Isa::Avx512 => 16,
            Isa::Avx2 | Isa::Portable => 8,
            Isa::Neon => 4,
            Isa::Scalar => 1,
        }
    }

    pub fn from_name(s: &str) -> Option<Isa> {
        Isa::ALL.into_iter().find(|i| i.name() == s)
    }

    /// Whether this CPU can run the tier.
    pub fn is_available(self) -> bool {
        match self {
            Isa::Scalar | Isa::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => std::arch::is_aarch64_feature_detected!("neon"),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// Every tier this CPU can run, best last.
    pub fn available() -> Vec<Isa> {
        Isa::ALL
            .into_iter()
            .filter(|i| i.is_available() && table(*i).is_some())
            .collect()
    }
}

impl fmt::Display for Isa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a requested tier cannot be used.
#[derive(Debug, Clone, PartialEq)]
pub struct IsaError(pub String);

impl fmt::Display for IsaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for IsaError {}

/// The per-tier single-threaded building blocks. Threading and shape checks live in `Kernels`.
#[allow(clippy::type_complexity)]
pub(crate) struct Table {
    pub dot: fn(Weights<'_>, &[f32]) -> f32,
    /// y = W x with W's rows the given number of elements apart (`x.len()` when packed).
    pub matvec_ld: fn(Weights<'_>, usize, &[f32], &mut [f32]),
    /// Columns r0..r1 of the job's Y, exact f32 accumulation.
    pub matmul: fn(&MatmulJob<'_>, usize, usize),
    /// The bf16 × bf16 dot-product matmul, where the CPU has one.
    pub matmul_bf16: Option<Bf16Mm>,
    /// Tokens per packed X group of the outer-product matmul (0: the tier has none).
    pub op_width: usize,
    /// Weight rows per outer-product tile.
    pub op_rows: usize,
    /// Panels `p0..p1` of a matmul with pre-packed weights ([`PackedWeights`]).
    pub matmul_pw: fn(&PwJob<'_>, usize, usize),
    /// Rows per packed weight panel (one tile's worth of output columns).
    pub pw_panel: usize,
    pub rmsnorm: fn(&[f32], &[f32], f32, &mut [f32]),
    pub layernorm: fn(&[f32], &[f32], &[f32], f32, &mut [f32]),
    pub softmax: fn(&mut [f32]),
    /// Attention's scores from transposed keys (see `simd::attn_scores`).
    pub attn_scores: fn(&[f32], usize, usize, &[f32], usize, usize, &mut [f32]),
    /// Attention's outputs from value rows (see `simd::attn_values`).
    pub attn_values: fn(&[f32], usize, &[f32], usize, &[usize], &mut [f32]),
    pub silu: fn(&mut [f32]),
    pub silu_mul: fn(&mut [f32], &[f32]),
    pub gelu: fn(&mut [f32]),
    pub rope: fn(&mut [f32], usize, &[f32], &[f32]),
    pub add: fn(&mut [f32], &[f32]),
    pub scale: fn(&mut [f32], f32),
    pub axpy: fn(&mut [f32], f32, &[f32]),
    pub to_f32: fn(Weights<'_>, &mut [f32]),
    /// Independent FMA chains for the probe: 12 · lanes · 2 FLOP per iteration.
    pub burn: fn(usize) -> f32,
    /// Sums of a buffer read in the ways `simd::READERS` lists (the probe's bandwidth).
    pub read: [fn(&[f32]) -> f32; 4],
    /// Independent bf16 dot-product chains: 12 · 64 FLOP per iteration.
    pub bf16_burn: Option<fn(usize) -> f32>,
    /// The integer dot product of a block-format weight row with quantized activations.
    pub qdot: fn(Weights<'_>, Acts<'_>) -> f32,
    /// `qdot` of one row with four tokens' activations (each weight block unpacked once).
    pub qdot4: fn(Weights<'_>, [Acts<'_>; 4]) -> [f32; 4],
    /// `qdot` of every row of a block of rows with one token's activations (decode's matvec).
    pub qrows: fn(Weights<'_>, Acts<'_>, &mut [f32]),
    /// A tile of rows × n tokens' activations into (n, rows) (prefill's matmul).
    pub qtile: fn(Weights<'_>, Acts<'_>, usize, &mut [f32]),
}

/// A bf16-activation matmul: `cvt` rounds X to bf16 bits, `mm` computes columns r0..r1 of Y
/// from `MatmulJob::xb`.
pub(crate) struct Bf16Mm {
    pub cvt: fn(&[f32], &mut [u16]),
    pub mm: fn(&MatmulJob<'_>, usize, usize),
}

fn table(isa: Isa) -> Option<&'static Table> {
    match isa {
        Isa::Scalar => Some(&scalar::TABLE),
        Isa::Portable => Some(&portable::TABLE),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => Some(&x86_64::avx2::TABLE),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => Some(x86_64::avx512::table()),
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => Some(&aarch64::neon::TABLE),
        #[allow(unreachable_patterns)]
        _ => None,
    }
}

/// How a matmul with bf16 weights accumulates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// Weights widened to f32, f32 activations, f32 FMA accumulation.
    Exact,
    /// Activations rounded to bf16 and AVX-512 BF16 dot products (f32 accumulation); about 2x
    /// faster, relative error ~2^-9·sqrt(k) per output (see `x86_64/avx512.rs`). Falls back to
    /// `Exact` where the CPU lacks it or the weights are not bf16.
    Bf16Dot,
    /// Activations rounded to bf16 and AMX `tdpbf16ps` tiles (f32 accumulation): the accuracy
    /// class of `Bf16Dot`, several times the f32 FMA rate (see `x86_64/amx.rs`). Needs the
    /// AVX-512 tier and [`amx_available`], and bf16 or block-format weights (the latter
    /// dequantized to bf16 per tile); otherwise the same as `Exact`.
    Amx,
}

/// Whether the AMX matmul takes weights of `w`'s format: bf16 as stored, or block formats
/// dequantized to bf16 per tile (f32 and f16 weights stay on the exact path).
pub(crate) fn amx_takes(w: Weights<'_>) -> bool {
    matches!(w, Weights::Bf16(_)) || !w.format().is_float()
}

/// Whether this CPU reports AMX-TILE and AMX-BF16 (whether or not the OS lets us use them).
pub fn cpu_has_amx() -> bool {
    #[cfg(target_arch = "x86_64")]
    return x86_64::amx::cpu_has_amx();
    #[allow(unreachable_code)]
    false
}

/// Whether the AMX bf16 matmul can run here: the CPU has it and Linux granted tile state.
pub fn amx_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    return x86_64::amx::available();
    #[allow(unreachable_code)]
    false
}

/// 0: not yet read from the environment, 1: on, 2: off.
static AMX: AtomicU8 = AtomicU8::new(0);
/// Row ranges computed by the AMX path so far (lets tests prove it ran).
static AMX_CALLS: AtomicUsize = AtomicUsize::new(0);

/// Whether `matmul` uses AMX for bf16 weights (n ≥ 2; n = 1 is a matvec) by default: where
/// [`amx_available`], unless `SPINFER_AMX=0`. Models may differ: see [`Policy`].
pub fn amx_enabled() -> bool {
    match AMX.load(Ordering::Relaxed) {
        1 => true,
        2 => false,
        _ => {
            let on = !matches!(
                std::env::var("SPINFER_AMX").as_deref(),
                Ok("0") | Ok("off") | Ok("false")
            ) && amx_available();
            AMX.store(if on { 1 } else { 2 }, Ordering::Relaxed);
            on
        }
    }
}

/// How many row ranges the AMX matmul has computed in this process.
pub fn amx_calls() -> usize {
    AMX_CALLS.load(Ordering::Relaxed)
}

/// Fewest tokens for which `matmul` picks AMX. Tiles hold 16 tokens, but even at n = 2 AMX
/// beat the exact path 2× here (2048×2048 bf16, 2 threads: 31 vs 15 GFLOP/s; n = 8: 121 vs
/// 37; n = 128: 863 vs 143), as small n is bound by reading W, which AMX reads as stored.
const AMX_MIN_N: usize = 2;

/// 0: not yet read from the environment, 1: on, 2: off.
static BF16_DOT: AtomicU8 = AtomicU8::new(0);

/// Whether `matmul` uses the bf16 dot-product path for bf16 weights by default: the
/// [`bf16_dot_rule`], read once per process (so every model loaded in it agrees).
pub fn bf16_dot_enabled() -> bool {
    match BF16_DOT.load(Ordering::Relaxed) {
        1 => true,
        2 => false,
        _ => {
            let on = bf16_dot_rule();
            BF16_DOT.store(if on { 1 } else { 2 }, Ordering::Relaxed);
            on
        }
    }
}

/// Who made the CPU, as CPUID leaf 0 says: the bf16 dot path's default depends on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuVendor {
    Amd,
    Intel,
    Other,
}

impl CpuVendor {
    /// This CPU's vendor (`Other` off x86-64).
    pub fn detect() -> CpuVendor {
        #[cfg(target_arch = "x86_64")]
        {
            let r = core::arch::x86_64::__cpuid(0);
            let mut id = [0u8; 12];
            id[..4].copy_from_slice(&r.ebx.to_le_bytes());
            id[4..8].copy_from_slice(&r.edx.to_le_bytes());
            id[8..].copy_from_slice(&r.ecx.to_le_bytes());
            match &id {
                b"AuthenticAMD" => return CpuVendor::Amd,
                b"GenuineIntel" => return CpuVendor::Intel,
                _ => {}
            }
        }
        CpuVendor::Other
    }
}

/// The bf16 dot path's default for this process, decided without timing anything (a timing
/// probe could flip at a near-tie between runs, and so change greedy text): see
/// [`bf16_dot_choice`]. Same answer on every call.
pub fn bf16_dot_rule() -> bool {
    bf16_dot_choice(
        std::env::var("SPINFER_BF16_DOT").ok().as_deref(),
        try_kernels().map(|k| k.has_bf16_dot()).unwrap_or(false),
        CpuVendor::detect(),
    )
}

/// The rule, from its inputs:
/// 1. `SPINFER_BF16_DOT` = `1`/`on`/`true` or `0`/`off`/`false` decides (any other value is
///    ignored);
/// 2. otherwise on only where the active tier has the AVX-512 BF16 dot product **and** the CPU
///    is AMD's. On Zen 4 `vdpbf16ps` runs at about twice the f32 FMA FLOP rate (what the
///    former start-up timing probe found there); Zen 5 is assumed alike (unmeasured). Intel's
///    AVX-512 BF16 parts are Cooper Lake and Sapphire Rapids and later; on Sapphire Rapids it
///    ran at about half the FMA rate (~40 vs ~80 GFLOP/s per core) and AMX does bf16 prefill
///    there anyway, and Cooper Lake was never measured, so Intel keeps the exact f32 path.
pub fn bf16_dot_choice(env: Option<&str>, tier_has_dot: bool, vendor: CpuVendor) -> bool {
    match env {
        Some("0") | Some("off") | Some("false") => false,
        Some("1") | Some("on") | Some("true") => true,
        _ => tier_has_dot && vendor == CpuVendor::Amd,
    }
}

/// Which rounded-but-faster paths a model's matmuls with bf16 weights may take. Each model
/// holds its own (two models, or two tests, can differ side by side); [`Policy::from_env`] is
/// the default: [`amx_enabled`] and [`bf16_dot_enabled`], read once from the environment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// AMX tiles ([`Precision::Amx`]) where available.
    pub amx: bool,
    /// AVX-512 BF16 dot products ([`Precision::Bf16Dot`]) where available.
    pub bf16_dot: bool,
}

impl Policy {
    /// Weights widened to f32, f32 activations and accumulation everywhere.
    pub const EXACT: Policy = Policy {
        amx: false,
        bf16_dot: false,
    };

    /// The process default, from `SPINFER_AMX` / `SPINFER_BF16_DOT` and the CPU.
    pub fn from_env() -> Policy {
        Policy {
            amx: amx_enabled(),
            bf16_dot: bf16_dot_enabled(),
        }
    }

    /// The precision for a product of `n` tokens with `w` (the process-wide
    /// [`Kernels::matmul`]'s choice: one token is a matrix-vector product).
    pub fn precision(self, w: Weights<'_>, n: usize) -> Precision {
        if self.amx && matches!(w, Weights::Bf16(_)) && n >= AMX_MIN_N && amx_available() {
            Precision::Amx
        } else if self.bf16_dot && n >= 2 {
            // One token stays the exact matrix-vector product, as with AMX (the default is on
            // for AMD's AVX-512 BF16 CPUs, where `matmul(.., 1, ..)` rounded and differed
            // from `matvec`).
            Precision::Bf16Dot
        } else {
            Precision::Exact
        }
    }

    /// The precision for a prompt's rows with `w`, however many there are (even one). The
    /// rounded kernels compute each token row on its own (AMX: its own tile row; bf16 dot: its
    /// own accumulators), so a prompt token rounds the same alone, in any chunk and beside
    /// other sequences' tokens. Models run generated tokens exact (see `Forward::matmul`).
    pub fn prompt(self, w: Weights<'_>) -> Precision {
        if self.amx && amx_takes(w) && amx_available() {
            Precision::Amx
        } else if self.bf16_dot && matches!(w, Weights::Bf16(_)) {
            Precision::Bf16Dot
        } else {
            Precision::Exact
        }
    }
}

/// A raw output pointer shared by threads that write disjoint parts of it.
#[derive(Clone, Copy)]
struct SyncPtr(*mut f32);
// SAFETY: only used where each thread writes a range no other thread touches.
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}

/// Matrix-vector products sharing `x`, cut into blocks (≤ ~256 KiB) of whole 8-row tiles (long
/// enough for matvec's eight streams to run a while), numbered across the matrices; a block
/// never straddles two of them. Threads (rayon's or a team's) then take blocks in turn.
pub(crate) struct MatvecBlocks<'a> {
    parts: [(Weights<'a>, SyncPtr, usize); 4], // (W, y, rows)
    acts: [Option<Acts<'a>>; 4],               // x quantized for block-format W
    first: [usize; 4],                         // first block of each matrix
    n: usize,
    x: &'a [f32],
    block: usize,
    f: fn(Weights<'_>, usize, &[f32], &mut [f32]),
    qrows: fn(Weights<'_>, Acts<'_>, &mut [f32]),
    pub count: usize,
}

impl<'a> MatvecBlocks<'a> {
    /// # Safety
    /// Each `(w, y, rows)`: `y` valid for `rows` writes while the blocks run, by them only.
    pub(crate) unsafe fn new(
        k: &Kernels,
        jobs: impl Iterator<Item = (Weights<'a>, *mut f32, usize)>,
        x: &'a [f32],
        acts: &'a ActBuf,
    ) -> MatvecBlocks<'a> {
        let cols = x.len();
        let mut mb = MatvecBlocks {
            parts: [(Weights::F32(&[]), SyncPtr(std::ptr::null_mut()), 0); 4],
            first: [0; 4],
            n: 0,
            x,
            acts: [None; 4],
            block: 8,
            f: k.t.matvec_ld,
            qrows: k.t.qrows,
            count: 0,
        };
        for (w, y, rows) in jobs {
            assert!(mb.n < 4, "matvecs: at most four matrices");
            assert_eq!(w.len(), cols * rows, "matvec: weights are not (rows, cols)");
            mb.parts[mb.n] = (w, SyncPtr(y), rows);
            if let Some(f) = w.format().act_format() {
                check_blocks("matvec", w.format(), cols);
                let a = acts.get(f);
                assert_eq!(a.len(), cols, "matvecs: activations not quantized");
                mb.acts[mb.n] = Some(a);
            }
            mb.n += 1;
        }
        // ~256 KiB of the first matrix's rows, but at least two blocks per thread over all
        // rows: a small model's matrices (SmolLM2's 576-row ones are 200 KiB in Q4_1) would
        // otherwise be one block that one thread computes while the other waits. Each block
        // costs something of its own (its activations are prepared again, its streams start
        // over; prefetching their first lines did not help): SmolLM2-135M decoded ~12% faster
        // with two blocks per thread than with eight (14 of 16 alternating runs), ~10% with
        // four (11 of 16); one tied with two (8 of 16), and sixteen lost 15 of 16 (Zen 3).
        let total: usize = mb.parts[..mb.n].iter().map(|p| p.2).sum();
        if let Some(&(w, _, rows)) = mb.parts[..mb.n].first() {
            let cap = (256 << 10) / (w.bytes() / rows.max(1)).max(1);
            let share = total.div_ceil(2 * rayon::current_num_threads().max(1));
            mb.block = cap.min(share).next_multiple_of(8).max(8);
        }
        for i in 0..mb.n {
            mb.first[i] = mb.count;
            mb.count += mb.parts[i].2.div_ceil(mb.block);
        }
        mb
    }

    /// Compute block `b`.
    ///
    /// # Safety
    /// No other call with the same `b` runs at the same time.
    pub(crate) unsafe fn run(&self, b: usize) {
        let i = (0..self.n).rev().find(|&i| self.first[i] <= b).unwrap();
        let (w, y, rows) = self.parts[i];
        let cols = self.x.len();
        let r0 = (b - self.first[i]) * self.block;
        let r1 = (r0 + self.block).min(rows);
        // SAFETY: block b alone writes rows r0..r1 of this y (see `new`).
        let yb = std::slice::from_raw_parts_mut(y.0.add(r0), r1 - r0);
        match self.acts[i] {
            None => (self.f)(w.slice(r0 * cols, r1 * cols), cols, self.x, yb),
            Some(a) => (self.qrows)(w.slice(r0 * cols, r1 * cols), a, yb),
        }
    }
}

/// Below this many multiply-adds a product runs on the calling thread.
const PAR_MIN: usize = 1 << 16;

thread_local! {
    /// X rounded to bf16 for the dot-product path; grows to the largest (n, k) seen.
    static XB: RefCell<Vec<u16>> = const { RefCell::new(Vec::new()) };
    /// X packed for the outer-product path; grows to the largest (n, k) seen.
    static XP: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// Activations quantized for block-format weights; grows to the largest X seen.
    static ACTS: RefCell<ActBuf> = const { RefCell::new(ActBuf::new()) };
    /// A quantized matmul chunk's outputs before they go into Y's columns; grows to the
    /// largest chunk seen (no allocation per decode-batch step).
    static QOUT: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `f` with this thread's scratch buffer in `key`, or a fresh one for a nested call on this
/// thread (a kernel called from inside another's parallel section): the one place that decides
/// how per-thread scratch is shared.
fn with_scratch<T, R>(
    key: &'static std::thread::LocalKey<RefCell<T>>,
    fresh: impl FnOnce() -> T,
    f: impl FnOnce(&mut T) -> R,
) -> R {
    key.with(|c| match c.try_borrow_mut() {
        Ok(mut b) => f(&mut b),
        Err(_) => f(&mut fresh()),
    })
}

/// `f` with this thread's activation buffer.
pub(crate) fn with_acts<R>(f: impl FnOnce(&mut ActBuf) -> R) -> R {
    with_scratch(&ACTS, ActBuf::new, f)
}

/// Panics unless rows of `cols` values are whole blocks of `f`.
#[track_caller]
fn check_blocks(what: &str, f: Format, cols: usize) {
    assert!(
        cols.is_multiple_of(f.block_len()),
        "{what}: {} weights need rows of a multiple of {} values, got {cols}",
        f.name(),
        f.block_len()
    );
}

/// A weight matrix (m, k) widened to f32 and repacked once (at model load) for
/// [`Kernels::matmul_packed`], in the layout of the tier that packed it.
pub struct PackedWeights {
    isa: Isa,
    p: usize,
    m: usize,
    k: usize,
    data: Vec<f32>,
}

impl PackedWeights {
    /// (rows, columns) of the original W.
    pub fn shape(&self) -> (usize, usize) {
        (self.m, self.k)
    }
}

/// What [`Kernels::matmul_packed`] applies to each output after the product, in this order.
#[derive(Clone, Copy, Default)]
pub struct Epilogue<'a> {
    /// (m): added to every row of Y.
    pub bias: Option<&'a [f32]>,
    /// (n, m): added to Y.
    pub residual: Option<&'a [f32]>,
    /// Exact (erf) GELU.
    pub gelu: bool,
}

/// The kernels of one tier. Obtain with [`kernels`] (the active tier) or [`Kernels::for_isa`].
pub struct Kernels {
    isa: Isa,
    t: &'static Table,
}

static ACTIVE: OnceLock<Result<Kernels, IsaError>> = OnceLock::new();

/// The active tier: `SPINFER_ISA` if set, else the best this CPU has. Detected once.
///
/// Panics only if `SPINFER_ISA` names an unknown or unavailable tier; call [`try_kernels`]
/// to get that as an error instead.
pub fn kernels() -> &'static Kernels {
    match try_kernels() {
        Ok(k) => k,
        Err(e) => panic!("{e}"),
    }
}

/// The active tier, or why `SPINFER_ISA` cannot be honoured.
pub fn try_kernels() -> Result<&'static Kernels, IsaError> {
    ACTIVE
        .get_or_init(|| match std::env::var("SPINFER_ISA") {
            Ok(name) if !name.is_empty() => Kernels::for_name(&name),
            _ => {
                let best = *Isa::available().last().expect("scalar is always available");
                Kernels::for_isa(best)
            }
        })
        .as_ref()
        .map_err(|e| e.clone())
}

impl Kernels {
    pub fn for_name(name: &str) -> Result<Kernels, IsaError> {
        let have: Vec<&str> = Isa::available().iter().map(|i| i.name()).collect();
        match Isa::from_name(name) {
            Some(isa) => Kernels::for_isa(isa),
            None => Err(IsaError(format!(
                "SPINFER_ISA={name:?} is not a known tier (scalar, portable, avx2, avx512, neon); this CPU has: {}",
                have.join(", ")
            ))),
        }
    }

    pub fn for_isa(isa: Isa) -> Result<Kernels, IsaError> {
        let have: Vec<&str> = Isa::available().iter().map(|i| i.name()).collect();
        match (isa.is_available(), table(isa)) {
            (true, Some(t)) => Ok(Kernels { isa, t }),
            _ => Err(IsaError(format!(
                "tier {isa} is not available on this CPU/build; this CPU has: {}",
                have.join(", ")
            ))),
        }
    }

    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// sum_i w[i] x[i]
    pub fn dot(&self, w: Weights<'_>, x: &[f32]) -> f32 {
        assert_eq!(w.len(), x.len(), "dot: length mismatch");
        match w.format().act_format() {
            None => (self.t.dot)(w, x),
            Some(f) => {
                check_blocks("dot", w.format(), x.len());
                with_acts(|b| (self.t.qdot)(w, b.quantize(f, x)))
            }
        }
    }

    /// The integer dot product of a block-format weight row with activations already
    /// quantized to its [`Format::act_format`] (see [`quant::ActBuf`]).
    pub fn dot_quantized(&self, w: Weights<'_>, a: Acts<'_>) -> f32 {
        assert_eq!(
            w.format().act_format(),
            Some(a.format()),
            "dot_quantized: {} weights with {:?} activations",
            w.format().name(),
            a.format()
        );
        assert_eq!(w.len(), a.len(), "dot_quantized: length mismatch");
        (self.t.qdot)(w, a)
    }

    /// [`Kernels::dot_quantized`] of one row with four tokens' activations (the prefill
    /// matmul's inner step: each weight block is unpacked once).
    pub fn dot4_quantized(&self, w: Weights<'_>, a: [Acts<'_>; 4]) -> [f32; 4] {
        for a in &a {
            assert_eq!(
                w.format().act_format(),
                Some(a.format()),
                "dot4_quantized: formats"
            );
            assert_eq!(w.len(), a.len(), "dot4_quantized: length mismatch");
        }
        (self.t.qdot4)(w, a)
    }

    /// Whether this tier has the bf16 dot-product matmul ([`Precision::Bf16Dot`]).
    pub fn has_bf16_dot(&self) -> bool {
        self.t.matmul_bf16.is_some()
    }

    /// y = W x with W `(y.len(), x.len())` row-major. Rows are split over the thread pool
    /// when the product is big enough to pay for it.
    pub fn matvec(&self, w: Weights<'_>, x: &[f32], y: &mut [f32]) {
        self.matvecs(&mut [(w, y)], x)
    }

    /// y = W x on the calling thread only (inside a [`team`], say), W's rows `ld` elements
    /// apart: `x.len()` for a packed matrix, more for a column block of a wider one.
    pub fn matvec_strided(&self, w: Weights<'_>, ld: usize, x: &[f32], y: &mut [f32]) {
        assert!(
            w.format().is_float(),
            "matvec_strided: {} weights (block formats go through matvec/matvecs)",
            w.format().name()
        );
        assert!(ld >= x.len(), "matvec_strided: rows overlap");
        assert!(
            y.is_empty() || (y.len() - 1) * ld + x.len() <= w.len(),
            "matvec_strided: weights too short"
        );
        (self.t.matvec_ld)(w, ld, x, y)
    }

    /// y_i = W_i x for up to four matrices sharing `x` (decode's q/k/v, gate/up) in one
    /// parallel pass over all their rows: one fork/join instead of several, and threads take
    /// ~256 KiB blocks of rows in turn so at the end neither waits long for the other.
    ///
    /// Block-format weights multiply `x` quantized once per call (per activation format the
    /// matrices need) into a per-thread buffer reused between calls.
    pub fn matvecs(&self, jobs: &mut [(Weights<'_>, &mut [f32])], x: &[f32]) {
        let total: usize = jobs.iter().map(|j| j.0.len()).sum();
        with_acts(|buf| {
            let acts = buf.fill_for(jobs.iter().map(|j| j.0.format()), x);
            // SAFETY: each output is a live `&mut` slice of its length, used by nobody else here.
            let mb = unsafe {
                MatvecBlocks::new(
                    self,
                    jobs.iter_mut().map(|(w, y)| (*w, y.as_mut_ptr(), y.len())),
                    x,
                    acts,
                )
            };
            if rayon::current_num_threads() <= 1 || total < PAR_MIN {
                // SAFETY: one block at a time.
                (0..mb.count).for_each(|b| unsafe { mb.run(b) });
            } else {
                // SAFETY: rayon runs each block once.
                (0..mb.count)
                    .into_par_iter()
                    .for_each(|b| unsafe { mb.run(b) });
            }
        })
    }

    /// Y = X Wᵀ with X `(n, k)`, W `(m, k)`, Y `(n, m)`. Block-format weights multiply X
    /// quantized once per call (llama.cpp's activation format for each, see
    /// [`Format::act_format`]) with integer dots. Bf16 weights follow the process default
    /// [`Policy::from_env`]; models pass their own policy's choice to [`Kernels::matmul_with`].
    pub fn matmul(&self, w: Weights<'_>, x: &[f32], n: usize, y: &mut [f32]) {
        self.matmul_with(Policy::from_env().precision(w, n), w, x, n, y)
    }

    /// Y = X Wᵀ with the given precision for bf16 weights.
    pub fn matmul_with(&self, prec: Precision, w: Weights<'_>, x: &[f32], n: usize, y: &mut [f32]) {
        if n == 0 {
            assert!(
                x.is_empty() && y.is_empty(),
                "matmul: n = 0 needs empty x and y"
            );
            return;
        }
        assert_eq!(x.len() % n, 0, "matmul: x is not (n, k)");
        assert_eq!(y.len() % n, 0, "matmul: y is not (n, m)");
        assert_eq!(
            w.len(),
            (x.len() / n) * (y.len() / n),
            "matmul: w is not (m, k)"
        );
        let (k, m) = (x.len() / n, y.len() / n);
        // One token is a matrix-vector product, unless the precision asks for rounding.
        let rounds = match prec {
            Precision::Exact => false,
            Precision::Bf16Dot => matches!(w, Weights::Bf16(_)),
            Precision::Amx => amx_takes(w),
        };
        if n == 1 && !rounds {
            return self.matvec(w, x, y);
        }
        #[cfg(target_arch = "x86_64")]
        if let (Precision::Amx, Isa::Avx512) = (prec, self.isa) {
            if amx_takes(w) && k > 0 && amx_available() {
                return self.matmul_amx(w, x, n, k, m, y);
            }
        }
        if !w.format().is_float() {
            return self.matmul_quant(w, x, n, k, m, y);
        }
        let bf = match (prec, w, &self.t.matmul_bf16) {
            (Precision::Bf16Dot, Weights::Bf16(_), Some(b)) if k > 0 => Some(b),
            _ => None,
        };
        let Some(bf) = bf else {
            let tw = self.t.op_width;
            // More than one vector of tokens: outer products (a last group of ≤ one vector
            // runs one-vector tiles); else (and for k = 0) dot products (`simd::matmul_few`: a
            // decode batch whose tokens each get exactly their lone `matvec` sums).
            if tw > 0 && n > self.isa.lanes() && k > 0 {
                let go = |xp: &mut Vec<f32>| {
                    let len = n.div_ceil(tw) * k * tw;
                    xp.resize(len + 16, 0.0);
                    // Panels start on a cache line: their vector loads never split one.
                    let off = xp.as_ptr().align_offset(64).min(16);
                    let xp = &mut xp[off..off + len];
                    simd::pack_x(x, n, k, tw, xp);
                    let job = MatmulJob {
                        w,
                        x,
                        xb: &[],
                        xp,
                        n,
                        k,
                        m,
                        y: y.as_mut_ptr(),
                    };
                    self.run_matmul(self.t.matmul, &job, self.t.op_rows);
                };
                return with_scratch(&XP, Vec::new, go);
            }
            let job = MatmulJob {
                w,
                x,
                xb: &[],
                xp: &[],
                n,
                k,
                m,
                y: y.as_mut_ptr(),
            };
            return self.run_matmul(self.t.matmul, &job, 48);
        };
        let go = |xb: &mut Vec<u16>| {
            xb.resize(n * k, 0);
            (bf.cvt)(x, xb);
            let job = MatmulJob {
                w,
                x,
                xb,
                xp: &[],
                n,
                k,
                m,
                y: y.as_mut_ptr(),
            };
            self.run_matmul(bf.mm, &job, 48);
        };
        with_scratch(&XB, Vec::new, go)
    }

    /// Repack W (m, k) for [`Kernels::matmul_packed`]: f32 panels of the tier's tile width.
    pub fn pack_weights(&self, w: Weights<'_>, m: usize, k: usize) -> PackedWeights {
        assert_eq!(w.len(), m * k, "pack_weights: w is not (m, k)");
        let p = self.t.pw_panel;
        let data = match w {
            Weights::F32(w) => simd::pack_w(w, m, k, p),
            Weights::F16(w) => simd::pack_w(w, m, k, p),
            Weights::Bf16(w) => simd::pack_w(w, m, k, p),
            // Blocks are widened once here; packing copies the weights anyway.
            block_formats!() => {
                let mut f = vec![0f32; m * k];
                scalar::to_f32(w, &mut f);
                simd::pack_w(&f, m, k, p)
            }
        };
        PackedWeights {
            isa: self.isa,
            p,
            m,
            k,
            data,
        }
    }

    /// Y = act(X Wᵀ + bias + residual) with X (n, k), W (m, k) packed by
    /// [`Kernels::pack_weights`] of this tier, Y (n, m); exact f32 accumulation. The epilogue
    /// runs on the tile's registers, so it costs no extra pass over Y.
    pub fn matmul_packed(
        &self,
        w: &PackedWeights,
        x: &[f32],
        n: usize,
        y: &mut [f32],
        epi: Epilogue<'_>,
    ) {
        assert_eq!(
            w.isa, self.isa,
            "matmul_packed: weights packed for another tier"
        );
        let (m, k) = (w.m, w.k);
        assert!(
            x.len() == n * k && y.len() == n * m,
            "matmul_packed: shapes"
        );
        assert!(epi.bias.is_none_or(|b| b.len() == m), "matmul_packed: bias");
        assert!(
            epi.residual.is_none_or(|r| r.len() == n * m),
            "matmul_packed: residual"
        );
        if n == 0 {
            return;
        }
        let job = PwJob {
            w: &w.data,
            p: w.p,
            x,
            n,
            k,
            m,
            y: y.as_mut_ptr(),
            bias: epi.bias,
            residual: epi.residual,
            gelu: epi.gelu,
        };
        let np = m.div_ceil(w.p);
        let threads = rayon::current_num_threads();
        let f = self.t.matmul_pw;
        if threads <= 1 || n * k * m < PAR_MIN || np < 2 {
            return f(&job, 0, np);
        }
        // Two chunks per thread: little fork/join cost, some slack for a busy core.
        let chunk = np.div_ceil(threads * 2);
        (0..np.div_ceil(chunk))
            .into_par_iter()
            .for_each(|c| f(&job, c * chunk, ((c + 1) * chunk).min(np)));
    }

    /// The AMX path: X packed once as bf16 B tiles, then W's rows split over the pool.
    #[cfg(target_arch = "x86_64")]
    fn matmul_amx(&self, w: Weights<'_>, x: &[f32], n: usize, k: usize, m: usize, y: &mut [f32]) {
        use x86_64::amx;
        fn rows(j: &MatmulJob<'_>, r0: usize, r1: usize) {
            AMX_CALLS.fetch_add(1, Ordering::Relaxed);
            // SAFETY: only reached when `amx::available()`, with weights `amx_takes` and `xb`
            // packed by `amx::pack_x` for (n, k); `run_matmul` gives threads disjoint row ranges.
            unsafe { amx::matmul_rows(j, r0, r1) }
        }
        let go = |xb: &mut Vec<u16>| {
            xb.resize(amx::packed_len(n, k), 0);
            amx::pack_x(x, n, k, xb);
            let job = MatmulJob {
                w,
                x,
                xb,
                xp: &[],
                n,
                k,
                m,
                y: y.as_mut_ptr(),
            };
            self.run_matmul(rows, &job, 48);
        };
        with_scratch(&XB, Vec::new, go)
    }

    /// Y = X Wᵀ for block-format W: each token row of X quantized once (in parallel), then
    /// chunks of weight rows × all tokens (the tier's `qtile`, which reads each weight tile
    /// from memory once and from cache for every token, and prepares the activations once per
    /// chunk), copied into Y's columns; rows are split over the pool as in
    /// [`Kernels::run_matmul`], in multiples of `QT`.
    fn matmul_quant(&self, w: Weights<'_>, x: &[f32], n: usize, k: usize, m: usize, y: &mut [f32]) {
        const QT: usize = 16;
        let f = w.format();
        check_blocks("matmul", f, k);
        let af = f.act_format().expect("block format");
        let qtile = self.t.qtile;
        let yp = SyncPtr(y.as_mut_ptr());
        with_acts(|buf| {
            let acts = if n * k >= PAR_MIN {
                buf.quantize_par(af, x, k)
            } else {
                buf.quantize(af, x)
            };
            let rows = |r0: usize, r1: usize| {
                let yp = &yp; // the whole (Sync) wrapper, not its raw field
                with_scratch(&QOUT, Vec::new, |out| {
                    // Every element is written by the tile: the length is all that matters.
                    out.resize(n * (r1 - r0), 0.0);
                    qtile(w.slice(r0 * k, r1 * k), acts, n, out);
                    for t in 0..n {
                        let src = &out[t * (r1 - r0)..(t + 1) * (r1 - r0)];
                        // SAFETY: row t, columns r0..r1 lie in Y (n, m); each thread has its
                        // own columns.
                        let dst = unsafe {
                            std::slice::from_raw_parts_mut(yp.0.add(t * m + r0), r1 - r0)
                        };
                        dst.copy_from_slice(src);
                    }
                })
            };
            let threads = rayon::current_num_threads();
            if threads <= 1 || n * k * m < PAR_MIN || m < 32 {
                return rows(0, m);
            }
            let chunk = m.div_ceil(threads * 4).next_multiple_of(QT);
            (0..m.div_ceil(chunk))
                .into_par_iter()
                .for_each(|c| rows(c * chunk, ((c + 1) * chunk).min(m)));
        })
    }

    /// Split Y's columns (W's rows) over the pool: each W row is read by one thread only.
    /// Chunks are multiples of `align` rows (whole tiles), about four per thread.
    fn run_matmul(&self, f: fn(&MatmulJob<'_>, usize, usize), job: &MatmulJob<'_>, align: usize) {
        let (n, k, m) = (job.n, job.k, job.m);
        let threads = rayon::current_num_threads();
        if threads <= 1 || n * k * m < PAR_MIN || m < 32 {
            return f(job, 0, m);
        }
        // Small multiples keep the chunks near equal (2048 rows in 6-row tiles: 7 × 258 + 242, not 7 × 288 + 32),
        // so no thread waits long for the other at the end.
        let chunk = m.div_ceil(threads * 4).next_multiple_of(align.max(1));
        (0..m.div_ceil(chunk))
            .into_par_iter()
            .for_each(|c| f(job, c * chunk, ((c + 1) * chunk).min(m)));
    }

    pub fn rmsnorm(&self, x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
        assert!(weight.len() == x.len() && out.len() == x.len());
        (self.t.rmsnorm)(x, weight, eps, out)
    }

    pub fn layernorm(&self, x: &[f32], weight: &[f32], bias: &[f32], eps: f32, out: &mut [f32]) {
        assert!(weight.len() == x.len() && bias.len() == x.len() && out.len() == x.len());
        (self.t.layernorm)(x, weight, bias, eps, out)
    }

    pub fn softmax(&self, x: &mut [f32]) {
        (self.t.softmax)(x)
    }

    /// Attention's scores on the calling thread: `scores[r·ld + j]` = q_r · key_j for the
    /// `n` queries (rows of `q`) and positions j < len, `kt` holding a kv head's keys
    /// transposed (row d: dimension d of every position, `stride` apart). Each score is
    /// summed in order of the dimensions, so a query's scores have the same bits whatever
    /// other queries share the call and however many positions there are. `stride` and `ld`
    /// must be at least len rounded up to [`ATT_PAD`]; entries past len are left with
    /// values to ignore.
    #[allow(clippy::too_many_arguments)]
    pub fn attn_scores(
        &self,
        kt: &[f32],
        stride: usize,
        len: usize,
        q: &[f32],
        n: usize,
        ld: usize,
        scores: &mut [f32],
    ) {
        (self.t.attn_scores)(kt, stride, len, q, n, ld, scores)
    }

    /// Attention's outputs on the calling thread: row r of `out` (`hd` values) =
    /// Σ_{j < lens[r]} p[r·ld + j] · values[j], `values` (len, hd) rows. Each element is
    /// summed in order of j by multiply-adds, so a row's bits do not depend on the other rows.
    pub fn attn_values(
        &self,
        values: &[f32],
        hd: usize,
        p: &[f32],
        ld: usize,
        lens: &[usize],
        out: &mut [f32],
    ) {
        (self.t.attn_values)(values, hd, p, ld, lens, out)
    }

    pub fn silu(&self, x: &mut [f32]) {
        (self.t.silu)(x)
    }

    /// gate = silu(gate) * up
    pub fn silu_mul(&self, gate: &mut [f32], up: &[f32]) {
        assert_eq!(gate.len(), up.len());
        (self.t.silu_mul)(gate, up)
    }

    /// Exact (erf) GELU.
    pub fn gelu(&self, x: &mut [f32]) {
        (self.t.gelu)(x)
    }

    /// Rotate-half RoPE on `x` = (n_heads, head_dim) with per-position `cos`, `sin` of length head_dim/2.
    pub fn rope(&self, x: &mut [f32], head_dim: usize, cos: &[f32], sin: &[f32]) {
        assert!(head_dim > 0 && head_dim.is_multiple_of(2) && x.len().is_multiple_of(head_dim));
        assert!(cos.len() == head_dim / 2 && sin.len() == head_dim / 2);
        (self.t.rope)(x, head_dim, cos, sin)
    }

    /// x += y
    pub fn add(&self, x: &mut [f32], y: &[f32]) {
        assert_eq!(x.len(), y.len());
        (self.t.add)(x, y)
    }

    /// x *= s
    pub fn scale(&self, x: &mut [f32], s: f32) {
        (self.t.scale)(x, s)
    }

    /// y += a x
    pub fn axpy(&self, y: &mut [f32], a: f32, x: &[f32]) {
        assert_eq!(x.len(), y.len());
        (self.t.axpy)(y, a, x)
    }

    /// Widen any weight dtype to f32.
    pub fn to_f32(&self, w: Weights<'_>, out: &mut [f32]) {
        assert_eq!(w.len(), out.len());
        if w.format().is_float() {
            (self.t.to_f32)(w, out)
        } else {
            quant::scalar::dequantize(w, out)
        }
    }
}

/// f32 → f16 / bf16 (round to nearest even), for tests and writers.
pub fn f32_to_f16(x: &[f32]) -> Vec<f16> {
    x.iter().map(|&v| f16::from_f32(v)).collect()
}
pub fn f32_to_bf16(x: &[f32]) -> Vec<bf16> {
    x.iter().map(|&v| bf16::from_f32(v)).collect()
}

/// Set the number of threads kernels use (default: all cores). Effective only before the
/// first parallel kernel runs; returns false if the pool was already built. Process-wide, but
/// only a speed knob: no kernel splits a sum across threads, so results do not depend on it
/// (tests/llama.rs `thread_count_does_not_change_results`).
pub fn set_threads(n: usize) -> bool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
        .is_ok()
}
