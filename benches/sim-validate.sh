#!/usr/bin/env bash
# Simulator vs real runs on this machine: for two RAM caps × two read
# engines, measures the `host` profile (sluice probe --profile: the drive
# drifts on this VM, so it is re-measured just before each run), runs
# `sluice bench` on a synthetic Qwen1.5-MoE-A2.7B replaying a recorded
# trace, and `sluice sim --device host.toml` with the same flags.
# Usage: benches/sim-validate.sh DIR TRACE [CAPS] [ENGINES] [PREFETCH]
# e.g. benches/sim-validate.sh /var/tmp/sl ../shared/traces/qwen1.5-moe-a2.7b/cooking_1.json
set -euo pipefail
dir=${1:?usage: benches/sim-validate.sh DIR TRACE}
trace=${2:?usage: benches/sim-validate.sh DIR TRACE}
caps=${3:-"2500M 4G"}
engines=${4:-"uring pread"}
prefetch=${5:-none}
sluice=${SLUICE:-target/release/sluice}
mkdir -p "$dir"
[ -f "$dir/q15.gguf" ] || "$sluice" synth --preset qwen1.5-moe-a2.7b -o "$dir/q15.gguf" --quiet
flags="--tokens 48 --prompt-tokens 16 --replay $trace --prefetch $prefetch"
rm -f "$dir/sim-validate.jsonl"
for cap in $caps; do
  for io in $engines; do
    "$sluice" probe "$dir/q15.gguf" --sizes 4K,512K --qd 1,16 --seconds 2 --profile "$dir/host.toml" >/dev/null
    b=$("$sluice" bench --model "$dir/q15.gguf" --ram-cap "$cap" --io "$io" $flags --probe-seconds 1 --json)
    s=$("$sluice" sim --device "$dir/host.toml" --model "$dir/q15.gguf" --ram-cap "$cap" --io "$io" $flags --json)
    echo "{\"cap\":\"$cap\",\"io\":\"$io\",\"prefetch\":\"$prefetch\",\"bench\":$b,\"sim\":$s}" >> "$dir/sim-validate.jsonl"
  done
done
python3 - "$dir/sim-validate.jsonl" <<'PY'
import json, sys
print("| cap | engine | prefetch | pass | bench tok/s | sim tok/s | sim/bench | bench hit | sim hit | bench MB/token | sim MB/token | profile flash GB/s | bench stall/compute s | sim stall/compute s |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for l in open(sys.argv[1]):
    r = json.loads(l)
    b, s = r["bench"], r["sim"]
    for name, bp, sp in [("cold", b, s), ("warm", b["warm"], s["warm"])]:
        flash = s["device"]["figures"]["flash.read_gbps"]["value"]
        print(f"| {r['cap']} | {r['io']} | {r['prefetch']} | {name} | {bp['tok_per_s']:.3f} | {sp['tok_per_s']:.3f} | {sp['tok_per_s']/bp['tok_per_s']:.2f} | {bp['hit_rate']:.3f} | {sp['hit_rate']:.3f} | {bp['bytes_read_per_token']/1e6:.1f} | {sp['bytes_read_per_token']/1e6:.1f} | {flash:.2f} | {bp['stall_s']:.2f}/{bp['compute_s']:.2f} | {sp['stall_s']:.2f}/{sp['compute_s']:.2f} |")
PY
