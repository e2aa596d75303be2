//! What the pread and io_uring engines share: opening files with an `O_DIRECT`
//! fallback, validating and widening requests, and deciding what a (short)
//! read means.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sluice_core::{Error, Result};

use crate::{widened_len, ReadReq, DIRECT_ALIGN};

/// Largest single read handed to the kernel. Linux caps one read at
/// 0x7ffff000 bytes anyway and io_uring lengths are 32-bit; a block-aligned
/// power of two keeps the follow-up reads aligned.
pub(crate) const MAX_CHUNK: usize = 1 << 30;

/// The platform's name for reads that bypass its cache, for messages.
pub const DIRECT_NAME: &str = if cfg!(target_vendor = "apple") {
    "F_NOCACHE"
} else if cfg!(windows) {
    "FILE_FLAG_NO_BUFFERING"
} else {
    "O_DIRECT"
};

/// An opened file.
#[derive(Debug)]
pub(crate) struct OpenedFile {
    pub path: PathBuf,
    pub file: File,
    /// Opened with `O_DIRECT`.
    pub direct: bool,
}

/// The files of an engine and the `O_DIRECT` bookkeeping over them.
#[derive(Debug)]
pub(crate) struct FileSet {
    want_direct: bool,
    pub files: Vec<Arc<OpenedFile>>,
    pub notes: Vec<String>,
}

impl FileSet {
    pub fn new(want_direct: bool) -> Self {
        FileSet {
            want_direct,
            files: Vec::new(),
            notes: Vec::new(),
        }
    }

    /// Opens `path`, with `O_DIRECT` when wanted and the filesystem allows it.
    pub fn open(&mut self, path: &Path) -> Result<usize> {
        self.open_using(path, open_with)
    }

    /// [`FileSet::open`] with the `open(2)` call given, so that tests can
    /// play a filesystem without direct I/O (tmpfs has it since Linux 6.6).
    fn open_using(
        &mut self,
        path: &Path,
        open: impl Fn(&Path, bool) -> std::io::Result<File>,
    ) -> Result<usize> {
        let mut direct = self.want_direct;
        let file = if direct {
            match open(path, true) {
                Ok(f) => f,
                // The filesystem has no direct I/O (tmpfs before 6.6, some
                // FUSE and overlay setups): the bytes are still readable,
                // only cached.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    direct = false;
                    self.notes.push(format!(
                        "{}: {DIRECT_NAME} refused by the filesystem ({e}); reading it through the page cache",
                        path.display()
                    ));
                    open(path, false).map_err(|e| Error::io(path, e))?
                }
                Err(e) => return Err(Error::io(path, e)),
            }
        } else {
            open(path, false).map_err(|e| Error::io(path, e))?
        };
        if !file.metadata().map_err(|e| Error::io(path, e))?.is_file() {
            return Err(Error::NotAFile {
                path: path.to_path_buf(),
            });
        }
        self.files.push(Arc::new(OpenedFile {
            path: path.to_path_buf(),
            file,
            direct,
        }));
        Ok(self.files.len() - 1)
    }

    pub fn direct(&self) -> bool {
        self.want_direct && self.files.iter().all(|f| f.direct)
    }

    pub fn align(&self) -> usize {
        let any_direct = if self.files.is_empty() {
            self.want_direct
        } else {
            self.files.iter().any(|f| f.direct)
        };
        if any_direct {
            DIRECT_ALIGN
        } else {
            1
        }
    }

    pub fn get(&self, id: usize) -> Result<&Arc<OpenedFile>> {
        self.files.get(id).ok_or(Error::NoSuchFile {
            id,
            open: self.files.len(),
        })
    }

    /// Validates `req` and computes its widened read.
    pub fn plan(&self, req: &ReadReq) -> Result<Plan> {
        let file = self.get(req.file)?;
        Plan::new(req, self.align(), file)
    }

    /// [`DIRECT_NAME`], `"buffered"` or a phrase for a mixture, for `describe`.
    pub fn mode_phrase(&self) -> String {
        let refused = self.files.iter().filter(|f| !f.direct).count();
        if !self.want_direct {
            "buffered (page cache)".into()
        } else if refused == 0 {
            DIRECT_NAME.into()
        } else if refused == self.files.len() {
            format!("buffered ({DIRECT_NAME} refused by the filesystem)")
        } else {
            format!(
                "{DIRECT_NAME} ({refused} of {} files buffered: {DIRECT_NAME} refused by their filesystem)",
                self.files.len()
            )
        }
    }
}

/// Opens `path` for reading; `direct`: bypassing the page cache, the
/// platform's way (`O_DIRECT` on Linux and Android, `F_NOCACHE` on Apple's
/// systems), `EINVAL` where the filesystem or platform has none.
#[cfg(unix)]
fn open_with(path: &Path, direct: bool) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let flags = if direct { libc::O_DIRECT } else { 0 };
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let flags = 0;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags | libc::O_CLOEXEC)
        .open(path)?;
    if direct {
        no_cache(&file)?;
    }
    Ok(file)
}

/// Windows: `FILE_FLAG_NO_BUFFERING` is the direct path (offsets, lengths
/// and buffer addresses in multiples of the volume's sector size, which
/// [`DIRECT_ALIGN`] covers), and `FILE_FLAG_OVERLAPPED` lets the pool's
/// threads read one handle at once (a synchronous handle serialises them).
#[cfg(windows)]
fn open_with(path: &Path, direct: bool) -> std::io::Result<File> {
    use std::os::windows::fs::OpenOptionsExt;
    use windows_sys::Win32::Storage::FileSystem::{FILE_FLAG_NO_BUFFERING, FILE_FLAG_OVERLAPPED};
    let mut flags = FILE_FLAG_OVERLAPPED;
    if direct {
        flags |= FILE_FLAG_NO_BUFFERING;
    }
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags)
        .open(path)
}

/// Reads up to `len` bytes at `offset` of `file` into `dst`; `Ok(0)` at
/// end of file. Through the system call rather than a `&mut [u8]` so that
/// no slice is formed over a destination the caller may not have
/// initialised.
///
/// # Safety
/// `dst..dst + len` must be valid for writes and not accessed by anyone
/// else until this returns.
#[cfg(unix)]
pub(crate) unsafe fn read_at(
    file: &File,
    dst: *mut u8,
    len: usize,
    offset: u64,
) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    // SAFETY: the caller guarantees dst..dst+len is writable and ours; the descriptor is open for the life of `file`.
    let n = unsafe { libc::pread(file.as_raw_fd(), dst.cast(), len, offset as libc::off_t) };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Windows: `ReadFile` at an explicit offset on the overlapped handle
/// [`open_with`] made, waited for on an event of this call's own (several
/// threads read one handle at once).
///
/// # Safety
/// As the Unix sibling.
#[cfg(windows)]
pub(crate) unsafe fn read_at(
    file: &File,
    dst: *mut u8,
    len: usize,
    offset: u64,
) -> std::io::Result<usize> {
    use std::os::windows::io::AsRawHandle;
    use windows_sys::Win32::Foundation::{
        CloseHandle, GetLastError, ERROR_HANDLE_EOF, ERROR_IO_PENDING,
    };
    use windows_sys::Win32::Storage::FileSystem::ReadFile;
    use windows_sys::Win32::System::Threading::CreateEventW;
    use windows_sys::Win32::System::IO::{GetOverlappedResult, OVERLAPPED};

    let handle = file.as_raw_handle();
    let len = u32::try_from(len.min(MAX_CHUNK)).unwrap_or(u32::MAX);
    // SAFETY: CreateEventW with null attributes and name makes an unnamed manual-reset event; checked below.
    let event = unsafe { CreateEventW(std::ptr::null(), 1, 0, std::ptr::null()) };
    if event.is_null() {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: OVERLAPPED is plain data; all-zero is its documented initial state.
    let mut ov: OVERLAPPED = unsafe { std::mem::zeroed() };
    ov.Anonymous.Anonymous.Offset = offset as u32;
    ov.Anonymous.Anonymous.OffsetHigh = (offset >> 32) as u32;
    ov.hEvent = event;
    let mut n = 0u32;
    // SAFETY: the caller guarantees dst..dst+len is writable and ours; `ov` and `n` outlive the operation because GetOverlappedResult waits for it below.
    let ok = unsafe { ReadFile(handle, dst, len, &mut n, &mut ov) };
    let result = if ok != 0 {
        Ok(n as usize)
    } else {
        // SAFETY: reads the calling thread's last error; no preconditions.
        match unsafe { GetLastError() } {
            ERROR_HANDLE_EOF => Ok(0),
            ERROR_IO_PENDING => {
                // SAFETY: `ov` is the operation just started on `handle`; waiting (bWait = 1) returns once it completed.
                if unsafe { GetOverlappedResult(handle, &ov, &mut n, 1) } != 0 {
                    Ok(n as usize)
                } else {
                    let e = std::io::Error::last_os_error();
                    if e.raw_os_error() == Some(ERROR_HANDLE_EOF as i32) {
                        Ok(0)
                    } else {
                        Err(e)
                    }
                }
            }
            _ => Err(std::io::Error::last_os_error()),
        }
    };
    // SAFETY: `event` is the handle made above, no longer used by the finished operation.
    unsafe { CloseHandle(event) };
    result
}

/// Apple's systems have no `O_DIRECT`: `F_NOCACHE` keeps the file's reads
/// out of the unified buffer cache instead.
#[cfg(target_vendor = "apple")]
fn no_cache(file: &File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid open descriptor; F_NOCACHE only changes caching.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_NOCACHE, 1) } == -1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn no_cache(_: &File) -> std::io::Result<()> {
    Ok(())
}

/// Elsewhere there is no direct path: reported as the filesystem refusing
/// it, so the file is read through the cache with a note.
#[cfg(all(
    unix,
    not(any(target_os = "linux", target_os = "android", target_vendor = "apple"))
))]
fn no_cache(_: &File) -> std::io::Result<()> {
    Err(std::io::Error::from_raw_os_error(libc::EINVAL))
}

/// A validated request, widened to the engine's alignment.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Plan {
    /// File offset where the (widened) read starts.
    pub start: u64,
    /// Bytes of the widened read.
    pub total: usize,
    /// Offset of the wanted bytes in the destination.
    pub skip: usize,
    /// Bytes that must be read for the wanted range to be covered: `skip + len`.
    pub needed: usize,
    /// The wanted length.
    pub len: usize,
    /// Wanted offset, for messages.
    pub offset: u64,
    /// Reads are `O_DIRECT`: a short read that is not block aligned means end
    /// of file (another read at an unaligned offset would fail with EINVAL).
    pub direct: bool,
    pub align: usize,
}

impl Plan {
    pub fn new(req: &ReadReq, align: usize, file: &OpenedFile) -> Result<Plan> {
        let align = align.max(1);
        let total = widened_len(req.offset, req.len, align);
        let bad = |why: String| {
            Error::Invalid(format!(
                "{}: read of {} bytes at offset {} (tag {}): {why}",
                file.path.display(),
                req.len,
                req.offset,
                req.tag
            ))
        };
        if req.offset.checked_add(req.len as u64).is_none() || total > isize::MAX as usize {
            return Err(bad("range out of bounds".into()));
        }
        if req.cap < total {
            return Err(bad(format!(
                "the destination holds {} bytes but the read needs {total} (alignment {align})",
                req.cap
            )));
        }
        if total > 0 && req.dst.is_null() {
            return Err(bad("null destination".into()));
        }
        if !(req.dst as usize).is_multiple_of(align) {
            return Err(bad(format!(
                "destination {:p} is not aligned to {align} bytes",
                req.dst
            )));
        }
        let skip = (req.offset % align as u64) as usize;
        Ok(Plan {
            start: req.offset - skip as u64,
            total,
            skip: if req.len == 0 { 0 } else { skip },
            needed: if req.len == 0 { 0 } else { skip + req.len },
            len: req.len,
            offset: req.offset,
            direct: file.direct,
            align,
        })
    }

    /// Decides what a read that returned `n` bytes (of `asked`), bringing the
    /// total to `done`, means.
    pub fn after_read(&self, done: usize, n: usize, asked: usize) -> Next {
        if done >= self.total || (n < asked && done >= self.needed) {
            // Complete, or a short read at end of file inside the widened
            // tail, which nobody wants.
            Next::Finished
        } else if n == 0 || (self.direct && !n.is_multiple_of(self.align)) {
            Next::Eof
        } else {
            Next::Continue
        }
    }

    /// The error for end of file before the wanted range was covered.
    pub fn eof_error(&self, path: &Path, done: usize) -> Error {
        let got = done.saturating_sub(self.skip).min(self.len);
        self.error(
            path,
            std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "unexpected end of file after {got} of the wanted {} bytes",
                    self.len
                ),
            ),
        )
    }

    /// An I/O error on this read, naming the file and the wanted range.
    pub fn error(&self, path: &Path, source: std::io::Error) -> Error {
        read_error(path, self.offset, self.len, source)
    }
}

/// What to do after a read returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Next {
    Finished,
    Continue,
    Eof,
}

/// An [`Error::Io`] for a read of `len` bytes at `offset`, keeping the
/// original error's kind (and the original as its source).
pub(crate) fn read_error(path: &Path, offset: u64, len: usize, source: std::io::Error) -> Error {
    let kind = source.kind();
    Error::io(
        path,
        std::io::Error::new(
            kind,
            ReadError {
                offset,
                len,
                source,
            },
        ),
    )
}

/// Context of a failed read: where it was.
#[derive(Debug)]
pub struct ReadError {
    offset: u64,
    len: usize,
    source: std::io::Error,
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "read of {} bytes at offset {}: {}",
            self.len, self.offset, self.source
        )
    }
}

impl std::error::Error for ReadError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(offset: u64, len: usize, align: usize, direct: bool) -> Plan {
        let file = OpenedFile {
            path: "/dev/null".into(),
            file: File::open("/dev/null").unwrap(),
            direct,
        };
        let req = ReadReq {
            file: 0,
            offset,
            len,
            dst: align as *mut u8,
            cap: usize::MAX,
            buf_index: None,
            tag: 0,
        };
        Plan::new(&req, align, &file).unwrap()
    }

    #[test]
    fn o_direct_refused_falls_back_per_file() {
        let dir = std::env::temp_dir().join(format!("sluice-fs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = (dir.join("a"), dir.join("b"));
        std::fs::write(&a, b"a").unwrap();
        std::fs::write(&b, b"b").unwrap();
        // A filesystem where only `a` allows O_DIRECT.
        let fake = |p: &Path, direct: bool| {
            if direct && p.ends_with("b") {
                Err(std::io::Error::from_raw_os_error(libc::EINVAL))
            } else {
                open_with(p, false)
            }
        };
        let mut set = FileSet::new(true);
        assert_eq!((set.direct(), set.align()), (true, DIRECT_ALIGN));
        set.open_using(&a, fake).unwrap();
        assert_eq!((set.direct(), set.align()), (true, DIRECT_ALIGN));
        assert_eq!(set.mode_phrase(), DIRECT_NAME);
        set.open_using(&b, fake).unwrap();
        // Mixed: not direct, but `a` still needs aligned reads.
        assert_eq!((set.direct(), set.align()), (false, DIRECT_ALIGN));
        let refused = format!("{DIRECT_NAME} refused");
        assert!(set.notes[0].contains(&refused), "{:?}", set.notes);
        assert!(set.mode_phrase().contains("1 of 2 files buffered"));
        drop(set);

        let mut set = FileSet::new(true);
        set.open_using(&b, fake).unwrap();
        assert_eq!((set.direct(), set.align()), (false, 1));
        assert!(set.mode_phrase().contains(&refused));
        // Other errors are errors.
        let enoent = |_: &Path, _: bool| Err(std::io::Error::from_raw_os_error(libc::ENOENT));
        assert!(matches!(set.open_using(&a, enoent), Err(Error::Io { .. })));
        // A directory: "not a regular file" (Windows refuses to open it).
        assert!(matches!(
            set.open(&std::env::temp_dir()),
            Err(Error::NotAFile { .. } | Error::Io { .. })
        ));
        // Windows keeps an open file from being deleted.
        drop(set);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn short_reads() {
        let p = plan(4096 + 32, 100, 4096, true);
        assert_eq!((p.start, p.total, p.skip, p.needed), (4096, 4096, 32, 132));
        assert_eq!(p.after_read(4096, 4096, 4096), Next::Finished);
        // EOF inside the widened tail after the wanted bytes.
        assert_eq!(p.after_read(200, 200, 4096), Next::Finished);
        assert_eq!(p.after_read(100, 100, 4096), Next::Eof);
        assert_eq!(p.after_read(0, 0, 4096), Next::Eof);
        let p = plan(0, 3 * 4096, 4096, true);
        assert_eq!(p.after_read(4096, 4096, 3 * 4096), Next::Continue);
        assert_eq!(p.after_read(4097, 4097, 3 * 4096), Next::Eof);
        let p = plan(5, 3 * 4096, 1, false);
        assert_eq!(p.after_read(4097, 4097, 3 * 4096), Next::Continue);
    }
}
