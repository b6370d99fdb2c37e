"""Reference kernels in plain torch: the semantics every backend must match.

Owns: FP8 block quantisation (e4m3, 1x128 activation scales, 128x128 weight
scales, dequant multipliers as in DeepSeek's `weight_scale_inv`), dense and
grouped GEMMs on those layouts, and MLA attention (naive prefill, absorbed
paged decode). Runs on any device; computes in float32 internally.
Never: import Ray, hold state, or pick a backend (kernels/__init__.py does).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
AMAX_FLOOR = 1e-4  # DeepGEMM per_token_cast_to_fp8 / DeepEP kFP8Margin


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D] / rms(x) * weight: normalised in fp32, rounded to x's dtype, then weighted."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def add_rms_norm(h: torch.Tensor, dx: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual stream's update and the next sublayer's norm: (h + dx, rms_norm(h + dx))."""
    h = h + dx
    return h, rms_norm(h, weight, eps)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """x [T, ..., R] rotated by per-token angles; cos/sin [T, R/2] broadcast over the middle dims.

    Interleaved (DeepSeek's layout): pairs (x0, x1), (x2, x3) ... share one frequency.
    """
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[-1],)
    cos, sin = cos.view(shape), sin.view(shape)
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1).flatten(-2)
    x1, x2 = x.chunk(2, -1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1)


def mla_rope_latent(q_pe: torch.Tensor, kv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    kv_norm: torch.Tensor, eps: float, interleave: bool, flat_cache: torch.Tensor,
                    slots: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """MLA's per-token work between its down projection and core attention: the new latents
    [rms_norm(c_kv) * kv_norm, rope(k_pe)] written to flat_cache[slots, :L + R] (kv [T, L + R]),
    and the rotated query rope part q_pe [T, H, R] -> written into `out` (a view, e.g. the absorbed
    query's last R columns) or a new tensor; returned."""
    r = q_pe.shape[-1]
    c_kv, k_pe = kv.split([kv.shape[-1] - r, r], -1)
    latent = torch.cat([rms_norm(c_kv, kv_norm, eps), apply_rope(k_pe, cos, sin, interleave)], -1)
    flat_cache[:, : kv.shape[-1]][slots] = latent.to(flat_cache.dtype)
    q = apply_rope(q_pe, cos, sin, interleave)
    if out is None:
        return q
    out.copy_(q)
    return out


def per_token_group_quant_fp8(x: torch.Tensor, group: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (q fp8 [..., K], s fp32 [..., ceil(K/group)]), x ~= q * s per group."""
    k = x.shape[-1]
    n_groups = math.ceil(k / group)
    pad = n_groups * group - k
    xf = F.pad(x.float(), (0, pad)) if pad else x.float()
    xg = xf.unflatten(-1, (n_groups, group))
    s = xg.abs().amax(-1).clamp(min=AMAX_FLOOR) / FP8_MAX
    q = (xg / s.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.flatten(-2)[..., :k], s


def per_block_quant_fp8(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (q fp8 [N, K], s fp32 [ceil(N/b), ceil(K/b)]), edges zero-padded."""
    n, k = w.shape
    nb, kb = math.ceil(n / block), math.ceil(k / block)
    wp = F.pad(w.float(), (0, kb * block - k, 0, nb * block - n))
    tiles = wp.view(nb, block, kb, block)
    s = tiles.abs().amax(dim=(1, 3)).clamp(min=AMAX_FLOOR) / FP8_MAX
    q = (tiles / s[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.view(nb * block, kb * block)[:n, :k].contiguous(), s


def dequant_block(q: torch.Tensor, s: torch.Tensor, block: int = 128) -> torch.Tensor:
    """(q fp8 [N, K], s [ceil(N/b), ceil(K/b)]) -> float32 [N, K]: W = q * s per block."""
    n, k = q.shape
    full = s.float().repeat_interleave(block, 0)[:n].repeat_interleave(block, 1)[:, :k]
    return q.float() * full


def fp8_gemm_nt(a_q: torch.Tensor, a_s: torch.Tensor, b_q: torch.Tensor, b_s: torch.Tensor,
                out_dtype: torch.dtype = torch.float32, block: int = 128) -> torch.Tensor:
    """out[m, n] = sum_kb (sum_{k in kb} a*b) * a_s[m, kb] * b_s[n // 128, kb].

    a_q [M, K] fp8 with a_s [M, K/128]; b_q [N, K] fp8 with b_s [N/128, K/128].
    Promotion per 128-wide K block mirrors DeepGEMM; on CPU it equals
    dequantise-then-matmul, which is how it is computed here.
    """
    k = a_q.shape[-1]
    a = a_q.float() * a_s.float().repeat_interleave(block, -1)[..., :k]
    return (a @ dequant_block(b_q, b_s, block).t()).to(out_dtype)


class Weight:
    """A Linear weight: float [N, K], or FP8 [N, K] with 128x128 dequant scales.

    `act_quant` makes FP8 GEMMs quantise activations 1x128 as the seed does;
    without it FP8 weights are dequantised on use (weight-only FP8).
    """

    __slots__ = ("w", "scale", "act_quant")

    def __init__(self, w: torch.Tensor, scale: torch.Tensor | None = None, act_quant: bool = False):
        self.w, self.scale, self.act_quant = w, scale, act_quant

    @property
    def is_fp8(self) -> bool:
        return self.scale is not None

    @property
    def shape(self) -> torch.Size:
        return self.w.shape

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        return dequant_block(self.w, self.scale).to(dtype) if self.is_fp8 else self.w.to(dtype)

    def nbytes(self) -> int:
        n = self.w.numel() * self.w.element_size()
        return n + (self.scale.numel() * 4 if self.is_fp8 else 0)


def stack_rows(*weights: Weight) -> tuple[Weight, tuple[Weight, ...]] | None:
    """Weights that read the same input, stacked along N so one GEMM (one activation quantisation,
    one launch) computes them all: -> (stacked [sum N, K], each part as a view of it), or None when
    they cannot share one GEMM (different K, kinds or dtypes; an FP8 part other than the last whose N
    is not a whole number of 128-row scale blocks). Splitting the stacked output gives each part's
    output: rows are independent, and FP8 parts keep their own 128x128 scale blocks."""
    first = weights[0]
    same = all(w.shape[1] == first.shape[1] and w.is_fp8 == first.is_fp8 and w.act_quant == first.act_quant
               and w.w.dtype == first.w.dtype and w.w.device == first.w.device for w in weights)
    if not same or (first.is_fp8 and any(w.shape[0] % 128 for w in weights[:-1])):
        return None
    stacked = Weight(torch.cat([w.w for w in weights]),
                     torch.cat([w.scale for w in weights]) if first.is_fp8 else None, first.act_quant)
    parts, row, blk = [], 0, 0
    for w in weights:
        n = w.shape[0]
        scale = stacked.scale[blk: blk + math.ceil(n / 128)] if first.is_fp8 else None
        parts.append(Weight(stacked.w[row: row + n], scale, first.act_quant))
        row, blk = row + n, blk + (math.ceil(n / 128) if first.is_fp8 else 0)
    return stacked, tuple(parts)


def linear_with(quant, gemm):
    """A backend's `linear` from its 1x128 quantiser and FP8 GEMM (the three cases are the same everywhere)."""
    def linear(x: torch.Tensor, weight: Weight) -> torch.Tensor:
        """x [..., K] @ W[N, K]^T -> [..., N] in x's dtype."""
        if not weight.is_fp8:
            return F.linear(x, weight.w)
        if weight.act_quant:
            q, s = quant(x.reshape(-1, x.shape[-1]))
            return gemm(q, s, weight.w, weight.scale, x.dtype).view(*x.shape[:-1], weight.shape[0])
        return F.linear(x, weight.dense(x.dtype))
    return linear


linear = linear_with(per_token_group_quant_fp8, fp8_gemm_nt)


def swiglu_linear_with(linear_fn):
    """A backend's `swiglu_linear` from its `linear`: the MLP's second half, unfused."""
    def swiglu_linear(h13: torch.Tensor, w2: Weight) -> torch.Tensor:
        """h13 [..., 2I] (gate | up) -> (silu(gate) * up) @ W2^T [..., D] in h13's dtype."""
        gate, up = h13.chunk(2, -1)
        return linear_fn(F.silu(gate) * up, w2)
    return swiglu_linear


swiglu_linear = swiglu_linear_with(linear)


class ExpertWeights:
    """One rank's routed-expert slots of one layer, stacked so a grouped kernel reads one tensor.

    w13 [G, 2I, D]: each slot's gate rows (w1) then its up rows (w3); w2 [G, D, I]. FP8 weights
    carry 128x128 dequant scales s13 [G, 2 * ceil(I/128), ceil(D/128)] (w1's blocks, then w3's)
    and s2 [G, ceil(D/128), ceil(I/128)]. Live EPLB copies a new expert into its slot in place,
    so the tensors (and the CUDA graphs that captured them) stay the same.
    """

    def __init__(self, w13: torch.Tensor, w2: torch.Tensor, s13: torch.Tensor | None = None,
                 s2: torch.Tensor | None = None, act_quant: bool = False):
        self.w13, self.w2, self.s13, self.s2, self.act_quant = w13, w2, s13, s2, act_quant
        self.inter = w2.shape[-1]
        self._views = None

    @classmethod
    def empty(cls, n_slots: int, inter: int, dim: int, like: Weight, device) -> "ExpertWeights":
        """Uninitialised slots in the storage kind of `like` (an FP8 or float expert weight)."""
        w13 = torch.empty(n_slots, 2 * inter, dim, dtype=like.w.dtype, device=device)
        w2 = torch.empty(n_slots, dim, inter, dtype=like.w.dtype, device=device)
        if not like.is_fp8:
            return cls(w13, w2)
        nb = lambda n: -(-n // 128)  # noqa: E731
        s13 = torch.empty(n_slots, 2 * nb(inter), nb(dim), dtype=torch.float32, device=device)
        s2 = torch.empty(n_slots, nb(dim), nb(inter), dtype=torch.float32, device=device)
        return cls(w13, w2, s13, s2, like.act_quant)

    @classmethod
    def random_fp8(cls, n_slots: int, inter: int, dim: int, device, g: torch.Generator) -> "ExpertWeights":
        """Random FP8 slots with 128x128 scales at these widths (the start-up self-tests' experts)."""
        like = Weight(torch.zeros(1, 1, dtype=FP8), torch.ones(1, 1), act_quant=True)
        ex = cls.empty(n_slots, inter, dim, like, device)
        for j in range(n_slots):
            w1, w3 = (Weight(*per_block_quant_fp8(torch.randn(inter, dim, generator=g, device=device) / dim ** 0.5),
                             True) for _ in range(2))
            w2 = Weight(*per_block_quant_fp8(torch.randn(dim, inter, generator=g, device=device) / inter ** 0.5), True)
            ex.set_slot(j, w1, w3, w2)
        return ex

    @property
    def n_slots(self) -> int:
        return self.w13.shape[0]

    @property
    def is_fp8(self) -> bool:
        return self.s13 is not None

    def set_slot(self, j: int, w1: Weight, w3: Weight, w2: Weight) -> None:
        """Copy one expert's three weights into slot j (in place)."""
        i = self.inter
        self.w13[j, :i].copy_(w1.w)
        self.w13[j, i:].copy_(w3.w)
        self.w2[j].copy_(w2.w)
        if self.is_fp8:
            b = self.s13.shape[1] // 2
            self.s13[j, :b].copy_(w1.scale)
            self.s13[j, b:].copy_(w3.scale)
            self.s2[j].copy_(w2.scale)

    def slot(self, j: int) -> dict[str, Weight]:
        """Views of slot j as the three Weights {w1, w3, w2} (no copy)."""
        i = self.inter
        if not self.is_fp8:
            return {"w1": Weight(self.w13[j, :i]), "w3": Weight(self.w13[j, i:]), "w2": Weight(self.w2[j])}
        b = self.s13.shape[1] // 2
        return {"w1": Weight(self.w13[j, :i], self.s13[j, :b], self.act_quant),
                "w3": Weight(self.w13[j, i:], self.s13[j, b:], self.act_quant),
                "w2": Weight(self.w2[j], self.s2[j], self.act_quant)}

    def lists(self) -> tuple[list[Weight], list[Weight], list[Weight]]:
        """(w1s, w3s, w2s): per-slot views for kernels that take one Weight per group."""
        if self._views is None:
            slots = [self.slot(j) for j in range(self.n_slots)]
            self._views = tuple([s[k] for s in slots] for k in ("w1", "w3", "w2"))
        return self._views

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.w13, self.w2, self.s13, self.s2) if t is not None)


def expert_ffn_with(grouped):
    """A backend's routed-expert SwiGLU FFN over contiguous rows, from its grouped GEMM."""
    def expert_ffn(x: torch.Tensor, experts: ExpertWeights, slot_ids: torch.Tensor) -> torch.Tensor:
        """x [M, D], slot_ids int [M] (-1: padding, gives 0) -> [M, D] = w2(silu(w1 x) * w3 x) per row's slot."""
        if isinstance(x, tuple):                  # FP8 rows as dispatched: this backend dequantises them
            q, s = x
            x = (q.float() * s.float().repeat_interleave(128, -1)[..., :q.shape[-1]]).to(torch.bfloat16)
        if x.shape[0] == 0 or experts.n_slots == 0:
            return torch.zeros_like(x)
        w1, w3, w2 = experts.lists()
        return grouped(F.silu(grouped(x, w1, slot_ids)) * grouped(x, w3, slot_ids), w2, slot_ids)
    return expert_ffn


def expert_ffn_masked_with(expert_ffn):
    """The masked-layout form from the contiguous one: rows past masked_m[g] give 0."""
    def expert_ffn_masked(x: torch.Tensor, experts: ExpertWeights, masked_m: torch.Tensor,
                          expected_m: int | None = None) -> torch.Tensor:
        """x [G, max_m, D], masked_m int [G] -> [G, max_m, D]; expected_m is a tuning hint."""
        g, max_m, d = x.shape
        rows = torch.arange(max_m, device=x.device)[None, :]
        ids = torch.where(rows < masked_m.to(x.device)[:, None], torch.arange(g, device=x.device)[:, None], -1)
        return expert_ffn(x.reshape(g * max_m, d), experts, ids.flatten()).view(g, max_m, d)
    return expert_ffn_masked


def grouped_linear(x: torch.Tensor, weights: list[Weight], group_ids: torch.Tensor) -> torch.Tensor:
    """Contiguous-layout grouped GEMM: row m uses weights[group_ids[m]]; -1 rows give 0.

    x [M, K], group_ids int64 [M] sorted or not -> [M, N].
    """
    n = weights[0].shape[0] if weights else 0
    out = x.new_zeros(x.shape[0], n)
    if x.shape[0] == 0:
        return out
    for g in torch.unique(group_ids).tolist():
        if g < 0:
            continue
        rows = (group_ids == g).nonzero(as_tuple=True)[0]
        out[rows] = linear(x[rows], weights[g])
    return out


expert_ffn = expert_ffn_with(grouped_linear)
expert_ffn_masked = expert_ffn_masked_with(expert_ffn)


def route_topk(logits: torch.Tensor, bias: torch.Tensor | None, k: int, n_groups: int = 1, topk_groups: int = 1,
               score_func: str = "sigmoid", noaux: bool = True, norm: bool = True, scale: float = 1.0
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-limited top-k routing of gate logits [T, E] (any float dtype; scored in fp32) ->
    (weights fp32 [T, k], expert ids int64 [T, k]): scores by sigmoid (or softmax); the choice adds
    the correction bias (noaux_tc); groups ranked by their top-2 choice sum (noaux) or max, the best
    topk_groups kept; the k best experts of those; their unbiased scores as weights, normalised if
    norm, times scale."""
    logits = logits.float()
    scores = logits.sigmoid() if score_func == "sigmoid" else logits.softmax(-1)
    choice = scores + bias if bias is not None and noaux else scores
    if n_groups > 1:
        grouped = choice.view(logits.shape[0], n_groups, logits.shape[1] // n_groups)
        group_scores = grouped.topk(2, -1)[0].sum(-1) if noaux else grouped.amax(-1)
        keep = group_scores.topk(topk_groups, -1, sorted=False)[1]
        mask = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
        choice = grouped.masked_fill(mask.unsqueeze(-1), float("-inf")).flatten(1)
    idx = choice.topk(k, -1, sorted=False)[1]
    weights = scores.gather(1, idx)
    if norm and k > 1:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * scale, idx


def combine_rows(y: torch.Tensor, weights: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """The MoE combine's reduction: y [R, D] expert outputs, weights [T, K], rows [T*K] int (the row
    of y holding pair (t, k); < 0: the pair was dropped, its row may hold garbage; None: row t*K+k)
    -> [T, D] in y's dtype, sum_k weights[t, k] * y[rows[t*K + k]], accumulated in float32."""
    t, k = weights.shape
    if rows is None:
        pairs = y[: t * k].float()
    else:
        pairs = torch.where((rows >= 0)[:, None], y[rows.clamp_min(0)].float(), 0.0)
    return (pairs.view(t, k, y.shape[1]) * weights.float().unsqueeze(-1)).sum(1).to(y.dtype)


def mla_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Naive-form MLA for one sequence's new tokens.

    q [Tq, H, Dqk], k [Tk, H, Dqk], v [Tk, H, Dv] with Tk >= Tq: the last Tq keys are
    the new tokens, so query i sees keys < Tk - Tq + i + 1. -> [Tq, H, Dv].
    """
    tq, tk = q.shape[0], k.shape[0]
    mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(diagonal=tk - tq)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", probs, v.float()).to(q.dtype)


def plan_mla_decode():
    """A per-step plan for mla_decode that every layer reuses (FlashMLA's tile schedule); this
    backend plans nothing."""
    return None


def multi_query_decode(decode, q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                       seq_lens: torch.Tensor, scale: float, v_dim: int, plan=None):
    """S query positions per sequence as B*S one-query rows: query i of sequence b sees keys
    < seq_lens[b] - S + i + 1 (KERNELS.md: tril(diagonal=L - S)), the same keys a plain decode
    step at that position sees. For kernels without an s_q > 1 form; no host sync."""
    b, s = q.shape[:2]
    lens = (seq_lens.to(torch.long)[:, None] - s + 1 + torch.arange(s, device=seq_lens.device)).flatten()
    out, lse = decode(q.flatten(0, 1), kv_cache, block_table.repeat_interleave(s, 0), lens.to(seq_lens.dtype),
                      scale, v_dim, plan)
    return out.view(b, s, *out.shape[1:]), lse.view(b, s, *lse.shape[1:])


def mla_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
               seq_lens: torch.Tensor, scale: float, v_dim: int, plan=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Absorbed MLA decode over a paged latent cache (FlashMLA's semantics).

    q [B, H, L+R] (latent-space query), kv_cache [P, page, L+R], block_table int [B, max_pages],
    seq_lens int [B] -> (out [B, H, v_dim] = softmax(q k^T * scale) @ kv[..., :v_dim],
    lse fp32 [B, H], natural log). q [B, S, H, L+R]: S query positions per sequence, causal among
    them (MTP verify) -> out [B, S, H, v_dim], lse [B, S, H].
    """
    if q.dim() == 4:
        return multi_query_decode(mla_decode, q, kv_cache, block_table, seq_lens, scale, v_dim, plan)
    b, h, _ = q.shape
    n_max = block_table.shape[1] * kv_cache.shape[1]
    kv = kv_cache[block_table].reshape(b, n_max, kv_cache.shape[-1]).float()   # pages gathered, padded
    scores = torch.einsum("bhd,bnd->bhn", q.float(), kv) * scale
    valid = torch.arange(n_max, device=q.device)[None, :] < seq_lens.to(q.device)[:, None]
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    lse = torch.logsumexp(scores, -1)
    probs = torch.nan_to_num(scores.softmax(-1))       # a zero-length row gives zeros, not NaN
    return torch.einsum("bhn,bnd->bhd", probs, kv[..., :v_dim]).to(q.dtype), lse
