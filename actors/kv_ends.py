"""A rank's two ends of the prefill -> decode KV handoff (the protocol: pipelines/kv_handoff.py).

  sending end (prefill role)   `publish` turns each finished prompt's latents in its delta into
                               what travels: block tensors become object refs (object transport),
                               a device tensor is parked here and becomes a KvTicket (collective /
                               auto). The decode rank then calls the prefill rank's actor methods
                               that land in `join` and `send` (the pair group), or `objects` (auto's
                               object-store fallback for a parked request).
  receiving end (decode role)  `receive` turns what a Sequence brought (refs or a ticket) back into
                               latents on this rank's device, or None when they are lost: the
                               caller then recomputes the prompt (slower, never wrong).

The transport between the ends is actors/kv_transfer.py (pair groups). Owns the parked latents
and the handoff counters; never touches the engine or the step loop.
"""
from __future__ import annotations

import logging
import time

import ray
import torch

from epserve.actors.kv_transfer import PairGroups
from epserve.errors import HandoffFailed
from epserve.pipelines.kv_handoff import KvTicket, ParkedKv, join_blocks, split_blocks
from epserve.pipelines.sequence import Sequence

log = logging.getLogger("epserve.kv_ends")


class KvEnds:
    """One rank process's handoff ends. `pairs` is its pair groups (actors/kv_transfer.py), `me` its
    own actor handle (named in the tickets it issues), `mode` the spec's kv_handoff (auto |
    collective | object), `block_tokens` the object path's block size.
    Thread-safe where the actor needs it: `send` / `objects` run on the actor's other threads,
    `publish` / `receive` on the loop's (ParkedKv and PairGroups lock themselves)."""

    def __init__(self, pairs: PairGroups, me, mode: str, device: str, block_tokens: int):
        self.pairs, self.me, self.mode, self.device, self.block_tokens = pairs, me, mode, device, block_tokens
        self.parked = ParkedKv()                  # prefill role, collective handoff: latents awaiting their pull
        self.timing = {"n": 0, "seconds": 0.0, "bytes": 0, "by": {}}   # receives, both transports alike

    # ---- sending end ---------------------------------------------------------------------
    def publish(self, deltas: list) -> None:
        """Prefill role: each delta's kv_blocks, in place, become what travels. A list of blocks
        goes into the object store (refs travel); a device tensor is parked here and a KvTicket
        naming this rank travels instead."""
        for d in deltas:
            if isinstance(d.kv_blocks, list):
                d.kv_blocks = [ray.put(b) for b in d.kv_blocks]
            elif d.kv_blocks is not None:
                lat = d.kv_blocks
                self.parked.park(d.request_id, lat, time.time())
                d.kv_blocks = KvTicket(d.request_id, tuple(lat.shape), str(lat.dtype).removeprefix("torch."), self.me,
                                       self.pairs.me_id)

    def join(self, pair_id: str, host: str, port: int) -> None:
        """The decode rank asks this (prefill) rank to build its side of their pair group."""
        self.pairs.join(pair_id, host, port)

    def send(self, pair_id: str, request_id: str) -> int:
        """Send a parked request's latents over the pair group; -> bytes sent (raises HandoffFailed)."""
        return self.pairs.send(pair_id, self.parked.take(request_id, time.time()))

    def objects(self, request_id: str) -> list | None:
        """The object-store fallback for a parked request: its latents as block refs (None: gone)."""
        lat = self.parked.take(request_id, time.time())
        return None if lat is None else [ray.put(b) for b in split_blocks(lat.cpu(), self.block_tokens)]

    # ---- receiving end -------------------------------------------------------------------
    def receive(self, seq: Sequence) -> torch.Tensor | None:
        """Decode role: the latents `seq` brought [n_layers, n, L+R] on this rank's device, or None
        (nothing handed off, or lost: `seq` is then reset to recompute its prompt here). Clears
        seq.kv_blocks either way."""
        got, seq.kv_blocks = seq.kv_blocks, None
        if not got:
            return None
        t0 = time.perf_counter()
        try:
            lat = self._pull(got)
        except Exception as exc:           # the prefill rank died, the objects or the ticket were lost
            log.warning("KV handoff for %s lost (%r); recomputing its prompt here", seq.request_id, exc)
            seq.reset_for_recompute()
            return None
        ht = self.timing                   # both transports, measured alike (bench handoff reads it)
        ht["n"] += 1
        ht["seconds"] += time.perf_counter() - t0
        ht["bytes"] += lat.numel() * lat.element_size()
        ht["by"][type(got).__name__] = ht["by"].get(type(got).__name__, 0) + 1
        return lat

    def _pull(self, got) -> torch.Tensor:
        """A ticket over the pair group (auto: else object refs from the same prefill rank), or
        object refs straight from its store -> latents on this device. Raises when they cannot be had."""
        if isinstance(got, KvTicket):
            try:
                return self.pairs.receive(got)
            except HandoffFailed as exc:
                if self.mode == "collective":
                    raise
                log.warning("%s; trying the object store", exc)
                refs = ray.get(got.source.kv_objects.remote(got.request_id), timeout=60)
                if refs is None:
                    raise HandoffFailed(f"the latents of {got.request_id} are gone from the prefill rank") from exc
                got = refs
        return join_blocks(ray.get(got, timeout=60)).to(self.device)

    def stats(self) -> dict:
        """Pair-group counters, what is parked here, and the receive timing (bench handoff, tests)."""
        return {**self.pairs.stats, "parked": len(self.parked.items), "parked_bytes": self.parked.nbytes,
                "timing": dict(self.timing)}
