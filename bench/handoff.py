"""`epserve bench handoff`: the prefill -> decode KV handoff, collective pair group vs object store.

For each transport a 1-rank prefill unit and a 1-rank decode unit (own processes; on a machine
with >= 2 GPUs each on its own GPU, NCCL between them; else CPU processes, gloo) run prompts of
several lengths: prefill returns the first token and the handoff (a ticket or object refs), then
the decode rank takes it (timed inside the decode rank, `handoff_timing`, the same way for both
transports: pull, join and copy onto its device) and decodes one more token.
Reported per prompt length: latents bytes, handoff ms and GB/s (median of reps), TTFT (the
prefill unit's, which for the object path includes the device -> host export and ray.put on the
prefill rank's step path) and the handoff's share of TTFT + handoff. In epserve the first token
comes from the prefill rank, so the handoff delays the second token, not the first; the share
says how much of the time to the first decoded token the handoff is.
"""
from __future__ import annotations

import statistics

import ray
import torch

from epserve.actors.cluster import ensure_ray
from epserve.actors.unit import UnitSupervisor
from epserve.messages import RankSpec
from epserve.model.checkpoint import read_config
from epserve.model.sampling import SamplingParams
from epserve.pipelines.sequence import Sequence
from epserve.placement.topology import UnitShape

LENGTHS = (256, 1024, 2000)     # the bench model's context is 2048
REPS = 3


def _units(model_dir: str, mode: str, device: str, dtype: str):
    args = read_config(model_dir)
    shape = UnitShape(1, 1, args.n_routed_experts)
    sups = []
    for uid, role in ((70, "prefill"), (71, "decode")):
        spec = RankSpec(model_dir, kernels="auto", dtype=dtype, device=device, role=role, kv_handoff=mode,
                        kv_pages=160, max_batch_tokens=8192, cuda_graphs=False)
        sups.append(UnitSupervisor.remote(uid, role, spec, shape, cpus_per_rank=0.01,
                                          n_moe_layers=args.n_moe_layers, step_timeout_s=300))
    ray.get([s.start.remote() for s in sups], timeout=600)
    return sups


def _one(pre, dec, dec_rank, prompt: list[int], rid: str) -> dict:
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    before = ray.get(dec_rank.handoff_stats.remote())["timing"]
    first = ray.get(pre.prefill.remote(Sequence(rid, prompt, params), 0), timeout=600)
    if first.error is not None:
        raise RuntimeError(f"prefill failed: {first.error}")
    out = ray.get(dec.generate.remote([(Sequence(rid, prompt, params, output_ids=list(first.token_ids),
                                                 kv_blocks=first.kv_blocks), 0)]), timeout=600)[0]
    if out.error is not None:
        raise RuntimeError(f"decode failed: {out.error}")
    after = ray.get(dec_rank.handoff_stats.remote())["timing"]
    if after["n"] != before["n"] + 1:
        raise RuntimeError("the decode rank recomputed instead of taking the handoff")
    return {"ttft_ms": first.ttft_s * 1e3, "handoff_ms": (after["seconds"] - before["seconds"]) * 1e3,
            "bytes": after["bytes"] - before["bytes"], "via": sorted(set(after["by"]) - set(before["by"]) or
                                                                     set(after["by"]))}


def run(model: str | None = None, lengths: tuple[int, ...] = LENGTHS, reps: int = REPS) -> dict:
    from epserve.bench.overlap import bench_model_dir
    model_dir = model or bench_model_dir()
    gpus = torch.cuda.is_available() and torch.cuda.device_count() >= 2
    device, dtype = ("cuda", "bfloat16") if gpus else ("cpu", "float32")
    embedded = ensure_ray(None, 1, 2, num_cpus=4)
    results = {}
    try:
        for mode in ("object", "collective"):
            pre, dec = _units(model_dir, mode, device, dtype)
            dec_rank = ray.get(dec.rank_handles.remote())[0]
            try:
                rows = []
                for n in lengths:
                    prompt = [5 + (j * 7) % 300 for j in range(n)]
                    _one(pre, dec, dec_rank, prompt, f"warm-{mode}-{n}")           # pair formed, caches warm
                    runs = [_one(pre, dec, dec_rank, prompt, f"{mode}-{n}-{i}") for i in range(reps)]
                    ms = statistics.median(r["handoff_ms"] for r in runs)
                    ttft = statistics.median(r["ttft_ms"] for r in runs)
                    rows.append({"prompt_tokens": n, "latent_bytes": runs[0]["bytes"], "handoff_ms": round(ms, 3),
                                 "gb_per_s": round(runs[0]["bytes"] / ms / 1e6, 3), "ttft_ms": round(ttft, 2),
                                 "handoff_share_of_ttft_plus_handoff": round(ms / (ttft + ms), 4),
                                 "via": runs[0]["via"]})
                results[mode] = rows
            finally:
                ray.get([pre.shutdown.remote(), dec.shutdown.remote()], timeout=120)
                ray.kill(pre)
                ray.kill(dec)
    finally:
        if embedded is not None:
            embedded.shutdown()
    return {"device": device, "dtype": dtype, "model": model_dir.rsplit("/", 1)[-1], "reps": reps,
            "transport": "NCCL pair group, GPU to GPU" if gpus else "gloo pair group over loopback (CPU processes)",
            "by_transport": results}
