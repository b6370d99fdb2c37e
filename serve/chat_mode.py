"""① Which chat mode a request asks for: the model name and chat_template_kwargs -> thinking on or off.

DeepSeek's API serves V3.1 as two models, `deepseek-chat` (non-thinking) and `deepseek-reasoner`
(thinking): the name in the request selects the mode. vLLM and SGLang take
`chat_template_kwargs: {"thinking": true}` (or `enable_thinking`) with any name. Both work here, for
a checkpoint whose template has a thinking switch (model/chat_formats.py `detect_thinking`):

  model                      chat_template_kwargs.thinking   thinking
  serve.model_name           absent                          off (the template's default)
  serve.model_name           true / false                    as asked
  serve.chat_model_name      absent or false                 off
  serve.reasoner_model_name  absent or true                  on
  a mode name                the other value                 400 naming chat_template_kwargs.thinking

Without a switch only serve.model_name is served, and reasoning_content follows the template
(R1 opens <think>, R1-0528's model does) unless serve.reasoning says on or off.
Never: renders or tokenizes (model/tokenizer.py does).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from epserve.errors import InvalidRequest, ModelNotFound
from epserve.model.chat_formats import DEEPSEEK_V3, ToolSyntax, detect_thinking, detect_tools

# names the template is always given by the server; a request may not set them
RESERVED = ("messages", "tools", "add_generation_prompt", "bos_token", "eos_token")


@dataclass(frozen=True)
class ChatMode:
    reasoning: bool                               # split reasoning_content from the answer
    template_kwargs: dict = field(default_factory=dict)


class ChatModes:
    """The served names and the checkpoint's chat format; `resolve` gives one request's mode."""

    def __init__(self, serve_cfg, tokenizer):
        self.setting = serve_cfg.reasoning        # auto | on | off
        render = tokenizer.apply_chat_template if tokenizer is not None and tokenizer.chat_template else None
        self.syn: ToolSyntax = detect_tools(render, tokenizer.token_id) if render else DEEPSEEK_V3
        self.thinking = detect_thinking(render, tokenizer.token_id) if render else "never"
        self.modes: dict[str, bool | None] = {serve_cfg.model_name: None}
        if self.thinking == "switch":
            for name, on in ((serve_cfg.chat_model_name, False), (serve_cfg.reasoner_model_name, True)):
                if name and name != serve_cfg.model_name:
                    self.modes[name] = on

    @property
    def names(self) -> list[str]:
        return list(self.modes)

    def check_name(self, model: str) -> None:
        if model not in self.modes:
            served = ", ".join(repr(n) for n in self.modes)
            raise ModelNotFound(f"model {model!r} does not exist; this server serves {served}", param="model")

    def resolve(self, model: str, kwargs: dict | None) -> ChatMode:
        """The mode of a chat request (ModelNotFound / InvalidRequest as the table above says)."""
        self.check_name(model)
        kwargs = dict(kwargs or {})
        for key in kwargs:
            if key in RESERVED:
                raise InvalidRequest(f"chat_template_kwargs.{key}: set by the server, not the request",
                                     param="chat_template_kwargs")
        asked = kwargs.get("thinking", kwargs.get("enable_thinking"))
        if asked is not None and not isinstance(asked, bool):
            raise InvalidRequest(f"chat_template_kwargs.thinking: must be true or false, got {asked!r}",
                                 param="chat_template_kwargs.thinking")
        named = self.modes[model]
        if named is not None and asked is not None and asked != named:
            raise InvalidRequest(f"chat_template_kwargs.thinking: {str(asked).lower()} contradicts model {model!r} "
                                 f"(thinking {'on' if named else 'off'}); drop one",
                                 param="chat_template_kwargs.thinking")
        if self.thinking == "switch":
            on = asked if asked is not None else bool(named)
            kwargs["thinking"] = on
        else:
            on = self.thinking in ("always", "model")
        reasoning = {"on": True, "off": False}.get(self.setting, on)
        return ChatMode(reasoning, kwargs)
