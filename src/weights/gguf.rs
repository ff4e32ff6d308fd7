//! GGUF (llama.cpp's model file, versions 2 and 3): header, metadata and tensor table parsed
//! from bytes (a memory map), every count, length, type, shape and offset validated before use.
//! Tensors are byte ranges of the input; nothing of the tensor data is copied.
//!
//! Layout (little-endian): magic "GGUF", u32 version, u64 tensor count, u64 metadata count,
//! the metadata key/values, the tensor infos (name, n_dims, dims (ne[0] fastest first), ggml
//! type, offset), padding to `general.alignment`, then the data section the offsets are
//! relative to.
//!
//! Allocation is bounded by the input: a count or length is checked against the bytes left
//! (times the fewest bytes one item can take) before anything is reserved for it.

use spinfer_kernels::Format;
use std::collections::{HashMap, HashSet};
use std::fmt;

/// Why a GGUF file cannot be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GgufError {
    kind: GgufErrorKind,
    message: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgufErrorKind {
    /// The file is not a well-formed GGUF (or cannot be read).
    Invalid,
    /// A well-formed file using something we do not compute with (a ggml type such as Q2_K or
    /// IQ4_XS): Spin's `model-not-supported`.
    Unsupported,
}

impl GgufError {
    pub(crate) fn invalid(message: impl Into<String>) -> GgufError {
        GgufError {
            kind: GgufErrorKind::Invalid,
            message: message.into(),
        }
    }
    pub(crate) fn unsupported(message: impl Into<String>) -> GgufError {
        GgufError {
            kind: GgufErrorKind::Unsupported,
            message: message.into(),
        }
    }
    pub fn kind(&self) -> GgufErrorKind {
        self.kind
    }
    pub fn is_unsupported(&self) -> bool {
        self.kind == GgufErrorKind::Unsupported
    }
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for GgufError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for GgufError {}

/// Spin's error: an unsupported type is `model-not-supported` (its reason names the file, the
/// tensor and the type), anything else a runtime error.
impl From<GgufError> for crate::Error {
    fn from(e: GgufError) -> crate::Error {
        match e.kind {
            GgufErrorKind::Unsupported => crate::Error::not_supported(e.message),
            GgufErrorKind::Invalid => crate::Error::runtime(e.message),
        }
    }
}

type Result<T> = std::result::Result<T, GgufError>;

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    Str(String),
    Array(Array),
}

/// A metadata array: one element type (nested arrays are refused, as llama.cpp does).
#[derive(Clone, Debug, PartialEq)]
pub enum Array {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F32(Vec<f32>),
    F64(Vec<f64>),
    Bool(Vec<bool>),
    Str(Vec<String>),
}

impl Value {
    /// The GGUF type name (for messages).
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "u8",
            Value::I8(_) => "i8",
            Value::U16(_) => "u16",
            Value::I16(_) => "i16",
            Value::U32(_) => "u32",
            Value::I32(_) => "i32",
            Value::U64(_) => "u64",
            Value::I64(_) => "i64",
            Value::F32(_) => "f32",
            Value::F64(_) => "f64",
            Value::Bool(_) => "bool",
            Value::Str(_) => "string",
            Value::Array(a) => match a {
                Array::U8(_) => "array of u8",
                Array::I8(_) => "array of i8",
                Array::U16(_) => "array of u16",
                Array::I16(_) => "array of i16",
                Array::U32(_) => "array of u32",
                Array::I32(_) => "array of i32",
                Array::U64(_) => "array of u64",
                Array::I64(_) => "array of i64",
                Array::F32(_) => "array of f32",
                Array::F64(_) => "array of f64",
                Array::Bool(_) => "array of bool",
                Array::Str(_) => "array of string",
            },
        }
    }

    /// An integer of any width, widened.
    fn as_i128(&self) -> Option<i128> {
        Some(match *self {
            Value::U8(v) => v.into(),
            Value::I8(v) => v.into(),
            Value::U16(v) => v.into(),
            Value::I16(v) => v.into(),
            Value::U32(v) => v.into(),
            Value::I32(v) => v.into(),
            Value::U64(v) => v.into(),
            Value::I64(v) => v.into(),
            _ => return None,
        })
    }
}

impl Array {
    pub fn len(&self) -> usize {
        match self {
            Array::U8(v) => v.len(),
            Array::I8(v) => v.len(),
            Array::U16(v) => v.len(),
            Array::I16(v) => v.len(),
            Array::U32(v) => v.len(),
            Array::I32(v) => v.len(),
            Array::U64(v) => v.len(),
            Array::I64(v) => v.len(),
            Array::F32(v) => v.len(),
            Array::F64(v) => v.len(),
            Array::Bool(v) => v.len(),
            Array::Str(v) => v.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Integer elements of any width, widened (None for float, bool and string arrays).
    fn ints(&self) -> Option<Vec<i128>> {
        fn w<T: Copy + Into<i128>>(v: &[T]) -> Vec<i128> {
            v.iter().map(|&x| x.into()).collect()
        }
        Some(match self {
            Array::U8(v) => w(v),
            Array::I8(v) => w(v),
            Array::U16(v) => w(v),
            Array::I16(v) => w(v),
            Array::U32(v) => w(v),
            Array::I32(v) => w(v),
            Array::U64(v) => w(v),
            Array::I64(v) => w(v),
            _ => return None,
        })
    }
}

/// The key/value metadata of a GGUF file, in file order, with typed getters. Each getter gives
/// `Ok(None)` for a missing key and an error naming the key (and file) for a value of another
/// type; integer getters take any integer width whose value fits.
#[derive(Clone, Debug, Default)]
pub struct Metadata {
    /// The file, for messages.
    source: String,
    kvs: Vec<(String, Value)>,
    index: HashMap<String, usize>,
}

impl Metadata {
    /// The file the metadata came from (for messages).
    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.index.get(key).map(|&i| &self.kvs[i].1)
    }

    pub fn contains(&self, key: &str) -> bool {
        self.index.contains_key(key)
    }

    /// Keys and values in file order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.kvs.iter().map(|(k, v)| (k.as_str(), v))
    }

    pub fn len(&self) -> usize {
        self.kvs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.kvs.is_empty()
    }

    fn wrong(&self, key: &str, want: &str, v: &Value) -> GgufError {
        GgufError::invalid(format!(
            "{}: metadata key {key:?} is {}, expected {want}",
            self.source,
            describe_value(v)
        ))
    }

    fn int<T: TryFrom<i128>>(&self, key: &str, want: &str) -> Result<Option<T>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        v.as_i128()
            .and_then(|i| T::try_from(i).ok())
            .map(Some)
            .ok_or_else(|| self.wrong(key, want, v))
    }

    pub fn get_u32(&self, key: &str) -> Result<Option<u32>> {
        self.int(key, "an integer in u32 range")
    }

    pub fn get_u64(&self, key: &str) -> Result<Option<u64>> {
        self.int(key, "an integer in u64 range")
    }

    pub fn get_i32(&self, key: &str) -> Result<Option<i32>> {
        self.int(key, "an integer in i32 range")
    }

    /// An f32, or an f64 (narrowed: GGUF writers use either for hyperparameters).
    pub fn get_f32(&self, key: &str) -> Result<Option<f32>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::F32(x)) => Ok(Some(*x)),
            Some(Value::F64(x)) => Ok(Some(*x as f32)),
            Some(v) => Err(self.wrong(key, "a float", v)),
        }
    }

    pub fn get_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.wrong(key, "a bool", v)),
        }
    }

    pub fn get_str(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Str(s)) => Ok(Some(s)),
            Some(v) => Err(self.wrong(key, "a string", v)),
        }
    }

    pub fn get_str_array(&self, key: &str) -> Result<Option<&[String]>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(Array::Str(s))) => Ok(Some(s)),
            Some(v) => Err(self.wrong(key, "an array of strings", v)),
        }
    }

    /// An array of f32 (or f64, narrowed).
    pub fn get_f32_array(&self, key: &str) -> Result<Option<Vec<f32>>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(Array::F32(a))) => Ok(Some(a.clone())),
            Some(Value::Array(Array::F64(a))) => Ok(Some(a.iter().map(|&x| x as f32).collect())),
            Some(v) => Err(self.wrong(key, "an array of floats", v)),
        }
    }

    /// An array of integers of any width, each fitting in i32.
    pub fn get_i32_array(&self, key: &str) -> Result<Option<Vec<i32>>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let want = "an array of integers in i32 range";
        let Value::Array(a) = v else {
            return Err(self.wrong(key, want, v));
        };
        let ints = a.ints().ok_or_else(|| self.wrong(key, want, v))?;
        ints.into_iter()
            .enumerate()
            .map(|(i, x)| {
                i32::try_from(x).map_err(|_| {
                    GgufError::invalid(format!(
                        "{}: metadata key {key:?}: element {i} is {x}, outside i32 range",
                        self.source
                    ))
                })
            })
            .collect::<Result<Vec<i32>>>()
            .map(Some)
    }

    /// A required key: the getter's value, or an error naming the missing key.
    pub fn require<T>(&self, key: &str, got: Result<Option<T>>) -> Result<T> {
        got?.ok_or_else(|| {
            GgufError::invalid(format!("{}: metadata key {key:?} is missing", self.source))
        })
    }
}

fn describe_value(v: &Value) -> String {
    match v {
        Value::Str(s) if s.len() <= 40 => format!("the string {s:?}"),
        Value::Array(a) => format!("an {} (length {})", v.type_name(), a.len()),
        Value::Str(_) => "a string".to_string(),
        Value::Bool(b) => format!("the bool {b}"),
        Value::F32(x) => format!("the f32 {x}"),
        Value::F64(x) => format!("the f64 {x}"),
        _ => match v.as_i128() {
            Some(i) => format!("the {} {i}", v.type_name()),
            None => v.type_name().to_string(),
        },
    }
}

/// One tensor as the file describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub format: Format,
    /// Row-major shape (slowest first, as safetensors and PyTorch): the file's dims reversed.
    pub shape: Vec<usize>,
    /// Byte range in the input (absolute: header included).
    pub start: usize,
    pub end: usize,
}

/// A parsed GGUF header: metadata and tensor table.
#[derive(Clone, Debug)]
pub struct Gguf {
    pub version: u32,
    pub alignment: usize,
    /// Where the data section starts (absolute).
    pub data_offset: usize,
    pub metadata: Metadata,
    /// In file order.
    pub tensors: Vec<TensorInfo>,
}

/// Dims a ggml tensor may have (GGML_MAX_DIMS).
const MAX_DIMS: u32 = 4;
/// Longest tensor name llama.cpp accepts (GGML_MAX_NAME - 1 bytes plus its NUL).
const MAX_NAME: usize = 63;
/// Fewest bytes one tensor info can take: name length (8) + n_dims (4) + one dim (8) + type
/// (4) + offset (8).
const MIN_TENSOR_INFO: usize = 32;
/// Fewest bytes one key/value can take: key length (8) + value type (4) + a u8 (1).
const MIN_KV: usize = 13;

/// llama.cpp's name of every ggml type id (ggml.h's `ggml_type`), including the ones we do not
/// compute with and the removed ones, so an error can say what the file holds.
pub fn ggml_type_name(id: u32) -> Option<&'static str> {
    const NAMES: [&str; 40] = [
        "F32",
        "F16",
        "Q4_0",
        "Q4_1",
        "Q4_2 (removed)",
        "Q4_3 (removed)",
        "Q5_0",
        "Q5_1",
        "Q8_0",
        "Q8_1",
        "Q2_K",
        "Q3_K",
        "Q4_K",
        "Q5_K",
        "Q6_K",
        "Q8_K",
        "IQ2_XXS",
        "IQ2_XS",
        "IQ3_XXS",
        "IQ1_S",
        "IQ4_NL",
        "IQ3_S",
        "IQ2_S",
        "IQ4_XS",
        "I8",
        "I16",
        "I32",
        "I64",
        "F64",
        "IQ1_M",
        "BF16",
        "Q4_0_4_4 (removed)",
        "Q4_0_4_8 (removed)",
        "Q4_0_8_8 (removed)",
        "TQ1_0",
        "TQ2_0",
        "IQ4_NL_4_4 (removed)",
        "IQ4_NL_4_8 (removed)",
        "IQ4_NL_8_8 (removed)",
        "MXFP4",
    ];
    NAMES.get(id as usize).copied()
}

/// A bounds-checked little-endian reader over the header.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    source: &'a str,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &dyn Fn() -> String) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(GgufError::invalid(format!(
                "{}: file ends inside {} (needs {n} bytes at offset {}, {} left): truncated?",
                self.source,
                what(),
                self.pos,
                self.remaining()
            )));
        }
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N]> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// A count of items each taking at least `min_bytes`: refused when the rest of the file
    /// could not hold that many, so a lying count cannot make us reserve memory.
    fn count(&mut self, min_bytes: usize, what: &dyn Fn() -> String) -> Result<usize> {
        let n = self.u64(what)?;
        let fits = (self.remaining() / min_bytes) as u64;
        if n > fits {
            return Err(GgufError::invalid(format!(
                "{}: {} is {n}, more than the {} bytes left in the file could hold: truncated or corrupt?",
                self.source,
                what(),
                self.remaining()
            )));
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String> {
        let len = self.u64(&|| format!("the length of {}", what()))?;
        if len > self.remaining() as u64 {
            return Err(GgufError::invalid(format!(
                "{}: {} has length {len}, more than the {} bytes left in the file: truncated or corrupt?",
                self.source,
                what(),
                self.remaining()
            )));
        }
        let bytes = self.take(len as usize, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|e| {
            GgufError::invalid(format!(
                "{}: {} is not valid UTF-8 ({e})",
                self.source,
                what()
            ))
        })
    }

    fn value(&mut self, ty: u32, key: &str, in_array: bool) -> Result<Value> {
        let what = || format!("the value of metadata key {key:?}");
        Ok(match ty {
            0 => Value::U8(self.array::<1>(&what)?[0]),
            1 => Value::I8(self.array::<1>(&what)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(&what)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(&what)?)),
            4 => Value::U32(u32::from_le_bytes(self.array(&what)?)),
            5 => Value::I32(i32::from_le_bytes(self.array(&what)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(&what)?)),
            7 => match self.array::<1>(&what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => {
                    return Err(GgufError::invalid(format!(
                        "{}: metadata key {key:?} is a bool of value {b} (not 0 or 1)",
                        self.source
                    )))
                }
            },
            8 => Value::Str(self.string(&what)?),
            9 if !in_array => Value::Array(self.array_value(key)?),
            10 => Value::U64(u64::from_le_bytes(self.array(&what)?)),
            11 => Value::I64(i64::from_le_bytes(self.array(&what)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(&what)?)),
            9 => {
                return Err(GgufError::invalid(format!(
                "{}: metadata key {key:?} is an array of arrays, which GGUF readers do not support",
                self.source
            )))
            }
            t => {
                return Err(GgufError::invalid(format!(
                    "{}: metadata key {key:?} has unknown value type {t}",
                    self.source
                )))
            }
        })
    }

    fn array_value(&mut self, key: &str) -> Result<Array> {
        let ty = self.u32(&|| format!("the element type of metadata key {key:?}"))?;
        // Bytes one element takes at least (a string: its 8-byte length).
        let min = match ty {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            8 | 10..=12 => 8,
            // Element type checked when the first element is read; 1 keeps the count check.
            _ => 1,
        };
        let n = self.count(min, &|| format!("the length of metadata array {key:?}"))?;
        if n == 0 && !(0..=12).contains(&ty) {
            return Err(GgufError::invalid(format!(
                "{}: metadata key {key:?} is an array of unknown type {ty}",
                self.source
            )));
        }
        macro_rules! read {
            ($variant:ident) => {{
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    match self.value(ty, key, true)? {
                        Value::$variant(x) => v.push(x),
                        _ => unreachable!("value() returns the variant of its type id"),
                    }
                }
                Array::$variant(v)
            }};
        }
        Ok(match ty {
            0 => read!(U8),
            1 => read!(I8),
            2 => read!(U16),
            3 => read!(I16),
            4 => read!(U32),
            5 => read!(I32),
            6 => read!(F32),
            7 => read!(Bool),
            8 => read!(Str),
            10 => read!(U64),
            11 => read!(I64),
            12 => read!(F64),
            // An array of arrays or of an unknown type: value() gives the error.
            _ => {
                self.value(ty, key, true)?;
                unreachable!("value() refuses nested arrays and unknown types")
            }
        })
    }
}

impl Gguf {
    /// Parses and validates the header of `bytes` (the whole file). `source` names the file in
    /// messages.
    pub fn parse(source: &str, bytes: &[u8]) -> Result<Gguf> {
        let mut r = Reader {
            bytes,
            pos: 0,
            source,
        };
        let magic = r.array::<4>(&|| "the magic number".to_string())?;
        if &magic != b"GGUF" {
            return Err(GgufError::invalid(format!(
                "{source}: not a GGUF file (starts with {magic:02x?}, not \"GGUF\")"
            )));
        }
        let version = r.u32(&|| "the version".to_string())?;
        match version {
            2 | 3 => {}
            1 => {
                return Err(GgufError::invalid(format!(
                    "{source}: GGUF version 1 (the 2023 draft with 32-bit counts) is not supported; re-convert the model with a current llama.cpp"
                )))
            }
            v if v.swap_bytes() <= 3 => {
                return Err(GgufError::invalid(format!(
                    "{source}: GGUF version {v} looks byte-swapped: big-endian GGUF files are not supported"
                )))
            }
            v => {
                return Err(GgufError::invalid(format!(
                    "{source}: unknown GGUF version {v} (versions 2 and 3 are supported)"
                )))
            }
        }
        let n_tensors = r.count(MIN_TENSOR_INFO, &|| "the tensor count".to_string())?;
        let n_kv = r.count(MIN_KV, &|| "the metadata count".to_string())?;

        let mut metadata = Metadata {
            source: source.to_string(),
            ..Metadata::default()
        };
        for i in 0..n_kv {
            let key = r.string(&|| format!("metadata key #{i}"))?;
            let ty = r.u32(&|| format!("the type of metadata key {key:?}"))?;
            let value = r.value(ty, &key, false)?;
            if metadata.index.contains_key(&key) {
                return Err(GgufError::invalid(format!(
                    "{source}: metadata key {key:?} appears twice"
                )));
            }
            metadata.index.insert(key.clone(), metadata.kvs.len());
            metadata.kvs.push((key, value));
        }

        let alignment = match metadata.get_u32("general.alignment")? {
            None => 32,
            Some(a) if a.is_power_of_two() => a as usize,
            Some(a) => {
                return Err(GgufError::invalid(format!(
                    "{source}: metadata key \"general.alignment\" is {a}, not a power of two"
                )))
            }
        };

        // Tensor infos; offsets are checked once the data section's start is known.
        struct Raw {
            name: String,
            format: Format,
            shape: Vec<usize>,
            offset: u64,
            bytes: usize,
        }
        let mut raw: Vec<Raw> = Vec::with_capacity(n_tensors);
        let mut names: HashSet<String> = HashSet::with_capacity(n_tensors);
        for i in 0..n_tensors {
            let name = r.string(&|| format!("the name of tensor #{i}"))?;
            if name.len() > MAX_NAME {
                return Err(GgufError::invalid(format!(
                    "{source}: tensor #{i}'s name is {} bytes long (at most {MAX_NAME})",
                    name.len()
                )));
            }
            let what = || format!("the description of tensor {name:?}");
            let n_dims = r.u32(&what)?;
            if !(1..=MAX_DIMS).contains(&n_dims) {
                return Err(GgufError::invalid(format!(
                    "{source}: tensor {name:?} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)"
                )));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(r.u64(&what)?);
            }
            let mut numel: usize = 1;
            for &d in &dims {
                numel = usize::try_from(d)
                    .ok()
                    .filter(|&d| d >= 1)
                    .and_then(|d| numel.checked_mul(d))
                    .ok_or_else(|| {
                        GgufError::invalid(format!(
                            "{source}: tensor {name:?} has dims {dims:?}: each must be at least 1 and their product must fit in memory"
                        ))
                    })?;
            }
            let ty = r.u32(&what)?;
            let offset = r.u64(&what)?;
            let format = match Format::from_ggml_type(ty) {
                Some(f) => f,
                None => {
                    return Err(match ggml_type_name(ty) {
                        Some(t) => GgufError::unsupported(format!(
                            "{source}: tensor {name:?} has ggml type {t}, which spinfer does not support (supported: {})",
                            Format::ALL.map(|f| f.name()).join(", ")
                        )),
                        None => GgufError::invalid(format!(
                            "{source}: tensor {name:?} has unknown ggml type {ty}"
                        )),
                    })
                }
            };
            let cols = dims[0] as usize;
            if !cols.is_multiple_of(format.block_len()) {
                return Err(GgufError::invalid(format!(
                    "{source}: tensor {name:?} ({}) has rows of {cols} values, not a whole number of {}-value blocks",
                    format.name(),
                    format.block_len()
                )));
            }
            let size = format
                .row_bytes(cols)
                .and_then(|row| row.checked_mul(numel / cols))
                .ok_or_else(|| {
                    GgufError::invalid(format!(
                        "{source}: tensor {name:?} has dims {dims:?}: its size in bytes overflows"
                    ))
                })?;
            if !names.insert(name.clone()) {
                return Err(GgufError::invalid(format!(
                    "{source}: tensor {name:?} appears twice"
                )));
            }
            raw.push(Raw {
                name,
                format,
                shape: dims.iter().rev().map(|&d| d as usize).collect(),
                offset,
                bytes: size,
            });
        }

        // The data section starts at the next multiple of the alignment (past the end of the
        // file is fine when there are no tensors).
        let data_offset = r.pos.div_ceil(alignment) * alignment;
        let mut tensors = Vec::with_capacity(raw.len());
        for t in raw {
            let name = &t.name;
            if t.offset % alignment as u64 != 0 {
                return Err(GgufError::invalid(format!(
                    "{source}: tensor {name:?} has offset {} which is not a multiple of the alignment {alignment}",
                    t.offset
                )));
            }
            let start = usize::try_from(t.offset)
                .ok()
                .and_then(|o| o.checked_add(data_offset));
            let end = start.and_then(|s| s.checked_add(t.bytes));
            let (start, end) = match (start, end) {
                (Some(s), Some(e)) if e <= bytes.len() => (s, e),
                _ => {
                    return Err(GgufError::invalid(format!(
                        "{source}: tensor {name:?} ({} bytes at data offset {}) lies past the end of the file ({} bytes): truncated?",
                        t.bytes,
                        t.offset,
                        bytes.len()
                    )))
                }
            };
            // Kernels read whole blocks in place: the mapping is page-aligned, so the offset
            // must suit the block (an alignment of 1 or 2 could break this for F32).
            if !start.is_multiple_of(t.format.align()) {
                return Err(GgufError::invalid(format!(
                    "{source}: tensor {name:?} starts at byte {start}, not aligned for {}",
                    t.format.name()
                )));
            }
            tensors.push(TensorInfo {
                name: t.name,
                format: t.format,
                shape: t.shape,
                start,
                end,
            });
        }
        Ok(Gguf {
            version,
            alignment,
            data_offset,
            metadata,
            tensors,
        })
    }
}
