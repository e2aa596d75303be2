#!/usr/bin/env python3
"""How well the input token's id predicts a layer's experts, alone and
combined with cross-layer co-occurrence, on recorded routing traces (the
JSON format of ../shared/traces). A decode token's id is known before its
forward pass starts, so a table keyed by (token id, layer) could prefetch
every layer's guesses at once, not one layer ahead.

For each trace, decode tokens only, recall at k' = k (the share of the
experts used that were among the k best-scored guesses), per predictor:
  xl    the experts chosen one layer up vote for what followed them
        (what `xlayer` does);
  tok   the experts this token id used at this layer before;
  both  the sum of the two scores (each a frequency in [0, 1]);
  token the engine's `token` predictor (crates/sluice-cache/src/predict.rs):
        the mean of the estimates that exist among tok, the same for the
        pair (previous token id, token id), and xl; the two token tables
        shrunk as uses / (sightings + 1/2);
each learned online (prompt, then decode tokens as they pass) and seeded
with a table from the other traces (leave one out: a table persisted from
earlier sessions).

Then, for `token` seeded, how often a guess was used by its score.

Usage: scripts/token_study.py TRACE.json [TRACE.json ...]
Pure Python; it does not use the engine's code, so it measures the idea,
not an implementation.
"""
import json
import sys
from collections import defaultdict


def load(path):
    d = json.load(open(path))
    n = d["meta"].get("num_moe_layers") or d["meta"]["num_layers"]
    k = d["meta"]["top_k"]
    toks = [
        (r.get("phase", "decode"), r["token_id"], [r["layers"][str(l)]["experts"] for l in range(n)])
        for r in d["routes"]
    ]
    return k, toks


SHRINK = 0.5


class Tables:
    def __init__(self):
        self.tok = defaultdict(lambda: defaultdict(float))
        self.tok_n = defaultdict(float)
        self.pair = defaultdict(lambda: defaultdict(float))
        self.pair_n = defaultdict(float)
        self.xl = defaultdict(lambda: defaultdict(float))
        self.xl_n = defaultdict(float)

    def learn(self, tid, layers, prev=None):
        for l, es in enumerate(layers):
            self.tok_n[(tid, l)] += 1
            for e in es:
                self.tok[(tid, l)][e] += 1
            if prev is not None:
                self.pair_n[(prev, tid, l)] += 1
                for e in es:
                    self.pair[(prev, tid, l)][e] += 1
            if l:
                for a in layers[l - 1]:
                    self.xl_n[(l, a)] += 1
                    for b in es:
                        self.xl[(l, a)][b] += 1

    def token_scores(self, tid, ptid, l, prev):
        parts = []
        for n, row in (
            (self.tok_n[(tid, l)], self.tok[(tid, l)]),
            (self.pair_n[(ptid, tid, l)], self.pair[(ptid, tid, l)]),
        ):
            if n:
                parts.append({e: min(c / (n + SHRINK), 1.0) for e, c in row.items()})
        if l:
            n = sum(self.xl_n[(l, a)] for a in prev)
            if n:
                d = defaultdict(float)
                for a in prev:
                    for b, c in self.xl[(l, a)].items():
                        d[b] += c / n
                parts.append({e: min(v, 1.0) for e, v in d.items()})
        sc = defaultdict(float)
        for d in parts:
            for e, v in d.items():
                sc[e] += v / len(parts)
        return sc

    def scores(self, mode, tid, l, prev, k, ptid=None):
        if mode == "token":
            return self.token_scores(tid, ptid, l, prev)
        sc = defaultdict(float)
        if mode in ("tok", "both") and self.tok_n[(tid, l)]:
            n = self.tok_n[(tid, l)]
            for e, c in self.tok[(tid, l)].items():
                sc[e] += c / n
        if mode in ("xl", "both") and l:
            for a in prev:
                n = self.xl_n[(l, a)]
                for b, c in self.xl[(l, a)].items():
                    sc[b] += c / n / k
        return sc


def recall(test, seeds, mode):
    k, toks = test
    t = Tables()
    for _, s in seeds:
        ptid = None
        for _, tid, layers in s:
            t.learn(tid, layers, ptid)
            ptid = tid
    hit = total = 0
    ptid = None
    for phase, tid, layers in toks:
        if phase == "decode":
            for l, es in enumerate(layers):
                sc = t.scores(mode, tid, l, layers[l - 1] if l else [], k, ptid)
                top = sorted(sc, key=lambda e: (-sc[e], e))[:k]
                hit += len(set(top) & set(es))
                total += len(es)
        t.learn(tid, layers, ptid)
        ptid = tid
    return hit / total


def main(paths):
    traces = [load(p) for p in paths]
    print("| predictor | learned | mean recall@k | per trace |")
    print("|---|---|---|---|")
    for mode in ("xl", "tok", "both", "token"):
        for seeded in (False, True):
            rs = [
                recall(tr, [o for j, o in enumerate(traces) if j != i] if seeded else [], mode)
                for i, tr in enumerate(traces)
            ]
            per = " ".join(f"{r:.2f}" for r in rs)
            how = "seeded (leave one out)" if seeded else "online"
            print(f"| {mode} | {how} | {sum(rs) / len(rs):.3f} | {per} |")
    calibration(traces)


def calibration(traces):
    """How often `token`'s guesses (top k, seeded leave-one-out) were
    used, by score."""
    buckets = defaultdict(lambda: [0, 0])
    for i, (k, toks) in enumerate(traces):
        t = Tables()
        for j, (_, s) in enumerate(traces):
            if j != i:
                ptid = None
                for _, tid, layers in s:
                    t.learn(tid, layers, ptid)
                    ptid = tid
        ptid = None
        for phase, tid, layers in toks:
            if phase == "decode":
                for l, es in enumerate(layers):
                    sc = t.token_scores(tid, ptid, l, layers[l - 1] if l else [])
                    for e in sorted(sc, key=lambda e: (-sc[e], e))[:k]:
                        b = buckets[min(int(sc[e] * 10), 9)]
                        b[0] += 1
                        b[1] += e in es
            t.learn(tid, layers, ptid)
            ptid = tid
    print()
    print("| token, seeded: score | guesses | share used |")
    print("|---|---|---|")
    for b in sorted(buckets):
        n, used = buckets[b]
        print(f"| {b / 10:.1f}-{(b + 1) / 10:.1f} | {n} | {used / n:.2f} |")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
