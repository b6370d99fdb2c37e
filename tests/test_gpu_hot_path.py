"""The hot path on a GPU (skipped without CUDA; run on a lent H200 and recorded under
benchmarks/results/): the native backend's self-test, CUDA-graph decode equal to eager, a decode
forward with no host sync, and a whole rank on `native` giving the `reference` backend's tokens."""
from __future__ import annotations

import dataclasses

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
        logits = eng.model.forward(batch, eng.cache.kv)          # a host sync in here raises
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert logits.shape[0] == len(step.seqs) and bool(torch.isfinite(logits).all())


@pytest.fixture(scope="module")
def v3_mini_all_experts_dir(tmp_path_factory):
    """v3-mini with every routed expert active: top-k routing has near-ties that bf16 rounding of
    two correct backends flips either way (and an MoE's tokens follow the flip); with all experts
    chosen the routing is exact and only the kernels' arithmetic is compared."""
    from epserve.model.tiny import make_tiny_model
    return str(make_tiny_model(tmp_path_factory.mktemp("ckpt") / "v3mini_all", preset="v3-mini", fp8=True, seed=5,
                               config_overrides={"n_routed_experts": 8, "num_experts_per_tok": 8, "n_group": 1,
                                                 "topk_group": 1}))


def _greedy_logits(eng, prompts, n, forced: list[list[int]] | None = None):
    """Greedy outputs and, per request, the fp32 logits [V] each step sampled from.

    forced[i]: request i's tokens to emit in place of the engine's own choice (teacher forcing: the
    engine computes its logits on exactly the context `forced` gives it, so every step of every
    request can be compared with the run that produced `forced`)."""
    per: dict[str, list[torch.Tensor]] = {}
    want = {f"r{i}": toks for i, toks in enumerate(forced)} if forced is not None else None
    postprocess = eng.postprocess

    def record(step, logits, *a, **kw):
        if want is not None:
            chosen = torch.zeros_like(logits)       # greedy sampling then draws exactly the forced token
        for i, s in enumerate(step.seqs):
            seen = per.setdefault(s.request_id, [])
            seen.append(logits[i].float().cpu())
            if want is not None:
                chosen[i, want[s.request_id][len(seen) - 1]] = 1
        return postprocess(step, logits if want is None else chosen, *a, **kw)

    eng.postprocess = record
    seqs = _generate(eng, prompts, n)
    return seqs, [per[s.request_id] for s in seqs]


@dataclasses.dataclass
class Agreement:
    """A backend's logits compared with the reference's at every step of the reference's greedy path."""
    compared: int                 # steps compared, every step of every request
    worst_diff: float             # max |logit - reference logit| over all steps and the vocabulary
    flips: list[tuple]            # (request, step, reference token, backend token, margin, bound)
    unexplained: list[tuple]      # the flips whose margin exceeds their bound


def agreement_along_reference(ref_tokens: list[list[int]], ref_logits: list[list[torch.Tensor]],
                              other_logits: list[list[torch.Tensor]]) -> Agreement:
    """Compare a backend, teacher-forced along the reference's greedy path, with the reference.

    ref_tokens[r][j]: the reference's greedy token at step j of request r; ref_logits[r][j] and
    other_logits[r][j]: the two backends' logits [V] at that step, on the same context. The backend's
    token there is argmax(other). A flip (backend token b != reference token a) is explained only when
    the reference's own margin lr[a] - lr[b] (at least its top-two margin) is within
    bound = 2 * max |other - ref| over the vocabulary except a and b, at that step: rounding moved
    the other logits that far, so it may move these two as far in opposite directions. The two
    flipped entries are left out because a flip always fits their own difference (lo[b] >= lo[a]
    means lr[a] - lr[b] <= |d[a]| + |d[b]|): measured on them, no flip could ever be unexplained."""
    worst, compared, flips, unexplained = 0.0, 0, [], []
    for r, (toks, rl, ol) in enumerate(zip(ref_tokens, ref_logits, other_logits, strict=True)):
        assert len(toks) == len(rl) == len(ol), f"request {r}: {len(toks)} tokens, {len(rl)} / {len(ol)} logits"
        for j, (a, lr, lo) in enumerate(zip(toks, rl, ol)):
            lr, lo = lr.float(), lo.float()
            assert lr[a] == lr.max(), f"request {r} step {j}: reference token {a} is not its own argmax"
            diff = (lo - lr).abs()
            worst, compared = max(worst, float(diff.max())), compared + 1
            b = int(lo.argmax())
            if b == a or lo[b] == lo[a]:          # a tie the backend may break either way is no flip
                continue
            others = torch.ones_like(diff, dtype=torch.bool)
            others[[a, b]] = False
            bound = 2 * float(diff[others].max())
            flip = (r, j, a, b, round(float(lr[a] - lr[b]), 4), round(bound, 4))
            flips.append(flip)
            if lr[a] - lr[b] > bound:
                unexplained.append(flip)
    return Agreement(compared, worst, flips, unexplained)


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
    ref, rl = _greedy_logits(make_local_engine(path, kernels="reference", **kw), prompts, n)
    ref_tokens = [s.output_ids for s in ref]
    assert all(len(t) == n for t in ref_tokens)
    _, tl = _greedy_logits(make_local_engine(path, kernels="triton", **kw), prompts, n, forced=ref_tokens)
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
    nat, nl = _greedy_logits(nat_eng, prompts, n, forced=ref_tokens)
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


def _synthetic(n_req=2, n_steps=6, vocab=32, margin=2.0, noise=0.02, seed=0):
    """Reference logits whose top token leads by `margin` at every step, and a backend's = reference
    + uniform noise in [-noise, noise]; -> (tokens, ref logits, other logits)."""
    g = torch.Generator().manual_seed(seed)
    ref, other, toks = [], [], []
    for _ in range(n_req):
        rl = [torch.randn(vocab, generator=g) for _ in range(n_steps)]
        for x in rl:
            x[int(x.argmax())] = x.topk(2).values[1] + margin
        ref.append(rl)
        other.append([x + (torch.rand(vocab, generator=g) * 2 - 1) * noise for x in rl])
        toks.append([int(x.argmax()) for x in rl])
    return toks, ref, other


def test_agreement_counts_every_step_and_finds_no_flip_in_rounding_noise():
    toks, ref, other = _synthetic(n_req=3, n_steps=7)
    got = agreement_along_reference(toks, ref, other)
    assert (got.compared, got.flips, got.unexplained) == (21, [], [])
    assert 0 < got.worst_diff <= 0.02


def test_agreement_excuses_a_near_tie_flipped_by_rounding():
    toks, ref, other = _synthetic()
    a = toks[1][3]
    b = int(ref[1][3].topk(2).indices[1])
    ref[1][3][b] = ref[1][3][a] - 0.01                    # the reference's top two: 0.01 apart
    other[1][3] = ref[1][3] + 0.015                       # the backend: within its noise everywhere ...
    other[1][3][a] -= 0.02                                 # ... the two contenders moved oppositely
    got = agreement_along_reference(toks, ref, other)
    assert [f[:4] for f in got.flips] == [(1, 3, a, b)] and got.unexplained == []


def test_agreement_reports_a_planted_wrong_token_at_every_step_it_occurs():
    """A backend whose logit for one token is wrong (here +3 where the reference leads by 2) flips a
    clear choice: reported as unexplained, and the comparison goes on past it to the next flip."""
    toks, ref, other = _synthetic()
    wrong = [(0, 1), (0, 4), (1, 2)]
    for r, j in wrong:
        b = (toks[r][j] + 1) % 32
        other[r][j][b] = ref[r][j][toks[r][j]] + 1.0
    got = agreement_along_reference(toks, ref, other)
    assert got.compared == 12
    assert [f[:2] for f in got.unexplained] == wrong
    assert all(f[4] > f[5] for f in got.unexplained)       # each margin beyond its step's bound


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
