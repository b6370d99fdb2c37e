"""The server a chaos run (bench/chaos.py) and the soak (bench/soak.py) drive: `epserve serve` as a child process.

It runs the real command on its own embedded simulated cluster (ray.cluster_utils, every node on
127.0.0.1) with the KV store on a small real file system: a tmpfs of `kv_mb` MiB mounted in a mount
namespace of our own (`unshare -Urm`, no root needed), held by a `sleep` this module starts, and
every server process is started inside it (`nsenter`), so a full KV disk is a real ENOSPC. The ledger
stays on the ordinary disk (it must survive the server). Where user namespaces are not allowed, the KV
store is an ordinary folder and `has_small_fs` is False (the disk-full fault is then skipped, not faked).

Faults need pids: the harness joins the server's Ray as a second driver (the address is on the
server's "serving on" line) and reads them from Ray's actor, node and placement-group tables. Every
process this module kills is the server's or one it started, by pid.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import yaml


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _userns_ok() -> bool:
    if not shutil.which("unshare") or not shutil.which("nsenter"):
        return False
    r = subprocess.run(["unshare", "-Urm", "true"], capture_output=True)
    return r.returncode == 0


class ChaosServer:
    """One `epserve serve` child: start, wait until it serves, kill parts of it, restart on the same paths."""

    def __init__(self, workdir: Path, model_dir: str | None, kv_mb: int = 48, extra: dict | None = None,
                 base: dict | None = None, small_fs: bool = True):
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.kv_path, self.ledger_path = self.dir / "kv", self.dir / "ledger"
        self.kv_path.mkdir(exist_ok=True)
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.kv_mb, self.small_fs = kv_mb, small_fs
        self.cfg = base if base is not None else {
            "model": model_dir, "dtype": "float32", "kernels": "reference",
            "ray": {"spare_nodes": 1},
            "prefill": {"units": 1, "nodes_per_unit": 2, "gpus_per_node": 1, "kv_pages": 64},
            "decode": {"units": 1, "nodes_per_unit": 2, "gpus_per_node": 1, "kv_pages": 128,
                       "redundant_experts": 2},
            "eplb": {"interval_s": 5.0, "window_steps": 200},
            "kv_store": {"path": str(self.kv_path), "capacity_gb": kv_mb / 1024 * 0.8},
            "ledger": {"path": str(self.ledger_path), "flush_rows": 16, "flush_interval_s": 2.0},
            "autoscale": {"enabled": True, "prefill_units": [1, 1], "decode_units": [1, 1], "interval_s": 2.0},
            "serve": {"host": "127.0.0.1", "port": self.port, "model_name": "chaos", "max_queue": 128},
        }
        self.cfg = {**self.cfg, "model": model_dir}
        self.cfg.setdefault("kv_store", {})["path"] = str(self.kv_path)
        self.cfg.setdefault("ledger", {})["path"] = str(self.ledger_path)
        self.cfg.setdefault("serve", {}).update(host="127.0.0.1", port=self.port)
        for key, value in (extra or {}).items():
            self.cfg[key] = {**self.cfg.get(key, {}), **value} if isinstance(value, dict) else value
        self.config_file = self.dir / "server.yaml"
        self.config_file.write_text(yaml.safe_dump(self.cfg))
        self.holder: subprocess.Popen | None = None
        self.has_small_fs = False
        self.proc: subprocess.Popen | None = None
        self.lines: list[str] = []
        self.ray_address: str | None = None
        self.n_starts = 0
        self.auth: dict = {}

    # ---- the namespace with the small KV file system ----------------------------------------
    def _start_holder(self) -> None:
        if not _userns_ok():
            return
        script = f"mount -t tmpfs -o size={self.kv_mb}m epserve-kv {self.kv_path} && echo ok && exec sleep 100000"
        self.holder = subprocess.Popen(["unshare", "-Urm", "sh", "-c", script], stdout=subprocess.PIPE, text=True)
        self.has_small_fs = self.holder.stdout.readline().strip() == "ok"

    @property
    def kv_view(self) -> Path:
        """The KV store's folder as this process sees it (inside the namespace when there is one)."""
        return Path(f"/proc/{self.holder.pid}/root{self.kv_path}") if self.has_small_fs else self.kv_path

    # ---- the server process ------------------------------------------------------------------
    def start(self, timeout_s: float = 300.0) -> float:
        """Start `epserve serve`; return seconds until it answered a completion."""
        if self.holder is None and self.small_fs:
            self._start_holder()
        cmd = [sys.executable, "-m", "epserve", "serve", "--config", str(self.config_file)]
        if self.has_small_fs:
            cmd = ["nsenter", "-t", str(self.holder.pid), "-U", "-m", "--preserve-credentials"] + cmd
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
        env.update(RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
        t0 = time.time()
        self.lines = []
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     cwd=str(self.dir))
        log = open(self.dir / f"server-{self.n_starts}.log", "w")
        self.n_starts += 1

        def pump(proc=self.proc):
            for line in iter(proc.stdout.readline, ""):
                self.lines.append(line)
                log.write(line)
                log.flush()
        threading.Thread(target=pump, daemon=True).start()
        while time.time() - t0 < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"epserve serve exited with {self.proc.returncode}: {''.join(self.lines)[-3000:]}")
            m = next((re.search(r"Ray at ([\d.]+:\d+)", x) for x in self.lines if "serving on" in x), None)
            if m and self._answers():
                self.ray_address = m.group(1)
                return time.time() - t0
            time.sleep(0.5)
        raise TimeoutError(f"epserve serve did not answer in {timeout_s:.0f}s: {''.join(self.lines)[-3000:]}")

    def _answers(self) -> bool:
        try:
            r = httpx.post(self.base + "/v1/completions", timeout=30, headers=self.auth,
                           json={"model": self.cfg["serve"]["model_name"], "prompt": [5, 6, 7], "max_tokens": 1})
            return r.status_code == 200
        except httpx.HTTPError:
            return False

    def tree(self) -> list[int]:
        import psutil
        if self.proc is None or self.proc.poll() is not None:
            return []
        root = psutil.Process(self.proc.pid)
        return [root.pid] + [c.pid for c in root.children(recursive=True)]

    def sigkill_all(self) -> int:
        """kill -9 of every process of the server at once (a crashed machine); -> processes killed."""
        pids = self.tree()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=30)
        self._reap(pids)
        return len(pids)

    @staticmethod
    def _reap(pids: list[int], timeout_s: float = 30.0) -> None:
        import psutil
        deadline = time.time() + timeout_s
        while time.time() < deadline and any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"
                                             for p in pids):
            time.sleep(0.2)

    def stop(self) -> None:
        """SIGTERM (the server flushes and tears down); whatever of its tree is left after 90 s is killed."""
        pids = self.tree()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                pass
        import psutil
        for pid in pids:
            try:
                if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie":
                    os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, psutil.NoSuchProcess):
                pass
        self._reap(pids)

    def close(self) -> None:
        try:
            self.stop()
        finally:
            if self.holder is not None and self.holder.poll() is None:
                self.holder.kill()
                self.holder.wait()

    # ---- Ray's view of the server, for pids --------------------------------------------------
    def tables(self) -> dict:
        """Ray's actor and placement-group tables of the server's cluster, read by a short-lived driver
        (a child process: the caller may be connected to another Ray, e.g. a test session's)."""
        out = subprocess.run([sys.executable, "-m", "epserve.bench.chaos_server", self.ray_address],
                             capture_output=True, text=True, timeout=120,
                             env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
        if out.returncode != 0:
            raise RuntimeError(f"reading Ray's tables failed: {out.stderr[-2000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    def actors(self, class_name: str, tables: dict | None = None) -> list[dict]:
        """Alive actors of a class: {"pid", "node"}."""
        return [a for a in (tables or self.tables())["actors"] if a["class"] == class_name]

    @staticmethod
    def unit_nodes(tables: dict, role: str) -> list[str]:
        """Node ids of the live `role` unit's placement-group bundles, in bundle (= rank) order."""
        return next((nodes for name, nodes in tables["pgs"].items() if f"/{role}-unit0-" in name), [])

    def rank_pid(self, role: str, index: int = 0) -> int:
        t = self.tables()
        ranks = {a["node"]: a["pid"] for a in self.actors("RankActor", t)}
        return ranks[self.unit_nodes(t, role)[index]]

    def titled(self, title: str) -> list[int]:
        """Pids in the server's tree whose process title is `ray::<title>...` (Ray names worker processes so)."""
        import psutil
        out = []
        for pid in self.tree():
            try:
                cmd = psutil.Process(pid).cmdline()
            except psutil.NoSuchProcess:
                continue
            if cmd and cmd[0].startswith(f"ray::{title}"):
                out.append(pid)
        return out

    def raylet_tree(self, node_id: str) -> list[int]:
        """The simulated node's raylet and every process under it (its workers and agents)."""
        import psutil
        for pid in self.tree():
            try:
                p = psutil.Process(pid)
                if any(a == f"--node_id={node_id}" for a in p.cmdline()) and "raylet" in p.name():
                    return [p.pid] + [c.pid for c in p.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
        raise LookupError(f"no raylet for node {node_id} in the server's process tree")


def _print_tables(address: str) -> None:
    import ray
    from ray._private import state
    from ray.util import placement_group_table
    ray.init(address=address, log_to_driver=False, namespace="epserve-chaos", _node_ip_address="127.0.0.1")
    actors = [{"class": a["ActorClassName"], "pid": a["Pid"], "node": a["Address"]["NodeID"]}
              for a in state.actors().values() if a["State"] == "ALIVE"]
    pgs = {pg["name"]: [pg["bundles_to_node_id"][i] for i in sorted(pg["bundles_to_node_id"])]
           for pg in placement_group_table().values() if pg["state"] == "CREATED"}
    print(json.dumps({"actors": actors, "pgs": pgs}))
    ray.shutdown()


if __name__ == "__main__":
    _print_tables(sys.argv[1])
