//! Prefetch admission: which predicted experts go to the drive, and when.
//!
//! A prediction is a ranked guess. Reading all of it at once puts its
//! wrong guesses in the drive's queue ahead of the next layer's demand,
//! which on a saturated drive costs more than the right guesses save. The
//! queue below lets predictions out one expert at a time, only while the
//! drive holds fewer than a window of prefetched experts, and drops what is
//! still queued when its layer's demand arrives: an unneeded prefetch that
//! never went out costs neither a read nor a slot.
//!
//! When the caller knows the time ([`DemandClock`]), admission is priced
//! instead ([`Admit::Timed`]): a guess goes out if what it is expected to
//! save exceeds what it is sure to cost. A read that ends before the next
//! layer's demand reaches the drive costs nothing (the drive was idle
//! under compute), so any guess may take that time; one that runs past
//! the demand by `o` seconds delays every demand read behind it by `o`
//! and, if right, saves its own read time `x`; if wrong, the resident its
//! slot displaced may be wanted back (a share `q` of them were, so far):
//! it goes out if `p·x > o + (1-p)·q·x`.

use crate::{ExpertKey, SlotCache};
use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

/// Floor rise at a demand that a wrong guess blocked.
const FLOOR_UP: f32 = 0.2;
/// Floor fall at a demand with nothing in the way.
const FLOOR_DOWN: f32 = 0.02;
/// The floor never shuts prefetch off entirely.
const FLOOR_MAX: f32 = 0.95;
/// Residents displaced by prefetches that are remembered, to notice a
/// demand for one of them.
const DISPLACED_MEMORY: usize = 64;

/// How predictions are let out to the drive.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Admit {
    /// Everything queued, whatever the window and floor: an embedder's
    /// explicit request.
    Force,
    /// The adaptive window and probability floor: no timing is known.
    Window,
    /// Priced by time: the next guess, of probability `p`, goes out if
    /// `p · read_s` exceeds the time by which its read would run past the
    /// next demand plus `(1 - p) · q · read_s`, `q` being the share of
    /// displaced residents wanted back ([`PrefetchQueue::displaced_cost`]),
    /// and the drive is free before the demand. `slack_s` is the time from when the
    /// drive will have delivered what it has (and what went out before in
    /// this round) to the next layer's expected demand; `read_s` is the
    /// time one expert's read takes.
    Timed {
        /// Seconds the drive is free before the next demand (negative: it
        /// is busy past it).
        slack_s: f64,
        /// Seconds one expert's read occupies the drive.
        read_s: f64,
    },
}

/// Weight of a new gap in [`DemandClock`]'s average.
const GAP_WEIGHT: f64 = 0.2;
/// A gap this many times the average is not a layer's compute (a pause
/// between requests, a prompt) and is not averaged.
const GAP_OUTLIER: f64 = 4.0;

/// When the next layer's demand is expected: the compute time between one
/// demand's data being in and the next demand, averaged over the
/// single-token layers so far, added to when the last demand's reads end.
/// Times are seconds on the caller's clock (wall time, or a simulated
/// device's).
#[derive(Clone, Debug, Default)]
pub struct DemandClock {
    gap: f64,
    last_done: Option<f64>,
}

impl DemandClock {
    /// A layer's demand was issued at `now`; its reads end at `done` (now,
    /// if all were resident).
    pub fn demand(&mut self, now: f64, done: f64) {
        if let Some(last) = self.last_done {
            let g = now - last;
            if g > 0.0 && (self.gap == 0.0 || g < GAP_OUTLIER * self.gap) {
                self.gap = if self.gap == 0.0 {
                    g
                } else {
                    (1.0 - GAP_WEIGHT) * self.gap + GAP_WEIGHT * g
                };
            }
        }
        self.last_done = Some(done.max(now));
    }

    /// A batch (a prompt) ran: its layers' gaps are not a token's, so the
    /// next gap is not measured from it.
    pub fn interrupt(&mut self) {
        self.last_done = None;
    }

    /// When the next demand is expected, once a gap has been measured.
    pub fn next_demand(&self) -> Option<f64> {
        match (self.last_done, self.gap > 0.0) {
            (Some(t), true) => Some(t + self.gap),
            _ => None,
        }
    }

    /// The average gap between a demand's data and the next demand.
    pub fn gap(&self) -> f64 {
        self.gap
    }
}

/// Predicted experts waiting to be read, nearest layer first and most
/// likely first within a layer, with an adaptive window of prefetched
/// experts allowed in flight.
///
/// The window follows what the drive was doing when each layer's demand
/// arrived: if prefetches the demand does not use were still being read,
/// the demand queued behind them, so the window halves; otherwise, if the
/// layer still had predictions queued, the drive had room for more than
/// the window let out, so the window grows by one (additive increase,
/// multiplicative decrease, as in TCP's congestion window).
///
/// Each prediction carries its estimated probability of use, and only
/// those at or above a floor go out. A wasted read still in flight at the
/// demand delays every demand read behind it; on a saturated drive that
/// costs more than a right guess saves. A resident that a prefetch evicted
/// and the demand now wants is a miss the guess caused. Either makes the
/// demand a *blocking* one. So each blocking demand raises the
/// floor by 0.2 and each demand with nothing in the way lowers it by 0.02:
/// the floor settles where about one demand in ten finds a wrong guess in
/// its way, and falls to zero on a drive with room to spare. (On the
/// simulated phone with the recorded traces, no drive speed tried makes
/// cross-layer prefetch slower than none: docs/BENCHMARKS.md.) The engine
/// and the simulator run this same code.
#[derive(Clone, Debug)]
pub struct PrefetchQueue {
    queue: VecDeque<(ExpertKey, f32)>,
    window: usize,
    floor: f32,
    displaced: VecDeque<ExpertKey>,
    max: usize,
    cancelled: u64,
    /// Residents displaced by prefetches, counted at their layer's next
    /// demand, and how many of those that demand wanted.
    displaced_seen: u64,
    displaced_lost: u64,
}

impl PrefetchQueue {
    /// An empty queue whose window starts at one expert and never exceeds
    /// `max` (at least one).
    pub fn new(max: usize) -> Self {
        PrefetchQueue {
            queue: VecDeque::new(),
            window: 1,
            floor: 0.0,
            displaced: VecDeque::new(),
            max: max.max(1),
            cancelled: 0,
            displaced_seen: 0,
            displaced_lost: 0,
        }
    }

    /// Prefetched experts currently allowed in flight.
    pub fn window(&self) -> usize {
        self.window
    }

    /// The probability below which predictions are dropped unread.
    pub fn floor(&self) -> f32 {
        self.floor
    }

    /// Predictions dropped unread so far.
    pub fn cancelled(&self) -> u64 {
        self.cancelled
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Replaces the queued prediction for `layer` with `ranked` (expert
    /// and probability of use, most likely first; duplicates ignored),
    /// after the queued entries of nearer (lower) layers and before those
    /// of further ones.
    pub fn push(&mut self, layer: usize, ranked: &[(u32, f32)]) {
        self.queue.retain(|(k, _)| k.layer as usize != layer);
        let at = self
            .queue
            .iter()
            .position(|(k, _)| k.layer as usize > layer)
            .unwrap_or(self.queue.len());
        let mut seen: Vec<(u32, f32)> = Vec::with_capacity(ranked.len());
        for &(e, p) in ranked {
            if !seen.iter().any(|s| s.0 == e) {
                seen.push((e, p));
            }
        }
        for (i, (e, p)) in seen.into_iter().enumerate() {
            self.queue
                .insert(at + i, (ExpertKey::new(layer, e as usize), p));
        }
    }

    /// The next expert to read, if fewer than the window's worth of
    /// prefetched experts are `in_flight`; predictions below the
    /// probability floor on the way are dropped.
    pub fn next(&mut self, in_flight: usize) -> Option<ExpertKey> {
        if in_flight >= self.window {
            return None;
        }
        while let Some((k, p)) = self.queue.pop_front() {
            if p >= self.floor {
                return Some(k);
            }
            self.cancelled += 1;
        }
        None
    }

    /// The next expert to read under [`Admit::Timed`]: the head of the
    /// queue if its expected saving exceeds its cost (see there). What is
    /// behind it is for the same layer and no more likely, or for a layer
    /// further ahead, whose guesses wait for the nearer layer's; the queue
    /// is kept for the next call, when the drive may have room.
    pub fn next_timed(&mut self, slack_s: f64, read_s: f64) -> Option<ExpertKey> {
        let &(k, p) = self.queue.front()?;
        let p = p.clamp(0.0, 1.0) as f64;
        let overrun = (read_s - slack_s).max(0.0);
        let gain = p * read_s - overrun - (1.0 - p) * self.displaced_cost() * read_s;
        if gain > 0.0 && slack_s > 0.0 {
            self.queue.pop_front();
            return Some(k);
        }
        None
    }

    /// The share of residents displaced by prefetches that their layer's
    /// next demand wanted back: what a wrong guess's slot is expected to
    /// cost, in reads. Starts at 0.1 (five displacements' worth of prior).
    pub fn displaced_cost(&self) -> f64 {
        (self.displaced_lost as f64 + 0.5) / (self.displaced_seen as f64 + 5.0)
    }

    /// A prefetch evicted resident `key` (see `SlotCache::take_displaced`).
    pub fn note_displaced(&mut self, key: ExpertKey) {
        if self.displaced.len() >= DISPLACED_MEMORY {
            self.displaced.pop_front();
        }
        self.displaced.retain(|&k| k != key);
        self.displaced.push_back(key);
    }

    /// At `layer`'s demand for `demanded`: whether a prefetch lately
    /// evicted one of them that is not `resident` again, i.e. a wrong
    /// guess cost this demand a miss. Forgets the layer's entries.
    pub fn lost_to_prefetch(
        &mut self,
        layer: usize,
        demanded: impl Iterator<Item = usize>,
        resident: impl Fn(ExpertKey) -> bool,
    ) -> bool {
        let want: Vec<usize> = demanded.collect();
        let (mut seen, mut lost) = (0, 0);
        self.displaced.retain(|&k| {
            if k.layer as usize != layer {
                return true;
            }
            seen += 1;
            if want.contains(&(k.expert as usize)) && !resident(k) {
                lost += 1;
            }
            false
        });
        self.displaced_seen += seen;
        self.displaced_lost += lost;
        lost > 0
    }

    /// The next expert to read whatever the window and floor (an
    /// embedder's explicit request).
    pub fn pop(&mut self) -> Option<ExpertKey> {
        self.queue.pop_front().map(|(k, _)| k)
    }

    /// Layer `layer`'s demand arrived: drops its queued entries (and any
    /// for layers before it, which can no longer be used); returns how many
    /// were dropped.
    pub fn cancel(&mut self, layer: usize) -> usize {
        let before = self.queue.len();
        self.queue.retain(|(k, _)| k.layer as usize > layer);
        let n = before - self.queue.len();
        self.cancelled += n as u64;
        n
    }

    /// Adapts the window to the drive's state at a layer's demand:
    /// `blocking`, prefetch reads the demand does not use were still in
    /// flight; `starved`, predictions for the layer were dropped unread.
    pub fn adapt(&mut self, blocking: bool, starved: bool) {
        if blocking {
            self.window = (self.window / 2).max(1);
            self.floor = (self.floor + FLOOR_UP).min(FLOOR_MAX);
        } else {
            self.floor = (self.floor - FLOOR_DOWN).max(0.0);
            if starved {
                self.window = (self.window + 1).min(self.max);
            }
        }
    }

    /// Drops everything queued (a failed read, a new sequence); the
    /// window is kept.
    pub fn clear(&mut self) {
        self.queue.clear();
    }
}

/// Counters of the prefetcher.
#[derive(Clone, Copy, Debug, Default)]
pub struct PrefetchStats {
    /// Experts prefetched: read ahead, or pinned where already resident.
    pub prefetched: u64,
    /// Of those, experts the layer then used.
    pub prefetched_used: u64,
    /// Predicted experts dropped unread: still queued when their layer's
    /// demand arrived, or below the probability floor.
    pub cancelled: u64,
    /// Experts the predicted layers used.
    pub demanded: u64,
    /// Layer-steps with a prediction.
    pub layer_steps: u64,
    /// Layer-steps whose experts were all resident and read when demanded.
    pub all_ready: u64,
    /// Bytes read for prefetches.
    pub bytes: u64,
    /// Bytes read for prefetches the layer did not use.
    pub wasted_bytes: u64,
    /// Time spent in the predictor.
    pub predictor: Duration,
}

impl PrefetchStats {
    /// `self - earlier`.
    pub fn since(&self, e: &PrefetchStats) -> PrefetchStats {
        PrefetchStats {
            prefetched: self.prefetched - e.prefetched,
            prefetched_used: self.prefetched_used - e.prefetched_used,
            cancelled: self.cancelled - e.cancelled,
            demanded: self.demanded - e.demanded,
            layer_steps: self.layer_steps - e.layer_steps,
            all_ready: self.all_ready - e.all_ready,
            bytes: self.bytes - e.bytes,
            wasted_bytes: self.wasted_bytes - e.wasted_bytes,
            predictor: self.predictor.saturating_sub(e.predictor),
        }
    }
}

/// The prefetcher's bookkeeping between predictions and demands, shared
/// by the engine (real reads) and the simulator (reads on a device
/// clock), which differ only in how a read is issued and in what "still
/// in flight" means (a slot still loading, or a read due later).
///
/// Per layer it remembers what was predicted and prefetched, pins what it
/// fetched until the layer's demand, and at that demand scores the
/// prediction, steers the [`PrefetchQueue`] and lets the pins go.
#[derive(Debug)]
pub struct Prefetcher {
    queue: PrefetchQueue,
    /// Layers with a prediction not yet scored against their demand.
    predicted: HashSet<usize>,
    /// Per layer: the experts prefetched for it.
    issued: HashMap<usize, Vec<u32>>,
    /// (layer, slot) pinned by prefetches until the layer's demand.
    pins: Vec<(usize, usize)>,
    /// (layer, slot, expert) whose read a prefetch started.
    reads: Vec<(usize, usize, u32)>,
    /// Prefetched experts not yet used, with their bytes.
    bytes_of: HashMap<ExpertKey, u64>,
    /// Counters so far.
    pub stats: PrefetchStats,
}

impl Prefetcher {
    /// Nothing predicted yet, for predictions of `per_layer` experts up to
    /// `depth` layers ahead (the window's largest size; priced admission
    /// has no such bound). Gives `cache` its scratch quota: room for one round of
    /// prefetches in flight and the previous one's, at most a quarter of
    /// the cache, so wrong guesses recycle those slots instead of evicting
    /// residents.
    pub fn new(cache: &mut SlotCache, per_layer: usize, depth: usize) -> Self {
        let most = per_layer.max(1) * depth.max(1);
        cache.set_scratch((2 * most).min(cache.capacity() / 4).max(1));
        Prefetcher {
            queue: PrefetchQueue::new(most),
            predicted: HashSet::new(),
            issued: HashMap::new(),
            pins: Vec::new(),
            reads: Vec::new(),
            bytes_of: HashMap::new(),
            stats: PrefetchStats::default(),
        }
    }

    /// The admission queue.
    pub fn queue(&self) -> &PrefetchQueue {
        &self.queue
    }

    /// A prediction for `layer`: experts with their probabilities of use,
    /// most likely first. Replaces what is still queued of an earlier one
    /// for the same layer; experts already prefetched for it are not
    /// queued again.
    pub fn predict(&mut self, layer: usize, ranked: &[(u32, f32)]) {
        self.predicted.insert(layer);
        match self.issued.get(&layer) {
            Some(done) if !done.is_empty() => {
                let fresh: Vec<(u32, f32)> = ranked
                    .iter()
                    .copied()
                    .filter(|(e, _)| !done.contains(e))
                    .collect();
                self.queue.push(layer, &fresh);
            }
            _ => self.queue.push(layer, ranked),
        }
    }

    /// Whether `layer` has a prediction not yet scored.
    pub fn has_prediction(&self, layer: usize) -> bool {
        self.predicted.contains(&layer)
    }

    /// Prefetch reads still in flight (`loading(slot)`), forgetting the
    /// finished ones.
    pub fn in_flight(&mut self, loading: impl Fn(usize) -> bool) -> usize {
        self.reads.retain(|&(_, s, _)| loading(s));
        self.reads.len()
    }

    /// The next expert to prefetch, if `admit` lets it out and prefetch
    /// pins leave `cache` room for a layer of `top_k`. `loading(cache,
    /// slot)` tells whether a slot's read is still in flight.
    pub fn next(
        &mut self,
        cache: &SlotCache,
        top_k: usize,
        admit: Admit,
        loading: impl Fn(&SlotCache, usize) -> bool,
    ) -> Option<ExpertKey> {
        let cap = cache.capacity();
        if self.pins.len() >= cap.saturating_sub(top_k).max(cap / 2) {
            return None;
        }
        match admit {
            Admit::Force => self.queue.pop(),
            Admit::Window => {
                let n = self.in_flight(|s| loading(cache, s));
                self.queue.next(n)
            }
            Admit::Timed { slack_s, read_s } => {
                // Forget finished reads, as the window's count does.
                self.in_flight(|s| loading(cache, s));
                self.queue.next_timed(slack_s, read_s)
            }
        }
    }

    /// `cache.prefetch(key)` gave `slot`: pins it until the layer's
    /// demand. `read` is the bytes of the read issued into it (`None`: it
    /// was resident already).
    pub fn took(&mut self, cache: &mut SlotCache, key: ExpertKey, slot: usize, read: Option<u64>) {
        let layer = key.layer as usize;
        cache.pin(slot);
        self.pins.push((layer, slot));
        self.issued.entry(layer).or_default().push(key.expert);
        if let Some(bytes) = read {
            self.stats.bytes += bytes;
            self.bytes_of.insert(key, bytes);
            self.reads.push((layer, slot, key.expert));
            if let Some(v) = cache.take_displaced() {
                self.queue.note_displaced(v);
            }
        }
    }

    /// `layer`'s demand for `demanded` arrives: drops what is still queued
    /// for it, steers the window from what the drive is doing (`loading`),
    /// scores the prediction and releases the layer's prefetch pins. Call
    /// it before the demand takes its slots, so wrong guesses give theirs
    /// up first.
    pub fn settle(
        &mut self,
        cache: &mut SlotCache,
        layer: usize,
        demanded: &[usize],
        loading: impl Fn(&SlotCache, usize) -> bool,
    ) {
        let cancelled = self.queue.cancel(layer);
        let used = |e: u32| demanded.contains(&(e as usize));
        let lost = self
            .queue
            .lost_to_prefetch(layer, demanded.iter().copied(), |k| {
                cache.slot_of(k).is_some()
            });
        if self.predicted.remove(&layer) {
            let c: &SlotCache = cache;
            self.in_flight(|s| loading(c, s));
            // Reads for further layers (prefetch depth > 1) are not yet
            // known to be wrong: they are judged at their own layer.
            let blocking = self.reads.iter().any(|&(l, _, e)| l == layer && !used(e));
            self.queue.adapt(blocking || lost, cancelled > 0);
            let pred = self.issued.remove(&layer).unwrap_or_default();
            self.stats.layer_steps += 1;
            self.stats.prefetched += pred.len() as u64;
            self.stats.demanded += demanded.len() as u64;
            self.stats.prefetched_used += pred.iter().filter(|&&e| used(e)).count() as u64;
        }
        self.issued.retain(|&l, _| l > layer);
        self.stats.cancelled = self.queue.cancelled();
        let mut keep = Vec::new();
        for (l, s) in std::mem::take(&mut self.pins) {
            if l == layer {
                cache.release(s);
                if !cache.key(s).is_some_and(|k| used(k.expert)) {
                    cache.discard(s);
                }
            } else {
                keep.push((l, s));
            }
        }
        self.pins = keep;
        let mut wasted = 0;
        self.bytes_of.retain(|k, b| {
            if k.layer as usize != layer {
                return true;
            }
            if !used(k.expert) {
                wasted += *b;
            }
            false
        });
        self.stats.wasted_bytes += wasted;
    }

    /// Forgets every prediction and lets go of every prefetch pin (after
    /// a failure, or before a new pass); counters and window are kept.
    pub fn clear(&mut self, cache: &mut SlotCache) {
        for (_, s) in std::mem::take(&mut self.pins) {
            cache.release(s);
        }
        self.queue.clear();
        self.predicted.clear();
        self.issued.clear();
        self.reads.clear();
        self.bytes_of.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn nearest_layer_first_and_rank_kept() {
        let mut q = PrefetchQueue::new(8);
        let p = |v: &[u32]| v.iter().map(|&e| (e, 1.0)).collect::<Vec<_>>();
        q.push(5, &p(&[3, 1, 3, 2]));
        q.push(4, &p(&[9]));
        q.push(6, &p(&[7]));
        q.push(5, &p(&[8, 0]));
        let order: Vec<(u32, u32)> = std::iter::from_fn(|| q.next(0))
            .map(|k| (k.layer, k.expert))
            .collect();
        assert_eq!(order, vec![(4, 9), (5, 8), (5, 0), (6, 7)]);
    }

    #[test]
    fn window_limits_and_adapts() {
        let mut q = PrefetchQueue::new(3);
        q.push(1, &[(0, 1.0), (1, 0.9), (2, 0.8), (3, 0.7), (4, 0.6)]);
        assert!(q.next(0).is_some());
        assert!(q.next(1).is_none(), "window starts at one");
        q.adapt(false, true);
        q.adapt(false, true);
        q.adapt(false, true);
        assert_eq!(q.window(), 3, "capped at max");
        assert!(q.next(2).is_some());
        assert!(q.next(3).is_none());
        q.adapt(true, true);
        assert_eq!(q.window(), 1, "blocking halves, even when starved too");
        q.adapt(true, false);
        assert_eq!(q.window(), 1, "never below one");
        assert_eq!(q.cancel(1), 3);
        assert_eq!(q.cancelled(), 3);
        assert!(q.is_empty());
    }

    #[test]
    fn a_demand_for_a_displaced_resident_is_noticed() {
        let mut q = PrefetchQueue::new(4);
        q.note_displaced(ExpertKey::new(3, 7));
        q.note_displaced(ExpertKey::new(4, 1));
        assert!(!q.lost_to_prefetch(3, [2, 5].into_iter(), |_| false));
        q.note_displaced(ExpertKey::new(3, 7));
        assert!(
            !q.lost_to_prefetch(3, [7].into_iter(), |_| true),
            "resident again: no miss"
        );
        q.note_displaced(ExpertKey::new(3, 7));
        assert!(q.lost_to_prefetch(3, [7].into_iter(), |_| false));
        assert!(
            !q.lost_to_prefetch(3, [7].into_iter(), |_| false),
            "forgotten"
        );
        assert!(q.lost_to_prefetch(4, [1].into_iter(), |_| false));
        for e in 0..100 {
            q.note_displaced(ExpertKey::new(0, e));
        }
        assert_eq!(q.displaced.len(), DISPLACED_MEMORY, "bounded memory");
    }

    #[test]
    fn floor_after_blocking_drops_unlikely_predictions() {
        let mut q = PrefetchQueue::new(4);
        q.adapt(true, false);
        q.adapt(true, false);
        assert!(
            (q.floor() - 0.4).abs() < 1e-6,
            "rises 0.2 per blocking demand"
        );
        q.push(2, &[(6, 0.3), (7, 0.6)]);
        assert_eq!(q.next(0).map(|k| k.expert), Some(7), "0.3 is skipped");
        assert_eq!(q.cancelled(), 1);
        for _ in 0..5 {
            q.adapt(false, true);
        }
        assert!(
            (q.floor() - 0.3).abs() < 1e-6,
            "falls 0.02 per clean demand"
        );
        for _ in 0..100 {
            q.adapt(true, false);
        }
        assert!(q.floor() < 1.0, "never shuts prefetch off");
        for _ in 0..100 {
            q.adapt(false, false);
        }
        assert_eq!(q.floor(), 0.0, "and reaches zero");
    }

    /// Priced admission: a guess runs past the next demand only by less
    /// than its expected saving (`p` times its read time) net of what its
    /// slot is expected to cost if wrong (the share of displaced residents
    /// that were wanted back, times a read).
    #[test]
    fn timed_admission_prices_the_overrun_and_the_slot() {
        let mut q = PrefetchQueue::new(1);
        assert!((q.displaced_cost() - 0.1).abs() < 1e-12, "the prior");
        q.push(1, &[(0, 0.9), (1, 0.5), (2, 0.05)]);
        assert_eq!(q.next_timed(1.0, 1.0).map(|k| k.expert), Some(0));
        assert_eq!(q.next_timed(0.2, 1.0), None, "overrun 0.8 > 0.5 · 1.0");
        assert_eq!(q.next_timed(0.6, 1.0).map(|k| k.expert), Some(1));
        assert_eq!(
            q.next_timed(1.0, 1.0),
            None,
            "0.05 saves less than its slot costs (0.95 · 0.1), even in idle time"
        );
        assert_eq!(q.cancelled(), 0, "kept for when it may pass");
        // Twenty displaced residents, none wanted back: slots are cheap.
        for e in 0..20 {
            q.note_displaced(ExpertKey::new(7, e));
        }
        assert!(!q.lost_to_prefetch(7, [40, 41].into_iter(), |_| false));
        assert!(q.displaced_cost() < 0.03);
        assert_eq!(q.next_timed(1.0, 1.0).map(|k| k.expert), Some(2));
        q.push(2, &[(3, 1.0)]);
        assert_eq!(
            q.next_timed(0.0, 1.0),
            None,
            "no slack at all: even a sure guess is demand"
        );
        assert_eq!(q.next_timed(1e-3, 1.0).map(|k| k.expert), Some(3));
        assert_eq!(q.next_timed(5.0, 1.0), None, "empty");
        // Most displaced residents wanted back: a 0.4 guess saves less
        // than the read its slot is likely to cost.
        for _ in 0..5 {
            for e in 0..20 {
                q.note_displaced(ExpertKey::new(8, e));
            }
            assert!(q.lost_to_prefetch(8, 0..20, |_| false));
        }
        assert!(q.displaced_cost() > 0.8);
        q.push(3, &[(4, 0.4)]);
        assert_eq!(q.next_timed(10.0, 1.0), None);
    }

    /// The next demand is the last one's end plus the average gap; gaps
    /// that are pauses, not compute, are not averaged.
    #[test]
    fn demand_clock_averages_gaps() {
        let mut c = DemandClock::default();
        assert_eq!(c.next_demand(), None);
        c.demand(0.0, 1.0);
        assert_eq!(c.next_demand(), None, "no gap yet");
        c.demand(3.0, 3.0);
        assert_eq!(c.gap(), 2.0);
        assert_eq!(c.next_demand(), Some(5.0));
        c.demand(4.0, 6.0);
        assert!((c.gap() - (0.8 * 2.0 + 0.2 * 1.0)).abs() < 1e-12);
        assert_eq!(c.next_demand(), Some(6.0 + c.gap()));
        let g = c.gap();
        c.demand(100.0, 100.0);
        assert_eq!(c.gap(), g, "a pause is not a layer's compute");
        c.interrupt();
        c.demand(200.0, 201.0);
        assert_eq!(c.gap(), g, "nothing measured across a batch");
        assert_eq!(c.next_demand(), Some(201.0 + g));
        let mut d = DemandClock::default();
        d.demand(1.0, 0.5);
        d.demand(2.0, 2.0);
        assert_eq!(d.gap(), 1.0, "a demand ends no earlier than it is issued");
    }

    fn issue(pf: &mut Prefetcher, cache: &mut SlotCache) -> ExpertKey {
        let key = pf
            .next(cache, 1, Admit::Force, |_, _| true)
            .expect("queued");
        let crate::Acquire::Miss(s) = cache.prefetch(key, 0) else {
            panic!("{key:?} was not resident")
        };
        pf.took(cache, key, s, Some(100));
        key
    }

    /// A layer predicted again (a refined guess, or one made from further
    /// ahead) does not queue the experts already prefetched for it.
    #[test]
    fn a_repeated_prediction_does_not_read_twice() {
        let mut cache = SlotCache::new(8, crate::policy_by_name("lru").unwrap());
        let mut pf = Prefetcher::new(&mut cache, 2, 2);
        pf.predict(1, &[(3, 0.9), (4, 0.8)]);
        assert_eq!(issue(&mut pf, &mut cache), ExpertKey::new(1, 3));
        pf.predict(1, &[(3, 0.9), (5, 0.7)]);
        let rest: Vec<u32> = std::iter::from_fn(|| pf.next(&cache, 1, Admit::Force, |_, _| true))
            .map(|k| k.expert)
            .collect();
        assert_eq!(rest, vec![5], "4 replaced, 3 not again");
        pf.settle(&mut cache, 1, &[3, 5], |_, _| false);
        assert_eq!(pf.stats.prefetched, 1);
        assert_eq!(pf.stats.prefetched_used, 1);
    }

    /// At a layer's demand, a read still in flight for a further layer is
    /// not a wrong guess in the way (it is judged at its own layer); an
    /// unused one for this layer is.
    #[test]
    fn only_this_layers_wrong_guesses_block() {
        let mut cache = SlotCache::new(8, crate::policy_by_name("lru").unwrap());
        let mut pf = Prefetcher::new(&mut cache, 2, 2);
        pf.predict(2, &[(7, 0.9)]);
        issue(&mut pf, &mut cache);
        pf.predict(1, &[(0, 0.9)]);
        pf.settle(&mut cache, 1, &[0], |_, _| true);
        assert_eq!(pf.queue().floor(), 0.0);
        assert_eq!(pf.queue().window(), 2, "starved, not blocked: grows");
        pf.predict(3, &[(1, 0.9)]);
        issue(&mut pf, &mut cache);
        pf.settle(&mut cache, 2, &[7], |_, _| true);
        assert_eq!(pf.queue().floor(), 0.0, "7 was used");
        pf.settle(&mut cache, 3, &[2], |_, _| true);
        assert!((pf.queue().floor() - FLOOR_UP).abs() < 1e-6);
        assert_eq!(pf.queue().window(), 1, "halved");
    }

    proptest! {
        /// Whatever the pushes and cancels, the queue is ordered by layer,
        /// holds no duplicate, never holds a cancelled layer's entries, and
        /// the window stays within [1, max].
        #[test]
        fn invariants(ops in proptest::collection::vec((0usize..6, proptest::collection::vec(0u32..10, 0..6), 0u8..4), 1..40), max in 1usize..6) {
            let mut q = PrefetchQueue::new(max);
            for (layer, ranked, op) in ops {
                match op {
                    0 | 1 => {
                        let r: Vec<(u32, f32)> = ranked.iter().map(|&e| (e, e as f32 / 10.0)).collect();
                        q.push(layer, &r);
                    }
                    2 => {
                        q.cancel(layer);
                        prop_assert!(q.queue.iter().all(|(k, _)| k.layer as usize > layer));
                    }
                    _ => q.adapt(ranked.len() % 2 == 0, ranked.len() % 3 == 0),
                }
                let v: Vec<ExpertKey> = q.queue.iter().map(|e| e.0).collect();
                prop_assert!(v.windows(2).all(|w| w[0].layer <= w[1].layer));
                let mut d = v.clone();
                d.sort();
                d.dedup();
                prop_assert_eq!(d.len(), v.len());
                prop_assert!(q.window() >= 1 && q.window() <= max);
            }
        }
    }
}
