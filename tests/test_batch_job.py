"""examples/batch_job.py end to end through Ray's job CLI: `ray job submit` to a local cluster with a
job server on loopback, the job's EP unit on fake GPUs, its Parquet read back and held to the
single-rank engine's greedy tokens.

The cluster is this module's own (the session's shared one has no job server); this process's
driver never joins it: the CLI speaks to the job server over HTTP, and the job's driver joins
through the RAY_ADDRESS the job server gives it."""
from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest

from conftest import free_port, single_rank_outputs
from epserve.model.sampling import SamplingParams
from epserve.model.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parent.parent
JOB = REPO / "examples" / "batch_job.py"
RAY_CLI = Path(sys.executable).parent / "ray"      # Ray's own CLI, from the venv that runs the tests
PROMPTS = ["The sea is wide", "Hello, world!", "One two three four five six", "Batch jobs write Parquet"]
MAX_TOKENS = 8
# Exact float32 math so the 2-rank unit's tokens equal the single-rank engine's.
JOB_CONFIG = "dtype: float32\nkernels: reference\ndecode: {units: 1, nodes_per_unit: 1, gpus_per_node: 2, kv_pages: 32}\n"


def wait_job_server(base: str, timeout_s: float = 180.0) -> None:
    """Wait until the cluster takes a job: the job server's /api/version answers 200, then a no-op
    probe job is accepted and SUCCEEDS. Ray's job head waits only 10 s for the head node's dashboard
    agent before answering a submit "500 No available agent ... try again later"; on two busy cores
    the agent can take longer to start, so the probe (never the test's own job) is resubmitted on
    exactly that answer. TimeoutError naming the last answer."""
    from ray.job_submission import JobStatus, JobSubmissionClient
    deadline = time.monotonic() + timeout_s
    last, probe, client = "", None, None
    while True:
        try:
            if client is None:
                r = httpx.get(base + "/api/version", timeout=5)
                last = f"job server: HTTP {r.status_code}: {r.text[:200]}"
                if r.status_code == 200:
                    client = JobSubmissionClient(base)
            if client is not None and probe is None:
                try:
                    probe = client.submit_job(entrypoint="python -c pass")
                except RuntimeError as exc:
                    if "No available agent" not in str(exc):
                        raise
                    last = f"probe job: {exc}"
            if probe is not None:
                status = client.get_job_status(probe)
                if status == JobStatus.SUCCEEDED:
                    return
                if status in (JobStatus.FAILED, JobStatus.STOPPED):
                    raise RuntimeError(f"the probe job {probe} ended {status}: {client.get_job_logs(probe)[-500:]}")
                last = f"probe job {probe}: {status}"
        except httpx.HTTPError as exc:
            last = f"job server: {type(exc).__name__}: {exc}"
        if time.monotonic() > deadline:
            raise TimeoutError(f"cluster at {base} did not take jobs within {timeout_s:g} s; last: {last}")
        time.sleep(0.5)


@contextlib.contextmanager
def dashboard_cluster(num_cpus: int = 2):
    """A one-node cluster on 127.0.0.1 with the dashboard (job server, Serve's REST API), 2 fake GPUs
    and the control-plane resource epserve's supervisors look for, ready for jobs. Its dashboard agent
    gets its own port: the session's shared cluster already holds Ray's default one.
    -> (GCS address, dashboard URL)."""
    from ray.cluster_utils import Cluster
    port = free_port()
    cluster = Cluster(initialize_head=True, shutdown_at_exit=True, head_node_args=dict(
        num_cpus=num_cpus, num_gpus=2, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
        dashboard_agent_listen_port=free_port(),
        node_ip_address="127.0.0.1", object_store_memory=100 << 20, resources={"epserve_control": 10000}))
    try:
        base = f"http://127.0.0.1:{port}"
        wait_job_server(base)
        yield cluster.address, base
    finally:
        cluster.shutdown()


@pytest.fixture(scope="module")
def job_server():
    """The job server's URL of a dashboard cluster for one 2-rank unit."""
    with dashboard_cluster() as (_, base):
        yield base


def test_ray_job_submit_writes_parquet_equal_to_single_rank(job_server, tiny_dir, tmp_path):
    work = tmp_path / "job"
    work.mkdir()
    (work / "prompts.txt").write_text("\n".join(PROMPTS) + "\n\n")      # a trailing blank line is skipped
    (work / "job.yaml").write_text(JOB_CONFIG)
    out = tmp_path / "out.parquet"          # absolute: the job runs in a copy of its working dir
    cmd = [str(RAY_CLI), "job", "submit", "--address", job_server, "--working-dir", str(work), "--",
           sys.executable, str(JOB), "prompts.txt", str(out), "--model", tiny_dir, "--config", "job.yaml",
           "--max-tokens", str(MAX_TOKENS)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, f"ray job submit exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert f"wrote {len(PROMPTS)} rows to {out}" in proc.stdout     # the job's own log, tailed by the CLI

    rows = pq.read_table(out).to_pylist()
    assert [r["prompt"] for r in rows] == PROMPTS
    tok = load_tokenizer(tiny_dir)
    prompt_ids = [tok.encode(p) for p in PROMPTS]
    want = single_rank_outputs(tiny_dir, prompt_ids, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))
    for row, ids, ref in zip(rows, prompt_ids, want):
        assert row["token_ids"] == ref, row["prompt"]
        assert row["text"] == tok.decode(ref)
        assert (row["prompt_tokens"], row["completion_tokens"]) == (len(ids), len(ref))
        assert row["total_tokens"] == len(ids) + len(ref)
        assert row["prompt_cache_hit_tokens"] + row["prompt_cache_miss_tokens"] == len(ids)
        assert row["finish_reason"] == ("length" if len(ref) == MAX_TOKENS else "stop")


@pytest.mark.parametrize("args, message", [
    (["missing.txt", "out.parquet"], "prompts file 'missing.txt' does not exist"),
    (["empty.txt", "out.parquet"], "prompts file 'empty.txt' has no prompts"),
    (["empty.txt", "no/such/dir/out.parquet"], "output directory"),
    (["empty.txt", "out.parquet", "--max-tokens", "0"], "--max-tokens must be >= 1, got 0"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    (tmp_path / "empty.txt").write_text("\n \n")
    proc = subprocess.run([sys.executable, str(JOB), *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("epserve batch_job: error: ") and message in lines[0], proc.stderr
    assert not (tmp_path / "out.parquet").exists()
