//! CPU kernel throughput against the machine's limits, measured in the
//! same run: decode products (one token, every weight byte read once, so
//! bounded by memory read bandwidth) as a share of the read limit, and
//! prefill products (many tokens, each weight block reused) in GFLOP/s.
//!
//! `cargo bench --bench matvec [-- --threads T --rows R --cols C --gib G
//!  --tokens N --types q4_0,q4_k,... --activations q8|f32 --isa NAME]`
//!
//! Warm, weights in RAM: each type's matrix is copied until the copies
//! fill `--gib` (default 1), more than this VM's caches hold, and the
//! products rotate through them so every byte comes from DRAM. The read
//! limit is the best of several passes of a plain SIMD sum over 2 GiB with
//! the same threads, taken before and after the kernels (the larger
//! counts). One JSON line per measurement.

use sluice_backend_cpu::{Activations, CpuBackend, CpuOptions, Isa};
use sluice_core::{fp8, quant, Backend, DType, Fp8Block, Fp8Scale, HalfType, MlxQuant, WeightView};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

fn arg(name: &str) -> Option<String> {
    let a: Vec<String> = std::env::args().collect();
    a.iter()
        .position(|x| x == name)
        .and_then(|i| a.get(i + 1))
        .cloned()
}

fn num(name: &str, default: usize) -> usize {
    arg(name).and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Every type the kernels read (MLX: groups of 64, bf16 scales, as
/// mlx-community publishes; FP8: 128×128 tiles, f32 scales, as DeepSeek
/// publishes).
fn types() -> Vec<DType> {
    let mut v: Vec<DType> = DType::ALL.to_vec();
    for bits in [2, 3, 4, 5, 6, 8] {
        v.push(DType::Mlx(MlxQuant::new(bits, 64, HalfType::Bf16).unwrap()));
    }
    v.push(DType::FP8(Fp8Block::new(128, 128, Fp8Scale::F32).unwrap()));
    match arg("--types") {
        Some(list) => v
            .into_iter()
            .filter(|t| list.split(',').any(|n| n.eq_ignore_ascii_case(t.name())))
            .collect(),
        None => v,
    }
}

/// GB/s of a plain sum over `buf` split across `threads` scoped threads
/// (best of five passes).
fn read_limit(buf: &[u64], threads: usize) -> f64 {
    let mut best = f64::MAX;
    let sink = AtomicU64::new(0);
    for _ in 0..5 {
        let t = Instant::now();
        std::thread::scope(|s| {
            for part in buf.chunks(buf.len().div_ceil(threads)) {
                let sink = &sink;
                s.spawn(move || {
                    let mut acc = [0u64; 16];
                    for c in part.chunks_exact(16) {
                        for i in 0..16 {
                            acc[i] = acc[i].wrapping_add(c[i]);
                        }
                    }
                    sink.fetch_add(acc.iter().fold(0, |a, b| a ^ b), Ordering::Relaxed);
                });
            }
        });
        best = best.min(t.elapsed().as_secs_f64());
    }
    std::hint::black_box(sink.load(Ordering::Relaxed));
    std::mem::size_of_val(buf) as f64 / best / 1e9
}

/// One matrix of `dt` and its copies, as views.
struct Copies {
    data: Vec<Vec<u8>>,
    scales: Vec<u8>,
    biases: Vec<u8>,
}

fn copies(dt: DType, rows: usize, cols: usize, total: usize) -> Copies {
    let (d, scales, biases) = match dt {
        DType::Mlx(q) => {
            let f = quant::random_tensor_bytes(DType::F32, rows * cols, 1, 0.1);
            let f: Vec<f32> = f
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            let (mut p, mut s, mut b) = (Vec::new(), Vec::new(), Vec::new());
            for row in f.chunks_exact(cols) {
                quant::quantize_mlx(q, row, &mut p, &mut s, &mut b).unwrap();
            }
            (p, s, b)
        }
        DType::FP8(q) => {
            let f = quant::random_tensor_bytes(DType::F32, rows * cols, 1, 0.1);
            let f: Vec<f32> = f
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            let (codes, s) = fp8::quantize(q, &f, rows, cols).unwrap();
            (codes, s, Vec::new())
        }
        _ => (
            quant::random_tensor_bytes(dt, rows * cols, 1, 0.1),
            Vec::new(),
            Vec::new(),
        ),
    };
    let n = total.div_ceil(d.len() + scales.len() + biases.len()).max(2);
    Copies {
        data: vec![d; n],
        scales,
        biases,
    }
}

fn main() {
    let rows = num("--rows", 768 * 16);
    let cols = num("--cols", 2048);
    let threads = num(
        "--threads",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
    );
    let total = (num("--gib", 1) << 30).max(1 << 20);
    let tokens = num("--tokens", 64);
    let activations = arg("--activations")
        .and_then(|a| Activations::parse(&a))
        .unwrap_or_default();
    let isa = arg("--isa").map(|i| Isa::parse(&i).expect("unknown --isa"));
    let be = CpuBackend::with_options(CpuOptions {
        threads: Some(threads),
        activations,
        isa,
    })
    .unwrap();

    let buf: Vec<u64> = (0..(2usize << 30) / 8).map(|i| i as u64).collect();
    let limit_before = read_limit(&buf, threads);

    // Dispatch cost: empty tasks, one per thread.
    let n = 20_000;
    let t = Instant::now();
    for _ in 0..n {
        be.parallel(threads, &|i| {
            std::hint::black_box(i);
        });
    }
    println!(
        "{{\"bench\":\"dispatch\",\"threads\":{threads},\"us_per_call\":{:.3}}}",
        t.elapsed().as_secs_f64() / n as f64 * 1e6
    );

    let mut lines = Vec::new();
    for dt in types() {
        let c = copies(dt, rows, cols, total);
        let views: Vec<WeightView<'_>> = c
            .data
            .iter()
            .map(|d| WeightView::with_aux(dt, rows, cols, d, &c.scales, &c.biases).unwrap())
            .collect();
        let bytes = views[0].data.len() + c.scales.len() + c.biases.len();
        let x: Vec<f32> = (0..tokens * cols)
            .map(|i| ((i % 13) as f32 - 6.0) * 0.1)
            .collect();
        let mut y = vec![0f32; tokens * rows];
        // Decode: one token, rotating through the copies; the best of
        // five passes (the machine is shared: the best pass is the one
        // least disturbed).
        be.matmul(views[0], &x[..cols], 1, &mut y[..rows]).unwrap();
        let reps = views.len().max(8);
        let mut dt_s = f64::MAX;
        for _ in 0..5 {
            let t = Instant::now();
            for i in 0..reps {
                be.matmul(views[i % views.len()], &x[..cols], 1, &mut y[..rows])
                    .unwrap();
            }
            dt_s = dt_s.min(t.elapsed().as_secs_f64() / reps as f64);
        }
        let gbps = bytes as f64 / dt_s / 1e9;
        // Prefill: `tokens` tokens, time enough for a stable figure.
        let t = Instant::now();
        let mut k = 0;
        while k < 3 || t.elapsed().as_secs_f64() < 0.5 {
            be.matmul(views[k % views.len()], &x, tokens, &mut y)
                .unwrap();
            k += 1;
        }
        let pf_s = t.elapsed().as_secs_f64() / k as f64;
        lines.push((dt, dt_s, gbps, pf_s));
        drop(views);
    }
    let limit_after = read_limit(&buf, threads);
    let limit = limit_before.max(limit_after);
    println!(
        "{{\"bench\":\"read_limit\",\"threads\":{threads},\"gbps\":{limit:.2},\"before\":{limit_before:.2},\"after\":{limit_after:.2},\"bytes\":{}}}",
        buf.len() * 8
    );
    for (dt, dt_s, gbps, pf_s) in lines {
        let gflops = 2.0 * (rows * cols * tokens) as f64 / pf_s / 1e9;
        println!(
            "{{\"bench\":\"matvec\",\"dtype\":\"{dt}\",\"isa\":\"{}\",\"activations\":\"{}\",\"rows\":{rows},\"cols\":{cols},\"threads\":{threads},\"decode_ms\":{:.3},\"weight_gbps\":{gbps:.2},\"share_of_read_limit\":{:.3},\"prefill_tokens\":{tokens},\"prefill_gflops\":{gflops:.1}}}",
            be.simd(),
            if dt.is_quantized() { activations.name() } else { "f32" },
            dt_s * 1e3,
            gbps / limit
        );
    }
}
