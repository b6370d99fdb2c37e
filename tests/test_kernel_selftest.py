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


def test_a_fused_op_that_fails_its_check_is_switched_off_alone():
    """selftest.gate: each fused op on its own; the broken one goes into the off set, the sound one
    stays on (and a later pass takes it out of the set again)."""
    off = {"add_rms_norm"}
    ops = {"mla_rope_latent": selftest.Op(cases=SMALL["mla_rope_latent"]),
           "add_rms_norm": selftest.Op(cases=SMALL["add_rms_norm"])}
    lines = selftest.gate(_backend(mla_rope_latent=_unrotated), "cpu", ops, off)
    assert off == {"mla_rope_latent"}
    assert lines[0].startswith("mla_rope_latent off (") and lines[1].startswith("add_rms_norm on (")


INDEX_QK_SMALL = ((F32, 3, 4, 32, 16, False), (F32, 3, 4, 32, 16, True))


def test_the_indexer_qk_check_passes_its_contract_and_catches_an_unrotated_key():
    """dsa_index_qk's start-up check holds the fused kernel to kernels/reference_dsa.py's contract: the
    reference passes it, in float32, with and without the FP8 Hadamard round trip; a kernel that leaves
    the key's RoPE out fails it, naming the op."""
    from epserve.kernels import reference_dsa
    ops = {"dsa_index_qk": selftest.Op(cases=INDEX_QK_SMALL)}
    ok, why = selftest.run(types.SimpleNamespace(dsa_index_qk=reference_dsa.dsa_index_qk), "cpu", ops)
    assert ok, why

    def unrotated_key(q, k, cos, sin, *rest):
        out = reference_dsa.dsa_index_qk(q, k, cos, sin, *rest)
        reference_dsa.dsa_index_qk(q, k, torch.ones_like(cos), torch.zeros_like(sin), *rest)
        return out

    ok, why = selftest.run(types.SimpleNamespace(dsa_index_qk=unrotated_key), "cpu", ops)
    assert ok is False and "dsa_index_qk" in why and "key" in why, why


ROUTE_SMALL = ((37, 4, 16, 3, 24, 0, 24, 128, False), (50, 4, 16, 2, 32, 24, 8, 256, True))


def test_the_masked_route_oracle_agrees_with_the_torch_ops_and_catches_a_wrong_row():
    """The fused masked_route's start-up check compares it with a plain-Python oracle of the contract;
    the torch composition (what runs off CUDA) passes it, and a route that swaps two rows fails it."""
    from epserve.model.moe_dispatch import masked_route
    ok, why = selftest.run(types.SimpleNamespace(masked_route=masked_route), "cpu",
                           {"masked_route": selftest.Op(cases=ROUTE_SMALL)})
    assert ok, why

    def swapped(*args):
        src, rows, m = masked_route(*args)
        live = (rows >= 0).nonzero()[:2, 0]
        rows[live] = rows[live.flip(0)]
        return src, rows, m
    ok, why = selftest.run(types.SimpleNamespace(masked_route=swapped), "cpu", {"masked_route": selftest.Op(cases=ROUTE_SMALL)})
    assert not ok and "rows differ" in why


def test_quant_rows_check_wants_the_gathered_codes_exactly():
    def gathered(x, src, groups):
        q, s = reference.per_token_group_quant_fp8(x)
        return q[src].view(groups, -1, x.shape[1]), s[src].view(groups, -1, s.shape[1])
    cases = ((5, 256, 3, 8),)
    ns = types.SimpleNamespace(per_token_group_quant_fp8=reference.per_token_group_quant_fp8)
    ns.quant_rows_fp8 = gathered
    assert selftest.run(ns, "cpu", {"quant_rows_fp8": selftest.Op(cases=cases)}) == (True, "quant_rows ok")
    ns.quant_rows_fp8 = lambda x, src, groups: gathered(x * 1.5, src, groups)
    ok, why = selftest.run(ns, "cpu", {"quant_rows_fp8": selftest.Op(cases=cases)})
    assert not ok and "quant_rows_fp8" in why
