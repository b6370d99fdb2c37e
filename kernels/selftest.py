"""The one start-up self-test every kernel backend passes before kernels/__init__.py selects it.

A backend declares the ops it provides with its own kernels as `SELF_TEST = {op: Op(...)}`;
`run(backend, device, SELF_TEST)` runs each op on seeded inputs against reference.py, from the
op's case table below, within the op's tolerance (TOLERANCE; an Op may override an entry or name
another case table). Inputs are identical quantised tensors on both sides, so a tolerance bounds
the kernel's own arithmetic: fp32 accumulation order, bf16 outputs, split-KV merges.
Ops a backend borrows unchanged (native's grouped_linear is triton's) are checked by the
backend that owns them. Runs on any device (CPU tests run it on reference itself); never raises,
never picks a backend. `gate` checks the decode hot path's fused ops one by one, so a backend can
switch off just the one that fails. Over 400 lines: one short check per op, with its cases and
tolerance, kept in one table so every backend is held to the same contract.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from epserve.kernels import reference
from epserve.kernels.reference import ExpertWeights, Weight, per_block_quant_fp8

BF16, F32 = torch.bfloat16, torch.float32
TOLERANCE = {
    "per_token_group_quant_fp8": {"scale_rel": 1e-6, "codes_differ": 1e-3},   # codes: a fraction of all
    "fp8_gemm_nt": {"calc_diff": 1e-5},
    "linear": {"calc_diff": 1e-5},
    "grouped_linear": {"calc_diff": 1e-5},
    "expert_ffn": {"calc_diff": 1e-4},            # bf16 intermediates on both sides
    "expert_ffn_masked": {"calc_diff": 1e-4},
    "mla_decode": {"out_rel": 5e-3, "lse_abs": 1e-3},
    "mla_prefill": {"calc_diff": 1e-4},
    "combine_rows": {"max_rel": 2 ** -6},         # one bf16 rounding of the values apart
    "route_topk": {"weight_abs": 1e-5},           # and the same experts for every token
    "rms_norm": {"max_abs_ulp": 1.0},             # at most one bf16 rounding of the output apart
    "swiglu_linear": {"calc_diff": 1e-5},         # fused SwiGLU + quantise + GEMM against its unfused ops
    "mla_rope_latent": {"max_abs_ulp": 2.0},      # of the row's largest value: two products may round apart
    "add_rms_norm": {"max_abs_ulp": 1.0},         # the sum exact (one rounding, as torch's); the norm as rms_norm
    "masked_route": {},                           # integers: exactly the oracle's rows, counts and tokens
    "quant_rows_fp8": {},                         # exactly the codes and scales of quantising, then gathering
    "dsa_index_qk": {"max_abs_ulp": 2.0,          # without FP8: as mla_rope_latent, the norm within it
                     "fp8_steps": 1.0, "fp8_differ": 0.02},  # with: codes one e4m3 step apart, on few elements
}

# case tables: small and ragged shapes, and DeepSeek-V3's (7168 hidden, 2048 expert inter, 576-wide latents)
QUANT_CASES = ((7, 7168), (33, 200))                                               # (M, K)
GEMM_CASES = ((1, 7168, 2048), (200, 7168, 4096), (333, 1536, 576), (40, 320, 200))  # (M, K, N), bf16 and fp32 out
# (leading dims, K, N, weight kinds, reference computed in fp32 then cast)
LINEAR_CASES = (((3, 50), 7168, 2048, ("fp8-act", "fp8", "dense"), False),)
LINEAR_V3_CASES = tuple(((m,), k, n, ("fp8-act",), True) for m, k, n in
                        ((1, 7168, 1536), (129, 7168, 576), (256, 1536, 24576), (300, 16384, 7168), (64, 512, 4096)))
GROUPED_CASES = ((300, 9, 7168, 2048), (64, 2, 2048, 7168), (37, 4, 320, 200))    # (M, groups, K, N)
EXPERT_CASES = ((700, 9, 7168, 2048), (37, 3, 1024, 256))                          # (M, slots, dim, inter)
MASKED_CASES = ((9, 7168, 2048, 128, 16), (3, 1024, 256, 128, 16))       # (slots, dim, inter, max_m, expected_m)
# (dtype, heads, latent, rope, seq lens (0: an empty sequence), query positions per sequence)
MLA_DECODE_CASES = ((BF16, 128, 512, 64, (1, 64, 65, 700, 2000, 0), 1), (F32, 5, 32, 8, (3, 130, 17), 1))
MLA_DECODE_V3_CASES = ((BF16, 128, 512, 64, (1, 64, 65, 700, 2000, 4097), 1), (BF16, 128, 512, 64, (130, 300), 2))
PREFILL_CASES = ((300, 300), (40, 333))                                            # (Tq, Tk); 16 heads, 192 / 128
COMBINE_CASES = ((5, 8, 7168), (33, 2, 200))                                       # (tokens, K, D)
ROUTE_CASES = ((300, 256, 8, 4, 8), (7, 16, 4, 2, 4), (5, 2, 1, 1, 2))             # (tokens, E, groups, top groups, K)
NORM_CASES = ((64, 7168, 7168), (5, 1536, 2112), (3, 512, 576), (0, 7168, 7168))   # (rows, D, row stride: a split view)
SWIGLU_CASES = ((64, 2048, 7168), (128, 18432, 7168), (3, 256, 200))               # (tokens, inter, D)
# (tokens, K, experts, replicas, slots of the unit, this rank's first slot, its slots, per_group, floor)
ROUTE_MASKED_CASES = ((37, 4, 16, 3, 24, 0, 24, 128, False), (50, 4, 16, 2, 32, 24, 8, 256, True),
                      (300, 8, 64, 2, 96, 0, 96, 384, True))
QUANT_ROWS_CASES = ((64, 7168, 2, 640), (5, 256, 3, 128))                         # (tokens, K, groups, rows a group)
LATENT_CASES = ((BF16, 64, 128, 512, 64, True), (BF16, 5, 16, 512, 64, False), (F32, 3, 2, 32, 8, True))
#               (dtype, tokens, heads, latent, rope, interleaved)
INDEX_QK_CASES = ((BF16, 64, 64, 128, 64, True), (BF16, 64, 64, 128, 64, False), (BF16, 5, 4, 32, 16, True),
                  (F32, 3, 16, 64, 32, True))
#                 (dtype, tokens, indexer heads, index_head_dim, rope, FP8 Hadamard round trip)


@dataclass(frozen=True)
class Op:
    """One declared op: `tol` overrides entries of TOLERANCE[op]; `cases` replaces its default table."""

    tol: dict = field(default_factory=dict)
    cases: tuple | None = None


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """1 - 2 sum(xy) / sum(x^2 + y^2) in float64 (DeepGEMM's measure; 0 = equal)."""
    x, y = x.double(), y.double()
    return float(1 - 2 * (x * y).sum() / (x * x + y * y).sum().clamp(min=1e-300))


def run(kb, device, ops: dict[str, Op]) -> tuple[bool, str]:
    """Check backend `kb` (a module-like object) op by op on `device`: (True, a summary of the worst
    differences) or (False, the first failure, naming the op, the case and the limit). Never raises."""
    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(0)
    done = []
    try:
        for name, op in ops.items():
            check, default = CHECKS[name] if name in CHECKS else FUSED_CHECKS[name]
            done.append(check(kb, dev, g, {**TOLERANCE[name], **op.tol}, op.cases or default))
    except Exception as exc:  # a failed check or a kernel error both mean: do not use this backend
        return False, f"{type(exc).__name__}: {exc}"
    return True, "; ".join(done)


def _check_quant(kb, dev, g, tol, cases) -> str:
    for m, k in cases:
        x = torch.randn(m, k, generator=g, device=dev).bfloat16() * 3
        x[0, :128] = 0  # a zero group exercises the amax floor
        q, s = kb.per_token_group_quant_fp8(x)
        rq, rs = reference.per_token_group_quant_fp8(x)
        bad = int((q.view(torch.uint8) != rq.view(torch.uint8)).sum())
        ds = float(((s - rs).abs() / rs).max())
        assert ds <= tol["scale_rel"] and bad <= q.numel() * tol["codes_differ"], \
            f"quant {m}x{k}: {bad} codes differ, scale rel {ds:.1e}"
    return f"quant ok ({bad} codes differ)"


def _check_gemm(kb, dev, g, tol, cases) -> str:
    worst = 0.0
    for m, k, n in cases:
        a = torch.randn(m, k, generator=g, device=dev)
        aq, as_ = kb.per_token_group_quant_fp8(a)
        bq, bs = per_block_quant_fp8(torch.randn(n, k, generator=g, device=dev) / k ** 0.5)
        a_deq = aq.double() * as_.double().repeat_interleave(128, 1)[:, :k]
        want = a_deq @ reference.dequant_block(bq, bs).double().t()
        for dt in (BF16, F32):
            d = calc_diff(kb.fp8_gemm_nt(aq, as_, bq, bs, dt), want)
            worst = max(worst, d)
            assert d <= tol["calc_diff"], f"fp8_gemm_nt {m}x{k}x{n} {dt}: calc_diff {d:.2e} > {tol['calc_diff']}"
    return f"gemm calc_diff {worst:.1e}"


def _weights(kind: str, w: torch.Tensor) -> Weight:
    if kind == "dense":
        return Weight(w.bfloat16())
    wq, ws = per_block_quant_fp8(w)
    return Weight(wq, ws, act_quant=kind == "fp8-act")


def _check_linear(kb, dev, g, tol, cases) -> str:
    worst = 0.0
    for lead, k, n, kinds, ref_fp32 in cases:
        x = torch.randn(*lead, k, generator=g, device=dev).bfloat16()
        w = torch.randn(n, k, generator=g, device=dev) / k ** 0.5
        for kind in kinds:
            weight = _weights(kind, w)
            want = reference.linear(x.float(), weight).to(x.dtype) if ref_fp32 else reference.linear(x, weight)
            d = calc_diff(kb.linear(x, weight), want)
            worst = max(worst, d)
            assert d <= tol["calc_diff"], f"linear {lead}x{k}x{n} ({kind}): calc_diff {d:.2e}"
    return f"linear calc_diff {worst:.1e}"


def _check_grouped(kb, dev, g, tol, cases) -> str:
    worst = 0.0
    for m, n_groups, k, n in cases:
        x = torch.randn(m, k, generator=g, device=dev).bfloat16()
        ids = torch.randint(-1, n_groups, (m,), generator=g, device=dev)
        ids[ids == n_groups - 1] = 0  # one group empty
        ws = [per_block_quant_fp8(torch.randn(n, k, generator=g, device=dev) / k ** 0.5) for _ in range(n_groups)]
        for weights in ([Weight(q, s, act_quant=True) for q, s in ws],
                        [Weight(reference.dequant_block(q, s).bfloat16()) for q, s in ws]):
            got, want = kb.grouped_linear(x, weights, ids), reference.grouped_linear(x, weights, ids)
            d = calc_diff(got, want)
            worst = max(worst, d)
            assert d <= tol["calc_diff"] and bool((got[ids < 0] == 0).all()), \
                f"grouped_linear {m}x{k}x{n} G={n_groups} fp8={weights[0].is_fp8}: calc_diff {d:.2e}"
    return f"grouped calc_diff {worst:.1e}"


def _check_experts(kb, dev, g, tol, cases) -> str:
    worst = 0.0
    for m, n_slots, dim, inter in cases:
        ex = ExpertWeights.random_fp8(n_slots, inter, dim, dev, g)
        x = torch.randn(m, dim, generator=g, device=dev).bfloat16()
        ids = torch.randint(-1, n_slots, (m,), generator=g, device=dev)
        ids[ids == 1] = 0                                                # one slot empty
        got, want = kb.expert_ffn(x, ex, ids), reference.expert_ffn(x, ex, ids)
        d = calc_diff(got, want)
        worst = max(worst, d)
        assert d <= tol["calc_diff"] and bool((got[ids < 0] == 0).all()), \
            f"expert_ffn {m}x{dim} G={n_slots}: calc_diff {d:.2e}"
    return f"experts calc_diff {worst:.1e}"


def _check_masked(kb, dev, g, tol, cases) -> str:
    worst = 0.0
    for n_slots, dim, inter, max_m, expected_m in cases:
        ex = ExpertWeights.random_fp8(n_slots, inter, dim, dev, g)
        xm = torch.randn(n_slots, max_m, dim, generator=g, device=dev).bfloat16()
        counts = torch.randint(0, max_m + 1, (n_slots,), generator=g, device=dev).int()
        got, want = kb.expert_ffn_masked(xm, ex, counts, expected_m), reference.expert_ffn_masked(xm, ex, counts)
        live = torch.arange(max_m, device=dev)[None, :] < counts[:, None]    # rows past a count are undefined
        d = calc_diff(got[live], want[live])
        worst = max(worst, d)
        assert d <= tol["calc_diff"], f"expert_ffn_masked G={n_slots} dim={dim}: calc_diff {d:.2e}"
    return f"masked experts calc_diff {worst:.1e}"


def _check_mla_decode(kb, dev, g, tol, cases) -> str:
    worst_o = worst_l = 0.0
    for dt, h, lat, r, lens, s_q in cases:
        b, page = len(lens), 64
        width = max(math.ceil(n / page) for n in lens) + 2
        cache = torch.randn(b * width, page, lat + r, generator=g, device=dev).to(dt)
        table = torch.argsort(torch.rand(b * width, generator=g, device=dev)).view(b, width)  # scattered pages
        seq_lens = torch.tensor(lens, device=dev)
        q = torch.randn(b, s_q, h, lat + r, generator=g, device=dev).to(dt)
        out, lse = kb.mla_decode(q if s_q > 1 else q[:, 0], cache, table, seq_lens, 0.1352, lat, kb.plan_mla_decode())
        if s_q == 1:
            out, lse = out[:, None], lse[:, None]
        live = seq_lens > 0
        for i in range(s_q):      # query i sees the cache up to len - s_q + i + 1
            r_out, r_lse = reference.mla_decode(q[:, i], cache, table, seq_lens - (s_q - 1 - i), 0.1352, lat)
            rel = float((out[:, i].float() - r_out.float()).norm() / r_out.float().norm())
            dl = float((lse[live, i] - r_lse[live]).abs().max())
            worst_o, worst_l = max(worst_o, rel), max(worst_l, dl)
            assert rel <= tol["out_rel"] and dl <= tol["lse_abs"], \
                f"mla_decode H={h} {dt} s_q={s_q} pos {i}: out rel {rel:.2e}, lse abs {dl:.2e}"
        assert bool((lse[~live] == float("-inf")).all()) and bool((out[~live] == 0).all()), "empty sequence"
    return f"mla_decode out rel {worst_o:.1e} lse abs {worst_l:.1e}"


def _check_mla_prefill(kb, dev, g, tol, cases) -> str:
    worst = 0.0
    for tq, tk in cases:
        q, k = (torch.randn(t, 16, 192, generator=g, device=dev).bfloat16() for t in (tq, tk))
        v = torch.randn(tk, 16, 128, generator=g, device=dev).bfloat16()
        d = calc_diff(kb.mla_prefill(q, k, v, 0.1352), reference.mla_prefill(q, k, v, 0.1352))
        worst = max(worst, d)
        assert d <= tol["calc_diff"], f"mla_prefill Tq={tq} Tk={tk}: calc_diff {d:.2e}"
    return f"prefill calc_diff {worst:.1e}"


def _check_combine(kb, dev, g, tol, cases) -> str:
    for t, k, d in cases:
        y = torch.randn(t * k + 3, d, generator=g, device=dev).bfloat16()
        w = torch.rand(t, k, generator=g, device=dev)
        rows = torch.randperm(t * k + 3, generator=g, device=dev)[: t * k]
        rows[::3] = -1
        rows[rows == t * k + 2] = -1
        y[t * k + 2] = float("nan")               # garbage no live pair points at, and no dropped one reads
        for r in (rows, None):
            got, want = kb.combine_rows(y, w, r), reference.combine_rows(y, w, r)
            d_ = float((got.float() - want.float()).abs().max() / want.float().abs().max())
            assert d_ <= tol["max_rel"] and not got.isnan().any(), \
                f"combine_rows {t}x{k}x{d}: max diff {d_:.2e} (relative)"
    return "combine ok"


def _check_route(kb, dev, g, tol, cases) -> str:
    for t, e, groups, top_groups, k in cases:
        logits = torch.randn(t, e, generator=g, device=dev)
        bias = torch.randn(e, generator=g, device=dev) * 0.1
        for lg in (logits, logits.bfloat16()):        # the gate hands bf16 logits over as they are
            w, idx = kb.route_topk(lg, bias, k, groups, top_groups, scale=2.5)
            rw, ridx = reference.route_topk(lg, bias, k, groups, top_groups, scale=2.5)
            same = idx.sort(1)[0] == ridx.sort(1)[0]
            assert same.all(), f"route_topk {t}x{e} {lg.dtype}: {int((~same.all(1)).sum())} tokens chose other experts"
            dw = float((w.sort(1)[0] - rw.sort(1)[0]).abs().max())
            assert dw <= tol["weight_abs"], f"route_topk {t}x{e} {lg.dtype}: weights differ by {dw:.1e}"
    return "route ok"


def _bf16_ulps(got: torch.Tensor, want: torch.Tensor) -> float:
    """The largest difference in bf16 roundings at each element's value (0 for empty tensors)."""
    ulp = (want.float().abs() * 2 ** -7).clamp(min=2 ** -126)
    return float(((got.float() - want.float()).abs() / ulp).max()) if want.numel() else 0.0


def _row_ulps(got: torch.Tensor, want: torch.Tensor, dt: torch.dtype) -> float:
    """The largest difference in roundings (of dt) of each row's largest value: a rotation's differences
    cancel (x1 c - x2 s), so an element may be 0 on one side and one rounding of its products on the other."""
    want = want.float()
    ulp = (want.abs().amax(-1, keepdim=True) * (2 ** -7 if dt == BF16 else 2 ** -23)).clamp(min=2 ** -126)
    return float(((got.float() - want).abs() / ulp).max()) if want.numel() else 0.0


def _check_norm(kb, dev, g, tol, cases) -> str:
    for t, d, stride in cases:
        x = torch.randn(t, stride, generator=g, device=dev).bfloat16()[:, :d]
        w = (torch.rand(d, generator=g, device=dev) + 0.5).bfloat16()
        got, want = kb.rms_norm(x, w, 1e-6), reference.rms_norm(x, w, 1e-6)
        worst = _bf16_ulps(got, want)
        assert got.shape == want.shape and worst <= tol["max_abs_ulp"], f"rms_norm {t}x{d}: {worst:.2f} bf16 ulps apart"
    return "rms_norm ok"


def _check_add_norm(kb, dev, g, tol, cases) -> str:
    for t, d, stride in cases:
        h = torch.randn(t, stride, generator=g, device=dev).bfloat16()[:, :d]
        dx = torch.randn(t, d, generator=g, device=dev).bfloat16()
        w = (torch.rand(d, generator=g, device=dev) + 0.5).bfloat16()
        (hs, y), (rh, ry) = kb.add_rms_norm(h, dx, w, 1e-6), reference.add_rms_norm(h, dx, w, 1e-6)
        worst = _bf16_ulps(y, ry)
        assert torch.equal(hs, rh) and worst <= tol["max_abs_ulp"], f"add_rms_norm {t}x{d}: {worst:.2f} bf16 ulps apart"
    return "add_rms_norm ok"


def _check_swiglu(kb, dev, g, tol, cases) -> str:
    for t, i, d in cases:
        h13 = torch.randn(t, 2 * i, generator=g, device=dev).bfloat16()
        q, s = per_block_quant_fp8(torch.randn(d, i, generator=g, device=dev) / i ** 0.5)
        w2 = Weight(q, s, act_quant=True)
        gate, up = h13.chunk(2, -1)
        got, want = kb.swiglu_linear(h13, w2), reference.linear(torch.nn.functional.silu(gate) * up, w2).float()
        diff = calc_diff(got.float(), want)
        assert diff <= tol["calc_diff"], f"swiglu_linear {t}x{i}x{d}: calc_diff {diff:.2e}"
    return "swiglu ok"


def _check_latent(kb, dev, g, tol, cases) -> str:
    for dt, t, h, lat, r, inter in cases:
        q = torch.randn(t, h, 128 + r, generator=g, device=dev).to(dt)[..., 128:]          # a split view
        kv = torch.randn(t, 200 + lat + r, generator=g, device=dev).to(dt)[:, 200:]     # of a stacked GEMM's output
        ang = torch.rand(t, r // 2, generator=g, device=dev) * 100
        cos, sin = ang.cos().to(dt), ang.sin().to(dt)
        w = (torch.rand(lat, generator=g, device=dev) + 0.5).to(dt)
        slots = torch.randperm(3 * t, generator=g, device=dev)[:t]
        caches = [torch.zeros(3 * t, lat + r + 16, dtype=dt, device=dev) for _ in range(2)]
        q_lat = torch.zeros(t, h, lat + r, dtype=dt, device=dev)               # the decode form writes in place
        got = kb.mla_rope_latent(q, kv, cos, sin, w, 1e-6, inter, caches[0], slots, q_lat[..., lat:])
        want = reference.mla_rope_latent(q, kv, cos, sin, w, 1e-6, inter, caches[1], slots)
        for name, a, b in (("query", got, want), ("cache", caches[0], caches[1])):
            worst = _row_ulps(a, b, dt)
            assert worst <= tol["max_abs_ulp"], f"mla_rope_latent {t}x{h} {dt}: {name} {worst:.2f} ulps apart"
        assert bool((q_lat[..., :lat] == 0).all()) and got.data_ptr() == q_lat[..., lat:].data_ptr(), \
            "mla_rope_latent wrote outside its output view"
    return "rope latent ok"


def _check_index_qk(kb, dev, g, tol, cases) -> str:
    from epserve.kernels import reference_dsa
    for dt, t, hi, di, r, fp8 in cases:
        q = torch.randn(t, hi, di, generator=g, device=dev).to(dt) * 3
        k = torch.randn(t, 40 + di, generator=g, device=dev).to(dt)[:, 40:]        # a split view of a stacked GEMM
        ang = torch.rand(t, r // 2, generator=g, device=dev) * 100
        cos, sin = ang.cos().to(dt), ang.sin().to(dt)
        w, b = (torch.rand(di, generator=g, device=dev) + 0.5).to(dt), (torch.randn(di, generator=g, device=dev) / 8).to(dt)
        rot = reference_dsa.hadamard(di, dev) if fp8 else None
        slots = torch.randperm(3 * t, generator=g, device=dev)[:t]
        caches = [torch.zeros(3 * t, 24 + di, dtype=dt, device=dev) for _ in range(2)]
        got = kb.dsa_index_qk(q, k, cos, sin, w, b, 1e-6, rot, caches[0], 24, slots)
        want = reference_dsa.dsa_index_qk(q, k, cos, sin, w, b, 1e-6, rot, caches[1], 24, slots)
        for name, a, ref in (("query", got, want), ("key", caches[0][slots, 24:], caches[1][slots, 24:])):
            a, ref = a.float(), ref.float()
            amax = ref.abs().amax(-1, keepdim=True)
            if fp8:   # a one-rounding difference before the round trip may move a code by one e4m3 step
                step = (ref.abs() * 2 ** -3).clamp(min=1e-30) + amax / 448 * 2 ** -9
                moved = (a - ref).abs() > ref.abs() * 2 ** -5 + amax / 448 * 2 ** -10   # a code, not a rounding
                worst, differ = float(((a - ref).abs() / step).max()), float(moved.float().mean())
                assert worst <= tol["fp8_steps"] and differ <= tol["fp8_differ"], \
                    f"dsa_index_qk {t}x{hi}x{di} fp8: {name} {worst:.2f} steps apart on {differ:.1%} of elements"
            else:
                worst = _row_ulps(a, ref, dt)
                assert worst <= tol["max_abs_ulp"], f"dsa_index_qk {t}x{hi}x{di} {dt}: {name} {worst:.2f} ulps apart"
        assert bool((caches[0][:, :24] == 0).all()), "dsa_index_qk wrote outside the key's columns"
    return "index qk ok"


def _route_oracle(idx, valid, log2phy, slot_node, my_node, first, n_slots, per_group, floor):
    """masked_route's contract in plain Python (a test oracle): each valid pair takes candidate t mod n
    of its expert's replicas (those on my_node if any), in candidate order; pairs keep input order
    within a slot."""
    t, k = idx.shape
    table = log2phy.tolist()
    src, rows, per, load = [0] * (n_slots * per_group), [], [0] * n_slots, [0] * len(table)
    for p, e in enumerate(idx.flatten().tolist()):
        tok = p // k
        if not valid[tok]:
            rows.append(-1)
            continue
        load[e] += 1
        cands = [c for c in table[e] if c >= 0]
        pool = [c for c in cands if slot_node[c] == my_node] or cands
        g = pool[tok % len(pool)] - first
        if not 0 <= g < n_slots:
            rows.append(-1)
            continue
        rows.append(g * per_group + per[g])
        src[rows[-1]] = tok
        per[g] += 1
    m = [max(min(c, t), f) for c, f in zip(per, floor)]
    return src, rows, m, load


def _check_masked_route(kb, dev, g, tol, cases) -> str:
    for t, k, e, x, slots, first, n_slots, per_group, with_floor in cases:
        idx = torch.stack([torch.randperm(e, generator=g, device=dev)[:k] for _ in range(t)])
        valid = torch.rand(t, generator=g, device=dev) > 0.2
        log2phy = torch.randint(0, slots, (e, x), generator=g, device=dev)
        log2phy[:, 1:][torch.rand(e, x - 1, generator=g, device=dev) > 0.5] = -1        # replica counts vary
        slot_node = torch.randint(0, 3, (slots,), generator=g, device=dev)
        floor = torch.randint(0, per_group, (n_slots,), generator=g, device=dev) if with_floor else None
        counts = torch.zeros(e, dtype=torch.long, device=dev)
        received = torch.full((n_slots,), 5, dtype=torch.long, device=dev)
        got = kb.masked_route(idx, valid, log2phy, slot_node, 1, first, n_slots, per_group, counts, floor, received)
        assert got is not None, f"masked_route {t}x{k}: declined the case"
        src, rows, m, load = _route_oracle(idx.cpu(), valid.cpu().tolist(), log2phy.cpu(), slot_node.cpu().tolist(), 1,
                                           first, n_slots, per_group, floor.tolist() if with_floor else [0] * n_slots)
        assert got[0].tolist() == src and got[1].tolist() == rows and got[2].tolist() == m, \
            f"masked_route {t}x{k} E={e}: rows differ from the oracle's"
        assert counts.tolist() == load and received.tolist() == [5 + v for v in m], \
            f"masked_route {t}x{k} E={e}: counts differ from the oracle's"
    return "masked_route ok"


def _check_quant_rows(kb, dev, g, tol, cases) -> str:
    for t, k, groups, m in cases:
        x = torch.randn(t, k, generator=g, device=dev).bfloat16() * 3
        src = torch.randint(0, t, (groups * m,), generator=g, device=dev)
        q, s = kb.quant_rows_fp8(x, src, groups)
        rq, rs = kb.per_token_group_quant_fp8(x)
        n = rs.shape[-1]
        assert q.shape == (groups, m, k) and s.shape == (groups, m, n), f"quant_rows_fp8 {t}x{k}: shapes"
        assert torch.equal(q.view(torch.uint8).reshape(-1, k), rq.view(torch.uint8)[src]) and \
            torch.equal(s.reshape(-1, n), rs[src]), f"quant_rows_fp8 {t}x{k}: codes or scales differ"
    return "quant_rows ok"


def gate(kb, device, ops: dict[str, Op], off: set) -> list[str]:
    """Check each op on its own; one that fails (or raises) goes into `off`, where its callers take
    reference's path instead: a fused op new to this machine costs its own speed-up, not the backend.
    -> a line per op, its outcome."""
    out = []
    for name, op in ops.items():
        ok, why = run(kb, device, {name: op})
        if ok:
            off.discard(name)
        else:
            off.add(name)
        out.append(f"{name} {'on' if ok else 'off'} ({why})")
    return out


CHECKS = {  # op -> (check, default case table)
    "per_token_group_quant_fp8": (_check_quant, QUANT_CASES),
    "fp8_gemm_nt": (_check_gemm, GEMM_CASES),
    "linear": (_check_linear, LINEAR_CASES),
    "grouped_linear": (_check_grouped, GROUPED_CASES),
    "expert_ffn": (_check_experts, EXPERT_CASES),
    "expert_ffn_masked": (_check_masked, MASKED_CASES),
    "mla_decode": (_check_mla_decode, MLA_DECODE_CASES),
    "mla_prefill": (_check_mla_prefill, PREFILL_CASES),
    "combine_rows": (_check_combine, COMBINE_CASES),
    "route_topk": (_check_route, ROUTE_CASES),
    "rms_norm": (_check_norm, NORM_CASES),
    "swiglu_linear": (_check_swiglu, SWIGLU_CASES),
    "mla_rope_latent": (_check_latent, LATENT_CASES),
    "add_rms_norm": (_check_add_norm, NORM_CASES),
}
FUSED_CHECKS = {  # fused ops reference.py has no counterpart of: checked against an oracle, the unfused ops or their contract
    "dsa_index_qk": (_check_index_qk, INDEX_QK_CASES),   # kernels/reference_dsa.py's
    "masked_route": (_check_masked_route, ROUTE_MASKED_CASES),
    "quant_rows_fp8": (_check_quant_rows, QUANT_ROWS_CASES),
}
