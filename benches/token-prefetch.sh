#!/usr/bin/env bash
# Token-keyed prefetch under routing replay, every trace measured with a
# predictor seeded from the others (leave one out).
# 1. The model-free simulator, all traces, at each drive speed in GBPS_LIST:
#    sluice sim --model q15.gguf --device iphone-17-pro --ram-cap 2500M
#      --flash-gbps G --trace T --tokens 64 --prompt-tokens 57 --prefetch P
# 2. The engine on the phone's clock (--backend sim: a real forward pass,
#    reads paced and compute timed on the device), the traces in
#    ENGINE_TRACES, cold: sluice bench --backend sim ... --replay T.
# Usage: benches/token-prefetch.sh DIR TRACES_DIR
#   [GBPS_LIST (default "1.2 2.4 3.2 5.0")] [ENGINE_TRACES (default
#   "cooking_1 history_1 ml_moe_1"; "" for none)] [ENGINE_GBPS (default 3.2)]
# Results in DIR/token-prefetch-*.jsonl and as tables on stdout.
set -euo pipefail
dir=${1:?usage: benches/token-prefetch.sh DIR TRACES_DIR [GBPS_LIST] [ENGINE_TRACES] [ENGINE_GBPS]}
traces=${2:?usage: benches/token-prefetch.sh DIR TRACES_DIR [GBPS_LIST] [ENGINE_TRACES] [ENGINE_GBPS]}
speeds=${3:-1.2 2.4 3.2 5.0}
engine_traces=${4-cooking_1 history_1 ml_moe_1}
engine_gbps=${5:-3.2}
sluice=${SLUICE:-target/release/sluice}
mkdir -p "$dir"
[ -f "$dir/q15.gguf" ] || "$sluice" synth --preset qwen1.5-moe-a2.7b -o "$dir/q15.gguf" --quiet
others() { ls "$traces"/*.json | grep -v "/$1.json" | paste -sd,; }
# label|flags; SEED stands for --prefetch-seed with the other traces.
configs=(
  "none|--prefetch none"
  "xlayer|--prefetch xlayer"
  "token online|--prefetch token"
  "token seeded, depth 1|--prefetch token SEED --prefetch-depth 1"
  "token seeded, depth 2|--prefetch token SEED --prefetch-depth 2"
  "oracle|--prefetch oracle"
)
row() { # kind trace gbps label json
  python3 -c 'import json,sys; k,t,g,l,j=sys.argv[1:]; print(json.dumps({"kind":k,"trace":t,"gbps":float(g),"label":l,"result":json.loads(j)}))' "$@"
}
: > "$dir/token-prefetch-sim.jsonl"
for g in $speeds; do
  for t in "$traces"/*.json; do
    name=$(basename "$t" .json)
    for c in "${configs[@]}"; do
      label=${c%%|*}
      flags=${c#*|}
      flags=${flags//SEED/--prefetch-seed $(others "$name")}
      # shellcheck disable=SC2086
      j=$("$sluice" sim --model "$dir/q15.gguf" --device iphone-17-pro --ram-cap 2500M --flash-gbps "$g" --trace "$t" --tokens 64 --prompt-tokens 57 $flags --json)
      row sim "$name" "$g" "$label" "$j" >> "$dir/token-prefetch-sim.jsonl"
    done
  done
done
: > "$dir/token-prefetch-engine.jsonl"
for name in $engine_traces; do
  for c in "${configs[@]}"; do
    label=${c%%|*}
    flags=${c#*|}
    flags=${flags//SEED/--prefetch-seed $(others "$name")}
    # shellcheck disable=SC2086
    j=$("$sluice" bench --model "$dir/q15.gguf" --backend sim --device iphone-17-pro --flash-gbps "$engine_gbps" --ram-cap 2500M --tokens 32 --prompt-tokens 57 --replay "$traces/$name.json" $flags --no-warm --json)
    row engine "$name" "$engine_gbps" "$label" "$j" >> "$dir/token-prefetch-engine.jsonl"
  done
done
python3 - "$dir" <<'PY'
import json, math, os, sys
from collections import defaultdict
d = sys.argv[1]
sim = [json.loads(l) for l in open(os.path.join(d, "token-prefetch-sim.jsonl"))]
labels = list(dict.fromkeys(r["label"] for r in sim))
print("Simulator: tok/s gain over none, geometric mean over the traces (range)")
print("| flash GB/s | " + " | ".join(labels[1:]) + " |")
print("|---" * len(labels) + "|")
by = defaultdict(dict)
for r in sim:
    by[(r["gbps"], r["trace"])][r["label"]] = r["result"]["tok_per_s"]
for g in sorted({r["gbps"] for r in sim}):
    cells = []
    for l in labels[1:]:
        gains = [v[l] / v["none"] for (gg, _), v in by.items() if gg == g]
        gm = math.prod(gains) ** (1 / len(gains)) - 1
        cells.append(f"{100 * gm:+.1f}% ({100 * (min(gains) - 1):+.0f} to {100 * (max(gains) - 1):+.0f}%)")
    print(f"| {g} | " + " | ".join(cells) + " |")
print()
print("Engine on the device's clock, cold")
print("| trace | prefetch | device tok/s | vs none | hit rate | recall | precision | predictor ms/token (share of device token) |")
print("|---|---|---|---|---|---|---|---|")
base = {}
for l in open(os.path.join(d, "token-prefetch-engine.jsonl")):
    r = json.loads(l)
    j = r["result"]
    t = j["device_tok_per_s"]
    if r["label"] == "none":
        base[r["trace"]] = t
    p = j.get("predictor_s_per_token") or 0.0
    f = lambda k: "-" if j.get(k) is None else f"{j[k]:.3f}"
    print(f"| {r['trace']} | {r['label']} | {t:.2f} | {100 * (t / base[r['trace']] - 1):+.1f}% | {j['hit_rate']:.3f} | {f('prefetch_recall')} | {f('prefetch_precision')} | {1000 * p:.2f} ({100 * p * t:.1f}%) |")
PY
