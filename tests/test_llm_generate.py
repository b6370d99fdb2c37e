"""epserve.LLM.generate as vLLM's: SamplingParams(n) gives n outputs per prompt, and a stop string
ends decoding on the rank (not a cut made after decoding to max_tokens).

One colocated 1-rank unit on the shared simulated cluster, random tiny weights.
"""
from __future__ import annotations

import pytest
import ray

import epserve
from conftest import wait_unit_empty
from epserve.model.sampling import SamplingParams

PROMPT = "The sea is wide"


@pytest.fixture(scope="module")
def llm(ray_cluster, tiny_dir):
    cfg = {"dtype": "float32", "kernels": "reference", "decode": {"gpus_per_node": 1, "kv_pages": 32}}
    with epserve.LLM(model=tiny_dir, config=cfg) as llm:
        yield llm


def test_n_2_gives_two_outputs_per_prompt_greedy_equal_seeded_distinct(llm):
    greedy = llm.generate([PROMPT, [5, 6, 7]], SamplingParams(n=2, max_tokens=8, temperature=0.0, ignore_eos=True))
    assert [len(choices) for choices in greedy] == [2, 2]
    for a, b in greedy:
        assert len(a.token_ids) == 8 and a.token_ids == b.token_ids and a.text == b.text
        assert a.request_id != b.request_id
    seeded = SamplingParams(n=2, max_tokens=12, temperature=1.0, seed=11, ignore_eos=True)
    a, b = llm.generate(PROMPT, seeded)
    assert a.token_ids != b.token_ids and len(a.token_ids) == len(b.token_ids) == 12
    one = llm.generate(PROMPT, SamplingParams(max_tokens=12, temperature=1.0, seed=11, ignore_eos=True))
    assert one.token_ids == a.token_ids                     # choice 0 is the n = 1 answer (seed + 0), as over HTTP
    again = llm.generate(PROMPT, seeded)
    assert [c.token_ids for c in again] == [a.token_ids, b.token_ids]


def test_a_stop_string_ends_decoding_on_the_rank(llm):
    max_tokens = 48
    full = llm.generate(PROMPT, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    ids, text = full.token_ids, full.text
    # a stop string the greedy answer reaches after a few tokens
    start = len(llm.tokenizer.decode(ids[:3]))
    stop = text[start:start + 3]
    assert len(stop) == 3, f"the greedy answer is too short to pick a stop string from: {text!r}"
    cut = text.find(stop)
    completes = next(k for k in range(1, len(ids) + 1) if stop in llm.tokenizer.decode(ids[:k]))

    unit = llm.units[0]
    rank = ray.get(unit.rank_handles.remote())[0]
    steps_before = ray.get(rank.loop_counters.remote())["steps"]
    out = llm.generate(PROMPT, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, stop=[stop]))
    assert out.finish_reason == "stop" and out.text == text[:cut] and stop not in out.text
    assert out.token_ids == ids[:completes]                 # up to the token that completed the stop string
    assert out.usage.completion_tokens == completes < max_tokens
    stats = wait_unit_empty(unit)
    assert sum(s.n_running + s.kv_blocks_used for s in stats) == 0     # aborted on the rank, its pages freed
    # one step per token: decoding to max_tokens would have taken max_tokens steps
    assert ray.get(rank.loop_counters.remote())["steps"] - steps_before < max_tokens


def test_stop_strings_and_n_together(llm):
    full = llm.generate(PROMPT, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
    stop = full.text[len(llm.tokenizer.decode(full.token_ids[:2])):][:2]
    assert len(stop) == 2
    outs = llm.generate(PROMPT, SamplingParams(n=2, max_tokens=16, temperature=0.0, ignore_eos=True, stop=[stop]))
    assert [o.text for o in outs] == [full.text[:full.text.find(stop)]] * 2
    assert all(o.finish_reason == "stop" for o in outs)
