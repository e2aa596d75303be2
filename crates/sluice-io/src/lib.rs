//! Read engines of sluice: the ways expert bytes get from storage into memory.
//!
//! Three engines share one batched, completion-based interface, [`ReadEngine`]:
//!
//! * [`uring`]: `io_uring`, normally with `O_DIRECT`, registered files and
//!   registered (fixed) destination buffers. The fastest path on NVMe.
//! * [`pread`]: a pool of threads issuing `pread(2)`; the fallback where
//!   `io_uring` is disabled (containers, `kernel.io_uring_disabled`).
//! * [`mmap`]: copies out of a memory map; always through the page cache.
//!   The baseline the other two are measured against.
//!
//! With `O_DIRECT` the kernel moves whole 4 KiB-aligned blocks straight into the
//! destination, bypassing the page cache (whose memory would otherwise count
//! against the RAM cap). A wanted range that is not block aligned is therefore
//! *widened* ([`widened_len`]) and its bytes land `skip` bytes into the
//! destination ([`Done::skip`]).
//!
//! [`fault`] is a drive that fails on demand (`EIO`, short reads, delays,
//! io_uring refused), for tests.
//!
//! [`sys`] has the process-memory helpers (RSS, cgroup limits, page-cache
//! eviction) and [`probe`] measures what a drive delivers at a request size
//! and queue depth.

#![warn(missing_docs, clippy::undocumented_unsafe_blocks)]

use std::path::Path;
use std::time::Instant;

use sluice_core::{Error, Result};

mod buf;
mod common;
pub mod fault;
pub mod mmap;
pub mod pread;
pub mod probe;
pub mod sys;
#[cfg(target_os = "linux")]
pub mod uring;

/// Most reads one engine keeps queued (io_uring's submission queue limit,
/// kept on every platform so options mean the same everywhere).
pub const MAX_QUEUE_DEPTH: usize = 32768;

pub use buf::AlignedBuf;
pub use common::DIRECT_NAME;

/// Alignment of file offsets, lengths and destination addresses of direct
/// reads. 4096 covers every logical block size in common use (512 and
/// 4096) for `O_DIRECT`; on Apple's systems reads are aligned to the 16 KiB
/// pages of their storage and memory (pack with `--align 16K` there).
pub const DIRECT_ALIGN: usize = if cfg!(target_vendor = "apple") {
    16384
} else {
    4096
};

/// Which read engine to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoKind {
    /// `io_uring` (see [`uring`]).
    Uring,
    /// A thread pool issuing `pread(2)` (see [`pread`]).
    Pread,
    /// Copies out of a memory map (see [`mmap`]).
    Mmap,
}

impl IoKind {
    /// The streaming engine of this platform: io_uring on Linux, the pread
    /// pool elsewhere (with `F_NOCACHE` on macOS and iOS, overlapped reads
    /// on Windows; Android's sandbox refuses io_uring to apps).
    pub const fn platform_default() -> IoKind {
        if cfg!(target_os = "linux") {
            IoKind::Uring
        } else {
            IoKind::Pread
        }
    }

    /// The name used on the command line and in reports: `uring`, `pread`, `mmap`.
    pub fn name(self) -> &'static str {
        match self {
            IoKind::Uring => "uring",
            IoKind::Pread => "pread",
            IoKind::Mmap => "mmap",
        }
    }

    /// Parses a name as written by [`IoKind::name`]; `io_uring` is accepted
    /// too since that is what people call it.
    pub fn parse(s: &str) -> Option<IoKind> {
        match s.trim().to_ascii_lowercase().as_str() {
            "uring" | "io_uring" => Some(IoKind::Uring),
            "pread" => Some(IoKind::Pread),
            "mmap" => Some(IoKind::Mmap),
            _ => None,
        }
    }
}

impl std::fmt::Display for IoKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How to open a read engine.
#[derive(Clone, Debug)]
pub struct EngineOptions {
    /// The engine wanted; [`open_engine`] may fall back from `Uring` to `Pread`.
    pub kind: IoKind,
    /// Open files with `O_DIRECT` (bypassing the page cache). Ignored by
    /// [`IoKind::Mmap`], which always reads through the page cache.
    pub direct: bool,
    /// Most reads handed to the kernel at once: the `io_uring` submission
    /// queue size, or the number of jobs the pread pool works on at once.
    /// More requests than this may be submitted; they wait in the engine.
    pub queue_depth: usize,
    /// Worker threads of the pread pool.
    pub threads: usize,
    /// Use `io_uring` registered files and buffers when the kernel permits.
    pub register: bool,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            kind: IoKind::platform_default(),
            direct: true,
            queue_depth: 16,
            threads: 8,
            register: true,
        }
    }
}

/// A file opened by [`ReadEngine::open`]: an index into the engine's files.
pub type FileId = usize;

/// One read.
///
/// The engine reads at least `offset..offset + len` of `file` into `dst`. When
/// the engine is aligned ([`ReadEngine::align`] > 1, i.e. `O_DIRECT`), it widens
/// the read to `align_down(offset) .. align_up(offset + len)` and the wanted
/// bytes land at `dst + skip`, with `skip = offset - align_down(offset)`
/// reported in [`Done`]. Reading past the end of the file in the widened tail
/// is fine: a short read succeeds once the wanted range is covered.
#[derive(Clone, Copy, Debug)]
pub struct ReadReq {
    /// The file, as returned by [`ReadEngine::open`].
    pub file: FileId,
    /// Byte offset of the wanted range in the file.
    pub offset: u64,
    /// Length of the wanted range.
    pub len: usize,
    /// Where the (widened) read goes. Must be aligned to [`ReadEngine::align`].
    pub dst: *mut u8,
    /// Bytes available at `dst`; must be at least
    /// `widened_len(offset, len, engine.align())` or the engine refuses the
    /// request with [`Error::Invalid`].
    pub cap: usize,
    /// Index of the buffer, among those given to
    /// [`ReadEngine::register_buffers`], that holds `dst..dst + cap`. Lets
    /// `io_uring` use fixed-buffer reads (no per-read page pinning).
    pub buf_index: Option<u32>,
    /// Caller's identifier, returned in the [`Completion`].
    pub tag: u64,
}

// SAFETY: a ReadReq is plain data; the pointer is only dereferenced by an engine
// under the contract of `ReadEngine::submit`, which makes the caller guarantee
// exclusive access to the destination until the completion is returned,
// whichever thread does the writing.
unsafe impl Send for ReadReq {}

fn align_down(x: u64, align: u64) -> u64 {
    x - x % align
}

/// The room a destination needs for a wanted read of `len` bytes at `offset`
/// under alignment `align` (1 when not direct): the length of
/// `align_down(offset) .. align_up(offset + len)`. Zero for an empty read.
/// Saturates instead of overflowing for absurd inputs (which the engines then
/// refuse).
pub fn widened_len(offset: u64, len: usize, align: usize) -> usize {
    if len == 0 {
        return 0;
    }
    let a = align.max(1) as u64;
    let start = align_down(offset, a);
    let Some(end) = offset.checked_add(len as u64) else {
        return usize::MAX;
    };
    let end_up = match end % a {
        0 => end,
        r => match end.checked_add(a - r) {
            Some(e) => e,
            None => return usize::MAX,
        },
    };
    usize::try_from(end_up - start).unwrap_or(usize::MAX)
}

/// An upper bound of [`widened_len`] over every offset: `len` rounded up to
/// `align`, plus `align`. For sizing destination slots before offsets are
/// known. With `align <= 1` nothing is widened and this is `len`.
pub fn max_widened_len(len: usize, align: usize) -> usize {
    if align <= 1 {
        return len;
    }
    let rounded = match len % align {
        0 => len,
        r => len.saturating_add(align - r),
    };
    rounded.saturating_add(align)
}

/// The result of one [`ReadReq`].
#[derive(Debug)]
pub struct Completion {
    /// The request's [`ReadReq::tag`].
    pub tag: u64,
    /// What was read, or why not: an I/O error ([`Error::Io`] naming the file,
    /// with the offset in the message), including an unexpected end of file
    /// before the wanted range was covered.
    pub result: Result<Done>,
    /// When the request was handed to [`ReadEngine::submit`].
    pub submitted: Instant,
    /// When the engine saw it finish.
    pub completed: Instant,
}

impl Completion {
    /// Time from submission to completion, in seconds.
    pub fn latency_s(&self) -> f64 {
        self.completed
            .saturating_duration_since(self.submitted)
            .as_secs_f64()
    }
}

/// A successful read. Engines only report success once the wanted range is
/// covered ([`Done::covers_wanted`]); callers check it all the same, so that a
/// faulty engine yields an error instead of half-filled memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Done {
    /// Offset in the destination of the first wanted byte.
    pub skip: usize,
    /// Length of the wanted range (the request's `len`).
    pub len: usize,
    /// Bytes physically read, including widening (may stop short of the
    /// widened end at end of file).
    pub bytes_read: usize,
}

impl Done {
    /// Whether the bytes read reach the end of the wanted range
    /// (`bytes_read >= skip + len`).
    pub fn covers_wanted(&self) -> bool {
        self.bytes_read >= self.skip.saturating_add(self.len)
    }
}

/// A batched, completion-based reader of files.
///
/// Reads are queued with [`submit`](ReadEngine::submit) and their
/// [`Completion`]s collected with [`wait`](ReadEngine::wait) or
/// [`poll`](ReadEngine::poll), in any order.
pub trait ReadEngine: Send {
    /// The engine actually in use (after any fallback).
    fn kind(&self) -> IoKind;

    /// One line for the user, e.g. `io_uring, O_DIRECT, queue depth 16,
    /// registered files, registered buffers`; states fallbacks.
    fn describe(&self) -> String;

    /// Whether reads bypass the page cache: `O_DIRECT` was asked for and every
    /// opened file got it.
    fn direct(&self) -> bool;

    /// Alignment this engine needs of destinations, and to which it widens
    /// reads: [`DIRECT_ALIGN`] while any opened file is `O_DIRECT` (or, before
    /// any file is opened, when `O_DIRECT` was asked for), else 1. Query it after
    /// opening the files.
    fn align(&self) -> usize;

    /// Opens a file for reading. When the filesystem refuses `O_DIRECT`
    /// (`EINVAL`, e.g. tmpfs), opens it buffered and records a note.
    fn open(&mut self, path: &Path) -> Result<FileId>;

    /// Takes ownership of the destination buffers reads will land in and,
    /// where the engine supports it and [`EngineOptions::register`] allows,
    /// registers them with the kernel (`io_uring` fixed buffers, read with
    /// `READ_FIXED`). Returns whether they were registered: `Ok(false)` when
    /// the engine does not support it or the kernel refuses (e.g.
    /// `RLIMIT_MEMLOCK`), recording a note in the latter case.
    ///
    /// The engine keeps the buffers until it is dropped, after its last read
    /// has completed, so memory the kernel may write to (or has pinned) cannot
    /// be freed under it: the type system, not a comment, keeps them alive.
    /// Requests name them by index ([`ReadReq::buf_index`], in the order
    /// given) and address them with pointers taken before handing them over
    /// ([`AlignedBuf::as_mut_ptr`]; moving an `AlignedBuf` does not move its
    /// memory). A later call replaces (and frees) them, which needs an idle
    /// engine: with reads in flight it fails with [`Error::EngineBusy`].
    fn register_buffers(&mut self, bufs: Vec<AlignedBuf>) -> Result<bool>;

    /// Queues reads. Either every request is accepted or none is (a request
    /// that is invalid for this engine fails the whole call with
    /// [`Error::Invalid`], or [`Error::NoSuchFile`] for a file it has not
    /// opened).
    ///
    /// # Safety
    ///
    /// For each request, `dst..dst + cap` must be valid for writes and neither
    /// read nor written by anyone else until its [`Completion`] has been
    /// returned by [`wait`](ReadEngine::wait)/[`poll`](ReadEngine::poll) or the
    /// engine has been dropped (dropping waits for reads in flight).
    unsafe fn submit(&mut self, reqs: &[ReadReq]) -> Result<()>;

    /// Blocks until at least `min` completions (capped at
    /// [`in_flight`](ReadEngine::in_flight)) have been appended to `out`; may
    /// append more. On error, completions already appended are still
    /// returned (their destinations are released).
    fn wait(&mut self, min: usize, out: &mut Vec<Completion>) -> Result<()>;

    /// Appends the completions that are finished, without blocking.
    fn poll(&mut self, out: &mut Vec<Completion>) -> Result<()>;

    /// Reads submitted whose completions have not been returned yet.
    fn in_flight(&self) -> usize;

    /// Fallbacks and notable conditions, for the user.
    fn notes(&self) -> Vec<String>;

    /// Path of an opened file, for messages.
    ///
    /// # Panics
    ///
    /// If `file` was not returned by [`open`](ReadEngine::open) on this engine.
    fn path(&self, file: FileId) -> &Path;

    /// The drive's timing, where this engine sets it (reads paced on a
    /// simulated device's clock); `None` (the default) for a real drive,
    /// whose timing the caller measures on the wall clock.
    fn pace(&self) -> Option<Pace> {
        None
    }
}

/// A drive's timing, in seconds on one clock: a paced engine's (see
/// [`ReadEngine::pace`]), or a caller's estimate of a real drive.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Pace {
    /// The clock now.
    pub now_s: f64,
    /// When every read submitted so far will be in.
    pub drained_s: f64,
    /// The drive's read rate.
    pub bytes_per_s: f64,
    /// What each read pays before its bytes move.
    pub latency_s: f64,
}

/// Opens an engine of `opts.kind`.
///
/// When `io_uring` is refused (`kernel.io_uring_disabled=2`, or
/// `io_uring_setup` failing with `EPERM`/`ENOSYS`/a seccomp filter), falls back
/// to the pread pool with the same `O_DIRECT` setting and a note saying why.
/// Fails with [`Error::Invalid`] on a zero queue depth or thread count.
pub fn open_engine(opts: &EngineOptions) -> Result<Box<dyn ReadEngine>> {
    open_with(opts, None)
}

/// [`open_engine`], with `faults` injected below the trait where given
/// (see [`fault::open_engine`]).
pub(crate) fn open_with(
    opts: &EngineOptions,
    faults: Option<&fault::Faults>,
) -> Result<Box<dyn ReadEngine>> {
    if opts.queue_depth == 0 || opts.queue_depth > MAX_QUEUE_DEPTH {
        return Err(Error::Invalid(format!(
            "queue depth {} out of range 1..={}",
            opts.queue_depth, MAX_QUEUE_DEPTH
        )));
    }
    if opts.threads == 0 {
        return Err(Error::Invalid(
            "the pread pool needs at least one thread".into(),
        ));
    }
    let short = faults.filter(|f| f.plan().short > 0.0).cloned();
    let pread = |opts: &EngineOptions| -> Result<pread::PreadEngine> {
        let mut e = pread::PreadEngine::new(opts)?;
        e.short = short.clone();
        Ok(e)
    };
    Ok(match opts.kind {
        IoKind::Uring => {
            let ring = match faults {
                Some(f) if f.plan().refuse_uring => Err(fault::refusal()),
                _ => open_uring(opts),
            };
            match ring {
                Ok(mut e) => {
                    e.short = short.clone();
                    Box::new(e)
                }
                Err(reason) => {
                    let mut e = pread(opts)?;
                    e.set_fallback(fallback_note(&reason));
                    Box::new(e)
                }
            }
        }
        IoKind::Pread => Box::new(pread(opts)?),
        IoKind::Mmap => Box::new(mmap::MmapEngine::new(opts)),
    })
}

#[cfg(target_os = "linux")]
fn open_uring(opts: &EngineOptions) -> Result<uring::UringEngine> {
    uring::UringEngine::new(opts)
}

/// io_uring is a Linux interface: elsewhere the pread pool stands in, and
/// the note says why. Android's kernel has it, but the app sandbox's
/// seccomp filter refuses `io_uring_setup` to apps, so it is not tried.
#[cfg(not(target_os = "linux"))]
fn open_uring(_: &EngineOptions) -> Result<pread::PreadEngine> {
    Err(Error::Unsupported(if cfg!(target_os = "android") {
        "Android's app sandbox refuses io_uring_setup".into()
    } else {
        format!("io_uring is Linux-only, this is {}", std::env::consts::OS)
    }))
}

/// Why the pread pool stands in for io_uring, for the user.
fn fallback_note(reason: &Error) -> String {
    let reason = match reason {
        Error::Unsupported(m) => m.clone(),
        e => e.to_string(),
    };
    format!("io_uring refused ({reason}); using the pread pool")
}

/// Reads exactly `offset..offset + len` of `file` into a fresh buffer, sized
/// and aligned for the engine, and returns it with the offset of the wanted
/// bytes in it: they are `buf[skip..skip + len]`.
///
/// For one-off reads (headers, tests); the engine must be idle
/// ([`ReadEngine::in_flight`] = 0), else [`Error::EngineBusy`].
pub fn read_exact(
    engine: &mut dyn ReadEngine,
    file: FileId,
    offset: u64,
    len: usize,
) -> Result<(AlignedBuf, usize)> {
    if engine.in_flight() != 0 {
        return Err(Error::EngineBusy {
            op: "read_exact",
            in_flight: engine.in_flight(),
        });
    }
    let align = engine.align();
    let mut buf = AlignedBuf::new(widened_len(offset, len, align), align)?;
    let req = ReadReq {
        file,
        offset,
        len,
        dst: buf.as_mut_ptr(),
        cap: buf.len(),
        buf_index: None,
        tag: 0,
    };
    // SAFETY: `buf` is exclusively ours and outlives the read: we wait for the only read in flight below before returning or dropping it; if waiting fails we leak the buffer rather than free memory the kernel may write.
    unsafe { engine.submit(&[req])? };
    let mut out = Vec::with_capacity(1);
    while out.is_empty() {
        if let Err(e) = engine.wait(1, &mut out) {
            std::mem::forget(buf);
            return Err(e);
        }
    }
    let done = out.pop().expect("one completion").result?;
    if !done.covers_wanted() {
        return Err(short_completion(engine.path(file), offset, len, &done));
    }
    Ok((buf, done.skip))
}

/// The error for a completion that reported success without covering the
/// wanted range (an engine breaking its contract): never use such bytes.
pub fn short_completion(path: &Path, offset: u64, len: usize, done: &Done) -> Error {
    common::read_error(
        path,
        offset,
        len,
        std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!(
                "the engine reported success after {} of the wanted {len} bytes",
                done.bytes_read.saturating_sub(done.skip)
            ),
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_names_round_trip() {
        for k in [IoKind::Uring, IoKind::Pread, IoKind::Mmap] {
            assert_eq!(IoKind::parse(k.name()), Some(k));
        }
        assert_eq!(IoKind::parse("io_uring"), Some(IoKind::Uring));
        assert_eq!(IoKind::parse("aio"), None);
    }

    #[test]
    fn widening_examples() {
        assert_eq!(widened_len(0, 4096, 4096), 4096);
        assert_eq!(widened_len(32, 4096, 4096), 8192);
        assert_eq!(widened_len(4095, 1, 4096), 4096);
        assert_eq!(widened_len(4095, 2, 4096), 8192);
        assert_eq!(widened_len(100, 7, 1), 7);
        assert_eq!(widened_len(100, 0, 4096), 0);
        assert_eq!(max_widened_len(4096, 4096), 8192);
        assert_eq!(max_widened_len(1, 4096), 8192);
        assert_eq!(max_widened_len(7, 1), 7);
        assert_eq!(widened_len(u64::MAX - 1, 10, 4096), usize::MAX);
    }

    #[test]
    fn invalid_options_are_refused() {
        let bad = EngineOptions {
            queue_depth: 0,
            ..EngineOptions::default()
        };
        assert!(matches!(open_engine(&bad), Err(Error::Invalid(_))));
        let bad = EngineOptions {
            threads: 0,
            ..EngineOptions::default()
        };
        assert!(matches!(open_engine(&bad), Err(Error::Invalid(_))));
    }

    /// Reads longer than one kernel read are continued where they stopped.
    #[test]
    fn long_reads_continue_in_chunks() {
        let path = std::env::temp_dir().join(format!("sluice-chunks-{}", std::process::id()));
        let mut rng = fastrand::Rng::with_seed(3);
        let data: Vec<u8> = (0..200_000).map(|_| rng.u8(..)).collect();
        std::fs::write(&path, &data).unwrap();
        for direct in [true, false] {
            let opts = EngineOptions {
                direct,
                queue_depth: 2,
                threads: 2,
                ..EngineOptions::default()
            };
            let mut engines: Vec<Box<dyn ReadEngine>> = Vec::new();
            let mut p = pread::PreadEngine::new(&opts).unwrap();
            p.max_chunk = 8192;
            engines.push(Box::new(p));
            #[cfg(target_os = "linux")]
            match uring::UringEngine::new(&opts) {
                Ok(mut u) => {
                    u.max_chunk = 8192;
                    engines.push(Box::new(u));
                }
                Err(e) => eprintln!("io_uring unavailable, not tested: {e}"),
            }
            for mut e in engines {
                e.open(&path).unwrap();
                eprintln!("{} ({:?})", e.describe(), e.notes());
                for (off, len) in [(123u64, 150_000usize), (0, 200_000), (190_001, 9_999)] {
                    let (buf, skip) = read_exact(e.as_mut(), 0, off, len).unwrap();
                    let off = off as usize;
                    assert!(buf[skip..skip + len] == data[off..off + len], "{off}+{len}");
                }
                let err = read_exact(e.as_mut(), 0, 100_000, 100_001).unwrap_err();
                assert!(err.to_string().contains("unexpected end of file"), "{err}");
            }
        }
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn fallback_engine_says_why() {
        let opts = EngineOptions {
            kind: IoKind::Uring,
            ..EngineOptions::default()
        };
        let faults = fault::Faults::new(fault::FaultPlan {
            refuse_uring: true,
            ..Default::default()
        });
        let e = open_with(&opts, Some(&faults)).unwrap();
        assert_eq!(e.kind(), IoKind::Pread);
        assert!(e.notes().iter().any(|n| n.contains("io_uring refused")));
        assert!(
            e.describe().contains("io_uring refused"),
            "{}",
            e.describe()
        );
        assert!(e.direct());
    }
}
