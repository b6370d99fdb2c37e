"""The capacity policy applied to a live deployment on the simulated cluster, on a fake clock:
a decode unit is added by day and drained away at night, in whole units, and no request fails."""
from __future__ import annotations

import asyncio
import time

import openai
import pytest
import ray

from epserve.config import load_config
from conftest import free_port, wait_healthy


@pytest.fixture(scope="module")
def deployment(ray_cluster, tiny_dir, tmp_path_factory):
    from epserve.serve.app import start_deployment
    hook_out = tmp_path_factory.mktemp("hook") / "freed.txt"
    cfg = load_config({
        "model": tiny_dir, "dtype": "float32", "kernels": "reference",
        "kv_store": {"enabled": False}, "ledger": {"path": str(tmp_path_factory.mktemp("ledger"))},
        "prefill": {"gpus_per_node": 2, "kv_pages": 32}, "decode": {"gpus_per_node": 2, "kv_pages": 32},
        "serve": {"port": free_port(), "model_name": "tiny"},
        "autoscale": {"enabled": True, "interval_s": 3600, "downscale_delay_s": 0,
                      "schedule": [{"at": "00:00", "prefill": 1, "decode": 1}, {"at": "08:00", "prefill": 1, "decode": 2}],
                      "prefill_units": [1, 1], "decode_units": [1, 2],
                      "release_hook": f"echo $EPSERVE_FREED_ROLE $EPSERVE_FREED_GPUS >> {hook_out}"}})
    dep = start_deployment(cfg)
    base = f"http://127.0.0.1:{cfg.serve.port}"
    wait_healthy(base)
    yield base, dep, hook_out
    dep.shutdown()


def _decode_units(dep):
    return [(uid, draining) for uid, _, draining in ray.get(dep.capacity.registry.remote())["decode"]]


def _load_while(base, change, n=8):
    """n concurrent streams while `change()` runs in a thread; returns their finish reasons."""
    async def one(client, i):
        r = await client.completions.create(model="tiny", prompt=f"Hello {i}", max_tokens=40, temperature=0.0,
                                            extra_body={"ignore_eos": True})
        return r.choices[0].finish_reason, r.usage.completion_tokens

    async def run():
        client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=300)
        tasks = [asyncio.create_task(one(client, i)) for i in range(n)]
        await asyncio.to_thread(change)
        return await asyncio.gather(*tasks)

    return asyncio.run(run())


def test_day_adds_a_decode_unit_and_night_drains_it_with_no_failed_request(deployment):
    base, dep, hook_out = deployment
    ray.get(dep.capacity.set_clock.remote(2.0))
    assert ray.get(dep.capacity.tick.remote())["desired"] == (1, 1)
    assert _decode_units(dep) == [(0, False)]

    def morning():
        ray.get(dep.capacity.set_clock.remote(9.0))
        ray.get(dep.capacity.tick.remote(), timeout=120)
    assert _load_while(base, morning) == [("length", 40)] * 8
    assert _decode_units(dep) == [(0, False), (1, False)]
    assert _load_while(base, lambda: None) == [("length", 40)] * 8     # concurrent load spreads...
    used = set()
    for uid, h, _ in ray.get(dep.capacity.registry.remote())["decode"]:          # ...onto the new unit too
        if ray.get(h.status.remote())["steps"] > 0:
            used.add(uid)
    assert used == {0, 1}

    def night():
        ray.get(dep.capacity.set_clock.remote(2.0))
        ray.get(dep.capacity.tick.remote(), timeout=120)
    assert _load_while(base, night) == [("length", 40)] * 8
    deadline = time.time() + 60
    while _decode_units(dep) != [(0, False)] and time.time() < deadline:
        time.sleep(0.2)
    assert _decode_units(dep) == [(0, False)]
    events = [(e["role"], e["unit"], e["event"]) for e in ray.get(dep.capacity.history.remote())]
    assert events == [("decode", 1, "start"), ("decode", 1, "stop")]
    # the hook is a shell `echo ... >> file`: the file exists before its line is written, so wait for the line
    deadline = time.time() + 10
    while not (hook_out.exists() and hook_out.read_text().endswith("\n")) and time.time() < deadline:
        time.sleep(0.2)
    assert hook_out.read_text().split() == ["decode", "2"]
    ray.get(dep.ledger.flush.remote())
    from epserve.fleet.ledger_read import read_ledger
    _, capacity = read_ledger(dep.cfg.ledger.path)
    rows = list(zip(capacity["unit"].to_pylist(), capacity["event"].to_pylist()))
    assert ("decode-1", "start") in rows and ("decode-1", "stop") in rows
