#!/usr/bin/env python3
"""Renders the chat templates in tests/fixtures/templates with jinja2 set up
as Hugging Face transformers sets it up (sandboxed, trim_blocks,
lstrip_blocks, loop controls; tojson = json.dumps(ensure_ascii=False);
raise_exception; strftime_now), for a few conversations, and writes the
strings to tests/fixtures/templates/expected.json. sluice's renderer must
produce the same strings (crates/sluice-serve/tests/templates.rs).

    python3 -m venv v && v/bin/pip install jinja2 && v/bin/python scripts/render_templates.py
"""
import json
import pathlib

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

DIR = pathlib.Path(__file__).resolve().parent.parent / "tests/fixtures/templates"
# strftime_now is fixed so that the expected strings do not change by day;
# the test puts the same date in place of sluice's.
DATE = "2026-01-01"

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "The city"},
        "days": {"type": "integer", "description": "Days ahead"}},
        "required": ["city"]}}}]


def conversations(string_args):
    args = {"city": "Paris", "days": 2}
    a = json.dumps(args) if string_args else args
    return {
        "simple": dict(messages=[
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hello <b>there</b> & \"you\""}], tools=None),
        "multi_turn": dict(messages=[
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "Tell me a joke."}], tools=None),
        "tools": dict(messages=[
            {"role": "system", "content": "Use tools."},
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": a}}]},
            {"role": "tool", "tool_call_id": "call_0", "content": "{\"temp\": 21}"},
            {"role": "user", "content": "Thanks, and tomorrow?"}], tools=TOOLS),
    }


def render(src, messages, tools, bos, eos):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def raise_exception(msg):
        raise jinja2.exceptions.TemplateError(msg)

    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: DATE
    t = env.from_string(src)
    kw = dict(messages=messages, add_generation_prompt=True, bos_token=bos, eos_token=eos)
    if tools:
        kw["tools"] = tools
    return t.render(**kw)


TOKENS = {
    "deepseek-ai-DeepSeek-V3.1.jinja": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
    "openai-gpt-oss-120b.jinja": ("<|startoftext|>", "<|return|>"),
}

out = []
for p in sorted(DIR.glob("*.jinja")):
    src = p.read_text()
    bos, eos = TOKENS.get(p.name, ("", "<|im_end|>"))
    string_args = "DeepSeek" in p.name
    for case, c in conversations(string_args).items():
        out.append(dict(template=p.name, case=case, bos=bos, eos=eos, messages=c["messages"],
                        tools=c["tools"], expected=render(src, c["messages"], c["tools"], bos, eos)))
(DIR / "expected.json").write_text(json.dumps(out, ensure_ascii=False, indent=1) + "\n")
print(f"wrote {len(out)} renders to {DIR / 'expected.json'}")
