"""Starting units: several at once, and one that cannot start does not stop the others."""
from __future__ import annotations

import asyncio
import dataclasses

import ray

from epserve.actors.launch import UnitOrder, orders, start_all
from epserve.config import load_config
from epserve.model.checkpoint import read_config
from epserve.model.sampling import SamplingParams
from epserve.pipelines.sequence import Sequence


def test_units_start_together_and_a_failed_one_leaves_nothing_behind(ray_cluster, tiny_dir):
    cfg = load_config({"dtype": "float32", "kernels": "reference", "eplb": {"enabled": False},
                       "kv_store": {"enabled": False}})
    args = read_config(tiny_dir)
    good = dataclasses.replace(cfg.decode, units=2, nodes_per_unit=1, gpus_per_node=2, kv_pages=16)
    bad = dataclasses.replace(good, units=1, kv_pages=10 ** 8)      # its KV cache cannot be allocated
    todo = orders("good", good, "decode") + [UnitOrder(7, "prefill", "bad", bad)]
    ok, failed = asyncio.run(start_all(cfg, tiny_dir, args, todo))
    try:
        assert [o.uid for o, _ in ok] == [0, 1] and [o.uid for o, _ in failed] == [7]
        assert "memory" in failed[0][1].lower() or "alloc" in failed[0][1].lower(), failed[0][1]
        pgs = ray.util.placement_group_table().values()
        assert not [p for p in pgs if "/bad-unit" in p.get("name", "") and p["state"] != "REMOVED"]
        params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
        for i, (_, unit) in enumerate(ok):                           # both started units serve
            out = ray.get(unit.generate.remote([(Sequence(f"l{i}", [5, 6, 7, 8], params), 1)]), timeout=60)
            assert len(out[0].token_ids) == 3
    finally:
        for _, unit in ok:
            ray.get(unit.shutdown.remote(), timeout=60)
            ray.kill(unit)
