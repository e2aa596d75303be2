//! `sluice serve` through HTTP on a loopback port with a fixture model,
//! and `sluice chat` through a pipe: the OpenAI shapes, streaming, tools in
//! the template, bad requests (400), a full queue (503), a client that goes
//! away (its generation stops), and the metrics.

mod common;

use common::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Stdio};
use std::time::Duration;

fn template() -> String {
    fixtures()
        .join("templates/Qwen-Qwen3-0.6B.jinja")
        .to_string_lossy()
        .into_owned()
}

struct Server {
    child: Child,
    addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(queue: &str, ctx: &str) -> Server {
    start_with(queue, ctx, &[])
}

fn start_with(queue: &str, ctx: &str, extra: &[&str]) -> Server {
    let model = fixtures().join("models/qwen3_moe");
    let mut child = sluice()
        .args([
            "serve",
            "--model",
            model.to_str().unwrap(),
            "--port",
            "0",
            "--ctx",
            ctx,
            "--queue",
            queue,
            "--chat-template",
            &template(),
        ])
        .args(extra)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    let addr = loop {
        line.clear();
        assert!(err.read_line(&mut line).unwrap() > 0, "server exited");
        if let Some(i) = line.find("http://") {
            let rest = &line[i + 7..];
            break rest[..rest.find('/').unwrap()].to_string();
        }
    };
    // Keep draining stderr so that the server never blocks on it.
    std::thread::spawn(move || {
        let mut sink = String::new();
        let _ = err.read_to_string(&mut sink);
    });
    Server { child, addr }
}

/// One HTTP/1.1 request; returns the status and the body.
fn http(addr: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status: u16 = text[9..12].parse().unwrap();
    let body = text.split_once("\r\n\r\n").map_or("", |x| x.1).to_string();
    (status, dechunk(&body))
}

/// Undoes chunked transfer encoding when the body uses it.
fn dechunk(b: &str) -> String {
    let mut out = String::new();
    let mut rest = b;
    loop {
        let Some((size, after)) = rest.split_once("\r\n") else {
            return b.to_string();
        };
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            return b.to_string();
        };
        if n == 0 {
            return out;
        }
        if after.len() < n {
            return b.to_string();
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
}

fn post(addr: &str, path: &str, body: &Value) -> (u16, Value) {
    let (st, b) = http(addr, "POST", path, &body.to_string());
    let v = serde_json::from_str(&b).unwrap_or_else(|e| panic!("{st} {e}: {b}"));
    (st, v)
}

fn events(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

fn user(text: &str) -> Value {
    json!([{"role": "user", "content": text}])
}

#[test]
fn serves_the_openai_api() {
    let s = start("4", "2048");
    let a = s.addr.as_str();
    assert_eq!(http(a, "GET", "/health", "").0, 200);
    let (st, m) = http(a, "GET", "/v1/models", "");
    assert_eq!(st, 200);
    assert!(m.contains("\"id\":\"qwen3_moe\""), "{m}");
    // Not streamed.
    let (st, r) = post(
        a,
        "/v1/chat/completions",
        &json!({"model": "qwen3_moe", "messages": user("Hi"), "max_tokens": 6, "temperature": 0}),
    );
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["object"], "chat.completion");
    assert_eq!(r["choices"][0]["message"]["role"], "assistant");
    assert!(r["choices"][0]["message"]["content"].is_string());
    assert_eq!(r["usage"]["completion_tokens"], 6);
    assert_eq!(r["choices"][0]["finish_reason"], "length");
    // The same request again: its prompt's KV cache is reused.
    let (_, r2) = post(
        a,
        "/v1/chat/completions",
        &json!({"messages": user("Hi"), "max_tokens": 6, "temperature": 0}),
    );
    assert_eq!(
        r2["choices"][0]["message"]["content"],
        r["choices"][0]["message"]["content"]
    );
    assert!(
        r2["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
            > 0,
        "{r2}"
    );
    // Streamed, with usage.
    let (st, body) = http(
        a,
        "POST",
        "/v1/chat/completions",
        &json!({"messages": user("Hi"), "max_tokens": 5, "temperature": 0, "stream": true,
                "stream_options": {"include_usage": true}})
        .to_string(),
    );
    assert_eq!(st, 200);
    let ev = events(&body);
    assert_eq!(ev.last().map(String::as_str), Some("[DONE]"), "{body}");
    let chunks: Vec<Value> = ev[..ev.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(
        text,
        r["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .trim()
    );
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], 5);
    // Tools go through the template; the answer is well formed.
    let tools = json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]);
    let (st, r) = post(
        a,
        "/v1/chat/completions",
        &json!({"messages": user("Weather in Paris?"), "tools": tools, "max_tokens": 4, "stream": false}),
    );
    assert_eq!(st, 200, "{r}");
    // A demanded call is made, even by a model of random weights: its
    // arguments are JSON that the tool's schema admits.
    let two = json!([tools[0], {"type": "function", "function": {"name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}, "offset": {"type": "integer"}},
                       "required": ["zone", "offset"]}}}]);
    for (choice, stream, temperature) in [
        (
            json!({"type": "function", "function": {"name": "get_time"}}),
            false,
            0.0,
        ),
        (json!("required"), false, 1.0),
        (
            json!({"type": "function", "function": {"name": "get_weather"}}),
            true,
            0.7,
        ),
    ] {
        let req = json!({"messages": user("Weather in Paris?"), "tools": two, "tool_choice": choice,
                         "max_tokens": 400, "stream": stream, "temperature": temperature, "seed": 7});
        let (st, body) = http(a, "POST", "/v1/chat/completions", &req.to_string());
        assert_eq!(st, 200, "{body}");
        let (calls, finish) = if stream {
            let ev = events(&body);
            let chunks: Vec<Value> = ev[..ev.len() - 1]
                .iter()
                .map(|e| serde_json::from_str(e).unwrap())
                .collect();
            // No call syntax leaks out as content.
            assert!(chunks.iter().all(|c| c["choices"][0]["delta"]["content"]
                .as_str()
                .is_none_or(str::is_empty)));
            let d = chunks
                .iter()
                .find(|c| c["choices"][0]["delta"]["tool_calls"].is_array());
            let calls = d.expect("a tool_calls delta")["choices"][0]["delta"]["tool_calls"].clone();
            let finish = chunks.iter().find_map(|c| {
                c["choices"][0]["finish_reason"]
                    .as_str()
                    .map(str::to_string)
            });
            (calls, finish.unwrap())
        } else {
            let r: Value = serde_json::from_str(&body).unwrap();
            (
                r["choices"][0]["message"]["tool_calls"].clone(),
                r["choices"][0]["finish_reason"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            )
        };
        assert_eq!(finish, "tool_calls", "{body}");
        let calls = calls.as_array().unwrap();
        assert_eq!(calls.len(), 1, "{body}");
        let name = calls[0]["function"]["name"].as_str().unwrap();
        if let Some(want) = choice.pointer("/function/name") {
            assert_eq!(name, want, "{body}");
        }
        let args: Value =
            serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap()).unwrap();
        match name {
            "get_weather" => assert!(args["city"].is_string(), "{args}"),
            "get_time" => {
                assert!(args["zone"] == "UTC" || args["zone"] == "CET", "{args}");
                assert!(args["offset"].is_i64(), "{args}");
            }
            other => panic!("{other}"),
        }
    }
    // Raw completions.
    let (st, r) = post(
        a,
        "/v1/completions",
        &json!({"prompt": "Once upon", "max_tokens": 3}),
    );
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["object"], "text_completion");
    // A stop text ends the answer, and no part of it is streamed.
    let (_, r) = post(
        a,
        "/v1/completions",
        &json!({"prompt": "Once upon", "max_tokens": 12, "temperature": 0}),
    );
    let full = r["choices"][0]["text"].as_str().unwrap().to_string();
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() >= 6, "{full:?}");
    {
        let stop: String = chars[3..5].iter().collect();
        let want = &full[..full.find(&stop).unwrap()];
        let (_, body) = http(
            a,
            "POST",
            "/v1/completions",
            &json!({"prompt": "Once upon", "max_tokens": 12, "temperature": 0, "stop": stop, "stream": true})
                .to_string(),
        );
        let ev = events(&body);
        let got: String = ev[..ev.len() - 1]
            .iter()
            .map(|e| serde_json::from_str::<Value>(e).unwrap())
            .filter_map(|c| c["choices"][0]["text"].as_str().map(str::to_string))
            .collect();
        assert_eq!(got, want, "stop {stop:?} in {full:?}");
    }
    // Bad requests: 400 with a message, and the server lives on.
    for (body, want) in [
        ("{not json", "malformed JSON"),
        (
            r#"{"messages": [{"role": "user", "content": "x"}], "bogus": 1}"#,
            "unknown field",
        ),
        (r#"{"messages": "x"}"#, "messages must be an array"),
        (
            r#"{"messages": [{"role": "user", "content": "x"}], "max_tokens": -3}"#,
            "max_tokens",
        ),
    ] {
        let (st, b) = http(a, "POST", "/v1/chat/completions", body);
        assert_eq!(st, 400, "{body}: {b}");
        assert!(b.contains(want), "{body}: {b}");
    }
    let long = "word ".repeat(1000);
    let (st, r) = post(a, "/v1/chat/completions", &json!({"messages": user(&long)}));
    assert_eq!(st, 400);
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("context holds 2048"),
        "{r}"
    );
    let (st, metrics) = http(a, "GET", "/metrics", "");
    assert_eq!(st, 200);
    for k in [
        "sluice_requests_total",
        "sluice_requests_rejected_invalid_total 5",
        "sluice_time_to_first_token_seconds",
        "sluice_resident_bytes",
    ] {
        assert!(metrics.contains(k), "{k} in {metrics}");
    }
}

#[test]
fn a_full_queue_gets_503_and_a_gone_client_stops_its_generation() {
    let s = start("1", "8192");
    let a = s.addr.clone();
    // A client holds the model with a long generation, then goes away.
    let mut holder = TcpStream::connect(&a).unwrap();
    let body =
        json!({"messages": user("Go on"), "max_tokens": 8000, "temperature": 0, "stream": true})
            .to_string();
    write!(
        holder,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut buf = [0u8; 256];
    assert!(holder.read(&mut buf).unwrap() > 0, "generation started");
    // Eight at once while it runs: one may wait, the rest get 503 at once.
    let (tx, rx) = std::sync::mpsc::channel();
    for _ in 0..8 {
        let (a, tx) = (a.clone(), tx.clone());
        std::thread::spawn(move || {
            let r = http(
                &a,
                "POST",
                "/v1/chat/completions",
                &json!({"messages": user("Hello"), "max_tokens": 20}).to_string(),
            );
            tx.send(r.0).unwrap();
        });
    }
    let mut codes: Vec<u16> = (0..7)
        .map(|_| rx.recv_timeout(Duration::from_secs(60)).expect("no hang"))
        .collect();
    assert!(
        codes.iter().all(|&c| c == 503),
        "refused while the model is busy: {codes:?}"
    );
    // The holder goes away: its generation stops and the waiting one runs.
    drop(holder);
    codes.push(rx.recv_timeout(Duration::from_secs(120)).expect("no hang"));
    assert_eq!(codes[7], 200, "the one that waited is answered: {codes:?}");
    let (_, m) = http(&a, "GET", "/metrics", "");
    let get = |k: &str| -> f64 {
        m.lines()
            .find(|l| l.starts_with(&format!("{k} ")))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(-1.0)
    };
    assert!(get("sluice_requests_cancelled_total") >= 1.0, "{m}");
    assert_eq!(
        get("sluice_requests_rejected_busy_total") as usize,
        codes.iter().filter(|&&c| c == 503).count()
    );
    // The gone client's generation stopped short of its 8000 tokens.
    assert!(get("sluice_completion_tokens_total") < 8000.0, "{m}");
}

#[test]
fn chat_through_a_pipe_reuses_the_conversation() {
    let model = fixtures().join("models/qwen3_moe");
    let mut c = sluice()
        .args([
            "chat",
            "--model",
            model.to_str().unwrap(),
            "--max-tokens",
            "4",
            "--temperature",
            "0",
            "--ctx",
            "256",
            "--chat-template",
            &template(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin
        .take()
        .unwrap()
        .write_all(b"Hello\nAnd then?\n/reset\nHello\n")
        .unwrap();
    let out = c.wait_with_output().unwrap();
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let status: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("prompt tokens reused"))
        .collect();
    assert_eq!(status.len(), 3, "{err}");
    let reused = |l: &str| -> usize {
        let i = l.find("TTFT").unwrap();
        let r = &l[i..];
        let open = r.find('(').unwrap();
        r[open + 1..]
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert_eq!(reused(status[0]), 0);
    assert!(reused(status[1]) > 0, "turn 2 reuses turn 1: {}", status[1]);
    assert_eq!(reused(status[2]), 0, "after /reset nothing is reused");
    assert!(err.contains("(conversation reset)"));
}

/// A generator on fixture `name` (CPU, one thread, 128 tokens of context).
fn generator(name: &str) -> sluice_serve::chat::Generator {
    use std::sync::Arc;
    let path = fixtures().join("models").join(name);
    let files = sluice_format::ModelFiles::open(&path).unwrap();
    let tok = sluice_engine::Tokenizer::for_model(&files)
        .unwrap()
        .unwrap();
    let model = Arc::new(sluice_engine::Model::open(&path).unwrap());
    let be = Arc::new(sluice_backend_cpu::CpuBackend::new(Some(1)).unwrap());
    let eos = model.config.eos.clone();
    let s = sluice_engine::Session::new(model, be);
    sluice_serve::chat::Generator::new(s, tok, &eos, 128, 8)
}

/// Models with linear-attention layers cannot cut their state back, so a
/// prompt that leaves the previous sequence goes back to the snapshot
/// taken before the last prompt's last token: only that token and the new
/// ones run, and the answer is the one a fresh session gives.
#[test]
fn linear_layers_go_back_to_a_snapshot() {
    use sluice_serve::chat::GenParams;
    let p = GenParams {
        max_tokens: 6,
        ..GenParams::default()
    };
    // (fixture, tokens a snapshot leaves to run again: none when the KV
    // cache alone is cut back)
    for (name, again) in [("qwen3_next", 1), ("qwen3_5_moe", 1), ("qwen3_moe", 0)] {
        let mut g = generator(name);
        let p1: Vec<u32> = (3..15).collect();
        let a = g.generate(&p1, &p, &mut |_| true).unwrap();
        assert_eq!(a.reused_tokens, 0);
        // Leaves the answer at its first token: back to the end of p1.
        let mut p2 = p1.clone();
        p2.extend([40, 41, 42, 43]);
        let b = g.generate(&p2, &p, &mut |_| true).unwrap();
        assert_eq!(b.reused_tokens, p1.len() - again, "{name}");
        let fresh = generator(name).generate(&p2, &p, &mut |_| true).unwrap();
        assert_eq!(b.text, fresh.text, "{name}");
        assert_eq!(b.completion_tokens, fresh.completion_tokens, "{name}");
        // Extends p2 and what was generated after it: nothing to go back to.
        let mut p3 = p2.clone();
        p3.extend([50, 51]);
        let c = g.generate(&p3, &p, &mut |_| true).unwrap();
        assert!(
            c.reused_tokens >= p2.len() - again,
            "{name}: {}",
            c.reused_tokens
        );
        let fresh = generator(name).generate(&p3, &p, &mut |_| true).unwrap();
        assert_eq!(c.text, fresh.text, "{name}");
    }
}

/// With `--sessions 2` a client's conversation survives another client's
/// request in between (its whole prompt but the last token is reused);
/// with one session it does not.
#[test]
fn kept_sessions_reuse_each_conversation() {
    let a = json!({"messages": user("Tell me about cats."), "max_tokens": 3, "temperature": 0});
    let b = json!({"messages": user("Something entirely different: a long history of ships and of the sea."),
                   "max_tokens": 3, "temperature": 0});
    for sessions in ["2", "1"] {
        let s = start_with("4", "512", &["--sessions", sessions]);
        let first = post(&s.addr, "/v1/chat/completions", &a).1;
        post(&s.addr, "/v1/chat/completions", &b);
        let again = post(&s.addr, "/v1/chat/completions", &a).1;
        let n = again["usage"]["prompt_tokens"].as_u64().unwrap();
        let cached = again["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap();
        if sessions == "2" {
            assert_eq!(cached, n - 1, "{again}");
        } else {
            assert!(cached < n / 2, "{again}");
        }
        // The same answer either way.
        assert_eq!(
            again["choices"][0]["message"]["content"],
            first["choices"][0]["message"]["content"]
        );
    }
    let e = sluice()
        .args(["serve", "--model", "x", "--sessions", "0"])
        .output()
        .unwrap();
    assert!(!e.status.success());
    assert!(String::from_utf8_lossy(&e.stderr).contains("--sessions must be at least 1"));
}

/// A parked conversation of a model with linear-attention layers comes
/// back whole: its DeltaNet states with its KV cache.
#[test]
fn parked_conversations_come_back_whole() {
    use sluice_serve::chat::GenParams;
    let p = GenParams {
        max_tokens: 5,
        ..GenParams::default()
    };
    for name in ["qwen3_next", "qwen3_moe"] {
        let mut g = generator(name).with_parked(1);
        let a: Vec<u32> = (3..17).collect();
        let b: Vec<u32> = (40..52).collect();
        let first = g.generate(&a, &p, &mut |_| true).unwrap();
        g.generate(&b, &p, &mut |_| true).unwrap();
        let again = g.generate(&a, &p, &mut |_| true).unwrap();
        assert_eq!(again.reused_tokens, a.len() - 1, "{name}");
        assert_eq!(again.text, first.text, "{name}");
        assert_eq!(g.parked().0, 1, "{name}: b is parked now");
        let back = g.generate(&b, &p, &mut |_| true).unwrap();
        assert_eq!(back.reused_tokens, b.len() - 1, "{name}");
    }
}
