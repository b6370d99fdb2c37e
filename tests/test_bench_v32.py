"""V3.2 against V3 at long context as benchmarks (issue 27, item 3): `bench step --arch v32` and
`bench engine --arch v32` in their small modes on CPU (the same code as the GPU runs at small shapes),
the memory check that skips a point from its bytes instead of running into an out-of-memory error,
and the flag refusals. No timing is asserted."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from epserve.bench import step_long
from epserve.cli import main

STAGES = {"attention.indexer", "attention.sparse_mla", "attention.core"}


def test_step_small_times_the_indexer_and_sparse_mla_at_each_context():
    r = subprocess.run([sys.executable, "-m", "epserve", "bench", "step", "--arch", "v32", "--small", "--backend",
                        "reference", "--context", "48,96", "--step-tokens", "2"], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout)["results"]
    assert res["shapes"] == "small (CPU)"
    assert [(p["context"], p["requests"]) for p in res["decode"]] == [(48, 2), (96, 2)]
    assert [p["context"] for p in res["prefill"]] == [step_long.SMALL["prefill"]]
    for p in res["decode"] + res["prefill"]:
        assert STAGES <= set(p["v32"]["stages_ms"]), p["v32"]["stages_ms"]
        assert "attention.indexer" not in p["v3"]["stages_ms"] and "attention.core" in p["v3"]["stages_ms"]
        assert p["v32_speedup"]["model"] > 0 and p["v32"]["bytes"]["total"] > p["v3"]["bytes"]["total"]
    # context 96 > index_topk 32: V3.2's selection prunes, so its cache rows carry the index key too
    assert res["archs"]["v32"]["index_topk"] < 96 and res["archs"]["v32"]["kv_row_bytes"] > res["archs"]["v3"]["kv_row_bytes"]


def test_a_point_that_does_not_fit_is_skipped_with_its_bytes():
    v3 = step_long.point_bytes(step_long.SMALL["archs"]["v3"], "decode", 2, 64, "reference")
    v32 = step_long.point_bytes(step_long.SMALL["archs"]["v32"], "decode", 2, 64, "reference")
    assert v3["total"] < v32["total"]
    out = step_long.run(backend="reference", device="cpu", small=True, contexts=(64,), requests=(2,),
                        phases=("decode",), memory_budget=v3["total"])
    (pt,) = out["decode"]
    assert "ms" in pt["v3"] and "v32_speedup" not in pt
    assert pt["v32"]["bytes"] == v32 and pt["v32"]["skipped"].startswith(f"needs {v32['total'] / 1e9:.2f} GB")


def test_kv_bytes_grow_with_context_and_v32_rows_are_wider():
    a3, a32 = step_long.FULL["archs"]["v3"], step_long.FULL["archs"]["v32"]
    assert (a3.cache_dim, a32.cache_dim) == (576, 704)
    for c in (4096, 131072):       # 128 requests of up to 1.2 x c tokens, whole 64-token pages of 704 bf16
        pages = -(-int(1.2 * c) // 64)
        assert step_long.point_bytes(a32, "decode", 128, c, "native")["kv_cache"] == 128 * pages * 64 * 704 * 2
    # 128 requests at 128K on the preset engine: its 5-layer KV pool alone is past an 80 GB card
    assert step_long.ep_rank_bytes(a32, 128, 131072)["kv_cache"] > 80e9


@pytest.mark.parametrize("argv, names", [
    (["step", "--arch", "v32", "--mtp"], ["--mtp", "--arch v32"]),
    (["step", "--arch", "v32", "--no-ep"], ["--no-ep", "--arch v32"]),
    (["step", "--arch", "v32", "--cached", "0.5"], ["--cached", "--arch v32"]),
    (["step", "--arch", "v32", "--small", "--ep-ranks", "144"], ["--ep-ranks", "--small"]),
    (["step", "--arch", "v32", "--phase", "prefill", "--context", "4096"], ["--context", "prefill"]),
    (["step", "--arch", "v32", "--device", "cpu"], ["--device", "--small"]),
    (["step", "--context", "4096,8192"], ["--context", "--arch v32"]),
    (["step", "--small"], ["--small", "--arch v32"]),
    (["step", "--arch", "v32", "--context", "4096,x"], ["--context", "integers"]),
    (["step", "--arch", "v33"], ["--arch", "v33"]),
    (["engine", "--arch", "v32"], ["--arch", "--device cuda"]),
    (["engine", "--device", "cuda", "--arch", "v32", "--model", "/m"], ["--model", "--arch v32"]),
    (["engine", "--small"], ["--small", "--arch v32"]),
    (["engine", "--arch", "v32", "--small", "--tokens", "8"], ["--tokens", "--small"]),
])
def test_v32_flag_misuse_is_one_line(argv, names, capsys):
    try:
        code = main(["bench", *argv])
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1, err
    assert all(n in err[0] for n in names), err[0]


def test_engine_small_runs_v32_against_v3_through_ray(ray_cluster):
    from epserve.bench import engine_long
    out = engine_long.run(batches=(2,), ctx=32, kernels="reference", small=True)
    assert out["presets"] == {"v3": "tiny", "v32": "v32-tiny"} and out["context"] == 32
    for arch in ("v3", "v32"):
        assert out[arch]["decode"][2]["step_ms"] > 0 and out[arch]["context"] == 32
    assert out["v32_decode_speedup"][2] > 0 and out["skipped"] == {"v3": {}, "v32": {}}
