"""⑥ An answer's text -> reasoning_content, content and tool_calls, whole or as OpenAI stream deltas.

DeepSeek's markers are single tokens, so a marker is either in the text or not; only the
closing fence of a call's arguments ("\\n```") spans tokens, and a stream holds back a tail that
may be its start. The stream is the whole parse diffed against what was sent: `ChatStream.push`
re-parses the text so far and emits only what grew, so the deltas always reassemble to the
non-streaming answer (`parse` on the final text).

  R1 (reasoning):  <reasoning ...></think><content>     (the template already opened <think>)
  tool calls:      <content><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
                   ```json\\nARGS\\n```<｜tool▁call▁end｜>[\\n<call> ...]<｜tool▁calls▁end｜>
Never: touches tokens or the model.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from epserve.model import chat_templates as ct

FENCE_OPEN, FENCE_CLOSE = "\n```json\n", "\n```"


@dataclass
class Parsed:
    reasoning: str = ""
    content: str = ""
    calls: list[list[str]] = field(default_factory=list)     # [name, arguments so far]


def _held(text: str, final: bool, marker: str = FENCE_CLOSE) -> str:
    """text without a tail that may be the start of `marker` (streams only; text cut between
    tokens never splits DeepSeek's one-token markers, but a client's stop string may)."""
    if final:
        return text
    for k in range(min(len(marker), len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return text[:-k]
    return text


def _parse_calls(section: str, final: bool) -> list[list[str]]:
    calls = []
    for part in section.split(ct.CALL_BEGIN)[1:]:
        head, sep, rest = part.partition(ct.TOOL_SEP)
        if not sep:
            break
        name, fence, args = rest.partition(FENCE_OPEN)
        if not fence:
            if final:
                calls.append([name.strip(), ""])
            break
        done = ct.CALL_END in args or FENCE_CLOSE in args
        args = args.split(ct.CALL_END)[0]
        if FENCE_CLOSE in args:
            args = args[:args.index(FENCE_CLOSE)]
        else:
            args = _held(args, final or done)
        calls.append([name.strip(), args])
    return calls


def parse(text: str, reasoning: bool, tools: bool, final: bool = True) -> Parsed:
    out = Parsed()
    if reasoning:
        think, end, text = text.partition(ct.END_THINK)
        if not end:                      # still thinking (or cut off while thinking)
            out.reasoning = _held(think, final, ct.END_THINK)
            return out
        out.reasoning, text = think, text.lstrip("\n")
    if tools and ct.CALLS_BEGIN in text:
        out.content, _, section = text.partition(ct.CALLS_BEGIN)
        out.calls = _parse_calls(section, final)
    else:
        out.content = _held(text, final or not tools, ct.CALLS_BEGIN)
    return out


def message(text: str, reasoning: bool, tools: bool) -> dict:
    """The non-streaming `message` of a chat choice."""
    p = parse(text, reasoning, tools)
    msg: dict = {"role": "assistant", "content": p.content if p.content or not p.calls else None}
    if reasoning:
        msg["reasoning_content"] = p.reasoning
    if p.calls:
        msg["tool_calls"] = [{"id": new_call_id(), "type": "function",
                              "function": {"name": name, "arguments": args}} for name, args in p.calls]
    return msg


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ChatStream:
    """Turns the growing text of one choice into OpenAI `delta` dicts."""

    def __init__(self, reasoning: bool, tools: bool):
        self.reasoning, self.tools = reasoning, tools
        self.sent = Parsed()
        self.n_calls = 0

    def push(self, text: str, final: bool) -> dict:
        """The delta since the last push (empty dict: nothing new)."""
        p = parse(text, self.reasoning, self.tools, final)
        delta: dict = {}
        if len(p.reasoning) > len(self.sent.reasoning):
            delta["reasoning_content"] = p.reasoning[len(self.sent.reasoning):]
        if len(p.content) > len(self.sent.content):
            delta["content"] = p.content[len(self.sent.content):]
        calls = []
        for i, (name, args) in enumerate(p.calls):
            if i >= len(self.sent.calls):
                calls.append({"index": i, "id": new_call_id(), "type": "function",
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
