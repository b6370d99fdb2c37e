"""Which exchange a multi-rank unit uses: DeepEP (model/deepep_dispatch.py) or the all-to-all
collectives (model/ep_dispatch.py), decided once at rank start-up, the same on every rank.

`ep_dispatch` (config key): `emulated` is a one-rank unit standing in for one rank of a larger EP
unit (model/ep_emulate.py, `make_one_rank_dispatcher`); `all_to_all` always takes the collectives; `deepep` requires DeepEP
(start-up fails with the reason otherwise); `auto` takes DeepEP when the kernels backend is
`native`, DeepEP imports, the unit's shape suits it and its self-test against the all-to-all path
passes on every rank, else the collectives, with one log line giving the exact reason.
The verdict is a MIN all-reduce over the unit, so no rank keeps DeepEP while another falls back.
Never: imports Ray.
"""
from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from epserve.errors import DeepEPUnavailable
from epserve.kernels.reference import ExpertWeights
from epserve.model.ep_dispatch import AllToAllDispatcher
from epserve.model.ep_emulate import EmulatedDispatcher
from epserve.model.moe_dispatch import ExpertMap, ExpertShard, LocalDispatcher

log = logging.getLogger("epserve.ep_select")

EP_DISPATCH = ("auto", "deepep", "all_to_all")   # a multi-rank unit's choices; one-rank units: ONE_RANK


def _agree(ok: bool, device: torch.device) -> bool:
    """Every rank's verdict -> the unit's (MIN over the default group)."""
    t = torch.tensor([int(ok)], device=device)
    dist.all_reduce(t, dist.ReduceOp.MIN)
    return bool(t.item())


def make_one_rank_dispatcher(kb, args, em: ExpertMap, mode: str = "auto", ep_emulate: dict | None = None,
                             device: str = "cpu"):
    """A one-rank unit's dispatcher: every slot here, no exchange (LocalDispatcher), or with
    mode `emulated` the EP rank that ep_emulate describes (model/ep_emulate.py)."""
    if mode == "emulated":
        return EmulatedDispatcher(kb, em, args.n_dense_layers, args.dim, ep_emulate or {}, torch.device(device))
    return LocalDispatcher(kb, em, args.n_dense_layers)


def make_ep_dispatcher(kb, args, em: ExpertMap, rank: int, world: int, gpus_per_node: int, fp8_dispatch: bool,
                       device: str, mode: str = "auto", max_batch: int = 128, latency_s: float = 0.0,
                       bandwidth: float = 0.0):
    """The unit's dispatcher for this rank (collective: every rank of the unit calls it at once)."""
    if mode == "emulated":
        raise ValueError(f"ep_dispatch: emulated is one rank standing in for an EP unit; this unit has {world} ranks")
    if mode not in EP_DISPATCH:
        raise ValueError(f"ep_dispatch: {mode!r} is not one of {', '.join(EP_DISPATCH)}")
    a2a = AllToAllDispatcher(kb, em, args.n_dense_layers, rank, world, gpus_per_node, fp8_dispatch,
                             latency_s=latency_s, bandwidth=bandwidth)
    if mode == "all_to_all":
        return a2a
    why = _deepep_reason(kb, args, world, gpus_per_node, device, latency_s, bandwidth)
    chosen = None
    if why is None:
        chosen, why = _try_deepep(kb, args, em, rank, world, gpus_per_node, device, max_batch, a2a)
    if chosen is None:
        if mode == "deepep":
            raise DeepEPUnavailable(f"ep_dispatch: deepep cannot run: {why}")
        if rank == 0:
            log.info("ep_dispatch: auto uses all-to-all collectives, not DeepEP: %s", why)
        return a2a
    if rank == 0:
        log.info("ep_dispatch: auto picked DeepEP (%s)", why)
    return chosen


def _deepep_reason(kb, args, world, gpus_per_node, device, latency_s, bandwidth) -> str | None:
    from epserve.model import deepep_dispatch as de
    if not kb.__name__.endswith(".native"):
        return f"DeepEP belongs to the native kernels backend, this rank runs {kb.__name__.rsplit('.', 1)[-1]}"
    if latency_s or bandwidth:
        return "an injected transport cost (transport:) is only modelled by the all-to-all path"
    return de.unsupported_reason(args.dim, world, gpus_per_node, args.n_activated_experts, device)


def _try_deepep(kb, args, em, rank, world, gpus_per_node, device, max_batch, a2a):
    from epserve.model import deepep_dispatch as de
    dev = torch.device(device)
    ll_why = de.low_latency_reason(args.dim, args.n_activated_experts, max_batch)
    disp, ok, why = None, False, ""
    try:
        disp = de.DeepEPDispatcher(kb, em, args.n_dense_layers, rank, world, gpus_per_node, dist.group.WORLD,
                                   args.dim, max_batch, low_latency=ll_why is None)
        g = torch.Generator(device=dev).manual_seed(7 + rank)
        shard = ExpertShard(ExpertWeights.random_fp8(em.slots_per_rank, args.moe_inter_dim, args.dim, dev, g))
        ok, why = de.self_test(disp, a2a, shard, min(256, max(8, max_batch)), args.n_activated_experts, dev)
    except Exception as exc:            # the buffer failed to build (NVSHMEM, IPC): the collectives carry
        why = f"{type(exc).__name__}: {exc}"
    ok = _agree(ok, dev)
    for d in (a2a,) + ((disp,) if disp is not None else ()):   # the self-test's pairs are not load
        d.counts.zero_()
        if hasattr(d, "pairs_sent"):
            d.pairs_sent.zero_(), d.pairs_received.zero_()
    if not ok:
        if disp is not None:
            disp.close()
        return None, f"self-test failed on some rank ({why})"
    if ll_why is not None:
        why += f"; decode steps use normal kernels, not low-latency ({ll_why})"
    return disp, why
