"""MTP decoding: the acceptance rule keeps the target distribution, greedy output is unchanged
token for token (one rank and EP units with redundant experts and overlap on; random and trained
models), rejected drafts leave no trace in the KV cache, and bad configurations are refused."""
from __future__ import annotations

import json
import time
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import prompts_of
from epserve.model.deepseek_v3 import ConfigError
from epserve.model.sampling import SamplingParams
from epserve.model.speculative import accept_drafts, draw, greedy_accept
from epserve.pipelines.local import make_local_engine
from epserve.pipelines.sequence import Sequence

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


def generate(engine, prompts, params=GREEDY, one_at_a_time=False):
    seqs = [Sequence(f"r{i}", p, params) for i, p in enumerate(prompts)]
    for s in seqs:
        engine.add(s)
        while one_at_a_time and engine.has_work:
            engine.step()
    while engine.has_work:
        engine.step()
    return [s.output_ids for s in seqs]


# ---- the rule (pure) ---------------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 2])
def test_speculative_sampling_keeps_the_target_distribution(k):
    """Drafts drawn from q, the rule applied: the first two emitted tokens are distributed as p says
    (200k trials on a 6-token vocabulary; 5-sigma bounds), whatever q is (here far from p)."""
    g = torch.Generator().manual_seed(k)
    n, v = 200_000, 6
    p = torch.softmax(torch.randn(k + 1, v, generator=g) * 1.5, -1)
    q = torch.softmax(torch.randn(k, v, generator=g) * 1.5, -1)
    drafts = torch.stack([torch.multinomial(q[j], n, replacement=True, generator=g) for j in range(k)], 1)
    # the target at position j + 1 is conditioned on the drafts before it; a context-free p keeps the
    # check exact: every emitted token must then be distributed as p
    tokens, n_acc = accept_drafts(p.expand(n, -1, -1), q.expand(n, -1, -1), drafts, torch.full((n,), k),
                                  torch.rand(n, k, generator=g), torch.rand(n, k + 1, generator=g))
    sigma = (0.25 / n) ** 0.5
    first = torch.bincount(tokens[:, 0], minlength=v).double() / n
    assert (first - p[0]).abs().max() < 5 * sigma, (first, p[0])
    second = tokens[n_acc >= 1, 1]
    freq = torch.bincount(second, minlength=v).double() / len(second)
    assert (freq - p[1]).abs().max() < 5 * (0.25 / len(second)) ** 0.5
    # acceptance probability of the first draft: sum_x min(p, q)
    assert abs((n_acc >= 1).double().mean() - torch.minimum(p[0], q[0]).sum()) < 5 * sigma


def test_the_rule_with_one_hot_distributions_is_greedy_acceptance():
    g = torch.Generator().manual_seed(0)
    b, k, v = 64, 2, 10
    target = torch.randint(0, v, (b, k + 1), generator=g)
    drafts = torch.where(torch.rand(b, k, generator=g) < 0.6, target[:, :k], torch.randint(0, v, (b, k), generator=g))
    n_draft = torch.randint(0, k + 1, (b,), generator=g)
    onehot = lambda t: torch.zeros(*t.shape, v).scatter_(-1, t[..., None], 1.0)   # noqa: E731
    tokens, n_acc = accept_drafts(onehot(target), onehot(drafts), drafts, n_draft, torch.rand(b, k, generator=g),
                                  torch.rand(b, k + 1, generator=g))
    assert torch.equal(n_acc, greedy_accept(target, drafts, n_draft))
    for i in range(b):
        a = int(n_acc[i])
        assert tokens[i, :a + 1].tolist() == target[i, :a + 1].tolist()


def test_draw_follows_the_distribution_and_never_picks_zero_mass():
    g = torch.Generator().manual_seed(3)
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5]]).expand(40_000, -1)
    got = draw(probs, torch.rand(40_000, generator=g))
    assert set(got.tolist()) == {1, 3} and abs((got == 1).double().mean() - 0.5) < 0.02


# ---- one rank ----------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["tiny_mtp_dir", "trained_dir"])
@pytest.mark.parametrize("k", [1, 2])
def test_mtp_greedy_equals_plain_greedy_on_one_rank(which, k, request):
    model_dir = request.getfixturevalue(which)
    if which == "trained_dir":
        from epserve.bench.engine import heldout_prompts
        prompts = heldout_prompts(f"{model_dir}/tokenizer.json", 6, 24)
    else:
        prompts = prompts_of([5, 17, 64, 90, 3, 40], seed=2)
    want = generate(make_local_engine(model_dir, dtype="float32"), prompts)
    engine = make_local_engine(model_dir, dtype="float32", mtp_draft=k, redundant_experts=3)
    assert generate(engine, prompts) == want
    c = engine.drafter.counters
    assert c.proposed > 0
    if which == "trained_dir":        # it learnt something: both branches of the rule ran
        assert 0 < c.accepted < c.proposed, c


def test_non_drafting_requests_decode_beside_drafting_ones(tiny_mtp_dir):
    """Logprobs and penalties go through the full sampler, one token a step, in the same batch."""
    prompts = prompts_of([12, 30, 7], seed=5)
    params = [GREEDY, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=2),
              SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, frequency_penalty=1.5)]

    def run(engine):
        seqs = [Sequence(f"r{i}", p, sp) for i, (p, sp) in enumerate(zip(prompts, params))]
        for s in seqs:
            engine.add(s)
        while engine.has_work:
            engine.step()
        return seqs
    plain, mtp = run(make_local_engine(tiny_mtp_dir, dtype="float32")), \
        run(make_local_engine(tiny_mtp_dir, dtype="float32", mtp_draft=1))
    assert [s.output_ids for s in mtp] == [s.output_ids for s in plain]
    assert len(mtp[1].logprobs) == 24
    assert [lp["token_id"] for lp in mtp[1].logprobs] == mtp[1].output_ids


def test_rollback_restores_every_byte_a_rejected_draft_wrote(trained_dir):
    """A verify step whose draft is wrong: afterwards every cache slot but the one accepted position's
    holds the bytes it held before the step (the rejected slot was written, then put back), the
    sequence holds the pages a plain step leaves, and the accepted position matches a plain step."""
    prompt = prompts_of([61], vocab=512, seed=7)[0]        # 61 + 2 positions: the draft lands on a new page
    plain = make_local_engine(trained_dir, dtype="float32", page_size=16)
    mtp = make_local_engine(trained_dir, dtype="float32", page_size=16, mtp_draft=1)
    sp, sm = Sequence("p", prompt, GREEDY), Sequence("m", prompt, GREEDY)
    plain.add(sp)
    mtp.add(sm)
    plain.step()
    mtp.step()                                            # prefill: first token and its draft
    assert sp.output_ids == sm.output_ids
    n = sm.n_computed
    plain.step()                                          # the plain run's next token
    sm.draft = [(sp.output_ids[1] + 1) % 512]             # a draft the target rejects
    before = mtp.cache.kv.clone()
    free_before = list(mtp.cache.free_pages)
    mtp.step()
    assert sm.output_ids == sp.output_ids                  # the rejection emitted the target's token
    assert mtp.drafter.counters.accepted == 0 and mtp.drafter.counters.proposed == 1
    slot = mtp.cache.slots(sm.pages, n, n + 1)[0]
    after = mtp.cache.kv.flatten(1, 2)
    changed = (after != before.flatten(1, 2)).any(-1).any(0).nonzero()[:, 0].tolist()
    assert changed == [slot]                               # only the accepted position's slot changed
    got = after[: plain.args.n_layers, slot]
    want = plain.cache.kv.flatten(1, 2)[:, plain.cache.slots(sp.pages, n, n + 1)[0]]
    assert (got - want).abs().max() < 1e-5
    assert len(sm.pages) == len(sp.pages) and mtp.cache.free_pages == free_before


def test_a_whole_generation_leaves_no_trace_of_rejected_drafts(trained_dir):
    """Sequences one after another (so pages are handed out in the same order): every slot the run
    without MTP never wrote is still untouched (zero) with MTP, and the written ones agree."""
    from epserve.bench.engine import heldout_prompts
    prompts = heldout_prompts(f"{trained_dir}/tokenizer.json", 4, 30)
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    plain = make_local_engine(trained_dir, dtype="float32", page_size=16, kv_pages=32)
    mtp = make_local_engine(trained_dir, dtype="float32", page_size=16, kv_pages=32, mtp_draft=1)
    assert generate(plain, prompts, params, True) == generate(mtp, prompts, params, True)
    c = mtp.drafter.counters
    assert 0 < c.accepted < c.proposed
    a, b = plain.cache.kv.flatten(1, 2), mtp.cache.kv[: plain.args.n_layers].flatten(1, 2)
    written_a, written_b = (a != 0).any(-1), (b != 0).any(-1)
    assert torch.equal(written_a, written_b)
    assert torch.equal(b[~written_a], a[~written_a])
    assert (a - b).abs().max() < 1e-4


def test_sampled_requests_with_mtp_decode_and_finish(trained_dir):
    params = SamplingParams(max_tokens=30, temperature=0.8, top_p=0.9, ignore_eos=True)
    engine = make_local_engine(trained_dir, dtype="float32", mtp_draft=1)
    out = generate(engine, prompts_of([20, 33], vocab=512, seed=1), params)
    assert [len(o) for o in out] == [30, 30]
    assert engine.drafter.counters.proposed > 0


# ---- checkpoints and errors ----------------------------------------------------------------------

def test_mtp_on_a_checkpoint_without_the_module_is_a_clear_error(tiny_dir, trained_dir, tmp_path):
    with pytest.raises(ConfigError, match="num_nextn_predict_layers=0"):
        make_local_engine(tiny_dir, mtp_draft=1)
    # config says 1 but the tensors are gone (a converter dropped them)
    out = tmp_path / "dropped"
    shutil.copytree(trained_dir, out)
    sd = load_file(str(out / "model.safetensors"))
    n = json.loads((out / "config.json").read_text())["num_hidden_layers"]
    save_file({k: v for k, v in sd.items() if not k.startswith(f"model.layers.{n}.")}, str(out / "model.safetensors"))
    from epserve.model.checkpoint import CheckpointError
    with pytest.raises(CheckpointError, match="no MTP layer"):
        make_local_engine(str(out), mtp_draft=1)
    make_local_engine(str(out))                            # without MTP the checkpoint still serves


def test_a_transformers_style_checkpoint_shares_the_main_embedding_and_head(trained_dir, tmp_path):
    """rope_parameters instead of rope_scaling, and no copies of the embedding and head in the MTP
    layer: the module shares the main ones and drafts the same tokens."""
    out = tmp_path / "hf_style"
    shutil.copytree(trained_dir, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg.pop("rope_theta")}
    cfg.pop("rope_scaling")
    (out / "config.json").write_text(json.dumps(cfg))
    sd = load_file(str(out / "model.safetensors"))
    n = cfg["num_hidden_layers"]
    for name in (f"model.layers.{n}.embed_tokens.weight", f"model.layers.{n}.shared_head.head.weight"):
        del sd[name]
    save_file(sd, str(out / "model.safetensors"))
    prompts = prompts_of([20, 33], vocab=512, seed=4)
    a, b = make_local_engine(trained_dir, mtp_draft=1), make_local_engine(str(out), mtp_draft=1)
    assert b.model.mtp.embed is None and a.model.mtp.embed is not None
    assert generate(a, prompts) == generate(b, prompts)
    assert a.drafter.counters.accepted == b.drafter.counters.accepted


def test_config_refuses_bad_draft_counts_and_mtp_units_refuse_a_checkpoint_without_it(tiny_dir):
    from epserve.config import ConfigError as CfgError, load_config
    with pytest.raises(CfgError, match="mtp.num_draft_tokens"):
        load_config({"mtp": {"enabled": True, "num_draft_tokens": 0}})
    assert load_config({"mtp": {"enabled": True}}).mtp.n_draft == 1
    assert load_config({}).mtp.n_draft == 0


# ---- EP units on the simulated cluster ----------------------------------------------------------

@pytest.mark.parametrize("which", ["tiny_mtp_dir", "trained_dir"])
def test_mtp_greedy_equals_plain_greedy_on_ep_units_with_redundant_experts_and_overlap(ray_cluster, which,
                                                                                        request):
    """Colocated 2-rank units (routed experts of the MTP layer too cross ranks), 2 redundant experts,
    both overlap schedules forced on: the same tokens as the single-rank engine without MTP."""
    import epserve
    model_dir = request.getfixturevalue(which)
    prompts = prompts_of([9, 70, 4, 33, 17, 5], vocab=512, seed=11)
    want = generate(make_local_engine(model_dir, dtype="float32"), prompts)
    cfg = {"dtype": "float32", "kernels": "reference", "overlap": "on", "eplb": {"enabled": False},
           "kv_store": {"enabled": False}, "mtp": {"enabled": True},
           "decode": {"nodes_per_unit": 1, "gpus_per_node": 2, "redundant_experts": 2, "kv_pages": 16}}
    with epserve.LLM(model=model_dir, config=cfg) as llm:
        got = [o.token_ids for o in llm.generate(prompts, GREEDY)]
        alone = llm.generate([prompts[1]], GREEDY)[0].token_ids    # one rank idle: empty MTP exchanges
    assert got == want
    assert alone == want[1]


def test_a_graph_bucket_of_the_verify_step_gives_the_unpadded_answer(trained_dir):
    """What a CUDA graph replays on a GPU: VerifyGraphs stages a step into a padded bucket (scratch
    rows, no drafts) and verify_device runs it; here both run eagerly on CPU, against the unpadded step."""
    from epserve.pipelines.cuda_graphs import VerifyGraphs
    engine = make_local_engine(trained_dir, dtype="float32", mtp_draft=1)
    seqs = [Sequence(f"r{i}", p, GREEDY) for i, p in enumerate(prompts_of([20, 33, 9], vocab=512, seed=8))]
    for s in seqs:
        engine.add(s)
    for _ in range(3):
        engine.step()
    d = engine.drafter
    graphs = VerifyGraphs(d, engine.cache.kv, engine.spec.max_batch_size)
    assert graphs.bucket(3) == 4
    rows = engine.table.rows_for(seqs)
    ids = sum(([s.last_token] + s.draft for s in seqs), [])
    pos = sum((list(range(s.n_computed, s.n_computed + 2)) for s in seqs), [])
    before = engine.cache.kv.clone()
    inp, saved, slots = graphs.stage(ids, pos, [1] * 6, rows, [1] * 3)
    assert torch.equal(saved, before.flatten(1, 2)[:, slots])
    padded = d.verify_device(*inp)
    t = torch.tensor([ids, pos, [1] * 6])
    plain = d.verify_device(t[0], t[1], t[2], torch.tensor(rows), torch.ones(3, dtype=torch.long))
    for a, b in zip(padded[1:4], plain[1:4]):
        assert torch.equal(a[:3], b)
    assert (padded[0][:6] - plain[0]).abs().max() < 1e-5


# ---- the server: prefill and decode units (PD), the KV store, usage, /metrics ---------------------

def test_mtp_over_http_with_prefill_decode_handoff_kv_store_usage_and_metrics(ray_cluster, trained_dir,
                                                                              tmp_path_factory):
    """Prefill unit and decode unit (the prefill rank drafts from the prompt and hands the draft over
    with the KV, MTP layer included): greedy answers equal the single-rank engine without MTP, a
    repeated long prompt hits the KV store (blocks with the MTP layer) with the same answer, usage
    bills the emitted tokens, /metrics shows the acceptance rate."""
    import httpx
    import openai

    from conftest import free_port, wait_healthy
    from epserve.bench.engine import heldout_prompts
    from epserve.config import load_config
    from epserve.serve.app import start_deployment
    prompts = heldout_prompts(f"{trained_dir}/tokenizer.json", 3, 24)
    long_prompt = heldout_prompts(f"{trained_dir}/tokenizer.json", 1, 150)[0]
    n = 20
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    want = generate(make_local_engine(trained_dir, dtype="float32"), prompts + [long_prompt], params)
    port = free_port()
    cfg = load_config({"model": trained_dir, "dtype": "float32", "kernels": "reference", "mtp": {"enabled": True},
                       "kv_store": {"path": str(tmp_path_factory.mktemp("kv"))},
                       "ledger": {"path": str(tmp_path_factory.mktemp("ledger"))},
                       "prefill": {"gpus_per_node": 2, "kv_pages": 32},
                       "decode": {"gpus_per_node": 2, "redundant_experts": 2, "kv_pages": 64},
                       "serve": {"port": port, "model_name": "trained"}})
    dep = start_deployment(cfg)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base)
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=120)

        def ask(p):
            r = client.completions.create(model="trained", prompt=p, max_tokens=n, temperature=0.0,
                                          extra_body={"ignore_eos": True})
            return r, r.choices[0].model_extra["token_ids"]
        for p, w in zip(prompts, want):
            r, ids = ask(p)
            assert ids == w
            assert r.usage.completion_tokens == n
        first, ids1 = ask(long_prompt)
        second, ids2 = ask(long_prompt)
        assert ids1 == ids2 == want[-1]
        assert second.usage.model_dump()["prompt_cache_hit_tokens"] == (len(long_prompt) - 1) // 64 * 64 > 0
        deadline = time.time() + 30
        while time.time() < deadline:          # rank stats reach the router within a second or two
            text = httpx.get(base + "/metrics", timeout=30).text
            rates = [float(line.split()[-1]) for line in text.splitlines()
                     if line.startswith("epserve_mtp_acceptance_rate{") and 'role="decode"' in line]
            if rates:
                break
            time.sleep(0.5)
        assert rates and 0 < max(rates) < 1
        steps = [float(line.split()[-1]) for line in text.splitlines()
                 if line.startswith("epserve_mtp_tokens_per_step{") and 'role="decode"' in line]
        assert steps and 1 < max(steps) < 2
        # tokens per step = 1 + acceptance only if every verify step had a draft, the first one too:
        # the decode ranks got the prefill rank's drafts with the KV
        assert sorted(steps) == pytest.approx(sorted(1 + r for r in rates))
    finally:
        dep.shutdown()


def test_a_live_expert_map_switch_moves_the_mtp_layers_experts_and_changes_no_token(trained_dir):
    """EPLB's rank side with MTP on: the MTP layer is MoE layer n_moe_layers of the map; a new
    placement stages and switches its slots too, mid-generation, and the tokens stay the same."""
    from epserve.pipelines.expert_migration import stage, switch
    prompts = prompts_of([20, 33, 9], vocab=512, seed=12)
    want = generate(make_local_engine(trained_dir, dtype="float32"), prompts)
    engine = make_local_engine(trained_dir, dtype="float32", mtp_draft=1, redundant_experts=3)
    seqs = [Sequence(f"r{i}", p, GREEDY) for i, p in enumerate(prompts)]
    for s in seqs:
        engine.add(s)
    for _ in range(4):
        engine.step()
    old = engine.dispatcher.map.phy2log
    assert old.shape[0] == engine.args.n_moe_layers + 1
    g = torch.Generator().manual_seed(0)
    new = torch.stack([torch.randperm(old.shape[1], generator=g) % engine.args.n_routed_experts for _ in old])
    staged = stage(engine, new)
    assert engine.args.n_layers in staged.slots           # the MTP layer's slots move too
    switch(engine, staged, 1)
    while engine.has_work:
        engine.step()
    assert [s.output_ids for s in seqs] == want
    assert torch.equal(engine.dispatcher.map.phy2log, new)


def test_multi_query_mla_decode_is_causal_among_the_queries():
    """reference.mla_decode with q [B, S, H, L+R]: query i of a sequence sees its context and queries
    0..i, exactly what a one-query decode at that position sees (the verify step's attention)."""
    from epserve.kernels import reference as kr
    g = torch.Generator().manual_seed(0)
    b, s, h, d, page = 3, 3, 4, 48, 16
    cache = torch.randn(12, page, d, generator=g)
    tables = torch.randperm(12, generator=g)[:9].view(b, 3)
    lens = torch.tensor([20, 35, 4])
    q = torch.randn(b, s, h, d, generator=g)
    out, lse = kr.mla_decode(q, cache, tables, lens, 0.3, 32)
    assert out.shape == (b, s, h, 32) and lse.shape == (b, s, h)
    for i in range(s):
        one, one_lse = kr.mla_decode(q[:, i], cache, tables, lens - s + 1 + i, 0.3, 32)
        assert torch.allclose(out[:, i], one, atol=1e-6) and torch.allclose(lse[:, i], one_lse, atol=1e-6)
