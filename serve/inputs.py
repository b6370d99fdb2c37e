"""① What a request asks for: OpenAI bodies -> token ids and sampling params, and sampled tokens
-> OpenAI logprobs. Every bad value is an InvalidRequest naming the param (400), a ContextTooLong
(400, context_length_exceeded) or a PayloadTooLarge naming the limit (413)."""
from __future__ import annotations

from epserve.model import chat_templates as ct
from epserve.model.chat_formats import DEEPSEEK_V3, ToolSyntax
from epserve.config import check_context
from epserve.errors import InvalidRequest, PayloadTooLarge
from epserve.model.sampling import SamplingParams
from epserve.serve.structured import ToolPlan, plan_tools, response_grammar


def too_large(what: str, n: int, limit: int, key: str, param: str | None = None) -> PayloadTooLarge:
    return PayloadTooLarge(f"{what} is {n:,}; this server takes at most {limit:,} (serve.{key})", param)


class Inputs:
    """The checkpoint's tokenizer and limits, applied to one request."""

    def __init__(self, tokenizer, vocab_size: int, max_len: int, max_messages: int, max_n: int = 16):
        self.tokenizer, self.vocab_size, self.max_len, self.max_messages = tokenizer, vocab_size, max_len, \
            max_messages
        self.max_n = max_n

    def check_counts(self, data, chat: bool) -> None:
        """413 before parsing when a chat sends more messages than serve.max_messages."""
        if chat and isinstance(data, dict) and isinstance(data.get("messages"), list) \
                and len(data["messages"]) > self.max_messages:
            raise too_large("the number of messages", len(data["messages"]), self.max_messages, "max_messages",
                            "messages")

    def tool_plan(self, req, chat: bool, syn: ToolSyntax = DEEPSEEK_V3) -> ToolPlan:
        return plan_tools(req, self.tokenizer, syn) if chat and self.tokenizer is not None else ToolPlan()

    def chat_text(self, req, plan: ToolPlan, template_kwargs: dict | None = None) -> str:
        """The rendered chat: the checkpoint's template over the messages and tools, with the
        request's template arguments (serve/chat_mode.py). A last assistant message with prefix:
        true is continued (DeepSeek's chat prefix completion)."""
        if self.tokenizer is None or not self.tokenizer.chat_template:
            raise InvalidRequest("this model has no chat template; use /v1/completions", param="messages")
        msgs = req.messages
        for i, m in enumerate(msgs):
            if m.prefix and (i != len(msgs) - 1 or m.role != "assistant"):
                raise InvalidRequest(f"messages[{i}].prefix: only the last message, an assistant one, may be a prefix",
                                     param="messages.prefix")
        prefix = msgs[-1].text() if msgs[-1].prefix else None
        try:
            rendered = [self._message(m) for m in (msgs[:-1] if prefix is not None else msgs)]
            text = self.tokenizer.apply_chat_template(rendered, tools=plan.render, **(template_kwargs or {}))
        except ValueError as exc:
            raise InvalidRequest(f"messages: {exc}", param="messages") from None
        return text + (prefix or "")

    @staticmethod
    def _message(m) -> dict:
        """One message as the chat template reads it: role, content, and whatever else OpenAI sends
        that a template may render: `name` (any role), each earlier tool call's `id`, a tool turn's
        `tool_call_id`. DeepSeek's own V3/R1 templates (model/chat_templates.py) render none of the
        three: they have no place for a speaker name or a call id (a call is matched to its output
        by order), so for them these fields change nothing; a checkpoint whose template does use
        them gets them."""
        out = {"role": m.role if m.role != "developer" else "system", "content": m.text()}
        if m.name is not None:
            out["name"] = m.name
        if m.role == "assistant" and m.tool_calls:
            out["content"] = m.text() or None
            out["tool_calls"] = [{"type": "function", **({"id": c.id} if c.id is not None else {}),
                                  "function": {"name": c.function.name, "arguments": c.function.arguments}}
                                 for c in m.tool_calls]
        if m.role == "tool" and m.tool_call_id is not None:
            out["tool_call_id"] = m.tool_call_id
        return out

    def fim_text(self, prompt: str, suffix: str) -> str:
        """DeepSeek's fill-in-the-middle prompt: <｜fim▁begin｜>prefix<｜fim▁hole｜>suffix<｜fim▁end｜>."""
        if self.tokenizer is None or self.tokenizer.token_id(ct.FIM_HOLE) is None:
            raise InvalidRequest("suffix: this model's tokenizer has no FIM tokens", param="suffix")
        if not isinstance(prompt, str):
            raise InvalidRequest("suffix: needs a text prompt", param="suffix")
        return ct.FIM_BEGIN + prompt + ct.FIM_HOLE + suffix + ct.FIM_END

    def prompt_ids(self, req, chat: bool, plan: ToolPlan | None = None,
                   template_kwargs: dict | None = None) -> list[int]:
        if chat:
            return self.tokenizer.encode(self.chat_text(req, plan or ToolPlan(), template_kwargs), add_special=False)
        prompt = req.prompt
        if req.suffix is not None:
            prompt = self.fim_text(prompt, req.suffix)
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequest("prompt: must not be empty", param="prompt")
            if self.tokenizer is None:
                raise InvalidRequest("this model has no tokenizer; send the prompt as token ids", param="prompt")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise InvalidRequest(f"prompt: token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})",
                                     param="prompt")
        if not ids:
            raise InvalidRequest("prompt: must not be empty", param="prompt")
        return ids

    def logit_bias(self, req, plan: ToolPlan) -> dict[int, float]:
        bias = {t: -100.0 for t in plan.banned}
        for key, value in (req.logit_bias or {}).items():
            if not key.lstrip("-").isdigit() or not 0 <= int(key) < self.vocab_size:
                raise InvalidRequest(f"logit_bias: key {key!r} is not a token id in [0, {self.vocab_size})",
                                     param="logit_bias")
            bias[int(key)] = value
        return bias

    def params(self, req, chat: bool, n_prompt: int, plan: ToolPlan | None = None) -> SamplingParams:
        check_context(n_prompt, self.max_len, prompt_param="messages" if chat else "prompt")
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if max_tokens is None:
            max_tokens = min(1024, self.max_len - n_prompt) if chat else 16
        if chat:
            logprobs = (req.top_logprobs or 0) if req.logprobs else None
        else:
            logprobs = req.logprobs
        plan = plan or ToolPlan()
        grammar = response_grammar(req.response_format)
        if grammar is not None and plan.grammar is not None:
            raise InvalidRequest("response_format: cannot be combined with a tool_choice that forces a call",
                                 param="response_format")
        if not 1 <= req.n <= self.max_n:
            raise InvalidRequest(f"n: must be in [1, {self.max_n}] (serve.max_n), got {req.n}", param="n")
        params = SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                                top_k=req.top_k, seed=req.seed, stop=req.stop or (), ignore_eos=req.ignore_eos,
                                logprobs=logprobs, min_p=req.min_p, presence_penalty=req.presence_penalty,
                                frequency_penalty=req.frequency_penalty,
                                repetition_penalty=req.repetition_penalty,
                                logit_bias=self.logit_bias(req, plan), stop_token_ids=req.stop_token_ids or (),
                                grammar=grammar or plan.grammar)
        check_context(n_prompt, self.max_len, params.max_tokens)    # SamplingParams: InvalidRequest naming the param
        return params

    def logprobs(self, chat, tokens, lps, req, before: list[int] | tuple = ()):
        """OpenAI's logprobs of `tokens` (their `lps`), which follow the choice's tokens `before`
        (a stream sends one token's at a time). Completions' `text_offset[k]` is the character
        offset in the completion's text where token k's text starts: the length of the text the
        tokens before it decode to (echo and logprobs do not go together, so no prompt precedes)."""
        if not lps:
            return None
        dec = (lambda t: self.tokenizer.decode([t])) if self.tokenizer else str
        if chat:
            return {"content": [{"token": dec(lp["token_id"]), "logprob": lp["logprob"],
                                 "bytes": list(dec(lp["token_id"]).encode()),
                                 "top_logprobs": [{"token": dec(t), "logprob": v, "bytes": list(dec(t).encode())}
                                                  for t, v in lp["top"]]} for lp in lps]}
        return {"tokens": [dec(lp["token_id"]) for lp in lps], "token_logprobs": [lp["logprob"] for lp in lps],
                "top_logprobs": [{dec(t): v for t, v in lp["top"]} for lp in lps],
                "text_offset": self.text_offsets(list(before), [lp["token_id"] for lp in lps])}

    def text_offsets(self, before: list[int], tokens: list[int]) -> list[int]:
        """Where each of `tokens` starts in the text of before + tokens (characters). Decoding the
        prefix, not adding up single-token texts: a token that ends half a UTF-8 character, or a
        tokenizer that merges spaces, decodes differently alone."""
        if self.tokenizer is None:                    # token ids only: each "text" is str(id)
            start = sum(len(str(t)) for t in before)
            return [start + sum(len(str(t)) for t in tokens[:k]) for k in range(len(tokens))]
        return [len(self.tokenizer.decode(before + tokens[:k])) for k in range(len(tokens))]
