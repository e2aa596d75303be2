//! The device-resident forward pass, for backends with a
//! [`DeviceExec`] (the GPU backend).
//!
//! The residual stream, the MoE block's input and the KV cache live in
//! buffers the session allocates once; everything else a layer computes
//! lives in the batch that records it. A token's work goes to the device
//! in one submission per MoE layer: the experts of layer `l - 1`, the
//! attention of layer `l` and its router are recorded together, and the
//! host waits once, to read the router's logits and choose the experts
//! (the reads it must issue); the last submission adds the final norm and
//! the output projection and reads back the logits, and guesses the next
//! token (their arg-max), running it up to the first MoE router so that a
//! greedy next call starts from the router's choice. Dense layers add no
//! submission. Routing, replay and the observer run on the host exactly
//! as on the per-call path ([`Session::choose`], [`Session::assign`]);
//! experts come from the same [`ExpertSource`](crate::ExpertSource). A
//! streamed expert's slot is released as soon as its bytes are recorded
//! when the batch copied them, or once the batch has run when the device
//! binds the slot in place.

use super::{rope_of, Session};
use crate::config::ClampedSwiglu;
use crate::model::{
    Attention, DeltaNet, Ffn, LatentAttn, LatentKv, MixerWeights, Model, Moe, PairProj,
};
use sluice_core::{DevBuf, DevOp, DeviceBatch, DeviceExec, Error, Result, WeightView};
use std::sync::Mutex;

/// Tokens per device pass: a longer batch runs in passes of this many.
const CHUNK: usize = 64;

/// Bytes of transposed latent keys (see [`DevState::key_t`]) the device
/// path makes at most; a model that needs more keeps the per-call path.
const MAX_KEY_T: usize = 64 << 20;

/// Positions the KV cache holds at first when the session was not told
/// its context; it doubles when full.
const FIRST_CAP: usize = 256;

/// Whether every layer of `model` runs on the device path (softmax
/// attention, latent attention and Gated DeltaNet mixers).
pub(super) fn supported(model: &Model) -> bool {
    let c = &model.config;
    let attention = match c.mla {
        // A joint kv_b's transposed keys are host and device memory
        // outside the plan: only small ones (GGUF's split layout needs
        // none).
        Some(m) => {
            let joint = model
                .layers
                .iter()
                .filter(|l| matches!(&l.mixer, MixerWeights::Latent(a) if matches!(a.kv_b, LatentKv::Joint(_))))
                .count();
            c.rot_dim <= m.rope && joint * c.n_heads * m.kv_lora * m.nope * 4 <= MAX_KEY_T
        }
        None => {
            c.n_kv_heads > 0 && c.n_heads.is_multiple_of(c.n_kv_heads) && c.rot_dim <= c.head_dim
        }
    };
    attention
        && model.layers.iter().all(|l| match &l.mixer {
            MixerWeights::Attention(_) | MixerWeights::Latent(_) => true,
            MixerWeights::DeltaNet(_) => c.linear.is_some_and(|l| {
                l.conv_kernel >= 2 && l.k_heads > 0 && l.v_heads.is_multiple_of(l.k_heads)
            }),
        })
}

/// A Gated DeltaNet layer's resident vectors, on the device.
#[derive(Clone, Copy)]
struct DeltaBufs {
    conv: DevBuf,
    a_neg: DevBuf,
    dt_bias: DevBuf,
    norm: DevBuf,
}

/// One head's transposed key expansion: f32 bytes and their weight id.
type HeadKeys = (Vec<u8>, u64);

/// A latent attention layer's norms, on the device.
#[derive(Clone, Copy)]
struct LatentBufs {
    q_a_norm: Option<DevBuf>,
    kv_a_norm: DevBuf,
}

/// For a latent layer stored jointly, each head's key rows transposed
/// (see [`DevState::key_t`]); `None` for llama.cpp's split layout, whose
/// `attn_k_b` is already transposed. Every session of one loaded model
/// gives them the same weight ids (kept by the `kv_b` weight's id, which
/// is never reused), so a backend keeps one device copy, not one per
/// session.
fn transposed_keys(model: &Model, a: &LatentAttn) -> Result<Option<Vec<HeadKeys>>> {
    static IDS: Mutex<Vec<(u64, Vec<u64>)>> = Mutex::new(Vec::new());
    let LatentKv::Joint(kv_b) = &a.kv_b else {
        return Ok(None);
    };
    let ids = {
        let mut all = IDS.lock().unwrap_or_else(|p| p.into_inner());
        match all.iter().find(|(id, _)| *id == kv_b.id) {
            Some((_, ids)) => ids.clone(),
            None => {
                let ids: Vec<u64> = (0..model.config.n_heads)
                    .map(|_| sluice_core::fresh_weight_id())
                    .collect();
                all.push((kv_b.id, ids.clone()));
                ids
            }
        }
    };
    let c = &model.config;
    let m = c.mla.expect("a latent layer has its shape");
    let (l, nope, vd) = (m.kv_lora, m.nope, m.v);
    let view = kv_b.view();
    let mut row = vec![0f32; l];
    let mut heads = Vec::with_capacity(c.n_heads);
    for (h, &id) in ids.iter().enumerate() {
        let mut t = vec![0f32; l * nope];
        for i in 0..nope {
            view.row_into(h * (nope + vd) + i, &mut row);
            for (j, &v) in row.iter().enumerate() {
                t[j * nope + i] = v;
            }
        }
        let bytes: Vec<u8> = t.iter().flat_map(|v| v.to_le_bytes()).collect();
        heads.push((bytes, id));
    }
    Ok(Some(heads))
}

/// The device's guess of the next token (the arg-max of the logits it
/// returned), run through every layer up to the first MoE layer's router.
pub(super) struct Guess {
    token: u32,
    /// The first MoE layer.
    layer: usize,
    /// Its router's logits for the guessed token.
    router: Vec<f32>,
}

/// Whether guessing pays: a caller that samples greedily takes the guess
/// every time; one that samples otherwise mostly does not, and a wrong
/// guess costs its layers' compute. After two wrong guesses in a row the
/// device stops guessing, trying again every [`Tries::RETRY`] tokens.
#[derive(Default)]
struct Tries {
    wrong_in_a_row: u32,
    since: u32,
}

impl Tries {
    const RETRY: u32 = 16;

    fn want(&mut self, enabled: bool) -> bool {
        let want = enabled && (self.wrong_in_a_row < 2 || self.since >= Self::RETRY);
        if !want {
            self.since = self.since.saturating_add(1);
        }
        want
    }

    fn made(&mut self) {
        self.since = 0;
    }

    fn taken(&mut self, right: bool) {
        self.wrong_in_a_row = if right { 0 } else { self.wrong_in_a_row + 1 };
    }
}

/// A layer's small resident vectors, on the device.
#[derive(Clone, Copy)]
struct LayerBufs {
    attn_norm: DevBuf,
    ffn_norm: DevBuf,
    q_norm: Option<DevBuf>,
    k_norm: Option<DevBuf>,
    /// Biases of q, k, v and o.
    bias: [Option<DevBuf>; 4],
    sinks: Option<DevBuf>,
    router_bias: Option<DevBuf>,
    /// Every expert's biases of gate, up and down, expert-major.
    expert_bias: Option<[DevBuf; 3]>,
    delta: Option<DeltaBufs>,
}

/// What a session keeps on the device.
pub(super) struct DevState {
    /// Positions the KV cache holds.
    cap: usize,
    /// Per attention layer: key and value caches, `cap × kv_dim`.
    kv: Vec<Option<(DevBuf, DevBuf)>>,
    /// Per latent attention layer: its norms.
    latent: Vec<Option<LatentBufs>>,
    /// Per latent attention layer stored jointly (`kv_b_proj`): each
    /// head's key expansion transposed, in f32 (`kv_lora × nope`, bytes
    /// and a weight id), so that absorbing it into the query is a product.
    key_t: Vec<Option<Vec<HeadKeys>>>,
    /// Per DeltaNet layer: conv history and recurrent state.
    lin: Vec<Option<(DevBuf, DevBuf)>>,
    /// The sequence was reset: `lin` is zeroed before the next token.
    pub(super) lin_stale: bool,
    /// Per DeltaNet layer a guessed token runs through (up to the first
    /// MoE layer): its states before the guess.
    lin_kept: Vec<Option<(DevBuf, DevBuf)>>,
    /// The guess was wrong: `lin_kept` goes back into `lin` before the
    /// next token.
    pub(super) lin_rollback: bool,
    /// The device's guess of the next token, run up to its first MoE
    /// router.
    pub(super) guess: Option<Guess>,
    /// How guessing has fared.
    tries: Tries,
    /// The guessed token (u32 bits).
    tok: DevBuf,
    layers: Vec<LayerBufs>,
    norm: DevBuf,
    /// The residual stream, `CHUNK × hidden`.
    x: DevBuf,
    /// The MoE block's normalized input, `CHUNK × hidden`.
    hn: DevBuf,
    /// The routed experts' sum, `CHUNK × hidden`.
    moe_out: DevBuf,
    /// A decode token's attention scores, `heads × cap`.
    scores: DevBuf,
    /// `head_dim` ones (Llama 4's weightless q/k norm).
    ones: DevBuf,
    /// One `f32::MIN` per head: no sink takes a share.
    no_sinks: DevBuf,
}

fn put(x: &dyn DeviceExec, v: &[f32]) -> Result<DevBuf> {
    let b = x.alloc(v.len())?;
    x.write(b, 0, v)?;
    Ok(b)
}

fn put_opt(x: &dyn DeviceExec, v: Option<&Vec<f32>>) -> Result<Option<DevBuf>> {
    v.map(|v| put(x, v)).transpose()
}

impl DevState {
    fn new(x: &dyn DeviceExec, model: &Model, cap: usize) -> Result<DevState> {
        let c = &model.config;
        let (kd, vd) = c.kv_widths();
        let cap = cap.max(1);
        let mut kv = Vec::with_capacity(model.layers.len());
        let mut lin = Vec::with_capacity(model.layers.len());
        let mut layers = Vec::with_capacity(model.layers.len());
        let (mut latent, mut key_t) = (Vec::new(), Vec::new());
        for l in &model.layers {
            let (a, delta) = match &l.mixer {
                MixerWeights::Attention(a) => {
                    kv.push(Some((x.alloc(cap * kd)?, x.alloc(cap * vd)?)));
                    lin.push(None);
                    (Some(a), None)
                }
                MixerWeights::DeltaNet(d) => {
                    let la = c.linear.expect("linear layers have dimensions");
                    kv.push(None);
                    lin.push(Some((
                        x.alloc(la.conv_dim() * (la.conv_kernel - 1))?,
                        x.alloc(la.v_heads * la.k_dim * la.v_dim)?,
                    )));
                    let bufs = DeltaBufs {
                        conv: put(x, &d.conv)?,
                        a_neg: put(x, &d.a_neg)?,
                        dt_bias: put(x, &d.dt_bias)?,
                        norm: put(x, &d.norm)?,
                    };
                    (None, Some(bufs))
                }
                MixerWeights::Latent(a) => {
                    kv.push(Some((x.alloc(cap * kd)?, x.alloc(cap * vd)?)));
                    lin.push(None);
                    latent.push(Some(LatentBufs {
                        q_a_norm: put_opt(x, a.q_a.as_ref().map(|q| &q.1))?,
                        kv_a_norm: put(x, &a.kv_a_norm)?,
                    }));
                    key_t.push(transposed_keys(model, a)?);
                    (None, None)
                }
            };
            if !matches!(l.mixer, MixerWeights::Latent(_)) {
                latent.push(None);
                key_t.push(None);
            }
            let (router_bias, expert_bias) = match &l.ffn {
                Ffn::Moe(m) => (
                    put_opt(x, m.router_bias.as_ref())?,
                    match &m.biases {
                        Some(b) => Some([put(x, &b.gate)?, put(x, &b.up)?, put(x, &b.down)?]),
                        None => None,
                    },
                ),
                Ffn::Dense(_) => (None, None),
            };
            layers.push(LayerBufs {
                attn_norm: put(x, &l.attn_norm)?,
                ffn_norm: put(x, &l.ffn_norm)?,
                q_norm: put_opt(x, a.and_then(|a| a.q_norm.as_ref()))?,
                k_norm: put_opt(x, a.and_then(|a| a.k_norm.as_ref()))?,
                bias: [
                    put_opt(x, a.and_then(|a| a.q.bias.as_ref()))?,
                    put_opt(x, a.and_then(|a| a.k.bias.as_ref()))?,
                    put_opt(x, a.and_then(|a| a.v.bias.as_ref()))?,
                    put_opt(x, a.and_then(|a| a.o.bias.as_ref()))?,
                ],
                sinks: put_opt(x, a.and_then(|a| a.sinks.as_ref()))?,
                router_bias,
                expert_bias,
                delta,
            });
        }
        // A guessed token runs the layers up to the first MoE layer.
        let first_moe = model
            .layers
            .iter()
            .position(|l| matches!(l.ffn, Ffn::Moe(_)))
            .unwrap_or(0);
        let mut lin_kept = Vec::with_capacity(lin.len());
        for (li, l) in lin.iter().enumerate() {
            lin_kept.push(match l {
                Some((conv, state)) if li <= first_moe => {
                    Some((x.alloc(conv.len)?, x.alloc(state.len)?))
                }
                _ => None,
            });
        }
        Ok(DevState {
            cap,
            kv,
            latent,
            key_t,
            lin,
            lin_stale: false,
            lin_kept,
            lin_rollback: false,
            guess: None,
            tries: Tries::default(),
            tok: x.alloc(1)?,
            layers,
            norm: put(x, &model.norm)?,
            x: x.alloc(CHUNK * c.hidden)?,
            hn: x.alloc(CHUNK * c.hidden)?,
            moe_out: x.alloc(CHUNK * c.hidden)?,
            scores: x.alloc(c.n_heads * cap)?,
            ones: put(x, &vec![1f32; c.head_dim])?,
            no_sinks: put(x, &vec![f32::MIN; c.n_heads])?,
        })
    }

    /// Every buffer, for release.
    fn buffers(&self) -> Vec<DevBuf> {
        let mut v = vec![
            self.norm,
            self.x,
            self.hn,
            self.moe_out,
            self.scores,
            self.ones,
            self.no_sinks,
        ];
        for (k, vv) in self
            .kv
            .iter()
            .chain(&self.lin)
            .chain(&self.lin_kept)
            .flatten()
        {
            v.extend([*k, *vv]);
        }
        v.push(self.tok);
        for l in &self.layers {
            v.extend([l.attn_norm, l.ffn_norm]);
            v.extend(
                l.q_norm
                    .iter()
                    .chain(&l.k_norm)
                    .chain(l.bias.iter().flatten()),
            );
            v.extend(l.sinks.iter().chain(&l.router_bias));
            v.extend(l.expert_bias.iter().flatten());
            if let Some(d) = l.delta {
                v.extend([d.conv, d.a_neg, d.dt_bias, d.norm]);
            }
        }
        for l in self.latent.iter().flatten() {
            v.extend(l.q_a_norm.iter().chain([&l.kv_a_norm]));
        }
        v
    }

    pub(super) fn release(&self, x: &dyn DeviceExec) {
        for b in self.buffers() {
            x.release(b);
        }
    }

    /// The first `pos` positions of every layer's cache, read back (a
    /// conversation being parked).
    pub(super) fn read_kv(
        &self,
        x: &dyn DeviceExec,
        model: &Model,
        pos: usize,
    ) -> Result<Vec<(Vec<f32>, Vec<f32>)>> {
        let (kd, vd) = model.config.kv_widths();
        let mut out = Vec::with_capacity(self.kv.len());
        for kv in &self.kv {
            let Some((k, v)) = kv else {
                out.push((Vec::new(), Vec::new()));
                continue;
            };
            let (mut hk, mut hv) = (vec![0f32; pos * kd], vec![0f32; pos * vd]);
            x.read(*k, 0, &mut hk)?;
            x.read(*v, 0, &mut hv)?;
            out.push((hk, hv));
        }
        Ok(out)
    }

    /// Writes a parked cache of `pos` positions back.
    pub(super) fn write_kv(
        &mut self,
        x: &dyn DeviceExec,
        model: &Model,
        kv: &[(Vec<f32>, Vec<f32>)],
        pos: usize,
    ) -> Result<()> {
        let (kd, vd) = model.config.kv_widths();
        self.reserve(x, model, pos, 0, 0)?;
        if kv.len() != self.kv.len() {
            return Err(Error::Invalid("a parked state of another model".into()));
        }
        for (dkv, (hk, hv)) in self.kv.iter().zip(kv) {
            let Some((k, v)) = dkv else {
                continue;
            };
            if hk.len() != pos * kd || hv.len() != pos * vd {
                return Err(Error::Invalid("a parked state of another model".into()));
            }
            x.write(*k, 0, hk)?;
            x.write(*v, 0, hv)?;
        }
        Ok(())
    }

    /// The linear layers' states, read back into `lin` (a snapshot): as
    /// of the last token the session was given, not of a guess made past
    /// it.
    pub(super) fn read_lin(&self, x: &dyn DeviceExec, lin: &mut [super::LinState]) -> Result<()> {
        let ahead = self.guess.is_some() || self.lin_rollback;
        for ((live, kept), h) in self.lin.iter().zip(&self.lin_kept).zip(lin) {
            let d = match (ahead, kept) {
                (true, Some(_)) => kept,
                _ => live,
            };
            if let Some((conv, state)) = d {
                x.read(*conv, 0, &mut h.conv)?;
                x.read(*state, 0, &mut h.state)?;
            }
        }
        Ok(())
    }

    /// Writes the linear layers' states (a restored snapshot).
    pub(super) fn write_lin(&self, x: &dyn DeviceExec, lin: &[super::LinState]) -> Result<()> {
        for (d, h) in self.lin.iter().zip(lin) {
            if let Some((conv, state)) = d {
                if h.conv.len() != conv.len || h.state.len() != state.len {
                    return Err(Error::Invalid("a snapshot of another model".into()));
                }
                x.write(*conv, 0, &h.conv)?;
                x.write(*state, 0, &h.state)?;
            }
        }
        Ok(())
    }

    /// Scratch for the attention scores of `n` queries from `pos`: the
    /// session's for a decode token, else the batch's.
    fn scores_for(
        &self,
        b: &mut dyn DeviceBatch,
        heads: usize,
        pos: usize,
        n: usize,
    ) -> Result<DevBuf> {
        let need = n * heads * (pos + n);
        if n == 1 && self.scores.len >= need {
            Ok(self.scores)
        } else {
            b.scratch(need)
        }
    }

    /// Records the return of the linear layers' states from before a
    /// wrong guess, and their zeroing if the sequence was reset.
    fn clear_lin(&mut self, b: &mut dyn DeviceBatch) -> Result<()> {
        if std::mem::take(&mut self.lin_rollback) {
            for (live, kept) in self.lin.iter().zip(&self.lin_kept) {
                if let (Some((lc, ls)), Some((kc, ks))) = (live, kept) {
                    b.copy(*kc, 0, *lc, 0, lc.len)?;
                    b.copy(*ks, 0, *ls, 0, ls.len)?;
                }
            }
        }
        if std::mem::take(&mut self.lin_stale) {
            for (conv, state) in self.lin.iter().flatten() {
                b.zero(*conv, conv.len)?;
                b.zero(*state, state.len)?;
            }
        }
        Ok(())
    }

    /// Grows the KV cache to hold `need` positions, keeping the first
    /// `keep` (one submission, when a sequence outgrows it): doubling, up
    /// to the session's context `ctx` where it is known.
    fn reserve(
        &mut self,
        x: &dyn DeviceExec,
        model: &Model,
        need: usize,
        keep: usize,
        ctx: usize,
    ) -> Result<()> {
        if need <= self.cap {
            return Ok(());
        }
        let c = &model.config;
        let (kd, vd) = c.kv_widths();
        let mut cap = need.max(2 * self.cap).next_power_of_two();
        if ctx >= need {
            cap = cap.min(ctx);
        }
        let mut kv = Vec::with_capacity(self.kv.len());
        for old in &self.kv {
            kv.push(match old {
                Some(_) => Some((x.alloc(cap * kd)?, x.alloc(cap * vd)?)),
                None => None,
            });
        }
        let scores = x.alloc(c.n_heads * cap)?;
        let mut b = x.batch();
        for (old, new) in self.kv.iter().zip(&kv) {
            if let (Some((ok, ov)), Some((nk, nv))) = (old, new) {
                b.copy(*ok, 0, *nk, 0, keep * kd)?;
                b.copy(*ov, 0, *nv, 0, keep * vd)?;
            }
        }
        b.submit(&mut [])?;
        for (k, v) in std::mem::replace(&mut self.kv, kv).into_iter().flatten() {
            x.release(k);
            x.release(v);
        }
        x.release(std::mem::replace(&mut self.scores, scores));
        self.cap = cap;
        Ok(())
    }
}

impl Session {
    /// Whether this call runs on the device path: a backend that offers
    /// it, a model whose layers it covers, and a session that started on
    /// it (a session is on one path for its whole life).
    pub(super) fn on_device(&self) -> bool {
        self.dev.is_some()
            || (self.device_forward
                && self.pos == 0
                && self.backend.device_exec().is_some()
                && supported(&self.model))
    }

    /// Allocates the session's device state, once.
    pub(super) fn start_device(&mut self, exec: &dyn DeviceExec) -> Result<()> {
        if self.dev.is_none() {
            let cap = match self.ctx_hint {
                0 => FIRST_CAP,
                ctx => ctx.min(FIRST_CAP),
            };
            self.dev = Some(DevState::new(exec, &self.model, cap)?);
            // The cache lives on the device; give back the host's.
            for (k, v) in &mut self.kv {
                *k = Vec::new();
                *v = Vec::new();
            }
        }
        Ok(())
    }

    /// [`Session::forward`] on the device path.
    pub(super) fn forward_device(&mut self, tokens: &[u32], all_logits: bool) -> Result<Vec<f32>> {
        let be = self.backend.clone();
        let exec = be
            .device_exec()
            .ok_or_else(|| Error::Unsupported("the backend has no device executor".into()))?;
        let model = self.model.clone();
        self.start_device(exec)?;
        let (pos, n) = (self.pos, tokens.len());
        let ctx = self.ctx_hint;
        let d = self.dev.as_mut().expect("made above");
        // A guess made after the last call: taken when this is its token,
        // else undone (the positions it wrote are written again).
        let guess = d.guess.take();
        let right = guess.as_ref().map(|g| tokens == [g.token]);
        if let Some(r) = right {
            d.tries.taken(r);
            d.lin_rollback |= !r;
        }
        let mut resume = guess.filter(|_| right == Some(true));
        // Room for this call's tokens and a guess past them; a cache that
        // grows keeps the right guess's entries (written at `pos`).
        let room = if ctx == 0 || pos + n < ctx { 1 } else { 0 };
        let keep = pos + usize::from(resume.is_some());
        d.reserve(exec, &model, pos + n + room, keep, ctx)?;
        let mut out = Vec::new();
        let passes = n.div_ceil(CHUNK);
        for (i, chunk) in tokens.chunks(CHUNK).enumerate() {
            let last = i + 1 == passes;
            let logits_of = (all_logits || last).then_some(all_logits);
            match self.pass(exec, chunk, logits_of, resume.take()) {
                Ok(l) => out.extend(l),
                Err(e) => return Err(self.drop_held(e)),
            }
        }
        Ok(out)
    }

    /// One pass of at most [`CHUNK`] tokens; returns the logits of every
    /// row (`Some(true)`), of the last (`Some(false)`) or none. `resume`:
    /// the device's guess of this (single) token was right, and its first
    /// MoE layer's router has run.
    fn pass(
        &mut self,
        exec: &dyn DeviceExec,
        tokens: &[u32],
        logits_of: Option<bool>,
        resume: Option<Guess>,
    ) -> Result<Vec<f32>> {
        let model = self.model.clone();
        let c = &model.config;
        let (n, h) = (tokens.len(), c.hidden);
        self.experts.begin(tokens);
        let x = self.dev.as_ref().expect("device state").x;
        let (start, mut router) = match resume {
            Some(g) => (g.layer, Some(g.router)),
            None => {
                let mut emb = vec![0f32; n * h];
                for (t, row) in tokens.iter().zip(emb.chunks_exact_mut(h)) {
                    model.embed.row_f32(*t as usize, row)?;
                }
                exec.write(x, 0, &emb)?;
                (0, None)
            }
        };
        let mut b = exec.batch();
        self.dev
            .as_mut()
            .expect("device state")
            .clear_lin(&mut *b)?;
        if router.is_some() {
            self.tick()?;
        }
        for (li, layer) in model.layers.iter().enumerate().skip(start) {
            // A resumed token's first layer ran up to its router.
            if router.is_none() || li != start {
                self.record_mixer(&mut *b, li, n)?;
            }
            match &layer.ffn {
                Ffn::Dense(_) => self.record_dense(&mut *b, li, n)?,
                Ffn::Moe(m) => {
                    let mut logits = match router.take() {
                        Some(l) => l,
                        None => {
                            let lg = self.record_router(&mut *b, li, m, n)?;
                            let mut logits = vec![0f32; n * c.n_experts];
                            b.submit(&mut [(lg, 0, &mut logits)])?;
                            self.release_held()?;
                            self.tick()?;
                            b = exec.batch();
                            logits
                        }
                    };
                    let mut chosen = vec![0usize; n * c.top_k];
                    self.choose(m, &mut logits, n, &mut chosen, false)?;
                    let assigned = self.assign(li, &logits, &mut chosen, n);
                    let (lb, hn) = {
                        let d = self.dev.as_ref().expect("device state");
                        (d.layers[li], d.hn)
                    };
                    self.dev_experts(exec, &mut b, li, m, &lb, x, hn, n, &chosen, &assigned)?;
                }
            }
        }
        self.pos += n;
        let Some(all) = logits_of else {
            b.submit(&mut [])?;
            self.release_held()?;
            return Ok(Vec::new());
        };
        let m = if all { n } else { 1 };
        let d = self.dev.as_ref().expect("device state");
        let xn = b.scratch(m * h)?;
        normed(&mut *b, x, n - m, xn, d.norm, m, h, c.rms_eps)?;
        let lg = b.scratch(m * c.vocab)?;
        b.matmul(&model.lm_head.view(), xn, m, lg)?;
        let mut logits = vec![0f32; m * c.vocab];
        match self.record_guess(&mut *b, lg, m)? {
            Some((layer, tok, rg)) => {
                let mut t = [0f32];
                let mut router = vec![0f32; c.n_experts];
                b.submit(&mut [(lg, 0, &mut logits), (tok, 0, &mut t), (rg, 0, &mut router)])?;
                self.dev.as_mut().expect("device state").guess = Some(Guess {
                    token: t[0].to_bits(),
                    layer,
                    router,
                });
            }
            None => b.submit(&mut [(lg, 0, &mut logits)])?,
        }
        self.release_held()?;
        Ok(logits)
    }

    /// Records layer `li` up to its feed-forward block: norm, mixer,
    /// residual, and the block's normalized input in `hn`.
    fn record_mixer(&mut self, b: &mut dyn DeviceBatch, li: usize, n: usize) -> Result<()> {
        let model = self.model.clone();
        let c = &model.config;
        let h = c.hidden;
        let (lb, x, hn) = {
            let d = self.dev.as_ref().expect("device state");
            (d.layers[li], d.x, d.hn)
        };
        let hs = b.scratch(n * h)?;
        normed(b, x, 0, hs, lb.attn_norm, n, h, c.rms_eps)?;
        let o = match &model.layers[li].mixer {
            MixerWeights::Attention(a) => self.dev_attention(b, li, a, &lb, hs, n)?,
            MixerWeights::DeltaNet(d) => self.dev_delta_net(b, li, d, &lb, hs, n)?,
            MixerWeights::Latent(a) => self.dev_latent(b, li, a, hs, n)?,
        };
        add(b, x, o, n, h)?;
        normed(b, x, 0, hn, lb.ffn_norm, n, h, c.rms_eps)
    }

    /// Records dense layer `li`'s MLP on `hn` into the residual stream.
    fn record_dense(&mut self, b: &mut dyn DeviceBatch, li: usize, n: usize) -> Result<()> {
        let Ffn::Dense(m) = &self.model.layers[li].ffn else {
            return Ok(());
        };
        let d = self.dev.as_ref().expect("device state");
        let w = [m.gate.view(), m.up.view(), m.down.view()];
        let y = dev_mlp(b, w, None, None, d.hn, n)?;
        add(b, d.x, y, n, self.model.config.hidden)
    }

    /// Records MoE layer `li`'s router on `hn`; returns its logits.
    fn record_router(
        &self,
        b: &mut dyn DeviceBatch,
        li: usize,
        m: &Moe,
        n: usize,
    ) -> Result<DevBuf> {
        let d = self.dev.as_ref().expect("device state");
        let lg = b.scratch(n * self.model.config.n_experts)?;
        b.matmul(&m.router.view(), d.hn, n, lg)?;
        if let Some(rb) = d.layers[li].router_bias {
            b.op(DevOp::AddRows {
                x: lg,
                b: rb,
                rows: n,
            })?;
        }
        Ok(lg)
    }

    /// After a single row of logits `lg`: when guessing pays, records the
    /// device's guess of the next token (their arg-max, the token a greedy
    /// sampler takes), its embedding, and every layer up to the first MoE
    /// layer's router at the next position, so that a next call with that
    /// token starts from the router's choice instead of submitting once
    /// more. Returns that layer, the token's buffer and the router's
    /// logits; `None` when nothing was guessed. The DeltaNet states it
    /// advances are kept to be put back if the guess is wrong.
    fn record_guess(
        &mut self,
        b: &mut dyn DeviceBatch,
        lg: DevBuf,
        m: usize,
    ) -> Result<Option<(usize, DevBuf, DevBuf)>> {
        let model = self.model.clone();
        let c = &model.config;
        let Some(layer) = model
            .layers
            .iter()
            .position(|l| matches!(l.ffn, Ffn::Moe(_)))
        else {
            return Ok(None);
        };
        let d = self.dev.as_mut().expect("device state");
        let room = self.pos < d.cap;
        if m != 1 || !room || !d.tries.want(self.guess_next) {
            return Ok(None);
        }
        let (tok, x) = (d.tok, d.x);
        b.op(DevOp::Argmax {
            x: lg,
            len: c.vocab,
            out: tok,
        })?;
        if !b.gather_rows(&model.embed.view(), tok, 1, x)? {
            // The embedding is not on the device (beyond its budget).
            return Ok(None);
        }
        d.tries.made();
        for (live, kept) in d.lin.iter().zip(&d.lin_kept) {
            if let (Some((lc, ls)), Some((kc, ks))) = (live, kept) {
                b.copy(*lc, 0, *kc, 0, lc.len)?;
                b.copy(*ls, 0, *ks, 0, ls.len)?;
            }
        }
        for li in 0..=layer {
            self.record_mixer(b, li, 1)?;
            self.record_dense(b, li, 1)?;
        }
        let Ffn::Moe(moe) = &model.layers[layer].ffn else {
            unreachable!("found above")
        };
        let rg = self.record_router(b, layer, moe, 1)?;
        Ok(Some((layer, tok, rg)))
    }

    /// Lets go of the slots of experts bound in place, which stay pinned
    /// until the batch that reads them has been submitted and waited for
    /// (the drive may then overwrite them).
    fn release_held(&mut self) -> Result<()> {
        let held = std::mem::take(&mut self.held);
        for (i, &(_, h)) in held.iter().enumerate() {
            self.experts.done(h, &held[i + 1..])?;
        }
        Ok(())
    }

    /// After a failed pass: lets go of the slots still held; returns
    /// `err`.
    pub(super) fn drop_held(&mut self, err: Error) -> Error {
        let held = std::mem::take(&mut self.held);
        match held.is_empty() {
            true => err,
            false => self.experts.abort(&held, err).err().unwrap_or_else(|| {
                Error::Invalid("a device pass failed and its experts were let go".into())
            }),
        }
    }

    /// Records softmax attention of the normalized rows `hn`; returns the
    /// layer's contribution to the residual stream.
    fn dev_attention(
        &mut self,
        b: &mut dyn DeviceBatch,
        li: usize,
        a: &Attention,
        lb: &LayerBufs,
        hn: DevBuf,
        n: usize,
    ) -> Result<DevBuf> {
        let c = &self.model.config;
        let d = self.dev.as_ref().expect("device state");
        let (heads, kvh, hd) = (c.n_heads, c.n_kv_heads, c.head_dim);
        let qd = heads * hd;
        let (kd, vd) = c.kv_widths();
        let pos = self.pos;
        let linear = |b: &mut dyn DeviceBatch, l: &crate::model::Linear, bias, y| {
            b.matmul(&l.w.view(), hn, n, y)?;
            match bias {
                Some(bb) => b.op(DevOp::AddRows {
                    x: y,
                    b: bb,
                    rows: n,
                }),
                None => Ok(()),
            }
        };
        // The queries, then one sink logit per head.
        let q = b.scratch(n * qd + heads)?;
        let gate = if c.attn_gate {
            // Qwen3.5: each head's rows are `[q | gate]`; split them.
            let raw = b.scratch(n * 2 * qd)?;
            linear(b, &a.q, lb.bias[0], raw)?;
            let g = b.scratch(n * qd)?;
            for t in 0..n {
                for hh in 0..heads {
                    let src = t * 2 * qd + hh * 2 * hd;
                    b.copy(raw, src, q, t * qd + hh * hd, hd)?;
                    b.copy(raw, src + hd, g, t * qd + hh * hd, hd)?;
                }
            }
            Some(g)
        } else {
            linear(b, &a.q, lb.bias[0], q)?;
            None
        };
        let k = b.scratch(n * kd)?;
        let v = b.scratch(n * vd)?;
        linear(b, &a.k, lb.bias[1], k)?;
        linear(b, &a.v, lb.bias[2], v)?;
        for (x, w, width) in [(q, lb.q_norm, qd), (k, lb.k_norm, kd)] {
            if let Some(w) = w {
                b.op(DevOp::RmsNorm {
                    x,
                    w,
                    rows: n * width / w.len.max(1),
                    eps: c.rms_eps,
                })?;
            }
        }
        if let Some(clip) = c.clip_qkv {
            for (x, len) in [(q, n * qd), (k, n * kd), (v, n * vd)] {
                b.op(DevOp::Clamp {
                    x,
                    len,
                    limit: clip,
                })?;
            }
        }
        // Llama 4: no-rope layers, q/k norm and chunks on the rope layers,
        // temperature-tuned queries on the others.
        let l4 = c.llama4.as_ref();
        let roped = l4.is_none_or(|l| l.rope_layers[li]);
        if roped {
            rope_rows(b, c, pos, n, [(q, heads), (k, kvh)], hd)?;
        }
        let mut chunk = None;
        if let Some(l) = l4 {
            if roped {
                chunk = l.chunk;
                if l.qk_norm {
                    for (x, rows) in [(q, n * heads), (k, n * kvh)] {
                        b.op(DevOp::RmsNorm {
                            x,
                            w: d.ones,
                            rows,
                            eps: c.rms_eps,
                        })?;
                    }
                }
            } else if let Some((floor, scale)) = l.temperature {
                let s: Vec<f32> = (0..n)
                    .map(|t| {
                        let p = (pos + t) as f32;
                        ((p + 1.0) / floor).floor().ln_1p() * scale + 1.0
                    })
                    .collect();
                let s = b.upload(&s)?;
                b.op(DevOp::ScaleRows {
                    x: q,
                    s,
                    rows: n,
                    d: qd,
                })?;
            }
        }
        b.copy(lb.sinks.unwrap_or(d.no_sinks), 0, q, n * qd, heads)?;
        let (kc, vc) = d.kv[li].expect("an attention layer's cache");
        b.copy(k, 0, kc, pos * kd, n * kd)?;
        b.copy(v, 0, vc, pos * vd, n * vd)?;
        let att = b.scratch(n * qd)?;
        let scores = d.scores_for(b, heads, pos, n)?;
        b.op(DevOp::Attention {
            q,
            k: kc,
            v: vc,
            out: att,
            scores,
            n,
            pos0: pos,
            heads,
            kv_heads: kvh,
            head_dim: hd,
            scale: c.attn_scale.unwrap_or_else(|| 1.0 / (hd as f32).sqrt()),
            window: c.windows[li].unwrap_or(0),
            chunk: chunk.unwrap_or(0),
        })?;
        if let Some(g) = gate {
            b.op(DevOp::SigmoidMul {
                x: att,
                g,
                len: n * qd,
            })?;
        }
        let o = b.scratch(n * c.hidden)?;
        b.matmul(&a.o.w.view(), att, n, o)?;
        if let Some(bb) = lb.bias[3] {
            b.op(DevOp::AddRows {
                x: o,
                b: bb,
                rows: n,
            })?;
        }
        Ok(o)
    }

    /// Records multi-head latent attention of the normalized rows `hn` in
    /// the absorbed form, as the per-call path computes it: the cache
    /// keeps per position the normalized latent and the rotary key; each
    /// head's key expansion is folded into its query and its value
    /// expansion applied to its output. Returns the layer's contribution.
    fn dev_latent(
        &self,
        b: &mut dyn DeviceBatch,
        li: usize,
        a: &LatentAttn,
        hn: DevBuf,
        n: usize,
    ) -> Result<DevBuf> {
        let c = &self.model.config;
        let d = self.dev.as_ref().expect("device state");
        let lb = d.latent[li].expect("a latent layer's norms");
        let m = c.mla.expect("a latent layer has its shape");
        let (heads, l, r, nope, vd) = (c.n_heads, m.kv_lora, m.rope, m.nope, m.v);
        let (qk, w, pos) = (nope + r, l + r, self.pos);
        let q = b.scratch(n * a.q.rows)?;
        match &a.q_a {
            Some((wa, _)) => {
                let qa = b.scratch(n * wa.rows)?;
                b.matmul(&wa.view(), hn, n, qa)?;
                if let Some(norm) = lb.q_a_norm {
                    b.op(DevOp::RmsNorm {
                        x: qa,
                        w: norm,
                        rows: n,
                        eps: c.rms_eps,
                    })?;
                }
                b.matmul(&a.q.view(), qa, n, q)?;
            }
            None => b.matmul(&a.q.view(), hn, n, q)?,
        }
        let kv = b.scratch(n * w)?;
        b.matmul(&a.kv_a.view(), hn, n, kv)?;
        let (lat, kpe) = (b.scratch(n * l)?, b.scratch(n * r)?);
        let qpe = b.scratch(n * heads * r)?;
        for t in 0..n {
            b.copy(kv, t * w, lat, t * l, l)?;
            b.copy(kv, t * w + l, kpe, t * r, r)?;
            for h in 0..heads {
                b.copy(q, (t * heads + h) * qk + nope, qpe, (t * heads + h) * r, r)?;
            }
        }
        b.op(DevOp::RmsNorm {
            x: lat,
            w: lb.kv_a_norm,
            rows: n,
            eps: c.rms_eps,
        })?;
        rope_rows(b, c, pos, n, [(qpe, heads), (kpe, 1)], r)?;
        // Per token and head: [absorbed query | rotary query]; then one
        // sink slot per head (none).
        let qf = b.scratch(n * heads * w + heads)?;
        let xh = b.scratch(n * nope.max(l))?;
        let yh = b.scratch(n * l.max(vd))?;
        for h in 0..heads {
            for t in 0..n {
                b.copy(q, (t * heads + h) * qk, xh, t * nope, nope)?;
                b.copy(qpe, (t * heads + h) * r, qf, (t * heads + h) * w + l, r)?;
            }
            let kt = match (&a.kv_b, &d.key_t[li]) {
                (LatentKv::Split { k_t, .. }, _) => k_t.view().rows(h * l, l),
                (LatentKv::Joint(_), Some(t)) => {
                    let (bytes, id) = &t[h];
                    WeightView::new(sluice_core::DType::F32, l, nope, bytes)?.with_id(*id)
                }
                (LatentKv::Joint(_), None) => {
                    return Err(Error::Model("a joint latent layer without its keys".into()))
                }
            };
            b.matmul(&kt, xh, n, yh)?;
            for t in 0..n {
                b.copy(yh, t * l, qf, (t * heads + h) * w, l)?;
            }
        }
        b.copy(d.no_sinks, 0, qf, n * heads * w, heads)?;
        let (kc, _) = d.kv[li].expect("a latent layer's cache");
        for t in 0..n {
            b.copy(lat, t * l, kc, (pos + t) * w, l)?;
            b.copy(kpe, t * r, kc, (pos + t) * w + l, r)?;
        }
        let att = b.scratch(n * heads * w)?;
        let scores = d.scores_for(b, heads, pos, n)?;
        b.op(DevOp::Attention {
            q: qf,
            k: kc,
            v: kc,
            out: att,
            scores,
            n,
            pos0: pos,
            heads,
            kv_heads: 1,
            head_dim: w,
            scale: c.attn_scale.unwrap_or_else(|| 1.0 / (qk as f32).sqrt()),
            window: c.windows[li].unwrap_or(0),
            chunk: 0,
        })?;
        let (vw, v0, stride) = match &a.kv_b {
            LatentKv::Joint(w) => (w.view(), nope, nope + vd),
            LatentKv::Split { v, .. } => (v.view(), 0, vd),
        };
        let o = b.scratch(n * heads * vd)?;
        for h in 0..heads {
            for t in 0..n {
                b.copy(att, (t * heads + h) * w, xh, t * l, l)?;
            }
            b.matmul(&vw.rows(h * stride + v0, vd), xh, n, yh)?;
            for t in 0..n {
                b.copy(yh, t * vd, o, (t * heads + h) * vd, vd)?;
            }
        }
        let y = b.scratch(n * c.hidden)?;
        b.matmul(&a.o.view(), o, n, y)?;
        Ok(y)
    }

    /// Records a Gated DeltaNet step over the normalized rows `hn`;
    /// returns the layer's contribution to the residual stream.
    fn dev_delta_net(
        &mut self,
        b: &mut dyn DeviceBatch,
        li: usize,
        d: &DeltaNet,
        lb: &LayerBufs,
        hn: DevBuf,
        n: usize,
    ) -> Result<DevBuf> {
        let c = &self.model.config;
        let l = c.linear.expect("linear layers have dimensions");
        let (nk, nv, dk, dv, kw) = (l.k_heads, l.v_heads, l.k_dim, l.v_dim, l.conv_kernel);
        let (cd, vd) = (l.conv_dim(), nv * dv);
        let db = lb.delta.expect("a DeltaNet layer's vectors");
        let (conv, state) =
            self.dev.as_ref().expect("device state").lin[li].expect("a DeltaNet layer's state");
        let mm = |b: &mut dyn DeviceBatch, w: &crate::model::Weight, rows: usize| {
            let y = b.scratch(n * rows)?;
            b.matmul(&w.view(), hn, n, y)?;
            Ok::<_, Error>(y)
        };
        // Per key head, a grouped matrix's rows are `segs` (as on the
        // per-call path's `ungroup`).
        let r = nv / nk;
        let (qkv, z) = match &d.qkvz {
            PairProj::Split(qkv, z) => (mm(b, qkv, cd)?, mm(b, z, vd)?),
            PairProj::Grouped(w) => {
                let y = mm(b, w, cd + vd)?;
                let segs = [
                    (dk, 0, 0),
                    (dk, 0, nk * dk),
                    (r * dv, 0, 2 * nk * dk),
                    (r * dv, 1, 0),
                ];
                ungroup(b, y, n, nk, &segs, [cd, vd])?
            }
        };
        // β and decay inputs, then a_neg and dt_bias: the recurrence's
        // parameters in one buffer.
        let p = b.scratch(2 * n * nv + 2 * nv)?;
        match &d.ba {
            PairProj::Split(bw, aw) => {
                let (bb, aa) = (mm(b, bw, nv)?, mm(b, aw, nv)?);
                b.copy(bb, 0, p, 0, n * nv)?;
                b.copy(aa, 0, p, n * nv, n * nv)?;
            }
            PairProj::Grouped(w) => {
                let y = mm(b, w, 2 * nv)?;
                let [bb, aa] = ungroup(b, y, n, nk, &[(r, 0, 0), (r, 1, 0)], [nv, nv])?.into();
                b.copy(bb, 0, p, 0, n * nv)?;
                b.copy(aa, 0, p, n * nv, n * nv)?;
            }
        }
        b.copy(db.a_neg, 0, p, 2 * n * nv, nv)?;
        b.copy(db.dt_bias, 0, p, 2 * n * nv + nv, nv)?;
        let mixed = b.scratch(n * cd)?;
        b.op(DevOp::ConvStep {
            hist: conv,
            x: qkv,
            w: db.conv,
            out: mixed,
            n,
            channels: cd,
            kernel: kw,
        })?;
        let out = b.scratch(n * vd)?;
        b.op(DevOp::DeltaRule {
            state,
            qkv: mixed,
            params: p,
            out,
            n,
            k_heads: nk,
            v_heads: nv,
            k_dim: dk,
            v_dim: dv,
            tiled: l.tiled,
            scale: 1.0 / (dk as f32).sqrt(),
        })?;
        // Gated RMSNorm per value head: norm(o)·w·silu(z), into z.
        b.op(DevOp::RmsNorm {
            x: out,
            w: db.norm,
            rows: n * nv,
            eps: c.rms_eps,
        })?;
        b.op(DevOp::Swiglu {
            g: z,
            u: out,
            len: n * vd,
        })?;
        let y = b.scratch(n * c.hidden)?;
        b.matmul(&d.out.view(), z, n, y)?;
        Ok(y)
    }

    /// Records the routed experts (fetched from the expert source in
    /// ascending order, as on the per-call path) and the shared expert,
    /// and adds their sum to the residual stream `x`.
    #[allow(clippy::too_many_arguments)]
    fn dev_experts<'e>(
        &mut self,
        exec: &'e dyn DeviceExec,
        bx: &mut Box<dyn DeviceBatch + 'e>,
        li: usize,
        m: &Moe,
        lb: &LayerBufs,
        x: DevBuf,
        hn: DevBuf,
        n: usize,
        chosen_all: &[usize],
        assigned: &[Vec<(usize, f32)>],
    ) -> Result<()> {
        let c = &self.model.config;
        let (h, k, routing, act) = (c.hidden, c.top_k, c.routing, c.swiglu);
        let per_token: Vec<&[usize]> = chosen_all.chunks_exact(k).collect();
        // The block's input stays on the device: predictors that read it
        // get none.
        self.experts.routed(li, &per_token, &[]);
        let wanted = super::wanted(assigned);
        let step = (self.pos + n - 1) as u64;
        // A session buffer, so that the sum survives a batch submitted
        // midway (below).
        let out = self.dev.as_ref().expect("device state").moe_out;
        bx.zero(out, n * h)?;
        let in_place = self.experts.bound_in_place();
        let mut wave = Vec::new();
        let mut i = 0;
        while i < wanted.len() {
            if in_place && !self.held.is_empty() {
                // The slots hold fewer experts than the layer wants and the
                // ones bound in place stay pinned until the device has read
                // them: run what is recorded, then let them go.
                std::mem::replace(bx, exec.batch()).submit(&mut [])?;
                self.release_held()?;
            }
            i += self.experts.fetch(li, &wanted, i, step, &mut wave)?;
            let b = &mut **bx;
            for w in 0..wave.len() {
                let (e, handle) = wave[w];
                let toks = &assigned[e];
                let nt = toks.len();
                let rows: Vec<u32> = toks.iter().map(|&(t, _)| t as u32).collect();
                let wts: Vec<f32> = toks.iter().map(|&(_, wt)| wt).collect();
                let ran = (|| -> Result<()> {
                    // Llama 4 weights the expert's input, the others its
                    // output.
                    let wb = b.upload(&wts)?;
                    let (scale, coef) = match routing.gate_input {
                        true => (Some(wb), None),
                        false => (None, Some(wb)),
                    };
                    // One token's own row is bound as it is.
                    let idx = match n > 1 || routing.gate_input {
                        true => Some(b.upload_u32(&rows)?),
                        false => None,
                    };
                    let xe = match idx {
                        Some(idx) => {
                            let xe = b.scratch(nt * h)?;
                            b.op(DevOp::Gather {
                                x: hn,
                                idx,
                                scale,
                                out: xe,
                                rows: nt,
                                d: h,
                            })?;
                            xe
                        }
                        None => hn,
                    };
                    let w3 = self.experts.expert(li, e, handle);
                    let bias = lb.expert_bias.map(|bs| {
                        let i = w3[0].rows;
                        [(bs[0], e * i), (bs[1], e * i), (bs[2], e * h)]
                    });
                    let y = dev_mlp(b, w3, bias, act, xe, nt)?;
                    b.op(DevOp::Axpy {
                        y: out,
                        x: y,
                        rows: nt,
                        d: h,
                        idx,
                        coef,
                        sigmoid: false,
                    })
                })();
                if let Err(err) = ran {
                    return self.experts.abort(&wave[w..], err);
                }
                match in_place {
                    true => self.held.push((e, handle)),
                    false => self.experts.done(handle, &wave[w + 1..])?,
                }
            }
        }
        let b = &mut **bx;
        if let Some(s) = &m.shared {
            let y = dev_mlp(
                b,
                [s.gate.view(), s.up.view(), s.down.view()],
                None,
                None,
                hn,
                n,
            )?;
            let coef = match &m.shared_gate {
                Some(g) => {
                    let gl = b.scratch(n)?;
                    b.matmul(&g.view(), hn, n, gl)?;
                    Some(gl)
                }
                None => None,
            };
            b.op(DevOp::Axpy {
                y: out,
                x: y,
                rows: n,
                d: h,
                idx: None,
                coef,
                sigmoid: true,
            })?;
        }
        add(b, x, out, n, h)
    }
}

/// Records the model's rotary embedding of `n` rows at positions
/// `pos..pos + n` in each `(buffer, heads)` of `xs`, from angle tables
/// made on the host.
fn rope_rows(
    b: &mut dyn DeviceBatch,
    c: &crate::Config,
    pos: usize,
    n: usize,
    xs: [(DevBuf, usize); 2],
    head_dim: usize,
) -> Result<()> {
    let rope = rope_of(c);
    let (cos, sin) = rope.tables_for(pos, n);
    let (cos, sin) = (b.upload(&cos)?, b.upload(&sin)?);
    let interleaved = rope.style == sluice_core::ops::RopeStyle::Interleaved;
    for (x, heads) in xs {
        b.op(DevOp::Rope {
            x,
            cos,
            sin,
            n,
            heads,
            head_dim,
            rot_dim: rope.rot_dim,
            interleaved,
        })?;
    }
    Ok(())
}

/// Splits the `n` rows of a grouped projection's output `y` into two
/// outputs of `widths` per row by copies (see the per-call path's
/// `ungroup` for `segs`).
fn ungroup(
    b: &mut dyn DeviceBatch,
    y: DevBuf,
    n: usize,
    groups: usize,
    segs: &[(usize, usize, usize)],
    widths: [usize; 2],
) -> Result<(DevBuf, DevBuf)> {
    let out = [b.scratch(n * widths[0])?, b.scratch(n * widths[1])?];
    let per_group: usize = segs.iter().map(|s| s.0).sum();
    for t in 0..n {
        for g in 0..groups {
            let mut at = t * groups * per_group + g * per_group;
            for &(len, which, base) in segs {
                b.copy(y, at, out[which], t * widths[which] + base + g * len, len)?;
                at += len;
            }
        }
    }
    Ok((out[0], out[1]))
}

/// Records `dst = RMSNorm(rows..rows + n of src)` for rows of `h` values
/// (the residual stream stays as it is).
#[allow(clippy::too_many_arguments)]
fn normed(
    b: &mut dyn DeviceBatch,
    src: DevBuf,
    row0: usize,
    dst: DevBuf,
    w: DevBuf,
    n: usize,
    h: usize,
    eps: f32,
) -> Result<()> {
    b.copy(src, row0 * h, dst, 0, n * h)?;
    b.op(DevOp::RmsNorm {
        x: dst,
        w,
        rows: n,
        eps,
    })
}

/// `y += x` over `n` rows of `h`.
fn add(b: &mut dyn DeviceBatch, y: DevBuf, x: DevBuf, n: usize, h: usize) -> Result<()> {
    b.op(DevOp::Axpy {
        y,
        x,
        rows: n,
        d: h,
        idx: None,
        coef: None,
        sigmoid: false,
    })
}

/// Records a (biased, possibly clamped) SwiGLU MLP of the `n` rows of
/// `x`: `down(act(gate x + bg, up x + bu)) + bd`, each bias given as
/// (buffer, offset of its row).
fn dev_mlp(
    b: &mut dyn DeviceBatch,
    w: [WeightView<'_>; 3],
    bias: Option<[(DevBuf, usize); 3]>,
    act: Option<ClampedSwiglu>,
    x: DevBuf,
    n: usize,
) -> Result<DevBuf> {
    let (inter, out) = (w[0].rows, w[2].rows);
    let (g, u) = (b.scratch(n * inter)?, b.scratch(n * inter)?);
    b.matmul(&w[0], x, n, g)?;
    b.matmul(&w[1], x, n, u)?;
    let biased = |b: &mut dyn DeviceBatch, y: DevBuf, (src, off): (DevBuf, usize), len| {
        let row = b.scratch(len)?;
        b.copy(src, off, row, 0, len)?;
        b.op(DevOp::AddRows {
            x: y,
            b: row,
            rows: n,
        })
    };
    if let Some([bg, bu, _]) = bias {
        biased(b, g, bg, inter)?;
        biased(b, u, bu, inter)?;
    }
    b.op(match act {
        Some(a) => DevOp::ClampedSwiglu {
            g,
            u,
            len: n * inter,
            alpha: a.alpha,
            limit: a.limit,
        },
        None => DevOp::Swiglu {
            g,
            u,
            len: n * inter,
        },
    })?;
    let y = b.scratch(n * out)?;
    b.matmul(&w[2], g, n, y)?;
    if let Some([_, _, bd]) = bias {
        biased(b, y, bd, out)?;
    }
    Ok(y)
}
