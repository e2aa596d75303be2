//! Flags shared by every command that runs a model: RAM cap, read engine,
//! expert cache; and opening a model for resident or streaming runs.

use anyhow::{Context, Result};
use clap::Args;
use sluice_backend_cpu::Activations;
use sluice_core::parse_size;
use sluice_io::IoKind;
pub use sluice_runtime::Opened;
use sluice_runtime::{BackendKind, RunOptions};
use sluice_stream::{CachePolicy, Prefetch};
use std::path::PathBuf;

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
    /// macbook-pro-m3-max-48gb, dev-vm), host (this machine, measured on
    /// first use and cached) or a profile TOML file.
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
    /// With --backend wgpu: one host-device round trip per operation
    /// instead of the device-resident forward pass (one submission per
    /// MoE layer), to compare the two.
    #[arg(long)]
    pub gpu_per_call: bool,
    /// With --backend wgpu on a GPU that shares the host's RAM: copy each
    /// streamed expert into a device buffer per use instead of binding its
    /// slot in place, to compare the two.
    #[arg(long)]
    pub gpu_copy_experts: bool,
    /// How the CPU multiplies quantized weights: q16 (activations as 8-bit
    /// codes plus an 8-bit residual per 32 values, integer kernels; within
    /// 1e-3 × max|logit| of exact on the oracle fixtures but one, 2.6e-3 on
    /// the most sensitive), q8 (8-bit codes
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

#[derive(Args, Clone, Default)]
pub struct StreamArgs {
    /// Byte budget for everything sluice keeps resident (e.g. 12G, 512M):
    /// dense weights, KV cache, expert slots, buffers. Streams experts.
    #[arg(long, value_parser = parse_cap)]
    pub ram_cap: Option<u64>,
    /// Read engine: uring, pread or mmap (the page-cache baseline). Default:
    /// with --ram-cap, uring on Linux and pread elsewhere; without it, the
    /// model is used in place (mmap).
    #[arg(long, value_parser = parse_io)]
    pub io: Option<IoKind>,
    /// Read through the page cache instead of bypassing it (O_DIRECT on
    /// Linux, F_NOCACHE on Apple's systems, NO_BUFFERING on Windows).
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
        RunOptions {
            io: self.io,
            ram_cap: self.ram_cap,
            ..RunOptions::default()
        }
        .engine()
    }
}

/// The library's options for these flags; combinations that cannot work
/// are refused here, in the flags' own words.
pub fn run_options(m: &ModelArgs) -> Result<RunOptions> {
    let s = &m.stream;
    let backend = match m.backend.as_str() {
        "cpu" => BackendKind::Cpu,
        "wgpu" | "metal" => BackendKind::Gpu,
        "sim" => BackendKind::Sim,
        b => anyhow::bail!("unknown backend {b:?} (cpu, wgpu, sim)"),
    };
    if m.flash_gbps.is_some() && backend != BackendKind::Sim {
        anyhow::bail!("--flash-gbps sets a simulated device's flash: it needs --backend sim");
    }
    if backend == BackendKind::Sim && s.io == Some(IoKind::Mmap) {
        anyhow::bail!(
            "--backend sim paces the reads of the uring and pread engines; mmap's page faults cannot be paced"
        );
    }
    if backend == BackendKind::Sim {
        crate::hostprof::resolve_device(&m.device)?;
    }
    let prefetch = s.prefetch.0;
    if prefetch == Some(Prefetch::Oracle) && s.replay.is_none() {
        anyhow::bail!("--prefetch oracle needs a --replay trace to know the future from");
    }
    let replay = match &s.replay {
        Some(p) => Some(sluice_trace::Trace::open(p).with_context(|| "--replay".to_string())?),
        None => None,
    };
    let seeds = open_seeds(&s.prefetch_seed)?;
    if !seeds.is_empty() {
        if s.engine().is_none() && backend != BackendKind::Sim {
            anyhow::bail!("--prefetch-seed teaches the prefetch predictor, which needs streaming (--ram-cap, or --io uring|pread)");
        }
        let chosen = match (prefetch, &replay) {
            (Some(p), _) => p,
            (None, Some(_)) => Prefetch::Token,
            (None, None) => Prefetch::Gate,
        };
        if matches!(chosen, Prefetch::None | Prefetch::Gate | Prefetch::Oracle) {
            anyhow::bail!(
                "--prefetch-seed teaches a learning predictor (xlayer, history, token); --prefetch {} learns nothing",
                chosen.name()
            );
        }
    }
    Ok(RunOptions {
        model: m.model.clone(),
        threads: m.threads,
        backend,
        device: m.device.clone(),
        flash_gbps: m.flash_gbps,
        gpu_resident: parse_size(&m.gpu_resident).context("--gpu-resident")?,
        gpu_per_call: m.gpu_per_call,
        gpu_copy_experts: m.gpu_copy_experts,
        activations: m.activations,
        experts_k: m.experts_k,
        ram_cap: s.ram_cap,
        io: s.io,
        buffered: s.buffered,
        queue_depth: s.queue_depth,
        read_chunk: s.read_chunk as usize,
        io_threads: s.io_threads,
        cache_slots: s.cache_slots,
        cache_policy: s.cache_policy,
        prefetch,
        prefetch_k: s.prefetch_k,
        prefetch_depth: s.prefetch_depth,
        prefetch_seed: seeds,
        replay,
        verify: s.verify,
        cgroup: s.cgroup,
        record_kernels: false,
        state_copies: 0,
        kv_copies: 0,
    })
}

/// Opens `m.model` for `ctx` tokens processed in batches of up to `batch`.
pub fn open(m: &ModelArgs, ctx: usize, batch: usize) -> Result<Opened> {
    open_with(m, ctx, batch, 0, 0)
}

/// [`open`], budgeting `state_copies` extra copies of the linear layers'
/// state (a chat's snapshots) and `kv_copies` extra whole sequence states
/// (a server's parked conversations).
pub fn open_with(
    m: &ModelArgs,
    ctx: usize,
    batch: usize,
    state_copies: usize,
    kv_copies: usize,
) -> Result<Opened> {
    let o = RunOptions {
        state_copies,
        kv_copies,
        ..run_options(m)?
    };
    sluice_runtime::open(&o, ctx, batch).with_context(|| format!("opening {}", m.model.display()))
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
