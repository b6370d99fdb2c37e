"""One answer whatever the shape: every precision and schedule knob gives the single-rank engine's
greedy tokens on any unit shape, or is refused with an error naming the problem.

epserve.LLM on the shared simulated cluster against pipelines/local.py's single-rank engine on the
same FP8 checkpoint, in float32 (the exact-test dtype: bfloat16 rounding differs with batch
composition, which is not what these tests are about).
"""
from __future__ import annotations

import itertools

import pytest

from conftest import prompts_of
from epserve.messages import KVStoreSpec
from epserve.model.sampling import SamplingParams
from epserve.pipelines.local import make_local_engine
from epserve.pipelines.sequence import Sequence

GREEDY = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
# six prompts: two per rank on 1x2 (so decode splits), one long enough to be cut head-first in prefill
PROMPTS = prompts_of([9, 70, 4, 33, 17, 5], seed=11)


def single_rank(model_dir: str, prompts, fp8_activations: bool, tenant: str | None = None,
                kv_store: KVStoreSpec | None = None) -> list[list[int]]:
    engine = make_local_engine(model_dir, dtype="float32", fp8_activations=fp8_activations, kv_store=kv_store)
    seqs = [Sequence(f"ref{i}", p, GREEDY, tenant=tenant) for i, p in enumerate(prompts)]
    for s in seqs:
        engine.add(s)
    while engine.has_work:
        engine.step()
    return [s.output_ids for s in seqs]


def llm_config(fp8_activations: bool, nodes: int = 1, overlap: str = "off", redundant: int = 0,
               kv_store: dict | None = None) -> dict:
    return {"dtype": "float32", "kernels": "reference", "fp8_activations": fp8_activations, "overlap": overlap,
            "eplb": {"enabled": False}, "kv_store": kv_store or {"enabled": False},
            "decode": {"nodes_per_unit": nodes, "gpus_per_node": 2, "redundant_experts": redundant, "kv_pages": 16}}


@pytest.fixture(scope="module")
def want(tiny_fp8_dir):
    return {act: single_rank(tiny_fp8_dir, PROMPTS, act) for act in (False, True)}


def test_fp8_dispatch_with_an_idle_rank_gives_the_single_rank_answer(ray_cluster, tiny_fp8_dir, want):
    """One prompt on a 2-rank unit: the idle rank sends no rows. Its empty FP8 scales [0, 1] had a
    zero last stride and the byte view failed, so the unit restarted three times and gave up."""
    import epserve
    with epserve.LLM(model=tiny_fp8_dir, config=llm_config(True)) as llm:
        assert llm.generate([PROMPTS[0]], GREEDY)[0].token_ids == want[True][0]


def test_kv_store_never_serves_latents_of_another_activation_precision(ray_cluster, tiny_fp8_dir, tmp_path, want):
    """The store's keys named the checkpoint only, so prefixes cached with fp8_activations: true were
    loaded by an fp8_activations: false unit and its long prompts diverged from the single-rank engine."""
    import epserve
    root = str(tmp_path / "kv")
    single_rank(tiny_fp8_dir, PROMPTS, True, tenant="offline", kv_store=KVStoreSpec(root, 1 << 30))
    with epserve.LLM(model=tiny_fp8_dir, config=llm_config(False, kv_store={"path": root})) as llm:
        outs = llm.generate(PROMPTS, GREEDY)
        assert [o.token_ids for o in outs] == want[False]
        assert all(o.usage.prompt_cache_hit_tokens == 0 for o in outs)   # other precision: all misses
        again = llm.generate(PROMPTS, GREEDY)                             # its own blocks: hits, same answer
    assert [o.token_ids for o in again] == want[False]
    assert again[1].usage.prompt_cache_hit_tokens == 64


KNOBS = list(itertools.product((False, True), ("off", "on"), (0, 2), (1, 2)))


@pytest.mark.parametrize("fp8_activations,overlap,redundant,nodes", KNOBS,
                         ids=[f"act{int(a)}-overlap_{o}-red{r}-{n}x2" for a, o, r, n in KNOBS])
def test_every_knob_on_every_shape_gives_the_single_rank_answer_or_is_refused(
        ray_cluster, tiny_fp8_dir, want, fp8_activations, overlap, redundant, nodes):
    import epserve
    cfg = llm_config(fp8_activations, nodes, overlap, redundant)
    n_slots, n_ranks = 16 + redundant, 2 * nodes          # the tiny model has 16 routed experts
    if n_slots % n_ranks:
        with pytest.raises(ValueError, match=f"{n_slots} slots do not divide over {n_ranks} ranks"):
            epserve.LLM(model=tiny_fp8_dir, config=cfg)
        return
    with epserve.LLM(model=tiny_fp8_dir, config=cfg) as llm:
        got = [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]
        status = __import__("ray").get(llm.units[0].status.remote())
    assert got == want[fp8_activations]
    split = status["schedule_steps"]["prefill"] + status["schedule_steps"]["decode"]
    assert (split > 0) == (overlap == "on"), status["schedule_steps"]       # the knob really took effect
    assert status["restarts"] == 0
