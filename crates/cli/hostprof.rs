//! The `host` device profile, measured: the drive by `sluice probe`, the
//! CPU backend by a kernel microbenchmark of the products the forward pass
//! runs. `sluice probe PATH --profile FILE` writes it.

use anyhow::Result;
use sluice_backend_cpu::CpuBackend;
use sluice_core::{quant, Backend, DType, WeightView};
use sluice_sim::{Figure, Profile};
use std::collections::BTreeMap;
use std::time::Instant;

/// Median seconds of `f` over enough runs to fill about `budget_s`.
fn time_it(budget_s: f64, mut f: impl FnMut()) -> f64 {
    f();
    let t = Instant::now();
    f();
    let once = t.elapsed().as_secs_f64().max(1e-7);
    let n = ((budget_s / once) as usize).clamp(3, 2000);
    let mut v: Vec<f64> = (0..n)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

struct Kernel {
    bps: f64,
    overhead_s: f64,
}

/// A product of `rows × cols` in `dt` with `n` input rows, timed. The
/// weights rotate through copies larger than the CPU's caches, as a
/// streamed expert arrives from memory, not from cache.
fn matmul_s(
    b: &CpuBackend,
    dt: DType,
    rows: usize,
    cols: usize,
    n: usize,
    w: &[Vec<u8>],
) -> Result<f64> {
    let views = w
        .iter()
        .map(|w| WeightView::new(dt, rows, cols, w))
        .collect::<sluice_core::Result<Vec<_>>>()?;
    let x: Vec<f32> = (0..n * cols)
        .map(|i| ((i % 7) as f32 - 3.0) * 0.1)
        .collect();
    let mut y = vec![0f32; n * rows];
    let mut err = None;
    let mut i = 0;
    let s = time_it(0.2, || {
        i = (i + 1) % views.len();
        if let Err(e) = b.matmul(views[i], &x, n, &mut y) {
            err = Some(e);
        }
    });
    match err {
        Some(e) => Err(e.into()),
        None => Ok(s),
    }
}

/// Copies of a random `rows × cols` matrix adding up to at least 64 MiB.
fn weights(dt: DType, rows: usize, cols: usize) -> Result<Vec<Vec<u8>>> {
    let mut w = vec![0u8; dt.tensor_bytes(&[rows, cols])?];
    quant::fill_random_tensor(dt, &mut w, 1, 0.02);
    let copies = (64usize << 20).div_ceil(w.len()).max(2);
    Ok(vec![w; copies])
}

/// A least-squares fit of time = fixed cost + bytes / bandwidth over four
/// sizes (rows 512 to 8192 of 2048 columns), each timed in two interleaved
/// rounds so that a burst of noise on a shared machine hits one sample of
/// each size, not one size.
fn kernel(b: &CpuBackend, dt: DType) -> Result<Kernel> {
    let rows = [512usize, 1536, 4096, 8192];
    let ws: Vec<Vec<Vec<u8>>> = rows
        .iter()
        .map(|&r| weights(dt, r, 2048))
        .collect::<Result<_>>()?;
    let mut t = vec![Vec::new(); rows.len()];
    for _ in 0..2 {
        for (i, &r) in rows.iter().enumerate() {
            t[i].push(matmul_s(b, dt, r, 2048, 1, &ws[i])?);
        }
    }
    let pts: Vec<(f64, f64)> = ws
        .iter()
        .zip(&t)
        .map(|(w, ts)| (w[0].len() as f64, ts.iter().sum::<f64>() / ts.len() as f64))
        .collect();
    let n = pts.len() as f64;
    let (mx, my) = (
        pts.iter().map(|p| p.0).sum::<f64>() / n,
        pts.iter().map(|p| p.1).sum::<f64>() / n,
    );
    let sxy: f64 = pts.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let sxx: f64 = pts.iter().map(|p| (p.0 - mx) * (p.0 - mx)).sum();
    let slope = (sxy / sxx).max(1e-15);
    Ok(Kernel {
        bps: 1.0 / slope,
        overhead_s: (my - slope * mx).max(0.0),
    })
}

fn fig(v: f64, src: &str) -> Figure {
    Figure::new(v, src)
}

/// Measures this machine. `flash` is (GB/s, latency µs, queue depth) from
/// the probe, with a description of how it was measured.
pub fn measure(flash: (f64, f64, usize), how: &str) -> Result<Profile> {
    let baseline = sluice_io::sys::rss_bytes().unwrap_or(0);
    let b = CpuBackend::new(None)?;
    let bench = "sluice probe --profile (kernel microbenchmark of the CPU backend, this run)";
    let mut by_quant = BTreeMap::new();
    let mut overheads = Vec::new();
    for dt in [
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::Q8_0,
        DType::Q4_0,
        DType::Q4_K,
        DType::Q6_K,
    ] {
        let k = kernel(&b, dt)?;
        overheads.push(k.overhead_s);
        by_quant.insert(dt.name().to_string(), fig(k.bps / 1e9, bench));
    }
    overheads.sort_by(f64::total_cmp);
    let op_overhead = overheads[overheads.len() / 2];
    // Batched rows: what each further input row costs (prefill).
    let (r, c) = (4096, 2048);
    let w = weights(DType::Q4_0, r, c)?;
    let t1 = matmul_s(&b, DType::Q4_0, r, c, 1, &w)?;
    let t16 = matmul_s(&b, DType::Q4_0, r, c, 16, &w)?;
    let flops = 2.0 * (r * c) as f64 * 15.0 / (t16 - t1).max(1e-9);
    // Memory: reading a buffer far larger than the caches, all cores.
    let threads = b.threads();
    let buf: Vec<f32> = vec![1.0; 64 << 20];
    let read_s = time_it(0.5, || {
        let chunk = buf.len().div_ceil(threads);
        let s: f32 = std::thread::scope(|sc| {
            let hs: Vec<_> = buf
                .chunks(chunk)
                .map(|p| sc.spawn(move || p.iter().sum::<f32>()))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap_or(0.0)).sum()
        });
        std::hint::black_box(s);
    });
    let mem_gbps = (buf.len() * 4) as f64 / read_s / 1e9;
    let mut dst = vec![0f32; buf.len()];
    let copy_s = time_it(0.5, || {
        dst.copy_from_slice(&buf);
        std::hint::black_box(&dst);
    });
    let copy_gbps = (buf.len() * 4) as f64 / copy_s / 1e9;
    drop((buf, dst));
    // What a layer does besides products and attention: norms, rotary,
    // routing softmax, SwiGLU, buffers.
    let h = 2048;
    let norm_w = vec![1f32; h];
    let layer_s = time_it(0.2, || {
        let mut x = vec![0.5f32; h];
        for _ in 0..3 {
            let mut y = x.clone();
            sluice_core::ops::rms_norm(&mut y, &norm_w, 1e-6);
            x.iter_mut().zip(&y).for_each(|(a, b)| *a += b * 1e-3);
        }
        let mut logits = vec![0.1f32; 128];
        sluice_core::ops::softmax(&mut logits);
        let mut g = vec![0.3f32; 1408];
        let u = vec![0.2f32; 1408];
        sluice_core::ops::swiglu(&mut g, &u);
        std::hint::black_box((&x, &g, &logits));
    });
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let kb = |k: &str| {
        meminfo
            .lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            .map(|v| v * 1024.0 / 1e9)
    };
    let total = kb("MemTotal:").unwrap_or(1.0);
    let avail = sluice_io::sys::memory_cgroup_limit()
        .map(|b| b as f64 / 1e9)
        .into_iter()
        .chain(kb("MemAvailable:"))
        .fold(total, f64::min);
    let (gbps, lat_us, qd) = flash;
    Ok(Profile {
        name: "host".into(),
        description: format!("this machine, measured: {}", crate::bench::machine()),
        memory: sluice_sim::profile::Memory {
            total_gb: fig(total, "/proc/meminfo MemTotal"),
            app_gb: fig(
                avail,
                "MemAvailable (or the memory cgroup's limit) at measurement",
            ),
            bandwidth_gbps: fig(mem_gbps, "sum over a 256 MiB buffer, all cores, this run"),
            process_mb: fig(
                baseline as f64 / 1e6,
                "VmRSS of sluice before loading a model",
            ),
            copy_gbps: Some(fig(copy_gbps, "memcpy of 256 MiB, one core, this run")),
        },
        flash: sluice_sim::profile::Flash {
            read_gbps: fig(gbps, how),
            latency_us: fig(lat_us, how),
            queue_depth: fig(qd as f64, how),
        },
        compute: sluice_sim::profile::Compute {
            unit: "cpu".into(),
            matvec_gbps: by_quant
                .get("Q4_0")
                .cloned()
                .unwrap_or_else(|| fig(1.0, bench)),
            matvec_gbps_by_quant: by_quant,
            tflops: fig(
                flops / 1e12,
                "Q4_0 4096×2048 product, 16 rows vs 1, this run",
            ),
            op_overhead_us: Some(fig(
                op_overhead * 1e6,
                "least-squares fit over four sizes of each format's product time (median), this run",
            )),
            layer_overhead_us: fig(
                layer_s * 1e6,
                "norms, softmax and SwiGLU of one layer at hidden 2048, this run",
            ),
        },
        origin: String::new(),
    })
}
