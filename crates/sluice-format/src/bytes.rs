//! Shared, cheaply sliced byte ranges of mapped model files.

use std::ops::Deref;
use std::sync::Arc;

/// A byte range of a model file (usually a read-only memory map), shared by
/// reference count: slicing a tensor into per-expert ranges copies nothing.
#[derive(Clone)]
pub struct TensorBytes {
    backing: Arc<dyn AsRef<[u8]> + Send + Sync>,
    start: usize,
    len: usize,
    mapped: bool,
}

impl TensorBytes {
    /// The range `start..start + len` of `backing`; panics if out of bounds
    /// (callers validate ranges against the file size when parsing).
    pub fn new(backing: Arc<dyn AsRef<[u8]> + Send + Sync>, start: usize, len: usize) -> Self {
        assert!(
            start + len <= (*backing).as_ref().len(),
            "range beyond backing"
        );
        TensorBytes {
            backing,
            start,
            len,
            mapped: false,
        }
    }

    /// A range of a mapped model file: [`offset`](Self::offset) is then a
    /// file offset, and streaming code reads it from the file instead of
    /// touching the map.
    pub fn mapped(backing: Arc<dyn AsRef<[u8]> + Send + Sync>, start: usize, len: usize) -> Self {
        TensorBytes {
            mapped: true,
            ..TensorBytes::new(backing, start, len)
        }
    }

    /// Whether this is a range of a mapped file (else owned bytes).
    pub fn is_mapped(&self) -> bool {
        self.mapped
    }

    /// Owned bytes (converted or synthesized tensors).
    pub fn from_vec(v: Vec<u8>) -> Self {
        let len = v.len();
        TensorBytes {
            backing: Arc::new(v),
            start: 0,
            len,
            mapped: false,
        }
    }

    /// A sub-range, relative to this one; `None` when it does not fit.
    pub fn slice(&self, offset: usize, len: usize) -> Option<TensorBytes> {
        let end = offset.checked_add(len)?;
        (end <= self.len).then(|| TensorBytes {
            backing: self.backing.clone(),
            start: self.start + offset,
            len,
            mapped: self.mapped,
        })
    }

    /// Offset of this range within its backing (the file offset for maps).
    pub fn offset(&self) -> usize {
        self.start
    }
}

impl Deref for TensorBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &(*self.backing).as_ref()[self.start..self.start + self.len]
    }
}

impl std::fmt::Debug for TensorBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TensorBytes({}..{})", self.start, self.start + self.len)
    }
}
