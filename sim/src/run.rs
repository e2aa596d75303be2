//! The discrete-event simulation of one run: prefill, then decode, token
//! by token and layer by layer, on a device clock. The expert cache and
//! the predictors are the engine's own (`sluice-cache`); the flash queue
//! and compute costs come from the device profile.

use crate::device::{Costs, FlashQueue};
use crate::geometry::{Mixer, SimModel};
use crate::profile::Profile;
use crate::routing::{FixedHits, Routes};
use serde_json::{json, Value};
use sluice_cache::{CachePolicy, ExpertKey, Predictor, Prefetch, SlotCache};
use sluice_core::{Error, Result};
use sluice_io::Pace;
use sluice_stream::budget::{self, Demand};
use sluice_stream::{scratch_bytes, Budget, Drive, Pipeline, PrefetchStats};
use std::collections::HashMap;

/// How expert bytes reach compute.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Residency {
    /// sluice's own slots, read with direct I/O (uring, pread).
    Slots,
    /// Buffered reads through the OS page cache (no cache of one's own):
    /// the page cache holds what RAM is left, LRU, and every use copies
    /// the expert out of it.
    PageCache,
}

/// What to simulate.
#[derive(Clone, Debug)]
pub struct SimOptions {
    /// Byte budget (default: what one process may use on the device).
    pub ram_cap: Option<u64>,
    /// Expert residency.
    pub residency: Residency,
    /// Instead of a cache, each expert use hits with this probability.
    pub fixed_hit_rate: Option<f64>,
    /// Exactly this many expert slots.
    pub slots: Option<usize>,
    /// Cache policy.
    pub policy: CachePolicy,
    /// Predictor (none, xlayer, history, token or oracle; gating needs
    /// hidden states a simulation has not got).
    pub prefetch: Prefetch,
    /// Experts prefetched per layer (0: top-k).
    pub prefetch_k: usize,
    /// MoE layers ahead the oracle and predictors that need no layer above
    /// (`token`) predict.
    pub prefetch_depth: usize,
    /// Traces of earlier sessions the predictor learns first (mapped onto
    /// the model as routing replay maps them).
    pub prefetch_seed: Vec<sluice_trace::Trace>,
    /// Read size of demand reads (0: whole records).
    pub read_chunk: u64,
    /// Reads the engine keeps in flight.
    pub queue_depth: usize,
    /// Tokens decoded.
    pub tokens: usize,
    /// Prompt tokens (one batch).
    pub prompt_tokens: usize,
    /// Run a warm pass after the cold one (cache kept).
    pub warm: bool,
    /// Compute threads (scratch sizing, as the engine does).
    pub threads: usize,
    /// GPUs: host-device round trips the engine makes per layer (`None`:
    /// as many as the profile's per-layer cost holds).
    pub syncs_per_layer: Option<f64>,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            ram_cap: None,
            residency: Residency::Slots,
            fixed_hit_rate: None,
            slots: None,
            policy: CachePolicy::Lru,
            prefetch: Prefetch::None,
            prefetch_k: 0,
            prefetch_depth: 1,
            prefetch_seed: Vec::new(),
            read_chunk: 512 << 10,
            queue_depth: 16,
            tokens: 16,
            prompt_tokens: 8,
            warm: true,
            threads: 1,
            syncs_per_layer: None,
        }
    }
}

/// Time and traffic of one layer over a pass.
#[derive(Clone, Debug, Default)]
pub struct LayerTimes {
    /// Waiting for expert reads.
    pub stall_s: f64,
    /// Compute (mixer, dense products, experts, overhead).
    pub compute_s: f64,
    /// Expert uses found resident.
    pub hits: u64,
    /// Expert uses read.
    pub misses: u64,
}

/// Figures of one pass (prefill then decode).
#[derive(Clone, Debug, Default)]
pub struct PassReport {
    /// Time of the prompt's forward pass.
    pub ttft_s: f64,
    /// Decode time.
    pub decode_s: f64,
    /// Tokens decoded.
    pub tokens: usize,
    /// Decode: hits, misses, bytes, stall.
    pub hits: u64,
    /// Misses.
    pub misses: u64,
    /// Bytes read from flash while decoding.
    pub bytes_read: u64,
    /// Expert bytes the router used while decoding.
    pub expert_bytes_used: u64,
    /// Seconds waiting for reads while decoding.
    pub stall_s: f64,
    /// Seconds the drive moved bytes while decoding.
    pub flash_busy_s: f64,
    /// Per layer, decode only.
    pub layers: Vec<LayerTimes>,
    /// Prefill bytes read.
    pub prefill_bytes_read: u64,
    /// Bytes of the distinct experts the prompt used.
    pub prefill_distinct_expert_bytes: u64,
    /// Prefetch figures while decoding (the engine's own counters; the
    /// predictor's time is not simulated and stays zero).
    pub pf: PrefetchStats,
}

impl PassReport {
    /// Decode tokens per second.
    pub fn tok_per_s(&self) -> f64 {
        self.tokens as f64 / self.decode_s.max(1e-12)
    }

    /// Hit rate of decode's expert uses.
    pub fn hit_rate(&self) -> f64 {
        let n = self.hits + self.misses;
        if n == 0 {
            1.0
        } else {
            self.hits as f64 / n as f64
        }
    }

    /// JSON with the bench's keys.
    pub fn json(&self, prefetch: bool) -> Value {
        let per = |b: u64| b as f64 / self.tokens.max(1) as f64;
        let r = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        let p = &self.pf;
        let (pred, used, dem, steps) = (p.prefetched, p.prefetched_used, p.demanded, p.layer_steps);
        let (ready, bytes, wasted) = (p.all_ready, p.bytes, p.wasted_bytes);
        json!({
            "tok_per_s": self.tok_per_s(),
            "ttft_s": self.ttft_s,
            "decode_s": self.decode_s,
            "bytes_read_per_token": per(self.bytes_read),
            "expert_bytes_used_per_token": per(self.expert_bytes_used),
            "hit_rate": self.hit_rate(),
            "stall_s": self.stall_s,
            "compute_s": self.decode_s - self.stall_s,
            "read_gbps": self.bytes_read as f64 / self.flash_busy_s.max(1e-12) / 1e9,
            "overlap_ratio": if self.flash_busy_s > 0.0 { json!((1.0 - self.stall_s / self.flash_busy_s).clamp(0.0, 1.0)) } else { Value::Null },
            "prefetch_recall": prefetch.then(|| r(used, dem)),
            "prefetch_precision": prefetch.then(|| r(used, pred)),
            "all_k_ready_rate": prefetch.then(|| r(ready, steps)),
            "prefetch_bytes_per_token": prefetch.then(|| per(bytes)),
            "wasted_prefetch_bytes_per_token": prefetch.then(|| per(wasted)),
            "cancelled_prefetches_per_token": prefetch.then(|| p.cancelled as f64 / self.tokens.max(1) as f64),
            "prefill_bytes_read": self.prefill_bytes_read,
            "prefill_distinct_expert_bytes": self.prefill_distinct_expert_bytes,
            "per_layer": self.layers.iter().enumerate().map(|(l, t)| json!({
                "layer": l, "stall_s": t.stall_s, "compute_s": t.compute_s,
                "hit_rate": r(t.hits, t.hits + t.misses)})).collect::<Vec<_>>(),
        })
    }
}

/// The outcome: the budget and one or two passes.
#[derive(Clone, Debug)]
pub struct SimReport {
    /// The RAM plan.
    pub budget: Budget,
    /// Cold pass (empty cache).
    pub cold: PassReport,
    /// Warm pass (same tokens, cache kept).
    pub warm: Option<PassReport>,
    /// What was simulated, and every approximation, in words.
    pub notes: Vec<String>,
    /// GPUs: host-device round trips charged per layer, and their seconds
    /// per token (`None` when the profile has no round-trip cost).
    pub sync: Option<(f64, f64)>,
}

/// The simulator's drive: the device's flash queue on its clock. Reads
/// complete at known times, so a slot is ready the moment it is issued,
/// with the time its bytes are in.
struct SimDrive {
    flash: FlashQueue,
    /// Device time at which each slot's bytes are in.
    ready_at: Vec<f64>,
    /// The device clock.
    t: f64,
    record_bytes: u64,
    /// Read size of demand reads (0: whole records).
    read_chunk: u64,
    /// Device seconds one expert's read occupies the drive.
    read_s: f64,
}

impl SimDrive {
    /// Issues the reads of one record at the current time; returns when
    /// its last byte is in.
    fn read_record(&mut self, chunked: bool) -> f64 {
        let total = self.record_bytes;
        let chunk = if chunked && self.read_chunk > 0 {
            self.read_chunk
        } else {
            total
        };
        let mut done = self.t;
        let mut at = 0;
        while at < total {
            let n = chunk.min(total - at);
            done = done.max(self.flash.read(self.t, n));
            at += n;
        }
        done
    }
}

impl Drive for SimDrive {
    fn load(&mut self, cache: &mut SlotCache, slot: usize, _: ExpertKey, demand: bool) -> u64 {
        self.ready_at[slot] = self.read_record(demand);
        cache.mark_ready(slot);
        self.record_bytes
    }

    fn submit(&mut self, _: &mut SlotCache) -> Result<()> {
        Ok(())
    }

    fn loading(&self, _: &SlotCache, slot: usize) -> bool {
        self.ready_at[slot] > self.t
    }

    fn pace(&self) -> Pace {
        Pace {
            now_s: self.t,
            drained_s: self.flash.free_at(),
            bytes_per_s: self.flash.bytes_per_s(),
            latency_s: 0.0,
        }
    }

    /// The queue itself knows: every read is on it the moment it is issued.
    fn free_at(&self, _: &Pace, _: u64) -> f64 {
        self.flash.free_at().max(self.t)
    }

    fn read_s(&self, _: &Pace) -> f64 {
        self.read_s
    }

    fn wave_ready(&self, _: &SlotCache, wave: &[usize]) -> (f64, f64) {
        let ready = wave.iter().fold(self.t, |r, &s| r.max(self.ready_at[s]));
        (self.t, ready)
    }

    fn all_ready(&mut self, _: &mut SlotCache, wave: &[usize]) -> Result<bool> {
        Ok(wave.iter().all(|&s| self.ready_at[s] <= self.t))
    }
}

/// The simulator's state.
struct Sim<'a> {
    m: &'a SimModel,
    o: &'a SimOptions,
    costs: Costs,
    io: SimDrive,
    /// The engine's cache, prefetch bookkeeping, admission and clock of
    /// demands.
    pipe: Pipeline,
    fixed: Option<FixedHits>,
    predictor: Option<Box<dyn Predictor>>,
    oracle: bool,
    prefetch_k: usize,
    /// Step of the last demand.
    step: u64,
    memo: HashMap<(usize, usize), Vec<usize>>,
    moe_layers: Vec<usize>,
    /// Whether the layer being run is a single token's.
    single: bool,
}

/// Plans the RAM budget the engine would plan on this device (the
/// streaming core's own planner).
pub fn plan(m: &SimModel, p: &Profile, o: &SimOptions) -> Result<Budget> {
    let cap = o.ram_cap.unwrap_or_else(|| p.app_bytes());
    let ctx = o.prompt_tokens + o.tokens + 1;
    let kv = m.kv_bytes_per_pos() * ctx as u64 + m.state_bytes();
    let scratch = scratch_bytes(
        &m.config,
        m.expert_inter,
        o.prompt_tokens.max(1),
        ctx,
        o.threads.max(1),
    );
    let b = Budget {
        cap,
        baseline: (p.memory.process_mb.value * 1e6) as u64,
        margin: Budget::margin_for(cap),
        dense: m.dense_bytes,
        kv,
        scratch,
        device: 0,
        slot: m.record_bytes.max(1),
        slots: 0,
        experts_total: m.experts_total(),
    };
    let mut b = budget::plan(
        b,
        Demand {
            slots: o.slots,
            min_slots: if o.fixed_hit_rate.is_some() {
                0
            } else {
                m.top_k
            },
            available: None,
        },
    )?;
    b.slot = m.record_bytes;
    Ok(b)
}

/// Simulates `o` for model `m` on device `p` with routes from `routes`.
pub fn simulate(
    m: &SimModel,
    p: &Profile,
    o: &SimOptions,
    routes: &mut dyn Routes,
) -> Result<SimReport> {
    let budget = plan(m, p, o)?;
    let mut notes = vec![routes.describe()];
    let engine_qd = o.queue_depth.max(1);
    let dev_qd = p.flash.queue_depth.value.round().max(1.0) as usize;
    let flash = FlashQueue::with(
        p.flash.read_gbps.value * 1e9,
        p.flash.latency_us.value * 1e-6,
        engine_qd.min(dev_qd),
    );
    let (mut predictor, oracle) = match o.prefetch {
        Prefetch::None => (None, false),
        Prefetch::Oracle => (None, true),
        Prefetch::Gate => {
            return Err(Error::Invalid(
                "--prefetch gate needs the model's hidden states, which a simulation has not got; use none, xlayer, history, token or oracle".into(),
            ))
        }
        p => (p.learner(m.layers.len(), m.experts), false),
    };
    let policy = match o.residency {
        // The kernel's page cache: approximately LRU.
        Residency::PageCache => CachePolicy::Lru,
        Residency::Slots => o.policy,
    };
    if !o.prefetch_seed.is_empty() {
        let Some(pr) = &mut predictor else {
            return Err(Error::Invalid(format!(
                "--prefetch-seed teaches a learning predictor (xlayer, history, token); --prefetch {} learns nothing",
                o.prefetch.name()
            )));
        };
        for t in &o.prefetch_seed {
            sluice_engine::forward::Replay::new(t, &m.config).teach(pr.as_mut());
        }
        notes.push(format!(
            "predictor seeded with {} trace(s), {} tokens",
            o.prefetch_seed.len(),
            o.prefetch_seed.iter().map(|t| t.steps.len()).sum::<usize>()
        ));
    }
    if o.residency == Residency::PageCache && (predictor.is_some() || oracle) {
        return Err(Error::Invalid(
            "prefetch needs sluice's own slots: the page-cache mode (--io mmap or --buffered) has none".into(),
        ));
    }
    if let Some(r) = o.fixed_hit_rate {
        notes.push(format!(
            "no cache simulated: each expert use hits with probability {r:.2} (given), every miss reads its record"
        ));
    } else {
        notes.push(format!(
            "{} expert slots of {:.2} MB ({:.1}% of {} experts), {}",
            budget.slots,
            m.record_bytes as f64 / 1e6,
            100.0 * budget.slots as f64 / budget.experts_total.max(1) as f64,
            budget.experts_total,
            match o.residency {
                Residency::Slots => format!("policy {}", o.policy.name()),
                Residency::PageCache => "the OS page cache (LRU), each use copied out of it".into(),
            }
        ));
    }
    let prefetch_k = if o.prefetch_k == 0 {
        m.top_k
    } else {
        o.prefetch_k
    };
    let cache = SlotCache::new(budget.slots.max(1), policy.build());
    let mut sim = Sim {
        m,
        o,
        costs: Costs::with_syncs(p, o.syncs_per_layer)?,
        io: SimDrive {
            flash,
            ready_at: vec![0.0; budget.slots.max(1)],
            t: 0.0,
            record_bytes: m.record_bytes,
            read_chunk: o.read_chunk,
            read_s: m.record_bytes as f64 / (p.flash.read_gbps.value * 1e9)
                + p.flash.latency_us.value * 1e-6,
        },
        pipe: Pipeline::new(cache, m.top_k, prefetch_k, o.prefetch_depth),
        fixed: o.fixed_hit_rate.map(|r| FixedHits::new(r, 7)),
        predictor,
        oracle,
        prefetch_k,
        step: 0,
        single: false,
        memo: HashMap::new(),
        moe_layers: (0..m.layers.len()).filter(|&l| m.layers[l].moe).collect(),
    };
    let cold = sim.pass(routes)?;
    let warm = if o.warm {
        Some(sim.pass(routes)?)
    } else {
        None
    };
    notes.push(
        "compute from the profile's matvec rates and arithmetic peak; the predictor's own time is not charged (measured < 1% of token time)".into(),
    );
    let layers = m.layers.len() as f64;
    Ok(SimReport {
        budget,
        cold,
        warm,
        notes,
        sync: sim.costs.sync.map(|(n, s)| (n, n * s * layers)),
    })
}

impl Sim<'_> {
    fn route(&mut self, routes: &mut dyn Routes, pos: usize, layer: usize) -> Vec<usize> {
        self.memo
            .entry((pos, layer))
            .or_insert_with(|| routes.experts(pos, layer))
            .clone()
    }

    fn pass(&mut self, routes: &mut dyn Routes) -> Result<PassReport> {
        let m = self.m;
        let mut r = PassReport {
            layers: vec![LayerTimes::default(); m.layers.len()],
            ..Default::default()
        };
        self.pipe.pf.clear(&mut self.pipe.cache);
        self.pipe.demands.interrupt();
        // Prefill: the prompt as one batch.
        let n = self.o.prompt_tokens.max(1);
        let t0 = self.io.t;
        let bytes0 = self.io.flash.bytes();
        let mut distinct = 0u64;
        let mut scratch = PassReport {
            layers: vec![LayerTimes::default(); m.layers.len()],
            ..Default::default()
        };
        for l in 0..m.layers.len() {
            let mut uses: Vec<(usize, usize)> = Vec::new();
            if m.layers[l].moe {
                let mut count: HashMap<usize, usize> = HashMap::new();
                for pos in 0..n {
                    for e in self.route(routes, pos, l) {
                        *count.entry(e).or_default() += 1;
                    }
                }
                uses = count.into_iter().collect();
                uses.sort_unstable();
                distinct += uses.len() as u64 * m.record_bytes;
            }
            self.layer(l, 0, n, &uses, &mut scratch, None)?;
        }
        self.io.t += self
            .costs
            .matmul_s(&m.head.quant, m.head.bytes, m.head.rows, m.head.cols, 1);
        // The predictor learns the prompt token by token, as the engine's
        // does once a batch's last layer is in.
        if self.predictor.is_some() {
            for pos in 0..n {
                let tok = routes.token(pos);
                if let Some(p) = &mut self.predictor {
                    p.begin_token(tok);
                }
                for i in 0..self.moe_layers.len() {
                    let l = self.moe_layers[i];
                    let ids: Vec<u32> = self
                        .route(routes, pos, l)
                        .into_iter()
                        .map(|e| e as u32)
                        .collect();
                    if let Some(p) = &mut self.predictor {
                        p.observe(l, &ids);
                    }
                }
            }
        }
        self.pipe.demands.interrupt();
        r.ttft_s = self.io.t - t0;
        r.prefill_bytes_read = self.io.flash.bytes() - bytes0;
        r.prefill_distinct_expert_bytes = distinct;
        // Decode.
        let t1 = self.io.t;
        let bytes1 = self.io.flash.bytes();
        let busy1 = self.io.flash.busy_s();
        let pf1 = self.pipe.pf.stats;
        for pos in n..n + self.o.tokens {
            self.begin_token(routes.token(pos));
            for l in 0..m.layers.len() {
                let uses: Vec<(usize, usize)> = if m.layers[l].moe {
                    self.route(routes, pos, l)
                        .into_iter()
                        .map(|e| (e, 1))
                        .collect()
                } else {
                    Vec::new()
                };
                if m.layers[l].moe {
                    r.expert_bytes_used += uses.len() as u64 * m.record_bytes;
                }
                self.layer(l, pos, 1, &uses, &mut r, Some(&mut *routes))?;
            }
            self.io.t +=
                self.costs
                    .matmul_s(&m.head.quant, m.head.bytes, m.head.rows, m.head.cols, 1);
        }
        r.tokens = self.o.tokens;
        r.decode_s = self.io.t - t1;
        r.bytes_read = self.io.flash.bytes() - bytes1;
        r.flash_busy_s = self.io.flash.busy_s() - busy1;
        r.pf = self.pipe.pf.stats.since(&pf1);
        r.hits = r.layers.iter().map(|x| x.hits).sum();
        r.misses = r.layers.iter().map(|x| x.misses).sum();
        r.stall_s = r.layers.iter().map(|x| x.stall_s).sum();
        Ok(r)
    }

    /// A decode token starts: the predictor learns its id and, if it can,
    /// guesses the first MoE layer, as the engine's `Streamer::begin`.
    fn begin_token(&mut self, token: Option<u32>) {
        let Some(p) = &mut self.predictor else { return };
        p.begin_token(token);
        if p.predicts_ahead() {
            let depth = self.o.prefetch_depth.max(1);
            for &l in self.moe_layers.iter().take(depth) {
                let mut pred = Vec::new();
                p.predict_scored(l, self.prefetch_k, &mut pred);
                self.pipe.pf.predict(l, &pred);
            }
        }
    }

    /// The predictor learns layer `l`'s choice and predicts the next MoE
    /// layer(s), as the engine's `routed`/`hint` do.
    fn predict(&mut self, routes: &mut dyn Routes, pos: usize, l: usize, uses: &[(usize, usize)]) {
        let i = self.moe_layers.iter().position(|&x| x == l).unwrap_or(0);
        if self.oracle {
            let ahead: Vec<usize> = self.moe_layers[i + 1..]
                .iter()
                .copied()
                .take(self.o.prefetch_depth.max(1))
                .collect();
            for nl in ahead {
                let e: Vec<u32> = self
                    .route(routes, pos, nl)
                    .into_iter()
                    .map(|e| e as u32)
                    .collect();
                let ranked: Vec<(u32, f32)> = e.into_iter().map(|e| (e, 1.0)).collect();
                self.pipe.pf.predict(nl, &ranked);
            }
            return;
        }
        let Some(p) = &mut self.predictor else { return };
        let ids: Vec<u32> = uses.iter().map(|&(e, _)| e as u32).collect();
        p.observe(l, &ids);
        let depth = if p.predicts_ahead() {
            self.o.prefetch_depth.max(1)
        } else {
            1
        };
        for &nl in self.moe_layers.iter().skip(i + 1).take(depth) {
            let mut pred = Vec::new();
            p.predict_scored(nl, self.prefetch_k, &mut pred);
            self.pipe.pf.predict(nl, &pred);
        }
    }

    /// One layer for `n` tokens at `pos`; `uses` are (expert, tokens).
    /// With `routes` (decode), the predictor learns the layer's choice and
    /// predicts the next once the router has run, as in the engine.
    fn layer(
        &mut self,
        l: usize,
        pos: usize,
        n: usize,
        uses: &[(usize, usize)],
        r: &mut PassReport,
        routes: Option<&mut dyn Routes>,
    ) -> Result<()> {
        let g = &self.m.layers[l];
        let c = &self.costs;
        let mut compute = c.layer_s;
        for op in &g.ops {
            compute += c.matmul_s(&op.quant, op.bytes, op.rows, op.cols, n);
        }
        compute += match g.mixer {
            Mixer::Attention {
                heads,
                kv_heads,
                head_dim,
                window,
            } => {
                let ctx = (pos + n).min(window.unwrap_or(usize::MAX));
                c.attention_s(heads, kv_heads, head_dim, ctx, n)
            }
            Mixer::Latent {
                heads,
                width,
                latent,
            } => c.latent_attention_s(heads, width, latent, pos + n, n),
            Mixer::Linear { state_bytes } => c.state_s(state_bytes, n),
        };
        // The engine's forward pass ticks twice inside a layer's dense
        // work (after the attention's projections and after the shared
        // expert), feeding the drive from the admission queue.
        for part in 0..3 {
            if part > 0 {
                self.tick();
            }
            self.io.t += compute / 3.0;
        }
        r.layers[l].compute_s += compute;
        if uses.is_empty() {
            return Ok(());
        }
        if let Some(routes) = routes {
            self.predict(routes, pos, l, uses);
        }
        let step = pos as u64 + n as u64 - 1;
        self.step = step;
        self.single = n == 1;
        let mut i = 0;
        while i < uses.len() {
            let (took, ready, hits, misses) = self.load_wave(l, uses, i, step)?;
            r.layers[l].hits += hits;
            r.layers[l].misses += misses;
            let stall = (ready - self.io.t).max(0.0);
            self.io.t += stall;
            r.layers[l].stall_s += stall;
            let mut ec = 0.0;
            for &(_, toks) in &uses[i..i + took] {
                let mut one = 0.0;
                for op in &self.m.expert_ops {
                    one += self
                        .costs
                        .matmul_s(&op.quant, op.bytes, op.rows, op.cols, toks);
                }
                if self.o.residency == Residency::PageCache {
                    one += self.costs.copy_s(self.m.record_bytes);
                }
                self.io.t += one;
                ec += one;
                // The engine ticks between experts.
                self.tick();
            }
            r.layers[l].compute_s += ec;
            i += took;
        }
        Ok(())
    }

    /// Acquires the longest run of `uses` the slots allow (residents
    /// first), reads the misses, issues pending prefetches behind them
    /// (the shared pipeline's wave); returns (taken, time all are in,
    /// hits, misses). The wave's pins go at once: a simulated expert's
    /// compute cannot be interrupted by a prefetch taking its slot.
    fn load_wave(
        &mut self,
        l: usize,
        uses: &[(usize, usize)],
        from: usize,
        step: u64,
    ) -> Result<(usize, f64, u64, u64)> {
        if let Some(f) = &mut self.fixed {
            let (mut hits, mut misses) = (0, 0);
            let hit: Vec<bool> = uses[from..].iter().map(|_| f.hit()).collect();
            let mut ready = self.io.t;
            for h in hit {
                if h {
                    hits += 1;
                } else {
                    misses += 1;
                    ready = ready.max(self.io.read_record(true));
                }
            }
            return Ok((uses.len() - from, ready, hits, misses));
        }
        let want: Vec<(usize, f32)> = uses.iter().map(|&(e, _)| (e, 1.0)).collect();
        let mut wave = Vec::new();
        let taken = self
            .pipe
            .load_wave(&mut self.io, l, &want, from, step, self.single, &mut wave);
        let slots: Vec<usize> = wave.iter().map(|w| w.1).collect();
        let (_, ready) = self.io.wave_ready(&self.pipe.cache, &slots);
        for s in slots {
            self.pipe.cache.release(s);
        }
        let t = taken?;
        Ok((t.n, ready, t.hits, t.misses))
    }

    /// The engine's tick: queued predictions go to the drive while
    /// admission allows.
    fn tick(&mut self) {
        if self.fixed.is_none() {
            // The simulated drive cannot fail.
            let _ = self.pipe.top_up(&mut self.io, self.step, false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::StatRoutes;
    use proptest::prelude::*;

    fn setup(layers: usize) -> (SimModel, Profile) {
        let m = SimModel::preset("small-moe", Some("q4_0"), Some(layers)).unwrap();
        let p = Profile::open("dev-vm").unwrap();
        (m, p)
    }

    fn run(m: &SimModel, p: &Profile, o: &SimOptions, seed: u64) -> SimReport {
        let mut r = StatRoutes::zipf(m.layers.len(), m.experts, m.top_k, 0.8, 0.2, seed);
        simulate(m, p, o, &mut r).unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// Without prefetch a faster drive never makes a token slower and
        /// the hits do not depend on the drive; with it, the prefetch
        /// counters stay consistent whatever the drive.
        #[test]
        fn faster_flash_is_never_slower(g1 in 0.2f64..4.0, f in 1.0f64..8.0, slots in 4usize..40, seed in 0u64..50, pf in 0usize..3) {
            let (m, mut p) = setup(3);
            let o = SimOptions {
                slots: Some(slots),
                tokens: 8,
                prompt_tokens: 2,
                warm: false,
                ram_cap: Some(1 << 30),
                prefetch: [Prefetch::None, Prefetch::Xlayer, Prefetch::History][pf],
                ..SimOptions::default()
            };
            p.set("flash.read_gbps", g1).unwrap();
            let slow = run(&m, &p, &o, seed);
            p.set("flash.read_gbps", g1 * f).unwrap();
            let fast = run(&m, &p, &o, seed);
            if pf == 0 {
                // Without prefetch, what is resident does not depend on
                // timing; with it, admission follows the drive.
                prop_assert_eq!(slow.cold.hits, fast.cold.hits);
                prop_assert!(fast.cold.decode_s <= slow.cold.decode_s * (1.0 + 1e-9),
                    "{} > {}", fast.cold.decode_s, slow.cold.decode_s);
            }
            for r in [&slow.cold, &fast.cold] {
                prop_assert!(r.stall_s <= r.decode_s);
                prop_assert!(r.pf.wasted_bytes <= r.pf.bytes);
                prop_assert!(r.pf.prefetched_used <= r.pf.prefetched);
            }
        }
    }

    /// With free compute and no cache to speak of, tok/s is the flash bound.
    #[test]
    fn io_bound_runs_at_the_drive_bandwidth() {
        let (m, mut p) = setup(4);
        p.set("compute.matvec_gbps", 1e6).unwrap();
        p.set("compute.tflops", 1e6).unwrap();
        p.set("compute.layer_overhead_us", 0.0).unwrap();
        p.compute.matvec_gbps_by_quant.clear();
        p.compute.op_overhead_us = None;
        p.set("flash.latency_us", 0.0).unwrap();
        p.set("flash.read_gbps", 1.0).unwrap();
        let o = SimOptions {
            slots: Some(m.top_k),
            tokens: 16,
            warm: false,
            ram_cap: Some(1 << 30),
            ..SimOptions::default()
        };
        let r = run(&m, &p, &o, 1);
        let bound = 1e9 / (r.cold.bytes_read as f64 / 16.0);
        let got = r.cold.tok_per_s();
        assert!((got / bound - 1.0).abs() < 0.01, "{got} vs bound {bound}");
    }

    /// Everything resident: time is the sum of the compute costs, and no
    /// byte is read while decoding.
    #[test]
    fn resident_runs_are_compute_bound() {
        let (m, p) = setup(2);
        let o = SimOptions {
            tokens: 4,
            prompt_tokens: 1,
            warm: true,
            ram_cap: Some(8 << 30),
            ..SimOptions::default()
        };
        let r = run(&m, &p, &o, 3);
        let w = r.warm.unwrap();
        assert_eq!(r.budget.slots, m.experts_total());
        assert_eq!(w.bytes_read, 0);
        assert_eq!(w.stall_s, 0.0);
        let c = Costs::new(&p);
        let mut per_token = c.matmul_s(&m.head.quant, m.head.bytes, m.head.rows, m.head.cols, 1);
        for (pos, g) in (1..).zip(&m.layers) {
            let _ = pos;
            per_token += c.layer_s;
            for op in g
                .ops
                .iter()
                .chain(std::iter::repeat_n(&m.expert_ops, m.top_k).flatten())
            {
                per_token += c.matmul_s(&op.quant, op.bytes, op.rows, op.cols, 1);
            }
        }
        // Attention grows with the context: bounded between its first and
        // last token's cost.
        let att = |ctx| match m.layers[0].mixer {
            crate::geometry::Mixer::Attention {
                heads,
                kv_heads,
                head_dim,
                ..
            } => c.attention_s(heads, kv_heads, head_dim, ctx, 1) * m.layers.len() as f64,
            _ => 0.0,
        };
        let lo = 4.0 * (per_token + att(2));
        let hi = 4.0 * (per_token + att(5));
        assert!(
            w.decode_s >= lo * 0.999 && w.decode_s <= hi * 1.001,
            "{} not in [{lo}, {hi}]",
            w.decode_s
        );
    }
}
