"""⑥ An answer's text -> reasoning_content, content and tool_calls, whole or as OpenAI stream deltas.

The tool-call syntax is data (model/chat_formats.py `ToolSyntax`: DeepSeek-V3's, V3.1's, Kimi K2's).
Their markers are single tokens, so a marker is either in the text or not; only a text
`args_end` (V3's closing fence "\\n```") spans tokens, and a stream holds back a tail that may be
its start. The stream is the whole parse diffed against what was sent: `ChatStream.push`
re-parses the text so far and emits only what grew, so the deltas always reassemble to the
non-streaming answer (`parse` on the final text).

  reasoning:   [<think>]<reasoning ...></think><content>   (R1's and V3.1's templates open <think>;
                                                           R1-0528 writes it itself)
  tool calls:  <content><section_begin><call_begin>HEAD<args_begin>ARGS<args_end><call_end>
               [joiner<call>...]<section_end>      e.g. V3: <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
                                  ```json\\nARGS\\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>
Never: touches tokens or the model.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from epserve.model import chat_templates as ct
from epserve.model.chat_formats import DEEPSEEK_V3, ToolSyntax


@dataclass
class Parsed:
    reasoning: str = ""
    content: str = ""
    calls: list[list[str]] = field(default_factory=list)     # [name, arguments so far]
    heads: list[str] = field(default_factory=list)           # each call's head (Kimi K2: its id)


def _held(text: str, final: bool, marker: str) -> str:
    """text without a tail that may be the start of `marker` (streams only; text cut between
    tokens never splits a one-token marker, but a client's stop string may)."""
    if final or not marker:
        return text
    for k in range(min(len(marker), len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return text[:-k]
    return text


def _parse_calls(section: str, final: bool, syn: ToolSyntax) -> list[list[str]]:
    """[[name, arguments, head], ...] of the calls begun so far."""
    calls = []
    for part in section.split(syn.call_begin)[1:]:
        head, sep, args = part.partition(syn.args_begin)
        if not sep:                      # the head is still being written
            if final:
                calls.append([syn.name_of(head) or head.strip(), "", head.strip()])
            break
        done = syn.call_end in args or bool(syn.args_end) and syn.args_end in args
        args = args.split(syn.call_end)[0]
        if syn.args_end and syn.args_end in args:
            args = args[:args.index(syn.args_end)]
        else:
            args = _held(args, final or done, syn.args_end or syn.call_end)
        calls.append([syn.name_of(head) or head.strip(), args, head.strip()])
    return calls


def parse(text: str, reasoning: bool, tools: bool, final: bool = True, syn: ToolSyntax = DEEPSEEK_V3) -> Parsed:
    out = Parsed()
    if reasoning:
        if text.lstrip().startswith(ct.THINK):          # the model opened the block itself (R1-0528)
            text = text.lstrip()[len(ct.THINK):]
        think, end, text = text.partition(ct.END_THINK)
        if not end:                      # still thinking (or cut off while thinking)
            out.reasoning = _held(think, final, ct.END_THINK)
            return out
        out.reasoning, text = think, text.lstrip("\n")
    if tools and syn.section_begin in text:
        out.content, _, section = text.partition(syn.section_begin)
        found = _parse_calls(section, final, syn)
        out.calls, out.heads = [c[:2] for c in found], [c[2] for c in found]
    else:
        out.content = _held(text, final or not tools, syn.section_begin)
    return out


def message(text: str, reasoning: bool, tools: bool, syn: ToolSyntax = DEEPSEEK_V3) -> dict:
    """The non-streaming `message` of a chat choice. A call's id is its head where the syntax
    names calls by id (Kimi K2: functions.NAME:0, which its template renders back)."""
    p = parse(text, reasoning, tools, syn=syn)
    msg: dict = {"role": "assistant", "content": p.content if p.content or not p.calls else None}
    if reasoning:
        msg["reasoning_content"] = p.reasoning
    if p.calls:
        msg["tool_calls"] = [{"id": call_id(syn, head), "type": "function",
                              "function": {"name": name, "arguments": args}}
                             for (name, args), head in zip(p.calls, p.heads)]
    return msg


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def call_id(syn: ToolSyntax, head: str) -> str:
    return head if syn.head_is_id and head else new_call_id()


class ChatStream:
    """Turns the growing text of one choice into OpenAI `delta` dicts."""

    def __init__(self, reasoning: bool, tools: bool, syn: ToolSyntax = DEEPSEEK_V3):
        self.reasoning, self.tools, self.syn = reasoning, tools, syn
        self.sent = Parsed()
        self.n_calls = 0

    def push(self, text: str, final: bool) -> dict:
        """The delta since the last push (empty dict: nothing new)."""
        p = parse(text, self.reasoning, self.tools, final, self.syn)
        delta: dict = {}
        if len(p.reasoning) > len(self.sent.reasoning):
            delta["reasoning_content"] = p.reasoning[len(self.sent.reasoning):]
        if len(p.content) > len(self.sent.content):
            delta["content"] = p.content[len(self.sent.content):]
        calls = []
        for i, (name, args) in enumerate(p.calls):
            if i >= len(self.sent.calls):
                calls.append({"index": i, "id": call_id(self.syn, p.heads[i]), "type": "function",
                              "function": {"name": name, "arguments": args}})
                self.sent.calls.append([name, args])
            elif len(args) > len(self.sent.calls[i][1]):
                calls.append({"index": i, "function": {"arguments": args[len(self.sent.calls[i][1]):]}})
                self.sent.calls[i][1] = args
        if calls:
            delta["tool_calls"] = calls
        self.sent.reasoning, self.sent.content = p.reasoning, p.content
        return delta

    @property
    def has_calls(self) -> bool:
        return bool(self.sent.calls)
