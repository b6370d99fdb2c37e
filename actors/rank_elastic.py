"""A rank's side of elastic expert parallelism: its standalone groups, leaving a broken step, and
re-forming with the unit's new membership.

An elastic rank (RankSpec.elastic) never uses torch.distributed's default group: a default group
cannot be replaced while the process lives, and after a death the survivors need a fresh one.
Its data group (the MoE all-to-all: gloo on CPU, NCCL on CUDA) and its control group (the
per-step agreement, gloo) are standalone backends on a TCPStore that the unit's new rank 0
hosts at a new port for every membership; the broken ones are abandoned, not destroyed (a
gloo backend's teardown waits on work a dead peer never finishes).

The sequence, for every survivor (`RankActor` entries call these; `rank` is the actor instance):
  1. its step or agreement raises (a closed connection, or a peer's POISON: actors/agreement.py);
     `leave` tells every peer, and its loop returns {"lost": why} instead of raising;
  2. the supervisor (actors/unit_elastic.py) sees which rank died and calls `reform` on each
     survivor with its new index, the new world size, the new rank 0's address and the new
     phy2log (placement/elastic.py): the rank keeps its decoding requests aside with their KV
     (`park`), loads the experts its slots newly hold from the checkpoint, forms the new groups
     and swaps the dispatcher's map;
  3. the supervisor starts its loop again under a new generation, and every sink resubmits its
     unfinished requests from prompt + the tokens it has (the sink is the truth: tokens the rank
     made but never delivered, held or in flight when the peer died, are not in it). A kept
     request that comes back to its rank is `resume`d: its tokens past the sink's are dropped
     (recomputed next: greedy and seeded sampling give them again) and it decodes on from its KV,
     no re-prefill; any other (the dead rank's, a waiting one, a mismatch) is prefilled anew.
     Kept requests no sink claims within KEEP_S are released (`expire_kept`).
A joining rank (a replacement) builds its engine first (`setup` without an address) and then
forms the same groups as the survivors in step 2. Owns no decision: who survives and where
experts go are the supervisor's, from placement/elastic.py.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time

import torch

from epserve.actors.agreement import spread_loss
from epserve.errors import PeerLost
from epserve.actors.rank_groups import Groups, form_groups
from epserve.model.moe_dispatch import ExpertMap
from epserve.pipelines.expert_migration import stage
from epserve.pipelines.lockstep import N_FIELDS
from epserve.pipelines.overlap_tuner import OverlapTuner
from epserve.pipelines.sequence import Sequence

log = logging.getLogger("epserve.rank")


def leave(rank, exc: BaseException) -> dict:
    """The loop failed (a peer died, or said so): tell every peer so none waits on this rank,
    and say why. The broken groups stay as they are (abandoned)."""
    if rank.ctrl is not None:
        rank.abandoned.append(spread_loss(rank.ctrl, rank.layout.rank, rank.layout.world, N_FIELDS))
    why = f"{type(exc).__name__}: {str(exc)[-300:]}"
    if not isinstance(exc, PeerLost):
        log.warning("unit %d rank %d left its loop: %s", rank.layout.unit, rank.layout.rank, why)
    return {"lost": why, "steps": rank.n_steps}


KEEP_S = 30.0     # a kept request no sink resubmitted within this is released (its sink died or it ended)


def park(rank) -> int:
    """Keep this rank's decoding requests aside, KV pages and all, for `resume` (the caller holds
    engine_lock) -> how many. Only plain decoding ones (fully prefilled, no shared-prefix group,
    no MTP drafts); `drop_requests` drops the rest."""
    b = rank.engine.batcher
    if rank.spec.mtp_draft:
        return 0
    for seq in list(b.running):
        if seq.kv_group is None and seq.output_ids and seq.n_computed == seq.n_tokens - 1 and not seq.is_finished:
            b.running.remove(seq)
            rank.kept[seq.request_id] = seq
    rank.kept_until = time.monotonic() + KEEP_S
    return len(rank.kept)


def resume(rank, seq: Sequence) -> bool:
    """A resubmitted request this rank kept: back into the batch from its KV, cut back to the
    tokens its sink has (`seq`) -> True; False (and the kept copy released) when it cannot be:
    the caller adds `seq` as a new request."""
    kept = rank.kept.pop(seq.request_id) if seq.request_id in rank.kept else None
    if kept is None:
        return False
    n = len(seq.output_ids)
    eng = rank.engine
    if not n or kept.prompt_ids != seq.prompt_ids or kept.output_ids[:n] != seq.output_ids:
        eng.batcher.release(kept)
        eng.sampler_state.release(kept.request_id)
        return False
    extra = len(kept.output_ids) - n
    if extra:                 # made here, never delivered: recomputed from position n on
        del kept.output_ids[n:]
        del kept.logprobs[max(0, len(kept.logprobs) - extra):]
        kept.n_computed = kept.n_tokens - 1
        eng.sampler_state.release(kept.request_id)      # rebuilt from the token ids at the next step
    kept.n_cached = max(kept.n_cached, seq.n_cached)
    eng.batcher.running.append(kept)
    return True


def expire_kept(rank) -> None:
    """Release the kept requests no sink claimed back in time (the caller holds engine_lock)."""
    if time.monotonic() < rank.kept_until:
        return
    for seq in rank.kept.values():
        rank.engine.batcher.release(seq)
        rank.engine.sampler_state.release(seq.request_id)
    rank.kept.clear()


def drop_requests(rank) -> int:
    """Abort every request on this rank (the caller holds engine_lock) -> how many: their sinks
    resubmit them from prompt + produced tokens once the unit is up again."""
    eng = rank.engine
    rids = [s.request_id for s in list(eng.batcher.waiting) + list(eng.batcher.running)]
    rids += [s.request_id for s, _ in eng.loading]
    for rid in rids:
        rank._abort_one(rid)
    rank.streaming.clear()
    return len(rids)


def load_slots(rank, new_rank: int, phy2log: torch.Tensor) -> int:
    """Put into this rank's local slots the experts they hold as new rank `new_rank` under
    `phy2log` [n_moe, world * spr] (the caller holds engine_lock) -> experts read from disk.
    Staging compares old slot j with new slot j of this rank (pipelines/expert_migration.py)."""
    d = rank.engine.dispatcher
    spr = d.map.slots_per_rank
    old = d.map.local_slots(d.rank)
    target = d.map.phy2log.clone()
    target[:, old.start:old.stop] = phy2log[:, new_rank * spr:(new_rank + 1) * spr]
    staged = stage(rank.engine, target)
    for layer, changes in staged.slots.items():
        experts = rank.engine.model.block(layer).ffn.experts.experts
        for j, w in changes.items():
            experts.set_slot(j, w["w1"], w["w3"], w["w2"])
    # the map's column of this rank now says what its slots hold, so a re-form that is retried
    # (a member died during this one) stages against the truth; `join` rebuilds the whole map
    d.map.phy2log[:, old.start:old.stop] = target[:, old.start:old.stop]
    return staged.n_loaded


def join(rank, groups: Groups, new_rank: int, world: int, phy2log: torch.Tensor, map_version: int) -> None:
    """Route with `phy2log` as rank `new_rank` of `world` over `groups` from the next step on
    (the caller holds engine_lock and has loaded the slots)."""
    d = rank.engine.dispatcher
    lay = rank.layout
    d.map = ExpertMap(phy2log, d.map.n_experts, world, lay.gpus_per_node)
    d.rank, d.world, d.node, d.group = new_rank, world, new_rank // lay.gpus_per_node, groups.data
    rank.engine.on_placement_switched()
    rank.groups, rank.ctrl, rank.phy2log = groups, groups.ctrl, phy2log
    rank.layout = dataclasses.replace(lay, rank=new_rank, world=world)
    v = rank.versions
    v.version = v.wanted = map_version            # a switch staged for the old membership is void
    v._staging = None
    rank.stopping = False
    # the loop state must be identical on every member (pipelines/lockstep.py): a survivor's overlap
    # tuner has measurements a joiner lacks, and the two would pick different schedules (a different
    # number of exchanges per step), so every member starts measuring afresh
    rank.tuner = OverlapTuner()


def prepare(rank, new_rank: int, phy2log: torch.Tensor) -> dict:
    """Step 2's first half, on a survivor: its decoding requests kept aside, the rest dropped, the
    experts it will hold as `new_rank` loaded -> {"kept", "dropped": requests, "loaded": experts
    read from disk}. Every member prepares before any forms groups, so the groups' join waits
    only on the calls' skew."""
    with rank.engine_lock:
        kept = park(rank)
        dropped = drop_requests(rank)
        loaded = load_slots(rank, new_rank, phy2log)
    return {"kept": kept, "dropped": dropped, "loaded": loaded}


def exit_if_testing_switch(rank, generation: int) -> None:
    """The `exit_in_switch` test hook: in the unit's first build, the rank of that index ends its
    process (a real exit, as a crash would) after every member agreed to switch to a staged
    placement and before it switches: the others switch and find it gone at their next exchange."""
    if rank.spec.exit_in_switch == rank.layout.rank and generation == 0:
        log.warning("rank %d exits at a placement switch (exit_in_switch)", rank.layout.rank)
        os._exit(1)


def reform(rank, master: tuple[str, int], new_rank: int, world: int, phy2log: torch.Tensor, map_version: int,
           timeout_s: float) -> None:
    """Step 2's second half, on every member (a survivor that prepared, or a joiner that loaded
    its slots in setup): the new groups, then routing with `phy2log` as `new_rank` of `world`."""
    if rank.spec.exit_in_reform == rank.layout.rank and getattr(rank, "generation", None) == 0:
        log.warning("rank %d exits while re-forming (exit_in_reform)", rank.layout.rank)
        os._exit(1)
    groups = form_groups(master, new_rank, world, rank.spec.device, timeout_s)
    with rank.engine_lock:
        join(rank, groups, new_rank, world, phy2log, map_version)
    log.info("unit %d: rank now %d/%d", rank.layout.unit, new_rank, world)
