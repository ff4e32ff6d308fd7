//! Memory-mapped weights: typed, zero-copy views of tensors by name, over safetensors (one file
//! or the shards an index names) or GGUF (one file or a split set, see [`gguf`]). Kernels read
//! the mapped bytes directly.

pub mod gguf;

use crate::{Error, Result};
use gguf::{Gguf, GgufError, Metadata};
use spinfer_kernels::Weights;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

/// How a tensor's values are stored (float formats, or the quantized block formats of GGUF).
pub use spinfer_kernels::Format as DType;

/// Where one tensor lives.
#[derive(Clone, Debug)]
struct Entry {
    file: usize,
    dtype: DType,
    shape: Vec<usize>,
    /// Byte range in the file (absolute, header included).
    start: usize,
    end: usize,
}

struct MappedFile {
    path: PathBuf,
    map: memmap2::Mmap,
}

/// A tensor as stored: dtype, shape and a borrowed typed view of its elements.
#[derive(Clone, Copy, Debug)]
pub struct Tensor<'a> {
    pub name: &'a str,
    pub dtype: DType,
    pub shape: &'a [usize],
    pub data: Weights<'a>,
}

impl Tensor<'_> {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Where one tensor's elements live in a [`WeightStore`] (from [`WeightStore::tensor_ref`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TensorRef {
    file: usize,
    pub dtype: DType,
    start: usize,
    end: usize,
}

/// All tensors of a model, memory-mapped.
pub struct WeightStore {
    files: Vec<MappedFile>,
    entries: HashMap<String, Entry>,
    /// Tensors of dtypes we do not compute with (e.g. BERT's I64 `position_ids` buffer):
    /// skipped at open, an error only if asked for. name -> (file, dtype).
    unsupported: HashMap<String, (usize, String)>,
    /// A GGUF model's metadata (from its first file); None for safetensors.
    metadata: Option<Metadata>,
}

/// The weights a model folder holds (see [`WeightStore::find`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WeightFiles {
    /// `model.safetensors.index.json` (and the shards it names).
    SafetensorsIndex(PathBuf),
    /// `model.safetensors`.
    Safetensors(PathBuf),
    /// One `.gguf` file, or every part of a split set in order.
    Gguf(Vec<PathBuf>),
}

impl WeightStore {
    /// Open a model folder's weights, as [`WeightStore::find`] finds them. A GGUF using a
    /// ggml type we do not compute with is `model-not-supported` (call
    /// [`WeightStore::open_gguf`] directly to keep the message).
    pub fn open_dir(dir: &Path) -> Result<WeightStore> {
        match WeightStore::find(dir)? {
            WeightFiles::SafetensorsIndex(index) => WeightStore::open_index(&index),
            WeightFiles::Safetensors(single) => WeightStore::open_files(&[single]),
            WeightFiles::Gguf(paths) => Ok(WeightStore::open_gguf(&paths)?),
        }
    }

    /// Which weights a model folder holds: `model.safetensors.index.json` (which wins over a
    /// `model.safetensors` beside it), `model.safetensors`, exactly one `.gguf` file, or one
    /// complete split set `<name>-0000i-of-0000N.gguf`. More than one of these is an error
    /// naming them all (we would not know which one the user meant).
    pub fn find(dir: &Path) -> Result<WeightFiles> {
        let index = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let mut found: Vec<(String, WeightFiles)> = Vec::new();
        if index.is_file() {
            found.push((
                index.display().to_string(),
                WeightFiles::SafetensorsIndex(index),
            ));
        } else if single.is_file() {
            found.push((
                single.display().to_string(),
                WeightFiles::Safetensors(single),
            ));
        }
        let entries = std::fs::read_dir(dir)
            .map_err(|e| Error::runtime(format!("cannot list {}: {e}", dir.display())))?;
        let mut ggufs: Vec<String> = Vec::new();
        for entry in entries {
            let entry =
                entry.map_err(|e| Error::runtime(format!("cannot list {}: {e}", dir.display())))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.ends_with(".gguf") && entry.path().is_file() {
                ggufs.push(name.to_string());
            }
        }
        ggufs.sort();
        // Split sets: prefix and count -> the part numbers present.
        let mut sets: Vec<((String, u32), Vec<u32>)> = Vec::new();
        for name in &ggufs {
            match split_part(name) {
                Some((prefix, no, count)) => {
                    let key = (prefix.to_string(), count);
                    match sets.iter_mut().find(|(k, _)| *k == key) {
                        Some((_, parts)) => parts.push(no),
                        None => sets.push((key, vec![no])),
                    }
                }
                None => found.push((
                    dir.join(name).display().to_string(),
                    WeightFiles::Gguf(vec![dir.join(name)]),
                )),
            }
        }
        for ((prefix, count), parts) in &sets {
            let paths: Vec<PathBuf> = (1..=*count)
                .map(|i| dir.join(split_name(prefix, i, *count)))
                .collect();
            let missing: Vec<String> = (1..=*count)
                .filter(|i| !parts.contains(i))
                .map(|i| split_name(prefix, i, *count))
                .collect();
            if !missing.is_empty() {
                return Err(Error::runtime(format!(
                    "{}: split GGUF {prefix} is incomplete: missing {}",
                    dir.display(),
                    missing.join(", ")
                )));
            }
            found.push((
                format!(
                    "{} ({count} parts)",
                    dir.join(split_name(prefix, 1, *count)).display()
                ),
                WeightFiles::Gguf(paths),
            ));
        }
        match found.len() {
            1 => Ok(found.remove(0).1),
            0 => Err(Error::runtime(format!(
                "no weights in {}: expected model.safetensors, model.safetensors.index.json or one .gguf file",
                dir.display()
            ))),
            _ => Err(Error::runtime(format!(
                "{} holds several sets of weights and spinfer cannot tell which to use: {}; keep only one",
                dir.display(),
                found
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }

    /// Open a GGUF model: one file, or every part of a split set in order (tensors spread over
    /// the parts; metadata from the first). Tensors keep their block format as their dtype.
    pub fn open_gguf(paths: &[PathBuf]) -> std::result::Result<WeightStore, GgufError> {
        if paths.is_empty() {
            return Err(GgufError::invalid("open_gguf: no files given"));
        }
        let mut files = Vec::new();
        let mut entries = HashMap::new();
        let mut metadata = None;
        let n = paths.len();
        let mut tensor_total = 0usize;
        for (i, path) in paths.iter().enumerate() {
            let source = path.display().to_string();
            let map = map_file(path).map_err(GgufError::invalid)?;
            let g = Gguf::parse(&source, &map)?;
            // Split parts say which part they are; a lone file may omit the keys.
            let no = g.metadata.get_u32("split.no")?;
            let count = g.metadata.get_u32("split.count")?;
            if (n > 1 || count.is_some_and(|c| c > 1))
                && (no != Some(i as u32) || count != Some(n as u32))
            {
                return Err(GgufError::invalid(format!(
                    "{source}: split.no {no:?} / split.count {count:?}, expected part {i} of {n}"
                )));
            }
            tensor_total += g.tensors.len();
            for t in g.tensors {
                let entry = Entry {
                    file: i,
                    dtype: t.format,
                    shape: t.shape,
                    start: t.start,
                    end: t.end,
                };
                if let Some(prev) = entries.insert(t.name.clone(), entry) {
                    let prev: Entry = prev;
                    return Err(GgufError::invalid(format!(
                        "tensor {:?} appears in both {} and {source}",
                        t.name,
                        paths[prev.file].display()
                    )));
                }
            }
            if i == 0 {
                metadata = Some(g.metadata);
            }
            files.push(MappedFile {
                path: path.clone(),
                map,
            });
        }
        let metadata = metadata.unwrap_or_default();
        if let Some(total) = metadata.get_u64("split.tensors.count")? {
            if total != tensor_total as u64 {
                return Err(GgufError::invalid(format!(
                    "{}: split.tensors.count is {total} but the parts hold {tensor_total} tensors",
                    paths[0].display()
                )));
            }
        }
        Ok(WeightStore {
            files,
            entries,
            unsupported: HashMap::new(),
            metadata: Some(metadata),
        })
    }

    /// A GGUF model's metadata (None for safetensors).
    pub fn metadata(&self) -> Option<&Metadata> {
        self.metadata.as_ref()
    }

    /// The files the weights are in, in order.
    pub fn paths(&self) -> impl Iterator<Item = &Path> {
        self.files.iter().map(|f| f.path.as_path())
    }

    /// Open the shards an index names. Shard names must be plain file names beside the index.
    pub fn open_index(index: &Path) -> Result<WeightStore> {
        let text = std::fs::read_to_string(index)
            .map_err(|e| Error::io(format!("cannot read {}: {e}", index.display())))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::runtime(format!("{} is not valid JSON: {e}", index.display())))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| {
                Error::runtime(format!("{} has no \"weight_map\" object", index.display()))
            })?;
        let dir = index.parent().unwrap_or(Path::new("."));
        let mut shards: Vec<String> = Vec::new();
        for (tensor, file) in map {
            let file = file.as_str().ok_or_else(|| {
                Error::runtime(format!(
                    "{}: weight_map entry for {tensor:?} is not a file name",
                    index.display()
                ))
            })?;
            if !is_plain_file_name(file) {
                return Err(Error::runtime(format!(
                    "{}: shard name {file:?} (for tensor {tensor:?}) must be a plain file name in the model folder",
                    index.display()
                )));
            }
            if !shards.iter().any(|s| s == file) {
                shards.push(file.to_string());
            }
        }
        shards.sort();
        let paths: Vec<PathBuf> = shards.iter().map(|s| dir.join(s)).collect();
        let store = WeightStore::open_files(&paths)?;
        // Every tensor the index names must be in the shard it names.
        for (tensor, file) in map {
            let file = file.as_str().unwrap_or_default();
            match store.entries.get(tensor) {
                Some(e)
                    if store.files[e.file]
                        .path
                        .file_name()
                        .and_then(|f| f.to_str())
                        == Some(file) => {}
                _ => {
                    return Err(Error::runtime(format!(
                        "{}: tensor {tensor:?} is not in shard {file:?}",
                        index.display()
                    )))
                }
            }
        }
        Ok(store)
    }

    /// Map and validate each file; a tensor name may appear in only one file.
    pub fn open_files(paths: &[PathBuf]) -> Result<WeightStore> {
        let mut files = Vec::new();
        let mut entries = HashMap::new();
        let mut unsupported = HashMap::new();
        for path in paths {
            let map = map_file(path).map_err(Error::io)?;
            let idx = files.len();
            let (found, skipped) = safetensors_tensors(path, &map, idx)?;
            for (name, dtype) in skipped {
                unsupported.insert(name, (idx, dtype));
            }
            for (name, entry) in found {
                if let Some(prev) = entries.insert(name.clone(), entry) {
                    let prev: Entry = prev;
                    return Err(Error::runtime(format!(
                        "tensor {name:?} appears in both {} and {}",
                        files
                            .get(prev.file)
                            .map(|f: &MappedFile| f.path.display().to_string())
                            .unwrap_or_default(),
                        path.display()
                    )));
                }
            }
            files.push(MappedFile {
                path: path.clone(),
                map,
            });
        }
        Ok(WeightStore {
            files,
            entries,
            unsupported,
            metadata: None,
        })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(|s| s.as_str())
    }

    /// The file a tensor lives in (for error messages).
    pub fn file_of(&self, name: &str) -> Option<&Path> {
        self.entries
            .get(name)
            .map(|e| self.files[e.file].path.as_path())
    }

    /// A description of where the weights come from, for error messages.
    pub fn describe(&self) -> String {
        let names: Vec<String> = self
            .files
            .iter()
            .map(|f| f.path.display().to_string())
            .collect();
        names.join(", ")
    }

    /// The tensor `name`, or an error naming it and the files searched.
    pub fn get(&self, name: &str) -> Result<Tensor<'_>> {
        if let Some((file, dtype)) = self.unsupported.get(name) {
            return Err(Error::runtime(format!(
                "{}: tensor {name:?} has dtype {dtype}; supported dtypes are F32, F16 and BF16",
                self.files[*file].path.display()
            )));
        }
        let (key, e) = self.entries.get_key_value(name).ok_or_else(|| {
            Error::runtime(format!("tensor {name:?} not found in {}", self.describe()))
        })?;
        Ok(Tensor {
            name: key,
            dtype: e.dtype,
            shape: &e.shape,
            data: self.view(e.file, e.dtype, e.start, e.end),
        })
    }

    /// A small `Copy` handle to a tensor's bytes, so a model can resolve names once at load and
    /// get views on every forward without hashing (see [`WeightStore::data`]).
    pub fn tensor_ref(&self, name: &str) -> Result<TensorRef> {
        let t = self.get(name)?;
        let e = &self.entries[name];
        Ok(TensorRef {
            file: e.file,
            dtype: t.dtype,
            start: e.start,
            end: e.end,
        })
    }

    /// The elements a handle from [`WeightStore::tensor_ref`] of this store points at.
    pub fn data(&self, r: TensorRef) -> Weights<'_> {
        self.view(r.file, r.dtype, r.start, r.end)
    }

    fn view(&self, file: usize, dtype: DType, start: usize, end: usize) -> Weights<'_> {
        // Bounds-checked slicing; a handle used with the wrong store panics here instead of
        // reading outside a mapping. Length and alignment were checked at open.
        let bytes = &self.files[file].map[start..end];
        Weights::from_bytes(dtype, bytes).expect("tensor view checked at open")
    }

    /// The tensor `name`, checked to have exactly `shape`.
    pub fn get_shaped(&self, name: &str, shape: &[usize]) -> Result<Tensor<'_>> {
        let t = self.get(name)?;
        if t.shape != shape {
            return Err(Error::runtime(format!(
                "{}: tensor {name:?} has shape {:?}, expected {shape:?}",
                self.file_of(name)
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                t.shape
            )));
        }
        Ok(t)
    }

    /// A small tensor (norm weights, biases) widened to an owned f32 vector.
    pub fn get_f32_vec(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let t = self.get_shaped(name, shape)?;
        let mut out = vec![0f32; t.numel()];
        spinfer_kernels::scalar::to_f32(t.data, &mut out);
        Ok(out)
    }
}

/// The tensors of one safetensors file (`bytes`, the whole file, file number `idx` of a
/// store): those we compute with as entries, the others as (name, dtype) to refuse if asked.
#[allow(clippy::type_complexity)]
fn safetensors_tensors(
    path: &Path,
    bytes: &[u8],
    idx: usize,
) -> Result<(Vec<(String, Entry)>, Vec<(String, String)>)> {
    let (header_len, meta) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| {
        Error::runtime(format!(
            "{} is not a valid safetensors file: {e}",
            path.display()
        ))
    })?;
    let data_start = 8 + header_len;
    let mut found = Vec::new();
    let mut skipped = Vec::new();
    for (name, info) in meta.tensors() {
        let dtype = match info.dtype {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::F16 => DType::F16,
            safetensors::Dtype::BF16 => DType::Bf16,
            other => {
                skipped.push((name.clone(), format!("{other:?}")));
                continue;
            }
        };
        let (s, e) = info.data_offsets;
        let entry = Entry {
            file: idx,
            dtype,
            shape: info.shape.clone(),
            start: data_start + s,
            end: data_start + e,
        };
        // Kernels load whole elements; the mmap base is page-aligned, so check the offset.
        if !entry.start.is_multiple_of(dtype.align()) {
            return Err(Error::runtime(format!(
                "{}: tensor {name:?} starts at byte {} which is not aligned to its {}-byte elements; re-save the file with a current safetensors",
                path.display(),
                entry.start,
                dtype.align()
            )));
        }
        found.push((name.clone(), entry));
    }
    Ok((found, skipped))
}

/// Validates a safetensors file held in memory as opening it would (for fuzzing); the number
/// of tensors we could compute with.
pub fn check_safetensors(bytes: &[u8]) -> Result<usize> {
    safetensors_tensors(Path::new("<memory>"), bytes, 0).map(|(found, _)| found.len())
}

/// Map a file read-only.
fn map_file(path: &Path) -> std::result::Result<memmap2::Mmap, String> {
    let file = File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    // SAFETY: the mapping is read-only and lives as long as the store; like every mmap
    // reader we rely on the model file not being truncated or rewritten while in use.
    let map = unsafe { memmap2::Mmap::map(&file) }
        .map_err(|e| format!("cannot map {}: {e}", path.display()))?;
    // Ask for 2 MiB pages before the first touch: where the file system caches files in large
    // folios (ext4 since Linux 6.16) the pages read through this mapping are then mapped 2 MiB
    // at a time. Decode streams every weight once per token, and with 4 KiB pages the CPU's
    // prefetchers stop at every page. Only advice: where it is refused nothing changes.
    #[cfg(target_os = "linux")]
    let _ = map.advise(memmap2::Advice::HugePage);
    Ok(map)
}

/// `name-0000i-of-0000N.gguf` (llama.cpp's `llama_split_path` form) -> (name, i, N), for
/// 1 <= i <= N.
fn split_part(file: &str) -> Option<(&str, u32, u32)> {
    let stem = file.strip_suffix(".gguf")?;
    let (rest, count) = stem.rsplit_once("-of-")?;
    let (prefix, no) = rest.rsplit_once('-')?;
    let digits = |s: &str| s.len() == 5 && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(no) || !digits(count) {
        return None;
    }
    let (no, count) = (no.parse().ok()?, count.parse().ok()?);
    (1..=count).contains(&no).then_some((prefix, no, count))
}

fn split_name(prefix: &str, no: u32, count: u32) -> String {
    format!("{prefix}-{no:05}-of-{count:05}.gguf")
}

#[cfg(target_endian = "big")]
compile_error!("safetensors data is little-endian; spinfer reads it in place and supports little-endian targets only");

/// A name with no path separators or parent references.
pub fn is_plain_file_name(s: &str) -> bool {
    !s.is_empty() && s != "." && s != ".." && !s.contains(['/', '\\', '\0'])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_names_parse_like_llama_cpp_writes_them() {
        assert_eq!(split_part("m-00001-of-00003.gguf"), Some(("m", 1, 3)));
        assert_eq!(split_part("a-b-00003-of-00003.gguf"), Some(("a-b", 3, 3)));
        assert_eq!(split_name("a-b", 2, 3), "a-b-00002-of-00003.gguf");
        for bad in [
            "m-00004-of-00003.gguf",
            "m-00000-of-00003.gguf",
            "m-1-of-3.gguf",
            "m-00001-of-00003.safetensors",
            "00001-of-00003.gguf",
            "m.gguf",
        ] {
            assert_eq!(split_part(bad), None, "{bad}");
        }
    }
}
