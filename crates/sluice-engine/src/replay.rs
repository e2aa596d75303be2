//! Routing replay: a recorded trace's expert choices drive a model's MoE
//! layers, so a synthetic model reproduces a real model's locality on real
//! I/O. Where geometries differ the mapping is explicit: token `p` replays
//! trace step `p mod steps`; the model's i-th MoE layer replays the trace's
//! `(i mod trace MoE layers)`-th; expert `e` maps to `e mod experts`; a
//! trace with fewer experts per token than the model is topped up with the
//! router's best remaining choices, one with more is cut to the model's k;
//! a token id `t` maps to `t mod vocab`.

use crate::config::Config;
use sluice_cache::Predictor;
use sluice_trace::Trace;

/// A trace prepared for one model.
pub struct Replay {
    /// Per step, per model layer: the experts to use (empty: router's).
    steps: Vec<Vec<Vec<usize>>>,
    /// Per step: the recorded input token, mapped into the vocabulary.
    tokens: Vec<Option<u32>>,
    /// The mapping, in words, for the user.
    pub description: String,
}

impl Replay {
    /// Maps `trace` onto a model of config `c`.
    pub fn new(trace: &Trace, c: &Config) -> Replay {
        let tl = trace.moe_layers();
        let model_moe: Vec<usize> = (0..c.n_layers).filter(|&l| c.moe_layers[l]).collect();
        let steps: Vec<Vec<Vec<usize>>> = trace
            .steps
            .iter()
            .map(|s| {
                let mut per = vec![Vec::new(); c.n_layers];
                for (i, &ml) in model_moe.iter().enumerate() {
                    if tl.is_empty() {
                        break;
                    }
                    if let Some(r) = &s.layers[tl[i % tl.len()]] {
                        let mut ex: Vec<usize> = Vec::new();
                        for &e in &r.experts {
                            let e = e as usize % c.n_experts;
                            if !ex.contains(&e) {
                                ex.push(e);
                            }
                        }
                        per[ml] = ex;
                    }
                }
                per
            })
            .collect();
        let vocab = c.vocab.clamp(1, u32::MAX as usize) as u32;
        let tokens = trace
            .steps
            .iter()
            .map(|s| s.token.map(|t| t % vocab))
            .collect();
        let description = format!(
            "routing replay of {} ({} tokens, {} MoE layers × {} experts, top-{}) onto {} MoE layers × {} experts, top-{}: token p replays step p mod {}, MoE layer i replays trace MoE layer i mod {}, expert e → e mod {}, token id t → t mod {}{}",
            trace.model_id,
            trace.steps.len(),
            tl.len(),
            trace.experts,
            trace.top_k,
            model_moe.len(),
            c.n_experts,
            c.top_k,
            trace.steps.len(),
            tl.len().max(1),
            c.n_experts,
            vocab,
            match trace.top_k.cmp(&c.top_k) {
                std::cmp::Ordering::Less => ", the router's best remaining experts fill each step to the model's k",
                std::cmp::Ordering::Greater => ", each step cut to the model's k",
                std::cmp::Ordering::Equal => "",
            }
        );
        Replay {
            steps,
            tokens,
            description,
        }
    }

    /// The recorded input token of position `pos`, mapped into the
    /// model's vocabulary (`None`: the trace did not record it).
    pub fn token(&self, pos: usize) -> Option<u32> {
        if self.tokens.is_empty() {
            return None;
        }
        self.tokens[pos % self.tokens.len()]
    }

    /// Feeds every step to `p` in forward order, each token announced with
    /// its mapped id: a predictor seeded with a trace from an earlier
    /// session, as this model would have routed it.
    pub fn teach(&self, p: &mut dyn Predictor) {
        for (pos, per) in self.steps.iter().enumerate() {
            p.begin_token(self.token(pos));
            for (l, ex) in per.iter().enumerate() {
                if !ex.is_empty() {
                    let ids: Vec<u32> = ex.iter().map(|&e| e as u32).collect();
                    p.observe(l, &ids);
                }
            }
        }
    }

    /// The replayed experts of token `pos` at `layer` (empty: the router's).
    pub fn experts(&self, pos: usize, layer: usize) -> &[usize] {
        if self.steps.is_empty() {
            return &[];
        }
        self.steps[pos % self.steps.len()]
            .get(layer)
            .map_or(&[], |v| v.as_slice())
    }

    /// Rewrites `idx` (the router's ranking, best first, `ne` experts) so
    /// that its head is the replayed choice for token `pos` at `layer`.
    pub(crate) fn choose(&self, pos: usize, layer: usize, idx: &mut Vec<usize>, ne: usize) {
        if self.steps.is_empty() {
            return;
        }
        let want = &self.steps[pos % self.steps.len()][layer];
        if want.is_empty() {
            return;
        }
        let router: Vec<usize> = idx.clone();
        idx.clear();
        idx.extend(want.iter().copied().filter(|&e| e < ne));
        for e in router {
            if !idx.contains(&e) {
                idx.push(e);
            }
        }
    }
}

/// The oracle: the replayed trace's actual choices for the layers ahead,
/// taken as certain. An upper bound on what prediction can give, for
/// measurement. It counts tokens as they begin to know the position.
pub struct Oracle {
    replay: std::sync::Arc<Replay>,
    /// Tokens begun so far; the current one is at `begun - 1`.
    begun: usize,
}

impl Oracle {
    /// The oracle of `replay`, from position 0.
    pub fn new(replay: std::sync::Arc<Replay>) -> Self {
        Oracle { replay, begun: 0 }
    }
}

impl Predictor for Oracle {
    fn name(&self) -> &'static str {
        "oracle"
    }

    fn observe(&mut self, _: usize, _: &[u32]) {}

    fn begin_token(&mut self, _: Option<u32>) {
        self.begun += 1;
    }

    fn predict(&mut self, layer: usize, m: usize, out: &mut Vec<u32>) {
        let _ = m;
        out.clear();
        let pos = self.begun.saturating_sub(1);
        out.extend(self.replay.experts(pos, layer).iter().map(|&e| e as u32));
    }

    fn predicts_ahead(&self) -> bool {
        true
    }

    /// As the engine always did: the first MoE layer is not predicted
    /// before the token's forward pass starts.
    fn predicts_first(&self) -> bool {
        false
    }
}
