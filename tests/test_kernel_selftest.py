"""kernels/selftest.py, the one start-up self-test of every backend: each check passes reference
against itself, fails a backend that is off by more than the op's tolerance (naming the op), never
raises, and the backends declare only ops it checks. The checks on real kernels run on a GPU
(tests/test_triton_backend.py, tests/test_gpu_hot_path.py)."""
from __future__ import annotations

import types

import pytest
import torch

from epserve.kernels import native, reference, selftest
from epserve.kernels import triton as kt

F32 = torch.float32
SMALL = {   # CPU-sized case tables, in each table's format (selftest.py's comments)
    "per_token_group_quant_fp8": ((3, 300),),
    "fp8_gemm_nt": ((5, 256, 128), (3, 200, 130)),
    "linear": (((2, 3), 256, 128, ("fp8-act", "fp8", "dense"), False), ((4,), 256, 128, ("fp8-act",), True)),
    "grouped_linear": ((20, 3, 256, 128),),
    "expert_ffn": ((20, 3, 256, 128),),
    "expert_ffn_masked": ((3, 256, 128, 8, 4),),
    "mla_decode": ((F32, 4, 32, 8, (3, 70, 0), 1), (F32, 4, 32, 8, (5, 90), 2)),
    "mla_prefill": ((8, 8), (4, 12)),
    "combine_rows": ((5, 8, 64),),
    "route_topk": ((7, 16, 4, 2, 4),),
    "rms_norm": ((4, 64, 80), (0, 64, 64)),
    "swiglu_linear": ((3, 128, 128),),
    "mla_rope_latent": ((F32, 3, 2, 32, 8, True), (F32, 2, 3, 16, 8, False)),
    "add_rms_norm": ((4, 64, 80), (0, 64, 64)),
}


def _unrotated(q_pe, kv, cos, sin, w, eps, inter, cache, slots, out=None):
    """mla_rope_latent with the query's rotation left out."""
    reference.mla_rope_latent(q_pe, kv, cos, sin, w, eps, inter, cache, slots)
    return q_pe if out is None else out.copy_(q_pe)


def _backend(**ops):
    """reference with some ops replaced."""
    return types.SimpleNamespace(**{**{k: getattr(reference, k) for k in dir(reference)}, **ops})


def test_every_op_check_passes_reference_against_itself():
    assert set(SMALL) == set(selftest.CHECKS)
    ok, why = selftest.run(reference, "cpu", {op: selftest.Op(cases=c) for op, c in SMALL.items()})
    assert ok, why
    assert why.count(";") == len(SMALL) - 1          # one summary per op


@pytest.mark.parametrize("op, broken, message", [
    ("linear", lambda x, w: reference.linear(x, w) * 1.01, "linear"),
    ("route_topk", lambda *a, **kw: (lambda w, i: (w, (i + 1) % 16))(*reference.route_topk(*a, **kw)),
     "chose other experts"),
    ("mla_prefill", lambda q, k, v, s: reference.mla_prefill(q, k, v, s)[:, :, :-1], "RuntimeError"),
    ("mla_rope_latent", _unrotated, "mla_rope_latent"),
])
def test_a_backend_off_by_more_than_the_tolerance_fails_naming_the_op(op, broken, message):
    ok, why = selftest.run(_backend(**{op: broken}), "cpu", {op: selftest.Op(cases=SMALL[op])})
    assert ok is False and message in why, why


def test_an_op_specific_tolerance_replaces_the_default():
    off = _backend(linear=lambda x, w: reference.linear(x, w) * 1.01)    # calc_diff ~5e-5
    cases = SMALL["linear"]
    assert selftest.run(off, "cpu", {"linear": selftest.Op(cases=cases)})[0] is False
    assert selftest.run(off, "cpu", {"linear": selftest.Op(tol={"calc_diff": 1e-3}, cases=cases)})[0] is True


@pytest.mark.parametrize("backend", [kt, native], ids=["triton", "native"])
def test_backends_declare_only_ops_the_harness_checks_and_they_provide(backend):
    assert backend.SELF_TEST and set(backend.SELF_TEST) <= set(selftest.CHECKS)
    for op in backend.SELF_TEST:
        assert callable(getattr(backend, op)), op
