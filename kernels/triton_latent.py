"""MLA's per-token work between its down projection and core attention as one Triton kernel:
the new latent [rms_norm(c_kv) * kv_norm, rope(k_pe)] written into the paged cache, and the
query's rope part rotated into place (a decode step: the absorbed query's last R columns).

In torch that was about 20 launches a layer (two rotations of 7 elementwise kernels each, the
norm, the cat, the cache's index_put, the copy into the absorbed query), each as long as its
work at decode sizes, and paid again by each of a step's two micro-batches. Rounds as
reference.mla_rope_latent does: each elementwise product and sum of the rotation is rounded to the
tensor's dtype, as torch's bf16 ops round (the compiler may still contract them: the start-up check
allows two roundings of a row's largest value); the norm as kernels/triton_norm.py's.
Never: changes the math; falls back to reference for layouts it does not take.
"""
from __future__ import annotations

import torch

from epserve.kernels import reference
from epserve.kernels.triton_jit import OFF, _jit, _pow2, tl


@_jit
def _rope_latent_kernel(q, stride_qt, stride_qh, kv, stride_kv, cos, sin, stride_cs, w, cache, stride_c, slots,
                        out, stride_ot, stride_oh, H, eps, L: tl.constexpr, LP: tl.constexpr, R: tl.constexpr,
                        HP: tl.constexpr, INTERLEAVE: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    dt = out.dtype.element_ty
    half = tl.arange(0, R // 2)
    if INTERLEAVE:            # pairs (x0, x1), (x2, x3) ... share a frequency
        o1, o2 = 2 * half, 2 * half + 1
    else:                     # the two halves do
        o1, o2 = half, half + R // 2
    c = tl.load(cos + t * stride_cs + half).to(tl.float32)
    s = tl.load(sin + t * stride_cs + half).to(tl.float32)
    # the latent: RMSNorm of c_kv (fp32, rounded, then weighted in the dtype), the rotated k_pe
    cols = tl.arange(0, LP)
    ok = cols < L
    v = tl.load(kv + t * stride_kv + cols, mask=ok, other=0.0).to(tl.float32)
    n = (v * tl.rsqrt(tl.sum(v * v, axis=0) / L + eps)).to(dt).to(tl.float32)
    g = tl.load(w + cols, mask=ok, other=0.0).to(tl.float32)
    row = tl.load(slots + t).to(tl.int64) * stride_c
    tl.store(cache + row + cols, (n * g).to(dt).to(cache.dtype.element_ty), mask=ok)
    x1 = tl.load(kv + t * stride_kv + L + o1).to(tl.float32)
    x2 = tl.load(kv + t * stride_kv + L + o2).to(tl.float32)
    y1 = ((x1 * c).to(dt).to(tl.float32) - (x2 * s).to(dt).to(tl.float32)).to(dt)
    y2 = ((x2 * c).to(dt).to(tl.float32) + (x1 * s).to(dt).to(tl.float32)).to(dt)
    tl.store(cache + row + L + o1, y1.to(cache.dtype.element_ty))
    tl.store(cache + row + L + o2, y2.to(cache.dtype.element_ty))
    # the query's rope part, every head
    h = tl.arange(0, HP)[:, None]
    hm = h < H
    qa = q + t * stride_qt + h * stride_qh
    x1 = tl.load(qa + o1[None, :], mask=hm, other=0.0).to(tl.float32)
    x2 = tl.load(qa + o2[None, :], mask=hm, other=0.0).to(tl.float32)
    c, s = c[None, :], s[None, :]
    y1 = ((x1 * c).to(dt).to(tl.float32) - (x2 * s).to(dt).to(tl.float32)).to(dt)
    y2 = ((x2 * c).to(dt).to(tl.float32) + (x1 * s).to(dt).to(tl.float32)).to(dt)
    oa = out + t * stride_ot + h * stride_oh
    tl.store(oa + o1[None, :], y1, mask=hm)
    tl.store(oa + o2[None, :], y2, mask=hm)


def mla_rope_latent(q_pe: torch.Tensor, kv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    kv_norm: torch.Tensor, eps: float, interleave: bool, flat_cache: torch.Tensor,
                    slots: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """reference.mla_rope_latent in one launch (the module docstring)."""
    t, h, r = q_pe.shape
    ell = kv.shape[-1] - r
    if ("mla_rope_latent" in OFF or not q_pe.is_cuda or t == 0 or r % 2 or _pow2(r) != r or q_pe.dtype != kv.dtype
            or kv_norm.dtype != kv.dtype or cos.dtype != kv.dtype or q_pe.stride(-1) != 1 or kv.stride(-1) != 1
            or flat_cache.stride(-1) != 1 or cos.stride(-1) != 1 or sin.stride() != cos.stride()
            or sin.dtype != cos.dtype or slots.stride(0) != 1 or kv_norm.stride(-1) != 1
            or (out is not None and (out.stride(-1) != 1 or out.dtype != q_pe.dtype))):
        return reference.mla_rope_latent(q_pe, kv, cos, sin, kv_norm, eps, interleave, flat_cache, slots, out)
    if out is None:
        out = torch.empty(t, h, r, dtype=q_pe.dtype, device=q_pe.device)
    _rope_latent_kernel[(t,)](q_pe, q_pe.stride(0), q_pe.stride(1), kv, kv.stride(0), cos, sin, cos.stride(0),
                              kv_norm, flat_cache, flat_cache.stride(0), slots, out, out.stride(0), out.stride(1),
                              h, eps, L=ell, LP=_pow2(ell), R=r, HP=_pow2(h), INTERLEAVE=interleave, num_warps=4)
    return out
