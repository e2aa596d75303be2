//! GGUF (v2 and v3) parsing, read in place from a memory map.
//!
//! Every count and length in the header is checked against the bytes that
//! remain before anything is allocated, so a lying header costs an error,
//! not memory.

use sluice_core::DType;
use std::collections::BTreeMap;

const MAGIC: &[u8; 4] = b"GGUF";
const MAX_DIMS: u32 = 4;

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// Any unsigned integer type.
    U64(u64),
    /// Any signed integer type.
    I64(i64),
    /// f32 or f64.
    F64(f64),
    /// Boolean.
    Bool(bool),
    /// UTF-8 string (invalid UTF-8 replaced).
    Str(String),
    /// Homogeneous array.
    Array(Vec<Value>),
}

impl Value {
    /// The value as an unsigned integer, if it is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U64(v) => Some(v),
            Value::I64(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }
    /// The value as a float, if numeric.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::U64(v) => Some(v as f64),
            Value::I64(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => None,
        }
    }
    /// The value as a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    /// The value as a bool.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }
    /// The value as an array.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// A tensor's record in the GGUF header.
#[derive(Clone, Debug)]
pub struct GgufTensor {
    /// Tensor name.
    pub name: String,
    /// Shape, outermost first (GGUF stores it innermost first).
    pub shape: Vec<usize>,
    /// Element type.
    pub dtype: DType,
    /// Absolute byte offset in the file.
    pub offset: u64,
    /// Bytes of data.
    pub nbytes: u64,
}

/// The parsed header of a GGUF file.
#[derive(Clone, Debug)]
pub struct Gguf {
    /// File format version.
    pub version: u32,
    /// Metadata key/values.
    pub meta: BTreeMap<String, Value>,
    /// Tensors in header order.
    pub tensors: Vec<GgufTensor>,
    /// `general.alignment` (default 32).
    pub alignment: u64,
    /// Absolute offset of the data section.
    pub data_offset: u64,
}

impl Gguf {
    /// Metadata lookup.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.meta.get(key)
    }
    /// `general.architecture`.
    pub fn architecture(&self) -> Option<&str> {
        self.get("general.architecture").and_then(Value::as_str)
    }
}

/// Where `g`'s layout breaks the rules llama.cpp's reader enforces
/// (`gguf_init_from_file`): the alignment a power of two, the data section
/// on it, and each tensor exactly where the previous one ends, padded to
/// the alignment (no larger gaps, no overlaps). Empty when it loads.
pub fn llama_cpp_layout_errors(g: &Gguf) -> Vec<String> {
    let mut errs = Vec::new();
    let a = g.alignment;
    if a == 0 || !a.is_power_of_two() {
        errs.push(format!("general.alignment {a} is not a power of two"));
        return errs;
    }
    if !g.data_offset.is_multiple_of(a) {
        errs.push(format!(
            "data section at {} is not a multiple of the alignment {a}",
            g.data_offset
        ));
    }
    let mut expect = 0u64;
    for t in &g.tensors {
        let rel = t.offset.saturating_sub(g.data_offset);
        if rel != expect {
            errs.push(format!(
                "tensor '{}' has offset {rel}, expected {expect}",
                t.name
            ));
        }
        expect = (rel + t.nbytes).next_multiple_of(a);
    }
    errs
}

struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        if self.b.len() - self.pos < n {
            return Err(format!(
                "truncated: {what} needs {n} bytes at offset {}, file has {}",
                self.pos,
                self.b.len()
            ));
        }
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn remaining(&self) -> usize {
        self.b.len() - self.pos
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1, "u8")?[0])
    }
    fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_le_bytes(self.take(2, "u16")?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4, "u32")?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8, "u64")?.try_into().unwrap()))
    }
    fn string(&mut self, what: &str) -> Result<String, String> {
        let n = self.u64()?;
        if n > self.remaining() as u64 {
            return Err(format!(
                "{what}: string length {n} exceeds the {} bytes left in the file",
                self.remaining()
            ));
        }
        Ok(String::from_utf8_lossy(self.take(n as usize, what)?).into_owned())
    }

    fn value(&mut self, ty: u32, key: &str, depth: u32) -> Result<Value, String> {
        Ok(match ty {
            0 => Value::U64(self.u8()? as u64),
            1 => Value::I64(self.u8()? as i8 as i64),
            2 => Value::U64(self.u16()? as u64),
            3 => Value::I64(self.u16()? as i16 as i64),
            4 => Value::U64(self.u32()? as u64),
            5 => Value::I64(self.u32()? as i32 as i64),
            6 => Value::F64(f32::from_bits(self.u32()?) as f64),
            7 => Value::Bool(self.u8()? != 0),
            8 => Value::Str(self.string(key)?),
            9 => {
                if depth > 0 {
                    return Err(format!("metadata {key}: nested arrays are not supported"));
                }
                let ety = self.u32()?;
                let n = self.u64()?;
                // Every element takes at least one byte (strings at least 8),
                // so a count beyond the bytes left is a lie: refuse it before
                // allocating.
                let min = match ety {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    _ => return Err(format!("metadata {key}: unknown array type {ety}")),
                };
                if n.saturating_mul(min) > self.remaining() as u64 {
                    return Err(format!(
                        "metadata {key}: array of {n} elements exceeds the {} bytes left",
                        self.remaining()
                    ));
                }
                let mut v = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    v.push(self.value(ety, key, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(self.u64()? as i64),
            12 => Value::F64(f64::from_bits(self.u64()?)),
            _ => return Err(format!("metadata {key}: unknown value type {ty}")),
        })
    }
}

/// Parses the header of a GGUF file held in `b`, validating every tensor's
/// type, shape and byte range against the file.
pub fn parse(b: &[u8]) -> Result<Gguf, String> {
    let mut c = Cursor { b, pos: 0 };
    if c.take(4, "magic")? != MAGIC {
        return Err("not a GGUF file (bad magic)".into());
    }
    let version = c.u32()?;
    if !(2..=3).contains(&version) {
        return Err(format!("unsupported GGUF version {version} (2 and 3 are)"));
    }
    let n_tensors = c.u64()?;
    let n_kv = c.u64()?;
    // A key/value takes at least 8 + 4 + 1 bytes, a tensor record at least
    // 8 + 4 + 8 + 4 + 8.
    if n_kv.saturating_mul(13) > c.remaining() as u64 {
        return Err(format!(
            "header claims {n_kv} metadata entries, more than the file holds"
        ));
    }
    if n_tensors.saturating_mul(32) > c.remaining() as u64 {
        return Err(format!(
            "header claims {n_tensors} tensors, more than the file holds"
        ));
    }
    let mut meta = BTreeMap::new();
    for _ in 0..n_kv {
        let key = c.string("metadata key")?;
        let ty = c.u32()?;
        let v = c.value(ty, &key, 0)?;
        if meta.insert(key.clone(), v).is_some() {
            return Err(format!("duplicate metadata key {key}"));
        }
    }
    let alignment = match meta.get("general.alignment") {
        None => 32,
        Some(v) => {
            let a = v
                .as_u64()
                .ok_or("general.alignment is not an unsigned integer")?;
            if a == 0 || !a.is_power_of_two() || a > 1 << 20 {
                return Err(format!(
                    "general.alignment {a} is not a power of two ≤ 1 MiB"
                ));
            }
            a
        }
    };
    struct Raw {
        name: String,
        dims: Vec<u64>,
        ty: u32,
        rel: u64,
    }
    let mut raws = Vec::with_capacity(n_tensors as usize);
    for i in 0..n_tensors {
        let name = c.string("tensor name")?;
        let nd = c.u32()?;
        if nd == 0 || nd > MAX_DIMS {
            return Err(format!(
                "tensor {i} ({name}): {nd} dimensions (1 to {MAX_DIMS} allowed)"
            ));
        }
        let mut dims = Vec::with_capacity(nd as usize);
        for _ in 0..nd {
            dims.push(c.u64()?);
        }
        let ty = c.u32()?;
        let rel = c.u64()?;
        raws.push(Raw {
            name,
            dims,
            ty,
            rel,
        });
    }
    let data_offset = (c.pos as u64).div_ceil(alignment) * alignment;
    let file_len = b.len() as u64;
    let mut tensors = Vec::with_capacity(raws.len());
    let mut names = std::collections::HashSet::new();
    for r in raws {
        let name = r.name;
        if !names.insert(name.clone()) {
            return Err(format!("duplicate tensor name {name}"));
        }
        let dtype = DType::from_ggml_id(r.ty)
            .ok_or_else(|| format!("tensor {name}: unsupported tensor type id {}", r.ty))?;
        if r.dims.iter().any(|&d| d == 0 || d > 1 << 40) {
            return Err(format!("tensor {name}: invalid dimensions {:?}", r.dims));
        }
        let shape: Vec<usize> = r.dims.iter().rev().map(|&d| d as usize).collect();
        let nbytes = dtype
            .tensor_bytes(&shape)
            .map_err(|e| format!("tensor {name}: {e}"))? as u64;
        if r.rel % alignment != 0 {
            return Err(format!(
                "tensor {name}: offset {} is not aligned to {alignment}",
                r.rel
            ));
        }
        let offset = data_offset
            .checked_add(r.rel)
            .filter(|o| o.checked_add(nbytes).is_some_and(|e| e <= file_len))
            .ok_or_else(|| {
                format!(
                    "tensor {name}: data at {}+{} ({nbytes} bytes) lies beyond the end of the file ({file_len} bytes)",
                    data_offset, r.rel
                )
            })?;
        tensors.push(GgufTensor {
            name,
            shape,
            dtype,
            offset,
            nbytes,
        });
    }
    let mut by_off: Vec<&GgufTensor> = tensors.iter().collect();
    by_off.sort_by_key(|t| t.offset);
    for w in by_off.windows(2) {
        if w[0].offset + w[0].nbytes > w[1].offset {
            return Err(format!("tensors {} and {} overlap", w[0].name, w[1].name));
        }
    }
    Ok(Gguf {
        version,
        meta,
        tensors,
        alignment,
        data_offset,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal GGUF writer for tests: (key, u32 value) metadata and F32
    /// tensors given as (name, dims innermost-first).
    pub fn write(meta: &[(&str, u32)], tensors: &[(&str, Vec<u64>)]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(b"GGUF");
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
        b.extend_from_slice(&(meta.len() as u64).to_le_bytes());
        let s = |b: &mut Vec<u8>, x: &str| {
            b.extend_from_slice(&(x.len() as u64).to_le_bytes());
            b.extend_from_slice(x.as_bytes());
        };
        for (k, v) in meta {
            s(&mut b, k);
            b.extend_from_slice(&4u32.to_le_bytes());
            b.extend_from_slice(&v.to_le_bytes());
        }
        let mut off = 0u64;
        let mut sizes = vec![];
        for (name, dims) in tensors {
            s(&mut b, name);
            b.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                b.extend_from_slice(&d.to_le_bytes());
            }
            b.extend_from_slice(&0u32.to_le_bytes());
            b.extend_from_slice(&off.to_le_bytes());
            let n = dims.iter().product::<u64>() * 4;
            sizes.push(n);
            off += n.div_ceil(32) * 32;
        }
        while b.len() % 32 != 0 {
            b.push(0);
        }
        for n in sizes {
            b.extend(std::iter::repeat_n(0u8, (n.div_ceil(32) * 32) as usize));
        }
        b
    }

    #[test]
    fn parses_what_it_wrote() {
        let b = write(&[("x.count", 7)], &[("a", vec![8, 3]), ("b", vec![5])]);
        let g = parse(&b).unwrap();
        assert_eq!(g.get("x.count").unwrap().as_u64(), Some(7));
        assert_eq!(g.tensors[0].shape, vec![3, 8]);
        assert_eq!(g.tensors[0].nbytes, 96);
        assert_eq!(g.tensors[1].offset, g.data_offset + 96);
    }

    #[test]
    fn rejects_truncation_at_every_length() {
        let b = write(&[("x.count", 7)], &[("a", vec![8, 3])]);
        for n in 0..b.len() {
            assert!(parse(&b[..n]).is_err(), "truncated to {n} parsed");
        }
    }

    #[test]
    fn rejects_lying_counts_without_allocating() {
        let mut b = write(&[], &[]);
        b[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(parse(&b).unwrap_err().contains("tensors"));
        let mut b = write(&[], &[]);
        b[16..24].copy_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(parse(&b).unwrap_err().contains("metadata"));
    }

    #[test]
    fn rejects_tensor_beyond_file() {
        let mut b = write(&[], &[("a", vec![8])]);
        b.truncate(b.len() - 1);
        assert!(parse(&b).unwrap_err().contains("beyond the end"));
    }
}
