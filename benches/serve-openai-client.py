#!/usr/bin/env python3
"""OpenAI's Python client against `sluice serve`: a streamed chat, a request
with tools, a demanded tool call (named, and "required" streamed), and a
turn carrying a tool call and its result.
Usage: serve-openai-client.py http://127.0.0.1:8089/v1 (pip install openai)."""
import sys, time, json, threading
from openai import OpenAI
base = sys.argv[1]
c = OpenAI(base_url=base, api_key="none")
# Streamed chat.
t0 = time.time(); first = None; text = ""
for ch in c.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hello!"}], stream=True, max_tokens=16, temperature=0):
    if ch.choices and ch.choices[0].delta.content:
        if first is None: first = time.time() - t0
        text += ch.choices[0].delta.content
print("streamed chat:", len(text), "chars, first token after %.3f s" % (first or -1))
# Tool call request.
tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
r = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=tools, max_tokens=16)
print("tools: finish_reason", r.choices[0].finish_reason, "tool_calls", r.choices[0].message.tool_calls, "usage", r.usage.prompt_tokens, r.usage.completion_tokens)
# A follow-up turn that carries a tool call and its result.
r = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [{"id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
    {"role": "tool", "tool_call_id": "call_0", "content": "{\"temp\": 21}"}], tools=tools, max_tokens=8)
print("tool result turn:", r.choices[0].finish_reason, r.usage.prompt_tokens, "prompt tokens,", r.usage.prompt_tokens_details.cached_tokens, "cached")
# A demanded call: named, then "required" and streamed.
tools2 = tools + [{"type": "function", "function": {"name": "get_time", "description": "Time in a zone",
          "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}, "offset": {"type": "integer"}},
                         "required": ["zone", "offset"]}}}]
t0 = time.time()
r = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=tools2,
    tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=200, temperature=0)
if r.choices[0].finish_reason == "length":
    # The call was cut at max_tokens (a random model rarely ends a string):
    # its text comes back as content, as any cut answer does.
    print("named tool_choice: finish_reason length after %d tokens (%.2f s), content %r..." % (
          r.usage.completion_tokens, time.time() - t0, (r.choices[0].message.content or "")[:60]))
else:
    call = r.choices[0].message.tool_calls[0]
    print("named tool_choice: finish_reason", r.choices[0].finish_reason, "call", call.function.name, call.function.arguments,
          "(%d tokens, %.2f s)" % (r.usage.completion_tokens, time.time() - t0))
    assert call.function.name == "get_weather" and isinstance(json.loads(call.function.arguments)["city"], str)
calls = {}; finish = None
for ch in c.chat.completions.create(model="m", messages=[{"role": "user", "content": "What time is it?"}], tools=tools2,
        tool_choice="required", max_tokens=200, temperature=0.8, seed=3, stream=True):
    if not ch.choices: continue
    for tc in ch.choices[0].delta.tool_calls or []:
        calls.setdefault(tc.index, [None, ""])
        if tc.function.name: calls[tc.index][0] = tc.function.name
        calls[tc.index][1] += tc.function.arguments or ""
    finish = ch.choices[0].finish_reason or finish
print("required, streamed: finish_reason", finish, "calls", calls)
if finish != "length":
    assert finish == "tool_calls" and len(calls) == 1
    json.loads(calls[0][1])
