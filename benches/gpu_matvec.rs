//! Quantized matrix-vector throughput of the GPU backend (`--backend
//! metal`) against the CPU backend for the same weights, measured
//! alternately in one run so drift hits both alike.
//!
//! `cargo bench --bench gpu_matvec [-- --rows R --cols C --iters N --only TYPE
//! --workgroup W --rows-per-invocation R]`
//! Warm. One JSON line per dtype: effective weight GB/s on the adapter with
//! the weight resident on it, with the weight uploaded per call (a
//! streamed expert), and the CPU's, plus their ratio. "Effective" counts
//! the whole call: activation upload, kernel, read-back, synchronisation.

use sluice_backend_cpu::CpuBackend;
use sluice_backend_wgpu::{WgpuBackend, WgpuOptions};
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
    // Qwen3-30B-A3B expert geometry, 16 experts' gate rows.
    let rows = arg("--rows", 768 * 16);
    let cols = arg("--cols", 2048);
    let iters = arg("--iters", 10).max(1);
    let wg = arg("--workgroup", 0) as u32;
    let rpi = arg("--rows-per-invocation", usize::MAX);
    let gpu = match WgpuBackend::new(&WgpuOptions {
        workgroup: (wg > 0).then_some(wg),
        rows_per_invocation: (rpi != usize::MAX).then_some(rpi as u32),
        ..WgpuOptions::default()
    }) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("skipped: {e}");
            return;
        }
    };
    let cpu = CpuBackend::new(None).unwrap();
    println!(
        "{{\"bench\":\"gpu_adapter\",\"adapter\":{:?},\"cpu_threads\":{},\"cpu_simd\":\"{}\"}}",
        gpu.describe(),
        cpu.threads(),
        cpu.simd()
    );
    let x: Vec<f32> = (0..cols).map(|i| ((i % 13) as f32 - 6.0) * 0.1).collect();
    let mut types = vec![DType::Q4_0, DType::Q4_K, DType::Q8_0, DType::Q6_K];
    types.push(DType::Mlx(MlxQuant::new(4, 64, HalfType::Bf16).unwrap()));
    // `--only NAME`: one type (by its display name, e.g. Q4_0).
    let a: Vec<String> = std::env::args().collect();
    if let Some(name) = a
        .iter()
        .position(|x| x == "--only")
        .and_then(|i| a.get(i + 1))
    {
        types.retain(|t| t.to_string().eq_ignore_ascii_case(name));
    }
    for dtype in types {
        let (mut data, mut s, mut b) = (Vec::new(), Vec::new(), Vec::new());
        match dtype {
            DType::Mlx(q) => {
                let f: Vec<f32> = (0..rows * cols)
                    .map(|i| ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * 0.2)
                    .collect();
                for row in f.chunks_exact(cols) {
                    quant::quantize_mlx(q, row, &mut data, &mut s, &mut b).unwrap();
                }
            }
            t => data = quant::random_tensor_bytes(t, rows * cols, 1, 0.1),
        }
        let w = WeightView::with_aux(dtype, rows, cols, &data, &s, &b).unwrap();
        let resident = w.with_id(sluice_core::fresh_weight_id());
        let bytes = (data.len() + s.len() + b.len()) as f64;
        let (mut yg, mut yc) = (vec![0f32; rows], vec![0f32; rows]);
        // Warm-up: pipelines compiled, the resident copy made.
        gpu.matmul(resident, &x, 1, &mut yg).unwrap();
        cpu.matmul(w, &x, 1, &mut yc).unwrap();
        let (mut tg, mut tu, mut tc) = (0f64, 0f64, 0f64);
        for _ in 0..iters {
            let t = Instant::now();
            gpu.matmul(resident, &x, 1, &mut yg).unwrap();
            tg += t.elapsed().as_secs_f64();
            let t = Instant::now();
            gpu.matmul(w, &x, 1, &mut yg).unwrap();
            tu += t.elapsed().as_secs_f64();
            let t = Instant::now();
            cpu.matmul(w, &x, 1, &mut yc).unwrap();
            tc += t.elapsed().as_secs_f64();
        }
        let n = iters as f64;
        let (gg, gu, gc) = (
            bytes * n / tg / 1e9,
            bytes * n / tu / 1e9,
            bytes * n / tc / 1e9,
        );
        println!(
            "{{\"bench\":\"gpu_matvec\",\"dtype\":\"{dtype}\",\"rows\":{rows},\"cols\":{cols},\"iters\":{iters},\"gpu_resident_gbps\":{gg:.2},\"gpu_uploaded_gbps\":{gu:.2},\"cpu_gbps\":{gc:.2},\"cpu_over_gpu\":{:.2}}}",
            gc / gg
        );
    }
}
