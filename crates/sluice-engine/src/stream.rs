//! Streaming experts from storage into a RAM-capped cache.
//!
//! [`Streamer::open`] turns a loaded model into a streaming one: dense
//! weights are read once through the read engine into owned, aligned
//! buffers (the model file's map is never touched for them, so the page
//! cache stays out of it in direct mode), and every routed expert becomes a
//! read plan: the byte ranges of its three matrices, merged when they are
//! adjacent (one read per expert in the packed layout), and where each
//! matrix lands in a slot. Slots are preallocated aligned buffers, sized
//! from the RAM budget that is left once dense weights, the KV cache,
//! scratch and the process's own footprint are counted ([`Budget`]).
//!
//! The forward pass asks [`Streamer::run_experts`] for the experts a layer
//! routed to, in ascending order: hits are pinned, misses get a slot and are
//! read in one batch, and each expert is computed as soon as its bytes are
//! in, in order, so the result is bit-identical to the resident run.

use crate::config::Config;
use crate::model::{Ffn, MixerWeights, Model, Weight};
use crate::pack::PackInfo;
use crate::replay::Replay;
use sluice_cache::{
    policy_by_name, predictor_by_name, Acquire, Admit, DemandClock, ExpertKey, Predictor,
    Prefetcher, SlotCache, SlotState,
};
use sluice_core::{DType, Error, Result, WeightView};
use sluice_format::TensorBytes;
use sluice_io::{AlignedBuf, Completion, EngineOptions, FileId, Pace, ReadEngine, ReadReq};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How to stream.
#[derive(Clone, Debug)]
pub struct StreamOptions {
    /// Read engine.
    pub io: EngineOptions,
    /// Byte budget for everything sluice keeps resident; `None`: no cap
    /// (every expert gets a slot, up to the memory the machine has).
    pub ram_cap: Option<u64>,
    /// Use exactly this many expert slots (must fit the cap).
    pub slots: Option<usize>,
    /// Eviction policy (`lru`, `lfu`, `router`).
    pub policy: String,
    /// Check each record against the packed manifest's checksum.
    pub verify: bool,
    /// Tokens the KV cache must hold.
    pub ctx: usize,
    /// Largest batch of tokens one forward call processes.
    pub batch: usize,
    /// Compute threads (for scratch accounting).
    pub threads: usize,
    /// Split reads larger than this into chunks (0: never).
    pub read_chunk: usize,
    /// Predictor that prefetches the next layer's experts (`none`,
    /// `xlayer`, `history`, `token`; `gate` and `oracle` are the forward
    /// pass's).
    pub prefetch: String,
    /// Experts a predictor ranks per layer (0: the model's top-k); how
    /// many of them are read depends on the drive's spare time.
    pub prefetch_k: usize,
    /// MoE layers ahead that gating, the oracle and predictors that need
    /// no layer above (`token`) prefetch for (≥ 1).
    pub prefetch_depth: usize,
    /// Read the dense weights into RAM (the forward pass needs them; an
    /// embedder that only wants expert bytes does not).
    pub dense: bool,
    /// Wraps the opened read engine (the simulated device paces reads so).
    pub engine_wrap: Option<EngineWrap>,
    /// Bytes of dense weights the compute backend may copy into memory of
    /// its own that is the same RAM (a GPU on unified memory keeping
    /// resident weights on the device). Planned under the cap, up to the
    /// dense weights' size, with one expert's upload buffer beside them.
    pub device_copies: u64,
}

/// A function that wraps a read engine in another.
pub type WrapFn = dyn Fn(Box<dyn ReadEngine>) -> Box<dyn ReadEngine> + Send + Sync;

/// A [`WrapFn`] for [`StreamOptions::engine_wrap`].
#[derive(Clone)]
pub struct EngineWrap(pub Arc<WrapFn>);

impl std::fmt::Debug for EngineWrap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EngineWrap")
    }
}

impl Default for StreamOptions {
    fn default() -> Self {
        StreamOptions {
            io: EngineOptions::default(),
            ram_cap: None,
            slots: None,
            policy: "lru".into(),
            verify: false,
            ctx: 4096,
            batch: 512,
            threads: 1,
            read_chunk: 512 << 10,
            prefetch: "none".into(),
            prefetch_k: 0,
            prefetch_depth: 1,
            dense: true,
            engine_wrap: None,
            device_copies: 0,
        }
    }
}

/// Where the RAM cap goes. All figures in bytes.
#[derive(Clone, Debug, Default)]
pub struct Budget {
    /// The cap (`u64::MAX` when none).
    pub cap: u64,
    /// Resident set of the process before any weight was read: code,
    /// tokenizer, headers, allocator.
    pub baseline: u64,
    /// Safety margin for allocator slack and thread stacks.
    pub margin: u64,
    /// Dense weights, read into owned buffers.
    pub dense: u64,
    /// KV cache for `ctx` tokens.
    pub kv: u64,
    /// Activations and per-thread buffers for the largest batch.
    pub scratch: u64,
    /// The compute backend's own copies in the same RAM
    /// ([`StreamOptions::device_copies`]).
    pub device: u64,
    /// One expert slot (largest read plan, widened for direct I/O).
    pub slot: u64,
    /// Slots allocated.
    pub slots: usize,
    /// Routed experts in the model.
    pub experts_total: usize,
}

impl Budget {
    /// Headroom kept under a cap: allocator slack and stacks.
    pub fn margin_for(cap: u64) -> u64 {
        if cap == u64::MAX {
            0
        } else {
            (16 << 20) + cap / 100
        }
    }

    /// Bytes planned in all.
    pub fn planned(&self) -> u64 {
        self.baseline
            + self.margin
            + self.dense
            + self.kv
            + self.scratch
            + self.device
            + self.slot * self.slots as u64
    }

    /// One line for the user.
    pub fn describe(&self) -> String {
        let mb = |b: u64| b as f64 / 1e6;
        let cap = if self.cap == u64::MAX {
            "no cap".to_string()
        } else {
            format!("cap {:.1} MB", mb(self.cap))
        };
        let device = if self.device > 0 {
            format!(" + GPU copies {:.1} MB", mb(self.device))
        } else {
            String::new()
        };
        format!(
            "{cap}: process {:.1} MB + margin {:.1} MB + dense {:.1} MB + KV {:.1} MB + scratch {:.1} MB{device} + {} expert slots × {:.2} MB = {:.1} MB ({} of {} experts fit)",
            mb(self.baseline),
            mb(self.margin),
            mb(self.dense),
            mb(self.kv),
            mb(self.scratch),
            self.slots,
            mb(self.slot),
            mb(self.planned()),
            self.slots.min(self.experts_total),
            self.experts_total
        )
    }
}

/// Counters of a streaming run.
#[derive(Clone, Copy, Debug, Default)]
pub struct StreamStats {
    /// Expert lookups served from the cache.
    pub hits: u64,
    /// Expert lookups that had to read.
    pub misses: u64,
    /// Read requests issued.
    pub reads: u64,
    /// Batches of reads submitted together (one per wave with a miss).
    pub batches: u64,
    /// Bytes the engine moved (including alignment widening).
    pub bytes_read: u64,
    /// Bytes of expert data wanted.
    pub bytes_wanted: u64,
    /// Time the compute thread waited for reads.
    pub stall: Duration,
    /// Time at least one read was in flight.
    pub io_busy: Duration,
}

impl StreamStats {
    /// Hits over lookups.
    pub fn hit_rate(&self) -> f64 {
        sluice_cache::CacheStats {
            hits: self.hits,
            misses: self.misses,
            evictions: 0,
        }
        .hit_rate()
    }

    /// `self - earlier`, for per-phase figures.
    pub fn since(&self, earlier: &StreamStats) -> StreamStats {
        StreamStats {
            hits: self.hits - earlier.hits,
            misses: self.misses - earlier.misses,
            reads: self.reads - earlier.reads,
            batches: self.batches - earlier.batches,
            bytes_read: self.bytes_read - earlier.bytes_read,
            bytes_wanted: self.bytes_wanted - earlier.bytes_wanted,
            stall: self.stall.saturating_sub(earlier.stall),
            io_busy: self.io_busy.saturating_sub(earlier.io_busy),
        }
    }
}

pub use sluice_cache::PrefetchStats;

/// One read of an expert's plan.
#[derive(Clone, Copy, Debug)]
struct Seg {
    file: FileId,
    offset: u64,
    len: usize,
    /// Start of this read's destination within the slot.
    dst: usize,
}

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
    /// MLX scales (empty otherwise).
    pub scales: (*const u8, usize),
    /// MLX biases (empty otherwise).
    pub biases: (*const u8, usize),
}

/// Where a byte range of an expert lies once its reads are in.
#[derive(Clone, Copy, Debug, Default)]
struct Loc {
    seg: usize,
    rel: usize,
    len: usize,
}

/// Where one matrix of an expert lies once its reads are in.
#[derive(Clone, Copy, Debug)]
struct Mat {
    main: Loc,
    /// MLX scales and biases.
    aux: Option<[Loc; 2]>,
    dtype: DType,
    rows: usize,
    cols: usize,
}

#[derive(Clone, Debug)]
struct ExpertPlan {
    segs: Vec<Seg>,
    mats: [Mat; 3],
    checksum: Option<u64>,
}

/// A slot whose reads are in flight.
struct Loading {
    key: ExpertKey,
    remaining: usize,
    error: Option<Error>,
}

/// The streaming half of a session: read engine, slots and cache.
pub struct Streamer {
    engine: Box<dyn ReadEngine>,
    cache: SlotCache,
    /// Slot memory, owned by the engine (so that it outlives every read);
    /// reads land and views are taken through these pointers.
    ptrs: Vec<*mut u8>,
    slot_bytes: usize,
    align: usize,
    chunk: usize,
    /// Per layer (None for dense layers), per expert.
    plans: Vec<Option<Vec<ExpertPlan>>>,
    loading: HashMap<usize, Loading>,
    verify: bool,
    budget: Budget,
    stats: StreamStats,
    busy_since: Option<Instant>,
    notes: Vec<String>,
    done: Vec<Completion>,
    loading_errors: Vec<(usize, Error)>,
    predictor: Option<Box<dyn Predictor>>,
    /// Predictions made by the forward pass and handed over with
    /// [`Streamer::hint`]: `gate` (speculative gating: the next layer's
    /// router on this layer's hidden state) or `oracle` (the replayed
    /// trace's actual next choice: the upper bound, for measurement).
    external: Option<&'static str>,
    prefetch_k: usize,
    /// Experts a token uses per layer.
    top_k: usize,
    /// Predictions, admission and prefetch pins (shared with the
    /// simulator); they go out after the current layer's demand and at
    /// the forward pass's ticks.
    pf: Prefetcher,
    depth: usize,
    /// The step of the last demand, for prefetches issued between them.
    step: u64,
    /// Routes of a batch's layers so far, per token.
    batch_routes: Vec<(usize, Vec<Vec<u32>>)>,
    /// The token ids of the batch being processed.
    batch_tokens: Vec<u32>,
    /// When the next layer's demand is expected, for priced admission.
    demands: DemandClock,
    /// The wall clock's zero, for engines that do not pace a drive.
    epoch: Instant,
    /// For those: when the drive will have delivered what was submitted
    /// (seconds after `epoch`), estimated from the bytes and the rate
    /// measured so far.
    drive_free: f64,
}

/// Read rate assumed before any read has been timed (a modest NVMe drive).
const FIRST_RATE: f64 = 1e9;

// SAFETY: the raw slot pointers point into `_bufs`, which the streamer owns
// and never reallocates; moving the streamer to another thread moves the
// buffers with it, and all access goes through `&mut self` or `&self`.
unsafe impl Send for Streamer {}

/// The reads of one expert: its matrices' byte ranges (values, and MLX
/// scales and biases) in file order, neighbours within `gap` bytes merged
/// into one read (a packed record's tensors are padded to its alignment).
fn merge_plan(
    w: [&Weight; 3],
    file_ids: &[FileId],
    align: usize,
    gap: u64,
) -> Result<(Vec<Seg>, [Mat; 3])> {
    // (matrix, part, file, offset, length)
    let mut ranges: Vec<(usize, usize, usize, u64, usize)> = Vec::with_capacity(9);
    for (i, wi) in w.iter().enumerate() {
        for (pi, (file, data)) in wi.parts().into_iter().enumerate() {
            ranges.push((i, pi, file, data.offset() as u64, data.len()));
        }
    }
    ranges.sort_by_key(|r| (r.2, r.3));
    let mut segs: Vec<Seg> = Vec::with_capacity(3);
    let mut at = [[Loc::default(); 3]; 3];
    for &(i, pi, file, off, len) in &ranges {
        let fid = file_ids[file];
        let loc = match segs.last_mut() {
            // Adjacent or nearly: one read, a few wasted bytes.
            Some(s)
                if s.file == fid
                    && off >= s.offset
                    && off.saturating_sub(s.offset + s.len as u64) <= gap =>
            {
                let rel = (off - s.offset) as usize;
                s.len = s.len.max(rel + len);
                Loc {
                    seg: segs.len() - 1,
                    rel,
                    len,
                }
            }
            _ => {
                segs.push(Seg {
                    file: fid,
                    offset: off,
                    len,
                    dst: 0,
                });
                Loc {
                    seg: segs.len() - 1,
                    rel: 0,
                    len,
                }
            }
        };
        at[i][pi] = loc;
    }
    let mut dst = 0;
    for s in &mut segs {
        s.dst = dst;
        dst += sluice_io::max_widened_len(s.len, align).next_multiple_of(align.max(64));
    }
    let mat = |i: usize| Mat {
        main: at[i][0],
        aux: w[i].aux.as_ref().map(|_| [at[i][1], at[i][2]]),
        dtype: w[i].dtype,
        rows: w[i].rows,
        cols: w[i].cols,
    };
    Ok((segs, [mat(0), mat(1), mat(2)]))
}

fn plan_bytes(segs: &[Seg], align: usize) -> usize {
    segs.last().map_or(0, |s| {
        s.dst + sluice_io::max_widened_len(s.len, align).next_multiple_of(align.max(64))
    })
}

/// Every dense weight of a model, mutably (tied weights once).
fn dense_weights(m: &mut Model) -> Vec<&mut Weight> {
    let mut v: Vec<&mut Weight> = vec![&mut m.embed];
    if !m.config.tie_embeddings {
        v.push(&mut m.lm_head);
    }
    for l in &mut m.layers {
        match &mut l.mixer {
            MixerWeights::Attention(a) => {
                v.extend([&mut a.q.w, &mut a.k.w, &mut a.v.w, &mut a.o.w])
            }
            MixerWeights::DeltaNet(d) => {
                v.extend([&mut d.qkv, &mut d.z, &mut d.b, &mut d.a, &mut d.out])
            }
        }
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

/// Bytes of activations and buffers for a batch of `n` tokens of a model
/// whose widest expert has `inter` rows, with `ctx` positions and
/// `threads` compute threads (also the simulator's figure).
pub fn scratch_bytes(c: &Config, inter: usize, n: usize, ctx: usize, threads: usize) -> u64 {
    let (h, qd, kd) = (c.hidden, c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim);
    let per_token = 8 * h + 3 * qd + 2 * kd + 3 * inter + 2 * c.n_experts;
    let per_thread = ctx + 4 * h.max(inter).max(qd);
    // Twice over: the allocator does not hand every freed page back.
    2 * 4 * (n * per_token + c.vocab * n.min(8) + threads * per_thread) as u64
}

impl Streamer {
    /// Prepares `model` for streaming: reads its dense weights into owned
    /// buffers, sizes the expert slots from the budget, opens the engine.
    /// Fails with a message naming the shortfall when the cap cannot hold
    /// dense weights, KV cache and one layer's top-k experts.
    pub fn open(model: &mut Model, opts: &StreamOptions) -> Result<Streamer> {
        let mut engine = sluice_io::open_engine(&opts.io)?;
        if let Some(w) = &opts.engine_wrap {
            engine = (w.0)(engine);
        }
        let mut notes = engine.notes();
        let mut file_ids = Vec::new();
        for f in model.files.files() {
            file_ids.push(engine.open(&f.path)?);
        }
        for n in engine.notes() {
            if !notes.contains(&n) {
                notes.push(n);
            }
        }
        let align = engine.align().max(1);
        let c = model.config.clone();
        // Read plans of every routed expert.
        let pack = PackInfo::of(&model.files)?;
        let mut plans = Vec::with_capacity(c.n_layers);
        let mut moe_index = 0;
        let mut max_plan = 0usize;
        let mut inter = 0usize;
        let mut experts_total = 0usize;
        for l in &model.layers {
            let Ffn::Moe(m) = &l.ffn else {
                plans.push(None);
                continue;
            };
            let mut ps = Vec::with_capacity(m.experts.len());
            for (e, x) in m.experts.iter().enumerate() {
                inter = inter.max(x.gate.rows);
                let gap = pack.as_ref().map_or(4096, |p| p.align.max(4096));
                let (segs, mats) = merge_plan([&x.gate, &x.up, &x.down], &file_ids, align, gap)?;
                max_plan = max_plan.max(plan_bytes(&segs, align));
                let checksum = match &pack {
                    Some(p) if segs.len() == 1 => {
                        p.checksums.get(moe_index * m.experts.len() + e).copied()
                    }
                    _ => None,
                };
                ps.push(ExpertPlan {
                    segs,
                    mats,
                    checksum,
                });
            }
            experts_total += ps.len();
            moe_index += 1;
            plans.push(Some(ps));
        }
        if let Some(p) = &pack {
            if !p.checksums.is_empty() && p.checksums.len() != experts_total {
                return Err(Error::Format {
                    path: model.files.path.clone(),
                    format: "packed",
                    msg: format!(
                        "the manifest has {} record checksums for {experts_total} experts",
                        p.checksums.len()
                    ),
                });
            }
        }
        if opts.verify
            && !plans
                .iter()
                .flatten()
                .flatten()
                .any(|p| p.checksum.is_some())
        {
            return Err(Error::Invalid(
                "--verify needs a packed model with record checksums (make one with `sluice pack`)"
                    .into(),
            ));
        }
        // The budget, from what is resident now.
        let baseline = sluice_io::sys::rss_bytes().unwrap_or(0);
        let mut dense = 0u64;
        for w in dense_weights(model) {
            for (_, d) in w.parts() {
                if d.is_mapped() && opts.dense {
                    dense += sluice_io::max_widened_len(d.len(), align) as u64;
                }
            }
        }
        let kv = c.state_bytes(opts.ctx);
        let scratch = scratch_bytes(&c, inter, opts.batch.max(1), opts.ctx, opts.threads.max(1));
        let cap = opts.ram_cap.unwrap_or(u64::MAX);
        let margin = Budget::margin_for(cap);
        let mut budget = Budget {
            cap,
            baseline,
            margin,
            dense,
            kv,
            scratch,
            device: if opts.device_copies > 0 {
                opts.device_copies.min(dense) + max_plan as u64
            } else {
                0
            },
            slot: max_plan as u64,
            slots: 0,
            experts_total,
        };
        let fixed = budget.planned();
        let min_slots = if experts_total == 0 { 0 } else { c.top_k };
        let fit = if max_plan == 0 {
            0
        } else if cap == u64::MAX {
            // No cap: room for every expert, within what the machine has.
            let avail = sluice_io::sys::mem_available_bytes().unwrap_or(u64::MAX);
            (avail.saturating_sub(fixed) / max_plan as u64).min(experts_total as u64) as usize
        } else {
            (cap.saturating_sub(fixed) / max_plan as u64).min(experts_total as u64) as usize
        };
        let slots = match opts.slots {
            Some(0) if experts_total > 0 => {
                return Err(Error::Invalid("--cache-slots must be at least 1".into()))
            }
            Some(s) if s > fit && cap != u64::MAX => {
                return Err(Error::Invalid(format!(
                    "{s} expert slots do not fit: {}",
                    Budget {
                        slots: s,
                        ..budget.clone()
                    }
                    .describe()
                )))
            }
            // Fewer slots than top-k still computes correctly, a wave of
            // reads at a time: allowed when asked for explicitly.
            Some(s) => s.min(experts_total.max(1)),
            None if fit < min_slots => {
                let need = fixed + max_plan as u64 * min_slots as u64;
                return Err(Error::Invalid(format!(
                    "--ram-cap {} is too small for this model: dense weights {:.1} MB + KV cache {:.1} MB + scratch {:.1} MB + GPU copies {:.1} MB + process {:.1} MB + one layer's {} experts ({:.1} MB) need at least {}",
                    fmt_size(cap),
                    dense as f64 / 1e6,
                    kv as f64 / 1e6,
                    scratch as f64 / 1e6,
                    budget.device as f64 / 1e6,
                    (baseline + margin) as f64 / 1e6,
                    min_slots,
                    (max_plan * min_slots) as f64 / 1e6,
                    fmt_size(need)
                )));
            }
            None => fit,
        };
        budget.slots = slots;
        // Dense weights, read through the engine into owned buffers.
        let mut seen: HashMap<(usize, usize, usize), TensorBytes> = HashMap::new();
        for w in dense_weights(model) {
            for (file, data) in w.parts_mut() {
                if !data.is_mapped() || !opts.dense {
                    continue;
                }
                let key = (file, data.offset(), data.len());
                if let Some(b) = seen.get(&key) {
                    *data = b.clone();
                    continue;
                }
                let (buf, skip) =
                    sluice_io::read_exact(engine.as_mut(), file_ids[file], key.1 as u64, key.2)?;
                let b = TensorBytes::new(Arc::new(buf), skip, key.2);
                seen.insert(key, b.clone());
                *data = b;
            }
        }
        if c.tie_embeddings {
            model.lm_head = model.embed.clone();
        }
        // Slots: one aligned buffer each, allocated now, never per read.
        let mut bufs = Vec::with_capacity(slots);
        for _ in 0..slots {
            bufs.push(AlignedBuf::new(max_plan.max(1), align.max(64))?);
        }
        // The pointers stay valid when the buffers move into the engine
        // (an AlignedBuf's memory does not move with it).
        let ptrs: Vec<*mut u8> = bufs.iter_mut().map(|b| b.as_mut_ptr()).collect();
        engine.register_buffers(bufs)?;
        for n in engine.notes() {
            if !notes.contains(&n) {
                notes.push(n);
            }
        }
        let external = match opts.prefetch.as_str() {
            "gate" => Some("gate"),
            "oracle" => Some("oracle"),
            _ => None,
        };
        let predictor = match opts.prefetch.as_str() {
            "none" | "gate" | "oracle" => None,
            name => Some(
                predictor_by_name(name, c.n_layers, c.n_experts).ok_or_else(|| {
                    Error::Invalid(format!(
                        "unknown predictor {name:?} (known: none, gate, oracle, {})",
                        sluice_cache::PREDICTOR_NAMES.join(", ")
                    ))
                })?,
            ),
        };
        let policy = policy_by_name(&opts.policy).ok_or_else(|| {
            Error::Invalid(format!(
                "unknown cache policy {:?} (known: {})",
                opts.policy,
                sluice_cache::POLICY_NAMES.join(", ")
            ))
        })?;
        let prefetch_k = if opts.prefetch_k == 0 {
            c.top_k
        } else {
            opts.prefetch_k
        };
        let mut cache = SlotCache::new(slots, policy);
        let pf = Prefetcher::new(&mut cache, prefetch_k, opts.prefetch_depth);
        Ok(Streamer {
            engine,
            cache,
            ptrs,
            slot_bytes: max_plan,
            align,
            chunk: if opts.read_chunk == 0 {
                0
            } else {
                opts.read_chunk.next_multiple_of(align)
            },
            plans,
            loading: HashMap::new(),
            verify: opts.verify,
            budget,
            stats: StreamStats::default(),
            busy_since: None,
            notes,
            done: Vec::new(),
            loading_errors: Vec::new(),
            predictor,
            external,
            prefetch_k,
            top_k: c.top_k,
            pf,
            depth: opts.prefetch_depth.max(1),
            step: 0,
            batch_routes: Vec::new(),
            batch_tokens: Vec::new(),
            demands: DemandClock::default(),
            epoch: Instant::now(),
            drive_free: 0.0,
        })
    }

    /// The budget the slots were sized from.
    pub fn budget(&self) -> &Budget {
        &self.budget
    }

    /// Counters so far.
    pub fn stats(&self) -> StreamStats {
        self.stats
    }

    /// The read engine, described.
    pub fn engine_description(&self) -> String {
        self.engine.describe()
    }

    /// Whether reads bypass the page cache.
    pub fn direct(&self) -> bool {
        self.engine.direct()
    }

    /// Fallbacks and conditions worth telling the user.
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// The cache's eviction policy.
    pub fn policy(&self) -> &'static str {
        self.cache.policy_name()
    }

    /// Size of one read request: the chunk size, or the whole read when
    /// the largest plan is smaller.
    pub fn request_bytes(&self) -> usize {
        let biggest = self
            .plans
            .iter()
            .flatten()
            .flatten()
            .flat_map(|p| p.segs.iter().map(|s| s.len))
            .max()
            .unwrap_or(0);
        if self.chunk == 0 {
            biggest
        } else {
            biggest.min(self.chunk)
        }
    }

    /// Adds the reads that fill `slot` with `key` to `reqs`.
    fn queue_reads(&mut self, slot: usize, key: ExpertKey, reqs: &mut Vec<ReadReq>) {
        let plan =
            &self.plans[key.layer as usize].as_ref().expect("MoE layer")[key.expert as usize];
        let before = reqs.len();
        let align = self.align as u64;
        let chunk = self.chunk as u64;
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
                reqs.push(ReadReq {
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
        let n = reqs.len() - before;
        self.stats.reads += n as u64;
        self.stats.bytes_wanted += plan.segs.iter().map(|s| s.len as u64).sum::<u64>();
        self.loading.insert(
            slot,
            Loading {
                key,
                remaining: n,
                error: None,
            },
        );
    }

    /// Submits queued reads in one batch.
    fn submit(&mut self, reqs: &[ReadReq]) -> Result<()> {
        if reqs.is_empty() {
            return Ok(());
        }
        if self.busy_since.is_none() {
            self.busy_since = Some(Instant::now());
        }
        if self.engine.pace().is_none() {
            let now = self.epoch.elapsed().as_secs_f64();
            let bytes: usize = reqs.iter().map(|r| r.len).sum();
            self.drive_free = self.drive_free.max(now) + bytes as f64 / self.measured_rate();
        }
        self.stats.batches += 1;
        // SAFETY: every destination is a slot in state Loading: the cache neither evicts nor hands out its bytes until `absorb` has seen all of its completions, and the buffers outlive the engine.
        unsafe { self.engine.submit(reqs) }
    }

    /// Processes completions: marks slots ready (or failed).
    fn absorb(&mut self) -> Result<()> {
        let done = std::mem::take(&mut self.done);
        let mut last = None::<Instant>;
        for c in &done {
            let slot = (c.tag >> 8) as usize;
            last = Some(last.map_or(c.completed, |l: Instant| l.max(c.completed)));
            let Some(ld) = self.loading.get_mut(&slot) else {
                continue;
            };
            ld.remaining -= 1;
            match &c.result {
                Ok(d) if !d.covers_wanted() => {
                    // An engine that reports success short of the wanted
                    // range must not get a half-filled slot marked valid.
                    if ld.error.is_none() {
                        ld.error = Some(Error::Invalid(format!(
                            "reading layer {} expert {}: the read engine reported success after {} of the wanted {} bytes",
                            ld.key.layer,
                            ld.key.expert,
                            d.bytes_read.saturating_sub(d.skip),
                            d.len
                        )));
                    }
                }
                Ok(d) => self.stats.bytes_read += d.bytes_read as u64,
                Err(e) => {
                    if ld.error.is_none() {
                        ld.error = Some(Error::Invalid(format!(
                            "reading layer {} expert {}: {e}",
                            ld.key.layer, ld.key.expert
                        )));
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
                    None => self.cache.mark_ready(slot),
                    Some(e) => {
                        self.cache.mark_failed(slot);
                        self.loading_errors.push((slot, e));
                    }
                }
            }
        }
        if self.engine.in_flight() == 0 {
            if let (Some(s), Some(l)) = (self.busy_since.take(), last) {
                self.stats.io_busy += l.saturating_duration_since(s);
            }
        }
        self.done = done;
        self.done.clear();
        Ok(())
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

    /// The drive's timing on the engine's clock: a paced engine's own, or
    /// the wall clock with the drive estimated from the rate measured.
    fn drive_time(&self) -> Pace {
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

    fn check(&self, slot: usize, key: ExpertKey) -> Result<()> {
        let plan =
            &self.plans[key.layer as usize].as_ref().expect("MoE layer")[key.expert as usize];
        let (Some(want), [s]) = (plan.checksum, plan.segs.as_slice()) else {
            return Ok(());
        };
        let b = self.seg_bytes(slot, s);
        let got = xxhash_rust::xxh3::xxh3_64(b);
        if got != want {
            return Err(Error::Invalid(format!(
                "{}: checksum mismatch in layer {} expert {} (record at offset {}, {} bytes): the file is corrupt",
                self.engine.path(s.file).display(),
                key.layer,
                key.expert,
                s.offset,
                s.len
            )));
        }
        Ok(())
    }

    fn seg_bytes(&self, slot: usize, s: &Seg) -> &[u8] {
        let skip = (s.offset % self.align as u64) as usize;
        // SAFETY: the slot's reads have completed (state Ready, or being verified right after its last completion), so the kernel no longer writes to it; the range lies inside the slot buffer.
        unsafe { std::slice::from_raw_parts(self.ptrs[slot].add(s.dst + skip), s.len) }
    }

    /// Waits until `slot` is no longer loading.
    fn wait_slot(&mut self, slot: usize) -> Result<()> {
        if self.cache.state(slot) != SlotState::Loading {
            return Ok(());
        }
        let t = Instant::now();
        while self.cache.state(slot) == SlotState::Loading && self.loading.contains_key(&slot) {
            let mut done = std::mem::take(&mut self.done);
            let r = self.engine.wait(1, &mut done);
            self.done = done;
            r?;
            self.absorb()?;
        }
        self.stats.stall += t.elapsed();
        Ok(())
    }

    /// Prefetcher counters so far.
    pub fn prefetch_stats(&self) -> PrefetchStats {
        self.pf.stats
    }

    /// The prefetch predictor's name, if one runs.
    pub fn predictor_name(&self) -> Option<&'static str> {
        self.external
            .or_else(|| self.predictor.as_ref().map(|p| p.name()))
    }

    /// With speculative gating, how many experts to take from the next
    /// layer's router (`None`: gating is not the predictor).
    pub fn gate_k(&self) -> Option<usize> {
        (self.external == Some("gate")).then_some(self.prefetch_k)
    }

    /// Whether the replayed trace's next choice is to be prefetched.
    pub fn wants_oracle(&self) -> bool {
        self.external == Some("oracle")
    }

    /// A prediction made outside (speculative gating, the oracle) for
    /// `layer`, and the time it took; queued for admission, which starts
    /// after the current layer's demand reads.
    pub fn hint(&mut self, layer: usize, experts: Vec<u32>, took: Duration) {
        // Gating and the oracle give no probabilities: taken as certain.
        let ranked: Vec<(u32, f32)> = experts.into_iter().map(|e| (e, 1.0)).collect();
        self.pf.predict(layer, &ranked);
        self.pf.stats.predictor += took;
    }

    /// A forward pass over `tokens` starts. Predictors keyed by the token
    /// learn its id; for a single token, one that can guess the first MoE
    /// layer from it does so now, queued for admission at the next tick
    /// (during the first layer's attention).
    pub fn begin(&mut self, tokens: &[u32]) {
        self.batch_tokens.clear();
        self.batch_tokens.extend_from_slice(tokens);
        if tokens.len() > 1 {
            self.demands.interrupt();
        }
        let ahead = self.moe_layers_ahead(0);
        let Some(p) = &mut self.predictor else {
            return;
        };
        if let [t] = tokens {
            let start = Instant::now();
            p.begin_token(Some(*t));
            if p.predicts_ahead() {
                let mut pred = Vec::new();
                for &l in &ahead {
                    p.predict_scored(l, self.prefetch_k, &mut pred);
                    self.pf.predict(l, &pred);
                }
            }
            self.pf.stats.predictor += start.elapsed();
        }
    }

    /// The MoE layers from `from` on, at most the prefetch depth of them.
    fn moe_layers_ahead(&self, from: usize) -> Vec<usize> {
        (from..self.plans.len())
            .filter(|&l| self.plans[l].is_some())
            .take(self.depth)
            .collect()
    }

    /// Teaches the predictor `replay`'s routes and token ids, mapped onto
    /// this model as routing replay maps them: a table learned in earlier
    /// sessions (`--prefetch-seed`).
    pub fn seed_predictor(&mut self, replay: &Replay) {
        if let Some(p) = &mut self.predictor {
            replay.teach(p.as_mut());
        }
    }

    /// Layer `layer` routed the batch to `chosen` (per token, best first).
    /// The predictor learns from it; for a single token it also predicts
    /// the next MoE layer (and up to the prefetch depth, for predictors
    /// that can guess further), queued for admission: the reads go out
    /// after this layer's demand reads, as admission allows.
    pub fn routed(&mut self, layer: usize, chosen: &[&[usize]]) {
        let ahead = self.moe_layers_ahead(layer + 1);
        let Some(p) = &mut self.predictor else {
            return;
        };
        let t = Instant::now();
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
                self.pf.predict(nl, &pred);
            }
        }
        self.pf.stats.predictor += t.elapsed();
    }

    /// Sends queued predictions to the drive while admission lets them
    /// out (priced against the next demand once a gap between demands is
    /// measured, the adaptive window before), pinning what they fetch
    /// until their layer runs. Called after a layer's demand reads (so
    /// demand goes first) and at the forward pass's ticks between
    /// computations.
    fn top_up(&mut self, step: u64) -> Result<()> {
        self.top_up_with(step, false)
    }

    /// [`top_up`](Self::top_up); with `force`, everything queued goes out
    /// whatever the window and floor.
    fn top_up_with(&mut self, step: u64, force: bool) -> Result<()> {
        if self.pf.queue().is_empty() {
            return Ok(());
        }
        let mut reqs = Vec::new();
        // Prefetches go out unchunked: fewer requests, and admission, not
        // the chunking, bounds what demand may queue behind.
        let chunk = std::mem::replace(&mut self.chunk, 0);
        // Priced once a token's layers have given the gap between demands.
        let timed = match (force, self.demands.next_demand()) {
            (false, Some(d)) => Some((d, self.drive_time())),
            _ => None,
        };
        let mut queued = 0u64;
        loop {
            let admit = match timed {
                _ if force => Admit::Force,
                Some((d, p)) => Admit::Timed {
                    slack_s: d - (p.drained_s.max(p.now_s) + queued as f64 / p.bytes_per_s),
                    read_s: self.slot_bytes as f64 / p.bytes_per_s + p.latency_s,
                },
                None => Admit::Window,
            };
            let Some(key) = self.pf.next(&self.cache, self.top_k, admit, loading) else {
                break;
            };
            match self.cache.prefetch(key, step) {
                Acquire::Hit(s) => self.pf.took(&mut self.cache, key, s, None),
                Acquire::Miss(s) => {
                    let before = self.stats.bytes_wanted;
                    self.queue_reads(s, key, &mut reqs);
                    let bytes = self.stats.bytes_wanted - before;
                    queued += bytes;
                    self.pf.took(&mut self.cache, key, s, Some(bytes));
                }
                // No slot free: the rest waits for the next tick.
                Acquire::Full => break,
            }
        }
        self.chunk = chunk;
        self.submit(&reqs)
    }

    /// Between two computations: absorbs finished reads and sends more
    /// queued predictions to the drive if admission allows.
    /// The forward pass calls it between its larger products, so the
    /// drive is fed while the CPU or GPU computes.
    pub fn tick(&mut self) -> Result<()> {
        if self.pf.queue().is_empty() && self.engine.in_flight() == 0 {
            return Ok(());
        }
        self.feed(false)
    }

    /// Absorbs finished reads and tops up (`force`: everything queued); a
    /// failure drains the reads and drops the prefetch pins.
    fn feed(&mut self, force: bool) -> Result<()> {
        let r = self.poll().and_then(|_| self.top_up_with(self.step, force));
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
        (layer + 1..self.plans.len()).find(|&l| self.plans[l].is_some())
    }

    /// MoE layers ahead that gating, the oracle and predictors that need
    /// no layer above (`token`) predict.
    pub fn depth(&self) -> usize {
        self.depth
    }

    /// Scores the prediction for `layer` against its demand and lets go of
    /// the prefetch pins for it.
    fn settle_prefetch(&mut self, layer: usize, experts: &[(usize, f32)]) {
        let demanded: Vec<usize> = experts.iter().map(|e| e.0).collect();
        self.pf.settle(&mut self.cache, layer, &demanded, loading);
    }

    /// Absorbs completed reads without blocking (better completion times,
    /// and prefetched slots turn ready as soon as possible).
    fn poll(&mut self) -> Result<()> {
        if self.engine.in_flight() == 0 {
            return Ok(());
        }
        let mut done = std::mem::take(&mut self.done);
        let r = self.engine.poll(&mut done);
        self.done = done;
        r?;
        self.absorb()
    }

    /// Runs `f(expert, [gate, up, down])` for each of `experts` (ascending
    /// expert ids with the router probability that chose them) of `layer`,
    /// reading missing experts in batches as large as the free slots allow.
    pub fn run_experts(
        &mut self,
        layer: usize,
        experts: &[(usize, f32)],
        step: u64,
        f: &mut dyn FnMut(usize, [WeightView<'_>; 3]) -> Result<()>,
    ) -> Result<()> {
        self.poll()?;
        self.step = step;
        let mut i = 0;
        let mut wave: Vec<(usize, usize)> = Vec::new();
        while i < experts.len() {
            i += self.load_wave(layer, experts, i, step, &mut wave)?;
            for w in 0..wave.len() {
                let (e, s) = wave[w];
                let r = f(e, self.views(layer, e, s));
                self.cache.release(s);
                // Feed the drive between experts.
                let r = r.and_then(|_| self.poll()).and_then(|_| self.top_up(step));
                if let Err(err) = r {
                    return self.fail(&wave[w + 1..], err);
                }
            }
        }
        Ok(())
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
        if self.plans.get(layer).is_none_or(|p| p.is_none()) {
            return Err(Error::Invalid(format!("layer {layer} is not an MoE layer")));
        }
        let n = self.plans[layer].as_ref().map_or(0, Vec::len);
        if let Some(&bad) = experts.iter().find(|&&e| e >= n) {
            return Err(Error::Invalid(format!(
                "expert {bad} is out of range: layer {layer} has {n} experts"
            )));
        }
        let mut uniq: Vec<usize> = experts.to_vec();
        uniq.sort_unstable();
        uniq.dedup();
        if uniq.len() > self.cache.capacity() {
            return Err(Error::Invalid(format!(
                "{} experts cannot be resident at once in {} slots",
                uniq.len(),
                self.cache.capacity()
            )));
        }
        self.poll()?;
        self.step = step;
        let want: Vec<(usize, f32)> = uniq.iter().map(|&e| (e, 1.0)).collect();
        let mut wave = Vec::new();
        let got = self.load_wave(layer, &want, 0, step, &mut wave)?;
        if got < want.len() {
            let _ = self.fail(&wave, Error::Invalid(String::new()));
            return Err(Error::Invalid(format!(
                "only {got} of {} experts could be pinned in layer {layer}: other slots are in use",
                want.len()
            )));
        }
        // One pin per requested id (duplicates pin twice).
        let mut out = Vec::with_capacity(experts.len());
        for &e in experts {
            let s = wave.iter().find(|w| w.0 == e).expect("loaded").1;
            if out.iter().any(|&(x, _)| x == e) {
                self.cache.pin(s);
            }
            out.push((e, s));
        }
        Ok(out.into_iter().map(|(_, s)| s).collect())
    }

    /// Undoes one pin taken by [`pin_experts`](Self::pin_experts).
    pub fn unpin(&mut self, slot: usize) {
        self.cache.release(slot);
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
        })
    }

    /// The file ranges of expert `e` of `layer`'s gate, up and down
    /// matrices: `(file path, offset, bytes)`.
    pub fn expert_source(
        &self,
        layer: usize,
        e: usize,
    ) -> Option<[(std::path::PathBuf, u64, usize); 3]> {
        let plan = self.plans.get(layer)?.as_ref()?.get(e)?;
        Some(plan.mats.map(|m| {
            let s = &plan.segs[m.main.seg];
            (
                self.engine.path(s.file).to_path_buf(),
                s.offset + m.main.rel as u64,
                m.main.len,
            )
        }))
    }

    fn views(&self, layer: usize, e: usize, slot: usize) -> [WeightView<'_>; 3] {
        let plan = &self.plans[layer].as_ref().expect("MoE layer")[e];
        let at = |l: Loc| &self.seg_bytes(slot, &plan.segs[l.seg])[l.rel..l.rel + l.len];
        plan.mats.map(|m| {
            let (scales, biases): (&[u8], &[u8]) = match m.aux {
                Some([s, b]) => (at(s), at(b)),
                None => (&[], &[]),
            };
            WeightView {
                dtype: m.dtype,
                rows: m.rows,
                cols: m.cols,
                data: at(m.main),
                scales,
                biases,
                id: None,
            }
        })
    }

    /// Acquires, reads and awaits the longest run of `experts[from..]` the
    /// slots allow (residents pinned first), leaving them pinned and ready
    /// in `wave`; returns how many it took. On error nothing stays pinned.
    fn load_wave(
        &mut self,
        layer: usize,
        experts: &[(usize, f32)],
        from: usize,
        step: u64,
        wave: &mut Vec<(usize, usize)>,
    ) -> Result<usize> {
        wave.clear();
        let mut reqs: Vec<ReadReq> = Vec::new();
        let rest = &experts[from..];
        let keys: Vec<(ExpertKey, f32)> = rest
            .iter()
            .map(|&(e, p)| (ExpertKey::new(layer, e), p))
            .collect();
        let predicted = from == 0 && self.pf.has_prediction(layer);
        if from == 0 {
            // Scored and unpinned before the demand takes its slots, so
            // wrong guesses are the first to give theirs up.
            self.settle_prefetch(layer, experts);
        }
        let got = self.cache.acquire_step(&keys, step);
        // A wave is a run of consecutive experts, so that outputs are still
        // accumulated in ascending order across waves; residents pinned
        // beyond it wait for the next wave.
        let end = got
            .iter()
            .position(|a| *a == Acquire::Full)
            .unwrap_or(got.len());
        for (o, a) in got.iter().enumerate() {
            match *a {
                Acquire::Hit(s) if o >= end => self.cache.release(s),
                Acquire::Hit(s) => {
                    self.stats.hits += 1;
                    wave.push((rest[o].0, s));
                }
                Acquire::Miss(s) => {
                    self.stats.misses += 1;
                    self.queue_reads(s, keys[o].0, &mut reqs);
                    wave.push((rest[o].0, s));
                }
                Acquire::Full => {}
            }
        }
        if wave.is_empty() {
            return Err(Error::Invalid(format!(
                "no expert slot can be freed in layer {layer}: {} slots, all in use",
                self.cache.capacity()
            )));
        }
        if predicted && reqs.is_empty() && end == rest.len() {
            self.poll()?;
            if wave
                .iter()
                .all(|&(_, s)| self.cache.state(s) == SlotState::Ready)
            {
                self.pf.stats.all_ready += 1;
            }
        }
        if let Err(err) = self.submit(&reqs) {
            for &(_, s) in wave.iter() {
                if self.loading.remove(&s).is_some() {
                    self.cache.mark_failed(s);
                }
            }
            return self.fail(wave, err).map(|_| 0);
        }
        if from == 0 && self.batch_tokens.len() <= 1 {
            let t = self.drive_time();
            let waits = wave
                .iter()
                .any(|&(_, s)| self.cache.state(s) == SlotState::Loading);
            self.demands
                .demand(t.now_s, if waits { t.drained_s } else { t.now_s });
        }
        if let Err(err) = self.top_up(step) {
            return self.fail(wave, err).map(|_| 0);
        }
        // The whole wave is read before any of it is computed: the stall is
        // then exactly the I/O time of a batch of requests at the wave's
        // queue depth, comparable with the probe. Overlap with compute comes
        // from prefetching the next layers.
        for w in 0..wave.len() {
            if let Err(err) = self.wait_slot(wave[w].1) {
                return self.fail(wave, err).map(|_| 0);
            }
        }
        for w in 0..wave.len() {
            let (e, s) = wave[w];
            if self.cache.state(s) != SlotState::Ready {
                let err = self.take_error(s).unwrap_or_else(|| {
                    Error::Invalid(format!("layer {layer} expert {e}: read failed"))
                });
                return self.fail(wave, err).map(|_| 0);
            }
        }
        Ok(end)
    }

    fn take_error(&mut self, slot: usize) -> Option<Error> {
        let i = self.loading_errors.iter().position(|(s, _)| *s == slot)?;
        Some(self.loading_errors.swap_remove(i).1)
    }

    /// Releases the pins of `rest` after an error, draining their reads so
    /// that no buffer is written after the error returns.
    fn fail(&mut self, rest: &[(usize, usize)], err: Error) -> Result<()> {
        while self.engine.in_flight() > 0 {
            let mut done = std::mem::take(&mut self.done);
            let r = self.engine.wait(1, &mut done);
            self.done = done;
            if r.is_err() {
                break;
            }
            let _ = self.absorb();
        }
        for &(_, s) in rest {
            self.cache.release(s);
        }
        self.pf.clear(&mut self.cache);
        self.loading_errors.clear();
        Err(err)
    }
}

/// Whether a slot's read is still in flight (the prefetcher's view).
fn loading(cache: &SlotCache, slot: usize) -> bool {
    cache.state(slot) == SlotState::Loading
}

/// `1.5G`-style size for messages.
pub fn fmt_size(b: u64) -> String {
    if b == u64::MAX {
        return "unlimited".into();
    }
    let units = [("G", 1u64 << 30), ("M", 1 << 20), ("K", 1 << 10)];
    for (u, n) in units {
        if b >= n {
            return format!("{:.2}{u}", b as f64 / n as f64);
        }
    }
    format!("{b}")
}

/// Parses `12G`, `512M`, `1.5G`, `4096` (binary units).
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => {
            let unit = t[i..].to_ascii_uppercase();
            let m: u64 = match unit.trim_end_matches("IB").trim_end_matches('B') {
                "" => 1,
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                "T" => 1 << 40,
                _ => return Err(Error::Invalid(format!("size {s:?}: unknown unit {unit:?}"))),
            };
            (&t[..i], m)
        }
        None => (t, 1),
    };
    let v: f64 = num.trim().parse().map_err(|_| {
        Error::Invalid(format!(
            "size {s:?} is not a number with an optional K/M/G/T unit"
        ))
    })?;
    if !(v.is_finite() && v >= 0.0) || v * mult as f64 > u64::MAX as f64 / 2.0 {
        return Err(Error::Invalid(format!("size {s:?} is out of range")));
    }
    Ok((v * mult as f64) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("12G").unwrap(), 12 << 30);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("16K").unwrap(), 16 << 10);
        assert_eq!(parse_size("1.5GiB").unwrap(), 3 << 29);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("-1G").is_err());
        assert!(parse_size("G").is_err());
    }
}
