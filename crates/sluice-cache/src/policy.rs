//! Eviction policies. A policy sees every insertion, hit and removal of the
//! [`SlotCache`](crate::SlotCache) it serves and, when a slot is needed,
//! names a victim among the residents the cache allows it to evict.

use crate::ExpertKey;
use lru::LruCache;
use std::collections::HashMap;

/// Chooses which resident expert to evict.
pub trait Policy: Send {
    /// Short name (`lru`, `lfu`, `router`).
    fn name(&self) -> &'static str;
    /// `key` became resident at `step`.
    fn insert(&mut self, key: ExpertKey, step: u64, prob: f32);
    /// `key` was used again at `step`, with router probability `prob`.
    fn touch(&mut self, key: ExpertKey, step: u64, prob: f32);
    /// `key` left the cache.
    fn remove(&mut self, key: ExpertKey);
    /// A resident for which `evictable` holds, or `None` if there is none.
    fn victim(&mut self, evictable: &dyn Fn(ExpertKey) -> bool) -> Option<ExpertKey>;
}

/// The eviction policies sluice offers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum CachePolicy {
    /// Least recently used.
    #[default]
    Lru,
    /// Decayed use counts ([`Lfu`]).
    Lfu,
    /// Recency weighted by router probabilities ([`RouterAware`]).
    Router,
}

impl CachePolicy {
    /// Every policy, in the order reports list them.
    pub const ALL: [CachePolicy; 3] = [CachePolicy::Lru, CachePolicy::Lfu, CachePolicy::Router];

    /// The name used on command lines and in reports.
    pub fn name(self) -> &'static str {
        match self {
            CachePolicy::Lru => "lru",
            CachePolicy::Lfu => "lfu",
            CachePolicy::Router => "router",
        }
    }

    /// A fresh policy of this kind.
    pub fn build(self) -> Box<dyn Policy> {
        match self {
            CachePolicy::Lru => Box::new(Lru::new()),
            CachePolicy::Lfu => Box::new(Lfu::new(64.0)),
            CachePolicy::Router => Box::new(RouterAware::new(8.0)),
        }
    }
}

/// Names of [`CachePolicy::ALL`].
pub const POLICY_NAMES: &[&str] = &["lru", "lfu", "router"];

/// The policy called `name`, or `None`.
pub fn policy_by_name(name: &str) -> Option<Box<dyn Policy>> {
    CachePolicy::ALL
        .into_iter()
        .find(|p| p.name() == name)
        .map(CachePolicy::build)
}

/// Least recently used.
pub struct Lru {
    order: LruCache<ExpertKey, ()>,
}

impl Lru {
    /// An empty LRU order.
    pub fn new() -> Self {
        Lru {
            order: LruCache::unbounded(),
        }
    }
}

impl Default for Lru {
    fn default() -> Self {
        Self::new()
    }
}

impl Policy for Lru {
    fn name(&self) -> &'static str {
        "lru"
    }
    fn insert(&mut self, key: ExpertKey, _: u64, _: f32) {
        self.order.put(key, ());
    }
    fn touch(&mut self, key: ExpertKey, _: u64, _: f32) {
        self.order.promote(&key);
    }
    fn remove(&mut self, key: ExpertKey) {
        self.order.pop(&key);
    }
    fn victim(&mut self, evictable: &dyn Fn(ExpertKey) -> bool) -> Option<ExpertKey> {
        // Least recent first.
        self.order
            .iter()
            .rev()
            .map(|(k, _)| *k)
            .find(|&k| evictable(k))
    }
}

/// A score that decays by half every `half_life` steps: `score(t) =
/// Σ wᵢ · 2^-(t - tᵢ)/h`. Kept for keys after eviction, so an expert that
/// comes back returns with its history.
#[derive(Clone, Copy, Debug)]
struct Decayed {
    score: f64,
    at: u64,
}

struct DecayedScores {
    half_life: f64,
    all: HashMap<ExpertKey, Decayed>,
    resident: Vec<ExpertKey>,
    now: u64,
}

impl DecayedScores {
    fn new(half_life: f64) -> Self {
        DecayedScores {
            half_life: half_life.max(1e-9),
            all: HashMap::new(),
            resident: Vec::new(),
            now: 0,
        }
    }

    fn add(&mut self, key: ExpertKey, step: u64, w: f64) {
        self.now = self.now.max(step);
        let h = self.half_life;
        let e = self.all.entry(key).or_insert(Decayed {
            score: 0.0,
            at: step,
        });
        let dt = step.saturating_sub(e.at) as f64;
        e.score = e.score * (-dt / h).exp2() + w;
        e.at = e.at.max(step);
    }

    fn value(&self, k: &ExpertKey) -> (f64, u64) {
        let d = self
            .all
            .get(k)
            .copied()
            .unwrap_or(Decayed { score: 0.0, at: 0 });
        let dt = self.now.saturating_sub(d.at) as f64;
        (d.score * (-dt / self.half_life).exp2(), d.at)
    }

    fn victim(&self, evictable: &dyn Fn(ExpertKey) -> bool) -> Option<ExpertKey> {
        // Lowest score; ties to the least recently used, then the lower key,
        // so runs are reproducible.
        self.resident
            .iter()
            .copied()
            .filter(|&k| evictable(k))
            .map(|k| (self.value(&k), k))
            .min_by(|((a, at), ka), ((b, bt), kb)| a.total_cmp(b).then(at.cmp(bt)).then(ka.cmp(kb)))
            .map(|(_, k)| k)
    }

    fn remove(&mut self, key: ExpertKey) {
        if let Some(i) = self.resident.iter().position(|&k| k == key) {
            self.resident.swap_remove(i);
        }
    }
}

/// Least frequently used, with frequencies that decay (half-life in steps),
/// so experts that were popular long ago do not squat.
pub struct Lfu(DecayedScores);

impl Lfu {
    /// LFU whose counts halve every `half_life` steps.
    pub fn new(half_life: f64) -> Self {
        Lfu(DecayedScores::new(half_life))
    }
}

/// A use counts once; probability 0 marks a prefetch, which is not a use.
fn use_weight(prob: f32) -> f64 {
    if prob > 0.0 {
        1.0
    } else {
        0.0
    }
}

impl Policy for Lfu {
    fn name(&self) -> &'static str {
        "lfu"
    }
    fn insert(&mut self, key: ExpertKey, step: u64, prob: f32) {
        self.0.add(key, step, use_weight(prob));
        self.0.resident.push(key);
    }
    fn touch(&mut self, key: ExpertKey, step: u64, prob: f32) {
        self.0.add(key, step, use_weight(prob));
    }
    fn remove(&mut self, key: ExpertKey) {
        self.0.remove(key);
    }
    fn victim(&mut self, evictable: &dyn Fn(ExpertKey) -> bool) -> Option<ExpertKey> {
        self.0.victim(evictable)
    }
}

/// Recency over the last tokens weighted by the router's probabilities: an
/// expert the router chose with weight 0.6 two tokens ago outranks one it
/// chose with weight 0.05 just now. The half-life is short (in tokens).
pub struct RouterAware(DecayedScores);

impl RouterAware {
    /// Scores halve every `half_life` steps.
    pub fn new(half_life: f64) -> Self {
        RouterAware(DecayedScores::new(half_life))
    }
}

impl Policy for RouterAware {
    fn name(&self) -> &'static str {
        "router"
    }
    fn insert(&mut self, key: ExpertKey, step: u64, prob: f32) {
        self.0.add(key, step, prob.max(0.0) as f64);
        self.0.resident.push(key);
    }
    fn touch(&mut self, key: ExpertKey, step: u64, prob: f32) {
        self.0.add(key, step, prob.max(0.0) as f64);
    }
    fn remove(&mut self, key: ExpertKey) {
        self.0.remove(key);
    }
    fn victim(&mut self, evictable: &dyn Fn(ExpertKey) -> bool) -> Option<ExpertKey> {
        self.0.victim(evictable)
    }
}
