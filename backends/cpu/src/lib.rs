//! The CPU compute backend.
//!
//! Matrix products are split by output rows over a persistent thread pool
//! (`pool.rs`; the caller takes part). Quantized weights are multiplied by
//! default with activations quantized to 8 bits per 32 values, dequantization
//! fused into integer dot products (`kernels/`), as llama.cpp does; this
//! changes the output within a bound the oracle tests hold
//! (1e-2 × max|logit| of transformers on the dequantized weights) and is
//! announced where sluice reports its configuration.
//! [`Activations::F32`] keeps the exact path: weights dequantized exactly,
//! products in f32 (1e-3 bound). F32/F16/BF16 weights always take the f32
//! path. Kernels are compiled for AVX-512, AVX2, NEON and portable Rust,
//! picked at run time. Every kernel computes a row from that row's bytes
//! alone, so results do not depend on the thread split or on where the
//! weights live (streamed experts give bit-identical output).

pub mod act;
pub mod kernels;
mod pool;

use act::QAct;
pub use kernels::Isa;
use kernels::Out;
use sluice_core::{ops, AttnParams, Backend, Error, Result, WeightView};
use std::cell::RefCell;

/// How quantized weights meet the activations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Activations {
    /// 8-bit codes plus an 8-bit residual per 32 values: integer dot
    /// products equal to those with 16-bit activations (the default;
    /// within 1e-3 × max|logit| of the exact path on every fixture).
    #[default]
    Q16,
    /// 8-bit codes per 32 values, as llama.cpp quantizes its activations:
    /// the fastest, but on the oracle models it moves logits by several
    /// percent and changes routing choices (docs/BENCHMARKS.md).
    Q8,
    /// Kept in f32 against exactly dequantized weights (the reference).
    F32,
}

impl Activations {
    /// Every mode.
    pub const ALL: [Activations; 3] = [Activations::Q16, Activations::Q8, Activations::F32];

    /// Name on the command line and in reports.
    pub const fn name(self) -> &'static str {
        match self {
            Activations::Q16 => "q16",
            Activations::Q8 => "q8",
            Activations::F32 => "f32",
        }
    }

    /// Parses `q16`, `q8` or `f32`.
    pub fn parse(s: &str) -> Option<Activations> {
        Activations::ALL
            .into_iter()
            .find(|a| a.name().eq_ignore_ascii_case(s))
    }

    /// Whether quantized weights take the integer kernels.
    const fn integer(self) -> bool {
        !matches!(self, Activations::F32)
    }
}

/// Options of [`CpuBackend::with_options`].
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuOptions {
    /// Threads (the caller included); all cores when `None`.
    pub threads: Option<usize>,
    /// Activation precision for quantized weights.
    pub activations: Activations,
    /// Instruction set; the best the CPU has when `None` (or
    /// `SLUICE_CPU_ISA`, when set).
    pub isa: Option<Isa>,
}

/// Multithreaded CPU backend.
pub struct CpuBackend {
    pool: pool::Pool,
    isa: Isa,
    activations: Activations,
}

thread_local! {
    /// The calling thread's quantized activations, reused across calls.
    static ACT: RefCell<QAct> = RefCell::new(QAct::default());
}

/// Bytes of weights below which a product runs on the calling thread
/// alone: waking the pool costs more than it saves.
const SERIAL_BYTES: usize = 32 << 10;

impl CpuBackend {
    /// A backend with `threads` threads (all cores when `None`) and the
    /// default options.
    pub fn new(threads: Option<usize>) -> Result<Self> {
        Self::with_options(CpuOptions {
            threads,
            ..CpuOptions::default()
        })
    }

    /// A backend with explicit options.
    pub fn with_options(o: CpuOptions) -> Result<Self> {
        let threads = o
            .threads
            .filter(|&t| t > 0)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        let isa = match o.isa {
            Some(i) => i,
            None => match std::env::var("SLUICE_CPU_ISA") {
                Ok(v) => Isa::parse(&v).ok_or_else(|| Error::UnknownName {
                    what: "instruction set in SLUICE_CPU_ISA",
                    name: v.clone(),
                    known: Isa::ALL.map(Isa::name).join(", "),
                })?,
                Err(_) => Isa::detect(),
            },
        };
        if !isa.supported() {
            return Err(Error::Unsupported(format!(
                "the {} kernels on this CPU (it runs: {})",
                isa.name(),
                Isa::available()
                    .iter()
                    .map(|i| i.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let pool = pool::Pool::new(threads)
            .map_err(|e| Error::Invalid(format!("cannot start {threads} CPU threads: {e}")))?;
        Ok(CpuBackend {
            pool,
            isa,
            activations: o.activations,
        })
    }

    /// Threads (the caller included).
    pub fn threads(&self) -> usize {
        self.pool.threads()
    }

    /// The instruction set of the kernels in use.
    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// The instruction set's name (for reports).
    pub fn simd(&self) -> &'static str {
        self.isa.name()
    }

    /// Activation precision for quantized weights.
    pub fn activations(&self) -> Activations {
        self.activations
    }

    /// Runs `f(0..tasks)` on the backend's threads (the caller included),
    /// each index once; for embedders' own parallel work and for measuring
    /// the cost of a dispatch.
    pub fn parallel(&self, tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        self.pool.run(tasks, f)
    }

    /// Runs `f(r0, r1)` over row ranges covering `0..rows`, on the pool
    /// when the work is large enough.
    fn split(&self, rows: usize, bytes: usize, f: &(dyn Fn(usize, usize) + Sync)) {
        let threads = self.threads();
        if threads == 1 || bytes < SERIAL_BYTES || rows < 2 {
            return f(0, rows);
        }
        // Four tasks per thread balance a thread the OS delays.
        let per = rows.div_ceil(threads * 4).max(1);
        let tasks = rows.div_ceil(per);
        self.pool
            .run(tasks, &|i| f(i * per, ((i + 1) * per).min(rows)));
    }

    /// `y = w·x` into `out`, shapes checked by the caller.
    fn product(&self, w: &WeightView<'_>, x: &[f32], n: usize, y: &mut [f32]) {
        let out = Out::new(y, w.rows);
        let bytes = (w.data.len() + w.scales.len() + w.biases.len()) * n.min(4);
        if kernels::integer(w.dtype) && self.activations.integer() {
            ACT.with(|a| {
                let mut a = a.borrow_mut();
                let residual = self.activations == Activations::Q16;
                a.quantize(
                    x,
                    n,
                    w.cols,
                    kernels::q8_layout(self.isa, w.dtype, residual),
                    residual,
                    self.isa,
                );
                let a = &*a;
                self.split(w.rows, bytes, &|r0, r1| {
                    kernels::q8_tile(self.isa, w, r0, r1, a, out)
                });
            })
        } else {
            self.split(w.rows, bytes, &|r0, r1| {
                kernels::f32_tile(self.isa, w, r0, r1, x, n, out)
            });
        }
    }
}

fn check(w: &WeightView<'_>, x: &[f32], n: usize, y: &[f32]) -> Result<()> {
    let (rows, cols) = (w.rows, w.cols);
    if x.len() != n * cols || y.len() != n * rows {
        return Err(Error::Invalid(format!(
            "matmul shapes: w {rows}x{cols}, x {} (n={n}), y {}",
            x.len(),
            y.len()
        )));
    }
    // Checks every length, so the kernels cannot read out of bounds.
    w.check()
}

impl Backend for CpuBackend {
    fn name(&self) -> &str {
        "cpu"
    }

    fn matmul(&self, w: WeightView<'_>, x: &[f32], n: usize, y: &mut [f32]) -> Result<()> {
        check(&w, x, n, y)?;
        if w.rows == 0 || n == 0 {
            return Ok(());
        }
        self.product(&w, x, n, y);
        Ok(())
    }

    /// Gate and up in one dispatch, each task applying SwiGLU to the rows
    /// it computed; then down.
    fn mlp(&self, w: [WeightView<'_>; 3], x: &[f32], n: usize, y: &mut [f32]) -> Result<()> {
        let [gate, up, down] = w;
        let i = gate.rows;
        if up.rows != i || up.cols != gate.cols || up.dtype != gate.dtype || down.cols != i {
            return Err(Error::Invalid(format!(
                "mlp shapes: gate {}x{} {}, up {}x{} {}, down {}x{}",
                gate.rows, gate.cols, gate.dtype, up.rows, up.cols, up.dtype, down.rows, down.cols
            )));
        }
        let mut g = vec![0f32; n * i];
        let mut u = vec![0f32; n * i];
        check(&gate, x, n, &g)?;
        check(&up, x, n, &u)?;
        check(&down, &g, n, y)?;
        if n == 0 || i == 0 {
            y.iter_mut().for_each(|v| *v = 0.0);
            return Ok(());
        }
        let (go, uo) = (Out::new(&mut g, i), Out::new(&mut u, i));
        let bytes = 2 * (gate.data.len() + gate.scales.len() + gate.biases.len()) * n.min(4);
        let both = |a: Option<&QAct>, r0: usize, r1: usize| {
            for (w, o) in [(&gate, go), (&up, uo)] {
                match a {
                    Some(a) => kernels::q8_tile(self.isa, w, r0, r1, a, o),
                    None => kernels::f32_tile(self.isa, w, r0, r1, x, n, o),
                }
            }
            for t in 0..n {
                for r in r0..r1 {
                    // SAFETY: this task owns rows r0..r1 of both outputs,
                    // which it has just written.
                    unsafe { go.swiglu(uo, t, r) };
                }
            }
        };
        if kernels::integer(gate.dtype) && kernels::integer(up.dtype) && self.activations.integer()
        {
            ACT.with(|a| {
                let mut a = a.borrow_mut();
                let residual = self.activations == Activations::Q16;
                a.quantize(
                    x,
                    n,
                    gate.cols,
                    kernels::q8_layout(self.isa, gate.dtype, residual),
                    residual,
                    self.isa,
                );
                let a = &*a;
                self.split(i, bytes, &|r0, r1| both(Some(a), r0, r1));
            })
        } else {
            self.split(i, bytes, &|r0, r1| both(None, r0, r1));
        }
        self.product(&down, &g, n, y);
        Ok(())
    }

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
        let d = p.head_dim;
        let heads = n * p.n_heads;
        if out.len() != heads * d || q.len() != heads * d {
            return Err(Error::Invalid(format!(
                "attention shapes: q {}, out {}, {n} rows of {} heads of {d}",
                q.len(),
                out.len(),
                p.n_heads
            )));
        }
        let o = Out::new(out, heads * d);
        let run = |h0: usize, h1: usize| {
            let mut scores = Vec::new();
            let mut row = vec![0f32; d];
            for i in h0..h1 {
                let (t, h) = (i / p.n_heads, i % p.n_heads);
                ops::attend_head(
                    &q[i * d..i * d + d],
                    k,
                    v,
                    pos0 + t,
                    h,
                    p,
                    &mut scores,
                    &mut row,
                );
                for (j, x) in row.iter().enumerate() {
                    // SAFETY: this task owns heads h0..h1, i.e. elements
                    // h0·d..h1·d of the one-row output.
                    unsafe { o.put(0, i * d + j, *x) };
                }
            }
        };
        // A head's work is its span of the KV cache.
        let bytes = heads * (pos0 + n) * d * 8;
        self.split(heads, bytes, &run);
        Ok(())
    }
}

/// Reference product for tests: dequantize the whole matrix, then f64 sums.
#[cfg(test)]
use sluice_core::{quant, DType};

#[cfg(test)]
fn reference_matmul(w: WeightView<'_>, x: &[f32], n: usize) -> Result<Vec<f32>> {
    let mut wf = vec![0f32; w.rows * w.cols];
    if let DType::FP8(_) = w.dtype {
        for (r, out) in wf.chunks_exact_mut(w.cols).enumerate() {
            w.row_into(r, out);
        }
    } else if let DType::Mlx(q) = w.dtype {
        let (rb, ab) = (w.row_bytes(), q.aux_row_bytes(w.cols));
        for (r, out) in wf.chunks_exact_mut(w.cols).enumerate() {
            quant::dequantize_mlx(
                q,
                &w.data[r * rb..(r + 1) * rb],
                &w.scales[r * ab..(r + 1) * ab],
                &w.biases[r * ab..(r + 1) * ab],
                out,
            )?;
        }
    } else {
        quant::dequantize(w.dtype, w.data, &mut wf)?;
    }
    let mut y = vec![0f32; n * w.rows];
    for t in 0..n {
        for r in 0..w.rows {
            let mut s = 0f64;
            for c in 0..w.cols {
                s += wf[r * w.cols + c] as f64 * x[t * w.cols + c] as f64;
            }
            y[t * w.rows + r] = s as f32;
        }
    }
    Ok(y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use sluice_core::{fp8, Fp8Block, Fp8Scale, HalfType, MlxQuant};

    /// Every quantized type sluice reads, MLX widths and groups included.
    fn all_types() -> Vec<DType> {
        let mut v: Vec<DType> = DType::ALL.to_vec();
        for bits in [2, 3, 4, 5, 6, 8] {
            for (g, s) in [
                (32, HalfType::F16),
                (64, HalfType::Bf16),
                (128, HalfType::F32),
            ] {
                v.push(DType::Mlx(MlxQuant::new(bits, g, s).unwrap()));
            }
        }
        // FP8 tiles whole, partial (48 columns) and of single rows.
        for (br, bc, s) in [
            (4, 32, Fp8Scale::F32),
            (3, 48, Fp8Scale::F16),
            (1, 128, Fp8Scale::E8M0),
        ] {
            v.push(DType::FP8(Fp8Block::new(br, bc, s).unwrap()));
        }
        v
    }

    /// A random `rows × cols` matrix of `dt` (bytes, scales, biases).
    fn random_matrix(
        dt: DType,
        rows: usize,
        cols: usize,
        seed: u64,
    ) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
        match dt {
            DType::Mlx(q) => {
                let f = floats(rows * cols, seed);
                let (mut p, mut s, mut b) = (Vec::new(), Vec::new(), Vec::new());
                for row in f.chunks_exact(cols) {
                    quant::quantize_mlx(q, row, &mut p, &mut s, &mut b).unwrap();
                }
                (p, s, b)
            }
            DType::FP8(q) => {
                let (c, s) = fp8::quantize(q, &floats(rows * cols, seed), rows, cols).unwrap();
                (c, s, Vec::new())
            }
            _ => (
                quant::random_tensor_bytes(dt, rows * cols, seed, 1.0),
                Vec::new(),
                Vec::new(),
            ),
        }
    }

    fn floats(n: usize, seed: u64) -> Vec<f32> {
        quant::random_tensor_bytes(DType::F32, n, seed, 1.0)
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    fn backend(isa: Isa, activations: Activations, threads: usize) -> CpuBackend {
        CpuBackend::with_options(CpuOptions {
            threads: Some(threads),
            activations,
            isa: Some(isa),
        })
        .unwrap()
    }

    /// The dequantized weights, row-major.
    fn dequantized(w: &WeightView<'_>) -> Vec<f32> {
        let mut wf = vec![0f32; w.rows * w.cols];
        for (r, out) in wf.chunks_exact_mut(w.cols).enumerate() {
            w.row_into(r, out);
        }
        wf
    }

    /// Per output: Σ |w·x| (the scale of float rounding) and the bound of
    /// 8-bit activations (Σ over units of half a step times Σ |w|).
    fn bounds(wf: &[f32], x: &[f32], rows: usize, cols: usize, n: usize) -> (Vec<f32>, Vec<f32>) {
        let (mut mag, mut q8) = (vec![0f32; n * rows], vec![0f32; n * rows]);
        for t in 0..n {
            let xr = &x[t * cols..(t + 1) * cols];
            for r in 0..rows {
                let wr = &wf[r * cols..(r + 1) * cols];
                let (mut m, mut b) = (0f32, 0f32);
                for u in 0..cols / 32 {
                    let span = u * 32..(u + 1) * 32;
                    let amax = xr[span.clone()].iter().fold(0f32, |a, v| a.max(v.abs()));
                    let wsum: f32 = wr[span.clone()].iter().map(|v| v.abs()).sum();
                    b += 0.5 * amax / 127.0 * wsum;
                    m += wr[span.clone()]
                        .iter()
                        .zip(&xr[span])
                        .map(|(a, b)| (a * b).abs())
                        .sum::<f32>();
                }
                mag[t * rows + r] = m;
                q8[t * rows + r] = b;
            }
        }
        (mag, q8)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Every type, every instruction set this CPU has, both activation
        /// precisions, any shape, batch and thread count: the exact path
        /// equals dequantize-then-f64 within float rounding; the 8-bit path
        /// stays within the activations' quantization bound and equals the
        /// portable 8-bit kernel up to float rounding.
        #[test]
        fn matmul_matches_reference_on_every_isa(
            ti in 0usize..40,
            rows in 1usize..24,
            blocks in 1usize..4,
            n in 1usize..7,
            seed in any::<u64>(),
            threads in 1usize..4,
        ) {
            let types = all_types();
            let dt = types[ti % types.len()];
            let cols = blocks * dt.block_size().max(32);
            let (d, s, b) = random_matrix(dt, rows, cols, seed);
            let w = WeightView::with_aux(dt, rows, cols, &d, &s, &b).unwrap();
            let x = floats(n * cols, seed ^ 1);
            let r = reference_matmul(w, &x, n).unwrap();
            let (mag, q8) = bounds(&dequantized(&w), &x, rows, cols, n);
            for act in Activations::ALL {
                let mut portable = vec![0f32; n * rows];
                backend(Isa::Scalar, act, 1).matmul(w, &x, n, &mut portable).unwrap();
                for isa in Isa::available() {
                    let mut y = vec![0f32; n * rows];
                    backend(isa, act, threads).matmul(w, &x, n, &mut y).unwrap();
                    for i in 0..y.len() {
                        let tol = 2e-6 * mag[i] * (cols as f32).sqrt() + 1e-6;
                        let what = format!("{dt} {rows}x{cols} n={n} {} {}", isa.name(), act.name());
                        // The residual plane divides the 8-bit bound by 256.
                        let bound = match act {
                            _ if !dt.is_quantized() => 0.0,
                            Activations::F32 => 0.0,
                            Activations::Q8 => q8[i] * 1.01,
                            Activations::Q16 => q8[i] / 256.0 * 1.01,
                        };
                        prop_assert!((y[i] - r[i]).abs() <= bound + tol, "{what}: {} vs {} (bound {})", y[i], r[i], bound);
                        prop_assert!((y[i] - portable[i]).abs() <= tol, "{what}: {} vs portable {}", y[i], portable[i]);
                    }
                }
            }
        }

        /// The fused MLP equals gate, up, SwiGLU and down run one by one.
        #[test]
        fn fused_mlp_equals_separate_products(
            ti in 0usize..40,
            inter in 1usize..3,
            n in 1usize..5,
            seed in any::<u64>(),
        ) {
            let types = all_types();
            let dt = types[ti % types.len()];
            let (h, i) = (dt.block_size().max(32) * 2, dt.block_size().max(32) * inter);
            let g = random_matrix(dt, i, h, seed);
            let u = random_matrix(dt, i, h, seed ^ 2);
            let dn = random_matrix(dt, h, i, seed ^ 3);
            fn view(dt: DType, m: &(Vec<u8>, Vec<u8>, Vec<u8>), r: usize, c: usize) -> WeightView<'_> {
                WeightView::with_aux(dt, r, c, &m.0, &m.1, &m.2).unwrap()
            }
            let ws = [view(dt, &g, i, h), view(dt, &u, i, h), view(dt, &dn, h, i)];
            let x = floats(n * h, seed ^ 4);
            for (isa, act) in Isa::available().into_iter().flat_map(|i| Activations::ALL.map(|a| (i, a))) {
                let be = backend(isa, act, 2);
                let mut fused = vec![0f32; n * h];
                be.mlp(ws, &x, n, &mut fused).unwrap();
                let (mut a, mut b) = (vec![0f32; n * i], vec![0f32; n * i]);
                be.matmul(ws[0], &x, n, &mut a).unwrap();
                be.matmul(ws[1], &x, n, &mut b).unwrap();
                ops::swiglu(&mut a, &b);
                let mut sep = vec![0f32; n * h];
                be.matmul(ws[2], &a, n, &mut sep).unwrap();
                prop_assert_eq!(&fused, &sep, "{} {} {}", dt, isa.name(), act.name());
            }
        }
    }

    /// The thread split does not change a single bit of the result.
    #[test]
    fn results_do_not_depend_on_threads() {
        for dt in [DType::Q4_0, DType::Q4_K, DType::Q6_K, DType::F16] {
            let (rows, cols) = (300, 1024);
            let (d, s, b) = random_matrix(dt, rows, cols, 5);
            let w = WeightView::with_aux(dt, rows, cols, &d, &s, &b).unwrap();
            let x = floats(3 * cols, 6);
            for isa in Isa::available() {
                let mut first = None;
                for threads in 1..5 {
                    let mut y = vec![0f32; 3 * rows];
                    backend(isa, Activations::Q16, threads)
                        .matmul(w, &x, 3, &mut y)
                        .unwrap();
                    match &first {
                        None => first = Some(y),
                        Some(f) => assert_eq!(f, &y, "{dt} {} {threads} threads", isa.name()),
                    }
                }
            }
        }
    }

    /// A view of some rows of an FP8 matrix, starting mid-tile, takes the
    /// scales of its own rows (MLA's per-head slices of `kv_b_proj`).
    #[test]
    fn fp8_row_views_keep_their_scales() {
        let dt = DType::FP8(Fp8Block::new(4, 32, Fp8Scale::Bf16).unwrap());
        let (rows, cols) = (19, 96);
        let (d, s, _) = random_matrix(dt, rows, cols, 11);
        let w = WeightView::with_aux(dt, rows, cols, &d, &s, &[]).unwrap();
        let x = floats(2 * cols, 12);
        let be = backend(Isa::detect(), Activations::Q16, 2);
        let mut full = vec![0f32; 2 * rows];
        be.matmul(w, &x, 2, &mut full).unwrap();
        for (r0, n) in [(0, 19), (3, 7), (5, 1), (6, 13), (18, 1)] {
            let v = w.rows(r0, n);
            let mut y = vec![0f32; 2 * n];
            be.matmul(v, &x, 2, &mut y).unwrap();
            for t in 0..2 {
                assert_eq!(
                    y[t * n..(t + 1) * n],
                    full[t * rows + r0..t * rows + r0 + n]
                );
            }
            // Nested views agree too.
            if n > 2 {
                let inner = v.rows(1, n - 2);
                let mut z = vec![0f32; 2 * (n - 2)];
                be.matmul(inner, &x, 2, &mut z).unwrap();
                assert_eq!(z[..n - 2], full[r0 + 1..r0 + n - 1]);
            }
        }
        // A grid one line short is refused, not read past.
        let short = WeightView::with_aux(dt, rows, cols, &d, &s[..s.len() - 6], &[]);
        assert!(short.is_err());
    }

    /// MXFP4's integer kernels on every instruction set, with subnormal and
    /// large block exponents, stay within the activations' bound of the
    /// exact products.
    #[test]
    fn mxfp4_integer_kernels_match_exact() {
        let (rows, cols, n) = (37, 256, 3);
        let mut d = quant::random_tensor_bytes(DType::MXFP4, rows * cols, 5, 1.0);
        for (i, e) in [0u8, 1, 2, 3, 200, 127].into_iter().enumerate() {
            d[i * 17 * 9] = e;
        }
        let w = WeightView::new(DType::MXFP4, rows, cols, &d).unwrap();
        let x = floats(n * cols, 9);
        let r = reference_matmul(w, &x, n).unwrap();
        let (mag, q8) = bounds(&dequantized(&w), &x, rows, cols, n);
        for isa in Isa::available() {
            for act in [Activations::Q16, Activations::Q8] {
                let mut y = vec![0f32; n * rows];
                backend(isa, act, 2).matmul(w, &x, n, &mut y).unwrap();
                for i in 0..y.len() {
                    let bound = if act == Activations::Q8 {
                        q8[i]
                    } else {
                        q8[i] / 256.0
                    };
                    let tol = bound * 1.01 + 2e-6 * mag[i] * (cols as f32).sqrt() + 1e-30;
                    assert!(
                        (y[i] - r[i]).abs() <= tol,
                        "{} {}: {} vs {} (bound {tol})",
                        isa.name(),
                        act.name(),
                        y[i],
                        r[i]
                    );
                }
            }
        }
    }

    /// Subnormal and NaN codes, a partial last tile and scales whose
    /// 256-fold overflows give every instruction set the same products.
    #[test]
    fn fp8_edge_codes_agree_across_isas() {
        let q = Fp8Block::new(2, 32, Fp8Scale::F32).unwrap();
        let (rows, cols) = (6, 80);
        let mut d: Vec<u8> = (0..rows * cols).map(|i| (i * 37 % 251) as u8).collect();
        for (i, c) in d.iter_mut().enumerate() {
            // NaN codes only in row 5; the others finite (0x7f -> 0x7e).
            if *c & 0x7f == 0x7f && i / cols != 5 {
                *c -= 1;
            }
        }
        d[5 * cols + 3] = 0x7f;
        let scales: Vec<f32> = vec![1e-3, 2.5e-2, 7.0, 1e-40, 1e38, 3e-3, 0.5, 1.0, 2.0];
        let s: Vec<u8> = scales.iter().flat_map(|v| v.to_le_bytes()).collect();
        let w = WeightView::with_aux(DType::FP8(q), rows, cols, &d, &s, &[]).unwrap();
        let x = floats(cols, 3);
        let want = reference_matmul(w, &x, 1).unwrap();
        for isa in Isa::available() {
            let mut y = vec![0f32; rows];
            backend(isa, Activations::Q16, 1)
                .matmul(w, &x, 1, &mut y)
                .unwrap();
            for r in 0..rows {
                let tol = 1e-5 * want[r].abs() + 1e-30;
                let same = (y[r] - want[r]).abs() <= tol
                    || (y[r].is_nan() && want[r].is_nan())
                    || y[r] == want[r];
                assert!(same, "{} row {r}: {} vs {}", isa.name(), y[r], want[r]);
            }
            assert!(y[5].is_nan() && !y[4].is_nan(), "{}", isa.name());
        }
    }

    #[test]
    fn matmul_rejects_bad_shapes() {
        let be = CpuBackend::new(Some(1)).unwrap();
        let data = vec![0u8; 2 * 32 * 4];
        let w = WeightView::new(DType::F32, 2, 32, &data).unwrap();
        let mut y = vec![0.0; 2];
        assert!(be.matmul(w, &[0.0; 31], 1, &mut y).is_err());
        assert!(WeightView::new(DType::Q8_0, 2, 32, &data).is_err());
    }

    #[test]
    fn an_isa_this_cpu_lacks_is_refused() {
        for isa in Isa::ALL {
            let r = CpuBackend::with_options(CpuOptions {
                threads: Some(1),
                isa: Some(isa),
                ..CpuOptions::default()
            });
            assert_eq!(r.is_ok(), isa.supported(), "{}", isa.name());
        }
    }

    #[test]
    fn parallel_attention_equals_reference() {
        let p = AttnParams {
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 8,
            scale: 0.3,
            window: None,
            chunk: None,
            sinks: Some(&[0.5, -1.0, 2.0, 0.0]),
        };
        let n = 40;
        let (q, k, v) = (floats(n * 32, 1), floats(n * 16, 2), floats(n * 16, 3));
        let mut a = vec![0.0; n * 32];
        let mut b = vec![0.0; n * 32];
        CpuBackend::new(Some(2))
            .unwrap()
            .attention(&q, &k, &v, n, 0, &p, &mut a)
            .unwrap();
        ops::attention(&q, &k, &v, n, 0, &p, &mut b);
        assert_eq!(a, b);
    }
}
