//! The device-resident executor: a second trait beside [`Backend`].
//!
//! [`Backend`]'s calls take and return host slices, so an accelerator
//! behind it uploads its inputs, submits, waits and reads back on every
//! call: several host-device round trips per layer. A backend that also
//! implements [`DeviceExec`] lets the forward pass keep a whole token's
//! activations, the KV cache and the intermediate products in device
//! buffers, record a layer's work into one [`DeviceBatch`] and submit it
//! once, reading back only what the host must learn (the router's logits,
//! and the final logits). The CPU and simulated backends do not implement
//! it and keep the plain path.
//!
//! [`Backend`]: crate::Backend

use crate::{Result, WeightView};

/// A device buffer of `len` f32 (or u32) values: a session's, kept until
/// [`DeviceExec::release`], or one batch's, gone once it is submitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DevBuf {
    /// The backend's name for it.
    pub id: u64,
    /// Values it holds.
    pub len: usize,
}

/// An element-wise or row-wise kernel recorded into a [`DeviceBatch`].
/// Buffers are read and written from their start; shapes are checked
/// against their lengths before anything is recorded.
#[derive(Clone, Copy, Debug)]
pub enum DevOp {
    /// RMSNorm of each `w.len`-wide row of `x`'s first `rows`, in place.
    RmsNorm {
        /// Rows, in place.
        x: DevBuf,
        /// Weight, one row.
        w: DevBuf,
        /// Rows to normalize.
        rows: usize,
        /// Epsilon.
        eps: f32,
    },
    /// Rotary embedding of `n` rows of `x` (`heads × head_dim` each), with
    /// per-row angle tables `cos` and `sin` (`rot_dim / 2` each) made on
    /// the host, as [`Rope::tables`](crate::ops::Rope::tables) gives them.
    Rope {
        /// Rows, in place.
        x: DevBuf,
        /// `n × rot_dim/2` cosines.
        cos: DevBuf,
        /// `n × rot_dim/2` sines.
        sin: DevBuf,
        /// Rows.
        n: usize,
        /// Heads per row.
        heads: usize,
        /// Dimension of one head.
        head_dim: usize,
        /// Rotated dimensions of each head.
        rot_dim: usize,
        /// Pairs `(2i, 2i+1)` instead of `(i, i + rot_dim/2)`.
        interleaved: bool,
    },
    /// Causal attention of `n` query rows at positions `pos0..pos0 + n`
    /// over the first `pos0 + n` rows of the caches `k` and `v`.
    Attention {
        /// `n × heads·head_dim` queries, then one sink logit per head
        /// (`f32::MIN` for none).
        q: DevBuf,
        /// Key cache, `kv_heads·head_dim` per position.
        k: DevBuf,
        /// Value cache, likewise.
        v: DevBuf,
        /// `n × heads·head_dim` output.
        out: DevBuf,
        /// Scratch of `n × heads × (pos0 + n)` values.
        scores: DevBuf,
        /// Query rows.
        n: usize,
        /// Position of the first query.
        pos0: usize,
        /// Query heads.
        heads: usize,
        /// Key/value heads.
        kv_heads: usize,
        /// Dimension of a head.
        head_dim: usize,
        /// Multiplier of q·k.
        scale: f32,
        /// Sliding window (0: none).
        window: usize,
        /// Chunk size (0: none).
        chunk: usize,
    },
    /// `g = silu(g) · u` over `len` values.
    Swiglu {
        /// Gate, overwritten.
        g: DevBuf,
        /// Up.
        u: DevBuf,
        /// Values.
        len: usize,
    },
    /// gpt-oss's clamped SwiGLU over `len` values (see the engine's
    /// `ClampedSwiglu`): `g = (clamp(u) + 1) · min(g, limit) · σ(α·min(g, limit))`.
    ClampedSwiglu {
        /// Gate, overwritten.
        g: DevBuf,
        /// Up.
        u: DevBuf,
        /// Values.
        len: usize,
        /// Slope inside the sigmoid.
        alpha: f32,
        /// Clamp of gate and up.
        limit: f32,
    },
    /// `y[row(j)] += c(j) · x[j]` for `rows` rows of `d`: `row(j)` is
    /// `idx[j]` (u32) or `j`; `c(j)` is `coef[j]`, `σ(coef[j])` when
    /// `sigmoid`, or 1.
    Axpy {
        /// Accumulated rows.
        y: DevBuf,
        /// Added rows.
        x: DevBuf,
        /// Rows of `x`.
        rows: usize,
        /// Row width.
        d: usize,
        /// Destination row of each row of `x`.
        idx: Option<DevBuf>,
        /// Per row coefficient.
        coef: Option<DevBuf>,
        /// The coefficient goes through a sigmoid.
        sigmoid: bool,
    },
    /// `out[j] = x[idx[j]] · (scale[j] or 1)` for `rows` rows of `d`.
    Gather {
        /// Source rows.
        x: DevBuf,
        /// Source row of each output row (u32).
        idx: DevBuf,
        /// Per output row scale.
        scale: Option<DevBuf>,
        /// Output rows.
        out: DevBuf,
        /// Output rows.
        rows: usize,
        /// Row width.
        d: usize,
    },
    /// `x[r] += b` for each of `rows` rows of `b.len` values.
    AddRows {
        /// Rows, in place.
        x: DevBuf,
        /// Bias row.
        b: DevBuf,
        /// Rows.
        rows: usize,
    },
    /// The index of the largest of `len` values of `x`, as
    /// `Sampler::argmax` picks it (the first of equal maxima; NaNs skipped,
    /// 0 when the first value is NaN), into `out[0]` as u32 bits.
    Argmax {
        /// Values (a row of logits).
        x: DevBuf,
        /// Values in `x`.
        len: usize,
        /// One value: the index.
        out: DevBuf,
    },
    /// `x = clamp(x, -limit, limit)` over `len` values.
    Clamp {
        /// Values, in place.
        x: DevBuf,
        /// Values.
        len: usize,
        /// Bound.
        limit: f32,
    },
    /// `x *= σ(g)` over `len` values.
    SigmoidMul {
        /// Values, in place.
        x: DevBuf,
        /// Gates.
        g: DevBuf,
        /// Values.
        len: usize,
    },
    /// Gated DeltaNet's causal depthwise conv and SiLU over `n` tokens of
    /// `channels`, in order: `out[t][c] = silu(Σ_j w[c][j]·in[t-kernel+1+j][c])`,
    /// the previous inputs coming from `hist` (`kernel - 1` per channel,
    /// oldest first), which is updated.
    ConvStep {
        /// History, in place.
        hist: DevBuf,
        /// `n × channels` inputs.
        x: DevBuf,
        /// `channels × kernel` weights.
        w: DevBuf,
        /// `n × channels` outputs.
        out: DevBuf,
        /// Tokens.
        n: usize,
        /// Channels.
        channels: usize,
        /// Width of the convolution (at least 2).
        kernel: usize,
    },
    /// Gated DeltaNet's recurrence over `n` tokens, per value head: with
    /// q and k l2-normalized (q scaled by `scale`), `β = σ(b)` and
    /// `decay = exp(a_neg · softplus(a + dt_bias))`: `S ← decay·S`,
    /// `S += k ⊗ (v - Sᵀk)·β`, `out = Sᵀq`.
    DeltaRule {
        /// `v_heads × k_dim × v_dim` state, in place.
        state: DevBuf,
        /// `n × (2·k_heads·k_dim + v_heads·v_dim)`: q, k, v per token.
        qkv: DevBuf,
        /// `[b (n × v_heads) | a (n × v_heads) | a_neg (v_heads) | dt_bias (v_heads)]`.
        params: DevBuf,
        /// `n × v_heads·v_dim` outputs.
        out: DevBuf,
        /// Tokens.
        n: usize,
        /// Query/key heads.
        k_heads: usize,
        /// Value heads (a multiple of `k_heads`).
        v_heads: usize,
        /// Dimension of a query/key head.
        k_dim: usize,
        /// Dimension of a value head.
        v_dim: usize,
        /// Value head `j` reads key head `j % k_heads` (else
        /// `j / (v_heads / k_heads)`).
        tiled: bool,
        /// Query scale.
        scale: f32,
    },
    /// `x[r] *= s[r]` for `rows` rows of `d`.
    ScaleRows {
        /// Rows, in place.
        x: DevBuf,
        /// One scale per row.
        s: DevBuf,
        /// Rows.
        rows: usize,
        /// Row width.
        d: usize,
    },
}

/// Work recorded for one submission. Nothing runs until
/// [`submit`](Self::submit); the batch's own buffers and the weights it
/// uploaded are held until then. Dropped without submitting, it discards
/// its work.
pub trait DeviceBatch {
    /// A batch buffer holding `data`.
    fn upload(&mut self, data: &[f32]) -> Result<DevBuf>;
    /// A batch buffer holding `data` (indices).
    fn upload_u32(&mut self, data: &[u32]) -> Result<DevBuf>;
    /// A batch buffer of `len` values, contents undefined.
    fn scratch(&mut self, len: usize) -> Result<DevBuf>;
    /// Sets the first `len` values of `b` to zero.
    fn zero(&mut self, b: DevBuf, len: usize) -> Result<()>;
    /// Copies `len` values of `src` from `src_off` to `dst` at `dst_off`.
    fn copy(
        &mut self,
        src: DevBuf,
        src_off: usize,
        dst: DevBuf,
        dst_off: usize,
        len: usize,
    ) -> Result<()>;
    /// `y = w · x` for the first `n` rows of `x` (`w.cols` wide) into the
    /// first `n` rows of `y` (`w.rows` wide). Resident weights (with an
    /// id) stay on the device; others are copied into batch buffers now,
    /// so their bytes may be reused as soon as this returns.
    fn matmul(&mut self, w: &WeightView<'_>, x: DevBuf, n: usize, y: DevBuf) -> Result<()>;
    /// Records a kernel.
    fn op(&mut self, op: DevOp) -> Result<()>;
    /// Rows `idx[t]` (u32 bits, `t < n`) of `w`, dequantized, into the
    /// first `n` rows of `out` (`w.cols` wide): an embedding lookup of
    /// tokens the device chose. Only for a weight the device keeps
    /// resident; returns `false`, recording nothing, for any other.
    fn gather_rows(
        &mut self,
        w: &WeightView<'_>,
        idx: DevBuf,
        n: usize,
        out: DevBuf,
    ) -> Result<bool>;
    /// Submits the work once, waits once, and copies each `(buffer,
    /// offset, out)` from the device into `out`.
    fn submit(self: Box<Self>, reads: &mut [(DevBuf, usize, &mut [f32])]) -> Result<()>;
}

/// A backend that runs batches of device-resident work.
pub trait DeviceExec: Send + Sync {
    /// A zeroed buffer of `len` values that lives until released
    /// (a session's hidden state, KV cache, norms).
    fn alloc(&self, len: usize) -> Result<DevBuf>;
    /// Writes `data` into `b` at `off` (outside any batch: at a session's
    /// start or when a parked state is restored).
    fn write(&self, b: DevBuf, off: usize, data: &[f32]) -> Result<()>;
    /// Reads `out.len()` values of `b` from `off` (a state being parked).
    fn read(&self, b: DevBuf, off: usize, out: &mut [f32]) -> Result<()>;
    /// Frees a buffer from [`alloc`](Self::alloc).
    fn release(&self, b: DevBuf);
    /// A new batch.
    fn batch(&self) -> Box<dyn DeviceBatch + '_>;

    /// The alignment (of its start and of its length) host memory needs
    /// for [`map_host`](Self::map_host); `None` when the device cannot
    /// bind host memory in place (a discrete GPU, or a driver without host
    /// memory import).
    fn host_align(&self) -> Option<usize> {
        None
    }

    /// From now on, weights whose bytes lie in `[ptr, ptr + len)` (a
    /// streamer's expert slot) are bound by the kernels where they are
    /// instead of being copied into device buffers. Returns whether the
    /// device took the memory (`false`: weights in it are still copied).
    ///
    /// # Safety
    ///
    /// The memory must stay allocated until [`forget_host`](Self::forget_host)
    /// returns for `ptr`, and the caller must not write it while a batch
    /// that reads it has not been submitted and waited for.
    unsafe fn map_host(&self, ptr: *const u8, len: usize) -> Result<bool> {
        let _ = (ptr, len);
        Ok(false)
    }

    /// Stops binding the memory mapped at `ptr`; returns once the device
    /// holds no reference to it.
    fn forget_host(&self, ptr: *const u8) {
        let _ = ptr;
    }
}
