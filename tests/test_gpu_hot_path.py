"""The hot path on a GPU (skipped without CUDA; run on a lent H200 and recorded under
benchmarks/results/): the native backend's self-test, CUDA-graph decode equal to eager, a decode
forward with no host sync, and a whole rank on `native` giving the `reference` backend's tokens."""
from __future__ import annotations

import pytest
import torch

from conftest import prompts_of
from epserve.model.sampling import SamplingParams
from epserve.pipelines.local import make_local_engine
from epserve.pipelines.sequence import Sequence

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _native_ok() -> bool:
    from epserve.kernels import native
    return native.deep_gemm is not None and native.flash_mla is not None


needs_native = pytest.mark.skipif(not torch.cuda.is_available() or not _native_ok(),
                                  reason="needs a Hopper GPU with deep_gemm and flash_mla installed")


@pytest.fixture(scope="module")
def v3_mini_dir(tmp_path_factory):
    from epserve.model.tiny import make_tiny_model
    return str(make_tiny_model(tmp_path_factory.mktemp("ckpt") / "v3mini", preset="v3-mini", fp8=True, seed=4))


def _generate(eng, prompts, n=12, logprobs=None):
    seqs = [Sequence(f"r{i}", p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=logprobs))
            for i, p in enumerate(prompts)]
    for s in seqs:
        eng.add(s)
    while eng.has_work:
        eng.step()
    return seqs


@needs_native
def test_native_self_test_passes():
    from epserve import kernels
    from epserve.kernels import native
    ok, why = native.self_test("cuda")
    assert ok, why
    assert kernels.get_backend("native", "cuda") is native


@gpu
@pytest.mark.parametrize("backend, model", [("triton", "tiny"), ("native", "v3mini")])
def test_cuda_graph_decode_gives_the_eager_tokens(backend, model, tiny_dir, v3_mini_dir):
    if backend == "native" and not _native_ok():
        pytest.skip("native libraries not installed")
    path = tiny_dir if model == "tiny" else v3_mini_dir
    prompts = prompts_of([33, 7, 70, 1, 129], vocab=500, seed=9)
    out = {}
    for graphs in (False, True):
        eng = make_local_engine(path, kernels=backend, device="cuda", dtype="bfloat16", cuda_graphs=graphs,
                                redundant_experts=2, fp8_activations=True)
        out[graphs] = [s.output_ids for s in _generate(eng, prompts)]
        assert (eng.graphs is not None) == graphs
        if graphs:
            assert eng.graphs.n_replays >= 11 and len(eng.graphs.graphs) >= 1
    assert out[True] == out[False]


@gpu
@pytest.mark.parametrize("backend", ["triton", "native"])
def test_decode_forward_never_syncs_the_host(backend, tiny_dir, v3_mini_dir):
    if backend == "native" and not _native_ok():
        pytest.skip("native libraries not installed")
    eng = make_local_engine(v3_mini_dir if backend == "native" else tiny_dir, kernels=backend, device="cuda",
                            dtype="bfloat16", cuda_graphs=False, fp8_activations=True)
    seqs = [Sequence(f"s{i}", p, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
            for i, p in enumerate(prompts_of([20, 65], vocab=500, seed=1))]
    for s in seqs:
        eng.add(s)
    eng.step()
    eng.step()                                                # JIT and table caches warm
    step = eng.batcher.schedule()
    rows = eng.table.rows_for(step.seqs)
    t = torch.tensor([[s.last_token for s in step.seqs], [s.n_computed for s in step.seqs], rows], device="cuda")
    from epserve.model.deepseek_v3 import DecodeBatch
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        batch = DecodeBatch.from_rows(t[0], t[1], t[2], eng.table.tables, eng.cache.page_size, eng.table.scratch_row,
                                      eng.kb.plan_mla_decode())
        eng.model.forward(batch, eng.cache.kv)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.fixture(scope="module")
def v3_mini_all_experts_dir(tmp_path_factory):
    """v3-mini with every routed expert active: top-k routing has near-ties that bf16 rounding of
    two correct backends flips either way (and an MoE's tokens follow the flip); with all experts
    chosen the routing is exact and only the kernels' arithmetic is compared."""
    from epserve.model.tiny import make_tiny_model
    return str(make_tiny_model(tmp_path_factory.mktemp("ckpt") / "v3mini_all", preset="v3-mini", fp8=True, seed=5,
                               config_overrides={"n_routed_experts": 8, "num_experts_per_tok": 8, "n_group": 1,
                                                 "topk_group": 1}))


def _greedy_logits(eng, prompts, n=12):
    """Greedy outputs and, per request, the fp32 logits [V] each step sampled from."""
    per: dict[str, list[torch.Tensor]] = {}
    postprocess = eng.postprocess

    def record(step, logits, *a, **kw):
        for i, s in enumerate(step.seqs):
            per.setdefault(s.request_id, []).append(logits[i].float().cpu())
        return postprocess(step, logits, *a, **kw)

    eng.postprocess = record
    seqs = _generate(eng, prompts, n)
    return seqs, [per[s.request_id] for s in seqs]


def _along_reference(ref, ref_logits, other, other_logits):
    """Compare a backend with the reference while both have the same context (same tokens so far).
    -> (max |logit difference| over those steps, steps compared, unexplained flips): a flip is
    explained when the reference's margin between its token and the other's is within the two
    backends' logit difference at that step (rounding can move it that far, no further)."""
    worst, compared, unexplained = 0.0, 0, []
    for r, rl, o, ol in zip(ref, ref_logits, other, other_logits):
        for j, (lr, lo) in enumerate(zip(rl, ol)):
            diff = (lo - lr).abs().max().item()
            worst = max(worst, diff)
            compared += 1
            a, b = r.output_ids[j], o.output_ids[j]
            if a != b:
                margin = (lr[a] - lr[b]).item()
                if margin > 2 * diff:
                    unexplained.append((r.request_id, j, a, b, round(margin, 4), round(diff, 4)))
                break
    return worst, compared, unexplained


@needs_native
def test_native_rank_gives_the_reference_tokens(v3_mini_all_experts_dir, monkeypatch):
    """A whole rank on native (DeepGEMM, FlashMLA, CUDA graphs) computes what the reference backend
    does, on the same GPU and dtype: along the reference's greedy path its logits stay as close as
    the triton backend's do, and its greedy tokens equal the reference's except where the
    reference's top choice wins by less than the two backends' logit difference at that step.
    (bf16 with FP8 activations moves this random model's logits by ~0.5, so a fixed tie threshold
    would call noise a bug or hide one.)"""
    prompts = prompts_of([40, 9, 100, 64], vocab=500, seed=12)
    kw = dict(device="cuda", dtype="bfloat16", fp8_activations=True)
    path = v3_mini_all_experts_dir
    ref, rl = _greedy_logits(make_local_engine(path, kernels="reference", **kw), prompts)
    tri, tl = _greedy_logits(make_local_engine(path, kernels="triton", **kw), prompts)
    from epserve.kernels import native
    calls: dict[str, int] = {}
    for lib, name in ((native.deep_gemm, "fp8_gemm_nt"), (native.deep_gemm, "m_grouped_fp8_gemm_nt_contiguous"),
                      (native.deep_gemm, "m_grouped_fp8_gemm_nt_masked"), (native.flash_mla, "flash_mla_with_kvcache")):
        def counted(*a, _f=getattr(lib, name), _n=name, **k):
            calls[_n] = calls.get(_n, 0) + 1
            return _f(*a, **k)
        monkeypatch.setattr(lib, name, counted)
    nat_eng = make_local_engine(path, kernels="native", **kw)
    assert nat_eng.graphs is not None and nat_eng.kb.__name__.endswith("native")
    nat, nl = _greedy_logits(nat_eng, prompts)
    # the libraries themselves ran (not the triton fallbacks): dense GEMMs, prefill experts, decode attention
    assert {"fp8_gemm_nt", "m_grouped_fp8_gemm_nt_contiguous", "flash_mla_with_kvcache"} <= set(calls), calls
    tri_diff, _, _ = _along_reference(ref, rl, tri, tl)
    nat_diff, compared, unexplained = _along_reference(ref, rl, nat, nl)
    print(f"max |logit - reference| along the reference's path: native {nat_diff:.4f}, triton {tri_diff:.4f}; "
          f"{compared} steps compared")
    assert not unexplained, unexplained
    assert nat_diff <= 1.5 * tri_diff + 0.05
    assert compared >= len(prompts) * 4


@pytest.fixture(scope="module")
def tiny_mtp_gpu_dir(tmp_path_factory):
    from epserve.model.tiny import make_tiny_model
    return str(make_tiny_model(tmp_path_factory.mktemp("ckpt") / "tiny_mtp", seed=4,
                               config_overrides={"num_nextn_predict_layers": 1}))


@gpu
def test_mtp_verify_graphs_give_the_eager_tokens_and_the_plain_decode(tiny_mtp_gpu_dir):
    """MTP on a GPU: verify steps replayed as CUDA graphs give the eager verify steps' tokens, and in
    float32 (reference kernels) MTP's greedy tokens equal plain decoding's."""
    prompts = prompts_of([33, 7, 70, 1, 129], vocab=500, seed=9)
    out = {}
    for graphs in (False, True):
        eng = make_local_engine(tiny_mtp_gpu_dir, kernels="triton", device="cuda", dtype="bfloat16",
                                cuda_graphs=graphs, mtp_draft=1)
        out[graphs] = [s.output_ids for s in _generate(eng, prompts)]
        if graphs:
            assert eng.drafter.graphs is not None and eng.drafter.graphs.n_replays >= 1
    assert out[True] == out[False]
    exact = {}
    for mtp in (0, 1):
        eng = make_local_engine(tiny_mtp_gpu_dir, kernels="reference", device="cuda", dtype="float32", mtp_draft=mtp)
        exact[mtp] = [s.output_ids for s in _generate(eng, prompts)]
    assert exact[1] == exact[0]
