"""`epserve bench chaos`: one fault at a time against a live `epserve serve`, each measured.

The server (bench/chaos_server.py) runs on its own simulated cluster: prefill and decode units of
2 nodes x 1 fake GPU, one spare node, EPLB and the capacity controller on, the KV store on a
48 MiB tmpfs of its own, the ledger on disk. For each fault, `streams` concurrent streamed
completions (half sharing a 128-token prefix, so the KV store is read and written) run while the
fault is injected once they are under way; then, per fault:
  completed / error (status and body) / refused / cut / hung    (bench/chaos_load.py)
  wrong       streams whose text is not the greedy reference (a failed stream: not a prefix of it)
  ledger_lost completed streams (usage and [DONE] received, so billed) with no ledger row, plus rows
              that were in the ledger before the fault and are gone after it
  recover_s   from the fault to the first correct answer of a request sent after it (a probe is
              sent every 0.5 s); `restarted_s` when the killed component itself came back
The greedy reference is an unfaulted run of the same prompts on the same server.

Faults are real: kill -9 of the process Ray reports for the actor; a simulated node's raylet and
every process under it; a tmpfs filled to ENOSPC; bytes flipped in stored KV blocks; a Parquet part
truncated; the whole server's process tree killed and `epserve serve` started again on the same paths.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import httpx

from epserve.bench.chaos_load import RETRIABLE, Load, make_prompts, probe
from epserve.bench.chaos_server import ChaosServer

FAULTS = ("prefill-rank", "decode-rank", "ledger", "eplb-controller", "capacity-controller", "ingress", "node",
          "kv-disk-full", "kv-corrupt", "ledger-truncate", "server-sigkill")
CI_FAULTS = ("decode-rank", "prefill-rank", "ledger", "kv-corrupt", "ledger-truncate", "eplb-controller")


def ledger_ids(root: Path) -> set[str]:
    """Request ids the ledger holds: readable parts plus rows still in write-ahead logs."""
    from epserve.fleet.ledger_read import read_ledger
    ids = set(read_ledger(root).requests["request_id"].to_pylist())
    for f in (root / "wal").glob("*.jsonl"):
        try:
            lines = f.read_bytes().split(b"\n")
        except FileNotFoundError:
            continue
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("table") == "requests":
                ids.add(rec["row"]["request_id"])
    return ids


def _kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Chaos:
    def __init__(self, srv: ChaosServer, n_streams: int = 32, max_tokens: int = 32, log=sys.stderr):
        self.srv, self.log = srv, log
        self.prompts = make_prompts(n_streams)
        self.max_tokens = max_tokens
        self.reference: list[str] | None = None
        self.probe_prompt = [7, 8, 9, 10, 11, 12]
        self.probe_want: str | None = None
        self.last_streams: list = []          # the last fault's streams (bench/chaos_elastic.py reads their times)

    def say(self, msg: str) -> None:
        print(f"[chaos {time.strftime('%H:%M:%S')}] {msg}", file=self.log, flush=True)

    async def reference_run(self) -> dict:
        async with httpx.AsyncClient(timeout=None) as client:
            ok, _, _ = await probe(client, self.srv.base, "chaos", self.probe_prompt, None, 4, 120)
            r = await client.post(self.srv.base + "/v1/completions", json={
                "model": "chaos", "prompt": self.probe_prompt, "max_tokens": 4, "temperature": 0.0,
                "ignore_eos": True})
            self.probe_want = r.json()["choices"][0]["text"]
            t0 = time.time()
            streams = await Load(self.srv.base, "chaos", self.prompts, self.max_tokens).run(client)
            again = await Load(self.srv.base, "chaos", self.prompts, self.max_tokens).run(client)  # from the KV store
        bad = [s.brief() for s in streams + again if s.outcome != "completed"]
        if bad:
            raise RuntimeError(f"the unfaulted reference run failed: {bad[:4]}")
        self.reference = [s.text for s in streams]
        if [s.text for s in again] != self.reference:
            raise RuntimeError("the unfaulted run gave other text when its prompts hit the KV store")
        return {"s": round(time.time() - t0, 1), "streams": len(streams)}

    # ---- one fault ------------------------------------------------------------------------------
    async def run_fault(self, name: str) -> dict:
        srv = self.srv
        fault = getattr(self, "fault_" + name.replace("-", "_"))
        before = ledger_ids(srv.ledger_path)
        load = Load(srv.base, "chaos", self.prompts, self.max_tokens, reference=self.reference)
        info: dict = {}
        prep = getattr(self, "prep_" + name.replace("-", "_"), None)
        if prep is not None:        # pids are read before the load starts, so the kill lands when it should
            info["victim"] = await prep()
        async with httpx.AsyncClient(timeout=None) as client:
            run = asyncio.ensure_future(load.run(client))
            t_fault = await fault(load, info)
            probes = asyncio.ensure_future(self._recovery(client, t_fault, info))
            watch = asyncio.ensure_future(info.pop("watch")) if "watch" in info else None
            streams = self.last_streams = await run
            if watch is not None:
                await watch
            recover_s, probe_ids = await probes
            if "after" in info:
                await info.pop("after")(info)
        # a sent response's row is in the ledger's log before the response; the WAL keeps it until a part holds it
        after = ledger_ids(srv.ledger_path)
        billed = {s.request_id for s in streams if s.outcome == "completed"} | set(probe_ids)
        lost = sorted((billed | before) - after)
        count = {k: sum(s.outcome == k for s in streams) for k in ("completed", "error", "refused", "cut", "hung")}
        errors = sorted({(s.error or {}).get("status") or 0 for s in streams if s.outcome == "error"})
        row = {"fault": name, **count, "wrong": sum(s.wrong for s in streams), "ledger_lost": len(lost),
               "lost_ids": lost[:5], "error_statuses": errors,
               "errors_retriable": all(st in RETRIABLE for st in errors),
               "error_bodies": sorted({json.dumps(s.error)[:240] for s in streams if s.error})[:3],
               "recover_s": recover_s, "max_gap_s": round(max((s.max_gap for s in streams), default=0.0), 3),
               "t_fault": t_fault, **info,
               "streams": [s.brief() for s in streams if s.outcome != "completed" or s.wrong]}
        self.say(f"{name}: " + ", ".join(f"{k}={row[k]}" for k in ("completed", "error", "refused", "cut", "hung",
                                                                    "wrong", "ledger_lost", "recover_s")))
        return row

    async def _recovery(self, client, t_fault: float, info: dict, limit_s: float = 180.0):
        """Send a probe every 0.5 s from the fault on; -> (seconds to the first correct answer, probe ids)."""
        done: list[float] = []
        ids: list[str] = []

        async def one():
            ok, rid, what = await probe(client, self.srv.base, "chaos", self.probe_prompt, self.probe_want, 4, 120)
            if rid:
                ids.append(rid)
            if what == "wrong":
                info["probe_wrong"] = info.get("probe_wrong", 0) + 1
            if ok:
                done.append(time.time())
        tasks = []
        while not done and time.time() - t_fault < limit_s:
            tasks.append(asyncio.ensure_future(one()))
            await asyncio.sleep(0.5)
        await asyncio.gather(*tasks)
        return (round(min(done) - t_fault, 2) if done else None), ids

    async def _when(self, load: Load, min_chunks: int, n: int, timeout_s: float = 120.0) -> None:
        t0 = time.time()
        while load.progress(min_chunks) < n and time.time() - t0 < timeout_s:
            await asyncio.sleep(0.01)

    async def _restarted(self, title: str, old_pid: int, n_before: int, info: dict, t_fault: float,
                         limit_s: float = 60.0):
        """When the server has as many processes titled ray::<title> as before the kill, the killed one not among them."""
        while time.time() - t_fault < limit_s:
            pids = await asyncio.to_thread(self.srv.titled, title)
            if len(pids) >= n_before and old_pid not in pids:
                info["restarted_s"] = round(time.time() - t_fault, 2)
                return
            await asyncio.sleep(0.2)
        info["restarted_s"] = None

    async def _kill_actor(self, load: Load, info: dict, cls: str, title: str | None = None,
                          min_chunks: int = 4) -> float:
        victim = (await asyncio.to_thread(self.srv.actors, cls))[0]
        await self._when(load, min_chunks, len(load.prompts) // 2)
        n_before = len(await asyncio.to_thread(self.srv.titled, title or cls))
        _kill([victim["pid"]])
        t = time.time()
        info.update(killed=f"{cls} pid {victim['pid']}")
        info["watch"] = self._restarted(title or cls, victim["pid"], n_before, info, t)
        return t

    # ---- the faults ---------------------------------------------------------------------------------
    async def prep_prefill_rank(self) -> int:
        return await asyncio.to_thread(self.srv.rank_pid, "prefill", 0)

    async def fault_prefill_rank(self, load: Load, info: dict) -> float:
        """kill -9 prefill rank 0 as the first prompt's KV is handed off (its first token is out; the
        decode rank is pulling its blocks) while the others are still being prefilled."""
        await self._when(load, 1, 1)
        pid = info.pop("victim")
        _kill([pid])
        info.update(killed=f"prefill rank 0 pid {pid}", first_tokens_at_kill=load.progress(1))
        return time.time()

    async def prep_decode_rank(self) -> int:
        return await asyncio.to_thread(self.srv.rank_pid, "decode", 1)

    async def fault_decode_rank(self, load: Load, info: dict) -> float:
        await self._when(load, 4, len(load.prompts) // 2)
        pid = info.pop("victim")
        _kill([pid])
        info.update(killed=f"decode rank 1 pid {pid}")
        return time.time()

    async def fault_ledger(self, load: Load, info: dict) -> float:
        return await self._kill_actor(load, info, "LedgerActor")

    async def fault_eplb_controller(self, load: Load, info: dict) -> float:
        return await self._kill_actor(load, info, "EplbController")

    async def fault_capacity_controller(self, load: Load, info: dict) -> float:
        return await self._kill_actor(load, info, "CapacityController")

    async def fault_ingress(self, load: Load, info: dict) -> float:
        return await self._kill_actor(load, info, "ServeReplica:epserve:Ingress", "ServeReplica")

    async def fault_node(self, load: Load, info: dict) -> float:
        """The node of decode rank 1: its raylet and every process under it, all at once."""
        node = self.srv.unit_nodes(await asyncio.to_thread(self.srv.tables), "decode")[1]
        await self._when(load, 4, len(load.prompts) // 2)
        pids = self.srv.raylet_tree(node)
        _kill(pids)
        info.update(killed=f"node {node[:8]}: raylet + {len(pids) - 1} processes")
        return time.time()

    async def fault_kv_disk_full(self, load: Load, info: dict) -> float:
        """Fill the KV store's tmpfs to ENOSPC mid-run; then free it and check that writes resume."""
        if not self.srv.has_small_fs:
            info["skipped"] = "no user namespace for a small file system on this machine"
            return time.time()
        await self._when(load, 1, 2)
        filler = self.srv.kv_view / "filler.bin"
        n = 0
        with open(filler, "wb") as f:
            try:
                while True:
                    f.write(b"\0" * (1 << 20))
                    f.flush()
                    n += 1
            except OSError as exc:
                info["fill"] = f"{n} MiB, then {os.strerror(exc.errno)}"
        blocks_full = {p.name for p in self.srv.kv_view.rglob("*.kvb")}

        async def after(info):       # the run is over: blocks written while the disk was full (none can be)
            info["blocks_written_while_full"] = len({p.name for p in self.srv.kv_view.rglob("*.kvb")} - blocks_full)
            filler.unlink()
            blocks0 = sum(1 for _ in self.srv.kv_view.rglob("*.kvb"))
            fresh = make_prompts(2, seed=int(time.time()))
            async with httpx.AsyncClient(timeout=None) as client:
                t0 = time.time()
                while time.time() - t0 < 60:     # writes come back on their own once there is room
                    await probe(client, self.srv.base, "chaos", fresh[0] + [int(time.time()) % 400 + 4], None, 1, 60)
                    if sum(1 for _ in self.srv.kv_view.rglob("*.kvb")) > blocks0:
                        info["writes_resumed_s"] = round(time.time() - t0, 1)
                        return
                    await asyncio.sleep(1)
            info["writes_resumed_s"] = None
        info["after"] = after
        return time.time()

    async def fault_kv_corrupt(self, load: Load, info: dict) -> float:
        """Flip bytes in the payload of every stored block (the shared prefix's blocks among them)."""
        bad: dict[Path, bytes] = {}
        for path in self.srv.kv_view.rglob("*.kvb"):
            data = bytearray(path.read_bytes())
            for i in range(len(data) - 64, len(data), 7):
                data[i] ^= 0x5A
            path.write_bytes(bytes(data))
            bad[path] = bytes(data)
        info["corrupted_blocks"] = len(bad)

        async def after(info):     # a bad block a request read was dropped (and rewritten); others are never read
            left = sum(1 for p, data in bad.items() if p.exists() and p.read_bytes() == data)
            info["corrupt_blocks_dropped"] = len(bad) - left
        info["after"] = after
        return time.time()

    async def fault_ledger_truncate(self, load: Load, info: dict) -> float:
        """Truncate the newest flushed Parquet part of the requests table to half its size."""
        await self._when(load, 4, len(load.prompts) // 2)
        parts = sorted((self.srv.ledger_path / "requests").glob("*.parquet"), key=lambda p: p.stat().st_mtime)
        if not parts:
            info["skipped"] = "no flushed part yet"
            return time.time()
        victim = parts[-1]
        size = victim.stat().st_size
        os.truncate(victim, size // 2)
        info["truncated"] = f"{victim.name}: {size} -> {size // 2} bytes"
        return time.time()

    async def fault_server_sigkill(self, load: Load, info: dict) -> float:
        """kill -9 every process of the server, then start `epserve serve` again on the same paths."""
        await self._when(load, 4, len(load.prompts) // 2)
        n = self.srv.sigkill_all()
        t = time.time()
        info["killed"] = f"{n} processes"
        loop = asyncio.get_running_loop()
        info["restart_s"] = round(await loop.run_in_executor(None, self.srv.start), 1)
        return t


def table(rows: list[dict]) -> str:
    head = ["fault", "completed", "error (status)", "refused", "cut", "hung", "wrong", "ledger lost", "recover s"]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        if r.get("skipped"):
            lines.append(f"{r['fault']} | skipped: {r['skipped']}")
            continue
        err = f"{r['error']} ({','.join(map(str, r['error_statuses']))})" if r["error"] else "0"
        lines.append(" | ".join(str(x) for x in (r["fault"], r["completed"], err, r["refused"], r["cut"], r["hung"],
                                                 r["wrong"], r["ledger_lost"], r["recover_s"])))
    return "\n".join(lines)


def run(faults: tuple[str, ...] = FAULTS, n_streams: int = 32, max_tokens: int = 32, model: str | None = None,
        workdir: str | None = None) -> dict:
    unknown = [f for f in faults if f not in FAULTS]
    if unknown:
        raise ValueError(f"unknown fault(s) {', '.join(unknown)}; known: {', '.join(FAULTS)}")
    import logging
    logging.getLogger("httpx").setLevel(logging.WARNING)
    from epserve.model.tiny import default_model_dir
    work = Path(workdir or tempfile.mkdtemp(prefix="epserve-chaos-"))
    srv = ChaosServer(work, str(model or default_model_dir()))
    chaos = Chaos(srv, n_streams, max_tokens)
    out: dict = {"faults": [], "streams": n_streams, "max_tokens": max_tokens, "workdir": str(work)}
    try:
        out["start_s"] = round(srv.start(), 1)
        out["small_kv_fs"] = srv.has_small_fs
        chaos.say(f"server up in {out['start_s']} s at {srv.base}; small KV file system: {srv.has_small_fs}")
        out["reference"] = asyncio.run(chaos.reference_run())
        for name in faults:
            chaos.say(f"fault {name}")
            out["faults"].append(asyncio.run(chaos.run_fault(name)))
    finally:
        srv.close()
    out["table"] = table(out["faults"])
    print(out["table"], file=sys.stderr)
    return out
