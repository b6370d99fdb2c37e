"""The supervisor's side of elastic expert parallelism: a dead rank does not stop its unit.

UnitSupervisor (actors/unit.py) calls `survive` when a rank's loop ends and its unit is elastic
(config `elastic: true`); `sup` below is the supervisor instance. The membership change:
  1. every survivor leaves its loop with {"lost": ...} (actors/rank_elastic.py: a closed
     connection or a peer's POISON), woken if it was parked; the dead rank's loop fails with
     Ray's RayActorError (its process is gone). Anything else (no dead rank: a poisoned batch;
     a survivor that does not leave within ELASTIC_WAIT_S) -> False: the caller rebuilds.
  2. placement/elastic.py decides: the survivors in old order, and a phy2log over their slots that
     keeps every logical expert (None: they cannot hold every expert -> False, rebuild).
  3. sinks hear `unit_down` (new generation); survivors `reform` (drop their requests, load the
     experts their slots newly hold, form fresh groups at the new rank 0's new port).
  4. loops restart under the new generation; sinks hear `unit_up` with where each old rank's
     requests go now (a survivor's to itself, a dead rank's dealt over the survivors, fewest
     requests first), and resubmit each unfinished request once from prompt + produced tokens
     (the KV store supplies its prefix where it holds it). The router sees fewer ranks in
     `stats()` and places nothing on the dead one.
  5. `grow` starts a replacement in the dead rank's bundle (Ray places it when the bundle is
     free); it loads its weights while the survivors run, then the unit changes membership
     again at an agreed step (the survivors stop their loops together) with the replacement as
     the last rank and replicas of the heaviest experts in its slots.
Owns the sequence; the decisions are placement/elastic.py's, the rank's work actors/rank_elastic.py's.
"""
from __future__ import annotations

import asyncio
import logging
import time

import ray

from epserve.actors.rank import RankActor
from epserve.actors.rank_messages import UnitLayout
from epserve.messages import RankStats
from epserve.placement.elastic import grow_phy2log, shrink_membership, shrink_phy2log, spread_targets

log = logging.getLogger("epserve.unit")

ELASTIC_WAIT_S = 15.0      # survivors leave their loops within this of the first loop's end, else rebuild


async def survive(sup, loops: list, generation: int) -> bool:
    """Steps 1-5 after a rank's loop ended -> True when the unit goes on without its dead ranks."""
    t0 = time.time()
    for rk in sup.ranks:            # a parked survivor votes at once (and fails on the dead peer)
        rk.wake.remote()
    futs = [asyncio.ensure_future(ref) for ref in loops]
    await asyncio.wait(futs, timeout=ELASTIC_WAIT_S)
    dead = []
    for i, f in enumerate(futs):
        if not f.done():
            log.warning("unit %d: rank %d did not leave its loop in %.0fs; rebuilding", sup.unit_id, i, ELASTIC_WAIT_S)
            return False
        exc = f.exception()
        if isinstance(exc, ray.exceptions.RayActorError):
            dead.append(i)
        elif exc is not None or not isinstance(f.result(), dict) or "lost" not in f.result():
            return False
    if not dead:
        return False
    mem = shrink_membership(len(sup.ranks), dead)
    phy2log = shrink_phy2log(sup.phy2log, mem.survivors, sup.shape.slots_per_rank, sup.shape.n_routed_experts) \
        if mem.survivors else None
    if phy2log is None:
        log.warning("unit %d: %d survivor(s) cannot hold all %d experts; rebuilding", sup.unit_id, mem.n_ranks,
                    sup.shape.n_routed_experts)
        return False
    n_running = [sup.stats_cache[old].n_requests for old in mem.survivors]
    survivors = [sup.ranks[i] for i in mem.survivors]
    freed = [sup.bundle_of[i] for i in mem.dead]
    sup.n_restarts += 1
    sup.is_up = False
    await sup._tell_sinks(lambda sk: sk.unit_down.remote(sup.key, sup.n_restarts, None))
    try:
        got = await _reform(sup, survivors, phy2log)
    except Exception as exc:           # a survivor failed to re-form: the rebuild is the fallback
        log.warning("unit %d: re-forming without rank(s) %s failed (%r); rebuilding", sup.unit_id, dead, exc)
        return False
    sup.bundle_of = [sup.bundle_of[i] for i in mem.survivors]
    sup.rank_info = [sup.rank_info[i] for i in mem.survivors]
    moved = {old: [new] for new, old in enumerate(mem.survivors)}
    targets = spread_targets(mem.n_ranks, n_running)
    moved.update({d: targets for d in mem.dead})
    await _go(sup, survivors, phy2log, moved)
    event = {"kind": "shrink", "dead": list(mem.dead), "n_ranks": mem.n_ranks, "s": round(time.time() - t0, 3),
             "dropped": sum(g["dropped"] for g in got), "experts_loaded": sum(g["loaded"] for g in got)}
    sup.elastic_events.append(event)
    log.warning("%s unit %d went on without rank(s) %s in %.2fs: %d rank(s), %d expert(s) reloaded", sup.role,
                sup.unit_id, list(mem.dead), event["s"], mem.n_ranks, event["experts_loaded"])
    if sup.grow_back:
        sup.growing = asyncio.get_running_loop().create_task(_grow_all(sup, freed))
    return True


async def _reform(sup, ranks: list, phy2log) -> list[dict]:
    master = await ranks[0].rendezvous_address.remote()
    timeout = min(sup.step_timeout_s, 600.0)
    calls = [rk.reform.remote(master, i, len(ranks), phy2log, sup.map_version, timeout) for i, rk in enumerate(ranks)]
    return await asyncio.wait_for(asyncio.gather(*calls), timeout + 30)


async def _go(sup, ranks: list, phy2log, moved: dict[int, list[int]]) -> None:
    """The new membership runs: state, loops, then the sinks resubmit."""
    sup.ranks = list(ranks)
    sup.phy2log = phy2log.clone()
    sup.stats_cache = [RankStats(sup.unit_id, r, kv_blocks_total=info.get("kv_pages", 0))
                       for r, info in enumerate(sup.rank_info)]
    sup.last = [None] * len(ranks)
    if sup.switch_wanted is not None:          # an EPLB switch of the old membership is void
        sup.switch_wanted = None
        sup.switched.set()
    sup._start_loops()
    await sup._tell_sinks(lambda sk: sk.unit_up.remote(sup.key, sup.n_restarts, list(sup.ranks), moved))


async def _grow_all(sup, bundles: list[int]) -> None:
    for b in bundles:
        try:
            await grow(sup, b)
        except Exception as exc:              # the unit keeps running with fewer ranks
            log.warning("unit %d: a replacement in bundle %d did not join: %r", sup.unit_id, b, exc)
            return


async def grow(sup, bundle: int) -> bool:
    """Step 5 for one freed bundle -> True once the replacement decodes as the unit's last rank."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
    t0, generation = time.time(), sup.n_restarts
    world = len(sup.ranks) + 1
    phy2log = grow_phy2log(sup.phy2log, sup.shape.slots_per_rank, sup.shape.n_routed_experts)
    strategy = PlacementGroupSchedulingStrategy(sup.placement.pg, placement_group_bundle_index=bundle)
    layout = UnitLayout(sup.unit_id, world - 1, world, sup.shape.gpus_per_node, sup.fp8_dispatch)
    new = RankActor.options(num_gpus=1, num_cpus=sup.cpus_per_rank, scheduling_strategy=strategy,
                            **sup.rank_options()).remote(sup.spec, layout, phy2log)
    info = await new.setup.remote(None, min(sup.step_timeout_s, 600.0))      # weights load; the unit runs on
    if sup.closing or generation != sup.n_restarts or not sup.is_up:         # it changed meanwhile: start over
        ray.kill(new, no_restart=True)
        return False
    sup.n_restarts += 1
    sup.is_up = False
    await sup._tell_sinks(lambda sk: sk.unit_down.remote(sup.key, sup.n_restarts, None))
    await asyncio.gather(*[rk.stop_loop.remote() for rk in sup.ranks])     # they leave at one agreed step
    await asyncio.wait([asyncio.ensure_future(ref) for ref in sup.loops], timeout=ELASTIC_WAIT_S)
    master = await sup.ranks[0].rendezvous_address.remote()
    timeout = min(sup.step_timeout_s, 600.0)
    got = await asyncio.wait_for(asyncio.gather(
        *[rk.reform.remote(master, i, world, phy2log, sup.map_version, timeout) for i, rk in enumerate(sup.ranks)],
        new.join_unit.remote(master, world - 1, world, phy2log, sup.map_version, timeout)), timeout + 30)
    sup.bundle_of.append(bundle)
    sup.rank_info.append(info)
    await _go(sup, sup.ranks + [new], phy2log, {r: [r] for r in range(world - 1)})
    event = {"kind": "grow", "n_ranks": world, "s": round(time.time() - t0, 3),
             "dropped": sum(g["dropped"] for g in got[:-1])}
    sup.elastic_events.append(event)
    log.warning("%s unit %d: a replacement joined as rank %d after %.2fs", sup.role, sup.unit_id, world - 1, event["s"])
    return True
