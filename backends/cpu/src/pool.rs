//! A persistent thread pool for the many small products of a decode step.
//!
//! One token runs hundreds of matrix products of a few MB each; rayon's
//! `install` costs about 12 µs per call on the 2-core development VM
//! (the caller blocks on a latch while the pool's threads wake), which is
//! 10% of a token of a small model and more as layers multiply. Here the
//! calling thread takes part in the work, and the workers spin for a short
//! while after each job before they park, so back-to-back dispatches cost
//! well under a microsecond (measured by `cargo bench --bench matvec`).
//!
//! Every worker takes part in every job: the caller publishes the job and
//! a new epoch, each worker claims task indices from a shared counter until
//! none are left and then acknowledges the epoch, and the caller returns
//! only once all have acknowledged. So the job's closure, which borrows
//! the caller's stack, is never touched after `run` returns.

use std::any::Any;
use std::cell::UnsafeCell;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long an idle worker spins before it parks: longer than the gap
/// between two products of a decode step, shorter than anything a user
/// would notice as a busy core.
const SPIN: Duration = Duration::from_micros(200);

type Task<'a> = dyn Fn(usize) + Sync + 'a;

struct Job {
    /// The task, its lifetime erased (see `Pool::run`).
    f: *const Task<'static>,
    tasks: usize,
}

struct Shared {
    /// The current job; written by the dispatcher only while no worker
    /// reads it (between the acknowledgement of one epoch and the
    /// publication of the next).
    job: UnsafeCell<Job>,
    /// Bumped at each dispatch (Release after `job` is written).
    epoch: AtomicU64,
    /// Next task index of the current job.
    next: AtomicUsize,
    /// Workers that have finished the current epoch.
    acked: AtomicUsize,
    /// Workers parked on `wake`.
    parked: Mutex<usize>,
    wake: Condvar,
    shutdown: AtomicBool,
    /// The first panic of a task run by a worker, re-raised by `run`.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

// SAFETY: `job` is only written by the dispatcher while every worker is
// between epochs (it has acknowledged the previous one and waits for the
// next), and only read by workers after they observe the new epoch with
// Acquire ordering; the task it points to is `Sync`.
unsafe impl Sync for Shared {}
// SAFETY: as above; the raw pointer is only dereferenced under that protocol.
unsafe impl Send for Shared {}

/// A fixed set of worker threads plus the caller.
pub struct Pool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// One dispatch at a time; a caller that finds the pool busy runs its
    /// tasks itself rather than wait.
    busy: Mutex<()>,
}

impl Pool {
    /// A pool of `threads` threads in all: the caller and `threads - 1`
    /// workers.
    pub fn new(threads: usize) -> std::io::Result<Pool> {
        let shared = Arc::new(Shared {
            job: UnsafeCell::new(Job {
                f: std::ptr::null::<fn(usize)>() as *const Task<'static>,
                tasks: 0,
            }),
            epoch: AtomicU64::new(0),
            next: AtomicUsize::new(0),
            acked: AtomicUsize::new(0),
            parked: Mutex::new(0),
            wake: Condvar::new(),
            shutdown: AtomicBool::new(false),
            panic: Mutex::new(None),
        });
        let mut workers = Vec::new();
        for i in 1..threads.max(1) {
            let s = shared.clone();
            let h = std::thread::Builder::new()
                .name(format!("sluice-cpu-{i}"))
                .spawn(move || worker(&s));
            match h {
                Ok(h) => workers.push(h),
                Err(e) => {
                    // Stop the ones already started before reporting.
                    drop(Pool {
                        shared,
                        workers,
                        busy: Mutex::new(()),
                    });
                    return Err(e);
                }
            }
        }
        Ok(Pool {
            shared,
            workers,
            busy: Mutex::new(()),
        })
    }

    /// Threads that run a job (the caller included).
    pub fn threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Runs `f(0..tasks)` on the pool's threads and the caller, each index
    /// once, and returns when all have run. A panic in a task is re-raised
    /// here once every thread has left the job.
    pub fn run(&self, tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        if tasks == 0 {
            return;
        }
        let guard = match self.busy.try_lock() {
            Ok(g) if tasks > 1 && !self.workers.is_empty() => g,
            // Alone, or another caller holds the pool: run here.
            _ => {
                (0..tasks).for_each(f);
                return;
            }
        };
        let s = &*self.shared;
        // SAFETY: every worker acknowledged the previous epoch before the
        // previous `run` returned, so none reads `job` now. The lifetime
        // is erased: `Wait` below does not let this function return (or
        // unwind) before every worker has acknowledged this epoch, after
        // which no worker dereferences `f` again.
        unsafe {
            let f: *const Task<'_> = f;
            *s.job.get() = Job {
                f: std::mem::transmute::<*const Task<'_>, *const Task<'static>>(f),
                tasks,
            };
        }
        s.next.store(0, Ordering::Relaxed);
        s.acked.store(0, Ordering::Relaxed);
        s.epoch.fetch_add(1, Ordering::Release);
        {
            let parked = s.parked.lock().unwrap_or_else(|e| e.into_inner());
            if *parked > 0 {
                s.wake.notify_all();
            }
        }
        struct Wait<'a>(&'a Shared, usize);
        impl Drop for Wait<'_> {
            fn drop(&mut self) {
                let mut spin = Spin::new();
                while self.0.acked.load(Ordering::Acquire) < self.1 {
                    if !spin.more() {
                        std::thread::yield_now();
                    }
                }
            }
        }
        let wait = Wait(s, self.workers.len());
        loop {
            let i = s.next.fetch_add(1, Ordering::Relaxed);
            if i >= tasks {
                break;
            }
            f(i);
        }
        drop(wait);
        let p = s.panic.lock().unwrap_or_else(|e| e.into_inner()).take();
        drop(guard);
        if let Some(p) = p {
            panic::resume_unwind(p);
        }
    }
}

/// A spin of at most [`SPIN`], reading the clock once per 128 turns (a
/// clock read costs as much as dozens of turns).
struct Spin {
    start: Instant,
    turns: u32,
    over: bool,
}

impl Spin {
    fn new() -> Spin {
        Spin {
            start: Instant::now(),
            turns: 0,
            over: false,
        }
    }

    /// Spins once; false from the moment the time is up.
    #[inline]
    fn more(&mut self) -> bool {
        self.turns = self.turns.wrapping_add(1);
        if !self.over && self.turns.is_multiple_of(128) {
            self.over = self.start.elapsed() >= SPIN;
        }
        if self.over {
            return false;
        }
        std::hint::spin_loop();
        true
    }
}

fn worker(s: &Shared) {
    let mut seen = 0u64;
    loop {
        // Wait for a new epoch: spin, then park.
        let mut spin = Spin::new();
        loop {
            if s.shutdown.load(Ordering::Acquire) {
                return;
            }
            if s.epoch.load(Ordering::Acquire) != seen {
                break;
            }
            if spin.more() {
                continue;
            }
            let mut parked = s.parked.lock().unwrap_or_else(|e| e.into_inner());
            *parked += 1;
            while s.epoch.load(Ordering::Acquire) == seen && !s.shutdown.load(Ordering::Acquire) {
                parked = s.wake.wait(parked).unwrap_or_else(|e| e.into_inner());
            }
            *parked -= 1;
        }
        seen = s.epoch.load(Ordering::Acquire);
        // SAFETY: the epoch was published (Release) after `job` was
        // written, and the dispatcher does not write it again until this
        // worker acknowledges below; `f` outlives the epoch (see `run`).
        let (f, tasks) = unsafe {
            let j = &*s.job.get();
            (&*j.f, j.tasks)
        };
        loop {
            let i = s.next.fetch_add(1, Ordering::Relaxed);
            if i >= tasks {
                break;
            }
            if let Err(p) = panic::catch_unwind(AssertUnwindSafe(|| f(i))) {
                let mut slot = s.panic.lock().unwrap_or_else(|e| e.into_inner());
                slot.get_or_insert(p);
            }
        }
        s.acked.fetch_add(1, Ordering::Release);
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::Release);
        {
            let _p = self.shared.parked.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[test]
    fn every_task_runs_once() {
        for threads in 1..5 {
            let p = Pool::new(threads).unwrap();
            for tasks in [0usize, 1, 2, 3, 17, 200] {
                let hits: Vec<AtomicU32> = (0..tasks).map(|_| AtomicU32::new(0)).collect();
                p.run(tasks, &|i| {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                });
                assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
            }
        }
    }

    #[test]
    fn workers_wake_after_parking() {
        let p = Pool::new(3).unwrap();
        let n = AtomicU32::new(0);
        for _ in 0..3 {
            std::thread::sleep(SPIN * 3);
            p.run(8, &|_| {
                n.fetch_add(1, Ordering::Relaxed);
            });
        }
        assert_eq!(n.load(Ordering::Relaxed), 24);
    }

    #[test]
    fn a_panicking_task_reaches_the_caller_and_the_pool_survives() {
        let p = Pool::new(2).unwrap();
        let r = std::panic::catch_unwind(AssertUnwindSafe(|| {
            p.run(16, &|i| {
                if i == 11 {
                    panic!("task 11");
                }
            })
        }));
        assert!(r.is_err());
        let n = AtomicU32::new(0);
        p.run(16, &|_| {
            n.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(n.load(Ordering::Relaxed), 16);
    }

    #[test]
    fn concurrent_callers_each_finish() {
        let p = Arc::new(Pool::new(2).unwrap());
        let total = Arc::new(AtomicU32::new(0));
        let hs: Vec<_> = (0..4)
            .map(|_| {
                let (p, total) = (p.clone(), total.clone());
                std::thread::spawn(move || {
                    for _ in 0..200 {
                        p.run(5, &|_| {
                            total.fetch_add(1, Ordering::Relaxed);
                        });
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        assert_eq!(total.load(Ordering::Relaxed), 4 * 200 * 5);
    }
}
