"""/metrics never hides a failed source: a unit whose supervisor is dead is logged and counted in
epserve_metrics_errors_total, its gauges vanish, and every other unit's are still served.

Real UnitSupervisor actors on the shared simulated cluster (status() answers without a built unit);
one is killed, as a crashed supervisor would be.
"""
from __future__ import annotations

import asyncio
import logging

import ray

from conftest import wait_dead
from epserve.actors.unit import UnitSupervisor
from epserve.model.tiny import TINY_CONFIG
from epserve.pipelines.runner import RankSpec
from epserve.placement.topology import UnitShape
from epserve.serve.metrics import ServeMetrics
from epserve.serve.router import Router


def _render(m: ServeMetrics, router: Router) -> str:
    return m.render(router.prefill_stats, router.decode_stats, len(router.in_flight)).decode()


def test_a_dead_supervisor_is_logged_and_counted_and_the_other_units_still_served(ray_cluster, tiny_dir, caplog):
    shape = UnitShape(1, 1, TINY_CONFIG["n_routed_experts"])
    live, doomed = (UnitSupervisor.remote(u, "decode", RankSpec(model_dir=tiny_dir), shape) for u in (0, 1))
    ray.get([live.status.remote(), doomed.status.remote()])   # started (a scrape's wait is bounded; a start is not)
    router = Router({"prefill": [], "decode": [live, doomed]}, max_in_flight=4, page_tokens=64)
    m = ServeMetrics()
    asyncio.run(m.collect(router))
    before = _render(m, router)
    for unit in ("0", "1"):
        assert f'epserve_unit_schedule_steps{{role="decode",schedule="plain",unit="{unit}"}} 0.0' in before
    assert "epserve_metrics_errors_total{" not in before       # no sample until a source fails

    ray.kill(doomed, no_restart=True)
    wait_dead(doomed)     # ray.kill returns before the actor dies; until then it still reports
    with caplog.at_level(logging.ERROR, logger="epserve.metrics"):
        asyncio.run(m.collect(router))
    after = _render(m, router)
    assert 'epserve_metrics_errors_total{source="decode_unit"} 1.0' in after
    assert [r for r in caplog.records if "decode_unit 1 failed to report" in r.getMessage()]
    assert 'epserve_unit_schedule_steps{role="decode",schedule="plain",unit="0"} 0.0' in after
    assert 'unit="1"' not in after                            # gone, not frozen at its last values
    ray.kill(live, no_restart=True)
