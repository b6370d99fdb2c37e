"""⑥ What goes back: per-choice text with stop strings, and OpenAI's bodies and stream chunks.

A `ChoiceState` follows one choice: its tokens -> text (held back while a stop string may be
starting), its chat parse (reasoning_content / content / tool_calls, serve/chat_output.py),
its finish_reason ("tool_calls" when it called tools) and its reasoning token count (tokens up to
and including </think>). `Shape` says what the request's answers carry.
Never: talks to the units.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from epserve.model.chat_formats import DEEPSEEK_V3, ToolSyntax
from epserve.model.tokenizer import IncrementalText
from epserve.serve import chat_output


@dataclass(frozen=True)
class Shape:
    chat: bool
    reasoning: bool = False          # split reasoning_content (R1's template, V3.1 thinking: serve/chat_mode.py)
    tools: bool = False              # parse tool calls
    end_think_id: int | None = None
    echo: str | None = None          # completions with echo: the prompt text, before the answer
    syn: ToolSyntax = DEEPSEEK_V3    # how the model writes tool calls (model/chat_formats.py)


@dataclass
class ChoiceState:
    index: int
    shape: Shape
    inc: IncrementalText | None
    stops: tuple[str, ...]
    text: str = ""                   # the text released so far (stop strings applied)
    tokens: list[int] = field(default_factory=list)
    lps: list[dict] = field(default_factory=list)
    reason: str | None = None
    stream: chat_output.ChatStream | None = None

    def __post_init__(self):
        if self.shape.chat:
            self.stream = chat_output.ChatStream(self.shape.reasoning, self.shape.tools, self.shape.syn)

    def push(self, tok: int, lp: dict | None, reason: str | None) -> str:
        """Take one token; returns the text it releases. Sets `reason` when the choice ends here
        (a stop string ends it with "stop")."""
        self.tokens.append(tok)
        if lp is not None:
            self.lps.append(lp)
        if self.inc is None:
            self.reason = reason
            return ""
        self.inc.push(tok)
        full = self.inc.flush() if reason else self.inc.text
        cut = min((i for i in (full.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            full, reason = full[:cut], "stop"
            safe = cut
        else:
            hold = max((len(s) - 1 for s in self.stops), default=0)   # a stop string may be starting
            safe = len(full) if reason else max(len(self.text), len(full) - hold)
        delta, self.text = full[len(self.text):safe], full[:safe]
        self.reason = reason
        return delta

    @property
    def finish_reason(self) -> str | None:
        if self.reason == "stop" and self.stream is not None and self.shape.tools and \
                chat_output.parse(self.text, self.shape.reasoning, True, syn=self.shape.syn).calls:
            return "tool_calls"
        return self.reason

    @property
    def n_reasoning(self) -> int:
        t = self.shape.end_think_id
        return self.tokens.index(t) + 1 if t in self.tokens else len(self.tokens)

    def body(self, logprobs) -> dict:
        """The choice of a non-streaming response."""
        out = {"index": self.index, "finish_reason": self.finish_reason, "logprobs": logprobs}
        if self.shape.chat:
            out["message"] = chat_output.message(self.text, self.shape.reasoning, self.shape.tools, self.shape.syn)
        else:
            out["text"] = (self.shape.echo or "") + self.text
            out["token_ids"] = self.tokens
        return out

    def chunk(self, delta_text: str, logprobs, first: bool = False) -> dict | None:
        """The choice of one stream chunk for the text just released (None: nothing to send)."""
        reason = self.finish_reason if self.reason else None
        if not self.shape.chat:
            text = ((self.shape.echo or "") if first else "") + delta_text
            return {"index": self.index, "text": text, "finish_reason": reason, "logprobs": logprobs}
        delta = self.stream.push(self.text, final=reason is not None)
        if first:
            delta = {"role": "assistant", "content": "", **delta}
        if not delta and reason is None and logprobs is None:
            return None
        return {"index": self.index, "delta": delta, "finish_reason": reason, "logprobs": logprobs}
