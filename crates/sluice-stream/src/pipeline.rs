//! The one prefetch loop: a layer's demand takes its slots (hits pinned,
//! misses read), then queued predictions go to the drive while admission
//! lets them out. It is written once, over a [`Drive`]: the real streamer's
//! is a read engine filling slot memory, the simulator's a flash queue on a
//! device clock. Everything else (cache, predictions, admission, the clock
//! of demands) is shared state here.

use sluice_cache::{Acquire, Admit, DemandClock, ExpertKey, Prefetcher, SlotCache};
use sluice_core::{Error, Result};
use sluice_io::Pace;

/// Where slot reads go: issue them, tell whether they are in, and when the
/// drive will be free.
pub trait Drive {
    /// Starts (or queues until [`submit`](Self::submit)) the reads that
    /// fill `slot` with `key`; returns the bytes wanted. `demand`: a
    /// layer's own read, which may be split to fill the drive's queue;
    /// prefetches go out whole. A drive that knows at once when the bytes
    /// will be in may mark the slot ready in `cache` now.
    fn load(&mut self, cache: &mut SlotCache, slot: usize, key: ExpertKey, demand: bool) -> u64;

    /// Sends what [`load`](Self::load) queued. On failure, every slot
    /// whose reads did not go out is marked failed in `cache`.
    fn submit(&mut self, cache: &mut SlotCache) -> Result<()>;

    /// Whether `slot`'s bytes are still on their way.
    fn loading(&self, cache: &SlotCache, slot: usize) -> bool;

    /// The drive's clock now: time, when it drains, its rate and latency.
    fn pace(&self) -> Pace;

    /// When the drive will be free, given `at` (taken when a top-up
    /// started) and `queued` bytes sent since.
    fn free_at(&self, at: &Pace, queued: u64) -> f64 {
        at.drained_s.max(at.now_s) + queued as f64 / at.bytes_per_s
    }

    /// Seconds one expert's read occupies the drive.
    fn read_s(&self, at: &Pace) -> f64;

    /// `(now, when every slot of wave will be in)`.
    fn wave_ready(&self, cache: &SlotCache, wave: &[usize]) -> (f64, f64);

    /// Takes in finished reads without blocking; whether every slot of
    /// `wave` is ready.
    fn all_ready(&mut self, cache: &mut SlotCache, wave: &[usize]) -> Result<bool>;
}

/// What one wave of a layer's demand took.
#[derive(Clone, Copy, Debug, Default)]
pub struct Taken {
    /// Experts of the request in the wave (a prefix of what was left).
    pub n: usize,
    /// Of those, found resident.
    pub hits: u64,
    /// Of those, read.
    pub misses: u64,
}

/// The expert cache with its predictions, admission and clock of demands.
pub struct Pipeline {
    /// Slots and eviction.
    pub cache: SlotCache,
    /// Predictions, admission and prefetch pins.
    pub pf: Prefetcher,
    /// When the next layer's demand is expected, for priced admission.
    pub demands: DemandClock,
    /// Experts a token uses per layer (prefetch leaves room for them).
    top_k: usize,
}

impl Pipeline {
    /// A pipeline over `cache` that prefetches up to `per_layer` experts
    /// for `depth` layers ahead, leaving room for a layer of `top_k`.
    pub fn new(mut cache: SlotCache, top_k: usize, per_layer: usize, depth: usize) -> Pipeline {
        let pf = Prefetcher::new(&mut cache, per_layer, depth);
        Pipeline {
            cache,
            pf,
            demands: DemandClock::default(),
            top_k,
        }
    }

    /// Acquires the longest run of `experts[from..]` (ids with the router
    /// probabilities that chose them) the slots allow, residents pinned
    /// first, issues the misses' reads, records the demand (`single`: a
    /// one-token layer, whose timing paces admission) and sends queued
    /// predictions behind them. The wave, `(expert, slot)` pairs, stays
    /// pinned in `wave`, also on error: the caller releases it.
    #[allow(clippy::too_many_arguments)]
    pub fn load_wave<D: Drive>(
        &mut self,
        d: &mut D,
        layer: usize,
        experts: &[(usize, f32)],
        from: usize,
        step: u64,
        single: bool,
        wave: &mut Vec<(usize, usize)>,
    ) -> Result<Taken> {
        wave.clear();
        let rest = &experts[from..];
        let keys: Vec<(ExpertKey, f32)> = rest
            .iter()
            .map(|&(e, p)| (ExpertKey::new(layer, e), p))
            .collect();
        let predicted = from == 0 && self.pf.has_prediction(layer);
        if from == 0 {
            // Scored and unpinned before the demand takes its slots, so
            // wrong guesses are the first to give theirs up.
            self.settle(d, layer, experts);
        }
        let got = self.cache.acquire_step(&keys, step);
        // A wave is a run of consecutive experts, so that outputs are still
        // accumulated in ascending order across waves; residents pinned
        // beyond it wait for the next wave.
        let end = got
            .iter()
            .position(|a| *a == Acquire::Full)
            .unwrap_or(got.len());
        let mut t = Taken {
            n: end,
            ..Taken::default()
        };
        for (o, a) in got.iter().enumerate() {
            match *a {
                Acquire::Hit(s) if o >= end => self.cache.release(s),
                Acquire::Hit(s) => {
                    t.hits += 1;
                    wave.push((rest[o].0, s));
                }
                Acquire::Miss(s) => {
                    t.misses += 1;
                    d.load(&mut self.cache, s, keys[o].0, true);
                    wave.push((rest[o].0, s));
                }
                Acquire::Full => {}
            }
        }
        if wave.is_empty() {
            return Err(Error::SlotsInUse {
                layer,
                slots: self.cache.capacity(),
            });
        }
        let slots: Vec<usize> = wave.iter().map(|w| w.1).collect();
        if predicted
            && t.misses == 0
            && end == rest.len()
            && d.all_ready(&mut self.cache, &slots)?
        {
            self.pf.stats.all_ready += 1;
        }
        d.submit(&mut self.cache)?;
        if from == 0 && single {
            let (now, ready) = d.wave_ready(&self.cache, &slots);
            self.demands.demand(now, ready);
        }
        self.top_up(d, step, false)?;
        Ok(t)
    }

    /// Sends queued predictions to the drive while admission lets them
    /// out (priced against the next demand once a gap between demands is
    /// measured, the adaptive window before; `force`: everything queued),
    /// pinning what they fetch until their layer runs.
    pub fn top_up<D: Drive>(&mut self, d: &mut D, step: u64, force: bool) -> Result<()> {
        if self.pf.queue().is_empty() {
            return Ok(());
        }
        // Priced once a token's layers have given the gap between demands.
        let timed = match (force, self.demands.next_demand()) {
            (false, Some(t)) => Some((t, d.pace())),
            _ => None,
        };
        let mut queued = 0u64;
        loop {
            let admit = match &timed {
                _ if force => Admit::Force,
                Some((t, p)) => Admit::Timed {
                    slack_s: t - d.free_at(p, queued),
                    read_s: d.read_s(p),
                },
                None => Admit::Window,
            };
            let Some(key) = self
                .pf
                .next(&self.cache, self.top_k, admit, |c, s| d.loading(c, s))
            else {
                break;
            };
            match self.cache.prefetch(key, step) {
                Acquire::Hit(s) => self.pf.took(&mut self.cache, key, s, None),
                Acquire::Miss(s) => {
                    let bytes = d.load(&mut self.cache, s, key, false);
                    queued += bytes;
                    self.pf.took(&mut self.cache, key, s, Some(bytes));
                }
                // No slot free: the rest waits for the next tick.
                Acquire::Full => break,
            }
        }
        d.submit(&mut self.cache)
    }

    /// Scores the prediction for `layer` against its demand and lets go
    /// of the prefetch pins for it.
    fn settle<D: Drive>(&mut self, d: &D, layer: usize, experts: &[(usize, f32)]) {
        let demanded: Vec<usize> = experts.iter().map(|e| e.0).collect();
        self.pf
            .settle(&mut self.cache, layer, &demanded, |c, s| d.loading(c, s));
    }
}
