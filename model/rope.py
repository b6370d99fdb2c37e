"""Rotary position embedding as DeepSeek-V3 applies it to the 64 rope dims of MLA's queries and
keys: the inverse frequencies (YaRN-extended when the checkpoint says so) and the rotation.
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
