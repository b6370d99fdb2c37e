"""`python -m epserve.bench.vote_round [--worlds 2,4,8,16]`: the lockstep's agreement all-reduce
alone, between plain processes on this host (gloo over 127.0.0.1, no Ray), at several group sizes.

The same encode -> MAX all_reduce -> decode as a rank's `_all_reduce` (actors/rank.py), timed as
the median of `reps` back-to-back rounds after a warm-up. It measures what one round costs
on a host whose cores are not oversubscribed (the EP144 cost model's per-round term): on the
2-core development box a 2-rank round also waits for a core. Prints JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from epserve.pipelines.lockstep import Vote


def _worker(rank: int, world: int, port: int, reps: int, out) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    vote = Vote(has_work=1, n_running=64)
    times = []
    for i in range(reps + 50):
        t = time.perf_counter()
        x = torch.tensor(vote.encode(), dtype=torch.long)
        dist.all_reduce(x, dist.ReduceOp.MAX)
        Vote.decode(x.tolist())
        if i >= 50:
            times.append((time.perf_counter() - t) * 1e3)
    if rank == 0:
        out.put(sorted(times)[len(times) // 2])
    dist.barrier()
    dist.destroy_process_group()


def round_ms(world: int, reps: int = 1000) -> float:
    """Median ms of one agreement all-reduce among `world` processes on this host."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, world, port, reps, q)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        ms = q.get(timeout=300)
    finally:
        for p in procs:
            p.join(timeout=60)
    return ms


def run(worlds=(2, 4, 8, 16), reps: int = 1000) -> dict:
    worlds = [w for w in worlds if w <= (os.cpu_count() or 1)]
    return {"cpus": os.cpu_count(), "reps": reps, "round_ms": {w: round(round_ms(w, reps), 4) for w in worlds},
            "note": "groups larger than the host's cores are skipped (they would time core sharing, not the round)"}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worlds", default="2,4,8,16")
    ap.add_argument("--reps", type=int, default=1000)
    a = ap.parse_args()
    print(json.dumps(run(tuple(int(w) for w in a.worlds.split(",")), a.reps), indent=1))
