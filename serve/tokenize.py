"""POST /tokenize and /detokenize, as vLLM and SGLang serve them (no model runs).

/tokenize takes a completion body (`prompt`, and `suffix` for FIM) or a chat body (`messages`,
`tools`, `tool_choice`; a last assistant message with `prefix: true`), renders it exactly as the
generation routes do, and answers {"tokens", "count", "max_model_len"} (with "token_strs" when
`return_token_strs` is true). `add_special_tokens` (completions; default true) adds BOS, and
`add_generation_prompt` (chat; default true) is the template's. The model name and
`chat_template_kwargs` pick the chat mode as on /v1/chat/completions (serve/chat_mode.py).
/detokenize takes {"model", "tokens"} and answers {"prompt": text}.
Unknown fields are refused as on every route (serve/openai_models.py's rule).
"""
from __future__ import annotations

from epserve.serve.inputs import Inputs
from epserve.errors import InvalidRequest
from epserve.serve.chat_mode import ChatModes
from epserve.serve.openai_models import ChatRequest, parse

_TOKENIZE_ONLY = ("add_special_tokens", "add_generation_prompt", "return_token_strs")


class TokenizeRoutes:
    def __init__(self, inputs: Inputs, modes: ChatModes, max_len: int):
        self.inputs, self.modes, self.max_len = inputs, modes, max_len
        self.model_name = modes.names[0]              # serve.model_name: what a body without `model` means

    def _check(self, data) -> dict:
        if not isinstance(data, dict):
            raise InvalidRequest("request body must be a JSON object")
        if self.inputs.tokenizer is None:
            raise InvalidRequest("this model has no tokenizer", param="model")
        self.modes.check_name(data.get("model", self.model_name))
        return data

    def tokenize(self, data) -> dict:
        data = self._check(data)
        opts = {k: data[k] for k in _TOKENIZE_ONLY if k in data}
        body = {"model": self.model_name, **{k: v for k, v in data.items() if k not in _TOKENIZE_ONLY}}
        if "messages" not in body:
            body.pop("model")
        tok = self.inputs.tokenizer
        if "messages" in body:
            req = parse(ChatRequest, body)
            mode = self.modes.resolve(req.model, req.chat_template_kwargs)
            plan = self.inputs.tool_plan(req, True, self.modes.syn)
            if opts.get("add_generation_prompt", True):
                ids = tok.encode(self.inputs.chat_text(req, plan, mode.template_kwargs), add_special=False)
            else:
                text = tok.apply_chat_template([self.inputs._message(m) for m in req.messages],
                                               add_generation_prompt=False, tools=plan.render, **mode.template_kwargs)
                ids = tok.encode(text, add_special=False)
        elif "prompt" in body:
            prompt, suffix = body["prompt"], body.get("suffix")
            extra = set(body) - {"prompt", "suffix"}
            if extra:
                raise InvalidRequest(f"{sorted(extra)[0]}: unrecognized request argument", param=sorted(extra)[0])
            if not isinstance(prompt, str) or (suffix is not None and not isinstance(suffix, str)):
                raise InvalidRequest("prompt: must be a string (and suffix, if given)", param="prompt")
            text = self.inputs.fim_text(prompt, suffix) if suffix is not None else prompt
            ids = tok.encode(text, add_special=bool(opts.get("add_special_tokens", True)))
        else:
            raise InvalidRequest("prompt or messages: one is required", param="prompt")
        out = {"tokens": ids, "count": len(ids), "max_model_len": self.max_len}
        if opts.get("return_token_strs"):
            out["token_strs"] = [tok.tok.id_to_token(i) for i in ids]
        return out

    def detokenize(self, data) -> dict:
        data = self._check(data)
        extra = set(data) - {"model", "tokens"}
        if extra:
            raise InvalidRequest(f"{sorted(extra)[0]}: unrecognized request argument", param=sorted(extra)[0])
        ids = data.get("tokens")
        if not isinstance(ids, list) or any(isinstance(t, bool) or not isinstance(t, int) for t in ids):
            raise InvalidRequest("tokens: must be a list of token ids", param="tokens")
        bad = [t for t in ids if not 0 <= t < self.inputs.vocab_size]
        if bad:
            raise InvalidRequest(f"tokens: token id {bad[0]} is outside the vocabulary [0, {self.inputs.vocab_size})",
                                 param="tokens")
        return {"prompt": self.inputs.tokenizer.decode(ids)}
