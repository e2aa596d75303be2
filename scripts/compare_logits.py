#!/usr/bin/env python3
"""Compare `sluice logits` with an oracle written by make_fixtures.py.

    python3 scripts/compare_logits.py MODEL [EXPECTED_JSON] [--sluice PATH]
        [--bound B] [-- SLUICE_LOGITS_FLAGS...]

MODEL is a safetensors directory (its expected.json is used) or a .gguf file
(NAME.expected.json beside it). Prints the max abs error, max|logit| and their
ratio, and exits 1 when the ratio exceeds B (default 1e-3). Flags after `--`
go to `sluice logits` (e.g. `-- --activations q8`). Standard library only.
"""
import json
import os
import subprocess
import sys


def main() -> int:
    args = sys.argv[1:]
    extra = []
    if "--" in args:
        i = args.index("--")
        extra = args[i + 1 :]
        args = args[:i]
    bound = 1e-3
    if "--bound" in args:
        i = args.index("--bound")
        bound = float(args[i + 1])
        del args[i : i + 2]
    exe = "target/release/sluice"
    if "--sluice" in args:
        i = args.index("--sluice")
        exe = args[i + 1]
        del args[i : i + 2]
    model = args[0]
    if len(args) > 1:
        exp = args[1]
    elif os.path.isdir(model):
        exp = os.path.join(model, "expected.json")
    else:
        exp = model[: -len(".gguf")] + ".expected.json"
    want = json.load(open(exp))
    toks = ",".join(str(t) for t in want["tokens"])
    out = subprocess.run(
        [exe, "logits", "--model", model, "--tokens", toks, *extra], check=True, capture_output=True
    )
    got = json.loads(out.stdout)["logits"]
    worst = max(abs(a - b) for ga, wa in zip(got, want["logits"]) for a, b in zip(ga, wa))
    peak = max(abs(b) for wa in want["logits"] for b in wa)
    ratio = worst / peak
    print(f"{model}: max abs error {worst:.2e}, max|logit| {peak:.2f}, relative {ratio:.2e}")
    return 0 if ratio <= bound and len(got) == len(want["logits"]) else 1


if __name__ == "__main__":
    sys.exit(main())
