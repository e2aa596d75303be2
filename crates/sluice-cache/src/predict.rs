//! Predictors of the router's next choices, and Belady's optimal eviction
//! for measurement. Like the cache they are pure logic: the engine feeds
//! them routes as the forward pass makes them, trace statistics feed them
//! recorded routes, and both get the same predictions.

use crate::{ExpertKey, Policy};
use std::collections::{HashMap, VecDeque};

/// Predicts which experts a layer will use for the current token.
pub trait Predictor: Send {
    /// Short name (`xlayer`, `history`, `token`).
    fn name(&self) -> &'static str;
    /// Layer `layer` of the current token chose `experts`. Calls come in
    /// forward order: every layer of a token, then the next token.
    fn observe(&mut self, layer: usize, experts: &[u32]);
    /// Up to `m` experts of `layer` for the current token, most likely
    /// first, into `out` (cleared first). Called after `layer - 1` of the
    /// current token has been observed.
    fn predict(&mut self, layer: usize, m: usize, out: &mut Vec<u32>);
    /// Like [`predict`](Self::predict), with each expert's estimated
    /// probability of being used, which prefetch admission weighs against
    /// the cost of a wasted read (default: 1, no estimate).
    fn predict_scored(&mut self, layer: usize, m: usize, out: &mut Vec<(u32, f32)>) {
        let mut ids = Vec::new();
        self.predict(layer, m, &mut ids);
        out.clear();
        out.extend(ids.into_iter().map(|e| (e, 1.0)));
    }
    /// A new token starts; `token` is its input id when the caller knows
    /// it. Called before the token's first layer is observed; callers that
    /// never call it leave the token unknown.
    fn begin_token(&mut self, token: Option<u32>) {
        let _ = token;
    }
    /// Whether the predictor can guess a layer without the choice made one
    /// layer up (from what [`begin_token`](Self::begin_token) told it), so
    /// that callers may ask for a token's first MoE layer before its
    /// forward pass starts, and for layers more than one ahead.
    fn predicts_ahead(&self) -> bool {
        false
    }
    /// Whether the predictor can guess a token's first MoE layer before
    /// its forward pass starts (default: [`predicts_ahead`](Self::predicts_ahead)).
    /// Speculative gating cannot: it needs a layer's hidden state.
    fn predicts_first(&self) -> bool {
        self.predicts_ahead()
    }
    /// The input of `layer`'s MoE block for the current (single) token,
    /// before its router runs: predictors that apply later routers to it
    /// (speculative gating) keep it. Called before
    /// [`observe`](Self::observe) of the same layer.
    fn observe_input(&mut self, layer: usize, hidden: &[f32]) {
        let _ = (layer, hidden);
    }
}

/// How the next layers' experts are predicted for prefetch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Prefetch {
    /// No prefetch.
    #[default]
    None,
    /// Speculative gating: the next layers' routers applied to this
    /// layer's hidden state (the forward pass computes it).
    Gate,
    /// The replayed trace's actual choices: an upper bound.
    Oracle,
    /// Co-occurrence with the previous layer's choices ([`CrossLayer`]).
    Xlayer,
    /// Recent use at that layer ([`History`]).
    History,
    /// What the input token's id used there before ([`TokenLayer`]).
    Token,
}

impl Prefetch {
    /// Every predictor.
    pub const ALL: [Prefetch; 6] = [
        Prefetch::None,
        Prefetch::Gate,
        Prefetch::Oracle,
        Prefetch::Xlayer,
        Prefetch::History,
        Prefetch::Token,
    ];

    /// The name used on command lines and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Prefetch::None => "none",
            Prefetch::Gate => "gate",
            Prefetch::Oracle => "oracle",
            Prefetch::Xlayer => "xlayer",
            Prefetch::History => "history",
            Prefetch::Token => "token",
        }
    }

    /// The learning predictor of this kind for a model of `layers` ×
    /// `experts`; `None` for none, gate and oracle, whose predictions
    /// come from outside the cache (the forward pass, the trace).
    pub fn learner(self, layers: usize, experts: usize) -> Option<Box<dyn Predictor>> {
        Some(match self {
            Prefetch::Xlayer => Box::new(CrossLayer::new(layers, experts)),
            Prefetch::History => Box::new(History::new(layers, experts, 16.0)),
            Prefetch::Token => Box::new(TokenLayer::new(layers, experts)),
            Prefetch::None | Prefetch::Gate | Prefetch::Oracle => return None,
        })
    }

    /// The depth that measured best when none is given (token: 2, the
    /// others 1; docs/BENCHMARKS.md).
    pub fn default_depth(self) -> usize {
        if self == Prefetch::Token {
            2
        } else {
            1
        }
    }
}

/// Names of the learning predictors.
pub const PREDICTOR_NAMES: &[&str] = &["xlayer", "history", "token"];

/// The learning predictor called `name` for a model of `layers` ×
/// `experts`.
pub fn predictor_by_name(name: &str, layers: usize, experts: usize) -> Option<Box<dyn Predictor>> {
    Prefetch::ALL
        .into_iter()
        .find(|p| p.name() == name)?
        .learner(layers, experts)
}

/// Tokens that chose an expert at one layer, and how many of them chose
/// each expert at the next.
type Followers = (f32, HashMap<u32, f32>);

/// Cross-layer co-occurrence: how often expert `b` of layer `l` was chosen
/// by a token that chose expert `a` at layer `l − 1`, learned online from
/// every token seen (prompt included). The experts the current token chose
/// one layer up vote for this layer's. Prediction costs one pass over the
/// row of each of the k previous experts (k × E additions).
pub struct CrossLayer {
    experts: usize,
    /// Per layer l ≥ 1: co-occurrence counts, `counts[l][a]` = (tokens
    /// that chose `a` at l − 1, and of those how many chose each `b` at
    /// l). Sparse, so memory follows what was seen, not E² (a trace or
    /// model may claim tens of thousands of experts).
    counts: Vec<HashMap<u32, Followers>>,
    /// Tokens behind the last prediction's scores (for probabilities).
    seen: f32,
    /// The layer observed last.
    last: Option<usize>,
    /// The current token's choices at each layer (empty when unknown).
    current: Vec<Vec<u32>>,
    scores: Vec<f32>,
    /// Breaks the cold start: frequencies per layer.
    freq: Vec<Vec<f32>>,
}

impl CrossLayer {
    /// An empty model of `layers` × `experts`.
    pub fn new(layers: usize, experts: usize) -> Self {
        CrossLayer {
            experts,
            counts: (0..layers).map(|_| HashMap::new()).collect(),
            seen: 0.0,
            last: None,
            current: vec![Vec::new(); layers],
            scores: vec![0.0; experts],
            freq: vec![vec![0.0; experts]; layers],
        }
    }

    /// Fills `scores` for `layer` (< layers) from the current token's
    /// choices one layer up, and `seen` with the tokens behind them.
    fn score(&mut self, layer: usize) {
        self.scores.iter_mut().for_each(|s| *s = 0.0);
        self.seen = 0.0;
        if layer > 0 {
            for a in &self.current[layer - 1] {
                if let Some((n, row)) = self.counts[layer].get(a) {
                    self.seen += n;
                    for (&b, c) in row {
                        self.scores[b as usize] += c;
                    }
                }
            }
        }
        // A small frequency term orders experts the co-occurrences have
        // not separated (and is all there is for layer 0 and cold starts).
        let total: f32 = self.freq[layer].iter().sum::<f32>().max(1.0);
        for (s, f) in self.scores.iter_mut().zip(&self.freq[layer]) {
            *s += 1e-3 * f / total;
        }
    }
}

fn top_m(scores: &[f32], m: usize, out: &mut Vec<u32>) {
    out.clear();
    out.extend((0..scores.len() as u32).filter(|&e| scores[e as usize] > 0.0));
    let by = |a: &u32, b: &u32| {
        scores[*b as usize]
            .total_cmp(&scores[*a as usize])
            .then(a.cmp(b))
    };
    if out.len() > m {
        out.select_nth_unstable_by(m, by);
        out.truncate(m);
    }
    out.sort_by(by);
}

impl Predictor for CrossLayer {
    fn name(&self) -> &'static str {
        "xlayer"
    }

    fn observe(&mut self, layer: usize, experts: &[u32]) {
        if layer >= self.current.len() {
            return;
        }
        let e = self.experts;
        if self.last.is_some_and(|l| layer <= l) {
            // A new token (its first MoE layer need not be layer 0):
            // forget the previous token's choices.
            self.current.iter_mut().for_each(Vec::clear);
        }
        self.last = Some(layer);
        if layer > 0 {
            let (prev, counts) = (&self.current[layer - 1], &mut self.counts[layer]);
            for &a in prev {
                if (a as usize) >= e {
                    continue;
                }
                let (n, row) = counts.entry(a).or_default();
                *n += 1.0;
                for &b in experts {
                    if (b as usize) < e {
                        *row.entry(b).or_insert(0.0) += 1.0;
                    }
                }
            }
        }
        for &b in experts {
            if let Some(f) = self.freq[layer].get_mut(b as usize) {
                *f += 1.0;
            }
        }
        self.current[layer].clear();
        self.current[layer].extend_from_slice(experts);
    }

    fn predict(&mut self, layer: usize, m: usize, out: &mut Vec<u32>) {
        out.clear();
        if layer >= self.current.len() {
            return;
        }
        self.score(layer);
        top_m(&self.scores, m, out);
    }

    /// The probability of `b` is the mean over the experts chosen one
    /// layer up of how often `b` followed each: Σ_a count(a→b) / Σ_a
    /// count(a). On the recorded traces this is calibrated (predictions
    /// scored 0.5-0.6 were used 73% of the time, 0.1-0.2 15%:
    /// `scripts/xlayer_study.py`).
    fn predict_scored(&mut self, layer: usize, m: usize, out: &mut Vec<(u32, f32)>) {
        let mut ids = Vec::new();
        self.predict(layer, m, &mut ids);
        let seen = self.seen;
        out.clear();
        out.extend(ids.into_iter().map(|e| {
            let p = if seen > 0.0 {
                (self.scores[e as usize] / seen).min(1.0)
            } else {
                0.0
            };
            (e, p)
        }));
    }
}

/// The input token's id and cross-layer co-occurrence together. A decode
/// token's id is known before its forward pass starts, and so is the one
/// before it, so three estimates of P(expert used at this layer) are
/// averaged where they exist: how often this token id used the expert here
/// before; how often this pair (previous id, this id) did; and
/// [`CrossLayer`]'s, from the experts chosen one layer up. The first two
/// need no earlier layer, so this predictor also guesses layers further
/// ahead, a token's first MoE layer included. Counts are shrunk towards
/// zero (uses / (sightings + ½)), so a token seen once is not a certainty.
/// On the recorded traces, learned from five and tested on the sixth, this
/// recalls 0.59 of a layer's experts at k′ = k against cross-layer
/// prediction's 0.44 (`scripts/token_study.py`). Memory follows what was
/// seen: a row per (token, layer) and (pair, layer) met.
pub struct TokenLayer {
    xl: CrossLayer,
    layers: usize,
    /// (token id, layer) → (sightings, uses of each expert).
    unigram: HashMap<(u32, u32), Followers>,
    /// (previous id, token id, layer) → the same.
    bigram: HashMap<(u32, u32, u32), Followers>,
    /// The current token's id and the previous one's, if known.
    token: Option<u32>,
    prev: Option<u32>,
    /// Whether `begin_token` came since the last observation.
    announced: bool,
    /// The layer observed last, and whether it belongs to the current
    /// token (cross-layer prediction needs the layer above of this token).
    last: Option<usize>,
    in_token: bool,
    probs: Vec<f32>,
}

/// Pseudo-sightings that shrink a token table's estimate towards zero.
const SHRINK: f32 = 0.5;

impl TokenLayer {
    /// An empty model of `layers` × `experts`.
    pub fn new(layers: usize, experts: usize) -> Self {
        TokenLayer {
            xl: CrossLayer::new(layers, experts),
            layers,
            unigram: HashMap::new(),
            bigram: HashMap::new(),
            token: None,
            prev: None,
            announced: false,
            last: None,
            in_token: false,
            probs: vec![0.0; experts],
        }
    }

    /// Fills `probs` for `layer` (< layers); false when no estimate knows
    /// anything (the scores are then only the frequency tie-break).
    fn score(&mut self, layer: usize) -> bool {
        self.xl.score(layer);
        if !(self.in_token && layer > 0 && self.last == Some(layer - 1)) {
            // The choice one layer up is not this token's (yet).
            self.xl.seen = 0.0;
        }
        let l = layer as u32;
        let uni = self.token.and_then(|t| self.unigram.get(&(t, l)));
        let bi = self
            .token
            .zip(self.prev)
            .and_then(|(t, p)| self.bigram.get(&(p, t, l)));
        let xl_seen = self.xl.seen;
        let parts = uni.is_some() as u32 + bi.is_some() as u32 + (xl_seen > 0.0) as u32;
        if parts == 0 {
            // Only the frequency term: an order for ties, not a probability.
            for (p, s) in self.probs.iter_mut().zip(&self.xl.scores) {
                *p = 1e-6 * s;
            }
            return false;
        }
        let w = 1.0 / parts as f32;
        for (p, s) in self.probs.iter_mut().zip(&self.xl.scores) {
            *p = if xl_seen > 0.0 {
                w * (s / xl_seen).min(1.0)
            } else {
                1e-6 * s
            };
        }
        for (n, uses) in uni.into_iter().chain(bi) {
            for (&b, c) in uses {
                self.probs[b as usize] += w * (c / (n + SHRINK)).min(1.0);
            }
        }
        true
    }
}

fn count(row: &mut Followers, experts: &[u32], e: usize) {
    row.0 += 1.0;
    for (i, &b) in experts.iter().enumerate() {
        if (b as usize) < e && !experts[..i].contains(&b) {
            *row.1.entry(b).or_insert(0.0) += 1.0;
        }
    }
}

impl Predictor for TokenLayer {
    fn name(&self) -> &'static str {
        "token"
    }

    fn begin_token(&mut self, token: Option<u32>) {
        self.prev = self.token;
        self.token = token;
        self.announced = true;
        self.in_token = false;
    }

    fn predicts_ahead(&self) -> bool {
        true
    }

    fn observe(&mut self, layer: usize, experts: &[u32]) {
        if layer >= self.layers {
            return;
        }
        if self.last.is_some_and(|l| layer <= l) && !self.announced {
            // A new token nobody named.
            self.prev = self.token;
            self.token = None;
        }
        self.announced = false;
        self.last = Some(layer);
        self.in_token = true;
        self.xl.observe(layer, experts);
        let (e, l) = (self.probs.len(), layer as u32);
        if let Some(t) = self.token {
            count(self.unigram.entry((t, l)).or_default(), experts, e);
            if let Some(p) = self.prev {
                count(self.bigram.entry((p, t, l)).or_default(), experts, e);
            }
        }
    }

    fn predict(&mut self, layer: usize, m: usize, out: &mut Vec<u32>) {
        out.clear();
        if layer >= self.layers {
            return;
        }
        self.score(layer);
        top_m(&self.probs, m, out);
    }

    /// The mean of the estimates that exist for this layer (see the
    /// type). Guesses no estimate supports (a cold start, an expert only
    /// the frequency tie-break names) are left out: no read is worth it on
    /// them.
    fn predict_scored(&mut self, layer: usize, m: usize, out: &mut Vec<(u32, f32)>) {
        out.clear();
        if layer >= self.layers || !self.score(layer) {
            return;
        }
        let mut ids = Vec::new();
        top_m(&self.probs, m, &mut ids);
        out.extend(
            ids.into_iter()
                .map(|e| (e, self.probs[e as usize]))
                .filter(|&(_, p)| p >= 1e-3),
        );
    }
}

/// Frequency and recency at the same layer across recent tokens: decayed
/// counts with a half-life in tokens.
pub struct History {
    half_life: f32,
    /// Per layer: (score, token of last update) per expert.
    scores: Vec<Vec<(f32, u64)>>,
    token: u64,
    /// Decayed count of tokens observed, the current one included.
    norm: f32,
    last: Option<usize>,
    tmp: Vec<f32>,
}

impl History {
    /// Counts that halve every `half_life` tokens.
    pub fn new(layers: usize, experts: usize, half_life: f32) -> Self {
        History {
            half_life: half_life.max(1e-3),
            scores: vec![vec![(0.0, 0); experts]; layers],
            token: 0,
            norm: 0.0,
            last: None,
            tmp: vec![0.0; experts],
        }
    }
}

impl Predictor for History {
    fn name(&self) -> &'static str {
        "history"
    }

    fn observe(&mut self, layer: usize, experts: &[u32]) {
        if self.last.is_none_or(|l| layer <= l) {
            self.token += 1;
            self.norm = self.norm * (-1.0 / self.half_life).exp2() + 1.0;
        }
        self.last = Some(layer);
        let Some(row) = self.scores.get_mut(layer) else {
            return;
        };
        for &b in experts {
            if let Some((s, at)) = row.get_mut(b as usize) {
                let dt = (self.token - *at) as f32;
                *s = *s * (-dt / self.half_life).exp2() + 1.0;
                *at = self.token;
            }
        }
    }

    fn predict(&mut self, layer: usize, m: usize, out: &mut Vec<u32>) {
        let Some(row) = self.scores.get(layer) else {
            out.clear();
            return;
        };
        for (t, (s, at)) in self.tmp.iter_mut().zip(row) {
            *t = s * (-((self.token + 1 - at) as f32) / self.half_life).exp2();
        }
        top_m(&self.tmp, m, out);
    }

    /// The decayed share of recent tokens that used the expert at this
    /// layer: 1 for one used by every token.
    fn predict_scored(&mut self, layer: usize, m: usize, out: &mut Vec<(u32, f32)>) {
        let mut ids = Vec::new();
        self.predict(layer, m, &mut ids);
        // tmp holds scores decayed to the next token; the tokens before
        // the current one weigh norm − 1 at the current token's scale.
        let d = (-1.0 / self.half_life).exp2();
        let past = (self.norm - 1.0).max(0.0) * d;
        out.clear();
        out.extend(ids.into_iter().map(|e| {
            let p = if past > 0.0 {
                (self.tmp[e as usize] / past).min(1.0)
            } else {
                0.0
            };
            (e, p)
        }));
    }
}

/// Belady's optimal eviction: the resident used furthest in the future
/// (or never). Needs the whole future, so it exists for measurement only.
/// Built from the sequence of steps (each step the keys demanded then);
/// `insert`/`touch` must be called with the step index.
pub struct Belady {
    uses: HashMap<ExpertKey, VecDeque<u64>>,
    resident: Vec<ExpertKey>,
    now: u64,
}

impl Belady {
    /// The oracle for `steps`, where step `i` demands `steps[i]`.
    pub fn new(steps: &[Vec<ExpertKey>]) -> Self {
        let mut uses: HashMap<ExpertKey, VecDeque<u64>> = HashMap::new();
        for (i, s) in steps.iter().enumerate() {
            for k in s {
                uses.entry(*k).or_default().push_back(i as u64);
            }
        }
        Belady {
            uses,
            resident: Vec::new(),
            now: 0,
        }
    }

    fn next_use(&self, k: &ExpertKey) -> u64 {
        self.uses
            .get(k)
            .and_then(|q| q.iter().find(|&&u| u > self.now).copied())
            .unwrap_or(u64::MAX)
    }

    fn advance(&mut self, key: ExpertKey, step: u64) {
        self.now = self.now.max(step);
        if let Some(q) = self.uses.get_mut(&key) {
            while q.front().is_some_and(|&u| u <= step) {
                q.pop_front();
            }
        }
    }
}

impl Policy for Belady {
    fn name(&self) -> &'static str {
        "belady"
    }
    fn insert(&mut self, key: ExpertKey, step: u64, _: f32) {
        self.advance(key, step);
        self.resident.push(key);
    }
    fn touch(&mut self, key: ExpertKey, step: u64, _: f32) {
        self.advance(key, step);
    }
    fn remove(&mut self, key: ExpertKey) {
        if let Some(i) = self.resident.iter().position(|&k| k == key) {
            self.resident.swap_remove(i);
        }
    }
    fn victim(&mut self, evictable: &dyn Fn(ExpertKey) -> bool) -> Option<ExpertKey> {
        self.resident
            .iter()
            .copied()
            .filter(|&k| evictable(k))
            .max_by_key(|k| (self.next_use(k), *k))
    }
}
