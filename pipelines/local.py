"""A whole model on one rank, in this process: every expert slot local, no communication.

The single-rank oracle the EP units are tested against, and what `epserve bench`
times for one rank.
"""
from __future__ import annotations

from epserve.model.ep_select import make_one_rank_dispatcher
from epserve.model.moe_dispatch import ExpertMap
from epserve.placement.topology import initial_phy2log
from epserve.messages import RankSpec
from epserve.pipelines.runner import RankEngine


def local_dispatcher_factory(redundant_experts: int = 0, mode: str = "auto", ep_emulate: dict | None = None,
                             device: str = "cpu"):
    """mode `emulated`: the EP rank ep_emulate describes (model/ep_emulate.py); else LocalDispatcher."""
    def make(kb, args):
        n_slots = args.n_routed_experts + redundant_experts
        phy2log = initial_phy2log(args.n_ep_layers, args.n_routed_experts, n_slots)
        return make_one_rank_dispatcher(kb, args, ExpertMap(phy2log, args.n_routed_experts, 1, 1), mode, ep_emulate,
                                        device)
    return make


def make_local_engine(model_dir: str, redundant_experts: int = 0, **spec) -> RankEngine:
    spec.setdefault("kernels", "reference")
    rs = RankSpec(model_dir=str(model_dir), **spec)
    return RankEngine(rs, local_dispatcher_factory(redundant_experts, rs.ep_dispatch, rs.ep_emulate, rs.device))
