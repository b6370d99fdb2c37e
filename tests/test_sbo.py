"""SGLang's single-batch overlap as pipelines/overlap.py's third schedule (`sbo`), on CPU in float32:
its stage order, and the emulated EP rank's tokens under it equal the LocalDispatcher's, on the
eager path and on the fixed-shape path where the experts run in chunks with a combine hold each."""

import pytest
import torch

from conftest import prompts_of
from epserve.model.ep_emulate import SBO_CHUNKS
from epserve.model.sampling import SamplingParams
from epserve.pipelines.batcher import Step
from epserve.pipelines.local import make_local_engine
from epserve.pipelines.overlap import prepare_overlapped, run_overlapped, schedule_ops
from epserve.pipelines.sequence import Sequence

EMU = {"ranks": 16, "experts": 8, "groups": 1}
GREEDY = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)


def test_sbo_keeps_one_batch_and_puts_the_dispatch_under_the_shared_expert():
    ops = [str(o) for o in schedule_ops("sbo", n_layers=3, n_dense=1)]
    assert ops == ["ATTN-0[0]@0", "ATTN-1[0]@0", "FFN[0]@0",
                   *[f"{s}[0]@{i}" for i in (1, 2) for s in ("ATTN-0", "ATTN-1", "DISPATCH", "SHARED", "MLP-SBO",
                                                           "COMBINE")],
                   "HEAD[0]"]
    with pytest.raises(ValueError, match="expected one of"):
        schedule_ops("tbo", 3, 1)


def _generate(engine, schedule):
    seqs = [Sequence(f"s{i}", p, GREEDY) for i, p in enumerate(prompts_of([37, 5, 18, 9], seed=11))]
    for s in seqs:
        engine.add(s)
    while engine.has_work:
        engine.step(schedule=schedule)
    return [s.output_ids for s in seqs]


def test_sbo_steps_on_the_emulated_rank_give_the_local_dispatchers_tokens(tiny_dir):
    local = _generate(make_local_engine(tiny_dir, dtype="float32", kv_pages=64), None)
    emu = make_local_engine(tiny_dir, dtype="float32", kv_pages=64, ep_dispatch="emulated", ep_emulate=EMU)
    assert _generate(emu, "sbo") == local


def test_the_chunked_sbo_step_gives_the_plain_forward(tiny_dir):
    """The fixed-shape path (what bench step captures in a CUDA graph): the slots run in chunks,
    each chunk's combine held on its own, and the logits are the one-batch forward's."""
    eng = make_local_engine(tiny_dir, dtype="float32", ep_dispatch="emulated", ep_emulate=EMU)
    d = eng.dispatcher
    assert d.map.slots_per_rank >= SBO_CHUNKS                  # 8 slots: 4 chunks of 2
    seqs = [Sequence(f"s{i}", p, GREEDY) for i, p in enumerate(prompts_of([9, 14, 5, 11], seed=3))]
    for s in seqs:
        s.pages = eng.cache.allocate(eng.cache.pages_for(len(s.prompt_ids) + 1))
        s.n_computed = len(s.prompt_ids) - 1
    batch = eng.prepare(Step(seqs, [1] * len(seqs), False))
    with torch.inference_mode():
        want = eng.model.forward(batch, eng.cache.kv.clone())
        d.take_held_us()
        eng.model.forward(batch, eng.cache.kv.clone())
        plain_held = d.take_held_us()
        mbs, rows = prepare_overlapped(eng.model, batch, static=True, schedule="sbo")
        assert len(mbs) == 1 and mbs[0].valid is not None
        calls = []
        real = d._start_hold
        d._start_hold = lambda *a, **k: calls.append(a[0]) or real(*a, **k)
        got = run_overlapped(eng.model, mbs, rows, eng.cache.kv.clone(), len(seqs), "sbo")
        sbo_held = d.take_held_us()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got.argmax(-1).tolist() == want.argmax(-1).tolist()
    n_moe = eng.args.n_moe_layers
    assert calls.count("combine") == SBO_CHUNKS * n_moe and calls.count("dispatch") == n_moe
    assert sbo_held == pytest.approx(plain_held)               # the chunks carry the whole combine between them
