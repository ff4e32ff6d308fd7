//! The GGUF reader: a tiny GGUF written here (and corrupted every way we can think of), and the
//! real SmolLM2-135M-Instruct Q4_1 file (fixtures/fetch-smollm2.sh) against what llama.cpp's
//! gguf-py reads from it (fixtures/reference/gguf/smollm2-header.json, from
//! fixtures/make_gguf_reference.py).

use spinfer::internals::kernels::Format;
use spinfer::internals::weights::gguf::{Gguf, GgufError};
use spinfer::internals::weights::{WeightFiles, WeightStore};
use std::path::{Path, PathBuf};

// ---- a tiny GGUF writer ----------------------------------------------------------------------

/// Value type ids as GGUF numbers them.
const T_U8: u32 = 0;
const T_I32: u32 = 5;
const T_U32: u32 = 4;
const T_F32: u32 = 6;
const T_BOOL: u32 = 7;
const T_STR: u32 = 8;
const T_ARR: u32 = 9;
const T_F64: u32 = 12;

fn gstr(s: &[u8]) -> Vec<u8> {
    let mut v = (s.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(s);
    v
}

#[derive(Clone)]
struct Tensor {
    name: Vec<u8>,
    dims: Vec<u64>,
    ty: u32,
    data: Vec<u8>,
    /// Written instead of the computed offset.
    offset: Option<u64>,
}

#[derive(Clone)]
struct Builder {
    magic: [u8; 4],
    version: u32,
    /// (key, type, payload)
    kvs: Vec<(Vec<u8>, u32, Vec<u8>)>,
    tensors: Vec<Tensor>,
    alignment: usize,
    tensor_count: Option<u64>,
    kv_count: Option<u64>,
}

impl Builder {
    fn new() -> Builder {
        Builder {
            magic: *b"GGUF",
            version: 3,
            kvs: Vec::new(),
            tensors: Vec::new(),
            alignment: 32,
            tensor_count: None,
            kv_count: None,
        }
    }

    fn kv(mut self, key: &str, ty: u32, payload: Vec<u8>) -> Builder {
        self.kvs.push((key.as_bytes().to_vec(), ty, payload));
        self
    }

    fn tensor(mut self, name: &str, dims: &[u64], ty: u32, data: Vec<u8>) -> Builder {
        self.tensors.push(Tensor {
            name: name.as_bytes().to_vec(),
            dims: dims.to_vec(),
            ty,
            data,
            offset: None,
        });
        self
    }

    /// A valid file: metadata of several types, an F32 norm [4], a Q8_0 matrix of 2 rows x 32
    /// columns (dims [32, 2]) and an F16 matrix 3 x 2.
    fn valid() -> Builder {
        let norm: Vec<u8> = [1.0f32, -2.0, 0.5, 4.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let mut q8 = Vec::new();
        for row in 0..2u8 {
            q8.extend_from_slice(&half::f16::from_f32(0.5).to_le_bytes());
            q8.extend((0..32).map(|i| (i as i8 - 16 + row as i8) as u8));
        }
        let f16: Vec<u8> = (0..6)
            .flat_map(|i| half::f16::from_f32(i as f32).to_le_bytes())
            .collect();
        Builder::new()
            .kv("general.architecture", T_STR, gstr(b"llama"))
            .kv("llama.block_count", T_U32, 2u32.to_le_bytes().to_vec())
            .kv("small", T_U8, vec![7])
            .kv("negative", T_I32, (-3i32).to_le_bytes().to_vec())
            .kv("eps", T_F32, 1e-5f32.to_le_bytes().to_vec())
            .kv("theta", T_F64, 10000f64.to_le_bytes().to_vec())
            .kv("flag", T_BOOL, vec![1])
            .kv("words", T_ARR, {
                let mut v = T_STR.to_le_bytes().to_vec();
                v.extend(2u64.to_le_bytes());
                v.extend(gstr(b"a"));
                v.extend(gstr("\u{2581}b".as_bytes()));
                v
            })
            .kv("ints", T_ARR, {
                let mut v = T_U32.to_le_bytes().to_vec();
                v.extend(3u64.to_le_bytes());
                for x in [1u32, 2, 3_000_000_000] {
                    v.extend(x.to_le_bytes());
                }
                v
            })
            .kv("scores", T_ARR, {
                let mut v = T_F32.to_le_bytes().to_vec();
                v.extend(2u64.to_le_bytes());
                v.extend(0.25f32.to_le_bytes());
                v.extend((-1.5f32).to_le_bytes());
                v
            })
            .tensor("norm", &[4], 0, norm)
            .tensor("w", &[32, 2], 8, q8)
            .tensor("h", &[2, 3], 1, f16)
    }

    fn bytes(&self) -> Vec<u8> {
        let mut out = self.magic.to_vec();
        out.extend(self.version.to_le_bytes());
        out.extend(
            self.tensor_count
                .unwrap_or(self.tensors.len() as u64)
                .to_le_bytes(),
        );
        out.extend(self.kv_count.unwrap_or(self.kvs.len() as u64).to_le_bytes());
        for (k, ty, payload) in &self.kvs {
            out.extend(gstr(k));
            out.extend(ty.to_le_bytes());
            out.extend(payload);
        }
        let mut offset = 0usize;
        let mut offsets = Vec::new();
        for t in &self.tensors {
            out.extend(gstr(&t.name));
            out.extend((t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(t.ty.to_le_bytes());
            out.extend(t.offset.unwrap_or(offset as u64).to_le_bytes());
            offsets.push(offset);
            offset = (offset + t.data.len()).div_ceil(self.alignment) * self.alignment;
        }
        let data_start = out.len().div_ceil(self.alignment) * self.alignment;
        out.resize(data_start, 0);
        for (t, o) in self.tensors.iter().zip(offsets) {
            out.resize(data_start + o, 0);
            out.extend(&t.data);
        }
        out
    }
}

fn parse(bytes: &[u8]) -> Result<Gguf, GgufError> {
    Gguf::parse("test.gguf", bytes)
}

fn err_of(b: &Builder) -> GgufError {
    match parse(&b.bytes()) {
        Ok(_) => panic!("a corrupt file parsed"),
        Err(e) => e,
    }
}

/// The error names the file and says what is wrong (every word of `needles`).
fn assert_err(b: &Builder, needles: &[&str]) {
    let e = err_of(b);
    let msg = e.to_string();
    assert!(msg.starts_with("test.gguf"), "{msg}");
    for n in needles {
        assert!(msg.contains(n), "{msg:?} does not mention {n:?}");
    }
    assert!(!e.is_unsupported(), "{msg}");
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "spinfer-gguf-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---- the valid tiny file -------------------------------------------------------------------

#[test]
fn tiny_file_parses_with_row_major_shapes_and_typed_metadata() {
    let g = parse(&Builder::valid().bytes()).unwrap();
    assert_eq!((g.version, g.alignment), (3, 32));
    let t: Vec<(&str, Format, &[usize])> = g
        .tensors
        .iter()
        .map(|t| (t.name.as_str(), t.format, t.shape.as_slice()))
        .collect();
    assert_eq!(
        t,
        [
            ("norm", Format::F32, &[4][..]),
            ("w", Format::Q8_0, &[2, 32][..]),
            ("h", Format::F16, &[3, 2][..]),
        ]
    );
    // Each tensor's range: data section start + its aligned offset, size in whole blocks.
    assert_eq!(g.tensors[0].start, g.data_offset);
    assert_eq!(g.tensors[0].end - g.tensors[0].start, 16);
    assert_eq!(g.tensors[1].start, g.data_offset + 32);
    assert_eq!(g.tensors[1].end - g.tensors[1].start, 2 * 34);
    assert_eq!(g.tensors[2].start, g.data_offset + 128);

    let m = &g.metadata;
    assert_eq!(m.get_str("general.architecture").unwrap(), Some("llama"));
    assert_eq!(m.get_u32("llama.block_count").unwrap(), Some(2));
    // Any integer width where the value fits.
    assert_eq!(m.get_u32("small").unwrap(), Some(7));
    assert_eq!(m.get_u64("small").unwrap(), Some(7));
    assert_eq!(m.get_i32("negative").unwrap(), Some(-3));
    assert_eq!(m.get_f32("eps").unwrap(), Some(1e-5));
    assert_eq!(m.get_f32("theta").unwrap(), Some(10000.0));
    assert_eq!(m.get_bool("flag").unwrap(), Some(true));
    assert_eq!(
        m.get_str_array("words").unwrap().unwrap(),
        ["a".to_string(), "\u{2581}b".to_string()]
    );
    assert_eq!(m.get_f32_array("scores").unwrap(), Some(vec![0.25, -1.5]));
    assert_eq!(m.get_u32("missing").unwrap(), None);
    assert!(m
        .require("missing", m.get_u32("missing"))
        .unwrap_err()
        .to_string()
        .contains("\"missing\" is missing"));

    // A wrong type or a value out of range is an error naming the key, never ignored.
    for (e, key) in [
        (m.get_u32("negative").unwrap_err(), "negative"),
        (
            m.get_str("llama.block_count").unwrap_err(),
            "llama.block_count",
        ),
        (m.get_u32("eps").unwrap_err(), "eps"),
        (m.get_bool("small").unwrap_err(), "small"),
        (m.get_f32("small").unwrap_err(), "small"),
        (m.get_str_array("ints").unwrap_err(), "ints"),
        (m.get_f32_array("words").unwrap_err(), "words"),
        (m.get_i32_array("scores").unwrap_err(), "scores"),
        (m.get_i32_array("ints").unwrap_err(), "ints"), // 3e9 is outside i32
    ] {
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("{key:?}")) && msg.contains("test.gguf"),
            "{msg}"
        );
    }
}

#[test]
fn weight_store_opens_a_gguf_and_reads_f32_and_blocks() {
    let dir = TempDir::new("store");
    let path = dir.write("model.gguf", &Builder::valid().bytes());
    let store = WeightStore::open_gguf(std::slice::from_ref(&path)).unwrap();
    assert_eq!(
        store.get_f32_vec("norm", &[4]).unwrap(),
        [1.0, -2.0, 0.5, 4.0]
    );
    let w = store.get_shaped("w", &[2, 32]).unwrap();
    assert_eq!(w.dtype, Format::Q8_0);
    assert_eq!(w.numel(), 64);
    // The Q8_0 blocks in place: row 1's scale and quants.
    match w.data {
        spinfer::internals::kernels::Weights::Q8_0(blocks) => {
            assert_eq!(blocks.len(), 2);
            assert_eq!(blocks[1].d.to_f32(), 0.5);
            assert_eq!((blocks[1].qs[0], blocks[1].qs[31]), (-15, 16));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        store.get_f32_vec("h", &[3, 2]).unwrap(),
        [0., 1., 2., 3., 4., 5.]
    );
    let r = store.tensor_ref("w").unwrap();
    assert_eq!(r.dtype, Format::Q8_0);
    assert!(store
        .get_shaped("w", &[32, 2])
        .unwrap_err()
        .to_string()
        .contains("\"w\""));
    assert_eq!(
        store
            .metadata()
            .unwrap()
            .get_str("general.architecture")
            .unwrap(),
        Some("llama")
    );
    assert_eq!(store.file_of("w"), Some(path.as_path()));
    // open_dir finds it.
    let s2 = WeightStore::open_dir(&dir.0).unwrap();
    assert!(s2.contains("norm") && s2.metadata().is_some());
}

// ---- corrupt files ---------------------------------------------------------------------------

#[test]
fn every_truncation_is_an_error() {
    let bytes = Builder::valid().bytes();
    for n in 0..bytes.len() {
        let e = parse(&bytes[..n]).expect_err("a truncated file parsed");
        assert!(e.to_string().contains("truncated"), "cut at {n}: {e}");
    }
}

#[test]
fn header_corruptions_are_named_errors() {
    let v = Builder::valid;
    assert_err(
        &Builder {
            magic: *b"GGML",
            ..v()
        },
        &["not a GGUF file"],
    );
    assert_err(
        &Builder { version: 1, ..v() },
        &["version 1", "not supported"],
    );
    assert_err(&Builder { version: 4, ..v() }, &["unknown GGUF version 4"]);
    assert_err(
        &Builder {
            version: 3u32.swap_bytes(),
            ..v()
        },
        &["big-endian"],
    );
    // Counts and lengths larger than the file: refused before anything is reserved.
    assert_err(
        &Builder {
            tensor_count: Some(u64::MAX),
            ..v()
        },
        &["tensor count", "18446744073709551615"],
    );
    assert_err(
        &Builder {
            kv_count: Some(1 << 40),
            ..v()
        },
        &["metadata count"],
    );
    assert_err(
        &Builder {
            kv_count: Some(11),
            ..v()
        },
        &[],
    );
    let mut b = v();
    b.kvs
        .push((b"big".to_vec(), T_STR, u64::MAX.to_le_bytes().to_vec()));
    assert_err(&b, &["\"big\"", "length 18446744073709551615"]);
    let mut b = v();
    let mut arr = T_U32.to_le_bytes().to_vec();
    arr.extend((1u64 << 61).to_le_bytes());
    b.kvs.push((b"huge_array".to_vec(), T_ARR, arr));
    assert_err(&b, &["\"huge_array\"", "more than the"]);
    let mut b = v();
    let mut arr = T_STR.to_le_bytes().to_vec();
    arr.extend(1000u64.to_le_bytes());
    b.kvs.push((b"strings".to_vec(), T_ARR, arr));
    assert_err(&b, &["\"strings\""]);
    // Value types.
    assert_err(
        &v().kv("odd", 13, vec![0; 8]),
        &["\"odd\"", "unknown value type 13"],
    );
    let mut arr = 42u32.to_le_bytes().to_vec();
    arr.extend(1u64.to_le_bytes());
    arr.push(0);
    assert_err(
        &v().kv("odd_array", T_ARR, arr),
        &["\"odd_array\"", "unknown value type 42"],
    );
    let mut arr = 42u32.to_le_bytes().to_vec();
    arr.extend(0u64.to_le_bytes());
    assert_err(
        &v().kv("empty_odd", T_ARR, arr),
        &["\"empty_odd\"", "unknown type 42"],
    );
    let mut arr = T_ARR.to_le_bytes().to_vec();
    arr.extend(1u64.to_le_bytes());
    arr.extend(T_U8.to_le_bytes());
    arr.extend(0u64.to_le_bytes());
    assert_err(
        &v().kv("nested", T_ARR, arr),
        &["\"nested\"", "array of arrays"],
    );
    assert_err(&v().kv("flag2", T_BOOL, vec![2]), &["\"flag2\"", "bool"]);
    assert_err(&v().kv("flag", T_BOOL, vec![0]), &["\"flag\"", "twice"]);
    assert_err(
        &v().kv("bad\u{0}", T_U8, vec![0])
            .kv_raw_key(b"\xff\xfe", T_U8, vec![0]),
        &["UTF-8"],
    );
    // Alignment.
    for (a, needle) in [(3u32, "not a power of two"), (0, "not a power of two")] {
        assert_err(
            &v().kv("general.alignment", T_U32, a.to_le_bytes().to_vec()),
            &["general.alignment", needle],
        );
    }
    assert_err(
        &v().kv("general.alignment", T_STR, gstr(b"32")),
        &["general.alignment", "expected an integer"],
    );
}

impl Builder {
    fn kv_raw_key(mut self, key: &[u8], ty: u32, payload: Vec<u8>) -> Builder {
        self.kvs.push((key.to_vec(), ty, payload));
        self
    }
    fn edit(mut self, i: usize, f: impl FnOnce(&mut Tensor)) -> Builder {
        f(&mut self.tensors[i]);
        self
    }
}

#[test]
fn tensor_corruptions_are_named_errors() {
    let v = Builder::valid;
    // Offsets.
    assert_err(
        &v().edit(1, |t| t.offset = Some(33)),
        &["\"w\"", "not a multiple of the alignment 32"],
    );
    assert_err(
        &v().edit(2, |t| t.offset = Some(1 << 20)),
        &["\"h\"", "past the end"],
    );
    assert_err(
        &v().edit(2, |t| t.offset = Some(u64::MAX - 31)),
        &["\"h\"", "past the end"],
    );
    assert_err(
        &v().edit(1, |t| t.offset = Some(128)),
        &["\"w\"", "past the end"],
    );
    // Dims.
    assert_err(
        &v().edit(0, |t| t.dims = vec![]),
        &["\"norm\"", "0 dimensions"],
    );
    assert_err(
        &v().edit(0, |t| t.dims = vec![1; 5]),
        &["\"norm\"", "5 dimensions"],
    );
    assert_err(
        &v().edit(0, |t| t.dims = vec![4, 0]),
        &["\"norm\"", "at least 1"],
    );
    assert_err(
        &v().edit(0, |t| t.dims = vec![1 << 32, 1 << 32, 1 << 32]),
        &["\"norm\"", "product"],
    );
    assert_err(&v().edit(0, |t| t.dims = vec![u64::MAX]), &["\"norm\""]);
    // Size from dims past the data: 4 x 1000 f32.
    assert_err(
        &v().edit(2, |t| t.dims = vec![4, 1000]),
        &["\"h\"", "past the end"],
    );
    // Rows that are not whole blocks.
    assert_err(
        &v().edit(1, |t| t.dims = vec![16, 4]),
        &["\"w\"", "Q8_0", "whole number of 32-value blocks"],
    );
    // Types.
    assert_err(
        &v().edit(1, |t| t.ty = 99),
        &["\"w\"", "unknown ggml type 99"],
    );
    // Names.
    assert_err(
        &v().edit(2, |t| t.name = b"w".to_vec()),
        &["\"w\"", "twice"],
    );
    assert_err(
        &v().edit(2, |t| t.name = vec![b'x'; 64]),
        &["64 bytes long"],
    );
    assert_err(&v().edit(2, |t| t.name = vec![0xc3]), &["UTF-8"]);
    // An alignment too small for F32 blocks: a 2-byte tensor first, then "norm" at data offset
    // 2 or 4, one of which is not a multiple of 4 in the file.
    let results: Vec<Result<Gguf, GgufError>> = [2u64, 4]
        .iter()
        .map(|&off| {
            let mut b = v().kv("general.alignment", T_U32, 2u32.to_le_bytes().to_vec());
            b.alignment = 2;
            b.tensors.insert(
                0,
                Tensor {
                    name: b"pad".to_vec(),
                    dims: vec![1],
                    ty: 1,
                    data: vec![0, 0],
                    offset: None,
                },
            );
            b.tensors[1].offset = Some(off);
            parse(&b.bytes())
        })
        .collect();
    let errs: Vec<String> = results
        .iter()
        .filter_map(|r| r.as_ref().err().map(|e| e.to_string()))
        .collect();
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(
        errs[0].contains("\"norm\"") && errs[0].contains("not aligned for F32"),
        "{errs:?}"
    );
}

#[test]
fn unsupported_ggml_types_name_the_tensor_and_type() {
    for (id, name) in [
        (10, "Q2_K"),
        (11, "Q3_K"),
        (23, "IQ4_XS"),
        (35, "TQ2_0"),
        (16, "IQ2_XXS"),
        (4, "Q4_2"),
    ] {
        let e = err_of(&Builder::valid().edit(1, |t| t.ty = id));
        assert!(e.is_unsupported(), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains("\"w\"") && msg.contains(name) && msg.contains("test.gguf"),
            "{msg}"
        );
        // Spin's model-not-supported, still naming the tensor and the type.
        assert_eq!(
            spinfer::Error::from(e),
            spinfer::Error::ModelNotSupported(msg.clone())
        );
    }
}

#[test]
fn an_engine_reports_the_unsupported_tensor_to_its_caller() {
    // Item 5: the reason must reach whoever called infer (the CLI prints it, the server puts
    // it in the error body), not only the loader's own error.
    let tmp = TempDir::new("unsupported");
    std::fs::create_dir_all(tmp.0.join("llama/iq")).unwrap();
    tmp.write(
        "llama/iq/model.gguf",
        &Builder::valid().edit(1, |t| t.ty = 16).bytes(),
    );
    let e = spinfer::Engine::new(&tmp.0).infer("iq", "hi").unwrap_err();
    assert_eq!(e.variant(), "model-not-supported");
    let r = e.reason();
    assert!(
        r.contains("\"w\"") && r.contains("IQ2_XXS") && r.contains("model.gguf"),
        "{r}"
    );
}

// ---- finding weights in a folder, split files ----------------------------------------------------

#[test]
fn open_dir_refuses_ambiguous_folders() {
    let valid = Builder::valid().bytes();
    let dir = TempDir::new("two");
    dir.write("a.gguf", &valid);
    dir.write("b.gguf", &valid);
    let e = WeightStore::open_dir(&dir.0).err().unwrap().to_string();
    assert!(
        e.contains("a.gguf") && e.contains("b.gguf") && e.contains("several"),
        "{e}"
    );

    let dir = TempDir::new("mixed");
    dir.write("a.gguf", &valid);
    dir.write("model.safetensors", b"");
    let e = WeightStore::open_dir(&dir.0).err().unwrap().to_string();
    assert!(
        e.contains("a.gguf") && e.contains("model.safetensors"),
        "{e}"
    );

    let dir = TempDir::new("none");
    let e = WeightStore::open_dir(&dir.0).err().unwrap().to_string();
    assert!(e.contains("no weights"), "{e}");
}

fn split_part(no: u16, count: u16, total: i32, tensor: (&str, f32)) -> Vec<u8> {
    Builder::new()
        .kv("general.architecture", T_STR, gstr(b"llama"))
        .kv("split.no", 2, no.to_le_bytes().to_vec())
        .kv("split.count", 2, count.to_le_bytes().to_vec())
        .kv("split.tensors.count", T_I32, total.to_le_bytes().to_vec())
        .tensor(
            tensor.0,
            &[2],
            0,
            [tensor.1; 2].iter().flat_map(|x| x.to_le_bytes()).collect(),
        )
        .bytes()
}

#[test]
fn split_sets_open_whole_or_name_the_missing_part() {
    let dir = TempDir::new("split");
    dir.write("m-00001-of-00003.gguf", &split_part(0, 3, 3, ("a", 1.0)));
    dir.write("m-00003-of-00003.gguf", &split_part(2, 3, 3, ("c", 3.0)));
    let e = WeightStore::open_dir(&dir.0).err().unwrap().to_string();
    assert!(
        e.contains("m-00002-of-00003.gguf") && e.contains("missing"),
        "{e}"
    );

    dir.write("m-00002-of-00003.gguf", &split_part(1, 3, 3, ("b", 2.0)));
    match WeightStore::find(&dir.0).unwrap() {
        WeightFiles::Gguf(p) => assert_eq!(p.len(), 3),
        other => panic!("{other:?}"),
    }
    let s = WeightStore::open_dir(&dir.0).unwrap();
    for (name, x) in [("a", 1.0), ("b", 2.0), ("c", 3.0)] {
        assert_eq!(s.get_f32_vec(name, &[2]).unwrap(), [x, x]);
    }
    assert!(s.file_of("c").unwrap().ends_with("m-00003-of-00003.gguf"));

    // A part that says it is another part, or a wrong tensor total.
    let dir = TempDir::new("split-bad");
    dir.write("m-00001-of-00002.gguf", &split_part(0, 2, 2, ("a", 1.0)));
    dir.write("m-00002-of-00002.gguf", &split_part(0, 2, 2, ("b", 2.0)));
    let e = WeightStore::open_dir(&dir.0).err().unwrap().to_string();
    assert!(
        e.contains("m-00002-of-00002.gguf") && e.contains("split.no"),
        "{e}"
    );
    dir.write("m-00001-of-00002.gguf", &split_part(0, 2, 5, ("a", 1.0)));
    dir.write("m-00002-of-00002.gguf", &split_part(1, 2, 5, ("b", 2.0)));
    let e = WeightStore::open_dir(&dir.0).err().unwrap().to_string();
    assert!(e.contains("split.tensors.count"), "{e}");
    dir.write("m-00001-of-00002.gguf", &split_part(0, 2, 2, ("a", 1.0)));
    // The same tensor in two parts.
    dir.write("m-00002-of-00002.gguf", &split_part(1, 2, 2, ("a", 2.0)));
    let e = WeightStore::open_dir(&dir.0).err().unwrap().to_string();
    assert!(e.contains("\"a\"") && e.contains("both"), "{e}");
}

// ---- the real SmolLM2 file -------------------------------------------------------------------

fn smollm2() -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let p = root.join("real/registry/llama/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !root.join("real").is_dir() {
        eprintln!("NOTICE: fixtures/real is absent; run fixtures/fetch-smollm2.sh (skipping)");
        return None;
    }
    assert!(
        p.is_file(),
        "{} is missing: run fixtures/fetch-smollm2.sh",
        p.display()
    );
    Some(p)
}

fn reference(name: &str) -> serde_json::Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/reference/gguf")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn smollm2_header_matches_gguf_py() {
    let Some(path) = smollm2() else { return };
    let r = reference("smollm2-header.json");
    let bytes = std::fs::read(&path).unwrap();
    let g = Gguf::parse(&path.display().to_string(), &bytes).unwrap();
    assert_eq!(g.version as u64, r["version"].as_u64().unwrap());
    assert_eq!(g.alignment as u64, r["alignment"].as_u64().unwrap());
    assert_eq!(g.data_offset as u64, r["data_offset"].as_u64().unwrap());
    assert_eq!(g.metadata.len() as u64, r["kv_count"].as_u64().unwrap());

    // Every metadata value gguf-py reports, with its type.
    let meta = r["metadata"].as_object().unwrap();
    assert_eq!(g.metadata.len(), meta.len());
    for (key, want) in meta {
        let got = g
            .metadata
            .get(key)
            .unwrap_or_else(|| panic!("{key} missing"));
        let ty = want["type"].as_str().unwrap();
        let ours = got.type_name();
        let theirs = ty
            .replace("uint", "u")
            .replace("int", "i")
            .replace("float", "f");
        assert_eq!(ours, theirs, "{key}");
        match got {
            spinfer::internals::weights::gguf::Value::Array(a) => {
                assert_eq!(a.len() as u64, want["len"].as_u64().unwrap(), "{key}")
            }
            spinfer::internals::weights::gguf::Value::Str(s) => {
                assert_eq!(s, want["value"].as_str().unwrap())
            }
            spinfer::internals::weights::gguf::Value::F32(x) => {
                assert_eq!(*x as f64, want["value"].as_f64().unwrap(), "{key}")
            }
            spinfer::internals::weights::gguf::Value::Bool(b) => {
                assert_eq!(*b, want["value"].as_bool().unwrap())
            }
            _ => assert_eq!(
                g.metadata.get_u64(key).unwrap().unwrap(),
                want["value"].as_u64().unwrap(),
                "{key}"
            ),
        }
    }
    let first_tokens: Vec<String> = meta["tokenizer.ggml.tokens"]["first"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        &g.metadata
            .get_str_array("tokenizer.ggml.tokens")
            .unwrap()
            .unwrap()[..5],
        first_tokens
    );

    // Every tensor: name, type, shape (reversed dims), absolute offset, size.
    let tensors = r["tensors"].as_array().unwrap();
    assert_eq!(g.tensors.len(), tensors.len());
    assert_eq!(g.tensors.len(), 272);
    for (ours, theirs) in g.tensors.iter().zip(tensors) {
        assert_eq!(ours.name, theirs["name"].as_str().unwrap());
        assert_eq!(
            ours.format.name(),
            theirs["type"].as_str().unwrap(),
            "{}",
            ours.name
        );
        let mut ne: Vec<usize> = theirs["ne"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect();
        ne.reverse();
        assert_eq!(ours.shape, ne, "{}", ours.name);
        assert_eq!(
            ours.start as u64,
            theirs["offset"].as_u64().unwrap(),
            "{}",
            ours.name
        );
        assert_eq!(
            (ours.end - ours.start) as u64,
            theirs["bytes"].as_u64().unwrap(),
            "{}",
            ours.name
        );
    }

    // The same through the store, with the shapes a 30-block, 576-wide, 9/3-head Llama has.
    let store = WeightStore::open_gguf(&[path]).unwrap();
    let m = store.metadata().unwrap();
    assert_eq!(m.get_u32("llama.block_count").unwrap(), Some(30));
    assert_eq!(m.get_u32("llama.embedding_length").unwrap(), Some(576));
    assert_eq!(m.get_u32("llama.attention.head_count").unwrap(), Some(9));
    assert_eq!(m.get_u32("llama.attention.head_count_kv").unwrap(), Some(3));
    assert_eq!(m.get_u32("llama.vocab_size").unwrap(), Some(49152));
    assert_eq!(m.get_u32("llama.context_length").unwrap(), Some(8192));
    assert_eq!(
        store
            .get_shaped("token_embd.weight", &[49152, 576])
            .unwrap()
            .dtype,
        Format::Q8_0
    );
    assert_eq!(
        store
            .get_shaped("blk.0.attn_k.weight", &[192, 576])
            .unwrap()
            .dtype,
        Format::Q4_1
    );
    assert_eq!(
        store
            .get_shaped("blk.29.ffn_down.weight", &[576, 1536])
            .unwrap()
            .dtype,
        Format::Q4_1
    );
    let norm = store.get_f32_vec("output_norm.weight", &[576]).unwrap();
    assert!(norm.iter().all(|x| x.is_finite()) && norm.iter().any(|&x| x != 0.0));
}

#[test]
fn smollm2_truncated_anywhere_is_an_error() {
    let Some(path) = smollm2() else { return };
    let bytes = std::fs::read(&path).unwrap();
    let header_end = Gguf::parse("x", &bytes).unwrap().data_offset;
    // 150 cuts spread over the header (where every field is; few enough for the qemu run
    // of .ci/cross.sh), then a few in the data.
    let cuts = (0..150).map(|i| i * header_end / 150).chain([
        header_end,
        header_end + 1,
        bytes.len() / 2,
        bytes.len() - 1,
    ]);
    for n in cuts {
        let e = Gguf::parse("smollm2", &bytes[..n]).expect_err("a truncated file parsed");
        assert!(e.to_string().starts_with("smollm2:"), "{e}");
    }
}

// ---- randomized mutation (run by hand: cargo test --test gguf -- --ignored) --------------

/// splitmix64: a small deterministic generator for the mutations.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Mutates the tiny GGUF and a tiny safetensors file (bytes flipped, set to edge values, cut,
/// spliced) and feeds each to its parser: any outcome but a panic is fine. SPINFER_FUZZ_ITERS
/// sets the count (default 100k).
#[test]
#[ignore]
fn mutated_files_never_panic() {
    let iters: usize = std::env::var("SPINFER_FUZZ_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000);
    let gguf = Builder::valid().bytes();
    let st = {
        let header = br#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"BF16","shape":[1,2],"data_offsets":[8,12]}}"#;
        let mut v = (header.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(header);
        v.extend([0u8; 12]);
        v
    };
    let mut rng = Rng(0x5eed);
    let (mut ok, mut err) = (0usize, 0usize);
    for i in 0..iters {
        let base = if i % 2 == 0 { &gguf } else { &st };
        let mut b = base.clone();
        for _ in 0..1 + rng.below(4) {
            let at = rng.below(b.len().max(1));
            match rng.below(6) {
                0 => b[at] ^= 1 << rng.below(8),
                1 => b[at] = [0, 1, 0x7f, 0x80, 0xff][rng.below(5)],
                2 => {
                    let end = (at + 8).min(b.len());
                    b[at..end].fill(0xff)
                }
                3 => b.truncate(at),
                4 => {
                    let end = (at + 8).min(b.len());
                    let v = (rng.next() % 4096).to_le_bytes();
                    b[at..end].copy_from_slice(&v[..end - at])
                }
                _ => {
                    let from = rng.below(b.len().max(1));
                    let chunk: Vec<u8> = b[from..(from + 16).min(b.len())].to_vec();
                    b.splice(at..at, chunk);
                }
            }
            if b.is_empty() {
                break;
            }
        }
        let good = if i % 2 == 0 {
            parse(&b).is_ok()
        } else {
            spinfer::internals::weights::check_safetensors(&b).is_ok()
        };
        if good {
            ok += 1
        } else {
            err += 1
        }
    }
    eprintln!("{iters} mutations: {ok} parsed, {err} refused, no panic");
    assert_eq!(ok + err, iters);

    // The real file's header (49152 strings, arrays, 272 tensors): fewer, each parse is ~ms.
    // One buffer, mutated in place and restored; a cut is a shorter slice of it.
    let Some(path) = smollm2() else { return };
    let mut real = std::fs::read(path).unwrap();
    let header_end = Gguf::parse("x", &real).unwrap().data_offset;
    let (mut ok, mut err) = (0usize, 0usize);
    for i in 0..iters / 200 {
        let mut saved = Vec::new();
        let mut len = real.len();
        for _ in 0..1 + rng.below(4) {
            let at = rng.below(header_end);
            saved.push((at, real[at]));
            match rng.below(3) {
                0 => real[at] ^= 1 << rng.below(8),
                1 => real[at] = [0, 1, 0x7f, 0x80, 0xff][rng.below(5)],
                _ => len = len.min(at),
            }
        }
        match Gguf::parse("real", &real[..len]) {
            Ok(g) => {
                ok += 1;
                // Whatever was accepted can be tokenized or refused without a panic (every
                // 20th: building a 49152-token tokenizer takes ~0.1 s).
                if i % 20 == 0 {
                    let _ = spinfer::internals::tokenizer::gguf::tokenizer_from_gguf(&g.metadata);
                }
            }
            Err(_) => err += 1,
        }
        for (at, byte) in saved.into_iter().rev() {
            real[at] = byte;
        }
    }
    eprintln!(
        "{} real-header mutations: {ok} parsed, {err} refused, no panic",
        iters / 200
    );
}

// ---- the tokenizer built from GGUF metadata ------------------------------------------------

use spinfer::internals::tokenizer::gguf::tokenizer_from_gguf;

#[test]
fn smollm2_tokenizer_encodes_like_the_references() {
    let Some(path) = smollm2() else { return };
    let store = WeightStore::open_gguf(&[path]).unwrap();
    let t = tokenizer_from_gguf(store.metadata().unwrap()).unwrap();
    assert_eq!(
        (t.bos, t.eos, t.add_bos, t.add_eos),
        (Some(1), Some(2), false, false)
    );
    // llama.cpp's own tokenizer where that reference exists, transformers' GGUF conversion
    // (independent of ours) otherwise or as well; at least one must be there.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/reference/gguf");
    let mut checked = 0;
    for name in [
        "tokenize-smollm2.json",
        "tokenize-smollm2-transformers.json",
    ] {
        if !dir.join(name).is_file() {
            continue;
        }
        let r = reference(name);
        let add_special = r["add_special_tokens"].as_bool().unwrap_or(true);
        let mut bad = Vec::new();
        let cases = r["cases"].as_array().unwrap();
        for c in cases {
            let text = c["text"].as_str().unwrap();
            let want: Vec<u32> = c["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect();
            let got = t
                .tokenizer
                .encode(text, add_special)
                .unwrap()
                .get_ids()
                .to_vec();
            if got != want {
                bad.push(format!("{text:?}: got {got:?}, want {want:?}"));
            }
            // Byte-level BPE decodes back to the text exactly.
            assert_eq!(t.tokenizer.decode(&got, false).unwrap(), text);
        }
        assert!(
            bad.is_empty(),
            "{name}: {} of {} differ:\n{}",
            bad.len(),
            cases.len(),
            bad.join("\n")
        );
        checked += cases.len();
    }
    assert!(checked > 0, "no tokenizer reference in {}", dir.display());
    // Control tokens are one token, and special on decode.
    let ids = t
        .tokenizer
        .encode("<|im_start|>user\nhi<|im_end|>", false)
        .unwrap()
        .get_ids()
        .to_vec();
    assert_eq!((ids[0], *ids.last().unwrap()), (1, 2));
    assert_eq!(t.tokenizer.decode(&ids, true).unwrap(), "user\nhi");
}

fn str_array(items: &[&str]) -> Vec<u8> {
    let mut v = T_STR.to_le_bytes().to_vec();
    v.extend((items.len() as u64).to_le_bytes());
    for s in items {
        v.extend(gstr(s.as_bytes()));
    }
    v
}

fn i32_array(items: &[i32]) -> Vec<u8> {
    let mut v = T_I32.to_le_bytes().to_vec();
    v.extend((items.len() as u64).to_le_bytes());
    for x in items {
        v.extend(x.to_le_bytes());
    }
    v
}

#[test]
fn tokenizer_metadata_errors_name_the_key() {
    let bpe = |pre: &str| {
        Builder::new()
            .kv("tokenizer.ggml.model", T_STR, gstr(b"gpt2"))
            .kv("tokenizer.ggml.pre", T_STR, gstr(pre.as_bytes()))
            .kv("tokenizer.ggml.tokens", T_ARR, str_array(&["a", "b", "ab"]))
            .kv("tokenizer.ggml.merges", T_ARR, str_array(&["a b"]))
    };
    let g = parse(&bpe("smollm").bytes()).unwrap();
    let t = tokenizer_from_gguf(&g.metadata).unwrap();
    assert_eq!(t.tokenizer.encode("ab", false).unwrap().get_ids(), [2]);
    assert!(!t.add_bos);

    let g = parse(&bpe("no-such-pre").bytes()).unwrap();
    let e = tokenizer_from_gguf(&g.metadata).err().unwrap();
    assert!(
        e.to_string().contains("\"no-such-pre\"") && e.is_unsupported(),
        "{e}"
    );

    let g = parse(
        &Builder::new()
            .kv("tokenizer.ggml.model", T_STR, gstr(b"rwkv"))
            .bytes(),
    )
    .unwrap();
    let e = tokenizer_from_gguf(&g.metadata).err().unwrap();
    assert!(e.to_string().contains("\"rwkv\""), "{e}");

    let g = parse(
        &bpe("smollm")
            .kv("tokenizer.ggml.token_type", T_ARR, i32_array(&[1, 1]))
            .bytes(),
    )
    .unwrap();
    let e = tokenizer_from_gguf(&g.metadata).err().unwrap();
    assert!(e.to_string().contains("token_type"), "{e}");

    let g = parse(
        &bpe("smollm")
            .kv(
                "tokenizer.ggml.bos_token_id",
                T_U32,
                7u32.to_le_bytes().to_vec(),
            )
            .bytes(),
    )
    .unwrap();
    let e = tokenizer_from_gguf(&g.metadata).err().unwrap();
    assert!(e.to_string().contains("bos_token_id"), "{e}");

    let g = parse(
        &bpe("smollm")
            .kv(
                "tokenizer.ggml.add_bos_token",
                T_U32,
                1u32.to_le_bytes().to_vec(),
            )
            .bytes(),
    )
    .unwrap();
    let e = tokenizer_from_gguf(&g.metadata).err().unwrap();
    assert!(
        e.to_string().contains("add_bos_token") && e.to_string().contains("bool"),
        "{e}"
    );

    let g = parse(
        &Builder::new()
            .kv("tokenizer.ggml.model", T_STR, gstr(b"llama"))
            .kv("tokenizer.ggml.tokens", T_ARR, str_array(&["a"]))
            .bytes(),
    )
    .unwrap();
    let e = tokenizer_from_gguf(&g.metadata).err().unwrap();
    assert!(e.to_string().contains("tokenizer.ggml.scores"), "{e}");
}

#[test]
fn sentencepiece_vocab_encodes_like_sentencepiece() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/reference/gguf");
    let store = WeightStore::open_gguf(&[dir.join("tiny-spm.gguf")]).unwrap();
    let t = tokenizer_from_gguf(store.metadata().unwrap()).unwrap();
    assert_eq!(
        (t.bos, t.eos, t.add_bos, t.add_eos),
        (Some(1), Some(2), true, false)
    );
    let r = reference("tokenize-tiny-spm.json");
    let cases = r["cases"].as_array().unwrap();
    let mut bad = Vec::new();
    for c in cases {
        let text = c["text"].as_str().unwrap();
        let want: Vec<u32> = c["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        let got = t.tokenizer.encode(text, false).unwrap().get_ids().to_vec();
        if got != want {
            bad.push(format!("{text:?}: got {got:?}, want {want:?}"));
        }
        // With special tokens: BOS first (add_bos_token), as llama.cpp adds it.
        let with = t.tokenizer.encode(text, true).unwrap().get_ids().to_vec();
        assert_eq!(with.first(), Some(&1));
        assert_eq!(&with[1..], &got[..]);
        // Decoding drops the dummy prefix and reassembles byte-fallback pieces (a literal "▁"
        // in the text decodes as a space, in SentencePiece too).
        if !text.contains('\u{2581}') {
            assert_eq!(t.tokenizer.decode(&got, false).unwrap(), text, "{got:?}");
        }
    }
    assert!(
        bad.is_empty(),
        "{} of {} differ:\n{}",
        bad.len(),
        cases.len(),
        bad.join("\n")
    );
    // The unknown token's text is that token too (llama.cpp's tokenizer gives [BOS, 0]).
    assert_eq!(t.tokenizer.encode("<unk>", true).unwrap().get_ids(), [1, 0]);
    // Control tokens in the text are one token each (llama.cpp parses them as special), and
    // the text after one gets its own dummy prefix, as llama.cpp gives it.
    let ids = t
        .tokenizer
        .encode("<s>the</s>the", false)
        .unwrap()
        .get_ids()
        .to_vec();
    let the = t.tokenizer.encode("the", false).unwrap().get_ids().to_vec();
    let mut want = vec![1];
    want.extend(&the);
    want.push(2);
    want.extend(&the);
    assert_eq!(ids, want);
}

#[test]
fn tokenizer_json_beside_the_gguf_wins() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let gguf = std::fs::read(root.join("reference/gguf/tiny-spm.gguf")).unwrap();
    let dir = TempDir::new("tokjson");
    dir.write("m.gguf", &gguf);
    let store = WeightStore::open_dir(&dir.0).unwrap();
    let from_meta = spinfer::internals::tokenizer::gguf::tokenizer_for(&store).unwrap();
    assert_eq!(from_meta.tokenizer.get_vocab_size(false), 800);

    let json = root.join("registry/llama/tiny-llama/tokenizer.json");
    std::fs::copy(&json, dir.0.join("tokenizer.json")).unwrap();
    let t = spinfer::internals::tokenizer::gguf::tokenizer_for(&store).unwrap();
    let want = spinfer::internals::tokenizer::from_file(&json).unwrap();
    assert_eq!(t.tokenizer.get_vocab_size(true), want.get_vocab_size(true));
    assert_ne!(t.tokenizer.get_vocab_size(true), 800);
    // BOS/EOS still from the GGUF metadata.
    assert_eq!((t.bos, t.eos, t.add_bos), (Some(1), Some(2), true));
}
