//! sluice's streaming core: experts from storage into a RAM-capped cache.
//!
//! The pieces, each in its own module:
//!
//! * [`budget`]: where the RAM cap goes, and how many expert slots are
//!   left; one pure [`plan`](budget::plan) for the streamer and the
//!   simulator alike.
//! * `plan`: read plans. Every routed expert becomes the byte ranges of its
//!   three matrices (merged when adjacent: one read per expert in the
//!   packed layout) and where each matrix lands in a slot. Built from the
//!   format crate's description of where tensors lie, not from the engine.
//! * [`pipeline`]: the one prefetch loop, over a [`Drive`]: a layer's
//!   demand takes its slots, then queued predictions go to the drive as
//!   admission allows. The real streamer's drive is a read engine; the
//!   simulator's is its flash queue.
//! * [`Streamer`]: the real thing: a [`sluice_io::ReadEngine`] filling
//!   preallocated aligned slots, completions, verification and failures.
//!
//! A forward pass asks [`Streamer::fetch`] for the experts a layer routed
//! to, in ascending order: hits are pinned, misses get a slot and are read
//! in one batch; each expert is computed from [`Streamer::views`] and let
//! go with [`Streamer::done`], in order, so the result is bit-identical to
//! the resident run.

// Every unsafe block and impl must say why it is sound.
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod budget;
pub mod pipeline;
mod plan;
mod streamer;

pub use budget::{scratch_bytes, Budget};
pub use pipeline::{Drive, Pipeline};
pub use sluice_cache::{CachePolicy, Prefetch, PrefetchStats};
pub use streamer::{RawMatrix, Streamer};

use sluice_io::{EngineOptions, ReadEngine};
use std::sync::Arc;
use std::time::Duration;

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
    /// Eviction policy.
    pub policy: CachePolicy,
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
    /// Predictor that prefetches the next layers' experts (`Gate` and
    /// `Oracle` predictions are made outside and handed over with
    /// [`Streamer::hint`]).
    pub prefetch: Prefetch,
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
    /// Extra copies of the linear-attention layers' state the caller
    /// keeps (a chat's snapshots for going back in the conversation),
    /// counted with the KV cache.
    pub state_copies: usize,
    /// Extra whole sequence states (a `ctx`-token KV cache and the linear
    /// layers' state each) the caller keeps: conversations a server puts
    /// aside between requests.
    pub kv_copies: usize,
    /// Alignment of each slot's start and length (0: the read engine's):
    /// a GPU that binds slots in place takes whole pages
    /// (`DeviceExec::host_align`).
    pub slot_align: usize,
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
            policy: CachePolicy::Lru,
            verify: false,
            ctx: 4096,
            batch: 512,
            threads: 1,
            read_chunk: 512 << 10,
            prefetch: Prefetch::None,
            prefetch_k: 0,
            prefetch_depth: 1,
            dense: true,
            engine_wrap: None,
            device_copies: 0,
            state_copies: 0,
            kv_copies: 0,
            slot_align: 0,
        }
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
