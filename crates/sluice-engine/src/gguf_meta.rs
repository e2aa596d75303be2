//! The GGUF metadata other readers need: llama.cpp's hyper-parameter keys
//! for each architecture and a vocabulary, so that the files `sluice pack`
//! and `sluice synth` write load in llama.cpp as well as in sluice (the
//! side-by-side benchmarks need the same file in both engines).
//!
//! sluice itself reads its normalized `sluice.config`; these keys say the
//! same in llama.cpp's terms (`<arch>.block_count`, `<arch>.expert_count`,
//! ...), with the values `Config::from_gguf` reads back.

use crate::config::{Arch, Config, Mixer, Mla};
use crate::pack::gguf_arch;
use sluice_format::{Gguf, MetaValue, Value};

/// Feed-forward widths the config does not record (they come from the
/// weights' shapes).
#[derive(Clone, Copy, Debug, Default)]
pub struct FfnSizes {
    /// Dense MLP layers' intermediate size (0 when every layer is MoE).
    pub dense: usize,
    /// Routed experts' intermediate size.
    pub expert: usize,
    /// The shared expert's intermediate size, if any.
    pub shared: Option<usize>,
}

/// `general.*` and `<arch>.*` keys for `c`.
pub fn hparams(c: &Config, ffn: FfnSizes, name: &str) -> Vec<(String, MetaValue)> {
    let a = gguf_arch(c.arch);
    let k = |s: &str| format!("{a}.{s}");
    let u = |v: usize| MetaValue::U32(v as u32);
    let mut m = vec![
        ("general.type".to_string(), MetaValue::Str("model".into())),
        ("general.name".to_string(), MetaValue::Str(name.into())),
        (k("context_length"), u(c.max_ctx.unwrap_or(32_768))),
        (k("embedding_length"), u(c.hidden)),
        (k("block_count"), u(c.n_layers)),
        (k("attention.head_count"), u(c.n_heads)),
        (k("attention.head_count_kv"), u(c.n_kv_heads)),
        (k("attention.key_length"), u(c.head_dim)),
        (k("attention.value_length"), u(c.head_dim)),
        (
            k("attention.layer_norm_rms_epsilon"),
            MetaValue::F32(c.rms_eps),
        ),
        (k("rope.freq_base"), MetaValue::F32(c.rope_theta)),
        (k("rope.dimension_count"), u(c.rot_dim)),
        (k("expert_count"), u(c.n_experts)),
        (k("expert_used_count"), u(c.config_top_k)),
        (k("expert_weights_norm"), MetaValue::Bool(c.norm_topk_prob)),
    ];
    // llama.cpp's `feed_forward_length` is the dense MLP's for the Qwen
    // MoE families and the expert's for llama (Mixtral) and OLMoE.
    let ff = match c.arch {
        Arch::Mixtral | Arch::Olmoe => ffn.expert,
        _ if ffn.dense > 0 => ffn.dense,
        _ => ffn.expert,
    };
    m.push((k("feed_forward_length"), u(ff)));
    m.push((k("expert_feed_forward_length"), u(ffn.expert)));
    if let Some(s) = ffn.shared {
        m.push((k("expert_shared_feed_forward_length"), u(s)));
    }
    if c.arch == Arch::Mixtral {
        m.push((k("vocab_size"), u(c.vocab)));
    }
    if let Some(mla) = c.mla {
        deepseek2(c, mla, &mut m);
    }
    if c.routing.sigmoid {
        sigmoid_router(c, ffn, &mut m);
    }
    if let Some(w) = c.windows.iter().flatten().next() {
        m.push((k("attention.sliding_window"), u(*w)));
        if c.arch == Arch::GptOss {
            m.push((
                k("attention.sliding_window_pattern"),
                MetaValue::Bools(c.windows.iter().map(Option::is_some).collect()),
            ));
        }
    }
    if let (None, Some(y)) = (c.mla, c.yarn) {
        yarn(a, y, None, &mut m);
    }
    if let Some(l) = &c.llama4 {
        // llama.cpp's Llama 4 keys: the MoE interval, and a window of 0
        // where the model has no chunks (it then ropes every layer).
        let step = c.moe_layers.iter().position(|&x| x).map_or(1, |i| i + 1);
        m.push((k("interleave_moe_layer_step"), u(step)));
        if l.chunk.is_none() {
            m.push((k("attention.sliding_window"), u(0)));
        }
    }
    if let Some(l) = c.linear {
        m.push((k("ssm.conv_kernel"), u(l.conv_kernel)));
        m.push((k("ssm.state_size"), u(l.k_dim)));
        m.push((k("ssm.group_count"), u(l.k_heads)));
        m.push((k("ssm.time_step_rank"), u(l.v_heads)));
        m.push((k("ssm.inner_size"), u(l.v_heads * l.v_dim)));
        // The layer pattern, as an interval when it is one (Qwen3.5's),
        // else layer by layer.
        let every = c
            .mixers
            .iter()
            .position(|&x| x == Mixer::Attention)
            .map(|i| i + 1);
        let regular = every.is_some_and(|e| {
            c.mixers
                .iter()
                .enumerate()
                .all(|(i, &x)| (x == Mixer::Attention) == ((i + 1) % e == 0))
        });
        match (every, regular) {
            (Some(e), true) => m.push((k("full_attention_interval"), u(e))),
            _ => m.push((
                k("attention.recurrent_layers"),
                MetaValue::Bools(c.mixers.iter().map(|&x| x == Mixer::Linear).collect()),
            )),
        }
        // Multimodal rope sections (text uses one position for all):
        // Qwen3.5's 11:11:10 split of the rotated pairs.
        let pairs = (c.rot_dim / 2) as i32;
        let s = (pairs * 11 + 16) / 32;
        m.push((
            k("rope.dimension_sections"),
            MetaValue::I32s(vec![s, s, pairs - 2 * s, 0]),
        ));
    }
    m
}

/// llama.cpp's `deepseek2` keys, as its converter writes them for absorbed
/// MLA: one key/value head of `kv_lora + rope` (the cache), the per-head
/// sizes as `*_length_mla`, the router's and YaRN's settings.
fn deepseek2(c: &Config, mla: Mla, m: &mut Vec<(String, MetaValue)>) {
    let k = |s: &str| format!("deepseek2.{s}");
    let u = |v: usize| MetaValue::U32(v as u32);
    let set = |m: &mut Vec<(String, MetaValue)>, key: String, v: MetaValue| {
        m.retain(|(x, _)| *x != key);
        m.push((key, v));
    };
    set(m, k("attention.head_count_kv"), u(1));
    set(m, k("attention.key_length"), u(mla.kv_lora + mla.rope));
    set(m, k("attention.value_length"), u(mla.kv_lora));
    m.push((k("attention.key_length_mla"), u(mla.nope + mla.rope)));
    m.push((k("attention.value_length_mla"), u(mla.v)));
    if mla.q_lora > 0 {
        m.push((k("attention.q_lora_rank"), u(mla.q_lora)));
    }
    m.push((k("attention.kv_lora_rank"), u(mla.kv_lora)));
    if let Some(y) = c.yarn {
        // The q·k scale is mscale(factor, mscale_all_dim)² / sqrt(head):
        // llama.cpp wants mscale_all_dim back, times 0.1.
        let head = (mla.nope + mla.rope) as f32;
        let log_mul = c
            .attn_scale
            .map(|s| ((s * head.sqrt()).sqrt() - 1.0) / y.factor.ln().max(f32::MIN_POSITIVE))
            .filter(|l| l.is_finite() && *l != 0.0);
        yarn("deepseek2", y, log_mul, m);
    }
}

/// llama.cpp's `rope.scaling.*` keys of YaRN `y` (with DeepSeek's
/// `yarn_log_multiplier` when given).
fn yarn(
    a: &str,
    y: sluice_core::ops::Yarn,
    log_mul: Option<f32>,
    m: &mut Vec<(String, MetaValue)>,
) {
    let k = |s: &str| format!("{a}.{s}");
    let u = |v: usize| MetaValue::U32(v as u32);
    m.push((k("rope.scaling.type"), MetaValue::Str("yarn".into())));
    m.push((k("rope.scaling.factor"), MetaValue::F32(y.factor)));
    m.push((k("rope.scaling.original_context_length"), u(y.orig_ctx)));
    m.push((
        k("rope.scaling.yarn_beta_fast"),
        MetaValue::F32(y.beta_fast),
    ));
    m.push((
        k("rope.scaling.yarn_beta_slow"),
        MetaValue::F32(y.beta_slow),
    ));
    let attn_factor = match log_mul {
        Some(l) => {
            m.push((k("rope.scaling.yarn_log_multiplier"), MetaValue::F32(l)));
            y.attn_factor
        }
        None => y.attn_factor / sluice_core::ops::Yarn::mscale(y.factor, 1.0),
    };
    if attn_factor != 1.0 {
        m.push((k("rope.scaling.attn_factor"), MetaValue::F32(attn_factor)));
    }
}

/// The keys of DeepSeek-V3's router (`deepseek2`, `glm4moe`): sigmoid
/// gating, groups, weight scale, leading dense layers, shared experts.
fn sigmoid_router(c: &Config, ffn: FfnSizes, m: &mut Vec<(String, MetaValue)>) {
    let a = gguf_arch(c.arch);
    let k = |s: &str| format!("{a}.{s}");
    let u = |v: usize| MetaValue::U32(v as u32);
    let lead = c.moe_layers.iter().take_while(|&&x| !x).count();
    m.push((k("leading_dense_block_count"), u(lead)));
    let shared = ffn.shared.map_or(0, |s| s / ffn.expert.max(1));
    m.push((k("expert_shared_count"), u(shared)));
    let r = c.routing;
    m.push((k("expert_weights_scale"), MetaValue::F32(r.scale)));
    m.push((k("expert_gating_func"), u(2)));
    m.push((k("expert_group_count"), u(r.n_group)));
    m.push((k("expert_group_used_count"), u(r.topk_group)));
}

/// GPT-2's printable stand-in for each byte (byte-level BPE vocabularies
/// spell bytes this way).
fn byte_char(b: u8) -> char {
    match b {
        b'!'..=b'~' | 0xa1..=0xac | 0xae..=0xff => b as char,
        _ => {
            // The others, in order, after U+0100.
            let rank = (0..b)
                .filter(|&x| !matches!(x, b'!'..=b'~' | 0xa1..=0xac | 0xae..=0xff))
                .count();
            char::from_u32(256 + rank as u32).unwrap_or('?')
        }
    }
}

/// Special tokens of the byte vocabulary, after the 256 bytes.
const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// A byte-level BPE vocabulary of `vocab` tokens for synthetic models: the
/// 256 bytes, three specials (end of text is the end-of-sequence token)
/// and unused padding, with no merges, so text tokenizes byte by byte in
/// sluice and llama.cpp alike.
pub fn byte_vocab(vocab: usize) -> Vec<(String, MetaValue)> {
    let mut tokens: Vec<String> = (0..=255u8).map(|b| byte_char(b).to_string()).collect();
    let mut types = vec![1i32; 256];
    for s in SPECIALS {
        tokens.push(s.to_string());
        types.push(3);
    }
    while tokens.len() < vocab {
        tokens.push(format!("[PAD{}]", tokens.len()));
        types.push(5);
    }
    tokens.truncate(vocab);
    types.truncate(vocab);
    let eos = 256.min(vocab.saturating_sub(1)) as u32;
    vec![
        ("tokenizer.ggml.model".into(), MetaValue::Str("gpt2".into())),
        (
            "tokenizer.ggml.pre".into(),
            MetaValue::Str("default".into()),
        ),
        ("tokenizer.ggml.tokens".into(), MetaValue::Strs(tokens)),
        ("tokenizer.ggml.token_type".into(), MetaValue::I32s(types)),
        ("tokenizer.ggml.merges".into(), MetaValue::Strs(Vec::new())),
        ("tokenizer.ggml.bos_token_id".into(), MetaValue::U32(eos)),
        ("tokenizer.ggml.eos_token_id".into(), MetaValue::U32(eos)),
        (
            "tokenizer.ggml.add_bos_token".into(),
            MetaValue::Bool(false),
        ),
    ]
}

/// A source GGUF's `tokenizer.*` keys, converted to the types llama.cpp
/// reads them as (ids u32, token types i32, scores f32). Keys of other
/// shapes are skipped.
pub fn copy_tokenizer(g: &Gguf) -> Vec<(String, MetaValue)> {
    let mut out = Vec::new();
    for (k, v) in &g.meta {
        if !k.starts_with("tokenizer.") {
            continue;
        }
        let m = match v {
            Value::Str(s) => MetaValue::Str(s.clone()),
            Value::Bool(b) => MetaValue::Bool(*b),
            Value::U64(x) => MetaValue::U32(*x as u32),
            Value::I64(x) => MetaValue::U32(*x as u32),
            Value::F64(x) => MetaValue::F32(*x as f32),
            Value::Array(a) => match a.first() {
                Some(Value::Str(_)) => MetaValue::Strs(
                    a.iter()
                        .map(|x| x.as_str().unwrap_or("").to_string())
                        .collect(),
                ),
                Some(Value::F64(_)) => {
                    MetaValue::F32s(a.iter().map(|x| x.as_f64().unwrap_or(0.0) as f32).collect())
                }
                Some(Value::U64(_) | Value::I64(_)) => {
                    MetaValue::I32s(a.iter().map(|x| x.as_f64().unwrap_or(0.0) as i32).collect())
                }
                Some(Value::Bool(_)) => {
                    MetaValue::Bools(a.iter().map(|x| x.as_bool().unwrap_or(false)).collect())
                }
                _ => continue,
            },
        };
        out.push((k.to_string(), m));
    }
    out
}

/// A Hugging Face `tokenizer.json` with a byte-level BPE model as GGUF
/// keys (tokens by id, merges, special tokens as control), or `None` for
/// other tokenizer models, which keep only sluice's own copy.
pub fn from_tokenizer_json(
    json: &str,
    vocab: usize,
    eos: Option<u32>,
) -> Option<Vec<(String, MetaValue)>> {
    let t: serde_json::Value = serde_json::from_str(json).ok()?;
    let model = t.get("model")?;
    if model.get("type")?.as_str()? != "BPE" {
        return None;
    }
    let mut tokens: Vec<Option<String>> = vec![None; vocab];
    let mut types = vec![1i32; vocab];
    for (s, id) in model.get("vocab")?.as_object()? {
        let id = id.as_u64()? as usize;
        if id < vocab {
            tokens[id] = Some(s.clone());
        }
    }
    for a in t
        .get("added_tokens")
        .and_then(|a| a.as_array())
        .into_iter()
        .flatten()
    {
        let (Some(id), Some(s)) = (
            a.get("id").and_then(|x| x.as_u64()),
            a.get("content").and_then(|x| x.as_str()),
        ) else {
            continue;
        };
        if (id as usize) < vocab {
            tokens[id as usize] = Some(s.to_string());
            let special = a.get("special").and_then(|x| x.as_bool()).unwrap_or(false);
            types[id as usize] = if special { 3 } else { 4 };
        }
    }
    let tokens: Vec<String> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            t.unwrap_or_else(|| {
                types[i] = 5;
                format!("[PAD{i}]")
            })
        })
        .collect();
    let merges: Vec<String> = model
        .get("merges")?
        .as_array()?
        .iter()
        .filter_map(|m| match m {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Array(p) => {
                Some(format!("{} {}", p.first()?.as_str()?, p.get(1)?.as_str()?))
            }
            _ => None,
        })
        .collect();
    let eos = eos.unwrap_or(0);
    Some(vec![
        ("tokenizer.ggml.model".into(), MetaValue::Str("gpt2".into())),
        (
            "tokenizer.ggml.pre".into(),
            MetaValue::Str("default".into()),
        ),
        ("tokenizer.ggml.tokens".into(), MetaValue::Strs(tokens)),
        ("tokenizer.ggml.token_type".into(), MetaValue::I32s(types)),
        ("tokenizer.ggml.merges".into(), MetaValue::Strs(merges)),
        ("tokenizer.ggml.bos_token_id".into(), MetaValue::U32(eos)),
        ("tokenizer.ggml.eos_token_id".into(), MetaValue::U32(eos)),
        (
            "tokenizer.ggml.add_bos_token".into(),
            MetaValue::Bool(false),
        ),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_byte_alphabet_is_gpt2s() {
        // Spot values of GPT-2's bytes_to_unicode.
        assert_eq!(byte_char(b'A'), 'A');
        assert_eq!(byte_char(b' '), 'Ġ');
        assert_eq!(byte_char(b'\n'), 'Ċ');
        assert_eq!(byte_char(0), 'Ā');
        assert_eq!(byte_char(0xad), 'Ń');
        let all: std::collections::HashSet<char> = (0..=255u8).map(byte_char).collect();
        assert_eq!(all.len(), 256);
    }
}
