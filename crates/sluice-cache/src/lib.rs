//! The expert cache's bookkeeping, free of I/O: which expert sits in which
//! slot, which slots are pinned or still loading, and which one to evict.
//!
//! The same [`SlotCache`] runs in the streaming engine (slots backed by
//! aligned buffers that reads land in), in trace statistics and in the
//! simulator (slots backed by nothing), so hit rates measured without a
//! model are the hit rates the engine gets.
//!
//! Invariants, checked by property tests:
//! - a key is in at most one slot, a slot holds at most one key;
//! - a pinned slot, or one whose read is in flight, is never evicted;
//! - the number of slots never changes, so the byte budget they were sized
//!   from is never exceeded.

mod admit;
mod policy;
mod predict;

pub use admit::{Admit, DemandClock, PrefetchQueue, PrefetchStats, Prefetcher};

pub use policy::{policy_by_name, CachePolicy, Lfu, Lru, Policy, RouterAware, POLICY_NAMES};
pub use predict::{
    predictor_by_name, Belady, CrossLayer, History, Predictor, Prefetch, TokenLayer,
    PREDICTOR_NAMES,
};

use std::collections::{HashMap, HashSet};

/// One expert of one layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExpertKey {
    /// Layer index.
    pub layer: u32,
    /// Expert index within the layer.
    pub expert: u32,
}

impl ExpertKey {
    /// Key of expert `expert` of layer `layer`.
    pub fn new(layer: usize, expert: usize) -> Self {
        ExpertKey {
            layer: layer as u32,
            expert: expert as u32,
        }
    }
}

/// What a slot holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotState {
    /// Nothing.
    Free,
    /// A read into the slot is in flight: its bytes are not valid yet.
    Loading,
    /// The expert's bytes are valid.
    Ready,
}

#[derive(Clone, Debug)]
struct Slot {
    key: Option<ExpertKey>,
    state: SlotState,
    pins: u32,
    /// Filled by a prefetch and not used by a demand since.
    speculative: bool,
}

/// The answer to [`SlotCache::acquire`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Acquire {
    /// The expert is in this slot (ready, or loading by an earlier request).
    Hit(usize),
    /// The expert was given this slot: the caller must fill it, then call
    /// [`SlotCache::mark_ready`] (or [`SlotCache::mark_failed`]).
    Miss(usize),
    /// Every slot is pinned or loading: nothing can be evicted now.
    Full,
}

/// Counters since creation (or the last [`SlotCache::reset_stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Demand lookups that found the expert resident or loading.
    pub hits: u64,
    /// Demand lookups that had to read it.
    pub misses: u64,
    /// Residents dropped to make room.
    pub evictions: u64,
}

impl CacheStats {
    /// Hits over lookups (0 when there were none).
    pub fn hit_rate(&self) -> f64 {
        let n = self.hits + self.misses;
        if n == 0 {
            0.0
        } else {
            self.hits as f64 / n as f64
        }
    }
}

/// A fixed number of expert slots with pinning and a pluggable eviction
/// policy. Logical time (`step`) is supplied by the caller: the engine uses
/// the token index, so policies can weigh recency in tokens.
pub struct SlotCache {
    slots: Vec<Slot>,
    map: HashMap<ExpertKey, usize>,
    free: Vec<usize>,
    policy: Box<dyn Policy>,
    stats: CacheStats,
    /// Slots holding prefetched experts no demand has used yet.
    speculative: usize,
    /// Beyond this many, a prefetch evicts only another speculative slot.
    scratch: usize,
    /// The resident the last prefetch evicted, if it was no prefetch.
    displaced: Option<ExpertKey>,
    /// Prefetched experts whose layer ran without them (slot, key), newest
    /// last: evicted before any resident.
    stale: Vec<(usize, ExpertKey)>,
}

impl SlotCache {
    /// `n` empty slots evicted by `policy`.
    pub fn new(n: usize, policy: Box<dyn Policy>) -> Self {
        SlotCache {
            slots: vec![
                Slot {
                    key: None,
                    state: SlotState::Free,
                    pins: 0,
                    speculative: false,
                };
                n
            ],
            map: HashMap::with_capacity(n),
            // Popped from the back: hand out slot 0 first.
            free: (0..n).rev().collect(),
            policy,
            stats: CacheStats::default(),
            speculative: 0,
            scratch: usize::MAX,
            displaced: None,
            stale: Vec::new(),
        }
    }

    /// Lets prefetches displace at most `n` residents: once `n` slots hold
    /// prefetched experts that no demand has used, a further prefetch
    /// recycles one of those instead of evicting a resident, so wrong
    /// guesses evict no hot expert. Default: no limit.
    pub fn set_scratch(&mut self, n: usize) {
        self.scratch = n;
    }

    /// The resident (not an unused prefetch) that the last
    /// [`prefetch`](Self::prefetch) evicted, once: if a demand soon wants
    /// it back, the prefetch cost a miss.
    pub fn take_displaced(&mut self) -> Option<ExpertKey> {
        self.displaced.take()
    }

    /// Slots holding prefetched experts no demand has used yet.
    pub fn speculative(&self) -> usize {
        self.speculative
    }

    /// The prefetch in `slot` was not used by the layer it was read for:
    /// if no demand has used it since, it is the next slot evicted, before
    /// any resident, so a wrong guess holds a slot only until its layer
    /// has run (under LRU it would otherwise count as the newest use).
    pub fn discard(&mut self, slot: usize) {
        let Some(k) = self.slots[slot]
            .key
            .filter(|_| self.slots[slot].speculative)
        else {
            return;
        };
        if self.stale.len() >= 2 * self.slots.len() {
            // Entries are dropped only when a victim is needed, which a
            // cache with room never needs: keep those that still name an
            // unused prefetch, once each, so the list stays within the
            // slot count however long the run.
            let slots = &self.slots;
            let mut seen = HashSet::new();
            self.stale.retain(|&(s, k)| {
                slots[s].key == Some(k) && slots[s].speculative && seen.insert(s)
            });
        }
        self.stale.push((slot, k));
    }

    /// A discarded prefetch still unused, unpinned and read, if any.
    fn stale_victim(&mut self) -> Option<ExpertKey> {
        while let Some((s, k)) = self.stale.pop() {
            let sl = &self.slots[s];
            if sl.key == Some(k) && sl.speculative && sl.pins == 0 && sl.state == SlotState::Ready {
                return Some(k);
            }
        }
        None
    }

    fn unmark_speculative(&mut self, slot: usize) {
        if std::mem::take(&mut self.slots[slot].speculative) {
            self.speculative -= 1;
        }
    }

    /// Number of slots.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Name of the eviction policy.
    pub fn policy_name(&self) -> &'static str {
        self.policy.name()
    }

    /// Slot holding `key`, if any (ready or loading).
    pub fn slot_of(&self, key: ExpertKey) -> Option<usize> {
        self.map.get(&key).copied()
    }

    /// State of a slot.
    pub fn state(&self, slot: usize) -> SlotState {
        self.slots[slot].state
    }

    /// Key held by a slot.
    pub fn key(&self, slot: usize) -> Option<ExpertKey> {
        self.slots[slot].key
    }

    /// Pin count of a slot.
    pub fn pins(&self, slot: usize) -> u32 {
        self.slots[slot].pins
    }

    /// Resident keys (ready or loading).
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether nothing is resident.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Counters.
    pub fn stats(&self) -> CacheStats {
        self.stats
    }

    /// Zeroes the counters (residents stay).
    pub fn reset_stats(&mut self) {
        self.stats = CacheStats::default();
    }

    /// Demand lookup of `key` at time `step`, with the router's probability
    /// for it. Pins the slot on `Hit` and `Miss`; each pin is undone by one
    /// [`release`](Self::release).
    pub fn acquire(&mut self, key: ExpertKey, step: u64, prob: f32) -> Acquire {
        let r = self.lookup(key, step, prob, false);
        match r {
            Acquire::Hit(s) | Acquire::Miss(s) => {
                self.unmark_speculative(s);
                self.slots[s].pins += 1;
                if matches!(r, Acquire::Hit(_)) {
                    self.stats.hits += 1;
                } else {
                    self.stats.misses += 1;
                }
            }
            Acquire::Full => {}
        }
        r
    }

    /// Acquires the experts one step uses (a layer's choices for a token or
    /// a batch): those already resident first, so that none of the step's
    /// own misses evicts an expert the step is about to use, then the
    /// misses in the given order until no slot can be freed. Returns one
    /// answer per key, in the keys' order (`Full` for those not acquired).
    pub fn acquire_step(&mut self, keys: &[(ExpertKey, f32)], step: u64) -> Vec<Acquire> {
        let mut out = vec![Acquire::Full; keys.len()];
        for (o, &(k, p)) in keys.iter().enumerate() {
            if self.map.contains_key(&k) {
                out[o] = self.acquire(k, step, p);
            }
        }
        for (o, &(k, p)) in keys.iter().enumerate() {
            if out[o] == Acquire::Full {
                out[o] = self.acquire(k, step, p);
                if out[o] == Acquire::Full {
                    break;
                }
            }
        }
        out
    }

    /// Like [`acquire`](Self::acquire) but neither pins nor counts, and
    /// tells the policy it is not a use (probability 0): for prefetches.
    /// Within the scratch limit (see [`set_scratch`](Self::set_scratch)).
    pub fn prefetch(&mut self, key: ExpertKey, step: u64) -> Acquire {
        self.displaced = None;
        let r = self.lookup(key, step, 0.0, true);
        if let Acquire::Miss(s) = r {
            self.slots[s].speculative = true;
            self.speculative += 1;
        }
        r
    }

    fn lookup(&mut self, key: ExpertKey, step: u64, prob: f32, prefetch: bool) -> Acquire {
        if let Some(&s) = self.map.get(&key) {
            self.policy.touch(key, step, prob);
            return Acquire::Hit(s);
        }
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                let stale = self.stale_victim();
                let slots = &self.slots;
                let map = &self.map;
                // Past the scratch limit a prefetch may only recycle a slot
                // of an earlier, unused prefetch.
                let only_spec = prefetch && self.speculative >= self.scratch;
                let evictable = |k: ExpertKey| {
                    map.get(&k).is_some_and(|&s| {
                        slots[s].pins == 0
                            && slots[s].state == SlotState::Ready
                            && (!only_spec || slots[s].speculative)
                    })
                };
                let Some(victim) = stale.or_else(|| self.policy.victim(&evictable)) else {
                    return Acquire::Full;
                };
                debug_assert!(evictable(victim), "policy chose a protected victim");
                if !evictable(victim) {
                    return Acquire::Full;
                }
                let s = self.map.remove(&victim).expect("victim is resident");
                self.policy.remove(victim);
                self.stats.evictions += 1;
                if prefetch && !self.slots[s].speculative {
                    self.displaced = Some(victim);
                }
                self.unmark_speculative(s);
                s
            }
        };
        let sl = &mut self.slots[slot];
        sl.key = Some(key);
        sl.state = SlotState::Loading;
        self.map.insert(key, slot);
        self.policy.insert(key, step, prob);
        Acquire::Miss(slot)
    }

    /// Tells the policy that `key` was used at `step` without looking it
    /// up (routes seen before the cache started, e.g. a prompt).
    pub fn observe(&mut self, key: ExpertKey, step: u64, prob: f32) {
        self.policy.touch(key, step, prob);
    }

    /// The read into `slot` completed: its bytes are valid.
    pub fn mark_ready(&mut self, slot: usize) {
        debug_assert_eq!(self.slots[slot].state, SlotState::Loading);
        self.slots[slot].state = SlotState::Ready;
    }

    /// The read into `slot` failed: the slot is emptied (never left marked
    /// valid half-filled). Pins stay with their holders, who release them.
    pub fn mark_failed(&mut self, slot: usize) {
        self.unmark_speculative(slot);
        if let Some(k) = self.slots[slot].key.take() {
            self.map.remove(&k);
            self.policy.remove(k);
        }
        self.slots[slot].state = SlotState::Free;
        if self.slots[slot].pins == 0 {
            self.free.push(slot);
        }
    }

    /// Pins `slot` (which must hold a key) without counting a lookup: a
    /// prefetcher protects what it just fetched until the demand comes.
    pub fn pin(&mut self, slot: usize) {
        assert!(
            self.slots[slot].key.is_some(),
            "pin of an empty slot {slot}"
        );
        self.slots[slot].pins += 1;
    }

    /// Undoes one pin of `slot`.
    pub fn release(&mut self, slot: usize) {
        let s = &mut self.slots[slot];
        assert!(s.pins > 0, "release of an unpinned slot {slot}");
        s.pins -= 1;
        if s.pins == 0 && s.key.is_none() && !self.free.contains(&slot) {
            // A failed slot comes back once its last holder lets go.
            self.free.push(slot);
        }
    }

    /// Drops `key` if it is resident and neither pinned nor loading.
    /// Returns whether it was dropped.
    pub fn evict(&mut self, key: ExpertKey) -> bool {
        let Some(&s) = self.map.get(&key) else {
            return false;
        };
        if self.slots[s].pins > 0 || self.slots[s].state != SlotState::Ready {
            return false;
        }
        self.map.remove(&key);
        self.policy.remove(key);
        self.unmark_speculative(s);
        self.slots[s] = Slot {
            key: None,
            state: SlotState::Free,
            pins: 0,
            speculative: false,
        };
        self.free.push(s);
        true
    }

    /// Checks the internal invariants (tests and debug builds).
    pub fn check(&self) -> Result<(), String> {
        for (k, &s) in &self.map {
            if self.slots[s].key != Some(*k) {
                return Err(format!("map says {k:?} is in slot {s}, slot disagrees"));
            }
            if self.slots[s].state == SlotState::Free {
                return Err(format!("{k:?} maps to free slot {s}"));
            }
        }
        let spec = self.slots.iter().filter(|s| s.speculative).count();
        if spec != self.speculative {
            return Err(format!(
                "{spec} slots are speculative, the count says {}",
                self.speculative
            ));
        }
        if self.slots.iter().any(|s| s.speculative && s.key.is_none()) {
            return Err("an empty slot is marked speculative".into());
        }
        let held = self.slots.iter().filter(|s| s.key.is_some()).count();
        if held != self.map.len() {
            return Err(format!(
                "{held} slots hold keys, map has {}",
                self.map.len()
            ));
        }
        for &f in &self.free {
            if self.slots[f].key.is_some() || self.slots[f].pins > 0 {
                return Err(format!("free slot {f} is held or pinned"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
