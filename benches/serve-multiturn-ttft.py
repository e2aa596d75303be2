#!/usr/bin/env python3
"""Time to first token of a second chat turn right after the first (its KV
cache reused) against the same prompt after an unrelated request.
Usage: serve-multiturn-ttft.py http://127.0.0.1:8089"""
import json, sys, time, urllib.request
base = sys.argv[1]
def post(msgs, stream):
    body = json.dumps({"messages": msgs, "max_tokens": 4, "temperature": 0, "stream": stream,
                       "stream_options": {"include_usage": True}}).encode()
    req = urllib.request.Request(base + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"})
    t = time.time(); first = None; usage = None; text = ""
    with urllib.request.urlopen(req, timeout=600) as r:
        if not stream:
            j = json.load(r); return j["choices"][0]["message"]["content"], None, j["usage"]
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]": continue
            c = json.loads(line[6:])
            if c.get("usage"): usage = c["usage"]
            if c["choices"] and c["choices"][0]["delta"].get("content"):
                if first is None: first = time.time() - t
                text += c["choices"][0]["delta"]["content"]
    return text, first, usage
h = [{"role": "system", "content": "You are a helpful assistant. " * 20},
     {"role": "user", "content": "Tell me about the history of the printing press in Europe, in detail."}]
a, _, u1 = post(h, False)
h2 = h + [{"role": "assistant", "content": a}, {"role": "user", "content": "And in Asia?"}]
_, t2, u2 = post(h2, True)
post([{"role": "user", "content": "Something unrelated, to replace the cached sequence."}], False)
_, t3, u3 = post(h2, True)
print("turn 1 prompt", u1["prompt_tokens"])
print("turn 2 after turn 1: TTFT %.2f s, prompt %d, cached %d" % (t2, u2["prompt_tokens"], u2["prompt_tokens_details"]["cached_tokens"]))
print("turn 2 fresh:        TTFT %.2f s, prompt %d, cached %d" % (t3, u3["prompt_tokens"], u3["prompt_tokens_details"]["cached_tokens"]))
