"""④ The prefill -> decode KV handoff, rank to rank: the prompt's MLA latents [n_layers, n, L+R].

Protocol (the decode peer is bound before prefill runs):
  1. The router picks the decode (unit, rank) at admission from its free KV pages, then the
     prefill (unit, rank), and sends the prompt to the prefill rank.
  2. The prefill rank computes the prompt, samples the first token, exports the prompt's
     latents, frees its pages, and hands them off by one of two transports (`kv_handoff`):
       object      the latents leave the device in blocks of `block_tokens` tokens and go into
                   the Ray object store (actors/rank.py); only object refs pass the router; the
                   bytes move prefill process -> decode process through the host.
       collective  the latents stay on the prefill rank's device, parked under the request id
                   (`ParkedKv`, dropped after `park_ttl_s`), and a small `KvTicket` (shape, dtype,
                   which rank holds them) travels instead; the decode rank pulls them with one
                   send/recv on a two-rank process group shared with that prefill rank
                   (actors/kv_transfer.py: NCCL between GPUs, gloo on CPU), device to device.
     `auto` parks and sends a ticket; the decode rank tries the pair group and, if the two
     ranks cannot form one, asks the prefill rank for object refs of the same latents.
  3. The decode rank imports the latents into freshly allocated pages and continues from the
     first token. If its pages filled up meanwhile, or the latents are gone (the prefill rank
     died, the ticket expired, the pair broke), the request recomputes its prompt on the decode
     rank: slower, never wrong, never a hang (every wait on the peer is bounded).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from epserve.model.kv_cache import PagedKVCache
from epserve.pipelines.sequence import Sequence

KV_HANDOFF = ("auto", "collective", "object")


def export_latents(cache: PagedKVCache, seq: Sequence) -> torch.Tensor:
    """The latents of the tokens already computed for `seq`, on the cache's device [n_layers, n, L+R]."""
    return cache.read_tokens(seq.pages, 0, seq.n_computed).clone()


def export_blocks(cache: PagedKVCache, seq: Sequence, block_tokens: int = 64) -> list[torch.Tensor]:
    """Latents of the tokens already computed for `seq`, split into blocks (CPU tensors)."""
    return split_blocks(cache.read_tokens(seq.pages, 0, seq.n_computed).cpu(), block_tokens)


def split_blocks(latents: torch.Tensor, block_tokens: int = 64) -> list[torch.Tensor]:
    """[n_layers, n, L+R] -> blocks of block_tokens tokens (copies, so each pickles alone)."""
    return [latents[:, i:i + block_tokens].clone() for i in range(0, latents.shape[1], block_tokens)]


def join_blocks(blocks: list[torch.Tensor]) -> torch.Tensor:
    """[n_layers, n_tokens, L+R] from blocks in order."""
    return torch.cat(blocks, dim=1)


@dataclass
class KvTicket:
    """What travels instead of the latents on the collective path: enough for the decode rank to
    allocate the receive buffer and find the sender. `source` is the prefill rank's actor handle
    (opaque here); `source_id` names that rank process uniquely."""

    request_id: str
    shape: tuple[int, int, int]
    dtype: str
    source: object
    source_id: str

    @property
    def nbytes(self) -> int:
        n = self.shape[0] * self.shape[1] * self.shape[2]
        return n * torch.empty((), dtype=getattr(torch, self.dtype)).element_size()


class ParkedKv:
    """Latents waiting on the prefill rank for their decode rank to pull them, each for at most
    ttl_s seconds (a request aborted between prefill and decode must not hold device memory).
    The caller passes the clock, so this stays a plain container."""

    def __init__(self, ttl_s: float = 120.0):
        self.ttl_s = ttl_s
        self.items: dict[str, tuple[torch.Tensor, float]] = {}
        self.lock = threading.Lock()          # parked by the step loop, taken by the peer's pull

    def park(self, request_id: str, latents: torch.Tensor, now: float) -> None:
        with self.lock:
            self._purge(now)
            self.items[request_id] = (latents, now + self.ttl_s)

    def take(self, request_id: str, now: float) -> torch.Tensor | None:
        with self.lock:
            self._purge(now)
            item = self.items.pop(request_id, None)
        return None if item is None else item[0]

    def purge(self, now: float) -> int:
        with self.lock:
            return self._purge(now)

    def _purge(self, now: float) -> int:
        old = [rid for rid, (_, until) in self.items.items() if until < now]
        for rid in old:
            del self.items[rid]
        return len(old)

    @property
    def nbytes(self) -> int:
        with self.lock:
            return sum(t.numel() * t.element_size() for t, _ in self.items.values())
