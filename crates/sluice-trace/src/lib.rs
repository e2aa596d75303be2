//! Expert-routing traces: which experts the router chose, per token and
//! layer, with their weights.
//!
//! The on-disk format is the JSON of the recorded traces sluice is
//! developed against (`meta`, `prompt_tokens`, `generated_tokens`, `routes`
//! with `token_pos`, `phase` and `layers: {"L": {"experts", "weights"}}`);
//! `sluice trace record` writes it and llama.cpp's moe-trace CSV (`layer,
//! expert` rows) imports into it. [`stats`] replays a trace through the
//! engine's own [`SlotCache`] and predictors.

use serde_json::{json, Value};
use sluice_cache::{
    policy_by_name, predictor_by_name, Acquire, Belady, ExpertKey, Policy, Predictor, SlotCache,
};
use sluice_core::{Error, Result};
use std::path::Path;

/// Bounds that keep a hostile trace from asking for absurd allocations.
const MAX_LAYERS: usize = 4096;
const MAX_EXPERTS: usize = 1 << 16;
/// Layers × experts at most: per-layer tables of a trace's expert count
/// stay small (16 MiB of f32) whatever its header claims.
const MAX_LAYER_EXPERTS: usize = 1 << 22;
/// Experts one token may choose at one layer (real models: 1 to 16).
const MAX_TOP_K: usize = 256;

/// A trace's steps × layers cells must be paid for by its own bytes (real
/// traces use one cell per ~40 bytes), so a short hostile file cannot make
/// the parser allocate gigabytes.
fn check_cells(path: &Path, steps: usize, layers: usize, bytes: usize) -> Result<()> {
    if steps.saturating_mul(layers) > bytes + (1 << 16) {
        return Err(bad(
            path,
            format!(
                "{steps} steps × {layers} layers is more than a {bytes}-byte file can describe"
            ),
        ));
    }
    Ok(())
}

/// One layer's choice for one token.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerRoute {
    /// Chosen experts.
    pub experts: Vec<u32>,
    /// Their router weights (empty when unknown).
    pub weights: Vec<f32>,
}

/// One token.
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    /// Position in the sequence.
    pub pos: usize,
    /// Token id, when known.
    pub token: Option<u32>,
    /// Generated (decode) rather than prompt (prefill).
    pub decode: bool,
    /// Per layer; `None` for layers without a route (dense layers).
    pub layers: Vec<Option<LayerRoute>>,
}

/// A routing trace.
#[derive(Clone, Debug, PartialEq)]
pub struct Trace {
    /// Which model produced it.
    pub model_id: String,
    /// Layers (routes may name only the MoE ones).
    pub layers: usize,
    /// Experts per layer.
    pub experts: usize,
    /// Experts per token per layer.
    pub top_k: usize,
    /// Tokens in order.
    pub steps: Vec<Step>,
}

fn bad(path: &Path, msg: impl Into<String>) -> Error {
    Error::Format {
        path: path.to_path_buf(),
        format: "trace",
        msg: msg.into(),
    }
}

impl Trace {
    /// Feeds every step's routes to `p` in forward order, each token
    /// announced with its recorded id: a predictor seeded from an earlier
    /// session. Ids are used as recorded (no geometry mapping).
    pub fn teach(&self, p: &mut dyn Predictor) {
        for s in &self.steps {
            p.begin_token(s.token);
            for (l, r) in s.layers.iter().enumerate() {
                if let Some(r) = r {
                    p.observe(l, &r.experts);
                }
            }
        }
    }

    /// Reads a trace: JSON (the recorded format) or llama.cpp's CSV.
    pub fn open(path: &Path) -> Result<Trace> {
        let b = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let first = b.iter().find(|c| !c.is_ascii_whitespace()).copied();
        if first == Some(b'{') {
            Trace::from_json(&b, path)
        } else {
            let text =
                std::str::from_utf8(&b).map_err(|_| bad(path, "neither JSON nor UTF-8 CSV"))?;
            Trace::from_csv(text, path)
        }
    }

    /// Parses the JSON format.
    pub fn from_json(b: &[u8], path: &Path) -> Result<Trace> {
        let j: Value = serde_json::from_slice(b).map_err(|e| bad(path, e.to_string()))?;
        let meta = j
            .get("meta")
            .ok_or_else(|| bad(path, "no \"meta\" object"))?;
        let num = |k: &str| meta.get(k).and_then(Value::as_u64).map(|v| v as usize);
        let layers = num("num_layers").ok_or_else(|| bad(path, "meta.num_layers missing"))?;
        let experts = num("num_experts").ok_or_else(|| bad(path, "meta.num_experts missing"))?;
        let top_k = num("top_k").unwrap_or(0);
        if layers == 0
            || layers > MAX_LAYERS
            || experts == 0
            || experts > MAX_EXPERTS
            || layers * experts > MAX_LAYER_EXPERTS
        {
            return Err(bad(
                path,
                format!("{layers} layers × {experts} experts is out of range"),
            ));
        }
        let routes = j
            .get("routes")
            .and_then(Value::as_array)
            .ok_or_else(|| bad(path, "no \"routes\" array"))?;
        check_cells(path, routes.len(), layers, b.len())?;
        let mut steps = Vec::with_capacity(routes.len());
        let mut k_seen = 0;
        for (i, r) in routes.iter().enumerate() {
            let ls = r
                .get("layers")
                .and_then(Value::as_object)
                .ok_or_else(|| bad(path, format!("route {i} has no \"layers\" object")))?;
            let mut per = vec![None; layers];
            for (key, v) in ls {
                let l: usize = key.parse().ok().filter(|&l| l < layers).ok_or_else(|| {
                    bad(
                        path,
                        format!("route {i}: layer {key:?} is not below {layers}"),
                    )
                })?;
                let ex = v
                    .get("experts")
                    .and_then(Value::as_array)
                    .ok_or_else(|| bad(path, format!("route {i} layer {l}: no experts")))?;
                if ex.len() > experts.min(MAX_TOP_K) {
                    return Err(bad(
                        path,
                        format!(
                            "route {i} layer {l}: {} experts chosen of {experts} (at most {MAX_TOP_K} per step)",
                            ex.len()
                        ),
                    ));
                }
                let experts_v = ex
                    .iter()
                    .map(|e| {
                        e.as_u64()
                            .filter(|&e| (e as usize) < experts)
                            .map(|e| e as u32)
                            .ok_or_else(|| {
                                bad(
                                    path,
                                    format!(
                                        "route {i} layer {l}: expert {e} is not below {experts}"
                                    ),
                                )
                            })
                    })
                    .collect::<Result<Vec<u32>>>()?;
                let weights: Vec<f32> = v
                    .get("weights")
                    .and_then(Value::as_array)
                    .map(|w| w.iter().map(|x| x.as_f64().unwrap_or(0.0) as f32).collect())
                    .unwrap_or_default();
                k_seen = k_seen.max(experts_v.len());
                per[l] = Some(LayerRoute {
                    experts: experts_v,
                    weights,
                });
            }
            steps.push(Step {
                pos: r
                    .get("token_pos")
                    .and_then(Value::as_u64)
                    .map_or(i, |p| p as usize),
                token: r.get("token_id").and_then(Value::as_u64).map(|t| t as u32),
                decode: r.get("phase").and_then(Value::as_str) == Some("decode"),
                layers: per,
            });
        }
        // Nothing to replay or measure: refused as the CSV import refuses
        // a file without rows, rather than silently leaving every choice to
        // the router.
        if !steps
            .iter()
            .any(|s| s.layers.iter().flatten().any(|r| !r.experts.is_empty()))
        {
            return Err(bad(
                path,
                if steps.is_empty() {
                    "no routes: the trace records no token".to_string()
                } else {
                    format!(
                        "none of its {} routes chooses an expert at any layer",
                        steps.len()
                    )
                },
            ));
        }
        Ok(Trace {
            model_id: meta
                .get("model_id")
                .and_then(Value::as_str)
                .unwrap_or("unknown")
                .to_string(),
            layers,
            experts,
            top_k: if top_k == 0 { k_seen } else { top_k },
            steps,
        })
    }

    /// Parses llama.cpp's moe-trace CSV: one `layer,expert` row per chosen
    /// expert, in forward order. A token ends where the layer index goes
    /// back down; a header line is skipped. Phases are unknown: every token
    /// is treated as decode.
    pub fn from_csv(text: &str, path: &Path) -> Result<Trace> {
        let mut steps: Vec<Step> = Vec::new();
        let mut cur: Vec<(usize, u32)> = Vec::new();
        let (mut layers, mut experts, mut top_k) = (0usize, 0usize, 0usize);
        let flush = |cur: &mut Vec<(usize, u32)>, steps: &mut Vec<Step>| {
            if cur.is_empty() {
                return;
            }
            let mut per: Vec<Option<LayerRoute>> = Vec::new();
            for &(l, e) in cur.iter() {
                if per.len() <= l {
                    per.resize(l + 1, None);
                }
                per[l]
                    .get_or_insert_with(|| LayerRoute {
                        experts: vec![],
                        weights: vec![],
                    })
                    .experts
                    .push(e);
            }
            steps.push(Step {
                pos: steps.len(),
                token: None,
                decode: true,
                layers: per,
            });
            cur.clear();
        };
        let mut last_layer = 0usize;
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || (n == 0 && !line.starts_with(|c: char| c.is_ascii_digit())) {
                continue;
            }
            let mut it = line.split(',').map(str::trim);
            let (Some(l), Some(e)) = (it.next(), it.next()) else {
                return Err(bad(
                    path,
                    format!("line {}: expected `layer,expert`", n + 1),
                ));
            };
            let (Ok(l), Ok(e)) = (l.parse::<usize>(), e.parse::<u32>()) else {
                return Err(bad(
                    path,
                    format!("line {}: {line:?} is not `layer,expert`", n + 1),
                ));
            };
            if l >= MAX_LAYERS || e as usize >= MAX_EXPERTS {
                return Err(bad(
                    path,
                    format!("line {}: layer {l} or expert {e} out of range", n + 1),
                ));
            }
            layers = layers.max(l + 1);
            if l < last_layer {
                // Each step holds a cell per layer: checked before it is made.
                check_cells(path, steps.len() + 1, layers, text.len())?;
                flush(&mut cur, &mut steps);
            }
            last_layer = l;
            cur.push((l, e));
            if cur.len() > MAX_TOP_K * MAX_LAYERS.min(layers) {
                return Err(bad(
                    path,
                    format!("line {}: one token chose too many experts", n + 1),
                ));
            }
            experts = experts.max(e as usize + 1);
        }
        flush(&mut cur, &mut steps);
        check_cells(path, steps.len(), layers, text.len())?;
        if layers * experts > MAX_LAYER_EXPERTS {
            return Err(bad(
                path,
                format!("{layers} layers × {experts} experts is out of range"),
            ));
        }
        for s in &mut steps {
            s.layers.resize(layers, None);
            for r in s.layers.iter().flatten() {
                top_k = top_k.max(r.experts.len());
            }
        }
        if top_k > MAX_TOP_K {
            return Err(bad(
                path,
                format!("{top_k} experts chosen in one step (at most {MAX_TOP_K})"),
            ));
        }
        if steps.is_empty() {
            return Err(bad(path, "no `layer,expert` rows"));
        }
        Ok(Trace {
            model_id: "llama.cpp moe-trace".into(),
            layers,
            experts,
            top_k,
            steps,
        })
    }

    /// The JSON format (what `sluice trace record` and `import` write).
    pub fn to_json(&self) -> Value {
        let routes: Vec<Value> = self
            .steps
            .iter()
            .map(|s| {
                let layers: serde_json::Map<String, Value> = s
                    .layers
                    .iter()
                    .enumerate()
                    .filter_map(|(l, r)| {
                        r.as_ref().map(|r| {
                            (
                                l.to_string(),
                                json!({"experts": r.experts, "weights": r.weights}),
                            )
                        })
                    })
                    .collect();
                json!({"token_pos": s.pos, "token_id": s.token,
                       "phase": if s.decode { "decode" } else { "prefill" }, "layers": layers})
            })
            .collect();
        let prompt = self.steps.iter().filter(|s| !s.decode).count();
        json!({
            "meta": {"model_id": self.model_id, "num_layers": self.layers,
                     "num_moe_layers": self.moe_layers().len(), "num_experts": self.experts,
                     "top_k": self.top_k, "prompt_len": prompt,
                     "generated_len": self.steps.len() - prompt, "total_tokens": self.steps.len(),
                     "backend": "sluice"},
            "prompt_tokens": self.steps.iter().filter(|s| !s.decode).filter_map(|s| s.token).collect::<Vec<_>>(),
            "generated_tokens": self.steps.iter().filter(|s| s.decode).filter_map(|s| s.token).collect::<Vec<_>>(),
            "routes": routes,
        })
    }

    /// Layers that have routes.
    pub fn moe_layers(&self) -> Vec<usize> {
        (0..self.layers)
            .filter(|&l| {
                self.steps
                    .iter()
                    .any(|s| s.layers.get(l).is_some_and(Option::is_some))
            })
            .collect()
    }
}

/// What [`stats`] simulates.
#[derive(Clone, Debug)]
pub struct StatsOptions {
    /// Slot counts per layer.
    pub slots: Vec<usize>,
    /// Simulate decode tokens only (the prompt still teaches predictors
    /// and seeds policies), else every token.
    pub decode_only: bool,
    /// Bytes of one expert, for wasted-byte figures (0: report experts).
    pub expert_bytes: u64,
    /// Traces every predictor learns before this one starts (earlier
    /// sessions' routes, ids as recorded).
    pub seed: Vec<Trace>,
}

/// Online policies compared with Belady.
const POLICIES: &[&str] = &["lru", "lfu", "router"];

struct Sim {
    hits: Vec<u64>,
    uses: Vec<u64>,
    all_ready: u64,
    layer_steps: u64,
    prefetched: u64,
    prefetch_used: u64,
    predicted: u64,
    predicted_right: u64,
}

/// One policy (and optionally a predictor prefetching `m` experts before
/// each layer's demand) over one trace with `slots` per layer.
fn simulate(
    t: &Trace,
    slots: usize,
    decode_only: bool,
    policy: &dyn Fn(usize) -> Box<dyn Policy>,
    mut predictor: Option<(Box<dyn Predictor>, usize)>,
) -> Sim {
    let layers = t.moe_layers();
    let mut caches: Vec<SlotCache> = (0..t.layers)
        .map(|l| SlotCache::new(slots, policy(l)))
        .collect();
    let mut unused: Vec<std::collections::HashSet<u32>> = vec![Default::default(); t.layers];
    let mut sim = Sim {
        hits: vec![0; t.layers],
        uses: vec![0; t.layers],
        all_ready: 0,
        layer_steps: 0,
        prefetched: 0,
        prefetch_used: 0,
        predicted: 0,
        predicted_right: 0,
    };
    let mut pred = Vec::new();
    let mut step = 0u64;
    for s in &t.steps {
        let counted = !decode_only || s.decode;
        if let Some((p, _)) = &mut predictor {
            p.begin_token(s.token);
        }
        for &l in &layers {
            let Some(r) = &s.layers[l] else { continue };
            let prob = |i: usize| r.weights.get(i).copied().unwrap_or(1.0);
            let c = &mut caches[l];
            if !counted {
                for (i, &e) in r.experts.iter().enumerate() {
                    c.observe(ExpertKey::new(l, e as usize), step, prob(i));
                }
                if let Some((p, _)) = &mut predictor {
                    p.observe(l, &r.experts);
                }
                continue;
            }
            // Prefetched experts stay pinned until the demand has been
            // served, so one prefetch does not evict another.
            let mut prefetch_pins = Vec::new();
            if let Some((p, m)) = &mut predictor {
                p.predict(l, *m, &mut pred);
                sim.predicted += pred.len() as u64;
                sim.predicted_right += pred.iter().filter(|e| r.experts.contains(e)).count() as u64;
                for &e in &pred {
                    match c.prefetch(ExpertKey::new(l, e as usize), step) {
                        Acquire::Miss(slot) => {
                            c.mark_ready(slot);
                            c.pin(slot);
                            prefetch_pins.push(slot);
                            sim.prefetched += 1;
                            unused[l].insert(e);
                        }
                        Acquire::Hit(slot) => {
                            c.pin(slot);
                            prefetch_pins.push(slot);
                        }
                        Acquire::Full => {}
                    }
                }
                p.observe(l, &r.experts);
            }
            let mut pinned = Vec::with_capacity(r.experts.len());
            let mut all = true;
            let keys: Vec<(ExpertKey, f32)> = r
                .experts
                .iter()
                .enumerate()
                .map(|(i, &e)| (ExpertKey::new(l, e as usize), prob(i)))
                .collect();
            for (&e, a) in r.experts.iter().zip(c.acquire_step(&keys, step)) {
                match a {
                    Acquire::Hit(slot) => {
                        sim.hits[l] += 1;
                        if unused[l].remove(&e) {
                            sim.prefetch_used += 1;
                        }
                        pinned.push(slot);
                    }
                    Acquire::Miss(slot) => {
                        all = false;
                        c.mark_ready(slot);
                        pinned.push(slot);
                    }
                    Acquire::Full => all = false,
                }
                sim.uses[l] += 1;
            }
            for slot in pinned.into_iter().chain(prefetch_pins) {
                c.release(slot);
            }
            // Prefetched experts evicted unused are gone for good.
            unused[l].retain(|&e| c.slot_of(ExpertKey::new(l, e as usize)).is_some());
            sim.all_ready += all as u64;
            sim.layer_steps += 1;
        }
        step += 1;
    }
    sim
}

fn rate(h: u64, n: u64) -> f64 {
    if n == 0 {
        0.0
    } else {
        h as f64 / n as f64
    }
}

/// Hit rates of every policy (and Belady's) and figures of every predictor,
/// per slot count, as one JSON object: `policies` maps a policy to
/// `{slots: hit rate over all layers}`; `per_layer` holds the same per
/// layer; `predictors` holds recall, precision, all-K-ready rate and wasted
/// prefetches per token.
pub fn stats(t: &Trace, o: &StatsOptions) -> Value {
    let mut policies = serde_json::Map::new();
    let mut per_layer = serde_json::Map::new();
    let layers = t.moe_layers();
    let mut record = |name: &str, n: usize, sim: &Sim| {
        let h: u64 = sim.hits.iter().sum();
        let u: u64 = sim.uses.iter().sum();
        policies
            .entry(name)
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .expect("object")
            .insert(n.to_string(), json!(rate(h, u)));
        per_layer
            .entry(name)
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .expect("object")
            .insert(
                n.to_string(),
                json!(layers
                    .iter()
                    .map(|&l| rate(sim.hits[l], sim.uses[l]))
                    .collect::<Vec<_>>()),
            );
    };
    // Belady's future: the steps the simulation counts, per layer.
    let steps_of = |l: usize| -> Vec<Vec<ExpertKey>> {
        t.steps
            .iter()
            .filter(|s| !o.decode_only || s.decode)
            .map(|s| {
                s.layers[l]
                    .as_ref()
                    .map(|r| {
                        r.experts
                            .iter()
                            .map(|&e| ExpertKey::new(l, e as usize))
                            .collect()
                    })
                    .unwrap_or_default()
            })
            .collect()
    };
    let mut predictors = serde_json::Map::new();
    for &n in &o.slots {
        for &p in POLICIES {
            let sim = simulate(
                t,
                n,
                o.decode_only,
                &|_| policy_by_name(p).expect("known"),
                None,
            );
            record(p, n, &sim);
        }
        // Belady counts steps only where the simulation counts them.
        let first_counted = if o.decode_only {
            t.steps
                .iter()
                .position(|s| s.decode)
                .unwrap_or(t.steps.len()) as u64
        } else {
            0
        };
        let sim = simulate(
            t,
            n,
            o.decode_only,
            &|l| Box::new(Shifted(Belady::new(&steps_of(l)), first_counted)),
            None,
        );
        record("belady", n, &sim);
        for &pname in sluice_cache::PREDICTOR_NAMES {
            let mut p = predictor_by_name(pname, t.layers, t.experts).expect("known");
            for s in &o.seed {
                s.teach(p.as_mut());
            }
            let sim = simulate(
                t,
                n,
                o.decode_only,
                &|_| policy_by_name("lfu").expect("known"),
                Some((p, t.top_k)),
            );
            record(&format!("lfu+{pname}"), n, &sim);
            let tokens = t
                .steps
                .iter()
                .filter(|s| !o.decode_only || s.decode)
                .count()
                .max(1);
            let wasted = (sim.prefetched - sim.prefetch_used) as f64 / tokens as f64;
            let entry = predictors
                .entry(pname)
                .or_insert_with(|| json!({}))
                .as_object_mut()
                .expect("object");
            entry.insert(
                n.to_string(),
                json!({
                    "recall": rate(sim.predicted_right, sim.uses.iter().sum()),
                    "precision": rate(sim.predicted_right, sim.predicted),
                    "all_k_ready_rate": rate(sim.all_ready, sim.layer_steps),
                    "hit_rate": rate(sim.hits.iter().sum(), sim.uses.iter().sum()),
                    "prefetches_per_token": sim.prefetched as f64 / tokens as f64,
                    "wasted_prefetches_per_token": wasted,
                    "wasted_prefetch_bytes_per_token": wasted * o.expert_bytes as f64,
                }),
            );
        }
    }
    json!({
        "model_id": t.model_id,
        "layers": layers.len(),
        "experts": t.experts,
        "top_k": t.top_k,
        "tokens": t.steps.iter().filter(|s| !o.decode_only || s.decode).count(),
        "phase": if o.decode_only { "decode" } else { "all" },
        "policies": policies,
        "per_layer": per_layer,
        "predictors": predictors,
    })
}

/// Belady over the counted steps, fed absolute step numbers.
struct Shifted(Belady, u64);

impl Policy for Shifted {
    fn name(&self) -> &'static str {
        "belady"
    }
    fn insert(&mut self, key: ExpertKey, step: u64, p: f32) {
        self.0.insert(key, step.saturating_sub(self.1), p)
    }
    fn touch(&mut self, key: ExpertKey, step: u64, p: f32) {
        if step >= self.1 {
            self.0.touch(key, step - self.1, p)
        }
    }
    fn remove(&mut self, key: ExpertKey) {
        self.0.remove(key)
    }
    fn victim(&mut self, ev: &dyn Fn(ExpertKey) -> bool) -> Option<ExpertKey> {
        self.0.victim(ev)
    }
}

#[cfg(test)]
mod tests;
