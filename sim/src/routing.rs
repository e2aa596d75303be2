//! Where the simulated router's choices come from: a recorded trace
//! (mapped onto the model as routing replay maps it), or a statistical
//! model of per-layer popularity and token-to-token reuse, fitted from a
//! trace or given.

use sluice_engine::config::Config;
use sluice_engine::replay::Replay;
use sluice_trace::Trace;

/// Expert choices per position and layer.
pub trait Routes {
    /// The experts token `pos` uses at MoE layer `layer`: `k` distinct ids,
    /// ascending.
    fn experts(&mut self, pos: usize, layer: usize) -> Vec<usize>;
    /// The source and mapping, in words.
    fn describe(&self) -> String;
    /// The input token id of position `pos`, if the source knows it.
    fn token(&self, pos: usize) -> Option<u32> {
        let _ = pos;
        None
    }
}

/// A trace replayed as `--replay` replays it in a real run.
pub struct TraceRoutes {
    replay: Replay,
    k: usize,
    experts: usize,
    rng: fastrand::Rng,
}

impl TraceRoutes {
    /// Maps `t` onto a model of config `c` (whose `top_k` is the k used).
    pub fn new(t: &Trace, c: &Config) -> TraceRoutes {
        TraceRoutes {
            replay: Replay::new(t, c),
            k: c.top_k,
            experts: c.n_experts,
            rng: fastrand::Rng::with_seed(0x5eed),
        }
    }
}

impl Routes for TraceRoutes {
    fn experts(&mut self, pos: usize, layer: usize) -> Vec<usize> {
        let mut v: Vec<usize> = self.replay.experts(pos, layer).to_vec();
        v.truncate(self.k);
        // A trace with fewer experts than k: the real run takes the
        // router's next best, which a simulation has not got; random
        // distinct experts stand in.
        while v.len() < self.k.min(self.experts) {
            let e = self.rng.usize(0..self.experts);
            if !v.contains(&e) {
                v.push(e);
            }
        }
        v.sort_unstable();
        v
    }

    fn describe(&self) -> String {
        self.replay.description.clone()
    }

    fn token(&self, pos: usize) -> Option<u32> {
        self.replay.token(pos)
    }
}

/// Per-layer popularity and reuse.
#[derive(Clone, Debug)]
pub struct StatRoutes {
    /// Per MoE layer: cumulative popularity over experts.
    cdf: Vec<Vec<f64>>,
    /// Per MoE layer: chance that a slot reuses an expert of the previous
    /// token.
    reuse: Vec<f64>,
    prev: Vec<Vec<usize>>,
    last_pos: Vec<Option<usize>>,
    k: usize,
    rng: fastrand::Rng,
    about: String,
}

impl StatRoutes {
    /// Popularity `pop[l]` (any positive weights, one per expert) and
    /// reuse `reuse[l]` per layer, `k` experts per token.
    pub fn new(pop: Vec<Vec<f64>>, reuse: Vec<f64>, k: usize, seed: u64, about: String) -> Self {
        let cdf = pop
            .into_iter()
            .map(|p| {
                let s: f64 = p.iter().sum::<f64>().max(f64::MIN_POSITIVE);
                let mut acc = 0.0;
                p.iter()
                    .map(|x| {
                        acc += x / s;
                        acc
                    })
                    .collect()
            })
            .collect::<Vec<Vec<f64>>>();
        let n = cdf.len();
        StatRoutes {
            cdf,
            reuse,
            prev: vec![Vec::new(); n],
            last_pos: vec![None; n],
            k,
            rng: fastrand::Rng::with_seed(seed),
            about,
        }
    }

    /// Zipf popularity of exponent `s` and reuse `r` in every layer.
    pub fn zipf(layers: usize, experts: usize, k: usize, s: f64, r: f64, seed: u64) -> Self {
        let mut rng = fastrand::Rng::with_seed(seed ^ 0x21bf);
        let pop = (0..layers)
            .map(|_| {
                // Each layer has its own favourites.
                let mut w: Vec<f64> = (1..=experts).map(|i| (i as f64).powf(-s)).collect();
                rng.shuffle(&mut w);
                w
            })
            .collect();
        StatRoutes::new(
            pop,
            vec![r; layers],
            k,
            seed,
            format!("statistical routing: Zipf popularity (exponent {s:.2}) per layer, reuse {r:.2} of the previous token's experts"),
        )
    }

    /// Fits popularity and reuse per layer from `t`'s decode steps (all
    /// steps if it has none), mapped onto `layers` MoE layers of `experts`
    /// experts: model layer i takes trace MoE layer i mod n; when expert
    /// counts differ, the model's experts take the trace's popularity by
    /// rank, interpolated.
    pub fn fit(t: &Trace, layers: usize, experts: usize, k: usize, seed: u64) -> Self {
        let tl = t.moe_layers();
        let steps: Vec<&sluice_trace::Step> = {
            let d: Vec<_> = t.steps.iter().filter(|s| s.decode).collect();
            if d.len() >= 2 {
                d
            } else {
                t.steps.iter().collect()
            }
        };
        let mut pops = Vec::new();
        let mut reuses = Vec::new();
        for &l in &tl {
            let mut count = vec![0f64; t.experts];
            let (mut shared, mut total) = (0usize, 0usize);
            let mut prev: Option<&[u32]> = None;
            for s in &steps {
                let Some(r) = &s.layers[l] else {
                    prev = None;
                    continue;
                };
                for &e in &r.experts {
                    count[e as usize] += 1.0;
                }
                if let Some(p) = prev {
                    shared += r.experts.iter().filter(|e| p.contains(e)).count();
                    total += r.experts.len();
                }
                prev = Some(&r.experts);
            }
            // Laplace smoothing: experts never seen are rare, not impossible.
            count.iter_mut().for_each(|c| *c += 0.5);
            count.sort_by(|a, b| b.total_cmp(a));
            pops.push(count);
            reuses.push(if total == 0 {
                0.0
            } else {
                shared as f64 / total as f64
            });
        }
        if pops.is_empty() {
            return StatRoutes::zipf(layers, experts, k, 0.0, 0.0, seed);
        }
        let mut rng = fastrand::Rng::with_seed(seed ^ 0x71f);
        let mut pop = Vec::with_capacity(layers);
        let mut reuse = Vec::with_capacity(layers);
        for i in 0..layers {
            let src = &pops[i % pops.len()];
            let mut w: Vec<f64> = (0..experts)
                .map(|j| {
                    let x = j as f64 * src.len() as f64 / experts as f64;
                    src[(x as usize).min(src.len() - 1)]
                })
                .collect();
            rng.shuffle(&mut w);
            pop.push(w);
            reuse.push(reuses[i % reuses.len()]);
        }
        let mean_reuse = reuse.iter().sum::<f64>() / reuse.len().max(1) as f64;
        let top: f64 = {
            // Share of uses that go to the top 10% of experts, averaged.
            let n = (t.experts / 10).max(1);
            pops.iter()
                .map(|p| p[..n].iter().sum::<f64>() / p.iter().sum::<f64>())
                .sum::<f64>()
                / pops.len() as f64
        };
        StatRoutes::new(
            pop,
            reuse,
            k,
            seed,
            format!(
                "statistical routing fitted from {} ({} steps, {} MoE layers × {} experts): per-layer popularity (top 10% of experts take {:.0}% of uses) and reuse of the previous token's experts (mean {:.2}), mapped onto {layers} layers × {experts} experts by rank",
                t.model_id,
                steps.len(),
                tl.len(),
                t.experts,
                100.0 * top,
                mean_reuse
            ),
        )
    }

    fn draw(&mut self, layer: usize) -> usize {
        let x = self.rng.f64();
        let c = &self.cdf[layer];
        c.partition_point(|&v| v < x).min(c.len() - 1)
    }
}

impl Routes for StatRoutes {
    fn experts(&mut self, pos: usize, layer: usize) -> Vec<usize> {
        let li = layer % self.cdf.len();
        let n = self.cdf[li].len();
        let k = self.k.min(n);
        // Same position asked again (a warm pass): the same choice.
        if self.last_pos[li] == Some(pos) {
            return self.prev[li].clone();
        }
        let prev = if self.last_pos[li].is_some_and(|p| p + 1 == pos) {
            std::mem::take(&mut self.prev[li])
        } else {
            Vec::new()
        };
        let mut v: Vec<usize> = Vec::with_capacity(k);
        for _ in 0..k {
            let cand: Vec<usize> = prev.iter().copied().filter(|e| !v.contains(e)).collect();
            if !cand.is_empty() && self.rng.f64() < self.reuse[li] {
                v.push(cand[self.rng.usize(0..cand.len())]);
                continue;
            }
            let mut tries = 0;
            loop {
                let e = self.draw(li);
                if !v.contains(&e) {
                    v.push(e);
                    break;
                }
                tries += 1;
                if tries > 64 {
                    // A very peaked distribution: take the first free one.
                    let e = (0..n).find(|e| !v.contains(e)).expect("k ≤ experts");
                    v.push(e);
                    break;
                }
            }
        }
        v.sort_unstable();
        self.prev[li] = v.clone();
        self.last_pos[li] = Some(pos);
        v
    }

    fn describe(&self) -> String {
        self.about.clone()
    }
}

/// Always hits at a fixed rate: what an external cache (the OS page cache
/// in flash-moe's set-up) is reported to achieve.
#[derive(Clone, Debug)]
pub struct FixedHits {
    /// Probability that an expert use is resident.
    pub rate: f64,
    rng: fastrand::Rng,
}

impl FixedHits {
    /// Hits with probability `rate`.
    pub fn new(rate: f64, seed: u64) -> FixedHits {
        FixedHits {
            rate: rate.clamp(0.0, 1.0),
            rng: fastrand::Rng::with_seed(seed ^ 0xf1),
        }
    }

    /// Draws one use.
    pub fn hit(&mut self) -> bool {
        self.rng.f64() < self.rate
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statistical_routes_have_the_asked_reuse() {
        let mut r = StatRoutes::zipf(1, 64, 4, 0.5, 0.4, 1);
        let mut prev = r.experts(0, 0);
        let (mut shared, mut total) = (0, 0);
        for pos in 1..4000 {
            let v = r.experts(pos, 0);
            assert_eq!(v.len(), 4);
            assert!(v.windows(2).all(|w| w[0] < w[1]), "distinct, sorted");
            shared += v.iter().filter(|e| prev.contains(e)).count();
            total += 4;
            prev = v;
        }
        let got = shared as f64 / total as f64;
        // Reuse 0.4 plus chance overlaps of the fresh draws.
        assert!((0.4..0.55).contains(&got), "{got}");
        // A warm pass over the same position repeats the choice.
        assert_eq!(r.experts(3999, 0), prev);
    }
}
