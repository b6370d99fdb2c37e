"""Issue 24's new paths on a GPU (skipped without CUDA): the single-batch-overlap step (chunked
experts, a combine hold per chunk) and the forced-acceptance MTP verify step each captured as one
CUDA graph give their eager run's answer, and the background KV-store writer's pinned, event-ordered
copy off the device writes blocks the next request hits with the same tokens."""
from __future__ import annotations

import pytest
import torch

from conftest import prompts_of
from epserve.bench.kernels import graphed
from epserve.bench.step_mtp_ep import verify_steps
from epserve.messages import KVStoreSpec
from epserve.model.sampling import SamplingParams
from epserve.pipelines.batcher import Step
from epserve.pipelines.local import make_local_engine
from epserve.pipelines.overlap import prepare_overlapped, run_overlapped
from epserve.pipelines.sequence import Sequence

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
EMU = {"ranks": 144, "experts": 256, "skew": "lognormal", "seed": 1}
GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


def _engine(path, **kw):
    return make_local_engine(path, kernels="triton", device="cuda", dtype="bfloat16", fp8_activations=True,
                             ep_dispatch="emulated", ep_emulate=EMU, **kw)


def _decode_seqs(eng, lens, extra=1):
    seqs = [Sequence(f"s{i}", p, GREEDY) for i, p in enumerate(prompts_of(lens, vocab=500, seed=3))]
    for s in seqs:
        s.pages = eng.cache.allocate(eng.cache.pages_for(len(s.prompt_ids) + 2))
        s.n_computed = len(s.prompt_ids) - extra
    return seqs


@gpu
def test_graphed_sbo_step_with_held_chunks_gives_its_eager_answer(tiny_dir):
    eng = _engine(tiny_dir)
    seqs = _decode_seqs(eng, [9, 40, 5, 71])
    batch = eng.prepare(Step(seqs, [1] * len(seqs), False))
    with torch.inference_mode():
        want = eng.model.forward(batch, eng.cache.kv).argmax(-1)
        mbs, rows = prepare_overlapped(eng.model, batch, static=True, schedule="sbo")
        out = {}

        def step():
            out["t"] = run_overlapped(eng.model, mbs, rows, eng.cache.kv, len(seqs), "sbo").argmax(-1)
        step()
        eager = out["t"].clone()
        graphed(step)()
        torch.cuda.synchronize()
    assert out["t"].tolist() == eager.tolist() == want.tolist()


@gpu
def test_graphed_forced_acceptance_verify_gives_its_eager_drafts(tiny_mtp_dir):
    eng = _engine(tiny_mtp_dir, mtp_draft=1)
    seqs = _decode_seqs(eng, [12, 30, 7], extra=2)
    fns, info = verify_steps(eng, seqs, 1.0, seed=0, static=True)
    with torch.inference_mode():
        for name, fn in fns.items():
            eager = fn().clone()
            out = {}
            replay = graphed(lambda: out.__setitem__("d", fn()))
            replay()
            torch.cuda.synchronize()
            assert out["d"].tolist() == eager.tolist(), name
    assert info["acceptance_realised_by_the_mask"] == 1.0


@gpu
def test_background_write_from_the_gpu_cache_is_hit_with_the_same_tokens(tiny_dir, tmp_path):
    eng = _engine(tiny_dir, kv_store=KVStoreSpec(str(tmp_path / "kv"), 1 << 30), kv_pages=64)
    prompt = prompts_of([150], vocab=500, seed=6)[0]
    seq = Sequence("w", prompt, GREEDY, tenant="t")
    eng.add(seq)
    while eng.has_work:
        eng.step()
    pc = eng.prefix_cache
    assert pc.writer.flush(60) and pc.writer.stats["errors"] == 0
    keys = pc.store.block_keys(prompt, "t")
    blocks = pc.store.load_prefix(keys[:2])
    assert len(blocks) == 2
    warm = Sequence("w2", prompt, GREEDY, tenant="t")
    eng.add(warm)
    while eng.has_work:
        eng.step()
    assert warm.n_cached == 128 and warm.output_ids == seq.output_ids
    eng.close()
