"""The on-disk context cache through real units: hits, restarts, ranks and units, corruption, eviction."""
from __future__ import annotations


import ray

from conftest import prompts_of
from epserve.model.sampling import SamplingParams
from epserve.pipelines.sequence import Sequence

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


def config(kv_dir, capacity_gb=1.0, units=2):
    return {"dtype": "float32", "kernels": "reference",
            "decode": {"units": units, "nodes_per_unit": 1, "gpus_per_node": 2, "kv_pages": 32},
            "kv_store": {"path": str(kv_dir), "capacity_gb": capacity_gb}}


def on(llm, unit, rank, prompt, rid):
    res = ray.get(llm.units[unit].generate.remote([(Sequence(rid, prompt, GREEDY, tenant="offline"), rank)]))[0]
    return res.token_ids, res.n_cached


def test_hits_across_ranks_units_and_restarts_and_corruption_is_a_miss(ray_cluster, tiny_dir, tmp_path):
    import epserve
    kv = tmp_path / "kv"
    prompt = prompts_of([150], seed=21)[0]               # 2 full 64-token blocks can be cached
    with epserve.LLM(model=tiny_dir, config=config(kv)) as llm:
        cold, hits0 = on(llm, 0, 0, prompt, "a")
        warm, hits1 = on(llm, 1, 1, prompt, "b")          # another unit, another rank
        assert (hits0, hits1) == (0, 128) and warm == cold
        longer, hits2 = on(llm, 0, 1, prompt + [7, 8, 9] * 30, "c")
        assert hits2 == 128                               # a longer prompt reuses the shared prefix
    with epserve.LLM(model=tiny_dir, config=config(kv, units=1)) as llm:
        again = llm.generate([prompt], GREEDY)[0]         # a new server on the same store
        assert again.usage.prompt_cache_hit_tokens == 128 and again.token_ids == cold
        files = list(kv.rglob("*.kvb"))
        assert files
        for f in files:                                   # corrupt every block on disk
            data = bytearray(f.read_bytes())
            data[-5] ^= 0xFF
            f.write_bytes(bytes(data))
        bad = llm.generate([prompt], GREEDY)[0]
        assert bad.usage.prompt_cache_hit_tokens == 0 and bad.token_ids == cold


def test_eviction_keeps_the_store_under_capacity(ray_cluster, tiny_dir, tmp_path):
    import epserve
    from epserve.model.checkpoint import read_config
    a = read_config(tiny_dir)
    block_bytes = a.n_layers * 64 * a.kv_dim * 4
    capacity = 6 * block_bytes
    kv = tmp_path / "kv"
    with epserve.LLM(model=tiny_dir, config=config(kv, capacity_gb=capacity / (1 << 30), units=1)) as llm:
        for i, p in enumerate(prompts_of([200] * 6, seed=30)):
            llm.generate([p], GREEDY)
    total = sum(f.stat().st_size for f in kv.rglob("*.kvb"))
    assert 0 < total <= capacity


def test_a_slow_kv_store_read_does_not_stall_running_requests(tiny_dir, tmp_path):
    """The cached prefix is read off the step loop: while it loads, the rank's other requests keep
    decoding; then the request joins with its hit and the cold run's tokens; aborting it while it
    loads loses nothing."""
    import threading

    from epserve.pipelines.local import make_local_engine
    from epserve.messages import KVStoreSpec
    engine = make_local_engine(tiny_dir, kv_pages=64, kv_store=KVStoreSpec(str(tmp_path / "kv"), 1 << 30))
    prompt, other = prompts_of([200, 12], seed=4)

    def run_all():
        while engine.has_work:
            engine.step()

    cold = Sequence("cold", prompt, GREEDY, tenant="t")
    engine.add(cold)
    run_all()
    a = Sequence("a", other, SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True))
    engine.add(a)
    engine.step()
    gate = threading.Event()
    engine.loader.submit(gate.wait)                        # the loader is busy: b's read waits
    b = Sequence("b", prompt, GREEDY, tenant="t")
    engine.add(b)
    c = Sequence("c", prompt, GREEDY, tenant="t")
    engine.add(c)
    before = len(a.output_ids)
    for _ in range(3):
        engine.step()
    assert len(a.output_ids) == before + 3 and not b.output_ids    # a decoded; b is still loading
    assert engine.abort("c") and engine.has_work
    gate.set()
    run_all()
    assert b.n_cached == 192 and b.output_ids == cold.output_ids  # 3 full blocks of the 200-token prompt
    assert not c.output_ids and engine.cache.n_used == 0          # the aborted one never took pages
