"""Grouped-GEMM row layouts for routed experts, built on the device without a host sync.

Owns the two layouts DeepGEMM (and DeepEP) use, for every backend alike:
  contiguous  rows sorted by group, each group's segment padded to `align` rows; a row's
              group id in m_indices, -1 on padding rows (prefill: many rows, few groups);
  masked      a [G, max_m, ...] buffer, group g's rows first, masked_m[g] of them
              (decode: few rows, static shapes, so a CUDA graph can replay it).
Every size here is known on the host from the input's shape alone (upper bounds), and every
count stays on the device: nothing calls .item(), .tolist() or nonzero().
Never: computes an expert or moves data between ranks.

Legend: M rows (pairs of token and expert), G groups (this rank's expert slots).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from epserve.kernels.reference import combine_rows


@dataclass
class ContiguousLayout:
    """pos[m]: row m's row in the padded buffer (-1: dropped, its group id was -1);
    m_indices [n_rows] int32: each padded row's group, -1 on padding."""

    pos: torch.Tensor
    m_indices: torch.Tensor

    @property
    def n_rows(self) -> int:
        return self.m_indices.numel()


@dataclass
class MaskedLayout:
    """group[m], slot[m]: where row m sits in the [G, max_m] buffer; `keep[m]` False for rows
    with group -1 (they point at the spare row (0, max_m) and must be ignored); masked_m [G] int32."""

    group: torch.Tensor
    slot: torch.Tensor
    keep: torch.Tensor
    masked_m: torch.Tensor
    max_m: int


def _rank_in_group(ids: torch.Tensor, n_groups: int):
    """-> (key [M], rank of each row among its group's rows in input order [M], counts [G])."""
    m, dev = ids.numel(), ids.device
    key = torch.where(ids >= 0, ids.long(), n_groups)               # dropped rows sort last
    order = torch.argsort(key, stable=True)
    counts = torch.zeros(n_groups + 1, dtype=torch.long, device=dev).scatter_add_(0, key, torch.ones_like(key))
    first = torch.cumsum(counts, 0) - counts                        # first sorted index of each key
    rank_sorted = torch.arange(m, device=dev) - first[key[order]]
    rank = torch.empty_like(rank_sorted).scatter_(0, order, rank_sorted)
    return key, rank, counts[:n_groups]


def contiguous_layout(ids: torch.Tensor, n_groups: int, align: int = 128) -> ContiguousLayout:
    """ids int [M] (values -1..G-1) -> the padded contiguous layout.

    Rows keep their input order within a group. The buffer has align(M) + G * align rows, an
    upper bound of sum_g align(count_g) that depends on M only; padded blocks carry -1 and
    DeepGEMM skips them.
    """
    m, dev = ids.numel(), ids.device
    n_rows = -(-m // align) * align + n_groups * align
    key, rank, counts = _rank_in_group(ids, n_groups)
    padded = (counts + align - 1) // align * align
    start = torch.cumsum(padded, 0) - padded
    live = key < n_groups
    pos = torch.where(live, start[key.clamp(max=n_groups - 1)] + rank, -1) if n_groups else torch.full_like(key, -1)
    m_indices = torch.full((n_rows + 1,), -1, dtype=torch.int32, device=dev)
    m_indices.scatter_(0, torch.where(live, pos, n_rows), torch.where(live, key, -1).to(torch.int32))
    return ContiguousLayout(pos, m_indices[:n_rows])


def masked_layout(ids: torch.Tensor, n_groups: int, max_m: int) -> MaskedLayout:
    """ids int [M] (values -1..G-1) -> the masked layout with max_m rows per group.

    The caller guarantees no group gets more than max_m rows (decode: max_m = tokens, since a
    token picks a slot at most once); dropped rows (id -1) point at row max_m of group 0, so the
    buffer must have max_m + 1 rows per group and that spare row is never counted in masked_m.
    """
    key, rank, counts = _rank_in_group(ids, n_groups)
    keep = key < n_groups
    group = torch.where(keep, key, 0)
    slot = torch.where(keep, rank, max_m)
    return MaskedLayout(group, slot, keep, counts.clamp(max=max_m).to(torch.int32), max_m)


def tma_aligned_rows(m: int, element_size: int = 4) -> int:
    """Rows of an MN-major scale tensor padded so each column starts on 16 bytes (TMA's rule)."""
    per = 16 // element_size
    return -(-m // per) * per


def empty_mn_major_scales(shape: tuple[int, ...], device, dtype=torch.float32) -> torch.Tensor:
    """An fp32 scale tensor [..., M, K/128] laid out MN-major and TMA-aligned, as DeepGEMM reads
    activation scales on Hopper (so it needs no transpose kernel per GEMM)."""
    *batch, m, nk = shape
    ma = tma_aligned_rows(m, torch.tensor([], dtype=dtype).element_size())
    if not batch:
        return torch.empty_strided((m, nk), (1, ma), dtype=dtype, device=device)
    g = 1
    for b in batch:
        g *= b
    t = torch.empty_strided((g, m, nk), (ma * nk, 1, ma), dtype=dtype, device=device)
    return t.view(*batch, m, nk) if len(batch) == 1 else t.unflatten(0, tuple(batch))


# ---------------------------------------------------------------- DeepEP's outputs -> these layouts
# DeepEP (deep_ep.Buffer, V1 API; model/deepep_dispatch.py) hands received rows over in two forms:
#   normal  recv_x [N, D] (one row per (source rank, token) with >= 1 expert here),
#           recv_topk_idx [N, K] int64: this rank's LOCAL expert (slot) index or -1,
#           recv_topk_weights [N, K] fp32; its combine is an UNWEIGHTED sum over ranks, so the
#           rows going back must already be sum_k w[n, k] * expert_k(x[n]) over the local experts.
#   low latency  recv_x [E_local, R * N_max, D] with recv_count [E_local] int32: exactly the
#           masked layout (masked_m = recv_count); its combine applies the gate weights itself.
# Worked example (normal, K = 2, this rank holds slots 0..3): a token that picked global slots
# (5, 2) on a 2-rank unit arrives once, with recv_topk_idx [-1, 2] and weights [w0, w1]: one
# pair (row n, slot 2, weight w1); the row sent back is w1 * expert_2(x[n]).

def normal_recv_pairs(recv_topk_idx: torch.Tensor, recv_topk_weights: torch.Tensor):
    """recv_topk_idx [N, K] (local slot or -1), recv_topk_weights [N, K] -> (row [N*K] int64,
    slot [N*K] int64 with -1 where no local expert, weight [N*K] fp32 with 0 there). Pair j is
    row j // K, so the contiguous layout's -1 rows drop the empty pairs without a host sync."""
    n, k = recv_topk_idx.shape
    slot = recv_topk_idx.reshape(-1).long()
    weight = torch.where(slot >= 0, recv_topk_weights.reshape(-1).float(), 0.0)
    row = torch.arange(n * k, device=slot.device) // k
    return row, slot, weight


def reduce_pairs(y: torch.Tensor, weight: torch.Tensor, k: int) -> torch.Tensor:
    """Expert outputs of the pairs y [N*K, D] and weights [N*K] -> per received row [N, D]:
    sum_k weight * y, what DeepEP's unweighted normal combine must be given."""
    return combine_rows(y, weight.view(-1, k))              # the one combine reduction (backends speed it up)


def masked_topk(slots: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Routed slots [T, K] -> DeepEP's topk_idx int64 [T, K], -1 on padding rows of a CUDA-graph
    bucket (valid False): DeepEP sends those rows nowhere."""
    idx = slots.long()
    return idx if valid is None else torch.where(valid[:, None], idx, -1)


def ll_max_tokens(max_batch: int, align: int = 128) -> int:
    """num_max_dispatch_tokens_per_rank for DeepEP's low-latency kernels: the rank's largest decode
    batch rounded up to whole 128-row tiles, so the masked buffer [E_local, R * N_max, D] is whole
    tiles per slot for any rank count (DeepGEMM's masked GEMM stores whole tiles)."""
    return -(-max(1, max_batch) // align) * align


def ll_valid_rows(recv_count: torch.Tensor, max_m: int) -> torch.Tensor:
    """bool [E_local, max_m]: which rows of a low-latency receive buffer hold a token."""
    return torch.arange(max_m, device=recv_count.device)[None, :] < recv_count[:, None].long()


def ll_row_sources(layout_range: torch.Tensor, max_m: int) -> torch.Tensor:
    """DeepEP's layout_range [E_local, R] int64, (begin << 32) | count per source rank, -> the source
    rank of each row [E_local, max_m] (-1 past the received rows). Rows of one source are contiguous."""
    begin, count = layout_range >> 32, layout_range & 0xFFFFFFFF
    rows = torch.arange(max_m, device=layout_range.device)[None, None, :]
    inside = (rows >= begin[..., None]) & (rows < (begin + count)[..., None])          # [E, R, max_m]
    ranks = torch.arange(layout_range.shape[1], device=layout_range.device)[None, :, None]
    return torch.where(inside, ranks, -1).amax(1)
