//! The pread pool: worker threads each issuing blocking `pread(2)` calls.
//!
//! Works wherever files can be read (no io_uring needed), with `O_DIRECT` when
//! the filesystem supports it. Each in-flight read occupies a thread, so the
//! effective queue depth is `min(queue_depth, threads)`; the engine hands the
//! workers at most `queue_depth` jobs at once and keeps the rest itself.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};
use sluice_core::{Error, Result};

use crate::common::{read_at, FileSet, Next, OpenedFile, Plan, MAX_CHUNK};
use crate::fault::Faults;
use crate::{AlignedBuf, Completion, Done, EngineOptions, FileId, IoKind, ReadEngine, ReadReq};

struct Job {
    file: Arc<OpenedFile>,
    /// Injected short reads (tests).
    short: Option<Faults>,
    chunk: usize,
    req: ReadReq,
    plan: Plan,
    submitted: Instant,
}

/// Reads with a pool of `pread(2)` threads. See the [module docs](self).
pub struct PreadEngine {
    files: FileSet,
    /// `None` once dropping: closing the channel tells the workers to stop.
    jobs: Option<Sender<Job>>,
    results: Receiver<Completion>,
    workers: Vec<JoinHandle<()>>,
    /// Accepted but not yet handed to the workers (beyond the queue depth).
    pending: VecDeque<Job>,
    /// Finished and not yet returned (empty reads, which need no worker).
    ready: VecDeque<Completion>,
    /// Jobs handed to the workers whose results have not been received.
    dispatched: usize,
    /// Submitted and not yet returned to the caller.
    queued: usize,
    queue_depth: usize,
    fallback: Option<String>,
    /// Largest single `pread`; smaller in tests to exercise continuation.
    pub(crate) max_chunk: usize,
    /// Shortens reads as a kernel may ([`crate::fault`]); `None` outside tests.
    pub(crate) short: Option<Faults>,
    /// Destination buffers, kept until the workers have finished (they are
    /// dropped after `Drop::drop` joined them).
    bufs: Vec<AlignedBuf>,
}

impl PreadEngine {
    /// Starts `opts.threads` workers. Files are opened `O_DIRECT` when
    /// `opts.direct` (and the filesystem allows it).
    pub fn new(opts: &EngineOptions) -> Result<PreadEngine> {
        let threads = opts.threads.max(1);
        let (job_tx, job_rx) = crossbeam_channel::unbounded::<Job>();
        let (res_tx, res_rx) = crossbeam_channel::unbounded();
        let mut workers = Vec::with_capacity(threads);
        for i in 0..threads {
            let jobs = job_rx.clone();
            let results = res_tx.clone();
            let handle = std::thread::Builder::new()
                .name(format!("sluice-pread-{i}"))
                .spawn(move || {
                    for job in jobs.iter() {
                        // The engine may be gone (dropped while jobs ran); the
                        // read itself must still finish before the thread ends.
                        let _ = results.send(run(job));
                    }
                })
                .map_err(|e| Error::Invalid(format!("cannot start pread worker thread: {e}")))?;
            workers.push(handle);
        }
        Ok(PreadEngine {
            files: FileSet::new(opts.direct),
            jobs: Some(job_tx),
            results: res_rx,
            workers,
            pending: VecDeque::new(),
            ready: VecDeque::new(),
            dispatched: 0,
            queued: 0,
            queue_depth: opts.queue_depth.max(1),
            fallback: None,
            max_chunk: MAX_CHUNK,
            short: None,
            bufs: Vec::new(),
        })
    }

    /// Records why this engine stands in for io_uring (shown by `describe`
    /// and `notes`).
    pub(crate) fn set_fallback(&mut self, note: String) {
        self.fallback = Some(note);
    }

    fn dispatch(&mut self) {
        let Some(tx) = &self.jobs else { return };
        while self.dispatched < self.queue_depth {
            let Some(job) = self.pending.pop_front() else {
                break;
            };
            // Cannot fail: the workers hold the receiver until `jobs` is
            // dropped, which only happens in Drop.
            if let Err(e) = tx.send(job) {
                self.pending.push_front(e.into_inner());
                break;
            }
            self.dispatched += 1;
        }
    }

    fn received(&mut self, c: Completion) {
        self.dispatched -= 1;
        self.ready.push_back(c);
        self.dispatch();
    }

    fn take_ready(&mut self, out: &mut Vec<Completion>) -> usize {
        let n = self.ready.len();
        out.extend(self.ready.drain(..));
        self.queued -= n;
        n
    }
}

/// One read, start to finish, on a worker thread.
fn run(job: Job) -> Completion {
    let Job {
        file,
        short,
        chunk,
        req,
        plan,
        submitted,
    } = job;
    let mut done = 0usize;
    let result = loop {
        let asked = (plan.total - done).min(chunk);
        // SAFETY: read_at's contract holds: the submitter guaranteed dst..dst+cap is valid for writes and exclusively ours until this completion is returned; the plan checked cap >= total, and done + asked <= total.
        let r = unsafe {
            read_at(
                &file.file,
                req.dst.add(done),
                asked,
                plan.start + done as u64,
            )
        }
        .map(|n| short.as_ref().map_or(n, |f| f.shorten(n, plan.align)));
        match r {
            Ok(n) => {
                done += n;
                match plan.after_read(done, n, asked) {
                    Next::Finished => {
                        break Ok(Done {
                            skip: plan.skip,
                            len: plan.len,
                            bytes_read: done,
                        })
                    }
                    Next::Eof => break Err(plan.eof_error(&file.path, done)),
                    Next::Continue => {}
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => break Err(plan.error(&file.path, e)),
        }
    };
    Completion {
        tag: req.tag,
        result,
        submitted,
        completed: Instant::now(),
    }
}

impl ReadEngine for PreadEngine {
    fn kind(&self) -> IoKind {
        IoKind::Pread
    }

    fn describe(&self) -> String {
        let mut s = String::from("pread pool");
        if self.fallback.is_some() {
            s.push_str(" (io_uring refused)");
        }
        s.push_str(&format!(
            ", {}, {} threads, queue depth {}",
            self.files.mode_phrase(),
            self.workers.len(),
            self.queue_depth
        ));
        s
    }

    fn direct(&self) -> bool {
        self.files.direct()
    }

    fn align(&self) -> usize {
        self.files.align()
    }

    fn open(&mut self, path: &Path) -> Result<FileId> {
        self.files.open(path)
    }

    fn register_buffers(&mut self, bufs: Vec<AlignedBuf>) -> Result<bool> {
        if self.queued != 0 {
            return Err(Error::EngineBusy {
                op: "replacing the destination buffers",
                in_flight: self.queued,
            });
        }
        // Nothing to register with pread; keeping them is the point.
        self.bufs = bufs;
        Ok(false)
    }

    unsafe fn submit(&mut self, reqs: &[ReadReq]) -> Result<()> {
        let plans = reqs
            .iter()
            .map(|r| self.files.plan(r))
            .collect::<Result<Vec<_>>>()?;
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
            } else {
                self.pending.push_back(Job {
                    file: Arc::clone(&self.files.files[req.file]),
                    short: self.short.clone(),
                    chunk: self.max_chunk,
                    req: *req,
                    plan,
                    submitted,
                });
            }
        }
        self.queued += reqs.len();
        self.dispatch();
        Ok(())
    }

    fn wait(&mut self, min: usize, out: &mut Vec<Completion>) -> Result<()> {
        let want = min.min(self.queued);
        let mut got = self.take_ready(out);
        while got < want {
            if self.ready.is_empty() {
                let c = self.results.recv().map_err(|_| {
                    Error::Invalid("pread workers exited with reads in flight".into())
                })?;
                self.received(c);
            }
            while let Ok(c) = self.results.try_recv() {
                self.received(c);
            }
            got += self.take_ready(out);
        }
        Ok(())
    }

    fn poll(&mut self, out: &mut Vec<Completion>) -> Result<()> {
        while let Ok(c) = self.results.try_recv() {
            self.received(c);
        }
        self.take_ready(out);
        Ok(())
    }

    fn in_flight(&self) -> usize {
        self.queued
    }

    fn notes(&self) -> Vec<String> {
        self.fallback
            .iter()
            .chain(self.files.notes.iter())
            .cloned()
            .collect()
    }

    fn path(&self, file: FileId) -> &Path {
        &self.files.files[file].path
    }
}

impl Drop for PreadEngine {
    fn drop(&mut self) {
        // Jobs never handed out have touched nothing; those handed out must
        // finish before the caller may free their destinations. Closing the
        // channel lets each worker drain what is queued, then exit.
        self.pending.clear();
        self.jobs = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}
