//! The compute-backend trait.
//!
//! The forward pass is written once against [`Backend`]; the CPU backend,
//! the Metal backend and the simulated-device backend implement it. Only
//! [`Backend::matmul`] is required: it carries almost all of a token's
//! FLOPs and all of its weight bytes. The other operations have portable
//! default implementations (burn's pattern) that an accelerator overrides
//! when it keeps activations resident.

use crate::ops::{self, Rope};
use crate::{DType, Result};
use std::sync::atomic::{AtomicU64, Ordering};

/// A borrowed 2-D weight matrix of `rows` × `cols` in row-major order, each
/// row `dtype.row_bytes(cols)` bytes: the layout shared by safetensors
/// (`[out, in]`) and GGUF (`ne = [in, out]`).
#[derive(Clone, Copy, Debug)]
pub struct WeightView<'a> {
    /// Element type of the stored rows.
    pub dtype: DType,
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
    /// Exactly `rows * dtype.row_bytes(cols)` bytes.
    pub data: &'a [u8],
    /// MLX types: one scale per group, `rows × cols/group` values. FP8:
    /// the lines of the scale grid that the rows cover (see
    /// [`block_row0`](Self::block_row0)). Empty for other types.
    pub scales: &'a [u8],
    /// MLX types: one bias per group, like `scales` (else empty).
    pub biases: &'a [u8],
    /// FP8: where the first row sits inside its block of rows, so that
    /// row `r` takes scale line `(block_row0 + r) / block_rows` (0 unless
    /// the view starts mid-block; 0 for other types).
    pub block_row0: usize,
    /// Identity of bytes that stay unchanged while the id is in use (a
    /// loaded model's resident weights, see [`fresh_weight_id`]): a backend
    /// may keep a device copy under it. `None` for memory that is reused,
    /// such as the streaming slots an expert is read into.
    pub id: Option<u64>,
    /// With an id: the rows of the id's matrix this view covers
    /// (first, count), `None` for the whole ([`rows`](Self::rows) keeps
    /// the identity of a part).
    pub part: Option<(usize, usize)>,
}

/// A process-unique weight id for [`WeightView::id`]; ids are never reused,
/// so a backend's copy kept under one can never describe other bytes.
pub fn fresh_weight_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

impl<'a> WeightView<'a> {
    /// A view after checking that `data` holds exactly `rows` × `cols`.
    pub fn new(dtype: DType, rows: usize, cols: usize, data: &'a [u8]) -> Result<Self> {
        Self::with_aux(dtype, rows, cols, data, &[], &[])
    }

    /// A view of an MLX-quantized matrix (or any type, with empty
    /// `scales`/`biases` for the others) after checking every length.
    pub fn with_aux(
        dtype: DType,
        rows: usize,
        cols: usize,
        data: &'a [u8],
        scales: &'a [u8],
        biases: &'a [u8],
    ) -> Result<Self> {
        let v = WeightView {
            dtype,
            rows,
            cols,
            data,
            scales,
            biases,
            block_row0: 0,
            id: None,
            part: None,
        };
        v.check()?;
        Ok(v)
    }

    /// Checks that every length matches the shape and type, so that
    /// kernels indexing the view cannot go out of bounds.
    pub fn check(&self) -> Result<()> {
        let (dtype, rows, cols) = (self.dtype, self.rows, self.cols);
        let need = dtype.tensor_bytes(&[rows, cols])?;
        let (scales, biases) = match dtype {
            DType::Mlx(q) => (rows * q.aux_row_bytes(cols), rows * q.aux_row_bytes(cols)),
            DType::FP8(q) if self.block_row0 < q.block_rows as usize => (
                q.scale_rows(self.block_row0, rows) * q.aux_row_bytes(cols),
                0,
            ),
            DType::FP8(q) => {
                return Err(crate::Error::Model(format!(
                    "{dtype} weight view starts at row {} of a block of {}",
                    self.block_row0, q.block_rows
                )))
            }
            _ => (0, 0),
        };
        if self.data.len() != need || self.scales.len() != scales || self.biases.len() != biases {
            return Err(crate::Error::Model(format!(
                "{rows}x{cols} {dtype} weight needs {need} bytes, {scales} of scales and {biases} of biases, has {}, {} and {}",
                self.data.len(),
                self.scales.len(),
                self.biases.len()
            )));
        }
        Ok(())
    }

    /// The same view, marked as the unchanging bytes `id` names.
    pub fn with_id(mut self, id: u64) -> Self {
        self.id = Some(id);
        self.part = None;
        self
    }

    /// Rows `r0..r0 + n` as a view of their own, the same id naming a
    /// part of its matrix. Panics if they are out of range.
    pub fn rows(&self, r0: usize, n: usize) -> WeightView<'a> {
        assert!(
            r0 + n <= self.rows,
            "rows {r0}..{} of {}",
            r0 + n,
            self.rows
        );
        let rb = self.row_bytes();
        if let DType::FP8(q) = self.dtype {
            let (br, ab) = (q.block_rows as usize, q.aux_row_bytes(self.cols));
            let first = self.block_row0 + r0;
            return WeightView {
                rows: n,
                data: &self.data[r0 * rb..(r0 + n) * rb],
                scales: &self.scales[first / br * ab..][..q.scale_rows(first % br, n) * ab],
                block_row0: first % br,
                part: self.sub(r0, n),
                ..*self
            };
        }
        let ab = self.scales.len() / self.rows.max(1);
        WeightView {
            rows: n,
            data: &self.data[r0 * rb..(r0 + n) * rb],
            scales: &self.scales[r0 * ab..(r0 + n) * ab],
            biases: &self.biases[r0 * ab..(r0 + n) * ab],
            part: self.sub(r0, n),
            ..*self
        }
    }

    /// The part of the id's matrix that rows `r0..r0 + n` of this view are.
    fn sub(&self, r0: usize, n: usize) -> Option<(usize, usize)> {
        self.id?;
        Some((self.part.map_or(0, |p| p.0) + r0, n))
    }

    /// FP8: the line of the scale grid that row `r` takes.
    #[inline]
    pub fn fp8_scale_line(&self, q: crate::Fp8Block, r: usize) -> &'a [u8] {
        let ab = q.aux_row_bytes(self.cols);
        let l = (self.block_row0 + r) / q.block_rows as usize;
        &self.scales[l * ab..(l + 1) * ab]
    }

    /// Bytes of one row.
    #[inline]
    pub fn row_bytes(&self) -> usize {
        self.data.len() / self.rows.max(1)
    }

    /// Dequantizes row `r` into `out` (`cols` values). The view's lengths
    /// must be consistent (as [`with_aux`](Self::with_aux) checks); panics,
    /// never UB, otherwise.
    pub fn row_into(&self, r: usize, out: &mut [f32]) {
        let rb = self.row_bytes();
        let src = &self.data[r * rb..(r + 1) * rb];
        match self.dtype {
            DType::Mlx(q) => {
                let ab = q.aux_row_bytes(self.cols);
                crate::quant::dequantize_mlx_unchecked(
                    q,
                    src,
                    &self.scales[r * ab..(r + 1) * ab],
                    &self.biases[r * ab..(r + 1) * ab],
                    out,
                )
            }
            DType::FP8(q) => {
                crate::fp8::dequantize_unchecked(q, src, self.fp8_scale_line(q, r), 0, out)
            }
            t => crate::quant::dequantize_unchecked(t, src, out),
        }
    }
}

/// Shape of a causal attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttnParams<'a> {
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `n_heads`).
    pub n_kv_heads: usize,
    /// Dimension of one head.
    pub head_dim: usize,
    /// Multiplier of q·k, usually `1/sqrt(head_dim)`.
    pub scale: f32,
    /// Sliding window: a query at position `i` sees keys `j` with `i - j < w`.
    pub window: Option<usize>,
    /// Chunked attention (Llama 4): a query at position `i` sees keys `j`
    /// of its own chunk, `j / c == i / c`.
    pub chunk: Option<usize>,
    /// Attention sinks (gpt-oss): per query head, a logit that joins each
    /// softmax's denominator without a value of its own.
    pub sinks: Option<&'a [f32]>,
}

impl AttnParams<'_> {
    /// The first key a query at position `pos` sees (keys up to `pos`).
    pub fn first_key(&self, pos: usize) -> usize {
        let w = match self.window {
            Some(w) if w > 0 => (pos + 1).saturating_sub(w),
            _ => 0,
        };
        let c = match self.chunk {
            Some(c) if c > 0 => pos / c * c,
            _ => 0,
        };
        w.max(c)
    }
}

/// What an accelerator backend has exchanged with its device so far: the
/// synchronisation and copies that a device-resident forward pass avoids.
/// Counters only grow; [`since`](Self::since) gives one stretch of work.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceTraffic {
    /// Command submissions to the device queue.
    pub submissions: u64,
    /// Times the host blocked until the device finished.
    pub waits: u64,
    /// Device buffers created (a backend that pools them stops creating
    /// any once its pools are warm).
    pub buffers_created: u64,
    /// Activation bytes copied from the host to the device.
    pub activation_bytes_up: u64,
    /// Weight bytes copied from the host to the device (resident weights
    /// once; streamed experts per use).
    pub weight_bytes_up: u64,
    /// Bytes read back from the device to the host.
    pub bytes_down: u64,
    /// Streamed weight bytes the kernels read in place, from host memory
    /// the device shares (not copied).
    pub weight_bytes_bound: u64,
}

impl DeviceTraffic {
    /// The traffic since `earlier` (a reading from the same backend).
    pub fn since(&self, earlier: &DeviceTraffic) -> DeviceTraffic {
        DeviceTraffic {
            submissions: self.submissions - earlier.submissions,
            waits: self.waits - earlier.waits,
            buffers_created: self.buffers_created - earlier.buffers_created,
            activation_bytes_up: self.activation_bytes_up - earlier.activation_bytes_up,
            weight_bytes_up: self.weight_bytes_up - earlier.weight_bytes_up,
            bytes_down: self.bytes_down - earlier.bytes_down,
            weight_bytes_bound: self.weight_bytes_bound - earlier.weight_bytes_bound,
        }
    }
}

/// A compute backend.
pub trait Backend: Send + Sync {
    /// Short name for logs and benchmark output.
    fn name(&self) -> &str;

    /// `y[t][r] = Σ_c w[r][c] · x[t][c]` for `n` input rows.
    ///
    /// `x` is `n × w.cols` and `y` is `n × w.rows`, both row-major f32.
    fn matmul(&self, w: WeightView<'_>, x: &[f32], n: usize, y: &mut [f32]) -> Result<()>;

    /// Causal attention for `n` query rows at positions `pos0..pos0 + n`.
    ///
    /// `q` is `n × (n_heads·head_dim)`; `k` and `v` hold the cache for
    /// positions `0..pos0 + n`, each row `n_kv_heads·head_dim`; `out` is
    /// shaped like `q`.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        n: usize,
        pos0: usize,
        p: &AttnParams<'_>,
        out: &mut [f32],
    ) -> Result<()> {
        ops::attention(q, k, v, n, pos0, p, out);
        Ok(())
    }

    /// RMSNorm of each `w.len()`-long row of `x`, in place.
    fn rms_norm(&self, x: &mut [f32], w: &[f32], eps: f32) -> Result<()> {
        ops::rms_norm(x, w, eps);
        Ok(())
    }

    /// Rotary embedding of `n` rows of `x` (each `heads × head_dim`) at
    /// positions `pos0..pos0 + n`, in place.
    fn rope(
        &self,
        rope: &Rope,
        pos0: usize,
        x: &mut [f32],
        n: usize,
        head_dim: usize,
    ) -> Result<()> {
        rope.apply_rows(pos0, x, n, head_dim);
        Ok(())
    }

    /// A SwiGLU MLP, `y = down(silu(gate·x) ⊙ up·x)`, for `n` rows of `x`;
    /// `y` is `n × down.rows`.
    fn mlp(&self, w: [WeightView<'_>; 3], x: &[f32], n: usize, y: &mut [f32]) -> Result<()> {
        let [gate, up, down] = w;
        let i = gate.rows;
        let mut g = vec![0f32; n * i];
        let mut u = vec![0f32; n * i];
        self.matmul(gate, x, n, &mut g)?;
        self.matmul(up, x, n, &mut u)?;
        ops::swiglu(&mut g, &u);
        self.matmul(down, &g, n, y)
    }

    /// Router softmax and top-k: each of the `n` rows of `logits` becomes
    /// probabilities in place, and `chosen[t·k..(t+1)·k]` receives row `t`'s
    /// `k` most probable experts, most probable first, ties to the lower
    /// index.
    fn route(&self, logits: &mut [f32], n: usize, k: usize, chosen: &mut [usize]) -> Result<()> {
        ops::route(logits, n, k, chosen);
        Ok(())
    }

    /// Seconds the device has spent on this backend's work so far, for
    /// accelerators that run asynchronously from the host (`None` for the
    /// CPU).
    fn device_seconds(&self) -> Option<f64> {
        None
    }

    /// Submissions, waits, buffer creations and copies so far, for
    /// backends that drive a separate device (`None` for the CPU).
    fn device_traffic(&self) -> Option<DeviceTraffic> {
        None
    }

    /// The device-resident executor, for accelerators that offer one: the
    /// forward pass then keeps activations on the device and submits once
    /// per layer (`None`: every call goes through this trait).
    fn device_exec(&self) -> Option<&dyn crate::DeviceExec> {
        None
    }
}
