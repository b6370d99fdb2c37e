"""Native kernels of DeepSeek-V3.2's sparse attention, behind kernels/reference_dsa.py's interface:
DeepGEMM 54e2261's `fp8_mqa_logits` for the indexer's scores, FlashMLA 9241ae3's `flash_mla_sparse_fwd`
for MLA over the chosen rows. kernels/native.py exports these names and runs `self_test` with its own.

Owns: the two adapters and the checks of what each kernel takes; outside it (other shapes, dtypes, CPU)
each adapter runs the reference, so the model never sees a shape error. Importable without CUDA or the
libraries (`deep_gemm` / `flash_mla` are None then, and `self_test` says so).
Never: changes the cache layout. What this does NOT use yet, and why:
  - DeepGEMM's paged `fp8_paged_mqa_logits` and FlashMLA's sparse FP8-cache decode (`flash_mla_with_kvcache`
    with indices) both read page-major FP8 layouts (per page: 64 x Di e4m3 keys then 64 fp32 scales;
    656-byte FP8 latents), while epserve's pool keeps one bf16 row per token [latent | index key]
    (model/kv_cache.py) so that every KV path moves both caches as rows. Decode therefore scores on
    kernels/triton_dsa.py's paged kernel over those bf16 rows (`dsa_paged_select`: the keys read once,
    through the block table, no gather) and attends with the bf16 sparse kernel.
Shape legend as kernels/reference_dsa.py.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from epserve.kernels import reference_dsa, triton_dsa
from epserve.kernels.reference import FP8, FP8_MAX

try:
    import deep_gemm
except Exception:  # not installed or its extension failed: the reference runs, self_test reports it
    deep_gemm = None
try:
    import flash_mla
except Exception:
    flash_mla = None

FLASH_SPARSE_HEADS = (64, 128)     # h_q FlashMLA's sparse prefill kernel is built for
FLASH_SPARSE_DQK = (512, 576)
FLASH_TOPK_BLOCK = 64              # it reads indices in blocks of 64 (config.h B_TOPK): pad with -1
MQA_LOGITS_HEADS = (32, 64)        # sm90 fp8_mqa_logits: heads and head dims it takes
MQA_LOGITS_DIMS = (32, 64, 128)
PAGED_LOGITS_HEADS = (16, 32, 64, 128)   # the Triton paged scorer: tl.dot needs >= 16 rows, a power of two


def _fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (e4m3 [..., D], fp32 scale [...]) with one scale per row (x ~= q * s)."""
    s = x.float().abs().amax(-1).clamp_min(1e-4) / FP8_MAX
    return (x.float() / s[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), s


def _mqa_logits_ok(q: torch.Tensor, keys: torch.Tensor) -> bool:
    return (deep_gemm is not None and q.is_cuda and keys.shape[0] == 1 and q.shape[1] in MQA_LOGITS_HEADS
            and q.shape[2] in MQA_LOGITS_DIMS)


def dsa_index_select(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, lens: torch.Tensor,
                     topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """reference_dsa.dsa_index_select; shared keys [1, N, Di] (a prefill sequence) score on DeepGEMM.

    DeepGEMM computes logits[t, s] = sum_h weights[t, h] * relu(q8[t, h] . k8[s] * k_scale[s]) over
    s in [ks[t], ke[t]) (-inf elsewhere). q gets one e4m3 scale per (token, head); as relu(a x) =
    a relu(x) for a > 0, that scale and 1/sqrt(Di) fold into the weights (DeepSeek's release does the same).
    """
    if not _mqa_logits_ok(q, keys):
        return reference_dsa.dsa_index_select(q, w, keys, lens, topk)
    t, n = q.shape[0], keys.shape[1]
    q8, q_s = _fp8_rows(q)                                   # [T, Hi, Di], [T, Hi]
    k8, k_s = _fp8_rows(keys[0])                             # [N, Di], [N]
    weights = (w.float() * q_s * q.shape[-1] ** -0.5).contiguous()
    ks = torch.zeros(t, dtype=torch.int32, device=q.device)
    logits = deep_gemm.fp8_mqa_logits(q8.contiguous(), (k8.contiguous(), k_s.contiguous()), weights, ks,
                                      lens.to(torch.int32).contiguous(), True, 0)   # [T, N] fp32, -inf past lens
    idx = logits.topk(min(topk, n), -1, sorted=False).indices     # a set: sparse MLA sums over it
    return idx, idx < lens.to(idx.device)[:, None]


def _paged_ok(q: torch.Tensor, cache_layer: torch.Tensor) -> bool:
    return (triton_dsa.tl is not None and q.is_cuda and cache_layer.dtype in (torch.bfloat16, torch.float16)
            and q.shape[1] in PAGED_LOGITS_HEADS and q.shape[2] in MQA_LOGITS_DIMS)


def dsa_paged_select(q: torch.Tensor, w: torch.Tensor, cache_layer: torch.Tensor, key_off: int,
                     block_tables: torch.Tensor, lens: torch.Tensor, s_q: int, topk: int) -> torch.Tensor:
    """reference_dsa.dsa_paged_select with the scores from kernels/triton_dsa.py's paged kernel (no
    gather of the keys): decode's indexer, where DeepGEMM's paged kernel would need an FP8 page layout."""
    if not _paged_ok(q, cache_layer):
        return reference_dsa.dsa_paged_select(q, w, cache_layer, key_off, block_tables, lens, s_q, topk)
    return triton_dsa.dsa_paged_select(q, w, cache_layer, key_off, block_tables, lens, s_q, topk)


def _sparse_ok(q_lat: torch.Tensor, kv_rows: torch.Tensor, v_dim: int) -> bool:
    return (flash_mla is not None and q_lat.is_cuda and q_lat.dtype == torch.bfloat16
            and kv_rows.dtype == torch.bfloat16 and q_lat.shape[1] in FLASH_SPARSE_HEADS
            and q_lat.shape[2] in FLASH_SPARSE_DQK and v_dim == 512 and kv_rows.stride(-1) == 1)


def sparse_mla(q_lat: torch.Tensor, kv_rows: torch.Tensor, slots: torch.Tensor, scale: float,
               v_dim: int) -> torch.Tensor:
    """reference_dsa.sparse_mla on FlashMLA's bf16 sparse kernel: the flat cache rows are its kv
    [S, 1, Dqk] (a strided view: rows are C wide, the kernel reads the first Dqk), slots its indices
    [T, 1, K'] with K padded to a multiple of 64 by -1 (invalid: skipped; a query with none gives 0)."""
    if not _sparse_ok(q_lat, kv_rows, v_dim):
        return reference_dsa.sparse_mla(q_lat, kv_rows, slots, scale, v_dim)
    d = q_lat.shape[-1]
    pad = -slots.shape[1] % FLASH_TOPK_BLOCK
    idx = F.pad(slots.to(torch.int32), (0, pad), value=-1)[:, None, :].contiguous()
    out, _, _ = flash_mla.flash_mla_sparse_fwd(q_lat.contiguous(), kv_rows[:, None, :d], idx, scale, v_dim)
    return out


def self_test(device) -> tuple[bool, str]:
    """Both adapters at DeepSeek-V3.2's shapes against the reference on seeded inputs: sparse MLA's
    output within bf16 rounding (calc_diff < 1e-4), and the indexer's choice: at least 99% of the
    top-k positions the same as the reference's on the same FP8-rounded q and keys (ties between
    near-equal scores may swap). Never raises."""
    try:
        dev = torch.device(device)
        if deep_gemm is None or flash_mla is None or dev.type != "cuda":
            return False, "needs CUDA, deep_gemm and flash_mla"
        g = torch.Generator(device=dev).manual_seed(0)
        # sparse MLA: 128 heads, 576-wide latents, 2048 of 5000 rows per query, some queries short
        q = torch.randn(37, 128, 576, device=dev, generator=g).bfloat16()
        rows = torch.randn(5000, 704, device=dev, generator=g).bfloat16()          # 576 latent + 128 index key
        slots = torch.randint(0, 5000, (37, 2048), device=dev, generator=g)
        slots[:5, 100:] = -1
        slots[5] = -1
        got, want = sparse_mla(q, rows, slots, 0.05, 512).float(), reference_dsa.sparse_mla(
            q, rows, slots, 0.05, 512).float()
        diff = 1 - 2 * (got * want).sum() / (got * got + want * want).sum().clamp_min(1e-30)
        if not diff < 1e-4 or got[5].abs().max() != 0:
            return False, f"sparse_mla: calc_diff {diff:.2e} (a query with no rows must give 0)"
        # the indexer: 64 heads x 128, 3000 keys, topk 2048, ragged visible lengths
        iq = torch.randn(40, 64, 128, device=dev, generator=g)
        keys = torch.randn(1, 3000, 128, device=dev, generator=g)
        w = torch.randn(40, 64, device=dev, generator=g)
        lens = torch.randint(1, 3001, (40,), device=dev, generator=g)
        (q8, qs), (k8, ks) = _fp8_rows(iq), _fp8_rows(keys)
        idx, ok = dsa_index_select(iq, w, keys, lens, 2048)
        r_idx, r_ok = reference_dsa.dsa_index_select(q8.float() * qs[..., None], w, k8.float() * ks[..., None],
                                                      lens, 2048)
        if not torch.equal(ok.sum(1), r_ok.sum(1)):
            return False, "dsa_index_select: chose a different number of visible positions"
        same = sum(len(set(a[m].tolist()) & set(b[n].tolist())) for a, m, b, n in zip(idx, ok, r_idx, r_ok))
        frac = same / max(1, int(r_ok.sum()))
        if frac < 0.99:
            return False, f"dsa_index_select: {frac:.4f} of the top-k positions agree (< 0.99)"
        # decode's paged indexer: 2 rows x 2 queries over 40 pages of 64 (scattered), ragged lengths
        cache = torch.randn(96, 64, 704, device=dev, generator=g).bfloat16()
        bt = torch.randperm(96, device=dev, generator=g)[:80].view(2, 40).int()
        pq = torch.randn(4, 64, 128, device=dev, generator=g).bfloat16().float()
        pw = torch.randn(4, 64, device=dev, generator=g)
        plens = torch.tensor([2559, 2560, 700, 701], device=dev)
        got = dsa_paged_select(pq, pw, cache, 576, bt, plens, 2, 2048)
        want = reference_dsa.dsa_paged_select(pq, pw, cache, 576, bt, plens, 2, 2048)
        if not torch.equal((got >= 0).sum(1), (want >= 0).sum(1)):
            return False, "dsa_paged_select: chose a different number of visible positions"
        agree = sum(len(set(a[a >= 0].tolist()) & set(b[b >= 0].tolist())) for a, b in zip(got, want))
        pfrac = agree / max(1, int((want >= 0).sum()))
        if pfrac < 0.99:
            return False, f"dsa_paged_select: {pfrac:.4f} of the top-k rows agree (< 0.99)"
        return True, (f"dsa: sparse_mla calc_diff {diff:.1e}, index top-k agreement {frac:.4f}, "
                      f"paged decode top-k agreement {pfrac:.4f}")
    except Exception as exc:
        return False, f"dsa self-test raised {type(exc).__name__}: {exc}"
