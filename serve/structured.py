"""① What a request's output must look like: response_format and tool_choice -> a GrammarSpec.

response_format: `text` (none), `json_object` (any JSON object), `json_schema` (the given schema;
`strict` or not, the schema is enforced). Tools, by tool_choice:
  none       the tools are not rendered, the tool-call token is banned, nothing is parsed;
  auto       rendered and parsed; with parallel_tool_calls false a grammar allows either free text
             or exactly one call;
  required   a grammar forces one call (or more, with parallel_tool_calls) of any of the tools;
  {"type": "function", "function": {"name": N}}  a grammar forces exactly one call of N.
The grammars write the model's tool-call syntax (model/chat_formats.py: DeepSeek-V3's, V3.1's or
Kimi K2's) with its special tokens, and each call's arguments are the function's JSON schema
(compact JSON), so they always parse and validate.
Every problem is a 400 naming the field. Never: samples or parses output (serve/chat_output.py).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

from epserve.errors import InvalidRequest
from epserve.model.chat_formats import DEEPSEEK_V3, ToolSyntax
from epserve.model.grammar import JSON_OPTIONS, GrammarCache, GrammarSpec


@dataclass(frozen=True)
class ToolPlan:
    """How one chat request uses its tools."""

    render: list[dict] | None = None     # tools as the chat template takes them (None: not rendered)
    parse: bool = False                   # parse tool calls out of the answer
    grammar: GrammarSpec | None = None
    banned: tuple[int, ...] = ()          # token ids given a -100 bias (tool_choice none)


def _check_schema(schema, param: str) -> dict:
    import jsonschema
    if not isinstance(schema, dict):
        raise InvalidRequest(f"{param}: must be a JSON schema object", param=param)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise InvalidRequest(f"{param}: not a valid JSON schema: {exc.message}", param=param) from None
    return schema


def response_grammar(fmt: dict | None) -> GrammarSpec | None:
    if fmt is None:
        return None
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return GrammarSpec("json_object")
    if kind == "json_schema":
        js = fmt.get("json_schema")
        if not isinstance(js, dict) or "schema" not in js:
            raise InvalidRequest("response_format.json_schema: needs {name, schema[, strict]}",
                                 param="response_format.json_schema")
        schema = _check_schema(js["schema"], "response_format.json_schema.schema")
        return GrammarSpec("json_schema", json.dumps(schema, sort_keys=True), "response_format.json_schema.schema")
    raise InvalidRequest(f"response_format.type: must be text, json_object or json_schema, got {kind!r}",
                         param="response_format.type")


def _lark(text: str, ids: dict[str, int]) -> str:
    """`text` as a Lark sequence: its marker tokens as <[id]>, the rest as string literals."""
    pieces = re.split("(" + "|".join(re.escape(m) for m in ids) + ")", text) if ids else [text]
    return " ".join(f"<[{ids[p]}]>" if p in ids else json.dumps(p) for p in pieces if p)


def _call_rule(i: int, name: str, schema: dict, ids: dict[str, int], syn: ToolSyntax) -> str:
    schema = {**schema, "x-guidance": JSON_OPTIONS}
    # the head; a call index (Kimi K2's functions.NAME:0, counted over the conversation) is a number of at
    # most 3 digits, so an undertrained model cannot spin in it
    head = " /[0-9]{1,3}/ ".join(_lark(part.format(name=name), ids) for part in syn.head.split("{index}"))
    end = (_lark(syn.args_end, ids) + " " if syn.args_end else "") + f"<[{ids[syn.call_end]}]>"
    return (f"f{i}: {head} {_lark(syn.args_begin, ids)} a{i} {end}\n"
            f"a{i}: %json {json.dumps(schema, sort_keys=True)}\n")


def tools_grammar(tools: list[dict], ids: dict[str, int], many: bool, free_text: bool,
                  syn: ToolSyntax = DEEPSEEK_V3) -> str:
    """Lark for `syn` tool calls of `tools` (one, or one or more if `many`); `free_text` also
    allows a plain answer instead of the calls. ids: each of syn.markers -> its token id."""
    joiner = (_lark(syn.joiner, ids) + " ") if syn.joiner else ""
    calls = f"call ({joiner}call)*" if many else "call"
    rules = [f"start: {'TEXT | ' if free_text else ''}<[{ids[syn.section_begin]}]> {calls} "
             f"<[{ids[syn.section_end]}]>",
             f"call: <[{ids[syn.call_begin]}]> (" + " | ".join(f"f{i}" for i in range(len(tools))) + ")"]
    if free_text:
        rules.append("TEXT: /(.|\\n)*/")
    text = "\n".join(rules) + "\n"
    for i, t in enumerate(tools):
        text += _call_rule(i, t["function"]["name"], t["function"].get("parameters") or {"type": "object"}, ids, syn)
    return text


def plan_tools(req, tokenizer, syn: ToolSyntax = DEEPSEEK_V3) -> ToolPlan:
    """The request's ToolPlan; 400 for tool_choice without tools, unknown names, bad schemas."""
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else []
    choice = req.tool_choice if req.tool_choice is not None else ("auto" if tools else "none")
    for i, t in enumerate(tools):
        if "parameters" in t["function"]:
            _check_schema(t["function"]["parameters"], f"tools[{i}].function.parameters")
    if len({t["function"]["name"] for t in tools}) != len(tools):
        raise InvalidRequest("tools: function names must be unique", param="tools")
    if choice == "none":
        banned = tuple(i for i in [tokenizer.token_id(syn.section_begin)] if i is not None)
        return ToolPlan(banned=banned)
    if not tools:
        raise InvalidRequest(f"tool_choice: {choice!r} needs `tools`", param="tool_choice")
    ids = {k: tokenizer.token_id(k) for k in syn.markers}
    if any(v is None for v in ids.values()):
        raise InvalidRequest(f"tools: this model's tokenizer has no {syn.name} tool-call tokens", param="tools")
    many = bool(req.parallel_tool_calls)
    if choice == "auto":
        grammar = None if many else GrammarSpec("lark", tools_grammar(tools, ids, False, True, syn), "tools")
        return ToolPlan(tools, True, grammar)
    if choice == "required":
        return ToolPlan(tools, True, GrammarSpec("lark", tools_grammar(tools, ids, many, False, syn), "tools"))
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) and \
        choice.get("type") == "function" else None
    if name is None:
        raise InvalidRequest("tool_choice: must be none, auto, required or {\"type\": \"function\", \"function\": "
                             "{\"name\": ...}}", param="tool_choice")
    named = [t for t in tools if t["function"]["name"] == name]
    if not named:
        raise InvalidRequest(f"tool_choice: no tool is named {name!r}", param="tool_choice")
    return ToolPlan(tools, True, GrammarSpec("lark", tools_grammar(named, ids, False, False, syn), "tool_choice"))


def check_grammar(cache: GrammarCache | None, spec: GrammarSpec | None) -> None:
    """Compile at the edge (cached per spec), so a grammar the engine refuses is a 400, not a rank error."""
    if spec is None:
        return
    if cache is None:
        raise InvalidRequest(f"{spec.param}: this model has no tokenizer for constrained decoding", param=spec.param)
    cache.check(spec)                 # GrammarError: an InvalidRequest naming spec.param
