"""The batched sampler's penalties, logit bias, min-p and grammar masks, against their definitions."""
from __future__ import annotations

import json

import pytest
import torch

from epserve.model.grammar import GrammarSpec
from epserve.model.logit_adjust import LogitAdjust, unpack_bitmask
from epserve.model.sampling import InvalidRequest, SamplingParams, sample
from epserve.pipelines.sampler_state import SamplerState
from epserve.pipelines.sequence import Sequence

V = 16


def state(tiny_dir):
    return SamplerState(tiny_dir, 512, (1,), "cpu")


def test_penalties_change_the_logits_exactly_by_their_definition(tiny_dir):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 512, generator=g)
    p = SamplingParams(temperature=0.0, presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=1.5)
    seqs = [Sequence("a", [7, 8], p, output_ids=[3, 3, 9]), Sequence("plain", [3], SamplingParams()),
            Sequence("b", [4], SamplingParams(temperature=0.0, frequency_penalty=-1.0), output_ids=[5])]
    adj = state(tiny_dir).prepare(seqs)
    got = adj.apply(logits)
    want = logits.clone()
    for tok, count in ((3, 2), (9, 1)):                  # produced: repetition, then frequency and presence
        x = want[0, tok]
        want[0, tok] = (x / 1.5 if x > 0 else x * 1.5) - 0.25 * count - 0.5
    for tok in (7, 8):                                    # prompt only: repetition alone
        x = want[0, tok]
        want[0, tok] = x / 1.5 if x > 0 else x * 1.5
    want[2, 5] += 1.0                                     # frequency -1 on one produced token
    assert torch.allclose(got, want)
    assert torch.equal(got[1], logits[1])                 # a row without penalties is untouched


def test_counts_follow_the_sampled_tokens_and_restart_from_token_ids(tiny_dir):
    st = state(tiny_dir)
    p = SamplingParams(temperature=0.0, frequency_penalty=1.0)
    seq = Sequence("a", [2], p, output_ids=[6])
    st.prepare([seq])
    seq.output_ids.append(6)
    st.advance([seq], [6])
    logits = torch.zeros(1, 512)
    assert st.prepare([seq]).apply(logits)[0, 6] == -2.0
    fresh = state(tiny_dir).prepare([Sequence("a", [2], p, output_ids=[6, 6])])   # a rebuilt rank
    assert fresh.apply(logits)[0, 6] == -2.0


def test_logit_bias_of_100_makes_every_draw_that_token(tiny_dir):
    logits = torch.randn(4, 512, generator=torch.Generator().manual_seed(1)) * 5
    params = [SamplingParams(temperature=1.0, seed=s, logit_bias={42: 100}) for s in range(4)]
    seqs = [Sequence(f"r{i}", [3], p) for i, p in enumerate(params)]
    tokens, _ = sample(logits, params, [0] * 4, state(tiny_dir).prepare(seqs))
    assert tokens == [42] * 4


def test_min_p_keeps_only_tokens_near_the_top():
    logits = torch.full((1, V), -10.0)
    logits[0, 3], logits[0, 5] = 5.0, 4.0                 # p(5) / p(3) = e^-1 = 0.37
    for seed in range(20):
        p = SamplingParams(temperature=1.0, min_p=0.5, seed=seed)
        assert sample(logits, [p], [0])[0] == [3]
    seen = {sample(logits, [SamplingParams(temperature=1.0, min_p=0.3, seed=s)], [0])[0][0] for s in range(40)}
    assert seen == {3, 5}


def test_a_grammar_mask_allows_only_its_tokens_and_replays_after_a_restart(tiny_dir):
    schema = json.dumps({"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
                         "additionalProperties": False})
    p = SamplingParams(temperature=1.0, seed=3, grammar=GrammarSpec("json_schema", schema), max_tokens=40)
    seq, st = Sequence("g", [5, 6], p, eos_ids=(1,)), state(tiny_dir)
    from epserve.model.tokenizer import Tokenizer
    tok = Tokenizer(tiny_dir)
    for _ in range(40):
        logits = torch.randn(1, 512, generator=torch.Generator().manual_seed(len(seq.output_ids)))
        t = sample(logits, [p], [len(seq.output_ids)], st.prepare([seq]))[0][0]
        seq.append(t, None)
        st.advance([seq], [t])
        if seq.is_finished:
            break
    assert seq.finish_reason == "stop" and json.loads(tok.decode(seq.output_ids)) in ({"ok": True}, {"ok": False})
    half = Sequence("g", [5, 6], p, output_ids=seq.output_ids[:3])
    replayed = state(tiny_dir).prepare([half])            # the mask after three tokens, on a new rank
    allowed = unpack_bitmask(replayed.mask_bits, 512)[0]
    assert allowed[seq.output_ids[3]] and allowed.sum() < 512


def test_a_step_without_adjustments_builds_nothing(tiny_dir):
    assert state(tiny_dir).prepare([Sequence("x", [3], SamplingParams())]) is None


@pytest.mark.parametrize("kw,param", [({"presence_penalty": 3}, "presence_penalty"),
                                      ({"frequency_penalty": -2.5}, "frequency_penalty"),
                                      ({"repetition_penalty": 0}, "repetition_penalty"),
                                      ({"min_p": 1.5}, "min_p"), ({"logit_bias": {5: 101}}, "logit_bias"),
                                      ({"stop_token_ids": [-1]}, "stop_token_ids"),
                                      ({"grammar": GrammarSpec("json_object"), "ignore_eos": True}, "ignore_eos")])
def test_bad_sampling_values_name_the_param(kw, param):
    with pytest.raises(InvalidRequest) as e:
        SamplingParams(**kw)
    assert e.value.param == param


def test_unpack_bitmask_reads_llguidance_bits():
    bits = torch.tensor([[0b101, -2 ** 31]], dtype=torch.int32)
    allowed = unpack_bitmask(bits, 64)
    assert allowed[0].nonzero().flatten().tolist() == [0, 2, 63]
    x = LogitAdjust(mask_rows=torch.tensor([0]), mask_bits=bits).apply(torch.zeros(2, 64))
    assert torch.isinf(x[0]).sum() == 61 and not torch.isinf(x[1]).any()


def test_a_grammar_is_compiled_once_per_schema(tiny_dir):
    from epserve.bench.serve_constrained import compile_times
    st = state(tiny_dir)
    spec = GrammarSpec("json_schema", json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}}))
    for i in range(3):
        st.prepare([Sequence(f"s{i}", [3], SamplingParams(grammar=spec))])
    assert st.grammars.n_compiled == 1
    st.prepare([Sequence("other", [3], SamplingParams(grammar=GrammarSpec("json_object")))])
    assert st.grammars.n_compiled == 2
    times = compile_times(tiny_dir, repeats=1)
    assert set(times) == {"json_object", "weather", "nested", "long_string"}
    assert all(t["compile_ms"] > 0 and t["cached_ms"] < t["compile_ms"] for t in times.values())


def test_a_grammar_after_a_token_leaves_what_comes_before_free(tiny_dir):
    """A reasoning model's grammar (grammar_after = </think>) masks nothing until that token is out,
    then constrains from the next token on, replaying only what follows it."""
    end = 7
    st = state(tiny_dir)
    seq = Sequence("r", [3], SamplingParams(max_tokens=50, grammar=GrammarSpec("json_object"), grammar_after=end))
    assert st.prepare([seq]) is None                              # reasoning: free text
    seq.output_ids.extend([11, 12])
    st.advance([seq], [12])
    assert st.prepare([seq]) is None
    seq.output_ids.append(end)
    st.advance([seq], [end])
    adj = st.prepare([seq])
    assert adj is not None and adj.mask_rows.tolist() == [0]      # the answer: constrained
    allowed = unpack_bitmask(adj.mask_bits, 512)[0]
    free = Sequence("f", [3], SamplingParams(max_tokens=50, grammar=GrammarSpec("json_object")))
    assert torch.equal(allowed, unpack_bitmask(st.prepare([free]).mask_bits, 512)[0])   # a grammar's start
    # a request rebuilt on another rank with those tokens gets the same state
    again = state(tiny_dir)
    moved = Sequence("r", [3], SamplingParams(max_tokens=50, grammar=GrammarSpec("json_object"), grammar_after=end))
    moved.output_ids.extend([11, 12, end])
    assert torch.equal(unpack_bitmask(again.prepare([moved]).mask_bits, 512)[0], allowed)
    with pytest.raises(InvalidRequest) as e:
        SamplingParams(grammar_after=end)
    assert e.value.param == "grammar_after"
