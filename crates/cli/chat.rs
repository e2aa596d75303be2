//! `sluice chat` and `sluice serve`: the model's chat template, a session
//! that keeps the conversation's KV cache, in a terminal or behind an
//! OpenAI-compatible HTTP API.

use crate::stream_args::{self, ModelArgs};
use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::{json, Map, Value as Json};
use sluice_engine::Tokenizer;
use sluice_serve::server::{EngineFigures, ServeConfig};
use sluice_serve::template::CHATML;
use sluice_serve::{ChatTemplate, GenParams, Generator};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

/// The model and how it is prompted, for `chat` and `serve`.
#[derive(Args)]
struct ChatModelArgs {
    #[command(flatten)]
    m: ModelArgs,
    /// Tokens the context holds: a whole conversation (chat) or one
    /// request's prompt and answer (serve).
    #[arg(long, default_value_t = 4096)]
    ctx: usize,
    /// Prompt tokens run per forward step.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// A Jinja chat template file instead of the model's own.
    #[arg(long)]
    chat_template: Option<PathBuf>,
}

#[derive(Args)]
pub struct ChatArgs {
    #[command(flatten)]
    c: ChatModelArgs,
    /// A system message to start the conversation with.
    #[arg(long)]
    system: Option<String>,
    /// Tokens per answer at most.
    #[arg(long, default_value_t = 1024)]
    max_tokens: usize,
    /// Sampling temperature (0: greedy).
    #[arg(long, default_value_t = 0.7)]
    temperature: f32,
    /// Nucleus sampling mass.
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    /// Sampler seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Ask thinking models not to think (the template's `enable_thinking`).
    #[arg(long)]
    no_think: bool,
}

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    c: ChatModelArgs,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0: any free port, printed).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Requests that may wait for the model; more are refused with 503.
    #[arg(long, default_value_t = 8)]
    queue: usize,
    /// The model's name in the API (default: the file's name).
    #[arg(long)]
    model_name: Option<String>,
    /// Conversations whose state (KV cache and all) is kept: requests
    /// take turns on the one streamed model, and one that continues a
    /// kept conversation runs only its new tokens. Each costs a context's
    /// KV cache under the cap.
    #[arg(long, default_value_t = 1)]
    sessions: usize,
}

/// The model's template, a file given instead, or ChatML for a model that
/// carries none but has ChatML's tokens.
fn template(
    files: &sluice_format::ModelFiles,
    file: Option<&Path>,
    tok: &Tokenizer,
) -> Result<ChatTemplate> {
    let model = &files.path;
    if let Some(f) = file {
        let src = std::fs::read_to_string(f)
            .with_context(|| format!("--chat-template {}", f.display()))?;
        return Ok(ChatTemplate::new(&src, "", "", &f.display().to_string())?);
    }
    match ChatTemplate::for_model(files)? {
        Some(t) => Ok(t),
        None if tok.token_id("<|im_start|>").is_some() => {
            eprintln!("note: {} carries no chat template; its vocabulary has ChatML's tokens, so ChatML is used", model.display());
            Ok(ChatTemplate::new(CHATML, "", "", "ChatML (built in)")?)
        }
        None => bail!(
            "{} carries no chat template: give one with --chat-template FILE",
            model.display()
        ),
    }
}

/// The model opened for chat: generator and template.
/// Opens the model for `sessions` conversations kept at once.
fn open(a: &ChatModelArgs, sessions: usize) -> Result<(Generator, ChatTemplate, usize)> {
    let (m, ctx, batch) = (&a.m, a.ctx, a.batch);
    if ctx < 16 {
        bail!("--ctx {ctx} is too small for a conversation");
    }
    let files = sluice_format::ModelFiles::open(&m.model)
        .with_context(|| format!("loading {}", m.model.display()))?;
    let tok = Tokenizer::for_model(&files)?
        .with_context(|| format!("{} has no tokenizer to chat with", m.model.display()))?;
    let t = template(&files, a.chat_template.as_deref(), &tok)?;
    drop(files);
    let mut o = stream_args::open_with(
        m,
        ctx,
        batch.max(1),
        sluice_serve::chat::SNAPSHOTS * sessions,
        sessions - 1,
    )?;
    for n in &o.notes {
        eprintln!("note: {n}");
    }
    let eos = o.model.config.eos.clone();
    let top_k = o.model.config.top_k;
    let s = o.session();
    let g = Generator::new(s, tok, &eos, ctx, batch).with_parked(sessions - 1);
    Ok((g, t, top_k))
}

fn figures(g: &Generator) -> EngineFigures {
    let st = g.session().streamer().map(|s| s.stats());
    EngineFigures {
        hits: st.map_or(0, |s| s.hits),
        misses: st.map_or(0, |s| s.misses),
        bytes_read: st.map_or(0, |s| s.bytes_read),
        stall_s: st.map_or(0.0, |s| s.stall.as_secs_f64()),
        rss: sluice_io::sys::rss_bytes().unwrap_or(0),
        peak_rss: sluice_io::sys::peak_rss_bytes().unwrap_or(0),
    }
}

pub fn chat(a: ChatArgs) -> Result<()> {
    let (mut gen, t, _) = open(&a.c, 1)?;
    let cap = a.c.m.stream.ram_cap;
    let mut history: Vec<Json> = Vec::new();
    let start = |h: &mut Vec<Json>| {
        h.clear();
        if let Some(s) = &a.system {
            h.push(json!({"role": "system", "content": s}));
        }
    };
    start(&mut history);
    let mut extra = Map::new();
    if a.no_think {
        extra.insert("enable_thinking".into(), false.into());
    }
    eprintln!(
        "sluice chat: {} ({} template); /reset starts over, /exit or end of input quits",
        a.c.m.model.display(),
        t.origin
    );
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    let mut turn = 0u64;
    loop {
        eprint!("> ");
        std::io::stderr().flush()?;
        let Some(line) = lines.next() else { break };
        let line = line?;
        let text = line.trim();
        match text {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                start(&mut history);
                gen.reset();
                eprintln!("(conversation reset)");
                continue;
            }
            _ => {}
        }
        history.push(json!({"role": "user", "content": text}));
        let prompt = t.render(&history, None, true, &extra)?;
        let ids = gen.tokenizer().encode(&prompt)?;
        let p = GenParams {
            max_tokens: a.max_tokens,
            temperature: a.temperature,
            top_p: a.top_p,
            seed: a.seed.wrapping_add(turn),
            ..GenParams::default()
        };
        turn += 1;
        let mut out = std::io::stdout().lock();
        let r = gen.generate(&ids, &p, &mut |piece| {
            let _ = write!(out, "{piece}");
            let _ = out.flush();
            true
        });
        let o = match r {
            Ok(o) => o,
            Err(e) => {
                history.pop();
                eprintln!("\nerror: {e}");
                continue;
            }
        };
        writeln!(out)?;
        drop(out);
        history.push(json!({"role": "assistant", "content": o.text}));
        let f = figures(&gen);
        let hits = if f.hits + f.misses == 0 {
            "no expert reads".to_string()
        } else {
            format!("hit rate {:.2}", f.hits as f64 / (f.hits + f.misses) as f64)
        };
        eprintln!(
            "[{} tokens, {:.2} tok/s, TTFT {:.2} s ({} of {} prompt tokens reused), {hits}, peak RSS {}{}, {}]",
            o.completion_tokens,
            o.tok_per_s(),
            o.ttft_s,
            o.reused_tokens,
            o.prompt_tokens,
            sluice_core::fmt_size(f.peak_rss),
            cap.map_or(String::new(), |c| format!(" of the {} cap", sluice_core::fmt_size(c))),
            o.finish.reason()
        );
    }
    Ok(())
}

pub fn serve(a: ServeArgs) -> Result<()> {
    if a.queue == 0 {
        bail!("--queue must be at least 1");
    }
    if a.sessions == 0 {
        bail!("--sessions must be at least 1");
    }
    let sessions = a.sessions;
    let (gen, t, top_k) = open(&a.c, sessions)?;
    let name = a.model_name.clone().unwrap_or_else(|| {
        a.c.m
            .model
            .file_name()
            .map_or("model".into(), |n| n.to_string_lossy().into_owned())
    });
    // `sessions` conversations' state is kept; the expert slots beyond
    // the least a layer needs could hold this many more instead.
    let kv = gen.session().streamer().map(|s| {
        let b = s.budget();
        let spare = b.slots.saturating_sub(top_k) as u64 * b.slot;
        (b.kv, spare / (b.kv / sessions as u64).max(1))
    });
    let cfg = ServeConfig {
        model_name: name.clone(),
        queue: a.queue,
        ram_cap: a.c.m.stream.ram_cap,
        figures: Box::new(figures),
    };
    let addr = format!("{}:{}", a.host, a.port);
    let (ctx, queue) = (a.c.ctx, a.queue);
    sluice_serve::server::serve_blocking(&addr, gen, t, cfg, move |at| {
        eprintln!(
            "sluice serve: {name} on http://{at}/v1 (chat/completions, completions, models; /health, /metrics); {sessions} session{} of {ctx} tokens{}: requests take turns, {queue} may wait, more get 503",
            if sessions == 1 { "" } else { "s" },
            kv.map_or(String::new(), |(b, more)| format!(
                " ({} of KV cache under the cap; trading expert slots down to the minimum would make room for {more} more sessions' KV)",
                sluice_core::fmt_size(b)
            ))
        );
    })
    .with_context(|| format!("serving on {addr}"))
}
