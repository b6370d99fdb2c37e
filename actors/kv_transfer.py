"""The collective KV handoff's transport: a two-rank process group per (prefill rank, decode rank).

A prefill unit and a decode unit are separate torch.distributed worlds, so a pair group cannot be
a subgroup of either: it is a standalone ProcessGroup (NCCL between GPUs, gloo on CPU, the same
code) over its own TCPStore, which the decode rank hosts. Built on first use, kept for later
requests between the same two rank processes:

  decode rank D (receiver, pair rank 0)            prefill rank P (sender, pair rank 1)
  binds a TCPStore on its node, builds its side    join_pair(pair_id, host, port): builds its side
  of the group in a thread, calls P.join_pair  ->  (both sides must be building at once)
  posts recv(buffer [L, n, L+R]), calls P.send_kv -> send_kv(pair_id, request_id): takes the parked
  waits for that call, then for the recv             latents, sends, waits until they left

Every wait on the peer is bounded by `timeout_s`: a peer that died, a ticket that expired or a
group that could not form raises HandoffFailed, and that pair group is dropped, never reused
(a receive may still be posted on it). pipelines/kv_handoff.py has the protocol around it;
actors/kv_ends.py holds a rank's two ends that use this transport.
"""
from __future__ import annotations

import concurrent.futures
import logging
import socket
import threading
import time
import uuid
from datetime import timedelta

import ray
import torch
import torch.distributed as dist

from epserve.errors import HandoffFailed
from epserve.pipelines.kv_handoff import KvTicket
from epserve.placement.devices import data_backend

log = logging.getLogger("epserve.kv_transfer")


def _make_group(store, rank: int, device: str, timeout_s: float):
    """A standalone two-rank process group (not registered with this process's default world)."""
    prefix = dist.PrefixStore("kvpair", store)
    timeout = timedelta(seconds=timeout_s)
    if data_backend(device) == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(prefix, rank, 2, opts)
    return dist.ProcessGroupGloo(prefix, rank, 2, timeout)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


class PairGroups:
    """One rank process's pair groups, as receiver (keyed by the sender's source_id) and as
    sender (keyed by pair id). Thread-safe: sends run on the actor's other threads."""

    def __init__(self, me_id: str, device: str, timeout_s: float = 30.0):
        self.me_id, self.device, self.timeout_s = me_id, device, timeout_s
        self.as_receiver: dict[str, tuple[str, object]] = {}     # source_id -> (pair_id, group)
        self.as_sender: dict[str, object] = {}                   # pair_id -> group
        self.lock = threading.Lock()
        self.pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="kvpair")
        self.stats = {"pairs": 0, "received": 0, "bytes": 0, "seconds": 0.0, "failed": 0}

    # ---- sender side (the prefill rank's actor methods call these) ------------------------
    def join(self, pair_id: str, host: str, port: int) -> None:
        store = dist.TCPStore(host, port, None, is_master=False, timeout=timedelta(seconds=self.timeout_s))
        group = _make_group(store, 1, self.device, self.timeout_s)
        with self.lock:
            self.as_sender[pair_id] = (group, store)

    def send(self, pair_id: str, latents: torch.Tensor | None) -> int:
        """Send one request's parked latents to the pair's receiver; -> bytes sent."""
        with self.lock:
            group = self.as_sender.get(pair_id)
        if group is None:
            raise HandoffFailed(f"no pair group {pair_id} on this rank")
        if latents is None:
            raise HandoffFailed("the latents are no longer parked here (expired or taken)")
        group[0].send([latents.contiguous()], 0, 0).wait()
        _sync(self.device)
        return latents.numel() * latents.element_size()

    # ---- receiver side --------------------------------------------------------------------
    def receive(self, ticket: KvTicket) -> torch.Tensor:
        """Pull one ticket's latents onto this rank's device (bounded; raises HandoffFailed)."""
        t0 = time.perf_counter()
        try:
            pair_id, group = self._pair_with(ticket)
            buf = torch.empty(ticket.shape, dtype=getattr(torch, ticket.dtype), device=self.device)
            work = group.recv([buf], 1, 0)
            sent = ticket.source.send_kv.remote(pair_id, ticket.request_id)
            ready, _ = ray.wait([sent], timeout=self.timeout_s)
            if not ready:
                raise HandoffFailed(f"the prefill rank did not send within {self.timeout_s:.0f}s")
            ray.get(sent)                         # raises if the sender failed or died
            work.wait(timedelta(seconds=self.timeout_s))
            _sync(self.device)
        except Exception as exc:
            self.stats["failed"] += 1
            with self.lock:                       # a receive may be left posted on it: never reuse
                self.as_receiver.pop(ticket.source_id, None)
            raise HandoffFailed(f"collective KV handoff of {ticket.request_id} failed: {exc!r}") from exc
        st = self.stats
        st["received"] += 1
        st["bytes"] += ticket.nbytes
        st["seconds"] += time.perf_counter() - t0
        return buf

    def _pair_with(self, ticket: KvTicket):
        with self.lock:
            known = self.as_receiver.get(ticket.source_id)
        if known is not None:
            return known
        pair_id = f"{ticket.source_id}->{self.me_id}/{uuid.uuid4().hex[:8]}"
        host = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        store = dist.TCPStore(host, port, None, is_master=True, timeout=timedelta(seconds=self.timeout_s),
                              wait_for_workers=False)
        mine = self.pool.submit(_make_group, store, 0, self.device, self.timeout_s)
        joined = ticket.source.join_pair.remote(pair_id, host, port)
        ready, _ = ray.wait([joined], timeout=self.timeout_s)
        if not ready:
            raise HandoffFailed(f"the prefill rank did not join pair {pair_id} within {self.timeout_s:.0f}s")
        ray.get(joined)
        group = mine.result(timeout=self.timeout_s)
        with self.lock:
            self.as_receiver[ticket.source_id] = (pair_id, group)
            self._stores = getattr(self, "_stores", []) + [store]     # the store lives as long as its group
        self.stats["pairs"] += 1
        log.info("KV pair group %s formed (%s)", pair_id, data_backend(self.device))
        return pair_id, group

