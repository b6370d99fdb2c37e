"""Issue 26, part 6, without a server: the field combinations refused by name, what reaches the chat
template (names, tool-call ids), completions' text_offset, stop strings over a token stream, and n.

The same refusals answer 400 over HTTP (tests/test_serve_api.py); LLM.generate's n and stop strings
run on a unit in tests/test_llm_generate.py.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from epserve.errors import InvalidRequest
from epserve.model.sampling import SamplingParams
from epserve.model.tokenizer import StopText, Tokenizer
from epserve.serve.inputs import Inputs
from epserve.serve.openai_models import ChatRequest, CompletionRequest, parse
from epserve.serve.structured import ToolPlan

ASK = [{"role": "user", "content": "hi"}]
CHAT, COMP = {"model": "m", "messages": ASK}, {"model": "m", "prompt": "hi"}


@pytest.mark.parametrize("cls,body,param", [
    (ChatRequest, {**CHAT, "top_logprobs": 2}, "top_logprobs"),
    (ChatRequest, {**CHAT, "top_logprobs": 0, "logprobs": False}, "top_logprobs"),
    (ChatRequest, {**CHAT, "stream_options": {"include_usage": True}}, "stream_options"),
    (ChatRequest, {**CHAT, "stream": False, "stream_options": {}}, "stream_options"),
    (CompletionRequest, {**COMP, "stream_options": {"include_usage": True}}, "stream_options"),
    (ChatRequest, {**CHAT, "max_tokens": 4, "max_completion_tokens": 5}, "max_completion_tokens"),
    (CompletionRequest, {**COMP, "max_tokens": 9, "max_completion_tokens": 3}, "max_completion_tokens"),
])
def test_fields_that_mean_nothing_together_are_refused_naming_the_param(cls, body, param):
    with pytest.raises(InvalidRequest) as e:
        parse(cls, body)
    assert e.value.param == param and e.value.status == 400 and param in e.value.message


@pytest.mark.parametrize("cls,body", [
    (ChatRequest, {**CHAT, "top_logprobs": 2, "logprobs": True}),
    (ChatRequest, {**CHAT, "stream": True, "stream_options": {"include_usage": True}}),
    (CompletionRequest, {**COMP, "max_tokens": 7, "max_completion_tokens": 7}),
    (ChatRequest, {**CHAT, "max_completion_tokens": 7}),
])
def test_the_same_fields_in_combinations_that_mean_something_are_accepted(cls, body):
    req = parse(cls, body)
    assert req.model == "m"


# A template of the kind other checkpoints ship: it shows speaker names and tool-call ids.
NAMED_TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}{% if m.get('name') %} {{ m['name'] }}{% endif %}]"
    "{{ m['content'] or '' }}{% for c in m.get('tool_calls') or [] %}<call {{ c.get('id', '-') }} "
    "{{ c['function']['name'] }}>{% endfor %}{% if m.get('tool_call_id') %}<answers {{ m['tool_call_id'] }}>"
    "{% endif %}{% endfor %}")
HISTORY = [{"role": "system", "content": "be brief", "name": "ops"},
           {"role": "user", "content": "weather?", "name": "alice"},
           {"role": "assistant", "content": None, "tool_calls": [
               {"id": "call_7", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
           {"role": "tool", "tool_call_id": "call_7", "content": "sunny"}]


def _inputs(tok: Tokenizer) -> Inputs:
    return Inputs(tok, tok.vocab_size, 2048, 64)


def test_names_and_tool_call_ids_reach_a_template_that_uses_them(tiny_dir, tmp_path):
    model = Path(shutil.copytree(tiny_dir, tmp_path / "named"))
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": NAMED_TEMPLATE}))
    text = _inputs(Tokenizer(model)).chat_text(parse(ChatRequest, {"model": "m", "messages": HISTORY}), ToolPlan())
    assert text == ("[system ops]be brief[user alice]weather?[assistant]<call call_7 get_weather>"
                    "[tool]sunny<answers call_7>")


def test_deepseeks_template_has_no_place_for_names_or_call_ids_and_refuses_none(tiny_dir):
    """DeepSeek-V3/R1's template renders neither (a call's output follows it by order): the same
    prompt with and without them, and a request carrying them is accepted, not refused."""
    inputs = _inputs(Tokenizer(tiny_dir))
    bare = [{k: v for k, v in m.items() if k not in ("name", "tool_call_id")} for m in HISTORY]
    bare[2] = {**bare[2], "tool_calls": [{k: v for k, v in c.items() if k != "id"} for c in bare[2]["tool_calls"]]}
    with_ids = inputs.chat_text(parse(ChatRequest, {"model": "m", "messages": HISTORY}), ToolPlan())
    without = inputs.chat_text(parse(ChatRequest, {"model": "m", "messages": bare}), ToolPlan())
    assert with_ids == without and "alice" not in with_ids and "call_7" not in with_ids
    assert "sunny" in with_ids and "get_weather" in with_ids


def test_text_offset_is_where_each_tokens_text_starts_in_the_completion(tiny_dir):
    tok = Tokenizer(tiny_dir)
    inputs = _inputs(tok)
    text = "The sea is wide, and the café is open."
    ids = tok.encode(text, add_special=False)
    lps = [{"token_id": t, "logprob": -1.0, "top": []} for t in ids]
    got = inputs.logprobs(False, ids, lps, None)
    offsets, pieces = got["text_offset"], got["tokens"]
    assert len(offsets) == len(ids) and offsets[0] == 0 and offsets == sorted(offsets)
    whole = [p for p in pieces if "\ufffd" not in p]        # a token ending half of "é" has no text alone
    assert len(whole) >= len(ids) - 2
    for off, piece in zip(offsets, pieces):
        if "\ufffd" not in piece:
            assert text[off:off + len(piece)] == piece
    # a stream sends one token at a time, after the ones before it: the same offsets
    streamed = [inputs.logprobs(False, ids[k:k + 1], lps[k:k + 1], None, ids[:k])["text_offset"][0]
                for k in range(len(ids))]
    assert streamed == offsets


def test_stop_text_ends_at_the_token_that_completes_the_stop_string(tiny_dir):
    tok = Tokenizer(tiny_dir)
    ids = tok.encode("Hello world. Bye. Again", add_special=False)
    st = StopText(tok, ("xyz", ". B"))
    hits = [st.push(t) for t in ids]
    first = hits.index(True)
    assert tok.decode(ids[:first + 1]).find(". B") >= 0 and ". B" not in tok.decode(ids[:first])
    assert st.text == "Hello world" and all(hits[first:])
    assert st.ids == ids[:first + 1]                         # tokens after the hit change nothing


@pytest.mark.parametrize("n", [0, -1, 1.5, True])
def test_n_must_be_a_positive_integer(n):
    with pytest.raises(InvalidRequest) as e:
        SamplingParams(n=n)
    assert e.value.param == "n"
