"""Constrained decoding's grammars: what a request must produce, compiled once per grammar.

The engine is llguidance (chosen by `epserve bench grammar` on this project's CPU: ~1 ms to
compile a JSON schema and 25 us p50 per next-token mask on a 32k vocabulary, against 8 ms / 73 us
for xgrammar and 172 ms / 62 us for outlines-core; it needs neither torch nor triton, and its
lark grammars name special tokens by id, which DeepSeek's tool-call format needs).
A GrammarSpec is plain text, so it crosses actor boundaries inside SamplingParams; each rank keeps
a GrammarCache: one compiled matcher per spec, deep-copied for every request that uses it.
Never: touches logits (model/logit_adjust.py applies the masks) or keeps per-request state.
"""
from __future__ import annotations

import json
import time
from collections import OrderedDict
from dataclasses import dataclass

from epserve.errors import GrammarError

# Compact JSON (no free whitespace): a model cannot spend its tokens on blank space, and every
# answer still parses. Separators as json.dumps(separators=(",", ":")).
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}


@dataclass(frozen=True)
class GrammarSpec:
    kind: str         # json_object | json_schema | lark
    source: str = ""  # json_schema: the schema as JSON text; lark: the grammar; json_object: ""
    param: str = "response_format"     # the request field it came from, named in errors

    def to_llguidance(self) -> str:
        """The grammar in llguidance's serialised form."""
        import llguidance
        if self.kind == "lark":
            return llguidance.LLMatcher.grammar_from_lark(self.source)
        schema = {"type": "object"} if self.kind == "json_object" else json.loads(self.source)
        if not isinstance(schema, dict):
            raise GrammarError("the JSON schema must be an object", self.param)
        return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=JSON_OPTIONS)


def load_lltokenizer(tokenizer_json: str, n_vocab: int, eos_ids: tuple[int, ...]):
    import llguidance
    return llguidance.LLTokenizer(tokenizer_json, n_vocab=n_vocab, eos_token=list(eos_ids) or None)


class GrammarCache:
    """Compiled grammars for one tokenizer, least recently used dropped past `max_entries`."""

    def __init__(self, lltokenizer, max_entries: int = 256):
        self.tok, self.max_entries = lltokenizer, max_entries
        self.protos: OrderedDict[GrammarSpec, object] = OrderedDict()
        self.n_compiled, self.compile_s = 0, 0.0

    def check(self, spec: GrammarSpec) -> None:
        """GrammarError unless the spec compiles (the ingress calls this before admitting)."""
        self.matcher(spec)

    def matcher(self, spec: GrammarSpec):
        """A fresh matcher at the grammar's start (a copy of the cached compiled one)."""
        import llguidance
        proto = self.protos.get(spec)
        if proto is None:
            t = time.perf_counter()
            try:
                grammar = spec.to_llguidance()
                is_error, msgs = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.tok)
            except (ValueError, TypeError, RuntimeError) as exc:
                raise GrammarError(f"{spec.param}: {exc}", spec.param) from None
            if is_error:
                raise GrammarError(f"{spec.param}: {'; '.join(msgs)[:500]}", spec.param)
            proto = llguidance.LLMatcher(self.tok, grammar)
            if proto.is_error():
                raise GrammarError(f"{spec.param}: {proto.get_error()[:500]}", spec.param)
            self.compile_s += time.perf_counter() - t
            self.n_compiled += 1
            self.protos[spec] = proto
            if len(self.protos) > self.max_entries:
                self.protos.popitem(last=False)
        self.protos.move_to_end(spec)
        return proto.deep_copy()
