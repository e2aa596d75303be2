//! The timing models of one device: a flash queue and compute costs, from
//! a [`Profile`]. The simulator and the simulated-device backend both use
//! these, so a simulated run and a prediction price the same work the same.

use crate::profile::Profile;

/// A flash drive serving reads first-come first-served: up to `queue_depth`
/// reads in flight, each paying `latency` (overlapped across the queue)
/// before its bytes move, and the bytes of all reads sharing `bandwidth`.
#[derive(Clone, Debug)]
pub struct FlashQueue {
    bytes_per_s: f64,
    latency_s: f64,
    /// When each of the queue's places frees up.
    places: Vec<f64>,
    /// When the transfer of the last accepted read ends.
    bus_free: f64,
    /// Seconds during which the drive was moving bytes.
    busy_s: f64,
    /// Bytes accepted.
    bytes: u64,
}

impl FlashQueue {
    /// A queue with the profile's flash figures.
    pub fn new(p: &Profile) -> FlashQueue {
        FlashQueue::with(
            p.flash.read_gbps.value * 1e9,
            p.flash.latency_us.value * 1e-6,
            p.flash.queue_depth.value.round().max(1.0) as usize,
        )
    }

    /// A queue of `bytes_per_s`, `latency_s` per read and `depth` places.
    pub fn with(bytes_per_s: f64, latency_s: f64, depth: usize) -> FlashQueue {
        FlashQueue {
            bytes_per_s: bytes_per_s.max(1.0),
            latency_s: latency_s.max(0.0),
            places: vec![0.0; depth.max(1)],
            bus_free: 0.0,
            busy_s: 0.0,
            bytes: 0,
        }
    }

    /// Accepts a read of `bytes` issued at `t`; returns when it completes.
    pub fn read(&mut self, t: f64, bytes: u64) -> f64 {
        let (i, free) = self
            .places
            .iter()
            .copied()
            .enumerate()
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .expect("at least one place");
        let start = t.max(free);
        let xfer = bytes as f64 / self.bytes_per_s;
        let begin = (start + self.latency_s).max(self.bus_free);
        let done = begin + xfer;
        self.busy_s += xfer;
        self.bus_free = done;
        self.places[i] = done;
        self.bytes += bytes;
        done
    }

    /// When the last accepted read's bytes are all in: the drive is busy
    /// until then.
    pub fn free_at(&self) -> f64 {
        self.bus_free
    }

    /// The drive's read rate.
    pub fn bytes_per_s(&self) -> f64 {
        self.bytes_per_s
    }

    /// What each read pays before its bytes move.
    pub fn latency_s(&self) -> f64 {
        self.latency_s
    }

    /// Seconds the drive spent moving bytes so far.
    pub fn busy_s(&self) -> f64 {
        self.busy_s
    }

    /// Bytes read so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

/// Compute costs of the device, in seconds.
#[derive(Clone, Debug)]
pub struct Costs {
    matvec: Vec<(String, f64)>,
    default_matvec: f64,
    flops: f64,
    mem_bps: f64,
    copy_bps: f64,
    op_s: f64,
    /// Fixed cost of each layer, with the round trips the engine makes.
    pub layer_s: f64,
    /// Host-device round trips per layer the engine makes and the
    /// seconds of one (`None` without the profile's `sync_us`).
    pub sync: Option<(f64, f64)>,
}

impl Costs {
    /// The profile's compute figures.
    pub fn new(p: &Profile) -> Costs {
        let held = p.compute.layer_syncs.as_ref().map_or(0.0, |f| f.value);
        Self::charging(p, held)
    }

    /// The profile's compute figures for an engine making `syncs`
    /// host-device round trips per layer (`None`: as many as the
    /// profile's own per-layer cost holds). Fails when `syncs` is given
    /// and the profile has no round-trip cost.
    pub fn with_syncs(p: &Profile, syncs: Option<f64>) -> sluice_core::Result<Costs> {
        let c = &p.compute;
        let syncs = match syncs {
            Some(n) if c.sync_us.is_none() => {
                return Err(sluice_core::Error::Invalid(format!(
                "{n} round trips per layer: profile {} has no compute.sync_us (the cost of one)",
                p.name
            )))
            }
            Some(n) if !(n.is_finite() && n >= 0.0) => {
                return Err(sluice_core::Error::Invalid(format!(
                    "{n} round trips per layer is not a count"
                )))
            }
            Some(n) => n,
            None => return Ok(Self::new(p)),
        };
        Ok(Self::charging(p, syncs))
    }

    fn charging(p: &Profile, syncs: f64) -> Costs {
        let c = &p.compute;
        let (sync_s, held) = match (&c.sync_us, &c.layer_syncs) {
            (Some(s), Some(h)) => (s.value * 1e-6, h.value),
            _ => (0.0, 0.0),
        };
        let sync = c.sync_us.as_ref().map(|_| (syncs, sync_s));
        let layer_s = c.layer_overhead_us.value * 1e-6;
        let mem = p.memory.bandwidth_gbps.value * 1e9;
        Costs {
            matvec: c
                .matvec_gbps_by_quant
                .iter()
                .map(|(q, f)| (q.to_ascii_lowercase(), f.value * 1e9))
                .collect(),
            default_matvec: c.matvec_gbps.value * 1e9,
            flops: c.tflops.value * 1e12,
            mem_bps: mem,
            copy_bps: p
                .memory
                .copy_gbps
                .as_ref()
                .map_or(mem / 2.0, |f| f.value * 1e9),
            op_s: c.op_overhead_us.as_ref().map_or(0.0, |f| f.value * 1e-6),
            // The profile's figure holds `held` round trips: the rest of it
            // stays, and the engine's own are charged.
            layer_s: (layer_s - held * sync_s).max(0.0) + syncs * sync_s,
            sync,
        }
    }

    /// Weight bytes per second of a matrix-vector product in `quant`.
    pub fn matvec_bps(&self, quant: &str) -> f64 {
        self.matvec
            .iter()
            .find(|(q, _)| q.eq_ignore_ascii_case(quant))
            .map_or(self.default_matvec, |(_, r)| *r)
    }

    /// A `rows × cols` product of `bytes` weights in `quant` with `n` input
    /// rows: the weights stream once, each further row adds its arithmetic.
    pub fn matmul_s(&self, quant: &str, bytes: u64, rows: usize, cols: usize, n: usize) -> f64 {
        let extra = 2.0 * rows as f64 * cols as f64 * n.saturating_sub(1) as f64;
        self.op_s + bytes as f64 / self.matvec_bps(quant) + extra / self.flops
    }

    /// Attention of `n` queries over `ctx` cached positions: the cache is
    /// read once (f32 keys and values), the products cost their arithmetic.
    pub fn attention_s(
        &self,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        ctx: usize,
        n: usize,
    ) -> f64 {
        let kv = (2 * ctx * kv_heads * head_dim * 4) as f64;
        let flops = 4.0 * (ctx * heads * head_dim * n) as f64;
        self.op_s + kv / self.mem_bps + flops / self.flops
    }

    /// Latent attention of `n` queries over `ctx` cached vectors of
    /// `width` floats: the cache is read once for keys and values alike;
    /// scores cost `heads × width` and values `heads × latent` per position.
    pub fn latent_attention_s(
        &self,
        heads: usize,
        width: usize,
        latent: usize,
        ctx: usize,
        n: usize,
    ) -> f64 {
        let cache = (ctx * width * 4) as f64;
        let flops = 2.0 * (ctx * heads * (width + latent) * n) as f64;
        self.op_s + cache / self.mem_bps + flops / self.flops
    }

    /// Reading and writing `bytes` of recurrent state (linear attention).
    pub fn state_s(&self, bytes: u64, n: usize) -> f64 {
        2.0 * bytes as f64 * n as f64 / self.mem_bps
    }

    /// Copying `bytes` out of the page cache into the process.
    pub fn copy_s(&self, bytes: u64) -> f64 {
        bytes as f64 / self.copy_bps
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bandwidth_bounds_a_full_queue() {
        let mut q = FlashQueue::with(1e9, 100e-6, 8);
        let mut done = 0.0f64;
        for _ in 0..1000 {
            done = done.max(q.read(0.0, 1 << 20));
        }
        let ideal = 1000.0 * (1 << 20) as f64 / 1e9;
        // Latency overlaps: only the first read's shows.
        assert!((done - ideal - 100e-6).abs() < 1e-9, "{done} vs {ideal}");
    }

    #[test]
    fn latency_bounds_small_reads_at_depth_one() {
        let mut q = FlashQueue::with(1e12, 1e-3, 1);
        let mut t = 0.0;
        for _ in 0..10 {
            t = q.read(t, 4096);
        }
        assert!((t - 10e-3).abs() < 1e-6, "{t}");
        // At depth 10 the same reads overlap their latencies.
        let mut q = FlashQueue::with(1e12, 1e-3, 10);
        let done = (0..10).map(|_| q.read(0.0, 4096)).fold(0.0, f64::max);
        assert!(done < 1.1e-3, "{done}");
    }
}
