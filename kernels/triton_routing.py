"""The `triton` backend's MoE token routing: the gate's group-limited top-k as one kernel per token,
a decode step's (token, expert) pairs placed into the masked layout in one pass, and the combine's
weighted sum of each token's K expert rows in one pass.

Shapes it has no kernel for (not CUDA, other score functions, sizes not powers of two) take
reference's. Never: picks a backend or holds state.
"""
from __future__ import annotations

import torch

from epserve.kernels import reference
from epserve.kernels.triton_jit import OFF, _cdiv, _jit, _pow2, tl


@_jit
def _combine_kernel(y, rows, w, out, D, stride_y, K: tl.constexpr, HAS_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    m = offs < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for k in tl.static_range(K):
        if HAS_ROWS:
            r = tl.load(rows + t * K + k).to(tl.int64)
        else:
            r = (t * K + k).to(tl.int64)
        v = tl.load(y + r * stride_y + offs, mask=m & (r >= 0), other=0.0)   # a dropped pair's row is never read
        acc += tl.load(w + t * K + k).to(tl.float32) * v.to(tl.float32)
    tl.store(out + t.to(tl.int64) * D + offs, acc.to(out.dtype.element_ty), mask=m)


def combine_rows(y: torch.Tensor, weights: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """reference.combine_rows in one pass: each token reads its K rows once and writes its sum (the
    gather, the weighting and the sum were three kernels and a [T, K, D] temporary)."""
    t, k = weights.shape
    d = y.shape[1]
    if y.device.type != "cuda" or t == 0:
        return reference.combine_rows(y, weights, rows)
    y = y if y.stride(1) == 1 else y.contiguous()
    out = torch.empty(t, d, dtype=y.dtype, device=y.device)
    block = min(1024, _pow2(d))
    _combine_kernel[(t, _cdiv(d, block))](y, rows if rows is not None else y, weights.contiguous(), out, d,
                                          y.stride(0), K=k, HAS_ROWS=rows is not None, BLOCK_D=block)
    return out


# ---------------------------------------------------------------- MoE routing

@_jit
def _route_kernel(logits, bias, w_out, idx_out, scale, E: tl.constexpr, G: tl.constexpr, TOPG: tl.constexpr,
                  K: tl.constexpr, HAS_BIAS: tl.constexpr, NORM: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, E)
    s = tl.sigmoid(tl.load(logits + t * E + offs).to(tl.float32))
    c = s
    if HAS_BIAS:
        c = s + tl.load(bias + offs)
    if G > 1:      # rank the groups by their two best choices, keep the TOPG best
        cg = tl.reshape(c, (G, E // G))
        col = tl.arange(0, E // G)
        first = tl.argmax(cg, axis=1)
        gs = tl.max(cg, axis=1) + tl.max(tl.where(col[None, :] == first[:, None], float("-inf"), cg), axis=1)
        gid = tl.arange(0, G)
        keep = gid < 0
        for _ in tl.static_range(TOPG):
            best = tl.argmax(gs, axis=0)
            keep = keep | (gid == best)
            gs = tl.where(gid == best, float("-inf"), gs)
        c = tl.where(tl.reshape(tl.broadcast_to(keep[:, None], (G, E // G)), (E,)), c, float("-inf"))
    kk = tl.arange(0, K)
    ws = tl.zeros([K], dtype=tl.float32)
    ids = tl.zeros([K], dtype=tl.int64)
    for j in tl.static_range(K):
        e = tl.argmax(c, axis=0)
        hit = offs == e
        ws = tl.where(kk == j, tl.sum(tl.where(hit, s, 0.0), axis=0), ws)
        ids = tl.where(kk == j, e.to(tl.int64), ids)
        c = tl.where(hit, float("-inf"), c)
    if NORM:
        ws = ws / (tl.sum(ws, axis=0) + 1e-20)
    tl.store(w_out + t * K + kk, ws * scale)
    tl.store(idx_out + t * K + kk, ids)


def _pow2_ok(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def route_topk(logits: torch.Tensor, bias: torch.Tensor | None, k: int, n_groups: int = 1, topk_groups: int = 1,
               score_func: str = "sigmoid", noaux: bool = True, norm: bool = True, scale: float = 1.0
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """reference.route_topk as one kernel per token (its sigmoid, bias, group ranking and top-k were
    some fifteen small kernels, 0.07 ms at 256 tokens on an H200). Sigmoid scoring with noaux_tc
    (or one group) at power-of-two sizes; anything else takes reference's. bf16 logits are read as
    they are and scored in fp32 (no upcast kernel)."""
    t, e = logits.shape
    if (logits.device.type != "cuda" or t == 0 or score_func != "sigmoid" or not (noaux or n_groups == 1)
            or not (_pow2_ok(e) and _pow2_ok(k) and _pow2_ok(n_groups) and e % n_groups == 0 and k <= e)):
        return reference.route_topk(logits, bias, k, n_groups, topk_groups, score_func, noaux, norm, scale)
    logits = logits.contiguous()
    w = torch.empty(t, k, dtype=torch.float32, device=logits.device)
    idx = torch.empty(t, k, dtype=torch.int64, device=logits.device)
    _route_kernel[(t,)](logits, bias if bias is not None else logits, w, idx, float(scale), E=e, G=n_groups,
                        TOPG=topk_groups, K=k, HAS_BIAS=bias is not None, NORM=norm and k > 1)
    return w, idx


# ---------------------------------------------------------------- pairs -> the masked layout

@_jit
def _masked_route_kernel(idx, valid, log2phy, stride_l2p, slot_node, counts, floor, received, src, pair_row,
                         masked_m, P, T, my_node, first_slot, per_group,
                         K: tl.constexpr, X: tl.constexpr, XP: tl.constexpr,
                         G: tl.constexpr, GP: tl.constexpr, BLOCK: tl.constexpr, HAS_NODE: tl.constexpr,
                         HAS_FLOOR: tl.constexpr, HAS_RECEIVED: tl.constexpr):
    gs = tl.arange(0, GP)
    xs = tl.arange(0, XP)
    carry = tl.zeros([GP], dtype=tl.int32)         # pairs placed so far per group (input order)
    for start in range(0, P, BLOCK):
        p = start + tl.arange(0, BLOCK)
        pm = p < P
        t = p // K
        v = (tl.load(valid + t, mask=pm, other=0) != 0) & pm
        e = tl.load(idx + p, mask=pm, other=0)
        tl.atomic_add(counts + e, v.to(tl.int64), mask=v)          # integer sums: any order gives the same
        # choose_replicas: a replica on the sender's node if any, then candidate t mod count
        cand = tl.load(log2phy + e[:, None] * stride_l2p + xs[None, :], mask=pm[:, None] & (xs[None, :] < X),
                       other=-1)
        ok = cand >= 0
        if HAS_NODE:
            near = ok & (tl.load(slot_node + tl.maximum(cand, 0), mask=ok, other=-1) == my_node)
            ok = tl.where((tl.sum(near.to(tl.int32), axis=1) > 0)[:, None], near, ok)
        n_ok = tl.maximum(tl.sum(ok.to(tl.int32), axis=1), 1)
        order = tl.cumsum(ok.to(tl.int32), axis=1) - 1
        chosen = ok & (order == (t % n_ok)[:, None])
        g = tl.sum(tl.where(chosen, cand, 0), axis=1) - first_slot
        keep = v & (g >= 0) & (g < G)
        # the pair's rank among its group's pairs, in input order (masked_layout's)
        hot = (g[:, None] == gs[None, :]) & keep[:, None]
        before = tl.cumsum(hot.to(tl.int32), axis=0) - 1 + carry[None, :]
        rank = tl.sum(tl.where(hot, before, 0), axis=1)
        carry += tl.sum(hot.to(tl.int32), axis=0)
        row = g.to(tl.int64) * per_group + rank
        tl.store(pair_row + p, tl.where(keep, row, -1), mask=pm)
        tl.store(src + row, t.to(tl.int64), mask=keep)
    gm = gs < G
    m = tl.minimum(carry, T)
    if HAS_FLOOR:
        m = tl.maximum(m, tl.load(floor + gs, mask=gm, other=0).to(tl.int32))
    tl.store(masked_m + gs, m, mask=gm)
    if HAS_RECEIVED:
        tl.store(received + gs, tl.load(received + gs, mask=gm, other=0) + m, mask=gm)


def masked_route(idx: torch.Tensor, valid: torch.Tensor, log2phy: torch.Tensor, slot_node: torch.Tensor | None,
                 my_node: int | None, first_slot: int, n_slots: int, per_group: int, counts: torch.Tensor,
                 floor: torch.Tensor | None = None, received: torch.Tensor | None = None):
    """A decode step's routing tail in one launch: each (token, expert) pair of idx [T, K] (logical
    experts; pairs of tokens with valid False route nowhere) gets a replica slot as
    placement/topology.py's choose_replicas picks it (log2phy [E, X] of the layer; slot_node / my_node:
    prefer the sender's node), then its row in a masked-layout buffer of n_slots groups of per_group
    rows, in input order within a group (kernels/layouts.py's masked_layout; slots outside
    [first_slot, first_slot + n_slots) are dropped). Adds each logical expert's valid pairs into
    counts [E] (int64) and, given, masked_m into received [n_slots] (int64).
    -> (src int64 [n_slots * per_group]: each buffer row's token, 0 where no pair lands;
        pair_row int64 [T * K]: each pair's buffer row, -1 dropped;
        masked_m int32 [n_slots]: rows per group, min(pairs, T), raised to floor [n_slots] when given),
    or None where this kernel does not take the shapes or is off on this machine (triton_jit.OFF); the
    caller composes the torch ops instead."""
    t, k = idx.shape
    x = log2phy.shape[1]
    if ("masked_route" in OFF or not idx.is_cuda or t == 0 or n_slots > 1024 or valid.dtype != torch.bool or x > 64 or counts.dtype != torch.int64
            or log2phy.stride(1) != 1 or (received is not None and received.dtype != torch.int64)):
        return None
    dev = idx.device
    src = torch.zeros(n_slots * per_group, dtype=torch.int64, device=dev)
    pair_row = torch.empty(t * k, dtype=torch.int64, device=dev)
    masked_m = torch.empty(n_slots, dtype=torch.int32, device=dev)
    gp = _pow2(n_slots)
    block = max(16, min(128, 16384 // gp))
    node = slot_node is not None and my_node is not None
    _masked_route_kernel[(1,)](idx.contiguous(), valid.contiguous().view(torch.uint8), log2phy, log2phy.stride(0),
                               slot_node if node else idx, counts, floor if floor is not None else idx,
                               received if received is not None else counts, src, pair_row, masked_m,
                               t * k, t, my_node if node else 0, first_slot, per_group, K=k, X=x, XP=_pow2(x),
                               G=n_slots, GP=gp, BLOCK=block, HAS_NODE=node,
                               HAS_FLOOR=floor is not None, HAS_RECEIVED=received is not None, num_warps=8)
    return src, pair_row, masked_m
