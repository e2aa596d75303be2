//! Quantized matrix-vector throughput of the CPU backend, against the
//! memory-read bandwidth measured in the same run (the physical limit of a
//! decode step, which streams every weight byte once).
//!
//! `cargo bench --bench matvec [-- --rows R --cols C --threads T]`
//! Warm (weights in RAM); one JSON line per dtype.

use sluice_backend_cpu::CpuBackend;
use sluice_core::{quant, Backend, DType, HalfType, MlxQuant, WeightView};
use std::time::Instant;

fn arg(name: &str, default: usize) -> usize {
    let a: Vec<String> = std::env::args().collect();
    a.iter()
        .position(|x| x == name)
        .and_then(|i| a.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    // Qwen3-30B-A3B expert geometry: gate/up are 768 × 2048.
    let rows = arg("--rows", 768 * 16);
    let cols = arg("--cols", 2048);
    let threads = arg("--threads", 0);
    let be = CpuBackend::new((threads > 0).then_some(threads)).unwrap();

    // Read bandwidth: sum a buffer larger than the caches.
    let buf: Vec<u64> = (0..(256usize << 20) / 8).map(|i| i as u64).collect();
    let mut best = f64::MAX;
    let mut sink = 0u64;
    for _ in 0..5 {
        let t = Instant::now();
        sink = sink.wrapping_add(buf.iter().fold(0u64, |a, &b| a.wrapping_add(b)));
        best = best.min(t.elapsed().as_secs_f64());
    }
    let mem_gbps = (buf.len() * 8) as f64 / best / 1e9;
    println!(
        "{{\"bench\":\"read_bandwidth\",\"gbps\":{mem_gbps:.2},\"threads\":1,\"sink\":{}}}",
        sink % 2
    );

    let x: Vec<f32> = (0..cols).map(|i| ((i % 13) as f32 - 6.0) * 0.1).collect();
    let mut y = vec![0f32; rows];
    for dtype in [
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::Q8_0,
        DType::Q4_0,
        DType::Q4_K,
        DType::Q6_K,
    ] {
        let data = quant::random_tensor_bytes(dtype, rows * cols, 1, 0.1);
        let w = WeightView::new(dtype, rows, cols, &data).unwrap();
        time(&be, w, &x, &mut y);
    }
    // MLX affine formats (the mlx-community checkpoints of the demo's model:
    // 4-bit, and 2-bit experts), groups of 64, bf16 scales and biases.
    let f = quant::random_tensor_bytes(DType::F32, rows * cols, 1, 0.1);
    let f: Vec<f32> = f
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    for bits in [8, 4, 3, 2] {
        let q = MlxQuant::new(bits, 64, HalfType::Bf16).unwrap();
        let (mut p, mut s, mut b) = (Vec::new(), Vec::new(), Vec::new());
        for row in f.chunks_exact(cols) {
            quant::quantize_mlx(q, row, &mut p, &mut s, &mut b).unwrap();
        }
        let w = WeightView::with_aux(DType::Mlx(q), rows, cols, &p, &s, &b).unwrap();
        time(&be, w, &x, &mut y);
    }
}

/// Times one matvec and prints its JSON line (weight bytes include MLX
/// scales and biases).
fn time(be: &CpuBackend, w: WeightView<'_>, x: &[f32], y: &mut [f32]) {
    let (rows, cols, dtype) = (w.rows, w.cols, w.dtype);
    let bytes = w.data.len() + w.scales.len() + w.biases.len();
    {
        be.matmul(w, x, 1, y).unwrap();
        let iters = 10;
        let t = Instant::now();
        for _ in 0..iters {
            be.matmul(w, x, 1, y).unwrap();
        }
        let dt = t.elapsed().as_secs_f64() / iters as f64;
        println!(
            "{{\"bench\":\"matvec\",\"dtype\":\"{dtype}\",\"rows\":{rows},\"cols\":{cols},\"threads\":{},\"simd\":\"{}\",\"ms\":{:.3},\"weight_gbps\":{:.2},\"gflops\":{:.2}}}",
            be.threads(),
            be.simd(),
            dt * 1e3,
            bytes as f64 / dt / 1e9,
            2.0 * (rows * cols) as f64 / dt / 1e9
        );
    }
}
