"""The `triton` backend: reference.py's functions as Triton kernels on one CUDA GPU.

The module kernels/__init__.py loads by the name `triton`; its kernels live by noun in
  triton_quant.py    1x128 FP8 activation quantisation, SwiGLU fused with it
  triton_gemm.py     the block-FP8 GEMM, `linear`, the grouped expert GEMM (contiguous layout)
  triton_mla.py      absorbed MLA decode over the 64-token paged latent cache, prefill via SDPA
  triton_routing.py  the MoE gate's top-k and the combine's weighted sum
  triton_dsa.py      V3.2's indexer: its q/k work in one launch, its decode scores over the paged cache
  triton_jit.py      triton itself, or the stand-in that keeps all of them importable without it
and `self_test` runs kernels/selftest.py over the ops declared in SELF_TEST before the registry
uses it. Never: picks a backend or holds model state. Imports without triton (CPU CI tests the
pure planning helpers and the wrappers' preconditions); kernels then refuse.
"""
from __future__ import annotations

import logging
import sys

import torch

from epserve.kernels import selftest
from epserve.kernels.reference import ExpertWeights, Weight, dequant_block, per_block_quant_fp8, plan_mla_decode
from epserve.kernels.triton_gemm import (W_ALIGN, expert_ffn, expert_ffn_masked, fp8_gemm_nt, grouped_linear, linear,
                                         swiglu_linear,
                                         plan_group_tiles)
from epserve.kernels.triton_jit import BLOCK, OFF, triton
from epserve.kernels.triton_norm import add_rms_norm, rms_norm
from epserve.kernels.triton_mla import MLA_DECODE_CONFIG, mla_decode, mla_prefill, plan_kv_splits
from epserve.kernels.triton_quant import per_token_group_quant_fp8, quant_rows_fp8, silu_mul_quant_fp8
from epserve.kernels.triton_dsa import dsa_index_qk
from epserve.kernels.triton_latent import mla_rope_latent
from epserve.kernels.triton_routing import combine_rows, masked_route, route_topk

__all__ = ["per_token_group_quant_fp8", "per_block_quant_fp8", "dequant_block", "fp8_gemm_nt", "Weight",
           "ExpertWeights", "linear", "grouped_linear", "expert_ffn", "expert_ffn_masked", "silu_mul_quant_fp8",
           "mla_prefill", "plan_mla_decode", "mla_decode", "combine_rows", "route_topk", "self_test", "plan_kv_splits",
           "plan_group_tiles", "BLOCK", "W_ALIGN", "MLA_DECODE_CONFIG", "rms_norm", "swiglu_linear", "mla_rope_latent",
           "masked_route", "quant_rows_fp8", "add_rms_norm", "dsa_index_qk"]

# The ops with kernels of their own, each checked against reference.py with its default cases and
# tolerance (expert_ffn / expert_ffn_masked are reference's loops over grouped_linear).
SELF_TEST = {op: selftest.Op() for op in ("per_token_group_quant_fp8", "fp8_gemm_nt", "linear", "grouped_linear",
                                          "mla_decode", "mla_prefill", "combine_rows", "route_topk",
                                          "rms_norm")}
# The decode hot path's fused ops: each is checked on its own (selftest.gate), and one that fails on
# this machine is switched off (triton_jit.OFF: its callers take the unfused path), not the backend
FUSED = ("mla_rope_latent", "add_rms_norm", "masked_route", "quant_rows_fp8", "dsa_index_qk")
log = logging.getLogger("epserve.kernels.triton")


def self_test(device) -> tuple[bool, str]:
    """Every declared op once on seeded inputs (small and V3 shapes) against reference.py, then each
    FUSED op on its own (switched off here if it fails; logged). Never raises."""
    if triton is None:
        return False, "triton is not importable"
    if torch.device(device).type != "cuda":
        return False, "needs CUDA"
    ok, why = selftest.run(sys.modules[__name__], device, SELF_TEST)
    if not ok:
        return ok, why
    fused = selftest.gate(sys.modules[__name__], device, {op: selftest.Op() for op in FUSED}, OFF)
    for line in fused:
        (log.warning if " off (" in line else log.info)("kernels: fused %s", line)
    return True, f"{why}; fused ops off: {', '.join(sorted(OFF)) or 'none'}"
