//! `sluice pack`, `sluice synth` and `sluice probe`.

use anyhow::{bail, Context, Result};
use clap::Args;
use sluice_core::DType;
use sluice_core::{fmt_size, parse_size};
use sluice_engine::pack::{pack as pack_model, PackOptions, PackSummary};
use sluice_engine::synth::{self, SynthOptions};
use sluice_engine::{Model, Tokenizer};
use sluice_io::{EngineOptions, IoKind};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Args)]
pub struct PackArgs {
    /// Model to rewrite (safetensors directory or GGUF file).
    src: PathBuf,
    /// Output file.
    #[arg(short, long)]
    out: PathBuf,
    /// Record alignment: 4K (default) or 16K for Apple storage.
    #[arg(long, default_value = "4K")]
    align: String,
    /// Re-quantize experts (q8_0, q4_0, f16, bf16, f32). Changes the
    /// model's output.
    #[arg(long)]
    expert_quant: Option<String>,
    /// Stack each layer's experts in three tensors (llama.cpp's layout,
    /// which llama.cpp loads; three reads per expert) instead of one
    /// aligned record per expert.
    #[arg(long)]
    stacked: bool,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

#[derive(Args)]
pub struct SynthArgs {
    /// Geometry: qwen3-30b-a3b, qwen3-235b-a22b, mixtral-8x7b,
    /// qwen1.5-moe-a2.7b, qwen3.5-397b-a17b, qwen3.6-35b-a3b,
    /// qwen3-next-80b, llama4-scout, llama4-maverick, deepseek-v3,
    /// kimi-k2, glm-4.5, glm-4.5-air, small-moe, small-qwen3.5,
    /// small-qwen3-next, small-llama4, small-deepseek, small-glm (an
    /// unknown name lists them).
    #[arg(long)]
    preset: String,
    /// Number of layers (default: the preset's).
    #[arg(long)]
    layers: Option<usize>,
    /// Type of every matrix: q4 (= q4_0), q8 (= q8_0), q4_k, q6_k, f16...
    #[arg(long, default_value = "q4")]
    quant: String,
    /// Record alignment.
    #[arg(long, default_value = "4K")]
    align: String,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stack each layer's experts in three tensors (llama.cpp's layout)
    /// instead of one aligned record per expert.
    #[arg(long)]
    stacked: bool,
    /// Output file.
    #[arg(short, long)]
    out: PathBuf,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

#[derive(Args)]
pub struct ProbeArgs {
    /// A file to read, or a directory where a scratch file is written.
    path: PathBuf,
    /// Engine: uring or pread (always O_DIRECT).
    #[arg(long, default_value = "uring")]
    io: String,
    /// Request sizes.
    #[arg(long, value_delimiter = ',', default_value = "4K,64K,512K,2M,8M")]
    sizes: Vec<String>,
    /// Queue depths.
    #[arg(long, value_delimiter = ',', default_value = "1,4,8,16")]
    qd: Vec<usize>,
    /// Seconds per measurement. With --profile, also the length of the
    /// back-to-back burst windows (half a second each, at least three) and
    /// about the time spent on bursts after an idle gap.
    #[arg(long, default_value_t = 1.0)]
    seconds: f64,
    /// With --profile: milliseconds the drive is left idle before each
    /// timed burst, as a layer's compute leaves it between two layers'
    /// reads.
    #[arg(long, default_value_t = 10.0)]
    burst_gap_ms: f64,
    /// Size of the scratch file written when PATH is a directory.
    #[arg(long, default_value = "1G")]
    file_size: String,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// Also measure the CPU backend's kernels and write the `host` device
    /// profile for `sluice sim --device FILE` to this TOML file. Its flash
    /// figures are fitted to bursts of 2 to 64 reads of 512K (the deepest
    /// queue's worth in flight) after an idle gap: time = fixed cost +
    /// bytes / bandwidth.
    #[arg(long)]
    profile: Option<PathBuf>,
    /// Print nothing (when the CLI measures the host profile itself).
    #[arg(skip)]
    silent: bool,
}

impl ProbeArgs {
    /// The probe `--device host` runs the first time: both request sizes
    /// and queue depths the profile needs, on a scratch file in `dir`,
    /// writing the profile to `out`.
    pub fn for_host_profile(dir: &Path, out: &Path) -> ProbeArgs {
        ProbeArgs {
            path: dir.to_path_buf(),
            io: IoKind::platform_default().name().into(),
            sizes: vec!["4K".into(), "512K".into()],
            qd: vec![1, 16],
            seconds: 1.0,
            burst_gap_ms: 10.0,
            file_size: "256M".into(),
            json: true,
            profile: Some(out.to_path_buf()),
            silent: true,
        }
    }
}

fn dtype_arg(s: &str) -> Result<DType> {
    let t = match s.to_ascii_lowercase().as_str() {
        "q4" => "q4_0".to_string(),
        "q8" => "q8_0".to_string(),
        x => x.to_string(),
    };
    DType::parse(&t).with_context(|| format!("unknown quant type {s:?}"))
}

fn align_arg(s: &str) -> Result<u64> {
    let a = parse_size(s)?;
    if a < 4096 || !a.is_power_of_two() {
        bail!("--align {s}: must be a power of two of at least 4K");
    }
    Ok(a)
}

struct Progress {
    bar: Option<indicatif::ProgressBar>,
}

impl Progress {
    fn new(quiet: bool) -> Self {
        let bar = (!quiet).then(|| {
            let b = indicatif::ProgressBar::new(0);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
                )
                .expect("valid template"),
            );
            b
        });
        Progress { bar }
    }
    fn update(&mut self, done: u64, total: u64) {
        if let Some(b) = &self.bar {
            b.set_length(total);
            b.set_position(done);
        }
    }
    fn finish(self) {
        if let Some(b) = self.bar {
            b.finish_and_clear();
        }
    }
}

fn report(out: &Path, s: &PackSummary, secs: f64) {
    println!(
        "wrote {}: {} ({:.1} MB/s), {} expert records of {} each, dense {}",
        out.display(),
        fmt_size(s.file_bytes),
        s.file_bytes as f64 / secs.max(1e-9) / 1e6,
        s.records,
        fmt_size(s.record_bytes),
        fmt_size(s.dense_bytes)
    );
}

pub fn pack(a: PackArgs) -> Result<()> {
    let model = Model::open(&a.src).with_context(|| format!("loading {}", a.src.display()))?;
    let tok = Tokenizer::for_model(&model.files)?.map(|t| t.to_json());
    let expert_quant = a.expert_quant.as_deref().map(dtype_arg).transpose()?;
    if let Some(q) = expert_quant {
        eprintln!("note: experts are re-quantized to {q:?}: the packed model's output differs from the source's");
    }
    let opts = PackOptions {
        align: align_arg(&a.align)?,
        expert_quant,
        stacked: a.stacked,
    };
    let t = Instant::now();
    let mut p = Progress::new(a.quiet);
    let s = pack_model(&model, tok, &a.out, &opts, &mut |d, n| p.update(d, n))?;
    p.finish();
    report(&a.out, &s, t.elapsed().as_secs_f64());
    Ok(())
}

pub fn synth(a: SynthArgs) -> Result<()> {
    let preset = synth::preset(&a.preset)?;
    let opts = SynthOptions {
        layers: a.layers,
        quant: dtype_arg(&a.quant)?,
        align: align_arg(&a.align)?,
        seed: a.seed,
        stacked: a.stacked,
    };
    let t = Instant::now();
    let mut p = Progress::new(a.quiet);
    let s = synth::synth(preset, &opts, &a.out, &mut |d, n| p.update(d, n))?;
    p.finish();
    report(&a.out, &s, t.elapsed().as_secs_f64());
    Ok(())
}

pub fn probe(a: &ProbeArgs) -> Result<()> {
    let kind = IoKind::parse(&a.io).with_context(|| format!("unknown engine {:?}", a.io))?;
    if kind == IoKind::Mmap {
        bail!("probe measures the drive with O_DIRECT: use --io uring or pread");
    }
    if !(a.burst_gap_ms.is_finite() && (0.0..=1000.0).contains(&a.burst_gap_ms)) {
        bail!(
            "--burst-gap-ms must be between 0 and 1000, not {}",
            a.burst_gap_ms
        );
    }
    let meta = std::fs::metadata(&a.path).with_context(|| format!("{}", a.path.display()))?;
    let (file, scratch) = if meta.is_dir() {
        let size = parse_size(&a.file_size)?;
        let p = a.path.join(format!(".sluice-probe-{}", std::process::id()));
        write_scratch(&p, size)?;
        (p.clone(), Some(p))
    } else {
        (a.path.clone(), None)
    };
    let r = (|| -> Result<serde_json::Value> {
        let len = std::fs::metadata(&file)?.len();
        let mut results = Vec::new();
        let mut engine_desc = String::new();
        let mut notes = Vec::new();
        for &qd in &a.qd {
            let mut e = direct_engine(kind, qd)?;
            let f = e.open(&file)?;
            engine_desc = e.describe();
            notes.extend(
                e.notes()
                    .into_iter()
                    .filter(|n| !notes.contains(n))
                    .collect::<Vec<_>>(),
            );
            for sz in &a.sizes {
                let req = parse_size(sz)? as usize;
                if req as u64 > len {
                    bail!(
                        "request size {sz} is larger than {} ({len} bytes)",
                        file.display()
                    );
                }
                let p = sluice_io::probe::probe(
                    e.as_mut(),
                    f,
                    len,
                    req,
                    qd.max(1),
                    32 << 20,
                    a.seconds,
                    1,
                )?;
                if !a.json {
                    println!(
                        "{:>8} × qd {:>3}: {:>7.3} GB/s  p50 {:>8.3} ms  p99 {:>8.3} ms",
                        sz,
                        qd,
                        p.gbps,
                        p.p50_latency_s * 1e3,
                        p.p99_latency_s * 1e3
                    );
                }
                results.push(serde_json::json!({
                    "request_bytes": p.request_bytes, "queue_depth": p.queue_depth, "gbps": p.gbps,
                    "mean_latency_s": p.mean_latency_s, "p50_latency_s": p.p50_latency_s,
                    "p99_latency_s": p.p99_latency_s, "bytes": p.bytes, "seconds": p.seconds,
                }));
            }
        }
        let best = results
            .iter()
            .filter_map(|r| r["gbps"].as_f64())
            .fold(0f64, f64::max);
        // For --profile: the engine reads a layer's misses as a batch and
        // waits for all of them, so the profile's bandwidth is measured in
        // that pattern (bursts of the deepest queue's 512 KiB reads). The
        // figure is the median of half-second windows: on a shared host a
        // few seconds of a neighbour's I/O would otherwise set it.
        let windows = match (&a.profile, a.qd.iter().max()) {
            (Some(_), Some(&qd)) => {
                let mut e = direct_engine(kind, qd)?;
                let f = e.open(&file)?;
                let req = (512usize << 10).min(len as usize);
                let n = ((a.seconds.max(1.0) / 0.5).round() as u64).clamp(3, 120);
                let mut w = (0..n)
                    .map(|i| {
                        sluice_io::probe::probe_bursts(
                            e.as_mut(),
                            f,
                            len,
                            req,
                            qd.max(1),
                            8 << 20,
                            0.5,
                            3 + i,
                        )
                        .map(|b| b.gbps)
                    })
                    .collect::<sluice_core::Result<Vec<f64>>>()?;
                w.sort_by(f64::total_cmp);
                Some(w)
            }
            _ => None,
        };
        let burst = windows.as_ref().map(|w| w[w.len() / 2]);
        let idle = match (&a.profile, a.qd.iter().max()) {
            (Some(_), Some(&qd)) => Some(idle_bursts(
                kind,
                &file,
                len,
                qd.max(1),
                a.burst_gap_ms,
                a.seconds,
            )?),
            _ => None,
        };
        Ok(serde_json::json!({
            "idle_bursts": idle,
            "path": file, "engine": engine_desc, "notes": notes, "results": results,
            "max_gbps": best, "burst_gbps": burst, "burst_window_gbps": windows,
            "machine": crate::bench::machine(),
        }))
    })();
    if let Some(p) = scratch {
        let _ = std::fs::remove_file(p);
    }
    let j = r?;
    if let Some(out) = &a.profile {
        let res = j["results"].as_array().cloned().unwrap_or_default();
        let get = |req: u64, qd: Option<u64>| {
            res.iter()
                .filter(|r| r["request_bytes"].as_u64() == Some(req))
                .filter(|r| qd.is_none_or(|q| r["queue_depth"].as_u64() == Some(q)))
                .max_by_key(|r| r["queue_depth"].as_u64().unwrap_or(0))
                .cloned()
        };
        let (Some(bw), Some(lat)) = (get(512 << 10, None), get(4096, Some(1))) else {
            bail!("--profile needs the probe to include 512K and 4K requests, and queue depth 1");
        };
        let qd = bw["queue_depth"].as_u64().unwrap_or(1) as usize;
        let burst = j["burst_gbps"].as_f64().unwrap_or(0.0);
        let idle = &j["idle_bursts"];
        let w: Vec<f64> = j["burst_window_gbps"]
            .as_array()
            .map(|v| v.iter().filter_map(|x| x.as_f64()).collect())
            .unwrap_or_default();
        let windows = format!(
            "back-to-back bursts of {qd} × 512 KiB: median of {} half-second windows {burst:.3} GB/s ({:.3}-{:.3}); steady qd {qd}: {:.3} GB/s; 4 KiB at qd 1: p50 {:.1} µs",
            w.len(),
            w.first().copied().unwrap_or(0.0),
            w.last().copied().unwrap_or(0.0),
            bw["gbps"].as_f64().unwrap_or(0.0),
            lat["p50_latency_s"].as_f64().unwrap_or(0.0) * 1e6,
        );
        let sizes = idle["sizes"]
            .as_array()
            .map(|v| {
                v.iter()
                    .map(|x| {
                        format!(
                            "{}: {:.3} ms",
                            x["reads"].as_u64().unwrap_or(0),
                            x["median_s"].as_f64().unwrap_or(0.0) * 1e3
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default();
        let (gbps, fixed_us, how) = match (idle["gbps"].as_f64(), idle["fixed_us"].as_f64()) {
            (Some(g), Some(f)) => (
                g,
                f,
                format!(
                    "sluice probe {} ({}): bursts of 512 KiB reads after {:.0} ms idle, median time by reads per burst ({sizes}), fitted as fixed cost (the latency) + bytes / bandwidth; for comparison, {windows}",
                    a.path.display(),
                    j["engine"].as_str().unwrap_or(""),
                    idle["gap_s"].as_f64().unwrap_or(0.0) * 1e3,
                ),
            ),
            _ => (
                burst,
                lat["p50_latency_s"].as_f64().unwrap_or(0.0) * 1e6,
                format!(
                    "sluice probe {} ({}): bursts after an idle gap gave no usable fit ({sizes}), so {windows} (bandwidth: the windows' median; latency: 4 KiB at qd 1)",
                    a.path.display(),
                    j["engine"].as_str().unwrap_or(""),
                ),
            ),
        };
        let p = crate::hostprof::measure((gbps, fixed_us, qd), &how)?;
        let text = p.to_toml();
        // Written only if it reads back as a valid profile.
        sluice_sim::Profile::parse(&text, out)?;
        std::fs::write(out, text).with_context(|| format!("{}", out.display()))?;
        if !a.json {
            println!("wrote the host profile to {}", out.display());
        }
    }
    if a.silent {
        return Ok(());
    }
    if a.json {
        println!("{j}");
    } else {
        println!(
            "engine: {}; best {:.3} GB/s",
            j["engine"],
            j["max_gbps"].as_f64().unwrap_or(0.0)
        );
    }
    Ok(())
}

/// Bursts of 512 KiB reads after `gap_ms` of idle drive, of 2 to 64 reads
/// (a layer's misses, from part of one small expert to several large
/// ones; past `qd` the engine keeps `qd` in flight), sizes interleaved so
/// that a patch of noise hits each size alike;
/// the median time of each size, and a fit of fixed cost plus bytes over
/// bandwidth to them. The engine reads a layer's misses this way, and on
/// a host-cached virtual disk an idle drive (or a pool's sleeping threads)
/// wakes at a cost that back-to-back bursts never show.
fn idle_bursts(
    kind: IoKind,
    file: &Path,
    len: u64,
    qd: usize,
    gap_ms: f64,
    seconds: f64,
) -> Result<serde_json::Value> {
    let mut e = direct_engine(kind, qd)?;
    let f = e.open(file)?;
    let req = (512usize << 10).min(len as usize);
    let sizes = [2usize, 4, 8, 16, 32, 64];
    let per_round: f64 = sizes
        .iter()
        .map(|&n| gap_ms * 1e-3 + (n * req) as f64 / 2e9)
        .sum();
    let rounds = ((seconds.max(0.5) / per_round) as usize).clamp(9, 400);
    let mut times = sluice_io::probe::idle_bursts(
        e.as_mut(),
        f,
        len,
        req,
        &sizes,
        gap_ms * 1e-3,
        rounds,
        1000,
    )?;
    let med: Vec<(usize, f64)> = sizes
        .iter()
        .zip(&mut times)
        .map(|(&n, t)| {
            t.sort_by(f64::total_cmp);
            (n, t[t.len() / 2])
        })
        .collect();
    let pts: Vec<(f64, f64)> = med.iter().map(|&(n, t)| ((n * req) as f64, t)).collect();
    let fit = sluice_io::probe::fit_bursts(&pts);
    Ok(serde_json::json!({
        "gap_s": gap_ms * 1e-3,
        "request_bytes": req,
        "rounds": rounds,
        "sizes": med.iter().map(|&(n, t)| serde_json::json!({"reads": n, "median_s": t})).collect::<Vec<_>>(),
        "gbps": fit.map(|f| f.0 / 1e9),
        "fixed_us": fit.map(|f| f.1 * 1e6),
    }))
}

/// An O_DIRECT engine of `kind` with `qd` reads in flight.
fn direct_engine(kind: IoKind, qd: usize) -> Result<Box<dyn sluice_io::ReadEngine>> {
    Ok(sluice_io::open_engine(&EngineOptions {
        kind,
        direct: true,
        queue_depth: qd.max(1),
        threads: qd.max(1),
        register: false,
    })?)
}

/// A scratch file of random bytes (random, so no layer can compress it).
fn write_scratch(p: &Path, size: u64) -> Result<()> {
    use std::io::Write;
    let f = std::fs::File::create(p).with_context(|| format!("{}", p.display()))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
    let mut rng = fastrand::Rng::with_seed(7);
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size.max(1 << 20);
    while left > 0 {
        buf.iter_mut().for_each(|b| *b = rng.u8(..));
        let n = (left as usize).min(buf.len());
        w.write_all(&buf[..n])?;
        left -= n as u64;
    }
    w.flush()?;
    w.get_ref().sync_all()?;
    Ok(())
}

#[derive(Args)]
pub struct DemoArgs {
    /// Directory for the synthetic model (kept and reused between runs).
    #[arg(long, default_value = "target/sluice-demo")]
    dir: PathBuf,
    /// Geometry to synthesize.
    #[arg(long, default_value = "qwen3-30b-a3b")]
    preset: String,
    /// Layers of the preset to keep.
    #[arg(long, default_value_t = 8)]
    layers: usize,
    /// RAM cap the model streams under.
    #[arg(long, default_value = "768M")]
    ram_cap: String,
    /// Tokens to decode.
    #[arg(long, default_value_t = 16)]
    tokens: usize,
}

/// Synthesizes a model several times larger than a small cap, then streams
/// it with `sluice bench`: the streaming core end to end, on any machine.
pub fn demo(a: DemoArgs) -> Result<()> {
    let cap = parse_size(&a.ram_cap)?;
    std::fs::create_dir_all(&a.dir).with_context(|| format!("{}", a.dir.display()))?;
    let model = a.dir.join(format!("{}-{}l-q4_0.gguf", a.preset, a.layers));
    let exe = std::env::current_exe()?;
    let run = |args: &[&str]| -> Result<()> {
        let st = std::process::Command::new(&exe).args(args).status()?;
        if !st.success() {
            bail!("sluice {} failed", args.join(" "));
        }
        Ok(())
    };
    let m = model.to_str().context("non-UTF-8 path")?;
    if model.is_file() {
        println!("reusing {m}");
    } else {
        println!(
            "synthesizing {} with {} layers (random Q4_0 weights) into {m}",
            a.preset, a.layers
        );
        let layers = a.layers.to_string();
        run(&[
            "synth", "--preset", &a.preset, "--layers", &layers, "--quant", "q4", "-o", m,
        ])?;
    }
    let size = std::fs::metadata(&model)?.len();
    // This platform's engine and direct flag (io_uring and O_DIRECT on
    // Linux, the pread pool and F_NOCACHE on Apple's systems...).
    let io = sluice_io::IoKind::platform_default();
    println!(
        "model {} = {:.1}× the {} cap; streaming it with the {} engine and {}:",
        fmt_size(size),
        size as f64 / cap as f64,
        fmt_size(cap),
        io.name(),
        sluice_io::DIRECT_NAME
    );
    let tokens = a.tokens.to_string();
    run(&[
        "bench",
        "--model",
        m,
        "--ram-cap",
        &a.ram_cap,
        "--io",
        io.name(),
        "--tokens",
        &tokens,
        "--prompt-tokens",
        "8",
    ])
}
