"""Triton for the `triton` backend's kernel files, or a stand-in that keeps them importable.

Without triton (CPU CI) the modules still import: `_jit` wraps each kernel in an object that
raises on launch, `_const` is the identity, and the pure planning helpers stay testable.
Also the launch helpers the kernel files share. Never: holds a kernel or picks a backend.
"""
from __future__ import annotations

import functools

import torch

try:
    import triton
    import triton.language as tl
    _jit, _const = triton.jit, tl.constexpr
except ImportError:  # no triton: keep the module importable, fail on first kernel use
    triton = tl = None

    class _Missing:
        def __getitem__(self, grid):
            raise RuntimeError("kernels.triton: triton is not importable here")

    def _jit(fn):
        return _Missing()

    def _const(v):
        return v

BLOCK = 128       # quantisation block: 1x128 activations, 128x128 weights
# The decode hot path's fused ops (FUSED, kernels/triton.py) whose own start-up check failed on this
# machine: their wrappers take the unfused path (selftest.gate fills it; the rest of the backend stays on)
OFF: set[str] = set()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@functools.lru_cache(maxsize=8)
def _n_sm(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
