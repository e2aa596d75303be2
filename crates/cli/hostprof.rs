//! The `host` device profile, measured: the drive by `sluice probe`, the
//! CPU backend by a kernel microbenchmark of the products the forward pass
//! runs. `sluice probe PATH --profile FILE` writes it.

use anyhow::{bail, Context, Result};
use sluice_backend_cpu::CpuBackend;
use sluice_core::record::KernelTimes;
use sluice_core::{quant, Backend, DType, WeightView};
use sluice_sim::{Figure, Profile};
use std::collections::BTreeMap;
use std::path::Path;
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

/// Read and copy rates of memory (GB/s): a sum over a buffer far larger
/// than the caches on `threads` cores, and a one-core copy.
fn memory_rates(threads: usize) -> (f64, f64) {
    // Memory: reading a buffer far larger than the caches, all cores.
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
    (mem_gbps, copy_gbps)
}

/// The memory section: sizes from the system, rates as measured.
fn memory(baseline: u64, mem_gbps: f64, copy_gbps: f64) -> sluice_sim::profile::Memory {
    let gb = |b: u64| b as f64 / 1e9;
    let available = sluice_io::sys::mem_available_bytes().map(gb);
    // Total memory is read where Linux publishes it; elsewhere the
    // available figure stands in for it.
    let total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kb| kb * 1024.0 / 1e9)
        .or(available)
        .unwrap_or(1.0);
    let avail = sluice_io::sys::memory_cgroup_limit()
        .map(gb)
        .into_iter()
        .chain(available)
        .fold(total, f64::min);
    sluice_sim::profile::Memory {
        total_gb: fig(
            total,
            "MemTotal (/proc/meminfo; elsewhere the available memory)",
        ),
        app_gb: fig(
            avail,
            "available memory (MemAvailable, or the memory cgroup's limit) at measurement",
        ),
        bandwidth_gbps: fig(mem_gbps, "sum over a 256 MiB buffer, all cores, this run"),
        process_mb: fig(
            baseline as f64 / 1e6,
            "VmRSS of sluice before loading a model",
        ),
        copy_gbps: Some(fig(copy_gbps, "memcpy of 256 MiB, one core, this run")),
    }
}

/// How a profile of this machine describes it; a cached one is reused
/// only while the CPU, cores and RAM still match.
fn description() -> String {
    format!("this machine, measured: {}", crate::bench::machine())
}

/// Makes sure `--device host` has a current profile of this machine:
/// measured now (drive and kernels, about half a minute) unless one is
/// cached for the same CPU, cores and RAM. Other devices pass through.
pub fn resolve_device(device: &str) -> Result<()> {
    if device != sluice_sim::profile::HOST {
        return Ok(());
    }
    let Some(path) = sluice_sim::profile::host_profile_path() else {
        bail!("--device host: no cache directory to keep this machine's profile in (set SLUICE_CACHE_DIR, or SLUICE_HOST_PROFILE to a profile file)");
    };
    if std::env::var_os("SLUICE_HOST_PROFILE").is_some() {
        if !path.exists() {
            bail!("SLUICE_HOST_PROFILE={}: no such file", path.display());
        }
        return Ok(());
    }
    let same = |p: &Profile| {
        p.description.starts_with(&format!(
            "this machine, measured: {}",
            crate::bench::fingerprint()
        ))
    };
    match Profile::open(&path.to_string_lossy()) {
        Ok(p) if same(&p) => return Ok(()),
        Ok(_) => eprintln!(
            "sluice: {} describes another machine; measuring this one for --device host",
            path.display()
        ),
        Err(_) if !path.exists() => eprintln!(
            "sluice: measuring this machine for --device host (once, about half a minute; kept in {})",
            path.display()
        ),
        Err(e) => eprintln!("sluice: {e}; measuring this machine again"),
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("{}", dir.display()))?;
    crate::tools::probe(&crate::tools::ProbeArgs::for_host_profile(dir, &path))
        .context("measuring this machine for --device host")
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
    let (mem_gbps, copy_gbps) = memory_rates(b.threads());
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
    let (gbps, lat_us, qd) = flash;
    Ok(Profile {
        name: "host".into(),
        description: description(),
        memory: memory(baseline, mem_gbps, copy_gbps),
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
            sync_us: None,
            layer_syncs: None,
        },
        origin: String::new(),
    })
}

/// What a `sluice bench` run observed, for `--profile-out`.
pub struct RunObserved<'a> {
    /// The command line, for the figures' sources.
    pub command: String,
    /// The engine's drive bursts (bytes, seconds) that ended in a wait.
    pub bursts: &'a [(u64, f64)],
    /// Reads the engine kept in flight at most.
    pub queue_depth: usize,
    /// The same run's probe: burst GB/s and p50 latency (seconds), the
    /// fallback when the run waited on too few bursts.
    pub probe: (f64, f64),
    /// The CPU backend's calls during the prompt and during decode.
    pub prefill: KernelTimes,
    /// See `prefill`.
    pub decode: KernelTimes,
    /// Decode seconds not spent waiting on reads.
    pub decode_compute_s: f64,
    /// Resident bytes before the model was opened.
    pub baseline_rss: u64,
    /// Tokens decoded and layers per token.
    pub tokens: usize,
    /// See `tokens`.
    pub layers: usize,
}

/// Solves `a x = b` (Gaussian elimination with partial pivoting); `None`
/// when singular.
fn solve(mut a: Vec<Vec<f64>>, mut b: Vec<f64>) -> Option<Vec<f64>> {
    let n = b.len();
    for c in 0..n {
        let p = (c..n).max_by(|&i, &j| a[i][c].abs().total_cmp(&a[j][c].abs()))?;
        if a[p][c].abs() < 1e-300 {
            return None;
        }
        a.swap(c, p);
        b.swap(c, p);
        let (top, rest) = a.split_at_mut(c + 1);
        let pivot = &top[c];
        for (r, row) in rest.iter_mut().enumerate() {
            let f = row[c] / pivot[c];
            for (x, p) in row[c..].iter_mut().zip(&pivot[c..]) {
                *x -= f * p;
            }
            b[c + 1 + r] -= f * b[c];
        }
    }
    let mut x = vec![0.0; n];
    for r in (0..n).rev() {
        let s: f64 = (r + 1..n).map(|k| a[r][k] * x[k]).sum();
        x[r] = (b[r] - s) / a[r][r];
    }
    Some(x)
}

/// Per-product fixed cost (s) and seconds per byte of each weight type,
/// fitted to the decode products the run made: the mean time of each
/// shape = products × fixed cost + bytes × seconds per byte of its type,
/// by least squares weighted by calls. Without a usable fit (a type seen
/// at one size only, noise) the fixed cost is taken as zero and each type
/// is priced at its total time over its total bytes.
fn fit_kernels(t: &KernelTimes) -> (f64, BTreeMap<DType, f64>) {
    let decode: Vec<_> = t.products.iter().filter(|(k, _)| k.n == 1).collect();
    let types: Vec<DType> = {
        let mut v: Vec<DType> = decode.iter().map(|(k, _)| k.dtype).collect();
        v.dedup();
        v
    };
    let n = types.len() + 1;
    let mut ata = vec![vec![0.0; n]; n];
    let mut atb = vec![0.0; n];
    for (k, tm) in &decode {
        let mut row = vec![0.0; n];
        row[0] = k.products as f64;
        row[1 + types.iter().position(|d| *d == k.dtype).unwrap_or(0)] = k.bytes as f64;
        let y = tm.seconds / tm.calls.max(1) as f64;
        let w = tm.calls as f64;
        for i in 0..n {
            atb[i] += w * row[i] * y;
            for j in 0..n {
                ata[i][j] += w * row[i] * row[j];
            }
        }
    }
    if let Some(x) = solve(ata, atb) {
        if x[0] >= 0.0 && x[1..].iter().all(|&v| v > 0.0) {
            return (
                x[0],
                types.iter().copied().zip(x[1..].iter().copied()).collect(),
            );
        }
    }
    let mut per = BTreeMap::<DType, (f64, f64)>::new();
    for (k, tm) in &decode {
        let e = per.entry(k.dtype).or_default();
        e.0 += tm.seconds;
        e.1 += (k.bytes * tm.calls) as f64;
    }
    (
        0.0,
        per.into_iter()
            .filter(|(_, (s, b))| *s > 0.0 && *b > 0.0)
            .map(|(d, (s, b))| (d, s / b))
            .collect(),
    )
}

/// The profile a run observed: the drive as the engine's waits saw it,
/// the kernels as the forward pass ran them, memory measured now.
pub fn from_run(r: &RunObserved<'_>) -> Result<Profile> {
    let src = |what: &str| format!("{what}, observed by `{}`", r.command);
    // Drive: the median time of each burst size, fitted as fixed cost +
    // bytes / bandwidth.
    let mut by_size = BTreeMap::<u64, Vec<f64>>::new();
    for &(b, s) in r.bursts {
        if b > 0 && s > 0.0 {
            by_size.entry(b).or_default().push(s);
        }
    }
    let pts: Vec<(f64, f64)> = by_size
        .iter_mut()
        .map(|(&b, v)| {
            v.sort_by(f64::total_cmp);
            (b as f64, v[v.len() / 2])
        })
        .collect();
    let (probe_gbps, probe_lat) = r.probe;
    let (gbps, lat_s, how) = match sluice_io::probe::fit_bursts(&pts) {
        Some((bps, fixed)) => (
            bps / 1e9,
            fixed,
            src(&format!(
                "{} drive bursts the engine waited on ({} sizes, median time of each), fitted as fixed cost + bytes / bandwidth",
                r.bursts.len(),
                pts.len()
            )),
        ),
        None => (
            probe_gbps,
            probe_lat,
            src("too few distinct drive bursts to fit, so the same run's probe: bursts at the engine's queue depth and request size (bandwidth), p50 (latency)"),
        ),
    };
    // Kernels.
    let (op_s, per_byte) = fit_kernels(&r.decode);
    let ksrc = src("least-squares fit of the decode products' mean times by type and size (products × fixed cost + bytes / bandwidth)");
    let by_quant: BTreeMap<String, Figure> = per_byte
        .iter()
        .map(|(d, spb)| (d.name().to_string(), fig(1.0 / spb / 1e9, &ksrc)))
        .collect();
    let Some(main) = r
        .decode
        .products
        .iter()
        .filter(|(k, _)| k.n == 1)
        .max_by(|a, b| a.1.seconds.total_cmp(&b.1.seconds))
        .and_then(|(k, _)| by_quant.get(k.dtype.name()).cloned())
    else {
        bail!("--profile-out: the run made no decode products to time");
    };
    // Arithmetic of further rows: what the prompt's products took beyond
    // their decode price.
    let (mut work, mut extra) = (0.0, 0.0);
    for (k, tm) in r.prefill.products.iter().filter(|(k, _)| k.n > 1) {
        let Some(spb) = per_byte.get(&k.dtype) else {
            continue;
        };
        let c = tm.calls as f64;
        extra += tm.seconds - c * (k.products as f64 * op_s + k.bytes as f64 * spb);
        work += c * 2.0 * k.elements as f64 * (k.n - 1) as f64;
    }
    let b = CpuBackend::new(None)?;
    let tflops = if work > 0.0 && extra > 0.0 {
        fig(
            work / extra / 1e12,
            &src("the prompt's products beyond their decode price, per row after the first"),
        )
    } else {
        let (rr, cc) = (4096, 2048);
        let w = weights(DType::Q4_0, rr, cc)?;
        let t1 = matmul_s(&b, DType::Q4_0, rr, cc, 1, &w)?;
        let t16 = matmul_s(&b, DType::Q4_0, rr, cc, 16, &w)?;
        fig(
            2.0 * (rr * cc) as f64 * 15.0 / (t16 - t1).max(1e-9) / 1e12,
            "Q4_0 4096×2048 product, 16 rows vs 1, measured after the run (the prompt gave no usable figure)",
        )
    };
    let steps = (r.tokens * r.layers).max(1) as f64;
    let layer_s = ((r.decode_compute_s - r.decode.seconds(Some(1))) / steps).max(0.0);
    let (mem_gbps, copy_gbps) = memory_rates(b.threads());
    Ok(Profile {
        name: "host".into(),
        description: description(),
        memory: memory(r.baseline_rss, mem_gbps, copy_gbps),
        flash: sluice_sim::profile::Flash {
            read_gbps: fig(gbps, &how),
            latency_us: fig(lat_s * 1e6, &how),
            queue_depth: fig(r.queue_depth.max(1) as f64, &src("the engine's queue depth")),
        },
        compute: sluice_sim::profile::Compute {
            unit: "cpu".into(),
            matvec_gbps: main,
            matvec_gbps_by_quant: by_quant,
            tflops,
            op_overhead_us: Some(fig(op_s * 1e6, &ksrc)),
            layer_overhead_us: fig(
                layer_s * 1e6,
                &src("decode time not waiting on reads, less the timed products and attention, per layer"),
            ),
            sync_us: None,
            layer_syncs: None,
        },
        origin: String::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_core::record::{Shape, Timing};

    #[test]
    fn kernel_fit_recovers_fixed_cost_and_rates() {
        let mut t = KernelTimes::default();
        let (op, q4, f32_) = (50e-6, 1.0 / 10e9, 1.0 / 20e9);
        for (dtype, spb) in [(DType::Q4_0, q4), (DType::F32, f32_)] {
            for (products, bytes) in [(1u32, 1u64 << 20), (1, 8 << 20), (3, 6 << 20)] {
                let calls = 10;
                t.products.insert(
                    Shape {
                        dtype,
                        products,
                        bytes,
                        elements: bytes,
                        n: 1,
                    },
                    Timing {
                        calls,
                        seconds: calls as f64 * (products as f64 * op + bytes as f64 * spb),
                    },
                );
            }
        }
        let (o, per) = fit_kernels(&t);
        assert!((o - op).abs() < 1e-9, "{o}");
        assert!((per[&DType::Q4_0] / q4 - 1.0).abs() < 1e-6);
        assert!((per[&DType::F32] / f32_ - 1.0).abs() < 1e-6);
        // One size per type cannot separate the two: no fixed cost, each
        // type at its total time over its total bytes.
        t.products.retain(|k, _| k.bytes == 1 << 20);
        let (o, per) = fit_kernels(&t);
        assert_eq!(o, 0.0);
        let want = (op + (1u64 << 20) as f64 * q4) / (1u64 << 20) as f64;
        assert!((per[&DType::Q4_0] / want - 1.0).abs() < 1e-9);
    }
}
