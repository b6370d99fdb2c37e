"""Writes a rank's new KV-store blocks off the step loop (issue 24): the step that produced a
prompt's blocks only copies them off its buffers and queues them; one `kv-write` thread writes them.

The protocol, per save (pipelines/prefix_cache.py `PrefixCache.save`):
  1. on the step loop: the blocks' latents are gathered out of the paged cache (a new tensor, so
     later steps may reuse the pages) and, on CUDA, copied into pinned host memory with
     non_blocking=True; an event recorded after the copy is queued with them (no host sync);
  2. `submit` queues (keys, blocks, event) if the bytes in flight stay under `max_bytes`; otherwise
     the save is dropped, counted (`dropped`) and logged: the store is a cache, a missing block is
     a miss, and waiting for room would put the write back on the step;
  3. the thread waits for the event (the copy has landed), then KVStore.save_many writes each block
     atomically (temp file + rename), so a block is visible to any lookup only once it is whole;
     an error is logged and counted (`errors`) and the request it came from goes on untouched;
  4. `wait_for(keys)` blocks until none of `keys` is queued or being written: the rank's loader
     thread calls it before loading a prefix, so a later request on this rank sees every block an
     earlier one wrote (other processes see a block once its file is renamed into place);
  5. `close` writes everything queued, then stops the thread (rank shutdown).
Never: runs on the step loop, or lets a failed write reach a request.
"""
from __future__ import annotations

import collections
import logging
import threading

import torch

from epserve.messages import KV_WRITE_OUTCOMES

log = logging.getLogger(__name__)


def copy_off_device(latents: torch.Tensor) -> tuple[torch.Tensor, object]:
    """latents (a tensor no later step writes) -> (host tensor, event or None). On CUDA the copy
    goes to pinned memory without a host sync; the event says when it has landed."""
    if latents.device.type != "cuda":
        return latents, None
    host = torch.empty(latents.shape, dtype=latents.dtype, pin_memory=True)
    host.copy_(latents, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    return host, done


class BlockWriter:
    """Writes queued blocks into `store` on one background thread.

    Counters in `stats`: saves `submitted`, `dropped` and `errors` (a save is one submit's blocks), and
    `blocks_<outcome>` / `bytes_<outcome>` per messages.KV_WRITE_OUTCOMES (`outcomes()` reads them);
    every block submitted ends in exactly one outcome once written or dropped. A save that raised
    counts all its blocks failed, even any the store wrote before the error."""

    def __init__(self, store, max_bytes: int = 1 << 30):
        self.store, self.max_bytes = store, max_bytes
        self.stats = {"submitted": 0, "dropped": 0, "errors": 0,
                      **{f"{unit}_{o}": 0 for o in KV_WRITE_OUTCOMES for unit in ("blocks", "bytes")}}
        self._queue: collections.deque = collections.deque()
        self._pending: collections.Counter = collections.Counter()      # key -> saves queued or in flight
        self._bytes = 0
        self._busy = 0                   # items taken off the queue and not yet finished
        self._closed = False
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="kv-write", daemon=True)
        self._thread.start()

    def submit(self, keys: list[str], blocks: list[torch.Tensor], done=None) -> bool:
        """Queue blocks [n_layers, block_tokens, kv_dim] under `keys`; done: the event of their copy
        (copy_off_device). False: dropped (over max_bytes in flight, or closed), counted and logged."""
        n_bytes = sum(b.numel() * b.element_size() for b in blocks)
        with self._cv:
            if self._closed or (self._bytes and self._bytes + n_bytes > self.max_bytes):
                self.stats["dropped"] += 1
                self._count("dropped", len(keys), n_bytes)
                if self.stats["dropped"] in (1, 10, 100) or self.stats["dropped"] % 1000 == 0:
                    log.warning("KV-store write of %d blocks dropped (%s; %d dropped so far): they will be misses",
                                len(keys), "writer closed" if self._closed else
                                f"{self._bytes} bytes already queued, limit {self.max_bytes}", self.stats["dropped"])
                return False
            self._queue.append((keys, blocks, done, n_bytes))
            self._pending.update(keys)
            self._bytes += n_bytes
            self.stats["submitted"] += 1
            self._cv.notify_all()
        return True

    def _run(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._queue or self._closed)
                if not self._queue:
                    return                                   # closed and drained
                keys, blocks, done, n_bytes = self._queue.popleft()
                self._busy += 1
            try:
                if done is not None:
                    done.synchronize()
                refused = self.store.stats.blocks_refused
                written = self.store.save_many(keys, blocks)
                refused = min(self.store.stats.blocks_refused - refused, len(keys) - written)
                with self._cv:
                    per_block = n_bytes // max(1, len(keys))
                    self._count("written", written, written * per_block)
                    self._count("refused", refused, refused * per_block)
                    skipped = len(keys) - written - refused
                    self._count("skipped", skipped, n_bytes - (written + refused) * per_block)
            except Exception as exc:                         # never reaches the request that made the blocks
                with self._cv:
                    self.stats["errors"] += 1
                    self._count("failed", len(keys), n_bytes)
                log.warning("KV-store write of %d blocks failed (%r); they will be misses", len(keys), exc)
            finally:
                with self._cv:
                    self._pending.subtract(keys)
                    self._pending += collections.Counter()   # drop keys at zero
                    self._bytes -= n_bytes
                    self._busy -= 1
                    self._cv.notify_all()

    def _count(self, outcome: str, n_blocks: int, n_bytes: int) -> None:
        """(caller holds the lock)"""
        self.stats[f"blocks_{outcome}"] += n_blocks
        self.stats[f"bytes_{outcome}"] += n_bytes

    def outcomes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(blocks, bytes), each per messages.KV_WRITE_OUTCOMES, as of now (any thread)."""
        with self._cv:
            return (tuple(self.stats[f"blocks_{o}"] for o in KV_WRITE_OUTCOMES),
                    tuple(self.stats[f"bytes_{o}"] for o in KV_WRITE_OUTCOMES))

    def wait_for(self, keys: list[str], timeout: float | None = None) -> bool:
        """Block until none of `keys` is queued or being written (False: timed out)."""
        with self._cv:
            return self._cv.wait_for(lambda: not any(k in self._pending for k in keys), timeout)

    def flush(self, timeout: float | None = None) -> bool:
        """Block until every queued write has finished (False: timed out)."""
        with self._cv:
            return self._cv.wait_for(lambda: not self._queue and not self._busy, timeout)

    def close(self, timeout: float | None = 60.0) -> None:
        """Write what is queued, then stop the thread; later submits are dropped."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("KV-store writer still busy after %.0f s at shutdown; %d saves unwritten",
                        timeout, len(self._queue))
