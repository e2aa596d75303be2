//! Aligned heap buffers: `O_DIRECT` needs destinations aligned to the block
//! size, which `Vec<u8>` does not promise.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

use sluice_core::{Error, Result};

/// An owned, zero-initialised heap buffer whose start is aligned to `align`.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    align: usize,
}

// SAFETY: AlignedBuf uniquely owns its allocation (like Box<[u8]>); shared
// access only hands out `&[u8]`.
unsafe impl Send for AlignedBuf {}
// SAFETY: as above; `&AlignedBuf` allows no mutation.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// Allocates `len` zeroed bytes aligned to `align` (a power of two).
    ///
    /// `len == 0` allocates nothing. Fails with [`Error::Alloc`], naming the
    /// size, when `align` is not a power of two, the size is absurd or the
    /// allocation fails (rather than aborting the process).
    pub fn new(len: usize, align: usize) -> Result<AlignedBuf> {
        let align = align.max(1);
        let layout = Layout::from_size_align(len, align).map_err(|_| Error::Alloc {
            len,
            align,
            why: "not a valid layout (the alignment must be a power of two, the size within isize)",
        })?;
        if len == 0 {
            // A zero-length slice needs a non-null, aligned pointer but no
            // memory; `align` itself is such an address.
            let ptr = NonNull::new(align as *mut u8).expect("align is non-zero");
            return Ok(AlignedBuf { ptr, len, align });
        }
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).ok_or(Error::Alloc {
            len,
            align,
            why: "out of memory",
        })?;
        Ok(AlignedBuf { ptr, len, align })
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Alignment of the start of the buffer.
    pub fn align(&self) -> usize {
        self.align
    }

    /// Pointer to the first byte.
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// Mutable pointer to the first byte, e.g. for a [`crate::ReadReq`].
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.len != 0 {
            // SAFETY: allocated in `new` with exactly this size and alignment, which `new` validated as a Layout.
            unsafe {
                dealloc(
                    self.ptr.as_ptr(),
                    Layout::from_size_align_unchecked(self.len, self.align),
                )
            };
        }
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for `len` initialised (zeroed at allocation) bytes, or dangling-but-aligned with len 0; we own them.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl AsMut<[u8]> for AlignedBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        self
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .field("align", &self.align)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_zeroed() {
        for align in [1, 8, 512, 4096, 1 << 16] {
            for len in [1, 100, 4096, 12345] {
                let mut b = AlignedBuf::new(len, align).unwrap();
                assert_eq!(b.as_ptr() as usize % align, 0);
                assert_eq!(b.len(), len);
                assert!(b.iter().all(|&x| x == 0));
                b[len - 1] = 7;
                assert_eq!(b.as_ref()[len - 1], 7);
            }
        }
    }

    #[test]
    fn empty_and_bad() {
        let b = AlignedBuf::new(0, 4096).unwrap();
        assert!(b.is_empty());
        assert_eq!(b.as_ptr() as usize % 4096, 0);
        assert_eq!(&b[..], &[] as &[u8]);
        assert!(matches!(AlignedBuf::new(10, 3), Err(Error::Alloc { .. })));
        let e = AlignedBuf::new(usize::MAX - 10, 4096).unwrap_err();
        assert!(
            e.to_string().contains(&(usize::MAX - 10).to_string()),
            "{e}"
        );
        // Fits a Layout but no allocator will hand it out.
        let e = AlignedBuf::new(isize::MAX as usize / 2, 4096).unwrap_err();
        assert!(matches!(e, Error::Alloc { .. }));
    }
}
