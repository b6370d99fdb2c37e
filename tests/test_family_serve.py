"""DeepSeek-V3.1's hybrid thinking over HTTP with the official openai client, as DeepSeek's API
serves it: one model, `deepseek-chat` (thinking off) and `deepseek-reasoner` (thinking on), or
chat_template_kwargs {"thinking": ...}; reasoning_content whole and streamed; tool calls in V3.1's
format in each mode. One server on the simulated cluster (1-rank units, v31-tiny random weights).

Each chat answer is held to the raw completion of the prompt the mode must render (the same
sampled tokens), split as the mode says: so a wrong template argument or a wrong split fails.
"""
from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from conftest import one_rank_server
from epserve.model import chat_templates as ct
from epserve.model.tokenizer import Tokenizer
from epserve.serve.chat_output import parse

ASK = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"}]
ADD = {"type": "object", "additionalProperties": False, "required": ["a", "b"],
       "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                      "b": {"type": "integer", "minimum": 0, "maximum": 9}}}
TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add two digits", "parameters": ADD}}]


@pytest.fixture(scope="module")
def v31_dir(tmp_path_factory):
    from epserve.model.tiny import make_tiny_model
    return str(make_tiny_model(tmp_path_factory.mktemp("ckpt") / "v31", preset="v31-tiny"))


@pytest.fixture(scope="module")
def server(ray_cluster, v31_dir, tmp_path_factory):
    with one_rank_server(v31_dir, tmp_path_factory, "v31") as base:
        yield base


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="k", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tok(v31_dir):
    return Tokenizer(v31_dir)


def sampling(tok):
    """Sampled (seeded) with </think> favoured, so a thinking answer closes its reasoning early."""
    return dict(max_tokens=16, temperature=1.0, seed=1, logit_bias={str(tok.token_id(ct.END_THINK)): 4},
                extra_body={"ignore_eos": True})


def raw(client, tok, thinking: bool) -> str:
    """The completion of the prompt V3.1's template renders in that mode, with the same sampling."""
    prompt = tok.encode(tok.apply_chat_template(ASK, thinking=thinking), add_special=False)
    return client.completions.create(model="v31", prompt=prompt, **sampling(tok)).choices[0].text


def test_models_lists_both_mode_names(client):
    assert [m.id for m in client.models.list().data] == ["v31", "deepseek-chat", "deepseek-reasoner"]


def test_deepseek_reasoner_thinks_and_splits_reasoning_content(client, tok):
    text = raw(client, tok, thinking=True)
    assert ct.END_THINK in text                     # the sampling closes the reasoning: the split is exercised
    want = parse(text, True, False)
    msg = client.chat.completions.create(model="deepseek-reasoner", messages=ASK, **sampling(tok)).choices[0].message
    assert (msg.model_extra["reasoning_content"], msg.content) == (want.reasoning, want.content)
    assert want.reasoning and want.content


def test_deepseek_chat_answers_without_thinking(client, tok):
    text = raw(client, tok, thinking=False)
    r = client.chat.completions.create(model="deepseek-chat", messages=ASK, **sampling(tok))
    msg = r.choices[0].message
    assert msg.content == text and msg.model_extra.get("reasoning_content") is None
    assert r.usage.completion_tokens_details is None or not r.usage.completion_tokens_details.reasoning_tokens


@pytest.mark.parametrize("thinking,named", [(True, "deepseek-reasoner"), (False, "deepseek-chat")])
def test_chat_template_kwargs_select_the_same_mode_as_the_name(client, tok, thinking, named):
    kw = sampling(tok)
    by_kwargs = client.chat.completions.create(model="v31", messages=ASK, **{
        **kw, "extra_body": {**kw["extra_body"], "chat_template_kwargs": {"thinking": thinking}}}).choices[0].message
    by_name = client.chat.completions.create(model=named, messages=ASK, **kw).choices[0].message
    assert (by_kwargs.content, by_kwargs.model_extra.get("reasoning_content")) == \
        (by_name.content, by_name.model_extra.get("reasoning_content"))


def test_reasoner_stream_reassembles_to_the_whole_answer(client, tok):
    whole = client.chat.completions.create(model="deepseek-reasoner", messages=ASK, **sampling(tok)).choices[0]
    kinds, got = [], {"reasoning_content": "", "content": ""}
    for chunk in client.chat.completions.create(model="deepseek-reasoner", messages=ASK, stream=True,
                                                **sampling(tok)):
        for c in chunk.choices:
            for k in got:
                piece = (c.delta.model_extra or {}).get(k) if k == "reasoning_content" else c.delta.content
                if piece:
                    kinds.append(k)
                    got[k] += piece
    assert kinds[0] == "reasoning_content" and kinds == sorted(kinds, key=lambda k: k == "content")
    assert got == {"reasoning_content": whole.message.model_extra["reasoning_content"],
                   "content": whole.message.content}


@pytest.mark.parametrize("model", ["deepseek-chat", "deepseek-reasoner"])
def test_a_forced_tool_call_in_each_mode_parses_in_v31_format(client, tok, model):
    kw = sampling(tok)
    r = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, parallel_tool_calls=False,
                                       tool_choice={"type": "function", "function": {"name": "add"}},
                                       **{**kw, "max_tokens": 120, "extra_body": {}})
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and [t.function.name for t in c.message.tool_calls] == ["add"]
    jsonschema.validate(json.loads(c.message.tool_calls[0].function.arguments), ADD)
    reasoning = c.message.model_extra.get("reasoning_content")
    assert (reasoning is not None) == (model == "deepseek-reasoner")
    # the call goes back into the history in V3.1's own format
    calls = [t.model_dump(exclude_none=True) for t in c.message.tool_calls]
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": calls},
                     {"role": "tool", "tool_call_id": c.message.tool_calls[0].id, "content": "5"}]
    text = tok.apply_chat_template(history, thinking=model == "deepseek-reasoner")
    assert ct.CALL_BEGIN + "add" + ct.TOOL_SEP + c.message.tool_calls[0].function.arguments + ct.CALL_END in text
    follow = client.chat.completions.create(model=model, messages=history, max_tokens=4, temperature=0.0)
    assert follow.usage.prompt_tokens == len(tok.encode(text, add_special=False))


def test_a_mode_name_contradicted_by_kwargs_is_a_400_naming_it(client):
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="deepseek-chat", messages=ASK, max_tokens=2,
                                       extra_body={"chat_template_kwargs": {"thinking": True}})
    assert exc.value.body["param"] == "chat_template_kwargs.thinking"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="deepseek-v4", messages=ASK, max_tokens=2)


@pytest.mark.parametrize("model,thinking", [("deepseek-reasoner", True), ("deepseek-chat", False), ("v31", False)])
def test_tokenize_renders_the_mode_the_name_selects(server, tok, model, thinking):
    import httpx
    r = httpx.post(server + "/tokenize", json={"model": model, "messages": ASK}, headers={"Authorization": "Bearer k"})
    assert r.status_code == 200
    assert r.json()["tokens"] == tok.encode(tok.apply_chat_template(ASK, thinking=thinking), add_special=False)
