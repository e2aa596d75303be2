#!/usr/bin/env bash
# Simulator vs real runs on this machine: for two RAM caps × two read
# engines, measures the `host` profile (sluice probe --profile through that
# engine: the drive drifts on this VM, so it is re-measured just before
# each run), runs
# `sluice bench` on a synthetic Qwen1.5-MoE-A2.7B replaying a recorded
# trace, and `sluice sim --device host.toml` with the same flags.
# Usage: benches/sim-validate.sh DIR TRACE [CAPS] [ENGINES] [PREFETCH]
# e.g. benches/sim-validate.sh /var/tmp/sl ../shared/traces/qwen1.5-moe-a2.7b/cooking_1.json
# ROUNDS=N repeats the whole sweep N times, configurations interleaved, and
# adds the per-configuration medians: on a shared VM one profile and one
# bench each move by ±15%, so a single pair says little.
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
rounds=${ROUNDS:-1}
rm -f "$dir/sim-validate.jsonl"
for round in $(seq 1 "$rounds"); do
for cap in $caps; do
  for io in $engines; do
    # The drive as this engine sees it: a pread pool and io_uring get
    # different bandwidth from the same drive for the same bursts.
    "$sluice" probe "$dir/q15.gguf" --io "$io" --sizes 4K,512K --qd 1,16 --seconds 2 --profile "$dir/host.toml" >/dev/null
    b=$("$sluice" bench --model "$dir/q15.gguf" --ram-cap "$cap" --io "$io" $flags --probe-seconds 1 --json)
    s=$("$sluice" sim --device "$dir/host.toml" --model "$dir/q15.gguf" --ram-cap "$cap" --io "$io" $flags --json)
    echo "{\"round\":$round,\"cap\":\"$cap\",\"io\":\"$io\",\"prefetch\":\"$prefetch\",\"bench\":$b,\"sim\":$s}" >> "$dir/sim-validate.jsonl"
  done
done
done
python3 - "$dir/sim-validate.jsonl" <<'PY'
import json, sys, statistics
rows = [json.loads(l) for l in open(sys.argv[1])]
print("| round | cap | engine | prefetch | pass | bench tok/s | sim tok/s | sim/bench | bench hit | sim hit | bench MB/token | sim MB/token | profile flash GB/s | bench stall/compute s | sim stall/compute s |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    b, s = r["bench"], r["sim"]
    for name, bp, sp in [("cold", b, s), ("warm", b["warm"], s["warm"])]:
        flash = s["device"]["figures"]["flash.read_gbps"]["value"]
        print(f"| {r.get('round', 1)} | {r['cap']} | {r['io']} | {r['prefetch']} | {name} | {bp['tok_per_s']:.3f} | {sp['tok_per_s']:.3f} | {sp['tok_per_s']/bp['tok_per_s']:.2f} | {bp['hit_rate']:.3f} | {sp['hit_rate']:.3f} | {bp['bytes_read_per_token']/1e6:.1f} | {sp['bytes_read_per_token']/1e6:.1f} | {flash:.2f} | {bp['stall_s']:.2f}/{bp['compute_s']:.2f} | {sp['stall_s']:.2f}/{sp['compute_s']:.2f} |")
if len({r.get("round", 1) for r in rows}) > 1:
    print()
    print("| cap | engine | pass | rounds | median bench tok/s | median sim tok/s | ratio of medians | per-round sim/bench |")
    print("|---|---|---|---|---|---|---|---|")
    keys = []
    for r in rows:
        if (r["cap"], r["io"]) not in keys:
            keys.append((r["cap"], r["io"]))
    for cap, io in keys:
        rs = [r for r in rows if (r["cap"], r["io"]) == (cap, io)]
        for name in ["cold", "warm"]:
            pick = (lambda x: x) if name == "cold" else (lambda x: x["warm"])
            bt = [pick(r["bench"])["tok_per_s"] for r in rs]
            st = [pick(r["sim"])["tok_per_s"] for r in rs]
            mb, ms = statistics.median(bt), statistics.median(st)
            per = " ".join(f"{s / b:.2f}" for b, s in zip(bt, st))
            print(f"| {cap} | {io} | {name} | {len(rs)} | {mb:.3f} | {ms:.3f} | {ms / mb:.2f} | {per} |")
PY
