#!/usr/bin/env python3
"""Two clients taking turns against `sluice serve`: each one's second turn,
after the other's request, with the time to its first token and the prompt
tokens reused. Run against a server started with --sessions 1 and with
--sessions 2 to see what keeping both conversations saves.
Usage: serve-sessions.py http://127.0.0.1:8089"""
import json, sys, time, urllib.request
base = sys.argv[1]
def post(msgs):
    body = json.dumps({"messages": msgs, "max_tokens": 4, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    req = urllib.request.Request(base + "/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    t = time.time(); first = None; usage = None; text = ""
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]": continue
            c = json.loads(line[6:])
            if c.get("usage"): usage = c["usage"]
            if c["choices"] and c["choices"][0]["delta"].get("content"):
                if first is None: first = time.time() - t
                text += c["choices"][0]["delta"]["content"]
    return text, first if first is not None else time.time() - t, usage
convs = {
    "A": [{"role": "system", "content": "You are a helpful assistant who knows printing. " * 15},
          {"role": "user", "content": "Tell me about the history of the printing press in Europe."}],
    "B": [{"role": "system", "content": "You are a ship historian answering in detail. " * 15},
          {"role": "user", "content": "How were sailing ships built in the sixteenth century?"}],
}
for who in "AB":
    a, _, u = post(convs[who])
    convs[who] += [{"role": "assistant", "content": a}, {"role": "user", "content": "And then?"}]
    print(f"{who} turn 1: prompt {u['prompt_tokens']}, cached {u['prompt_tokens_details']['cached_tokens']}")
for who in "AB":
    _, ttft, u = post(convs[who])
    print(f"{who} turn 2: TTFT {ttft:.2f} s, prompt {u['prompt_tokens']}, cached {u['prompt_tokens_details']['cached_tokens']}")
