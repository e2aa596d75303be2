//! Writing GGUF v3 files, tensor by tensor, with a chosen alignment.
//!
//! The packed layout (`sluice pack`, `sluice synth`) is a GGUF file whose
//! expert records start on storage-block boundaries. The file declares that
//! boundary as its `general.alignment`, and every tensor starts at the
//! first multiple of it after the previous one ends, as llama.cpp's reader
//! requires (it refuses any gap larger than the alignment's padding); the
//! data section itself starts on such a boundary, so relative and absolute
//! offsets are aligned alike. Offsets are fixed-width in the header, so its
//! size is known before the offsets are.

use sluice_core::{DType, Error, Result};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// GGUF's default alignment, the least a file may declare here.
const ALIGNMENT: u64 = 32;

/// A metadata value to write.
#[derive(Clone, Debug)]
pub enum MetaValue {
    /// `uint32`.
    U32(u32),
    /// `uint64`.
    U64(u64),
    /// `float32`.
    F32(f32),
    /// `bool`.
    Bool(bool),
    /// `string`.
    Str(String),
    /// Array of `uint64`.
    U64s(Vec<u64>),
    /// Array of `int32`.
    I32s(Vec<i32>),
    /// Array of `float32`.
    F32s(Vec<f32>),
    /// Array of `string`.
    Strs(Vec<String>),
    /// Array of `bool`.
    Bools(Vec<bool>),
}

/// A tensor to place: name, type and shape (outermost first). `align` is
/// kept for the callers' bookkeeping; every tensor is placed on the file's
/// alignment.
#[derive(Clone, Debug)]
pub struct TensorSpec {
    /// Name.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape, outermost first.
    pub shape: Vec<usize>,
    /// Alignment the caller wants for the tensor's first byte (at most the
    /// file's, which every tensor gets).
    pub align: u64,
}

/// Writes a GGUF file whose layout is fixed up front; tensors must then be
/// written in the order they were given.
pub struct GgufWriter {
    path: PathBuf,
    out: std::io::BufWriter<std::fs::File>,
    offsets: Vec<u64>,
    sizes: Vec<u64>,
    next: usize,
    pos: u64,
    meta_at: Vec<usize>,
    meta_len: Vec<Option<usize>>,
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend_from_slice(&(s.len() as u64).to_le_bytes());
    b.extend_from_slice(s.as_bytes());
}

fn put_value(b: &mut Vec<u8>, v: &MetaValue) {
    let ty = |b: &mut Vec<u8>, t: u32| b.extend_from_slice(&t.to_le_bytes());
    let arr = |b: &mut Vec<u8>, t: u32, n: usize| {
        b.extend_from_slice(&9u32.to_le_bytes());
        b.extend_from_slice(&t.to_le_bytes());
        b.extend_from_slice(&(n as u64).to_le_bytes());
    };
    match v {
        MetaValue::U32(x) => {
            ty(b, 4);
            b.extend_from_slice(&x.to_le_bytes());
        }
        MetaValue::U64(x) => {
            ty(b, 10);
            b.extend_from_slice(&x.to_le_bytes());
        }
        MetaValue::F32(x) => {
            ty(b, 6);
            b.extend_from_slice(&x.to_le_bytes());
        }
        MetaValue::Bool(x) => {
            ty(b, 7);
            b.push(*x as u8);
        }
        MetaValue::Str(s) => {
            ty(b, 8);
            put_str(b, s);
        }
        MetaValue::U64s(a) => {
            arr(b, 10, a.len());
            a.iter().for_each(|x| b.extend_from_slice(&x.to_le_bytes()));
        }
        MetaValue::I32s(a) => {
            arr(b, 5, a.len());
            a.iter().for_each(|x| b.extend_from_slice(&x.to_le_bytes()));
        }
        MetaValue::F32s(a) => {
            arr(b, 6, a.len());
            a.iter().for_each(|x| b.extend_from_slice(&x.to_le_bytes()));
        }
        MetaValue::Strs(a) => {
            arr(b, 8, a.len());
            a.iter().for_each(|s| put_str(b, s));
        }
        MetaValue::Bools(a) => {
            arr(b, 7, a.len());
            a.iter().for_each(|&x| b.push(x as u8));
        }
    }
}

/// The header bytes and, per metadata entry, where its value starts.
fn header(
    meta: &[(String, MetaValue)],
    tensors: &[TensorSpec],
    rel: &[u64],
    alignment: u64,
) -> (Vec<u8>, Vec<usize>) {
    let mut at = Vec::with_capacity(meta.len());
    let mut b = Vec::new();
    b.extend_from_slice(b"GGUF");
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    b.extend_from_slice(&(meta.len() as u64 + 1).to_le_bytes());
    put_str(&mut b, "general.alignment");
    put_value(&mut b, &MetaValue::U32(alignment as u32));
    for (k, v) in meta {
        put_str(&mut b, k);
        at.push(b.len());
        put_value(&mut b, v);
    }
    for (t, off) in tensors.iter().zip(rel) {
        put_str(&mut b, &t.name);
        b.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
        for d in t.shape.iter().rev() {
            b.extend_from_slice(&(*d as u64).to_le_bytes());
        }
        b.extend_from_slice(&t.dtype.ggml_id().to_le_bytes());
        b.extend_from_slice(&off.to_le_bytes());
    }
    (b, at)
}

impl GgufWriter {
    /// Lays out the file with `general.alignment` = `alignment` (a power of
    /// two, at least 32) and writes its header. Returns the writer and each
    /// tensor's absolute offset.
    pub fn create(
        path: &Path,
        meta: &[(String, MetaValue)],
        tensors: &[TensorSpec],
        alignment: u64,
    ) -> Result<(GgufWriter, Vec<u64>)> {
        if alignment < ALIGNMENT || !alignment.is_power_of_two() || alignment > u32::MAX as u64 {
            return Err(Error::Invalid(format!(
                "GGUF alignment {alignment} is not a power of two from {ALIGNMENT}"
            )));
        }
        let mut sizes = Vec::with_capacity(tensors.len());
        for t in tensors {
            if t.align > alignment {
                return Err(Error::Invalid(format!(
                    "tensor {}: alignment {} exceeds the file's {alignment}",
                    t.name, t.align
                )));
            }
            sizes.push(t.dtype.tensor_bytes(&t.shape)? as u64);
        }
        let (probe, _) = header(meta, tensors, &vec![0; tensors.len()], alignment);
        let data = (probe.len() as u64).next_multiple_of(alignment);
        let mut abs = Vec::with_capacity(tensors.len());
        let mut cur = data;
        for &n in &sizes {
            let o = cur.next_multiple_of(alignment);
            abs.push(o);
            cur = o + n;
        }
        let rel: Vec<u64> = abs.iter().map(|o| o - data).collect();
        let (h, meta_at) = header(meta, tensors, &rel, alignment);
        debug_assert_eq!(h.len(), probe.len());
        let f = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
        let mut w = GgufWriter {
            path: path.to_path_buf(),
            out: std::io::BufWriter::with_capacity(1 << 20, f),
            offsets: abs.clone(),
            sizes,
            next: 0,
            pos: 0,
            meta_at,
            meta_len: meta
                .iter()
                .map(|(_, v)| match v {
                    MetaValue::U64s(a) => Some(a.len()),
                    _ => None,
                })
                .collect(),
        };
        w.write_raw(&h)?;
        Ok((w, abs))
    }

    fn write_raw(&mut self, b: &[u8]) -> Result<()> {
        self.out
            .write_all(b)
            .map_err(|e| Error::io(&self.path, e))?;
        self.pos += b.len() as u64;
        Ok(())
    }

    fn pad_to(&mut self, at: u64) -> Result<()> {
        const ZEROS: [u8; 4096] = [0; 4096];
        while self.pos < at {
            let n = ((at - self.pos) as usize).min(ZEROS.len());
            self.write_raw(&ZEROS[..n])?;
        }
        Ok(())
    }

    /// Bytes written so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Overwrites the `u64` array of metadata entry `index` (an entry
    /// written as [`MetaValue::U64s`] of the same length): for values known
    /// only after the tensors, such as checksums.
    pub fn patch_u64s(&mut self, index: usize, values: &[u64]) -> Result<()> {
        if self.meta_len.get(index).copied().flatten() != Some(values.len()) {
            return Err(Error::Invalid(format!(
                "{}: metadata entry {index} is not a u64 array of {} values",
                self.path.display(),
                values.len()
            )));
        }
        // type tag, element type, count, then the values.
        let at = (self.meta_at[index] + 4 + 4 + 8) as u64;
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let p = self.path.clone();
        let io = |e| Error::io(&p, e);
        self.out.flush().map_err(io)?;
        let f = self.out.get_mut();
        f.seek(SeekFrom::Start(at)).map_err(io)?;
        f.write_all(&bytes).map_err(io)?;
        f.seek(SeekFrom::Start(self.pos)).map_err(io)?;
        Ok(())
    }

    /// Writes the next tensor's bytes (exactly its size).
    pub fn write_tensor(&mut self, bytes: &[u8]) -> Result<()> {
        let i = self.next;
        if i >= self.sizes.len() || bytes.len() as u64 != self.sizes[i] {
            return Err(Error::Invalid(format!(
                "{}: tensor {i} written with {} bytes, expected {:?}",
                self.path.display(),
                bytes.len(),
                self.sizes.get(i)
            )));
        }
        self.pad_to(self.offsets[i])?;
        self.write_raw(bytes)?;
        self.next += 1;
        Ok(())
    }

    /// Flushes and closes the file; every tensor must have been written.
    /// Returns the file's size.
    pub fn finish(mut self) -> Result<u64> {
        if self.next != self.sizes.len() {
            return Err(Error::Invalid(format!(
                "{}: {} of {} tensors written",
                self.path.display(),
                self.next,
                self.sizes.len()
            )));
        }
        // Round the file up to a block, so a widened direct read of the
        // last record stays inside the file.
        let end = self.pos.next_multiple_of(4096);
        self.pad_to(end)?;
        self.out.flush().map_err(|e| Error::io(&self.path, e))?;
        let f = self.out.get_mut();
        f.sync_all().map_err(|e| Error::io(&self.path, e))?;
        Ok(self.pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_the_parser() {
        let dir = std::env::temp_dir().join(format!("sluice-gguf-write-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("t.gguf");
        let meta = vec![
            ("a.str".to_string(), MetaValue::Str("héllo".into())),
            ("a.u64s".to_string(), MetaValue::U64s(vec![1, u64::MAX])),
            ("a.f32".to_string(), MetaValue::F32(0.5)),
        ];
        let tensors = vec![
            TensorSpec {
                name: "x".into(),
                dtype: DType::F32,
                shape: vec![3, 5],
                align: 0,
            },
            TensorSpec {
                name: "y".into(),
                dtype: DType::Q8_0,
                shape: vec![2, 64],
                align: 4096,
            },
        ];
        let (mut w, offs) = GgufWriter::create(&p, &meta, &tensors, 4096).unwrap();
        assert_eq!(offs[1] % 4096, 0);
        assert!(
            GgufWriter::create(&p, &meta, &tensors, 1024).is_err(),
            "tensor alignment above the file's"
        );
        assert!(
            GgufWriter::create(&p, &meta, &tensors, 3000).is_err(),
            "not a power of two"
        );
        w.write_tensor(&[7u8; 60]).unwrap();
        assert!(w.write_tensor(&[1u8; 10]).is_err(), "wrong size accepted");
        w.write_tensor(&[9u8; 136]).unwrap();
        assert!(w.patch_u64s(0, &[1, 2]).is_err(), "patched a string");
        w.patch_u64s(1, &[5, 6]).unwrap();
        w.finish().unwrap();
        let b = std::fs::read(&p).unwrap();
        assert_eq!(b.len() % 4096, 0);
        let g = crate::gguf::parse(&b).unwrap();
        assert_eq!(g.get("a.str").unwrap().as_str(), Some("héllo"));
        let a = g.get("a.u64s").unwrap().as_array().unwrap();
        assert_eq!(a, &[crate::Value::U64(5), crate::Value::U64(6)][..]);
        assert_eq!(g.tensors[0].shape, vec![3, 5]);
        assert_eq!(g.tensors[1].offset, offs[1]);
        assert_eq!(g.tensors[1].dtype, DType::Q8_0);
        assert_eq!(
            &b[offs[1] as usize..offs[1] as usize + 136],
            &[9u8; 136][..]
        );
        assert_eq!(g.alignment, 4096);
        assert_eq!(
            crate::gguf::llama_cpp_layout_errors(&g),
            Vec::<String>::new()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
