//! The `sluice` command line.

mod bench;
mod chat;
mod hostprof;
mod sim;
mod stream_args;
mod tools;
mod trace;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use sluice_engine::model::Ffn;
use sluice_engine::{Model, Sampler, TextStream, Tokenizer};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;
use stream_args::ModelArgs;

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "Stream MoE expert weights from storage into compute"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print the logits at every position of a token sequence as JSON.
    Logits(LogitsArgs),
    /// Generate text, streamed as it is produced.
    Generate(GenerateArgs),
    /// Describe a model: architecture, experts, bytes, quant types.
    Inspect(InspectArgs),
    /// Measure decode speed, hit rate, bandwidth and memory under a RAM cap.
    Bench(bench::BenchArgs),
    /// Rewrite a model into the packed streaming layout.
    Pack(tools::PackArgs),
    /// Write a random-weight model of a real geometry.
    Synth(tools::SynthArgs),
    /// Measure the drive's read bandwidth and latency with O_DIRECT.
    Probe(tools::ProbeArgs),
    /// Synthesize a model several times larger than a small RAM cap and
    /// stream it: tok/s, hit rate, achieved vs probed bandwidth.
    Demo(tools::DemoArgs),
    /// Routing traces: statistics of cache policies and predictors, import.
    Trace(trace::TraceArgs),
    /// Predict tok/s, TTFT, hit rate and stalls on a device (profile),
    /// for any RAM cap and flash bandwidth; sweeps write CSV and SVG.
    Sim(sim::SimArgs),
    /// Chat with a model in the terminal, with its own chat template; the
    /// conversation's KV cache is kept between turns.
    Chat(chat::ChatArgs),
    /// Serve a model over an OpenAI-compatible HTTP API
    /// (/v1/chat/completions with streaming and tool calls,
    /// /v1/completions, /v1/models, /health, /metrics).
    Serve(chat::ServeArgs),
}

#[derive(Args)]
struct LogitsArgs {
    #[command(flatten)]
    m: ModelArgs,
    /// Comma-separated token ids.
    #[arg(long, value_delimiter = ',', required = true)]
    tokens: Vec<u32>,
}

#[derive(Args)]
pub(crate) struct GenerateArgs {
    #[command(flatten)]
    m: ModelArgs,
    /// Prompt text (needs a tokenizer).
    #[arg(long, conflicts_with = "tokens")]
    prompt: Option<String>,
    /// Prompt as comma-separated token ids.
    #[arg(long, value_delimiter = ',')]
    tokens: Option<Vec<u32>>,
    /// Tokens to generate.
    #[arg(short = 'n', long = "max-tokens", default_value_t = 64)]
    n: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling mass.
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// Prompt tokens processed per forward batch.
    #[arg(long, default_value_t = 256)]
    batch: usize,
}

#[derive(Args)]
struct InspectArgs {
    /// Safetensors model directory or GGUF file.
    path: PathBuf,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

fn logits(a: LogitsArgs) -> Result<()> {
    let mut o = stream_args::open(&a.m, a.tokens.len(), a.tokens.len())?;
    for n in &o.notes {
        eprintln!("note: {n}");
    }
    let model = o.model.clone();
    let mut s = o.session();
    let l = s.forward(&a.tokens, true)?;
    let rows: Vec<&[f32]> = l.chunks_exact(model.config.vocab).collect();
    let out = serde_json::json!({"tokens": a.tokens, "logits": rows});
    let stdout = std::io::stdout();
    let mut w = std::io::BufWriter::new(stdout.lock());
    serde_json::to_writer(&mut w, &out)?;
    writeln!(w)?;
    Ok(())
}

/// Generates; with `record`, writes the run's routing trace there.
pub(crate) fn generate(a: GenerateArgs, record: Option<&std::path::Path>) -> Result<()> {
    // The prompt's length is known only after tokenizing: open the
    // container for its tokenizer first (headers only).
    let tok = Tokenizer::for_model(
        &sluice_format::ModelFiles::open(&a.m.model)
            .with_context(|| format!("loading {}", a.m.model.display()))?,
    )?;
    let prompt: Vec<u32> = match (&a.prompt, &a.tokens, &tok) {
        (Some(p), _, Some(t)) => t.encode(p)?,
        (Some(_), _, None) => bail!(
            "{} has no tokenizer: pass the prompt as --tokens 1,2,3",
            a.m.model.display()
        ),
        (None, Some(ids), _) => ids.clone(),
        (None, None, _) => bail!("give a --prompt or --tokens"),
    };
    if prompt.is_empty() {
        bail!("the prompt is empty");
    }
    let mut o = stream_args::open(&a.m, prompt.len() + a.n + 1, a.batch.max(1))?;
    for n in &o.notes {
        eprintln!("note: {n}");
    }
    let model = o.model.clone();
    let mut s = o.session();
    type Routes = Vec<(usize, usize, Vec<u32>, Vec<f32>)>;
    let routes: std::sync::Arc<std::sync::Mutex<Routes>> = Default::default();
    if record.is_some() {
        let r = routes.clone();
        s.set_observer(Some(Box::new(move |x| {
            r.lock().expect("not poisoned").push((
                x.pos,
                x.layer,
                x.experts.iter().map(|&e| e as u32).collect(),
                x.weights.to_vec(),
            ));
        })));
    }
    let mut fed: Vec<u32> = prompt.clone();
    let mut sampler = Sampler::new(a.temperature, a.top_p, a.seed);
    let d0 = o.clock.as_ref().map(|c| c.time());
    let t0 = Instant::now();
    let mut last = Vec::new();
    for chunk in prompt.chunks(a.batch.max(1)) {
        last = s.forward(chunk, false)?;
    }
    let ttft = t0.elapsed();
    let d1 = o.clock.as_ref().map(|c| c.time());
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut stream = TextStream::new();
    let t1 = Instant::now();
    let mut produced = 0;
    for i in 0..a.n {
        let next = sampler.sample(&last);
        produced += 1;
        match &tok {
            Some(t) => write!(out, "{}", stream.push(t, next)?)?,
            None => write!(out, "{}{next}", if i > 0 { "," } else { "" })?,
        }
        out.flush()?;
        if !a.ignore_eos && model.config.eos.contains(&next) {
            break;
        }
        if i + 1 < a.n {
            last = s.forward(&[next], false)?;
            fed.push(next);
        }
    }
    writeln!(out)?;
    let dt = t1.elapsed().as_secs_f64();
    eprintln!(
        "prompt {} tokens in {:.3}s ({:.1} tok/s); generated {produced} tokens at {:.2} tok/s",
        prompt.len(),
        ttft.as_secs_f64(),
        prompt.len() as f64 / ttft.as_secs_f64().max(1e-9),
        produced as f64 / dt.max(1e-9)
    );
    if let (Some(c), Some(d0), Some(d1)) = (&o.clock, d0, d1) {
        let d2 = c.time();
        eprintln!(
            "on the simulated device ({}): prompt in {:.3}s, generated at {:.2} tok/s, {:.3}s of {:.3}s waiting for flash",
            a.m.device,
            d1.now_s - d0.now_s,
            produced as f64 / (d2.now_s - d1.now_s).max(1e-9),
            d2.stall_s - d1.stall_s,
            d2.now_s - d1.now_s
        );
    }
    if let Some(path) = record {
        let c = &model.config;
        let mut steps: Vec<sluice_trace::Step> = fed
            .iter()
            .enumerate()
            .map(|(p, &t)| sluice_trace::Step {
                pos: p,
                token: Some(t),
                decode: p >= prompt.len(),
                layers: vec![None; c.n_layers],
            })
            .collect();
        for (pos, layer, experts, weights) in routes.lock().expect("not poisoned").drain(..) {
            if let Some(st) = steps.get_mut(pos) {
                st.layers[layer] = Some(sluice_trace::LayerRoute { experts, weights });
            }
        }
        let t = sluice_trace::Trace {
            model_id: a.m.model.display().to_string(),
            layers: c.n_layers,
            experts: c.n_experts,
            top_k: c.top_k,
            steps,
        };
        std::fs::write(path, t.to_json().to_string())
            .with_context(|| format!("{}", path.display()))?;
        eprintln!(
            "wrote routing trace {} ({} tokens)",
            path.display(),
            fed.len()
        );
    }
    if let Some(st) = s.streamer() {
        let x = st.stats();
        eprintln!(
            "experts: hit rate {:.3}, {:.2} MB read, stalled {:.3}s; peak RSS {:.1} MB",
            x.hit_rate(),
            x.bytes_read as f64 / 1e6,
            x.stall.as_secs_f64(),
            sluice_io::sys::peak_rss_bytes().unwrap_or(0) as f64 / 1e6
        );
    }
    Ok(())
}

fn inspect(a: InspectArgs) -> Result<()> {
    let model = Model::open(&a.path).with_context(|| format!("loading {}", a.path.display()))?;
    let c = &model.config;
    let mut expert_bytes = 0u64;
    let mut per_expert = BTreeMap::<u64, usize>::new();
    let mut moe_layers = 0;
    let mut shared = false;
    for l in &model.layers {
        if let Ffn::Moe(m) = &l.ffn {
            moe_layers += 1;
            shared |= m.shared.is_some();
            for e in &m.experts {
                expert_bytes += e.nbytes();
                *per_expert.entry(e.nbytes()).or_default() += 1;
            }
        }
    }
    let total = model.files.total_tensor_bytes();
    let file_bytes: u64 = model.files.files().iter().map(|f| f.len()).sum();
    let mut types = BTreeMap::<String, (usize, u64)>::new();
    for t in model.files.tensors() {
        let e = types.entry(t.dtype_name.clone()).or_default();
        e.0 += 1;
        e.1 += t.nbytes;
    }
    let bytes_per_expert = per_expert.keys().next_back().copied().unwrap_or(0);
    let container = if model.files.gguf().is_some() {
        "gguf"
    } else {
        "safetensors"
    };
    let j = serde_json::json!({
        "path": a.path,
        "container": container,
        "architecture": c.arch.hf_name(),
        "layers": c.n_layers,
        "moe_layers": moe_layers,
        "hidden_size": c.hidden,
        "heads": c.n_heads,
        "kv_heads": c.n_kv_heads,
        "head_dim": c.head_dim,
        "vocab": c.vocab,
        "experts": c.n_experts,
        "top_k": c.top_k,
        "shared_expert": shared,
        "bytes_per_expert": bytes_per_expert,
        "expert_bytes": expert_bytes,
        "dense_bytes": total - expert_bytes,
        "tensor_bytes": total,
        "file_bytes": file_bytes,
        "expert_share": if file_bytes > 0 { expert_bytes as f64 / file_bytes as f64 } else { 0.0 },
        "active_bytes_per_token": (total - expert_bytes) + bytes_per_expert * (c.top_k * moe_layers) as u64,
        "quant_types": types.iter().map(|(k, (n, b))| (k.clone(), serde_json::json!({"tensors": n, "bytes": b}))).collect::<serde_json::Map<_, _>>(),
    });
    if a.json {
        println!("{j}");
        return Ok(());
    }
    let mb = |b: u64| format!("{:.2} MiB", b as f64 / (1 << 20) as f64);
    println!("{} ({container})", a.path.display());
    println!("  architecture     {}", c.arch.hf_name());
    println!("  layers           {} ({moe_layers} MoE)", c.n_layers);
    match c.mla {
        Some(m) => println!(
            "  attention        latent: {} heads, q_lora {}, kv_lora {} (+{} rotary) cached per position, head dims {}+{} / v {}, hidden {}",
            c.n_heads, m.q_lora, m.kv_lora, m.rope, m.nope, m.rope, m.v, c.hidden
        ),
        None => println!(
            "  attention        {} heads, {} kv heads, head dim {}, hidden {}",
            c.n_heads, c.n_kv_heads, c.head_dim, c.hidden
        ),
    }
    if c.routing.sigmoid {
        println!(
            "  routing          sigmoid + selection bias, {} of {} groups, scale {}",
            c.routing.topk_group, c.routing.n_group, c.routing.scale
        );
    }
    if let Some(y) = c.yarn {
        println!(
            "  rope             YaRN ×{} over {} positions",
            y.factor, y.orig_ctx
        );
    }
    println!(
        "  experts          {} per layer, top-{}{}",
        c.n_experts,
        c.top_k,
        if shared { " + shared expert" } else { "" }
    );
    println!(
        "  bytes per expert {} ({bytes_per_expert} B)",
        mb(bytes_per_expert)
    );
    println!("  expert bytes     {}", mb(expert_bytes));
    println!("  dense bytes      {}", mb(total - expert_bytes));
    println!(
        "  experts share    {:.1}% of {}",
        100.0 * expert_bytes as f64 / file_bytes.max(1) as f64,
        mb(file_bytes)
    );
    println!(
        "  quant types      {}",
        types
            .iter()
            .map(|(k, (n, _))| format!("{k}×{n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

fn main() {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                e.exit();
            }
            // One line, like every other error; `--help` has the rest.
            let msg = e.to_string();
            let line = msg.lines().next().unwrap_or("invalid arguments");
            eprintln!("error: {}", line.trim_start_matches("error: "));
            std::process::exit(1);
        }
    };
    let r = match cli.cmd {
        Cmd::Logits(a) => logits(a),
        Cmd::Generate(a) => generate(a, None),
        Cmd::Inspect(a) => inspect(a),
        Cmd::Bench(a) => bench::bench(a),
        Cmd::Pack(a) => tools::pack(a),
        Cmd::Synth(a) => tools::synth(a),
        Cmd::Probe(a) => tools::probe(&a),
        Cmd::Demo(a) => tools::demo(a),
        Cmd::Trace(a) => trace::trace(a),
        Cmd::Sim(a) => sim::sim(a),
        Cmd::Chat(a) => chat::chat(a),
        Cmd::Serve(a) => chat::serve(a),
    };
    if let Err(e) = r {
        eprintln!("error: {}", words(&e));
        std::process::exit(1);
    }
}

/// The error for the user: library errors that name no flag are worded
/// with the flags that set what they are about.
fn words(e: &anyhow::Error) -> String {
    let budget = e
        .chain()
        .find_map(|c| match c.downcast_ref::<sluice_core::Error>() {
            Some(sluice_core::Error::Budget { needed, cap, parts }) => Some((*needed, *cap, parts)),
            _ => None,
        });
    match budget {
        Some((needed, cap, parts)) => format!(
            "--ram-cap {} is too small for this model: {parts} need at least {} (raise --ram-cap{})",
            sluice_core::fmt_size(cap),
            sluice_core::fmt_size(needed),
            if parts.contains("expert slots") {
                " or lower --cache-slots"
            } else {
                ""
            }
        ),
        None => format!("{e:#}"),
    }
}
