//! Flags shared by every command that runs a model: RAM cap, read engine,
//! expert cache; and opening a model for resident or streaming runs.

use anyhow::{Context, Result};
use clap::Args;
use sluice_backend_cpu::{Activations, CpuBackend, CpuOptions};
use sluice_backend_sim::{DeviceClock, PacedEngine, SimBackend};
#[cfg(feature = "gpu")]
use sluice_backend_wgpu::{WgpuBackend, WgpuOptions};
use sluice_core::parse_size;
use sluice_core::Backend;
use sluice_engine::{Model, Session};
use sluice_format::ModelFiles;
use sluice_io::{EngineOptions, IoKind};
use sluice_stream::{CachePolicy, EngineWrap, Prefetch, StreamOptions, Streamer};
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Args, Clone)]
pub struct ModelArgs {
    /// Safetensors model directory, GGUF file or packed file.
    #[arg(long)]
    pub model: PathBuf,
    /// Compute threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Compute backend: cpu; wgpu (the GPU through wgpu: Metal on Apple
    /// GPUs, Vulkan elsewhere; `metal` is the same); or sim (the CPU's numerics on a profiled
    /// device's clock: its RAM cap by default, flash reads paced to its
    /// bandwidth and latency, compute timed by its throughput).
    #[arg(long, default_value = "cpu")]
    pub backend: String,
    /// Device of --backend sim: a built-in profile (iphone-17-pro,
    /// macbook-pro-m3-max-48gb, host) or a profile TOML file.
    #[arg(long, default_value = "iphone-17-pro")]
    pub device: String,
    /// With --backend sim: override the device's flash read bandwidth,
    /// GB/s (as `sluice sim --flash-gbps`).
    #[arg(long)]
    pub flash_gbps: Option<f64>,
    /// Resident (non-expert) weights --backend wgpu keeps on the GPU
    /// (e.g. 512M, 2G; 0: upload per use). Where the GPU shares the host's
    /// RAM (Apple GPUs, lavapipe) these copies are planned under --ram-cap.
    #[arg(long, default_value = "1G")]
    pub gpu_resident: String,
    /// How the CPU multiplies quantized weights: q16 (activations as 8-bit
    /// codes plus an 8-bit residual per 32 values, integer kernels; within
    /// 1e-3 × max|logit| of exact on the oracle fixtures), q8 (8-bit codes
    /// only, as llama.cpp does: faster prefill, but logits move by percents
    /// and small models' routing can change) or f32 (exact).
    #[arg(long, default_value = "q16", value_parser = parse_activations)]
    pub activations: Activations,
    /// Routed experts per token instead of the model's own top-k (flash-moe
    /// ran Qwen3.5-397B with 4 instead of 10). Changes the output; always
    /// announced.
    #[arg(long)]
    pub experts_k: Option<usize>,
    #[command(flatten)]
    pub stream: StreamArgs,
}

fn parse_activations(s: &str) -> Result<Activations, String> {
    Activations::parse(s).ok_or_else(|| format!("{s:?} is not one of q16, q8, f32"))
}

/// Whether any matrix of the model is block-quantized (GGUF quant types,
/// MLX), which the CPU multiplies with quantized activations.
fn has_quantized(model: &Model) -> bool {
    use sluice_engine::model::{Ffn, MixerWeights};
    let mut q = model.embed.dtype.is_quantized() || model.lm_head.dtype.is_quantized();
    for l in &model.layers {
        q |= match &l.mixer {
            MixerWeights::Attention(a) => a.q.w.dtype.is_quantized(),
            MixerWeights::DeltaNet(d) => d.qkv.dtype.is_quantized(),
        };
        q |= match &l.ffn {
            Ffn::Dense(m) => m.gate.dtype.is_quantized(),
            Ffn::Moe(m) => m
                .experts
                .first()
                .is_some_and(|e| e.gate.dtype.is_quantized()),
        };
    }
    q
}

/// Says how the CPU kernels run (the instruction set, and what quantized
/// activations change).
fn announce_kernels(
    cpu: Option<(&'static str, usize, Activations)>,
    model: &Model,
    notes: &mut Vec<String>,
) {
    let Some((isa, threads, activations)) = cpu else {
        return;
    };
    let how = match activations {
        Activations::F32 => "exact products (f32 activations)".to_string(),
        Activations::Q16 if has_quantized(model) => "activations quantized to 8-bit codes plus an 8-bit residual per 32 values (within 1e-3 × max|logit| of exact on the oracle fixtures; --activations f32 for exact)".to_string(),
        Activations::Q8 if has_quantized(model) => "activations quantized to 8 bits per 32 values, as llama.cpp does (logits move by percents on small models and routing can change; --activations q16 or f32 to avoid)".to_string(),
        _ => "f32 weights, exact products".to_string(),
    };
    notes.push(format!("CPU kernels: {isa}, {threads} threads; {how}"));
}

/// Applies `--experts-k` to a loaded model and says so.
fn apply_experts_k(model: &mut Model, k: Option<usize>, notes: &mut Vec<String>) -> Result<()> {
    let Some(k) = k else {
        return Ok(());
    };
    let was = model.config.config_top_k;
    model.config.set_experts_k(k)?;
    notes.push(if k == was {
        format!("--experts-k {k}: the model's own number of routed experts per token")
    } else {
        format!(
            "--experts-k {k}: {k} routed experts per token instead of the model's {was}; the output differs from the model's"
        )
    });
    Ok(())
}

#[derive(Args, Clone, Default)]
pub struct StreamArgs {
    /// Byte budget for everything sluice keeps resident (e.g. 12G, 512M):
    /// dense weights, KV cache, expert slots, buffers. Streams experts.
    #[arg(long, value_parser = parse_cap)]
    pub ram_cap: Option<u64>,
    /// Read engine: uring, pread or mmap (the page-cache baseline). Default:
    /// uring when --ram-cap is given, else the model is used in place (mmap).
    #[arg(long, value_parser = parse_io)]
    pub io: Option<IoKind>,
    /// Read through the page cache instead of O_DIRECT (uring, pread).
    #[arg(long)]
    pub buffered: bool,
    /// Reads in flight at most.
    #[arg(long, default_value_t = 16)]
    pub queue_depth: usize,
    /// Split expert reads into requests of at most this size (0: one
    /// request per contiguous range), so a layer's misses fill the queue.
    #[arg(long, default_value = "512K", value_parser = parse_cap)]
    pub read_chunk: u64,
    /// Threads of the pread engine.
    #[arg(long, default_value_t = 8)]
    pub io_threads: usize,
    /// Use exactly this many expert slots (they must fit the cap).
    #[arg(long)]
    pub cache_slots: Option<usize>,
    /// Expert cache eviction: lru, lfu (decayed counts) or router (recency
    /// weighted by router probabilities).
    #[arg(long, default_value = "lru", value_parser = parse_policy)]
    pub cache_policy: CachePolicy,
    /// Prefetch the next layer's experts while this one computes, predicted
    /// by: none, gate (the next layer's router applied to this layer's
    /// hidden state), xlayer (co-occurrence with the previous layer's
    /// choices), history (recent use at that layer), token (what the
    /// input token's id used at that layer before, with xlayer) or oracle (the
    /// --replay trace's actual choice: an upper bound); auto: gate, or
    /// token under --replay (whose routes the model's router does not
    /// make).
    #[arg(long, default_value = "auto", value_parser = parse_prefetch)]
    pub prefetch: PrefetchArg,
    /// Experts a predictor ranks per layer (default: the model's top-k);
    /// the drive's spare time decides how many of them are read.
    #[arg(long, default_value_t = 0)]
    pub prefetch_k: usize,
    /// MoE layers ahead that gate, oracle and token prefetch for (the
    /// others guess only the next layer); 0: 2 for token, else 1.
    #[arg(long, default_value_t = 0)]
    pub prefetch_depth: usize,
    /// Routing traces of earlier sessions the predictor learns from before
    /// the run (comma-separated; mapped onto the model as --replay maps).
    #[arg(long, value_delimiter = ',')]
    pub prefetch_seed: Vec<PathBuf>,
    /// Route by a recorded trace instead of the router (JSON or llama.cpp
    /// CSV): a synthetic model then has a real model's locality.
    #[arg(long)]
    pub replay: Option<PathBuf>,
    /// Check every expert record against the packed file's checksums.
    #[arg(long)]
    pub verify: bool,
    /// Run inside a new memory cgroup limited to --ram-cap (needs root), so
    /// that the page cache of mmap and buffered modes counts against it.
    #[arg(long, requires = "ram_cap")]
    pub cgroup: bool,
}

fn parse_cap(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

/// `--cache-policy`: the names of [`CachePolicy::ALL`].
fn parse_policy(s: &str) -> Result<CachePolicy, String> {
    CachePolicy::ALL
        .into_iter()
        .find(|p| p.name() == s)
        .ok_or_else(|| {
            let known: Vec<&str> = CachePolicy::ALL.iter().map(|p| p.name()).collect();
            format!("unknown cache policy {s:?} (known: {})", known.join(", "))
        })
}

/// `--prefetch`: a predictor, or `None` for `auto` (chosen per command).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrefetchArg(pub Option<Prefetch>);

/// `--prefetch`: a predictor's name, or `auto`.
fn parse_prefetch(s: &str) -> Result<PrefetchArg, String> {
    if s == "auto" {
        return Ok(PrefetchArg(None));
    }
    Prefetch::ALL
        .into_iter()
        .find(|p| p.name() == s)
        .map(|p| PrefetchArg(Some(p)))
        .ok_or_else(|| {
            let known: Vec<&str> = Prefetch::ALL.iter().map(|p| p.name()).collect();
            format!(
                "unknown predictor {s:?} (known: auto, {})",
                known.join(", ")
            )
        })
}

fn parse_io(s: &str) -> Result<IoKind, String> {
    IoKind::parse(s).ok_or_else(|| format!("unknown read engine {s:?} (uring, pread, mmap)"))
}

impl StreamArgs {
    /// The engine used: `None` means the model's maps, in place.
    pub fn engine(&self) -> Option<IoKind> {
        match (self.io, self.ram_cap) {
            (Some(IoKind::Mmap), _) => None,
            (Some(k), _) => Some(k),
            (None, Some(_)) => Some(IoKind::Uring),
            (None, None) => None,
        }
    }
}

/// A model ready to run: resident (mmap) or streaming.
pub struct Opened {
    pub model: Arc<Model>,
    pub backend: Arc<dyn Backend>,
    pub streamer: Option<Streamer>,
    pub ctx: usize,
    /// Engine name for reports.
    pub io_name: &'static str,
    /// Whether everything sluice holds, page cache included, is under the cap.
    pub capped: bool,
    /// Why it is or is not capped, and fallbacks.
    pub notes: Vec<String>,
    /// The simulated device's clock (`--backend sim`).
    pub clock: Option<Arc<DeviceClock>>,
    replay: Option<sluice_engine::forward::Replay>,
}

impl Opened {
    pub fn session(&mut self) -> Session {
        let mut s = match self.streamer.take() {
            Some(st) => Session::streaming(self.model.clone(), self.backend.clone(), st, self.ctx),
            None => Session::new(self.model.clone(), self.backend.clone()),
        };
        s.set_replay(self.replay.take());
        s
    }
}

/// Opens `m.model` for `ctx` tokens processed in batches of up to `batch`.
pub fn open(m: &ModelArgs, ctx: usize, batch: usize) -> Result<Opened> {
    let mut notes = Vec::new();
    let mut stream = m.stream.clone();
    let device = match m.backend.as_str() {
        "cpu" | "wgpu" | "metal" => {
            if m.flash_gbps.is_some() {
                anyhow::bail!(
                    "--flash-gbps sets a simulated device's flash: it needs --backend sim"
                );
            }
            None
        }
        "sim" => {
            let mut p = sluice_sim::Profile::open(&m.device)?;
            if let Some(g) = m.flash_gbps {
                p.set("flash.read_gbps", g)?;
            }
            if stream.engine().is_none() {
                if stream.io.is_some() {
                    anyhow::bail!("--backend sim paces the reads of the uring and pread engines; mmap's page faults cannot be paced");
                }
                stream.io = Some(IoKind::Uring);
            }
            if stream.ram_cap.is_none() {
                stream.ram_cap = Some(p.app_bytes());
            }
            notes.push(format!(
                "simulated device {} ({}): RAM cap {:.2} GB, flash {:.2} GB/s at {:.0} µs, {} matvec {:.1} GB/s; numerics are the CPU backend's, times are the device's",
                p.name,
                p.origin,
                stream.ram_cap.unwrap_or(0) as f64 / 1e9,
                p.flash.read_gbps.value,
                p.flash.latency_us.value,
                p.compute.unit,
                p.compute.matvec_gbps.value
            ));
            Some(p)
        }
        b => anyhow::bail!("unknown backend {b:?} (cpu, wgpu, sim)"),
    };
    let mut device_copies = 0;
    let gpu = if matches!(m.backend.as_str(), "wgpu" | "metal") {
        open_gpu(m, &mut notes, &mut device_copies)?
    } else {
        None
    };
    let s = &stream;
    if s.prefetch.0 == Some(Prefetch::Oracle) && s.replay.is_none() {
        anyhow::bail!("--prefetch oracle needs a --replay trace to know the future from");
    }
    let trace = match &s.replay {
        Some(p) => Some(sluice_trace::Trace::open(p).with_context(|| "--replay".to_string())?),
        None => None,
    };
    let seeds = open_seeds(&s.prefetch_seed)?;
    if s.cgroup {
        let cap = s.ram_cap.expect("clap requires --ram-cap");
        let p = sluice_io::sys::enter_memory_cgroup(cap)
            .context("--cgroup: entering a memory cgroup")?;
        notes.push(format!(
            "running in memory cgroup {} limited to {cap} bytes",
            p.display()
        ));
    }
    let cpu = CpuBackend::with_options(CpuOptions {
        threads: m.threads,
        activations: m.activations,
        isa: None,
    })?;
    let cpu_kernels = gpu
        .is_none()
        .then(|| (cpu.simd(), cpu.threads(), cpu.activations()));
    let (backend, clock): (Arc<dyn Backend>, _) = match &device {
        Some(p) => {
            let clock = DeviceClock::new(p);
            (
                Arc::new(SimBackend::new(cpu, p, clock.clone())),
                Some(clock),
            )
        }
        None => match gpu {
            Some(g) => (Arc::new(g), None),
            None => (Arc::new(cpu), None),
        },
    };
    let load = || -> Result<ModelFiles> {
        ModelFiles::open(&m.model).with_context(|| format!("loading {}", m.model.display()))
    };
    let Some(kind) = s.engine() else {
        if !seeds.is_empty() {
            anyhow::bail!("--prefetch-seed teaches the prefetch predictor, which needs streaming (--ram-cap, or --io uring|pread)");
        }
        let mut model =
            Model::load(load()?).with_context(|| format!("loading {}", m.model.display()))?;
        apply_experts_k(&mut model, m.experts_k, &mut notes)?;
        announce_kernels(cpu_kernels, &model, &mut notes);
        let (capped, why) = cgroup_capped(s.ram_cap);
        if s.ram_cap.is_some() || s.io.is_some() {
            notes.push(format!(
                "mmap: weights are read in place through the page cache; {why}"
            ));
        }
        let replay = trace.map(|t| sluice_engine::forward::Replay::new(&t, &model.config));
        if let Some(r) = &replay {
            notes.push(r.description.clone());
        }
        return Ok(Opened {
            model: Arc::new(model),
            backend,
            streamer: None,
            ctx,
            io_name: "mmap",
            capped,
            notes,
            clock: None,
            replay,
        });
    };
    let files = load()?;
    if !s.buffered {
        // Only a few small vectors are read through the map: one page each.
        files.advise_random();
    }
    let mut model = Model::load(files).with_context(|| format!("loading {}", m.model.display()))?;
    apply_experts_k(&mut model, m.experts_k, &mut notes)?;
    announce_kernels(cpu_kernels, &model, &mut notes);
    let threads = m
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let prefetch = match (s.prefetch.0, &s.replay) {
        (None, Some(_)) => Prefetch::Token,
        (None, None) => Prefetch::Gate,
        (Some(p), _) => p,
    };
    let opts = StreamOptions {
        io: EngineOptions {
            kind,
            direct: !s.buffered,
            queue_depth: s.queue_depth.max(1),
            threads: s.io_threads.max(1),
            register: true,
        },
        ram_cap: s.ram_cap,
        slots: s.cache_slots,
        policy: s.cache_policy,
        verify: s.verify,
        ctx,
        batch,
        threads,
        read_chunk: s.read_chunk as usize,
        prefetch,
        prefetch_k: s.prefetch_k,
        prefetch_depth: prefetch_depth(prefetch, s.prefetch_depth),
        dense: true,
        device_copies,
        engine_wrap: clock.clone().map(|c| {
            EngineWrap(Arc::new(move |e| {
                Box::new(PacedEngine::new(e, c.clone())) as Box<dyn sluice_io::ReadEngine>
            }))
        }),
    };
    let mut streamer = Streamer::open(&mut model, &opts)?;
    notes.extend(streamer.notes().iter().cloned());
    if !seeds.is_empty() {
        let Some(p) = streamer.predictor_mut() else {
            anyhow::bail!(
                "--prefetch-seed teaches a learning predictor (xlayer, history, token); --prefetch {} learns nothing",
                opts.prefetch.name()
            );
        };
        let mut steps = 0;
        for t in &seeds {
            sluice_engine::forward::Replay::new(t, &model.config).teach(p);
            steps += t.steps.len();
        }
        notes.push(format!(
            "predictor seeded with {} trace(s), {steps} tokens",
            seeds.len()
        ));
    }
    let (capped, why) = if streamer.direct() {
        (
            s.ram_cap.is_some(),
            if s.ram_cap.is_some() {
                "direct I/O: the page cache is not used, RSS is everything".to_string()
            } else {
                "no --ram-cap given".to_string()
            },
        )
    } else {
        cgroup_capped(s.ram_cap)
    };
    notes.push(format!(
        "streaming: {}; {} slots ({} policy); prefetch {}; {}",
        streamer.engine_description(),
        streamer.budget().slots,
        streamer.policy(),
        streamer.predictor_name().unwrap_or("off"),
        why
    ));
    notes.push(format!("budget: {}", streamer.budget().describe()));
    let replay = trace.map(|t| sluice_engine::forward::Replay::new(&t, &model.config));
    if let Some(r) = &replay {
        notes.push(r.description.clone());
    }
    Ok(Opened {
        replay,
        io_name: kind.name(),
        model: Arc::new(model),
        backend,
        streamer: Some(streamer),
        ctx,
        capped,
        notes,
        clock,
    })
}

/// The GPU backend of `--backend wgpu`.
#[cfg(feature = "gpu")]
fn open_gpu(
    m: &ModelArgs,
    notes: &mut Vec<String>,
    device_copies: &mut u64,
) -> Result<Option<WgpuBackend>> {
    let budget = parse_size(&m.gpu_resident).context("--gpu-resident")?;
    let g = WgpuBackend::new(&WgpuOptions {
        resident_budget: budget,
        ..WgpuOptions::default()
    })
    .with_context(|| format!("--backend {}", m.backend))?;
    notes.push(format!("GPU backend: {}", g.describe()));
    if g.shares_host_memory() {
        *device_copies = budget;
    }
    Ok(Some(g))
}

/// Without the `gpu` feature there is no GPU backend to open.
#[cfg(not(feature = "gpu"))]
fn open_gpu(m: &ModelArgs, _: &mut Vec<String>, _: &mut u64) -> Result<Option<CpuBackend>> {
    anyhow::bail!(
        "--backend {}: this sluice was built without the GPU backend (cargo feature `gpu`)",
        m.backend
    )
}

/// `--prefetch-depth` for predictor `prefetch`: as given, or where 0, the
/// depth that measured best (token: 2, docs/BENCHMARKS.md; else 1).
pub fn prefetch_depth(prefetch: Prefetch, given: usize) -> usize {
    match given {
        0 => prefetch.default_depth(),
        d => d,
    }
}

/// The traces named by `--prefetch-seed`.
pub fn open_seeds(paths: &[PathBuf]) -> Result<Vec<sluice_trace::Trace>> {
    paths
        .iter()
        .map(|p| {
            sluice_trace::Trace::open(p).with_context(|| format!("--prefetch-seed {}", p.display()))
        })
        .collect()
}

/// Whether a memory cgroup holds this process to at most `cap`.
fn cgroup_capped(cap: Option<u64>) -> (bool, String) {
    let Some(cap) = cap else {
        return (false, "no --ram-cap given".into());
    };
    match sluice_io::sys::memory_cgroup_limit() {
        Some(l) if l <= cap => (true, format!("capped by a memory cgroup of {l} bytes")),
        Some(l) => (
            false,
            format!("NOT capped: the page cache counts as memory and the memory cgroup allows {l} bytes (> cap); use --cgroup"),
        ),
        None => (
            false,
            "NOT capped: the page cache counts as memory and no memory cgroup limits it; use --cgroup".into(),
        ),
    }
}
