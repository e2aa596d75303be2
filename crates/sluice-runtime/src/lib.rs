//! Assembly: everything a run needs, put together from one [`RunOptions`].
//!
//! The CLI, a server or an embedder that wants sluice's own forward pass
//! opens a model the same way: [`open`] loads the model's description,
//! picks the compute backend (CPU, the GPU through wgpu, or the simulated
//! device), opens the streamer under the RAM cap with its predictor, maps
//! a routing replay and seeds the predictor, and says in [`Opened::notes`]
//! what it chose and why. The CLI only maps flags onto [`RunOptions`].

use sluice_backend_cpu::{Activations, CpuBackend, CpuOptions};
use sluice_backend_sim::{DeviceClock, PacedEngine, SimBackend};
use sluice_core::record::{KernelLog, Recording};
use sluice_core::{Backend, DType, Error, Result};
use sluice_engine::forward::Replay;
use sluice_engine::model::Ffn;
use sluice_engine::{Model, Session};
use sluice_format::ModelFiles;
use sluice_io::{EngineOptions, IoKind};
use sluice_stream::{CachePolicy, EngineWrap, Prefetch, StreamOptions, Streamer};
use sluice_trace::Trace;
use std::path::PathBuf;
use std::sync::Arc;

pub use sluice_backend_cpu::Activations as CpuActivations;

/// Which backend computes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BackendKind {
    /// The CPU kernels.
    #[default]
    Cpu,
    /// The GPU through wgpu (Metal on Apple GPUs, Vulkan elsewhere).
    Gpu,
    /// The CPU's numerics on a profiled device's clock.
    Sim,
}

/// Everything [`open`] needs.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Safetensors directory, GGUF file or packed file.
    pub model: PathBuf,
    /// Compute threads (`None`: all cores).
    pub threads: Option<usize>,
    /// The compute backend.
    pub backend: BackendKind,
    /// With [`BackendKind::Sim`]: a built-in profile name or a TOML file.
    pub device: String,
    /// With [`BackendKind::Sim`]: the device's flash bandwidth, GB/s,
    /// instead of its profile's.
    pub flash_gbps: Option<f64>,
    /// With [`BackendKind::Gpu`]: bytes of resident weights kept on the
    /// device (planned under the cap where the GPU shares host memory).
    pub gpu_resident: u64,
    /// With [`BackendKind::Gpu`]: one round trip per operation instead of
    /// the device-resident forward pass.
    pub gpu_per_call: bool,
    /// With [`BackendKind::Gpu`]: copy streamed experts into device
    /// buffers per use even where the GPU could bind their slots in place.
    pub gpu_copy_experts: bool,
    /// How the CPU multiplies quantized weights.
    pub activations: Activations,
    /// Routed experts per token instead of the model's own (announced).
    pub experts_k: Option<usize>,
    /// Byte budget of everything resident; streams experts when set.
    pub ram_cap: Option<u64>,
    /// Read engine (`None`: io_uring when a cap is given, else the maps).
    pub io: Option<IoKind>,
    /// Read through the page cache instead of the direct path.
    pub buffered: bool,
    /// Reads in flight at most.
    pub queue_depth: usize,
    /// Split expert reads into requests of at most this size (0: never).
    pub read_chunk: usize,
    /// Threads of the pread engine.
    pub io_threads: usize,
    /// Exactly this many expert slots.
    pub cache_slots: Option<usize>,
    /// Eviction policy.
    pub cache_policy: CachePolicy,
    /// Predictor (`None`: gate, or token under a replay).
    pub prefetch: Option<Prefetch>,
    /// Experts a predictor ranks per layer (0: top-k).
    pub prefetch_k: usize,
    /// MoE layers ahead (0: the predictor's default depth).
    pub prefetch_depth: usize,
    /// Traces of earlier sessions the predictor learns first.
    pub prefetch_seed: Vec<Trace>,
    /// Route by this trace instead of the router.
    pub replay: Option<Trace>,
    /// Check every record against the packed file's checksums.
    pub verify: bool,
    /// Enter a memory cgroup limited to the cap (Linux, needs root).
    pub cgroup: bool,
    /// Time the CPU backend's products and attention into
    /// [`Opened::kernels`] (for a device profile fitted to the run).
    pub record_kernels: bool,
    /// Extra copies of the linear layers' state the caller keeps (chat
    /// snapshots), budgeted with the KV cache.
    pub state_copies: usize,
    /// Extra whole sequence states the caller keeps (a server's parked
    /// conversations), budgeted with the KV cache.
    pub kv_copies: usize,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            model: PathBuf::new(),
            threads: None,
            backend: BackendKind::Cpu,
            device: "iphone-17-pro".into(),
            flash_gbps: None,
            gpu_resident: 1 << 30,
            gpu_per_call: false,
            gpu_copy_experts: false,
            activations: Activations::Q16,
            experts_k: None,
            ram_cap: None,
            io: None,
            buffered: false,
            queue_depth: 16,
            read_chunk: 512 << 10,
            io_threads: 8,
            cache_slots: None,
            cache_policy: CachePolicy::Lru,
            prefetch: None,
            prefetch_k: 0,
            prefetch_depth: 0,
            prefetch_seed: Vec::new(),
            replay: None,
            verify: false,
            cgroup: false,
            record_kernels: false,
            state_copies: 0,
            kv_copies: 0,
        }
    }
}

impl RunOptions {
    /// The engine used: `None` means the model's maps, in place.
    pub fn engine(&self) -> Option<IoKind> {
        match (self.io, self.ram_cap) {
            (Some(IoKind::Mmap), _) => None,
            (Some(k), _) => Some(k),
            (None, Some(_)) => Some(IoKind::platform_default()),
            (None, None) => None,
        }
    }

    /// The predictor run: as chosen, or gating (token under a replay,
    /// whose routes the model's router does not make).
    pub fn predictor(&self) -> Prefetch {
        match (self.prefetch, &self.replay) {
            (Some(p), _) => p,
            (None, Some(_)) => Prefetch::Token,
            (None, None) => Prefetch::Gate,
        }
    }
}

/// `prefetch_depth` for `prefetch`: as given, or where 0 the depth that
/// measured best (docs/BENCHMARKS.md).
pub fn prefetch_depth(prefetch: Prefetch, given: usize) -> usize {
    match given {
        0 => prefetch.default_depth(),
        d => d,
    }
}

/// A model ready to run: resident (mmap) or streaming.
pub struct Opened {
    /// The model, its dense weights in place or read into RAM.
    pub model: Arc<Model>,
    /// The compute backend.
    pub backend: Arc<dyn Backend>,
    /// The streamer, when experts stream.
    pub streamer: Option<Streamer>,
    /// Tokens the KV cache holds.
    pub ctx: usize,
    /// Engine name for reports.
    pub io_name: &'static str,
    /// Whether everything sluice holds, page cache included, is under the cap.
    pub capped: bool,
    /// Why it is or is not capped, what was chosen, and fallbacks.
    pub notes: Vec<String>,
    /// The simulated device's clock ([`BackendKind::Sim`]).
    pub clock: Option<Arc<DeviceClock>>,
    /// With [`RunOptions::record_kernels`]: the CPU backend's calls, timed.
    pub kernels: Option<Arc<KernelLog>>,
    replay: Option<Replay>,
}

impl Opened {
    /// A session over the opened model (takes the streamer: call once).
    pub fn session(&mut self) -> Session {
        let mut s = match self.streamer.take() {
            Some(st) => Session::streaming(self.model.clone(), self.backend.clone(), st, self.ctx),
            None => Session::new(self.model.clone(), self.backend.clone()),
        };
        s.set_replay(self.replay.take());
        s
    }
}

/// Whether any matrix of the model is block-quantized (GGUF quant types,
/// MLX), which the CPU multiplies with quantized activations.
fn has_quantized(model: &Model) -> bool {
    any_weight(model, DType::is_quantized)
}

/// Whether any weight (the first expert's standing for its layer's) has a
/// type `f` picks.
fn any_weight(model: &Model, f: impl Fn(DType) -> bool) -> bool {
    let mut q = f(model.embed.dtype) || f(model.lm_head.dtype);
    for l in &model.layers {
        q |= l.mixer_weights().iter().any(|w| f(w.dtype));
        q |= match &l.ffn {
            Ffn::Dense(m) => f(m.gate.dtype),
            Ffn::Moe(m) => m.experts.first().is_some_and(|e| f(e.gate.dtype)),
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
        Activations::Q16 if has_quantized(model) => "activations quantized to 8-bit codes plus an 8-bit residual per 32 values (within 1e-3 × max|logit| of exact on the oracle fixtures but one, 2.6e-3 on the most sensitive; --activations f32 for exact)".to_string(),
        Activations::Q8 if has_quantized(model) => "activations quantized to 8 bits per 32 values, as llama.cpp does (logits move by percents on small models and routing can change; --activations q16 or f32 to avoid)".to_string(),
        _ if any_weight(model, |d| matches!(d, DType::FP8(_))) => {
            "FP8 weights, exact products (each E4M3 code times its tile's scale, f32 activations)"
                .to_string()
        }
        _ => "f32 weights, exact products".to_string(),
    };
    let fp8 = if has_quantized(model) && any_weight(model, |d| matches!(d, DType::FP8(_))) {
        "; FP8 weights take exact products (f32 activations)"
    } else {
        ""
    };
    notes.push(format!("CPU kernels: {isa}, {threads} threads; {how}{fp8}"));
}

/// Applies the experts-per-token override to a loaded model and says so,
/// and announces the multi-token-prediction layers the model skips.
fn apply_experts_k(model: &mut Model, k: Option<usize>, notes: &mut Vec<String>) -> Result<()> {
    // Said here because every open path passes through this point.
    let mtp = model.config.mtp_layers;
    if mtp > 0 {
        notes.push(format!(
            "the config declares {mtp} multi-token-prediction layer{}: skipped (not loaded, not used for generation)",
            if mtp == 1 { "" } else { "s" }
        ));
    }
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

/// Opens `o.model` for `ctx` tokens processed in batches of up to `batch`.
pub fn open(o: &RunOptions, ctx: usize, batch: usize) -> Result<Opened> {
    let mut notes = Vec::new();
    let mut o = o.clone();
    let device = match o.backend {
        BackendKind::Cpu | BackendKind::Gpu => {
            if o.flash_gbps.is_some() {
                return Err(Error::Invalid(
                    "a flash bandwidth override sets a simulated device's flash: it needs the simulated backend (--backend sim)".into(),
                ));
            }
            None
        }
        BackendKind::Sim => {
            let mut p = sluice_sim::Profile::open(&o.device)?;
            if let Some(g) = o.flash_gbps {
                p.set("flash.read_gbps", g)?;
            }
            if o.engine().is_none() {
                if o.io.is_some() {
                    return Err(Error::Invalid("the simulated device paces the reads of the uring and pread engines; mmap's page faults cannot be paced".into()));
                }
                o.io = Some(IoKind::platform_default());
            }
            if o.ram_cap.is_none() {
                o.ram_cap = Some(p.app_bytes());
            }
            notes.push(format!(
                "simulated device {} ({}): RAM cap {:.2} GB, flash {:.2} GB/s at {:.0} µs, {} matvec {:.1} GB/s; numerics are the CPU backend's, times are the device's",
                p.name,
                p.origin,
                o.ram_cap.unwrap_or(0) as f64 / 1e9,
                p.flash.read_gbps.value,
                p.flash.latency_us.value,
                p.compute.unit,
                p.compute.matvec_gbps.value
            ));
            Some(p)
        }
    };
    let mut device_copies = 0;
    let gpu = match o.backend {
        BackendKind::Gpu => Some(open_gpu(&o, &mut notes, &mut device_copies)?),
        _ => None,
    };
    // A GPU that binds expert slots in place takes them page-aligned.
    let slot_align = gpu
        .as_ref()
        .and_then(|g| g.device_exec())
        .and_then(|x| x.host_align())
        .unwrap_or(0);
    if o.prefetch == Some(Prefetch::Oracle) && o.replay.is_none() {
        return Err(Error::Invalid(
            "the oracle predictor needs a replayed trace (--replay) to know the future from".into(),
        ));
    }
    if o.cgroup {
        let cap = o.ram_cap.ok_or_else(|| {
            Error::Invalid("a memory cgroup is limited to the RAM cap: give one".into())
        })?;
        let p = sluice_io::sys::enter_memory_cgroup(cap)?;
        notes.push(format!(
            "running in memory cgroup {} limited to {cap} bytes",
            p.display()
        ));
    }
    let cpu = CpuBackend::with_options(CpuOptions {
        threads: o.threads,
        activations: o.activations,
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
            Some(g) => (g, None),
            None => (Arc::new(cpu), None),
        },
    };
    let kernels = o.record_kernels.then(|| Arc::new(KernelLog::default()));
    if kernels.is_some() && o.backend != BackendKind::Cpu {
        return Err(Error::Invalid(
            "a profile of this machine times the CPU backend's kernels: it needs the CPU backend"
                .into(),
        ));
    }
    let backend: Arc<dyn Backend> = match &kernels {
        Some(log) => Arc::new(Recording::new(backend, log.clone())),
        None => backend,
    };
    let load = || ModelFiles::open(&o.model);
    let Some(kind) = o.engine() else {
        if !o.prefetch_seed.is_empty() {
            return Err(Error::Invalid("seeding the prefetch predictor needs streaming (a RAM cap, or the uring or pread engine)".into()));
        }
        let mut model = Model::load(load()?)?;
        apply_experts_k(&mut model, o.experts_k, &mut notes)?;
        announce_kernels(cpu_kernels, &model, &mut notes);
        let (capped, why) = cgroup_capped(o.ram_cap);
        if o.ram_cap.is_some() || o.io.is_some() {
            notes.push(format!(
                "mmap: weights are read in place through the page cache; {why}"
            ));
        }
        let replay = o.replay.as_ref().map(|t| Replay::new(t, &model.config));
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
            kernels,
            replay,
        });
    };
    let files = load()?;
    if !o.buffered {
        // Only a few small vectors are read through the map: one page each.
        files.advise_random();
    }
    let mut model = Model::load(files)?;
    apply_experts_k(&mut model, o.experts_k, &mut notes)?;
    announce_kernels(cpu_kernels, &model, &mut notes);
    let threads = o
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let prefetch = o.predictor();
    let opts = StreamOptions {
        io: EngineOptions {
            kind,
            direct: !o.buffered,
            queue_depth: o.queue_depth.max(1),
            threads: o.io_threads.max(1),
            register: true,
        },
        ram_cap: o.ram_cap,
        slots: o.cache_slots,
        policy: o.cache_policy,
        verify: o.verify,
        ctx,
        batch,
        threads,
        read_chunk: o.read_chunk,
        prefetch,
        prefetch_k: o.prefetch_k,
        prefetch_depth: prefetch_depth(prefetch, o.prefetch_depth),
        dense: true,
        device_copies,
        state_copies: o.state_copies,
        kv_copies: o.kv_copies,
        slot_align,
        engine_wrap: clock.clone().map(|c| {
            EngineWrap(Arc::new(move |e| {
                Box::new(PacedEngine::new(e, c.clone())) as Box<dyn sluice_io::ReadEngine>
            }))
        }),
    };
    let mut streamer = Streamer::open(&mut model, &opts)?;
    notes.extend(streamer.notes().iter().cloned());
    if !o.prefetch_seed.is_empty() {
        let Some(p) = streamer.predictor_mut() else {
            return Err(Error::Invalid(format!(
                "seeding teaches a learning predictor (xlayer, history, token); {} learns nothing",
                prefetch.name()
            )));
        };
        let mut steps = 0;
        for t in &o.prefetch_seed {
            Replay::new(t, &model.config).teach(p);
            steps += t.steps.len();
        }
        notes.push(format!(
            "predictor seeded with {} trace(s), {steps} tokens",
            o.prefetch_seed.len()
        ));
    }
    let (capped, why) = if streamer.direct() {
        (
            o.ram_cap.is_some(),
            if o.ram_cap.is_some() {
                "direct I/O: the page cache is not used, RSS is everything".to_string()
            } else {
                "no RAM cap given".to_string()
            },
        )
    } else {
        cgroup_capped(o.ram_cap)
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
    let replay = o.replay.as_ref().map(|t| Replay::new(t, &model.config));
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
        kernels,
    })
}

/// The GPU backend.
#[cfg(feature = "gpu")]
fn open_gpu(
    o: &RunOptions,
    notes: &mut Vec<String>,
    device_copies: &mut u64,
) -> Result<Arc<dyn Backend>> {
    use sluice_backend_wgpu::{WgpuBackend, WgpuOptions};
    let g = WgpuBackend::new(&WgpuOptions {
        resident_budget: o.gpu_resident,
        device_forward: !o.gpu_per_call,
        bind_host: !o.gpu_copy_experts,
        ..WgpuOptions::default()
    })?;
    notes.push(format!("GPU backend: {}", g.describe()));
    if g.shares_host_memory() {
        *device_copies = o.gpu_resident;
    }
    Ok(Arc::new(g))
}

/// Built without the `gpu` feature there is no GPU backend to open.
#[cfg(not(feature = "gpu"))]
fn open_gpu(_: &RunOptions, _: &mut Vec<String>, _: &mut u64) -> Result<Arc<dyn Backend>> {
    Err(Error::Unsupported(
        "this sluice was built without the GPU backend (cargo feature `gpu`)".into(),
    ))
}

/// Whether a memory cgroup holds this process to at most `cap`.
fn cgroup_capped(cap: Option<u64>) -> (bool, String) {
    let Some(cap) = cap else {
        return (false, "no RAM cap given".into());
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
