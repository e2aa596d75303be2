//! The real streamer: a read engine filling preallocated slots, driven by
//! the shared [`Pipeline`].

use crate::budget::{self, Budget, Demand};
use crate::pipeline::{Drive, Pipeline};
use crate::plan::{ExpertPlan, Loc, Plans, Seg};
use crate::{CachePolicy, Prefetch, StreamOptions, StreamStats};
use sluice_cache::{ExpertKey, Predictor, PrefetchStats, SlotCache, SlotState};
use sluice_core::{DType, Error, Result, WeightView};
use sluice_format::model::{Ffn, Model, Weight};
use sluice_format::TensorBytes;
use sluice_io::{AlignedBuf, Completion, FileId, Pace, ReadEngine, ReadReq};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A resident expert matrix as raw `(pointer, bytes)` ranges of slot
/// memory, for callers that hold the pin themselves (the facade).
#[derive(Clone, Copy, Debug)]
pub struct RawMatrix {
    /// Element type.
    pub dtype: DType,
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
    /// The values.
    pub data: (*const u8, usize),
    /// MLX scales, FP8 scale grid lines (empty otherwise).
    pub scales: (*const u8, usize),
    /// MLX biases (empty otherwise).
    pub biases: (*const u8, usize),
    /// FP8: the first row's position in its block of rows.
    pub block_row0: usize,
}

/// A slot whose reads are in flight.
struct Loading {
    key: ExpertKey,
    remaining: usize,
    error: Option<Error>,
}

/// Read rate assumed before any read has been timed (a modest NVMe drive).
const FIRST_RATE: f64 = 1e9;

/// Drive bursts kept for [`Streamer::drive_bursts`] (16 bytes each).
const MAX_BURSTS: usize = 1 << 16;

/// The I/O half: engine, slot memory, read plans and completions. It is
/// the [`Drive`] of the real streamer.
struct Reader {
    engine: Box<dyn ReadEngine>,
    /// Slot memory, owned by the engine (so that it outlives every read);
    /// reads land and views are taken through these pointers.
    ptrs: Vec<*mut u8>,
    slot_bytes: usize,
    align: usize,
    chunk: usize,
    plans: Plans,
    /// The model's files as the engine opened them.
    file_ids: Vec<FileId>,
    loading: HashMap<usize, Loading>,
    /// Reads queued by `load`, sent by `submit`.
    pending: Vec<ReadReq>,
    verify: bool,
    stats: StreamStats,
    busy_since: Option<Instant>,
    /// Bytes submitted since the drive was last idle.
    busy_bytes: u64,
    /// Whether the compute thread is waiting on a read.
    waiting: bool,
    /// Busy periods (bytes, seconds) that ended while the compute thread
    /// waited, so that their end was seen as it happened: the drive as the
    /// engine observed it.
    bursts: Vec<(u64, f64)>,
    done: Vec<Completion>,
    loading_errors: Vec<(usize, Error)>,
    /// The wall clock's zero, for engines that do not pace a drive.
    epoch: Instant,
    /// For those: when the drive will have delivered what was submitted
    /// (seconds after `epoch`), estimated from the bytes and the rate
    /// measured so far.
    drive_free: f64,
}

/// The streaming half of a session: read engine, slots and cache.
pub struct Streamer {
    io: Reader,
    pipe: Pipeline,
    budget: Budget,
    notes: Vec<String>,
    predictor: Option<Box<dyn Predictor>>,
    /// The predictor chosen, including those run outside (gate, oracle),
    /// whose predictions arrive through [`Streamer::hint`].
    prefetch: Prefetch,
    prefetch_k: usize,
    depth: usize,
    /// The step of the last demand, for prefetches issued between them.
    step: u64,
    /// Routes of a batch's layers so far, per token.
    batch_routes: Vec<(usize, Vec<Vec<u32>>)>,
    /// The token ids of the batch being processed.
    batch_tokens: Vec<u32>,
}

// SAFETY: the raw slot pointers point into buffers the engine owns and
// never reallocates; moving the streamer to another thread moves the
// engine with it, and all access goes through `&mut self` or `&self`.
unsafe impl Send for Streamer {}

/// Every dense weight of a model, mutably (tied weights once).
fn dense_weights(m: &mut Model) -> Vec<&mut Weight> {
    let mut v: Vec<&mut Weight> = vec![&mut m.embed];
    if !m.config.tie_embeddings {
        v.push(&mut m.lm_head);
    }
    for l in &mut m.layers {
        v.extend(l.mixer.weights_mut());
        match &mut l.ffn {
            Ffn::Dense(d) => v.extend([&mut d.gate, &mut d.up, &mut d.down]),
            Ffn::Moe(moe) => {
                v.push(&mut moe.router);
                if let Some(s) = &mut moe.shared {
                    v.extend([&mut s.gate, &mut s.up, &mut s.down]);
                }
                if let Some(g) = &mut moe.shared_gate {
                    v.push(g);
                }
            }
        }
    }
    v
}

impl Streamer {
    /// Plans streaming for `model`: opens the read engine on its files,
    /// builds every expert's read plan, sizes the slots from the budget
    /// and allocates them. Fails with [`Error::Budget`] when the cap
    /// cannot hold dense weights, KV cache and one layer's top-k experts.
    /// With [`StreamOptions::dense`], call [`read_dense`](Self::read_dense)
    /// next, before the model is shared.
    pub fn open(model: &mut Model, opts: &StreamOptions) -> Result<Streamer> {
        let mut s = Streamer::plan(model, opts)?;
        if opts.dense {
            s.read_dense(model)?;
        }
        Ok(s)
    }

    /// [`open`](Self::open) without reading the dense weights.
    pub fn plan(model: &mut Model, opts: &StreamOptions) -> Result<Streamer> {
        let mut engine = sluice_io::open_engine(&opts.io)?;
        if let Some(w) = &opts.engine_wrap {
            engine = (w.0)(engine);
        }
        let mut notes = engine.notes();
        let mut file_ids = Vec::new();
        for f in model.files.files() {
            file_ids.push(engine.open(&f.path)?);
        }
        push_new(&mut notes, engine.notes());
        let align = engine.align().max(1);
        let c = model.config.clone();
        let c = &c;
        let plans = Plans::new(model, &file_ids, align)?;
        if opts.verify && !plans.has_checksums() {
            return Err(Error::Invalid(
                "verifying records needs a packed model with record checksums (make one with `sluice pack`)"
                    .into(),
            ));
        }
        // The budget, from what is resident now.
        let baseline = sluice_io::sys::rss_bytes().unwrap_or(0);
        let mut dense = 0u64;
        if opts.dense {
            for w in dense_weights(model) {
                for (_, d) in w.parts() {
                    if d.is_mapped() {
                        dense += sluice_io::max_widened_len(d.len(), align) as u64;
                    }
                }
            }
        }
        // A slot holds the largest expert, whole pages of it when a device
        // binds slots in place.
        let slot_align = opts.slot_align.max(1);
        if !slot_align.is_power_of_two() {
            return Err(Error::Invalid(format!(
                "slot alignment {slot_align} is not a power of two"
            )));
        }
        let max_plan = plans.max_plan.max(1).next_multiple_of(slot_align);
        let cap = opts.ram_cap.unwrap_or(u64::MAX);
        let b = Budget {
            cap,
            baseline,
            margin: Budget::margin_for(cap),
            dense,
            kv: c.state_bytes(opts.ctx) * (1 + opts.kv_copies as u64)
                + opts.state_copies as u64 * c.linear_state_bytes(),
            scratch: budget::scratch_bytes(
                c,
                plans.inter,
                opts.batch.max(1),
                opts.ctx,
                opts.threads.max(1),
            ),
            device: if opts.device_copies > 0 {
                opts.device_copies.min(dense) + max_plan as u64
            } else {
                0
            },
            slot: max_plan as u64,
            slots: 0,
            experts_total: plans.experts_total,
        };
        let budget = budget::plan(
            b,
            Demand {
                slots: opts.slots,
                min_slots: c.top_k,
                available: if cap == u64::MAX {
                    sluice_io::sys::mem_available_bytes()
                } else {
                    None
                },
            },
        )?;
        let slots = budget.slots;
        // Slots: one aligned buffer each, allocated now, never per read.
        let mut bufs = Vec::with_capacity(slots);
        for _ in 0..slots {
            bufs.push(AlignedBuf::new(max_plan, align.max(64).max(slot_align))?);
        }
        // The pointers stay valid when the buffers move into the engine
        // (an AlignedBuf's memory does not move with it).
        let ptrs: Vec<*mut u8> = bufs.iter_mut().map(|b| b.as_mut_ptr()).collect();
        engine.register_buffers(bufs)?;
        push_new(&mut notes, engine.notes());
        let predictor = match opts.prefetch {
            Prefetch::None | Prefetch::Gate | Prefetch::Oracle => None,
            p => p.learner(c.n_layers, c.n_experts),
        };
        let prefetch_k = if opts.prefetch_k == 0 {
            c.top_k
        } else {
            opts.prefetch_k
        };
        let cache = SlotCache::new(slots, policy(opts.policy));
        Ok(Streamer {
            io: Reader {
                engine,
                ptrs,
                slot_bytes: max_plan,
                align,
                chunk: if opts.read_chunk == 0 {
                    0
                } else {
                    opts.read_chunk.next_multiple_of(align)
                },
                plans,
                file_ids,
                loading: HashMap::new(),
                pending: Vec::new(),
                verify: opts.verify,
                stats: StreamStats::default(),
                busy_since: None,
                busy_bytes: 0,
                waiting: false,
                bursts: Vec::new(),
                done: Vec::new(),
                loading_errors: Vec::new(),
                epoch: Instant::now(),
                drive_free: 0.0,
            },
            pipe: Pipeline::new(cache, c.top_k, prefetch_k, opts.prefetch_depth),
            budget,
            notes,
            predictor,
            prefetch: opts.prefetch,
            prefetch_k,
            depth: opts.prefetch_depth.max(1),
            step: 0,
            batch_routes: Vec::new(),
            batch_tokens: Vec::new(),
        })
    }

    /// Reads `model`'s dense weights through the engine into owned,
    /// aligned buffers and points the model at them, so the file's map is
    /// never touched for them (in direct mode the page cache stays out of
    /// it). Must run before the model is shared.
    pub fn read_dense(&mut self, model: &mut Model) -> Result<()> {
        let file_ids = self.io.file_ids.clone();
        let mut seen: HashMap<(usize, usize, usize), TensorBytes> = HashMap::new();
        for w in dense_weights(model) {
            for (file, data) in w.parts_mut() {
                if !data.is_mapped() {
                    continue;
                }
                let key = (file, data.offset(), data.len());
                if let Some(b) = seen.get(&key) {
                    *data = b.clone();
                    continue;
                }
                let (buf, skip) = sluice_io::read_exact(
                    self.io.engine.as_mut(),
                    file_ids[file],
                    key.1 as u64,
                    key.2,
                )?;
                let b = TensorBytes::new(Arc::new(buf), skip, key.2);
                seen.insert(key, b.clone());
                *data = b;
            }
        }
        if model.config.tie_embeddings {
            model.lm_head = model.embed.clone();
        }
        Ok(())
    }

    /// The budget the slots were sized from.
    pub fn budget(&self) -> &Budget {
        &self.budget
    }

    /// Counters so far.
    pub fn stats(&self) -> StreamStats {
        self.io.stats
    }

    /// The drive as the engine saw it: each period from an idle drive to
    /// an idle drive that ended while compute waited on a read, as (bytes
    /// read, seconds). Periods that ended under compute are left out, as
    /// their completions were reaped late. Up to 65,536 periods.
    pub fn drive_bursts(&self) -> &[(u64, f64)] {
        &self.io.bursts
    }

    /// The read engine, described.
    pub fn engine_description(&self) -> String {
        self.io.engine.describe()
    }

    /// Whether reads bypass the page cache.
    pub fn direct(&self) -> bool {
        self.io.engine.direct()
    }

    /// Fallbacks and conditions worth telling the user.
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// The cache's eviction policy.
    pub fn policy(&self) -> &'static str {
        self.pipe.cache.policy_name()
    }

    /// Size of one read request: the chunk size, or the whole read when
    /// the largest plan is smaller.
    pub fn request_bytes(&self) -> usize {
        let biggest = self
            .io
            .plans
            .layers
            .iter()
            .flatten()
            .flatten()
            .flat_map(|p| p.segs.iter().map(|s| s.len))
            .max()
            .unwrap_or(0);
        if self.io.chunk == 0 {
            biggest
        } else {
            biggest.min(self.io.chunk)
        }
    }

    /// Prefetcher counters so far.
    pub fn prefetch_stats(&self) -> PrefetchStats {
        self.pipe.pf.stats
    }

    /// The prefetch predictor chosen.
    pub fn prefetch(&self) -> Prefetch {
        self.prefetch
    }

    /// The prefetch predictor's name, if one runs.
    pub fn predictor_name(&self) -> Option<&'static str> {
        (self.prefetch != Prefetch::None).then(|| self.prefetch.name())
    }

    /// Installs the predictor for [`Prefetch::Gate`] or
    /// [`Prefetch::Oracle`], which need what only the forward pass has
    /// (the model's routers, the replayed trace).
    pub fn set_predictor(&mut self, p: Box<dyn Predictor>) {
        self.predictor = Some(p);
    }

    /// The learning predictor, if one runs (to teach it earlier traces).
    pub fn predictor_mut(&mut self) -> Option<&mut (dyn Predictor + 'static)> {
        self.predictor.as_deref_mut()
    }

    /// Experts a predictor ranks per layer.
    pub fn prefetch_k(&self) -> usize {
        self.prefetch_k
    }

    /// A prediction made outside (speculative gating, the oracle, an
    /// embedder's hint) for `layer`, and the time it took; queued for
    /// admission, which starts after the current layer's demand reads.
    pub fn hint(&mut self, layer: usize, experts: Vec<u32>, took: Duration) {
        // Taken as certain: these predictions give no probabilities.
        let ranked: Vec<(u32, f32)> = experts.into_iter().map(|e| (e, 1.0)).collect();
        self.pipe.pf.predict(layer, &ranked);
        self.pipe.pf.stats.predictor += took;
    }

    /// A forward pass over `tokens` starts. Predictors keyed by the token
    /// learn its id; for a single token, one that can guess the first MoE
    /// layer from it does so now, queued for admission at the next tick
    /// (during the first layer's attention).
    pub fn begin(&mut self, tokens: &[u32]) {
        self.batch_tokens.clear();
        self.batch_tokens.extend_from_slice(tokens);
        if tokens.len() > 1 {
            self.pipe.demands.interrupt();
        }
        let ahead = self.moe_layers_ahead(0);
        let Some(p) = &mut self.predictor else {
            return;
        };
        if let [t] = tokens {
            let start = Instant::now();
            p.begin_token(Some(*t));
            if p.predicts_first() {
                let mut pred = Vec::new();
                for &l in &ahead {
                    p.predict_scored(l, self.prefetch_k, &mut pred);
                    self.pipe.pf.predict(l, &pred);
                }
            }
            self.pipe.pf.stats.predictor += start.elapsed();
        }
    }

    /// The MoE layers from `from` on, at most the prefetch depth of them.
    pub fn moe_layers_ahead(&self, from: usize) -> Vec<usize> {
        (from..self.io.plans.layers.len())
            .filter(|&l| self.io.plans.layers[l].is_some())
            .take(self.depth)
            .collect()
    }

    /// Layer `layer` routed the batch to `chosen` (per token, best first);
    /// `hidden` is the block's input for a single token (empty when not
    /// known). The predictor learns from it; for a single token it also
    /// predicts the next MoE layer (and up to the prefetch depth, for
    /// predictors that can guess further), queued for admission: the reads
    /// go out after this layer's demand reads, as admission allows.
    pub fn routed(&mut self, layer: usize, chosen: &[&[usize]], hidden: &[f32]) {
        let ahead = self.moe_layers_ahead(layer + 1);
        let Some(p) = &mut self.predictor else {
            return;
        };
        let t = Instant::now();
        if chosen.len() == 1 && !hidden.is_empty() {
            p.observe_input(layer, hidden);
        }
        if chosen.len() == 1 {
            let ids: Vec<u32> = chosen[0].iter().map(|&e| e as u32).collect();
            p.observe(layer, &ids);
        } else {
            // A batch arrives layer by layer; predictors learn token by
            // token (every layer of a token, then the next), so the batch
            // is replayed to them in that order once its last layer is in.
            self.batch_routes.push((
                layer,
                chosen
                    .iter()
                    .map(|c| c.iter().map(|&e| e as u32).collect())
                    .collect(),
            ));
            if ahead.is_empty() {
                let routes = std::mem::take(&mut self.batch_routes);
                for tok in 0..chosen.len() {
                    p.begin_token(self.batch_tokens.get(tok).copied());
                    for (l, per) in &routes {
                        p.observe(*l, &per[tok]);
                    }
                }
            }
        }
        if chosen.len() == 1 {
            // Predictors that need the layer above guess only the next.
            let n = if p.predicts_ahead() {
                ahead.len()
            } else {
                ahead.len().min(1)
            };
            let mut pred = Vec::new();
            for &nl in &ahead[..n] {
                p.predict_scored(nl, self.prefetch_k, &mut pred);
                self.pipe.pf.predict(nl, &pred);
            }
        }
        self.pipe.pf.stats.predictor += t.elapsed();
    }

    /// Between two computations: absorbs finished reads and sends more
    /// queued predictions to the drive if admission allows.
    /// The forward pass calls it between its larger products, so the
    /// drive is fed while the CPU or GPU computes.
    pub fn tick(&mut self) -> Result<()> {
        if self.pipe.pf.queue().is_empty() && self.io.engine.in_flight() == 0 {
            return Ok(());
        }
        self.feed(false)
    }

    /// Absorbs finished reads and tops up (`force`: everything queued); a
    /// failure drains the reads and drops the prefetch pins.
    fn feed(&mut self, force: bool) -> Result<()> {
        let r = self
            .io
            .poll(&mut self.pipe.cache)
            .and_then(|_| self.pipe.top_up(&mut self.io, self.step, force));
        if let Err(err) = r {
            return self.fail(&[], err);
        }
        Ok(())
    }

    /// Issues every queued prediction's reads now, whatever the admission
    /// window: an embedder's explicit request (it has no forward pass to
    /// tick, and decides itself when the drive may be used).
    pub fn prefetch_now(&mut self, step: u64) -> Result<()> {
        self.step = step;
        self.feed(true)
    }

    /// The first MoE layer after `layer`.
    pub fn next_moe_layer(&self, layer: usize) -> Option<usize> {
        (layer + 1..self.io.plans.layers.len()).find(|&l| self.io.plans.layers[l].is_some())
    }

    /// MoE layers ahead that gating, the oracle and predictors that need
    /// no layer above (`token`) predict.
    pub fn depth(&self) -> usize {
        self.depth
    }

    /// Makes the longest run of `experts[from..]` (ascending ids of
    /// `layer` with the router probability that chose them) the slots
    /// allow resident: hits pinned, misses read in one batch and awaited.
    /// `wave` gets `(expert, slot)` pairs, pinned and ready; returns how
    /// many were taken. Each is let go with [`done`](Self::done) once
    /// computed, or all with [`abort`](Self::abort). On error nothing
    /// stays pinned.
    pub fn fetch(
        &mut self,
        layer: usize,
        experts: &[(usize, f32)],
        from: usize,
        step: u64,
        wave: &mut Vec<(usize, usize)>,
    ) -> Result<usize> {
        if from == 0 {
            self.io.poll(&mut self.pipe.cache)?;
        }
        self.step = step;
        let single = self.batch_tokens.len() <= 1;
        let taken =
            match self
                .pipe
                .load_wave(&mut self.io, layer, experts, from, step, single, wave)
            {
                Ok(t) => t,
                Err(err) => return self.fail(wave, err).map(|_| 0),
            };
        self.io.stats.hits += taken.hits;
        self.io.stats.misses += taken.misses;
        // The whole wave is read before any of it is computed: the stall is
        // then exactly the I/O time of a batch of requests at the wave's
        // queue depth, comparable with the probe. Overlap with compute comes
        // from prefetching the next layers.
        for w in 0..wave.len() {
            if let Err(err) = self.io.wait_slot(&mut self.pipe.cache, wave[w].1) {
                return self.fail(wave, err).map(|_| 0);
            }
        }
        for w in 0..wave.len() {
            let (e, s) = wave[w];
            if self.pipe.cache.state(s) != SlotState::Ready {
                let err = self.io.take_error(s).unwrap_or_else(|| Error::ExpertRead {
                    layer,
                    expert: e,
                    cause: Box::new(Error::Invalid("the read failed".into())),
                });
                return self.fail(wave, err).map(|_| 0);
            }
        }
        Ok(taken.n)
    }

    /// Expert `e` of `layer`, resident in `slot`, has been computed: its
    /// pin goes, and the drive is fed before the next one. On error the
    /// pins of `rest` (the wave's experts not yet computed) go too.
    pub fn done(&mut self, slot: usize, rest: &[(usize, usize)]) -> Result<()> {
        self.pipe.cache.release(slot);
        let r = self
            .io
            .poll(&mut self.pipe.cache)
            .and_then(|_| self.pipe.top_up(&mut self.io, self.step, false));
        if let Err(err) = r {
            return self.fail(rest, err);
        }
        Ok(())
    }

    /// Lets go of the pins of `rest` after a failure outside the
    /// streamer (a computation), draining reads in flight; returns `err`.
    pub fn abort(&mut self, rest: &[(usize, usize)], err: Error) -> Result<()> {
        self.fail(rest, err)
    }

    /// Makes `experts` of `layer` resident (missing ones read in one batch)
    /// and pins them; returns their slots in the same order. Each slot is
    /// released with [`unpin`](Self::unpin). For embedders that run their
    /// own compute on the expert bytes.
    pub fn pin_experts(
        &mut self,
        layer: usize,
        experts: &[usize],
        step: u64,
    ) -> Result<Vec<usize>> {
        if self.io.plans.layers.get(layer).is_none_or(|p| p.is_none()) {
            return Err(Error::NotMoeLayer { layer });
        }
        let n = self.io.plans.layers[layer].as_ref().map_or(0, Vec::len);
        if let Some(&bad) = experts.iter().find(|&&e| e >= n) {
            return Err(Error::ExpertOutOfRange {
                layer,
                expert: bad,
                experts: n,
            });
        }
        let mut uniq: Vec<usize> = experts.to_vec();
        uniq.sort_unstable();
        uniq.dedup();
        if uniq.len() > self.pipe.cache.capacity() {
            return Err(Error::TooManyExperts {
                wanted: uniq.len(),
                slots: self.pipe.cache.capacity(),
            });
        }
        let want: Vec<(usize, f32)> = uniq.iter().map(|&e| (e, 1.0)).collect();
        let mut wave = Vec::new();
        let got = self.fetch(layer, &want, 0, step, &mut wave)?;
        if got < want.len() {
            let slots = self.pipe.cache.capacity();
            let _ = self.fail(&wave, Error::SlotsInUse { layer, slots });
            return Err(Error::SlotsInUse { layer, slots });
        }
        // One pin per requested id (duplicates pin twice).
        let mut out = Vec::with_capacity(experts.len());
        for &e in experts {
            let s = wave.iter().find(|w| w.0 == e).expect("loaded").1;
            if out.iter().any(|&(x, _)| x == e) {
                self.pipe.cache.pin(s);
            }
            out.push((e, s));
        }
        Ok(out.into_iter().map(|(_, s)| s).collect())
    }

    /// Each slot's memory, `(start, bytes)`: what a device that binds
    /// slots in place imports. The memory lives as long as the streamer.
    pub fn slot_memory(&self) -> Vec<(*const u8, usize)> {
        let n = self.io.slot_bytes;
        self.io.ptrs.iter().map(|&p| (p as *const u8, n)).collect()
    }

    /// Undoes one pin taken by [`pin_experts`](Self::pin_experts).
    pub fn unpin(&mut self, slot: usize) {
        self.pipe.cache.release(slot);
    }

    /// Where the three matrices of expert `e` of `layer`, resident in
    /// `slot`, lie. The memory stays valid and unchanged while the slot is
    /// pinned, whoever holds the streamer.
    pub fn expert_parts(&self, layer: usize, e: usize, slot: usize) -> [RawMatrix; 3] {
        let raw = |b: &[u8]| (b.as_ptr(), b.len());
        self.views(layer, e, slot).map(|v| RawMatrix {
            dtype: v.dtype,
            rows: v.rows,
            cols: v.cols,
            data: raw(v.data),
            scales: raw(v.scales),
            biases: raw(v.biases),
            block_row0: v.block_row0,
        })
    }

    /// The file ranges of expert `e` of `layer`'s gate, up and down
    /// matrices: `(file path, offset, bytes)`.
    pub fn expert_source(
        &self,
        layer: usize,
        e: usize,
    ) -> Option<[(std::path::PathBuf, u64, usize); 3]> {
        let plan = self.io.plans.layers.get(layer)?.as_ref()?.get(e)?;
        Some(plan.mats.map(|m| {
            let s = &plan.segs[m.main.seg];
            (
                self.io.engine.path(s.file).to_path_buf(),
                s.offset + m.main.rel as u64,
                m.main.len,
            )
        }))
    }

    /// The three matrices of expert `e` of `layer`, resident in pinned
    /// `slot` (from [`fetch`](Self::fetch)).
    pub fn views(&self, layer: usize, e: usize, slot: usize) -> [WeightView<'_>; 3] {
        let plan = self.io.plans.get(layer, e);
        let at = |l: Loc| &self.io.seg_bytes(slot, &plan.segs[l.seg])[l.rel..l.rel + l.len];
        plan.mats.map(|m| {
            let aux = |l: Option<Loc>| l.map_or(&[][..], at);
            WeightView {
                dtype: m.dtype,
                rows: m.rows,
                cols: m.cols,
                data: at(m.main),
                scales: aux(m.aux[0]),
                biases: aux(m.aux[1]),
                block_row0: m.block_row0,
                id: None,
                part: None,
            }
        })
    }

    /// Releases the pins of `rest` after an error, draining their reads so
    /// that no buffer is written after the error returns.
    fn fail(&mut self, rest: &[(usize, usize)], err: Error) -> Result<()> {
        while self.io.engine.in_flight() > 0 {
            let mut done = std::mem::take(&mut self.io.done);
            let r = self.io.engine.wait(1, &mut done);
            self.io.done = done;
            if r.is_err() {
                break;
            }
            let _ = self.io.absorb(&mut self.pipe.cache);
        }
        for &(_, s) in rest {
            self.pipe.cache.release(s);
        }
        self.pipe.pf.clear(&mut self.pipe.cache);
        self.io.loading_errors.clear();
        Err(err)
    }
}

impl Reader {
    /// Adds the reads that fill `slot` with `key` to the pending batch,
    /// split into `chunk`-sized requests (0: whole).
    fn queue_reads(&mut self, slot: usize, key: ExpertKey, chunk: usize) -> u64 {
        let plan: &ExpertPlan = self.plans.get(key.layer as usize, key.expert as usize);
        let before = self.pending.len();
        let align = self.align as u64;
        let chunk = chunk as u64;
        for s in &plan.segs {
            // Large reads are split at aligned boundaries so a layer's few
            // experts keep the drive's queue full; the chunks land back to
            // back exactly where one widened read would have put them.
            let base = s.offset - s.offset % align;
            let end = s.offset + s.len as u64;
            let mut at = s.offset;
            while at < end {
                let stop = if chunk == 0 {
                    end
                } else {
                    ((at - at % align) + chunk).min(end)
                };
                let rel = (at - at % align - base) as usize;
                self.pending.push(ReadReq {
                    file: s.file,
                    offset: at,
                    len: (stop - at) as usize,
                    // SAFETY: dst + cap lies within slot `slot`'s buffer: rel + the widened chunk ≤ the segment's widened room.
                    dst: unsafe { self.ptrs[slot].add(s.dst + rel) },
                    cap: self.slot_bytes - s.dst - rel,
                    buf_index: Some(slot as u32),
                    tag: (slot as u64) << 8,
                });
                at = stop;
            }
        }
        let n = self.pending.len() - before;
        let wanted = plan.segs.iter().map(|s| s.len as u64).sum::<u64>();
        self.stats.reads += n as u64;
        self.stats.bytes_wanted += wanted;
        self.loading.insert(
            slot,
            Loading {
                key,
                remaining: n,
                error: None,
            },
        );
        wanted
    }

    /// Processes completions: marks slots ready (or failed).
    fn absorb(&mut self, cache: &mut SlotCache) -> Result<()> {
        let mut done = std::mem::take(&mut self.done);
        let mut last = None::<Instant>;
        for c in done.drain(..) {
            let slot = (c.tag >> 8) as usize;
            last = Some(last.map_or(c.completed, |l: Instant| l.max(c.completed)));
            let Some(ld) = self.loading.get_mut(&slot) else {
                continue;
            };
            ld.remaining -= 1;
            match c.result {
                Ok(d) if !d.covers_wanted() => {
                    // An engine that reports success short of the wanted
                    // range must not get a half-filled slot marked valid.
                    if ld.error.is_none() {
                        ld.error = Some(Error::ExpertRead {
                            layer: ld.key.layer as usize,
                            expert: ld.key.expert as usize,
                            cause: Box::new(Error::ShortRead {
                                got: d.bytes_read.saturating_sub(d.skip) as u64,
                                wanted: d.len as u64,
                            }),
                        });
                    }
                }
                Ok(d) => self.stats.bytes_read += d.bytes_read as u64,
                Err(e) => {
                    if ld.error.is_none() {
                        ld.error = Some(Error::ExpertRead {
                            layer: ld.key.layer as usize,
                            expert: ld.key.expert as usize,
                            cause: Box::new(e),
                        });
                    }
                }
            }
            if ld.remaining == 0 {
                let ld = self.loading.remove(&slot).expect("present");
                let mut err = ld.error;
                if err.is_none() && self.verify {
                    err = self.check(slot, ld.key).err();
                }
                match err {
                    None => cache.mark_ready(slot),
                    Some(e) => {
                        cache.mark_failed(slot);
                        self.loading_errors.push((slot, e));
                    }
                }
            }
        }
        if self.engine.in_flight() == 0 {
            if let (Some(s), Some(l)) = (self.busy_since.take(), last) {
                let d = l.saturating_duration_since(s);
                self.stats.io_busy += d;
                if self.waiting && self.bursts.len() < MAX_BURSTS {
                    self.bursts.push((self.busy_bytes, d.as_secs_f64()));
                }
            }
            self.busy_bytes = 0;
        }
        self.done = done;
        self.done.clear();
        Ok(())
    }

    /// Absorbs completed reads without blocking (better completion times,
    /// and prefetched slots turn ready as soon as possible).
    fn poll(&mut self, cache: &mut SlotCache) -> Result<()> {
        if self.engine.in_flight() == 0 {
            return Ok(());
        }
        let mut done = std::mem::take(&mut self.done);
        let r = self.engine.poll(&mut done);
        self.done = done;
        r?;
        self.absorb(cache)
    }

    /// Bytes per second the drive delivered while busy, so far. Reads
    /// that finish under compute are reaped late, which makes this an
    /// underestimate; it is not taken below [`FIRST_RATE`], so a late
    /// reap cannot price every guess out.
    fn measured_rate(&self) -> f64 {
        let busy = self.stats.io_busy.as_secs_f64();
        if busy > 1e-3 && self.stats.bytes_read > 0 {
            (self.stats.bytes_read as f64 / busy).max(FIRST_RATE)
        } else {
            FIRST_RATE
        }
    }

    fn check(&self, slot: usize, key: ExpertKey) -> Result<()> {
        let plan = self.plans.get(key.layer as usize, key.expert as usize);
        let (Some(want), [s]) = (plan.checksum, plan.segs.as_slice()) else {
            return Ok(());
        };
        let b = self.seg_bytes(slot, s);
        let got = xxhash_rust::xxh3::xxh3_64(b);
        if got != want {
            return Err(Error::Checksum {
                path: self.engine.path(s.file).to_path_buf(),
                layer: key.layer as usize,
                expert: key.expert as usize,
                offset: s.offset,
                len: s.len as u64,
            });
        }
        Ok(())
    }

    fn seg_bytes(&self, slot: usize, s: &Seg) -> &[u8] {
        let skip = (s.offset % self.align as u64) as usize;
        // SAFETY: the slot's reads have completed (state Ready, or being verified right after its last completion), so the kernel no longer writes to it; the range lies inside the slot buffer.
        unsafe { std::slice::from_raw_parts(self.ptrs[slot].add(s.dst + skip), s.len) }
    }

    /// Waits until `slot` is no longer loading.
    fn wait_slot(&mut self, cache: &mut SlotCache, slot: usize) -> Result<()> {
        if cache.state(slot) != SlotState::Loading {
            return Ok(());
        }
        let t = Instant::now();
        self.waiting = true;
        let r = (|| {
            while cache.state(slot) == SlotState::Loading && self.loading.contains_key(&slot) {
                let mut done = std::mem::take(&mut self.done);
                let r = self.engine.wait(1, &mut done);
                self.done = done;
                r?;
                self.absorb(cache)?;
            }
            Ok(())
        })();
        self.waiting = false;
        self.stats.stall += t.elapsed();
        r
    }

    fn take_error(&mut self, slot: usize) -> Option<Error> {
        let i = self.loading_errors.iter().position(|(s, _)| *s == slot)?;
        Some(self.loading_errors.swap_remove(i).1)
    }
}

impl Drive for Reader {
    fn load(&mut self, _: &mut SlotCache, slot: usize, key: ExpertKey, demand: bool) -> u64 {
        // Prefetches go out unchunked: fewer requests, and admission, not
        // the chunking, bounds what demand may queue behind.
        let chunk = if demand { self.chunk } else { 0 };
        self.queue_reads(slot, key, chunk)
    }

    fn submit(&mut self, cache: &mut SlotCache) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let reqs = std::mem::take(&mut self.pending);
        if self.busy_since.is_none() {
            self.busy_since = Some(Instant::now());
        }
        let bytes: usize = reqs.iter().map(|r| r.len).sum();
        self.busy_bytes += bytes as u64;
        if self.engine.pace().is_none() {
            let now = self.epoch.elapsed().as_secs_f64();
            self.drive_free = self.drive_free.max(now) + bytes as f64 / self.measured_rate();
        }
        self.stats.batches += 1;
        // SAFETY: every destination is a slot in state Loading: the cache neither evicts nor hands out its bytes until `absorb` has seen all of its completions, and the buffers outlive the engine.
        let r = unsafe { self.engine.submit(&reqs) };
        if r.is_err() {
            // None of the batch went out: its slots hold nothing.
            for q in &reqs {
                let slot = (q.tag >> 8) as usize;
                if self.loading.remove(&slot).is_some() {
                    cache.mark_failed(slot);
                }
            }
        }
        r
    }

    fn loading(&self, cache: &SlotCache, slot: usize) -> bool {
        cache.state(slot) == SlotState::Loading
    }

    /// A paced engine's own clock, or the wall clock with the drive
    /// estimated from the rate measured.
    fn pace(&self) -> Pace {
        if let Some(p) = self.engine.pace() {
            return p;
        }
        let now = self.epoch.elapsed().as_secs_f64();
        // Nothing in flight: the drive is free, whatever the estimate said.
        let drained = if self.engine.in_flight() == 0 {
            now
        } else {
            self.drive_free.max(now)
        };
        Pace {
            now_s: now,
            drained_s: drained,
            bytes_per_s: self.measured_rate(),
            latency_s: 0.0,
        }
    }

    fn read_s(&self, at: &Pace) -> f64 {
        self.slot_bytes as f64 / at.bytes_per_s + at.latency_s
    }

    fn wave_ready(&self, cache: &SlotCache, wave: &[usize]) -> (f64, f64) {
        let t = self.pace();
        let waits = wave.iter().any(|&s| cache.state(s) == SlotState::Loading);
        (t.now_s, if waits { t.drained_s } else { t.now_s })
    }

    fn all_ready(&mut self, cache: &mut SlotCache, wave: &[usize]) -> Result<bool> {
        self.poll(cache)?;
        Ok(wave.iter().all(|&s| cache.state(s) == SlotState::Ready))
    }
}

fn push_new(notes: &mut Vec<String>, more: Vec<String>) {
    for n in more {
        if !notes.contains(&n) {
            notes.push(n);
        }
    }
}

fn policy(p: CachePolicy) -> Box<dyn sluice_cache::Policy> {
    p.build()
}
