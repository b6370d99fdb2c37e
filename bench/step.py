"""One EP rank's step at DeepSeek-V3 shapes, timed. Headline (`run_step`): the production schedule on
the emulated EP rank (bench/step_ep.py: two micro-batches, the rank's received rows under skewed
loads, exchanges held for DeepEP's published time, exposed vs hidden exchange time per layer).
Secondary (`run`): one layer's one-batch work with no exchange, extrapolated to the 61-layer model.

Owns: a V3-sized layer (or V3.2's, `a.is_dsa`: MLA with its lightning indexer, whose stages
bench/step_dsa.py times; bench/step_long.py sweeps it against V3 at long context) built from
model/deepseek_v3.py's classes (MLA, Gate, MLP) and
model/moe_dispatch.py's ExpertShard with random FP8 weights (128x128 scales, 1x128
activation quantisation), run eagerly through one kernel backend. `run()` returns a
JSON-able dict; `python -m epserve.bench.step --phase prefill|decode [--out FILE]`.

Assumptions (DeepSeek's published deployment, V3 dims: hidden 7168, 128 heads, q_lora 1536,
kv_lora 512, rope 64, nope 128, v 128, 256 experts of inter 2048, top-8, 1 shared expert):
  prefill: EP32 rank (4 nodes x 8), 9 routed slots + the shared expert, 16384 tokens per GPU
           as 4 prompts of 4096 (no cached prefix). Every rank sends T*K pair rows spread over
           32 ranks, so a rank receives on average 32*16384*8/32 = 131072 pair rows, ~14.6K per slot.
  decode:  EP144 rank (18 nodes x 8), 2 routed slots + the shared expert, 128 requests with
           context uniform in [4096, 6144] (mean ~5K); receives 144*128*8/144 = 1024 pair rows.
Routing is uniform over the local slots (what EPLB aims for). Not timed: dispatch/combine
communication (it overlaps with compute in DeepSeek's two-micro-batch schedule), embedding,
LM head, sampling, MTP. Decode stages are timed as CUDA-graph replays (as the engine runs them;
--eager times the launches too); prefill runs eagerly.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import math

import torch

from epserve import kernels
from epserve.bench.kernels import emit, env_info, graphed, rand_experts, rand_fp8_weight, time_ms
from epserve.bench.step_dsa import attach_indexer, dsa_parts
from epserve.kernels.layouts import masked_layout
from epserve.model.deepseek_v3 import MLA, MLP, Batch, DecodeBatch, Gate, ModelArgs
from epserve.model.rope import rope_inv_freq
from epserve.model.moe_dispatch import ExpertShard

V3 = ModelArgs(rope_type="yarn", rope_factor=40.0, mscale=1.0, mscale_all_dim=1.0)
PHASES = {
    "prefill": dict(ranks=32, slots=9, tokens=16384, prompt=4096, deepseek_tokens_per_s=9200,
                    deepseek_note="73.7k input tokens/s per H800 node incl. cache hits / 8 GPUs"),
    "decode": dict(ranks=144, slots=2, tokens=128, ctx=5120, deepseek_tokens_per_s=1850,
                   deepseek_note="14.8k output tokens/s per H800 node / 8 GPUs"),
}


def build_layer(a: ModelArgs, kb, dev, g, slots: int):
    """-> (MLA, Gate, shared MLP, ExpertShard, dense MLP, norms) with random FP8 weights."""
    def w(n, k):
        return rand_fp8_weight(n, k, dev, g)

    ones = lambda n: torch.ones(n, device=dev, dtype=torch.bfloat16)  # noqa: E731
    h = a.n_heads
    mla = MLA(a, kb, wq_a=w(a.q_lora_rank, a.dim), q_norm=ones(a.q_lora_rank), wq_b=w(h * a.qk_head_dim, a.q_lora_rank),
              wkv_a=w(a.kv_dim, a.dim), kv_norm=ones(a.kv_lora_rank),
              wkv_b=w(h * (a.qk_nope_head_dim + a.v_head_dim), a.kv_lora_rank), wo=w(a.dim, h * a.v_head_dim))
    if a.is_dsa:         # V3.2: the lightning indexer beside MLA (bench/step_dsa.py)
        attach_indexer(mla, a, dev, g)
    gate = Gate(a, weight=torch.randn(a.n_routed_experts, a.dim, device=dev, generator=g) / a.dim ** 0.5,
                bias=torch.zeros(a.n_routed_experts, device=dev), kb=kb)
    inter = a.moe_inter_dim
    shared = MLP(kb, w1=w(inter * a.n_shared_experts, a.dim), w2=w(a.dim, inter * a.n_shared_experts),
                 w3=w(inter * a.n_shared_experts, a.dim))
    shard = ExpertShard(rand_experts(slots, dev, g, inter, a.dim))
    dense = MLP(kb, w1=w(a.inter_dim, a.dim), w2=w(a.dim, a.inter_dim), w3=w(a.inter_dim, a.dim))
    return mla, gate, shared, shard, dense, ones(a.dim), ones(a.dim)


def make_batch(phase: str, p: dict, dev, g, page: int = 64, a: ModelArgs = V3):
    """-> (Batch or DecodeBatch, cache_layer [pages, 64, a.cache_dim] bf16) for one rank's step (V3: 576;
    V3.2: 704, the latent and the index key).

    Prefill with p["cached"] = f: prompts of p["prompt"] tokens whose first f of tokens are in the
    cache (the on-disk KV cache's hits, loaded before the step), so each step computes
    p["tokens"] new tokens that attend to the whole prompt."""
    if phase == "prefill":
        total = p["prompt"]
        ctx = int(total * p.get("cached", 0.0)) // page * page
        n = total - ctx
        n_seq = max(1, p["tokens"] // n)
        width = math.ceil(total / page)
        table = torch.arange(n_seq * width, device=dev).view(n_seq, width)
        pos = torch.arange(ctx, total, device=dev).repeat(n_seq)
        slots = (table[:, :, None] * page + torch.arange(page, device=dev)).flatten(1)[:, ctx:total].flatten()
        batch = Batch(pos.clone(), pos, [n] * n_seq, [ctx] * n_seq, table, slots)
        cache = torch.randn(n_seq * width, page, a.cache_dim, device=dev, generator=g, dtype=torch.bfloat16)
        return batch, cache
    b, ctx, n_q = p["tokens"], p["ctx"], p.get("n_q", 1)
    lens = (torch.rand(b, device=dev, generator=g) * 0.4 + 0.8).mul(ctx).long()
    width = math.ceil(int(lens.max()) / page)
    table = torch.argsort(torch.rand(b * width, device=dev, generator=g)).view(b, width).int()
    pos = (lens[:, None] - n_q + torch.arange(n_q, device=dev)).flatten()   # n_q > 1: an MTP verify step
    cache = torch.randn(b * width, page, a.cache_dim, device=dev, generator=g, dtype=torch.bfloat16)
    rows = torch.arange(b, device=dev)
    return DecodeBatch.from_rows(pos.clone(), pos, rows, table, page, scratch_row=-1, n_q=n_q), cache


def run(device: str = "cuda", backend: str = "triton", phase: str = "prefill", tokens: int | None = None,
        graphs: bool = True, cached: float = 0.0) -> dict:
    """Time attention, MoE FFN and dense FFN of one layer -> per-GPU tokens/s for 61 layers; and
    the same work as two half micro-batches, what the overlapped schedules pay in compute.
    Decode stages run as CUDA graphs (what the engine replays) unless graphs=False."""
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {', '.join(PHASES)}, got {phase!r}")
    dev, p, a = torch.device(device), dict(PHASES[phase]), V3
    if tokens:
        p["tokens"] = tokens
    if cached:
        if phase != "prefill" or not 0 <= cached < 1:
            raise ValueError(f"cached: a prefill prefix-hit fraction in [0, 1), got {cached!r} for {phase}")
        p["cached"] = cached
    kb = kernels.get_backend(backend, dev)
    g = torch.Generator(device=dev).manual_seed(0)
    layer = build_layer(a, kb, dev, g, p["slots"])
    use_graphs = graphs and phase == "decode"
    ms, stages = _layer_ms(phase, p, layer, kb, dev, g, use_graphs)
    half, _ = _layer_ms(phase, {**p, "tokens": p["tokens"] // 2}, layer, kb, dev, g, use_graphs)
    split_ms = {k: 2 * v for k, v in half.items()}
    moe_layer, dense_layer = ms["attention"] + ms["moe_ffn"], ms["attention"] + ms["dense_ffn"]
    split_moe_layer = split_ms["attention"] + split_ms["moe_ffn"]
    total = a.n_dense_layers * dense_layer + a.n_moe_layers * moe_layer + ms.get("mla_plan_per_step", 0.0)
    t = p["tokens"]
    n_input = t
    if p.get("cached"):
        ctx = int(p["prompt"] * p["cached"]) // 64 * 64
        n_seq = max(1, t // (p["prompt"] - ctx))
        t, n_input = n_seq * (p["prompt"] - ctx), n_seq * p["prompt"]
    return {
        "env": env_info(dev, backend), "phase": phase,
        "assumptions": {"ep_ranks": p["ranks"], "routed_slots_per_gpu": p["slots"], "tokens_per_gpu": t,
                        "pair_rows_received": p["tokens"] * a.n_activated_experts,
                        "context": p.get("ctx", p.get("prompt")), "cached_prefix_fraction": p.get("cached", 0.0),
                        "layers": {"dense": a.n_dense_layers, "moe": a.n_moe_layers},
                        "softmax_scale": a.softmax_scale, "cuda_graphs": use_graphs,
                        "not_timed": "dispatch/combine communication, embedding, LM head, sampling, MTP"},
        "ms": {**ms, "moe_layer": moe_layer, "dense_layer": dense_layer, "model_61_layers": total},
        "stages_ms": stages,
        "moe_layer_share": {k: round(v / moe_layer, 3) for k, v in stages.items()},
        "held_back_by": max(stages, key=stages.get),
        "two_micro_batches": {"ms": {**split_ms, "moe_layer": split_moe_layer},
                              "compute_overhead_of_split": round(split_moe_layer / moe_layer - 1, 4),
                              "note": "the MoE layer's work as two micro-batches of half the tokens, run one "
                                      "after the other; the overlapped schedules pay this to hide the exchanges"},
        "tokens_per_s_per_gpu_one_moe_layer": t / moe_layer * 1e3,
        "tokens_per_s_per_gpu_61_layers": t / total * 1e3,
        "input_tokens_per_s_per_gpu_61_layers": n_input / total * 1e3,
        "cached_fraction": p.get("cached", 0.0), "computed_tokens_per_step": t, "input_tokens_per_step": n_input,
        "deepseek_tokens_per_s_per_gpu": p["deepseek_tokens_per_s"], "deepseek_note": p["deepseek_note"],
    }


def layer_ms(a: ModelArgs, phase: str, tokens: int, ctx: int, slots: int, backend: str = "native",
             graphs: bool = True, device: str = "cuda") -> dict:
    """ms of attention, MoE FFN and dense FFN of one layer of `a` (a checkpoint's shape) on one GPU:
    what bench engine compares the whole engine's step against."""
    dev = torch.device(device)
    kb = kernels.get_backend(backend, dev)
    g = torch.Generator(device=dev).manual_seed(0)
    p = {"tokens": tokens, "slots": slots, "ctx": ctx, "prompt": ctx}
    with torch.inference_mode():
        main, _ = _layer_ms(phase, p, build_layer(a, kb, dev, g, slots), kb, dev, g, graphs and phase == "decode", a)
    return main


def _layer_ms(phase: str, p: dict, layer, kb, dev, g, use_graphs: bool = False, a: ModelArgs = V3) -> dict:
    """ms of attention, MoE FFN and dense FFN for one rank's step of p["tokens"] tokens."""
    mla, gate, shared, shard, dense, attn_norm, ffn_norm = layer
    batch, cache = make_batch(phase, p, dev, g, a=a)
    t = batch.n_tokens
    inv_freq, factor = rope_inv_freq(a)
    ang = batch.positions.float()[:, None] * inv_freq.to(dev)[None]
    rope = ((ang.cos() * factor).bfloat16(), (ang.sin() * factor).bfloat16())
    hidden = torch.randn(t, a.dim, device=dev, generator=g, dtype=torch.bfloat16)
    rows = t * a.n_activated_experts  # = T_all * K / ranks with T_all = ranks * t
    recv_x = torch.randn(rows, a.dim, device=dev, generator=g, dtype=torch.bfloat16)
    recv_slot = torch.randint(0, p["slots"], (rows,), device=dev, generator=g)
    # the combine: each token gets back its K expert rows (row_of_pair[t*K + k] is where pair (t, k)'s
    # row sits in the expert-sorted receive order) and sums them with its gate weights, as DeepEP's
    # combine and moe_dispatch.run_static do: a gather and a dense reduction, no scatter-add atomics
    pair_w = torch.rand(t, a.n_activated_experts, device=dev, generator=g, dtype=torch.bfloat16)
    row_of_pair = torch.randperm(rows, device=dev, generator=g)
    # DeepEP hands the expert side FP8 rows; a backend whose GEMMs take them gets them so
    recv_in = kb.per_token_group_quant_fp8(recv_x) if getattr(kb, "TAKES_FP8_ROWS", False) else recv_x
    if phase == "decode":   # what DeepEP's low-latency dispatch hands the rank: [slots, max_m, D] + counts
        lay = masked_layout(recv_slot, p["slots"], rows)
        buf = recv_x.new_zeros(p["slots"], -(-rows // 128) * 128, a.dim)   # whole tiles, as moe_dispatch sizes them
        buf[lay.group, lay.slot] = recv_x
        per_slot = max(1, rows // p["slots"])
        flat = lay.group * buf.shape[1] + lay.slot

    # FlashMLA's tile-scheduler plan: made once per step, filled by the first layer, reused by the
    # other 60 (as RankEngine does); its cost is timed apart and counted once per step
    plan = kb.plan_mla_decode()

    def attention():
        b = dataclasses.replace(batch, plan=plan)
        return hidden + mla.forward(kb.rms_norm(hidden, attn_norm, a.rms_norm_eps), b, rope, cache)

    def moe_ffn():
        x = kb.rms_norm(hidden, ffn_norm, a.rms_norm_eps)
        gate.forward(x)  # routing decides the dispatch (its communication is not timed)
        if phase == "decode":
            y = kb.expert_ffn_masked(buf, shard.experts, lay.masked_m, per_slot).view(-1, a.dim)[flat]
        else:
            y = shard.compute(kb, recv_in, recv_slot)
        combined = kb.combine_rows(y, pair_w, row_of_pair)  # the combine's reduction
        return hidden + combined + shared.forward(x)

    def dense_ffn():
        return hidden + dense.forward(kb.rms_norm(hidden, ffn_norm, a.rms_norm_eps))

    # the pieces, each timed on its own, so the JSON says which one holds the layer back
    xn = kb.rms_norm(hidden, ffn_norm, a.rms_norm_eps)
    q_lat = torch.randn(t, a.n_heads, a.kv_dim, device=dev, generator=g, dtype=torch.bfloat16)

    if phase == "prefill" and not a.is_dsa:     # core attention of each prompt alone: its new tokens over its whole context
        n_new, n_all = batch.seq_new[0], batch.seq_new[0] + batch.seq_ctx[0]
        qkv = [(torch.randn(n_new, a.n_heads, a.qk_head_dim, device=dev, generator=g, dtype=torch.bfloat16),
                torch.randn(n_all, a.n_heads, a.qk_head_dim, device=dev, generator=g, dtype=torch.bfloat16),
                torch.randn(n_all, a.n_heads, a.v_head_dim, device=dev, generator=g, dtype=torch.bfloat16))
               for _ in batch.seq_new]

    if phase == "decode" and batch.n_q > 1:
        q_lat = q_lat.view(-1, batch.n_q, *q_lat.shape[1:])

    def attn_core(fresh: bool = False):
        if phase == "decode":
            return kb.mla_decode(q_lat, cache, batch.block_tables, batch.seq_lens, a.softmax_scale, a.kv_lora_rank,
                                 kb.plan_mla_decode() if fresh else plan)
        return [kb.mla_prefill(q, k, v, a.softmax_scale) for q, k, v in qkv]

    def routed():
        if phase == "decode":
            return kb.expert_ffn_masked(buf, shard.experts, lay.masked_m, per_slot)
        return shard.compute(kb, recv_in, recv_slot)

    def combine():
        return kb.combine_rows(recv_x, pair_w, row_of_pair)

    parts = (("attention", attention), ("moe_ffn", moe_ffn), ("dense_ffn", dense_ffn),
             *(dsa_parts(mla, kb, batch, cache, kb.rms_norm(hidden, attn_norm, a.rms_norm_eps), rope) if a.is_dsa
               else (("attention.core", attn_core),)),
             ("moe.gate", lambda: gate.forward(xn)), ("moe.routed_experts", routed),
             ("moe.shared_expert", lambda: shared.forward(xn)), ("moe.combine_reduction", combine))
    if phase == "decode" and not a.is_dsa:      # V3.2 plans nothing: its core reads K rows per query
        parts += (("planned_core", lambda: attn_core(fresh=True)),)
    reps, warm = p.get("reps") or ((5, 2) if phase == "prefill" else (20, 3))    # p["reps"]: (reps, warm-up)
    out = {}
    with torch.inference_mode():
        for name, fn in parts:
            out[name] = time_ms(graphed(fn) if use_graphs else fn, warmup=warm, reps=reps)
    main = {k: out.pop(k) for k in ("attention", "moe_ffn", "dense_ffn")}
    if "planned_core" in out:    # once per step, not per layer
        main["mla_plan_per_step"] = max(0.0, out.pop("planned_core") - out["attention.core"])
    out["attention.projections_and_rest"] = main["attention"] - out["attention.core"]
    return main, out


# Small shapes for `--mtp --small` (CPU): the same code at a few hundred wide, not V3's numbers.
SMALL = ModelArgs(dim=256, inter_dim=512, moe_inter_dim=128, n_layers=4, n_dense_layers=1, n_heads=4,
                  n_routed_experts=16, n_activated_experts=4, n_expert_groups=1, n_limited_groups=1, q_lora_rank=128,
                  kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=64, v_head_dim=32)


def run_mtp(device: str = "cuda", backend: str = "triton", tokens: int | None = None, graphs: bool = True,
            small: bool = False, acceptance: float = 0.85) -> dict:
    """MTP at V3 decode shapes: one layer of a plain decode step (B tokens) against one layer of a
    1 + 1 verify step (B sequences x 2 causal query positions), the 61-layer steps from them plus
    the MTP module (one more MoE layer over the verify step's 2B positions), and the projected
    output tokens/s per GPU at `acceptance` (1 + acceptance tokens per sequence per step)."""
    dev = torch.device(device)
    a = SMALL if small else V3
    p = dict(PHASES["decode"])
    if small:
        p.update(tokens=16, ctx=512, slots=4)
    if tokens:
        p["tokens"] = tokens
    use_graphs = graphs and dev.type == "cuda"
    kb = kernels.get_backend(backend, dev)
    g = torch.Generator(device=dev).manual_seed(0)
    layer = build_layer(a, kb, dev, g, p["slots"])
    with torch.inference_mode():
        one, one_stages = _layer_ms("decode", p, layer, kb, dev, g, use_graphs, a)
        two, two_stages = _layer_ms("decode", {**p, "n_q": 2}, layer, kb, dev, g, use_graphs, a)
    b = p["tokens"]

    def model_ms(ms):
        return (a.n_dense_layers * (ms["attention"] + ms["dense_ffn"])
                + a.n_moe_layers * (ms["attention"] + ms["moe_ffn"]) + ms.get("mla_plan_per_step", 0.0))
    plain = model_ms(one)
    verify = model_ms(two) + two["attention"] + two["moe_ffn"]          # + the MTP layer's block
    per_step = 1 + acceptance
    return {
        "env": env_info(dev, backend), "shapes": "small (CPU)" if small else "DeepSeek-V3",
        "assumptions": {"requests_per_gpu": b, "context": p["ctx"], "routed_slots_per_gpu": p["slots"],
                        "draft_tokens": 1, "acceptance": acceptance, "cuda_graphs": use_graphs,
                        "layers": {"dense": a.n_dense_layers, "moe": a.n_moe_layers, "mtp": 1},
                        "not_timed": "communication, embedding, LM head, sampling and acceptance, the MTP "
                                     "module's eh_proj GEMM (2B x 2D x D)"},
        "layer_ms": {"plain_1_token": one, "verify_1_plus_1": two},
        "stages_ms": {"plain_1_token": one_stages, "verify_1_plus_1": two_stages},
        "moe_layer_cost_ratio": round((two["attention"] + two["moe_ffn"]) / (one["attention"] + one["moe_ffn"]), 3),
        "step_ms": {"plain": plain, "verify_with_mtp": verify},
        "step_cost_ratio": round(verify / plain, 3),
        "output_tokens_per_s_per_gpu": {"plain": b / plain * 1e3,
                                        f"mtp_at_{int(acceptance * 100)}pct": b * per_step / verify * 1e3},
        "speedup": round(per_step * plain / verify, 3),
    }


def run_step(backend: str = "native", phase: str = "decode", tokens: int | None = None, graphs: bool = True,
             cached: float = 0.0, ep_ranks: int | None = None, skew: str = "lognormal", ep: bool = True,
             mtp: bool = False, acceptance: float = 0.85, ctx: int | None = None, kernel_table: bool = False) -> dict:
    """{"emulated_ep_rank": the headline, "one_batch_no_exchange": run()'s layer figures}; ep False:
    the secondary block only. mtp: the headline also times decode with MTP k = 1 at a forced
    `acceptance` (bench/step_mtp_ep.py), beside the plain step. kernel_table: the first emulated-rank
    run also tables the overlapped step's kernels against the one batch's (bench/step_ep.py)."""
    from epserve.bench import step_ep
    out = {"headline": "emulated_ep_rank_61_layers" if ep and torch.cuda.is_available() else
           "emulated_ep_rank" if ep else "one_batch_no_exchange"}
    if ep:
        kw = dict(backend=backend, tokens=tokens, ranks=ep_ranks, skew=skew, graphs=graphs, mtp=mtp,
                  acceptance=acceptance, cached=cached, ctx=ctx)
        shallow = step_ep.run(phase, kernel_table=kernel_table, **kw)
        out["emulated_ep_rank"] = shallow
        if torch.cuda.is_available():      # the 61-layer figure from a second, deeper checkpoint
            gc.collect()                   # the first engine's KV pool and graphs go before the second's
            torch.cuda.empty_cache()
            deep = step_ep.run(phase, layers=shallow["shape"]["layers"] + 4, **kw)
            out["emulated_ep_rank_deep"] = deep
            out["emulated_ep_rank_61_layers"] = step_ep.at_61_layers(shallow, deep)
    out["one_batch_no_exchange"] = run(backend=backend, phase=phase, tokens=tokens, graphs=graphs, cached=cached)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="triton")
    ap.add_argument("--phase", default="prefill", choices=sorted(PHASES))
    ap.add_argument("--tokens", type=int, default=None, help="tokens (decode: requests) per GPU; default per phase")
    ap.add_argument("--eager", action="store_true", help="decode without CUDA graphs")
    ap.add_argument("--cached", type=float, default=0.0,
                    help="prefill: fraction of each prompt already in the KV cache (the seed's day: 0.563)")
    ap.add_argument("--ep-ranks", type=int, default=None, help="emulated EP size (default: decode 144, prefill 32)")
    ap.add_argument("--skew", default="lognormal", help="emulated per-expert loads (placement/loads.py KINDS)")
    ap.add_argument("--no-ep", action="store_true", help="only the one-batch, no-exchange layer figures")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()
    emit(run_step(backend=args.backend, phase=args.phase, tokens=args.tokens, graphs=not args.eager,
                  cached=args.cached, ep_ranks=args.ep_ranks, skew=args.skew, ep=not args.no_ep),
         f"python -m epserve.bench.step --backend {args.backend} --phase {args.phase}"
         + (f" --ep-ranks {args.ep_ranks}" if args.ep_ranks else "") + (f" --skew {args.skew}" if args.no_ep is False
                                                                         and args.skew != "lognormal" else "")
         + (" --no-ep" if args.no_ep else "")
         + (f" --tokens {args.tokens}" if args.tokens else "") + (" --eager" if args.eager else "")
         + (f" --cached {args.cached}" if args.cached else ""), args.out)
