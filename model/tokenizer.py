"""Text <-> token ids with the checkpoint's own tokenizer files and chat template.

A checkpoint brings tokenizer.json, or (Kimi K2) tiktoken.model with its special tokens in
tokenizer_config.json (model/tiktoken_bpe.py turns those into the same kind of tokenizer). A
checkpoint without either still serves token-id prompts: `load_tokenizer` returns None and callers
refuse text prompts with a clear error.
"""
from __future__ import annotations

import json
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from epserve.model.chat_formats import TOOL_SYNTAXES
from epserve.model.chat_templates import END_THINK, THINK
from epserve.model.tiktoken_bpe import load_tiktoken_dir

# added tokens that decode to their text: the markers the reasoning and tool-call parsers read
PLAIN = {THINK, END_THINK, *(m for s in TOOL_SYNTAXES.values() for m in s.markers)}


class Tokenizer:
    def __init__(self, model_dir: str | Path):
        d = Path(model_dir)
        self.tok = hf_tokenizer(d)
        cfg_path = d / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}

        def token_str(v):
            return v.get("content") if isinstance(v, dict) else v

        self.bos_token, self.eos_token = token_str(cfg.get("bos_token")), token_str(cfg.get("eos_token"))
        self.add_bos = bool(cfg.get("add_bos_token", False))
        self.bos_id = self.tok.token_to_id(self.bos_token) if self.bos_token else None
        self.chat_template = cfg.get("chat_template")
        self._template = None

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if add_special and self.add_bos and self.bos_id is not None and not text.startswith(self.bos_token or "\0"):
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def token_id(self, text: str) -> int | None:
        """The id of a single added token (a special or tool/think/FIM token), None if absent."""
        return self.tok.token_to_id(text)

    @property
    def opens_reasoning(self) -> bool:
        """Whether the template's generation prompt opens a <think> block (R1-style): rendered, not guessed."""
        if not self.chat_template or self.token_id(END_THINK) is None:
            return False
        prompt = self.apply_chat_template([{"role": "user", "content": "x"}])
        return prompt.rstrip().endswith(THINK)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None, **kwargs) -> str:
        """kwargs: the template's own arguments (V3.1's `thinking`), as chat_template_kwargs sends them."""
        if not self.chat_template:
            raise ValueError("this checkpoint's tokenizer_config.json has no chat_template")
        if self._template is None:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                undefined=jinja2.StrictUndefined)
            # HF's tojson (plain JSON text): Jinja's own returns Markup, which HTML-escapes what it is added to
            env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
            self._template = env.from_string(self.chat_template)
        try:
            return self._template.render(**kwargs, messages=messages, add_generation_prompt=add_generation_prompt,
                                         tools=tools, bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        except jinja2.TemplateError as exc:        # a message the template cannot render: the request's fault
            raise ValueError(f"the chat template cannot render these messages: {exc}") from None


def hf_tokenizer(model_dir: str | Path):
    """The checkpoint's `tokenizers.Tokenizer`: tokenizer.json, else tiktoken.model converted."""
    from tokenizers import Tokenizer as HFTokenizer
    d = Path(model_dir)
    if (d / "tokenizer.json").is_file():
        return HFTokenizer.from_file(str(d / "tokenizer.json"))
    return load_tiktoken_dir(d, PLAIN)


def has_tokenizer(model_dir: str | Path) -> bool:
    d = Path(model_dir)
    return (d / "tokenizer.json").is_file() or ((d / "tiktoken.model").is_file()
                                                and (d / "tokenizer_config.json").is_file())


def tokenizer_json(model_dir: str | Path) -> str:
    """The tokenizer as tokenizer.json text (what llguidance reads), converted when it is tiktoken's."""
    d = Path(model_dir)
    return (d / "tokenizer.json").read_text() if (d / "tokenizer.json").is_file() else hf_tokenizer(d).to_str()


def load_tokenizer(model_dir: str | Path) -> Tokenizer | None:
    return Tokenizer(model_dir) if has_tokenizer(model_dir) else None


class IncrementalText:
    """Turns a growing list of token ids into text deltas; holds back half-decoded UTF-8."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.ids, self.text = tokenizer, [], ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        full = self.tokenizer.decode(self.ids)
        if full.endswith("\ufffd"):
            return ""
        delta, self.text = full[len(self.text):], full
        return delta

    def flush(self) -> str:
        """The whole text at the end, including any incomplete trailing bytes (as U+FFFD)."""
        self.text = self.tokenizer.decode(self.ids)
        return self.text


class StopText:
    """A growing token list's text, cut before the first of its stop strings (OpenAI's semantics:
    the stop string is not returned). `push` says when the text first contains one; from then on
    `text` is everything before it and further tokens change nothing."""

    def __init__(self, tokenizer: Tokenizer, stops: tuple[str, ...]):
        self.tokenizer, self.stops, self.ids, self.text, self.is_hit = tokenizer, stops, [], "", False
        self._longest = max(len(s) for s in stops)

    def push(self, token_id: int) -> bool:
        """Take one token -> True if the text now contains a stop string (this token completed it)."""
        if self.is_hit:
            return True
        self.ids.append(token_id)
        full = self.tokenizer.decode(self.ids)
        start = max(0, len(self.text) - self._longest)     # a new match ends in the new text
        cut = min((i for i in (full.find(s, start) for s in self.stops) if i >= 0), default=-1)
        self.is_hit = cut >= 0
        self.text = full[:cut] if self.is_hit else full
        return self.is_hit
