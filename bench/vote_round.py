"""`python -m epserve.bench.vote_round [--worlds 2,4,8,16]`: the lockstep's agreement alone, between
plain processes on this host (gloo over 127.0.0.1, no Ray), at several group sizes, two ways.

The same encode -> MAX -> decode as a rank's `_all_reduce` (actors/rank.py), timed as the median
of `reps` back-to-back agreements after a warm-up: "doubling" is what ranks run (recursive
doubling on send/recv, actors/agreement.py), "ring" is gloo's own all_reduce, which ranks ran
before (2 (N - 1) hops in a row). Each result is checked against the true max. It measures what one round costs
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

from epserve.actors.agreement import max_all_reduce
from epserve.pipelines.lockstep import Vote

ALGOS = ("doubling", "ring")


def _worker(rank: int, world: int, port: int, reps: int, algo: str, out) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")          # loopback only
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    vote = Vote(has_work=1, n_running=64 + rank)
    times = []
    for i in range(reps + 50):
        t = time.perf_counter()
        x = torch.tensor(vote.encode(), dtype=torch.long)
        if algo == "ring":
            dist.all_reduce(x, dist.ReduceOp.MAX)
        else:
            max_all_reduce(x, None, rank, world)
        got = Vote.decode(x.tolist())
        if got.n_running != 63 + world:
            raise AssertionError(f"{algo} at {world} ranks gave n_running {got.n_running}, not {63 + world}")
        if i >= 50:
            times.append((time.perf_counter() - t) * 1e3)
    if rank == 0:
        out.put(sorted(times)[len(times) // 2])
    dist.barrier()
    dist.destroy_process_group()


def round_ms(world: int, reps: int = 1000, algo: str = "doubling") -> float:
    """Median ms of one agreement among `world` processes on this host."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, world, port, reps, algo, q)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        ms = q.get(timeout=300)
    finally:
        for p in procs:
            p.join(timeout=60)
    return ms


def run(worlds=(2, 4, 8, 16), reps: int = 1000, algos=ALGOS) -> dict:
    worlds = [w for w in worlds if w <= (os.cpu_count() or 1)]
    return {"cpus": os.cpu_count(), "reps": reps,
            "agreement_ms": {a: {w: round(round_ms(w, reps, a), 4) for w in worlds} for a in algos},
            "note": "groups larger than the host's cores are skipped (they would time core sharing, not the round)"}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worlds", default="2,4,8,16")
    ap.add_argument("--reps", type=int, default=1000)
    ap.add_argument("--algos", default=",".join(ALGOS))
    a = ap.parse_args()
    algos = tuple(a.algos.split(","))
    bad = [x for x in algos if x not in ALGOS]
    if bad:
        ap.error(f"unknown --algos {bad[0]!r}: choose from {', '.join(ALGOS)}")
    print(json.dumps(run(tuple(int(w) for w in a.worlds.split(",")), a.reps, algos), indent=1))
