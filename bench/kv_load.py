"""The KV store's load of a prefill step's cached prefixes, timed on this host's disk: what
`bench step --phase prefill --cached F` counts beside the step's compute (bench/step_ep.py).

Owns: writing a step's cached blocks with fleet/kv_store.py (real block files: header, payload,
checksum; fsync'd) into a temporary folder under the KV store's default root (the same disk a
deployment's store would use), then timing what a prefill rank does with them:
  read       KVStore.load_prefix of each prompt's blocks and the concatenation PrefixCache.load_prefix
             makes: the work of RankEngine's one `kv-load` thread;
  to_device  each prompt's latents moved to the device and written into its pages (the step loop's
             `cached.to(device)` and PagedKVCache.write_tokens, in RankEngine._admit_loaded).
cold (default): after writing, each block file's pages are dropped from the OS page cache
(posix_fadvise DONTNEED on that file only: no root, nothing else dropped), so `read` comes from the
disk rather than from the memory the writes just filled. Every block must load (a miss raises):
the figure counts the whole cached prefix, none of it dropped.

How the engine overlaps it (`exposed_load_ms`): RankEngine submits a prompt's load to its loader
thread when the prompt arrives, and the prompt joins a step only once the load is done, so the reads
of the next step's prompts run while this step computes; the device copy runs in the step loop.
Exposed per step = max(0, read - compute) + to_device. Never: a test (it times a disk).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from epserve.config import cache_root
from epserve.fleet.kv_store import KVStore

V3_KV_LAYERS = 61


def exposed_load_ms(compute_ms: float, read_ms: float, to_device_ms: float) -> float:
    """ms of a step's cached-prefix load that the step waits for, as RankEngine schedules it (the
    read on the loader thread during the previous step's compute; the device copy in the loop)."""
    return max(0.0, read_ms - compute_ms) + to_device_ms


def input_rate(n_input: int, compute_ms: float, load: dict) -> dict:
    """Input tokens/s of a step of n_input prompt tokens (cached + computed) whose compute takes
    compute_ms, with the load of `load` (time_prefix_loads) counted as exposed or added serially."""
    exposed = exposed_load_ms(compute_ms, load["read_ms"], load["to_device_ms"])
    serial = load["read_ms"] + load["to_device_ms"]
    return {"input_tokens_per_s_per_gpu": round(n_input / (compute_ms + exposed) * 1e3, 1),
            "exposed_load_ms": round(exposed, 3),
            "input_tokens_per_s_if_load_serial": round(n_input / (compute_ms + serial) * 1e3, 1)}


def time_prefix_loads(n_prompts: int, n_blocks: int, n_layers: int, kv_dim: int, dtype: torch.dtype,
                      device: torch.device, block_tokens: int = 64, root: str | None = None, cold: bool = True,
                      seed: int = 0) -> dict:
    """Write n_prompts x n_blocks blocks [n_layers, block_tokens, kv_dim] of `dtype` to a temporary
    store under `root` (default: the KV store's default root), then time their load (see the module
    docstring). -> {"read_ms", "to_device_ms", "bytes", "read_gb_per_s", ...}; the folder is removed."""
    if n_prompts < 1 or n_blocks < 1:
        raise ValueError(f"need at least one prompt and one cached block, got {n_prompts} x {n_blocks}")
    base = Path(root) if root else cache_root() / "kv"
    base.mkdir(parents=True, exist_ok=True)
    folder = tempfile.mkdtemp(prefix="bench-kv-load-", dir=base)
    try:
        store = KVStore(folder, "bench-kv-load", dtype, (n_layers, block_tokens, kv_dim), capacity_bytes=1 << 50,
                        fsync=True)
        g = torch.Generator().manual_seed(seed)
        blocks = list(torch.randn(n_blocks, n_layers, block_tokens, kv_dim, generator=g).to(dtype).unbind(0))
        keys = []
        for i in range(n_prompts):      # distinct prompts: distinct keys (the contents may repeat)
            ids = torch.randint(4, 1 << 15, (n_blocks * block_tokens,), generator=g).tolist()
            keys.append(store.block_keys(ids, "bench"))
            assert store.save_many(keys[-1], blocks) == n_blocks, "the temporary store refused a write"
        del blocks
        if cold:
            for ks in keys:
                for k in ks:
                    fd = os.open(store.path_for(k), os.O_RDONLY)
                    try:
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    finally:
                        os.close(fd)
        t0 = time.perf_counter()
        lat = []
        for ks in keys:
            got = store.load_prefix(ks)
            if len(got) != n_blocks:
                raise RuntimeError(f"the KV store loaded {len(got)} of {n_blocks} blocks of a cached prefix")
            lat.append(torch.cat(got, dim=1))
        read_s = time.perf_counter() - t0
        n_tok = n_blocks * block_tokens
        pages = torch.empty(n_layers, n_prompts * n_tok, kv_dim, dtype=dtype, device=device)
        slots = torch.randperm(n_prompts * n_tok).to(device).view(n_prompts, n_tok)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t1 = time.perf_counter()
        for i, x in enumerate(lat):
            pages[:, slots[i]] = x.to(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        to_device_s = time.perf_counter() - t1
        n_bytes = store.stats.bytes_read
        return {"read_ms": round(read_s * 1e3, 3), "to_device_ms": round(to_device_s * 1e3, 3),
                "prompts": n_prompts, "blocks_per_prompt": n_blocks, "block_shape": [n_layers, block_tokens, kv_dim],
                "dtype": str(dtype).removeprefix("torch."), "bytes": n_bytes,
                "read_gb_per_s": round(n_bytes / read_s / 1e9, 3), "cold": cold,
                "where": f"a temporary folder under {base} (fleet/kv_store.py block files, fsync'd)",
                "overlap": "as RankEngine: reads on its kv-load thread during the previous step's compute, "
                           "exposed = max(0, read - compute) + to_device (the device copy in the step loop)"}
    finally:
        shutil.rmtree(folder, ignore_errors=True)
