"""How long a decode unit stalls when one rank dies: elastic EP against today's whole-unit rebuild.

A model for units this box cannot host (DeepSeek's EP144 decode unit on H800-class GPUs), printed
by `epserve bench chaos --elastic`. Pure: assumptions in, seconds out; every assumption is a field
of `RecoveryAssumptions` with its source or its guess stated, so a reader can change one and see
what moves. Terms (seconds, each on the unit's critical path; parallel work counts once):

  elastic (actors/unit_elastic.py), per death:
    detect      the survivors see the dead peer: a SIGKILL closes its sockets at once, so the next
                exchange fails; Ray marks the actor dead within `ray_death_s`
    agree       survivors leave their loops (POISON spreads in log2(N) hops, negligible) and the
                supervisor learns each one's end: one Ray call per rank, `fanout_s_per_rank`
    regroup     a fresh data group among the survivors: NCCL communicator init (`nccl_init_s`) and,
                with DeepEP, its buffers (`deepep_buffer_s`); with DeepEP's rank mask instead
                (low-latency kernels skip a masked rank) both are 0
    reload      the dead rank's experts that had no other replica, loaded by survivors with spare
                slots from local disk at `nvme_gb_s`, spread over the survivors that take one
    graphs      the new map's routing tables are new tensors: the decode bucket in use is captured
                again on its first step (pipelines/cuda_graphs.py captures lazily)
    resume      requests re-prefilled: as built, only the dead rank's, spread over the survivors
                (survivors keep theirs with their KV: actors/rank_elastic.py `park` / `resume`);
                `survivors_keep_kv` False: every survivor re-runs its own too (units with MTP
                drafts, whose drafter state is not kept). Uncached tokens are the produced ones
                (the KV store holds the prompts' full blocks) at `prefill_tok_s` per GPU
  rebuild (today: actors/unit.py), per death:
    detect, then every rank: process + CUDA context start (`actor_start_s`), its weights from disk
    (a node's GPUs share its disks), NCCL + DeepEP init, CUDA-graph capture (`graph_capture_s`),
    and every request of the unit re-prefilled.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class RecoveryAssumptions:
    n_ranks: int = 144                 # DeepSeek's decode unit: 18 nodes x 8 GPUs (SEED.md)
    gpus_per_node: int = 8
    n_experts: int = 256
    n_redundant: int = 32              # redundant expert slots per layer (DeepSeek decode: 32)
    n_moe_layers: int = 58
    expert_gb: float = 0.044           # one routed expert in FP8: 3 x 7168 x 2048 bytes + scales
    dense_gb: float = 17.0             # a rank's non-routed weights (MLA, dense layers, shared expert, embeddings,
                                       # head) in FP8/BF16: ~16-17B parameters (a guess from V3's shapes)
    nvme_gb_s: float = 3.0             # local NVMe read per GPU process (PCIe Gen4 x4 reads 6-7 GB/s; halved)
    node_disk_gb_s: float = 12.0       # a node's disks together (its 8 GPUs load at once in a rebuild)
    requests_per_rank: int = 128       # decode batch per GPU (DESIGN.md: EP144 at 128 requests per GPU)
    produced_tokens: int = 500         # mean tokens a stream has produced when the rank dies (uncached)
    prefill_tok_s: float = 9000.0      # prefill tokens/s one GPU computes (DeepSeek: ~73.7K/s per H800 node
                                       # of 8 during prefill, cache hits included)
    ray_death_s: float = 1.0           # Ray reports a killed actor's task failed (measured < 1 s on this box)
    fanout_s_per_rank: float = 0.0052  # one Ray call per rank (DESIGN.md: 751 ms to 144 no-op actors, 2 cores)
    nccl_init_s: float = 2.0           # ncclCommInitRank at ~150 ranks over IB (a guess: 1-3 s reported)
    deepep_buffer_s: float = 5.0       # DeepEP Buffer (NVSHMEM + RDMA registration) at EP144 (a guess)
    actor_start_s: float = 15.0        # a fresh rank process: Python, torch, CUDA context, kernels' JIT cache
    graph_capture_s: float = 15.0      # CUDA graphs for every decode batch bucket (a guess; 10-30 s typical)
    graph_bucket_s: float = 0.3        # one bucket re-captured on first use after a map change (lazy; a guess)


def _gb_s_per_gpu(a: RecoveryAssumptions) -> float:
    """What one rank reads from disk when its node's GPUs all load at once."""
    return min(a.nvme_gb_s, a.node_disk_gb_s / a.gpus_per_node)


def recovery_times(a: RecoveryAssumptions = RecoveryAssumptions(), deepep_mask: bool = False,
                   survivors_keep_kv: bool = True, max_reload_per_rank: float | None = None) -> dict:
    """-> {"elastic": {term: s, ..., "total": s}, "rebuild": {...}, "ratio": rebuild / elastic,
    "gpu_s_lost": {...}: GPU-seconds with no token out (stalled ranks x stall)}.
    max_reload_per_rank: the experts the busiest survivor reads, where a decision counted them
    (fleet/rank_failures.py: placement/elastic.py's shrunk map); None: the average estimate below."""
    n, s = a.n_ranks, a.n_ranks - 1
    slots_per_rank = (a.n_experts + a.n_redundant) / n
    # per layer the dead rank held ~slots_per_rank experts; each lost its only replica unless it was
    # one of the redundant ones (chance n_redundant / n_experts of having a second copy)
    lost_per_layer = slots_per_rank * (1 - a.n_redundant / a.n_experts)
    n_reload = lost_per_layer * a.n_moe_layers
    takers = min(s, max(1, a.n_redundant))            # survivors with a spare slot in a layer, spread over layers
    busiest = math.ceil(n_reload / takers) if max_reload_per_rank is None else max_reload_per_rank
    reload_s = busiest * a.expert_gb / a.nvme_gb_s
    per_req_s = a.produced_tokens / a.prefill_tok_s
    resume_own = a.requests_per_rank * per_req_s       # a rank re-prefills its own batch
    resume_moved = math.ceil(a.requests_per_rank / s) * per_req_s
    elastic = {
        "detect": a.ray_death_s,
        "agree": n * a.fanout_s_per_rank,
        "regroup": 0.0 if deepep_mask else a.nccl_init_s + a.deepep_buffer_s,
        "reload": reload_s,
        "graphs": a.graph_bucket_s,
        "resume": resume_moved if survivors_keep_kv else resume_own + resume_moved,
    }
    elastic["total"] = sum(elastic.values())
    rank_gb = a.dense_gb + slots_per_rank * a.n_moe_layers * a.expert_gb
    rebuild = {
        "detect": a.ray_death_s,
        "start": a.actor_start_s,
        "load": rank_gb / _gb_s_per_gpu(a),
        "regroup": a.nccl_init_s + a.deepep_buffer_s,
        "graphs": a.graph_capture_s,
        "resume": resume_own,
    }
    rebuild["total"] = sum(rebuild.values())
    # elastic: survivors keeping their KV still stall for the change itself, not their own re-prefill
    stalled_elastic = s * elastic["total"]
    return {"assumptions": asdict(a), "deepep_mask": deepep_mask, "survivors_keep_kv": survivors_keep_kv,
            "elastic": {k: round(v, 3) for k, v in elastic.items()},
            "rebuild": {k: round(v, 3) for k, v in rebuild.items()},
            "ratio": round(rebuild["total"] / elastic["total"], 1),
            "gpu_s_lost": {"elastic": round(stalled_elastic, 1), "rebuild": round(n * rebuild["total"], 1)},
            "experts_reloaded": round(n_reload, 1)}


def recovery_table(a: RecoveryAssumptions = RecoveryAssumptions()) -> list[dict]:
    """The four elastic variants (survivors keep KV, as built, or re-prefill theirs too; new NCCL
    groups, as built, or DeepEP's rank mask) vs rebuild."""
    return [{"variant": f"{'keep KV' if keep else 're-prefill all'}, {'DeepEP mask' if mask else 'new groups'}",
             **recovery_times(a, mask, keep)} for keep in (True, False) for mask in (False, True)]
