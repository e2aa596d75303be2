#!/usr/bin/env python3
"""Oracle-fixture generator for sluice.

Builds tiny *random* Mixture-of-Experts causal LMs with Hugging Face
`transformers`, saves them exactly as `save_pretrained` writes them, and records
the logits that transformers computes for a fixed token sequence.  The Rust
forward pass is tested against these numbers.  It also writes GGUF versions of
some models (llama.cpp `convert_hf_to_gguf.py` conventions) with their own
oracle logits, and raw quant-block test vectors for the GGML block formats.

Nothing is downloaded: the tokenizer is a tiny byte-level BPE trained here on a
fixed corpus, the weights come from a seeded torch RNG.

Set-up (outside the repository; exact versions in scripts/requirements-fixtures.txt):

    python3 -m venv /work/venv
    /work/venv/bin/pip install -r scripts/requirements-fixtures.txt

Usage
-----
Regenerate the whole committed fixture set (models, GGUF files, quant vectors,
README.md) -- deterministic, re-running gives identical weights and logits:

    /work/venv/bin/python scripts/make_fixtures.py --out tests/fixtures

Only some of the built-in fixtures (names as in `--list`):

    /work/venv/bin/python scripts/make_fixtures.py --out tests/fixtures --only qwen3_moe,mixtral.f16.gguf
    /work/venv/bin/python scripts/make_fixtures.py --list

One extra model with another seed and/or other shapes, written to a directory of
your choice (config.json, safetensors, tokenizer.json, expected.json, and with
--gguf also DIR/model.<type>.gguf + DIR/model.<type>.expected.json):

    /work/venv/bin/python scripts/make_fixtures.py --arch qwen3_moe --seed 7 \\
        --hidden 104 --experts 9 --top-k 2 --layers 4 --heads 4 --kv-heads 1 \\
        --head-dim 20 --moe-inter 44 --vocab 355 --only-one /tmp/extra_qwen3 --gguf q8_0

Shape flags (all optional; defaults are those of the built-in fixture of that
arch): --hidden --experts --top-k --layers --heads --kv-heads --head-dim
--moe-inter --inter --shared-inter --vocab --init-range --rope-theta
--mlp-only-layers "1,3" --norm-topk-prob {0,1} --tie {0,1} --dtype {float32,bfloat16}
--layout {per_expert,fused} --max-shard-size 200KB.

Robustness: for every MoE layer and every position the gap between the k-th and
(k+1)-th largest router probability must exceed --min-gap (1e-3); otherwise the
next seed is tried (the seed actually used is recorded in expected.json and the
README).  For GGUF files the check is done on the model with the dequantized
weights as well.

Oracle convention: float32, model.eval(), torch.no_grad(),
attn_implementation="eager", experts_implementation="eager", one sequence,
no padding, positions 0..T-1; logits for every position.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

import gguf
import safetensors
import tokenizers
import transformers
from gguf import GGMLQuantizationType as QT
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models as tok_models, pre_tokenizers, trainers

# ----------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TOKENIZER_VOCAB = 300  # 3 specials + 256 byte symbols + 41 merges
TOKENIZER_CORPUS = (
    ["the cat sat on the mat. the dog ate the rat!"] * 3
    + [
        "a quick brown fox jumps over the lazy dog",
        "mixture of experts streams weights from disk",
        "the the the cat cat sat",
    ]
)
PROMPT = "the cat sat on the mat. the dog ate the rat!"


def build_tokenizer() -> Tokenizer:
    """Byte-level BPE (GPT-2 pre-tokenizer regex), 300 tokens, deterministic."""
    tok = Tokenizer(tok_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TOKENIZER_CORPUS, trainer)
    assert tok.get_vocab_size() == TOKENIZER_VOCAB, tok.get_vocab_size()
    return tok


def prompt_ids(tok: Tokenizer) -> list[int]:
    ids = tok.encode(PROMPT).ids
    assert 11 <= len(ids) <= 13 and len(set(ids)) < len(ids), ids
    return ids


# ----------------------------------------------------------------------------
# Model specs
# ----------------------------------------------------------------------------

ARCH_CLASSES = {
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM"),
    "qwen3_5_moe": ("Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM"),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM"),
    "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM"),
    "qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM"),
    "llama4": ("Llama4TextConfig", "Llama4ForCausalLM"),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM"),
}

# Geometry of the built-in fixtures.  Keys are generic; make_config() maps them
# onto each architecture's config fields.
BASE = {
    "qwen3_moe": dict(
        arch="qwen3_moe", seed=1000, vocab=307, hidden=72, layers=3, heads=4, kv_heads=2,
        head_dim=24, experts=10, top_k=3, moe_inter=24, inter=56, norm_topk_prob=True,
        mlp_only_layers=[1], rope_theta=50000.0, tie=False, init_range=0.15, rms_eps=1e-6,
    ),
    "qwen2_moe": dict(
        arch="qwen2_moe", seed=2000, vocab=329, hidden=80, layers=3, heads=5, kv_heads=1,
        head_dim=None, experts=8, top_k=2, moe_inter=28, shared_inter=56, inter=44,
        norm_topk_prob=False, mlp_only_layers=[2], rope_theta=10000.0, tie=False,
        init_range=0.15, rms_eps=1e-6,
    ),
    "mixtral": dict(
        arch="mixtral", seed=3000, vocab=309, hidden=60, layers=3, heads=6, kv_heads=2,
        head_dim=None, experts=6, top_k=2, moe_inter=30, rope_theta=1e6, tie=False,
        init_range=0.15, rms_eps=1e-5,
    ),
    "olmoe": dict(
        arch="olmoe", seed=4000, vocab=313, hidden=84, layers=3, heads=6, kv_heads=2,
        head_dim=None, experts=12, top_k=4, moe_inter=18, norm_topk_prob=False,
        rope_theta=10000.0, tie=True, init_range=0.2, rms_eps=1e-5,
    ),
    # Gated DeltaNet (linear) and gated full attention alternating; value heads twice the
    # key heads and of another width, so a head-mapping or transpose mistake shows
    "qwen3_5_moe": dict(
        arch="qwen3_5_moe", seed=5000, vocab=311, hidden=64, layers=4, heads=4, kv_heads=2,
        head_dim=32, experts=8, top_k=2, moe_inter=32, shared_inter=48, rope_theta=10000.0,
        partial_rotary=0.25, layer_types=["linear_attention", "full_attention", "linear_attention",
                                          "full_attention"],
        lin_k_heads=2, lin_v_heads=4, lin_k_dim=16, lin_v_dim=24, conv_kernel=4,
        tie=False, init_range=0.15, rms_eps=1e-6,
    ),
    # multi-head latent attention with a compressed query, YaRN (its attention factor and the
    # mscale of the softmax scale both away from 1), sigmoid routing with a selection bias over
    # 4 groups of which 2 are chosen, two shared experts, the first layer dense
    "deepseek_v3": dict(
        arch="deepseek_v3", seed=6000, vocab=317, hidden=64, layers=3, heads=4, kv_heads=4,
        head_dim=None, experts=8, top_k=3, moe_inter=20, n_shared=2, inter=48, n_group=4,
        topk_group=2, routed_scaling=2.5, norm_topk_prob=True, first_dense=1, q_lora=24,
        kv_lora=32, nope=16, rope=8, v_head=12, rope_theta=10000.0,
        yarn=dict(factor=4.0, original_max_position_embeddings=64, mscale=1.0, mscale_all_dim=0.7,
                  beta_fast=32.0, beta_slow=1.0),
        tie=False, init_range=0.15, rms_eps=1e-6,
    ),
    # GQA with q/k/v biases and per-head q/k norms, half the head rotated, sigmoid routing with
    # a selection bias over 2 groups of which 1 is chosen, scaled, one shared expert, the first
    # layer dense
    "glm4_moe": dict(
        arch="glm4_moe", seed=8000, vocab=307, hidden=64, layers=3, heads=4, kv_heads=2,
        head_dim=24, experts=8, top_k=3, moe_inter=24, n_shared=1, inter=56, n_group=2,
        topk_group=1, routed_scaling=1.8, norm_topk_prob=True, first_dense=1, partial_rotary=0.5,
        qk_norm=True, attention_bias=True, rope_theta=10000.0, tie=False, init_range=0.15,
        rms_eps=1e-5,
    ),
    # Qwen3.5's layers with the DeltaNet inputs fused per key head (in_proj_qkvz, in_proj_ba):
    # three value heads per key head and value heads narrower than key heads, so a grouping
    # mistake shows; the default layer pattern (every 4th full attention) over 5 layers, one
    # dense layer, no renormalization of the top-k
    "qwen3_next": dict(
        arch="qwen3_next", seed=9000, vocab=313, hidden=64, layers=5, heads=4, kv_heads=2,
        head_dim=32, experts=8, top_k=3, moe_inter=24, shared_inter=40, inter=56,
        norm_topk_prob=False, mlp_only_layers=[2], rope_theta=10000.0, partial_rotary=0.25,
        layer_types=None, lin_k_heads=2, lin_v_heads=6, lin_k_dim=16, lin_v_dim=12, conv_kernel=4,
        tie=False, init_range=0.15, rms_eps=1e-6,
    ),
    # Llama 4 (Scout's switches): MoE every second layer with a shared expert and top-1
    # sigmoid routing applied to the input, a no-rope layer every 4th with temperature-tuned
    # queries, chunked attention and L2 q/k norm on the rope layers, Llama 3 rope scaling.
    # Chunks of 4 and a floor scale of 4 so that the 13-token prompt crosses both; rope
    # scaling bands that split the 8 frequencies of a 16-wide head
    "llama4": dict(
        arch="llama4", seed=9500, vocab=307, hidden=64, layers=4, heads=4, kv_heads=2,
        head_dim=16, experts=4, top_k=1, moe_inter=32, inter=48, moe_step=2, nope_every=4,
        chunk=4, temp_tuning=True, floor_scale=4, attn_scale=0.5, qk_norm=True,
        rope_theta=500000.0, llama3=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                         original_max_position_embeddings=16),
        tie=False, init_range=0.15, rms_eps=1e-5,
    ),
    # gpt-oss: sinks, biased q/k/v/o, sliding window of 4 on even layers (the prompt crosses it),
    # YaRN unrounded (truncate false) over an original context of 64 so that the ramp falls
    # between dimensions, router bias + softmax over the chosen, biased experts, and a clamped
    # SwiGLU whose limit (0.8) and alpha (1.5) are small/odd enough to be exercised and read
    "gpt_oss": dict(
        arch="gpt_oss", seed=9700, vocab=307, hidden=64, layers=4, heads=4, kv_heads=2,
        head_dim=16, experts=6, top_k=2, moe_inter=32, window=4, swiglu_limit=0.8,
        swiglu_alpha=1.5, rope_theta=10000.0,
        yarn=dict(factor=4.0, beta_fast=8.0, beta_slow=1.0, truncate=False,
                  original_max_position_embeddings=64),
        tie=False, init_range=0.15, rms_eps=1e-5,
    ),
}

# safetensors model fixtures: name -> spec (BASE entry + overrides)
MODEL_FIXTURES = {
    "qwen3_moe": dict(BASE["qwen3_moe"]),
    # identical weights (same seed) saved with save_original_format=False:
    # stacked experts mlp.experts.gate_up_proj [E,2I,H] / mlp.experts.down_proj [E,H,I]
    "qwen3_moe_fused": dict(BASE["qwen3_moe"], layout="fused"),
    # another seed, weights stored as bfloat16; config.json rewritten in the transformers-4 /
    # hub style (num_experts, top-level rope_theta, torch_dtype) -- transformers 5 reads it identically
    "qwen3_moe_bf16": dict(BASE["qwen3_moe"], seed=1100, dtype="bfloat16", legacy_config=True),
    "qwen2_moe": dict(BASE["qwen2_moe"]),
    # second qwen2_moe (other seed, smaller geometry), sharded into several files
    "qwen2_moe_sharded": dict(
        BASE["qwen2_moe"], seed=2100, vocab=303, hidden=56, heads=7, kv_heads=7, experts=6, top_k=3,
        moe_inter=20, shared_inter=44, inter=52, mlp_only_layers=[0], norm_topk_prob=True,
        max_shard_size="120KB",
    ),
    "mixtral": dict(BASE["mixtral"]),
    "olmoe": dict(BASE["olmoe"]),
    "qwen3_5_moe": dict(BASE["qwen3_5_moe"]),
    # a multimodal checkpoint as the hub ships them (Qwen3_5MoeForConditionalGeneration):
    # text weights under model.language_model., a (tiny) vision tower beside them; another
    # seed and the default layer pattern (three linear layers, then full attention)
    "qwen3_5_moe_vl": dict(BASE["qwen3_5_moe"], seed=5100, multimodal=True, layers=4,
                           layer_types=None, experts=6, top_k=3),
    "deepseek_v3": dict(BASE["deepseek_v3"]),
    # DeepSeek-V2-Lite's shape: an uncompressed query, no groups, no renormalization, plain
    # rope, one shared expert, two dense layers; other seed and widths
    "deepseek_v3_lite": dict(
        BASE["deepseek_v3"], seed=6100, vocab=301, hidden=48, layers=4, heads=3, kv_heads=3,
        experts=6, top_k=2, moe_inter=16, n_shared=1, inter=40, n_group=1, topk_group=1,
        routed_scaling=1.5, norm_topk_prob=False, first_dense=2, q_lora=None, kv_lora=20,
        nope=12, rope=4, v_head=16, yarn=None,
    ),
    "glm4_moe": dict(BASE["glm4_moe"]),
    # GLM-4.5-Air's switches: no q/k norm, no attention bias, no groups, no renormalization,
    # two dense layers; other seed and widths
    "glm4_moe_air": dict(
        BASE["glm4_moe"], seed=8100, vocab=301, hidden=48, heads=6, kv_heads=2, head_dim=16,
        experts=6, top_k=2, moe_inter=16, inter=40, n_group=1, topk_group=1, routed_scaling=1.0,
        norm_topk_prob=False, qk_norm=False, attention_bias=False, layers=4,
        first_dense=2,
    ),
    "qwen3_next": dict(BASE["qwen3_next"]),
    "llama4": dict(BASE["llama4"]),
    # Maverick's switches: no q/k norm, no temperature tuning, every layer MoE, top-2, plain
    # rope, its chunks of 8192 (longer than the prompt); other seed and widths
    "llama4_maverick": dict(
        BASE["llama4"], seed=9600, vocab=301, hidden=48, heads=6, kv_heads=2, head_dim=8,
        experts=6, top_k=2, moe_inter=24, moe_step=1, chunk=8192, temp_tuning=False,
        qk_norm=False, llama3=None, rope_theta=10000.0,
    ),
    "gpt_oss": dict(BASE["gpt_oss"]),
    # the published checkpoints' layout: experts as MXFP4 `*_blocks` + `*_scales` (quantized here in
    # numpy like gguf-py's quantizer), quantization_config quant_method "mxfp4"; the oracle is
    # transformers on the weights transformers' own MXFP4 dequantizer makes of them
    "gpt_oss_mxfp4": dict(BASE["gpt_oss"], seed=9750, mxfp4=True),
    # block-scaled FP8 as DeepSeek-V3/Kimi K2/GLM-4.5 publish it: every linear weight of the layers
    # (not the routers) F8_E4M3 with a `weight_scale_inv` grid, quantized per tile as the checkpoints
    # are (scale = amax / 448). Tiles smaller than the published 128x128 and not dividing the shapes,
    # so partial tiles and MLA's per-head slices that start mid-tile are exercised; f32 scales
    # (DeepSeek's) here, bf16 on the GLM one. Oracle: transformers on the weights its own FP8
    # dequantizer (`_dequantize_fp8_weight`) makes of the stored codes
    "deepseek_v3_fp8": dict(BASE["deepseek_v3"], seed=6200, fp8=dict(block=[16, 32], scales="float32")),
    "glm4_moe_fp8": dict(BASE["glm4_moe"], seed=8200, fp8=dict(block=[24, 40], scales="bfloat16")),
    # transformers' own spellings: stacked experts (save_original_format=False, `gate_up_proj` [E, 2I, H]
    # with `gate_up_proj_scale_inv` [E, 2, 3]: the up half starts mid-tile) and E8M0 scales (`ue8m0`)
    "qwen3_moe_fp8": dict(BASE["qwen3_moe"], seed=1300, layout="fused",
                          fp8=dict(block=[16, 32], scales="float8_e8m0fnu")),
    # compressed-tensors' FP8 (GLM-4.5-FP8's format): a bf16 `weight_scale` per output channel
    # ([rows, 1]), `quant_method` compressed-tensors with a channel strategy, no tile size given;
    # GLM-4.5-Air's switches
    "glm4_moe_fp8_channel": dict(
        BASE["glm4_moe"], seed=8300, vocab=301, hidden=48, heads=6, kv_heads=2, head_dim=16,
        experts=6, top_k=2, moe_inter=16, inter=40, n_group=1, topk_group=1, routed_scaling=1.0,
        norm_topk_prob=False, qk_norm=False, attention_bias=False, layers=4, first_dense=2,
        fp8=dict(block="channel", scales="bfloat16"),
    ),
    # gpt-oss-20b's published switches: limit 7, alpha 1.702 (defaults, not written), truncated
    # YaRN off (no rope scaling), explicit layer_types with full attention first; other seed and widths
    "gpt_oss_plain": dict(
        BASE["gpt_oss"], seed=9800, vocab=301, hidden=48, heads=6, kv_heads=2, head_dim=8,
        experts=5, top_k=3, moe_inter=24, swiglu_limit=None, swiglu_alpha=None, yarn=None,
        layer_types=["full_attention", "sliding_attention", "sliding_attention"], layers=3,
    ),
}

# GGUF fixtures: name -> (spec, quant type for 2-D/3-D weights)
GGUF_FIXTURES = {
    # same seed/geometry as models/qwen3_moe -> same weights (F16-rounded)
    "qwen3_moe.f16.gguf": (dict(BASE["qwen3_moe"]), "F16"),
    # own geometry: every matrix row length a multiple of 32 (96, 160), not a power of two
    "qwen3_moe.q8_0.gguf": (
        dict(BASE["qwen3_moe"], seed=1200, vocab=305, hidden=96, heads=4, kv_heads=2, head_dim=24,
             experts=5, top_k=2, moe_inter=96, inter=160, mlp_only_layers=[2]),
        "Q8_0",
    ),
    # own geometry: rows of 96 -> Q4_0; shared-expert down_proj rows of 56 -> F16 fallback
    "qwen2_moe.q4_0.gguf": (
        dict(BASE["qwen2_moe"], seed=2200, vocab=353, hidden=96, heads=6, kv_heads=2, experts=8,
             top_k=2, moe_inter=96, shared_inter=56, inter=160, mlp_only_layers=[1], init_range=0.12),
        "Q4_0",
    ),
    # same seed/geometry as models/mixtral; Q/K rows permuted for llama.cpp's interleaved rope
    "mixtral.f16.gguf": (dict(BASE["mixtral"], alignment=64), "F16"),
    # same seed/geometry as models/olmoe; tied embeddings -> no output.weight
    "olmoe.bf16.gguf": (dict(BASE["olmoe"]), "BF16"),
    # llama.cpp's qwen35moe conventions: value heads in tiled order, norms as 1 + w,
    # ssm_a = -exp(A_log); own seed
    "qwen3_5_moe.q8_0.gguf": (dict(BASE["qwen3_5_moe"], seed=5200), "Q8_0"),
}


def sigmoid_router_kw(spec: dict) -> dict:
    """Config fields of DeepSeek-V3's router, experts and leading dense layers (GLM-4.5's too)."""
    return dict(n_routed_experts=spec["experts"], moe_intermediate_size=spec["moe_inter"],
                intermediate_size=spec["inter"], n_shared_experts=spec["n_shared"],
                n_group=spec["n_group"], topk_group=spec["topk_group"],
                routed_scaling_factor=spec["routed_scaling"], norm_topk_prob=spec["norm_topk_prob"],
                first_k_dense_replace=spec["first_dense"])


def make_config(spec: dict):
    arch = spec["arch"]
    cfg_cls = getattr(transformers, ARCH_CLASSES[arch][0])
    kw = dict(
        vocab_size=spec["vocab"],
        hidden_size=spec["hidden"],
        num_hidden_layers=spec["layers"],
        num_attention_heads=spec["heads"],
        num_key_value_heads=spec["kv_heads"],
        num_experts_per_tok=spec["top_k"],
        max_position_embeddings=512,
        initializer_range=spec["init_range"],
        rms_norm_eps=spec["rms_eps"],
        tie_word_embeddings=spec["tie"],
        rope_parameters={"rope_type": "default", "rope_theta": float(spec["rope_theta"])},
        bos_token_id=0,
        eos_token_id=0,
    )
    if spec.get("head_dim"):
        kw["head_dim"] = spec["head_dim"]
    if arch == "qwen3_moe":
        kw.update(num_experts=spec["experts"], moe_intermediate_size=spec["moe_inter"],
                  intermediate_size=spec["inter"], norm_topk_prob=spec["norm_topk_prob"],
                  mlp_only_layers=list(spec.get("mlp_only_layers", [])), decoder_sparse_step=1,
                  attention_bias=False, use_sliding_window=False, sliding_window=None)
    elif arch == "qwen2_moe":
        kw.update(num_experts=spec["experts"], moe_intermediate_size=spec["moe_inter"],
                  intermediate_size=spec["inter"], shared_expert_intermediate_size=spec["shared_inter"],
                  norm_topk_prob=spec["norm_topk_prob"], mlp_only_layers=list(spec.get("mlp_only_layers", [])),
                  decoder_sparse_step=1, qkv_bias=True, use_sliding_window=False)
    elif arch == "mixtral":
        kw.update(num_local_experts=spec["experts"], intermediate_size=spec["moe_inter"], sliding_window=None)
    elif arch == "olmoe":
        kw.update(num_experts=spec["experts"], intermediate_size=spec["moe_inter"],
                  norm_topk_prob=spec["norm_topk_prob"], clip_qkv=None, attention_bias=False, pad_token_id=None)
    elif arch == "qwen3_5_moe":
        kw["rope_parameters"]["partial_rotary_factor"] = spec["partial_rotary"]
        kw.update(num_experts=spec["experts"], moe_intermediate_size=spec["moe_inter"],
                  shared_expert_intermediate_size=spec["shared_inter"],
                  linear_num_key_heads=spec["lin_k_heads"], linear_num_value_heads=spec["lin_v_heads"],
                  linear_key_head_dim=spec["lin_k_dim"], linear_value_head_dim=spec["lin_v_dim"],
                  linear_conv_kernel_dim=spec["conv_kernel"], attention_bias=False)
        if spec.get("layer_types"):
            kw["layer_types"] = list(spec["layer_types"])
    elif arch == "deepseek_v3":
        kw.update(sigmoid_router_kw(spec), q_lora_rank=spec["q_lora"],
                  kv_lora_rank=spec["kv_lora"], qk_nope_head_dim=spec["nope"],
                  qk_rope_head_dim=spec["rope"], v_head_dim=spec["v_head"], rope_interleave=True,
                  attention_bias=False)
        if spec.get("yarn"):
            kw["rope_parameters"] = dict(rope_type="yarn", rope_theta=float(spec["rope_theta"]),
                                         **spec["yarn"])
    elif arch == "glm4_moe":
        kw.update(sigmoid_router_kw(spec), use_qk_norm=spec["qk_norm"],
                  attention_bias=spec["attention_bias"])
        if spec.get("partial_rotary") is not None:
            kw["rope_parameters"]["partial_rotary_factor"] = spec["partial_rotary"]
    elif arch == "qwen3_next":
        kw["rope_parameters"]["partial_rotary_factor"] = spec["partial_rotary"]
        kw.update(num_experts=spec["experts"], moe_intermediate_size=spec["moe_inter"],
                  shared_expert_intermediate_size=spec["shared_inter"],
                  intermediate_size=spec["inter"], norm_topk_prob=spec["norm_topk_prob"],
                  mlp_only_layers=list(spec.get("mlp_only_layers", [])), decoder_sparse_step=1,
                  linear_num_key_heads=spec["lin_k_heads"], linear_num_value_heads=spec["lin_v_heads"],
                  linear_key_head_dim=spec["lin_k_dim"], linear_value_head_dim=spec["lin_v_dim"],
                  linear_conv_kernel_dim=spec["conv_kernel"], attention_bias=False)
        if spec.get("layer_types"):
            kw["layer_types"] = list(spec["layer_types"])
    elif arch == "llama4":
        kw.update(num_local_experts=spec["experts"], intermediate_size=spec["moe_inter"],
                  intermediate_size_mlp=spec["inter"], interleave_moe_layer_step=spec["moe_step"],
                  no_rope_layer_interval=spec["nope_every"], attention_chunk_size=spec["chunk"],
                  attn_temperature_tuning=spec["temp_tuning"], floor_scale=spec["floor_scale"],
                  attn_scale=spec["attn_scale"], use_qk_norm=spec["qk_norm"], attention_bias=False,
                  pad_token_id=None)
        if spec.get("llama3"):
            kw["rope_parameters"] = dict(rope_type="llama3", rope_theta=float(spec["rope_theta"]),
                                         **spec["llama3"])
    elif arch == "gpt_oss":
        kw.update(num_local_experts=spec["experts"], intermediate_size=spec["moe_inter"],
                  sliding_window=spec["window"], attention_bias=True, pad_token_id=None)
        for k in ("swiglu_limit", "swiglu_alpha"):
            if spec.get(k) is not None:
                kw[k] = spec[k]
        if spec.get("layer_types"):
            kw["layer_types"] = list(spec["layer_types"])
        if spec.get("yarn"):
            kw["rope_parameters"] = dict(rope_type="yarn", rope_theta=float(spec["rope_theta"]),
                                         **spec["yarn"])
    else:
        raise ValueError(arch)
    if spec.get("multimodal"):
        text = cfg_cls(**kw)
        vision = transformers.Qwen3_5MoeVisionConfig(depth=1, hidden_size=32, intermediate_size=48,
                                                     num_heads=2, out_hidden_size=spec["hidden"],
                                                     patch_size=4, num_position_embeddings=16)
        cfg = transformers.Qwen3_5MoeConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                            tie_word_embeddings=spec["tie"])
        cfg._attn_implementation = "eager"
        return cfg
    cfg = cfg_cls(**kw)
    cfg._attn_implementation = "eager"
    return cfg


def build_model(spec: dict, seed: int):
    """Random model in float32.  Norm weights and biases are randomised too (HF
    initialises them to 1 / 0, which would hide norm/bias mix-ups)."""
    cfg = make_config(spec)
    torch.manual_seed(seed)
    model_cls = model_class(spec)
    model = model_cls(cfg).to(torch.float32)
    g = torch.Generator().manual_seed(seed * 7919 + 17)
    # Qwen3.5's RMSNorms are zero-centred (the layer applies 1 + w), except the
    # gated norm inside linear attention
    centred = spec["arch"] in ("qwen3_5_moe", "qwen3_next")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                base = 0.0 if centred and "linear_attn.norm" not in name else 1.0
                p.copy_(base + 0.25 * (torch.rand(p.shape, generator=g) * 2 - 1))
            elif name.endswith(".bias") or name.endswith("_bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("sinks"):
                # per-head sink logits of the order of the scores
                p.copy_(torch.randn(p.shape, generator=g))
            elif name.endswith("A_log"):
                # decay rates A in [0.1, 4]: neither forgetting at once nor never
                p.copy_(torch.log(0.1 + 3.9 * torch.rand(p.shape, generator=g)))
        for name, b in model.named_buffers():
            # DeepSeek's selection bias is zeros at init, which would hide its use
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
    set_eager(model)
    model.eval()
    return model


def model_class(spec: dict):
    if spec.get("multimodal"):
        return transformers.Qwen3_5MoeForConditionalGeneration
    return getattr(transformers, ARCH_CLASSES[spec["arch"]][1])


def set_eager(model):
    model.set_attn_implementation("eager")
    model.set_experts_implementation("eager")


# ----------------------------------------------------------------------------
# Forward + router gap check
# ----------------------------------------------------------------------------

def is_router(mod) -> bool:
    return type(mod).__name__.lower().endswith(("topkrouter", "llama4router"))


def sigmoid_router_gap(mod, logits) -> float:
    """Smallest margin of a grouped sigmoid router's decisions: which groups (by the sum of
    their two best biased scores) and which experts within them (by biased score)."""
    choice = torch.sigmoid(logits) + mod.e_score_correction_bias.float()
    ng, tg, k = mod.num_group, mod.topk_group, mod.top_k
    gap = float("inf")
    if ng > 1 and tg < ng:
        gs = choice.view(-1, ng, choice.shape[-1] // ng).topk(2, dim=-1)[0].sum(-1)
        srt = torch.sort(gs, dim=-1, descending=True).values
        gap = float((srt[:, tg - 1] - srt[:, tg]).min())
        keep = torch.zeros_like(gs).scatter_(1, gs.topk(tg, dim=-1)[1], 1)
        keep = keep.unsqueeze(-1).expand(-1, ng, choice.shape[-1] // ng).reshape(choice.shape)
        choice = choice.masked_fill(~keep.bool(), float("-inf"))
    srt = torch.sort(choice, dim=-1, descending=True).values
    return min(gap, float((srt[:, k - 1] - srt[:, k]).min()))


@torch.no_grad()
def forward_with_gaps(model, ids: list[int], top_k: int):
    """Returns (logits [T,V] float32 numpy, min router gap, per-layer gaps)."""
    gaps = []

    def hook(mod, inp, out):
        if type(mod).__name__ == "Llama4Router":
            # top-k of the raw logits (returned second)
            srt = torch.sort(out[1].float(), dim=-1, descending=True).values
            gaps.append(float((srt[:, top_k - 1] - srt[:, top_k]).min()))
            return
        logits = out[0].float()
        if hasattr(mod, "e_score_correction_bias"):
            gaps.append(sigmoid_router_gap(mod, logits))
            return
        probs = torch.softmax(logits, dim=-1)
        srt = torch.sort(probs, dim=-1, descending=True).values
        gaps.append(float((srt[:, top_k - 1] - srt[:, top_k]).min()))

    handles = [m.register_forward_hook(hook) for m in model.modules() if is_router(m)]
    try:
        out = model(input_ids=torch.tensor([ids], dtype=torch.long), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    logits = out.logits[0].float().numpy()
    assert np.isfinite(logits).all()
    return logits, (min(gaps) if gaps else float("inf")), gaps


def versions() -> dict:
    return {"transformers": transformers.__version__, "torch": torch.__version__.split("+")[0]}


def write_expected(path: Path, ids, logits: np.ndarray, meta: dict):
    # %.9g round-trips float32 exactly
    rows = [[float(f"{v:.9g}") for v in row] for row in logits.astype(np.float32).tolist()]
    doc = {"tokens": list(map(int, ids)), "logits": rows, "meta": meta}
    path.write_text(json.dumps(doc, separators=(",", ":")) + "\n")


# ----------------------------------------------------------------------------
# safetensors model fixture
# ----------------------------------------------------------------------------

def find_seed(spec: dict, ids, min_gap: float, extra_check=None, max_tries: int = 200):
    """First seed >= spec['seed'] whose routers have a top-k gap > min_gap
    (and for which extra_check(model, seed) also passes)."""
    seed = spec["seed"]
    for _ in range(max_tries):
        model = build_model(spec, seed)
        logits, gap, _ = forward_with_gaps(model, ids, spec["top_k"])
        if spec.get("dtype", "float32") == "bfloat16":
            # round the parameters only: model.to(bfloat16) would also round the
            # rotary inv_freq buffer, which a bf16 checkpoint does not contain
            with torch.no_grad():
                for p in model.parameters():
                    p.copy_(p.to(torch.bfloat16).to(torch.float32))
            logits, gap, _ = forward_with_gaps(model, ids, spec["top_k"])
        ok = gap > min_gap
        extra = None
        if ok and extra_check is not None:
            extra = extra_check(model, seed)
            ok = extra is not None
        if ok:
            return seed, model, logits, gap, extra
        print(f"    seed {seed}: router gap {gap:.2e} too small, trying next seed", flush=True)
        seed += 1
    raise RuntimeError("no seed with a large enough router gap")


MXFP4_KV = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=np.float32)


def mxfp4_quantize(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[..., R, C] float -> (blocks [..., R, C/32, 16] u8, scales [..., R, C/32] u8) in the safetensors
    layout of gpt-oss (byte j of a block: value 2j low, 2j+1 high; scale = E8M0 exponent, bias 127),
    with gguf-py's choice of exponent (floor(log2 amax) - 2) and nearest code."""
    *pre, r, c = w.shape
    x = w.reshape(-1, 32).astype(np.float32)
    amax = np.abs(x).max(axis=1)
    with np.errstate(divide="ignore"):
        e = np.where(amax > 0, np.floor(np.log2(amax)) - 2 + 127, 0).astype(np.uint8)
    d = np.where(e < 2, (np.uint32(0x00200000) << e.astype(np.uint32)),
                 (e.astype(np.uint32) - 1) << np.uint32(23)).view(np.float32)
    codes = np.abs(d[:, None, None] * MXFP4_KV[None, None, :] - x[:, :, None]).argmin(axis=-1).astype(np.uint8)
    blocks = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return blocks.reshape(*pre, r, c // 32, 16), e.reshape(*pre, r, c // 32)


def gap_checked(model, ids, spec: dict, seed: int, min_gap: float):
    """(logits, router gap) of `model` on `ids`, or None (and a line saying so) when the gap is too
    small to be sure of the oracle's routing."""
    logits, gap, _ = forward_with_gaps(model, ids, spec["top_k"])
    if gap <= min_gap:
        print(f"    seed {seed}: dequantized router gap {gap:.2e} too small", flush=True)
        return None
    return logits, gap


def fresh_dir(d: Path) -> Path:
    """`d`, emptied."""
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    return d


def make_mxfp4_fixture(name: str, spec: dict, out_dir: Path, tok: Tokenizer, ids, min_gap: float) -> dict:
    """gpt-oss with MXFP4 experts as the hub ships them; oracle on the dequantized weights."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    print(f"[model] {name}", flush=True)

    def quantized(model, seed):
        ref = copy.deepcopy(model)
        packed = {}
        with torch.no_grad():
            for pname, p in ref.named_parameters():
                if not pname.endswith(("experts.gate_up_proj", "experts.down_proj")):
                    continue
                # transformers keeps [E, in, out]; the checkpoint stores [E, out, in/32, 16]
                blocks, scales = mxfp4_quantize(np.swapaxes(p.float().numpy(), -1, -2))
                packed[pname] = (blocks, scales)
                deq = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales),
                                                 dtype=torch.float32)
                assert deq.shape == p.shape, (pname, deq.shape, p.shape)
                p.copy_(deq)
        got = gap_checked(ref, ids, spec, seed, min_gap)
        return got and (ref, packed, *got)

    seed, _, _, _, extra = find_seed(spec, ids, min_gap, extra_check=quantized)
    ref, packed, logits, gap = extra
    d = fresh_dir(out_dir)
    tmp = d / "_hf"
    ref.save_pretrained(tmp, safe_serialization=True)
    cfg = json.loads((tmp / "config.json").read_text())
    tensors = load_file(str(tmp / "model.safetensors"))
    shutil.rmtree(tmp)
    for pname, (blocks, scales) in packed.items():
        del tensors[pname]
        tensors[pname + "_blocks"] = torch.from_numpy(np.ascontiguousarray(blocks))
        tensors[pname + "_scales"] = torch.from_numpy(np.ascontiguousarray(scales))
    cfg["quantization_config"] = {"quant_method": "mxfp4",
                                  "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                             "model.embed_tokens", "lm_head"]}
    (d / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, str(d / "model.safetensors"),
              metadata={"format": "pt"})
    tok.save(str(d / "tokenizer.json"))
    meta = dict(versions(), seed=seed, dtype="float32", arch=spec["arch"], prompt=PROMPT, min_router_gap=gap,
                weights="MXFP4 experts (numpy, gguf-py's exponent rule), oracle on transformers' dequantization")
    write_expected(d / "expected.json", ids, logits, meta)
    files = sorted(p.name for p in d.iterdir())
    info = dict(name=name, seed=seed, min_gap=gap, files=files, logit_absmax=float(np.abs(logits).max()),
                logit_std=float(logits.std()), reload_max_abs_err=0.0)
    print(f"    seed={seed} min_router_gap={gap:.4f} |logits|max={info['logit_absmax']:.2f} files={files}", flush=True)
    return info


def mxfp4_reference(d: Path, spec: dict, seed: int):
    """The float model an MXFP4 fixture in `d` holds: build_model's weights with the experts replaced
    by transformers' dequantization of the stored blocks and scales."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    model = build_model(spec, seed)
    stored = load_file(str(d / "model.safetensors"))
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith(("experts.gate_up_proj", "experts.down_proj")):
                p.copy_(convert_moe_packed_tensors(stored[pname + "_blocks"], stored[pname + "_scales"],
                                                   dtype=torch.float32))
    return model


def fp8_quantized(name: str, w: torch.Tensor) -> bool:
    """Whether a saved tensor is one the FP8 checkpoints store in FP8: the layers' linear weights
    (stacked experts too), not the routers (`mlp.gate`, `mlp.router`) nor norms, embeddings or the
    output head."""
    if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
        return w.ndim == 3
    return (name.startswith("model.layers.") and name.endswith(".weight") and w.ndim == 2
            and not name.endswith(("mlp.gate.weight", "mlp.router.weight")))


def fp8_scale_name(name: str) -> str:
    """transformers' name of a weight's scale grid."""
    return name[:-len("weight")] + "weight_scale_inv" if name.endswith(".weight") else name + "_scale_inv"


def fp8_quantize(w: torch.Tensor, block: list, scale_dtype: torch.dtype):
    """[R, C] float -> (E4M3 codes [R, C], weight_scale_inv [ceil(R/br), ceil(C/bc)]) with the published
    recipe: per tile scale = amax / 448 (1 for an all-zero tile) in the scale type (E8M0: the next
    power of two up, as transformers' ue8m0 does), codes = the value over its scale, clamped to +-448
    and cast (round to nearest even). A stack [E, R, C] is quantized matrix by matrix."""
    if w.ndim == 3:
        parts = [fp8_quantize(m, block, scale_dtype) for m in w]
        return torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])
    br, bc = block
    r, c = w.shape
    gr, gc = -(-r // br), -(-c // bc)
    padded = torch.zeros(gr * br, gc * bc, dtype=torch.float32)
    padded[:r, :c] = w.float()
    tiles = padded.reshape(gr, br, gc, bc)
    amax = tiles.abs().amax(dim=(1, 3))
    s = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax))
    if scale_dtype == torch.float8_e8m0fnu:
        s = torch.exp2(torch.ceil(torch.log2(s)))
    s = s.to(scale_dtype)
    full = s.float().repeat_interleave(br, 0).repeat_interleave(bc, 1)[:r, :c]
    codes = (w.float() / full).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return codes, s


def make_fp8_fixture(name: str, spec: dict, out_dir: Path, tok: Tokenizer, ids, min_gap: float) -> dict:
    """A block-scaled FP8 checkpoint; oracle on transformers' dequantization of the stored codes."""
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight
    from safetensors.torch import save_file
    print(f"[model] {name}", flush=True)
    block, scale_dtype = spec["fp8"]["block"], getattr(torch, spec["fp8"]["scales"])
    channel = block == "channel"
    model_cls = model_class(spec)

    save_kw = dict(safe_serialization=True)
    if spec.get("layout") == "fused":
        save_kw["save_original_format"] = False

    def quantized(model, seed):
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp, **save_kw)
            tensors = load_file(str(Path(tmp) / "model.safetensors"))
            stored, deq = {}, {}
            for k, v in tensors.items():
                if fp8_quantized(k, v):
                    b = [1, v.shape[-1]] if channel else block
                    codes, s = fp8_quantize(v, b, scale_dtype)
                    sn = k[:-len("weight")] + "weight_scale" if channel else fp8_scale_name(k)
                    stored[k], stored[sn] = codes, s
                    deq[k] = _dequantize_fp8_weight(codes, s, b, torch.float32)
                else:
                    stored[k] = deq[k] = v
            save_file({k: v.contiguous() for k, v in deq.items()}, str(Path(tmp) / "model.safetensors"),
                      metadata={"format": "pt"})
            ref = model_cls.from_pretrained(tmp, dtype=torch.float32, attn_implementation="eager",
                                            experts_implementation="eager")
            ref.eval()
            cfg = json.loads((Path(tmp) / "config.json").read_text())
        got = gap_checked(ref, ids, spec, seed, min_gap)
        return got and (stored, cfg, *got)

    seed, _, _, _, extra = find_seed(spec, ids, min_gap, extra_check=quantized)
    stored, cfg, logits, gap = extra
    d = fresh_dir(out_dir)
    if channel:
        cfg["quantization_config"] = {
            "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True,
                            "dynamic": False},
                "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True,
                                      "dynamic": True}}},
            "ignore": ["lm_head", "re:.*mlp.gate$"]}
    else:
        cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                      "weight_block_size": block}
    (d / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    save_file({k: v.contiguous() for k, v in sorted(stored.items())}, str(d / "model.safetensors"),
              metadata={"format": "pt"})
    tok.save(str(d / "tokenizer.json"))
    n_fp8 = sum(1 for v in stored.values() if v.dtype == torch.float8_e4m3fn)
    meta = dict(versions(), seed=seed, dtype="float32", arch=spec["arch"], prompt=PROMPT, min_router_gap=gap,
                weights=f"FP8 E4M3, {'per-channel' if channel else f'{block[0]}x{block[1]} tiles'}, "
                        f"{spec['fp8']['scales']} scales ({n_fp8} tensors); oracle on transformers' dequantization")
    write_expected(d / "expected.json", ids, logits, meta)
    files = sorted(p.name for p in d.iterdir())
    info = dict(name=name, seed=seed, min_gap=gap, files=files, logit_absmax=float(np.abs(logits).max()),
                logit_std=float(logits.std()), reload_max_abs_err=0.0)
    print(f"    seed={seed} min_router_gap={gap:.4f} |logits|max={info['logit_absmax']:.2f} fp8 tensors={n_fp8}",
          flush=True)
    return info


def make_model_fixture(name: str, spec: dict, out_dir: Path, tok: Tokenizer, ids, min_gap: float) -> dict:
    if spec.get("mxfp4"):
        return make_mxfp4_fixture(name, spec, out_dir, tok, ids, min_gap)
    if spec.get("fp8"):
        return make_fp8_fixture(name, spec, out_dir, tok, ids, min_gap)
    print(f"[model] {name}", flush=True)
    seed, model, logits, gap, _ = find_seed(spec, ids, min_gap)
    d = fresh_dir(out_dir)
    save_kw = dict(safe_serialization=True)
    if spec.get("layout") == "fused":
        save_kw["save_original_format"] = False
    if spec.get("max_shard_size"):
        save_kw["max_shard_size"] = spec["max_shard_size"]
    if spec.get("dtype", "float32") == "bfloat16":
        # parameters are already bf16-exact; the cast is lossless
        to_save = copy.deepcopy(model).to(torch.bfloat16)
        to_save.save_pretrained(d, **save_kw)
    else:
        model.save_pretrained(d, **save_kw)
    if spec.get("legacy_config"):
        cfg = json.loads((d / "config.json").read_text())
        rp = cfg.pop("rope_parameters")
        assert rp.get("rope_type") == "default", rp
        cfg["rope_theta"] = rp["rope_theta"]
        cfg["rope_scaling"] = None
        cfg["torch_dtype"] = cfg.pop("dtype")
        if "num_local_experts" in cfg:
            cfg["num_experts"] = cfg.pop("num_local_experts")
        (d / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    tok.save(str(d / "tokenizer.json"))

    meta = dict(versions(), seed=seed, dtype="float32", weights_dtype=spec.get("dtype", "float32"),
                arch=spec["arch"], prompt=PROMPT, min_router_gap=gap)
    write_expected(d / "expected.json", ids, logits, meta)

    # ---- verification: reload what was written, recompute, compare ----
    model_cls = model_class(spec)
    re = model_cls.from_pretrained(d, dtype=torch.float32, attn_implementation="eager",
                                   experts_implementation="eager")
    re.eval()
    rl, rgap, _ = forward_with_gaps(re, ids, spec["top_k"])
    err = float(np.abs(rl - logits).max())
    assert err <= 1e-5, (name, err)
    files = sorted(p.name for p in d.iterdir())
    info = dict(name=name, seed=seed, min_gap=gap, reload_max_abs_err=err, files=files,
                logit_absmax=float(np.abs(logits).max()), logit_std=float(logits.std()))
    print(f"    seed={seed} min_router_gap={gap:.4f} |logits|max={info['logit_absmax']:.2f} "
          f"std={info['logit_std']:.2f} reload_err={err:.1e} files={len(files)}", flush=True)
    return info


def check_layouts(per_expert_dir: Path, fused_dir: Path, spec: dict):
    """Asserts that the fused file holds exactly the per-expert tensors, with
    gate_up_proj[e, :I] == experts.e.gate_proj and gate_up_proj[e, I:] == up_proj."""
    a = load_file(str(per_expert_dir / "model.safetensors"))
    b = load_file(str(fused_dir / "model.safetensors"))
    inter = spec["moe_inter"]
    n = 0
    for k, v in b.items():
        if k.endswith("mlp.experts.gate_up_proj"):
            pre = k[: -len("gate_up_proj")]
            for e in range(v.shape[0]):
                assert torch.equal(v[e, :inter], a[f"{pre}{e}.gate_proj.weight"])
                assert torch.equal(v[e, inter:], a[f"{pre}{e}.up_proj.weight"])
            n += 1
        elif k.endswith("mlp.experts.down_proj"):
            pre = k[: -len("down_proj")]
            for e in range(v.shape[0]):
                assert torch.equal(v[e], a[f"{pre}{e}.down_proj.weight"])
        else:
            assert torch.equal(v, a[k]), k
    assert n > 0
    print(f"    layouts verified: fused gate_up_proj[:, :I] = gate_proj, [:, I:] = up_proj ({n} layers)")


# ----------------------------------------------------------------------------
# GGUF
# ----------------------------------------------------------------------------

GGUF_ARCH = {"qwen3_moe": "qwen3moe", "qwen2_moe": "qwen2moe", "mixtral": "llama", "olmoe": "olmoe",
             "qwen3_5_moe": "qwen35moe"}


def v_heads_tiled(a: np.ndarray, nk: int, nv: int, axis: int = 0, inverse: bool = False) -> np.ndarray:
    """llama.cpp's Qwen3.5 conversion: value heads from Hugging Face's grouped
    order (head j reads key head j // (nv/nk)) to the tiled order (j reads
    j % nk), along `axis` whose length is nv * head_dim; `inverse` undoes it."""
    a = np.moveaxis(a, axis, 0)
    sh = a.shape
    outer = (nv // nk, nk) if inverse else (nk, nv // nk)
    r = a.reshape(*outer, sh[0] // nv, *sh[1:]).swapaxes(0, 1).reshape(sh)
    return np.ascontiguousarray(np.moveaxis(r, 0, axis))


def v_heads_grouped(a: np.ndarray, nk: int, nv: int, axis: int = 0) -> np.ndarray:
    """Inverse of v_heads_tiled."""
    return v_heads_tiled(a, nk, nv, axis, inverse=True)


def qwen35_layer_to_gguf(sd: dict, p: str, blk: str, spec: dict) -> list:
    """One Qwen3.5 decoder layer in llama.cpp's qwen35moe naming and layout:
    zero-centred norms stored as 1 + w, A_log as ssm_a = -exp(A_log), conv1d
    squeezed to [C, K], value heads reordered to the tiled order."""
    nk, nv, dk = spec["lin_k_heads"], spec["lin_v_heads"], spec["lin_k_dim"]
    out = [(blk + "attn_norm.weight", sd[p + "input_layernorm.weight"] + 1.0, "norm"),
           (blk + "post_attention_norm.weight", sd[p + "post_attention_layernorm.weight"] + 1.0, "norm")]
    la = p + "linear_attn."
    if la + "in_proj_qkv.weight" in sd:
        qkv = sd[la + "in_proj_qkv.weight"]
        kd = nk * dk
        qkv = np.concatenate([qkv[: 2 * kd], v_heads_tiled(qkv[2 * kd:], nk, nv)], axis=0)
        conv = sd[la + "conv1d.weight"][:, 0, :]
        conv = np.concatenate([conv[: 2 * kd], v_heads_tiled(conv[2 * kd:], nk, nv)], axis=0)
        out += [
            (blk + "attn_qkv.weight", qkv, "weight"),
            (blk + "attn_gate.weight", v_heads_tiled(sd[la + "in_proj_z.weight"], nk, nv), "weight"),
            (blk + "ssm_beta.weight", v_heads_tiled(sd[la + "in_proj_b.weight"], nk, nv), "weight"),
            (blk + "ssm_alpha.weight", v_heads_tiled(sd[la + "in_proj_a.weight"], nk, nv), "weight"),
            (blk + "ssm_conv1d.weight", conv, "norm"),
            (blk + "ssm_dt.bias", v_heads_tiled(sd[la + "dt_bias"], nk, nv), "bias"),
            (blk + "ssm_a", v_heads_tiled(-np.exp(sd[la + "A_log"]), nk, nv), "norm"),
            (blk + "ssm_norm.weight", sd[la + "norm.weight"], "norm"),
            (blk + "ssm_out.weight", v_heads_tiled(sd[la + "out_proj.weight"], nk, nv, axis=1), "weight"),
        ]
    else:
        a = p + "self_attn."
        out += [(blk + gg + ".weight", sd[a + hf + ".weight"], "weight")
                for hf, gg in [("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v"),
                               ("o_proj", "attn_output")]]
        out += [(blk + "attn_q_norm.weight", sd[a + "q_norm.weight"] + 1.0, "norm"),
                (blk + "attn_k_norm.weight", sd[a + "k_norm.weight"] + 1.0, "norm")]
    return out
FILE_TYPE = {"F32": 0, "F16": 1, "Q4_0": 2, "Q8_0": 7, "BF16": 32}


def llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute (n_head = heads for Q, kv heads for K)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_state_to_gguf(model, spec: dict) -> list[tuple[str, np.ndarray, str]]:
    """(gguf name, float32 array in numpy/PyTorch order, role) in llama.cpp naming.
    role: 'norm' | 'bias' | 'router' | 'weight'."""
    arch = spec["arch"]
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    out = []
    out.append(("token_embd.weight", sd["model.embed_tokens.weight"], "weight"))
    for b in range(spec["layers"]):
        p = f"model.layers.{b}."
        blk = f"blk.{b}."
        if arch == "qwen3_5_moe":
            out += qwen35_layer_to_gguf(sd, p, blk, spec)
            gu = sd[p + "mlp.experts.gate_up_proj"]
            inter = gu.shape[1] // 2
            out.append((blk + "ffn_gate_inp.weight", sd[p + "mlp.gate.weight"], "router"))
            out.append((blk + "ffn_gate_exps.weight", np.ascontiguousarray(gu[:, :inter]), "weight"))
            out.append((blk + "ffn_up_exps.weight", np.ascontiguousarray(gu[:, inter:]), "weight"))
            out.append((blk + "ffn_down_exps.weight", sd[p + "mlp.experts.down_proj"], "weight"))
            out.append((blk + "ffn_gate_inp_shexp.weight", sd[p + "mlp.shared_expert_gate.weight"][0], "router"))
            for hf, gg in [("gate_proj", "ffn_gate_shexp"), ("up_proj", "ffn_up_shexp"), ("down_proj", "ffn_down_shexp")]:
                out.append((blk + gg + ".weight", sd[p + f"mlp.shared_expert.{hf}.weight"], "weight"))
            continue
        out.append((blk + "attn_norm.weight", sd[p + "input_layernorm.weight"], "norm"))
        for hf, gg in [("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v"), ("o_proj", "attn_output")]:
            w = sd[p + f"self_attn.{hf}.weight"]
            if arch == "mixtral" and hf == "q_proj":
                w = llama_permute(w, spec["heads"])
            if arch == "mixtral" and hf == "k_proj":
                w = llama_permute(w, spec["kv_heads"])
            out.append((blk + gg + ".weight", w, "weight"))
            if p + f"self_attn.{hf}.bias" in sd:
                out.append((blk + gg + ".bias", sd[p + f"self_attn.{hf}.bias"], "bias"))
        if p + "self_attn.q_norm.weight" in sd:
            out.append((blk + "attn_q_norm.weight", sd[p + "self_attn.q_norm.weight"], "norm"))
            out.append((blk + "attn_k_norm.weight", sd[p + "self_attn.k_norm.weight"], "norm"))
        out.append((blk + "ffn_norm.weight", sd[p + "post_attention_layernorm.weight"], "norm"))
        if p + "mlp.experts.gate_up_proj" in sd:
            gu = sd[p + "mlp.experts.gate_up_proj"]  # [E, 2I, H]
            inter = gu.shape[1] // 2
            out.append((blk + "ffn_gate_inp.weight", sd[p + "mlp.gate.weight"], "router"))
            out.append((blk + "ffn_gate_exps.weight", np.ascontiguousarray(gu[:, :inter]), "weight"))
            out.append((blk + "ffn_up_exps.weight", np.ascontiguousarray(gu[:, inter:]), "weight"))
            out.append((blk + "ffn_down_exps.weight", sd[p + "mlp.experts.down_proj"], "weight"))
            if p + "mlp.shared_expert.gate_proj.weight" in sd:
                out.append((blk + "ffn_gate_inp_shexp.weight", sd[p + "mlp.shared_expert_gate.weight"], "router"))
                for hf, gg in [("gate_proj", "ffn_gate_shexp"), ("up_proj", "ffn_up_shexp"), ("down_proj", "ffn_down_shexp")]:
                    out.append((blk + gg + ".weight", sd[p + f"mlp.shared_expert.{hf}.weight"], "weight"))
        else:
            for hf, gg in [("gate_proj", "ffn_gate"), ("up_proj", "ffn_up"), ("down_proj", "ffn_down")]:
                out.append((blk + gg + ".weight", sd[p + f"mlp.{hf}.weight"], "weight"))
    out.append(("output_norm.weight", sd["model.norm.weight"] + (1.0 if arch == "qwen3_5_moe" else 0.0), "norm"))
    if not spec["tie"]:
        out.append(("output.weight", sd["lm_head.weight"], "weight"))
    n_hf = len(sd) - (1 if spec["tie"] and "lm_head.weight" in sd else 0)
    n_out = len(out) - sum(1 for n, _, _ in out if n.endswith("ffn_gate_exps.weight"))  # gate+up <- gate_up
    assert n_out == n_hf, (n_out, n_hf, sorted(sd))
    return out


def choose_qtype(role: str, arr: np.ndarray, qname: str) -> QT:
    """convert_hf_to_gguf.py policy: 1-D, *_norm, biases, routers (ffn_gate_inp,
    ffn_gate_inp_shexp) -> F32; everything else the file type, falling back to F16
    when the row length is not a multiple of the block size."""
    if role in ("norm", "bias", "router") or arr.ndim <= 1:
        return QT.F32
    qt = QT[qname]
    block = gguf.GGML_QUANT_SIZES[qt][0]
    if arr.shape[-1] % block != 0:
        return QT.F16
    return qt


def write_gguf(path: Path, model, spec: dict, qname: str, tok: Tokenizer, seed: int) -> dict:
    arch = spec["arch"]
    ga = GGUF_ARCH[arch]
    cfg = model.config
    w = gguf.GGUFWriter(str(path), ga)
    w.add_custom_alignment(spec.get("alignment", 32))  # writes general.alignment
    w.add_type("model")
    w.add_name(f"sluice-fixture-{path.name}")
    w.add_block_count(spec["layers"])
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(spec["hidden"])
    if arch == "qwen3_moe" or arch == "qwen2_moe":
        w.add_feed_forward_length(spec["inter"])  # dense-MLP layers (mlp_only_layers)
    elif arch == "qwen3_5_moe":
        pass
    else:
        w.add_feed_forward_length(spec["moe_inter"])  # mixtral / olmoe: intermediate_size = expert FFN
    w.add_head_count(spec["heads"])
    w.add_head_count_kv(spec["kv_heads"])
    w.add_rope_freq_base(float(spec["rope_theta"]))
    w.add_layer_norm_rms_eps(float(spec["rms_eps"]))
    w.add_expert_count(spec["experts"])
    w.add_expert_used_count(spec["top_k"])
    if spec.get("head_dim"):  # convert_hf_to_gguf writes these only when config.json has head_dim
        w.add_key_length(spec["head_dim"])
        w.add_value_length(spec["head_dim"])
    if arch in ("qwen3_moe", "qwen2_moe"):
        w.add_expert_feed_forward_length(spec["moe_inter"])
    if arch in ("qwen2_moe", "qwen3_5_moe"):
        w.add_expert_shared_feed_forward_length(spec["shared_inter"])
    if arch == "qwen3_5_moe":  # Qwen3NextModel / Qwen3_5MoeTextModel.set_gguf_parameters
        w.add_expert_feed_forward_length(spec["moe_inter"])
        w.add_ssm_conv_kernel(spec["conv_kernel"])
        w.add_ssm_state_size(spec["lin_k_dim"])
        w.add_ssm_group_count(spec["lin_k_heads"])
        w.add_ssm_time_step_rank(spec["lin_v_heads"])
        w.add_ssm_inner_size(spec["lin_v_heads"] * spec["lin_v_dim"])
        lt = cfg.layer_types
        interval = next(i + 1 for i, t in enumerate(lt) if t == "full_attention")
        assert all((t == "full_attention") == ((i + 1) % interval == 0) for i, t in enumerate(lt)), lt
        w.add_uint32(f"{ga}.full_attention_interval", interval)
        w.add_rope_dimension_count(int(spec["head_dim"] * spec["partial_rotary"]))
        w.add_rope_dimension_sections([11, 11, 10, 0])
    if arch == "mixtral":  # LlamaModel.set_gguf_parameters extras
        w.add_vocab_size(spec["vocab"])
        w.add_rope_dimension_count(spec["hidden"] // spec["heads"])
    # Not written by convert_hf_to_gguf for these archs (llama.cpp hard-codes it per arch);
    # added so a reader need not hard-code it.  true = renormalise the top-k weights.
    norm_w = {"qwen3_moe": spec.get("norm_topk_prob"), "qwen2_moe": spec.get("norm_topk_prob"),
              "mixtral": True, "olmoe": spec.get("norm_topk_prob"), "qwen3_5_moe": True}[arch]
    w.add_expert_weights_norm(bool(norm_w))
    w.add_file_type(FILE_TYPE[qname])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    # tokenizer (TextModel._set_vocab_gpt2 conventions)
    tj = json.loads(tok.to_str())
    inv = {i: t for t, i in tj["model"]["vocab"].items()}
    for at in tj["added_tokens"]:
        inv[at["id"]] = at["content"]
    special_ids = {at["id"] for at in tj["added_tokens"] if at["special"]}
    tokens, types = [], []
    for i in range(spec["vocab"]):
        if i in inv:
            tokens.append(inv[i])
            types.append(gguf.TokenType.CONTROL if i in special_ids else gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    w.add_add_bos_token(False)

    qtypes = {}
    for name, arr, role in hf_state_to_gguf(model, spec):
        qt = choose_qtype(role, arr, qname)
        arr = np.ascontiguousarray(arr.astype(np.float32))
        if qt == QT.F32:
            w.add_tensor(name, arr)
        elif qt == QT.F16:
            w.add_tensor(name, arr.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(arr, qt), raw_dtype=qt)
        qtypes[name] = qt.name
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return qtypes


def gguf_to_model(path: Path, spec: dict, seed: int):
    """Fresh model whose parameters are the GGUF tensors dequantized to float32
    (llama permutation undone for mixtral)."""
    r = gguf.GGUFReader(str(path))
    t = {}
    for ti in r.tensors:
        a = gguf.quants.dequantize(ti.data, ti.tensor_type).astype(np.float32)
        t[ti.name] = a.reshape([int(x) for x in reversed(ti.shape.tolist())])
    model = build_model(spec, seed)
    sd = model.state_dict()
    new = {}
    arch = spec["arch"]
    new["model.embed_tokens.weight"] = t["token_embd.weight"]
    new["model.norm.weight"] = t["output_norm.weight"]
    if not spec["tie"]:
        new["lm_head.weight"] = t["output.weight"]
    if arch == "qwen3_5_moe":
        new["model.norm.weight"] = t["output_norm.weight"] - 1.0
        nk, nv, dk = spec["lin_k_heads"], spec["lin_v_heads"], spec["lin_k_dim"]
        kd = nk * dk
        for b in range(spec["layers"]):
            p, blk = f"model.layers.{b}.", f"blk.{b}."
            new[p + "input_layernorm.weight"] = t[blk + "attn_norm.weight"] - 1.0
            new[p + "post_attention_layernorm.weight"] = t[blk + "post_attention_norm.weight"] - 1.0
            if blk + "attn_qkv.weight" in t:
                la = p + "linear_attn."
                qkv, conv = t[blk + "attn_qkv.weight"], t[blk + "ssm_conv1d.weight"]
                new[la + "in_proj_qkv.weight"] = np.concatenate([qkv[: 2 * kd], v_heads_grouped(qkv[2 * kd:], nk, nv)])
                conv = np.concatenate([conv[: 2 * kd], v_heads_grouped(conv[2 * kd:], nk, nv)])
                new[la + "conv1d.weight"] = conv[:, None, :]
                new[la + "in_proj_z.weight"] = v_heads_grouped(t[blk + "attn_gate.weight"], nk, nv)
                new[la + "in_proj_b.weight"] = v_heads_grouped(t[blk + "ssm_beta.weight"], nk, nv)
                new[la + "in_proj_a.weight"] = v_heads_grouped(t[blk + "ssm_alpha.weight"], nk, nv)
                new[la + "dt_bias"] = v_heads_grouped(t[blk + "ssm_dt.bias"], nk, nv)
                new[la + "A_log"] = np.log(-v_heads_grouped(t[blk + "ssm_a"], nk, nv))
                new[la + "norm.weight"] = t[blk + "ssm_norm.weight"]
                new[la + "out_proj.weight"] = v_heads_grouped(t[blk + "ssm_out.weight"], nk, nv, axis=1)
            else:
                a = p + "self_attn."
                for hf, gg in [("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v"), ("o_proj", "attn_output")]:
                    new[a + hf + ".weight"] = t[blk + gg + ".weight"]
                new[a + "q_norm.weight"] = t[blk + "attn_q_norm.weight"] - 1.0
                new[a + "k_norm.weight"] = t[blk + "attn_k_norm.weight"] - 1.0
            new[p + "mlp.gate.weight"] = t[blk + "ffn_gate_inp.weight"]
            new[p + "mlp.experts.gate_up_proj"] = np.concatenate(
                [t[blk + "ffn_gate_exps.weight"], t[blk + "ffn_up_exps.weight"]], axis=1)
            new[p + "mlp.experts.down_proj"] = t[blk + "ffn_down_exps.weight"]
            new[p + "mlp.shared_expert_gate.weight"] = t[blk + "ffn_gate_inp_shexp.weight"][None, :]
            for hf, gg in [("gate_proj", "ffn_gate_shexp"), ("up_proj", "ffn_up_shexp"), ("down_proj", "ffn_down_shexp")]:
                new[p + f"mlp.shared_expert.{hf}.weight"] = t[blk + gg + ".weight"]
    for b in range(spec["layers"] if arch != "qwen3_5_moe" else 0):
        p, blk = f"model.layers.{b}.", f"blk.{b}."
        new[p + "input_layernorm.weight"] = t[blk + "attn_norm.weight"]
        new[p + "post_attention_layernorm.weight"] = t[blk + "ffn_norm.weight"]
        for hf, gg in [("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v"), ("o_proj", "attn_output")]:
            a = t[blk + gg + ".weight"]
            if arch == "mixtral" and hf == "q_proj":
                a = llama_unpermute(a, spec["heads"])
            if arch == "mixtral" and hf == "k_proj":
                a = llama_unpermute(a, spec["kv_heads"])
            new[p + f"self_attn.{hf}.weight"] = a
            if blk + gg + ".bias" in t:
                new[p + f"self_attn.{hf}.bias"] = t[blk + gg + ".bias"]
        if blk + "attn_q_norm.weight" in t:
            new[p + "self_attn.q_norm.weight"] = t[blk + "attn_q_norm.weight"]
            new[p + "self_attn.k_norm.weight"] = t[blk + "attn_k_norm.weight"]
        if blk + "ffn_gate_exps.weight" in t:
            new[p + "mlp.gate.weight"] = t[blk + "ffn_gate_inp.weight"]
            new[p + "mlp.experts.gate_up_proj"] = np.concatenate(
                [t[blk + "ffn_gate_exps.weight"], t[blk + "ffn_up_exps.weight"]], axis=1)
            new[p + "mlp.experts.down_proj"] = t[blk + "ffn_down_exps.weight"]
            if blk + "ffn_gate_inp_shexp.weight" in t:
                new[p + "mlp.shared_expert_gate.weight"] = t[blk + "ffn_gate_inp_shexp.weight"]
                for hf, gg in [("gate_proj", "ffn_gate_shexp"), ("up_proj", "ffn_up_shexp"), ("down_proj", "ffn_down_shexp")]:
                    new[p + f"mlp.shared_expert.{hf}.weight"] = t[blk + gg + ".weight"]
        else:
            for hf, gg in [("gate_proj", "ffn_gate"), ("up_proj", "ffn_up"), ("down_proj", "ffn_down")]:
                new[p + f"mlp.{hf}.weight"] = t[blk + gg + ".weight"]
    if spec["tie"]:
        sd_keys = set(sd) - {"lm_head.weight"}
    else:
        sd_keys = set(sd)
    assert set(new) == sd_keys, (set(new) ^ sd_keys)
    for k, v in new.items():
        assert tuple(sd[k].shape) == v.shape, (k, sd[k].shape, v.shape)
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in new.items()}, strict=False)
    if spec["tie"]:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    set_eager(model)
    model.eval()
    return model, r


# ----------------------------------------------------------------------------
# MLX (mlx-community layout) fixture
# ----------------------------------------------------------------------------

# name -> (spec, base (bits, group), per-module overrides as (path suffix regex, bits, group))
MLX_FIXTURES = {
    # the multimodal qwen3_5_moe fixture's geometry, another seed; experts at 3 bits
    # (values straddle words) in the linear layers and 2 bits elsewhere, routers 8-bit,
    # everything else 4-bit groups of 32, as mlx-lm's mixed recipes do
    "qwen3_5_moe_mlx": (
        dict(BASE["qwen3_5_moe"], seed=5300, multimodal=True, layer_types=None, experts=6, top_k=3),
        (4, 32),
        [(r"layers\.[012]\.mlp\.switch_mlp\.", 3, 32), (r"layers\.3\.mlp\.switch_mlp\.", 2, 32),
         (r"mlp\.gate$", 8, 64), (r"mlp\.shared_expert_gate$", 8, 64)],
    ),
    # Qwen3-Next as mlx-community converts it (mlx-lm's qwen3_next sanitize): text-only model.*
    # names, switch_mlp experts, conv1d [C, K, 1], norms stored as 1 + w, the fused in_proj_qkvz /
    # in_proj_ba quantized like any linear; routers and the shared-expert gate 8-bit (its
    # quant_predicate), experts 4-bit groups of 64, everything else 4-bit groups of 32; another seed
    "qwen3_next_mlx": (
        dict(BASE["qwen3_next"], seed=9300),
        (4, 32),
        [(r"mlp\.switch_mlp\.", 4, 64), (r"mlp\.gate$", 8, 64), (r"mlp\.shared_expert_gate$", 8, 64)],
    ),
}


def mlx_quantize(w: np.ndarray, bits: int, group: int):
    """MLX affine quantization of the last axis (mlx/ops.cpp's formula), scales and
    biases rounded to bfloat16.  Returns (packed uint32 [..., in*bits/32],
    scales bf16 torch [..., in/group], biases likewise, dequantized float32)."""
    shape = w.shape
    x = w.reshape(-1, group).astype(np.float32)
    n_bins = (1 << bits) - 1
    w_max, w_min = x.max(axis=1), x.min(axis=1)
    mask = np.abs(w_min) > np.abs(w_max)
    scale = np.maximum((w_max - w_min) / n_bins, 1e-7)
    scale = np.where(mask, scale, -scale)
    edge = np.where(mask, w_min, w_max)
    q0 = np.rint(edge / scale)
    nz = q0 != 0
    scale = np.where(nz, edge / np.where(nz, q0, 1), scale)
    bias = np.where(nz, edge, 0.0)
    scale_t = torch.tensor(scale, dtype=torch.float32).to(torch.bfloat16)
    bias_t = torch.tensor(bias, dtype=torch.float32).to(torch.bfloat16)
    sf, bf = scale_t.float().numpy(), bias_t.float().numpy()
    q = np.clip(np.rint((x - bf[:, None]) / sf[:, None]), 0, n_bins).astype(np.uint64)
    deq = (sf[:, None] * q.astype(np.float32) + bf[:, None]).astype(np.float32).reshape(shape)
    rows = int(np.prod(shape[:-1]))
    codes = q.reshape(rows, shape[-1])
    # little-endian bit stream per row: value i in bits [i*bits, (i+1)*bits)
    bitsarr = ((codes[:, :, None] >> np.arange(bits, dtype=np.uint64)) & 1).astype(np.uint8)
    stream = np.packbits(bitsarr.reshape(rows, -1), axis=1, bitorder="little")
    packed = stream.view("<u4").reshape(*shape[:-1], shape[-1] * bits // 32)
    g = shape[-1] // group
    return (packed, scale_t.reshape(*shape[:-1], g), bias_t.reshape(*shape[:-1], g), deq)


def mlx_prefixes(sd) -> tuple:
    """(transformers' prefix, mlx-lm's prefix, mlx-lm's head name): the multimodal Qwen3.5
    checkpoints nest the text model (language_model.model.*); text-only ones (Qwen3-Next) keep model.*"""
    if any(k.startswith("model.language_model.") for k in sd):
        return "model.language_model.", "language_model.model.", "language_model.lm_head.weight"
    return "model.", "model.", "lm_head.weight"


def hf_to_mlx_names(sd: dict) -> dict:
    """transformers' state dict -> mlx-community names and layouts (float32 torch),
    before quantization: language_model.model.* prefix (multimodal), switch_mlp experts, conv1d
    [C, K, 1], zero-centred norms stored as 1 + w (what mlx-lm's sanitize writes)."""
    hf_p, mlx_p, head = mlx_prefixes(sd)
    out = {}
    for k, v in sd.items():
        v = v.detach().float().clone()
        if k.startswith("model.visual."):
            out["vision_tower." + k[len("model.visual."):]] = v
            continue
        if k == "lm_head.weight":
            out[head] = v
            continue
        assert k.startswith(hf_p), k
        n = mlx_p + k[len(hf_p):]
        if n.endswith("mlp.experts.gate_up_proj"):
            i = v.shape[1] // 2
            base = n[: -len("experts.gate_up_proj")] + "switch_mlp."
            out[base + "gate_proj.weight"] = v[:, :i, :].contiguous()
            out[base + "up_proj.weight"] = v[:, i:, :].contiguous()
            continue
        if n.endswith("mlp.experts.down_proj"):
            out[n[: -len("experts.down_proj")] + "switch_mlp.down_proj.weight"] = v
            continue
        if n.endswith("conv1d.weight"):
            v = v.permute(0, 2, 1).contiguous()  # [C, 1, K] -> [C, K, 1]
        elif n.endswith("norm.weight") and "linear_attn.norm" not in n:
            v = v + 1.0
        out[n] = v
    return out


def mlx_quantizable(name: str, v) -> bool:
    if name.startswith("vision_tower.") or not name.endswith(".weight") or v.dim() < 2:
        return False
    return not any(t in name for t in ("norm", "conv1d"))


def make_mlx_fixture(name: str, spec: dict, base_q, overrides, out_dir: Path, tok, ids, min_gap: float) -> dict:
    import re as _re
    print(f"[mlx] {name}", flush=True)

    def plan(mlx_name):
        path = mlx_name[: -len(".weight")]
        for pat, b, g in overrides:
            if _re.search(pat, path):
                return path, (b, g), True
        return path, base_q, False

    def quantized(model, seed):
        sd = hf_to_mlx_names(model.state_dict())
        tensors, deq_sd, quant_cfg = {}, {}, {"group_size": base_q[1], "bits": base_q[0], "mode": "affine"}
        for n, v in sd.items():
            if mlx_quantizable(n, v) and v.shape[-1] % 32 == 0:
                path, (b, g), special = plan(n)
                if v.shape[-1] % g:
                    raise RuntimeError(f"{n}: in-dim {v.shape[-1]} not a multiple of {g}")
                packed, sc, bi, deq = mlx_quantize(v.numpy(), b, g)
                tensors[n] = torch.from_numpy(packed.astype(np.uint32).copy())
                tensors[path + ".scales"] = sc.contiguous()
                tensors[path + ".biases"] = bi.contiguous()
                deq_sd[n] = torch.from_numpy(deq)
                if special:
                    quant_cfg[path] = {"group_size": g, "bits": b}
            else:
                # the model's dtype (bf16), except A_log, which mlx-lm keeps in f32
                tensors[n] = v if n.endswith("A_log") else v.to(torch.bfloat16)
                deq_sd[n] = tensors[n].float()
        # the reference: the transformers model with every weight replaced by what
        # the MLX file dequantizes to
        ref = copy.deepcopy(model)
        hf_sd = ref.state_dict()
        hf_p, mlx_p, head = mlx_prefixes(hf_sd)
        new = {}
        for k in hf_sd:
            if k.startswith("model.visual."):
                new[k] = deq_sd["vision_tower." + k[len("model.visual."):]]
            elif k == "lm_head.weight":
                new[k] = deq_sd[head]
            else:
                n = mlx_p + k[len(hf_p):]
                if n.endswith("mlp.experts.gate_up_proj"):
                    b = n[: -len("experts.gate_up_proj")] + "switch_mlp."
                    new[k] = torch.cat([deq_sd[b + "gate_proj.weight"], deq_sd[b + "up_proj.weight"]], dim=1)
                elif n.endswith("mlp.experts.down_proj"):
                    new[k] = deq_sd[n[: -len("experts.down_proj")] + "switch_mlp.down_proj.weight"]
                elif n.endswith("conv1d.weight"):
                    new[k] = deq_sd[n].permute(0, 2, 1)
                elif n.endswith("norm.weight") and "linear_attn.norm" not in n:
                    new[k] = deq_sd[n] - 1.0
                else:
                    new[k] = deq_sd[n]
        ref.load_state_dict({k: v.float() for k, v in new.items()})
        set_eager(ref)
        ref.eval()
        got = gap_checked(ref, ids, spec, seed, min_gap)
        return got and (tensors, quant_cfg, *got)

    seed, model, _, _, extra = find_seed(spec, ids, min_gap, extra_check=quantized)
    tensors, quant_cfg, logits, gap = extra
    d = fresh_dir(out_dir)
    tmp = d / "_hf"
    model.save_pretrained(tmp, safe_serialization=True)
    cfg = json.loads((tmp / "config.json").read_text())
    shutil.rmtree(tmp)
    cfg["quantization"] = quant_cfg
    cfg["quantization_config"] = dict(quant_cfg)
    (d / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, str(d / "model.safetensors"),
              metadata={"format": "mlx"})
    tok.save(str(d / "tokenizer.json"))
    meta = dict(versions(), seed=seed, dtype="float32", arch=spec["arch"], prompt=PROMPT, min_router_gap=gap,
                weights="MLX affine (numpy, mlx/ops.cpp formula), oracle on the dequantized weights",
                quantization=quant_cfg)
    write_expected(d / "expected.json", ids, logits, meta)
    files = sorted(p.name for p in d.iterdir())
    info = dict(name=name, seed=seed, min_gap=gap, files=files, logit_absmax=float(np.abs(logits).max()),
                quantization=quant_cfg)
    print(f"    seed={seed} min_router_gap={gap:.4f} |logits|max={info['logit_absmax']:.2f} files={files}", flush=True)
    return info


def make_gguf_fixture(name: str, spec: dict, qname: str, out_path: Path, tok, ids, min_gap: float,
                      expected_path: Path | None = None) -> dict:
    print(f"[gguf] {name}", flush=True)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    state = {}

    def check(model, seed):
        qtypes = write_gguf(out_path, model, spec, qname, tok, seed)
        dq, reader = gguf_to_model(out_path, spec, seed)
        logits, gap, _ = forward_with_gaps(dq, ids, spec["top_k"])
        if gap <= min_gap:
            print(f"    seed {seed}: dequantized router gap {gap:.2e} too small", flush=True)
            return None
        state.update(qtypes=qtypes, logits=logits, gap=gap, reader=reader)
        return True

    seed, model, f32_logits, f32_gap, _ = find_seed(spec, ids, min_gap, extra_check=check)
    logits = state["logits"]
    meta = dict(versions(), gguf=gguf_version(), seed=seed, dtype="float32", arch=spec["arch"],
                gguf_arch=GGUF_ARCH[spec["arch"]], weights=f"{qname} (dequantized with gguf.quants.dequantize)",
                prompt=PROMPT, min_router_gap=state["gap"],
                max_abs_diff_vs_float32_weights=float(np.abs(logits - f32_logits).max()))
    exp = expected_path or out_path.with_name(out_path.name[: -len(".gguf")] + ".expected.json")
    write_expected(exp, ids, logits, meta)
    counts = {}
    for v in state["qtypes"].values():
        counts[v] = counts.get(v, 0) + 1
    info = dict(name=name, seed=seed, min_gap=state["gap"], qtypes=counts, size=out_path.stat().st_size,
                diff_vs_f32=meta["max_abs_diff_vs_float32_weights"], logit_absmax=float(np.abs(logits).max()),
                tensor_types=state["qtypes"])
    print(f"    seed={seed} min_router_gap(dequant)={state['gap']:.4f} types={counts} "
          f"max|dq-f32 logits|={info['diff_vs_f32']:.3e} size={info['size']}", flush=True)
    return info


def gguf_version() -> str:
    try:
        from importlib.metadata import version
        return version("gguf")
    except Exception:
        return "unknown"


# ----------------------------------------------------------------------------
# Quant block test vectors
# ----------------------------------------------------------------------------

# byte offsets of the f16 super-block scale fields that are overwritten with sane values
KQUANT_SCALE_FIELDS = {
    "Q2_K": {"d": 80, "dmin": 82},   # scales[16] @0, qs[64] @16, d @80, dmin @82 (84 bytes)
    "Q3_K": {"d": 108},              # hmask[32] @0, qs[64] @32, scales[12] @96, d @108 (110 bytes)
    "Q4_K": {"d": 0, "dmin": 2},     # d @0, dmin @2, scales[12] @4, qs[128] @16 (144 bytes)
    "Q5_K": {"d": 0, "dmin": 2},     # d @0, dmin @2, scales[12] @4, qh[32] @16, qs[128] @48 (176 bytes)
    "Q6_K": {"d": 208},              # ql[128] @0, qh[64] @128, scales[16] (int8) @192, d @208 (210 bytes)
}
BLOCK_LAYOUTS = {
    "F16": "IEEE binary16 little-endian, 1 element per block",
    "BF16": "bfloat16 little-endian (upper 16 bits of an f32), 1 element per block",
    "Q4_0": "d f16 @0, qs[16] @2; x[j] = d*((qs[j]&0xF)-8), x[j+16] = d*((qs[j]>>4)-8) (18 bytes)",
    "Q4_1": "d f16 @0, m f16 @2, qs[16] @4; x[j] = d*(qs[j]&0xF)+m, x[j+16] = d*(qs[j]>>4)+m (20 bytes)",
    "Q5_0": "d f16 @0, qh u32 @2, qs[16] @6; 5th bit of x[j] is bit j of qh, of x[j+16] bit j+16; value-16 (22 bytes)",
    "Q5_1": "d f16 @0, m f16 @2, qh u32 @4, qs[16] @8 (24 bytes)",
    "Q8_0": "d f16 @0, qs[32] int8 @2 (34 bytes)",
    "Q2_K": "scales[16] @0, qs[64] @16, d f16 @80, dmin f16 @82 (84 bytes)",
    "Q3_K": "hmask[32] @0, qs[64] @32, scales[12] @96, d f16 @108 (110 bytes)",
    "Q4_K": "d f16 @0, dmin f16 @2, scales[12] @4, qs[128] @16 (144 bytes)",
    "Q5_K": "d f16 @0, dmin f16 @2, scales[12] @4, qh[32] @16, qs[128] @48 (176 bytes)",
    "Q6_K": "ql[128] @0, qh[64] @128, scales[16] int8 @192, d f16 @208 (210 bytes)",
    "MXFP4": "e u8 @0 (E8M0), qs[16] @1; x[j] = kv[qs[j]&0xF]*2^(e-128), x[j+16] = kv[qs[j]>>4]*2^(e-128), "
             "kv = doubled E2M1 {0,1,2,3,4,6,8,12,-0,-1,..,-12} (17 bytes)",
}


def make_quants(out: Path, seed: int = 12345) -> dict:
    print("[quants]", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    index = {}
    for name in ["F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
                 "MXFP4"]:
        qt = QT[name]
        block, tsize = gguf.GGML_QUANT_SIZES[qt]
        if name in ("F16", "BF16"):
            n_blocks = 256
            x = (rng.standard_normal(n_blocks) * np.exp(rng.uniform(-6, 6, n_blocks))).astype(np.float32)
            x[:6] = [0.0, -0.0, 1.0, -2.5, 6.0e-8, -3.0e-6]  # includes f16 subnormals and -0
            raw = (x.astype(np.float16).view(np.uint8) if name == "F16" else gguf.quants.quantize(x, qt))
        elif name in KQUANT_SCALE_FIELDS:
            n_blocks = 8
            raw = rng.integers(0, 256, size=(n_blocks, tsize), dtype=np.uint8)
            for b in range(n_blocks):
                for fld, off in KQUANT_SCALE_FIELDS[name].items():
                    v = rng.uniform(0.01, 0.5) * (1 if rng.random() < 0.5 or fld == "dmin" else -1)
                    raw[b, off:off + 2] = np.frombuffer(np.float16(v).tobytes(), dtype=np.uint8)
            raw = raw.reshape(-1)
        else:
            n_blocks = 8
            scales = np.array([1e-3, 0.02, 0.5, 1.0, 3.0, 17.0, 250.0, 0.07], dtype=np.float32)
            x = (rng.standard_normal((n_blocks, block)) * scales[:, None]).astype(np.float32)
            x[1] -= 0.05  # an all-negative-leaning block
            x[4] = np.abs(x[4])  # an all-positive block
            raw = gguf.quants.quantize(x.reshape(1, -1), qt).reshape(-1)
            if name == "MXFP4":
                # the subnormal scales (exponent bytes 0 and 1) and a huge one (2^122)
                raw = raw.copy()
                for b, ex in ((0, 0), (1, 1), (7, 250)):
                    raw[b * tsize] = ex
        raw = np.ascontiguousarray(raw, dtype=np.uint8)
        assert raw.size == n_blocks * tsize, (name, raw.size)
        deq = gguf.quants.dequantize(raw.reshape(1, -1), qt).astype(np.float32).reshape(-1)
        assert deq.size == n_blocks * block and np.isfinite(deq).all(), name
        (out / f"{name}.bin").write_bytes(raw.tobytes())
        (out / f"{name}.f32").write_bytes(deq.astype("<f4").tobytes())
        entry = {"n_blocks": n_blocks, "block_size": block, "type_size": tsize, "ggml_type_id": int(qt),
                 "layout": BLOCK_LAYOUTS[name]}
        if name in KQUANT_SCALE_FIELDS:
            entry["random_bytes_except_f16_fields_at"] = KQUANT_SCALE_FIELDS[name]
        index[name] = entry
    index["_note"] = ("<TYPE>.bin = raw GGML blocks; <TYPE>.f32 = little-endian float32 of "
                      "gguf.quants.dequantize(bin, GGMLQuantizationType.<TYPE>), flattened. "
                      "F16/BF16/Q4_0..Q8_0/MXFP4: quantized random floats of varied magnitude (MXFP4: exponent bytes of blocks 0, 1, 7 then set to 0, 1, 250); "
                      "K-quants: random bytes with the f16 super-block scale fields overwritten by "
                      "finite values of magnitude 0.01..0.5 (offsets in random_bytes_except_f16_fields_at). "
                      f"gguf-py {gguf_version()}.")
    (out / "index.json").write_text(json.dumps(index, indent=2) + "\n")
    return index


# ----------------------------------------------------------------------------
# README
# ----------------------------------------------------------------------------

def dir_size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def geometry_str(spec: dict) -> str:
    s = (f"vocab {spec['vocab']}, hidden {spec['hidden']}, layers {spec['layers']}, heads {spec['heads']}/"
         f"kv {spec['kv_heads']}, head_dim {spec.get('head_dim') or spec['hidden'] // spec['heads']}"
         f"{'' if spec.get('head_dim') else ' (implicit)'}, experts {spec['experts']} top-{spec['top_k']}, "
         f"expert inter {spec['moe_inter']}")
    if spec["arch"] in ("qwen3_moe", "qwen2_moe"):
        s += f", dense inter {spec['inter']} (mlp_only_layers {spec.get('mlp_only_layers')})"
    if spec["arch"] == "qwen2_moe":
        s += f", shared-expert inter {spec['shared_inter']}, qkv bias"
    if spec["arch"] == "qwen3_5_moe":
        s += (f", shared-expert inter {spec['shared_inter']}, layer_types {spec.get('layer_types') or 'default'}, "
              f"linear heads k {spec['lin_k_heads']}x{spec['lin_k_dim']} / v {spec['lin_v_heads']}x{spec['lin_v_dim']}, "
              f"conv {spec['conv_kernel']}, partial rotary {spec['partial_rotary']}"
              f"{', multimodal (vision tower skipped)' if spec.get('multimodal') else ''}")
    if spec["arch"] == "qwen3_next":
        s += (f", shared-expert inter {spec['shared_inter']}, dense inter {spec['inter']} (mlp_only_layers "
              f"{spec.get('mlp_only_layers')}), layer_types {spec.get('layer_types') or 'default'}, "
              f"linear heads k {spec['lin_k_heads']}x{spec['lin_k_dim']} / v {spec['lin_v_heads']}x{spec['lin_v_dim']}, "
              f"conv {spec['conv_kernel']}, partial rotary {spec['partial_rotary']}, fused in_proj_qkvz / in_proj_ba")
    if spec["arch"] == "llama4":
        s += (f", dense inter {spec['inter']}, MoE every {spec['moe_step']}, no rope every {spec['nope_every']}, "
              f"chunk {spec['chunk']}, temperature tuning {spec['temp_tuning']} (floor {spec['floor_scale']:g}, "
              f"scale {spec['attn_scale']:g}), qk norm {spec['qk_norm']}, llama3 rope {spec['llama3'] or 'none'}")
    if spec["arch"] == "deepseek_v3":
        s += (f", MLA q_lora {spec['q_lora']} kv_lora {spec['kv_lora']} nope {spec['nope']} rope {spec['rope']} "
              f"v {spec['v_head']}, {spec['n_shared']} shared, first {spec['first_dense']} dense (inter {spec['inter']}), "
              f"sigmoid + bias routing, groups {spec['n_group']}/{spec['topk_group']}, scale {spec['routed_scaling']}, "
              f"yarn {spec['yarn'] or 'none'}")
    if spec["arch"] == "glm4_moe":
        s += (f", partial rotary {spec.get('partial_rotary')}, qk norm {spec['qk_norm']}, qkv bias "
              f"{spec['attention_bias']}, {spec['n_shared']} shared, first {spec['first_dense']} dense "
              f"(inter {spec['inter']}), sigmoid + bias routing, groups {spec['n_group']}/{spec['topk_group']}, "
              f"scale {spec['routed_scaling']}")
    if spec["arch"] == "gpt_oss":
        s += (f", sinks, q/k/v/o biases, sliding window {spec['window']} on layer_types "
              f"{spec.get('layer_types') or 'default (even layers)'}, yarn {spec['yarn'] or 'none'}, "
              f"router bias, expert biases, clamped SwiGLU limit {spec['swiglu_limit'] or 'default 7'} "
              f"alpha {spec['swiglu_alpha'] or 'default 1.702'}")
    if "norm_topk_prob" in spec:
        s += f", norm_topk_prob {spec['norm_topk_prob']}"
    s += f", rope_theta {spec['rope_theta']:g}, rms_eps {spec['rms_eps']:g}, tied {spec['tie']}, init {spec['init_range']}"
    return s


SEMANTICS = """## Semantics the Rust side must reproduce (verified)

* RMSNorm: `x / sqrt(mean(x^2) + eps) * w`, computed in f32 (eps from config / `attention.layer_norm_rms_epsilon`).
* Rope (HF): `rotate_half` convention on each head (pairs `(i, i + d/2)`), `inv_freq = theta^(-2i/d)`,
  d = head_dim, positions 0..T-1, `rope_type` "default" everywhere.  In GGUF: `qwen2moe`, `qwen3moe`, `olmoe`
  keep the HF weight order and llama.cpp uses NEOX rope (same halves pairing); arch `llama` (Mixtral) has the
  Q and K rows permuted by convert_hf_to_gguf's `LlamaModel.permute` (per head: rows [0..d/2) and [d/2..d)
  interleaved), so llama.cpp's "normal" rope on adjacent pairs `(2i, 2i+1)` is equivalent.
* qwen3_moe: `q_norm` / `k_norm` (length head_dim) are RMSNorms applied per head, after q/k projection and
  before rope.  head_dim 24 != hidden/heads.  No attention bias.
* olmoe: `q_norm` has length hidden_size (= heads*head_dim) and `k_norm` length kv_heads*head_dim: RMSNorm over
  the WHOLE projection before splitting into heads (then rope).  clip_qkv null.  Tied embeddings (no
  lm_head.weight in safetensors, no output.weight in GGUF).
* qwen2_moe: q/k/v have biases (o_proj has none); MoE out = routed experts + `sigmoid(shared_expert_gate(x)) *
  shared_expert(x)`; `shared_expert_gate.weight` is [1, H] (GGUF `ffn_gate_inp_shexp.weight`, ne [H, 1], F32).
* Router (all four archs): `logits = x @ gate.weight.T`; softmax over ALL experts in f32 first, then top-k
  (ties: torch.topk, never exercised here); if `norm_topk_prob` (qwen3_moe, qwen2_moe_sharded: true; qwen2_moe,
  olmoe: false) the k weights are divided by their sum; Mixtral ALWAYS renormalises (no config flag).  Expert
  output = `down(silu(gate x) * up x) * weight`, summed over the k experts.
* deepseek_v3 (Kimi K2 is the same architecture): multi-head latent attention -- `q = q_b(norm(q_a x))` (or
  `q_proj x` without q_lora), `[c | k_pe] = kv_a_proj_with_mqa x`, `k_nope, v = kv_b(norm(c))` per head, rope on
  the last `qk_rope_head_dim` of q and on the shared `k_pe` (rotate_half, or interleaved pairs when
  `rope_interleave`), scale `1/sqrt(nope + rope)` times `yarn_get_mscale(factor, mscale_all_dim)^2` under YaRN.
  Router: `sigmoid(x @ gate.weight.T)`; experts chosen by `score + e_score_correction_bias` (bias only chooses),
  groups of `n_experts / n_group` ranked by the sum of their top-2 biased scores, the best `topk_group` kept
  (others masked), then top-k; weights are the unbiased scores, divided by `sum + 1e-20` if `norm_topk_prob`, times
  `routed_scaling_factor`; plus `n_shared_experts` shared experts (one MLP of `n_shared * moe_intermediate_size`);
  the first `first_k_dense_replace` layers are dense MLPs of `intermediate_size`.
* glm4_moe: Llama-style GQA attention (q/k/v biases if `attention_bias`, per-head q/k RMSNorm if
  `use_qk_norm`), rotate_half rope on the first `head_dim * partial_rotary_factor` dims of each head
  (transformers' default factor 0.5), DeepSeek-V3's router (sigmoid, selection bias, groups,
  `routed_scaling_factor`), `n_shared_experts` shared experts, the first `first_k_dense_replace`
  layers dense.
* qwen3_next: Qwen3.5's Gated DeltaNet and output-gated attention, but the DeltaNet inputs come from two
  fused matrices grouped per key head: `in_proj_qkvz` rows are, per key head, q (k_dim), k (k_dim), v
  (r * v_dim) and z (r * v_dim) with r = value heads per key head; `in_proj_ba` rows are, per key head, b (r)
  then a (r). Value heads stay in the grouped order (llama.cpp's `qwen3next` converter splits `in_proj_qkvz`
  into `attn_qkv` + `attn_gate` and keeps `ssm_ba`, without reordering value heads). Router as qwen2_moe
  (softmax, `norm_topk_prob`), sigmoid-gated shared expert, `mlp_only_layers` dense layers of
  `intermediate_size`, `partial_rotary_factor` 0.25 by default.
* llama4: Llama-style GQA (no biases), rope on complex pairs (interleaved: `(2i, 2i+1)`), skipped on every
  `no_rope_layer_interval`-th layer, where queries are instead multiplied by
  `log1p(floor((pos + 1) / floor_scale)) * attn_scale + 1` (`attn_temperature_tuning`); on rope layers q and k are
  RMS-normalized per head without a weight after rope (`use_qk_norm`) and attention is chunked
  (`attention_chunk_size`: key j visible to query i iff j // C == i // C). Llama 3 rope scaling (`rope_type`
  "llama3": per frequency kept, divided by `factor` or blended, by wavelength against `original_max_position_embeddings
  / {high,low}_freq_factor`). MoE every `interleave_moe_layer_step`-th layer (dense MLPs of `intermediate_size_mlp`
  elsewhere): router top-k on the raw logits, `sigmoid(logit)` multiplies the chosen expert's INPUT, outputs summed
  unweighted, plus an ungated shared expert.
* gpt_oss: Llama-style GQA with biases on q, k, v and o, rotate_half rope (YaRN with `truncate: false`: the
  ramp between `beta_fast` and `beta_slow` is not rounded to whole dimensions; cos/sin scaled by
  `0.1 ln(factor) + 1`), a learned sink logit per head that joins every softmax's denominator and is dropped
  from the weights, `sliding_window` on the layers `layer_types` marks (default: even layers). Router
  `x @ W.T + b`, top-k of the logits, softmax over those k; experts stored transposed (`gate_up_proj` [E, H, 2I]
  with gate and up columns interleaved, `down_proj` [E, I, H]) with biases; activation `gate = min(gate, limit)`,
  `up = clamp(up, -limit, limit)`, `(up + 1) * gate * sigmoid(alpha * gate)`.
* Dense-MLP layers (`mlp_only_layers`) in qwen2/3_moe use `intermediate_size`; experts use `moe_intermediate_size`.
* GGUF metadata: `<arch>.expert_weights_norm` (bool) is written by this script for every file (llama.cpp's converter
  does not write it for these archs and hard-codes qwen3moe=true, qwen2moe=false, olmoe=false, llama=true);
  `attention.key_length`/`value_length` are written only when config.json has head_dim (qwen3moe files), as
  convert_hf_to_gguf does -- otherwise head_dim = embedding_length / head_count.  `feed_forward_length` is the
  dense-MLP size for qwen2moe/qwen3moe and the expert size for llama/olmoe; `expert_feed_forward_length` (and
  `expert_shared_feed_forward_length` for qwen2moe) give the expert sizes.  `llama.vocab_size` and
  `llama.rope.dimension_count` are written for Mixtral as LlamaModel does.  mixtral.f16.gguf uses
  `general.alignment` 64, the others 32.
* Tokenizer in GGUF: `tokenizer.ggml.model` "gpt2", `pre` "gpt-2", tokens padded to the model vocab with
  `[PAD<i>]` (token_type 5 = UNUSED), specials token_type 3, merges as "a b" strings, bos = eos = 0,
  add_bos_token false.  (tokenizer.json stores merges as 2-element arrays.)
* `scripts/gguf_numpy_reference.py tests/fixtures/models/*.gguf` is an independent float64 numpy forward that reads
  only the GGUF files with these rules and matches every GGUF oracle to < 1e-5.
"""

EXTRA_USAGE = """## Extra models for ad-hoc comparisons

```
/work/venv/bin/python scripts/make_fixtures.py --arch qwen3_moe --seed 7 --hidden 104 --experts 9 --top-k 2 \\
    --layers 4 --heads 4 --kv-heads 1 --head-dim 20 --moe-inter 44 --vocab 355 --only-one /tmp/extra --gguf q8_0
```
writes /tmp/extra/{config.json, model.safetensors, tokenizer.json, expected.json, model.q8_0.gguf,
model.q8_0.expected.json}; see the script docstring for all flags.
"""


def write_readme(out: Path, model_infos: list, gguf_infos: list, argv: list[str]):
    v = versions()
    lines = []
    lines.append("# Oracle fixtures\n")
    lines.append("Generated by `scripts/make_fixtures.py` (do not edit by hand; re-run it). Command:\n")
    lines.append("```\n/work/venv/bin/python scripts/make_fixtures.py " + " ".join(argv) + "\n```\n")
    lines.append(f"Versions: transformers {v['transformers']}, torch {v['torch']}, gguf-py {gguf_version()}, "
                 f"safetensors {safetensors.__version__}, tokenizers {tokenizers.__version__}, numpy {np.__version__} "
                 "(pinned in `scripts/requirements-fixtures.txt`).\n")
    lines.append(
        "All models are random (seeded; `initializer_range` as listed, larger than HF's 0.02 so routers are not "
        "near-uniform); RMSNorm weights are randomised to "
        "U(0.75, 1.25) and qkv biases to N(0, 0.1) so that norm/bias mix-ups are visible. "
        "`expected.json` = `{\"tokens\", \"logits\" [T][vocab], \"meta\"}`; logits are computed by transformers in "
        "float32 (eval, no_grad, eager attention, eager experts) for the prompt "
        f"`{PROMPT}` tokenized by the fixture tokenizer (13 ids, with repeats), at every position. "
        "The `min_router_gap` in meta is the smallest (k-th minus (k+1)-th) router softmax probability over all "
        "MoE layers and positions (required > 1e-3, so 1e-6 float noise cannot flip an expert choice).\n")
    lines.append("Tokenizer (`tokenizer.json`, same in every model dir): byte-level BPE, GPT-2 pre-tokenizer regex, "
                 "300 tokens = 3 specials (`<|endoftext|>`=0, `<|im_start|>`=1, `<|im_end|>`=2) + 256 byte "
                 "symbols + 41 merges; model vocab sizes are larger (rows past 299 are unused padding rows).\n")
    lines.append("## safetensors models (`models/<name>/`)\n")
    lines.append("| name | arch | seed | min gap | files | size | geometry |\n|---|---|---|---|---|---|---|")
    for mi in model_infos:
        spec = MODEL_FIXTURES[mi["name"]] if mi["name"] in MODEL_FIXTURES else MLX_FIXTURES[mi["name"]][0]
        extra = []
        if spec["arch"] in ("qwen3_5_moe", "qwen3_next"):
            extra.append("zero-centred RMSNorms (layer applies 1 + w) randomised to U(-0.25, 0.25), the gated "
                         "linear-attention norm to U(0.75, 1.25); A_log = log U(0.1, 4), dt_bias N(0, 0.1)")
        if mi["name"] in MLX_FIXTURES:
            extra.append("**MLX** layout as mlx-community writes it (`language_model.model.` prefix, "
                         "`mlp.switch_mlp` stacked experts, conv1d [C, K, 1], norms stored as 1 + w, tiny vision "
                         "tower under `vision_tower.`), affine-quantized with MLX's formula in numpy: "
                         f"`quantization` = `{json.dumps(mi['quantization'])}`, scales/biases bf16, other tensors "
                         "bf16 (A_log f32); oracle = transformers on the dequantized weights")
        if spec.get("fp8") and spec["fp8"]["block"] == "channel":
            extra.append("**FP8** as compressed-tensors writes it (GLM-4.5-FP8's format): F8_E4M3 weights with a "
                         "bf16 `weight_scale` per output channel, `quant_method` compressed-tensors; oracle = "
                         "transformers on `_dequantize_fp8_weight` of the codes")
        elif spec.get("fp8"):
            b = spec["fp8"]["block"]
            extra.append(f"**FP8** block-scaled as DeepSeek-V3/GLM-4.5 publish it: the layers' linear weights "
                         f"F8_E4M3 with `weight_scale_inv` per {b[0]}x{b[1]} tile ({spec['fp8']['scales']}, "
                         "partial tiles at the edges), routers and norms float, `quantization_config` fp8; "
                         "oracle = transformers on its own dequantization (`_dequantize_fp8_weight`)")
        if spec.get("mxfp4"):
            extra.append("**MXFP4** experts as the published checkpoints store them (`*_blocks` [E, out, in/32, 16] + "
                         "`*_scales` [E, out, in/32], E8M0, gate and up rows interleaved; quantized in numpy with "
                         "gguf-py's exponent rule, `quantization_config` mxfp4); oracle = transformers on its own "
                         "dequantization of those blocks")
        elif spec["arch"] in ("llama4", "gpt_oss"):
            extra.append("experts stored as transformers keeps them, transposed ([E, H, 2I] gate_up_proj, "
                         "[E, I, H] down_proj)" + (", gate and up columns interleaved, with biases"
                                                  if spec["arch"] == "gpt_oss" else ""))
        if spec.get("layout") == "fused":
            extra.append("**fused** expert layout (save_original_format=False), same weights/logits as qwen3_moe")
        if spec.get("dtype") == "bfloat16":
            extra.append("**bf16** weights (logits from the bf16 weights upcast to f32); config.json post-edited "
                         "to the transformers-4/hub style: `num_experts` instead of `num_local_experts`, top-level "
                         "`rope_theta` + `rope_scaling: null` instead of `rope_parameters`, `torch_dtype` instead of "
                         "`dtype` (transformers 5 loads it to identical logits, verified)")
        if spec.get("max_shard_size"):
            extra.append(f"**sharded** (max_shard_size {spec['max_shard_size']}) + model.safetensors.index.json")
        g = geometry_str(spec) + ("; " + "; ".join(extra) if extra else "")
        nst = sum(1 for f in mi["files"] if f.endswith(".safetensors"))
        lines.append(f"| {mi['name']} | {spec['arch']} | {mi['seed']} | {mi['min_gap']:.4f} | {nst} safetensors | "
                     f"{dir_size(out / 'models' / mi['name']) / 1e6:.2f} MB | {g} |")
    lines.append("")
    lines.append("## GGUF files (`models/<name>.gguf` + `models/<name without .gguf>.expected.json`)\n")
    lines.append("GGUF v3, little-endian, written with gguf-py's GGUFWriter following llama.cpp "
                 "`convert_hf_to_gguf.py`: norms, biases and routers (`ffn_gate_inp`, `ffn_gate_inp_shexp`) F32; other "
                 "matrices in the file type, F16 when the row length is not a multiple of the block size (32). "
                 "Experts stacked: `blk.N.ffn_{gate,up}_exps.weight` numpy [E, I, H] (ggml ne [H, I, E]), "
                 "`blk.N.ffn_down_exps.weight` numpy [E, H, I]. Mixtral (`llama` arch) has Q/K rows permuted "
                 "(LlamaModel.permute). Expected logits: transformers float32 with the weights replaced by the "
                 "GGUF tensors dequantized with `gguf.quants.dequantize` (permutation undone).\n")
    lines.append("| file | gguf arch | seed | min gap (dequant) | tensor types | size | geometry |\n|---|---|---|---|---|---|---|")
    for gi in gguf_infos:
        spec, q = GGUF_FIXTURES[gi["name"]]
        lines.append(f"| {gi['name']} | {GGUF_ARCH[spec['arch']]} | {gi['seed']} | {gi['min_gap']:.4f} | "
                     f"{', '.join(f'{k}:{n}' for k, n in sorted(gi['qtypes'].items()))} | {gi['size'] / 1e6:.2f} MB | "
                     f"{geometry_str(spec)}; alignment {spec.get('alignment', 32)} |")
    lines.append("")
    lines.append("## Expert storage layouts (safetensors)\n")
    lines.append(
        "transformers 5.x keeps experts in memory as stacked tensors and `save_pretrained` (default "
        "`save_original_format=True`) converts them back to the original per-expert checkpoint layout:\n\n"
        "* per-expert (qwen3_moe, qwen2_moe, olmoe): `model.layers.N.mlp.experts.E.{gate_proj,up_proj}.weight` [I, H], "
        "`model.layers.N.mlp.experts.E.down_proj.weight` [H, I], router `model.layers.N.mlp.gate.weight` [E, H]; "
        "qwen2_moe also `mlp.shared_expert.{gate,up,down}_proj.weight` and `mlp.shared_expert_gate.weight` [1, H].\n"
        "* per-expert (mixtral): `model.layers.N.block_sparse_moe.experts.E.w1.weight` (gate) [I, H], `...w3.weight` "
        "(up) [I, H], `...w2.weight` (down) [H, I], router `model.layers.N.block_sparse_moe.gate.weight` [E, H].\n"
        "* fused (`models/qwen3_moe_fused`, save_original_format=False): `model.layers.N.mlp.experts.gate_up_proj` "
        "[E, 2I, H] (no `.weight` suffix; rows 0..I-1 = gate_proj, rows I..2I-1 = up_proj, verified against the "
        "per-expert file and the modeling code's `.chunk(2, dim=-1)`), `model.layers.N.mlp.experts.down_proj` [E, H, I].\n")
    lines.append(SEMANTICS)
    lines.append("## Quant block vectors (`quants/`)\n")
    lines.append("`<TYPE>.bin` raw blocks, `<TYPE>.f32` = gguf-py dequantization (little-endian f32); `index.json` has "
                 "n_blocks, block_size, type_size, ggml_type_id and the byte layout / overwritten scale-field offsets.\n")
    lines.append("`summary.json` is the machine-readable manifest of this run (seeds, gaps, files, sizes).\n")
    lines.append(EXTRA_USAGE)
    total = dir_size(out)
    lines.append(f"Total size of tests/fixtures: about {total / 1e6:.1f} MB (README included).\n")
    (out / "README.md").write_text("\n".join(lines))


# ----------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------

SHAPE_FLAGS = ["hidden", "experts", "top_k", "layers", "heads", "kv_heads", "head_dim", "moe_inter", "inter",
               "shared_inter", "vocab"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="tests/fixtures", help="fixture root (default tests/fixtures)")
    ap.add_argument("--only", default=None, help="comma-separated built-in fixture names (see --list)")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--no-gguf", action="store_true")
    ap.add_argument("--no-quants", action="store_true")
    ap.add_argument("--min-gap", type=float, default=1e-3)
    # single custom model
    ap.add_argument("--arch", choices=sorted(ARCH_CLASSES))
    ap.add_argument("--seed", type=int)
    ap.add_argument("--only-one", metavar="DIR", help="write one custom model (needs --arch) to DIR")
    ap.add_argument("--gguf", choices=["f16", "bf16", "q8_0", "q4_0"], help="with --only-one: also write DIR/model.<type>.gguf")
    for f in SHAPE_FLAGS:
        ap.add_argument("--" + f.replace("_", "-"), type=int)
    ap.add_argument("--init-range", type=float)
    ap.add_argument("--rope-theta", type=float)
    ap.add_argument("--mlp-only-layers", type=str)
    ap.add_argument("--norm-topk-prob", type=int, choices=[0, 1])
    ap.add_argument("--tie", type=int, choices=[0, 1])
    ap.add_argument("--dtype", choices=["float32", "bfloat16"])
    ap.add_argument("--layout", choices=["per_expert", "fused"])
    ap.add_argument("--max-shard-size", type=str)
    args = ap.parse_args()

    names = list(MODEL_FIXTURES) + list(GGUF_FIXTURES) + list(MLX_FIXTURES) + ["quants"]
    if args.list:
        print("\n".join(names))
        return

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    tok = build_tokenizer()
    ids = prompt_ids(tok)
    print(f"prompt ids: {ids}")

    if args.arch or args.only_one:
        if not (args.arch and args.only_one):
            ap.error("--only-one DIR and --arch NAME go together")
        spec = dict(BASE[args.arch])
        if args.seed is not None:
            spec["seed"] = args.seed
        for f in SHAPE_FLAGS:
            if getattr(args, f) is not None:
                spec[f] = getattr(args, f)
        for f in ["init_range", "rope_theta", "dtype", "layout", "max_shard_size"]:
            if getattr(args, f) is not None:
                spec[f] = getattr(args, f)
        if args.mlp_only_layers is not None:
            spec["mlp_only_layers"] = [int(x) for x in args.mlp_only_layers.split(",") if x.strip()]
        if args.norm_topk_prob is not None:
            spec["norm_topk_prob"] = bool(args.norm_topk_prob)
        if args.tie is not None:
            spec["tie"] = bool(args.tie)
        d = Path(args.only_one)
        make_model_fixture(d.name, spec, d, tok, ids, args.min_gap)
        if args.gguf:
            q = args.gguf.upper()
            make_gguf_fixture(f"model.{args.gguf}.gguf", spec, q, d / f"model.{args.gguf}.gguf", tok, ids, args.min_gap)
        return

    out = Path(args.out)
    only = set(args.only.split(",")) if args.only else None
    if only:
        unknown = only - set(names)
        if unknown:
            ap.error(f"unknown fixture(s) {sorted(unknown)}; see --list")
    (out / "models").mkdir(parents=True, exist_ok=True)

    model_infos, gguf_infos = [], []
    for name, spec in MODEL_FIXTURES.items():
        if only and name not in only:
            continue
        model_infos.append(make_model_fixture(name, spec, out / "models" / name, tok, ids, args.min_gap))
    if (not only or "qwen3_moe_fused" in only) and (out / "models/qwen3_moe/model.safetensors").exists() \
            and (out / "models/qwen3_moe_fused/model.safetensors").exists():
        check_layouts(out / "models/qwen3_moe", out / "models/qwen3_moe_fused", MODEL_FIXTURES["qwen3_moe"])
        a = json.loads((out / "models/qwen3_moe/expected.json").read_text())
        b = json.loads((out / "models/qwen3_moe_fused/expected.json").read_text())
        assert a["logits"] == b["logits"] and a["meta"]["seed"] == b["meta"]["seed"]
    if not args.no_gguf:
        for name, (spec, q) in GGUF_FIXTURES.items():
            if only and name not in only:
                continue
            gguf_infos.append(make_gguf_fixture(name, spec, q, out / "models" / name, tok, ids, args.min_gap))
    for name, (spec, base_q, overrides) in MLX_FIXTURES.items():
        if only and name not in only:
            continue
        model_infos.append(make_mlx_fixture(name, spec, base_q, overrides, out / "models" / name, tok, ids,
                                            args.min_gap))
    if not args.no_quants and (not only or "quants" in only):
        make_quants(out / "quants")
    summary = {"models": model_infos, "gguf": [{k: v for k, v in g.items() if k != "tensor_types"} for g in gguf_infos]}
    if not only:
        write_readme(out, model_infos, gguf_infos, sys.argv[1:])
        (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
