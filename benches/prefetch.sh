#!/usr/bin/env bash
# Prefetch benchmark.
# 1. Cache policies and predictors on the recorded traces (no model):
#    sluice trace stats T --slots 8,16,32 --phase decode --json
# 2. Decode with and without prefetch on synthetic models under a cap:
#    qwen3-30b-a3b (48 layers, 16 GiB) at 4G, speculative gating;
#    qwen1.5-moe-a2.7b (24 layers, 7 GiB) at 2500M replaying a recorded
#    trace (the trace's prompt replayed as the prompt), cross-layer.
# Usage: benches/prefetch.sh DIR TRACES_DIR; results in DIR/prefetch-*.json.
set -euo pipefail
dir=${1:?usage: benches/prefetch.sh DIR TRACES_DIR}
traces=${2:?usage: benches/prefetch.sh DIR TRACES_DIR}
sluice=${SLUICE:-target/release/sluice}
mkdir -p "$dir"
for t in "$traces"/*.json; do
  "$sluice" trace stats "$t" --slots 8,16,32 --phase decode --json
done > "$dir/prefetch-trace-stats.jsonl"
[ -f "$dir/q30.gguf" ] || "$sluice" synth --preset qwen3-30b-a3b -o "$dir/q30.gguf" --quiet
[ -f "$dir/q15.gguf" ] || "$sluice" synth --preset qwen1.5-moe-a2.7b -o "$dir/q15.gguf" --quiet
first=$(ls "$traces"/*.json | head -1)
plen=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['meta']['prompt_len'])" "$first")
for pf in none gate; do
  "$sluice" bench --model "$dir/q30.gguf" --ram-cap 4G --tokens 8 --prompt-tokens 4 --probe-seconds 1 --prefetch $pf --json > "$dir/prefetch-q30-$pf.json"
done
for pf in none xlayer; do
  "$sluice" bench --model "$dir/q15.gguf" --ram-cap 2500M --tokens 32 --prompt-tokens "$plen" --probe-seconds 1 --prefetch $pf --replay "$first" --json > "$dir/prefetch-q15-$pf.json"
done
python3 - "$dir" <<'PY'
import json, sys, os
d = sys.argv[1]
rows = [json.loads(l) for l in open(os.path.join(d, "prefetch-trace-stats.jsonl"))]
print("Trace stats, decode, mean over", len(rows), "traces (hit rate; share of Belady):")
print("| policy | 8 slots | 16 slots | 32 slots |")
print("|---|---|---|---|")
for p in rows[0]["policies"]:
    cells = []
    for n in ["8", "16", "32"]:
        h = sum(r["policies"][p][n] for r in rows) / len(rows)
        b = sum(r["policies"][p][n] / r["policies"]["belady"][n] for r in rows) / len(rows)
        cells.append(f"{h:.3f} ({b:.0%})")
    print(f"| {p} | " + " | ".join(cells) + " |")
print()
print("| predictor @16 | recall | precision | all-K-ready | wasted experts/token |")
print("|---|---|---|---|---|")
for p in rows[0]["predictors"]:
    v = lambda k: sum(r["predictors"][p]["16"][k] for r in rows) / len(rows)
    print(f"| {p} | {v('recall'):.3f} | {v('precision'):.3f} | {v('all_k_ready_rate'):.3f} | {v('wasted_prefetches_per_token'):.2f} |")
print()
keys = ["tok_per_s", "hit_rate", "stall_s", "compute_s", "overlap_ratio", "prefetch_recall", "all_k_ready_rate", "wasted_prefetch_bytes_per_token", "predictor_s_per_token", "probe_gbps"]
print("| run | pass | " + " | ".join(keys) + " |")
print("|---" * (len(keys) + 2) + "|")
def f(v):
    if v is None: return "-"
    if isinstance(v, float): return f"{v:.3g}"
    return str(v)
for n in ["q30-none", "q30-gate", "q15-none", "q15-xlayer"]:
    j = json.load(open(os.path.join(d, f"prefetch-{n}.json")))
    for name, p in [("cold", j), ("warm", j["warm"])]:
        print(f"| {n} | {name} | " + " | ".join(f(p.get(k, j.get(k))) for k in keys) + " |")
PY
