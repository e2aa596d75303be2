//! Architecture hyper-parameters, normalized from a Hugging Face
//! `config.json` or from GGUF metadata into one [`Config`].

use crate::{Gguf, ModelFiles, Value};
use sluice_core::ops::{RopeStyle, Yarn};
use sluice_core::{Error, Result};
use std::sync::Arc;

/// Supported architectures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// Qwen3-30B-A3B, Qwen3-235B-A22B: per-head q/k RMSNorm.
    Qwen3Moe,
    /// Qwen1.5-MoE / Qwen2-57B-A14B: qkv bias, sigmoid-gated shared expert.
    Qwen2Moe,
    /// Mixtral 8x7B / 8x22B.
    Mixtral,
    /// OLMoE: q/k RMSNorm over the whole projection, optional qkv clipping.
    Olmoe,
    /// Qwen3.5-MoE (Qwen3.5-397B-A17B, Qwen3.6-35B-A3B): Gated DeltaNet
    /// linear attention in most layers, output-gated full attention with
    /// partial rotary in the rest, a sigmoid-gated shared expert.
    Qwen35Moe,
    /// DeepSeek-V3/R1/V3.1 and Kimi K2: multi-head latent attention,
    /// sigmoid routing with a selection bias over expert groups, shared
    /// experts, leading dense layers.
    DeepseekV3,
    /// GLM-4.5/4.6: grouped-query attention with partial rotary and
    /// optional q/k norms, DeepSeek-V3's sigmoid routing, a shared expert,
    /// leading dense layers.
    Glm4Moe,
    /// Qwen3-Next (Qwen3-Next-80B-A3B): Qwen3.5's Gated DeltaNet and gated
    /// attention with the DeltaNet inputs fused per key head
    /// (`in_proj_qkvz`, `in_proj_ba`), optional dense layers.
    Qwen3Next,
    /// Llama 4 (Scout, Maverick): interleaved MoE and dense layers, a
    /// shared expert, sigmoid-scored top-k routing applied to the experts'
    /// input, chunked attention on rope layers, no-rope layers with
    /// attention temperature tuning, Llama 3 rope scaling.
    Llama4,
    /// gpt-oss (gpt-oss-20b, gpt-oss-120b): attention sinks, sliding and
    /// full attention alternating, biased projections, a clamped SwiGLU
    /// with biased experts, softmax over the chosen experts' logits.
    GptOss,
}

impl Arch {
    /// Hugging Face `model_type`.
    pub fn hf_name(self) -> &'static str {
        match self {
            Arch::Qwen3Moe => "qwen3_moe",
            Arch::Qwen2Moe => "qwen2_moe",
            Arch::Mixtral => "mixtral",
            Arch::Olmoe => "olmoe",
            Arch::Qwen35Moe => "qwen3_5_moe",
            Arch::DeepseekV3 => "deepseek_v3",
            Arch::Glm4Moe => "glm4_moe",
            Arch::Qwen3Next => "qwen3_next",
            Arch::Llama4 => "llama4_text",
            Arch::GptOss => "gpt_oss",
        }
    }

    /// Gated DeltaNet layers beside gated full attention, zero-centred
    /// RMSNorms in Hugging Face files (Qwen3.5, Qwen3-Next).
    pub fn is_hybrid(self) -> bool {
        matches!(self, Arch::Qwen35Moe | Arch::Qwen3Next)
    }
}

/// How a router's logits become the chosen experts and their weights.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Routing {
    /// Sigmoid scores with the router's selection bias and expert groups
    /// ([`sluice_core::ops::route_sigmoid`]); else softmax over all experts.
    pub sigmoid: bool,
    /// Equal groups the experts are split into (1: no grouping).
    pub n_group: usize,
    /// Groups a token may choose from.
    pub topk_group: usize,
    /// Multiplier of the routed experts' weights (`routed_scaling_factor`).
    pub scale: f32,
    /// Llama 4: top-k of the raw logits, whose sigmoids scale each chosen
    /// expert's input instead of its output.
    pub gate_input: bool,
}

impl Default for Routing {
    fn default() -> Self {
        Routing {
            sigmoid: false,
            n_group: 1,
            topk_group: 1,
            scale: 1.0,
            gate_input: false,
        }
    }
}

/// gpt-oss's SwiGLU variant: the gate clamped from above and the up
/// projection on both sides at `limit`, then `(up + 1) · gate ·
/// sigmoid(alpha · gate)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ClampedSwiglu {
    /// Slope inside the sigmoid (`swiglu_alpha`).
    pub alpha: f32,
    /// Clamp of gate and up (`swiglu_limit`).
    pub limit: f32,
}

impl ClampedSwiglu {
    /// The activation of one gate/up pair.
    #[inline]
    pub fn apply(&self, gate: f32, up: f32) -> f32 {
        let g = gate.min(self.limit);
        let u = up.clamp(-self.limit, self.limit);
        (u + 1.0) * g / (1.0 + (-self.alpha * g).exp())
    }
}

/// Llama 4's attention, layer by layer.
#[derive(Clone, Debug, PartialEq)]
pub struct Llama4Attn {
    /// Whether each layer applies rope (the others, every
    /// `no_rope_layer_interval`-th, see positions only through the mask).
    pub rope_layers: Vec<bool>,
    /// Rope layers attend within chunks of this many positions
    /// (`attention_chunk_size`).
    pub chunk: Option<usize>,
    /// No-rope layers scale queries by
    /// `ln(floor((pos + 1) / floor_scale) + 1) · scale + 1`:
    /// `(floor_scale, scale)` (`attn_temperature_tuning`).
    pub temperature: Option<(f32, f32)>,
    /// Rope layers RMS-normalize each query and key head, without a
    /// weight, after rope (`use_qk_norm`).
    pub qk_norm: bool,
}

/// Shape of multi-head latent attention (DeepSeek-V2/V3): keys and values
/// are rebuilt per head from one compressed vector per position, which is
/// all the cache keeps (with the shared rotary key).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mla {
    /// Rank of the query compression (0: a plain query projection).
    pub q_lora: usize,
    /// Rank of the key/value compression: the cached vector's length.
    pub kv_lora: usize,
    /// Per head, query/key dimensions without position.
    pub nope: usize,
    /// Per head, rotary query/key dimensions (one rotary key for all heads).
    pub rope: usize,
    /// Per head, value dimensions.
    pub v: usize,
}

/// The token mixer of a layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mixer {
    /// Softmax attention over a KV cache.
    Attention,
    /// Gated DeltaNet: a causal conv1d and a delta-rule recurrent state.
    Linear,
}

/// Shape of the Gated DeltaNet layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinearAttn {
    /// Width of the causal depthwise convolution.
    pub conv_kernel: usize,
    /// Query/key heads.
    pub k_heads: usize,
    /// Value heads (a multiple of `k_heads`).
    pub v_heads: usize,
    /// Dimension of one query/key head.
    pub k_dim: usize,
    /// Dimension of one value head.
    pub v_dim: usize,
    /// Value heads in llama.cpp's tiled order: value head `j` reads key
    /// head `j % k_heads` (GGUF files), instead of Hugging Face's grouped
    /// `j / (v_heads / k_heads)`.
    pub tiled: bool,
}

impl LinearAttn {
    /// The key head value head `j` reads.
    pub fn k_head_of(&self, j: usize) -> usize {
        if self.tiled {
            j % self.k_heads
        } else {
            j / (self.v_heads / self.k_heads)
        }
    }
}

impl LinearAttn {
    /// Channels of the convolution: queries, keys and values.
    pub fn conv_dim(&self) -> usize {
        2 * self.k_heads * self.k_dim + self.v_heads * self.v_dim
    }

    /// f32 values of one layer's state: conv history and recurrent state.
    pub fn state_len(&self) -> usize {
        self.conv_dim() * (self.conv_kernel - 1) + self.v_heads * self.k_dim * self.v_dim
    }
}

/// Everything the forward pass needs to know about a model's shape.
#[derive(Clone, Debug)]
pub struct Config {
    /// Architecture.
    pub arch: Arch,
    /// Vocabulary (rows of the embedding).
    pub vocab: usize,
    /// Model width.
    pub hidden: usize,
    /// Decoder layers.
    pub n_layers: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads.
    pub n_kv_heads: usize,
    /// Dimension of one head.
    pub head_dim: usize,
    /// Rotary embedding base.
    pub rope_theta: f32,
    /// Rotated dimensions per head.
    pub rot_dim: usize,
    /// Rotary pairing.
    pub rope_style: RopeStyle,
    /// RMSNorm epsilon.
    pub rms_eps: f32,
    /// Routed experts per MoE layer.
    pub n_experts: usize,
    /// Experts each token uses.
    pub top_k: usize,
    /// Renormalize the top-k router probabilities to sum to one.
    pub norm_topk_prob: bool,
    /// Whether each layer is an MoE layer (else a dense MLP).
    pub moe_layers: Vec<bool>,
    /// Sliding attention window of each layer.
    pub windows: Vec<Option<usize>>,
    /// OLMoE's clamp of q, k and v.
    pub clip_qkv: Option<f32>,
    /// The output projection is the embedding.
    pub tie_embeddings: bool,
    /// End-of-sequence tokens.
    pub eos: Vec<u32>,
    /// Beginning-of-sequence token.
    pub bos: Option<u32>,
    /// Trained context length, if known.
    pub max_ctx: Option<usize>,
    /// Token mixer of each layer.
    pub mixers: Vec<Mixer>,
    /// The query projection also yields a sigmoid gate on the attention
    /// output (`2 × heads × head_dim` rows, per head `[q | gate]`).
    pub attn_gate: bool,
    /// Gated DeltaNet shape, when any layer is linear.
    pub linear: Option<LinearAttn>,
    /// The router's top-k as the model file states it (`top_k` differs
    /// when `--experts-k` overrides it).
    pub config_top_k: usize,
    /// How the router chooses and weights experts.
    pub routing: Routing,
    /// Multi-head latent attention, when the model uses it (every
    /// attention layer then does).
    pub mla: Option<Mla>,
    /// YaRN scaling of the rotary frequencies.
    pub yarn: Option<Yarn>,
    /// Multiplier of q·k where it is not `1/sqrt(head_dim)`.
    pub attn_scale: Option<f32>,
    /// Multi-token-prediction layers the file holds after the decoder's;
    /// never run (they serve speculative decoding).
    pub mtp_layers: usize,
    /// Llama 3 rope scaling: per frequency, a divisor (`rot_dim / 2`).
    pub rope_factors: Option<Arc<[f32]>>,
    /// Llama 4's per-layer attention switches.
    pub llama4: Option<Llama4Attn>,
    /// gpt-oss's clamped SwiGLU in the experts (else plain SwiGLU).
    pub swiglu: Option<ClampedSwiglu>,
}

fn bad(msg: impl Into<String>) -> Error {
    Error::Model(msg.into())
}

fn get_usize(c: &serde_json::Value, k: &str) -> Option<usize> {
    c.get(k).and_then(|v| v.as_u64()).map(|v| v as usize)
}

fn need(c: &serde_json::Value, k: &str) -> Result<usize> {
    get_usize(c, k).ok_or_else(|| bad(format!("config.json: missing or invalid \"{k}\"")))
}

fn ids(v: Option<&serde_json::Value>) -> Vec<u32> {
    match v {
        Some(serde_json::Value::Number(n)) => {
            n.as_u64().map(|x| vec![x as u32]).unwrap_or_default()
        }
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64().map(|x| x as u32))
            .collect(),
        _ => vec![],
    }
}

/// The first `n_layers` entries of a GGUF per-layer array of flags, which
/// converters write as booleans or as integers.
fn layer_flags(v: &[Value], n_layers: usize) -> Vec<bool> {
    v.iter()
        .take(n_layers)
        .map(|x| x.as_bool().or(x.as_u64().map(|i| i != 0)) == Some(true))
        .collect()
}

/// A number of the packed config's object `v` (`what` names it in the
/// error).
fn packed_f32(v: &serde_json::Value, what: &str, k: &str) -> Result<f32> {
    v.get(k)
        .and_then(|x| x.as_f64())
        .map(|x| x as f32)
        .ok_or_else(|| bad(format!("packed config: {what} without \"{k}\"")))
}

/// Most layers a config may state.
const MAX_LAYERS: usize = 4096;

/// The layer count, refused before any per-layer table is built from it.
fn layer_count(n: usize) -> Result<usize> {
    if n == 0 || n > MAX_LAYERS {
        return Err(bad(format!(
            "layer count {n} is out of range (1..={MAX_LAYERS})"
        )));
    }
    Ok(n)
}

/// Sanity bounds so that a hostile config cannot make us allocate
/// absurd buffers before any tensor is checked against it.
fn check(cfg: &Config) -> Result<()> {
    let limits = [
        ("hidden size", cfg.hidden, 1 << 17),
        ("layer count", cfg.n_layers, MAX_LAYERS),
        ("head count", cfg.n_heads, 4096),
        ("head dim", cfg.head_dim, 4096),
        ("vocabulary", cfg.vocab, 1 << 24),
        ("expert count", cfg.n_experts, 1 << 16),
    ];
    for (what, v, max) in limits {
        if v == 0 || v > max {
            return Err(bad(format!("{what} {v} is out of range (1..={max})")));
        }
    }
    if cfg.n_kv_heads == 0 || !cfg.n_heads.is_multiple_of(cfg.n_kv_heads) {
        return Err(bad(format!(
            "{} query heads are not a multiple of {} key/value heads",
            cfg.n_heads, cfg.n_kv_heads
        )));
    }
    if cfg.moe_layers.iter().any(|&m| m) && (cfg.top_k == 0 || cfg.top_k > cfg.n_experts) {
        return Err(bad(format!(
            "top-k {} is not in 1..={} experts",
            cfg.top_k, cfg.n_experts
        )));
    }
    if cfg.mixers.len() != cfg.n_layers {
        return Err(bad(format!(
            "{} layer types for {} layers",
            cfg.mixers.len(),
            cfg.n_layers
        )));
    }
    if cfg.mixers.contains(&Mixer::Linear) {
        let Some(l) = cfg.linear else {
            return Err(bad("linear-attention layers without their dimensions"));
        };
        for (what, v) in [
            ("linear conv kernel", l.conv_kernel),
            ("linear key heads", l.k_heads),
            ("linear value heads", l.v_heads),
            ("linear key head dim", l.k_dim),
            ("linear value head dim", l.v_dim),
        ] {
            if v == 0 || v > 4096 {
                return Err(bad(format!("{what} {v} is out of range (1..=4096)")));
            }
        }
        if l.conv_kernel < 2 || l.v_heads % l.k_heads != 0 {
            return Err(bad(format!(
                "linear attention: conv kernel {} (needs >= 2), {} value heads for {} key heads (needs a multiple)",
                l.conv_kernel, l.v_heads, l.k_heads
            )));
        }
    }
    if let Some(m) = cfg.mla {
        for (what, v) in [
            ("latent key/value rank", m.kv_lora),
            ("latent rotary dim", m.rope),
            ("latent value head dim", m.v),
        ] {
            if v == 0 || v > 1 << 16 {
                return Err(bad(format!("{what} {v} is out of range (1..=65536)")));
            }
        }
        if m.q_lora > 1 << 16 || m.nope > 1 << 16 || m.nope + m.rope != cfg.head_dim {
            return Err(bad(format!(
                "latent attention: query rank {}, head dims {} + {} do not fit head dim {}",
                m.q_lora, m.nope, m.rope, cfg.head_dim
            )));
        }
    }
    let r = cfg.routing;
    if r.sigmoid
        && (r.n_group == 0
            || r.topk_group == 0
            || r.topk_group > r.n_group
            || !cfg.n_experts.is_multiple_of(r.n_group)
            || !r.scale.is_finite())
    {
        return Err(bad(format!(
            "router groups: {} of {} groups over {} experts (needs 1 <= chosen <= groups, groups dividing the experts), scaling {}",
            r.topk_group, r.n_group, cfg.n_experts, r.scale
        )));
    }
    if let Some(y) = cfg.yarn {
        if !(y.factor.is_finite() && y.factor > 0.0 && y.orig_ctx > 0 && y.attn_factor.is_finite())
        {
            return Err(bad(format!(
                "YaRN scaling out of range: factor {}, original context {}, beta_fast {}, beta_slow {}, attention factor {}",
                y.factor, y.orig_ctx, y.beta_fast, y.beta_slow, y.attn_factor
            )));
        }
    }
    if let Some(a) = cfg.swiglu {
        if !(a.alpha.is_finite() && a.limit.is_finite() && a.limit > 0.0) {
            return Err(bad(format!(
                "clamped SwiGLU: alpha {}, limit {} (needs finite values and a positive limit)",
                a.alpha, a.limit
            )));
        }
    }
    if cfg.rot_dim == 0 || cfg.rot_dim > cfg.head_dim || !cfg.rot_dim.is_multiple_of(2) {
        return Err(bad(format!(
            "rotary dimension {} does not fit head dim {}",
            cfg.rot_dim, cfg.head_dim
        )));
    }
    Ok(())
}

/// YaRN scaling from `rope_scaling` (transformers 4) or `rope_parameters`
/// (transformers 5), with its `mscale_all_dim`; other scaling types are
/// refused rather than run unscaled.
fn yarn_hf(c: &serde_json::Value) -> Result<(Option<Yarn>, Option<f32>)> {
    let Some(r) = ["rope_scaling", "rope_parameters"]
        .iter()
        .filter_map(|k| c.get(*k))
        .find(|r| r.is_object())
    else {
        return Ok((None, None));
    };
    let kind = r
        .get("rope_type")
        .or_else(|| r.get("type"))
        .and_then(|v| v.as_str())
        .unwrap_or("default");
    match kind {
        // Llama 3's scaling is read by `llama3_hf`.
        "default" | "llama3" => return Ok((None, None)),
        "yarn" => {}
        other => return Err(Error::Unsupported(format!("rope_type \"{other}\""))),
    }
    let f = |k: &str| r.get(k).and_then(|v| v.as_f64()).map(|v| v as f32);
    let max_ctx = get_usize(c, "max_position_embeddings");
    let orig_ctx = get_usize(r, "original_max_position_embeddings")
        .or(max_ctx)
        .filter(|&n| n > 0)
        .ok_or_else(|| bad("config.json: YaRN without original_max_position_embeddings"))?;
    // Without a factor, the extension is the ratio of the two lengths.
    let factor = f("factor")
        .or_else(|| max_ctx.map(|m| m as f32 / orig_ctx as f32))
        .ok_or_else(|| bad("config.json: YaRN without \"factor\""))?;
    let (mscale, mscale_all) = (f("mscale"), f("mscale_all_dim"));
    let attn_factor = match (f("attention_factor"), mscale, mscale_all) {
        (Some(a), _, _) => a,
        (None, Some(m), Some(a)) if m != 0.0 && a != 0.0 => {
            Yarn::mscale(factor, m) / Yarn::mscale(factor, a)
        }
        _ => Yarn::mscale(factor, 1.0),
    };
    let yarn = Yarn {
        factor,
        orig_ctx,
        beta_fast: f("beta_fast").unwrap_or(32.0),
        beta_slow: f("beta_slow").unwrap_or(1.0),
        attn_factor,
        truncate: r.get("truncate").and_then(|v| v.as_bool()).unwrap_or(true),
    };
    Ok((Some(yarn), mscale_all))
}

/// The rope parameters of a `config.json` (either spelling).
fn rope_params(c: &serde_json::Value) -> Option<&serde_json::Value> {
    ["rope_scaling", "rope_parameters"]
        .iter()
        .filter_map(|k| c.get(*k))
        .find(|r| r.is_object())
}

/// Llama 3's rope scaling (`rope_type` "llama3") as a divisor per
/// frequency, in transformers' wavelength bands: frequencies whose
/// wavelength is under `original_max_position_embeddings /
/// high_freq_factor` are kept, those over `... / low_freq_factor` divided
/// by `factor`, those between blended.
fn llama3_hf(c: &serde_json::Value, theta: f32, rot_dim: usize) -> Result<Option<Arc<[f32]>>> {
    let Some(r) = rope_params(c) else {
        return Ok(None);
    };
    let kind = r
        .get("rope_type")
        .or_else(|| r.get("type"))
        .and_then(|v| v.as_str());
    if kind != Some("llama3") {
        return Ok(None);
    }
    let f = |k: &str| {
        r.get(k)
            .and_then(|v| v.as_f64())
            .ok_or_else(|| bad(format!("config.json: llama3 rope scaling without \"{k}\"")))
    };
    let (factor, low, high) = (f("factor")?, f("low_freq_factor")?, f("high_freq_factor")?);
    let orig = f("original_max_position_embeddings")?;
    if !(factor > 0.0 && low > 0.0 && high > low && orig > 0.0) {
        return Err(bad(format!(
            "config.json: llama3 rope scaling with factor {factor}, low_freq_factor {low}, high_freq_factor {high}, original_max_position_embeddings {orig} (needs positive values and high > low)"
        )));
    }
    Ok(Some(llama3_factors(
        theta, rot_dim, factor, low, high, orig,
    )))
}

/// Llama 3's rope scaling as one divisor per rotated pair: frequencies
/// whose wavelength is under `orig / high` are kept, those over
/// `orig / low` divided by `factor`, those between blended (the bands
/// transformers and llama.cpp's converter use). Needs `high > low > 0`.
pub fn llama3_factors(
    theta: f32,
    rot_dim: usize,
    factor: f64,
    low: f64,
    high: f64,
    orig: f64,
) -> Arc<[f32]> {
    let (low_wl, high_wl) = (orig / low, orig / high);
    (0..rot_dim / 2)
        .map(|i| {
            let inv = 1.0 / (theta as f64).powf((2 * i) as f64 / rot_dim as f64);
            let wl = 2.0 * std::f64::consts::PI / inv;
            if wl < high_wl {
                1.0
            } else if wl > low_wl {
                factor as f32
            } else {
                let smooth = (orig / wl - low) / (high - low);
                (1.0 / ((1.0 - smooth) / factor + smooth)) as f32
            }
        })
        .collect()
}

/// Llama 4's attention switches from its `config.json`, with transformers'
/// defaults: a no-rope layer every `no_rope_layer_interval` (4), chunks of
/// `attention_chunk_size` (8192) on the rope layers, temperature tuning
/// with `floor_scale` 8192 and `attn_scale` 0.1, q/k norm.
fn llama4_hf(c: &serde_json::Value, n_layers: usize) -> Result<Llama4Attn> {
    let listed = ids(c.get("no_rope_layers"));
    let rope_layers: Vec<bool> = if listed.is_empty() {
        let every = get_usize(c, "no_rope_layer_interval").unwrap_or(4).max(1);
        (0..n_layers).map(|i| (i + 1) % every != 0).collect()
    } else if listed.len() == n_layers {
        listed.iter().map(|&v| v != 0).collect()
    } else {
        return Err(bad(format!(
            "config.json: {} no_rope_layers for {n_layers} layers",
            listed.len()
        )));
    };
    let chunk = match c.get("attention_chunk_size") {
        Some(v) if v.is_null() => None,
        Some(v) => Some(
            v.as_u64()
                .filter(|&n| n > 0)
                .ok_or_else(|| bad("config.json: attention_chunk_size is not a positive integer"))?
                as usize,
        ),
        None => Some(8192),
    };
    // transformers masks by `layer_types` where given: chunked layers are
    // those it names so.
    if let Some(t) = c.get("layer_types").and_then(|v| v.as_array()) {
        let chunked: Vec<bool> = t
            .iter()
            .map(|x| x.as_str() == Some("chunked_attention"))
            .collect();
        if chunked.len() != n_layers || chunked != rope_layers && chunk.is_some() {
            return Err(bad(
                "config.json: layer_types does not chunk exactly the rope layers (no_rope_layers), as Llama 4 does",
            ));
        }
    }
    let tuning = match c.get("attn_temperature_tuning") {
        Some(serde_json::Value::Bool(b)) => *b,
        // Meta's own configs wrote a number here (truthy when non-zero).
        Some(v) => v.as_f64().is_some_and(|x| x != 0.0),
        None => true,
    };
    let num = |k: &str, d: f64| c.get(k).and_then(|v| v.as_f64()).unwrap_or(d) as f32;
    let floor = num("floor_scale", 8192.0);
    if tuning && floor <= 0.0 {
        return Err(bad(format!("config.json: floor_scale {floor} (needs > 0)")));
    }
    Ok(Llama4Attn {
        rope_layers,
        chunk,
        temperature: tuning.then_some((floor, num("attn_scale", 0.1))),
        qk_norm: c
            .get("use_qk_norm")
            .and_then(|v| v.as_bool())
            .unwrap_or(true),
    })
}

/// GGUF metadata key under which packed files store [`Config::to_json`].
pub const PACKED_CONFIG_KEY: &str = "sluice.config";

impl Config {
    /// The normalized configuration as JSON (stored in packed files).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "arch": self.arch.hf_name(),
            "vocab": self.vocab,
            "hidden": self.hidden,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "rope_theta": self.rope_theta,
            "rot_dim": self.rot_dim,
            "rope_style": match self.rope_style {
                RopeStyle::Neox => "neox",
                RopeStyle::Interleaved => "interleaved",
            },
            "rms_eps": self.rms_eps,
            "n_experts": self.n_experts,
            "top_k": self.top_k,
            "norm_topk_prob": self.norm_topk_prob,
            "moe_layers": self.moe_layers,
            "windows": self.windows,
            "clip_qkv": self.clip_qkv,
            "tie_embeddings": self.tie_embeddings,
            "eos": self.eos,
            "bos": self.bos,
            "max_ctx": self.max_ctx,
            "mixers": self.mixers.iter().map(|m| match m {
                Mixer::Attention => "attention",
                Mixer::Linear => "linear",
            }).collect::<Vec<_>>(),
            "attn_gate": self.attn_gate,
            "linear": self.linear.map(|l| serde_json::json!({
                "conv_kernel": l.conv_kernel,
                "k_heads": l.k_heads,
                "v_heads": l.v_heads,
                "k_dim": l.k_dim,
                "v_dim": l.v_dim,
                "tiled": l.tiled,
            })),
            "config_top_k": self.config_top_k,
            "routing": serde_json::json!({
                "sigmoid": self.routing.sigmoid,
                "n_group": self.routing.n_group,
                "topk_group": self.routing.topk_group,
                "scale": self.routing.scale,
                "gate_input": self.routing.gate_input,
            }),
            "mla": self.mla.map(|m| serde_json::json!({
                "q_lora": m.q_lora,
                "kv_lora": m.kv_lora,
                "nope": m.nope,
                "rope": m.rope,
                "v": m.v,
            })),
            "yarn": self.yarn.map(|y| serde_json::json!({
                "factor": y.factor,
                "orig_ctx": y.orig_ctx,
                "beta_fast": y.beta_fast,
                "beta_slow": y.beta_slow,
                "attn_factor": y.attn_factor,
                "truncate": y.truncate,
            })),
            "attn_scale": self.attn_scale,
            "mtp_layers": self.mtp_layers,
            "rope_factors": self.rope_factors.as_deref(),
            "llama4": self.llama4.as_ref().map(|l| serde_json::json!({
                "rope_layers": l.rope_layers,
                "chunk": l.chunk,
                "temperature": l.temperature.map(|(f, s)| [f, s]),
                "qk_norm": l.qk_norm,
            })),
            "swiglu": self.swiglu.map(|a| serde_json::json!({
                "alpha": a.alpha,
                "limit": a.limit,
            })),
        })
    }

    /// Inverse of [`to_json`](Self::to_json); checked like any config.
    pub fn from_json(v: &serde_json::Value) -> Result<Config> {
        let n = |k: &str| need(v, k);
        let f = |k: &str| {
            v.get(k)
                .and_then(|x| x.as_f64())
                .map(|x| x as f32)
                .ok_or_else(|| bad(format!("packed config: missing or invalid \"{k}\"")))
        };
        let b = |k: &str| v.get(k).and_then(|x| x.as_bool()).unwrap_or(false);
        let arch = match v.get("arch").and_then(|x| x.as_str()) {
            Some("qwen3_moe") => Arch::Qwen3Moe,
            Some("qwen2_moe") => Arch::Qwen2Moe,
            Some("mixtral") => Arch::Mixtral,
            Some("olmoe") => Arch::Olmoe,
            Some("qwen3_5_moe") => Arch::Qwen35Moe,
            Some("deepseek_v3") => Arch::DeepseekV3,
            Some("glm4_moe") => Arch::Glm4Moe,
            Some("qwen3_next") => Arch::Qwen3Next,
            Some("llama4_text") => Arch::Llama4,
            Some("gpt_oss") => Arch::GptOss,
            other => return Err(bad(format!("packed config: unknown arch {other:?}"))),
        };
        let n_layers = layer_count(n("n_layers")?)?;
        let list = |k: &str| -> Result<Vec<serde_json::Value>> {
            let a = v
                .get(k)
                .and_then(|x| x.as_array())
                .ok_or_else(|| bad(format!("packed config: missing \"{k}\"")))?;
            if a.len() != n_layers {
                return Err(bad(format!(
                    "packed config: \"{k}\" has {} entries for {n_layers} layers",
                    a.len()
                )));
            }
            Ok(a.clone())
        };
        let cfg = Config {
            arch,
            vocab: n("vocab")?,
            hidden: n("hidden")?,
            n_layers,
            n_heads: n("n_heads")?,
            n_kv_heads: n("n_kv_heads")?,
            head_dim: n("head_dim")?,
            rope_theta: f("rope_theta")?,
            rot_dim: n("rot_dim")?,
            rope_style: match v.get("rope_style").and_then(|x| x.as_str()) {
                Some("interleaved") => RopeStyle::Interleaved,
                _ => RopeStyle::Neox,
            },
            rms_eps: f("rms_eps")?,
            n_experts: n("n_experts")?,
            top_k: n("top_k")?,
            norm_topk_prob: b("norm_topk_prob"),
            moe_layers: list("moe_layers")?
                .iter()
                .map(|x| x.as_bool().unwrap_or(false))
                .collect(),
            windows: list("windows")?
                .iter()
                .map(|x| x.as_u64().map(|w| w as usize))
                .collect(),
            clip_qkv: v.get("clip_qkv").and_then(|x| x.as_f64()).map(|x| x as f32),
            tie_embeddings: b("tie_embeddings"),
            eos: ids(v.get("eos")),
            bos: v.get("bos").and_then(|x| x.as_u64()).map(|x| x as u32),
            max_ctx: get_usize(v, "max_ctx"),
            mixers: match v.get("mixers") {
                // Files packed before linear attention existed.
                None => vec![Mixer::Attention; n_layers],
                Some(_) => list("mixers")?
                    .iter()
                    .map(|x| match x.as_str() {
                        Some("attention") => Ok(Mixer::Attention),
                        Some("linear") => Ok(Mixer::Linear),
                        other => Err(bad(format!("packed config: unknown mixer {other:?}"))),
                    })
                    .collect::<Result<Vec<_>>>()?,
            },
            attn_gate: b("attn_gate"),
            linear: match v.get("linear") {
                Some(l) if !l.is_null() => Some(LinearAttn {
                    conv_kernel: need(l, "conv_kernel")?,
                    k_heads: need(l, "k_heads")?,
                    v_heads: need(l, "v_heads")?,
                    k_dim: need(l, "k_dim")?,
                    v_dim: need(l, "v_dim")?,
                    tiled: l.get("tiled").and_then(|x| x.as_bool()).unwrap_or(false),
                }),
                _ => None,
            },
            config_top_k: get_usize(v, "config_top_k").unwrap_or(0),
            // Files packed before these existed are softmax-routed, plain
            // attention, unscaled rope.
            routing: match v.get("routing") {
                Some(r) if !r.is_null() => Routing {
                    sigmoid: r.get("sigmoid").and_then(|x| x.as_bool()).unwrap_or(false),
                    n_group: need(r, "n_group")?,
                    topk_group: need(r, "topk_group")?,
                    scale: r
                        .get("scale")
                        .and_then(|x| x.as_f64())
                        .ok_or_else(|| bad("packed config: routing without \"scale\""))?
                        as f32,
                    gate_input: r
                        .get("gate_input")
                        .and_then(|x| x.as_bool())
                        .unwrap_or(false),
                },
                _ => Routing::default(),
            },
            mla: match v.get("mla") {
                Some(m) if !m.is_null() => Some(Mla {
                    q_lora: need(m, "q_lora")?,
                    kv_lora: need(m, "kv_lora")?,
                    nope: need(m, "nope")?,
                    rope: need(m, "rope")?,
                    v: need(m, "v")?,
                }),
                _ => None,
            },
            yarn: match v.get("yarn") {
                Some(y) if !y.is_null() => {
                    let g = |k: &str| packed_f32(y, "yarn", k);
                    Some(Yarn {
                        factor: g("factor")?,
                        orig_ctx: need(y, "orig_ctx")?,
                        beta_fast: g("beta_fast")?,
                        beta_slow: g("beta_slow")?,
                        attn_factor: g("attn_factor")?,
                        truncate: y.get("truncate").and_then(|x| x.as_bool()).unwrap_or(true),
                    })
                }
                _ => None,
            },
            attn_scale: v
                .get("attn_scale")
                .and_then(|x| x.as_f64())
                .map(|x| x as f32),
            mtp_layers: get_usize(v, "mtp_layers").unwrap_or(0),
            rope_factors: match v.get("rope_factors").and_then(|x| x.as_array()) {
                Some(a) => Some(
                    a.iter()
                        .map(|x| x.as_f64().map(|f| f as f32))
                        .collect::<Option<Vec<f32>>>()
                        .ok_or_else(|| bad("packed config: invalid \"rope_factors\""))?
                        .into(),
                ),
                None => None,
            },
            llama4: match v.get("llama4") {
                Some(l) if !l.is_null() => Some(Llama4Attn {
                    rope_layers: l
                        .get("rope_layers")
                        .and_then(|x| x.as_array())
                        .filter(|a| a.len() == n_layers)
                        .and_then(|a| a.iter().map(|x| x.as_bool()).collect())
                        .ok_or_else(|| {
                            bad("packed config: llama4 without one rope flag per layer")
                        })?,
                    chunk: get_usize(l, "chunk"),
                    temperature: l.get("temperature").and_then(|t| {
                        Some((t.get(0)?.as_f64()? as f32, t.get(1)?.as_f64()? as f32))
                    }),
                    qk_norm: l.get("qk_norm").and_then(|x| x.as_bool()).unwrap_or(false),
                }),
                _ => None,
            },
            swiglu: match v.get("swiglu") {
                Some(a) if !a.is_null() => Some(ClampedSwiglu {
                    alpha: packed_f32(a, "swiglu", "alpha")?,
                    limit: packed_f32(a, "swiglu", "limit")?,
                }),
                _ => None,
            },
        };
        let mut cfg = cfg;
        if cfg.config_top_k == 0 {
            cfg.config_top_k = cfg.top_k;
        }
        check(&cfg)?;
        Ok(cfg)
    }

    /// Reads the configuration of an opened model.
    pub fn from_files(files: &ModelFiles) -> Result<Config> {
        let cfg = if let Some(c) = files.hf_config() {
            let mut cfg = Config::from_hf(c)?;
            // generation_config.json may list more end-of-turn tokens.
            let gen = files.path.join("generation_config.json");
            if let Some(g) = std::fs::read_to_string(gen)
                .ok()
                .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
            {
                for id in ids(g.get("eos_token_id")) {
                    if !cfg.eos.contains(&id) {
                        cfg.eos.push(id);
                    }
                }
            }
            cfg
        } else if let Some(g) = files.gguf() {
            match g.get(PACKED_CONFIG_KEY).and_then(Value::as_str) {
                // A packed file carries the normalized config verbatim.
                Some(j) => {
                    let v: serde_json::Value = serde_json::from_str(j)
                        .map_err(|e| bad(format!("{PACKED_CONFIG_KEY}: {e}")))?;
                    Config::from_json(&v)?
                }
                None => Config::from_gguf(g, files)?,
            }
        } else {
            unreachable!("a container is safetensors or GGUF")
        };
        check(&cfg)?;
        Ok(cfg)
    }

    /// From a Hugging Face `config.json`.
    pub fn from_hf(c: &serde_json::Value) -> Result<Config> {
        // Multimodal checkpoints nest the language model's config.
        let c = c.get("text_config").unwrap_or(c);
        let mt = c
            .get("model_type")
            .and_then(|v| v.as_str())
            .ok_or_else(|| bad("config.json: no \"model_type\""))?;
        let arch = match mt {
            "qwen3_moe" => Arch::Qwen3Moe,
            "qwen2_moe" => Arch::Qwen2Moe,
            "mixtral" => Arch::Mixtral,
            "olmoe" => Arch::Olmoe,
            "qwen3_5_moe" | "qwen3_5_moe_text" => Arch::Qwen35Moe,
            // Kimi K2 ships DeepSeek-V3's architecture under its own name.
            "deepseek_v3" | "kimi_k2" => Arch::DeepseekV3,
            "glm4_moe" => Arch::Glm4Moe,
            "qwen3_next" => Arch::Qwen3Next,
            // A multimodal Llama 4's text model is read from `text_config`.
            "llama4_text" | "llama4" => Arch::Llama4,
            "gpt_oss" => Arch::GptOss,
            other => {
                return Err(Error::Unsupported(format!(
                    "architecture \"{other}\" (supported: qwen3_moe, qwen2_moe, mixtral, olmoe, qwen3_5_moe, qwen3_next, deepseek_v3, kimi_k2, glm4_moe, llama4, gpt_oss)"
                )))
            }
        };
        let ds = arch == Arch::DeepseekV3;
        // DeepSeek's router and leading dense layers, GLM's as well.
        let glm = arch == Arch::Glm4Moe;
        let hidden = need(c, "hidden_size")?;
        let n_layers = layer_count(need(c, "num_hidden_layers")?)?;
        let n_heads = need(c, "num_attention_heads")?;
        // transformers' defaults where a DeepSeek config leaves a field out.
        let ds_num = |k: &str, default: usize| get_usize(c, k).unwrap_or(default);
        let mla = ds.then(|| Mla {
            q_lora: ds_num("q_lora_rank", 0),
            kv_lora: ds_num("kv_lora_rank", 512),
            nope: ds_num("qk_nope_head_dim", 128),
            rope: ds_num("qk_rope_head_dim", 64),
            v: ds_num("v_head_dim", 128),
        });
        let n_kv_heads = match mla {
            // Every head has its own keys, rebuilt from the shared latent.
            Some(_) => n_heads,
            None => get_usize(c, "num_key_value_heads").unwrap_or(n_heads),
        };
        let head_dim = match mla {
            Some(m) => m.nope + m.rope,
            None => get_usize(c, "head_dim").unwrap_or(hidden / n_heads.max(1)),
        };
        let rope = c.get("rope_parameters");
        let rope_theta = c
            .get("rope_theta")
            .or_else(|| rope.and_then(|r| r.get("rope_theta")))
            .and_then(|v| v.as_f64())
            .unwrap_or(10000.0) as f32;
        let partial = c
            .get("partial_rotary_factor")
            .and_then(|v| v.as_f64())
            .or_else(|| {
                rope.and_then(|r| r.get("partial_rotary_factor"))
                    .and_then(|v| v.as_f64())
            })
            // transformers' GLM-4.5 config rotates half of each head unless
            // told, its Qwen3-Next config a quarter.
            .unwrap_or(match arch {
                Arch::Glm4Moe => 0.5,
                Arch::Qwen3Next => 0.25,
                _ => 1.0,
            });
        let (yarn, yarn_mscale_all) = yarn_hf(c)?;
        // transformers 5 writes `num_local_experts` for every MoE family;
        // hub checkpoints of the Qwen and OLMoE families say `num_experts`.
        let n_experts = get_usize(c, "num_local_experts")
            .or_else(|| get_usize(c, "num_experts"))
            .or_else(|| get_usize(c, "n_routed_experts"))
            .ok_or_else(|| {
                bad("config.json: missing \"num_experts\" / \"num_local_experts\" / \"n_routed_experts\"")
            })?;
        let top_k = need(c, "num_experts_per_tok")?;
        let norm_topk_prob = match arch {
            // Both always renormalize the top-k probabilities; gpt-oss
            // takes the softmax of the chosen logits, which is the same.
            Arch::Mixtral | Arch::Qwen35Moe | Arch::GptOss => true,
            _ => c
                .get("norm_topk_prob")
                .and_then(|v| v.as_bool())
                .unwrap_or(ds || glm || arch == Arch::Qwen3Next),
        };
        let (step, mlp_only) = match arch {
            Arch::Qwen3Moe | Arch::Qwen2Moe | Arch::Qwen3Next => (
                get_usize(c, "decoder_sparse_step").unwrap_or(1).max(1),
                ids(c.get("mlp_only_layers")),
            ),
            _ => (1, vec![]),
        };
        let l4 = arch == Arch::Llama4;
        let moe_layers = if l4 {
            // `moe_layers`, else every `interleave_moe_layer_step`-th.
            let step = get_usize(c, "interleave_moe_layer_step")
                .unwrap_or(1)
                .max(1);
            match c.get("moe_layers").and_then(|v| v.as_array()) {
                Some(_) => {
                    let moe = ids(c.get("moe_layers"));
                    (0..n_layers)
                        .map(|i| n_experts > 0 && moe.contains(&(i as u32)))
                        .collect()
                }
                None => (0..n_layers)
                    .map(|i| n_experts > 0 && (i + 1) % step == 0)
                    .collect(),
            }
        } else if ds || glm {
            // The first `first_k_dense_replace` layers are dense, then every
            // `moe_layer_freq`-th (DeepSeek's own rule; 1 in every release).
            let (first, freq) = (
                ds_num("first_k_dense_replace", if glm { 1 } else { 3 }),
                ds_num("moe_layer_freq", 1).max(1),
            );
            (0..n_layers)
                .map(|i| n_experts > 0 && i >= first && i % freq == 0)
                .collect()
        } else {
            (0..n_layers)
                .map(|i| !mlp_only.contains(&(i as u32)) && n_experts > 0 && (i + 1) % step == 0)
                .collect()
        };
        let window = c
            .get("sliding_window")
            .and_then(|v| v.as_u64())
            .filter(|&w| w > 0)
            .map(|w| w as usize);
        let oss = arch == Arch::GptOss;
        let use_sw = c
            .get("use_sliding_window")
            .and_then(|v| v.as_bool())
            .unwrap_or(arch == Arch::Mixtral || oss);
        let layer_types: Option<Vec<String>> = c.get("layer_types").and_then(|v| {
            v.as_array().map(|a| {
                a.iter()
                    .map(|x| x.as_str().unwrap_or("").to_string())
                    .collect()
            })
        });
        let windows = (0..n_layers)
            .map(|i| {
                let sliding = match &layer_types {
                    Some(t) => t.get(i).is_some_and(|s| s == "sliding_attention"),
                    // gpt-oss alternates, sliding first.
                    None if oss => i % 2 == 0,
                    None => arch != Arch::Olmoe,
                };
                window.filter(|_| use_sw && sliding)
            })
            .collect();
        let mut rot_dim = match mla {
            Some(m) => m.rope,
            None => ((head_dim as f64) * partial) as usize,
        };
        rot_dim -= rot_dim % 2;
        let routing = if l4 {
            Routing {
                gate_input: true,
                ..Routing::default()
            }
        } else if ds || glm {
            if let Some(f) = c
                .get("scoring_func")
                .and_then(|v| v.as_str())
                .filter(|f| *f != "sigmoid")
            {
                return Err(Error::Unsupported(format!("scoring_func \"{f}\"")));
            }
            Routing {
                sigmoid: true,
                n_group: ds_num("n_group", if glm { 1 } else { 8 }),
                topk_group: ds_num("topk_group", if glm { 1 } else { 4 }),
                scale: c
                    .get("routed_scaling_factor")
                    .and_then(|v| v.as_f64())
                    .unwrap_or(if glm { 1.0 } else { 2.5 }) as f32,
                gate_input: false,
            }
        } else {
            Routing::default()
        };
        // DeepSeek scales q·k by YaRN's mscale for `mscale_all_dim`, squared.
        let attn_scale = match (ds, yarn, yarn_mscale_all) {
            (true, Some(y), Some(m)) if m != 0.0 => Some(y.qk_scale(m, head_dim)),
            _ => None,
        };
        let (mixers, linear) = if arch.is_hybrid() {
            let mixers = match &layer_types {
                Some(t) => {
                    if t.len() != n_layers {
                        return Err(bad(format!(
                            "config.json: {} layer_types for {n_layers} layers",
                            t.len()
                        )));
                    }
                    t.iter()
                        .map(|s| match s.as_str() {
                            "linear_attention" => Ok(Mixer::Linear),
                            "full_attention" => Ok(Mixer::Attention),
                            other => Err(Error::Unsupported(format!("layer type \"{other}\""))),
                        })
                        .collect::<Result<Vec<_>>>()?
                }
                None => {
                    let every = get_usize(c, "full_attention_interval").unwrap_or(4).max(1);
                    (0..n_layers)
                        .map(|i| {
                            if (i + 1) % every == 0 {
                                Mixer::Attention
                            } else {
                                Mixer::Linear
                            }
                        })
                        .collect()
                }
            };
            let linear = LinearAttn {
                conv_kernel: get_usize(c, "linear_conv_kernel_dim").unwrap_or(4),
                k_heads: get_usize(c, "linear_num_key_heads").unwrap_or(16),
                v_heads: get_usize(c, "linear_num_value_heads").unwrap_or(32),
                k_dim: get_usize(c, "linear_key_head_dim").unwrap_or(128),
                v_dim: get_usize(c, "linear_value_head_dim").unwrap_or(128),
                tiled: false,
            };
            (mixers, Some(linear))
        } else {
            (vec![Mixer::Attention; n_layers], None)
        };
        Ok(Config {
            arch,
            vocab: need(c, "vocab_size")?,
            hidden,
            n_layers,
            n_heads,
            n_kv_heads,
            head_dim,
            rope_theta,
            rot_dim,
            // DeepSeek's rotary dims pair neighbours (`rope_interleave`),
            // Llama 4's too (complex multiplication of pairs).
            rope_style: if l4
                || ds
                    && c.get("rope_interleave")
                        .and_then(|v| v.as_bool())
                        .unwrap_or(true)
            {
                RopeStyle::Interleaved
            } else {
                RopeStyle::Neox
            },
            rms_eps: c
                .get("rms_norm_eps")
                .and_then(|v| v.as_f64())
                .unwrap_or(1e-6) as f32,
            n_experts,
            top_k,
            norm_topk_prob,
            moe_layers,
            windows,
            clip_qkv: c.get("clip_qkv").and_then(|v| v.as_f64()).map(|v| v as f32),
            tie_embeddings: c
                .get("tie_word_embeddings")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
            eos: ids(c.get("eos_token_id")),
            bos: ids(c.get("bos_token_id")).first().copied(),
            max_ctx: get_usize(c, "max_position_embeddings"),
            mixers,
            attn_gate: arch.is_hybrid(),
            linear,
            config_top_k: top_k,
            routing,
            mla,
            yarn,
            attn_scale,
            mtp_layers: get_usize(c, "num_nextn_predict_layers").unwrap_or(0),
            rope_factors: llama3_hf(c, rope_theta, rot_dim)?,
            llama4: if l4 {
                Some(llama4_hf(c, n_layers)?)
            } else {
                None
            },
            swiglu: oss.then(|| ClampedSwiglu {
                alpha: c
                    .get("swiglu_alpha")
                    .and_then(|v| v.as_f64())
                    .unwrap_or(1.702) as f32,
                limit: c
                    .get("swiglu_limit")
                    .and_then(|v| v.as_f64())
                    .unwrap_or(7.0) as f32,
            }),
        })
    }

    /// From GGUF metadata (hyper-parameters under `<arch>.*`).
    pub fn from_gguf(g: &Gguf, files: &ModelFiles) -> Result<Config> {
        let a = g
            .architecture()
            .ok_or_else(|| bad("GGUF: no general.architecture"))?
            .to_string();
        let num = |k: &str| {
            g.get(&format!("{a}.{k}"))
                .and_then(Value::as_u64)
                .map(|v| v as usize)
        };
        let req = |k: &str| num(k).ok_or_else(|| bad(format!("GGUF: missing {a}.{k}")));
        let n_experts = num("expert_count").unwrap_or(0);
        let arch = match a.as_str() {
            "qwen3moe" => Arch::Qwen3Moe,
            "qwen2moe" => Arch::Qwen2Moe,
            "olmoe" => Arch::Olmoe,
            "llama" if n_experts > 0 => Arch::Mixtral,
            "qwen35moe" => Arch::Qwen35Moe,
            // DeepSeek-V3, R1 and Kimi K2 as llama.cpp's converter writes them.
            "deepseek2" => Arch::DeepseekV3,
            "glm4moe" => Arch::Glm4Moe,
            "qwen3next" => Arch::Qwen3Next,
            "llama4" => Arch::Llama4,
            "gpt-oss" => Arch::GptOss,
            other => {
                return Err(Error::Unsupported(format!(
                    "GGUF architecture \"{other}\"{} (supported: qwen3moe, qwen2moe, olmoe, qwen35moe, qwen3next, deepseek2, glm4moe, llama4, gpt-oss, llama with experts)",
                    if other == "llama" { " without experts" } else { "" }
                )))
            }
        };
        let hidden = req("embedding_length")?;
        // llama.cpp counts multi-token-prediction blocks as layers too; they
        // come last and the forward pass does not use them.
        let n_layers = req("block_count")?
            .checked_sub(num("nextn_predict_layers").unwrap_or(0))
            .filter(|&n| n > 0)
            .ok_or_else(|| bad("GGUF: nextn_predict_layers leaves no layers"))?;
        let n_layers = layer_count(n_layers)?;
        let n_heads = req("attention.head_count")?;
        let flt = |k: &str| g.get(&format!("{a}.{k}")).and_then(Value::as_f64);
        let ds = arch == Arch::DeepseekV3;
        let mla = if ds {
            Some(Self::mla_gguf(&num)?)
        } else {
            None
        };
        let (n_kv_heads, head_dim) = match mla {
            // llama.cpp stores MLA as one KV head of `kv_lora + rope`; each
            // query head's keys are rebuilt from it, as in config.json.
            Some(m) => (n_heads, m.nope + m.rope),
            None => (
                num("attention.head_count_kv").unwrap_or(n_heads),
                num("attention.key_length").unwrap_or(hidden / n_heads.max(1)),
            ),
        };
        let norm_topk_prob = g
            .get(&format!("{a}.expert_weights_norm"))
            .and_then(Value::as_bool)
            .unwrap_or(matches!(
                arch,
                Arch::Qwen3Moe | Arch::Mixtral | Arch::Qwen35Moe | Arch::Qwen3Next | Arch::GptOss
            ));
        let routing = if arch == Arch::Llama4 {
            Routing {
                gate_input: true,
                ..Routing::default()
            }
        } else if ds || arch == Arch::Glm4Moe {
            // llama.cpp's gating function ids: 1 softmax, 2 sigmoid; files
            // without one are DeepSeek-V2's softmax.
            let sigmoid = match num("expert_gating_func").unwrap_or(if ds { 1 } else { 2 }) {
                1 => false,
                2 => true,
                other => {
                    return Err(Error::Unsupported(format!(
                        "GGUF: {a}.expert_gating_func {other} (supported: 1 softmax, 2 sigmoid)"
                    )))
                }
            };
            Routing {
                sigmoid,
                n_group: num("expert_group_count").unwrap_or(1).max(1),
                topk_group: num("expert_group_used_count").unwrap_or(1).max(1),
                scale: flt("expert_weights_scale").unwrap_or(1.0) as f32,
                gate_input: false,
            }
        } else {
            Routing::default()
        };
        let oss = arch == Arch::GptOss;
        let (mut yarn, attn_scale) = if ds || oss {
            Self::yarn_gguf(g, &a, head_dim)?
        } else {
            (None, None)
        };
        if let (true, Some(y)) = (oss, yarn.as_mut()) {
            // gpt-oss's YaRN ramp is not rounded to whole dimensions
            // (transformers' `truncate: false`; llama.cpp rounds it).
            y.truncate = false;
        }
        let rot_dim = num("rope.dimension_count").unwrap_or(head_dim);
        let rope_factors = Self::rope_freqs_gguf(files, rot_dim)?;
        // llama.cpp reads Llama 4's attention from no key but this one: a
        // sliding window of 0 turns chunks, no-rope layers and temperature
        // off; otherwise chunks of 8192 on three layers in four (or the
        // stated pattern), temperature tuning with floor 8192 and scale
        // 0.1 on the others, and q/k norm unless there are 128 experts.
        let llama4 = (arch == Arch::Llama4).then(|| {
            let off = num("attention.sliding_window") == Some(0);
            let pattern = g
                .get(&format!("{a}.attention.sliding_window_pattern"))
                .and_then(Value::as_array)
                .filter(|p| p.len() >= n_layers)
                .map(|p| layer_flags(p, n_layers));
            Llama4Attn {
                rope_layers: if off {
                    vec![true; n_layers]
                } else {
                    pattern.unwrap_or_else(|| (0..n_layers).map(|i| (i + 1) % 4 != 0).collect())
                },
                chunk: (!off).then_some(8192),
                temperature: (!off).then_some((8192.0, 0.1)),
                qk_norm: n_experts != 128,
            }
        });
        let (mixers, linear) = if arch.is_hybrid() {
            let every = num("full_attention_interval").unwrap_or(4).max(1);
            let mixers = match g
                .get(&format!("{a}.attention.recurrent_layers"))
                .and_then(Value::as_array)
            {
                Some(r) => {
                    if r.len() < n_layers {
                        return Err(bad(format!(
                            "GGUF: {a}.attention.recurrent_layers has {} entries for {n_layers} layers",
                            r.len()
                        )));
                    }
                    layer_flags(r, n_layers)
                        .into_iter()
                        .map(|linear| {
                            if linear {
                                Mixer::Linear
                            } else {
                                Mixer::Attention
                            }
                        })
                        .collect()
                }
                None => (0..n_layers)
                    .map(|i| {
                        if (i + 1) % every == 0 {
                            Mixer::Attention
                        } else {
                            Mixer::Linear
                        }
                    })
                    .collect(),
            };
            let v_heads = req("ssm.time_step_rank")?;
            let linear = LinearAttn {
                conv_kernel: req("ssm.conv_kernel")?,
                k_heads: req("ssm.group_count")?,
                v_heads,
                k_dim: req("ssm.state_size")?,
                v_dim: req("ssm.inner_size")? / v_heads.max(1),
                // llama.cpp's converter reorders Qwen3.5's value heads, not
                // Qwen3-Next's.
                tiled: arch == Arch::Qwen35Moe,
            };
            (mixers, Some(linear))
        } else {
            (vec![Mixer::Attention; n_layers], None)
        };
        let moe_layers = (0..n_layers)
            .map(|i| {
                files
                    .tensor(&format!("blk.{i}.ffn_gate_inp.weight"))
                    .is_some()
            })
            .collect();
        let vocab = files
            .tensor("token_embd.weight")
            .map(|t| t.shape[0])
            .ok_or_else(|| bad("GGUF: no token_embd.weight"))?;
        let window = num("attention.sliding_window");
        // gpt-oss slides on the layers `sliding_window_pattern` marks, else
        // on even layers, as llama.cpp reads it; other files on all.
        let windows = match (oss, window) {
            (true, Some(_)) => {
                let pattern = g.get(&format!("{a}.attention.sliding_window_pattern"));
                let marked: Vec<bool> = match pattern {
                    Some(p) => match (p.as_array(), p.as_u64()) {
                        (Some(arr), _) if arr.len() >= n_layers => layer_flags(arr, n_layers),
                        (None, Some(every)) => (0..n_layers)
                            .map(|i| every == 0 || (i as u64 % every) < every - 1)
                            .collect(),
                        _ => {
                            return Err(bad(format!(
                                "GGUF: {a}.attention.sliding_window_pattern is neither a per-layer array nor a number"
                            )))
                        }
                    },
                    None => (0..n_layers).map(|i| i % 2 == 0).collect(),
                };
                marked.into_iter().map(|m| window.filter(|_| m)).collect()
            }
            _ => vec![window; n_layers],
        };
        let tok = |k: &str| {
            g.get(&format!("tokenizer.ggml.{k}"))
                .and_then(Value::as_u64)
                .map(|v| v as u32)
        };
        Ok(Config {
            arch,
            vocab,
            hidden,
            n_layers,
            n_heads,
            n_kv_heads,
            head_dim,
            rope_theta: flt("rope.freq_base").unwrap_or(10000.0) as f32,
            rot_dim,
            // llama.cpp's converter permutes llama-arch Q/K rows so that
            // its "normal" (interleaved) rope applies; DeepSeek's checkpoints
            // are interleaved already; the others are neox.
            rope_style: if a == "llama" || ds || arch == Arch::Llama4 {
                RopeStyle::Interleaved
            } else {
                RopeStyle::Neox
            },
            rms_eps: flt("attention.layer_norm_rms_epsilon").unwrap_or(1e-6) as f32,
            n_experts,
            top_k: num("expert_used_count").unwrap_or(0),
            norm_topk_prob,
            moe_layers,
            windows,
            clip_qkv: flt("attention.clamp_kqv").map(|v| v as f32),
            tie_embeddings: files.tensor("output.weight").is_none(),
            eos: tok("eos_token_id").into_iter().collect(),
            bos: tok("bos_token_id"),
            max_ctx: num("context_length"),
            mixers,
            attn_gate: arch.is_hybrid(),
            linear,
            config_top_k: num("expert_used_count").unwrap_or(0),
            routing,
            mla,
            yarn,
            attn_scale,
            mtp_layers: num("nextn_predict_layers").unwrap_or(0),
            rope_factors,
            llama4,
            // llama.cpp's constants: its files carry none.
            swiglu: oss.then(|| ClampedSwiglu {
                alpha: flt("swiglu_alpha").unwrap_or(1.702) as f32,
                limit: flt("swiglu_limit").unwrap_or(7.0) as f32,
            }),
        })
    }

    /// llama.cpp's `rope_freqs.weight` (Llama 3 scaling: one divisor per
    /// rotated pair), when the file has it.
    fn rope_freqs_gguf(files: &ModelFiles, rot_dim: usize) -> Result<Option<Arc<[f32]>>> {
        let Some(t) = files.tensor("rope_freqs.weight") else {
            return Ok(None);
        };
        let n: usize = t.shape.iter().product();
        if n != rot_dim / 2 || t.dtype != Some(sluice_core::DType::F32) {
            return Err(bad(format!(
                "GGUF: rope_freqs.weight holds {n} values of {}, expected {} f32 (half the rotated dimensions)",
                t.dtype_name,
                rot_dim / 2
            )));
        }
        let v: Vec<f32> = files
            .bytes(t)
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        if v.iter().any(|f| !(f.is_finite() && *f > 0.0)) {
            return Err(bad(
                "GGUF: rope_freqs.weight holds a divisor that is not a positive number",
            ));
        }
        Ok(Some(v.into()))
    }

    /// MLA's ranks from llama.cpp's `deepseek2` keys. Files converted for
    /// absorbed MLA give the per-head sizes as `key_length_mla` and
    /// `value_length_mla` (`key_length` is then `kv_lora + rope`); older
    /// ones give them as `key_length` and `value_length`.
    fn mla_gguf(num: &dyn Fn(&str) -> Option<usize>) -> Result<Mla> {
        let req = |k: &str| num(k).ok_or_else(|| bad(format!("GGUF: missing deepseek2 {k}")));
        let rope = req("rope.dimension_count")?;
        let (qk, v) = match num("attention.key_length_mla") {
            Some(k) => (k, req("attention.value_length_mla")?),
            None => (req("attention.key_length")?, req("attention.value_length")?),
        };
        let nope = qk.checked_sub(rope).filter(|&n| n > 0).ok_or_else(|| {
            bad(format!(
                "GGUF: deepseek2 key length {qk} leaves no room beside {rope} rotated dimensions"
            ))
        })?;
        Ok(Mla {
            q_lora: num("attention.q_lora_rank").unwrap_or(0),
            kv_lora: req("attention.kv_lora_rank")?,
            nope,
            rope,
            v,
        })
    }

    /// YaRN from llama.cpp's `rope.scaling.*` keys and the attention scale
    /// that goes with it. The converter keeps only `mscale_all_dim` (as
    /// `yarn_log_multiplier`, times 0.1) and llama.cpp reads `mscale` as
    /// equal to it, which makes the cos/sin factor 1 and scales q·k by
    /// `mscale(factor, mscale_all_dim)²`, as transformers does for the
    /// published checkpoints (whose two values are equal).
    fn yarn_gguf(g: &Gguf, a: &str, head_dim: usize) -> Result<(Option<Yarn>, Option<f32>)> {
        let key = |k: &str| g.get(&format!("{a}.rope.scaling.{k}"));
        let f = |k: &str| key(k).and_then(Value::as_f64).map(|v| v as f32);
        match key("type").and_then(Value::as_str) {
            None | Some("none") => return Ok((None, None)),
            Some("yarn") => {}
            Some(other) => {
                return Err(Error::Unsupported(format!(
                    "GGUF: {a}.rope.scaling.type \"{other}\""
                )))
            }
        }
        let factor = f("factor")
            .filter(|&x| x.is_finite() && x > 0.0)
            .ok_or_else(|| {
                bad(format!(
                    "GGUF: YaRN without a valid {a}.rope.scaling.factor"
                ))
            })?;
        let orig_ctx = key("original_context_length")
            .and_then(Value::as_u64)
            .filter(|&n| n > 0)
            .ok_or_else(|| {
                bad(format!(
                    "GGUF: YaRN without {a}.rope.scaling.original_context_length"
                ))
            })? as usize;
        let mscale_all = f("yarn_log_multiplier").map(|l| l / 0.1);
        let attn_factor = match mscale_all {
            Some(m) if m != 0.0 => 1.0,
            _ => Yarn::mscale(factor, 1.0),
        } * f("attn_factor").unwrap_or(1.0);
        let yarn = Yarn {
            factor,
            orig_ctx,
            beta_fast: f("yarn_beta_fast").unwrap_or(32.0),
            beta_slow: f("yarn_beta_slow").unwrap_or(1.0),
            attn_factor,
            truncate: true,
        };
        let scale = mscale_all
            .filter(|&m| m != 0.0)
            .map(|m| yarn.qk_scale(m, head_dim));
        Ok((Some(yarn), scale))
    }

    /// Bytes of the per-sequence state for `ctx` positions: the KV cache
    /// of attention layers and the fixed state of linear ones.
    pub fn state_bytes(&self, ctx: usize) -> u64 {
        let (k, v) = self.kv_widths();
        let kv = ((k + v) * ctx) as u64;
        let lin = self.linear.map_or(0, |l| l.state_len()) as u64;
        self.mixers
            .iter()
            .map(|m| match m {
                Mixer::Attention => kv,
                Mixer::Linear => lin,
            })
            .sum::<u64>()
            * 4
    }

    /// Bytes of the linear-attention layers' fixed state (what a snapshot
    /// of a sequence copies; 0 without such layers).
    pub fn linear_state_bytes(&self) -> u64 {
        let lin = self.linear.map_or(0, |l| l.state_len()) as u64;
        self.mixers.iter().filter(|m| **m == Mixer::Linear).count() as u64 * lin * 4
    }

    /// f32 values an attention layer caches per position, for keys and for
    /// values: with latent attention, one compressed vector and the rotary
    /// key, serving as both.
    pub fn kv_widths(&self) -> (usize, usize) {
        match self.mla {
            Some(m) => (m.kv_lora + m.rope, 0),
            None => {
                let d = self.n_kv_heads * self.head_dim;
                (d, d)
            }
        }
    }

    /// Overrides the number of routed experts per token (`--experts-k`).
    /// This changes the model's output.
    pub fn set_experts_k(&mut self, k: usize) -> Result<()> {
        if k == 0 || k > self.n_experts {
            return Err(Error::Invalid(format!(
                "--experts-k {k} is not in 1..={} (the model has {} experts per layer)",
                self.n_experts, self.n_experts
            )));
        }
        self.top_k = k;
        Ok(())
    }

    /// Index of the first MoE layer, if any.
    pub fn first_moe_layer(&self) -> Option<usize> {
        self.moe_layers.iter().position(|&m| m)
    }
}
