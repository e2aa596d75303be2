//! The CPU compute backend.
//!
//! Matrix products run on a rayon pool, split by output rows. Each worker
//! dequantizes one weight row into an f32 scratch buffer and dots it with
//! every input row, so a row's dequantization is paid once per batch (the
//! prompt) and the result equals dequantize-then-f32-matmul, which is what
//! the oracle tests assert. The dot product is compiled twice, portable and
//! with AVX2, and picked at start-up.

use rayon::prelude::*;
#[cfg(test)]
use sluice_core::quant;
use sluice_core::{ops, AttnParams, Backend, Error, Result, WeightView};

/// Multithreaded CPU backend.
pub struct CpuBackend {
    pool: rayon::ThreadPool,
    threads: usize,
    avx2: bool,
}

impl CpuBackend {
    /// A backend with `threads` workers (all cores when `None`).
    pub fn new(threads: Option<usize>) -> Result<Self> {
        let threads = threads
            .filter(|&t| t > 0)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("sluice-cpu-{i}"))
            .build()
            .map_err(|e| Error::Invalid(format!("cannot start {threads} CPU threads: {e}")))?;
        Ok(CpuBackend {
            pool,
            threads,
            avx2: detect_avx2(),
        })
    }

    /// Worker threads.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Whether the AVX2 kernels are in use.
    pub fn simd(&self) -> &'static str {
        if self.avx2 {
            "avx2"
        } else {
            "portable"
        }
    }
}

fn detect_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Dots one dequantized weight row with each of the `n` input rows.
#[inline(always)]
fn row_dots(row: &[f32], x: &[f32], out: &mut [f32]) {
    let cols = row.len();
    for (o, xr) in out.iter_mut().zip(x.chunks_exact(cols)) {
        *o = ops::dot(row, xr);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn row_dots_avx2(row: &[f32], x: &[f32], out: &mut [f32]) {
    row_dots(row, x, out)
}

impl CpuBackend {
    fn dots(&self, row: &[f32], x: &[f32], out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if self.avx2 {
            // SAFETY: `avx2` is set only when the CPU reports AVX2 support.
            unsafe { row_dots_avx2(row, x, out) };
            return;
        }
        row_dots(row, x, out)
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> &str {
        "cpu"
    }

    fn matmul(&self, w: WeightView<'_>, x: &[f32], n: usize, y: &mut [f32]) -> Result<()> {
        let (rows, cols) = (w.rows, w.cols);
        if x.len() != n * cols || y.len() != n * rows {
            return Err(Error::Invalid(format!(
                "matmul shapes: w {rows}x{cols}, x {} (n={n}), y {}",
                x.len(),
                y.len()
            )));
        }
        // Checks every length, so row_into below cannot go out of bounds.
        WeightView::with_aux(w.dtype, rows, cols, w.data, w.scales, w.biases)?;
        if rows == 0 || n == 0 {
            return Ok(());
        }
        // Enough tasks for load balance, few enough to amortise scheduling.
        let per_task = (rows / (self.threads * 8)).clamp(1, 256);
        let run = |yt: &mut [f32]| {
            self.pool.install(|| {
                yt.par_chunks_mut(per_task * n).enumerate().for_each_init(
                    || vec![0f32; cols],
                    |buf, (ci, out)| {
                        let r0 = ci * per_task;
                        for (ri, o) in out.chunks_exact_mut(n).enumerate() {
                            w.row_into(r0 + ri, buf);
                            self.dots(buf, x, o);
                        }
                    },
                )
            })
        };
        if n == 1 {
            run(y);
        } else {
            let mut yt = vec![0f32; rows * n];
            run(&mut yt);
            for r in 0..rows {
                for t in 0..n {
                    y[t * rows + r] = yt[r * n + t];
                }
            }
        }
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
        p: &AttnParams,
        out: &mut [f32],
    ) -> Result<()> {
        let d = p.head_dim;
        let group = p.n_heads / p.n_kv_heads;
        let work = n * p.n_heads * (pos0 + n);
        let one = |(i, o): (usize, &mut [f32]), scores: &mut Vec<f32>| {
            let (t, h) = (i / p.n_heads, i % p.n_heads);
            let qh = &q[i * d..i * d + d];
            ops::attend_head(qh, k, v, pos0 + t, h / group, p, scores, o);
        };
        if work < 4096 {
            let mut scores = Vec::new();
            out.chunks_exact_mut(d)
                .enumerate()
                .for_each(|x| one(x, &mut scores));
        } else {
            self.pool.install(|| {
                out.par_chunks_exact_mut(d)
                    .enumerate()
                    .for_each_init(Vec::new, |s, x| one(x, s));
            });
        }
        Ok(())
    }
}

/// Reference product for tests: dequantize the whole matrix, then f64 sums.
#[cfg(test)]
use sluice_core::DType;

#[cfg(test)]
fn reference_matmul(w: WeightView<'_>, x: &[f32], n: usize) -> Result<Vec<f32>> {
    let mut wf = vec![0f32; w.rows * w.cols];
    if let DType::Mlx(q) = w.dtype {
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
    use sluice_core::{HalfType, MlxQuant};

    fn dtype_strategy() -> impl Strategy<Value = DType> {
        proptest::sample::select(DType::ALL.to_vec())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// Every quantized matmul equals dequantize-then-f32 within float
        /// tolerance, for any shape and batch.
        #[test]
        fn matmul_matches_dequantized_reference(
            dtype in dtype_strategy(),
            rows in 1usize..40,
            blocks in 1usize..4,
            n in 1usize..5,
            seed in any::<u64>(),
            threads in 1usize..4,
        ) {
            let cols = blocks * dtype.block_size().max(16);
            let data = quant::random_tensor_bytes(dtype, rows * cols, seed, 1.0);
            let w = WeightView::new(dtype, rows, cols, &data).unwrap();
            let xb = quant::random_tensor_bytes(DType::F32, n * cols, seed ^ 1, 1.0);
            let x: Vec<f32> = xb.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
            let be = CpuBackend::new(Some(threads)).unwrap();
            let mut y = vec![0f32; n * rows];
            be.matmul(w, &x, n, &mut y).unwrap();
            let r = reference_matmul(w, &x, n).unwrap();
            let scale = r.iter().fold(1e-3f32, |a, v| a.max(v.abs()));
            for (a, b) in y.iter().zip(&r) {
                prop_assert!((a - b).abs() <= 1e-4 * scale * (cols as f32).sqrt(), "{a} vs {b} ({dtype} {rows}x{cols})");
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        /// MLX-quantized matmul (every width, group and scale type) equals
        /// the row-by-row dequantized reference.
        #[test]
        fn mlx_matmul_matches_dequantized_reference(
            bits in proptest::sample::select(vec![2u32, 3, 4, 5, 6, 8]),
            group in proptest::sample::select(vec![32u32, 64, 128]),
            scales in proptest::sample::select(vec![HalfType::Bf16, HalfType::F16, HalfType::F32]),
            rows in 1usize..24,
            groups in 1usize..4,
            n in 1usize..4,
            seed in any::<u64>(),
        ) {
            let q = MlxQuant::new(bits, group, scales).unwrap();
            let cols = groups * group as usize;
            let wb = quant::random_tensor_bytes(DType::F32, rows * cols, seed, 1.0);
            let wf: Vec<f32> = wb.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
            let (mut p, mut s, mut b) = (Vec::new(), Vec::new(), Vec::new());
            for row in wf.chunks_exact(cols) {
                quant::quantize_mlx(q, row, &mut p, &mut s, &mut b).unwrap();
            }
            let w = WeightView::with_aux(DType::Mlx(q), rows, cols, &p, &s, &b).unwrap();
            let xb = quant::random_tensor_bytes(DType::F32, n * cols, seed ^ 1, 1.0);
            let x: Vec<f32> = xb.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
            let be = CpuBackend::new(Some(2)).unwrap();
            let mut y = vec![0f32; n * rows];
            be.matmul(w, &x, n, &mut y).unwrap();
            let r = reference_matmul(w, &x, n).unwrap();
            let scale = r.iter().fold(1e-3f32, |a, v| a.max(v.abs()));
            for (a, b) in y.iter().zip(&r) {
                prop_assert!((a - b).abs() <= 1e-4 * scale * (cols as f32).sqrt(), "{a} vs {b}");
            }
            // A view whose scales are one group short is refused.
            prop_assert!(WeightView::with_aux(DType::Mlx(q), rows, cols, &p, &s[1..], &b).is_err());
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
    fn parallel_attention_equals_reference() {
        let p = AttnParams {
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 8,
            scale: 0.3,
            window: None,
        };
        let n = 40;
        let mk = |s: u64, len: usize| -> Vec<f32> {
            quant::random_tensor_bytes(DType::F32, len, s, 1.0)
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect()
        };
        let (q, k, v) = (mk(1, n * 32), mk(2, n * 16), mk(3, n * 16));
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
