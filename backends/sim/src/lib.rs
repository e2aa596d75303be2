//! A backend that makes a real run behave like a profiled device.
//!
//! Numerics are the CPU backend's, so outputs are those of any other run.
//! Time is the device's: every product and attention call advances a
//! [`DeviceClock`] by what the profile says it costs there, and
//! [`PacedEngine`] wraps the read engine so that each read completes, on
//! that clock, when the profile's flash queue would deliver it; waiting for
//! a read the device would not have yet is stall. A run then reports
//! device-time tok/s beside its wall time.

use parking_lot::Mutex;
use sluice_backend_cpu::CpuBackend;
use sluice_core::{AttnParams, Backend, Result, WeightView};
use sluice_io::{AlignedBuf, Completion, FileId, IoKind, Pace, ReadEngine, ReadReq};
use sluice_sim::{Costs, FlashQueue, Profile};
use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::Arc;

#[derive(Debug)]
struct ClockState {
    now: f64,
    compute_s: f64,
    stall_s: f64,
    flash: FlashQueue,
}

/// Device time of one run: compute advances it, waiting for a read that
/// is not in yet advances it to the read's completion.
#[derive(Debug)]
pub struct DeviceClock {
    s: Mutex<ClockState>,
}

/// Device time so far, split.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct DeviceTime {
    /// Seconds since the clock started.
    pub now_s: f64,
    /// Of which computing.
    pub compute_s: f64,
    /// Of which waiting for flash.
    pub stall_s: f64,
    /// Bytes the flash queue delivered.
    pub flash_bytes: u64,
}

impl DeviceClock {
    /// A clock at zero with the profile's flash queue.
    pub fn new(p: &Profile) -> Arc<DeviceClock> {
        Arc::new(DeviceClock {
            s: Mutex::new(ClockState {
                now: 0.0,
                compute_s: 0.0,
                stall_s: 0.0,
                flash: FlashQueue::new(p),
            }),
        })
    }

    /// The time now.
    pub fn time(&self) -> DeviceTime {
        let s = self.s.lock();
        DeviceTime {
            now_s: s.now,
            compute_s: s.compute_s,
            stall_s: s.stall_s,
            flash_bytes: s.flash.bytes(),
        }
    }

    fn compute(&self, secs: f64) {
        let mut s = self.s.lock();
        s.now += secs;
        s.compute_s += secs;
    }

    fn read(&self, bytes: u64) -> f64 {
        let mut s = self.s.lock();
        let now = s.now;
        s.flash.read(now, bytes)
    }

    fn now(&self) -> f64 {
        self.s.lock().now
    }

    /// The flash queue's timing now.
    fn pace(&self) -> Pace {
        let s = self.s.lock();
        Pace {
            now_s: s.now,
            drained_s: s.flash.free_at(),
            bytes_per_s: s.flash.bytes_per_s(),
            latency_s: s.flash.latency_s(),
        }
    }

    fn wait_until(&self, t: f64) {
        let mut s = self.s.lock();
        if t > s.now {
            s.stall_s += t - s.now;
            s.now = t;
        }
    }
}

/// The CPU backend's numerics on a profiled device's clock.
pub struct SimBackend {
    cpu: CpuBackend,
    costs: Costs,
    clock: Arc<DeviceClock>,
    name: String,
}

impl SimBackend {
    /// Computes with `cpu`, charging `p`'s costs to `clock`.
    pub fn new(cpu: CpuBackend, p: &Profile, clock: Arc<DeviceClock>) -> SimBackend {
        SimBackend {
            cpu,
            costs: Costs::new(p),
            clock,
            name: format!("sim:{}", p.name),
        }
    }

    /// The device clock.
    pub fn clock(&self) -> &Arc<DeviceClock> {
        &self.clock
    }
}

impl Backend for SimBackend {
    fn name(&self) -> &str {
        &self.name
    }

    fn matmul(&self, w: WeightView<'_>, x: &[f32], n: usize, y: &mut [f32]) -> Result<()> {
        self.cpu.matmul(w, x, n, y)?;
        self.clock.compute(self.costs.matmul_s(
            w.dtype.name(),
            (w.data.len() + w.scales.len() + w.biases.len()) as u64,
            w.rows,
            w.cols,
            n,
        ));
        Ok(())
    }

    fn attention(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        n: usize,
        pos0: usize,
        p: &AttnParams,
        out: &mut [f32],
    ) -> Result<()> {
        self.cpu.attention(q, k, v, n, pos0, p, out)?;
        // Keys the last query sees.
        let ctx = (pos0 + n).saturating_sub(p.first_key((pos0 + n).saturating_sub(1)));
        // One attention call per layer: the layer's fixed cost rides on it.
        self.clock.compute(
            self.costs
                .attention_s(p.n_heads, p.n_kv_heads, p.head_dim, ctx, n)
                + self.costs.layer_s,
        );
        Ok(())
    }
}

/// A read engine whose completions arrive on the device clock: a read is
/// handed back only once the device's flash queue would have delivered it;
/// the real read must also be done, so the bytes are real.
pub struct PacedEngine {
    inner: Box<dyn ReadEngine>,
    clock: Arc<DeviceClock>,
    /// Per tag, device completion times of the reads submitted with it.
    due: HashMap<u64, VecDeque<f64>>,
    /// Done for real, not yet on the device clock.
    held: Vec<(f64, Completion)>,
    scratch: Vec<Completion>,
}

impl PacedEngine {
    /// Paces `inner` on `clock`.
    pub fn new(inner: Box<dyn ReadEngine>, clock: Arc<DeviceClock>) -> PacedEngine {
        PacedEngine {
            inner,
            clock,
            due: HashMap::new(),
            held: Vec::new(),
            scratch: Vec::new(),
        }
    }

    fn hold(&mut self) {
        for c in self.scratch.drain(..) {
            let t = self
                .due
                .get_mut(&c.tag)
                .and_then(|q| q.pop_front())
                .unwrap_or(0.0);
            if self.due.get(&c.tag).is_some_and(|q| q.is_empty()) {
                self.due.remove(&c.tag);
            }
            self.held.push((t, c));
        }
    }

    /// Moves held completions due by now to `out`; returns how many.
    fn release(&mut self, out: &mut Vec<Completion>) -> usize {
        let now = self.clock.now();
        let mut n = 0;
        let mut i = 0;
        while i < self.held.len() {
            if self.held[i].0 <= now {
                out.push(self.held.swap_remove(i).1);
                n += 1;
            } else {
                i += 1;
            }
        }
        n
    }
}

impl ReadEngine for PacedEngine {
    fn kind(&self) -> IoKind {
        self.inner.kind()
    }

    fn describe(&self) -> String {
        format!(
            "{}, paced on the simulated device's flash",
            self.inner.describe()
        )
    }

    fn direct(&self) -> bool {
        self.inner.direct()
    }

    fn align(&self) -> usize {
        self.inner.align()
    }

    fn open(&mut self, path: &Path) -> Result<FileId> {
        self.inner.open(path)
    }

    fn register_buffers(&mut self, bufs: Vec<AlignedBuf>) -> Result<bool> {
        self.inner.register_buffers(bufs)
    }

    unsafe fn submit(&mut self, reqs: &[ReadReq]) -> Result<()> {
        // SAFETY: the caller's guarantee on each destination is passed on unchanged.
        unsafe { self.inner.submit(reqs) }?;
        for r in reqs {
            let t = self.clock.read(r.len as u64);
            self.due.entry(r.tag).or_default().push_back(t);
        }
        Ok(())
    }

    fn wait(&mut self, min: usize, out: &mut Vec<Completion>) -> Result<()> {
        let min = min.min(self.in_flight());
        let mut got = 0;
        loop {
            let r = self.inner.poll(&mut self.scratch);
            self.hold();
            r?;
            got += self.release(out);
            if got >= min {
                return Ok(());
            }
            if let Some(t) = self.held.iter().map(|h| h.0).min_by(f64::total_cmp) {
                // The device waits for its next read.
                self.clock.wait_until(t);
                continue;
            }
            let r = self.inner.wait(1, &mut self.scratch);
            self.hold();
            r?;
        }
    }

    fn poll(&mut self, out: &mut Vec<Completion>) -> Result<()> {
        let r = self.inner.poll(&mut self.scratch);
        self.hold();
        self.release(out);
        r
    }

    fn in_flight(&self) -> usize {
        self.inner.in_flight() + self.held.len()
    }

    fn notes(&self) -> Vec<String> {
        self.inner.notes()
    }

    fn path(&self, file: FileId) -> &Path {
        self.inner.path(file)
    }

    fn pace(&self) -> Option<Pace> {
        Some(self.clock.pace())
    }
}
