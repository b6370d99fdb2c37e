"""Draft acceptance for MTP decoding: pure tensor functions, batched, on the logits' device, no host sync.

One rule serves greedy and sampled requests (Leviathan et al. 2023, Chen et al. 2023): draft j of a
row is accepted with probability min(1, p_j(d_j) / q_j(d_j)); at the first rejection the token is
drawn from norm(max(0, p_j - q_j)); when every draft is accepted a bonus token is drawn from p_k.
Every emitted token is then distributed exactly as the target's p (the tests check it). Greedy rows
have one-hot p and q (temperature 0), so the rule reduces to "accept while the draft equals the
target's argmax, then emit the argmax": MTP greedy output equals plain greedy output token for token.

Shape legend: B rows (sequences), k drafts per row, S = k + 1 target positions, V vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingRows:
    """The sampler's per-row knobs as tensors [B] (temperature 0: greedy)."""

    temperature: torch.Tensor      # fp32
    top_k: torch.Tensor            # int64, V when off
    top_p: torch.Tensor            # fp32
    min_p: torch.Tensor            # fp32

    @classmethod
    def of(cls, params: list, vocab: int, device) -> "SamplingRows":
        t = torch.tensor([[0.0 if p.is_greedy else p.temperature, p.top_k if p.top_k > 0 else vocab, p.top_p,
                           p.min_p] for p in params], dtype=torch.float64).to(device)
        return cls(t[:, 0].float(), t[:, 1].long(), t[:, 2].float(), t[:, 3].float())

    def repeat(self, n: int) -> "SamplingRows":
        """Each row n times (one per position of the row)."""
        return SamplingRows(*(x.repeat_interleave(n) for x in (self.temperature, self.top_k, self.top_p, self.min_p)))


def target_probs(logits: torch.Tensor, rows: SamplingRows) -> torch.Tensor:
    """logits fp32 [N, V] -> the distribution the sampler draws from [N, V]: temperature, min-p,
    top-k and top-p as model/sampling.py's `sample` applies them; greedy rows one-hot at the argmax."""
    n, v = logits.shape
    greedy = rows.temperature == 0
    x = logits.float() / torch.where(greedy, torch.ones_like(rows.temperature), rows.temperature)[:, None]
    probs = x.softmax(-1)
    x = x.masked_fill(probs < rows.min_p[:, None] * probs.max(-1, keepdim=True).values, float("-inf"))
    sv, si = x.sort(-1, descending=True)
    keep = torch.arange(v, device=x.device)[None, :] < rows.top_k[:, None]
    p = sv.masked_fill(~keep, float("-inf")).softmax(-1)
    keep &= (p.cumsum(-1) - p) <= rows.top_p[:, None]
    p = torch.zeros_like(x).scatter_(1, si, sv.masked_fill(~keep, float("-inf")).softmax(-1))
    onehot = torch.zeros_like(p).scatter_(1, logits.argmax(-1, keepdim=True), 1.0)
    return torch.where(greedy[:, None], onehot, p)


def draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token per row of probs [N, V] (need not be normalised) by inverse CDF at u [N] in [0, 1)."""
    c = probs.double().cumsum(-1)
    return torch.searchsorted(c, (u.double() * c[:, -1])[:, None], right=True)[:, 0].clamp_(max=probs.shape[-1] - 1)


def accept_drafts(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, n_draft: torch.Tensor,
                  u_accept: torch.Tensor, u_draw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The speculative-sampling rule.

    p [B, S, V] target distributions at the S positions; q [B, k, V] the distributions the drafts
    were drawn from; drafts [B, k] int64; n_draft [B] drafts present per row (<= k; the rest are
    padding); u_accept [B, k], u_draw [B, S] uniforms in [0, 1).
    -> (tokens [B, S]: the row's emitted tokens are tokens[b, :n_accept[b] + 1]; n_accept [B]).
    """
    b, s, v = p.shape
    k = s - 1
    j = torch.arange(k, device=p.device)
    pd = p[:, :k].gather(2, drafts[..., None])[..., 0]
    qd = q.gather(2, drafts[..., None])[..., 0]
    ok = (u_accept * qd < pd) & (j[None, :] < n_draft[:, None])     # u < p/q without dividing by q = 0
    n_accept = ok.int().cumprod(1).sum(1)                             # drafts accepted before the first reject
    rejected = n_accept < n_draft
    at = n_accept[:, None, None].expand(-1, 1, v)
    p_at = p.gather(1, at)[:, 0]                                      # [B, V] target at the first open position
    q_pad = torch.cat([q, torch.zeros_like(q[:, :1])], 1)
    residual = torch.where(rejected[:, None], (p_at - q_pad.gather(1, at)[:, 0]).clamp_min(0), p_at)
    # p == q on the support makes the residual all zero (acceptance was then certain); keep p there
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_at)
    last = draw(residual, u_draw.gather(1, n_accept[:, None])[:, 0])
    tokens = torch.cat([drafts, drafts[:, :1]], 1).scatter(1, n_accept[:, None], last[:, None])
    return tokens, n_accept


def greedy_accept(target: torch.Tensor, drafts: torch.Tensor, n_draft: torch.Tensor) -> torch.Tensor:
    """target [B, S] argmax tokens, drafts [B, k] -> n_accept [B]: the rule for greedy rows, which emit
    target[b, :n_accept + 1] (what accept_drafts gives with one-hot p and q, without the [B, S, V] work)."""
    k = drafts.shape[1]
    ok = (target[:, :k] == drafts) & (torch.arange(k, device=drafts.device)[None, :] < n_draft[:, None])
    return ok.int().cumprod(1).sum(1)

