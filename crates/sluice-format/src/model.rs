//! Model weights, borrowed in place from the container's maps.
//!
//! Loading resolves every tensor the architecture needs by name (Hugging
//! Face or GGUF naming), checks its shape against the [`Config`], and keeps
//! a [`TensorBytes`] range: no weight is copied, except the small norm and
//! bias vectors, which are converted to f32. Experts, whether stored one
//! tensor per expert or stacked per layer, become one [`Mlp`] each whose
//! three matrices are byte ranges of the file.

use crate::config::{Arch, Config, Mixer};
use crate::{ModelFiles, TensorBytes, TensorInfo};
use sluice_core::{
    quant, DType, Error, Fp8Block, Fp8Scale, HalfType, MlxQuant, Result, WeightView,
};

/// A 2-D weight matrix stored in a model file.
#[derive(Clone, Debug)]
pub struct Weight {
    /// Element type.
    pub dtype: DType,
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
    /// Index of the file holding it.
    pub file: usize,
    /// Its bytes (a range of the mapped file).
    pub data: TensorBytes,
    /// Separate tensors (possibly in other files): MLX types' scales and
    /// biases, FP8's scale grid lines; empty for other types.
    pub aux: Vec<Part>,
    /// FP8: where the first row sits inside its block of rows (see
    /// [`WeightView::block_row0`]); 0 otherwise.
    pub block_row0: usize,
    /// Process-unique identity of these (immutable) bytes, so a GPU backend
    /// can keep a copy: [`sluice_core::fresh_weight_id`].
    pub id: u64,
}

/// A byte range of a model file that belongs to a [`Weight`].
#[derive(Clone, Debug)]
pub struct Part {
    /// Index of the file holding it.
    pub file: usize,
    /// Its bytes.
    pub data: TensorBytes,
}

impl Weight {
    /// Borrowed view for a backend.
    pub fn view(&self) -> WeightView<'_> {
        let aux = |i: usize| -> &[u8] { self.aux.get(i).map_or(&[], |p| &p.data) };
        WeightView {
            dtype: self.dtype,
            rows: self.rows,
            cols: self.cols,
            data: &self.data,
            scales: aux(0),
            biases: aux(1),
            block_row0: self.block_row0,
            id: Some(self.id),
            part: None,
        }
    }

    /// Every byte range of the weight: its values, then any scales and
    /// biases, as `(file, bytes)`.
    pub fn parts(&self) -> Vec<(usize, &TensorBytes)> {
        let mut v = vec![(self.file, &self.data)];
        v.extend(self.aux.iter().map(|p| (p.file, &p.data)));
        v
    }

    /// Mutable [`parts`](Self::parts).
    pub fn parts_mut(&mut self) -> Vec<(usize, &mut TensorBytes)> {
        let mut v = vec![(self.file, &mut self.data)];
        v.extend(self.aux.iter_mut().map(|p| (p.file, &mut p.data)));
        v
    }

    /// Bytes of all parts.
    pub fn nbytes(&self) -> u64 {
        self.parts().iter().map(|(_, d)| d.len() as u64).sum()
    }

    /// Dequantizes row `r` into `out`.
    pub fn row_f32(&self, r: usize, out: &mut [f32]) -> Result<()> {
        if r >= self.rows {
            return Err(Error::Invalid(format!(
                "row {r} out of range: the matrix has {} rows",
                self.rows
            )));
        }
        if out.len() != self.cols {
            return Err(Error::Invalid(format!(
                "row of {} values into {}",
                self.cols,
                out.len()
            )));
        }
        let v = self.view();
        v.check()?;
        v.row_into(r, out);
        Ok(())
    }
}

/// A projection with an optional bias.
#[derive(Clone, Debug)]
pub struct Linear {
    /// Weight matrix.
    pub w: Weight,
    /// Bias, one per output feature.
    pub bias: Option<Vec<f32>>,
}

/// A SwiGLU MLP: one routed expert, a shared expert or a dense layer's MLP.
#[derive(Clone, Debug)]
pub struct Mlp {
    /// `intermediate × hidden`.
    pub gate: Weight,
    /// `intermediate × hidden`.
    pub up: Weight,
    /// `hidden × intermediate`.
    pub down: Weight,
}

impl Mlp {
    /// Bytes of the three matrices (with any MLX scales and biases).
    pub fn nbytes(&self) -> u64 {
        self.gate.nbytes() + self.up.nbytes() + self.down.nbytes()
    }
}

/// A mixture-of-experts block.
#[derive(Clone, Debug)]
pub struct Moe {
    /// Router: `n_experts × hidden`.
    pub router: Weight,
    /// Routed experts.
    pub experts: Vec<Mlp>,
    /// Always-on shared expert (Qwen2-MoE).
    pub shared: Option<Mlp>,
    /// Sigmoid gate of the shared expert: `1 × hidden`.
    pub shared_gate: Option<Weight>,
    /// Added to the sigmoid scores to choose experts, never to weight them
    /// (DeepSeek-V3's `e_score_correction_bias`).
    pub score_bias: Option<Vec<f32>>,
    /// Bias of the router's logits (gpt-oss).
    pub router_bias: Option<Vec<f32>>,
    /// Per-expert biases of the projections (gpt-oss), kept resident.
    pub biases: Option<ExpertBiases>,
}

/// Per-expert biases of the routed experts' projections, expert-major:
/// `experts × rows` of each matrix.
#[derive(Clone, Debug)]
pub struct ExpertBiases {
    /// Experts.
    pub experts: usize,
    /// Of the gate projections (`experts × intermediate`).
    pub gate: Vec<f32>,
    /// Of the up projections (`experts × intermediate`).
    pub up: Vec<f32>,
    /// Of the down projections (`experts × hidden`).
    pub down: Vec<f32>,
}

impl ExpertBiases {
    /// Expert `e`'s biases of gate, up and down.
    pub fn of(&self, e: usize) -> [&[f32]; 3] {
        let (i, h) = (
            self.gate.len() / self.experts,
            self.down.len() / self.experts,
        );
        [
            &self.gate[e * i..(e + 1) * i],
            &self.up[e * i..(e + 1) * i],
            &self.down[e * h..(e + 1) * h],
        ]
    }
}

/// The feed-forward half of a layer.
// One per layer, built once at load and never moved in a hot loop: the
// size gap between the variants costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum Ffn {
    /// A dense MLP.
    Dense(Mlp),
    /// A mixture of experts.
    Moe(Moe),
}

/// Softmax attention's weights.
#[derive(Clone, Debug)]
pub struct Attention {
    /// Query projection (with Qwen3.5's output gate: per head `[q | gate]`).
    pub q: Linear,
    /// Key projection.
    pub k: Linear,
    /// Value projection.
    pub v: Linear,
    /// Output projection.
    pub o: Linear,
    /// RMSNorm of queries: per head (`head_dim`) or whole (`heads·head_dim`).
    pub q_norm: Option<Vec<f32>>,
    /// RMSNorm of keys, likewise.
    pub k_norm: Option<Vec<f32>>,
    /// Per head, a logit in each softmax's denominator (gpt-oss).
    pub sinks: Option<Vec<f32>>,
}

/// How latent attention's per-head key and value expansions are stored.
#[derive(Clone, Debug)]
pub enum LatentKv {
    /// One matrix (Hugging Face `kv_b_proj`, GGUF `attn_kv_b`) of
    /// `heads × (nope + v)` rows of `kv_lora`: per head, the key rows, then
    /// the value rows.
    Joint(Weight),
    /// llama.cpp's split: `attn_k_b`, per head `kv_lora` rows of `nope`
    /// (the key rows transposed, so absorbing them into the query is a
    /// plain product), and `attn_v_b`, per head `v` rows of `kv_lora`.
    Split {
        /// `heads × kv_lora` rows of `nope`.
        k_t: Weight,
        /// `heads × v` rows of `kv_lora`.
        v: Weight,
    },
}

/// Multi-head latent attention's weights (DeepSeek-V3).
#[derive(Clone, Debug)]
pub struct LatentAttn {
    /// Query compression `q_lora × hidden` and its RMSNorm, when the
    /// query is compressed.
    pub q_a: Option<(Weight, Vec<f32>)>,
    /// `heads × (nope + rope)` rows of `q_lora` (or of `hidden`).
    pub q: Weight,
    /// `(kv_lora + rope) × hidden`: the latent and the shared rotary key.
    pub kv_a: Weight,
    /// RMSNorm of the latent.
    pub kv_a_norm: Vec<f32>,
    /// Per-head key and value expansions of the latent.
    pub kv_b: LatentKv,
    /// `hidden × heads·v`.
    pub o: Weight,
}

impl LatentAttn {
    /// Every matrix, mutably.
    fn weights_mut(&mut self) -> Vec<&mut Weight> {
        let mut v: Vec<&mut Weight> = Vec::with_capacity(6);
        if let Some((w, _)) = &mut self.q_a {
            v.push(w);
        }
        v.extend([&mut self.q, &mut self.kv_a, &mut self.o]);
        match &mut self.kv_b {
            LatentKv::Joint(w) => v.push(w),
            LatentKv::Split { k_t, v: vb } => v.extend([k_t, vb]),
        }
        v
    }
}

/// Two projections of the same input: two matrices, or one whose rows
/// interleave them per key head (Qwen3-Next's `in_proj_qkvz` and
/// `in_proj_ba`), which the forward pass splits after one matmul.
#[derive(Clone, Debug)]
pub enum PairProj {
    /// The first projection's matrix, then the second's.
    Split(Weight, Weight),
    /// One matrix: per key head, that head's rows of the first projection
    /// then of the second (see [`DeltaNet`] for each pair's segments).
    Grouped(Weight),
}

impl PairProj {
    /// The matrices, in file order.
    pub fn weights(&self) -> Vec<&Weight> {
        match self {
            PairProj::Split(a, b) => vec![a, b],
            PairProj::Grouped(w) => vec![w],
        }
    }

    /// The matrices, mutably.
    pub fn weights_mut(&mut self) -> Vec<&mut Weight> {
        match self {
            PairProj::Split(a, b) => vec![a, b],
            PairProj::Grouped(w) => vec![w],
        }
    }
}

/// Gated DeltaNet weights (Qwen3.5's and Qwen3-Next's linear attention).
#[derive(Clone, Debug)]
pub struct DeltaNet {
    /// Queries, keys and values before the conv (`conv_dim × hidden`), and
    /// the output gate z (`v_heads·v_dim × hidden`). Grouped per key head:
    /// `[q (k_dim), k (k_dim), v (r·v_dim), z (r·v_dim)]` with `r` value
    /// heads per key head.
    pub qkvz: PairProj,
    /// The update strength β (through a sigmoid) and the decay input, each
    /// `v_heads × hidden`. Grouped per key head: `[b (r), a (r)]`.
    pub ba: PairProj,
    /// Depthwise causal conv1d, `conv_dim × kernel`.
    pub conv: Vec<f32>,
    /// Per value head, added to `a` before the softplus.
    pub dt_bias: Vec<f32>,
    /// Per value head: `-exp(A_log)`, the decay rate.
    pub a_neg: Vec<f32>,
    /// Gated RMSNorm over one value head (`v_dim`).
    pub norm: Vec<f32>,
    /// `hidden × v_heads·v_dim`.
    pub out: Weight,
}

/// The token-mixing half of a layer.
#[derive(Clone, Debug)]
pub enum MixerWeights {
    /// Softmax attention.
    Attention(Attention),
    /// Gated DeltaNet.
    DeltaNet(DeltaNet),
    /// Multi-head latent attention.
    Latent(LatentAttn),
}

/// One decoder layer.
#[derive(Clone, Debug)]
pub struct Layer {
    /// RMSNorm before the mixer.
    pub attn_norm: Vec<f32>,
    /// Attention or linear attention.
    pub mixer: MixerWeights,
    /// RMSNorm before the feed-forward block.
    pub ffn_norm: Vec<f32>,
    /// Feed-forward block.
    pub ffn: Ffn,
}

impl Layer {
    /// Every projection matrix of the mixer (not the norms).
    pub fn mixer_weights(&self) -> Vec<&Weight> {
        match &self.mixer {
            MixerWeights::Attention(a) => vec![&a.q.w, &a.k.w, &a.v.w, &a.o.w],
            MixerWeights::DeltaNet(d) => {
                let mut v = d.qkvz.weights();
                v.extend(d.ba.weights());
                v.push(&d.out);
                v
            }
            MixerWeights::Latent(a) => {
                let mut out = Vec::with_capacity(6);
                if let Some((w, _)) = &a.q_a {
                    out.push(w);
                }
                out.extend([&a.q, &a.kv_a, &a.o]);
                match &a.kv_b {
                    LatentKv::Joint(w) => out.push(w),
                    LatentKv::Split { k_t, v } => out.extend([k_t, v]),
                }
                out
            }
        }
    }

    /// Every projection matrix of the mixer, mutably.
    pub fn mixer_weights_mut(&mut self) -> Vec<&mut Weight> {
        self.mixer.weights_mut()
    }
}

impl MixerWeights {
    /// Every projection matrix, mutably.
    pub fn weights_mut(&mut self) -> Vec<&mut Weight> {
        match self {
            MixerWeights::Attention(a) => vec![&mut a.q.w, &mut a.k.w, &mut a.v.w, &mut a.o.w],
            MixerWeights::DeltaNet(d) => {
                let mut v = d.qkvz.weights_mut();
                v.extend(d.ba.weights_mut());
                v.push(&mut d.out);
                v
            }
            MixerWeights::Latent(a) => a.weights_mut(),
        }
    }
}

/// A loaded model.
pub struct Model {
    /// Hyper-parameters.
    pub config: Config,
    /// The opened files (keeps the maps alive and answers `inspect`).
    pub files: ModelFiles,
    /// Token embedding: `vocab × hidden`.
    pub embed: Weight,
    /// Decoder layers.
    pub layers: Vec<Layer>,
    /// Final RMSNorm.
    pub norm: Vec<f32>,
    /// Output projection: `vocab × hidden` (the embedding when tied).
    pub lm_head: Weight,
}

struct Loader<'a> {
    files: &'a ModelFiles,
    mlx: MlxConfig,
    /// FP8 checkpoints: the configured tile (rows, columns); `None`: the
    /// scale grid's shape says (a scale per row or per matrix).
    fp8_block: Option<(u32, u32)>,
}

impl Loader<'_> {
    fn info(&self, name: &str) -> Result<&TensorInfo> {
        self.files
            .tensor(name)
            .ok_or_else(|| Error::Model(format!("tensor {name} is missing")))
    }

    fn has(&self, name: &str) -> bool {
        self.files.tensor(name).is_some()
    }

    fn dtype(&self, t: &TensorInfo) -> Result<DType> {
        t.dtype.ok_or_else(|| {
            Error::Unsupported(format!("tensor {} has dtype {}", t.name, t.dtype_name))
        })
    }

    /// The element type, logical shape and byte ranges (values, then any
    /// MLX scales and biases) of weight `name`.
    fn resolve(&self, name: &str) -> Result<(DType, Vec<usize>, Vec<&TensorInfo>)> {
        let t = self.info(name)?;
        let base = name.strip_suffix(".weight").unwrap_or(name);
        // FP8 scales: `x.weight_scale_inv` beside `x.weight` (DeepSeek's
        // block-scaled checkpoints), `x_scale_inv` beside a stacked `x`
        // (transformers' spelling), `x.weight_scale` (compressed-tensors'
        // and fbgemm's FP8: per row, per matrix or per block). Each
        // multiplies the codes.
        let (scale_name, plain) = if base.len() < name.len() {
            (
                format!("{base}.weight_scale_inv"),
                format!("{base}.weight_scale"),
            )
        } else {
            (format!("{name}_scale_inv"), String::new())
        };
        if let Some(ts) = self
            .files
            .tensor(&scale_name)
            .or_else(|| self.files.tensor(&plain))
        {
            return self.resolve_fp8(name, t, ts);
        }
        if t.dtype_name.starts_with("F8_") {
            return Err(Error::Unsupported(format!(
                "tensor {name} is {} without a {scale_name} beside it (sluice reads block-scaled FP8 checkpoints)",
                t.dtype_name
            )));
        }
        let (Some(ts), Some(tb)) = (
            self.files.tensor(&format!("{base}.scales")),
            self.files.tensor(&format!("{base}.biases")),
        ) else {
            return Ok((self.dtype(t)?, t.shape.clone(), vec![t]));
        };
        let bad = |m: String| Error::Model(format!("MLX-quantized {name}: {m}"));
        if t.dtype_name != "U32" {
            return Err(bad(format!(
                "packed values are {}, expected U32",
                t.dtype_name
            )));
        }
        let (bits, group) = self.mlx.lookup(base).ok_or_else(|| {
            bad("it has scales, but config.json's \"quantization\" gives no bits and group size for it".into())
        })?;
        let scales = match ts.dtype {
            Some(DType::BF16) => HalfType::Bf16,
            Some(DType::F16) => HalfType::F16,
            Some(DType::F32) => HalfType::F32,
            _ => return Err(bad(format!("scales of type {}", ts.dtype_name))),
        };
        let q = MlxQuant::new(bits, group, scales)?;
        let Some((&wc, outer)) = t.shape.split_last() else {
            return Err(bad("a scalar".into()));
        };
        let cols = wc
            .checked_mul(32)
            .map(|b| b / bits as usize)
            .filter(|c| c * bits as usize == wc * 32)
            .ok_or_else(|| bad(format!("{wc} words do not hold whole {bits}-bit values")))?;
        let mut aux_shape = outer.to_vec();
        aux_shape.push(cols / group as usize);
        if cols % group as usize != 0 || ts.shape != aux_shape || tb.shape != aux_shape {
            return Err(bad(format!(
                "packed {:?} ({cols} values per row at {bits} bits), scales {:?} and biases {:?} do not match groups of {group}",
                t.shape, ts.shape, tb.shape
            )));
        }
        let mut shape = outer.to_vec();
        shape.push(cols);
        Ok((DType::Mlx(q), shape, vec![t, ts, tb]))
    }

    /// A block-scaled FP8 weight: E4M3 values `t` and their scale grid `ts`
    /// (`[.., ceil(rows / block_rows), ceil(cols / block_cols)]`).
    fn resolve_fp8<'t>(
        &self,
        name: &str,
        t: &'t TensorInfo,
        ts: &'t TensorInfo,
    ) -> Result<(DType, Vec<usize>, Vec<&'t TensorInfo>)> {
        let bad = |m: String| Error::Model(format!("FP8 weight {name}: {m}"));
        if t.dtype_name != "F8_E4M3" {
            return Err(bad(format!(
                "values are {}, expected F8_E4M3 beside {}",
                t.dtype_name, ts.name
            )));
        }
        let scales = match (ts.dtype, ts.dtype_name.as_str()) {
            (Some(DType::BF16), _) => Fp8Scale::Bf16,
            (Some(DType::F16), _) => Fp8Scale::F16,
            (Some(DType::F32), _) => Fp8Scale::F32,
            (_, "F8_E8M0") => Fp8Scale::E8M0,
            _ => {
                return Err(Error::Unsupported(format!(
                    "FP8 weight {name}: scales {} of type {} (supported: F32, BF16, F16, F8_E8M0)",
                    ts.name, ts.dtype_name
                )))
            }
        };
        let [outer @ .., r, c] = t.shape.as_slice() else {
            return Err(bad(format!("shape {:?} is not a matrix", t.shape)));
        };
        let side = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        let matrices: usize = outer.iter().product();
        let (br, bc) = match self.fp8_block {
            Some(b) => b,
            // Without a configured tile, the grid says: a scale per row
            // (`[.., rows, 1]`, per-channel FP8) or per matrix.
            None if ts.shape.len() == t.shape.len()
                && ts.shape[..outer.len()] == *outer
                && ts.shape[outer.len()..] == [*r, 1] =>
            {
                (1, side(*c))
            }
            None if ts.shape.iter().product::<usize>() == matrices => (side(*r), side(*c)),
            None => {
                return Err(bad(format!(
                    "scales {} have shape {:?} for {:?}, and config.json gives no tile size (quantization_config.weight_block_size); without one a scale per row or per matrix is read",
                    ts.name, ts.shape, t.shape
                )))
            }
        };
        let q = Fp8Block::new(br, bc, scales).map_err(|e| bad(e.to_string()))?;
        let mut want = outer.to_vec();
        want.extend([q.scale_rows(0, *r), q.scale_cols(*c)]);
        // One scale per matrix may be stored without its unit dimensions.
        let per_matrix = want.ends_with(&[1, 1])
            && ts.shape.iter().product::<usize>() == want.iter().product::<usize>();
        if ts.shape != want && !per_matrix {
            return Err(bad(format!(
                "scales {} have shape {:?}; {:?} in tiles of {br}x{bc} need {want:?}",
                ts.name, ts.shape, t.shape
            )));
        }
        Ok((DType::FP8(q), t.shape.clone(), vec![t, ts]))
    }

    /// Byte range `[off, off + len)` of a resolved tensor part.
    fn part(&self, t: &TensorInfo, off: usize, len: usize) -> Result<Part> {
        let data = self.files.bytes(t).slice(off, len).ok_or_else(|| {
            Error::Model(format!(
                "tensor {}: bytes {off}..{} are out of its range",
                t.name,
                off + len
            ))
        })?;
        Ok(Part { file: t.file, data })
    }

    /// A weight from its resolved parts: rows `r0..r0 + rows` of a
    /// `[.., cols]` layout whose row `i` of the values starts at
    /// `i · row_bytes`.
    fn weight_of(
        &self,
        dtype: DType,
        parts: &[&TensorInfo],
        r0: usize,
        rows: usize,
        cols: usize,
    ) -> Result<Weight> {
        let rb = dtype.row_bytes(cols)?;
        let main = self.part(parts[0], r0 * rb, rows * rb)?;
        let (mut aux, mut block_row0) = (Vec::new(), 0);
        match dtype {
            DType::Mlx(q) => {
                let ab = q.aux_row_bytes(cols);
                aux.push(self.part(parts[1], r0 * ab, rows * ab)?);
                aux.push(self.part(parts[2], r0 * ab, rows * ab)?);
            }
            DType::FP8(q) => {
                // The scale grid is per matrix of a stack: rows r0.. lie in
                // matrix r0 / per, whose grid lines start at m · ceil(per /
                // block_rows).
                let per = match parts[0].shape.as_slice() {
                    [.., r, _] => *r,
                    _ => rows,
                };
                let (m, i) = (r0 / per.max(1), r0 % per.max(1));
                if i + rows > per {
                    return Err(Error::Model(format!(
                        "{}: FP8 rows {r0}..{} cross a matrix of {per} rows",
                        parts[0].name,
                        r0 + rows
                    )));
                }
                let (br, ab) = (q.block_rows as usize, q.aux_row_bytes(cols));
                let line = m * per.div_ceil(br) + i / br;
                block_row0 = i % br;
                aux.push(self.part(parts[1], line * ab, q.scale_rows(block_row0, rows) * ab)?);
            }
            _ => {}
        }
        Ok(Weight {
            dtype,
            rows,
            cols,
            file: main.file,
            data: main.data,
            aux,
            block_row0,
            id: sluice_core::fresh_weight_id(),
        })
    }

    /// A matrix, checked against the expected `[rows, cols]` (0 = any).
    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Weight> {
        let (dtype, shape0, parts) = self.resolve(name)?;
        let shape = squeeze(&shape0);
        if shape.len() != 2 || (rows != 0 && shape[0] != rows) || (cols != 0 && shape[1] != cols) {
            return Err(Error::Model(format!(
                "tensor {name} has shape {shape0:?}, expected [{}, {}]",
                dim(rows),
                dim(cols)
            )));
        }
        self.weight_of(dtype, &parts, 0, shape[0], shape[1])
    }

    fn opt_matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Option<Weight>> {
        if self.has(name) {
            self.matrix(name, rows, cols).map(Some)
        } else {
            Ok(None)
        }
    }

    /// A 1-D tensor of `len` elements, converted to f32.
    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        let t = self.info(name)?;
        let n: usize = t.shape.iter().product();
        if n != len {
            return Err(Error::Model(format!(
                "tensor {name} has shape {:?}, expected {len} elements",
                t.shape
            )));
        }
        let mut v = vec![0f32; len];
        quant::dequantize(self.dtype(t)?, &self.files.bytes(t), &mut v)
            .map_err(|e| Error::Model(format!("tensor {name}: {e}")))?;
        Ok(v)
    }

    fn opt_vector(&self, name: &str, len: usize) -> Result<Option<Vec<f32>>> {
        if self.has(name) {
            self.vector(name, len).map(Some)
        } else {
            Ok(None)
        }
    }

    /// A projection `{base}.weight` with its optional `{base}.bias`.
    fn linear(&self, base: &str, rows: usize, cols: usize) -> Result<Linear> {
        Ok(Linear {
            w: self.matrix(&format!("{base}.weight"), rows, cols)?,
            bias: self.opt_vector(&format!("{base}.bias"), rows)?,
        })
    }

    /// Layer `i` from its tensors' names and its feed-forward block.
    fn layer(&self, c: &Config, i: usize, n: &LayerNames, ffn: Ffn) -> Result<Layer> {
        let h = c.hidden;
        let (qd, kd) = attn_dims(c);
        let mixer = match c.mixers[i] {
            Mixer::Attention if c.mla.is_some() => {
                let m = c.mla.expect("checked by the guard");
                let heads = c.n_heads;
                let q_in = if m.q_lora > 0 { m.q_lora } else { h };

                let q_name = if m.q_lora > 0 { &n.mla_q_b } else { &n.mla_q };
                // A shape that disagrees names the config's ranks beside it.
                let ranks = |e: Error| {
                    match e {
                    Error::Model(msg) => Error::Model(format!(
                        "{msg} (the config's latent attention: {heads} heads, q_lora_rank {}, kv_lora_rank {}, qk_nope_head_dim {}, qk_rope_head_dim {}, v_head_dim {})",
                        m.q_lora, m.kv_lora, m.nope, m.rope, m.v
                    )),
                    other => other,
                }
                };
                let q_a = if m.q_lora > 0 {
                    Some((
                        self.matrix(&n.mla_q_a, m.q_lora, h).map_err(ranks)?,
                        self.vector(&n.mla_q_a_norm, m.q_lora).map_err(ranks)?,
                    ))
                } else {
                    None
                };
                let kv_b = if self.has(&n.mla_k_b) {
                    LatentKv::Split {
                        k_t: self
                            .heads_matrix(&n.mla_k_b, heads, m.kv_lora, m.nope)
                            .map_err(ranks)?,
                        v: self
                            .heads_matrix(&n.mla_v_b, heads, m.v, m.kv_lora)
                            .map_err(ranks)?,
                    }
                } else {
                    LatentKv::Joint(
                        self.matrix(&n.mla_kv_b, heads * (m.nope + m.v), m.kv_lora)
                            .map_err(ranks)?,
                    )
                };
                MixerWeights::Latent(LatentAttn {
                    q_a,
                    q: self
                        .matrix(q_name, heads * (m.nope + m.rope), q_in)
                        .map_err(ranks)?,
                    kv_a: self
                        .matrix(&n.mla_kv_a, m.kv_lora + m.rope, h)
                        .map_err(ranks)?,
                    kv_a_norm: self.vector(&n.mla_kv_a_norm, m.kv_lora).map_err(ranks)?,
                    kv_b,
                    o: self
                        .matrix(&format!("{}.weight", n.o), h, heads * m.v)
                        .map_err(ranks)?,
                })
            }
            Mixer::Attention => {
                let q_rows = if c.attn_gate { 2 * qd } else { qd };
                MixerWeights::Attention(Attention {
                    q: self.linear(&n.q, q_rows, h)?,
                    k: self.linear(&n.k, kd, h)?,
                    v: self.linear(&n.v, kd, h)?,
                    o: self.linear(&n.o, h, qd)?,
                    q_norm: self.qk_norm(&format!("{}.weight", n.q_norm), c.head_dim, qd)?,
                    k_norm: self.qk_norm(&format!("{}.weight", n.k_norm), c.head_dim, kd)?,
                    sinks: self.opt_vector(&n.sinks, c.n_heads)?,
                })
            }
            Mixer::Linear => {
                let l = c.linear.expect("checked: linear layers have dimensions");
                let vd = l.v_heads * l.v_dim;
                let cd = l.conv_dim();
                let conv = self.vector(&n.lin_conv, cd * l.conv_kernel)?;
                let a_neg = match &n.lin_a_log {
                    Some(name) => self
                        .vector(name, l.v_heads)?
                        .iter()
                        .map(|v| -v.exp())
                        .collect(),
                    None => self.vector(&n.lin_a, l.v_heads)?,
                };
                let qkvz = if self.has(&n.lin_qkvz) {
                    PairProj::Grouped(self.matrix(&n.lin_qkvz, cd + vd, h)?)
                } else {
                    PairProj::Split(
                        self.matrix(&n.lin_qkv, cd, h)?,
                        self.matrix(&n.lin_z, vd, h)?,
                    )
                };
                let ba = if self.has(&n.lin_ba) {
                    PairProj::Grouped(self.matrix(&n.lin_ba, 2 * l.v_heads, h)?)
                } else {
                    PairProj::Split(
                        self.matrix(&n.lin_b, l.v_heads, h)?,
                        self.matrix(&n.lin_a_proj, l.v_heads, h)?,
                    )
                };
                MixerWeights::DeltaNet(DeltaNet {
                    qkvz,
                    ba,
                    conv,
                    dt_bias: self.vector(&n.lin_dt, l.v_heads)?,
                    a_neg,
                    norm: self.vector(&n.lin_norm, l.v_dim)?,
                    out: self.matrix(&n.lin_out, h, vd)?,
                })
            }
        };
        let mut layer = Layer {
            attn_norm: self.vector(&format!("{}.weight", n.attn_norm), h)?,
            mixer,
            ffn_norm: self.vector(&format!("{}.weight", n.ffn_norm), h)?,
            ffn,
        };
        if n.shift_norms {
            // Zero-centred RMSNorm: the file stores w, the layer applies 1 + w.
            let shift = |v: &mut Vec<f32>| v.iter_mut().for_each(|x| *x += 1.0);
            shift(&mut layer.attn_norm);
            shift(&mut layer.ffn_norm);
            if let MixerWeights::Attention(a) = &mut layer.mixer {
                a.q_norm.as_mut().map(shift);
                a.k_norm.as_mut().map(shift);
            }
        }
        Ok(layer)
    }

    /// A per-head matrix stored `[heads, rows, cols]` (llama.cpp) or
    /// `[heads·rows, cols]`, as one `heads·rows × cols` weight.
    fn heads_matrix(&self, name: &str, heads: usize, rows: usize, cols: usize) -> Result<Weight> {
        let (dtype, shape, parts) = self.resolve(name)?;
        if shape != [heads, rows, cols] && shape != [heads * rows, cols] {
            return Err(Error::Model(format!(
                "tensor {name} has shape {shape:?}, expected [{heads}, {rows}, {cols}]"
            )));
        }
        self.weight_of(dtype, &parts, 0, heads * rows, cols)
    }

    /// A q/k norm whose length says whether it is per head or whole.
    fn qk_norm(&self, name: &str, head_dim: usize, whole: usize) -> Result<Option<Vec<f32>>> {
        let Some(t) = self.files.tensor(name) else {
            return Ok(None);
        };
        let n: usize = t.shape.iter().product();
        let len = if n == head_dim { head_dim } else { whole };
        self.vector(name, len).map(Some)
    }

    /// Expert `e` of a stacked `[E, rows, cols]` tensor (`sub` selects a
    /// half of the rows for fused gate/up tensors: (index, parts)).
    fn stacked(
        &self,
        name: &str,
        e: usize,
        n_experts: usize,
        sub: (usize, usize),
    ) -> Result<Weight> {
        let (dtype, shape, parts) = self.resolve(name)?;
        if shape.len() != 3 || shape[0] != n_experts || shape[1] % sub.1 != 0 {
            return Err(Error::Model(format!(
                "stacked expert tensor {name} has shape {shape:?}, expected [{n_experts}, rows, cols]",
            )));
        }
        let (rows, cols) = (shape[1] / sub.1, shape[2]);
        self.weight_of(dtype, &parts, e * shape[1] + sub.0 * rows, rows, cols)
    }
}

impl Loader<'_> {
    /// Expert `e` of a stacked tensor stored transposed, `[E, cols, rows ·
    /// parts]` (Llama 4's and gpt-oss's `gate_up_proj` and `down_proj`),
    /// as a row-major `rows × cols` matrix of its own (`sub` picks a block
    /// of columns, as in [`stacked`](Self::stacked), or with `interleaved`
    /// every `sub.1`-th column from `sub.0`, gpt-oss's gate/up order). The
    /// transpose is a copy in memory, so only float types qualify, and such
    /// experts cannot be streamed.
    fn transposed_stacked(
        &self,
        name: &str,
        e: usize,
        n_experts: usize,
        sub: (usize, usize),
        interleaved: bool,
    ) -> Result<Weight> {
        let (dtype, shape, parts) = self.resolve(name)?;
        if shape.len() != 3 || shape[0] != n_experts || shape[2] % sub.1 != 0 {
            return Err(Error::Model(format!(
                "stacked expert tensor {name} has shape {shape:?}, expected [{n_experts}, cols, rows]",
            )));
        }
        let size = match dtype {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            other => {
                return Err(Error::Unsupported(format!(
                    "{name}: transposed experts of type {other:?} (Llama 4's layout; f32, f16 and bf16 are rearranged at load, quantized ones cannot be)"
                )))
            }
        };
        let (cols, width) = (shape[1], shape[2]);
        let rows = width / sub.1;
        let src = self.part(parts[0], e * cols * width * size, cols * width * size)?;
        let mut out = vec![0u8; rows * cols * size];
        for c in 0..cols {
            let line = &src.data[c * width * size..][..width * size];
            for r in 0..rows {
                let j = if interleaved {
                    r * sub.1 + sub.0
                } else {
                    sub.0 * rows + r
                };
                out[(r * cols + c) * size..][..size].copy_from_slice(&line[j * size..][..size]);
            }
        }
        Ok(Weight {
            dtype,
            rows,
            cols,
            file: parts[0].file,
            data: TensorBytes::from_vec(out),
            aux: Vec::new(),
            block_row0: 0,
            id: sluice_core::fresh_weight_id(),
        })
    }

    /// Expert `e` of gpt-oss's MXFP4 safetensors (`{base}_blocks [E, R, C/32,
    /// 16]` and `{base}_scales [E, R, C/32]`, bytes; within a block byte
    /// `j` holds weights `2j` low and `2j + 1` high), rows `r · sub.1 +
    /// sub.0` (gate and up interleave), repacked into ggml's MXFP4 blocks
    /// (weight `j` low and `j + 16` high beside its exponent byte): a copy
    /// in memory, so such experts cannot be streamed.
    fn mxfp4_stacked(
        &self,
        base: &str,
        e: usize,
        n_experts: usize,
        sub: (usize, usize),
    ) -> Result<Weight> {
        let (bn, sn) = (format!("{base}_blocks"), format!("{base}_scales"));
        let (bt, st) = (self.info(&bn)?, self.info(&sn)?);
        let ok = bt.dtype_name == "U8"
            && st.dtype_name == "U8"
            && bt.shape.len() == 4
            && bt.shape[0] == n_experts
            && bt.shape[3] == 16
            && bt.shape[1] % sub.1 == 0
            && st.shape == bt.shape[..3];
        if !ok {
            return Err(Error::Model(format!(
                "MXFP4 expert tensors {bn} {:?} {} and {sn} {:?} {} are not [{n_experts}, rows, blocks, 16] and [{n_experts}, rows, blocks] bytes",
                bt.shape, bt.dtype_name, st.shape, st.dtype_name
            )));
        }
        let (all_rows, nb) = (bt.shape[1], bt.shape[2]);
        let rows = all_rows / sub.1;
        let blocks = self.part(bt, e * all_rows * nb * 16, all_rows * nb * 16)?;
        let scales = self.part(st, e * all_rows * nb, all_rows * nb)?;
        let mut out = vec![0u8; rows * nb * 17];
        for r in 0..rows {
            let src = r * sub.1 + sub.0;
            for b in 0..nb {
                let o = &mut out[(r * nb + b) * 17..][..17];
                o[0] = scales.data[src * nb + b];
                let q = &blocks.data[(src * nb + b) * 16..][..16];
                let code = |i: usize| (q[i / 2] >> (4 * (i % 2))) & 15;
                for j in 0..16 {
                    o[1 + j] = code(j) | (code(j + 16) << 4);
                }
            }
        }
        Ok(Weight {
            dtype: DType::MXFP4,
            rows,
            cols: nb * 32,
            file: bt.file,
            data: TensorBytes::from_vec(out),
            aux: Vec::new(),
            block_row0: 0,
            id: sluice_core::fresh_weight_id(),
        })
    }

    /// Every expert of a layer whose gate, up and down matrices are each
    /// stacked `[E, rows, cols]` under `name("gate" | "up" | "down")`.
    fn stacked_experts(
        &self,
        name: impl Fn(&str) -> String,
        ne: usize,
        h: usize,
    ) -> Result<Vec<Mlp>> {
        let (g, u, d) = (name("gate"), name("up"), name("down"));
        (0..ne)
            .map(|e| {
                let m = Mlp {
                    gate: self.stacked(&g, e, ne, (0, 1))?,
                    up: self.stacked(&u, e, ne, (0, 1))?,
                    down: self.stacked(&d, e, ne, (0, 1))?,
                };
                check_mlp(&m, h, &g)?;
                Ok(m)
            })
            .collect()
    }
}

/// The FP8 tile of `config.json`'s `quantization_config`: `weight_block_size`
/// [rows, columns] (`quant_method` "fp8"), or compressed-tensors' weights
/// `block_structure`; `None` when it gives none (the scale grid then says).
fn fp8_block(c: Option<&serde_json::Value>) -> Result<Option<(u32, u32)>> {
    let Some(q) = c.and_then(|c| c.get("quantization_config")) else {
        return Ok(None);
    };
    let ct = q
        .get("config_groups")
        .and_then(|g| g.as_object())
        .and_then(|g| {
            g.values()
                .find_map(|v| v.get("weights")?.get("block_structure"))
        });
    let Some(b) = q
        .get("weight_block_size")
        .filter(|b| !b.is_null())
        .or(ct.filter(|b| !b.is_null()))
    else {
        return Ok(None);
    };
    let side = |i: usize| {
        b.get(i)
            .and_then(|v| v.as_u64())
            .and_then(|v| u32::try_from(v).ok())
    };
    match (b.as_array().map(|a| a.len()), side(0), side(1)) {
        (Some(2), Some(r), Some(c)) if r > 0 && c > 0 => Ok(Some((r, c))),
        _ => Err(Error::Model(format!(
            "config.json: quantization_config's FP8 tile (weight_block_size or block_structure) is {b}, expected [rows, columns] of positive integers"
        ))),
    }
}

/// MLX quantization parameters from `config.json`: a default and
/// per-module overrides keyed by module path.
#[derive(Default)]
struct MlxConfig {
    base: Option<(u32, u32)>,
    overrides: std::collections::HashMap<String, Option<(u32, u32)>>,
}

impl MlxConfig {
    fn from_hf(c: Option<&serde_json::Value>) -> MlxConfig {
        let mut m = MlxConfig::default();
        let Some(q) = c.and_then(|c| {
            c.get("quantization")
                .or_else(|| c.get("quantization_config"))
        }) else {
            return m;
        };
        let pair = |v: &serde_json::Value| -> Option<(u32, u32)> {
            Some((
                v.get("bits")?.as_u64()? as u32,
                v.get("group_size")?.as_u64()? as u32,
            ))
        };
        m.base = pair(q);
        if let Some(o) = q.as_object() {
            for (k, v) in o {
                if v.is_object() {
                    m.overrides.insert(k.clone(), pair(v));
                } else if v.as_bool() == Some(false) {
                    m.overrides.insert(k.clone(), None);
                }
            }
        }
        m
    }

    /// Bits and group size of module `path` (both prefix spellings tried:
    /// converters have written either).
    fn lookup(&self, path: &str) -> Option<(u32, u32)> {
        let alt = [
            ("language_model.model.", "model.language_model."),
            ("model.language_model.", "language_model.model."),
        ]
        .iter()
        .find_map(|(a, b)| path.strip_prefix(a).map(|r| format!("{b}{r}")));
        for p in std::iter::once(path.to_string()).chain(alt) {
            if let Some(o) = self.overrides.get(&p) {
                return *o;
            }
        }
        self.base
    }
}

/// Base names (without `.weight`) of a layer's attention tensors and norms,
/// which differ only in spelling between Hugging Face and GGUF files.
struct LayerNames {
    attn_norm: String,
    q: String,
    k: String,
    v: String,
    o: String,
    q_norm: String,
    k_norm: String,
    /// Attention sinks, full name.
    sinks: String,
    ffn_norm: String,
    // Gated DeltaNet tensors, full names.
    lin_qkv: String,
    lin_z: String,
    lin_b: String,
    lin_a_proj: String,
    /// Qwen3-Next: q, k, v and z in one matrix, grouped per key head.
    lin_qkvz: String,
    /// Qwen3-Next: b and a in one matrix, grouped per key head.
    lin_ba: String,
    lin_conv: String,
    lin_dt: String,
    /// `A_log` (Hugging Face) ...
    lin_a_log: Option<String>,
    /// ... or `A = -exp(A_log)` itself (GGUF).
    lin_a: String,
    lin_norm: String,
    lin_out: String,
    /// Norms are zero-centred in the file (`1 + w` applied).
    shift_norms: bool,
    mla_q_a: String,
    mla_q_a_norm: String,
    mla_q_b: String,
    mla_q: String,
    mla_kv_a: String,
    mla_kv_a_norm: String,
    mla_kv_b: String,
    /// Only in llama.cpp's files.
    mla_k_b: String,
    mla_v_b: String,
}

impl LayerNames {
    fn hf(b: &str, shift_norms: bool) -> Self {
        let a = |n: &str| format!("{b}self_attn.{n}");
        let l = |n: &str| format!("{b}linear_attn.{n}");
        LayerNames {
            attn_norm: format!("{b}input_layernorm"),
            q: a("q_proj"),
            k: a("k_proj"),
            v: a("v_proj"),
            o: a("o_proj"),
            q_norm: a("q_norm"),
            k_norm: a("k_norm"),
            sinks: a("sinks"),
            ffn_norm: format!("{b}post_attention_layernorm"),
            lin_qkv: l("in_proj_qkv.weight"),
            lin_z: l("in_proj_z.weight"),
            lin_b: l("in_proj_b.weight"),
            lin_a_proj: l("in_proj_a.weight"),
            lin_qkvz: l("in_proj_qkvz.weight"),
            lin_ba: l("in_proj_ba.weight"),
            lin_conv: l("conv1d.weight"),
            lin_dt: l("dt_bias"),
            lin_a_log: Some(l("A_log")),
            lin_a: l("A"),
            lin_norm: l("norm.weight"),
            lin_out: l("out_proj.weight"),
            shift_norms,
            mla_q_a: a("q_a_proj.weight"),
            mla_q_a_norm: a("q_a_layernorm.weight"),
            mla_q_b: a("q_b_proj.weight"),
            mla_q: a("q_proj.weight"),
            mla_kv_a: a("kv_a_proj_with_mqa.weight"),
            mla_kv_a_norm: a("kv_a_layernorm.weight"),
            mla_kv_b: a("kv_b_proj.weight"),
            mla_k_b: a("k_b_proj.weight"),
            mla_v_b: a("v_b_proj.weight"),
        }
    }

    fn gguf(b: &str, post_attention_norm: bool) -> Self {
        let a = |n: &str| format!("{b}{n}");
        LayerNames {
            attn_norm: a("attn_norm"),
            q: a("attn_q"),
            k: a("attn_k"),
            v: a("attn_v"),
            o: a("attn_output"),
            q_norm: a("attn_q_norm"),
            k_norm: a("attn_k_norm"),
            sinks: a("attn_sinks.weight"),
            ffn_norm: if post_attention_norm {
                a("post_attention_norm")
            } else {
                a("ffn_norm")
            },
            lin_qkv: a("attn_qkv.weight"),
            lin_z: a("attn_gate.weight"),
            lin_b: a("ssm_beta.weight"),
            lin_a_proj: a("ssm_alpha.weight"),
            lin_qkvz: a("ssm_in.weight"),
            lin_ba: a("ssm_ba.weight"),
            lin_conv: a("ssm_conv1d.weight"),
            lin_dt: a("ssm_dt.bias"),
            lin_a_log: None,
            lin_a: a("ssm_a"),
            lin_norm: a("ssm_norm.weight"),
            lin_out: a("ssm_out.weight"),
            // llama.cpp's converter stores 1 + w already.
            shift_norms: false,
            mla_q_a: a("attn_q_a.weight"),
            mla_q_a_norm: a("attn_q_a_norm.weight"),
            mla_q_b: a("attn_q_b.weight"),
            mla_q: a("attn_q.weight"),
            mla_kv_a: a("attn_kv_a_mqa.weight"),
            mla_kv_a_norm: a("attn_kv_a_norm.weight"),
            mla_kv_b: a("attn_kv_b.weight"),
            mla_k_b: a("attn_k_b.weight"),
            mla_v_b: a("attn_v_b.weight"),
        }
    }
}

fn dim(d: usize) -> String {
    if d == 0 {
        "*".into()
    } else {
        d.to_string()
    }
}

/// Drops leading unit dimensions (`[1, H]` router rows stored as 3-D).
fn squeeze(shape: &[usize]) -> Vec<usize> {
    let mut s: Vec<usize> = shape.to_vec();
    while s.len() > 2 && s[0] == 1 {
        s.remove(0);
    }
    s
}

fn check_mlp(m: &Mlp, hidden: usize, what: &str) -> Result<()> {
    let i = m.gate.rows;
    let ok = m.gate.cols == hidden
        && m.up.rows == i
        && m.up.cols == hidden
        && m.down.rows == hidden
        && m.down.cols == i;
    if !ok {
        return Err(Error::Model(format!(
            "{what}: gate {}x{}, up {}x{}, down {}x{} do not form an MLP of width {hidden}",
            m.gate.rows, m.gate.cols, m.up.rows, m.up.cols, m.down.rows, m.down.cols
        )));
    }
    Ok(())
}

impl Model {
    /// Loads an opened model.
    pub fn load(files: ModelFiles) -> Result<Model> {
        let config = Config::from_files(&files)?;
        let (embed, layers, norm, lm_head) = {
            let l = Loader {
                files: &files,
                mlx: MlxConfig::from_hf(files.hf_config()),
                fp8_block: fp8_block(files.hf_config())?,
            };
            if files.gguf().is_some() {
                load_gguf(&l, &config)?
            } else {
                load_hf(&l, &config)?
            }
        };
        check_declared(&files, &config, &layers)?;
        Ok(Model {
            config,
            files,
            embed,
            layers,
            norm,
            lm_head,
        })
    }

    /// Opens and loads the model at `path`.
    pub fn open(path: impl AsRef<std::path::Path>) -> Result<Model> {
        Model::load(ModelFiles::open(path)?)
    }
}

type Parts = (Weight, Vec<Layer>, Vec<f32>, Weight);

/// Feed-forward sizes the metadata declares: (key, value) of the routed
/// experts', the dense layers' and the shared expert's.
struct Declared {
    source: String,
    expert: Option<(String, usize)>,
    dense: Option<(String, usize)>,
    shared: Option<(String, usize)>,
}

fn declared(files: &ModelFiles) -> Declared {
    if let Some(g) = files.gguf() {
        let arch = g
            .get("general.architecture")
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string();
        let key = |k: &str| {
            let k = format!("{arch}.{k}");
            g.get(&k)
                .and_then(|v| v.as_u64())
                .map(|v| (k.clone(), v as usize))
        };
        let expert_key = key("expert_feed_forward_length");
        let ff = key("feed_forward_length");
        return Declared {
            source: files.path.display().to_string(),
            // Without an expert key (llama.cpp's Mixtral), the one length
            // is the experts'.
            dense: if expert_key.is_some() {
                ff.clone()
            } else {
                None
            },
            expert: expert_key.or(ff),
            shared: key("expert_shared_feed_forward_length"),
        };
    }
    let cfg = files.hf_config();
    let text = cfg.and_then(|c| c.get("text_config")).or(cfg);
    let key = |k: &str| {
        text.and_then(|t| t.get(k))
            .and_then(|v| v.as_u64())
            .map(|v| (k.to_string(), v as usize))
    };
    let moe = key("moe_intermediate_size");
    let inter = key("intermediate_size");
    // DeepSeek's shared experts run as one MLP of their summed width.
    let shared = key("shared_expert_intermediate_size").or_else(|| {
        let (n, (_, m)) = (key("n_shared_experts")?, moe.clone()?);
        Some((
            "n_shared_experts × moe_intermediate_size".to_string(),
            n.1 * m,
        ))
    });
    Declared {
        source: files.path.join("config.json").display().to_string(),
        // Mixtral and OLMoE name the experts' size intermediate_size.
        dense: if moe.is_some() { inter.clone() } else { None },
        expert: moe.or(inter),
        shared,
    }
}

/// A configuration that contradicts the tensors is refused, naming both
/// sides: feed-forward sizes, and tensors of layers past the declared count.
fn check_declared(files: &ModelFiles, c: &Config, layers: &[Layer]) -> Result<()> {
    let d = declared(files);
    let check = |want: &Option<(String, usize)>, got: usize, what: &str| -> Result<()> {
        match want {
            Some((k, v)) if *v != got => Err(Error::Model(format!(
                "{} says {k} = {v}, but {what} has {got} rows",
                d.source
            ))),
            _ => Ok(()),
        }
    };
    for (i, l) in layers.iter().enumerate() {
        match &l.ffn {
            Ffn::Moe(m) => {
                for (e, x) in m.experts.iter().enumerate() {
                    check(
                        &d.expert,
                        x.gate.rows,
                        &format!("layer {i} expert {e}'s gate projection"),
                    )?;
                }
                if let Some(s) = &m.shared {
                    check(
                        &d.shared,
                        s.gate.rows,
                        &format!("layer {i}'s shared expert gate projection"),
                    )?;
                }
            }
            Ffn::Dense(m) => check(
                &d.dense,
                m.gate.rows,
                &format!("layer {i}'s dense MLP gate projection"),
            )?,
        }
    }
    // Decoder layers past the declared count (vision towers and MTP heads
    // number their own blocks).
    for t in files.tensors() {
        let n = &t.name;
        if n.contains("visual") || n.contains("vision") || n.contains("mtp") {
            continue;
        }
        for pre in ["layers.", "blk."] {
            let Some(i) = n.find(pre) else { continue };
            let digits: String = n[i + pre.len()..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            if let Ok(k) = digits.parse::<usize>() {
                // Multi-token-prediction layers follow the decoder's.
                if k >= c.n_layers + c.mtp_layers {
                    return Err(Error::Model(format!(
                        "{} says {} layers, but the file holds tensor {n} of layer {k}",
                        d.source, c.n_layers
                    )));
                }
            }
        }
    }
    Ok(())
}

fn attn_dims(c: &Config) -> (usize, usize) {
    (c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim)
}

fn load_hf(l: &Loader, c: &Config) -> Result<Parts> {
    let p = ["model.", "model.language_model.", "language_model.model."]
        .into_iter()
        .find(|p| l.has(&format!("{p}embed_tokens.weight")))
        .ok_or_else(|| Error::Model("no embed_tokens.weight tensor".into()))?;
    let h = c.hidden;
    // Qwen3.5's RMSNorms are zero-centred in Hugging Face files; MLX's
    // converter stores 1 + w, and moves the conv1d kernel axis last-but-one
    // ([C, K, 1] instead of [C, 1, K]), which is how its files are told
    // apart (the rule mlx-lm itself applies).
    let shift = c.arch.is_hybrid() && {
        let conv = c
            .mixers
            .iter()
            .position(|m| *m == Mixer::Linear)
            .and_then(|i| {
                l.files
                    .tensor(&format!("{p}layers.{i}.linear_attn.conv1d.weight"))
            });
        match conv {
            Some(t) => t.shape.last() != Some(&1) || t.shape.len() < 3,
            None => p != "language_model.model.",
        }
    };
    let embed = l.matrix(&format!("{p}embed_tokens.weight"), c.vocab, h)?;
    let mut layers = Vec::with_capacity(c.n_layers);
    for i in 0..c.n_layers {
        let b = format!("{p}layers.{i}.");
        let mlp = |base: &str, names: [&str; 3]| -> Result<Mlp> {
            let m = Mlp {
                gate: l.matrix(&format!("{base}.{}.weight", names[0]), 0, h)?,
                up: l.matrix(&format!("{base}.{}.weight", names[1]), 0, h)?,
                down: l.matrix(&format!("{base}.{}.weight", names[2]), h, 0)?,
            };
            check_mlp(&m, h, base)?;
            Ok(m)
        };
        let ffn = if c.moe_layers[i] && c.arch == Arch::Llama4 {
            // `feed_forward`: a router, experts stacked transposed, gate
            // and up side by side in `gate_up_proj [E, H, 2I]`, and a
            // shared expert.
            let base = format!("{b}feed_forward");
            let ne = c.n_experts;
            let (gu, dn) = (
                format!("{base}.experts.gate_up_proj"),
                format!("{base}.experts.down_proj"),
            );
            let experts = (0..ne)
                .map(|e| {
                    let m = Mlp {
                        gate: l.transposed_stacked(&gu, e, ne, (0, 2), false)?,
                        up: l.transposed_stacked(&gu, e, ne, (1, 2), false)?,
                        down: l.transposed_stacked(&dn, e, ne, (0, 1), false)?,
                    };
                    check_mlp(&m, h, &gu)?;
                    Ok(m)
                })
                .collect::<Result<Vec<_>>>()?;
            Ffn::Moe(Moe {
                router: l.matrix(&format!("{base}.router.weight"), ne, h)?,
                experts,
                shared: Some(mlp(
                    &format!("{base}.shared_expert"),
                    ["gate_proj", "up_proj", "down_proj"],
                )?),
                shared_gate: None,
                score_bias: None,
                router_bias: None,
                biases: None,
            })
        } else if c.moe_layers[i] && c.arch == Arch::GptOss {
            gpt_oss_moe(l, c, &format!("{b}mlp"))?
        } else if c.arch == Arch::Llama4 {
            Ffn::Dense(mlp(
                &format!("{b}feed_forward"),
                ["gate_proj", "up_proj", "down_proj"],
            )?)
        } else if c.moe_layers[i] {
            let base = ["mlp", "block_sparse_moe"]
                .into_iter()
                .map(|m| format!("{b}{m}"))
                .find(|m| l.has(&format!("{m}.gate.weight")))
                .ok_or_else(|| {
                    Error::Model(format!("layer {i}: no router ({b}mlp.gate.weight)"))
                })?;
            let router = l.matrix(&format!("{base}.gate.weight"), c.n_experts, h)?;
            let ne = c.n_experts;
            let experts = if l.has(&format!("{base}.switch_mlp.gate_proj.weight")) {
                // MLX: experts stacked per layer, `[E, rows, cols]` each.
                l.stacked_experts(|k| format!("{base}.switch_mlp.{k}_proj.weight"), ne, h)?
            } else if l.has(&format!("{base}.experts.gate_up_proj")) {
                let gu = format!("{base}.experts.gate_up_proj");
                let dn = format!("{base}.experts.down_proj");
                (0..ne)
                    .map(|e| {
                        let m = Mlp {
                            gate: l.stacked(&gu, e, ne, (0, 2))?,
                            up: l.stacked(&gu, e, ne, (1, 2))?,
                            down: l.stacked(&dn, e, ne, (0, 1))?,
                        };
                        check_mlp(&m, h, &gu)?;
                        Ok(m)
                    })
                    .collect::<Result<Vec<_>>>()?
            } else {
                let names = if l.has(&format!("{base}.experts.0.w1.weight")) {
                    ["w1", "w3", "w2"]
                } else {
                    ["gate_proj", "up_proj", "down_proj"]
                };
                (0..ne)
                    .map(|e| mlp(&format!("{base}.experts.{e}"), names))
                    .collect::<Result<Vec<_>>>()?
            };
            // Qwen's `shared_expert`, DeepSeek's `shared_experts` (several
            // fused into one wider MLP).
            let shared = match ["shared_expert", "shared_experts"]
                .into_iter()
                .map(|s| format!("{b}mlp.{s}"))
                .find(|s| l.has(&format!("{s}.gate_proj.weight")))
            {
                Some(s) => Some(mlp(&s, ["gate_proj", "up_proj", "down_proj"])?),
                None => None,
            };
            let shared_gate = l.opt_matrix(&format!("{b}mlp.shared_expert_gate.weight"), 1, h)?;
            let score_bias = l.opt_vector(&format!("{base}.gate.e_score_correction_bias"), ne)?;
            Ffn::Moe(Moe {
                router,
                experts,
                shared,
                shared_gate,
                score_bias,
                router_bias: None,
                biases: None,
            })
        } else {
            Ffn::Dense(mlp(
                &format!("{b}mlp"),
                ["gate_proj", "up_proj", "down_proj"],
            )?)
        };
        layers.push(l.layer(c, i, &LayerNames::hf(&b, shift), ffn)?);
    }
    let mut norm = l.vector(&format!("{p}norm.weight"), h)?;
    if shift {
        norm.iter_mut().for_each(|x| *x += 1.0);
    }
    // MLX keeps the head beside its model: `language_model.lm_head`.
    let head = if p == "language_model.model." {
        "language_model.lm_head.weight"
    } else {
        "lm_head.weight"
    };
    let lm_head = match l.opt_matrix(head, c.vocab, h)? {
        Some(w) if !c.tie_embeddings => w,
        _ => embed.clone(),
    };
    Ok((embed, layers, norm, lm_head))
}

fn load_gguf(l: &Loader, c: &Config) -> Result<Parts> {
    let h = c.hidden;
    let embed = l.matrix("token_embd.weight", c.vocab, h)?;
    let mut layers = Vec::with_capacity(c.n_layers);
    for i in 0..c.n_layers {
        let b = format!("blk.{i}.");
        let mlp = |suffix: &str| -> Result<Mlp> {
            let m = Mlp {
                gate: l.matrix(&format!("{b}ffn_gate{suffix}.weight"), 0, h)?,
                up: l.matrix(&format!("{b}ffn_up{suffix}.weight"), 0, h)?,
                down: l.matrix(&format!("{b}ffn_down{suffix}.weight"), h, 0)?,
            };
            check_mlp(&m, h, &format!("{b}ffn{suffix}"))?;
            Ok(m)
        };
        let ffn = if c.moe_layers[i] {
            let ne = c.n_experts;
            let router = l.matrix(&format!("{b}ffn_gate_inp.weight"), ne, h)?;
            let experts = if l.has(&format!("{b}ffn_gate_exps.weight")) {
                l.stacked_experts(|k| format!("{b}ffn_{k}_exps.weight"), ne, h)?
            } else {
                // Older files: one tensor per expert, `ffn_gate.E.weight`.
                (0..ne)
                    .map(|e| mlp(&format!(".{e}")))
                    .collect::<Result<Vec<_>>>()?
            };
            let shared = if l.has(&format!("{b}ffn_gate_shexp.weight")) {
                Some(mlp("_shexp")?)
            } else {
                None
            };
            let sg = format!("{b}ffn_gate_inp_shexp.weight");
            let shared_gate = if l.has(&sg) {
                let v = l.vector(&sg, h)?;
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                Some(Weight {
                    dtype: DType::F32,
                    rows: 1,
                    cols: h,
                    file: 0,
                    data: TensorBytes::from_vec(bytes),
                    aux: Vec::new(),
                    block_row0: 0,
                    id: sluice_core::fresh_weight_id(),
                })
            } else {
                None
            };
            let biases = expert_biases(l, &b, c, experts.first().map_or(0, |m| m.gate.rows))?;
            Ffn::Moe(Moe {
                router,
                experts,
                shared,
                shared_gate,
                score_bias: l.opt_vector(&format!("{b}exp_probs_b.bias"), ne)?,
                router_bias: l.opt_vector(&format!("{b}ffn_gate_inp.bias"), ne)?,
                biases,
            })
        } else {
            Ffn::Dense(mlp("")?)
        };
        layers.push(l.layer(
            c,
            i,
            &LayerNames::gguf(
                &b,
                c.arch.is_hybrid() || matches!(c.arch, Arch::Glm4Moe | Arch::GptOss),
            ),
            ffn,
        )?);
    }
    let norm = l.vector("output_norm.weight", h)?;
    let lm_head = match l.opt_matrix("output.weight", c.vocab, h)? {
        Some(w) => w,
        None => embed.clone(),
    };
    Ok((embed, layers, norm, lm_head))
}

/// gpt-oss's experts from a Hugging Face file: a biased router, experts
/// stacked transposed with gate and up columns interleaved in
/// `gate_up_proj [E, H, 2I]`, their biases beside them.
fn gpt_oss_moe(l: &Loader, c: &Config, base: &str) -> Result<Ffn> {
    let (ne, h) = (c.n_experts, c.hidden);
    let (gu, dn) = (
        format!("{base}.experts.gate_up_proj"),
        format!("{base}.experts.down_proj"),
    );
    // The published checkpoints keep the experts in MXFP4, not transposed.
    let mxfp4 = l.has(&format!("{gu}_blocks"));
    let experts = (0..ne)
        .map(|e| {
            let m = if mxfp4 {
                Mlp {
                    gate: l.mxfp4_stacked(&gu, e, ne, (0, 2))?,
                    up: l.mxfp4_stacked(&gu, e, ne, (1, 2))?,
                    down: l.mxfp4_stacked(&dn, e, ne, (0, 1))?,
                }
            } else {
                Mlp {
                    gate: l.transposed_stacked(&gu, e, ne, (0, 2), true)?,
                    up: l.transposed_stacked(&gu, e, ne, (1, 2), true)?,
                    down: l.transposed_stacked(&dn, e, ne, (0, 1), false)?,
                }
            };
            check_mlp(&m, h, &gu)?;
            Ok(m)
        })
        .collect::<Result<Vec<_>>>()?;
    let inter = experts.first().map_or(0, |m| m.gate.rows);
    let biases = match l.opt_vector(&format!("{gu}_bias"), ne * 2 * inter)? {
        Some(gu_b) => {
            // Interleaved like the columns: gate at even places, up at odd.
            let (gate, up) = gu_b.chunks_exact(2).map(|p| (p[0], p[1])).unzip();
            let down = l.vector(&format!("{dn}_bias"), ne * h)?;
            Some(ExpertBiases {
                experts: ne,
                gate,
                up,
                down,
            })
        }
        None => None,
    };
    Ok(Ffn::Moe(Moe {
        router: l.matrix(&format!("{base}.router.weight"), ne, h)?,
        experts,
        shared: None,
        shared_gate: None,
        score_bias: None,
        router_bias: l.opt_vector(&format!("{base}.router.bias"), ne)?,
        biases,
    }))
}

/// llama.cpp's per-expert biases of layer prefix `b`
/// (`ffn_{gate,up,down}_exps.bias`, experts `inter` wide): all three or
/// none.
fn expert_biases(l: &Loader, b: &str, c: &Config, inter: usize) -> Result<Option<ExpertBiases>> {
    let ne = c.n_experts;
    let name = |k: &str| format!("{b}ffn_{k}_exps.bias");
    let present = ["gate", "up", "down"].map(|k| l.has(&name(k)));
    if present == [false; 3] {
        return Ok(None);
    }
    if present != [true; 3] {
        return Err(Error::Model(format!(
            "{b}: expert biases of gate, up, down present: {present:?} (needs all three or none)"
        )));
    }
    Ok(Some(ExpertBiases {
        experts: ne,
        gate: l.vector(&name("gate"), ne * inter)?,
        up: l.vector(&name("up"), ne * inter)?,
        down: l.vector(&name("down"), ne * c.hidden)?,
    }))
}
