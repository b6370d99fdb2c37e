"""The expert-parallel load balancer of one unit, as a Ray actor.

Every `eplb.interval_s` (and on demand) it pulls the ranks' token counters, keeps a
window of the last `window_steps` steps, runs placement/eplb.py (migration-aware:
same balance, fewest weight copies from the current placement), and, when the new
placement is better, has the unit stage and switch to it (actors/unit.py). Reports
per-layer balancedness (max/mean GPU load) before and after, weights moved and time.
It places over the ranks the unit runs on now (placement/elastic.py `member_shape`: the width of
the current map), so an elastic unit short of a dead rank rebalances over its survivors' slots.

A killed controller is restarted by Ray and carries on: its loop is a thread started in
`__init__`, which Ray re-runs on restart (an asyncio task started by a method call would not
come back); the window restarts empty. Rounds (the loop's and on-demand ones) run one at a time.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque

import ray
import torch

from epserve.placement.eplb import balancedness, rebalance_experts
from epserve.placement.eplb_baseline import rebalance_experts as rebalance_baseline
from epserve.placement.elastic import member_shape
from epserve.placement.migration import plan_migration
from epserve.placement.topology import UnitShape

log = logging.getLogger("epserve.eplb")


@ray.remote(num_cpus=0, max_restarts=-1, max_concurrency=4)
class EplbController:
    def __init__(self, unit, shape: UnitShape, n_groups: int, interval_s: float, window_steps: int,
                 policy: str = "auto", min_gain: float = 0.01):
        self.unit, self.shape, self.n_groups = unit, shape, n_groups
        self.interval_s, self.window_steps, self.policy, self.min_gain = interval_s, window_steps, policy, min_gain
        self.window: deque[tuple[int, torch.Tensor]] = deque()
        self.reports: list[dict] = []
        self.round_lock = threading.Lock()
        self.stopping = threading.Event()
        threading.Thread(target=self._loop, name="eplb-loop", daemon=True).start()

    def start(self) -> None:
        """The loop runs from construction (and from every restart); kept so callers can wait until it is up."""

    def stop(self) -> None:
        self.stopping.set()

    def _loop(self) -> None:
        while not self.stopping.wait(self.interval_s):
            try:
                self.rebalance()
            except Exception as exc:   # a failed round (a unit restarting) is logged and retried next interval
                log.warning("EPLB round failed: %r", exc)

    def _pull(self) -> torch.Tensor:
        counters = ray.get(self.unit.expert_counters.remote(True))
        steps = ray.get(self.unit.status.remote())["steps"]
        self.window.append((steps, sum(c["counts"] for c in counters)))
        while self.window and self.window[0][0] < steps - self.window_steps:
            self.window.popleft()
        return sum(c for _, c in self.window)

    def rebalance(self, force: bool = False) -> dict:
        """One EPLB round; returns its report (applied or not, and why)."""
        with self.round_lock:
            return self._round(force)

    def _round(self, force: bool) -> dict:
        t0 = time.time()
        weight = self._pull().float()
        current = ray.get(self.unit.phy2log_now.remote())
        s = self.shape
        m = member_shape(current.shape[1], s.slots_per_rank, s.gpus_per_node)
        algo = rebalance_baseline if self.policy == "baseline" else rebalance_experts
        kwargs = {} if self.policy == "baseline" else {"current_phy2log": current}
        new, _, _ = algo(weight, m.n_slots, self.n_groups, m.n_nodes, m.n_ranks, **kwargs)
        before, after = balancedness(weight, current, m.n_ranks), balancedness(weight, new, m.n_ranks)
        plan = plan_migration(current, new, m.n_ranks, m.gpus_per_node)
        report = {"tokens": int(weight.sum()), "n_ranks": m.n_ranks, "balancedness_before": round(float(before.mean()), 4),
                  "balancedness_after": round(float(after.mean()), 4),
                  "per_layer_before": [round(float(x), 4) for x in before],
                  "per_layer_after": [round(float(x), 4) for x in after],
                  "weights_moved": plan.n_copies, "eplb_ms": round((time.time() - t0) * 1e3, 1), "applied": False}
        gain = float(before.mean() - after.mean())
        if plan.n_copies and (force or gain > self.min_gain * float(before.mean())):
            report.update(ray.get(self.unit.apply_placement.remote(new, report)), applied=True)
        report["total_s"] = round(time.time() - t0, 3)
        log.info("EPLB: balancedness %.3f -> %.3f, %d weight copies, applied=%s", report["balancedness_before"],
                 report["balancedness_after"], plan.n_copies, report["applied"])
        self.reports.append(report)
        return report

    def history(self) -> list[dict]:
        return list(self.reports)
