//! The forward pass: one [`Session`] per sequence, holding its KV cache.
//!
//! A call to [`Session::forward`] processes a batch of tokens (the whole
//! prompt chunk, or one token while decoding) layer by layer. Mixture-of-
//! experts blocks run expert-major: the router's choices for every token in
//! the batch are grouped by expert, and each chosen expert's three matrices
//! are applied once to all of its tokens. Results are accumulated per token
//! in ascending expert order, the order transformers uses, so the output is
//! independent of where the expert bytes came from.

use crate::experts::{ExpertSource, Resident, Streamed};
use crate::model::{
    Attention, DeltaNet, Ffn, LatentAttn, LatentKv, Linear, MixerWeights, Mlp, Model, Moe, PairProj,
};
pub use crate::replay::Replay;
use sluice_core::ops::{self, Rope};
use sluice_core::{AttnParams, Backend, Error, Result, WeightView};
use sluice_stream::Streamer;
use std::sync::Arc;

mod device;

/// One routing decision, reported to a [`RouteObserver`].
#[derive(Clone, Debug)]
pub struct Route<'a> {
    /// Position of the token in the sequence.
    pub pos: usize,
    /// Layer index.
    pub layer: usize,
    /// Chosen experts, best first.
    pub experts: &'a [usize],
    /// Their weights (after any renormalization).
    pub weights: &'a [f32],
}

/// Receives every routing decision (trace recording, statistics).
pub type RouteObserver = Box<dyn FnMut(&Route<'_>) + Send>;

/// A sequence being processed: the model, a backend and the KV cache.
pub struct Session {
    model: Arc<Model>,
    backend: Arc<dyn Backend>,
    /// Per layer: keys and values, `pos × kv_dim` each (attention layers).
    kv: Vec<(Vec<f32>, Vec<f32>)>,
    /// Per layer: conv history and recurrent state (linear layers).
    lin: Vec<LinState>,
    pos: usize,
    observer: Option<RouteObserver>,
    /// Where the routed experts come from.
    experts: Box<dyn ExpertSource>,
    replay: Option<Arc<Replay>>,
    /// Whether to take the backend's device-resident path when it has one.
    device_forward: bool,
    /// What the session keeps on the device, once on that path.
    dev: Option<device::DevState>,
    /// Experts `(id, handle)` bound in place that the device has not run
    /// yet: pinned until the batch that reads them is waited for.
    held: Vec<(usize, usize)>,
    /// Whether the device path may guess the next token (see
    /// [`set_guess_next`](Self::set_guess_next)).
    guess_next: bool,
    /// Positions the caller reserved room for (0: unknown).
    ctx_hint: usize,
}

impl Drop for Session {
    fn drop(&mut self) {
        if let (Some(d), Some(x)) = (&self.dev, self.backend.device_exec()) {
            d.release(x);
        }
    }
}

impl Session {
    /// A new, empty sequence.
    pub fn new(model: Arc<Model>, backend: Arc<dyn Backend>) -> Self {
        let n = model.config.n_layers;
        let lin = model
            .layers
            .iter()
            .map(|l| match &l.mixer {
                MixerWeights::DeltaNet(_) => LinState::new(&model.config),
                MixerWeights::Attention(_) | MixerWeights::Latent(_) => LinState::default(),
            })
            .collect();
        Session {
            backend,
            kv: vec![(Vec::new(), Vec::new()); n],
            lin,
            pos: 0,
            observer: None,
            experts: Box::new(Resident::new(model.clone())),
            model,
            replay: None,
            device_forward: true,
            dev: None,
            held: Vec::new(),
            guess_next: true,
            ctx_hint: 0,
        }
    }

    /// Whether the session may run on the backend's device-resident path
    /// ([`Backend::device_exec`]; on by default). Takes effect for a
    /// session that has not run a token yet.
    pub fn set_device_forward(&mut self, on: bool) {
        self.device_forward = on;
    }

    /// Whether the session runs on the device-resident path (or will, at
    /// its first token).
    pub fn is_device_resident(&self) -> bool {
        self.on_device()
    }

    /// Makes MoE layers use `replay`'s recorded choices instead of the
    /// router's (routing replay: a synthetic model with a real model's
    /// locality). The output then no longer follows the model's router.
    pub fn set_replay(&mut self, replay: Option<Replay>) {
        self.replay = replay.map(Arc::new);
        if let Some(r) = &self.replay {
            self.experts.set_replay(r);
        }
    }

    /// The routing replay in use, if any.
    pub fn replay(&self) -> Option<&Replay> {
        self.replay.as_deref()
    }

    /// A sequence whose routed experts come from `streamer` (see
    /// [`Streamer::open`], which prepared `model`) instead of the model's
    /// maps. The KV cache is reserved for `ctx` tokens up front, as the
    /// RAM budget assumed.
    pub fn streaming(
        model: Arc<Model>,
        backend: Arc<dyn Backend>,
        streamer: Streamer,
        ctx: usize,
    ) -> Self {
        let mut s = Session::new(model, backend);
        s.ctx_hint = ctx;
        let (kd, vd) = s.model.config.kv_widths();
        for (li, (k, v)) in s.kv.iter_mut().enumerate() {
            if s.model.config.mixers[li] == crate::config::Mixer::Attention {
                k.reserve_exact(ctx * kd);
                v.reserve_exact(ctx * vd);
            }
        }
        s.experts = Box::new(Streamed::new(streamer, s.model.clone(), s.backend.clone()));
        s
    }

    /// The streamer, when experts are streamed.
    pub fn streamer(&self) -> Option<&Streamer> {
        self.experts.streamer()
    }

    /// The compute backend.
    pub fn backend(&self) -> &dyn Backend {
        &*self.backend
    }

    /// Tokens processed so far.
    pub fn pos(&self) -> usize {
        self.pos
    }

    /// On the device path, after the logits of a single token, the device
    /// also takes their arg-max as its guess of the next token and runs it
    /// through the layers up to the first MoE router in the same
    /// submission; a next call with that token (a greedy sampler's) then
    /// starts from the router's choice, which saves one submission and one
    /// wait per token. Any other token undoes the guess (its DeltaNet
    /// states are put back; the positions it wrote are written again), so
    /// the output never depends on it. Guessing stops by itself after two
    /// wrong guesses in a row, retrying now and then; `false` turns it off.
    pub fn set_guess_next(&mut self, on: bool) {
        self.guess_next = on;
    }

    /// Forgets the sequence.
    pub fn reset(&mut self) {
        self.pos = 0;
        if let Some(d) = &mut self.dev {
            // Zeroed on the device at the next token.
            d.lin_stale = true;
            d.guess = None;
            d.lin_rollback = false;
        }
        for (k, v) in &mut self.kv {
            k.clear();
            v.clear();
        }
        for s in &mut self.lin {
            s.conv.iter_mut().for_each(|v| *v = 0.0);
            s.state.iter_mut().for_each(|v| *v = 0.0);
        }
    }

    /// Whether the sequence can be cut back to an earlier position: only
    /// attention keeps one entry per position; a linear layer's recurrent
    /// state has folded every token in and cannot be rewound.
    pub fn can_truncate(&self) -> bool {
        self.model
            .layers
            .iter()
            .all(|l| !matches!(l.mixer, MixerWeights::DeltaNet(_)))
    }

    /// Forgets every position from `pos` on, keeping the KV cache of the
    /// ones before (a shared prefix reused by the next prompt). Fails for
    /// models with linear layers unless nothing is cut
    /// ([`can_truncate`](Self::can_truncate)).
    pub fn truncate(&mut self, pos: usize) -> Result<()> {
        if pos >= self.pos {
            return Ok(());
        }
        if !self.can_truncate() {
            return Err(Error::Invalid(format!(
                "a model with linear-attention layers cannot be rewound from position {} to {pos}",
                self.pos
            )));
        }
        if let Some(d) = &mut self.dev {
            d.lin_rollback |= d.guess.take().is_some();
        }
        let (kd, vd) = self.model.config.kv_widths();
        for (k, v) in &mut self.kv {
            k.truncate(pos * kd);
            v.truncate(pos * vd);
        }
        self.pos = pos;
        Ok(())
    }

    /// The sequence's state at this position, for going back to it later
    /// ([`restore`](Self::restore)): the linear layers' states (copied;
    /// [`Snapshot::bytes`] of them) and the position. The KV cache is not
    /// copied: attention keeps one entry per position, cut back on restore.
    pub fn snapshot(&self) -> Result<Snapshot> {
        let mut lin = self.lin.clone();
        if let (Some(d), Some(x)) = (&self.dev, self.backend.device_exec()) {
            d.read_lin(x, &mut lin)?;
        }
        Ok(Snapshot {
            pos: self.pos,
            lin,
            kv: None,
        })
    }

    /// The whole sequence state, KV cache included: a conversation put
    /// aside, to be taken up again by [`restore`](Self::restore) whatever
    /// this session runs in between.
    pub fn park(&self) -> Result<Snapshot> {
        let mut s = self.snapshot()?;
        s.kv = Some(match (&self.dev, self.backend.device_exec()) {
            (Some(d), Some(x)) => d.read_kv(x, &self.model, self.pos)?,
            _ => self.kv.clone(),
        });
        Ok(s)
    }

    /// Goes back to `s`, taken from this session at or before the current
    /// position with the same tokens since: the KV cache is cut back to
    /// `s.pos()` and the linear layers' states are `s`'s again, so the
    /// next tokens compute exactly as they did from there.
    /// A [`park`](Self::park)ed state replaces the whole sequence.
    pub fn restore(&mut self, s: &Snapshot) -> Result<()> {
        if let Some(kv) = &s.kv {
            if kv.len() != self.kv.len() || s.lin.len() != self.lin.len() {
                return Err(Error::Invalid("a parked state of another model".into()));
            }
            // A new session taking up a parked state runs on the path it
            // would have started on.
            if self.on_device() {
                if let Some(x) = self.backend.clone().device_exec() {
                    self.start_device(x)?;
                }
            }
            if let Some(d) = &mut self.dev {
                let x = self.backend.device_exec().ok_or_else(|| {
                    Error::Unsupported("the backend has no device executor".into())
                })?;
                d.write_kv(x, &self.model, kv, s.pos)?;
                d.write_lin(x, &s.lin)?;
                d.lin_stale = false;
                d.guess = None;
                d.lin_rollback = false;
                self.pos = s.pos;
                return Ok(());
            }
            self.kv.clone_from(kv);
            self.lin.clone_from(&s.lin);
            self.pos = s.pos;
            return Ok(());
        }
        if s.pos > self.pos || s.lin.len() != self.lin.len() {
            return Err(Error::Invalid(format!(
                "a snapshot at position {} does not precede this session's position {}",
                s.pos, self.pos
            )));
        }
        if let (Some(d), Some(x)) = (&mut self.dev, self.backend.device_exec()) {
            d.write_lin(x, &s.lin)?;
            d.lin_stale = false;
            d.guess = None;
            d.lin_rollback = false;
        }
        let (kd, vd) = self.model.config.kv_widths();
        for (k, v) in &mut self.kv {
            k.truncate(s.pos * kd);
            v.truncate(s.pos * vd);
        }
        self.lin.clone_from(&s.lin);
        self.pos = s.pos;
        Ok(())
    }

    /// Installs a routing observer.
    pub fn set_observer(&mut self, o: Option<RouteObserver>) {
        self.observer = o;
    }

    /// Bytes held by the KV cache and the linear layers' states.
    pub fn kv_bytes(&self) -> usize {
        let kv: usize = match &self.dev {
            // The caches are on the device: one entry per position.
            Some(_) => {
                let c = &self.model.config;
                let (kd, vd) = c.kv_widths();
                let caches = c
                    .mixers
                    .iter()
                    .filter(|&&m| m == crate::config::Mixer::Attention);
                caches.count() * self.pos * (kd + vd) * 4
            }
            None => self.kv.iter().map(|(k, v)| (k.len() + v.len()) * 4).sum(),
        };
        let lin: usize = self
            .lin
            .iter()
            .map(|s| (s.conv.len() + s.state.len()) * 4)
            .sum();
        kv + lin
    }

    /// Runs `tokens` through the model. Returns the logits of every
    /// position (`tokens.len() × vocab`) when `all_logits`, else of the
    /// last position only.
    pub fn forward(&mut self, tokens: &[u32], all_logits: bool) -> Result<Vec<f32>> {
        let model = self.model.clone();
        let c = &model.config;
        let n = tokens.len();
        if n == 0 {
            return Err(Error::Invalid("no tokens to process".into()));
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= c.vocab) {
            return Err(Error::TokenOutOfVocab {
                id: bad,
                vocab: c.vocab,
            });
        }
        if self.on_device() {
            return self.forward_device(tokens, all_logits);
        }
        self.experts.begin(tokens);
        let h = c.hidden;
        let mut x = vec![0f32; n * h];
        for (t, row) in tokens.iter().zip(x.chunks_exact_mut(h)) {
            model.embed.row_f32(*t as usize, row)?;
        }
        for (li, layer) in model.layers.iter().enumerate() {
            let mut hn = x.clone();
            self.backend
                .rms_norm(&mut hn, &layer.attn_norm, c.rms_eps)?;
            let o = match &layer.mixer {
                MixerWeights::Attention(a) => self.attention(li, a, &hn, n)?,
                MixerWeights::DeltaNet(d) => self.delta_net(li, d, &hn, n)?,
                MixerWeights::Latent(a) => self.latent_attention(li, a, &hn, n)?,
            };
            for (a, b) in x.iter_mut().zip(&o) {
                *a += b;
            }
            let mut hn = x.clone();
            self.backend.rms_norm(&mut hn, &layer.ffn_norm, c.rms_eps)?;
            let out = match &layer.ffn {
                Ffn::Dense(m) => self.mlp(m, &hn, n)?,
                Ffn::Moe(m) => self.moe(li, m, &hn, n)?,
            };
            for (a, b) in x.iter_mut().zip(&out) {
                *a += b;
            }
        }
        self.pos += n;
        let rows = if all_logits {
            &x[..]
        } else {
            &x[(n - 1) * h..]
        };
        let m = rows.len() / h;
        let mut xn = rows.to_vec();
        self.backend.rms_norm(&mut xn, &model.norm, c.rms_eps)?;
        let mut logits = vec![0f32; m * c.vocab];
        self.backend
            .matmul(model.lm_head.view(), &xn, m, &mut logits)?;
        Ok(logits)
    }

    /// Lets the expert source feed the drive between two computations.
    fn tick(&mut self) -> Result<()> {
        self.experts.tick()
    }

    fn linear(&self, l: &Linear, x: &[f32], n: usize) -> Result<Vec<f32>> {
        let mut y = vec![0f32; n * l.w.rows];
        self.backend.matmul(l.w.view(), x, n, &mut y)?;
        if let Some(b) = &l.bias {
            add_rows(&mut y, b);
        }
        Ok(y)
    }

    /// Softmax attention of the normalized input `hn`; returns the
    /// layer's contribution to the residual stream.
    fn attention(
        &mut self,
        li: usize,
        layer: &Attention,
        hn: &[f32],
        n: usize,
    ) -> Result<Vec<f32>> {
        // The model outlives the borrows of `self` that ticks take.
        let model = self.model.clone();
        let c = &model.config;
        let qd = c.n_heads * c.head_dim;
        let mut q = self.linear(&layer.q, hn, n)?;
        // Qwen3.5: each head's rows are `[q | gate]`; split them.
        let gate = if c.attn_gate {
            let hd = c.head_dim;
            let mut qs = Vec::with_capacity(n * qd);
            let mut gs = Vec::with_capacity(n * qd);
            for pair in q.chunks_exact(2 * hd) {
                qs.extend_from_slice(&pair[..hd]);
                gs.extend_from_slice(&pair[hd..]);
            }
            q = qs;
            Some(gs)
        } else {
            None
        };
        self.tick()?;
        let mut k = self.linear(&layer.k, hn, n)?;
        let mut v = self.linear(&layer.v, hn, n)?;
        self.tick()?;
        if let Some(w) = &layer.q_norm {
            self.backend.rms_norm(&mut q, w, c.rms_eps)?;
        }
        if let Some(w) = &layer.k_norm {
            self.backend.rms_norm(&mut k, w, c.rms_eps)?;
        }
        if let Some(clip) = c.clip_qkv {
            for t in q.iter_mut().chain(k.iter_mut()).chain(v.iter_mut()) {
                *t = t.clamp(-clip, clip);
            }
        }
        // Llama 4: no-rope layers, q/k norm and chunks on the rope layers,
        // temperature-tuned queries on the others.
        let l4 = c.llama4.as_ref();
        let roped = l4.is_none_or(|l| l.rope_layers[li]);
        if roped {
            let rope = rope_of(c);
            self.backend.rope(&rope, self.pos, &mut q, n, c.head_dim)?;
            self.backend.rope(&rope, self.pos, &mut k, n, c.head_dim)?;
        }
        let mut chunk = None;
        if let Some(l) = l4 {
            if roped {
                chunk = l.chunk;
                if l.qk_norm {
                    let ones = vec![1f32; c.head_dim];
                    self.backend.rms_norm(&mut q, &ones, c.rms_eps)?;
                    self.backend.rms_norm(&mut k, &ones, c.rms_eps)?;
                }
            } else if let Some((floor, scale)) = l.temperature {
                for (t, row) in q.chunks_exact_mut(qd).enumerate() {
                    let pos = (self.pos + t) as f32;
                    let m = ((pos + 1.0) / floor).floor().ln_1p() * scale + 1.0;
                    row.iter_mut().for_each(|v| *v *= m);
                }
            }
        }
        let (kc, vc) = &mut self.kv[li];
        kc.extend_from_slice(&k);
        vc.extend_from_slice(&v);
        let p = AttnParams {
            n_heads: c.n_heads,
            n_kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
            scale: c
                .attn_scale
                .unwrap_or_else(|| 1.0 / (c.head_dim as f32).sqrt()),
            window: c.windows[li],
            chunk,
            sinks: layer.sinks.as_deref(),
        };
        let mut att = vec![0f32; n * qd];
        self.backend
            .attention(&q, kc, vc, n, self.pos, &p, &mut att)?;
        if let Some(g) = gate {
            for (a, g) in att.iter_mut().zip(&g) {
                *a *= ops::sigmoid(*g);
            }
        }
        self.linear(&layer.o, &att, n)
    }

    /// Multi-head latent attention of the normalized input `hn`, in the
    /// absorbed form: the cache keeps per position only the normalized
    /// latent and the rotary key (`kv_lora + rope` values for all heads);
    /// each head's key expansion is folded into its query and its value
    /// expansion applied after the weighted sum, so attention runs as one
    /// shared key/value head over `[latent | rotary]`, whose first
    /// `kv_lora` values serve as the value.
    fn latent_attention(
        &mut self,
        li: usize,
        a: &LatentAttn,
        hn: &[f32],
        n: usize,
    ) -> Result<Vec<f32>> {
        let model = self.model.clone();
        let c = &model.config;
        let m = c.mla.expect("a latent layer has its shape");
        let (heads, l, r, nope, vd) = (c.n_heads, m.kv_lora, m.rope, m.nope, m.v);
        let qk = nope + r;
        let be = &*self.backend;
        let q = match &a.q_a {
            Some((wa, norm)) => {
                let mut qa = vec![0f32; n * wa.rows];
                be.matmul(wa.view(), hn, n, &mut qa)?;
                be.rms_norm(&mut qa, norm, c.rms_eps)?;
                let mut q = vec![0f32; n * a.q.rows];
                be.matmul(a.q.view(), &qa, n, &mut q)?;
                q
            }
            None => {
                let mut q = vec![0f32; n * a.q.rows];
                be.matmul(a.q.view(), hn, n, &mut q)?;
                q
            }
        };
        let mut kv = vec![0f32; n * (l + r)];
        be.matmul(a.kv_a.view(), hn, n, &mut kv)?;
        let (mut lat, mut kpe) = (Vec::with_capacity(n * l), Vec::with_capacity(n * r));
        for row in kv.chunks_exact(l + r) {
            lat.extend_from_slice(&row[..l]);
            kpe.extend_from_slice(&row[l..]);
        }
        be.rms_norm(&mut lat, &a.kv_a_norm, c.rms_eps)?;
        let mut qpe: Vec<f32> = q
            .chunks_exact(qk)
            .flat_map(|head| &head[nope..])
            .copied()
            .collect();
        let rope = rope_of(c);
        be.rope(&rope, self.pos, &mut qpe, n, r)?;
        be.rope(&rope, self.pos, &mut kpe, n, r)?;
        // Per token and head: [absorbed query | rotary query].
        let w = l + r;
        let mut qf = vec![0f32; n * heads * w];
        for t in 0..n {
            for h in 0..heads {
                let dst = &mut qf[(t * heads + h) * w..(t * heads + h + 1) * w];
                dst[l..].copy_from_slice(&qpe[(t * heads + h) * r..(t * heads + h + 1) * r]);
            }
        }
        let mut xh = vec![0f32; n * nope.max(l)];
        let mut yh = vec![0f32; n * l.max(vd)];
        match &a.kv_b {
            LatentKv::Split { k_t, .. } => {
                // Per head, `kv_lora × nope`: the absorption is a product.
                for h in 0..heads {
                    for t in 0..n {
                        let src = &q[(t * heads + h) * qk..][..nope];
                        xh[t * nope..(t + 1) * nope].copy_from_slice(src);
                    }
                    be.matmul(
                        k_t.view().rows(h * l, l),
                        &xh[..n * nope],
                        n,
                        &mut yh[..n * l],
                    )?;
                    for t in 0..n {
                        qf[(t * heads + h) * w..][..l].copy_from_slice(&yh[t * l..(t + 1) * l]);
                    }
                }
            }
            LatentKv::Joint(kv_b) => {
                // The key rows are `nope × kv_lora` per head: the query
                // takes their transpose, one dequantized row at a time.
                let view = kv_b.view();
                let mut row = vec![0f32; l];
                for h in 0..heads {
                    for i in 0..nope {
                        view.row_into(h * (nope + vd) + i, &mut row);
                        for t in 0..n {
                            let s = q[(t * heads + h) * qk + i];
                            let dst = &mut qf[(t * heads + h) * w..][..l];
                            for (d, &x) in dst.iter_mut().zip(&row) {
                                *d += s * x;
                            }
                        }
                    }
                }
            }
        }
        self.tick()?;
        let (cache, _) = &mut self.kv[li];
        for t in 0..n {
            cache.extend_from_slice(&lat[t * l..(t + 1) * l]);
            cache.extend_from_slice(&kpe[t * r..(t + 1) * r]);
        }
        let p = AttnParams {
            n_heads: heads,
            n_kv_heads: 1,
            head_dim: w,
            scale: c.attn_scale.unwrap_or_else(|| 1.0 / (qk as f32).sqrt()),
            window: c.windows[li],
            chunk: None,
            sinks: None,
        };
        let mut att = vec![0f32; n * heads * w];
        let cache = &self.kv[li].0;
        self.backend
            .attention(&qf, cache, cache, n, self.pos, &p, &mut att)?;
        let (vw, v0, stride) = match &a.kv_b {
            LatentKv::Joint(w) => (w.view(), nope, nope + vd),
            LatentKv::Split { v, .. } => (v.view(), 0, vd),
        };
        let mut o = vec![0f32; n * heads * vd];
        for h in 0..heads {
            for t in 0..n {
                xh[t * l..(t + 1) * l].copy_from_slice(&att[(t * heads + h) * w..][..l]);
            }
            self.backend.matmul(
                vw.rows(h * stride + v0, vd),
                &xh[..n * l],
                n,
                &mut yh[..n * vd],
            )?;
            for t in 0..n {
                o[(t * heads + h) * vd..][..vd].copy_from_slice(&yh[t * vd..(t + 1) * vd]);
            }
        }
        let mut y = vec![0f32; n * c.hidden];
        self.backend.matmul(a.o.view(), &o, n, &mut y)?;
        Ok(y)
    }

    /// Gated DeltaNet of the normalized input `hn`, token by token through
    /// the recurrent state (the chunked form computes the same sums in
    /// another order); returns the layer's contribution.
    fn delta_net(&mut self, li: usize, d: &DeltaNet, hn: &[f32], n: usize) -> Result<Vec<f32>> {
        // The model outlives the borrows of `self` that ticks take.
        let model = self.model.clone();
        let c = &model.config;
        let l = c.linear.expect("linear layers have dimensions");
        let (nk, nv, dk, dv, kw) = (l.k_heads, l.v_heads, l.k_dim, l.v_dim, l.conv_kernel);
        let cd = l.conv_dim();
        let vd = nv * dv;
        let mm = |w: &crate::model::Weight, rows: usize| -> Result<Vec<f32>> {
            let mut y = vec![0f32; n * rows];
            self.backend.matmul(w.view(), hn, n, &mut y)?;
            Ok(y)
        };
        // Per key head, a grouped matrix's rows are `segs` (length, output,
        // offset of key head 0's segment in that output).
        let r = nv / nk;
        let (qkv, z) = match &d.qkvz {
            PairProj::Split(qkv, z) => (mm(qkv, cd)?, mm(z, vd)?),
            PairProj::Grouped(w) => ungroup(
                &mm(w, cd + vd)?,
                n,
                nk,
                [
                    (dk, 0, 0),
                    (dk, 0, nk * dk),
                    (r * dv, 0, 2 * nk * dk),
                    (r * dv, 1, 0),
                ],
                [cd, vd],
            ),
        };
        let (b, a) = match &d.ba {
            PairProj::Split(b, a) => (mm(b, nv)?, mm(a, nv)?),
            PairProj::Grouped(w) => {
                ungroup(&mm(w, 2 * nv)?, n, nk, [(r, 0, 0), (r, 1, 0)], [nv, nv])
            }
        };
        self.tick()?;
        let st = &mut self.lin[li];
        let mut out = vec![0f32; n * vd];
        let mut mixed = vec![0f32; cd];
        let mut delta = vec![0f32; dv];
        let scale = 1.0 / (dk as f32).sqrt();
        for t in 0..n {
            let x = &qkv[t * cd..(t + 1) * cd];
            // Causal depthwise conv over the last `kw` inputs, then SiLU;
            // the history keeps the previous `kw - 1` inputs per channel.
            for ch in 0..cd {
                let hist = &mut st.conv[ch * (kw - 1)..(ch + 1) * (kw - 1)];
                let w = &d.conv[ch * kw..(ch + 1) * kw];
                let mut acc = 0f32;
                for j in 0..kw - 1 {
                    acc += w[j] * hist[j];
                }
                acc += w[kw - 1] * x[ch];
                hist.copy_within(1.., 0);
                hist[kw - 2] = x[ch];
                mixed[ch] = ops::silu(acc);
            }
            let (qs, rest) = mixed.split_at_mut(nk * dk);
            let (ks, vs) = rest.split_at_mut(nk * dk);
            for h in 0..nk {
                l2norm(&mut qs[h * dk..(h + 1) * dk]);
                l2norm(&mut ks[h * dk..(h + 1) * dk]);
            }
            qs.iter_mut().for_each(|v| *v *= scale);
            for hv in 0..nv {
                let hk = l.k_head_of(hv);
                let (q, k) = (&qs[hk * dk..(hk + 1) * dk], &ks[hk * dk..(hk + 1) * dk]);
                let v = &vs[hv * dv..(hv + 1) * dv];
                let beta = ops::sigmoid(b[t * nv + hv]);
                let g = d.a_neg[hv] * softplus(a[t * nv + hv] + d.dt_bias[hv]);
                let decay = g.exp();
                let s = &mut st.state[hv * dk * dv..(hv + 1) * dk * dv];
                s.iter_mut().for_each(|x| *x *= decay);
                // kv_mem = Sᵀk; delta = (v - kv_mem)·β; S += k ⊗ delta.
                delta.iter_mut().for_each(|d| *d = 0.0);
                for (i, row) in s.chunks_exact(dv).enumerate() {
                    for (m, &sv) in delta.iter_mut().zip(row) {
                        *m += sv * k[i];
                    }
                }
                for (m, &vv) in delta.iter_mut().zip(v) {
                    *m = (vv - *m) * beta;
                }
                let o = &mut out[t * vd + hv * dv..t * vd + (hv + 1) * dv];
                for (i, row) in s.chunks_exact_mut(dv).enumerate() {
                    for (sv, &dl) in row.iter_mut().zip(&delta) {
                        *sv += k[i] * dl;
                    }
                    for (ov, &sv) in o.iter_mut().zip(row.iter()) {
                        *ov += sv * q[i];
                    }
                }
            }
        }
        // Gated RMSNorm per value head: norm(o)·w·silu(z).
        ops::rms_norm(&mut out, &d.norm, c.rms_eps);
        for (o, zv) in out.iter_mut().zip(&z) {
            *o *= ops::silu(*zv);
        }
        let mut y = vec![0f32; n * c.hidden];
        self.backend.matmul(d.out.view(), &out, n, &mut y)?;
        Ok(y)
    }

    fn mlp(&self, m: &Mlp, x: &[f32], n: usize) -> Result<Vec<f32>> {
        mlp(
            &*self.backend,
            [m.gate.view(), m.up.view(), m.down.view()],
            x,
            n,
        )
    }

    fn moe(&mut self, li: usize, m: &Moe, x: &[f32], n: usize) -> Result<Vec<f32>> {
        let c = &self.model.config;
        let (ne, k) = (c.n_experts, c.top_k);
        let mut logits = vec![0f32; n * ne];
        self.backend.matmul(m.router.view(), x, n, &mut logits)?;
        if let Some(b) = &m.router_bias {
            add_rows(&mut logits, b);
        }
        let mut chosen_all: Vec<usize> = vec![0; n * k];
        self.choose(m, &mut logits, n, &mut chosen_all, true)?;
        let assigned = self.assign(li, &logits, &mut chosen_all, n);
        self.moe_experts(li, m, x, n, &chosen_all, &assigned)
    }

    /// The router's choices for the `n` rows of `logits` (router bias
    /// added): probabilities, or sigmoid scores, replace the logits and
    /// `chosen_all` receives each row's `top_k` experts. With
    /// `on_backend` the backend's route kernel picks softmax's choices
    /// (the per-call path), else the host does.
    fn choose(
        &self,
        m: &Moe,
        logits: &mut [f32],
        n: usize,
        chosen_all: &mut [usize],
        on_backend: bool,
    ) -> Result<()> {
        let c = &self.model.config;
        let (ne, k, routing) = (c.n_experts, c.top_k, c.routing);
        let route = |l: &mut [f32], ch: &mut [usize]| {
            if on_backend {
                self.backend.route(l, n, k, ch)
            } else {
                ops::route(l, n, k, ch);
                Ok(())
            }
        };
        if routing.sigmoid {
            // The scores replace the logits, as softmax's probabilities do.
            let mut scores = vec![0f32; ne];
            for (row, chosen) in logits
                .chunks_exact_mut(ne)
                .zip(chosen_all.chunks_exact_mut(k))
            {
                ops::route_sigmoid(
                    row,
                    m.score_bias.as_deref(),
                    (routing.n_group, routing.topk_group),
                    &mut scores,
                    chosen,
                );
                row.copy_from_slice(&scores);
            }
        } else if routing.gate_input {
            // Llama 4: the best logits, each through a sigmoid (the order
            // is softmax's).
            let raw = logits.to_vec();
            route(logits, chosen_all)?;
            for (p, r) in logits.iter_mut().zip(&raw) {
                *p = ops::sigmoid(*r);
            }
        } else {
            route(logits, chosen_all)?;
        }
        Ok(())
    }

    /// Per expert, the `(token, weight)` pairs of the batch routed by
    /// `probs` and `chosen_all` (which a routing replay rewrites); every
    /// decision goes to the observer.
    fn assign(
        &mut self,
        li: usize,
        probs: &[f32],
        chosen_all: &mut [usize],
        n: usize,
    ) -> Vec<Vec<(usize, f32)>> {
        let c = &self.model.config;
        let (ne, k, routing) = (c.n_experts, c.top_k, c.routing);
        let mut assigned: Vec<Vec<(usize, f32)>> = vec![Vec::new(); ne];
        let mut idx: Vec<usize> = Vec::with_capacity(ne);
        for t in 0..n {
            let probs = &probs[t * ne..(t + 1) * ne];
            idx.clear();
            idx.extend_from_slice(&chosen_all[t * k..(t + 1) * k]);
            if let Some(r) = &self.replay {
                // The trace's choice replaces the router's; the router's
                // probabilities still weight the chosen experts.
                idx.extend((0..ne).filter(|e| !chosen_all[t * k..(t + 1) * k].contains(e)));
                r.choose(self.pos + t, li, &mut idx, ne);
                idx.truncate(k);
                chosen_all[t * k..(t + 1) * k].copy_from_slice(&idx);
            }
            let chosen = &idx[..k];
            let mut w: Vec<f32> = chosen.iter().map(|&e| probs[e]).collect();
            if c.norm_topk_prob {
                // transformers adds 1e-20 for sigmoid scores (which may all
                // be tiny); it cannot change a sum of softmax probabilities.
                let s: f32 = w.iter().sum::<f32>() + if routing.sigmoid { 1e-20 } else { 0.0 };
                w.iter_mut().for_each(|v| *v /= s);
            }
            if routing.scale != 1.0 {
                w.iter_mut().for_each(|v| *v *= routing.scale);
            }
            if let Some(o) = &mut self.observer {
                o(&Route {
                    pos: self.pos + t,
                    layer: li,
                    experts: chosen,
                    weights: &w,
                });
            }
            for (&e, &wt) in chosen.iter().zip(&w) {
                assigned[e].push((t, wt));
            }
        }
        assigned
    }
}

impl Session {
    fn moe_experts(
        &mut self,
        li: usize,
        m: &Moe,
        x: &[f32],
        n: usize,
        chosen_all: &[usize],
        assigned: &[Vec<(usize, f32)>],
    ) -> Result<Vec<f32>> {
        let c = &self.model.config;
        let (h, k, routing) = (c.hidden, c.top_k, c.routing);
        let per_token: Vec<&[usize]> = chosen_all.chunks_exact(k).collect();
        self.experts.routed(li, &per_token, x);
        // Fetch → compute → combine, in ascending expert order whatever
        // the source, so the sums are the same floating-point operations
        // resident or streamed.
        let wanted = wanted(assigned);
        let step = (self.pos + n - 1) as u64;
        let mut out = vec![0f32; n * h];
        let mut xe = Vec::new();
        let mut wave = Vec::new();
        let mut i = 0;
        while i < wanted.len() {
            i += self.experts.fetch(li, &wanted, i, step, &mut wave)?;
            for w in 0..wave.len() {
                let (e, handle) = wave[w];
                let toks = &assigned[e];
                xe.clear();
                for &(t, wt) in toks {
                    let row = &x[t * h..(t + 1) * h];
                    if routing.gate_input {
                        xe.extend(row.iter().map(|v| v * wt));
                    } else {
                        xe.extend_from_slice(row);
                    }
                }
                let w3 = self.experts.expert(li, e, handle);
                let ran = match (&m.biases, c.swiglu) {
                    (None, None) => mlp(&*self.backend, w3, &xe, toks.len()),
                    (b, act) => biased_mlp(
                        &*self.backend,
                        w3,
                        b.as_ref().map(|b| b.of(e)),
                        act,
                        &xe,
                        toks.len(),
                    ),
                };
                let y = match ran {
                    Ok(y) => y,
                    Err(err) => return self.experts.abort(&wave[w..], err).map(|_| Vec::new()),
                };
                for (&(t, wt), yr) in toks.iter().zip(y.chunks_exact(h)) {
                    let wt = if routing.gate_input { 1.0 } else { wt };
                    for (o, v) in out[t * h..(t + 1) * h].iter_mut().zip(yr) {
                        *o += v * wt;
                    }
                }
                self.experts.done(handle, &wave[w + 1..])?;
            }
        }
        if let Some(s) = &m.shared {
            let y = self.mlp(s, x, n)?;
            self.tick()?;
            let mut gate = vec![1f32; n];
            if let Some(g) = &m.shared_gate {
                self.backend.matmul(g.view(), x, n, &mut gate)?;
                gate.iter_mut().for_each(|v| *v = ops::sigmoid(*v));
            }
            for t in 0..n {
                for (o, v) in out[t * h..(t + 1) * h]
                    .iter_mut()
                    .zip(&y[t * h..(t + 1) * h])
                {
                    *o += gate[t] * v;
                }
            }
        }
        Ok(out)
    }
}

/// The experts a batch uses, ascending, each with its largest weight
/// (the expert source's priority).
fn wanted(assigned: &[Vec<(usize, f32)>]) -> Vec<(usize, f32)> {
    assigned
        .iter()
        .enumerate()
        .filter(|(_, t)| !t.is_empty())
        .map(|(e, t)| (e, t.iter().fold(0f32, |a, &(_, w)| a.max(w))))
        .collect()
}

/// The model's rotary embedding.
fn rope_of(c: &crate::config::Config) -> Rope {
    Rope {
        theta: c.rope_theta,
        rot_dim: c.rot_dim,
        style: c.rope_style,
        yarn: c.yarn,
        factors: c.rope_factors.clone(),
    }
}

/// A session's state at one position ([`Session::snapshot`]).
#[derive(Clone, Debug)]
pub struct Snapshot {
    pos: usize,
    lin: Vec<LinState>,
    /// [`Session::park`]: the KV cache too.
    kv: Option<Vec<(Vec<f32>, Vec<f32>)>>,
}

impl Snapshot {
    /// The position it was taken at.
    pub fn pos(&self) -> usize {
        self.pos
    }

    /// Bytes it holds (the linear layers' states, and a parked state's
    /// KV cache).
    pub fn bytes(&self) -> usize {
        let lin: usize = self
            .lin
            .iter()
            .map(|s| (s.conv.len() + s.state.len()) * 4)
            .sum();
        let kv: usize = self
            .kv
            .iter()
            .flatten()
            .map(|(k, v)| (k.len() + v.len()) * 4)
            .sum();
        lin + kv
    }
}

/// A linear layer's state between tokens.
#[derive(Clone, Debug, Default)]
struct LinState {
    /// Per conv channel, the previous `kernel - 1` inputs, oldest first.
    conv: Vec<f32>,
    /// Per value head, `k_dim × v_dim`.
    state: Vec<f32>,
}

impl LinState {
    fn new(c: &crate::config::Config) -> Self {
        let l = c.linear.expect("linear layers have dimensions");
        LinState {
            conv: vec![0.0; l.conv_dim() * (l.conv_kernel - 1)],
            state: vec![0.0; l.v_heads * l.k_dim * l.v_dim],
        }
    }
}

/// `x / sqrt(Σx² + 1e-6)`, as the reference's l2norm.
fn l2norm(x: &mut [f32]) {
    let ss: f32 = x.iter().map(|v| v * v).sum();
    let r = 1.0 / (ss + 1e-6).sqrt();
    x.iter_mut().for_each(|v| *v *= r);
}

/// PyTorch's softplus (`β = 1`, linear above 20).
fn softplus(x: f32) -> f32 {
    if x > 20.0 {
        x
    } else {
        x.exp().ln_1p()
    }
}

/// A SwiGLU MLP through `backend`: `down(silu(gate x) * up x)`.
fn mlp(backend: &dyn Backend, w: [WeightView<'_>; 3], x: &[f32], n: usize) -> Result<Vec<f32>> {
    let mut y = vec![0f32; n * w[2].rows];
    backend.mlp(w, x, n, &mut y)?;
    Ok(y)
}

/// An expert with biases and/or gpt-oss's clamped SwiGLU, as three
/// products: `down(act(gate x + bg, up x + bu)) + bd`.
fn biased_mlp(
    backend: &dyn Backend,
    w: [WeightView<'_>; 3],
    bias: Option<[&[f32]; 3]>,
    act: Option<crate::config::ClampedSwiglu>,
    x: &[f32],
    n: usize,
) -> Result<Vec<f32>> {
    let inter = w[0].rows;
    let (mut g, mut u) = (vec![0f32; n * inter], vec![0f32; n * inter]);
    backend.matmul(w[0], x, n, &mut g)?;
    backend.matmul(w[1], x, n, &mut u)?;
    if let Some([bg, bu, _]) = bias {
        add_rows(&mut g, bg);
        add_rows(&mut u, bu);
    }
    for (gv, uv) in g.iter_mut().zip(&u) {
        *gv = match act {
            Some(a) => a.apply(*gv, *uv),
            None => ops::silu(*gv) * uv,
        };
    }
    let mut y = vec![0f32; n * w[2].rows];
    backend.matmul(w[2], &g, n, &mut y)?;
    if let Some([_, _, bd]) = bias {
        add_rows(&mut y, bd);
    }
    Ok(y)
}

/// Adds the bias `b` to every row of `y` (rows of `b.len()`).
pub(crate) fn add_rows(y: &mut [f32], b: &[f32]) {
    for row in y.chunks_exact_mut(b.len()) {
        row.iter_mut().zip(b).for_each(|(v, b)| *v += b);
    }
}

/// Splits the `n` rows of a grouped projection's output (per key head, the
/// segments `segs`: length, which output, where key head 0's segment
/// starts in it; head `g`'s lands `g · length` further) into two outputs of
/// `widths` per row.
fn ungroup<const S: usize>(
    y: &[f32],
    n: usize,
    groups: usize,
    segs: [(usize, usize, usize); S],
    widths: [usize; 2],
) -> (Vec<f32>, Vec<f32>) {
    let mut out = [vec![0f32; n * widths[0]], vec![0f32; n * widths[1]]];
    let per_group: usize = segs.iter().map(|s| s.0).sum();
    for t in 0..n {
        let row = &y[t * groups * per_group..(t + 1) * groups * per_group];
        for (g, src) in row.chunks_exact(per_group).enumerate() {
            let mut at = 0;
            for &(len, which, base) in &segs {
                let dst = t * widths[which] + base + g * len;
                out[which][dst..dst + len].copy_from_slice(&src[at..at + len]);
                at += len;
            }
        }
    }
    let [a, b] = out;
    (a, b)
}
