"""The whole DeepSeek/OpenAI API with the official openai client on the simulated cluster: JSON and
schema outputs, tool calls (streamed and not), logit bias, n > 1, FIM, prefix completion, the
fields refused by name, /tokenize and /detokenize, and an R1-template model's reasoning_content.

One server (1-rank prefill and decode units, random weights); the R1 app is a second Serve app
on the same units (same weights, the R1 chat template), on route prefix /r1.
"""
from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from conftest import free_port, wait_healthy
from epserve.config import load_config
from epserve.model import chat_templates as ct
from epserve.model.tokenizer import Tokenizer

AUTH = {"Authorization": "Bearer k"}
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city", "days", "metric"],
          "properties": {"city": {"type": "string", "maxLength": 10}, "days": {"type": "integer", "minimum": 1,
                                                                                "maximum": 7},
                         "metric": {"type": "boolean"}, "sky": {"enum": ["sun", "rain", "snow"]}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": SCHEMA}},
         {"type": "function", "function": {"name": "add", "description": "Add two integers", "parameters": {
             "type": "object", "additionalProperties": False, "required": ["a", "b"],
             "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                            "b": {"type": "integer", "minimum": 0, "maximum": 99}}}}}]
ARGS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def r1_dir(tmp_path_factory):
    from epserve.model.tiny import make_tiny_model
    return str(make_tiny_model(tmp_path_factory.mktemp("ckpt") / "tiny_r1", chat_template="r1"))


@pytest.fixture(scope="module")
def server(ray_cluster, tiny_dir, r1_dir, tmp_path_factory):
    from ray import serve

    from epserve.serve.app import start_deployment
    from epserve.serve.ingress import Ingress
    port = free_port()
    cfg = load_config({"model": tiny_dir, "dtype": "float32", "kernels": "reference",
                       "ledger": {"path": str(tmp_path_factory.mktemp("ledger")), "flush_interval_s": 3600},
                       "kv_store": {"path": str(tmp_path_factory.mktemp("kv"))},
                       "prefill": {"gpus_per_node": 1, "kv_pages": 32}, "decode": {"gpus_per_node": 1, "kv_pages": 64},
                       "serve": {"port": port, "model_name": "tiny", "api_keys": ["k"]}})
    dep = start_deployment(cfg)
    base = f"http://127.0.0.1:{port}"
    wait_healthy(base)
    r1_cfg = load_config({"model": r1_dir, "dtype": "float32", "kernels": "reference", "kv_store": {"enabled": False},
                          "serve": {"port": port, "model_name": "tiny-r1", "api_keys": ["k"]}})
    serve.run(Ingress.bind(r1_cfg, r1_dir, dep.prefill_units, dep.decode_units), name="epserve-r1",
              route_prefix="/r1", blocking=False)
    wait_healthy(base + "/r1")
    yield base
    dep.shutdown()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="k", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return Tokenizer(tiny_dir)


def test_every_json_object_answer_parses(client, tok):
    # Random weights never choose to close a string; a bias on the closing tokens lets answers end
    # within max_tokens. What is asserted is the grammar's: every answer is one JSON object.
    close = {str(tok.encode(c, add_special=False)[0]): 4 for c in ('"', "}")}
    for seed in range(4):
        r = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=200, temperature=1.0, seed=seed,
                                           response_format={"type": "json_object"}, logit_bias=close)
        c = r.choices[0]
        assert c.finish_reason == "stop", c.message.content
        assert isinstance(json.loads(c.message.content), dict)


def test_every_json_schema_answer_validates(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "weather", "schema": SCHEMA, "strict": True}}
    r = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=120, temperature=1.0, seed=1, n=4,
                                       response_format=fmt)
    assert len(r.choices) == 4
    for c in r.choices:
        assert c.finish_reason == "stop"
        jsonschema.validate(json.loads(c.message.content), SCHEMA)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "add"}}])
def test_forced_tool_choice_always_yields_a_call_whose_arguments_validate(client, choice):
    for seed in range(3):
        r = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice=choice, seed=seed,
                                           temperature=1.0, max_tokens=160, parallel_tool_calls=False)
        c = r.choices[0]
        assert c.finish_reason == "tool_calls" and len(c.message.tool_calls) == 1
        call = c.message.tool_calls[0]
        assert call.id.startswith("call_") and call.type == "function"
        if isinstance(choice, dict):
            assert call.function.name == "add"
        jsonschema.validate(json.loads(call.function.arguments), ARGS[call.function.name])


def test_streamed_tool_call_deltas_reassemble_to_the_answer(client):
    kw = dict(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required", temperature=0.0, max_tokens=200,
              parallel_tool_calls=False)
    full = client.chat.completions.create(**kw).choices[0]
    calls: dict[int, dict] = {}
    reasons = []
    for chunk in client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            reasons.append(c.finish_reason)
            for d in c.delta.tool_calls or []:
                if d.id is not None:                     # the first delta of a call: id, type, name
                    assert d.type == "function" and d.function.name and d.index not in calls
                    calls[d.index] = {"name": d.function.name, "arguments": d.function.arguments or ""}
                else:
                    assert d.function.name is None
                    calls[d.index]["arguments"] += d.function.arguments
    want = [{"name": t.function.name, "arguments": t.function.arguments} for t in full.message.tool_calls]
    assert [calls[i] for i in sorted(calls)] == want and reasons[-1] == "tool_calls"


def test_tool_messages_in_the_history_are_rendered(server, client, tok):
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
    r = client.chat.completions.create(model="tiny", messages=history, tools=TOOLS, max_tokens=4, temperature=0.0)
    c = r.choices[0]      # random weights: 4 plain tokens, no call (a call would be finish_reason tool_calls)
    assert (c.finish_reason, c.message.tool_calls, r.usage.completion_tokens) == ("length", None, 4)
    ids = httpx.post(server + "/tokenize", json={"model": "tiny", "messages": history, "tools": TOOLS},
                     headers=AUTH, timeout=30).json()["tokens"]
    text = tok.decode(ids)
    assert ct.OUTPUT_BEGIN + "sunny, 21 C" + ct.OUTPUT_END in text and '{"city":"Paris"}' in text
    assert r.usage.prompt_tokens == len(ids)


def test_logit_bias_of_100_makes_every_sampled_token_that_token(client, tok):
    t = tok.encode(" sea", add_special=False)[0]
    r = client.completions.create(model="tiny", prompt="Hello", max_tokens=8, temperature=1.0, seed=3,
                                  logit_bias={str(t): 100}, extra_body={"ignore_eos": True})
    assert r.model_dump()["choices"][0]["token_ids"] == [t] * 8


def test_n_2_returns_two_choices_and_counts_the_prompt_once(client):
    one = client.completions.create(model="tiny", prompt="The sea is wide", max_tokens=6, temperature=1.0, seed=7,
                                    extra_body={"ignore_eos": True})
    two = client.completions.create(model="tiny", prompt="The sea is wide", max_tokens=6, temperature=1.0, seed=7,
                                    n=2, extra_body={"ignore_eos": True})
    assert [c.index for c in two.choices] == [0, 1]
    assert two.usage.prompt_tokens == one.usage.prompt_tokens
    assert two.usage.completion_tokens == 12 and two.usage.total_tokens == one.usage.prompt_tokens + 12
    assert two.choices[0].text == one.choices[0].text            # choice 0 is the n = 1 answer (seed + 0)
    stream = client.completions.create(model="tiny", prompt="The sea is wide", max_tokens=6, temperature=1.0,
                                       seed=7, n=2, stream=True, stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True})
    texts, usage = {0: "", 1: ""}, None
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.text
        usage = chunk.usage or usage
    assert [texts[0], texts[1]] == [c.text for c in two.choices] and usage.prompt_tokens == one.usage.prompt_tokens


def test_fim_prompt_is_deepseeks_token_sequence(server, client, tok):
    prefix, suffix = "def main():\n    ", "\n    return 0"
    want = [tok.bos_id, tok.token_id(ct.FIM_BEGIN), *tok.encode(prefix, add_special=False),
            tok.token_id(ct.FIM_HOLE), *tok.encode(suffix, add_special=False), tok.token_id(ct.FIM_END)]
    got = httpx.post(server + "/tokenize", json={"model": "tiny", "prompt": prefix, "suffix": suffix},
                     headers=AUTH, timeout=30).json()
    assert got["tokens"] == want and got["count"] == len(want)
    r = client.completions.create(model="tiny", prompt=prefix, suffix=suffix, max_tokens=3, temperature=0.0)
    assert r.usage.prompt_tokens == len(want)


def test_prefix_completion_continues_the_last_assistant_message(server, client, tok):
    msgs = ASK + [{"role": "assistant", "content": "The weather in Paris is", "prefix": True}]
    want = tok.encode(tok.apply_chat_template(ASK) + "The weather in Paris is", add_special=False)
    got = httpx.post(server + "/tokenize", json={"model": "tiny", "messages": msgs}, headers=AUTH, timeout=30).json()
    assert got["tokens"] == want
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=3, temperature=0.0)
    assert r.usage.prompt_tokens == len(want)
    bad = httpx.post(server + "/v1/chat/completions", headers=AUTH, timeout=30,
                     json={"model": "tiny", "messages": [{"role": "user", "content": "x", "prefix": True}]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages.prefix"


def test_detokenize_inverts_tokenize(server):
    ids = httpx.post(server + "/tokenize", json={"model": "tiny", "prompt": "Hello, world!",
                                                 "add_special_tokens": False}, headers=AUTH, timeout=30).json()
    back = httpx.post(server + "/detokenize", json={"model": "tiny", "tokens": ids["tokens"]}, headers=AUTH,
                      timeout=30).json()
    assert back == {"prompt": "Hello, world!"}


@pytest.mark.parametrize("field,value", [
    ("audio", {"voice": "alloy", "format": "wav"}), ("modalities", ["text", "audio"]),
    ("prediction", {"type": "content", "content": "x"}), ("web_search_options", {}),
    ("functions", [{"name": "f"}]), ("function_call", "auto"), ("reasoning_effort", "high"),
    ("metadata", {"a": "b"}), ("store", True), ("service_tier", "flex"), ("prompt_cache_key", "k"),
    ("verbosity", "low"), ("safety_identifier", "u1"), ("surprise_me", 1)])
def test_every_unsupported_or_unknown_field_is_a_400_naming_it(server, field, value):
    body = {"model": "tiny", "messages": ASK, "max_tokens": 2, field: value}
    r = httpx.post(server + "/v1/chat/completions", json=body, headers=AUTH, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text


@pytest.mark.parametrize("body,param", [
    ({"prompt": "x", "best_of": 3}, "best_of"), ({"prompt": "x", "n": 99}, "n"),
    ({"prompt": "x", "logit_bias": {"99999": 5}}, "logit_bias"), ({"prompt": "x", "presence_penalty": 9}, "presence_penalty"),
    ({"prompt": "x", "echo": True, "logprobs": 1}, "echo"),
    ({"prompt": "x", "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {
        "type": "object", "properties": {"a": {"type": "nope"}}}}}}, "response_format.json_schema.schema")])
def test_bad_new_fields_are_400s_naming_the_param(server, body, param):
    r = httpx.post(server + "/v1/completions", json={"model": "tiny", "max_tokens": 2, **body}, headers=AUTH,
                   timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_a_reasoning_models_stream_sends_reasoning_before_content(server, r1_dir):
    r1 = openai.OpenAI(base_url=server + "/r1/v1", api_key="k", max_retries=0, timeout=120)
    end = Tokenizer(r1_dir).token_id(ct.END_THINK)
    kw = dict(model="tiny-r1", messages=ASK, max_tokens=16, temperature=1.0, seed=0, logit_bias={str(end): 5},
              extra_body={"ignore_eos": True})
    full = r1.chat.completions.create(**kw)
    msg = full.choices[0].message
    reasoning, content = msg.model_extra["reasoning_content"], msg.content
    assert reasoning and content and ct.END_THINK not in reasoning
    n_think = full.usage.completion_tokens_details.reasoning_tokens
    assert 0 < n_think < full.usage.completion_tokens
    kinds, got = [], {"reasoning_content": "", "content": ""}
    for chunk in r1.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            for k in got:
                piece = (c.delta.model_extra or {}).get(k) if k == "reasoning_content" else c.delta.content
                if piece:
                    kinds.append(k)
                    got[k] += piece
    assert kinds == sorted(kinds, key=lambda k: k == "content") and kinds[0] == "reasoning_content"
    assert got == {"reasoning_content": reasoning, "content": content}


def test_a_reasoning_models_json_answer_leaves_its_reasoning_free(server, r1_dir):
    """With response_format on an R1-template model, the grammar starts after </think>: the
    reasoning is free text, the content one JSON object."""
    r1 = openai.OpenAI(base_url=server + "/r1/v1", api_key="k", max_retries=0, timeout=120)
    tk = Tokenizer(r1_dir)
    bias = {str(tk.token_id(ct.END_THINK)): 5, **{str(tk.encode(c, add_special=False)[0]): 4 for c in ('"', "}")}}
    free = []
    for seed in range(3):
        r = r1.chat.completions.create(model="tiny-r1", messages=ASK, max_tokens=300, temperature=1.0, seed=seed,
                                       response_format={"type": "json_object"}, logit_bias=bias)
        msg = r.choices[0].message
        assert r.choices[0].finish_reason == "stop", msg
        assert isinstance(json.loads(msg.content), dict)
        reasoning = msg.model_extra.get("reasoning_content") or ""
        assert ct.END_THINK not in reasoning
        free.append(not reasoning.lstrip().startswith("{"))
    assert any(free)           # some reasoning is not JSON: the grammar did not hold it





def test_stop_token_ids_end_the_answer_at_that_token(client):
    kw = dict(model="tiny", prompt="The quick brown fox", max_tokens=6, temperature=0.0)
    ids = client.completions.create(extra_body={"ignore_eos": True}, **kw).model_dump()["choices"][0]["token_ids"]
    r = client.completions.create(extra_body={"ignore_eos": True, "stop_token_ids": [ids[2]]}, **kw)
    c = r.model_dump()["choices"][0]
    assert c["token_ids"] == ids[:ids.index(ids[2]) + 1] and c["finish_reason"] == "stop"



@pytest.mark.parametrize("kind,kwargs,param", [
    ("chat", {"top_logprobs": 2}, "top_logprobs"),
    ("chat", {"logprobs": False, "top_logprobs": 0}, "top_logprobs"),
    ("chat", {"stream_options": {"include_usage": True}}, "stream_options"),
    ("completions", {"stream": False, "stream_options": {"include_usage": True}}, "stream_options"),
    ("chat", {"max_tokens": 4, "max_completion_tokens": 5}, "max_completion_tokens"),
    ("completions", {"max_tokens": 4, "extra_body": {"max_completion_tokens": 5}}, "max_completion_tokens"),
])
def test_each_api_combination_openai_refuses_answers_400_naming_it(client, kind, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        if kind == "chat":
            client.chat.completions.create(model="tiny", messages=ASK, **kwargs)
        else:
            client.completions.create(model="tiny", prompt="Hello", **kwargs)
    assert e.value.status_code == 400 and e.value.body["param"] == param


def test_completion_text_offset_is_where_each_token_starts(client, tok):
    kw = dict(model="tiny", prompt="The sea is wide", max_tokens=8, temperature=0.0, logprobs=0,
              extra_body={"ignore_eos": True})
    r = client.completions.create(**kw)
    c, ids = r.choices[0], r.model_dump()["choices"][0]["token_ids"]
    offsets = c.logprobs.text_offset
    assert offsets == [len(tok.decode(ids[:k])) for k in range(len(ids))] and offsets[0] == 0
    for off, piece in zip(offsets, c.logprobs.tokens):
        if "\ufffd" not in piece:                 # a token ending half a character has no text alone
            assert c.text[off:off + len(piece)] == piece
    streamed = [o for chunk in client.completions.create(stream=True, **kw) for ch in chunk.choices
                if ch.logprobs for o in ch.logprobs.text_offset]
    assert streamed == offsets


def test_a_message_name_is_accepted_and_deepseeks_template_renders_no_place_for_it(server, client):
    named = [{"role": "user", "content": "What is the weather in Paris?", "name": "alice"}]
    r = client.chat.completions.create(model="tiny", messages=named, max_tokens=2, temperature=0.0)
    ids = [httpx.post(server + "/tokenize", json={"model": "tiny", "messages": m}, headers=AUTH,
                      timeout=30).json()["tokens"] for m in (named, ASK)]
    assert ids[0] == ids[1] and r.usage.prompt_tokens == len(ids[0])
