//! Memory-mapped safetensors: typed, zero-copy views of tensors by name, over one file or the
//! shards an index names. Kernels read the mapped bytes directly.

use crate::{Error, Result};
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
}

impl WeightStore {
    /// Open a model folder's weights: `model.safetensors`, or every shard named by
    /// `model.safetensors.index.json` (the index wins when both exist).
    pub fn open_dir(dir: &Path) -> Result<WeightStore> {
        let index = dir.join("model.safetensors.index.json");
        if index.is_file() {
            return WeightStore::open_index(&index);
        }
        let single = dir.join("model.safetensors");
        if single.is_file() {
            return WeightStore::open_files(&[single]);
        }
        Err(Error::runtime(format!(
            "no weights in {}: expected model.safetensors or model.safetensors.index.json",
            dir.display()
        )))
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
            let file = File::open(path)
                .map_err(|e| Error::io(format!("cannot open {}: {e}", path.display())))?;
            // SAFETY: the mapping is read-only and lives as long as the store; like every mmap
            // reader we rely on the model file not being truncated or rewritten while in use.
            let map = unsafe { memmap2::Mmap::map(&file) }
                .map_err(|e| Error::io(format!("cannot map {}: {e}", path.display())))?;
            let (header_len, meta) =
                safetensors::SafeTensors::read_metadata(&map).map_err(|e| {
                    Error::runtime(format!(
                        "{} is not a valid safetensors file: {e}",
                        path.display()
                    ))
                })?;
            let data_start = 8 + header_len;
            let idx = files.len();
            for (name, info) in meta.tensors() {
                let dtype = match info.dtype {
                    safetensors::Dtype::F32 => DType::F32,
                    safetensors::Dtype::F16 => DType::F16,
                    safetensors::Dtype::BF16 => DType::Bf16,
                    other => {
                        unsupported.insert(name.clone(), (files.len(), format!("{other:?}")));
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

#[cfg(target_endian = "big")]
compile_error!("safetensors data is little-endian; spinfer reads it in place and supports little-endian targets only");

/// A name with no path separators or parent references.
pub fn is_plain_file_name(s: &str) -> bool {
    !s.is_empty() && s != "." && s != ".." && !s.contains(['/', '\\', '\0'])
}
