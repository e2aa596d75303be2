//! `sluice bench`: decode tok/s, time to first token, bytes per token, hit
//! rate, achieved vs probed bandwidth, stall vs compute, peak RSS vs cap.

use crate::stream_args::{run_options, ModelArgs};
use anyhow::{bail, Context, Result};
use clap::Args;
use sluice_core::record::{KernelLog, KernelTimes};
use sluice_engine::model::Ffn;
use sluice_engine::stream::{PrefetchStats, StreamStats};
use sluice_engine::{Sampler, Session};
use sluice_io::{EngineOptions, IoKind};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    m: ModelArgs,
    /// Tokens to decode.
    #[arg(long, default_value_t = 16)]
    tokens: usize,
    /// Prompt tokens (random ids) processed before decoding.
    #[arg(long, default_value_t = 8)]
    prompt_tokens: usize,
    /// Seed of the prompt's token ids.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Skip the warm run (same tokens again with the cache kept).
    #[arg(long)]
    no_warm: bool,
    /// Seconds the drive probe runs.
    #[arg(long, default_value_t = 2.0)]
    probe_seconds: f64,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// Write the device profile this run observed (the drive bursts the
    /// engine waited on, the CPU kernels' times by type and size, memory
    /// measured after the run) for `sluice sim --device FILE`: a simulation
    /// with the same flags can then be checked against this run.
    #[arg(long)]
    profile_out: Option<PathBuf>,
}

/// Figures of one pass (cold or warm).
struct Pass {
    ttft_s: f64,
    decode_s: f64,
    tokens: usize,
    io: Option<StreamStats>,
    pf: Option<PrefetchStats>,
    storage_read: u64,
    expert_bytes_used: u64,
    /// Bytes the prompt read, and the bytes of the distinct experts it used.
    prefill_read: u64,
    prefill_distinct: u64,
    /// On a simulated device: device seconds of prefill, decode, stall.
    device: Option<(f64, f64, f64)>,
    /// On a GPU: seconds from submission to completion of its work during
    /// decode (upload, kernels, read-back).
    gpu_decode_s: Option<f64>,
    /// On a GPU: submissions, waits, buffers and copies during decode.
    gpu_traffic: Option<sluice_core::DeviceTraffic>,
    /// Layers of the model, to put the GPU's traffic per layer.
    layers: usize,
    /// With a kernel log: the backend's calls during prefill and decode.
    kernels: Option<(KernelTimes, KernelTimes)>,
}

impl Pass {
    fn tok_per_s(&self) -> f64 {
        self.tokens as f64 / self.decode_s.max(1e-12)
    }
    fn json(&self) -> serde_json::Value {
        let per = |b: u64| b as f64 / self.tokens.max(1) as f64;
        let (bytes_read, hit_rate, read_gbps, stall) = match &self.io {
            Some(s) => (
                s.bytes_read,
                serde_json::json!(s.hit_rate()),
                serde_json::json!(s.bytes_read as f64 / s.io_busy.as_secs_f64().max(1e-12) / 1e9),
                serde_json::json!(s.stall.as_secs_f64()),
            ),
            // mmap: what the kernel fetched for us; hits are estimated from
            // the expert bytes the router used against what was fetched.
            None => (
                self.storage_read,
                serde_json::json!((1.0
                    - self.storage_read as f64 / self.expert_bytes_used.max(1) as f64)
                    .clamp(0.0, 1.0)),
                serde_json::Value::Null,
                serde_json::Value::Null,
            ),
        };
        let stall_s = stall.as_f64().unwrap_or(0.0);
        let overlap = match &self.io {
            Some(s) if s.io_busy.as_secs_f64() > 0.0 => serde_json::json!((1.0
                - s.stall.as_secs_f64() / s.io_busy.as_secs_f64())
            .clamp(0.0, 1.0)),
            _ => serde_json::Value::Null,
        };
        let r = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        let pf = self.pf.as_ref();
        serde_json::json!({
            "tok_per_s": self.tok_per_s(),
            "ttft_s": self.ttft_s,
            "decode_s": self.decode_s,
            "bytes_read_per_token": per(bytes_read),
            "expert_bytes_used_per_token": per(self.expert_bytes_used),
            "hit_rate": hit_rate,
            "read_gbps": read_gbps,
            "stall_s": stall,
            "compute_s": self.decode_s - stall_s,
            "stall_s_per_token": stall_s / self.tokens.max(1) as f64,
            "compute_s_per_token": (self.decode_s - stall_s) / self.tokens.max(1) as f64,
            "overlap_ratio": overlap,
            "prefetch_recall": pf.map(|p| r(p.prefetched_used, p.demanded)),
            "prefetch_precision": pf.map(|p| r(p.prefetched_used, p.prefetched)),
            "all_k_ready_rate": pf.map(|p| r(p.all_ready, p.layer_steps)),
            "wasted_prefetch_bytes_per_token": pf.map(|p| per(p.wasted_bytes)),
            "prefetch_bytes_per_token": pf.map(|p| per(p.bytes)),
            "cancelled_prefetches_per_token": pf.map(|p| p.cancelled as f64 / self.tokens.max(1) as f64),
            "predictor_s_per_token": pf.map(|p| p.predictor.as_secs_f64() / self.tokens.max(1) as f64),
            "prefill_bytes_read": self.prefill_read,
            "prefill_distinct_expert_bytes": self.prefill_distinct,
            "device_tok_per_s": self.device.map(|d| self.tokens as f64 / d.1.max(1e-12)),
            "device_ttft_s": self.device.map(|d| d.0),
            "device_decode_s": self.device.map(|d| d.1),
            "device_stall_s": self.device.map(|d| d.2),
            "gpu_decode_s": self.gpu_decode_s,
            "gpu_s_per_token": self.gpu_decode_s.map(|g| g / self.tokens.max(1) as f64),
            "gpu_submissions_per_token": self.gpu_traffic.map(|t| per(t.submissions)),
            "gpu_submissions_per_layer": self.gpu_traffic.map(|t| per(t.submissions) / self.layers.max(1) as f64),
            "gpu_waits_per_token": self.gpu_traffic.map(|t| per(t.waits)),
            "gpu_buffers_created_per_token": self.gpu_traffic.map(|t| per(t.buffers_created)),
            "gpu_activation_bytes_up_per_token": self.gpu_traffic.map(|t| per(t.activation_bytes_up)),
            "gpu_weight_bytes_up_per_token": self.gpu_traffic.map(|t| per(t.weight_bytes_up)),
            "gpu_weight_bytes_bound_per_token": self.gpu_traffic.map(|t| per(t.weight_bytes_bound)),
            "gpu_bytes_down_per_token": self.gpu_traffic.map(|t| per(t.bytes_down)),
        })
    }
}

/// Bytes this process caused to be fetched from storage (/proc/self/io).
fn storage_read_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("read_bytes:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn run_pass(
    s: &mut Session,
    prompt: &[u32],
    n: usize,
    obs: &Observed,
    clock: Option<&sluice_backend_sim::DeviceClock>,
    log: Option<&KernelLog>,
) -> Result<Pass> {
    s.reset();
    if let Some(l) = log {
        l.take();
    }
    let d0 = clock.map(|c| c.time());
    let stats0 = s.streamer().map(|st| st.stats());
    obs.distinct.lock().expect("not poisoned").clear();
    let t0 = Instant::now();
    let mut last = s.forward(prompt, false)?;
    let ttft = t0.elapsed().as_secs_f64();
    let prefill_kernels = log.map(KernelLog::take);
    let d1 = clock.map(|c| c.time());
    let prefill_distinct: u64 = {
        let d = obs.distinct.lock().expect("not poisoned");
        d.iter().map(|&(l, _)| obs.per_layer[l]).sum()
    };
    let before = s.streamer().map(|st| st.stats());
    let pf0 = s.streamer().map(|st| st.prefetch_stats());
    let read0 = storage_read_bytes();
    obs.used.store(0, Ordering::Relaxed);
    let g0 = s.backend().device_seconds();
    let traffic0 = s.backend().device_traffic();
    let t1 = Instant::now();
    for _ in 0..n {
        // Under routing replay the inputs are the trace's own tokens
        // (teacher forcing), so token-keyed predictors see the recorded
        // sequence the routes belong to.
        let next = s
            .replay()
            .and_then(|r| r.token(s.pos()))
            .unwrap_or_else(|| Sampler::argmax(&last));
        last = s.forward(&[next], false)?;
    }
    let decode_s = t1.elapsed().as_secs_f64();
    let kernels = prefill_kernels.zip(log.map(KernelLog::take));
    let gpu_decode_s = match (g0, s.backend().device_seconds()) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let gpu_traffic = match (traffic0, s.backend().device_traffic()) {
        (Some(a), Some(b)) => Some(b.since(&a)),
        _ => None,
    };
    let device = match (d0, d1, clock.map(|c| c.time())) {
        (Some(a), Some(b), Some(c)) => {
            Some((b.now_s - a.now_s, c.now_s - b.now_s, c.stall_s - b.stall_s))
        }
        _ => None,
    };
    let io = match (s.streamer().map(|st| st.stats()), before) {
        (Some(a), Some(b)) => Some(a.since(&b)),
        _ => None,
    };
    let pf = match (s.streamer().map(|st| st.prefetch_stats()), pf0) {
        (Some(a), Some(b)) if s.streamer().is_some_and(|st| st.predictor_name().is_some()) => {
            Some(a.since(&b))
        }
        _ => None,
    };
    Ok(Pass {
        ttft_s: ttft,
        decode_s,
        tokens: n,
        io,
        pf,
        storage_read: storage_read_bytes().saturating_sub(read0),
        expert_bytes_used: obs.used.load(Ordering::Relaxed),
        prefill_read: match (before, stats0) {
            (Some(b), Some(a)) => b.since(&a).bytes_read,
            _ => 0,
        },
        prefill_distinct,
        device,
        gpu_decode_s,
        gpu_traffic,
        layers: obs.per_layer.len(),
        kernels,
    })
}

/// What the route observer collects.
struct Observed {
    per_layer: Vec<u64>,
    used: AtomicU64,
    distinct: std::sync::Mutex<std::collections::HashSet<(usize, usize)>>,
}

pub fn bench(a: BenchArgs) -> Result<()> {
    if a.tokens == 0 || a.prompt_tokens == 0 {
        bail!("--tokens and --prompt-tokens must be at least 1");
    }
    let ctx = a.prompt_tokens + a.tokens + 1;
    // Cold: the model's pages leave the page cache before anything runs.
    let files = sluice_format::ModelFiles::open(&a.m.model)?;
    let paths: Vec<_> = files.files().iter().map(|f| f.path.clone()).collect();
    drop(files);
    let mut dropped = true;
    for p in &paths {
        dropped &= sluice_io::sys::drop_page_cache(p).is_ok();
    }
    let baseline_rss = sluice_io::sys::rss_bytes().unwrap_or(0);
    let t_load = Instant::now();
    let mut ro = run_options(&a.m)?;
    ro.record_kernels = a.profile_out.is_some();
    if a.profile_out.is_some() && ro.backend != sluice_runtime::BackendKind::Cpu {
        bail!("--profile-out profiles this machine: it needs --backend cpu");
    }
    let mut o = sluice_runtime::open(&ro, ctx, a.prompt_tokens)
        .with_context(|| format!("opening {}", a.m.model.display()))?;
    let load_s = t_load.elapsed().as_secs_f64();
    let c = o.model.config.clone();
    // Bytes of each layer's experts, to count what the router used.
    let per_layer: Vec<u64> = o
        .model
        .layers
        .iter()
        .map(|l| match &l.ffn {
            Ffn::Moe(m) => m.experts.first().map_or(0, |e| e.nbytes()),
            Ffn::Dense(_) => 0,
        })
        .collect();
    let record = per_layer.iter().copied().max().unwrap_or(0) as usize;
    // The physical limit, measured now on the drive holding the model, at
    // the engine's request size and the queue depth a layer's misses use.
    let biggest = paths
        .iter()
        .max_by_key(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .cloned()
        .expect("a model has a file");
    let mut s = o.session();
    let obs = Arc::new(Observed {
        per_layer: per_layer.clone(),
        used: AtomicU64::new(0),
        distinct: Default::default(),
    });
    {
        let obs = obs.clone();
        s.set_observer(Some(Box::new(move |r| {
            obs.used.fetch_add(
                obs.per_layer[r.layer] * r.experts.len() as u64,
                Ordering::Relaxed,
            );
            let mut d = obs.distinct.lock().expect("not poisoned");
            for &e in r.experts {
                d.insert((r.layer, e));
            }
        })));
    }
    let mut rng = fastrand::Rng::with_seed(a.seed);
    let prompt: Vec<u32> = (0..a.prompt_tokens)
        .map(|i| {
            let r = rng.u32(0..c.vocab as u32);
            s.replay().and_then(|rp| rp.token(i)).unwrap_or(r)
        })
        .collect();
    let clock = o.clock.clone();
    let log = o.kernels.clone();
    let b0 = s.streamer().map_or(0, |st| st.drive_bursts().len());
    let mut cold = run_pass(
        &mut s,
        &prompt,
        a.tokens,
        &obs,
        clock.as_deref(),
        log.as_deref(),
    )?;
    let warm = if a.no_warm {
        None
    } else {
        Some(run_pass(
            &mut s,
            &prompt,
            a.tokens,
            &obs,
            clock.as_deref(),
            None,
        )?)
    };
    let bursts: Vec<(u64, f64)> = s
        .streamer()
        .map(|st| st.drive_bursts().get(b0..).unwrap_or(&[]).to_vec())
        .unwrap_or_default();
    let peak = sluice_io::sys::peak_rss_bytes().unwrap_or(0);
    // The queue depth the run used: reads per batch, on average.
    let qd = match &cold.io {
        Some(io) if io.batches > 0 => (io.reads as f64 / io.batches as f64).round() as usize,
        _ => c.top_k,
    }
    .clamp(1, a.m.stream.queue_depth.max(1));
    let probe = {
        let kind = match a.m.stream.engine() {
            Some(k) => k,
            None => IoKind::Pread,
        };
        let mut e = sluice_io::open_engine(&EngineOptions {
            kind,
            direct: true,
            queue_depth: qd,
            threads: qd,
            register: false,
        })?;
        let f = e.open(&biggest)?;
        let len = std::fs::metadata(&biggest)?.len();
        let req = s
            .streamer()
            .map_or(record, |st| st.request_bytes())
            .clamp(4096, (len / 2).max(4096) as usize);
        let steady = sluice_io::probe::probe(
            e.as_mut(),
            f,
            len,
            req,
            qd,
            64 << 20,
            a.probe_seconds,
            a.seed,
        )?;
        // The run's own pattern: a batch of reads, all awaited, repeat.
        let burst = sluice_io::probe::probe_bursts(
            e.as_mut(),
            f,
            len,
            req,
            qd,
            64 << 20,
            a.probe_seconds,
            a.seed + 1,
        )?;
        (steady, burst)
    };
    let (probe, burst) = probe;
    let profile_out = match (&a.profile_out, cold.kernels.take()) {
        (Some(out), Some((prefill, decode))) => {
            let stall = cold.io.map_or(0.0, |io| io.stall.as_secs_f64());
            let p = crate::hostprof::from_run(&crate::hostprof::RunObserved {
                command: std::env::args().collect::<Vec<_>>().join(" "),
                bursts: &bursts,
                queue_depth: a.m.stream.queue_depth,
                probe: (burst.gbps, probe.p50_latency_s),
                prefill,
                decode,
                decode_compute_s: cold.decode_s - stall,
                baseline_rss,
                tokens: a.tokens,
                layers: c.n_layers,
            })?;
            let text = p.to_toml();
            sluice_sim::Profile::parse(&text, out)?;
            std::fs::write(out, text).with_context(|| format!("{}", out.display()))?;
            Some(out.clone())
        }
        _ => None,
    };
    // The cap in force: given, or the simulated device's default.
    let cap = s
        .streamer()
        .map(|st| st.budget().cap)
        .filter(|&c| c != u64::MAX)
        .or(a.m.stream.ram_cap);
    let mut notes = o.notes.clone();
    if let Some(p) = s.streamer().and_then(|st| st.predictor_name()) {
        notes.push(format!(
            "prefetch {p}: reads overlap compute and are reaped between layers, so read_gbps (bytes over time with reads in flight) is a lower bound; compare engines with --prefetch none"
        ));
    }
    if s.replay().is_some() {
        notes.push("routing replay: the prompt and the decode inputs are the trace's recorded tokens (teacher forcing) where it has them, so outputs are not the model's own continuation".into());
    }
    if !dropped {
        notes.push("the page cache could not be dropped before the cold run".into());
    }
    if let Some(cap) = cap {
        if peak > cap {
            notes.push(format!("peak RSS {peak} exceeded the cap {cap}"));
        }
    }
    let budget = s.streamer().map(|st| {
        let b = st.budget();
        serde_json::json!({"baseline": b.baseline, "margin": b.margin, "dense": b.dense, "kv": b.kv,
            "scratch": b.scratch, "device": b.device, "slot": b.slot, "slots": b.slots, "experts": b.experts_total})
    });
    let mut j = cold.json();
    let m = j.as_object_mut().expect("object");
    let extra = serde_json::json!({
        "model": a.m.model,
        "architecture": c.arch.hf_name(),
        "backend": a.m.backend,
        "device": (a.m.backend == "sim").then(|| a.m.device.clone()),
        "io_engine": o.io_name,
        "direct": s.streamer().is_some_and(|st| st.direct()),
        "cache_policy": s.streamer().map(|st| st.policy()),
        "capped": o.capped && cap.is_some_and(|c| peak <= c),
        "ram_cap_bytes": cap,
        "peak_rss_bytes": peak,
        "memory_measure": sluice_io::sys::memory_measure(),
        "probe_gbps": probe.gbps,
        "probe_burst_gbps": burst.gbps,
        "probe": {"request_bytes": probe.request_bytes, "queue_depth": probe.queue_depth,
                  "gbps": probe.gbps, "p50_latency_s": probe.p50_latency_s, "p99_latency_s": probe.p99_latency_s,
                  "seconds": probe.seconds, "file": biggest},
        "cold": true,
        "page_cache_dropped": dropped,
        "tokens": a.tokens,
        "prompt_tokens": a.prompt_tokens,
        "load_s": load_s,
        "expert_record_bytes": record,
        "budget": budget,
        "warm": warm.as_ref().map(|w| w.json()),
        "machine": machine(),
        "notes": notes,
        "profile_out": profile_out,
    });
    for (k, v) in extra.as_object().expect("object") {
        m.insert(k.clone(), v.clone());
    }
    if a.json {
        println!("{j}");
        return Ok(());
    }
    let f = |v: &serde_json::Value| v.as_f64().map_or("n/a".into(), |x| format!("{x:.3}"));
    println!(
        "sluice bench: {} ({})",
        a.m.model.display(),
        c.arch.hf_name()
    );
    println!("  machine          {}", j["machine"]);
    for n in &notes {
        println!("  note             {n}");
    }
    println!(
        "  probe            {:.3} GB/s at {} KiB × qd {} (O_DIRECT), p50 {:.2} ms; in bursts of {} awaited together: {:.3} GB/s",
        probe.gbps,
        probe.request_bytes / 1024,
        probe.queue_depth,
        probe.p50_latency_s * 1e3,
        probe.queue_depth,
        burst.gbps
    );
    for (name, p) in [
        ("cold", Some(&j)),
        ("warm", j.get("warm").filter(|w| !w.is_null())),
    ] {
        let Some(p) = p else { continue };
        println!(
            "  {name:<5}            {} tok/s decode, TTFT {} s, hit rate {}, {:.2} MB read/token, read {} GB/s ({:.0}% of probe, {:.0}% of burst probe), per token: compute {:.1} ms, stall {:.1} ms",
            f(&p["tok_per_s"]),
            f(&p["ttft_s"]),
            f(&p["hit_rate"]),
            p["bytes_read_per_token"].as_f64().unwrap_or(0.0) / 1e6,
            f(&p["read_gbps"]),
            100.0 * p["read_gbps"].as_f64().unwrap_or(0.0) / probe.gbps.max(1e-12),
            100.0 * p["read_gbps"].as_f64().unwrap_or(0.0) / burst.gbps.max(1e-12),
            p["compute_s_per_token"].as_f64().unwrap_or(0.0) * 1e3,
            p["stall_s_per_token"].as_f64().unwrap_or(0.0) * 1e3,
        );
        if !p["gpu_decode_s"].is_null() {
            println!(
                "  {name:<5} gpu        {} s of the {} s decode waiting on the GPU ({} s per token)",
                f(&p["gpu_decode_s"]),
                f(&p["decode_s"]),
                f(&p["gpu_s_per_token"]),
            );
            let kb = |k: &str| p[k].as_f64().unwrap_or(0.0) / 1e3;
            println!(
                "  {name:<5} gpu        per token: {} submissions ({} per layer), {} waits, {} buffers created, {:.1} kB of activations and {:.1} kB of weights up, {:.1} kB of streamed weights bound in place, {:.1} kB back",
                f(&p["gpu_submissions_per_token"]),
                f(&p["gpu_submissions_per_layer"]),
                f(&p["gpu_waits_per_token"]),
                f(&p["gpu_buffers_created_per_token"]),
                kb("gpu_activation_bytes_up_per_token"),
                kb("gpu_weight_bytes_up_per_token"),
                kb("gpu_weight_bytes_bound_per_token"),
                kb("gpu_bytes_down_per_token"),
            );
        }
        if !p["device_tok_per_s"].is_null() {
            println!(
                "  {name:<5} device     {} tok/s decode, TTFT {} s, stall {} s of {} s (device time: {})",
                f(&p["device_tok_per_s"]),
                f(&p["device_ttft_s"]),
                f(&p["device_stall_s"]),
                f(&p["device_decode_s"]),
                a.m.device
            );
        }
    }
    println!(
        "  memory           peak RSS {:.1} MB, cap {}, capped: {}",
        peak as f64 / 1e6,
        cap.map_or("none".into(), |c| format!("{:.1} MB", c as f64 / 1e6)),
        j["capped"]
    );
    Ok(())
}

/// CPU model, cores and kernel, for the record.
/// CPU, cores and RAM (what a cached host profile must match).
pub fn fingerprint() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|x| x.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(String::new(), |kb| {
            format!(", {:.0} GB RAM", kb as f64 / 1e6)
        });
    format!("{cpu}, {cores} cores{mem}")
}

/// The machine, in words, for reports.
pub fn machine() -> String {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| format!(", Linux {}", s.trim()))
        .unwrap_or_default();
    format!("{}{kernel}", fingerprint())
}
