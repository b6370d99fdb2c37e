"""The agreement's collective between real gloo processes: recursive doubling gives every rank the
element-wise max, at power-of-two and other group sizes, on sub-groups that do not start at rank 0,
and back to back (a fast rank's next agreement must not mix with a slow rank's current one)."""
from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from epserve.actors.agreement import exchange_steps, max_all_reduce

WORLD = 5


def _worker(rank: int, port: int, out) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")          # loopback only
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    got = {}
    for members in ([0, 1], [1, 2, 3], [0, 1, 2, 3], list(range(WORLD))):
        group = dist.new_group(members)                         # every process joins every new_group call
        if rank not in members:
            continue
        me, n = members.index(rank), len(members)
        rows = []
        for step in range(20):                                  # back to back, different values each time
            v = torch.tensor([rank * 7 + step, -rank, step % 3 == rank % 3], dtype=torch.long)
            rows.append(max_all_reduce(v, group, me, n).tolist())
        got[len(members)] = rows
    out.put((rank, got))
    dist.barrier()
    dist.destroy_process_group()


def test_recursive_doubling_gives_every_rank_the_max():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, port, q)) for r in range(WORLD)]
    for p in procs:
        p.start()
    results = dict(q.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for members in ([0, 1], [1, 2, 3], [0, 1, 2, 3], list(range(WORLD))):
        want = [[max(r * 7 + step for r in members), -min(members), int(any(step % 3 == r % 3 for r in members))]
                for step in range(20)]
        for r in members:
            assert results[r][len(members)] == want, (members, r)


def test_exchange_steps_are_log2_plus_the_fold():
    assert [exchange_steps(n) for n in (1, 2, 3, 4, 8, 9, 16, 32, 128, 144)] == [0, 1, 3, 2, 3, 5, 4, 5, 7, 9]
