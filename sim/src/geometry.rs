//! What the simulator needs of a model: per layer, the matrix products
//! and the token mixer; the experts' read size; the resident bytes. From a
//! model file (read from its headers, no weights touched) or from a preset
//! geometry without weights.

use sluice_core::{DType, Error, Result};
use sluice_engine::config::{Arch, Config};
use sluice_engine::gguf_meta::FfnSizes;
use sluice_engine::model::{Ffn, Model, Weight};

/// One matrix product.
#[derive(Clone, Debug, PartialEq)]
pub struct Op {
    /// Weight format (`Q4_0`, `mlx4`, ...): picks the device's matvec rate.
    pub quant: String,
    /// Output rows.
    pub rows: usize,
    /// Input columns.
    pub cols: usize,
    /// Bytes of the weights.
    pub bytes: u64,
}

impl Op {
    fn of(w: &Weight) -> Op {
        Op {
            quant: w.dtype.name().into(),
            rows: w.rows,
            cols: w.cols,
            bytes: w.nbytes(),
        }
    }

    fn new(q: &Quant, rows: usize, cols: usize) -> Op {
        Op {
            quant: q.name(),
            rows,
            cols,
            bytes: q.bytes(rows, cols),
        }
    }
}

/// How a layer mixes tokens.
#[derive(Clone, Debug, PartialEq)]
pub enum Mixer {
    /// Softmax attention over the KV cache.
    Attention {
        /// Query heads.
        heads: usize,
        /// Key/value heads.
        kv_heads: usize,
        /// Head dimension.
        head_dim: usize,
        /// Sliding window.
        window: Option<usize>,
    },
    /// Multi-head latent attention (DeepSeek-V3): every head reads one
    /// cached vector of `width` per position (the latent plus the shared
    /// rotary key) for its scores and the first `latent` of it for values.
    Latent {
        /// Query heads.
        heads: usize,
        /// Cached floats per position.
        width: usize,
        /// The latent's length.
        latent: usize,
    },
    /// Linear attention (Gated DeltaNet): a fixed-size recurrent state.
    Linear {
        /// Bytes of the state, read and written once per token.
        state_bytes: u64,
    },
}

/// One decoder layer.
#[derive(Clone, Debug)]
pub struct LayerGeom {
    /// Resident products: projections, router, shared expert, dense MLP.
    pub ops: Vec<Op>,
    /// Token mixer.
    pub mixer: Mixer,
    /// Routed experts are streamed in this layer.
    pub moe: bool,
}

/// A model as the simulator sees it.
#[derive(Clone, Debug)]
pub struct SimModel {
    /// Name (file or preset).
    pub name: String,
    /// Layers.
    pub layers: Vec<LayerGeom>,
    /// Routed experts per MoE layer.
    pub experts: usize,
    /// Experts per token (the config's, or `--experts-k`).
    pub top_k: usize,
    /// One routed expert's products (gate, up, down).
    pub expert_ops: Vec<Op>,
    /// Bytes read per expert (its record, widened to 4 KiB).
    pub record_bytes: u64,
    /// Resident weights: embeddings, output head, every non-expert matrix.
    pub dense_bytes: u64,
    /// The output head.
    pub head: Op,
    /// Routing shape for traces and the budget's scratch.
    pub config: Config,
    /// Rows of the widest expert (scratch sizing).
    pub expert_inter: usize,
}

/// Weight formats of preset geometries.
#[derive(Clone, Debug, PartialEq)]
pub enum Quant {
    /// A GGUF block type.
    Gguf(DType),
    /// MLX affine: `bits`-bit values, bf16 scale and bias per `group`.
    Mlx {
        /// Bits per value.
        bits: u32,
        /// Values per scale/bias pair.
        group: usize,
    },
    /// Block-scaled FP8 as DeepSeek-V3, Kimi K2 and GLM-4.5 publish it: a
    /// byte per weight and an f32 scale per 128×128 tile.
    Fp8,
}

impl Quant {
    /// Parses `q4_0`, `f16`, `mlx4`, `mlx2`, `mlx3-g32`, `fp8`...
    pub fn parse(s: &str) -> Result<Quant> {
        let l = s.to_ascii_lowercase();
        if l == "fp8" {
            return Ok(Quant::Fp8);
        }
        if let Some(rest) = l.strip_prefix("mlx") {
            let (b, g) = rest.split_once("-g").unwrap_or((rest, "64"));
            let bits: u32 = b.parse().unwrap_or(0);
            let group: usize = g.parse().unwrap_or(0);
            if ![2, 3, 4, 6, 8].contains(&bits) || ![32, 64, 128].contains(&group) {
                return Err(Error::Invalid(format!(
                    "unknown MLX format {s:?} (mlx2|mlx3|mlx4|mlx6|mlx8, optionally -g32|-g64|-g128)"
                )));
            }
            return Ok(Quant::Mlx { bits, group });
        }
        DType::parse(s).map(Quant::Gguf).ok_or_else(|| {
            Error::Invalid(format!(
                "unknown weight format {s:?} (a GGUF type such as q4_0, q8_0, f16, mlx4/mlx2, or fp8)"
            ))
        })
    }

    /// Name as the device profiles key matvec rates.
    pub fn name(&self) -> String {
        match self {
            Quant::Gguf(d) => d.name().into(),
            Quant::Mlx { bits, .. } => format!("mlx{bits}"),
            Quant::Fp8 => "fp8".into(),
        }
    }

    /// Bytes of a `rows × cols` matrix.
    pub fn bytes(&self, rows: usize, cols: usize) -> u64 {
        match self {
            Quant::Gguf(d) => {
                let bs = d.block_size();
                (cols.div_ceil(bs) * d.block_bytes() * rows) as u64
            }
            Quant::Mlx { bits, group } => {
                let values = (rows * cols) as u64 * *bits as u64 / 8;
                // bf16 scale and bias per group
                values + (rows * cols.div_ceil(*group) * 4) as u64
            }
            Quant::Fp8 => (rows * cols + rows.div_ceil(128) * cols.div_ceil(128) * 4) as u64,
        }
    }
}

fn widen(b: u64) -> u64 {
    b.div_ceil(4096) * 4096
}

/// Preset geometries the simulator knows beyond `sluice synth`'s.
pub const SIM_PRESETS: &[(&str, &str)] = &[(
    "qwen3.5-397b-a17b",
    "Qwen3.5-397B-A17B: 60 layers (45 Gated DeltaNet, 15 gated attention), 512 experts of 4096→1024→4096, top-10 + 1 shared; experts in --quant (default mlx4), everything else mlx4 as published",
)];

/// Names of every preset the simulator accepts.
pub fn preset_names() -> Vec<&'static str> {
    let mut v: Vec<&str> = SIM_PRESETS.iter().map(|p| p.0).collect();
    v.extend(sluice_engine::synth::PRESETS.iter().map(|p| p.name));
    v
}

impl SimModel {
    /// From a model file's headers (no weights are read).
    pub fn from_model(m: &Model, name: &str) -> SimModel {
        let c = &m.config;
        let mut layers = Vec::with_capacity(c.n_layers);
        let mut dense = m.embed.nbytes();
        if !c.tie_embeddings {
            dense += m.lm_head.nbytes();
        }
        let mut expert_ops = Vec::new();
        let mut record = 0u64;
        let mut inter = 0;
        for (li, l) in m.layers.iter().enumerate() {
            let mut ops: Vec<Op> = l.mixer_weights().into_iter().map(Op::of).collect();
            let moe = match &l.ffn {
                Ffn::Dense(d) => {
                    ops.extend([&d.gate, &d.up, &d.down].map(Op::of));
                    false
                }
                Ffn::Moe(x) => {
                    ops.push(Op::of(&x.router));
                    if let Some(s) = &x.shared {
                        ops.extend([&s.gate, &s.up, &s.down].map(Op::of));
                    }
                    if let Some(g) = &x.shared_gate {
                        ops.push(Op::of(g));
                    }
                    if let Some(e) = x.experts.first() {
                        if e.nbytes() > record {
                            record = e.nbytes();
                            expert_ops = [&e.gate, &e.up, &e.down].map(Op::of).to_vec();
                            inter = e.gate.rows;
                        }
                    }
                    true
                }
            };
            dense += ops.iter().map(|o| o.bytes).sum::<u64>();
            layers.push(LayerGeom {
                ops,
                mixer: match c.mixers[li] {
                    sluice_engine::config::Mixer::Attention if c.mla.is_some() => latent(c),
                    sluice_engine::config::Mixer::Attention => Mixer::Attention {
                        heads: c.n_heads,
                        kv_heads: c.n_kv_heads,
                        head_dim: c.head_dim,
                        window: c.windows[li],
                    },
                    sluice_engine::config::Mixer::Linear => Mixer::Linear {
                        state_bytes: c.linear.map_or(0, |l| l.state_len() as u64 * 4),
                    },
                },
                moe,
            });
        }
        SimModel {
            name: name.into(),
            layers,
            experts: c.n_experts,
            top_k: c.top_k,
            expert_ops,
            // A record is read widened to 4 KiB at both ends.
            record_bytes: widen(record) + 4096,
            dense_bytes: dense,
            head: Op::of(&m.lm_head),
            config: c.clone(),
            expert_inter: inter,
        }
    }

    /// A preset geometry (`sluice synth`'s, or the simulator's own) in
    /// weight format `quant` (default: the preset's) with `layers` layers.
    pub fn preset(name: &str, quant: Option<&str>, layers: Option<usize>) -> Result<SimModel> {
        if name == "qwen3.5-397b-a17b" {
            // The published MLX checkpoint is 4-bit throughout; flash-moe's
            // 2-bit variant requantizes the experts only.
            let q = Quant::parse(quant.unwrap_or("mlx4"))?;
            let dense = Quant::parse("mlx4")?;
            return Ok(qwen35_397b(&q, &dense, layers.unwrap_or(60)));
        }
        let p = sluice_engine::synth::preset(name).map_err(|_| {
            Error::Invalid(format!(
                "{name:?} is neither a model file nor a preset (known: {})",
                preset_names().join(", ")
            ))
        })?;
        let q = Quant::parse(quant.unwrap_or("q4_0"))?;
        let c = p.config(layers.unwrap_or(p.layers()));
        Ok(from_config(name, &c, p.ffn_sizes(), &q))
    }
}

/// The sim's mixer for a latent-attention config.
fn latent(c: &Config) -> Mixer {
    let (k, _) = c.kv_widths();
    Mixer::Latent {
        heads: c.n_heads,
        width: k,
        latent: c.mla.map_or(k, |m| m.kv_lora),
    }
}

/// A routed-MoE model of config `c` in format `q`: attention layers (latent
/// where the config says so), Gated DeltaNet ones where the config has
/// them (Qwen3.5), dense MLPs in its non-MoE layers and shared experts of
/// the sizes in `ffn`.
fn from_config(name: &str, c: &Config, ffn: FfnSizes, q: &Quant) -> SimModel {
    let inter = ffn.expert;
    let (h, qd, kd) = (c.hidden, c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim);
    // The feed-forward block's resident products besides the experts.
    let ffn_ops = |l: usize| -> Vec<Op> {
        if !c.moe_layers[l] {
            let d = ffn.dense;
            return vec![Op::new(q, d, h), Op::new(q, d, h), Op::new(q, h, d)];
        }
        let mut v = vec![Op::new(q, c.n_experts, h)];
        if let Some(s) = ffn.shared {
            v.extend([Op::new(q, s, h), Op::new(q, s, h), Op::new(q, h, s)]);
            if c.arch.is_hybrid() {
                // The shared expert's sigmoid gate, one f32 row.
                v.push(Op::new(&Quant::Gguf(DType::F32), 1, h));
            }
        }
        v
    };
    let layers: Vec<LayerGeom> = (0..c.n_layers)
        .map(|l| match (c.mixers[l], c.linear, c.mla) {
            (_, _, Some(m)) => {
                let mut ops = if m.q_lora > 0 {
                    vec![
                        Op::new(q, m.q_lora, h),
                        Op::new(q, c.n_heads * (m.nope + m.rope), m.q_lora),
                    ]
                } else {
                    vec![Op::new(q, c.n_heads * (m.nope + m.rope), h)]
                };
                ops.extend([
                    Op::new(q, m.kv_lora + m.rope, h),
                    // absorbed k_b and v_b, every head's
                    Op::new(q, c.n_heads * m.kv_lora, m.nope),
                    Op::new(q, c.n_heads * m.v, m.kv_lora),
                    Op::new(q, h, c.n_heads * m.v),
                ]);
                ops.extend(ffn_ops(l));
                LayerGeom {
                    ops,
                    mixer: latent(c),
                    moe: c.moe_layers[l],
                }
            }
            (sluice_engine::config::Mixer::Linear, Some(la), None) => {
                let vd = la.v_heads * la.v_dim;
                // The products `sluice synth` writes (llama.cpp's layout):
                // qkv and z apart, b and a apart (Qwen3.5) or fused
                // (Qwen3-Next's ssm_ba).
                let mut ops = vec![Op::new(q, la.conv_dim(), h), Op::new(q, vd, h)];
                if c.arch == Arch::Qwen3Next {
                    ops.push(Op::new(q, 2 * la.v_heads, h));
                } else {
                    ops.extend([Op::new(q, la.v_heads, h), Op::new(q, la.v_heads, h)]);
                }
                ops.push(Op::new(q, h, vd));
                ops.extend(ffn_ops(l));
                LayerGeom {
                    ops,
                    mixer: Mixer::Linear {
                        state_bytes: la.state_len() as u64 * 4,
                    },
                    moe: c.moe_layers[l],
                }
            }
            _ => LayerGeom {
                ops: [
                    Op::new(q, if c.attn_gate { 2 * qd } else { qd }, h),
                    Op::new(q, kd, h),
                    Op::new(q, kd, h),
                    Op::new(q, h, qd),
                ]
                .into_iter()
                .chain(ffn_ops(l))
                .collect(),
                mixer: Mixer::Attention {
                    heads: c.n_heads,
                    kv_heads: c.n_kv_heads,
                    head_dim: c.head_dim,
                    window: c.windows[l],
                },
                moe: c.moe_layers[l],
            },
        })
        .collect();
    let expert_ops = vec![
        Op::new(q, inter, h),
        Op::new(q, inter, h),
        Op::new(q, h, inter),
    ];
    let head = Op::new(q, c.vocab, h);
    preset_model(name, layers, expert_ops, head, c.clone(), inter)
}

/// A preset's model: untied embeddings and head, packed records.
fn preset_model(
    name: &str,
    layers: Vec<LayerGeom>,
    expert_ops: Vec<Op>,
    head: Op,
    config: Config,
    inter: usize,
) -> SimModel {
    let dense = layers
        .iter()
        .flat_map(|l| l.ops.iter().map(|o| o.bytes))
        .sum::<u64>()
        + 2 * head.bytes;
    let record: u64 = expert_ops.iter().map(|o| o.bytes).sum();
    SimModel {
        name: name.into(),
        layers,
        experts: config.n_experts,
        top_k: config.top_k,
        expert_ops,
        record_bytes: widen(record),
        dense_bytes: dense,
        head,
        config,
        expert_inter: inter,
    }
}

/// Qwen3.5-397B-A17B's text model: 60 layers in the pattern of three Gated
/// DeltaNet layers then one gated full-attention layer; hidden 4096; full
/// attention 32 query heads and 2 key/value heads of 256 (the query
/// projection doubled for its output gate); DeltaNet 16 key heads and 64
/// value heads of 128, conv kernel 4; 512 experts of 4096→1024→4096, top-10,
/// plus a shared expert of 1024 with a sigmoid gate; vocabulary 248,320.
fn qwen35_397b(eq: &Quant, q: &Quant, n_layers: usize) -> SimModel {
    let h = 4096;
    let (heads, kv_heads, hd) = (32, 2, 256);
    let (lk, lv, dk, dv) = (16, 64, 128, 128);
    let (experts, top_k, inter, vocab) = (512, 10, 1024, 248_320);
    let layers: Vec<LayerGeom> = (0..n_layers)
        .map(|l| {
            let full = l % 4 == 3;
            let mut ops = if full {
                vec![
                    Op::new(q, 2 * heads * hd, h),
                    Op::new(q, kv_heads * hd, h),
                    Op::new(q, kv_heads * hd, h),
                    Op::new(q, h, heads * hd),
                ]
            } else {
                vec![
                    // q, k, v and the output gate z
                    Op::new(q, 2 * lk * dk + 2 * lv * dv, h),
                    // beta and the decay a, per value head
                    Op::new(q, 2 * lv, h),
                    Op::new(q, h, lv * dv),
                ]
            };
            ops.push(Op::new(q, experts, h));
            ops.extend([
                Op::new(q, inter, h),
                Op::new(q, inter, h),
                Op::new(q, h, inter),
                Op::new(q, 1, h),
            ]);
            LayerGeom {
                ops,
                mixer: if full {
                    Mixer::Attention {
                        heads,
                        kv_heads,
                        head_dim: hd,
                        window: None,
                    }
                } else {
                    Mixer::Linear {
                        // f32 recurrent state of every value head, plus the
                        // causal conv's last 3 inputs
                        state_bytes: (lv * dk * dv * 4 + 3 * (2 * lk * dk + lv * dv) * 4) as u64,
                    }
                },
                moe: true,
            }
        })
        .collect();
    let expert_ops = vec![
        Op::new(eq, inter, h),
        Op::new(eq, inter, h),
        Op::new(eq, h, inter),
    ];
    let head = Op::new(q, vocab, h);
    let full = (0..n_layers).filter(|l| l % 4 == 3).count();
    let config = Config {
        arch: Arch::Qwen3Moe,
        vocab,
        hidden: h,
        n_layers,
        n_heads: heads,
        // Only the full-attention layers keep a KV cache: spread it over
        // all layers' count for the budget.
        n_kv_heads: kv_heads,
        head_dim: hd * full.max(1) / n_layers.max(1),
        rope_theta: 1e7,
        rot_dim: 2,
        rope_style: sluice_core::ops::RopeStyle::Neox,
        rms_eps: 1e-6,
        n_experts: experts,
        top_k,
        norm_topk_prob: true,
        moe_layers: vec![true; n_layers],
        windows: vec![None; n_layers],
        clip_qkv: None,
        tie_embeddings: false,
        eos: vec![],
        bos: None,
        max_ctx: Some(262_144),
        mixers: (0..n_layers)
            .map(|l| {
                if l % 4 == 3 {
                    sluice_engine::config::Mixer::Attention
                } else {
                    sluice_engine::config::Mixer::Linear
                }
            })
            .collect(),
        attn_gate: true,
        linear: Some(sluice_engine::config::LinearAttn {
            conv_kernel: 4,
            k_heads: lk,
            v_heads: lv,
            k_dim: dk,
            v_dim: dv,
            tiled: false,
        }),
        config_top_k: top_k,
        routing: Default::default(),
        mla: None,
        yarn: None,
        attn_scale: None,
        mtp_layers: 0,
        rope_factors: None,
        llama4: None,
        swiglu: None,
    };
    preset_model("qwen3.5-397b-a17b", layers, expert_ops, head, config, inter)
}

impl SimModel {
    /// Uses `k` experts per token instead of the config's.
    pub fn set_experts_k(&mut self, k: usize) -> Result<()> {
        if k == 0 || k > self.experts {
            return Err(Error::Invalid(format!(
                "--experts-k {k} is not in 1..={}",
                self.experts
            )));
        }
        self.top_k = k;
        self.config.top_k = k;
        Ok(())
    }

    /// Routed experts in the model.
    pub fn experts_total(&self) -> usize {
        self.layers.iter().filter(|l| l.moe).count() * self.experts
    }

    /// Bytes of all routed experts' records.
    pub fn expert_bytes_total(&self) -> u64 {
        self.experts_total() as u64 * self.record_bytes
    }

    /// Bytes of the recurrent state of linear-attention layers.
    pub fn state_bytes(&self) -> u64 {
        self.layers
            .iter()
            .map(|l| match l.mixer {
                Mixer::Linear { state_bytes } => state_bytes,
                _ => 0,
            })
            .sum()
    }

    /// Bytes of the KV cache per position (f32, as the engine keeps it).
    pub fn kv_bytes_per_pos(&self) -> u64 {
        self.layers
            .iter()
            .map(|l| match l.mixer {
                Mixer::Attention {
                    kv_heads, head_dim, ..
                } => (2 * kv_heads * head_dim * 4) as u64,
                Mixer::Latent { width, .. } => (width * 4) as u64,
                _ => 0,
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qwen35_expert_sizes_match_the_published_figures() {
        // ≈ 7.08 MB per expert at 4-bit and 3.93 MB at 2-bit, group 64.
        let m4 = SimModel::preset("qwen3.5-397b-a17b", Some("mlx4"), None).unwrap();
        let m2 = SimModel::preset("qwen3.5-397b-a17b", Some("mlx2"), None).unwrap();
        let e4: u64 = m4.expert_ops.iter().map(|o| o.bytes).sum();
        let e2: u64 = m2.expert_ops.iter().map(|o| o.bytes).sum();
        assert!((e4 as f64 / 1e6 - 7.08).abs() < 0.01, "{e4}");
        assert!((e2 as f64 / 1e6 - 3.93).abs() < 0.01, "{e2}");
        assert_eq!(m4.layers.len(), 60);
        let linear = m4
            .layers
            .iter()
            .filter(|l| matches!(l.mixer, Mixer::Linear { .. }))
            .count();
        assert_eq!(linear, 45);
        // 397B parameters in all at 4.5 bits each: about 223 GB.
        let total = m4.dense_bytes + 60 * 512 * e4;
        assert!((215e9..230e9).contains(&(total as f64)), "{total}");
    }

    #[test]
    fn quant_names_parse() {
        assert_eq!(Quant::parse("Q4_0").unwrap(), Quant::Gguf(DType::Q4_0));
        assert_eq!(
            Quant::parse("mlx3-g32").unwrap(),
            Quant::Mlx { bits: 3, group: 32 }
        );
        assert!(Quant::parse("mlx5").is_err());
        assert_eq!(Quant::parse("FP8").unwrap(), Quant::Fp8);
        // A 7168x2048 expert matrix: a byte per weight, 56x16 f32 scales.
        assert_eq!(Quant::Fp8.bytes(2048, 7168), 2048 * 7168 + 16 * 56 * 4);
        assert!(Quant::parse("q9").is_err());
    }
}
