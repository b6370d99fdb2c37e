"""Per-GPU step-time model of DeepSeek-V3 prefill and decode, for the fleet simulator.

Owns: seconds one rank spends on one batch, and the tokens/s a unit sustains, from a
handful of calibrated coefficients. Calibrated from the seed's day (`from_seed`) or
from `epserve bench step` results (`from_bench`). Pure arithmetic: no Ray, no torch,
no I/O. `fleet/simulator.py` is its only user.

    prefill_s(new, cached, pairs) = prefill_fixed_s + prefill_s_per_new_token * new
                                    + prefill_s_per_attn_pair * pairs + prefill_s_per_cached_token * cached
    decode_step_s(n, kv)          = decode_fixed_s + decode_s_per_request * n + decode_s_per_kv_token * kv

pairs = core-attention (new token, context token) pairs, placement.prefill_balancer.attn_work:
cached tokens are context for the new ones but compute no rows of their own. kv = KV tokens
the rank's batch attends to (the sum of the running requests' lengths).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from epserve.placement.prefill_balancer import attn_work

# The seed's day (SEED.md "One day's statistics" and "Day and night"); figures the simulator is compared with.
# avg_output_speed_tps: the middle of the seed's 20-22 tokens/s.
SEED = {
    "avg_nodes": 226.75, "peak_nodes": 278.0, "trough_nodes": 68.0, "cost_usd": 87_072.0,
    "revenue_usd": 562_027.0, "margin_pct": 545.0, "input_tokens": 608e9, "cache_hit_rate": 0.563,
    "output_tokens": 168e9, "avg_output_speed_tps": 21.0, "avg_kv_len_per_output_token": 4_989.0,
    "prefill_input_tps_per_node": 73_700.0, "decode_output_tps_per_node": 14_800.0,
}
GPUS_PER_NODE = 8
# The request mix assumed for the seed's day (the seed gives only averages): lognormal prompts of
# mean 3,910 tokens (cv 1), a Beta-distributed cached fraction per prompt (mean 56.3 %, concentration 2),
# lognormal outputs of mean 1,080 tokens (cv 1). Then input/output = 608/168 and the KV length per
# output token is E[P] + (E[O^2]/E[O] - 1)/2 = 3,909.3 + 1,079.7 = 4,989, as in SEED.
SEED_MIX = {"prompt_tokens": 3_909.3, "prompt_cv": 1.0, "hit_concentration": 2.0,
            "output_tokens": 1_080.2, "output_cv": 1.0}

# DeepSeek-V3 shapes (61 layers, 128 heads, MLA latent 512 + rope 64, 37 B activated parameters).
KV_BYTES_PER_TOKEN = 61 * (512 + 64) * 2           # BF16 latent cache, all layers: 70,272 bytes
HBM_BYTES_PER_S = 3.0e12                           # FlashMLA's memory-bound rate on H800 (SEED)
LINEAR_FLOPS_PER_TOKEN = 2 * 37e9                  # FP8 GEMMs (attention projections, experts, head)
ATTN_FLOPS_PER_PAIR = 61 * 128 * 2 * (192 + 128)   # BF16 QK^T (192-dim) and PV (128-dim) per head
BF16_COST_VS_FP8 = 2.0                             # a BF16 FLOP costs two FP8 FLOPs' time on Hopper


def mix_attn_pairs_per_new_token(prompt_tokens: float, prompt_cv: float, hit_rate: float,
                                 hit_concentration: float) -> float:
    """E[attn_work] / E[new tokens] for lognormal prompts P (mean, cv) with a Beta(mean hit_rate,
    concentration) cached fraction h: new = P(1-h), attn_work = new * (P h + new/2) = P^2 (1-h^2)/2."""
    mean_p2 = prompt_tokens ** 2 * (1 + prompt_cv ** 2)
    mean_h2 = hit_rate ** 2 + hit_rate * (1 - hit_rate) / (hit_concentration + 1)
    return mean_p2 * (1 - mean_h2) / (2 * prompt_tokens * (1 - hit_rate))


@dataclass(frozen=True, kw_only=True)
class CostModel:
    """Seconds per rank batch. prefill_*: one prefill batch of up to prefill_max_batch_tokens new tokens;
    decode_*: one decode step of up to decode_max_batch requests whose KV fits in kv_tokens_per_gpu."""

    prefill_fixed_s: float
    prefill_s_per_new_token: float
    prefill_s_per_attn_pair: float
    prefill_s_per_cached_token: float = 0.0
    prefill_max_batch_tokens: int = 16_384
    decode_fixed_s: float
    decode_s_per_request: float = 0.0
    decode_s_per_kv_token: float
    decode_max_batch: int = 128
    kv_tokens_per_gpu: int = 700_000
    source: str = ""

    def __post_init__(self):
        for name in ("prefill_fixed_s", "prefill_s_per_new_token", "prefill_s_per_attn_pair",
                     "prefill_s_per_cached_token", "decode_fixed_s", "decode_s_per_request", "decode_s_per_kv_token"):
            value = getattr(self, name)
            if not 0 <= value < math.inf:
                raise ValueError(f"CostModel.{name}={value} must be finite and >= 0")
        if self.prefill_s_per_new_token + self.prefill_s_per_attn_pair <= 0:
            raise ValueError("CostModel: prefill_s_per_new_token + prefill_s_per_attn_pair must be > 0")
        if self.decode_fixed_s + self.decode_s_per_request <= 0:
            raise ValueError("CostModel: decode_fixed_s + decode_s_per_request must be > 0")
        for name in ("prefill_max_batch_tokens", "decode_max_batch", "kv_tokens_per_gpu"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"CostModel.{name}={getattr(self, name)!r} must be a whole number >= 1")

    # ---------------------------------------------------------------- prefill
    def prefill_s(self, new_tokens: float, cached_tokens: float = 0.0, attn_pairs: float | None = None) -> float:
        """Seconds for one rank's prefill batch: new_tokens computed, cached_tokens loaded.

        attn_pairs: the batch's core-attention pairs; default: one prompt, attn_work(new, cached).
        An empty batch (no tokens) takes 0 s.
        """
        if new_tokens < 0 or cached_tokens < 0:
            raise ValueError(f"new_tokens={new_tokens}, cached_tokens={cached_tokens} must be >= 0")
        if new_tokens + cached_tokens <= 0:
            return 0.0
        pairs = attn_work(new_tokens, cached_tokens) if attn_pairs is None else attn_pairs
        return (self.prefill_fixed_s + self.prefill_s_per_new_token * new_tokens
                + self.prefill_s_per_attn_pair * pairs + self.prefill_s_per_cached_token * cached_tokens)

    def prefill_unit_tps(self, n_gpus: int, new_tokens: float, cached_tokens: float, attn_pairs: float) -> float:
        """Input tokens/s (cache hits included, as in SEED) that n_gpus ranks sustain in full batches
        of a traffic mix whose requests total new_tokens, cached_tokens and attn_pairs."""
        if new_tokens <= 0:
            raise ValueError(f"new_tokens={new_tokens}: a prefill mix needs uncached tokens")
        scale = self.prefill_max_batch_tokens / new_tokens  # one full batch of the mix
        batch_s = self.prefill_s(self.prefill_max_batch_tokens, cached_tokens * scale, attn_pairs * scale)
        return n_gpus * (new_tokens + cached_tokens) * scale / batch_s

    # ---------------------------------------------------------------- decode
    def decode_step_s(self, n_requests: float, kv_tokens: float) -> float:
        """Seconds for one rank's decode step over n_requests whose KV lengths sum to kv_tokens (0 s when idle)."""
        if n_requests < 0 or kv_tokens < 0:
            raise ValueError(f"n_requests={n_requests}, kv_tokens={kv_tokens} must be >= 0")
        if n_requests == 0:
            return 0.0
        return self.decode_fixed_s + self.decode_s_per_request * n_requests + self.decode_s_per_kv_token * kv_tokens

    def decode_batch_limit(self, kv_per_request: float) -> int:
        """Most requests of kv_per_request tokens one rank holds: decode_max_batch, or fewer when KV runs out."""
        by_kv = int(self.kv_tokens_per_gpu // max(kv_per_request, 1.0))
        return max(1, min(self.decode_max_batch, by_kv))

    def decode_unit_tps(self, n_gpus: int, kv_per_request: float) -> float:
        """Output tokens/s n_gpus ranks sustain with full batches of requests of kv_per_request KV tokens."""
        n = self.decode_batch_limit(kv_per_request)
        return n_gpus * n / self.decode_step_s(n, n * kv_per_request)

    def decode_requests_per_gpu(self, output_tps_per_gpu: float, kv_per_request: float) -> float:
        """Running requests per rank that generate output_tps_per_gpu tokens/s (n / step(n) = rate);
        the batch limit when the rate is beyond a full batch."""
        limit = self.decode_batch_limit(kv_per_request)
        slope = self.decode_s_per_request + self.decode_s_per_kv_token * kv_per_request
        room = 1.0 - output_tps_per_gpu * slope
        if output_tps_per_gpu <= 0:
            return 0.0
        if room <= 0:
            return float(limit)
        return min(float(limit), output_tps_per_gpu * self.decode_fixed_s / room)

    # ---------------------------------------------------------------- calibration
    @classmethod
    def from_seed(cls, *, output_speed_tps: float = 21.0, attn_pairs_per_new_token: float | None = None,
                  prefill_fixed_s: float = 0.03, decode_max_batch: int = 128,
                  kv_tokens_per_gpu: int = 700_000) -> CostModel:
        """Calibrated so the seed's day is reproduced (SEED figures are 24-hour averages, not peaks).

        Decode: 1,850 output tokens/s per GPU at output_speed_tps per request (SEED: 20-22) means
        1850/21 = 88 running requests per GPU, one step every 47.6 ms, at 4,989 KV tokens each.
        Core attention reads every KV token once per step (memory-bound, KV_BYTES_PER_TOKEN at
        HBM_BYTES_PER_S: 23 ns/token, 10.3 ms of the step); the rest (GEMMs on ~88 rows, weight
        reads, dispatch/combine latency) does not grow with the batch at this size: decode_fixed_s.
        A full batch of 128 then runs 2.45 k tokens/s per GPU, so the seed's fleet ran at
        1.85/2.45 = 76 % of its decode capacity on average.
        Prefill: assume the same 76 %, so a GPU sustains 9.2 k / 0.76 = 12.2 k input tokens/s at the
        seed's mix (56.3 % cached; attn_pairs_per_new_token, default SEED_MIX's 5,377), split between
        GEMMs and core attention by their FLOPs (BF16 attention at half the FP8 rate): 58 % / 42 %.
        """
        s_kv = KV_BYTES_PER_TOKEN / HBM_BYTES_PER_S
        tps = SEED["decode_output_tps_per_node"] / GPUS_PER_NODE
        kv = SEED["avg_kv_len_per_output_token"]
        n_avg = tps / output_speed_tps
        decode_fixed_s = 1.0 / output_speed_tps - s_kv * n_avg * kv
        if decode_fixed_s <= 0:
            raise ValueError(f"output_speed_tps={output_speed_tps} leaves no time for the step outside attention")
        full = decode_max_batch / (decode_fixed_s + s_kv * decode_max_batch * kv)
        utilization = tps / full

        hit = SEED["cache_hit_rate"]
        pairs_per_new = attn_pairs_per_new_token or mix_attn_pairs_per_new_token(
            SEED_MIX["prompt_tokens"], SEED_MIX["prompt_cv"], hit, SEED_MIX["hit_concentration"])
        input_tps = SEED["prefill_input_tps_per_node"] / GPUS_PER_NODE / utilization
        batch = 16_384
        per_new_s = batch / (input_tps * (1 - hit))  # seconds per full batch of `batch` new tokens
        variable = per_new_s - prefill_fixed_s
        attn_flops = pairs_per_new * ATTN_FLOPS_PER_PAIR * BF16_COST_VS_FP8
        lin_share = LINEAR_FLOPS_PER_TOKEN / (LINEAR_FLOPS_PER_TOKEN + attn_flops)
        return cls(
            prefill_fixed_s=prefill_fixed_s, prefill_s_per_new_token=variable * lin_share / batch,
            prefill_s_per_attn_pair=variable * (1 - lin_share) / (batch * pairs_per_new),
            prefill_max_batch_tokens=batch, decode_fixed_s=decode_fixed_s, decode_s_per_kv_token=s_kv,
            decode_max_batch=decode_max_batch, kv_tokens_per_gpu=kv_tokens_per_gpu,
            source=(f"seed: decode {tps:,.0f} tok/s/GPU at {output_speed_tps:g} tok/s -> {n_avg:.0f} requests/GPU; "
                    f"full batch of {decode_max_batch} -> {full:,.0f} tok/s/GPU (seed ran at {utilization:.0%}); "
                    f"prefill {input_tps:,.0f} input tok/s/GPU at {hit:.1%} cache hits"),
        )

    @classmethod
    def from_bench(cls, bench: dict | list, fallback: CostModel | None = None) -> CostModel:
        """Calibrated from `epserve bench step` JSON: one result or a list (a prefill and/or a decode one).

        Each item is the CLI's {"bench": "step", "results": R} or the bare R of `bench/step.py`, read as
        R["phase"] ("prefill" | "decode"), R["tokens_per_s_per_gpu_61_layers"] (tokens/s per GPU),
        R["assumptions"]["tokens_per_gpu"] (batch: prefill tokens, decode requests) and
        R["assumptions"]["context"] (prefill prompt length, no cache; decode mean KV length), and,
        when present, R["ms"]["attention"] and R["ms"]["model_61_layers"] (one layer's attention and
        the whole model, ms) to split the decode step. A phase not given comes from `fallback`;
        ValueError when it is missing and no fallback is given, or when a field is missing or bad.
        The bench times compute only (no dispatch/combine), so its fixed costs are lower than the seed's.
        """
        items = bench if isinstance(bench, (list, tuple)) else [bench]
        phases = {}
        for i, item in enumerate(items):
            r = item.get("results", item) if isinstance(item, dict) else None
            phase, tps, n, ctx = (_field(r, i, k) for k in
                                  ("phase", "tokens_per_s_per_gpu_61_layers", "assumptions.tokens_per_gpu",
                                   "assumptions.context"))
            if phase not in ("prefill", "decode"):
                raise ValueError(f"bench result {i}: phase={phase!r} must be 'prefill' or 'decode'")
            for name, value in (("tokens_per_s_per_gpu_61_layers", tps), ("assumptions.tokens_per_gpu", n),
                                ("assumptions.context", ctx)):
                if not (isinstance(value, (int, float)) and 0 < value < math.inf):
                    raise ValueError(f"bench result {i} ({phase}): {name}={value!r} must be a number > 0")
            phases[phase] = (float(tps), float(n), float(ctx), r.get("ms") or {})
        missing = [p for p in ("prefill", "decode") if p not in phases]
        if missing and fallback is None:
            raise ValueError(f"bench results lack the {' and '.join(missing)} phase; run `epserve bench step "
                             f"--phase {missing[0]}` or pass a fallback CostModel")
        base = fallback or cls.from_seed()
        fields = {k: getattr(base, k) for k in cls.__dataclass_fields__ if k != "source"}
        notes = []
        if "prefill" in phases:  # prompts of ctx tokens, nothing cached: ctx / 2 pairs per token
            tps, n, ctx, _ = phases["prefill"]
            attn = ctx / 2 * ATTN_FLOPS_PER_PAIR * BF16_COST_VS_FP8
            share = LINEAR_FLOPS_PER_TOKEN / (LINEAR_FLOPS_PER_TOKEN + attn)
            fields.update(prefill_fixed_s=0.0, prefill_s_per_new_token=share / tps,
                          prefill_s_per_attn_pair=(1 - share) / tps / (ctx / 2), prefill_max_batch_tokens=int(n))
            notes.append(f"prefill {tps:,.0f} tok/s/GPU at {n:.0f} tokens of {ctx:.0f}-token prompts")
        if "decode" in phases:
            tps, n, ctx, ms = phases["decode"]
            step = n / tps
            attn, whole = ms.get("attention"), ms.get("model_61_layers")
            if isinstance(attn, (int, float)) and isinstance(whole, (int, float)) and 0 < 61 * attn < whole:
                s_kv = step * 61 * attn / whole / (n * ctx)
            else:
                s_kv = min(KV_BYTES_PER_TOKEN / HBM_BYTES_PER_S, 0.5 * step / (n * ctx))
            fields.update(decode_fixed_s=step - s_kv * n * ctx, decode_s_per_request=0.0,
                          decode_s_per_kv_token=s_kv, decode_max_batch=int(n))
            notes.append(f"decode {tps:,.0f} tok/s/GPU at {n:.0f} requests of {ctx:.0f} KV tokens")
        notes += [f"{p} from {'fallback' if fallback else 'seed'}" for p in missing]
        return cls(**fields, source="bench: " + "; ".join(notes))


def _field(result, i: int, dotted: str):
    """result[a][b] for dotted 'a.b'; ValueError naming the item and the field when absent."""
    value = result
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            raise ValueError(f"bench result {i}: missing field {dotted!r}; expected the JSON of `epserve bench "
                             'step`: {"results": {"phase": ..., "tokens_per_s_per_gpu_61_layers": ..., '
                             '"assumptions": {"tokens_per_gpu": ..., "context": ...}}}')
        value = value[key]
    return value
