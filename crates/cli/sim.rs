//! `sluice sim`: what a model does on a device, from the device's profile,
//! the model's geometry and the engine's own cache and predictor code.

use crate::stream_args::StreamArgs;
use anyhow::{bail, Context, Result};
use clap::Args;
use sluice_io::IoKind;
use sluice_sim::routing::{Routes, StatRoutes, TraceRoutes};
use sluice_sim::sweep::{self, Sweep, Var};
use sluice_sim::{simulate, Profile, Residency, SimModel, SimOptions, SimReport};
use sluice_stream::Prefetch;
use std::path::PathBuf;

#[derive(Args)]
pub struct SimArgs {
    /// Device: a built-in profile (iphone-17-pro, macbook-pro-m3-max-48gb,
    /// dev-vm), host (this machine: measured on first use and cached, see
    /// SLUICE_HOST_PROFILE), or a profile TOML file (`sluice probe
    /// --profile`, `sluice bench --profile-out`).
    #[arg(long, default_value = "iphone-17-pro")]
    device: String,
    /// A model file (its headers are read, not its weights) or a preset
    /// geometry (qwen3.5-397b-a17b, qwen3-30b-a3b, ...).
    #[arg(long)]
    model: String,
    /// Weight format of a preset (q4_0, q8_0, f16, mlx4, mlx2, ...).
    #[arg(long)]
    quant: Option<String>,
    /// Layers of a preset (default: the real model's).
    #[arg(long)]
    layers: Option<usize>,
    /// Override the device's flash read bandwidth, GB/s.
    #[arg(long)]
    flash_gbps: Option<f64>,
    /// Routed experts per token instead of the config's (changes what the
    /// model computes; announced).
    #[arg(long)]
    experts_k: Option<usize>,
    /// Routing trace (JSON or llama.cpp CSV); same as --replay.
    #[arg(long)]
    trace: Option<PathBuf>,
    /// How a trace drives the routes: replay (its choices, mapped as
    /// --replay maps them) or fit (a statistical model of its per-layer
    /// popularity and token-to-token reuse).
    #[arg(long, default_value = "replay")]
    routing: String,
    /// No cache: each expert use hits with this probability (an external
    /// cache's measured hit rate, e.g. the OS page cache's).
    #[arg(long)]
    hit_rate: Option<f64>,
    /// Tokens to decode.
    #[arg(long, default_value_t = 16)]
    tokens: usize,
    /// Prompt tokens processed before decoding.
    #[arg(long, default_value_t = 8)]
    prompt_tokens: usize,
    /// Seed of statistical routing.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Skip the warm pass.
    #[arg(long)]
    no_warm: bool,
    /// Sweep the RAM cap (ram=4G:48G[:POINTS]) or the flash bandwidth
    /// (flash=1:20[:POINTS], GB/s): writes OUT.csv and OUT.svg.
    #[arg(long)]
    sweep: Option<String>,
    /// Path prefix of the sweep's CSV and SVG.
    #[arg(long, default_value = "sluice-sweep")]
    out: PathBuf,
    /// Compute threads the engine would use (scratch sizing).
    #[arg(long)]
    threads: Option<usize>,
    /// GPU devices: host-device round trips (submit and wait) the engine
    /// makes per layer, charged at the profile's compute.sync_us (default:
    /// as many as the profile's per-layer cost holds). `sluice bench
    /// --backend metal` reports the count of sluice's GPU path.
    #[arg(long)]
    syncs_per_layer: Option<f64>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    stream: StreamArgs,
}

fn model_of(a: &SimArgs) -> Result<SimModel> {
    let path = PathBuf::from(&a.model);
    let mut m = if path.exists() {
        if a.quant.is_some() || a.layers.is_some() {
            bail!(
                "--quant and --layers apply to presets; {} is a model file",
                a.model
            );
        }
        let model = sluice_engine::Model::open(&path)
            .with_context(|| format!("loading {}", path.display()))?;
        SimModel::from_model(&model, &a.model)
    } else {
        SimModel::preset(&a.model, a.quant.as_deref(), a.layers)?
    };
    if let Some(k) = a.experts_k {
        m.set_experts_k(k)?;
    }
    Ok(m)
}

fn routes_of(a: &SimArgs, m: &SimModel) -> Result<Box<dyn Routes>> {
    let trace = match (&a.trace, &a.stream.replay) {
        (Some(_), Some(_)) => bail!("give the trace once: --trace or --replay"),
        (Some(t), None) | (None, Some(t)) => Some(t),
        (None, None) => None,
    };
    let moe = m.layers.iter().filter(|l| l.moe).count();
    if !matches!(a.routing.as_str(), "replay" | "fit") {
        bail!("--routing {:?}: expected replay or fit", a.routing);
    }
    let Some(p) = trace else {
        return Ok(Box::new(StatRoutes::zipf(
            moe,
            m.experts,
            m.top_k,
            DEFAULT_ZIPF,
            DEFAULT_REUSE,
            a.seed,
        )));
    };
    let t = sluice_trace::Trace::open(p).with_context(|| "--trace".to_string())?;
    Ok(if a.routing == "replay" {
        Box::new(TraceRoutes::new(&t, &m.config))
    } else {
        Box::new(StatRoutes::fit(&t, moe, m.experts, m.top_k, a.seed))
    })
}

/// Statistical routing without a trace, matched to the six recorded
/// Qwen1.5-MoE traces: `sluice sim --model qwen1.5-moe-a2.7b --trace T
/// --routing fit` reports their top 10% of experts taking 22-30% of uses
/// (mean 23.5%, which a Zipf exponent of 0.45 gives over 60 experts) and
/// reuse of the previous token's experts of 0.15-0.19 (mean 0.17).
const DEFAULT_ZIPF: f64 = 0.45;
const DEFAULT_REUSE: f64 = 0.17;

fn options_of(a: &SimArgs) -> Result<SimOptions> {
    if a.tokens == 0 || a.prompt_tokens == 0 {
        bail!("--tokens and --prompt-tokens must be at least 1");
    }
    if let Some(r) = a.hit_rate {
        if !(0.0..=1.0).contains(&r) {
            bail!("--hit-rate {r} is not in 0..=1");
        }
    }
    let s = &a.stream;
    let residency = if s.io == Some(IoKind::Mmap) || s.buffered {
        Residency::PageCache
    } else {
        Residency::Slots
    };
    let trace = a.trace.is_some() || s.replay.is_some();
    let prefetch = match (s.prefetch.0, residency) {
        (None, Residency::PageCache) => Prefetch::None,
        (None, _) if a.hit_rate.is_some() => Prefetch::None,
        (None, _) if trace => Prefetch::Token,
        (None, _) => Prefetch::Xlayer,
        (Some(Prefetch::Oracle), _) if !trace => {
            bail!("--prefetch oracle needs a --trace to know the future from")
        }
        (Some(p), _) => p,
    };
    let prefetch_depth = sluice_runtime::prefetch_depth(prefetch, s.prefetch_depth);
    Ok(SimOptions {
        ram_cap: s.ram_cap,
        residency,
        fixed_hit_rate: a.hit_rate,
        slots: s.cache_slots,
        policy: s.cache_policy,
        prefetch,
        prefetch_k: s.prefetch_k,
        prefetch_depth,
        prefetch_seed: crate::stream_args::open_seeds(&s.prefetch_seed)?,
        read_chunk: s.read_chunk,
        queue_depth: s.queue_depth.max(1),
        tokens: a.tokens,
        prompt_tokens: a.prompt_tokens,
        warm: !a.no_warm,
        threads: a
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
        syncs_per_layer: a.syncs_per_layer,
    })
}

/// Decode tok/s if reading were the only cost.
fn flash_bound(p: &Profile, bytes_per_token: f64) -> Option<f64> {
    (bytes_per_token > 0.0).then(|| p.flash.read_gbps.value * 1e9 / bytes_per_token)
}

pub fn sim(a: SimArgs) -> Result<()> {
    crate::hostprof::resolve_device(&a.device)?;
    let mut profile = Profile::open(&a.device)?;
    if let Some(g) = a.flash_gbps {
        profile.set("flash.read_gbps", g)?;
    }
    let m = model_of(&a)?;
    let o = options_of(&a)?;
    if let Some(sw) = &a.sweep {
        return run_sweep(&a, &profile, &m, &o, &Sweep::parse(sw)?);
    }
    let mut routes = routes_of(&a, &m)?;
    let r = simulate(&m, &profile, &o, routes.as_mut())?;
    let mut notes = r.notes.clone();
    if let Some(k) = a.experts_k {
        notes.insert(
            0,
            format!("--experts-k {k}: {k} routed experts per token instead of the model's own; the model computes something else"),
        );
    }
    let j = report_json(&a, &profile, &m, &o, &r, &notes);
    if a.json {
        println!("{j}");
        return Ok(());
    }
    println!(
        "sluice sim: {} on {} ({})",
        m.name, profile.name, profile.origin
    );
    for n in &notes {
        println!("  note             {n}");
    }
    println!(
        "  model            {} layers, {} experts/layer, top-{}, {:.2} MB per expert, {:.2} GB resident weights, {:.1} GB of experts",
        m.layers.len(),
        m.experts,
        m.top_k,
        m.record_bytes as f64 / 1e6,
        m.dense_bytes as f64 / 1e9,
        m.expert_bytes_total() as f64 / 1e9
    );
    println!(
        "  device           flash {:.2} GB/s, {:.0} µs, qd {}; {} matvec {:.1} GB/s; RAM cap {:.2} GB",
        profile.flash.read_gbps.value,
        profile.flash.latency_us.value,
        profile.flash.queue_depth.value,
        profile.compute.unit,
        profile.compute.matvec_gbps.value,
        r.budget.cap as f64 / 1e9
    );
    println!("  budget           {}", r.budget.describe());
    for (name, p) in [("cold", Some(&r.cold)), ("warm", r.warm.as_ref())] {
        let Some(p) = p else { continue };
        let bpt = p.bytes_read as f64 / p.tokens.max(1) as f64;
        println!(
            "  {name:<5}            {:.3} tok/s decode, TTFT {:.3} s, hit rate {:.3}, {:.2} MB read/token, stall {:.3} s of {:.3} s; flash bound {}",
            p.tok_per_s(),
            p.ttft_s,
            p.hit_rate(),
            bpt / 1e6,
            p.stall_s,
            p.decode_s,
            flash_bound(&profile, bpt).map_or("none (no reads)".into(), |b| format!("{b:.2} tok/s")),
        );
    }
    if let Some((n, s)) = r.sync {
        let per = r.warm.as_ref().unwrap_or(&r.cold);
        let token = per.decode_s / per.tokens.max(1) as f64;
        println!(
            "  sync             {n} round trips per layer × {} µs = {:.1} ms per token ({:.1}% of a {} decode token){}",
            profile.compute.sync_us.as_ref().map_or(0.0, |f| f.value),
            s * 1e3,
            100.0 * s / token.max(1e-12),
            if r.warm.is_some() { "warm" } else { "cold" },
            if a.syncs_per_layer.is_none() { "; --syncs-per-layer N models another engine" } else { "" },
        );
    }
    let worst = r
        .cold
        .layers
        .iter()
        .enumerate()
        .max_by(|x, y| x.1.stall_s.total_cmp(&y.1.stall_s));
    if let Some((l, t)) = worst.filter(|(_, t)| t.stall_s > 0.0) {
        println!(
            "  stall            most in layer {l}: {:.3} s ({:.0}% of the decode's stall); --json lists every layer",
            t.stall_s,
            100.0 * t.stall_s / r.cold.stall_s.max(1e-12)
        );
    }
    Ok(())
}

fn report_json(
    a: &SimArgs,
    p: &Profile,
    m: &SimModel,
    o: &SimOptions,
    r: &SimReport,
    notes: &[String],
) -> serde_json::Value {
    let prefetch = o.prefetch != Prefetch::None;
    let mut j = r.cold.json(prefetch);
    let bpt = r.cold.bytes_read as f64 / r.cold.tokens.max(1) as f64;
    let b = &r.budget;
    let extra = serde_json::json!({
        "model": a.model,
        "device": p.to_json(),
        "simulated": true,
        "tokens": o.tokens,
        "prompt_tokens": o.prompt_tokens,
        "top_k": m.top_k,
        "experts_k_override": a.experts_k,
        "residency": match o.residency { Residency::Slots => "slots", Residency::PageCache => "page-cache" },
        "cache_policy": o.policy.name(),
        "prefetch": o.prefetch.name(),
        "ram_cap_bytes": b.cap,
        "expert_record_bytes": m.record_bytes,
        "dense_bytes": m.dense_bytes,
        "flash_bound_tok_per_s": flash_bound(p, bpt),
        "syncs_per_layer": r.sync.map(|c| c.0),
        "sync_s_per_token": r.sync.map(|c| c.1),
        "budget": {"baseline": b.baseline, "margin": b.margin, "dense": b.dense, "kv": b.kv,
            "scratch": b.scratch, "device": b.device, "slot": b.slot, "slots": b.slots, "experts": b.experts_total},
        "warm": r.warm.as_ref().map(|w| w.json(prefetch)),
        "notes": notes,
    });
    let obj = j.as_object_mut().expect("object");
    for (k, v) in extra.as_object().expect("object") {
        obj.insert(k.clone(), v.clone());
    }
    j
}

fn run_sweep(a: &SimArgs, p: &Profile, m: &SimModel, o: &SimOptions, sw: &Sweep) -> Result<()> {
    let mut pts = Vec::new();
    for &v in &sw.points {
        let mut p = p.clone();
        let mut o = o.clone();
        o.warm = false;
        match sw.var {
            Var::Ram => o.ram_cap = Some(v as u64),
            Var::Flash => p.set("flash.read_gbps", v)?,
        }
        let mut routes = routes_of(a, m)?;
        let point = match simulate(m, &p, &o, routes.as_mut()) {
            Ok(r) => {
                let bpt = r.cold.bytes_read as f64 / r.cold.tokens.max(1) as f64;
                sweep::Point {
                    x: sw.x(v),
                    tok_per_s: Some(r.cold.tok_per_s()),
                    hit_rate: Some(r.cold.hit_rate()),
                    bytes_per_token: Some(bpt),
                    bound: flash_bound(&p, bpt),
                }
            }
            // A cap too small for the model is a hole in the curve.
            Err(sluice_core::Error::Budget { .. }) if sw.var == Var::Ram => sweep::Point {
                x: sw.x(v),
                tok_per_s: None,
                hit_rate: None,
                bytes_per_token: None,
                bound: None,
            },
            Err(e) => return Err(e.into()),
        };
        pts.push(point);
    }
    if pts.iter().all(|p| p.tok_per_s.is_none()) {
        bail!(
            "no point of the sweep fits: every RAM cap is too small for {}",
            m.name
        );
    }
    let csv = a.out.with_extension("csv");
    let svg = a.out.with_extension("svg");
    sweep::write_csv(&csv, sw, &pts)?;
    let title = format!("{} on {}: decode tok/s vs {}", m.name, p.name, sw.label());
    sweep::write_svg(&svg, &title, sw, &pts)?;
    if a.json {
        let rows: Vec<_> = pts
            .iter()
            .map(|p| {
                serde_json::json!({"x": p.x, "tok_per_s": p.tok_per_s, "hit_rate": p.hit_rate,
                "bytes_read_per_token": p.bytes_per_token, "flash_bound_tok_per_s": p.bound})
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({"sweep": sw.label(), "csv": csv, "svg": svg, "points": rows})
        );
    } else {
        println!("{}", sw.label());
        for p in &pts {
            println!(
                "  {:>8.2}  {}",
                p.x,
                p.tok_per_s.map_or("cap too small".into(), |t| format!(
                    "{t:.3} tok/s (hit rate {:.3}, flash bound {:.2})",
                    p.hit_rate.unwrap_or(0.0),
                    p.bound.unwrap_or(f64::INFINITY)
                ))
            );
        }
        println!("wrote {} and {}", csv.display(), svg.display());
    }
    Ok(())
}
