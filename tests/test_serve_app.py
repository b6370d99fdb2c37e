"""epserve.serve.app:build_app through Ray Serve's own CLI: `serve run`, `serve deploy`, `serve status`,
an in-place update and `serve shutdown`, against a loopback cluster with the dashboard (its REST API
is what `serve deploy` / `status` / `shutdown` speak to); the official openai client answers in
between, and shutdown leaves no actor and no placement group. So do a hard-killed Units replica (Serve
replaces it; its dead units' placement groups are removed, serve/units.py) and a blocking `serve run`
stopped with SIGINT.

The cluster is this module's own (the session's shared one has no dashboard), one for the file;
this process never joins it: the CLI and the state API speak to the dashboard over HTTP, and the
application's replicas import epserve through the PYTHONPATH the cluster inherited."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
import yaml
from ray.util.state import list_actors, list_placement_groups

from conftest import free_port, wait_healthy
from test_batch_job import dashboard_cluster

REPO = Path(__file__).resolve().parent.parent
SERVE_CLI = Path(sys.executable).parent / "serve"      # Ray's own CLI, from the venv that runs the tests
EXAMPLE = REPO / "examples" / "serve_config.yaml"
# Two one-rank units on 2 fake GPUs, exact float32 math; a tenant whose limits the update changes.
APP_CONFIG = {"dtype": "float32", "kernels": "reference", "kv_store": {"enabled": False}, "eplb": {"enabled": False},
              "prefill": {"gpus_per_node": 1, "kv_pages": 32}, "decode": {"gpus_per_node": 1, "kv_pages": 32},
              "serve": {"tenants": [{"name": "acme", "api_keys": ["k-acme"]}]}}
OURS = {"RankActor", "UnitSupervisor", "LedgerActor", "RouterActor", "CapacityController", "EplbController",
        "StreamSink"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A dashboard cluster (test_batch_job.dashboard_cluster) with 4 CPUs -> (GCS address, dashboard URL)."""
    with dashboard_cluster(num_cpus=4) as out:
        yield out


@pytest.fixture(scope="module")
def app_config(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("app") / "epserve.yaml"
    cfg = dict(APP_CONFIG, ledger={"path": str(path.parent / "ledger")})
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def serve_cli(*args: str, timeout: float = 420) -> str:
    """Run Ray's `serve` CLI; its stdout, or AssertionError with both streams when it exits non-zero."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}     # every call names its cluster
    proc = subprocess.run([str(SERVE_CLI), *args], capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"serve {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n" \
                                 f"{proc.stderr[-3000:]}"
    return proc.stdout


def app_status(dash: str) -> dict:
    """`serve status`'s entry for the epserve application ({} when there is none)."""
    return (yaml.safe_load(serve_cli("status", "--address", dash, timeout=60)) or {}).get(
        "applications", {}).get("epserve", {})


def wait_status(dash: str, want: str, ingress_running: int | None = None, timeout_s: float = 420) -> dict:
    """Poll `serve status` until the application is `want` (and, if given, the Ingress has that many
    RUNNING replicas); TimeoutError naming the last status."""
    deadline = time.monotonic() + timeout_s
    while True:
        st = app_status(dash)
        ingress = st.get("deployments", {}).get("Ingress", {}).get("replica_states", {})
        if st.get("status") == want and (ingress_running is None or ingress == {"RUNNING": ingress_running}):
            return st
        if time.monotonic() > deadline:
            raise TimeoutError(f"application not {want} within {timeout_s:g} s; last status: {st}")
        time.sleep(2)


def alive(dash: str, class_name: str | None = None) -> list[dict]:
    filters = [("state", "=", "ALIVE")] + ([("class_name", "=", class_name)] if class_name else [])
    return [a for a in list_actors(address=dash, filters=filters, limit=10000, raise_on_missing_output=False)]


def ingress_replicas(dash: str) -> list[str]:
    """Actor ids of the live Ingress replicas (Serve names their class ServeReplica:<app>:Ingress)."""
    return sorted(a["actor_id"] for a in alive(dash) if a["class_name"].endswith(":Ingress"))


def leftovers(dash: str) -> tuple[list, list]:
    """(every live actor, every placement group not removed) on the cluster, as (class, id) / (name, state)."""
    actors = [(a["class_name"], a["actor_id"]) for a in alive(dash)]
    groups = [(g["name"], g["state"]) for g in list_placement_groups(address=dash, limit=10000,
                                                                     raise_on_missing_output=False)
              if g["state"] != "REMOVED"]
    return actors, groups


def shutdown_leaves_nothing(dash: str, timeout_s: float = 300) -> None:
    """`serve shutdown -y`, then wait until the cluster holds no actor and no placement group (Serve's
    shutdown returns before its replicas' graceful teardown has run); fail naming what is left."""
    serve_cli("shutdown", "-y", "--address", dash)
    deadline = time.monotonic() + timeout_s
    while (left := leftovers(dash)) != ([], []):
        if time.monotonic() > deadline:
            raise AssertionError(f"left behind {timeout_s:g} s after serve shutdown: {left}")
        time.sleep(2)
    assert leftovers(dash) == ([], [])


def complete(base: str, api_key: str = "k-acme") -> str:
    client = openai.OpenAI(base_url=base + "/v1", api_key=api_key, max_retries=0, timeout=120)
    out = client.completions.create(model="epserve", prompt="The sea is", max_tokens=4, temperature=0.0)
    assert out.usage.completion_tokens == 4
    return out.choices[0].text


def deploy_file(tmp_path: Path, port: int, args: dict, ingress: dict | None = None) -> str:
    """examples/serve_config.yaml with this test's args, HTTP port and Ingress settings, written to tmp_path."""
    conf = yaml.safe_load(EXAMPLE.read_text())
    conf["http_options"]["port"] = port
    app = conf["applications"][0]
    app["args"] = args
    for d in app["deployments"]:
        if d["name"] == "Ingress" and ingress:
            d.update(ingress)
    path = tmp_path / f"serve_{len(list(tmp_path.iterdir()))}.yaml"
    path.write_text(yaml.safe_dump(conf))
    return str(path)


def test_bad_arg_fails_the_deploy_with_a_message_naming_it(cluster, app_config, tiny_dir, tmp_path):
    _, dash = cluster
    serve_cli("deploy", deploy_file(tmp_path, free_port(), {"config": app_config, "model": tiny_dir, "bogus": "1"}),
              "--address", dash)
    st = wait_status(dash, "DEPLOY_FAILED")
    assert "unknown application arg 'bogus'" in st["message"]
    shutdown_leaves_nothing(dash)


def test_serve_run_builder_answers_then_shutdown_leaves_nothing(cluster, app_config, tiny_dir):
    gcs, dash = cluster
    port = free_port()
    serve_cli("start", "--address", gcs, "--http-host", "127.0.0.1", "--http-port", str(port))
    serve_cli("run", "--address", gcs, "--non-blocking", "--name", "epserve", "epserve.serve.app:build_app",
              f"config={app_config}", f"model={tiny_dir}", "serve.max_queue=32")
    base = f"http://127.0.0.1:{port}"
    wait_healthy(base)
    assert complete(base)
    assert app_status(dash)["status"] == "RUNNING"
    assert len(alive(dash, "RankActor")) == 2                                 # one prefill, one decode rank
    assert [g for g in leftovers(dash)[1] if g[1] == "CREATED"], "the units hold no placement group"
    shutdown_leaves_nothing(dash)


def test_serve_deploy_updates_in_place_then_shutdown_leaves_nothing(cluster, app_config, tiny_dir, tmp_path):
    _, dash = cluster
    port = free_port()
    args = {"config": app_config, "model": tiny_dir}
    serve_cli("deploy", deploy_file(tmp_path, port, args), "--address", dash)
    wait_status(dash, "RUNNING", ingress_running=1)
    base = f"http://127.0.0.1:{port}"
    wait_healthy(base)
    first = complete(base)
    assert complete(base) == first                                  # no limit yet: greedy, twice
    ranks = sorted(a["actor_id"] for a in alive(dash, "RankActor"))
    assert len(ranks) == 2
    (door,) = ingress_replicas(dash)
    client = openai.OpenAI(base_url=base + "/v1", api_key="k-acme", max_retries=0, timeout=300)
    stream = client.completions.create(model="epserve", prompt="A stream across the update", max_tokens=24,
                                       temperature=0.0, stream=True, stream_options={"include_usage": True})
    chunks = [next(stream)]                                         # open before the update, read after it

    # the same args, a new tenant limit (one request, then 1000 s to the next) and a second ingress replica
    limited = {"user_config": {"tenants": [{"name": "acme", "api_keys": ["k-acme"], "max_requests_per_s": 0.001}]},
               "num_replicas": 2}
    serve_cli("deploy", deploy_file(tmp_path, port, args, limited), "--address", dash)
    wait_status(dash, "RUNNING", ingress_running=2)
    chunks += list(stream)
    assert chunks[-1].usage.completion_tokens == 24                 # the stream was not cut
    assert door in ingress_replicas(dash)                           # its replica was reconfigured, not replaced
    assert complete(base) == first
    with pytest.raises(openai.RateLimitError):
        complete(base)
    assert sorted(a["actor_id"] for a in alive(dash, "RankActor")) == ranks     # the units never restarted
    shutdown_leaves_nothing(dash)


def our_groups(dash: str) -> dict[str, str]:
    """name -> state of every placement group the epserve application's units made (groups.py names)."""
    return {g["name"]: g["state"] for g in list_placement_groups(address=dash, limit=10000, detail=True,
                                                                   raise_on_missing_output=False)
            if g["name"].startswith("epserve/epserve/")}


def units_replica(dash: str) -> dict | None:
    """The live Units replica actor (Serve names its class ServeReplica:<app>:Units), if any."""
    return next((a for a in alive(dash) if a["class_name"] == "ServeReplica:epserve:Units"), None)


def test_a_killed_units_replica_is_replaced_and_its_placement_groups_removed(cluster, app_config, tiny_dir):
    """Hard-killed, the Units replica runs no teardown: its supervisors and ranks die with it but
    their placement groups would hold both GPUs. Its replacement removes them, then places its own."""
    gcs, dash = cluster
    port = free_port()
    serve_cli("start", "--address", gcs, "--http-host", "127.0.0.1", "--http-port", str(port))
    serve_cli("run", "--address", gcs, "--non-blocking", "--name", "epserve", "epserve.serve.app:build_app",
              f"config={app_config}", f"model={tiny_dir}")
    base = f"http://127.0.0.1:{port}"
    wait_healthy(base)
    first = complete(base)
    old = {n for n, st in our_groups(dash).items() if st == "CREATED"}
    assert len(old) == 2, our_groups(dash)                       # one prefill, one decode unit
    old_ranks = {a["actor_id"] for a in alive(dash, "RankActor")}
    victim, doors = units_replica(dash), ingress_replicas(dash)
    kill = ("import sys, ray; ray.init(address=sys.argv[1], log_to_driver=False); "
            "ray.kill(ray.get_actor(sys.argv[2], namespace='serve'), no_restart=False)")
    proc = subprocess.run([sys.executable, "-c", kill, gcs, victim["name"]], capture_output=True, text=True,
                          timeout=120, env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    assert proc.returncode == 0, proc.stderr[-3000:]

    # Serve starts a new Units replica; the Ingress fails its health check (its router died with the
    # old one) and is replaced by one bound to the new replica's units
    deadline = time.monotonic() + 420
    while ((new := units_replica(dash)) is None or new["actor_id"] == victim["actor_id"]
           or set(ingress_replicas(dash)) & set(doors)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"Units or Ingress not replaced 420 s after the kill; status: {app_status(dash)}")
        time.sleep(2)
    wait_status(dash, "RUNNING", ingress_running=1)
    wait_healthy(base, timeout_s=300)
    assert complete(base) == first                               # the new units answer, greedy and the same
    groups = our_groups(dash)
    assert {groups.get(n, "REMOVED") for n in old} == {"REMOVED"}, groups     # the dead supervisors' groups are gone
    assert len([n for n, st in groups.items() if st != "REMOVED"]) == 2, groups      # one per unit, no more
    assert not old_ranks & {a["actor_id"] for a in alive(dash, "RankActor")}
    shutdown_leaves_nothing(dash)


def test_serve_run_blocking_stopped_by_sigint_leaves_nothing(cluster, app_config, tiny_dir, tmp_path):
    gcs, dash = cluster
    port = free_port()
    serve_cli("start", "--address", gcs, "--http-host", "127.0.0.1", "--http-port", str(port))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log_path = tmp_path / "serve_run.log"              # a file, not a pipe: the replicas' logs would fill one
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen([str(SERVE_CLI), "run", "--address", gcs, "--name", "epserve",
                                 "epserve.serve.app:build_app", f"config={app_config}", f"model={tiny_dir}"],
                                stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                # a shell's background job starts with SIGINT ignored, and Python then
                                # installs no KeyboardInterrupt handler: give `serve run` its Ctrl-C back
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        base = f"http://127.0.0.1:{port}"
        wait_status(dash, "RUNNING", ingress_running=1)
        wait_healthy(base)
        assert complete(base)
        assert len(alive(dash, "RankActor")) == 2
        proc.send_signal(signal.SIGINT)                          # Ctrl-C on the `serve run` we started
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = log_path.read_text()
    assert "shutting down" in out, out[-3000:]
    deadline = time.monotonic() + 300                            # the replicas' teardown may outlast the CLI
    while (left := leftovers(dash)) != ([], []):
        if time.monotonic() > deadline:
            raise AssertionError(f"left behind 300 s after serve run's SIGINT: {left}\n{out[-3000:]}")
        time.sleep(2)
