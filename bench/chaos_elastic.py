"""`epserve bench chaos --elastic`: a rank SIGKILLed mid-stream in an elastic unit, measured.

The server (bench/chaos_server.py) runs prefill and decode units of 3 nodes x 1 fake GPU with
`elastic: true` and 8 redundant experts (24 slots, 8 per rank: any two survivors hold all 16 of
the tiny model's experts), EPLB off (its switches would blur the timings). Per fault (a decode
rank, then a prefill rank, each killed with kill -9 once half the streams have 4 chunks):
  max_gap_s       the longest wait between two chunks of any stream (an upper bound for the
                  streams that were on survivors: the dead rank's streams are in it too)
  error / wrong   failed streams; streams whose text differs from the unfaulted greedy run
  usage_wrong     completed streams whose usage.completion_tokens is not max_tokens (they ignore EOS:
                  a resumed request must bill each token once); ledger_lost as in chaos.py
  tok_s_before    tokens/s of the whole load before any fault
  tok_s_shrunk    tokens/s over the fault's run from when every stream has resumed (the fault time
                  plus max_gap_s) to its end, or until the replacement joined if that came first
  rejoin_s        from the kill until the unit has all its rank actors again (polled, ~2 s grain)
  tok_s_rejoined  tokens/s of the whole load once the unit is whole again
And the recovery-time model for an EP144 unit on GPUs (fleet/recovery_model.py) with its assumptions.
"""
from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

import httpx

from epserve.bench.chaos import Chaos, table
from epserve.bench.chaos_load import Load
from epserve.bench.chaos_server import ChaosServer
from epserve.fleet.recovery_model import RecoveryAssumptions, recovery_table

FAULTS = ("decode-rank", "prefill-rank")
N_RANKS = 3


def elastic_config(model_dir: str) -> dict:
    unit = {"units": 1, "nodes_per_unit": N_RANKS, "gpus_per_node": 1, "redundant_experts": 8, "elastic": True}
    return {"model": model_dir, "dtype": "float32", "kernels": "reference", "ray": {"spare_nodes": 0},
            "prefill": {**unit, "kv_pages": 64}, "decode": {**unit, "kv_pages": 128},
            "eplb": {"interval_s": 100000.0, "window_steps": 200},
            "autoscale": {"enabled": False}, "serve": {"model_name": "chaos", "max_queue": 128}}


def tokens_per_s(streams, t0: float | None = None, t1: float | None = None) -> float | None:
    """Chunks per second of all streams together within [t0, t1] (default: their whole span); a
    chunk is one token unless the ingress merged some, the same way before and after a fault."""
    times = sorted(t for s in streams for t in s.times)
    if len(times) < 2:
        return None
    lo, hi = t0 if t0 is not None else times[0], t1 if t1 is not None else times[-1]
    n = sum(lo <= t <= hi for t in times)
    return round(n / (hi - lo), 1) if hi - lo > 0.5 else None


async def _steady(chaos: Chaos) -> tuple[float | None, int]:
    """One load against the live server -> (tokens/s, streams not correct)."""
    load = Load(chaos.srv.base, "chaos", chaos.prompts, chaos.max_tokens, reference=chaos.reference)
    async with httpx.AsyncClient(timeout=None) as client:
        streams = await load.run(client)
    return tokens_per_s(streams), sum(s.outcome != "completed" or s.wrong for s in streams)


def _whole(srv: ChaosServer) -> bool:
    return len(srv.actors("RankActor")) >= 2 * N_RANKS


def _wait_whole(srv: ChaosServer, t_fault: float, limit_s: float = 300.0) -> float | None:
    while time.time() - t_fault < limit_s:
        if _whole(srv):
            return round(time.time() - t_fault, 1)
        time.sleep(1.0)
    return None


def run(faults: tuple[str, ...] = FAULTS, n_streams: int = 16, max_tokens: int = 64, model: str | None = None,
        workdir: str | None = None) -> dict:
    unknown = [f for f in faults if f not in FAULTS]
    if unknown:
        raise ValueError(f"--elastic runs {', '.join(FAULTS)}; not {', '.join(unknown)}")
    import logging
    logging.getLogger("httpx").setLevel(logging.WARNING)
    from epserve.model.tiny import default_model_dir
    work = Path(workdir or tempfile.mkdtemp(prefix="epserve-chaos-elastic-"))
    model_dir = str(model or default_model_dir())
    srv = ChaosServer(work, model_dir, base=elastic_config(model_dir), small_fs=False)
    chaos = Chaos(srv, n_streams, max_tokens)
    out: dict = {"mode": "elastic", "faults": [], "streams": n_streams, "max_tokens": max_tokens,
                 "ranks_per_unit": N_RANKS, "workdir": str(work)}
    try:
        out["start_s"] = round(srv.start(), 1)
        out["reference"] = asyncio.run(chaos.reference_run())
        out["tok_s_before"], _ = asyncio.run(_steady(chaos))
        for name in faults:
            chaos.say(f"elastic fault {name}")
            row = asyncio.run(chaos.run_fault(name))
            t_kill = row["t_fault"]
            # each token billed once: ignore_eos streams bill exactly max_tokens, resumed or not
            row["usage_wrong"] = sum(s.outcome == "completed" and (s.usage or {}).get("completion_tokens") != max_tokens
                                     for s in chaos.last_streams)
            row["rejoin_s"] = _wait_whole(srv, t_kill)
            end = max((t for s in chaos.last_streams for t in s.times), default=t_kill)
            until = min(end, t_kill + row["rejoin_s"]) if row["rejoin_s"] is not None else end
            row["tok_s_shrunk"] = tokens_per_s(chaos.last_streams, t_kill + row["max_gap_s"], until)
            row["tok_s_rejoined"], row["rejoined_not_correct"] = asyncio.run(_steady(chaos))
            chaos.say(f"{name}: max gap {row['max_gap_s']} s, rejoin {row['rejoin_s']} s, tokens/s "
                      f"{out['tok_s_before']} -> {row['tok_s_shrunk']} -> {row['tok_s_rejoined']}")
            out["faults"].append(row)
    finally:
        srv.close()
    out["table"] = table(out["faults"]) + "\n\n" + elastic_table(out)
    out["recovery_model"] = recovery_table(RecoveryAssumptions())
    out["recovery_table"] = model_table(out["recovery_model"])
    print(out["table"] + "\n\n" + out["recovery_table"], file=sys.stderr)
    return out


def elastic_table(out: dict) -> str:
    head = ["fault", "max gap s", "failed", "wrong", "usage wrong", "tok/s before", "tok/s shrunk", "rejoin s",
            "tok/s rejoined"]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in out["faults"]:
        lines.append(" | ".join(str(x) for x in (r["fault"], r["max_gap_s"], r["error"] + r["cut"] + r["hung"],
                                                 r["wrong"], r["usage_wrong"], out["tok_s_before"], r["tok_s_shrunk"], r["rejoin_s"],
                                                 r["tok_s_rejoined"])))
    return "\n".join(lines)


def model_table(rows: list[dict]) -> str:
    """The EP144 model: one line per elastic variant, its terms, and the rebuild it is held to."""
    terms = list(rows[0]["elastic"])
    lines = ["EP144 decode unit, one rank dead (fleet/recovery_model.py; seconds)",
             " | ".join(["variant"] + terms + ["rebuild total", "rebuild / elastic"])]
    for r in rows:
        lines.append(" | ".join([r["variant"]] + [str(r["elastic"][t]) for t in terms]
                                + [str(r["rebuild"]["total"]), str(r["ratio"])]))
    rb = rows[0]["rebuild"]
    lines.append("rebuild: " + ", ".join(f"{k} {v}" for k, v in rb.items()))
    return "\n".join(lines)
