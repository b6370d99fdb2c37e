"""How long adding units takes: one unit, then n units started at once (actors/launch.py).

Runs on an embedded simulated cluster of n fake nodes x 2 fake GPUs (the units are 1 x 2),
tiny model, reference kernels; every unit's placement group, rank processes and weight loads
proceed together, so n units should take well under n times one.
"""
from __future__ import annotations

import asyncio
import dataclasses
import time

import ray

from epserve.actors.cluster import ensure_ray
from epserve.actors.launch import orders, start_all
from epserve.config import load_config
from epserve.model.checkpoint import read_config
from epserve.model.tiny import default_model_dir


def _timed_start(cfg, model_dir, args, role_cfg, name) -> float:
    t = time.perf_counter()
    ok, failed = asyncio.run(start_all(cfg, model_dir, args, orders(name, role_cfg, "decode")))
    took = time.perf_counter() - t
    if failed:
        raise RuntimeError(f"{len(failed)} unit(s) failed to start: {failed[0][1]}")
    for _, unit in ok:
        ray.get(unit.shutdown.remote())
        ray.kill(unit)
    return took


def run(model: str | None = None, n: int = 4) -> dict:
    model_dir = str(model or default_model_dir())
    args = read_config(model_dir)
    cfg = load_config({"dtype": "float32", "kernels": "reference", "eplb": {"enabled": False},
                       "kv_store": {"enabled": False}})
    rc = dataclasses.replace(cfg.decode, units=1, nodes_per_unit=1, gpus_per_node=2, kv_pages=64, cpus_per_rank=0.01)
    started = ensure_ray(None, n, 2)
    try:
        _timed_start(cfg, model_dir, args, rc, "warm")              # worker processes and imports warm
        one = _timed_start(cfg, model_dir, args, rc, "one")
        many = _timed_start(cfg, model_dir, args, dataclasses.replace(rc, units=n), "many")
    finally:
        if started is not None:
            started.shutdown()
    return {"units": n, "one_unit_s": round(one, 2), f"{n}_units_at_once_s": round(many, 2),
            "ratio": round(many / one, 2), "note": f"{2 * n} rank processes on this machine's cores"}
