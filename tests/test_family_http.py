"""R1-0528, Kimi K2 and V3.2 over HTTP with the official openai client (issue 27), one server per member
on the simulated cluster (1-rank prefill and decode units, random tiny checkpoints); V3.1 is
tests/test_family_serve.py.

Each chat answer is held to the raw /v1/completions answer of the prompt the member's template
renders (computed here with the checkpoint's own tokenizer and the same seeded sampling), split as
the member reasons; each forced tool call to the text the model wrote, token by token (chat
logprobs), in the member's own syntax spelled out below from its special tokens, not from
model/chat_formats.py; V3.2's greedy tokens to a single-process engine's.
"""
from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest

from conftest import one_rank_server
from epserve.model import chat_templates as ct
from epserve.model.tokenizer import Tokenizer

ASK = [{"role": "system", "content": "Be brief."},
       {"role": "user", "content": "What is 2 + 3? Answer with one digit."}]
ADD = {"type": "object", "additionalProperties": False, "required": ["a", "b"],
       "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                      "b": {"type": "integer", "minimum": 0, "maximum": 9}}}
TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add two digits", "parameters": ADD}}]
FORCE = {"type": "function", "function": {"name": "add"}}


class Member:
    """One served member: its checkpoint, tokenizer and an openai client for its server."""

    def __init__(self, preset, model_dir, base):
        self.preset, self.dir, self.base = preset, model_dir, base
        self.tok = Tokenizer(model_dir)
        self.client = openai.OpenAI(base_url=base + "/v1", api_key="k", max_retries=0, timeout=120)

    def prompt(self, messages, **kw) -> list[int]:
        return self.tok.encode(self.tok.apply_chat_template(messages, **kw), add_special=False)

    def raw(self, prompt: list[int], **sampling):
        return self.client.completions.create(model="m", prompt=prompt, **sampling).choices[0]

    def chat(self, **kw):
        return self.client.chat.completions.create(model="m", messages=ASK, **kw)


@pytest.fixture(scope="module")
def served(request, ray_cluster, tmp_path_factory):
    """The member named by the test's parameter, served; one server at a time (pytest groups the
    tests by parameter and tears the previous server down before starting the next)."""
    from epserve.model.tiny import make_tiny_model
    preset = request.param
    model_dir = str(make_tiny_model(tmp_path_factory.mktemp("ckpt") / preset, preset=preset))
    with one_rank_server(model_dir, tmp_path_factory, "m") as base:
        yield Member(preset, model_dir, base)


def member(preset):
    return pytest.mark.parametrize("served", [preset], indirect=True)


def streamed(stream) -> dict:
    """A chat stream's deltas reassembled: reasoning_content, content, and the one tool call's
    id, name and arguments; `order` lists the kinds of the non-empty deltas as they came."""
    got = {"reasoning_content": "", "content": "", "call": {}, "order": []}
    for chunk in stream:
        for c in chunk.choices:
            extra = c.delta.model_extra or {}
            for kind, piece in (("reasoning_content", extra.get("reasoning_content")), ("content", c.delta.content)):
                if piece:
                    got[kind] += piece
                    got["order"].append(kind)
            for d in c.delta.tool_calls or []:
                call = got["call"]
                call.setdefault("id", d.id)
                call.setdefault("name", d.function.name)
                call["arguments"] = call.get("arguments", "") + (d.function.arguments or "")
                got["order"].append("tool_calls")
    return got


def written(choice) -> list[str]:
    """The text of each token the model wrote for a chat choice (its logprobs' tokens)."""
    return [t.token for t in choice.logprobs.content]


# ---- R1-0528: the model opens <think> itself; system prompts; V3's tool calls --------------------

def r1_sampling(tok):
    """Seeded sampling under which this random R1-0528 writes <think> first and closes it with
    </think> within 16 tokens (the seed was found by trying; the tests assert that it does)."""
    return dict(max_tokens=16, temperature=1.0, seed=45, extra_body={"ignore_eos": True},
                logit_bias={str(tok.token_id(ct.THINK)): 6, str(tok.token_id(ct.END_THINK)): 5})


@member("r1-0528-tiny")
def test_r1_0528_chat_is_its_templates_completion_split_at_think(served):
    tok = served.tok
    text = tok.apply_chat_template(ASK)
    assert text == ct.BOS + "Be brief." + ct.USER + ASK[1]["content"] + ct.ASSISTANT   # system prompt in, no <think>
    raw_choice = served.raw(served.prompt(ASK), **r1_sampling(tok))
    raw = raw_choice.text
    assert raw.startswith(ct.THINK) and ct.END_THINK in raw       # the model opened and closed its reasoning
    reasoning, _, content = raw[len(ct.THINK):].partition(ct.END_THINK)
    r = served.chat(**r1_sampling(tok))
    msg = r.choices[0].message
    assert (msg.model_extra["reasoning_content"], msg.content) == (reasoning, content.lstrip("\n"))
    assert reasoning and content
    assert r.usage.prompt_tokens == len(served.prompt(ASK))
    # reasoning tokens: the model's tokens up to and including its first </think>
    ids = raw_choice.model_extra["token_ids"]
    assert r.usage.completion_tokens_details.reasoning_tokens == ids.index(tok.token_id(ct.END_THINK)) + 1


@member("r1-0528-tiny")
def test_r1_0528_stream_reassembles_to_the_whole_answer(served):
    whole = served.chat(**r1_sampling(served.tok)).choices[0].message
    got = streamed(served.chat(stream=True, **r1_sampling(served.tok)))
    assert got["order"][0] == "reasoning_content" and "content" in got["order"]
    assert got["order"] == sorted(got["order"], key=lambda k: k == "content")     # reasoning, then the answer
    assert (got["reasoning_content"], got["content"]) == (whole.model_extra["reasoning_content"], whole.content)


@member("r1-0528-tiny")
def test_r1_0528_forced_tool_call_is_written_in_v3s_syntax_after_its_reasoning(served):
    tok = served.tok
    kw = {**r1_sampling(tok), "max_tokens": 100, "extra_body": {}}
    r = served.chat(tools=TOOLS, tool_choice=FORCE, parallel_tool_calls=False, logprobs=True, **kw)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and [t.function.name for t in c.message.tool_calls] == ["add"]
    args = c.message.tool_calls[0].function.arguments
    jsonschema.validate(json.loads(args), ADD)
    # the reasoning is free (the grammar starts after </think>): the raw completion of the prompt with
    # the tools rendered, under the same sampling, reasons the same way
    prompt = served.prompt(ASK, tools=TOOLS)
    assert r.usage.prompt_tokens == len(prompt) and "### add" in tok.apply_chat_template(ASK, tools=TOOLS)
    raw = served.raw(prompt, **kw).text
    reasoning = c.message.model_extra["reasoning_content"]
    assert raw.startswith(ct.THINK + reasoning + ct.END_THINK)
    # after </think> the model wrote V3's call, token by token
    tokens = written(c)
    after = "".join(tokens[tokens.index(ct.END_THINK) + 1:])
    assert after == (ct.CALLS_BEGIN + ct.CALL_BEGIN + "function" + ct.TOOL_SEP + "add\n```json\n" + args + "\n```"
                     + ct.CALL_END + ct.CALLS_END)
    # streamed: the same reasoning and call
    got = streamed(served.chat(tools=TOOLS, tool_choice=FORCE, parallel_tool_calls=False, stream=True, **kw))
    assert got["reasoning_content"] == reasoning and got["content"] == ""
    assert (got["call"]["name"], got["call"]["arguments"]) == ("add", args)
    # the call goes back into the history in V3's format, the reasoning dropped
    history = ASK + [{"role": "assistant", "content": None,
                      "tool_calls": [t.model_dump(exclude_none=True) for t in c.message.tool_calls]},
                     {"role": "tool", "tool_call_id": c.message.tool_calls[0].id, "content": "5"}]
    follow = served.client.chat.completions.create(model="m", messages=history, max_tokens=2, temperature=0.0)
    assert follow.usage.prompt_tokens == len(served.prompt(history))
    assert ct.TOOL_SEP + "add\n```json\n" + args + "\n```" in tok.apply_chat_template(history)


# ---- Kimi K2: tiktoken tokens, its own roles and calls named by id ----------------------------------

K2_SAMPLING = dict(max_tokens=16, temperature=1.0, seed=3, extra_body={"ignore_eos": True})


@member("kimi-k2-tiny")
def test_k2_chat_is_the_completion_of_its_templates_prompt(served):
    text = served.tok.apply_chat_template(ASK)
    assert text == (ct.K2_SYSTEM + "system" + ct.K2_MIDDLE + "Be brief." + ct.K2_IM_END + ct.K2_USER + "user"
                    + ct.K2_MIDDLE + ASK[1]["content"] + ct.K2_IM_END + ct.K2_ASSISTANT + "assistant" + ct.K2_MIDDLE)
    raw = served.raw(served.prompt(ASK), **K2_SAMPLING).text
    r = served.chat(**K2_SAMPLING)
    assert raw and r.choices[0].message.content == raw
    assert r.choices[0].message.model_extra.get("reasoning_content") is None     # K2 Instruct does not reason
    assert r.usage.prompt_tokens == len(served.prompt(ASK))
    got = streamed(served.chat(stream=True, **K2_SAMPLING))
    assert (got["content"], got["reasoning_content"]) == (raw, "")


@member("kimi-k2-tiny")
def test_k2_forced_tool_call_is_written_in_its_syntax_and_named_by_its_id(served):
    kw = dict(max_tokens=60, temperature=1.0, seed=3, tools=TOOLS, tool_choice=FORCE, parallel_tool_calls=False)
    r = served.chat(logprobs=True, **kw)
    c = r.choices[0]
    assert r.usage.prompt_tokens == len(served.prompt(ASK, tools=TOOLS))        # the tools declared in K2's turn
    assert served.tok.apply_chat_template(ASK, tools=TOOLS).startswith(ct.K2_SYSTEM + "tool_declare" + ct.K2_MIDDLE)
    assert c.finish_reason == "tool_calls" and c.message.content is None
    call = c.message.tool_calls[0]
    assert call.function.name == "add" and re.fullmatch(r"functions\.add:\d+", call.id)
    jsonschema.validate(json.loads(call.function.arguments), ADD)
    assert "".join(written(c)) == (ct.K2_CALLS_BEGIN + ct.K2_CALL_BEGIN + call.id + ct.K2_ARGS_BEGIN
                                   + call.function.arguments + ct.K2_CALL_END + ct.K2_CALLS_END)
    got = streamed(served.chat(stream=True, **kw))
    assert got["call"] == {"id": call.id, "name": "add", "arguments": call.function.arguments}


# ---- V3.2: DeepSeek Sparse Attention through the served path ----------------------------------------

V32_SAMPLING = dict(max_tokens=16, temperature=1.0, seed=2, extra_body={"ignore_eos": True})


@member("v32-tiny")
def test_v32_chat_is_the_completion_of_its_prompt_and_streams_the_same(served):
    from epserve.model.checkpoint import read_config
    prompt = served.prompt(ASK)
    assert len(prompt) > read_config(served.dir).index_topk      # long enough that attention is sparse
    raw = served.raw(prompt, **V32_SAMPLING).text
    r = served.chat(**V32_SAMPLING)
    assert raw and r.choices[0].message.content == raw and r.usage.prompt_tokens == len(prompt)
    got = streamed(served.chat(stream=True, **V32_SAMPLING))
    assert (got["content"], got["reasoning_content"]) == (raw, "")


@member("v32-tiny")
def test_v32_served_greedy_tokens_equal_a_single_process_engines(served):
    """Prefill on one rank, decode on another: the KV handoff carries the indexer's keys too."""
    from epserve.model.sampling import SamplingParams
    from epserve.pipelines.local import make_local_engine
    from epserve.pipelines.sequence import Sequence
    prompt = served.prompt(ASK)
    r = served.client.completions.create(model="m", prompt=prompt, max_tokens=12, temperature=0.0,
                                         extra_body={"ignore_eos": True})
    engine = make_local_engine(served.dir)
    seq = Sequence("g", prompt, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    engine.add(seq)
    while engine.has_work:
        engine.step()
    assert r.choices[0].model_extra["token_ids"] == seq.output_ids
