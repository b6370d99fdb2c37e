"""The cached-prefix prefill headline (bench/kv_load.py, bench/step_ep.py --cached) on CPU: the step
computes only the uncached tokens, every cached block is written with the KV store and loaded back
(none dropped), the temporary folder is removed, and the load is counted as RankEngine overlaps it."""

import pytest
import torch

from epserve.bench import step_ep
from epserve.bench.kv_load import exposed_load_ms, input_rate, time_prefix_loads
from epserve.fleet.kv_block_format import BlockSpec, file_bytes


@pytest.mark.parametrize("compute, read, to_dev, exposed", [
    (10.0, 4.0, 1.0, 1.0),        # the read hides under the previous step's compute; the copy does not
    (10.0, 15.0, 1.0, 6.0),       # a read longer than the compute shows its excess
    (0.0, 3.0, 0.5, 3.5),
])
def test_exposed_load_is_the_reads_excess_over_compute_plus_the_device_copy(compute, read, to_dev, exposed):
    assert exposed_load_ms(compute, read, to_dev) == pytest.approx(exposed)
    r = input_rate(1000, compute or 1e-9, {"read_ms": read, "to_device_ms": to_dev})
    assert r["exposed_load_ms"] == pytest.approx(exposed, abs=1e-3)
    assert r["input_tokens_per_s_if_load_serial"] <= r["input_tokens_per_s_per_gpu"]


def test_time_prefix_loads_reads_every_block_from_a_real_store(tmp_path):
    out = time_prefix_loads(3, 2, 5, 48, torch.float32, torch.device("cpu"), block_tokens=16, root=str(tmp_path))
    assert (out["prompts"], out["blocks_per_prompt"], out["block_shape"]) == (3, 2, [5, 16, 48])
    assert out["bytes"] == 3 * 2 * file_bytes(BlockSpec("bench-kv-load", torch.float32, (5, 16, 48)))
    assert out["read_ms"] > 0 and out["cold"] is True
    assert list(tmp_path.iterdir()) == []           # the temporary store is gone
    with pytest.raises(ValueError, match="at least one prompt and one cached block"):
        time_prefix_loads(2, 0, 5, 48, torch.float32, torch.device("cpu"), root=str(tmp_path))


def test_cached_prefill_headline_counts_the_store_load(tiny_dir, tmp_path):
    out = step_ep.run("prefill", device="cpu", backend="reference", tokens=256, prompt=256, cached=0.563,
                      ranks=16, reps=1, model=tiny_dir, kv_root=str(tmp_path), experts=8, groups=1)
    cp = out["cached_prefix"]
    # 0.563 x 256 = 144 -> 128 cached tokens (2 whole blocks); 128 computed per prompt, 2 prompts make 256
    assert (cp["cached_tokens_per_prompt"], cp["prompts"], cp["computed_tokens_per_step"]) == (128, 2, 256)
    assert cp["input_tokens_per_step"] == 512 and out["tokens_per_step"] == 256
    load = cp["kv_store_load"]
    assert load["blocks_per_prompt"] == 2 and load["block_shape"][0] == 3    # the tiny model's KV layers
    for k in ("overlapped", "one_batch"):
        step = out[k]["held"]["step_ms"]
        want = 512 / (step + exposed_load_ms(step, load["read_ms"], load["to_device_ms"])) * 1e3
        assert cp[k]["input_tokens_per_s_per_gpu"] == pytest.approx(want, rel=1e-2, abs=0.06)   # rounded to 0.1
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="cached: a prefill prefix-hit fraction"):
        step_ep.run("decode", device="cpu", model=tiny_dir, cached=0.5)
