"""Paged MLA latent cache of one rank: a page pool, per-sequence block tables.

One entry per token: kv_norm(c_kv) | rope(k_pe), L+R wide (576 for V3), in pages of
64 tokens as FlashMLA. The pool is [n_layers, n_pages + 1, page_size, L+R]: the extra page
(`scratch_page`) is never handed out; the padding rows of a CUDA-graph decode bucket write
and read it, so they never touch a live sequence's latents.
Never: decides who gets pages (pipelines/batcher.py does); it only allocates and frees.
"""
from __future__ import annotations

import math

import torch

from epserve.errors import EpserveError


class OutOfPages(EpserveError, RuntimeError):
    """The pool has fewer free pages than asked for (the batcher checks first: a bug if it reaches a caller)."""


class PagedKVCache:
    def __init__(self, n_layers: int, n_pages: int, page_size: int, kv_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if n_pages < 1 or page_size < 1:
            raise ValueError(f"kv cache needs >= 1 page of >= 1 token (got {n_pages} x {page_size})")
        self.page_size = page_size
        self.kv = torch.zeros(n_layers, n_pages + 1, page_size, kv_dim, dtype=dtype, device=device)
        self.free_pages: list[int] = list(range(n_pages - 1, -1, -1))
        self.refs = [0] * n_pages                  # holders of each page (n > 1 choices share prompt pages)
        self.scratch_page = n_pages

    @property
    def n_pages(self) -> int:
        """Pages that can be allocated (the scratch page is not one of them)."""
        return self.kv.shape[1] - 1

    @property
    def n_free(self) -> int:
        return len(self.free_pages)

    @property
    def n_used(self) -> int:
        return self.n_pages - self.n_free

    def pages_for(self, n_tokens: int) -> int:
        return math.ceil(n_tokens / self.page_size)

    def allocate(self, n: int) -> list[int]:
        if n > len(self.free_pages):
            raise OutOfPages(f"asked for {n} KV pages, {len(self.free_pages)} free of {self.n_pages}")
        out = [self.free_pages.pop() for _ in range(n)]
        for p in out:
            self.refs[p] = 1
        return out

    def retain(self, pages: list[int]) -> None:
        """One more holder of each page (it returns to the pool when its last holder frees it)."""
        for p in pages:
            self.refs[p] += 1

    def free(self, pages: list[int]) -> None:
        back = []
        for p in pages:
            self.refs[p] -= 1
            if self.refs[p] == 0:
                back.append(p)
        self.free_pages.extend(reversed(back))

    def slots(self, pages: list[int], start: int, end: int) -> list[int]:
        """Cache slots of token positions [start, end) of a sequence holding `pages`."""
        p = self.page_size
        return [pages[i // p] * p + i % p for i in range(start, end)]

    def read_tokens(self, pages: list[int], start: int, end: int) -> torch.Tensor:
        """Latents of positions [start, end) for every layer: [n_layers, end - start, L+R]."""
        idx = torch.tensor(self.slots(pages, start, end), dtype=torch.long, device=self.kv.device)
        return self.kv.flatten(1, 2)[:, idx]

    def write_tokens(self, pages: list[int], start: int, latents: torch.Tensor) -> None:
        """Store latents [n_layers, n, L+R] at positions [start, start + n)."""
        idx = torch.tensor(self.slots(pages, start, start + latents.shape[1]), dtype=torch.long,
                           device=self.kv.device)
        self.kv.flatten(1, 2)[:, idx] = latents.to(self.kv.dtype)
