"""The `triton` backend's MoE token routing: the gate's group-limited top-k as one kernel per token,
and the combine's weighted sum of each token's K expert rows in one pass.

Shapes it has no kernel for (not CUDA, other score functions, sizes not powers of two) take
reference's. Never: picks a backend or holds state.
"""
from __future__ import annotations

import torch

from epserve.kernels import reference
from epserve.kernels.triton_jit import _cdiv, _jit, _pow2, tl


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
    s = tl.sigmoid(tl.load(logits + t * E + offs))
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
    (or one group) at power-of-two sizes; anything else takes reference's."""
    t, e = logits.shape
    if (logits.device.type != "cuda" or t == 0 or score_func != "sigmoid" or not (noaux or n_groups == 1)
            or not (_pow2_ok(e) and _pow2_ok(k) and _pow2_ok(n_groups) and e % n_groups == 0 and k <= e)):
        return reference.route_topk(logits, bias, k, n_groups, topk_groups, score_func, noaux, norm, scale)
    logits = logits.float().contiguous()
    w = torch.empty(t, k, dtype=torch.float32, device=logits.device)
    idx = torch.empty(t, k, dtype=torch.int64, device=logits.device)
    _route_kernel[(t,)](logits, bias if bias is not None else logits, w, idx, float(scale), E=e, G=n_groups,
                        TOPG=topk_groups, K=k, HAS_BIAS=bias is not None, NORM=norm and k > 1)
    return w, idx
