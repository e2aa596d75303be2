//! Where a MoE layer's experts come from: the seam between the forward
//! pass and the streaming core. The MoE step routes, asks an
//! [`ExpertSource`] for the chosen experts a wave at a time, computes each
//! and lets it go, then combines: route → fetch → compute → combine.

use crate::model::{Ffn, Model};
use crate::replay::Replay;
use sluice_cache::Predictor;
use sluice_core::{Backend, Error, Result, WeightView};
use sluice_stream::{Prefetch, Streamer};
use std::sync::Arc;

/// Supplies the weights of the experts a layer routed to.
pub trait ExpertSource: Send {
    /// A forward pass over `tokens` starts.
    fn begin(&mut self, tokens: &[u32]);

    /// Layer `layer` routed the batch to `chosen` (per token, best first);
    /// `hidden` is the MoE block's input (`n × hidden`).
    fn routed(&mut self, layer: usize, chosen: &[&[usize]], hidden: &[f32]);

    /// Makes the longest run of `wanted[from..]` (ascending expert ids
    /// with the largest router weight each got) it can available; `wave`
    /// gets `(expert, handle)` pairs; returns how many were taken.
    fn fetch(
        &mut self,
        layer: usize,
        wanted: &[(usize, f32)],
        from: usize,
        step: u64,
        wave: &mut Vec<(usize, usize)>,
    ) -> Result<usize>;

    /// The gate, up and down matrices of expert `e` of `layer`, fetched
    /// as `handle`.
    fn expert(&self, layer: usize, e: usize, handle: usize) -> [WeightView<'_>; 3];

    /// `handle` has been computed; `rest` of the wave has not.
    fn done(&mut self, handle: usize, rest: &[(usize, usize)]) -> Result<()>;

    /// A computation failed: lets go of `rest`, returns `err`.
    fn abort(&mut self, rest: &[(usize, usize)], err: Error) -> Result<()>;

    /// Between two computations (the drive may be fed).
    fn tick(&mut self) -> Result<()>;

    /// The streamer behind this source, if experts are streamed.
    fn streamer(&self) -> Option<&Streamer> {
        None
    }

    /// Whether the backend binds this source's fetched experts where they
    /// lie (streamer slots imported by the device): a slot must then stay
    /// pinned until the device has run the work that reads it, not only
    /// until that work is recorded.
    fn bound_in_place(&self) -> bool {
        false
    }

    /// Replayed routes are in use: a source that prefetches by the
    /// oracle learns the future from them.
    fn set_replay(&mut self, replay: &Arc<Replay>) {
        let _ = replay;
    }
}

/// Experts read in place from the model's files (mapped).
pub struct Resident {
    model: Arc<Model>,
}

impl Resident {
    /// The experts of `model`, as loaded.
    pub fn new(model: Arc<Model>) -> Self {
        Resident { model }
    }
}

impl ExpertSource for Resident {
    fn begin(&mut self, _: &[u32]) {}

    fn routed(&mut self, _: usize, _: &[&[usize]], _: &[f32]) {}

    fn fetch(
        &mut self,
        _: usize,
        wanted: &[(usize, f32)],
        from: usize,
        _: u64,
        wave: &mut Vec<(usize, usize)>,
    ) -> Result<usize> {
        wave.clear();
        wave.extend(wanted[from..].iter().map(|&(e, _)| (e, e)));
        Ok(wave.len())
    }

    fn expert(&self, layer: usize, e: usize, _: usize) -> [WeightView<'_>; 3] {
        let Ffn::Moe(m) = &self.model.layers[layer].ffn else {
            unreachable!("experts are fetched for MoE layers only")
        };
        let x = &m.experts[e];
        [x.gate.view(), x.up.view(), x.down.view()]
    }

    fn done(&mut self, _: usize, _: &[(usize, usize)]) -> Result<()> {
        Ok(())
    }

    fn abort(&mut self, _: &[(usize, usize)], err: Error) -> Result<()> {
        Err(err)
    }

    fn tick(&mut self) -> Result<()> {
        Ok(())
    }
}

/// Experts streamed from storage under the RAM cap.
pub struct Streamed {
    streamer: Streamer,
    backend: Arc<dyn Backend>,
    /// Slots the backend's device binds in place (imported host memory),
    /// let go before the streamer frees them.
    mapped: Vec<*const u8>,
}

// `mapped` only names slot memory the streamer (which is Send) owns.
// SAFETY: the pointers go back to the backend, never dereferenced.
unsafe impl Send for Streamed {}

impl Streamed {
    /// `streamer` (opened on `model`) as the experts' source; speculative
    /// gating, when chosen, runs `model`'s routers on `backend`. A backend
    /// whose device can bind host memory gets the slots to bind in place.
    pub fn new(mut streamer: Streamer, model: Arc<Model>, backend: Arc<dyn Backend>) -> Self {
        if streamer.prefetch() == Prefetch::Gate {
            streamer.set_predictor(Box::new(Gate::new(model, backend.clone())));
        }
        let mut mapped = Vec::new();
        if let Some(x) = backend.device_exec() {
            for (p, len) in streamer.slot_memory() {
                // The slots live as long as the streamer, which outlives the
                // mapping (`Drop` forgets it first); a slot is written only
                // once unpinned, which the device path defers until the
                // batch that reads it has run.
                // SAFETY: the memory outlives the mapping, unwritten while read.
                if let Ok(true) = unsafe { x.map_host(p, len) } {
                    mapped.push(p);
                }
            }
        }
        Streamed {
            streamer,
            backend,
            mapped,
        }
    }
}

impl Drop for Streamed {
    fn drop(&mut self) {
        if let Some(x) = self.backend.device_exec() {
            for &p in &self.mapped {
                x.forget_host(p);
            }
        }
    }
}

impl ExpertSource for Streamed {
    fn begin(&mut self, tokens: &[u32]) {
        self.streamer.begin(tokens);
    }

    fn routed(&mut self, layer: usize, chosen: &[&[usize]], hidden: &[f32]) {
        self.streamer.routed(layer, chosen, hidden);
    }

    fn fetch(
        &mut self,
        layer: usize,
        wanted: &[(usize, f32)],
        from: usize,
        step: u64,
        wave: &mut Vec<(usize, usize)>,
    ) -> Result<usize> {
        self.streamer.fetch(layer, wanted, from, step, wave)
    }

    fn expert(&self, layer: usize, e: usize, slot: usize) -> [WeightView<'_>; 3] {
        self.streamer.views(layer, e, slot)
    }

    fn done(&mut self, slot: usize, rest: &[(usize, usize)]) -> Result<()> {
        self.streamer.done(slot, rest)
    }

    fn abort(&mut self, rest: &[(usize, usize)], err: Error) -> Result<()> {
        self.streamer.abort(rest, err)
    }

    fn tick(&mut self) -> Result<()> {
        self.streamer.tick()
    }

    fn streamer(&self) -> Option<&Streamer> {
        Some(&self.streamer)
    }

    fn bound_in_place(&self) -> bool {
        !self.mapped.is_empty()
    }

    fn set_replay(&mut self, replay: &Arc<Replay>) {
        if self.streamer.prefetch() == Prefetch::Oracle {
            self.streamer
                .set_predictor(Box::new(crate::replay::Oracle::new(replay.clone())));
        }
    }
}

/// Speculative gating: the next MoE layers' routers applied to this
/// layer's input, their top experts taken as certain.
pub struct Gate {
    model: Arc<Model>,
    backend: Arc<dyn Backend>,
    /// The current token's latest MoE input.
    hidden: Vec<f32>,
}

impl Gate {
    /// Gating with `model`'s routers on `backend`.
    pub fn new(model: Arc<Model>, backend: Arc<dyn Backend>) -> Self {
        Gate {
            model,
            backend,
            hidden: Vec::new(),
        }
    }
}

impl Predictor for Gate {
    fn name(&self) -> &'static str {
        "gate"
    }

    fn observe(&mut self, _: usize, _: &[u32]) {}

    fn observe_input(&mut self, _: usize, hidden: &[f32]) {
        self.hidden.clear();
        self.hidden.extend_from_slice(hidden);
    }

    fn begin_token(&mut self, _: Option<u32>) {
        self.hidden.clear();
    }

    fn predict(&mut self, layer: usize, m: usize, out: &mut Vec<u32>) {
        out.clear();
        let Ffn::Moe(nm) = &self.model.layers[layer].ffn else {
            return;
        };
        let ne = self.model.config.n_experts;
        if self.hidden.len() != self.model.config.hidden {
            return;
        }
        let mut g = vec![0f32; ne];
        // A failed router product predicts nothing: the demand still reads.
        if self
            .backend
            .matmul(nm.router.view(), &self.hidden, 1, &mut g)
            .is_err()
        {
            return;
        }
        if let Some(b) = &nm.router_bias {
            crate::forward::add_rows(&mut g, b);
        }
        // Sigmoid routers choose by score plus bias (groups aside: this
        // ranks candidates, it does not decide).
        if let Some(b) = &nm.score_bias {
            for (v, b) in g.iter_mut().zip(b) {
                *v = sluice_core::ops::sigmoid(*v) + b;
            }
        }
        let mut order: Vec<usize> = (0..ne).collect();
        let kp = m.clamp(1, ne);
        let by = |a: &usize, b: &usize| g[*b].total_cmp(&g[*a]).then(a.cmp(b));
        order.select_nth_unstable_by(kp - 1, by);
        order.truncate(kp);
        order.sort_unstable_by(by);
        out.extend(order.iter().map(|&e| e as u32));
    }

    fn predicts_ahead(&self) -> bool {
        true
    }

    fn predicts_first(&self) -> bool {
        false
    }
}
