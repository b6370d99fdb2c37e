"""The V3 family's chat formats as data: each member's tool-call syntax and how it reasons.

A `ToolSyntax` says how a model writes its calls; one parser (serve/chat_output.py) and one
grammar writer (serve/structured.py) read every syntax from these fields:

  <section_begin> <call_begin> HEAD <args_begin> ARGS <args_end> <call_end> [joiner <call> ...] <section_end>

  deepseek-v3   HEAD = function<｜tool▁sep｜>NAME   args wrapped in "\\n```json\\n" ... "\\n```",
                                                   calls joined by "\\n"
  deepseek-v3.1 HEAD = NAME                        args after <｜tool▁sep｜>, calls back to back
  kimi-k2       HEAD = functions.NAME:INDEX        args after <|tool_call_argument_begin|>; the head is the
                                                   call's id (its template renders the id back)

How a member reasons (`thinking`):
  never   no reasoning block (V3, Kimi K2 Instruct)
  always  the template's generation prompt opens <think> (R1)
  model   the model opens <think> itself; earlier turns drop their reasoning (R1-0528)
  switch  the template's `thinking` argument opens <think> or closes it at once (V3.1 / V3.1-Terminus)

`detect` reads both from a checkpoint's own template and tokens by rendering, so a checkpoint
brings its format as data; the named entries are what make-tiny-model writes.
Never: renders for a request or parses answers.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from epserve.model import chat_templates as ct

THINKING = ("never", "always", "model", "switch")


@dataclass(frozen=True)
class ToolSyntax:
    name: str
    section_begin: str
    section_end: str
    call_begin: str
    call_end: str
    head: str              # "{name}" and "{index}" are filled in
    args_begin: str
    args_end: str = ""
    joiner: str = ""
    head_is_id: bool = False   # the head doubles as the call's id (its template renders ids)
    head_tokens: tuple[str, ...] = ()    # single tokens inside the head (V3: <｜tool▁sep｜>)

    def call_text(self, name: str, arguments: str, index: int = 0) -> str:
        return (self.call_begin + self.head.format(name=name, index=index) + self.args_begin + arguments
                + self.args_end + self.call_end)

    def section_text(self, calls: list[tuple[str, str]]) -> str:
        """What the model writes for these (name, arguments) calls."""
        return self.section_begin + self.joiner.join(self.call_text(n, a, i) for i, (n, a) in
                                                     enumerate(calls)) + self.section_end

    def name_of(self, head: str) -> str | None:
        """The function name in a call's head; None if the head does not have this syntax's shape."""
        pattern = re.escape(self.head).replace(r"\{name\}", r"(?P<name>.+?)").replace(r"\{index\}", r"\d+")
        m = re.fullmatch(pattern, head.strip(), re.S)
        return m.group("name").strip() if m else None

    @property
    def markers(self) -> tuple[str, ...]:
        """The single tokens this syntax is written with (they must decode to their text)."""
        return tuple(m for m in (self.section_begin, self.section_end, self.call_begin, self.call_end,
                                 self.args_begin, *self.head_tokens) if m and not m.startswith("\n"))


DEEPSEEK_V3 = ToolSyntax("deepseek-v3", ct.CALLS_BEGIN, ct.CALLS_END, ct.CALL_BEGIN, ct.CALL_END,
                         "function" + ct.TOOL_SEP + "{name}", "\n```json\n", "\n```", "\n",
                         head_tokens=(ct.TOOL_SEP,))
DEEPSEEK_V31 = ToolSyntax("deepseek-v3.1", ct.CALLS_BEGIN, ct.CALLS_END, ct.CALL_BEGIN, ct.CALL_END,
                          "{name}", ct.TOOL_SEP)
KIMI_K2 = ToolSyntax("kimi-k2", ct.K2_CALLS_BEGIN, ct.K2_CALLS_END, ct.K2_CALL_BEGIN, ct.K2_CALL_END,
                     "functions.{name}:{index}", ct.K2_ARGS_BEGIN, head_is_id=True)
TOOL_SYNTAXES = {s.name: s for s in (DEEPSEEK_V3, DEEPSEEK_V31, KIMI_K2)}


@dataclass(frozen=True)
class ChatFormat:
    """A named family member's chat: its template (tokenizer_config.json's chat_template), tools, reasoning."""

    name: str
    template: str
    tools: ToolSyntax
    thinking: str


FORMATS = {f.name: f for f in (
    ChatFormat("v3", ct.V3_TEMPLATE, DEEPSEEK_V3, "never"),
    ChatFormat("r1", ct.R1_TEMPLATE, DEEPSEEK_V3, "always"),
    ChatFormat("v3.1", ct.V31_TEMPLATE, DEEPSEEK_V31, "switch"),
    ChatFormat("r1-0528", ct.R1_0528_TEMPLATE, DEEPSEEK_V3, "model"),
    ChatFormat("kimi-k2", ct.K2_TEMPLATE, KIMI_K2, "never"),
)}


def format_for(name: str) -> ChatFormat:
    if name not in FORMATS:
        raise ValueError(f"chat format {name!r} is not one of {', '.join(FORMATS)}")
    return FORMATS[name]


_ASK = [{"role": "user", "content": "x"}]


def detect_tools(render, token_id) -> ToolSyntax:
    """The syntax whose call the template renders back for an earlier assistant turn that called
    f({}); else the first whose marker tokens the tokenizer has; else DeepSeek-V3's.
    render(messages, add_generation_prompt, **kwargs) -> text; token_id(text) -> id or None."""
    have = [s for s in TOOL_SYNTAXES.values() if all(token_id(m) is not None for m in s.markers)]
    call = {"id": "functions.f:0", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    try:
        text = render(_ASK + [{"role": "assistant", "content": None, "tool_calls": [call]}], False)
    except ValueError:                  # a template with no place for tool calls
        text = ""
    for s in have:
        if s.call_text("f", "{}", 0) in text:
            return s
    return have[0] if have else DEEPSEEK_V3


def detect_thinking(render, token_id) -> str:
    """One of THINKING, from what the template renders (see the module docstring)."""
    if token_id(ct.END_THINK) is None:
        return "never"
    on, off = render(_ASK, True, thinking=True), render(_ASK, True, thinking=False)
    if on != off:
        return "switch"
    if off.rstrip().endswith(ct.THINK):
        return "always"
    try:
        past = render(_ASK + [{"role": "assistant", "content": "r" + ct.END_THINK + "c"}], False)
    except ValueError:
        return "never"
    return "model" if "r" + ct.END_THINK not in past else "never"
