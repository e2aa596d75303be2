#!/usr/bin/env bash
# Side by side with llama.cpp on the same GGUF file and the same threads:
# resident decode (tok/s) and prefill (prompt tok/s), sluice and llama-bench
# alternating round by round so that both see the same machine minute, then
# the ratios of the medians.
#
#   benches/vs-llamacpp.sh GGUF [LLAMA_BENCH]
#
# Without LLAMA_BENCH only sluice runs. Environment: ROUNDS (3), THREADS
# (all cores), TG (decode tokens, 32), PP (prompt tokens, 64), SLUICE (the
# binary; default: target/release/sluice, built here), SLUICE_ARGS (extra
# flags for sluice bench, e.g. "--activations q8"), LLAMA_ARGS (extra flags
# for llama-bench, e.g. "--mmap 1 --repack 0").
#
# sluice's prefill figure is PP / TTFT of its warm pass (the first token's
# sampling included); llama-bench's are its pp and tg tests (warm, after its
# own warm-up run). The file must be a GGUF llama.cpp loads (`sluice synth
# --stacked`, or one of llama.cpp's own).
#
# CAP=16G measures streaming instead, cold: the page cache is dropped before
# every run (root), sluice streams under `--ram-cap $CAP` (direct I/O) and
# llama.cpp reads the file through mmap without repacking (`-lm mmap
# --repack 0 --no-warmup -r 1`: its default repack buffer cannot be
# allocated for a model larger than RAM); decode only (sluice's cold pass
# after its PP-token prompt, llama-bench's tg test).
set -euo pipefail
cd "$(dirname "$0")/.."
GGUF=${1:?usage: benches/vs-llamacpp.sh GGUF [LLAMA_BENCH]}
LB=${2:-}
ROUNDS=${ROUNDS:-3}
THREADS=${THREADS:-$(nproc)}
TG=${TG:-32}
PP=${PP:-64}
if [ -z "${SLUICE:-}" ]; then
    cargo build --release --quiet
    SLUICE=target/release/sluice
fi
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores; file $GGUF ($(du -h "$GGUF" | cut -f1)); threads $THREADS; tg $TG, pp $PP"
cold() {
    if [ -n "${CAP:-}" ]; then
        sync
        echo 3 > /proc/sys/vm/drop_caches || echo "warning: cannot drop the page cache (not root): runs are not cold" >&2
    fi
}
for r in $(seq "$ROUNDS"); do
    cold
    if [ -n "${CAP:-}" ]; then
        # shellcheck disable=SC2086
        "$SLUICE" bench --model "$GGUF" --threads "$THREADS" --tokens "$TG" --prompt-tokens "$PP" \
            --ram-cap "$CAP" --no-warm --json ${SLUICE_ARGS:-} > "$OUT/sluice.$r.json"
    else
        # shellcheck disable=SC2086
        "$SLUICE" bench --model "$GGUF" --threads "$THREADS" --tokens "$TG" --prompt-tokens "$PP" \
            --probe-seconds 0.2 --json ${SLUICE_ARGS:-} > "$OUT/sluice.$r.json"
    fi
    if [ -n "$LB" ]; then
        cold
        if [ -n "${CAP:-}" ]; then
            # shellcheck disable=SC2086
            "$LB" -m "$GGUF" -t "$THREADS" -p 0 -n "$TG" -r 1 --no-warmup --repack 0 -lm mmap -o json ${LLAMA_ARGS:-} > "$OUT/llama.$r.json" 2>/dev/null
        else
            # shellcheck disable=SC2086
            "$LB" -m "$GGUF" -t "$THREADS" -p "$PP" -n "$TG" -o json ${LLAMA_ARGS:-} > "$OUT/llama.$r.json" 2>/dev/null
        fi
    fi
done
python3 - "$OUT" "$ROUNDS" "$PP" "${CAP:-}" <<'EOF'
import json, statistics, sys, glob
out, rounds, pp, cap = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
s_tg, s_pp, l_tg, l_pp = [], [], [], []
for r in range(1, rounds + 1):
    j = json.load(open(f"{out}/sluice.{r}.json"))
    w = j if cap else (j.get("warm") or j)
    s_tg.append(w["tok_per_s"])
    s_pp.append(pp / w["ttft_s"])
    if cap:
        print(f"sluice round {r}: {w['tok_per_s']:.3f} tok/s cold, hit rate {w['hit_rate']:.3f}, "
              f"{w['bytes_read_per_token'] / 1e6:.0f} MB read/token at {w['read_gbps']:.2f} GB/s (probe {j['probe_gbps']:.2f}), "
              f"per token compute {w['compute_s_per_token'] * 1e3:.0f} ms, stall {w['stall_s_per_token'] * 1e3:.0f} ms, "
              f"peak RSS {j['peak_rss_bytes'] / 1e9:.2f} GB (capped: {j['capped']})")
    try:
        for t in json.load(open(f"{out}/llama.{r}.json")):
            (l_pp if t["n_prompt"] > 0 else l_tg).append(t["avg_ts"])
    except FileNotFoundError:
        pass
notes = [n for n in j.get("notes", []) if n.startswith("CPU kernels")]
print("sluice:", "; ".join(notes))
fmt = lambda v: " ".join(f"{x:.2f}" for x in v)
if not cap:
    print(f"sluice    decode tok/s {fmt(s_tg)} (median {statistics.median(s_tg):.2f}); prefill tok/s {fmt(s_pp)} (median {statistics.median(s_pp):.2f})")
if cap:
    print(f"sluice    streaming under --ram-cap {cap}, cold decode tok/s {fmt(s_tg)} (median {statistics.median(s_tg):.3f})")
    if l_tg:
        print(f"llama.cpp mmap, cold decode tok/s {fmt(l_tg)} (median {statistics.median(l_tg):.3f})")
        print(f"ratio sluice/llama.cpp: decode {statistics.median(s_tg) / statistics.median(l_tg):.2f}x")
elif l_tg:
    print(f"llama.cpp decode tok/s {fmt(l_tg)} (median {statistics.median(l_tg):.2f}); prefill tok/s {fmt(l_pp)} (median {statistics.median(l_pp):.2f})")
    print(f"ratio sluice/llama.cpp: decode {statistics.median(s_tg) / statistics.median(l_tg):.2f}x, prefill {statistics.median(s_pp) / statistics.median(l_pp):.2f}x")
EOF
