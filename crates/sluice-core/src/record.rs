//! A backend that times the products and attention another backend runs,
//! by weight type and size: what the forward pass actually cost on this
//! machine, for a device profile fitted to a real run (`sluice bench
//! --profile-out`).

use crate::backend::{AttnParams, Backend, WeightView};
use crate::ops::Rope;
use crate::{DType, Result};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Calls of one shape: `products` matrices (1 for a product, 3 for an MLP)
/// of `bytes` weights in all, `elements` weights in all, `n` input rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Shape {
    /// Weight type (the first matrix's, for an MLP).
    pub dtype: DType,
    /// Matrices multiplied by one call.
    pub products: u32,
    /// Weight bytes one call reads.
    pub bytes: u64,
    /// Weights (rows × cols, summed over the matrices) of one call.
    pub elements: u64,
    /// Input rows.
    pub n: usize,
}

/// How often a shape ran and for how long in all.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Timing {
    /// Calls.
    pub calls: u64,
    /// Seconds summed over the calls.
    pub seconds: f64,
}

impl Timing {
    fn add(&mut self, s: f64) {
        self.calls += 1;
        self.seconds += s;
    }
}

/// What a [`Recording`] backend saw since the last [`KernelLog::take`].
#[derive(Clone, Debug, Default)]
pub struct KernelTimes {
    /// Products and MLPs by shape.
    pub products: BTreeMap<Shape, Timing>,
    /// Attention calls with one query row (decode).
    pub attention: Timing,
    /// Attention calls with several query rows (prefill).
    pub attention_batched: Timing,
}

impl KernelTimes {
    /// Seconds of every recorded call with `n` input rows (`None`: all).
    pub fn seconds(&self, n: Option<usize>) -> f64 {
        let p: f64 = self
            .products
            .iter()
            .filter(|(k, _)| n.is_none_or(|n| k.n == n))
            .map(|(_, t)| t.seconds)
            .sum();
        let a = match n {
            Some(1) => self.attention.seconds,
            Some(_) => self.attention_batched.seconds,
            None => self.attention.seconds + self.attention_batched.seconds,
        };
        p + a
    }
}

/// Shared record of a [`Recording`] backend's calls.
#[derive(Debug, Default)]
pub struct KernelLog(Mutex<KernelTimes>);

impl KernelLog {
    /// What was recorded since the last call, which starts a new record.
    pub fn take(&self) -> KernelTimes {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn product(&self, shape: Shape, s: f64) {
        let mut t = self.0.lock().unwrap_or_else(|p| p.into_inner());
        t.products.entry(shape).or_default().add(s);
    }

    fn attention(&self, n: usize, s: f64) {
        let mut t = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if n <= 1 {
            t.attention.add(s)
        } else {
            t.attention_batched.add(s)
        }
    }
}

/// Wraps a backend and times its products, MLPs and attention into a
/// [`KernelLog`]; every other call passes straight through.
pub struct Recording {
    inner: Arc<dyn Backend>,
    log: Arc<KernelLog>,
}

impl Recording {
    /// `inner`, timed into `log`.
    pub fn new(inner: Arc<dyn Backend>, log: Arc<KernelLog>) -> Recording {
        Recording { inner, log }
    }
}

fn elements(w: &WeightView<'_>) -> u64 {
    (w.rows * w.cols) as u64
}

/// Bytes a product reads: the weights and, for MLX types, their scales and biases.
fn bytes(w: &WeightView<'_>) -> u64 {
    (w.data.len() + w.scales.len() + w.biases.len()) as u64
}

impl Backend for Recording {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn matmul(&self, w: WeightView<'_>, x: &[f32], n: usize, y: &mut [f32]) -> Result<()> {
        let t = Instant::now();
        let r = self.inner.matmul(w, x, n, y);
        let shape = Shape {
            dtype: w.dtype,
            products: 1,
            bytes: bytes(&w),
            elements: elements(&w),
            n,
        };
        self.log.product(shape, t.elapsed().as_secs_f64());
        r
    }

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
        let t = Instant::now();
        let r = self.inner.attention(q, k, v, n, pos0, p, out);
        self.log.attention(n, t.elapsed().as_secs_f64());
        r
    }

    fn rms_norm(&self, x: &mut [f32], w: &[f32], eps: f32) -> Result<()> {
        self.inner.rms_norm(x, w, eps)
    }

    fn rope(
        &self,
        rope: &Rope,
        pos0: usize,
        x: &mut [f32],
        n: usize,
        head_dim: usize,
    ) -> Result<()> {
        self.inner.rope(rope, pos0, x, n, head_dim)
    }

    fn mlp(&self, w: [WeightView<'_>; 3], x: &[f32], n: usize, y: &mut [f32]) -> Result<()> {
        let t = Instant::now();
        let r = self.inner.mlp(w, x, n, y);
        let shape = Shape {
            dtype: w[0].dtype,
            products: 3,
            bytes: w.iter().map(bytes).sum(),
            elements: w.iter().map(elements).sum(),
            n,
        };
        self.log.product(shape, t.elapsed().as_secs_f64());
        r
    }

    fn route(&self, logits: &mut [f32], n: usize, k: usize, chosen: &mut [usize]) -> Result<()> {
        self.inner.route(logits, n, k, chosen)
    }

    fn device_seconds(&self) -> Option<f64> {
        self.inner.device_seconds()
    }

    fn device_traffic(&self) -> Option<crate::DeviceTraffic> {
        self.inner.device_traffic()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Naive;
    impl Backend for Naive {
        fn name(&self) -> &str {
            "naive"
        }
        fn matmul(&self, w: WeightView<'_>, x: &[f32], n: usize, y: &mut [f32]) -> Result<()> {
            let mut row = vec![0f32; w.cols];
            for r in 0..w.rows {
                w.row_into(r, &mut row);
                for t in 0..n {
                    y[t * w.rows + r] = row.iter().zip(&x[t * w.cols..]).map(|(a, b)| a * b).sum();
                }
            }
            Ok(())
        }
    }

    #[test]
    fn records_by_shape_and_passes_results_through() {
        let log = Arc::new(KernelLog::default());
        let b = Recording::new(Arc::new(Naive), log.clone());
        let w: Vec<u8> = [1f32, 2.0, 3.0, 4.0, 5.0, 6.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let view = WeightView::new(DType::F32, 2, 3, &w).unwrap();
        let mut y = [0f32; 2];
        b.matmul(view, &[1.0, 1.0, 1.0], 1, &mut y).unwrap();
        b.matmul(view, &[1.0, 0.0, 0.0], 1, &mut y).unwrap();
        assert_eq!(y, [1.0, 4.0]);
        let mut y2 = [0f32; 6];
        let wm = WeightView::new(DType::F32, 3, 2, &w).unwrap();
        b.mlp([view, view, wm], &[1.0; 3], 1, &mut y2[..3]).unwrap();
        let t = log.take();
        assert_eq!(t.products.len(), 2);
        let mm = Shape {
            dtype: DType::F32,
            products: 1,
            bytes: 24,
            elements: 6,
            n: 1,
        };
        assert_eq!(t.products[&mm].calls, 2);
        let mlp = t.products.keys().find(|k| k.products == 3).unwrap();
        assert_eq!((mlp.bytes, mlp.elements), (72, 18));
        assert!(t.seconds(Some(1)) >= 0.0 && t.seconds(Some(2)) == 0.0);
        assert!(log.take().products.is_empty(), "take starts a new record");
    }
}
