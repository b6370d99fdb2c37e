"""The hot path on a GPU (skipped without CUDA; run on a lent H200 and recorded under
benchmarks/results/): the native backend's self-test, CUDA-graph decode equal to eager, a decode
forward with no host sync, and a whole rank on `native` giving the `reference` backend's tokens."""
from __future__ import annotations

import pytest
import torch

from backend_agreement import agreement_along_reference, generate, greedy_logits
from conftest import decode_forward_without_sync, prompts_of
from epserve.pipelines.local import make_local_engine

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
        out[graphs] = [s.output_ids for s in generate(eng, prompts)]
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
    logits, n = decode_forward_without_sync(eng)            # a host sync in the forward raises
    assert logits.shape[0] == n and bool(torch.isfinite(logits).all())


@pytest.fixture(scope="module")
def v3_mini_all_experts_dir(tmp_path_factory):
    """v3-mini with every routed expert active: top-k routing has near-ties that bf16 rounding of
    two correct backends flips either way (and an MoE's tokens follow the flip); with all experts
    chosen the routing is exact and only the kernels' arithmetic is compared."""
    from epserve.model.tiny import make_tiny_model
    return str(make_tiny_model(tmp_path_factory.mktemp("ckpt") / "v3mini_all", preset="v3-mini", fp8=True, seed=5,
                               config_overrides={"n_routed_experts": 8, "num_experts_per_tok": 8, "n_group": 1,
                                                 "topk_group": 1}))


MIN_COMPARED_STEPS = 48         # per compared backend: 4 requests x 16 steps = 64


@needs_native
def test_native_rank_gives_the_reference_tokens(v3_mini_all_experts_dir, monkeypatch):
    """A whole rank on native (DeepGEMM, FlashMLA, CUDA graphs) computes what the reference backend
    does, on the same GPU and dtype: teacher-forced along the reference's greedy path, its logits stay
    as close as the triton backend's do, and at every step of every request its greedy token equals
    the reference's unless the reference's margin over it is within what rounding moved the other
    logits at that step (agreement_along_reference). (bf16 with FP8 activations moves this random
    model's logits by ~0.5, so a fixed tie threshold would call noise a bug or hide one.)"""
    prompts = prompts_of([40, 9, 100, 64], vocab=500, seed=12)
    n = 16
    kw = dict(device="cuda", dtype="bfloat16", fp8_activations=True)
    path = v3_mini_all_experts_dir
    ref, rl = greedy_logits(make_local_engine(path, kernels="reference", **kw), prompts, n)
    ref_tokens = [s.output_ids for s in ref]
    assert all(len(t) == n for t in ref_tokens)
    _, tl = greedy_logits(make_local_engine(path, kernels="triton", **kw), prompts, n, forced=ref_tokens)
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
    nat, nl = greedy_logits(nat_eng, prompts, n, forced=ref_tokens)
    assert [s.output_ids for s in nat] == ref_tokens                 # the forcing held: same contexts
    # the libraries themselves ran (not the triton fallbacks): dense GEMMs, prefill experts, decode attention
    assert {"fp8_gemm_nt", "m_grouped_fp8_gemm_nt_contiguous", "flash_mla_with_kvcache"} <= set(calls), calls
    tri = agreement_along_reference(ref_tokens, rl, tl)
    got = agreement_along_reference(ref_tokens, rl, nl)
    print(f"max |logit - reference| along the reference's path: native {got.worst_diff:.4f}, triton "
          f"{tri.worst_diff:.4f}; {got.compared} steps compared; flips: native {got.flips}, triton {tri.flips}")
    assert got.compared == tri.compared == len(prompts) * n >= MIN_COMPARED_STEPS
    assert not tri.unexplained, tri.unexplained
    assert not got.unexplained, got.unexplained
    assert got.worst_diff <= 1.5 * tri.worst_diff + 0.05


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
        out[graphs] = [s.output_ids for s in generate(eng, prompts)]
        if graphs:
            assert eng.drafter.graphs is not None and eng.drafter.graphs.n_replays >= 1
    assert out[True] == out[False]
    exact = {}
    for mtp in (0, 1):
        eng = make_local_engine(tiny_mtp_gpu_dir, kernels="reference", device="cuda", dtype="float32", mtp_draft=mtp)
        exact[mtp] = [s.output_ids for s in generate(eng, prompts)]
    assert exact[1] == exact[0]
