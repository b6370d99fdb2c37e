"""`epserve bench deepep --gpus N`: DeepEP's dispatch and combine alone at DeepSeek-V3 shapes, on the
GPUs of one host, against NVLink's rate.

Shapes (DeepEP's own benchmark settings, docs/legacy.md): hidden 7168, 256 experts, top-8, FP8
dispatch with 1x128 scales, BF16 combine; normal kernels with 4096 tokens per rank (prefill),
low-latency kernels with 128 tokens per rank (decode). Bytes are counted as DeepEP's tests count
them: normal, the rows this rank receives (dispatch: FP8 row + fp32 scales; combine: BF16 row);
low latency, this rank's (token, expert) selections x (FP8 row + scales + 16 B of metadata) for
dispatch and x BF16 row for combine. One process per GPU (bench/ep.py), one deep_ep.Buffer each.
"""
from __future__ import annotations

import torch

from epserve.bench.ep import require_gpus, spawn, timed

HIDDEN, N_EXPERTS, TOPK = 7168, 256, 8
NORMAL_TOKENS, LL_TOKENS = 4096, 128
# NVLink 4 per GPU and direction (18 links x 25 GB/s); DeepEP's H800 runs saw ~160 GB/s of 200
NVLINK_GBPS = {"H200": 450.0, "H100": 450.0, "H800": 200.0}


def _worker(rank: int, n: int, reps: int) -> dict:
    import torch.distributed as dist

    from epserve.kernels.layouts import ll_max_tokens
    from epserve.kernels.reference import per_token_group_quant_fp8
    from epserve.model.deepep_dispatch import buffer_bytes, deep_ep
    dev = torch.device("cuda", rank)
    g = torch.Generator(device=dev).manual_seed(rank)
    n_ll = ll_max_tokens(LL_TOKENS)
    nvl, rdma = buffer_bytes(HIDDEN, n, N_EXPERTS, n_ll)
    buf = deep_ep.Buffer(dist.group.WORLD, nvl, rdma, low_latency_mode=True, num_qps_per_rank=N_EXPERTS // n,
                         explicitly_destroy=True)
    out = {}
    try:
        # normal kernels
        x = torch.randn(NORMAL_TOKENS, HIDDEN, device=dev, generator=g).bfloat16()
        idx = torch.rand(NORMAL_TOKENS, N_EXPERTS, device=dev, generator=g).topk(TOPK, -1)[1]
        w = torch.rand(NORMAL_TOKENS, TOPK, device=dev, generator=g)
        q, s = per_token_group_quant_fp8(x)
        n_rank, n_rdma, n_expert, in_rank, _ = buf.get_dispatch_layout(idx, N_EXPERTS)
        state = {}

        def dispatch():
            recv, _, _, _, handle, _ = buf.dispatch((q, s.contiguous()), num_tokens_per_rank=n_rank,
                                                    num_tokens_per_rdma_rank=n_rdma, is_token_in_rank=in_rank,
                                                    num_tokens_per_expert=n_expert, topk_idx=idx, topk_weights=w)
            state["recv"], state["handle"] = recv, handle

        dispatch()
        rows = state["recv"][0].shape[0]
        back = torch.randn(rows, HIDDEN, device=dev, generator=g).bfloat16()
        d_ms = timed(dispatch, reps)
        c_ms = timed(lambda: buf.combine(back, state["handle"]), reps)
        d_bytes, c_bytes = rows * (HIDDEN + HIDDEN // 128 * 4), rows * HIDDEN * 2
        out["normal"] = {"tokens_per_rank": NORMAL_TOKENS, "rows_received": rows,
                         "dispatch_us": d_ms * 1e3, "dispatch_gbps": d_bytes / d_ms / 1e6,
                         "combine_us": c_ms * 1e3, "combine_gbps": c_bytes / c_ms / 1e6}
        # low-latency kernels (after normal ones their buffers must be zeroed first)
        buf.clean_low_latency_buffer(n_ll, HIDDEN, N_EXPERTS)
        x = torch.randn(LL_TOKENS, HIDDEN, device=dev, generator=g).bfloat16()
        idx = torch.rand(LL_TOKENS, N_EXPERTS, device=dev, generator=g).topk(TOPK, -1)[1]
        w = torch.rand(LL_TOKENS, TOPK, device=dev, generator=g)
        ll = {}

        def ll_dispatch():
            recv, count, handle, _, _ = buf.low_latency_dispatch(x, idx, n_ll, N_EXPERTS, use_fp8=True)
            ll["recv"], ll["handle"] = recv, handle

        ll_dispatch()
        y = torch.randn(ll["recv"][0].shape, device=dev, generator=g).bfloat16()
        d_ms = timed(ll_dispatch, reps)
        c_ms = timed(lambda: buf.low_latency_combine(y, idx, w, ll["handle"]), reps)
        sel = int((idx >= 0).sum())
        d_bytes, c_bytes = sel * (HIDDEN + HIDDEN // 128 * 4 + 16), sel * HIDDEN * 2
        out["low_latency"] = {"tokens_per_rank": LL_TOKENS, "selections": sel,
                              "dispatch_us": d_ms * 1e3, "dispatch_gbps": d_bytes / d_ms / 1e6,
                              "combine_us": c_ms * 1e3, "combine_gbps": c_bytes / c_ms / 1e6}
    finally:
        buf.destroy()
    return out


def run(gpus: int = 8, reps: int = 20) -> dict:
    require_gpus(gpus, "deepep")
    from epserve.model import deepep_dispatch as de
    if de.deep_ep is None:
        raise RuntimeError(f"bench deepep: deep_ep is not importable here ({de.IMPORT_ERROR}); "
                           "build it with scripts/build_native.sh --deepep DIR")
    per_rank = spawn(gpus, _worker, reps=reps)
    name = torch.cuda.get_device_name()
    nvlink = next((v for k, v in NVLINK_GBPS.items() if k in name), None)
    summary = {}
    for kind in ("normal", "low_latency"):
        rows = [r[kind] for r in per_rank]
        s = {k: round(min(r[k] for r in rows) if k.endswith("gbps") else max(r[k] for r in rows), 2)
             for k in ("dispatch_us", "dispatch_gbps", "combine_us", "combine_gbps")}
        if nvlink:
            s["dispatch_share_of_nvlink"] = round(s["dispatch_gbps"] / nvlink, 3)
            s["combine_share_of_nvlink"] = round(s["combine_gbps"] / nvlink, 3)
        summary[kind] = {"tokens_per_rank": rows[0]["tokens_per_rank"], **s}
    return {"device": name, "gpus": gpus, "hidden": HIDDEN, "experts": N_EXPERTS, "topk": TOPK,
            "nvlink_gbps_per_direction": nvlink, "worst_rank": summary, "per_rank": per_rank,
            "deepep": getattr(de.deep_ep, "__version__", None),
            "note": "worst rank: slowest latency, lowest bandwidth; bytes counted as DeepEP's tests count them"}
