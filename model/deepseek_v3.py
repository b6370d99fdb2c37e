"""DeepSeek-V3/R1 model math with single-rank semantics (DeepSeek's names).

Owns: ModelArgs (parsed and validated from a checkpoint's config.json, in the
original release format or transformers' rope_parameters format), MLA (naive
form for prefill, weight-absorbed form for decode over the paged latent cache),
the group-limited sigmoid Gate, dense MLP, MoE and the Transformer. V3.2 (index_* set): MLA
hands its tokens to model/dsa.py's indexer and sparse attention.
Never: talks to other ranks itself. The MoE hands (tokens, experts) to the
`experts` seam (model/moe_dispatch.py), which is local on one rank and an
all-to-all across a unit's ranks; everything else here is per-rank work.

Shape legend: T tokens in the step (all sequences concatenated), B sequences,
D hidden, H heads, P qk_nope_head_dim, R qk_rope_head_dim, V v_head_dim,
L kv_lora_rank, E routed experts, K experts per token.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from functools import cached_property
from types import ModuleType

import torch
import torch.nn.functional as F

from epserve.errors import ConfigError
from epserve.kernels.reference import Weight, add_rms_norm, mla_rope_latent, route_topk, stack_rows
from epserve.model.dsa import Indexer, sparse_attend
from epserve.model.rope import rope_inv_freq, yarn_mscale


@dataclass(frozen=True)
class ModelArgs:
    vocab_size: int = 129280
    dim: int = 7168
    inter_dim: int = 18432
    moe_inter_dim: int = 2048
    n_layers: int = 61
    n_dense_layers: int = 3
    n_heads: int = 128
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    n_activated_experts: int = 8
    n_expert_groups: int = 8
    n_limited_groups: int = 4
    score_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    route_scale: float = 2.5
    norm_topk_prob: bool = True
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 163840
    rope_theta: float = 10000.0
    rope_interleave: bool = True
    rope_type: str = "default"          # default | yarn
    rope_factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_ids: tuple[int, ...] = (1,)
    fp8_block: tuple[int, int] | None = None  # (128, 128) when the checkpoint is FP8
    n_nextn_layers: int = 0      # MTP modules the checkpoint carries (num_nextn_predict_layers)
    n_mtp_layers: int = 0        # MTP modules served (built, loaded, placed): model/mtp.py `with_mtp`
    index_n_heads: int = 0       # V3.2's sparse attention (model/dsa.py): indexer heads; 0 = dense MLA (V3)
    index_head_dim: int = 0
    index_topk: int = 0          # tokens each query attends to

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_dim(self) -> int:
        """Width of one latent cache entry: kv_norm(c_kv) | rope(k_pe)."""
        return self.kv_lora_rank + self.qk_rope_head_dim
    is_dsa = property(lambda self: self.index_n_heads > 0)
    cache_dim = property(lambda self: self.kv_dim + self.index_head_dim)   # a cache row: latent | V3.2 index key

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.n_dense_layers

    @property
    def softmax_scale(self) -> float:
        """192^-0.5 x mscale^2 under yarn (mscale from mscale_all_dim, as vLLM/SGLang/transformers)."""
        scale = self.qk_head_dim ** -0.5
        if self.rope_type == "yarn" and self.mscale_all_dim:
            m = yarn_mscale(self.rope_factor, self.mscale_all_dim)
            scale *= m * m
        return scale

    # MoE layers through EP and EPLB, and layers with a latent cache: the main ones, then the MTP layer's
    n_ep_layers = property(lambda self: self.n_moe_layers + self.n_mtp_layers)
    n_kv_layers = property(lambda self: self.n_layers + self.n_mtp_layers)

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.n_dense_layers

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelArgs":
        """Parse config.json (original release or transformers format); validate once."""
        def need(key):
            if key not in cfg:
                raise ConfigError(f"config.json: missing required key {key!r}")
            return cfg[key]

        arch = cfg.get("model_type", "deepseek_v3")
        if arch not in ("deepseek_v3", "deepseek_v2", "kimi_k2", "deepseek_v32"):
            raise ConfigError(f"config.json: model_type {arch!r} is not supported; expected 'deepseek_v3'")
        dsa = {k: need(k) for k in ("index_n_heads", "index_head_dim", "index_topk")} if arch == "deepseek_v32" else {}
        rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
        if rope_type not in ("default", "yarn"):
            raise ConfigError(f"config.json: rope type {rope_type!r} is not supported; use null/default or yarn")
        rope_theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        topk_method = cfg.get("topk_method", "noaux_tc")
        if topk_method not in ("noaux_tc", "greedy", "group_limited_greedy"):
            raise ConfigError(f"config.json: topk_method {topk_method!r} is not supported; "
                              "use noaux_tc, greedy or group_limited_greedy")
        score_func = cfg.get("scoring_func", "sigmoid")
        if score_func not in ("sigmoid", "softmax"):
            raise ConfigError(f"config.json: scoring_func {score_func!r} must be sigmoid or softmax")
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"config.json: hidden_act {act!r} is not supported; only silu")
        eos = cfg.get("eos_token_id", 1)
        quant = cfg.get("quantization_config") or None
        fp8_block = None
        if quant is not None:
            if quant.get("quant_method") != "fp8" or quant.get("fmt", "e4m3") != "e4m3":
                raise ConfigError(f"config.json: quantization_config {quant!r} is not supported; "
                                  "only fp8 e4m3 with weight_block_size [128, 128]")
            fp8_block = tuple(quant.get("weight_block_size", [128, 128]))
            if fp8_block != (128, 128):
                raise ConfigError(f"config.json: weight_block_size {list(fp8_block)} must be [128, 128]")
        n_heads = need("num_attention_heads")
        if cfg.get("num_key_value_heads", n_heads) != n_heads:
            raise ConfigError("config.json: num_key_value_heads must equal num_attention_heads for MLA")
        args = cls(
            vocab_size=need("vocab_size"), dim=need("hidden_size"), inter_dim=need("intermediate_size"),
            moe_inter_dim=need("moe_intermediate_size"), n_layers=need("num_hidden_layers"),
            n_dense_layers=cfg.get("first_k_dense_replace", 0) or 0, n_heads=n_heads,
            n_routed_experts=need("n_routed_experts"), n_shared_experts=cfg.get("n_shared_experts", 0) or 0,
            n_activated_experts=need("num_experts_per_tok"), n_expert_groups=cfg.get("n_group", 1) or 1,
            n_limited_groups=cfg.get("topk_group", 1) or 1, score_func=score_func, topk_method=topk_method,
            route_scale=float(cfg.get("routed_scaling_factor", 1.0)),
            norm_topk_prob=bool(cfg.get("norm_topk_prob", True)), q_lora_rank=cfg.get("q_lora_rank"),
            kv_lora_rank=need("kv_lora_rank"), qk_nope_head_dim=need("qk_nope_head_dim"),
            qk_rope_head_dim=need("qk_rope_head_dim"), v_head_dim=need("v_head_dim"),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=need("max_position_embeddings"), rope_theta=float(rope_theta),
            rope_interleave=bool(cfg.get("rope_interleave", True)), rope_type=rope_type,
            rope_factor=float(rope.get("factor", 1.0) or 1.0),
            original_max_position_embeddings=int(rope.get("original_max_position_embeddings",
                                                          cfg["max_position_embeddings"])),
            beta_fast=float(rope.get("beta_fast", 32) or 32), beta_slow=float(rope.get("beta_slow", 1) or 1),
            mscale=float(rope.get("mscale", 1.0) or 0.0), mscale_all_dim=float(rope.get("mscale_all_dim", 0) or 0),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_token_id=cfg.get("bos_token_id"), eos_token_ids=tuple(eos if isinstance(eos, list) else [eos]),
            fp8_block=fp8_block, n_nextn_layers=int(cfg.get("num_nextn_predict_layers", 0) or 0), **dsa,
        )
        args.validate()
        return args

    def validate(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.type == "int" and (not isinstance(v, int) or v < 0):
                raise ConfigError(f"config.json: {f.name}={v!r} must be a non-negative integer")
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_routed_experts", "n_activated_experts",
                     "kv_lora_rank", "qk_nope_head_dim", "v_head_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"config.json: {name}={getattr(self, name)} must be > 0")
        if self.qk_rope_head_dim <= 0 or self.qk_rope_head_dim % 2:
            raise ConfigError(f"config.json: qk_rope_head_dim={self.qk_rope_head_dim} must be even and > 0")
        if self.n_dense_layers > self.n_layers:
            raise ConfigError(f"config.json: first_k_dense_replace={self.n_dense_layers} exceeds "
                              f"num_hidden_layers={self.n_layers}")
        if self.n_routed_experts % self.n_expert_groups:
            raise ConfigError(f"config.json: n_routed_experts={self.n_routed_experts} is not divisible by "
                              f"n_group={self.n_expert_groups}")
        if not 1 <= self.n_limited_groups <= self.n_expert_groups:
            raise ConfigError(f"config.json: topk_group={self.n_limited_groups} must be in [1, n_group="
                              f"{self.n_expert_groups}]")
        per_group = self.n_routed_experts // self.n_expert_groups
        if not 1 <= self.n_activated_experts <= self.n_limited_groups * per_group:
            raise ConfigError(f"config.json: num_experts_per_tok={self.n_activated_experts} must be in [1, "
                              f"topk_group x experts per group = {self.n_limited_groups * per_group}]")
        if self.n_expert_groups > 1 and per_group < 2 and self.topk_method == "noaux_tc":
            raise ConfigError("config.json: noaux_tc routing needs at least 2 experts per group")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            raise ConfigError(f"config.json: q_lora_rank={self.q_lora_rank} must be null or > 0")
        if self.is_dsa and (self.index_topk < 1 or not self.q_lora_rank or self.index_head_dim < self.qk_rope_head_dim):
            raise ConfigError(f"config.json: DSA needs index_topk={self.index_topk} >= 1, q_lora_rank="
                              f"{self.q_lora_rank} set, and index_head_dim={self.index_head_dim} >= qk_rope_head_dim")
        if self.rope_type == "yarn" and self.rope_factor < 1:
            raise ConfigError(f"config.json: rope_scaling.factor={self.rope_factor} must be >= 1 for yarn")


@dataclass
class Batch:
    """One forward step on one rank: B sequences, T = sum of their new tokens.

    seq_ctx[b] tokens of sequence b are already in the cache; its seq_new[b] new tokens
    follow at positions seq_ctx[b] .. seq_ctx[b] + seq_new[b] - 1. slot_mapping[t] is the
    cache slot (page * page_size + offset) where token t's latent is written.
    """

    input_ids: torch.Tensor        # int64 [T]
    positions: torch.Tensor        # int64 [T]
    seq_new: list[int]
    seq_ctx: list[int]
    block_tables: torch.Tensor     # int64 [B, max_pages]
    slot_mapping: torch.Tensor     # int64 [T]
    force_naive: bool = False      # decode through the naive form too (tests)
    plan: object = None            # the kernels' per-step attention plan (kb.plan_mla_decode()), shared by layers
    max_decode_new: int = 1        # sequences with context and <= this many new tokens attend absorbed (MTP)
    is_decode_only = False

    @property
    def n_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def last_token_index(self) -> torch.Tensor:
        return torch.tensor(self.seq_new, dtype=torch.long).cumsum(0) - 1

    # What every layer's attention needs from the batch's shape, computed once per step.
    @cached_property
    def starts(self) -> list[int]:
        """First token row of each sequence."""
        return [0] + torch.tensor(self.seq_new, dtype=torch.long).cumsum(0).tolist()

    @cached_property
    def decode_rows(self) -> list[int]:
        """Sequences attended in the absorbed (latent) form: 1..max_decode_new new tokens after cached context."""
        return [i for i, (n, c) in enumerate(zip(self.seq_new, self.seq_ctx)) if 1 <= n <= self.max_decode_new
                and c > 0 and not self.force_naive]

    @cached_property
    def decode_index(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(token row, seq_len, block table row) of each new token of the decode rows, on the batch's
        device; token j of a sequence sees its context and new tokens 0..j (causal among them)."""
        dev = self.input_ids.device
        pairs = [(i, j) for i in self.decode_rows for j in range(self.seq_new[i])]
        return (torch.tensor([self.starts[i] + j for i, j in pairs], dtype=torch.long, device=dev),
                torch.tensor([self.seq_ctx[i] + j + 1 for i, j in pairs], dtype=torch.long, device=dev),
                self.block_tables[[i for i, _ in pairs]])

    @classmethod
    def empty(cls, device: torch.device | str = "cpu") -> "Batch":
        z = torch.zeros(0, dtype=torch.long, device=device)
        return cls(z, z, [], [], torch.zeros(0, 1, dtype=torch.long, device=device), z)


@dataclass
class DecodeBatch:
    """A pure decode step as tensors of fixed shape: what a CUDA graph captures once per bucket.

    B rows of S = n_q new tokens each (MTP verify: the last token and k drafts, causal among them), token
    rows in sequence order [B*S]. Rows past the live ones pad the bucket: valid False, context on a
    scratch page, outputs unused. block_tables / seq_lens are int32, as FlashMLA takes them.
    """

    input_ids: torch.Tensor        # int64 [B*S]
    positions: torch.Tensor        # int64 [B*S]
    slot_mapping: torch.Tensor     # int64 [B*S] cache slot of each new latent
    block_tables: torch.Tensor     # int32 [B, W]
    seq_lens: torch.Tensor         # int32 [B] = last position + 1
    valid: torch.Tensor            # bool [B*S]: False on padding rows and on absent drafts (MoE skips them)
    plan: object = None
    n_q: int = 1
    is_decode_only = True

    @classmethod
    def from_rows(cls, input_ids: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor, tables: torch.Tensor,
                  page_size: int, scratch_row: int, plan=None, n_q: int = 1,
                  valid: torch.Tensor | None = None) -> "DecodeBatch":
        """Build the step on the device from (tokens, positions) [B*S] and a table row [B] per sequence;
        tables [n_rows, W] int32 is the rank's persistent block table (row scratch_row: the scratch page).
        valid [B*S] (optional) marks the query rows that carry a real token (absent drafts: False)."""
        bt = tables[rows]
        bt_tok = bt if n_q == 1 else bt.repeat_interleave(n_q, 0)
        page = bt_tok.gather(1, (positions // page_size)[:, None])[:, 0].long()
        live = (rows != scratch_row).repeat_interleave(n_q)
        seq_lens = positions.view(-1, n_q)[:, -1] + 1
        return cls(input_ids, positions, page * page_size + positions % page_size, bt, seq_lens.to(torch.int32),
                   live if valid is None else live & valid, plan, n_q)

    @property
    def n_tokens(self) -> int:
        return int(self.input_ids.numel())


@dataclass
class MLA:
    """Multi-head latent attention of one layer."""

    args: ModelArgs
    kb: ModuleType
    wq: Weight | None = None
    wq_a: Weight | None = None
    q_norm: torch.Tensor | None = None
    wq_b: Weight | None = None
    wkv_a: Weight = None
    kv_norm: torch.Tensor = None
    wkv_b: Weight = None
    wo: Weight = None
    indexer: Indexer | None = None      # V3.2 (args.is_dsa): model/dsa.py picks the tokens each query attends to
    _absorb: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)
    _down: Weight | bool | None = field(default=None, repr=False)   # wq(_a), [wk,] wkv_a stacked (False: cannot)

    def __post_init__(self):
        if self.args.is_dsa and self.indexer is None:
            self.indexer = Indexer(self.args, self.kb)

    def absorbed(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_UK [H, P, L], W_UV [H, V, L]) from wkv_b, cached after first use."""
        if self._absorb is None:
            a = self.args
            w = self.wkv_b.dense(torch.float32).view(a.n_heads, a.qk_nope_head_dim + a.v_head_dim, a.kv_lora_rank)
            self._absorb = (w[:, : a.qk_nope_head_dim].to(dtype).contiguous(),
                            w[:, a.qk_nope_head_dim:].to(dtype).contiguous())
        return self._absorb

    def forward(self, x: torch.Tensor, batch: Batch, rope: tuple[torch.Tensor, torch.Tensor],
                cache_layer: torch.Tensor) -> torch.Tensor:
        """x [T, D] -> [T, D]; writes the new tokens' latents into cache_layer [pages, page, cache_dim]
        (cache_dim = L+R, and for V3.2 the indexer's key after it)."""
        return self.attend(self.project(x, batch, rope, cache_layer), batch, cache_layer)

    # The two halves DeepSeek's decode pipeline schedules apart (pipelines/overlap.py):
    # ATTN-0 = project (down/up projections, RoPE, cache write, query absorption),
    # ATTN-1 = attend (core attention and the output projection).
    def project(self, x: torch.Tensor, batch: Batch, rope: tuple[torch.Tensor, torch.Tensor],
                cache_layer: torch.Tensor) -> "Queries":
        a, kb = self.args, self.kb
        t = x.shape[0]
        q, kv, k_index = self.down(x)
        qr = None
        if self.wq is None:
            qr = kb.rms_norm(q, self.q_norm, a.rms_norm_eps)
            q = kb.linear(qr, self.wq_b)
        q = q.view(t, a.n_heads, a.qk_head_dim)
        q_nope, q_pe = q.split([a.qk_nope_head_dim, a.qk_rope_head_dim], -1)
        q_lat = None
        if batch.is_decode_only:   # absorbed form [B, H, L + R]: q_nope @ W_UK, then the rotated q_pe
            q_lat = self._latent_query(q_nope, x.dtype)
        # the new latents into the cache and the query's rotation: one kernel on CUDA (kernels/triton_latent.py)
        flat_cache = cache_layer.view(-1, cache_layer.shape[-1])
        q_pe = getattr(kb, "mla_rope_latent", mla_rope_latent)(
            q_pe, kv, rope[0], rope[1], self.kv_norm, a.rms_norm_eps, a.rope_interleave, flat_cache,
            batch.slot_mapping, None if q_lat is None else q_lat[..., a.kv_lora_rank:])
        index = self.indexer.project(x, qr, rope, flat_cache, batch.slot_mapping, k_index) if self.indexer else None
        if q_lat is None and batch.decode_rows:
            tok = batch.decode_index[0]
            q_lat = torch.cat([torch.einsum("bhp,hpl->bhl", q_nope[tok], self.absorbed(x.dtype)[0]), q_pe[tok]], -1)
        return Queries(q_nope, q_pe, q_lat, index)

    def down(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """x [T, D] -> (x @ wq(_a)^T, x @ wkv_a^T, V3.2: x @ indexer.wk^T else None): one GEMM over the stacked
        rows (one quantisation, one launch; wkv_a last: its 576 rows are not whole 128-row scale blocks)."""
        ix = self.indexer
        owners = [(self, "wq" if self.wq is not None else "wq_a")] + ([(ix, "wk")] if ix else []) + [(self, "wkv_a")]
        if self._down is None:
            st = stack_rows(*(getattr(o, n) for o, n in owners))
            self._down = False if st is None else st[0]
            for (o, n), part in zip(owners, st[1] if st else ()):
                setattr(o, n, part)
        outs = [self.kb.linear(x, getattr(o, n)) for o, n in owners] if self._down is False else \
            self.kb.linear(x, self._down).split([getattr(o, n).shape[0] for o, n in owners], -1)
        return outs[0], outs[-1], outs[1] if ix is not None else None

    def _latent_query(self, q_nope: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[B, H, L + R] with q_nope @ W_UK written by the batched GEMM straight into the first L
        columns (a cat of the GEMM's [B, H, L] result copied 38 MB at B = 256, 84 us a layer on an
        H200: as long as the GEMM itself); the last R columns are left for the rotated q_pe."""
        a = self.args
        q_lat = q_nope.new_empty(q_nope.shape[0], a.n_heads, a.kv_dim)
        torch.bmm(q_nope.transpose(0, 1), self.absorbed(dtype)[0], out=q_lat.transpose(0, 1)[..., :a.kv_lora_rank])
        return q_lat

    def attend(self, q: "Queries", batch: Batch, cache_layer: torch.Tensor) -> torch.Tensor:
        a, kb = self.args, self.kb
        dtype = q.q_nope.dtype
        w_uk, w_uv = self.absorbed(dtype)
        if self.indexer is not None:
            return kb.linear(sparse_attend(self, q, batch, cache_layer).flatten(1), self.wo)
        if batch.is_decode_only:     # n_q > 1: [B, S, H, L+R] queries, causal among the S (FlashMLA's s_q)
            q_lat = q.q_lat if batch.n_q == 1 else q.q_lat.view(-1, batch.n_q, *q.q_lat.shape[1:])
            o_lat, _ = kb.mla_decode(q_lat, cache_layer, batch.block_tables, batch.seq_lens, a.softmax_scale,
                                     a.kv_lora_rank, batch.plan)
            o_lat = o_lat.reshape(-1, *o_lat.shape[-2:]).to(dtype)
            # o_lat @ W_UV^T per head, written in [B, H, V] order (the einsum's [H, B, V] needed a copy)
            out = o_lat.new_empty(o_lat.shape[0], a.n_heads, a.v_head_dim)
            torch.bmm(o_lat.transpose(0, 1), w_uv.transpose(1, 2), out=out.transpose(0, 1))
            return kb.linear(out.flatten(1), self.wo)
        out = q.q_nope.new_empty(q.q_nope.shape[0], a.n_heads, a.v_head_dim)
        if batch.decode_rows:
            tok, seq_lens, tables = batch.decode_index
            o_lat, _ = kb.mla_decode(q.q_lat, cache_layer, tables, seq_lens, a.softmax_scale, a.kv_lora_rank,
                                     batch.plan)
            out[tok] = torch.einsum("bhl,hvl->bhv", o_lat.to(dtype), w_uv)
        page = cache_layer.shape[1]
        decode = set(batch.decode_rows)
        for i, (n, c) in enumerate(zip(batch.seq_new, batch.seq_ctx)):
            if i in decode or n == 0:
                continue
            total = c + n
            pages = batch.block_tables[i, : math.ceil(total / page)]
            lat = cache_layer[pages].reshape(-1, a.kv_dim)[:total].to(dtype)
            c_lat, k_rope = lat.split([a.kv_lora_rank, a.qk_rope_head_dim], -1)
            # naive form: expand the latent to per-head keys [total, H, P+R] and values [total, H, V]
            k_nope = torch.einsum("sl,hpl->shp", c_lat, w_uk)
            k = torch.cat([k_nope, k_rope[:, None].expand(-1, a.n_heads, -1)], -1)
            v = torch.einsum("sl,hvl->shv", c_lat, w_uv)
            s = slice(batch.starts[i], batch.starts[i] + n)
            qi = torch.cat([q.q_nope[s], q.q_pe[s]], -1)
            out[s] = kb.mla_prefill(qi, k, v, a.softmax_scale)
        return kb.linear(out.flatten(1), self.wo)


@dataclass
class Queries:
    """ATTN-0's output for ATTN-1: the queries; the new latents are already in the cache."""

    q_nope: torch.Tensor               # [T, H, P]
    q_pe: torch.Tensor                 # [T, H, R], rotated
    q_lat: torch.Tensor | None         # [len(batch.decode_rows), H, L+R] absorbed queries
    index: tuple | None = None         # V3.2: the indexer's (q [T, Hi, Di], w fp32 [T, Hi])


@dataclass
class MLP:
    """SiLU-gated MLP: dense layers and the shared expert."""

    kb: ModuleType
    w1: Weight = None
    w2: Weight = None
    w3: Weight = None

    _w13: Weight | bool | None = field(default=None, repr=False)   # w1 and w3 stacked (False: cannot)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, D] -> [T, D]: w1 and w3 as one stacked GEMM, then the backend's fused SwiGLU + W2."""
        kb = self.kb
        if self._w13 is None:
            st = stack_rows(self.w1, self.w3)
            self._w13 = False if st is None else st[0]
            if st is not None:
                self.w1, self.w3 = st[1]
        if self._w13 is False:
            return kb.linear(F.silu(kb.linear(x, self.w1)) * kb.linear(x, self.w3), self.w2)
        return kb.swiglu_linear(kb.linear(x, self._w13), self.w2)


@dataclass
class Gate:
    """Group-limited routing: sigmoid scores, biased choice (noaux_tc), unbiased weights."""

    args: ModelArgs
    weight: torch.Tensor = None          # fp32 [E, D]
    bias: torch.Tensor | None = None     # fp32 [E] e_score_correction_bias
    kb: ModuleType | None = None         # the kernel backend (its route_topk); None: reference's
    _cast: dict = field(default_factory=dict, repr=False)

    def _weight_as(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight in `dtype`, converted once (a CUDA graph keeps reading the same tensor)."""
        key = (dtype, self.weight.data_ptr())
        if key not in self._cast:
            self._cast.clear()
            self._cast[key] = self.weight.to(dtype)
        return self._cast[key]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] -> (weights fp32 [T, K], logical expert ids int64 [T, K]).

        The logits GEMM runs in the activation dtype (bf16 on GPU, as DeepSeek's own inference
        code does; float32 in exact tests), the scores and the choice in float32."""
        a = self.args
        logits = F.linear(x, self._weight_as(x.dtype))           # scored in fp32 by the routing
        route = getattr(self.kb, "route_topk", route_topk)     # triton/native: one fused kernel on CUDA
        return route(logits, self.bias, a.n_activated_experts, a.n_expert_groups, a.n_limited_groups, a.score_func,
                     a.topk_method == "noaux_tc", a.norm_topk_prob, a.route_scale)


@dataclass
class MoE:
    """Routed experts behind the dispatch seam, plus the shared expert (always local)."""

    layer: int
    gate: Gate
    shared: MLP | None
    experts: object          # model.moe_dispatch.ExpertShard: this rank's slots of this layer
    dispatcher: object       # model.moe_dispatch.Dispatcher: local or all-to-all

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """valid bool [T] (a decode step's rows; False on padding): route through the dispatcher's
        fixed-shape path when it has one (no host sync: CUDA-graph safe)."""
        weights, idx = self.gate.forward(x)
        if valid is not None and getattr(self.dispatcher, "run_static", None) is not None:
            y = self.dispatcher.run_static(self.layer, x, idx, weights, self.experts, valid)
        else:
            y = self.dispatcher.run(self.layer, x, idx, weights, self.experts)
        if self.shared is not None:
            y = y + self.shared.forward(x)
        return y


@dataclass
class Block:
    attn: MLA
    ffn: MLP | MoE
    attn_norm: torch.Tensor = None
    ffn_norm: torch.Tensor = None


class Transformer:
    """The whole stack on one rank. Built empty; model/checkpoint.py fills the weights. `mtp`: the MTP
    module (model/mtp.py build_mtp, layer n_layers), built by the caller when args.n_mtp_layers."""

    def __init__(self, args: ModelArgs, kb: ModuleType, dispatcher, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", mtp=None):
        self.args, self.kb, self.dtype, self.device = args, kb, dtype, torch.device(device)
        self.dispatcher = dispatcher
        self.embed: torch.Tensor = None
        self.norm: torch.Tensor = None
        self.head: torch.Tensor = None
        self.layers: list[Block] = []
        for i in range(args.n_layers):
            if args.is_moe_layer(i):
                shared = MLP(kb) if args.n_shared_experts else None
                ffn = MoE(i, Gate(args, kb=kb), shared, dispatcher.make_shard(i), dispatcher)
            else:
                ffn = MLP(kb)
            self.layers.append(Block(MLA(args, kb), ffn))
        assert (mtp is not None) == bool(args.n_mtp_layers), f"n_mtp_layers={args.n_mtp_layers} but mtp={mtp!r}"
        self.mtp = mtp
        inv_freq, self.rope_factor = rope_inv_freq(args)
        self.inv_freq = inv_freq.to(self.device)

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ang = positions.float()[:, None] * self.inv_freq[None]
        return (ang.cos() * self.rope_factor).to(self.dtype), (ang.sin() * self.rope_factor).to(self.dtype)

    def block(self, layer: int) -> Block:
        """Layer `layer`'s block; n_layers is the MTP module's (when served)."""
        return self.mtp.block if layer == self.args.n_layers and self.mtp is not None else self.layers[layer]

    def run_block(self, blk: Block, layer: int, h: torch.Tensor, batch, rope, kv_cache: torch.Tensor,
                  valid: torch.Tensor | None) -> torch.Tensor:
        a = self.args
        out = blk.attn.forward(self.kb.rms_norm(h, blk.attn_norm, a.rms_norm_eps), batch, rope, kv_cache[layer])
        h, x = getattr(self.kb, "add_rms_norm", add_rms_norm)(h, out, blk.ffn_norm, a.rms_norm_eps)
        return h + (blk.ffn.forward(x, valid) if isinstance(blk.ffn, MoE) else blk.ffn.forward(x))

    @torch.inference_mode()
    def forward(self, batch: Batch, kv_cache: torch.Tensor, all_logits: bool = False,
                with_hidden: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """-> logits fp32 [B, vocab] for each sequence's last new token ([T, vocab] with all_logits);
        with_hidden: (logits, the final-normed hidden of every token [T, D]: what the MTP module reads).

        batch: a Batch (any mix of prefill and decode) or a DecodeBatch (pure decode, fixed
        shapes, no host sync: the CUDA-graph path). kv_cache [n_kv_layers, pages, page, L+R]. An empty
        batch still runs every layer, so this rank joins each MoE exchange of its unit (lockstep).
        """
        h = self.embed_tokens(batch.input_ids)
        rope = self.rope(batch.positions)
        valid = batch.valid if batch.is_decode_only else None
        for i, blk in enumerate(self.layers):
            h = self.run_block(blk, i, h, batch, rope, kv_cache, valid)
        hn = self.kb.rms_norm(h, self.norm, self.args.rms_norm_eps)
        last = all_logits or batch.is_decode_only
        logits = self.head_logits(hn if last else (hn[batch.last_token_index] if batch.seq_new else hn[:0]))
        return (logits, hn) if with_hidden else logits

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed[input_ids].to(self.dtype)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head: hidden [N, D] -> fp32 [N, vocab]."""
        return self.head_logits(self.kb.rms_norm(h, self.norm, self.args.rms_norm_eps))

    def head_logits(self, hn: torch.Tensor, head: torch.Tensor | None = None) -> torch.Tensor:
        """LM head of normed hidden [N, D] -> fp32 [N, vocab]."""
        head = self.head if head is None else head
        head = head if head.dtype == hn.dtype else head.to(hn.dtype)   # the MTP module may bring its own
        return F.linear(hn, head).float()
