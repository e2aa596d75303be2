#!/usr/bin/env python3
"""Independent numpy forward pass over the GGUF fixtures (no transformers).

Reads only the .gguf file (metadata + tensors, dequantized with gguf-py) and
implements the llama.cpp semantics a GGUF reader must use:

* rope: arch `llama` -> "normal" rope on ADJACENT pairs (x[2i], x[2i+1]),
  because convert_hf_to_gguf permuted the Q/K rows; qwen2moe / qwen3moe /
  olmoe -> NEOX rope on HALVES (x[i], x[i + d/2]), no permutation.
* qwen3moe: attn_q_norm / attn_k_norm are RMSNorms over each head (len head_dim),
  applied before rope.  olmoe: attn_q_norm (len n_head*head_dim) / attn_k_norm
  (len n_kv*head_dim) over the WHOLE projection, before splitting into heads.
* router: softmax over all experts (f32), top-k, optionally renormalised
  (`<arch>.expert_weights_norm`), expert out = down(silu(gate x) * up x) * w.
* qwen2moe shared expert: + sigmoid(ffn_gate_inp_shexp . x) * shexp(x).

Then compares with <name>.expected.json.  Usage:

    /work/venv/bin/python scripts/gguf_numpy_reference.py tests/fixtures/models/*.gguf
"""

import json
import sys
from pathlib import Path

import numpy as np
import gguf


def kv(r, key):
    f = r.fields[key]
    if f.types[0] == gguf.GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode()
    if f.types[0] == gguf.GGUFValueType.ARRAY:
        return [f.parts[i].tolist()[0] if len(f.parts[i]) == 1 else bytes(f.parts[i]).decode() for i in f.data]
    return f.parts[f.data[0]].tolist()[0]


def load(path):
    r = gguf.GGUFReader(path)
    t = {}
    for ti in r.tensors:
        a = gguf.quants.dequantize(ti.data, ti.tensor_type).astype(np.float64)
        t[ti.name] = a.reshape([int(x) for x in reversed(ti.shape.tolist())])
    return r, t


def rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def silu(x):
    return x / (1 + np.exp(-x))


def rope(x, pos, theta, neox):
    # x [T, H, D]
    d = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
    ang = pos[:, None] * inv[None, :]  # [T, D/2]
    c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    if neox:
        a, b = x[..., : d // 2], x[..., d // 2:]
        return np.concatenate([a * c - b * s, a * s + b * c], -1)
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = a * c - b * s
    out[..., 1::2] = a * s + b * c
    return out


def forward(path, ids):
    r, t = load(path)
    arch = kv(r, "general.architecture")
    g = lambda k, d=None: kv(r, f"{arch}.{k}") if f"{arch}.{k}" in r.fields else d
    n_layer, n_embd = g("block_count"), g("embedding_length")
    n_head, n_kv = g("attention.head_count"), g("attention.head_count_kv")
    hd = g("attention.key_length", n_embd // n_head)
    eps, theta = g("attention.layer_norm_rms_epsilon"), g("rope.freq_base")
    k_used = g("expert_used_count")
    norm_w = bool(g("expert_weights_norm"))
    neox = arch != "llama"
    T = len(ids)
    pos = np.arange(T, dtype=np.float64)
    x = t["token_embd.weight"][ids]
    mask = np.triu(np.full((T, T), -np.inf), 1)
    for l in range(n_layer):
        b = f"blk.{l}."
        h = rms(x, t[b + "attn_norm.weight"], eps)
        q = h @ t[b + "attn_q.weight"].T + t.get(b + "attn_q.bias", 0)
        k = h @ t[b + "attn_k.weight"].T + t.get(b + "attn_k.bias", 0)
        v = h @ t[b + "attn_v.weight"].T + t.get(b + "attn_v.bias", 0)
        if arch == "olmoe":
            q = rms(q, t[b + "attn_q_norm.weight"], eps)
            k = rms(k, t[b + "attn_k_norm.weight"], eps)
        q, k, v = q.reshape(T, n_head, hd), k.reshape(T, n_kv, hd), v.reshape(T, n_kv, hd)
        if arch == "qwen3moe":
            q = rms(q, t[b + "attn_q_norm.weight"], eps)
            k = rms(k, t[b + "attn_k_norm.weight"], eps)
        q, k = rope(q, pos, theta, neox), rope(k, pos, theta, neox)
        rep = n_head // n_kv
        k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
        att = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd) + mask
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        o = np.einsum("hts,shd->thd", att, v).reshape(T, n_head * hd)
        x = x + o @ t[b + "attn_output.weight"].T
        h = rms(x, t[b + "ffn_norm.weight"], eps)
        if b + "ffn_gate_inp.weight" in t:
            logits = h @ t[b + "ffn_gate_inp.weight"].T
            p = np.exp(logits - logits.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            out = np.zeros_like(h)
            for i in range(T):
                top = np.argsort(-p[i], kind="stable")[:k_used]
                w = p[i, top] / (p[i, top].sum() if norm_w else 1.0)
                for e, we in zip(top, w):
                    y = silu(t[b + "ffn_gate_exps.weight"][e] @ h[i]) * (t[b + "ffn_up_exps.weight"][e] @ h[i])
                    out[i] += we * (t[b + "ffn_down_exps.weight"][e] @ y)
            if b + "ffn_gate_inp_shexp.weight" in t:
                sg = 1 / (1 + np.exp(-(h @ t[b + "ffn_gate_inp_shexp.weight"].T)))  # [T, 1]
                y = silu(h @ t[b + "ffn_gate_shexp.weight"].T) * (h @ t[b + "ffn_up_shexp.weight"].T)
                out += sg * (y @ t[b + "ffn_down_shexp.weight"].T)
        else:
            y = silu(h @ t[b + "ffn_gate.weight"].T) * (h @ t[b + "ffn_up.weight"].T)
            out = y @ t[b + "ffn_down.weight"].T
        x = x + out
    x = rms(x, t["output_norm.weight"], eps)
    head = t.get("output.weight", t["token_embd.weight"])
    return x @ head.T


def main():
    worst = 0.0
    for p in sys.argv[1:]:
        exp = json.loads(Path(p[: -len(".gguf")] + ".expected.json").read_text())
        got = forward(p, exp["tokens"])
        err = float(np.abs(got - np.array(exp["logits"])).max())
        worst = max(worst, err)
        print(f"{p}: max |numpy - expected| = {err:.2e}")
    assert worst < 1e-3, worst


if __name__ == "__main__":
    main()
