"""The `native` backend: DeepSeek's own kernels behind reference.py's interface, on Hopper.

Owns the adapters, each a wrapper that checks its preconditions and otherwise hands the op to
the triton backend (shapes DeepGEMM/FlashMLA do not take: K or N not 128/64-aligned, fp32
outputs, other page sizes, the tiny test models):
  DeepGEMM  fp8_gemm_nt (dense FP8 GEMM, bf16 out), m_grouped_fp8_gemm_nt_contiguous (prefill
            experts: rows sorted by slot, 128-aligned segments), m_grouped_fp8_gemm_nt_masked
            (decode experts: [G, max_m] buffers, counts on the device; CUDA-graph safe);
  FlashMLA  flash_mla_with_kvcache (absorbed MLA decode over the 64-token paged latent cache),
            its tile-scheduler metadata planned once per step and reused by every layer;
  prefill   attention for MLA's 192/128 head dims through the SDPA backend measured fastest at
            start-up (cuDNN, or flash with V padded to 192);
  Triton    (ours) 1x128 quantisation that writes scales in DeepGEMM's MN-major TMA-aligned
            layout, and SwiGLU fused with the quantisation between the two expert GEMMs.
`self_test` runs kernels/selftest.py over the adapters declared in SELF_TEST at V3 shapes;
kernels/__init__.py selects this backend only when it passes. Importing this module never
fails: without the libraries or CUDA the self-test says why.
Never: picks a backend or holds model state.
"""
from __future__ import annotations

import functools
import logging
import sys
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from epserve.kernels import native_dsa, reference, reference_dsa, selftest
from epserve.kernels import triton as kt
from epserve.kernels.layouts import contiguous_layout, empty_mn_major_scales
from epserve.kernels.reference import FP8, ExpertWeights, Weight, dequant_block, per_block_quant_fp8

log = logging.getLogger("epserve.kernels.native")

_IMPORT_ERRORS: dict[str, str] = {}
try:
    import deep_gemm
except Exception as exc:  # not installed, or its extension failed to load: the self-test reports it
    deep_gemm = None
    _IMPORT_ERRORS["deep_gemm"] = f"{type(exc).__name__}: {exc}"
try:
    import flash_mla
except Exception as exc:
    flash_mla = None
    _IMPORT_ERRORS["flash_mla"] = f"{type(exc).__name__}: {exc}"

__all__ = ["per_token_group_quant_fp8", "per_block_quant_fp8", "dequant_block", "fp8_gemm_nt", "Weight",
           "ExpertWeights", "linear", "grouped_linear", "expert_ffn", "expert_ffn_masked", "mla_prefill",
           "plan_mla_decode", "mla_decode", "swiglu_linear", "rms_norm", "self_test", "versions",
           "dsa_index_select", "dsa_paged_select", "sparse_mla", "mla_rope_latent", "masked_route",
           "quant_rows_fp8", "add_rms_norm", "dsa_index_qk"]

grouped_linear = kt.grouped_linear            # the list-of-weights form stays Triton's
combine_rows = kt.combine_rows                # the MoE combine's reduction: one Triton pass
rms_norm = kt.rms_norm                        # one Triton kernel per norm (kernels/triton_norm.py)
add_rms_norm = kt.add_rms_norm                # the residual add and the next norm: one Triton kernel
route_topk = kt.route_topk                    # the gate's routing: one Triton kernel per token
mla_rope_latent = kt.mla_rope_latent          # MLA's latent write and query rotation: one Triton kernel
masked_route = kt.masked_route                # a decode step's pairs into the masked layout: one Triton kernel
quant_rows_fp8 = kt.quant_rows_fp8            # the emulated rank's received rows, landed as FP8: one kernel
dsa_index_qk = kt.dsa_index_qk                # V3.2's indexer q/k work and key write: one Triton kernel
TAKES_FP8_ROWS = True                          # expert_ffn takes dispatched FP8 rows (q, s) without a dequantise
PREFILL_ATTENTION = {"backend": "flash-padded"}   # set by self_test from a measurement
DSA = {"native": False}   # set by self_test: V3.2's adapters passed their own check (else the reference runs)


def dsa_index_select(q, w, keys, lens, topk):
    """V3.2's indexer choice (kernels/reference_dsa.py's contract): DeepGEMM's MQA logits once checked."""
    return (native_dsa if DSA["native"] else reference_dsa).dsa_index_select(q, w, keys, lens, topk)


def dsa_paged_select(q, w, cache_layer, key_off, block_tables, lens, s_q, topk):
    """V3.2's decode indexer over the paged cache (reference_dsa's contract): the Triton scorer once checked."""
    return (native_dsa if DSA["native"] else reference_dsa).dsa_paged_select(q, w, cache_layer, key_off,
                                                                              block_tables, lens, s_q, topk)


def sparse_mla(q_lat, kv_rows, slots, scale, v_dim):
    """V3.2's sparse MLA (kernels/reference_dsa.py's contract): FlashMLA's sparse kernel once checked."""
    return (native_dsa if DSA["native"] else reference_dsa).sparse_mla(q_lat, kv_rows, slots, scale, v_dim)


def versions() -> dict:
    """Library versions for benchmark records."""
    return {"deep_gemm": getattr(deep_gemm, "__version__", None), "flash_mla": getattr(flash_mla, "__version__", None),
            "prefill_attention": PREFILL_ATTENTION["backend"]}


# ---------------------------------------------------------------- quantisation

def per_token_group_quant_fp8(x: torch.Tensor, group: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """reference's 1x128 quantisation; for 2-D x the scales come MN-major and TMA-aligned,
    so DeepGEMM reads them without a transpose (same values, other strides)."""
    return kt.per_token_group_quant_fp8(x, group, mn_major=x.dim() == 2 and group == 128)


# ---------------------------------------------------------------- dense FP8 GEMM

def _gemm_ok(m: int, n: int, k: int, out_dtype: torch.dtype) -> bool:
    return deep_gemm is not None and out_dtype == torch.bfloat16 and k % 128 == 0 and n % 64 == 0 and m > 0


def fp8_gemm_nt(a_q: torch.Tensor, a_s: torch.Tensor, b_q: torch.Tensor, b_s: torch.Tensor,
                out_dtype: torch.dtype = torch.float32, block: int = 128) -> torch.Tensor:
    """a_q [M, K] fp8 with a_s [M, K/128]; b_q [N, K] fp8 with b_s [N/128, K/128] -> [M, N].

    DeepGEMM for bf16 outputs at 128-aligned K (the model's GEMMs on GPU); Triton otherwise.
    """
    (m, k), n = a_q.shape, b_q.shape[0]
    if block != 128 or not _gemm_ok(m, n, k, out_dtype) or b_q.shape[1] != k:
        return kt.fp8_gemm_nt(a_q, a_s, b_q, b_s, out_dtype, block)
    d = torch.empty(m, n, dtype=torch.bfloat16, device=a_q.device)
    deep_gemm.fp8_gemm_nt((a_q, a_s.float()), (b_q, b_s.float()), d)
    return d


linear = reference.linear_with(per_token_group_quant_fp8, fp8_gemm_nt)


_swiglu_unfused = reference.swiglu_linear_with(linear)


def swiglu_linear(h13: torch.Tensor, w2: Weight) -> torch.Tensor:
    """h13 [T, 2I] bf16 (gate | up) -> silu(gate) * up @ W2^T [T, D]: the SwiGLU and its 1x128
    quantisation in one Triton pass (kt.silu_mul_quant_fp8, bf16 rounding as the unfused ops),
    straight into DeepGEMM; two kernels where silu, multiply, quantise and GEMM were four."""
    i = h13.shape[-1] // 2
    if not (w2.is_fp8 and w2.act_quant and h13.dim() == 2 and h13.dtype == torch.bfloat16
            and _gemm_ok(h13.shape[0], w2.shape[0], i, torch.bfloat16) and w2.shape[1] == i):
        return _swiglu_unfused(h13, w2)
    q, s = kt.silu_mul_quant_fp8(h13, mn_major=True)
    d = torch.empty(h13.shape[0], w2.shape[0], dtype=torch.bfloat16, device=h13.device)
    deep_gemm.fp8_gemm_nt((q, s), (w2.w, w2.scale.float()), d)
    return d


# ---------------------------------------------------------------- routed experts

def _experts_ok(x, experts: ExpertWeights) -> bool:
    dense_ok = isinstance(x, tuple) or x.dtype == torch.bfloat16
    rows = x[0] if isinstance(x, tuple) else x
    return (deep_gemm is not None and experts.is_fp8 and experts.act_quant and dense_ok
            and experts.inter % 128 == 0 and rows.shape[-1] % 128 == 0 and experts.n_slots > 0)


def _dequant_rows(x) -> torch.Tensor:
    """FP8 rows (q [.., D], s [.., D/128]) -> bf16, for the fallbacks (never on the V3 path)."""
    q, s = x
    return (q.float() * s.float().repeat_interleave(128, -1)[..., :q.shape[-1]]).to(torch.bfloat16)


def expert_ffn(x, experts: ExpertWeights, slot_ids: torch.Tensor) -> torch.Tensor:
    """x [M, D] bf16 or dispatched FP8 rows (q, s), slot_ids int [M] (-1 gives 0) -> [M, D] bf16:
    the contiguous layout for DeepGEMM.

    Rows are scattered into 128-aligned per-slot segments (on the device, no sync), quantised
    once (unless they came as FP8), multiplied by w13 [G, 2I, D], passed through the fused
    SwiGLU+quant, multiplied by w2, and gathered back to input order.
    """
    if not _experts_ok(x, experts):
        return kt.expert_ffn(_dequant_rows(x) if isinstance(x, tuple) else x, experts, slot_ids)
    q, s = x if isinstance(x, tuple) else kt.per_token_group_quant_fp8(x)
    m, d = q.shape
    if m == 0:
        return torch.zeros(0, d, dtype=torch.bfloat16, device=q.device)
    lay = contiguous_layout(slot_ids.to(q.device), experts.n_slots, deep_gemm.get_mk_alignment_for_contiguous_layout())
    # The buffer's last row is padding no live row uses (it has M + 128 G rows for at most
    # M + 127 G used ones): dropped rows are parked there and read back as the zeros written
    # into it after the GEMMs. Padding rows are left uninitialised: each output row depends on
    # its own input row only, and no padding row is read.
    dest = torch.where(lay.pos >= 0, lay.pos, lay.n_rows - 1)
    # Filled by a row gather, not a scatter: `aq[dest] = q` is an index_put that runs element by
    # element (4.3 ms for 131K FP8 rows of 7168 on an H200); inverting the map is a scatter of
    # ints, and the gather then copies whole rows. Rows no input lands on read row 0 (padding).
    src = torch.zeros(lay.n_rows, dtype=torch.long, device=q.device)
    src.scatter_(0, dest, torch.arange(m, device=q.device))
    aq = q.view(torch.uint8)[src].view(FP8)
    a_s = empty_mn_major_scales((lay.n_rows, d // 128), q.device)
    a_s.copy_(s.float()[src])
    h13 = torch.empty(lay.n_rows, 2 * experts.inter, dtype=torch.bfloat16, device=q.device)
    deep_gemm.m_grouped_fp8_gemm_nt_contiguous((aq, a_s), (experts.w13, experts.s13), h13, lay.m_indices)
    hq, hs = kt.silu_mul_quant_fp8(h13, mn_major=True)
    y = torch.empty(lay.n_rows, d, dtype=torch.bfloat16, device=q.device)
    deep_gemm.m_grouped_fp8_gemm_nt_contiguous((hq, hs), (experts.w2, experts.s2), y, lay.m_indices)
    y[lay.n_rows - 1].zero_()
    return y[dest]


def expert_ffn_masked(x, experts: ExpertWeights, masked_m: torch.Tensor, expected_m: int | None = None):
    """x [G, max_m, D] bf16, or already quantised (q fp8 [G, max_m, D], s fp32 [G, max_m, D/128]);
    masked_m int32 [G] on the device -> [G, max_m, D] bf16 (rows past masked_m[g] undefined).
    max_m must be a multiple of 128: the GEMM stores whole row tiles (checked).

    DeepGEMM's masked grouped GEMM twice with the fused SwiGLU+quant between: no host sync,
    fixed shapes, so a decode step replays it inside a CUDA graph.
    """
    xq = x if isinstance(x, tuple) else None
    ref_x = x[0] if xq else x
    g, max_m, d = ref_x.shape
    if not (deep_gemm is not None and experts.is_fp8 and experts.act_quant and experts.inter % 128 == 0
            and d % 128 == 0 and (xq is not None or x.dtype == torch.bfloat16)):
        return kt.expert_ffn_masked(_dequant_rows(x) if xq is not None else x, experts, masked_m, expected_m)
    assert max_m % 128 == 0, f"masked layout needs max_m in whole 128-row tiles, got {max_m}"
    if xq is None:
        xq = kt.per_token_group_quant_fp8(x, mn_major=True)
    exp_m = max(1, expected_m or max_m)
    masked_m = masked_m.to(torch.int32)
    h13 = torch.empty(g, max_m, 2 * experts.inter, dtype=torch.bfloat16, device=ref_x.device)
    deep_gemm.m_grouped_fp8_gemm_nt_masked(xq, (experts.w13, experts.s13), h13, masked_m, exp_m)
    hq = kt.silu_mul_quant_fp8(h13, mn_major=True)
    y = torch.empty(g, max_m, d, dtype=torch.bfloat16, device=ref_x.device)
    deep_gemm.m_grouped_fp8_gemm_nt_masked(hq, (experts.w2, experts.s2), y, masked_m, exp_m)
    return y


# ---------------------------------------------------------------- MLA attention

def plan_mla_decode():
    """FlashMLA's tile-scheduler metadata for one step: empty here, filled by the first layer's
    call from the step's seq_lens, reused by the others (inside a CUDA graph the filling kernel is
    part of the graph, so every replay plans its own step)."""
    return flash_mla.get_mla_metadata()[0] if flash_mla is not None else None


def mla_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
               scale: float, v_dim: int, plan=None) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, H, L+R] or [B, S, H, L+R] (S query positions, causal among them), kv_cache [P, 64, L+R],
    block_table int [B, W], seq_lens int [B] -> (out [B, (S,) H, v_dim], lse fp32 [B, (S,) H], natural log).

    FlashMLA for bf16/fp16 with a 576-wide cache, 64-token pages and v_dim 512; Triton otherwise.
    """
    multi = q.dim() == 4
    ok = (flash_mla is not None and q.dtype in (torch.bfloat16, torch.float16) and kv_cache.dtype == q.dtype
          and kv_cache.shape[1] == 64 and kv_cache.shape[-1] in (576, 512) and v_dim == 512 and q.shape[0] > 0)
    if not ok:
        return kt.mla_decode(q, kv_cache, block_table, seq_lens, scale, v_dim)
    q4 = q if multi else q.unsqueeze(1)
    sched = plan if plan is not None else plan_mla_decode()
    out, lse = flash_mla.flash_mla_with_kvcache(
        q4, kv_cache.unsqueeze(2), block_table.to(torch.int32), seq_lens.to(torch.int32), v_dim, sched,
        softmax_scale=scale, causal=multi)
    lse = lse.transpose(1, 2)                                           # [B, H, S] -> [B, S, H]
    return (out, lse) if multi else (out[:, 0], lse[:, 0])


def _prefill_sdpa(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    tq, h, dqk = q.shape
    tk, dv = k.shape[0], v.shape[-1]
    qh, kh, vh = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    mask = None if tq == tk else torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(diagonal=tk - tq)
    if backend == "cudnn":
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, is_causal=mask is None, scale=scale)
    else:
        if dv < dqk:
            vh = F.pad(vh, (0, dqk - dv))
        kernels = [SDPBackend.FLASH_ATTENTION] if mask is None else [SDPBackend.EFFICIENT_ATTENTION]
        with sdpa_kernel(kernels):
            o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, is_causal=mask is None, scale=scale)
    return o[0, ..., :dv].transpose(0, 1).contiguous()


def mla_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [Tq, H, Dqk], k [Tk, H, Dqk], v [Tk, H, Dv], Tk >= Tq, bottom-right causal -> [Tq, H, Dv].

    The route measured fastest at start-up; a shape it has no kernel for (cuDNN refuses some,
    e.g. very short prompts) takes the other route, then Triton's."""
    if q.shape[0] == 0 or q.dtype not in (torch.bfloat16, torch.float16):
        return kt.mla_prefill(q, k, v, scale)
    first = PREFILL_ATTENTION["backend"]
    for backend in (first, "flash-padded" if first == "cudnn" else "cudnn"):
        try:
            return _prefill_sdpa(backend, q, k, v, scale)
        except RuntimeError:     # "No available kernel" for this shape
            continue
    return kt.mla_prefill(q, k, v, scale)


# ---------------------------------------------------------------- start-up self-test

def _time(fn, reps: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps


def _choose_prefill(dev) -> str:
    """Correctness of each SDPA route against reference (the self-test's mla_prefill check), then
    keep the fastest at a V3 shape."""
    timings = {}
    g = torch.Generator(device=dev).manual_seed(0)
    for backend in ("cudnn", "flash-padded"):
        try:
            route = SimpleNamespace(mla_prefill=functools.partial(_prefill_sdpa, backend))
            ok, why = selftest.run(route, dev, {"mla_prefill": selftest.Op()})
            assert ok, why
            q, k = (torch.randn(4096, 128, 192, generator=g, device=dev).bfloat16() for _ in range(2))
            v = torch.randn(4096, 128, 128, generator=g, device=dev).bfloat16()
            timings[backend] = _time(lambda: _prefill_sdpa(backend, q, k, v, 0.1352))
        except Exception as exc:   # a route that fails here is not used
            log.info("prefill attention via %s unavailable: %s", backend, exc)
    if not timings:
        raise RuntimeError("no SDPA route computes MLA prefill attention correctly")
    PREFILL_ATTENTION["backend"] = min(timings, key=timings.get)
    PREFILL_ATTENTION["ms_4096x128"] = {k: round(v * 1e3, 3) for k, v in timings.items()}
    return f"prefill {PREFILL_ATTENTION['backend']} ({', '.join(f'{k} {v * 1e3:.2f} ms' for k, v in timings.items())})"


# The adapters, at DeepSeek-V3's shapes (what DeepGEMM and FlashMLA take); the rest is triton's, checked there.
SELF_TEST = {"linear": selftest.Op(cases=selftest.LINEAR_V3_CASES), "expert_ffn": selftest.Op(),
             "expert_ffn_masked": selftest.Op(), "swiglu_linear": selftest.Op(), "mla_decode": selftest.Op(cases=selftest.MLA_DECODE_V3_CASES)}


def self_test(device) -> tuple[bool, str]:
    """The triton fallbacks' self-test, then every adapter in SELF_TEST on seeded inputs against
    reference.py (this also JIT-compiles DeepGEMM's kernels for those shapes), then the prefill
    route's measurement. Never raises."""
    try:
        missing = {k: v for k, v in _IMPORT_ERRORS.items()}
        if missing:
            return False, "; ".join(f"{k} not importable ({v})" for k, v in missing.items())
        dev = torch.device(device)
        if dev.type != "cuda":
            return False, "needs CUDA"
        cc = torch.cuda.get_device_capability(dev)
        if cc != (9, 0):
            return False, f"needs an SM90 (Hopper) GPU, this one is sm{cc[0]}{cc[1]}"
        ok, why = kt.self_test(dev)
        if not ok:
            return False, f"triton fallbacks: {why}"
        ok, why = selftest.run(sys.modules[__name__], dev, SELF_TEST)
        if not ok:
            return False, why
        # V3.2's sparse-attention adapters gate only themselves: V3 keeps native if they fail
        DSA["native"], why_dsa = native_dsa.self_test(dev)
        log.info("kernels: native DSA %s (%s)", "on" if DSA["native"] else "off, reference runs", why_dsa)
        return True, f"{why}; {_choose_prefill(dev)}; {why_dsa}"
    except Exception as exc:
        return False, f"{type(exc).__name__}: {exc}"
