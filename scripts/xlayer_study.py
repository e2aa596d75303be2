#!/usr/bin/env python3
"""How well cross-layer co-occurrence predicts the next layer's experts on
recorded routing traces (the JSON format of ../shared/traces).

Reproduces the figures docs/BENCHMARKS.md quotes for `xlayer`:
  1. calibration: the predicted probability of an expert (mean over the
     experts chosen one layer up of how often it followed each) against
     how often it was then used, decode tokens, learned online;
  2. precision by rank of the top-8 guesses;
  3. recall at k' = k: learned online only, and seeded with a table from
     the other traces (leave one out).

Usage: scripts/xlayer_study.py TRACE.json [TRACE.json ...]
Pure Python; it does not use the engine's code (the engine's predictor is
crates/sluice-cache/src/predict.rs), so it is a cross-check of the idea,
not of the implementation.
"""
import json
import sys
from collections import defaultdict


def load(path):
    d = json.load(open(path))
    n = d["meta"].get("num_moe_layers") or d["meta"]["num_layers"]
    toks = []
    for r in d["routes"]:
        layers = [r["layers"][str(l)]["experts"] for l in range(n) if str(l) in r["layers"]]
        toks.append((r.get("phase", "decode"), layers))
    return toks


class Table:
    """count[l][a][b]: tokens choosing a at l-1 and b at l; seen[l][a]."""

    def __init__(self):
        self.count = defaultdict(lambda: defaultdict(lambda: defaultdict(float)))
        self.seen = defaultdict(lambda: defaultdict(float))

    def learn(self, layers):
        for l in range(1, len(layers)):
            for a in layers[l - 1]:
                self.seen[l][a] += 1
                for b in layers[l]:
                    self.count[l][a][b] += 1

    def predict(self, l, prev, m):
        score = defaultdict(float)
        seen = sum(self.seen[l][a] for a in prev)
        for a in prev:
            for b, c in self.count[l][a].items():
                score[b] += c
        ranked = sorted(score, key=lambda b: (-score[b], b))[:m]
        return [(b, score[b] / seen if seen else 0.0) for b in ranked]

    def copy(self):
        t = Table()
        for l, rows in self.count.items():
            for a, row in rows.items():
                t.count[l][a].update(row)
        for l, row in self.seen.items():
            t.seen[l].update(row)
        return t


def run(toks, table, k, m, bins, ranks):
    used = want = 0
    for phase, layers in toks:
        if phase == "decode":
            for l in range(1, len(layers)):
                guess = table.predict(l, layers[l - 1], m)
                for r, (b, p) in enumerate(guess):
                    hit = b in layers[l]
                    i = min(int(p * 10), 9)
                    bins[i][0] += hit
                    bins[i][1] += 1
                    ranks[r][0] += hit
                    ranks[r][1] += 1
                used += len({b for b, _ in guess[:k]} & set(layers[l]))
                want += len(layers[l])
        table.learn(layers)
    return used / max(want, 1)


def main(paths):
    traces = [load(p) for p in paths]
    k = max(len(l) for t in traces for _, ls in t for l in ls)
    bins = defaultdict(lambda: [0, 0])
    ranks = defaultdict(lambda: [0, 0])
    print(f"recall at k'=k={k}: online only | seeded with the other traces (leave one out)")
    for i, (p, t) in enumerate(zip(paths, traces)):
        online = run(t, Table(), k, 2 * k, bins, ranks)
        seed = Table()
        for j, o in enumerate(traces):
            if j != i:
                for _, layers in o:
                    seed.learn(layers)
        seeded = run(t, seed, k, k, defaultdict(lambda: [0, 0]), defaultdict(lambda: [0, 0]))
        print(f"  {p.split('/')[-1]}: {online:.3f} | {seeded:.3f}")
    print("calibration (online, all traces): predicted probability -> share used")
    for i in sorted(bins):
        h, n = bins[i]
        print(f"  {i / 10:.1f}-{(i + 1) / 10:.1f}: {h / n:.2f} of {n}")
    print("precision by rank (online, all traces):",
          " ".join(f"{ranks[r][0] / ranks[r][1]:.2f}" for r in sorted(ranks)))


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
