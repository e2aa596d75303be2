//! An OpenAI-compatible HTTP server over one streamed model: requests wait
//! in a bounded queue for the model's one session (its RAM budget is the
//! cap), are refused with 503 when the queue is full, and stop generating
//! when their client goes away.

use crate::chat::{Finish, GenParams, Generator, Outcome};
use crate::grammar::{self, Forced};
use crate::template::{ChatTemplate, Family};
use crate::tools;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Map, Value as Json};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio_stream::wrappers::UnboundedReceiverStream;

/// Figures of the streamed model that `/metrics` reports besides the
/// server's own, read after each request.
#[derive(Clone, Debug, Default)]
pub struct EngineFigures {
    /// Expert uses served from the cache, and read from the drive.
    pub hits: u64,
    /// See `hits`.
    pub misses: u64,
    /// Bytes read from the drive.
    pub bytes_read: u64,
    /// Seconds compute waited on reads.
    pub stall_s: f64,
    /// Resident bytes now, and at most.
    pub rss: u64,
    /// See `rss`.
    pub peak_rss: u64,
}

/// What the server needs besides the generator.
pub struct ServeConfig {
    /// The model's name in `/v1/models` and responses.
    pub model_name: String,
    /// Requests that may wait for the model.
    pub queue: usize,
    /// The RAM cap, for `/metrics`.
    pub ram_cap: Option<u64>,
    /// Reads the engine's figures (called on the worker thread).
    pub figures: Box<dyn Fn(&Generator) -> EngineFigures + Send>,
}

/// A request as the worker takes it.
enum Input {
    /// Chat messages, tools and template variables.
    Chat {
        messages: Vec<Json>,
        tools: Vec<Json>,
        extra: Map<String, Json>,
        /// The tool call `tool_choice` demands.
        forced: Option<Forced>,
    },
    /// A raw prompt.
    Text(String),
}

struct Job {
    input: Input,
    params: GenParams,
    tx: UnboundedSender<Msg>,
}

/// What the worker sends back.
enum Msg {
    /// The prompt is valid and generation started; the prompt's last
    /// characters (whether the template opened a think block).
    Started(String),
    Text(String),
    Done(Outcome),
    /// A request the model cannot serve (400), or a failure (500).
    Failed(StatusCode, String),
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    rejected_busy: AtomicU64,
    rejected_bad: AtomicU64,
    cancelled: AtomicU64,
    prompt_tokens: AtomicU64,
    reused_tokens: AtomicU64,
    completion_tokens: AtomicU64,
}

#[derive(Default)]
struct Last {
    tok_per_s: f64,
    ttft_s: f64,
    ttft_sum: f64,
    done: u64,
    engine: EngineFigures,
}

struct AppState {
    jobs: SyncSender<Job>,
    model: String,
    family: Family,
    ram_cap: Option<u64>,
    queue: usize,
    counters: Counters,
    last: Mutex<Last>,
    waiting: AtomicU64,
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    let kind = if status == StatusCode::SERVICE_UNAVAILABLE {
        "server_busy"
    } else if status.is_client_error() {
        "invalid_request_error"
    } else {
        "server_error"
    };
    (
        status,
        axum::Json(json!({"error": {"message": msg.into(), "type": kind}})),
    )
        .into_response()
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The worker: renders, tokenizes and generates, one request at a time.
fn worker(
    mut gen: Generator,
    template: ChatTemplate,
    rx: std::sync::mpsc::Receiver<Job>,
    state: Arc<AppState>,
    figures: Box<dyn Fn(&Generator) -> EngineFigures + Send>,
) {
    for job in rx {
        state.waiting.fetch_sub(1, Ordering::Relaxed);
        let mut forced_text = None;
        let prompt = match &job.input {
            Input::Chat {
                messages,
                tools,
                extra,
                forced,
            } => template
                .render(messages, Some(tools), true, extra)
                .map(|p| {
                    let Some(f) = forced else {
                        return p;
                    };
                    // A generation prompt that opened a think block gets it
                    // closed: the call comes first.
                    let close = if p.trim_end().ends_with("<think>") {
                        match template.family() {
                            Family::Hermes | Family::XmlFunction => "\n</think>\n\n",
                            _ => "</think>",
                        }
                    } else {
                        ""
                    };
                    let prefix = format!("{close}{}", f.prefix);
                    forced_text = Some((prefix.clone(), f.suffix.clone()));
                    p + &prefix
                }),
            Input::Text(t) => Ok(t.clone()),
        };
        let mut tail = String::new();
        let ids = prompt.and_then(|p| {
            let cut = (p.len().saturating_sub(32)..=p.len())
                .find(|&i| p.is_char_boundary(i))
                .unwrap_or(p.len());
            tail = p[cut..].to_string();
            gen.tokenizer().encode(&p)
        });
        let ids = match ids {
            Ok(ids) if ids.is_empty() => Err("the prompt is empty".to_string()),
            Ok(ids) if ids.len() >= gen.ctx() => Err(format!(
                "the prompt is {} tokens; the context holds {} (the server's --ctx)",
                ids.len(),
                gen.ctx()
            )),
            Ok(ids) => Ok(ids),
            Err(e) => Err(e.to_string()),
        };
        let ids = match ids {
            Ok(i) => i,
            Err(m) => {
                state.counters.rejected_bad.fetch_add(1, Ordering::Relaxed);
                let _ = job.tx.send(Msg::Failed(StatusCode::BAD_REQUEST, m));
                continue;
            }
        };
        if job.tx.send(Msg::Started(tail)).is_err() {
            state.counters.cancelled.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let tx = job.tx.clone();
        // A bug in one request must not take the server down: the panic
        // becomes a 500 and the session starts afresh.
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            gen.generate(&ids, &job.params, &mut |piece| {
                tx.send(Msg::Text(piece.to_string())).is_ok()
            })
        }))
        .unwrap_or_else(|_| {
            gen.reset();
            Err(sluice_core::Error::Invalid(
                "internal error while generating (the session was reset)".into(),
            ))
        });
        match r {
            Ok(mut o) => {
                // The forced call's text around what the model wrote.
                if let Some((prefix, suffix)) = forced_text {
                    o.text = format!("{prefix}{}", o.text);
                    if o.finish == Finish::Stop {
                        o.text.push_str(&suffix);
                    }
                }
                let c = &state.counters;
                c.prompt_tokens
                    .fetch_add(o.prompt_tokens as u64, Ordering::Relaxed);
                c.reused_tokens
                    .fetch_add(o.reused_tokens as u64, Ordering::Relaxed);
                c.completion_tokens
                    .fetch_add(o.completion_tokens as u64, Ordering::Relaxed);
                if o.finish == Finish::Cancelled {
                    c.cancelled.fetch_add(1, Ordering::Relaxed);
                }
                if let Ok(mut l) = state.last.lock() {
                    l.tok_per_s = o.tok_per_s();
                    l.ttft_s = o.ttft_s;
                    l.ttft_sum += o.ttft_s;
                    l.done += 1;
                    l.engine = figures(&gen);
                }
                let _ = job.tx.send(Msg::Done(o));
            }
            Err(e) => {
                let _ = job.tx.send(Msg::Failed(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    e.to_string(),
                ));
            }
        }
    }
}

/// The parts of a request body sluice reads, checked.
struct Request {
    stream: bool,
    include_usage: bool,
    params: GenParams,
    input: Input,
    has_tools: bool,
    /// The answer is a forced tool call.
    forced: bool,
}

const CHAT_FIELDS: &[&str] = &[
    "model",
    "messages",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "n",
    "user",
    "chat_template_kwargs",
    "reasoning_effort",
    "frequency_penalty",
    "presence_penalty",
];

const COMPLETION_FIELDS: &[&str] = &[
    "model",
    "prompt",
    "stream",
    "stream_options",
    "max_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "n",
    "user",
    "frequency_penalty",
    "presence_penalty",
];

fn parse_request(body: &[u8], chat: bool, family: Family) -> Result<Request, String> {
    let v: Json = serde_json::from_slice(body).map_err(|e| format!("malformed JSON: {e}"))?;
    let Json::Object(o) = v else {
        return Err("the request body must be a JSON object".into());
    };
    let known = if chat { CHAT_FIELDS } else { COMPLETION_FIELDS };
    if let Some(k) = o.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(format!("unknown field {k:?}"));
    }
    let num = |k: &str| -> Result<Option<f64>, String> {
        match o.get(k) {
            None | Some(Json::Null) => Ok(None),
            Some(x) => x
                .as_f64()
                .map(Some)
                .ok_or_else(|| format!("{k} must be a number")),
        }
    };
    for k in ["frequency_penalty", "presence_penalty"] {
        if num(k)?.is_some_and(|x| x != 0.0) {
            return Err(format!("{k} is not supported"));
        }
    }
    if num("n")?.is_some_and(|n| n != 1.0) {
        return Err("n must be 1: one answer per request".into());
    }
    let max = num("max_completion_tokens")?.or(num("max_tokens")?);
    if max.is_some_and(|m| m < 1.0 || m.fract() != 0.0) {
        return Err("max_tokens must be a positive integer".into());
    }
    let temperature = num("temperature")?.unwrap_or(if chat { 0.7 } else { 1.0 });
    if !(0.0..=2.0).contains(&temperature) {
        return Err("temperature must be between 0 and 2".into());
    }
    let top_p = num("top_p")?.unwrap_or(1.0);
    if !(0.0..=1.0).contains(&top_p) || top_p == 0.0 {
        return Err("top_p must be in (0, 1]".into());
    }
    let stop = match o.get("stop") {
        None | Some(Json::Null) => Vec::new(),
        Some(Json::String(s)) => vec![s.clone()],
        Some(Json::Array(a)) if a.iter().all(Json::is_string) && a.len() <= 4 => a
            .iter()
            .map(|s| s.as_str().unwrap_or_default().to_string())
            .collect(),
        Some(_) => return Err("stop must be a string or up to 4 strings".into()),
    };
    let stream = match o.get("stream") {
        None | Some(Json::Null) => false,
        Some(Json::Bool(b)) => *b,
        Some(_) => return Err("stream must be true or false".into()),
    };
    let include_usage = o
        .get("stream_options")
        .and_then(|s| s.get("include_usage"))
        .and_then(Json::as_bool)
        .unwrap_or(false);
    let params = GenParams {
        max_tokens: max.map_or(if chat { 1024 } else { 16 }, |m| m as usize),
        temperature: temperature as f32,
        top_p: top_p as f32,
        seed: num("seed")?.map_or_else(now, |s| s as u64),
        stop,
        grammar: None,
    };
    let mut params = params;
    let (input, has_tools) = if chat {
        let Some(Json::Array(msgs)) = o.get("messages") else {
            return Err("messages must be an array of messages".into());
        };
        if msgs.is_empty() {
            return Err("messages is empty".into());
        }
        let mut messages = Vec::with_capacity(msgs.len());
        for (i, m) in msgs.iter().enumerate() {
            messages.push(normalize_message(m, family).map_err(|e| format!("messages[{i}]: {e}"))?);
        }
        let tools = match o.get("tools") {
            None | Some(Json::Null) => Vec::new(),
            Some(Json::Array(t)) => {
                for (i, x) in t.iter().enumerate() {
                    if x.pointer("/function/name").and_then(Json::as_str).is_none() {
                        return Err(format!("tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}"));
                    }
                }
                t.clone()
            }
            Some(_) => return Err("tools must be an array".into()),
        };
        // "required" and a named function make the call: its syntax is
        // written, the model's tokens kept to a tool's name and arguments
        // its schema admits (see `grammar`).
        let mut forced = None;
        let tools = match o.get("tool_choice") {
            None | Some(Json::Null) => tools,
            Some(Json::String(s)) if s == "auto" => tools,
            Some(Json::String(s)) if s == "none" => Vec::new(),
            Some(Json::String(s)) if s == "required" => {
                forced = Some(grammar::tool_call(family, &tools, None)?);
                tools
            }
            Some(c @ Json::Object(_)) => {
                let Some(name) = c.pointer("/function/name").and_then(Json::as_str) else {
                    return Err("tool_choice naming a function must be {\"type\": \"function\", \"function\": {\"name\": ...}}".into());
                };
                forced = Some(grammar::tool_call(family, &tools, Some(name))?);
                tools
            }
            Some(other) => {
                return Err(format!(
                "tool_choice must be \"auto\", \"none\", \"required\" or a function, not {other}"
            ))
            }
        };
        params.grammar = forced.as_ref().map(|f| f.grammar.clone());
        let mut extra = match o.get("chat_template_kwargs") {
            None | Some(Json::Null) => Map::new(),
            Some(Json::Object(m)) => m.clone(),
            Some(_) => return Err("chat_template_kwargs must be an object".into()),
        };
        if let Some(r) = o.get("reasoning_effort") {
            extra.insert("reasoning_effort".into(), r.clone());
        }
        let has = !tools.is_empty();
        (
            Input::Chat {
                messages,
                tools,
                extra,
                forced,
            },
            has,
        )
    } else {
        match o.get("prompt") {
            Some(Json::String(p)) => (Input::Text(p.clone()), false),
            _ => return Err("prompt must be a string".into()),
        }
    };
    Ok(Request {
        stream,
        include_usage,
        forced: params.grammar.is_some(),
        params,
        input,
        has_tools,
    })
}

/// A message as chat templates expect it: text parts joined into a string,
/// tool-call arguments as objects (DeepSeek's template concatenates them as
/// the JSON text the client sent, so they stay text there).
fn normalize_message(m: &Json, family: Family) -> Result<Json, String> {
    let Json::Object(o) = m else {
        return Err("a message must be an object".into());
    };
    let role = o
        .get("role")
        .and_then(Json::as_str)
        .ok_or("role is missing")?;
    if !["system", "developer", "user", "assistant", "tool"].contains(&role) {
        return Err(format!("unknown role {role:?}"));
    }
    let mut out = o.clone();
    match o.get("content") {
        Some(Json::Array(parts)) => {
            let mut s = String::new();
            for p in parts {
                match (
                    p.get("type").and_then(Json::as_str),
                    p.get("text").and_then(Json::as_str),
                ) {
                    (Some("text"), Some(t)) => s.push_str(t),
                    _ => return Err("only text content parts are supported".into()),
                }
            }
            out.insert("content".into(), s.into());
        }
        Some(Json::String(_)) => {}
        None | Some(Json::Null) if role == "assistant" => {
            out.insert("content".into(), "".into());
        }
        _ => return Err("content must be a string or text parts".into()),
    }
    if let Some(Json::Array(calls)) = o.get("tool_calls") {
        let mut fixed = Vec::new();
        for c in calls {
            let mut c = c.clone();
            if family != Family::DeepSeek {
                if let Some(a) = c.pointer_mut("/function/arguments") {
                    if let Some(parsed) = a
                        .as_str()
                        .and_then(|s| serde_json::from_str::<Json>(s).ok())
                    {
                        *a = parsed;
                    }
                }
            }
            fixed.push(c);
        }
        out.insert("tool_calls".into(), Json::Array(fixed));
    }
    Ok(Json::Object(out))
}

/// Queues a job; `Err` is the response refusing it.
fn submit(s: &AppState, req: &mut Request) -> Result<UnboundedReceiver<Msg>, (StatusCode, String)> {
    s.counters.requests.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = unbounded_channel();
    let input = std::mem::replace(&mut req.input, Input::Text(String::new()));
    s.waiting.fetch_add(1, Ordering::Relaxed);
    match s.jobs.try_send(Job {
        input,
        params: req.params.clone(),
        tx,
    }) {
        Ok(()) => Ok(rx),
        Err(TrySendError::Full(_)) => {
            s.waiting.fetch_sub(1, Ordering::Relaxed);
            s.counters.rejected_busy.fetch_add(1, Ordering::Relaxed);
            Err((
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "the model is busy: {} requests are waiting already; retry later",
                    s.queue
                ),
            ))
        }
        Err(TrySendError::Disconnected(_)) => Err((
            StatusCode::INTERNAL_SERVER_ERROR,
            "the model's worker has stopped".into(),
        )),
    }
}

/// Waits for the worker to accept the prompt.
async fn started(rx: &mut UnboundedReceiver<Msg>) -> Result<String, (StatusCode, String)> {
    match rx.recv().await {
        Some(Msg::Started(tail)) => Ok(tail),
        Some(Msg::Failed(st, m)) => Err((st, m)),
        _ => Err((
            StatusCode::INTERNAL_SERVER_ERROR,
            "the model's worker stopped".into(),
        )),
    }
}

fn usage(o: &Outcome) -> Json {
    json!({"prompt_tokens": o.prompt_tokens, "completion_tokens": o.completion_tokens,
           "total_tokens": o.prompt_tokens + o.completion_tokens,
           "prompt_tokens_details": {"cached_tokens": o.reused_tokens}})
}

fn message_of(family: Family, o: &Outcome, has_tools: bool) -> (Json, &'static str) {
    let p = tools::parse(family, &o.text);
    let mut msg = json!({"role": "assistant", "content": p.content});
    if let Some(r) = &p.reasoning {
        msg["reasoning_content"] = r.clone().into();
    }
    let mut finish = o.finish.reason();
    if has_tools && !p.tool_calls.is_empty() {
        msg["tool_calls"] = p
            .tool_calls
            .iter()
            .enumerate()
            .map(|(i, c)| c.to_openai(i))
            .collect();
        if o.finish == Finish::Stop {
            finish = "tool_calls";
        }
    }
    (msg, finish)
}

/// Checks a request, queues it and waits until the worker accepts its
/// prompt: the request, its messages and the prompt's tail.
async fn begin(
    s: &AppState,
    body: &[u8],
    chat: bool,
) -> Result<(Request, UnboundedReceiver<Msg>, String), (StatusCode, String)> {
    let mut req = parse_request(body, chat, s.family).map_err(|m| {
        s.counters.rejected_bad.fetch_add(1, Ordering::Relaxed);
        (StatusCode::BAD_REQUEST, m)
    })?;
    let mut rx = submit(s, &mut req)?;
    let tail = started(&mut rx).await?;
    Ok((req, rx, tail))
}

/// The finished generation of a request that is not streamed.
async fn outcome(rx: &mut UnboundedReceiver<Msg>) -> Result<Outcome, (StatusCode, String)> {
    let mut out = None;
    while let Some(m) = rx.recv().await {
        match m {
            Msg::Done(o) => out = Some(o),
            Msg::Failed(st, e) => return Err((st, e)),
            _ => {}
        }
    }
    out.ok_or((
        StatusCode::INTERNAL_SERVER_ERROR,
        "generation ended without a result".into(),
    ))
}

async fn chat(State(s): State<Arc<AppState>>, body: Bytes) -> Response {
    let (req, mut rx, tail) = match begin(&s, &body, true).await {
        Ok(x) => x,
        Err((st, m)) => return error(st, m),
    };
    let id = format!("chatcmpl-{}", now());
    let created = now();
    let model = s.model.clone();
    if !req.stream {
        let o = match outcome(&mut rx).await {
            Ok(o) => o,
            Err((st, m)) => return error(st, m),
        };
        let (msg, finish) = message_of(s.family, &o, req.has_tools);
        return axum::Json(json!({"id": id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": msg, "finish_reason": finish}], "usage": usage(&o)}))
        .into_response();
    }
    // Streamed: content as it comes; with tools the turn is parsed whole
    // first, so that call syntax never reaches the client as text.
    let family = s.family;
    let has_tools = req.has_tools;
    let forced = req.forced;
    let include_usage = req.include_usage;
    let chunk = move |delta: Json, finish: Option<&str>| {
        json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    };
    let first = chunk(json!({"role": "assistant", "content": ""}), None);
    let (etx, erx) = unbounded_channel::<Result<Event, std::convert::Infallible>>();
    // Without tools, call syntax is just text.
    let split_family = if has_tools || family == Family::Harmony {
        family
    } else {
        Family::Plain
    };
    let mut split = tools::StreamSplit::new(split_family, &tail);
    // Forwards the worker's messages as events; when the client goes away
    // the events' receiver is dropped, this task ends, and the worker's
    // next send fails, which stops the generation.
    tokio::spawn(async move {
        let send = |j: String| etx.send(Ok(Event::default().data(j))).is_ok();
        let delta = |part: tools::Part, t: String| match part {
            tools::Part::Content => json!({"content": t}),
            tools::Part::Reasoning => json!({"reasoning_content": t}),
        };
        if !send(first.to_string()) {
            return;
        }
        while let Some(m) = rx.recv().await {
            let events: Vec<Json> = match m {
                Msg::Text(_) if etx.is_closed() => return,
                // A forced call is sent whole, parsed, at the end.
                Msg::Text(_) if forced => Vec::new(),
                Msg::Text(t) => split
                    .push(&t)
                    .into_iter()
                    .map(|(p, t)| chunk(delta(p, t), None))
                    .collect(),
                Msg::Done(o) => {
                    let (msg, finish) = message_of(family, &o, has_tools);
                    let mut v = Vec::new();
                    if let Some((p, t)) = split.finish() {
                        v.push(chunk(delta(p, t), None));
                    }
                    if split.has_held() || forced {
                        // Everything from the first call on was held: the
                        // calls (and, for harmony, the whole turn) now.
                        let mut d = json!({});
                        if split.holds_all() {
                            d["content"] = msg["content"].clone();
                            if let Some(r) = msg.get("reasoning_content") {
                                d["reasoning_content"] = r.clone();
                            }
                        }
                        if let Some(tc) = msg.get("tool_calls") {
                            let mut tc = tc.clone();
                            for (i, c) in tc.as_array_mut().into_iter().flatten().enumerate() {
                                c["index"] = i.into();
                            }
                            d["tool_calls"] = tc;
                        }
                        if d.as_object().is_some_and(|m| !m.is_empty()) {
                            v.push(chunk(d, None));
                        }
                    }
                    v.push(chunk(json!({}), Some(finish)));
                    if include_usage {
                        let mut u = chunk(json!({}), None);
                        u["choices"] = json!([]);
                        u["usage"] = usage(&o);
                        v.push(u);
                    }
                    v
                }
                Msg::Failed(_, e) => vec![json!({"error": {"message": e, "type": "server_error"}})],
                Msg::Started(_) => Vec::new(),
            };
            for e in events {
                if !send(e.to_string()) {
                    return;
                }
            }
        }
        send("[DONE]".into());
    });
    Sse::new(UnboundedReceiverStream::new(erx))
        .keep_alive(KeepAlive::default())
        .into_response()
}

async fn completions(State(s): State<Arc<AppState>>, body: Bytes) -> Response {
    let (req, mut rx, _) = match begin(&s, &body, false).await {
        Ok(x) => x,
        Err((st, m)) => return error(st, m),
    };
    let id = format!("cmpl-{}", now());
    let created = now();
    let model = s.model.clone();
    if !req.stream {
        let o = match outcome(&mut rx).await {
            Ok(o) => o,
            Err((st, m)) => return error(st, m),
        };
        return axum::Json(json!({"id": id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": o.text, "finish_reason": o.finish.reason()}], "usage": usage(&o)}))
        .into_response();
    }
    let (etx, erx) = unbounded_channel::<Result<Event, std::convert::Infallible>>();
    tokio::spawn(async move {
        let send = |j: String| etx.send(Ok(Event::default().data(j))).is_ok();
        while let Some(m) = rx.recv().await {
            let j = match m {
                Msg::Text(_) if etx.is_closed() => return,
                Msg::Text(t) if t.is_empty() => continue,
                Msg::Text(t) => {
                    json!({"id": id, "object": "text_completion", "created": created, "model": model,
                                       "choices": [{"index": 0, "text": t, "finish_reason": null}]})
                }
                Msg::Done(o) => {
                    json!({"id": id, "object": "text_completion", "created": created, "model": model,
                                       "choices": [{"index": 0, "text": "", "finish_reason": o.finish.reason()}],
                                       "usage": usage(&o)})
                }
                Msg::Failed(_, e) => json!({"error": {"message": e, "type": "server_error"}}),
                Msg::Started(_) => continue,
            };
            if !send(j.to_string()) {
                return;
            }
        }
        send("[DONE]".into());
    });
    Sse::new(UnboundedReceiverStream::new(erx))
        .keep_alive(KeepAlive::default())
        .into_response()
}

async fn models(State(s): State<Arc<AppState>>) -> Response {
    axum::Json(json!({"object": "list", "data": [{"id": s.model, "object": "model", "created": 0, "owned_by": "sluice"}]}))
        .into_response()
}

async fn health() -> Response {
    axum::Json(json!({"status": "ok"})).into_response()
}

async fn metrics(State(s): State<Arc<AppState>>) -> Response {
    let c = &s.counters;
    let (l, e) = match s.last.lock() {
        Ok(l) => (
            (l.tok_per_s, l.ttft_s, l.ttft_sum, l.done),
            l.engine.clone(),
        ),
        Err(_) => ((0.0, 0.0, 0.0, 0), EngineFigures::default()),
    };
    let g = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
    let uses = (e.hits + e.misses).max(1) as f64;
    const C: &str = "counter";
    const G: &str = "gauge";
    let mut rows = vec![
        ("requests_total", C, "Requests received.", g(&c.requests)),
        (
            "requests_rejected_busy_total",
            C,
            "Requests refused with 503 (queue full).",
            g(&c.rejected_busy),
        ),
        (
            "requests_rejected_invalid_total",
            C,
            "Requests refused with 400.",
            g(&c.rejected_bad),
        ),
        (
            "requests_cancelled_total",
            C,
            "Generations stopped because the client went away.",
            g(&c.cancelled),
        ),
        (
            "requests_waiting",
            G,
            "Requests queued for the model.",
            g(&s.waiting),
        ),
        (
            "prompt_tokens_total",
            C,
            "Prompt tokens.",
            g(&c.prompt_tokens),
        ),
        (
            "prompt_tokens_reused_total",
            C,
            "Prompt tokens whose KV cache was reused.",
            g(&c.reused_tokens),
        ),
        (
            "completion_tokens_total",
            C,
            "Tokens generated.",
            g(&c.completion_tokens),
        ),
        (
            "decode_tokens_per_second",
            G,
            "Decode speed of the last request.",
            l.0,
        ),
        (
            "time_to_first_token_seconds",
            G,
            "Time to first token of the last request.",
            l.1,
        ),
        (
            "time_to_first_token_seconds_sum",
            C,
            "Sum of the requests' times to first token.",
            l.2,
        ),
        (
            "time_to_first_token_seconds_count",
            C,
            "Requests timed.",
            l.3 as f64,
        ),
        (
            "expert_hit_rate",
            G,
            "Expert uses served from the cache, since start.",
            e.hits as f64 / uses,
        ),
        (
            "expert_bytes_read_total",
            C,
            "Bytes of experts read from the drive.",
            e.bytes_read as f64,
        ),
        (
            "io_stall_seconds_total",
            C,
            "Seconds compute waited on expert reads.",
            e.stall_s,
        ),
        (
            "resident_bytes",
            G,
            "Resident memory (the platform's figure).",
            e.rss as f64,
        ),
        (
            "resident_bytes_peak",
            G,
            "Peak resident memory.",
            e.peak_rss as f64,
        ),
    ];
    if let Some(cap) = s.ram_cap {
        rows.push(("ram_cap_bytes", G, "The RAM cap.", cap as f64));
    }
    let out: String = rows
        .iter()
        .map(|(name, kind, help, v)| {
            format!("# HELP sluice_{name} {help}\n# TYPE sluice_{name} {kind}\nsluice_{name} {v}\n")
        })
        .collect();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

/// Serves `gen` on `listener` until the process ends (or `shutdown`
/// resolves).
pub async fn serve(
    listener: tokio::net::TcpListener,
    gen: Generator,
    template: ChatTemplate,
    cfg: ServeConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (jobs, rx) = sync_channel(cfg.queue);
    let state = Arc::new(AppState {
        jobs,
        model: cfg.model_name,
        family: template.family(),
        ram_cap: cfg.ram_cap,
        queue: cfg.queue,
        counters: Counters::default(),
        last: Mutex::new(Last::default()),
        waiting: AtomicU64::new(0),
    });
    let st = state.clone();
    let figures = cfg.figures;
    std::thread::Builder::new()
        .name("sluice-model".into())
        .spawn(move || worker(gen, template, rx, st, figures))?;
    let app = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .with_state(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// [`serve`] on its own runtime, on `addr`, until Ctrl-C; `ready` is
/// called with the bound address once it listens.
pub fn serve_blocking(
    addr: &str,
    gen: Generator,
    template: ChatTemplate,
    cfg: ServeConfig,
    ready: impl FnOnce(std::net::SocketAddr),
) -> std::io::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_io()
        .enable_time()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        ready(listener.local_addr()?);
        let stop = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        serve(listener, gen, template, cfg, stop).await
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_checked() {
        let bad = |b: &str| {
            parse_request(b.as_bytes(), true, Family::Hermes)
                .err()
                .unwrap()
        };
        assert!(bad("{").contains("malformed JSON"));
        assert!(bad("[]").contains("JSON object"));
        assert!(bad(r#"{"messages": [], "foo": 1}"#).contains("unknown field \"foo\""));
        assert!(bad(r#"{"messages": []}"#).contains("empty"));
        assert!(
            bad(r#"{"messages": [{"role": "wizard", "content": "x"}]}"#).contains("unknown role")
        );
        assert!(
            bad(r#"{"messages": [{"role": "user", "content": "x"}], "n": 2}"#)
                .contains("n must be 1")
        );
        assert!(
            bad(r#"{"messages": [{"role": "user", "content": "x"}], "temperature": 9}"#)
                .contains("temperature")
        );
        assert!(
            bad(r#"{"messages": [{"role": "user", "content": "x"}], "tools": [{}]}"#)
                .contains("tools[0]")
        );
        let tool = r#"[{"type": "function", "function": {"name": "f"}}]"#;
        let with_choice = |c: &str| {
            format!(
                r#"{{"messages": [{{"role": "user", "content": "x"}}], "tools": {tool}, "tool_choice": {c}}}"#
            )
        };
        // A demanded call is made under a grammar; one that cannot be is a 400.
        for c in [
            r#""required""#,
            r#"{"type": "function", "function": {"name": "f"}}"#,
        ] {
            let r = parse_request(with_choice(c).as_bytes(), true, Family::Hermes).unwrap();
            assert!(r.forced && r.params.grammar.is_some(), "{c}");
            assert!(
                parse_request(with_choice(c).as_bytes(), true, Family::Plain)
                    .err()
                    .unwrap()
                    .contains("no tool-call syntax")
            );
        }
        assert!(bad(&with_choice(
            r#"{"type": "function", "function": {"name": "g"}}"#
        ))
        .contains("not among the tools"));
        assert!(bad(&with_choice(r#"{"type": "function"}"#)).contains("naming a function must be"));
        assert!(bad(
            r#"{"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}"#
        )
        .contains("needs tools"));
        assert!(bad(&with_choice("3")).contains("tool_choice must be"));
        for (c, offered) in [(r#""auto""#, true), (r#""none""#, false), ("null", true)] {
            let r = parse_request(with_choice(c).as_bytes(), true, Family::Hermes).unwrap();
            assert_eq!(r.has_tools, offered, "{c}");
            let Input::Chat { tools, .. } = r.input else {
                panic!()
            };
            assert_eq!(tools.is_empty(), !offered, "{c}");
        }
        let r = parse_request(
            br#"{"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                 {"role": "assistant", "content": null, "tool_calls": [{"id": "a", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}}]}],
                 "stream": true, "max_tokens": 5, "stop": "END"}"#,
            true,
            Family::Hermes,
        )
        .unwrap();
        assert!(r.stream);
        assert_eq!(
            (r.params.max_tokens, r.params.stop.clone()),
            (5, vec!["END".to_string()])
        );
        let Input::Chat { messages, .. } = r.input else {
            panic!()
        };
        assert_eq!(messages[0]["content"], "hi");
        assert_eq!(
            messages[1]["tool_calls"][0]["function"]["arguments"]["x"],
            1
        );
    }
}
