//! Numeric kernels for spinfer: a safe slice API over per-ISA implementations chosen once at
//! runtime. Knows nothing about models.
//!
//! Tiers: `scalar` (the oracle), `portable` (`wide` vectors), `avx2` (AVX2+FMA+F16C),
//! `avx512` (AVX-512F/BW/VL, with AVX-512 BF16 where present), `neon` (aarch64).
//! `SPINFER_ISA=scalar|portable|avx2|avx512|neon` forces one.

pub use half::{bf16, f16};

pub mod scalar;

use std::fmt;
use std::sync::OnceLock;

/// A row-major block of weights borrowed from (memory-mapped) storage, in its stored dtype.
#[derive(Clone, Copy, Debug)]
pub enum Weights<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    Bf16(&'a [bf16]),
}

impl<'a> Weights<'a> {
    pub fn len(&self) -> usize {
        match self {
            Weights::F32(s) => s.len(),
            Weights::F16(s) => s.len(),
            Weights::Bf16(s) => s.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Elements `start..end`, same dtype.
    pub fn slice(&self, start: usize, end: usize) -> Weights<'a> {
        match *self {
            Weights::F32(s) => Weights::F32(&s[start..end]),
            Weights::F16(s) => Weights::F16(&s[start..end]),
            Weights::Bf16(s) => Weights::Bf16(&s[start..end]),
        }
    }
    /// Row `r` of a matrix with `cols` columns.
    pub fn row(&self, r: usize, cols: usize) -> Weights<'a> {
        self.slice(r * cols, (r + 1) * cols)
    }
    /// Bytes per element.
    pub fn elem_size(&self) -> usize {
        match self {
            Weights::F32(_) => 4,
            _ => 2,
        }
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
pub(crate) struct Table {
    pub dot: fn(Weights<'_>, &[f32]) -> f32,
    pub matvec: fn(Weights<'_>, &[f32], &mut [f32]),
    pub matmul: fn(Weights<'_>, &[f32], usize, &mut [f32]),
    pub rmsnorm: fn(&[f32], &[f32], f32, &mut [f32]),
    pub layernorm: fn(&[f32], &[f32], &[f32], f32, &mut [f32]),
    pub softmax: fn(&mut [f32]),
    pub silu: fn(&mut [f32]),
    pub silu_mul: fn(&mut [f32], &[f32]),
    pub gelu: fn(&mut [f32]),
    pub rope: fn(&mut [f32], usize, &[f32], &[f32]),
    pub add: fn(&mut [f32], &[f32]),
    pub scale: fn(&mut [f32], f32),
    pub axpy: fn(&mut [f32], f32, &[f32]),
    pub to_f32: fn(Weights<'_>, &mut [f32]),
}

static SCALAR: Table = Table {
    dot: scalar::dot,
    matvec: scalar::matvec,
    matmul: scalar::matmul,
    rmsnorm: scalar::rmsnorm,
    layernorm: scalar::layernorm,
    softmax: scalar::softmax,
    silu: scalar::silu,
    silu_mul: scalar::silu_mul,
    gelu: scalar::gelu,
    rope: scalar::rope,
    add: scalar::add,
    scale: scalar::scale,
    axpy: scalar::axpy,
    to_f32: scalar::to_f32,
};

fn table(isa: Isa) -> Option<&'static Table> {
    match isa {
        Isa::Scalar => Some(&SCALAR),
        _ => None,
    }
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
        (self.t.dot)(w, x)
    }

    /// y = W x with W `(y.len(), x.len())` row-major.
    pub fn matvec(&self, w: Weights<'_>, x: &[f32], y: &mut [f32]) {
        assert_eq!(
            w.len(),
            x.len() * y.len(),
            "matvec: weights are not (rows, cols)"
        );
        (self.t.matvec)(w, x, y)
    }

    /// Y = X Wᵀ with X `(n, k)`, W `(m, k)`, Y `(n, m)`.
    pub fn matmul(&self, w: Weights<'_>, x: &[f32], n: usize, y: &mut [f32]) {
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
        (self.t.matmul)(w, x, n, y)
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
        assert!(head_dim % 2 == 0 && x.len() % head_dim == 0);
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
        (self.t.to_f32)(w, out)
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
/// first parallel kernel runs; returns false if the pool was already built.
pub fn set_threads(n: usize) -> bool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
        .is_ok()
}
