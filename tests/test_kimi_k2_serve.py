"""Kimi K2 by configuration on the simulated cluster: a random kimi-k2-tiny checkpoint (12 routed
experts in one group, its tiktoken tokenizer and chat format) served by 2-rank prefill and decode
units with 7 and 8 expert slots per rank, over HTTP with the official openai client: greedy tokens
equal transformers', chat prompts are K2's template, and K2 tool calls come back parsed; and live
EPLB over K2's one expert group on a 2-rank unit with 7 slots per rank.
"""
from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest

from conftest import free_port, hf_greedy, hf_model, prompts_of, wait_healthy
from epserve.config import load_config
from epserve.model import chat_templates as ct
from epserve.model.tokenizer import Tokenizer

ADD = {"type": "object", "additionalProperties": False, "required": ["a", "b"],
       "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                      "b": {"type": "integer", "minimum": 0, "maximum": 9}}}
TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add two digits", "parameters": ADD}}]
ASK = [{"role": "user", "content": "What is 2 + 3?"}]


@pytest.fixture(scope="module")
def k2_dir(tmp_path_factory):
    from epserve.model.tiny import make_tiny_model
    return str(make_tiny_model(tmp_path_factory.mktemp("ckpt") / "k2", preset="kimi-k2-tiny", seed=7))


def test_eplb_rebalances_k2s_one_group_live_over_seven_slots_per_rank(ray_cluster, k2_dir):
    """A 2-rank unit holding 12 experts + 2 redundant (7 slots per rank): EPLB over K2's single
    group moves weights at one agreed step mid-generation and no token changes."""
    import time

    import ray

    from epserve.actors.eplb_controller import EplbController
    from epserve.actors.unit import UnitSupervisor
    from epserve.messages import RankSpec
    from epserve.model.checkpoint import read_config
    from epserve.model.sampling import SamplingParams
    from epserve.pipelines.sequence import Sequence
    from epserve.placement.topology import UnitShape
    args = read_config(k2_dir)
    assert (args.n_routed_experts, args.n_expert_groups, args.n_limited_groups) == (12, 1, 1)
    shape = UnitShape(1, 2, args.n_routed_experts, redundant_experts=2)
    assert shape.slots_per_rank == 7
    sup = UnitSupervisor.remote(0, "decode", RankSpec(k2_dir, kernels="reference", kv_pages=32), shape,
                                n_moe_layers=args.n_moe_layers, step_timeout_s=60)
    try:
        ray.get(sup.start.remote(), timeout=180)
        prompts, n = [[7] * 20, [11] * 20, [7, 11] * 10], 60         # repetitive: a skewed expert load
        hf = hf_model(k2_dir)
        want = [hf_greedy(hf, p, n)[0] for p in prompts]
        ctrl = EplbController.remote(sup, shape, args.n_expert_groups, interval_s=3600, window_steps=10 ** 9)
        steps0 = ray.get(sup.status.remote())["steps"]
        greedy = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        running = sup.generate.remote([(Sequence(f"k{i}", p, greedy), i % 2) for i, p in enumerate(prompts)])
        while ray.get(sup.status.remote())["steps"] < steps0 + 5:
            time.sleep(0.02)
        report = ray.get(ctrl.rebalance.remote(force=True), timeout=120)
        got = ray.get(running, timeout=300)
        assert [g.token_ids for g in got] == want
        assert report["applied"] and report["weights_moved"] > 0
        assert steps0 + 5 <= report["switch_step"] < ray.get(sup.status.remote())["steps"]
        ray.kill(ctrl)
    finally:
        ray.get(sup.shutdown.remote(), timeout=60)


@pytest.fixture(scope="module")
def server(ray_cluster, k2_dir, tmp_path_factory):
    from epserve.serve.app import start_deployment
    port = free_port()
    cfg = load_config({"model": k2_dir, "dtype": "float32", "kernels": "reference", "kv_store": {"enabled": False},
                       "ledger": {"path": str(tmp_path_factory.mktemp("ledger")), "flush_interval_s": 3600},
                       # 12 experts + 2 (4) redundant over 2 ranks: 7 (8) slots per rank
                       "prefill": {"gpus_per_node": 2, "redundant_experts": 2, "kv_pages": 32},
                       "decode": {"gpus_per_node": 2, "redundant_experts": 4, "kv_pages": 64},
                       "serve": {"port": port, "model_name": "kimi-k2", "api_keys": ["k"]}})
    dep = start_deployment(cfg)
    base = f"http://127.0.0.1:{port}"
    health = wait_healthy(base)
    yield base, health
    dep.shutdown()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="k", max_retries=0, timeout=120)


def test_two_rank_units_with_seven_and_eight_slots_give_transformers_greedy_tokens(server, client, k2_dir):
    assert server[1]["prefill_ranks"] == 2 and server[1]["decode_ranks"] == 2
    hf = hf_model(k2_dir)
    for prompt in prompts_of([9, 30], vocab=hf.config.vocab_size, seed=4):
        r = client.completions.create(model="kimi-k2", prompt=prompt, max_tokens=8, temperature=0.0,
                                      extra_body={"ignore_eos": True})
        assert r.choices[0].model_extra["token_ids"] == hf_greedy(hf, prompt, 8)[0]


def test_chat_prompts_are_k2s_template_in_its_tiktoken_tokens(client, k2_dir):
    tok = Tokenizer(k2_dir)
    r = client.chat.completions.create(model="kimi-k2", messages=ASK, max_tokens=4, temperature=0.0)
    text = tok.apply_chat_template(ASK)
    assert text.startswith(ct.K2_SYSTEM + "system" + ct.K2_MIDDLE) and text.endswith(ct.K2_MIDDLE)
    assert r.usage.prompt_tokens == len(tok.encode(text, add_special=False))


@pytest.mark.parametrize("stream", [False, True])
def test_a_k2_tool_call_comes_back_parsed_with_its_id(client, k2_dir, stream):
    kw = dict(model="kimi-k2", messages=ASK, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "add"}},
              parallel_tool_calls=False, max_tokens=60, temperature=1.0, seed=3)
    whole = client.chat.completions.create(**kw).choices[0]
    assert whole.finish_reason == "tool_calls"
    call = whole.message.tool_calls[0]
    assert call.function.name == "add" and re.fullmatch(r"functions\.add:\d+", call.id)
    jsonschema.validate(json.loads(call.function.arguments), ADD)
    if stream:
        got = {}
        for chunk in client.chat.completions.create(stream=True, **kw):
            for d in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
                got.setdefault("id", d.id)
                got.setdefault("name", d.function.name)
                got["arguments"] = got.get("arguments", "") + (d.function.arguments or "")
        assert got == {"id": call.id, "name": "add", "arguments": call.function.arguments}
        return
    # the call and its result go back in K2's format, named by the call's id
    tok = Tokenizer(k2_dir)
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump(exclude_none=True)]},
                     {"role": "tool", "tool_call_id": call.id, "content": "5"}]
    text = tok.apply_chat_template(history)
    assert (ct.K2_CALL_BEGIN + call.id + ct.K2_ARGS_BEGIN + call.function.arguments + ct.K2_CALL_END in text
            and "## Return of " + call.id + "\n5" in text)
    follow = client.chat.completions.create(model="kimi-k2", messages=history, max_tokens=2, temperature=0.0)
    assert follow.usage.prompt_tokens == len(tok.encode(text, add_special=False))
