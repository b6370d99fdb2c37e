"""① What a request asks for: OpenAI bodies -> token ids and sampling params, and sampled tokens
-> OpenAI logprobs. Every bad value is an APIError naming the param (400) or the limit (413)."""
from __future__ import annotations

from epserve.model.sampling import InvalidRequest, SamplingParams
from epserve.serve.openai_models import APIError


def too_large(what: str, n: int, limit: int, key: str, param: str | None = None) -> APIError:
    return APIError(413, f"{what} is {n:,}; this server takes at most {limit:,} (serve.{key})", param=param,
                    code="request_too_large")


class Inputs:
    """The checkpoint's tokenizer and limits, applied to one request."""

    def __init__(self, tokenizer, vocab_size: int, max_len: int, max_messages: int):
        self.tokenizer, self.vocab_size, self.max_len, self.max_messages = tokenizer, vocab_size, max_len, \
            max_messages

    def check_counts(self, data, chat: bool) -> None:
        """413 before parsing when a chat sends more messages than serve.max_messages."""
        if chat and isinstance(data, dict) and isinstance(data.get("messages"), list) \
                and len(data["messages"]) > self.max_messages:
            raise too_large("the number of messages", len(data["messages"]), self.max_messages, "max_messages",
                            "messages")

    def prompt_ids(self, req, chat: bool) -> list[int]:
        if chat:
            if self.tokenizer is None or not self.tokenizer.chat_template:
                raise APIError(400, "this model has no chat template; use /v1/completions", param="messages")
            try:
                messages = [{"role": m.role if m.role != "developer" else "system", "content": m.text()}
                            for m in req.messages]
                text = self.tokenizer.apply_chat_template(messages)
            except ValueError as exc:
                raise APIError(400, f"messages: {exc}", param="messages") from None
            return self.tokenizer.encode(text, add_special=False)
        prompt = req.prompt
        if isinstance(prompt, str):
            if not prompt:
                raise APIError(400, "prompt: must not be empty", param="prompt")
            if self.tokenizer is None:
                raise APIError(400, "this model has no tokenizer; send the prompt as token ids", param="prompt")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise APIError(400, f"prompt: token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})",
                               param="prompt")
        if not ids:
            raise APIError(400, "prompt: must not be empty", param="prompt")
        return ids

    def params(self, req, chat: bool, n_prompt: int) -> SamplingParams:
        if n_prompt >= self.max_len:
            raise APIError(400, f"this model's maximum context length is {self.max_len} tokens; the prompt has "
                           f"{n_prompt}", param="messages" if chat else "prompt", code="context_length_exceeded")
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if max_tokens is None:
            max_tokens = min(1024, self.max_len - n_prompt) if chat else 16
        if chat:
            logprobs = (req.top_logprobs or 0) if req.logprobs else None
        else:
            logprobs = req.logprobs
        try:
            params = SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                                    top_k=req.top_k, seed=req.seed, stop=req.stop or (), ignore_eos=req.ignore_eos,
                                    logprobs=logprobs)
        except InvalidRequest as exc:
            raise APIError(400, str(exc), param=exc.param) from None
        if n_prompt + params.max_tokens > self.max_len:
            raise APIError(400, f"this model's maximum context length is {self.max_len} tokens; you requested "
                           f"{n_prompt + params.max_tokens} ({n_prompt} in the prompt, {params.max_tokens} to "
                           f"generate)", param="max_tokens", code="context_length_exceeded")
        return params

    def logprobs(self, chat, tokens, lps, req):
        if not lps:
            return None
        dec = (lambda t: self.tokenizer.decode([t])) if self.tokenizer else str
        if chat:
            return {"content": [{"token": dec(lp["token_id"]), "logprob": lp["logprob"],
                                 "bytes": list(dec(lp["token_id"]).encode()),
                                 "top_logprobs": [{"token": dec(t), "logprob": v, "bytes": list(dec(t).encode())}
                                                  for t, v in lp["top"]]} for lp in lps]}
        return {"tokens": [dec(lp["token_id"]) for lp in lps], "token_logprobs": [lp["logprob"] for lp in lps],
                "top_logprobs": [{dec(t): v for t, v in lp["top"]} for lp in lps], "text_offset": []}

