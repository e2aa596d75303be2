//! Fault injection for tests: a drive that fails.
//!
//! Drives return `EIO`, the kernel may return fewer bytes than asked, reads
//! are slow, and `io_uring` may be refused by the kernel or a container.
//! This module makes each of those happen on demand, seeded, so that tests
//! can show what sluice does about them:
//!
//! * [`FaultEngine`] wraps any [`ReadEngine`] and fails requests with `EIO`
//!   (the error a real engine gives, naming the file and range), delays
//!   completions, or hands back *torn* completions: success reported for a
//!   read that covered only part of the wanted range, the contract breach a
//!   caller must catch instead of using half-filled memory.
//! * [`open_engine`] opens a real engine the way [`crate::open_engine`] does,
//!   with two faults that live below the trait: *short reads* (each read
//!   syscall or io_uring completion may report fewer bytes than asked, as
//!   the kernel may, so that the engine's own continuation of the remainder
//!   runs) and *`io_uring` refusal* (setup fails as under
//!   `kernel.io_uring_disabled` or a seccomp filter, so that the real
//!   fallback to the pread pool is taken and says why). The result is wrapped
//!   in a [`FaultEngine`] for the other faults.
//!
//! Faults are drawn from one seeded generator per [`Faults`] handle, which is
//! shared (cloned) between the test and the engine, so a test can
//! [`arm`](Faults::arm) them after setup (e.g. once dense weights are read)
//! and count what was injected. Nothing here is used outside tests; it is
//! public so that integration tests and other crates' tests can use it.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sluice_core::{Error, Result};

use crate::common::read_error;
use crate::{
    widened_len, AlignedBuf, Completion, EngineOptions, FileId, IoKind, ReadEngine, ReadReq,
};

/// What to inject, and how often. Probabilities are per request (per read
/// syscall or io_uring completion for `short`); 0 disables a fault.
#[derive(Clone, Debug, Default)]
pub struct FaultPlan {
    /// Seed of the generator that decides which requests fail.
    pub seed: u64,
    /// Probability that a request fails with `EIO`. 1.0 makes the failure
    /// persistent: every retry fails too.
    pub eio: f64,
    /// Probability that one read below the engine (a `pread` call or an
    /// io_uring completion) reports fewer bytes than it asked for. Takes
    /// effect only in engines opened by [`open_engine`].
    pub short: f64,
    /// Probability that a completion is held back, for up to `max_delay`.
    pub delay: f64,
    /// Longest delay.
    pub max_delay: Duration,
    /// Probability that a request is read only in part and reported as a
    /// success with [`Done::bytes_read`] short of the wanted range.
    pub torn: f64,
    /// Make io_uring setup fail in [`open_engine`], as a kernel or
    /// container that refuses io_uring does.
    pub refuse_uring: bool,
}

/// How many faults were injected so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultCounts {
    /// Requests seen by a [`FaultEngine`] while armed.
    pub requests: u64,
    /// Requests failed with `EIO`.
    pub eio: u64,
    /// Reads below the engine shortened.
    pub short: u64,
    /// Completions delayed.
    pub delayed: u64,
    /// Requests torn.
    pub torn: u64,
}

struct Shared {
    plan: FaultPlan,
    armed: AtomicBool,
    rng: Mutex<fastrand::Rng>,
    requests: AtomicU64,
    eio: AtomicU64,
    short: AtomicU64,
    delayed: AtomicU64,
    torn: AtomicU64,
}

/// A fault plan with its generator and counters, shared by a test and the
/// engines it injects into. Cheap to clone (one `Arc`).
#[derive(Clone)]
pub struct Faults(Arc<Shared>);

impl std::fmt::Debug for Faults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Faults")
            .field("plan", &self.0.plan)
            .field("armed", &self.armed())
            .field("counts", &self.counts())
            .finish()
    }
}

impl Faults {
    /// Faults following `plan`, armed from the start.
    pub fn new(plan: FaultPlan) -> Faults {
        Faults(Arc::new(Shared {
            rng: Mutex::new(fastrand::Rng::with_seed(plan.seed)),
            plan,
            armed: AtomicBool::new(true),
            requests: AtomicU64::new(0),
            eio: AtomicU64::new(0),
            short: AtomicU64::new(0),
            delayed: AtomicU64::new(0),
            torn: AtomicU64::new(0),
        }))
    }

    /// Turns injection on or off (io_uring refusal is decided when an engine
    /// is opened and is not affected).
    pub fn arm(&self, on: bool) {
        self.0.armed.store(on, Ordering::SeqCst);
    }

    /// Whether faults are being injected.
    pub fn armed(&self) -> bool {
        self.0.armed.load(Ordering::SeqCst)
    }

    /// The plan.
    pub fn plan(&self) -> &FaultPlan {
        &self.0.plan
    }

    /// What was injected so far.
    pub fn counts(&self) -> FaultCounts {
        let g = |a: &AtomicU64| a.load(Ordering::SeqCst);
        FaultCounts {
            requests: g(&self.0.requests),
            eio: g(&self.0.eio),
            short: g(&self.0.short),
            delayed: g(&self.0.delayed),
            torn: g(&self.0.torn),
        }
    }

    /// Draws whether a fault of probability `p` happens now (never when
    /// disarmed), counting it in `counter`.
    fn hit(&self, p: f64, counter: &AtomicU64) -> bool {
        if p <= 0.0 || !self.armed() {
            return false;
        }
        let yes = p >= 1.0 || self.rng().f64() < p;
        if yes {
            counter.fetch_add(1, Ordering::SeqCst);
        }
        yes
    }

    fn rng(&self) -> std::sync::MutexGuard<'_, fastrand::Rng> {
        // A test that panicked while holding the lock leaves a generator
        // that is still fine to draw from.
        self.0.rng.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The kernel's answer to a read of `asked` bytes that returned `n`,
    /// possibly shortened: what a kernel may do at any time (a signal, a
    /// page-cache miss). Under `O_DIRECT` (`align > 1`) a short read is
    /// still block aligned, as the kernel's is before end of file.
    pub(crate) fn shorten(&self, n: usize, align: usize) -> usize {
        let align = align.max(1);
        let blocks = n / align;
        if blocks < 2 || blocks * align != n || !self.hit(self.0.plan.short, &self.0.short) {
            return n;
        }
        let keep = self.rng().usize(1..blocks);
        keep * align
    }
}

/// Opens an engine as [`crate::open_engine`] does, with the faults of
/// `faults` that live below the trait (short reads, io_uring refusal), and
/// wraps it in a [`FaultEngine`] for the others.
///
/// With [`FaultPlan::refuse_uring`] and `opts.kind` = `Uring`, the ring is
/// never created: the real fallback path runs with the reason
/// `io_uring_setup: Operation not permitted (injected fault)`, and the
/// returned engine's [`notes`](ReadEngine::notes) say so.
pub fn open_engine(opts: &EngineOptions, faults: &Faults) -> Result<Box<dyn ReadEngine>> {
    let inner = crate::open_with(opts, Some(faults))?;
    Ok(Box::new(FaultEngine::new(inner, faults.clone())))
}

/// The OS error a failing drive gives, as injected: `EIO` on Unix,
/// `ERROR_IO_DEVICE` on Windows.
pub const EIO: i32 = if cfg!(windows) { 1117 } else { libc::EIO };

/// The OS error io_uring refusal is simulated with: `EPERM` (what a
/// seccomp filter or `io_uring_disabled` gives); `ERROR_ACCESS_DENIED` on
/// Windows.
const EPERM: i32 = if cfg!(windows) { 5 } else { libc::EPERM };

/// The error io_uring refusal is simulated with.
pub(crate) fn refusal() -> Error {
    Error::Unsupported(format!(
        "io_uring_setup: {} (injected fault)",
        std::io::Error::from_raw_os_error(EPERM)
    ))
}

/// A request accepted by a [`FaultEngine`]: what the caller asked for.
struct Outer {
    tag: u64,
    /// Torn: the wanted length reported back (the inner read is shorter).
    torn_len: Option<usize>,
}

/// A [`ReadEngine`] that injects `EIO`, delays and torn completions into
/// another. See the [module docs](self).
pub struct FaultEngine {
    inner: Box<dyn ReadEngine>,
    faults: Faults,
    /// Inner tag → the caller's request. Inner tags are our own sequence
    /// numbers, since callers' tags need not be unique.
    outer: HashMap<u64, Outer>,
    next_tag: u64,
    /// Completions held back until their time.
    held: Vec<(Instant, Completion)>,
    /// Completions ready to hand back.
    ready: VecDeque<Completion>,
    scratch: Vec<Completion>,
    /// Files opened, to refuse a failed request naming another.
    files: usize,
}

impl FaultEngine {
    /// Injects `faults` into `inner`.
    pub fn new(inner: Box<dyn ReadEngine>, faults: Faults) -> FaultEngine {
        FaultEngine {
            inner,
            faults,
            outer: HashMap::new(),
            next_tag: 0,
            held: Vec::new(),
            ready: VecDeque::new(),
            scratch: Vec::new(),
            files: 0,
        }
    }

    /// The shared plan and counters.
    pub fn faults(&self) -> &Faults {
        &self.faults
    }

    /// A finished completion (ours or the inner engine's, already mapped to
    /// the caller's tag): ready now, or held for a while.
    fn finish(&mut self, c: Completion) {
        let f = &self.faults;
        if f.hit(f.0.plan.delay, &f.0.delayed) {
            let max = f.0.plan.max_delay.as_micros().max(1) as u64;
            let d = Duration::from_micros(f.rng().u64(0..=max));
            self.held.push((Instant::now() + d, c));
        } else {
            self.ready.push_back(c);
        }
    }

    /// Maps the inner engine's completions in `scratch` back to the
    /// caller's requests.
    fn absorb(&mut self) {
        let done = std::mem::take(&mut self.scratch);
        for mut c in done {
            let o = self
                .outer
                .remove(&c.tag)
                .expect("a completion we submitted");
            c.tag = o.tag;
            if let (Some(len), Ok(d)) = (o.torn_len, &mut c.result) {
                d.len = len;
            }
            self.finish(c);
        }
    }

    /// Moves held completions whose time has come to `ready`.
    fn release_due(&mut self) {
        let now = Instant::now();
        let mut i = 0;
        while i < self.held.len() {
            if self.held[i].0 <= now {
                let c = self.held.swap_remove(i).1;
                self.ready.push_back(c);
            } else {
                i += 1;
            }
        }
    }

    fn take_ready(&mut self, out: &mut Vec<Completion>) -> usize {
        let n = self.ready.len();
        out.extend(self.ready.drain(..));
        n
    }
}

impl ReadEngine for FaultEngine {
    fn kind(&self) -> IoKind {
        self.inner.kind()
    }

    fn describe(&self) -> String {
        format!("{}, with injected faults", self.inner.describe())
    }

    fn direct(&self) -> bool {
        self.inner.direct()
    }

    fn align(&self) -> usize {
        self.inner.align()
    }

    fn open(&mut self, path: &Path) -> Result<FileId> {
        let id = self.inner.open(path)?;
        self.files = self.files.max(id + 1);
        Ok(id)
    }

    fn register_buffers(&mut self, bufs: Vec<AlignedBuf>) -> Result<bool> {
        self.inner.register_buffers(bufs)
    }

    unsafe fn submit(&mut self, reqs: &[ReadReq]) -> Result<()> {
        // Decide every request's fate first, so that a refusal of the
        // whole batch by the inner engine leaves nothing behind.
        let align = self.inner.align();
        let mut pass = Vec::with_capacity(reqs.len());
        let mut failed = Vec::new();
        let mut outer = Vec::with_capacity(reqs.len());
        for r in reqs {
            let f = &self.faults;
            if f.armed() {
                f.0.requests.fetch_add(1, Ordering::SeqCst);
            }
            if r.len > 0 && f.hit(f.0.plan.eio, &f.0.eio) {
                failed.push(*r);
                continue;
            }
            let mut inner = ReadReq {
                tag: self.next_tag + pass.len() as u64,
                ..*r
            };
            let mut torn_len = None;
            // Torn: read a prefix whose widened end still falls short of
            // the wanted end, so that `bytes_read` cannot cover it.
            let a = align.max(1);
            let skip = (r.offset % a as u64) as usize;
            let end = (skip + r.len / 2) / a * a;
            if end > skip && f.hit(f.0.plan.torn, &f.0.torn) {
                inner.len = end - skip;
                torn_len = Some(r.len);
            }
            outer.push(Outer {
                tag: r.tag,
                torn_len,
            });
            pass.push(inner);
        }
        // Failed requests must still be valid ones: the engine would refuse
        // an invalid request, and so must we, whatever we inject.
        for r in &failed {
            let need = widened_len(r.offset, r.len, align);
            if r.file >= self.files || r.cap < need {
                return Err(Error::Invalid(format!(
                    "read of {} bytes at offset {} (tag {}): invalid request",
                    r.len, r.offset, r.tag
                )));
            }
        }
        // SAFETY: the caller's guarantee on each destination is passed on unchanged; a torn request only reads a prefix of its destination.
        unsafe { self.inner.submit(&pass) }?;
        for (i, o) in outer.into_iter().enumerate() {
            self.outer.insert(self.next_tag + i as u64, o);
        }
        self.next_tag += pass.len() as u64;
        let now = Instant::now();
        for r in failed {
            let path = self.inner.path(r.file).to_path_buf();
            let c = Completion {
                tag: r.tag,
                result: Err(read_error(
                    &path,
                    r.offset,
                    r.len,
                    std::io::Error::from_raw_os_error(EIO),
                )),
                submitted: now,
                completed: now,
            };
            self.finish(c);
        }
        Ok(())
    }

    fn wait(&mut self, min: usize, out: &mut Vec<Completion>) -> Result<()> {
        let want = min.min(self.in_flight());
        let mut got = 0;
        loop {
            let r = self.inner.poll(&mut self.scratch);
            self.absorb();
            r?;
            self.release_due();
            got += self.take_ready(out);
            if got >= want {
                return Ok(());
            }
            if self.inner.in_flight() > 0 {
                let r = self.inner.wait(1, &mut self.scratch);
                self.absorb();
                r?;
            } else if let Some(t) = self.held.iter().map(|h| h.0).min() {
                std::thread::sleep(t.saturating_duration_since(Instant::now()));
            }
        }
    }

    fn poll(&mut self, out: &mut Vec<Completion>) -> Result<()> {
        let r = self.inner.poll(&mut self.scratch);
        self.absorb();
        self.release_due();
        self.take_ready(out);
        r
    }

    fn in_flight(&self) -> usize {
        self.inner.in_flight() + self.held.len() + self.ready.len()
    }

    fn notes(&self) -> Vec<String> {
        self.inner.notes()
    }

    fn path(&self, file: FileId) -> &Path {
        self.inner.path(file)
    }

    fn pace(&self) -> Option<crate::Pace> {
        self.inner.pace()
    }
}
