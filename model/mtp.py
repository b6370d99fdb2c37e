"""DeepSeek-V3's multi-token prediction (MTP) module, served as a draft model.

The checkpoint stores it as the layer after the last (`model.layers.{n_layers}.`): enorm, hnorm,
eh_proj [D, 2D], one transformer block (MLA + MoE, its routed experts placed, dispatched and
balanced with the main layers' as MoE layer n_moe_layers), and the head it shares with the main
model (shared_head.norm, and in the release copies of the embedding and head).

At position i it reads the main model's final-normed hidden h_i and the next token t_{i+1}:
    x_i = eh_proj([enorm(Emb(t_{i+1})); hnorm(h_i)]);  m_i = Block(x_i);  logits_i -> t_{i+2}
Its latent cache is layer n_layers of the rank's cache, at the same positions (and pages) as the
main layers. Chaining k > 1 feeds m_i back in as the next depth's h (as vLLM does).
Never: decides acceptance (model/speculative.py) or which tokens are drafted (the runner).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from types import ModuleType

import torch

from epserve.errors import ConfigError
from epserve.kernels.reference import Weight, rms_norm
from epserve.model.deepseek_v3 import MLA, MLP, Block, Gate, ModelArgs, MoE


def with_mtp(args: ModelArgs, n_draft: int) -> ModelArgs:
    """The args a rank serves: the MTP layer on (n_draft > 0) or off. A checkpoint without one is refused."""
    if n_draft <= 0:
        return replace(args, n_mtp_layers=0)
    if args.n_nextn_layers < 1:
        raise ConfigError("mtp.num_draft_tokens > 0 needs an MTP layer, but this checkpoint's config.json has "
                          f"num_nextn_predict_layers={args.n_nextn_layers}; set mtp.num_draft_tokens: 0 or use a "
                          "checkpoint with its MTP module (e.g. `epserve train-tiny DIR`)")
    if args.n_dense_layers > args.n_layers:
        raise ConfigError("the MTP layer must be a MoE layer")
    return replace(args, n_mtp_layers=1)


def build_mtp(args: ModelArgs, kb: ModuleType, dispatcher) -> "MTPModule":
    """The module, empty (model/checkpoint.py fills it): its block is MoE layer n_layers."""
    n = args.n_layers
    shared = MLP(kb) if args.n_shared_experts else None
    return MTPModule(kb, Block(MLA(args, kb), MoE(n, Gate(args, kb=kb), shared, dispatcher.make_shard(n), dispatcher)))


@dataclass
class MTPModule:
    kb: ModuleType
    block: Block
    enorm: torch.Tensor = None
    hnorm: torch.Tensor = None
    eh_proj: Weight = None
    norm: torch.Tensor = None          # shared_head.norm
    embed: torch.Tensor | None = None  # its own copy (release layout) or None: the main model's
    head: torch.Tensor | None = None

    def forward(self, model, batch, prev_hidden: torch.Tensor, kv_cache: torch.Tensor,
                all_logits: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """batch: the positions i with input_ids t_{i+1}; prev_hidden [T, D] (the main model's normed
        h_i, or the previous depth's output). -> (logits fp32 [T or B, vocab] for t_{i+2}, m [T, D]).
        Writes its latents into kv_cache[n_layers]."""
        a = model.args
        embed = self.embed if self.embed is not None else model.embed
        e = embed[batch.input_ids].to(model.dtype)
        x = self.kb.linear(torch.cat([rms_norm(e, self.enorm, a.rms_norm_eps),
                                      rms_norm(prev_hidden.to(model.dtype), self.hnorm, a.rms_norm_eps)], -1),
                           self.eh_proj)
        valid = batch.valid if batch.is_decode_only else None
        m = model.run_block(self.block, a.n_layers, x, batch, model.rope(batch.positions), kv_cache, valid)
        out = m if all_logits or batch.is_decode_only else (m[batch.last_token_index] if batch.seq_new else m[:0])
        return model.head_logits(rms_norm(out, self.norm, a.rms_norm_eps), self.head), m
