"""Rotary position embedding as DeepSeek-V3 applies it to the 64 rope dims of MLA's queries and
keys: the inverse frequencies (YaRN-extended when the checkpoint says so); the rotation itself is
kernels/reference.py's apply_rope, which the backends' fused kernels match.
`args` is model/deepseek_v3.py's ModelArgs (read for its rope fields only).
"""
from __future__ import annotations

import math

import torch


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_inv_freq(args) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [R/2] and the cos/sin attention factor (YaRN when configured)."""
    dim, base = args.qk_rope_head_dim, args.rope_theta
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if args.rope_type != "yarn":
        return freqs, 1.0

    def corr_dim(n_rot: float) -> float:
        return dim * math.log(args.original_max_position_embeddings / (n_rot * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(corr_dim(args.beta_fast)), 0)
    high = min(math.ceil(corr_dim(args.beta_slow)), dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / ((high - low) or 0.001)).clamp(0, 1)
    extrapolate = 1 - ramp
    freqs = freqs / args.rope_factor * (1 - extrapolate) + freqs * extrapolate
    if args.mscale and args.mscale_all_dim:
        factor = yarn_mscale(args.rope_factor, args.mscale) / yarn_mscale(args.rope_factor, args.mscale_all_dim)
    else:
        factor = yarn_mscale(args.rope_factor)
    return freqs, factor
