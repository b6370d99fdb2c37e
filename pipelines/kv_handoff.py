"""④ The prefill -> decode KV handoff, rank to rank, in 64-token blocks of MLA latents.

Protocol (the decode peer is bound before prefill runs):
  1. The router picks the decode (unit, rank) at admission from its free KV pages, then the
     prefill (unit, rank), and sends the prompt to the prefill rank.
  2. The prefill rank computes the prompt, samples the first token, exports the prompt's
     latents as blocks of `block_tokens` tokens [n_layers, <=block_tokens, L+R], frees its
     pages, and returns the blocks (actors/rank.py puts each in the Ray object store, so
     the router sees only object refs; the bytes move prefill process -> decode process).
  3. The decode rank imports the blocks into freshly allocated pages and continues from
     the first token. If its pages filled up meanwhile, or the blocks are gone (the
     prefill rank died), the request falls back to recomputing its prompt on the decode
     rank: slower, never wrong.
"""
from __future__ import annotations

import torch

from epserve.model.kv_cache import PagedKVCache
from epserve.pipelines.sequence import Sequence


def export_blocks(cache: PagedKVCache, seq: Sequence, block_tokens: int = 64) -> list[torch.Tensor]:
    """Latents of the tokens already computed for `seq`, split into blocks (CPU tensors)."""
    lat = cache.read_tokens(seq.pages, 0, seq.n_computed).cpu()
    return [lat[:, i:i + block_tokens].clone() for i in range(0, seq.n_computed, block_tokens)]


def join_blocks(blocks: list[torch.Tensor]) -> torch.Tensor:
    """[n_layers, n_tokens, L+R] from blocks in order."""
    return torch.cat(blocks, dim=1)
