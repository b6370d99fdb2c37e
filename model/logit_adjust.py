"""LogitAdjust: one step's changes to the logits before the draw, as per-row tensors.

Built by the rank (pipelines/sampler_state.py) from its requests' state and applied in one pass
by model/sampling.py's `sample`; rows that ask for nothing are not touched, and a step where no
row asks for anything builds no LogitAdjust at all. Definitions (OpenAI's and HF's):
  repetition r (prompt or produced tokens):  l = l / r if l > 0 else l * r
  frequency f, presence p (produced tokens): l = l - f * count - p * (count > 0)
  logit_bias b (per token id):               l = l + b
  grammar mask (bit j of word w allows token 32 w + j): l = -inf where not allowed
in that order, so neither a bias nor a penalty can revive a token the grammar forbids.
Never: reads request objects (tensors in, tensors out).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def unpack_bitmask(bits: torch.Tensor, n_vocab: int) -> torch.Tensor:
    """bits int32 [M, ceil(V / 32)] (llguidance's layout) -> allowed bool [M, V]."""
    shifts = torch.arange(32, device=bits.device, dtype=torch.int32)
    return ((bits.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)[:, :n_vocab]


def apply_penalties(x: torch.Tensor, counts: torch.Tensor, in_prompt: torch.Tensor, presence: torch.Tensor,
                    frequency: torch.Tensor, repetition: torch.Tensor) -> torch.Tensor:
    """x fp32 [P, V] logits of the penalised rows; counts [P, V] produced-token counts; in_prompt bool
    [P, V]; presence/frequency/repetition [P]. Returns the penalised logits [P, V]."""
    c = counts.to(x.dtype)
    seen = in_prompt | (c > 0)
    r = repetition[:, None].to(x.dtype)
    x = torch.where(seen, torch.where(x > 0, x / r, x * r), x)
    return x - frequency[:, None] * c - presence[:, None] * (c > 0).to(x.dtype)


@dataclass
class LogitAdjust:
    """Row indices are into the step's batch; every tensor is on the logits' device."""

    pen_rows: torch.Tensor | None = None      # [P] long
    counts: torch.Tensor | None = None        # [P, V] produced-token counts
    in_prompt: torch.Tensor | None = None     # [P, V] bool
    presence: torch.Tensor | None = None      # [P]
    frequency: torch.Tensor | None = None     # [P]
    repetition: torch.Tensor | None = None    # [P]
    bias_rows: torch.Tensor | None = None     # [K] long
    bias_ids: torch.Tensor | None = None      # [K] long
    bias_values: torch.Tensor | None = None   # [K]
    mask_rows: torch.Tensor | None = None     # [M] long
    mask_bits: torch.Tensor | None = None     # [M, ceil(V / 32)] int32

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """logits fp32 [B, V] -> adjusted logits [B, V] (a new tensor: the input may be a graph's output)."""
        x = logits.float().clone()
        if self.pen_rows is not None:
            r = self.pen_rows
            x[r] = apply_penalties(x[r], self.counts, self.in_prompt, self.presence, self.frequency, self.repetition)
        if self.bias_rows is not None:
            x.index_put_((self.bias_rows, self.bias_ids), self.bias_values.to(x.dtype), accumulate=True)
        if self.mask_rows is not None:
            # allowed tokens stay finite (a NaN or -inf logit would let the draw leave the grammar)
            allowed = unpack_bitmask(self.mask_bits, x.shape[1])
            rows = x[self.mask_rows].nan_to_num(nan=-1e30, posinf=1e30, neginf=-1e30)
            x[self.mask_rows] = rows.masked_fill(~allowed, float("-inf"))
        return x
