"""The on-disk context cache as a rank uses it: load a cached prefix, save new full blocks.

Prefill: before a prompt is scheduled, its leading cached blocks are loaded from the
KV store into fresh pages (they count as computed; billed as cache hits), so the rank
computes only the uncached suffix. After the first token, the prompt's new full blocks
are written. Decode: when a sequence ends, the full blocks of prompt + output are
written, so the next turn of a chat hits. At least one prompt token is always
computed (its logits give the first output token).
Writes leave the step that produced them (pipelines/kv_writer.py): the step copies the blocks off
its buffers and queues them; a background thread writes them, and a load on this rank waits for
queued writes of its keys first, so a later request here hits what an earlier one wrote.
A block that fails to load is a miss (fleet/kv_store.py checks and removes it).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from epserve.fleet.kv_store import KVStore
from epserve.messages import KVStoreSpec
from epserve.model.checkpoint import read_config
from epserve.model.kv_cache import PagedKVCache
from epserve.pipelines.kv_writer import BlockWriter, copy_off_device
from epserve.pipelines.sequence import Sequence


def model_fingerprint(model_dir: str) -> str:
    """Identity of a checkpoint's weights for cache keys: config plus each file's size and head bytes."""
    h = hashlib.sha256()
    d = Path(model_dir)
    h.update((d / "config.json").read_bytes())
    for f in sorted(d.glob("*.safetensors")):
        h.update(f.name.encode())
        h.update(str(f.stat().st_size).encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
    return h.hexdigest()[:32]


def store_model_id(model_dir: str, fp8_activations: bool, mtp: bool = False) -> str:
    """What a cached latent depends on besides its tokens: the weights and, for an FP8 checkpoint, the
    activation precision. Latents computed with 1x128-quantised activations differ from unquantised
    ones, so each setting gets its own keys (the dtype is checked by the block header). A BF16
    checkpoint ignores fp8_activations, so its id is the bare fingerprint. With MTP served, blocks
    also hold the MTP layer's latents (one more layer), under their own keys."""
    fingerprint = model_fingerprint(model_dir) + ("+mtp" if mtp else "")
    if read_config(model_dir).fp8_block is None:
        return fingerprint
    return f"{fingerprint}+act-{'fp8' if fp8_activations else 'dtype'}"


def open_store(spec: KVStoreSpec, model_dir: str, n_layers: int, kv_dim: int, dtype: torch.dtype | str, *,
               fp8_activations: bool, mtp: bool = False, index_dim: int = 0) -> KVStore:
    """The store as a rank (or the ingress) computing with `dtype` and `fp8_activations` sees it;
    n_layers counts the MTP layer when mtp; kv_dim is the whole cache row, whose last index_dim
    values are V3.2's indexer key."""
    return KVStore(spec.root, store_model_id(model_dir, fp8_activations, mtp), dtype,
                   (n_layers, spec.block_tokens, kv_dim), spec.capacity_bytes, spec.shared_namespace,
                   index_dim=index_dim)


def cacheable_blocks(n_prompt: int, n_hit_blocks: int, block_tokens: int) -> int:
    """Blocks of a hit that can be used: all but what would leave no prompt token to compute."""
    return min(n_hit_blocks, (n_prompt - 1) // block_tokens)


class PrefixCache:
    """writer: where saves go (a BlockWriter: in the background; None: written on the caller's thread)."""

    def __init__(self, store: KVStore, writer: BlockWriter | None = None):
        self.store, self.writer = store, writer
        self.bt = store.block_tokens

    def close(self) -> None:
        """Write what is queued (rank shutdown)."""
        if self.writer is not None:
            self.writer.close()

    def may_hit(self, seq: Sequence) -> bool:
        """Whether seq could use a cached block at all (a tenant, a fresh prompt, > 1 block)."""
        return seq.tenant is not None and not seq.output_ids and cacheable_blocks(
            len(seq.prompt_ids), 1, self.bt) > 0

    def load_prefix(self, seq: Sequence) -> torch.Tensor | None:
        """Latents [n_layers, n, L+R] of the longest usable cached prefix of seq's prompt, or None."""
        if seq.tenant is None or seq.output_ids:
            return None
        keys = self.store.block_keys(seq.prompt_ids, seq.tenant)
        usable = cacheable_blocks(len(seq.prompt_ids), len(keys), self.bt)
        if usable and self.writer is not None:
            self.writer.wait_for(keys[:usable])          # this rank's own queued writes land first
        blocks = self.store.load_prefix(keys[:usable]) if usable else []
        return torch.cat(blocks, dim=1) if blocks else None

    def save(self, seq: Sequence, cache: PagedKVCache, n_tokens: int, skip_blocks: int = 0,
             blocks: list[torch.Tensor] | None = None) -> int:
        """Write the full blocks among seq's first n_tokens computed tokens; returns blocks written
        (with a writer: queued; the thread writes them, skipping keys already on disk).

        blocks: the same tokens already exported in block_tokens-sized pieces from block 0
        (the KV handoff's, host tensors); otherwise they are read from the paged cache.
        """
        if seq.tenant is None or not self.store.writes_enabled:
            return 0
        n_full = n_tokens // self.bt
        if n_full <= skip_blocks:
            return 0
        keys = self.store.block_keys(seq.all_ids[: n_full * self.bt], seq.tenant)
        todo = list(range(skip_blocks, n_full))          # save() skips keys already on disk
        done = None
        if blocks is None:         # read_tokens gathers into a new tensor: later steps may reuse the pages
            lat = cache.read_tokens(seq.pages, skip_blocks * self.bt, n_full * self.bt)
            lat, done = copy_off_device(lat) if self.writer is not None else (lat.cpu(), None)
            blocks = [None] * skip_blocks + [lat[:, j * self.bt:(j + 1) * self.bt] for j in range(len(todo))]
        keys, blocks = [keys[i] for i in todo], [blocks[i] for i in todo]
        if self.writer is None:
            return self.store.save_many(keys, blocks)
        return len(keys) if self.writer.submit(keys, blocks, done) else 0
