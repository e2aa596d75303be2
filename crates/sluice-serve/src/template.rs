//! The model's own chat template, rendered with minijinja the way Hugging
//! Face's transformers renders it (Python string methods, `tojson` as
//! `json.dumps`, `raise_exception`, `strftime_now`), and the tokens that end
//! an assistant turn.

use minijinja::{Environment, ErrorKind, Value};
use serde_json::{Map, Value as Json};
use sluice_core::{Error, Result};
use sluice_format::ModelFiles;
use std::path::Path;

/// How a template family writes tool calls (and reasoning) in its output;
/// see [`crate::tools::parse`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// `<tool_call>{"name": .., "arguments": ..}</tool_call>` (Qwen, Hermes).
    Hermes,
    /// `<tool_call>NAME<arg_key>k</arg_key><arg_value>v</arg_value></tool_call>` (GLM-4.5+).
    Glm,
    /// `<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGS<｜tool▁call▁end｜>` (DeepSeek V3.1+).
    DeepSeek,
    /// OpenAI's harmony channels (gpt-oss).
    Harmony,
    /// Qwen3-Coder and Qwen3.5: `<tool_call><function=NAME><parameter=k>v</parameter></function></tool_call>`.
    XmlFunction,
    /// No tool-call syntax known.
    Plain,
}

impl Family {
    fn detect(source: &str) -> Family {
        if source.contains("<|channel|>") {
            Family::Harmony
        } else if source.contains("tool▁call▁begin") {
            Family::DeepSeek
        } else if source.contains("<arg_key>") {
            Family::Glm
        } else if source.contains("<function=") {
            Family::XmlFunction
        } else if source.contains("<tool_call>") {
            Family::Hermes
        } else {
            Family::Plain
        }
    }
}

/// Texts of tokens that end a turn in the template families sluice knows;
/// those the vocabulary has stop generation, with the model's EOS.
pub const END_OF_TURN: &[&str] = &[
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<｜end▁of▁sentence｜>",
    "<|user|>",
    "<|observation|>",
    "</s>",
];

/// A chat template and the special-token texts it refers to.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos: String,
    eos: String,
    family: Family,
    /// Where it came from, for messages.
    pub origin: String,
}

/// ChatML, for models that carry no template but whose vocabulary has
/// ChatML's tokens (the Qwen family's).
pub const CHATML: &str = "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\n' + (message.content or '') + '<|im_end|>' + '\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}";

/// `json.dumps(value, ensure_ascii=False)` as transformers' `tojson` writes
/// it: `", "` and `": "` separators, keys in their given order, nothing
/// escaped for HTML; `indent` pretty-prints.
fn py_json(v: &Json, indent: Option<usize>, depth: usize, out: &mut String) {
    let nl = |out: &mut String, d: usize| {
        if let Some(i) = indent {
            out.push('\n');
            out.extend(std::iter::repeat_n(' ', i * d));
        }
    };
    match v {
        Json::Array(a) if !a.is_empty() => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(if indent.is_some() { "," } else { ", " });
                }
                nl(out, depth + 1);
                py_json(x, indent, depth + 1, out);
            }
            nl(out, depth);
            out.push(']');
        }
        Json::Object(m) if !m.is_empty() => {
            out.push('{');
            for (i, (k, x)) in m.iter().enumerate() {
                if i > 0 {
                    out.push_str(if indent.is_some() { "," } else { ", " });
                }
                nl(out, depth + 1);
                out.push_str(&Json::String(k.clone()).to_string());
                out.push_str(": ");
                py_json(x, indent, depth + 1, out);
            }
            nl(out, depth);
            out.push('}');
        }
        other => out.push_str(&other.to_string()),
    }
}

fn tojson(
    v: Value,
    kwargs: minijinja::value::Kwargs,
) -> std::result::Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    let _: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let j = serde_json::to_value(&v)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let mut s = String::new();
    py_json(&j, indent, 0, &mut s);
    Ok(Value::from_safe_string(s))
}

/// Today's date and time in UTC, formatted with the strftime fields chat
/// templates use (`%Y %m %d %B %b %H %M %S`).
fn strftime_now(fmt: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (proleptic Gregorian).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let month = MONTHS[(m - 1) as usize];
    let mut out = String::new();
    let mut it = fmt.chars();
    while let Some(c) = it.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match it.next() {
            Some('Y') => out.push_str(&y.to_string()),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('B') => out.push_str(month),
            Some('b') => out.push_str(&month[..3]),
            Some('H') => out.push_str(&format!("{:02}", rem / 3600)),
            Some('M') => out.push_str(&format!("{:02}", rem % 3600 / 60)),
            Some('S') => out.push_str(&format!("{:02}", rem % 60)),
            Some('%') => out.push('%'),
            Some(o) => {
                out.push('%');
                out.push(o);
            }
            None => out.push('%'),
        }
    }
    out
}

/// A token given as a string or as `{"content": ...}` (tokenizer_config.json).
fn token_text(v: Option<&Json>) -> String {
    match v {
        Some(Json::String(s)) => s.clone(),
        Some(Json::Object(o)) => o
            .get("content")
            .and_then(Json::as_str)
            .unwrap_or("")
            .to_string(),
        _ => String::new(),
    }
}

impl ChatTemplate {
    /// A template from its source, with the BOS and EOS texts it may use.
    pub fn new(source: &str, bos: &str, eos: &str, origin: &str) -> Result<ChatTemplate> {
        let mut env = Environment::new();
        // As transformers renders: blocks take their newline and indent.
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .map_err(|e| Error::Invalid(e.to_string()))?,
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<Value, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| {
                Error::Invalid(format!("{origin}: the chat template does not parse: {e}"))
            })?;
        Ok(ChatTemplate {
            env,
            source: source.to_string(),
            bos: bos.into(),
            eos: eos.into(),
            family: Family::detect(source),
            origin: origin.into(),
        })
    }

    /// The template a model carries: `tokenizer.chat_template` in GGUF;
    /// `chat_template.jinja`, or `chat_template` in `tokenizer_config.json`
    /// (a string, or named templates of which `default` is taken), in a
    /// Hugging Face or MLX folder. `None` when it has none.
    pub fn for_model(files: &ModelFiles) -> Result<Option<ChatTemplate>> {
        if let Some(g) = files.gguf() {
            let s = |k: &str| g.get(k).and_then(|v| v.as_str()).map(str::to_string);
            let Some(src) = s("tokenizer.chat_template") else {
                return Ok(None);
            };
            let tokens = g.get("tokenizer.ggml.tokens").and_then(|v| v.as_array());
            let tok = |k: &str| {
                let id = g.get(k).and_then(|v| v.as_u64())? as usize;
                tokens?.get(id)?.as_str().map(str::to_string)
            };
            let bos = tok("tokenizer.ggml.bos_token_id").unwrap_or_default();
            let eos = tok("tokenizer.ggml.eos_token_id").unwrap_or_default();
            return ChatTemplate::new(&src, &bos, &eos, "the GGUF's tokenizer.chat_template")
                .map(Some);
        }
        let dir = &files.path;
        let read = |p: &Path| -> Result<Option<String>> {
            match std::fs::read_to_string(p) {
                Ok(s) => Ok(Some(s)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(Error::io(p, e)),
            }
        };
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: Map<String, Json> = match read(&cfg_path)? {
            Some(t) => serde_json::from_str(&t).map_err(|e| Error::Format {
                path: cfg_path.clone(),
                format: "tokenizer_config.json",
                msg: e.to_string(),
            })?,
            None => Map::new(),
        };
        let (bos, eos) = (
            token_text(cfg.get("bos_token")),
            token_text(cfg.get("eos_token")),
        );
        let jinja = dir.join("chat_template.jinja");
        if let Some(src) = read(&jinja)? {
            return ChatTemplate::new(&src, &bos, &eos, &jinja.display().to_string()).map(Some);
        }
        let src = match cfg.get("chat_template") {
            Some(Json::String(s)) => Some(s.clone()),
            Some(Json::Array(named)) => named
                .iter()
                .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
                .or_else(|| named.first())
                .and_then(|t| t.get("template"))
                .and_then(Json::as_str)
                .map(str::to_string),
            _ => None,
        };
        match src {
            Some(s) => ChatTemplate::new(&s, &bos, &eos, &cfg_path.display().to_string()).map(Some),
            None => Ok(None),
        }
    }

    /// The template's tool-call family.
    pub fn family(&self) -> Family {
        self.family
    }

    /// The template's source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders `messages` (OpenAI chat messages) with `tools` (OpenAI tool
    /// definitions) and any extra variables (`enable_thinking`,
    /// `reasoning_effort`, ...).
    pub fn render(
        &self,
        messages: &[Json],
        tools: Option<&[Json]>,
        add_generation_prompt: bool,
        extra: &Map<String, Json>,
    ) -> Result<String> {
        let mut ctx = extra.clone();
        ctx.insert("messages".into(), Json::Array(messages.to_vec()));
        if let Some(t) = tools.filter(|t| !t.is_empty()) {
            ctx.insert("tools".into(), Json::Array(t.to_vec()));
        }
        ctx.insert("add_generation_prompt".into(), add_generation_prompt.into());
        ctx.insert("bos_token".into(), self.bos.clone().into());
        ctx.insert("eos_token".into(), self.eos.clone().into());
        let t = self
            .env
            .get_template("chat")
            .map_err(|e| Error::Invalid(e.to_string()))?;
        t.render(Value::from(minijinja::value::Serde(Json::Object(ctx))))
            .map_err(|e| {
                let mut msg = e.to_string();
                let mut src = std::error::Error::source(&e);
                while let Some(s) = src {
                    msg.push_str(&format!(": {s}"));
                    src = s.source();
                }
                Error::Invalid(format!("chat template ({}): {msg}", self.origin))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tojson_writes_as_python_does() {
        let v: Json = serde_json::from_str(r#"{"b": [1, "<x>"], "a": {}, "c": "é"}"#).unwrap();
        let mut s = String::new();
        py_json(&v, None, 0, &mut s);
        assert_eq!(s, r#"{"b": [1, "<x>"], "a": {}, "c": "é"}"#);
        let mut s = String::new();
        py_json(&v, Some(2), 0, &mut s);
        assert_eq!(
            s,
            "{\n  \"b\": [\n    1,\n    \"<x>\"\n  ],\n  \"a\": {},\n  \"c\": \"é\"\n}"
        );
    }

    #[test]
    fn strftime_formats_a_date() {
        let s = strftime_now("%Y-%m-%d %d %B %Y".into());
        let y: i64 = s[..4].parse().unwrap();
        assert!((2024..3000).contains(&y), "{s}");
        assert_eq!(&s[4..5], "-");
    }

    #[test]
    fn errors_name_the_template() {
        let e = ChatTemplate::new("{% if %}", "", "", "t.jinja")
            .err()
            .unwrap();
        assert!(e.to_string().contains("t.jinja"), "{e}");
        let t = ChatTemplate::new("{{ raise_exception('no system role') }}", "", "", "t").unwrap();
        let e = t.render(&[], None, true, &Map::new()).unwrap_err();
        assert!(e.to_string().contains("no system role"), "{e}");
    }
}
