#!/usr/bin/env python3
"""GGUF fixtures made by llama.cpp's own converter, with transformers oracles.

    /work/venv/bin/python scripts/llama_cpp_fixtures.py --llama-cpp DIR \
        [--out tests/fixtures/llamacpp] [--only qwen3_moe,deepseek_v3] [--types f32,f16,q8_0]

DIR is a llama.cpp checkout with `convert_hf_to_gguf.py` and `gguf-py` (the
llama-cpp-python source distribution on PyPI vendors one under
`vendor/llama.cpp`). Needs the fixture requirements of make_fixtures.py plus
`sentencepiece` (the converter imports it for llama-family vocabularies).

For every architecture, a tiny random transformers model (make_fixtures.py's
machinery, its own seed and shapes) is saved to a temporary directory and
converted by `convert_hf_to_gguf.py` at each type. The oracle of each file is
transformers run on the weights the file holds: every weight is replaced by
its round trip through the type llama.cpp chose for it (f32, f16, bf16 or
q8_0 with gguf-py's own quantizer), found row by row as the one whose bytes
the file contains (`Stored.as_stored`) -- no name mapping is assumed, so the converter's
renames, splits, transposes and row permutations need no mirror here
(reorderings along a row, which regroup quantization blocks, do: see
`column_orders`; so do weights transformers keeps transposed, Llama 4's
experts and gpt-oss's, matched with their axes swapped). 1-D
tensors are kept f32 by the converter (some transformed, e.g. Qwen3.5's
1 + w norms) and are used as they are.

What the converter needs that a tiny model lacks or that transformers drops
is supplied here, and said so:
* it identifies BPE pre-tokenizers by hashing the tokenization of a fixed
  text; the fixture tokenizer (byte-level BPE with GPT-2's regex) matches no
  published hash, so `get_vocab_base_pre` is made to answer "gpt-2";
* GLM's converter looks up its special tokens (`[gMASK]`, `<|user|>`,
  `<|observation|>`) by name; they are added to the tokenizer (ids above
  the prompt's, which does not change);
* DeepSeek's published config.json carries `scoring_func: "sigmoid"`, which
  transformers' DeepseekV3Config does not write back; the converter reads the
  gating function from it, so it is added before conversion.

Writes OUT/<arch>.<type>.gguf, OUT/<arch>.<type>.expected.json and
OUT/README.md (what converted, what did not and the converter's message).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402

B = mf.BASE
# name -> (spec, keys the hub's config.json has and transformers drops, converter flags, why)
MODELS = {
    # no dense (mlp_only) layers: llama.cpp's qwen3moe / qwen2moe have none
    "qwen3_moe": (dict(B["qwen3_moe"], seed=7000, vocab=307, hidden=64, heads=4, kv_heads=2, head_dim=16,
                       experts=6, top_k=2, moe_inter=32, mlp_only_layers=[], layers=2), {}, [],
                  "no dense layers: with mlp_only_layers the converter stops with \"Can not map tensor 'model.layers.N.mlp.down_proj.weight'\""),
    "qwen2_moe": (dict(B["qwen2_moe"], seed=7100, vocab=329, hidden=64, heads=4, kv_heads=2, experts=6,
                       top_k=2, moe_inter=32, shared_inter=64, mlp_only_layers=[], layers=2), {}, [],
                  "no dense layers: with mlp_only_layers the converter stops with \"Can not map tensor 'model.layers.N.mlp.down_proj.weight'\""),
    "mixtral": (dict(B["mixtral"], seed=7200, hidden=64, heads=4, kv_heads=2, experts=4, moe_inter=32,
                     layers=2), {}, [], "Q/K rows permuted by the converter"),
    "olmoe": (dict(B["olmoe"], seed=7300, hidden=64, heads=4, kv_heads=2, experts=6, top_k=2, moe_inter=32,
                   layers=2), {}, [], "tied embeddings"),
    "qwen3_5_moe": (dict(B["qwen3_5_moe"], seed=7400, experts=6), {}, ["--no-mtp"],
                    "--no-mtp: the converter otherwise asks for MTP layers the model does not have"),
    # mscale == mscale_all_dim as in the published checkpoints: the converter keeps only
    # mscale_all_dim and llama.cpp reads mscale as equal to it
    "deepseek_v3": (dict(B["deepseek_v3"], seed=7500, experts=8, moe_inter=32, layers=3,
                         yarn=dict(B["deepseek_v3"]["yarn"], mscale=0.7, mscale_all_dim=0.7)),
                    {"scoring_func": "sigmoid", "topk_method": "noaux_tc"}, [],
                    "absorbed-MLA split attn_k_b / attn_v_b, YaRN with yarn_log_multiplier"),
    # one group: the converter writes no expert_group_count for glm4moe
    "glm4_moe": (dict(B["glm4_moe"], seed=7600, head_dim=16, moe_inter=32, n_group=1, topk_group=1),
                 {}, ["--no-mtp"], "q/k/v biases, per-head q/k norms, partial rotary, sigmoid routing"),
    # llama.cpp's qwen3next has no dense layers and always renormalizes the top-k; widths of
    # whole q8_0 blocks so the fused projections are quantized too
    "qwen3_next": (dict(B["qwen3_next"], seed=7700, moe_inter=32, shared_inter=64, lin_v_dim=16,
                        mlp_only_layers=[], norm_topk_prob=True), {}, ["--no-mtp"],
                   "in_proj_qkvz split into attn_qkv + attn_gate, in_proj_ba kept fused as ssm_ba"),
    # llama.cpp reads no chunk size, temperature floor or scale from the file: it uses Llama 4's
    # published 8192, 8192 and 0.1, which the oracle model has too (the prompt is shorter than
    # both); Llama 3 rope scaling becomes the rope_freqs tensor
    "llama4": (dict(B["llama4"], seed=9700, inter=64, chunk=8192, floor_scale=8192, attn_scale=0.1),
               {}, [], "experts transposed back, gate_up split; rope_freqs; no-rope every 4th layer"),
    # llama.cpp hard-codes gpt-oss's SwiGLU limit 7 and alpha 1.702 and reads no layer pattern
    # (even layers slide), so the oracle model has those; YaRN unrounded (llama.cpp rounds it)
    "gpt_oss": (dict(B["gpt_oss"], seed=9900, swiglu_limit=7.0, swiglu_alpha=1.702, layers=3), {}, [],
                "float experts transposed back, gate_up de-interleaved; sinks; expert biases"),
    # the published layout: MXFP4 experts, which the converter repacks into GGUF's MXFP4 blocks
    "gpt_oss_mxfp4": (dict(B["gpt_oss"], seed=9950, swiglu_limit=7.0, swiglu_alpha=1.702, layers=3,
                           mxfp4=True), {}, [],
                      "MXFP4 experts repacked to GGUF MXFP4 (gate/up de-interleaved); the rest at the type"),
}

GLM_SPECIALS = ["<|endoftext|>", "[gMASK]", "<|user|>", "<|observation|>"]

CONVERT = """
import runpy, sys
from pathlib import Path
root = Path(sys.argv.pop(1))
sys.path.insert(0, str(root)); sys.path.insert(1, str(root / "gguf-py"))
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tok: "gpt-2"
sys.argv[0] = str(root / "convert_hf_to_gguf.py")
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def convert(llama: Path, src: Path, out: Path, outtype: str, flags: list[str]) -> str | None:
    """Runs the converter; None on success, else its last error line."""
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(CONVERT)
    try:
        r = subprocess.run([sys.executable, f.name, str(llama), str(src), "--outtype", outtype,
                            "--outfile", str(out), *flags], capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    if r.returncode == 0 and out.exists():
        return None
    lines = [l for l in (r.stderr + r.stdout).splitlines() if l.strip()]
    return lines[-1] if lines else f"exit status {r.returncode}"


def roundtrips(x: np.ndarray, gguf) -> list[tuple[str, np.ndarray]]:
    """The candidate storages of a float32 array (last axis = GGUF rows)."""
    qt = gguf.GGMLQuantizationType
    out = [("F32", x), ("F16", x.astype(np.float16).astype(np.float32))]
    for t in (qt.Q8_0, qt.BF16):
        try:
            out.append((t.name, gguf.quants.dequantize(gguf.quants.quantize(x, t), t).astype(np.float32)
                        .reshape(x.shape)))
        except Exception:  # rows not a multiple of the block: the converter falls back too
            pass
    return out


def column_orders(name: str, spec: dict):
    """The converter's reorderings along a matrix's rows (GGUF's blocking
    axis), as (forward, inverse) pairs: they change which values share a
    quantization block, so the round trip must be taken in the file's order.
    The one there is: Qwen3.5's value heads, grouped -> tiled, along
    out_proj's inputs."""
    ident = [(lambda a: a, lambda a: a)]
    if spec["arch"] == "qwen3_5_moe" and name.endswith("linear_attn.out_proj.weight"):
        nk, nv = spec["lin_k_heads"], spec["lin_v_heads"]
        return ident + [(lambda a: mf.v_heads_tiled(a, nk, nv, axis=1),
                         lambda a: mf.v_heads_grouped(a, nk, nv, axis=1))]
    return ident


class Stored:
    """What a GGUF file holds, dequantized: every row (along ne0) by its
    bytes, and every value by type, to find how each weight was stored."""

    def __init__(self, reader, gguf):
        self.rows: set[bytes] = set()
        pools: dict[str, list] = {}
        self.types: dict[str, int] = {}
        for t in reader.tensors:
            v = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
            name = t.tensor_type.name
            self.types[name] = self.types.get(name, 0) + 1
            if v.ndim >= 2:
                self.rows.update(r.tobytes() for r in v.reshape(-1, v.shape[-1]))
            pools.setdefault(name, []).append(v.ravel().view(np.uint32))
        self.pools = {k: np.unique(np.concatenate(v)) for k, v in pools.items()}

    def as_stored(self, name: str, w: np.ndarray, gguf, spec: dict) -> np.ndarray:
        """`w` as the file holds it, decided row by row. A row stored whole
        is found by its exact bytes (no chance match over 32+ values); a row
        the converter transposed (MLA's attn_k_b) only by its values, which
        is safe for f32 and f16 values alone: block-scaled q8_0 values
        recur by chance in a large pool."""
        if w.ndim <= 1:
            return w
        rows = w.reshape(-1, w.shape[-1])
        out = np.empty_like(rows)
        done = np.zeros(rows.shape[0], dtype=bool)
        cands = []
        for fwd, inv in column_orders(name, spec):
            for t, y in roundtrips(np.ascontiguousarray(fwd(rows)), gguf):
                y = np.ascontiguousarray(y, dtype=np.float32)
                cands.append((t, y, np.ascontiguousarray(inv(y), dtype=np.float32)))
        for i in range(rows.shape[0]):
            for _, in_file, y in cands:
                if in_file[i].tobytes() in self.rows:
                    out[i] = y[i]
                    done[i] = True
                    break
        for t, _, y in cands:
            if t not in ("F32", "F16") or t not in self.pools:
                continue
            ok = np.isin(y.view(np.uint32), self.pools[t]).all(axis=1) & ~done
            out[ok] = y[ok]
            done |= ok
        if not done.all():
            raise SystemExit(f"{name}: {int((~done).sum())} rows are in no type the file holds "
                             "(quantized along another axis?)")
        return out.reshape(w.shape)


@torch.no_grad()
def oracle(model, spec: dict, path: Path, ids, gguf) -> tuple[np.ndarray, float, dict]:
    stored = Stored(gguf.GGUFReader(str(path)), gguf)
    m = copy.deepcopy(model)
    for name, w in m.state_dict().items():
        if not w.is_floating_point() or name.endswith("inv_freq"):
            continue
        if spec.get("mxfp4") and name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            continue  # MXFP4 in the file too, repacked without loss
        x = w.float().numpy()
        # Llama 4's experts are [E, in, out] in transformers: the file's rows (its blocking
        # axis) are their columns
        swap = spec["arch"] in ("llama4", "gpt_oss") and name.endswith(
            ("experts.gate_up_proj", "experts.down_proj"))
        if swap:
            x = np.ascontiguousarray(np.swapaxes(x, -1, -2))
        y = stored.as_stored(name, x, gguf, spec)
        if swap:
            y = np.swapaxes(y, -1, -2)
        w.copy_(torch.from_numpy(np.ascontiguousarray(y)))
    logits, gap, _ = mf.forward_with_gaps(m, ids, spec["top_k"])
    return logits, gap, stored.types


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llama-cpp", required=True, type=Path)
    ap.add_argument("--out", default="tests/fixtures/llamacpp", type=Path)
    ap.add_argument("--only", default=None)
    ap.add_argument("--types", default="f32,f16,q8_0")
    ap.add_argument("--min-gap", type=float, default=1e-3)
    args = ap.parse_args()
    sys.path.insert(0, str(args.llama_cpp / "gguf-py"))
    import gguf  # the checkout's own gguf-py, as its converter uses

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    tok = mf.build_tokenizer()
    ids = mf.prompt_ids(tok)
    names = args.only.split(",") if args.only else list(MODELS)
    types = args.types.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    rows, failures = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            spec, extra_cfg, flags, note = MODELS[name]
            src = Path(tmp) / name
            info = mf.make_model_fixture(name, spec, src, tok, ids, args.min_gap)
            if spec["arch"] == "glm4_moe":
                # the converter looks GLM's special tokens up by name
                from tokenizers import Tokenizer
                t = Tokenizer.from_file(str(src / "tokenizer.json"))
                t.add_special_tokens([x for x in GLM_SPECIALS if t.token_to_id(x) is None])
                assert t.get_vocab_size() <= spec["vocab"]
                t.save(str(src / "tokenizer.json"))
            if extra_cfg:
                cfg = json.loads((src / "config.json").read_text())
                cfg.update(extra_cfg)
                (src / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
            if spec.get("mxfp4"):
                # transformers would want its MXFP4 kernels to load the checkpoint
                model = mf.mxfp4_reference(src, spec, info["seed"])
            else:
                model = mf.model_class(spec).from_pretrained(src, dtype=torch.float32)
            mf.set_eager(model)
            model.eval()
            for t in types:
                path = args.out / f"{name}.{t}.gguf"
                err = convert(args.llama_cpp, src, path, t, flags)
                if err is not None:
                    print(f"[{name} {t}] converter failed: {err}", flush=True)
                    failures.append((name, t, err))
                    continue
                logits, gap, ttypes = oracle(model, spec, path, ids, gguf)
                meta = dict(mf.versions(), seed=info["seed"], arch=spec["arch"], prompt=mf.PROMPT,
                            converter="llama.cpp convert_hf_to_gguf.py", outtype=t,
                            tensor_types=ttypes, min_router_gap=gap)
                mf.write_expected(path.with_suffix(".expected.json"), ids, logits, meta)
                size = path.stat().st_size
                rows.append((path.name, spec["arch"], info["seed"], gap, ttypes, size, note))
                print(f"[{name} {t}] {size / 1e6:.2f} MB {ttypes} router gap {gap:.4f}", flush=True)
    write_readme(args, rows, failures)
    return 0


def write_readme(args, rows, failures):
    lines = [
        "# GGUF fixtures made by llama.cpp's converter",
        "",
        "Generated by",
        "",
        "```",
        f"/work/venv/bin/python scripts/llama_cpp_fixtures.py --llama-cpp LLAMA_CPP --out {args.out} "
        f"--types {args.types}" + (" (and --only ARCH for architectures added later)" if args.only else ""),
        "```",
        "",
        "with LLAMA_CPP the llama.cpp vendored by llama-cpp-python 0.3.36 (PyPI source distribution).",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in mf.versions().items()) + ". Each `NAME.expected.json` holds transformers' logits on the",
        "weights as the file stores them (see the script's docstring for how they are found).",
        "",
        "| file | arch | seed | min router gap | tensor types | size | note |",
        "|---|---|---|---|---|---|---|",
    ]
    table = {}
    readme = args.out / "README.md"
    if args.only and readme.exists():
        # a partial run keeps the rows of the files it did not remake
        for line in readme.read_text().splitlines():
            cells = line.split(" | ")
            if line.startswith("| ") and cells[0][2:].endswith(".gguf") and (args.out / cells[0][2:]).exists():
                table[cells[0][2:]] = line
    for f, arch, seed, gap, tt, size, note in rows:
        tts = ", ".join(f"{k}:{v}" for k, v in sorted(tt.items()))
        table[f] = f"| {f} | {arch} | {seed} | {gap:.4f} | {tts} | {size / 1e6:.2f} MB | {note} |"
    order = {n: i for i, n in enumerate(MODELS)}
    kinds = ["f32", "f16", "bf16", "q8_0"]

    def key(f):
        stem, kind, _ = f.rsplit(".", 2)
        return order.get(stem, len(order)), kinds.index(kind) if kind in kinds else len(kinds), f

    lines += [table[f] for f in sorted(table, key=key)]
    if failures:
        lines += ["", "## Not converted", ""]
        lines += [f"* {n} {t}: `{e}`" for n, t, e in failures]
    (args.out / "README.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
