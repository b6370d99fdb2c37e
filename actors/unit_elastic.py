"""The supervisor's side of elastic expert parallelism: a dead rank does not stop its unit.

UnitSupervisor (actors/unit.py) calls `survive` when a rank's loop ends and its unit is elastic
(config `elastic: true`); `sup` below is the supervisor instance. The membership change:
  1. every survivor leaves its loop with {"lost": ...} (actors/rank_elastic.py: a closed
     connection or a peer's POISON), woken if it was parked; the dead rank's loop fails with
     Ray's RayActorError (its process is gone). Anything else (no dead rank: a poisoned batch;
     a survivor that does not leave within ELASTIC_WAIT_S) -> False: the caller rebuilds.
  2. placement/elastic.py decides: the survivors in old order, and a phy2log over their slots that
     keeps every logical expert, the heaviest first by the survivors' own expert counters (None:
     they cannot hold every expert -> False, rebuild).
  3. sinks hear `unit_down` (new generation); survivors `reform` (keep their decoding requests
     with their KV, load the experts their slots newly hold, form fresh groups at the new rank 0's
     new port: actors/rank_elastic.py).
  4. loops restart under the new generation; sinks hear `unit_up` with where each old rank's
     requests go now (a survivor's to itself, a dead rank's dealt over the survivors, fewest
     requests first), and resubmit each unfinished request once from prompt + produced tokens:
     a survivor's own come back to it and decode on from their KV; the dead rank's are prefilled
     on a survivor (the KV store supplies their prefix where it holds it). The router sees fewer ranks in
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
from epserve.errors import ReformFailed
from epserve.messages import RankStats
from epserve.placement.elastic import grow_phy2log, shrink_membership, shrink_phy2log, spread_targets

log = logging.getLogger("epserve.unit")

ELASTIC_WAIT_S = 15.0      # survivors leave their loops within this of the first loop's end, else rebuild
MAX_REFORMS = 3            # a membership change retried this often when members die during it


async def survive(sup, loops: list, generation: int) -> bool:
    """Steps 1-5 after a rank's loop ended -> True when the unit goes on without its dead ranks."""
    t0 = time.time()
    dead = await _dead_after_loss(sup, loops)
    if not dead:
        return False
    n_running = [s.n_requests for s in sup.stats_cache]
    sup.n_restarts += 1
    sup.is_up = False
    await sup._tell_sinks(lambda sk: sk.unit_down.remote(sup.key, sup.n_restarts, None))
    loaded, dropped, kept = 0, 0, 0
    for _ in range(MAX_REFORMS):
        mem = shrink_membership(len(sup.ranks), dead)
        load = await _survivor_load(sup, mem.survivors)
        phy2log = shrink_phy2log(sup.phy2log, mem.survivors, sup.shape.slots_per_rank,
                                 sup.shape.n_routed_experts, load) if mem.survivors else None
        if phy2log is None:
            log.warning("unit %d: %d survivor(s) cannot hold all %d experts; rebuilding", sup.unit_id, mem.n_ranks,
                        sup.shape.n_routed_experts)
            return False
        try:
            got = await _reform(sup, [sup.ranks[i] for i in mem.survivors], phy2log)
            loaded += sum(g["loaded"] for g in got)
            dropped += sum(g["dropped"] for g in got)
            kept += sum(g["kept"] for g in got)
            break
        except ReformFailed as exc:      # a survivor died during the change: again without it
            more = await _dead_among(sup, mem.survivors)
            log.warning("unit %d: re-forming failed (%s); dead now: %s", sup.unit_id, exc, more)
            if not more:
                return False
            dead = sorted(set(dead) | set(more))
    else:
        return False
    freed = [sup.bundle_of[i] for i in mem.dead]
    survivors = [sup.ranks[i] for i in mem.survivors]
    sup.bundle_of = [sup.bundle_of[i] for i in mem.survivors]
    sup.rank_info = [sup.rank_info[i] for i in mem.survivors]
    moved = {old: [new] for new, old in enumerate(mem.survivors)}
    targets = spread_targets(mem.n_ranks, [n_running[old] for old in mem.survivors])
    moved.update({d: targets for d in mem.dead})
    await _go(sup, survivors, phy2log, moved)
    event = {"kind": "shrink", "dead": list(mem.dead), "n_ranks": mem.n_ranks, "s": round(time.time() - t0, 3),
             "kept": kept, "dropped": dropped, "experts_loaded": loaded}
    sup.elastic_events.append(event)
    log.warning("%s unit %d went on without rank(s) %s in %.2fs: %d rank(s), %d expert(s) reloaded", sup.role,
                sup.unit_id, list(mem.dead), event["s"], mem.n_ranks, loaded)
    want_growth(sup, freed)
    return True


async def _dead_after_loss(sup, loops: list) -> list[int] | None:
    """Wait for every loop to end (survivors leave with {"lost": ...}; parked ones are woken)
    -> the ranks whose process died, or None when this is not a death the survivors can absorb."""
    for rk in sup.ranks:            # a parked survivor votes at once (and fails on the dead peer)
        rk.wake.remote()
    futs = [asyncio.ensure_future(ref) for ref in loops]
    await asyncio.wait(futs, timeout=ELASTIC_WAIT_S)
    dead = []
    for i, f in enumerate(futs):
        if not f.done():
            log.warning("unit %d: rank %d did not leave its loop in %.0fs; rebuilding", sup.unit_id, i, ELASTIC_WAIT_S)
            return None
        exc = f.exception()
        if isinstance(exc, ray.exceptions.RayActorError):
            dead.append(i)
        elif exc is not None or not isinstance(f.result(), dict) or "lost" not in f.result():
            return None
    return dead or None


async def _survivor_load(sup, members: tuple[int, ...]):
    """Tokens per logical expert per MoE layer [n_moe, E] the survivors routed since EPLB last read
    them (each rank counts its own tokens' choices), the load shrink_phy2log weighs; None if any
    survivor cannot say (then every expert weighs the same)."""
    got = await asyncio.gather(*[asyncio.wait_for(asyncio.ensure_future(sup.ranks[i].expert_counters.remote(False)),
                                                  30) for i in members], return_exceptions=True)
    if not got or any(isinstance(g, BaseException) for g in got):
        return None
    return sum(g["counts"] for g in got)


async def _dead_among(sup, members: tuple[int, ...]) -> list[int]:
    """Which of these ranks' processes are gone (a call to a dead actor fails at once)."""
    got = await asyncio.gather(*[asyncio.wait_for(asyncio.ensure_future(sup.ranks[i].info.remote()), 30)
                                 for i in members], return_exceptions=True)
    return [i for i, g in zip(members, got) if isinstance(g, ray.exceptions.RayActorError)]


async def _reform(sup, ranks: list, phy2log, joiner=None) -> list[dict]:
    """Prepare every survivor, then form the new groups with all members (survivors in order,
    then the joiner) -> the survivors' prepare results; ReformFailed once every call has ended
    if any failed (none is left blocked in a half-formed group)."""
    world = len(ranks) + (joiner is not None)
    got = await asyncio.gather(*[rk.reform.remote(None, i, world, phy2log) for i, rk in enumerate(ranks)],
                               return_exceptions=True)
    bad = [g for g in got if isinstance(g, BaseException)]
    if not bad:
        master = await ranks[0].rendezvous_address.remote()
        timeout = min(sup.step_timeout_s, 600.0)
        members = ranks + ([joiner] if joiner is not None else [])
        bad = [g for g in await asyncio.gather(
            *[rk.reform.remote(master, i, world, phy2log, sup.map_version, timeout) for i, rk in enumerate(members)],
            return_exceptions=True) if isinstance(g, BaseException)]
    if bad:
        raise ReformFailed(f"{type(bad[0]).__name__}: {str(bad[0])[-200:]}")
    return got


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


def want_growth(sup, bundles: list[int]) -> None:
    """Queue freed bundles for replacements; one task grows them one at a time."""
    sup.freed_bundles += bundles
    if sup.grow_back and (sup.growing is None or sup.growing.done()):
        sup.growing = asyncio.get_running_loop().create_task(_grow_all(sup))


async def _grow_all(sup) -> None:
    tries = 0
    while sup.freed_bundles and not sup.closing and tries < MAX_REFORMS:
        if await grow(sup, sup.freed_bundles[0]):
            sup.freed_bundles.pop(0)
            tries = 0
        else:
            tries += 1
            await asyncio.sleep(1.0)


async def grow(sup, bundle: int) -> bool:
    """Step 5 for one freed bundle -> True once the replacement decodes as the unit's last rank;
    False when the unit changed meanwhile (the caller tries again) or the change failed (then
    the unit is rebuilt whole)."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
    t0, generation = time.time(), sup.n_restarts
    world = len(sup.ranks) + 1
    phy2log = grow_phy2log(sup.phy2log, sup.shape.slots_per_rank, sup.shape.n_routed_experts)
    strategy = PlacementGroupSchedulingStrategy(sup.placement.pg, placement_group_bundle_index=bundle)
    layout = UnitLayout(sup.unit_id, world - 1, world, sup.shape.gpus_per_node, sup.fp8_dispatch)
    new = RankActor.options(num_gpus=1, num_cpus=sup.cpus_per_rank, scheduling_strategy=strategy,
                            **sup.rank_options()).remote(sup.spec, layout, phy2log)
    try:
        info = await new.setup.remote(None, min(sup.step_timeout_s, 600.0))      # weights load; the unit runs on
    except Exception as exc:
        log.warning("unit %d: a replacement failed to start: %r", sup.unit_id, exc)
        ray.kill(new, no_restart=True)
        return False
    if sup.closing or generation != sup.n_restarts or not sup.is_up:         # it changed meanwhile: start over
        ray.kill(new, no_restart=True)
        return False
    sup.n_restarts += 1
    sup.is_up = False
    try:
        await sup._tell_sinks(lambda sk: sk.unit_down.remote(sup.key, sup.n_restarts, None))
        await asyncio.gather(*[rk.stop_loop.remote() for rk in sup.ranks])     # they leave at one agreed step
        await asyncio.wait([asyncio.ensure_future(ref) for ref in sup.loops], timeout=ELASTIC_WAIT_S)
        got = await _reform(sup, sup.ranks, phy2log, joiner=new)
    except Exception as exc:           # a member died meanwhile: the rebuild puts the unit right
        ray.kill(new, no_restart=True)
        await sup._restart(f"a member was lost while a replacement joined ({exc!r})")
        return False
    sup.bundle_of.append(bundle)
    sup.rank_info.append(info)
    await _go(sup, sup.ranks + [new], phy2log, {r: [r] for r in range(world - 1)})
    event = {"kind": "grow", "n_ranks": world, "s": round(time.time() - t0, 3),
             "kept": sum(g["kept"] for g in got), "dropped": sum(g["dropped"] for g in got)}
    sup.elastic_events.append(event)
    log.warning("%s unit %d: a replacement joined as rank %d after %.2fs", sup.role, sup.unit_id, world - 1, event["s"])
    return True
