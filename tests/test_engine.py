"""One rank's engine: continuous batching, the two MLA forms, sampling, and precise errors."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import prompts_of
from epserve.config import load_config
from epserve.errors import CheckpointError, ConfigError, ContextTooLong, InvalidRequest, RequestTooLarge
from epserve.model.checkpoint import check_model_dir
from epserve.model.sampling import SamplingParams
from epserve.pipelines.local import make_local_engine
from epserve.pipelines.sequence import Sequence


def greedy(n):
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def drain(engine, seqs):
    for s in seqs:
        engine.add(s)
    while engine.has_work:
        engine.step()
    return [s.output_ids for s in seqs]


@pytest.fixture(scope="module")
def engine(tiny_dir):
    return make_local_engine(tiny_dir, kv_pages=64)


def test_batched_decode_equals_one_at_a_time(engine):
    prompts = prompts_of([3, 40, 11, 70, 1], seed=11)
    alone = [drain(engine, [Sequence(f"a{i}", p, greedy(12))])[0] for i, p in enumerate(prompts)]
    together = drain(engine, [Sequence(f"t{i}", p, greedy(12)) for i, p in enumerate(prompts)])
    assert together == alone
    assert engine.cache.n_free == engine.cache.n_pages          # every page came back


def test_requests_joining_mid_batch_get_the_same_tokens(engine):
    prompts = prompts_of([25, 9, 50], seed=12)
    alone = [drain(engine, [Sequence(f"b{i}", p, greedy(10))])[0] for i, p in enumerate(prompts)]
    seqs = [Sequence(f"j{i}", p, greedy(10)) for i, p in enumerate(prompts)]
    engine.add(seqs[0])
    for _ in range(4):
        engine.step()
    engine.add(seqs[1])                     # joins while seqs[0] decodes
    engine.step()
    engine.add(seqs[2])
    while engine.has_work:
        engine.step()
    assert [s.output_ids for s in seqs] == alone


def test_absorbed_decode_equals_naive_decode(engine):
    from epserve.model.deepseek_v3 import Batch
    prompt = prompts_of([33], seed=13)[0]
    cache = engine.cache
    pages = cache.allocate(2)
    try:
        n = len(prompt)
        b = Batch(torch.tensor(prompt), torch.arange(n), [n], [0], torch.tensor([pages]),
                  torch.tensor(cache.slots(pages, 0, n)))
        tok = int(engine.model.forward(b, cache.kv).argmax())
        step = dict(input_ids=torch.tensor([tok]), positions=torch.tensor([n]), seq_new=[1], seq_ctx=[n],
                    block_tables=torch.tensor([pages]), slot_mapping=torch.tensor(cache.slots(pages, n, n + 1)))
        absorbed = engine.model.forward(Batch(**step), cache.kv)
        naive = engine.model.forward(Batch(**step, force_naive=True), cache.kv)
        assert (absorbed - naive).abs().max() < 1e-4
    finally:
        cache.free(pages)


def test_preemption_when_pages_run_out_keeps_outputs_exact(tiny_dir):
    small = make_local_engine(tiny_dir, kv_pages=4)                 # 256 tokens of KV for everyone
    prompts = prompts_of([60, 60, 60], seed=14)
    want = [drain(small, [Sequence(f"s{i}", p, greedy(40))])[0] for i, p in enumerate(prompts)]
    got = drain(small, [Sequence(f"p{i}", p, greedy(40)) for i, p in enumerate(prompts)])
    assert got == want


def test_seeded_sampling_is_reproducible_and_temperature_matters(engine):
    p = prompts_of([8], seed=15)[0]
    hot = SamplingParams(max_tokens=12, temperature=1.5, top_p=0.9, top_k=50, seed=7, ignore_eos=True)
    a = drain(engine, [Sequence("x1", p, hot)])[0]
    b = drain(engine, [Sequence("x2", p, hot)])[0]
    c = drain(engine, [Sequence("x3", p, SamplingParams(**{**hot.__dict__, "seed": 8}))])[0]
    assert a == b and a != c


def test_logprobs_are_reported_and_consistent_with_greedy(engine):
    p = prompts_of([10], seed=16)[0]
    s = Sequence("lp", p, SamplingParams(max_tokens=5, temperature=0.0, logprobs=3, ignore_eos=True))
    drain(engine, [s])
    assert len(s.logprobs) == 5
    for tok, info in zip(s.output_ids, s.logprobs):
        assert info["token_id"] == tok and info["logprob"] <= 0
        assert info["top"][0][0] == tok and len(info["top"]) == 3


def test_eos_and_stop_token_ids_end_a_request(engine):
    p = prompts_of([10], seed=16)[0]
    first = drain(engine, [Sequence("e0", p, greedy(6))])[0]
    s = Sequence("e1", p, SamplingParams(max_tokens=6, temperature=0.0, stop_token_ids=(first[2],)))
    drain(engine, [s])
    assert s.output_ids == first[:3] and s.finish_reason == "stop"


@pytest.mark.parametrize("kwargs,param", [({"max_tokens": 0}, "max_tokens"), ({"max_tokens": -3}, "max_tokens"),
                                          ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"),
                                          ({"top_k": 0}, "top_k"), ({"logprobs": 99}, "logprobs"),
                                          ({"stop": [""]}, "stop")])
def test_bad_sampling_params_name_the_parameter(kwargs, param):
    with pytest.raises(InvalidRequest, match=param) as e:
        SamplingParams(**kwargs)
    assert e.value.param == param


def test_bad_prompts_are_precise_errors_and_break_nothing(engine, tiny_dir):
    with pytest.raises(InvalidRequest, match=r"token id 99999 is outside the vocabulary \[0, 512\)"):
        engine.add(Sequence("v", [1, 99999], greedy(2)))
    with pytest.raises(InvalidRequest, match="at least one token"):
        engine.add(Sequence("v", [], greedy(2)))
    with pytest.raises(ContextTooLong, match=r"maximum context length is 2048 tokens; you requested 2050") as e:
        engine.add(Sequence("v", [5] * 2040, greedy(10)))
    assert (e.value.param, e.value.code) == ("max_tokens", "context_length_exceeded")
    small = make_local_engine(tiny_dir, kv_pages=4)                # 4 pages x 64 tokens
    with pytest.raises(RequestTooLarge, match="300 tokens need 5 KV pages; this rank has 4"):
        small.add(Sequence("v", [5] * 290, greedy(10)))
    assert drain(engine, [Sequence("ok", [5, 6, 7], greedy(2))])[0]    # still serving


def _copy(src, dst):
    shutil.copytree(src, dst)
    return Path(dst)


def test_checkpoint_errors_name_the_problem(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "trunc")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated|unreadable"):
        make_local_engine(str(d))
    d2 = _copy(tiny_dir, tmp_path / "badcfg")
    cfg = json.loads((d2 / "config.json").read_text())
    cfg["rope_scaling"] = {"type": "dynamic", "factor": 2.0}
    (d2 / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="rope type 'dynamic' is not supported"):
        check_model_dir(d2)
    cfg["rope_scaling"], cfg["n_group"] = None, 3
    (d2 / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="n_routed_experts=16 is not divisible by n_group=3"):
        make_local_engine(str(d2))
    with pytest.raises(CheckpointError, match="no config.json"):
        check_model_dir(tmp_path)


def test_missing_tensor_is_named(tiny_b_dir, tmp_path):
    d = _copy(tiny_b_dir, tmp_path / "missing")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    gone = "model.layers.1.self_attn.o_proj.weight"
    del index["weight_map"][gone]
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=gone.replace(".", r"\.")):
        make_local_engine(str(d))


@pytest.mark.parametrize("data,match", [({"dtype": "float64"}, "dtype: 'float64' is not one of"),
                                        ({"prefill": {"nodes": 4}}, r"prefill\.nodes: unknown key"),
                                        ({"decode": {"units": 0}}, r"decode\.units: must be >= 1"),
                                        ({"serve": {"port": "x"}}, r"serve\.port: expected an integer"),
                                        ({"kernels": "cuda"}, "kernels: 'cuda' is not one of")])
def test_bad_config_values_name_the_key(data, match):
    with pytest.raises(ConfigError, match=match):
        load_config(data)


def test_shipped_configs_load():
    root = Path(__file__).resolve().parents[1] / "configs"
    for name in ("default", "deepseek_v3_prod", "test"):
        cfg = load_config(root / f"{name}.yaml")
        assert cfg.serve.host in ("127.0.0.1", "0.0.0.0")
    # configs/default.yaml documents what `epserve serve` runs with no --config: the code's defaults
    assert load_config(root / "default.yaml") == load_config(None)
    prod = load_config(root / "deepseek_v3_prod.yaml")
    assert (prod.prefill.nodes_per_unit, prod.prefill.gpus_per_node, prod.prefill.redundant_experts) == (4, 8, 32)
    assert (prod.decode.nodes_per_unit, prod.decode.gpus_per_node, prod.decode.redundant_experts) == (18, 8, 32)


def test_tokenizer_and_chat_template(tiny_dir):
    from epserve.model.tokenizer import IncrementalText, load_tokenizer
    tok = load_tokenizer(tiny_dir)
    ids = tok.encode("Hello, world!")
    assert ids[0] == 0 and tok.decode(ids) == "Hello, world!"
    text = tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "Hi"}])
    assert text == "<｜begin▁of▁sentence｜>Be brief.<｜User｜>Hi<｜Assistant｜>"
    inc = IncrementalText(tok)
    assert "".join(inc.push(t) for t in tok.encode("The sea is wide", add_special=False)) == "The sea is wide"


def test_checkpoint_without_tokenizer_serves_token_ids(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "notok")
    (d / "tokenizer.json").unlink()
    engine = make_local_engine(str(d))
    assert drain(engine, [Sequence("n", [5, 6, 7], greedy(3))])[0]


def test_can_prefill_predicts_the_next_schedule():
    """What a rank reports so its unit can pick the next step's overlap schedule."""
    from epserve.model.kv_cache import PagedKVCache
    from epserve.model.sampling import SamplingParams
    from epserve.pipelines.batcher import Batcher
    from epserve.pipelines.sequence import Sequence
    b = Batcher(PagedKVCache(1, 8, 64, 8), max_batch_tokens=1000, max_batch_size=8, max_model_len=1000)
    params = SamplingParams(max_tokens=4)
    assert not b.can_prefill()
    b.add(Sequence("a", [5] * 100, params))
    assert b.can_prefill() and b.schedule().is_prefill
    b.add(Sequence("b", [5] * 400, params))               # needs 7 pages, 6 are free: it waits
    assert not b.can_prefill() and not b.schedule().is_prefill
