"""DeepEP's outputs into the grouped-GEMM layouts (kernels/layouts.py), on CPU without deep_ep:
receive tensors built as DeepEP 567632d documents them (deep_ep/buffer.py: dispatch,
low_latency_dispatch), fed through the conversions and the reference experts, combined the way
DeepEP combines (normal: unweighted sum per source token; low latency: weighted), and compared
with every pair computed directly. Plus the selection rules that keep a CPU box on all-to-all."""
from __future__ import annotations

import logging

import pytest
import torch

from epserve.kernels import reference
from epserve.kernels.layouts import (ll_max_tokens, ll_row_sources, ll_valid_rows, masked_topk, normal_recv_pairs,
                                     reduce_pairs)
from epserve.kernels.reference import ExpertWeights, Weight

R, SPR, D, INTER, K = 2, 4, 32, 16, 3          # ranks, slots per rank, hidden, expert width, top-k


def _experts(g) -> list[ExpertWeights]:
    """Each rank's SPR float expert slots."""
    out = []
    for _ in range(R):
        like = Weight(torch.zeros(1, 1), None)
        ex = ExpertWeights.empty(SPR, INTER, D, like, "cpu")
        for j in range(SPR):
            ex.set_slot(j, *(Weight(torch.randn(*s, generator=g) / s[1] ** 0.5, None)
                             for s in ((INTER, D), (INTER, D), (D, INTER))))
        out.append(ex)
    return out


def _inputs(g, t):
    xs = [torch.randn(t, D, generator=g) for _ in range(R)]
    slots = [torch.stack([torch.randperm(R * SPR, generator=g)[:K] for _ in range(t)]) for _ in range(R)]
    ws = [torch.rand(t, K, generator=g) for _ in range(R)]
    return xs, slots, ws


def _direct(xs, slots, ws, experts):
    """sum_k w * expert_{slot}(x) per token of every rank, one pair at a time."""
    ffn = reference.expert_ffn
    out = []
    for x, s, w in zip(xs, slots, ws):
        y = torch.zeros_like(x)
        for t in range(x.shape[0]):
            for k in range(K):
                r, j = divmod(int(s[t, k]), SPR)
                y[t] += w[t, k] * ffn(x[t:t + 1], experts[r], torch.tensor([j]))[0]
        out.append(y)
    return out


def test_normal_worked_example():
    # a token that picked global slots (5, 2) with this rank holding 0..3: one live pair (slot 2, w1)
    row, slot, w = normal_recv_pairs(torch.tensor([[-1, 2]]), torch.tensor([[0.3, 0.7]]))
    assert row.tolist() == [0, 0] and slot.tolist() == [-1, 2] and w.tolist() == pytest.approx([0.0, 0.7])


def test_normal_dispatch_layout_equals_direct():
    g = torch.Generator().manual_seed(0)
    experts = _experts(g)
    xs, slots, ws = _inputs(g, 7)
    combined = [torch.zeros_like(x) for x in xs]
    for dst in range(R):
        # DeepEP normal receive on `dst`: one row per (source rank, token) with >= 1 slot here, sources in
        # rank order; recv_topk_idx the local slot or -1; recv_topk_weights as sent
        src = [(r, t) for r in range(R) for t in range(xs[r].shape[0]) if bool((slots[r][t] // SPR == dst).any())]
        recv_x = torch.stack([xs[r][t] for r, t in src])
        local = torch.stack([torch.where(slots[r][t] // SPR == dst, slots[r][t] % SPR, -1) for r, t in src])
        recv_w = torch.stack([ws[r][t] for r, t in src])
        row, slot, w = normal_recv_pairs(local, recv_w)
        y = reference.expert_ffn(recv_x[row], experts[dst], slot)        # the contiguous layout drops -1 pairs
        back = reduce_pairs(y, w, K)                                     # [N, D]: what goes into combine
        for n, (r, t) in enumerate(src):                                 # DeepEP's combine: an unweighted sum
            combined[r][t] += back[n]
    for got, want in zip(combined, _direct(xs, slots, ws, experts)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_low_latency_masked_layout_equals_direct():
    g = torch.Generator().manual_seed(1)
    experts = _experts(g)
    t = 5
    n_max = ll_max_tokens(t)
    assert n_max == 128 and (R * n_max) % 128 == 0
    xs, slots, ws = _inputs(g, t)
    combined = [torch.zeros_like(x) for x in xs]
    for dst in range(R):
        # DeepEP low-latency receive on `dst`: recv_x [E_local, R * N_max, D], for each local expert the
        # rows of source rank 0 first, then rank 1 ...; recv_count [E_local]; src_info = source token;
        # layout_range [E_local, R] = (begin << 32) | count
        recv_x = torch.zeros(SPR, R * n_max, D)
        src_info = torch.full((SPR, R * n_max), -1, dtype=torch.int32)
        count = torch.zeros(SPR, dtype=torch.int32)
        layout_range = torch.zeros(SPR, R, dtype=torch.int64)
        for e in range(SPR):
            for r in range(R):
                begin = int(count[e])
                toks = [tt for tt in range(t) if bool((slots[r][tt] == dst * SPR + e).any())]
                for tt in toks:
                    recv_x[e, count[e]], src_info[e, count[e]] = xs[r][tt], tt
                    count[e] += 1
                layout_range[e, r] = (begin << 32) | len(toks)
        y = reference.expert_ffn_masked(recv_x, experts[dst], count)      # the masked GEMM, straight in
        valid = ll_valid_rows(count, R * n_max)
        assert bool((y[~valid] == 0).all())
        source = ll_row_sources(layout_range, R * n_max)
        assert torch.equal(source >= 0, valid)
        for e in range(SPR):                                              # DeepEP's LL combine: weighted
            for m in range(int(count[e])):
                r, tt = int(source[e, m]), int(src_info[e, m])
                k = int((slots[r][tt] == dst * SPR + e).nonzero()[0, 0])
                combined[r][tt] += ws[r][tt, k] * y[e, m]
    for got, want in zip(combined, _direct(xs, slots, ws, experts)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_masked_topk_and_bounds():
    slots = torch.tensor([[3, 1], [0, 2], [5, 4]])
    got = masked_topk(slots, torch.tensor([True, False, True]))
    assert got.dtype == torch.int64 and got.tolist() == [[3, 1], [-1, -1], [5, 4]]
    assert masked_topk(slots, None).tolist() == slots.tolist()
    assert [ll_max_tokens(n) for n in (1, 128, 129, 256)] == [128, 128, 256, 256]


def test_deepep_reasons_on_this_machine():
    from epserve.model import deepep_dispatch as de
    why = de.unsupported_reason(7168, 8, 8, 8, "cuda")
    if de.deep_ep is None:
        assert why.startswith("deep_ep not importable")
    assert de.low_latency_reason(7168, 8, 128) is None
    assert "hidden" in de.low_latency_reason(1000, 8, 128)
    assert "QP depth" in de.low_latency_reason(7168, 8, 1024)
    assert "top-k" in de.low_latency_reason(7168, 12, 128)


def test_auto_falls_back_to_all_to_all_with_one_reason(tiny_dir, caplog):
    from epserve.kernels import reference as kb
    from epserve.model.checkpoint import read_config
    from epserve.model.ep_dispatch import AllToAllDispatcher
    from epserve.model.ep_select import DeepEPUnavailable, make_ep_dispatcher
    from epserve.model.moe_dispatch import ExpertMap
    from epserve.placement.topology import initial_phy2log
    args = read_config(tiny_dir)
    em = ExpertMap(initial_phy2log(args.n_moe_layers, args.n_routed_experts, args.n_routed_experts),
                   args.n_routed_experts, 2, 2)
    with caplog.at_level(logging.INFO, logger="epserve.ep_select"):
        d = make_ep_dispatcher(kb, args, em, 0, 2, 2, False, "cpu", "auto")
    assert isinstance(d, AllToAllDispatcher)
    lines = [r.getMessage() for r in caplog.records if "ep_dispatch" in r.getMessage()]
    assert len(lines) == 1 and "native kernels backend" in lines[0], lines
    with pytest.raises(DeepEPUnavailable, match="ep_dispatch: deepep cannot run"):
        make_ep_dispatcher(kb, args, em, 0, 2, 2, False, "cpu", "deepep")
    assert isinstance(make_ep_dispatcher(kb, args, em, 0, 2, 2, False, "cpu", "all_to_all"), AllToAllDispatcher)
