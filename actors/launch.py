"""Starting units: from a config's role section to running unit supervisors, many at once.

Owns the RankSpec a config gives each rank, the unit supervisor with its expert balancer, and
starting several units in parallel: every unit's placement group, rank processes and weight
loads proceed together (DeepSeek adds about nine units at each morning step), and a unit that
fails to start is torn down and reported without stopping the others. llm.py (offline),
serve/app.py (`epserve serve`) and actors/capacity_controller.py (day/night) all start units
here, so the arrows point down.
"""
from __future__ import annotations

import asyncio
import logging
import time
import dataclasses
from dataclasses import dataclass

import ray

from epserve.actors.cluster import control_options
from epserve.config import Config, kv_store_spec
from epserve.errors import UnitStartFailed
from epserve.messages import RankSpec
from epserve.model.mtp import with_mtp
from epserve.placement.groups import DIRECT_SCOPE
from epserve.placement.topology import UnitShape

log = logging.getLogger("epserve.launch")




def rank_spec(cfg: Config, model_dir: str, role_cfg, role: str = "both") -> RankSpec:
    import torch
    emulated = cfg.ep_dispatch == "emulated"     # one rank standing in for an EP unit: its exchanges can overlap
    return RankSpec(model_dir=model_dir, dtype=cfg.dtype, kernels=cfg.kernels, role=role,
                    overlap=cfg.overlap if role_cfg.ranks_per_unit >= 2 or emulated else "off",
                    latency_s=cfg.transport.latency_ms / 1e3,
                    bandwidth=cfg.transport.bandwidth_gbps * 1e9,
                    kv_store=kv_store_spec(cfg), block_tokens=cfg.kv_store.block_tokens,
                    device="cuda" if torch.cuda.is_available() else "cpu", kv_pages=role_cfg.kv_pages,
                    page_size=cfg.kv_page_tokens,
                    max_batch_tokens=role_cfg.max_batch_tokens, max_batch_size=role_cfg.max_batch_size,
                    max_model_len=cfg.max_model_len, fp8_activations=cfg.fp8_activations,
                    cuda_graphs=cfg.cuda_graphs, mtp_draft=cfg.mtp.n_draft, ep_dispatch=cfg.ep_dispatch,
                    ep_emulate=dataclasses.asdict(cfg.ep_emulate) if emulated else None, kv_handoff=cfg.kv_handoff,
                    elastic=role_cfg.elastic)


@dataclass(frozen=True)
class UnitOrder:
    """One unit to start: its id, role (prefill | decode | both) and name."""

    uid: int
    role: str
    name: str
    role_cfg: object


def orders(name: str, role_cfg, role: str, first_id: int = 0) -> list[UnitOrder]:
    return [UnitOrder(first_id + u, role, name, role_cfg) for u in range(role_cfg.units)]


def unit_shape(order: UnitOrder, args) -> UnitShape:
    """The unit's shape; a config the model cannot be placed with raises ValueError naming why."""
    rc = order.role_cfg
    return UnitShape(rc.nodes_per_unit, rc.gpus_per_node, args.n_routed_experts, rc.redundant_experts)


async def start_unit(cfg: Config, model_dir: str, args, order: UnitOrder, scope: str = DIRECT_SCOPE):
    """Start one unit (and its expert balancer) -> its supervisor handle; raises if it cannot start,
    leaving nothing of it behind. `scope` (the Serve application, else `direct`) names the unit's
    placement groups, so that a later owner of the scope can remove them if this one is killed."""
    from epserve.actors.unit import UnitSupervisor
    rc = order.role_cfg
    shape = unit_shape(order, args)
    fp8_dispatch = cfg.fp8_activations and args.fp8_block is not None
    unit = UnitSupervisor.options(**control_options()).remote(
        order.uid, order.name, rank_spec(cfg, model_dir, rc, order.role), shape, rc.cpus_per_rank, fp8_dispatch,
        n_moe_layers=with_mtp(args, cfg.mtp.n_draft).n_ep_layers, scope=scope)
    try:
        await unit.start.remote()
        if cfg.eplb.enabled and rc.ranks_per_unit > 1:
            from epserve.actors.eplb_controller import EplbController
            ctrl = EplbController.options(**control_options()).remote(unit, shape, args.n_expert_groups, cfg.eplb.interval_s,
                                         cfg.eplb.window_steps, cfg.eplb.policy)
            await ctrl.start.remote()
            await unit.attach.remote(ctrl)   # the balancer lives as long as its unit's owner
    except BaseException:
        ray.kill(unit)                        # a supervisor that failed tore its ranks down already
        raise
    return unit


async def start_all(cfg: Config, model_dir: str, args, todo: list[UnitOrder],
                    scope: str = DIRECT_SCOPE) -> tuple[list, list]:
    """Start every ordered unit at once -> ([(order, handle)], [(order, error text)]). A shape the
    config gets wrong is the caller's error (ValueError, before anything starts), not a failed start."""
    with_mtp(args, cfg.mtp.n_draft)          # MTP on a checkpoint without the module: a clear error, now
    for o in todo:
        unit_shape(o, args)
    t0 = time.time()
    results = await asyncio.gather(*[start_unit(cfg, model_dir, args, o, scope) for o in todo], return_exceptions=True)
    ok = [(o, r) for o, r in zip(todo, results) if not isinstance(r, BaseException)]
    failed = [(o, f"{type(r).__name__}: {str(r).splitlines()[-1] if str(r) else ''}") for o, r in zip(todo, results)
              if isinstance(r, BaseException)]
    for o, why in failed:
        log.error("%s unit %d failed to start: %s", o.role, o.uid, why)
    log.info("started %d of %d units in %.1fs", len(ok), len(todo), time.time() - t0)
    return ok, failed


def start_units(cfg: Config, model_dir: str, args, todo: list[UnitOrder]) -> dict[str, list]:
    """Blocking start_all for the driver: role -> started handles in order. A role none of whose
    units started raises UnitStartFailed; a role with some started runs with those (logged)."""
    ok, failed = _run(start_all(cfg, model_dir, args, todo))
    out: dict[str, list] = {o.role: [] for o in todo}
    for o, h in ok:
        out[o.role].append(h)
    for role, handles in out.items():
        if not handles:
            raise UnitStartFailed(f"no {role} unit could start: " + "; ".join(
                f"unit {o.uid}: {why}" for o, why in failed if o.role == role))
    return out


def _run(coro):
    """Run a coroutine from synchronous driver code (also when the caller's thread has a loop)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    import concurrent.futures
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()
