//! Model containers, read in place.
//!
//! [`ModelFiles::open`] takes a Hugging Face safetensors directory (single
//! file or sharded with `model.safetensors.index.json`) or a GGUF file, maps
//! every file read-only and lists its tensors as byte ranges
//! ([`TensorInfo`]). Nothing is copied: weights are borrowed from the maps
//! (candle's safetensors approach, applied to GGUF too), and every tensor —
//! every expert in particular — is addressable as `(file, offset, length)`,
//! which is what the streaming engine reads.

// Every unsafe block and impl must say why it is sound.
#![warn(clippy::undocumented_unsafe_blocks)]

mod bytes;
pub mod config;
pub mod gguf;
pub mod gguf_write;
pub mod model;
pub mod packed;

pub use bytes::TensorBytes;
pub use gguf::{Gguf, Value};
pub use gguf_write::{GgufWriter, MetaValue, TensorSpec};

use memmap2::Mmap;
use sluice_core::{DType, Error, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Which container a model came from.
#[derive(Clone, Debug)]
pub enum Container {
    /// Hugging Face safetensors with its parsed `config.json`.
    Safetensors {
        /// The parsed `config.json`.
        config: serde_json::Value,
    },
    /// A GGUF file with its parsed header.
    Gguf(Box<Gguf>),
}

/// One tensor: where its bytes are and how to read them.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    /// Name as stored in the container.
    pub name: String,
    /// Element type; `None` for a type sluice cannot compute with (kept so
    /// that `inspect` can still account for its bytes).
    pub dtype: Option<DType>,
    /// The type's name as the container spells it.
    pub dtype_name: String,
    /// Shape, outermost first (`[out, in]` for a linear weight).
    pub shape: Vec<usize>,
    /// Index into [`ModelFiles::files`].
    pub file: usize,
    /// Absolute byte offset in that file.
    pub offset: u64,
    /// Length in bytes.
    pub nbytes: u64,
}

/// A mapped model file.
pub struct MappedFile {
    /// Where it is.
    pub path: PathBuf,
    map: Arc<Mmap>,
}

impl MappedFile {
    fn open(path: &Path) -> Result<Self> {
        let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let meta = f.metadata().map_err(|e| Error::io(path, e))?;
        if !meta.is_file() {
            return Err(Error::NotAFile {
                path: path.to_path_buf(),
            });
        }
        // SAFETY: the map is read-only and model files are treated as immutable while sluice runs; a file truncated underneath us would fault, as with every mmap-based loader, and is documented.
        let map = unsafe { Mmap::map(&f) }.map_err(|e| Error::io(path, e))?;
        Ok(MappedFile {
            path: path.to_path_buf(),
            map: Arc::new(map),
        })
    }

    /// Size in bytes.
    pub fn len(&self) -> u64 {
        self.map.len() as u64
    }

    /// True for an empty file.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// An opened model: its files, its tensors and its configuration.
pub struct ModelFiles {
    /// The path the model was opened from.
    pub path: PathBuf,
    /// Container-specific configuration.
    pub container: Container,
    files: Vec<MappedFile>,
    tensors: BTreeMap<String, TensorInfo>,
}

impl ModelFiles {
    /// Opens a safetensors directory (or a `.safetensors` file with its
    /// `config.json` beside it) or a GGUF file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        if meta.is_dir() {
            return open_safetensors_dir(path, None);
        }
        let mut magic = [0u8; 4];
        {
            use std::io::Read;
            let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
            let n = f.read(&mut magic).map_err(|e| Error::io(path, e))?;
            if n < 4 {
                return Err(format_err(
                    path,
                    "model",
                    "file is shorter than any model header",
                ));
            }
        }
        if &magic == b"GGUF" {
            open_gguf(path)
        } else if path.extension().is_some_and(|e| e == "safetensors") {
            let dir = path.parent().unwrap_or(Path::new("."));
            open_safetensors_dir(dir, Some(path))
        } else {
            Err(format_err(
                path,
                "model",
                "neither a GGUF file, a .safetensors file nor a directory",
            ))
        }
    }

    /// All tensors, by name.
    pub fn tensors(&self) -> impl Iterator<Item = &TensorInfo> {
        self.tensors.values()
    }

    /// One tensor by name.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    /// The mapped files.
    pub fn files(&self) -> &[MappedFile] {
        &self.files
    }

    /// The bytes of a tensor, borrowed from its file's map.
    pub fn bytes(&self, t: &TensorInfo) -> TensorBytes {
        TensorBytes::mapped(
            self.files[t.file].map.clone(),
            t.offset as usize,
            t.nbytes as usize,
        )
    }

    /// Tells the kernel that the maps are read at random: touching one
    /// small tensor then faults in one page, not a read-ahead window, so
    /// streaming modes that read through their own buffers keep the page
    /// cache (and the process's RSS) out of the picture. Windows has no
    /// such advice for a mapping: there it does nothing.
    pub fn advise_random(&self) {
        #[cfg(unix)]
        for f in &self.files {
            // Advice is a hint; failure changes nothing observable.
            let _ = f.map.advise(memmap2::Advice::Random);
        }
    }

    /// Total bytes of all tensors.
    pub fn total_tensor_bytes(&self) -> u64 {
        self.tensors.values().map(|t| t.nbytes).sum()
    }

    /// The Hugging Face config, for safetensors models.
    pub fn hf_config(&self) -> Option<&serde_json::Value> {
        match &self.container {
            Container::Safetensors { config } => Some(config),
            Container::Gguf(_) => None,
        }
    }

    /// The GGUF header, for GGUF models.
    pub fn gguf(&self) -> Option<&Gguf> {
        match &self.container {
            Container::Gguf(g) => Some(g),
            Container::Safetensors { .. } => None,
        }
    }
}

fn format_err(path: &Path, format: &'static str, msg: impl Into<String>) -> Error {
    Error::Format {
        path: path.to_path_buf(),
        format,
        msg: msg.into(),
    }
}

fn open_gguf(path: &Path) -> Result<ModelFiles> {
    let file = MappedFile::open(path)?;
    let g = gguf::parse(&file.map).map_err(|m| format_err(path, "GGUF", m))?;
    let tensors = g
        .tensors
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                TensorInfo {
                    name: t.name.clone(),
                    dtype: Some(t.dtype),
                    dtype_name: t.dtype.name().to_string(),
                    shape: t.shape.clone(),
                    file: 0,
                    offset: t.offset,
                    nbytes: t.nbytes,
                },
            )
        })
        .collect();
    Ok(ModelFiles {
        path: path.to_path_buf(),
        container: Container::Gguf(Box::new(g)),
        files: vec![file],
        tensors,
    })
}

fn st_dtype(d: safetensors::Dtype) -> Option<DType> {
    match d {
        safetensors::Dtype::F32 => Some(DType::F32),
        safetensors::Dtype::F16 => Some(DType::F16),
        safetensors::Dtype::BF16 => Some(DType::BF16),
        _ => None,
    }
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let s = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&s).map_err(|e| format_err(path, "JSON", e.to_string()))
}

fn open_safetensors_dir(dir: &Path, single: Option<&Path>) -> Result<ModelFiles> {
    let cfg_path = dir.join("config.json");
    if !cfg_path.is_file() {
        return Err(Error::Invalid(format!(
            "{}: no config.json (a safetensors model directory needs one)",
            dir.display()
        )));
    }
    let config = read_json(&cfg_path)?;
    let shard_paths: Vec<PathBuf> = if let Some(p) = single {
        vec![p.to_path_buf()]
    } else if dir.join("model.safetensors.index.json").is_file() {
        let ip = dir.join("model.safetensors.index.json");
        let idx = read_json(&ip)?;
        let map = idx
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| format_err(&ip, "safetensors index", "no weight_map object"))?;
        let mut shards: Vec<String> = map
            .values()
            .map(|v| {
                v.as_str().map(str::to_string).ok_or_else(|| {
                    format_err(&ip, "safetensors index", "weight_map value is not a string")
                })
            })
            .collect::<Result<_>>()?;
        shards.sort();
        shards.dedup();
        for s in &shards {
            if s.contains('/') || s.contains('\\') || s == ".." {
                return Err(format_err(
                    &ip,
                    "safetensors index",
                    format!("shard name {s:?} leaves the model directory"),
                ));
            }
        }
        shards.into_iter().map(|s| dir.join(s)).collect()
    } else if dir.join("model.safetensors").is_file() {
        vec![dir.join("model.safetensors")]
    } else {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| Error::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        v.sort();
        if v.is_empty() {
            return Err(Error::Invalid(format!(
                "{}: no .safetensors weights in the directory",
                dir.display()
            )));
        }
        v
    };
    let mut files = Vec::new();
    let mut tensors = BTreeMap::new();
    for (fi, p) in shard_paths.iter().enumerate() {
        let f = MappedFile::open(p)?;
        let st = safetensors::SafeTensors::deserialize(&f.map)
            .map_err(|e| format_err(p, "safetensors", e.to_string()))?;
        let base = f.map.as_ptr() as usize;
        for (name, view) in st.tensors() {
            let data = view.data();
            let info = TensorInfo {
                name: name.clone(),
                dtype: st_dtype(view.dtype()),
                dtype_name: format!("{:?}", view.dtype()),
                shape: view.shape().to_vec(),
                file: fi,
                offset: (data.as_ptr() as usize - base) as u64,
                nbytes: data.len() as u64,
            };
            if tensors.insert(name.clone(), info).is_some() {
                return Err(format_err(
                    p,
                    "safetensors",
                    format!("tensor {name} appears in more than one shard"),
                ));
            }
        }
        files.push(f);
    }
    Ok(ModelFiles {
        path: dir.to_path_buf(),
        container: Container::Safetensors { config },
        files,
        tensors,
    })
}

/// Fills `buf` from `file` at `offset` (positioned: the file's cursor is
/// not relied on), failing with `UnexpectedEof` at the end of the file.
pub fn read_exact_at(file: &std::fs::File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    #[cfg(unix)]
    return std::os::unix::fs::FileExt::read_exact_at(file, buf, offset);
    #[cfg(windows)]
    {
        let mut done = 0;
        while done < buf.len() {
            match std::os::windows::fs::FileExt::seek_read(
                file,
                &mut buf[done..],
                offset + done as u64,
            ) {
                Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_gguf_and_slices_tensors_in_place() {
        let dir = std::env::temp_dir().join(format!("sluice-fmt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("t.gguf");
        std::fs::write(&p, gguf::tests::write(&[], &[("w", vec![4, 2])])).unwrap();
        let m = ModelFiles::open(&p).unwrap();
        let t = m.tensor("w").unwrap();
        assert_eq!(t.shape, vec![2, 4]);
        let b = m.bytes(t);
        assert_eq!(b.len(), 32);
        assert_eq!(b.offset() as u64, t.offset);
        assert_eq!(b.slice(16, 16).unwrap().offset() as u64, t.offset + 16);
        assert!(b.slice(17, 16).is_none());
        // Windows keeps a mapped file from being deleted.
        drop((b, m));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn directory_without_config_is_a_clear_error() {
        let dir = std::env::temp_dir().join(format!("sluice-fmt-nocfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let e = ModelFiles::open(&dir).err().unwrap().to_string();
        assert!(e.contains("no config.json"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
