"""A rank's process groups: the data group (the MoE all-to-all: gloo on CPU, NCCL on CUDA) and the
control group (the per-step agreement, always gloo), formed at the unit's rendezvous address.

Two kinds, chosen by RankSpec.elastic:
  rebuild-only units   torch.distributed's default group plus a gloo `new_group` over it; they live
                       as long as the process (a dead peer means the whole unit is rebuilt);
  elastic units        standalone backends on a TCPStore hosted by the membership's rank 0 at a
                       fresh port (`form_groups`): a default group cannot be replaced while the
                       process lives, and after a death the survivors need a new one
                       (actors/rank_elastic.py re-forms them). The broken ones are abandoned, not
                       destroyed (a gloo backend's teardown waits on work a dead peer never finishes).
Owns forming the groups; never decides who is a member.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from epserve.placement.devices import data_backend

JOIN_TIMEOUT_S = 20.0     # every member reaches the new store within this, else forming fails (a member died)


@dataclass
class Groups:
    """One membership's groups (ctrl None for one rank); the store must outlive them (rank 0 hosts it)."""

    store: object
    data: object
    ctrl: object | None


def form_groups(master: tuple[str, int], rank: int, world: int, device: str, timeout_s: float) -> Groups:
    """Elastic: standalone data + control groups of `world` ranks on a TCPStore at `master` (new
    rank 0 hosts it); blocks until every member has joined (raises after JOIN_TIMEOUT_S: a member
    that died meanwhile must not hold the others for a whole step timeout). timeout_s bounds each
    collective afterwards."""
    host, port = master
    if host.startswith("127."):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, world, is_master=rank == 0, timeout=timedelta(seconds=JOIN_TIMEOUT_S))
    if device.startswith("cuda") and torch.cuda.is_available():
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        data = dist.ProcessGroupNCCL(dist.PrefixStore("data", store), rank, world, opts)
    else:
        data = dist.ProcessGroupGloo(dist.PrefixStore("data", store), rank, world, timeout)
    ctrl = dist.ProcessGroupGloo(dist.PrefixStore("ctrl", store), rank, world, timeout) if world > 1 else None
    return Groups(store, data, ctrl)


def init_default_groups(master: tuple[str, int], rank: int, world: int, device: str, timeout_s: float) -> Groups:
    """Rebuild-only units: the default group (data) and a gloo group over it (control); data is
    None in the result because the exchange uses the default group."""
    backend = data_backend(device) if torch.cuda.is_available() else "gloo"
    if master[0].startswith("127."):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(backend, init_method=f"tcp://{master[0]}:{master[1]}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))
    # the per-step agreement runs on the host, beside the data collectives
    ctrl = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s)) if world > 1 else None
    return Groups(None, None, ctrl)
