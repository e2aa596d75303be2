#!/usr/bin/env python3
"""How much a fixture model's logits move under q16-sized activation noise.

    /work/venv/bin/python scripts/activation_noise.py NAME [NAME...]

NAME is a float fixture under tests/fixtures/models. transformers runs it with
uniform noise of 1/(127*256) of each 32-value block's max added to the input of
every linear layer whose width is a multiple of 32 (the size of sluice's
default q16 activation error), and prints the max change of the logits
against expected.json relative to max|logit|: the error any engine's q16
kernels must be expected to show on that model. Seeded (torch seed 0).
"""
import json
import sys

import torch
import transformers


def main() -> int:
    torch.manual_seed(0)
    for name in sys.argv[1:]:
        d = f"tests/fixtures/models/{name}"
        m = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
        m.eval()
        e = json.load(open(d + "/expected.json"))

        def noise(mod, inp):
            x = inp[0]
            blocks = x.reshape(-1, 32)
            step = blocks.abs().amax(-1, keepdim=True) / (127 * 256)
            return (x + ((torch.rand_like(blocks) - 0.5) * step).reshape(x.shape),)

        for mod in m.modules():
            if isinstance(mod, torch.nn.Linear) and mod.in_features % 32 == 0:
                mod.register_forward_pre_hook(noise)
        with torch.no_grad():
            out = m(torch.tensor([e["tokens"]])).logits[0]
        base = torch.tensor(e["logits"])
        print(f"{name}: {float((out - base).abs().max() / base.abs().max()):.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
