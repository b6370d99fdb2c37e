"""OpenAI request bodies (pydantic) and error bodies; DeepSeek's usage names.

Validation lives here, at the edge: a bad body becomes an InvalidRequest (epserve.errors) that
names the parameter, with a message that names the value and the limit.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from epserve.errors import InvalidRequest
from epserve.fleet.ledger import MAX_USER_CHARS


# One rule for fields: a field OpenAI's API (or DeepSeek's, vLLM's extensions below) defines is either
# implemented or answered with a 400 that names it (UNSUPPORTED); a field nobody defines is refused
# with a 400 naming it, as OpenAI's own API does ("Unrecognized request argument"). Nothing is ignored.
UNSUPPORTED = {
    "audio": "audio output", "modalities": "output modalities other than text", "prediction": "predicted outputs",
    "web_search_options": "web search", "functions": "the deprecated `functions` (send `tools`)",
    "function_call": "the deprecated `function_call` (send `tool_choice`)", "reasoning_effort": "reasoning_effort",
    "verbosity": "verbosity", "metadata": "stored-completion metadata", "store": "stored completions",
    "service_tier": "service tiers", "prompt_cache_key": "prompt_cache_key (the KV store keys prompts itself)",
    "safety_identifier": "safety_identifier", "best_of": "best_of (send `n`)",
}
# Fields of a message that the model parses but refuses when set (not null), with why; checked in
# ChatRequest.refuse_combinations, and docs/api.md lists them as refused (tests/test_docs.py).
# DeepSeek's API answers 400 for reasoning_content in input messages to deepseek-reasoner: earlier
# turns' reasoning is never part of the prompt (the R1 template drops it), so a client must strip it
# rather than believe the model sees it.
REFUSED_IN_MESSAGES = {
    "reasoning_content": "an earlier turn's reasoning is not part of the prompt (DeepSeek's R1 template drops it); "
                         "send the assistant turn's content without reasoning_content",
}
_DEFAULTS_OK = {"modalities": (["text"],), "store": (False,), "service_tier": ("auto", "default")}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Common(_Strict):
    model: str
    max_tokens: int | None = Field(default=None)
    max_completion_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1                       # vLLM/SGLang extension
    min_p: float = 0.0                    # vLLM/SGLang extension
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None   # vLLM extension
    stream: bool = False
    stream_options: dict | None = None
    ignore_eos: bool = False              # vLLM extension
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0       # vLLM/SGLang extension
    logit_bias: dict[str, float] | None = None
    user: str | None = None               # the caller's end-user id: recorded in the ledger row, billed by key
    response_format: dict | None = None

    @field_validator("stream_options")
    @classmethod
    def _stream_options(cls, v):
        if v is not None and set(v) - {"include_usage"}:
            raise ValueError(f"unsupported keys {sorted(set(v) - {'include_usage'})}; only include_usage")
        return v

    @field_validator("user")
    @classmethod
    def _user(cls, v):
        if v is not None and len(v) > MAX_USER_CHARS:
            raise ValueError(f"{len(v)} characters; at most {MAX_USER_CHARS}")
        return v

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))

    def refuse_combinations(self) -> None:
        """400 for fields that are each valid but mean nothing together (OpenAI and vLLM refuse
        them too), instead of silently dropping one."""
        if self.stream_options is not None and not self.stream:
            raise InvalidRequest("stream_options: only allowed with stream: true", param="stream_options")
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise InvalidRequest(f"max_completion_tokens: {self.max_completion_tokens} differs from max_tokens "
                                 f"{self.max_tokens}; send one of them (or the same value)",
                                 param="max_completion_tokens")


class CompletionRequest(_Common):
    prompt: str | list[int] | list[str] | list[list[int]]
    suffix: str | None = None             # fill-in-the-middle (DeepSeek's FIM tokens)
    logprobs: int | None = None
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _single_prompt(cls, v):
        if isinstance(v, list) and v and isinstance(v[0], (str, list)):
            if len(v) != 1:
                raise ValueError("batched prompts are not supported; send one prompt per request")
            return v[0]
        return v


class ToolCallFunction(_Strict):
    name: str
    arguments: str


class ToolCall(_Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None      # assistant turns that called tools
    tool_call_id: str | None = None               # tool turns: the call they answer
    prefix: bool = False                          # DeepSeek's chat prefix completion (last assistant turn)
    reasoning_content: str | None = None          # refused unless null (ChatRequest.refuse_combinations)

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for p in self.content:
            if p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise ValueError("only text content parts are supported")
            parts.append(p["text"])
        return "".join(parts)


class FunctionDef(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class ChatRequest(_Common):
    messages: list[ChatMessage]
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Tool] | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool = True
    chat_template_kwargs: dict[str, Any] | None = None     # the template's arguments (V3.1: thinking)

    @field_validator("messages")
    @classmethod
    def _non_empty(cls, v):
        if not v:
            raise ValueError("messages must be a non-empty list")
        return v

    def refuse_combinations(self) -> None:
        super().refuse_combinations()
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequest(f"top_logprobs: {self.top_logprobs} needs logprobs: true", param="top_logprobs")
        for i, m in enumerate(self.messages):       # a null is the field left unset, and passes
            for key, why in REFUSED_IN_MESSAGES.items():
                if getattr(m, key) is not None:
                    raise InvalidRequest(f"messages[{i}].{key}: {why}", param=f"messages[{i}].{key}")


def refuse_unsupported(data: dict) -> None:
    """400 naming the first known-but-unsupported field that asks for something (see UNSUPPORTED)."""
    for key, what in UNSUPPORTED.items():
        if key in data and data[key] is not None and data[key] not in _DEFAULTS_OK.get(key, ()):
            if key == "best_of" and data[key] == data.get("n", 1):
                continue
            raise InvalidRequest(f"{key}: {what} is not supported by this server", param=key,
                                 code="unsupported_parameter")


def parse(model_cls, data: Any):
    """Validate a JSON body; the first problem (a field, or fields that do not go together) becomes a
    400 naming the parameter."""
    if not isinstance(data, dict):
        raise InvalidRequest("request body must be a JSON object")
    refuse_unsupported(data)
    data = {k: v for k, v in data.items() if k not in UNSUPPORTED}
    try:
        req = model_cls.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = [p for p in err.get("loc", ()) if not (isinstance(p, str) and p[:1].isupper())]   # union tags
        param = ".".join(str(p) for p in loc if not isinstance(p, int)) or None
        msg = err.get("msg", "invalid value").removeprefix("Value error, ")
        if err.get("type") == "extra_forbidden":
            msg = f"unrecognized request argument {loc[-1]!r} (this server refuses fields it does not know)"
        raise InvalidRequest(f"{param}: {msg}" if param else msg, param=param) from None
    req.refuse_combinations()
    return req
