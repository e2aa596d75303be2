#!/usr/bin/env python3
"""Writes a random-weight block-scaled FP8 checkpoint of DeepSeek-V3's (or Kimi K2's) real geometry
at a reduced layer count, laid out as the published ones are: Hugging Face names, one expert per
tensor, every linear weight of the layers F8_E4M3 with an f32 `weight_scale_inv` per 128x128 tile,
routers, norms, embeddings and the output head in bf16/f32, one shard per layer plus an index.

`sluice synth` writes GGUF, which has no FP8 type; this is its counterpart for benchmarking FP8
streaming at full width (`sluice bench --model DIR --ram-cap ...`). Needs numpy only.

    python3 scripts/fp8_geometry.py --preset deepseek-v3 --layers 4 --out /tmp/ds-fp8
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

PRESETS = {
    # DeepSeek-V3/R1's config.json (Kimi K2: 384 experts, 64 heads, one dense layer)
    "deepseek-v3": dict(vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
                        n_routed_experts=256, n_shared_experts=1, num_attention_heads=128,
                        num_key_value_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                        qk_rope_head_dim=64, v_head_dim=128, first_k_dense_replace=3, n_group=8, topk_group=4,
                        num_experts_per_tok=8, routed_scaling_factor=2.5),
    "kimi-k2": dict(vocab_size=163840, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
                    n_routed_experts=384, n_shared_experts=1, num_attention_heads=64, num_key_value_heads=64,
                    q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                    v_head_dim=128, first_k_dense_replace=1, n_group=1, topk_group=1, num_experts_per_tok=8,
                    routed_scaling_factor=2.827),
}
BLOCK = 128


class Shard:
    """One safetensors file written tensor by tensor (header first, sizes known in advance)."""

    def __init__(self, path: Path, specs: list):
        self.path, self.specs = path, specs
        header, off = {}, 0
        for name, dtype, shape, _ in specs:
            n = math.prod(shape) * {"F8_E4M3": 1, "BF16": 2, "F32": 4}[dtype]
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + n]}
            off += n
        header["__metadata__"] = {"format": "pt"}
        h = json.dumps(header, separators=(",", ":")).encode()
        h += b" " * (-len(h) % 8)
        self.header = len(h).to_bytes(8, "little") + h
        self.bytes = off

    def write(self, rng: np.random.Generator):
        with open(self.path, "wb") as f:
            f.write(self.header)
            for _, dtype, shape, fill in self.specs:
                fill(f, rng, shape)


def fp8_codes(f, rng, shape):
    """Codes of exponent 4..9 (|value| 1/8 .. 15/4 before the scale), random signs, in 64 MB pieces."""
    n = math.prod(shape)
    for i in range(0, n, 1 << 26):
        m = min(1 << 26, n - i)
        c = rng.integers(32, 80, m, dtype=np.uint8) | (rng.integers(0, 256, m, dtype=np.uint8) & 0x80)
        f.write(c.tobytes())


def fp8_scales(cols):
    def fill(f, rng, shape):
        s = rng.uniform(0.5, 1.5, math.prod(shape)).astype(np.float32) / (4 * math.sqrt(cols))
        f.write(s.tobytes())
    return fill


def bf16_random(scale):
    def fill(f, rng, shape):
        n = math.prod(shape)
        for i in range(0, n, 1 << 25):
            m = min(1 << 25, n - i)
            v = (rng.uniform(-scale, scale, m).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
            f.write(v.tobytes())
    return fill


def f32_const(v):
    def fill(f, rng, shape):
        f.write(np.full(math.prod(shape), v, dtype=np.float32).tobytes())
    return fill


def linear(specs, name, rows, cols):
    specs.append((f"{name}.weight", "F8_E4M3", (rows, cols), fp8_codes))
    specs.append((f"{name}.weight_scale_inv", "F32", (-(-rows // BLOCK), -(-cols // BLOCK)), fp8_scales(cols)))


def layer_specs(c: dict, i: int) -> list:
    h, p, s = c["hidden_size"], f"model.layers.{i}.", []
    heads, nope, rope, vd = c["num_attention_heads"], c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
    s.append((p + "input_layernorm.weight", "F32", (h,), f32_const(1.0)))
    s.append((p + "post_attention_layernorm.weight", "F32", (h,), f32_const(1.0)))
    a = p + "self_attn."
    linear(s, a + "q_a_proj", c["q_lora_rank"], h)
    s.append((a + "q_a_layernorm.weight", "F32", (c["q_lora_rank"],), f32_const(1.0)))
    linear(s, a + "q_b_proj", heads * (nope + rope), c["q_lora_rank"])
    linear(s, a + "kv_a_proj_with_mqa", c["kv_lora_rank"] + rope, h)
    s.append((a + "kv_a_layernorm.weight", "F32", (c["kv_lora_rank"],), f32_const(1.0)))
    linear(s, a + "kv_b_proj", heads * (nope + vd), c["kv_lora_rank"])
    linear(s, a + "o_proj", h, heads * vd)
    m = p + "mlp."
    if i < c["first_k_dense_replace"]:
        inter = c["intermediate_size"]
        linear(s, m + "gate_proj", inter, h)
        linear(s, m + "up_proj", inter, h)
        linear(s, m + "down_proj", h, inter)
        return s
    e, inter = c["n_routed_experts"], c["moe_intermediate_size"]
    s.append((m + "gate.weight", "BF16", (e, h), bf16_random(0.05)))
    s.append((m + "gate.e_score_correction_bias", "F32", (e,), f32_const(0.0)))
    for x in range(e):
        linear(s, f"{m}experts.{x}.gate_proj", inter, h)
        linear(s, f"{m}experts.{x}.up_proj", inter, h)
        linear(s, f"{m}experts.{x}.down_proj", h, inter)
    si = inter * c["n_shared_experts"]
    linear(s, m + "shared_experts.gate_proj", si, h)
    linear(s, m + "shared_experts.up_proj", si, h)
    linear(s, m + "shared_experts.down_proj", h, si)
    return s


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="deepseek-v3")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    c = dict(PRESETS[a.preset])
    if a.layers <= c["first_k_dense_replace"]:
        ap.error(f"--layers {a.layers} holds no MoE layer (the first {c['first_k_dense_replace']} are dense)")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = dict(c, architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", num_hidden_layers=a.layers,
               num_nextn_predict_layers=0, hidden_act="silu", rms_norm_eps=1e-6, rope_theta=10000.0,
               max_position_embeddings=163840, tie_word_embeddings=False, norm_topk_prob=True,
               scoring_func="sigmoid", topk_method="noaux_tc", torch_dtype="bfloat16",
               rope_scaling={"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                             "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
               quantization_config={"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                    "weight_block_size": [BLOCK, BLOCK]})
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    h, v = c["hidden_size"], c["vocab_size"]
    shards = [("model-embed.safetensors", [
        ("model.embed_tokens.weight", "BF16", (v, h), bf16_random(0.05)),
        ("model.norm.weight", "F32", (h,), f32_const(1.0)),
        ("lm_head.weight", "BF16", (v, h), bf16_random(0.05)),
    ])]
    shards += [(f"model-layer-{i:03d}.safetensors", layer_specs(c, i)) for i in range(a.layers)]
    rng = np.random.default_rng(a.seed)
    index, total = {}, 0
    for fname, specs in shards:
        sh = Shard(out / fname, specs)
        sh.write(rng)
        total += sh.bytes
        index.update({name: fname for name, *_ in specs})
        print(f"{fname}: {sh.bytes / 1e9:.2f} GB", flush=True)
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=2) + "\n")
    print(f"{out}: {a.preset} FP8, {a.layers} layers, {total / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
