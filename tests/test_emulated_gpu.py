"""The emulated EP rank on a GPU (skipped without CUDA): its held exchanges inside CUDA-graph decode
steps give the eager one-batch tokens, its decode forward (peer rows and holds included) never
syncs the host, and the overlapped split steps (exchanges held on the side stream) give the eager
one-batch tokens of the same engine."""
from __future__ import annotations

import pytest
import torch

from conftest import decode_forward_without_sync, prompts_of
from epserve.model.sampling import SamplingParams
from epserve.pipelines.local import make_local_engine
from epserve.pipelines.overlap_tuner import step_phase
from epserve.pipelines.sequence import Sequence

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
EMU = {"ranks": 144, "experts": 256, "skew": "lognormal", "seed": 1}     # 144 x 16 slots >= 256 experts


def _engine(path, backend, graphs):
    return make_local_engine(path, kernels=backend, device="cuda", dtype="bfloat16", cuda_graphs=graphs,
                             fp8_activations=True, ep_dispatch="emulated", ep_emulate=EMU)


def _generate(eng, prompts, overlap=False, n=10):
    seqs = [Sequence(f"g{i}", p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
            for i, p in enumerate(prompts)]
    for s in seqs:
        eng.add(s)
    while eng.has_work:
        eng.step(schedule=step_phase(eng.can_prefill(), len(eng.batcher.running)) if overlap else None)
    return [s.output_ids for s in seqs]


@gpu
def test_graphed_decode_with_held_exchanges_gives_the_eager_tokens(tiny_dir):
    prompts = prompts_of([33, 7, 70, 1, 129], vocab=500, seed=9)
    eager = _generate(_engine(tiny_dir, "triton", False), prompts)
    eng = _engine(tiny_dir, "triton", True)
    assert eng.graphs is not None
    assert _generate(eng, prompts) == eager
    assert eng.graphs.n_replays >= 9
    assert eng.dispatcher.hold.cycles_per_us > 0


@gpu
def test_overlapped_steps_with_held_exchanges_give_the_one_batch_tokens(tiny_dir):
    prompts = prompts_of([33, 7, 70, 1, 129], vocab=500, seed=9)
    one = _generate(_engine(tiny_dir, "triton", False), prompts)
    assert _generate(_engine(tiny_dir, "triton", False), prompts, overlap=True) == one


@gpu
def test_emulated_decode_forward_never_syncs_the_host(tiny_dir):
    logits, n = decode_forward_without_sync(_engine(tiny_dir, "triton", False))   # a host sync raises
    assert logits.shape[0] == n and bool(torch.isfinite(logits).all())
