"""Reference kernel semantics: FP8 block quantisation, GEMMs, MLA attention forms, backend choice."""
from __future__ import annotations

import logging

import pytest
import torch

from epserve import kernels
from epserve.kernels import reference as ref
from epserve.kernels.selftest import calc_diff


def test_fp8_gemm_close_to_float_and_equal_to_dequantized_promotion():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 384, generator=g), torch.randn(256, 384, generator=g)
    aq, as_ = ref.per_token_group_quant_fp8(a)
    bq, bs = ref.per_block_quant_fp8(b)
    assert aq.dtype == torch.float8_e4m3fn and as_.shape == (64, 3) and bs.shape == (2, 3)
    out = ref.fp8_gemm_nt(aq, as_, bq, bs)
    assert calc_diff(out, a @ b.t()) < 1e-3
    deq = (aq.float() * as_.repeat_interleave(128, 1)) @ ref.dequant_block(bq, bs).t()
    assert calc_diff(out, deq) < 1e-10


def test_block_quant_handles_ragged_edges_and_zero_tiles():
    w = torch.zeros(130, 200)
    w[129, 199] = 3.0
    q, s = ref.per_block_quant_fp8(w)
    assert s.shape == (2, 2)
    back = ref.dequant_block(q, s)
    assert torch.equal(back, w)


def test_grouped_linear_matches_per_group_and_zeroes_padding_rows():
    g = torch.Generator().manual_seed(1)
    ws = [ref.Weight(torch.randn(8, 16, generator=g)) for _ in range(3)]
    x = torch.randn(7, 16, generator=g)
    ids = torch.tensor([2, 0, -1, 1, 2, 0, -1])
    out = ref.grouped_linear(x, ws, ids)
    for m in range(7):
        want = torch.zeros(8) if ids[m] < 0 else x[m] @ ws[ids[m]].w.t()
        assert torch.allclose(out[m], want, atol=1e-6)


def test_absorbed_decode_equals_naive_attention():
    g = torch.Generator().manual_seed(2)
    h, p, r, v, lat, n = 4, 16, 8, 16, 32, 70
    w_uk, w_uv = torch.randn(h, p, lat, generator=g), torch.randn(h, v, lat, generator=g)
    cache = torch.randn(n, lat + r, generator=g)
    q_nope, q_pe = torch.randn(h, p, generator=g), torch.randn(h, r, generator=g)
    scale = (p + r) ** -0.5
    # naive: expand latents into per-head keys/values
    k = torch.cat([torch.einsum("sl,hpl->shp", cache[:, :lat], w_uk), cache[:, None, lat:].expand(-1, h, -1)], -1)
    vals = torch.einsum("sl,hvl->shv", cache[:, :lat], w_uv)
    naive = ref.mla_prefill(torch.cat([q_nope, q_pe], -1)[None], k, vals, scale)[0]
    # absorbed, over a paged cache with scattered pages
    pages = torch.zeros(4, 64, lat + r)
    table = torch.tensor([[3, 1]])
    pages[3], pages[1, : n - 64] = cache[:64], cache[64:]
    q = torch.cat([torch.einsum("hp,hpl->hl", q_nope, w_uk), q_pe], -1)[None]
    o_lat, lse = ref.mla_decode(q, pages, table, torch.tensor([n]), scale, lat)
    absorbed = torch.einsum("hl,hvl->hv", o_lat[0], w_uv)
    assert torch.allclose(absorbed, naive, atol=1e-4, rtol=1e-4)
    assert torch.isfinite(lse).all()


def test_auto_falls_back_to_reference_without_cuda(caplog):
    kernels._chosen.clear()
    with caplog.at_level(logging.INFO, logger="epserve.kernels"):
        kb = kernels.get_backend("auto", "cpu")
    assert kb is ref
    assert sum("auto picked reference" in r.message for r in caplog.records) == 1


def test_forced_gpu_backend_on_cpu_is_a_clear_error():
    with pytest.raises(kernels.BackendUnavailable, match="triton cannot run on cpu: needs CUDA"):
        kernels.get_backend("triton", "cpu")
    with pytest.raises(ValueError, match="'cuda-magic' is not a backend"):
        kernels.get_backend("cuda-magic", "cpu")


def test_combine_rows_sums_each_tokens_rows_and_never_reads_a_dropped_one():
    """The MoE combine's reduction: out[t] = sum_k w[t, k] * y[rows[t*K + k]]; a dropped pair (-1)
    adds nothing even where its row holds garbage (NaN), and rows=None means row t*K + k."""
    from epserve.kernels.reference import combine_rows
    g = torch.Generator().manual_seed(3)
    t, k, d = 4, 3, 5
    y = torch.randn(t * k + 1, d, generator=g)
    w = torch.rand(t, k, generator=g)
    rows = torch.tensor([12, 0, 1, -1, 2, 3, 4, -1, -1, 5, 6, 7])
    garbage = y.clone()
    garbage[8:12] = float("nan")            # rows no live pair points at
    want = torch.stack([sum((w[i, j] * y[rows[i * k + j]] for j in range(k) if rows[i * k + j] >= 0),
                            torch.zeros(d)) for i in range(t)])
    assert torch.allclose(combine_rows(garbage, w, rows), want, atol=1e-6)
    plain = torch.stack([sum(w[i, j] * y[i * k + j] for j in range(k)) for i in range(t)])
    assert torch.allclose(combine_rows(y, w), plain, atol=1e-6)
