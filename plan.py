"""`epserve plan`: where every rank and expert slot of a config's units would live, without hardware.

Pure: config in, plan out. The model shape comes from the checkpoint's config.json when
the folder exists, else a named release's dimensions (model/family.py SHAPES: kimi-k2), else
DeepSeek-V3's own (the production shapes need no weights).
"""
from __future__ import annotations

from pathlib import Path

from epserve.config import Config
from epserve.model.deepseek_v3 import ModelArgs
from epserve.placement.topology import UnitShape, initial_phy2log

GiB = 1 << 30


def _model_args(cfg: Config, shape: str | None = None) -> tuple[ModelArgs, str]:
    """The served shape: with mtp on, its MTP layer's routed experts are placed with the main layers'."""
    from epserve.model.mtp import with_mtp
    if cfg.model and (Path(cfg.model) / "config.json").is_file():
        from epserve.model.checkpoint import read_config
        return read_config(cfg.model, cfg.mtp.n_draft), cfg.model
    if shape not in (None, "deepseek-v3"):
        from epserve.model.family import SHAPES
        if shape not in SHAPES:
            raise ValueError(f"--shape {shape!r} is not one of deepseek-v3, {', '.join(SHAPES)}")
        return with_mtp(ModelArgs.from_hf_config(SHAPES[shape]), cfg.mtp.n_draft), \
            f"{shape} dimensions (no checkpoint read)"
    return with_mtp(ModelArgs(fp8_block=(128, 128), n_nextn_layers=1), cfg.mtp.n_draft), \
        "DeepSeek-V3 dimensions (no checkpoint read)"


def _bytes_per_param(a: ModelArgs, dtype: str) -> float:
    if a.fp8_block:
        return 1 + 4 / (128 * 128)     # e4m3 + one fp32 scale per 128x128 block
    return 4 if dtype == "float32" else 2


def rank_memory(a: ModelArgs, dtype: str, slots_per_rank: int, kv_pages: int) -> dict:
    """Bytes one rank holds: replicated dense parts, its expert slots, its latent KV pool."""
    attn = a.dim * (a.q_lora_rank or 0) + (a.q_lora_rank or a.dim) * a.n_heads * a.qk_head_dim \
        + a.dim * a.kv_dim + a.kv_lora_rank * a.n_heads * (a.qk_nope_head_dim + a.v_head_dim) \
        + a.n_heads * a.v_head_dim * a.dim
    expert = 3 * a.dim * a.moe_inter_dim
    dense = a.n_kv_layers * attn + a.n_dense_layers * 3 * a.dim * a.inter_dim \
        + a.n_ep_layers * (a.n_shared_experts * expert + a.n_routed_experts * a.dim) \
        + a.n_mtp_layers * 2 * a.dim * a.dim                     # the MTP layer's eh_proj
    bpp = _bytes_per_param(a, dtype)
    act_bytes = 4 if dtype == "float32" else 2
    return {"dense_gib": round(dense * bpp / GiB, 2),
            "embed_head_gib": round(2 * a.vocab_size * a.dim * act_bytes / GiB, 2),
            "experts_gib": round(a.n_ep_layers * slots_per_rank * expert * bpp / GiB, 2),
            "kv_cache_gib": round(a.n_kv_layers * kv_pages * 64 * a.cache_dim * act_bytes / GiB, 2)}


def plan_units(cfg: Config, shape: str | None = None) -> dict:
    a, source = _model_args(cfg, shape)
    out = {"model": source, "roles": {}}
    for role in ("prefill", "decode"):
        u = getattr(cfg, role)
        shape = UnitShape(u.nodes_per_unit, u.gpus_per_node, a.n_routed_experts, u.redundant_experts)
        phy2log = initial_phy2log(1, a.n_routed_experts, shape.n_slots)[0]
        mem = rank_memory(a, cfg.dtype, shape.slots_per_rank, u.kv_pages)
        ranks = [{"rank": r, "node": shape.node_of_rank(r),
                  "slots": list(shape.slots_of_rank(r)),
                  "experts_layer0": phy2log[list(shape.slots_of_rank(r))].tolist()} for r in range(shape.n_ranks)]
        out["roles"][role] = {
            "units": u.units, "nodes_per_unit": u.nodes_per_unit, "gpus_per_node": u.gpus_per_node,
            "ep": shape.n_ranks, "dp": shape.n_ranks, "slots_per_layer": shape.n_slots,
            "routed_slots_per_rank": shape.slots_per_rank, "redundant_experts": u.redundant_experts,
            "moe_layers_placed": a.n_ep_layers,
            "mtp_layer": a.n_layers if a.n_mtp_layers else None,   # placed and balanced as MoE layer n_moe_layers
            "memory_per_rank": mem, "memory_per_rank_total_gib": round(sum(mem.values()), 2), "ranks": ranks}
    return out


def format_plan(plan: dict) -> str:
    lines = [f"model: {plan['model']}"]
    for role, r in plan["roles"].items():
        lines.append(f"\n{role}: {r['units']} unit(s) of {r['nodes_per_unit']} node(s) x {r['gpus_per_node']} GPUs "
                     f"= EP{r['ep']}/DP{r['dp']}; {r['slots_per_layer']} slots per layer "
                     f"({r['redundant_experts']} redundant), {r['routed_slots_per_rank']} routed + shared per GPU")
        mem = ", ".join(f"{k[:-4]} {v} GiB" for k, v in r["memory_per_rank"].items())
        lines.append(f"  memory per rank: {r['memory_per_rank_total_gib']} GiB ({mem})")
        if r.get("mtp_layer") is not None:
            lines.append(f"  MTP layer {r['mtp_layer']}: its routed experts take the same slots on every rank "
                         f"({r['moe_layers_placed']} MoE layers placed and balanced)")
        by_node: dict[int, list] = {}
        for rk in r["ranks"]:
            by_node.setdefault(rk["node"], []).append(rk)
        for node, rks in by_node.items():
            lines.append(f"  node {node}:")
            for rk in rks:
                lines.append(f"    rank {rk['rank']:>3}: slots {rk['slots'][0]}-{rk['slots'][-1]}  "
                             f"experts (layer 0) {rk['experts_layer0']}")
    return "\n".join(lines)
