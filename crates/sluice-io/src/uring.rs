//! The io_uring engine.
//!
//! One ring per engine; reads are pushed as submission entries, up to
//! `queue_depth` in the kernel at once, and handed to the kernel with one
//! `io_uring_enter` per [`ReadEngine::submit`]. Requests beyond the queue depth
//! wait in the engine and go in as completions free room. Files are
//! registered in a sparse table (saving the kernel a file-table lookup and
//! reference count per read) and destination buffers may be registered too,
//! so that reads into them use `READ_FIXED` (no page pinning per read).
//!
//! A read that comes back short is resubmitted for the remainder; under
//! `O_DIRECT` a short read only happens at end of file, which is success if the
//! wanted range is already covered.

use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Instant;

use io_uring::{opcode, squeue, types, IoUring};
use sluice_core::{Error, Result};

use crate::common::{FileSet, Next, Plan, MAX_CHUNK};
use crate::fault::Faults;
use crate::{AlignedBuf, Completion, Done, EngineOptions, FileId, IoKind, ReadEngine, ReadReq};

/// Largest queue depth accepted (the kernel's limit on submission entries).
pub use crate::MAX_QUEUE_DEPTH;

/// Most slots in the sparse registered-file table. Files opened beyond it are
/// used by descriptor.
const FILE_SLOTS: u32 = 1024;

/// Slots for the registered-file table: the kernel refuses a table larger than
/// the soft `RLIMIT_NOFILE`.
fn file_slots() -> u32 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct we pass.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    if rc != 0 {
        return 64;
    }
    FILE_SLOTS.min(u32::try_from(lim.rlim_cur).unwrap_or(u32::MAX))
}

/// The kernel's limits on fixed buffers: count and size of each.
const MAX_FIXED_BUFFERS: usize = 1 << 14;
const MAX_FIXED_BUFFER_LEN: usize = 1 << 30;

/// A request accepted by `submit` and not yet returned.
struct Slot {
    req: ReadReq,
    plan: Plan,
    /// Bytes read so far (from `plan.start`).
    done: usize,
    /// Length of the read currently in the kernel.
    asked: usize,
    submitted: Instant,
}

/// Reads with io_uring. See the [module docs](self).
pub struct UringEngine {
    // Declared first so that it is dropped before the files and buffers it
    // refers to (Drop has already waited for every read by then).
    ring: IoUring,
    files: FileSet,
    /// For each file, its slot in the registered-file table, if it has one.
    fixed_files: Vec<Option<u32>>,
    /// Whether the sparse file table was registered.
    files_registered: bool,
    /// Its size.
    file_slots: u32,
    /// Registered buffers as (start address, length), indexed by buffer index.
    fixed_bufs: Vec<(usize, usize)>,
    /// The destination buffers handed over by the caller, registered or not.
    /// Owned here so that they outlive every read and the registration: they
    /// are dropped after the ring (declared before them), and `Drop` has
    /// waited for the reads in flight by then.
    bufs: Vec<AlignedBuf>,
    register: bool,
    slab: Vec<Option<Slot>>,
    free: Vec<usize>,
    /// Slots accepted but not yet in the kernel (queue depth reached).
    pending: VecDeque<usize>,
    /// Finished, not yet returned.
    ready: VecDeque<Completion>,
    /// Reads in the kernel (each has exactly one entry in the SQ or kernel).
    active: usize,
    /// Submitted and not yet returned to the caller.
    queued: usize,
    queue_depth: usize,
    notes: Vec<String>,
    cqes: Vec<(u64, i32)>,
    /// Largest single read; smaller in tests to exercise continuation.
    pub(crate) max_chunk: usize,
    /// Shortens completions as a kernel may ([`crate::fault`]); `None`
    /// outside tests.
    pub(crate) short: Option<Faults>,
}

/// Why io_uring cannot be used here, if `/proc/sys/kernel/io_uring_disabled`
/// says so outright (2). With 1 only privileged processes may create rings,
/// so we just try.
fn disabled_by_sysctl() -> Option<String> {
    let v = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled").ok()?;
    (v.trim() == "2").then(|| "kernel.io_uring_disabled=2".to_string())
}

impl UringEngine {
    /// Creates the ring. Fails with [`Error::Unsupported`] saying why when the
    /// kernel refuses io_uring (disabled by sysctl, `EPERM` from a seccomp
    /// filter or container runtime, `ENOSYS` on old kernels).
    pub fn new(opts: &EngineOptions) -> Result<UringEngine> {
        if opts.queue_depth == 0 || opts.queue_depth > MAX_QUEUE_DEPTH {
            return Err(Error::Invalid(format!(
                "queue depth {} out of range 1..={MAX_QUEUE_DEPTH}",
                opts.queue_depth
            )));
        }
        if let Some(why) = disabled_by_sysctl() {
            return Err(Error::Unsupported(format!("io_uring: {why}")));
        }
        let entries = opts.queue_depth.next_power_of_two() as u32;
        let ring = IoUring::new(entries).map_err(|e| {
            let sysctl = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
                .map(|v| format!(", kernel.io_uring_disabled={}", v.trim()))
                .unwrap_or_default();
            Error::Unsupported(format!("io_uring_setup: {e}{sysctl}"))
        })?;
        let mut notes = Vec::new();
        let mut files_registered = false;
        let file_slots = file_slots();
        if opts.register {
            match ring.submitter().register_files_sparse(file_slots) {
                Ok(()) => files_registered = true,
                Err(e) => notes.push(format!(
                    "io_uring registered files refused ({e}); using plain file descriptors"
                )),
            }
        }
        Ok(UringEngine {
            ring,
            files: FileSet::new(opts.direct),
            fixed_files: Vec::new(),
            files_registered,
            file_slots,
            fixed_bufs: Vec::new(),
            bufs: Vec::new(),
            register: opts.register,
            slab: Vec::new(),
            free: Vec::new(),
            pending: VecDeque::new(),
            ready: VecDeque::new(),
            active: 0,
            queued: 0,
            queue_depth: opts.queue_depth,
            notes,
            cqes: Vec::new(),
            max_chunk: MAX_CHUNK,
            short: None,
        })
    }

    /// Whether reads go into registered buffers when the request names one.
    pub fn buffers_registered(&self) -> bool {
        !self.fixed_bufs.is_empty()
    }

    fn alloc_slot(&mut self, slot: Slot) -> usize {
        match self.free.pop() {
            Some(i) => {
                self.slab[i] = Some(slot);
                i
            }
            None => {
                self.slab.push(Some(slot));
                self.slab.len() - 1
            }
        }
    }

    /// Pushes the next read of slot `idx` into the submission queue. Returns
    /// false (and changes nothing) when the queue is full.
    fn push_read(&mut self, idx: usize) -> bool {
        let slot = self.slab[idx].as_mut().expect("live slot");
        let offset = slot.plan.start + slot.done as u64;
        let len = (slot.plan.total - slot.done).min(self.max_chunk);
        // SAFETY: done < total <= cap, so the pointer stays inside the destination the submitter lent us.
        let buf = unsafe { slot.req.dst.add(slot.done) };
        let fixed_buf = match slot.req.buf_index {
            Some(i) if !self.fixed_bufs.is_empty() => Some(i as u16),
            _ => None,
        };
        let fd = self.files.files[slot.req.file].file.as_raw_fd();
        let fixed_file = self.fixed_files[slot.req.file];
        let len32 = len as u32;
        let entry: squeue::Entry = match (fixed_file, fixed_buf) {
            (Some(f), Some(b)) => opcode::ReadFixed::new(types::Fixed(f), buf, len32, b)
                .offset(offset)
                .build(),
            (None, Some(b)) => opcode::ReadFixed::new(types::Fd(fd), buf, len32, b)
                .offset(offset)
                .build(),
            (Some(f), None) => opcode::Read::new(types::Fixed(f), buf, len32)
                .offset(offset)
                .build(),
            (None, None) => opcode::Read::new(types::Fd(fd), buf, len32)
                .offset(offset)
                .build(),
        };
        let entry = entry.user_data(idx as u64);
        // SAFETY: the entry's buffer is valid for `len` bytes of writes until its completion (submit's contract), the file stays open as long as the engine, and Drop waits for the completion before anything the entry refers to can go away.
        let pushed = unsafe { self.ring.submission().push(&entry) }.is_ok();
        if pushed {
            slot.asked = len;
            self.active += 1;
        }
        pushed
    }

    /// Moves pending requests into the submission queue while the queue
    /// depth allows.
    fn fill(&mut self) {
        while self.active < self.queue_depth {
            let Some(idx) = self.pending.pop_front() else {
                break;
            };
            if !self.push_read(idx) {
                self.pending.push_front(idx);
                break;
            }
        }
    }

    /// Hands queued entries to the kernel and, with `want > 0`, waits for that
    /// many completions. Transient refusals are left for the next call.
    fn enter(&mut self, want: usize) -> Result<()> {
        let r = if want > 0 {
            self.ring.submit_and_wait(want)
        } else if self.ring.submission().is_empty() {
            return Ok(());
        } else {
            self.ring.submit()
        };
        match r {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(Error::io("io_uring", e)),
        }
    }

    /// Processes the completion queue. With `closing`, nothing is resubmitted.
    fn reap(&mut self, closing: bool) {
        let mut cqes = std::mem::take(&mut self.cqes);
        cqes.clear();
        cqes.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
        for &(user_data, res) in &cqes {
            self.active -= 1;
            let idx = user_data as usize;
            if closing {
                self.slab[idx] = None;
                continue;
            }
            self.on_cqe(idx, res);
        }
        self.cqes = cqes;
        if !closing {
            self.fill();
        }
    }

    fn on_cqe(&mut self, idx: usize, res: i32) {
        let slot = self.slab[idx].as_mut().expect("completion of a live slot");
        let path = &self.files.files[slot.req.file].path;
        let outcome = if res < 0 {
            let errno = -res;
            if errno == libc::EINTR || errno == libc::EAGAIN {
                None
            } else {
                Some(Err(slot
                    .plan
                    .error(path, std::io::Error::from_raw_os_error(errno))))
            }
        } else {
            let n = res as usize;
            let n = self
                .short
                .as_ref()
                .map_or(n, |f| f.shorten(n, slot.plan.align));
            slot.done += n;
            match slot.plan.after_read(slot.done, n, slot.asked) {
                Next::Finished => Some(Ok(Done {
                    skip: slot.plan.skip,
                    len: slot.plan.len,
                    bytes_read: slot.done,
                })),
                Next::Eof => Some(Err(slot.plan.eof_error(path, slot.done))),
                Next::Continue => None,
            }
        };
        match outcome {
            Some(result) => {
                let slot = self.slab[idx].take().expect("live slot");
                self.free.push(idx);
                self.ready.push_back(Completion {
                    tag: slot.req.tag,
                    result,
                    submitted: slot.submitted,
                    completed: Instant::now(),
                });
            }
            None => {
                // The remainder keeps the place in the queue depth this read
                // already had, ahead of requests that have not started.
                if !self.push_read(idx) {
                    self.pending.push_front(idx);
                }
            }
        }
    }

    fn take_ready(&mut self, out: &mut Vec<Completion>) -> usize {
        let n = self.ready.len();
        out.extend(self.ready.drain(..));
        self.queued -= n;
        n
    }

    /// Checks a request's registered buffer, if it names one and buffers are
    /// registered: the kernel would fail the read otherwise, later and less
    /// clearly.
    fn check_fixed(&self, req: &ReadReq, plan: &Plan) -> Result<()> {
        let Some(i) = req.buf_index else {
            return Ok(());
        };
        if self.fixed_bufs.is_empty() {
            return Ok(());
        }
        let start = req.dst as usize;
        let end = start + plan.total;
        match self.fixed_bufs.get(i as usize) {
            Some(&(b, len)) if start >= b && end <= b + len => Ok(()),
            Some(_) => Err(Error::Invalid(format!(
                "read (tag {}) into {:#x}..{end:#x} lies outside registered buffer {i}",
                req.tag, start
            ))),
            None => Err(Error::Invalid(format!(
                "read (tag {}) names registered buffer {i}, but {} are registered",
                req.tag,
                self.fixed_bufs.len()
            ))),
        }
    }
}

impl ReadEngine for UringEngine {
    fn kind(&self) -> IoKind {
        IoKind::Uring
    }

    fn describe(&self) -> String {
        let files = if self.files_registered {
            "registered files"
        } else {
            "plain file descriptors"
        };
        let bufs = if self.buffers_registered() {
            "registered buffers"
        } else {
            "unregistered buffers"
        };
        format!(
            "io_uring, {}, queue depth {}, {files}, {bufs}",
            self.files.mode_phrase(),
            self.queue_depth
        )
    }

    fn direct(&self) -> bool {
        self.files.direct()
    }

    fn align(&self) -> usize {
        self.files.align()
    }

    fn open(&mut self, path: &Path) -> Result<FileId> {
        let id = self.files.open(path)?;
        let mut fixed = None;
        if self.files_registered && id < self.file_slots as usize {
            let fd = self.files.files[id].file.as_raw_fd();
            match self
                .ring
                .submitter()
                .register_files_update(id as u32, &[fd])
            {
                Ok(_) => fixed = Some(id as u32),
                Err(e) => self.notes.push(format!(
                    "{}: io_uring file registration refused ({e}); using its descriptor",
                    path.display()
                )),
            }
        }
        self.fixed_files.push(fixed);
        Ok(id)
    }

    fn register_buffers(&mut self, bufs: Vec<AlignedBuf>) -> Result<bool> {
        if self.queued != 0 {
            return Err(Error::EngineBusy {
                op: "registering buffers",
                in_flight: self.queued,
            });
        }
        if !self.fixed_bufs.is_empty() {
            // Unregistering waits for nothing: no reads are in flight.
            let _ = self.ring.submitter().unregister_buffers();
            self.fixed_bufs.clear();
        }
        // The old buffers go only now, after their registration.
        self.bufs = bufs;
        if !self.register || self.bufs.is_empty() {
            return Ok(false);
        }
        if self.bufs.len() > MAX_FIXED_BUFFERS
            || self.bufs.iter().any(|b| b.len() > MAX_FIXED_BUFFER_LEN)
        {
            self.notes.push(format!(
                "io_uring registered buffers not used: at most {MAX_FIXED_BUFFERS} buffers of at most 1 GiB each can be registered"
            ));
            return Ok(false);
        }
        let iovecs: Vec<libc::iovec> = self
            .bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        // SAFETY: the regions are the buffers in `self.bufs`, which the engine owns and frees only after the ring is closed (field order, after Drop has waited for every read) or after unregistering them above.
        match unsafe { self.ring.submitter().register_buffers(&iovecs) } {
            Ok(()) => {
                self.fixed_bufs = iovecs
                    .iter()
                    .map(|v| (v.iov_base as usize, v.iov_len))
                    .collect();
                Ok(true)
            }
            Err(e) => {
                let hint = if e.raw_os_error() == Some(libc::ENOMEM) {
                    " (RLIMIT_MEMLOCK too low? see `ulimit -l`)"
                } else {
                    ""
                };
                self.notes.push(format!(
                    "io_uring registered buffers refused: {e}{hint}; using plain reads"
                ));
                Ok(false)
            }
        }
    }

    unsafe fn submit(&mut self, reqs: &[ReadReq]) -> Result<()> {
        let mut plans = Vec::with_capacity(reqs.len());
        for req in reqs {
            let plan = self.files.plan(req)?;
            self.check_fixed(req, &plan)?;
            plans.push(plan);
        }
        let submitted = Instant::now();
        for (req, plan) in reqs.iter().zip(plans) {
            if plan.total == 0 {
                self.ready.push_back(Completion {
                    tag: req.tag,
                    result: Ok(Done {
                        skip: 0,
                        len: 0,
                        bytes_read: 0,
                    }),
                    submitted,
                    completed: submitted,
                });
                continue;
            }
            let idx = self.alloc_slot(Slot {
                req: *req,
                plan,
                done: 0,
                asked: 0,
                submitted,
            });
            self.pending.push_back(idx);
        }
        self.queued += reqs.len();
        self.fill();
        // The requests are accepted now, so an error here must not be
        // returned (the caller would take them for refused and free their
        // buffers); the entries stay queued and `wait` reports a persistent
        // failure.
        let _ = self.enter(0);
        Ok(())
    }

    fn wait(&mut self, min: usize, out: &mut Vec<Completion>) -> Result<()> {
        let want = min.min(self.queued);
        let mut got = self.take_ready(out);
        while got < want {
            self.reap(false);
            if self.ready.is_empty() {
                if self.active == 0 {
                    return Err(Error::Invalid(
                        "io_uring engine: completions awaited but no read is in flight".into(),
                    ));
                }
                self.enter(1)?;
                self.reap(false);
            }
            got += self.take_ready(out);
        }
        // Resubmissions made while reaping must reach the kernel even if the
        // caller does not come back for a while. Best effort: `out` holds
        // completions the caller must see, and a persistent failure shows up
        // in the next wait.
        let _ = self.enter(0);
        Ok(())
    }

    fn poll(&mut self, out: &mut Vec<Completion>) -> Result<()> {
        self.reap(false);
        self.take_ready(out);
        let _ = self.enter(0);
        Ok(())
    }

    fn in_flight(&self) -> usize {
        self.queued
    }

    fn notes(&self) -> Vec<String> {
        self.notes
            .iter()
            .chain(self.files.notes.iter())
            .cloned()
            .collect()
    }

    fn path(&self, file: FileId) -> &Path {
        &self.files.files[file].path
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        // Reads in the kernel write into memory the caller frees as soon as
        // we return: wait for every one. Pending ones never started.
        self.pending.clear();
        while self.active > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                    ) => {}
                Err(e) => {
                    // Returning would let the kernel write into freed memory.
                    eprintln!(
                        "sluice-io: io_uring wait failed with reads in flight ({e}); aborting"
                    );
                    std::process::abort();
                }
            }
            self.reap(true);
        }
    }
}
