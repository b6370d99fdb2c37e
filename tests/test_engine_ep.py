"""`bench engine --ep-presets`' deployment (bench/engine_ep.py ep_engine_config) on CPU: the whole
engine through Ray, one unit that is the emulated rank of an EP unit, overlap on, gives the local
engine's greedy tokens; and the CLI refuses what the presets fix themselves."""

import pytest

from conftest import prompts_of, single_rank_outputs
from epserve.bench.engine_ep import ep_engine_config
from epserve.cli import main
from epserve.model.sampling import SamplingParams


def test_the_engine_on_the_emulated_rank_gives_the_local_engines_tokens(ray_cluster, tiny_dir):
    import ray

    import epserve
    prompts = prompts_of([33, 7, 20, 12, 9], seed=5)
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    want = single_rank_outputs(tiny_dir, prompts, params)
    cfg = ep_engine_config(16, "zipf", kernels="reference", dtype="float32", max_batch_size=8, kv_pages=64,
                           max_batch_tokens=256)
    assert cfg["ep_dispatch"] == "emulated" and cfg["overlap"] == "on"
    with epserve.LLM(model=tiny_dir, config=cfg) as llm:
        outs = llm.generate(prompts, params)
        ranks = [r for u in llm.units for r in ray.get(u.status.remote())["ranks"]]
    assert {r["ep_dispatch"] for r in ranks} == {"EmulatedDispatcher"}
    assert [o.token_ids for o in outs] == want


@pytest.mark.parametrize("argv, names", [
    (["engine", "--ep-presets"], ["--ep-presets", "--device cuda"]),
    (["engine", "--device", "cuda", "--ep-presets", "--ep-ranks", "32"], ["--ep-ranks", "--ep-presets"]),
    (["engine", "--device", "cuda", "--ep-presets", "--model", "/m"], ["--model", "--ep-presets"]),
])
def test_ep_presets_misuse_is_one_line(argv, names, capsys):
    code = main(["bench", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and all(n in err[0] for n in names), err
