#!/usr/bin/env bash
# Builds the seed corpora of the fuzz targets from the committed fixtures and
# the recorded traces: whole small files, and header-only truncations (most
# mutations of a whole file land in tensor data; the truncations keep the
# fuzzer in the headers).
set -euo pipefail
cd "$(dirname "$0")"
fx=../tests/fixtures/models
mkdir -p corpus/gguf_model corpus/packed_manifest corpus/safetensors_model corpus/trace
for f in "$fx"/*.gguf; do
    n=$(basename "$f")
    cp "$f" "corpus/gguf_model/$n"
    head -c 16384 "$f" > "corpus/gguf_model/$n.head"
done
# Packed files carry the sluice.* manifest.
sluice=${SLUICE:-../target/release/sluice}
for m in qwen3_moe qwen3_5_moe_vl; do
    "$sluice" pack "$fx/$m" -o "corpus/packed_manifest/$m.packed" --quiet
    head -c 65536 "corpus/packed_manifest/$m.packed" > "corpus/packed_manifest/$m.head"
done
for m in qwen3_5_moe_mlx qwen3_moe olmoe qwen3_5_moe_vl; do
    python3 - "$fx/$m" "corpus/safetensors_model/$m" <<'PY'
import struct, sys
d, out = sys.argv[1], sys.argv[2]
cfg = open(d + "/config.json", "rb").read()
st = open(d + "/model.safetensors", "rb").read()
open(out, "wb").write(struct.pack("<H", len(cfg)) + cfg + st)
hl = struct.unpack("<Q", st[:8])[0]
open(out + ".head", "wb").write(struct.pack("<H", len(cfg)) + cfg + st[: 8 + hl])
PY
done
python3 - ../../shared/traces/qwen1.5-moe-a2.7b/cooking_1.json corpus/trace <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))
j["routes"] = j["routes"][:6]
open(sys.argv[2] + "/small.json", "w").write(json.dumps(j))
open(sys.argv[2] + "/small.csv", "w").write("layer,expert\n0,3\n0,7\n1,2\n1,3\n0,3\n")
PY
echo "seeds in fuzz/corpus"
