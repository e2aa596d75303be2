//! Synthetic models: real geometries with random weights, written in the
//! packed layout at disk speed, so that models larger than RAM exist on any
//! machine. The numbers they produce mean nothing; their shapes, byte
//! counts and I/O are those of the real model.

use crate::config::{Arch, Config, LinearAttn, Llama4Attn, Mixer, Mla, Routing};
use crate::gguf_meta::{self, FfnSizes};
use crate::pack::{self, spec, Item, PackSummary, Plan, Src};
use sluice_core::ops::{RopeStyle, Yarn};
use sluice_core::{DType, Error, Result};
use std::path::Path;

/// A real model's geometry.
#[derive(Clone, Copy, Debug)]
pub struct Preset {
    /// Name on the command line.
    pub name: &'static str,
    /// What it is.
    pub about: &'static str,
    arch: Arch,
    vocab: usize,
    hidden: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    expert_inter: usize,
    experts: usize,
    top_k: usize,
    rope_theta: f32,
    rms_eps: f32,
    qk_norm: bool,
    /// Qwen3.5: Gated DeltaNet layers (all but every `full_every`-th),
    /// gated attention with partial rotary, a shared expert.
    hybrid: Option<Hybrid>,
    /// DeepSeek-V3 and GLM-4.5 families: grouped sigmoid routing, leading
    /// dense layers, shared experts; DeepSeek's latent attention and YaRN,
    /// GLM's partial rotary and attention biases.
    deepseek: Option<DeepSeek>,
    /// Llama 4: interleaved dense and MoE layers, a shared expert of the
    /// experts' width, its attention switches.
    llama4: Option<Llama4Geom>,
    /// gpt-oss: sliding window of the even layers, YaRN factor over the
    /// original context (attention sinks, biases and the clamped SwiGLU
    /// come with it).
    oss: Option<Oss>,
}

/// gpt-oss's extra geometry.
#[derive(Clone, Copy, Debug)]
struct Oss {
    window: usize,
    yarn: (f32, usize),
}

/// gpt-oss's geometry around `layers` layers of `experts` experts: 2880
/// wide, 64 heads / 8 kv of 64, experts of 2880, top-4, 128-token windows
/// on every other layer, YaRN ×32 over 4096.
const fn gpt_oss(name: &'static str, about: &'static str, layers: usize, experts: usize) -> Preset {
    Preset {
        name,
        about,
        arch: Arch::GptOss,
        vocab: 201_088,
        hidden: 2880,
        layers,
        heads: 64,
        kv_heads: 8,
        head_dim: 64,
        expert_inter: 2880,
        experts,
        top_k: 4,
        rope_theta: 150_000.0,
        rms_eps: 1e-5,
        oss: Some(Oss {
            window: 128,
            yarn: (32.0, 4096),
        }),
        qk_norm: false,
        hybrid: None,
        llama4: None,
        deepseek: None,
    }
}

/// Llama 4's extra geometry.
#[derive(Clone, Copy, Debug)]
struct Llama4Geom {
    /// Every `moe_step`-th layer is MoE, the others dense MLPs.
    moe_step: usize,
    /// Width of the dense MLPs (`intermediate_size_mlp`).
    dense_inter: usize,
    /// Rope layers RMS-normalize q and k (Scout; not Maverick).
    qk_norm: bool,
    /// Llama 3 rope scaling: factor, low and high frequency factors,
    /// original context.
    llama3: Option<(f64, f64, f64, f64)>,
}

/// The DeepSeek-V3 and GLM-4.5 families' extra geometry.
#[derive(Clone, Copy, Debug)]
struct DeepSeek {
    /// Latent attention (DeepSeek); GLM's is grouped-query.
    mla: Option<Mla>,
    routing: Routing,
    first_dense: usize,
    dense_inter: usize,
    /// `n_shared_experts × moe_intermediate_size`.
    shared_inter: usize,
    /// YaRN factor over `orig_ctx`, with `beta_fast` and `beta_slow`
    /// (`mscale` = `mscale_all_dim` = 1 in every release).
    yarn: Option<(f32, usize, f32, f32)>,
    /// Rotated dimensions per head (GLM rotates half).
    rot_dim: usize,
    /// Biases on q, k and v (GLM).
    attn_bias: bool,
}

/// DeepSeek-V3's latent attention ranks and dense, shared and routed
/// expert sizes, with the routing, leading dense layers and YaRN given.
const fn deepseek(
    routing: Routing,
    first_dense: usize,
    yarn: (f32, usize, f32, f32),
) -> Option<DeepSeek> {
    Some(DeepSeek {
        mla: Some(Mla {
            q_lora: 1536,
            kv_lora: 512,
            nope: 128,
            rope: 64,
            v: 128,
        }),
        routing,
        first_dense,
        dense_inter: 18_432,
        shared_inter: 2048,
        yarn: Some(yarn),
        rot_dim: 64,
        attn_bias: false,
    })
}

/// GLM-4.5's routing (no groups), shared expert of `moe_inter` and
/// attention (half of 128 rotated, q/k/v biases).
const fn glm(
    scale: f32,
    first_dense: usize,
    dense_inter: usize,
    moe_inter: usize,
) -> Option<DeepSeek> {
    Some(DeepSeek {
        mla: None,
        routing: Routing {
            sigmoid: true,
            n_group: 1,
            topk_group: 1,
            scale,
            gate_input: false,
        },
        first_dense,
        dense_inter,
        shared_inter: moe_inter,
        yarn: None,
        rot_dim: 64,
        attn_bias: true,
    })
}

/// The Qwen3.5 family's extra geometry.
#[derive(Clone, Copy, Debug)]
struct Hybrid {
    linear: LinearAttn,
    full_every: usize,
    rot_dim: usize,
    shared_inter: usize,
}

/// Qwen3.5's layer pattern with `k_heads`/`v_heads` linear heads of
/// `head_dim`, `rot_dim` rotated dimensions and a shared expert. Value
/// heads are tiled in Qwen3.5's GGUF files, grouped in Qwen3-Next's.
const fn qwen35(
    k_heads: usize,
    v_heads: usize,
    head_dim: usize,
    rot_dim: usize,
    shared_inter: usize,
    tiled: bool,
) -> Option<Hybrid> {
    Some(Hybrid {
        linear: LinearAttn {
            conv_kernel: 4,
            k_heads,
            v_heads,
            k_dim: head_dim,
            v_dim: head_dim,
            tiled,
        },
        full_every: 4,
        rot_dim,
        shared_inter,
    })
}

/// The presets `sluice synth` knows.
pub const PRESETS: &[Preset] = &[
    gpt_oss(
        "gpt-oss-120b",
        "gpt-oss-120b (117B): 36 layers (sliding 128 / full alternating), 64 heads / 8 kv of 64 with sinks, 128 experts of 2880→2880→2880, top-4",
        36,
        128,
    ),
    gpt_oss(
        "gpt-oss-20b",
        "gpt-oss-20b (21B): 24 layers (sliding 128 / full alternating), 64 heads / 8 kv of 64 with sinks, 32 experts of 2880→2880→2880, top-4",
        24,
        32,
    ),
    Preset {
        name: "small-gpt-oss",
        about: "a small gpt-oss geometry for tests: 4 layers (sliding 16 / full), 8 heads / 2 kv of 64 with sinks, 32 experts of 512→256→512, top-4",
        vocab: 2048,
        hidden: 512,
        layers: 4,
        heads: 8,
        kv_heads: 2,
        expert_inter: 256,
        experts: 32,
        oss: Some(Oss {
            window: 16,
            yarn: (4.0, 1024),
        }),
        ..gpt_oss("", "", 4, 32)
    },
    Preset {
        name: "qwen3-30b-a3b",
        about: "Qwen3-30B-A3B: 48 layers, 128 experts of 2048→768→2048, top-8",
        arch: Arch::Qwen3Moe,
        vocab: 151_936,
        hidden: 2048,
        layers: 48,
        heads: 32,
        kv_heads: 4,
        head_dim: 128,
        expert_inter: 768,
        experts: 128,
        top_k: 8,
        rope_theta: 1e6,
        rms_eps: 1e-6,
        oss: None,
        qk_norm: true,
        hybrid: None,
        llama4: None,
        deepseek: None,
    },
    Preset {
        name: "qwen3-235b-a22b",
        about: "Qwen3-235B-A22B: 94 layers, 128 experts of 4096→1536→4096, top-8",
        arch: Arch::Qwen3Moe,
        vocab: 151_936,
        hidden: 4096,
        layers: 94,
        heads: 64,
        kv_heads: 4,
        head_dim: 128,
        expert_inter: 1536,
        experts: 128,
        top_k: 8,
        rope_theta: 1e6,
        rms_eps: 1e-6,
        oss: None,
        qk_norm: true,
        hybrid: None,
        llama4: None,
        deepseek: None,
    },
    Preset {
        name: "mixtral-8x7b",
        about: "Mixtral-8x7B: 32 layers, 8 experts of 4096→14336→4096, top-2",
        arch: Arch::Mixtral,
        vocab: 32_000,
        hidden: 4096,
        layers: 32,
        heads: 32,
        kv_heads: 8,
        head_dim: 128,
        expert_inter: 14_336,
        experts: 8,
        top_k: 2,
        rope_theta: 1e6,
        rms_eps: 1e-5,
        oss: None,
        qk_norm: false,
        hybrid: None,
        llama4: None,
        deepseek: None,
    },
    Preset {
        name: "qwen1.5-moe-a2.7b",
        about: "Qwen1.5-MoE-A2.7B's routed experts (the geometry of the recorded traces): 24 layers, 60 experts of 2048→1408→2048, top-4; its shared expert is left out",
        arch: Arch::Qwen3Moe,
        vocab: 151_936,
        hidden: 2048,
        layers: 24,
        heads: 16,
        kv_heads: 16,
        head_dim: 128,
        expert_inter: 1408,
        experts: 60,
        top_k: 4,
        rope_theta: 1e6,
        rms_eps: 1e-6,
        oss: None,
        qk_norm: false,
        hybrid: None,
        llama4: None,
        deepseek: None,
    },
    Preset {
        name: "small-moe",
        about: "a small Qwen3-MoE geometry for tests and quick demos: 8 layers, 64 experts of 512→512→512, top-4",
        arch: Arch::Qwen3Moe,
        vocab: 2048,
        hidden: 512,
        layers: 8,
        heads: 8,
        kv_heads: 2,
        head_dim: 64,
        expert_inter: 512,
        experts: 64,
        top_k: 4,
        rope_theta: 1e6,
        rms_eps: 1e-6,
        oss: None,
        qk_norm: true,
        hybrid: None,
        llama4: None,
        deepseek: None,
    },
    Preset {
        name: "qwen3.5-397b-a17b",
        about: "Qwen3.5-397B-A17B (the iPhone demo's model): 60 layers, 45 Gated DeltaNet and 15 gated attention, 512 experts of 4096→1024→4096, top-10 + a shared expert",
        arch: Arch::Qwen35Moe,
        vocab: 248_320,
        hidden: 4096,
        layers: 60,
        heads: 32,
        kv_heads: 2,
        head_dim: 256,
        expert_inter: 1024,
        experts: 512,
        top_k: 10,
        rope_theta: 1e7,
        rms_eps: 1e-6,
        oss: None,
        qk_norm: true,
        hybrid: qwen35(16, 64, 128, 64, 1024, true),
        llama4: None,
        deepseek: None,
    },
    Preset {
        name: "qwen3.6-35b-a3b",
        about: "Qwen3.6-35B-A3B (the Qwen3.5 family's small MoE): 40 layers, 30 Gated DeltaNet and 10 gated attention, 256 experts of 2048→512→2048, top-8 + a shared expert",
        arch: Arch::Qwen35Moe,
        vocab: 248_320,
        hidden: 2048,
        layers: 40,
        heads: 16,
        kv_heads: 2,
        head_dim: 256,
        expert_inter: 512,
        experts: 256,
        top_k: 8,
        rope_theta: 1e7,
        rms_eps: 1e-6,
        oss: None,
        qk_norm: true,
        hybrid: qwen35(16, 32, 128, 64, 512, true),
        llama4: None,
        deepseek: None,
    },
    Preset {
        name: "small-qwen3.5",
        about: "a small Qwen3.5-MoE geometry for tests: 8 layers (6 Gated DeltaNet, 2 gated attention), 64 experts of 512→512→512, top-4 + a shared expert",
        arch: Arch::Qwen35Moe,
        vocab: 2048,
        hidden: 512,
        layers: 8,
        heads: 8,
        kv_heads: 2,
        head_dim: 64,
        expert_inter: 512,
        experts: 64,
        top_k: 4,
        rope_theta: 1e7,
        rms_eps: 1e-6,
        oss: None,
        qk_norm: true,
        hybrid: qwen35(4, 8, 64, 16, 512, true),
        llama4: None,
        deepseek: None,
    },
    Preset {
        name: "qwen3-next-80b",
        about: "Qwen3-Next-80B-A3B: 48 layers, 36 Gated DeltaNet and 12 gated attention, 512 experts of 2048→512→2048, top-10 + a shared expert",
        arch: Arch::Qwen3Next,
        vocab: 151_936,
        hidden: 2048,
        layers: 48,
        heads: 16,
        kv_heads: 2,
        head_dim: 256,
        expert_inter: 512,
        experts: 512,
        top_k: 10,
        rope_theta: 1e7,
        rms_eps: 1e-6,
        oss: None,
        qk_norm: true,
        hybrid: qwen35(16, 32, 128, 64, 512, false),
        llama4: None,
        deepseek: None,
    },
    Preset {
        name: "small-qwen3-next",
        about: "a small Qwen3-Next geometry for tests: 8 layers (6 Gated DeltaNet, 2 gated attention), 64 experts of 512→512→512, top-4 + a shared expert",
        arch: Arch::Qwen3Next,
        vocab: 2048,
        hidden: 512,
        layers: 8,
        heads: 8,
        kv_heads: 2,
        head_dim: 64,
        expert_inter: 512,
        experts: 64,
        top_k: 4,
        rope_theta: 1e7,
        rms_eps: 1e-6,
        oss: None,
        qk_norm: true,
        hybrid: qwen35(4, 8, 64, 16, 512, false),
        llama4: None,
        deepseek: None,
    },
    Preset {
        name: "llama4-scout",
        about: "Llama 4 Scout (17B-16E, 109B): 48 layers, every one MoE, 16 experts of 5120→8192→5120, top-1 + a shared expert; no rope every 4th layer",
        arch: Arch::Llama4,
        vocab: 202_048,
        hidden: 5120,
        layers: 48,
        heads: 40,
        kv_heads: 8,
        head_dim: 128,
        expert_inter: 8192,
        experts: 16,
        top_k: 1,
        rope_theta: 5e5,
        rms_eps: 1e-5,
        oss: None,
        qk_norm: false,
        hybrid: None,
        llama4: Some(Llama4Geom {
            moe_step: 1,
            dense_inter: 16_384,
            qk_norm: true,
            llama3: Some((16.0, 1.0, 1.0, 8192.0)),
        }),
        deepseek: None,
    },
    Preset {
        name: "llama4-maverick",
        about: "Llama 4 Maverick (17B-128E, 400B): 48 layers, MoE every second, 128 experts of 5120→8192→5120, top-1 + a shared expert, dense MLPs of 16384; no rope every 4th layer",
        arch: Arch::Llama4,
        vocab: 202_048,
        hidden: 5120,
        layers: 48,
        heads: 40,
        kv_heads: 8,
        head_dim: 128,
        expert_inter: 8192,
        experts: 128,
        top_k: 1,
        rope_theta: 5e5,
        rms_eps: 1e-5,
        oss: None,
        qk_norm: false,
        hybrid: None,
        llama4: Some(Llama4Geom {
            moe_step: 2,
            dense_inter: 16_384,
            qk_norm: false,
            llama3: None,
        }),
        deepseek: None,
    },
    Preset {
        name: "small-llama4",
        about: "a small Llama 4 geometry for tests: 8 layers, MoE every second, 32 experts of 512→512→512, top-1 + a shared expert, dense MLPs of 1024",
        arch: Arch::Llama4,
        vocab: 2048,
        hidden: 512,
        layers: 8,
        heads: 8,
        kv_heads: 2,
        head_dim: 64,
        expert_inter: 512,
        experts: 32,
        top_k: 1,
        rope_theta: 5e5,
        rms_eps: 1e-5,
        oss: None,
        qk_norm: false,
        hybrid: None,
        llama4: Some(Llama4Geom {
            moe_step: 2,
            dense_inter: 1024,
            qk_norm: true,
            llama3: Some((16.0, 1.0, 1.0, 8192.0)),
        }),
        deepseek: None,
    },
    Preset {
        name: "deepseek-v3",
        about: "DeepSeek-V3 / R1 (671B): 61 layers (3 dense), multi-head latent attention (128 heads, kv_lora 512), 256 experts of 7168→2048→7168 in 8 groups, top-8 + 1 shared",
        arch: Arch::DeepseekV3,
        vocab: 129_280,
        hidden: 7168,
        layers: 61,
        heads: 128,
        kv_heads: 128,
        head_dim: 192,
        expert_inter: 2048,
        experts: 256,
        top_k: 8,
        rope_theta: 10_000.0,
        rms_eps: 1e-6,
        oss: None,
        qk_norm: false,
        hybrid: None,
        llama4: None,
        deepseek: deepseek(
            Routing {
                sigmoid: true,
                n_group: 8,
                topk_group: 4,
                scale: 2.5,
                gate_input: false,
            },
            3,
            (40.0, 4096, 32.0, 1.0),
        ),
    },
    Preset {
        name: "kimi-k2",
        about: "Kimi K2 (1T): DeepSeek-V3's architecture with 64 heads, 384 experts of 7168→2048→7168 (no groups), top-8 + 1 shared, 1 dense layer",
        arch: Arch::DeepseekV3,
        vocab: 163_840,
        hidden: 7168,
        layers: 61,
        heads: 64,
        kv_heads: 64,
        head_dim: 192,
        expert_inter: 2048,
        experts: 384,
        top_k: 8,
        rope_theta: 50_000.0,
        rms_eps: 1e-6,
        oss: None,
        qk_norm: false,
        hybrid: None,
        llama4: None,
        deepseek: deepseek(
            Routing {
                sigmoid: true,
                n_group: 1,
                topk_group: 1,
                scale: 2.827,
                gate_input: false,
            },
            1,
            (32.0, 4096, 1.0, 1.0),
        ),
    },
    Preset {
        name: "small-deepseek",
        about: "a small DeepSeek-V3 geometry for tests: 6 layers (1 dense), latent attention (8 heads, kv_lora 64), 64 experts of 512→256→512 in 4 groups, top-4 + 1 shared",
        arch: Arch::DeepseekV3,
        vocab: 2048,
        hidden: 512,
        layers: 6,
        heads: 8,
        kv_heads: 8,
        head_dim: 96,
        expert_inter: 256,
        experts: 64,
        top_k: 4,
        rope_theta: 10_000.0,
        rms_eps: 1e-6,
        oss: None,
        qk_norm: false,
        hybrid: None,
        llama4: None,
        deepseek: Some(DeepSeek {
            mla: Some(Mla {
                q_lora: 128,
                kv_lora: 64,
                nope: 64,
                rope: 32,
                v: 64,
            }),
            routing: Routing {
                sigmoid: true,
                n_group: 4,
                topk_group: 2,
                scale: 2.5,
                gate_input: false,
            },
            first_dense: 1,
            dense_inter: 1024,
            shared_inter: 256,
            yarn: Some((4.0, 1024, 32.0, 1.0)),
            rot_dim: 32,
            attn_bias: false,
        }),
    },
    Preset {
        name: "glm-4.5",
        about: "GLM-4.5 (355B): 92 layers (3 dense), 96 heads / 8 kv of 128 (half rotated), 160 experts of 5120→1536→5120, top-8 + 1 shared",
        arch: Arch::Glm4Moe,
        vocab: 151_552,
        hidden: 5120,
        layers: 92,
        heads: 96,
        kv_heads: 8,
        head_dim: 128,
        expert_inter: 1536,
        experts: 160,
        top_k: 8,
        rope_theta: 1e6,
        rms_eps: 1e-5,
        oss: None,
        qk_norm: true,
        hybrid: None,
        llama4: None,
        deepseek: glm(2.5, 3, 12_288, 1536),
    },
    Preset {
        name: "glm-4.5-air",
        about: "GLM-4.5-Air (106B): 46 layers (1 dense), 96 heads / 8 kv of 128 (half rotated), 128 experts of 4096→1408→4096, top-8 + 1 shared",
        arch: Arch::Glm4Moe,
        vocab: 151_552,
        hidden: 4096,
        layers: 46,
        heads: 96,
        kv_heads: 8,
        head_dim: 128,
        expert_inter: 1408,
        experts: 128,
        top_k: 8,
        rope_theta: 1e6,
        rms_eps: 1e-5,
        oss: None,
        qk_norm: false,
        hybrid: None,
        llama4: None,
        deepseek: glm(1.0, 1, 10_944, 1408),
    },
    Preset {
        name: "small-glm",
        about: "a small GLM-4.5 geometry for tests: 6 layers (1 dense), 8 heads / 2 kv of 64 (half rotated), 64 experts of 512→256→512, top-4 + 1 shared",
        arch: Arch::Glm4Moe,
        vocab: 2048,
        hidden: 512,
        layers: 6,
        heads: 8,
        kv_heads: 2,
        head_dim: 64,
        expert_inter: 256,
        experts: 64,
        top_k: 4,
        rope_theta: 1e6,
        rms_eps: 1e-5,
        oss: None,
        qk_norm: true,
        hybrid: None,
        llama4: None,
        deepseek: Some(DeepSeek {
            rot_dim: 32,
            ..glm(1.5, 1, 1024, 256).unwrap()
        }),
    },
];

/// Looks a preset up by name.
pub fn preset(name: &str) -> Result<&'static Preset> {
    PRESETS.iter().find(|p| p.name == name).ok_or_else(|| {
        let names: Vec<&str> = PRESETS.iter().map(|p| p.name).collect();
        Error::UnknownName {
            what: "preset",
            name: name.into(),
            known: names.join(", "),
        }
    })
}

/// Options of [`synth`].
#[derive(Clone, Debug)]
pub struct SynthOptions {
    /// Override the number of layers.
    pub layers: Option<usize>,
    /// Type of every matrix.
    pub quant: DType,
    /// Record alignment.
    pub align: u64,
    /// Seed of the random weights.
    pub seed: u64,
    /// Write experts stacked per layer (`ffn_gate_exps` `[E, I, H]`, as
    /// llama.cpp's converters do) instead of one aligned record per expert:
    /// for measuring what the packed layout gains.
    pub stacked: bool,
}

impl Default for SynthOptions {
    fn default() -> Self {
        SynthOptions {
            layers: None,
            quant: DType::Q4_0,
            align: 4096,
            seed: 0,
            stacked: false,
        }
    }
}

impl Preset {
    /// Layers of the real model.
    pub fn layers(&self) -> usize {
        self.layers
    }

    /// Rows of each expert's gate and up projections.
    pub fn expert_inter(&self) -> usize {
        self.expert_inter
    }

    /// Intermediate sizes of the dense layers, the experts and the shared
    /// expert.
    pub fn ffn_sizes(&self) -> FfnSizes {
        FfnSizes {
            dense: self
                .deepseek
                .map(|d| d.dense_inter)
                .or(self.llama4.map(|l| l.dense_inter))
                .unwrap_or(0),
            expert: self.expert_inter,
            shared: self
                .hybrid
                .map(|h| h.shared_inter)
                .or(self.deepseek.map(|d| d.shared_inter))
                .or(self.llama4.map(|_| self.expert_inter)),
        }
    }

    /// The config of this geometry with `layers` layers.
    pub fn config(&self, layers: usize) -> Config {
        let ds = self.deepseek;
        let yarn = ds.and_then(|d| d.yarn).map(|y| {
            let (factor, orig_ctx, beta_fast, beta_slow) = y;
            Yarn {
                factor,
                orig_ctx,
                beta_fast,
                beta_slow,
                attn_factor: 1.0,
                truncate: true,
            }
        });
        // gpt-oss's YaRN scales cos and sin, unrounded.
        let oss_yarn = self.oss.map(|o| Yarn {
            factor: o.yarn.0,
            orig_ctx: o.yarn.1,
            beta_fast: 32.0,
            beta_slow: 1.0,
            attn_factor: Yarn::mscale(o.yarn.0, 1.0),
            truncate: false,
        });
        Config {
            arch: self.arch,
            vocab: self.vocab,
            hidden: self.hidden,
            n_layers: layers,
            n_heads: self.heads,
            n_kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            rope_theta: self.rope_theta,
            rot_dim: match (self.hybrid, ds) {
                (Some(h), _) => h.rot_dim,
                (_, Some(d)) => d.rot_dim,
                _ => self.head_dim,
            },
            rope_style: if ds.is_some_and(|d| d.mla.is_some()) || self.llama4.is_some() {
                RopeStyle::Interleaved
            } else {
                RopeStyle::Neox
            },
            rms_eps: self.rms_eps,
            n_experts: self.experts,
            top_k: self.top_k,
            norm_topk_prob: self.llama4.is_none(),
            moe_layers: (0..layers)
                .map(|i| {
                    ds.is_none_or(|d| i >= d.first_dense)
                        && self.llama4.is_none_or(|l| (i + 1) % l.moe_step == 0)
                })
                .collect(),
            windows: (0..layers)
                .map(|i| self.oss.filter(|_| i % 2 == 0).map(|o| o.window))
                .collect(),
            clip_qkv: None,
            tie_embeddings: false,
            eos: vec![],
            bos: None,
            max_ctx: Some(32_768),
            mixers: (0..layers)
                .map(|i| match self.hybrid {
                    Some(h) if (i + 1) % h.full_every != 0 => Mixer::Linear,
                    _ => Mixer::Attention,
                })
                .collect(),
            attn_gate: self.hybrid.is_some(),
            linear: self.hybrid.map(|h| h.linear),
            config_top_k: self.top_k,
            routing: match (ds, self.llama4) {
                (Some(d), _) => d.routing,
                (_, Some(_)) => Routing {
                    gate_input: true,
                    ..Routing::default()
                },
                _ => Routing::default(),
            },
            mla: ds.and_then(|d| d.mla),
            yarn: yarn.or(oss_yarn),
            // DeepSeek's q·k scale: YaRN's mscale (mscale_all_dim 1) squared.
            attn_scale: yarn.map(|y| y.qk_scale(1.0, self.head_dim)),
            mtp_layers: 0,
            // Llama 4 as llama.cpp reads it: chunks of 8192 on the rope
            // layers, no rope every 4th layer with temperature tuning.
            rope_factors: self.llama4.and_then(|l| l.llama3).map(|(f, lo, hi, orig)| {
                crate::config::llama3_factors(self.rope_theta, self.head_dim, f, lo, hi, orig)
            }),
            llama4: self.llama4.map(|l| Llama4Attn {
                rope_layers: (0..layers).map(|i| (i + 1) % 4 != 0).collect(),
                chunk: Some(8192),
                temperature: Some((8192.0, 0.1)),
                qk_norm: l.qk_norm,
            }),
            swiglu: self.oss.map(|_| crate::config::ClampedSwiglu {
                alpha: 1.702,
                limit: 7.0,
            }),
        }
    }
}

fn seed_of(name: &str, seed: u64) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(name.as_bytes(), seed)
}

/// Writes a random-weight model of `preset`'s geometry to `out`.
pub fn synth(
    preset: &Preset,
    opts: &SynthOptions,
    out: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<PackSummary> {
    let layers = opts.layers.unwrap_or(preset.layers);
    if layers == 0 || layers > 4096 {
        return Err(Error::Invalid(format!(
            "{layers} layers is out of range (1..=4096)"
        )));
    }
    let c = preset.config(layers);
    let q = opts.quant;
    let bs = q.block_size();
    let vd = c.linear.map_or(c.hidden, |l| l.v_heads * l.v_dim);
    let si = preset.hybrid.map_or(c.hidden, |h| h.shared_inter);
    // Latent attention's inputs: the compressed query and latent, a head's
    // key width (k_b's rows) and all heads' values (o's rows).
    let ds_dims = preset.deepseek.map_or([c.hidden; 5], |d| match d.mla {
        Some(m) => [
            m.q_lora.max(c.hidden),
            m.kv_lora,
            m.nope,
            c.n_heads * m.v,
            d.dense_inter,
        ],
        None => [c.hidden, c.hidden, c.hidden, c.hidden, d.dense_inter],
    });
    for d in [
        c.hidden,
        preset.expert_inter,
        c.n_heads * c.head_dim,
        vd,
        si,
    ]
    .into_iter()
    .chain(ds_dims)
    {
        if d % bs != 0 {
            return Err(Error::Unsupported(format!(
                "{q:?} needs rows that are multiples of {bs}; {} has a dimension of {d}",
                preset.name
            )));
        }
    }
    let m = |name: String, rows: usize, cols: usize, scale: f32| Item {
        src: Src::Random {
            seed: seed_of(&name, opts.seed),
            scale,
        },
        spec: spec(name, q, vec![rows, cols], 0),
        convert: false,
    };
    // Small f32 vectors and tensors of random values.
    let f32s = |name: String, len: usize, scale: f32| Item {
        src: Src::Random {
            seed: seed_of(&name, opts.seed),
            scale,
        },
        spec: spec(name, DType::F32, vec![len], 0),
        convert: false,
    };
    // Norm weights are all ones.
    let v = |name: String, len: usize| Item {
        spec: spec(name, DType::F32, vec![len], 0),
        src: Src::Const(1.0),
        convert: false,
    };
    let (h, qd, kd, i) = (
        c.hidden,
        c.n_heads * c.head_dim,
        c.n_kv_heads * c.head_dim,
        preset.expert_inter,
    );
    // Weights of order 1/sqrt(width) keep activations finite; the router
    // is sharper so that routing varies from token to token.
    let s = 1.0 / (h as f32).sqrt();
    let mut dense = vec![m("token_embd.weight".into(), c.vocab, h, 1.0)];
    let mut experts = Vec::new();
    for l in 0..layers {
        let b = format!("blk.{l}.");
        dense.push(v(format!("{b}attn_norm.weight"), c.hidden));
        match (c.mixers[l], c.linear) {
            (Mixer::Linear, Some(la)) => {
                let (cd, vd) = (la.conv_dim(), la.v_heads * la.v_dim);
                dense.push(m(format!("{b}attn_qkv.weight"), cd, h, s));
                dense.push(m(format!("{b}attn_gate.weight"), vd, h, s));
                if c.arch == Arch::Qwen3Next {
                    // llama.cpp's converter keeps Qwen3-Next's b and a fused.
                    dense.push(m(format!("{b}ssm_ba.weight"), 2 * la.v_heads, h, s));
                } else {
                    dense.push(m(format!("{b}ssm_beta.weight"), la.v_heads, h, s));
                    dense.push(m(format!("{b}ssm_alpha.weight"), la.v_heads, h, s));
                }
                let mut conv = f32s(format!("{b}ssm_conv1d.weight"), cd * la.conv_kernel, 0.5);
                conv.spec.shape = vec![cd, la.conv_kernel];
                dense.push(conv);
                dense.push(f32s(format!("{b}ssm_dt.bias"), la.v_heads, 0.5));
                // A = -exp(A_log) in about [-1, -0.5]: state neither forgotten
                // at once nor kept forever.
                dense.push(Item {
                    spec: spec(format!("{b}ssm_a"), DType::F32, vec![la.v_heads], 0),
                    src: Src::Const(-0.75),
                    convert: false,
                });
                dense.push(v(format!("{b}ssm_norm.weight"), la.v_dim));
                dense.push(m(
                    format!("{b}ssm_out.weight"),
                    h,
                    vd,
                    1.0 / (vd as f32).sqrt(),
                ));
            }
            _ if c.mla.is_some() => {
                let a = c.mla.expect("checked by the guard");
                let heads = c.n_heads;
                let qk = a.nope + a.rope;
                if a.q_lora > 0 {
                    dense.push(m(format!("{b}attn_q_a.weight"), a.q_lora, h, s));
                    dense.push(v(format!("{b}attn_q_a_norm.weight"), a.q_lora));
                    let sq = 1.0 / (a.q_lora as f32).sqrt();
                    dense.push(m(format!("{b}attn_q_b.weight"), heads * qk, a.q_lora, sq));
                } else {
                    dense.push(m(format!("{b}attn_q.weight"), heads * qk, h, s));
                }
                dense.push(m(
                    format!("{b}attn_kv_a_mqa.weight"),
                    a.kv_lora + a.rope,
                    h,
                    s,
                ));
                dense.push(v(format!("{b}attn_kv_a_norm.weight"), a.kv_lora));
                // llama.cpp's absorbed layout: per head, k_b transposed
                // (kv_lora rows of nope) and v_b (v rows of kv_lora).
                let sl = 1.0 / (a.kv_lora as f32).sqrt();
                let mut kb = m(
                    format!("{b}attn_k_b.weight"),
                    heads * a.kv_lora,
                    a.nope,
                    1.0 / (a.nope as f32).sqrt(),
                );
                kb.spec.shape = vec![heads, a.kv_lora, a.nope];
                dense.push(kb);
                let mut vb = m(format!("{b}attn_v_b.weight"), heads * a.v, a.kv_lora, sl);
                vb.spec.shape = vec![heads, a.v, a.kv_lora];
                dense.push(vb);
                dense.push(m(
                    format!("{b}attn_output.weight"),
                    h,
                    heads * a.v,
                    1.0 / ((heads * a.v) as f32).sqrt(),
                ));
            }
            _ => {
                let q_rows = if c.attn_gate { 2 * qd } else { qd };
                dense.push(m(format!("{b}attn_q.weight"), q_rows, h, s));
                dense.push(m(format!("{b}attn_k.weight"), kd, h, s));
                dense.push(m(format!("{b}attn_v.weight"), kd, h, s));
                dense.push(m(format!("{b}attn_output.weight"), h, qd, s));
                if preset.oss.is_some() {
                    // Biases on every projection and a sink per head.
                    dense.push(f32s(format!("{b}attn_output.bias"), h, 0.1));
                    dense.push(f32s(format!("{b}attn_sinks.weight"), c.n_heads, 1.0));
                }
                if preset.deepseek.is_some_and(|d| d.attn_bias) || preset.oss.is_some() {
                    dense.push(f32s(format!("{b}attn_q.bias"), qd, 0.1));
                    dense.push(f32s(format!("{b}attn_k.bias"), kd, 0.1));
                    dense.push(f32s(format!("{b}attn_v.bias"), kd, 0.1));
                }
                if preset.qk_norm {
                    dense.push(v(format!("{b}attn_q_norm.weight"), c.head_dim));
                    dense.push(v(format!("{b}attn_k_norm.weight"), c.head_dim));
                }
            }
        }
        let ffn_norm = if c.arch.is_hybrid() || matches!(c.arch, Arch::Glm4Moe | Arch::GptOss) {
            "post_attention_norm"
        } else {
            "ffn_norm"
        };
        dense.push(v(format!("{b}{ffn_norm}.weight"), c.hidden));
        // Gate, up and down of an MLP `w` wide, named `ffn_gate{suffix}`...
        let mlp = |suffix: &str, w: usize| {
            [
                m(format!("{b}ffn_gate{suffix}.weight"), w, h, s),
                m(format!("{b}ffn_up{suffix}.weight"), w, h, s),
                m(
                    format!("{b}ffn_down{suffix}.weight"),
                    h,
                    w,
                    1.0 / (w as f32).sqrt(),
                ),
            ]
        };
        if let (false, Some(d)) = (c.moe_layers[l], preset.deepseek) {
            dense.extend(mlp("", d.dense_inter));
            continue;
        }
        if let Some(g) = preset.llama4 {
            if !c.moe_layers[l] {
                dense.extend(mlp("", g.dense_inter));
                continue;
            }
            // The shared expert, ungated, as wide as the routed ones.
            dense.extend(mlp("_shexp", i));
        }
        if let Some(d) = preset.deepseek {
            dense.extend(mlp("_shexp", d.shared_inter));
            // Selection bias of the sigmoid router.
            dense.push(f32s(format!("{b}exp_probs_b.bias"), c.n_experts, 0.05));
        }
        if let Some(hy) = preset.hybrid {
            dense.extend(mlp("_shexp", hy.shared_inter));
            dense.push(f32s(format!("{b}ffn_gate_inp_shexp.weight"), h, s));
        }
        dense.push(m(
            format!("{b}ffn_gate_inp.weight"),
            c.n_experts,
            h,
            4.0 * s,
        ));
        if preset.oss.is_some() {
            // The router's bias and the experts', resident `[E, rows]`.
            dense.push(f32s(format!("{b}ffn_gate_inp.bias"), c.n_experts, 0.1));
            for (n, rows) in [("gate", i), ("up", i), ("down", h)] {
                let mut it = f32s(format!("{b}ffn_{n}_exps.bias"), c.n_experts * rows, 0.1);
                it.spec.shape = vec![c.n_experts, rows];
                dense.push(it);
            }
        }
        if opts.stacked {
            let ne = c.n_experts;
            for mut it in mlp("_exps", i) {
                it.spec.shape.insert(0, ne);
                dense.push(it);
            }
            continue;
        }
        experts.push(
            (0..c.n_experts)
                .map(|e| {
                    let mut r = mlp(&format!(".{e}"), i);
                    r[0].spec.align = opts.align;
                    r
                })
                .collect(),
        );
    }
    dense.push(v("output_norm.weight".into(), c.hidden));
    dense.push(m("output.weight".into(), c.vocab, h, s));
    if let Some(f) = &c.rope_factors {
        dense.push(pack::rope_freqs(f));
    }
    let source = format!("synth:{} seed {}", preset.name, opts.seed);
    let mut meta = gguf_meta::hparams(&c, preset.ffn_sizes(), &source);
    meta.extend(gguf_meta::byte_vocab(c.vocab));
    let plan = Plan {
        config: &c,
        dense,
        experts,
        tokenizer: None,
        source,
        align: opts.align,
        expert_quant: None,
        meta,
    };
    pack::write(&plan, None, out, progress)
}
