#!/usr/bin/env bash
# Streaming benchmark: a synthetic Qwen3-30B-A3B (48 layers, Q4_0, 16 GiB)
# under a 4 GiB RAM cap, through each read engine, packed vs stacked GGUF,
# without prefetch (benches/prefetch.sh measures that).
# Usage: benches/streaming.sh DIR [CAP] [TOKENS]; results land in DIR/*.json.
# Needs root for --cgroup (the mmap baseline's page cache counted in the cap).
set -euo pipefail
dir=${1:?usage: benches/streaming.sh DIR [CAP] [TOKENS]}
cap=${2:-4G}
tokens=${3:-8}
sluice=${SLUICE:-target/release/sluice}
mkdir -p "$dir"
[ -f "$dir/q30.gguf" ] || "$sluice" synth --preset qwen3-30b-a3b -o "$dir/q30.gguf" --quiet
[ -f "$dir/q30-stacked.gguf" ] || "$sluice" synth --preset qwen3-30b-a3b --stacked -o "$dir/q30-stacked.gguf" --quiet
run() {
  local name=$1; shift
  echo "== $name: $sluice bench $*" >&2
  "$sluice" bench "$@" --prefetch none --ram-cap "$cap" --tokens "$tokens" --prompt-tokens 4 --probe-seconds 2 --json > "$dir/$name.json"
}
run uring-packed   --model "$dir/q30.gguf" --io uring
run pread-packed   --model "$dir/q30.gguf" --io pread
run uring-stacked  --model "$dir/q30-stacked.gguf" --io uring
run mmap-cgroup    --model "$dir/q30.gguf" --io mmap --cgroup
python3 - "$dir" <<'PY'
import json, sys, os
d = sys.argv[1]
keys = ["tok_per_s", "ttft_s", "hit_rate", "bytes_read_per_token", "read_gbps", "probe_gbps", "probe_burst_gbps", "stall_s", "compute_s", "peak_rss_bytes", "capped"]
print("| run | " + " | ".join(keys) + " | probe request × qd | warm tok/s | warm read_gbps |")
print("|---" * (len(keys) + 4) + "|")
for n in ["uring-packed", "pread-packed", "uring-stacked", "mmap-cgroup"]:
    j = json.load(open(os.path.join(d, n + ".json")))
    def f(v):
        if isinstance(v, float): return f"{v:.3g}"
        return str(v)
    p = j["probe"]
    print(f"| {n} | " + " | ".join(f(j[k]) for k in keys) + f" | {p['request_bytes'] // 1024} KiB × {p['queue_depth']} | {f(j['warm']['tok_per_s'])} | {f(j['warm']['read_gbps'])} |")
PY
