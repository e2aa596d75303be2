#!/usr/bin/env python3
"""OpenAI's Python client against `sluice serve`: a streamed chat, a request
with tools, and a turn carrying a tool call and its result.
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
