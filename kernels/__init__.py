"""Kernel backends by name: `reference` always works; `triton` and `native` only
on CUDA and only after a start-up self-test against `reference` passes.

A backend is a module-like object exposing the reference module's functions
(per_token_group_quant_fp8, per_block_quant_fp8, dequant_block, fp8_gemm_nt,
linear, grouped_linear, mla_prefill, mla_decode). `auto` picks the best one
that passes; nothing here fails at import on a machine without a GPU.
"""
from __future__ import annotations

import importlib
import logging
from types import ModuleType

import torch

from epserve.errors import BackendUnavailable
from epserve.kernels import reference

log = logging.getLogger("epserve.kernels")

BACKENDS = ("reference", "triton", "native")
_PREFERENCE = ("native", "triton", "reference")
_chosen: dict[tuple[str, str], ModuleType] = {}


def _try_load(name: str, device: torch.device) -> tuple[ModuleType | None, str]:
    if name == "reference":
        return reference, "always available"
    if device.type != "cuda" or not torch.cuda.is_available():
        return None, "needs CUDA"
    try:
        mod = importlib.import_module(f"epserve.kernels.{name}")
    except Exception as exc:  # any import failure means unavailable, never a crash
        return None, f"import failed: {exc!r}"
    try:
        ok, why = mod.self_test(device)
    except Exception as exc:
        return None, f"self-test raised {exc!r}"
    return (mod, why) if ok else (None, f"self-test failed: {why}")


def get_backend(name: str = "auto", device: torch.device | str = "cpu") -> ModuleType:
    """Return the kernel backend for `name` on `device`; logs the choice once."""
    device = torch.device(device)
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"kernels: {name!r} is not a backend; choose one of auto, {', '.join(BACKENDS)}")
    key = (name, device.type)
    if key in _chosen:
        return _chosen[key]
    if name == "auto":
        reasons = []
        for cand in _PREFERENCE:
            mod, why = _try_load(cand, device)
            if mod is not None:
                log.info("kernels: auto picked %s on %s (%s; skipped: %s)", cand, device,
                         why, "; ".join(reasons) or "none")
                _chosen[key] = mod
                return mod
            reasons.append(f"{cand}: {why}")
    mod, why = _try_load(name, device)
    if mod is None:
        raise BackendUnavailable(f"kernels: {name} cannot run on {device}: {why}")
    _chosen[key] = mod
    return mod
