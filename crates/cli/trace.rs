//! `sluice trace`: routing traces.

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use sluice_trace::{stats, StatsOptions, Trace};
use std::path::PathBuf;

#[derive(Args)]
pub struct TraceArgs {
    #[command(subcommand)]
    cmd: TraceCmd,
}

#[derive(Subcommand)]
enum TraceCmd {
    /// Hit rates of each cache policy and Belady's optimum, and each
    /// predictor's recall, precision, all-K-ready rate and waste, from the
    /// engine's own cache and predictor code, without running a model.
    Stats(StatsArgs),
    /// Convert a trace (JSON or llama.cpp moe-trace CSV) to sluice's JSON.
    Import(ImportArgs),
    /// Generate like `sluice generate` and write the run's routing trace
    /// (token, phase, layer, experts, weights) as JSON.
    Record(Box<RecordArgs>),
}

#[derive(Args)]
struct RecordArgs {
    #[command(flatten)]
    g: crate::GenerateArgs,
    /// Output trace.
    #[arg(short, long)]
    out: PathBuf,
}

#[derive(Args)]
struct StatsArgs {
    /// Trace file (JSON, or llama.cpp CSV `layer,expert` rows).
    trace: PathBuf,
    /// Expert slots per layer.
    #[arg(long, value_delimiter = ',', default_value = "8,16,32")]
    slots: Vec<usize>,
    /// Tokens simulated, from an empty cache: decode or all.
    #[arg(long, default_value = "all")]
    phase: String,
    /// Bytes of one expert, for the wasted-bytes figures.
    #[arg(long, default_value_t = 0)]
    expert_bytes: u64,
    /// Traces of earlier sessions every predictor learns from first
    /// (comma-separated), as a table kept between sessions would.
    #[arg(long, value_delimiter = ',')]
    seed: Vec<PathBuf>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ImportArgs {
    /// Input trace.
    input: PathBuf,
    /// Output JSON.
    #[arg(short, long)]
    out: PathBuf,
}

pub fn trace(a: TraceArgs) -> Result<()> {
    match a.cmd {
        TraceCmd::Stats(s) => trace_stats(s),
        TraceCmd::Record(r) => {
            let r = *r;
            crate::generate(r.g, Some(&r.out))
        }
        TraceCmd::Import(i) => {
            let t = Trace::open(&i.input)?;
            std::fs::write(&i.out, t.to_json().to_string())
                .with_context(|| format!("{}", i.out.display()))?;
            println!(
                "wrote {}: {} tokens, {} layers × {} experts, top-{}",
                i.out.display(),
                t.steps.len(),
                t.layers,
                t.experts,
                t.top_k
            );
            Ok(())
        }
    }
}

fn trace_stats(a: StatsArgs) -> Result<()> {
    let decode_only = match a.phase.as_str() {
        "decode" => true,
        "all" => false,
        p => bail!("--phase {p}: expected decode or all"),
    };
    if a.slots.is_empty() || a.slots.contains(&0) {
        bail!("--slots needs counts of at least 1");
    }
    let t = Trace::open(&a.trace)?;
    let seed = a
        .seed
        .iter()
        .map(|p| Trace::open(p).with_context(|| format!("--seed {}", p.display())))
        .collect::<Result<Vec<_>>>()?;
    let s = stats(
        &t,
        &StatsOptions {
            slots: a.slots.clone(),
            decode_only,
            expert_bytes: a.expert_bytes,
            seed,
        },
    );
    if a.json {
        println!("{s}");
        return Ok(());
    }
    println!(
        "{}: {} layers × {} experts, top-{}, {} tokens simulated ({})",
        a.trace.display(),
        s["layers"],
        t.experts,
        t.top_k,
        s["tokens"],
        s["phase"].as_str().unwrap_or("")
    );
    let pols = s["policies"].as_object().expect("object");
    print!("{:<16}", "slots/layer");
    for n in &a.slots {
        print!("{n:>8}");
    }
    println!();
    for (name, v) in pols {
        print!("{name:<16}");
        for n in &a.slots {
            print!("{:>8.3}", v[n.to_string()].as_f64().unwrap_or(0.0));
        }
        println!();
    }
    for (name, v) in s["predictors"].as_object().expect("object") {
        for n in &a.slots {
            let p = &v[n.to_string()];
            println!(
                "predictor {name} @{n}: recall {:.3}, precision {:.3}, all-K-ready {:.3}, wasted {:.2} experts/token",
                p["recall"].as_f64().unwrap_or(0.0),
                p["precision"].as_f64().unwrap_or(0.0),
                p["all_k_ready_rate"].as_f64().unwrap_or(0.0),
                p["wasted_prefetches_per_token"].as_f64().unwrap_or(0.0)
            );
        }
    }
    Ok(())
}
