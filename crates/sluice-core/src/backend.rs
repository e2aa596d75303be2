//! The compute-backend trait.
//!
//! The forward pass is written once against [`Backend`]; the CPU backend,
//! the Metal backend and the simulated-device backend implement it. Only
//! [`Backend::matmul`] is required: it carries almost all of a token's
//! FLOPs and all of its weight bytes. The other operations have portable
//! default implementations (burn's pattern) that an accelerator overrides
//! when it keeps activations resident.

use crate::{ops, DType, Result};

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
}

impl<'a> WeightView<'a> {
    /// A view after checking that `data` holds exactly `rows` × `cols`.
    pub fn new(dtype: DType, rows: usize, cols: usize, data: &'a [u8]) -> Result<Self> {
        let need = dtype.tensor_bytes(&[rows, cols])?;
        if data.len() != need {
            return Err(crate::Error::Model(format!(
                "{rows}x{cols} {dtype} weight needs {need} bytes, has {}",
                data.len()
            )));
        }
        Ok(WeightView {
            dtype,
            rows,
            cols,
            data,
        })
    }

    /// Bytes of one row.
    pub fn row_bytes(&self) -> usize {
        self.data.len() / self.rows.max(1)
    }
}

/// Shape of a causal attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttnParams {
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
        p: &AttnParams,
        out: &mut [f32],
    ) {
        ops::attention(q, k, v, n, pos0, p, out)
    }
}
