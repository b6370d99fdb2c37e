"""The triton backend: CPU-side contract (registry refusal, planning helpers, preconditions,
reference fallbacks) everywhere; the full self-test only where CUDA is (hardware-gated)."""
from __future__ import annotations

import math

import pytest
import torch

from epserve import kernels
from epserve.kernels import reference as ref
from epserve.kernels import triton as kt


def test_registry_refuses_triton_without_cuda():
    with pytest.raises(kernels.BackendUnavailable, match="CUDA"):
        kernels.get_backend("triton", "cpu")


def test_self_test_reports_instead_of_raising_off_gpu():
    ok, why = kt.self_test("cpu")
    assert ok is False and ("CUDA" in why or "triton" in why)


@pytest.mark.parametrize("batch, n_hb, max_pages, n_sm, want_splits", [
    (128, 8, 80, 132, 1),      # big decode batch already fills the chip
    (1, 8, 1600, 132, 33),     # one long sequence: split until ~2 waves
    (1, 8, 3, 132, 1),         # too few pages to split
    (2, 8, 0, 132, 1),         # empty block table still gives one (empty) split
    (1, 1, 10_000, 132, 64),   # capped at max_splits
])
def test_plan_kv_splits_covers_every_page(batch, n_hb, max_pages, n_sm, want_splits):
    n_splits, per_split = kt.plan_kv_splits(batch, n_hb, max_pages, n_sm)
    assert n_splits == want_splits and per_split >= 1
    assert n_splits * per_split >= max_pages
    assert (n_splits - 1) * per_split < max(max_pages, 1)  # no split starts past the end


@pytest.mark.parametrize("block_m", [4, 64])
def test_plan_group_tiles_partitions_rows_by_group(block_m):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(-1, 5, (203,), generator=g)
    ids[ids == 3] = 1  # group 3 empty
    rows, tile_group, row0, row1 = kt.plan_group_tiles(ids, 5, block_m)
    assert tile_group.numel() == math.ceil(203 / block_m) + 5
    seen = torch.zeros(203, dtype=torch.long)
    for t in range(tile_group.numel()):
        grp = int(tile_group[t])
        if grp < 0:
            continue
        r0, r1 = int(row0[t]), int(row1[t])
        assert 0 < min(r1, r0 + block_m) - r0 <= block_m
        members = rows[r0:min(r1, r0 + block_m)]
        assert bool((ids[members] == grp).all())
        seen[members] += 1
    assert torch.equal(seen, (ids >= 0).long())  # each live row in exactly one tile, padding in none


def test_wrappers_assert_preconditions_before_launch():
    a = torch.zeros(4, 256, dtype=torch.float8_e4m3fn)
    b = torch.zeros(128, 384, dtype=torch.float8_e4m3fn)
    with pytest.raises(AssertionError, match="K mismatch"):
        kt.fp8_gemm_nt(a, torch.ones(4, 2), b, torch.ones(1, 3))
    with pytest.raises(AssertionError, match="a_s must be"):
        kt.fp8_gemm_nt(a, torch.ones(4, 3), b[:, :256], torch.ones(1, 2))
    with pytest.raises(AssertionError, match="cache width"):
        kt.mla_decode(torch.zeros(2, 4, 576), torch.zeros(3, 64, 512), torch.zeros(2, 1, dtype=torch.long),
                      torch.ones(2, dtype=torch.long), 0.1, 512)
    with pytest.raises(AssertionError, match="page size"):
        kt.mla_decode(torch.zeros(2, 4, 576), torch.zeros(3, 48, 576), torch.zeros(2, 1, dtype=torch.long),
                      torch.ones(2, dtype=torch.long), 0.1, 512)
    with pytest.raises(AssertionError, match="v_dim"):
        kt.mla_decode(torch.zeros(2, 4, 576), torch.zeros(3, 64, 576), torch.zeros(2, 1, dtype=torch.long),
                      torch.ones(2, dtype=torch.long), 0.1, 600)


def test_float32_paths_match_reference_on_cpu():
    """fp32 grouped GEMMs take reference's loop; prefill attention is SDPA with the causal offset."""
    g = torch.Generator().manual_seed(4)
    ws = [ref.Weight(torch.randn(8, 16, generator=g)) for _ in range(3)]
    x, ids = torch.randn(7, 16, generator=g), torch.tensor([2, 0, -1, 1, 2, 0, -1])
    assert torch.allclose(kt.grouped_linear(x, ws, ids), ref.grouped_linear(x, ws, ids))
    assert torch.allclose(kt.linear(x, ws[0]), ref.linear(x, ws[0]))
    for tq, tk in ((9, 9), (5, 12)):
        q, k = torch.randn(tq, 3, 24, generator=g), torch.randn(tk, 3, 24, generator=g)
        v = torch.randn(tk, 3, 16, generator=g)
        assert torch.allclose(kt.mla_prefill(q, k, v, 0.2), ref.mla_prefill(q, k, v, 0.2), atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_self_test_passes_on_gpu():
    pytest.importorskip("triton")
    ok, why = kt.self_test("cuda")
    assert ok, why
    assert kernels.get_backend("triton", "cuda") is kt


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_overlapped_schedules_match_the_plain_forward_on_gpu(tiny_dir):
    """The stage split (ATTN-0 / ATTN-1, launch / compute / finish) on CUDA with Triton kernels in
    bfloat16, including a micro-batch left empty and an idle rank's empty step: the two schedules
    agree with the plain forward (float32 equality is tested on CPU)."""
    pytest.importorskip("triton")
    from conftest import prompts_of
    from epserve.model.sampling import SamplingParams
    from epserve.pipelines.batcher import Step
    from epserve.pipelines.local import make_local_engine
    from epserve.pipelines.overlap import forward_overlapped
    from epserve.pipelines.sequence import Sequence
    eng = make_local_engine(tiny_dir, redundant_experts=4, kernels="triton", device="cuda", dtype="bfloat16")
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    seqs = [Sequence(f"g{i}", p, params) for i, p in enumerate(prompts_of([150, 3, 40, 77], seed=5))]
    for s in seqs:
        eng.add(s)
    step = eng.batcher.schedule()                      # the prefill step, not yet run
    for st in (step, Step(seqs, [1] * len(seqs), False), Step(seqs[:1], [1], False), Step([], [], False)):
        batch = eng.prepare(st)
        before = eng.cache.kv.clone()
        want = eng.model.forward(batch, eng.cache.kv)     # fills the real cache for the next step
        for kind in ("prefill", "decode"):
            got = forward_overlapped(eng.model, batch, before.clone(), kind)
            # bf16 GEMMs of other row counts round differently: equal up to that, and the same
            # next token wherever the top two logits are further apart than it
            torch.testing.assert_close(got, want, rtol=0, atol=0.15)
            top2 = want.topk(2, -1).values
            clear = top2[:, 0] - top2[:, 1] > 0.3
            assert torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear]), kind
        eng.postprocess(st, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_local_engine_on_gpu_generates_the_cpu_tokens(tiny_dir):
    """A whole rank on CUDA (routing tables, counters and caches on the GPU) gives the CPU's
    greedy tokens in float32 and returns its expert counters on the CPU."""
    from conftest import engine_outputs, prompts_of
    from epserve.model.sampling import SamplingParams
    from epserve.pipelines.local import make_local_engine
    out = {}
    for dev in ("cpu", "cuda"):
        eng = make_local_engine(tiny_dir, redundant_experts=4, kernels="reference", device=dev)
        out[dev] = engine_outputs(eng, prompts_of([20, 7, 33], seed=2),
                                  SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
        counts = eng.dispatcher.take_counts()
        assert counts.device.type == "cpu" and int(counts.sum()) > 0
    assert out["cuda"] == out["cpu"]


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
@pytest.mark.parametrize("experts, slots, ranks, tokens, k, floor, node", [
    (16, 24, 1, 37, 4, False, None),     # replicas, padding rows
    (64, 96, 1, 300, 8, True, None),     # several pair blocks, the emulated rank's floor
    (16, 32, 4, 50, 4, False, 1),        # the last of 4 ranks: pairs for other ranks' slots dropped; node preference
    (256, 288, 144, 128, 8, True, 17),   # EP144's shape: 2 slots a rank
])
def test_masked_route_places_pairs_as_the_torch_ops_do(experts, slots, ranks, tokens, k, floor, node):
    """The fused kernel against LocalDispatcher's torch composition (route, masked_layout, the row
    scatter): the same rows, row counts, expert counts and received counts, exactly."""
    from epserve.model.moe_dispatch import ExpertMap, LocalDispatcher
    g = torch.Generator().manual_seed(experts + tokens)
    phy2log = torch.stack([torch.cat([torch.randperm(experts, generator=g),
                                      torch.randint(0, experts, (slots - experts,), generator=g)])[
        torch.randperm(slots, generator=g)] for _ in range(2)])
    em = ExpertMap(phy2log, experts, ranks, 8)
    fused, plain = LocalDispatcher(kt, em, 1), LocalDispatcher(ref, em, 1)
    for d in (fused, plain):
        d.rank, d.node = ranks - 1, (node if node is not None else 0)
    n_slots, dev = slots // ranks, torch.device("cuda")
    idx = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(tokens)]).to(dev)
    valid = (torch.rand(tokens, generator=g) > 0.2).to(dev)
    per_group = -(-tokens // 128) * 128 + (128 if floor else 0)
    low = torch.randint(0, per_group, (n_slots,), generator=g).to(dev) if floor else None
    got_recv, want_recv = (torch.zeros(n_slots, dtype=torch.long, device=dev) for _ in range(2))
    got = fused.masked_rows(2, idx, valid, n_slots, per_group, low, got_recv)
    want = plain.masked_rows(2, idx, valid, n_slots, per_group, low, want_recv)
    assert got[1].ge(0).sum() > 0
    for a, b in zip(got, want):
        assert torch.equal(a.long(), b.long())
    assert torch.equal(got_recv, want_recv) and torch.equal(fused.counts, plain.counts)


@needs_cuda
def test_quant_rows_fp8_lands_the_rows_a_sender_quantised():
    """The emulated rank's received rows in one kernel: the codes and scales of quantising x once
    (DeepEP's sender) and gathering, exactly, in DeepGEMM's masked layout (MN-major scales)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(64, 7168, generator=g, device="cuda").bfloat16() * 3
    src = torch.randint(0, 64, (2 * 640,), generator=g, device="cuda")
    q, s = kt.quant_rows_fp8(x, src, 2)
    rq, rs = kt.per_token_group_quant_fp8(x)
    assert q.shape == (2, 640, 7168) and s.shape == (2, 640, 56) and s.stride(1) == 1
    assert torch.equal(q.view(torch.uint8).view(-1, 7168), rq.view(torch.uint8)[src])
    assert torch.equal(s.reshape(-1, 56), rs[src])


@needs_cuda
def test_every_fused_op_passes_its_own_check_on_gpu():
    """Each fused decode op (kernels/triton.py FUSED) against its contract on this GPU: one switched
    off here would cost its speed-up silently, so the test names it."""
    from epserve.kernels import selftest
    off: set[str] = set()
    lines = selftest.gate(kt, "cuda", {op: selftest.Op() for op in kt.FUSED}, off)
    assert not off, lines


@needs_cuda
def test_dsa_index_qk_gives_a_v32_decode_the_reference_tokens(tmp_path):
    """The fused indexer q/k kernel inside a real V3.2 rank on CUDA in float32 (where it differs from the
    reference only by LayerNorm's summation order): the greedy tokens of the reference's q/k path."""
    from conftest import engine_outputs, prompts_of
    from epserve.kernels import reference_dsa
    from epserve.kernels.triton_jit import OFF
    from epserve.model.sampling import SamplingParams
    from epserve.model.tiny import make_tiny_model
    from epserve.pipelines.local import make_local_engine
    d = make_tiny_model(tmp_path / "v32", preset="v32-tiny", seed=3)
    assert kt.self_test("cuda")[0] and "dsa_index_qk" not in OFF      # else both runs take the reference
    out, fused = {}, kt.dsa_index_qk
    try:
        for name, fn in (("fused", fused), ("reference", reference_dsa.dsa_index_qk)):
            kt.dsa_index_qk = fn
            eng = make_local_engine(d, kernels="triton", device="cuda")
            assert eng.model.layers[0].attn.kb is kt
            out[name] = engine_outputs(eng, prompts_of([300, 90, 7], seed=5),
                                       SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))
    finally:
        kt.dsa_index_qk = fused
    assert out["fused"] == out["reference"]
