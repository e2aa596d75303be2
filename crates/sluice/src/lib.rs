//! sluice as a dependency: expert streaming for runtimes that bring their
//! own forward pass.
//!
//! A [`Store`] opens a model (GGUF, safetensors or sluice's packed layout),
//! reads nothing but its headers, and serves its routed experts from a
//! RAM-capped cache of preallocated slots filled by io_uring, a pread pool
//! or mmap. [`Store::experts`] returns [`Expert`] guards: each waits until
//! its expert is resident, pins it (it cannot be evicted while the guard
//! lives) and exposes its bytes, quant type and gate/up/down matrices.
//! [`Store::hint`], [`Store::begin_token`] and [`Store::observe`] feed the prefetcher; [`Store::stats`]
//! says what it cost.
//!
//! ```
//! use sluice::{Store, StoreOptions};
//! # let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/models/qwen3_moe");
//! let store = Store::open(path, &StoreOptions { ram_cap: Some(64 << 20), ..Default::default() })?;
//! let g = store.geometry().clone();
//! let layer = g.moe_layers[0];
//! let experts = store.experts(layer, &[0, 3])?;
//! let up = experts[1].up();
//! assert_eq!((up.rows, up.cols), (g.expert_intermediate, g.hidden));
//! assert_eq!(up.data.len(), up.dtype.tensor_bytes(&[up.rows, up.cols])?);
//! drop(experts); // unpins
//! assert_eq!(store.stats().misses, 2);
//! # Ok::<(), sluice::Error>(())
//! ```
//!
//! Threading: a `Store` is `Send + Sync` and cheap to share (`Arc`). Calls
//! lock an internal mutex for their bookkeeping and I/O submission; reading
//! a pinned expert's bytes takes no lock. Guards may move between threads.
//! Memory: the cap bounds everything the store keeps (slots, buffers, the
//! process's own footprint when it opens); slots are allocated at open and
//! never per read. A request for more experts than there are free slots
//! fails rather than overcommitting.

// Every unsafe block and impl must say why it is sound.
#![warn(clippy::undocumented_unsafe_blocks)]

use parking_lot::Mutex;
use sluice_format::model::{Ffn, Model};
use sluice_stream::{StreamOptions, Streamer};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use sluice_core::quant::dequantize;
pub use sluice_core::{DType, Error, Result};
pub use sluice_io::IoKind;
pub use sluice_stream::{CachePolicy, Prefetch};

/// How a [`Store`] reads and caches.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Byte budget for everything the store keeps resident; `None`: every
    /// expert may be cached (within the machine's available memory).
    pub ram_cap: Option<u64>,
    /// Read engine (io_uring by default; falls back to pread with a note).
    pub io: IoKind,
    /// Bypass the page cache (O_DIRECT), so that the cap is the whole story.
    pub direct: bool,
    /// Reads in flight at most.
    pub queue_depth: usize,
    /// Eviction policy.
    pub cache_policy: CachePolicy,
    /// Predictor fed by [`Store::observe`] (and, for `Token`, by
    /// [`Store::begin_token`]): `None`, `Xlayer`, `History` or `Token`
    /// (gating and the oracle need a forward pass: refused).
    pub prefetch: Prefetch,
    /// Use exactly this many expert slots.
    pub slots: Option<usize>,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            ram_cap: None,
            io: IoKind::platform_default(),
            direct: true,
            queue_depth: 16,
            cache_policy: CachePolicy::Lru,
            prefetch: Prefetch::Xlayer,
            slots: None,
        }
    }
}

/// The shape of a model's experts.
#[derive(Clone, Debug)]
pub struct Geometry {
    /// Decoder layers.
    pub layers: usize,
    /// Layers that have routed experts.
    pub moe_layers: Vec<usize>,
    /// Routed experts per MoE layer.
    pub experts: usize,
    /// Experts the router picks per token.
    pub top_k: usize,
    /// Model width (columns of gate and up, rows of down).
    pub hidden: usize,
    /// Expert intermediate size (rows of gate and up).
    pub expert_intermediate: usize,
}

/// Counters since the store opened.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    /// Expert requests served from the cache.
    pub hits: u64,
    /// Expert requests that had to read.
    pub misses: u64,
    /// Bytes read (expert data, including alignment widening).
    pub bytes_read: u64,
    /// Seconds callers waited for reads.
    pub stall_s: f64,
    /// Bytes read ahead by hints and predictions.
    pub prefetch_bytes: u64,
    /// Of those, bytes whose expert was not then requested.
    pub wasted_prefetch_bytes: u64,
    /// Expert slots.
    pub slots: usize,
}

struct Inner {
    streamer: Streamer,
    step: u64,
}

/// An opened model whose experts stream under a RAM cap.
pub struct Store {
    inner: Arc<Mutex<Inner>>,
    geometry: Geometry,
    notes: Vec<String>,
    _model: Model,
}

/// One expert matrix, row-major, `rows × cols` of `dtype` (the layout of
/// GGUF and safetensors alike; see [`DType::row_bytes`]).
#[derive(Clone, Copy, Debug)]
pub struct Matrix<'a> {
    /// Element type (quantized block format or float).
    pub dtype: DType,
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
    /// The bytes.
    pub data: &'a [u8],
    /// MLX types: one scale per group of each row. FP8: the lines of the
    /// scale grid the rows cover ([`sluice_core::Fp8Block`]). Empty
    /// otherwise.
    pub scales: &'a [u8],
    /// MLX types: one bias per group of each row (empty otherwise).
    pub biases: &'a [u8],
    /// FP8: the first row's position in its block of rows (row `r` takes
    /// scale line `(block_row0 + r) / block_rows`); 0 otherwise.
    pub block_row0: usize,
}

/// A resident, pinned expert. Dropping it lets the cache evict it again.
pub struct Expert {
    inner: Arc<Mutex<Inner>>,
    layer: usize,
    id: usize,
    slot: usize,
    parts: [sluice_stream::RawMatrix; 3],
}

// SAFETY: the pointers address slot memory owned by the store's streamer,
// which lives as long as `inner` (held here) and never moves or rewrites a
// slot while it is pinned; the guard holds the pin until it drops.
unsafe impl Send for Expert {}
// SAFETY: as above; the guard only hands out shared views of that memory.
unsafe impl Sync for Expert {}

impl Expert {
    /// Layer index.
    pub fn layer(&self) -> usize {
        self.layer
    }

    /// Expert index within the layer.
    pub fn id(&self) -> usize {
        self.id
    }

    fn matrix(&self, i: usize) -> Matrix<'_> {
        let p = self.parts[i];
        let bytes = |(ptr, len): (*const u8, usize)| {
            // SAFETY: each range lies in a pinned slot (see the Send impl), read-only while the pin lasts, and outlives `&self`; an empty range's pointer is a non-null, aligned slice start.
            unsafe { std::slice::from_raw_parts(ptr, len) }
        };
        Matrix {
            dtype: p.dtype,
            rows: p.rows,
            cols: p.cols,
            data: bytes(p.data),
            scales: bytes(p.scales),
            biases: bytes(p.biases),
            block_row0: p.block_row0,
        }
    }

    /// `intermediate × hidden`.
    pub fn gate(&self) -> Matrix<'_> {
        self.matrix(0)
    }

    /// `intermediate × hidden`.
    pub fn up(&self) -> Matrix<'_> {
        self.matrix(1)
    }

    /// `hidden × intermediate`.
    pub fn down(&self) -> Matrix<'_> {
        self.matrix(2)
    }

    /// Bytes of the three matrices.
    pub fn nbytes(&self) -> usize {
        self.parts
            .iter()
            .map(|p| p.data.1 + p.scales.1 + p.biases.1)
            .sum()
    }
}

impl Drop for Expert {
    fn drop(&mut self) {
        self.inner.lock().streamer.unpin(self.slot);
    }
}

impl Store {
    /// Opens the model at `path` (a GGUF or packed file, or a safetensors
    /// directory). Only headers are read; dense weights are not loaded.
    pub fn open(path: impl AsRef<Path>, o: &StoreOptions) -> Result<Store> {
        let files = sluice_format::ModelFiles::open(path.as_ref())?;
        if o.direct {
            files.advise_random();
        }
        if matches!(o.prefetch, Prefetch::Gate | Prefetch::Oracle) {
            return Err(Error::Invalid(format!(
                "prefetch {} needs a forward pass (the model's routers, a replayed trace); a store serves none, xlayer, history or token",
                o.prefetch.name()
            )));
        }
        let mut model = Model::load(files)?;
        let c = model.config.clone();
        let opts = StreamOptions {
            io: sluice_io::EngineOptions {
                kind: o.io,
                direct: o.direct,
                queue_depth: o.queue_depth.max(1),
                threads: o.queue_depth.clamp(1, 16),
                register: true,
            },
            ram_cap: o.ram_cap,
            slots: o.slots,
            policy: o.cache_policy,
            verify: false,
            ctx: 0,
            batch: 1,
            threads: 1,
            prefetch: o.prefetch,
            dense: false,
            ..StreamOptions::default()
        };
        let streamer = Streamer::open(&mut model, &opts)?;
        let expert_intermediate = model
            .layers
            .iter()
            .find_map(|l| match &l.ffn {
                Ffn::Moe(m) => m.experts.first().map(|e| e.gate.rows),
                Ffn::Dense(_) => None,
            })
            .unwrap_or(0);
        let geometry = Geometry {
            layers: c.n_layers,
            moe_layers: (0..c.n_layers).filter(|&l| c.moe_layers[l]).collect(),
            experts: c.n_experts,
            top_k: c.top_k,
            hidden: c.hidden,
            expert_intermediate,
        };
        let notes = streamer.notes().to_vec();
        Ok(Store {
            inner: Arc::new(Mutex::new(Inner { streamer, step: 0 })),
            geometry,
            notes,
            _model: model,
        })
    }

    /// The experts' shape.
    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    /// Fallbacks and conditions worth telling a user (io_uring refused...).
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// Makes experts `ids` of `layer` resident (reading the missing ones in
    /// one batch), pinned until their guards drop. Fails when `layer` is not
    /// an MoE layer, an id is out of range, or more experts are asked for
    /// than slots are free.
    pub fn experts(&self, layer: usize, ids: &[usize]) -> Result<Vec<Expert>> {
        let mut g = self.inner.lock();
        g.step += 1;
        let step = g.step;
        let slots = g.streamer.pin_experts(layer, ids, step)?;
        Ok(ids
            .iter()
            .zip(slots)
            .map(|(&id, slot)| Expert {
                inner: self.inner.clone(),
                layer,
                id,
                slot,
                parts: g.streamer.expert_parts(layer, id, slot),
            })
            .collect())
    }

    /// Starts reading experts `ids` of `layer` now, without waiting, so a
    /// later [`experts`](Self::experts) call finds them resident.
    pub fn hint(&self, layer: usize, ids: &[usize]) -> Result<()> {
        let mut g = self.inner.lock();
        let step = g.step;
        let n = self.geometry.experts;
        let ids: Vec<u32> = ids.iter().filter(|&&e| e < n).map(|&e| e as u32).collect();
        g.streamer.hint(layer, ids, std::time::Duration::ZERO);
        g.streamer.prefetch_now(step)
    }

    /// Tells the prefetcher that a new decode token starts, with its input
    /// id. A `token` predictor learns the ids this way and reads its guess
    /// for the first MoE layer (and further, to its depth) ahead now; the
    /// other predictors ignore it.
    pub fn begin_token(&self, token: u32) -> Result<()> {
        let mut g = self.inner.lock();
        g.streamer.begin(&[token]);
        let step = g.step;
        g.streamer.prefetch_now(step)
    }

    /// Tells the prefetcher what the router of `layer` decided: its
    /// probabilities over all experts. The top-k feed the predictor, whose
    /// guess for the next MoE layer is read ahead.
    pub fn observe(&self, layer: usize, router_probs: &[f32]) -> Result<()> {
        if router_probs.len() != self.geometry.experts {
            return Err(Error::Invalid(format!(
                "{} router probabilities for {} experts",
                router_probs.len(),
                self.geometry.experts
            )));
        }
        let mut order: Vec<usize> = (0..router_probs.len()).collect();
        order.sort_by(|a, b| router_probs[*b].total_cmp(&router_probs[*a]).then(a.cmp(b)));
        order.truncate(self.geometry.top_k);
        let mut g = self.inner.lock();
        g.streamer.routed(layer, &[&order], &[]);
        let step = g.step;
        g.streamer.prefetch_now(step)
    }

    /// Counters since the store opened.
    pub fn stats(&self) -> Stats {
        let g = self.inner.lock();
        let s = g.streamer.stats();
        let p = g.streamer.prefetch_stats();
        Stats {
            hits: s.hits,
            misses: s.misses,
            bytes_read: s.bytes_read,
            stall_s: s.stall.as_secs_f64(),
            prefetch_bytes: p.bytes,
            wasted_prefetch_bytes: p.wasted_bytes,
            slots: g.streamer.budget().slots,
        }
    }

    /// Where expert `id` of `layer` lies in the model's files: `(path,
    /// offset, bytes)` of its gate, up and down matrices.
    pub fn source(&self, layer: usize, id: usize) -> Option<[(PathBuf, u64, usize); 3]> {
        self.inner.lock().streamer.expert_source(layer, id)
    }
}
