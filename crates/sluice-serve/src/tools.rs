//! The model's output split into what OpenAI's API returns: visible
//! content, reasoning, and tool calls, for each template family.

use crate::template::Family;
use serde_json::{json, Map, Value as Json};

/// A tool call the model made.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolCall {
    /// The function's name.
    pub name: String,
    /// Its arguments, as a JSON text (what OpenAI's API carries).
    pub arguments: String,
}

/// An assistant turn, parsed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Parsed {
    /// What the user sees.
    pub content: String,
    /// Thinking (`<think>`, harmony's analysis channel), if any.
    pub reasoning: Option<String>,
    /// Tool calls, in order.
    pub tool_calls: Vec<ToolCall>,
}

impl ToolCall {
    /// OpenAI's `tool_calls` entry (`id` numbered within the response).
    pub fn to_openai(&self, i: usize) -> Json {
        json!({"id": format!("call_{i}"), "type": "function",
               "function": {"name": self.name, "arguments": self.arguments}})
    }
}

/// Text between the first `open` and the next `close` (or the end), and
/// the text before and after.
fn between<'a>(s: &'a str, open: &str, close: &str) -> Option<(&'a str, &'a str, &'a str)> {
    let i = s.find(open)?;
    let rest = &s[i + open.len()..];
    let (inner, after) = match rest.find(close) {
        Some(j) => (&rest[..j], &rest[j + close.len()..]),
        None => (rest, ""),
    };
    Some((&s[..i], inner, after))
}

/// Splits `<think>…</think>` off; a template that opened the block itself
/// leaves only the closing tag in the output.
fn split_think(text: &str) -> (Option<String>, String) {
    if let Some((before, inner, after)) = between(text, "<think>", "</think>") {
        let content = format!("{}{}", before, after);
        return (
            Some(inner.trim().to_string()),
            content.trim_start().to_string(),
        );
    }
    if let Some(j) = text.find("</think>") {
        return (
            Some(text[..j].trim().to_string()),
            text[j + "</think>".len()..].trim_start().to_string(),
        );
    }
    (None, text.to_string())
}

/// A JSON value as arguments text: objects as written, anything else
/// (a string holding JSON) passed through.
fn args_text(v: &Json) -> String {
    match v {
        Json::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Each `<tool_call>…</tool_call>` block of `text` parsed by `one`; a
/// block `one` cannot read stays in the content as text.
fn tool_call_blocks(
    text: &str,
    calls: &mut Vec<ToolCall>,
    one: impl Fn(&str) -> Option<ToolCall>,
) -> String {
    let mut content = String::new();
    let mut rest = text;
    while let Some((before, inner, after)) = between(rest, "<tool_call>", "</tool_call>") {
        content.push_str(before);
        match one(inner) {
            Some(c) => calls.push(c),
            None => content.push_str(&format!("<tool_call>{inner}</tool_call>")),
        }
        rest = after;
    }
    content.push_str(rest);
    content
}

/// `{"name": .., "arguments": ..}`.
fn hermes_call(inner: &str) -> Option<ToolCall> {
    let v: Json = serde_json::from_str(inner.trim()).ok()?;
    Some(ToolCall {
        name: v.get("name")?.as_str()?.to_string(),
        arguments: v.get("arguments").map_or("{}".into(), args_text),
    })
}

/// An argument value as the model wrote it: JSON when it parses as JSON
/// (numbers, objects), else the string.
fn arg_value(v: &str) -> Json {
    let t = v.trim();
    serde_json::from_str(t).unwrap_or_else(|_| Json::String(t.to_string()))
}

/// `NAME<arg_key>k</arg_key><arg_value>v</arg_value>…`.
fn glm_call(inner: &str) -> Option<ToolCall> {
    let name_end = inner.find("<arg_key>").unwrap_or(inner.len());
    let mut args = Map::new();
    let mut a = &inner[name_end..];
    while let Some((_, k, after_k)) = between(a, "<arg_key>", "</arg_key>") {
        let Some((_, v, after_v)) = between(after_k, "<arg_value>", "</arg_value>") else {
            break;
        };
        args.insert(k.trim().to_string(), arg_value(v));
        a = after_v;
    }
    Some(ToolCall {
        name: inner[..name_end].trim().to_string(),
        arguments: Json::Object(args).to_string(),
    })
}

/// `<function=NAME><parameter=k>v</parameter>…</function>`.
fn xml_function_call(inner: &str) -> Option<ToolCall> {
    let (_, f, _) = between(inner, "<function=", "</function>")?;
    let name_end = f.find('>').unwrap_or(f.len());
    let mut args = Map::new();
    let mut a = f.get(name_end + 1..).unwrap_or("");
    while let Some((_, p, after_p)) = between(a, "<parameter=", "</parameter>") {
        let k_end = p.find('>').unwrap_or(p.len());
        let v = p.get(k_end + 1..).unwrap_or("");
        args.insert(p[..k_end].trim().to_string(), arg_value(v));
        a = after_p;
    }
    Some(ToolCall {
        name: f[..name_end].trim().to_string(),
        arguments: Json::Object(args).to_string(),
    })
}

fn parse_deepseek(text: &str, calls: &mut Vec<ToolCall>) -> String {
    const BEGIN: &str = "<｜tool▁calls▁begin｜>";
    let (content, tail) = match text.find(BEGIN) {
        Some(i) => (&text[..i], &text[i + BEGIN.len()..]),
        None => return text.to_string(),
    };
    let mut rest = tail;
    while let Some((_, inner, after)) =
        between(rest, "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>")
    {
        if let Some((name, args)) = inner.split_once("<｜tool▁sep｜>") {
            // V3 wrote `function<sep>NAME\n```json\nARGS\n```'; V3.1 `NAME<sep>ARGS`.
            let (name, args) = match args.split_once("```json") {
                Some((n, a)) if name.trim() == "function" => {
                    (n.trim(), a.trim().trim_end_matches("```").trim())
                }
                _ => (name.trim(), args.trim()),
            };
            calls.push(ToolCall {
                name: name.to_string(),
                arguments: args.to_string(),
            });
        }
        rest = after;
    }
    content.to_string()
}

/// Harmony: `<|channel|>analysis<|message|>…<|end|>` is reasoning,
/// `…to=functions.NAME<|channel|>commentary json<|message|>ARGS<|call|>`
/// a call, `<|channel|>final<|message|>…` the content.
fn parse_harmony(text: &str, calls: &mut Vec<ToolCall>) -> (Option<String>, String) {
    let mut reasoning = Vec::new();
    let mut content = String::new();
    // Messages are separated by <|start|>; the first one's header was in
    // the prompt (`<|start|>assistant`).
    for msg in text.split("<|start|>") {
        let Some((header, body)) = msg.split_once("<|message|>") else {
            content.push_str(msg.trim_start_matches("assistant"));
            continue;
        };
        let body = body
            .trim_end_matches("<|end|>")
            .trim_end_matches("<|call|>")
            .trim_end_matches("<|return|>");
        if let Some(i) = header.find("to=functions.") {
            let name: String = header[i + "to=functions.".len()..]
                .chars()
                .take_while(|c| !c.is_whitespace() && *c != '<')
                .collect();
            calls.push(ToolCall {
                name,
                arguments: body.trim().to_string(),
            });
        } else if header.contains("<|channel|>analysis") {
            reasoning.push(body.trim().to_string());
        } else {
            content.push_str(body);
        }
    }
    (
        (!reasoning.is_empty()).then(|| reasoning.join("\n")),
        content,
    )
}

/// Splits an assistant turn's text by `family`'s conventions.
pub fn parse(family: Family, text: &str) -> Parsed {
    let mut calls = Vec::new();
    let (reasoning, content) = match family {
        Family::Harmony => parse_harmony(text, &mut calls),
        _ => {
            let (reasoning, rest) = split_think(text);
            let content = match family {
                Family::Hermes => tool_call_blocks(&rest, &mut calls, hermes_call),
                Family::Glm => tool_call_blocks(&rest, &mut calls, glm_call),
                Family::XmlFunction => tool_call_blocks(&rest, &mut calls, xml_function_call),
                Family::DeepSeek => parse_deepseek(&rest, &mut calls),
                Family::Harmony | Family::Plain => rest,
            };
            (reasoning, content)
        }
    };
    Parsed {
        content: content.trim().to_string(),
        reasoning: reasoning.filter(|r| !r.is_empty()),
        tool_calls: calls,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(name: &str, args: &str) -> ToolCall {
        ToolCall {
            name: name.into(),
            arguments: args.into(),
        }
    }

    #[test]
    fn each_family_parses_its_calls() {
        let p = parse(
            Family::Hermes,
            "<think>\nweather?\n</think>\n\nLet me look.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
        );
        assert_eq!(p.reasoning.as_deref(), Some("weather?"));
        assert_eq!(p.content, "Let me look.");
        assert_eq!(
            p.tool_calls,
            vec![call("get_weather", r#"{"city":"Paris"}"#)]
        );
        let p = parse(
            Family::Glm,
            "<think>hm</think>\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>",
        );
        assert_eq!(
            p.tool_calls,
            vec![call("get_weather", r#"{"city":"Paris","days":3}"#)]
        );
        assert_eq!(p.content, "");
        let p = parse(
            Family::DeepSeek,
            "</think>Sure.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{\"city\": \"Paris\"}<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
        );
        assert_eq!(p.content, "Sure.");
        assert_eq!(
            p.tool_calls,
            vec![call("get_weather", r#"{"city": "Paris"}"#)]
        );
        let p = parse(
            Family::Harmony,
            "<|channel|>analysis<|message|>Need weather.<|end|><|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>{\"city\":\"Paris\"}<|call|>",
        );
        assert_eq!(p.reasoning.as_deref(), Some("Need weather."));
        assert_eq!(
            p.tool_calls,
            vec![call("get_weather", r#"{"city":"Paris"}"#)]
        );
        let p = parse(
            Family::Harmony,
            "<|channel|>analysis<|message|>Easy.<|end|><|start|>assistant<|channel|>final<|message|>Hello!<|return|>",
        );
        assert_eq!((p.content.as_str(), p.tool_calls.len()), ("Hello!", 0));
        let p = parse(
            Family::XmlFunction,
            "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>",
        );
        assert_eq!(
            p.tool_calls,
            vec![call("get_weather", r#"{"city":"Paris"}"#)]
        );
    }

    #[test]
    fn text_that_is_not_a_call_stays_text() {
        let p = parse(Family::Hermes, "a <tool_call>not json</tool_call> b");
        assert!(p.tool_calls.is_empty());
        assert_eq!(p.content, "a <tool_call>not json</tool_call> b");
        let p = parse(Family::Plain, "plain answer");
        assert_eq!(p.content, "plain answer");
    }
}

/// What a piece of streamed output is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// Visible content.
    Content,
    /// Thinking.
    Reasoning,
}

/// Splits a streamed turn as it arrives: content and reasoning go out as
/// soon as they cannot be the start of a marker; from a tool-call opener
/// on, the text is held for [`parse`] at the end. Harmony's channels are
/// held whole.
pub struct StreamSplit {
    family: Family,
    in_think: bool,
    in_tools: bool,
    buf: String,
}

fn tool_open(family: Family) -> Option<&'static str> {
    match family {
        Family::Hermes | Family::Glm | Family::XmlFunction => Some("<tool_call>"),
        Family::DeepSeek => Some("<｜tool▁calls▁begin｜>"),
        Family::Harmony | Family::Plain => None,
    }
}

/// Bytes at the end of `s` that could begin `marker` (a char boundary).
pub(crate) fn partial_suffix(s: &str, marker: &str) -> usize {
    (1..marker.len().min(s.len() + 1))
        .rev()
        .find(|&n| s.is_char_boundary(s.len() - n) && marker.starts_with(&s[s.len() - n..]))
        .unwrap_or(0)
}

impl StreamSplit {
    /// A splitter for `family`; `prompt` is the rendered prompt (a template
    /// that opened `<think>` itself starts the answer in reasoning).
    pub fn new(family: Family, prompt: &str) -> StreamSplit {
        let t = prompt.trim_end();
        StreamSplit {
            family,
            in_think: family != Family::Harmony && t.ends_with("<think>"),
            in_tools: false,
            buf: String::new(),
        }
    }

    /// Whether everything is held until the end.
    pub fn holds_all(&self) -> bool {
        self.family == Family::Harmony
    }

    /// Takes a piece; returns what can go out now.
    pub fn push(&mut self, piece: &str) -> Vec<(Part, String)> {
        let mut out = Vec::new();
        if self.holds_all() || self.in_tools {
            return out;
        }
        self.buf.push_str(piece);
        loop {
            let (marker, part) = if self.in_think {
                ("</think>", Part::Reasoning)
            } else {
                ("<think>", Part::Content)
            };
            let tool = tool_open(self.family).filter(|_| !self.in_think);
            let hit_m = self.buf.find(marker);
            let hit_t = tool.and_then(|t| self.buf.find(t));
            match (hit_m, hit_t) {
                (Some(i), t) if t.is_none_or(|t| i < t) => {
                    if i > 0 {
                        out.push((part, self.buf[..i].to_string()));
                    }
                    self.buf.drain(..i + marker.len());
                    self.in_think = !self.in_think;
                }
                (_, Some(t)) => {
                    if t > 0 {
                        out.push((Part::Content, self.buf[..t].to_string()));
                    }
                    self.buf.drain(..t);
                    self.in_tools = true;
                    return out;
                }
                _ => {
                    let hold = partial_suffix(&self.buf, marker)
                        .max(tool.map_or(0, |t| partial_suffix(&self.buf, t)));
                    let emit = self.buf.len() - hold;
                    if emit > 0 {
                        out.push((part, self.buf[..emit].to_string()));
                        self.buf.drain(..emit);
                    }
                    return out;
                }
            }
        }
    }

    /// Whether the turn's end must be parsed for tool calls (an opener
    /// was seen, or everything was held).
    pub fn has_held(&self) -> bool {
        self.holds_all() || self.in_tools
    }

    /// What is left at the end, if no opener was seen.
    pub fn finish(&mut self) -> Option<(Part, String)> {
        if self.has_held() || self.buf.is_empty() {
            return None;
        }
        let part = if self.in_think {
            Part::Reasoning
        } else {
            Part::Content
        };
        Some((part, std::mem::take(&mut self.buf)))
    }
}

#[cfg(test)]
mod split_tests {
    use super::*;

    fn run(family: Family, prompt: &str, pieces: &[&str]) -> (Vec<(Part, String)>, bool) {
        let mut s = StreamSplit::new(family, prompt);
        let mut out: Vec<(Part, String)> = Vec::new();
        for p in pieces {
            for (k, t) in s.push(p) {
                match out.last_mut() {
                    Some((lk, lt)) if *lk == k => lt.push_str(&t),
                    _ => out.push((k, t)),
                }
            }
        }
        if let Some((k, t)) = s.finish() {
            match out.last_mut() {
                Some((lk, lt)) if *lk == k => lt.push_str(&t),
                _ => out.push((k, t)),
            }
        }
        (out, s.has_held())
    }

    #[test]
    fn streams_reasoning_and_content_and_holds_calls() {
        let (o, held) = run(
            Family::Hermes,
            "",
            &[
                "<th",
                "ink>hm",
                "m</th",
                "ink>Hi",
                " <tool",
                "_call>{\"name\"",
                "}",
            ],
        );
        assert_eq!(
            o,
            vec![
                (Part::Reasoning, "hmm".into()),
                (Part::Content, "Hi ".into())
            ]
        );
        assert!(held);
        // A template that opened the think block: the answer starts in it.
        let (o, held) = run(
            Family::Hermes,
            "<|im_start|>assistant\n<think>\n",
            &["a", "b</think>", "c"],
        );
        assert_eq!(
            o,
            vec![(Part::Reasoning, "ab".into()), (Part::Content, "c".into())]
        );
        assert!(!held);
        // A '<' that starts no marker goes out at the end.
        let (o, _) = run(Family::Plain, "", &["a <", "b"]);
        assert_eq!(o, vec![(Part::Content, "a <b".into())]);
        let (o, held) = run(Family::Harmony, "", &["<|channel|>final<|message|>x"]);
        assert!(o.is_empty() && held);
    }
}
